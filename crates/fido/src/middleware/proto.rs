//! The protocol between the agent and its sk middleware helpers.
//!
//! The agent starts `token-agent --sk-helper` with a socket on its standard
//! input (for a send timeout) and a pipe on its standard output. Each message is a frame: a 4-byte big-endian length, then
//! that many bytes of JSON. The agent sends a [`Request`] with an id and waits
//! for the [`Response`] with the same id; it sends one request at a time.
//! The first request is [`Op::Load`]; the library stays loaded until the
//! helper's standard input closes.
//!
//! The PIN travels inside [`Sign`] as a [`Pin`], whose `Debug` prints
//! `"<redacted>"` and whose memory is wiped on drop; so are the frame buffers.
//!
//! (The framing is the PKCS#11 helper's; the two crates keep their own small
//! copies, since a backend never depends on another backend.)

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The largest frame either side accepts: far above any signature request
/// (the agent's own messages are at most 256 KiB, and JSON quadruples bytes).
pub(crate) const MAX_FRAME: usize = 4 * 1024 * 1024;

pub(crate) use token_agent_helper::Pin;

/// One request from the agent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    /// Chosen by the agent, echoed in the response.
    pub(crate) id: u64,
    /// What to do.
    pub(crate) op: Op,
}

/// A [`Request`] as the agent writes it: the same frame, with the operation
/// borrowed, so a request can be sent again to a fresh helper.
#[derive(Debug, Serialize)]
pub(crate) struct RequestRef<'a> {
    /// As in [`Request`].
    pub(crate) id: u64,
    /// As in [`Request`].
    pub(crate) op: &'a Op,
}

/// What a helper does.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Op {
    /// Load the middleware at `path` (already canonical and allowed) and
    /// check its API version; once, first.
    Load {
        /// The library.
        path: String,
    },
    /// `sk_sign`.
    Sign(Sign),
}

/// The arguments of `sk_sign` (sk-api.h).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Sign {
    /// SSH_SK_ECDSA (0) or SSH_SK_ED25519 (1).
    pub(crate) alg: u32,
    /// The data to sign (the middleware hashes it).
    pub(crate) data: Vec<u8>,
    /// The key's application.
    pub(crate) application: String,
    /// The key handle.
    pub(crate) key_handle: Vec<u8>,
    /// The key's SSH_SK_* flags.
    pub(crate) flags: u8,
    /// The PIN, when there is one.
    pub(crate) pin: Option<Pin>,
}

/// One answer from a helper.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Response {
    /// The request's id.
    pub(crate) id: u64,
    /// What happened.
    pub(crate) result: Result<Reply, Failure>,
}

/// A successful answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// The middleware is loaded; its `sk_api_version`.
    Loaded {
        /// The version it reported.
        version: u32,
    },
    /// What `sk_sign` returned.
    Signed(Signed),
}

/// `struct sk_sign_response`, copied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Signed {
    /// The authenticator flags.
    pub(crate) flags: u8,
    /// The signature counter.
    pub(crate) counter: u32,
    /// Ed25519: the signature; ECDSA: r.
    pub(crate) sig_r: Vec<u8>,
    /// ECDSA: s.
    pub(crate) sig_s: Vec<u8>,
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum Failure {
    /// The middleware returned this SSH_SK_ERR_* code.
    #[error("the middleware returned {code}")]
    Sk {
        /// The code.
        code: i32,
    },
    /// The library could not be loaded, or is not a middleware of this API version.
    #[error("{0}")]
    Load(String),
    /// The middleware claimed success with an unusable answer.
    #[error("{0}")]
    Malformed(String),
    /// A malformed or out-of-order request.
    #[error("helper protocol error: {0}")]
    Protocol(String),
}

/// Writes `message` as one frame, in a single `write_all` of a buffer
/// built by [`encode_frame`] and wiped after writing. Callers hand it the
/// descriptor itself, not a `BufWriter`, whose buffer would keep a copy of
/// the frame (and of any PIN in it) after the call.
pub(crate) fn write_frame<T: Serialize>(out: &mut impl Write, message: &T) -> io::Result<()> {
    let frame = encode_frame(message)?;
    out.write_all(&frame)?;
    out.flush()
}

/// `message` as one frame (length prefix and JSON), in a buffer allocated
/// once at its final size: serialising into a growing `Vec` would leave the
/// copies made before each reallocation, PIN included, in freed memory.
pub(crate) fn encode_frame<T: Serialize>(message: &T) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut counted = Counter(0);
    serde_json::to_writer(&mut counted, message).map_err(io::Error::other)?;
    let len = u32::try_from(counted.0)
        .ok()
        .filter(|len| (*len as usize) <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    let mut frame = Zeroizing::new(Vec::with_capacity(counted.0 + 4));
    frame.extend_from_slice(&len.to_be_bytes());
    serde_json::to_writer(&mut *frame, message).map_err(io::Error::other)?;
    if frame.len() != counted.0 + 4 {
        // Serialising the same value twice gave two lengths: cannot happen
        // with serde_json and our types, but a wrong prefix must not go out.
        return Err(io::Error::other(
            "the frame changed size while being written",
        ));
    }
    Ok(frame)
}

/// Counts the bytes written to it.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub(crate) fn read_frame<T: for<'de> Deserialize<'de>>(
    input: &mut impl Read,
) -> io::Result<Option<T>> {
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
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sign request with `data` and the PIN 135790.
    fn sign_with_pin(id: u64, data: Vec<u8>) -> Request {
        Request {
            id,
            op: Op::Sign(Sign {
                alg: 1,
                data,
                application: "ssh:".into(),
                key_handle: vec![4; 64],
                flags: 0x05,
                pin: Some(Pin::new("135790".into())),
            }),
        }
    }

    #[test]
    fn sign_requests_round_trip_and_hide_the_pin() {
        let request = sign_with_pin(9, vec![1, 2, 3]);
        assert!(!format!("{request:?}").contains("135790"));
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &request).unwrap();
        let back: Request = read_frame(&mut buffer.as_slice()).unwrap().unwrap();
        assert_eq!(back.id, 9);
        match back.op {
            Op::Sign(sign) => {
                assert_eq!(sign.pin.unwrap().expose(), "135790");
                assert_eq!(sign.flags, 0x05);
            }
            other => panic!("{other:?}"),
        }
        let none: Option<Request> = read_frame(&mut [].as_slice()).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn frames_are_built_in_one_buffer_of_their_final_size() {
        // No reallocation while serialising: the buffer's capacity is what
        // was asked for up front, so no partial copy of the PIN was freed.
        let request = sign_with_pin(3, vec![7; 5000]);
        let frame = encode_frame(&request).unwrap();
        assert_eq!(frame.capacity(), frame.len());
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        // And write_frame writes exactly that, in one piece, to its writer.
        let mut out = Vec::new();
        write_frame(&mut out, &request).unwrap();
        assert_eq!(out, *frame);
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut frame = u32::MAX.to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let result: io::Result<Option<Request>> = read_frame(&mut frame.as_slice());
        assert!(result.is_err());
    }
}
