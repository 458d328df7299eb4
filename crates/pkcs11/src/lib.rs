//! token-agent's PKCS#11 backend: keys in tokens that a PKCS#11 module
//! (OpenSC's `opensc-pkcs11.so`, SoftHSM, a vendor's library) drives.
//!
//! This crate owns loading modules (from the configuration, and at runtime
//! through `ssh-add -s` / `ssh-add -e`), listing every token's keys,
//! logging in, signing, and following tokens as they come and go. It must not
//! check the `-P` allowlist or the forwarded-connection rule (the server's
//! router does, before [`Backend::add_provider`](token_agent_core::Backend::add_provider)
//! is called), and it never runs module code in the agent's process.
//!
//! # Isolation
//!
//! Each module runs in a helper child process: `token-agent-pkcs11-helper`
//! (a small binary that only calls [`helper::run`], found by
//! [`HelperCommand::beside`]; or the token-agent binary started with a hidden
//! `--pkcs11-helper` flag, which does the same) loads the module
//! with `cryptoki` and speaks the small binary protocol of [`proto`] over a
//! socketpair on its standard input and output. Requests are pipelined: the
//! agent writes each straight from the signing task onto a *lane* of the
//! helper, a socket with a thread of its own (one client's signatures keep
//! to one lane; more lanes open while every open one is busy, so many
//! clients sign on every CPU and a module stuck in one call still serves
//! the next), the helper keeps sessions and key handles between requests,
//! and the answers are read on the agent's runtime, so a signature costs
//! little more than the module's own `C_Sign`. Helpers run at a lower scheduling
//! priority than the agent, so a module computing signatures never delays
//! the agent's answers to other requests. A module that crashes or hangs costs a
//! helper, not the agent: every call has a time limit (a long one while a PIN
//! pad waits for a person), and the backend kills and restarts a helper that
//! died or did not answer, reporting for example "the PKCS#11 module
//! /usr/lib/x.so crashed in C_Sign (signal 6, SIGABRT); restarted it".
//!
//! # Keys, login, signing
//!
//! Every slot with a token is listed; each public key or certificate object
//! with a CKA_ID is a key, matched to its private key by that CKA_ID at
//! signing time. RSA signs with CKM_RSA_PKCS over the DigestInfo of SHA-1,
//! SHA-256 or SHA-512 as the request's flags ask; ECDSA (P-256, P-384, P-521)
//! with CKM_ECDSA over the curve's hash; Ed25519 with CKM_EDDSA. PINs come
//! from `ssh-add -s` or the [`Prompter`](token_agent_core::Prompter), are
//! cached per token under [`PinCache`], and are never retried after the token
//! rejects one.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use token_agent_core::{Backend, IdentitySink};
//! use token_agent_pkcs11::{HelperCommand, ModuleConfig, PinSource, Pkcs11Backend, Pkcs11Options};
//!
//! let mut options = Pkcs11Options::new(HelperCommand::for_agent().unwrap());
//! options.modules.push(ModuleConfig {
//!     path: "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so".into(),
//!     pin: PinSource::Prompt,
//! });
//! let backend = Arc::new(Pkcs11Backend::new(options));
//! backend.start(IdentitySink::new(|identities| println!("{} keys", identities.len())));
//! ```

#![forbid(unsafe_code)]

mod backend;
mod client;
pub mod helper;
mod keys;
pub mod proto;

pub use backend::{ModuleConfig, PinCache, PinSource, Pkcs11Backend, Pkcs11Options, NAME};
pub use client::{HelperCommand, HELPER_BINARY};
