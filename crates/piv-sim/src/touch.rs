//! The simulated touch sensor.
//!
//! A YubiKey with a touch policy of "always" or "cached" blinks and holds the
//! APDU until someone touches it, and gives up after about 15 seconds. Here the
//! "person" is the test: it chooses how the card gets touched ([`TouchMode`]),
//! touches by hand with [`TouchControl::touch`], and can wait until the card is
//! blinking with [`TouchControl::wait_until_waiting`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a YubiKey waits for a touch before it refuses the operation.
pub const DEFAULT_TOUCH_TIMEOUT: Duration = Duration::from_secs(15);

/// How the simulated person answers a touch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchMode {
    /// Touch after this delay on every request (zero: at once).
    AutoAfter(Duration),
    /// Wait for [`TouchControl::touch`]; time out if it does not come.
    Manual,
    /// Never touch: every request times out.
    Never,
}

impl Default for TouchMode {
    /// Touch at once, so keys with a touch policy work without a test's help.
    fn default() -> Self {
        Self::AutoAfter(Duration::ZERO)
    }
}

/// A cloneable handle on a card's touch sensor; all clones control the same sensor.
#[derive(Debug, Clone, Default)]
pub struct TouchControl {
    inner: Arc<(Mutex<TouchState>, Condvar)>,
}

#[derive(Debug)]
struct TouchState {
    mode: TouchMode,
    timeout: Duration,
    waiting: bool,
    touched: bool,
    requests: u64,
}

impl Default for TouchState {
    fn default() -> Self {
        Self {
            mode: TouchMode::default(),
            timeout: DEFAULT_TOUCH_TIMEOUT,
            waiting: false,
            touched: false,
            requests: 0,
        }
    }
}

impl TouchControl {
    /// A sensor in [`TouchMode::default`] with the YubiKey's 15 second timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes how requests get answered; applies to a request already waiting.
    pub fn set_mode(&self, mode: TouchMode) {
        let (lock, cvar) = &*self.inner;
        lock_state(lock).mode = mode;
        cvar.notify_all();
    }

    /// The current mode.
    pub fn mode(&self) -> TouchMode {
        lock_state(&self.inner.0).mode
    }

    /// Changes how long the card waits for a touch before it refuses.
    pub fn set_timeout(&self, timeout: Duration) {
        let (lock, cvar) = &*self.inner;
        lock_state(lock).timeout = timeout;
        cvar.notify_all();
    }

    /// Touches the card. Like a real key, a touch while the card is not waiting does nothing.
    pub fn touch(&self) {
        let (lock, cvar) = &*self.inner;
        let mut state = lock_state(lock);
        if state.waiting {
            state.touched = true;
            cvar.notify_all();
        }
    }

    /// Whether the card is blinking, waiting for a touch, right now.
    pub fn is_waiting(&self) -> bool {
        lock_state(&self.inner.0).waiting
    }

    /// How many times the card has asked for a touch since it was made.
    pub fn requests(&self) -> u64 {
        lock_state(&self.inner.0).requests
    }

    /// Blocks until the card waits for a touch, or `timeout` passes; says which.
    pub fn wait_until_waiting(&self, timeout: Duration) -> bool {
        let (lock, cvar) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut state = lock_state(lock);
        while !state.waiting {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match cvar.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Called by the applet: blinks until touched (true) or timed out (false).
    pub(crate) fn wait_for_touch(&self) -> bool {
        let (lock, cvar) = &*self.inner;
        let started = Instant::now();
        let mut state = lock_state(lock);
        state.waiting = true;
        state.touched = false;
        state.requests += 1;
        cvar.notify_all();
        let touched = loop {
            if state.touched {
                break true;
            }
            let elapsed = started.elapsed();
            let deadline = match state.mode {
                TouchMode::AutoAfter(delay) if delay < state.timeout => {
                    if elapsed >= delay {
                        break true;
                    }
                    delay
                }
                _ => state.timeout,
            };
            if elapsed >= state.timeout {
                break false;
            }
            let wait = deadline.min(state.timeout).saturating_sub(elapsed);
            state = match cvar.wait_timeout(state, wait) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        };
        state.waiting = false;
        state.touched = false;
        cvar.notify_all();
        touched
    }
}

fn lock_state(lock: &Mutex<TouchState>) -> MutexGuard<'_, TouchState> {
    // The state stays consistent even if a holder panicked: every field is a plain value.
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn auto_touch_and_never() {
        let t = TouchControl::new();
        assert!(t.wait_for_touch());
        t.set_mode(TouchMode::Never);
        t.set_timeout(Duration::from_millis(50));
        let start = Instant::now();
        assert!(!t.wait_for_touch());
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(t.requests(), 2);
    }

    #[test]
    fn manual_touch_releases_a_waiting_request() {
        let t = TouchControl::new();
        t.set_mode(TouchMode::Manual);
        let card = t.clone();
        let waiter = thread::spawn(move || card.wait_for_touch());
        assert!(t.wait_until_waiting(Duration::from_secs(5)));
        t.touch();
        assert!(waiter.join().unwrap_or(false));
        assert!(!t.is_waiting());
    }
}
