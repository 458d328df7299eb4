//! Issue 16: other agents behind token-agent. Real upstreams: OpenSSH's
//! ssh-agent (keys with -c and -h) and gpg-agent --enable-ssh-support with a
//! key in sshcontrol; logins to a loopback sshd through token-agent.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::ensure;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::gpg::GpgAgent;
use token_agent_e2e::openssh::{ensure_only_allowed, restrict_to_one_of_two, OpenSsh, Sshd};
use token_agent_e2e::{check, sign_file, stderr, stdout, wait_for, write_script};

/// token-agent with `upstreams` behind it (through -A) and `config`.
fn token_agent(upstreams: &[&Path], config: &str) -> anyhow::Result<Agent> {
    let mut args = Vec::new();
    for upstream in upstreams {
        args.push("-A".to_owned());
        args.push(upstream.display().to_string());
    }
    Agent::start(AgentOptions {
        args,
        config: Some(config.to_owned()),
        ..AgentOptions::default()
    })
}

/// A fresh key in `dir`: its path and public key line.
fn key(dir: &Path, name: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
    let path = dir.join(name);
    keygen(&path, "ed25519", name)?;
    let public = std::fs::read_to_string(path.with_extension("pub"))?;
    Ok((path, public.trim().to_owned()))
}

fn comments(agent: &Agent) -> anyhow::Result<Vec<String>> {
    Ok(agent
        .listed()?
        .iter()
        .map(|line| line.split_whitespace().nth(2).unwrap_or("").to_owned())
        .collect())
}

/// The keys `ssh -v` says it will try, in order (their comments).
fn attempted(login: &Output) -> Vec<String> {
    stderr(login)
        .lines()
        .filter_map(|line| line.strip_prefix("debug1: Will attempt key: "))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn issue_16_openssh_agent_keys_list_sign_and_log_in_through_token_agent() -> anyhow::Result<()> {
    let upstream = Agent::start_openssh(&[])?;
    let (shared, _) = key(upstream.dir(), "shared")?;
    let (theirs, theirs_public) = key(upstream.dir(), "theirs")?;
    check(upstream.ssh_add([&theirs])?, "ssh-add to ssh-agent")?;
    check(upstream.ssh_add([&shared])?, "ssh-add to ssh-agent")?;
    let agent = token_agent(&[upstream.socket()], "")?;
    let (own, _) = key(agent.dir(), "own")?;
    check(agent.ssh_add([&own])?, "ssh-add to token-agent")?;
    check(agent.ssh_add([&shared])?, "ssh-add to token-agent")?;
    // Own keys first, then the upstream's, without the one both hold.
    assert_eq!(comments(&agent)?, ["own", "shared", "theirs"]);

    // A login with the upstream's key, and a signature checked by ssh-keygen.
    let sshd = Sshd::start(&format!("{theirs_public}\n"), None)?;
    let login = sshd.login(&agent)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    ensure!(
        agent.log_text().contains("signed through upstream agent"),
        "{}",
        agent.log_text()
    );
    let message = agent.dir().join("message");
    std::fs::write(&message, "through token-agent")?;
    check(
        sign_file(
            agent.command("ssh-keygen"),
            theirs.with_extension("pub"),
            &message,
        )
        .output()?,
        "ssh-keygen -Y sign",
    )?;
    let allowed = agent.dir().join("allowed_signers");
    std::fs::write(&allowed, format!("theirs {theirs_public}\n"))?;
    check(
        std::process::Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "file", "-I", "theirs", "-f"])
            .arg(&allowed)
            .arg("-s")
            .arg(message.with_extension("sig"))
            .stdin(std::fs::File::open(&message)?)
            .output()?,
        "ssh-keygen -Y verify",
    )?;

    // ssh-add -d of an upstream key removes it there; a key added through
    // token-agent stays with token-agent.
    check(
        agent.ssh_add(["-d".as_ref(), theirs.with_extension("pub").as_os_str()])?,
        "ssh-add -d upstream key",
    )?;
    assert_eq!(comments(&upstream)?, ["shared"]);
    let (added, _) = key(agent.dir(), "added")?;
    check(
        agent.ssh_add(["-c".as_ref(), added.as_os_str()])?,
        "ssh-add -c",
    )?;
    assert_eq!(comments(&upstream)?, ["shared"]);
    assert_eq!(comments(&agent)?, ["own", "shared", "added"]);

    // Locked, token-agent serves no key, its upstream's included; the
    // upstream itself is not locked.
    let askpass = agent.dir().join("askpass");
    write_script(&askpass, "echo lock-password")?;
    for flag in ["-x", "-X"] {
        let output = agent
            .command("ssh-add")
            .arg(flag)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .output()?;
        check(output, &format!("ssh-add {flag}"))?;
        if flag == "-x" {
            assert!(comments(&agent)?.is_empty());
            assert_eq!(comments(&upstream)?, ["shared"]);
            let login = sshd.login(&agent)?;
            assert!(!stdout(&login).contains("logged-in"));
        }
    }

    // ssh-add -D empties both.
    check(agent.ssh_add(["-D"])?, "ssh-add -D")?;
    assert!(comments(&agent)?.is_empty(), "{:?}", comments(&agent)?);
    assert!(comments(&upstream)?.is_empty());
    Ok(())
}

#[test]
fn issue_16_the_upstreams_confirm_and_destination_constraints_still_apply() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The upstream's own confirmation, answered through a file.
    let answer = dir.path().join("answer");
    let asked = dir.path().join("asked");
    let askpass = dir.path().join("askpass");
    write_script(
        &askpass,
        &format!(
            "echo \"$1\" >> {asked}\nanswer=$(cat {answer})\n[ \"$answer\" = yes ] || exit 1\necho yes",
            asked = asked.display(),
            answer = answer.display()
        ),
    )?;
    let upstream = Agent::start_openssh(&[
        ("SSH_ASKPASS".into(), askpass.display().to_string()),
        ("SSH_ASKPASS_REQUIRE".into(), "force".into()),
        ("DISPLAY".into(), ":0".into()),
    ])?;
    let (confirmed, confirmed_public) = key(dir.path(), "confirmed")?;
    check(
        upstream.ssh_add(["-c".as_ref(), confirmed.as_os_str()])?,
        "ssh-add -c",
    )?;
    let agent = token_agent(&[upstream.socket()], "")?;

    let sshd = Sshd::start(&format!("{confirmed_public}\n"), None)?;
    std::fs::write(&answer, "no")?;
    let login = sshd.login(&agent)?;
    assert!(
        !stdout(&login).contains("logged-in"),
        "declined, yet logged in"
    );
    ensure!(asked.exists(), "the upstream never asked");
    assert!(agent.log_text().contains("refused"), "{}", agent.log_text());
    std::fs::write(&answer, "yes")?;
    let login = sshd.login(&agent)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;

    // A key the upstream restricts to one host (ssh-add -h): it sees the
    // session binds of ssh's connection to token-agent, so it signs for
    // that host only. (Without the binds it would take the connection for
    // local use and sign for any host.)
    let (restricted, _) = key(dir.path(), "restricted")?;
    let (allowed, other) = restrict_to_one_of_two(&upstream, &restricted, dir.path())?;
    ensure_only_allowed(&allowed, &other, &agent)?;
    Ok(())
}

#[test]
fn issue_16_gpg_agent_ssh_keys_through_token_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let gpg = GpgAgent::start(&dir.path().join("gnupg"))?;
    let public = gpg.add_ssh_key("gpgcard")?;
    let agent = token_agent(&[&gpg.socket], "")?;
    let (own, _) = key(agent.dir(), "own")?;
    check(agent.ssh_add([&own])?, "ssh-add")?;
    let listed = agent.listed()?;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let blob = |line: &str| line.split_whitespace().nth(1).unwrap_or("").to_owned();
    assert_eq!(blob(&listed[1]), blob(&public));

    let sshd = Sshd::start(&format!("{public}\n"), None)?;
    let login = sshd.login(&agent)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    // And with OpenSSH 10's ssh, which binds its sessions: gpg-agent
    // refuses the bind it does not know, and still signs.
    let login = sshd.login_with(&OpenSsh::v10()?, &agent, &[])?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    Ok(())
}

#[test]
fn issue_16_an_upstream_that_stops_or_dies_never_holds_up_listing() -> anyhow::Result<()> {
    let mut upstream = Agent::start_openssh(&[])?;
    let (theirs, _) = key(upstream.dir(), "theirs")?;
    check(upstream.ssh_add([&theirs])?, "ssh-add")?;
    let socket = upstream.socket().to_owned();
    let agent = token_agent(
        &[&socket],
        "[upstreams]\nlist_timeout_ms = 200\nkeep_list_seconds = 600\n",
    )?;
    let (own, _) = key(agent.dir(), "own")?;
    check(agent.ssh_add([&own])?, "ssh-add")?;
    assert_eq!(comments(&agent)?, ["own", "theirs"]);
    let state = |agent: &Agent| -> anyhow::Result<String> {
        let status = agent.status()?;
        Ok(status["upstreams"][0]["state"]
            .as_str()
            .unwrap_or("")
            .to_owned())
    };
    assert_eq!(state(&agent)?, "answering");

    // Stopped: its last list is kept, and status says why.
    let pid = Pid::from_raw(i32::try_from(upstream.pid().unwrap_or(0))?);
    kill(pid, Signal::SIGSTOP)?;
    assert_eq!(comments(&agent)?, ["own", "theirs"]);
    assert_eq!(state(&agent)?, "not answering");
    let status = agent.status()?;
    assert!(
        status["upstreams"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("within 200 ms"),
        "{status}"
    );
    let shown = token_agent_e2e::stdout(&check(
        agent
            .command(token_agent_e2e::agent_binary()?)
            .args(["status"])
            .output()?,
        "token-agent status",
    )?);
    assert!(shown.contains("not answering"), "{shown}");
    // Its own keys still sign meanwhile.
    let message = agent.dir().join("message");
    std::fs::write(&message, "while the upstream is stopped")?;
    check(
        sign_file(
            agent.command("ssh-keygen"),
            own.with_extension("pub"),
            &message,
        )
        .output()?,
        "ssh-keygen -Y sign with an own key",
    )?;
    // Resumed, it answers again.
    kill(pid, Signal::SIGCONT)?;
    ensure!(
        wait_for(Duration::from_secs(20), || state(&agent)
            .is_ok_and(|s| s == "answering")),
        "{}",
        agent.log_text()
    );

    // Dead: its keys go, and come back with a new agent on the same socket.
    upstream.stop()?;
    assert_eq!(comments(&agent)?, ["own"]);
    assert_eq!(state(&agent)?, "down");
    let replacement = Agent::start_openssh_with(&OpenSsh::system(), &[], &[])?;
    let (back, _) = key(replacement.dir(), "back")?;
    check(replacement.ssh_add([&back])?, "ssh-add")?;
    // The replacement listens elsewhere: put its socket where the old one was.
    std::fs::remove_file(&socket).ok();
    std::os::unix::fs::symlink(replacement.socket(), &socket)?;
    assert_eq!(comments(&agent)?, ["own", "back"]);
    assert_eq!(state(&agent)?, "answering");
    Ok(())
}

#[test]
fn issue_16_keys_added_with_add_to_go_to_the_upstream() -> anyhow::Result<()> {
    let upstream = Agent::start_openssh(&[])?;
    let config = format!(
        "[upstreams]\nadd_to = \"{}\"\n",
        upstream.socket().display()
    );
    let agent = token_agent(&[upstream.socket()], &config)?;
    // Keys given through token-agent land in the upstream, with the
    // lifetime they were given: "brief" expires there, "kept" stays.
    let (kept, _) = key(agent.dir(), "kept")?;
    let (brief, _) = key(agent.dir(), "brief")?;
    check(agent.ssh_add([&kept])?, "ssh-add through token-agent")?;
    check(
        agent.ssh_add(["-t".as_ref(), "1".as_ref(), brief.as_os_str()])?,
        "ssh-add -t 1 through token-agent",
    )?;
    assert_eq!(comments(&upstream)?, ["kept", "brief"]);
    ensure!(
        wait_for(Duration::from_secs(20), || comments(&upstream)
            .is_ok_and(|listed| listed == ["kept"])),
        "the lifetime did not reach the upstream: {:?}",
        comments(&upstream)?
    );
    assert_eq!(comments(&agent)?, ["kept"]);
    // An add_to that is not an upstream is an error at start.
    let refused = Agent::start(AgentOptions {
        config: Some("[upstreams]\nadd_to = \"/nonexistent/agent.sock\"\n".into()),
        ..AgentOptions::default()
    });
    let err = refused.expect_err("an add_to outside the upstreams started");
    assert!(
        format!("{err:#}").contains("not one of the upstream agents"),
        "{err:#}"
    );
    Ok(())
}

#[test]
fn issue_16_listing_rules_order_and_filter_keys_per_host() -> anyhow::Result<()> {
    let upstream = Agent::start_openssh(&[])?;
    let (theirs, _) = key(upstream.dir(), "theirs")?;
    check(upstream.ssh_add([&theirs])?, "ssh-add")?;
    let dir = tempfile::tempdir()?;
    let (own, _) = key(dir.path(), "own")?;
    // Authorized for neither key, so ssh goes through the whole list.
    let (_, stranger) = key(dir.path(), "stranger")?;
    let authorized = format!("{stranger}\n");
    let listed = Sshd::start(&authorized, None)?;
    let hashed = Sshd::start(&authorized, None)?;
    let unnamed = Sshd::start(&authorized, None)?;
    // known_hosts: "listed.test" plain, "hashed.test" hashed as
    // HashKnownHosts writes it (ssh-keygen -H).
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, format!("hashed.test {}\n", hashed.host_public()))?;
    check(
        std::process::Command::new("ssh-keygen")
            .arg("-H")
            .arg("-f")
            .arg(&known)
            .output()?,
        "ssh-keygen -H",
    )?;
    let hashed_line = std::fs::read_to_string(&known)?;
    ensure!(hashed_line.starts_with("|1|"), "{hashed_line}");
    std::fs::write(
        &known,
        format!("listed.test {}\n{hashed_line}", listed.host_public()),
    )?;
    let config = format!(
        "[forwarding]\nknown_hosts = [\"{known}\"]\n\n\
         [[listing]]\nhosts = [\"*.test\", \"!other.test\"]\nkeys = [\"backend:upstream\"]\n\n\
         [[listing]]\nhosts = [\"hashed.test\"]\nkeys = [\"upstream:*\", \"*\"]\n",
        known = known.display()
    );
    let agent = token_agent(&[upstream.socket()], &config)?;
    check(agent.ssh_add([&own])?, "ssh-add")?;
    // ssh-add -l: no rule without hosts, so everything, own keys first.
    assert_eq!(comments(&agent)?, ["own", "theirs"]);
    // listed.test matches the first rule: the upstream's key alone.
    let login = listed.run_with(&OpenSsh::system(), &agent, &["-v"], "true")?;
    assert_eq!(attempted(&login), ["theirs"], "{}", stderr(&login));
    // hashed.test is only known hashed: "*.test" cannot match a hashed
    // name, the literal host of the second rule does.
    let login = hashed.run_with(&OpenSsh::system(), &agent, &["-v"], "true")?;
    assert_eq!(attempted(&login), ["theirs", "own"], "{}", stderr(&login));
    // A host no rule names sees every key in the default order.
    let login = unnamed.run_with(&OpenSsh::system(), &agent, &["-v"], "true")?;
    assert_eq!(attempted(&login), ["own", "theirs"], "{}", stderr(&login));
    Ok(())
}

/// An upstream that lists more keys than an OpenSSH client takes in one
/// listing (2048) does not make the whole listing unreadable: its keys are
/// left out past the limit, and the agent's own keys are always listed.
#[test]
fn an_upstream_with_too_many_keys_leaves_the_agents_own_listed() -> anyhow::Result<()> {
    use ssh_encoding::Encode;
    use std::io::{Read, Write};

    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("crowded.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket)?;
    // 2048 distinct Ed25519 public keys (the most an upstream may list), as an agent lists them.
    let mut answer = vec![12u8];
    answer.extend_from_slice(&2048u32.to_be_bytes());
    for i in 0..2048u32 {
        let mut point = [0u8; 32];
        point[..4].copy_from_slice(&i.to_be_bytes());
        let key = ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(point));
        let mut blob = Vec::new();
        key.encode(&mut blob)?;
        token_agent_core::push_string(&mut answer, &blob);
        token_agent_core::push_string(&mut answer, format!("upstream-{i}").as_bytes());
    }
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut len = [0u8; 4];
                while stream.read_exact(&mut len).is_ok() {
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    if stream.read_exact(&mut body).is_err() {
                        return;
                    }
                    let reply = if body.first() == Some(&11) {
                        answer.clone()
                    } else {
                        vec![5]
                    };
                    let _ = stream.write_all(&(reply.len() as u32).to_be_bytes());
                    let _ = stream.write_all(&reply);
                }
            });
        }
    });
    let agent = token_agent(&[&socket], "")?;
    let (own, _) = key(dir.path(), "own-key")?;
    check(agent.ssh_add([&own])?, "ssh-add")?;
    let listed = check(agent.ssh_add(["-l"])?, "ssh-add -l")?;
    let lines = stdout(&listed);
    ensure!(
        lines.lines().count() == 2048,
        "{} keys",
        lines.lines().count()
    );
    ensure!(lines.contains("own-key"), "the agent's own key is missing");
    ensure!(agent.log_text().contains("the listing left out keys"));
    Ok(())
}

/// A client may sign with or remove an upstream's key without listing first,
/// as plain ssh-agent lets it: token-agent asks its upstreams who holds it.
#[test]
fn upstream_keys_sign_and_go_without_a_listing_first() -> anyhow::Result<()> {
    use token_agent_e2e::wire::{RawClient, SIGN_RESPONSE};

    let upstream = Agent::start_openssh(&[])?;
    let (theirs, _) = key(upstream.dir(), "theirs")?;
    check(upstream.ssh_add([&theirs])?, "ssh-add to ssh-agent")?;
    let public = ssh_key::PublicKey::read_openssh_file(&theirs.with_extension("pub"))?;
    let request = token_agent_e2e::bench::sign_request(&public.to_bytes()?, b"data", 0);

    let agent = token_agent(&[upstream.socket()], "")?;
    let mut client = RawClient::connect(agent.socket())?;
    let reply = client.request(&request)?.unwrap_or_default();
    ensure!(
        reply.first() == Some(&SIGN_RESPONSE),
        "{reply:?}\n{}",
        agent.log_text()
    );

    // A fresh agent, with no listing kept from before.
    let agent = token_agent(&[upstream.socket()], "")?;
    check(
        agent.ssh_add(["-d".as_ref(), theirs.with_extension("pub").as_os_str()])?,
        "ssh-add -d through token-agent",
    )?;
    ensure!(
        upstream.listed()?.is_empty(),
        "the upstream still holds the key"
    );
    Ok(())
}
