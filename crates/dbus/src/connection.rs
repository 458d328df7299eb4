//! A connection to a message bus: the SASL handshake, `Hello`, method calls
//! matched to their replies, and signals handed to the subscriptions whose
//! rules they match.
//!
//! One task reads the socket and one writes it. Callers only queue whole
//! messages for the writer, so a caller cancelled mid-call (a notice
//! withdrawn, a task aborted) never leaves half a message on the bus.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::address::{self, Endpoint};
use crate::wire::{self, Body, Kind, Message, Outgoing};
use crate::{Error, MatchRule, Result};

/// How long connecting, authenticating and `Hello` may take together: a bus
/// socket that accepts and never answers must not hold up a notice forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest body kept; longer ones are read past (token-agent expects
/// booleans, ids and short strings). A reply that long fails its call.
const MAX_BODY: usize = 64 * 1024;
/// The longest handshake line read.
const MAX_LINE: u64 = 512;
/// Signals queued for a subscription that has not read them yet; more are
/// dropped (lock and unlock signals come a few a minute at most).
const SIGNAL_QUEUE: usize = 32;
/// Whole messages queued for the writer.
const WRITE_QUEUE: usize = 32;

const BUS: &str = "org.freedesktop.DBus";
const BUS_PATH: &str = "/org/freedesktop/DBus";

/// A connection to the system or session bus. Clones share it; it closes when
/// the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    outgoing: mpsc::Sender<Vec<u8>>,
    /// The unique name the bus gave this connection (`:1.42`).
    name: Arc<str>,
}

#[derive(Debug, Default)]
struct Shared {
    serial: AtomicU32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    pending: HashMap<u32, oneshot::Sender<Result<Message>>>,
    subscriptions: Vec<Subscription>,
}

#[derive(Debug)]
struct Subscription {
    rules: Vec<MatchRule>,
    signals: mpsc::Sender<Message>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // No code panics while holding the lock; a poisoned lock still holds
        // consistent maps.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_serial(&self) -> u32 {
        // Serial 0 is invalid; after wrapping, skip it.
        loop {
            let serial = self.serial.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if serial != 0 {
                return serial;
            }
        }
    }

    /// Fails every waiting call, with the malformed message that ended the
    /// connection if one did, and ends every subscription.
    fn close(&self, cause: Option<&Error>) {
        let mut state = self.state();
        state.closed = true;
        for (_, call) in state.pending.drain() {
            let _ = call.send(Err(match cause {
                Some(Error::Malformed(what)) => Error::Malformed(what.clone()),
                _ => Error::Disconnected,
            }));
        }
        state.subscriptions.clear();
    }
}

impl Connection {
    /// Connects to the system bus (DBUS_SYSTEM_BUS_ADDRESS, or the standard
    /// socket).
    pub async fn system() -> Result<Self> {
        Self::connect(&address::system()).await
    }

    /// Connects to the session bus (DBUS_SESSION_BUS_ADDRESS, or
    /// `$XDG_RUNTIME_DIR/bus`).
    pub async fn session() -> Result<Self> {
        Self::connect(&address::session()?).await
    }

    /// Connects to the bus at `address`, trying its endpoints in order.
    pub async fn connect(address: &str) -> Result<Self> {
        let mut last = None;
        for endpoint in address::parse(address)? {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::open(&endpoint)).await {
                Ok(Ok(connection)) => return Ok(connection),
                Ok(Err(err)) => last = Some(err),
                Err(_) => last = Some(Error::Timeout(HANDSHAKE_TIMEOUT)),
            }
        }
        Err(last.unwrap_or(Error::Disconnected))
    }

    async fn open(endpoint: &Endpoint) -> Result<Self> {
        let stream = connect(endpoint).await?;
        let (reader, mut writer) = stream.into_split();
        let mut reader = BufReader::new(reader);
        authenticate(&mut reader, &mut writer).await?;
        let (outgoing, queue) = mpsc::channel(WRITE_QUEUE);
        let connection = Self {
            shared: Arc::default(),
            outgoing,
            name: Arc::from(""),
        };
        tokio::spawn(write(writer, queue));
        tokio::spawn(read(
            reader,
            Arc::clone(&connection.shared),
            connection.outgoing.downgrade(),
        ));
        let name = connection
            .call(BUS, BUS_PATH, BUS, "Hello", &Body::new())
            .await?
            .str_argument()?;
        tracing::debug!(name, "connected to the bus");
        Ok(Self {
            name: name.into(),
            ..connection
        })
    }

    /// The unique name the bus gave this connection.
    pub fn unique_name(&self) -> &str {
        &self.name
    }

    /// Whether the connection has closed (the bus went away, or broke the
    /// protocol): calls on it fail, and a new connection is needed.
    pub fn is_closed(&self) -> bool {
        self.shared.state().closed
    }

    /// Calls `member` of `interface` on object `path` of `destination`, and
    /// waits for the reply. An error reply is [`Error::Remote`].
    pub async fn call(
        &self,
        destination: &str,
        path: &str,
        interface: &str,
        member: &str,
        body: &Body,
    ) -> Result<Message> {
        let serial = self.shared.next_serial();
        let (reply, answer) = oneshot::channel();
        {
            let mut state = self.shared.state();
            if state.closed {
                return Err(Error::Disconnected);
            }
            state.pending.insert(serial, reply);
        }
        // Forgets the call if this future is dropped before its reply.
        let _forget = Forget {
            shared: &self.shared,
            serial,
        };
        let message = wire::encode(
            Kind::MethodCall,
            0,
            serial,
            &Outgoing {
                path: Some(path),
                interface: Some(interface),
                member: Some(member),
                destination: Some(destination),
                ..Outgoing::default()
            },
            body,
        );
        self.outgoing
            .send(message)
            .await
            .map_err(|_| Error::Disconnected)?;
        let reply = answer.await.map_err(|_| Error::Disconnected)??;
        match reply.kind() {
            Kind::Error => Err(reply.into_error()),
            _ => Ok(reply),
        }
    }

    /// Asks the bus for the signals that match any of `rules`, and returns
    /// them as they come. The subscription ends when the connection closes.
    pub async fn subscribe(&self, rules: Vec<MatchRule>) -> Result<Signals> {
        let (sender, receiver) = mpsc::channel(SIGNAL_QUEUE);
        let texts: Vec<String> = rules.iter().map(MatchRule::to_string).collect();
        {
            // Registered before the bus is asked, so no signal that the bus
            // sends right after its reply is missed.
            let mut state = self.shared.state();
            if state.closed {
                return Err(Error::Disconnected);
            }
            state.subscriptions.push(Subscription {
                rules,
                signals: sender,
            });
        }
        for text in texts {
            self.call(BUS, BUS_PATH, BUS, "AddMatch", &Body::new().str(&text))
                .await?;
        }
        Ok(Signals { receiver })
    }
}

/// Signals of one subscription.
#[derive(Debug)]
pub struct Signals {
    receiver: mpsc::Receiver<Message>,
}

impl Signals {
    /// The next signal, or None once the connection has closed.
    pub async fn next(&mut self) -> Option<Message> {
        self.receiver.recv().await
    }
}

struct Forget<'a> {
    shared: &'a Shared,
    serial: u32,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(&self.serial);
    }
}

async fn connect(endpoint: &Endpoint) -> Result<UnixStream> {
    match endpoint {
        Endpoint::Path(path) => UnixStream::connect(path).await.map_err(|source| Error::Io {
            context: format!("cannot connect to the bus at {}", path.display()),
            source,
        }),
        Endpoint::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let io = |source| Error::Io {
                context: format!(
                    "cannot connect to the bus at abstract socket {}",
                    String::from_utf8_lossy(name)
                ),
                source,
            };
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(io)?;
            // A local connect either completes or fails at once.
            let stream = std::os::unix::net::UnixStream::connect_addr(&address).map_err(io)?;
            stream.set_nonblocking(true).map_err(io)?;
            UnixStream::from_std(stream).map_err(io)
        }
    }
}

/// The SASL EXTERNAL handshake: the bus reads our uid from the socket's
/// credentials and checks it against the one we claim.
async fn authenticate(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<()> {
    let io = |source| Error::Io {
        context: "cannot authenticate to the bus".to_owned(),
        source,
    };
    let uid = nix::unistd::geteuid().as_raw().to_string();
    let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
    writer
        .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut line = Vec::new();
    (&mut *reader)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
        .map_err(io)?;
    let line = String::from_utf8_lossy(&line);
    let line = line.trim_end();
    if !line.starts_with("OK ") {
        return Err(Error::Auth(if line.is_empty() {
            "the bus closed the connection".to_owned()
        } else {
            line.to_owned()
        }));
    }
    writer.write_all(b"BEGIN\r\n").await.map_err(io)
}

async fn write(mut writer: OwnedWriteHalf, mut queue: mpsc::Receiver<Vec<u8>>) {
    while let Some(message) = queue.recv().await {
        if let Err(err) = writer.write_all(&message).await {
            tracing::debug!(%err, "cannot write to the bus");
            return;
        }
    }
    // Every handle is gone: dropping the write half shuts it down, and the
    // bus closes the connection, which ends the reader.
}

async fn read(
    mut reader: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    outgoing: mpsc::WeakSender<Vec<u8>>,
) {
    let cause = loop {
        match receive(&mut reader).await {
            Ok(Some(message)) => dispatch(&shared, &outgoing, message),
            Ok(None) => {}
            Err(Error::Disconnected) => break None,
            Err(err) => {
                tracing::warn!(%err, "leaving the bus");
                break Some(err);
            }
        }
    };
    shared.close(cause.as_ref());
}

/// Reads one message; None for one of a type to ignore.
async fn receive(reader: &mut (impl AsyncRead + Unpin)) -> Result<Option<Message>> {
    let mut fixed = [0u8; wire::FIXED_HEADER];
    if let Err(err) = reader.read_exact(&mut fixed).await {
        return Err(match err.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Disconnected,
            _ => Error::Io {
                context: "cannot read from the bus".to_owned(),
                source: err,
            },
        });
    }
    let sizes = wire::sizes(&fixed)?;
    let io = |source| Error::Io {
        context: "cannot read from the bus".to_owned(),
        source,
    };
    let mut header = fixed.to_vec();
    header.resize(wire::FIXED_HEADER + sizes.fields, 0);
    reader
        .read_exact(&mut header[wire::FIXED_HEADER..])
        .await
        .map_err(io)?;
    let mut padding = [0u8; 8];
    reader
        .read_exact(&mut padding[..sizes.padding])
        .await
        .map_err(io)?;
    let body = if sizes.body <= MAX_BODY {
        let mut body = vec![0; sizes.body];
        reader.read_exact(&mut body).await.map_err(io)?;
        Some(body)
    } else {
        let skipped = tokio::io::copy(
            &mut (&mut *reader).take(sizes.body as u64),
            &mut tokio::io::sink(),
        )
        .await
        .map_err(io)?;
        if skipped != sizes.body as u64 {
            return Err(Error::Disconnected);
        }
        None
    };
    Message::parse(&header, body, sizes.body)
}

fn dispatch(shared: &Shared, outgoing: &mpsc::WeakSender<Vec<u8>>, message: Message) {
    match message.kind() {
        Kind::MethodReturn | Kind::Error => {
            let call = message
                .reply_serial()
                .and_then(|serial| shared.state().pending.remove(&serial));
            if let Some(call) = call {
                let _ = call.send(Ok(message));
            }
        }
        Kind::Signal => {
            let mut state = shared.state();
            state.subscriptions.retain(|subscription| {
                if !subscription.rules.iter().any(|rule| rule.matches(&message)) {
                    return !subscription.signals.is_closed();
                }
                match subscription.signals.try_send(message.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::debug!(
                            member = message.member(),
                            "a bus signal dropped: its subscriber is behind"
                        );
                        true
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
        Kind::MethodCall => answer(shared, outgoing, &message),
    }
}

/// Answers a method call made to this connection: `Peer.Ping` as the
/// specification asks of every connection, anything else as unknown.
fn answer(shared: &Shared, outgoing: &mpsc::WeakSender<Vec<u8>>, call: &Message) {
    if call.flags() & wire::NO_REPLY_EXPECTED != 0 {
        return;
    }
    let Some(outgoing) = outgoing.upgrade() else {
        return;
    };
    let ping = call.interface() == Some("org.freedesktop.DBus.Peer")
        && call.member() == Some("Ping")
        && call.signature().is_empty();
    let (kind, error_name, body) = if ping {
        (Kind::MethodReturn, None, Body::new())
    } else {
        (
            Kind::Error,
            Some("org.freedesktop.DBus.Error.UnknownMethod"),
            Body::new().str(&format!(
                "token-agent has no method {}.{}",
                call.interface().unwrap_or(""),
                call.member().unwrap_or("")
            )),
        )
    };
    let reply = wire::encode(
        kind,
        wire::NO_REPLY_EXPECTED,
        shared.next_serial(),
        &Outgoing {
            error_name,
            reply_serial: Some(call.serial()),
            destination: call.sender(),
            ..Outgoing::default()
        },
        &body,
    );
    if outgoing.try_send(reply).is_err() {
        tracing::debug!("a reply to a bus peer dropped: the write queue is full");
    }
}
