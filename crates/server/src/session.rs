//! One client connection: read a frame, decode it, answer it, repeat.
//!
//! Requests on one connection are answered in order, as OpenSSH's agent
//! does; connections are served concurrently. A malformed or unknown message
//! gets SSH_AGENT_FAILURE and the connection goes on; an oversized frame
//! closes the connection before its body is read.

use std::sync::Arc;

use secrecy::SecretString;
use ssh_agent_lib::proto::extension::RestrictDestination;
use ssh_agent_lib::proto::{
    AddIdentity, AddIdentityConstrained, AddSmartcardKeyConstrained, Extension, KeyConstraint,
    PrivateCredential, PrivateKeyData, PublicCredential, Request, SmartcardKey,
};
use ssh_key::private::{EcdsaKeypair, KeypairData, RsaKeypair};
use ssh_key::public::{EcdsaPublicKey, KeyData};
use token_agent_core::{AddKey, Peer, ProviderRequest, SignContext, SignFlags, SignRequest};
use tokio::net::UnixStream;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::constraints::{Constraints, SessionBindings};
use crate::proto::frame::{read_frame, write_frame, FrameError};
use crate::proto::message::encode_blob;
use crate::proto::message::{decode_exact, decode_request, ListedIdentity, Reply};
use crate::router::{Refusal, Router};

/// The extensions this agent implements, answered to "query".
const EXTENSIONS: &[&str] = &["query", "session-bind@openssh.com"];

/// Serves one connection until the client closes it or breaks the framing.
pub(crate) async fn serve(router: Arc<Router>, mut stream: UnixStream, peer: Peer) {
    let span = tracing::debug_span!("client", pid = peer.pid, exe = ?peer.exe);
    let mut session = Session {
        router,
        peer,
        bindings: SessionBindings::default(),
    };
    async move {
        // Frames can carry private keys and passwords: wipe the buffer when done.
        let mut body = Zeroizing::new(Vec::new());
        loop {
            match read_frame(&mut stream, &mut body).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(FrameError::TooLong(len)) => {
                    tracing::warn!(len, "closing a connection that sent an oversized message");
                    break;
                }
                Err(err) => {
                    tracing::debug!(%err, "connection ended");
                    break;
                }
            }
            let reply = session.handle_frame(&body).await;
            body.fill(0);
            if let Err(err) = write_frame(&mut stream, &reply).await {
                tracing::debug!(%err, "could not answer; the client went away");
                break;
            }
        }
    }
    .instrument(span)
    .await;
}

struct Session {
    router: Arc<Router>,
    peer: Peer,
    bindings: SessionBindings,
}

impl Session {
    async fn handle_frame(&mut self, frame: &[u8]) -> Vec<u8> {
        let request = match decode_request(frame) {
            Ok(request) => request,
            Err(err) => {
                tracing::debug!(%err, "refusing a message");
                return Reply::Failure.encode();
            }
        };
        let kind = request.message_id();
        let span = tracing::debug_span!("request", kind);
        self.handle(request).instrument(span).await
    }

    async fn handle(&mut self, request: Request) -> Vec<u8> {
        let router = self.router.clone();
        if router.lock().is_locked() {
            match request {
                Request::Unlock(password) => return self.unlock(password).await,
                Request::RequestIdentities => return Reply::Identities(Vec::new()).encode(),
                Request::Lock(password) => {
                    drop(Zeroizing::new(password));
                    tracing::info!("refusing to lock an already locked agent");
                    return Reply::Failure.encode();
                }
                _ => {
                    tracing::info!("refusing a request while the agent is locked");
                    return Reply::Failure.encode();
                }
            }
        }
        match request {
            Request::RequestIdentities => self.list(),
            Request::SignRequest(sign) => {
                self.sign(sign.credential, sign.data, SignFlags::from_bits(sign.flags))
                    .await
            }
            Request::AddIdentity(AddIdentity { credential }) => {
                self.add(credential, Vec::new()).await
            }
            Request::AddIdConstrained(AddIdentityConstrained {
                identity,
                constraints,
            }) => self.add(identity.credential, constraints).await,
            Request::RemoveIdentity(remove) => self.remove(&remove.credential).await,
            Request::RemoveAllIdentities => status(router.remove_all().await.map(|()| {
                tracing::info!("removed all keys");
            })),
            Request::AddSmartcardKey(key) => self.add_provider(key, Vec::new()).await,
            Request::AddSmartcardKeyConstrained(AddSmartcardKeyConstrained {
                key,
                constraints,
            }) => self.add_provider(key, constraints).await,
            Request::RemoveSmartcardKey(key) => {
                let provider = key.id.clone();
                drop(key);
                status(router.remove_provider(&provider).await.map(|()| {
                    tracing::info!(provider, "removed provider");
                }))
            }
            Request::Lock(password) => {
                let password = SecretString::from(password);
                if router.lock_agent(&password) {
                    tracing::info!(client = %self.peer, "agent locked");
                    Reply::Success.encode()
                } else {
                    Reply::Failure.encode()
                }
            }
            Request::Unlock(password) => self.unlock(password).await,
            Request::Extension(extension) => self.extension(extension),
        }
    }

    fn context(&self) -> SignContext {
        SignContext {
            peer: self.peer.clone(),
            destination: None,
            forwarded: self.bindings.forwarded(),
        }
    }

    /// The context of a request that would load a library (`ssh-add -s`,
    /// `ssh-add -S`). As OpenSSH 9.4+ does, a connection that has seen any
    /// session bind comes through ssh, so it counts as forwarded: it may not
    /// load providers unless -O allow-remote-pkcs11 (CVE-2023-38408).
    fn provider_context(&self) -> SignContext {
        SignContext {
            forwarded: !self.bindings.hops().is_empty(),
            ..self.context()
        }
    }

    fn list(&self) -> Vec<u8> {
        let entries = self.router.list(&self.bindings);
        tracing::debug!(count = entries.len(), "listing identities");
        Reply::Identities(
            entries
                .iter()
                .map(|e| ListedIdentity {
                    blob: &e.blob,
                    comment: e.identity.comment(),
                })
                .collect(),
        )
        .encode()
    }

    async fn sign(&self, credential: PublicCredential, data: Vec<u8>, flags: SignFlags) -> Vec<u8> {
        let (blob, key_data) = match credential_blob(&credential) {
            Ok(found) => found,
            Err(err) => {
                tracing::debug!(%err, "refusing to sign for an unencodable key");
                return Reply::Failure.encode();
            }
        };
        let fingerprint = self.router.fingerprint(&key_data);
        tracing::debug!(key = %fingerprint, flags = flags.bits(), len = data.len(), "sign request");
        let request = SignRequest { data, flags };
        match self
            .router
            .sign(&blob, &key_data, request, self.context(), &self.bindings)
            .await
        {
            Ok((entry, signature, context)) => {
                tracing::info!(
                    key = %fingerprint,
                    comment = entry.identity.comment(),
                    backend = entry.identity.key().backend(),
                    device = entry.identity.device().map(|d| d.label()),
                    client = %context.peer,
                    exe = ?context.peer.exe,
                    uid = context.peer.uid,
                    destination = context.destination.as_ref().map(ToString::to_string),
                    forwarded = context.forwarded,
                    algorithm = signature.algorithm(),
                    "signed"
                );
                Reply::Signature(signature).encode()
            }
            Err(refusal) => {
                log_refusal("sign", &fingerprint.to_string(), &self.peer, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn add(&self, credential: PrivateCredential, constraints: Vec<KeyConstraint>) -> Vec<u8> {
        let Parsed {
            constraints,
            sk_provider,
        } = match parse_constraints(constraints, false) {
            Ok(parsed) => parsed,
            Err(err) => {
                tracing::info!(%err, "refusing to add a key");
                return Reply::Failure.encode();
            }
        };
        let key = match add_key(credential, sk_provider) {
            Ok(key) => key,
            Err(err) => {
                tracing::info!(%err, "refusing to add a key");
                return Reply::Failure.encode();
            }
        };
        let (lifetime, confirm, restricted) = (
            constraints.expires_at.is_some(),
            constraints.confirm,
            !constraints.destinations.is_empty(),
        );
        let sk_provider = key.sk_provider.clone();
        match self
            .router
            .add_key(key, constraints, self.provider_context())
            .await
        {
            Ok(entry) => {
                tracing::info!(
                    key = %self.router.fingerprint(entry.identity.public_key()),
                    comment = entry.identity.comment(),
                    certificate = entry.identity.certificate().is_some(),
                    sk_provider,
                    lifetime,
                    confirm,
                    restricted,
                    client = %self.peer,
                    "added key"
                );
                Reply::Success.encode()
            }
            Err(refusal) => {
                log_refusal("add", "", &self.peer, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn remove(&self, credential: &PublicCredential) -> Vec<u8> {
        let Ok((blob, key_data)) = credential_blob(credential) else {
            return Reply::Failure.encode();
        };
        match self.router.remove(&blob).await {
            Ok(entry) => {
                tracing::info!(
                    key = %self.router.fingerprint(entry.identity.public_key()),
                    comment = entry.identity.comment(),
                    client = %self.peer,
                    "removed key"
                );
                Reply::Success.encode()
            }
            Err(refusal) => {
                let fp = self.router.fingerprint(&key_data);
                log_refusal("remove", &fp.to_string(), &self.peer, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn add_provider(&self, key: SmartcardKey, constraints: Vec<KeyConstraint>) -> Vec<u8> {
        let constraints = match parse_constraints(constraints, true) {
            Ok(parsed) => parsed.constraints,
            Err(err) => {
                tracing::info!(%err, "refusing to add a provider");
                return Reply::Failure.encode();
            }
        };
        let SmartcardKey { id, pin } = key;
        let pin = (!secrecy::ExposeSecret::expose_secret(&pin).is_empty()).then_some(pin);
        let request = ProviderRequest {
            provider: id.clone(),
            pin,
            context: self.provider_context(),
        };
        match self.router.add_provider(request, constraints).await {
            Ok(entries) => {
                tracing::info!(provider = id, keys = entries.len(), client = %self.peer, "added provider");
                Reply::Success.encode()
            }
            Err(refusal) => {
                log_refusal("add provider", &id, &self.peer, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn unlock(&self, password: String) -> Vec<u8> {
        let password = SecretString::from(password);
        if self.router.lock().unlock(&password).await {
            tracing::info!(client = %self.peer, "agent unlocked");
            Reply::Success.encode()
        } else {
            tracing::warn!(client = %self.peer, "unlock failed: wrong password or not locked");
            Reply::Failure.encode()
        }
    }

    fn extension(&mut self, extension: Extension) -> Vec<u8> {
        match extension.name.as_str() {
            "session-bind@openssh.com" => match self.bindings.bind(extension.details.as_ref()) {
                Ok(binding) => {
                    tracing::debug!(
                        host_key = %binding.host_key.key_data().fingerprint(ssh_key::HashAlg::Sha256),
                        forwarded = binding.forwarded,
                        "session bound"
                    );
                    Reply::Success.encode()
                }
                Err(err) => {
                    tracing::warn!(%err, client = %self.peer, "session bind refused");
                    Reply::Failure.encode()
                }
            },
            "query" => {
                let mut contents = Vec::new();
                let names: Vec<u8> = EXTENSIONS.iter().fold(Vec::new(), |mut out, name| {
                    crate::proto::message::put_string(&mut out, name.as_bytes());
                    out
                });
                contents.extend_from_slice(&names);
                Reply::Extension {
                    name: "query",
                    contents,
                }
                .encode()
            }
            other => {
                tracing::debug!(extension = other, "unsupported extension");
                Reply::Failure.encode()
            }
        }
    }
}

/// SSH_AGENT_SUCCESS for `Ok`, SSH_AGENT_FAILURE (logged) for `Err`.
fn status(result: Result<(), Refusal>) -> Vec<u8> {
    match result {
        Ok(()) => Reply::Success.encode(),
        Err(refusal) => {
            tracing::info!(%refusal, "request refused");
            Reply::Failure.encode()
        }
    }
}

fn log_refusal(operation: &str, key: &str, peer: &Peer, refusal: &Refusal) {
    match refusal {
        Refusal::Backend(err) => {
            tracing::error!(operation, key, client = %peer, error = %err, "request failed")
        }
        other => {
            tracing::info!(operation, key, client = %peer, reason = %other, "request refused")
        }
    }
}

/// The blob a client named a key by, and the key it certifies or is.
fn credential_blob(
    credential: &PublicCredential,
) -> Result<(Vec<u8>, KeyData), ssh_encoding::Error> {
    match credential {
        PublicCredential::Key(key) => Ok((encode_blob(key)?, key.clone())),
        PublicCredential::Cert(cert) => {
            Ok((encode_blob(cert.as_ref())?, cert.public_key().clone()))
        }
    }
}

/// The constraints of an add request, and the sk middleware it names.
#[derive(Debug)]
struct Parsed {
    constraints: Constraints,
    /// sk-provider@openssh.com: a library path, or `None` for "internal".
    sk_provider: Option<String>,
}

/// Turns the constraints of an add request into [`Constraints`] and the sk
/// middleware. Unknown constraints refuse the whole request, as in OpenSSH.
fn parse_constraints(list: Vec<KeyConstraint>, provider: bool) -> Result<Parsed, String> {
    let mut constraints = Constraints::default();
    let mut sk_provider = None;
    let mut seen_sk_provider = false;
    for constraint in list {
        match constraint {
            KeyConstraint::Lifetime(seconds) => {
                constraints =
                    constraints.with_lifetime(std::time::Duration::from_secs(u64::from(seconds)));
            }
            KeyConstraint::Confirm => constraints.confirm = true,
            KeyConstraint::Extension(ext) => match ext.name.as_str() {
                "restrict-destination-v00@openssh.com" => {
                    let parsed: RestrictDestination = decode_exact(ext.details.as_ref())
                        .map_err(|e| format!("bad destination constraint: {e}"))?;
                    constraints.destinations.extend(parsed.constraints);
                }
                // ssh-add names the middleware of an sk key: the path of
                // `-S`, or "internal" (our own FIDO code) when -S is not given.
                "sk-provider@openssh.com" if !provider => {
                    if seen_sk_provider {
                        return Err("sk-provider@openssh.com given twice".into());
                    }
                    seen_sk_provider = true;
                    // The constraint's data is one string, which the
                    // decoder has already unwrapped into the details.
                    let name = std::str::from_utf8(ext.details.as_ref())
                        .map_err(|_| "the sk-provider constraint is not UTF-8".to_owned())?
                        .to_owned();
                    if name.is_empty() {
                        return Err("empty sk-provider constraint".into());
                    }
                    if !name.eq_ignore_ascii_case("internal") {
                        sk_provider = Some(name);
                    }
                }
                // Certificates ssh-add sends along with a provider's keys
                // (OpenSSH 9.6+); the provider's own keys are listed regardless.
                "associated-certs-v00@openssh.com" if provider => {}
                other => return Err(format!("unknown constraint {other}")),
            },
        }
    }
    Ok(Parsed {
        constraints,
        sk_provider,
    })
}

/// Turns an add request's credential into an [`AddKey`].
fn add_key(credential: PrivateCredential, sk_provider: Option<String>) -> Result<AddKey, String> {
    match credential {
        PrivateCredential::Key { privkey, comment } => Ok(AddKey {
            keypair: privkey,
            comment,
            certificate: None,
            sk_provider,
        }),
        PrivateCredential::Cert {
            certificate,
            privkey,
            comment,
            ..
        } => {
            let keypair = keypair_for(privkey, certificate.public_key())?;
            Ok(AddKey {
                keypair,
                comment,
                certificate: Some(Arc::new(*certificate)),
                sk_provider,
            })
        }
    }
}

/// Joins a certificate's public key with the private half sent beside it.
fn keypair_for(private: PrivateKeyData, public: &KeyData) -> Result<KeypairData, String> {
    let mismatch = || "the private key does not match the certificate".to_owned();
    match (private, public) {
        (PrivateKeyData::Ed25519(keypair), KeyData::Ed25519(public)) => {
            if &keypair.public != public {
                return Err(mismatch());
            }
            Ok(KeypairData::Ed25519(keypair))
        }
        (PrivateKeyData::Rsa(private), KeyData::Rsa(public)) => Ok(KeypairData::Rsa(RsaKeypair {
            public: public.clone(),
            private,
        })),
        (PrivateKeyData::Ecdsa(private), KeyData::Ecdsa(public)) => {
            use ssh_agent_lib::proto::privatekey::EcdsaPrivateKey as P;
            let keypair = match (private, public) {
                (P::NistP256(private), EcdsaPublicKey::NistP256(public)) => {
                    EcdsaKeypair::NistP256 {
                        public: *public,
                        private,
                    }
                }
                (P::NistP384(private), EcdsaPublicKey::NistP384(public)) => {
                    EcdsaKeypair::NistP384 {
                        public: *public,
                        private,
                    }
                }
                (P::NistP521(private), EcdsaPublicKey::NistP521(public)) => {
                    EcdsaKeypair::NistP521 {
                        public: *public,
                        private,
                    }
                }
                _ => return Err(mismatch()),
            };
            Ok(KeypairData::Ecdsa(keypair))
        }
        _ => Err(mismatch()),
    }
}

#[cfg(test)]
mod tests {
    use ssh_agent_lib::proto::Unparsed;

    use super::*;

    fn extension(name: &str, details: &[u8]) -> KeyConstraint {
        KeyConstraint::Extension(Extension {
            name: name.to_owned(),
            details: Unparsed::from(details.to_vec()),
        })
    }

    #[test]
    fn sk_provider_constraints_name_the_middleware() {
        let parsed = parse_constraints(
            vec![
                KeyConstraint::Confirm,
                extension("sk-provider@openssh.com", b"/usr/lib/libsk.so"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(parsed.sk_provider.as_deref(), Some("/usr/lib/libsk.so"));
        assert!(parsed.constraints.confirm);
    }

    #[test]
    fn internal_is_our_own_fido_code() {
        // ssh-add sends "internal" for every sk key added without -S.
        for name in [&b"internal"[..], b"INTERNAL"] {
            let parsed =
                parse_constraints(vec![extension("sk-provider@openssh.com", name)], false).unwrap();
            assert_eq!(parsed.sk_provider, None);
        }
    }

    #[test]
    fn malformed_sk_provider_constraints_refuse_the_key() {
        let twice = parse_constraints(
            vec![
                extension("sk-provider@openssh.com", b"/a.so"),
                extension("sk-provider@openssh.com", b"/b.so"),
            ],
            false,
        );
        assert!(twice.unwrap_err().contains("twice"));
        let empty = parse_constraints(vec![extension("sk-provider@openssh.com", b"")], false);
        assert!(empty.is_err());
        // ssh-add -s never sends it: for a PKCS#11 provider it is unknown.
        let provider =
            parse_constraints(vec![extension("sk-provider@openssh.com", b"/a.so")], true);
        assert!(provider.unwrap_err().contains("unknown constraint"));
    }
}
