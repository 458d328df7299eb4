//! The helper process: `token-agent-pkcs11-helper` (or `token-agent
//! --pkcs11-helper`) runs one PKCS#11 module
//! and answers the agent's [`Request`]s (see [`crate::proto`] for the wire).
//!
//! The module's code runs only here, so when it crashes, hangs or scribbles
//! over memory, the agent loses a child it can restart, not itself or its
//! secrets. Requests come on lanes, each served by a thread of its own (see
//! [`run`]), so one signature that waits for a PIN pad (or a module that
//! hangs in `C_Sign`) does not hold up listing or signing on another lane.
//!
//! Sessions come from a small pool per slot: tokens that take several
//! sessions (SoftHSM does) sign in parallel, one session per concurrent
//! request; tokens that take one are used serially. A session the module
//! reports as gone (CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED) is
//! dropped and the operation tried once more on a fresh one.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Limit, Slot};
use secrecy::SecretString;
use sha2::{Digest, Sha256, Sha384, Sha512};
use ssh_encoding::Encode;
use token_agent_core::{lock, RsaHash};
use zeroize::Zeroize;

use crate::keys;
use crate::proto::{
    decode_frame, write_frame, Failure, KeyInfo, Op, OpenLane, Pin, PinState, Reply, Request,
    Response, Scheme, TokenState, EVENT_ID, MAX_REQUEST,
};

/// Idle sessions kept per slot.
const POOL_SIZE: usize = 16;

/// How much lower than the agent's the helper's scheduling priority is.
const HELPER_NICENESS: i32 = 5;

/// Serves the lanes the agent opens until it closes the control socket
/// (standard input), then exits the process (threads stuck in a hung module
/// are not waited for).
///
/// The main thread only takes lanes off the control socket and starts a
/// thread for each: it never calls the module, so a lane can be opened while
/// every other one is stuck in it. The agent decides which lane a request
/// goes to (an idle one, the lowest first, so that one client's signatures
/// keep to one thread with warm caches; a new one when all are busy), so
/// the helper runs as many signatures at once as the agent has waiting,
/// with no lock or thread handoff between lanes. A lane's thread reads one
/// request, answers it on standard output and reads the next.
pub fn run() -> ! {
    // PINs pass through this process: no core dumps, no ptrace by the
    // user's other processes.
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("token-agent pkcs11 helper: cannot make the process non-dumpable: {err}");
    }
    // A module's signatures are background work next to the agent's front
    // end: at a lower priority, the agent's threads take the CPU from a
    // module computing a signature (SoftHSM) at once, so listing keys and the
    // other backends answer without waiting for it. Not much lower: with
    // many clients the module's work is most of the work, and a helper far
    // below them gets too little of the CPU. Measured with pkcs11-bench on 2
    // CPUs (list p99 while another client signs, against list p99 alone; RSA
    // signatures per second with 8 clients, against the floor): niceness 0
    // 1.9x and 1.09x, 5 1.4x and 0.94x, 10 1.5x and 0.82x. Tokens that sign in
    // hardware do not notice.
    if let Err(err) = rustix::process::nice(HELPER_NICENESS) {
        eprintln!("token-agent pkcs11 helper: cannot lower its priority: {err}");
    }
    let (control, output) = match standard_streams() {
        Ok(streams) => streams,
        Err(err) => {
            eprintln!("token-agent pkcs11 helper: cannot use standard input and output: {err}");
            std::process::exit(2);
        }
    };
    let helper = Arc::new(Helper::new(output));
    loop {
        let (lane, open) = match OpenLane::receive(&control) {
            Ok(Some(lane)) => lane,
            // The agent closed the control socket: it is done with us, or gone.
            Ok(None) => std::process::exit(0),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                eprintln!("token-agent pkcs11 helper: cannot read the control socket: {err}");
                std::process::exit(2);
            }
        };
        let served = helper.clone();
        let spawned = std::thread::Builder::new()
            .name("pkcs11-lane".into())
            .spawn(move || serve_lane(&served, File::from(lane), open));
        if let Err(err) = spawned {
            // The lane is dropped with the closure: the agent's requests on
            // it fail at once, and it sends them on another lane.
            eprintln!("token-agent pkcs11 helper: cannot start a lane's thread: {err}");
        }
    }
}

/// The agent's end of the helper: stdin, the control socket, and stdout
/// for answers, duplicated and used as plain files (`io::stdin()` and
/// `io::stdout()` buffer, which would split records and frames). Standard
/// input then reads /dev/null and standard output points at standard error,
/// so a module that reads or prints (some log to stdout) cannot steal lanes
/// or corrupt answers: what it prints lands in the agent's log.
fn standard_streams() -> io::Result<(OwnedFd, File)> {
    let control = io::stdin().as_fd().try_clone_to_owned()?;
    let output = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let null = File::open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), io::stdin().as_raw_fd()).map_err(io::Error::from)?;
    nix::unistd::dup2(io::stderr().as_raw_fd(), io::stdout().as_raw_fd())
        .map_err(io::Error::from)?;
    Ok((control, output))
}

/// Answers the requests of one lane until the agent closes it, or until it
/// has waited as long as `open` allows for a request.
fn serve_lane(helper: &Arc<Helper>, lane: File, open: OpenLane) {
    let retires = open.retire_after.is_some();
    if let Err(err) = rustix::net::sockopt::set_socket_timeout(
        &lane,
        rustix::net::sockopt::Timeout::Recv,
        open.retire_after,
    ) {
        eprintln!("token-agent pkcs11 helper: a lane cannot time out: {err}");
    }
    // Only what a read filled is touched (and zeroized: it may hold a
    // PIN), so the rest of the buffer never becomes resident.
    let mut buffer = vec![0u8; MAX_REQUEST];
    loop {
        let len = match (&lane).read(&mut buffer) {
            // Closed by the agent, or shut down below and drained.
            Ok(0) => return,
            Ok(len) => len,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) if retires && err.kind() == io::ErrorKind::WouldBlock => {
                // Idle for as long as it may be: refuse further requests (the agent's
                // sends fail with EPIPE and go to another lane), then answer
                // what is already queued; the read after it returns 0.
                if let Err(err) = rustix::net::shutdown(&lane, rustix::net::Shutdown::Read) {
                    eprintln!("token-agent pkcs11 helper: cannot retire a lane: {err}");
                    return;
                }
                continue;
            }
            Err(err) => {
                eprintln!("token-agent pkcs11 helper: cannot read a request: {err}");
                std::process::exit(2);
            }
        };
        let request = decode_frame::<Request>(&buffer[..len]);
        buffer[..len].zeroize();
        let request = match request {
            Ok(request) => request,
            Err(err) => {
                eprintln!("token-agent pkcs11 helper: bad request from the agent: {err}");
                std::process::exit(2);
            }
        };
        let result = helper.handle(request.op);
        helper.send(&Response {
            id: request.id,
            result,
        });
    }
}

struct Helper {
    context: Mutex<Option<Pkcs11>>,
    path: Mutex<Option<String>>,
    pools: Mutex<HashMap<u64, Arc<Pool>>>,
    /// Private key handles found before, by slot and CKA_ID, so a signature
    /// costs C_SignInit and C_Sign alone (OpenSSH's helper searches the
    /// token for the key before every signature). Forgotten with the slot's
    /// sessions, on logout, and whenever the module calls a handle invalid.
    keys: Mutex<HashMap<u64, HashMap<Vec<u8>, PrivateKey>>>,
    /// Whether the module took a context-specific login before C_SignInit
    /// (OpenSC's do) or refused it (CKR_OPERATION_NOT_INITIALIZED, as the
    /// spec says and SoftHSM does); None until a signature has tried.
    login_before_init: Mutex<Option<bool>>,
    output: Mutex<File>,
}

/// A private key object and whether it needs a login for each signature.
#[derive(Clone, Copy)]
struct PrivateKey {
    handle: ObjectHandle,
    always_authenticate: bool,
}

struct Pool {
    idle: Mutex<Vec<Session>>,
    /// Held for the whole operation when the token takes only one session.
    serial: Option<Mutex<()>>,
}

/// A failure inside an operation: a raw PKCS#11 error (which may call for
/// a fresh session) or one already in the agent's terms.
enum OpError {
    Ck(CkError),
    Failure(Failure),
    /// A failure that left the session mid-operation: close it.
    Spoiled(Failure),
}

impl From<CkError> for OpError {
    fn from(err: CkError) -> Self {
        Self::Ck(err)
    }
}

impl From<Failure> for OpError {
    fn from(failure: Failure) -> Self {
        Self::Failure(failure)
    }
}

impl Helper {
    fn new(output: File) -> Self {
        Self {
            context: Mutex::default(),
            path: Mutex::default(),
            pools: Mutex::default(),
            keys: Mutex::default(),
            login_before_init: Mutex::default(),
            output: Mutex::new(output),
        }
    }

    fn send(&self, response: &Response) {
        if write_frame(&mut *lock(&self.output), response).is_err() {
            // The agent is gone: nothing left to serve.
            std::process::exit(0);
        }
    }

    fn handle(self: &Arc<Self>, op: Op) -> Result<Reply, Failure> {
        match op {
            Op::Load { path, .. } => self.load(&path),
            Op::List => self.list().map(Reply::Tokens),
            Op::Scan { path } => self.scan(&path).map(Reply::Tokens),
            Op::Login { slot, pin } => self.login(slot, pin.as_ref()).map(|()| Reply::Done),
            Op::Logout => {
                self.logout();
                Ok(Reply::Done)
            }
            Op::Sign {
                slot,
                key_id,
                scheme,
                message,
                context_pin,
                context_pin_pad,
            } => self
                .sign(
                    slot,
                    &key_id,
                    scheme,
                    &message,
                    context_pin.as_ref(),
                    context_pin_pad,
                )
                .map(Reply::Signature),
        }
    }

    fn context(&self) -> Result<Pkcs11, Failure> {
        lock(&self.context)
            .clone()
            .ok_or_else(|| Failure::Protocol("no module loaded".into()))
    }

    fn load(self: &Arc<Self>, path: &str) -> Result<Reply, Failure> {
        if lock(&self.context).is_some() {
            return Err(Failure::Protocol("a module is already loaded".into()));
        }
        let context = initialize(path)?;
        *lock(&self.context) = Some(context);
        *lock(&self.path) = Some(path.to_owned());
        let slot_events = self.watch_slots();
        Ok(Reply::Loaded { slot_events })
    }

    /// Initializes the module at `path` and lists its tokens, watching no
    /// slots: this helper exists for this one scan.
    fn scan(&self, path: &str) -> Result<Vec<TokenState>, Failure> {
        if lock(&self.context).is_some() {
            return Err(Failure::Protocol("a module is already loaded".into()));
        }
        *lock(&self.context) = Some(initialize(path)?);
        *lock(&self.path) = Some(path.to_owned());
        self.list()
    }

    /// Follows C_WaitForSlotEvent where the module implements it, and says
    /// whether it does. SoftHSM answers CKR_NO_EVENT to a non-blocking call
    /// but CKR_FUNCTION_NOT_SUPPORTED to a blocking one, so only a blocking
    /// call tells: one that is still waiting after a moment is supported.
    fn watch_slots(self: &Arc<Self>) -> bool {
        let helper = self.clone();
        let (first, answered) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok(context) = helper.context() else {
                return;
            };
            loop {
                let result = context.wait_for_slot_event();
                let _ = first.send(result.is_ok());
                if result.is_err() {
                    return;
                }
                helper.send(&Response {
                    id: EVENT_ID,
                    result: Ok(Reply::SlotEvent),
                });
            }
        });
        answered
            .recv_timeout(std::time::Duration::from_millis(200))
            .unwrap_or(true)
    }

    fn list(&self) -> Result<Vec<TokenState>, Failure> {
        let context = self.context()?;
        let slots = context
            .get_slots_with_initialized_token()
            .map_err(|e| failure("C_GetSlotList", e))?;
        let live: Vec<u64> = slots.iter().map(|s| s.id()).collect();
        lock(&self.pools).retain(|slot, _| live.contains(slot));
        lock(&self.keys).retain(|slot, _| live.contains(slot));
        let mut tokens = Vec::new();
        for slot in slots {
            match self.token(slot) {
                Ok(token) => tokens.push(token),
                // A token pulled out between the two calls is simply not there.
                Err(Failure::DeviceRemoved) => {}
                Err(err) => eprintln!(
                    "token-agent pkcs11 helper: skipping slot {}: {err}",
                    slot.id()
                ),
            }
        }
        Ok(tokens)
    }

    fn token(&self, slot: Slot) -> Result<TokenState, Failure> {
        let info = self
            .context()?
            .get_token_info(slot)
            .map_err(|e| failure("C_GetTokenInfo", e))?;
        let keys = self.with_session(slot, |session| Ok(token_keys(session)?))?;
        Ok(TokenState {
            slot: slot.id(),
            label: text(info.label()),
            serial: text(info.serial_number()),
            model: text(info.model()),
            protected_auth_path: info.protected_authentication_path(),
            login_required: info.login_required(),
            pin: PinState {
                count_low: info.user_pin_count_low(),
                final_try: info.user_pin_final_try(),
                locked: info.user_pin_locked(),
            },
            parallel: !matches!(info.max_session_count(), Limit::Max(1)),
            keys,
        })
    }

    fn pin_state(&self, slot: u64) -> PinState {
        match self.context().and_then(|c| {
            c.get_token_info(slot_of(slot)?)
                .map_err(|e| failure("C_GetTokenInfo", e))
        }) {
            Ok(info) => PinState {
                count_low: info.user_pin_count_low(),
                final_try: info.user_pin_final_try(),
                locked: info.user_pin_locked(),
            },
            Err(_) => PinState::default(),
        }
    }

    fn login(&self, slot: u64, pin: Option<&Pin>) -> Result<(), Failure> {
        // Modules renumber private objects across a logout and login
        // (SoftHSM drops their handles when the user logs out, which a
        // wrong context PIN does too).
        self.forget_keys(slot);
        let secret = pin.map(|p| SecretString::from(p.expose().to_owned()));
        let result = self.with_session(slot_of(slot)?, |session| {
            match session.login(UserType::User, secret.as_ref()) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
                Err(err) => Err(err.into()),
            }
        });
        match result {
            Err(Failure::PinIncorrect(_)) => Err(Failure::PinIncorrect(self.pin_state(slot))),
            other => other,
        }
    }

    fn logout(&self) {
        let pools: Vec<Arc<Pool>> = lock(&self.pools).drain().map(|(_, p)| p).collect();
        lock(&self.keys).clear();
        for pool in pools {
            let sessions: Vec<Session> = lock(&pool.idle).drain(..).collect();
            if let Some(session) = sessions.first() {
                let _ = session.logout();
            }
        }
    }

    fn sign(
        &self,
        slot: u64,
        key_id: &[u8],
        scheme: Scheme,
        message: &[u8],
        context_pin: Option<&Pin>,
        context_pin_pad: bool,
    ) -> Result<Vec<u8>, Failure> {
        let (mechanism, input) = single_part(scheme, message);
        let context_secret = context_pin.map(|p| SecretString::from(p.expose().to_owned()));
        let signing = Signing {
            helper: self,
            slot: slot_of(slot)?,
            scheme,
            mechanism,
            input,
            message,
            context_secret,
            context_pin_pad,
        };
        let result = self.with_session(slot_of(slot)?, |session| {
            let cached = lock(&self.keys)
                .get(&slot)
                .and_then(|keys| keys.get(key_id))
                .copied();
            let Some(key) = cached else {
                let key = self.find_key(session, slot, key_id)?;
                return signing.sign(session, key);
            };
            match signing.sign(session, key) {
                Err(OpError::Ck(CkError::Pkcs11(
                    RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid,
                    _,
                ))) => {
                    // The module renumbered its objects (a token made anew,
                    // a logout): find the key again.
                    let key = self.find_key(session, slot, key_id)?;
                    signing.sign(session, key)
                }
                other => other,
            }
        });
        match result {
            Err(Failure::PinIncorrect(_)) => Err(Failure::PinIncorrect(self.pin_state(slot))),
            other => other,
        }
    }

    /// Looks up the private key with `key_id` and remembers its handle.
    fn find_key(&self, session: &Session, slot: u64, key_id: &[u8]) -> Result<PrivateKey, OpError> {
        let handle = private_key(session, key_id)?;
        let key = PrivateKey {
            handle,
            always_authenticate: always_authenticate(session, handle),
        };
        lock(&self.keys)
            .entry(slot)
            .or_default()
            .insert(key_id.to_vec(), key);
        Ok(key)
    }

    /// Whether the token in `slot` signs `scheme` in several parts, with
    /// the mechanism that hashes for itself; if not, why.
    fn signs_in_parts(&self, slot: Slot, scheme: Scheme) -> Result<(), String> {
        let mechanism = multi_part(scheme);
        if scheme == Scheme::Ed25519 {
            // PKCS#11 3.0 defines CKM_EDDSA for single-part signatures only
            // (SoftHSM lists it, and C_SignUpdate then fails).
            return Err("CKM_EDDSA signs in one part only".into());
        }
        // A module that cannot list its mechanisms is left to answer
        // C_SignInit (CKR_MECHANISM_INVALID is caught there, still before
        // any PIN is verified).
        let listed = self.context().ok().map(|c| c.get_mechanism_list(slot));
        let Some(Ok(listed)) = listed else {
            return Ok(());
        };
        if listed.contains(&mechanism.mechanism_type()) {
            Ok(())
        } else {
            Err(format!(
                "the token has no {} mechanism",
                mechanism.mechanism_type()
            ))
        }
    }

    /// Forgets the key handles of `slot`, whose sessions the module dropped.
    fn forget_keys(&self, slot: u64) {
        lock(&self.keys).remove(&slot);
    }

    fn pool(&self, slot: Slot) -> Result<Arc<Pool>, Failure> {
        let mut pools = lock(&self.pools);
        if let Some(pool) = pools.get(&slot.id()) {
            return Ok(pool.clone());
        }
        let info = self
            .context()?
            .get_token_info(slot)
            .map_err(|e| failure("C_GetTokenInfo", e))?;
        let serial = matches!(info.max_session_count(), Limit::Max(1));
        let pool = Arc::new(Pool {
            idle: Mutex::new(Vec::new()),
            serial: serial.then(|| Mutex::new(())),
        });
        pools.insert(slot.id(), pool.clone());
        Ok(pool)
    }

    fn with_session<T>(
        &self,
        slot: Slot,
        mut operation: impl FnMut(&Session) -> Result<T, OpError>,
    ) -> Result<T, Failure> {
        let pool = self.pool(slot)?;
        let _serial = pool.serial.as_ref().map(lock);
        for attempt in 0..2 {
            let pooled = lock(&pool.idle).pop();
            let session = match pooled {
                Some(session) => session,
                None => self
                    .context()?
                    .open_ro_session(slot)
                    .map_err(|e| failure("C_OpenSession", e))?,
            };
            match operation(&session) {
                Ok(value) => {
                    give_back(&pool, session);
                    return Ok(value);
                }
                Err(OpError::Ck(CkError::Pkcs11(
                    RvError::SessionHandleInvalid | RvError::SessionClosed,
                    _,
                ))) if attempt == 0 => {
                    // The module forgot our sessions (a token reinserted, a
                    // reader reset): start over with fresh ones.
                    drop(session);
                    lock(&pool.idle).clear();
                    self.forget_keys(slot.id());
                }
                Err(OpError::Ck(err)) => {
                    let failure = failure("", err);
                    if failure == Failure::DeviceRemoved {
                        drop(session);
                        lock(&pool.idle).clear();
                        lock(&self.pools).remove(&slot.id());
                        self.forget_keys(slot.id());
                    } else {
                        give_back(&pool, session);
                    }
                    return Err(failure);
                }
                Err(OpError::Failure(failure)) => {
                    give_back(&pool, session);
                    return Err(failure);
                }
                Err(OpError::Spoiled(failure)) => return Err(failure),
            }
        }
        Err(Failure::Module {
            function: "C_OpenSession".into(),
            message: "the module invalidated a fresh session".into(),
        })
    }
}

/// One signature's inputs, for [`Signing::sign`].
struct Signing<'a> {
    helper: &'a Helper,
    slot: Slot,
    scheme: Scheme,
    mechanism: CkMechanism<'static>,
    /// The raw mechanism's input.
    input: Vec<u8>,
    message: &'a [u8],
    context_secret: Option<SecretString>,
    context_pin_pad: bool,
}

impl Signing<'_> {
    fn sign(&self, session: &Session, key: PrivateKey) -> Result<Vec<u8>, OpError> {
        if !key.always_authenticate {
            return Ok(session.sign(&self.mechanism, key.handle, &self.input)?);
        }
        // CKA_ALWAYS_AUTHENTICATE: a context-specific login for this one
        // signature. The spec places it between C_SignInit and C_Sign, but
        // cryptoki's single-part sign makes both calls at once. So log in
        // first, as OpenSC's modules accept (verifying the PIN right before
        // the signature); modules that insist on the order (SoftHSM) answer
        // CKR_OPERATION_NOT_INITIALIZED without spending a try, and sign in
        // several parts after C_SignInit and the login, with the mechanism
        // that hashes for itself. Without such a mechanism (CKM_EDDSA signs
        // in one part only; SoftHSM has no CKM_ECDSA_SHA256) only a module
        // seen to take the login first can sign, and no module can be
        // asked which order it takes without a PIN: so elsewhere the key
        // fails before its PIN is asked, which would be for nothing.
        let in_parts = self.helper.signs_in_parts(self.slot, self.scheme);
        let login_first = *lock(&self.helper.login_before_init);
        if let (Err(why), false) = (&in_parts, login_first == Some(true)) {
            return Err(cannot_sign(why, "no PIN was asked").into());
        }
        if self.context_secret.is_none() && !self.context_pin_pad {
            return Err(Failure::ContextLoginRequired.into());
        }
        let secret = self.context_secret.as_ref();
        if login_first != Some(false) {
            match session.login(UserType::ContextSpecific, secret) {
                Ok(()) => {
                    *lock(&self.helper.login_before_init) = Some(true);
                    return Ok(session.sign(&self.mechanism, key.handle, &self.input)?);
                }
                Err(CkError::Pkcs11(RvError::OperationNotInitialized, _)) => {
                    *lock(&self.helper.login_before_init) = Some(false);
                }
                Err(err) => return Err(err.into()),
            }
        }
        // The module refused the login before C_SignInit without looking
        // at the PIN: no try was spent yet.
        const NOT_TRIED: &str = "the PIN was not tried";
        if let Err(why) = &in_parts {
            return Err(cannot_sign(why, NOT_TRIED).into());
        }
        let mechanism = multi_part(self.scheme);
        match session.sign_init(&mechanism, key.handle) {
            Ok(()) => {}
            Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => {
                let why = format!("the token has no {} mechanism", mechanism.mechanism_type());
                return Err(cannot_sign(&why, NOT_TRIED).into());
            }
            Err(err) => return Err(err.into()),
        }
        // A failure from here on leaves a signing operation active in the
        // session: it is closed, not reused.
        session
            .login(UserType::ContextSpecific, secret)
            .and_then(|()| session.sign_update(self.message))
            .and_then(|()| session.sign_final())
            .map_err(|err| OpError::Spoiled(failure("", err)))
    }
}

/// Why a key with CKA_ALWAYS_AUTHENTICATE cannot be signed with: `why`
/// it cannot be signed in parts, and what became of the PIN.
fn cannot_sign(why: &str, pin: &str) -> Failure {
    Failure::CannotSign(format!(
        "it has CKA_ALWAYS_AUTHENTICATE, and PKCS#11 takes its PIN after C_SignInit, which \
         token-agent can do only when signing in parts; {why} ({pin})"
    ))
}

fn initialize(path: &str) -> Result<Pkcs11, Failure> {
    let context = Pkcs11::new(path).map_err(|e| Failure::Load(e.to_string()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(context),
        Err(err) => Err(Failure::Load(err.to_string())),
    }
}

/// The raw mechanism for `scheme` and its input: a DigestInfo, a hash, or
/// the message itself for EdDSA.
fn single_part(scheme: Scheme, message: &[u8]) -> (CkMechanism<'static>, Vec<u8>) {
    match scheme {
        Scheme::RsaSha1 => (CkMechanism::RsaPkcs, RsaHash::Sha1.digest_info(message)),
        Scheme::RsaSha256 => (CkMechanism::RsaPkcs, RsaHash::Sha256.digest_info(message)),
        Scheme::RsaSha512 => (CkMechanism::RsaPkcs, RsaHash::Sha512.digest_info(message)),
        Scheme::EcdsaSha256 => (CkMechanism::Ecdsa, Sha256::digest(message).to_vec()),
        Scheme::EcdsaSha384 => (CkMechanism::Ecdsa, Sha384::digest(message).to_vec()),
        Scheme::EcdsaSha512 => (CkMechanism::Ecdsa, Sha512::digest(message).to_vec()),
        Scheme::Ed25519 => (eddsa(), message.to_vec()),
    }
}

/// The mechanism for `scheme` that hashes the message itself, for signing
/// in several parts.
fn multi_part(scheme: Scheme) -> CkMechanism<'static> {
    match scheme {
        Scheme::RsaSha1 => CkMechanism::Sha1RsaPkcs,
        Scheme::RsaSha256 => CkMechanism::Sha256RsaPkcs,
        Scheme::RsaSha512 => CkMechanism::Sha512RsaPkcs,
        Scheme::EcdsaSha256 => CkMechanism::EcdsaSha256,
        Scheme::EcdsaSha384 => CkMechanism::EcdsaSha384,
        Scheme::EcdsaSha512 => CkMechanism::EcdsaSha512,
        Scheme::Ed25519 => eddsa(),
    }
}

fn eddsa() -> CkMechanism<'static> {
    CkMechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure))
}

fn give_back(pool: &Pool, session: Session) {
    let mut idle = lock(&pool.idle);
    if idle.len() < POOL_SIZE {
        idle.push(session);
    }
}

/// A PKCS#11 text field as `ssh-add -l`, logs and prompts can show it.
/// PKCS#11 pads CK_TOKEN_INFO's fixed-width fields (label, manufacturer,
/// model, serial) with spaces, but some modules pad them with NULs, or end
/// them with one as a C string: NULs and whitespace go from both ends. A
/// control character left inside (a NUL, a newline) becomes U+FFFD, as an
/// invalid UTF-8 byte does: ssh-add refuses the whole listing when one
/// comment holds a NUL ("invalid format"), and a newline would make up
/// lines in logs and prompts.
fn text(field: &str) -> String {
    field
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

fn slot_of(id: u64) -> Result<Slot, Failure> {
    Slot::try_from(id).map_err(|_| Failure::Protocol(format!("slot {id} is out of range")))
}

/// The keys on a token: every public key and certificate object with a
/// CKA_ID, one per id (a certificate's comment wins over a bare public key:
/// its label usually names the person).
fn token_keys(session: &Session) -> Result<Vec<KeyInfo>, CkError> {
    let mut keys: Vec<KeyInfo> = Vec::new();
    let publics = session.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)])?;
    let certificates = session.find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])?;
    for (object, is_certificate) in publics
        .into_iter()
        .map(|o| (o, false))
        .chain(certificates.into_iter().map(|o| (o, true)))
    {
        match key_info(session, object, is_certificate) {
            Ok(Some(info)) => {
                if let Some(existing) = keys.iter_mut().find(|k| k.id == info.id) {
                    if is_certificate && existing.public_key == info.public_key {
                        existing.label = info.label;
                    }
                } else {
                    keys.push(info);
                }
            }
            Ok(None) => {}
            Err(reason) => eprintln!("token-agent pkcs11 helper: skipping an object: {reason}"),
        }
    }
    Ok(keys)
}

fn key_info(
    session: &Session,
    object: ObjectHandle,
    is_certificate: bool,
) -> Result<Option<KeyInfo>, String> {
    let wanted = if is_certificate {
        vec![
            AttributeType::Id,
            AttributeType::Label,
            AttributeType::Private,
            AttributeType::Value,
        ]
    } else {
        vec![
            AttributeType::Id,
            AttributeType::Label,
            AttributeType::Private,
            AttributeType::KeyType,
            AttributeType::Modulus,
            AttributeType::PublicExponent,
            AttributeType::EcParams,
            AttributeType::EcPoint,
        ]
    };
    let attributes = session
        .get_attributes(object, &wanted)
        .map_err(|e| e.to_string())?;
    let mut id = None;
    let mut label = String::new();
    let (mut modulus, mut exponent, mut params, mut point, mut value) =
        (None, None, None, None, None);
    let mut key_type = None;
    let mut private = false;
    for attribute in attributes {
        match attribute {
            Attribute::Id(v) => id = Some(v),
            Attribute::Label(v) => label = text(&String::from_utf8_lossy(&v)),
            Attribute::Private(v) => private = v,
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Modulus(v) => modulus = Some(v),
            Attribute::PublicExponent(v) => exponent = Some(v),
            Attribute::EcParams(v) => params = Some(v),
            Attribute::EcPoint(v) => point = Some(v),
            Attribute::Value(v) => value = Some(v),
            _ => {}
        }
    }
    // Without CKA_ID no private key can be matched to it.
    let Some(id) = id.filter(|id| !id.is_empty()) else {
        return Ok(None);
    };
    let public = if is_certificate {
        match value {
            Some(der) => keys::certificate(&der)?,
            None => return Ok(None),
        }
    } else {
        match (modulus, exponent, params, point) {
            (Some(n), Some(e), _, _) => keys::rsa(&n, &e)?,
            (_, _, Some(params), Some(point)) => keys::ec(&params, &point)?,
            _ => return Err(format!("unsupported public key type {key_type:?}")),
        }
    };
    let mut public_key = Vec::new();
    public
        .encode(&mut public_key)
        .map_err(|e| format!("cannot encode the key: {e}"))?;
    Ok(Some(KeyInfo {
        id,
        label,
        public_key,
        private,
    }))
}

fn private_key(session: &Session, key_id: &[u8]) -> Result<ObjectHandle, OpError> {
    let logged_out = |session: &Session| -> Result<bool, OpError> {
        let state = session.get_session_info()?.session_state();
        Ok(matches!(
            state,
            SessionState::RoPublic | SessionState::RwPublic
        ))
    };
    // Private objects stay hidden until the user logs in. The login state
    // is the token's, shared by every session: another lane may log in
    // while this one searches, so it is read before the search as well as
    // after. A key not found while logged out is a login to do, not a key
    // that is gone.
    let before = logged_out(session)?;
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Id(key_id.to_vec()),
    ])?;
    if let Some(key) = found.first() {
        return Ok(*key);
    }
    if before || logged_out(session)? {
        Err(Failure::NotLoggedIn.into())
    } else {
        Err(Failure::KeyNotFound.into())
    }
}

fn always_authenticate(session: &Session, key: ObjectHandle) -> bool {
    session
        .get_attributes(key, &[AttributeType::AlwaysAuthenticate])
        .map(|attributes| {
            attributes
                .iter()
                .any(|a| matches!(a, Attribute::AlwaysAuthenticate(true)))
        })
        .unwrap_or(false)
}

fn failure(function: &str, err: CkError) -> Failure {
    match err {
        CkError::Pkcs11(rv, called) => match rv {
            RvError::UserNotLoggedIn => Failure::NotLoggedIn,
            RvError::PinIncorrect | RvError::PinLenRange => {
                Failure::PinIncorrect(PinState::default())
            }
            RvError::PinLocked => Failure::PinLocked,
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid => Failure::DeviceRemoved,
            rv => Failure::Module {
                function: if function.is_empty() {
                    format!("C_{called:?}")
                } else {
                    function.to_owned()
                },
                message: format!("{rv:?}"),
            },
        },
        other => Failure::Module {
            function: function.to_owned(),
            message: other.to_string(),
        },
    }
}

impl From<CkError> for Failure {
    fn from(err: CkError) -> Self {
        failure("", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_input_is_a_digest_info() {
        for (scheme, hash) in [
            (Scheme::RsaSha1, RsaHash::Sha1),
            (Scheme::RsaSha256, RsaHash::Sha256),
            (Scheme::RsaSha512, RsaHash::Sha512),
        ] {
            let (mechanism, input) = single_part(scheme, b"abc");
            assert!(matches!(mechanism, CkMechanism::RsaPkcs));
            assert_eq!(input, hash.digest_info(b"abc"));
        }
    }

    #[test]
    fn ecdsa_input_is_the_curve_hash() {
        for (scheme, len) in [
            (Scheme::EcdsaSha256, 32),
            (Scheme::EcdsaSha384, 48),
            (Scheme::EcdsaSha512, 64),
        ] {
            let (mechanism, input) = single_part(scheme, b"abc");
            assert!(matches!(mechanism, CkMechanism::Ecdsa));
            assert_eq!(input.len(), len);
        }
        let (_, input) = single_part(Scheme::Ed25519, b"abc");
        assert_eq!(input, b"abc");
    }

    #[test]
    fn text_fields_lose_nul_and_space_padding_and_control_characters() {
        assert_eq!(text("alice\0\0\0\0"), "alice");
        assert_eq!(text("alice   \0\0 "), "alice");
        assert_eq!(text("  SoftHSM v2  "), "SoftHSM v2");
        assert_eq!(text("a\0b\nc\x1bd"), "a\u{fffd}b\u{fffd}c\u{fffd}d");
        assert_eq!(text("ключ"), "ключ");
        assert_eq!(text("\0\0\0"), "");
    }
}
