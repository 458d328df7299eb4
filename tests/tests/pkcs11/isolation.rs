use std::process::Stdio;
use std::time::{Duration, Instant};

use token_agent_e2e::agent::Agent;
use token_agent_e2e::softhsm::{build_shim, KeyKind, Shim, SoftHsm, MODULE, PIN};
use token_agent_e2e::{agent_binary, check, pkcs11_helper_binary, sign_file};

use crate::{
    add_provider, agent_options, askpass, helpers, sign_and_verify, start_agent, try_sign,
    wait_listed,
};

/// An agent serving a configured SoftHSM token "good" and the token "bad"
/// of a second SoftHSM behind a shim that misbehaves as `mode` says.
fn agent_with_shim(
    mode: Shim,
) -> anyhow::Result<(
    token_agent_e2e::agent::Agent,
    SoftHsm,
    SoftHsm,
    tempfile::TempDir,
)> {
    let good = SoftHsm::new()?;
    good.token("good", &[KeyKind::P256])?;
    let bad = SoftHsm::new()?;
    bad.token("bad", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new()
        .prefix("pkcs11-modules")
        .tempdir()?;
    let shim = build_shim(modules.path(), mode, &bad)?;
    let allow = format!("/usr/lib*/*,{}/*", modules.path().display());
    let config = format!(
        "[pkcs11]\ntimeout_seconds = 3\npoll_interval_ms = 300\n\
         [[pkcs11.modules]]\npath = \"{MODULE}\"\n"
    );
    let agent = start_agent(&good, &["-P", &allow], &config, PIN)?;
    wait_listed(&agent, 1, Duration::from_secs(20))?;
    check(add_provider(&agent, &shim, PIN)?, "ssh-add -s shim")?;
    wait_listed(&agent, 2, Duration::from_secs(5))?;
    Ok((agent, good, bad, modules))
}

fn line(listed: &[String], suffix: &str) -> String {
    listed
        .iter()
        .find(|l| l.ends_with(suffix))
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_module_that_crashes_in_c_sign_costs_only_its_helper() -> anyhow::Result<()> {
    let (mut agent, _good, _bad, _modules) = agent_with_shim(Shim::Crash)?;
    let listed = agent.listed()?;
    let bad = line(&listed, "bad: p256-key");
    for round in 0..2 {
        let output = try_sign(&agent, &bad, &format!("crash{round}"))?;
        assert!(!output.status.success());
        assert!(agent.alive(), "the agent died");
    }
    let log = agent.log_text();
    assert!(
        log.contains("crashed in C_Sign (signal 6, SIGABRT); restarted it"),
        "{log}"
    );
    // The crashing module's key is still listed, and the other token signs.
    assert_eq!(agent.listed()?.len(), 2);
    sign_and_verify(&agent, &line(&listed, "good: p256-key"), "good")?;
    Ok(())
}

#[test]
fn a_module_that_hangs_in_c_sign_is_killed_after_the_time_limit() -> anyhow::Result<()> {
    let (mut agent, _good, _bad, _modules) = agent_with_shim(Shim::Hang)?;
    let listed = agent.listed()?;
    let bad = line(&listed, "bad: p256-key");
    let public = agent.dir().join("hang.pub");
    std::fs::write(&public, format!("{bad}\n"))?;
    let message = agent.dir().join("hang.txt");
    std::fs::write(&message, "message\n")?;
    let started = Instant::now();
    let mut held = sign_file(agent.command("ssh-keygen"), &public, &message)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // While the signature hangs, listing answers at once and the other token signs.
    std::thread::sleep(Duration::from_millis(500));
    let list_started = Instant::now();
    assert_eq!(agent.listed()?.len(), 2);
    assert!(
        list_started.elapsed() < Duration::from_secs(1),
        "listing took {:?}",
        list_started.elapsed()
    );
    sign_and_verify(&agent, &line(&listed, "good: p256-key"), "good")?;
    let status = held.wait()?;
    assert!(!status.success());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert!(agent.alive());
    let log = agent.log_text();
    assert!(
        log.contains("did not answer C_Sign within 3 s; killed it; restarted it"),
        "{log}"
    );
    assert_eq!(agent.listed()?.len(), 2);
    Ok(())
}

#[test]
fn a_module_that_prints_and_reads_cannot_disturb_its_helper() -> anyhow::Result<()> {
    let (agent, _good, _bad, _modules) = agent_with_shim(Shim::Chatty)?;
    let listed = agent.listed()?;
    for round in 0..2 {
        sign_and_verify(
            &agent,
            &line(&listed, "bad: p256-key"),
            &format!("chatty{round}"),
        )?;
    }
    // What it printed went to the log, and it read nothing of the protocol.
    let log = agent.log_text();
    assert!(log.contains("chatty module: C_Sign called"), "{log}");
    assert!(!log.contains("chatty module: read"), "{log}");
    assert!(!log.contains("restarted it"), "{log}");
    Ok(())
}

#[test]
fn modules_run_in_the_helper_binary_or_in_the_agent_binary_without_it() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("helped", &[KeyKind::P256])?;
    let config = format!("[[pkcs11.modules]]\npath = \"{MODULE}\"\n");

    // Beside the agent, as cargo builds it and the package installs it.
    let agent = start_agent(&hsm, &[], &config, PIN)?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(20))?;
    sign_and_verify(&agent, &listed[0], "beside")?;
    let running = helpers(&agent)?;
    assert!(!running.is_empty(), "{}", agent.log_text());
    let helper = pkcs11_helper_binary()?.canonicalize()?;
    for (_, exe, args) in &running {
        assert_eq!(exe, &helper);
        assert!(args.is_empty(), "{args:?}");
    }
    drop(agent);

    // A token-agent copied alone serves as its own helper.
    let alone = tempfile::tempdir()?;
    let binary = alone.path().join("token-agent");
    std::fs::copy(agent_binary()?, &binary)?;
    let program = askpass(hsm.dir(), PIN)?;
    let agent = Agent::start_binary(
        &binary,
        agent_options(&hsm, &[], &config, &program, Vec::new()),
    )?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(20))?;
    sign_and_verify(&agent, &listed[0], "alone")?;
    let running = helpers(&agent)?;
    assert!(!running.is_empty(), "{}", agent.log_text());
    for (_, exe, args) in &running {
        assert_eq!(exe, &binary.canonicalize()?);
        assert_eq!(args, &["--pkcs11-helper"]);
    }
    assert!(
        agent
            .log_text()
            .contains("no token-agent-pkcs11-helper beside the agent"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

/// Starts `ssh-keygen -Y sign` with the listed key `line` in the background.
fn start_signing(
    agent: &token_agent_e2e::agent::Agent,
    line: &str,
    name: &str,
) -> anyhow::Result<std::process::Child> {
    let public = agent.dir().join(format!("{name}.pub"));
    std::fs::write(&public, format!("{line}\n"))?;
    let message = agent.dir().join(format!("{name}.txt"));
    std::fs::write(&message, "message\n")?;
    Ok(sign_file(agent.command("ssh-keygen"), &public, &message)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

#[test]
fn a_module_unloaded_during_its_signature_is_not_called_a_crash() -> anyhow::Result<()> {
    let (agent, _good, _bad, modules) = agent_with_shim(Shim::Hang)?;
    let bad = line(&agent.listed()?, "bad: p256-key");
    let mut held = start_signing(&agent, &bad, "unloaded")?;
    std::thread::sleep(Duration::from_millis(700));
    let shim = modules.path().join("libhang-pkcs11.so");
    check(
        agent.ssh_add([std::ffi::OsStr::new("-e"), shim.as_os_str()])?,
        "ssh-add -e",
    )?;
    assert!(!held.wait()?.success());
    let failed = token_agent_e2e::wait_for(Duration::from_secs(5), || {
        agent.log_text().contains("request failed")
    });
    let log = agent.log_text();
    assert!(failed, "{log}");
    assert!(
        log.contains("was unloaded (ssh-add -e) while it was in C_Sign"),
        "{log}"
    );
    assert!(!log.contains("crashed"), "{log}");
    assert!(!log.contains("cannot restart"), "{log}");
    Ok(())
}

#[test]
fn a_signature_stopped_because_another_one_hung_is_told_so() -> anyhow::Result<()> {
    let (agent, _good, _bad, _modules) = agent_with_shim(Shim::Hang)?;
    let bad = line(&agent.listed()?, "bad: p256-key");
    // The first hangs past its 3 s limit, and its helper is killed while
    // the second, 1.5 s younger, is still within its own.
    let mut first = start_signing(&agent, &bad, "first")?;
    std::thread::sleep(Duration::from_millis(1500));
    let mut second = start_signing(&agent, &bad, "second")?;
    assert!(!first.wait()?.success());
    assert!(!second.wait()?.success());
    let log = agent.log_text();
    assert!(
        log.contains("did not answer C_Sign within 3 s; killed it; restarted it"),
        "{log}"
    );
    assert!(
        log.contains(
            "was stopped in C_Sign because another call to the module hung past its limit"
        ),
        "{log}"
    );
    assert!(!log.contains("crashed"), "{log}");
    Ok(())
}
