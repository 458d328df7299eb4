//! One client connection: read a frame, decode it, answer it, repeat.
//!
//! Requests on one connection are answered in order, as OpenSSH's agent
//! does; connections are served concurrently. A malformed or unknown message
//! gets SSH_AGENT_FAILURE and the connection goes on; an oversized frame
//! closes the connection before its body is read.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use ssh_key::public::KeyData;
use token_agent_core::{
    AddKey, Peer, PromptSubject, ProviderRequest, RefusalKind, SignContext, SignFlags, SignRequest,
};
use tokio::net::UnixStream;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::connection::Connection;
use crate::constraints::{Constraints, SessionBindings};
use crate::listing;
use crate::proto::frame::FrameError;
use crate::proto::key::{KeyOrCertificate, PrivateKey};
use crate::proto::message::{self, decode_request, ListedIdentity, Reply, Request};
use crate::router::{Entry, Refusal, Router};
use crate::status::{self, RefusalRecord};
use crate::upstream::{self, CallError, Forwarded, Links, Owner};

/// session-bind@openssh.com (PROTOCOL.agent section 1).
const SESSION_BIND: &str = "session-bind@openssh.com";

/// The extensions this agent implements, answered to "query".
const EXTENSIONS: &[&str] = &["query", SESSION_BIND, status::EXTENSION];

/// A client's executable as a log field: its path, or no field when unknown.
fn exe_field(peer: &Peer) -> Option<tracing::field::DisplayValue<std::path::Display<'_>>> {
    peer.exe
        .as_deref()
        .map(|exe| tracing::field::display(exe.display()))
}

/// Serves one connection until the client closes it or breaks the framing.
pub(crate) async fn serve(router: Arc<Router>, stream: UnixStream, peer: Peer) {
    let span = tracing::debug_span!("client", pid = peer.pid, exe = exe_field(&peer));
    let mut connection = match Connection::new(stream) {
        Ok(connection) => connection,
        Err(err) => {
            tracing::warn!(%err, pid = peer.pid, "cannot serve a connection");
            return;
        }
    };
    let upstreams = router.upstreams().links();
    let mut session = Session {
        router,
        peer,
        bindings: SessionBindings::default(),
        binds: Vec::new(),
        upstreams,
        signed: None,
    };
    async move {
        // Frames can carry private keys and passwords: wipe the buffer when done.
        let mut body = Zeroizing::new(Vec::new());
        loop {
            match connection.read_frame(&mut body).await {
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
            let written = connection.write_frame(&reply).await;
            // After the answer, so that the client does not wait for the log.
            if let Some(signed) = session.signed.take() {
                signed.log(&session.router);
            }
            if let Err(err) = written {
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
    /// The session binds this connection recorded, as sent: replayed, in
    /// order, on each upstream connection before it is used.
    binds: Vec<Vec<u8>>,
    /// This connection's connections to the upstream agents.
    upstreams: Links,
    /// The signature the request being answered made, logged once the
    /// answer is written.
    signed: Option<Signed>,
}

/// A signature made, for the audit line.
struct Signed {
    entry: Arc<Entry>,
    context: SignContext,
    algorithm: String,
}

impl Signed {
    fn log(self, router: &Router) {
        let Self {
            entry,
            context,
            algorithm,
        } = self;
        tracing::info!(
            key = %router.entry_fingerprint(&entry),
            comment = entry.identity.comment(),
            backend = entry.identity.key().backend(),
            device = entry.identity.device().map(|d| d.label()),
            client = %context.peer,
            exe = exe_field(&context.peer),
            uid = context.peer.uid,
            destination = context.destination.as_ref().map(ToString::to_string),
            forwarded = context.forwarded,
            algorithm,
            "signed"
        );
    }
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
        self.handle(request, frame).instrument(span).await
    }

    /// Answers `request`, decoded from `frame` (which requests passed on to
    /// an upstream agent are sent as).
    async fn handle(&mut self, request: Request, frame: &[u8]) -> Vec<u8> {
        let router = self.router.clone();
        if router.lock().is_locked() {
            match request {
                Request::Unlock(password) => return self.unlock(password).await,
                Request::RequestIdentities => return Reply::Identities(Vec::new()).encode(),
                Request::Lock(_) => {
                    tracing::info!("refusing to lock an already locked agent");
                    return Reply::Failure.encode();
                }
                // As OpenSSH: session binds go on while locked, so new
                // connections through ssh can bind before the unlock.
                Request::Extension { name, contents } if name == SESSION_BIND => {
                    return self.extension(&name, &contents);
                }
                // Status says the agent is locked (and, as a listing, shows no keys).
                Request::Extension { name, contents }
                    if name == status::EXTENSION && contents.is_empty() =>
                {
                    return self.status();
                }
                Request::Sign { key, .. } => {
                    let key = named_key(&key).ok().map(|k| self.router.fingerprint(&k));
                    self.refuse("sign", key, None, &Refusal::Locked);
                    return Reply::Failure.encode();
                }
                _ => {
                    tracing::info!("refusing a request while the agent is locked");
                    return Reply::Failure.encode();
                }
            }
        }
        match request {
            Request::RequestIdentities => self.list().await,
            Request::Sign { key, data, flags } => {
                self.sign(&key, data, SignFlags::from_bits(flags), frame)
                    .await
            }
            Request::AddIdentity { .. } if router.upstreams().add_to().is_some() => {
                self.add_upstream(frame).await
            }
            Request::AddIdentity {
                key,
                comment,
                constraints,
            } => self.add(key, comment, constraints).await,
            Request::RemoveIdentity { key } => self.remove(&key, frame).await,
            Request::RemoveAllIdentities => {
                let result = router.remove_all().await;
                self.remove_all_upstream(frame).await;
                self.answer(
                    "remove all",
                    None,
                    result.map(|()| {
                        tracing::info!("removed all keys");
                    }),
                )
            }
            Request::AddSmartcardKey {
                provider,
                pin,
                constraints,
            } => self.add_provider(provider, pin, constraints).await,
            Request::RemoveSmartcardKey { provider } => {
                let result = router.remove_provider(&provider).await;
                let logged = result.map(|()| tracing::info!(provider, "removed provider"));
                self.answer("remove provider", Some(provider), logged)
            }
            Request::Lock(password) => {
                if router.lock_agent(&password) {
                    tracing::info!(client = %self.peer, "agent locked");
                    Reply::Success.encode()
                } else {
                    Reply::Failure.encode()
                }
            }
            Request::Unlock(password) => self.unlock(password).await,
            Request::Extension { name, contents } => self.extension(&name, &contents),
        }
    }

    /// Logs a refusal with its kind, the client's process chain and the
    /// connection's hops, and keeps it for `token-agent status` (which also
    /// tells the person when they can act on it).
    fn refuse(
        &self,
        operation: &'static str,
        key: Option<String>,
        subject: Option<PromptSubject>,
        refusal: &Refusal,
    ) {
        let kind = refusal.kind();
        let record = RefusalRecord::new(
            operation,
            key,
            &self.peer,
            &self.bindings,
            kind,
            refusal.to_string(),
        );
        let key = record.key.as_deref().unwrap_or("");
        let client = record.client.join(" < ");
        let destination = record.destination.as_deref().unwrap_or("");
        if kind == RefusalKind::Failed {
            tracing::error!(operation, key, %client, destination, reason = %kind, error = %refusal, "request failed");
        } else {
            tracing::info!(operation, key, %client, destination, reason = %kind, message = %refusal, "request refused");
        }
        self.router.record_refusal(record, subject);
    }

    /// SSH_AGENT_SUCCESS for `Ok`, SSH_AGENT_FAILURE (refused as [`Session::refuse`]) for `Err`.
    fn answer(
        &self,
        operation: &'static str,
        key: Option<String>,
        result: Result<(), Refusal>,
    ) -> Vec<u8> {
        match result {
            Ok(()) => Reply::Success.encode(),
            Err(refusal) => {
                self.refuse(operation, key, None, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    /// The status@token-agent extension: only the agent's own user, and only
    /// on a connection that never sent a session bind (not forwarded).
    fn status(&self) -> Vec<u8> {
        if self.bindings.attempted() {
            tracing::info!(client = %self.peer, "refusing status to a forwarded connection");
            return Reply::Failure.encode();
        }
        if self.peer.uid != nix::unistd::geteuid().as_raw() {
            tracing::info!(client = %self.peer, uid = self.peer.uid, "refusing status to another user");
            return Reply::Failure.encode();
        }
        let document = self.router.status().to_string();
        let mut contents = Vec::with_capacity(4 + document.len());
        token_agent_core::push_string(&mut contents, document.as_bytes());
        Reply::Extension {
            name: status::EXTENSION,
            contents,
        }
        .encode()
    }

    fn context(&self) -> SignContext {
        SignContext {
            peer: self.peer.clone(),
            destination: None,
            forwarded: self.bindings.forwarded(),
        }
    }

    /// The context of a request that would load a library (`ssh-add -s`,
    /// `ssh-add -S`). As OpenSSH 9.4+ does, a connection that has sent any
    /// session bind, even one that did not verify, comes through ssh, so it
    /// counts as forwarded: it may not load providers unless -O
    /// allow-remote-pkcs11 (CVE-2023-38408).
    fn provider_context(&self) -> SignContext {
        SignContext {
            forwarded: self.bindings.attempted(),
            ..self.context()
        }
    }

    /// The agent's own keys, then each upstream's that no earlier source
    /// listed, ordered and filtered by the `[[listing]]` rule for this
    /// connection's destination, if one matches.
    async fn list(&mut self) -> Vec<u8> {
        let entries = self.router.list(&self.bindings);
        let upstream_keys = if self.upstreams.is_empty() {
            Vec::new()
        } else {
            self.upstreams.list(&self.binds).await
        };
        let mut listed: Vec<Listed<'_>> = entries
            .iter()
            .map(|e| Listed {
                blob: &e.blob,
                comment: e.identity.comment(),
                backend: e.identity.key().backend(),
                upstream: None,
            })
            .collect();
        let mut seen: HashSet<&[u8]> = listed.iter().map(|l| l.blob).collect();
        for (keys, socket) in upstream_keys.iter().zip(self.upstreams.sockets()) {
            for key in keys.iter() {
                if seen.insert(&key.blob) {
                    listed.push(Listed {
                        blob: &key.blob,
                        comment: &key.comment,
                        backend: upstream::BACKEND,
                        upstream: Some(socket),
                    });
                }
            }
        }
        let policy = self.router.policy();
        if let Some(rule) = listing::rule_for(
            &policy.listing,
            &self.bindings,
            &policy.forwarding.known_hosts,
        ) {
            let keys: Vec<Option<KeyData>> =
                listed.iter().map(|l| named_key(l.blob).ok()).collect();
            let sockets: Vec<Option<String>> = listed
                .iter()
                .map(|l| l.upstream.map(|s| s.display().to_string()))
                .collect();
            let candidates: Vec<listing::Candidate<'_>> = listed
                .iter()
                .zip(&keys)
                .zip(&sockets)
                .map(|((l, key), socket)| listing::Candidate {
                    key: key.as_ref(),
                    comment: l.comment,
                    backend: l.backend,
                    upstream: socket.as_deref(),
                })
                .collect();
            let order = listing::order(rule, &candidates);
            listed = order.into_iter().map(|i| listed[i]).collect();
        }
        fit_for_clients(&mut listed);
        tracing::debug!(count = listed.len(), "listing identities");
        Reply::Identities(
            listed
                .iter()
                .map(|l| ListedIdentity {
                    blob: l.blob,
                    comment: l.comment,
                })
                .collect(),
        )
        .encode()
    }

    async fn sign(
        &mut self,
        blob: &[u8],
        data: Vec<u8>,
        flags: SignFlags,
        frame: &[u8],
    ) -> Vec<u8> {
        tracing::debug!(
            key = %BlobFingerprint(&self.router, blob),
            flags = flags.bits(),
            len = data.len(),
            "sign request"
        );
        let request = SignRequest { data, flags };
        // A listed key's blob is not decoded: its entry holds the key.
        if self.router.snapshot().find(blob).is_none() {
            let key_data = match named_key(blob) {
                Ok(key) => key,
                Err(err) => {
                    tracing::debug!(%err, "refusing to sign for a malformed key blob");
                    return Reply::Failure.encode();
                }
            };
            if let Some(owner) = self.upstreams.find_owner(blob, &self.binds).await {
                let fingerprint = self.router.fingerprint(&key_data);
                return self
                    .sign_upstream(owner, blob, &key_data, fingerprint, &request, frame)
                    .await;
            }
        }
        match self
            .router
            .sign(blob, request, self.context(), &self.bindings)
            .await
        {
            Ok((entry, signature, context)) => {
                if tracing::enabled!(tracing::Level::INFO) {
                    self.signed = Some(Signed {
                        entry,
                        context,
                        algorithm: signature.algorithm().to_owned(),
                    });
                }
                Reply::Signature(signature).encode()
            }
            Err(refusal) => {
                let entry = self.router.snapshot().find(blob).cloned();
                let fingerprint = BlobFingerprint(&self.router, blob).to_string();
                let key = match &entry {
                    Some(entry) => format!("{} {fingerprint}", entry.identity.comment()),
                    None => fingerprint,
                };
                let subject = entry.map(|e| self.router.subject(&e).with_context(&self.context()));
                self.refuse("sign", Some(key), subject, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn add(
        &self,
        key: Box<PrivateKey>,
        comment: String,
        constraints: message::Constraints,
    ) -> Vec<u8> {
        // ssh-add names the middleware of an sk key: the path of `-S`, or
        // "internal" (our own FIDO code) when -S is not given.
        let sk_provider = match constraints.sk_provider.as_deref() {
            None => None,
            Some("") => {
                tracing::info!("refusing to add a key: empty sk-provider constraint");
                return Reply::Failure.encode();
            }
            Some(name) if name.eq_ignore_ascii_case("internal") => None,
            Some(name) => Some(name.to_owned()),
        };
        let PrivateKey {
            keypair,
            opaque_secret,
            certificate,
        } = *key;
        let key = AddKey {
            keypair,
            opaque_secret,
            comment,
            certificate: certificate.map(Arc::new),
            sk_provider,
        };
        let constraints = key_constraints(constraints);
        let (lifetime, confirm, restricted) = (
            constraints.expires_at.is_some(),
            constraints.confirm,
            !constraints.destinations.is_empty(),
        );
        let sk_provider = key.sk_provider.clone();
        match self
            .router
            .add_key(key, constraints, self.provider_context(), &self.bindings)
            .await
        {
            Ok(entry) => {
                tracing::info!(
                    key = %self.router.entry_fingerprint(&entry),
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
                self.refuse("add", None, None, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn remove(&mut self, blob: &[u8], frame: &[u8]) -> Vec<u8> {
        let Ok(key_data) = named_key(blob) else {
            return Reply::Failure.encode();
        };
        if self.router.snapshot().find(blob).is_none() {
            if let Some(owner) = self.upstreams.find_owner(blob, &self.binds).await {
                let fingerprint = self.router.fingerprint(&key_data);
                let forwarded = self.upstreams.forward(&owner, &self.binds, frame).await;
                return self.upstream_answer("remove", fingerprint, forwarded, |socket, fp| {
                    tracing::info!(key = %fp, comment = owner.comment, upstream = %socket, "removed key from upstream agent");
                });
            }
        }
        match self.router.remove(blob, &self.bindings).await {
            Ok(entry) => {
                tracing::info!(
                    key = %self.router.entry_fingerprint(&entry),
                    comment = entry.identity.comment(),
                    client = %self.peer,
                    "removed key"
                );
                Reply::Success.encode()
            }
            Err(refusal) => {
                let fp = self.router.fingerprint(&key_data);
                self.refuse("remove", Some(fp), None, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn add_provider(
        &self,
        provider: String,
        pin: SecretString,
        mut constraints: message::Constraints,
    ) -> Vec<u8> {
        let associated = constraints.associated_certs.take().unwrap_or_default();
        let constraints = key_constraints(constraints);
        let pin = (!pin.expose_secret().is_empty()).then_some(pin);
        let request = ProviderRequest {
            provider: provider.clone(),
            pin,
            context: self.provider_context(),
        };
        let certificates = associated.certificates.len();
        match self
            .router
            .add_provider(request, constraints, associated)
            .await
        {
            Ok(entries) => {
                tracing::info!(
                    provider,
                    keys = entries.len(),
                    certificates,
                    client = %self.peer,
                    "added provider"
                );
                Reply::Success.encode()
            }
            Err(refusal) => {
                self.refuse("add provider", Some(provider), None, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    /// Signs with an upstream agent's key: token-agent's lock and forwarding
    /// policy first, then the upstream (which applies its own constraints)
    /// gets the client's request as it came.
    async fn sign_upstream(
        &mut self,
        owner: Owner,
        blob: &[u8],
        key_data: &KeyData,
        fingerprint: String,
        request: &SignRequest,
        frame: &[u8],
    ) -> Vec<u8> {
        let context = self.context();
        if let Err(refusal) = self
            .router
            .authorize_upstream(
                blob,
                &owner.comment,
                key_data,
                request,
                &context,
                &self.bindings,
            )
            .await
        {
            let key = format!("{} {fingerprint}", owner.comment);
            self.refuse("sign", Some(key), None, &refusal);
            return Reply::Failure.encode();
        }
        let forwarded = self.upstreams.forward(&owner, &self.binds, frame).await;
        let key = format!("{} {fingerprint}", owner.comment);
        let peer = self.peer.clone();
        let forwarded_use = context.forwarded;
        self.upstream_answer("sign", key, forwarded, |socket, key| {
            tracing::info!(
                key,
                upstream = %socket,
                client = %peer,
                exe = exe_field(&peer),
                uid = peer.uid,
                forwarded = forwarded_use,
                "signed through upstream agent"
            );
        })
    }

    /// `ssh-add` with `add_to` set: the key goes to that upstream, as it came.
    async fn add_upstream(&mut self, frame: &[u8]) -> Vec<u8> {
        let Some(socket) = self.router.upstreams().add_to().map(Path::to_path_buf) else {
            return Reply::Failure.encode();
        };
        let Some(forwarded) = self.upstreams.forward_to(&socket, &self.binds, frame).await else {
            return Reply::Failure.encode();
        };
        let peer = self.peer.clone();
        self.upstream_answer("add", String::new(), forwarded, |socket, _| {
            tracing::info!(upstream = %socket, client = %peer, "added key to upstream agent");
        })
    }

    /// `ssh-add -D` also empties each upstream that answers; token-agent's
    /// own answer is what the client gets.
    async fn remove_all_upstream(&mut self, frame: &[u8]) {
        for forwarded in self.upstreams.forward_to_all(&self.binds, frame).await {
            match forwarded.reply {
                Ok(reply) if reply.first() == Some(&message::id::SUCCESS) => {
                    tracing::info!(upstream = %forwarded.socket.display(), "removed all keys of upstream agent");
                }
                Ok(_) => {
                    tracing::info!(upstream = %forwarded.socket.display(), "upstream agent refused to remove all its keys");
                }
                Err(err) => {
                    tracing::warn!(upstream = %forwarded.socket.display(), %err, "could not remove the keys of upstream agent");
                }
            }
        }
    }

    /// Passes an upstream's answer on: its reply as it came when it
    /// succeeded (`done` logs it), a refusal otherwise.
    fn upstream_answer(
        &self,
        operation: &'static str,
        key: String,
        forwarded: Forwarded,
        done: impl FnOnce(&std::path::Display<'_>, &str),
    ) -> Vec<u8> {
        let socket = forwarded.socket.display();
        let key_name = (!key.is_empty()).then(|| key.clone());
        match forwarded.reply {
            Ok(reply) if reply.first() == Some(&message::id::FAILURE) => {
                let refusal = Refusal::UpstreamRefused(socket.to_string());
                self.refuse(operation, key_name, None, &refusal);
                Reply::Failure.encode()
            }
            Ok(reply) => {
                done(&socket, &key);
                reply.to_vec()
            }
            Err(err) => {
                let refusal = Refusal::UpstreamFailed {
                    socket: socket.to_string(),
                    reason: upstream_reason(&err),
                };
                self.refuse(operation, key_name, None, &refusal);
                Reply::Failure.encode()
            }
        }
    }

    async fn unlock(&self, password: Zeroizing<Vec<u8>>) -> Vec<u8> {
        if self.router.lock().unlock(&password).await {
            tracing::info!(client = %self.peer, "agent unlocked");
            Reply::Success.encode()
        } else {
            tracing::warn!(client = %self.peer, "unlock failed: wrong password or not locked");
            Reply::Failure.encode()
        }
    }

    fn extension(&mut self, name: &str, contents: &[u8]) -> Vec<u8> {
        let hops = self.bindings.hops().len();
        match name {
            SESSION_BIND => match self.bindings.bind(contents) {
                Ok(binding) => {
                    tracing::debug!(
                        host_key = %binding.host_key.key_data().fingerprint(ssh_key::HashAlg::Sha256),
                        forwarded = binding.forwarded,
                        "session bound"
                    );
                    // A new hop (not a repeated bind) goes to the upstreams too.
                    if self.bindings.hops().len() > hops {
                        self.binds.push(contents.to_vec());
                    }
                    Reply::Success.encode()
                }
                Err(err) => {
                    tracing::warn!(%err, client = %self.peer, "session bind refused");
                    Reply::ExtensionFailure.encode()
                }
            },
            // OpenSSH's query: no contents, answered with the names of
            // the extensions this agent implements.
            "query" if contents.is_empty() => {
                let mut names = Vec::new();
                for name in EXTENSIONS {
                    token_agent_core::push_string(&mut names, name.as_bytes());
                }
                Reply::Extension {
                    name: "query",
                    contents: names,
                }
                .encode()
            }
            // A known extension that fails says so with
            // SSH_AGENT_EXTENSION_FAILURE; a name this agent does not know
            // gets SSH_AGENT_FAILURE, exactly as OpenSSH 10.5's
            // process_extension answers (RFC 9987 section 3.8).
            "query" => Reply::ExtensionFailure.encode(),
            status::EXTENSION if contents.is_empty() => self.status(),
            other => {
                tracing::debug!(extension = other, "unsupported extension");
                Reply::Failure.encode()
            }
        }
    }
}

/// One key of a listing, before the `[[listing]]` rule orders it.
#[derive(Debug, Clone, Copy)]
struct Listed<'a> {
    blob: &'a [u8],
    comment: &'a str,
    backend: &'a str,
    upstream: Option<&'a Path>,
}

impl Listed<'_> {
    /// The bytes this key takes in SSH_AGENT_IDENTITIES_ANSWER.
    fn encoded_len(&self) -> usize {
        8 + self.blob.len() + self.comment.len()
    }
}

/// The most keys an OpenSSH client takes in one listing (MAX_AGENT_IDENTITIES).
const MAX_LISTED_KEYS: usize = 2048;
/// The longest listing answer an OpenSSH client reads (MAX_AGENT_REPLY_LEN).
const MAX_LISTING_LEN: usize = 256 * 1024;

/// Leaves out what an OpenSSH client would refuse the whole listing for:
/// more than 2048 keys, or an answer over 256 KiB. Upstream agents' keys
/// go first, from the end, so the agent's own keys are always listed; only
/// if those alone are too many are some of them left out too.
fn fit_for_clients(listed: &mut Vec<Listed<'_>>) {
    // The message type and the count, then each key.
    let mut len = 5 + listed.iter().map(Listed::encoded_len).sum::<usize>();
    let mut count = listed.len();
    let fits = |count: usize, len: usize| count <= MAX_LISTED_KEYS && len <= MAX_LISTING_LEN;
    if fits(count, len) {
        return;
    }
    let mut keep = vec![true; listed.len()];
    for upstream_first in [true, false] {
        for (at, key) in listed.iter().enumerate().rev() {
            if fits(count, len) {
                break;
            }
            if keep[at] && (key.upstream.is_some() || !upstream_first) {
                keep[at] = false;
                count -= 1;
                len -= key.encoded_len();
            }
        }
    }
    let before = listed.len();
    let mut kept = keep.into_iter();
    listed.retain(|_| kept.next().unwrap_or(true));
    tracing::warn!(
        listed = listed.len(),
        left_out = before - listed.len(),
        "the listing left out keys (upstream agents' first): OpenSSH clients refuse a \
         listing of more than {MAX_LISTED_KEYS} keys or {MAX_LISTING_LEN} bytes"
    );
}

/// Why an upstream gave no answer, for the log.
fn upstream_reason(err: &CallError) -> String {
    match err {
        CallError::TimedOut => "did not answer in time".to_owned(),
        other => other.to_string(),
    }
}

/// The key a client names by `blob`: a public key, or a certificate's key.
fn named_key(blob: &[u8]) -> Result<KeyData, String> {
    KeyOrCertificate::decode(blob).map(|key| key.key_data().clone())
}

/// The fingerprint of the key a client names by a blob, worked out only
/// when shown (most requests name a listed key, whose blob is not decoded).
struct BlobFingerprint<'a>(&'a Router, &'a [u8]);

impl fmt::Display for BlobFingerprint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match named_key(self.1) {
            Ok(key) => f.write_str(&self.0.fingerprint(&key)),
            Err(_) => f.write_str("(malformed key)"),
        }
    }
}

/// The lifetime, confirm and destination constraints of an add request.
fn key_constraints(parsed: message::Constraints) -> Constraints {
    let mut constraints = Constraints {
        confirm: parsed.confirm,
        destinations: parsed.destinations.unwrap_or_default(),
        ..Constraints::default()
    };
    if let Some(seconds) = parsed.lifetime {
        constraints = constraints.with_lifetime(std::time::Duration::from_secs(u64::from(seconds)));
    }
    constraints
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_fits_openssh_clients_upstream_keys_left_out_first() {
        let upstream = Path::new("/run/upstream.sock");
        let blob = vec![0u8; 100];
        let key = |upstream: Option<&'static Path>| Listed {
            blob: &blob,
            comment: "k",
            backend: "software",
            upstream,
        };
        // Too many keys: 2 local keys among 2100 upstream ones.
        let mut listed = vec![key(None)];
        listed.extend((0..2100).map(|_| key(Some(upstream))));
        listed.push(key(None));
        fit_for_clients(&mut listed);
        assert_eq!(listed.len(), MAX_LISTED_KEYS);
        assert!(listed[0].upstream.is_none() && listed[MAX_LISTED_KEYS - 1].upstream.is_none());

        // Too many bytes: fewer keys, but each large.
        let big = vec![0u8; 1000];
        let mut listed: Vec<Listed<'_>> = (0..300)
            .map(|i| Listed {
                blob: &big,
                comment: "big",
                backend: "upstream",
                upstream: (i % 3 != 0).then_some(upstream),
            })
            .collect();
        fit_for_clients(&mut listed);
        let len = 5 + listed.iter().map(Listed::encoded_len).sum::<usize>();
        assert!(len <= MAX_LISTING_LEN, "{len}");
        assert_eq!(listed.iter().filter(|l| l.upstream.is_none()).count(), 100);

        // What fits stays as it is.
        let mut listed = vec![key(None), key(Some(upstream))];
        fit_for_clients(&mut listed);
        assert_eq!(listed.len(), 2);
    }
}
