//! Running token-agent (or OpenSSH's ssh-agent) for a test.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{agent_binary, wait_for};

/// An agent serving on a socket in its own temporary directory.
#[derive(Debug)]
pub struct Agent {
    dir: TempDir,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// A background agent's process, which is not this process's child.
    daemon: Option<Pid>,
}

/// How to start token-agent.
#[derive(Debug, Default, Clone)]
pub struct AgentOptions {
    /// Extra flags (`-t 60`, `-P ...`).
    pub args: Vec<String>,
    /// Environment variables for the agent.
    pub env: Vec<(String, String)>,
    /// Contents of a configuration file, if any.
    pub config: Option<String>,
}

impl Agent {
    /// Starts token-agent in the foreground (`-d`) with `options`.
    pub fn start(options: AgentOptions) -> anyhow::Result<Self> {
        Self::start_binary(&agent_binary()?, options)
    }

    /// [`Agent::start`] with the token-agent executable at `binary`.
    pub fn start_binary(binary: &Path, options: AgentOptions) -> anyhow::Result<Self> {
        Self::start_as(binary, options, false)
    }

    /// Starts token-agent in the background, as a person's `eval
    /// "$(token-agent)"` does: the agent detaches, logs to its default log
    /// file (under its own HOME, the test's directory) at its default level
    /// unless `options` set TOKEN_AGENT_LOG, and is stopped by PID.
    pub fn start_background(options: AgentOptions) -> anyhow::Result<Self> {
        Self::start_background_binary(&agent_binary()?, options)
    }

    /// [`Agent::start_background`] with the token-agent executable at `binary`.
    pub fn start_background_binary(binary: &Path, options: AgentOptions) -> anyhow::Result<Self> {
        Self::start_as(binary, options, true)
    }

    fn start_as(binary: &Path, options: AgentOptions, background: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("token-agent-test")
            .tempdir()?;
        let socket = dir.path().join("agent.sock");
        let mut command = Command::new(binary);
        if !background {
            command.arg("-d");
        }
        command.arg("-a").arg(&socket);
        command.args(&options.args);
        let config = dir.path().join("config.toml");
        std::fs::write(&config, options.config.as_deref().unwrap_or(""))?;
        command.arg("--config").arg(&config);
        // A clean environment: no desktop, no askpass, unless the test asks.
        command.env_remove("SSH_ASKPASS").env_remove("DISPLAY");
        command
            .env_remove("WAYLAND_DISPLAY")
            .env_remove("SSH_AUTH_SOCK");
        let log = if background {
            command
                .env("HOME", dir.path())
                .env_remove("XDG_STATE_HOME")
                .env_remove("TOKEN_AGENT_LOG");
            dir.path().join(".local/state/token-agent/agent.log")
        } else {
            command.env("TOKEN_AGENT_LOG", "debug");
            dir.path().join("agent.log")
        };
        for (key, value) in &options.env {
            command.env(key, value);
        }
        command.stdin(Stdio::null());
        let (child, daemon) = if background {
            let pid = detach(&mut command).context("cannot start token-agent in the background")?;
            (None, Some(pid))
        } else {
            command
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?);
            (
                Some(command.spawn().context("cannot start token-agent")?),
                None,
            )
        };
        let agent = Self {
            dir,
            socket,
            log,
            child,
            daemon,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Starts OpenSSH's ssh-agent in the foreground with `env` added to its environment.
    pub fn start_openssh(env: &[(String, String)]) -> anyhow::Result<Self> {
        Self::start_openssh_with(&crate::openssh::OpenSsh::system(), &[], env)
    }

    /// [`Agent::start_openssh`] with the ssh-agent of `openssh` and `args`.
    pub fn start_openssh_with(
        openssh: &crate::openssh::OpenSsh,
        args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("openssh-agent-test")
            .tempdir()?;
        let socket = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        let child = Command::new(openssh.tool("ssh-agent"))
            .arg("-D")
            .args(args)
            .arg("-a")
            .arg(&socket)
            .env_remove("SSH_ASKPASS")
            .env_remove("DISPLAY")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start ssh-agent")?;
        let agent = Self {
            dir,
            socket,
            log,
            child: Some(child),
            daemon: None,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    /// OpenSSH's ssh-agent in the background, as `eval "$(ssh-agent)"`
    /// starts it, with `env` added to its environment; stopped by PID.
    pub fn start_openssh_background(env: &[(String, String)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("openssh-agent-test")
            .tempdir()?;
        let socket = dir.path().join("agent.sock");
        let mut command = Command::new(crate::openssh::OpenSsh::system().tool("ssh-agent"));
        command
            .arg("-s")
            .arg("-a")
            .arg(&socket)
            .env_remove("SSH_ASKPASS")
            .env_remove("DISPLAY")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let daemon = detach(&mut command).context("cannot start ssh-agent in the background")?;
        let agent = Self {
            log: dir
                .path()
                .join("no log: ssh-agent logs nothing in the background"),
            dir,
            socket,
            child: None,
            daemon: Some(daemon),
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let ready = wait_for(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
        if !ready {
            bail!("the agent did not start:\n{}", self.log_text());
        }
        Ok(())
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A directory for the test's own files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        match self.daemon {
            Some(pid) => u32::try_from(pid.as_raw()).ok(),
            None => self.child.as_ref().map(Child::id),
        }
    }

    /// Everything the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log shows `text` within 10 seconds (lines the agent
    /// writes after its answer, or on a timer).
    pub fn log_shows(&self, text: &str) -> bool {
        wait_for(Duration::from_secs(10), || self.log_text().contains(text))
    }

    /// Whether the agent process still runs.
    pub fn alive(&mut self) -> bool {
        if let Some(pid) = self.daemon {
            return crate::running(pid.as_raw());
        }
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// A command with SSH_AUTH_SOCK pointing at this agent.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env("SSH_AUTH_SOCK", &self.socket)
            .env_remove("SSH_AGENT_PID")
            .env_remove("DISPLAY")
            .env_remove("SSH_ASKPASS")
            .stdin(Stdio::null());
        command
    }

    /// Runs `ssh-add ARGS` against this agent.
    pub fn ssh_add<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.command("ssh-add").args(args).output()?)
    }

    /// `ssh-add -L`: the listed public keys, one per line.
    pub fn listed(&self) -> anyhow::Result<Vec<String>> {
        let output = self.ssh_add(["-L"])?;
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with("The agent has no identities"))
            .map(str::to_owned)
            .collect())
    }

    /// `token-agent status --json` against this agent, parsed.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let output = crate::check(
            Command::new(agent_binary()?)
                .args(["status", "--json", "--socket"])
                .arg(&self.socket)
                .output()?,
            "token-agent status --json",
        )?;
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// The newest refusal `token-agent status` records (JSON null when none).
    pub fn last_refusal(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.status()?["refusals"]
            .as_array()
            .and_then(|r| r.last())
            .cloned()
            .unwrap_or_default())
    }

    /// Stops the agent with SIGTERM and waits for it to end (killing it if
    /// it has not within 10 seconds).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.daemon.take() {
            let _ = kill(pid, Signal::SIGTERM);
            let stopped = wait_for(Duration::from_secs(10), || !crate::running(pid.as_raw()));
            if !stopped {
                let _ = kill(pid, Signal::SIGKILL);
                bail!("the background agent did not stop on SIGTERM");
            }
            return Ok(());
        }
        let mut child = self.child.take().context("agent already stopped")?;
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        let _ = kill(pid, Signal::SIGTERM);
        let stopped = wait_for(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = child.kill();
        }
        child.wait()?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() || self.daemon.is_some() {
            let _ = self.stop();
        }
    }
}

/// Runs an agent's `command` that starts it in the background, and returns
/// the PID of the agent it started, from the shell commands it prints
/// (`SSH_AGENT_PID=1234; export SSH_AGENT_PID;`).
fn detach(command: &mut Command) -> anyhow::Result<Pid> {
    // The command exits once the agent serves; the agent lets go of the pipe.
    let output = command.output()?;
    let said = String::from_utf8_lossy(&output.stdout);
    let pid = said
        .split_once("SSH_AGENT_PID=")
        .and_then(|(_, rest)| rest.split(';').next()?.parse::<i32>().ok())
        .with_context(|| {
            format!(
                "no SSH_AGENT_PID in what it said ({}):\n{said}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    Ok(Pid::from_raw(pid))
}

/// Generates a key pair of `kind` ("ed25519", "ecdsa-256", "rsa-2048", ...) at `path`.
pub fn keygen(path: &Path, kind: &str, comment: &str) -> anyhow::Result<()> {
    let (algorithm, bits) = kind.split_once('-').unwrap_or((kind, ""));
    let mut command = Command::new("ssh-keygen");
    command.args(["-q", "-N", "", "-t", algorithm, "-C", comment, "-f"]);
    command.arg(path);
    if !bits.is_empty() {
        command.args(["-b", bits]);
    }
    crate::check(command.output()?, "ssh-keygen")?;
    Ok(())
}
