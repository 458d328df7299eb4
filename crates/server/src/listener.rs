//! The agent socket: binding it safely and accepting for as long as the agent runs.
//!
//! The socket is created with mode 0600 (the umask is narrowed around `bind`,
//! so it never exists with wider permissions), and every connection's peer
//! credentials are read with SO_PEERCRED: only the agent's own uid, or root,
//! is served, as in OpenSSH. Accept errors (EMFILE when a client floods the
//! agent, ECONNABORTED, ...) are logged and waited out, never fatal.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::stat::{umask, Mode};
use token_agent_core::Peer;
use tokio::net::{UnixListener, UnixStream};

use crate::router::Router;
use crate::session;

/// Creates `dir` with mode 0700 (for an agent that makes its own directory,
/// like OpenSSH's `/tmp/ssh-<random>` directory).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    // The umask may have narrowed it further; never let it be wider.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Binds the agent socket at `path` with mode 0600.
///
/// An existing file at `path` is an error ("Address already in use"), never
/// replaced: it may be another agent's live socket. Use [`bind_owned`] to
/// also remove the socket when the agent exits.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let previous = umask(Mode::from_bits_truncate(0o177));
    let listener = std::os::unix::net::UnixListener::bind(path);
    umask(previous);
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Binds the agent socket at `path` (as [`bind`]) and returns it with the
/// guard that removes it, and `dir` when the agent made that directory, on
/// exit.
///
/// The guard exists only once the bind succeeded, so the agent only ever
/// unlinks a socket it created itself: a second agent started on a live
/// socket fails and leaves the first one reachable, as OpenSSH's does. When
/// the bind fails, `dir` (made by this agent, so empty) is removed.
pub fn bind_owned(path: &Path, dir: Option<PathBuf>) -> io::Result<(UnixListener, SocketGuard)> {
    match bind(path) {
        Ok(listener) => Ok((
            listener,
            SocketGuard {
                socket: path.to_owned(),
                dir,
            },
        )),
        Err(err) => {
            if let Some(dir) = dir {
                let _ = std::fs::remove_dir(dir);
            }
            Err(err)
        }
    }
}

/// The socket path and who may connect.
#[derive(Debug, Clone)]
pub struct Access {
    /// The uid that owns the agent.
    pub uid: u32,
}

impl Access {
    /// The current process's effective uid.
    pub fn current() -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Whether a client with `uid` may use the agent: its owner, or root.
    pub fn allows(&self, uid: u32) -> bool {
        uid == self.uid || uid == 0
    }
}

/// Accepts connections on `listener` and serves each one until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    router: Arc<Router>,
    access: Access,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut consecutive_errors: u32 = 0;
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                consecutive_errors = 0;
                let Some(peer) = admit(&stream, &access) else {
                    continue;
                };
                tokio::spawn(session::serve(router.clone(), stream, peer));
            }
            Err(err) => {
                consecutive_errors = consecutive_errors.saturating_add(1);
                // Out of descriptors: existing connections must close before
                // another accept can succeed, so back off longer.
                let pause = match err.raw_os_error() {
                    Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE => {
                        Duration::from_millis(50)
                    }
                    _ => Duration::from_millis(5),
                };
                if consecutive_errors == 1 || consecutive_errors.is_multiple_of(1000) {
                    tracing::warn!(%err, consecutive_errors, "accept failed; the agent keeps listening");
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Reads the peer's credentials; `None` (and the connection dropped) for other users.
fn admit(stream: &UnixStream, access: &Access) -> Option<Peer> {
    let cred = match stream.peer_cred() {
        Ok(cred) => cred,
        Err(err) => {
            tracing::warn!(%err, "cannot read the client's credentials; refusing it");
            return None;
        }
    };
    let pid = cred.pid();
    if !access.allows(cred.uid()) {
        tracing::warn!(
            uid = cred.uid(),
            pid,
            "refusing a connection from another user"
        );
        return None;
    }
    let exe = pid.and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok());
    Some(Peer {
        uid: cred.uid(),
        pid,
        exe,
    })
}

/// Removes the socket (and the directory the agent made for it) on drop.
/// Made only by [`bind_owned`], after the agent created the socket.
#[derive(Debug)]
pub struct SocketGuard {
    socket: PathBuf,
    dir: Option<PathBuf>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_bind_leaves_the_existing_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let (_first, guard) = bind_owned(&path, None).unwrap();
        let made = dir.path().join("made-by-second");
        std::fs::create_dir(&made).unwrap();
        let err = bind_owned(&path, Some(made.clone())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(path.exists(), "the first agent's socket was removed");
        assert!(
            !made.exists(),
            "the failed agent's own directory stays behind"
        );
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(guard);
        assert!(!path.exists());
    }
}
