//! The protocol between the agent and its PKCS#11 helper processes.
//!
//! The agent starts a helper (`token-agent-pkcs11-helper`) with a
//! SOCK_SEQPACKET socket on its standard input, the *control* socket, and a
//! stream socket on its standard output for answers. Requests travel on
//! *lanes*: SOCK_SEQPACKET socketpairs whose helper end the agent passes over
//! the control socket (SCM_RIGHTS), each in one [`OpenLane`] record; the
//! helper serves each lane on a thread of its own, which reads one request
//! at a time, each a record of at most [`MAX_REQUEST`] bytes. A lane opened
//! to retire is shut down for reading by the helper once it has waited that
//! long for a request: what the agent sent before is still answered, and what
//! it sends after fails with EPIPE, so no request is lost. The helper exits
//! when the control socket closes.
//!
//! Each message is a frame: a 4-byte big-endian length, then that many bytes
//! of a [`Message`] in a plain binary encoding. The agent sends [`Request`]s,
//! each with an id; the helper answers each with a [`Response`] carrying the
//! same id, in any order (its lanes work at once), and may send a
//! [`Response`] with id [`EVENT_ID`] unasked when `C_WaitForSlotEvent`
//! reports a token inserted or removed.
//!
//! PINs travel inside [`Op::Login`] and [`Op::Sign`] as [`Pin`], whose `Debug`
//! prints `"<redacted>"` and whose memory is zeroized on drop; the frame
//! buffers that held them are zeroized too (see [`Frame`]).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use zeroize::{Zeroize, Zeroizing};

/// The largest frame either side accepts: far above any key list or signature.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// The largest request the agent sends (one record of the request socket):
/// a signature over the most data an ssh-agent message holds (256 KiB),
/// with room to spare.
pub const MAX_REQUEST: usize = 320 * 1024;

/// The id of unsolicited slot-event messages from the helper.
pub const EVENT_ID: u64 = 0;

/// A SOCK_SEQPACKET socketpair, close-on-exec: what the control socket and
/// each lane are.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )?)
}

/// A control record: open the lane whose socket comes with it (SCM_RIGHTS).
///
/// On the wire, 5 bytes: 0 and a zero `u32` for a lane that stays as long
/// as the helper runs, or 1 and the milliseconds (big-endian `u32`, at
/// least 1) a lane waits for a request before the helper retires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLane {
    /// How long the lane may wait for a request; `None`: for ever.
    pub retire_after: Option<std::time::Duration>,
}

impl OpenLane {
    /// The record's size.
    pub const LEN: usize = 5;

    /// Sends this record on `control` with `lane`, the helper's end of the
    /// lane's socketpair.
    pub fn send(&self, control: impl AsFd, lane: impl AsFd) -> io::Result<()> {
        let record = self.encode();
        let fds = [lane.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        if !ancillary.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("no room for the lane's descriptor"));
        }
        rustix::net::sendmsg(
            control,
            &[IoSlice::new(&record)],
            &mut ancillary,
            SendFlags::NOSIGNAL,
        )?;
        Ok(())
    }

    /// The next lane on `control` and how it was opened; `None` when the
    /// other end closed it. A record without a socket, or not of this
    /// shape, is an error.
    pub fn receive(control: impl AsFd) -> io::Result<Option<(OwnedFd, Self)>> {
        let mut record = [0u8; Self::LEN + 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            control,
            &mut [IoSliceMut::new(&mut record)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if received.bytes == 0 {
            return Ok(None);
        }
        let lane = ancillary.drain().find_map(|message| match message {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        let open = Self::decode(&record[..received.bytes.min(record.len())])?;
        match lane {
            Some(lane) => Ok(Some((lane, open))),
            None => Err(invalid("a control record came without a socket".into())),
        }
    }

    /// The record.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut record = [0u8; Self::LEN];
        if let Some(idle) = self.retire_after {
            record[0] = 1;
            let millis = u32::try_from(idle.as_millis()).unwrap_or(u32::MAX).max(1);
            record[1..].copy_from_slice(&millis.to_be_bytes());
        }
        record
    }

    /// Reads a record, refusing any other shape.
    pub fn decode(record: &[u8]) -> io::Result<Self> {
        let Some((&kind, millis)) = record.split_first() else {
            return Err(invalid("an empty control record".into()));
        };
        let millis = <[u8; 4]>::try_from(millis)
            .map(u32::from_be_bytes)
            .map_err(|_| invalid(format!("a control record of {} bytes", record.len())))?;
        match (kind, millis) {
            (0, 0) => Ok(Self { retire_after: None }),
            (1, millis) if millis > 0 => Ok(Self {
                retire_after: Some(std::time::Duration::from_millis(u64::from(millis))),
            }),
            _ => Err(invalid(format!(
                "a control record of kind {kind} with {millis} ms"
            ))),
        }
    }
}

pub use token_agent_helper::Pin;

/// One request from the agent.
#[derive(Debug)]
pub struct Request {
    /// Chosen by the agent, never [`EVENT_ID`]; echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// The operations a helper performs, grouped as PKCS#11 groups its functions.
#[derive(Debug)]
pub enum Op {
    /// C_Initialize the module at `path` (once, first).
    Load {
        /// The module's path, already checked against the allowlist.
        path: String,
    },
    /// Every slot with a token, and the keys on it (C_GetSlotList, C_GetTokenInfo, C_FindObjects).
    List,
    /// C_Initialize the module at `path` in a helper that has none loaded,
    /// then [`Op::List`], and nothing else: the agent's scanner, a helper
    /// that exists only for one scan, finds tokens that modules like SoftHSM
    /// only see when initialized anew.
    Scan {
        /// The module's path, already checked against the allowlist.
        path: String,
    },
    /// C_Login as the user. `pin: None` logs in through the token's protected
    /// authentication path (a PIN pad).
    Login {
        /// The slot.
        slot: u64,
        /// The PIN, or none for a PIN pad.
        pin: Option<Pin>,
    },
    /// C_Logout on every slot and close the sessions (the agent was locked).
    Logout,
    /// Sign `message` with the private key whose CKA_ID is `key_id`.
    Sign {
        /// The slot.
        slot: u64,
        /// The key's CKA_ID.
        key_id: Vec<u8>,
        /// The hash and key type of the signature.
        scheme: Scheme,
        /// The data to sign, unhashed: the helper hashes it for the
        /// mechanisms that take a hash (see [`Scheme`]).
        message: Vec<u8>,
        /// The PIN for the context-specific login of a key with
        /// CKA_ALWAYS_AUTHENTICATE (None otherwise; `Some(None)`-like PIN pad
        /// logins are asked with `context_pin_pad`).
        context_pin: Option<Pin>,
        /// Log in for this signature on the reader's PIN pad.
        context_pin_pad: bool,
    },
}

impl Op {
    /// The PKCS#11 function a failure of this operation is blamed on.
    pub fn function(&self) -> &'static str {
        match self {
            Self::Load { .. } => "C_Initialize",
            Self::List => "C_FindObjects",
            Self::Scan { .. } => "C_Initialize",
            Self::Login { .. } => "C_Login",
            Self::Logout => "C_Logout",
            Self::Sign { .. } => "C_Sign",
        }
    }
}

/// The signature schemes of SSH keys on tokens. The helper signs ordinary
/// keys with the raw mechanism over a hash it computes (CKM_RSA_PKCS over a
/// DigestInfo, CKM_ECDSA over the curve's hash, CKM_EDDSA over the message),
/// and keys with CKA_ALWAYS_AUTHENTICATE, whose context login must come
/// between C_SignInit and C_Sign, with the hashing mechanism in several parts
/// (CKM_SHA256_RSA_PKCS, CKM_ECDSA_SHA256, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// ssh-rsa: PKCS#1 v1.5 over SHA-1.
    RsaSha1,
    /// rsa-sha2-256: PKCS#1 v1.5 over SHA-256.
    RsaSha256,
    /// rsa-sha2-512: PKCS#1 v1.5 over SHA-512.
    RsaSha512,
    /// ecdsa-sha2-nistp256.
    EcdsaSha256,
    /// ecdsa-sha2-nistp384.
    EcdsaSha384,
    /// ecdsa-sha2-nistp521.
    EcdsaSha512,
    /// ssh-ed25519: pure EdDSA over the message.
    Ed25519,
}

/// One answer from the helper.
#[derive(Debug)]
pub struct Response {
    /// The request's id, or [`EVENT_ID`].
    pub id: u64,
    /// What happened.
    pub result: Result<Reply, Failure>,
}

/// A successful answer.
#[derive(Debug)]
pub enum Reply {
    /// The operation succeeded and returns nothing.
    Done,
    /// The module is loaded.
    Loaded {
        /// Whether it reports token insertion and removal (C_WaitForSlotEvent).
        slot_events: bool,
    },
    /// The tokens present now.
    Tokens(Vec<TokenState>),
    /// A signature in the mechanism's raw form.
    Signature(Vec<u8>),
    /// Unsolicited: a slot changed; the agent should list again.
    SlotEvent,
}

/// A token in a slot and the keys it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenState {
    /// The slot id (it may change when a token is removed and comes back).
    pub slot: u64,
    /// The token's label, without its padding (spaces or NULs) and with
    /// control characters replaced by U+FFFD.
    pub label: String,
    /// The token's serial number, cleaned as the label.
    pub serial: String,
    /// The token's model, cleaned as the label.
    pub model: String,
    /// CKF_PROTECTED_AUTHENTICATION_PATH: the PIN is entered on the reader.
    pub protected_auth_path: bool,
    /// CKF_LOGIN_REQUIRED.
    pub login_required: bool,
    /// The user PIN's state flags.
    pub pin: PinState,
    /// Whether the token takes several sessions at once.
    pub parallel: bool,
    /// The keys: public key or certificate objects with a CKA_ID.
    pub keys: Vec<KeyInfo>,
}

/// CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinState {
    /// A wrong PIN was entered since the last good one.
    pub count_low: bool,
    /// One more wrong PIN locks it.
    pub final_try: bool,
    /// Locked: no tries left.
    pub locked: bool,
}

/// One key on a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// CKA_ID, shared by the private key and its public key or certificate.
    pub id: Vec<u8>,
    /// CKA_LABEL of the public key (or certificate), cleaned as the token's label.
    pub label: String,
    /// The public key in SSH wire encoding.
    pub public_key: Vec<u8>,
    /// CKA_PRIVATE of the public key (or certificate) object: the token
    /// shows it only to a session logged in.
    pub private: bool,
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// CKR_USER_NOT_LOGGED_IN, or private objects are hidden before login.
    #[error("the token needs a login")]
    NotLoggedIn,
    /// The key has CKA_ALWAYS_AUTHENTICATE and no context PIN was given.
    #[error("the key needs a PIN for each signature")]
    ContextLoginRequired,
    /// The key has CKA_ALWAYS_AUTHENTICATE, and this module cannot be
    /// given its PIN in a way token-agent can sign after (the reason says
    /// why, and whether a PIN was asked).
    #[error("cannot sign with this key: {0}")]
    CannotSign(String),
    /// CKR_PIN_INCORRECT (or CKR_PIN_LEN_RANGE), with the token's PIN state after it.
    #[error("the PIN is incorrect")]
    PinIncorrect(PinState),
    /// CKR_PIN_LOCKED.
    #[error("the PIN is locked")]
    PinLocked,
    /// CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_SLOT_ID_INVALID.
    #[error("the token was removed")]
    DeviceRemoved,
    /// No private key with this CKA_ID.
    #[error("the token has no private key with this CKA_ID")]
    KeyNotFound,
    /// Another PKCS#11 error.
    #[error("{function} failed: {message}")]
    Module {
        /// The function that failed.
        function: String,
        /// The module's error (CKR_... and its meaning).
        message: String,
    },
    /// The module could not be loaded.
    #[error("cannot load the module: {0}")]
    Load(String),
    /// A malformed or out-of-order request.
    #[error("helper protocol error: {0}")]
    Protocol(String),
}

/// Writes `message` as one frame, in a single write so that threads sharing
/// `out` never interleave.
pub fn write_frame(out: &mut impl Write, message: &impl Message) -> io::Result<()> {
    let frame = encode_frame(message)?;
    out.write_all(&frame)?;
    out.flush()
}

/// `message` as one frame, length prefix included. It starts large enough
/// for the signature request of a user authentication with most keys.
pub fn encode_frame(message: &impl Message) -> io::Result<Frame> {
    let mut frame = Frame {
        bytes: Vec::with_capacity(512),
        secret: false,
    };
    frame.bytes.extend_from_slice(&[0; 4]);
    message.encode(&mut Encoder(&mut frame));
    let len = u32::try_from(frame.bytes.len() - 4)
        .ok()
        .filter(|len| (*len as usize) <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    frame.bytes[..4].copy_from_slice(&len.to_be_bytes());
    Ok(frame)
}

/// An encoded frame. One that holds a secret (a [`Pin`]) is zeroized when
/// dropped, and so is every smaller buffer it grew out of after the secret
/// was written (see [`Encoder`]); the others, most of them signature
/// requests, are freed as they are: wiping them would only cost time.
#[derive(Debug)]
pub struct Frame {
    bytes: Vec<u8>,
    secret: bool,
}

impl Frame {
    /// Whether a secret was written into the frame.
    pub fn holds_secret(&self) -> bool {
        self.secret
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if self.secret {
            self.bytes.zeroize();
        }
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream. A frame must hold
/// exactly one message: trailing bytes are an error, as are unknown tags.
pub fn read_frame<T: Message>(input: &mut impl Read) -> io::Result<Option<T>> {
    let mut prefix = [0u8; 4];
    match input.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = frame_len(prefix)?;
    let mut body = Zeroizing::new(vec![0u8; len]);
    input.read_exact(&mut body)?;
    decode_body(&body).map(Some)
}

/// Decodes one whole frame (a record of the request socket): the length
/// prefix must match the rest exactly.
pub fn decode_frame<T: Message>(frame: &[u8]) -> io::Result<T> {
    let (prefix, body) = frame
        .split_first_chunk::<4>()
        .ok_or_else(|| invalid("truncated frame".into()))?;
    if frame_len(*prefix)? != body.len() {
        return Err(invalid(format!(
            "the frame says {} bytes but holds {}",
            u32::from_be_bytes(*prefix),
            body.len()
        )));
    }
    decode_body(body)
}

/// The length of a frame from its 4-byte prefix, refused above [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!("frame of {len} bytes is too large")));
    }
    Ok(len)
}

/// Decodes a frame's body, which must hold exactly one message.
pub fn decode_body<T: Message>(body: &[u8]) -> io::Result<T> {
    let mut decoder = Decoder(body);
    let message = T::decode(&mut decoder)?;
    if !decoder.0.is_empty() {
        return Err(invalid(format!(
            "{} bytes after the message",
            decoder.0.len()
        )));
    }
    Ok(message)
}

/// A message of this protocol. The encoding is a plain binary one, in the
/// spirit of OpenSSH's own helper protocol: integers big-endian, byte
/// strings and text as a u32 length and the bytes, booleans as one byte,
/// enums as a one-byte tag and their fields in order.
pub trait Message: Sized {
    /// Appends the message to `out`.
    fn encode(&self, out: &mut Encoder<'_>);
    /// Reads one message from `input`.
    fn decode(input: &mut Decoder<'_>) -> io::Result<Self>;
}

/// Where messages are encoded.
#[derive(Debug)]
pub struct Encoder<'a>(&'a mut Frame);

impl Encoder<'_> {
    /// Appends `bytes`. `Vec`'s own growth frees the old buffer as it is:
    /// when a frame that holds a secret must grow, the old buffer is wiped.
    fn put(&mut self, bytes: &[u8]) {
        let frame = &mut self.0.bytes;
        if frame.capacity() - frame.len() < bytes.len() {
            let wanted = (frame.len() + bytes.len()).max(2 * frame.capacity());
            let mut grown = Vec::with_capacity(wanted);
            grown.extend_from_slice(frame);
            std::mem::swap(frame, &mut grown);
            if self.0.secret {
                grown.zeroize();
            }
        }
        self.0.bytes.extend_from_slice(bytes);
    }

    fn u8(&mut self, value: u8) {
        self.put(&[value]);
    }

    fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    fn u64(&mut self, value: u64) {
        self.put(&value.to_be_bytes());
    }

    fn count(&mut self, count: usize) {
        // Frames are bounded by MAX_FRAME, far below 4 GiB, and write_frame
        // refuses a larger one, so a saturated length never goes out.
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        self.put(&count.to_be_bytes());
    }

    fn bytes(&mut self, value: &[u8]) {
        self.count(value.len());
        self.put(value);
    }

    fn str(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    /// Appends a secret: the frame is wiped when dropped.
    fn secret(&mut self, value: &str) {
        self.0.secret = true;
        self.str(value);
    }
}

/// What messages are decoded from.
#[derive(Debug)]
pub struct Decoder<'a>(&'a [u8]);

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid("truncated message".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn bool(&mut self) -> io::Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(invalid(format!("{other} is not a boolean"))),
        }
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut raw = [0; 4];
        raw.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(raw))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut raw = [0; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(raw))
    }

    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }

    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| invalid("text is not UTF-8".into()))
    }

    /// A count of items, each at least `min_size` bytes: a count the rest
    /// of the message cannot hold is refused before anything is allocated.
    fn count(&mut self, min_size: usize) -> io::Result<usize> {
        let count = self.u32()? as usize;
        if count.saturating_mul(min_size.max(1)) > self.0.len() {
            return Err(invalid(format!(
                "a count of {count} items overruns the message"
            )));
        }
        Ok(count)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn unknown_tag(what: &str, tag: u8) -> io::Error {
    invalid(format!("unknown {what} tag {tag}"))
}

impl Message for Pin {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.secret(self.expose());
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        Ok(Pin::new(input.string()?))
    }
}

impl<T: Message> Message for Option<T> {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.bool(self.is_some());
        if let Some(value) = self {
            value.encode(out);
        }
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        if input.bool()? {
            Ok(Some(T::decode(input)?))
        } else {
            Ok(None)
        }
    }
}

impl Message for Request {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.u64(self.id);
        match &self.op {
            Op::Load { path } => {
                out.u8(1);
                out.str(path);
            }
            Op::List => out.u8(2),
            Op::Scan { path } => {
                out.u8(3);
                out.str(path);
            }
            Op::Login { slot, pin } => {
                out.u8(4);
                out.u64(*slot);
                pin.encode(out);
            }
            Op::Logout => out.u8(5),
            Op::Sign {
                slot,
                key_id,
                scheme,
                message,
                context_pin,
                context_pin_pad,
            } => {
                out.u8(6);
                out.u64(*slot);
                out.bytes(key_id);
                scheme.encode(out);
                out.bytes(message);
                context_pin.encode(out);
                out.bool(*context_pin_pad);
            }
        }
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        let id = input.u64()?;
        let op = match input.u8()? {
            1 => Op::Load {
                path: input.string()?,
            },
            2 => Op::List,
            3 => Op::Scan {
                path: input.string()?,
            },
            4 => Op::Login {
                slot: input.u64()?,
                pin: Option::decode(input)?,
            },
            5 => Op::Logout,
            6 => Op::Sign {
                slot: input.u64()?,
                key_id: input.bytes()?,
                scheme: Scheme::decode(input)?,
                message: input.bytes()?,
                context_pin: Option::decode(input)?,
                context_pin_pad: input.bool()?,
            },
            tag => return Err(unknown_tag("operation", tag)),
        };
        Ok(Self { id, op })
    }
}

impl Message for Scheme {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.u8(match self {
            Self::RsaSha1 => 1,
            Self::RsaSha256 => 2,
            Self::RsaSha512 => 3,
            Self::EcdsaSha256 => 4,
            Self::EcdsaSha384 => 5,
            Self::EcdsaSha512 => 6,
            Self::Ed25519 => 7,
        });
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        match input.u8()? {
            1 => Ok(Self::RsaSha1),
            2 => Ok(Self::RsaSha256),
            3 => Ok(Self::RsaSha512),
            4 => Ok(Self::EcdsaSha256),
            5 => Ok(Self::EcdsaSha384),
            6 => Ok(Self::EcdsaSha512),
            7 => Ok(Self::Ed25519),
            tag => Err(unknown_tag("scheme", tag)),
        }
    }
}

impl Message for Response {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.u64(self.id);
        match &self.result {
            Ok(reply) => {
                out.u8(0);
                reply.encode(out);
            }
            Err(failure) => {
                out.u8(1);
                failure.encode(out);
            }
        }
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        let id = input.u64()?;
        let result = match input.u8()? {
            0 => Ok(Reply::decode(input)?),
            1 => Err(Failure::decode(input)?),
            tag => return Err(unknown_tag("result", tag)),
        };
        Ok(Self { id, result })
    }
}

impl Message for Reply {
    fn encode(&self, out: &mut Encoder<'_>) {
        match self {
            Self::Done => out.u8(1),
            Self::Loaded { slot_events } => {
                out.u8(2);
                out.bool(*slot_events);
            }
            Self::Tokens(tokens) => {
                out.u8(3);
                out.count(tokens.len());
                for token in tokens {
                    token.encode(out);
                }
            }
            Self::Signature(signature) => {
                out.u8(4);
                out.bytes(signature);
            }
            Self::SlotEvent => out.u8(5),
        }
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        match input.u8()? {
            1 => Ok(Self::Done),
            2 => Ok(Self::Loaded {
                slot_events: input.bool()?,
            }),
            3 => {
                let count = input.count(TokenState::MIN_SIZE)?;
                let tokens = (0..count)
                    .map(|_| TokenState::decode(input))
                    .collect::<io::Result<_>>()?;
                Ok(Self::Tokens(tokens))
            }
            4 => Ok(Self::Signature(input.bytes()?)),
            5 => Ok(Self::SlotEvent),
            tag => Err(unknown_tag("reply", tag)),
        }
    }
}

impl TokenState {
    /// The fewest bytes a token takes: slot, three empty strings, four
    /// flags, the PIN state and an empty key list.
    const MIN_SIZE: usize = 8 + 3 * 4 + 3 + 3 + 4;
}

impl Message for TokenState {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.u64(self.slot);
        out.str(&self.label);
        out.str(&self.serial);
        out.str(&self.model);
        out.bool(self.protected_auth_path);
        out.bool(self.login_required);
        self.pin.encode(out);
        out.bool(self.parallel);
        out.count(self.keys.len());
        for key in &self.keys {
            key.encode(out);
        }
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        let slot = input.u64()?;
        let label = input.string()?;
        let serial = input.string()?;
        let model = input.string()?;
        let protected_auth_path = input.bool()?;
        let login_required = input.bool()?;
        let pin = PinState::decode(input)?;
        let parallel = input.bool()?;
        let count = input.count(KeyInfo::MIN_SIZE)?;
        let keys = (0..count)
            .map(|_| KeyInfo::decode(input))
            .collect::<io::Result<_>>()?;
        Ok(Self {
            slot,
            label,
            serial,
            model,
            protected_auth_path,
            login_required,
            pin,
            parallel,
            keys,
        })
    }
}

impl Message for PinState {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.bool(self.count_low);
        out.bool(self.final_try);
        out.bool(self.locked);
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        Ok(Self {
            count_low: input.bool()?,
            final_try: input.bool()?,
            locked: input.bool()?,
        })
    }
}

impl KeyInfo {
    /// Three empty byte strings and a flag.
    const MIN_SIZE: usize = 3 * 4 + 1;
}

impl Message for KeyInfo {
    fn encode(&self, out: &mut Encoder<'_>) {
        out.bytes(&self.id);
        out.str(&self.label);
        out.bytes(&self.public_key);
        out.bool(self.private);
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        Ok(Self {
            id: input.bytes()?,
            label: input.string()?,
            public_key: input.bytes()?,
            private: input.bool()?,
        })
    }
}

impl Message for Failure {
    fn encode(&self, out: &mut Encoder<'_>) {
        match self {
            Self::NotLoggedIn => out.u8(1),
            Self::ContextLoginRequired => out.u8(2),
            Self::PinIncorrect(state) => {
                out.u8(3);
                state.encode(out);
            }
            Self::PinLocked => out.u8(4),
            Self::DeviceRemoved => out.u8(5),
            Self::KeyNotFound => out.u8(6),
            Self::Module { function, message } => {
                out.u8(7);
                out.str(function);
                out.str(message);
            }
            Self::Load(message) => {
                out.u8(8);
                out.str(message);
            }
            Self::Protocol(message) => {
                out.u8(9);
                out.str(message);
            }
            Self::CannotSign(reason) => {
                out.u8(10);
                out.str(reason);
            }
        }
    }

    fn decode(input: &mut Decoder<'_>) -> io::Result<Self> {
        match input.u8()? {
            1 => Ok(Self::NotLoggedIn),
            2 => Ok(Self::ContextLoginRequired),
            3 => Ok(Self::PinIncorrect(PinState::decode(input)?)),
            4 => Ok(Self::PinLocked),
            5 => Ok(Self::DeviceRemoved),
            6 => Ok(Self::KeyNotFound),
            7 => Ok(Self::Module {
                function: input.string()?,
                message: input.string()?,
            }),
            8 => Ok(Self::Load(input.string()?)),
            9 => Ok(Self::Protocol(input.string()?)),
            10 => Ok(Self::CannotSign(input.string()?)),
            tag => Err(unknown_tag("failure", tag)),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let request = Request {
            id: 7,
            op: Op::Login {
                slot: 3,
                pin: Some(Pin::new("123456".into())),
            },
        };
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &request).unwrap();
        let back: Request = read_frame(&mut buffer.as_slice()).unwrap().unwrap();
        assert_eq!(back.id, 7);
        match back.op {
            Op::Login { slot, pin } => {
                assert_eq!(slot, 3);
                assert_eq!(pin.unwrap().expose(), "123456");
            }
            other => panic!("{other:?}"),
        }
        let none: Option<Request> = read_frame(&mut [].as_slice()).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn debug_never_shows_the_pin() {
        let request = Request {
            id: 1,
            op: Op::Sign {
                slot: 0,
                key_id: vec![1],
                scheme: Scheme::EcdsaSha256,
                message: vec![0; 32],
                context_pin: Some(Pin::new("987654".into())),
                context_pin_pad: false,
            },
        };
        let text = format!("{request:?}");
        assert!(!text.contains("987654"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn lane_records_round_trip_and_odd_ones_are_refused() {
        for lane in [
            OpenLane { retire_after: None },
            OpenLane {
                retire_after: Some(std::time::Duration::from_millis(250)),
            },
        ] {
            assert_eq!(OpenLane::decode(&lane.encode()).unwrap(), lane);
        }
        for bad in [
            &[][..],
            &[0],
            &[0, 0, 0, 0, 1],
            &[1, 0, 0, 0, 0],
            &[2, 0, 0, 0, 0],
        ] {
            assert!(OpenLane::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut frame = (u32::MAX).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let result: io::Result<Option<Request>> = read_frame(&mut frame.as_slice());
        assert!(result.is_err());
    }

    fn frame(message: &impl Message) -> Vec<u8> {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, message).unwrap();
        buffer
    }

    fn requests() -> Vec<Request> {
        let ops = vec![
            Op::Load {
                path: "/usr/lib/x.so".into(),
            },
            Op::List,
            Op::Scan {
                path: "/usr/lib/y.so".into(),
            },
            Op::Login { slot: 9, pin: None },
            Op::Logout,
            Op::Sign {
                slot: u64::MAX,
                key_id: vec![0, 1, 2],
                scheme: Scheme::Ed25519,
                message: vec![7; 300],
                context_pin: None,
                context_pin_pad: true,
            },
        ];
        ops.into_iter()
            .enumerate()
            .map(|(id, op)| Request { id: id as u64, op })
            .collect()
    }

    fn responses() -> Vec<Response> {
        let token = TokenState {
            slot: 4,
            label: "token".into(),
            serial: "0123".into(),
            model: "SoftHSM v2".into(),
            protected_auth_path: true,
            login_required: true,
            pin: PinState {
                count_low: true,
                final_try: false,
                locked: true,
            },
            parallel: true,
            keys: vec![KeyInfo {
                id: vec![1],
                label: "ключ".into(),
                public_key: vec![0, 0, 0, 7],
                private: true,
            }],
        };
        let results = vec![
            Ok(Reply::Done),
            Ok(Reply::Loaded { slot_events: true }),
            Ok(Reply::Tokens(vec![token.clone(), token])),
            Ok(Reply::Signature(vec![1; 64])),
            Ok(Reply::SlotEvent),
            Err(Failure::NotLoggedIn),
            Err(Failure::ContextLoginRequired),
            Err(Failure::PinIncorrect(PinState {
                count_low: true,
                final_try: true,
                locked: false,
            })),
            Err(Failure::PinLocked),
            Err(Failure::DeviceRemoved),
            Err(Failure::KeyNotFound),
            Err(Failure::Module {
                function: "C_Sign".into(),
                message: "GeneralError".into(),
            }),
            Err(Failure::Load("no such file".into())),
            Err(Failure::Protocol("what".into())),
            Err(Failure::CannotSign("why".into())),
        ];
        results
            .into_iter()
            .enumerate()
            .map(|(id, result)| Response {
                id: id as u64,
                result,
            })
            .collect()
    }

    #[test]
    fn every_message_round_trips() {
        for request in requests() {
            let back: Request = read_frame(&mut frame(&request).as_slice())
                .unwrap()
                .unwrap();
            assert_eq!(format!("{back:?}"), format!("{request:?}"));
        }
        for response in responses() {
            let back: Response = read_frame(&mut frame(&response).as_slice())
                .unwrap()
                .unwrap();
            assert_eq!(format!("{back:?}"), format!("{response:?}"));
        }
    }

    #[test]
    fn frames_that_outgrow_their_buffer_keep_every_byte() {
        // Messages of every length around the buffer's first sizes (512,
        // 1024, 2048), each with a PIN after it: the buffer grows by copying
        // into a new one (and wiping the old), at any point of the encoding.
        for len in 400..2200 {
            let message: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let request = Request {
                id: len as u64,
                op: Op::Sign {
                    slot: 3,
                    key_id: vec![9; len % 7],
                    scheme: Scheme::EcdsaSha256,
                    message: message.clone(),
                    context_pin: Some(Pin::new("24680".into())),
                    context_pin_pad: false,
                },
            };
            let frame = encode_frame(&request).unwrap();
            let back: Request = decode_frame(&frame).unwrap();
            let Op::Sign {
                message: back_message,
                context_pin: Some(pin),
                key_id,
                ..
            } = back.op
            else {
                panic!("not a sign request: {back:?}");
            };
            assert_eq!(
                (back.id, back_message, key_id),
                (request.id, message, vec![9; len % 7])
            );
            assert_eq!(pin.expose(), "24680");
        }
    }

    #[test]
    fn only_frames_with_a_pin_are_marked_secret() {
        let sign = |context_pin: Option<Pin>| Op::Sign {
            slot: 1,
            key_id: vec![1],
            scheme: Scheme::EcdsaSha256,
            message: vec![0x5a; 2000],
            context_pin,
            context_pin_pad: false,
        };
        let cases = [
            (sign(None), false),
            (sign(Some(Pin::new("2468".into()))), true),
            (
                Op::Login {
                    slot: 1,
                    pin: Some(Pin::new("123456".into())),
                },
                true,
            ),
            (Op::Login { slot: 1, pin: None }, false),
            (Op::List, false),
        ];
        for (op, secret) in cases {
            let what = format!("{op:?}");
            let frame = encode_frame(&Request { id: 1, op }).unwrap();
            assert_eq!(frame.holds_secret(), secret, "{what}");
        }
    }

    #[test]
    fn truncated_and_padded_frames_are_errors() {
        for response in responses() {
            let whole = frame(&response);
            for cut in 4..whole.len() {
                // The length prefix still claims the whole body.
                let mut short = whole[..cut].to_vec();
                assert!(read_frame::<Response>(&mut short.as_slice()).is_err());
                // A prefix that matches a cut body: the message itself is short.
                let len = u32::try_from(cut - 4).unwrap();
                short[..4].copy_from_slice(&len.to_be_bytes());
                assert!(
                    read_frame::<Response>(&mut short.as_slice()).is_err(),
                    "{response:?} cut at {cut}"
                );
            }
            let mut long = whole.clone();
            long.push(0);
            let len = u32::try_from(long.len() - 4).unwrap();
            long[..4].copy_from_slice(&len.to_be_bytes());
            assert!(read_frame::<Response>(&mut long.as_slice()).is_err());
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        // Tokens: a claimed count of 4 billion in a 6-byte body.
        let mut body = vec![0; 8];
        body.extend_from_slice(&[0, 3]);
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = decode_body::<Response>(&body).unwrap_err();
        assert!(err.to_string().contains("overruns"), "{err}");
    }

    #[test]
    fn unknown_tags_are_errors() {
        let mut body = 1u64.to_be_bytes().to_vec();
        body.push(42);
        let err = decode_body::<Request>(&body).unwrap_err();
        assert!(
            err.to_string().contains("unknown operation tag 42"),
            "{err}"
        );
    }
}
