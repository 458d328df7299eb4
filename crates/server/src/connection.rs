//! A client's socket as a session reads and answers it: whole frames (see
//! [`crate::proto::frame`]) with as few system calls and wakeups as the
//! kernel allows.
//!
//! Two things make a plain `tokio::net::UnixStream` cost more per request
//! than the work itself on a busy agent, and this type avoids both:
//!
//! - tokio registers every stream for readability *and* writability,
//!   edge-triggered. On a Unix socket each read by the peer frees send
//!   space and raises a writability edge, so every client that reads its
//!   answer wakes the agent for nothing. The socket is registered for
//!   readability only; the rare answer that does not fit the send buffer
//!   waits for writability on a duplicate of the descriptor, registered for
//!   that alone while it waits.
//! - Reading the 4-byte length and then the body exactly leaves the socket
//!   marked readable, so the next request starts with a read that fails
//!   with EAGAIN. Reads here fill a buffer (one read takes a whole request,
//!   or several pipelined ones), and a read that comes back short clears
//!   the readiness, as tokio's own streams do: the next data raises a new
//!   edge.
//!
//! Requests can carry private keys and passwords, so the buffer is wiped as
//! each frame is taken out of it, and when the connection ends.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use zeroize::{Zeroize, Zeroizing};

use crate::proto::frame::{FrameError, MAX_FRAME_LEN};

/// How much one read asks for when no larger frame is pending: a sign
/// request with its session data, or several small requests.
const READ_CHUNK: usize = 4096;

/// The most input buffer an idle connection keeps after a large frame (a
/// key being added).
const KEPT_CAPACITY: usize = 4 * READ_CHUNK;

/// A client connection, registered with the runtime for readability only.
#[derive(Debug)]
pub(crate) struct Connection {
    socket: AsyncFd<UnixStream>,
    /// Where reads land: zeroed once when allocated, so a read needs no
    /// clearing first. The first `filled` bytes are read and not yet taken
    /// as a frame.
    input: Zeroizing<Vec<u8>>,
    filled: usize,
}

impl Connection {
    /// Takes over an accepted stream.
    pub(crate) fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        // into_std deregisters it and leaves it non-blocking.
        let socket = stream.into_std()?;
        Ok(Self {
            socket: register(socket, Interest::READABLE)?,
            input: Zeroizing::new(Vec::new()),
            filled: 0,
        })
    }

    /// Reads the next frame's body into `body`. Returns `Ok(false)` when the
    /// peer closed the connection cleanly between frames; a length over
    /// [`MAX_FRAME_LEN`] is refused before its body is read.
    pub(crate) async fn read_frame(&mut self, body: &mut Vec<u8>) -> Result<bool, FrameError> {
        loop {
            let pending = &self.input[..self.filled];
            let wanted = match pending.first_chunk::<4>() {
                Some(prefix) => {
                    let len = u32::from_be_bytes(*prefix);
                    let len_usize = usize::try_from(len).map_err(|_| FrameError::TooLong(len))?;
                    if len_usize > MAX_FRAME_LEN {
                        return Err(FrameError::TooLong(len));
                    }
                    if pending.len() >= 4 + len_usize {
                        body.clear();
                        body.extend_from_slice(&pending[4..4 + len_usize]);
                        self.consume(4 + len_usize);
                        return Ok(true);
                    }
                    4 + len_usize - pending.len()
                }
                None => 4 - pending.len(),
            };
            if self.fill(wanted.max(READ_CHUNK)).await? == 0 {
                return if self.filled == 0 {
                    Ok(false)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Writes `body` as one frame.
    pub(crate) async fn write_frame(&self, body: &[u8]) -> io::Result<()> {
        let len = u32::try_from(body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "response too long"))?;
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        let mut written = 0;
        while written < out.len() {
            match self.socket.get_ref().write(&out[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Reads at least `room` more bytes' worth into the input (what the
    /// socket holds, up to the buffer's end); the count (0: end of stream).
    async fn fill(&mut self, room: usize) -> io::Result<usize> {
        if self.input.len() < self.filled + room {
            // A new buffer rather than a grown one, which would move the
            // bytes and leave a copy behind in the old allocation; the old
            // one is wiped as it is dropped.
            let mut grown = Zeroizing::new(vec![0u8; self.filled + room]);
            grown[..self.filled].copy_from_slice(&self.input[..self.filled]);
            self.input = grown;
        }
        let free = self.input.len() - self.filled;
        loop {
            let mut guard = self.socket.readable().await?;
            match self.socket.get_ref().read(&mut self.input[self.filled..]) {
                Ok(n) => {
                    if n < free {
                        // The socket is drained: wait for the next edge
                        // rather than read again for EAGAIN.
                        guard.clear_ready();
                    }
                    self.filled += n;
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Takes the first `n` bytes out of the input, wiping what they leave.
    fn consume(&mut self, n: usize) {
        let rest = self.filled - n;
        self.input.copy_within(n..self.filled, 0);
        self.input[rest..self.filled].zeroize();
        self.filled = rest;
        if rest == 0 && self.input.len() > KEPT_CAPACITY {
            // Dropping the old buffer wipes all of it.
            self.input = Zeroizing::new(Vec::new());
        }
    }

    /// Waits until the socket takes more of an answer. Rare (an answer
    /// larger than the socket's buffer, to a client that reads slowly), so
    /// a duplicate descriptor is registered for writability only for as
    /// long as it takes.
    async fn writable(&self) -> io::Result<()> {
        let duplicate = register(self.socket.get_ref().try_clone()?, Interest::WRITABLE)?;
        let mut guard = duplicate.writable().await?;
        guard.clear_ready();
        Ok(())
    }
}

/// Registers `socket` with the runtime for `interest` alone.
///
/// tokio 1.54 deprecated the safe constructor for types whose descriptor
/// could be closed or swapped while registered (tokio-rs/tokio#8587), in
/// favour of an `unsafe` one this crate cannot call. A `UnixStream` owns its
/// descriptor, which stays open and the same for as long as the `AsyncFd`
/// holds it (nothing here swaps it through `get_mut`), so the safe one is
/// sound for it.
#[allow(deprecated)]
fn register(socket: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(socket, interest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = tokio::net::UnixStream::from_std(ours).unwrap();
        (Connection::new(ours).unwrap(), theirs)
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn reads_pipelined_frames_and_the_clean_end() {
        let (mut connection, mut client) = pair();
        let mut both = frame(b"first");
        both.extend(frame(&[7u8; 10_000]));
        client.write_all(&both).unwrap();
        drop(client);
        let mut body = Vec::new();
        assert!(connection.read_frame(&mut body).await.unwrap());
        assert_eq!(body, b"first");
        assert!(connection.read_frame(&mut body).await.unwrap());
        assert_eq!(body, [7u8; 10_000]);
        assert!(!connection.read_frame(&mut body).await.unwrap());
    }

    #[tokio::test]
    async fn reads_a_frame_that_arrives_a_byte_at_a_time() {
        let (mut connection, mut client) = pair();
        let writer = std::thread::spawn(move || {
            for byte in frame(b"slowly") {
                client.write_all(&[byte]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let mut body = Vec::new();
        assert!(connection.read_frame(&mut body).await.unwrap());
        assert_eq!(body, b"slowly");
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_its_body() {
        let (mut connection, mut client) = pair();
        client
            .write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
            .unwrap();
        let mut body = Vec::new();
        assert!(matches!(
            connection.read_frame(&mut body).await,
            Err(FrameError::TooLong(_))
        ));
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_truncated() {
        let (mut connection, mut client) = pair();
        client.write_all(&frame(b"whole")[..6]).unwrap();
        drop(client);
        let mut body = Vec::new();
        assert!(matches!(
            connection.read_frame(&mut body).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_socket_buffer_waits_for_the_reader() {
        let (connection, client) = pair();
        // Far beyond a Unix socket's default buffer (about 200 KiB).
        let answer = vec![0x5a_u8; 4 * 1024 * 1024];
        let reader = std::thread::spawn(move || {
            let mut client = client;
            std::thread::sleep(std::time::Duration::from_millis(50));
            let mut prefix = [0u8; 4];
            client.read_exact(&mut prefix).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
            client.read_exact(&mut body).unwrap();
            body
        });
        connection.write_frame(&answer).await.unwrap();
        assert_eq!(reader.join().unwrap(), answer);
    }

    #[tokio::test]
    async fn taking_a_frame_wipes_it_from_the_buffer() {
        let (mut connection, mut client) = pair();
        let mut both = frame(b"secret-password");
        both.extend(frame(b"next"));
        client.write_all(&both).unwrap();
        let mut body = Vec::new();
        assert!(connection.read_frame(&mut body).await.unwrap());
        assert_eq!(body, b"secret-password");
        // What is left is the next frame, and nothing of the first.
        let next = frame(b"next");
        assert_eq!(&connection.input[..connection.filled], &next[..]);
        assert!(connection.input[connection.filled..]
            .iter()
            .all(|&b| b == 0));
    }

    #[tokio::test]
    async fn a_large_frame_does_not_keep_its_buffer() {
        let (mut connection, mut client) = pair();
        client.write_all(&frame(&[1u8; 200_000])).unwrap();
        let mut body = Vec::new();
        assert!(connection.read_frame(&mut body).await.unwrap());
        assert!(connection.input.len() <= KEPT_CAPACITY);
    }
}
