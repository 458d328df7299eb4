use std::path::Path;
use std::process::Command;

use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::openssh::{ensure_only_allowed, restrict_to_one_of_two, Sshd};
use token_agent_e2e::{check, sign_file};

/// Signs `message` with the agent's key for `public` and verifies it with ssh-keygen.
fn sign_and_verify(agent: &Agent, public: &Path, message: &Path) -> anyhow::Result<()> {
    check(
        sign_file(agent.command("ssh-keygen"), public, message).output()?,
        "ssh-keygen -Y sign",
    )?;
    let signers = agent.dir().join("allowed_signers");
    let key = std::fs::read_to_string(public)?;
    std::fs::write(&signers, format!("tester {}", key.trim()))?;
    let verify = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "file", "-I", "tester", "-f"])
        .arg(&signers)
        .arg("-s")
        .arg(message.with_extension("txt.sig"))
        .stdin(std::fs::File::open(message)?)
        .output()?;
    check(verify, "ssh-keygen -Y verify")?;
    Ok(())
}

#[test]
fn ssh_keygen_signatures_verify_for_every_key_type() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let message = agent.dir().join("message.txt");
    std::fs::write(&message, "sign me\n")?;
    for kind in ["ed25519", "ecdsa-256", "ecdsa-384", "ecdsa-521", "rsa-2048"] {
        let key = agent.dir().join(format!("id_{kind}"));
        keygen(&key, kind, kind)?;
        check(agent.ssh_add([&key])?, "ssh-add")?;
        // Only the public half stays on disk: ssh-keygen must use the agent.
        std::fs::remove_file(&key)?;
        sign_and_verify(&agent, &key.with_extension("pub"), &message)?;
        std::fs::remove_file(message.with_extension("txt.sig"))?;
    }
    let log = agent.log_text();
    assert_eq!(log.matches(" signed ").count(), 5, "{log}");
    assert!(log.contains(" exe=/usr/bin/ssh-keygen "), "{log}");
    Ok(())
}

#[test]
fn a_client_named_to_forge_a_log_line_is_logged_on_one_line() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "forgery")?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    std::fs::remove_file(&key)?;
    // A copy of ssh-keygen whose name ends the audit line and starts one.
    let forged = "2026-12-07T12:00:00.000000Z  INFO token_agent_server::session: signed";
    let forger = agent.dir().join(format!("ssh-keygen\n{forged}"));
    std::fs::copy("/usr/bin/ssh-keygen", &forger)?;
    let message = agent.dir().join("message.txt");
    std::fs::write(&message, "sign me\n")?;
    check(
        sign_file(agent.command(&forger), key.with_extension("pub"), &message).output()?,
        "ssh-keygen -Y sign",
    )?;
    assert!(
        agent.log_shows(&format!("client=ssh-keygen\\n{forged}")),
        "{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(!log.lines().any(|line| line.starts_with(forged)), "{log}");
    Ok(())
}

#[test]
fn login_to_sshd_with_plain_keys() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let mut authorized = String::new();
    for kind in ["ed25519", "rsa-3072"] {
        let key = agent.dir().join(format!("id_{kind}"));
        keygen(&key, kind, kind)?;
        check(agent.ssh_add([&key])?, "ssh-add")?;
        authorized.push_str(&std::fs::read_to_string(key.with_extension("pub"))?);
    }
    // Only the RSA key is authorized for the second server: the login signs
    // with rsa-sha2-256 or rsa-sha2-512 through the agent.
    let sshd = Sshd::start(&authorized, None)?;
    let login = sshd.login(&agent)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    let rsa_only = authorized.lines().nth(1).unwrap_or_default().to_owned();
    let sshd_rsa = Sshd::start(&rsa_only, None)?;
    let login = sshd_rsa.login(&agent)?;
    sshd_rsa.ensure_logged_in(&login, &agent.log_text())?;
    // The audit line follows the answer.
    assert!(
        agent.log_shows("algorithm=\"rsa-sha2-"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn login_to_sshd_with_a_certificate() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let ca = agent.dir().join("user_ca");
    keygen(&ca, "ed25519", "user ca")?;
    let key = agent.dir().join("id");
    keygen(&key, "ecdsa-384", "certified")?;
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into());
    check(
        Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", "cert-login", "-n", &user, "-V", "+1h"])
            .arg(key.with_extension("pub"))
            .output()?,
        "ssh-keygen -s",
    )?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    // No authorized_keys entry: only the certificate can get in.
    let sshd = Sshd::start("", Some(&ca.with_extension("pub")))?;
    let login = sshd.login(&agent)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    assert!(
        sshd.log_text().contains("cert-login"),
        "{}",
        sshd.log_text()
    );
    Ok(())
}

#[test]
fn a_destination_restricted_key_signs_only_for_its_host() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "restricted")?;
    let (allowed, other) = restrict_to_one_of_two(&agent, &key, agent.dir())?;
    // Only the agent can sign from here on.
    std::fs::remove_file(&key)?;
    // Local use still lists the key.
    assert_eq!(agent.listed()?.len(), 1);

    ensure_only_allowed(&allowed, &other, &agent)?;
    // Signing arbitrary data locally (no session bind) is refused too.
    let message = agent.dir().join("message.txt");
    std::fs::write(&message, "data")?;
    let signed = sign_file(
        agent.command("ssh-keygen"),
        key.with_extension("pub"),
        &message,
    )
    .output()?;
    assert!(!signed.status.success() || !message.with_extension("txt.sig").exists());
    assert!(agent.log_shows("destination"), "{}", agent.log_text());
    Ok(())
}
