//! A private sshd on 127.0.0.1 at a free port, and logins through an agent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::agent::{keygen, Agent};
use crate::{free_port, wait_for};

/// One OpenSSH installation whose tools a test runs: Debian's (9.2 on
/// bookworm, in PATH and /usr/sbin) or OpenSSH 10.5 built by
/// `shared/vendor/build-openssh.sh` into `target/openssh-10.5` (the folder
/// `TOKEN_AGENT_OPENSSH10` names, when set). `./scripts/test` builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSsh {
    /// The build's folder; `None` for the system's tools.
    root: Option<PathBuf>,
}

impl OpenSsh {
    /// The system's OpenSSH.
    pub fn system() -> Self {
        Self { root: None }
    }

    /// OpenSSH 10.5. Fails, saying how to build it, when it is not built:
    /// tests that need it run, they never skip.
    pub fn v10() -> anyhow::Result<Self> {
        let root = match std::env::var_os("TOKEN_AGENT_OPENSSH10") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/openssh-10.5"),
        };
        if !root.join("bin/ssh-add").is_file() {
            bail!(
                "OpenSSH 10.5 is not built at {}: run ../shared/vendor/build-openssh.sh \
                 target/openssh-10.5 from the workspace (./scripts/test does), or point \
                 TOKEN_AGENT_OPENSSH10 at a build",
                root.display()
            );
        }
        Ok(Self { root: Some(root) })
    }

    /// Both: every end-to-end check that names a version runs against each.
    pub fn both() -> anyhow::Result<[Self; 2]> {
        Ok([Self::system(), Self::v10()?])
    }

    /// A client tool: `ssh`, `ssh-add`, `ssh-keygen`, `ssh-agent`, `ssh-keyscan`.
    pub fn tool(&self, name: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join("bin").join(name),
            None => PathBuf::from(name),
        }
    }

    /// The sshd binary.
    pub fn sshd(&self) -> PathBuf {
        match &self.root {
            Some(root) => root.join("bin/sshd"),
            None => PathBuf::from("/usr/sbin/sshd"),
        }
    }

    /// OpenSSH's own sk-dummy.so middleware (built with 10.5 only).
    pub fn sk_dummy(&self) -> Option<PathBuf> {
        self.root
            .as_ref()
            .map(|root| root.join("lib/sk-dummy.so"))
            .filter(|path| path.is_file())
    }

    /// "9.2" or "10.5": for messages.
    pub fn name(&self) -> String {
        let output = Command::new(self.tool("ssh")).arg("-V").output();
        let text = output
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        text.split_whitespace()
            .next()
            .unwrap_or("OpenSSH")
            .trim_end_matches(',')
            .to_owned()
    }
}

/// An sshd with its own host key and configuration.
#[derive(Debug)]
pub struct Sshd {
    dir: TempDir,
    port: u16,
    child: Child,
    host_public: String,
}

impl Sshd {
    /// Starts sshd accepting keys in `authorized_keys` and, when given,
    /// certificates signed by `user_ca` (TrustedUserCAKeys).
    pub fn start(authorized_keys: &str, user_ca: Option<&Path>) -> anyhow::Result<Self> {
        Self::start_with(&OpenSsh::system(), authorized_keys, user_ca, "")
    }

    /// [`Sshd::start`] with the sshd of `openssh` and `extra` lines of configuration.
    pub fn start_with(
        openssh: &OpenSsh,
        authorized_keys: &str,
        user_ca: Option<&Path>,
        extra: &str,
    ) -> anyhow::Result<Self> {
        // sshd insists on its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").context("cannot create /run/sshd (run as root)")?;
        let dir = tempfile::Builder::new().prefix("sshd-test").tempdir()?;
        let host_key = dir.path().join("host_ed25519");
        keygen(&host_key, "ed25519", "test host")?;
        let host_public = std::fs::read_to_string(host_key.with_extension("pub"))?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, authorized_keys)?;
        let log = dir.path().join("sshd.log");
        let mut last_error = String::new();
        // Another test may take the port between choosing and binding: retry.
        for _ in 0..5 {
            let port = free_port()?;
            let config = dir.path().join("sshd_config");
            // sshd takes the first value of an option: `extra` goes first.
            let mut text = extra.to_owned();
            text += &format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {pid}\n\
                 AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
                 LogLevel DEBUG1\nPubkeyAcceptedAlgorithms +ssh-rsa\n",
                host = host_key.display(),
                pid = dir.path().join("sshd.pid").display(),
                authorized = authorized.display(),
            );
            if let Some(ca) = user_ca {
                text.push_str(&format!("TrustedUserCAKeys {}\n", ca.display()));
            }
            std::fs::write(&config, text)?;
            let mut child = Command::new(openssh.sshd())
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| {
                    format!(
                        "cannot start {} (install openssh-server)",
                        openssh.sshd().display()
                    )
                })?;
            let up = wait_for(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    || matches!(child.try_wait(), Ok(Some(_)))
            });
            if up && matches!(child.try_wait(), Ok(None)) {
                return Ok(Self {
                    dir,
                    port,
                    child,
                    host_public,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
            last_error = std::fs::read_to_string(&log).unwrap_or_default();
        }
        bail!("sshd did not start:\n{last_error}")
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host public key line ("ssh-ed25519 AAAA... test host").
    pub fn host_public(&self) -> &str {
        self.host_public.trim()
    }

    /// A known_hosts file naming this server as `[127.0.0.1]:PORT`.
    pub fn known_hosts(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("known_hosts");
        std::fs::write(
            &path,
            format!("[127.0.0.1]:{} {}\n", self.port, self.host_public()),
        )?;
        Ok(path)
    }

    /// What sshd logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Fails unless `login` (an ssh run of `echo logged-in` on this
    /// server) got in, saying what ssh, sshd and the agent (`agent_log`) said.
    pub fn ensure_logged_in(&self, login: &Output, agent_log: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            crate::stdout(login).contains("logged-in"),
            "the login failed\nssh: {}\nsshd: {}\nagent: {agent_log}",
            crate::stderr(login),
            self.log_text()
        );
        Ok(())
    }

    /// Logs in as the current user through `agent` and runs `echo logged-in`.
    pub fn login(&self, agent: &Agent) -> anyhow::Result<Output> {
        self.login_with(&OpenSsh::system(), agent, &[])
    }

    /// [`Sshd::login`] with the ssh of `openssh` and `options` (`-o` pairs,
    /// which win over the defaults: ssh takes an option's first value).
    pub fn login_with(
        &self,
        openssh: &OpenSsh,
        agent: &Agent,
        options: &[&str],
    ) -> anyhow::Result<Output> {
        self.run_with(openssh, agent, options, "echo logged-in")
    }

    /// Logs in to `self` with the agent forwarded (`ssh -A`) and, from there,
    /// through the forwarded agent to `target`: two hops on loopback. The
    /// output says "logged-in" when the second login got in.
    pub fn login_forwarded_to(&self, target: &Sshd, agent: &Agent) -> anyhow::Result<Output> {
        let known_hosts = target.known_hosts()?;
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
            .context("no passwd entry for the current user")?
            .name;
        let inner = format!(
            "ssh -F none -p {port} -o BatchMode=yes -o StrictHostKeyChecking=yes \
             -o PasswordAuthentication=no -o IdentityFile=none -o ConnectTimeout=10 \
             -o UserKnownHostsFile={known} {user}@127.0.0.1 echo logged-in",
            port = target.port,
            known = known_hosts.display(),
        );
        self.run_with(&OpenSsh::system(), agent, &["-A"], &inner)
    }

    /// Runs `command` on this server through `agent` with the ssh of `openssh`
    /// and `options` (which win over the defaults: ssh takes an option's first value).
    pub fn run_with(
        &self,
        openssh: &OpenSsh,
        agent: &Agent,
        options: &[&str],
        command: &str,
    ) -> anyhow::Result<Output> {
        let known_hosts = self.known_hosts()?;
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
            .context("no passwd entry for the current user")?
            .name;
        let output = agent
            .command(openssh.tool("ssh"))
            .args(["-F", "none"])
            .args(options)
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "IdentityFile=none",
                "-o",
                "ConnectTimeout=10",
                "-o",
            ])
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-o")
            .arg(format!("IdentityAgent={}", agent.socket().display()))
            .arg(format!("{user}@127.0.0.1"))
            .arg(command)
            .output()?;
        Ok(output)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two servers that accept the key `key`: `ssh-add -H FILE -h allowed.test KEY`
/// on `agent` (FILE, written in `dir`, names them allowed.test and
/// other.test) restricts it to the first. Check with [`ensure_only_allowed`].
pub fn restrict_to_one_of_two(
    agent: &Agent,
    key: &Path,
    dir: &Path,
) -> anyhow::Result<(Sshd, Sshd)> {
    let authorized = std::fs::read_to_string(key.with_extension("pub"))?;
    let allowed = Sshd::start(&authorized, None)?;
    let other = Sshd::start(&authorized, None)?;
    // ssh-add -h finds the host's key by name in a known_hosts file.
    let hosts = dir.join("restrict_hosts");
    std::fs::write(
        &hosts,
        format!(
            "allowed.test {}\nother.test {}\n",
            allowed.host_public(),
            other.host_public()
        ),
    )?;
    crate::check(
        agent.ssh_add([
            "-H".as_ref(),
            hosts.as_os_str(),
            "-h".as_ref(),
            "allowed.test".as_ref(),
            key.as_os_str(),
        ])?,
        "ssh-add -h",
    )?;
    Ok((allowed, other))
}

/// Fails unless a login through `agent` gets in to `allowed` and not to `other`.
pub fn ensure_only_allowed(allowed: &Sshd, other: &Sshd, agent: &Agent) -> anyhow::Result<()> {
    let login = allowed.login(agent)?;
    allowed.ensure_logged_in(&login, &agent.log_text())?;
    let login = other.login(agent)?;
    anyhow::ensure!(
        !crate::stdout(&login).contains("logged-in"),
        "the restricted key logged in to another host"
    );
    Ok(())
}
