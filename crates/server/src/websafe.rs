//! Keeping FIDO keys out of web authentication, as OpenSSH's ssh-agent does
//! (ssh-agent.c `check_websafe_message_contents`, ssh-agent(1) `-O
//! no-restrict-websafe` and `-O websafe-allow`).
//!
//! A FIDO authenticator signs a challenge for whichever relying party (the
//! key's "application") the key was made for. An SSH key's application
//! starts with `ssh:`; a website's is its domain. Someone who can reach a
//! forwarded agent must not be able to use it to log in to a website as its
//! owner, so signatures with an sk key whose application is not in the
//! allowlist (`ssh:*` by default) are refused unless the data is something
//! only SSH signs: a public-key user authentication request (RFC 4252
//! section 7) or an `ssh-keygen -Y sign` blob (OpenSSH PROTOCOL.sshsig).
//! Keys of other types are never restricted.

use ssh_encoding::{Decode, Reader};
use ssh_key::public::KeyData;

use crate::pattern;
use crate::proto::userauth;

/// OpenSSH's default allowlist of applications that may sign anything.
pub const DEFAULT_ALLOWLIST: &str = "ssh:*";

/// The websafe policy: whether to restrict, and which applications need no restriction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Websafe {
    /// `false` with `-O no-restrict-websafe`.
    restrict: bool,
    /// A pattern-list of applications (`-O websafe-allow=LIST`).
    allowlist: String,
}

impl Default for Websafe {
    /// Restricted, with OpenSSH's default allowlist `ssh:*`.
    fn default() -> Self {
        Self {
            restrict: true,
            allowlist: DEFAULT_ALLOWLIST.to_owned(),
        }
    }
}

/// Why an sk key may not sign: it looks like a web authentication request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the security key's application \"{application}\" is not in the websafe allowlist \
     \"{allowlist}\" and the data to sign is neither an SSH login nor an ssh-keygen -Y \
     signature: it looks like a web authentication request, so it was refused; start the \
     agent with -O no-restrict-websafe to allow such signatures, or with \
     -O websafe-allow=LIST to name the applications that may sign anything"
)]
pub struct WebOrigin {
    /// The key's application (its FIDO relying party).
    pub application: String,
    /// The allowlist it did not match.
    pub allowlist: String,
}

impl Websafe {
    /// The policy `-O no-restrict-websafe` (`restrict == false`) and
    /// `-O websafe-allow=LIST` (`allowlist`, default `ssh:*`) ask for.
    pub fn new(restrict: bool, allowlist: Option<String>) -> Self {
        Self {
            restrict,
            allowlist: allowlist.unwrap_or_else(|| DEFAULT_ALLOWLIST.to_owned()),
        }
    }

    /// Whether signatures are restricted at all.
    pub fn restricts(&self) -> bool {
        self.restrict
    }

    /// The allowlist of applications.
    pub fn allowlist(&self) -> &str {
        &self.allowlist
    }

    /// Checks that the key `key` (an identity's plain public key) may sign
    /// `data` for a request naming `blob` (the key, or a certificate of it).
    /// Keys that are not sk keys always may.
    pub fn check(&self, key: &KeyData, blob: &[u8], data: &[u8]) -> Result<(), WebOrigin> {
        let Some(application) = application(key) else {
            return Ok(());
        };
        if !self.restrict || pattern::matches_list(application, &self.allowlist) {
            return Ok(());
        }
        if userauth::parse(data, blob).is_some() {
            tracing::debug!(
                application,
                "signed data is a public key user authentication request"
            );
            return Ok(());
        }
        if is_sshsig(data) {
            tracing::debug!(application, "signed data is an SSHSIG signature request");
            return Ok(());
        }
        Err(WebOrigin {
            application: application.to_owned(),
            allowlist: self.allowlist.clone(),
        })
    }
}

/// The application of an sk key; `None` for other keys.
fn application(key: &KeyData) -> Option<&str> {
    match key {
        KeyData::SkEd25519(sk) => Some(sk.application()),
        KeyData::SkEcdsaSha2NistP256(sk) => Some(sk.application()),
        _ => None,
    }
}

/// Whether `data` is exactly what `ssh-keygen -Y sign` asks an agent to sign
/// (PROTOCOL.sshsig): "SSHSIG", namespace, reserved, hash algorithm and the
/// message hash, nothing after. As OpenSSH's `parse_sshsig_request`, the
/// namespace and hash algorithm are C strings: no NUL byte inside.
fn is_sshsig(data: &[u8]) -> bool {
    let Some(mut reader) = data.strip_prefix(b"SSHSIG") else {
        return false;
    };
    let cstring = |reader: &mut &[u8]| {
        Vec::<u8>::decode(reader)
            .ok()
            .filter(|text| !text.contains(&0))
    };
    cstring(&mut reader).is_some()
        && Vec::<u8>::decode(&mut reader).is_ok()
        && cstring(&mut reader).is_some()
        && Vec::<u8>::decode(&mut reader).is_ok()
        && reader.is_finished()
}

#[cfg(test)]
mod tests {
    use ssh_encoding::Encode;
    use ssh_key::public::{Ed25519PublicKey, SkEd25519};

    use super::*;

    fn sk_key(application: &str) -> KeyData {
        KeyData::SkEd25519(SkEd25519::new(Ed25519PublicKey([7; 32]), application))
    }

    fn blob(key: &KeyData) -> Vec<u8> {
        let mut out = Vec::new();
        key.encode(&mut out).unwrap();
        out
    }

    fn sshsig(namespace: &[u8]) -> Vec<u8> {
        let mut out = b"SSHSIG".to_vec();
        namespace.encode(&mut out).unwrap();
        b"".as_slice().encode(&mut out).unwrap();
        "sha512".encode(&mut out).unwrap();
        [0x42u8; 64].as_slice().encode(&mut out).unwrap();
        out
    }

    fn userauth(key: &KeyData) -> Vec<u8> {
        let mut out = Vec::new();
        b"session-id".as_slice().encode(&mut out).unwrap();
        50u8.encode(&mut out).unwrap();
        "alice".encode(&mut out).unwrap();
        "ssh-connection".encode(&mut out).unwrap();
        "publickey".encode(&mut out).unwrap();
        1u8.encode(&mut out).unwrap();
        key.algorithm().as_str().encode(&mut out).unwrap();
        key.encode_prefixed(&mut out).unwrap();
        out
    }

    /// What a browser would have an authenticator sign: a client data hash.
    const WEB_CHALLENGE: &[u8] = &[0x9c; 32];

    #[test]
    fn ssh_applications_sign_anything_by_default() {
        let key = sk_key("ssh:");
        Websafe::default()
            .check(&key, &blob(&key), WEB_CHALLENGE)
            .unwrap();
        let key = sk_key("ssh:work");
        Websafe::default()
            .check(&key, &blob(&key), WEB_CHALLENGE)
            .unwrap();
    }

    #[test]
    fn web_applications_sign_only_ssh_data() {
        let policy = Websafe::default();
        let key = sk_key("example.org");
        let refused = policy.check(&key, &blob(&key), WEB_CHALLENGE).unwrap_err();
        assert_eq!(refused.application, "example.org");
        let text = refused.to_string();
        assert!(
            text.contains("looks like a web authentication request"),
            "{text}"
        );
        assert!(text.contains("-O no-restrict-websafe"), "{text}");
        policy.check(&key, &blob(&key), &userauth(&key)).unwrap();
        policy.check(&key, &blob(&key), &sshsig(b"file")).unwrap();
        // A user authentication request for another key is not this key's login.
        let other = sk_key("other.example");
        assert!(policy.check(&key, &blob(&key), &userauth(&other)).is_err());
    }

    #[test]
    fn sshsig_is_recognised_exactly() {
        assert!(is_sshsig(&sshsig(b"file")));
        let mut trailing = sshsig(b"file");
        trailing.push(0);
        assert!(!is_sshsig(&trailing));
        assert!(!is_sshsig(&sshsig(b"fi\0le")));
        let truncated = sshsig(b"file");
        assert!(!is_sshsig(&truncated[..truncated.len() - 1]));
        assert!(!is_sshsig(b"SSHSIG"));
        assert!(!is_sshsig(&sshsig(b"file")[1..]));
    }

    #[test]
    fn no_restrict_websafe_allows_everything() {
        let key = sk_key("example.org");
        Websafe::new(false, None)
            .check(&key, &blob(&key), WEB_CHALLENGE)
            .unwrap();
    }

    #[test]
    fn websafe_allow_replaces_the_default_list() {
        let policy = Websafe::new(true, Some("ssh:*,example.org,*.example.com".into()));
        for application in ["ssh:", "example.org", "login.example.com"] {
            let key = sk_key(application);
            policy.check(&key, &blob(&key), WEB_CHALLENGE).unwrap();
        }
        let key = sk_key("example.net");
        assert!(policy.check(&key, &blob(&key), WEB_CHALLENGE).is_err());
        // The list replaces ssh:*, and a negation denies.
        let policy = Websafe::new(true, Some("example.org".into()));
        let key = sk_key("ssh:");
        assert!(policy.check(&key, &blob(&key), WEB_CHALLENGE).is_err());
        policy.check(&key, &blob(&key), &sshsig(b"file")).unwrap();
        let policy = Websafe::new(true, Some("ssh:*,!ssh:web".into()));
        let key = sk_key("ssh:web");
        assert!(policy.check(&key, &blob(&key), WEB_CHALLENGE).is_err());
    }

    #[test]
    fn other_keys_are_never_restricted() {
        let key = KeyData::Ed25519(Ed25519PublicKey([7; 32]));
        Websafe::new(true, Some(String::new()))
            .check(&key, &blob(&key), WEB_CHALLENGE)
            .unwrap();
    }
}
