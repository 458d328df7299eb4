//! The agent's side of one helper process: start it, send a request, wait
//! for the answer with a time limit, and tell how it died.

use std::io::{BufReader, ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use token_agent_core::lock;
use token_agent_helper::describe_exit;

use super::proto::{read_frame, write_frame, Failure, Op, Reply, RequestRef, Response};
use super::HelperCommand;

/// Why a call got no answer from the middleware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallError {
    /// The helper answered with a failure.
    Failed(Failure),
    /// The helper died (crashed in the middleware, or was killed) while the
    /// request was in it: how.
    Died(String),
    /// The helper had ended before the request reached it (it died while
    /// idle): how. The middleware never saw the request, so it is safe to
    /// send it again to a new helper.
    Gone(String),
    /// No answer within the time limit; the helper was killed.
    TimedOut(Duration),
    /// The helper took no request within [`WRITE_TIMEOUT`] (it stopped
    /// reading); it was killed and the request did not reach the middleware.
    NotReading(Duration),
}

/// How long writing one request may block: the helper reads each request as
/// soon as it comes, so a full socket buffer means it stopped working (it
/// was stopped, or the middleware took over its input).
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The call waiting for an answer, if any: its id, and where its answer goes.
/// The reader thread hands over only the answer with that id, once; any other
/// frame the helper writes is dropped, so a helper cannot make the agent hold
/// what nobody asked for.
type Waiting = Arc<Mutex<Option<(u64, SyncSender<Response>)>>>;

/// One running helper process.
#[derive(Debug)]
pub(crate) struct Helper {
    pid: Pid,
    /// The agent's end of the socket that is the helper's standard input: a
    /// socket rather than a pipe for its send timeout (see [`ByDeadline`]).
    /// Written unbuffered, a whole frame at a time.
    requests: UnixStream,
    waiting: Waiting,
    exit: Arc<Mutex<Option<String>>>,
    next_id: u64,
}

impl Helper {
    /// Starts a helper process.
    pub(crate) fn spawn(command: &HelperCommand) -> std::io::Result<Self> {
        let (requests, helper_input) = UnixStream::pair()?;
        // The temporary Command holds the helper's end and closes it when
        // the statement ends, so the helper's death is seen as EPIPE.
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .stdin(Stdio::from(OwnedFd::from(helper_input)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the helper has no standard output"))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).map_err(std::io::Error::other)?);
        let waiting: Waiting = Arc::default();
        let exit: Arc<Mutex<Option<String>>> = Arc::default();
        let (reader_waiting, reader_exit) = (waiting.clone(), exit.clone());
        std::thread::Builder::new()
            .name("sk-helper-reader".into())
            .spawn(move || {
                let mut input = BufReader::new(stdout);
                let mut warned = false;
                while let Ok(Some(response)) = read_frame::<Response>(&mut input) {
                    let waiter = {
                        let mut waiting = lock(&reader_waiting);
                        match &*waiting {
                            Some((id, _)) if *id == response.id => waiting.take(),
                            _ => None,
                        }
                    };
                    match waiter {
                        // A channel of one, sent to once: this never blocks.
                        Some((_, sender)) => drop(sender.try_send(response)),
                        None if !warned => {
                            warned = true;
                            tracing::warn!(
                                helper = child.id(),
                                id = response.id,
                                "an sk middleware helper answered a request nobody waits for; \
                                 dropped (and any more from it)"
                            );
                        }
                        None => {}
                    }
                }
                // End of output: the helper exited or died. Record how before
                // the waiting call's channel closes, so it can say what happened.
                let how = match child.wait() {
                    Ok(status) => describe_exit(status),
                    Err(err) => format!("could not be waited for: {err}"),
                };
                *lock(&reader_exit) = Some(how);
                lock(&reader_waiting).take();
            })?;
        Ok(Self {
            pid,
            requests,
            waiting,
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
    pub(crate) fn call(&mut self, op: &Op, limit: Duration) -> Result<Reply, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let (sender, answer) = mpsc::sync_channel(1);
        *lock(&self.waiting) = Some((id, sender));
        // Checked after registering: the reader records the exit before it
        // drops the waiting call's channel, so a helper that ended is seen
        // here or closes the channel.
        if let Some(how) = lock(&self.exit).clone() {
            lock(&self.waiting).take();
            return Err(CallError::Gone(how));
        }
        let mut requests = ByDeadline {
            stream: &self.requests,
            deadline: Instant::now() + WRITE_TIMEOUT,
        };
        if let Err(err) = write_frame(&mut requests, &RequestRef { id, op }) {
            lock(&self.waiting).take();
            if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                // Part of the request may sit in the socket: the helper
                // cannot be talked to any more.
                self.kill();
                return Err(CallError::NotReading(WRITE_TIMEOUT));
            }
            // The helper's end is closed (EPIPE): it ended before it had the
            // whole request, and it acts only on whole requests.
            return Err(CallError::Gone(self.wait_exit()));
        }
        match answer.recv_timeout(limit) {
            Ok(response) => response.result.map_err(CallError::Failed),
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Died(self.wait_exit())),
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.waiting).take();
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
        for _ in 0..200 {
            if let Some(how) = lock(&self.exit).clone() {
                return how;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "stopped answering".to_owned()
    }
}

/// Writes to a socket until a deadline for the whole of what is written: a
/// send timeout alone bounds each write, and a helper that takes a little at
/// a time would stretch a frame's write without end.
struct ByDeadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Write for ByDeadline<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_write_timeout(Some(left))?;
        (&mut &*self.stream).write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
    use crate::middleware::proto::Request;

    #[test]
    fn a_helper_that_is_not_a_helper_dies_and_says_how() {
        // `false` reads nothing and exits 1: the call finds it dead.
        let mut helper = Helper::spawn(&HelperCommand {
            program: "false".into(),
            args: Vec::new(),
        })
        .unwrap();
        let result = helper.call(
            &Op::Load {
                path: "/nonexistent".into(),
            },
            Duration::from_secs(10),
        );
        // Whether the request reached it before it ended is a race.
        match result.unwrap_err() {
            CallError::Died(how) | CallError::Gone(how) => assert_eq!(how, "exit status 1"),
            other => panic!("{other:?}"),
        }
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
            &Op::Load {
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

    /// Resident memory of this process, in KiB.
    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn frame<T: serde::Serialize>(message: &T) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, message).unwrap();
        bytes
    }

    #[test]
    fn answers_nobody_asked_for_are_dropped_not_queued() {
        // A helper that answers the first call, then writes 128 answers of
        // 1 MiB nobody asked for while no call waits, then answers the second
        // call: the agent does not keep the flood, and the second call gets
        // its own answer.
        let dir = std::env::temp_dir().join(format!("sk-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |id| Request {
            id,
            op: Op::Load { path: "/x".into() },
        };
        let loaded = |id, version| Response {
            id,
            result: Ok(Reply::Loaded { version }),
        };
        std::fs::write(dir.join("a1"), frame(&loaded(1, 1))).unwrap();
        std::fs::write(dir.join("a2"), frame(&loaded(2, 2))).unwrap();
        let flood = Response {
            id: 1,
            result: Err(Failure::Protocol("a".repeat(1024 * 1024))),
        };
        std::fs::write(dir.join("flood"), frame(&flood)).unwrap();
        let script = format!(
            "cd {dir}; head -c {first} >/dev/null; cat a1; i=0; \
             while [ $i -lt 128 ]; do cat flood; i=$((i+1)); done; touch flooded; \
             head -c {second} >/dev/null; cat a2; sleep 60",
            dir = dir.display(),
            first = frame(&load(1)).len(),
            second = frame(&load(2)).len(),
        );
        let mut helper = Helper::spawn(&HelperCommand {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
        })
        .unwrap();
        let before = resident_kib();
        let limit = Duration::from_secs(20);
        let first = helper.call(&load(1).op, limit).unwrap();
        assert!(matches!(first, Reply::Loaded { version: 1 }), "{first:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("flooded").exists() {
            assert!(Instant::now() < deadline, "the helper did not flood");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The last frames leave the pipe after `cat` returns.
        std::thread::sleep(Duration::from_millis(500));
        let grown = resident_kib().saturating_sub(before);
        let second = helper.call(&load(2).op, limit).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(grown < 40 * 1024, "the agent grew by {grown} KiB");
        assert!(matches!(second, Reply::Loaded { version: 2 }), "{second:?}");
    }

    #[test]
    fn a_stopped_helper_is_killed_when_a_request_cannot_be_written() {
        // A helper stopped with SIGSTOP takes no request: one larger than the
        // socket buffer fails after WRITE_TIMEOUT instead of blocking for good.
        let mut helper = Helper::spawn(&HelperCommand {
            program: "sh".into(),
            args: vec!["-c".into(), "exec cat >/dev/null".into()],
        })
        .unwrap();
        kill(helper.pid, Signal::SIGSTOP).unwrap();
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let sign = super::super::proto::Sign {
                alg: 1,
                data: vec![0; 1024 * 1024],
                application: "ssh:".into(),
                key_handle: vec![1; 64],
                flags: 1,
                pin: None,
            };
            let started = Instant::now();
            let result = helper.call(&Op::Sign(sign), Duration::from_secs(60));
            let _ = done.send((result, started.elapsed(), helper.wait_exit()));
        });
        let (result, took, how) = result
            .recv_timeout(Duration::from_secs(30))
            .expect("the call is still blocked writing the request");
        assert_eq!(result.unwrap_err(), CallError::NotReading(WRITE_TIMEOUT));
        assert!(took < WRITE_TIMEOUT + Duration::from_secs(5), "{took:?}");
        assert_eq!(how, "signal 9, SIGKILL");
    }
}
