//! Agent sockets: is anything listening, who is it, and which keys does it hold.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh_key::public::KeyData;
use ssh_key::{Certificate, HashAlg, PublicKey};

use super::platform;

/// How long an agent may take to answer a connection or a listing.
const TIMEOUT: Duration = Duration::from_secs(5);
/// SSH_AGENTC_REQUEST_IDENTITIES (draft-miller-ssh-agent, section 4.4).
const REQUEST_IDENTITIES: u8 = 11;
/// SSH_AGENT_IDENTITIES_ANSWER.
const IDENTITIES_ANSWER: u8 = 12;
/// OpenSSH's limit on an agent message.
const MAX_FRAME: usize = 256 * 1024;

/// What is at a socket path.
#[derive(Debug)]
pub(crate) enum SocketState {
    /// No file.
    Missing,
    /// A file, but not a socket.
    NotSocket,
    /// A socket nothing listens on: the agent that made it died.
    Stale,
    /// A socket of someone else (permission denied).
    Denied,
    /// Connecting failed otherwise.
    Unreachable(io::Error),
    /// Something listens.
    Live(Server),
}

/// The process listening on a socket, when it can be found.
#[derive(Debug, Clone)]
pub(crate) struct Server {
    /// Who it is.
    pub(crate) process: Option<Process>,
    /// What kind of agent that is.
    pub(crate) kind: AgentKind,
}

/// A process, as /proc shows it.
#[derive(Debug, Clone)]
pub(crate) struct Process {
    /// Its pid.
    pub(crate) pid: i32,
    /// Its real uid.
    pub(crate) uid: Option<u32>,
    /// Its executable (unreadable for other users' processes).
    pub(crate) exe: Option<PathBuf>,
    /// Its name (`comm`, at most 15 bytes).
    pub(crate) comm: Option<String>,
}

/// The agents people meet, named by their executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgentKind {
    /// This program.
    TokenAgent,
    /// OpenSSH's ssh-agent.
    OpenSsh,
    /// GnuPG's gpg-agent with enable-ssh-support.
    GpgAgent,
    /// GNOME Keyring's gcr-ssh-agent (GNOME 46 and later).
    GcrSshAgent,
    /// GNOME Keyring's older built-in agent, gnome-keyring-daemon.
    GnomeKeyring,
    /// 1Password's agent.
    OnePassword,
    /// KeePassXC.
    KeePassXc,
    /// Bitwarden's desktop agent.
    Bitwarden,
    /// A systemd socket unit: systemd listens and starts the agent on first use.
    Systemd,
    /// sshd or ssh relaying an agent forwarded from another machine (ssh -A).
    Forwarded,
    /// Some other program.
    Other(String),
    /// The listening process could not be found.
    Unknown,
}

impl AgentKind {
    /// The kind of the agent `process` runs.
    pub(crate) fn of(process: Option<&Process>) -> Self {
        let Some(process) = process else {
            return Self::Unknown;
        };
        let exe_name = process
            .exe
            .as_deref()
            .and_then(Path::file_name)
            .map(|name| name.to_string_lossy().into_owned());
        let names = [exe_name.as_deref(), process.comm.as_deref()];
        let named = |name: &str| names.iter().flatten().any(|n| n.eq_ignore_ascii_case(name));
        let starts = |prefix: &str| {
            names
                .iter()
                .flatten()
                .any(|n| n.to_ascii_lowercase().starts_with(prefix))
        };
        if starts("token-agent") {
            Self::TokenAgent
        } else if named("ssh-agent") {
            Self::OpenSsh
        } else if named("gpg-agent") {
            Self::GpgAgent
        } else if named("gcr-ssh-agent") {
            Self::GcrSshAgent
        } else if starts("gnome-keyring") {
            Self::GnomeKeyring
        } else if starts("1password") {
            Self::OnePassword
        } else if starts("keepassxc") {
            Self::KeePassXc
        } else if starts("bitwarden") {
            Self::Bitwarden
        } else if named("systemd") {
            Self::Systemd
        } else if named("sshd") || named("ssh") || starts("sshd-") {
            Self::Forwarded
        } else {
            Self::Other(
                exe_name
                    .or_else(|| process.comm.clone())
                    .unwrap_or_else(|| "an unknown program".into()),
            )
        }
    }

    /// The agent's name for people.
    pub(crate) fn name(&self) -> String {
        match self {
            Self::TokenAgent => "token-agent".into(),
            Self::OpenSsh => "OpenSSH's ssh-agent".into(),
            Self::GpgAgent => "GnuPG's gpg-agent".into(),
            Self::GcrSshAgent => "gcr-ssh-agent (GNOME Keyring)".into(),
            Self::GnomeKeyring => "gnome-keyring-daemon (GNOME Keyring)".into(),
            Self::OnePassword => "1Password's SSH agent".into(),
            Self::KeePassXc => "KeePassXC".into(),
            Self::Bitwarden => "Bitwarden's SSH agent".into(),
            Self::Systemd => "a systemd socket unit".into(),
            Self::Forwarded => "an agent forwarded over ssh".into(),
            Self::Other(name) => name.clone(),
            Self::Unknown => "an agent whose process cannot be found".into(),
        }
    }
}

impl Server {
    /// "token-agent (pid 42, /usr/bin/token-agent)".
    pub(crate) fn describe(&self) -> String {
        let name = self.kind.name();
        match &self.process {
            Some(process) => match &process.exe {
                Some(exe) => format!("{name} (pid {}, {})", process.pid, exe.display()),
                None => format!("{name} (pid {})", process.pid),
            },
            None => name,
        }
    }

    /// The server's pid.
    pub(crate) fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(|process| process.pid)
    }
}

/// Looks at the socket `path`: connects, and names who listens.
pub(crate) fn probe(path: &Path) -> SocketState {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return SocketState::Missing,
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => return SocketState::Denied,
        Err(err) => return SocketState::Unreachable(err),
    };
    if !metadata.file_type().is_socket() {
        return SocketState::NotSocket;
    }
    match UnixStream::connect(path) {
        Ok(stream) => {
            let process = platform::server_process(&stream, path);
            SocketState::Live(Server {
                kind: AgentKind::of(process.as_ref()),
                process,
            })
        }
        Err(err) => match err.kind() {
            io::ErrorKind::ConnectionRefused => SocketState::Stale,
            io::ErrorKind::PermissionDenied => SocketState::Denied,
            _ => SocketState::Unreachable(err),
        },
    }
}

/// A key an agent lists.
#[derive(Debug, Clone)]
pub(crate) struct AgentKey {
    /// The key, or the key a certificate certifies (keys of algorithms
    /// ssh-key does not know are kept opaque); `None` when unreadable.
    pub(crate) key: Option<KeyData>,
    /// The algorithm name in the blob ("ssh-ed25519", "ssh-rsa-cert-v01@openssh.com").
    pub(crate) algorithm: String,
    /// The comment.
    pub(crate) comment: String,
}

impl AgentKey {
    /// Whether this is an RSA key (or certificate).
    pub(crate) fn is_rsa(&self) -> bool {
        self.algorithm.starts_with("ssh-rsa")
    }

    /// "SHA256:... comment".
    pub(crate) fn describe(&self) -> String {
        let fingerprint = self
            .key
            .as_ref()
            .map(|key| key.fingerprint(HashAlg::Sha256));
        match (fingerprint, self.comment.is_empty()) {
            (Some(fp), false) => format!("{fp} ({})", self.comment),
            (Some(fp), true) => fp.to_string(),
            (None, _) => format!("{} ({})", self.algorithm, self.comment),
        }
    }
}

/// `ssh-add -L`: the keys the agent at `path` lists.
pub(crate) fn list_keys(path: &Path) -> io::Result<Vec<AgentKey>> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(&[0, 0, 0, 1, REQUEST_IDENTITIES])?;
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length == 0 || length > MAX_FRAME {
        return Err(invalid(format!("the agent sent a frame of {length} bytes")));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    parse_identities(&body)
}

/// Parses SSH_AGENT_IDENTITIES_ANSWER.
fn parse_identities(body: &[u8]) -> io::Result<Vec<AgentKey>> {
    let mut reader = Cursor(body);
    let kind = reader.byte()?;
    if kind != IDENTITIES_ANSWER {
        return Err(invalid(format!(
            "the agent answered the key listing with message {kind} (refused)"
        )));
    }
    let count = reader.u32()?;
    let mut keys = Vec::new();
    for _ in 0..count {
        let blob = reader.string()?;
        let comment = String::from_utf8_lossy(reader.string()?).into_owned();
        let algorithm = Cursor(blob)
            .string()
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .unwrap_or_default();
        // A certificate stands for the key it certifies, as ssh matches them.
        let key = if algorithm.ends_with("-cert-v01@openssh.com") {
            Certificate::from_bytes(blob)
                .ok()
                .map(|cert| cert.public_key().clone())
        } else {
            PublicKey::from_bytes(blob)
                .ok()
                .map(|key| key.key_data().clone())
        };
        keys.push(AgentKey {
            key,
            algorithm,
            comment,
        });
    }
    Ok(keys)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid("the agent's answer is truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> io::Result<u32> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn string(&mut self) -> io::Result<&'a [u8]> {
        let length = self.u32()? as usize;
        self.take(length)
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    #[test]
    fn identities_answers_are_parsed_with_unknown_algorithms_kept() {
        let key = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPF/Fq0IqA3vNZqWW4yik+Li+9Rxs6uc+SoZerTGhu3q a",
        )
        .unwrap();
        let mut body = vec![IDENTITIES_ANSWER, 0, 0, 0, 2];
        put(&mut body, &key.to_bytes().unwrap());
        put(&mut body, b"alice@laptop");
        let mut unknown = Vec::new();
        put(&mut unknown, b"x-new@example.org");
        put(&mut unknown, b"opaque");
        put(&mut body, &unknown);
        put(&mut body, b"");
        let keys = parse_identities(&body).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].key.as_ref(), Some(key.key_data()));
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert!(keys[0].describe().contains("alice@laptop"));
        assert_eq!(keys[1].algorithm, "x-new@example.org");
        assert!(keys[1].key.is_some(), "kept as an opaque key");
    }

    #[test]
    fn a_failure_answer_is_an_error() {
        assert!(parse_identities(&[5]).is_err());
        assert!(parse_identities(&[IDENTITIES_ANSWER, 0, 0, 0, 1, 0, 0]).is_err());
    }

    #[test]
    fn agents_are_named_by_their_executable_or_comm() {
        let process = |exe: Option<&str>, comm: &str| Process {
            pid: 1,
            uid: None,
            exe: exe.map(PathBuf::from),
            comm: Some(comm.into()),
        };
        let kind = |exe, comm| AgentKind::of(Some(&process(exe, comm)));
        assert_eq!(
            kind(Some("/usr/bin/ssh-agent"), "ssh-agent"),
            AgentKind::OpenSsh
        );
        assert_eq!(kind(None, "gpg-agent"), AgentKind::GpgAgent);
        assert_eq!(
            kind(Some("/usr/libexec/gcr-ssh-agent"), "gcr-ssh-agent"),
            AgentKind::GcrSshAgent
        );
        assert_eq!(kind(None, "gnome-keyring-d"), AgentKind::GnomeKeyring);
        assert_eq!(
            kind(Some("/opt/1Password/1password"), "1password"),
            AgentKind::OnePassword
        );
        assert_eq!(
            kind(Some("/usr/bin/keepassxc"), "keepassxc"),
            AgentKind::KeePassXc
        );
        assert_eq!(
            kind(Some("/lib/systemd/systemd"), "systemd"),
            AgentKind::Systemd
        );
        assert_eq!(kind(Some("/usr/sbin/sshd"), "sshd"), AgentKind::Forwarded);
        assert_eq!(
            kind(Some("/x/token-agent"), "token-agent"),
            AgentKind::TokenAgent
        );
        assert_eq!(
            kind(Some("/usr/bin/other"), "other"),
            AgentKind::Other("other".into())
        );
        assert_eq!(AgentKind::of(None), AgentKind::Unknown);
    }
}
