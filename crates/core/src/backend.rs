//! The [`Backend`] trait: one family of keys behind the agent.
//!
//! # The shape of a backend
//!
//! The router never asks a backend "what keys do you have?" while a client
//! waits. Instead each backend is handed an [`IdentitySink`] once, at
//! [`Backend::start`], and publishes its whole list of identities through it now
//! and whenever the list changes (a token inserted or pulled out, a provider
//! loaded, a key added). The router keeps the latest list of every backend in a
//! snapshot, so `ssh-add -l` answers at once even while a device waits for a
//! PIN or a touch.
//!
//! Signing is asynchronous because it may wait seconds for a person: the
//! backend asks its [`Prompter`] for a PIN only when the device needs one and
//! raises a [`Notice`](crate::Notice) while the device waits for a touch. A
//! backend that talks to blocking hardware runs one worker thread per device
//! and awaits its answer; the router may call `sign` for several keys at once.
//!
//! Everything a backend may not support (loading providers, adding and
//! removing keys at runtime) has a default that answers
//! [`Error::Unsupported`], so a backend implements only what its hardware does.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;
use ssh_key::certificate::Certificate;
use ssh_key::private::KeypairData;
use ssh_key::Algorithm;
use zeroize::Zeroizing;

use crate::error::Error;
use crate::identity::{Identity, KeyRef};
use crate::prompt::Prompter;
use crate::refusal::DeviceStatus;
use crate::sign::{SignContext, SignRequest, SshSignature};

/// One family of keys: software keys, PKCS#11 tokens, PIV cards, FIDO2 authenticators.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// A short, stable name ("software", "pkcs11", "piv", "fido"): every
    /// [`KeyRef`] this backend issues carries it, and the router routes by it.
    fn name(&self) -> &str;

    /// Starts serving. The backend publishes its identities through `sink` at
    /// once and again on every change, until it is dropped. Called once.
    fn start(&self, sink: IdentitySink);

    /// Signs `request` with the key `key` names.
    ///
    /// May wait for a PIN (asked through `prompter`, never retried when the
    /// device rejects it) or a touch (announced through `prompter`).
    async fn sign(
        &self,
        key: &KeyRef,
        request: &SignRequest,
        context: &SignContext,
        prompter: Arc<dyn Prompter>,
    ) -> Result<SshSignature, Error>;

    /// Whether [`Backend::add_key`] takes private keys of `algorithm`
    /// (software keys take ordinary keys; the FIDO backend takes sk keys).
    fn accepts_key(&self, algorithm: &Algorithm) -> bool {
        let _ = algorithm;
        false
    }

    /// Adds a key given by a client (`ssh-add FILE`) and returns the identity it
    /// will publish.
    async fn add_key(&self, key: AddKey) -> Result<Identity, Error> {
        drop(key);
        Err(Error::unsupported(self.name(), "adding keys"))
    }

    /// Whether [`Backend::add_provider`] handles providers (`ssh-add -s`).
    fn accepts_providers(&self) -> bool {
        false
    }

    /// Loads a provider (`ssh-add -s PROVIDER`), logs in with the PIN given, and
    /// returns the identities it adds. The caller has already checked the
    /// provider against the allowlist.
    async fn add_provider(&self, request: ProviderRequest) -> Result<Vec<Identity>, Error> {
        drop(request);
        Err(Error::unsupported(self.name(), "loading providers"))
    }

    /// Unloads a provider (`ssh-add -e PROVIDER`) and its keys.
    async fn remove_provider(&self, provider: &str) -> Result<(), Error> {
        let _ = provider;
        Err(Error::unsupported(self.name(), "removing providers"))
    }

    /// Removes one key (`ssh-add -d`). Keys that come from the configuration
    /// (a YubiKey that is plugged in) cannot be removed this way.
    async fn remove_key(&self, key: &KeyRef) -> Result<(), Error> {
        let _ = key;
        Err(Error::unsupported(self.name(), "removing keys"))
    }

    /// Removes every key a client added (`ssh-add -D`): software keys and keys of
    /// providers loaded at runtime. Keys from the configuration stay.
    async fn remove_all(&self) {}

    /// Forgets every cached PIN and secret that can be asked again (the agent
    /// was locked, or the person asked to let go of the tokens).
    fn forget_secrets(&self) {}

    /// The devices this backend sees and their state, for `token-agent
    /// status`: tokens with their PIN state, the services they need. Read from
    /// what the backend already knows: it must not touch a device.
    fn devices(&self) -> Vec<DeviceStatus> {
        Vec::new()
    }
}

/// A private key a client adds.
pub struct AddKey {
    /// The key pair; its secret half is zeroized when dropped. It lives on
    /// the heap from the moment it is decoded, so that moving the request
    /// from layer to layer (into and out of boxed futures) moves a pointer
    /// and leaves no copy of a key held inline (Ed25519's) behind in freed
    /// memory. For a key type `ssh-key` does not know
    /// (`KeypairData::Other`), the private half is empty here and travels
    /// in [`AddKey::opaque_secret`].
    pub keypair: Box<KeypairData>,
    /// The private half of a key type `ssh-key` keeps as opaque bytes
    /// (ssh-mldsa44-ed25519@openssh.com): `ssh-key` would not zeroize them.
    pub opaque_secret: Option<Zeroizing<Vec<u8>>>,
    /// The comment to list it with.
    pub comment: String,
    /// A certificate to present for it, when the client sent one.
    pub certificate: Option<Arc<Certificate>>,
    /// For security-key (sk) keys: the middleware library that signs with it
    /// (`ssh-add -S`, the sk-provider@openssh.com constraint). `None` means
    /// the backend's own FIDO code, OpenSSH's "internal". Backends receive the
    /// canonical path, already checked against the `-P` allowlist.
    pub sk_provider: Option<String>,
}

impl fmt::Debug for AddKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddKey")
            .field("algorithm", &self.keypair.algorithm().ok())
            .field("comment", &self.comment)
            .field("certificate", &self.certificate.is_some())
            .field("sk_provider", &self.sk_provider)
            .finish_non_exhaustive()
    }
}

/// A request to load a provider (`ssh-add -s`).
#[derive(Debug)]
pub struct ProviderRequest {
    /// The provider as the client named it (a PKCS#11 module path).
    pub provider: String,
    /// The PIN the client sent, if any (empty PINs arrive as `None`).
    pub pin: Option<SecretString>,
    /// Who asked.
    pub context: SignContext,
}

/// Where a backend publishes its identities: the whole current list, each time.
#[derive(Clone)]
pub struct IdentitySink {
    publish: Arc<dyn Fn(Vec<Identity>) + Send + Sync>,
}

impl IdentitySink {
    /// A sink that hands each published list to `publish`.
    pub fn new(publish: impl Fn(Vec<Identity>) + Send + Sync + 'static) -> Self {
        Self {
            publish: Arc::new(publish),
        }
    }

    /// Replaces everything this backend published before with `identities`.
    pub fn publish(&self, identities: Vec<Identity>) {
        (self.publish)(identities);
    }
}

impl fmt::Debug for IdentitySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentitySink")
    }
}
