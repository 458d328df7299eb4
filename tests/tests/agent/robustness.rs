use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;

use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::wire::{RawClient, FAILURE, IDENTITIES_ANSWER};
use token_agent_e2e::{check, is_root, sign_file, stdout};

/// An agent holding one key, for tests that need something to list.
fn agent_with_key() -> anyhow::Result<Agent> {
    let agent = Agent::start(AgentOptions::default())?;
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "resilient")?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    Ok(agent)
}

fn lists_one_key(agent: &Agent) -> bool {
    agent.listed().is_ok_and(|keys| keys.len() == 1)
}

#[test]
fn unknown_and_malformed_messages_get_failure() -> anyhow::Result<()> {
    let agent = agent_with_key()?;
    let mut client = RawClient::connect(agent.socket())?;
    // Unknown message type.
    assert_eq!(client.request(&[200])?, Some(vec![FAILURE]));
    // An empty message.
    assert_eq!(client.request(&[])?, Some(vec![FAILURE]));
    // A sign request whose key blob claims 4 GiB.
    assert_eq!(
        client.request(&[13, 0xff, 0xff, 0xff, 0xff, 0, 0])?,
        Some(vec![FAILURE])
    );
    // A valid request with trailing garbage.
    assert_eq!(client.request(&[11, 0xde, 0xad])?, Some(vec![FAILURE]));
    // An add request with a truncated key.
    assert_eq!(
        client.request(&[17, 0, 0, 0, 11, b's', b's', b'h', b'-'])?,
        Some(vec![FAILURE])
    );
    // The same connection still works.
    let reply = client.request(&[11])?.unwrap_or_default();
    assert_eq!(reply.first(), Some(&IDENTITIES_ANSWER));
    assert_eq!(&reply[1..5], &[0, 0, 0, 1]);
    Ok(())
}

#[test]
fn a_huge_length_closes_only_that_connection() -> anyhow::Result<()> {
    let mut agent = agent_with_key()?;
    let mut other = RawClient::connect(agent.socket())?;
    let mut hostile = RawClient::connect(agent.socket())?;
    hostile.send_raw(&[0xff, 0xff, 0xff, 0xff, 11])?;
    assert_eq!(
        hostile.receive()?,
        None,
        "a 4 GiB frame must close the connection"
    );
    let reply = other.request(&[11])?.unwrap_or_default();
    assert_eq!(reply.first(), Some(&IDENTITIES_ANSWER));
    assert!(lists_one_key(&agent));
    assert!(agent.alive());
    assert!(agent.log_text().contains("oversized message"));
    Ok(())
}

#[test]
fn garbage_streams_do_not_disturb_other_clients() -> anyhow::Result<()> {
    let mut agent = agent_with_key()?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..50 {
        let mut hostile = RawClient::connect(agent.socket())?;
        let garbage: Vec<u8> = (0..512)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let _ = hostile.send_raw(&garbage);
        drop(hostile);
    }
    assert!(lists_one_key(&agent));
    assert!(agent.alive());
    Ok(())
}

#[test]
fn two_clients_sign_at_once() -> anyhow::Result<()> {
    let agent = agent_with_key()?;
    let public = agent.dir().join("id.pub");
    std::fs::remove_file(agent.dir().join("id"))?;
    let signers: Vec<_> = (0..2)
        .map(|i| {
            let message = agent.dir().join(format!("m{i}"));
            std::fs::write(&message, format!("message {i}"))?;
            Ok(sign_file(agent.command("ssh-keygen"), &public, &message).spawn()?)
        })
        .collect::<anyhow::Result<_>>()?;
    for signer in signers {
        assert!(signer.wait_with_output()?.status.success());
    }
    assert!(agent.dir().join("m0.sig").exists() && agent.dir().join("m1.sig").exists());
    Ok(())
}

#[test]
fn a_thousand_connections_at_once_do_not_end_the_agent() -> anyhow::Result<()> {
    // This test process needs the descriptors too.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;

    let mut agent = agent_with_key()?;
    let mut held = Vec::new();
    for _ in 0..1000 {
        match UnixStream::connect(agent.socket()) {
            Ok(stream) => held.push(stream),
            // The listen backlog can fill faster than the agent accepts; that
            // is the kernel's answer, not the agent dying.
            Err(err) if err.raw_os_error() == Some(nix::libc::EAGAIN) => {}
            Err(err) => return Err(err.into()),
        }
    }
    assert!(held.len() >= 900, "only {} connections opened", held.len());
    assert!(lists_one_key(&agent), "{}", agent.log_text());
    drop(held);
    assert!(lists_one_key(&agent));
    assert!(agent.alive());
    Ok(())
}

#[test]
fn another_uid_is_refused() -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("SKIPPED another_uid_is_refused: needs root to run a client as another user");
        return Ok(());
    }
    let mut agent = agent_with_key()?;
    // Open the file permissions so only the agent's own check stands in the way.
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(agent.socket(), std::fs::Permissions::from_mode(0o777))?;
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "ssh-add",
            "-l",
        ])
        .env("SSH_AUTH_SOCK", agent.socket())
        .output()?;
    assert!(!output.status.success(), "{}", stdout(&output));
    assert!(!stdout(&output).contains("resilient"));
    assert!(agent
        .log_text()
        .contains("refusing a connection from another user"));
    assert!(lists_one_key(&agent));
    assert!(agent.alive());
    Ok(())
}

#[test]
fn socket_is_private() -> anyhow::Result<()> {
    // The default (~/.ssh/agent/s.*) and -T ($TMPDIR/ssh-*/agent.*).
    for temp_dir in [false, true] {
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(token_agent_e2e::agent_binary()?);
        command.arg("-s");
        if temp_dir {
            command.arg("-T");
        }
        let output = command
            .env("HOME", dir.path())
            .env("TMPDIR", dir.path())
            .env("XDG_STATE_HOME", dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .output()?;
        let text = stdout(&check(output, "token-agent -s")?);
        let socket = text
            .split("SSH_AUTH_SOCK=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap_or_default()
            .to_owned();
        let pid: i32 = text
            .split("SSH_AGENT_PID=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap_or_default()
            .parse()?;
        let socket_mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
        let parent = std::path::Path::new(&socket).parent().unwrap_or(dir.path());
        let dir_mode = std::fs::metadata(parent)?.permissions().mode() & 0o777;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        assert_eq!(socket_mode, 0o600);
        assert_eq!(dir_mode, 0o700);
        // The agent removes its socket, and the directory only when it made it for itself.
        let gone = if temp_dir {
            parent
        } else {
            std::path::Path::new(&socket)
        };
        assert!(token_agent_e2e::wait_for(
            std::time::Duration::from_secs(10),
            || !gone.exists()
        ));
        assert_eq!(parent.exists(), !temp_dir);
    }
    Ok(())
}
