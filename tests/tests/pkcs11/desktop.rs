use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use token_agent_e2e::agent::Agent;
use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
use token_agent_e2e::wait_for;
use zbus::zvariant::OwnedObjectPath;

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
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LOGIND: &str = "org.freedesktop.login1";
const SESSION_INTERFACE: &str = "org.freedesktop.login1.Session";
const MANAGER_INTERFACE: &str = "org.freedesktop.login1.Manager";
const SCREENSAVER: &str = "org.freedesktop.ScreenSaver";

/// A session's object path, as logind names session `id`.
fn session(id: &str) -> String {
    format!("/org/freedesktop/login1/session/{id}")
}

/// `path` as an object path for a reply.
fn object_path(path: impl Into<String>) -> zbus::fdo::Result<OwnedObjectPath> {
    OwnedObjectPath::try_from(path.into())
        .map_err(|err| zbus::fdo::Error::InvalidArgs(err.to_string()))
}

/// What the fake logind says of the user's sessions: their `Display`
/// session (None for logind's ("", "/")) and all their sessions.
#[derive(Clone)]
struct UserSessions {
    display: Option<&'static str>,
    all: Vec<&'static str>,
}

/// logind's Manager as far as the agent asks it: the agent's process is in
/// no session (a systemd user unit's), and every user is `/user/_1000`.
struct Manager;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.login1")]
enum LoginError {
    #[zbus(error)]
    ZBus(zbus::Error),
    #[allow(clippy::upper_case_acronyms)]
    NoSessionForPID(String),
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Manager {
    #[zbus(name = "GetSessionByPID")]
    fn session_by_pid(&self, pid: u32) -> Result<OwnedObjectPath, LoginError> {
        Err(LoginError::NoSessionForPID(format!(
            "PID {pid} does not belong to any known session"
        )))
    }

    #[zbus(name = "GetUser")]
    fn user(&self, _uid: u32) -> zbus::fdo::Result<OwnedObjectPath> {
        object_path("/org/freedesktop/login1/user/_1000")
    }
}

/// logind's User object, its `Display` and `Sessions` properties.
struct User(UserSessions);

#[zbus::interface(name = "org.freedesktop.login1.User")]
impl User {
    #[zbus(property)]
    fn display(&self) -> zbus::fdo::Result<(String, OwnedObjectPath)> {
        Ok(match self.0.display {
            Some(id) => (id.to_owned(), object_path(session(id))?),
            None => (String::new(), object_path("/")?),
        })
    }

    #[zbus(property)]
    fn sessions(&self) -> zbus::fdo::Result<Vec<(String, OwnedObjectPath)>> {
        let mut sessions = Vec::new();
        for id in &self.0.all {
            sessions.push(((*id).to_owned(), object_path(session(id))?));
        }
        Ok(sessions)
    }
}

/// A private bus for both of the agent's buses, with a fake logind and a
/// fake screensaver that own their names on it, and a stranger: a
/// connection that owns nothing and sends the same signals, as another
/// local user can on the system bus.
struct Desktop {
    bus: Bus,
    logind: zbus::Connection,
    screensaver: zbus::Connection,
    stranger: zbus::Connection,
    // Dropped last: it runs the connections.
    runtime: tokio::runtime::Runtime,
}

/// A signal's one boolean, or none.
type Argument = Option<bool>;

impl Desktop {
    fn start(sessions: UserSessions) -> anyhow::Result<Self> {
        let bus = Bus::start()?;
        let runtime = tokio::runtime::Runtime::new()?;
        let (logind, screensaver, stranger) = runtime.block_on(async {
            let builder = || zbus::connection::Builder::address(bus.address.as_str());
            let logind = fake_logind(&bus.address, sessions).await?;
            let screensaver = builder()?.name(SCREENSAVER)?.build().await?;
            let stranger = builder()?.build().await?;
            anyhow::Ok((logind, screensaver, stranger))
        })?;
        Ok(Self {
            bus,
            logind,
            screensaver,
            stranger,
            runtime,
        })
    }

    /// Stops the fake logind and starts another, as a restarted logind
    /// takes its name again under a new unique name.
    fn restart_logind(&mut self, sessions: UserSessions) -> anyhow::Result<()> {
        let old = self.logind.clone();
        self.logind = self.runtime.block_on(async {
            old.close().await?;
            fake_logind(&self.bus.address, sessions).await
        })?;
        Ok(())
    }

    /// Sends `interface.member` on `path` from `from`, to every subscriber
    /// (`to` None) or straight to the connection `to`.
    fn emit(
        &self,
        from: &zbus::Connection,
        to: Option<&str>,
        path: &str,
        interface: &str,
        member: &str,
        argument: Argument,
    ) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            match argument {
                Some(value) => {
                    from.emit_signal(to, path, interface, member, &(value,))
                        .await
                }
                None => from.emit_signal(to, path, interface, member, &()).await,
            }
        })?;
        Ok(())
    }

    /// logind's signal.
    fn logind(
        &self,
        path: &str,
        interface: &str,
        member: &str,
        argument: Argument,
    ) -> anyhow::Result<()> {
        self.emit(&self.logind, None, path, interface, member, argument)
    }

    /// The stranger's signal, sent to every subscriber and then straight to
    /// each of `agent`'s connections.
    fn forge(
        &self,
        agent: &Agent,
        path: &str,
        interface: &str,
        member: &str,
        argument: Argument,
    ) -> anyhow::Result<()> {
        self.emit(&self.stranger, None, path, interface, member, argument)?;
        for name in self.connections_of(agent)? {
            self.emit(
                &self.stranger,
                Some(&name),
                path,
                interface,
                member,
                argument,
            )?;
        }
        Ok(())
    }

    /// The unique names of `agent`'s connections to the bus (the "system"
    /// and the "session" one).
    fn connections_of(&self, agent: &Agent) -> anyhow::Result<Vec<String>> {
        let pid = agent.pid().context("the agent has exited")?;
        self.runtime.block_on(async {
            let bus = zbus::fdo::DBusProxy::new(&self.stranger).await?;
            let mut names = Vec::new();
            for name in bus.list_names().await? {
                if name.starts_with(':')
                    && bus
                        .get_connection_unix_process_id(name.as_ref())
                        .await
                        .is_ok_and(|owner| owner == pid)
                {
                    names.push(name.to_string());
                }
            }
            anyhow::ensure!(names.len() >= 2, "the agent's connections: {names:?}");
            Ok(names)
        })
    }
}

/// A connection to the bus at `address` that owns `org.freedesktop.login1`
/// and serves its Manager and the user's User object.
async fn fake_logind(address: &str, sessions: UserSessions) -> anyhow::Result<zbus::Connection> {
    zbus::connection::Builder::address(address)?
        .name(LOGIND)?
        .serve_at("/org/freedesktop/login1", Manager)?
        .serve_at("/org/freedesktop/login1/user/_1000", User(sessions))?
        .build()
        .await
        .context("the fake logind")
}

/// An agent with a SoftHSM module from the configuration, `[desktop]
/// on_lock = on_lock`, both buses on `desktop`'s bus and `XDG_SESSION_ID`
/// `session_id` ("" for unset); its askpass answers the PIN and counts how
/// often it was asked.
fn agent(
    hsm: &SoftHsm,
    desktop: &Desktop,
    on_lock: &str,
    session_id: &str,
) -> anyhow::Result<(Agent, impl Fn() -> usize)> {
    let (program, questions) = counting_askpass(hsm.dir(), &[PIN])?;
    let config =
        format!("[[pkcs11.modules]]\npath = \"{MODULE}\"\n[desktop]\non_lock = \"{on_lock}\"\n");
    let address = desktop.bus.address.clone();
    let mut env = vec![
        ("DBUS_SESSION_BUS_ADDRESS".to_owned(), address.clone()),
        ("DBUS_SYSTEM_BUS_ADDRESS".to_owned(), address),
    ];
    // Unset is left unset, as a systemd user unit has it; set empty only
    // to hide one the tests inherited.
    if !session_id.is_empty() || std::env::var_os("XDG_SESSION_ID").is_some() {
        env.push(("XDG_SESSION_ID".to_owned(), session_id.to_owned()));
    }
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

/// A fake logind with the user in display session c7 (and c8).
fn display_c7() -> UserSessions {
    UserSessions {
        display: Some("c7"),
        all: vec!["c7", "c8"],
    }
}

/// How long a signal that must change nothing is given to change it.
const SETTLE: Duration = Duration::from_millis(500);

/// Waits until the agent has logged `ignored` signals ignored for their
/// sender in all, then a little longer for others to (not) arrive, and
/// checks it still lists `listed` keys.
fn still_lists(agent: &Agent, ignored: usize, listed: usize) -> anyhow::Result<()> {
    let count = || {
        agent
            .log_text()
            .matches("ignored a signal not sent by")
            .count()
    };
    wait_for(Duration::from_secs(5), || count() >= ignored);
    std::thread::sleep(SETTLE);
    let now = agent.listed()?.len();
    anyhow::ensure!(
        now == listed,
        "the agent lists {now} keys, not {listed}: a signal it should ignore moved it:\n{}",
        agent.log_text()
    );
    anyhow::ensure!(
        count() == ignored,
        "the agent did not log {ignored} ignored signals:\n{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn issue_15_the_agent_locks_with_the_session_and_forgets_pins() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("leo", &[KeyKind::P256])?;
    let desktop = Desktop::start(display_c7())?;
    let (agent, questions) = agent(&hsm, &desktop, "lock", "t1")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(10))?;
    sign_and_verify(&agent, &listed[0], "before")?;
    sign_and_verify(&agent, &listed[0], "cached")?;
    assert_eq!(questions(), 1, "the PIN was not cached");

    // Another session's lock is not ours, nor is the display session when
    // XDG_SESSION_ID names another.
    for other in ["other", "c7"] {
        desktop.logind(&session(other), SESSION_INTERFACE, "Lock", None)?;
    }
    still_lists(&agent, 0, 1)?;

    desktop.logind(&session("t1"), SESSION_INTERFACE, "Lock", None)?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    assert_eq!(agent.status()?["locked"], true);
    desktop.logind(&session("t1"), SESSION_INTERFACE, "Unlock", None)?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    sign_and_verify(&agent, &listed[0], "after")?;
    assert_eq!(questions(), 2, "the PIN survived the session lock");

    // Suspend locks too.
    desktop.logind(
        "/org/freedesktop/login1",
        MANAGER_INTERFACE,
        "PrepareForSleep",
        Some(true),
    )?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    desktop.logind(&session("t1"), SESSION_INTERFACE, "Unlock", None)?;
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
    let desktop = Desktop::start(display_c7())?;
    let (agent, questions) = agent(&hsm, &desktop, "forget-pins", "t1")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(10))?;
    sign_and_verify(&agent, &listed[0], "before")?;
    assert_eq!(questions(), 1);
    desktop.emit(
        &desktop.screensaver,
        None,
        "/org/freedesktop/ScreenSaver",
        SCREENSAVER,
        "ActiveChanged",
        Some(true),
    )?;
    assert!(wait_for(Duration::from_secs(5), || agent
        .log_text()
        .contains("the screensaver locked the screen")));
    assert_eq!(agent.listed()?.len(), 1, "forget-pins locked the agent");
    sign_and_verify(&agent, &listed[0], "after")?;
    assert_eq!(questions(), 2, "the PIN was not forgotten");
    Ok(())
}

/// Any local user may send signals on the system bus, and straight to the
/// agent's connection, where match rules do not apply: only the owner of
/// `org.freedesktop.login1` locks and unlocks the agent.
#[test]
fn the_session_lock_obeys_logind_only() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("ned", &[KeyKind::P256])?;
    let desktop = Desktop::start(display_c7())?;
    let (agent, _questions) = agent(&hsm, &desktop, "lock", "t1")?;
    wait_listed(&agent, 1, Duration::from_secs(10))?;

    // Each forgery goes out broadcast (the bus drops it: the agent's rules
    // name logind as sender) and once to each of the agent's connections
    // (two: a logind signal on the "session bus" matches no rule there).
    desktop.forge(&agent, &session("t1"), SESSION_INTERFACE, "Lock", None)?;
    desktop.forge(
        &agent,
        "/org/freedesktop/login1",
        MANAGER_INTERFACE,
        "PrepareForSleep",
        Some(true),
    )?;
    still_lists(&agent, 2, 1)?;

    desktop.logind(&session("t1"), SESSION_INTERFACE, "Lock", None)?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    desktop.forge(&agent, &session("t1"), SESSION_INTERFACE, "Unlock", None)?;
    still_lists(&agent, 3, 0)?;
    desktop.logind(&session("t1"), SESSION_INTERFACE, "Unlock", None)?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;

    desktop.logind(
        "/org/freedesktop/login1",
        MANAGER_INTERFACE,
        "PrepareForSleep",
        Some(true),
    )?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    Ok(())
}

/// When logind restarts, the agent follows its name to the new owner, and
/// still to no one else.
#[test]
fn the_session_lock_follows_a_restarted_logind() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("pat", &[KeyKind::P256])?;
    let mut desktop = Desktop::start(display_c7())?;
    let (agent, _questions) = agent(&hsm, &desktop, "lock", "t1")?;
    wait_listed(&agent, 1, Duration::from_secs(10))?;

    desktop.restart_logind(display_c7())?;
    desktop.forge(&agent, &session("t1"), SESSION_INTERFACE, "Lock", None)?;
    still_lists(&agent, 1, 1)?;
    desktop.logind(&session("t1"), SESSION_INTERFACE, "Lock", None)?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    desktop.logind(&session("t1"), SESSION_INTERFACE, "Unlock", None)?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    Ok(())
}

/// The screensaver's `ActiveChanged` counts only from the owner of its name.
#[test]
fn the_session_lock_obeys_the_screensaver_only() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("ora", &[KeyKind::P256])?;
    let desktop = Desktop::start(display_c7())?;
    let (agent, _questions) = agent(&hsm, &desktop, "lock", "t1")?;
    wait_listed(&agent, 1, Duration::from_secs(10))?;
    let path = "/org/freedesktop/ScreenSaver";

    desktop.forge(&agent, path, SCREENSAVER, "ActiveChanged", Some(true))?;
    still_lists(&agent, 1, 1)?;
    desktop.emit(
        &desktop.screensaver,
        None,
        path,
        SCREENSAVER,
        "ActiveChanged",
        Some(true),
    )?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    desktop.forge(&agent, path, SCREENSAVER, "ActiveChanged", Some(false))?;
    still_lists(&agent, 2, 0)?;
    desktop.emit(
        &desktop.screensaver,
        None,
        path,
        SCREENSAVER,
        "ActiveChanged",
        Some(false),
    )?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    Ok(())
}

/// A systemd user unit runs outside any session and without
/// `XDG_SESSION_ID`: the agent asks logind for the user's display session
/// and follows that one only.
#[test]
fn without_xdg_session_id_the_agent_follows_the_display_session() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("pia", &[KeyKind::P256])?;
    let desktop = Desktop::start(display_c7())?;
    let (agent, _questions) = agent(&hsm, &desktop, "lock", "")?;
    wait_listed(&agent, 1, Duration::from_secs(10))?;

    // c8 is the user's too, but not the display session; t1 is nobody's.
    for other in ["c8", "t1"] {
        desktop.logind(&session(other), SESSION_INTERFACE, "Lock", None)?;
    }
    still_lists(&agent, 0, 1)?;
    assert!(
        agent.log_text().contains(&session("c7")),
        "{}",
        agent.log_text()
    );
    desktop.logind(&session("c7"), SESSION_INTERFACE, "Lock", None)?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    desktop.logind(&session("c8"), SESSION_INTERFACE, "Unlock", None)?;
    still_lists(&agent, 0, 0)?;
    desktop.logind(&session("c7"), SESSION_INTERFACE, "Unlock", None)?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    Ok(())
}

/// With no display session and two sessions, the agent cannot tell which is
/// its own: it says so and follows no session's lock, only suspend.
#[test]
fn an_agent_without_a_session_follows_suspend_only() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("quin", &[KeyKind::P256])?;
    let desktop = Desktop::start(UserSessions {
        display: None,
        all: vec!["c7", "c8"],
    })?;
    let (agent, _questions) = agent(&hsm, &desktop, "lock", "")?;
    wait_listed(&agent, 1, Duration::from_secs(10))?;

    for id in ["c7", "c8"] {
        desktop.logind(&session(id), SESSION_INTERFACE, "Lock", None)?;
    }
    still_lists(&agent, 0, 1)?;
    let log = agent.log_text();
    assert!(
        log.contains("cannot tell which logind session is the agent's"),
        "{log}"
    );
    desktop.logind(
        "/org/freedesktop/login1",
        MANAGER_INTERFACE,
        "PrepareForSleep",
        Some(true),
    )?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    // No session's unlock lifts it; the screensaver's does.
    desktop.logind(&session("c7"), SESSION_INTERFACE, "Unlock", None)?;
    still_lists(&agent, 0, 0)?;
    desktop.emit(
        &desktop.screensaver,
        None,
        "/org/freedesktop/ScreenSaver",
        SCREENSAVER,
        "ActiveChanged",
        Some(false),
    )?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    Ok(())
}
