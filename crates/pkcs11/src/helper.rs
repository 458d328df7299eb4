//! The helper process: `token-agent --pkcs11-helper` runs one PKCS#11 module
//! and answers the agent's [`Request`]s on standard input and output.
//!
//! The module's code runs only here, so when it crashes, hangs or scribbles
//! over memory, the agent loses a child it can restart, not itself or its
//! secrets. Each request is served on a thread of its own, so one signature
//! that waits for a PIN pad (or a module that hangs in `C_Sign`) does not hold
//! up listing or signing with another key.
//!
//! Sessions come from a small pool per slot: tokens that take several
//! sessions (SoftHSM does) sign in parallel, one session per concurrent
//! request; tokens that take one are used serially. A session the module
//! reports as gone (CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED) is
//! dropped and the operation tried once more on a fresh one.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter};
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Limit, Slot};
use secrecy::SecretString;
use ssh_encoding::Encode;

use crate::keys;
use crate::proto::{
    read_frame, write_frame, Failure, KeyInfo, Mechanism, Op, Pin, PinState, Reply, Request,
    Response, TokenState, EVENT_ID,
};

/// Idle sessions kept per slot.
const POOL_SIZE: usize = 16;

/// Serves requests on standard input until it closes, then exits the process
/// (threads stuck in a hung module are not waited for).
pub fn run() -> ! {
    let helper = Arc::new(Helper::default());
    let mut input = BufReader::new(io::stdin().lock());
    loop {
        match read_frame::<Request>(&mut input) {
            Ok(Some(request)) => {
                let helper = helper.clone();
                std::thread::spawn(move || {
                    let result = helper.handle(request.op);
                    helper.send(&Response {
                        id: request.id,
                        result,
                    });
                });
            }
            Ok(None) => std::process::exit(0),
            Err(err) => {
                eprintln!("token-agent pkcs11 helper: bad request from the agent: {err}");
                std::process::exit(2);
            }
        }
    }
}

#[derive(Default)]
struct Helper {
    context: Mutex<Option<Pkcs11>>,
    path: Mutex<Option<String>>,
    pools: Mutex<HashMap<u64, Arc<Pool>>>,
    output: Mutex<Option<BufWriter<io::Stdout>>>,
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
    fn send(&self, response: &Response) {
        let mut output = lock(&self.output);
        let out = output.get_or_insert_with(|| BufWriter::new(io::stdout()));
        if write_frame(out, response).is_err() {
            // The agent is gone: nothing left to serve.
            std::process::exit(0);
        }
    }

    fn handle(self: &Arc<Self>, op: Op) -> Result<Reply, Failure> {
        match op {
            Op::Load { path } => self.load(&path),
            Op::List => self.list().map(Reply::Tokens),
            Op::Rescan => self.rescan().map(Reply::Tokens),
            Op::Login { slot, pin } => self.login(slot, pin.as_ref()).map(|()| Reply::Done),
            Op::Logout => {
                self.logout();
                Ok(Reply::Done)
            }
            Op::Sign {
                slot,
                key_id,
                mechanism,
                data,
                context_pin,
                context_pin_pad,
            } => self
                .sign(
                    slot,
                    &key_id,
                    mechanism,
                    &data,
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

    fn rescan(&self) -> Result<Vec<TokenState>, Failure> {
        let path = lock(&self.path)
            .clone()
            .ok_or_else(|| Failure::Protocol("no module loaded".into()))?;
        lock(&self.pools).clear();
        if let Some(old) = lock(&self.context).take() {
            let _ = old.finalize();
        }
        *lock(&self.context) = Some(initialize(&path)?);
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
            label: info.label().trim().to_owned(),
            serial: info.serial_number().trim().to_owned(),
            model: info.model().trim().to_owned(),
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
        mechanism: Mechanism,
        data: &[u8],
        context_pin: Option<&Pin>,
        context_pin_pad: bool,
    ) -> Result<Vec<u8>, Failure> {
        let mechanism = match mechanism {
            Mechanism::RsaPkcs => CkMechanism::RsaPkcs,
            Mechanism::Ecdsa => CkMechanism::Ecdsa,
            Mechanism::Eddsa => CkMechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        };
        let context_secret = context_pin.map(|p| SecretString::from(p.expose().to_owned()));
        let result = self.with_session(slot_of(slot)?, |session| {
            let key = private_key(session, key_id)?;
            if !always_authenticate(session, key) {
                return Ok(session.sign(&mechanism, key, data)?);
            }
            if context_secret.is_none() && !context_pin_pad {
                return Err(Failure::ContextLoginRequired.into());
            }
            // CKA_ALWAYS_AUTHENTICATE: a context-specific login for this one
            // signature. The spec places it between C_SignInit and C_Sign;
            // cryptoki's single-part sign makes both calls, so log in first
            // (as OpenSC's modules accept, verifying the PIN right away) and
            // fall back to init, login and a multi-part sign for modules that
            // insist on the order.
            match session.login(UserType::ContextSpecific, context_secret.as_ref()) {
                Ok(()) => Ok(session.sign(&mechanism, key, data)?),
                Err(CkError::Pkcs11(RvError::OperationNotInitialized, _)) => {
                    session.sign_init(&mechanism, key)?;
                    session.login(UserType::ContextSpecific, context_secret.as_ref())?;
                    session.sign_update(data)?;
                    Ok(session.sign_final()?)
                }
                Err(err) => Err(err.into()),
            }
        });
        match result {
            Err(Failure::PinIncorrect(_)) => Err(Failure::PinIncorrect(self.pin_state(slot))),
            other => other,
        }
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
                }
                Err(OpError::Ck(err)) => {
                    let failure = failure("", err);
                    if failure == Failure::DeviceRemoved {
                        drop(session);
                        lock(&pool.idle).clear();
                        lock(&self.pools).remove(&slot.id());
                    } else {
                        give_back(&pool, session);
                    }
                    return Err(failure);
                }
                Err(OpError::Failure(failure)) => {
                    give_back(&pool, session);
                    return Err(failure);
                }
            }
        }
        Err(Failure::Module {
            function: "C_OpenSession".into(),
            message: "the module invalidated a fresh session".into(),
        })
    }
}

fn initialize(path: &str) -> Result<Pkcs11, Failure> {
    let context = Pkcs11::new(path).map_err(|e| Failure::Load(e.to_string()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(context),
        Err(err) => Err(Failure::Load(err.to_string())),
    }
}

fn give_back(pool: &Pool, session: Session) {
    let mut idle = lock(&pool.idle);
    if idle.len() < POOL_SIZE {
        idle.push(session);
    }
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
            AttributeType::Value,
        ]
    } else {
        vec![
            AttributeType::Id,
            AttributeType::Label,
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
    for attribute in attributes {
        match attribute {
            Attribute::Id(v) => id = Some(v),
            Attribute::Label(v) => label = String::from_utf8_lossy(&v).trim().to_owned(),
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
    }))
}

fn private_key(session: &Session, key_id: &[u8]) -> Result<ObjectHandle, OpError> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Id(key_id.to_vec()),
    ])?;
    if let Some(key) = found.first() {
        return Ok(*key);
    }
    // Private objects stay hidden until the user logs in.
    let state = session.get_session_info()?.session_state();
    if matches!(state, SessionState::RoPublic | SessionState::RwPublic) {
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
                    format!("C_{called}")
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (session lists), still fit for use.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl From<CkError> for Failure {
    fn from(err: CkError) -> Self {
        failure("", err)
    }
}
