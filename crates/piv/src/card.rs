//! One worker thread per card: it owns the card's `YubiKey` handle and its
//! cached PIN, and runs one job at a time from its queue, so a card never sees
//! two operations at once while different cards sign in parallel.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use token_agent_core::{DeviceInfo, Notice, Prompter};
use tokio::sync::oneshot;
use yubikey::certificate::Certificate;
use yubikey::piv::{self, ManagementAlgorithmId, ManagementSlotId, SlotId};
use yubikey::YubiKey;

use crate::pin::{pin_bytes, BadPin, PinCache};
use crate::slot::{describe_key, ssh_public_key, KeyAlgorithm, PinUse, Slot, SlotKey, TouchUse};

/// A YubiKey refuses an operation that waited 15 seconds for a touch with
/// 6985, which the `yubikey` crate reports as a generic error, as it does a
/// transmit cut by the card's removal. So a generic error is first checked by
/// reconnecting: a card still there that failed after at least this long on a
/// slot with a touch policy timed out waiting for the touch (nothing else makes
/// the card wait).
const TOUCH_WAIT: Duration = Duration::from_millis(900);

/// How long a freshly inserted card may take to accept a connection: pcscd
/// reports it present before it has powered it up.
const OPEN_PATIENCE: Duration = Duration::from_secs(3);

/// What to tell the person when pcscd answers SCARD_E_SHARING_VIOLATION: a
/// program connected to the card in exclusive mode. GnuPG's scdaemon does so
/// by default (unless `pcsc-shared` is set), and keeps the card until it exits.
pub(crate) const HELD: &str = "another program (for instance GnuPG's scdaemon) holds the card \
     exclusively; stop it (gpgconf --kill scdaemon) or set pcsc-shared in ~/.gnupg/scdaemon.conf";

/// Why a reader's card could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Another program holds the card exclusively: it is there, and opens once
    /// that program lets go (see [`HELD`]).
    Held,
    /// Not a YubiKey, not ready, or gone.
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Held => f.write_str(HELD),
            Self::Other(message) => f.write_str(message),
        }
    }
}

/// A card the backend has opened and scanned.
#[derive(Debug)]
pub(crate) struct Card {
    pub(crate) serial: u32,
    pub(crate) device: DeviceInfo,
    pub(crate) keys: Vec<SlotKey>,
    /// Slots holding a key the agent cannot offer, and why.
    pub(crate) skipped: Vec<Skipped>,
    jobs: Sender<Job>,
    /// Held by a sign request from its first job to its last, so that the PIN
    /// asked in between is used for that request and two requests do not both
    /// ask.
    pub(crate) session: tokio::sync::Mutex<()>,
    /// How the PIN questions asked under `session` ended: requests that
    /// waited for the session while one was asked take its failure.
    pub(crate) pin_attempts: token_agent_core::PinAttempts,
    /// What the worker last learned of the PIN and PUK, for `token-agent status`.
    pub(crate) status: Arc<std::sync::Mutex<CardStatus>>,
}

/// The PIN and PUK state as last read from the card (at open, and whenever
/// the worker reads or spends a PIN try): reading it for `status` would
/// otherwise mean talking to the card.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CardStatus {
    pub(crate) pin_tries: Option<u8>,
    pub(crate) puk_tries: Option<u8>,
    pub(crate) pin_cached: bool,
}

impl Card {
    /// Runs `job` on the card's worker and waits for its answer.
    pub(crate) async fn sign(&self, job: SignJob) -> Result<Vec<u8>, CardError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Sign(Box::new(job), reply))
            .map_err(|_| CardError::Removed)?;
        // The worker is gone (the card was pulled) when the reply is dropped.
        answer.await.unwrap_or(Err(CardError::Removed))
    }

    /// Tells the worker to forget the cached PIN and the card's PIN state.
    pub(crate) fn forget(&self) {
        let _ = self.jobs.send(Job::Forget);
    }
}

/// One signature for the worker to make.
pub(crate) struct SignJob {
    pub(crate) slot: Slot,
    pub(crate) algorithm: KeyAlgorithm,
    pub(crate) pin_use: PinUse,
    pub(crate) touch: TouchUse,
    /// The digest or padded block the card signs.
    pub(crate) input: Vec<u8>,
    /// A PIN the person just typed, to verify before signing.
    pub(crate) pin: Option<SecretString>,
    /// Raised while the card waits for a touch.
    pub(crate) notice: Option<(Arc<dyn Prompter>, Notice)>,
}

/// Why a job failed, in the card's terms; the backend turns it into a core error.
#[derive(Debug)]
pub(crate) enum CardError {
    /// The key needs the PIN and none is cached (or it must not be used).
    NeedPin {
        tries: Option<u8>,
        /// A cached PIN was not used because one try is left.
        cache_skipped: bool,
    },
    WrongPin {
        tries: u8,
    },
    Blocked,
    BadPin(BadPin),
    Removed,
    /// Another program holds the card exclusively (see [`HELD`]).
    Held,
    TouchTimeout,
    /// The card was reset by another program (internal: the worker reconnects).
    Reset,
    /// A failure that may mean the card left (a PC/SC error, or the generic
    /// error the `yubikey` crate reports for a transmit cut half-way, and for
    /// a touch that never came). Internal: the worker checks whether the card
    /// is still there.
    Unclear {
        message: String,
        /// The card waited long enough for this to be a touch timeout.
        touch_waited: bool,
    },
    Card(String),
}

enum Job {
    Sign(Box<SignJob>, oneshot::Sender<Result<Vec<u8>, CardError>>),
    Forget,
}

/// Opens the card in `reader`, scans its slots and starts its worker. Blocks
/// for the scan; call it on a thread of its own.
pub(crate) fn open(reader: &str, pin_idle: Duration) -> Result<Card, OpenError> {
    let deadline = Instant::now() + OPEN_PATIENCE;
    let mut yubikey = loop {
        match open_reader(reader) {
            Ok(yubikey) => break yubikey,
            // Waiting would not help, unlike for a card still powering up:
            // the holder keeps the card for as long as it runs. The watcher
            // tries again later.
            Err(OpenError::Held) => return Err(OpenError::Held),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    };
    let serial = yubikey.serial().0;
    let device = device_info(&yubikey);
    let Scan { keys, skipped } = scan(&mut yubikey);
    let status = Arc::new(std::sync::Mutex::new(CardStatus {
        pin_tries: pin_tries(&mut yubikey).ok().flatten(),
        puk_tries: puk_tries(&mut yubikey),
        pin_cached: false,
    }));
    let (jobs, queue) = mpsc::channel();
    let worker = Worker {
        reader: reader.to_owned(),
        serial,
        device: device.clone(),
        yubikey: Some(yubikey),
        cache: PinCache::new(pin_idle),
        verified: false,
        status: status.clone(),
    };
    thread::Builder::new()
        .name(format!("piv {serial}"))
        .spawn(move || worker.run(&queue))
        .map_err(|e| OpenError::Other(format!("cannot start a worker thread: {e}")))?;
    Ok(Card {
        serial,
        device,
        keys,
        skipped,
        jobs,
        session: tokio::sync::Mutex::new(()),
        pin_attempts: token_agent_core::PinAttempts::default(),
        status,
    })
}

/// "YubiKey 5 #12345678".
pub(crate) fn device_info(yubikey: &YubiKey) -> DeviceInfo {
    let serial = yubikey.serial().0;
    let label = match yubikey.version().major {
        0 => format!("YubiKey #{serial}"),
        major => format!("YubiKey {major} #{serial}"),
    };
    DeviceInfo::new(label).with_serial(serial.to_string())
}

/// Connects to the card in the reader named `reader` (shared mode: other
/// programs keep using the card, and each operation runs in a PC/SC transaction).
pub(crate) fn open_reader(reader: &str) -> Result<YubiKey, OpenError> {
    let other = |e: yubikey::Error| OpenError::Other(e.to_string());
    let mut context = yubikey::reader::Context::open().map_err(other)?;
    let readers = context.iter().map_err(other)?;
    for candidate in readers {
        if candidate.name() == reader {
            return candidate.open().map_err(|e| match e {
                // Even a shared connection is refused while another
                // program has the card in exclusive mode.
                yubikey::Error::PcscError {
                    inner: Some(pcsc::Error::SharingViolation),
                } => OpenError::Held,
                e => OpenError::Other(format!(
                    "{reader}: not a YubiKey PIV card, or not ready ({e})"
                )),
            });
        }
    }
    Err(OpenError::Other(format!("no reader named {reader}")))
}

/// Lets go of the card without resetting it (dropping a `YubiKey` resets the
/// card, which would log every other program out of it).
pub(crate) fn release(yubikey: YubiKey) {
    if let Err((yubikey, e)) = yubikey.disconnect(pcsc::Disposition::LeaveCard) {
        tracing::debug!(error = %e, "could not leave the card politely");
        drop(yubikey);
    }
}

/// What [`scan`] found on a card.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// The keys the agent offers.
    pub(crate) keys: Vec<SlotKey>,
    /// Slots holding a key it cannot offer.
    pub(crate) skipped: Vec<Skipped>,
}

/// A slot holding a key the agent cannot offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub(crate) slot: Slot,
    /// Why, in words for the log and `token-agent status`.
    pub(crate) reason: String,
}

/// Reads every key slot: metadata for the algorithm, policies and (without a
/// certificate) the public key; the certificate for the public key when present.
pub(crate) fn scan(yubikey: &mut YubiKey) -> Scan {
    let mut found = Scan::default();
    let mut has_metadata = true;
    for slot in Slot::all() {
        let mut unknown_algorithm = false;
        let metadata = if has_metadata {
            match piv::metadata(yubikey, slot.id()) {
                Ok(metadata) => Some(metadata),
                // Firmware before 5.3 has no GET METADATA: certificates only.
                Err(yubikey::Error::NotSupported) => {
                    has_metadata = false;
                    None
                }
                // The slot's algorithm byte is none the `yubikey` crate
                // knows: one firmware 5.7 added (Ed25519, X25519, RSA 3072,
                // RSA 4096). The crate can neither read nor use the key.
                Err(yubikey::Error::AlgorithmError) => {
                    unknown_algorithm = true;
                    None
                }
                // 6A82: the slot is empty.
                Err(_) => continue,
            }
        } else {
            None
        };
        let certificate = Certificate::read(yubikey, slot.id()).ok();
        let spki = certificate
            .as_ref()
            .map(|c| &c.cert.tbs_certificate.subject_public_key_info);
        let from_cert = spki.and_then(ssh_public_key);
        let from_metadata = metadata
            .as_ref()
            .and_then(|m| m.public.as_ref())
            .and_then(ssh_public_key);
        let has_certificate = from_cert.is_some();
        let usable = from_cert.or(from_metadata);
        let (algorithm, public_key) = match usable {
            Some(usable) if !unknown_algorithm => usable,
            _ => {
                // A certificate names the key's algorithm; without one, the
                // card's algorithm byte is lost inside the `yubikey` crate.
                const CANNOT: &str = "which the agent cannot use yet (the yubikey library it \
                    uses knows RSA 1024 and 2048 and ECC P-256 and P-384 only)";
                let reason = match spki {
                    Some(spki) if !has_certificate => format!("{}, {CANNOT}", describe_key(spki)),
                    _ if unknown_algorithm => format!(
                        "a key of an algorithm new in firmware 5.7 (Ed25519, X25519, \
                         RSA 3072 or RSA 4096), {CANNOT}"
                    ),
                    // No certificate on a card without GET METADATA: an empty slot.
                    _ if metadata.is_none() => continue,
                    _ => "a key whose public key the agent cannot read".to_owned(),
                };
                found.skipped.push(Skipped { slot, reason });
                continue;
            }
        };
        if let Some(ManagementAlgorithmId::Asymmetric(id)) = metadata.as_ref().map(|m| m.algorithm)
        {
            if KeyAlgorithm::from_id(id) != algorithm {
                tracing::warn!(%slot, "the certificate in slot {slot} is not for the slot's key; skipped");
                continue;
            }
        }
        let (pin, touch) = match metadata.as_ref().and_then(|m| m.policy) {
            Some((pin, touch)) => (PinUse::from_policy(pin, slot), TouchUse::from_policy(touch)),
            None => (PinUse::default_for(slot), TouchUse::Never),
        };
        found.keys.push(SlotKey {
            slot,
            algorithm,
            public_key,
            pin,
            touch,
            has_certificate,
        });
    }
    found
}

/// PIN tries left, without touching the PIN's verified state: GET METADATA on
/// the PIN (firmware 5.3 and later), else an empty VERIFY, which answers the
/// tries left (63Cx), or 9000 while the PIN is verified: `Ok(None)`, the count
/// is unknown but the PIN is not blocked.
///
/// Not the `yubikey` crate's `get_pin_retries`: like libykpiv's
/// `ykpiv_get_pin_retries` it re-selects PIV first "to unverify", so that the
/// empty VERIFY always gives a count, and on a YubiKey 4 that re-select logs
/// the PIN out: a signature right after the person typed the PIN would find
/// the card locked again.
pub(crate) fn pin_tries(yubikey: &mut YubiKey) -> Result<Option<u8>, yubikey::Error> {
    if let Some(tries) = pin_tries_from_metadata(yubikey)? {
        return Ok(Some(tries));
    }
    match yubikey.verify_pin(&[]) {
        Ok(()) => Ok(None),
        // 63Cx with the tries left; 6983 (blocked) comes back as 0 tries.
        Err(yubikey::Error::WrongPin { tries }) => Ok(Some(tries)),
        Err(e) => Err(e),
    }
}

/// PIN tries left as GET METADATA says; `Ok(None)` on firmware before 5.3,
/// which has no GET METADATA (6D00).
fn pin_tries_from_metadata(yubikey: &mut YubiKey) -> Result<Option<u8>, yubikey::Error> {
    match piv::metadata(yubikey, SlotId::Management(ManagementSlotId::Pin)) {
        Ok(metadata) => metadata
            .retries
            .map(|r| Some(r.remaining_count))
            .ok_or(yubikey::Error::ParseError),
        Err(yubikey::Error::NotSupported) => Ok(None),
        Err(e) => Err(e),
    }
}

/// PUK tries left, when the card says (GET METADATA on the PUK).
pub(crate) fn puk_tries(yubikey: &mut YubiKey) -> Option<u8> {
    piv::metadata(yubikey, SlotId::Management(ManagementSlotId::Puk))
        .ok()
        .and_then(|m| m.retries)
        .map(|r| r.remaining_count)
}

struct Worker {
    reader: String,
    serial: u32,
    device: DeviceInfo,
    yubikey: Option<YubiKey>,
    cache: PinCache,
    /// Whether the PIN was verified on this connection since it was opened.
    verified: bool,
    status: Arc<std::sync::Mutex<CardStatus>>,
}

impl Worker {
    /// Notes what the card said of its PIN for `token-agent status`.
    fn note_pin(&mut self, tries: Option<u8>) {
        let cached = self.cache.is_set();
        let mut status = token_agent_core::lock(&self.status);
        if tries.is_some() {
            status.pin_tries = tries;
        }
        status.pin_cached = cached;
    }

    fn run(mut self, queue: &Receiver<Job>) {
        loop {
            let job = match self.cache.deadline() {
                Some(deadline) => {
                    match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => {
                            if self.cache.expire() {
                                tracing::info!(device = %self.device, "the cached PIN expired");
                                self.unverify();
                            }
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match queue.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            match job {
                Job::Sign(job, reply) => {
                    // The `yubikey` crate indexes card answers without
                    // checking their length (metadata parsing, for one), so a
                    // malformed answer panics it. That fails this job only:
                    // the worker, and with it the card, goes on.
                    let result = panic::catch_unwind(AssertUnwindSafe(|| self.sign(&job)))
                        .unwrap_or_else(|payload| Err(self.after_panic(&*payload)));
                    let _ = reply.send(result);
                }
                Job::Forget => {
                    self.cache.clear();
                    self.note_pin(None);
                    if self.verified {
                        self.unverify();
                    }
                }
            }
        }
        self.cache.clear();
        if let Some(yubikey) = self.yubikey.take() {
            release(yubikey);
        }
        tracing::debug!(device = %self.device, "card worker stopped");
    }

    /// After a job panicked: the connection is in an unknown state (a PC/SC
    /// transaction cut short, a PIN perhaps verified), so it is closed with a
    /// reset and the next job opens a new one.
    fn after_panic(&mut self, payload: &(dyn Any + Send)) -> CardError {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("no message");
        tracing::error!(device = %self.device, panic = what, "the yubikey library panicked on the card's answer; reconnecting");
        self.unverify();
        CardError::Card(
            "the card sent an answer the agent could not read, so its connection was reset; \
             try again, and if it keeps happening, pull the card out and plug it back in"
                .into(),
        )
    }

    fn sign(&mut self, job: &SignJob) -> Result<Vec<u8>, CardError> {
        match self.try_sign(job) {
            // Another program reset the card: reconnect by serial and go again once.
            Err(CardError::Reset) => {
                tracing::info!(device = %self.device, "the card was reset by another program; reconnecting and forgetting the cached PIN");
                // The reset logged the PIN out. The program that reset it may
                // have changed the PIN (`token-agent piv setup --change-pin`,
                // ykman), and sending the cached one would then spend a try
                // on a PIN nobody typed: the person is asked again.
                self.verified = false;
                self.cache.clear();
                self.note_pin(None);
                self.reconnect()?;
                match self.try_sign(job) {
                    Err(CardError::Reset) => Err(CardError::Card(
                        "the card keeps being reset by another program".into(),
                    )),
                    other => other,
                }
            }
            // A transmit that failed half-way (the card pulled while it
            // worked, before pcscd's next presence probe) comes back as one
            // of several PC/SC errors: whether the card is still there says
            // which it was.
            Err(CardError::Unclear {
                message,
                touch_waited,
            }) => match self.reconnect() {
                Err(CardError::Held) => Err(CardError::Held),
                Err(_) => Err(CardError::Removed),
                Ok(()) if touch_waited => Err(CardError::TouchTimeout),
                Ok(()) => Err(CardError::Card(message)),
            },
            other => other,
        }
    }

    fn try_sign(&mut self, job: &SignJob) -> Result<Vec<u8>, CardError> {
        let mut verified_now = false;
        if let Some(pin) = &job.pin {
            self.verify(pin)?;
            verified_now = true;
        } else if job.pin_use == PinUse::Always {
            // "Always" asks the person for every signature: that is what the
            // policy is for, so the cached PIN is not used for it.
            let tries = pin_tries(self.handle()?).map_err(card_error)?;
            if tries == Some(0) {
                return Err(CardError::Blocked);
            }
            return Err(CardError::NeedPin {
                tries,
                cache_skipped: false,
            });
        }
        match self.raw_sign(job) {
            Err(CardError::NeedPin { .. }) if job.pin_use != PinUse::Never && !verified_now => {
                // PIN "once" and the card is not (or no longer) verified.
                self.verify_cached()?;
                self.raw_sign(job)
            }
            other => other,
        }
    }

    fn handle(&mut self) -> Result<&mut YubiKey, CardError> {
        if self.yubikey.is_none() {
            self.reconnect()?;
        }
        self.yubikey.as_mut().ok_or(CardError::Removed)
    }

    /// Reconnects to this card by serial: on its reader first, else on any reader.
    fn reconnect(&mut self) -> Result<(), CardError> {
        if let Some(old) = self.yubikey.take() {
            release(old);
        }
        let yubikey = match open_reader(&self.reader) {
            Ok(yubikey) if yubikey.serial().0 == self.serial => yubikey,
            Ok(other) => {
                release(other);
                return Err(CardError::Removed);
            }
            // The card is still in its reader (the watcher drops it when
            // it leaves), and another program took it while the agent had
            // let go of it (after an idle PIN expiry or a reset).
            Err(OpenError::Held) => return Err(CardError::Held),
            Err(OpenError::Other(_)) => YubiKey::open_by_serial(yubikey::Serial(self.serial))
                .map_err(|_| CardError::Removed)?,
        };
        self.yubikey = Some(yubikey);
        Ok(())
    }

    /// Makes the card forget a verified PIN. A reset is the only way that
    /// works on every firmware (a re-SELECT keeps it on some), and dropping the
    /// handle also drops the copy of the PIN the `yubikey` crate keeps for its
    /// own reconnects.
    fn unverify(&mut self) {
        if let Some(yubikey) = self.yubikey.take() {
            if let Err((yubikey, e)) = yubikey.disconnect(pcsc::Disposition::ResetCard) {
                tracing::debug!(error = %e, "could not reset the card");
                drop(yubikey);
            }
        }
        self.verified = false;
    }

    /// Verifies with the cached PIN, unless none is cached or only one try is left.
    fn verify_cached(&mut self) -> Result<(), CardError> {
        let tries = pin_tries(self.handle()?).map_err(card_error)?;
        if tries == Some(0) {
            self.cache.clear();
            self.note_pin(Some(0));
            return Err(CardError::Blocked);
        }
        self.note_pin(tries);
        let cached = self.cache.is_set();
        // An unknown count means the PIN is verified: no VERIFY failed since
        // the last one that passed (a failed VERIFY logs the PIN out, SP
        // 800-73-4 part 2, VERIFY), so the counter is full.
        if cached && tries != Some(1) {
            if let Some(pin) = self.cache.take_fresh() {
                return self.verify(&pin);
            }
        }
        Err(CardError::NeedPin {
            tries,
            cache_skipped: cached,
        })
    }

    fn verify(&mut self, pin: &SecretString) -> Result<(), CardError> {
        let bytes = pin_bytes(pin).map_err(CardError::BadPin)?;
        let result = self.handle()?.verify_pin(&bytes);
        match result {
            Ok(()) => {
                self.verified = true;
                self.cache.store(pin.clone());
                // The counter is back to its maximum, which only GET METADATA
                // says: an older card answers an empty VERIFY with 9000 now.
                let tries = self
                    .yubikey
                    .as_mut()
                    .and_then(|y| pin_tries_from_metadata(y).ok().flatten());
                let mut status = token_agent_core::lock(&self.status);
                status.pin_tries = tries;
                status.pin_cached = self.cache.is_set();
                Ok(())
            }
            Err(e) => {
                if matches!(
                    e,
                    yubikey::Error::WrongPin { .. } | yubikey::Error::PinLocked
                ) {
                    // A rejected PIN is never tried again, cached or not.
                    self.cache.clear();
                }
                match e {
                    yubikey::Error::WrongPin { tries: 0 } | yubikey::Error::PinLocked => {
                        self.note_pin(Some(0));
                        Err(CardError::Blocked)
                    }
                    yubikey::Error::WrongPin { tries } => {
                        self.note_pin(Some(tries));
                        Err(CardError::WrongPin { tries })
                    }
                    other => Err(card_error(other)),
                }
            }
        }
    }

    fn raw_sign(&mut self, job: &SignJob) -> Result<Vec<u8>, CardError> {
        let yubikey = self.handle()?;
        // Raised before the card starts waiting, withdrawn as soon as it answers.
        let notice = job
            .notice
            .as_ref()
            .filter(|_| job.touch.may_wait())
            .map(|(prompter, notice)| prompter.notify(notice));
        let started = Instant::now();
        let result = piv::sign_data(yubikey, &job.input, job.algorithm.id(), job.slot.id());
        drop(notice);
        match result {
            Ok(signature) => Ok(signature.to_vec()),
            // 6982: security status not satisfied, the PIN is needed.
            Err(yubikey::Error::AuthenticationError) => Err(CardError::NeedPin {
                tries: None,
                cache_skipped: false,
            }),
            Err(yubikey::Error::GenericError) => Err(CardError::Unclear {
                message: "the card refused to sign".into(),
                touch_waited: job.touch.may_wait() && started.elapsed() >= TOUCH_WAIT,
            }),
            Err(e) => Err(card_error(e)),
        }
    }
}

/// Sorts a `yubikey` error into removal, reset or a plain card failure.
fn card_error(e: yubikey::Error) -> CardError {
    match e {
        yubikey::Error::PcscError { inner: Some(inner) } => match inner {
            pcsc::Error::ResetCard => CardError::Reset,
            pcsc::Error::SharingViolation => CardError::Held,
            pcsc::Error::RemovedCard
            | pcsc::Error::NoSmartcard
            | pcsc::Error::ReaderUnavailable
            | pcsc::Error::UnknownReader
            | pcsc::Error::UnpoweredCard
            | pcsc::Error::UnresponsiveCard
            | pcsc::Error::CommError
            | pcsc::Error::NoService
            | pcsc::Error::ServiceStopped
            | pcsc::Error::InvalidHandle => CardError::Removed,
            other => CardError::Unclear {
                message: format!("PC/SC error: {other}"),
                touch_waited: false,
            },
        },
        yubikey::Error::WrongPin { tries } => CardError::WrongPin { tries },
        yubikey::Error::PinLocked => CardError::Blocked,
        other => CardError::Card(other.to_string()),
    }
}
