//! The D-Bus wire format (the specification's "Message Protocol"): message
//! headers both ways, the marshalling of the argument types token-agent sends,
//! and enough of the type system to read past any value a bus may deliver.
//!
//! Messages go out little-endian; messages in may be either endianness, since
//! a bus relays a peer's message as that peer wrote it.

use crate::{Error, Result};

/// The longest message the specification allows (128 MiB).
pub(crate) const MAX_MESSAGE: usize = 1 << 27;
/// The longest array the specification allows (64 MiB).
const MAX_ARRAY: usize = 1 << 26;
/// Containers nest at most 32 arrays and 32 structures deep.
const MAX_DEPTH: usize = 64;
/// The fixed part of every header: endianness, type, flags, version, body
/// length, serial, and the length of the header field array.
pub(crate) const FIXED_HEADER: usize = 16;

/// Flag: the sender does not want a reply.
pub(crate) const NO_REPLY_EXPECTED: u8 = 0x1;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A method call.
    MethodCall,
    /// A method's reply.
    MethodReturn,
    /// A method's error reply.
    Error,
    /// A signal.
    Signal,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::MethodCall => 1,
            Kind::MethodReturn => 2,
            Kind::Error => 3,
            Kind::Signal => 4,
        }
    }
}

/// Header field codes.
mod field {
    pub(super) const PATH: u8 = 1;
    pub(super) const INTERFACE: u8 = 2;
    pub(super) const MEMBER: u8 = 3;
    pub(super) const ERROR_NAME: u8 = 4;
    pub(super) const REPLY_SERIAL: u8 = 5;
    pub(super) const DESTINATION: u8 = 6;
    pub(super) const SENDER: u8 = 7;
    pub(super) const SIGNATURE: u8 = 8;
    pub(super) const UNIX_FDS: u8 = 9;
}

/// Marshals values, aligning each to its natural boundary. The body starts at
/// an 8-byte boundary of the message, so alignment within the body is
/// alignment within the message.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn align(&mut self, to: usize) {
        let padded = self.bytes.len().next_multiple_of(to);
        self.bytes.resize(padded, 0);
    }

    /// A `y`.
    pub fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    /// A `b`.
    pub fn bool(&mut self, value: bool) {
        self.u32(u32::from(value));
    }

    /// An `i`.
    pub fn i32(&mut self, value: i32) {
        self.align(4);
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// A `u`.
    pub fn u32(&mut self, value: u32) {
        self.align(4);
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// An `s` (or the bytes of an `o`). D-Bus strings may not hold NUL, and
    /// a bus disconnects a client that sends one, so each becomes U+FFFD
    /// (text from a key comment or a client's name can carry anything).
    pub fn str(&mut self, value: &str) {
        let value = if value.contains('\0') {
            std::borrow::Cow::Owned(value.replace('\0', "\u{fffd}"))
        } else {
            std::borrow::Cow::Borrowed(value)
        };
        self.u32(u32::try_from(value.len()).unwrap_or(u32::MAX));
        self.bytes.extend_from_slice(value.as_bytes());
        self.bytes.push(0);
    }

    /// A `g`: signatures are at most 255 bytes of type codes.
    pub fn signature(&mut self, value: &str) {
        self.u8(u8::try_from(value.len()).unwrap_or(u8::MAX));
        self.bytes.extend_from_slice(value.as_bytes());
        self.bytes.push(0);
    }

    /// An array whose elements have signature `element` (which sets their
    /// alignment), written by `elements`.
    pub fn array(&mut self, element: &str, elements: impl FnOnce(&mut Writer)) {
        self.u32(0);
        let length_at = self.bytes.len() - 4;
        self.align(alignment(
            element.as_bytes().first().copied().unwrap_or(b'y'),
        ));
        let start = self.bytes.len();
        elements(self);
        let length = u32::try_from(self.bytes.len() - start).unwrap_or(u32::MAX);
        self.bytes[length_at..length_at + 4].copy_from_slice(&length.to_le_bytes());
    }

    /// A structure or dictionary entry, its members written by `members`.
    pub fn structure(&mut self, members: impl FnOnce(&mut Writer)) {
        self.align(8);
        members(self);
    }

    /// A `v` holding one value of signature `signature`, written by `value`.
    pub fn variant(&mut self, signature: &str, value: impl FnOnce(&mut Writer)) {
        self.signature(signature);
        value(self);
    }
}

/// A message body: its arguments and their signature.
#[derive(Debug, Default, Clone)]
pub struct Body {
    signature: String,
    writer: Writer,
}

impl Body {
    /// An empty body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a `u`.
    pub fn u32(mut self, value: u32) -> Self {
        self.signature.push('u');
        self.writer.u32(value);
        self
    }

    /// Appends an `i`.
    pub fn i32(mut self, value: i32) -> Self {
        self.signature.push('i');
        self.writer.i32(value);
        self
    }

    /// Appends an `s`.
    pub fn str(mut self, value: &str) -> Self {
        self.signature.push('s');
        self.writer.str(value);
        self
    }

    /// Appends an array of `element`, written by `elements`.
    pub fn array(mut self, element: &str, elements: impl FnOnce(&mut Writer)) -> Self {
        self.signature.push('a');
        self.signature.push_str(element);
        self.writer.array(element, elements);
        self
    }

    pub(crate) fn signature(&self) -> &str {
        &self.signature
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.writer.bytes
    }
}

/// The header of a message this client sends.
#[derive(Debug, Default)]
pub(crate) struct Outgoing<'a> {
    pub(crate) path: Option<&'a str>,
    pub(crate) interface: Option<&'a str>,
    pub(crate) member: Option<&'a str>,
    pub(crate) error_name: Option<&'a str>,
    pub(crate) reply_serial: Option<u32>,
    pub(crate) destination: Option<&'a str>,
}

/// Writes a whole message.
pub(crate) fn encode(
    kind: Kind,
    flags: u8,
    serial: u32,
    header: &Outgoing<'_>,
    body: &Body,
) -> Vec<u8> {
    let mut message = Writer::default();
    message.u8(b'l');
    message.u8(kind.code());
    message.u8(flags);
    message.u8(1);
    message.u32(u32::try_from(body.bytes().len()).unwrap_or(u32::MAX));
    message.u32(serial);
    message.array("(yv)", |fields| {
        let strings = [
            (field::PATH, "o", header.path),
            (field::INTERFACE, "s", header.interface),
            (field::MEMBER, "s", header.member),
            (field::ERROR_NAME, "s", header.error_name),
            (field::DESTINATION, "s", header.destination),
        ];
        for (code, signature, value) in strings {
            if let Some(value) = value {
                fields.structure(|f| {
                    f.u8(code);
                    f.variant(signature, |v| v.str(value));
                });
            }
        }
        if let Some(serial) = header.reply_serial {
            fields.structure(|f| {
                f.u8(field::REPLY_SERIAL);
                f.variant("u", |v| v.u32(serial));
            });
        }
        if !body.signature().is_empty() {
            fields.structure(|f| {
                f.u8(field::SIGNATURE);
                f.variant("g", |v| v.signature(body.signature()));
            });
        }
    });
    message.align(8);
    message.bytes.extend_from_slice(body.bytes());
    message.bytes
}

/// The sizes the fixed part of a header announces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// The header field array, without the padding after it.
    pub(crate) fields: usize,
    /// The padding between the fields and the body.
    pub(crate) padding: usize,
    pub(crate) body: usize,
}

/// Reads the sizes from the first [`FIXED_HEADER`] bytes of a message.
pub(crate) fn sizes(fixed: &[u8; FIXED_HEADER]) -> Result<Sizes> {
    let big_endian = endianness(fixed[0])?;
    let mut reader = Reader::new(fixed, big_endian);
    reader.pos = 4;
    let body = reader.u32()? as usize;
    reader.pos = 12;
    let fields = reader.u32()? as usize;
    let header = (FIXED_HEADER + fields).next_multiple_of(8);
    if fields > MAX_ARRAY || header + body > MAX_MESSAGE {
        return Err(malformed(format!(
            "a message of {} bytes is longer than D-Bus allows",
            header + body
        )));
    }
    Ok(Sizes {
        fields,
        padding: header - FIXED_HEADER - fields,
        body,
    })
}

fn endianness(marker: u8) -> Result<bool> {
    match marker {
        b'l' => Ok(false),
        b'B' => Ok(true),
        other => Err(malformed(format!("unknown endianness marker {other:#04x}"))),
    }
}

/// A message received from the bus.
#[derive(Debug, Clone)]
pub struct Message {
    kind: Kind,
    flags: u8,
    serial: u32,
    path: Option<String>,
    interface: Option<String>,
    member: Option<String>,
    error_name: Option<String>,
    reply_serial: Option<u32>,
    sender: Option<String>,
    signature: String,
    big_endian: bool,
    /// None when the body was longer than this client keeps.
    body: Option<Vec<u8>>,
    body_length: usize,
}

impl Message {
    /// Parses the header (fixed part and field array, `header`); `body` is
    /// None when it was skipped for its size. Returns None for a message type
    /// this version of the specification does not know, which a client must
    /// ignore.
    pub(crate) fn parse(
        header: &[u8],
        body: Option<Vec<u8>>,
        body_length: usize,
    ) -> Result<Option<Self>> {
        let marker = *header.first().ok_or_else(|| malformed("empty header"))?;
        let big_endian = endianness(marker)?;
        let mut reader = Reader::new(header, big_endian);
        reader.pos = 1;
        let kind = match reader.u8()? {
            1 => Kind::MethodCall,
            2 => Kind::MethodReturn,
            3 => Kind::Error,
            4 => Kind::Signal,
            _ => return Ok(None),
        };
        let flags = reader.u8()?;
        let version = reader.u8()?;
        if version != 1 {
            return Err(malformed(format!("protocol version {version}, not 1")));
        }
        reader.u32()?;
        let serial = reader.u32()?;
        if serial == 0 {
            return Err(malformed("serial 0"));
        }
        let mut message = Message {
            kind,
            flags,
            serial,
            path: None,
            interface: None,
            member: None,
            error_name: None,
            reply_serial: None,
            sender: None,
            signature: String::new(),
            big_endian,
            body,
            body_length,
        };
        let fields_length = reader.u32()? as usize;
        let end = reader.pos + fields_length;
        if end > header.len() {
            return Err(malformed("the header fields run past the header"));
        }
        while reader.pos < end {
            reader.align(8)?;
            let code = reader.u8()?;
            let signature = reader.signature()?;
            let expected = match code {
                field::PATH => "o",
                field::INTERFACE
                | field::MEMBER
                | field::ERROR_NAME
                | field::DESTINATION
                | field::SENDER => "s",
                field::REPLY_SERIAL | field::UNIX_FDS => "u",
                field::SIGNATURE => "g",
                _ => {
                    // Unknown fields must be ignored.
                    reader.skip_value(signature.as_bytes())?;
                    continue;
                }
            };
            if signature != expected {
                return Err(malformed(format!(
                    "header field {code} holds {signature:?}, not {expected:?}"
                )));
            }
            match code {
                field::PATH => message.path = Some(reader.str()?),
                field::INTERFACE => message.interface = Some(reader.str()?),
                field::MEMBER => message.member = Some(reader.str()?),
                field::ERROR_NAME => message.error_name = Some(reader.str()?),
                field::DESTINATION => {
                    reader.str()?;
                }
                field::SENDER => message.sender = Some(reader.str()?),
                field::REPLY_SERIAL => message.reply_serial = Some(reader.u32()?),
                field::UNIX_FDS => {
                    reader.u32()?;
                }
                _ => message.signature = reader.signature()?,
            }
        }
        if reader.pos != end {
            return Err(malformed("a header field runs past the field array"));
        }
        let required = match kind {
            Kind::MethodCall => message.path.is_some() && message.member.is_some(),
            Kind::MethodReturn => message.reply_serial.is_some(),
            Kind::Error => message.reply_serial.is_some() && message.error_name.is_some(),
            Kind::Signal => {
                message.path.is_some() && message.interface.is_some() && message.member.is_some()
            }
        };
        if !required {
            return Err(malformed(format!("a {kind:?} without its required fields")));
        }
        Ok(Some(message))
    }

    /// What the message is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub(crate) fn flags(&self) -> u8 {
        self.flags
    }

    pub(crate) fn serial(&self) -> u32 {
        self.serial
    }

    /// The object path, for method calls and signals.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// The interface, for signals and most method calls.
    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }

    /// The method or signal name.
    pub fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }

    pub(crate) fn reply_serial(&self) -> Option<u32> {
        self.reply_serial
    }

    /// The connection that sent the message, as the bus wrote it: a unique
    /// name (`:1.42`), or `org.freedesktop.DBus` for the bus itself. The bus
    /// sets this field on every message, so a peer cannot forge it; compare
    /// it with a well-known name's owner ([`NameOwner`](crate::NameOwner))
    /// to know a signal came from that service.
    pub fn sender(&self) -> Option<&str> {
        self.sender.as_deref()
    }

    /// The body's signature ("" for no arguments).
    pub fn signature(&self) -> &str {
        &self.signature
    }

    fn body(&self, expected: &'static str) -> Result<Reader<'_>> {
        let Some(body) = &self.body else {
            return Err(Error::TooLarge(self.body_length));
        };
        if self.signature != expected {
            return Err(Error::Signature {
                expected,
                found: self.signature.clone(),
            });
        }
        Ok(Reader::new(body, self.big_endian))
    }

    /// The one `b` argument (ActiveChanged, PrepareForSleep).
    pub fn bool_argument(&self) -> Result<bool> {
        self.body("b")?.bool()
    }

    /// The one `u` argument (a notification's id).
    pub fn u32_argument(&self) -> Result<u32> {
        self.body("u")?.u32()
    }

    /// The one `s` argument (a bus's unique name).
    pub fn str_argument(&self) -> Result<String> {
        self.body("s")?.str()
    }

    /// The arguments of a body of strings only (NameOwnerChanged's name, old
    /// owner and new owner).
    pub fn str_arguments(&self) -> Result<Vec<String>> {
        if self.signature.bytes().any(|code| code != b's') {
            return Err(Error::Signature {
                expected: "s, any number",
                found: self.signature.clone(),
            });
        }
        let mut reader = self.raw_body()?;
        self.signature.bytes().map(|_| reader.str()).collect()
    }

    /// The argument of a body that is one array of strings (`as`, as the
    /// notification server's `GetCapabilities` answers).
    pub fn str_array_argument(&self) -> Result<Vec<String>> {
        if self.signature != "as" {
            return Err(Error::Signature {
                expected: "as",
                found: self.signature.clone(),
            });
        }
        let mut reader = self.raw_body()?;
        let length = usize::try_from(reader.u32()?).map_err(|_| malformed("array length"))?;
        let end = reader
            .pos
            .checked_add(length)
            .ok_or_else(|| malformed("array length"))?;
        let mut strings = Vec::new();
        while reader.pos < end {
            strings.push(reader.str()?);
        }
        if reader.pos != end {
            return Err(malformed("array length"));
        }
        Ok(strings)
    }

    /// Every object path in the body, in order, however deep in variants,
    /// structures and arrays (logind's `GetSessionByPID` reply, a `User`'s
    /// `Display` or `Sessions` property).
    pub fn object_paths(&self) -> Result<Vec<String>> {
        let mut reader = self.raw_body()?;
        reader.paths = Some(Vec::new());
        let signature = self.signature.as_bytes();
        let mut at = 0;
        while at < signature.len() {
            at = reader.skip(signature, at, 0)?;
        }
        Ok(reader.paths.unwrap_or_default())
    }

    /// The first argument when it is a string (a match rule's `arg0`).
    pub(crate) fn arg0(&self) -> Option<String> {
        if !self.signature.starts_with('s') {
            return None;
        }
        self.raw_body().ok()?.str().ok()
    }

    /// A reader of the body whatever its signature.
    fn raw_body(&self) -> Result<Reader<'_>> {
        match &self.body {
            Some(body) => Ok(Reader::new(body, self.big_endian)),
            None => Err(Error::TooLarge(self.body_length)),
        }
    }

    /// An error reply as an [`Error::Remote`], its message from the first
    /// argument when that is a string.
    pub(crate) fn into_error(self) -> Error {
        let message = match (&self.body, self.signature.starts_with('s')) {
            (Some(body), true) => Reader::new(body, self.big_endian).str().unwrap_or_default(),
            _ => String::new(),
        };
        Error::Remote {
            name: self.error_name.unwrap_or_default(),
            message,
        }
    }
}

pub(crate) fn malformed(what: impl Into<String>) -> Error {
    Error::Malformed(what.into())
}

/// Reads values from a header or body.
#[derive(Debug)]
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    big_endian: bool,
    /// When set, the object paths [`Reader::skip`] reads past are kept here.
    paths: Option<Vec<String>>,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], big_endian: bool) -> Self {
        Self {
            bytes,
            pos: 0,
            big_endian,
            paths: None,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| malformed("a value runs past the end of the message"))?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    fn align(&mut self, to: usize) -> Result<()> {
        let padding = self.pos.next_multiple_of(to) - self.pos;
        self.take(padding).map(|_| ())
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        self.align(4)?;
        let bytes: [u8; 4] = self.take(4)?.try_into().map_err(|_| malformed("u32"))?;
        Ok(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }

    fn bool(&mut self) -> Result<bool> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed(format!("boolean {other}"))),
        }
    }

    fn text(&mut self, length: usize) -> Result<String> {
        let bytes = self.take(length)?;
        if self.u8()? != 0 || bytes.contains(&0) {
            return Err(malformed("a string without its single NUL"));
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| malformed("a string that is not UTF-8"))
    }

    fn str(&mut self) -> Result<String> {
        let length = self.u32()? as usize;
        self.text(length)
    }

    fn signature(&mut self) -> Result<String> {
        let length = usize::from(self.u8()?);
        self.text(length)
    }

    /// Reads past one value of the single complete type `signature`.
    fn skip_value(&mut self, signature: &[u8]) -> Result<()> {
        let end = self.skip(signature, 0, 0)?;
        if end != signature.len() {
            return Err(malformed("a variant holds more than one type"));
        }
        Ok(())
    }

    /// Reads past one value of the type starting at `signature[at]`; returns
    /// where that type ends in the signature.
    fn skip(&mut self, signature: &[u8], at: usize, depth: usize) -> Result<usize> {
        if depth > MAX_DEPTH {
            return Err(malformed("types nested too deep"));
        }
        let code = *signature
            .get(at)
            .ok_or_else(|| malformed("an incomplete signature"))?;
        match code {
            b'y' => {
                self.take(1)?;
            }
            b'n' | b'q' => {
                self.align(2)?;
                self.take(2)?;
            }
            b'b' => {
                self.bool()?;
            }
            b'i' | b'u' | b'h' => {
                self.u32()?;
            }
            b'x' | b't' | b'd' => {
                self.align(8)?;
                self.take(8)?;
            }
            b's' => {
                self.str()?;
            }
            b'o' => {
                let path = self.str()?;
                if let Some(paths) = &mut self.paths {
                    paths.push(path);
                }
            }
            b'g' => {
                self.signature()?;
            }
            b'v' => {
                let inner = self.signature()?;
                if self.skip(inner.as_bytes(), 0, depth + 1)? != inner.len() {
                    return Err(malformed("a variant holds more than one type"));
                }
            }
            b'a' => {
                let element = at + 1;
                let end = type_end(signature, element, depth + 1)?;
                let length = self.u32()? as usize;
                if length > MAX_ARRAY {
                    return Err(malformed("an array longer than D-Bus allows"));
                }
                self.align(alignment(signature[element]))?;
                if self.paths.is_none() {
                    self.take(length)?;
                    return Ok(end);
                }
                // Kept paths: walk the elements (each aligns itself).
                let stop = self
                    .pos
                    .checked_add(length)
                    .filter(|stop| *stop <= self.bytes.len())
                    .ok_or_else(|| malformed("an array runs past the end of the message"))?;
                while self.pos < stop {
                    self.skip(signature, element, depth + 1)?;
                }
                if self.pos != stop {
                    return Err(malformed("an array's elements run past its length"));
                }
                return Ok(end);
            }
            b'(' => {
                self.align(8)?;
                let mut next = at + 1;
                while signature.get(next) != Some(&b')') {
                    next = self.skip(signature, next, depth + 1)?;
                }
                if next == at + 1 {
                    return Err(malformed("an empty structure"));
                }
                return Ok(next + 1);
            }
            b'{' => {
                self.align(8)?;
                let value = self.skip(signature, at + 1, depth + 1)?;
                let end = self.skip(signature, value, depth + 1)?;
                if signature.get(end) != Some(&b'}') {
                    return Err(malformed("a dictionary entry of more than two types"));
                }
                return Ok(end + 1);
            }
            other => {
                return Err(malformed(format!(
                    "unknown type code {:?}",
                    char::from(other)
                )))
            }
        }
        Ok(at + 1)
    }
}

/// Where the single complete type starting at `signature[at]` ends.
fn type_end(signature: &[u8], at: usize, depth: usize) -> Result<usize> {
    if depth > MAX_DEPTH {
        return Err(malformed("types nested too deep"));
    }
    match signature.get(at) {
        Some(b'a') => type_end(signature, at + 1, depth + 1),
        Some(b'(') => {
            let mut next = at + 1;
            while signature.get(next) != Some(&b')') {
                next = type_end(signature, next, depth + 1)?;
            }
            if next == at + 1 {
                return Err(malformed("an empty structure"));
            }
            Ok(next + 1)
        }
        Some(b'{') => {
            let value = type_end(signature, at + 1, depth + 1)?;
            let end = type_end(signature, value, depth + 1)?;
            if signature.get(end) != Some(&b'}') {
                return Err(malformed("a dictionary entry of more than two types"));
            }
            Ok(end + 1)
        }
        Some(b'y' | b'b' | b'n' | b'q' | b'i' | b'u' | b'x' | b't' | b'd' | b'h' | b's' | b'o')
        | Some(b'g' | b'v') => Ok(at + 1),
        Some(other) => Err(malformed(format!(
            "unknown type code {:?}",
            char::from(*other)
        ))),
        None => Err(malformed("an incomplete signature")),
    }
}

/// The alignment of values whose type code is `code`.
fn alignment(code: u8) -> usize {
    match code {
        b'n' | b'q' => 2,
        b'b' | b'i' | b'u' | b'h' | b's' | b'o' | b'a' => 4,
        b'x' | b't' | b'd' | b'(' | b'{' => 8,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits an encoded message into header and body as the connection
    /// reads it.
    fn parse(bytes: &[u8]) -> Result<Option<Message>> {
        let fixed: [u8; FIXED_HEADER] = bytes
            .get(..FIXED_HEADER)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed("short header"))?;
        let sizes = sizes(&fixed)?;
        let header_end = FIXED_HEADER + sizes.fields;
        let body_start = header_end + sizes.padding;
        let body = bytes
            .get(body_start..body_start + sizes.body)
            .ok_or_else(|| malformed("short body"))?;
        Message::parse(&bytes[..header_end], Some(body.to_vec()), sizes.body)
    }

    fn notify_body() -> Body {
        Body::new()
            .str("token-agent")
            .u32(0)
            .str("security-high")
            .str("summary")
            .str("Touch YubiKey 5 #1234567")
            .array("s", |_| {})
            .array("{sv}", |hints| {
                hints.structure(|entry| {
                    entry.str("urgency");
                    entry.variant("y", |v| v.u8(1));
                });
                hints.structure(|entry| {
                    entry.str("category");
                    entry.variant("s", |v| v.str("device"));
                });
            })
            .i32(0)
    }

    #[test]
    fn a_call_reads_back_as_the_reference_implementation_reads_it() -> anyhow::Result<()> {
        let body = notify_body();
        let bytes = encode(
            Kind::MethodCall,
            0,
            7,
            &Outgoing {
                path: Some("/org/freedesktop/Notifications"),
                interface: Some("org.freedesktop.Notifications"),
                member: Some("Notify"),
                destination: Some("org.freedesktop.Notifications"),
                ..Outgoing::default()
            },
            &body,
        );
        use zbus::zvariant::serialized::{Context, Data};
        use zbus::zvariant::{OwnedValue, LE};
        let data = Data::new(bytes.clone(), Context::new_dbus(LE, 0));
        type Header = (u8, u8, u8, u8, u32, u32, Vec<(u8, OwnedValue)>);
        let ((endian, kind, flags, version, length, serial, fields), header_length): (Header, _) =
            data.deserialize_for_signature("(yyyyuua(yv))")?;
        assert_eq!((endian, kind, flags, version, serial), (b'l', 1, 0, 1, 7));
        let body_start = header_length.next_multiple_of(8);
        assert_eq!(body_start + length as usize, bytes.len());
        let field = |code: u8| -> anyhow::Result<String> {
            let (_, value) = fields
                .iter()
                .find(|(c, _)| *c == code)
                .ok_or_else(|| anyhow::anyhow!("no header field {code}"))?;
            Ok(match value.value_signature().to_string().as_str() {
                "o" => zbus::zvariant::ObjectPath::try_from(value.try_clone()?)?.to_string(),
                "g" => {
                    zbus::zvariant::Signature::try_from(value.try_clone()?)?.to_string_no_parens()
                }
                _ => String::try_from(value.try_clone()?)?,
            })
        };
        assert_eq!(field(field::PATH)?, "/org/freedesktop/Notifications");
        assert_eq!(field(field::INTERFACE)?, "org.freedesktop.Notifications");
        assert_eq!(field(field::MEMBER)?, "Notify");
        assert_eq!(field(field::DESTINATION)?, "org.freedesktop.Notifications");
        assert_eq!(field(field::SIGNATURE)?, "susssasa{sv}i");
        type Notify = (
            String,
            u32,
            String,
            String,
            String,
            Vec<String>,
            std::collections::HashMap<String, OwnedValue>,
            i32,
        );
        let ((app, replaces, icon, summary, text, actions, hints, timeout), _): (Notify, _) = data
            .slice(body_start..)
            .deserialize_for_signature("susssasa{sv}i")?;
        assert_eq!(
            (app.as_str(), replaces, icon.as_str(), summary.as_str()),
            ("token-agent", 0, "security-high", "summary")
        );
        assert_eq!(text, "Touch YubiKey 5 #1234567");
        assert!(actions.is_empty());
        assert_eq!(u8::try_from(&hints["urgency"])?, 1);
        assert_eq!(<&str>::try_from(&hints["category"])?, "device");
        assert_eq!(timeout, 0);

        let ours = parse(&bytes)?.ok_or_else(|| malformed("ignored"))?;
        assert_eq!(ours.kind(), Kind::MethodCall);
        assert_eq!(ours.serial(), 7);
        assert_eq!(ours.member(), Some("Notify"));
        assert_eq!(ours.signature(), "susssasa{sv}i");
        Ok(())
    }

    #[test]
    fn a_reference_signal_parses_in_either_endianness() -> anyhow::Result<()> {
        for endian in [zbus::zvariant::LE, zbus::zvariant::BE] {
            let signal = zbus::Message::signal(
                "/org/freedesktop/login1",
                "org.freedesktop.login1.Manager",
                "PrepareForSleep",
            )?
            .endian(endian)
            .sender(":1.7")?
            .build(&(true,))?;
            let bytes = signal.data().to_vec();
            let ours = parse(&bytes)?.ok_or_else(|| malformed("ignored"))?;
            assert_eq!(ours.kind(), Kind::Signal);
            assert_eq!(ours.path(), Some("/org/freedesktop/login1"));
            assert_eq!(ours.interface(), Some("org.freedesktop.login1.Manager"));
            assert_eq!(ours.member(), Some("PrepareForSleep"));
            assert_eq!(ours.sender(), Some(":1.7"));
            assert!(ours.bool_argument()?);
            assert!(matches!(
                ours.u32_argument(),
                Err(Error::Signature { expected: "u", .. })
            ));
        }
        Ok(())
    }

    #[test]
    fn an_array_of_strings_is_read_both_ways() -> anyhow::Result<()> {
        let capabilities = vec!["actions", "body", "body-markup"];
        for endian in [zbus::zvariant::LE, zbus::zvariant::BE] {
            let reply = zbus::Message::signal("/a", "a.b", "C")?
                .endian(endian)
                .build(&(capabilities.clone(),))?;
            let ours = parse(reply.data())?.ok_or_else(|| malformed("ignored"))?;
            assert_eq!(ours.str_array_argument()?, capabilities);
            assert!(ours.str_arguments().is_err());
        }
        let empty: Vec<&str> = Vec::new();
        let reply = zbus::Message::signal("/a", "a.b", "C")?.build(&(empty,))?;
        let ours = parse(reply.data())?.ok_or_else(|| malformed("ignored"))?;
        assert!(ours.str_array_argument()?.is_empty());
        Ok(())
    }

    #[test]
    fn object_paths_are_found_however_deep_and_strings_read_in_a_row() -> anyhow::Result<()> {
        use zbus::zvariant::{ObjectPath, Value};
        // A User's Sessions property as logind answers Properties.Get: a
        // variant holding a(so), big-endian here to read the other way too.
        let sessions = vec![
            (
                "c7",
                ObjectPath::try_from("/org/freedesktop/login1/session/c7")?,
            ),
            (
                "3",
                ObjectPath::try_from("/org/freedesktop/login1/session/_33")?,
            ),
        ];
        let reply = zbus::Message::signal("/a", "a.b", "C")?
            .endian(zbus::zvariant::BE)
            .build(&(Value::from(sessions), "s", 7u32))?;
        let ours = parse(reply.data())?.ok_or_else(|| malformed("ignored"))?;
        assert_eq!(
            ours.object_paths()?,
            [
                "/org/freedesktop/login1/session/c7",
                "/org/freedesktop/login1/session/_33"
            ]
        );
        assert!(ours.str_arguments().is_err());
        assert_eq!(ours.arg0(), None);

        let changed = zbus::Message::signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
        )?
        .build(&("org.freedesktop.login1", ":1.3", ""))?;
        let ours = parse(changed.data())?.ok_or_else(|| malformed("ignored"))?;
        assert_eq!(
            ours.str_arguments()?,
            ["org.freedesktop.login1", ":1.3", ""]
        );
        assert_eq!(ours.arg0().as_deref(), Some("org.freedesktop.login1"));
        assert!(ours.object_paths()?.is_empty());
        Ok(())
    }

    #[test]
    fn an_error_reply_carries_its_name_and_message() -> anyhow::Result<()> {
        let bytes = encode(
            Kind::Error,
            0,
            3,
            &Outgoing {
                error_name: Some("org.freedesktop.DBus.Error.ServiceUnknown"),
                reply_serial: Some(2),
                ..Outgoing::default()
            },
            &Body::new().str("The name is not activatable"),
        );
        let message = parse(&bytes)?.ok_or_else(|| malformed("ignored"))?;
        assert_eq!(message.reply_serial(), Some(2));
        assert_eq!(
            message.into_error().to_string(),
            "org.freedesktop.DBus.Error.ServiceUnknown: The name is not activatable"
        );
        Ok(())
    }

    #[test]
    fn unknown_header_fields_of_any_type_are_skipped() -> anyhow::Result<()> {
        // A signal whose header carries an unknown field 200 holding
        // a{s(ixv)} before the fields we read.
        let mut message = Writer::default();
        message.u8(b'l');
        message.u8(4);
        message.u8(0);
        message.u8(1);
        message.u32(0);
        message.u32(9);
        message.array("(yv)", |fields| {
            fields.structure(|f| {
                f.u8(200);
                f.variant("a{s(ixv)}", |v| {
                    v.array("{s(ixv)}", |entries| {
                        entries.structure(|e| {
                            e.str("k");
                            e.structure(|s| {
                                s.i32(-1);
                                s.align(8);
                                s.bytes.extend_from_slice(&5u64.to_le_bytes());
                                s.variant("as", |v| v.array("s", |a| a.str("x")));
                            });
                        });
                    });
                });
            });
            for (code, value) in [
                (field::PATH, "/a"),
                (field::INTERFACE, "a.b"),
                (field::MEMBER, "C"),
            ] {
                fields.structure(|f| {
                    f.u8(code);
                    f.variant(if code == field::PATH { "o" } else { "s" }, |v| {
                        v.str(value)
                    });
                });
            }
        });
        message.align(8);
        let parsed = parse(&message.bytes)?.ok_or_else(|| malformed("ignored"))?;
        assert_eq!(parsed.member(), Some("C"));
        assert_eq!(parsed.signature(), "");
        Ok(())
    }

    #[test]
    fn strings_never_carry_nul_onto_the_bus() {
        let mut writer = Writer::default();
        writer.str("a\0b");
        assert_eq!(&writer.bytes[..4], &5u32.to_le_bytes());
        assert_eq!(&writer.bytes[4..], "a\u{fffd}b\0".as_bytes());
    }

    #[test]
    fn an_unknown_message_type_is_ignored_and_a_huge_one_refused() -> anyhow::Result<()> {
        let mut bytes = encode(
            Kind::Signal,
            0,
            1,
            &Outgoing {
                path: Some("/a"),
                interface: Some("a.b"),
                member: Some("C"),
                ..Outgoing::default()
            },
            &Body::new(),
        );
        bytes[1] = 9;
        assert!(parse(&bytes)?.is_none());

        let mut fixed = [0u8; FIXED_HEADER];
        fixed[..FIXED_HEADER].copy_from_slice(&bytes[..FIXED_HEADER]);
        fixed[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(sizes(&fixed), Err(Error::Malformed(_))));
        Ok(())
    }

    /// Every truncation and every single-byte change of valid messages
    /// parses or fails cleanly, never panics nor reads out of bounds.
    #[test]
    fn damaged_messages_fail_cleanly() {
        let messages = [
            encode(
                Kind::MethodCall,
                0,
                7,
                &Outgoing {
                    path: Some("/org/freedesktop/Notifications"),
                    member: Some("Notify"),
                    ..Outgoing::default()
                },
                &notify_body(),
            ),
            encode(
                Kind::Error,
                0,
                3,
                &Outgoing {
                    error_name: Some("a.b"),
                    reply_serial: Some(2),
                    ..Outgoing::default()
                },
                &Body::new().str("why"),
            ),
        ];
        for original in messages {
            for cut in 0..original.len() {
                let _ = damaged(&original[..cut]);
            }
            for at in 0..original.len() {
                for value in [0x00, 0x01, 0x7f, 0x80, 0xff, b'a', b'(', b'v', b'{'] {
                    let mut bytes = original.clone();
                    bytes[at] = value;
                    let _ = damaged(&bytes);
                }
            }
        }
    }

    fn damaged(bytes: &[u8]) -> Result<()> {
        if let Some(message) = parse(bytes)? {
            let _ = message.bool_argument();
            let _ = message.u32_argument();
            let _ = message.str_argument();
            let _ = message.str_arguments();
            let _ = message.object_paths();
            let _ = message.into_error();
        }
        Ok(())
    }
}
