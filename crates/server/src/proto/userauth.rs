//! The data an SSH client signs for public-key user authentication
//! (RFC 4252 section 7, and OpenSSH's "publickey-hostbound-v00@openssh.com" in
//! PROTOCOL), parsed to check destination constraints as OpenSSH's agent does.

use ssh_encoding::{Decode, Reader};

use super::key::KeyOrCertificate;

/// SSH_MSG_USERAUTH_REQUEST.
const USERAUTH_REQUEST: u8 = 50;

/// The fields of a user authentication request that destination constraints check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserauthRequest {
    /// The session identifier the signature is bound to.
    pub session_id: Vec<u8>,
    /// The user being logged in as.
    pub user: String,
    /// The server host key or host certificate, for the hostbound method.
    pub host_key: Option<KeyOrCertificate>,
}

/// Parses `data` as a public-key user authentication request made with the
/// key or certificate whose blob is `blob`. Returns `None` for anything else
/// (a `ssh-keygen -Y` signature, garbage, a request for another service,
/// with another key, or naming an algorithm of another key type), exactly
/// as OpenSSH's `parse_userauth_request`.
pub fn parse(data: &[u8], blob: &[u8]) -> Option<UserauthRequest> {
    let mut reader = data;
    let session_id = Vec::<u8>::decode(&mut reader).ok()?;
    if session_id.is_empty() || u8::decode(&mut reader).ok()? != USERAUTH_REQUEST {
        return None;
    }
    // OpenSSH reads these as C strings: any bytes but NUL.
    let user = String::from_utf8_lossy(&cstring(&mut reader)?).into_owned();
    if cstring(&mut reader)? != SERVICE.as_bytes() {
        return None;
    }
    let method = cstring(&mut reader)?;
    if u8::decode(&mut reader).ok()? != 1 {
        // Not a request with a signature following.
        return None;
    }
    let algorithm = String::from_utf8(cstring(&mut reader)?).ok()?;
    // The key or certificate signed for: the very one the request names.
    if Vec::<u8>::decode(&mut reader).ok()? != blob {
        return None;
    }
    let mut key_type = blob;
    if key_type_of(&algorithm) != key_type_of(&String::decode(&mut key_type).ok()?) {
        return None;
    }
    let host_key = match method.as_slice() {
        b"publickey" => None,
        b"publickey-hostbound-v00@openssh.com" => {
            Some(KeyOrCertificate::decode(&Vec::<u8>::decode(&mut reader).ok()?).ok()?)
        }
        _ => return None,
    };
    if !reader.is_finished() {
        return None;
    }
    Some(UserauthRequest {
        session_id,
        user,
        host_key,
    })
}

/// A `string` as OpenSSH's `sshbuf_get_cstring` takes it: any bytes but NUL
/// (a user name need not be UTF-8; one with a NUL is refused).
fn cstring(reader: &mut &[u8]) -> Option<Vec<u8>> {
    let bytes = Vec::<u8>::decode(reader).ok()?;
    (!bytes.contains(&0)).then_some(bytes)
}

/// The service a user authentication request logs in to.
const SERVICE: &str = "ssh-connection";

/// The key type a public key or signature algorithm name stands for, as
/// OpenSSH's `sshkey_type_from_name`: RSA's SHA-2 signature names are RSA
/// keys, WebAuthn's are sk-ecdsa keys, and every ECDSA curve is one type.
fn key_type_of(name: &str) -> &str {
    match name {
        "ssh-rsa" | "rsa-sha2-256" | "rsa-sha2-512" => "ssh-rsa",
        "ssh-rsa-cert-v01@openssh.com"
        | "rsa-sha2-256-cert-v01@openssh.com"
        | "rsa-sha2-512-cert-v01@openssh.com" => "ssh-rsa-cert-v01@openssh.com",
        "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384" | "ecdsa-sha2-nistp521" => "ecdsa",
        "ecdsa-sha2-nistp256-cert-v01@openssh.com"
        | "ecdsa-sha2-nistp384-cert-v01@openssh.com"
        | "ecdsa-sha2-nistp521-cert-v01@openssh.com" => "ecdsa-cert",
        "webauthn-sk-ecdsa-sha2-nistp256@openssh.com" => "sk-ecdsa-sha2-nistp256@openssh.com",
        "webauthn-sk-ecdsa-sha2-nistp256-cert-v01@openssh.com" => {
            "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com"
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use ssh_encoding::Encode;
    use ssh_key::public::KeyData;

    use super::*;

    fn key(seed: u8) -> KeyData {
        let keypair = ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]);
        KeyData::Ed25519(keypair.public)
    }

    fn blob(key: &KeyData) -> Vec<u8> {
        let mut out = Vec::new();
        key.encode(&mut out).unwrap();
        out
    }

    /// The fields of a request, each changeable.
    struct Fields<'a> {
        service: &'a str,
        method: &'a str,
        sig_follows: u8,
        algorithm: &'a str,
        key: Vec<u8>,
        host: Option<&'a KeyData>,
    }

    impl<'a> Fields<'a> {
        fn new(method: &'a str, key: &KeyData, host: Option<&'a KeyData>) -> Self {
            Self {
                service: "ssh-connection",
                method,
                sig_follows: 1,
                algorithm: "ssh-ed25519",
                key: blob(key),
                host,
            }
        }

        fn encode(&self) -> Vec<u8> {
            let mut out = Vec::new();
            b"session-id".to_vec().encode(&mut out).unwrap();
            USERAUTH_REQUEST.encode(&mut out).unwrap();
            "alice".encode(&mut out).unwrap();
            self.service.encode(&mut out).unwrap();
            self.method.encode(&mut out).unwrap();
            self.sig_follows.encode(&mut out).unwrap();
            self.algorithm.encode(&mut out).unwrap();
            self.key.encode(&mut out).unwrap();
            if let Some(host) = self.host {
                host.encode_prefixed(&mut out).unwrap();
            }
            out
        }
    }

    fn request(method: &str, key: &KeyData, host: Option<&KeyData>) -> Vec<u8> {
        Fields::new(method, key, host).encode()
    }

    #[test]
    fn parses_hostbound_requests() {
        let (user_key, host_key) = (key(1), key(2));
        let data = request(
            "publickey-hostbound-v00@openssh.com",
            &user_key,
            Some(&host_key),
        );
        let parsed = parse(&data, &blob(&user_key)).unwrap();
        assert_eq!(parsed.user, "alice");
        assert_eq!(parsed.session_id, b"session-id");
        assert_eq!(parsed.host_key, Some(KeyOrCertificate::Plain(host_key)));
    }

    #[test]
    fn refuses_other_keys_methods_and_trailing_bytes() {
        let (user_key, other) = (key(1), key(3));
        let user_blob = blob(&user_key);
        assert!(parse(&request("publickey", &user_key, None), &blob(&other)).is_none());
        assert!(parse(&request("password", &user_key, None), &user_blob).is_none());
        let mut trailing = request("publickey", &user_key, None);
        trailing.push(0);
        assert!(parse(&trailing, &user_blob).is_none());
        assert!(parse(b"not a request", &user_blob).is_none());
    }

    #[test]
    fn refuses_other_services_flags_and_algorithms_as_openssh() {
        let user_key = key(1);
        let user_blob = blob(&user_key);
        let fields = || Fields::new("publickey", &user_key, None);
        assert!(parse(&fields().encode(), &user_blob).is_some());
        let service = Fields {
            service: "foo",
            ..fields()
        };
        assert!(parse(&service.encode(), &user_blob).is_none());
        for sig_follows in [0, 2] {
            let flag = Fields {
                sig_follows,
                ..fields()
            };
            assert!(parse(&flag.encode(), &user_blob).is_none());
        }
        for algorithm in ["ssh-rsa", "bogus", "ssh-ed25519-cert-v01@openssh.com"] {
            let named = Fields {
                algorithm,
                ..fields()
            };
            assert!(parse(&named.encode(), &user_blob).is_none(), "{algorithm}");
        }
    }

    #[test]
    fn user_names_are_c_strings_as_openssh_reads_them() {
        let user_key = key(1);
        let user_blob = blob(&user_key);
        let with_user = |user: &[u8]| {
            let mut out = Vec::new();
            b"session-id".to_vec().encode(&mut out).unwrap();
            USERAUTH_REQUEST.encode(&mut out).unwrap();
            user.to_vec().encode(&mut out).unwrap();
            "ssh-connection".encode(&mut out).unwrap();
            "publickey".encode(&mut out).unwrap();
            1u8.encode(&mut out).unwrap();
            "ssh-ed25519".encode(&mut out).unwrap();
            user_key.encode_prefixed(&mut out).unwrap();
            parse(&out, &user_blob)
        };
        assert!(with_user(b"a\0b").is_none(), "a NUL in the user name");
        let latin1 = with_user(b"jos\xe9").unwrap();
        assert_eq!(latin1.user, "jos\u{fffd}");
    }

    #[test]
    fn an_algorithm_names_its_key_type() {
        assert_eq!(key_type_of("rsa-sha2-512"), key_type_of("ssh-rsa"));
        assert_eq!(
            key_type_of("rsa-sha2-256-cert-v01@openssh.com"),
            key_type_of("ssh-rsa-cert-v01@openssh.com")
        );
        assert_ne!(
            key_type_of("rsa-sha2-256"),
            key_type_of("ssh-rsa-cert-v01@openssh.com")
        );
        assert_eq!(
            key_type_of("webauthn-sk-ecdsa-sha2-nistp256@openssh.com"),
            "sk-ecdsa-sha2-nistp256@openssh.com"
        );
        assert_ne!(
            key_type_of("ssh-ed25519"),
            key_type_of("sk-ssh-ed25519@openssh.com")
        );
    }

    #[test]
    fn a_certificate_and_its_plain_key_are_not_the_same_signer() {
        let user = ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]);
        let ca = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[2; 32]));
        let mut builder = ssh_key::certificate::Builder::new_with_random_nonce(
            &mut rand_core::OsRng,
            KeyData::Ed25519(user.public),
            0,
            4_000_000_000,
        )
        .unwrap();
        builder.valid_principal("alice").unwrap();
        let certificate = builder.sign(&ca).unwrap();
        let mut cert_blob = Vec::new();
        certificate.encode(&mut cert_blob).unwrap();
        let plain = KeyData::Ed25519(user.public);
        let for_cert = Fields {
            algorithm: "ssh-ed25519-cert-v01@openssh.com",
            key: cert_blob.clone(),
            ..Fields::new("publickey", &plain, None)
        };
        assert!(parse(&for_cert.encode(), &cert_blob).is_some());
        assert!(parse(&for_cert.encode(), &blob(&plain)).is_none());
        let for_plain = request("publickey", &plain, None);
        assert!(parse(&for_plain, &cert_blob).is_none());
    }
}
