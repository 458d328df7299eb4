//! The fido-sim build of the agent (`--features fido-sim`), its simulated
//! security key, and logins through it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::{check, test_binary, wait_for, write_script};

/// The PIN tests give the simulated key when they want one.
pub(crate) const PIN: &str = "123456";

pub(crate) use token_agent_e2e::{
    fido_sim_agent_binary as sim_agent_binary, fido_sim_middleware as middleware_library,
};

/// The `-P` list that admits `library` (and OpenSSH's default directories).
pub(crate) fn allowing(library: &Path) -> anyhow::Result<String> {
    let dir = library.parent().context("the library has no directory")?;
    Ok(format!("/usr/lib*/*,/usr/local/lib*/*,{}/*", dir.display()))
}

/// A simulated security key (its state file) and a scripted pinentry.
#[derive(Debug)]
pub(crate) struct Token {
    dir: TempDir,
}

impl Token {
    /// A fresh simulated key, with `pin` set when given.
    pub(crate) fn new(pin: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fido-e2e").tempdir()?;
        let token = Self { dir };
        let sim = fido_sim::Simulator::open("token", &token.state())?;
        if let Some(pin) = pin {
            sim.set_pin(pin)?;
        }
        std::fs::write(token.dir.path().join("pinentry-script"), "")?;
        Ok(token)
    }

    /// The simulator's state file.
    pub(crate) fn state(&self) -> PathBuf {
        self.dir.path().join("fido-sim.json")
    }

    /// A directory for the test's files.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Answers the next PIN questions with `pins`.
    pub(crate) fn script_pins(&self, pins: &[&str]) -> anyhow::Result<()> {
        let script: String = pins.iter().map(|p| format!("pin {p}\n")).collect();
        std::fs::write(self.dir.path().join("pinentry-script"), script)?;
        Ok(())
    }

    /// What the pinentry was asked so far.
    pub(crate) fn pinentry_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pinentry.log")).unwrap_or_default()
    }

    /// The environment that attaches this simulator and the scripted pinentry.
    pub(crate) fn env(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(vec![
            (
                "TOKEN_AGENT_FIDO_SIM".into(),
                self.state().display().to_string(),
            ),
            (
                "PINENTRY_PROGRAM".into(),
                test_binary("scripted-pinentry")?.display().to_string(),
            ),
            (
                "SCRIPTED_PINENTRY_SCRIPT".into(),
                self.dir
                    .path()
                    .join("pinentry-script")
                    .display()
                    .to_string(),
            ),
            (
                "SCRIPTED_PINENTRY_LOG".into(),
                self.dir.path().join("pinentry.log").display().to_string(),
            ),
            // pinentry needs a graphical session; the scripted one draws nothing.
            ("DISPLAY".into(), ":0".into()),
        ])
    }

    /// Runs `token-agent fido ARGS` with this simulator plugged in.
    pub(crate) fn fido(&self, args: &[&str], agent: Option<&SimAgent>) -> anyhow::Result<Output> {
        let mut command = Command::new(sim_agent_binary()?);
        command.arg("fido").args(args);
        command
            .arg("--config")
            .arg(self.dir.path().join("empty.toml"));
        std::fs::write(self.dir.path().join("empty.toml"), "")?;
        command.envs(self.env()?).env_remove("SSH_AUTH_SOCK");
        if let Some(agent) = agent {
            command.env("SSH_AUTH_SOCK", &agent.socket);
        }
        Ok(command.stdin(Stdio::null()).output()?)
    }

    /// OpenSSH's own `ssh-keygen -t KIND -w libfido_sim_middleware.so -O OPTION...`,
    /// making DIR/NAME and DIR/NAME.pub on this simulator; a PIN, if ssh-keygen
    /// asks for one, comes from an askpass program that answers `pin`.
    pub(crate) fn ssh_keygen(
        &self,
        kind: &str,
        name: &str,
        options: &[&str],
        pin: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        let file = self.dir.path().join(name);
        let mut command = self.openssh("ssh-keygen", pin)?;
        command
            .args(["-q", "-t", kind, "-N", "", "-C", name, "-w"])
            .arg(middleware_library()?)
            .arg("-f")
            .arg(&file);
        for option in options {
            command.args(["-O", option]);
        }
        check(command.output()?, &format!("ssh-keygen -t {kind}"))?;
        Ok(file)
    }

    /// An OpenSSH tool that reaches this simulator through the middleware
    /// (its ssh-sk-helper inherits TOKEN_AGENT_FIDO_SIM), answering a PIN
    /// question with `pin` through SSH_ASKPASS.
    pub(crate) fn openssh(&self, program: &str, pin: Option<&str>) -> anyhow::Result<Command> {
        let mut command = Command::new(program);
        command
            .env(fido_sim::middleware::STATE_ENV, self.state())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("SSH_SK_PROVIDER")
            .env_remove("DISPLAY")
            .stdin(Stdio::null());
        match pin {
            Some(pin) => {
                let askpass = self.dir.path().join(format!("askpass-{}", pin.len()));
                write_script(&askpass, &format!("echo '{pin}'"))?;
                command
                    .env("SSH_ASKPASS", askpass)
                    .env("SSH_ASKPASS_REQUIRE", "force");
            }
            None => {
                command
                    .env_remove("SSH_ASKPASS")
                    .env("SSH_ASKPASS_REQUIRE", "never");
            }
        }
        Ok(command)
    }

    /// The simulator's PIN retries now.
    pub(crate) fn pin_retries(&self) -> anyhow::Result<u32> {
        use token_agent_fido::Authenticator as _;
        Ok(fido_sim::Simulator::open("token", &self.state())?.pin_retries()?)
    }

    /// `token-agent fido enroll ARGS -f DIR/NAME`: the private key file's path.
    pub(crate) fn enroll(&self, name: &str, args: &[&str]) -> anyhow::Result<PathBuf> {
        let file = self.dir.path().join(name);
        let mut all = vec!["enroll", "-C", name, "-f"];
        let file_arg = file.display().to_string();
        all.push(&file_arg);
        all.extend_from_slice(args);
        let output = self.fido(&all, None)?;
        if !output.status.success() {
            bail!(
                "fido enroll failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(file)
    }
}

/// The fido-sim build of token-agent, serving in the foreground.
#[derive(Debug)]
pub(crate) struct SimAgent {
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    _dir: TempDir,
}

impl SimAgent {
    /// Starts the agent with `token` plugged in, `config` as its configuration
    /// and `args` as extra flags.
    pub(crate) fn start(token: &Token, config: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(token, config, args, &[])
    }

    /// As [`SimAgent::start`], with `env` added to the agent's environment
    /// (which its middleware helpers inherit).
    pub(crate) fn start_with_env(
        token: &Token,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fido-agent").tempdir()?;
        let socket = dir.path().join("agent.sock");
        let control = dir.path().join("control.sock");
        let log = dir.path().join("agent.log");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        let child = Command::new(sim_agent_binary()?)
            .arg("-d")
            .arg("-a")
            .arg(&socket)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .envs(token.env()?)
            .env("TOKEN_AGENT_FIDO_SIM_CONTROL", &control)
            .env("TOKEN_AGENT_FIDO_SIM_TOUCH_TIMEOUT_MS", "1500")
            .env("TOKEN_AGENT_LOG", "debug")
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("SSH_ASKPASS")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start token-agent-fido-sim")?;
        let agent = Self {
            socket,
            control,
            log,
            child: Some(child),
            _dir: dir,
        };
        if !wait_for(Duration::from_secs(20), || {
            UnixStream::connect(&agent.socket).is_ok()
        }) {
            bail!("the agent did not start:\n{}", agent.log_text());
        }
        Ok(agent)
    }

    /// The agent's socket.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the agent process still runs.
    pub(crate) fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// A command with SSH_AUTH_SOCK pointing at this agent.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("SSH_AUTH_SOCK", &self.socket)
            .env_remove("SSH_AGENT_PID")
            .env_remove("DISPLAY")
            .env_remove("SSH_ASKPASS")
            .stdin(Stdio::null());
        command
    }

    /// Runs `ssh-add ARGS`.
    pub(crate) fn ssh_add(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.command("ssh-add").args(args).output()?)
    }

    /// `ssh-add -S library file`: adds the sk key `file` to sign through
    /// the middleware `library`.
    pub(crate) fn add_with_middleware(&self, library: &Path, file: &Path) -> anyhow::Result<()> {
        let mut add = self.command("ssh-add");
        add.arg("-S").arg(library).arg(file);
        check(add.output()?, "ssh-add -S")?;
        Ok(())
    }

    /// Sends one command to the simulated key's control socket.
    pub(crate) fn control(&self, command: &str) -> anyhow::Result<String> {
        let mut stream = UnixStream::connect(&self.control)?;
        writeln!(stream, "{command}")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }

    /// Everything the agent logged.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Logs in to `sshd` through this agent and runs `echo logged-in`.
    pub(crate) fn login(&self, sshd: &Sshd) -> anyhow::Result<Output> {
        login_through(&self.socket, sshd)
    }
}

/// Logs in to `sshd` through the agent at `socket` and runs `echo logged-in`.
pub(crate) fn login_through(socket: &Path, sshd: &Sshd) -> anyhow::Result<Output> {
    let known_hosts = sshd.known_hosts()?;
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
        .context("no passwd entry")?
        .name;
    Ok(Command::new("ssh")
        .env("SSH_AUTH_SOCK", socket)
        .env_remove("SSH_AGENT_PID")
        .env_remove("DISPLAY")
        .env_remove("SSH_ASKPASS")
        .stdin(Stdio::null())
        .args(["-F", "none", "-p"])
        .arg(sshd.port().to_string())
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "PasswordAuthentication=no", "-o", "IdentityFile=none"])
        .args(["-o", "ConnectTimeout=10", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-o")
        .arg(format!("IdentityAgent={}", socket.display()))
        .arg(format!("{user}@127.0.0.1"))
        .arg("echo logged-in")
        .output()?)
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let stopped = wait_for(Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
