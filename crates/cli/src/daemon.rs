//! Starting the agent in the background, as ssh-agent does without `-d`/`-D`.
//!
//! Rather than fork (which needs `unsafe` and is unsound in a process that
//! may have threads), token-agent starts itself again as a detached child
//! (`--daemon-child`), waits until the child listens, and then either prints
//! the shell commands that point at it or runs COMMAND with them set.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};
use token_agent_core::FingerprintHash;

use crate::args::{Options, SocketPlace};
use crate::serve::READY;
use crate::shell;

/// Starts the agent in the background.
pub(crate) fn start(options: &Options) -> anyhow::Result<ExitCode> {
    warn_if_another_agent_runs();
    let exe = std::env::current_exe().context("cannot find the token-agent executable")?;
    let mut child = Command::new(exe);
    child
        .arg("--daemon-child")
        .args(child_flags(options))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !options.command.is_empty() {
        child
            .arg("--parent-pid")
            .arg(std::process::id().to_string());
    }
    let mut child = child.spawn().context("cannot start the agent")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no pipe from the agent")?;
    // READY and the socket path's bytes up to a NUL, which no path holds:
    // a path with a newline or bytes that are not UTF-8 comes through whole.
    let mut ready = Vec::new();
    BufReader::new(stdout)
        .read_until(0, &mut ready)
        .context("cannot read from the agent")?;
    let socket = ready
        .strip_suffix(b"\0")
        .and_then(|ready| ready.strip_prefix(READY.as_bytes()))
        .map(|path| PathBuf::from(OsString::from_vec(path.to_vec())));
    let Some(socket) = socket else {
        // The child failed before listening: relay what it said.
        let mut said = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut said);
        }
        let _ = child.wait();
        let said = said.trim().trim_start_matches("token-agent: ");
        bail!("the agent did not start: {said}");
    };
    // The child has let go of its stdout and stderr pipes (detach_stdio)
    // before it said READY; what it wrote on stderr until then (a warning
    // that it could not make its log file) is passed on, and no shell waits
    // on the pipes.
    if let Some(stderr) = child.stderr.take() {
        pass_on_warnings(stderr);
    }

    if options.command.is_empty() {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&shell::environment(options.shell, &socket, pid, true))?;
        stdout.flush().context("cannot write to stdout")?;
        return Ok(ExitCode::SUCCESS);
    }
    let (program, args) = options.command.split_first().context("no command given")?;
    let err = Command::new(program)
        .args(args)
        .env("SSH_AUTH_SOCK", &socket)
        .env("SSH_AGENT_PID", pid.to_string())
        .exec();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
        nix::sys::signal::Signal::SIGTERM,
    );
    Err(err).with_context(|| format!("cannot run {}", program.to_string_lossy()))
}

/// Copies to this process's stderr what the child wrote on its stderr before
/// it said READY. The child has let go of the pipe by then and started no
/// process that holds it, but it is read without waiting all the same: the
/// parent must never hang on it.
fn pass_on_warnings(stderr: std::process::ChildStderr) {
    let mut stderr = File::from(std::os::fd::OwnedFd::from(stderr));
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if fcntl(stderr.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
        return;
    }
    let mut said = Vec::new();
    let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut said);
    if !said.is_empty() {
        let _ = std::io::stderr().write_all(&said);
    }
}

/// In the background agent, before its backends start and before it tells
/// the parent where it listens: standard input and output go to /dev/null
/// and standard error to the log file, as ssh-agent's `stdfd_devnull()`
/// (which sends standard error to /dev/null too: here the log keeps what
/// PKCS#11 helpers and notice commands say there). Left as they were, both
/// would stay pipes whose reader has exited, and a helper that prints a
/// warning would die of it. Returns a copy of the pipe to the parent, for
/// READY.
pub(crate) fn detach_stdio(log: Option<&File>) -> anyhow::Result<File> {
    let parent = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .context("cannot keep the pipe to the parent")?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("cannot open /dev/null")?;
    let stderr = log.unwrap_or(&null);
    for (file, fd) in [(&null, 0), (&null, 1), (stderr, 2)] {
        nix::unistd::dup2(file.as_raw_fd(), fd)
            .with_context(|| format!("cannot redirect file descriptor {fd}"))?;
    }
    Ok(parent)
}

/// In the background agent, before anything else: closes every file
/// descriptor but 0, 1 and 2, as ssh-agent's `closefrom()`. The child
/// inherits whatever the shell that started token-agent had open (the write
/// end of a pipe in `{ token-agent -s >out; } 5>&1 | cat`), and holding it
/// would keep that pipe open as long as the agent runs.
pub(crate) fn close_inherited_fds() {
    close_inherited_fds_but(&[]);
}

/// [`close_inherited_fds`], keeping `keep` (the socket systemd passes).
pub(crate) fn close_inherited_fds_but(keep: &[i32]) {
    // Listed first, closed after: the listing's own descriptor is gone by
    // then (closing it again fails harmlessly), and nothing else runs yet
    // to reuse its number.
    let open: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2 && !keep.contains(&fd))
            .collect(),
        // Without /proc: every number below the limit (capped, as a limit
        // may be a million).
        Err(_) => {
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft.min(65_536));
            (3..i32::try_from(limit).unwrap_or(1024))
                .filter(|fd| !keep.contains(fd))
                .collect()
        }
    };
    for fd in open {
        let _ = nix::unistd::close(fd);
    }
}

/// In the background agent, once it listens: moves to `/`, as ssh-agent's
/// child does, so the agent does not keep the directory it was started in
/// busy (an unmount, a removed build directory).
pub(crate) fn leave_cwd() {
    if let Err(err) = nix::unistd::chdir("/") {
        tracing::warn!(%err, "cannot change to the root directory");
    }
}

/// The flags the child needs to serve as this process was asked.
fn child_flags(options: &Options) -> Vec<std::ffi::OsString> {
    let mut flags: Vec<std::ffi::OsString> = Vec::new();
    match &options.socket {
        SocketPlace::Path(path) => {
            flags.push("-a".into());
            flags.push(path.into());
        }
        SocketPlace::TempDir => flags.push("-T".into()),
        SocketPlace::Home { clean: true } => {}
        SocketPlace::Home { clean: false } => flags.push("-U".into()),
    }
    if let Some(lifetime) = options.default_lifetime {
        flags.push("-t".into());
        flags.push(lifetime.as_secs().to_string().into());
    }
    if let Some(providers) = &options.allowed_providers {
        flags.push("-P".into());
        flags.push(providers.into());
    }
    if options.fingerprint_hash != FingerprintHash::default() {
        flags.push("-E".into());
        flags.push(options.fingerprint_hash.name().into());
    }
    if options.allow_remote_pkcs11 {
        flags.push("-O".into());
        flags.push("allow-remote-pkcs11".into());
    }
    if !options.websafe.restricts() {
        flags.push("-O".into());
        flags.push("no-restrict-websafe".into());
    }
    if options.websafe.allowlist() != token_agent_server::websafe::DEFAULT_ALLOWLIST {
        flags.push("-O".into());
        flags.push(format!("websafe-allow={}", options.websafe.allowlist()).into());
    }
    if let Some(config) = &options.config {
        flags.push("--config".into());
        flags.push(config.into());
    }
    flags
}

/// Starting a second agent is allowed, but usually a mistake: say so.
fn warn_if_another_agent_runs() {
    let Some(socket) = std::env::var_os("SSH_AUTH_SOCK") else {
        return;
    };
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        eprintln!(
            "token-agent: note: SSH_AUTH_SOCK already points at a running agent ({}); \
             this starts another one",
            PathBuf::from(socket).display()
        );
    }
}
