//! Following the PC/SC readers: a thread blocked in SCardGetStatusChange on
//! every reader plus the PnP notification reader, which opens a card when one
//! appears and drops it when it goes.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pcsc::{Context, ReaderState, Scope, State};
use token_agent_core::{lock, DeviceInfo, Identity, IdentitySink, KeyRef};

use crate::card::{self, Card, OpenError};
use crate::slot::Slot;

/// How long one SCardGetStatusChange waits before the loop checks whether it
/// should stop. Events wake it at once; this only bounds shutdown.
const WAIT: Duration = Duration::from_millis(500);
/// How long to wait before talking to pcscd again after it failed or was absent.
const RETRY: Duration = Duration::from_secs(1);
/// When a card another program holds exclusively is tried again: after the
/// first delay, then twice as long each time up to the second. Letting go of
/// a card changes nothing pcscd reports (its event counter counts insertions
/// and removals only), so nothing else would tell the watcher to try again.
const HELD_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(5));

/// What the watcher knows: the cards it opened, by reader, and every device
/// it has seen (to name a removed one in errors).
#[derive(Debug)]
pub(crate) struct Registry {
    state: Mutex<Inner>,
    sink: Mutex<Option<IdentitySink>>,
    pin_idle: Duration,
    pub(crate) stop: AtomicBool,
    /// Why pcscd cannot be reached, while it cannot.
    pub(crate) pcscd_error: Mutex<Option<String>>,
}

#[derive(Debug, Default)]
struct Inner {
    readers: HashMap<String, Entry>,
    seen: HashMap<u32, DeviceInfo>,
    /// The skipped slots already logged, by card serial, so that a card
    /// opened again (after a reset or a hold) does not log them again.
    skips_logged: HashSet<(u32, Slot)>,
    next_generation: u64,
    published: Option<Vec<Identity>>,
}

#[derive(Debug)]
enum Entry {
    /// A worker is opening the card; `generation` tells a stale one apart.
    Opening {
        generation: u64,
        events: u32,
    },
    Ready {
        card: Arc<Card>,
        events: u32,
    },
    /// Not a YubiKey (or it would not open); left alone until the next event.
    Ignored {
        events: u32,
    },
    /// Another program holds the card exclusively; tried again at `retry_at`.
    Held {
        events: u32,
        retry_at: Instant,
        backoff: Duration,
    },
}

impl Entry {
    fn events(&self) -> u32 {
        match self {
            Self::Opening { events, .. }
            | Self::Ready { events, .. }
            | Self::Ignored { events }
            | Self::Held { events, .. } => *events,
        }
    }
}

impl Registry {
    pub(crate) fn new(pin_idle: Duration) -> Self {
        Self {
            state: Mutex::new(Inner::default()),
            sink: Mutex::new(None),
            pin_idle,
            stop: AtomicBool::new(false),
            pcscd_error: Mutex::new(None),
        }
    }

    pub(crate) fn set_sink(&self, sink: IdentitySink) {
        *lock(&self.sink) = Some(sink);
        self.publish();
    }

    /// The open card with `serial`.
    pub(crate) fn card(&self, serial: u32) -> Option<Arc<Card>> {
        lock(&self.state)
            .readers
            .values()
            .find_map(|entry| match entry {
                Entry::Ready { card, .. } if card.serial == serial => Some(card.clone()),
                _ => None,
            })
    }

    /// The device with `serial`, if it was ever seen.
    pub(crate) fn seen(&self, serial: u32) -> Option<DeviceInfo> {
        lock(&self.state).seen.get(&serial).cloned()
    }

    /// Every open card.
    pub(crate) fn cards(&self) -> Vec<Arc<Card>> {
        lock(&self.state)
            .readers
            .values()
            .filter_map(|entry| match entry {
                Entry::Ready { card, .. } => Some(card.clone()),
                _ => None,
            })
            .collect()
    }

    /// The readers whose card another program holds exclusively.
    pub(crate) fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = lock(&self.state)
            .readers
            .iter()
            .filter(|(_, entry)| matches!(entry, Entry::Held { .. }))
            .map(|(reader, _)| reader.clone())
            .collect();
        held.sort();
        held
    }

    /// A reader's current state: opens a newly present card, drops a gone
    /// one, and tries a held one again when its delay has run out.
    fn reader_state(self: &Arc<Self>, reader: &str, present: bool, events: u32) {
        let mut state = lock(&self.state);
        let mut held_for = None;
        match (present, state.readers.get(reader)) {
            (false, None) => return,
            (
                true,
                Some(Entry::Held {
                    events: seen,
                    retry_at,
                    backoff,
                }),
            ) if *seen == events => {
                if Instant::now() < *retry_at {
                    return;
                }
                held_for = Some(*backoff);
            }
            (true, Some(entry)) if entry.events() == events => return,
            _ => {}
        }
        // Gone, or swapped for another card between two looks.
        if let Some(entry) = state.readers.remove(reader) {
            if let Entry::Ready { card, .. } = entry {
                tracing::info!(device = %card.device, reader, "YubiKey removed");
            }
            drop(state);
            self.publish();
            state = lock(&self.state);
        }
        if !present {
            return;
        }
        let generation = state.next_generation;
        state.next_generation += 1;
        state
            .readers
            .insert(reader.to_owned(), Entry::Opening { generation, events });
        drop(state);
        let registry = Arc::clone(self);
        let reader = reader.to_owned();
        let spawned = thread::Builder::new()
            .name("piv open".into())
            .spawn(move || registry.open(&reader, generation, events, held_for));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a thread to open a card");
        }
    }

    /// Runs on a thread of its own: opens and scans the card, then lists its
    /// keys. `held_for` is the delay since the last try, when the card was
    /// held by another program then.
    fn open(&self, reader: &str, generation: u64, events: u32, held_for: Option<Duration>) {
        let opened = card::open(reader, self.pin_idle);
        let mut state = lock(&self.state);
        let current = matches!(
            state.readers.get(reader),
            Some(Entry::Opening { generation: g, .. }) if *g == generation
        );
        if !current {
            // Removed (or replaced) while it was being opened; the worker
            // stops when `opened` is dropped.
            return;
        }
        let entry = match opened {
            Ok(card) => {
                if held_for.is_some() {
                    tracing::info!(reader, "the other program let go of the card");
                }
                tracing::info!(
                    device = %card.device,
                    reader,
                    keys = card.keys.len(),
                    "YubiKey connected"
                );
                for skipped in &card.skipped {
                    if state.skips_logged.insert((card.serial, skipped.slot)) {
                        tracing::info!(
                            device = %card.device,
                            slot = %skipped.slot,
                            "slot {} skipped: it holds {}",
                            skipped.slot,
                            skipped.reason
                        );
                    }
                }
                state.seen.insert(card.serial, card.device.clone());
                Entry::Ready {
                    card: Arc::new(card),
                    events,
                }
            }
            Err(OpenError::Held) => {
                // Said once per insertion; the tries after it are quiet.
                if held_for.is_none() {
                    tracing::warn!(
                        reader,
                        "cannot open the card: {}; the agent tries again every few seconds",
                        card::HELD
                    );
                }
                let backoff = held_for.map_or(HELD_RETRY.0, |last| (last * 2).min(HELD_RETRY.1));
                Entry::Held {
                    events,
                    retry_at: Instant::now() + backoff,
                    backoff,
                }
            }
            Err(e) => {
                tracing::info!(reader, error = %e, "card skipped");
                Entry::Ignored { events }
            }
        };
        state.readers.insert(reader.to_owned(), entry);
        drop(state);
        self.publish();
    }

    /// Drops every card whose reader is not in `readers`.
    fn retain_readers(&self, readers: &[CString]) {
        let mut state = lock(&self.state);
        let before = state.readers.len();
        state
            .readers
            .retain(|name, _| readers.iter().any(|r| r.to_str() == Ok(name.as_str())));
        let changed = state.readers.len() != before;
        drop(state);
        if changed {
            self.publish();
        }
    }

    /// Publishes every key of every open card, if the list changed.
    fn publish(&self) {
        let mut state = lock(&self.state);
        let mut cards: Vec<&Arc<Card>> = state
            .readers
            .values()
            .filter_map(|entry| match entry {
                Entry::Ready { card, .. } => Some(card),
                _ => None,
            })
            .collect();
        cards.sort_by_key(|card| card.serial);
        let identities: Vec<Identity> = cards.iter().flat_map(|card| identities(card)).collect();
        if state.published.as_ref() == Some(&identities) {
            return;
        }
        state.published = Some(identities.clone());
        // Published under the lock, so two publications cannot swap places.
        if let Some(sink) = lock(&self.sink).as_ref() {
            sink.publish(identities);
        }
    }
}

/// The identities of `card`'s keys.
pub(crate) fn identities(card: &Card) -> Vec<Identity> {
    card.keys
        .iter()
        .map(|key| {
            Identity::new(
                key.public_key.clone(),
                format!(
                    "{} slot {} ({})",
                    card.device.label(),
                    key.slot,
                    key.slot.purpose()
                ),
                KeyRef::new(crate::NAME, format!("{}/{}", card.serial, key.slot)),
            )
            .with_device(card.device.clone())
        })
        .collect()
}

/// The watcher thread's loop: until `registry.stop`, follow pcscd's readers.
pub(crate) fn watch(registry: &Arc<Registry>) {
    let mut warned = false;
    while !registry.stop.load(Ordering::Relaxed) {
        match Context::establish(Scope::User) {
            Ok(context) => {
                warned = false;
                *lock(&registry.pcscd_error) = None;
                if let Err(e) = follow(&context, registry) {
                    tracing::warn!(error = %e, "lost pcscd; reconnecting");
                }
            }
            Err(e) => {
                *lock(&registry.pcscd_error) = Some(e.to_string());
                if !warned {
                    tracing::warn!(
                        error = %e,
                        "cannot reach pcscd, so no YubiKey is available; start it \
                         (on Debian and Ubuntu: sudo apt install pcscd && sudo systemctl start pcscd.socket)"
                    );
                    warned = true;
                }
            }
        }
        // Nothing can be used without pcscd: forget every card.
        registry.retain_readers(&[]);
        if !registry.stop.load(Ordering::Relaxed) {
            thread::sleep(RETRY);
        }
    }
}

fn follow(context: &Context, registry: &Arc<Registry>) -> Result<(), pcsc::Error> {
    let pnp = pcsc::PNP_NOTIFICATION();
    let mut states = vec![ReaderState::new(pnp, State::UNAWARE)];
    while !registry.stop.load(Ordering::Relaxed) {
        let readers = match context.list_readers_owned() {
            Ok(readers) => readers,
            Err(pcsc::Error::NoReadersAvailable) => Vec::new(),
            Err(e) => return Err(e),
        };
        registry.retain_readers(&readers);
        states.retain(|s| s.name() == pnp || readers.iter().any(|r| r.as_c_str() == s.name()));
        for reader in &readers {
            if !states.iter().any(|s| s.name() == reader.as_c_str()) {
                states.push(ReaderState::new(reader.clone(), State::UNAWARE));
            }
        }
        match context.get_status_change(WAIT, &mut states) {
            Ok(()) | Err(pcsc::Error::Timeout) => {}
            // pcscd without PnP support: fall back to polling at WAIT.
            Err(pcsc::Error::UnknownReader) => {
                states.retain(|s| s.name() != pnp);
                thread::sleep(WAIT);
                continue;
            }
            Err(e) => return Err(e),
        }
        for state in &mut states {
            if state.name() == pnp {
                state.sync_current_state();
                continue;
            }
            let event = state.event_state();
            let present = event.contains(State::PRESENT) && !event.contains(State::MUTE);
            if let Ok(name) = state.name().to_str() {
                registry.reader_state(name, present, state.event_count());
            }
            state.sync_current_state();
        }
    }
    Ok(())
}
