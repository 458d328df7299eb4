//! The real token-agent binary with the PIV backend: `token-agent piv setup`
//! and `list` on a simulated card, then a login to a loopback sshd through
//! the agent, with the PIN asked by the scripted pinentry.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use piv_sim::{CardConfig, TouchMode};
use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::pcsc::PcscRig;
use token_agent_e2e::{agent_binary, stderr, stdout, test_binary, wait_for};

const SERIAL: u32 = 21_000_071;

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
