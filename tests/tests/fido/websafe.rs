//! -O no-restrict-websafe and -O websafe-allow (issue 13): sk keys whose
//! application is not allowlisted (`ssh:*` by default) sign only SSH logins
//! and ssh-keygen signatures, side by side with OpenSSH 10.5's ssh-agent
//! signing through fido-sim's middleware.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use ssh_key::{LineEnding, PrivateKey};
use token_agent_e2e::openssh::{OpenSsh, Sshd};
use token_agent_e2e::wire::{RawClient, FAILURE, SIGN_RESPONSE};
use token_agent_e2e::{bench, check, stderr, wait_for};
use token_agent_fido::ctap::{CoseAlgorithm, MakeCredential, User};
use token_agent_fido::{Authenticator as _, SkKey};

use crate::support::{allowing, login_through, middleware_library, SimAgent, Token};

/// What a browser has an authenticator sign: a client data hash, not SSH data.
const WEB_CHALLENGE: &[u8] = &[0x9c; 32];

/// A website's relying party id, as a web-origin sk key's application.
const WEB_APPLICATION: &str = "example.org";

/// Makes an sk key for `application` on `token`'s simulator and writes
/// DIR/NAME and DIR/NAME.pub. `token-agent fido enroll` and ssh-keygen only
/// make "ssh:" keys, so this asks the simulator directly, as a browser would.
fn web_key(token: &Token, name: &str, application: &str) -> anyhow::Result<PathBuf> {
    let sim = fido_sim::Simulator::open("token", &token.state())?;
    let credential = sim.make_credential(&MakeCredential {
        rp_id: application.to_owned(),
        challenge: vec![0; 32],
        user: User {
            id: vec![0; 32],
            name: "openssh".into(),
        },
        algorithm: CoseAlgorithm::EdDsa,
        resident: false,
        cred_protect: None,
        pin: None,
    })?;
    // Flags 0x01: user presence required, as ssh-keygen's default.
    let key = SkKey::from_credential(&credential.public_key, application, 0x01, credential.id)?;
    let file = token.dir().join(name);
    let private = PrivateKey::new(key.to_keypair()?, name)?;
    private.write_openssh_file(&file, LineEnding::LF)?;
    std::fs::write(
        public_path(&file),
        format!("{}\n", private.public_key().to_openssh()?),
    )?;
    Ok(file)
}

fn public_path(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(".pub");
    PathBuf::from(path)
}

/// The agents compared: token-agent with fido-sim attached, and OpenSSH
/// 10.5's ssh-agent with fido-sim's middleware.
enum Agent {
    Ours(SimAgent),
    OpenSsh {
        child: Option<Child>,
        socket: PathBuf,
        log: PathBuf,
        _dir: tempfile::TempDir,
    },
}

impl Agent {
    fn ours(token: &Token, args: &[&str]) -> anyhow::Result<Self> {
        Ok(Self::Ours(SimAgent::start(token, "", args)?))
    }

    fn openssh(token: &Token, args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("websafe-openssh")
            .tempdir()?;
        let socket = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        let child = Command::new(OpenSsh::v10()?.tool("ssh-agent"))
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .arg("-P")
            .arg(allowing(&middleware_library()?)?)
            .args(args)
            .env(fido_sim::middleware::STATE_ENV, token.state())
            .env("HOME", dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("SSH_ASKPASS")
            .env_remove("DISPLAY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start OpenSSH 10.5's ssh-agent")?;
        let agent = Self::OpenSsh {
            child: Some(child),
            socket,
            log,
            _dir: dir,
        };
        if !wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(agent.socket()).is_ok()
        }) {
            bail!("ssh-agent did not start:\n{}", agent.log_text());
        }
        Ok(agent)
    }

    fn both(token: &Token, args: &[&str]) -> anyhow::Result<[Self; 2]> {
        Ok([Self::ours(token, args)?, Self::openssh(token, args)?])
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Ours(_) => "token-agent",
            Self::OpenSsh { .. } => "OpenSSH 10.5",
        }
    }

    fn socket(&self) -> &Path {
        match self {
            Self::Ours(agent) => agent.socket(),
            Self::OpenSsh { socket, .. } => socket,
        }
    }

    fn log_text(&self) -> String {
        match self {
            Self::Ours(agent) => agent.log_text(),
            Self::OpenSsh { log, .. } => std::fs::read_to_string(log).unwrap_or_default(),
        }
    }

    /// Adds the sk key `file`: token-agent signs it itself (Debian's
    /// ssh-add, built with libfido2, sends "internal"), OpenSSH 10.5 through
    /// the middleware (its `ssh-add -S`; the 10.5 build has no libfido2).
    fn add(&self, file: &Path) -> anyhow::Result<()> {
        let mut add = match self {
            Self::Ours(_) => Command::new("ssh-add"),
            Self::OpenSsh { .. } => {
                let mut add = Command::new(OpenSsh::v10()?.tool("ssh-add"));
                add.arg("-S").arg(middleware_library()?);
                add
            }
        };
        add.arg(file)
            .env("SSH_AUTH_SOCK", self.socket())
            .env_remove("SSH_SK_PROVIDER")
            .env_remove("SSH_ASKPASS")
            .env_remove("DISPLAY")
            .stdin(Stdio::null());
        check(add.output()?, &format!("ssh-add to {}", self.name()))?;
        Ok(())
    }

    /// Asks the agent to sign `data` with the key of `file`: the reply's type.
    fn sign_raw(&self, file: &Path, data: &[u8]) -> anyhow::Result<u8> {
        let public = ssh_key::PublicKey::read_openssh_file(&public_path(file))?;
        let blob = public.to_bytes()?;
        let mut client = RawClient::connect(self.socket())?;
        let reply = client
            .request(&bench::sign_request(&blob, data, 0))?
            .context("the agent closed the connection")?;
        reply.first().copied().context("an empty reply")
    }

    /// `ssh-keygen -Y sign` (OpenSSH 10.5's) with the key of `file` through the agent.
    fn sign_file(&self, file: &Path) -> anyhow::Result<()> {
        let message = file.with_extension("message");
        std::fs::write(&message, "signed through the agent\n")?;
        let mut keygen = Command::new(OpenSsh::v10()?.tool("ssh-keygen"));
        keygen
            .env("SSH_AUTH_SOCK", self.socket())
            .env_remove("SSH_SK_PROVIDER")
            .stdin(Stdio::null());
        let output = token_agent_e2e::sign_file(keygen, public_path(file), &message).output()?;
        check(
            output,
            &format!("ssh-keygen -Y sign through {}", self.name()),
        )?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Self::OpenSsh { child, .. } = self {
            if let Some(mut child) = child.take() {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                if !wait_for(Duration::from_secs(5), || {
                    matches!(child.try_wait(), Ok(Some(_)))
                }) {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }
    }
}

#[test]
fn issue_13_web_origin_sk_keys_sign_only_ssh_data_by_default() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let web = web_key(&token, "id_web", WEB_APPLICATION)?;
    let ssh = token.enroll("id_ssh", &[])?;
    for agent in Agent::both(&token, &[])? {
        let name = agent.name();
        agent.add(&web)?;
        agent.add(&ssh)?;
        assert_eq!(
            agent.sign_raw(&web, WEB_CHALLENGE)?,
            FAILURE,
            "{name} signed a web challenge with an {WEB_APPLICATION} key"
        );
        // An ssh: key matches the default allowlist ssh:*: it signs anything.
        assert_eq!(
            agent.sign_raw(&ssh, WEB_CHALLENGE)?,
            SIGN_RESPONSE,
            "{name}:\n{}",
            agent.log_text()
        );
        // SSH's own data is fine for either key.
        agent.sign_file(&web)?;
        agent.sign_file(&ssh)?;
        if let Agent::Ours(_) = agent {
            let log = agent.log_text();
            assert!(
                log.contains("looks like a web authentication request")
                    && log.contains("-O no-restrict-websafe")
                    && log.contains(WEB_APPLICATION),
                "{log}"
            );
        }
    }
    Ok(())
}

#[test]
fn issue_13_no_restrict_websafe_lets_web_origin_keys_sign_anything() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let web = web_key(&token, "id_web", WEB_APPLICATION)?;
    for agent in Agent::both(&token, &["-O", "no-restrict-websafe"])? {
        agent.add(&web)?;
        assert_eq!(
            agent.sign_raw(&web, WEB_CHALLENGE)?,
            SIGN_RESPONSE,
            "{}:\n{}",
            agent.name(),
            agent.log_text()
        );
    }
    Ok(())
}

#[test]
fn issue_13_websafe_allow_replaces_the_allowlist() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let web = web_key(&token, "id_web", WEB_APPLICATION)?;
    let ssh = token.enroll("id_ssh", &[])?;
    let allow = format!("websafe-allow={WEB_APPLICATION}");
    for agent in Agent::both(&token, &["-O", &allow])? {
        let name = agent.name();
        agent.add(&web)?;
        agent.add(&ssh)?;
        assert_eq!(
            agent.sign_raw(&web, WEB_CHALLENGE)?,
            SIGN_RESPONSE,
            "{name}"
        );
        // The list replaces ssh:*, so now the ssh: key is the restricted one.
        assert_eq!(agent.sign_raw(&ssh, WEB_CHALLENGE)?, FAILURE, "{name}");
        agent.sign_file(&ssh)?;
    }
    Ok(())
}

#[test]
fn issue_13_websafe_allow_given_twice_is_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let programs = [
        token_agent_e2e::agent_binary()?,
        OpenSsh::v10()?.tool("ssh-agent"),
    ];
    for program in programs {
        let output = Command::new(&program)
            .args(["-D", "-a"])
            .arg(dir.path().join("never.sock"))
            .args([
                "-O",
                "websafe-allow=ssh:*",
                "-O",
                "websafe-allow=example.org",
            ])
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .output()?;
        ensure!(!output.status.success(), "{} started", program.display());
        ensure!(
            stderr(&output).contains("websafe-allow already set"),
            "{}: {}",
            program.display(),
            stderr(&output)
        );
        ensure!(!dir.path().join("never.sock").exists());
    }
    Ok(())
}

#[test]
fn issue_13_web_origin_keys_still_log_in_to_sshd() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let web = web_key(&token, "id_web", WEB_APPLICATION)?;
    let public = std::fs::read_to_string(public_path(&web))?;
    let sshd = Sshd::start(&public, None)?;
    for agent in Agent::both(&token, &[])? {
        agent.add(&web)?;
        let login = login_through(agent.socket(), &sshd)?;
        sshd.ensure_logged_in(&login, &agent.log_text())?;
    }
    Ok(())
}
