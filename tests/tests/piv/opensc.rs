//! OpenSC's `opensc-pkcs11.so`, loaded through token-agent's PKCS#11 backend
//! (`ssh-add -s`), sees the key that `token-agent piv setup` made on the card.

use std::time::Duration;

use anyhow::{ensure, Result};
use piv_sim::CardConfig;
use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::pcsc::PcscRig;
use token_agent_e2e::{agent_binary, stderr, stdout, test_binary, wait_for, write_script};

const SERIAL: u32 = 21_000_081;
const OPENSC: &str = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so";

#[test]
fn opensc_through_the_pkcs11_backend_sees_the_key_piv_setup_made() -> Result<()> {
    let rig = PcscRig::start_with_configs(&[CardConfig {
        serial: SERIAL,
        ..CardConfig::default()
    }])?;
    let pinentry = test_binary("scripted-pinentry")?;
    let script = rig.dir().join("setup-script");
    std::fs::write(&script, "pin 123456\n")?;
    let mut setup = rig.command(agent_binary()?);
    setup
        .args(["piv", "setup", "--touch-policy", "never"])
        .env("PINENTRY_PROGRAM", &pinentry)
        .env("SCRIPTED_PINENTRY_SCRIPT", &script)
        .env("DISPLAY", ":0");
    let out = rig.run(&mut setup)?;
    ensure!(out.status.success(), "setup failed: {}", stderr(&out));
    let authorized = stdout(&out).trim().to_owned();
    let blob = authorized.split(' ').nth(1).unwrap_or_default().to_owned();

    // Only the PKCS#11 backend: the PIV backend is off.
    let askpass = rig.dir().join("askpass");
    write_script(&askpass, "echo 123456")?;
    let agent = Agent::start(AgentOptions {
        env: vec![
            (
                "PCSCLITE_CSOCK_NAME".into(),
                rig.socket().display().to_string(),
            ),
            ("SSH_ASKPASS".into(), askpass.display().to_string()),
            ("SSH_ASKPASS_REQUIRE".into(), "force".into()),
        ],
        config: Some("[prompt]\npin_prompt = \"askpass\"\n[piv]\nenabled = false\n".into()),
        ..AgentOptions::default()
    })?;
    let out = agent
        .command("ssh-add")
        .args(["-s", OPENSC])
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .output()?;
    ensure!(
        out.status.success(),
        "ssh-add -s {OPENSC} failed: {}\n{}",
        stderr(&out),
        agent.log_text()
    );
    ensure!(
        wait_for(Duration::from_secs(5), || agent
            .listed()
            .is_ok_and(|keys| keys.iter().any(|k| k.contains(&blob)))),
        "OpenSC's keys {:?} do not include {authorized}",
        agent.listed()
    );
    let sshd = Sshd::start(&authorized, None)?;
    let out = sshd.login(&agent)?;
    sshd.ensure_logged_in(&out, &agent.log_text())?;
    Ok(())
}
