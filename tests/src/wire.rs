//! A raw agent-protocol client, for sending what real clients never send.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// SSH_AGENT_FAILURE.
pub const FAILURE: u8 = 5;
/// SSH_AGENT_SUCCESS.
pub const SUCCESS: u8 = 6;
/// SSH_AGENT_IDENTITIES_ANSWER.
pub const IDENTITIES_ANSWER: u8 = 12;
/// SSH_AGENT_SIGN_RESPONSE.
pub const SIGN_RESPONSE: u8 = 14;

/// A connection speaking raw frames.
#[derive(Debug)]
pub struct RawClient {
    stream: UnixStream,
}

impl RawClient {
    /// Connects to `socket`, with a 10 s read timeout.
    pub fn connect(socket: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { stream })
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one framed message.
    pub fn send(&mut self, body: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.stream.write_all(&frame)
    }

    /// Reads one framed reply; `None` when the agent closed the connection.
    pub fn receive(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut prefix = [0u8; 4];
        match self.stream.read_exact(&mut prefix) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(err) => return Err(err),
        }
        let len = u32::from_be_bytes(prefix) as usize;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok(Some(body))
    }

    /// Sends `body` and returns the reply.
    pub fn request(&mut self, body: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        self.send(body)?;
        self.receive()
    }
}
