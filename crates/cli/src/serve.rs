//! Running the agent: bind the socket, wire the router, serve until told to stop.

use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ssh_key::Certificate;
use token_agent_core::{Backend, Prompter};
use token_agent_prompt::{Askpass, Bridge, NoticeConfig, Notifier, PinSource, Pinentry};
use token_agent_server::provider::ProviderAllowlist;
use token_agent_server::{listener, Policy, Router, SoftwareKeys};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::args::{Options, SocketPlace};
use crate::config::{self, Config, PinPrompt};
use crate::{activation, logging, shell, socket};

/// How this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `-d` / `-D`: in the foreground, logging to stderr.
    Foreground {
        /// `-d`: debug logs.
        debug: bool,
    },
    /// Started by `token-agent` without `-d`/`-D`: detached, logging to a file.
    DaemonChild,
}

/// What a daemon child prints once it listens, followed by the socket path
/// and a NUL.
pub(crate) const READY: &str = "TOKEN-AGENT-READY ";

/// Serves until SIGTERM (or SIGINT in the foreground, or the parent's exit).
pub(crate) fn run(options: &Options, role: Role) -> anyhow::Result<ExitCode> {
    let config = Config::load(options.config.as_deref())?;
    // The background agent's standard error once the parent has gone.
    let mut log_file = None;
    match role {
        Role::Foreground { debug } => {
            let level = if debug { "debug" } else { "info" };
            logging::to_stderr(level, config.log_level.as_deref());
        }
        Role::DaemonChild => {
            // A session of its own: the terminal's hangup and ^C do not reach the agent.
            nix::unistd::setsid().context("cannot start a new session")?;
            log_file = background_log(&config);
        }
    }
    harden();

    let place = place(options, role)?;
    let activated = matches!(place, Place::Inherited(_));
    // Only a relative socket path keeps the background agent where it started.
    let leaves_cwd = match &place {
        Place::Path { path, .. } => path.is_absolute(),
        Place::Home { dir, .. } => dir.is_absolute(),
        Place::Inherited(_) => true,
    };
    let certificates = load_certificates(&config.certificates)?;
    let mut policy = policy(options, &config)?;
    if role == Role::DaemonChild {
        // Upstream agents are reached from `/` too, once the agent has moved there.
        for socket in policy
            .upstreams
            .sockets
            .iter_mut()
            .chain(policy.upstreams.add_to.as_mut())
        {
            *socket = std::path::absolute(&*socket).unwrap_or_else(|_| socket.clone());
        }
    }
    // One thread runs the front end: its work per request is a few
    // microseconds of parsing and routing, and everything slow runs
    // elsewhere (helper processes, device threads, software signatures on
    // blocking threads). On one thread a helper's answer wakes the client's
    // task where it is read, with no handoff between threads, and no second
    // worker keeps a stack and a malloc arena.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stopped = runtime.block_on(async {
        // The handlers come first: a session may send SIGTERM as soon as it
        // reads the socket's path, and the default action would leave the
        // socket (and its directory) behind.
        let signals = Signals::install()?;
        let (socket, socket_path, _guard) = listen(place)?;
        check_upstreams(&policy.upstreams.sockets, &socket_path)?;
        // The background agent lets go of its standard streams before the
        // backends start: a PKCS#11 helper a backend starts at once inherits
        // stderr, which must be the log by then and not the parent's pipe.
        let parent = match role {
            Role::DaemonChild => Some(crate::daemon::detach_stdio(log_file.as_ref())?),
            Role::Foreground { .. } => None,
        };
        let router = Router::new(backends(&config), prompter(&config), policy, certificates);
        tracing::info!(
            socket = %socket_path.display(),
            activated,
            pid = std::process::id(),
            version = env!("CARGO_PKG_VERSION"),
            "token-agent started"
        );
        // A supervisor that passed the socket tells the session where it is
        // (ssh-agent prints nothing then either).
        if !activated {
            announce(options, &socket_path, parent)?;
        }
        if role == Role::DaemonChild && leaves_cwd {
            crate::daemon::leave_cwd();
        }
        crate::session_lock::follow(&router, config.desktop.on_lock);
        let stopped = std::cell::Cell::new(None);
        let until = signals.until_shutdown(role, options.parent_pid, router.clone());
        let shutdown = async {
            stopped.set(Some(until.await));
        };
        listener::serve(socket, router, listener::Access::current(), shutdown).await;
        tracing::info!("token-agent stopped");
        Ok::<_, anyhow::Error>(stopped.get())
    })?;
    Ok(stopped.map_or(ExitCode::SUCCESS, |why| why.exit_code(activated)))
}

/// The background agent's log: the configured or default file; else syslog
/// (the journal), else nothing. The agent starts either way, as ssh-agent
/// (which needs no file), and says on stderr, which the parent passes on
/// before it detaches, where its log went instead.
fn background_log(config: &Config) -> Option<File> {
    let level = config.log_level.as_deref();
    let failure = match config.log_file.clone().or_else(config::default_log_file) {
        Some(path) => match logging::to_file(&path, "info", level) {
            Ok(file) => return Some(file),
            Err(err) => format!("{err:#}"),
        },
        None => "no place for the log file (no HOME, no home directory in the passwd entry, \
                 no log_file)"
            .to_owned(),
    };
    let instead = if logging::to_syslog("info", level) {
        "logging to syslog instead (journalctl -t token-agent)"
    } else {
        "/dev/log cannot be reached either, so the agent logs nothing"
    };
    eprintln!("token-agent: warning: {failure}; {instead}");
    None
}

fn backends(config: &Config) -> Vec<Arc<dyn Backend>> {
    let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(SoftwareKeys::new())];
    if config.piv.enabled {
        backends.push(Arc::new(token_agent_piv::PivBackend::new(
            token_agent_piv::PivConfig {
                pin_cache_idle: Duration::from_secs(config.piv.pin_cache_idle_seconds),
            },
        )));
    }
    backends.push(Arc::new(token_agent_pkcs11::Pkcs11Backend::new(
        config.pkcs11.options(),
    )));
    // sk keys: a bad key file in [fido] keys turns the FIDO backend off, not the agent.
    match crate::fido::backend(&config.fido) {
        Ok(fido) => {
            crate::fido::load_resident_at_start(&config.fido, &fido, prompter(config));
            backends.push(Arc::new(fido));
        }
        Err(err) => tracing::error!("the FIDO backend is off: {err:#}"),
    }
    backends
}

fn policy(options: &Options, config: &Config) -> anyhow::Result<Policy> {
    let upstreams = config.upstreams(&options.upstreams);
    if let Some(add_to) = &upstreams.add_to {
        anyhow::ensure!(
            upstreams.sockets.contains(add_to),
            "[upstreams] add_to = {:?} is not one of the upstream agents ({}); list it in upstream or -A",
            add_to.display(),
            upstreams
                .sockets
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(Policy {
        default_lifetime: options.default_lifetime,
        providers: options
            .allowed_providers
            .clone()
            .map(ProviderAllowlist::new)
            .unwrap_or_default(),
        allow_remote_providers: options.allow_remote_pkcs11,
        fingerprint_hash: options.fingerprint_hash,
        websafe: options.websafe.clone(),
        forwarding: config.forwarding.policy(),
        upstreams,
        listing: config.listing()?,
    })
}

/// An upstream that is this agent's own socket would ask itself forever.
fn check_upstreams(upstreams: &[PathBuf], own: &Path) -> anyhow::Result<()> {
    let own = std::fs::canonicalize(own).unwrap_or_else(|_| own.to_owned());
    for upstream in upstreams {
        let upstream_path = std::fs::canonicalize(upstream).unwrap_or_else(|_| upstream.clone());
        anyhow::ensure!(
            upstream_path != own,
            "the upstream agent {} is token-agent's own socket; remove it from -A or upstream",
            upstream.display()
        );
    }
    for upstream in upstreams {
        tracing::info!(socket = %upstream.display(), "serving the keys of an upstream agent too");
    }
    Ok(())
}

fn prompter(config: &Config) -> Arc<dyn Prompter> {
    let program = config
        .prompt
        .pinentry
        .clone()
        .or_else(|| std::env::var_os("PINENTRY_PROGRAM").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("pinentry"));
    let timeout = config.prompt.timeout_seconds;
    let askpass = Askpass::from_environment(Duration::from_secs(u64::from(timeout)));
    let pin_source = match config.prompt.pin_prompt {
        PinPrompt::Pinentry => PinSource::Pinentry,
        PinPrompt::Askpass => PinSource::Askpass,
    };
    let notifier = Notifier::new(NoticeConfig {
        delay: config.notice.delay(),
        command: config.notice.command.clone(),
    });
    Arc::new(Bridge::new(
        Pinentry::new(program, timeout),
        askpass,
        pin_source,
        notifier,
    ))
}

fn load_certificates(paths: &[PathBuf]) -> anyhow::Result<Vec<Certificate>> {
    paths
        .iter()
        .map(|path| {
            Certificate::read_file(path)
                .with_context(|| format!("cannot read the certificate {}", path.display()))
        })
        .collect()
}

/// Where this agent listens, decided before it serves.
#[derive(Debug)]
enum Place {
    /// Bind at this path (`-a`, or `-T` in the directory made for it,
    /// removed at exit), and tell the shell `shown` (the path as given).
    Path {
        path: PathBuf,
        shown: PathBuf,
        made_dir: Option<PathBuf>,
    },
    /// The default: a fresh name in `~/.ssh/agent`.
    Home { dir: PathBuf, host_hash: String },
    /// Socket activation: the supervisor's socket.
    Inherited(std::os::unix::net::UnixListener),
}

/// Decides where to listen, in ssh-agent's order: socket activation (only
/// in the foreground, without `-a`), `-T`, `-a`, then `~/.ssh/agent` after
/// cleaning up stale sockets there (unless `-U`).
fn place(options: &Options, role: Role) -> anyhow::Result<Place> {
    let foreground = matches!(role, Role::Foreground { .. });
    if foreground && !matches!(options.socket, SocketPlace::Path(_)) {
        if let Some(listener) = activation::inherited()? {
            return Ok(Place::Inherited(listener));
        }
    }
    match &options.socket {
        SocketPlace::Path(path) => Ok(Place::Path {
            // The background agent leaves its working directory once it
            // listens, and removes its socket at exit by this path.
            path: for_role(role, path),
            shown: path.clone(),
            made_dir: None,
        }),
        SocketPlace::TempDir => {
            // agent.<pid of the process that printed the environment>: this
            // one in the foreground, the parent that started it otherwise.
            let pid = match role {
                Role::Foreground { .. } => std::process::id(),
                Role::DaemonChild => {
                    u32::try_from(nix::unistd::getppid().as_raw()).unwrap_or_default()
                }
            };
            let (path, dir) = socket::temp_dir_socket(pid)?;
            Ok(Place::Path {
                path: for_role(role, &path),
                shown: path,
                made_dir: Some(for_role(role, &dir)),
            })
        }
        SocketPlace::Home { clean } => {
            let home = socket::home_dir()?;
            if *clean {
                let removed = socket::cleanup_stale(&home, false);
                if !removed.is_empty() {
                    tracing::info!(
                        count = removed.len(),
                        "removed stale agent sockets in ~/{}",
                        socket::SOCKET_DIR
                    );
                }
            }
            let dir = socket::prepare_home_dir(&home)?;
            Ok(Place::Home {
                dir,
                host_hash: socket::host_hash()?,
            })
        }
    }
}

/// `path` as the background agent binds it and removes it at exit: from
/// `/`, which it moves to once it listens (see [`crate::daemon::leave_cwd`]).
/// A path that would be too long for a socket once absolute stays as it is,
/// and the agent then stays where it was started.
fn for_role(role: Role, path: &Path) -> PathBuf {
    // sun_path holds 108 bytes with the NUL.
    const SUN_PATH_MAX: usize = 107;
    match (role, std::path::absolute(path)) {
        (Role::DaemonChild, Ok(absolute)) if absolute.as_os_str().len() <= SUN_PATH_MAX => absolute,
        _ => path.to_owned(),
    }
}

/// Listens at `place`: the listener, its path, and the guard that removes
/// what the agent made (none for an inherited socket, which the agent never
/// removes).
fn listen(place: Place) -> anyhow::Result<(UnixListener, PathBuf, Option<listener::SocketGuard>)> {
    match place {
        Place::Path {
            path,
            shown,
            made_dir,
        } => {
            let (socket, guard) = listener::bind_owned(&path, made_dir)
                .with_context(|| format!("cannot listen on {}", shown.display()))?;
            Ok((socket, shown, Some(guard)))
        }
        Place::Home { dir, host_hash } => {
            // As mkstemp(3): draw another name while the drawn one is taken.
            for _ in 0..100 {
                let path = socket::home_socket_candidate(&dir, &host_hash);
                match listener::bind_owned(&path, None) {
                    Ok((socket, guard)) => return Ok((socket, path, Some(guard))),
                    Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => continue,
                    Err(err) => {
                        return Err(err)
                            .with_context(|| format!("cannot listen on {}", path.display()))
                    }
                }
            }
            anyhow::bail!("cannot find a free socket name in {}", dir.display())
        }
        Place::Inherited(socket) => {
            let path = socket
                .local_addr()
                .ok()
                .and_then(|address| address.as_pathname().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("(an unnamed socket)"));
            socket
                .set_nonblocking(true)
                .context("cannot use the socket passed by socket activation")?;
            let socket = UnixListener::from_std(socket)
                .context("cannot use the socket passed by socket activation")?;
            Ok((socket, path, None))
        }
    }
}

/// Tells the shell (foreground) or the parent (daemon child, on the pipe
/// [`crate::daemon::detach_stdio`] kept) where the agent is.
fn announce(options: &Options, socket: &Path, parent: Option<File>) -> anyhow::Result<()> {
    match parent {
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&shell::environment(
                options.shell,
                socket,
                std::process::id(),
                false,
            ))?;
            stdout.flush().context("cannot write to stdout")
        }
        Some(mut parent) => {
            let mut said = READY.as_bytes().to_vec();
            said.extend_from_slice(socket.as_os_str().as_bytes());
            said.push(0);
            parent
                .write_all(&said)
                .context("cannot tell the parent where the agent listens")
        }
    }
}

/// What stopped the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM.
    Term,
    /// SIGINT, in the foreground.
    Int,
    /// The process running COMMAND exited.
    ParentGone,
}

impl Stop {
    /// As ssh-agent: 2 after a signal (`cleanup_exit(2)`) or the end of
    /// COMMAND's process (`_exit(2)`), except 0 for SIGTERM under socket
    /// activation, which a supervisor reads as a clean stop.
    fn exit_code(self, activated: bool) -> ExitCode {
        match self {
            Self::Term if activated => ExitCode::SUCCESS,
            Self::Term | Self::Int | Self::ParentGone => ExitCode::from(2),
        }
    }
}

/// The signals the agent acts on, caught from the start.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
            usr1: signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?,
        })
    }

    /// Completes, saying why, on SIGTERM, on SIGINT in the foreground, or
    /// when the parent running COMMAND exits. SIGHUP makes every backend forget cached PINs and
    /// let go of its tokens, and SIGUSR1 removes every key clients added (as
    /// OpenSSH 10's `keydrop_handler`, even while locked); the agent goes on.
    async fn until_shutdown(
        mut self,
        role: Role,
        parent: Option<i32>,
        router: Arc<Router>,
    ) -> Stop {
        let foreground = matches!(role, Role::Foreground { .. });
        let mut parent_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    tracing::info!("SIGTERM: shutting down");
                    return Stop::Term;
                }
                _ = self.int.recv() => {
                    if foreground {
                        tracing::info!("SIGINT: shutting down");
                        return Stop::Int;
                    }
                }
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: forgetting cached PINs and releasing tokens");
                    router.forget_secrets();
                }
                _ = self.usr1.recv() => {
                    let removed = router.drop_all_keys().await;
                    tracing::info!(removed, "SIGUSR1: removed every key clients added");
                }
                _ = parent_check.tick(), if parent.is_some() => {
                    if let Some(pid) = parent {
                        if !parent_alive(pid) {
                            tracing::info!(pid, "the command's process exited: shutting down");
                            return Stop::ParentGone;
                        }
                    }
                }
            }
        }
    }
}

fn parent_alive(pid: i32) -> bool {
    nix::unistd::getppid().as_raw() == pid
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// No core dumps or ptrace by other processes of the user (PR_SET_DUMPABLE),
/// and room for many clients at once (RLIMIT_NOFILE raised to its hard limit).
fn harden() {
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(%err, "cannot make the process non-dumpable");
    }
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(%err, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(err) => tracing::debug!(%err, "cannot read the open-file limit"),
    }
}
