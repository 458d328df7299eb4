//! The FIDO2 backend of token-agent: OpenSSH security keys
//! (`sk-ssh-ed25519@openssh.com`, `sk-ecdsa-sha2-nistp256@openssh.com`).
//!
//! An sk key file holds no private key: only the application (the FIDO
//! relying party id, "ssh:" by default), the flags and a key handle (the
//! credential id) that the authenticator which made it recognises. The
//! backend keeps those, and signs as OpenSSH's sk helper does (PROTOCOL.u2f):
//! a CTAP getAssertion with rpId = the application, clientDataHash = SHA-256
//! of the data, the key handle as the only allowed credential, a touch unless
//! the key says no-touch-required and the PIN when it says verify-required.
//! The SSH signature carries the authenticator's signature, flags and counter.
//!
//! A key added with a middleware (`ssh-add -S libmiddleware.so`) is signed
//! through that library instead, as OpenSSH's ssh-agent does: its `sk_sign`,
//! loaded with the sk-api loader in a helper process (`token-agent
//! --sk-helper`), never in the agent ([`middleware`]).
//!
//! What this crate owns: the [`Authenticator`] trait (CTAP 2.1 operations as
//! types), the [`FidoBackend`], enrolment, resident-key loading and the
//! middleware helpers. It must not talk to the person (it asks its
//! [`Prompter`](token_agent_core::Prompter)), never loads a middleware into the
//! agent's own process, and never holds a PIN beyond the one request that
//! needs it.
//!
//! # Example
//!
//! A backend over a fixed list of authenticators (a simulator in the tests,
//! HID devices in the agent) takes the keys `ssh-add` sends:
//!
//! ```
//! use std::sync::Arc;
//! use token_agent_core::Backend;
//! use token_agent_fido::{FidoBackend, Fixed};
//!
//! let backend = FidoBackend::new(Arc::new(Fixed(Vec::new())));
//! assert_eq!(backend.name(), "fido");
//! assert!(backend.accepts_key(&ssh_key::Algorithm::SkEd25519));
//! assert!(!backend.accepts_key(&ssh_key::Algorithm::Ed25519));
//! ```

#![forbid(unsafe_code)]

mod backend;
pub mod ctap;
#[cfg(feature = "hid")]
mod hid;
pub mod middleware;
mod resident;
pub mod sk;
mod turn;
mod worker;

pub use backend::{Discovery, FidoBackend, Fixed, NAME};
pub use ctap::{Authenticator, CtapError};
#[cfg(feature = "hid")]
pub use hid::HidDiscovery;
pub use middleware::{HelperCommand, MiddlewareOptions};
pub use resident::{enroll, enroll_replacing, ssh_keys, EnrolError, Enrolment};
pub use sk::SkKey;
