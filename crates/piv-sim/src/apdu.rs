//! Command and response APDUs (ISO/IEC 7816-4 section 5), command chaining
//! (section 5.1.1, CLA bit 0x10) and GET RESPONSE for long answers (section 7.6.1).
//!
//! A YubiKey accepts short and extended APDUs, answers a short command with at
//! most 256 bytes and says `61xx` when more is waiting for GET RESPONSE.

use std::fmt;

/// The largest response body one vpcd frame can carry: the frame length is a
/// 16-bit number and the two status bytes travel in the same frame.
const MAX_FRAME_BODY: usize = 0xFFFF - 2;
/// Largest command a chain may build up; a YubiKey object holds about 3 KB, an
/// imported RSA 2048 key less than 1 KB.
const MAX_CHAIN: usize = 16 * 1024;

/// A status word (SW1 SW2) with the values a YubiKey's PIV applet returns.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusWord(pub u16);

impl StatusWord {
    /// 9000: success.
    pub const OK: Self = Self(0x9000);
    /// 6581: memory failure (a key could not be generated).
    pub const MEMORY_FAILURE: Self = Self(0x6581);
    /// 6700: wrong length.
    pub const WRONG_LENGTH: Self = Self(0x6700);
    /// 6883: the last command of a chain was expected.
    pub const LAST_COMMAND_EXPECTED: Self = Self(0x6883);
    /// 6982: security status not satisfied (PIN or management key missing).
    pub const SECURITY_STATUS: Self = Self(0x6982);
    /// 6983: authentication method blocked (PIN or PUK retries exhausted).
    pub const AUTH_BLOCKED: Self = Self(0x6983);
    /// 6985: conditions of use not satisfied (no touch, RESET while PIN not blocked).
    pub const CONDITIONS: Self = Self(0x6985);
    /// 6A80: incorrect data field.
    pub const INCORRECT_DATA: Self = Self(0x6A80);
    /// 6A82: file or application not found.
    pub const NOT_FOUND: Self = Self(0x6A82);
    /// 6A84: not enough memory (object too large).
    pub const NO_SPACE: Self = Self(0x6A84);
    /// 6A86: incorrect P1 or P2.
    pub const INCORRECT_P1P2: Self = Self(0x6A86);
    /// 6A88: referenced data not found.
    pub const REFERENCE_NOT_FOUND: Self = Self(0x6A88);
    /// 6D00: instruction not supported.
    pub const INS_NOT_SUPPORTED: Self = Self(0x6D00);
    /// 6E00: class not supported.
    pub const CLA_NOT_SUPPORTED: Self = Self(0x6E00);
    /// 6F00: no precise diagnosis (an internal error).
    pub const UNKNOWN: Self = Self(0x6F00);

    /// 63Cx: wrong PIN or PUK, `tries` attempts left (capped at 15).
    pub fn verify_failed(tries: u8) -> Self {
        Self(0x63C0 | u16::from(tries.min(15)))
    }

    /// 61xx: `remaining` more bytes wait for GET RESPONSE (00 means 256 or more).
    pub fn bytes_remaining(remaining: usize) -> Self {
        Self(
            0x6100
                | if remaining > 0xFF {
                    0
                } else {
                    remaining as u16
                },
        )
    }

    /// The two bytes as sent on the wire.
    pub fn to_bytes(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }
}

impl fmt::Debug for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X}", self.0)
    }
}

impl fmt::Display for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X}", self.0)
    }
}

/// A parsed command APDU. Its Debug output omits the data, which may hold a PIN or a key.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    /// Class byte.
    pub cla: u8,
    /// Instruction byte.
    pub ins: u8,
    /// Parameter 1.
    pub p1: u8,
    /// Parameter 2.
    pub p2: u8,
    /// Command data (empty when Lc is absent).
    pub data: Vec<u8>,
    /// Ne, the maximum number of response bytes, when Le is present.
    pub ne: Option<usize>,
    /// Whether the APDU used the extended length encoding.
    pub extended: bool,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Command {{ cla: {:02X}, ins: {:02X}, p1: {:02X}, p2: {:02X}, lc: {}, ne: {:?} }}",
            self.cla,
            self.ins,
            self.p1,
            self.p2,
            self.data.len(),
            self.ne
        )
    }
}

impl Command {
    /// Parses the four ISO 7816-3 cases, short and extended. A malformed length gives 6700.
    pub fn parse(raw: &[u8]) -> Result<Self, StatusWord> {
        let [cla, ins, p1, p2, body @ ..] = raw else {
            return Err(StatusWord::WRONG_LENGTH);
        };
        let (data, ne, extended) = match body {
            // Case 1.
            [] => (&[][..], None, false),
            // Case 2 short.
            [le] => (&[][..], Some(short_ne(*le)), false),
            // Extended cases start with a zero byte.
            [0, rest @ ..] if rest.len() >= 2 => {
                let first = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let rest = &rest[2..];
                if rest.is_empty() {
                    // Case 2 extended.
                    (&[][..], Some(extended_ne(first)), true)
                } else if first == 0 {
                    return Err(StatusWord::WRONG_LENGTH);
                } else if rest.len() == first {
                    (rest, None, true)
                } else if rest.len() == first + 2 {
                    let le = usize::from(u16::from_be_bytes([rest[first], rest[first + 1]]));
                    (&rest[..first], Some(extended_ne(le)), true)
                } else {
                    return Err(StatusWord::WRONG_LENGTH);
                }
            }
            [lc, rest @ ..] => {
                let lc = usize::from(*lc);
                if lc == 0 {
                    return Err(StatusWord::WRONG_LENGTH);
                } else if rest.len() == lc {
                    (rest, None, false)
                } else if rest.len() == lc + 1 {
                    (&rest[..lc], Some(short_ne(rest[lc])), false)
                } else {
                    return Err(StatusWord::WRONG_LENGTH);
                }
            }
        };
        Ok(Self {
            cla: *cla,
            ins: *ins,
            p1: *p1,
            p2: *p2,
            data: data.to_vec(),
            ne,
            extended,
        })
    }

    /// Whether the chaining bit says more of this command follows.
    pub fn is_chained(&self) -> bool {
        self.cla & 0x10 != 0
    }

    /// The most response bytes to send at once: Ne, or 256 (short) or all (extended)
    /// when Le is absent, as a YubiKey answers commands that omit Le.
    pub fn max_response(&self) -> usize {
        let ne = match (self.ne, self.extended) {
            (Some(ne), _) => ne,
            (None, false) => 256,
            (None, true) => MAX_FRAME_BODY,
        };
        ne.min(MAX_FRAME_BODY)
    }
}

fn short_ne(le: u8) -> usize {
    if le == 0 {
        256
    } else {
        usize::from(le)
    }
}

fn extended_ne(le: usize) -> usize {
    if le == 0 {
        65536
    } else {
        le
    }
}

/// A response APDU: data and status word.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    /// Response data.
    pub data: Vec<u8>,
    /// Status word.
    pub sw: StatusWord,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Response {{ len: {}, sw: {} }}",
            self.data.len(),
            self.sw
        )
    }
}

impl Response {
    /// 9000 with data.
    pub fn ok(data: Vec<u8>) -> Self {
        Self {
            data,
            sw: StatusWord::OK,
        }
    }

    /// 9000 without data.
    pub fn ok_empty() -> Self {
        Self::ok(Vec::new())
    }

    /// The bytes sent back to the reader.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 2);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.sw.to_bytes());
        out
    }
}

impl From<StatusWord> for Response {
    fn from(sw: StatusWord) -> Self {
        Self {
            data: Vec::new(),
            sw,
        }
    }
}

/// The APDU layer between the reader and an applet: it assembles chained
/// commands and hands out long responses piece by piece.
#[derive(Debug, Default)]
pub(crate) struct Exchange {
    chain: Option<Chain>,
    pending: Vec<u8>,
}

#[derive(Debug)]
struct Chain {
    header: [u8; 3],
    data: Vec<u8>,
}

const INS_GET_RESPONSE: u8 = 0xC0;

impl Exchange {
    /// Forgets any chain or pending response (card reset, power off).
    pub(crate) fn reset(&mut self) {
        self.chain = None;
        self.pending.clear();
    }

    /// Handles one raw command and returns the raw response.
    pub(crate) fn handle(
        &mut self,
        raw: &[u8],
        applet: impl FnOnce(&Command) -> Response,
    ) -> Response {
        let mut cmd = match Command::parse(raw) {
            Ok(cmd) => cmd,
            Err(sw) => {
                self.reset();
                return sw.into();
            }
        };
        if cmd.cla & !0x10 != 0 {
            self.reset();
            return StatusWord::CLA_NOT_SUPPORTED.into();
        }
        if cmd.ins == INS_GET_RESPONSE && !cmd.is_chained() {
            return self.get_response(&cmd);
        }
        self.pending.clear();

        let header = [cmd.ins, cmd.p1, cmd.p2];
        if cmd.is_chained() {
            let chain = match self.chain.take() {
                Some(chain) if chain.header == header => chain,
                _ => Chain {
                    header,
                    data: Vec::new(),
                },
            };
            let mut chain = chain;
            if chain.data.len() + cmd.data.len() > MAX_CHAIN {
                return StatusWord::WRONG_LENGTH.into();
            }
            chain.data.extend_from_slice(&cmd.data);
            self.chain = Some(chain);
            return Response::ok_empty();
        }
        match self.chain.take() {
            Some(chain) if chain.header == header => {
                let mut data = chain.data;
                data.extend_from_slice(&cmd.data);
                cmd.data = data;
            }
            // A different command in the middle of a chain: the chain is
            // abandoned, as a YubiKey does.
            Some(_) => return StatusWord::LAST_COMMAND_EXPECTED.into(),
            None => {}
        }

        let max = cmd.max_response();
        let mut response = applet(&cmd);
        if response.data.len() > max {
            self.pending = response.data.split_off(max);
            response.sw = StatusWord::bytes_remaining(self.pending.len());
        }
        response
    }

    fn get_response(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0 || cmd.p2 != 0 {
            return StatusWord::INCORRECT_P1P2.into();
        }
        if self.pending.is_empty() {
            return StatusWord::CONDITIONS.into();
        }
        let take = cmd.max_response().min(self.pending.len());
        let rest = self.pending.split_off(take);
        let data = std::mem::replace(&mut self.pending, rest);
        let sw = if self.pending.is_empty() {
            StatusWord::OK
        } else {
            StatusWord::bytes_remaining(self.pending.len())
        };
        Response { data, sw }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_cases() {
        let c = Command::parse(&[0, 0xFD, 0, 0]).unwrap_or_else(|sw| panic!("{sw}"));
        assert_eq!((c.data.len(), c.ne), (0, None));
        let c = Command::parse(&[0, 0xFD, 0, 0, 0]).unwrap_or_else(|sw| panic!("{sw}"));
        assert_eq!(c.ne, Some(256));
        let c = Command::parse(&[0, 0x20, 0, 0x80, 2, 1, 2]).unwrap_or_else(|sw| panic!("{sw}"));
        assert_eq!((c.data, c.ne), (vec![1, 2], None));
        let c = Command::parse(&[0, 0xCB, 0x3F, 0xFF, 1, 7, 0]).unwrap_or_else(|sw| panic!("{sw}"));
        assert_eq!((c.data, c.ne), (vec![7], Some(256)));
        let c = Command::parse(&[0, 0xCB, 0x3F, 0xFF, 0, 0, 1, 7, 0, 0])
            .unwrap_or_else(|sw| panic!("{sw}"));
        assert_eq!((c.data, c.ne, c.extended), (vec![7], Some(65536), true));
        assert_eq!(
            Command::parse(&[0, 0x20, 0, 0x80, 3, 1]),
            Err(StatusWord::WRONG_LENGTH)
        );
        assert_eq!(Command::parse(&[0, 0x20]), Err(StatusWord::WRONG_LENGTH));
    }

    #[test]
    fn chains_commands_and_splits_long_responses() {
        let mut ex = Exchange::default();
        let r = ex.handle(&[0x10, 0xDB, 0x3F, 0xFF, 2, 1, 2], |_| {
            panic!("a chained part must not reach the applet")
        });
        assert_eq!(r.sw, StatusWord::OK);
        let r = ex.handle(&[0x00, 0xDB, 0x3F, 0xFF, 1, 3], |cmd| {
            assert_eq!(cmd.data, vec![1, 2, 3]);
            Response::ok(vec![0x55; 600])
        });
        assert_eq!((r.data.len(), r.sw), (256, StatusWord(0x6100)));
        let r = ex.handle(&[0, 0xC0, 0, 0, 0], |_| panic!("served by the layer"));
        assert_eq!((r.data.len(), r.sw), (256, StatusWord(0x6158)));
        let r = ex.handle(&[0, 0xC0, 0, 0, 0], |_| panic!("served by the layer"));
        assert_eq!((r.data.len(), r.sw), (88, StatusWord::OK));
        let r = ex.handle(&[0, 0xC0, 0, 0, 0], |_| panic!("served by the layer"));
        assert_eq!(r.sw, StatusWord::CONDITIONS);
    }

    #[test]
    fn rejects_unknown_class() {
        let mut ex = Exchange::default();
        let r = ex.handle(&[0x80, 0xFD, 0, 0], |_| panic!("must not reach the applet"));
        assert_eq!(r.sw, StatusWord::CLA_NOT_SUPPORTED);
    }
}
