//! GnuPG's gpg-agent with SSH support, for tests: in its own GNUPGHOME.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::{check, stdout, wait_for};

/// A gpg-agent with SSH support in its own GNUPGHOME, stopped on drop.
#[derive(Debug)]
pub struct GpgAgent {
    home: PathBuf,
    /// Its SSH socket.
    pub socket: PathBuf,
}

impl GpgAgent {
    /// Starts gpg-agent --daemon --enable-ssh-support with `home` as GNUPGHOME.
    pub fn start(home: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(home)?;
        std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        // The daemon it forks keeps its standard streams: no pipes, or
        // waiting for their end would wait for the daemon.
        let log = home.with_extension("log");
        let status = Command::new("gpg-agent")
            .arg("--homedir")
            .arg(home)
            .args(["--daemon", "--enable-ssh-support"])
            .env("GNUPGHOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()
            .context("cannot run gpg-agent (install gpg-agent)")?;
        ensure!(
            status.success(),
            "gpg-agent --daemon failed ({status}): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let listed = check(
            Command::new("gpgconf")
                .args(["--list-dirs", "agent-ssh-socket"])
                .env("GNUPGHOME", home)
                .output()?,
            "gpgconf --list-dirs",
        )?;
        let socket = PathBuf::from(stdout(&listed).trim());
        let agent = Self {
            home: home.to_owned(),
            socket,
        };
        ensure!(
            wait_for(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&agent.socket).is_ok()
            }),
            "gpg-agent's ssh socket {} does not answer",
            agent.socket.display()
        );
        Ok(agent)
    }

    /// Makes an Ed25519 OpenPGP key without a passphrase and puts its
    /// keygrip in sshcontrol, so gpg-agent offers it over SSH. Returns its
    /// SSH public key line.
    pub fn add_ssh_key(&self, name: &str) -> anyhow::Result<String> {
        let uid = format!("{name} <{name}@example.test>");
        check(
            self.gpg()
                .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                .args(["--quick-gen-key", &uid, "ed25519", "auth", "never"])
                .output()?,
            "gpg --quick-gen-key",
        )?;
        let listed = check(
            self.gpg()
                .args(["--batch", "--with-colons", "--with-keygrip", "-K", &uid])
                .output()?,
            "gpg -K",
        )?;
        let keygrip = stdout(&listed)
            .lines()
            .find_map(|line| line.strip_prefix("grp:"))
            .map(|rest| rest.trim_matches(':').to_owned())
            .context("gpg -K shows no keygrip")?;
        let mut control = std::fs::read_to_string(self.home.join("sshcontrol")).unwrap_or_default();
        control.push_str(&format!("{keygrip}\n"));
        std::fs::write(self.home.join("sshcontrol"), control)?;
        let exported = check(
            self.gpg()
                .args(["--batch", "--export-ssh-key", &uid])
                .output()?,
            "gpg --export-ssh-key",
        )?;
        Ok(stdout(&exported).trim().to_owned())
    }

    fn gpg(&self) -> Command {
        let mut command = Command::new("gpg");
        command
            .arg("--homedir")
            .arg(&self.home)
            .env("GNUPGHOME", &self.home)
            .stdin(Stdio::null());
        command
    }
}

impl Drop for GpgAgent {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .args(["--kill", "gpg-agent"])
            .env("GNUPGHOME", &self.home)
            .output();
    }
}
