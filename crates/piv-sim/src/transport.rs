//! The vpcd wire protocol of vsmartcard (`virtualsmartcard/src/vpcd/vpcd.c`).
//!
//! The virtual card is a TCP client of the vpcd driver loaded in pcscd. Every
//! message in both directions is a 2-byte big-endian length followed by that many
//! bytes. A one-byte message from vpcd is a control message: 0x00 power off,
//! 0x01 power on, 0x02 reset, 0x04 "send the ATR". Only the ATR request and
//! APDUs get an answer; anything longer than one byte is a command APDU and is
//! answered with the response APDU.

use std::io::{self, Read, Write};

/// The ATR of a YubiKey 5 NFC: OpenSC and the yubikey crate accept it as a YubiKey.
pub const YUBIKEY5_ATR: [u8; 23] = [
    0x3B, 0xFD, 0x13, 0x00, 0x00, 0x81, 0x31, 0xFE, 0x15, 0x80, 0x73, 0xC0, 0x21, 0xC0, 0x57, 0x59,
    0x75, 0x62, 0x69, 0x4B, 0x65, 0x79, 0x40,
];

/// One message from vpcd to the card.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    /// 0x00: the reader powers the card off.
    PowerOff,
    /// 0x01: the reader powers the card on.
    PowerOn,
    /// 0x02: warm reset.
    Reset,
    /// 0x04: the reader asks for the ATR (also its presence probe).
    Atr,
    /// A control byte this protocol version does not define; it gets no answer.
    UnknownControl(u8),
    /// A command APDU (or a malformed frame of 0, 2 or 3 bytes).
    Apdu(Vec<u8>),
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PowerOff => f.write_str("PowerOff"),
            Self::PowerOn => f.write_str("PowerOn"),
            Self::Reset => f.write_str("Reset"),
            Self::Atr => f.write_str("Atr"),
            Self::UnknownControl(b) => write!(f, "UnknownControl({b:#04x})"),
            // The data may hold a PIN: show the length only.
            Self::Apdu(apdu) => write!(f, "Apdu({} bytes)", apdu.len()),
        }
    }
}

/// Reads one message; `Ok(None)` when vpcd closed the connection between messages.
pub fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(match body.as_slice() {
        [0x00] => Request::PowerOff,
        [0x01] => Request::PowerOn,
        [0x02] => Request::Reset,
        [0x04] => Request::Atr,
        [b] => Request::UnknownControl(*b),
        _ => Request::Apdu(body),
    }))
}

/// Writes one length-prefixed message.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "vpcd frame over 65535 bytes"))?;
    let mut frame = Vec::with_capacity(payload.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_control_bytes_and_apdus() -> io::Result<()> {
        let wire = [0, 1, 0x04, 0, 1, 0x01, 0, 4, 0, 0xFD, 0, 0, 0, 1, 0x09];
        let mut r = &wire[..];
        assert_eq!(read_request(&mut r)?, Some(Request::Atr));
        assert_eq!(read_request(&mut r)?, Some(Request::PowerOn));
        assert_eq!(
            read_request(&mut r)?,
            Some(Request::Apdu(vec![0, 0xFD, 0, 0]))
        );
        assert_eq!(read_request(&mut r)?, Some(Request::UnknownControl(9)));
        assert_eq!(read_request(&mut r)?, None);
        Ok(())
    }

    #[test]
    fn frames_a_response() -> io::Result<()> {
        let mut out = Vec::new();
        write_frame(&mut out, &[0x90, 0x00])?;
        assert_eq!(out, vec![0, 2, 0x90, 0]);
        Ok(())
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut r = &[0u8, 5, 1, 2][..];
        assert!(read_request(&mut r).is_err());
    }
}
