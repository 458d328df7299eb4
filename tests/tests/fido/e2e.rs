use std::time::Duration;

use anyhow::{bail, ensure, Context};
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::{check, stderr, stdout, wait_for};

use crate::support::{SimAgent, Token, PIN};

fn public_line(file: &std::path::Path) -> anyhow::Result<String> {
    let mut path = file.as_os_str().to_owned();
    path.push(".pub");
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

#[test]
fn enrolled_files_are_read_by_ssh_keygen() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    for (kind, label) in [("ed25519-sk", "ED25519-SK"), ("ecdsa-sk", "ECDSA-SK")] {
        let file = token.enroll(&format!("id_{kind}"), &["--type", kind])?;
        let derived = check(
            std::process::Command::new("ssh-keygen")
                .arg("-y")
                .arg("-f")
                .arg(&file)
                .output()?,
            "ssh-keygen -y",
        )?;
        let public = public_line(&file)?;
        // `-y` prints the key (and comment); the .pub holds the same key.
        let key_part = |line: &str| {
            line.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        ensure!(
            key_part(&stdout(&derived)) == key_part(&public),
            "{} vs {public}",
            stdout(&derived)
        );
        let listed = check(
            std::process::Command::new("ssh-keygen")
                .arg("-l")
                .arg("-f")
                .arg(&file)
                .output()?,
            "ssh-keygen -l",
        )?;
        ensure!(stdout(&listed).contains(label), "{}", stdout(&listed));
        ensure!(stdout(&listed).contains(&format!("id_{kind}")));
    }
    // The files say what ssh-keygen would write for these options.
    let file = token.enroll(
        "id_flags",
        &["--no-touch-required", "--application", "ssh:flags"],
    )?;
    let key = ssh_key::PrivateKey::read_openssh_file(&file)?;
    match key.key_data() {
        ssh_key::private::KeypairData::SkEd25519(sk) => {
            ensure!(sk.flags() == 0, "flags {:#x}", sk.flags());
            ensure!(sk.public().application() == "ssh:flags");
        }
        other => bail!("not an ed25519-sk key: {:?}", other.algorithm()),
    }
    Ok(())
}

/// Enrols a key with `options`, adds it with ssh-add, and logs in to an sshd
/// whose authorized_keys line is `prefix` + the public key.
fn login_case(token: &Token, options: &[&str], prefix: &str, pins: &[&str]) -> anyhow::Result<()> {
    let file = token.enroll("id_login", options)?;
    let agent = SimAgent::start(token, "", &[])?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    let listed = stdout(&check(agent.ssh_add(&["-L"])?, "ssh-add -L")?);
    let public = public_line(&file)?;
    let key_part: String = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    ensure!(listed.contains(&key_part), "{listed}");
    let sshd = Sshd::start(&format!("{prefix}{public}\n"), None)?;
    token.script_pins(pins)?;
    let login = agent.login(&sshd)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    Ok(())
}

#[test]
fn login_with_an_sk_key_added_by_ssh_add() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    login_case(&token, &[], "", &[])
}

#[test]
fn login_with_an_ecdsa_sk_key() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    login_case(&token, &["--type", "ecdsa-sk"], "", &[])
}

#[test]
fn login_with_no_touch_required() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    login_case(&token, &["--no-touch-required"], "no-touch-required ", &[])
}

#[test]
fn login_with_verify_required_asks_the_pin() -> anyhow::Result<()> {
    let token = Token::new(Some(PIN))?;
    // One PIN for enrolment, one for the login's signature.
    token.script_pins(&[PIN])?;
    let file = token.enroll("id_verify", &["--verify-required"])?;
    let agent = SimAgent::start(&token, "", &[])?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    let public = public_line(&file)?;
    let sshd = Sshd::start(&format!("verify-required {public}\n"), None)?;
    token.script_pins(&[PIN])?;
    let login = agent.login(&sshd)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    ensure!(
        token.pinentry_log().contains("tries left"),
        "{}",
        token.pinentry_log()
    );
    Ok(())
}

#[test]
fn a_plain_key_cannot_log_in_where_verify_required() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let file = token.enroll("id_plain", &[])?;
    let agent = SimAgent::start(&token, "", &[])?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    let sshd = Sshd::start(&format!("verify-required {}\n", public_line(&file)?), None)?;
    let login = agent.login(&sshd)?;
    ensure!(
        !stdout(&login).contains("logged-in"),
        "sshd accepted a signature without UV"
    );
    ensure!(
        sshd.log_text()
            .contains("user verification requirement not met"),
        "{}",
        sshd.log_text()
    );
    Ok(())
}

/// `ssh-keygen -Y sign` through the agent, for the public key `file`.pub.
fn sign_file(
    agent: &SimAgent,
    file: &std::path::Path,
    message: &std::path::Path,
) -> anyhow::Result<std::process::Output> {
    let mut public = file.as_os_str().to_owned();
    public.push(".pub");
    Ok(token_agent_e2e::sign_file(agent.command("ssh-keygen"), &public, message).output()?)
}

#[test]
fn ssh_keygen_verifies_sk_signatures_made_through_the_agent() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let agent = SimAgent::start(&token, "", &[])?;
    for kind in ["ed25519-sk", "ecdsa-sk"] {
        let file = token.enroll(&format!("id_sign_{kind}"), &["--type", kind])?;
        check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
        let message = token.dir().join(format!("message-{kind}"));
        std::fs::write(&message, format!("signed by {kind}\n"))?;
        check(sign_file(&agent, &file, &message)?, "ssh-keygen -Y sign")?;
        let signers = token.dir().join("allowed_signers");
        std::fs::write(
            &signers,
            format!("me@example.org {}\n", public_line(&file)?),
        )?;
        let mut signature = message.as_os_str().to_owned();
        signature.push(".sig");
        let verified = std::process::Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "file", "-I", "me@example.org", "-f"])
            .arg(&signers)
            .arg("-s")
            .arg(&signature)
            .stdin(std::fs::File::open(&message)?)
            .output()?;
        check(verified, "ssh-keygen -Y verify")?;
    }
    Ok(())
}

#[test]
fn a_denied_touch_and_a_touch_that_never_comes_fail_the_signature() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let file = token.enroll("id_touch", &[])?;
    let agent = SimAgent::start(&token, "", &[])?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    let message = token.dir().join("message");
    std::fs::write(&message, "touch me\n")?;

    ensure!(agent.control("presence deny")? == "ok");
    let denied = sign_file(&agent, &file, &message)?;
    ensure!(
        !denied.status.success(),
        "signed although the touch was denied"
    );
    ensure!(
        agent.log_text().contains("the touch was denied"),
        "{}",
        agent.log_text()
    );

    // Waiting: the agent gives up when the key does (1.5 s in this build).
    ensure!(agent.control("presence wait")? == "ok");
    let timed_out = sign_file(&agent, &file, &message)?;
    ensure!(!timed_out.status.success(), "signed without a touch");
    ensure!(
        agent.log_text().contains("not touched in time"),
        "{}",
        agent.log_text()
    );

    // A touch while it waits lets the signature through; listing answers meanwhile.
    let control_agent = &agent;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let signer = scope.spawn(|| sign_file(control_agent, &file, &message));
        let listed = control_agent.ssh_add(&["-l"])?;
        ensure!(listed.status.success());
        ensure!(control_agent.control("touch")? == "ok", "nothing waited");
        let signed = signer
            .join()
            .map_err(|_| anyhow::anyhow!("signer panicked"))??;
        check(signed, "ssh-keygen -Y sign after a touch")?;
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_wrong_pin_then_a_blocked_pin_through_the_agent() -> anyhow::Result<()> {
    let token = Token::new(Some(PIN))?;
    token.script_pins(&[PIN])?;
    let file = token.enroll("id_pin", &["--verify-required"])?;
    let agent = SimAgent::start(&token, "", &[])?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    let message = token.dir().join("message");
    std::fs::write(&message, "pin\n")?;
    token.script_pins(&["0000"; 8])?;
    let wrong = sign_file(&agent, &file, &message)?;
    ensure!(!wrong.status.success());
    ensure!(
        agent
            .log_text()
            .contains("PIN incorrect for fido-sim token, 7 tries left"),
        "{}",
        agent.log_text()
    );
    for _ in 0..7 {
        let _ = sign_file(&agent, &file, &message)?;
    }
    ensure!(
        agent.log_text().contains("is blocked"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn resident_keys_load_into_the_running_agent() -> anyhow::Result<()> {
    let token = Token::new(Some(PIN))?;
    token.script_pins(&[PIN])?;
    let file = token.enroll("id_resident", &["--resident", "--application", "ssh:e2e"])?;
    let agent = SimAgent::start(&token, "", &[])?;
    token.script_pins(&[PIN])?;
    let loaded = token.fido(&["load-resident"], Some(&agent))?;
    ensure!(loaded.status.success(), "{}", stderr(&loaded));
    ensure!(
        stdout(&loaded).contains("Added ssh:e2e"),
        "{}",
        stdout(&loaded)
    );
    let listed = stdout(&check(agent.ssh_add(&["-L"])?, "ssh-add -L")?);
    let public = public_line(&file)?;
    let key_part: String = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    ensure!(listed.contains(&key_part), "{listed}");
    let sshd = Sshd::start(&format!("{public}\n"), None)?;
    let login = agent.login(&sshd)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    Ok(())
}

/// A resident key made with --verify-required has credProtect
/// userVerificationRequired, so the security key hides it from any
/// assertion without the PIN. Loaded back, it must be a verify-required key,
/// as OpenSSH's sk-usbhid loads it, or it could never sign.
#[test]
fn a_verify_required_resident_key_loads_as_verify_required_and_logs_in_with_the_pin(
) -> anyhow::Result<()> {
    let token = Token::new(Some(PIN))?;
    token.script_pins(&[PIN])?;
    let file = token.enroll(
        "id_uv_resident",
        &["--resident", "--verify-required", "--application", "ssh:uv"],
    )?;
    let agent = SimAgent::start(&token, "", &[])?;
    token.script_pins(&[PIN])?;
    let loaded = token.fido(&["load-resident"], Some(&agent))?;
    ensure!(loaded.status.success(), "{}", stderr(&loaded));
    let public = public_line(&file)?;
    let sshd = Sshd::start(&format!("verify-required {public}\n"), None)?;
    token.script_pins(&[PIN])?;
    let login = agent.login(&sshd)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    ensure!(
        token.pinentry_log().matches("GETPIN").count() == 3,
        "enrolment, loading and the login each ask once: {}",
        token.pinentry_log()
    );
    Ok(())
}

/// As ssh-keygen without -O force: a second resident key for the same
/// application would replace the first on the security key, and the first
/// key would be lost.
#[test]
fn enrolling_a_second_resident_key_for_an_application_is_refused() -> anyhow::Result<()> {
    let token = Token::new(Some(PIN))?;
    token.script_pins(&[PIN])?;
    let first = token.enroll("id_first", &["--resident", "--application", "ssh:once"])?;
    token.script_pins(&[PIN])?;
    let file = token.dir().join("id_second");
    let second = token.fido(
        &[
            "enroll",
            "--resident",
            "--application",
            "ssh:once",
            "-f",
            &file.display().to_string(),
        ],
        None,
    )?;
    ensure!(!second.status.success(), "a second resident key was made");
    ensure!(
        stderr(&second).contains("already holds a resident key for ssh:once"),
        "{}",
        stderr(&second)
    );
    ensure!(!file.exists(), "a key file was written");
    // The first key is still the one on the security key.
    let agent = SimAgent::start(&token, "", &[])?;
    token.script_pins(&[PIN])?;
    let loaded = token.fido(&["load-resident"], Some(&agent))?;
    ensure!(loaded.status.success(), "{}", stderr(&loaded));
    let key_part: String = public_line(&first)?
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let listed = stdout(&check(agent.ssh_add(&["-L"])?, "ssh-add -L")?);
    ensure!(listed.contains(&key_part), "{listed}");

    // --force replaces it, as ssh-keygen -O force: the new key loads.
    token.script_pins(&[PIN])?;
    let replaced = token.fido(
        &[
            "enroll",
            "--resident",
            "--force",
            "--application",
            "ssh:once",
            "-f",
            &file.display().to_string(),
        ],
        None,
    )?;
    ensure!(replaced.status.success(), "{}", stderr(&replaced));
    check(agent.ssh_add(&["-D"])?, "ssh-add -D")?;
    token.script_pins(&[PIN])?;
    let loaded = token.fido(&["load-resident"], Some(&agent))?;
    ensure!(loaded.status.success(), "{}", stderr(&loaded));
    let listed = stdout(&check(agent.ssh_add(&["-L"])?, "ssh-add -L")?);
    let new_part: String = public_line(&file)?
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    ensure!(
        listed.contains(&new_part) && !listed.contains(&key_part),
        "{listed}"
    );
    Ok(())
}

#[test]
fn configured_key_files_are_offered_from_the_start() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let file = token.enroll("id_configured", &[])?;
    let config = format!("[fido]\nkeys = [\"{}\"]\n", file.display());
    let agent = SimAgent::start(&token, &config, &[])?;
    let listed = stdout(&check(agent.ssh_add(&["-L"])?, "ssh-add -L")?);
    ensure!(listed.contains("sk-ssh-ed25519@openssh.com"), "{listed}");
    let sshd = Sshd::start(&format!("{}\n", public_line(&file)?), None)?;
    let login = agent.login(&sshd)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    Ok(())
}

#[test]
fn resident_keys_load_at_start_when_the_config_says_so() -> anyhow::Result<()> {
    let token = Token::new(Some(PIN))?;
    token.script_pins(&[PIN])?;
    let file = token.enroll("id_at_start", &["--resident", "--application", "ssh:start"])?;
    token.script_pins(&[PIN])?;
    let agent = SimAgent::start(&token, "[fido]\nload_resident = true\n", &[])?;
    let public = public_line(&file)?;
    let key_part: String = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let listed = token_agent_e2e::wait_for(std::time::Duration::from_secs(10), || {
        agent
            .ssh_add(&["-L"])
            .is_ok_and(|out| stdout(&out).contains(&key_part))
    });
    ensure!(listed, "not loaded:\n{}", agent.log_text());
    ensure!(
        token.pinentry_log().contains("PIN"),
        "{}",
        token.pinentry_log()
    );
    Ok(())
}

/// A private session bus (`dbus-daemon --session`), stopped when dropped.
struct SessionBus {
    daemon: std::process::Child,
    address: String,
}

impl SessionBus {
    fn start() -> anyhow::Result<Self> {
        Self::listening(None)
    }

    /// A bus listening on `address` (`unix:path=...`), or where the session
    /// configuration says.
    fn listening(address: Option<&str>) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut command = std::process::Command::new("dbus-daemon");
        command.args(["--session", "--nofork", "--nopidfile", "--print-address=1"]);
        if let Some(address) = address {
            command.arg(format!("--address={address}"));
        }
        let mut daemon = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot run dbus-daemon (Debian's dbus-daemon package)")?;
        let stdout = daemon.stdout.take().context("no stdout")?;
        let mut address = String::new();
        std::io::BufReader::new(stdout).read_line(&mut address)?;
        let address = address.trim().to_owned();
        ensure!(!address.is_empty(), "dbus-daemon printed no address");
        Ok(Self { daemon, address })
    }
}

impl Drop for SessionBus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The fake notification server on `bus`, recording into `record`; killed
/// when dropped.
struct FakeNotifications {
    server: std::process::Child,
    record: std::path::PathBuf,
}

impl FakeNotifications {
    fn start(bus: &SessionBus, record: std::path::PathBuf) -> anyhow::Result<Self> {
        let server =
            std::process::Command::new(token_agent_e2e::test_binary("fake-notifications")?)
                .arg(&record)
                .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
                .stdin(std::process::Stdio::null())
                .spawn()?;
        let fake = Self { server, record };
        ensure!(
            wait_for(Duration::from_secs(10), || fake
                .lines()
                .iter()
                .any(|l| l == "ready")),
            "the fake notification server did not start"
        );
        Ok(fake)
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for FakeNotifications {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Signs `message` with `file` while the agent waits for a touch, touching
/// once `noticed` holds or after 5 s; whether it held.
fn sign_with_touch(
    agent: &SimAgent,
    file: &std::path::Path,
    message: &std::path::Path,
    noticed: impl Fn() -> bool,
) -> anyhow::Result<bool> {
    ensure!(agent.control("presence wait")? == "ok");
    std::thread::scope(|scope| -> anyhow::Result<bool> {
        let signer = scope.spawn(|| sign_file(agent, file, message));
        let shown = wait_for(Duration::from_secs(5), &noticed);
        let touched = wait_for(Duration::from_secs(1), || {
            agent.control("touch").is_ok_and(|answer| answer == "ok")
        });
        let signed = signer
            .join()
            .map_err(|_| anyhow::anyhow!("signer panicked"))??;
        ensure!(touched, "nothing waited for a touch");
        check(signed, "ssh-keygen -Y sign after a touch")?;
        Ok(shown)
    })
}

#[test]
fn touch_notices_reach_a_session_bus_that_restarted() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let address = format!("unix:path={}", token.dir().join("bus").display());
    let file = token.enroll("id_desktop", &[])?;
    let message = token.dir().join("message");
    std::fs::write(&message, "touch me\n")?;
    let agent = SimAgent::start_with_env(
        &token,
        "[notice]\ndelay_ms = 0\n",
        &[],
        &[("DBUS_SESSION_BUS_ADDRESS", address.as_str())],
    )?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    for run in ["first", "second"] {
        // A new bus at the same address each time, as after a desktop's restart.
        let bus = SessionBus::listening(Some(&address))?;
        let fake = FakeNotifications::start(&bus, token.dir().join(run))?;
        let shown = sign_with_touch(&agent, &file, &message, || {
            fake.lines().iter().any(|l| l.starts_with("notify "))
        })?;
        ensure!(
            shown,
            "no Notify on the {run} bus: {:?}\n{}",
            fake.lines(),
            agent.log_text()
        );
    }
    Ok(())
}

#[test]
fn issue_17_a_touch_shows_a_desktop_notification_closed_when_touched() -> anyhow::Result<()> {
    let bus = SessionBus::start()?;
    let token = Token::new(None)?;
    let fake = FakeNotifications::start(&bus, token.dir().join("notifications"))?;
    let file = token.enroll("id_desktop", &[])?;
    // No [notice] command: the notice goes to the desktop.
    let agent = SimAgent::start_with_env(
        &token,
        "[notice]\ndelay_ms = 0\n",
        &[],
        &[("DBUS_SESSION_BUS_ADDRESS", bus.address.as_str())],
    )?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    let message = token.dir().join("message");
    std::fs::write(&message, "touch me\n")?;
    let shown = sign_with_touch(&agent, &file, &message, || {
        fake.lines().iter().any(|l| l.starts_with("notify "))
    })?;
    ensure!(
        shown,
        "no Notify while the key waited: {:?}\n{}",
        fake.lines(),
        agent.log_text()
    );
    let notify = fake
        .lines()
        .into_iter()
        .find(|l| l.starts_with("notify "))
        .context("no Notify")?;
    let id = notify
        .split_whitespace()
        .nth(1)
        .context("no id")?
        .to_owned();
    ensure!(
        notify.contains("token-agent: ")
            && notify.contains(" Touch ")
            && notify.contains("(expires 0)"),
        "{notify}"
    );
    ensure!(
        wait_for(Duration::from_secs(5), || fake
            .lines()
            .contains(&format!("close {id}"))),
        "the notification was not closed after the touch: {:?}",
        fake.lines()
    );

    // A [notice] command keeps precedence: it runs, and nothing goes to the desktop.
    let ran = token.dir().join("command-ran");
    let config = format!(
        "[notice]\ndelay_ms = 0\ncommand = \"echo \\\"$TOKEN_AGENT_NOTICE_KIND\\\" >> '{}'\"\n",
        ran.display()
    );
    let agent = SimAgent::start_with_env(
        &token,
        &config,
        &[],
        &[("DBUS_SESSION_BUS_ADDRESS", bus.address.as_str())],
    )?;
    check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
    let before = fake.lines().len();
    let noticed = sign_with_touch(&agent, &file, &message, || ran.exists())?;
    ensure!(
        noticed,
        "the notice command did not run:\n{}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        fake.lines().len() == before,
        "a desktop notification beside the command: {:?}",
        fake.lines()
    );
    ensure!(std::fs::read_to_string(&ran)?.trim() == "touch");
    Ok(())
}
