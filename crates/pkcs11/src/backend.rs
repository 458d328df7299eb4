//! [`Pkcs11Backend`]: the [`Backend`] over PKCS#11 modules, each in a helper process.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rustc_hash::FxHashMap;
use secrecy::{ExposeSecret, SecretString};
use ssh_encoding::Decode;
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, EcdsaCurve};
use token_agent_core::{
    lock, Backend, DeviceInfo, DeviceStatus, Error, Identity, IdentitySink, KeyRef, Notice,
    NoticeKind, PinAttempts, PinRequest, PromptSubject, Prompter, ProviderRequest, RsaHash,
    SignContext, SignRequest, SshSignature, Ticket,
};

use crate::client::{CallError, Helper, HelperCommand, LanePolicy, Stop, MAX_LANES};
use crate::proto::{Failure, KeyInfo, Op, Pin, PinState, Reply, Scheme, TokenState};

/// The backend's name, in every [`KeyRef`] it issues.
pub const NAME: &str = "pkcs11";

/// How long a scanner may take to exit once it has listed.
const SCANNER_EXIT: Duration = Duration::from_secs(1);

/// How long cached PINs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinCache {
    /// Never keep a PIN: ask again whenever the token needs a login.
    Never,
    /// Keep a PIN until the agent is locked or told to forget (SIGHUP), or
    /// until it has not been used for the given time.
    Idle(Option<Duration>),
}

/// Where a configured module's PIN comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinSource {
    /// Ask the person (pinentry or SSH_ASKPASS) when a signature needs a login.
    Prompt,
    /// Never log in: the module's keys are usable without a login.
    None,
}

/// A module named in the configuration.
#[derive(Debug, Clone)]
pub struct ModuleConfig {
    /// The module's path (the configuration is trusted: no allowlist check).
    pub path: String,
    /// Where its PIN comes from.
    pub pin: PinSource,
}

/// How the backend runs.
#[derive(Debug, Clone)]
pub struct Pkcs11Options {
    /// How to start a helper process.
    pub helper: HelperCommand,
    /// Modules loaded at start.
    pub modules: Vec<ModuleConfig>,
    /// The PIN cache policy.
    pub pin_cache: PinCache,
    /// The time limit of a helper call (load, list, login, sign).
    pub call_timeout: Duration,
    /// The time limit while the token waits for a person at a PIN pad.
    pub pin_pad_timeout: Duration,
    /// How often tokens are looked for when the module cannot report slot events.
    pub poll_interval: Duration,
    /// The most signatures one module makes at once, each on a thread of
    /// the module's helper (a lane); 0 (the default) means as many as
    /// clients ask for at once, up to 64. One client's signatures keep to
    /// one thread; more threads open only while every open one is busy, so
    /// a token computing on this machine's CPUs (SoftHSM) signs on all of
    /// them, and a module that hangs in some calls still serves the others.
    /// Past the limit a request waits behind another. Measured with
    /// pkcs11-bench (SoftHSM, P-256, 8 clients, 2 CPUs), against no limit:
    /// 4 threads 0.96x, 2 threads 0.84x the signatures per second.
    pub parallel_signatures: u32,
    /// How long a helper's extra threads (all but the first) wait for a
    /// request before they end. Default: 10 s.
    pub lane_idle: Duration,
}

impl Pkcs11Options {
    /// Defaults: no modules, PINs cached until lock, 30 s per call, 5 min
    /// for a PIN pad, polling every 2 s, as many signatures at once as
    /// clients ask for, extra helper threads ending after 10 s idle.
    pub fn new(helper: HelperCommand) -> Self {
        Self {
            helper,
            modules: Vec::new(),
            pin_cache: PinCache::Idle(None),
            call_timeout: Duration::from_secs(30),
            pin_pad_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(2),
            parallel_signatures: 0,
            lane_idle: Duration::from_secs(10),
        }
    }
}

/// The PKCS#11 backend.
pub struct Pkcs11Backend {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("modules", &lock(&self.inner.modules).len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    options: Pkcs11Options,
    modules: Mutex<Vec<Arc<Module>>>,
    sink: OnceLock<IdentitySink>,
    /// The runtime that reads helpers' answers (the one `start` ran on).
    runtime: OnceLock<tokio::runtime::Handle>,
    pins: Mutex<FxHashMap<TokenId, CachedPin>>,
    /// One login at a time per token (see [`LoginGate`]).
    logins: Mutex<FxHashMap<TokenId, Arc<LoginGate>>>,
    wake: (Mutex<bool>, Condvar),
}

/// Signatures that find their token logged out log in one at a time: the
/// first asks for the PIN and logs in, and those that waited behind it take
/// the outcome of that attempt instead of asking again. Without it, every
/// signature that arrived before the first login finished asked the person
/// for the PIN and logged in again (eight clients at once: eight PIN
/// questions), and after a wrong PIN or a Cancel each of them asked again:
/// a burst of requests could spend every try the card has.
#[derive(Default)]
struct LoginGate {
    /// Held while a login is tried.
    turn: tokio::sync::Mutex<()>,
    /// How the logins tried through this gate ended.
    attempts: PinAttempts,
}

impl LoginGate {
    /// Logs in with `login` unless an attempt was made since `ticket` was
    /// taken; then that attempt's outcome is the caller's.
    async fn log_in<F>(&self, ticket: Ticket, login: F) -> Result<(), Error>
    where
        F: std::future::Future<Output = Result<(), Error>>,
    {
        let _turn = self.turn.lock().await;
        if let Some(outcome) = self.attempts.since(ticket) {
            return outcome;
        }
        let outcome = login.await;
        self.attempts.record(&outcome);
        outcome
    }
}

/// A token, as the agent names it across slot renumbering: module, serial, label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenId {
    module: String,
    serial: String,
    label: String,
}

struct CachedPin {
    pin: SecretString,
    used: Instant,
}

/// A token present, with the id its cached PIN goes by and its login gate,
/// both found once when it is listed rather than at each signature.
struct Token {
    state: TokenState,
    id: TokenId,
    gate: Arc<LoginGate>,
}

impl std::ops::Deref for Token {
    type Target = TokenState;

    fn deref(&self) -> &TokenState {
        &self.state
    }
}

struct Module {
    path: String,
    runtime: bool,
    pin: PinSource,
    helper: Mutex<Option<Arc<Helper>>>,
    /// Whether the module reports slot events itself.
    slot_events: AtomicBool,
    /// The tokens present, each shared with the signatures that use it
    /// (a signature looks its token up without copying it).
    tokens: Mutex<Vec<Arc<Token>>>,
    /// Keys (by [`KeyRef`] handle) of a module loaded with `ssh-add -s` that
    /// a client removed (`ssh-add -d`) or whose lifetime (`ssh-add -t`) ran
    /// out. OpenSSH drops such keys from its table while the provider stays
    /// loaded; they stay hidden until the provider is loaded again.
    removed: Mutex<HashSet<Vec<u8>>>,
    /// Tokens of a module loaded with `ssh-add -s` that refused its PIN,
    /// and how. As OpenSSH's ssh-agent skips them, their keys are not
    /// offered (and so their PIN is never tried again) until the provider
    /// is loaded again.
    refused: Mutex<FxHashMap<TokenId, String>>,
    /// Keys whose public key or certificate objects are private, by token,
    /// in the order first seen. A token shows them only while logged in,
    /// so they would vanish at each logout (a lock, SIGHUP, an expired
    /// PIN, a helper restart) and stay away until a signature logged in,
    /// which needs a listed key. Like OpenSSH's agent, which keeps what it
    /// found at load time, they stay listed until their token goes or the
    /// module is unloaded; signing with one logs in again.
    seen: Mutex<FxHashMap<TokenId, Vec<KeyInfo>>>,
    /// Held by a logout in flight ([`Backend::forget_secrets`] does not wait
    /// for it): every call waits for it first, so no signature after a lock
    /// or SIGHUP can use the old login.
    logout: Arc<tokio::sync::Mutex<()>>,
    unloaded: AtomicBool,
    /// Calls waiting for a person at the PIN pad of a token that takes one
    /// session at a time (see [`Module::waiting_at_pad`]).
    pad_waits: AtomicUsize,
}

/// A call waiting at a PIN pad, counted in [`Module::pad_waits`] while it lives.
struct PadWait<'a>(&'a AtomicUsize);

impl Drop for PadWait<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a key is.
struct Located {
    module: Arc<Module>,
    token: Arc<Token>,
    /// The key's index in `token.keys`.
    key: usize,
    /// The key's algorithm, from its public key's leading name: all that a
    /// signature needs of it (prompts decode the whole key).
    algorithm: Algorithm,
}

impl Located {
    fn key(&self) -> &KeyInfo {
        &self.token.keys[self.key]
    }
}

impl Pkcs11Backend {
    /// A backend with `options`; nothing runs until [`Backend::start`].
    pub fn new(options: Pkcs11Options) -> Self {
        let modules = options
            .modules
            .iter()
            .map(|m| Arc::new(Module::new(m.path.clone(), false, m.pin)))
            .collect();
        Self {
            inner: Arc::new(Inner {
                options,
                modules: Mutex::new(modules),
                sink: OnceLock::new(),
                runtime: OnceLock::new(),
                pins: Mutex::default(),
                logins: Mutex::default(),
                wake: (Mutex::new(false), Condvar::new()),
            }),
        }
    }
}

impl Drop for Pkcs11Backend {
    fn drop(&mut self) {
        for module in lock(&self.inner.modules).drain(..) {
            module.unload("the agent stopped");
        }
        self.inner.wake();
    }
}

#[async_trait]
impl Backend for Pkcs11Backend {
    fn name(&self) -> &str {
        NAME
    }

    fn start(&self, sink: IdentitySink) {
        sink.publish(Vec::new());
        let _ = self.inner.sink.set(sink);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let _ = self.inner.runtime.set(runtime);
        }
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("pkcs11-watch".into())
            .spawn(move || watch(&weak));
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the PKCS#11 token watcher");
        }
    }

    async fn sign(
        &self,
        key: &KeyRef,
        request: &SignRequest,
        context: &SignContext,
        prompter: Arc<dyn Prompter>,
    ) -> Result<SshSignature, Error> {
        let located = self.inner.locate(key)?;
        let (scheme, finish) = prepare(&located.algorithm, request)?;
        // Only a PIN prompt or a PIN-pad notice shows it: most signatures
        // need neither, and the fingerprint is a hash of the decoded key.
        let subject = || {
            PromptSubject {
                key: Some(comment(&located.token, &located.key().label)),
                fingerprint: KeyData::decode(&mut located.key().public_key.as_slice())
                    .ok()
                    .map(|public| token_agent_core::fingerprint(&public, ssh_key::HashAlg::Sha256)),
                device: Some(device(&located.token)),
                ..PromptSubject::default()
            }
            .with_context(context)
        };
        let inner = &self.inner;
        let (token, gate) = (&located.token.id, &located.token.gate);
        let mut logged_in = false;
        let mut context_pin: Option<(Option<SecretString>, bool)> = None;
        loop {
            let ticket = gate.attempts.ticket();
            let (pin, pad) = match &context_pin {
                Some((pin, pad)) => (
                    pin.as_ref().map(|p| Pin::new(p.expose_secret().to_owned())),
                    *pad,
                ),
                None => (None, false),
            };
            let limit = if pad {
                inner.options.pin_pad_timeout
            } else {
                inner.options.call_timeout
            };
            let _pad_wait = pad
                .then(|| located.module.waiting_at_pad(&located.token))
                .flatten();
            let _notice = pad.then(|| {
                prompter.notify(&Notice {
                    kind: NoticeKind::PinPad,
                    subject: subject(),
                })
            });
            let op = Op::Sign {
                slot: located.token.slot,
                key_id: located.key().id.clone(),
                scheme,
                message: request.data.clone(),
                context_pin: pin,
                context_pin_pad: pad,
            };
            match inner.call(&located.module, op, limit).await {
                Ok(Reply::Signature(raw)) => {
                    inner.touch_pin(token);
                    return finish.signature(&raw).ok_or_else(|| Error::Device {
                        device: device(&located.token),
                        message: "the module returned a malformed signature".into(),
                    });
                }
                Ok(other) => {
                    return Err(Error::Device {
                        device: device(&located.token),
                        message: format!("unexpected answer from the helper: {other:?}"),
                    })
                }
                // The login paths' futures are boxed: inline, they would
                // make every signature's future (allocated and copied per
                // request) several times larger for what few signatures do.
                Err(CallError::Failed(Failure::NotLoggedIn)) if !logged_in => {
                    Box::pin(gate.log_in(
                        ticket,
                        inner.login(&located.module, &located.token, &subject(), &*prompter),
                    ))
                    .await?;
                    logged_in = true;
                }
                Err(CallError::Failed(Failure::ContextLoginRequired)) if context_pin.is_none() => {
                    context_pin = Some(if located.token.protected_auth_path {
                        (None, true)
                    } else {
                        // CKA_ALWAYS_AUTHENTICATE asks for the person
                        // at every signature: that is what the attribute
                        // is for, so the cached PIN is not used for it.
                        let (pin, _) = Box::pin(inner.pin_for(
                            &located.module,
                            &located.token,
                            &subject(),
                            &*prompter,
                            false,
                        ))
                        .await?;
                        (Some(pin), false)
                    });
                }
                Err(err) => {
                    return Err(inner.error(&located.module, &located.token, "C_Sign", err));
                }
            }
        }
    }

    fn accepts_providers(&self) -> bool {
        true
    }

    async fn add_provider(&self, request: ProviderRequest) -> Result<Vec<Identity>, Error> {
        let inner = self.inner.clone();
        let path = request.provider.clone();
        if inner.module(&path).is_some() {
            return Err(Error::Refused {
                reason: format!("the PKCS#11 provider {path} is already loaded"),
            });
        }
        let module = Arc::new(Module::new(path.clone(), true, PinSource::Prompt));
        let tokens = {
            let (inner, module) = (inner.clone(), module.clone());
            blocking(move || inner.refresh(&module)).await
        };
        let tokens = match tokens {
            Ok(tokens) => tokens,
            Err(message) => {
                inner.abandon(&module, ADD_FAILED);
                return Err(Error::Device {
                    device: DeviceInfo::new(format!("PKCS#11 module {path}")),
                    message,
                });
            }
        };
        // As OpenSSH's ssh-agent: each token that needs a login is logged
        // in once with the PIN, and a token that refuses it (a different
        // PIN, a blocked one, any C_Login failure) is skipped, not tried
        // again, while the other tokens' keys load. The add fails when it
        // skipped a token and no key is left to load.
        let mut refusals = Vec::new();
        let mut opened = false;
        if let Some(pin) = &request.pin {
            for token in tokens.iter().filter(|t| t.login_required) {
                let login = inner.login_with(&module, token, Some(pin.clone())).await;
                opened |= login.is_ok();
                if let Err(err) = login {
                    tracing::info!(
                        provider = path,
                        token = token.label,
                        serial = token.serial,
                        %err,
                        "the PIN of ssh-add -s did not open this PKCS#11 token; its keys are not loaded"
                    );
                    lock(&module.refused).insert(token_id(&module, token), err.to_string());
                    refusals.push(err);
                }
            }
        }
        // Keys whose objects are private (pkcs11-tool --keypairgen
        // --private) show only to a token logged in: listed again, they are
        // in this reply, as OpenSSH logs in before it looks for keys.
        if opened {
            let relisted = {
                let (inner, module) = (inner.clone(), module.clone());
                blocking(move || inner.refresh(&module)).await
            };
            if let Err(message) = relisted {
                inner.abandon(&module, ADD_FAILED);
                return Err(Error::Device {
                    device: DeviceInfo::new(format!("PKCS#11 module {path}")),
                    message,
                });
            }
        }
        if let Some(first) = refusals.into_iter().next() {
            if inner.identities(&module).is_empty() {
                inner.abandon(&module, ADD_FAILED);
                return Err(first);
            }
        }
        lock(&inner.modules).push(module.clone());
        inner.publish();
        tracing::info!(
            provider = path,
            tokens = tokens.len(),
            "loaded PKCS#11 provider"
        );
        Ok(inner.identities(&module))
    }

    async fn remove_provider(&self, provider: &str) -> Result<(), Error> {
        let module = self.inner.module(provider).ok_or_else(|| Error::Refused {
            reason: format!("the PKCS#11 provider {provider} is not loaded"),
        })?;
        if !module.runtime {
            return Err(Error::Refused {
                reason: format!(
                    "the PKCS#11 provider {provider} comes from the configuration; remove it there"
                ),
            });
        }
        self.inner.unload(&module, "ssh-add -e");
        Ok(())
    }

    async fn remove_key(&self, key: &KeyRef) -> Result<(), Error> {
        let [path, ..] = parse_key_ref(key.handle()).ok_or(Error::KeyNotFound)?;
        let module = self.inner.module_at(path).ok_or(Error::KeyNotFound)?;
        if !module.runtime {
            return Err(Error::Refused {
                reason: format!(
                    "this key is on a token of the PKCS#11 module {}, which comes from \
                     the configuration; remove the module there",
                    module.path
                ),
            });
        }
        if !lock(&module.removed).insert(key.handle().to_vec()) {
            return Err(Error::KeyNotFound);
        }
        self.inner.publish();
        Ok(())
    }

    async fn remove_all(&self) {
        let runtime: Vec<Arc<Module>> = lock(&self.inner.modules)
            .iter()
            .filter(|m| m.runtime)
            .cloned()
            .collect();
        for module in runtime {
            self.inner.unload(&module, "ssh-add -D, or SIGUSR1");
        }
    }

    fn devices(&self) -> Vec<DeviceStatus> {
        let modules: Vec<Arc<Module>> = lock(&self.inner.modules).clone();
        let pins = lock(&self.inner.pins);
        let mut devices = Vec::new();
        for module in modules {
            let origin = if module.runtime {
                "loaded with ssh-add -s"
            } else {
                "from the configuration"
            };
            let tokens = lock(&module.tokens).clone();
            if tokens.is_empty() {
                devices.push(DeviceStatus {
                    label: format!("PKCS#11 module {}", module.path),
                    details: vec![origin.to_owned(), "no token present".to_owned()],
                    problem: false,
                });
            }
            let refused = lock(&module.refused).clone();
            for token in tokens {
                let id = &token.id;
                let mut details = vec![
                    format!("module {} ({origin})", module.path),
                    match token.keys.len() {
                        1 => "1 key".to_owned(),
                        n => format!("{n} keys"),
                    },
                ];
                let refusal = refused.get(id);
                if let Some(reason) = refusal {
                    details.push(format!(
                        "refused the PIN of ssh-add -s ({reason}): its keys are not offered \
                         until the provider is loaded again"
                    ));
                }
                let problem = token.pin.locked || refusal.is_some();
                details.push(if token.pin.locked {
                    "PIN blocked; unblock it with the token's SO PIN".to_owned()
                } else if token.pin.final_try {
                    "PIN: 1 try left before it blocks".to_owned()
                } else if token.pin.count_low {
                    "PIN: a wrong PIN was entered since the last good one".to_owned()
                } else {
                    "PIN: no wrong tries reported".to_owned()
                });
                details.push(if !token.login_required {
                    "no login needed".to_owned()
                } else if pins.contains_key(id) {
                    "logged in, PIN cached".to_owned()
                } else {
                    "login asked at the next signature".to_owned()
                });
                if token.protected_auth_path {
                    details.push("PIN entered on the reader's PIN pad".to_owned());
                }
                devices.push(DeviceStatus {
                    label: device(&token).label().to_owned(),
                    details,
                    problem,
                });
            }
        }
        devices
    }

    fn forget_secrets(&self) {
        lock(&self.inner.pins).clear();
        let modules: Vec<Arc<Module>> = lock(&self.inner.modules).clone();
        let limit = self.inner.options.call_timeout;
        for module in modules {
            if let Some(helper) = module.live_helper() {
                // Log out, so the next signature asks again. Called from a
                // request (lock) or a signal handler on the async runtime: the
                // logout must not block it, so it runs beside it.
                match self.inner.runtime.get() {
                    Some(runtime) => {
                        // Taken now, released when the logout is done.
                        let pending = module.logout.clone().try_lock_owned().ok();
                        runtime.spawn(async move {
                            let _pending = pending;
                            if let Err(err) = helper.call_async(Op::Logout, limit).await {
                                tracing::warn!(error = ?err, "could not log out of a PKCS#11 token");
                            }
                        });
                    }
                    None => {
                        let spawned = std::thread::Builder::new()
                            .name("pkcs11-logout".into())
                            .spawn(move || helper.call(Op::Logout, limit));
                        if let Err(err) = spawned {
                            tracing::warn!(%err, "cannot start a thread to log out");
                        }
                    }
                }
            }
        }
        tracing::info!("forgot cached PKCS#11 PINs and logging out of the tokens");
    }
}

impl Module {
    fn new(path: String, runtime: bool, pin: PinSource) -> Self {
        Self {
            path,
            runtime,
            pin,
            helper: Mutex::new(None),
            slot_events: AtomicBool::new(false),
            tokens: Mutex::new(Vec::new()),
            removed: Mutex::new(HashSet::new()),
            refused: Mutex::default(),
            seen: Mutex::default(),
            logout: Arc::new(tokio::sync::Mutex::new(())),
            unloaded: AtomicBool::new(false),
            pad_waits: AtomicUsize::new(0),
        }
    }

    /// Counts a call that waits for the person at the PIN pad of `token`
    /// (a login, or a signature's context login) until the guard drops, if
    /// the token takes one session at a time. The helper then holds that
    /// one session for as long as the person takes (up to
    /// `pin_pad_timeout`), and every other call that needs it, a listing
    /// included, waits behind: such a wait is not a hang.
    fn waiting_at_pad(&self, token: &TokenState) -> Option<PadWait<'_>> {
        if token.parallel {
            return None;
        }
        self.pad_waits.fetch_add(1, Ordering::SeqCst);
        Some(PadWait(&self.pad_waits))
    }

    /// Whether a call waits at the PIN pad of a one-session token.
    fn at_pad(&self) -> bool {
        self.pad_waits.load(Ordering::SeqCst) > 0
    }

    /// Remembers the private keys each of `tokens` shows (see
    /// [`Module::seen`]) and lists those it showed before with it: the
    /// other keys first, in the module's order, then the private ones in
    /// the order first seen, so the list keeps its order across logins.
    /// Forgets the tokens not listed.
    fn remember(&self, tokens: &mut [TokenState]) {
        let mut seen = lock(&self.seen);
        seen.retain(|id, _| {
            tokens
                .iter()
                .any(|t| t.serial == id.serial && t.label == id.label)
        });
        for token in tokens {
            let fresh = std::mem::take(&mut token.keys);
            let kept = seen.entry(token_id(self, token)).or_default();
            for key in fresh.iter().filter(|k| k.private) {
                match kept.iter_mut().find(|k| k.id == key.id) {
                    Some(known) => *known = key.clone(),
                    None => kept.push(key.clone()),
                }
            }
            token.keys = fresh
                .into_iter()
                .filter(|k| !kept.iter().any(|known| known.id == k.id))
                .collect();
            token.keys.extend(kept.iter().cloned());
        }
        seen.retain(|_, kept| !kept.is_empty());
    }

    fn live_helper(&self) -> Option<Arc<Helper>> {
        lock(&self.helper).clone().filter(|h| !h.is_dead())
    }

    /// Stops the module's helper and forgets its tokens; `by` says what
    /// unloaded it (`ssh-add -e`), for the calls that were in it.
    fn unload(&self, by: &'static str) {
        self.unloaded.store(true, Ordering::SeqCst);
        if let Some(helper) = lock(&self.helper).take() {
            helper.stop(Stop::Unloaded(by));
        }
        lock(&self.tokens).clear();
    }
}

impl Inner {
    fn wake(&self) {
        let (flag, changed) = &self.wake;
        *lock(flag) = true;
        changed.notify_all();
    }

    fn module(&self, path: &str) -> Option<Arc<Module>> {
        self.module_at(path.as_bytes())
    }

    /// The module loaded from `path`, given as bytes (of a key's handle).
    fn module_at(&self, path: &[u8]) -> Option<Arc<Module>> {
        lock(&self.modules)
            .iter()
            .find(|m| m.path.as_bytes() == path)
            .cloned()
    }

    fn unload(&self, module: &Arc<Module>, by: &'static str) {
        lock(&self.modules).retain(|m| !Arc::ptr_eq(m, module));
        self.abandon(module, by);
        self.publish();
        tracing::info!(provider = module.path, "unloaded PKCS#11 provider");
    }

    /// Stops `module` and forgets the PINs cached for its tokens and their
    /// login gates: an `ssh-add -s` that failed after one token took its PIN
    /// must not leave that PIN behind for a later load of the same module.
    fn abandon(&self, module: &Module, by: &'static str) {
        module.unload(by);
        lock(&self.pins).retain(|token, _| token.module != module.path);
        lock(&self.logins).retain(|token, _| token.module != module.path);
    }

    /// The module's helper, started (and the module loaded) if it is not running.
    fn helper(self: &Arc<Self>, module: &Arc<Module>) -> Result<Arc<Helper>, String> {
        let mut slot = lock(&module.helper);
        if let Some(helper) = slot.as_ref().filter(|h| !h.is_dead()) {
            return Ok(helper.clone());
        }
        if module.unloaded.load(Ordering::SeqCst) {
            return Err("the module was unloaded".into());
        }
        let weak = Arc::downgrade(self);
        let lanes = LanePolicy {
            max: match self.options.parallel_signatures {
                0 => MAX_LANES,
                n => usize::try_from(n).unwrap_or(MAX_LANES),
            },
            idle: self.options.lane_idle,
        };
        let helper = Helper::spawn(&self.options.helper, self.runtime.get(), lanes, move || {
            if let Some(inner) = weak.upgrade() {
                inner.wake();
            }
        })
        .map_err(|e| {
            format!(
                "cannot start the PKCS#11 helper {}: {e}",
                self.options.helper.program.display()
            )
        })?;
        match helper.call(
            Op::Load {
                path: module.path.clone(),
            },
            self.options.call_timeout,
        ) {
            Ok(Reply::Loaded { slot_events }) => {
                module.slot_events.store(slot_events, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(err) => {
                helper.kill();
                return Err(describe_call(&module.path, "C_Initialize", &err, false));
            }
        }
        *slot = Some(helper.clone());
        Ok(helper)
    }

    /// Lists the module's tokens (blocking), stores them and publishes on change.
    fn refresh(self: &Arc<Self>, module: &Arc<Module>) -> Result<Vec<TokenState>, String> {
        let list = || {
            let helper = self.helper(module)?;
            match helper.call(Op::List, self.limit(module, self.options.call_timeout)) {
                Ok(Reply::Tokens(tokens)) => Ok(tokens),
                Ok(other) => Err((
                    false,
                    format!("unexpected answer from the helper: {other:?}"),
                )),
                Err(err) => Err((
                    true,
                    describe_call(&module.path, "C_GetSlotList", &err, false),
                )),
            }
            .map_err(|(restart, message)| {
                if restart {
                    let mut slot = lock(&module.helper);
                    if slot.as_ref().is_some_and(|h| Arc::ptr_eq(h, &helper)) {
                        slot.take();
                    }
                    drop(slot);
                    helper.stop(Stop::Restarted("listing its tokens failed".into()));
                }
                message
            })
        };
        // SoftHSM answers CKR_GENERAL_ERROR to every C_GetSlotList once a
        // token it had open was deleted; a module in such a state (or one
        // that crashed or hung while listing) gets one fresh helper, which
        // initializes it anew.
        let mut result = list().or_else(|message| {
            tracing::warn!(
                module = module.path,
                err = message,
                "listing tokens failed; restarting the module's helper"
            );
            list()
        });
        // A module without slot events may not see tokens made or inserted
        // after C_Initialize (SoftHSM sees none). A scanner helper that
        // initializes the module anew on each poll sees them; when its list
        // differs, the signing helper is replaced by a new one (logins are
        // redone with the cached PIN, or asked again).
        if let Ok(tokens) = &result {
            if !module.slot_events.load(Ordering::SeqCst) {
                if let Some(scanned) = self.scan(module) {
                    let differs = scanned.len() != tokens.len()
                        || scanned.iter().any(|s| !tokens.iter().any(|t| same(s, t)));
                    if differs {
                        tracing::info!(
                            module = module.path,
                            "the module's tokens changed; initializing it anew"
                        );
                        // Let go of the old helper rather than kill it: a
                        // token plugged in must not fail a signature. Each
                        // call in flight holds the helper until it is
                        // answered, and the helper ends (dropped, see
                        // `Helper`'s Drop) when the last one is done; calls
                        // from now on go to the new one.
                        drop(lock(&module.helper).take());
                        result = list();
                    }
                }
            }
        }
        if let Ok(tokens) = &mut result {
            module.remember(tokens);
        }
        let tokens = result.as_ref().cloned().unwrap_or_default();
        let changed = {
            let mut current = lock(&module.tokens);
            let changed = current.len() != tokens.len()
                || current.iter().zip(&tokens).any(|(c, n)| c.state != *n);
            if changed {
                for gone in current
                    .iter()
                    .filter(|t| !tokens.iter().any(|n| same(t, n)))
                {
                    tracing::info!(
                        token = gone.label,
                        serial = gone.serial,
                        module = module.path,
                        "PKCS#11 token removed"
                    );
                    lock(&self.pins).remove(&gone.id);
                }
                for new in tokens
                    .iter()
                    .filter(|n| !current.iter().any(|t| same(t, n)))
                {
                    tracing::info!(
                        token = new.label,
                        serial = new.serial,
                        module = module.path,
                        keys = new.keys.len(),
                        "PKCS#11 token present"
                    );
                }
                *current = tokens
                    .iter()
                    .map(|state| {
                        let id = token_id(module, state);
                        Arc::new(Token {
                            gate: self.login_gate(&id),
                            id,
                            state: state.clone(),
                        })
                    })
                    .collect();
            }
            changed
        };
        if changed && !module.unloaded.load(Ordering::SeqCst) {
            self.publish();
        }
        result
    }

    /// The tokens a freshly initialized module sees, or None if scanning
    /// fails. The scanner is a helper that exists only for the scan: it
    /// initializes the module, lists, and exits, so a module costs one
    /// resident process (its signing helper) between polls.
    fn scan(&self, module: &Module) -> Option<Vec<TokenState>> {
        let one = LanePolicy {
            max: 1,
            idle: self.options.lane_idle,
        };
        let scanner = match Helper::spawn(&self.options.helper, self.runtime.get(), one, || {}) {
            Ok(scanner) => scanner,
            Err(err) => {
                tracing::debug!(module = module.path, %err, "cannot start a scanner");
                return None;
            }
        };
        let scan = Op::Scan {
            path: module.path.clone(),
        };
        let result = scanner.call(scan, self.options.call_timeout);
        scanner.close(SCANNER_EXIT);
        match result {
            Ok(Reply::Tokens(tokens)) => Some(tokens),
            other => {
                tracing::debug!(module = module.path, ?other, "scanning the module failed");
                None
            }
        }
    }

    fn publish(&self) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        let modules: Vec<Arc<Module>> = lock(&self.modules).clone();
        let identities = modules.iter().flat_map(|m| self.identities(m)).collect();
        sink.publish(identities);
    }

    fn identities(&self, module: &Arc<Module>) -> Vec<Identity> {
        let tokens = lock(&module.tokens).clone();
        let removed = lock(&module.removed).clone();
        let refused = lock(&module.refused);
        let mut identities = Vec::new();
        for token in tokens.iter().filter(|t| !refused.contains_key(&t.id)) {
            for key in &token.keys {
                let Ok(public) = KeyData::decode(&mut key.public_key.as_slice()) else {
                    continue;
                };
                let key_ref = key_ref(module, token, &key.id);
                if removed.contains(key_ref.handle()) {
                    continue;
                }
                identities.push(
                    Identity::new(public, comment(token, &key.label), key_ref)
                        .with_device(device(token))
                        .with_provider(module.path.as_str()),
                );
            }
        }
        identities
    }

    fn locate(&self, key: &KeyRef) -> Result<Located, Error> {
        let [path, serial, label, id] = parse_key_ref(key.handle()).ok_or(Error::KeyNotFound)?;
        let module = self.module_at(path).ok_or(Error::KeyNotFound)?;
        if lock(&module.removed).contains(key.handle()) {
            return Err(Error::KeyNotFound);
        }
        let token = lock(&module.tokens)
            .iter()
            .find(|t| t.serial.as_bytes() == serial && t.label.as_bytes() == label)
            .cloned();
        if token
            .as_ref()
            .is_some_and(|t| lock(&module.refused).contains_key(&t.id))
        {
            return Err(Error::KeyNotFound);
        }
        let Some(token) = token else {
            let (label, serial) = (
                String::from_utf8_lossy(label),
                String::from_utf8_lossy(serial),
            );
            return Err(Error::DeviceRemoved {
                device: DeviceInfo::new(format!("{label} #{serial}")).with_serial(serial),
            });
        };
        let index = token
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or(Error::KeyNotFound)?;
        let algorithm = key_algorithm(&token.keys[index].public_key).ok_or(Error::KeyNotFound)?;
        Ok(Located {
            module,
            token,
            key: index,
            algorithm,
        })
    }

    /// The time limit of a call to `module` that would have `limit`: while
    /// a PIN pad of a one-session token waits for the person, a call may
    /// wait behind that login (see [`Module::waiting_at_pad`]) for up to
    /// the PIN-pad limit before its own time starts.
    fn limit(&self, module: &Module, limit: Duration) -> Duration {
        let pad = self.options.pin_pad_timeout;
        if module.at_pad() && limit < pad {
            pad.saturating_add(limit)
        } else {
            limit
        }
    }

    /// One helper call, restarting the helper after a crash or hang. A live
    /// helper is called straight from the task; starting or restarting one
    /// (a process spawn and C_Initialize) runs on a thread of its own.
    async fn call(
        self: &Arc<Self>,
        module: &Arc<Module>,
        op: Op,
        limit: Duration,
    ) -> Result<Reply, CallError> {
        drop(module.logout.lock().await);
        let limit = self.limit(module, limit);
        let helper = match module.live_helper() {
            Some(helper) => helper,
            None => {
                let (inner, module) = (self.clone(), module.clone());
                blocking(move || inner.helper(&module))
                    .await
                    .map_err(|message| CallError::Failed(Failure::Load(message)))?
            }
        };
        let result = helper.call_async(op, limit).await;
        // A module unloaded (ssh-add -e) is not started again: its calls
        // end with it.
        let restart = match &result {
            Err(CallError::Stopped(Stop::Unloaded(_))) => false,
            Err(CallError::Died(_) | CallError::TimedOut(_) | CallError::Stopped(_)) => {
                !module.unloaded.load(Ordering::SeqCst)
            }
            _ => false,
        };
        if restart {
            // Restart now, so the module's other keys keep working and
            // the error can say so.
            let (inner, module) = (self.clone(), module.clone());
            blocking(move || {
                let mut slot = lock(&module.helper);
                if slot.as_ref().is_some_and(|h| Arc::ptr_eq(h, &helper)) {
                    slot.take();
                }
                drop(slot);
                helper.kill();
                if let Err(err) = inner.helper(&module) {
                    // Unloaded meanwhile: no restart is wanted.
                    if module.unloaded.load(Ordering::SeqCst) {
                        return;
                    }
                    tracing::error!(
                        module = module.path,
                        err,
                        "cannot restart the PKCS#11 helper"
                    );
                }
                inner.wake();
            })
            .await;
        }
        result
    }

    /// The error for a failed call on `token`, logged when the helper died.
    fn error(&self, module: &Module, token: &TokenState, function: &str, err: CallError) -> Error {
        let device = device(token);
        match err {
            CallError::Failed(Failure::PinIncorrect(state)) => {
                lock(&self.pins).remove(&token_id(module, token));
                wrong_pin(device, state)
            }
            CallError::Failed(Failure::PinLocked) => Error::PinBlocked {
                device,
                remedy: PIN_REMEDY.into(),
            },
            CallError::Failed(Failure::DeviceRemoved) => {
                self.wake();
                Error::DeviceRemoved { device }
            }
            CallError::Failed(Failure::KeyNotFound) => Error::KeyNotFound,
            other => {
                let message = describe_call(&module.path, function, &other, true);
                match other {
                    CallError::Stopped(Stop::Unloaded(_)) => {
                        tracing::info!(token = token.label, "{message}");
                    }
                    CallError::Died(_) | CallError::TimedOut(_) | CallError::Stopped(_) => {
                        tracing::error!(token = token.label, "{message}");
                    }
                    CallError::Failed(_) => {}
                }
                Error::Device { device, message }
            }
        }
    }

    /// Logs in to `token`: on the PIN pad, or with a cached or asked PIN.
    async fn login(
        self: &Arc<Self>,
        module: &Arc<Module>,
        token: &TokenState,
        subject: &PromptSubject,
        prompter: &dyn Prompter,
    ) -> Result<(), Error> {
        if token.protected_auth_path {
            let _notice = prompter.notify(&Notice {
                kind: NoticeKind::PinPad,
                subject: subject.clone(),
            });
            tracing::info!(token = token.label, "enter the PIN on the reader's pad");
            return self.login_with(module, token, None).await;
        }
        let (pin, cached) = self.pin_for(module, token, subject, prompter, true).await?;
        let result = self.login_with(module, token, Some(pin)).await;
        if cached && result.is_err() {
            lock(&self.pins).remove(&token_id(module, token));
        }
        result
    }

    /// The gate logins to `token` go through.
    fn login_gate(&self, token: &TokenId) -> Arc<LoginGate> {
        let mut logins = lock(&self.logins);
        match logins.get(token) {
            Some(gate) => gate.clone(),
            None => logins.entry(token.clone()).or_default().clone(),
        }
    }

    /// A PIN for `token`: the cached one (when `use_cache` allows), or one
    /// asked of the person. Returns whether it came from the cache.
    async fn pin_for(
        &self,
        module: &Module,
        token: &TokenState,
        subject: &PromptSubject,
        prompter: &dyn Prompter,
        use_cache: bool,
    ) -> Result<(SecretString, bool), Error> {
        if use_cache {
            if let Some(cached) = lock(&self.pins).get_mut(&token_id(module, token)) {
                cached.used = Instant::now();
                return Ok((cached.pin.clone(), true));
            }
        }
        if token.pin.locked {
            return Err(Error::PinBlocked {
                device: device(token),
                remedy: PIN_REMEDY.into(),
            });
        }
        if module.pin == PinSource::None {
            return Err(Error::Device {
                device: device(token),
                message: format!(
                    "the token needs a login, but the configuration of {} says pin = \"none\"",
                    module.path
                ),
            });
        }
        let mut request = PinRequest::new(subject.clone());
        if token.pin.final_try {
            request.tries_left = Some(1);
        } else if token.pin.count_low {
            request.warning =
                Some("A wrong PIN was entered since the last good one; few tries remain.".into());
        }
        let pin = prompter.pin(&request).await?;
        Ok((pin, false))
    }

    /// C_Login with `pin` (None: the PIN pad); caches a PIN that worked.
    async fn login_with(
        self: &Arc<Self>,
        module: &Arc<Module>,
        token: &TokenState,
        pin: Option<SecretString>,
    ) -> Result<(), Error> {
        let limit = if pin.is_none() {
            self.options.pin_pad_timeout
        } else {
            self.options.call_timeout
        };
        let op = Op::Login {
            slot: token.slot,
            pin: pin.as_ref().map(|p| Pin::new(p.expose_secret().to_owned())),
        };
        let _pad_wait = pin
            .is_none()
            .then(|| module.waiting_at_pad(token))
            .flatten();
        match self.call(module, op, limit).await {
            Ok(_) => {
                tracing::info!(
                    token = token.label,
                    serial = token.serial,
                    "logged in to PKCS#11 token"
                );
                if let (Some(pin), PinCache::Idle(_)) = (pin, self.options.pin_cache) {
                    lock(&self.pins).insert(
                        token_id(module, token),
                        CachedPin {
                            pin,
                            used: Instant::now(),
                        },
                    );
                }
                Ok(())
            }
            Err(err) => {
                let err = self.error(module, token, "C_Login", err);
                tracing::warn!(token = token.label, %err, "PKCS#11 login failed");
                Err(err)
            }
        }
    }

    fn touch_pin(&self, token: &TokenId) {
        if let Some(cached) = lock(&self.pins).get_mut(token) {
            cached.used = Instant::now();
        }
    }

    /// Drops PINs idle longer than the policy allows, and logs those tokens' modules out.
    fn expire_pins(&self) {
        let PinCache::Idle(Some(idle)) = self.options.pin_cache else {
            return;
        };
        let mut expired = Vec::new();
        lock(&self.pins).retain(|token, cached| {
            let keep = cached.used.elapsed() < idle;
            if !keep {
                expired.push(token.module.clone());
            }
            keep
        });
        for path in expired {
            if let Some(helper) = self.module(&path).and_then(|m| m.live_helper()) {
                let _ = helper.call(Op::Logout, self.options.call_timeout);
                tracing::info!(module = path, "cached PKCS#11 PIN expired; logged out");
            }
        }
    }
}

/// What unloads a module whose `ssh-add -s` failed.
const ADD_FAILED: &str = "its ssh-add -s failed";

const PIN_REMEDY: &str =
    "unblock it with the token's SO PIN (for example pkcs11-tool --init-pin --login --login-type so)";

/// Loads the configured modules, then follows tokens coming and going until the backend is dropped.
fn watch(weak: &Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let modules: Vec<Arc<Module>> = lock(&inner.modules).clone();
        for module in &modules {
            // A token that takes one session lends it to a PIN-pad login
            // until the person is done: listing would wait that long, and
            // hold up the polls of the other modules. Look again after.
            if module.at_pad() {
                tracing::debug!(
                    module = module.path,
                    "not listing tokens while a PIN pad waits for the person"
                );
                continue;
            }
            if let Err(err) = inner.refresh(module) {
                tracing::warn!(module = module.path, err, "cannot list the PKCS#11 tokens");
            }
        }
        inner.expire_pins();
        let interval = inner.options.poll_interval;
        drop(inner);
        // Sleep until the next poll or a slot event, holding no strong reference.
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let (flag, changed) = &inner.wake;
        let guard = lock(flag);
        let (mut guard, _) = changed
            .wait_timeout_while(guard, interval, |woken| !*woken)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = false;
    }
}

/// Runs blocking helper work on a thread of its own, so async callers never
/// block and the work needs no particular runtime.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let worker = std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    match receiver.await {
        Ok(value) => value,
        // The sender is dropped without a value only when `work` panicked:
        // carry the panic on to this task, as spawn_blocking would.
        Err(_) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it returns"),
        },
    }
}

/// How the module's output becomes an SSH signature.
#[derive(Clone, Copy)]
enum Finish {
    Rsa(RsaHash),
    Ecdsa(EcdsaCurve),
    Ed25519,
}

impl Finish {
    fn signature(self, raw: &[u8]) -> Option<SshSignature> {
        match self {
            Self::Rsa(hash) => Some(SshSignature::rsa(hash, raw)),
            Self::Ecdsa(curve) => SshSignature::ecdsa_fixed(curve, raw),
            Self::Ed25519 => ssh_key::Signature::new(Algorithm::Ed25519, raw.to_vec())
                .ok()
                .and_then(|s| SshSignature::try_from(&s).ok()),
        }
    }
}

/// The algorithm of an encoded public key, read from the name it starts
/// with: a signature needs no more of the key than that.
fn key_algorithm(mut blob: &[u8]) -> Option<Algorithm> {
    let name = token_agent_core::read_string(&mut blob)?;
    Algorithm::new(std::str::from_utf8(name).ok()?).ok()
}

/// The signature scheme and how to turn the module's output into an SSH signature.
fn prepare(algorithm: &Algorithm, request: &SignRequest) -> Result<(Scheme, Finish), Error> {
    match algorithm {
        Algorithm::Rsa { .. } => {
            let hash = request.flags.rsa_hash();
            let scheme = match hash {
                RsaHash::Sha1 => Scheme::RsaSha1,
                RsaHash::Sha256 => Scheme::RsaSha256,
                RsaHash::Sha512 => Scheme::RsaSha512,
            };
            Ok((scheme, Finish::Rsa(hash)))
        }
        Algorithm::Ecdsa { curve } => {
            let scheme = match curve {
                EcdsaCurve::NistP256 => Scheme::EcdsaSha256,
                EcdsaCurve::NistP384 => Scheme::EcdsaSha384,
                EcdsaCurve::NistP521 => Scheme::EcdsaSha512,
            };
            Ok((scheme, Finish::Ecdsa(*curve)))
        }
        Algorithm::Ed25519 => Ok((Scheme::Ed25519, Finish::Ed25519)),
        other => Err(Error::InvalidKey {
            reason: format!("PKCS#11 keys of type {other} are not supported"),
        }),
    }
}

fn wrong_pin(device: DeviceInfo, state: PinState) -> Error {
    if state.locked {
        Error::PinBlocked {
            device,
            remedy: PIN_REMEDY.into(),
        }
    } else {
        Error::WrongPin {
            device,
            // PKCS#11 gives no count, only "low" and "final try".
            tries_left: state.final_try.then_some(1),
        }
    }
}

/// "the PKCS#11 module X crashed in C_Sign (signal 6, SIGABRT); restarted
/// it". A helper the agent killed itself is not said to have crashed: the
/// person reads why it was stopped.
fn describe_call(path: &str, function: &str, err: &CallError, restarted: bool) -> String {
    let tail = if restarted { "; restarted it" } else { "" };
    match err {
        CallError::Stopped(Stop::Unloaded(by)) => {
            format!("the PKCS#11 module {path} was unloaded ({by}) while it was in {function}")
        }
        CallError::Stopped(Stop::Hung(limit)) => format!(
            "the PKCS#11 module {path} was stopped in {function} because another call to the \
             module hung past its limit ({} s){tail}",
            limit.as_secs()
        ),
        CallError::Stopped(Stop::Restarted(why)) => format!(
            "the PKCS#11 module {path} was stopped in {function} to start it anew ({why}){tail}"
        ),
        CallError::Failed(failure) => format!("the PKCS#11 module {path}: {failure}"),
        CallError::Died(how) => {
            format!("the PKCS#11 module {path} crashed in {function} ({how}){tail}")
        }
        CallError::TimedOut(limit) => format!(
            "the PKCS#11 module {path} did not answer {function} within {} s; killed it{tail}",
            limit.as_secs()
        ),
    }
}

fn same(a: &TokenState, b: &TokenState) -> bool {
    a.serial == b.serial && a.label == b.label
}

fn token_id(module: &Module, token: &TokenState) -> TokenId {
    TokenId {
        module: module.path.clone(),
        serial: token.serial.clone(),
        label: token.label.clone(),
    }
}

fn device(token: &TokenState) -> DeviceInfo {
    DeviceInfo::new(format!("{} #{}", token.label, token.serial)).with_serial(token.serial.clone())
}

/// "tokenlabel: keylabel", as `ssh-add -l` shows it.
fn comment(token: &TokenState, key_label: &str) -> String {
    let key = if key_label.is_empty() {
        "(unlabelled key)"
    } else {
        key_label
    };
    format!("{}: {key}", token.label)
}

/// The module path, serial and label of the token, each as an SSH string
/// (length first), then the CKA_ID. Lengths, not separators: a module may
/// put any byte in what it reports (some pad labels with NULs), and a
/// separator inside a part would make the key impossible to find.
fn key_ref(module: &Module, token: &TokenState, id: &[u8]) -> KeyRef {
    let mut handle = Vec::new();
    for part in [&module.path, &token.serial, &token.label] {
        token_agent_core::push_string(&mut handle, part.as_bytes());
    }
    handle.extend_from_slice(id);
    KeyRef::new(NAME, handle)
}

/// The module path, serial, label and CKA_ID of a [`key_ref`] handle, as
/// bytes: a signature compares them with what it knows, which needs no
/// UTF-8 check.
fn parse_key_ref(mut handle: &[u8]) -> Option<[&[u8]; 4]> {
    let path = token_agent_core::read_string(&mut handle)?;
    let serial = token_agent_core::read_string(&mut handle)?;
    let label = token_agent_core::read_string(&mut handle)?;
    Some([path, serial, label, handle])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> TokenState {
        TokenState {
            slot: 1,
            label: "alice".into(),
            serial: "0123".into(),
            model: "SoftHSM v2".into(),
            protected_auth_path: false,
            login_required: true,
            pin: PinState::default(),
            parallel: true,
            keys: Vec::new(),
        }
    }

    #[test]
    fn key_refs_round_trip_with_nul_in_the_id() {
        let module = Module::new("/usr/lib/x.so".into(), true, PinSource::Prompt);
        let key = key_ref(&module, &token(), &[0, 1, 0]);
        let [path, serial, label, id] = parse_key_ref(key.handle()).unwrap();
        assert_eq!(
            [path, serial, label],
            [&b"/usr/lib/x.so"[..], b"0123", b"alice"]
        );
        assert_eq!(id, [0, 1, 0]);
    }

    #[test]
    fn key_refs_round_trip_with_nul_in_the_label_and_serial() {
        let module = Module::new("/usr/lib/x.so".into(), true, PinSource::Prompt);
        let token = TokenState {
            label: "alice\0\0".into(),
            serial: "01\x0023".into(),
            ..token()
        };
        let key = key_ref(&module, &token, &[4]);
        let [path, serial, label, id] = parse_key_ref(key.handle()).unwrap();
        assert_eq!(
            [path, serial, label, id],
            [&b"/usr/lib/x.so"[..], b"01\x0023", b"alice\0\0", &[4]]
        );
        assert!(parse_key_ref(&key.handle()[..10]).is_none());
    }

    #[test]
    fn private_keys_stay_listed_in_order_until_their_token_goes() {
        let key = |id: u8, private: bool| KeyInfo {
            id: vec![id],
            label: format!("key {id}"),
            public_key: vec![id],
            private,
        };
        let module = Module::new("/usr/lib/x.so".into(), true, PinSource::Prompt);
        let listed = |keys: Vec<KeyInfo>| {
            let mut tokens = vec![TokenState { keys, ..token() }];
            module.remember(&mut tokens);
            tokens.remove(0).keys
        };
        // Logged in: the private keys come after the others.
        let all = vec![key(3, false), key(2, true), key(1, false), key(4, true)];
        let expected = vec![key(3, false), key(1, false), key(2, true), key(4, true)];
        assert_eq!(listed(all.clone()), expected);
        // Logged out: the same list, in the same order.
        assert_eq!(listed(vec![key(3, false), key(1, false)]), expected);
        assert_eq!(listed(all), expected);
        // The token gone, its keys are forgotten.
        module.remember(&mut []);
        assert_eq!(listed(vec![key(1, false)]), vec![key(1, false)]);
    }

    #[test]
    fn pin_state_maps_to_tries_and_blocked() {
        let d = device(&token());
        assert!(matches!(
            wrong_pin(
                d.clone(),
                PinState {
                    final_try: true,
                    ..PinState::default()
                }
            ),
            Error::WrongPin {
                tries_left: Some(1),
                ..
            }
        ));
        assert!(matches!(
            wrong_pin(
                d.clone(),
                PinState {
                    count_low: true,
                    ..PinState::default()
                }
            ),
            Error::WrongPin {
                tries_left: None,
                ..
            }
        ));
        assert!(matches!(
            wrong_pin(
                d,
                PinState {
                    locked: true,
                    ..PinState::default()
                }
            ),
            Error::PinBlocked { .. }
        ));
    }

    #[test]
    fn crash_messages_name_module_function_and_signal() {
        let text = describe_call(
            "/tmp/crash.so",
            "C_Sign",
            &CallError::Died("signal 6, SIGABRT".into()),
            true,
        );
        assert_eq!(
            text,
            "the PKCS#11 module /tmp/crash.so crashed in C_Sign (signal 6, SIGABRT); restarted it"
        );
    }

    #[test]
    fn helpers_the_agent_stopped_are_not_called_crashed() {
        let unloaded = describe_call(
            "/tmp/hang.so",
            "C_Sign",
            &CallError::Stopped(Stop::Unloaded("ssh-add -e")),
            true,
        );
        assert_eq!(
            unloaded,
            "the PKCS#11 module /tmp/hang.so was unloaded (ssh-add -e) while it was in C_Sign"
        );
        let hung = describe_call(
            "/tmp/hang.so",
            "C_Sign",
            &CallError::Stopped(Stop::Hung(Duration::from_secs(3))),
            true,
        );
        assert_eq!(
            hung,
            "the PKCS#11 module /tmp/hang.so was stopped in C_Sign because another call to \
             the module hung past its limit (3 s); restarted it"
        );
    }

    #[test]
    fn key_algorithms_are_read_from_the_encoded_key() {
        use ssh_encoding::Encode;
        let keys = [
            KeyData::Rsa(ssh_key::public::RsaPublicKey {
                e: ssh_key::Mpint::from_positive_bytes(&[1, 0, 1]).unwrap(),
                n: ssh_key::Mpint::from_positive_bytes(&[0xc1; 256]).unwrap(),
            }),
            KeyData::Ecdsa(ssh_key::public::EcdsaPublicKey::from_sec1_bytes(&[4; 65]).unwrap()),
            KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([7; 32])),
        ];
        for key in keys {
            let mut blob = Vec::new();
            key.encode(&mut blob).unwrap();
            assert_eq!(key_algorithm(&blob), Some(key.algorithm()));
            // A blob cut short of the whole name names no algorithm.
            let name_end = 4 + u32::from_be_bytes(blob[..4].try_into().unwrap()) as usize;
            for cut in 0..name_end {
                assert_eq!(key_algorithm(&blob[..cut]), None, "{cut} bytes");
            }
        }
        assert_eq!(key_algorithm(b"\0\0\0\x07ssh-foo"), None);
    }

    #[test]
    fn rsa_schemes_follow_the_request_flags() {
        let public = KeyData::Rsa(ssh_key::public::RsaPublicKey {
            e: ssh_key::Mpint::from_positive_bytes(&[1, 0, 1]).unwrap(),
            n: ssh_key::Mpint::from_positive_bytes(&[0xc1; 256]).unwrap(),
        });
        for (flags, scheme) in [
            (0, Scheme::RsaSha1),
            (token_agent_core::SignFlags::RSA_SHA2_256, Scheme::RsaSha256),
            (token_agent_core::SignFlags::RSA_SHA2_512, Scheme::RsaSha512),
        ] {
            let request = SignRequest {
                data: b"abc".to_vec(),
                flags: token_agent_core::SignFlags::from_bits(flags),
            };
            assert_eq!(prepare(&public.algorithm(), &request).unwrap().0, scheme);
        }
    }
}
