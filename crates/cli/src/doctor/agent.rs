//! What serves SSH_AUTH_SOCK, and which other agents of this user are live.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::socket::{self, AgentKey, AgentKind, Server, SocketState};
use super::{gpg, plural, Check, Context, Finding};

/// The usual way to start token-agent and point the shell at it.
pub(crate) const START: &str = "eval \"$(token-agent -s)\"";

/// An agent socket, probed, with the keys it lists when live.
#[derive(Debug)]
pub(crate) struct AgentSocket {
    /// The socket's path.
    pub(crate) path: PathBuf,
    /// What is there.
    pub(crate) state: SocketState,
    /// `ssh-add -L`, when something listens.
    pub(crate) keys: Option<io::Result<Vec<AgentKey>>>,
}

impl AgentSocket {
    /// Probes `path` and lists its keys.
    pub(crate) fn probe(path: PathBuf) -> Self {
        let state = socket::probe(&path);
        let keys = matches!(state, SocketState::Live(_)).then(|| socket::list_keys(&path));
        Self { path, state, keys }
    }

    /// Who listens, when something does.
    pub(crate) fn server(&self) -> Option<&Server> {
        match &self.state {
            SocketState::Live(server) => Some(server),
            _ => None,
        }
    }

    /// The keys, when listed.
    pub(crate) fn keys(&self) -> Option<&[AgentKey]> {
        self.keys
            .as_ref()
            .and_then(|keys| keys.as_ref().ok())
            .map(Vec::as_slice)
    }
}

/// SSH_AUTH_SOCK and every other agent socket of this user.
#[derive(Debug)]
pub(crate) struct Survey {
    /// SSH_AUTH_SOCK, unless unset.
    pub(crate) auth: Option<AgentSocket>,
    /// The other sockets where agents usually live, that exist.
    pub(crate) others: Vec<(PathBuf, SocketState)>,
}

impl Survey {
    /// Looks at SSH_AUTH_SOCK and the usual places.
    pub(crate) fn probe(context: &Context) -> Self {
        let auth = context
            .var("SSH_AUTH_SOCK")
            .map(|path| AgentSocket::probe(PathBuf::from(path)));
        let own = auth
            .as_ref()
            .map(|auth| std::fs::canonicalize(&auth.path).unwrap_or_else(|_| auth.path.clone()));
        let mut seen = Vec::new();
        let mut others = Vec::new();
        for path in candidates(context) {
            let Ok(canonical) = std::fs::canonicalize(&path) else {
                continue;
            };
            if own.as_ref() == Some(&canonical) || seen.contains(&canonical) {
                continue;
            }
            seen.push(canonical);
            // Another user's socket in a shared folder is none of ours.
            let ours = std::fs::metadata(&path).is_ok_and(|m| m.uid() == context.uid());
            if !ours {
                continue;
            }
            let state = socket::probe(&path);
            if let SocketState::Live(server) = &state {
                // One agent on two paths (GNOME Keyring's) is one agent.
                let auth_pid = own_server_pid(auth.as_ref());
                let same = |pid: Option<i32>| pid.is_some() && pid == server.pid();
                let listed = others.iter().any(|(_, other)| match other {
                    SocketState::Live(other) => same(other.pid()),
                    _ => false,
                });
                if same(auth_pid) || listed {
                    continue;
                }
            }
            if matches!(state, SocketState::Missing | SocketState::NotSocket) {
                continue;
            }
            others.push((path, state));
        }
        Self { auth, others }
    }

    /// SSH_AUTH_SOCK's agent, when one listens.
    pub(crate) fn auth_server(&self) -> Option<&Server> {
        self.auth.as_ref().and_then(AgentSocket::server)
    }
}

fn own_server_pid(auth: Option<&AgentSocket>) -> Option<i32> {
    auth.and_then(AgentSocket::server).and_then(Server::pid)
}

/// What SSH_AUTH_SOCK points at.
pub(crate) fn check_auth_sock(context: &Context, survey: &Survey) -> Vec<Finding> {
    let check = Check::Agent;
    let Some(auth) = &survey.auth else {
        let live_token_agent = survey.others.iter().find(|(_, state)| {
            matches!(state, SocketState::Live(server) if server.kind == AgentKind::TokenAgent)
        });
        let fix = match live_token_agent {
            Some((path, _)) => format!("export SSH_AUTH_SOCK={}", context.shell(path)),
            None => START.to_owned(),
        };
        return vec![Finding::problem(
            check,
            "auth-sock-unset",
            "SSH_AUTH_SOCK is not set, so ssh and ssh-add cannot reach any agent.",
        )
        .fix(fix)];
    };
    let shown = context.show(&auth.path);
    let finding = match &auth.state {
        SocketState::Missing => Finding::problem(
            check,
            "auth-sock-missing",
            format!(
                "SSH_AUTH_SOCK names {shown}, which does not exist: the agent that made it has \
                 stopped, or this shell (an old tmux or screen session) outlived it."
            ),
        )
        .fix(START),
        SocketState::NotSocket => Finding::problem(
            check,
            "auth-sock-not-socket",
            format!("SSH_AUTH_SOCK names {shown}, which is not a socket."),
        )
        .fix(START),
        SocketState::Stale => Finding::problem(
            check,
            "auth-sock-stale",
            format!(
                "Nothing listens on SSH_AUTH_SOCK ({shown}): a stale socket left behind by an \
                 agent that exited or crashed; ssh says \"Connection refused\" or \"agent \
                 refused operation\"."
            ),
        )
        .fix(format!("rm {} && {START}", context.shell(&auth.path))),
        SocketState::Denied => Finding::problem(
            check,
            "auth-sock-denied",
            format!(
                "SSH_AUTH_SOCK ({shown}) belongs to another user (permission denied), as after \
                 sudo or su."
            ),
        )
        .fix(format!(
            "run ssh as the user who owns that agent, or start your own: {START}"
        )),
        SocketState::Unreachable(err) => Finding::problem(
            check,
            "auth-sock-unreachable",
            format!("Cannot connect to SSH_AUTH_SOCK ({shown}): {err}."),
        )
        .fix(START),
        SocketState::Live(server) => return live(context, auth, server),
    };
    vec![finding]
}

fn live(context: &Context, auth: &AgentSocket, server: &Server) -> Vec<Finding> {
    let check = Check::Agent;
    let shown = context.show(&auth.path);
    let described = server.describe();
    let keys = match &auth.keys {
        Some(Ok(keys)) => keys,
        Some(Err(err)) => {
            return vec![Finding::problem(
                check,
                "agent-not-answering",
                format!(
                    "{described} listens on SSH_AUTH_SOCK ({shown}) but does not list its keys: \
                     {err}."
                ),
            )
            .fix(format!("restart that agent, or start token-agent: {START}"))]
        }
        None => return Vec::new(),
    };
    let with = plural(keys.len(), "key");
    let other_user = server
        .process
        .as_ref()
        .and_then(|process| process.uid)
        .filter(|uid| *uid != context.uid() && *uid != 0);
    if let Some(uid) = other_user {
        return vec![Finding::warning(
            check,
            "agent-other-user",
            format!(
                "SSH_AUTH_SOCK ({shown}) is served by {described}, which runs as another user \
                 (uid {uid}), with {with}."
            ),
        )
        .fix(format!("start your own agent: {START}"))];
    }
    let finding = match server.kind {
        AgentKind::TokenAgent => Finding::ok(
            check,
            "agent-token-agent",
            format!("SSH_AUTH_SOCK ({shown}) is {described}, with {with}."),
        ),
        AgentKind::Forwarded => Finding::info(
            check,
            "agent-forwarded",
            format!(
                "SSH_AUTH_SOCK ({shown}) is {described}, with {with}: the keys of the machine \
                 you logged in from."
            ),
        ),
        _ => Finding::info(
            check,
            "agent-not-token-agent",
            format!(
                "SSH_AUTH_SOCK ({shown}) is {described}, with {with}; keys on hardware tokens \
                 need token-agent, which also holds software keys."
            ),
        )
        .fix(START),
    };
    vec![finding]
}

/// Other live agents (two agents fighting over SSH_AUTH_SOCK), and stale
/// sockets of this user.
pub(crate) fn check_other_agents(context: &Context, survey: &Survey) -> Vec<Finding> {
    let check = Check::Agents;
    let auth_live = survey.auth_server().is_some();
    let live: Vec<(&PathBuf, &Server)> = survey
        .others
        .iter()
        .filter_map(|(path, state)| match state {
            SocketState::Live(server) => Some((path, server)),
            _ => None,
        })
        .collect();
    let mut findings = Vec::new();
    for (path, server) in &live {
        let shown = context.show(path);
        let described = server.describe();
        if auth_live {
            let ours = survey
                .auth_server()
                .map_or_else(|| "SSH_AUTH_SOCK's".to_owned(), |s| s.kind.name());
            findings.push(
                Finding::warning(
                    check,
                    "agents-compete",
                    format!(
                        "Another agent is live besides SSH_AUTH_SOCK's: {described} on {shown}. \
                         Keys added to one are not in the other, and programs or shells that \
                         pick it up (a desktop session's SSH_AUTH_SOCK, an IdentityAgent line) \
                         do not see the keys of {ours}."
                    ),
                )
                .fix(stop(context, server, path)),
            );
        } else if live.len() == 1 {
            findings.push(
                Finding::info(
                    check,
                    "agent-found",
                    format!("A live agent is at {shown}: {described}."),
                )
                .fix(format!("export SSH_AUTH_SOCK={}", context.shell(path))),
            );
        } else {
            findings.push(
                Finding::warning(
                    check,
                    "agents-compete",
                    format!(
                        "Several agents are live and none is SSH_AUTH_SOCK: {described} on \
                         {shown} is one of {}.",
                        live.len()
                    ),
                )
                .fix(stop(context, server, path)),
            );
        }
    }
    for (path, state) in &survey.others {
        if matches!(state, SocketState::Stale) {
            findings.push(
                Finding::info(
                    check,
                    "stale-socket",
                    format!(
                        "{} is a stale agent socket: nothing listens on it.",
                        context.show(path)
                    ),
                )
                .fix(format!("rm {}", context.shell(path))),
            );
        }
    }
    if live.is_empty() {
        findings.push(Finding::ok(
            check,
            "agents-alone",
            "No other live agent found (looked at ~/.ssh/agent, $TMPDIR/ssh-*, gpg-agent's, \
             GNOME Keyring's, 1Password's and Bitwarden's sockets).",
        ));
    }
    findings
}

/// How to stop the agent `server` on `path`.
fn stop(context: &Context, server: &Server, path: &Path) -> String {
    let pid = server.pid();
    match (&server.kind, pid) {
        (AgentKind::TokenAgent, Some(pid)) => format!("SSH_AGENT_PID={pid} token-agent -k"),
        (AgentKind::OpenSsh, Some(pid)) => format!("SSH_AGENT_PID={pid} ssh-agent -k"),
        (AgentKind::GpgAgent, _) => gpg::turn_off_ssh(context),
        (AgentKind::GcrSshAgent, _) => {
            "systemctl --user disable --now gcr-ssh-agent.socket gcr-ssh-agent.service".into()
        }
        (AgentKind::GnomeKeyring, _) => "turn off its SSH component: mkdir -p ~/.config/autostart \
             && { cat /etc/xdg/autostart/gnome-keyring-ssh.desktop; echo Hidden=true; } > \
             ~/.config/autostart/gnome-keyring-ssh.desktop, then log in again"
            .into(),
        (AgentKind::OnePassword, _) => {
            "turn off \"Use the SSH agent\" in 1Password's Settings > Developer, or use only \
             1Password's agent"
                .into()
        }
        (AgentKind::KeePassXc, _) => {
            "turn off the SSH agent integration in KeePassXC's Tools > Settings > SSH Agent".into()
        }
        (AgentKind::Bitwarden, _) => "turn off the SSH agent in Bitwarden's settings".into(),
        (AgentKind::Systemd, _) => format!(
            "find the unit listening on {} with systemctl --user list-sockets, then \
             systemctl --user disable --now UNIT.socket",
            context.show(path)
        ),
        (AgentKind::Forwarded, _) => {
            "nothing to stop: it lives as long as the ssh session that forwards it".into()
        }
        (_, Some(pid)) => format!("kill {pid}"),
        (_, None) => format!("stop the program serving {}", context.show(path)),
    }
}

/// Where agents usually put their sockets.
fn candidates(context: &Context) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(home) = context.home() {
        // OpenSSH 10.1 and later: ~/.ssh/agent/s.*.
        paths.extend(children(&home.join(".ssh/agent"), |name| {
            name.starts_with("s.")
        }));
        paths.push(home.join(".1password/agent.sock"));
        paths.push(home.join(".bitwarden-ssh-agent.sock"));
    }
    // OpenSSH's ssh-agent and token-agent by default: $TMPDIR/ssh-XXXXXXXXXX/agent.PPID.
    for dir in children(&context.tmpdir(), |name| name.starts_with("ssh-")) {
        paths.extend(children(&dir, |name| name.starts_with("agent.")));
    }
    paths.extend(gpg::ssh_sockets(context));
    if let Some(runtime) = context.runtime_dir() {
        // token-agent's own systemd socket unit (dist/systemd/token-agent.socket).
        paths.push(runtime.join("token-agent/ssh-agent.sock"));
        paths.push(runtime.join("gcr/ssh"));
        paths.push(runtime.join("keyring/ssh"));
        paths.push(runtime.join("ssh-agent.socket"));
    }
    paths
}

/// The entries of `dir` whose names pass `keep`, sorted.
fn children(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(&keep))
        .map(|entry| entry.path())
        .collect();
    paths.sort();
    paths
}
