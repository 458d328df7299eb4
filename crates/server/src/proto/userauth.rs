//! The data an SSH client signs for public-key user authentication
//! (RFC 4252 section 7, and OpenSSH's "publickey-hostbound-v00@openssh.com" in
//! PROTOCOL), parsed to check destination constraints as OpenSSH's agent does.

use ssh_encoding::{Decode, Reader};
use ssh_key::public::KeyData;

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

/// Parses `data` as a public-key user authentication request made with `key`.
/// Returns `None` for anything else (a `ssh-keygen -Y` signature, garbage, a
/// request whose key is not `key`), exactly as OpenSSH's `parse_userauth_request`.
pub fn parse(data: &[u8], key: &KeyData) -> Option<UserauthRequest> {
    let mut reader = data;
    let session_id = Vec::<u8>::decode(&mut reader).ok()?;
    if session_id.is_empty() || u8::decode(&mut reader).ok()? != USERAUTH_REQUEST {
        return None;
    }
    let user = String::decode(&mut reader).ok()?;
    let _service = String::decode(&mut reader).ok()?;
    let method = String::decode(&mut reader).ok()?;
    let hostbound = match method.as_str() {
        "publickey" => false,
        "publickey-hostbound-v00@openssh.com" => true,
        _ => return None,
    };
    if u8::decode(&mut reader).ok()? == 0 {
        return None;
    }
    let _algorithm = String::decode(&mut reader).ok()?;
    // The key or user certificate signed for; compared by its key.
    let signed_key = KeyOrCertificate::decode(&Vec::<u8>::decode(&mut reader).ok()?).ok()?;
    if signed_key.key_data() != key {
        return None;
    }
    let host_key = if hostbound {
        Some(KeyOrCertificate::decode(&Vec::<u8>::decode(&mut reader).ok()?).ok()?)
    } else {
        None
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

#[cfg(test)]
mod tests {
    use ssh_encoding::Encode;

    use super::*;

    fn key(seed: u8) -> KeyData {
        let keypair = ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]);
        KeyData::Ed25519(keypair.public)
    }

    fn request(method: &str, key: &KeyData, host: Option<&KeyData>) -> Vec<u8> {
        let mut out = Vec::new();
        b"session-id".to_vec().encode(&mut out).unwrap();
        USERAUTH_REQUEST.encode(&mut out).unwrap();
        "alice".encode(&mut out).unwrap();
        "ssh-connection".encode(&mut out).unwrap();
        method.encode(&mut out).unwrap();
        1u8.encode(&mut out).unwrap();
        "ssh-ed25519".encode(&mut out).unwrap();
        key.encode_prefixed(&mut out).unwrap();
        if let Some(host) = host {
            host.encode_prefixed(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn parses_hostbound_requests() {
        let (user_key, host_key) = (key(1), key(2));
        let data = request(
            "publickey-hostbound-v00@openssh.com",
            &user_key,
            Some(&host_key),
        );
        let parsed = parse(&data, &user_key).unwrap();
        assert_eq!(parsed.user, "alice");
        assert_eq!(parsed.session_id, b"session-id");
        assert_eq!(parsed.host_key, Some(KeyOrCertificate::Plain(host_key)));
    }

    #[test]
    fn refuses_other_keys_methods_and_trailing_bytes() {
        let (user_key, other) = (key(1), key(3));
        assert!(parse(&request("publickey", &user_key, None), &other).is_none());
        assert!(parse(&request("password", &user_key, None), &user_key).is_none());
        let mut trailing = request("publickey", &user_key, None);
        trailing.push(0);
        assert!(parse(&trailing, &user_key).is_none());
        assert!(parse(b"not a request", &user_key).is_none());
    }
}
