//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::crypto::CryptoError;

/// Errors of setting a card up or running it; errors of single commands are
/// status words in the response, never this type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The state file could not be read or written: a missing directory or no permission.
    #[error("state file {}: {source}", path.display())]
    StateIo {
        /// The state file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The state file is not one piv-sim wrote (or it was edited by hand).
    #[error("state file {} is not valid: {reason}", path.display())]
    StateFormat {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Making the card's attestation key or certificate failed.
    #[error("could not make the card's keys: {0}")]
    Crypto(#[source] CryptoError),
    /// The control socket could not be set up or used.
    #[error("control socket {}: {source}", path.display())]
    Control {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}
