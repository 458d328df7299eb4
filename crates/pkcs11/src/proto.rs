//! The protocol between the agent and its PKCS#11 helper processes.
//!
//! The agent starts `token-agent --pkcs11-helper` with pipes on its standard
//! input and output. Each message is a frame: a 4-byte big-endian length, then
//! that many bytes of JSON. The agent sends [`Request`]s, each with an id; the
//! helper answers each with a [`Response`] carrying the same id, in any order
//! (it works on several requests at once), and may send a [`Response`] with id
//! [`EVENT_ID`] unasked when `C_WaitForSlotEvent` reports a token inserted or
//! removed.
//!
//! PINs travel inside [`Op::Login`] and [`Op::Sign`] as [`Pin`], whose `Debug`
//! prints `"<redacted>"` and whose memory is zeroized on drop; the frame
//! buffers that held them are zeroized too.

use std::fmt;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// The largest frame either side accepts: far above any key list or signature.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// The id of unsolicited slot-event messages from the helper.
pub const EVENT_ID: u64 = 0;

/// A PIN on its way to the token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pin(String);

impl Pin {
    /// Wraps `pin`.
    pub fn new(pin: String) -> Self {
        Self(pin)
    }

    /// The PIN's text, for C_Login only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One request from the agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the agent, never [`EVENT_ID`]; echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// The operations a helper performs, grouped as PKCS#11 groups its functions.
#[derive(Debug, Serialize, Deserialize)]
pub enum Op {
    /// C_Initialize the module at `path` (once, first).
    Load {
        /// The module's path, already checked against the allowlist.
        path: String,
    },
    /// Every slot with a token, and the keys on it (C_GetSlotList, C_GetTokenInfo, C_FindObjects).
    List,
    /// C_Finalize and C_Initialize the module anew, then [`Op::List`]. Only
    /// for a helper that holds no sessions (the agent's scanner): it finds
    /// tokens that modules like SoftHSM only see when initialized.
    Rescan,
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
    /// C_SignInit and C_Sign with the private key whose CKA_ID is `key_id`.
    Sign {
        /// The slot.
        slot: u64,
        /// The key's CKA_ID.
        key_id: Vec<u8>,
        /// Which mechanism.
        mechanism: Mechanism,
        /// The mechanism's input (a DigestInfo, a hash, or the message for EdDSA).
        data: Vec<u8>,
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
            Self::Rescan => "C_Initialize",
            Self::Login { .. } => "C_Login",
            Self::Logout => "C_Logout",
            Self::Sign { .. } => "C_Sign",
        }
    }
}

/// The signing mechanisms token-agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mechanism {
    /// CKM_RSA_PKCS over a DigestInfo.
    RsaPkcs,
    /// CKM_ECDSA over a hash; the result is r || s.
    Ecdsa,
    /// CKM_EDDSA over the message (Ed25519).
    Eddsa,
}

/// One answer from the helper.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// The request's id, or [`EVENT_ID`].
    pub id: u64,
    /// What happened.
    pub result: Result<Reply, Failure>,
}

/// A successful answer.
#[derive(Debug, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenState {
    /// The slot id (it may change when a token is removed and comes back).
    pub slot: u64,
    /// CKA token label, trimmed.
    pub label: String,
    /// Token serial number, trimmed.
    pub serial: String,
    /// Token model, trimmed.
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinState {
    /// A wrong PIN was entered since the last good one.
    pub count_low: bool,
    /// One more wrong PIN locks it.
    pub final_try: bool,
    /// Locked: no tries left.
    pub locked: bool,
}

/// One key on a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// CKA_ID, shared by the private key and its public key or certificate.
    pub id: Vec<u8>,
    /// CKA_LABEL of the public key (or certificate).
    pub label: String,
    /// The public key in SSH wire encoding.
    pub public_key: Vec<u8>,
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Failure {
    /// CKR_USER_NOT_LOGGED_IN, or private objects are hidden before login.
    #[error("the token needs a login")]
    NotLoggedIn,
    /// The key has CKA_ALWAYS_AUTHENTICATE and no context PIN was given.
    #[error("the key needs a PIN for each signature")]
    ContextLoginRequired,
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

/// Writes `message` as one frame. The serialised form is zeroized after
/// writing because it may hold a PIN.
pub fn write_frame<T: Serialize>(out: &mut impl Write, message: &T) -> io::Result<()> {
    let body = Zeroizing::new(serde_json::to_vec(message).map_err(io::Error::other)?);
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| (*len as usize) <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    let mut frame = Zeroizing::new(Vec::with_capacity(body.len() + 4));
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    out.write_all(&frame)?;
    out.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(input: &mut impl Read) -> io::Result<Option<T>> {
    let mut prefix = [0u8; 4];
    match input.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is too large"),
        ));
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    input.read_exact(&mut body)?;
    let message =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(message))
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
                mechanism: Mechanism::Ecdsa,
                data: vec![0; 32],
                context_pin: Some(Pin::new("987654".into())),
                context_pin_pad: false,
            },
        };
        let text = format!("{request:?}");
        assert!(!text.contains("987654"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut frame = (u32::MAX).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let result: io::Result<Option<Request>> = read_frame(&mut frame.as_slice());
        assert!(result.is_err());
    }
}
