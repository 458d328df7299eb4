use std::path::Path;
use std::process::Command;
use std::time::Duration;

use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::bench::sign_request;
use token_agent_e2e::openssh::restrict_to_one_of_two;
use token_agent_e2e::wire::{self, RawClient};
use token_agent_e2e::{agent_binary, check, sign_file, stdout, wait_for, write_script};

/// The reason codes of the agent's kept refusals, oldest first.
fn reasons(agent: &Agent) -> anyhow::Result<Vec<String>> {
    Ok(agent.status()?["refusals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
        .collect())
}

/// A sign request for the key in `public` sent as it is (ssh-keygen would
/// not ask for a key the agent does not list); true when it was signed.
fn raw_sign(agent: &Agent, public: &Path) -> anyhow::Result<bool> {
    let blob = ssh_key::PublicKey::read_openssh_file(public)?.to_bytes()?;
    let mut client = RawClient::connect(agent.socket())?;
    client.send(&sign_request(&blob, b"data", 0))?;
    Ok(client.receive()?.unwrap_or_default().first() == Some(&wire::SIGN_RESPONSE))
}

fn try_sign(agent: &Agent, public: &Path) -> anyhow::Result<bool> {
    let message = agent.dir().join("message");
    std::fs::write(&message, "status")?;
    let _ = std::fs::remove_file(agent.dir().join("message.sig"));
    Ok(sign_file(agent.command("ssh-keygen"), public, &message)
        .output()?
        .status
        .success())
}

#[test]
fn issue_14_a_declined_confirmation_is_a_reason_with_a_notice() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let no = dir.path().join("askpass");
    write_script(&no, "exit 1")?;
    let noticed = dir.path().join("noticed");
    let agent = Agent::start(AgentOptions {
        env: vec![("SSH_ASKPASS".into(), no.display().to_string())],
        config: Some(format!(
            "[notice]\ncommand = 'printf \"%s|%s\" \"$TOKEN_AGENT_NOTICE_KIND\" \"$TOKEN_AGENT_NOTICE\" > {}'\n",
            noticed.display()
        )),
        ..AgentOptions::default()
    })?;
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "needs-a-yes")?;
    check(
        agent.ssh_add(["-c".as_ref(), key.as_os_str()])?,
        "ssh-add -c",
    )?;
    std::fs::remove_file(&key)?;
    assert!(!try_sign(&agent, &key.with_extension("pub"))?);
    let doc = agent.status()?;
    let refusal = &doc["refusals"][0];
    assert_eq!(refusal["reason"], "confirm-declined", "{doc:#}");
    assert_eq!(refusal["operation"], "sign");
    assert!(
        refusal["key"]
            .as_str()
            .unwrap_or("")
            .contains("needs-a-yes"),
        "{refusal}"
    );
    assert!(
        refusal["client"][0]
            .as_str()
            .unwrap_or("")
            .starts_with("ssh-keygen (pid "),
        "{refusal}"
    );
    assert_eq!(doc["keys"][0]["constraints"]["confirm"], true);
    assert!(
        agent.log_text().contains("reason=confirm-declined"),
        "{}",
        agent.log_text()
    );
    assert!(wait_for(Duration::from_secs(10), || noticed.exists()));
    let text = std::fs::read_to_string(&noticed)?;
    assert!(
        text.starts_with("refused|token-agent refused to sign: "),
        "{text}"
    );
    Ok(())
}

#[test]
fn issue_14_expired_locked_and_unknown_keys_have_their_reasons() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let short = agent.dir().join("short");
    keygen(&short, "ed25519", "short-lived")?;
    check(
        agent.ssh_add(["-t".as_ref(), "1".as_ref(), short.as_os_str()])?,
        "ssh-add -t 1",
    )?;
    // Only the agent can sign from here on (ssh-keygen -Y would use the file).
    std::fs::remove_file(&short)?;
    let lifetime = agent.status()?["keys"][0]["constraints"]["lifetime_left_seconds"].clone();
    assert!(lifetime.as_u64().is_some_and(|s| s <= 1), "{lifetime}");
    assert!(wait_for(Duration::from_secs(10), || agent
        .listed()
        .is_ok_and(|l| l.is_empty())));
    assert!(!raw_sign(&agent, &short.with_extension("pub"))?);

    let other = agent.dir().join("other");
    keygen(&other, "ed25519", "never-added")?;
    std::fs::remove_file(&other)?;
    assert!(!raw_sign(&agent, &other.with_extension("pub"))?);

    let kept = agent.dir().join("kept");
    keygen(&kept, "ecdsa-256", "kept")?;
    check(agent.ssh_add([&kept])?, "ssh-add")?;
    std::fs::remove_file(&kept)?;
    let password = agent.dir().join("pw");
    write_script(&password, "echo lock-pass")?;
    let lock = |flag: &str| -> anyhow::Result<()> {
        check(
            agent
                .command("ssh-add")
                .arg(flag)
                .env("SSH_ASKPASS", &password)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .output()?,
            &format!("ssh-add {flag}"),
        )?;
        Ok(())
    };
    assert!(raw_sign(&agent, &kept.with_extension("pub"))?);
    lock("-x")?;
    assert!(!raw_sign(&agent, &kept.with_extension("pub"))?);
    // A locked agent answers status too: locked, and no keys shown.
    let locked = agent.status()?;
    assert_eq!(locked["locked"], true);
    assert_eq!(locked["keys"].as_array().map(Vec::len), Some(0));
    lock("-X")?;
    assert_eq!(
        reasons(&agent)?,
        ["key-expired", "unknown-key", "locked"],
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn issue_14_a_destination_refusal_names_the_hop() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "restricted")?;
    let (_allowed, other) = restrict_to_one_of_two(&agent, &key, agent.dir())?;
    // A login elsewhere never sees the key: OpenSSH's agent hides it too.
    let login = other.login(&agent)?;
    assert!(!stdout(&login).contains("logged-in"));
    // A client bound to that other host that signs anyway is refused, and
    // the refusal names the hop.
    let mut client = RawClient::connect(agent.socket())?;
    client.send(&wire::session_bind(agent.dir(), false)?)?;
    assert_eq!(client.receive()?.unwrap_or_default(), [wire::SUCCESS]);
    let blob = ssh_key::PublicKey::read_openssh_file(&key.with_extension("pub"))?.to_bytes()?;
    client.send(&sign_request(&blob, b"not a user authentication", 0))?;
    assert_eq!(client.receive()?.unwrap_or_default(), [wire::FAILURE]);
    let doc = agent.status()?;
    assert_eq!(
        doc["keys"][0]["constraints"]["destinations"][0],
        "allowed.test"
    );
    let refusals = doc["refusals"].as_array().cloned().unwrap_or_default();
    let refusal = refusals
        .iter()
        .find(|r| r["reason"] == "destination")
        .ok_or_else(|| anyhow::anyhow!("no destination refusal in {doc:#}"))?;
    let bound = ssh_key::PublicKey::read_openssh_file(&agent.dir().join("host_key.pub"))?;
    let fingerprint = bound.fingerprint(ssh_key::HashAlg::Sha256).to_string();
    assert_eq!(refusal["destination"], fingerprint.as_str(), "{refusal}");
    assert!(refusal["message"]
        .as_str()
        .unwrap_or("")
        .contains("destination"));
    Ok(())
}
#[test]
fn issue_14_status_is_refused_on_a_forwarded_connection() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions::default())?;
    let mut request = vec![wire::EXTENSION];
    token_agent_core::push_string(&mut request, b"status@token-agent");
    let mut local = RawClient::connect(agent.socket())?;
    local.send(&request)?;
    assert_eq!(local.receive()?.unwrap_or_default().first(), Some(&29));
    // After a session bind the connection comes through ssh: no status.
    let mut forwarded = RawClient::connect(agent.socket())?;
    forwarded.send(&wire::session_bind(agent.dir(), true)?)?;
    assert_eq!(forwarded.receive()?.unwrap_or_default(), [wire::SUCCESS]);
    forwarded.send(&request)?;
    assert_eq!(forwarded.receive()?.unwrap_or_default(), [wire::FAILURE]);
    // And the human form says what it is talking to.
    let text = stdout(&check(
        Command::new(agent_binary()?)
            .arg("status")
            .env("SSH_AUTH_SOCK", agent.socket())
            .output()?,
        "token-agent status",
    )?);
    assert!(text.starts_with("token-agent "), "{text}");
    assert!(text.contains("Recent refusals:\n  none"), "{text}");
    Ok(())
}

#[test]
fn issue_14_status_against_another_agent_says_so() -> anyhow::Result<()> {
    let openssh = Agent::start_openssh(&[])?;
    let output = Command::new(agent_binary()?)
        .args(["status", "--socket"])
        .arg(openssh.socket())
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("is not token-agent"), "{text}");
    Ok(())
}

#[test]
fn issue_14_status_is_refused_to_root_for_another_users_agent() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // An agent of uid 65534 ("nobody"), in a directory that uid owns.
    let dir = tempfile::tempdir()?;
    nix::unistd::chown(
        dir.path(),
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let socket = dir.path().join("agent.sock");
    let as_nobody = |program: &Path| {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(program)
            .env("HOME", dir.path())
            .env_remove("SSH_AUTH_SOCK");
        command
    };
    let mut agent = as_nobody(&agent_binary()?)
        .args(["-D", "-U", "-a"])
        .arg(&socket)
        .args(["--config", "/dev/null"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = wait_for(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let result = (|| -> anyhow::Result<()> {
        anyhow::ensure!(started, "the agent of uid 65534 did not start");
        // Root may use the agent (as with OpenSSH), but not read its status.
        let output = Command::new(agent_binary()?)
            .args(["status", "--socket"])
            .arg(&socket)
            .output()?;
        assert_eq!(output.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("refused to tell"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Its own user may.
        let own = as_nobody(&agent_binary()?)
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .output()?;
        assert!(
            own.status.success(),
            "{}",
            String::from_utf8_lossy(&own.stderr)
        );
        Ok(())
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    result
}
