use std::path::Path;
use std::time::Duration;

use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::bench::sign_request;
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::wire::{
    session_bind, unverifiable_session_bind, RawClient, EXTENSION_FAILURE, FAILURE, SIGN_RESPONSE,
    SUCCESS,
};
use token_agent_e2e::{check, stdout, test_binary};

/// A key in the agent, a jump host and a target host on loopback that both
/// take it, and a known_hosts file that names them bastion.test and db.test.
struct TwoHops {
    agent: Agent,
    jump: Sshd,
    target: Sshd,
    _names: tempfile::TempDir,
}

fn two_hops(forwarding: &str, env: Vec<(String, String)>) -> anyhow::Result<TwoHops> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("id");
    keygen(&key, "ed25519", "fwd-key")?;
    let authorized = std::fs::read_to_string(key.with_extension("pub"))?;
    let jump = Sshd::start(&authorized, None)?;
    let target = Sshd::start(&authorized, None)?;
    let names = dir.path().join("names_known_hosts");
    std::fs::write(
        &names,
        format!(
            "bastion.test {}\ndb.test {}\n",
            jump.host_public(),
            target.host_public()
        ),
    )?;
    let agent = Agent::start(AgentOptions {
        env,
        config: Some(format!(
            "[forwarding]\nknown_hosts = [\"{}\"]\n{forwarding}",
            names.display()
        )),
        ..AgentOptions::default()
    })?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    // Only the agent can sign from here on.
    std::fs::remove_file(&key)?;
    Ok(TwoHops {
        agent,
        jump,
        target,
        _names: dir,
    })
}

/// A scripted pinentry answering `script`, logging to the returned path.
fn pinentry(
    dir: &Path,
    script: &str,
) -> anyhow::Result<(Vec<(String, String)>, std::path::PathBuf)> {
    let script_file = dir.join("pinentry-script");
    std::fs::write(&script_file, script)?;
    let log = dir.join("pinentry.log");
    Ok((
        vec![
            (
                "PINENTRY_PROGRAM".into(),
                test_binary("scripted-pinentry")?.display().to_string(),
            ),
            (
                "SCRIPTED_PINENTRY_SCRIPT".into(),
                script_file.display().to_string(),
            ),
            ("SCRIPTED_PINENTRY_LOG".into(), log.display().to_string()),
            ("DISPLAY".into(), ":0".into()),
        ],
        log,
    ))
}

#[test]
fn issue_15_refuse_refuses_the_forwarded_signature_and_still_signs_locally() -> anyhow::Result<()> {
    let hops = two_hops("policy = \"refuse\"\n", Vec::new())?;
    let local = hops.jump.login(&hops.agent)?;
    hops.jump.ensure_logged_in(&local, &hops.agent.log_text())?;
    let forwarded = hops.jump.login_forwarded_to(&hops.target, &hops.agent)?;
    assert!(
        !stdout(&forwarded).contains("logged-in"),
        "the forwarded login got in\n{}",
        hops.agent.log_text()
    );
    let refusal = hops.agent.last_refusal()?;
    assert_eq!(refusal["reason"], "forwarding", "{refusal:#}");
    let message = refusal["message"].as_str().unwrap_or("");
    assert!(
        message.contains("bastion.test asked to use key fwd-key")
            && message.contains("to log in to db.test as "),
        "{message}"
    );
    Ok(())
}

#[test]
fn issue_15_confirm_asks_with_the_host_chain_and_honours_the_answer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (env, log) = pinentry(dir.path(), "confirm yes\nconfirm no\n")?;
    let hops = two_hops("policy = \"confirm\"\n", env)?;
    // A local login is not forwarded use: nothing is asked.
    let local = hops.jump.login(&hops.agent)?;
    hops.jump.ensure_logged_in(&local, &hops.agent.log_text())?;
    assert!(!log.exists(), "a local login was asked about");

    let yes = hops.jump.login_forwarded_to(&hops.target, &hops.agent)?;
    hops.target.ensure_logged_in(&yes, &hops.agent.log_text())?;
    let asked = std::fs::read_to_string(&log)?;
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
        .map(|u| u.name)
        .unwrap_or_default();
    assert!(
        asked.contains(&format!(
            "SETDESC bastion.test wants to use key fwd-key to log in to db.test as {user}."
        )),
        "{asked}"
    );
    let no = hops.jump.login_forwarded_to(&hops.target, &hops.agent)?;
    assert!(!stdout(&no).contains("logged-in"), "a no let it in");
    assert_eq!(std::fs::read_to_string(&log)?.matches("CONFIRM").count(), 2);
    Ok(())
}

#[test]
fn issue_15_a_remembered_yes_expires() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (env, log) = pinentry(dir.path(), "confirm yes\n")?;
    let hops = two_hops("policy = \"confirm\"\nconfirm_cache_seconds = 4\n", env)?;
    for _ in 0..2 {
        let login = hops.jump.login_forwarded_to(&hops.target, &hops.agent)?;
        hops.target
            .ensure_logged_in(&login, &hops.agent.log_text())?;
    }
    assert_eq!(
        std::fs::read_to_string(&log)?.matches("CONFIRM").count(),
        1,
        "the second login within the cache time was asked again"
    );
    std::thread::sleep(Duration::from_secs(5));
    // Asked again (the script has no answer left: a cancel, so refused).
    let late = hops.jump.login_forwarded_to(&hops.target, &hops.agent)?;
    assert!(!stdout(&late).contains("logged-in"));
    assert_eq!(std::fs::read_to_string(&log)?.matches("CONFIRM").count(), 2);
    Ok(())
}

/// ssh goes on when the agent cannot verify its session bind (an unknown
/// host key type, say), so a remote host's connection can start with a bind
/// that failed: it counts as forwarded, and the remote's own bind after it
/// does not make it a local client.
#[test]
fn a_connection_whose_first_bind_did_not_verify_counts_as_forwarded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("id");
    keygen(&key, "ed25519", "fwd-key")?;
    let agent = Agent::start(AgentOptions {
        config: Some("[forwarding]\npolicy = \"refuse\"\n".into()),
        ..AgentOptions::default()
    })?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    let public = ssh_key::PublicKey::read_openssh_file(&key.with_extension("pub"))?;
    let request = sign_request(&public.to_bytes()?, b"data", 0);

    let mut local = RawClient::connect(agent.socket())?;
    let reply = local.request(&request)?.unwrap_or_default();
    assert_eq!(reply.first(), Some(&SIGN_RESPONSE));

    let mut remote = RawClient::connect(agent.socket())?;
    let reply = remote.request(&unverifiable_session_bind(agent.dir(), true)?)?;
    assert_eq!(reply.as_deref(), Some(&[EXTENSION_FAILURE][..]));
    let reply = remote.request(&session_bind(agent.dir(), false)?)?;
    assert_eq!(reply.as_deref(), Some(&[SUCCESS][..]));
    let reply = remote.request(&request)?;
    assert_eq!(reply.as_deref(), Some(&[FAILURE][..]));
    let refusal = agent.last_refusal()?;
    assert_eq!(refusal["reason"], "forwarding", "{refusal:#}");
    let message = refusal["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("a host whose session bind did not verify asked to use key fwd-key")
            && message.contains("to sign data for SHA256:"),
        "{message}"
    );
    Ok(())
}
