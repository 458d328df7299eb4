//! Framing of agent messages (draft-miller-ssh-agent, section 3: `uint32 length`
//! followed by that many bytes).
//!
//! Frames are bounded at 256 KiB as OpenSSH's agent bounds them (AGENT_MAX_LEN):
//! a longer length prefix closes the connection before a byte of the body is
//! read or allocated.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message body accepted, as OpenSSH's AGENT_MAX_LEN.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is larger than [`MAX_FRAME_LEN`]; usually a client
    /// speaking another protocol, or garbage on the socket.
    #[error("message of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLong(u32),
    /// The client closed the connection in the middle of a frame.
    #[error("connection closed inside a message")]
    Truncated,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one frame body into `body`. Returns `Ok(false)` when the peer closed the
/// connection cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    body: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
        match reader.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => return Err(FrameError::Truncated),
            n => filled += n,
        }
    }
    let len = u32::from_be_bytes(prefix);
    let len_usize = usize::try_from(len).map_err(|_| FrameError::TooLong(len))?;
    if len_usize > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(len));
    }
    body.clear();
    body.resize(len_usize, 0);
    match reader.read_exact(body).await {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(err) => Err(err.into()),
    }
}

/// Writes `body` as one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "response too long"))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    writer.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_a_frame_and_a_clean_close() {
        let mut input: &[u8] = &[0, 0, 0, 1, 11];
        let mut body = Vec::new();
        assert!(read_frame(&mut input, &mut body).await.unwrap());
        assert_eq!(body, [11]);
        assert!(!read_frame(&mut input, &mut body).await.unwrap());
    }

    #[tokio::test]
    async fn refuses_a_huge_length_without_allocating() {
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let mut body = Vec::new();
        let err = read_frame(&mut input, &mut body).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLong(0xffff_ffff)));
        assert_eq!(body.capacity(), 0);
    }

    #[tokio::test]
    async fn accepts_exactly_the_limit_and_refuses_one_more() {
        let mut ok = (MAX_FRAME_LEN as u32).to_be_bytes().to_vec();
        ok.resize(4 + MAX_FRAME_LEN, 0);
        let mut body = Vec::new();
        assert!(read_frame(&mut &ok[..], &mut body).await.unwrap());
        let over = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &over[..], &mut body).await,
            Err(FrameError::TooLong(_))
        ));
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_error() {
        let mut input: &[u8] = &[0, 0, 0, 5, 1, 2];
        let mut body = Vec::new();
        assert!(matches!(
            read_frame(&mut input, &mut body).await,
            Err(FrameError::Truncated)
        ));
        let mut half_prefix: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame(&mut half_prefix, &mut body).await,
            Err(FrameError::Truncated)
        ));
    }
}
