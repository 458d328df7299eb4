//! The PIV YubiKey backend of token-agent.
//!
//! This crate owns the keys in the PIV application of YubiKeys: it follows
//! every PC/SC reader (hot-plug through SCardGetStatusChange and the PnP
//! notification reader), opens each YubiKey by its serial, lists every key
//! slot (9a, 9c, 9d, 9e and the retired 82-95) with the public key from the
//! slot's certificate or from GET METADATA, and signs with ECDSA P-256/P-384
//! and RSA (PKCS#1 v1.5 padding built here, rsa-sha2-256/512, SHA-1 only when
//! asked). It honours each slot's PIN and touch policy: it asks the
//! [`Prompter`] for the PIN only when the card
//! needs it, caches it per card with an idle expiry, never retries a rejected
//! PIN, and raises the touch notice while the card waits.
//!
//! It must not open a terminal or a pinentry itself (it asks the prompter),
//! hold a card exclusively (other programs such as `ykman` and
//! `yubico-piv-tool` keep working: every operation is a PC/SC transaction in
//! shared mode), or log a PIN. When another program holds a card
//! exclusively (GnuPG's scdaemon without `pcsc-shared`), it says so in the log,
//! in [`Backend::devices`] and in the error of a signature, and tries the card
//! again on a backoff until that program lets go.
//!
//! Each card has one worker thread that owns its `YubiKey` handle and runs one
//! job at a time: cards sign in parallel, a card never sees two operations at
//! once, and listing never touches a card.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use token_agent_core::{Backend, IdentitySink};
//! use token_agent_piv::{PivBackend, PivConfig};
//!
//! let backend = PivBackend::new(PivConfig {
//!     pin_cache_idle: Duration::from_secs(15 * 60),
//! });
//! backend.start(IdentitySink::new(|identities| {
//!     for identity in identities {
//!         println!("{}", identity.comment()); // "YubiKey 5 #12345678 slot 9a (PIV Authentication)"
//!     }
//! }));
//! ```

#![forbid(unsafe_code)]

mod card;
pub mod manage;
mod pin;
mod sign;
mod slot;
mod watch;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use token_agent_core::{
    lock, Backend, DeviceStatus, Error, IdentitySink, KeyRef, Notice, NoticeKind, PinRequest,
    PromptSubject, Prompter, SignContext, SignRequest, SshSignature,
};

pub use slot::{KeyAlgorithm, PinUse, Slot, SlotKey, TouchUse};

use crate::card::{CardError, SignJob};
use crate::watch::Registry;

/// The name of this backend, carried by every [`KeyRef`] it issues.
pub const NAME: &str = "piv";

/// What the backend is told by the configuration (`[piv]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PivConfig {
    /// How long a cached PIN lives without use; zero never caches it (the
    /// card then asks again after an idle expiry, a lock, or a removal).
    pub pin_cache_idle: Duration,
}

impl Default for PivConfig {
    fn default() -> Self {
        Self {
            pin_cache_idle: Duration::from_secs(15 * 60),
        }
    }
}

/// The PIV backend: every YubiKey on every PC/SC reader.
#[derive(Debug)]
pub struct PivBackend {
    registry: Arc<Registry>,
}

impl PivBackend {
    /// A backend with `config`; it looks for cards once [`Backend::start`]ed.
    pub fn new(config: PivConfig) -> Self {
        quiet_apdu_traces();
        Self {
            registry: Arc::new(Registry::new(config.pin_cache_idle)),
        }
    }
}

impl Drop for PivBackend {
    fn drop(&mut self) {
        // The watcher notices within one wait and drops the cards.
        self.registry.stop.store(true, Ordering::Relaxed);
    }
}

/// The `yubikey` crate logs every APDU through the `log` facade at trace
/// level, VERIFY and its PIN included. Capping `log` at debug drops those
/// records before any logger sees them, whatever `TOKEN_AGENT_LOG` says; the
/// agent's own logs use `tracing` and are not affected.
pub fn quiet_apdu_traces() {
    if log::max_level() > log::LevelFilter::Debug {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

#[async_trait]
impl Backend for PivBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn start(&self, sink: IdentitySink) {
        self.registry.set_sink(sink);
        let registry = Arc::clone(&self.registry);
        let spawned = thread::Builder::new()
            .name("piv watcher".into())
            .spawn(move || watch::watch(&registry));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the PC/SC watcher: no YubiKey will be listed");
        }
    }

    async fn sign(
        &self,
        key: &KeyRef,
        request: &SignRequest,
        context: &SignContext,
        prompter: Arc<dyn Prompter>,
    ) -> Result<SshSignature, Error> {
        let (serial, slot) = parse_handle(key.handle()).ok_or(Error::KeyNotFound)?;
        let Some(card) = self.registry.card(serial) else {
            return Err(match self.registry.seen(serial) {
                Some(device) => Error::DeviceRemoved { device },
                None => Error::KeyNotFound,
            });
        };
        let key = card
            .keys
            .iter()
            .find(|k| k.slot == slot)
            .ok_or(Error::KeyNotFound)?
            .clone();
        let device = card.device.clone();
        let subject = PromptSubject {
            key: Some(format!("{} slot {}", device.label(), slot)),
            fingerprint: Some(token_agent_core::fingerprint(
                &key.public_key,
                ssh_key::HashAlg::Sha256,
            )),
            device: Some(device.clone()),
            ..PromptSubject::default()
        }
        .with_context(context);
        let input = sign::card_input(key.algorithm, request.flags, &request.data);
        let notice = Notice {
            kind: NoticeKind::Touch,
            subject: subject.clone(),
        };

        let ticket = card.pin_attempts.ticket();
        let _session = card.session.lock().await;
        let mut pin = None;
        loop {
            let job = SignJob {
                slot,
                algorithm: key.algorithm,
                pin_use: key.pin,
                touch: key.touch,
                input: input.clone(),
                pin: pin.clone(),
                notice: Some((prompter.clone(), notice.clone())),
            };
            match card.sign(job).await {
                Ok(raw) => {
                    if pin.is_some() {
                        card.pin_attempts.record(&Ok(()));
                    }
                    tracing::debug!(%device, %slot, "signed");
                    return sign::ssh_signature(key.algorithm, request.flags, &raw).ok_or_else(
                        || Error::Device {
                            device,
                            message: "the card answered with a malformed signature".into(),
                        },
                    );
                }
                Err(CardError::NeedPin {
                    tries,
                    cache_skipped,
                }) if pin.is_none() => {
                    // Only a failure is taken over: when the card took
                    // another request's PIN and still wants one for this
                    // request (a key whose PIN policy is "always"), it asks.
                    if let Some(Err(failed)) = card.pin_attempts.since(ticket) {
                        return Err(failed);
                    }
                    let mut ask = PinRequest::new(subject.clone());
                    ask.tries_left = tries.map(u32::from);
                    if tries == Some(1) {
                        ask.warning = Some(if cache_skipped {
                            format!(
                                "Only one PIN try is left on {device}, so the saved PIN was \
                                 not used: type it carefully, a wrong PIN now blocks the card."
                            )
                        } else {
                            format!(
                                "Only one PIN try is left on {device}: a wrong PIN now blocks the card."
                            )
                        });
                    }
                    match prompter.pin(&ask).await {
                        Ok(given) => pin = Some(given),
                        Err(err) => {
                            let err = Error::from(err);
                            card.pin_attempts.record(&Err(err.clone()));
                            return Err(err);
                        }
                    }
                }
                Err(e) => {
                    let err = core_error(e, &device, serial);
                    if pin.is_some() {
                        // Only a refused PIN is the question's failure: after
                        // a PIN the card took (a touch not given in time, a
                        // card pulled out) the next request may ask again.
                        let refused = matches!(
                            err,
                            Error::WrongPin { .. }
                                | Error::PinBlocked { .. }
                                | Error::Refused { .. }
                        );
                        card.pin_attempts
                            .record(&if refused { Err(err.clone()) } else { Ok(()) });
                    }
                    return Err(err);
                }
            }
        }
    }

    fn forget_secrets(&self) {
        for card in self.registry.cards() {
            card.forget();
        }
    }

    fn devices(&self) -> Vec<DeviceStatus> {
        let mut devices = Vec::new();
        if let Some(error) = lock(&self.registry.pcscd_error).clone() {
            devices.push(DeviceStatus {
                label: "pcscd".into(),
                details: vec![format!(
                    "cannot reach pcscd ({error}), so no YubiKey is available; start it \
                     (Debian and Ubuntu: sudo apt install pcscd && sudo systemctl start pcscd.socket)"
                )],
                problem: true,
            });
        }
        for reader in self.registry.held() {
            devices.push(DeviceStatus {
                label: format!("the card in {reader}"),
                details: vec![format!(
                    "{}; the agent opens it within seconds of that program letting go",
                    card::HELD
                )],
                problem: true,
            });
        }
        for card in self.registry.cards() {
            let status = *lock(&card.status);
            let mut details = Vec::new();
            let mut problem = false;
            match status.pin_tries {
                Some(0) => {
                    problem = true;
                    details.push(format!("PIN blocked; {}", unblock_remedy(card.serial)));
                }
                Some(n) => details.push(format!("PIN: {n} tries left")),
                None => details.push("PIN tries unknown".into()),
            }
            match status.puk_tries {
                Some(0) => {
                    problem = true;
                    details.push("PUK blocked: only a PIV reset (ykman piv reset) helps".into());
                }
                Some(n) => details.push(format!("PUK: {n} tries left")),
                None => {}
            }
            if status.pin_cached {
                details.push("PIN cached".into());
            }
            details.push(format!(
                "slots with keys: {}",
                card.keys
                    .iter()
                    .map(|k| k.slot.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            for skipped in &card.skipped {
                details.push(format!(
                    "slot {} skipped: it holds {}",
                    skipped.slot, skipped.reason
                ));
            }
            devices.push(DeviceStatus {
                label: card.device.label().to_owned(),
                details,
                problem,
            });
        }
        devices
    }
}

/// The remedy for a blocked PIN, naming the command that unblocks it.
pub fn unblock_remedy(serial: u32) -> String {
    format!("unblock it with the PUK: token-agent piv unblock --serial {serial}")
}

fn core_error(e: CardError, device: &token_agent_core::DeviceInfo, serial: u32) -> Error {
    let device = device.clone();
    match e {
        CardError::NeedPin { .. } => Error::Device {
            device,
            message: "the card asked for the PIN again right after accepting it".into(),
        },
        CardError::WrongPin { tries } => Error::WrongPin {
            device,
            tries_left: Some(u32::from(tries)),
        },
        CardError::Blocked => Error::PinBlocked {
            device,
            remedy: unblock_remedy(serial),
        },
        CardError::BadPin(bad) => Error::Refused {
            reason: bad.message().to_owned(),
        },
        CardError::Removed | CardError::Reset => Error::DeviceRemoved { device },
        CardError::Held => Error::Device {
            device,
            message: format!("{}; then try again", card::HELD),
        },
        CardError::TouchTimeout => Error::TouchTimeout { device },
        CardError::Card(message) | CardError::Unclear { message, .. } => {
            Error::Device { device, message }
        }
    }
}

/// "12345678/9a" into the serial and slot.
fn parse_handle(handle: &[u8]) -> Option<(u32, Slot)> {
    let text = std::str::from_utf8(handle).ok()?;
    let (serial, slot) = text.split_once('/')?;
    Some((serial.parse().ok()?, slot.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip() {
        assert_eq!(
            parse_handle(b"12345678/9a"),
            Slot::from_byte(0x9a).map(|s| (12_345_678, s))
        );
        assert_eq!(parse_handle(b"12345678"), None);
        assert_eq!(parse_handle(b"x/9a"), None);
    }

    #[test]
    fn blocked_pin_says_how_to_unblock() {
        let err = core_error(
            CardError::Blocked,
            &token_agent_core::DeviceInfo::new("YubiKey 5 #1234567"),
            1_234_567,
        );
        assert_eq!(
            err.to_string(),
            "the PIN of YubiKey 5 #1234567 is blocked; unblock it with the PUK: \
             token-agent piv unblock --serial 1234567"
        );
    }
}
