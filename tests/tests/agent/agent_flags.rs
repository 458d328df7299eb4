//! OpenSSH 10.x's ssh-agent flags and signals (issue 13), each checked side
//! by side with OpenSSH 10.5's own ssh-agent: the default socket in
//! ~/.ssh/agent, -T, stale-socket cleanup (-u, -uu, -U), -V, SIGUSR1 and
//! socket activation. Every test has its own HOME and TMPDIR.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use token_agent_e2e::agent::keygen;
use token_agent_e2e::openssh::OpenSsh;
use token_agent_e2e::{agent_binary, check, stderr, stdout, wait_for, write_script};

/// The two agents compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    TokenAgent,
    OpenSsh10,
}

const BOTH: [Which; 2] = [Which::TokenAgent, Which::OpenSsh10];

/// A private HOME (and TMPDIR below it) for one agent.
struct Home {
    dir: TempDir,
}

impl Home {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("issue13-home").tempdir()?;
        std::fs::create_dir(dir.path().join("tmp"))?;
        std::fs::write(dir.path().join("config.toml"), "")?;
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn tmp(&self) -> PathBuf {
        self.path().join("tmp")
    }

    fn socket_dir(&self) -> PathBuf {
        self.path().join(".ssh/agent")
    }

    /// The agent `which`, with this HOME and nothing of the caller's agent environment.
    fn agent(&self, which: Which) -> anyhow::Result<Command> {
        let mut command = match which {
            Which::TokenAgent => {
                let mut command = Command::new(agent_binary()?);
                command
                    .arg("--config")
                    .arg(self.path().join("config.toml"))
                    .env("XDG_STATE_HOME", self.path())
                    .env("XDG_CONFIG_HOME", self.path())
                    .env("TOKEN_AGENT_LOG", "debug");
                command
            }
            Which::OpenSsh10 => Command::new(OpenSsh::v10()?.tool("ssh-agent")),
        };
        command
            .env("HOME", self.path())
            .env("TMPDIR", self.tmp())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("SSH_AGENT_PID")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("SSH_ASKPASS")
            .env_remove("DISPLAY")
            .stdin(Stdio::null());
        Ok(command)
    }
}

/// An agent in the foreground (`-D`), its socket read from the line it prints.
struct Foreground {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    _log_dir: TempDir,
}

impl Foreground {
    fn start(mut command: Command) -> anyhow::Result<Self> {
        let log_dir = tempfile::Builder::new().prefix("issue13-log").tempdir()?;
        let log = log_dir.path().join("agent.log");
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start the agent")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let socket = line
            .strip_prefix("SSH_AUTH_SOCK=")
            .and_then(|rest| rest.split(';').next())
            .map(PathBuf::from);
        let mut agent = Self {
            child: Some(child),
            socket: socket.clone().unwrap_or_default(),
            log,
            _log_dir: log_dir,
        };
        if socket.is_none() {
            let _ = agent.stop();
            bail!(
                "the agent printed {line:?}:\n{}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            );
        }
        Ok(agent)
    }

    fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .unwrap_or(0)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let child = self.child.take().context("already stopped")?;
        stop(child)
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = stop(child);
        }
    }
}

/// SIGTERM by PID, then wait (killing it after 10 s).
fn stop(mut child: Child) -> anyhow::Result<ExitStatus> {
    let _ = kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGTERM);
    if !wait_for(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        let _ = child.kill();
    }
    Ok(child.wait()?)
}

/// `ssh-add ARGS` (OpenSSH 10.5's) against `socket`.
fn ssh_add(socket: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(OpenSsh::v10()?.tool("ssh-add"))
        .args(args)
        .env("SSH_AUTH_SOCK", socket)
        .env_remove("SSH_ASKPASS")
        .env_remove("DISPLAY")
        .stdin(Stdio::null())
        .output()?)
}

fn lists_nothing(socket: &Path) -> anyhow::Result<bool> {
    Ok(stdout(&ssh_add(socket, &["-l"])?).contains("The agent has no identities."))
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

/// The host hash OpenSSH 10.5's ssh-agent puts in its socket names here.
fn openssh_host_hash() -> anyhow::Result<String> {
    let home = Home::new()?;
    let mut agent = Foreground::start({
        let mut command = home.agent(Which::OpenSsh10)?;
        command.arg("-D");
        command
    })?;
    let name = agent
        .socket
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    agent.stop()?;
    let hash = name
        .strip_prefix("s.")
        .and_then(|rest| rest.split('.').next())
        .with_context(|| format!("unexpected socket name {name}"))?;
    Ok(hash.to_owned())
}

/// `(host hash, length of the random part)` of a default socket name, checked
/// to be `HOME/.ssh/agent/s.<hash>.agent.<random>`.
fn home_socket_shape(home: &Home, socket: &Path) -> anyhow::Result<(String, usize)> {
    ensure!(
        socket.parent() == Some(home.socket_dir().as_path()),
        "{} is not in {}",
        socket.display(),
        home.socket_dir().display()
    );
    let name = socket
        .file_name()
        .and_then(|n| n.to_str())
        .context("no socket name")?;
    let parts: Vec<&str> = name.split('.').collect();
    ensure!(
        parts.len() == 4 && parts[0] == "s" && parts[2] == "agent",
        "unexpected socket name {name}"
    );
    ensure!(
        parts[1]
            .bytes()
            .chain(parts[3].bytes())
            .all(|c| c.is_ascii_alphanumeric()),
        "{name}"
    );
    Ok((parts[1].to_owned(), parts[3].len()))
}

#[test]
fn issue_13_default_socket_is_named_and_made_as_openssh_10_makes_it() -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for which in BOTH {
        let home = Home::new()?;
        let mut command = home.agent(which)?;
        command.arg("-D");
        let mut agent = Foreground::start(command)?;
        let shape = home_socket_shape(&home, &agent.socket)?;
        let modes = (
            mode(&home.path().join(".ssh"))?,
            mode(&home.socket_dir())?,
            mode(&agent.socket)?,
        );
        ensure!(lists_nothing(&agent.socket)?, "{which:?} does not answer");
        let status = agent.stop()?;
        ensure!(status.code().is_some(), "{which:?} died: {status}");
        ensure!(
            !agent.socket.exists(),
            "{which:?} left {}",
            agent.socket.display()
        );
        ensure!(home.socket_dir().is_dir(), "{which:?} removed ~/.ssh/agent");
        seen.push((shape, modes));
    }
    assert_eq!(seen[0], seen[1], "token-agent vs OpenSSH 10.5");
    assert_eq!(seen[0].0 .1, 10, "ten random characters");
    assert_eq!(seen[0].1, (0o700, 0o700, 0o600));
    Ok(())
}

#[test]
fn issue_13_background_start_puts_the_socket_in_home_too() -> anyhow::Result<()> {
    let home = Home::new()?;
    let output = check(
        home.agent(Which::TokenAgent)?.arg("-s").output()?,
        "token-agent -s",
    )?;
    let text = stdout(&output);
    let variable = |name: &str| {
        text.split(&format!("{name}="))
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap_or_default()
            .to_owned()
    };
    let socket = PathBuf::from(variable("SSH_AUTH_SOCK"));
    let pid: i32 = variable("SSH_AGENT_PID").parse()?;
    let shape = home_socket_shape(&home, &socket);
    let answers = lists_nothing(&socket);
    kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    ensure!(shape?.1 == 10);
    ensure!(answers?);
    ensure!(wait_for(Duration::from_secs(10), || !socket.exists()));
    Ok(())
}

#[test]
fn issue_13_t_binds_in_tmpdir_as_before_openssh_10() -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for which in BOTH {
        let home = Home::new()?;
        let mut command = home.agent(which)?;
        command.args(["-D", "-T"]);
        let mut agent = Foreground::start(command)?;
        let pid = agent.pid();
        let dir = agent.socket.parent().context("no directory")?.to_owned();
        ensure!(
            dir.parent() == Some(home.tmp().as_path()),
            "{which:?}: {}",
            agent.socket.display()
        );
        ensure!(
            agent.socket.file_name().and_then(|n| n.to_str()) == Some(&format!("agent.{pid}")),
            "{which:?}: {}",
            agent.socket.display()
        );
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        // glibc's mkdtemp replaces only the last six of OpenSSH's twelve X's.
        let random = dir_name
            .strip_prefix("ssh-XXXXXX")
            .with_context(|| format!("{which:?}: {dir_name}"))?;
        ensure!(
            random.len() == 6 && random.bytes().all(|c| c.is_ascii_alphanumeric()),
            "{which:?}: {dir_name}"
        );
        let modes = (mode(&dir)?, mode(&agent.socket)?);
        ensure!(lists_nothing(&agent.socket)?);
        agent.stop()?;
        ensure!(!dir.exists(), "{which:?} left {}", dir.display());
        ensure!(!home.path().join(".ssh").exists(), "{which:?} made ~/.ssh");
        seen.push(modes);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], (0o700, 0o600));
    Ok(())
}

#[test]
fn issue_13_a_home_without_room_for_the_socket_is_an_error_as_in_openssh() -> anyhow::Result<()> {
    for which in BOTH {
        let home = Home::new()?;
        let missing = home.path().join("missing/home");
        let output = home
            .agent(which)?
            .arg("-D")
            .env("HOME", &missing)
            .stdout(Stdio::null())
            .output()?;
        ensure!(!output.status.success(), "{which:?} started");
        ensure!(
            stderr(&output).contains(&format!("{}/.ssh", missing.display())),
            "{which:?}: {}",
            stderr(&output)
        );
        ensure!(!home.path().join("missing").exists());
        if which == Which::TokenAgent {
            assert_eq!(output.status.code(), Some(1));
            assert!(
                stderr(&output).contains("-a PATH or -T"),
                "{}",
                stderr(&output)
            );
        }
    }
    Ok(())
}

/// Stale, live, recent and foreign sockets in `home`'s ~/.ssh/agent, as an
/// agent finds them after other agents died; the live listeners are returned
/// to keep them alive.
fn agents_left_behind(home: &Home, host_hash: &str) -> anyhow::Result<Vec<UnixListener>> {
    let dir = home.socket_dir();
    std::fs::create_dir_all(&dir)?;
    let two_hours_ago = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs()
        - 7200;
    let old = nix::sys::time::TimeSpec::new(i64::try_from(two_hours_ago)?, 0);
    let age = |name: &str| {
        nix::sys::stat::utimensat(
            None,
            &dir.join(name),
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
    };
    let dead = |name: &str| -> anyhow::Result<()> {
        drop(UnixListener::bind(dir.join(name))?);
        Ok(())
    };
    let other_host = if host_hash == "OtherHost1" {
        "OtherHost2"
    } else {
        "OtherHost1"
    };
    dead(&format!("s.{host_hash}.agent.stale00001"))?;
    age(&format!("s.{host_hash}.agent.stale00001"))?;
    let live = UnixListener::bind(dir.join(format!("s.{host_hash}.agent.live000001")))?;
    age(&format!("s.{host_hash}.agent.live000001"))?;
    dead(&format!("s.{host_hash}.agent.recent0001"))?;
    dead(&format!("s.{other_host}.agent.stale00002"))?;
    age(&format!("s.{other_host}.agent.stale00002"))?;
    dead("not-an-agent-name")?;
    age("not-an-agent-name")?;
    std::fs::write(dir.join("a-regular-file"), "")?;
    age("a-regular-file")?;
    Ok(vec![live])
}

fn left(home: &Home) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(home.socket_dir())? {
        names.insert(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

#[test]
fn issue_13_u_and_uu_remove_the_stale_sockets_openssh_10_removes() -> anyhow::Result<()> {
    let hash = openssh_host_hash()?;
    let mut after = Vec::new();
    for which in BOTH {
        let home = Home::new()?;
        let _live = agents_left_behind(&home, &hash)?;
        let once = home.agent(which)?.arg("-u").output()?;
        ensure!(once.status.success(), "{which:?} -u: {}", stderr(&once));
        assert_eq!(
            stdout(&once),
            "Deleted stale agent sockets in ~/.ssh/agent\n",
            "{which:?}"
        );
        let after_u = left(&home)?;
        let twice = home.agent(which)?.arg("-uu").output()?;
        ensure!(twice.status.success(), "{which:?} -uu: {}", stderr(&twice));
        after.push((after_u, left(&home)?));
    }
    assert_eq!(after[0], after[1], "token-agent vs OpenSSH 10.5");
    let names = |list: &[&str]| {
        list.iter()
            .map(|s| s.replace("HASH", &hash))
            .collect::<BTreeSet<_>>()
    };
    let other = if hash == "OtherHost1" {
        "OtherHost2"
    } else {
        "OtherHost1"
    };
    // -u: only this host's dead socket untouched for an hour.
    assert_eq!(
        after[0].0,
        names(&[
            "s.HASH.agent.live000001",
            "s.HASH.agent.recent0001",
            &format!("s.{other}.agent.stale00002"),
            "not-an-agent-name",
            "a-regular-file",
        ])
    );
    // -uu: every dead socket untouched for an hour, whatever its name.
    assert_eq!(
        after[0].1,
        names(&[
            "s.HASH.agent.live000001",
            "s.HASH.agent.recent0001",
            "a-regular-file",
        ])
    );
    Ok(())
}

#[test]
fn issue_13_start_cleans_stale_sockets_unless_capital_u() -> anyhow::Result<()> {
    let hash = openssh_host_hash()?;
    let stale = format!("s.{hash}.agent.stale00001");
    let live = format!("s.{hash}.agent.live000001");
    for which in BOTH {
        let home = Home::new()?;
        let _live = agents_left_behind(&home, &hash)?;
        let mut command = home.agent(which)?;
        command.args(["-D", "-U"]);
        let mut agent = Foreground::start(command)?;
        ensure!(left(&home)?.contains(&stale), "{which:?} -U cleaned up");
        agent.stop()?;
        let mut command = home.agent(which)?;
        command.arg("-D");
        let mut agent = Foreground::start(command)?;
        let names = left(&home)?;
        ensure!(!names.contains(&stale), "{which:?} kept {stale}");
        ensure!(names.contains(&live), "{which:?} removed a live socket");
        agent.stop()?;
    }
    Ok(())
}

#[test]
fn issue_13_v_prints_the_version_on_stderr_and_exits_0() -> anyhow::Result<()> {
    let home = Home::new()?;
    for which in BOTH {
        let output = home.agent(which)?.arg("-V").output()?;
        assert_eq!(output.status.code(), Some(0), "{which:?}");
        assert_eq!(stdout(&output), "", "{which:?}");
        let expected = match which {
            Which::TokenAgent => format!("token-agent {}\n", env!("CARGO_PKG_VERSION")),
            Which::OpenSsh10 => "OpenSSH_10".to_owned(),
        };
        assert!(
            stderr(&output).starts_with(&expected),
            "{which:?}: {}",
            stderr(&output)
        );
    }
    Ok(())
}

#[test]
fn issue_13_sigusr1_removes_every_key_even_while_locked() -> anyhow::Result<()> {
    for which in BOTH {
        let home = Home::new()?;
        let socket = home.tmp().join("agent.sock");
        let mut command = home.agent(which)?;
        command.arg("-D").arg("-a").arg(&socket);
        let mut agent = Foreground::start(command)?;
        let plain = home.path().join("id_plain");
        keygen(&plain, "ed25519", "plain")?;
        let constrained = home.path().join("id_constrained");
        keygen(&constrained, "ecdsa-256", "constrained")?;
        check(
            ssh_add(&socket, &[plain.to_str().unwrap_or_default()])?,
            "ssh-add",
        )?;
        check(
            ssh_add(
                &socket,
                &["-c", "-t", "3600", constrained.to_str().unwrap_or_default()],
            )?,
            "ssh-add -c -t",
        )?;
        ensure!(!lists_nothing(&socket)?);
        let askpass = home.path().join("askpass");
        write_script(&askpass, "echo lock-password")?;
        let locking = |flag: &str| -> anyhow::Result<()> {
            let output = Command::new(OpenSsh::v10()?.tool("ssh-add"))
                .arg(flag)
                .env("SSH_AUTH_SOCK", &socket)
                .env("SSH_ASKPASS", &askpass)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .stdin(Stdio::null())
                .output()?;
            check(output, &format!("ssh-add {flag}"))?;
            Ok(())
        };
        locking("-x")?;
        kill(Pid::from_raw(agent.pid()), Signal::SIGUSR1)?;
        let said = match which {
            Which::TokenAgent => "SIGUSR1: removed every key clients added",
            Which::OpenSsh10 => "removing all keys",
        };
        ensure!(
            wait_for(Duration::from_secs(10), || agent.log_text().contains(said)),
            "{which:?}:\n{}",
            agent.log_text()
        );
        locking("-X")?;
        ensure!(lists_nothing(&socket)?, "{which:?} kept keys");
        ensure!(agent.alive(), "{which:?} exited on SIGUSR1");
        // Still an agent: keys can be added again.
        check(
            ssh_add(&socket, &[plain.to_str().unwrap_or_default()])?,
            "ssh-add again",
        )?;
        ensure!(!lists_nothing(&socket)?);
    }
    Ok(())
}

/// `systemd-socket-activate -l SOCKET` starting `which` with `-D` at the first connection.
fn socket_activated(home: &Home, which: Which, socket: &Path) -> anyhow::Result<Child> {
    let agent = home.agent(which)?;
    let mut command = Command::new("systemd-socket-activate");
    command.arg("-l").arg(socket);
    // systemd-socket-activate passes only the variables named with -E.
    for (name, value) in agent.get_envs() {
        if let Some(value) = value {
            command.arg("-E").arg(format!(
                "{}={}",
                name.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    command
        .arg(agent.get_program())
        .arg("-D")
        .args(agent.get_args())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(home.tmp().join("stdout"))?)
        .stderr(std::fs::File::create(home.tmp().join("stderr"))?);
    command
        .spawn()
        .context("cannot run systemd-socket-activate (Debian's systemd package)")
}

#[test]
fn issue_13_socket_activation_serves_the_inherited_socket_and_leaves_it() -> anyhow::Result<()> {
    let mut codes = Vec::new();
    for which in BOTH {
        let home = Home::new()?;
        let socket = home.tmp().join("activated.sock");
        let child = socket_activated(&home, which, &socket)?;
        let log = || std::fs::read_to_string(home.tmp().join("stderr")).unwrap_or_default();
        ensure!(
            wait_for(Duration::from_secs(10), || socket.exists()),
            "{which:?}: {}",
            log()
        );
        // The first connection makes systemd-socket-activate exec the agent.
        let key = home.path().join("id");
        keygen(&key, "ed25519", "activated")?;
        let added = ssh_add(&socket, &[key.to_str().unwrap_or_default()])?;
        let listed = ssh_add(&socket, &["-l"])?;
        let status = stop(child)?;
        check(added, "ssh-add through the activated socket")
            .with_context(|| format!("{which:?}: {}", log()))?;
        ensure!(
            stdout(&listed).contains("activated"),
            "{which:?}: {}",
            stdout(&listed)
        );
        ensure!(socket.exists(), "{which:?} removed the supervisor's socket");
        ensure!(
            !home.path().join(".ssh").exists(),
            "{which:?} made a socket of its own"
        );
        let printed = std::fs::read_to_string(home.tmp().join("stdout"))?;
        ensure!(printed.is_empty(), "{which:?} printed {printed:?}");
        codes.push(status.code());
    }
    assert_eq!(
        codes,
        [Some(0), Some(0)],
        "SIGTERM under socket activation exits 0"
    );
    Ok(())
}

#[test]
fn issue_13_socket_activation_refuses_wrong_listen_variables() -> anyhow::Result<()> {
    for which in BOTH {
        let home = Home::new()?;
        // Two sockets announced: refused.
        let output = home
            .agent(which)?
            .arg("-D")
            .env("LISTEN_FDS", "2")
            .env("LISTEN_PID", "1")
            .stdout(Stdio::null())
            .output()?;
        ensure!(!output.status.success(), "{which:?}");
        ensure!(
            stderr(&output).contains("LISTEN_FDS"),
            "{which:?}: {}",
            stderr(&output)
        );
        // A socket meant for another process (fd 3 open, LISTEN_PID not ours): refused.
        let agent = home.agent(which)?;
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg("exec 3</dev/null; exec \"$0\" \"$@\" -D")
            .arg(agent.get_program())
            .args(agent.get_args())
            .envs(agent.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let output = shell.output()?;
        ensure!(!output.status.success(), "{which:?}");
        ensure!(
            stderr(&output).contains("bad LISTEN_PID: 1 vs pid"),
            "{which:?}: {}",
            stderr(&output)
        );
        ensure!(!home.path().join(".ssh").exists());
        // With -a, the variables do not matter.
        let socket = home.tmp().join("bound.sock");
        let mut command = home.agent(which)?;
        command
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .env("LISTEN_FDS", "2")
            .env("LISTEN_PID", "1");
        let mut agent = Foreground::start(command)?;
        ensure!(agent.socket == socket);
        ensure!(lists_nothing(&socket)?);
        agent.stop()?;
    }
    Ok(())
}

/// Starts `which` in the background with `args` through `sh -c SCRIPT`
/// (where `"$@"` is the agent's command line) in `cwd`, and returns the
/// environment lines it printed into `out` once the script ends, or None
/// when the script is still running after 10 s.
fn background_through_sh(
    home: &Home,
    which: Which,
    cwd: &Path,
    script: &str,
    args: &[&str],
) -> anyhow::Result<Option<String>> {
    let agent = home.agent(which)?;
    let out = home.path().join("out");
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(script)
        .arg("sh")
        .arg(out.as_os_str())
        .arg(agent.get_program())
        .args(agent.get_args())
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(agent.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = sh.spawn()?;
    let ended = wait_for(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    // Whatever happened, stop the agent it started.
    if let Some(pid) = printed_pid(&text) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    Ok(ended.then_some(text))
}

fn printed_pid(text: &str) -> Option<i32> {
    text.split("SSH_AGENT_PID=")
        .nth(1)?
        .split(';')
        .next()?
        .parse()
        .ok()
}

#[test]
fn background_agent_lets_go_of_inherited_descriptors_as_openssh_10() -> anyhow::Result<()> {
    for which in BOTH {
        let home = Home::new()?;
        let socket = home.path().join("s");
        // The agent inherits fd 5, the write end of the pipe to cat: held,
        // cat never sees the end of its input and the pipeline never ends.
        let text = background_through_sh(
            &home,
            which,
            home.path(),
            r#"out=$1; shift; { "$@" >"$out"; } 5>&1 | cat"#,
            &["-s", "-a", socket.to_str().context("UTF-8 path")?],
        )?;
        ensure!(
            text.is_some(),
            "{which:?}: `{{ agent -s >out; }} 5>&1 | cat` still runs after 10 s"
        );
        ensure!(
            text.as_deref().and_then(printed_pid).is_some(),
            "{which:?} printed {text:?}"
        );
    }
    Ok(())
}

#[test]
fn background_agent_moves_to_the_root_directory_and_d_stays_as_openssh_10() -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for which in BOTH {
        let home = Home::new()?;
        let started_in = home.path().join("started-in");
        std::fs::create_dir(&started_in)?;
        // A relative -a works, and is printed as given.
        let text = background_through_sh(
            &home,
            which,
            &started_in,
            r#"out=$1; shift; "$@" >"$out" && sleep 0.5 && ls -l /proc/$(sed -n 's/^SSH_AGENT_PID=\([0-9]*\);.*/\1/p' "$out")/cwd >>"$out""#,
            &["-s", "-a", "rel.sock"],
        )?
        .context("the background start did not end")?;
        let background_cwd = text
            .lines()
            .find_map(|line| line.split(" -> ").nth(1))
            .unwrap_or_default()
            .to_owned();
        let printed = text.lines().next().unwrap_or_default().to_owned();
        if which == Which::TokenAgent {
            // Stopped from `/`, it still removes the socket it made.
            ensure!(
                wait_for(Duration::from_secs(10), || !started_in
                    .join("rel.sock")
                    .exists()),
                "token-agent left rel.sock behind"
            );
        }

        let mut command = home.agent(which)?;
        command
            .args(["-D", "-a"])
            .arg(home.path().join("fg.sock"))
            .current_dir(&started_in);
        let mut agent = Foreground::start(command)?;
        let foreground_cwd = std::fs::read_link(format!("/proc/{}/cwd", agent.pid()))?;
        agent.stop()?;
        seen.push((printed, background_cwd, foreground_cwd == started_in));
    }
    assert_eq!(seen[0], seen[1], "token-agent vs OpenSSH 10.5");
    let (printed, background_cwd, foreground_stays) = &seen[0];
    assert_eq!(printed, "SSH_AUTH_SOCK=rel.sock; export SSH_AUTH_SOCK;");
    assert_eq!(background_cwd, "/");
    assert!(foreground_stays, "-D left the directory it was started in");
    Ok(())
}

/// Whether `which` starts in the foreground with `args`: it listens, or it
/// exits (with a usage error) first.
fn starts_with(which: Which, args: &[&str]) -> anyhow::Result<bool> {
    let home = Home::new()?;
    let socket = home.path().join("s");
    let mut child = home
        .agent(which)?
        .arg("-D")
        .args(args)
        .arg("-a")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut listening = false;
    wait_for(Duration::from_secs(20), || {
        listening = std::os::unix::net::UnixStream::connect(&socket).is_ok();
        listening || matches!(child.try_wait(), Ok(Some(_)))
    });
    stop(child)?;
    Ok(listening)
}

#[test]
fn t_and_e_take_every_value_openssh_10_takes() -> anyhow::Result<()> {
    let values: &[(&str, &[&str])] = &[
        (
            "-t",
            &[
                "0",
                "1.5",
                "0.5",
                ".5",
                "1.5s",
                "1m30",
                "1H30M",
                "2147483647",
                "1.5m",
                "1.",
                "1s2s",
                " 10",
                "1e3",
                "2147483648",
            ],
        ),
        (
            "-E",
            &[
                "md5", "sha1", "SHA1", "sha256", "sha384", "sha512", "sha224", "crc32",
            ],
        ),
    ];
    for (flag, values) in values {
        for value in *values {
            let ours = starts_with(Which::TokenAgent, &[flag, value])?;
            let theirs = starts_with(Which::OpenSsh10, &[flag, value])?;
            assert_eq!(
                ours, theirs,
                "{flag} {value:?}: token-agent starts: {ours}, OpenSSH 10.5's ssh-agent: {theirs}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_flag_given_twice_counts_once_more_and_usage_errors_exit_1_as_openssh_10() -> anyhow::Result<()>
{
    // The last -a wins (the first names a directory that does not exist).
    let repeated: &[&[&str]] = &[
        &["-a", "/nonexistent/agent.sock"],
        &["-t", "5", "-t", "0"],
        &["-t", "10x", "-t", "5"],
        &["-E", "md5", "-E", "sha256"],
        &["-E", "crc32", "-E", "sha256"],
        &["-s", "-s"],
        &["-c", "-c"],
        &["-U", "-U"],
        &["-c", "-s"],
        &["-d", "-d"],
        &["-D"],
    ];
    for args in repeated {
        let ours = starts_with(Which::TokenAgent, args)?;
        let theirs = starts_with(Which::OpenSsh10, args)?;
        assert_eq!(
            ours, theirs,
            "{args:?}: token-agent starts: {ours}, OpenSSH 10.5's ssh-agent: {theirs}"
        );
    }
    let home = Home::new()?;
    let usage_errors: &[&[&str]] = &[
        &["-x"],
        &["-c", "-s", "-k"],
        &["-d", "-D"],
        &["-d", "-d"],
        &["-t", "10x", "-D"],
        &["-a"],
        &["-k", "-k"],
    ];
    for args in usage_errors {
        let mut codes = Vec::new();
        for which in BOTH {
            let output = home
                .agent(which)?
                .args(*args)
                .stdout(Stdio::null())
                .output()?;
            codes.push(output.status.code());
        }
        assert_eq!(
            codes,
            [Some(1), Some(1)],
            "{args:?}: token-agent, OpenSSH 10.5"
        );
    }
    Ok(())
}

#[test]
fn d_and_d_stopped_by_sigterm_or_sigint_exit_2_as_openssh_10() -> anyhow::Result<()> {
    for flag in ["-D", "-d"] {
        for signal in [Signal::SIGTERM, Signal::SIGINT] {
            let mut codes = Vec::new();
            for which in BOTH {
                let home = Home::new()?;
                let mut command = home.agent(which)?;
                command.arg(flag).arg("-a").arg(home.path().join("s"));
                let mut agent = Foreground::start(command)?;
                // ssh-agent prints its lines before it catches signals; once
                // it answers, it has.
                ensure!(lists_nothing(&agent.socket)?, "{which:?} does not answer");
                let mut child = agent.child.take().context("no child")?;
                kill(Pid::from_raw(i32::try_from(child.id())?), signal)?;
                if !wait_for(Duration::from_secs(10), || {
                    matches!(child.try_wait(), Ok(Some(_)))
                }) {
                    let _ = child.kill();
                }
                codes.push(child.wait()?.code());
            }
            assert_eq!(
                codes,
                [Some(2), Some(2)],
                "{flag}, {signal}: token-agent, OpenSSH 10.5"
            );
        }
    }
    Ok(())
}

/// In the foreground too, as ssh-agent in every mode: a descriptor the
/// starting process left open does not reach the agent (nor so the helpers
/// and programs it starts).
#[test]
fn a_foreground_agent_lets_go_of_inherited_descriptors() -> anyhow::Result<()> {
    let home = Home::new()?;
    let socket = home.path().join("s");
    let held_file = home.path().join("held");
    std::fs::write(&held_file, "left open by the shell")?;
    let agent_command = home.agent(Which::TokenAgent)?;
    // The shell opens fd 7 (not close-on-exec) and becomes the agent.
    let mut command = Command::new("sh");
    command
        .args(["-c", r#"exec 7<"$0"; exec "$@""#])
        .arg(&held_file)
        .arg(agent_command.get_program())
        .args(agent_command.get_args())
        .args(["-D", "-a"])
        .arg(&socket)
        .envs(
            agent_command
                .get_envs()
                .filter_map(|(name, value)| value.map(|value| (name, value))),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut agent = command.spawn()?;
    let listening = wait_for(Duration::from_secs(10), || socket.exists());
    // Any descriptor of the agent that still names the file.
    let held: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", agent.id()))?
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| *target == held_file)
        .collect();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.id())?),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
    ensure!(listening, "the agent did not listen");
    ensure!(held.is_empty(), "the agent still holds {held:?}");
    Ok(())
}
