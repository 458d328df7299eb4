//! Whose turn it is to ask for a security key's PIN.
//!
//! A FIDO PIN is given for one assertion: unlike a card's login, a PIN that
//! worked does not serve the next signature, so every verify-required
//! signature asks. What a burst of such signatures must not do is ask again
//! behind a PIN the device refused: the person would type into a queue of
//! prompts that each spend a try, and three wrong PINs in a row already make
//! the device want a power cycle. So the requests of one device take turns
//! from the question until the device has answered, and a request that
//! arrived before a PIN was refused (or a question cancelled) fails with that
//! outcome instead of asking, as the PIV and PKCS#11 backends do with their
//! logins (`token_agent_core::PinAttempts`). Two things differ here. A
//! request's place is the moment it arrived rather than a ticket of its
//! device's: which device holds a key is known only after a discovery that
//! may take a while, and a request still looking for its device belongs to
//! the burst all the same. And a PIN the device took ends nothing: it served
//! one signature, so a later success does not let the requests of a failed
//! burst ask again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use token_agent_core::Error;

/// The PIN turns of every device seen so far, by device id (or middleware).
#[derive(Debug, Default)]
pub(crate) struct PinTurns {
    by_device: Mutex<HashMap<String, Arc<PinTurn>>>,
}

impl PinTurns {
    /// The turn of the device `id`, made on first use.
    pub(crate) fn of(&self, id: &str) -> Arc<PinTurn> {
        let mut turns = self.lock();
        turns.entry(id.to_owned()).or_default().clone()
    }

    /// Forgets the turns of devices `keep` does not keep. A request that
    /// holds a forgotten turn finishes with it; the next one starts afresh.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<PinTurn>>> {
        // The map holds no state a panic could leave half-updated.
        self.by_device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One device's turn at asking for its PIN, and the latest ask that failed.
#[derive(Debug, Default)]
pub(crate) struct PinTurn {
    asking: tokio::sync::Mutex<()>,
    /// When the latest refused PIN was answered (or question cancelled), and how.
    failed: Mutex<Option<(Instant, Error)>>,
}

/// The turn, held from the question until the device has answered.
pub(crate) struct Held<'a> {
    turn: &'a PinTurn,
    _asking: tokio::sync::MutexGuard<'a, ()>,
}

impl PinTurn {
    /// Waits for the turn of a request that `arrived` then; fails at once
    /// with a PIN refused (or a question cancelled) since. A PIN the device
    /// took does not end the burst: it was given for that signature alone,
    /// so the next request asks for its own.
    pub(crate) async fn take(&self, arrived: Instant) -> Result<Held<'_>, Error> {
        let asking = self.asking.lock().await;
        if let Some((ended, failed)) = &*self.failed() {
            if *ended > arrived {
                return Err(failed.clone());
            }
        }
        Ok(Held {
            turn: self,
            _asking: asking,
        })
    }

    fn failed(&self) -> MutexGuard<'_, Option<(Instant, Error)>> {
        // A plain value, replaced whole: a panic cannot leave it half-written.
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Held<'_> {
    /// Records how asking ended when it failed before the device saw a PIN
    /// (the person cancelled, a PIN of the wrong length), and passes `asked` on.
    pub(crate) fn asked<T>(&self, asked: Result<T, Error>) -> Result<T, Error> {
        if let Err(err) = &asked {
            self.fail(err);
        }
        asked
    }

    /// Records what the device made of the PIN, and passes `answer` on. Only
    /// a PIN the device `refused` ends the burst: after a PIN it took (a
    /// touch not given in time, a device pulled out) the requests behind ask.
    pub(crate) fn answered<T>(self, answer: Result<T, Error>, refused: bool) -> Result<T, Error> {
        if let (Err(err), true) = (&answer, refused) {
            self.fail(err);
        }
        answer
    }

    fn fail(&self, err: &Error) {
        *self.turn.failed() = Some((Instant::now(), err.clone()));
    }
}
