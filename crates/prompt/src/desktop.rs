//! Desktop notifications: the Desktop Notifications Specification's
//! `org.freedesktop.Notifications` service on the session bus, which every
//! Linux desktop (GNOME Shell, KDE Plasma, dunst, mako, xfce4-notifyd) runs.
//!
//! `Notify` shows a notice that does not expire by itself (`expire_timeout`
//! 0); `CloseNotification` withdraws it when the device answers. The session
//! bus is the one `DBUS_SESSION_BUS_ADDRESS` names, or `$XDG_RUNTIME_DIR/bus`.

use token_agent_dbus::{Body, Connection};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

const SERVICE: &str = "org.freedesktop.Notifications";
const PATH: &str = "/org/freedesktop/Notifications";

/// Connects to the session bus, or says at debug level why there is none (an
/// agent started outside a desktop session, a system service).
pub(crate) async fn session_bus() -> Option<Connection> {
    match Connection::session().await {
        Ok(bus) => Some(bus),
        Err(err) => {
            tracing::debug!(%err, "no session bus: touch notices go to the log only");
            None
        }
    }
}

/// A notice on the desktop, closed when this is dropped.
#[derive(Debug)]
pub(crate) struct Shown {
    bus: Connection,
    /// The `Notify` call, answering the notification's id.
    notify: Option<JoinHandle<Option<u32>>>,
    runtime: Handle,
}

impl Shown {
    /// Asks the notification server to show `summary` and `body`.
    pub(crate) fn new(bus: Connection, summary: &str, body: &str, runtime: Handle) -> Self {
        let call = {
            let bus = bus.clone();
            let summary = summary.to_owned();
            let body = body.to_owned();
            runtime.spawn(async move { notify(&bus, &summary, &body).await })
        };
        Self {
            bus,
            notify: Some(call),
            runtime,
        }
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        // The Notify call runs on in its own task even when the notice is
        // withdrawn before the server answered, so its id is always known and
        // the notice is always closed.
        let Some(call) = self.notify.take() else {
            return;
        };
        let bus = self.bus.clone();
        self.runtime.spawn(async move {
            if let Ok(Some(id)) = call.await {
                close(&bus, id).await;
            }
        });
    }
}

async fn notify(bus: &Connection, summary: &str, body: &str) -> Option<u32> {
    // A server with body-markup reads the body as markup: a key comment or
    // host name with `<` or `&` would show wrong, or as a link of the
    // sender's choosing. One without it shows the text as it is.
    let markup = bus
        .call(SERVICE, PATH, SERVICE, "GetCapabilities", &Body::new())
        .await
        .and_then(|reply| reply.str_array_argument())
        .is_ok_and(|capabilities| capabilities.iter().any(|c| c == "body-markup"));
    let body = if markup {
        escape_markup(body)
    } else {
        body.to_owned()
    };
    let arguments = Body::new()
        .str("token-agent")
        // replaces_id: a new notice.
        .u32(0)
        .str("security-high")
        .str(summary)
        .str(&body)
        // No actions.
        .array("s", |_| {})
        // Hints: normal urgency; a device category so desktops may group it.
        .array("{sv}", |hints| {
            hints.structure(|hint| {
                hint.str("urgency");
                hint.variant("y", |value| value.u8(1));
            });
            hints.structure(|hint| {
                hint.str("category");
                hint.variant("s", |value| value.str("device"));
            });
        })
        // expire_timeout: never by itself.
        .i32(0);
    let reply = bus.call(SERVICE, PATH, SERVICE, "Notify", &arguments).await;
    match reply.and_then(|reply| reply.u32_argument()) {
        Ok(id) => Some(id),
        Err(err) => {
            tracing::warn!(%err, "cannot show a desktop notification (org.freedesktop.Notifications)");
            None
        }
    }
}

/// `text` with the characters the notification markup gives a meaning to
/// written as entities.
fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

async fn close(bus: &Connection, id: u32) {
    let reply = bus
        .call(
            SERVICE,
            PATH,
            SERVICE,
            "CloseNotification",
            &Body::new().u32(id),
        )
        .await;
    if let Err(err) = reply {
        tracing::debug!(%err, id, "cannot close the desktop notification");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_characters_become_entities() {
        assert_eq!(
            escape_markup("key <a href=\"x\">a&b</a> 'q'"),
            "key &lt;a href=&quot;x&quot;&gt;a&amp;b&lt;/a&gt; &apos;q&apos;"
        );
        assert_eq!(escape_markup("plain"), "plain");
    }
}
