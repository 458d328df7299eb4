//! The ssh-agent protocol front end of token-agent.
//!
//! This crate owns everything between the agent socket and the backends: the
//! listener and its framing ([`listener`], [`proto`]), one session per client
//! connection, the [`Router`] that keeps a snapshot of every backend's
//! identities and sends each request to the backend that owns the key, key
//! constraints and session bindings ([`constraints`]), locking ([`lock`]),
//! the `-P` provider allowlist ([`provider`]), the FIDO websafe restriction
//! ([`websafe`]), and the software key store ([`SoftwareKeys`]) that makes
//! token-agent a drop-in for OpenSSH's ssh-agent.
//!
//! It must not know any hardware: backends reach it only through
//! [`token_agent_core::Backend`], and the person only through
//! [`token_agent_core::Prompter`].
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use token_agent_server::{listener, Policy, Router, SoftwareKeys};
//! # async fn run(prompter: Arc<dyn token_agent_core::Prompter>) -> std::io::Result<()> {
//! let router = Router::new(
//!     vec![Arc::new(SoftwareKeys::new())],
//!     prompter,
//!     Policy::default(),
//!     Vec::new(),
//! );
//! let socket = listener::bind("/tmp/agent.sock".as_ref())?;
//! listener::serve(socket, router, listener::Access::current(), std::future::pending()).await;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod connection;
pub mod constraints;
pub mod forwarding;
pub mod listener;
pub mod listing;
pub mod lock;
/// OpenSSH's post-quantum composite keys, ssh-mldsa44-ed25519@openssh.com: parse, sign, verify.
pub mod mldsa;
mod pattern;
pub mod proto;
pub mod provider;
mod router;
mod session;
mod software;
pub mod status;
pub mod upstream;
pub mod websafe;

pub use router::{Entry, Policy, Refusal, Router, Snapshot};
pub use software::{SoftwareKeys, NAME as SOFTWARE_BACKEND};
