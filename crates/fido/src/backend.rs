//! The FIDO backend: sk keys held by handle, signed by whichever connected
//! authenticator accepts the handle.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use ssh_key::{Algorithm, HashAlg, Signature};
use token_agent_core::{
    AddKey, Backend, DeviceInfo, DeviceStatus, Error, Identity, IdentitySink, KeyRef, Notice,
    NoticeKind, PinRequest, PromptSubject, Prompter, SignContext, SignRequest, SshSignature,
};

use token_agent_sk_api::{Algorithm as SkAlgorithm, SkError};

use crate::ctap::{AuthFlags, Authenticator, CoseAlgorithm, CtapError, GetAssertion};
use crate::middleware::{self, MiddlewareError, MiddlewareOptions, Middlewares};
use crate::resident;
use crate::sk::{self, SkKey};
use crate::turn::PinTurns;
use crate::worker::Workers;

/// The backend's name, carried by every [`KeyRef`] it issues.
pub const NAME: &str = "fido";

/// Finds the authenticators connected now.
pub trait Discovery: Send + Sync + fmt::Debug {
    /// Every authenticator connected at this moment. May block briefly (a HID
    /// enumeration); the backend calls it off the async runtime.
    fn connected(&self) -> Vec<Arc<dyn Authenticator>>;
}

/// A fixed list of authenticators, for tests and for simulators attached at start.
#[derive(Debug, Default, Clone)]
pub struct Fixed(pub Vec<Arc<dyn Authenticator>>);

impl Discovery for Fixed {
    fn connected(&self) -> Vec<Arc<dyn Authenticator>> {
        self.0.clone()
    }
}

/// The FIDO2 sk-key backend.
///
/// Keys arrive from `ssh-add` ([`Backend::add_key`]), from key files named in
/// the configuration ([`FidoBackend::add_configured`]) and from the resident
/// credentials of connected authenticators ([`FidoBackend::load_resident`]).
/// The backend holds only what the key file holds (application, flags, key
/// handle); each signature is a CTAP getAssertion on the authenticator that
/// accepts the handle, or, for a key added with a middleware (`ssh-add -S`),
/// that middleware's `sk_sign` in a helper process ([`crate::middleware`]).
#[derive(Clone)]
pub struct FidoBackend {
    inner: Arc<Inner>,
}

struct Inner {
    discovery: Arc<dyn Discovery>,
    workers: Workers,
    /// Each authenticator's turn at asking for its PIN, by device id.
    pin_turns: PinTurns,
    /// The same for the devices behind each middleware, by its path.
    middleware_pin_turns: PinTurns,
    middlewares: Middlewares,
    keys: Mutex<Keys>,
    sink: OnceLock<IdentitySink>,
}

#[derive(Default)]
struct Keys {
    next_id: u64,
    held: Vec<Held>,
}

struct Held {
    id: u64,
    key: SkKey,
    comment: String,
    origin: Origin,
    /// The middleware that signs with it (canonical path), or `None` for our own CTAP code.
    provider: Option<String>,
    identity: Identity,
}

/// What a signature needs to know of a held key.
struct Found {
    key: SkKey,
    comment: String,
    provider: Option<String>,
}

/// Where a held key came from: it decides what `ssh-add -d` and `-D` may remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Client,
    Config,
    Resident,
}

impl FidoBackend {
    /// A backend over the authenticators `discovery` finds, running
    /// middlewares with the default options (this executable with
    /// `--sk-helper`, a time limit of a touch and a little more).
    pub fn new(discovery: Arc<dyn Discovery>) -> Self {
        Self::with_middleware(discovery, MiddlewareOptions::default())
    }

    /// A backend over the authenticators `discovery` finds, running the
    /// middlewares of `ssh-add -S` keys as `middleware` says.
    pub fn with_middleware(discovery: Arc<dyn Discovery>, middleware: MiddlewareOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                discovery,
                workers: Workers::default(),
                pin_turns: PinTurns::default(),
                middleware_pin_turns: PinTurns::default(),
                middlewares: Middlewares::new(middleware),
                keys: Mutex::new(Keys::default()),
                sink: OnceLock::new(),
            }),
        }
    }

    /// Holds a key from a key file named in the configuration; `ssh-add -D`
    /// does not remove it.
    pub fn add_configured(&self, key: SkKey, comment: String) -> Identity {
        self.hold(key, comment, Origin::Config, None)
    }

    /// Loads the resident credentials ("ssh:" applications) of every connected
    /// authenticator, asking for each device's PIN through `prompter`, and
    /// returns the identities added.
    pub async fn load_resident(&self, prompter: Arc<dyn Prompter>) -> Result<Vec<Identity>, Error> {
        let mut added = Vec::new();
        for device in self.connected().await {
            let device_info = DeviceInfo::new(device.label());
            let subject = PromptSubject {
                device: Some(device_info.clone()),
                ..PromptSubject::default()
            };
            let info = self
                .inner
                .workers
                .run(&device, |d| d.info())
                .await?
                .map_err(|e| device_error(&device_info, e))?;
            let pin = if info.client_pin_set {
                Some(ask_pin(self, &device, subject, prompter.as_ref()).await?)
            } else {
                None
            };
            let label = device.label();
            let found = self
                .inner
                .workers
                .run(&device, move |d| resident::ssh_keys(d, pin.as_ref()))
                .await?
                .map_err(|e| device_error(&device_info, e))?;
            for (key, application) in found {
                let comment = format!("{application} on {label}");
                added.push(self.hold(key, comment, Origin::Resident, Some(device_info.clone())));
            }
        }
        Ok(added)
    }

    fn hold(
        &self,
        key: SkKey,
        comment: String,
        origin: Origin,
        device: Option<DeviceInfo>,
    ) -> Identity {
        self.hold_with(key, comment, origin, device, None, None)
    }

    fn hold_with(
        &self,
        key: SkKey,
        comment: String,
        origin: Origin,
        device: Option<DeviceInfo>,
        certificate: Option<Arc<ssh_key::Certificate>>,
        provider: Option<String>,
    ) -> Identity {
        let identity = {
            let mut keys = self.keys();
            // Adding a key again replaces it in its place in the list, as in
            // OpenSSH, where a key and a certificate of it (or two
            // certificates) are different keys.
            let place = keys.held.iter().position(|h| {
                h.key.public_key() == key.public_key()
                    && h.identity.certificate() == certificate.as_deref()
                    && h.origin != Origin::Config
            });
            keys.next_id += 1;
            let id = keys.next_id;
            let mut identity = Identity::new(
                key.public_key().clone(),
                comment.clone(),
                KeyRef::new(NAME, id.to_be_bytes().to_vec()),
            )
            .with_device(device.unwrap_or_else(|| DeviceInfo::new("security key")));
            if let Some(certificate) = certificate {
                identity = identity.with_certificate(certificate);
            }
            let held = Held {
                id,
                key,
                comment,
                origin,
                provider,
                identity: identity.clone(),
            };
            match place {
                Some(at) => keys.held[at] = held,
                None => keys.held.push(held),
            }
            identity
        };
        self.publish();
        identity
    }

    fn keys(&self) -> MutexGuard<'_, Keys> {
        // The lock guards plain data that no code path leaves half-updated.
        self.inner
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self) {
        // Published under the lock, so two changes never publish out of order.
        let keys = self.keys();
        if let Some(sink) = self.inner.sink.get() {
            sink.publish(keys.held.iter().map(|h| h.identity.clone()).collect());
        }
    }

    fn lookup(&self, key: &KeyRef) -> Option<Found> {
        let id = u64::from_be_bytes(key.handle().try_into().ok()?);
        self.keys().held.iter().find(|h| h.id == id).map(|h| Found {
            key: h.key.clone(),
            comment: h.comment.clone(),
            provider: h.provider.clone(),
        })
    }

    /// Lets the helpers of middlewares no held key names any more stop.
    fn release_unused_middlewares(&self) {
        let in_use: Vec<String> = self
            .keys()
            .held
            .iter()
            .filter_map(|h| h.provider.clone())
            .collect();
        self.inner.middlewares.retain(&in_use);
        self.inner
            .middleware_pin_turns
            .retain(|provider| in_use.iter().any(|p| p == provider));
    }

    /// Signs through the middleware at `provider`, as OpenSSH's ssh-agent
    /// does: the PIN first when the key requires verification, the touch
    /// notice while the middleware waits, and when the middleware asks for a
    /// PIN the key's flags did not announce, the PIN once and a second try.
    async fn sign_through_middleware(
        &self,
        sk_key: &SkKey,
        provider: &str,
        subject: PromptSubject,
        request: &SignRequest,
        prompter: &dyn Prompter,
        arrived: Instant,
    ) -> Result<SshSignature, Error> {
        let device = middleware_device(provider);
        // Every PIN is asked in the middleware's turn, held until it has
        // answered (see crate::turn): the one a verify-required key needs
        // first, and the one a middleware asks for on its own.
        let turn = self.inner.middleware_pin_turns.of(provider);
        let ask = || async {
            let held = turn.take(arrived).await?;
            let pin = held.asked(ask_middleware_pin(subject.clone(), prompter, &device).await)?;
            Ok::<_, Error>((held, pin))
        };
        let (mut held, mut pin) = if sk_key.needs_pin() {
            let (held, pin) = ask().await?;
            (Some(held), Some(pin))
        } else {
            (None, None)
        };
        let algorithm = match sk_key.algorithm() {
            CoseAlgorithm::EdDsa => SkAlgorithm::Ed25519,
            CoseAlgorithm::Es256 => SkAlgorithm::Ecdsa,
        };
        let (signed, refused) = loop {
            let sign = middleware::Sign {
                alg: algorithm.code(),
                data: request.data.clone(),
                application: sk_key.application().to_owned(),
                key_handle: sk_key.key_handle().to_vec(),
                flags: sk_key.flags(),
                pin: pin
                    .as_ref()
                    .map(|p| middleware::Pin::new(p.expose_secret().to_owned())),
            };
            tracing::debug!(
                middleware = provider,
                application = sk_key.application(),
                user_presence = sk_key.needs_touch(),
                user_verification = pin.is_some(),
                "sk_sign"
            );
            let notice = sk_key.needs_touch().then(|| {
                prompter.notify(&Notice {
                    kind: NoticeKind::Touch,
                    subject: subject.clone(),
                })
            });
            let result = self.inner.middlewares.sign(provider, sign).await;
            drop(notice);
            match result {
                Ok(signed) => break (Ok(signed), false),
                Err(MiddlewareError::Sk {
                    error: SkError::PinRequired,
                    ..
                }) if pin.is_none() => {
                    // A device that demands verification for every use (alwaysUv).
                    tracing::debug!(middleware = provider, "the sk middleware asks for a PIN");
                    let (now_held, given) = ask().await?;
                    (held, pin) = (Some(now_held), Some(given));
                }
                Err(MiddlewareError::Sk {
                    error: SkError::PinRequired,
                    ..
                }) => {
                    // sk-api.h has no code for a wrong PIN: PIN_REQUIRED in
                    // answer to a PIN means it was refused. Never retried:
                    // each try costs one of the device's.
                    let wrong = Error::WrongPin {
                        device: device.clone(),
                        tries_left: None,
                    };
                    break (Err(wrong), true);
                }
                Err(err) => break (Err(middleware_error(&device, err)), false),
            }
        };
        let signed = match held {
            Some(held) => held.answered(signed, refused),
            None => signed,
        }?;
        tracing::debug!(
            middleware = provider,
            flags = signed.flags,
            counter = signed.counter,
            "sk_sign answered"
        );
        check_flags(sk_key, AuthFlags(signed.flags), &device)?;
        let signature = sk_key.signature_from_parts(
            signed.flags,
            signed.counter,
            &signed.sig_r,
            &signed.sig_s,
        )?;
        verified(sk_key, &request.data, signature, &device)
    }

    async fn connected(&self) -> Vec<Arc<dyn Authenticator>> {
        let discovery = self.inner.discovery.clone();
        let devices = tokio::task::spawn_blocking(move || discovery.connected())
            .await
            .unwrap_or_default();
        let ids: Vec<String> = devices.iter().map(|d| d.id()).collect();
        self.inner.workers.retain(&ids);
        self.inner
            .pin_turns
            .retain(|id| ids.iter().any(|i| i == id));
        devices
    }

    /// The connected authenticator that holds `key`: the only one, or the
    /// first that accepts the handle in a silent probe (up = false), as
    /// OpenSSH's sk helper does when several keys are plugged in.
    async fn holder(&self, key: &SkKey) -> Result<Arc<dyn Authenticator>, Error> {
        let devices = self.connected().await;
        if devices.len() == 1 {
            return devices.into_iter().next().ok_or_else(no_holder);
        }
        self.probe(key, devices).await
    }

    /// The first of `devices` that accepts the handle of `key` in a silent probe.
    async fn probe(
        &self,
        key: &SkKey,
        devices: Vec<Arc<dyn Authenticator>>,
    ) -> Result<Arc<dyn Authenticator>, Error> {
        let mut maybe = None;
        for device in devices {
            let probe = GetAssertion {
                rp_id: key.application().to_owned(),
                message: b"token-agent probe".to_vec(),
                credential_id: key.key_handle().to_vec(),
                user_presence: false,
                pin: None,
            };
            match self
                .inner
                .workers
                .run(&device, move |d| d.get_assertion(&probe))
                .await
            {
                Ok(Ok(_)) => return Ok(device),
                // A verify-required key made as OpenSSH makes it has
                // credProtect userVerificationRequired, which the device
                // hides from an assertion without the PIN: "no credentials"
                // then does not say it is not theirs.
                Ok(Err(CtapError::NoCredentials)) if key.needs_pin() => {
                    maybe.get_or_insert(device);
                }
                Ok(Err(CtapError::NoCredentials | CtapError::Removed)) | Err(_) => {}
                // Some devices refuse silent assertions (a PIN-protected
                // credential): it may still be theirs.
                Ok(Err(err)) => {
                    tracing::debug!(device = device.label(), %err, "silent probe refused");
                    maybe.get_or_insert(device);
                }
            }
        }
        maybe.ok_or_else(no_holder)
    }
}

#[async_trait]
impl Backend for FidoBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn start(&self, sink: IdentitySink) {
        let _ = self.inner.sink.set(sink);
        self.publish();
    }

    async fn sign(
        &self,
        key: &KeyRef,
        request: &SignRequest,
        context: &SignContext,
        prompter: Arc<dyn Prompter>,
    ) -> Result<SshSignature, Error> {
        // Where the request stands among others that ask for the same PIN.
        let arrived = Instant::now();
        let Found {
            key: sk_key,
            comment,
            provider,
        } = self.lookup(key).ok_or(Error::KeyNotFound)?;
        if let Some(provider) = provider {
            let subject = PromptSubject {
                key: Some(comment),
                fingerprint: Some(sk_key.public_key().fingerprint(HashAlg::Sha256).to_string()),
                device: Some(middleware_device(&provider)),
                ..PromptSubject::default()
            }
            .with_context(context);
            return self
                .sign_through_middleware(
                    &sk_key,
                    &provider,
                    subject,
                    request,
                    prompter.as_ref(),
                    arrived,
                )
                .await;
        }
        let device = self.holder(&sk_key).await?;
        let device_info = DeviceInfo::new(device.label());
        let subject = PromptSubject {
            key: Some(comment),
            fingerprint: Some(sk_key.public_key().fingerprint(HashAlg::Sha256).to_string()),
            device: Some(device_info.clone()),
            ..PromptSubject::default()
        }
        .with_context(context);
        // A verify-required key asks for the PIN in the device's turn, held
        // until the device has answered (see crate::turn).
        let turn = sk_key
            .needs_pin()
            .then(|| self.inner.pin_turns.of(&device.id()));
        let held = match &turn {
            Some(turn) => Some(turn.take(arrived).await?),
            None => None,
        };
        let pin = match &held {
            Some(held) => {
                Some(held.asked(ask_pin(self, &device, subject.clone(), prompter.as_ref()).await)?)
            }
            None => None,
        };
        let assertion = GetAssertion {
            rp_id: sk_key.application().to_owned(),
            message: request.data.clone(),
            credential_id: sk_key.key_handle().to_vec(),
            user_presence: sk_key.needs_touch(),
            pin,
        };
        tracing::debug!(
            device = device.label(),
            application = sk_key.application(),
            user_presence = assertion.user_presence,
            user_verification = assertion.pin.is_some(),
            "getAssertion"
        );
        // The notice goes up now; the prompter shows it only if the device has
        // not answered after its delay, and it is withdrawn when the guard drops.
        let notice = sk_key.needs_touch().then(|| {
            prompter.notify(&Notice {
                kind: NoticeKind::Touch,
                subject,
            })
        });
        let result = self
            .inner
            .workers
            .run(&device, move |d| d.get_assertion(&assertion))
            .await;
        drop(notice);
        let refused = matches!(
            result,
            Ok(Err(CtapError::PinInvalid { .. }
                | CtapError::PinBlocked
                | CtapError::PinAuthBlocked))
        );
        let assertion = result.and_then(|r| r.map_err(|e| device_error(&device_info, e)));
        let assertion = match held {
            Some(held) => held.answered(assertion, refused),
            None => assertion,
        }?;
        tracing::debug!(
            device = device.label(),
            flags = assertion.flags.0,
            counter = assertion.counter,
            "assertion made"
        );
        check_flags(&sk_key, assertion.flags, &device_info)?;
        let signature = sk_key.signature(&assertion)?;
        verified(&sk_key, &request.data, signature, &device_info)
    }

    fn accepts_key(&self, algorithm: &Algorithm) -> bool {
        sk::is_sk(algorithm)
    }

    async fn add_key(&self, key: AddKey) -> Result<Identity, Error> {
        let sk_key = SkKey::from_keypair(&key.keypair).ok_or_else(|| Error::InvalidKey {
            reason: "the FIDO backend takes only sk-ssh-ed25519 and sk-ecdsa-sha2-nistp256 keys"
                .into(),
        })?;
        // OpenSSH reads the application as a C string and refuses such a key;
        // a middleware could never be handed it, so it would fail every signature.
        if sk_key.application().contains('\0') {
            return Err(Error::InvalidKey {
                reason: "the key's application contains a NUL byte, which no security key \
                         can sign for (OpenSSH refuses such keys too)"
                    .into(),
            });
        }
        if let Some(certificate) = &key.certificate {
            if certificate.public_key() != sk_key.public_key() {
                return Err(Error::InvalidKey {
                    reason: "the certificate does not certify this key".into(),
                });
            }
        }
        let device = match &key.sk_provider {
            // A middleware is loaded (in its helper) now, so that a library
            // that is not one is refused here rather than at the first use.
            Some(provider) => {
                let device = middleware_device(provider);
                if let Err(err) = self.inner.middlewares.load(provider).await {
                    self.release_unused_middlewares();
                    return Err(middleware_error(&device, err));
                }
                Some(device)
            }
            // Which plugged-in key holds it, so that listings and messages
            // name the device; a key added while its device is away is
            // listed as "security key".
            None => {
                let devices = self.connected().await;
                match self.probe(&sk_key, devices).await {
                    Ok(device) => Some(DeviceInfo::new(device.label())),
                    Err(_) => None,
                }
            }
        };
        let identity = self.hold_with(
            sk_key,
            key.comment.clone(),
            Origin::Client,
            device,
            key.certificate.clone(),
            key.sk_provider.clone(),
        );
        // The key may have replaced one that named another middleware (or
        // the same key added with -S, now "internal"): that helper may go.
        self.release_unused_middlewares();
        Ok(identity)
    }

    async fn remove_key(&self, key: &KeyRef) -> Result<(), Error> {
        let id = key
            .handle()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| Error::KeyNotFound)?;
        {
            let mut keys = self.keys();
            let Some(position) = keys.held.iter().position(|h| h.id == id) else {
                return Err(Error::KeyNotFound);
            };
            if keys.held[position].origin == Origin::Config {
                return Err(Error::Refused {
                    reason: "this key comes from the configuration; remove it there".into(),
                });
            }
            keys.held.remove(position);
        }
        self.publish();
        self.release_unused_middlewares();
        Ok(())
    }

    async fn remove_all(&self) {
        self.keys().held.retain(|h| h.origin == Origin::Config);
        self.publish();
        self.release_unused_middlewares();
    }

    /// The sk keys held, by what signs them: the agent's own FIDO code
    /// (whichever connected security key holds the credential) or each
    /// middleware. Security keys themselves are not enumerated here: that
    /// is a HID scan, done only when a signature needs it.
    fn devices(&self) -> Vec<DeviceStatus> {
        let keys = self.keys();
        let mut by_signer: Vec<(Option<String>, usize)> = Vec::new();
        for held in &keys.held {
            match by_signer.iter_mut().find(|(p, _)| *p == held.provider) {
                Some((_, count)) => *count += 1,
                None => by_signer.push((held.provider.clone(), 1)),
            }
        }
        by_signer
            .into_iter()
            .map(|(provider, count)| {
                let keys = if count == 1 {
                    "1 sk key".to_owned()
                } else {
                    format!("{count} sk keys")
                };
                match provider {
                    None => DeviceStatus {
                        label: "security keys (USB HID)".into(),
                        details: vec![
                            keys,
                            "signed by whichever connected security key holds each".into(),
                        ],
                        problem: false,
                    },
                    Some(path) => DeviceStatus {
                        label: middleware_device(&path).label().to_owned(),
                        details: vec![keys, "signed through its helper process".into()],
                        problem: false,
                    },
                }
            })
            .collect()
    }
}

impl fmt::Debug for FidoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FidoBackend")
            .field("discovery", &self.inner.discovery)
            .field("keys", &self.keys().held.len())
            .finish_non_exhaustive()
    }
}

/// Asks for the PIN of the security key behind a middleware (which cannot say
/// how many tries are left) and checks its length before it can cost a try.
async fn ask_middleware_pin(
    subject: PromptSubject,
    prompter: &dyn Prompter,
    device: &DeviceInfo,
) -> Result<SecretString, Error> {
    let pin = prompter.pin(&PinRequest::new(subject)).await?;
    check_pin_length(&pin, device)?;
    Ok(pin)
}

/// Asks for the PIN of `device`, with the tries left; refuses at once when the
/// PIN is blocked and checks the PIN's length before it can cost a try.
async fn ask_pin(
    backend: &FidoBackend,
    device: &Arc<dyn Authenticator>,
    subject: PromptSubject,
    prompter: &dyn Prompter,
) -> Result<SecretString, Error> {
    let device_info = DeviceInfo::new(device.label());
    let info = backend
        .inner
        .workers
        .run(device, |d| d.info())
        .await?
        .map_err(|e| device_error(&device_info, e))?;
    if !info.client_pin_set {
        // Asking would have the person invent a PIN the device then refuses.
        return Err(Error::Device {
            device: device_info,
            message: "has no PIN set, and this key needs the security key's PIN for every \
                      signature (verify-required): set a PIN on the security key (for instance \
                      with ykman fido access change-pin), then try again"
                .into(),
        });
    }
    let retries = backend
        .inner
        .workers
        .run(device, |d| d.pin_retries())
        .await?
        .map_err(|e| device_error(&device_info, e))?;
    if retries == 0 {
        return Err(pin_blocked(&device_info));
    }
    let mut request = PinRequest::new(subject);
    request.tries_left = Some(retries);
    let pin = prompter.pin(&request).await?;
    check_pin_length(&pin, &device_info)?;
    Ok(pin)
}

/// CTAP 2.1 section 6.5.1: a PIN has at least 4 code points and at most 63
/// bytes. Anything else would be refused and might count as a try.
fn check_pin_length(pin: &SecretString, device: &DeviceInfo) -> Result<(), Error> {
    let exposed = pin.expose_secret();
    if exposed.chars().count() < 4 || exposed.len() > 63 {
        return Err(Error::Device {
            device: device.clone(),
            message: "a FIDO PIN has 4 to 63 characters; nothing was sent to the device".into(),
        });
    }
    Ok(())
}

/// `signature` if it verifies over `data` with the key. A device that signed
/// with another credential (or a middleware that built the answer wrong)
/// would give the server a signature it rejects; say so here instead.
fn verified(
    key: &SkKey,
    data: &[u8],
    signature: SshSignature,
    device: &DeviceInfo,
) -> Result<SshSignature, Error> {
    let parsed = Signature::try_from(signature.as_bytes()).map_err(|e| Error::Device {
        device: device.clone(),
        message: format!("returned a malformed signature: {e}"),
    })?;
    signature::Verifier::verify(key.public_key(), data, &parsed).map_err(|_| Error::Device {
        device: device.clone(),
        message: "returned a signature that does not verify with this key".into(),
    })?;
    Ok(signature)
}

/// How prompts and errors name the security key behind a middleware.
fn middleware_device(provider: &str) -> DeviceInfo {
    DeviceInfo::new(format!("security key via {provider}"))
}

/// Turns a middleware failure into the words a person needs; a crash or a
/// hang is logged as an error at once, since the agent survived it.
fn middleware_error(device: &DeviceInfo, error: MiddlewareError) -> Error {
    let message = match &error {
        MiddlewareError::Sk {
            path,
            error: SkError::General,
        } => format!(
            "sk_sign failed in the sk middleware {path}, which gives no reason \
             (SSH_SK_ERR_GENERAL): usually a touch that was denied or not given in time, \
             or a security key that does not hold this key"
        ),
        MiddlewareError::Sk {
            path,
            error: SkError::DeviceNotFound,
        } => format!(
            "the sk middleware {path} found no security key (SSH_SK_ERR_DEVICE_NOT_FOUND); \
             plug in the key this key was made on"
        ),
        MiddlewareError::Crashed { .. }
        | MiddlewareError::TimedOut { .. }
        | MiddlewareError::NotReading { .. }
        | MiddlewareError::Gone { .. } => {
            let message = error.to_string();
            tracing::error!("{message}");
            message
        }
        other => other.to_string(),
    };
    Error::Device {
        device: device.clone(),
        message,
    }
}

/// Checks that the authenticator did what the key demands: UP for keys that
/// need a touch, UV for keys that need the PIN (the server checks both too).
fn check_flags(key: &SkKey, flags: AuthFlags, device: &DeviceInfo) -> Result<(), Error> {
    if key.needs_touch() && !flags.user_present() {
        return Err(Error::Device {
            device: device.clone(),
            message: "signed without user presence although the key requires a touch".into(),
        });
    }
    if key.needs_pin() && !flags.user_verified() {
        return Err(Error::Device {
            device: device.clone(),
            message: "signed without user verification although the key requires the PIN".into(),
        });
    }
    Ok(())
}

fn no_holder() -> Error {
    Error::Device {
        device: DeviceInfo::new("FIDO"),
        message: "no connected security key holds this key; plug in the key it was made on".into(),
    }
}

fn pin_blocked(device: &DeviceInfo) -> Error {
    Error::PinBlocked {
        device: device.clone(),
        remedy: "only a reset of the security key unblocks it, and a reset deletes all its keys"
            .into(),
    }
}

/// Turns what the authenticator answered into the words a person needs.
pub(crate) fn device_error(device: &DeviceInfo, error: CtapError) -> Error {
    match error {
        CtapError::NoCredentials => no_holder(),
        CtapError::PinInvalid { retries } => Error::WrongPin {
            device: device.clone(),
            tries_left: Some(retries),
        },
        CtapError::PinBlocked => pin_blocked(device),
        CtapError::UserActionTimeout { seconds } => {
            tracing::info!(
                device = device.label(),
                seconds,
                "no touch within {seconds} s"
            );
            Error::TouchTimeout {
                device: device.clone(),
            }
        }
        CtapError::OperationDenied => Error::Device {
            device: device.clone(),
            message: "the touch was denied on the device".into(),
        },
        CtapError::Removed => Error::DeviceRemoved {
            device: device.clone(),
        },
        other => Error::Device {
            device: device.clone(),
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use token_agent_core::AddKey;

    use super::*;
    use crate::ctap::CredentialPublicKey;

    #[tokio::test]
    async fn a_key_whose_application_holds_a_nul_byte_is_refused_when_added() {
        let backend = FidoBackend::new(Arc::new(Fixed(Vec::new())));
        let key = SkKey::from_credential(
            &CredentialPublicKey::Ed25519([7; 32]),
            "ssh:a\0b",
            0x01,
            vec![1; 16],
        )
        .unwrap();
        let result = backend
            .add_key(AddKey {
                keypair: Box::new(key.to_keypair().unwrap()),
                opaque_secret: None,
                comment: "nul".into(),
                certificate: None,
                sk_provider: None,
            })
            .await;
        match result {
            Err(Error::InvalidKey { reason }) => assert!(reason.contains("NUL byte"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
