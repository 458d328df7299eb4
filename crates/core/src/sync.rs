//! Locking shared by every crate.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, going on after a panic in another holder.
///
/// The locks of token-agent guard plain data (maps of sessions, waiting
/// callers, the state a watcher publishes) that every update leaves whole
/// between statements, so a thread that panicked while holding one leaves
/// it fit for use, and one failed request must not fail every later one.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let mutex = std::sync::Arc::new(Mutex::new(vec![1]));
        let held = mutex.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(mutex.is_poisoned());
        lock(&mutex).push(2);
        assert_eq!(*lock(&mutex), vec![1, 2]);
    }
}
