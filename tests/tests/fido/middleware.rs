//! OpenSSH's security-key middleware API end to end: keys made by OpenSSH's
//! own `ssh-keygen -w` with fido-sim's middleware (`libfido_sim_middleware.so`),
//! added with `ssh-add` and `ssh-add -S`,
//! signing through the agent; the `-P` gate; a crashing or hanging middleware;
//! resident keys through `ssh-keygen -K` and `ssh-add -K -S`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ssh_encoding::Encode;
use token_agent_core::push_string;
use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::wire::{session_bind, RawClient, FAILURE, SUCCESS};
use token_agent_e2e::{check, sign_file, stdout};

use crate::support::{allowing, middleware_library, SimAgent, Token, PIN};

/// SSH2_AGENTC_ADD_ID_CONSTRAINED.
const ADD_ID_CONSTRAINED: u8 = 25;
/// SSH_AGENT_CONSTRAIN_EXTENSION.
const CONSTRAIN_EXTENSION: u8 = 255;

fn public_file(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(".pub");
    PathBuf::from(path)
}

/// "type base64" of a public key file, without the comment.
fn key_part(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(public_file(file))?;
    Ok(text
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// `ssh-keygen -Y sign` with the key of `file` through the agent that
/// `keygen` (an ssh-keygen command with SSH_AUTH_SOCK set) talks to, then
/// `ssh-keygen -Y verify` with the public key.
fn sign_and_verify(keygen: Command, file: &Path) -> anyhow::Result<()> {
    let signed = try_sign(keygen, file)?;
    check(signed, "ssh-keygen -Y sign through the agent")?;
    let message = message_file(file);
    let signers = file.with_extension("signers");
    std::fs::write(
        &signers,
        format!(
            "tester {}\n",
            std::fs::read_to_string(public_file(file))?.trim()
        ),
    )?;
    let mut signature = message.as_os_str().to_owned();
    signature.push(".sig");
    check(
        Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "file", "-I", "tester", "-f"])
            .arg(&signers)
            .arg("-s")
            .arg(&signature)
            .stdin(std::fs::File::open(&message)?)
            .output()?,
        "ssh-keygen -Y verify",
    )?;
    Ok(())
}

fn message_file(file: &Path) -> PathBuf {
    file.with_extension("message")
}

/// `ssh-keygen -Y sign` with the key of `file`; its output, success or not.
fn try_sign(keygen: Command, file: &Path) -> anyhow::Result<std::process::Output> {
    let message = message_file(file);
    std::fs::write(&message, format!("signed with {}\n", file.display()))?;
    let mut signature = message.as_os_str().to_owned();
    signature.push(".sig");
    let _ = std::fs::remove_file(&signature);
    Ok(sign_file(keygen, public_file(file), &message).output()?)
}

/// token-agent (the release binary, with no security key attached: only a
/// middleware can sign) whose helpers reach `token`'s simulator.
fn plain_agent(token: &Token, args: &[&str], config: &str) -> anyhow::Result<Agent> {
    Agent::start(AgentOptions {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: vec![(
            fido_sim::middleware::STATE_ENV.to_owned(),
            token.state().display().to_string(),
        )],
        config: Some(config.to_owned()),
    })
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...: comm may hold spaces.
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn maps_library(pid: u32, library: &Path) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .is_ok_and(|maps| maps.contains(&library.display().to_string()))
}

#[test]
fn keys_made_by_openssh_through_the_middleware_sign_without_s_too() -> anyhow::Result<()> {
    let token = Token::new(None)?;
    let ed25519 = token.ssh_keygen("ed25519-sk", "id_ed25519_sk", &[], None)?;
    let ecdsa = token.ssh_keygen("ecdsa-sk", "id_ecdsa_sk", &[], None)?;
    // OpenSSH wrote what it got from sk_enroll: a touch-required key.
    let key = ssh_key::PrivateKey::read_openssh_file(&ed25519)?;
    match key.key_data() {
        ssh_key::private::KeypairData::SkEd25519(sk) => ensure!(sk.flags() == 0x01),
        other => bail!("not an ed25519-sk key: {:?}", other.algorithm()),
    }
    // The agent's own CTAP code signs with the handles, on the shared simulator.
    let agent = SimAgent::start(&token, "", &[])?;
    for file in [&ed25519, &ecdsa] {
        check(agent.ssh_add(&[&file.display().to_string()])?, "ssh-add")?;
        sign_and_verify(agent.command("ssh-keygen"), file)?;
    }
    let sshd = Sshd::start(
        &format!("{}\n", std::fs::read_to_string(public_file(&ecdsa))?.trim()),
        None,
    )?;
    let login = agent.login(&sshd)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    ensure!(
        !agent.log_text().contains("sk_sign"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn ssh_add_s_keys_sign_through_the_middleware_in_a_helper() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let token = Token::new(None)?;
    let ed25519 = token.ssh_keygen("ed25519-sk", "id_ed25519_sk", &[], None)?;
    let ecdsa = token.ssh_keygen("ecdsa-sk", "id_ecdsa_sk", &[], None)?;
    let mut agent = plain_agent(&token, &["-P", &allowing(&library)?], "")?;

    // Without -S, this agent has no security key to sign with.
    check(agent.ssh_add([ed25519.as_os_str()])?, "ssh-add without -S")?;
    let unsigned = try_sign(agent.command("ssh-keygen"), &ed25519)?;
    ensure!(!unsigned.status.success(), "signed without a security key");

    // With -S, the middleware signs (and the key added without -S is replaced).
    for file in [&ed25519, &ecdsa] {
        check(
            agent.ssh_add([OsStr::new("-S"), library.as_os_str(), file.as_os_str()])?,
            "ssh-add -S",
        )?;
    }
    let listed = agent.listed()?;
    ensure!(listed.len() == 2, "{listed:?}");
    for file in [&ed25519, &ecdsa] {
        ensure!(
            listed
                .iter()
                .any(|line| line.starts_with(&key_part(file).unwrap_or_default())),
            "{listed:?}"
        );
        sign_and_verify(agent.command("ssh-keygen"), file)?;
    }
    let sshd = Sshd::start(
        &format!(
            "{}\n",
            std::fs::read_to_string(public_file(&ed25519))?.trim()
        ),
        None,
    )?;
    let login = sshd.login(&agent)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    let log = agent.log_text();
    ensure!(log.contains("loaded sk middleware in a helper"), "{log}");
    ensure!(log.contains("sk_sign answered"), "{log}");

    // The library is mapped in a child process, never in the agent.
    let pid = agent.pid().context("no agent pid")?;
    ensure!(
        !maps_library(pid, &library),
        "the agent loaded the middleware itself"
    );
    ensure!(
        children(pid)
            .into_iter()
            .any(|child| maps_library(child, &library)),
        "no helper process holds the middleware"
    );
    // ssh-add -D lets the helper go.
    check(agent.ssh_add(["-D"])?, "ssh-add -D")?;
    ensure!(
        token_agent_e2e::wait_for(Duration::from_secs(5), || children(pid)
            .into_iter()
            .all(|child| !maps_library(child, &library))),
        "the helper outlived its keys"
    );
    ensure!(agent.alive());
    Ok(())
}

#[test]
fn re_adding_a_key_with_another_middleware_or_internal_stops_the_old_helper() -> anyhow::Result<()>
{
    let library = middleware_library()?;
    let token = Token::new(None)?;
    let file = token.ssh_keygen("ed25519-sk", "id_readded", &[], None)?;
    // The same middleware under another path is another middleware.
    let copies = tempfile::Builder::new().prefix("sk-copy").tempdir()?;
    let copy = copies.path().join("libcopied_middleware.so");
    std::fs::copy(&library, &copy)?;
    let allowed = format!("{},{}/*", allowing(&library)?, copies.path().display());
    let mut agent = plain_agent(&token, &["-P", &allowed], "")?;
    let pid = agent.pid().context("no agent pid")?;
    let helpers = |of: &Path| {
        children(pid)
            .into_iter()
            .filter(|child| maps_library(*child, of))
            .count()
    };
    let add = |with: Option<&Path>| -> anyhow::Result<()> {
        let mut args = Vec::new();
        if let Some(with) = with {
            args.extend([OsStr::new("-S"), with.as_os_str()]);
        }
        args.push(file.as_os_str());
        check(agent.ssh_add(args)?, "ssh-add")?;
        Ok(())
    };
    add(Some(&library))?;
    ensure!(
        helpers(&library) == 1,
        "no helper for {}",
        library.display()
    );
    add(Some(&copy))?;
    sign_and_verify(agent.command("ssh-keygen"), &file)?;
    ensure!(
        token_agent_e2e::wait_for(Duration::from_secs(5), || helpers(&library) == 0),
        "the first middleware's helper outlived the key re-added with another"
    );
    ensure!(helpers(&copy) == 1, "no helper for {}", copy.display());
    add(None)?;
    ensure!(
        token_agent_e2e::wait_for(Duration::from_secs(5), || helpers(&copy) == 0),
        "the middleware's helper outlived the key re-added without -S"
    );
    ensure!(agent.alive());
    Ok(())
}

#[test]
fn a_helper_killed_while_idle_is_restarted_and_the_next_signature_goes_through(
) -> anyhow::Result<()> {
    // The agent may not have seen the helper die when the next request comes:
    // the request reached no middleware, so it goes to a fresh helper, and
    // the signature neither fails nor blames sk_sign.
    let library = middleware_library()?;
    let token = Token::new(None)?;
    let file = token.ssh_keygen("ed25519-sk", "id_idle", &[], None)?;
    let agent = plain_agent(&token, &["-P", &allowing(&library)?], "")?;
    check(
        agent.ssh_add([OsStr::new("-S"), library.as_os_str(), file.as_os_str()])?,
        "ssh-add -S",
    )?;
    let pid = agent.pid().context("no agent pid")?;
    for round in 0..10 {
        let helper = children(pid)
            .into_iter()
            .find(|child| maps_library(*child, &library))
            .context("no helper holds the middleware")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(helper)?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        sign_and_verify(agent.command("ssh-keygen"), &file)
            .with_context(|| format!("signing right after killing the helper, round {round}"))?;
    }
    let log = agent.log_text();
    ensure!(!log.contains("crashed in sk_sign"), "{log}");
    Ok(())
}

#[test]
fn a_middleware_outside_the_allowlist_is_refused() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let token = Token::new(None)?;
    let file = token.ssh_keygen("ed25519-sk", "id_refused", &[], None)?;
    let add = |agent: &Agent, provider: &Path| {
        agent.ssh_add([OsStr::new("-S"), provider.as_os_str(), file.as_os_str()])
    };

    // OpenSSH's default list: /usr/lib*/*,/usr/local/lib*/*.
    let agent = plain_agent(&token, &[], "")?;
    ensure!(!add(&agent, &library)?.status.success(), "added");
    ensure!(agent.listed()?.is_empty());
    let log = agent.log_text();
    ensure!(
        log.contains("refusing the sk middleware") && log.contains("is not in the allowlist"),
        "{log}"
    );
    ensure!(!log.contains("loaded sk middleware"), "{log}");

    // A symbolic link in an allowed directory is judged by its target.
    let links = tempfile::Builder::new().prefix("sk-links").tempdir()?;
    let link = links.path().join("libsk.so");
    std::os::unix::fs::symlink(&library, &link)?;
    let allow_links = format!("{}/*", links.path().display());
    let agent = plain_agent(&token, &["-P", &allow_links], "")?;
    ensure!(
        !add(&agent, &link)?.status.success(),
        "added through a link"
    );
    ensure!(agent.listed()?.is_empty());

    // Named by -P, it loads and signs.
    let agent = plain_agent(&token, &["-P", &allowing(&library)?], "")?;
    check(add(&agent, &link)?, "ssh-add -S with an allowed target")?;
    ensure!(agent.listed()?.len() == 1);
    sign_and_verify(agent.command("ssh-keygen"), &file)?;
    Ok(())
}

#[test]
fn a_library_that_is_not_a_middleware_is_refused_when_the_key_is_added() -> anyhow::Result<()> {
    // A PKCS#11 module in an allowed directory: a plausible mistake.
    let module = Path::new(token_agent_e2e::softhsm::MODULE);
    let token = Token::new(None)?;
    let file = token.ssh_keygen("ed25519-sk", "id_wrong_library", &[], None)?;
    let mut agent = plain_agent(&token, &[], "")?;
    let output = agent.ssh_add([OsStr::new("-S"), module.as_os_str(), file.as_os_str()])?;
    ensure!(
        !output.status.success(),
        "added with a PKCS#11 module as middleware"
    );
    ensure!(agent.listed()?.is_empty());
    let log = agent.log_text();
    ensure!(
        log.contains("is not an OpenSSH security-key middleware: it has no sk_api_version"),
        "{log}"
    );
    ensure!(agent.alive());
    Ok(())
}

/// SSH2_AGENTC_ADD_ID_CONSTRAINED for the key of `file`, with the
/// sk-provider@openssh.com constraint ssh-add sends (`-S provider`, or "internal").
fn add_with_provider(file: &Path, provider: &str) -> anyhow::Result<Vec<u8>> {
    let key = ssh_key::PrivateKey::read_openssh_file(file)?;
    let mut body = vec![ADD_ID_CONSTRAINED];
    key.key_data().encode(&mut body)?;
    push_string(&mut body, b"forwarded key");
    body.push(CONSTRAIN_EXTENSION);
    push_string(&mut body, b"sk-provider@openssh.com");
    push_string(&mut body, provider.as_bytes());
    Ok(body)
}

#[test]
fn ssh_add_s_over_a_forwarded_connection_is_refused_unless_allowed() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let provider = library.display().to_string();
    let token = Token::new(None)?;
    let file = token.ssh_keygen("ed25519-sk", "id_forwarded", &[], None)?;
    let allow = allowing(&library)?;

    let agent = plain_agent(&token, &["-P", &allow], "")?;
    let mut client = RawClient::connect(agent.socket())?;
    let bound = client.request(&session_bind(agent.dir(), true)?)?;
    ensure!(bound.as_deref() == Some(&[SUCCESS][..]));
    let reply = client.request(&add_with_provider(&file, &provider)?)?;
    ensure!(reply.as_deref() == Some(&[FAILURE][..]), "{reply:?}");
    let log = agent.log_text();
    ensure!(
        log.contains(&format!(
            "refusing to load sk middleware {provider} requested over a forwarded connection"
        )),
        "{log}"
    );
    ensure!(agent.listed()?.is_empty());
    // "internal" loads nothing: a forwarded connection may add the key so.
    let reply = client.request(&add_with_provider(&file, "internal")?)?;
    ensure!(reply.as_deref() == Some(&[SUCCESS][..]), "{reply:?}");
    // A local connection may name the middleware.
    let mut local = RawClient::connect(agent.socket())?;
    let reply = local.request(&add_with_provider(&file, &provider)?)?;
    ensure!(reply.as_deref() == Some(&[SUCCESS][..]), "{reply:?}");
    sign_and_verify(agent.command("ssh-keygen"), &file)?;

    // -O allow-remote-pkcs11 allows it, as in OpenSSH.
    let agent = plain_agent(&token, &["-P", &allow, "-O", "allow-remote-pkcs11"], "")?;
    let mut client = RawClient::connect(agent.socket())?;
    let bound = client.request(&session_bind(agent.dir(), true)?)?;
    ensure!(bound.as_deref() == Some(&[SUCCESS][..]));
    let reply = client.request(&add_with_provider(&file, &provider)?)?;
    ensure!(reply.as_deref() == Some(&[SUCCESS][..]), "{reply:?}");
    sign_and_verify(agent.command("ssh-keygen"), &file)?;
    Ok(())
}

/// An agent with the simulator attached, a key added with -S through a
/// middleware that misbehaves as `fault` says, and a key the agent's own
/// CTAP code signs.
fn agent_with_faulty_middleware(
    token: &Token,
    fault: &str,
    config: &str,
) -> anyhow::Result<(SimAgent, PathBuf, PathBuf)> {
    let library = middleware_library()?;
    let faulty = token.ssh_keygen("ed25519-sk", "id_faulty", &[], None)?;
    let healthy = token.ssh_keygen("ecdsa-sk", "id_healthy", &[], None)?;
    let agent = SimAgent::start_with_env(
        token,
        config,
        &["-P", &allowing(&library)?],
        &[(fido_sim::middleware::FAULT_ENV, fault)],
    )?;
    agent.add_with_middleware(&library, &faulty)?;
    check(agent.ssh_add(&[&healthy.display().to_string()])?, "ssh-add")?;
    Ok((agent, faulty, healthy))
}

#[test]
fn a_middleware_that_crashes_in_sk_sign_costs_only_its_helper() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let token = Token::new(None)?;
    let (mut agent, faulty, healthy) = agent_with_faulty_middleware(&token, "crash-in-sign", "")?;
    for _ in 0..2 {
        let output = try_sign(agent.command("ssh-keygen"), &faulty)?;
        ensure!(
            !output.status.success(),
            "signed through a crashing middleware"
        );
        ensure!(agent.alive(), "the agent died");
    }
    let log = agent.log_text();
    let expected = format!(
        "the sk middleware {} crashed in sk_sign (signal 6, SIGABRT); restarted it",
        library.display()
    );
    ensure!(log.matches(&expected).count() >= 2, "{log}");
    // Both keys are still listed, and the other one signs.
    let listed = stdout(&check(agent.ssh_add(&["-L"])?, "ssh-add -L")?);
    ensure!(listed.lines().count() == 2, "{listed}");
    sign_and_verify(agent.command("ssh-keygen"), &healthy)?;
    Ok(())
}

#[test]
fn a_middleware_that_reads_standard_input_signs_at_once() -> anyhow::Result<()> {
    // getpass() without a terminal reads standard input: the helper's is
    // /dev/null, not the agent's request pipe, so the read ends at once.
    let token = Token::new(None)?;
    let (agent, faulty, _) = agent_with_faulty_middleware(
        &token,
        "read-stdin-in-sign",
        "[fido]\nmiddleware_timeout_seconds = 20\n",
    )?;
    for _ in 0..2 {
        let started = Instant::now();
        sign_and_verify(agent.command("ssh-keygen"), &faulty)?;
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "signing took {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

#[test]
fn a_middleware_that_hangs_in_sk_sign_is_killed_after_the_time_limit() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let token = Token::new(None)?;
    let (mut agent, faulty, healthy) = agent_with_faulty_middleware(
        &token,
        "hang-in-sign",
        "[fido]\nmiddleware_timeout_seconds = 3\n",
    )?;
    let message = message_file(&faulty);
    std::fs::write(&message, "hang\n")?;
    let started = Instant::now();
    let mut held = sign_file(agent.command("ssh-keygen"), public_file(&faulty), &message)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // While the middleware hangs, listing answers at once and the other key signs.
    std::thread::sleep(Duration::from_millis(500));
    let list_started = Instant::now();
    check(agent.ssh_add(&["-l"])?, "ssh-add -l")?;
    ensure!(
        list_started.elapsed() < Duration::from_secs(1),
        "listing took {:?}",
        list_started.elapsed()
    );
    sign_and_verify(agent.command("ssh-keygen"), &healthy)?;
    let status = held.wait()?;
    ensure!(!status.success(), "signed through a hanging middleware");
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    ensure!(agent.alive());
    let log = agent.log_text();
    let expected = format!(
        "the sk middleware {} did not answer sk_sign within 3 s; killed it; restarted it",
        library.display()
    );
    ensure!(log.contains(&expected), "{log}");
    Ok(())
}

#[test]
fn a_denied_or_missing_touch_through_the_middleware_fails_clearly() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let token = Token::new(None)?;
    let file = token.ssh_keygen("ed25519-sk", "id_touch", &[], None)?;
    let notices = token.state().with_extension("notices");
    // The notice comes at once, so it shows while the middleware waits.
    let config = format!(
        "[notice]\ndelay_ms = 0\ncommand = \"echo \\\"$TOKEN_AGENT_NOTICE_KIND: $TOKEN_AGENT_NOTICE\\\" >> '{}'\"\n",
        notices.display()
    );
    for (presence, extra) in [("deny", None), ("never", Some("300"))] {
        let mut env = vec![(fido_sim::middleware::PRESENCE_ENV, presence)];
        if let Some(millis) = extra {
            env.push((fido_sim::middleware::TOUCH_TIMEOUT_ENV, millis));
        }
        let agent = SimAgent::start_with_env(&token, &config, &["-P", &allowing(&library)?], &env)?;
        agent.add_with_middleware(&library, &file)?;
        let output = try_sign(agent.command("ssh-keygen"), &file)?;
        ensure!(!output.status.success(), "signed with presence {presence}");
        let log = agent.log_text();
        ensure!(
            log.contains("usually a touch that was denied or not given in time"),
            "{log}"
        );
    }
    // While the middleware waited for a touch that never came, the person
    // was told to touch the key.
    let shown = std::fs::read_to_string(&notices).unwrap_or_default();
    ensure!(shown.contains("touch: "), "no touch notice: {shown:?}");
    Ok(())
}

#[test]
fn verify_required_keys_ask_the_pin_first_and_a_wrong_pin_is_not_retried() -> anyhow::Result<()> {
    // A PIN that cannot turn up in a log by chance (a timestamp, a pid).
    const PIN: &str = "mw-pin-7q3z";
    let library = middleware_library()?;
    let token = Token::new(Some(PIN))?;
    // The simulator has a PIN: ssh-keygen asks for it (through askpass).
    let file = token.ssh_keygen("ed25519-sk", "id_verify", &["verify-required"], Some(PIN))?;
    let key = ssh_key::PrivateKey::read_openssh_file(&file)?;
    match key.key_data() {
        ssh_key::private::KeypairData::SkEd25519(sk) => {
            ensure!(sk.flags() == 0x05, "flags {:#x}", sk.flags());
        }
        other => bail!("not an ed25519-sk key: {:?}", other.algorithm()),
    }
    let agent = SimAgent::start(&token, "", &["-P", &allowing(&library)?])?;
    agent.add_with_middleware(&library, &file)?;
    let sshd = Sshd::start(
        &format!(
            "verify-required {}\n",
            std::fs::read_to_string(public_file(&file))?.trim()
        ),
        None,
    )?;
    token.script_pins(&[PIN])?;
    let login = agent.login(&sshd)?;
    sshd.ensure_logged_in(&login, &agent.log_text())?;
    ensure!(token.pinentry_log().matches("GETPIN").count() == 1);
    ensure!(token.pin_retries()? == fido_sim::PIN_RETRIES);

    // A wrong PIN: refused, said so, asked once, and one try spent.
    token.script_pins(&["0000", PIN])?;
    let output = try_sign(agent.command("ssh-keygen"), &file)?;
    ensure!(!output.status.success(), "signed with a wrong PIN");
    let log = agent.log_text();
    ensure!(
        log.contains(&format!(
            "PIN incorrect for security key via {}",
            library.display()
        )),
        "{log}"
    );
    ensure!(
        token.pinentry_log().matches("GETPIN").count() == 2,
        "{}",
        token.pinentry_log()
    );
    ensure!(token.pin_retries()? == fido_sim::PIN_RETRIES - 1);
    ensure!(!log.contains(PIN), "the PIN is in the log");
    Ok(())
}

#[test]
fn a_pin_the_middleware_asks_for_is_asked_once_and_tried_again() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let token = Token::new(Some(PIN))?;
    // A plain touch key, on a device that wants the PIN for everything.
    let file = token.ssh_keygen("ecdsa-sk", "id_always_uv", &[], Some(PIN))?;
    let agent = SimAgent::start_with_env(
        &token,
        "",
        &["-P", &allowing(&library)?],
        &[(fido_sim::middleware::ALWAYS_UV_ENV, "1")],
    )?;
    agent.add_with_middleware(&library, &file)?;
    token.script_pins(&[PIN])?;
    sign_and_verify(agent.command("ssh-keygen"), &file)?;
    ensure!(token.pinentry_log().matches("GETPIN").count() == 1);
    ensure!(
        agent
            .log_text()
            .contains("the sk middleware asks for a PIN"),
        "{}",
        agent.log_text()
    );
    // A wrong one is reported, not asked again.
    token.script_pins(&["0000", PIN])?;
    let output = try_sign(agent.command("ssh-keygen"), &file)?;
    ensure!(!output.status.success(), "signed with a wrong PIN");
    ensure!(
        token.pinentry_log().matches("GETPIN").count() == 2,
        "{}",
        token.pinentry_log()
    );
    ensure!(agent
        .log_text()
        .contains("PIN incorrect for security key via"));
    ensure!(token.pin_retries()? == fido_sim::PIN_RETRIES - 1);
    Ok(())
}

#[test]
fn ssh_keygen_k_downloads_resident_keys_through_the_middleware() -> anyhow::Result<()> {
    let token = Token::new(Some(PIN))?;
    let made = token.ssh_keygen(
        "ecdsa-sk",
        "id_resident",
        &["resident", "application=ssh:mw"],
        Some(PIN),
    )?;
    let download = token.dir().join("download");
    std::fs::create_dir(&download)?;
    check(
        token
            .openssh("ssh-keygen", Some(PIN))?
            .args(["-q", "-K", "-N", "", "-w"])
            .arg(middleware_library()?)
            .current_dir(&download)
            .output()?,
        "ssh-keygen -K",
    )?;
    let downloaded = download.join("id_ecdsa_sk_rk_mw");
    ensure!(
        key_part(&downloaded)? == key_part(&made)?,
        "{} vs {}",
        key_part(&downloaded)?,
        key_part(&made)?
    );
    // The downloaded file signs through the agent's own CTAP code.
    let agent = SimAgent::start(&token, "", &[])?;
    check(
        agent.ssh_add(&[&downloaded.display().to_string()])?,
        "ssh-add",
    )?;
    sign_and_verify(agent.command("ssh-keygen"), &downloaded)?;
    Ok(())
}

#[test]
fn ssh_add_k_s_loads_resident_keys_that_sign_through_the_middleware() -> anyhow::Result<()> {
    let library = middleware_library()?;
    let token = Token::new(Some(PIN))?;
    let made = token.ssh_keygen(
        "ed25519-sk",
        "id_resident",
        &["resident", "application=ssh:agent"],
        Some(PIN),
    )?;
    let agent = plain_agent(&token, &["-P", &allowing(&library)?], "")?;
    let mut add = token.openssh("ssh-add", Some(PIN))?;
    add.env("SSH_AUTH_SOCK", agent.socket())
        .args(["-K", "-S"])
        .arg(&library);
    check(add.output()?, "ssh-add -K -S")?;
    let listed = agent.listed()?;
    ensure!(
        listed.len() == 1 && listed[0].starts_with(&key_part(&made)?),
        "{listed:?}"
    );
    sign_and_verify(agent.command("ssh-keygen"), &made)?;
    let log = agent.log_text();
    ensure!(log.contains("sk_sign answered"), "{log}");
    Ok(())
}
