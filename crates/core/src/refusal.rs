//! Why the agent refused a request, in one vocabulary.
//!
//! The agent protocol carries no reason: a refusal is only
//! SSH_AGENT_FAILURE, and ssh prints "agent refused operation". So every
//! refusal is classified here, logged with its kind, kept for `token-agent
//! status`, and, when the person caused it or can fix it (a touch, a PIN, a
//! confirmation), announced through the notice path.

use crate::error::{Error, PromptError};

/// The kind of a refusal. Its [`code`](RefusalKind::code) is stable: scripts
/// read it from `token-agent status --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalKind {
    /// The person answered no to a confirmation (`ssh-add -c`).
    ConfirmDeclined,
    /// Nobody answered a confirmation in time.
    ConfirmTimedOut,
    /// No askpass or pinentry could be shown (for instance no DISPLAY or
    /// WAYLAND_DISPLAY in the agent's environment).
    PromptUnavailable,
    /// The person cancelled the PIN entry.
    PinCancelled,
    /// The device rejected the PIN.
    WrongPin,
    /// The PIN is blocked.
    PinBlocked,
    /// The device waited for a touch that never came.
    TouchTimeout,
    /// The device holding the key was removed.
    DeviceRemoved,
    /// The key's lifetime (`ssh-add -t`) ran out.
    KeyExpired,
    /// The agent is locked (`ssh-add -x`).
    Locked,
    /// A destination constraint (`ssh-add -h`) did not allow this use.
    Destination,
    /// The forwarding policy refused a use over a forwarded connection, or a
    /// forwarded connection asked for something only local clients may do.
    Forwarding,
    /// An sk signature that looks like a web authentication (`-O
    /// no-restrict-websafe`).
    WebSafety,
    /// No key the agent holds matches the request.
    UnknownKey,
    /// The key cannot make this signature (algorithm or flags), or the
    /// request asks for something the agent does not support.
    Unsupported,
    /// A library outside the `-P` allowlist, a malformed key, another policy.
    Refused,
    /// The device or backend failed.
    Failed,
}

impl RefusalKind {
    /// A short stable name: `confirm-declined`, `wrong-pin`, ...
    pub fn code(self) -> &'static str {
        match self {
            Self::ConfirmDeclined => "confirm-declined",
            Self::ConfirmTimedOut => "confirm-timed-out",
            Self::PromptUnavailable => "prompt-unavailable",
            Self::PinCancelled => "pin-cancelled",
            Self::WrongPin => "wrong-pin",
            Self::PinBlocked => "pin-blocked",
            Self::TouchTimeout => "touch-timeout",
            Self::DeviceRemoved => "device-removed",
            Self::KeyExpired => "key-expired",
            Self::Locked => "locked",
            Self::Destination => "destination",
            Self::Forwarding => "forwarding",
            Self::WebSafety => "web-safety",
            Self::UnknownKey => "unknown-key",
            Self::Unsupported => "unsupported",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }

    /// Whether the person caused this refusal or can fix it at once (a
    /// touch, a PIN, a confirmation, a prompt that could not be shown): such
    /// refusals are announced through the notice path.
    pub fn for_the_person(self) -> bool {
        matches!(
            self,
            Self::ConfirmDeclined
                | Self::ConfirmTimedOut
                | Self::PromptUnavailable
                | Self::PinCancelled
                | Self::WrongPin
                | Self::PinBlocked
                | Self::TouchTimeout
        )
    }

    /// The kind of a backend's error.
    pub fn of(error: &Error) -> Self {
        match error {
            Error::Unsupported { .. } | Error::NoBackend { .. } => Self::Unsupported,
            Error::KeyNotFound => Self::UnknownKey,
            Error::DeviceRemoved { .. } => Self::DeviceRemoved,
            Error::WrongPin { .. } => Self::WrongPin,
            Error::PinBlocked { .. } => Self::PinBlocked,
            Error::TouchTimeout { .. } => Self::TouchTimeout,
            Error::Prompt(PromptError::Cancelled | PromptError::TimedOut { .. }) => {
                Self::PinCancelled
            }
            Error::Prompt(PromptError::Unavailable { .. } | PromptError::Failed { .. }) => {
                Self::PromptUnavailable
            }
            Error::Refused { .. } | Error::InvalidKey { .. } => Self::Refused,
            Error::Device { .. } => Self::Failed,
        }
    }

    /// The kind of a failed confirmation prompt.
    pub fn of_confirmation(error: &PromptError) -> Self {
        match error {
            PromptError::Cancelled => Self::ConfirmDeclined,
            PromptError::TimedOut { .. } => Self::ConfirmTimedOut,
            PromptError::Unavailable { .. } | PromptError::Failed { .. } => Self::PromptUnavailable,
        }
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// What a backend reports of one of its devices for `token-agent status`:
/// a PKCS#11 token, a YubiKey, a security key, or the service behind them
/// (pcscd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// "YubiKey 5 #12345678", "alice (SoftHSM v2) in /usr/lib/softhsm/libsofthsm2.so".
    pub label: String,
    /// Facts a person reads: "PIN: 3 tries left", "logged in", "pcscd is not running ...".
    pub details: Vec<String>,
    /// Whether something about it needs the person (a blocked PIN, pcscd down).
    pub problem: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceInfo;

    #[test]
    fn errors_map_to_kinds() {
        let device = DeviceInfo::new("YubiKey 5 #1");
        assert_eq!(
            RefusalKind::of(&Error::WrongPin {
                device: device.clone(),
                tries_left: Some(2)
            }),
            RefusalKind::WrongPin
        );
        assert_eq!(
            RefusalKind::of(&Error::TouchTimeout { device }),
            RefusalKind::TouchTimeout
        );
        assert_eq!(
            RefusalKind::of_confirmation(&PromptError::TimedOut { seconds: 60 }),
            RefusalKind::ConfirmTimedOut
        );
        assert!(RefusalKind::WrongPin.for_the_person());
        assert!(!RefusalKind::Locked.for_the_person());
        assert_eq!(RefusalKind::KeyExpired.code(), "key-expired");
    }
}
