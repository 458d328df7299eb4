//! End-to-end tests of the PKCS#11 backend against SoftHSM2, a real PKCS#11
//! module, and small misbehaving modules built from tests/fixtures/pkcs11.

// The shared backend conformance suite, with the backend in this process.
mod conformance;
// ssh-add -s / -e / -D through the real ssh-add, signatures, sshd logins, PINs.
mod providers;
// Who may load a provider: the -P allowlist and forwarded connections.
mod policy;
// Tokens deleted and made again while the agent runs.
mod hotplug;
// Modules that crash or hang in C_Sign: the agent survives and says so.
mod isolation;
// The helper's lanes, driven directly: retiring when idle, no request lost, one stuck lane.
mod lanes;
// The agent follows the desktop session's lock over a private D-Bus daemon.
mod desktop;
// The [forwarding] policy's per-backend rules cover token keys.
mod forwarding;
// Certificates for token keys (ssh-add -s MODULE cert.pub, -C), beside OpenSSH 10.5's agent.
mod certificates;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::softhsm::SoftHsm;
use token_agent_e2e::{check, sign_file, wait_for, write_script};

/// An askpass program that prints `pin`.
fn askpass(dir: &Path, pin: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("askpass-{}", pin.len()));
    write_script(&path, &format!("echo '{pin}'"))?;
    Ok(path)
}

/// An askpass program in `dir` that answers with `answers` in turn (the
/// last one from then on), and how many questions it has been asked so far.
fn counting_askpass(
    dir: &Path,
    answers: &[&str],
) -> anyhow::Result<(PathBuf, impl Fn() -> usize + Send + 'static)> {
    let (last, earlier) = answers
        .split_last()
        .ok_or_else(|| anyhow::anyhow!("an askpass needs an answer"))?;
    let asked = dir.join("asked");
    let program = dir.join("counting-askpass");
    let mut script = format!("echo asked >> '{0}'\nn=$(wc -l < '{0}')\n", asked.display());
    for (turn, answer) in earlier.iter().enumerate() {
        script += &format!(
            "[ \"$n\" -eq {} ] && {{ echo '{answer}'; exit; }}\n",
            turn + 1
        );
    }
    script += &format!("echo '{last}'");
    write_script(&program, &script)?;
    let questions = move || {
        std::fs::read_to_string(&asked)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    };
    Ok((program, questions))
}

/// `ssh-add -s module`, answering ssh-add's PIN question with `pin` through SSH_ASKPASS.
fn add_provider(agent: &Agent, module: &Path, pin: &str) -> anyhow::Result<Output> {
    add_provider_with(agent, &[], module, pin)
}

/// `ssh-add FLAGS -s module` (constraints: `-t 4`, `-c`), as [`add_provider`].
fn add_provider_with(
    agent: &Agent,
    flags: &[&str],
    module: &Path,
    pin: &str,
) -> anyhow::Result<Output> {
    let program = askpass(agent.dir(), pin)?;
    Ok(agent
        .command("ssh-add")
        .args(flags)
        .arg("-s")
        .arg(module)
        .env("SSH_ASKPASS", program)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .output()?)
}

/// Starts token-agent with SoftHSM's configuration, PINs asked through an
/// askpass program that answers `pin`, trace logging, `args` and `config`.
fn start_agent(hsm: &SoftHsm, args: &[&str], config: &str, pin: &str) -> anyhow::Result<Agent> {
    let program = askpass(hsm.dir(), pin)?;
    start_agent_asking(hsm, args, config, &program)
}

/// [`start_agent`] with the askpass program `program`.
fn start_agent_asking(
    hsm: &SoftHsm,
    args: &[&str],
    config: &str,
    program: &Path,
) -> anyhow::Result<Agent> {
    start_agent_with_env(hsm, args, config, program, Vec::new())
}

/// [`start_agent_asking`] with `extra` variables in the agent's environment.
fn start_agent_with_env(
    hsm: &SoftHsm,
    args: &[&str],
    config: &str,
    program: &Path,
    extra: Vec<(String, String)>,
) -> anyhow::Result<Agent> {
    Agent::start(agent_options(hsm, args, config, program, extra))
}

/// The options [`start_agent_with_env`] starts token-agent with.
fn agent_options(
    hsm: &SoftHsm,
    args: &[&str],
    config: &str,
    program: &Path,
    extra: Vec<(String, String)>,
) -> AgentOptions {
    let mut env = hsm.env();
    env.extend(extra);
    env.push(("SSH_ASKPASS".into(), program.display().to_string()));
    env.push(("SSH_ASKPASS_REQUIRE".into(), "force".into()));
    env.push(("TOKEN_AGENT_LOG".into(), "trace".into()));
    AgentOptions {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env,
        config: Some(format!("[prompt]\npin_prompt = \"askpass\"\n{config}")),
    }
}

/// Waits until `ssh-add -L` lists exactly `count` keys, returning them.
fn wait_listed(agent: &Agent, count: usize, limit: Duration) -> anyhow::Result<Vec<String>> {
    let mut last = Vec::new();
    let listed = wait_for(limit, || {
        last = agent.listed().unwrap_or_default();
        last.len() == count
    });
    anyhow::ensure!(
        listed,
        "expected {count} keys, the agent lists {last:?}\n{}",
        agent.log_text()
    );
    Ok(last)
}

/// The blob of the agent's one key, once it is listed.
fn only_key_blob(agent: &Agent) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    use token_agent_e2e::bench::parse_identities;
    use token_agent_e2e::wire::RawClient;

    wait_listed(agent, 1, Duration::from_secs(20))?;
    let listed = RawClient::connect(agent.socket())?
        .request(&[11])?
        .context("the agent closed")?;
    let (blob, _) = parse_identities(&listed)?
        .into_iter()
        .next()
        .context("no key listed")?;
    Ok(blob)
}

/// Signs a message with the listed key `line` through the agent
/// (`ssh-keygen -Y sign`) and verifies it (`ssh-keygen -Y verify`).
fn sign_and_verify(agent: &Agent, line: &str, name: &str) -> anyhow::Result<()> {
    let public = agent.dir().join(format!("{name}.pub"));
    std::fs::write(&public, format!("{line}\n"))?;
    let message = agent.dir().join(format!("{name}.txt"));
    std::fs::write(&message, format!("message for {name}\n"))?;
    let _ = std::fs::remove_file(message.with_extension("txt.sig"));
    check(
        sign_file(agent.command("ssh-keygen"), &public, &message).output()?,
        &format!("ssh-keygen -Y sign with {name}"),
    )?;
    let signers = agent.dir().join(format!("{name}.signers"));
    std::fs::write(&signers, format!("tester {line}\n"))?;
    check(
        std::process::Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "file", "-I", "tester", "-f"])
            .arg(&signers)
            .arg("-s")
            .arg(message.with_extension("txt.sig"))
            .stdin(std::fs::File::open(&message)?)
            .output()?,
        &format!("ssh-keygen -Y verify for {name}"),
    )?;
    Ok(())
}

/// Runs `ssh-keygen -Y sign` with the listed key `line`; returns its output, success or not.
fn try_sign(agent: &Agent, line: &str, name: &str) -> anyhow::Result<Output> {
    let public = agent.dir().join(format!("{name}.pub"));
    std::fs::write(&public, format!("{line}\n"))?;
    let message = agent.dir().join(format!("{name}.txt"));
    std::fs::write(&message, "message\n")?;
    let _ = std::fs::remove_file(message.with_extension("txt.sig"));
    Ok(sign_file(agent.command("ssh-keygen"), &public, &message).output()?)
}

/// The pid, executable and arguments of each of the agent's helper processes.
fn helpers(agent: &Agent) -> anyhow::Result<Vec<(u32, PathBuf, Vec<String>)>> {
    let pid = agent.pid().unwrap_or(0).to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let dir = entry?.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if parent != Some(pid.as_str()) {
            continue;
        }
        let (Ok(exe), Ok(cmdline)) = (
            std::fs::read_link(dir.join("exe")),
            std::fs::read(dir.join("cmdline")),
        ) else {
            continue;
        };
        let is_ours = exe
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("token-agent"));
        if is_ours {
            let args = cmdline
                .split(|b| *b == 0)
                .skip(1)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let Some(child) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            found.push((child, exe, args));
        }
    }
    Ok(found)
}
