//! Linux desktops: follow the session's lock over D-Bus.
//!
//! When `[desktop] on_lock` asks for it, the agent locks (or only forgets
//! its cached PINs) when the desktop session locks and when the machine
//! prepares to sleep, and lifts its session lock when the person unlocks the
//! session. It listens to:
//!
//! - logind on the system bus: `org.freedesktop.login1.Session` `Lock` and
//!   `Unlock` on the agent's own session's object (see [`own_session`]; with
//!   no session found, none), and `org.freedesktop.login1.Manager`
//!   `PrepareForSleep(true)`;
//! - the screensaver on the session bus: `org.freedesktop.ScreenSaver` (KDE,
//!   Xfce, ...) and `org.gnome.ScreenSaver` `ActiveChanged(bool)`.
//!
//! Only signals sent by the connection that owns the service's name count
//! (`org.freedesktop.login1`, or the screensaver's name, followed through
//! the bus's `NameOwnerChanged`): any local user may send signals on the
//! system bus, straight to the agent too, where match rules do not apply.
//!
//! A bus that cannot be reached is logged once and left alone: the agent
//! works without it.

use std::sync::Arc;

use token_agent_dbus::{Body, Connection, MatchRule, Message, NameOwner};
use token_agent_server::Router;

use crate::config::OnLock;

const LOGIND: &str = "org.freedesktop.login1";
const LOGIND_PATH: &str = "/org/freedesktop/login1";
const MANAGER: &str = "org.freedesktop.login1.Manager";
const SESSION: &str = "org.freedesktop.login1.Session";
const USER: &str = "org.freedesktop.login1.User";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
/// The screensavers followed: each owns this name on the session bus and
/// sends `ActiveChanged` on the interface of the same name.
const SCREENSAVERS: [&str; 2] = ["org.freedesktop.ScreenSaver", "org.gnome.ScreenSaver"];

/// Starts following the session on the current runtime.
pub(crate) fn follow(router: &Arc<Router>, on_lock: OnLock) {
    if on_lock == OnLock::Nothing {
        return;
    }
    let session = std::env::var("XDG_SESSION_ID")
        .ok()
        .filter(|id| !id.is_empty());
    let system = router.clone();
    tokio::spawn(async move {
        if let Err(err) = follow_logind(&system, on_lock, session.as_deref()).await {
            tracing::warn!(%err, "cannot follow logind's session lock on the system bus");
        }
    });
    let screensaver = router.clone();
    tokio::spawn(async move {
        if let Err(err) = follow_screensaver(&screensaver, on_lock).await {
            tracing::warn!(%err, "cannot follow the screensaver on the session bus");
        }
    });
}

async fn follow_logind(
    router: &Router,
    on_lock: OnLock,
    session_id: Option<&str>,
) -> token_agent_dbus::Result<()> {
    let bus = Connection::system().await?;
    let session = own_session(&bus, session_id).await;
    // The owner's changes and its signals in one subscription, so they
    // arrive in the order the bus sent them.
    let mut rules = vec![
        NameOwner::rule(LOGIND),
        MatchRule::signal()
            .sender(LOGIND)
            .interface(MANAGER)
            .member("PrepareForSleep")
            .path(LOGIND_PATH),
    ];
    if let Some(path) = &session {
        rules.push(
            MatchRule::signal()
                .sender(LOGIND)
                .interface(SESSION)
                .path(path),
        );
    }
    let mut events = bus.subscribe(rules).await?;
    let mut logind = NameOwner::query(&bus, LOGIND).await?;
    if session.is_none() {
        tracing::warn!(
            "cannot tell which logind session is the agent's (XDG_SESSION_ID is not set, the \
             agent's process is in no session, and logind names no display session or single \
             session of this user): the agent locks when the machine goes to sleep (and then \
             only the screensaver unlocks it), but not when a session locks. Set \
             XDG_SESSION_ID in the agent's environment to follow that session"
        );
    }
    tracing::info!(
        session = session.as_deref().unwrap_or("none"),
        logind = logind.owner().unwrap_or("not running"),
        "following the session lock through logind"
    );
    while let Some(message) = events.next().await {
        if logind.update(&message) {
            continue;
        }
        if !logind.sent(&message) {
            ignore(&message, &logind);
            continue;
        }
        let ours = session.is_some() && message.path() == session.as_deref();
        match (message.interface(), message.member()) {
            (Some(SESSION), Some("Lock")) if ours => {
                apply(router, on_lock, true, "the session locked");
            }
            (Some(SESSION), Some("Unlock")) if ours => {
                apply(router, on_lock, false, "the session unlocked");
            }
            (Some(MANAGER), Some("PrepareForSleep"))
                if message.bool_argument().unwrap_or(false) =>
            {
                apply(router, on_lock, true, "the machine goes to sleep");
            }
            _ => {}
        }
    }
    tracing::warn!("the system bus closed: no longer following logind's session lock");
    Ok(())
}

async fn follow_screensaver(router: &Router, on_lock: OnLock) -> token_agent_dbus::Result<()> {
    let bus = Connection::session().await?;
    let mut rules = Vec::new();
    for name in SCREENSAVERS {
        rules.push(NameOwner::rule(name));
        rules.push(
            MatchRule::signal()
                .sender(name)
                .interface(name)
                .member("ActiveChanged"),
        );
    }
    let mut events = bus.subscribe(rules).await?;
    let mut owners = Vec::new();
    for name in SCREENSAVERS {
        owners.push(NameOwner::query(&bus, name).await?);
    }
    tracing::info!("following the screensaver");
    while let Some(message) = events.next().await {
        if owners.iter_mut().any(|owner| owner.update(&message)) {
            continue;
        }
        let Some(owner) = owners
            .iter()
            .find(|owner| Some(owner.name()) == message.interface())
        else {
            continue;
        };
        if !owner.sent(&message) {
            ignore(&message, owner);
            continue;
        }
        match message.bool_argument() {
            Ok(true) => apply(router, on_lock, true, "the screensaver locked the screen"),
            Ok(false) => apply(router, on_lock, false, "the screensaver was dismissed"),
            Err(err) => tracing::debug!(%err, "an ActiveChanged signal without its boolean"),
        }
    }
    tracing::warn!("the session bus closed: no longer following the screensaver");
    Ok(())
}

/// logind's object for the agent's own session, the only one whose `Lock`
/// and `Unlock` count: `XDG_SESSION_ID`'s when it is set; else the session
/// of the agent's process; else, for a process outside any session (a
/// systemd user unit's), the user's display session, or the user's only
/// session. None when none of these tells.
async fn own_session(bus: &Connection, id: Option<&str>) -> Option<String> {
    if let Some(id) = id {
        return Some(session_path(id));
    }
    match session_of_process(bus).await {
        Ok(path) => return Some(path),
        Err(err) => tracing::debug!(%err, "the agent's process is in no logind session"),
    }
    match session_of_user(bus).await {
        Ok(path) => path,
        Err(err) => {
            tracing::debug!(%err, "logind does not say which session is this user's");
            None
        }
    }
}

/// `GetSessionByPID` for this process.
async fn session_of_process(bus: &Connection) -> token_agent_dbus::Result<String> {
    let reply = bus
        .call(
            LOGIND,
            LOGIND_PATH,
            MANAGER,
            "GetSessionByPID",
            &Body::new().u32(std::process::id()),
        )
        .await?;
    one_path(&reply)
}

/// The user's `Display` session, or the user's one session when there is
/// exactly one.
async fn session_of_user(bus: &Connection) -> token_agent_dbus::Result<Option<String>> {
    let uid = nix::unistd::getuid().as_raw();
    let reply = bus
        .call(
            LOGIND,
            LOGIND_PATH,
            MANAGER,
            "GetUser",
            &Body::new().u32(uid),
        )
        .await?;
    let user = one_path(&reply)?;
    let property = |name: &'static str| {
        let user = user.clone();
        async move {
            bus.call(
                LOGIND,
                &user,
                PROPERTIES,
                "Get",
                &Body::new().str(USER).str(name),
            )
            .await?
            .object_paths()
        }
    };
    // Display is ("", "/") when the user has no display session.
    if let Some(path) = property("Display").await?.into_iter().find(|p| p != "/") {
        return Ok(Some(path));
    }
    Ok(match property("Sessions").await?.as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    })
}

/// The one object path of a reply.
fn one_path(reply: &Message) -> token_agent_dbus::Result<String> {
    match reply.object_paths()?.as_slice() {
        [path] => Ok(path.clone()),
        _ => Err(token_agent_dbus::Error::Signature {
            expected: "o",
            found: reply.signature().to_owned(),
        }),
    }
}

/// Logs a signal that claims a service's interface but was not sent by the
/// owner of its name: another user's forgery, sent straight to the agent.
fn ignore(message: &Message, owner: &NameOwner) {
    tracing::warn!(
        sender = message.sender().unwrap_or("unknown"),
        signal = format!(
            "{}.{}",
            message.interface().unwrap_or(""),
            message.member().unwrap_or("")
        ),
        path = message.path().unwrap_or(""),
        "ignored a signal not sent by {}, which is the only sender the agent obeys",
        owner.name()
    );
}

fn apply(router: &Router, on_lock: OnLock, locked: bool, why: &str) {
    tracing::info!(why, "desktop session event");
    match on_lock {
        OnLock::Nothing => {}
        OnLock::Lock => router.set_session_locked(locked),
        OnLock::ForgetPins => {
            if locked {
                router.forget_secrets();
            }
        }
    }
}

/// logind's object path for session `id` (sd-bus label escaping: every byte
/// that is not an ASCII letter or digit, and a leading digit, as `_xx`).
fn session_path(id: &str) -> String {
    let mut path = String::from("/org/freedesktop/login1/session/");
    for (i, byte) in id.bytes().enumerate() {
        if byte.is_ascii_alphabetic() || (byte.is_ascii_digit() && i > 0) {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("_{byte:02x}"));
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_escaped_as_logind_does() {
        assert_eq!(session_path("2"), "/org/freedesktop/login1/session/_32");
        assert_eq!(session_path("c12"), "/org/freedesktop/login1/session/c12");
        assert_eq!(session_path("a-b"), "/org/freedesktop/login1/session/a_2db");
    }
}
