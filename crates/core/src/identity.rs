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
        }
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
