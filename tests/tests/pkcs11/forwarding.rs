use std::path::Path;
use std::time::Duration;

use token_agent_e2e::agent::keygen;
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
use token_agent_e2e::{check, stdout};

use crate::{add_provider, start_agent, wait_listed};

#[test]
fn issue_15_a_per_backend_rule_covers_token_keys() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("kate", &[KeyKind::P256])?;
    // Forwarded use: allowed by default, refused for every PKCS#11 key.
    let agent = start_agent(
        &hsm,
        &[],
        "[[forwarding.keys]]\nbackend = \"pkcs11\"\npolicy = \"refuse\"\n",
        "unused",
    )?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let token_line = wait_listed(&agent, 1, Duration::from_secs(5))?.remove(0);
    let software = agent.dir().join("id_software");
    keygen(&software, "ed25519", "software-key")?;
    check(agent.ssh_add([&software])?, "ssh-add")?;
    std::fs::remove_file(&software)?;
    let software_line = std::fs::read_to_string(software.with_extension("pub"))?;

    // Both hosts take the token key; the target takes the software key too.
    let jump = Sshd::start(&format!("{token_line}\n"), None)?;
    let token_only = Sshd::start(&format!("{token_line}\n"), None)?;
    let both = Sshd::start(&format!("{token_line}\n{software_line}"), None)?;
    let local = jump.login(&agent)?;
    jump.ensure_logged_in(&local, &agent.log_text())?;
    let refused = jump.login_forwarded_to(&token_only, &agent)?;
    assert!(
        !stdout(&refused).contains("logged-in"),
        "the token key was used over the forwarded agent\n{}",
        agent.log_text()
    );
    let allowed = jump.login_forwarded_to(&both, &agent)?;
    both.ensure_logged_in(&allowed, &agent.log_text())?;
    let reasons: Vec<String> = agent.status()?["refusals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        reasons.iter().all(|r| r == "forwarding") && !reasons.is_empty(),
        "{reasons:?}"
    );
    Ok(())
}
