//! Touch notices: shown only when a device makes the person wait, withdrawn
//! the moment it answers.
//!
//! A signature that needs a touch usually takes a second or two; one that
//! needs none takes milliseconds. So the notice fires only after a short delay
//! (half a second by default): it then logs at info level and runs the
//! configured command (for instance `notify-send`), with the key, device, host
//! and client in its environment; without a command, it shows a desktop
//! notification (org.freedesktop.Notifications) when a session bus is
//! reachable. Dropping the [`NoticeGuard`] cancels a notice that has not fired
//! yet, and stops the command or closes the notification of one that has.

use std::sync::Arc;
use std::time::Duration;

use token_agent_core::{Notice, NoticeGuard, NoticeKind, PromptSubject};
use tokio::process::Command;
use tokio::runtime::Handle;
use tokio::sync::Mutex;

use crate::desktop;

/// How touch notices behave.
#[derive(Debug, Clone)]
pub struct NoticeConfig {
    /// How long a device may take before the notice appears.
    pub delay: Duration,
    /// A shell command run when the notice appears (`sh -c`), with
    /// TOKEN_AGENT_NOTICE, TOKEN_AGENT_NOTICE_KIND, TOKEN_AGENT_KEY,
    /// TOKEN_AGENT_FINGERPRINT, TOKEN_AGENT_DEVICE, TOKEN_AGENT_HOST and
    /// TOKEN_AGENT_CLIENT in its environment. It is stopped when the notice is
    /// withdrawn. Without one, the notice is a desktop notification when a
    /// session bus is reachable.
    pub command: Option<String>,
}

impl Default for NoticeConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(500),
            command: None,
        }
    }
}

/// Raises touch notices.
#[derive(Debug, Clone)]
pub struct Notifier {
    config: NoticeConfig,
    runtime: Handle,
    /// The session bus, connected at the first notice that needs it; tried
    /// again at the next notice while there is none (a desktop session may
    /// start after the agent) or it has closed.
    bus: Arc<Mutex<Option<token_agent_dbus::Connection>>>,
}

impl Notifier {
    /// A notifier running its timers on the current tokio runtime.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn new(config: NoticeConfig) -> Self {
        Self::with_runtime(config, Handle::current())
    }

    /// A notifier running its timers on `runtime` (backends call
    /// [`Notifier::notify`] from their own worker threads).
    pub fn with_runtime(config: NoticeConfig, runtime: Handle) -> Self {
        Self {
            config,
            runtime,
            bus: Arc::default(),
        }
    }

    /// Raises `notice` after the delay; the guard withdraws it.
    pub fn notify(&self, notice: &Notice) -> NoticeGuard {
        let notice = notice.clone();
        let config = self.config.clone();
        let bus = Arc::clone(&self.bus);
        let runtime = self.runtime.clone();
        let task = self.runtime.spawn(async move {
            tokio::time::sleep(config.delay).await;
            let text = notice.description();
            tracing::info!(notice = %text, "waiting for the person");
            let Some(command) = &config.command else {
                let bus = {
                    let mut bus = bus.lock().await;
                    // Connected again when the session bus went away (a
                    // desktop restarted) since the last notice.
                    if bus
                        .as_ref()
                        .is_none_or(token_agent_dbus::Connection::is_closed)
                    {
                        *bus = desktop::session_bus().await;
                    }
                    bus.clone()
                };
                if let Some(bus) = bus {
                    // Closed when the notice is withdrawn, which aborts this
                    // task and so drops it.
                    let _shown = desktop::Shown::new(bus, "token-agent", &text, runtime);
                    std::future::pending::<()>().await;
                }
                return;
            };
            let child = Command::new("sh")
                .arg("-c")
                .arg(command)
                .envs(environment(&notice, &text))
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn();
            match child {
                // Held until the notice is withdrawn, which aborts this task and
                // so drops (and kills) the command if it still runs.
                Ok(mut child) => {
                    if let Err(err) = child.wait().await {
                        tracing::warn!(%err, "the notice command failed");
                    }
                    std::future::pending::<()>().await;
                }
                Err(err) => tracing::warn!(%err, command, "cannot run the notice command"),
            }
        });
        NoticeGuard::new(Withdraw(task.abort_handle()))
    }
}

impl Notifier {
    /// Announces that the agent refused a request the person can fix: logs
    /// it and runs the notice command at once, with
    /// TOKEN_AGENT_NOTICE_KIND=refused, left to finish on its own (it is
    /// killed after a minute if it has not).
    pub fn announce_refusal(&self, text: &str, subject: &PromptSubject) {
        let Some(command) = self.config.command.clone() else {
            return;
        };
        let mut env = subject_environment(subject);
        env.push(("TOKEN_AGENT_NOTICE", text.to_owned()));
        env.push(("TOKEN_AGENT_NOTICE_KIND", "refused".to_owned()));
        self.runtime.spawn(async move {
            let child = Command::new("sh")
                .arg("-c")
                .arg(&command)
                .envs(env)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn();
            match child {
                Ok(mut child) => {
                    let finished = tokio::time::timeout(Duration::from_secs(60), child.wait());
                    if let Ok(Err(err)) = finished.await {
                        tracing::warn!(%err, "the notice command failed");
                    }
                }
                Err(err) => tracing::warn!(%err, command, "cannot run the notice command"),
            }
        });
    }
}

struct Withdraw(tokio::task::AbortHandle);

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn environment(notice: &Notice, text: &str) -> Vec<(&'static str, String)> {
    let subject = &notice.subject;
    let kind = match notice.kind {
        NoticeKind::Touch => "touch",
        NoticeKind::PinPad => "pinpad",
    };
    let mut env = vec![
        ("TOKEN_AGENT_NOTICE", text.to_owned()),
        ("TOKEN_AGENT_NOTICE_KIND", kind.to_owned()),
    ];
    env.extend(subject_environment(subject));
    env
}

/// TOKEN_AGENT_KEY, _FINGERPRINT, _DEVICE, _HOST and _CLIENT, empty when unknown.
fn subject_environment(subject: &PromptSubject) -> Vec<(&'static str, String)> {
    let optional = [
        ("TOKEN_AGENT_KEY", subject.key.clone()),
        ("TOKEN_AGENT_FINGERPRINT", subject.fingerprint.clone()),
        (
            "TOKEN_AGENT_DEVICE",
            subject.device.as_ref().map(|d| d.label().to_owned()),
        ),
        ("TOKEN_AGENT_HOST", subject.destination.clone()),
        ("TOKEN_AGENT_CLIENT", subject.requester.clone()),
    ];
    optional
        .into_iter()
        .map(|(name, value)| (name, value.unwrap_or_default()))
        .collect()
}

#[cfg(test)]
mod tests {
    use token_agent_core::{DeviceInfo, PromptSubject};

    use super::*;

    fn notice() -> Notice {
        Notice {
            kind: NoticeKind::Touch,
            subject: PromptSubject {
                key: Some("slot 9a".into()),
                device: Some(DeviceInfo::new("YubiKey 5 #7")),
                destination: Some("git@example.org".into()),
                ..PromptSubject::default()
            },
        }
    }

    fn notifier(dir: &std::path::Path, delay_ms: u64) -> Notifier {
        Notifier::new(NoticeConfig {
            delay: Duration::from_millis(delay_ms),
            command: Some(format!(
                "printf '%s|%s|%s' \"$TOKEN_AGENT_DEVICE\" \"$TOKEN_AGENT_HOST\" \"$TOKEN_AGENT_KEY\" > {dir}/fired; sleep 30",
                dir = dir.display()
            )),
        })
    }

    #[tokio::test]
    async fn a_quick_operation_shows_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let guard = notifier(dir.path(), 300).notify(&notice());
        drop(guard);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!dir.path().join("fired").exists());
    }

    #[tokio::test]
    async fn a_slow_operation_runs_the_command_with_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let guard = notifier(dir.path(), 50).notify(&notice());
        let fired = dir.path().join("fired");
        let mut waited = 0;
        while !fired.exists() && waited < 100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            std::fs::read_to_string(&fired).unwrap(),
            "YubiKey 5 #7|git@example.org|slot 9a"
        );
        drop(guard);
    }
}
