//! The errors a backend or a prompter answers with.
//!
//! Each variant carries what a person must be told: which device, how many PIN
//! tries remain, what to do next. "The person or the prompt went away"
//! ([`Error::Prompt`]) is kept apart from "the token refused" ([`Error::Device`],
//! [`Error::WrongPin`], ...), so the front end can log and report them differently.

use crate::identity::DeviceInfo;

/// Why a backend could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend does not implement this operation (for instance loading a
    /// PKCS#11 provider into a backend that is not PKCS#11).
    #[error("{operation} is not supported by the {backend} backend")]
    Unsupported {
        /// The backend asked.
        backend: String,
        /// What was asked of it.
        operation: &'static str,
    },

    /// No backend handles this kind of request at all (the backend that would
    /// is not built in or not enabled).
    #[error("{what}")]
    NoBackend {
        /// What is missing and what to do about it.
        what: String,
    },

    /// The key is no longer held: removed, expired, or gone with its device.
    #[error("the key is no longer available (it was removed, expired or its device is gone)")]
    KeyNotFound,

    /// The device that holds the key was unplugged or stopped answering.
    #[error("{device} was removed; insert it and try again")]
    DeviceRemoved {
        /// The device that went away.
        device: DeviceInfo,
    },

    /// The device rejected the PIN. It is never retried automatically: each
    /// retry would burn one of the card's tries.
    #[error("PIN incorrect for {device}{}", tries_suffix(*.tries_left))]
    WrongPin {
        /// The device that refused.
        device: DeviceInfo,
        /// Tries left before the PIN blocks, when the device says.
        tries_left: Option<u32>,
    },

    /// The PIN is blocked: no tries left.
    #[error("the PIN of {device} is blocked; {remedy}")]
    PinBlocked {
        /// The device whose PIN is blocked.
        device: DeviceInfo,
        /// How to unblock it, e.g. "unblock it with the PUK: token-agent piv unblock".
        remedy: String,
    },

    /// The device waited for a touch that never came.
    #[error("{device} was not touched in time; touch it when it blinks and try again")]
    TouchTimeout {
        /// The device that waited.
        device: DeviceInfo,
    },

    /// The person was asked and did not answer, refused, or could not be asked.
    #[error(transparent)]
    Prompt(#[from] PromptError),

    /// The device refused or failed the operation.
    #[error("{device}: {message}")]
    Device {
        /// The device that failed.
        device: DeviceInfo,
        /// What it reported, in words.
        message: String,
    },

    /// The agent's policy refused the request (a denied confirmation, a
    /// destination the key is not allowed for, a provider outside the allowlist).
    #[error("refused: {reason}")]
    Refused {
        /// Why, in words a person can act on.
        reason: String,
    },

    /// A key or request that cannot be used: an unsupported algorithm, a
    /// certificate that does not match its key, malformed key material.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Unsupported`] for `operation` on `backend`.
    pub fn unsupported(backend: &str, operation: &'static str) -> Self {
        Self::Unsupported {
            backend: backend.to_owned(),
            operation,
        }
    }
}

fn tries_suffix(tries_left: Option<u32>) -> String {
    match tries_left {
        Some(1) => ", 1 try left before it blocks".to_owned(),
        Some(n) => format!(", {n} tries left"),
        None => String::new(),
    }
}

/// Why a person could not be asked, or did not agree.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PromptError {
    /// The person closed the dialog or pressed Cancel.
    #[error("cancelled by the user")]
    Cancelled,

    /// No way to ask exists here, e.g. a headless session without a display and
    /// no askpass program configured.
    #[error("cannot ask for {what}: {reason}")]
    Unavailable {
        /// What was to be asked ("the PIN of YubiKey 5 #123").
        what: String,
        /// Why asking is impossible and how to fix it.
        reason: String,
    },

    /// The prompt program failed or spoke an unexpected protocol.
    #[error("the prompt program {program} failed: {message}")]
    Failed {
        /// The program that was run.
        program: String,
        /// What went wrong.
        message: String,
    },

    /// Nobody answered within the prompt's time limit.
    #[error("no answer within {seconds} s")]
    TimedOut {
        /// The time limit.
        seconds: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_pin_says_tries_left() {
        let device = DeviceInfo::new("YubiKey 5 #1234567");
        let two = Error::WrongPin {
            device: device.clone(),
            tries_left: Some(2),
        };
        assert_eq!(
            two.to_string(),
            "PIN incorrect for YubiKey 5 #1234567, 2 tries left"
        );
        let one = Error::WrongPin {
            device: device.clone(),
            tries_left: Some(1),
        };
        assert_eq!(
            one.to_string(),
            "PIN incorrect for YubiKey 5 #1234567, 1 try left before it blocks"
        );
        let unknown = Error::WrongPin {
            device,
            tries_left: None,
        };
        assert_eq!(unknown.to_string(), "PIN incorrect for YubiKey 5 #1234567");
    }

    #[test]
    fn removal_says_what_to_do() {
        let err = Error::DeviceRemoved {
            device: DeviceInfo::new("YubiKey 5 #1234567"),
        };
        assert_eq!(
            err.to_string(),
            "YubiKey 5 #1234567 was removed; insert it and try again"
        );
    }
}
