//! `token-agent doctor`: every check fires against a real broken setup and
//! stays quiet against a sound one. Each test has its own HOME, TMPDIR,
//! XDG_RUNTIME_DIR, GNUPGHOME, pcscd socket and udev folder, so they run in
//! parallel and never look at the machine's own agents.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Context;
use serde_json::Value;
use tempfile::TempDir;
use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::gpg::GpgAgent;
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::pcsc::PcscRig;
use token_agent_e2e::{agent_binary, check, stderr, stdout, write_script};

/// A made-up user environment in a temporary folder.
struct Setup {
    dir: TempDir,
}

impl Setup {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("doctor").tempdir()?;
        for sub in ["home", "tmp", "run", "gnupg", "udev", "config"] {
            let path = dir.path().join(sub);
            std::fs::create_dir(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        }
        // Whatever pinentry this machine has, doctor sees this one.
        write_script(&dir.path().join("pinentry-test"), "exit 0")?;
        Ok(Self { dir })
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    fn home(&self) -> PathBuf {
        self.path("home")
    }

    /// ~/.ssh, made 0700.
    fn ssh_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.home().join(".ssh");
        std::fs::create_dir_all(&dir)?;
        chmod(&dir, 0o700)?;
        Ok(dir)
    }

    /// `token-agent doctor` in this environment, with no agent.
    fn doctor(&self) -> anyhow::Result<Command> {
        let mut command = Command::new(agent_binary()?);
        command
            .arg("doctor")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home())
            .env("TMPDIR", self.path("tmp"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("GNUPGHOME", self.path("gnupg"))
            .env("PCSCLITE_CSOCK_NAME", self.path("run/pcscd.comm"))
            .env("TOKEN_AGENT_UDEV_RULES_DIRS", self.path("udev"))
            .env("PINENTRY_PROGRAM", self.path("pinentry-test"));
        Ok(command)
    }

    /// `doctor --json` with `SSH_AUTH_SOCK` at `socket`, plus `args`.
    fn report(&self, socket: Option<&Path>, args: &[&str]) -> anyhow::Result<Report> {
        let mut command = self.doctor()?;
        if let Some(socket) = socket {
            command.env("SSH_AUTH_SOCK", socket);
        }
        Report::of(command.arg("--json").args(args).output()?)
    }

    /// An ssh_config file for `--host` tests.
    fn ssh_config(&self, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.path("ssh_config");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// What `doctor --json` printed, and its exit code.
#[derive(Debug)]
struct Report {
    findings: Vec<Value>,
    code: Option<i32>,
    text: String,
}

impl Report {
    fn of(output: Output) -> anyhow::Result<Self> {
        let text = stdout(&output);
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("doctor printed no JSON:\n{text}\n{}", stderr(&output)))?;
        let findings = json["findings"].as_array().cloned().unwrap_or_default();
        Ok(Self {
            findings,
            code: output.status.code(),
            text,
        })
    }

    /// The findings with `code`.
    fn all(&self, code: &str) -> Vec<&Value> {
        self.findings.iter().filter(|f| f["code"] == code).collect()
    }

    /// The one finding with `code`; fails showing the whole report otherwise.
    fn get(&self, code: &str) -> &Value {
        let all = self.all(code);
        assert_eq!(
            all.len(),
            1,
            "expected one {code} finding in:\n{}",
            self.text
        );
        all[0]
    }

    fn has(&self, code: &str) -> bool {
        !self.all(code).is_empty()
    }

    fn message(&self, code: &str) -> String {
        self.get(code)["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn fix(&self, code: &str) -> String {
        self.get(code)["fix"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn severity(&self, code: &str) -> String {
        self.get(code)["severity"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    Ok(std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(mode),
    )?)
}

/// A key pair made with `ssh-keygen -N PASSPHRASE` and extra flags.
fn keygen_with(path: &Path, passphrase: &str, extra: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ssh-keygen")
        .args(["-q", "-N", passphrase, "-C", "doctor test", "-f"])
        .arg(path)
        .args(extra)
        .output()?;
    check(output, "ssh-keygen")?;
    Ok(())
}

/// token-agent with `keys` (paths) added through ssh-add.
fn token_agent_with(keys: &[PathBuf]) -> anyhow::Result<Agent> {
    let agent = Agent::start(AgentOptions::default())?;
    for key in keys {
        check(agent.ssh_add([key])?, "ssh-add")?;
    }
    Ok(agent)
}

#[test]
fn an_empty_home_has_no_agent_and_nothing_else_to_fix() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let report = setup.report(None, &[])?;
    assert_eq!(report.code, Some(1), "{}", report.text);
    assert_eq!(report.severity("auth-sock-unset"), "problem");
    assert_eq!(report.fix("auth-sock-unset"), "eval \"$(token-agent -s)\"");
    for quiet in ["agents-alone", "no-ssh-dir", "no-passphrases", "gpg-no-ssh"] {
        assert_eq!(report.severity(quiet), "ok", "{quiet}");
    }

    // The same for people: one line per finding, then the tally.
    let output = setup.doctor()?.output()?;
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.lines().any(|line| line.starts_with("problem agent")
            && line.contains("SSH_AUTH_SOCK is not set")
            && line.ends_with("Fix: eval \"$(token-agent -s)\"")),
        "{text}"
    );
    // The warnings: pinentry without a display, pcscd, two udev rules.
    assert!(text.ends_with("1 problem, 4 warnings.\n"), "{text}");
    Ok(())
}

#[test]
fn a_sound_setup_exits_0() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let ssh = setup.ssh_dir()?;
    keygen(&ssh.join("id_ed25519"), "ed25519", "me")?;
    let pinentry = setup.path("my-pinentry");
    write_script(&pinentry, "exit 0")?;
    let agent = Agent::start(AgentOptions {
        env: vec![
            ("PINENTRY_PROGRAM".into(), pinentry.display().to_string()),
            ("DISPLAY".into(), ":99".into()),
        ],
        ..AgentOptions::default()
    })?;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../udev/70-token-agent.rules"),
        setup.path("udev/70-token-agent.rules"),
    )?;
    let pcscd = PcscRig::start()?;
    let output = setup
        .doctor()?
        .env("SSH_AUTH_SOCK", agent.socket())
        .env("PCSCLITE_CSOCK_NAME", pcscd.socket())
        .output()?;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.ends_with("Nothing wrong found.\n"), "{text}");
    assert!(
        text.lines().all(|line| line.starts_with("ok ")
            || line.starts_with("info ")
            || line == "Nothing wrong found."),
        "{text}"
    );
    assert!(text.contains("pcscd is running"), "{text}");
    Ok(())
}

#[test]
fn bad_permissions_get_the_chmod_that_fixes_them() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let ssh = setup.ssh_dir()?;
    let key = ssh.join("id_ed25519");
    keygen(&key, "ed25519", "me")?;
    std::fs::write(ssh.join("config"), "Host *\n")?;
    std::fs::write(ssh.join("authorized_keys"), "")?;
    chmod(&ssh.join("authorized_keys"), 0o600)?;
    chmod(&ssh.join("config"), 0o600)?;

    let sound = setup.report(None, &[])?;
    assert_eq!(sound.severity("permissions-ok"), "ok", "{}", sound.text);

    chmod(&key, 0o644)?;
    chmod(&ssh.join("config"), 0o666)?;
    chmod(&ssh, 0o777)?;
    let report = setup.report(None, &[])?;
    let unprotected = report.get("unprotected-private-key");
    assert_eq!(unprotected["severity"], "problem");
    assert!(report
        .message("unprotected-private-key")
        .contains("~/.ssh/id_ed25519"));
    assert!(report
        .message("unprotected-private-key")
        .contains("UNPROTECTED PRIVATE KEY FILE"));
    assert_eq!(
        report.fix("unprotected-private-key"),
        "chmod 600 ~/.ssh/id_ed25519"
    );
    assert_eq!(report.fix("config-permissions"), "chmod 600 ~/.ssh/config");
    assert_eq!(report.fix("strict-modes"), "chmod 700 ~/.ssh");
    assert!(!report.has("permissions-ok"));

    // The fixes it printed, run as printed, make it quiet again.
    for code in [
        "unprotected-private-key",
        "config-permissions",
        "strict-modes",
    ] {
        let fix = report.fix(code);
        check(
            Command::new("sh")
                .arg("-c")
                .arg(&fix)
                .env("HOME", setup.home())
                .output()?,
            &fix,
        )?;
    }
    let fixed = setup.report(None, &[])?;
    assert!(fixed.has("permissions-ok"), "{}", fixed.text);
    Ok(())
}

#[test]
fn passphrase_protected_keys_are_reported_and_plain_ones_are_not() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let ssh = setup.ssh_dir()?;
    keygen_with(&ssh.join("id_openssh"), "secret", &["-t", "ed25519"])?;
    keygen_with(
        &ssh.join("id_pem"),
        "secret",
        &["-t", "rsa", "-b", "2048", "-m", "PEM"],
    )?;
    keygen_with(
        &ssh.join("id_pkcs8"),
        "secret",
        &["-t", "ecdsa", "-m", "PKCS8"],
    )?;
    keygen_with(&ssh.join("id_plain"), "", &["-t", "ed25519"])?;
    let report = setup.report(None, &[])?;
    let protected = report.all("passphrase-protected");
    let messages: Vec<&str> = protected
        .iter()
        .filter_map(|f| f["message"].as_str())
        .collect();
    assert_eq!(messages.len(), 3, "{}", report.text);
    assert!(
        messages[0].contains("~/.ssh/id_openssh")
            && messages[0].contains("OpenSSH format, aes256-ctr")
    );
    assert!(
        messages[1].contains("~/.ssh/id_pem")
            && messages[1].contains("old PEM format, RSA PRIVATE KEY")
    );
    assert!(
        messages[2].contains("~/.ssh/id_pkcs8") && messages[2].contains("ENCRYPTED PRIVATE KEY")
    );
    assert!(protected.iter().all(|f| f["severity"] == "info"));
    assert!(!report.text.contains("id_plain"), "{}", report.text);
    // Information only: nothing to fix, and no key material printed.
    assert!(!report.has("unprotected-private-key"));
    for name in ["id_openssh", "id_pem", "id_pkcs8", "id_plain"] {
        let file = std::fs::read_to_string(ssh.join(name))?;
        let body = file
            .lines()
            .filter(|line| line.len() > 16 && !line.starts_with("-----") && !line.contains(':'));
        for line in body {
            assert!(
                !report.text.contains(line),
                "key material of {name} printed"
            );
        }
    }

    let plain_only = Setup::new()?;
    keygen_with(
        &plain_only.ssh_dir()?.join("id_plain"),
        "",
        &["-t", "ed25519"],
    )?;
    let quiet = plain_only.report(None, &[])?;
    assert!(!quiet.has("passphrase-protected"));
    assert!(
        quiet
            .message("no-passphrases")
            .contains("1 private key file"),
        "{}",
        quiet.text
    );
    Ok(())
}

#[test]
fn gpg_agent_with_ssh_support_is_named_and_warned_about() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let gpg = GpgAgent::start(&setup.path("gnupg"))?;
    let report = setup.report(Some(&gpg.socket), &[])?;
    let named = report.message("agent-not-token-agent");
    assert!(named.contains("GnuPG's gpg-agent (pid"), "{named}");
    assert!(named.contains("with 0 keys"), "{named}");
    assert_eq!(report.severity("gpg-ssh-support"), "warning");
    assert!(report
        .fix("gpg-ssh-support")
        .contains("gpgconf --kill gpg-agent"));
    // Its socket is SSH_AUTH_SOCK: not another agent.
    assert!(report.has("agents-alone"), "{}", report.text);
    drop(gpg);

    // Not running, but turned on in gpg-agent.conf.
    let configured = Setup::new()?;
    std::fs::write(
        configured.path("gnupg/gpg-agent.conf"),
        "# comment\nenable-ssh-support\n",
    )?;
    let report = configured.report(None, &[])?;
    assert!(report
        .message("gpg-ssh-support-configured")
        .contains("gpg-agent.conf"));
    assert!(report
        .fix("gpg-ssh-support-configured")
        .contains("remove enable-ssh-support"));
    Ok(())
}

#[test]
fn openssh_agent_and_token_agent_are_named_by_their_process() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let openssh = Agent::start_openssh(&[])?;
    let report = setup.report(Some(openssh.socket()), &[])?;
    let named = report.message("agent-not-token-agent");
    let pid = openssh.pid().context("no pid")?;
    assert!(
        named.contains(&format!("OpenSSH's ssh-agent (pid {pid}")),
        "{named}"
    );

    let token = Agent::start(AgentOptions::default())?;
    let report = setup.report(Some(token.socket()), &[])?;
    let named = report.message("agent-token-agent");
    let pid = token.pid().context("no pid")?;
    assert!(
        named.contains(&format!("is token-agent (pid {pid}")),
        "{named}"
    );
    assert!(named.ends_with("with 0 keys."), "{named}");
    assert_eq!(report.severity("agent-token-agent"), "ok");
    assert!(report.has("agents-alone"));
    Ok(())
}

#[test]
fn dead_and_missing_sockets_are_problems() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    // What a crashed agent leaves: a socket file nobody listens on.
    let dead = setup.path("tmp/dead.sock");
    drop(UnixListener::bind(&dead)?);
    let report = setup.report(Some(&dead), &[])?;
    assert_eq!(report.severity("auth-sock-stale"), "problem");
    assert!(report.fix("auth-sock-stale").starts_with("rm "));

    let missing = setup.path("tmp/gone.sock");
    let report = setup.report(Some(&missing), &[])?;
    assert_eq!(report.severity("auth-sock-missing"), "problem");

    // A stale socket where agents live is worth a note, not a problem.
    let agent_dir = setup.path("tmp/ssh-XXXXtest");
    std::fs::create_dir(&agent_dir)?;
    drop(UnixListener::bind(agent_dir.join("agent.4242"))?);
    let token = Agent::start(AgentOptions::default())?;
    let report = setup.report(Some(token.socket()), &[])?;
    assert_eq!(report.severity("stale-socket"), "info");
    assert!(report.message("stale-socket").contains("agent.4242"));
    Ok(())
}

#[test]
fn two_live_agents_fight() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let token = Agent::start(AgentOptions::default())?;
    let openssh = Agent::start_openssh(&[])?;
    // OpenSSH 10.1's place for ssh-agent sockets.
    let agent_dir = setup.ssh_dir()?.join("agent");
    std::fs::create_dir(&agent_dir)?;
    std::os::unix::fs::symlink(openssh.socket(), agent_dir.join("s.test.agent.1"))?;
    let report = setup.report(Some(token.socket()), &[])?;
    let pid = openssh.pid().context("no pid")?;
    assert_eq!(report.severity("agents-compete"), "warning");
    assert!(report
        .message("agents-compete")
        .contains("OpenSSH's ssh-agent"));
    assert_eq!(
        report.fix("agents-compete"),
        format!("SSH_AGENT_PID={pid} ssh-agent -k")
    );
    assert!(!report.has("agents-alone"));

    // Without SSH_AUTH_SOCK, the live agent found is what to point it at.
    let report = setup.report(None, &[])?;
    assert!(report
        .fix("agent-found")
        .starts_with("export SSH_AUTH_SOCK="));
    Ok(())
}

#[test]
fn host_key_missing_from_the_agent() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let keys = setup.path("keys");
    std::fs::create_dir(&keys)?;
    keygen(&keys.join("in_agent"), "ed25519", "in agent")?;
    keygen(&keys.join("on_token"), "ed25519", "on a token")?;
    // A hardware key's IdentityFile names only its public half.
    std::fs::remove_file(keys.join("on_token"))?;
    let agent = token_agent_with(&[keys.join("in_agent")])?;

    let config = setup.ssh_config(&format!(
        "Host missing\n  IdentitiesOnly yes\n  IdentityFile {}\nHost present\n  IdentitiesOnly yes\n  IdentityFile {}\n",
        keys.join("on_token.pub").display(),
        keys.join("in_agent.pub").display(),
    ))?;
    let config = config.to_str().context("path")?;
    let report = setup.report(Some(agent.socket()), &["--host", "missing", "-F", config])?;
    assert_eq!(report.severity("key-not-in-agent"), "problem");
    assert!(report.message("key-not-in-agent").contains("on_token.pub"));
    assert!(report.has("nothing-offered"), "{}", report.text);

    let report = setup.report(Some(agent.socket()), &["--host", "present", "-F", config])?;
    assert!(!report.has("key-not-in-agent"), "{}", report.text);
    assert!(
        report.message("host-ok").contains("in agent"),
        "{}",
        report.text
    );
    Ok(())
}

#[test]
fn host_with_too_many_agent_keys_fails_a_real_login_until_identities_only() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let keys = setup.path("keys");
    std::fs::create_dir(&keys)?;
    let paths: Vec<PathBuf> = (1..=7).map(|i| keys.join(format!("k{i}"))).collect();
    for path in &paths {
        keygen(path, "ed25519", "doctor")?;
    }
    let agent = token_agent_with(&paths)?;
    let right = keys.join("k7.pub");
    let sshd = Sshd::start(&std::fs::read_to_string(&right)?, None)?;
    let common = format!(
        "  HostName 127.0.0.1\n  Port {}\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  \
         BatchMode yes\n  IdentityAgent {}\n",
        sshd.port(),
        sshd.known_hosts()?.display(),
        agent.socket().display()
    );
    let config = setup.ssh_config(&format!(
        "Host crowded\n{common}  IdentityFile none\nHost chosen\n{common}  IdentitiesOnly yes\n  IdentityFile {}\n",
        right.display()
    ))?;
    let config = config.to_str().context("path")?;

    let report = setup.report(None, &["--host", "crowded", "-F", config])?;
    assert_eq!(report.severity("too-many-keys"), "warning");
    assert!(report
        .message("too-many-keys")
        .contains("Too many authentication failures"));
    assert!(report
        .fix("too-many-keys")
        .contains("IdentitiesOnly yes and IdentityFile"));
    // What the warning says happens does happen.
    let login = Command::new("ssh")
        .args(["-F", config, "crowded", "echo logged-in"])
        .output()?;
    assert!(
        stderr(&login).contains("Too many authentication failures"),
        "{}",
        stderr(&login)
    );

    let report = setup.report(None, &["--host", "chosen", "-F", config])?;
    assert!(!report.has("too-many-keys"), "{}", report.text);
    assert!(report.has("host-ok"), "{}", report.text);
    let login = Command::new("ssh")
        .args(["-F", config, "chosen", "echo logged-in"])
        .output()?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    Ok(())
}

#[test]
fn host_rsa_key_with_only_sha1_signatures() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let keys = setup.path("keys");
    std::fs::create_dir(&keys)?;
    keygen(&keys.join("rsa"), "rsa-2048", "rsa")?;
    let agent = token_agent_with(&[keys.join("rsa")])?;
    let config = setup.ssh_config(&format!(
        "Host old\n  PubkeyAcceptedAlgorithms ssh-rsa\n  IdentityFile {0}\nHost new\n  IdentityFile {0}\n",
        keys.join("rsa.pub").display()
    ))?;
    let config = config.to_str().context("path")?;
    let report = setup.report(Some(agent.socket()), &["--host", "old", "-F", config])?;
    assert_eq!(report.severity("rsa-sha1-only"), "problem");
    assert!(report
        .message("rsa-sha1-only")
        .contains("no mutual signature"));
    assert!(report
        .fix("rsa-sha1-only")
        .contains("+rsa-sha2-512,rsa-sha2-256"));
    let report = setup.report(Some(agent.socket()), &["--host", "new", "-F", config])?;
    assert!(!report.has("rsa-sha1-only"), "{}", report.text);
    assert!(report.has("host-ok"), "{}", report.text);
    Ok(())
}

#[test]
fn host_forward_agent_identity_agent_and_config_errors() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let agent = Agent::start(AgentOptions::default())?;
    let config = setup.ssh_config(&format!(
        "Host forwarding\n  ForwardAgent yes\nHost jump\n  ProxyJump forwarding\n\
         Host elsewhere\n  IdentityAgent {}\nHost nowhere\n  IdentityAgent {}\n",
        agent.socket().display(),
        setup.path("tmp/no-agent").display()
    ))?;
    let config = config.to_str().context("path")?;
    let report = setup.report(None, &["--host", "forwarding", "-F", config])?;
    assert_eq!(report.severity("forward-agent"), "warning");
    assert!(report.fix("forward-agent").contains("ProxyJump"));
    let report = setup.report(None, &["--host", "jump", "-F", config])?;
    assert!(!report.has("forward-agent"), "{}", report.text);

    let report = setup.report(None, &["--host", "elsewhere", "-F", config])?;
    assert!(
        report.message("identity-agent").contains("token-agent"),
        "{}",
        report.text
    );
    let report = setup.report(None, &["--host", "nowhere", "-F", config])?;
    assert_eq!(report.severity("identity-agent-dead"), "problem");

    let broken = setup.ssh_config("Host x\n  NoSuchOption yes\n")?;
    let report = setup.report(
        None,
        &["--host", "x", "-F", broken.to_str().context("path")?],
    )?;
    assert!(
        report.message("ssh-config-error").contains("nosuchoption"),
        "{}",
        report.text
    );
    Ok(())
}

#[test]
fn token_agents_pinentry_and_askpass_are_checked_in_its_environment() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let pinentry = setup.path("my-pinentry");
    write_script(&pinentry, "exit 0")?;
    let start = |env: &[(&str, &str)]| {
        Agent::start(AgentOptions {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..AgentOptions::default()
        })
    };
    let pinentry = pinentry.to_str().context("path")?;

    let agent = start(&[("PINENTRY_PROGRAM", "/nonexistent/pinentry")])?;
    let report = setup.report(Some(agent.socket()), &[])?;
    assert_eq!(report.severity("pinentry-missing"), "problem");
    let pid = agent.pid().context("no pid")?;
    assert!(report
        .message("pinentry-missing")
        .contains(&format!("pid {pid}")));

    let agent = start(&[("PINENTRY_PROGRAM", pinentry)])?;
    let report = setup.report(Some(agent.socket()), &[])?;
    assert_eq!(report.severity("pinentry-no-display"), "warning");

    let agent = start(&[
        ("PINENTRY_PROGRAM", pinentry),
        ("DISPLAY", ":99"),
        ("SSH_ASKPASS", "/nonexistent/askpass"),
    ])?;
    let report = setup.report(Some(agent.socket()), &[])?;
    assert!(
        report.message("pinentry-ok").contains("DISPLAY=:99"),
        "{}",
        report.text
    );
    assert_eq!(report.severity("askpass-missing"), "problem");

    let agent = start(&[
        ("PINENTRY_PROGRAM", pinentry),
        ("DISPLAY", ":99"),
        ("SSH_ASKPASS", pinentry),
    ])?;
    let report = setup.report(Some(agent.socket()), &[])?;
    assert!(
        report.has("pinentry-ok") && report.has("askpass-ok"),
        "{}",
        report.text
    );
    Ok(())
}

#[test]
fn pcscd_must_listen() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let report = setup.report(None, &[])?;
    assert_eq!(report.severity("pcscd-not-running"), "warning");
    assert!(report
        .fix("pcscd-not-running")
        .contains("PCSCLITE_CSOCK_NAME"));

    let rig = PcscRig::start()?;
    let report = Report::of(
        setup
            .doctor()?
            .env("PCSCLITE_CSOCK_NAME", rig.socket())
            .arg("--json")
            .output()?,
    )?;
    assert_eq!(report.severity("pcscd-running"), "ok");
    Ok(())
}

#[test]
fn udev_rules_for_fido_keys_and_ccid_readers() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let report = setup.report(None, &[])?;
    assert_eq!(report.severity("udev-fido-missing"), "warning");
    assert_eq!(report.severity("udev-ccid-missing"), "warning");
    assert!(report
        .fix("udev-fido-missing")
        .contains("sudo install -m 0644 udev/70-token-agent.rules /etc/udev/rules.d/"));

    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../udev/70-token-agent.rules"),
        setup.path("udev/70-token-agent.rules"),
    )?;
    let report = setup.report(None, &[])?;
    assert_eq!(report.severity("udev-fido"), "ok");
    assert_eq!(report.severity("udev-ccid"), "ok");
    Ok(())
}

#[test]
fn doctor_usage_errors_exit_2_and_help_is_snapshotted() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let output = setup.doctor()?.arg("--bogus").output()?;
    assert_eq!(output.status.code(), Some(2));
    let output = setup
        .doctor()?
        .args(["--host", "-oProxyCommand=x"])
        .output()?;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let output = setup.doctor()?.args(["-F", "/x"]).output()?;
    assert_eq!(output.status.code(), Some(2), "-F needs --host");

    let help = check(setup.doctor()?.arg("--help").output()?, "doctor --help")?;
    super::cli::snapshot("doctor-help.txt", &stdout(&help))?;
    Ok(())
}

/// Under socket activation systemd creates the socket and keeps it while
/// the agent it started serves it: doctor names the agent, not systemd
/// (whose pid is the one SO_PEERCRED gives).
#[test]
fn a_socket_activated_agent_is_named_rather_than_systemd() -> anyhow::Result<()> {
    use std::io::BufRead;

    let setup = Setup::new()?;
    let socket = setup.path("run").join("activated.sock");
    // A stand-in for systemd: it binds and listens under the name systemd,
    // starts the agent with the socket as fd 3 (LISTEN_FDS), and stays.
    let manager = r#"
import ctypes, os, socket, sys, time
ctypes.CDLL(None).prctl(15, b"systemd", 0, 0, 0)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(8)
pid = os.fork()
if pid == 0:
    os.dup2(s.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.argv[2], [sys.argv[2], "-D"])
print(pid, flush=True)
time.sleep(120)
"#;
    let mut systemd = Command::new("python3")
        .arg("-c")
        .arg(manager)
        .arg(&socket)
        .arg(agent_binary()?)
        .env("HOME", setup.home())
        .env("XDG_RUNTIME_DIR", setup.path("run"))
        .env("XDG_CONFIG_HOME", setup.path("config"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(systemd.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let agent: i32 = line.trim().parse().context("no agent pid")?;
    let report = setup.report(Some(&socket), &[]);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = systemd.kill();
    let _ = systemd.wait();
    let report = report?;
    let named = report.message("agent-token-agent");
    assert!(
        named.contains(&format!("is token-agent (pid {agent}")),
        "{}",
        report.text
    );
    Ok(())
}

/// Without SSH_AUTH_SOCK, the socket of token-agent's own systemd socket
/// unit is among the places doctor looks for a live agent.
#[test]
fn the_socket_units_agent_is_found() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let dir = setup.path("run").join("token-agent");
    std::fs::create_dir(&dir)?;
    chmod(&dir, 0o700)?;
    let socket = dir.join("ssh-agent.sock");
    let mut agent = Command::new(agent_binary()?)
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .env("HOME", setup.home())
        .env("XDG_CONFIG_HOME", setup.path("config"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let ready = token_agent_e2e::wait_for(std::time::Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let report = setup.report(None, &[]);
    let _ = agent.kill();
    let _ = agent.wait();
    anyhow::ensure!(ready, "the agent did not listen on {}", socket.display());
    let report = report?;
    assert_eq!(
        report.fix("agent-found"),
        format!("export SSH_AUTH_SOCK={}", socket.display()),
        "{}",
        report.text
    );
    Ok(())
}
