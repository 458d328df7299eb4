use std::process::Command;

use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::openssh::{OpenSsh, Sshd};
use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
use token_agent_e2e::{check, stdout};

use crate::askpass;

/// `ssh-add FLAGS` of `openssh`, answering a PIN question with [`PIN`].
fn ssh_add(openssh: &OpenSsh, agent: &Agent, flags: &[&str]) -> anyhow::Result<String> {
    let output = agent
        .command(openssh.tool("ssh-add"))
        .args(flags)
        .env("SSH_ASKPASS", askpass(agent.dir(), PIN)?)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .output()?;
    Ok(stdout(&check(
        output,
        &format!("ssh-add {}", flags.join(" ")),
    )?))
}

/// The listed keys without their comments (the two agents word those
/// differently), in order.
fn listed(openssh: &OpenSsh, agent: &Agent) -> anyhow::Result<Vec<String>> {
    let output = agent.command(openssh.tool("ssh-add")).arg("-L").output()?;
    Ok(stdout(&output)
        .lines()
        .filter(|line| !line.starts_with("The agent has no identities"))
        .map(|line| {
            line.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect())
}

#[test]
fn issue_13_certificates_for_token_keys_as_openssh_10() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    let hsm = SoftHsm::new()?;
    hsm.token("ivan", &[KeyKind::P256, KeyKind::Rsa2048])?;
    let ours = Agent::start(AgentOptions {
        env: hsm.env(),
        ..AgentOptions::default()
    })?;
    let reference = Agent::start_openssh_with(&v10, &[], &hsm.env())?;

    // A user certificate for the token's P-256 key, signed by a CA sshd trusts.
    ssh_add(&v10, &ours, &["-s", MODULE])?;
    let plain = listed(&v10, &ours)?;
    assert_eq!(plain.len(), 2, "{plain:?}\n{}", ours.log_text());
    ssh_add(&v10, &ours, &["-e", MODULE])?;
    let dir = ours.dir();
    let p256 = plain
        .iter()
        .find(|line| line.starts_with("ecdsa-sha2-nistp256 "))
        .cloned()
        .unwrap_or_default();
    std::fs::write(dir.join("token-p256.pub"), format!("{p256} token\n"))?;
    let ca = dir.join("user_ca");
    check(
        Command::new(v10.tool("ssh-keygen"))
            .args(["-q", "-N", "", "-t", "ed25519", "-f"])
            .arg(&ca)
            .output()?,
        "ssh-keygen (CA)",
    )?;
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
        .map(|u| u.name)
        .unwrap_or_default();
    check(
        Command::new(v10.tool("ssh-keygen"))
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", "token-user", "-n", &user, "-V", "-5m:+1h"])
            .arg(dir.join("token-p256.pub"))
            .output()?,
        "ssh-keygen -s",
    )?;
    let cert = dir.join("token-p256-cert.pub");
    let cert_line = {
        let text = std::fs::read_to_string(&cert)?;
        text.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cert_arg = cert.display().to_string();
    // ssh-add sends every file it is named, certificate or not; a plain
    // key among them is skipped by both agents.
    let plain_arg = dir.join("token-p256.pub").display().to_string();
    let sshd = Sshd::start_with(&v10, "", Some(&ca.with_extension("pub")), "")?;

    for (flags, expected_len) in [(&["-s", MODULE][..], 3), (&["-C", "-s", MODULE][..], 1)] {
        let mut lists = Vec::new();
        for (name, agent) in [("token-agent", &ours), ("OpenSSH 10.5", &reference)] {
            let mut args = flags.to_vec();
            args.extend([&*cert_arg, &*plain_arg]);
            ssh_add(&v10, agent, &args)?;
            let keys = listed(&v10, agent)?;
            assert_eq!(keys.len(), expected_len, "{name} {flags:?}: {keys:?}");
            // The certificate is listed, right before its key when both are.
            let at = keys.iter().position(|k| k == &cert_line);
            assert!(at.is_some(), "{name}: no certificate in {keys:?}");
            if expected_len == 3 {
                assert_eq!(
                    keys.get(at.unwrap_or(0) + 1),
                    Some(&p256),
                    "{name}: {keys:?}"
                );
            }
            // The certificate logs in where only the CA is trusted.
            let login = sshd.login_with(&v10, agent, &[])?;
            sshd.ensure_logged_in(&login, &agent.log_text())
                .map_err(|err| err.context(format!("{name} {flags:?}: certificate login")))?;
            lists.push(keys);
            ssh_add(&v10, agent, &["-e", MODULE])?;
            assert!(
                listed(&v10, agent)?.is_empty(),
                "{name}: ssh-add -e left keys"
            );
        }
        let (mut a, mut b) = (lists[0].clone(), lists[1].clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "token-agent and OpenSSH 10.5 list different keys");
    }

    // ssh-add -d of the certificate alone keeps the token key.
    ssh_add(&v10, &ours, &["-s", MODULE, &cert_arg])?;
    let removed = ours
        .command(v10.tool("ssh-add"))
        .arg("-d")
        .arg(&cert)
        .output()?;
    check(removed, "ssh-add -d certificate")?;
    let keys = listed(&v10, &ours)?;
    assert!(!keys.contains(&cert_line), "{keys:?}");
    assert!(keys.contains(&p256), "{keys:?}");
    Ok(())
}
