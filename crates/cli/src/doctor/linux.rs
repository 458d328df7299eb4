//! Linux: who listens on a socket (SO_PEERCRED, /proc/net/unix) and what
//! /proc says about a process.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::socket::Process;

/// `__SO_ACCEPTCON` in /proc/net/unix's Flags column: a listening socket.
const LISTENING: u32 = 0x0001_0000;

/// The process serving `stream`, a connection to the socket at `path`.
///
/// SO_PEERCRED names the process that called listen(). Agents that
/// daemonize after binding (gpg-agent --daemon) leave a pid that has exited
/// by now, and under socket activation it is systemd's, which keeps the
/// socket while the agent it started serves it: then look for the process
/// holding the listening socket instead: /proc/net/unix maps the path to
/// the socket's inode, and some process's /proc/PID/fd links to
/// `socket:[INODE]`.
pub(crate) fn server_process(stream: &UnixStream, path: &Path) -> Option<Process> {
    let peer = getsockopt(stream, PeerCredentials)
        .ok()
        .map(|cred| cred.pid())
        .filter(|pid| *pid > 0)
        .and_then(process);
    match peer {
        Some(peer) if !is_systemd(&peer) => Some(peer),
        peer => listening_process(path).or(peer),
    }
}

/// Whether `process` is systemd (the system or a user manager).
fn is_systemd(process: &Process) -> bool {
    process.comm.as_deref() == Some("systemd")
}

/// What /proc shows of `pid`, if it still runs.
pub(crate) fn process(pid: i32) -> Option<Process> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let metadata = std::fs::metadata(&dir).ok()?;
    let exe = std::fs::read_link(dir.join("exe")).ok().map(|exe| {
        // A binary replaced since it started (a rebuild, an upgrade).
        let text = exe.as_os_str().as_bytes();
        match text.strip_suffix(b" (deleted)") {
            Some(rest) => PathBuf::from(OsString::from_vec(rest.to_vec())),
            None => exe,
        }
    });
    let comm = std::fs::read_to_string(dir.join("comm"))
        .ok()
        .map(|comm| comm.trim_end().to_owned());
    Some(Process {
        pid,
        uid: Some(metadata.uid()),
        exe,
        comm,
    })
}

/// The environment of `pid` (readable for the same user only).
pub(crate) fn environ(pid: i32) -> Option<Vec<(OsString, OsString)>> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|entry| !entry.is_empty())
            .filter_map(|entry| {
                let at = entry.iter().position(|b| *b == b'=')?;
                Some((
                    OsString::from_vec(entry[..at].to_vec()),
                    OsString::from_vec(entry[at + 1..].to_vec()),
                ))
            })
            .collect(),
    )
}

/// The command line of `pid`.
pub(crate) fn cmdline(pid: i32) -> Option<Vec<OsString>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| OsString::from_vec(arg.to_vec()))
            .collect(),
    )
}

/// Whether `pid`'s standard input is a terminal (a pinentry-curses could ask there).
pub(crate) fn stdin_is_terminal(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/0")).is_ok_and(|target| {
        let target = target.as_os_str().as_bytes();
        target.starts_with(b"/dev/pts/") || target.starts_with(b"/dev/tty")
    })
}

/// The process holding the listening socket bound at `path`; a process
/// other than systemd when both hold it (socket activation).
fn listening_process(path: &Path) -> Option<Process> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let canonical = std::fs::canonicalize(path).ok();
    let inode = table.lines().skip(1).find_map(|line| {
        // Num RefCount Protocol Flags Type St Inode Path
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (flags, inode, bound) = (fields.get(3)?, fields.get(6)?, fields.get(7)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        let bound = Path::new(bound);
        let same = bound == path || canonical.as_deref() == Some(bound);
        (flags & LISTENING != 0 && same).then(|| inode.to_string())
    })?;
    let link = format!("socket:[{inode}]");
    let mut holders = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == link.as_str())
        });
        if holds {
            holders.extend(process(pid));
        }
    }
    let agent = holders.iter().position(|p| !is_systemd(p));
    match agent {
        Some(at) => Some(holders.swap_remove(at)),
        None => holders.into_iter().next(),
    }
}
