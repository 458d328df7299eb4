//! Linux desktops: follow the session's lock over D-Bus.
//!
//! When `[desktop] on_lock` asks for it, the agent locks (or only forgets
//! its cached PINs) when the desktop session locks and when the machine
//! prepares to sleep, and lifts its session lock when the person unlocks the
//! session. It listens to:
//!
//! - logind on the system bus: `org.freedesktop.login1.Session` `Lock` and
//!   `Unlock` on this session's object (from `XDG_SESSION_ID`; every
//!   session's when it is unknown), and `org.freedesktop.login1.Manager`
//!   `PrepareForSleep(true)`;
//! - the screensaver on the session bus: `org.freedesktop.ScreenSaver` (KDE,
//!   Xfce, ...) and `org.gnome.ScreenSaver` `ActiveChanged(bool)`.
//!
//! A bus that cannot be reached is logged once and left alone: the agent
//! works without it.

use std::sync::Arc;

use token_agent_dbus::{Connection, MatchRule};
use token_agent_server::Router;

use crate::config::OnLock;

/// Starts following the session on the current runtime.
pub(crate) fn follow(router: &Arc<Router>, on_lock: OnLock) {
    if on_lock == OnLock::Nothing {
        return;
    }
    let session = std::env::var("XDG_SESSION_ID").ok();
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
    session: Option<&str>,
) -> token_agent_dbus::Result<()> {
    let bus = Connection::system().await?;
    let sessions = MatchRule::signal().interface("org.freedesktop.login1.Session");
    let path = session.map(session_path);
    let sessions = match &path {
        Some(path) => sessions.path(path),
        None => sessions.path_namespace("/org/freedesktop/login1/session"),
    };
    let sleep = MatchRule::signal()
        .interface("org.freedesktop.login1.Manager")
        .member("PrepareForSleep");
    let mut events = bus.subscribe(vec![sessions, sleep]).await?;
    tracing::info!(
        session = path.as_deref().unwrap_or("any"),
        "following the session lock through logind"
    );
    while let Some(message) = events.next().await {
        match message.member() {
            Some("Lock") => apply(router, on_lock, true, "the session locked"),
            Some("Unlock") => apply(router, on_lock, false, "the session unlocked"),
            Some("PrepareForSleep") if message.bool_argument().unwrap_or(false) => {
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
    let active_changed = |interface: &str| {
        MatchRule::signal()
            .interface(interface)
            .member("ActiveChanged")
    };
    let mut events = bus
        .subscribe(vec![
            active_changed("org.freedesktop.ScreenSaver"),
            active_changed("org.gnome.ScreenSaver"),
        ])
        .await?;
    tracing::info!("following the screensaver");
    while let Some(message) = events.next().await {
        match message.bool_argument() {
            Ok(true) => apply(router, on_lock, true, "the screensaver locked the screen"),
            Ok(false) => apply(router, on_lock, false, "the screensaver was dismissed"),
            Err(err) => tracing::debug!(%err, "an ActiveChanged signal without its boolean"),
        }
    }
    tracing::warn!("the session bus closed: no longer following the screensaver");
    Ok(())
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
