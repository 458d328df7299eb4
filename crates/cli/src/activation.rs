//! Socket activation (ssh-agent(1) in OpenSSH 10.5, sd_listen_fds(3)): a
//! supervisor such as systemd made the listening socket and passes it as
//! file descriptor 3, with LISTEN_FDS=1 and LISTEN_PID set to this process.
//! The agent serves it and never unlinks it: the socket belongs to the
//! supervisor.
//!
//! Taking ownership of a descriptor by its number needs `unsafe`
//! (`OwnedFd::from_raw_fd`), which token-agent forbids. The standard input,
//! though, is reachable safely (`std::io::stdin().as_fd()`), so the socket
//! is moved there for a moment with dup2(2), cloned into an owned,
//! close-on-exec descriptor, and the standard input is put back; then
//! descriptor 3 is closed so that helper processes do not inherit it. This
//! runs before any other thread exists.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use anyhow::{bail, Context};
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
use nix::unistd::{close, dup, dup2};

/// The descriptor of the first (and only) inherited socket, SD_LISTEN_FDS_START.
const LISTEN_FD: RawFd = 3;

/// The descriptors a supervisor passed, which closing inherited descriptors
/// must keep: fd 3 when LISTEN_PID and LISTEN_FDS are set ([`inherited`]
/// then checks them and says what is wrong).
pub(crate) fn passed_fds() -> &'static [RawFd] {
    let set = |name| std::env::var_os(name).is_some();
    if set("LISTEN_PID") && set("LISTEN_FDS") {
        &[LISTEN_FD]
    } else {
        &[]
    }
}

/// The listening socket a supervisor passed, when LISTEN_PID and LISTEN_FDS
/// are both set; an error when they are set wrongly, as ssh-agent refuses
/// to start then.
pub(crate) fn inherited() -> anyhow::Result<Option<UnixListener>> {
    let (Some(pid), Some(fds)) = (
        std::env::var_os("LISTEN_PID"),
        std::env::var_os("LISTEN_FDS"),
    ) else {
        return Ok(None);
    };
    let (pid, fds) = (pid.to_string_lossy(), fds.to_string_lossy());
    if fds != "1" {
        bail!("unexpected LISTEN_FDS contents (want \"1\", got \"{fds}\"): socket activation passes exactly one socket");
    }
    if fcntl(LISTEN_FD, FcntlArg::F_GETFL).is_err() {
        bail!("LISTEN_FDS is set but file descriptor 3 is not open");
    }
    let pid: i32 = pid
        .parse()
        .ok()
        .filter(|pid| *pid >= 1)
        .with_context(|| format!("invalid LISTEN_PID \"{pid}\""))?;
    let own = std::process::id();
    if i64::from(pid) != i64::from(own) {
        bail!("bad LISTEN_PID: {pid} vs pid {own}: the socket was passed to another process");
    }
    let fd = take_listen_fd().context("cannot take the socket passed on file descriptor 3")?;
    check_listening_unix_socket(&fd)?;
    let listener = UnixListener::from(fd);
    tracing::debug!(
        socket = ?listener.local_addr().ok().and_then(|a| a.as_pathname().map(ToOwned::to_owned)),
        "using socket activation on fd 3"
    );
    Ok(Some(listener))
}

/// Descriptor 3 as an owned, close-on-exec descriptor; descriptor 3 itself is closed.
fn take_listen_fd() -> nix::Result<OwnedFd> {
    // The standard input may be closed; then it is closed again afterwards.
    let saved_stdin = dup(0).ok();
    dup2(LISTEN_FD, 0)?;
    let taken = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|err| nix::Error::from_raw(err.raw_os_error().unwrap_or(nix::libc::EBADF)));
    match saved_stdin {
        Some(saved) => {
            dup2(saved, 0)?;
            close(saved)?;
        }
        None => close(0)?,
    }
    let taken = taken?;
    close(LISTEN_FD)?;
    Ok(taken)
}

fn check_listening_unix_socket(fd: &OwnedFd) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let not_a_listener = || {
        anyhow::anyhow!(
            "file descriptor 3 from socket activation is not a listening Unix stream socket; \
             give the agent's unit a ListenStream= socket"
        )
    };
    let listening = getsockopt(fd, sockopt::AcceptConn).map_err(|_| not_a_listener())?;
    let kind = getsockopt(fd, sockopt::SockType).map_err(|_| not_a_listener())?;
    // Fails for a socket of another family.
    getsockname::<UnixAddr>(fd.as_raw_fd()).map_err(|_| not_a_listener())?;
    if !listening || kind != SockType::Stream {
        return Err(not_a_listener());
    }
    Ok(())
}
