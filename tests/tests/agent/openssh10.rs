//! OpenSSH 10.x parity, each check run side by side with OpenSSH 10.5's own
//! ssh-agent: post-quantum keys, host-certificate destinations, extensions.

use std::path::{Path, PathBuf};

use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::openssh::{OpenSsh, Sshd};
use token_agent_e2e::wire::{self, RawClient};
use token_agent_e2e::{check, sign_file, stderr, stdout};

/// token-agent and OpenSSH 10.5's ssh-agent, each on its own socket.
fn both_agents(v10: &OpenSsh) -> anyhow::Result<[(&'static str, Agent); 2]> {
    both_agents_with(v10, &[])
}

/// [`both_agents`], both started with the ssh-agent flags `args`.
fn both_agents_with(v10: &OpenSsh, args: &[&str]) -> anyhow::Result<[(&'static str, Agent); 2]> {
    Ok([
        (
            "token-agent",
            Agent::start(AgentOptions {
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                ..AgentOptions::default()
            })?,
        ),
        (
            "OpenSSH 10.5 ssh-agent",
            Agent::start_openssh_with(v10, args, &[])?,
        ),
    ])
}

/// `ssh-keygen -t KIND` of `openssh`, without a passphrase.
fn keygen(openssh: &OpenSsh, path: &Path, kind: &str, comment: &str) -> anyhow::Result<PathBuf> {
    check(
        std::process::Command::new(openssh.tool("ssh-keygen"))
            .args(["-q", "-N", "", "-t", kind, "-C", comment, "-f"])
            .arg(path)
            .output()?,
        &format!("ssh-keygen -t {kind}"),
    )?;
    Ok(path.with_extension("pub"))
}

/// An sshsig of a message made through `agent` with the key `public`
/// (`ssh-keygen -Y sign` of 10.5), checked by 10.5's `-Y check-novalidate`.
fn sign_and_check(v10: &OpenSsh, name: &str, agent: &Agent, public: &Path) -> anyhow::Result<()> {
    let message = agent.dir().join("message.txt");
    std::fs::write(&message, format!("signed with {}\n", public.display()))?;
    let _ = std::fs::remove_file(message.with_extension("txt.sig"));
    check(
        sign_file(agent.command(v10.tool("ssh-keygen")), public, &message).output()?,
        &format!("{name}: ssh-keygen -Y sign"),
    )?;
    check(
        std::process::Command::new(v10.tool("ssh-keygen"))
            .args(["-Y", "check-novalidate", "-n", "file", "-f"])
            .arg(public)
            .arg("-s")
            .arg(message.with_extension("txt.sig"))
            .stdin(std::fs::File::open(&message)?)
            .output()?,
        &format!("{name}: ssh-keygen -Y check-novalidate"),
    )?;
    Ok(())
}

fn user() -> anyhow::Result<String> {
    Ok(nix::unistd::User::from_uid(nix::unistd::geteuid())?
        .ok_or_else(|| anyhow::anyhow!("no passwd entry for the current user"))?
        .name)
}

#[test]
fn issue_13_mldsa44_ed25519_keys_add_list_sign_and_log_in() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    for (name, agent) in both_agents(&v10)? {
        let key = agent.dir().join("id_mldsa44_ed25519");
        let public = keygen(&v10, &key, "mldsa44-ed25519", "post-quantum")?;
        check(
            agent.command(v10.tool("ssh-add")).arg(&key).output()?,
            &format!("{name}: ssh-add"),
        )?;
        let listed = stdout(&check(
            agent.command(v10.tool("ssh-add")).arg("-L").output()?,
            "ssh-add -L",
        )?);
        let line = std::fs::read_to_string(&public)?;
        assert_eq!(listed.trim(), line.trim(), "{name}");
        let fingerprints = stdout(&agent.command(v10.tool("ssh-add")).arg("-l").output()?);
        assert!(
            fingerprints.contains("post-quantum"),
            "{name}: {fingerprints}"
        );

        // An sshsig made through the agent, checked by OpenSSH 10.5.
        sign_and_check(&v10, name, &agent, &public)?;

        // A login to OpenSSH 10.5's sshd that accepts the algorithm.
        let sshd = Sshd::start_with(
            &v10,
            &line,
            None,
            "PubkeyAcceptedAlgorithms +ssh-mldsa44-ed25519@openssh.com\n",
        )?;
        let login = sshd.login_with(
            &v10,
            &agent,
            &[
                "-o",
                "PubkeyAcceptedAlgorithms=+ssh-mldsa44-ed25519@openssh.com",
            ],
        )?;
        sshd.ensure_logged_in(&login, &agent.log_text())
            .map_err(|err| err.context(format!("{name}: logging in")))?;
    }
    Ok(())
}

#[test]
fn issue_13_mldsa44_ed25519_host_key_through_host_key_agent() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    for (name, agent) in both_agents(&v10)? {
        let host_key = agent.dir().join("host_mldsa");
        let host_public = keygen(&v10, &host_key, "mldsa44-ed25519", "host")?;
        check(
            agent.command(v10.tool("ssh-add")).arg(&host_key).output()?,
            "ssh-add the host key",
        )?;
        // Only the public half is on disk for sshd: it signs through the agent.
        std::fs::remove_file(&host_key)?;
        let user_key = agent.dir().join("id_ed25519");
        let user_public = keygen(&v10, &user_key, "ed25519", "user")?;
        check(
            agent.command(v10.tool("ssh-add")).arg(&user_key).output()?,
            "ssh-add the user key",
        )?;
        let sshd = Sshd::start_with(
            &v10,
            &std::fs::read_to_string(&user_public)?,
            None,
            &format!(
                "HostKey {}\nHostKeyAgent {}\n\
                 HostKeyAlgorithms ssh-mldsa44-ed25519@openssh.com\n",
                host_public.display(),
                agent.socket().display()
            ),
        )?;
        let known_hosts = agent.dir().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "[127.0.0.1]:{} {}",
                sshd.port(),
                std::fs::read_to_string(&host_public)?
            ),
        )?;
        let login = sshd.login_with(
            &v10,
            &agent,
            &[
                "-o",
                "HostKeyAlgorithms=ssh-mldsa44-ed25519@openssh.com",
                "-o",
                &format!("UserKnownHostsFile={}", known_hosts.display()),
            ],
        )?;
        sshd.ensure_logged_in(&login, &agent.log_text())
            .map_err(|err| err.context(format!("{name}: HostKeyAgent login")))?;
    }
    Ok(())
}

/// A host CA, a host certificate for `principal` made with OpenSSH 10.5, and
/// an sshd presenting it.
struct CertifiedHost {
    sshd: Sshd,
    ca_public: String,
}

fn certified_host(
    v10: &OpenSsh,
    dir: &Path,
    principal: &str,
    authorized: &str,
) -> anyhow::Result<CertifiedHost> {
    let ca = dir.join("host_ca");
    let ca_public = keygen(v10, &ca, "ed25519", "host CA")?;
    let host = dir.join("host_cert_key");
    let host_public = keygen(v10, &host, "ed25519", "certified host")?;
    check(
        std::process::Command::new(v10.tool("ssh-keygen"))
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", "test-host", "-h", "-n", principal, "-V", "-5m:+1h"])
            .arg(&host_public)
            .output()?,
        "ssh-keygen -s (host certificate)",
    )?;
    let cert = dir.join("host_cert_key-cert.pub");
    let sshd = Sshd::start_with(
        v10,
        authorized,
        None,
        &format!(
            "HostKey {}\nHostCertificate {}\n\
             HostKeyAlgorithms ssh-ed25519-cert-v01@openssh.com\n",
            host.display(),
            cert.display()
        ),
    )?;
    Ok(CertifiedHost {
        sshd,
        ca_public: std::fs::read_to_string(ca_public)?.trim().to_owned(),
    })
}

#[test]
fn issue_13_destination_constraints_match_host_certificates() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    for (name, agent) in both_agents(&v10)? {
        let key = agent.dir().join("id_ed25519");
        let public = keygen(&v10, &key, "ed25519", "restricted")?;
        let host = certified_host(
            &v10,
            agent.dir(),
            "host_a.example",
            &std::fs::read_to_string(&public)?,
        )?;
        let known_hosts = agent.dir().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("@cert-authority host_* {}\n", host.ca_public),
        )?;
        let login_as = |alias: &str| {
            host.sshd.login_with(
                &v10,
                &agent,
                &[
                    "-o",
                    &format!("HostKeyAlias={alias}"),
                    "-o",
                    &format!("UserKnownHostsFile={}", known_hosts.display()),
                    "-o",
                    "HostKeyAlgorithms=ssh-ed25519-cert-v01@openssh.com",
                ],
            )
        };
        // Restricted to the host the certificate names: the login works.
        let restrict = |destination: &str| -> anyhow::Result<()> {
            check(
                agent
                    .command(v10.tool("ssh-add"))
                    .arg("-H")
                    .arg(&known_hosts)
                    .args(["-h", destination])
                    .arg(&key)
                    .output()?,
                &format!("{name}: ssh-add -h {destination}"),
            )?;
            Ok(())
        };
        restrict(&format!("{}@host_a.example", user()?))?;
        let login = login_as("host_a.example")?;
        host.sshd
            .ensure_logged_in(&login, &agent.log_text())
            .map_err(|err| err.context(format!("{name}: certified host")))?;

        // Restricted to another name under the same CA: the certificate does
        // not name it, so the key is refused there.
        check(
            agent.command(v10.tool("ssh-add")).arg("-D").output()?,
            "ssh-add -D",
        )?;
        restrict("host_b.example")?;
        let login = login_as("host_a.example")?;
        assert!(
            !stdout(&login).contains("logged-in"),
            "{name}: a key restricted to host_b logged in to host_a\n{}",
            stderr(&login)
        );
    }
    Ok(())
}

#[test]
fn issue_13_revoked_known_hosts_entries_never_reach_the_agent() -> anyhow::Result<()> {
    // ssh-add skips @revoked lines: with only one for the host, there is
    // nothing to restrict the key to, for either agent; and a host whose CA
    // is revoked is refused by ssh itself.
    let v10 = OpenSsh::v10()?;
    for (name, agent) in both_agents(&v10)? {
        let key = agent.dir().join("id_ed25519");
        keygen(&v10, &key, "ed25519", "restricted")?;
        let host_public = keygen(&v10, &agent.dir().join("host"), "ed25519", "host")?;
        let known_hosts = agent.dir().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "@revoked revoked.example {}",
                std::fs::read_to_string(host_public)?
            ),
        )?;
        let output = agent
            .command(v10.tool("ssh-add"))
            .arg("-H")
            .arg(&known_hosts)
            .args(["-h", "revoked.example"])
            .arg(&key)
            .output()?;
        assert!(!output.status.success(), "{name}");
        assert!(
            stderr(&output).contains("No host keys found"),
            "{name}: {}",
            stderr(&output)
        );
        assert!(agent.listed()?.is_empty(), "{name}");
    }
    Ok(())
}

#[test]
fn issue_13_extensions_answer_as_openssh_10() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    for (name, agent) in both_agents(&v10)? {
        let mut client = RawClient::connect(agent.socket())?;
        // query: SSH_AGENT_EXTENSION_RESPONSE naming session-bind.
        let mut query = vec![wire::EXTENSION];
        token_agent_core::push_string(&mut query, b"query");
        client.send(&query)?;
        let reply = client.receive()?.unwrap_or_default();
        assert_eq!(reply.first(), Some(&29), "{name}: {reply:?}");
        assert!(
            reply.windows(24).any(|w| w == b"session-bind@openssh.com"),
            "{name}"
        );
        // An unknown extension: SSH_AGENT_FAILURE, as OpenSSH 10.5 answers.
        let mut unknown = vec![wire::EXTENSION];
        token_agent_core::push_string(&mut unknown, b"frobnicate@example.com");
        client.send(&unknown)?;
        assert_eq!(
            client.receive()?.unwrap_or_default(),
            [wire::FAILURE],
            "{name}"
        );
        // A malformed session bind: SSH_AGENT_EXTENSION_FAILURE.
        let mut bind = vec![wire::EXTENSION];
        token_agent_core::push_string(&mut bind, b"session-bind@openssh.com");
        token_agent_core::push_string(&mut bind, b"not a key");
        client.send(&bind)?;
        assert_eq!(client.receive()?.unwrap_or_default(), [28], "{name}");
        // The connection still works.
        client.send(&[11])?;
        assert_eq!(
            client.receive()?.unwrap_or_default().first(),
            Some(&wire::IDENTITIES_ANSWER)
        );
    }
    Ok(())
}

#[test]
fn issue_13_unknown_constraints_refuse_the_add() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    for (name, agent) in both_agents(&v10)? {
        let key = agent.dir().join("id_ed25519");
        keygen(&v10, &key, "ed25519", "constrained")?;
        let private = ssh_key::PrivateKey::read_openssh_file(&key)?;
        let mut frame = vec![25];
        token_agent_core::push_string(&mut frame, b"ssh-ed25519");
        ssh_encoding::Encode::encode(private.key_data().ed25519().expect("ed25519"), &mut frame)?;
        token_agent_core::push_string(&mut frame, b"constrained");
        frame.push(255);
        token_agent_core::push_string(&mut frame, b"frobnicate@example.com");
        let mut client = RawClient::connect(agent.socket())?;
        client.send(&frame)?;
        assert_eq!(
            client.receive()?.unwrap_or_default(),
            [wire::FAILURE],
            "{name}"
        );
        assert!(agent.listed()?.is_empty(), "{name}: the key was added");
    }
    Ok(())
}

#[test]
fn issue_13_sk_keys_through_openssh_sk_dummy_middleware() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    let dummy = v10
        .sk_dummy()
        .ok_or_else(|| anyhow::anyhow!("the OpenSSH 10.5 build has no sk-dummy.so"))?;
    let dummy = dummy.canonicalize()?;
    let allow = format!("{}/*", dummy.parent().unwrap_or(Path::new("/")).display());
    for (name, agent) in both_agents_with(&v10, &["-P", &allow])? {
        let key = agent.dir().join("id_ed25519_sk");
        check(
            std::process::Command::new(v10.tool("ssh-keygen"))
                .args(["-q", "-N", "", "-t", "ed25519-sk", "-C", "dummy-sk", "-w"])
                .arg(&dummy)
                .arg("-f")
                .arg(&key)
                .output()?,
            "ssh-keygen -t ed25519-sk -w sk-dummy.so",
        )?;
        check(
            agent
                .command(v10.tool("ssh-add"))
                .arg("-S")
                .arg(&dummy)
                .arg(&key)
                .output()?,
            &format!("{name}: ssh-add -S sk-dummy.so"),
        )?;
        let public = key.with_extension("pub");
        sign_and_check(&v10, name, &agent, &public)?;
        // sk-dummy has no resident keys: ssh-add -K -S says so, for both.
        let resident = agent
            .command(v10.tool("ssh-add"))
            .arg("-K")
            .arg("-S")
            .arg(&dummy)
            .output()?;
        assert!(!resident.status.success(), "{name}");
        assert_eq!(agent.listed()?.len(), 1, "{name}");
        if name == "token-agent" {
            // status names what signs the key: the middleware's helper.
            let doc = agent.status()?;
            let fido = doc["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["name"] == "fido")
                .map(|b| b["devices"].to_string())
                .unwrap_or_default();
            assert!(
                fido.contains("sk-dummy.so") && fido.contains("1 sk key"),
                "{fido}"
            );
        }
    }
    Ok(())
}

/// Certificates of keys whose certificate type is not the key type plus a
/// suffix (sk keys, post-quantum keys) are added with their keys, as in
/// OpenSSH 10.5, and the post-quantum one logs in where only its CA is
/// trusted.
#[test]
fn certificates_of_sk_and_mldsa_keys_are_added_as_openssh_10() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    let dummy = v10
        .sk_dummy()
        .ok_or_else(|| anyhow::anyhow!("the OpenSSH 10.5 build has no sk-dummy.so"))?
        .canonicalize()?;
    let allow = format!("{}/*", dummy.parent().unwrap_or(Path::new("/")).display());
    let user = user()?;
    for (name, agent) in both_agents_with(&v10, &["-P", &allow])? {
        let ca = agent.dir().join("user_ca");
        let ca_public = keygen(&v10, &ca, "ed25519", "ca")?;
        let certify = |public: &Path| -> anyhow::Result<String> {
            check(
                std::process::Command::new(v10.tool("ssh-keygen"))
                    .args(["-q", "-s"])
                    .arg(&ca)
                    .args(["-I", "cert-test", "-n", &user, "-V", "-5m:+1h"])
                    .arg(public)
                    .output()?,
                "ssh-keygen -s",
            )?;
            let stem = public.with_extension("");
            let cert = std::fs::read_to_string(format!("{}-cert.pub", stem.display()))?;
            Ok(cert
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "))
        };

        let mldsa = agent.dir().join("id_mldsa");
        let mldsa_public = keygen(&v10, &mldsa, "mldsa44-ed25519", "pq")?;
        let mldsa_cert = certify(&mldsa_public)?;
        let sk = agent.dir().join("id_sk");
        check(
            std::process::Command::new(v10.tool("ssh-keygen"))
                .args(["-q", "-N", "", "-t", "ed25519-sk", "-C", "sk", "-w"])
                .arg(&dummy)
                .arg("-f")
                .arg(&sk)
                .output()?,
            "ssh-keygen -t ed25519-sk -w sk-dummy.so",
        )?;
        let sk_cert = certify(&sk.with_extension("pub"))?;

        let added = agent.command(v10.tool("ssh-add")).arg(&mldsa).output()?;
        let said = stderr(&added);
        assert!(
            said.contains("Certificate ") && said.contains(" added"),
            "{name}: {said}"
        );
        let added = check(
            agent
                .command(v10.tool("ssh-add"))
                .arg("-S")
                .arg(&dummy)
                .arg(&sk)
                .output()?,
            &format!("{name}: ssh-add -S"),
        )?;
        let said = stderr(&added);
        assert!(!said.contains("failed"), "{name}: {said}");
        let listed = stdout(&check(
            agent.command(v10.tool("ssh-add")).arg("-L").output()?,
            "ssh-add -L",
        )?);
        let listed: Vec<String> = listed
            .lines()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(listed.len(), 4, "{name}: {listed:?}");
        for cert in [&mldsa_cert, &sk_cert] {
            assert!(listed.contains(cert), "{name}: {cert} not in {listed:?}");
        }

        // Only the CA is trusted: the post-quantum certificate logs in.
        let sshd = Sshd::start_with(
            &v10,
            "",
            Some(&ca_public),
            "PubkeyAcceptedAlgorithms +ssh-mldsa44-ed25519-cert-v01@openssh.com\n",
        )?;
        let login = sshd.login_with(
            &v10,
            &agent,
            &[
                "-o",
                "PubkeyAcceptedAlgorithms=ssh-mldsa44-ed25519-cert-v01@openssh.com",
            ],
        )?;
        sshd.ensure_logged_in(&login, &agent.log_text())
            .map_err(|err| err.context(format!("{name}: certificate login")))?;
    }
    Ok(())
}

/// A key restricted (`ssh-add -h`) to a host whose host key is ML-DSA logs
/// in there: the agent verifies the host's session bind signature.
#[test]
fn destination_constraints_bind_to_ml_dsa_host_keys() -> anyhow::Result<()> {
    let v10 = OpenSsh::v10()?;
    for (name, agent) in both_agents(&v10)? {
        let key = agent.dir().join("id_ed25519");
        let public = keygen(&v10, &key, "ed25519", "restricted")?;
        let host_key = agent.dir().join("host_mldsa");
        let host_public = keygen(&v10, &host_key, "mldsa44-ed25519", "host")?;
        let sshd = Sshd::start_with(
            &v10,
            &std::fs::read_to_string(&public)?,
            None,
            &format!(
                "HostKey {}\nHostKeyAlgorithms ssh-mldsa44-ed25519@openssh.com\n",
                host_key.display()
            ),
        )?;
        let known_hosts = agent.dir().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("pq.example {}", std::fs::read_to_string(&host_public)?),
        )?;
        check(
            agent
                .command(v10.tool("ssh-add"))
                .arg("-H")
                .arg(&known_hosts)
                .args(["-h", &format!("{}@pq.example", user()?)])
                .arg(&key)
                .output()?,
            &format!("{name}: ssh-add -h"),
        )?;
        let login = sshd.login_with(
            &v10,
            &agent,
            &[
                "-o",
                "HostKeyAlias=pq.example",
                "-o",
                &format!("UserKnownHostsFile={}", known_hosts.display()),
                "-o",
                "HostKeyAlgorithms=ssh-mldsa44-ed25519@openssh.com",
            ],
        )?;
        sshd.ensure_logged_in(&login, &agent.log_text())
            .map_err(|err| err.context(format!("{name}: restricted key to an ML-DSA host")))?;
    }
    Ok(())
}
