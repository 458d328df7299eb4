//! A desktop notification server for end-to-end tests: it owns
//! `org.freedesktop.Notifications` on the session bus
//! (`DBUS_SESSION_BUS_ADDRESS`) and records each `Notify` and
//! `CloseNotification` as a line of the file named by its one argument:
//! `ready` once the name is owned, then `notify ID SUMMARY: BODY` and
//! `close ID`. It runs until killed.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use zbus::zvariant::OwnedValue;

#[derive(Debug)]
struct Server {
    log: PathBuf,
    next: AtomicU32,
}

impl Server {
    fn record(&self, line: &str) {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .and_then(|mut file| writeln!(file, "{line}"));
        if let Err(err) = written {
            eprintln!(
                "fake-notifications: cannot write {}: {err}",
                self.log.display()
            );
        }
    }
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Server {
    /// The specification's Notify: answers a new id (replaces_id is not kept).
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        _app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: HashMap<String, OwnedValue>,
        expire_timeout: i32,
    ) -> u32 {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        self.record(&format!(
            "notify {id} {summary}: {body} (expires {expire_timeout})"
        ));
        id
    }

    fn close_notification(&self, id: u32) {
        self.record(&format!("close {id}"));
    }

    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".to_owned()]
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "fake-notifications".to_owned(),
            "token-agent".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
            "1.2".to_owned(),
        )
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let log = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .context("usage: fake-notifications LOG")?,
    );
    let server = Server {
        log: log.clone(),
        next: AtomicU32::new(1),
    };
    let _bus = zbus::connection::Builder::session()?
        .name("org.freedesktop.Notifications")?
        .serve_at("/org/freedesktop/Notifications", server)?
        .build()
        .await
        .context("cannot serve org.freedesktop.Notifications on the session bus")?;
    Server {
        log,
        next: AtomicU32::new(0),
    }
    .record("ready");
    std::future::pending::<()>().await;
    Ok(())
}
