//! Where the agent's socket goes, and cleaning up the ones agents left
//! behind, exactly as OpenSSH 10.1 and later (misc-agent.c).
//!
//! Without `-a`, the socket is `~/.ssh/agent/s.<host hash>.agent.<random>`:
//! the host hash is the SHA-512 of the host name, each of its first ten bytes
//! turned into one of 62 letters and digits (`hostname_hash`), so that a home
//! directory shared between hosts (NFS) keeps each host's sockets apart; the
//! random part is ten more such characters, drawn again while the name is
//! taken. `~/.ssh` and `~/.ssh/agent` are made 0700 when missing (an existing
//! one is left as it is). Agents that died without removing their socket
//! leave it behind, so each start first removes the stale ones of this host
//! (`agent_cleanup_stale`); `-u` does only that, `-uu` for every host.
//!
//! `-T` keeps the place ssh-agent used before 10.1:
//! `$TMPDIR/ssh-XXXXXX??????/agent.<pid>`. OpenSSH asks mkdtemp(3) for twelve
//! random characters, but glibc's replaces only the last six X's, so on
//! Linux six X's stay: the names people know from every `SSH_AUTH_SOCK`,
//! made here the same way.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use rand::Rng;
use sha2::{Digest, Sha512};

/// `_PATH_SSH_AGENT_SOCKET_DIR`, below the home directory.
pub(crate) const SOCKET_DIR: &str = ".ssh/agent";

/// The characters of random names and of the host hash (misc-agent.c `presentation_chars`).
const PRESENTATION_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// `SOCKET_HOSTNAME_HASHLEN`.
const HOST_HASH_LEN: usize = 10;

/// Only sockets untouched for this long are looked at by the cleanup: a
/// socket just bound may not listen yet.
const STALE_AFTER: Duration = Duration::from_secs(60 * 60);

/// The home directory as OpenSSH's `get_homedir`: `$HOME` unless unset or
/// empty, then the passwd entry's.
pub(crate) fn home_dir() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|user| user.dir)
        .filter(|dir| !dir.as_os_str().is_empty())
        .context(
            "cannot determine the home directory (HOME is not set and the passwd entry has none); \
             set HOME, or start the agent with -a PATH or -T",
        )
}

/// This host's hash as in socket names (`agent_hostname_hash`).
pub(crate) fn host_hash() -> anyhow::Result<String> {
    let uts = nix::sys::utsname::uname().context("cannot read the host name")?;
    Ok(hash_host_name(uts.nodename().as_bytes()))
}

/// `hostname_hash(10)` of `hostname`.
fn hash_host_name(hostname: &[u8]) -> String {
    Sha512::digest(hostname)
        .iter()
        .take(HOST_HASH_LEN)
        .map(|byte| char::from(PRESENTATION_CHARS[usize::from(*byte) % PRESENTATION_CHARS.len()]))
        .collect()
}

/// Makes `~/.ssh` and `~/.ssh/agent` (mode 0700, as mkdir(2) with the
/// umask; existing ones are left alone) and returns the latter
/// (`agent_prepare_sockdir`).
pub(crate) fn prepare_home_dir(home: &Path) -> anyhow::Result<PathBuf> {
    for dir in [home.join(".ssh"), home.join(SOCKET_DIR)] {
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "created the directory"),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "cannot create {} for the agent socket; fix that directory, or start \
                         the agent with -a PATH or -T to put the socket elsewhere",
                        dir.display()
                    )
                })
            }
        }
    }
    Ok(home.join(SOCKET_DIR))
}

/// A fresh socket name in `dir` (made by [`prepare_home_dir`]):
/// `s.<host hash>.agent.<10 random characters>` (`agent_socket_template`).
pub(crate) fn home_socket_candidate(dir: &Path, host_hash: &str) -> PathBuf {
    dir.join(format!("s.{host_hash}.agent.{}", random_chars(10)))
}

/// `-T`: makes `$TMPDIR/ssh-XXXXXX<6 random>` (0700) and returns the socket
/// path `agent.<pid>` in it, and the directory (removed at exit).
pub(crate) fn temp_dir_socket(pid: u32) -> anyhow::Result<(PathBuf, PathBuf)> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let dir = base.join(format!("ssh-XXXXXX{}", random_chars(6)));
        match token_agent_server::listener::create_private_dir(&dir) {
            Ok(()) => return Ok((dir.join(format!("agent.{pid}")), dir)),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("cannot create a socket directory in {}", base.display())
                })
            }
        }
    }
    anyhow::bail!(
        "cannot create a unique socket directory in {}",
        base.display()
    )
}

/// Removes the stale sockets in `~/.ssh/agent` (`agent_cleanup_stale`):
/// sockets untouched for an hour, named for this host unless `any_host`,
/// that nothing listens on. Returns the removed paths. Problems are logged,
/// never fatal: an agent still starts.
pub(crate) fn cleanup_stale(home: &Path, any_host: bool) -> Vec<PathBuf> {
    let prefix = if any_host {
        None
    } else {
        match host_hash() {
            Ok(hash) => Some(OsString::from(format!("s.{hash}."))),
            Err(err) => {
                tracing::error!("cannot clean up stale agent sockets: {err:#}");
                return Vec::new();
            }
        }
    };
    let dir = home.join(SOCKET_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            tracing::error!(dir = %dir.display(), %err, "cannot read the agent socket directory");
            return Vec::new();
        }
    };
    let cutoff = SystemTime::now()
        .checked_sub(STALE_AFTER)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        // DirEntry::metadata does not follow a symbolic link, as fstatat(AT_SYMLINK_NOFOLLOW).
        let metadata = match entry.metadata() {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                tracing::error!(path = %path.display(), %err, "cannot stat a file in the agent socket directory");
                continue;
            }
        };
        if !metadata.file_type().is_socket() {
            continue;
        }
        if metadata.modified().is_ok_and(|modified| modified > cutoff) {
            tracing::trace!(path = %path.display(), "ignoring a recent socket");
            continue;
        }
        if let Some(prefix) = &prefix {
            if !entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
                tracing::trace!(path = %path.display(), "ignoring a socket of another host");
                continue;
            }
        }
        if is_stale(&path) {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "removed a stale agent socket");
                    removed.push(path);
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "cannot remove a stale agent socket")
                }
            }
        }
    }
    removed
}

/// Whether nothing listens on the socket at `path` (`socket_is_stale`): a
/// non-blocking connect is refused at once when no process holds the
/// socket. Where OpenSSH counts any failed connect as stale, only a refusal
/// counts here: EAGAIN means a live listener whose queue is full, and
/// anything else (EACCES, a path too long) is not proof that the socket is
/// dead, so it stays.
fn is_stale(path: &Path) -> bool {
    let Ok(address) = UnixAddr::new(path) else {
        tracing::debug!(path = %path.display(), "socket path too long to check");
        return false;
    };
    let fd = match socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(err) => {
            tracing::error!(%err, "cannot make a socket to check for stale agent sockets");
            return false;
        }
    };
    match socket::connect(fd.as_raw_fd(), &address) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED) => {
            tracing::debug!(path = %path.display(), "connect refused: stale");
            return true;
        }
        Err(err) => {
            tracing::debug!(path = %path.display(), %err, "connect failed; keeping the socket");
            return false;
        }
    }
    // As OpenSSH, a pending error on a connected socket also means stale.
    match socket::getsockopt(&fd, socket::sockopt::SocketError) {
        Ok(0) | Err(_) => {
            tracing::debug!(path = %path.display(), "socket seems still active");
            false
        }
        Ok(_) => true,
    }
}

/// `count` characters drawn uniformly from [`PRESENTATION_CHARS`] (as arc4random_uniform).
fn random_chars(count: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..count)
        .map(|_| char::from(PRESENTATION_CHARS[rng.gen_range(0..PRESENTATION_CHARS.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn host_hashes_match_openssh() {
        // What OpenSSH 10.5's ssh-agent names its sockets on hosts with these names.
        assert_eq!(hash_host_name(b"vm"), "2N0me1rP8M");
        assert_eq!(hash_host_name(b"vm").len(), HOST_HASH_LEN);
        assert!(hash_host_name(b"localhost")
            .bytes()
            .all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn home_sockets_have_openssh_names() {
        let home = tempfile::tempdir().unwrap();
        let dir = prepare_home_dir(home.path()).unwrap();
        assert_eq!(dir, home.path().join(".ssh/agent"));
        for made in [home.path().join(".ssh"), dir.clone()] {
            let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & !0o700, 0, "{} is {mode:o}", made.display());
        }
        // A second start finds them there.
        prepare_home_dir(home.path()).unwrap();
        let name = home_socket_candidate(&dir, "2N0me1rP8M");
        let name = name.file_name().unwrap().to_str().unwrap().to_owned();
        let random = name.strip_prefix("s.2N0me1rP8M.agent.").unwrap();
        assert_eq!(random.len(), 10);
        assert!(random.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn a_home_that_cannot_hold_the_directory_is_an_error() {
        let home = tempfile::tempdir().unwrap();
        let missing = home.path().join("not-there");
        let err = prepare_home_dir(&missing).unwrap_err();
        assert!(format!("{err:#}").contains("-a PATH or -T"), "{err:#}");
    }

    #[test]
    fn only_refused_sockets_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let live_path = dir.path().join("live");
        let live = UnixListener::bind(&live_path).unwrap();
        let dead_path = dir.path().join("dead");
        drop(UnixListener::bind(&dead_path).unwrap());
        assert!(!is_stale(&live_path));
        assert!(is_stale(&dead_path));
        assert!(!is_stale(&dir.path().join("missing")));
        drop(live);
    }
}
