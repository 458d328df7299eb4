//! Prompters for token-agent: how the agent talks to the person.
//!
//! This crate owns every way of asking: a pinentry program over the Assuan
//! protocol ([`Pinentry`]), an `SSH_ASKPASS` program as OpenSSH's agent runs it
//! ([`Askpass`]), touch notices that appear after a short delay, run a command
//! or show a desktop notification over D-Bus, and are withdrawn when the
//! device answers ([`Notifier`]), the [`Bridge`]
//! that chooses among them, and a [`Scripted`] prompter for tests.
//!
//! Backends never use these types directly: they see only
//! [`token_agent_core::Prompter`]. This crate must not know any device.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use token_agent_core::{PinRequest, PromptSubject, Prompter};
//! use token_agent_prompt::{Scripted, ScriptedAnswer};
//!
//! # tokio_test_block_on(async {
//! let prompter = Scripted::new([ScriptedAnswer::Pin("123456".into())]);
//! let pin = prompter.pin(&PinRequest::new(PromptSubject::default())).await.unwrap();
//! assert_eq!(secrecy::ExposeSecret::expose_secret(&pin), "123456");
//! assert_eq!(prompter.asked().len(), 1);
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

#![forbid(unsafe_code)]

mod askpass;
mod bridge;
mod desktop;
mod notice;
mod pinentry;
mod scripted;

pub use askpass::Askpass;
pub use bridge::{Bridge, PinSource};
pub use notice::{NoticeConfig, Notifier};
pub use pinentry::Pinentry;
pub use scripted::{Asked, Scripted, ScriptedAnswer};

/// `spawn`, tried again for a moment while it fails with ETXTBSY: a program
/// just written (a test's script) is busy while a process forked elsewhere
/// in the meantime still holds the writer's descriptor, until that process
/// execs, which takes microseconds.
fn retry_busy<T>(mut spawn: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut spawned = spawn();
    for _ in 0..20 {
        match &spawned {
            Err(err) if err.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(5));
                spawned = spawn();
            }
            _ => break,
        }
    }
    spawned
}
