//! How the latest PIN attempt on a device ended, for the requests that
//! waited while it was made.

use std::sync::Mutex;

use crate::error::Error;
use crate::sync::lock;

/// The outcome of the latest PIN attempt on one device (a login, or a
/// signature made with a PIN the person typed).
///
/// Requests that find the device wants a PIN take turns at asking, under a
/// lock of their backend's (which also guards what the attempt is for).
/// Before it waits for its turn, a request takes a [`Ticket`]; when the turn
/// comes, [`since`](Self::since) gives the outcome of an attempt made in the
/// meantime, and that outcome is the request's own. So a burst of requests
/// asks once: one Cancel ends the burst, and the requests behind a wrong PIN
/// fail with it instead of asking again, which could spend every try the
/// device has. A request that arrives later asks anew.
#[derive(Debug, Default)]
pub struct PinAttempts {
    /// How many attempts were recorded, and how the latest ended.
    latest: Mutex<(u64, Option<Result<(), Error>>)>,
}

/// Where a request stood before it waited: see [`PinAttempts::ticket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl PinAttempts {
    /// Taken before waiting for the turn to ask.
    pub fn ticket(&self) -> Ticket {
        Ticket(lock(&self.latest).0)
    }

    /// The outcome of the latest attempt, when one was recorded after
    /// `ticket` was taken; `None` when the caller's turn is the first since.
    pub fn since(&self, ticket: Ticket) -> Option<Result<(), Error>> {
        let latest = lock(&self.latest);
        if latest.0 == ticket.0 {
            None
        } else {
            latest.1.clone()
        }
    }

    /// Records how an attempt ended, while its turn is still held.
    pub fn record(&self, outcome: &Result<(), Error>) {
        let mut latest = lock(&self.latest);
        latest.0 += 1;
        latest.1 = Some(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceInfo;

    fn wrong_pin() -> Error {
        Error::WrongPin {
            device: DeviceInfo::new("YubiKey 5 #12345678"),
            tries_left: Some(2),
        }
    }

    #[test]
    fn requests_that_waited_take_the_outcome_and_later_ones_ask_anew() {
        let attempts = PinAttempts::default();
        let first = attempts.ticket();
        let waited = attempts.ticket();
        assert!(attempts.since(first).is_none(), "the first asks");
        attempts.record(&Err(wrong_pin()));
        assert!(matches!(
            attempts.since(waited),
            Some(Err(Error::WrongPin {
                tries_left: Some(2),
                ..
            }))
        ));
        let later = attempts.ticket();
        assert!(attempts.since(later).is_none(), "a later request asks");
        attempts.record(&Ok(()));
        assert!(matches!(attempts.since(waited), Some(Ok(()))));
    }
}
