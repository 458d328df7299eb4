use std::process::Stdio;
use std::time::Duration;

use token_agent_e2e::softhsm::{build_shim, KeyKind, Shim, SoftHsm, MODULE, PIN};
use token_agent_e2e::{sign_file, wait_for};

use crate::{helpers, sign_and_verify, start_agent, wait_listed};

#[test]
fn keys_leave_with_their_token_and_come_back_with_it() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("stays", &[KeyKind::P384])?;
    hsm.token("roams", &[KeyKind::P256])?;
    let config =
        format!("[pkcs11]\npoll_interval_ms = 200\n[[pkcs11.modules]]\npath = \"{MODULE}\"\n");
    let agent = start_agent(&hsm, &[], &config, PIN)?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(20))?;
    let roaming = listed
        .iter()
        .find(|l| l.ends_with("roams: p256-key"))
        .cloned()
        .unwrap_or_default();
    // The configured module asks for the PIN through askpass when signing.
    sign_and_verify(&agent, &roaming, "before")?;

    hsm.delete_token("roams")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(20))?;
    assert!(listed[0].ends_with("stays: p384-key"), "{listed:?}");
    assert!(agent.log_text().contains("PKCS#11 token removed"));

    hsm.token("roams", &[KeyKind::P256])?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(20))?;
    let back = listed
        .iter()
        .find(|l| l.ends_with("roams: p256-key"))
        .cloned()
        .unwrap_or_default();
    // A new token with a new key: it signs after a new login.
    assert_ne!(back, roaming);
    sign_and_verify(&agent, &back, "after")?;
    let stays = listed
        .iter()
        .find(|l| l.ends_with("stays: p384-key"))
        .cloned()
        .unwrap_or_default();
    sign_and_verify(&agent, &stays, "other")?;
    Ok(())
}

#[test]
fn a_token_made_while_a_signature_is_in_flight_does_not_fail_it() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("signs", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new()
        .prefix("pkcs11-modules")
        .tempdir()?;
    // C_Sign takes 5 s: a token is made while a signature is in it.
    let slow = build_shim(modules.path(), Shim::Slow(5000), &hsm)?;
    let config = format!(
        "[pkcs11]\npoll_interval_ms = 200\n[[pkcs11.modules]]\npath = \"{}\"\n",
        slow.display()
    );
    let mut agent = start_agent(&hsm, &[], &config, PIN)?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(20))?;
    // Logged in by a first signature, so the next one is all C_Sign.
    sign_and_verify(&agent, &listed[0], "first")?;

    let public = agent.dir().join("held.pub");
    std::fs::write(&public, format!("{}\n", listed[0]))?;
    let message = agent.dir().join("held.txt");
    std::fs::write(&message, "message\n")?;
    let mut held = sign_file(agent.command("ssh-keygen"), &public, &message)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1000));
    // SoftHSM sees a new token only when initialized anew: the agent's
    // scan finds it and starts the module afresh, with this signature in C_Sign.
    hsm.token("plugged", &[])?;
    let rescanned = wait_for(Duration::from_secs(3), || {
        agent.log_text().contains("initializing it anew")
    });
    assert!(rescanned, "{}", agent.log_text());
    assert!(
        held.try_wait()?.is_none(),
        "the signature ended before the scan"
    );
    let output = held.wait_with_output()?;
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(!log.contains("crashed"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("PKCS#11 token present") && l.contains("plugged")),
        "{log}"
    );
    // The old helper ended with its last signature; the new one signs.
    let one = wait_for(Duration::from_secs(5), || {
        helpers(&agent).is_ok_and(|running| running.len() == 1)
    });
    assert!(one, "{:?}", helpers(&agent)?);
    sign_and_verify(&agent, &listed[0], "after")?;
    assert!(agent.alive());
    Ok(())
}
