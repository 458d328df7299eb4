//! Locking the agent (`ssh-add -x` / `-X`), and with the desktop session.
//!
//! A session lock (the screen locks, or the machine suspends, when the
//! configuration asks for it) locks the agent exactly as `ssh-add -x` does,
//! without a password: it is lifted when the person unlocks the session.
//!
//! The password is held only as a salted bcrypt-pbkdf hash and compared in
//! constant time, as OpenSSH does. Each failed unlock delays the answer, and
//! the delay grows by 100 ms per failure up to 10 s (OpenSSH's schedule); the
//! attempts are serialized, so parallel connections cannot guess faster.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rand_core::{OsRng, RngCore};
use secrecy::{ExposeSecret, SecretString};
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

    /// Locks with `password`. Returns false if already locked.
    pub fn lock(&self, password: &SecretString) -> bool {
        let mut state = self.state();
        if state.is_some() {
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

    /// Unlocks if `password` is the lock password. A wrong password (or an
    /// unlock of an unlocked agent) answers false after the growing delay.
    pub async fn unlock(&self, password: &SecretString) -> bool {
        let mut failures = self.failures.lock().await;
        let matched = {
            let mut state = self.state();
            let matched = state.as_ref().is_some_and(|locked| {
                bool::from(hash(password, &locked.salt).ct_eq(&*locked.hash))
            });
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

fn hash(password: &SecretString, salt: &[u8; 16]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // bcrypt-pbkdf fails only for an empty salt or output, which these are not;
    // an empty password is hashed like any other (OpenSSH allows it).
    if bcrypt_pbkdf::bcrypt_pbkdf(password.expose_secret().as_bytes(), salt, ROUNDS, &mut *out)
        .is_err()
    {
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
        let right = SecretString::from("right");
        let wrong = SecretString::from("wrong");
        assert!(lock.lock(&right));
        assert!(!lock.lock(&right), "locking twice fails");
        assert!(lock.is_locked());

        let start = tokio::time::Instant::now();
        assert!(!lock.unlock(&wrong).await);
        assert!(!lock.unlock(&wrong).await);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert!(lock.is_locked());

        assert!(lock.unlock(&right).await);
        assert!(!lock.is_locked());
    }
}
