//! The agent's side of a helper process: start it, send requests, wait for
//! answers with a time limit, and tell how it died.

use std::ffi::OsString;
use std::fmt;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::Pid;
use rustc_hash::FxHashMap;
use token_agent_core::lock;
use token_agent_helper::describe_exit;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Notify};

use crate::proto::{
    decode_body, encode_frame, frame_len, read_frame, seqpacket_pair, Failure, Op, OpenLane, Reply,
    Request, Response, EVENT_ID, MAX_REQUEST,
};

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

/// The helper binary's name; it is installed next to `token-agent`.
pub const HELPER_BINARY: &str = "token-agent-pkcs11-helper";

impl HelperCommand {
    /// The running executable with `--pkcs11-helper`: the whole agent binary
    /// serves as the helper.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self::agent_mode(std::env::current_exe()?))
    }

    /// The helper for the running agent: see [`HelperCommand::beside`].
    pub fn for_agent() -> std::io::Result<Self> {
        Ok(Self::beside(&std::env::current_exe()?))
    }

    /// The helper for the agent executable `agent`: [`HELPER_BINARY`] in
    /// the same folder (where cargo builds and installs it) or in
    /// `../libexec/token-agent/` from it (the Debian package), which maps
    /// only the helper's code; without one, `agent --pkcs11-helper`, which
    /// works the same but maps the whole agent binary in every helper.
    pub fn beside(agent: &Path) -> Self {
        let folder = agent.parent().unwrap_or(Path::new("/"));
        let candidates = [
            folder.join(HELPER_BINARY),
            folder.join("../libexec/token-agent").join(HELPER_BINARY),
        ];
        match candidates.into_iter().find(|path| is_executable(path)) {
            Some(program) => Self {
                program,
                args: Vec::new(),
                env: Vec::new(),
            },
            None => {
                tracing::info!(
                    agent = %agent.display(),
                    "no {HELPER_BINARY} beside the agent; PKCS#11 modules run in \
                     `token-agent --pkcs11-helper`, which takes more memory per module"
                );
                Self::agent_mode(agent.to_owned())
            }
        }
    }

    fn agent_mode(agent: PathBuf) -> Self {
        Self {
            program: agent,
            args: vec!["--pkcs11-helper".into()],
            env: Vec::new(),
        }
    }
}

/// Whether `path` is a file someone may execute.
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
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
    /// The agent stopped the helper while the call was in it, for a reason
    /// of its own: the module did not crash.
    Stopped(Stop),
}

/// Why the agent itself stopped a helper. The calls the helper was in when
/// it was killed end with it; they are told this reason, not that the
/// module crashed with SIGKILL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Another call to the module had no answer within its time limit
    /// (given): the helper is killed, and every call in it ends.
    Hung(Duration),
    /// The module was unloaded, by what is given (`ssh-add -e`).
    Unloaded(&'static str),
    /// The module is being started anew, for the reason given.
    Restarted(String),
}

/// How long writing one request may block: the helper reads requests as
/// soon as they come, so a full socket buffer means it stopped working.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most lanes (threads signing at once) a helper gets: enough for every
/// client of a busy agent, and for other keys to go on signing while a
/// module hangs in many calls at once.
pub(crate) const MAX_LANES: usize = 64;

/// How a helper's lanes open and close.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LanePolicy {
    /// The most lanes open at once (1 to [`MAX_LANES`]).
    pub(crate) max: usize,
    /// How long a lane other than the first may go without a request
    /// before the helper retires it (and its thread).
    pub(crate) idle: Duration,
}
/// Who waits for an answer: an async task, whose time limit the helper's
/// [`watch`] task keeps, or a blocked thread, which keeps its own.
enum Waiter {
    Task {
        /// The answer, or the limit that ran out before it came.
        answer: oneshot::Sender<Result<Response, Duration>>,
        /// `None`: a limit too far off to be a point in time.
        deadline: Option<Instant>,
        limit: Duration,
    },
    Thread(SyncSender<Response>),
}

type Pending = Arc<Mutex<Calls>>;

/// The calls in flight.
#[derive(Default)]
struct Calls {
    waiters: FxHashMap<u64, Waiter>,
    /// When the helper's [`watch`] task looks at the deadlines next; `None`
    /// while it waits for a call. A call with an earlier deadline wakes it.
    watched_until: Option<Instant>,
}

impl Calls {
    /// Adds call `id`. Returns whether its deadline comes before the
    /// watchdog would look (which then looks by it).
    fn add(&mut self, id: u64, waiter: Waiter) -> bool {
        let sooner = match &waiter {
            Waiter::Task {
                deadline: Some(deadline),
                ..
            } if self.watched_until.is_none_or(|at| *deadline < at) => {
                self.watched_until = Some(*deadline);
                true
            }
            _ => false,
        };
        self.waiters.insert(id, waiter);
        sooner
    }
}

/// One running helper process.
///
/// The agent talks to it over a control socket, lanes and one answer
/// socket (see [`crate::proto`]). Each request goes to an idle lane, the
/// lowest first: one client's signatures then keep to one helper thread
/// (whose caches are warm, and which the kernel wakes on the CPU it last
/// ran on), while many clients at once each get a thread, so the module
/// signs on every CPU and its own locks never leave a CPU idle while
/// requests wait. When every lane is busy a new one is opened, up to
/// [`LanePolicy::max`]; past that a request waits behind the least busy
/// lane. Lanes other than the first retire after [`LanePolicy::idle`]
/// without a request.
/// Requests are written straight from the calling task or thread (one
/// SOCK_SEQPACKET record each); a task on the runtime (or a thread) takes
/// each answer off the answer socket and wakes whoever waits for it. Calls
/// are pipelined: many can be outstanding at once, and the helper answers
/// them in any order.
pub(crate) struct Helper {
    pid: Pid,
    /// Where lanes are opened: a SOCK_SEQPACKET socket.
    control: UnixStream,
    lanes: Arc<Mutex<Lanes>>,
    policy: LanePolicy,
    pending: Pending,
    exit: Arc<Mutex<Option<String>>>,
    /// Why the agent killed the helper, if it did (see [`Stop`]).
    stop: Arc<Mutex<Option<Stop>>>,
    /// Wakes the helper's [`watch`] task (with a runtime; without one, each
    /// async call keeps its own time).
    watchdog: Option<Arc<Notify>>,
    next_id: AtomicU64,
}

/// The open lanes and the requests in flight on each.
#[derive(Default)]
struct Lanes {
    open: Vec<Lane>,
    /// The lane each unanswered request went to, by request id.
    in_flight: FxHashMap<u64, u64>,
    next_lane: u64,
}

struct Lane {
    /// Lane 0 stays for the helper's life; the others retire when idle.
    id: u64,
    /// A SOCK_SEQPACKET socket, one record per request.
    socket: Arc<UnixStream>,
    /// Requests sent on it and not answered yet.
    busy: usize,
}

impl fmt::Debug for Helper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Helper")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Helper {
    /// Starts a helper whose lanes follow `policy`; `on_event` runs
    /// whenever the module reports a slot event. With a `runtime`, answers
    /// are read by a task on it, which wakes the waiting task directly;
    /// without one, by a thread.
    pub(crate) fn spawn(
        command: &HelperCommand,
        runtime: Option<&Handle>,
        policy: LanePolicy,
        on_event: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<Arc<Self>> {
        // Lanes arrive as SOCK_SEQPACKET records with a descriptor each;
        // answers are a stream, read by the runtime, which needs its socket
        // non-blocking.
        let (control, helper_control) = seqpacket_pair()?;
        let control = UnixStream::from(control);
        let (answers, helper_output) = UnixStream::pair()?;
        let mut builder = Command::new(&command.program);
        builder
            .args(&command.args)
            .env("GLIBC_TUNABLES", glibc_tunables())
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(helper_control))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(helper_output)))
            .stderr(Stdio::inherit());
        let mut child = builder.spawn()?;
        // The builder holds the helper's ends of the sockets: close them
        // here, or the agent would never see the helper's end of output.
        drop(builder);
        let pid = Pid::from_raw(i32::try_from(child.id()).map_err(std::io::Error::other)?);
        control.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let lanes = Arc::new(Mutex::new(Lanes::default()));
        let watchdog = runtime.map(|_| Arc::new(Notify::new()));
        let answers_to = Answers {
            pending: Arc::default(),
            lanes: lanes.clone(),
            exit: Arc::default(),
            watchdog: watchdog.clone(),
            on_event: Box::new(on_event),
        };
        let (pending, exit) = (answers_to.pending.clone(), answers_to.exit.clone());
        let stop: Arc<Mutex<Option<Stop>>> = Arc::default();
        match runtime {
            Some(runtime) => {
                if let Some(wake) = &watchdog {
                    let end = End {
                        pid,
                        exit: exit.clone(),
                        stop: stop.clone(),
                    };
                    runtime.spawn(watch(pending.clone(), end, wake.clone()));
                }
                answers.set_nonblocking(true)?;
                let answers = {
                    let _entered = runtime.enter();
                    tokio::net::UnixStream::from_std(answers)?
                };
                runtime.spawn(async move {
                    let mut input = tokio::io::BufReader::new(answers);
                    while let Ok(response) = read_answer(&mut input).await {
                        answers_to.deliver(response);
                    }
                    let how = tokio::task::spawn_blocking(move || child.wait()).await;
                    answers_to.finish(match how {
                        Ok(Ok(status)) => describe_exit(status),
                        Ok(Err(err)) => format!("could not be waited for: {err}"),
                        Err(err) => format!("could not be waited for: {err}"),
                    });
                });
            }
            None => {
                std::thread::Builder::new()
                    .name("pkcs11-helper-reader".into())
                    .spawn(move || {
                        let mut input = BufReader::new(answers);
                        while let Ok(Some(response)) = read_frame::<Response>(&mut input) {
                            answers_to.deliver(response);
                        }
                        answers_to.finish(match child.wait() {
                            Ok(status) => describe_exit(status),
                            Err(err) => format!("could not be waited for: {err}"),
                        });
                    })?;
            }
        }
        let helper = Arc::new(Self {
            pid,
            control,
            lanes,
            policy: LanePolicy {
                max: policy.max.clamp(1, MAX_LANES),
                idle: policy.idle,
            },
            pending,
            exit,
            stop,
            watchdog,
            next_id: AtomicU64::new(EVENT_ID + 1),
        });
        // Lane 0, which stays: the helper serves nothing without it.
        let first = helper.open_lane(&mut lock(&helper.lanes));
        if let Err(err) = first {
            helper.kill();
            return Err(err);
        }
        Ok(helper)
    }

    /// Whether the helper process has ended.
    pub(crate) fn is_dead(&self) -> bool {
        lock(&self.exit).is_some()
    }

    /// Sends `op` and waits up to `limit` for the answer, without blocking
    /// the runtime; on a timeout the helper is killed.
    pub(crate) async fn call_async(&self, op: Op, limit: Duration) -> Result<Reply, CallError> {
        let (sender, receiver) = oneshot::channel();
        let waiter = Waiter::Task {
            answer: sender,
            deadline: Instant::now().checked_add(limit),
            limit,
        };
        let id = self.send(op, waiter)?;
        let _forget = Forget {
            pending: &self.pending,
            id,
        };
        let answer = match &self.watchdog {
            Some(_) => receiver.await,
            // Boxed: the timer would enlarge every call's future.
            None => Box::pin(tokio::time::timeout(limit, receiver))
                .await
                .unwrap_or(Ok(Err(limit))),
        };
        match answer {
            Ok(Ok(response)) => response.result.map_err(CallError::Failed),
            Ok(Err(limit)) => {
                self.stop(Stop::Hung(limit));
                Err(CallError::TimedOut(limit))
            }
            // Boxed: the rare path's timer would enlarge every call's future.
            Err(_) => Err(self.ended(Box::pin(self.exit_async()).await)),
        }
    }

    /// Sends `op` and waits up to `limit` for the answer, blocking the
    /// calling thread; on a timeout the helper is killed.
    pub(crate) fn call(&self, op: Op, limit: Duration) -> Result<Reply, CallError> {
        let (sender, receiver) = mpsc::sync_channel(1);
        let id = self.send(op, Waiter::Thread(sender))?;
        match receiver.recv_timeout(limit) {
            Ok(response) => response.result.map_err(CallError::Failed),
            Err(RecvTimeoutError::Disconnected) => Err(self.ended(self.wait_exit())),
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.pending).waiters.remove(&id);
                self.stop(Stop::Hung(limit));
                Err(CallError::TimedOut(limit))
            }
        }
    }

    /// Registers `waiter` and writes the request on a lane; the request's id.
    fn send(&self, op: Op, waiter: Waiter) -> Result<u64, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&Request { id, op }).and_then(|frame| {
            if frame.len() > MAX_REQUEST {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a request of {} bytes is too large", frame.len()),
                ));
            }
            Ok(frame)
        });
        let frame = frame.map_err(|err| {
            CallError::Failed(Failure::Protocol(format!(
                "cannot send the request to the helper: {err}"
            )))
        })?;
        self.register(id, waiter);
        if let Some(how) = lock(&self.exit).clone() {
            lock(&self.pending).waiters.remove(&id);
            return Err(self.ended(how));
        }
        loop {
            let (lane, socket) = match self.take_lane(id) {
                Ok(lane) => lane,
                Err(err) => {
                    lock(&self.pending).waiters.remove(&id);
                    self.kill();
                    return Err(CallError::Died(lock(&self.exit).clone().unwrap_or_else(
                        || format!("cannot open a lane to the helper ({err})"),
                    )));
                }
            };
            // One write is one whole record, or an error.
            let Err(err) = (&*socket).write(&frame) else {
                return Ok(id);
            };
            self.release(id);
            if lane != 0 && lane_retired(&err) {
                // The helper retired this idle lane just now (or could not
                // start its thread): nothing of this request reached it.
                lock(&self.lanes).open.retain(|l| l.id != lane);
                continue;
            }
            lock(&self.pending).waiters.remove(&id);
            if err.raw_os_error() == Some(nix::libc::EMSGSIZE) {
                return Err(CallError::Failed(Failure::Protocol(format!(
                    "cannot send the request to the helper: {err}"
                ))));
            }
            // A helper that stopped reading is as good as hung.
            if err.kind() == std::io::ErrorKind::WouldBlock {
                self.stop(Stop::Hung(WRITE_TIMEOUT));
                return Err(CallError::TimedOut(WRITE_TIMEOUT));
            }
            self.kill();
            return Err(CallError::Died(
                lock(&self.exit)
                    .clone()
                    .unwrap_or_else(|| format!("stopped reading requests ({err})")),
            ));
        }
    }

    /// Adds `waiter` to the calls in flight, and wakes the watchdog if its
    /// deadline comes before the watchdog would look.
    fn register(&self, id: u64, waiter: Waiter) {
        let sooner = lock(&self.pending).add(id, waiter);
        if let (true, Some(watchdog)) = (sooner, &self.watchdog) {
            watchdog.notify_one();
        }
    }

    /// The lane request `id` goes to, counted busy until it is answered:
    /// the lowest idle one, a new one when all are busy (up to
    /// [`LanePolicy::max`]), else the least busy.
    fn take_lane(&self, id: u64) -> std::io::Result<(u64, Arc<UnixStream>)> {
        let mut lanes = lock(&self.lanes);
        let busy = lanes.open.iter().map(|l| l.busy);
        let index = match choose_lane(busy, self.policy.max) {
            Some(index) => index,
            None => self.open_lane(&mut lanes)?,
        };
        let lane = &mut lanes.open[index];
        lane.busy += 1;
        let taken = (lane.id, lane.socket.clone());
        lanes.in_flight.insert(id, taken.0);
        Ok(taken)
    }

    /// Forgets that request `id` is in flight (it was not sent).
    fn release(&self, id: u64) {
        lock(&self.lanes).answered(id);
    }

    /// Opens a lane: a socketpair whose helper end goes over the control
    /// socket. Returns its index in `lanes.open`.
    fn open_lane(&self, lanes: &mut Lanes) -> std::io::Result<usize> {
        let (ours, theirs) = seqpacket_pair()?;
        // A record must fit the send buffer; the kernel caps this at what
        // it allows (net.core.wmem_max, 2 x 208 KiB by default).
        let _ = setsockopt(&ours, sockopt::SndBuf, &(2 * MAX_REQUEST));
        let ours = UnixStream::from(ours);
        ours.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let id = lanes.next_lane;
        OpenLane {
            retire_after: (id != 0).then_some(self.policy.idle),
        }
        .send(&self.control, theirs)?;
        lanes.next_lane += 1;
        lanes.open.push(Lane {
            id,
            socket: Arc::new(ours),
            busy: 0,
        });
        Ok(lanes.open.len() - 1)
    }

    /// Kills the helper (SIGKILL): it died already, or has no call in
    /// flight that would need to know why (see [`Helper::stop`]).
    pub(crate) fn kill(&self) {
        self.end().kill(None);
    }

    /// Kills the helper (SIGKILL) for reason `why`, which the calls in it
    /// are told (unless it ended by itself first, or was stopped before).
    pub(crate) fn stop(&self, why: Stop) {
        self.end().kill(Some(why));
    }

    fn end(&self) -> End {
        End {
            pid: self.pid,
            exit: self.exit.clone(),
            stop: self.stop.clone(),
        }
    }

    /// The error of a call whose helper ended as `how` says: stopped by
    /// the agent, or died.
    fn ended(&self, how: String) -> CallError {
        match lock(&self.stop).clone() {
            Some(why) => CallError::Stopped(why),
            None => CallError::Died(how),
        }
    }

    /// Ends a helper that has nothing in flight: it reads the end of its
    /// requests and exits, or is killed if it has not within `limit`.
    pub(crate) fn close(&self, limit: Duration) {
        let _ = self.control.shutdown(std::net::Shutdown::Write);
        let deadline = std::time::Instant::now() + limit;
        while !self.is_dead() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.kill();
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

    /// [`Self::wait_exit`] for async callers.
    async fn exit_async(&self) -> String {
        for _ in 0..100 {
            if let Some(how) = lock(&self.exit).clone() {
                return how;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        "stopped answering".to_owned()
    }
}

/// The last holder of a helper ends it. Every call holds its helper until
/// it is answered, so a helper the agent lets go of (replaced after a
/// rescan) serves the calls still in it before it ends.
impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// glibc's default mmap threshold, which [`glibc_tunables`] keeps fixed.
const MMAP_THRESHOLD: usize = 128 * 1024;

// A lane's request buffer is above it: mapped, never taken from an arena.
const _: () = assert!(MAX_REQUEST > MMAP_THRESHOLD);

/// The glibc settings a helper runs with, before any the agent was given
/// (later settings win, so the person's own stay in force).
///
/// A burst of clients opens a lane, a thread, each (up to 64), and by
/// default glibc gives every thread that allocates a malloc arena of its
/// own (up to 8 per CPU), kept at its high-water mark for the life of the
/// process, and keeps the stacks of threads that ended for reuse. Only as
/// many threads as CPUs allocate at once, so as many arenas serve them as
/// well; and a lane that retires has nothing worth caching. Measured with
/// SoftHSM on 2 CPUs after bursts of 8 and 32 clients signing with P-256
/// and RSA: about 200 KiB less resident for each setting, with signatures
/// per second within the noise (0.95x to 1.01x in three interleaved runs
/// of pkcs11-bench's 8-client scenario).
///
/// The mmap threshold is glibc's default, fixed: by default it rises to the
/// size of any mapped block that is freed. A retiring lane frees its
/// request buffer ([`MAX_REQUEST`] bytes, mapped and touched only as far as
/// requests fill it), so after the first retirement each new lane's buffer
/// came from an arena instead, zeroed in full, and stayed there: the
/// helper grew by about 300 KiB with every burst of clients (1080 KiB of
/// anonymous memory idle, 1280 after one burst and its lanes' retirement,
/// 1428 after two, 2036 after three; with the fixed threshold 1272, 1272,
/// 1296).
fn glibc_tunables() -> String {
    let arenas = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .max(2);
    let ours = format!(
        "glibc.malloc.arena_max={arenas}:glibc.pthread.stack_cache_size=0:\
         glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"
    );
    match std::env::var("GLIBC_TUNABLES") {
        Ok(theirs) if !theirs.is_empty() => format!("{ours}:{theirs}"),
        _ => ours,
    }
}

/// Where the next request goes, given how many requests each open lane
/// has: the first idle lane; `None` (open a new one) when all are busy
/// and fewer than `max` are open; else the least busy (the first of them).
fn choose_lane(busy: impl ExactSizeIterator<Item = usize> + Clone, max: usize) -> Option<usize> {
    if let Some(idle) = busy.clone().position(|b| b == 0) {
        return Some(idle);
    }
    if busy.len() < max {
        return None;
    }
    busy.enumerate()
        .min_by_key(|&(_, b)| b)
        .map(|(index, _)| index)
}

/// Whether a failed write on a lane other than lane 0 means the helper
/// retired it (shut it down for reading after it was idle), or dropped it.
fn lane_retired(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(nix::libc::EPIPE | nix::libc::ECONNREFUSED | nix::libc::ECONNRESET)
    )
}

impl Lanes {
    /// Request `id` was answered (or never sent): its lane has one less.
    fn answered(&mut self, id: u64) {
        let Some(lane) = self.in_flight.remove(&id) else {
            return;
        };
        if let Some(lane) = self.open.iter_mut().find(|l| l.id == lane) {
            lane.busy = lane.busy.saturating_sub(1);
        }
    }
}

/// Where the helper's answers go.
struct Answers {
    pending: Pending,
    lanes: Arc<Mutex<Lanes>>,
    exit: Arc<Mutex<Option<String>>>,
    watchdog: Option<Arc<Notify>>,
    on_event: Box<dyn Fn() + Send + Sync>,
}

impl Answers {
    /// Hands `response` to whoever waits for it.
    fn deliver(&self, response: Response) {
        if response.id == EVENT_ID {
            (self.on_event)();
            return;
        }
        lock(&self.lanes).answered(response.id);
        let waiter = lock(&self.pending).waiters.remove(&response.id);
        match waiter {
            Some(Waiter::Task { answer, .. }) => {
                let _ = answer.send(Ok(response));
            }
            Some(Waiter::Thread(sender)) => {
                let _ = sender.send(response);
            }
            // The caller gave up (timed out, or its client left).
            None => {}
        }
    }

    /// The helper ended: record how before waking the callers (by dropping
    /// their senders), so each can say what happened.
    fn finish(&self, how: String) {
        *lock(&self.exit) = Some(how);
        lock(&self.pending).waiters.clear();
        if let Some(watchdog) = &self.watchdog {
            watchdog.notify_one();
        }
    }
}

/// How a helper ends: its pid, how it ended, and why the agent stopped it.
struct End {
    pid: Pid,
    exit: Arc<Mutex<Option<String>>>,
    stop: Arc<Mutex<Option<Stop>>>,
}

impl End {
    /// SIGKILL for the helper, unless it has ended (its pid may be
    /// reused). The reason is recorded first, so the calls it ends find it;
    /// the first reason given stays.
    fn kill(&self, why: Option<Stop>) {
        let exit = lock(&self.exit);
        if exit.is_none() {
            if let Some(why) = why {
                lock(&self.stop).get_or_insert(why);
            }
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }
}

/// Keeps the time limits of a helper's async calls until it ends: sleeps
/// until the earliest deadline of the calls in flight (or, with none, until
/// a call comes), answers those past it with a timeout and kills the helper.
///
/// A call registers no timer of its own. With one call in flight at a time
/// (one client signing), each call's timer was the runtime's only one, and
/// tokio wakes its driver for every new earliest timer: an eventfd write
/// and one more epoll_wait per signature. This task sets a timer about
/// once per time limit, and is woken only by a call whose deadline comes
/// before it would look anyway (see [`Helper::register`]).
async fn watch(pending: Pending, end: End, wake: Arc<Notify>) {
    loop {
        if lock(&end.exit).is_some() {
            return;
        }
        let (expired, next) = expire(&pending, Instant::now());
        if let Some(limit) = expired {
            end.kill(Some(Stop::Hung(limit)));
        }
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline.into()) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Answers the async calls in `pending` whose deadline is past at `now`
/// with their time limit. Returns the shortest limit that ran out, if any
/// did, and the earliest deadline of the others, which is when the
/// watchdog looks next.
fn expire(pending: &Pending, now: Instant) -> (Option<Duration>, Option<Instant>) {
    let mut calls = lock(pending);
    let late: Vec<u64> = calls
        .waiters
        .iter()
        .filter(|(_, waiter)| {
            matches!(waiter, Waiter::Task { deadline: Some(deadline), .. } if *deadline <= now)
        })
        .map(|(id, _)| *id)
        .collect();
    let mut ran_out: Option<Duration> = None;
    for id in &late {
        if let Some(Waiter::Task { answer, limit, .. }) = calls.waiters.remove(id) {
            ran_out = Some(ran_out.map_or(limit, |shortest| shortest.min(limit)));
            let _ = answer.send(Err(limit));
        }
    }
    let next = calls
        .waiters
        .values()
        .filter_map(|waiter| match waiter {
            Waiter::Task { deadline, .. } => *deadline,
            Waiter::Thread(_) => None,
        })
        .min();
    calls.watched_until = next;
    (ran_out, next)
}

/// Reads one answer on the runtime.
async fn read_answer(input: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Response> {
    let mut prefix = [0u8; 4];
    input.read_exact(&mut prefix).await?;
    let mut body = vec![0u8; frame_len(prefix)?];
    input.read_exact(&mut body).await?;
    decode_body(&body)
}

/// Removes an abandoned call's waiter, so answers that never come (or come
/// after the caller left) leave nothing behind.
struct Forget<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.pending).waiters.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(path: &Path, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn task(
        deadline: Option<Instant>,
        limit: u64,
    ) -> (Waiter, oneshot::Receiver<Result<Response, Duration>>) {
        let (answer, receiver) = oneshot::channel();
        let limit = Duration::from_secs(limit);
        (
            Waiter::Task {
                answer,
                deadline,
                limit,
            },
            receiver,
        )
    }

    #[test]
    fn the_watchdog_is_woken_only_for_a_sooner_deadline() {
        let now = Instant::now();
        let at = |seconds| Some(now + Duration::from_secs(seconds));
        let mut calls = Calls::default();
        // Idle: the first call wakes it; later deadlines do not.
        assert!(calls.add(1, task(at(30), 30).0));
        assert!(!calls.add(2, task(at(31), 30).0));
        assert!(!calls.add(3, task(None, u64::MAX).0));
        let (thread, _receiver) = mpsc::sync_channel(1);
        assert!(!calls.add(4, Waiter::Thread(thread)));
        // A shorter limit (a signature behind a PIN-pad login) does.
        assert!(calls.add(5, task(at(4), 4).0));
        assert_eq!(calls.watched_until, at(4));
    }

    #[test]
    fn calls_past_their_deadline_are_answered_with_their_limit() {
        let now = Instant::now();
        let at = |seconds| Some(now + Duration::from_secs(seconds));
        let pending = Pending::default();
        let (late, mut late_answer) = task(at(1), 1);
        let (later, mut later_answer) = task(at(60), 60);
        let (soon, _soon_answer) = task(at(5), 5);
        let (forever, _forever_answer) = task(None, u64::MAX);
        let (thread, _receiver) = mpsc::sync_channel(1);
        {
            let mut calls = lock(&pending);
            for (id, waiter) in [(1, late), (2, later), (3, soon), (4, forever)] {
                calls.add(id, waiter);
            }
            calls.add(5, Waiter::Thread(thread));
        }
        // Before any deadline: nothing is answered; it looks next at the first.
        assert_eq!(expire(&pending, now), (None, at(1)));
        assert!(late_answer.try_recv().is_err());
        // Past the first: that call times out, the others wait on.
        let (expired, next) = expire(&pending, now + Duration::from_secs(2));
        assert_eq!((expired, next), (Some(Duration::from_secs(1)), at(5)));
        assert_eq!(
            late_answer.try_recv().unwrap().unwrap_err(),
            Duration::from_secs(1)
        );
        assert!(later_answer.try_recv().is_err());
        let calls = lock(&pending);
        let mut left: Vec<u64> = calls.waiters.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, [2, 3, 4, 5]);
        assert_eq!(calls.watched_until, at(5));
    }

    #[test]
    fn helpers_run_with_one_arena_per_cpu_no_stack_cache_and_a_fixed_mmap_threshold() {
        let tunables = glibc_tunables();
        assert!(
            tunables.starts_with("glibc.malloc.arena_max="),
            "{tunables}"
        );
        assert!(
            tunables.contains(":glibc.pthread.stack_cache_size=0:"),
            "{tunables}"
        );
        assert!(
            tunables.contains(":glibc.malloc.mmap_threshold=131072"),
            "{tunables}"
        );
    }

    #[test]
    fn requests_take_the_first_idle_lane_then_a_new_one_then_the_least_busy() {
        // No lane yet: open one.
        assert_eq!(choose_lane([].into_iter(), 4), None);
        // One client at a time keeps to lane 0.
        assert_eq!(choose_lane([0, 0, 0].into_iter(), 4), Some(0));
        assert_eq!(choose_lane([1, 0, 0].into_iter(), 4), Some(1));
        // All busy: a new lane while there may be more.
        assert_eq!(choose_lane([1, 1, 1].into_iter(), 4), None);
        // At the limit: behind the least busy one.
        assert_eq!(choose_lane([2, 1, 3, 1].into_iter(), 4), Some(1));
        assert_eq!(choose_lane([1].into_iter(), 1), Some(0));
    }

    #[test]
    fn the_helper_binary_is_found_beside_the_agent_or_in_libexec() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("bin/token-agent");
        file(&agent, 0o755);

        // None: the agent serves as its own helper.
        let command = HelperCommand::beside(&agent);
        assert_eq!(command.program, agent);
        assert_eq!(command.args, ["--pkcs11-helper"]);

        // Where the Debian package puts it; a file no one may run does not count.
        let libexec = dir.path().join("libexec/token-agent").join(HELPER_BINARY);
        file(&libexec, 0o644);
        assert_eq!(HelperCommand::beside(&agent).program, agent);
        std::fs::set_permissions(&libexec, std::fs::Permissions::from_mode(0o755)).unwrap();
        let command = HelperCommand::beside(&agent);
        assert_eq!(
            command.program,
            dir.path()
                .join("bin/../libexec/token-agent")
                .join(HELPER_BINARY)
        );
        assert!(command.args.is_empty());

        // Beside the agent (cargo's target folder, cargo install) comes first.
        let beside = dir.path().join("bin").join(HELPER_BINARY);
        file(&beside, 0o755);
        assert_eq!(HelperCommand::beside(&agent).program, beside);
    }
}
