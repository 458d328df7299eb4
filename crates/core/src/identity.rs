//! What a backend holds: identities, the handles that name them, the devices they live on.

use std::fmt;
use std::sync::Arc;

use ssh_key::certificate::Certificate;
use ssh_key::public::KeyData;
use ssh_key::HashAlg;

/// A handle to one private key, issued by the backend that holds it.
///
/// The router sends a sign request to the backend whose [`Backend::name`](crate::Backend::name)
/// equals [`KeyRef::backend`]; the handle bytes mean something only to that
/// backend (a slot and serial, a PKCS#11 CKA_ID, a credential id).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    backend: Arc<str>,
    handle: Arc<[u8]>,
}

impl KeyRef {
    /// A handle for the key `handle` of backend `backend`.
    pub fn new(backend: &str, handle: impl Into<Vec<u8>>) -> Self {
        Self {
            backend: Arc::from(backend),
            handle: Arc::from(handle.into()),
        }
    }

    /// The name of the backend that issued this handle.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The backend's own bytes for this key.
    pub fn handle(&self) -> &[u8] {
        &self.handle
    }
}

impl fmt::Debug for KeyRef {
    // Handles are not secret, but they can be long binary ids: print them as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRef({}:", self.backend)?;
        for byte in self.handle.iter() {
            write!(f, "{byte:02x}")?;
        }
        f.write_str(")")
    }
}

/// The device a key lives on, as a person would name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    label: String,
    serial: Option<String>,
}

impl DeviceInfo {
    /// A device called `label` in messages, e.g. "YubiKey 5 #12345678" or "SoftHSM token \"work\"".
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            serial: None,
        }
    }

    /// Records the device's serial number.
    #[must_use]
    pub fn with_serial(mut self, serial: impl Into<String>) -> Self {
        self.serial = Some(serial.into());
        self
    }

    /// The name used in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The serial number, when the device has one.
    pub fn serial(&self) -> Option<&str> {
        self.serial.as_deref()
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// One key the agent can offer: what `ssh-add -l` lists.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    public_key: KeyData,
    certificate: Option<Arc<Certificate>>,
    comment: String,
    key: KeyRef,
    device: Option<DeviceInfo>,
    provider: Option<Arc<str>>,
}

impl Identity {
    /// An identity for `public_key`, listed with `comment`, signed by the key `key` names.
    pub fn new(public_key: KeyData, comment: String, key: KeyRef) -> Self {
        Self {
            public_key,
            certificate: None,
            comment,
            key,
            device: None,
            provider: None,
        }
    }

    /// Records the library the key comes through: the path a PKCS#11 module
    /// was loaded by (`ssh-add -s`), so that what the client asked of the
    /// module's keys applies to keys that appear later too.
    #[must_use]
    pub fn with_provider(mut self, provider: impl Into<Arc<str>>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// The library the key comes through, if any: see [`Identity::with_provider`].
    pub fn provider(&self) -> Option<&str> {
        self.provider.as_deref()
    }

    /// Records the device that holds the private key.
    #[must_use]
    pub fn with_device(mut self, device: DeviceInfo) -> Self {
        self.device = Some(device);
        self
    }

    /// Presents this key with `certificate` instead of the bare public key.
    ///
    /// The certificate must certify this identity's public key; the caller checks.
    #[must_use]
    pub fn with_certificate(mut self, certificate: Arc<Certificate>) -> Self {
        self.certificate = Some(certificate);
        self
    }

    /// The public key of the private key that signs.
    pub fn public_key(&self) -> &KeyData {
        &self.public_key
    }

    /// The certificate presented for this key, if any.
    pub fn certificate(&self) -> Option<&Certificate> {
        self.certificate.as_deref()
    }

    /// The comment `ssh-add -l` shows.
    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// The handle the owning backend signs with.
    pub fn key(&self) -> &KeyRef {
        &self.key
    }

    /// The device holding the private key, for hardware keys.
    pub fn device(&self) -> Option<&DeviceInfo> {
        self.device.as_ref()
    }

    /// The SHA-256 fingerprint of the public key, as `ssh-add -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key, HashAlg::Sha256)
    }
}

/// The fingerprint of `key` with `hash`, as `ssh-keygen -l` prints it ("SHA256:...").
pub fn fingerprint(key: &KeyData, hash: HashAlg) -> String {
    key.fingerprint(hash).to_string()
}

/// The hash fingerprints are shown with in logs and prompts (ssh-agent `-E`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FingerprintHash {
    /// `MD5:` and the digest of the key blob as colon-separated hex bytes, as
    /// OpenSSH before 6.8 showed every fingerprint.
    Md5,
    /// `SHA1:` and unpadded base64.
    Sha1,
    /// `SHA256:` and unpadded base64: OpenSSH's default.
    #[default]
    Sha256,
    /// `SHA384:` and unpadded base64.
    Sha384,
    /// `SHA512:` and unpadded base64.
    Sha512,
}

impl FingerprintHash {
    /// Every hash `-E` takes.
    const ALL: [Self; 5] = [
        Self::Md5,
        Self::Sha1,
        Self::Sha256,
        Self::Sha384,
        Self::Sha512,
    ];

    /// The name `-E` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    /// The hash a fingerprint as `ssh-keygen -l` prints it was made with,
    /// by its prefix ("SHA256:..." is SHA-256).
    pub fn of_fingerprint(fingerprint: &str) -> Option<Self> {
        let (prefix, _) = fingerprint.split_once(':')?;
        Self::ALL
            .into_iter()
            .find(|hash| hash.name().eq_ignore_ascii_case(prefix))
    }

    /// Whether `fingerprint`, in whichever hash its prefix names, is `key`'s.
    pub fn matches(fingerprint: &str, key: &KeyData) -> bool {
        Self::of_fingerprint(fingerprint).is_some_and(|hash| hash.fingerprint(key) == fingerprint)
    }

    /// The fingerprint of `key`, as `ssh-keygen -l -E <name>` prints it.
    pub fn fingerprint(self, key: &KeyData) -> String {
        match self {
            Self::Sha256 => fingerprint(key, HashAlg::Sha256),
            Self::Sha512 => fingerprint(key, HashAlg::Sha512),
            // ssh-key fingerprints with SHA-256 and SHA-512 only.
            Self::Sha1 => base64_fingerprint::<sha1::Sha1>("SHA1", key),
            Self::Sha384 => base64_fingerprint::<sha2::Sha384>("SHA384", key),
            Self::Md5 => {
                use md5::Digest;
                use ssh_encoding::Encode;
                let mut blob = Vec::new();
                // Encoding a key into a Vec fails only for a key ssh-key
                // cannot represent at all; such a key hashes as empty.
                let _ = key.encode(&mut blob);
                let digest = md5::Md5::digest(&blob);
                let mut out = String::with_capacity(4 + digest.len() * 3);
                out.push_str("MD5");
                for byte in digest {
                    out.push_str(&format!(":{byte:02x}"));
                }
                out
            }
        }
    }
}

/// `NAME:` and the unpadded base64 of the `D` digest of the key blob, as
/// OpenSSH prints every fingerprint but MD5.
fn base64_fingerprint<D: sha2::Digest>(name: &str, key: &KeyData) -> String {
    use ssh_encoding::base64::{Base64Unpadded, Encoding};
    use ssh_encoding::Encode;
    let mut blob = Vec::new();
    // As for MD5: only a key ssh-key cannot represent fails to encode.
    let _ = key.encode(&mut blob);
    format!(
        "{name}:{}",
        Base64Unpadded::encode_string(&D::digest(&blob))
    )
}

impl std::str::FromStr for FingerprintHash {
    type Err = String;

    /// Parses `md5`, `sha1`, `sha256`, `sha384` or `sha512`, in any case, as
    /// OpenSSH's `ssh_digest_alg_by_name`.
    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|hash| hash.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!(
                    "invalid fingerprint hash \"{name}\": use md5, sha1, sha256, sha384 or sha512"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyData {
        ssh_key::PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsSDfAXZ5XzLhRUTsjFy6ueuI3ALxyR1VWOGfYzE0tz",
        )
        .unwrap()
        .key_data()
        .clone()
    }

    #[test]
    fn fingerprints_match_ssh_keygen() {
        // `ssh-keygen -l -E md5|sha1|sha384|sha512 -f` of the same key.
        assert_eq!(
            FingerprintHash::Md5.fingerprint(&key()),
            "MD5:cc:84:be:5d:4a:9d:6d:7f:18:b4:e3:44:0c:bb:af:8e"
        );
        assert_eq!(
            FingerprintHash::Sha1.fingerprint(&key()),
            "SHA1:sNeRA3EwjwxOTJjKTPzhKDKULj4"
        );
        assert_eq!(
            FingerprintHash::Sha384.fingerprint(&key()),
            "SHA384:5CF8ystViCvm9ihX2n8RweEq9zAe8XY7bShhm2QMvYrQ9BglcSY3PPjL5ynPLw96"
        );
        assert_eq!(
            FingerprintHash::Sha512.fingerprint(&key()),
            "SHA512:DM7XC6V/kVF3T6PYCmPZC28hwoCHXeKIxhE+LXj8Ef+XOBUkKOYCkY4EbyJLz9jLbwQhS5tH5vgMOeC361ML4w"
        );
        assert!(FingerprintHash::default()
            .fingerprint(&key())
            .starts_with("SHA256:"));
    }

    #[test]
    fn hash_names_parse_in_any_case() {
        assert_eq!("MD5".parse(), Ok(FingerprintHash::Md5));
        assert_eq!("sha256".parse(), Ok(FingerprintHash::Sha256));
        assert_eq!("Sha512".parse(), Ok(FingerprintHash::Sha512));
        assert_eq!("sha1".parse(), Ok(FingerprintHash::Sha1));
        assert_eq!("SHA384".parse(), Ok(FingerprintHash::Sha384));
        let err = "sha224".parse::<FingerprintHash>().unwrap_err();
        assert!(
            err.contains("use md5, sha1, sha256, sha384 or sha512"),
            "{err}"
        );
    }
}
