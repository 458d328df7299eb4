//! What token-agent's helper processes share.
//!
//! The agent loads foreign code (PKCS#11 modules, OpenSSH sk middlewares)
//! only in helper child processes. Both kinds of helper carry PINs across a
//! socket and are reported by how they ended; this crate holds those two
//! pieces, so both backends say them the same way.

#![forbid(unsafe_code)]

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// A PIN on its way to a helper: wiped from memory when dropped, and never
/// shown by `Debug`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pin(String);

impl Pin {
    /// Wraps `pin`.
    pub fn new(pin: String) -> Self {
        Self(pin)
    }

    /// The PIN's text, for the one call that hands it to the device.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How a helper ended: "signal 6, SIGABRT" or "exit status 3".
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.signal(), status.code()) {
        (Some(signal), _) => match Signal::try_from(signal) {
            Ok(name) => format!("signal {signal}, {name}"),
            Err(_) => format!("signal {signal}"),
        },
        (None, Some(code)) => format!("exit status {code}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_with_the_signal_name() {
        // Raw wait statuses: the signal number alone, or the code shifted left 8.
        assert_eq!(describe_exit(ExitStatus::from_raw(6)), "signal 6, SIGABRT");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "signal 9, SIGKILL");
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit status 3");
    }

    #[test]
    fn a_pin_never_shows_in_debug_output() {
        let pin = Pin::new("135790".into());
        assert_eq!(format!("{pin:?}"), "<redacted>");
        assert_eq!(pin.expose(), "135790");
    }
}
