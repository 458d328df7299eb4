//! The vocabulary of token-agent.
//!
//! This crate owns the types every other crate speaks: the [`Backend`] trait a
//! family of keys implements (software keys, PKCS#11 tokens, PIV cards, FIDO2
//! authenticators), the [`Identity`] a backend publishes, the [`SignRequest`] and
//! [`SignContext`] it receives, the [`Prompter`] it asks when a person must act,
//! and the [`Error`] it answers with.
//!
//! It must stay small and boring: no sockets, no devices, no async runtime, no
//! hardware library. A backend crate depends on this crate and on its own narrow
//! transport; the server depends on this crate and never on a backend.
//!
//! # Example
//!
//! A backend publishes what it holds through the [`IdentitySink`] it is given and
//! signs when the router asks:
//!
//! ```
//! use std::sync::Arc;
//! use token_agent_core::{DeviceInfo, Identity, IdentitySink, KeyRef};
//!
//! let key = ssh_key::PublicKey::from_openssh(
//!     "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsSDfAXZ5XzLhRUTsjFy6ueuI3ALxyR1VWOGfYzE0tz demo",
//! )
//! .unwrap();
//! let identity = Identity::new(
//!     key.key_data().clone(),
//!     "slot 9a".to_owned(),
//!     KeyRef::new("piv", b"12345678/9a".to_vec()),
//! )
//! .with_device(DeviceInfo::new("YubiKey 5 #12345678").with_serial("12345678"));
//!
//! let published = Arc::new(std::sync::Mutex::new(Vec::new()));
//! let seen = published.clone();
//! let sink = IdentitySink::new(move |ids| *seen.lock().unwrap() = ids);
//! sink.publish(vec![identity]);
//! assert_eq!(published.lock().unwrap().len(), 1);
//! ```

#![forbid(unsafe_code)]

mod attempts;
mod backend;
mod error;
mod identity;
mod prompt;
mod refusal;
mod sign;
mod sync;

pub use attempts::{PinAttempts, Ticket};
pub use backend::{AddKey, Backend, IdentitySink, ProviderRequest};
pub use error::{Error, PromptError};
pub use identity::{fingerprint, DeviceInfo, FingerprintHash, Identity, KeyRef};
pub use prompt::{
    ConfirmRequest, Notice, NoticeGuard, NoticeKind, PinKind, PinRequest, PromptSubject, Prompter,
};
pub use refusal::{DeviceStatus, RefusalKind};
pub use sign::{
    push_string, read_string, Destination, Peer, RsaHash, SignContext, SignFlags, SignRequest,
    SshSignature,
};
pub use sync::lock;

/// Re-exported so backends name the same `SecretString` as the prompters.
pub use secrecy::{ExposeSecret, SecretString};
