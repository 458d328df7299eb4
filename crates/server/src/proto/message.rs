//! Agent messages: requests decoded exactly within their frame, replies encoded.
//!
//! Requests use ssh-agent-lib's types (draft-miller-ssh-agent, section 3); a
//! request is accepted only if it fills its frame exactly, so bytes smuggled
//! after a message are refused rather than ignored. Replies are encoded here
//! because identities are listed from pre-encoded blobs and signatures may be
//! in the legacy "ssh-rsa" form that `ssh-key` cannot represent.

use ssh_agent_lib::proto::Request;
use ssh_encoding::{Decode, Reader};
use token_agent_core::SshSignature;

/// SSH_AGENT_FAILURE.
const FAILURE: u8 = 5;
/// SSH_AGENT_SUCCESS.
const SUCCESS: u8 = 6;
/// SSH_AGENT_IDENTITIES_ANSWER.
const IDENTITIES_ANSWER: u8 = 12;
/// SSH_AGENT_SIGN_RESPONSE.
const SIGN_RESPONSE: u8 = 14;
/// SSH_AGENT_EXTENSION_FAILURE.
const EXTENSION_FAILURE: u8 = 28;
/// SSH_AGENT_EXTENSION_RESPONSE.
const EXTENSION_RESPONSE: u8 = 29;

/// Why a frame is not a request this agent understands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame was empty: there is not even a message type.
    #[error("empty message")]
    Empty,
    /// A message type this agent does not implement.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The message is malformed: a field is missing, too long or invalid.
    #[error("malformed message of type {kind}: {reason}")]
    Malformed {
        /// The message type.
        kind: u8,
        /// What the decoder reported.
        reason: String,
    },
    /// The message ended before its frame did.
    #[error("{extra} unexpected bytes after a message of type {kind}")]
    TrailingBytes {
        /// The message type.
        kind: u8,
        /// How many bytes were left.
        extra: usize,
    },
}

/// Decodes `frame` as one request that must fill it exactly.
pub fn decode_request(frame: &[u8]) -> Result<Request, DecodeError> {
    let kind = *frame.first().ok_or(DecodeError::Empty)?;
    let padded = pad_ecdsa_scalar(frame);
    let mut reader: &[u8] = padded.as_ref().map_or(frame, |p| p.as_slice());
    let request = Request::decode(&mut reader).map_err(|err| match err {
        ssh_agent_lib::proto::ProtoError::UnsupportedCommand { command } => {
            DecodeError::UnknownType(command)
        }
        other => DecodeError::Malformed {
            kind,
            reason: other.to_string(),
        },
    })?;
    if !reader.is_finished() {
        return Err(DecodeError::TrailingBytes {
            kind,
            extra: reader.remaining_len(),
        });
    }
    Ok(request)
}

/// SSH_AGENTC_ADD_IDENTITY and SSH_AGENTC_ADD_ID_CONSTRAINED.
const ADD_IDENTITY: [u8; 2] = [17, 25];

/// OpenSSH sends an ECDSA private scalar as a minimal mpint, so a scalar
/// whose top byte is zero arrives shorter than the curve's size (about one
/// P-256 key in 256, and many P-521 keys). `ssh-key` 0.6 accepts only the
/// full width and would refuse such keys, so widen the scalar to the curve's
/// size before decoding. Returns `None` when the frame needs no change.
fn pad_ecdsa_scalar(frame: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let (&kind, mut rest) = frame.split_first()?;
    if !ADD_IDENTITY.contains(&kind) {
        return None;
    }
    let algorithm = take_string(&mut rest)?;
    let curve_size = |name: &[u8]| match name {
        b"nistp256" => Some(32),
        b"nistp384" => Some(48),
        b"nistp521" => Some(66),
        _ => None,
    };
    let size = match algorithm {
        b"ecdsa-sha2-nistp256" | b"ecdsa-sha2-nistp384" | b"ecdsa-sha2-nistp521" => {
            let curve = take_string(&mut rest)?;
            take_string(&mut rest)?; // the public point
            curve_size(curve)?
        }
        b"ecdsa-sha2-nistp256-cert-v01@openssh.com" => {
            take_string(&mut rest)?; // the certificate
            32
        }
        b"ecdsa-sha2-nistp384-cert-v01@openssh.com" => {
            take_string(&mut rest)?;
            48
        }
        b"ecdsa-sha2-nistp521-cert-v01@openssh.com" => {
            take_string(&mut rest)?;
            66
        }
        _ => return None,
    };
    let scalar_at = frame.len() - rest.len();
    let scalar = take_string(&mut rest)?;
    if scalar.len() >= size {
        return None;
    }
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(frame.len() + size));
    out.extend_from_slice(&frame[..scalar_at]);
    put_u32(&mut out, size);
    let padded_len = out.len() + size - scalar.len();
    out.resize(padded_len, 0);
    out.extend_from_slice(scalar);
    out.extend_from_slice(rest);
    Some(out)
}

/// Takes an SSH `string` off the front of `input`.
fn take_string<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_be_bytes(input.get(..4)?.try_into().ok()?) as usize;
    let body = input.get(4..4usize.checked_add(len)?)?;
    *input = &input[4 + len..];
    Some(body)
}

/// Decodes `bytes` as a `T` that must fill them exactly (extension payloads).
pub fn decode_exact<T>(bytes: &[u8]) -> Result<T, String>
where
    T: Decode,
    T::Error: std::fmt::Display,
{
    let mut reader = bytes;
    let value = T::decode(&mut reader).map_err(|err| err.to_string())?;
    if reader.is_finished() {
        Ok(value)
    } else {
        Err(format!(
            "{} unexpected trailing bytes",
            reader.remaining_len()
        ))
    }
}

/// The SSH encoding of a key, certificate or other value.
pub fn encode_blob(value: &impl ssh_encoding::Encode) -> Result<Vec<u8>, ssh_encoding::Error> {
    let mut out = Vec::with_capacity(value.encoded_len()?);
    value.encode(&mut out)?;
    Ok(out)
}

/// One listed identity: its public key or certificate blob and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedIdentity<'a> {
    /// The encoded public key or certificate.
    pub blob: &'a [u8],
    /// The comment.
    pub comment: &'a str,
}

/// A reply to a request.
#[derive(Debug)]
pub enum Reply<'a> {
    /// SSH_AGENT_FAILURE.
    Failure,
    /// SSH_AGENT_SUCCESS.
    Success,
    /// SSH_AGENT_IDENTITIES_ANSWER.
    Identities(Vec<ListedIdentity<'a>>),
    /// SSH_AGENT_SIGN_RESPONSE.
    Signature(SshSignature),
    /// SSH_AGENT_EXTENSION_FAILURE.
    ExtensionFailure,
    /// SSH_AGENT_EXTENSION_RESPONSE: `string name` then extension-specific bytes.
    Extension {
        /// The extension's name.
        name: &'static str,
        /// Its encoded contents.
        contents: Vec<u8>,
    },
}

impl Reply<'_> {
    /// The message body (without the frame's length prefix).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Failure => vec![FAILURE],
            Self::Success => vec![SUCCESS],
            Self::ExtensionFailure => vec![EXTENSION_FAILURE],
            Self::Identities(identities) => {
                let len: usize = identities
                    .iter()
                    .map(|id| 8 + id.blob.len() + id.comment.len())
                    .sum();
                let mut out = Vec::with_capacity(5 + len);
                out.push(IDENTITIES_ANSWER);
                put_u32(&mut out, identities.len());
                for id in identities {
                    put_string(&mut out, id.blob);
                    put_string(&mut out, id.comment.as_bytes());
                }
                out
            }
            Self::Signature(signature) => {
                let mut out = Vec::with_capacity(5 + signature.as_bytes().len());
                out.push(SIGN_RESPONSE);
                put_string(&mut out, signature.as_bytes());
                out
            }
            Self::Extension { name, contents } => {
                let mut out = Vec::with_capacity(5 + name.len() + contents.len());
                out.push(EXTENSION_RESPONSE);
                put_string(&mut out, name.as_bytes());
                out.extend_from_slice(contents);
                out
            }
        }
    }
}

/// Appends an SSH `uint32`. Every length here is bounded by the frame limit.
fn put_u32(out: &mut Vec<u8>, value: usize) {
    out.extend_from_slice(&u32::try_from(value).unwrap_or(u32::MAX).to_be_bytes());
}

/// Appends an SSH `string`.
pub(crate) fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_identities_decodes() {
        assert!(matches!(
            decode_request(&[11]),
            Ok(Request::RequestIdentities)
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        assert!(matches!(
            decode_request(&[11, 0]),
            Err(DecodeError::TrailingBytes { kind: 11, extra: 1 })
        ));
    }

    #[test]
    fn unknown_and_empty_messages_are_refused() {
        assert!(matches!(
            decode_request(&[200]),
            Err(DecodeError::UnknownType(200))
        ));
        assert!(matches!(decode_request(&[]), Err(DecodeError::Empty)));
    }

    #[test]
    fn a_sign_request_with_a_lying_length_is_malformed() {
        // SSH_AGENTC_SIGN_REQUEST whose key blob claims 4 GiB.
        let frame = [13, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(
            decode_request(&frame),
            Err(DecodeError::Malformed { kind: 13, .. })
        ));
    }

    #[test]
    fn short_ecdsa_scalars_are_widened() {
        // An ADD_IDENTITY for P-256 whose scalar mpint is 31 bytes long.
        let mut frame = vec![17];
        put_string(&mut frame, b"ecdsa-sha2-nistp256");
        put_string(&mut frame, b"nistp256");
        put_string(&mut frame, &[4; 65]);
        put_string(&mut frame, &[0x11; 31]);
        put_string(&mut frame, b"comment");
        let padded = pad_ecdsa_scalar(&frame).unwrap();
        let mut expected = vec![17];
        put_string(&mut expected, b"ecdsa-sha2-nistp256");
        put_string(&mut expected, b"nistp256");
        put_string(&mut expected, &[4; 65]);
        let mut scalar = vec![0];
        scalar.extend_from_slice(&[0x11; 31]);
        put_string(&mut expected, &scalar);
        put_string(&mut expected, b"comment");
        assert_eq!(&padded[..], &expected[..]);
        // Full-width scalars and other keys are left alone.
        assert!(pad_ecdsa_scalar(&expected).is_none());
        assert!(pad_ecdsa_scalar(&[11]).is_none());
    }

    #[test]
    fn random_frames_never_panic() {
        // A small deterministic generator: the decoder must answer every frame.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = frame.first_mut() {
                // Bias toward real message types so the inner decoders run.
                *first = [11, 13, 17, 18, 19, 20, 21, 22, 23, 25, 26, 27][(*first % 12) as usize];
            }
            let _ = decode_request(&frame);
        }
    }

    #[test]
    fn identities_answer_encodes_count_blob_and_comment() {
        let reply = Reply::Identities(vec![ListedIdentity {
            blob: &[1, 2],
            comment: "c",
        }]);
        assert_eq!(
            reply.encode(),
            [12, 0, 0, 0, 1, 0, 0, 0, 2, 1, 2, 0, 0, 0, 1, b'c']
        );
    }
}
