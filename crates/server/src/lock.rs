//! Locking the agent (`ssh-add -x` / `-X`), and with the desktop session.
//!
//! A session lock (the screen locks, or the machine suspends, when the
//! configuration asks for it) locks the agent exactly as `ssh-add -x` does,
//! without a password: it is lifted when the person unlocks the session.
//!
//! The password is any non-empty string of bytes, as in OpenSSH (an empty
//! one locks nothing). It is held only as a salted bcrypt-pbkdf hash and
//! compared in constant time, as OpenSSH does. Each wrong password given to
//! a locked agent delays the answer, and the delay grows by 100 ms per
//! failure up to 10 s (OpenSSH's schedule); the attempts are serialized, so
//! parallel connections cannot guess faster.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// bcrypt-pbkdf rounds for the lock hash (OpenSSH's LOCK_ROUNDS).
const ROUNDS: u32 = 1;
/// The delay added per failed unlock.
const DELAY_STEP: Duration = Duration::from_millis(100);
/// Failures counted toward the delay, at most (OpenSSH caps at 100, i.e. 10 s).
const MAX_COUNTED_FAILURES: u32 = 100;

/// The agent's lock.
#[derive(Debug, Default)]
pub struct Lock {
    state: Mutex<Option<Locked>>,
    failures: tokio::sync::Mutex<u32>,
    /// Locked with the desktop session.
    session: std::sync::atomic::AtomicBool,
}

struct Locked {
    salt: [u8; 16],
    hash: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Locked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Locked")
    }
}

impl Lock {
    /// Whether the agent is locked, by `ssh-add -x` or with the session.
    pub fn is_locked(&self) -> bool {
        self.state().is_some() || self.is_session_locked()
    }

    /// Whether the agent is locked with a password (`ssh-add -x`).
    pub fn is_password_locked(&self) -> bool {
        self.state().is_some()
    }

    /// Whether the agent is locked with the desktop session.
    pub fn is_session_locked(&self) -> bool {
        self.session.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Locks with the desktop session (or lifts that lock); returns whether
    /// this changed anything. A password lock (`ssh-add -x`) is separate and
    /// stays until `ssh-add -X`.
    pub fn set_session_locked(&self, locked: bool) -> bool {
        self.session
            .swap(locked, std::sync::atomic::Ordering::SeqCst)
            != locked
    }

    /// Locks with `password`. Returns false if already locked, or if the
    /// password is empty (OpenSSH does not support one).
    pub fn lock(&self, password: &[u8]) -> bool {
        let mut state = self.state();
        if state.is_some() || password.is_empty() {
            return false;
        }
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        *state = Some(Locked {
            salt,
            hash: hash(password, &salt),
        });
        true
    }

    /// Unlocks if `password` is the lock password. A wrong password answers
    /// false after the growing delay; an empty one, or an unlock of an agent
    /// not locked with a password, answers false at once and counts as no
    /// failure (as OpenSSH).
    pub async fn unlock(&self, password: &[u8]) -> bool {
        if password.is_empty() {
            return false;
        }
        let mut failures = self.failures.lock().await;
        let matched = {
            let mut state = self.state();
            let Some(locked) = state.as_ref() else {
                return false;
            };
            let matched = bool::from(hash(password, &locked.salt).ct_eq(&*locked.hash));
            if matched {
                *state = None;
            }
            matched
        };
        if matched {
            *failures = 0;
            return true;
        }
        *failures = (*failures + 1).min(MAX_COUNTED_FAILURES);
        let delay = DELAY_STEP * *failures;
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            "unlock failed; delaying"
        );
        tokio::time::sleep(delay).await;
        false
    }

    fn state(&self) -> MutexGuard<'_, Option<Locked>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn hash(password: &[u8], salt: &[u8; 16]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // bcrypt-pbkdf fails only for an empty password, salt or output, which
    // these are not.
    if bcrypt_pbkdf::bcrypt_pbkdf(password, salt, ROUNDS, &mut *out).is_err() {
        out.fill(0xff);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wrong_password_delays_and_right_one_unlocks() {
        let lock = Lock::default();
        let (right, wrong) = (b"right".as_slice(), b"wrong".as_slice());
        assert!(lock.lock(right));
        assert!(!lock.lock(right), "locking twice fails");
        assert!(lock.is_locked());

        let start = tokio::time::Instant::now();
        assert!(!lock.unlock(wrong).await);
        assert!(!lock.unlock(wrong).await);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert!(lock.is_locked());

        assert!(lock.unlock(right).await);
        assert!(!lock.is_locked());
    }

    #[tokio::test(start_paused = true)]
    async fn empty_passwords_and_unlocks_of_an_unlocked_agent_fail_at_once() {
        let lock = Lock::default();
        assert!(!lock.lock(b""), "an empty password locks nothing");
        assert!(!lock.is_locked());
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            assert!(!lock.unlock(b"pw").await);
        }
        assert_eq!(start.elapsed(), Duration::ZERO);

        // Those were no failures: the first wrong password waits 100 ms.
        assert!(lock.lock(b"p\xe4ss"), "any bytes make a password");
        assert!(!lock.unlock(b"").await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(!lock.unlock(b"pass").await);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert!(lock.unlock(b"p\xe4ss").await);
    }
}
