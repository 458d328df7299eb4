//! Key constraints (`ssh-add -t`, `-c`, `-h`) and session bindings
//! (session-bind@openssh.com), checked exactly as OpenSSH's agent checks them
//! (PROTOCOL.agent and ssh-agent.c: `identity_permitted`,
//! `permitted_by_dest_constraints`, `match_key_hop`, `process_ext_session_bind`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use signature::Verifier;
use ssh_encoding::{Decode, Reader};
use ssh_key::certificate::{CertType, Certificate};
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, Signature};

use crate::mldsa;
use crate::pattern;
use crate::proto::key::KeyOrCertificate;
use crate::proto::message::{decode_exact, DestinationConstraint, Hop};
use crate::proto::userauth;

/// OpenSSH's AGENT_MAX_SESSION_IDS: how many bindings one connection may record.
const MAX_SESSION_IDS: usize = 16;
/// OpenSSH's AGENT_MAX_SID_LEN.
const MAX_SESSION_ID_LEN: usize = 128;

/// What a client asked to limit a key to when it added it.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    /// When the key is removed (`ssh-add -t`, or the agent's `-t`).
    pub expires_at: Option<Instant>,
    /// Each use must be confirmed by the person (`ssh-add -c`).
    pub confirm: bool,
    /// The hosts the key may be used for (`ssh-add -h`); empty means anywhere.
    pub destinations: Vec<DestinationConstraint>,
}

impl Constraints {
    /// Constraints with a lifetime of `lifetime` from now.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.expires_at = Instant::now().checked_add(lifetime);
        self
    }

    /// Whether the key's lifetime has run out.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// One session-bind@openssh.com record.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The server's host key, verified by the client.
    pub host_key: KeyOrCertificate,
    /// The SSH session identifier.
    pub session_id: Vec<u8>,
    /// Whether the agent is forwarded over this session (rather than used to log in).
    pub forwarded: bool,
}

/// The bindings recorded on one client connection.
#[derive(Debug, Default)]
pub struct SessionBindings {
    bindings: Vec<Binding>,
    attempted: bool,
    /// A bind failed before any was recorded: the first hop is unknown.
    first_unverified: bool,
}

impl SessionBindings {
    /// The recorded hops, first to last.
    pub fn hops(&self) -> &[Binding] {
        &self.bindings
    }

    /// Whether the last hop is a forwarding one: the client is a remote host
    /// using a forwarded agent.
    pub fn forwarded(&self) -> bool {
        self.bindings.last().is_some_and(|b| b.forwarded)
    }

    /// Whether the connection sent any session bind, verified or not: it
    /// comes through ssh, so it may be a remote host's (OpenSSH's
    /// `socket_is_remote`).
    pub fn attempted(&self) -> bool {
        self.attempted
    }

    /// Whether a bind failed before any was recorded, so the hops recorded
    /// (if any) do not start where the connection does: whether its first
    /// hop forwards is unknown.
    pub fn first_hop_unverified(&self) -> bool {
        self.first_unverified
    }

    /// Handles a session-bind@openssh.com request: parse, verify the host's
    /// signature over the session id, and record it.
    pub fn bind(&mut self, payload: &[u8]) -> Result<&Binding, String> {
        self.attempted = true;
        match self.record(payload) {
            Ok(index) => Ok(&self.bindings[index]),
            Err(err) => {
                if self.bindings.is_empty() {
                    self.first_unverified = true;
                }
                Err(err)
            }
        }
    }

    /// Verifies a bind and records it, or finds it recorded: its index.
    fn record(&mut self, payload: &[u8]) -> Result<usize, String> {
        let mut reader = payload;
        let host_key = Vec::<u8>::decode(&mut reader).map_err(|e| format!("host key: {e}"))?;
        let host_key = KeyOrCertificate::decode(&host_key)?;
        let session_id = Vec::<u8>::decode(&mut reader).map_err(|e| e.to_string())?;
        let signature = Vec::<u8>::decode(&mut reader).map_err(|e| format!("signature: {e}"))?;
        let forwarded = u8::decode(&mut reader).map_err(|e| e.to_string())? != 0;
        if !reader.is_finished() {
            return Err("trailing bytes".into());
        }
        if session_id.len() > MAX_SESSION_ID_LEN {
            return Err("session id too long".into());
        }
        verify_host_signature(host_key.key_data(), &session_id, &signature)
            .map_err(|e| format!("host key signature does not verify: {e}"))?;
        let mut known = None;
        for (index, binding) in self.bindings.iter().enumerate() {
            if !binding.forwarded {
                return Err(
                    "connection was already bound for authentication; refusing another bind".into(),
                );
            }
            if binding.session_id == session_id {
                if binding.host_key.key_data() == host_key.key_data() {
                    known = Some(index);
                    break;
                }
                return Err("session id already bound to a different host key".into());
            }
        }
        let index = match known {
            Some(index) => index,
            None => {
                if self.bindings.len() >= MAX_SESSION_IDS {
                    return Err("too many session ids on one connection".into());
                }
                self.bindings.push(Binding {
                    host_key,
                    session_id,
                    forwarded,
                });
                self.bindings.len() - 1
            }
        };
        Ok(index)
    }
}

/// Checks `signature` (an SSH signature blob) over `session_id` by the host
/// key `key`, as OpenSSH's `sshkey_verify` without a named algorithm: every
/// signature algorithm of the key's type, `ssh-rsa` (SHA-1) included, since
/// a server may still sign with it, and ML-DSA hybrid host keys.
fn verify_host_signature(key: &KeyData, session_id: &[u8], signature: &[u8]) -> Result<(), String> {
    match key {
        KeyData::Other(public) if public.algorithm().as_str() == mldsa::ALGORITHM => {
            let public =
                mldsa::PublicKey::from_bytes(public.as_ref()).map_err(|e| e.to_string())?;
            mldsa::verify(&public, session_id, signature).map_err(|e| e.to_string())
        }
        KeyData::Rsa(public) => verify_rsa(public, session_id, signature),
        _ => {
            let signature = decode_exact::<Signature>(signature)?;
            key.verify(session_id, &signature)
                .map_err(|e| e.to_string())
        }
    }
}

/// OpenSSH's `ssh_rsa_verify`: PKCS#1 v1.5 with SHA-1, SHA-256 or SHA-512 as
/// the signature names, a modulus of at least 1024 bits, and a signature no
/// longer than the modulus (a shorter one is taken as zero-padded).
fn verify_rsa(
    public: &ssh_key::public::RsaPublicKey,
    msg: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    use openssl::bn::BigNum;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::rsa::{Padding, Rsa};

    let mut reader = signature;
    let algorithm = String::decode(&mut reader).map_err(|e| e.to_string())?;
    let raw = Vec::<u8>::decode(&mut reader).map_err(|e| e.to_string())?;
    if !reader.is_finished() {
        return Err("trailing bytes after the signature".into());
    }
    let digest = match algorithm.as_str() {
        "ssh-rsa" => MessageDigest::sha1(),
        "rsa-sha2-256" => MessageDigest::sha256(),
        "rsa-sha2-512" => MessageDigest::sha512(),
        other => return Err(format!("{other} is not an RSA signature")),
    };
    let number = |m: &ssh_key::Mpint| {
        m.as_positive_bytes()
            .ok_or("a negative RSA key component")
            .and_then(|bytes| BigNum::from_slice(bytes).map_err(|_| "a bad RSA key component"))
    };
    let rsa = Rsa::from_public_components(number(&public.n)?, number(&public.e)?)
        .map_err(|e| e.to_string())?;
    let modulus = usize::try_from(rsa.size()).map_err(|e| e.to_string())?;
    if modulus * 8 < 1024 {
        return Err("an RSA key shorter than 1024 bits".into());
    }
    if raw.len() > modulus {
        return Err("an RSA signature longer than the key's modulus".into());
    }
    let mut padded = vec![0u8; modulus - raw.len()];
    padded.extend_from_slice(&raw);
    let key = PKey::from_rsa(rsa).map_err(|e| e.to_string())?;
    let mut verifier = openssl::sign::Verifier::new(digest, &key).map_err(|e| e.to_string())?;
    verifier
        .set_rsa_padding(Padding::PKCS1)
        .map_err(|e| e.to_string())?;
    match verifier.verify_oneshot(&padded, msg) {
        Ok(true) => Ok(()),
        Ok(false) | Err(_) => Err("the RSA signature does not verify".into()),
    }
}

/// The outcome of checking a destination-constrained key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permitted {
    /// The host name of the final hop, when a constraint named it.
    pub hostname: Option<String>,
    /// The user logged in as, for a signature.
    pub user: Option<String>,
}

/// Whether a key with `constraints` may be listed on a connection with
/// `bindings` (OpenSSH lists only keys usable from where the client is).
pub fn visible(constraints: &Constraints, bindings: &SessionBindings) -> bool {
    identity_permitted(&constraints.destinations, bindings, None).is_ok()
}

/// Whether a key with `constraints` may sign `data` for a connection with
/// `bindings`. `blob` is the key or certificate the request names.
pub fn may_sign(
    constraints: &Constraints,
    bindings: &SessionBindings,
    blob: &[u8],
    data: &[u8],
) -> Result<Permitted, String> {
    if constraints.destinations.is_empty() {
        return Ok(Permitted {
            hostname: None,
            user: None,
        });
    }
    let Some(last) = bindings.bindings.last() else {
        return Err("destination-constrained key used on a connection without session-bind".into());
    };
    let request = userauth::parse(data, blob).ok_or(
        "destination-constrained key asked to sign something that is not a user authentication",
    )?;
    let hostname = identity_permitted(
        &constraints.destinations,
        bindings,
        Some(request.user.as_str()),
    )?;
    if request.session_id != last.session_id {
        return Err("the signed session id is not the connection's most recent binding".into());
    }
    if bindings.bindings.len() > 1 && request.host_key.is_none() {
        return Err("no host key recorded in the request on a forwarded connection".into());
    }
    if let Some(host_key) = &request.host_key {
        if host_key != &last.host_key {
            return Err("the host key in the request is not the most recently bound one".into());
        }
    }
    Ok(Permitted {
        hostname,
        user: Some(request.user),
    })
}

/// OpenSSH's `identity_permitted`: walk the hops and find a constraint for each.
/// Returns the host name of the last hop when a constraint names it.
fn identity_permitted(
    destinations: &[DestinationConstraint],
    bindings: &SessionBindings,
    user: Option<&str>,
) -> Result<Option<String>, String> {
    if destinations.is_empty() {
        return Ok(None);
    }
    if bindings.attempted && bindings.bindings.is_empty() {
        return Err("a previous session bind failed on this connection".into());
    }
    if bindings.bindings.is_empty() {
        // Local use: the key is usable from this host.
        return Ok(None);
    }
    let mut from: Option<&KeyOrCertificate> = None;
    let mut last_hostname = None;
    let count = bindings.bindings.len();
    for (index, hop) in bindings.bindings.iter().enumerate() {
        let mut test_user = None;
        if index == count - 1 {
            test_user = user;
            if hop.forwarded && user.is_some() {
                return Err("tried to sign on a forwarding hop".into());
            }
        } else if !hop.forwarded {
            return Err("tried to forward through a signing bind".into());
        }
        last_hostname =
            permitted_by_constraints(destinations, from, Some(&hop.host_key), test_user)
                .ok_or("not permitted for this destination")?;
        from = Some(&hop.host_key);
    }
    let last = &bindings.bindings[count - 1];
    if last.forwarded
        && user.is_none()
        && permitted_by_constraints(destinations, Some(&last.host_key), None, None).is_none()
    {
        return Err("permitted at the host but not beyond it".into());
    }
    Ok(last_hostname)
}

/// OpenSSH's `permitted_by_dest_constraints`: `Some(hostname)` when a constraint matches.
fn permitted_by_constraints(
    destinations: &[DestinationConstraint],
    from: Option<&KeyOrCertificate>,
    to: Option<&KeyOrCertificate>,
    user: Option<&str>,
) -> Option<Option<String>> {
    destinations.iter().find_map(|constraint| {
        match from {
            None => {
                if !constraint.from.hostname.is_empty() || !constraint.from.keys.is_empty() {
                    return None;
                }
            }
            Some(key) => {
                if !match_key_hop(key, &constraint.from) {
                    return None;
                }
            }
        }
        if let Some(key) = to {
            if !match_key_hop(key, &constraint.to) {
                return None;
            }
        }
        if let Some(user) = user {
            if !constraint.to.username.is_empty()
                && !pattern::matches(user, &constraint.to.username)
            {
                return None;
            }
        }
        let hostname = (!constraint.to.hostname.is_empty()).then(|| constraint.to.hostname.clone());
        Some(hostname)
    })
}

/// OpenSSH's `match_key_hop`: a plain host key is one of the hop's plain
/// keys; a host certificate is signed by one of the hop's CA keys (a
/// `@cert-authority` line of known_hosts) and valid for the hop's host name.
fn match_key_hop(key: &KeyOrCertificate, hop: &Hop) -> bool {
    hop.keys.iter().any(|spec| match key {
        KeyOrCertificate::Plain(plain) => !spec.is_ca && plain == &spec.key,
        KeyOrCertificate::Certificate(cert) => {
            spec.is_ca
                && cert.signature_key() == &spec.key
                && host_certificate_valid(cert, hop_name(hop)).is_ok()
        }
    })
}

/// The name a hop's host certificate must be valid for: the host name given
/// to `ssh-add -h`, or "(ORIGIN)" for the first hop, as in OpenSSH.
fn hop_name(hop: &Hop) -> &str {
    if hop.hostname.is_empty() {
        "(ORIGIN)"
    } else {
        &hop.hostname
    }
}

/// OpenSSH's `sshkey_cert_check_host` for a session-bind host certificate:
/// a host certificate, now within its validity, with a principal list one of
/// whose patterns matches `hostname`, no critical options, signed with an
/// algorithm OpenSSH allows for CAs (SSH_ALLOWED_CA_SIGALGS), and whose
/// signature verifies.
fn host_certificate_valid(cert: &Certificate, hostname: &str) -> Result<(), &'static str> {
    if cert.cert_type() != CertType::Host {
        return Err("not a host certificate");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now < cert.valid_after() {
        return Err("not yet valid");
    }
    if now >= cert.valid_before() {
        return Err("expired");
    }
    if cert.valid_principals().is_empty() {
        return Err("lacks a principal list");
    }
    if !cert
        .valid_principals()
        .iter()
        .any(|principal| pattern::matches(hostname, principal))
    {
        return Err("the host name is not a listed principal");
    }
    if !cert.critical_options().is_empty() {
        return Err("contains critical options");
    }
    if !CA_SIGNATURE_ALGORITHMS.contains(&cert.signature().algorithm().as_str()) {
        return Err("signed with an algorithm not allowed for CAs");
    }
    let ca = cert.signature_key().fingerprint(HashAlg::Sha256);
    cert.validate_at(now, [&ca])
        .map_err(|_| "the CA signature does not verify")
}

/// OpenSSH's SSH_ALLOWED_CA_SIGALGS (myproposal.h): no SHA-1 "ssh-rsa".
const CA_SIGNATURE_ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
];

#[cfg(test)]
pub(crate) mod testing {
    //! Host keys, session binds and destination constraints for tests.

    use crate::proto::message::KeySpec;
    use ssh_encoding::Encode;
    use ssh_key::private::Ed25519Keypair;
    use ssh_key::public::KeyData;

    use super::*;

    /// The ed25519 key pair of seed `seed`.
    pub(crate) fn keypair(seed: u8) -> Ed25519Keypair {
        Ed25519Keypair::from_seed(&[seed; 32])
    }

    /// A session-bind@openssh.com payload: `host` signs the session id `sid`.
    pub(crate) fn bind_payload(host: &Ed25519Keypair, sid: &[u8], forwarded: bool) -> Vec<u8> {
        let signature = signature::Signer::<Signature>::sign(host, sid);
        let mut out = Vec::new();
        KeyData::Ed25519(host.public)
            .encode_prefixed(&mut out)
            .unwrap();
        sid.to_vec().encode(&mut out).unwrap();
        signature.encode_prefixed(&mut out).unwrap();
        u8::from(forwarded).encode(&mut out).unwrap();
        out
    }

    /// The constraint `ssh-add -h user@name` for the host key of `host`.
    pub(crate) fn to_host(host: &Ed25519Keypair, name: &str, user: &str) -> DestinationConstraint {
        DestinationConstraint {
            from: Hop::default(),
            to: Hop {
                username: user.into(),
                hostname: name.into(),
                keys: vec![KeySpec {
                    key: KeyData::Ed25519(host.public),
                    is_ca: false,
                }],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use ssh_encoding::Encode;
    use ssh_key::public::KeyData;

    use super::testing::{bind_payload, keypair, to_host};
    use super::*;

    fn userauth(sid: &[u8], user: &str, key: &KeyData, host: &KeyData) -> Vec<u8> {
        let mut out = Vec::new();
        sid.to_vec().encode(&mut out).unwrap();
        50u8.encode(&mut out).unwrap();
        user.encode(&mut out).unwrap();
        "ssh-connection".encode(&mut out).unwrap();
        "publickey-hostbound-v00@openssh.com"
            .encode(&mut out)
            .unwrap();
        1u8.encode(&mut out).unwrap();
        "ssh-ed25519".encode(&mut out).unwrap();
        key.encode_prefixed(&mut out).unwrap();
        host.encode_prefixed(&mut out).unwrap();
        out
    }

    #[test]
    fn bind_verifies_the_host_signature() {
        let host = keypair(1);
        let mut bindings = SessionBindings::default();
        let mut payload = bind_payload(&host, b"sid", false);
        // Corrupt one byte of the signature.
        let len = payload.len();
        payload[len - 2] ^= 1;
        assert!(bindings.bind(&payload).is_err());
        assert!(bindings.hops().is_empty());
        assert!(bindings.bind(&bind_payload(&host, b"sid", false)).is_ok());
        assert_eq!(bindings.hops().len(), 1);
    }

    #[test]
    fn a_failed_first_bind_leaves_the_first_hop_unknown() {
        let (first, remote) = (keypair(1), keypair(2));
        let mut bindings = SessionBindings::default();
        assert!(!bindings.attempted());
        let mut unverifiable = bind_payload(&first, b"sid-1", true);
        let len = unverifiable.len();
        unverifiable[len - 2] ^= 1;
        assert!(bindings.bind(&unverifiable).is_err());
        assert!(bindings.attempted() && bindings.first_hop_unverified());
        assert!(crate::forwarding::is_forwarded(&bindings));
        // The remote host's own bind verifies, but does not make the
        // connection a local one.
        bindings
            .bind(&bind_payload(&remote, b"sid-2", false))
            .unwrap();
        assert_eq!(bindings.hops().len(), 1);
        assert!(bindings.first_hop_unverified());
        assert!(crate::forwarding::is_forwarded(&bindings));

        // A failure after a verified first hop leaves that hop known.
        let mut known = SessionBindings::default();
        known.bind(&bind_payload(&first, b"sid-1", false)).unwrap();
        assert!(known.bind(&unverifiable).is_err());
        assert!(!known.first_hop_unverified());
        assert!(!crate::forwarding::is_forwarded(&known));
    }

    /// A bind payload from raw parts.
    fn raw_bind(host_key_blob: &[u8], sid: &[u8], signature_blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        host_key_blob.encode(&mut out).unwrap();
        sid.encode(&mut out).unwrap();
        signature_blob.encode(&mut out).unwrap();
        0u8.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn ml_dsa_host_keys_bind() {
        let host = crate::mldsa::Keypair::from_seeds(&[7; crate::mldsa::PRIVATE_KEY_LEN]);
        let blob = host.public().key_blob();
        let signature = host.sign(b"sid").unwrap();
        let mut bindings = SessionBindings::default();
        assert!(bindings
            .bind(&raw_bind(&blob, b"other sid", &signature))
            .is_err());
        bindings.bind(&raw_bind(&blob, b"sid", &signature)).unwrap();
        assert_eq!(bindings.hops().len(), 1);
    }

    #[test]
    fn rsa_host_keys_bind_with_each_signature_algorithm() {
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::rsa::Rsa;

        let rsa = Rsa::generate(2048).unwrap();
        let public = KeyData::Rsa(ssh_key::public::RsaPublicKey {
            e: ssh_key::Mpint::from_positive_bytes(&rsa.e().to_vec()).unwrap(),
            n: ssh_key::Mpint::from_positive_bytes(&rsa.n().to_vec()).unwrap(),
        });
        let mut blob = Vec::new();
        public.encode(&mut blob).unwrap();
        let key = PKey::from_rsa(rsa).unwrap();
        for (name, digest) in [
            ("ssh-rsa", MessageDigest::sha1()),
            ("rsa-sha2-256", MessageDigest::sha256()),
            ("rsa-sha2-512", MessageDigest::sha512()),
        ] {
            let mut signer = openssl::sign::Signer::new(digest, &key).unwrap();
            let raw = signer.sign_oneshot_to_vec(b"sid").unwrap();
            let mut signature = Vec::new();
            name.encode(&mut signature).unwrap();
            raw.encode(&mut signature).unwrap();
            let mut bindings = SessionBindings::default();
            bindings
                .bind(&raw_bind(&blob, b"sid", &signature))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut wrong = SessionBindings::default();
            assert!(wrong.bind(&raw_bind(&blob, b"sid2", &signature)).is_err());
        }
    }

    #[test]
    fn no_second_bind_after_an_authentication_bind() {
        let host = keypair(1);
        let mut bindings = SessionBindings::default();
        bindings.bind(&bind_payload(&host, b"one", false)).unwrap();
        assert!(bindings.bind(&bind_payload(&host, b"two", false)).is_err());
    }

    #[test]
    fn restricted_key_signs_for_its_host_only() {
        let (allowed, other, user) = (keypair(1), keypair(2), keypair(3));
        let user_key = KeyData::Ed25519(user.public);
        let mut user_blob = Vec::new();
        user_key.encode(&mut user_blob).unwrap();
        let constraints = Constraints {
            destinations: vec![to_host(&allowed, "allowed.example", "")],
            ..Constraints::default()
        };

        let mut good = SessionBindings::default();
        good.bind(&bind_payload(&allowed, b"sid-a", false)).unwrap();
        let data = userauth(
            b"sid-a",
            "alice",
            &user_key,
            &KeyData::Ed25519(allowed.public),
        );
        let permitted = may_sign(&constraints, &good, &user_blob, &data).unwrap();
        assert_eq!(permitted.hostname.as_deref(), Some("allowed.example"));
        assert_eq!(permitted.user.as_deref(), Some("alice"));
        assert!(visible(&constraints, &good));

        let mut bad = SessionBindings::default();
        bad.bind(&bind_payload(&other, b"sid-b", false)).unwrap();
        let data = userauth(
            b"sid-b",
            "alice",
            &user_key,
            &KeyData::Ed25519(other.public),
        );
        assert!(may_sign(&constraints, &bad, &user_blob, &data).is_err());
        assert!(!visible(&constraints, &bad));
    }

    #[test]
    fn restricted_key_refuses_unbound_connections_and_foreign_data() {
        let (allowed, user) = (keypair(1), keypair(3));
        let user_key = KeyData::Ed25519(user.public);
        let mut user_blob = Vec::new();
        user_key.encode(&mut user_blob).unwrap();
        let constraints = Constraints {
            destinations: vec![to_host(&allowed, "allowed.example", "")],
            ..Constraints::default()
        };
        let unbound = SessionBindings::default();
        assert!(visible(&constraints, &unbound), "local use lists the key");
        assert!(may_sign(&constraints, &unbound, &user_blob, b"data").is_err());

        let mut bound = SessionBindings::default();
        bound.bind(&bind_payload(&allowed, b"sid", false)).unwrap();
        assert!(may_sign(&constraints, &bound, &user_blob, b"not userauth").is_err());
        let stale = userauth(
            b"old-sid",
            "alice",
            &user_key,
            &KeyData::Ed25519(allowed.public),
        );
        assert!(may_sign(&constraints, &bound, &user_blob, &stale).is_err());
    }
}
