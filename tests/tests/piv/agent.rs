//! The real token-agent binary with the PIV backend: `token-agent piv setup`
//! and `list` on a simulated card, then a login to a loopback sshd through
//! the agent, with the PIN asked by the scripted pinentry.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use piv_sim::{CardConfig, TouchMode};
use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::pcsc::PcscRig;
use token_agent_e2e::{agent_binary, check, sign_file, stderr, stdout, test_binary, wait_for};

const SERIAL: u32 = 21_000_071;
const YUBIKEY4: u32 = 21_000_072;

#[test]
fn setup_then_list_then_login_to_sshd_through_the_agent() -> Result<()> {
    let rig = PcscRig::start_with_configs(&[CardConfig {
        serial: SERIAL,
        ..CardConfig::default()
    }])?;
    // The person touches the card a moment after it starts blinking.
    rig.card(0)
        .touch()
        .set_mode(TouchMode::AutoAfter(Duration::from_millis(200)));
    let pinentry = test_binary("scripted-pinentry")?;
    let setup_script = rig.dir().join("setup-script");
    std::fs::write(&setup_script, "pin 123456\n")?;

    let mut setup = rig.command(agent_binary()?);
    setup
        .args(["piv", "setup", "--serial", &SERIAL.to_string()])
        .env("PINENTRY_PROGRAM", &pinentry)
        .env("SCRIPTED_PINENTRY_SCRIPT", &setup_script)
        .env("DISPLAY", ":0");
    let out = rig.run(&mut setup)?;
    ensure!(out.status.success(), "setup failed: {}", stderr(&out));
    let authorized = stdout(&out).trim().to_owned();
    ensure!(
        authorized.starts_with("ecdsa-sha2-nistp256 ")
            && authorized.ends_with(&format!("YubiKey 5 #{SERIAL} slot 9a (PIV Authentication)")),
        "{authorized}"
    );

    let out = rig.run(rig.command(agent_binary()?).args(["piv", "list"]))?;
    let listed = stdout(&out);
    ensure!(out.status.success(), "list failed: {}", stderr(&out));
    ensure!(
        listed.contains(&format!("YubiKey 5 #{SERIAL} (firmware 5.4.3"))
            && listed.contains("PIN tries left 3, PUK tries left 3")
            && listed.contains(
                "slot 9a (PIV Authentication): ECCP256, PIN once, touch always, certificate"
            ),
        "{listed}"
    );

    let script = rig.dir().join("agent-script");
    let log = rig.dir().join("pinentry.log");
    std::fs::write(&script, "pin 123456\n")?;
    let agent = Agent::start(AgentOptions {
        env: vec![
            (
                "PCSCLITE_CSOCK_NAME".into(),
                rig.socket().display().to_string(),
            ),
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
    let key_part: String = authorized.split(' ').take(2).collect::<Vec<_>>().join(" ");
    ensure!(
        wait_for(Duration::from_secs(5), || agent
            .listed()
            .is_ok_and(|keys| keys.iter().any(|k| k.starts_with(&key_part)))),
        "the agent did not list the key: {:?}\n{}",
        agent.listed(),
        agent.log_text()
    );

    let sshd = Sshd::start(&authorized, None)?;
    for _ in 0..2 {
        let out = sshd.login(&agent)?;
        sshd.ensure_logged_in(&out, &agent.log_text())?;
    }
    // PIN policy "once": asked for the first login only, naming the card and key.
    let asked = std::fs::read_to_string(&log).context("the pinentry was never run")?;
    ensure!(asked.matches("GETPIN").count() == 1, "{asked}");
    ensure!(
        asked.contains(&format!(
            "SETDESC Enter the PIN of YubiKey 5 #{SERIAL} to use key YubiKey 5 #{SERIAL} slot 9a"
        )),
        "{asked}"
    );
    ensure!(asked.contains("3 tries left"), "{asked}");

    // A touch that never comes: the login fails, and `token-agent status`
    // says why, with the card's PIN state beside it.
    rig.card(0).touch().set_timeout(Duration::from_secs(1));
    rig.card(0).touch().set_mode(TouchMode::Never);
    let out = sshd.login(&agent)?;
    ensure!(
        !stdout(&out).contains("logged-in"),
        "logged in without a touch"
    );
    let status = rig.run(
        rig.command(agent_binary()?)
            .args(["status", "--json", "--socket"])
            .arg(agent.socket()),
    )?;
    ensure!(
        status.status.success(),
        "status failed: {}",
        stderr(&status)
    );
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let refusal = doc["refusals"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .unwrap_or_default();
    ensure!(refusal["reason"] == "touch-timeout", "{doc:#}");
    ensure!(
        refusal["message"]
            .as_str()
            .unwrap_or("")
            .contains("was not touched in time"),
        "{refusal}"
    );
    let card = doc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == "piv")
        .map(|b| b["devices"][0].clone())
        .unwrap_or_default();
    ensure!(
        card["label"] == format!("YubiKey 5 #{SERIAL}").as_str()
            && card["details"].to_string().contains("PIN: 3 tries left")
            && card["details"].to_string().contains("PUK: 3 tries left"),
        "{card:#}"
    );
    rig.card(0)
        .touch()
        .set_mode(TouchMode::AutoAfter(Duration::from_millis(200)));

    // Three wrong PINs from another program block the PIN; `piv unblock`
    // sets a new one with the PUK (asked twice for the new PIN).
    for _ in 0..3 {
        let out = rig.piv_tool(&["-a", "verify-pin", "-P", "000000"])?;
        ensure!(!out.status.success(), "a wrong PIN was accepted");
    }
    let unblock_script = rig.dir().join("unblock-script");
    std::fs::write(&unblock_script, "pin 12345678\npin 654321\npin 654321\n")?;
    let mut unblock = rig.command(agent_binary()?);
    unblock
        .args(["piv", "unblock", "--serial", &SERIAL.to_string()])
        .env("PINENTRY_PROGRAM", &pinentry)
        .env("SCRIPTED_PINENTRY_SCRIPT", &unblock_script)
        .env("DISPLAY", ":0");
    let out = rig.run(&mut unblock)?;
    ensure!(
        out.status.success()
            && stdout(&out).contains(&format!(
                "The PIN of YubiKey 5 #{SERIAL} is set and unblocked."
            )),
        "unblock failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = rig.piv_tool(&["-a", "verify-pin", "-P", "654321"])?;
    ensure!(
        out.status.success(),
        "the new PIN does not work: {}",
        stderr(&out)
    );
    Ok(())
}

/// A YubiKey 4 (and a YubiKey 5 before 5.3) has no GET METADATA, and the
/// `yubikey` crate reads its PIN tries by re-selecting PIV and sending an
/// empty VERIFY; on a YubiKey 4 that re-select logs the PIN out. The agent
/// once read the tries that way right after the person's PIN was accepted,
/// so the signature then failed with "the card asked for the PIN again right
/// after accepting it".
#[test]
fn a_yubikey_4_signs_with_the_pin_typed_once_and_then_with_the_cached_pin() -> Result<()> {
    let rig = PcscRig::start_with_configs(&[CardConfig {
        serial: YUBIKEY4,
        version: [4, 3, 7],
    }])?;
    let pinentry = test_binary("scripted-pinentry")?;
    let setup_script = rig.dir().join("setup-script");
    std::fs::write(&setup_script, "pin 123456\n")?;
    let mut setup = rig.command(agent_binary()?);
    setup
        .args(["piv", "setup", "--serial", &YUBIKEY4.to_string()])
        .args(["--touch-policy", "never"])
        .env("PINENTRY_PROGRAM", &pinentry)
        .env("SCRIPTED_PINENTRY_SCRIPT", &setup_script)
        .env("DISPLAY", ":0");
    let out = rig.run(&mut setup)?;
    ensure!(out.status.success(), "setup failed: {}", stderr(&out));
    let authorized = stdout(&out).trim().to_owned();
    ensure!(
        authorized.ends_with(&format!(
            "YubiKey 4 #{YUBIKEY4} slot 9a (PIV Authentication)"
        )),
        "{authorized}"
    );
    let public = rig.dir().join("id_piv.pub");
    std::fs::write(&public, format!("{authorized}\n"))?;

    // One PIN in the script: a second question would get no answer.
    let script = rig.dir().join("agent-script");
    let log = rig.dir().join("pinentry.log");
    std::fs::write(&script, "pin 123456\n")?;
    let agent = Agent::start(AgentOptions {
        env: vec![
            (
                "PCSCLITE_CSOCK_NAME".into(),
                rig.socket().display().to_string(),
            ),
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
    let key_part: String = authorized.split(' ').take(2).collect::<Vec<_>>().join(" ");
    ensure!(
        wait_for(Duration::from_secs(5), || agent
            .listed()
            .is_ok_and(|keys| keys.iter().any(|k| k.starts_with(&key_part)))),
        "the agent did not list the key: {:?}\n{}",
        agent.listed(),
        agent.log_text()
    );

    let signers = rig.dir().join("allowed_signers");
    std::fs::write(&signers, format!("signer@example {key_part}\n"))?;
    for round in 0..2 {
        let message = rig.dir().join(format!("message-{round}"));
        std::fs::write(&message, format!("signed on a YubiKey 4, round {round}\n"))?;
        let out = sign_file(agent.command("ssh-keygen"), &public, &message).output()?;
        ensure!(
            out.status.success(),
            "signature {round} failed: {}\n{}",
            stderr(&out),
            agent.log_text()
        );
        let signature = message.with_extension("sig");
        let mut verify = std::process::Command::new("ssh-keygen");
        verify
            .args(["-Y", "verify", "-n", "file", "-I", "signer@example", "-f"])
            .arg(&signers)
            .arg("-s")
            .arg(&signature)
            .stdin(std::fs::File::open(&message)?);
        check(verify.output()?, "ssh-keygen -Y verify")?;
        let asked = std::fs::read_to_string(&log).context("the pinentry was never run")?;
        ensure!(
            asked.matches("GETPIN").count() == 1,
            "after signature {round}: {asked}"
        );
    }
    Ok(())
}
