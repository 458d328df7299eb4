use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use token_agent_e2e::agent::Agent;
use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
use token_agent_e2e::{check, wait_for};

use crate::{counting_askpass, sign_and_verify, start_agent_with_env, wait_listed};

/// A private D-Bus daemon (`dbus-daemon --session`), stopped when dropped.
struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start() -> anyhow::Result<Self> {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start dbus-daemon (apt install dbus-daemon)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut address = String::new();
        BufReader::new(stdout).read_line(&mut address)?;
        Ok(Self {
            child,
            address: address.trim().to_owned(),
        })
    }

    /// Emits a signal on the bus as logind or a screensaver would.
    fn signal(&self, path: &str, member: &str, args: &[&str]) -> anyhow::Result<()> {
        check(
            Command::new("dbus-send")
                .arg(format!("--bus={}", self.address))
                .args(["--type=signal", path, member])
                .args(args)
                .output()?,
            &format!("dbus-send {member}"),
        )?;
        Ok(())
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent with a SoftHSM module from the configuration, `[desktop]
/// on_lock = on_lock`, both buses on `bus` and session id "t1"; its askpass
/// answers the PIN and counts how often it was asked.
fn agent(hsm: &SoftHsm, bus: &Bus, on_lock: &str) -> anyhow::Result<(Agent, impl Fn() -> usize)> {
    let (program, questions) = counting_askpass(hsm.dir(), &[PIN])?;
    let config =
        format!("[[pkcs11.modules]]\npath = \"{MODULE}\"\n[desktop]\non_lock = \"{on_lock}\"\n");
    let env = vec![
        ("DBUS_SESSION_BUS_ADDRESS".to_owned(), bus.address.clone()),
        ("DBUS_SYSTEM_BUS_ADDRESS".to_owned(), bus.address.clone()),
        ("XDG_SESSION_ID".to_owned(), "t1".to_owned()),
    ];
    let agent = start_agent_with_env(hsm, &[], &config, &program, env)?;
    let followed = wait_for(Duration::from_secs(10), || {
        let log = agent.log_text();
        log.contains("following the session lock through logind")
            && log.contains("following the screensaver")
    });
    anyhow::ensure!(
        followed,
        "the agent does not follow the bus:\n{}",
        agent.log_text()
    );
    Ok((agent, questions))
}

const SESSION: &str = "/org/freedesktop/login1/session/t1";

#[test]
fn issue_15_the_agent_locks_with_the_session_and_forgets_pins() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("leo", &[KeyKind::P256])?;
    let bus = Bus::start()?;
    let (agent, questions) = agent(&hsm, &bus, "lock")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(10))?;
    sign_and_verify(&agent, &listed[0], "before")?;
    sign_and_verify(&agent, &listed[0], "cached")?;
    assert_eq!(questions(), 1, "the PIN was not cached");

    // Another session's lock is not ours.
    bus.signal(
        "/org/freedesktop/login1/session/other",
        "org.freedesktop.login1.Session.Lock",
        &[],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.listed()?.len(), 1);

    bus.signal(SESSION, "org.freedesktop.login1.Session.Lock", &[])?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    assert_eq!(agent.status()?["locked"], true);
    bus.signal(SESSION, "org.freedesktop.login1.Session.Unlock", &[])?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    sign_and_verify(&agent, &listed[0], "after")?;
    assert_eq!(questions(), 2, "the PIN survived the session lock");

    // Suspend locks too.
    bus.signal(
        "/org/freedesktop/login1",
        "org.freedesktop.login1.Manager.PrepareForSleep",
        &["boolean:true"],
    )?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    bus.signal(SESSION, "org.freedesktop.login1.Session.Unlock", &[])?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    // Logging out of the token on lock neither stalled nor lost its helper
    // (a blocking logout on the runtime once timed out and killed it).
    let log = agent.log_text();
    assert!(
        !log.contains("could not log out") && !log.contains("restarted"),
        "{log}"
    );
    Ok(())
}

#[test]
fn issue_15_forget_pins_keeps_keys_usable() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("mia", &[KeyKind::P256])?;
    let bus = Bus::start()?;
    let (agent, questions) = agent(&hsm, &bus, "forget-pins")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(10))?;
    sign_and_verify(&agent, &listed[0], "before")?;
    assert_eq!(questions(), 1);
    bus.signal(
        "/org/freedesktop/ScreenSaver",
        "org.freedesktop.ScreenSaver.ActiveChanged",
        &["boolean:true"],
    )?;
    assert!(wait_for(Duration::from_secs(5), || agent
        .log_text()
        .contains("the screensaver locked the screen")));
    assert_eq!(agent.listed()?.len(), 1, "forget-pins locked the agent");
    sign_and_verify(&agent, &listed[0], "after")?;
    assert_eq!(questions(), 2, "the PIN was not forgotten");
    Ok(())
}
