//! A raw agent-protocol client, for sending what real clients never send,
//! and the few messages tests build by hand.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use signature::Signer;
use ssh_encoding::Encode;
use token_agent_core::push_string;

use crate::agent::keygen;

/// SSH_AGENT_FAILURE.
pub const FAILURE: u8 = 5;
/// SSH_AGENT_SUCCESS.
pub const SUCCESS: u8 = 6;
/// SSH_AGENT_IDENTITIES_ANSWER.
pub const IDENTITIES_ANSWER: u8 = 12;
/// SSH_AGENT_SIGN_RESPONSE.
pub const SIGN_RESPONSE: u8 = 14;
/// SSH_AGENTC_EXTENSION.
pub const EXTENSION: u8 = 27;
/// SSH_AGENT_EXTENSION_FAILURE.
pub const EXTENSION_FAILURE: u8 = 28;

/// A session-bind@openssh.com request, signed by a fresh ed25519 host key
/// made in `dir`, as ssh sends it on a connection it forwards (`forwarded`)
/// or uses itself. After one, the agent treats the connection as remote.
pub fn session_bind(dir: &Path, forwarded: bool) -> anyhow::Result<Vec<u8>> {
    bind_signing(dir, forwarded, &[0x5a; 32])
}

/// A session-bind@openssh.com request whose host signature is over another
/// session id, so it does not verify: ssh goes on after such a failure, and
/// OpenSSH's agent treats the connection as remote all the same.
pub fn unverifiable_session_bind(dir: &Path, forwarded: bool) -> anyhow::Result<Vec<u8>> {
    bind_signing(dir, forwarded, &[0xa5; 32])
}

/// A session bind for the session id `[0x5a; 32]`, with the host key's
/// signature over `signed`.
fn bind_signing(dir: &Path, forwarded: bool, signed: &[u8]) -> anyhow::Result<Vec<u8>> {
    let path = dir.join("host_key");
    if !path.exists() {
        keygen(&path, "ed25519", "host")?;
    }
    let host = ssh_key::PrivateKey::read_openssh_file(&path)?;
    let session_id = [0x5au8; 32];
    let signature: ssh_key::Signature = host.try_sign(signed)?;
    let mut key_blob = Vec::new();
    host.public_key().key_data().encode(&mut key_blob)?;
    let mut signature_blob = Vec::new();
    signature.encode(&mut signature_blob)?;
    let mut body = vec![EXTENSION];
    push_string(&mut body, b"session-bind@openssh.com");
    push_string(&mut body, &key_blob);
    push_string(&mut body, &session_id);
    push_string(&mut body, &signature_blob);
    body.push(u8::from(forwarded));
    Ok(body)
}

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
