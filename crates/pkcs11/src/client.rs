//! The agent's side of a helper process: start it, send requests, wait for
//! answers with a time limit, and tell how it died.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufReader, BufWriter};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::proto::{read_frame, write_frame, Failure, Op, Reply, Request, Response, EVENT_ID};

/// How to start a helper: the program (the token-agent binary) and its arguments.
#[derive(Debug, Clone)]
pub struct HelperCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments (`--pkcs11-helper`).
    pub args: Vec<OsString>,
    /// Environment variables set for it on top of the agent's own.
    pub env: Vec<(OsString, OsString)>,
}

impl HelperCommand {
    /// The running executable with `--pkcs11-helper`: how the token-agent binary starts its helpers.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
            args: vec!["--pkcs11-helper".into()],
            env: Vec::new(),
        })
    }
}

/// Why a call did not get an answer from the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallError {
    /// The module answered with a failure.
    Failed(Failure),
    /// The helper died (crashed in the module, or was killed).
    Died(String),
    /// No answer within the time limit; the helper was killed.
    TimedOut(Duration),
}

/// One running helper process.
#[derive(Debug)]
pub(crate) struct Helper {
    pid: Pid,
    stdin: Mutex<BufWriter<ChildStdin>>,
    pending: Arc<Mutex<HashMap<u64, SyncSender<Response>>>>,
    exit: Arc<Mutex<Option<String>>>,
    next_id: AtomicU64,
}

impl Helper {
    /// Starts a helper; `on_event` runs (on the reader thread) whenever the
    /// module reports a slot event.
    pub(crate) fn spawn(
        command: &HelperCommand,
        on_event: impl Fn() + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).map_err(std::io::Error::other)?);
        let pending: Arc<Mutex<HashMap<u64, SyncSender<Response>>>> = Arc::default();
        let exit: Arc<Mutex<Option<String>>> = Arc::default();
        let (reader_pending, reader_exit) = (pending.clone(), exit.clone());
        std::thread::Builder::new()
            .name("pkcs11-helper-reader".into())
            .spawn(move || {
                let mut input = BufReader::new(stdout);
                while let Ok(Some(response)) = read_frame::<Response>(&mut input) {
                    if response.id == EVENT_ID {
                        on_event();
                        continue;
                    }
                    if let Some(sender) = lock(&reader_pending).remove(&response.id) {
                        let _ = sender.send(response);
                    }
                }
                // End of output: the helper exited or died. Record how before
                // waking the callers, so each can say what happened.
                let how = match child.wait() {
                    Ok(status) => describe(status),
                    Err(err) => format!("could not be waited for: {err}"),
                };
                *lock(&reader_exit) = Some(how);
                lock(&reader_pending).clear();
            })?;
        Ok(Arc::new(Self {
            pid,
            stdin: Mutex::new(BufWriter::new(stdin)),
            pending,
            exit,
            next_id: AtomicU64::new(EVENT_ID + 1),
        }))
    }

    /// Whether the helper process has ended.
    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.exit).is_some()
    }

    /// Sends `op` and waits up to `limit` for the answer. Blocks the calling
    /// thread; on a timeout the helper is killed.
    pub(crate) fn call(&self, op: Op, limit: Duration) -> Result<Reply, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::sync_channel(1);
        lock(&self.pending).insert(id, sender);
        if let Some(how) = lock(&self.exit).clone() {
            lock(&self.pending).remove(&id);
            return Err(CallError::Died(how));
        }
        let written = write_frame(&mut *lock(&self.stdin), &Request { id, op });
        if written.is_err() {
            lock(&self.pending).remove(&id);
            return Err(CallError::Died(self.wait_exit()));
        }
        match receiver.recv_timeout(limit) {
            Ok(response) => response.result.map_err(CallError::Failed),
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Died(self.wait_exit())),
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.pending).remove(&id);
                self.kill();
                Err(CallError::TimedOut(limit))
            }
        }
    }

    /// Kills the helper (SIGKILL): it hung, or it is no longer wanted.
    pub(crate) fn kill(&self) {
        if !self.is_dead() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }

    /// How the helper ended, waiting briefly for the reader to learn it.
    fn wait_exit(&self) -> String {
        for _ in 0..100 {
            if let Some(how) = lock(&self.exit).clone() {
                return how;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "stopped answering".to_owned()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// "signal 6 (SIGABRT)" or "exit status 3".
fn describe(status: ExitStatus) -> String {
    match (status.signal(), status.code()) {
        (Some(signal), _) => match Signal::try_from(signal) {
            Ok(name) => format!("signal {signal}, {name}"),
            Err(_) => format!("signal {signal}"),
        },
        (None, Some(code)) => format!("exit status {code}"),
        (None, None) => status.to_string(),
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent between statements.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
