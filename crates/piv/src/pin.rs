//! The PIN: checks made before a try of the card is spent, and the per-card cache.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

/// A PIV PIN is 6 to 8 bytes (SP 800-73-4 part 2, section 3.2.1), padded with FF.
const MIN_LEN: usize = 6;
const MAX_LEN: usize = 8;

/// Why a PIN was refused before it reached the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadPin {
    /// Fewer than 6 or more than 8 characters.
    Length,
    /// Something a YubiKey's PIN cannot hold (control characters, non-ASCII),
    /// or the 44-character OTP a YubiKey types when it is touched by accident.
    Characters,
}

impl BadPin {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Length => {
                "a PIV PIN has 6 to 8 characters; the card was not asked, so no try was spent"
            }
            Self::Characters => {
                "that is not a PIN (it has characters a PIN cannot hold, or it is a YubiKey OTP \
                 typed by a touch); the card was not asked, so no try was spent"
            }
        }
    }
}

/// The PIN's bytes as VERIFY sends them, after the checks that cost no try.
pub(crate) fn pin_bytes(pin: &SecretString) -> Result<Zeroizing<Vec<u8>>, BadPin> {
    let text = pin.expose_secret();
    if !text.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(BadPin::Characters);
    }
    if !(MIN_LEN..=MAX_LEN).contains(&text.len()) {
        // A 44-character modhex string is an accidental OTP, not a long PIN.
        return Err(if text.len() == 44 {
            BadPin::Characters
        } else {
            BadPin::Length
        });
    }
    Ok(Zeroizing::new(text.as_bytes().to_vec()))
}

/// One card's cached PIN, forgotten after `idle` without use.
#[derive(Debug)]
pub(crate) struct PinCache {
    idle: Duration,
    entry: Option<(SecretString, Instant)>,
}

impl PinCache {
    /// A cache whose PIN expires after `idle` unused; zero disables caching.
    pub(crate) fn new(idle: Duration) -> Self {
        Self { idle, entry: None }
    }

    /// Keeps `pin` (a PIN the card just accepted).
    pub(crate) fn store(&mut self, pin: SecretString) {
        if !self.idle.is_zero() {
            self.entry = Some((pin, Instant::now()));
        }
    }

    /// The cached PIN, if it has not expired; using it restarts the idle timer.
    pub(crate) fn take_fresh(&mut self) -> Option<SecretString> {
        self.expire();
        let (pin, used) = self.entry.as_mut()?;
        *used = Instant::now();
        Some(pin.clone())
    }

    /// Whether a PIN is cached (and not expired).
    pub(crate) fn is_set(&mut self) -> bool {
        self.expire();
        self.entry.is_some()
    }

    /// Forgets the PIN.
    pub(crate) fn clear(&mut self) {
        self.entry = None;
    }

    /// When the cached PIN expires, if one is cached.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.entry.as_ref().map(|(_, used)| *used + self.idle)
    }

    /// Drops the PIN if it has been idle too long; true when it just expired.
    pub(crate) fn expire(&mut self) -> bool {
        if self
            .deadline()
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            self.entry = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_cost_no_try() {
        let ok = pin_bytes(&SecretString::from("123456")).map(|b| b.len());
        assert_eq!(ok, Ok(6));
        assert_eq!(
            pin_bytes(&SecretString::from("12345")).err(),
            Some(BadPin::Length)
        );
        assert_eq!(
            pin_bytes(&SecretString::from("123456789")).err(),
            Some(BadPin::Length)
        );
        assert_eq!(
            pin_bytes(&SecretString::from("1234\n56")).err(),
            Some(BadPin::Characters)
        );
        let otp = "cccccckdvgibrbnlfhrdjhnrjekccvhhbdkvcjhhfklt";
        assert_eq!(
            pin_bytes(&SecretString::from(otp)).err(),
            Some(BadPin::Characters)
        );
    }

    #[test]
    fn cache_expires_when_idle() {
        let mut cache = PinCache::new(Duration::from_millis(50));
        cache.store(SecretString::from("123456"));
        assert!(cache.take_fresh().is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(cache.take_fresh().is_none());
        let mut off = PinCache::new(Duration::ZERO);
        off.store(SecretString::from("123456"));
        assert!(!off.is_set());
    }
}
