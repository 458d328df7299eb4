//! Plugging a [`VirtualCard`] into vpcd: a thread that connects to the vpcd
//! port, serves its messages, reconnects when the connection drops, and can be
//! told to pull the card out and put it back.

use std::io::{BufReader, BufWriter};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::card::VirtualCard;
use crate::touch::TouchControl;
use crate::transport::{self, Request};

/// How long to wait between attempts to reach vpcd.
const RETRY: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A virtual card plugged into a vpcd reader, served by its own thread.
/// Dropping it pulls the card and stops the thread.
#[derive(Debug)]
pub struct Simulator {
    shared: Arc<Shared>,
    touch: TouchControl,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

#[derive(Debug)]
struct Shared {
    card: Mutex<VirtualCard>,
    control: Mutex<Control>,
    changed: Condvar,
}

#[derive(Debug)]
struct Control {
    inserted: bool,
    stop: bool,
    stream: Option<TcpStream>,
    connected: bool,
    detections: u64,
}

impl Simulator {
    /// Starts serving `card` to the vpcd driver listening on `vpcd` (for a
    /// reader.conf line `DEVICENAME /dev/null:PORT`, that is `127.0.0.1:PORT`).
    pub fn spawn(card: VirtualCard, vpcd: SocketAddr) -> Self {
        let touch = card.touch_control();
        let shared = Arc::new(Shared {
            card: Mutex::new(card),
            control: Mutex::new(Control {
                inserted: true,
                stop: false,
                stream: None,
                connected: false,
                detections: 0,
            }),
            changed: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("piv-sim {vpcd}"))
            .spawn(move || run(&worker, vpcd))
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the piv-sim thread");
        }
        Self {
            shared,
            touch,
            thread,
            addr: vpcd,
        }
    }

    /// The vpcd address this card plugs into.
    pub fn vpcd_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The card's touch sensor.
    pub fn touch(&self) -> &TouchControl {
        &self.touch
    }

    /// Runs `f` on the card (its state, or APDUs sent directly). Blocks while the
    /// card is busy with a command, for example waiting for a touch.
    pub fn with_card<R>(&self, f: impl FnOnce(&mut VirtualCard) -> R) -> R {
        f(&mut lock(&self.shared.card))
    }

    /// Pulls the card out of the reader: the vpcd connection is closed and stays
    /// closed until [`Simulator::insert`]. The card keeps its state.
    pub fn remove(&self) {
        let mut control = lock(&self.shared.control);
        control.inserted = false;
        if let Some(stream) = control.stream.take() {
            // Unblocks the serving thread's read.
            let _ = stream.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }

    /// Puts the card back into the reader.
    pub fn insert(&self) {
        lock(&self.shared.control).inserted = true;
        self.shared.changed.notify_all();
    }

    /// Whether the card is connected to vpcd right now.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.control).connected
    }

    /// How many times the reader has powered the card up (or reset it) and read
    /// its ATR. pcscd does this as soon as it notices a card, and a client can
    /// connect to the card once it has happened.
    pub fn detections(&self) -> u64 {
        lock(&self.shared.control).detections
    }

    /// Waits until the reader has powered the card up at least `count` times in all.
    pub fn wait_detections(&self, count: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| c.detections >= count)
    }

    /// Waits until the card's vpcd connection is up (`true`) or down (`false`).
    pub fn wait_connected(&self, connected: bool, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| c.connected == connected)
    }

    fn wait_until(&self, timeout: Duration, done: impl Fn(&Control) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut control = lock(&self.shared.control);
        while !done(&control) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            control = match self.shared.changed.wait_timeout(control, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        {
            let mut control = lock(&self.shared.control);
            control.stop = true;
            control.inserted = false;
            if let Some(stream) = control.stream.take() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            self.shared.changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared, addr: SocketAddr) {
    loop {
        {
            let mut control = lock(&shared.control);
            while !control.inserted && !control.stop {
                control = match shared.changed.wait(control) {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
            if control.stop {
                return;
            }
        }
        let stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::trace!(%addr, error = %e, "vpcd not reachable yet");
                let control = lock(&shared.control);
                // Sleep, but wake up at once for stop or remove.
                let _ = shared.changed.wait_timeout(control, RETRY);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        {
            let mut control = lock(&shared.control);
            if control.stop || !control.inserted {
                continue;
            }
            control.stream = stream.try_clone().ok();
            control.connected = true;
            shared.changed.notify_all();
        }
        tracing::info!(%addr, "card inserted into vpcd reader");
        serve(shared, stream);
        tracing::info!(%addr, "card removed from vpcd reader");
        // Pulling the card cuts its power.
        lock(&shared.card).unplugged();
        let mut control = lock(&shared.control);
        control.connected = false;
        control.stream = None;
        shared.changed.notify_all();
    }
}

fn serve(shared: &Shared, stream: TcpStream) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    // vpcd writes each message's 2-byte length and its body in two writes, with
    // Nagle's algorithm on: the body waits until the length is acknowledged,
    // and Linux delays that ACK by up to 40 ms. Acknowledging at once (asked
    // again before every read, as the kernel falls back to delayed ACKs) takes
    // an APDU round trip from ~44 ms to well under a millisecond.
    let quick_ack = socket2::SockRef::from(&write_half).set_tcp_quickack(true);
    if let Err(e) = &quick_ack {
        tracing::debug!(error = %e, "TCP_QUICKACK is not available; APDUs will be slow");
    }
    let quick_ack = quick_ack.is_ok();
    let mut reader = BufReader::new(stream);
    let mut writer = BufWriter::new(write_half);
    // vpcd also reads the ATR to probe presence; what counts is the ATR read
    // that completes a power-up, after which pcscd lets clients connect.
    let mut fresh = false;
    loop {
        if quick_ack {
            let _ = socket2::SockRef::from(writer.get_ref()).set_tcp_quickack(true);
        }
        let request = match transport::read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "vpcd connection closed");
                return;
            }
        };
        tracing::trace!(?request, "from vpcd");
        let is_atr = request == Request::Atr;
        fresh |= matches!(request, Request::PowerOn | Request::Reset);
        let answer = lock(&shared.card).handle(request);
        if let Some(answer) = answer {
            if let Err(e) = transport::write_frame(&mut writer, &answer) {
                tracing::debug!(error = %e, "vpcd connection closed");
                return;
            }
        }
        if is_atr && fresh {
            fresh = false;
            let mut control = lock(&shared.control);
            control.detections += 1;
            shared.changed.notify_all();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the card as consistent as a card
    // pulled mid-command; go on with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
