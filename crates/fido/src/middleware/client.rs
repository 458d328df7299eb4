//! The agent's side of one helper process: start it, send a request, wait
//! for the answer with a time limit, and tell how it died.

use std::io::{BufReader, BufWriter};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use token_agent_core::lock;
use token_agent_helper::describe_exit;

use super::proto::{read_frame, write_frame, Failure, Op, Reply, Request, Response};
use super::HelperCommand;

/// Why a call got no answer from the middleware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallError {
    /// The helper answered with a failure.
    Failed(Failure),
    /// The helper died (crashed in the middleware, or was killed): how.
    Died(String),
    /// No answer within the time limit; the helper was killed.
    TimedOut(Duration),
}

/// One running helper process.
#[derive(Debug)]
pub(crate) struct Helper {
    pid: Pid,
    stdin: BufWriter<ChildStdin>,
    responses: Receiver<Response>,
    exit: Arc<Mutex<Option<String>>>,
    next_id: u64,
}

impl Helper {
    /// Starts a helper process.
    pub(crate) fn spawn(command: &HelperCommand) -> std::io::Result<Self> {
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("the helper has no standard input"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the helper has no standard output"))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).map_err(std::io::Error::other)?);
        let (sender, responses) = mpsc::channel();
        let exit: Arc<Mutex<Option<String>>> = Arc::default();
        let reader_exit = exit.clone();
        std::thread::Builder::new()
            .name("sk-helper-reader".into())
            .spawn(move || {
                let mut input = BufReader::new(stdout);
                while let Ok(Some(response)) = read_frame::<Response>(&mut input) {
                    if sender.send(response).is_err() {
                        break;
                    }
                }
                // End of output: the helper exited or died. Record how before
                // the channel closes, so the caller can say what happened.
                let how = match child.wait() {
                    Ok(status) => describe_exit(status),
                    Err(err) => format!("could not be waited for: {err}"),
                };
                *lock(&reader_exit) = Some(how);
            })?;
        Ok(Self {
            pid,
            stdin: BufWriter::new(stdin),
            responses,
            exit,
            next_id: 1,
        })
    }

    /// Whether the helper process has ended.
    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.exit).is_some()
    }

    /// Sends `op` and waits up to `limit` for its answer. Blocks the calling
    /// thread; on a timeout the helper is killed.
    pub(crate) fn call(&mut self, op: Op, limit: Duration) -> Result<Reply, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        if let Some(how) = lock(&self.exit).clone() {
            return Err(CallError::Died(how));
        }
        if write_frame(&mut self.stdin, &Request { id, op }).is_err() {
            return Err(CallError::Died(self.wait_exit()));
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(response) if response.id == id => {
                    return response.result.map_err(CallError::Failed);
                }
                // An answer to an earlier call that timed out cannot arrive
                // (that helper was killed); skip anything else all the same.
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CallError::Died(self.wait_exit()));
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    return Err(CallError::TimedOut(limit));
                }
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
        for _ in 0..200 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_that_is_not_a_helper_dies_and_says_how() {
        // `false` reads nothing and exits 1: the call finds it dead.
        let mut helper = Helper::spawn(&HelperCommand {
            program: "false".into(),
            args: Vec::new(),
        })
        .unwrap();
        let result = helper.call(
            Op::Load {
                path: "/nonexistent".into(),
            },
            Duration::from_secs(10),
        );
        assert_eq!(result.unwrap_err(), CallError::Died("exit status 1".into()));
    }

    #[test]
    fn a_helper_that_never_answers_is_killed_after_the_limit() {
        // `sleep` never reads or writes: the call times out and kills it.
        let mut helper = Helper::spawn(&HelperCommand {
            program: "sleep".into(),
            args: vec!["60".into()],
        })
        .unwrap();
        let started = Instant::now();
        let result = helper.call(
            Op::Load {
                path: "/nonexistent".into(),
            },
            Duration::from_millis(300),
        );
        assert_eq!(
            result.unwrap_err(),
            CallError::TimedOut(Duration::from_millis(300))
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(helper.wait_exit(), "signal 9, SIGKILL");
    }
}
