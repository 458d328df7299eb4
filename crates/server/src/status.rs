//! What `token-agent status` shows: the agent, its backends and devices, its
//! keys with their constraints, and the last refusals with their reasons.
//!
//! The protocol gives a client no reason for a refusal (SSH_AGENT_FAILURE is
//! all ssh sees), so the agent keeps the last [`MAX_REFUSALS`] in memory
//! (never on disk) and answers them, with everything else, to the
//! `status@token-agent` extension. That extension is answered only to the
//! agent's own user on a local connection: a forwarded connection (one that
//! sent session-bind@openssh.com) or root gets SSH_AGENT_FAILURE, so a remote
//! host never learns which keys or devices the agent has or who used them.

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use ssh_key::certificate::Certificate;
use token_agent_core::{DeviceStatus, Peer, RefusalKind};

use crate::constraints::{Constraints, SessionBindings};

/// The extension's name.
pub const EXTENSION: &str = "status@token-agent";

/// How many refusals are kept.
pub const MAX_REFUSALS: usize = 64;

/// One refused request.
#[derive(Debug, Clone)]
pub struct RefusalRecord {
    /// When.
    pub at: SystemTime,
    /// "sign", "add", "add provider", ...
    pub operation: &'static str,
    /// The key: its comment and fingerprint, when known.
    pub key: Option<String>,
    /// The client process, and its parents ("ssh (pid 12)", "bash (pid 9)").
    pub client: Vec<String>,
    /// Where the connection goes, from its session binds.
    pub destination: Option<String>,
    /// The kind.
    pub kind: RefusalKind,
    /// What happened and what to do, in words.
    pub message: String,
}

impl RefusalRecord {
    /// A record of `kind` refusing `operation` for `peer` on a connection with `bindings`.
    pub fn new(
        operation: &'static str,
        key: Option<String>,
        peer: &Peer,
        bindings: &SessionBindings,
        kind: RefusalKind,
        message: String,
    ) -> Self {
        Self {
            at: SystemTime::now(),
            operation,
            key,
            client: process_chain(peer),
            destination: destination(bindings),
            kind,
            message,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "time": unix(self.at),
            "operation": self.operation,
            "key": self.key,
            "client": self.client,
            "destination": self.destination,
            "reason": self.kind.code(),
            "message": self.message,
        })
    }
}

/// The bounded list of refusals, newest last.
#[derive(Debug, Default)]
pub struct RefusalLog {
    records: std::sync::Mutex<VecDeque<RefusalRecord>>,
}

impl RefusalLog {
    /// Keeps `record`, forgetting the oldest beyond [`MAX_REFUSALS`].
    pub fn push(&self, record: RefusalRecord) {
        let mut records = token_agent_core::lock(&self.records);
        if records.len() == MAX_REFUSALS {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// The kept refusals, oldest first.
    pub fn records(&self) -> Vec<RefusalRecord> {
        token_agent_core::lock(&self.records)
            .iter()
            .cloned()
            .collect()
    }
}

/// One listed key as status shows it.
#[derive(Debug)]
pub(crate) struct KeyStatus<'a> {
    pub(crate) comment: &'a str,
    pub(crate) algorithm: String,
    pub(crate) fingerprint: String,
    pub(crate) backend: &'a str,
    pub(crate) device: Option<&'a str>,
    pub(crate) certificate: Option<&'a Certificate>,
    pub(crate) constraints: Option<&'a Constraints>,
}

impl KeyStatus<'_> {
    pub(crate) fn to_json(&self, now: Instant) -> Value {
        let certificate = self.certificate.map(|cert| {
            let unix_now = unix(SystemTime::now());
            json!({
                "key_id": cert.key_id(),
                "serial": cert.serial(),
                "principals": cert.valid_principals(),
                "valid_after": cert.valid_after(),
                "valid_before": cert.valid_before(),
                "valid_now": cert.valid_after() <= unix_now && unix_now < cert.valid_before(),
            })
        });
        let constraints = self.constraints.map(|c| {
            json!({
                "lifetime_left_seconds": c
                    .expires_at
                    .map(|at| at.saturating_duration_since(now).as_secs()),
                "confirm": c.confirm,
                "destinations": c
                    .destinations
                    .iter()
                    .map(|d| {
                        let from = if d.from.hostname.is_empty() {
                            String::new()
                        } else {
                            format!("{} > ", d.from.hostname)
                        };
                        let user = if d.to.username.is_empty() {
                            String::new()
                        } else {
                            format!("{}@", d.to.username)
                        };
                        format!("{from}{user}{}", d.to.hostname)
                    })
                    .collect::<Vec<_>>(),
            })
        });
        json!({
            "comment": self.comment,
            "type": self.algorithm,
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "device": self.device,
            "certificate": certificate,
            "constraints": constraints,
        })
    }
}

/// How the agent is locked: with a password (`ssh-add -x`), with the
/// desktop session, both or neither.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LockState {
    pub(crate) password: bool,
    pub(crate) session: bool,
}

/// The whole answer.
pub(crate) fn document(
    started: Instant,
    lock: LockState,
    backends: Vec<(&str, Vec<DeviceStatus>)>,
    keys: Vec<Value>,
    upstreams: Vec<Value>,
    refusals: &[RefusalRecord],
) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_seconds": started.elapsed().as_secs(),
        "locked": lock.password || lock.session,
        "locked_with_password": lock.password,
        "locked_with_session": lock.session,
        "backends": backends
            .into_iter()
            .map(|(name, devices)| json!({
                "name": name,
                "devices": devices
                    .into_iter()
                    .map(|d| json!({"label": d.label, "details": d.details, "problem": d.problem}))
                    .collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>(),
        "keys": keys,
        "upstreams": upstreams,
        "refusals": refusals.iter().map(RefusalRecord::to_json).collect::<Vec<_>>(),
    })
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The hops of a connection, first to last: each host key's fingerprint, and
/// whether the agent is forwarded on to a further host from there.
fn destination(bindings: &SessionBindings) -> Option<String> {
    let hops: Vec<String> = bindings
        .hops()
        .iter()
        .map(|hop| {
            let fingerprint = hop
                .host_key
                .key_data()
                .fingerprint(ssh_key::HashAlg::Sha256);
            if hop.forwarded {
                format!("{fingerprint} (forwarding)")
            } else {
                fingerprint.to_string()
            }
        })
        .collect();
    (!hops.is_empty()).then(|| hops.join(" > "))
}

/// The client and up to four of its ancestors, read from /proc: "ssh (pid
/// 1234)", "bash (pid 1200)", ... A process that is gone ends the chain.
pub fn process_chain(peer: &Peer) -> Vec<String> {
    let mut chain = vec![peer.to_string()];
    let mut pid = peer.pid;
    for _ in 0..4 {
        let Some(parent) = pid.and_then(parent_of) else {
            break;
        };
        if parent.0 <= 1 {
            break;
        }
        chain.push(format!("{} (pid {})", parent.1, parent.0));
        pid = Some(parent.0);
    }
    chain
}

/// The parent pid and the parent's command name, from `/proc/PID/stat`.
fn parent_of(pid: i32) -> Option<(i32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (comm) STATE PPID ...": comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    let ppid: i32 = after.split_whitespace().nth(1)?.parse().ok()?;
    let parent = std::fs::read_to_string(format!("/proc/{ppid}/stat")).ok()?;
    let comm = parent
        .get(parent.find('(')? + 1..parent.rfind(')')?)?
        .to_owned();
    Some((ppid, comm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_newest() {
        let log = RefusalLog::default();
        let peer = Peer {
            uid: 0,
            pid: None,
            exe: None,
        };
        for i in 0..MAX_REFUSALS + 5 {
            log.push(RefusalRecord::new(
                "sign",
                Some(format!("key {i}")),
                &peer,
                &SessionBindings::default(),
                RefusalKind::Locked,
                "the agent is locked".into(),
            ));
        }
        let records = log.records();
        assert_eq!(records.len(), MAX_REFUSALS);
        assert_eq!(records[0].key.as_deref(), Some("key 5"));
    }

    #[test]
    fn the_chain_names_this_process_and_its_parent() {
        let peer = Peer {
            uid: 0,
            pid: Some(std::process::id() as i32),
            exe: None,
        };
        let chain = process_chain(&peer);
        assert!(chain.len() >= 2, "{chain:?}");
        assert!(chain[1].contains("(pid "), "{chain:?}");
    }
}
