//! A private PC/SC stack per test: its own pcscd, with its own socket and
//! reader.conf naming vpcd ports, and piv-sim cards plugged into them.
//!
//! Facts about pcsc-lite 1.9.9 (Debian 12) and vsmartcard 0.9 this rig copes with:
//!
//! - libpcsclite honours `PCSCLITE_CSOCK_NAME`, but pcscd 1.9.9 does not: it
//!   always listens on `/run/pcscd/pcscd.comm` and writes `/run/pcscd/pcscd.pid`
//!   (and refuses to start if another pcscd owns them). So each pcscd runs in its
//!   own mount namespace (`unshare --mount`, with `--map-root-user` when we are
//!   not root) with the test's temporary directory bind-mounted over `/run`:
//!   its socket appears as `<tmp>/run/pcscd/pcscd.comm`, which clients reach
//!   through `PCSCLITE_CSOCK_NAME`, and the real `/run/pcscd` is never touched.
//! - libpcsclite reads `PCSCLITE_CSOCK_NAME` once per process, so in-process
//!   PC/SC clients (the `yubikey` crate) must run in a child process per rig:
//!   see [`PcscRig::run_child_test`].
//! - The vpcd driver makes two readers per reader.conf entry (`NAME 00 00` and
//!   `NAME 00 01`), listening on the entry's port and the next one, on all
//!   interfaces (0.0.0.0; the driver has no option for loopback). The card
//!   connects to it as a TCP client. Ports are picked free, and a collision with
//!   a parallel test is seen in pcscd's log ("Could not initialize connection to
//!   virtual ICC") and retried.
//! - A second vpcd entry in the same pcscd silently takes over the first one's
//!   slots (the driver keeps one global table of slots per process), so one
//!   pcscd serves at most two cards; more cards need more rigs.
//! - vpcd probes for a card about every 400 ms by reading its ATR, and pcscd
//!   powers a card up as soon as it notices it; a client that connects before
//!   that power-up is over fails, so the rig waits for it (on start and after
//!   every insertion) before handing the card to a test.

use std::fs::{self, File};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use piv_sim::{CardConfig, Simulator, VirtualCard};
use tempfile::TempDir;

/// The vpcd reader driver of Debian's vsmartcard-vpcd package.
pub const VPCD_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";
/// The reader name prefix: what a YubiKey's CCID interface is called, so tools'
/// default reader filters ("Yubikey" in yubico-piv-tool) pick the card.
pub const READER_NAME: &str = "Yubico YubiKey OTP+FIDO+CCID";
/// Set in a child process started by [`PcscRig::run_child_test`].
pub const CHILD_ENV: &str = "PIV_SIM_RIG_CHILD";
/// Set in every command of a rig: the path of its piv-sim control socket
/// (see `piv_sim::control`), so that a child process can touch, pull and
/// insert the rig's cards.
pub const CONTROL_ENV: &str = "PIV_SIM_CONTROL";

/// What pcscd logs (at info level) when it notices that a card left a reader.
const REMOVED: &str = "Card Removed From";
const START_TIMEOUT: Duration = Duration::from_secs(15);
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
const PORT_ATTEMPTS: usize = 8;
/// Cards one pcscd can serve: the two slots of one vpcd entry.
pub const MAX_CARDS: usize = 2;

/// Serialises port picking and pcscd start-up within this process, so parallel
/// tests of one binary do not race for the same ports.
static START_LOCK: Mutex<()> = Mutex::new(());

/// A running pcscd with piv-sim cards behind it. Dropping it pulls the cards
/// and stops pcscd (SIGTERM, then SIGKILL), by PID.
#[derive(Debug)]
pub struct PcscRig {
    cards: Vec<Arc<Simulator>>,
    control: PathBuf,
    control_stop: Arc<AtomicBool>,
    pcscd: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    base_port: u16,
    dir: TempDir,
}

impl PcscRig {
    /// One factory-fresh card with the default serial.
    pub fn start() -> Result<Self> {
        Self::start_with(vec![VirtualCard::new(CardConfig::default())?])
    }

    /// One factory-fresh card per config.
    pub fn start_with_configs(configs: &[CardConfig]) -> Result<Self> {
        let cards = configs
            .iter()
            .map(|c| VirtualCard::new(*c))
            .collect::<Result<Vec<_>, _>>()?;
        Self::start_with(cards)
    }

    /// The given cards, card `i` in reader slot `i`.
    pub fn start_with(cards: Vec<VirtualCard>) -> Result<Self> {
        if cards.is_empty() || cards.len() > MAX_CARDS {
            bail!("a rig serves 1 to {MAX_CARDS} cards, not {}", cards.len());
        }
        let dir = tempfile::Builder::new().prefix("pcsc-rig").tempdir()?;
        let run = dir.path().join("run");
        fs::create_dir(&run)?;
        let socket = run.join("pcscd").join("pcscd.comm");
        // sun_path holds 108 bytes with its terminating NUL.
        if socket.as_os_str().len() >= 108 {
            bail!("socket path {} is too long for AF_UNIX", socket.display());
        }
        let log = dir.path().join("pcscd.log");

        let (pcscd, base_port) = {
            let _guard = START_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            start_pcscd(dir.path(), &run, &socket, &log)?
        };
        let control = dir.path().join("control");
        let mut rig = Self {
            cards: Vec::new(),
            control,
            control_stop: Arc::new(AtomicBool::new(false)),
            pcscd: Some(pcscd),
            socket,
            log,
            base_port,
            dir,
        };
        for (i, card) in cards.into_iter().enumerate() {
            let port = base_port + i as u16;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            rig.cards.push(Arc::new(Simulator::spawn(card, addr)));
        }
        serve_control(
            &rig.control,
            rig.cards.iter().map(Arc::downgrade).collect(),
            rig.control_stop.clone(),
        )?;
        for (i, card) in rig.cards.iter().enumerate() {
            if !card.wait_detections(1, START_TIMEOUT) {
                bail!(
                    "pcscd did not power card {i} up within {START_TIMEOUT:?}; pcscd log:\n{}",
                    rig.pcscd_log()
                );
            }
        }
        Ok(rig)
    }

    /// The value for `PCSCLITE_CSOCK_NAME`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The rig's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The first vpcd port; card `i` is on `base_port() + i`.
    pub fn base_port(&self) -> u16 {
        self.base_port
    }

    /// Card `i`; panics if the rig has no such card (a bug in the test).
    pub fn card(&self, i: usize) -> &Simulator {
        &self.cards[i]
    }

    /// The piv-sim control socket of this rig's cards (also in [`CONTROL_ENV`]
    /// of every command the rig makes).
    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// The PC/SC reader name of card `i`, as pcscd names vpcd's slots.
    pub fn reader_name(&self, i: usize) -> String {
        format!("{READER_NAME} 00 {i:02X}")
    }

    /// Pulls card `i` and waits until pcscd has noticed, as it would within
    /// half a second of a person pulling a key. (A client that talks to the card
    /// in between, before pcscd's next presence probe, gets a transmit error, and
    /// pcscd 1.9.9 then does not notice a re-insertion at all: its log shows
    /// "Error resetting card" and no "Card Removed".)
    pub fn remove_card(&self, i: usize) -> Result<()> {
        let card = self.card(i);
        let removed_before = self.pcscd_log().matches(REMOVED).count();
        card.remove();
        if !card.wait_connected(false, START_TIMEOUT) {
            bail!("card {i} did not leave the reader");
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while self.pcscd_log().matches(REMOVED).count() <= removed_before {
            if Instant::now() >= deadline {
                bail!(
                    "pcscd did not notice that card {i} was removed; pcscd log:\n{}",
                    self.pcscd_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Puts card `i` back and waits until pcscd has powered it up.
    pub fn insert_card(&self, i: usize) -> Result<()> {
        let card = self.card(i);
        let before = card.detections();
        card.insert();
        if !card.wait_detections(before + 1, START_TIMEOUT) {
            bail!(
                "pcscd did not power card {i} up after insertion; pcscd log:\n{}",
                self.pcscd_log()
            );
        }
        Ok(())
    }

    /// A command with `PCSCLITE_CSOCK_NAME` pointing at this rig's pcscd.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PCSCLITE_CSOCK_NAME", &self.socket);
        cmd.env(CONTROL_ENV, &self.control);
        cmd
    }

    /// Runs `cmd` (stdin closed) with a timeout so a stuck tool cannot hang the test.
    pub fn run(&self, cmd: &mut Command) -> Result<Output> {
        run_with_timeout(cmd, self.dir.path(), TOOL_TIMEOUT)
    }

    /// Runs `yubico-piv-tool` against card 0's reader with `args`.
    pub fn piv_tool(&self, args: &[&str]) -> Result<Output> {
        self.piv_tool_on(0, args)
    }

    /// Runs `yubico-piv-tool` against card `i`'s reader with `args`.
    pub fn piv_tool_on(&self, i: usize, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command("yubico-piv-tool");
        cmd.arg("--reader").arg(self.reader_name(i)).args(args);
        self.run(&mut cmd)
    }

    /// Re-runs the current test binary's test `test_name` in a child process
    /// whose `PCSCLITE_CSOCK_NAME` points at this rig, with [`CHILD_ENV`] set; the
    /// test sees that variable and does its PC/SC work. Fails if the child fails.
    pub fn run_child_test(&self, test_name: &str) -> Result<Output> {
        let exe = std::env::current_exe()?;
        let mut cmd = self.command(exe);
        cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1");
        let out = self.run(&mut cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains("1 passed") {
            bail!(
                "child test {test_name} failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// pcscd's log so far (info level: never APDUs, so never a PIN).
    pub fn pcscd_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PcscRig {
    fn drop(&mut self) {
        // Cards first, so pcscd sees them leave rather than break. The control
        // thread holds only weak references, so this drops them.
        self.control_stop.store(true, Ordering::SeqCst);
        self.cards.clear();
        if let Some(child) = self.pcscd.take() {
            stop_child(child);
        }
    }
}

/// Serves piv-sim's control commands for `cards` on `path` until `stop`.
fn serve_control(path: &Path, cards: Vec<Weak<Simulator>>, stop: Arc<AtomicBool>) -> Result<()> {
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("pcsc-rig control".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let Ok(mut out) = stream.try_clone() else {
                    continue;
                };
                for line in std::io::BufRead::lines(std::io::BufReader::new(stream)) {
                    let Ok(line) = line else { break };
                    let live: Vec<Arc<Simulator>> =
                        cards.iter().filter_map(Weak::upgrade).collect();
                    let answer = match piv_sim::control::apply(&live, &line) {
                        Ok(text) => format!("ok {text}\n"),
                        Err(text) => format!("error {text}\n"),
                    };
                    drop(live);
                    if std::io::Write::write_all(&mut out, answer.as_bytes()).is_err() {
                        break;
                    }
                }
            }
        })?;
    Ok(())
}

/// Sends one command to the control socket named by [`CONTROL_ENV`] (in a
/// child process of a rig) and returns the text after `ok`.
pub fn control(command: &str) -> Result<String> {
    let path = std::env::var_os(CONTROL_ENV).context("not started by a PcscRig")?;
    let mut stream = std::os::unix::net::UnixStream::connect(&path)?;
    std::io::Write::write_all(&mut stream, format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line)?;
    match line.trim_end().strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_owned()),
        None => bail!("piv-sim control {command:?}: {}", line.trim_end()),
    }
}

/// Whether this process is a child started by [`PcscRig::run_child_test`].
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// How pcscd gets a private `/run`: a mount namespace, which needs either root
/// (`--mount`) or unprivileged user namespaces (`--map-root-user`).
const UNSHARE_VARIANTS: [&[&str]; 2] = [&["--mount", "--map-root-user"], &["--mount"]];

/// Starts pcscd with one vpcd entry (two slots); returns it and the first port.
fn start_pcscd(dir: &Path, run: &Path, socket: &Path, log: &Path) -> Result<(Child, u16)> {
    let conf = dir.join("reader.conf");
    let mut last_error = None;
    for _ in 0..PORT_ATTEMPTS {
        let base = free_port_run(MAX_CARDS)?;
        // vpcd listens on 0.0.0.0 here. Its reverse mode (`DEVICENAME
        // 127.0.0.1:PORT`: the driver connects out to a card listening on
        // loopback) was tried with Debian's vsmartcard-vpcd 3.3: the driver
        // connected to PORT for the reader's first slot, but nothing came to
        // PORT+1 for the second slot within 6 s, and this rig needs two cards
        // per pcscd (see MAX_CARDS), so it keeps the listening mode.
        fs::write(
            &conf,
            format!(
                "FRIENDLYNAME \"{READER_NAME}\"\nDEVICENAME /dev/null:{base}\nLIBPATH {VPCD_DRIVER}\nCHANNELID {base}\n"
            ),
        )?;
        for variant in UNSHARE_VARIANTS {
            let _ = fs::remove_file(socket);
            let mut cmd = Command::new("unshare");
            cmd.args(variant)
                .arg("sh")
                .arg("-c")
                // Bind the test's directory over /run inside the namespace, then
                // become pcscd (same PID, so the rig can signal it directly).
                .arg(r#"mount --bind "$1" /run && exec pcscd --foreground --info --config "$2""#)
                .arg("sh")
                .arg(run)
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(File::create(log)?)
                .stderr(File::create(dir.join("pcscd.stderr"))?);
            let mut child = cmd.spawn().context(
                "could not run unshare (util-linux) to start pcscd in its own mount namespace",
            )?;
            match wait_ready(&mut child, socket, log, dir)? {
                Ready::Up => return Ok((child, base)),
                Ready::PortTaken => {
                    stop_child(child);
                    last_error = Some(anyhow::anyhow!("vpcd port {base} was taken"));
                    break;
                }
                Ready::Failed(why) => {
                    stop_child(child);
                    last_error = Some(anyhow::anyhow!(
                        "pcscd did not start with unshare {}: {why}",
                        variant.join(" ")
                    ));
                }
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("pcscd did not start"))
        .context("starting a private pcscd (needs pcscd, vsmartcard-vpcd and unshare)"))
}

enum Ready {
    Up,
    PortTaken,
    Failed(String),
}

fn wait_ready(child: &mut Child, socket: &Path, log: &Path, dir: &Path) -> Result<Ready> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains("Could not initialize connection to virtual ICC") {
            return Ok(Ready::PortTaken);
        }
        if text.contains("daemon ready") && socket.exists() {
            return Ok(Ready::Up);
        }
        if let Some(status) = child.try_wait()? {
            let stderr = fs::read_to_string(dir.join("pcscd.stderr")).unwrap_or_default();
            return Ok(Ready::Failed(format!(
                "exited with {status}: {stderr}{text}"
            )));
        }
        if Instant::now() >= deadline {
            return Ok(Ready::Failed(format!(
                "not ready after {START_TIMEOUT:?}: {text}"
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Finds `count` consecutive TCP ports free on all interfaces (vpcd binds 0.0.0.0).
fn free_port_run(count: usize) -> Result<u16> {
    for _ in 0..64 {
        let first = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let base = first.local_addr()?.port();
        if usize::from(base) + count > usize::from(u16::MAX) {
            continue;
        }
        let rest: Result<Vec<_>, _> = (1..count as u16)
            .map(|i| TcpListener::bind((Ipv4Addr::UNSPECIFIED, base + i)))
            .collect();
        if rest.is_ok() {
            return Ok(base);
        }
    }
    bail!("no run of {count} free TCP ports found")
}

fn stop_child(mut child: Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` with stdin closed and output captured in files of `dir`, killing it
/// after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, dir: &Path, timeout: Duration) -> Result<Output> {
    let out_path = tempfile::NamedTempFile::new_in(dir)?;
    let err_path = tempfile::NamedTempFile::new_in(dir)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_path.reopen()?)
        .stderr(err_path.reopen()?)
        .spawn()
        .with_context(|| format!("could not run {:?}", cmd.get_program()))?;
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} did not finish within {timeout:?}", cmd.get_program());
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = Vec::new();
    out_path.reopen()?.read_to_end(&mut stdout)?;
    let mut stderr = Vec::new();
    err_path.reopen()?.read_to_end(&mut stderr)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}
