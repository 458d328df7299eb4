//! User presence and plugging, given by a test through a [`Control`] handle.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use token_agent_fido::CtapError;

/// How the simulated person answers a request for presence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Touches at once.
    Auto,
    /// Waits for [`Control::touch`] or [`Control::deny`]; without either,
    /// the operation fails with a timeout after the touch timeout.
    Wait,
    /// Refuses every request (CTAP2_ERR_OPERATION_DENIED).
    Deny,
}

/// Controls one simulated authenticator from a test.
#[derive(Clone, Debug)]
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Sets how presence requests are answered from now on.
    pub fn set_presence(&self, presence: Presence) {
        self.shared.lock().presence = presence;
    }

    /// Touches the device: the operation waiting for presence goes on.
    /// Returns `false` (and does nothing) when nothing waits, as touching an
    /// idle key does nothing.
    pub fn touch(&self) -> bool {
        self.answer(true)
    }

    /// Refuses the operation waiting for presence. `false` when nothing waits.
    pub fn deny(&self) -> bool {
        self.answer(false)
    }

    /// Whether an operation waits for presence now.
    pub fn waiting(&self) -> bool {
        self.shared.lock().waiting > 0
    }

    /// Waits up to `limit` until an operation waits for presence.
    pub fn wait_until_waiting(&self, limit: Duration) -> bool {
        let guard = self.shared.lock();
        let (guard, _) = self
            .shared
            .changed
            .wait_timeout_while(guard, limit, |state| state.waiting == 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.waiting > 0
    }

    /// Plugs the device in (`true`) or pulls it out (`false`). A pulled
    /// device answers every operation with [`CtapError::Removed`], and an
    /// operation waiting for presence ends with it.
    pub fn set_connected(&self, connected: bool) {
        self.shared.lock().connected = connected;
        self.shared.changed.notify_all();
    }

    /// Whether the device is plugged in.
    pub fn connected(&self) -> bool {
        self.shared.connected()
    }

    fn answer(&self, touch: bool) -> bool {
        let mut state = self.shared.lock();
        if state.waiting == 0 {
            return false;
        }
        state.answer = Some(touch);
        self.shared.changed.notify_all();
        true
    }
}

/// Serves `control` on a Unix socket at `path`, one command per line, one
/// answer line each, from a thread of its own:
///
/// - `touch`, `deny`: wait up to 10 s for an operation that waits for
///   presence, answer it, and reply `ok` (or `nothing waits`);
/// - `presence auto|wait|deny`: set the presence mode;
/// - `remove`, `insert`: unplug and plug the device;
/// - `waiting`: `yes` or `no`.
pub fn serve_control(control: Control, path: &Path) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("fido-sim control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let control = control.clone();
                let _ = std::thread::Builder::new()
                    .name("fido-sim control client".into())
                    .spawn(move || {
                        let Ok(reader) = stream.try_clone() else {
                            return;
                        };
                        let mut writer = stream;
                        for line in BufReader::new(reader).lines() {
                            let Ok(line) = line else { break };
                            let reply = command(&control, line.trim());
                            if writeln!(writer, "{reply}").is_err() {
                                break;
                            }
                        }
                    });
            }
        })?;
    Ok(())
}

fn command(control: &Control, line: &str) -> &'static str {
    let wait = Duration::from_secs(10);
    match line {
        "touch" | "deny" => {
            let answered = control.wait_until_waiting(wait)
                && if line == "touch" {
                    control.touch()
                } else {
                    control.deny()
                };
            if answered {
                "ok"
            } else {
                "nothing waits"
            }
        }
        "presence auto" => {
            control.set_presence(Presence::Auto);
            "ok"
        }
        "presence wait" => {
            control.set_presence(Presence::Wait);
            "ok"
        }
        "presence deny" => {
            control.set_presence(Presence::Deny);
            "ok"
        }
        "remove" => {
            control.set_connected(false);
            "ok"
        }
        "insert" => {
            control.set_connected(true);
            "ok"
        }
        "waiting" => {
            if control.waiting() {
                "yes"
            } else {
                "no"
            }
        }
        _ => "unknown command",
    }
}

/// The presence state shared by the simulator and its controls.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<PresenceState>,
    changed: Condvar,
}

#[derive(Debug)]
struct PresenceState {
    presence: Presence,
    timeout: Duration,
    waiting: usize,
    answer: Option<bool>,
    connected: bool,
}

impl Shared {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            state: Mutex::new(PresenceState {
                presence: Presence::Auto,
                timeout,
                waiting: 0,
                answer: None,
                connected: true,
            }),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn set_timeout(&self, timeout: Duration) {
        self.lock().timeout = timeout;
    }

    pub(crate) fn connected(&self) -> bool {
        self.lock().connected
    }

    /// Blocks until the person touches, denies, or the timeout passes.
    pub(crate) fn wait_for_presence(&self) -> Result<(), CtapError> {
        let mut state = self.lock();
        match state.presence {
            Presence::Auto => return Ok(()),
            Presence::Deny => return Err(CtapError::OperationDenied),
            Presence::Wait => {}
        }
        let timeout = state.timeout;
        let deadline = Instant::now() + timeout;
        state.answer = None;
        state.waiting += 1;
        self.changed.notify_all();
        let result = loop {
            if !state.connected {
                break Err(CtapError::Removed);
            }
            if let Some(touched) = state.answer.take() {
                break if touched {
                    Ok(())
                } else {
                    Err(CtapError::OperationDenied)
                };
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(CtapError::UserActionTimeout {
                    seconds: u64::try_from(timeout.as_millis().div_ceil(1000)).unwrap_or(u64::MAX),
                });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        };
        state.waiting -= 1;
        self.changed.notify_all();
        result
    }

    fn lock(&self) -> MutexGuard<'_, PresenceState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
