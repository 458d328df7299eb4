//! The router: one snapshot of every backend's identities, and the path of
//! every request to the backend that owns the key.
//!
//! Backends publish their identities; the router combines them with the
//! certificates named in the configuration and the constraints clients set,
//! into a [`Snapshot`] swapped atomically on every change. Listing reads the
//! snapshot and never touches a device, so it answers at once while another
//! request waits for a PIN or a touch.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ssh_key::certificate::Certificate;
use ssh_key::public::KeyData;
use ssh_key::Algorithm;
use token_agent_core::{
    AddKey, Backend, ConfirmRequest, Destination, DeviceInfo, Error, FingerprintHash, Identity,
    IdentitySink, PromptSubject, Prompter, ProviderRequest, RefusalKind, SignContext, SignRequest,
    SshSignature,
};

use crate::constraints::{self, Constraints, SessionBindings};
use crate::forwarding::{self, ConfirmCache, ForwardedUse, ForwardingPolicy};
use crate::listing::ListingRule;
use crate::lock::Lock;
use crate::proto::message::{encode_blob, AssociatedCerts};
use crate::provider::ProviderAllowlist;
use crate::software::identity_blob;
use crate::status::{self, KeyStatus, RefusalLog, RefusalRecord};
use crate::upstream::{UpstreamSettings, Upstreams};
use crate::websafe::{WebOrigin, Websafe};

/// Agent-wide policy, from the command line and the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The lifetime of keys added without one (`token-agent -t`).
    pub default_lifetime: Option<Duration>,
    /// Which providers `ssh-add -s` may load (`-P`).
    pub providers: ProviderAllowlist,
    /// Whether forwarded connections may load providers (`-O allow-remote-pkcs11`).
    pub allow_remote_providers: bool,
    /// The fingerprint hash used in logs and prompts (`-E`).
    pub fingerprint_hash: FingerprintHash,
    /// What a use over a forwarded agent connection may do (`[forwarding]`).
    pub forwarding: ForwardingPolicy,
    /// Which sk keys may sign data that is not SSH's (`-O no-restrict-websafe`, `-O websafe-allow`).
    pub websafe: Websafe,
    /// Other agents whose keys are served too (`-A`, `upstream`).
    pub upstreams: UpstreamSettings,
    /// Which keys are listed, in which order, per destination (`[[listing]]`).
    pub listing: Vec<ListingRule>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            default_lifetime: None,
            providers: ProviderAllowlist::default(),
            allow_remote_providers: false,
            fingerprint_hash: FingerprintHash::Sha256,
            forwarding: ForwardingPolicy::default(),
            websafe: Websafe::default(),
            upstreams: UpstreamSettings::default(),
            listing: Vec::new(),
        }
    }
}

/// One listed identity with everything needed to serve it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The identity as its backend published it (with a configured certificate attached, for paired entries).
    pub identity: Identity,
    /// The encoded public key or certificate clients name it by.
    pub blob: Vec<u8>,
    /// Constraints set when it was added.
    pub constraints: Option<Arc<Constraints>>,
    /// A certificate the router presents with a backend's key (from the
    /// configuration, or sent with `ssh-add -s`), not one the backend holds.
    pub paired: bool,
    /// The key's fingerprint, once a log line or prompt has shown it: the
    /// audit line of every signature shows it.
    fingerprint: OnceLock<String>,
}

impl Entry {
    fn new(
        identity: Identity,
        blob: Vec<u8>,
        constraints: Option<Arc<Constraints>>,
        paired: bool,
    ) -> Self {
        Self {
            identity,
            blob,
            constraints,
            paired,
            fingerprint: OnceLock::new(),
        }
    }
}

/// Every identity of every backend, at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Shared, so a request keeps its entry without copying it.
    entries: Vec<Arc<Entry>>,
}

impl Snapshot {
    /// All entries, in backend order.
    pub fn entries(&self) -> &[Arc<Entry>] {
        &self.entries
    }

    /// The entry a client names by `blob`.
    pub fn find(&self, blob: &[u8]) -> Option<&Arc<Entry>> {
        self.entries.iter().find(|e| e.blob == blob)
    }
}

/// Why a request was refused; logged, and answered with SSH_AGENT_FAILURE.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The agent is locked.
    #[error("the agent is locked; unlock it with ssh-add -X")]
    Locked,
    /// No listed identity has this key.
    #[error("the agent holds no such key (ssh-add -l lists what it holds)")]
    UnknownKey,
    /// The key's lifetime ran out.
    #[error("the key's lifetime (ssh-add -t) has expired; add it again")]
    Expired,
    /// A destination constraint does not allow this use.
    #[error("destination constraint: {0}")]
    Destination(String),
    /// The person declined a confirmation.
    #[error("the use of the key was declined at its confirmation (ssh-add -c)")]
    Declined,
    /// The confirmation could not be asked, or nobody answered it.
    #[error("the use of the key was not confirmed: {0}")]
    Confirmation(token_agent_core::PromptError),
    /// A forwarded connection asked for what only local clients may do.
    #[error("{0}")]
    Forwarded(String),
    /// A malformed or unacceptable request.
    #[error("{0}")]
    Invalid(String),
    /// An sk key was asked to sign what looks like a web authentication request.
    #[error(transparent)]
    Websafe(#[from] WebOrigin),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] Error),
    /// An upstream agent answered the request with SSH_AGENT_FAILURE.
    #[error("the agent at {0} refused (its own log says why)")]
    UpstreamRefused(String),
    /// An upstream agent could not be asked, or did not answer in time.
    #[error("the agent at {socket} {reason}")]
    UpstreamFailed {
        /// Its socket.
        socket: String,
        /// What went wrong.
        reason: String,
    },
}

impl Refusal {
    /// The kind of refusal, for logs, `token-agent status` and notices.
    pub fn kind(&self) -> RefusalKind {
        match self {
            Self::Locked => RefusalKind::Locked,
            Self::UnknownKey => RefusalKind::UnknownKey,
            Self::Expired => RefusalKind::KeyExpired,
            Self::Destination(_) => RefusalKind::Destination,
            Self::Declined => RefusalKind::ConfirmDeclined,
            Self::Confirmation(err) => RefusalKind::of_confirmation(err),
            Self::Forwarded(_) => RefusalKind::Forwarding,
            Self::Websafe(_) => RefusalKind::WebSafety,
            Self::Invalid(_) => RefusalKind::Refused,
            Self::Backend(err) => RefusalKind::of(err),
            Self::UpstreamRefused(_) => RefusalKind::Refused,
            Self::UpstreamFailed { .. } => RefusalKind::Failed,
        }
    }
}

/// How many expired keys are remembered (by blob) to name the reason.
const MAX_EXPIRED: usize = 64;

/// The router.
pub struct Router {
    backends: Vec<Arc<dyn Backend>>,
    prompter: Arc<dyn Prompter>,
    policy: Policy,
    certificates: Vec<Arc<Certificate>>,
    published: Mutex<HashMap<String, Vec<Identity>>>,
    constraints: Mutex<HashMap<Vec<u8>, Arc<Constraints>>>,
    snapshot: ArcSwap<Snapshot>,
    lock: Lock,
    /// One provider loads at a time.
    provider_loads: tokio::sync::Mutex<()>,
    /// What each provider was loaded with (`ssh-add -c`, `-t`, certificates),
    /// by its canonical path, from before its load starts until it is
    /// unloaded: its keys are constrained (and `ssh-add -C` keys hidden) from
    /// the moment they appear, whether during the load, or later (a token
    /// inserted, keys seen after a login), as OpenSSH constrains every key
    /// of the module.
    provider_terms: Mutex<HashMap<String, ProviderTerms>>,
    /// Certificates sent with `ssh-add -s` (associated-certs-v00@openssh.com),
    /// by the encoded public key of the provider key each certifies.
    associated: Mutex<HashMap<Vec<u8>, Arc<Associated>>>,
    /// The last refusals, for `token-agent status`.
    refusals: RefusalLog,
    /// "Yes" answers to forwarded uses, remembered as the policy allows.
    forwarded_yes: ConfirmCache,
    /// Blobs of the last keys whose lifetime ran out, so that a later use
    /// is refused as "expired" rather than "no such key".
    expired: Mutex<std::collections::VecDeque<Vec<u8>>>,
    /// Other agents behind this one.
    upstreams: Upstreams,
    started: Instant,
    this: Weak<Self>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("backends", &self.backends)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router over `backends` (in listing order), asking the person through
    /// `prompter`, presenting `certificates` for whichever backend's key they certify.
    pub fn new(
        backends: Vec<Arc<dyn Backend>>,
        prompter: Arc<dyn Prompter>,
        policy: Policy,
        certificates: Vec<Certificate>,
    ) -> Arc<Self> {
        let router = Arc::new_cyclic(|this| Self {
            this: this.clone(),
            backends,
            prompter,
            certificates: certificates.into_iter().map(Arc::new).collect(),
            published: Mutex::new(HashMap::new()),
            constraints: Mutex::new(HashMap::new()),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            lock: Lock::default(),
            provider_loads: tokio::sync::Mutex::new(()),
            provider_terms: Mutex::new(HashMap::new()),
            associated: Mutex::new(HashMap::new()),
            refusals: RefusalLog::default(),
            forwarded_yes: ConfirmCache::default(),
            expired: Mutex::new(std::collections::VecDeque::new()),
            upstreams: Upstreams::new(policy.upstreams.clone()),
            policy,
            started: Instant::now(),
        });
        for backend in &router.backends {
            let weak = router.this.clone();
            let name = backend.name().to_owned();
            backend.start(IdentitySink::new(move |identities| {
                if let Some(router) = weak.upgrade() {
                    router.published(&name, identities);
                }
            }));
        }
        router
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The agent's policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The lock.
    pub fn lock(&self) -> &Lock {
        &self.lock
    }

    /// The agents behind this one.
    pub(crate) fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Keeps a refusal for `token-agent status` and, when the person can act
    /// on it, tells them through the prompter's notice path.
    pub fn record_refusal(&self, record: RefusalRecord, subject: Option<PromptSubject>) {
        if record.kind.for_the_person() {
            let subject = subject.unwrap_or_default();
            self.prompter.refused(
                &format!(
                    "token-agent refused to {}: {}",
                    record.operation, record.message
                ),
                &subject,
            );
        }
        self.refusals.push(record);
    }

    /// What `token-agent status` shows (see [`crate::status`]).
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let snapshot = self.snapshot();
        // Locked, the agent lists no keys, and status shows none either.
        let shown = if self.lock.is_locked() {
            &[][..]
        } else {
            snapshot.entries()
        };
        let keys = shown
            .iter()
            .map(|entry| {
                KeyStatus {
                    comment: entry.identity.comment(),
                    algorithm: entry.identity.public_key().algorithm().to_string(),
                    fingerprint: self.entry_fingerprint(entry).to_owned(),
                    backend: entry.identity.key().backend(),
                    device: entry.identity.device().map(|d| d.label()),
                    certificate: entry.identity.certificate(),
                    constraints: entry.constraints.as_deref(),
                }
                .to_json(now)
            })
            .collect();
        let backends = self
            .backends
            .iter()
            .map(|b| (b.name(), b.devices()))
            .collect();
        status::document(
            self.started,
            status::LockState {
                password: self.lock.is_password_locked(),
                session: self.lock.is_session_locked(),
            },
            backends,
            keys,
            self.upstreams.status(),
            &self.refusals.records(),
        )
    }

    /// Locks the agent and makes every backend forget cached PINs.
    pub fn lock_agent(&self, password: &[u8]) -> bool {
        if !self.lock.lock(password) {
            return false;
        }
        self.forget_secrets();
        true
    }

    /// Locks the agent with the desktop session (or lifts that lock). A lock
    /// also makes every backend forget cached PINs.
    pub fn set_session_locked(&self, locked: bool) {
        if self.lock.set_session_locked(locked) {
            if locked {
                self.forget_secrets();
            }
            tracing::info!(locked, "agent lock follows the desktop session");
        }
    }

    /// Makes every backend forget cached PINs and let go of its tokens.
    pub fn forget_secrets(&self) {
        self.forwarded_yes.clear();
        for backend in &self.backends {
            backend.forget_secrets();
        }
    }

    /// The entries a client with `bindings` may see (none while locked).
    pub fn list(&self, bindings: &SessionBindings) -> Vec<Arc<Entry>> {
        if self.lock.is_locked() {
            return Vec::new();
        }
        let now = Instant::now();
        self.snapshot()
            .entries()
            .iter()
            .filter(|e| match &e.constraints {
                None => true,
                Some(c) => !c.expired(now) && constraints::visible(c, bindings),
            })
            .cloned()
            .collect()
    }

    /// Signs for a client: checks the lock, lifetime, destination constraints
    /// and confirmation, then asks the owning backend.
    pub async fn sign(
        &self,
        blob: &[u8],
        request: SignRequest,
        context: SignContext,
        bindings: &SessionBindings,
    ) -> Result<(Arc<Entry>, SshSignature, SignContext), Refusal> {
        if self.lock.is_locked() {
            return Err(Refusal::Locked);
        }
        let entry = match self.snapshot().find(blob) {
            Some(entry) => entry.clone(),
            None if token_agent_core::lock(&self.expired).contains(&blob.to_vec()) => {
                return Err(Refusal::Expired)
            }
            None => return Err(Refusal::UnknownKey),
        };
        // The key the blob names: the entry's, for a certificate too.
        let key_data = entry.identity.public_key();
        self.policy
            .websafe
            .check(key_data, &entry.blob, &request.data)?;
        let mut context = context;
        if let Some(c) = &entry.constraints {
            if c.expired(Instant::now()) {
                return Err(Refusal::Expired);
            }
            let permitted = constraints::may_sign(c, bindings, &entry.blob, &request.data)
                .map_err(Refusal::Destination)?;
            if let Some(last) = bindings.hops().last() {
                context.destination = Some(Destination {
                    host_key: last.host_key.key_data().clone(),
                    hostname: permitted.hostname,
                    user: permitted.user,
                });
            }
            if c.confirm {
                let confirm = ConfirmRequest {
                    subject: self.subject(&entry).with_context(&context),
                    question: None,
                };
                match self.prompter.confirm(&confirm).await {
                    Ok(true) => {}
                    Ok(false) => return Err(Refusal::Declined),
                    Err(err) => return Err(Refusal::Confirmation(err)),
                }
            }
        }
        if forwarding::is_forwarded(bindings) {
            let used = KeyUse {
                blob: &entry.blob,
                key: key_data,
                fingerprint: self.entry_fingerprint(&entry).to_owned(),
                comment: entry.identity.comment(),
                backend: entry.identity.key().backend(),
                device: entry.identity.device(),
            };
            self.check_forwarded(&used, &request, &context, bindings)
                .await?;
        }
        let backend = self.backend(entry.identity.key().backend())?;
        let signature = backend
            .sign(
                entry.identity.key(),
                &request,
                &context,
                self.prompter.clone(),
            )
            .await?;
        Ok((entry, signature, context))
    }

    /// Checks what token-agent itself decides for a signature with an
    /// upstream agent's key (the upstream applies its own constraints): the
    /// lock, and the forwarding policy, under which upstream keys are of
    /// backend "upstream".
    pub(crate) async fn authorize_upstream(
        &self,
        blob: &[u8],
        comment: &str,
        key_data: &KeyData,
        request: &SignRequest,
        context: &SignContext,
        bindings: &SessionBindings,
    ) -> Result<(), Refusal> {
        if self.lock.is_locked() {
            return Err(Refusal::Locked);
        }
        if forwarding::is_forwarded(bindings) {
            let used = KeyUse {
                blob,
                key: key_data,
                fingerprint: self.fingerprint(key_data),
                comment,
                backend: crate::upstream::BACKEND,
                device: None,
            };
            self.check_forwarded(&used, request, context, bindings)
                .await?;
        }
        Ok(())
    }

    /// The forwarding policy for a use of a key over a forwarded connection:
    /// allow, refuse, or ask the person, naming the hosts (and remember a
    /// "yes" for the same key and host chain if the policy says so).
    async fn check_forwarded(
        &self,
        used: &KeyUse<'_>,
        request: &SignRequest,
        context: &SignContext,
        bindings: &SessionBindings,
    ) -> Result<(), Refusal> {
        let policy = &self.policy.forwarding;
        let fingerprint = &used.fingerprint;
        let decision = policy.decide(used.key, used.comment, used.backend);
        if decision.action == ForwardedUse::Allow {
            return Ok(());
        }
        let names = policy.hop_names(bindings);
        let hops = bindings.hops();
        // The last hop is where a remote ssh logs in, unless it forwards on.
        let logs_in = names.len() >= 2 && hops.last().is_some_and(|h| !h.forwarded);
        let (via, to) = if logs_in {
            (&names[..names.len() - 1], names.last())
        } else {
            (&names[..], None)
        };
        let mut key = format!("key {}", used.comment);
        if let Some(device) = used.device {
            if !used.comment.contains(device.label()) {
                key.push_str(&format!(" on {}", device.label()));
            }
        }
        let purpose = match (to, crate::proto::userauth::parse(&request.data, used.blob)) {
            (Some(to), Some(auth)) => format!("to log in to {to} as {}", auth.user.escape_debug()),
            (Some(to), None) => format!("to sign data for {to}"),
            (None, _) => "over a forwarded agent".to_owned(),
        };
        let who = via.join(" > ");
        if decision.action == ForwardedUse::Refuse {
            return Err(Refusal::Forwarded(format!(
                "{who} asked to use {key} ({fingerprint}) {purpose}; the forwarding \
                 policy refuses forwarded use of this key"
            )));
        }
        // A "yes" is remembered for a chain of hosts, which is known only
        // when every bind verified.
        let chain: Option<Vec<KeyData>> = (!bindings.first_hop_unverified())
            .then(|| hops.iter().map(|h| h.host_key.key_data().clone()).collect());
        if let Some(chain) = &chain {
            if self.forwarded_yes.allows(used.blob, chain) {
                return Ok(());
            }
        }
        let subject = PromptSubject {
            key: Some(used.comment.to_owned()),
            fingerprint: Some(fingerprint.clone()),
            device: used.device.cloned(),
            requester: None,
            destination: None,
        };
        let confirm = ConfirmRequest {
            subject: subject.with_context(context),
            question: Some(format!("{who} wants to use {key} {purpose}.")),
        };
        match self.prompter.confirm(&confirm).await {
            Ok(true) => {
                if let Some(chain) = chain {
                    self.forwarded_yes
                        .remember(used.blob, chain, decision.confirm_cache);
                }
                Ok(())
            }
            Ok(false) => Err(Refusal::Declined),
            Err(err) => Err(Refusal::Confirmation(err)),
        }
    }

    /// Adds a client's key with `constraints` (lifetime already defaulted by
    /// the caller). An sk key with a middleware (`ssh-add -S`) passes the same
    /// gate as a PKCS#11 provider: the `-P` allowlist on its canonical path,
    /// and no loading on request of a forwarded `context`. As OpenSSH, a
    /// connection may replace a key it holds (new comment and constraints)
    /// only if its `bindings` can see that key.
    pub async fn add_key(
        &self,
        key: AddKey,
        constraints: Constraints,
        context: SignContext,
        bindings: &SessionBindings,
    ) -> Result<Entry, Refusal> {
        if self.lock.is_locked() {
            return Err(Refusal::Locked);
        }
        let algorithm = key
            .keypair
            .algorithm()
            .map_err(|e| Refusal::Invalid(e.to_string()))?;
        let mut key = key;
        if let Some(provider) = key.sk_provider.take() {
            // As OpenSSH's ssh-agent: a middleware only for keys that need one.
            if !matches!(
                algorithm,
                Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256
            ) {
                return Err(Refusal::Invalid(format!(
                    "cannot add a {algorithm} key with the sk middleware {provider}: \
                     middlewares are for security-key (sk) keys only"
                )));
            }
            key.sk_provider =
                Some(self.admit_provider(LibraryKind::SkMiddleware, &provider, &context)?);
        }
        let backend = self
            .backends
            .iter()
            .find(|b| b.accepts_key(&algorithm))
            .cloned()
            .ok_or_else(|| Refusal::Backend(no_backend_for(&algorithm)))?;
        // The constraints are in place before the key can be listed, so no
        // request can use it unconstrained in between.
        let public =
            KeyData::try_from(&*key.keypair).map_err(|e| Refusal::Invalid(e.to_string()))?;
        let blob = match &key.certificate {
            Some(cert) => encode_blob(cert.as_ref()),
            None => encode_blob(&public),
        }
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
        if let Some(held) = self.snapshot().find(&blob) {
            ensure_visible(held, bindings, "replace")?;
        }
        let constraints = self.constrain(blob.clone(), constraints);
        let identity = match backend.add_key(key).await {
            Ok(identity) => identity,
            Err(err) => {
                self.constraints_mut().remove(&blob);
                self.rebuild();
                return Err(err.into());
            }
        };
        if let Some(c) = &constraints {
            self.schedule_expiry(blob.clone(), c);
        }
        Ok(Entry::new(identity, blob, constraints, false))
    }

    /// Removes the key a client names by `blob` (`ssh-add -d`), if the
    /// client's `bindings` can see it (as OpenSSH).
    pub async fn remove(
        &self,
        blob: &[u8],
        bindings: &SessionBindings,
    ) -> Result<Arc<Entry>, Refusal> {
        if self.lock.is_locked() {
            return Err(Refusal::Locked);
        }
        let entry = self
            .snapshot()
            .find(blob)
            .cloned()
            .ok_or(Refusal::UnknownKey)?;
        ensure_visible(&entry, bindings, "remove")?;
        if entry.paired {
            if !self.dissociate(&entry) {
                return Err(Refusal::Invalid(
                    "this certificate comes from the configuration; remove it there".into(),
                ));
            }
        } else {
            self.backend(entry.identity.key().backend())?
                .remove_key(entry.identity.key())
                .await?;
        }
        self.constraints_mut().remove(blob);
        self.rebuild();
        Ok(entry)
    }

    /// Removes every key clients added (`ssh-add -D`).
    pub async fn remove_all(&self) -> Result<(), Refusal> {
        if self.lock.is_locked() {
            return Err(Refusal::Locked);
        }
        self.drop_all_keys().await;
        Ok(())
    }

    /// Removes every key clients added, even while the agent is locked, as
    /// OpenSSH's ssh-agent does on SIGUSR1: software and sk keys, and the keys
    /// of PKCS#11 modules loaded with `ssh-add -s` (the modules are unloaded,
    /// as `ssh-add -D` does). Keys of plugged-in tokens and of the
    /// configuration stay. Returns how many listed keys went away.
    pub async fn drop_all_keys(&self) -> usize {
        let before = self.snapshot().entries().len();
        for backend in &self.backends {
            backend.remove_all().await;
        }
        // Every module ssh-add loaded is unloaded.
        self.terms().clear();
        self.forget_departed();
        before.saturating_sub(self.snapshot().entries().len())
    }

    /// Loads a provider (`ssh-add -s`) with `constraints` on each of its
    /// keys, presenting `associated` certificates with the keys they certify
    /// (and, with `certs_only`, only those: `ssh-add -C`), as OpenSSH's
    /// `process_add_smartcard_key`. Succeeds when any key or certificate was
    /// loaded.
    pub async fn add_provider(
        &self,
        request: ProviderRequest,
        constraints: Constraints,
        associated: AssociatedCerts,
    ) -> Result<Vec<Entry>, Refusal> {
        if self.lock.is_locked() {
            return Err(Refusal::Locked);
        }
        let canonical = self.admit_provider(
            LibraryKind::Pkcs11Provider,
            &request.provider,
            &request.context,
        )?;
        let backend = self
            .backends
            .iter()
            .find(|b| b.accepts_providers())
            .cloned()
            .ok_or_else(|| {
                Refusal::Backend(Error::NoBackend {
                    what: format!(
                        "cannot load {}: this token-agent has no PKCS#11 backend enabled",
                        request.provider
                    ),
                })
            })?;
        let provider = canonical.clone();
        let request = ProviderRequest {
            provider: canonical,
            ..request
        };
        let _one_at_a_time = self.provider_loads.lock().await;
        let constraints = self.effective(constraints);
        let certificates = Associated {
            certificates: associated.certificates.into_iter().map(Arc::new).collect(),
            certs_only: associated.certs_only,
        };
        let terms = (constraints.is_some() || !certificates.is_empty()).then(|| ProviderTerms {
            constraints: constraints.clone(),
            associated: Arc::new(certificates.clone()),
        });
        let earlier = match terms {
            Some(terms) => self.terms().insert(provider.clone(), terms),
            None => self.terms().remove(&provider),
        };
        let loaded = backend.add_provider(request).await;
        let mut added = Vec::new();
        if let Ok(identities) = &loaded {
            for identity in identities {
                let Ok(blob) = identity_blob(identity) else {
                    continue;
                };
                let mine = Arc::new(certificates.for_key(identity.public_key()));
                let mut blobs = vec![blob.clone()];
                blobs.extend(mine.blobs());
                for blob in blobs {
                    match &constraints {
                        Some(c) => {
                            self.constraints_mut().insert(blob.clone(), c.clone());
                            self.schedule_expiry(blob, c);
                        }
                        // A fresh load without constraints: nothing of an
                        // earlier load of the same keys applies any more.
                        None => {
                            self.constraints_mut().remove(&blob);
                        }
                    }
                }
                for cert in &mine.certificates {
                    added.push(Entry::new(
                        identity.clone().with_certificate(cert.clone()),
                        encode_blob(cert.as_ref()).unwrap_or_default(),
                        constraints.clone(),
                        true,
                    ));
                }
                if !mine.certs_only {
                    added.push(Entry::new(
                        identity.clone(),
                        blob.clone(),
                        constraints.clone(),
                        false,
                    ));
                }
                if mine.is_empty() {
                    self.associated_mut().remove(&blob);
                } else {
                    self.associated_mut().insert(blob, mine);
                }
            }
        }
        if loaded.is_err() {
            // The module keeps what it was loaded with before, if it was.
            match earlier {
                Some(earlier) => self.terms().insert(provider.clone(), earlier),
                None => self.terms().remove(&provider),
            };
        }
        self.rebuild();
        loaded?;
        if added.is_empty() && certificates.certs_only {
            // As OpenSSH: nothing was loaded, so the request fails; and the
            // provider's keys are not left behind, unlisted, in the backend.
            let _ = backend.remove_provider(&provider).await;
            self.terms().remove(&provider);
            self.forget_departed();
            return Err(Refusal::Invalid(format!(
                "none of the certificates sent with ssh-add -C certifies a key of {provider}"
            )));
        }
        Ok(added)
    }

    /// Unloads a provider (`ssh-add -e`).
    pub async fn remove_provider(&self, provider: &str) -> Result<(), Refusal> {
        if self.lock.is_locked() {
            return Err(Refusal::Locked);
        }
        let backend = self
            .backends
            .iter()
            .find(|b| b.accepts_providers())
            .cloned()
            .ok_or_else(|| {
                Refusal::Backend(Error::NoBackend {
                    what: format!(
                        "cannot remove {provider}: this token-agent has no PKCS#11 backend enabled"
                    ),
                })
            })?;
        let canonical = self
            .policy
            .providers
            .canonical(provider)
            .unwrap_or_else(|| provider.to_owned());
        backend.remove_provider(&canonical).await?;
        self.terms().remove(&canonical);
        self.forget_departed();
        Ok(())
    }

    /// The canonical path of the library `provider` (a PKCS#11 module or an
    /// sk middleware, as `what` says) if the policy lets a client with
    /// `context` load it: never on request of a forwarded connection unless
    /// `-O allow-remote-pkcs11`, and only when the canonical path (symbolic
    /// links resolved) matches the `-P` allowlist.
    fn admit_provider(
        &self,
        what: LibraryKind,
        provider: &str,
        context: &SignContext,
    ) -> Result<String, Refusal> {
        if context.forwarded && !self.policy.allow_remote_providers {
            return Err(Refusal::Forwarded(format!(
                "refusing to load {} {provider} requested over a forwarded connection \
                 (start the agent with -O allow-remote-pkcs11 to allow it)",
                what.name()
            )));
        }
        self.policy
            .providers
            .check(provider)
            .map_err(|reason| match what {
                LibraryKind::Pkcs11Provider => Refusal::Invalid(reason),
                LibraryKind::SkMiddleware => {
                    Refusal::Invalid(format!("refusing the sk middleware: {reason}"))
                }
            })
    }

    /// The words a prompt uses for `entry`.
    pub fn subject(&self, entry: &Entry) -> PromptSubject {
        PromptSubject {
            key: Some(entry.identity.comment().to_owned()),
            fingerprint: Some(self.entry_fingerprint(entry).to_owned()),
            device: entry.identity.device().cloned(),
            requester: None,
            destination: None,
        }
    }

    /// The fingerprint of `key` in the hash of `-E`, for logs and prompts.
    pub fn fingerprint(&self, key: &KeyData) -> String {
        self.policy.fingerprint_hash.fingerprint(key)
    }

    /// The fingerprint of `entry`'s key, computed once per entry.
    pub fn entry_fingerprint<'a>(&self, entry: &'a Entry) -> &'a str {
        entry
            .fingerprint
            .get_or_init(|| self.fingerprint(entry.identity.public_key()))
    }

    fn backend(&self, name: &str) -> Result<Arc<dyn Backend>, Refusal> {
        self.backends
            .iter()
            .find(|b| b.name() == name)
            .cloned()
            .ok_or(Refusal::UnknownKey)
    }

    /// Records `constraints` for `blob` when there are any; returns them.
    fn constrain(&self, blob: Vec<u8>, constraints: Constraints) -> Option<Arc<Constraints>> {
        let constraints = self.effective(constraints);
        match &constraints {
            Some(c) => self.constraints_mut().insert(blob, c.clone()),
            None => self.constraints_mut().remove(&blob),
        };
        self.rebuild();
        constraints
    }

    /// `constraints` with the agent's default lifetime applied; `None` when
    /// nothing constrains the key.
    fn effective(&self, mut constraints: Constraints) -> Option<Arc<Constraints>> {
        if constraints.expires_at.is_none() {
            if let Some(lifetime) = self.policy.default_lifetime {
                constraints = constraints.with_lifetime(lifetime);
            }
        }
        let unconstrained = constraints.expires_at.is_none()
            && !constraints.confirm
            && constraints.destinations.is_empty();
        (!unconstrained).then(|| Arc::new(constraints))
    }

    /// Forgets the constraints and certificates of keys no backend publishes
    /// any more (after `ssh-add -e` or `-D`), and rebuilds. A token that is
    /// merely unplugged keeps them: its provider is still loaded.
    fn forget_departed(&self) {
        let live: std::collections::HashSet<Vec<u8>> = self
            .published_mut()
            .values()
            .flatten()
            .filter_map(|identity| identity_blob(identity).ok())
            .collect();
        self.associated_mut().retain(|blob, _| live.contains(blob));
        self.rebuild();
        let listed: std::collections::HashSet<Vec<u8>> = self
            .snapshot()
            .entries()
            .iter()
            .map(|e| e.blob.clone())
            .collect();
        self.constraints_mut()
            .retain(|blob, _| listed.contains(blob));
        self.rebuild();
    }

    /// Stops presenting the associated certificate of `entry` (`ssh-add -d`
    /// or its lifetime). False when it is not an associated certificate.
    fn dissociate(&self, entry: &Entry) -> bool {
        let Some(cert) = entry.identity.certificate() else {
            return false;
        };
        let Ok(key_blob) = encode_blob(entry.identity.public_key()) else {
            return false;
        };
        let mut associated = self.associated_mut();
        let Some(current) = associated.get(&key_blob).cloned() else {
            return false;
        };
        if !current.certificates.iter().any(|c| c.as_ref() == cert) {
            return false;
        }
        let remaining = Associated {
            certificates: current
                .certificates
                .iter()
                .filter(|c| c.as_ref() != cert)
                .cloned()
                .collect(),
            certs_only: current.certs_only,
        };
        associated.insert(key_blob, Arc::new(remaining));
        true
    }

    /// Removes the key `blob` names when its lifetime ends.
    fn schedule_expiry(&self, blob: Vec<u8>, constraints: &Arc<Constraints>) {
        let Some(at) = constraints.expires_at else {
            return;
        };
        let router = self.this.clone();
        let expected = constraints.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let Some(router) = router.upgrade() else {
                return;
            };
            // The key may have been removed or re-added with other constraints since.
            let current = router.constraints_mut().get(&blob).cloned();
            if current.is_some_and(|c| Arc::ptr_eq(&c, &expected)) {
                if let Some(entry) = router.snapshot().find(&blob).cloned() {
                    tracing::info!(
                        key = %router.entry_fingerprint(&entry),
                        comment = entry.identity.comment(),
                        "key lifetime expired; removing it"
                    );
                    let removed = if entry.paired {
                        // Only the router's pairing goes; the key stays.
                        router.dissociate(&entry);
                        Ok(())
                    } else {
                        match router.backend(entry.identity.key().backend()) {
                            Ok(backend) => backend.remove_key(entry.identity.key()).await,
                            Err(_) => Ok(()),
                        }
                    };
                    if let Err(err) = removed {
                        // The expired constraint stays: the key remains
                        // hidden and unusable rather than becoming
                        // unconstrained.
                        tracing::warn!(
                            %err,
                            "the backend keeps an expired key; it stays hidden and refused"
                        );
                        return;
                    }
                }
                router.constraints_mut().remove(&blob);
                router.rebuild();
                let mut expired = token_agent_core::lock(&router.expired);
                if expired.len() == MAX_EXPIRED {
                    expired.pop_front();
                }
                expired.push_back(blob);
            }
        });
    }

    fn published(&self, backend: &str, identities: Vec<Identity>) {
        self.published_mut().insert(backend.to_owned(), identities);
        self.rebuild();
    }

    fn published_mut(&self) -> MutexGuard<'_, HashMap<String, Vec<Identity>>> {
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn terms(&self) -> MutexGuard<'_, HashMap<String, ProviderTerms>> {
        token_agent_core::lock(&self.provider_terms)
    }

    fn associated_mut(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Arc<Associated>>> {
        token_agent_core::lock(&self.associated)
    }

    fn constraints_mut(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Arc<Constraints>>> {
        self.constraints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Builds and swaps in a new snapshot: for each backend's identity, in
    /// order, the certificates sent with its provider (as OpenSSH lists them,
    /// before the key), the key itself (unless `ssh-add -C` asked for
    /// certificates only), then the configured certificates for it.
    fn rebuild(&self) {
        // Hold the published lock while swapping, so two rebuilds cannot swap
        // in an older list after a newer one.
        let published = self.published_mut();
        let constraints = self.constraints_mut().clone();
        let associated = self.associated_mut().clone();
        let terms = self.terms().clone();
        let mut entries = Vec::new();
        for backend in &self.backends {
            let Some(identities) = published.get(backend.name()) else {
                continue;
            };
            for identity in identities {
                let Ok(blob) = identity_blob(identity) else {
                    tracing::warn!(
                        comment = identity.comment(),
                        "skipping a key that cannot be encoded"
                    );
                    continue;
                };
                let provided = identity.provider().and_then(|p| terms.get(p));
                let gated = provided.and_then(|t| t.constraints.clone());
                let own = constraints.get(&blob).cloned().or(gated.clone());
                let mut push = |identity: Identity, blob: Vec<u8>, paired: bool| {
                    if entries.iter().any(|e: &Arc<Entry>| e.blob == blob) {
                        return;
                    }
                    let constraints = constraints
                        .get(&blob)
                        .cloned()
                        .or(gated.clone())
                        .or(own.clone());
                    entries.push(Arc::new(Entry::new(identity, blob, constraints, paired)));
                };
                if identity.certificate().is_some() {
                    push(identity.clone(), blob, false);
                    continue;
                }
                let association: Option<Arc<Associated>> =
                    associated.get(&blob).cloned().or_else(|| {
                        provided.map(|t| Arc::new(t.associated.for_key(identity.public_key())))
                    });
                for cert in association.iter().flat_map(|a| a.certificates.iter()) {
                    if let Ok(cert_blob) = encode_blob(cert.as_ref()) {
                        push(
                            identity.clone().with_certificate(cert.clone()),
                            cert_blob,
                            true,
                        );
                    }
                }
                if !association.is_some_and(|a| a.certs_only) {
                    push(identity.clone(), blob, false);
                }
                for cert in &self.certificates {
                    if cert.public_key() != identity.public_key() {
                        continue;
                    }
                    if let Ok(cert_blob) = encode_blob(cert.as_ref()) {
                        push(
                            identity.clone().with_certificate(cert.clone()),
                            cert_blob,
                            true,
                        );
                    }
                }
            }
        }
        self.snapshot.store(Arc::new(Snapshot { entries }));
        drop(published);
    }
}

/// What a provider was loaded with, for each of its keys.
#[derive(Debug, Clone)]
struct ProviderTerms {
    constraints: Option<Arc<Constraints>>,
    associated: Arc<Associated>,
}

/// Certificates presented with a provider's keys, and whether only they are.
#[derive(Debug, Clone, Default)]
struct Associated {
    certificates: Vec<Arc<Certificate>>,
    certs_only: bool,
}

/// A key being used, as the forwarding policy sees it.
struct KeyUse<'a> {
    blob: &'a [u8],
    key: &'a KeyData,
    fingerprint: String,
    comment: &'a str,
    backend: &'a str,
    device: Option<&'a DeviceInfo>,
}

impl Associated {
    fn is_empty(&self) -> bool {
        self.certificates.is_empty() && !self.certs_only
    }

    /// The certificates that certify `key`, with the same `certs_only`.
    fn for_key(&self, key: &KeyData) -> Self {
        Self {
            certificates: self
                .certificates
                .iter()
                .filter(|c| c.public_key() == key)
                .cloned()
                .collect(),
            certs_only: self.certs_only,
        }
    }

    fn blobs(&self) -> Vec<Vec<u8>> {
        self.certificates
            .iter()
            .filter_map(|c| encode_blob(c.as_ref()).ok())
            .collect()
    }
}

/// The libraries clients may ask the agent to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LibraryKind {
    /// A PKCS#11 module (`ssh-add -s`).
    Pkcs11Provider,
    /// An OpenSSH security-key middleware (`ssh-add -S`).
    SkMiddleware,
}

impl LibraryKind {
    fn name(self) -> &'static str {
        match self {
            Self::Pkcs11Provider => "provider",
            Self::SkMiddleware => "sk middleware",
        }
    }
}

/// Refuses to `operation` (remove or replace) a key that destination
/// constraints hide from a connection with `bindings`: one that cannot list
/// a key may not change it either.
fn ensure_visible(
    entry: &Entry,
    bindings: &SessionBindings,
    operation: &str,
) -> Result<(), Refusal> {
    match &entry.constraints {
        Some(c) if !constraints::visible(c, bindings) => Err(Refusal::Destination(format!(
            "the key is restricted to other destinations (ssh-add -h), so this connection \
             cannot see it and may not {operation} it"
        ))),
        _ => Ok(()),
    }
}

fn no_backend_for(algorithm: &Algorithm) -> Error {
    match algorithm {
        Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256 => Error::NoBackend {
            what: format!(
                "cannot add a {algorithm} key: security-key (FIDO) keys need the FIDO backend, \
                 which is not enabled in this token-agent"
            ),
        },
        other => Error::NoBackend {
            what: format!("cannot add a {other} key: no backend holds keys of this type"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use async_trait::async_trait;
    use ssh_key::private::Ed25519Keypair;
    use token_agent_core::{
        ConfirmRequest, KeyRef, Notice, NoticeGuard, PinRequest, PromptError, SecretString,
    };

    use super::*;

    #[derive(Debug)]
    struct NoPrompt;

    #[async_trait]
    impl Prompter for NoPrompt {
        async fn pin(&self, _: &PinRequest) -> Result<SecretString, PromptError> {
            Err(PromptError::Cancelled)
        }
        async fn confirm(&self, _: &ConfirmRequest) -> Result<bool, PromptError> {
            Ok(false)
        }
        fn notify(&self, _: &Notice) -> NoticeGuard {
            NoticeGuard::none()
        }
    }

    /// A provider backend that publishes its key and, before its load
    /// returns, records what the router would serve at that moment.
    #[derive(Debug, Default)]
    struct Provider {
        sink: OnceLock<IdentitySink>,
        router: OnceLock<Weak<Router>>,
        seen_during_load: Mutex<Option<Option<Arc<Constraints>>>>,
    }

    #[async_trait]
    impl Backend for Provider {
        fn name(&self) -> &str {
            "provider"
        }
        fn start(&self, sink: IdentitySink) {
            let _ = self.sink.set(sink);
        }
        async fn sign(
            &self,
            _: &KeyRef,
            _: &SignRequest,
            _: &SignContext,
            _: Arc<dyn Prompter>,
        ) -> Result<SshSignature, Error> {
            Err(Error::KeyNotFound)
        }
        fn accepts_providers(&self) -> bool {
            true
        }
        async fn add_provider(&self, request: ProviderRequest) -> Result<Vec<Identity>, Error> {
            let identity = provider_key(9, &request.provider);
            if let Some(sink) = self.sink.get() {
                sink.publish(vec![identity.clone()]);
            }
            if let Some(router) = self.router.get().and_then(Weak::upgrade) {
                let seen = router
                    .snapshot()
                    .entries()
                    .first()
                    .map(|e| e.constraints.clone());
                *self.seen_during_load.lock().unwrap() = seen;
            }
            Ok(vec![identity])
        }
    }

    /// A key of the provider `provider` made from `seed`.
    fn provider_key(seed: u8, provider: &str) -> Identity {
        let key = Ed25519Keypair::from_seed(&[seed; 32]);
        Identity::new(
            KeyData::Ed25519(key.public),
            format!("token key {seed}"),
            KeyRef::new("provider", vec![seed]),
        )
        .with_provider(provider)
    }

    #[tokio::test]
    async fn provider_keys_are_constrained_from_the_moment_they_appear() {
        let provider = Arc::new(Provider::default());
        let policy = Policy {
            providers: ProviderAllowlist::new("/*"),
            ..Policy::default()
        };
        let router = Router::new(
            vec![provider.clone() as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            policy,
            Vec::new(),
        );
        let _ = provider.router.set(Arc::downgrade(&router));
        let request = ProviderRequest {
            provider: "/bin/sh".into(),
            pin: None,
            context: SignContext::default(),
        };
        let constraints = Constraints {
            confirm: true,
            ..Constraints::default()
        };
        let added = router
            .add_provider(request, constraints, AssociatedCerts::default())
            .await
            .unwrap();
        assert_eq!(added.len(), 1);
        let seen = provider.seen_during_load.lock().unwrap().clone();
        assert!(
            seen.flatten().is_some_and(|c| c.confirm),
            "the key was listed without its confirm constraint while the provider loaded"
        );
        let entry = router.snapshot().entries()[0].clone();
        assert!(entry.constraints.as_ref().is_some_and(|c| c.confirm));

        // A key that appears later (a token inserted, a key seen only after
        // the login) is constrained as well, as OpenSSH constrains every
        // key of the module.
        let path = entry.identity.provider().unwrap_or_default().to_owned();
        let sink = provider.sink.get().unwrap();
        sink.publish(vec![entry.identity.clone(), provider_key(10, &path)]);
        let entries = router.snapshot().entries().to_vec();
        assert_eq!(entries.len(), 2);
        assert!(
            entries
                .iter()
                .all(|e| e.constraints.as_ref().is_some_and(|c| c.confirm)),
            "a later key of the provider was listed unconstrained"
        );
        // A key of another module is not.
        sink.publish(vec![provider_key(11, "/other/module.so")]);
        assert!(router.snapshot().entries()[0].constraints.is_none());

        // Loaded again without constraints, none apply to later keys.
        let request = ProviderRequest {
            provider: "/bin/sh".into(),
            pin: None,
            context: SignContext::default(),
        };
        router
            .add_provider(request, Constraints::default(), AssociatedCerts::default())
            .await
            .unwrap();
        sink.publish(vec![provider_key(12, &path)]);
        assert!(router.snapshot().entries()[0].constraints.is_none());
    }

    /// A backend that takes sk keys and records the middleware it was given.
    #[derive(Debug, Default)]
    struct SkKeys {
        added: Mutex<Vec<Option<String>>>,
    }

    #[async_trait]
    impl Backend for SkKeys {
        fn name(&self) -> &str {
            "fido"
        }
        fn start(&self, _: IdentitySink) {}
        async fn sign(
            &self,
            _: &KeyRef,
            _: &SignRequest,
            _: &SignContext,
            _: Arc<dyn Prompter>,
        ) -> Result<SshSignature, Error> {
            Err(Error::KeyNotFound)
        }
        fn accepts_key(&self, algorithm: &Algorithm) -> bool {
            matches!(algorithm, Algorithm::SkEd25519)
        }
        async fn add_key(&self, key: AddKey) -> Result<Identity, Error> {
            self.added.lock().unwrap().push(key.sk_provider.clone());
            Ok(Identity::new(
                KeyData::try_from(&*key.keypair).unwrap(),
                key.comment,
                KeyRef::new("fido", b"1".to_vec()),
            ))
        }
    }

    fn sk_key(provider: Option<String>) -> AddKey {
        let public =
            ssh_key::public::SkEd25519::new(ssh_key::public::Ed25519PublicKey([4; 32]), "ssh:");
        let keypair = ssh_key::private::SkEd25519::new(public, 1, vec![1, 2, 3]).unwrap();
        AddKey {
            keypair: Box::new(ssh_key::private::KeypairData::SkEd25519(keypair)),
            opaque_secret: None,
            comment: "sk".into(),
            certificate: None,
            sk_provider: provider,
        }
    }

    fn forwarded() -> SignContext {
        SignContext {
            forwarded: true,
            ..SignContext::default()
        }
    }

    #[tokio::test]
    async fn sk_middlewares_pass_the_provider_gate() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libsk.so");
        std::fs::write(&library, b"").unwrap();
        let link = dir.path().join("link.so");
        std::os::unix::fs::symlink(&library, &link).unwrap();
        let library = library.display().to_string();
        let link = link.display().to_string();

        // The default -P list refuses a library in a temporary directory.
        let keys = Arc::new(SkKeys::default());
        let router = Router::new(
            vec![keys.clone() as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            Policy::default(),
            Vec::new(),
        );
        let refusal = router
            .add_key(
                sk_key(Some(library.clone())),
                Constraints::default(),
                SignContext::default(),
                &SessionBindings::default(),
            )
            .await
            .unwrap_err();
        assert!(
            refusal.to_string().contains("is not in the allowlist"),
            "{refusal}"
        );
        assert!(refusal.to_string().contains("sk middleware"), "{refusal}");

        // Allowed by -P: the backend gets the canonical path, links resolved.
        let allowing = Policy {
            providers: ProviderAllowlist::new(format!("{}/*", dir.path().display())),
            ..Policy::default()
        };
        let router = Router::new(
            vec![keys.clone() as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            allowing.clone(),
            Vec::new(),
        );
        router
            .add_key(
                sk_key(Some(link.clone())),
                Constraints::default(),
                SignContext::default(),
                &SessionBindings::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            keys.added.lock().unwrap().last(),
            Some(&Some(library.clone()))
        );

        // Never on request of a forwarded connection...
        let refusal = router
            .add_key(
                sk_key(Some(library.clone())),
                Constraints::default(),
                forwarded(),
                &SessionBindings::default(),
            )
            .await
            .unwrap_err();
        assert!(
            refusal.to_string().contains("forwarded connection"),
            "{refusal}"
        );
        // ... but "internal" (no middleware) is fine from anywhere.
        router
            .add_key(
                sk_key(None),
                Constraints::default(),
                forwarded(),
                &SessionBindings::default(),
            )
            .await
            .unwrap();
        assert_eq!(keys.added.lock().unwrap().last(), Some(&None));

        // -O allow-remote-pkcs11 lets forwarded connections name middlewares too.
        let router = Router::new(
            vec![keys.clone() as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            Policy {
                allow_remote_providers: true,
                ..allowing
            },
            Vec::new(),
        );
        router
            .add_key(
                sk_key(Some(library.clone())),
                Constraints::default(),
                forwarded(),
                &SessionBindings::default(),
            )
            .await
            .unwrap();
        assert_eq!(keys.added.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_connection_that_cannot_see_a_key_may_not_remove_or_replace_it() {
        use crate::constraints::testing::{bind_payload, keypair, to_host};

        let router = Router::new(
            vec![Arc::new(crate::software::SoftwareKeys::new()) as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            Policy::default(),
            Vec::new(),
        );
        let (allowed, other) = (keypair(1), keypair(2));
        let user = Ed25519Keypair::from_seed(&[9; 32]);
        let key = || AddKey {
            keypair: Box::new(ssh_key::private::KeypairData::Ed25519(user.clone())),
            opaque_secret: None,
            comment: "restricted".into(),
            certificate: None,
            sk_provider: None,
        };
        let restricted = Constraints {
            destinations: vec![to_host(&allowed, "allowed.example", "")],
            ..Constraints::default()
        };
        let local = SessionBindings::default();
        let entry = router
            .add_key(key(), restricted, SignContext::default(), &local)
            .await
            .unwrap();
        let blob = entry.blob.clone();
        let mut elsewhere = SessionBindings::default();
        elsewhere
            .bind(&bind_payload(&other, b"sid-other", false))
            .unwrap();
        assert!(router.list(&elsewhere).is_empty());

        // Neither removed nor replaced without constraints from there...
        let refusal = router.remove(&blob, &elsewhere).await.unwrap_err();
        assert!(matches!(refusal, Refusal::Destination(_)), "{refusal}");
        let refusal = router
            .add_key(
                key(),
                Constraints::default(),
                SignContext::default(),
                &elsewhere,
            )
            .await
            .unwrap_err();
        assert!(matches!(refusal, Refusal::Destination(_)), "{refusal}");
        assert_eq!(router.list(&local).len(), 1);
        assert!(router.list(&elsewhere).is_empty(), "still restricted");

        // ... but from the host it is for, and locally, it may be.
        let mut there = SessionBindings::default();
        there
            .bind(&bind_payload(&allowed, b"sid-allowed", false))
            .unwrap();
        router
            .add_key(
                key(),
                Constraints::default(),
                SignContext::default(),
                &there,
            )
            .await
            .unwrap();
        assert_eq!(router.list(&elsewhere).len(), 1, "no longer restricted");
        router.remove(&blob, &elsewhere).await.unwrap();
        assert!(router.list(&local).is_empty());
    }

    #[tokio::test]
    async fn a_middleware_for_an_ordinary_key_is_refused() {
        let router = Router::new(
            vec![Arc::new(SkKeys::default()) as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            Policy {
                providers: ProviderAllowlist::new("/*"),
                ..Policy::default()
            },
            Vec::new(),
        );
        let key = AddKey {
            keypair: Box::new(ssh_key::private::KeypairData::Ed25519(
                Ed25519Keypair::from_seed(&[3; 32]),
            )),
            opaque_secret: None,
            comment: "plain".into(),
            certificate: None,
            sk_provider: Some("/bin/sh".into()),
        };
        let refusal = router
            .add_key(
                key,
                Constraints::default(),
                SignContext::default(),
                &SessionBindings::default(),
            )
            .await
            .unwrap_err();
        assert!(refusal.to_string().contains("sk) keys only"), "{refusal}");
    }

    #[tokio::test]
    async fn forwarded_connections_cannot_load_providers() {
        let router = Router::new(
            vec![Arc::new(Provider::default()) as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            Policy::default(),
            Vec::new(),
        );
        let request = ProviderRequest {
            provider: "/bin/sh".into(),
            pin: None,
            context: SignContext {
                forwarded: true,
                ..SignContext::default()
            },
        };
        let refusal = router
            .add_provider(request, Constraints::default(), AssociatedCerts::default())
            .await
            .unwrap_err();
        assert!(refusal.to_string().contains("forwarded"), "{refusal}");
    }

    #[tokio::test]
    async fn providers_outside_the_allowlist_are_refused() {
        let router = Router::new(
            vec![Arc::new(Provider::default()) as Arc<dyn Backend>],
            Arc::new(NoPrompt),
            Policy::default(),
            Vec::new(),
        );
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("evil.so");
        std::fs::write(&module, b"").unwrap();
        let request = ProviderRequest {
            provider: module.display().to_string(),
            pin: None,
            context: SignContext::default(),
        };
        let refusal = router
            .add_provider(request, Constraints::default(), AssociatedCerts::default())
            .await
            .unwrap_err();
        assert!(refusal.to_string().contains("allowlist"), "{refusal}");
    }
}
