use std::time::Duration;

use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};

use crate::{sign_and_verify, start_agent, wait_listed};

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
