use std::path::Path;
use std::time::{Duration, Instant};

use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
use token_agent_e2e::{check, sign_file, test_binary, wait_for, write_script};

/// An askpass script that records its prompt and answers by exit status.
fn askpass(dir: &Path, name: &str, exit: i32, sleep: u32) -> anyhow::Result<std::path::PathBuf> {
    let script = dir.join(name);
    let record = dir.join(format!("{name}.asked"));
    write_script(
        &script,
        &format!(
            "printf '%s|%s\\n' \"$SSH_ASKPASS_PROMPT\" \"$1\" >> '{}'\nsleep {sleep}\nexit {exit}",
            record.display()
        ),
    )?;
    Ok(script)
}

/// Signs with the agent's key `public`; true when a signature came back.
fn try_sign(agent: &Agent, public: &Path) -> anyhow::Result<bool> {
    let message = agent.dir().join("message");
    std::fs::write(&message, "confirm me")?;
    let _ = std::fs::remove_file(agent.dir().join("message.sig"));
    let output = sign_file(agent.command("ssh-keygen"), public, &message).output()?;
    Ok(output.status.success() && agent.dir().join("message.sig").exists())
}

fn add_confirmed_key(agent: &Agent) -> anyhow::Result<std::path::PathBuf> {
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "confirm-me")?;
    check(
        agent.ssh_add(["-c".as_ref(), key.as_os_str()])?,
        "ssh-add -c",
    )?;
    std::fs::remove_file(&key)?;
    Ok(key.with_extension("pub"))
}

#[test]
fn confirm_through_ssh_askpass_yes_and_no() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let yes = askpass(dir.path(), "yes", 0, 0)?;
    let no = askpass(dir.path(), "no", 1, 0)?;
    // The agent runs the askpass of its environment; switch by a symlink.
    let current = dir.path().join("askpass");
    std::os::unix::fs::symlink(&yes, &current)?;
    let agent = Agent::start(AgentOptions {
        env: vec![("SSH_ASKPASS".into(), current.display().to_string())],
        ..AgentOptions::default()
    })?;
    let public = add_confirmed_key(&agent)?;
    assert!(try_sign(&agent, &public)?, "{}", agent.log_text());
    let asked = std::fs::read_to_string(dir.path().join("yes.asked"))?;
    assert!(
        asked.starts_with("confirm|Allow use of key confirm-me?"),
        "{asked}"
    );
    assert!(asked.contains("ssh-keygen (pid "), "{asked}");

    std::fs::remove_file(&current)?;
    std::os::unix::fs::symlink(&no, &current)?;
    assert!(!try_sign(&agent, &public)?);
    assert!(
        agent.log_text().contains("declined"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

/// An askpass script that prints `answer` and exits with `exit`.
fn answering_askpass(
    dir: &Path,
    name: &str,
    answer: &str,
    exit: i32,
) -> anyhow::Result<std::path::PathBuf> {
    let script = dir.join(name);
    write_script(&script, &format!("printf '{answer}'\nexit {exit}"))?;
    Ok(script)
}

#[test]
fn issue_12_askpass_confirmation_allows_only_yes_or_an_empty_answer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let current = dir.path().join("askpass");
    let first = answering_askpass(dir.path(), "first", "", 0)?;
    std::os::unix::fs::symlink(&first, &current)?;
    let agent = Agent::start(AgentOptions {
        env: vec![("SSH_ASKPASS".into(), current.display().to_string())],
        ..AgentOptions::default()
    })?;
    let public = add_confirmed_key(&agent)?;
    let cases = [
        ("empty", "", 0, true),
        ("yes", "yes\\n", 0, true),
        ("upper", "YES\\n", 0, true),
        ("no", "no\\n", 0, false),
        ("anything", "sure\\n", 0, false),
        ("yes-but-failed", "yes\\n", 1, false),
        ("failed", "", 1, false),
    ];
    for (name, answer, exit, allowed) in cases {
        let script = answering_askpass(dir.path(), name, answer, exit)?;
        std::fs::remove_file(&current)?;
        std::os::unix::fs::symlink(&script, &current)?;
        assert_eq!(
            try_sign(&agent, &public)?,
            allowed,
            "askpass answering {answer:?} with exit {exit}\n{}",
            agent.log_text()
        );
    }
    assert_eq!(
        agent.log_text().matches("reason=confirm-declined").count(),
        4
    );
    Ok(())
}

#[test]
fn issue_12_confirmation_prompts_show_the_e_fingerprint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let yes = askpass(dir.path(), "yes", 0, 0)?;
    let agent = Agent::start(AgentOptions {
        args: vec!["-E".into(), "md5".into()],
        env: vec![("SSH_ASKPASS".into(), yes.display().to_string())],
        ..AgentOptions::default()
    })?;
    let public = add_confirmed_key(&agent)?;
    assert!(try_sign(&agent, &public)?, "{}", agent.log_text());
    let asked = std::fs::read_to_string(dir.path().join("yes.asked"))?;
    assert!(asked.contains("MD5:"), "{asked}");
    assert!(!asked.contains("SHA256:"), "{asked}");
    Ok(())
}

#[test]
fn askpass_pins_are_their_first_line_and_an_empty_answer_reaches_no_token() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("asks", &[KeyKind::P256])?;
    let dir = tempfile::tempdir()?;
    let asked = dir.path().join("asked");
    // Prints nothing and exits 0, as an askpass whose window was just closed.
    let silent = dir.path().join("silent");
    write_script(&silent, &format!("echo asked >> '{}'", asked.display()))?;
    // The PIN, then more lines: OpenSSH reads only the first.
    let chatty = dir.path().join("chatty");
    write_script(&chatty, &format!("printf '%s\\nsecond line\\n' '{PIN}'"))?;
    let current = dir.path().join("askpass");
    std::os::unix::fs::symlink(&silent, &current)?;
    let mut env = hsm.env();
    env.push(("SSH_ASKPASS".into(), current.display().to_string()));
    let agent = Agent::start(AgentOptions {
        env,
        config: Some(format!(
            "[prompt]\npin_prompt = \"askpass\"\n[[pkcs11.modules]]\npath = \"{MODULE}\"\n"
        )),
        ..AgentOptions::default()
    })?;
    let mut listed = Vec::new();
    assert!(
        wait_for(Duration::from_secs(20), || {
            listed = agent.listed().unwrap_or_default();
            listed.len() == 1
        }),
        "{}",
        agent.log_text()
    );
    let public = agent.dir().join("token.pub");
    std::fs::write(&public, format!("{}\n", listed[0]))?;

    assert!(!try_sign(&agent, &public)?);
    assert!(asked.exists(), "{}", agent.log_text());
    assert!(
        !agent.log_text().contains("PIN incorrect"),
        "an empty answer was tried as a PIN:\n{}",
        agent.log_text()
    );

    std::fs::remove_file(&current)?;
    std::os::unix::fs::symlink(&chatty, &current)?;
    assert!(try_sign(&agent, &public)?, "{}", agent.log_text());
    assert!(!agent.log_text().contains("PIN incorrect"));
    Ok(())
}

#[test]
fn confirm_through_pinentry_without_askpass() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("script");
    let log = dir.path().join("pinentry.log");
    // Allow, Deny ("Not confirmed"), then a cancelled dialog.
    std::fs::write(&script, "confirm yes\nconfirm no\ncancel\n")?;
    let pinentry = test_binary("scripted-pinentry")?;
    let agent = Agent::start(AgentOptions {
        env: vec![
            ("PINENTRY_PROGRAM".into(), pinentry.display().to_string()),
            (
                "SCRIPTED_PINENTRY_SCRIPT".into(),
                script.display().to_string(),
            ),
            ("SCRIPTED_PINENTRY_LOG".into(), log.display().to_string()),
            // pinentry needs a graphical session; the scripted one draws nothing.
            ("DISPLAY".into(), ":0".into()),
        ],
        ..AgentOptions::default()
    })?;
    let public = add_confirmed_key(&agent)?;
    assert!(try_sign(&agent, &public)?, "{}", agent.log_text());
    assert!(!try_sign(&agent, &public)?);
    assert!(!try_sign(&agent, &public)?);
    assert_eq!(
        agent.log_text().matches("reason=confirm-declined").count(),
        2,
        "{}",
        agent.log_text()
    );
    let asked = std::fs::read_to_string(&log)?;
    assert_eq!(asked.matches("CONFIRM").count(), 3, "{asked}");
    assert!(
        asked.contains("SETDESC Allow use of key confirm-me?"),
        "{asked}"
    );
    Ok(())
}

#[test]
fn a_key_comment_of_many_percent_signs_can_still_be_confirmed_through_pinentry(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("script");
    let log = dir.path().join("pinentry.log");
    std::fs::write(&script, "confirm yes\n")?;
    let pinentry = test_binary("scripted-pinentry")?;
    let agent = Agent::start(AgentOptions {
        env: vec![
            ("PINENTRY_PROGRAM".into(), pinentry.display().to_string()),
            (
                "SCRIPTED_PINENTRY_SCRIPT".into(),
                script.display().to_string(),
            ),
            ("SCRIPTED_PINENTRY_LOG".into(), log.display().to_string()),
            ("DISPLAY".into(), ":0".into()),
        ],
        ..AgentOptions::default()
    })?;
    // Each `%` is three bytes on the Assuan line: 2,100 escaped.
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", &"%".repeat(700))?;
    check(
        agent.ssh_add(["-c".as_ref(), key.as_os_str()])?,
        "ssh-add -c",
    )?;
    std::fs::remove_file(&key)?;
    assert!(
        try_sign(&agent, &key.with_extension("pub"))?,
        "{}",
        agent.log_text()
    );
    let asked = std::fs::read_to_string(&log)?;
    assert!(asked.contains("SETDESC Allow use of key %%%"), "{asked}");
    assert!(asked.contains("…"), "{asked}");
    Ok(())
}

#[test]
fn a_pinentry_that_never_answers_is_killed_and_later_prompts_still_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A pinentry that takes the question and then ignores it, SETTIMEOUT included.
    let pid = dir.path().join("pid");
    let hung = dir.path().join("hung");
    write_script(
        &hung,
        &format!(
            "echo $$ > '{}'\necho OK\nwhile read -r line; do\n  case \"$line\" in\n    \
             CONFIRM*|GETPIN*) read -r never ;;\n    *) echo OK ;;\n  esac\ndone",
            pid.display()
        ),
    )?;
    let script = dir.path().join("script");
    std::fs::write(&script, "confirm yes\n")?;
    // The agent runs the pinentry its environment names; switch by a symlink.
    let current = dir.path().join("pinentry");
    std::os::unix::fs::symlink(&hung, &current)?;
    let agent = Agent::start(AgentOptions {
        env: vec![
            ("PINENTRY_PROGRAM".into(), current.display().to_string()),
            (
                "SCRIPTED_PINENTRY_SCRIPT".into(),
                script.display().to_string(),
            ),
            ("DISPLAY".into(), ":0".into()),
        ],
        config: Some("[prompt]\ntimeout_seconds = 1\n".into()),
        ..AgentOptions::default()
    })?;
    let public = add_confirmed_key(&agent)?;
    // One second, and a few more of grace; not forever.
    let started = Instant::now();
    assert_eq!(
        sign_within(&agent, &public, Duration::from_secs(30))?,
        Some(false),
        "{}",
        agent.log_text()
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        agent.log_text().contains("reason=confirm-timed-out"),
        "{}",
        agent.log_text()
    );
    let pid = std::fs::read_to_string(&pid)?;
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the hung pinentry still runs"
    );

    std::fs::remove_file(&current)?;
    std::os::unix::fs::symlink(test_binary("scripted-pinentry")?, &current)?;
    assert_eq!(
        sign_within(&agent, &public, Duration::from_secs(30))?,
        Some(true),
        "{}",
        agent.log_text()
    );
    Ok(())
}

/// [`try_sign`], giving up after `limit`: `None` when no answer came by then.
fn sign_within(agent: &Agent, public: &Path, limit: Duration) -> anyhow::Result<Option<bool>> {
    let message = agent.dir().join("message");
    std::fs::write(&message, "confirm me")?;
    let _ = std::fs::remove_file(agent.dir().join("message.sig"));
    let mut signer = sign_file(agent.command("ssh-keygen"), public, &message)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = signer.try_wait()? {
            return Ok(Some(
                status.success() && agent.dir().join("message.sig").exists(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signer.kill()?;
    signer.wait()?;
    Ok(None)
}

#[test]
fn confirm_without_any_prompt_refuses_clearly() -> anyhow::Result<()> {
    // No SSH_ASKPASS and no display: the agent must refuse, not hang.
    let agent = Agent::start(AgentOptions {
        env: vec![("PINENTRY_PROGRAM".into(), "pinentry".into())],
        ..AgentOptions::default()
    })?;
    let public = add_confirmed_key(&agent)?;
    let started = Instant::now();
    assert!(!try_sign(&agent, &public)?);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        agent.log_text().contains("needs a graphical session"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn listing_answers_while_a_confirmation_waits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let slow = askpass(dir.path(), "slow", 0, 3)?;
    let agent = Agent::start(AgentOptions {
        env: vec![("SSH_ASKPASS".into(), slow.display().to_string())],
        ..AgentOptions::default()
    })?;
    let public = add_confirmed_key(&agent)?;
    let message = agent.dir().join("held");
    std::fs::write(&message, "held")?;
    let mut signer = sign_file(agent.command("ssh-keygen"), &public, &message).spawn()?;
    // Wait until the confirmation is on screen, then list.
    assert!(wait_for(Duration::from_secs(10), || dir
        .path()
        .join("slow.asked")
        .exists()));
    assert_eq!(agent.listed()?.len(), 1);
    assert!(
        signer.try_wait()?.is_none(),
        "the listing should have answered while the signature still waited"
    );
    assert!(signer.wait()?.success());
    Ok(())
}

#[test]
fn lock_then_unlock_after_a_wrong_password() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let key = agent.dir().join("id");
    keygen(&key, "ecdsa-256", "lockable")?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    let password = |text: &str| -> anyhow::Result<std::path::PathBuf> {
        let script = agent.dir().join(format!("pw-{text}"));
        write_script(&script, &format!("echo '{text}'"))?;
        Ok(script)
    };
    let run = |flag: &str, script: &Path| -> anyhow::Result<std::process::Output> {
        Ok(agent
            .command("ssh-add")
            .arg(flag)
            .env("SSH_ASKPASS", script)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .output()?)
    };
    check(run("-x", &password("s3cret-lock")?)?, "ssh-add -x")?;
    assert!(agent.listed()?.is_empty(), "a locked agent lists nothing");
    let output = run("-X", &password("wrong")?)?;
    assert!(!output.status.success());
    assert!(agent.listed()?.is_empty());
    check(run("-X", &password("s3cret-lock")?)?, "ssh-add -X")?;
    assert_eq!(agent.listed()?.len(), 1);
    let log = agent.log_text();
    assert!(
        log.contains("agent locked") && log.contains("unlock failed"),
        "{log}"
    );
    assert!(
        !log.contains("s3cret-lock"),
        "the lock password reached the log"
    );
    // Unlocking an agent that is not locked fails, as in OpenSSH.
    assert!(!run("-X", &password("s3cret-lock")?)?.status.success());
    Ok(())
}

/// As OpenSSH: an empty lock password locks nothing, and any other bytes,
/// UTF-8 or not, do.
#[test]
fn a_lock_password_is_any_non_empty_string_of_bytes() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "lockable")?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    let run = |flag: &str, printf: &str| -> anyhow::Result<std::process::Output> {
        let script = agent.dir().join("pw");
        write_script(&script, &format!("printf '{printf}'"))?;
        Ok(agent
            .command("ssh-add")
            .arg(flag)
            .env("SSH_ASKPASS", script)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .output()?)
    };
    assert!(!run("-x", "")?.status.success(), "an empty password locked");
    assert_eq!(agent.listed()?.len(), 1);
    assert!(
        !run("-X", "pw")?.status.success(),
        "unlocked an unlocked agent"
    );
    check(run("-x", "p\\344ss")?, "ssh-add -x with a Latin-1 password")?;
    assert!(agent.listed()?.is_empty());
    check(run("-X", "p\\344ss")?, "ssh-add -X with a Latin-1 password")?;
    assert_eq!(agent.listed()?.len(), 1);
    Ok(())
}
