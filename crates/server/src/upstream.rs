//! Other agents behind token-agent ("upstreams"): gpg-agent's SSH socket, a
//! password manager's agent, another ssh-agent, a forwarded agent.
//!
//! The agent lists its own keys first, then each upstream's in the order
//! they are configured, without the keys an earlier source already listed;
//! a signature goes to whoever holds the key. Every client connection gets
//! connections of its own to the upstreams, opened when first needed, and
//! the client's session binds (session-bind@openssh.com) are replayed on
//! them, in order, before anything else: an upstream's destination
//! constraints (`ssh-add -h`) and its own confirmations (`ssh-add -c`) keep
//! their meaning, because the upstream sees the same hops as token-agent.
//!
//! An upstream never delays listing: it has [`UpstreamSettings::list_timeout`]
//! to answer. One that does not is marked as not answering; its last list is
//! shown for [`UpstreamSettings::keep_list`] without asking it again, while a
//! single probe per upstream waits for it to answer once more. One that is
//! gone (no socket, connection refused) lists nothing and is tried again at
//! the next listing: a failed connect on a Unix socket costs microseconds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use ssh_encoding::{Decode, Reader};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

use crate::proto::frame::{read_frame, write_frame};
use crate::proto::message::id;

/// The backend name of upstream keys, in the forwarding policy and in `[[listing]]`.
pub const BACKEND: &str = "upstream";

/// The most keys taken from one upstream's list (OpenSSH's ssh takes 1024 at most).
const MAX_KEYS: usize = 2048;

/// How long a probe waits on one connection for an upstream that stopped
/// answering, before it tries a fresh connection.
const PROBE_WAIT: Duration = Duration::from_secs(60);

/// How the upstreams are used (`-A`, `upstream` and `[upstreams]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// The agents' sockets, in listing order.
    pub sockets: Vec<PathBuf>,
    /// How long an upstream may take to list its keys.
    pub list_timeout: Duration,
    /// How long the last list of an upstream that stopped answering is still shown.
    pub keep_list: Duration,
    /// How long an upstream may take to sign (its own confirmation included).
    pub sign_timeout: Duration,
    /// The upstream that keys added with ssh-add go to; None: token-agent keeps them.
    pub add_to: Option<PathBuf>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            sockets: Vec::new(),
            list_timeout: Duration::from_millis(250),
            keep_list: Duration::from_secs(300),
            sign_timeout: Duration::from_secs(120),
            add_to: None,
        }
    }
}

/// One key an upstream listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamKey {
    /// The public key (or certificate) blob, as the upstream sent it.
    pub(crate) blob: Vec<u8>,
    /// Its comment.
    pub(crate) comment: String,
}

/// Every configured upstream, shared by all connections.
#[derive(Debug, Default)]
pub(crate) struct Upstreams {
    agents: Vec<Arc<Upstream>>,
    settings: UpstreamSettings,
}

impl Upstreams {
    /// The upstreams of `settings`.
    pub(crate) fn new(settings: UpstreamSettings) -> Self {
        let agents = settings
            .sockets
            .iter()
            .map(|socket| Arc::new(Upstream::new(socket.clone())))
            .collect();
        Self { agents, settings }
    }

    /// Fresh links for one client connection (nothing is connected yet).
    pub(crate) fn links(&self) -> Links {
        Links {
            links: self
                .agents
                .iter()
                .map(|agent| Link::new(agent.clone()))
                .collect(),
            settings: self.settings.clone(),
        }
    }

    /// The upstream that added keys go to, if any.
    pub(crate) fn add_to(&self) -> Option<&Path> {
        self.settings.add_to.as_deref()
    }

    /// What `token-agent status` shows of each upstream.
    pub(crate) fn status(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        self.agents
            .iter()
            .map(|agent| {
                let state = agent.state();
                // What a listing now shows of it: while it does not answer,
                // its last list only for keep_list_seconds.
                let keys = match (&state.health, state.listed_at) {
                    (Health::Answering, _) => state.keys.len(),
                    (_, Some(at)) if now.duration_since(at) < self.settings.keep_list => {
                        state.keys.len()
                    }
                    _ => 0,
                };
                let (health, reason, since) = match &state.health {
                    Health::Unknown => ("not asked yet", None, None),
                    Health::Answering => ("answering", None, None),
                    Health::NotAnswering { since, reason } => {
                        ("not answering", Some(reason.clone()), Some(*since))
                    }
                    Health::Down { since, reason } => ("down", Some(reason.clone()), Some(*since)),
                };
                serde_json::json!({
                    "socket": agent.socket.display().to_string(),
                    "state": health,
                    "reason": reason,
                    "since_seconds": since.map(|s| now.duration_since(s).as_secs()),
                    "keys": keys,
                    "listed_seconds_ago": state.listed_at.map(|t| now.duration_since(t).as_secs()),
                })
            })
            .collect()
    }
}

/// One upstream agent and what is known of it.
#[derive(Debug)]
struct Upstream {
    socket: PathBuf,
    state: Mutex<State>,
    /// Whether a probe is waiting for it to answer again.
    probing: AtomicBool,
}

#[derive(Debug, Clone)]
struct State {
    /// Its last list, and when it came.
    keys: Arc<[UpstreamKey]>,
    listed_at: Option<Instant>,
    health: Health,
}

#[derive(Debug, Clone)]
enum Health {
    /// Never asked.
    Unknown,
    /// It answered its last request.
    Answering,
    /// It did not answer in time; a probe waits for it.
    NotAnswering { since: Instant, reason: String },
    /// No agent at the socket, or it closed the connection.
    Down { since: Instant, reason: String },
}

impl Upstream {
    fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            state: Mutex::new(State {
                keys: Arc::from(Vec::new()),
                listed_at: None,
                health: Health::Unknown,
            }),
            probing: AtomicBool::new(false),
        }
    }

    fn state(&self) -> State {
        token_agent_core::lock(&self.state).clone()
    }

    /// Records an answered list.
    fn answered(&self, keys: &[UpstreamKey]) {
        let mut state = token_agent_core::lock(&self.state);
        match &state.health {
            Health::NotAnswering { .. } | Health::Down { .. } => {
                tracing::info!(socket = %self.socket.display(), keys = keys.len(), "upstream agent answers again");
            }
            Health::Unknown | Health::Answering => {}
        }
        state.health = Health::Answering;
        if *state.keys != *keys {
            state.keys = Arc::from(keys);
        }
        state.listed_at = Some(Instant::now());
    }

    /// Records a request it did not answer in time.
    fn not_answering(&self, reason: String) {
        let mut state = token_agent_core::lock(&self.state);
        if !matches!(state.health, Health::NotAnswering { .. }) {
            tracing::warn!(socket = %self.socket.display(), reason, "upstream agent is not answering; showing its last list");
            state.health = Health::NotAnswering {
                since: Instant::now(),
                reason,
            };
        }
    }

    /// Records that it is gone: its keys are not listed until it is back.
    fn down(&self, reason: String) {
        let mut state = token_agent_core::lock(&self.state);
        if !matches!(state.health, Health::Down { .. }) {
            tracing::warn!(socket = %self.socket.display(), reason, "upstream agent is down");
            state.health = Health::Down {
                since: Instant::now(),
                reason,
            };
        }
        state.keys = Arc::from(Vec::new());
        state.listed_at = None;
    }

    /// Its keys while it does not answer: the last list, for `keep`.
    fn kept_keys(&self, keep: Duration) -> Arc<[UpstreamKey]> {
        let state = token_agent_core::lock(&self.state);
        match state.listed_at {
            Some(at) if at.elapsed() < keep => state.keys.clone(),
            _ => Arc::from(Vec::new()),
        }
    }

    fn is_answering(&self) -> bool {
        !matches!(
            token_agent_core::lock(&self.state).health,
            Health::NotAnswering { .. }
        )
    }

    /// Starts the one probe that waits for it to answer again, if none runs.
    fn probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            loop {
                let mut link = Link::new(agent.clone());
                match link.call(&[], &[id::REQUEST_IDENTITIES], PROBE_WAIT).await {
                    Ok(reply) => match parse_identities(&reply) {
                        Ok(keys) => agent.answered(&keys),
                        Err(err) => agent.down(err),
                    },
                    Err(CallError::TimedOut) => continue,
                    Err(err) => agent.down(err.to_string()),
                }
                break;
            }
            agent.probing.store(false, Ordering::SeqCst);
        });
    }
}

/// Why a call to an upstream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No agent listens at the socket (it is missing, or refuses connections).
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// It did not answer in time.
    #[error("did not answer in time")]
    TimedOut,
    /// It closed the connection, or wrote something that is not a frame.
    #[error("the connection broke: {0}")]
    Broken(String),
}

/// One client connection's connections to the upstreams.
#[derive(Debug)]
pub(crate) struct Links {
    links: Vec<Link>,
    settings: UpstreamSettings,
}

/// The upstream that holds a key.
#[derive(Debug, Clone)]
pub(crate) struct Owner {
    index: usize,
    /// The key's comment there.
    pub(crate) comment: String,
}

/// What an upstream answered to a forwarded request.
pub(crate) struct Forwarded {
    /// The upstream's socket, for the log.
    pub(crate) socket: PathBuf,
    /// Its reply, or why there is none.
    pub(crate) reply: Result<Zeroizing<Vec<u8>>, CallError>,
}

impl Links {
    /// Whether there are any upstreams.
    pub(crate) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Each upstream's keys, in order: a live list from the ones that answer
    /// within the time limit, the last list of the ones that stopped
    /// answering (for a while), nothing from the ones that are gone.
    pub(crate) async fn list(&mut self, binds: &[Vec<u8>]) -> Vec<Arc<[UpstreamKey]>> {
        let settings = &self.settings;
        join_all(
            self.links
                .iter_mut()
                .map(|link| link.list(binds, settings.list_timeout, settings.keep_list)),
        )
        .await
    }

    /// The upstreams' sockets, in the order of [`Links::list`].
    pub(crate) fn sockets(&self) -> impl Iterator<Item = &Path> {
        self.links.iter().map(|link| link.agent.socket.as_path())
    }

    /// The upstream that holds `blob`, as [`Links::owner`] finds it, else
    /// as the upstreams list now: a client may sign with or remove a key it
    /// did not list first, as plain ssh-agent lets it.
    pub(crate) async fn find_owner(&mut self, blob: &[u8], binds: &[Vec<u8>]) -> Option<Owner> {
        if let Some(owner) = self.owner(blob) {
            return Some(owner);
        }
        if self.links.is_empty() {
            return None;
        }
        self.list(binds).await;
        self.owner(blob)
    }

    /// The upstream that holds `blob`: the first that listed it on this
    /// connection, else the first whose last list has it.
    pub(crate) fn owner(&self, blob: &[u8]) -> Option<Owner> {
        if let Some(index) = self
            .links
            .iter()
            .position(|link| link.listed.iter().any(|k| k.blob == blob))
        {
            let comment = self.links[index]
                .listed
                .iter()
                .find(|k| k.blob == blob)
                .map(|k| k.comment.clone())
                .unwrap_or_default();
            return Some(Owner { index, comment });
        }
        let keep = self.settings.keep_list;
        self.links.iter().enumerate().find_map(|(index, link)| {
            link.agent
                .kept_keys(keep)
                .iter()
                .find(|key| key.blob == blob)
                .map(|key| Owner {
                    index,
                    comment: key.comment.clone(),
                })
        })
    }

    /// Sends `frame` (a sign or remove request) to the upstream `owner`,
    /// which has the signing time limit to answer.
    pub(crate) async fn forward(
        &mut self,
        owner: &Owner,
        binds: &[Vec<u8>],
        frame: &[u8],
    ) -> Forwarded {
        let limit = self.settings.sign_timeout;
        let link = &mut self.links[owner.index];
        Forwarded {
            socket: link.agent.socket.clone(),
            reply: link.call(binds, frame, limit).await,
        }
    }

    /// Sends `frame` to the upstream at `socket` (`add_to`).
    pub(crate) async fn forward_to(
        &mut self,
        socket: &Path,
        binds: &[Vec<u8>],
        frame: &[u8],
    ) -> Option<Forwarded> {
        let limit = self.settings.sign_timeout;
        let link = self.links.iter_mut().find(|l| l.agent.socket == socket)?;
        Some(Forwarded {
            socket: link.agent.socket.clone(),
            reply: link.call(binds, frame, limit).await,
        })
    }

    /// Sends `frame` to every upstream that answers (remove all), each within
    /// the listing time limit.
    pub(crate) async fn forward_to_all(
        &mut self,
        binds: &[Vec<u8>],
        frame: &[u8],
    ) -> Vec<Forwarded> {
        let limit = self.settings.list_timeout;
        join_all(
            self.links
                .iter_mut()
                .filter(|link| link.agent.is_answering())
                .map(|link| async move {
                    Forwarded {
                        socket: link.agent.socket.clone(),
                        reply: link.call(binds, frame, limit).await,
                    }
                }),
        )
        .await
    }
}

/// One connection to one upstream, for one client connection.
#[derive(Debug)]
struct Link {
    agent: Arc<Upstream>,
    stream: Option<UnixStream>,
    /// How many of the client's session binds this connection has seen.
    binds_sent: usize,
    /// What it listed last on this connection.
    listed: Arc<[UpstreamKey]>,
}

impl Link {
    fn new(agent: Arc<Upstream>) -> Self {
        Self {
            agent,
            stream: None,
            binds_sent: 0,
            listed: Arc::from(Vec::new()),
        }
    }

    async fn list(
        &mut self,
        binds: &[Vec<u8>],
        limit: Duration,
        keep: Duration,
    ) -> Arc<[UpstreamKey]> {
        if !self.agent.is_answering() {
            self.agent.probe();
            return self.kept(keep);
        }
        let keys: Arc<[UpstreamKey]> =
            match self.call(binds, &[id::REQUEST_IDENTITIES], limit).await {
                Ok(reply) => match parse_identities(&reply) {
                    Ok(keys) => {
                        self.agent.answered(&keys);
                        Arc::from(keys)
                    }
                    Err(err) => {
                        self.agent.down(err);
                        Arc::from(Vec::new())
                    }
                },
                Err(CallError::TimedOut) => {
                    self.agent.not_answering(format!(
                        "it did not list its keys within {} ms",
                        limit.as_millis()
                    ));
                    self.agent.probe();
                    return self.kept(keep);
                }
                Err(err) => {
                    self.agent.down(err.to_string());
                    Arc::from(Vec::new())
                }
            };
        self.listed = keys.clone();
        keys
    }

    fn kept(&mut self, keep: Duration) -> Arc<[UpstreamKey]> {
        let keys = self.agent.kept_keys(keep);
        self.listed = keys.clone();
        keys
    }

    /// Sends `request` and reads the reply, all within `limit`: connecting
    /// first if needed, and replaying the session binds this connection has
    /// not seen. A failure closes the connection (a late reply would
    /// otherwise answer the next request), so the next call starts afresh.
    async fn call(
        &mut self,
        binds: &[Vec<u8>],
        request: &[u8],
        limit: Duration,
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let result = tokio::time::timeout(limit, self.exchange(binds, request))
            .await
            .unwrap_or(Err(CallError::TimedOut));
        if result.is_err() {
            self.stream = None;
            self.binds_sent = 0;
        }
        result
    }

    async fn exchange(
        &mut self,
        binds: &[Vec<u8>],
        request: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = UnixStream::connect(&self.agent.socket)
                    .await
                    .map_err(CallError::Connect)?;
                self.binds_sent = 0;
                self.stream.insert(stream)
            }
        };
        let mut reply = Zeroizing::new(Vec::new());
        for bind in &binds[self.binds_sent..] {
            let mut frame = Vec::with_capacity(bind.len() + 40);
            frame.push(id::EXTENSION);
            token_agent_core::push_string(&mut frame, b"session-bind@openssh.com");
            frame.extend_from_slice(bind);
            round_trip(stream, &frame, &mut reply).await?;
            // An agent that does not know the extension (gpg-agent) refuses
            // it; its keys carry no destination constraints to keep then.
            if reply.first() != Some(&id::SUCCESS) {
                tracing::debug!(socket = %self.agent.socket.display(), "upstream agent did not take a session bind");
            }
            self.binds_sent += 1;
        }
        round_trip(stream, request, &mut reply).await?;
        Ok(reply)
    }
}

async fn round_trip(
    stream: &mut UnixStream,
    request: &[u8],
    reply: &mut Vec<u8>,
) -> Result<(), CallError> {
    write_frame(stream, request)
        .await
        .map_err(|e| CallError::Broken(e.to_string()))?;
    match read_frame(stream, reply).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(CallError::Broken("it closed the connection".into())),
        Err(err) => Err(CallError::Broken(err.to_string())),
    }
}

/// The keys of an SSH_AGENT_IDENTITIES_ANSWER.
fn parse_identities(reply: &[u8]) -> Result<Vec<UpstreamKey>, String> {
    let Some((&kind, mut body)) = reply.split_first() else {
        return Err("it sent an empty answer to a list".into());
    };
    if kind != id::IDENTITIES_ANSWER {
        return Err(format!("it answered a list with message {kind}"));
    }
    let count = u32::decode(&mut body).map_err(|e| format!("malformed list: {e}"))?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > MAX_KEYS {
        return Err(format!("it lists {count} keys, more than {MAX_KEYS}"));
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        let blob = Vec::<u8>::decode(&mut body).map_err(|e| format!("malformed list: {e}"))?;
        let comment = Vec::<u8>::decode(&mut body).map_err(|e| format!("malformed list: {e}"))?;
        keys.push(UpstreamKey {
            blob,
            comment: String::from_utf8_lossy(&comment).into_owned(),
        });
    }
    if !body.is_finished() {
        return Err("malformed list: trailing bytes".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use token_agent_core::push_string;

    fn answer(keys: &[(&[u8], &str)]) -> Vec<u8> {
        let mut out = vec![id::IDENTITIES_ANSWER];
        out.extend_from_slice(&u32::try_from(keys.len()).unwrap().to_be_bytes());
        for (blob, comment) in keys {
            push_string(&mut out, blob);
            push_string(&mut out, comment.as_bytes());
        }
        out
    }

    #[test]
    fn lists_are_parsed_exactly() {
        let keys = parse_identities(&answer(&[(b"one", "a"), (b"two", "b")])).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].blob, b"two");
        assert_eq!(keys[1].comment, "b");
        let mut trailing = answer(&[(b"one", "a")]);
        trailing.push(0);
        assert!(parse_identities(&trailing).is_err());
        assert!(parse_identities(&[id::FAILURE]).is_err());
        assert!(parse_identities(&[]).is_err());
        let mut huge = vec![id::IDENTITIES_ANSWER];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_identities(&huge).is_err());
    }

    #[test]
    fn status_counts_the_keys_a_listing_would_show() {
        let upstreams = Upstreams::new(UpstreamSettings {
            sockets: vec!["/nowhere".into()],
            keep_list: Duration::from_secs(5),
            ..UpstreamSettings::default()
        });
        let set = |health: Health, listed_ago: u64| {
            let mut state = token_agent_core::lock(&upstreams.agents[0].state);
            state.keys = Arc::from(vec![UpstreamKey {
                blob: b"key".to_vec(),
                comment: "kept".into(),
            }]);
            state.listed_at = Instant::now().checked_sub(Duration::from_secs(listed_ago));
            state.health = health;
        };
        let silent = || Health::NotAnswering {
            since: Instant::now(),
            reason: "did not answer".into(),
        };
        // Not answering: its last list counts while it is kept, then not.
        set(silent(), 1);
        assert_eq!(upstreams.status()[0]["keys"], 1);
        set(silent(), 10);
        assert_eq!(upstreams.status()[0]["keys"], 0);
        // Answering: what it listed last.
        set(Health::Answering, 10);
        assert_eq!(upstreams.status()[0]["keys"], 1);
    }

    #[tokio::test]
    async fn a_missing_upstream_lists_nothing_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let upstreams = Upstreams::new(UpstreamSettings {
            sockets: vec![dir.path().join("nobody")],
            ..UpstreamSettings::default()
        });
        let mut links = upstreams.links();
        let lists = links.list(&[]).await;
        assert!(lists[0].is_empty());
        let status = upstreams.status();
        assert_eq!(status[0]["state"], "down");
        assert!(status[0]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot connect"));
    }

    #[tokio::test]
    async fn a_silent_upstream_is_not_asked_again_until_it_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent");
        // Accepts connections and reads, but never answers.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                keep.lock().unwrap().push(stream);
            }
        });
        let upstreams = Upstreams::new(UpstreamSettings {
            sockets: vec![path],
            list_timeout: Duration::from_millis(50),
            ..UpstreamSettings::default()
        });
        let mut links = upstreams.links();
        let started = Instant::now();
        assert!(links.list(&[]).await[0].is_empty());
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(upstreams.status()[0]["state"], "not answering");
        // From now on listing does not wait for it at all.
        let mut other = upstreams.links();
        let started = Instant::now();
        assert!(other.list(&[]).await[0].is_empty());
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
