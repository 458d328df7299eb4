//! BER-TLV as PIV uses it (NIST SP 800-73-4 part 2, section 3.3 and ISO 7816-4 annex D):
//! tags of one to three bytes and definite lengths of up to three bytes.

use thiserror::Error;

/// One parsed tag-length-value element, borrowing its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The tag, with all of its bytes (`0x5F2F`, `0x7F49`, `0x7C`).
    pub tag: u32,
    /// The value bytes.
    pub value: &'a [u8],
}

/// Why a TLV sequence could not be parsed.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlvError {
    /// The data ends inside a tag, a length or a value: a truncated command.
    #[error("TLV data is truncated")]
    Truncated,
    /// A tag longer than three bytes or a length form PIV does not use.
    #[error("TLV encoding is not supported")]
    Unsupported,
}

/// Parses a whole sequence of TLV elements; trailing garbage is an error.
pub fn parse(mut data: &[u8]) -> Result<Vec<Tlv<'_>>, TlvError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let (tlv, rest) = parse_one(data)?;
        out.push(tlv);
        data = rest;
    }
    Ok(out)
}

/// Parses one element and returns it with the bytes that follow it.
pub fn parse_one(data: &[u8]) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    let (&first, mut rest) = data.split_first().ok_or(TlvError::Truncated)?;
    let mut tag = u32::from(first);
    if first & 0x1F == 0x1F {
        // Multi-byte tag: subsequent bytes follow while bit 8 is set.
        let mut count = 1;
        loop {
            let (&b, r) = rest.split_first().ok_or(TlvError::Truncated)?;
            rest = r;
            tag = (tag << 8) | u32::from(b);
            count += 1;
            if b & 0x80 == 0 {
                break;
            }
            if count >= 3 {
                return Err(TlvError::Unsupported);
            }
        }
    }
    let (len, rest) = parse_len(rest)?;
    if rest.len() < len {
        return Err(TlvError::Truncated);
    }
    let (value, rest) = rest.split_at(len);
    Ok((Tlv { tag, value }, rest))
}

/// Finds the first element with `tag` in a parsed sequence.
pub fn find<'a>(tlvs: &[Tlv<'a>], tag: u32) -> Option<&'a [u8]> {
    tlvs.iter().find(|t| t.tag == tag).map(|t| t.value)
}

/// Appends one element to `out`.
pub fn push(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if tag > 0xFFFF {
        out.push((tag >> 16) as u8);
    }
    if tag > 0xFF {
        out.push((tag >> 8) as u8);
    }
    out.push(tag as u8);
    push_len(out, value.len());
    out.extend_from_slice(value);
}

/// Encodes one element.
pub fn encode(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    push(&mut out, tag, value);
    out
}

/// Appends a BER definite length.
pub fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xFF {
        out.extend_from_slice(&[0x81, len as u8]);
    } else if len <= 0xFFFF {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    } else {
        out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]);
    }
}

fn parse_len(data: &[u8]) -> Result<(usize, &[u8]), TlvError> {
    let (&first, rest) = data.split_first().ok_or(TlvError::Truncated)?;
    let count = match first {
        0x00..=0x7F => return Ok((usize::from(first), rest)),
        0x81 => 1,
        0x82 => 2,
        0x83 => 3,
        _ => return Err(TlvError::Unsupported),
    };
    if rest.len() < count {
        return Err(TlvError::Truncated);
    }
    let (bytes, rest) = rest.split_at(count);
    let len = bytes
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    Ok((len, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_multi_byte_tags_and_long_lengths() {
        let value = vec![0xAB; 300];
        let mut buf = Vec::new();
        push(&mut buf, 0x5F_C1_05, &value);
        push(&mut buf, 0x7F49, &[1, 2]);
        push(&mut buf, 0x80, &[]);
        let parsed = parse(&buf).unwrap_or_default();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].tag, 0x5F_C1_05);
        assert_eq!(parsed[0].value, &value[..]);
        assert_eq!(
            parsed[1],
            Tlv {
                tag: 0x7F49,
                value: &[1, 2]
            }
        );
        assert_eq!(parsed[2].value.len(), 0);
    }

    #[test]
    fn rejects_truncated_data() {
        assert_eq!(parse(&[0x7C, 0x05, 0x80]), Err(TlvError::Truncated));
        assert_eq!(parse(&[0x7C, 0x82, 0x01]), Err(TlvError::Truncated));
        assert_eq!(parse(&[0x7C, 0x84, 0, 0, 0, 1]), Err(TlvError::Unsupported));
    }
}
