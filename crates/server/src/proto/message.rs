//! The agent protocol's messages: every request OpenSSH 10.5 sends, decoded
//! exactly within its frame, and every reply, encoded.
//!
//! Read it next to draft-miller-ssh-agent (RFC 9987) section 3 and OpenSSH's
//! PROTOCOL.agent: the message numbers are in [`id`], each [`Request`]
//! variant names the section it implements, and [`Constraints`] covers
//! section 3.2.7 with OpenSSH's constraint extensions. A request is accepted
//! only if it fills its frame exactly, so bytes smuggled after a message are
//! refused rather than ignored; every count and length is bounded as
//! OpenSSH bounds it. What this module cannot decode is a [`DecodeError`],
//! answered with SSH_AGENT_FAILURE: an unknown message, an unknown key type,
//! an unknown constraint (which refuses the whole add, as in OpenSSH).
//! Extensions are decoded by name where they are handled; their contents
//! travel here as bytes.
//!
//! The private key formats of SSH_AGENTC_ADD_IDENTITY are in [`super::key`].

use secrecy::SecretString;
use ssh_encoding::{Decode, Reader};
use ssh_key::certificate::Certificate;
use ssh_key::public::KeyData;
use token_agent_core::{push_string, SshSignature};
use zeroize::Zeroizing;

use super::key::{self, KeyOrCertificate, PrivateKey};

/// Message numbers (draft-miller-ssh-agent section 5.1).
pub mod id {
    /// SSH_AGENT_FAILURE.
    pub const FAILURE: u8 = 5;
    /// SSH_AGENT_SUCCESS.
    pub const SUCCESS: u8 = 6;
    /// SSH_AGENTC_REQUEST_IDENTITIES.
    pub const REQUEST_IDENTITIES: u8 = 11;
    /// SSH_AGENT_IDENTITIES_ANSWER.
    pub const IDENTITIES_ANSWER: u8 = 12;
    /// SSH_AGENTC_SIGN_REQUEST.
    pub const SIGN_REQUEST: u8 = 13;
    /// SSH_AGENT_SIGN_RESPONSE.
    pub const SIGN_RESPONSE: u8 = 14;
    /// SSH_AGENTC_ADD_IDENTITY.
    pub const ADD_IDENTITY: u8 = 17;
    /// SSH_AGENTC_REMOVE_IDENTITY.
    pub const REMOVE_IDENTITY: u8 = 18;
    /// SSH_AGENTC_REMOVE_ALL_IDENTITIES.
    pub const REMOVE_ALL_IDENTITIES: u8 = 19;
    /// SSH_AGENTC_REMOVE_ALL_RSA_IDENTITIES, of protocol 1: OpenSSH's agent
    /// still removes every key for it, and `ssh-add -D` still sends it.
    pub const REMOVE_ALL_RSA_IDENTITIES: u8 = 9;
    /// SSH_AGENTC_ADD_SMARTCARD_KEY.
    pub const ADD_SMARTCARD_KEY: u8 = 20;
    /// SSH_AGENTC_REMOVE_SMARTCARD_KEY.
    pub const REMOVE_SMARTCARD_KEY: u8 = 21;
    /// SSH_AGENTC_LOCK.
    pub const LOCK: u8 = 22;
    /// SSH_AGENTC_UNLOCK.
    pub const UNLOCK: u8 = 23;
    /// SSH_AGENTC_ADD_ID_CONSTRAINED.
    pub const ADD_ID_CONSTRAINED: u8 = 25;
    /// SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED.
    pub const ADD_SMARTCARD_KEY_CONSTRAINED: u8 = 26;
    /// SSH_AGENTC_EXTENSION.
    pub const EXTENSION: u8 = 27;
    /// SSH_AGENT_EXTENSION_FAILURE.
    pub const EXTENSION_FAILURE: u8 = 28;
    /// SSH_AGENT_EXTENSION_RESPONSE (OpenSSH 10.x).
    pub const EXTENSION_RESPONSE: u8 = 29;

    /// SSH_AGENT_CONSTRAIN_LIFETIME.
    pub const CONSTRAIN_LIFETIME: u8 = 1;
    /// SSH_AGENT_CONSTRAIN_CONFIRM.
    pub const CONSTRAIN_CONFIRM: u8 = 2;
    /// SSH_AGENT_CONSTRAIN_EXTENSION.
    pub const CONSTRAIN_EXTENSION: u8 = 255;
}

/// OpenSSH's AGENT_MAX_DEST_CONSTRAINTS.
const MAX_DESTINATIONS: usize = 1024;
/// OpenSSH's AGENT_MAX_EXT_CERTS.
const MAX_ASSOCIATED_CERTS: usize = 1024;
/// OpenSSH's AGENT_USER_CONSTRAINT_MAX_LEN.
const MAX_USER_PATTERN_LEN: usize = 256;

/// A request from a client.
#[derive(Debug)]
#[non_exhaustive]
pub enum Request {
    /// SSH_AGENTC_REQUEST_IDENTITIES (section 3.4): no fields.
    RequestIdentities,
    /// SSH_AGENTC_SIGN_REQUEST (section 3.6): `string key blob`, `string data`, `uint32 flags`.
    Sign {
        /// The public key or certificate blob the client names the key by.
        key: Vec<u8>,
        /// What to sign.
        data: Vec<u8>,
        /// SSH_AGENT_RSA_SHA2_256 and friends.
        flags: u32,
    },
    /// SSH_AGENTC_ADD_IDENTITY and SSH_AGENTC_ADD_ID_CONSTRAINED (section
    /// 3.2): a private key, `string comment`, then constraints (none for 17).
    AddIdentity {
        /// The key and its certificate (boxed: a certificate is large).
        key: Box<PrivateKey>,
        /// Its comment.
        comment: String,
        /// What the client limited it to.
        constraints: Constraints,
    },
    /// SSH_AGENTC_REMOVE_IDENTITY (section 3.3): `string key blob`.
    RemoveIdentity {
        /// The public key or certificate blob.
        key: Vec<u8>,
    },
    /// SSH_AGENTC_REMOVE_ALL_IDENTITIES (section 3.3): no fields.
    RemoveAllIdentities,
    /// SSH_AGENTC_ADD_SMARTCARD_KEY and ..._CONSTRAINED (section 3.2.6):
    /// `string provider`, `string pin`, then constraints (none for 20).
    AddSmartcardKey {
        /// The provider (PKCS#11 module) as the client named it.
        provider: String,
        /// The PIN; empty when ssh-add was given none.
        pin: SecretString,
        /// What the client limited the provider's keys to.
        constraints: Constraints,
    },
    /// SSH_AGENTC_REMOVE_SMARTCARD_KEY (section 3.3): `string provider`,
    /// `string pin` (unused, as in OpenSSH).
    RemoveSmartcardKey {
        /// The provider.
        provider: String,
    },
    /// SSH_AGENTC_LOCK (section 3.7): `string passphrase`, any bytes.
    Lock(Zeroizing<Vec<u8>>),
    /// SSH_AGENTC_UNLOCK (section 3.7): `string passphrase`, any bytes.
    Unlock(Zeroizing<Vec<u8>>),
    /// SSH_AGENTC_EXTENSION (section 3.8): `string name`, then contents
    /// that only the named extension defines.
    Extension {
        /// The extension's name.
        name: String,
        /// Everything after the name.
        contents: Vec<u8>,
    },
}

impl Request {
    /// The message number this request came as.
    pub fn message_id(&self) -> u8 {
        match self {
            Self::RequestIdentities => id::REQUEST_IDENTITIES,
            Self::Sign { .. } => id::SIGN_REQUEST,
            Self::AddIdentity { .. } => id::ADD_IDENTITY,
            Self::RemoveIdentity { .. } => id::REMOVE_IDENTITY,
            Self::RemoveAllIdentities => id::REMOVE_ALL_IDENTITIES,
            Self::AddSmartcardKey { .. } => id::ADD_SMARTCARD_KEY,
            Self::RemoveSmartcardKey { .. } => id::REMOVE_SMARTCARD_KEY,
            Self::Lock(_) => id::LOCK,
            Self::Unlock(_) => id::UNLOCK,
            Self::Extension { .. } => id::EXTENSION,
        }
    }
}

/// The constraints of an add request (section 3.2.7 and OpenSSH's
/// PROTOCOL.agent). Each may be given once; OpenSSH refuses duplicates.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Constraints {
    /// SSH_AGENT_CONSTRAIN_LIFETIME: `uint32 seconds`.
    pub lifetime: Option<u32>,
    /// SSH_AGENT_CONSTRAIN_CONFIRM.
    pub confirm: bool,
    /// restrict-destination-v00@openssh.com (`ssh-add -h`).
    pub destinations: Option<Vec<DestinationConstraint>>,
    /// sk-provider@openssh.com: the middleware of an sk key (`ssh-add -S`,
    /// or "internal"); only for SSH_AGENTC_ADD_ID_CONSTRAINED.
    pub sk_provider: Option<String>,
    /// associated-certs-v00@openssh.com: certificates for a provider's keys
    /// (`ssh-add -s MODULE cert.pub`, `-C`); only for
    /// SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED.
    pub associated_certs: Option<AssociatedCerts>,
}

/// The associated-certs-v00@openssh.com constraint: `bool certs_only`,
/// `string certsblob` (a sequence of `string certificate`).
#[derive(Debug, Clone, Default)]
pub struct AssociatedCerts {
    /// Load only the certificates, not the provider's plain keys (`ssh-add -C`).
    pub certs_only: bool,
    /// The certificates, each presented with the provider key it certifies.
    pub certificates: Vec<Certificate>,
}

/// One restrict-destination-v00@openssh.com constraint: `string from hop`,
/// `string to hop`, `string reserved`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationConstraint {
    /// Where the request may come from; empty for the origin (this host).
    pub from: Hop,
    /// Where the key may be used.
    pub to: Hop,
}

/// A hop: `string user`, `string hostname`, `string reserved`, then
/// (`string key`, `bool is_ca`) pairs to the end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hop {
    /// A user pattern (`to` only); empty for any user.
    pub username: String,
    /// The host name as the user gave it to `ssh-add -h`; empty for the origin.
    pub hostname: String,
    /// The host's keys (or CA keys) from known_hosts.
    pub keys: Vec<KeySpec>,
}

/// A host key, or a host CA key (a `@cert-authority` line of known_hosts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The key.
    pub key: KeyData,
    /// Whether it is a CA key that signs host certificates.
    pub is_ca: bool,
}

/// Why a frame is not a request this agent understands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame was empty: there is not even a message type.
    #[error("empty message")]
    Empty,
    /// A message type this agent does not implement (SSH1's, or a newer one).
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The message is malformed: a field is missing, too long or invalid, or
    /// a key type or constraint is unknown.
    #[error("malformed message of type {kind}: {reason}")]
    Malformed {
        /// The message type.
        kind: u8,
        /// What is wrong.
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
    let (&kind, mut body) = frame.split_first().ok_or(DecodeError::Empty)?;
    let malformed = |reason: String| DecodeError::Malformed { kind, reason };
    let reader = &mut body;
    let request = match kind {
        id::REQUEST_IDENTITIES => Request::RequestIdentities,
        id::SIGN_REQUEST => Request::Sign {
            key: bytes(reader, "key blob").map_err(malformed)?,
            data: bytes(reader, "data").map_err(malformed)?,
            flags: u32::decode(reader).map_err(|e| malformed(format!("flags: {e}")))?,
        },
        id::ADD_IDENTITY | id::ADD_ID_CONSTRAINED => {
            let key = Box::new(key::decode(reader).map_err(malformed)?);
            let comment = shown_text(reader, "comment").map_err(malformed)?;
            let constraints = if kind == id::ADD_ID_CONSTRAINED {
                constraints(reader, Target::Key).map_err(malformed)?
            } else {
                Constraints::default()
            };
            Request::AddIdentity {
                key,
                comment,
                constraints,
            }
        }
        id::REMOVE_IDENTITY => Request::RemoveIdentity {
            key: bytes(reader, "key blob").map_err(malformed)?,
        },
        id::REMOVE_ALL_IDENTITIES | id::REMOVE_ALL_RSA_IDENTITIES => Request::RemoveAllIdentities,
        id::ADD_SMARTCARD_KEY | id::ADD_SMARTCARD_KEY_CONSTRAINED => {
            let provider = text(reader, "provider").map_err(malformed)?;
            let pin = secret(reader, "PIN").map_err(malformed)?;
            let constraints = if kind == id::ADD_SMARTCARD_KEY_CONSTRAINED {
                constraints(reader, Target::Provider).map_err(malformed)?
            } else {
                Constraints::default()
            };
            Request::AddSmartcardKey {
                provider,
                pin,
                constraints,
            }
        }
        id::REMOVE_SMARTCARD_KEY => {
            let provider = text(reader, "provider").map_err(malformed)?;
            secret(reader, "PIN").map_err(malformed)?;
            Request::RemoveSmartcardKey { provider }
        }
        id::LOCK => Request::Lock(password(reader).map_err(malformed)?),
        id::UNLOCK => Request::Unlock(password(reader).map_err(malformed)?),
        id::EXTENSION => {
            let name = text(reader, "extension name").map_err(malformed)?;
            let contents = std::mem::take(reader).to_vec();
            Request::Extension { name, contents }
        }
        other => return Err(DecodeError::UnknownType(other)),
    };
    if !reader.is_finished() {
        return Err(DecodeError::TrailingBytes {
            kind,
            extra: reader.remaining_len(),
        });
    }
    Ok(request)
}

/// Which add request constraints belong to: some extensions are valid for
/// one only, and are refused on the other ("not valid here" in OpenSSH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// SSH_AGENTC_ADD_ID_CONSTRAINED.
    Key,
    /// SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED.
    Provider,
}

/// OpenSSH's `parse_key_constraints`: constraints to the end of the message.
fn constraints(reader: &mut &[u8], target: Target) -> Result<Constraints, String> {
    let mut out = Constraints::default();
    while !reader.is_finished() {
        let kind = u8::decode(reader).map_err(|e| format!("constraint type: {e}"))?;
        match kind {
            id::CONSTRAIN_LIFETIME => {
                let seconds = u32::decode(reader).map_err(|e| format!("lifetime: {e}"))?;
                if out.lifetime.replace(seconds).is_some() {
                    return Err("lifetime constraint given twice".into());
                }
            }
            id::CONSTRAIN_CONFIRM => {
                if std::mem::replace(&mut out.confirm, true) {
                    return Err("confirm constraint given twice".into());
                }
            }
            id::CONSTRAIN_EXTENSION => constraint_extension(reader, target, &mut out)?,
            other => return Err(format!("unknown constraint {other}")),
        }
    }
    Ok(out)
}

/// OpenSSH's `parse_key_constraint_extension`: `string name`, then contents
/// only the named extension defines, so an unknown one cannot be skipped.
fn constraint_extension(
    reader: &mut &[u8],
    target: Target,
    out: &mut Constraints,
) -> Result<(), String> {
    let name = text(reader, "constraint extension name")?;
    let twice = || format!("constraint {name} given twice");
    let not_here = || format!("constraint {name} is not valid for this request");
    match name.as_str() {
        // `string provider`: a library path, or "internal".
        "sk-provider@openssh.com" => {
            if target != Target::Key {
                return Err(not_here());
            }
            let provider = text(reader, &name)?;
            if out.sk_provider.replace(provider).is_some() {
                return Err(twice());
            }
        }
        // `string constraints`: DestinationConstraint records to its end.
        "restrict-destination-v00@openssh.com" => {
            if out.destinations.is_some() {
                return Err(twice());
            }
            let blob = bytes(reader, &name)?;
            let mut inner = blob.as_slice();
            let mut list = Vec::new();
            while !inner.is_finished() {
                if list.len() >= MAX_DESTINATIONS {
                    return Err(format!(
                        "more than {MAX_DESTINATIONS} destination constraints"
                    ));
                }
                list.push(destination(&mut inner)?);
            }
            out.destinations = Some(list);
        }
        // `bool certs_only`, `string certsblob` of `string certificate`s.
        "associated-certs-v00@openssh.com" => {
            if target != Target::Provider {
                return Err(not_here());
            }
            if out.associated_certs.is_some() {
                return Err(twice());
            }
            let certs_only = u8::decode(reader).map_err(|e| format!("certs_only: {e}"))? != 0;
            let blob = bytes(reader, &name)?;
            let mut inner = blob.as_slice();
            let mut certificates = Vec::new();
            let mut keys = 0;
            while !inner.is_finished() {
                if keys >= MAX_ASSOCIATED_CERTS {
                    return Err(format!(
                        "more than {MAX_ASSOCIATED_CERTS} associated certificates"
                    ));
                }
                keys += 1;
                let key = bytes(&mut inner, "associated certificate")?;
                // ssh-add sends every file it is given; as OpenSSH, plain
                // keys among them are skipped.
                match KeyOrCertificate::decode(&key)
                    .map_err(|e| format!("associated certificate: {e}"))?
                {
                    KeyOrCertificate::Certificate(cert) => certificates.push(*cert),
                    KeyOrCertificate::Plain(_) => {}
                }
            }
            out.associated_certs = Some(AssociatedCerts {
                certs_only,
                certificates,
            });
        }
        other => return Err(format!("unknown constraint {other}")),
    }
    Ok(())
}

/// OpenSSH's `parse_dest_constraint`, with its consistency checks.
fn destination(reader: &mut &[u8]) -> Result<DestinationConstraint, String> {
    let blob = bytes(reader, "destination constraint")?;
    let mut record = blob.as_slice();
    let from = hop(&mut &*bytes(&mut record, "from hop")?)?;
    let to = hop(&mut &*bytes(&mut record, "to hop")?)?;
    reserved(&mut record, "destination constraint")?;
    if !record.is_finished() {
        return Err("trailing bytes in a destination constraint".into());
    }
    if from.hostname.is_empty() != from.keys.is_empty() || !from.username.is_empty() {
        return Err("inconsistent \"from\" hop in a destination constraint".into());
    }
    if to.hostname.is_empty() || to.keys.is_empty() {
        return Err("incomplete \"to\" hop in a destination constraint".into());
    }
    Ok(DestinationConstraint { from, to })
}

/// OpenSSH's `parse_dest_constraint_hop`.
fn hop(reader: &mut &[u8]) -> Result<Hop, String> {
    let username = text(reader, "hop user")?;
    if username.len() > MAX_USER_PATTERN_LEN {
        return Err("user pattern too long in a destination constraint".into());
    }
    let hostname = text(reader, "hop host name")?;
    reserved(reader, "hop")?;
    let mut keys = Vec::new();
    while !reader.is_finished() {
        let key = reader
            .read_prefixed(KeyData::decode)
            .map_err(|e| format!("hop key: {e}"))?;
        let is_ca = u8::decode(reader).map_err(|e| format!("hop key is_ca: {e}"))? != 0;
        keys.push(KeySpec { key, is_ca });
    }
    Ok(Hop {
        username,
        hostname,
        keys,
    })
}

/// A reserved string, which must be empty (OpenSSH: "unsupported extensions").
fn reserved(reader: &mut &[u8], what: &str) -> Result<(), String> {
    if bytes(reader, what)?.is_empty() {
        Ok(())
    } else {
        Err(format!("unsupported extensions in a {what}"))
    }
}

/// A `string` field, copied out (ssh-encoding's own decoding zeroes a new
/// buffer before it copies into it).
fn bytes(reader: &mut &[u8], what: &str) -> Result<Vec<u8>, String> {
    let len = usize::decode(reader).map_err(|e| format!("{what}: {e}"))?;
    let (field, rest) = reader
        .split_at_checked(len)
        .ok_or_else(|| format!("{what}: {}", ssh_encoding::Error::Length))?;
    *reader = rest;
    Ok(field.to_vec())
}

fn text(reader: &mut &[u8], what: &str) -> Result<String, String> {
    String::decode(reader).map_err(|e| format!("{what}: {e}"))
}

/// A string that is only shown to people (a key's comment): OpenSSH takes
/// any bytes, so bytes that are not UTF-8 become U+FFFD rather than a
/// refusal.
fn shown_text(reader: &mut &[u8], what: &str) -> Result<String, String> {
    Ok(String::from_utf8_lossy(&bytes(reader, what)?).into_owned())
}

/// A string that holds a secret: the bytes are wiped once copied out.
fn secret(reader: &mut &[u8], what: &str) -> Result<SecretString, String> {
    let raw = Zeroizing::new(bytes(reader, what)?);
    let text = std::str::from_utf8(&raw).map_err(|_| format!("{what} is not UTF-8"))?;
    Ok(SecretString::from(text.to_owned()))
}

/// A lock password: any bytes, as OpenSSH, wiped once dropped.
fn password(reader: &mut &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    bytes(reader, "passphrase").map(Zeroizing::new)
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
            Self::Failure => vec![id::FAILURE],
            Self::Success => vec![id::SUCCESS],
            Self::ExtensionFailure => vec![id::EXTENSION_FAILURE],
            Self::Identities(identities) => {
                let len: usize = identities
                    .iter()
                    .map(|id| 8 + id.blob.len() + id.comment.len())
                    .sum();
                let mut out = Vec::with_capacity(5 + len);
                out.push(id::IDENTITIES_ANSWER);
                put_u32(&mut out, identities.len());
                for id in identities {
                    push_string(&mut out, id.blob);
                    push_string(&mut out, id.comment.as_bytes());
                }
                out
            }
            Self::Signature(signature) => {
                let mut out = Vec::with_capacity(5 + signature.as_bytes().len());
                out.push(id::SIGN_RESPONSE);
                push_string(&mut out, signature.as_bytes());
                out
            }
            Self::Extension { name, contents } => {
                let mut out = Vec::with_capacity(5 + name.len() + contents.len());
                out.push(id::EXTENSION_RESPONSE);
                push_string(&mut out, name.as_bytes());
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

    /// A constrained add of a provider: `string provider`, `string pin`, then `rest`.
    fn smartcard(rest: &[u8]) -> Vec<u8> {
        let mut frame = vec![id::ADD_SMARTCARD_KEY_CONSTRAINED];
        push_string(&mut frame, b"/usr/lib/p11.so");
        push_string(&mut frame, b"1234");
        frame.extend_from_slice(rest);
        frame
    }

    fn extension(name: &str, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![id::CONSTRAIN_EXTENSION];
        push_string(&mut out, name.as_bytes());
        out.extend_from_slice(contents);
        out
    }

    fn certificate() -> Certificate {
        let ca = ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]);
        let subject = ssh_key::private::Ed25519Keypair::from_seed(&[2; 32]);
        let mut builder = ssh_key::certificate::Builder::new(
            [0; 16],
            KeyData::Ed25519(subject.public),
            0,
            // 2100-01-01: ssh-key's builder refuses "forever".
            4_102_444_800,
        )
        .unwrap();
        builder.valid_principal("alice").unwrap();
        builder.sign(&ssh_key::PrivateKey::from(ca)).unwrap()
    }

    #[test]
    fn associated_certificates_decode_for_providers_only() {
        let cert = certificate();
        let blob = encode_blob(&cert).unwrap();
        let mut certs = Vec::new();
        push_string(&mut certs, &blob);
        // ssh-add sends every file named, plain keys too: skipped, as OpenSSH.
        let plain_key = ssh_key::private::Ed25519Keypair::from_seed(&[4; 32]).public;
        push_string(
            &mut certs,
            &encode_blob(&KeyData::Ed25519(plain_key)).unwrap(),
        );
        push_string(&mut certs, &blob);
        let mut contents = vec![1];
        push_string(&mut contents, &certs);
        let mut rest = vec![id::CONSTRAIN_LIFETIME, 0, 0, 0, 30];
        rest.extend(extension("associated-certs-v00@openssh.com", &contents));
        let Request::AddSmartcardKey {
            provider,
            constraints,
            ..
        } = decode_request(&smartcard(&rest)).unwrap()
        else {
            panic!("not a smartcard add")
        };
        assert_eq!(provider, "/usr/lib/p11.so");
        assert_eq!(constraints.lifetime, Some(30));
        let associated = constraints.associated_certs.unwrap();
        assert!(associated.certs_only);
        assert_eq!(associated.certificates, vec![cert.clone(), cert]);

        // On a key add, OpenSSH says "not valid here".
        let mut key_add = vec![id::ADD_ID_CONSTRAINED];
        push_string(&mut key_add, b"ssh-ed25519");
        let keypair = ssh_key::private::Ed25519Keypair::from_seed(&[3; 32]);
        ssh_encoding::Encode::encode(&keypair, &mut key_add).unwrap();
        push_string(&mut key_add, b"comment");
        let plain = key_add.clone();
        key_add.extend(extension("associated-certs-v00@openssh.com", &contents));
        let err = decode_request(&key_add).unwrap_err().to_string();
        assert!(err.contains("not valid for this request"), "{err}");
        assert!(matches!(
            decode_request(&plain),
            Ok(Request::AddIdentity { .. })
        ));
    }

    #[test]
    fn protocol_1_remove_all_removes_all_as_openssh() {
        assert!(matches!(
            decode_request(&[id::REMOVE_ALL_RSA_IDENTITIES]),
            Ok(Request::RemoveAllIdentities)
        ));
    }

    #[test]
    fn constraints_are_refused_twice_unknown_or_out_of_place() {
        let twice = [id::CONSTRAIN_CONFIRM, id::CONSTRAIN_CONFIRM];
        assert!(decode_request(&smartcard(&twice))
            .unwrap_err()
            .to_string()
            .contains("given twice"));
        let unknown = extension("frobnicate@example.com", b"");
        assert!(decode_request(&smartcard(&unknown))
            .unwrap_err()
            .to_string()
            .contains("unknown constraint frobnicate@example.com"));
        // SSH_AGENT_CONSTRAIN_MAXSIGN (XMSS, gone in OpenSSH 10) is unknown.
        assert!(decode_request(&smartcard(&[3, 0, 0, 0, 1]))
            .unwrap_err()
            .to_string()
            .contains("unknown constraint 3"));
        let mut provider = Vec::new();
        push_string(&mut provider, b"/usr/lib/sk.so");
        let sk = extension("sk-provider@openssh.com", &provider);
        assert!(decode_request(&smartcard(&sk))
            .unwrap_err()
            .to_string()
            .contains("not valid for this request"));
    }

    /// A hop: user, host name, reserved, then keys.
    fn hop(user: &str, host: &str, keys: &[(&KeyData, bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        push_string(&mut out, user.as_bytes());
        push_string(&mut out, host.as_bytes());
        push_string(&mut out, b"");
        for (key, is_ca) in keys {
            push_string(&mut out, &encode_blob(*key).unwrap());
            out.push(u8::from(*is_ca));
        }
        out
    }

    fn destinations(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut list = Vec::new();
        for (from, to) in records {
            let mut record = Vec::new();
            push_string(&mut record, from);
            push_string(&mut record, to);
            push_string(&mut record, b"");
            push_string(&mut list, &record);
        }
        let mut contents = Vec::new();
        push_string(&mut contents, &list);
        smartcard(&extension(
            "restrict-destination-v00@openssh.com",
            &contents,
        ))
    }

    #[test]
    fn destination_constraints_decode_and_are_checked_as_openssh() {
        let host = KeyData::Ed25519(ssh_key::private::Ed25519Keypair::from_seed(&[4; 32]).public);
        let ca = KeyData::Ed25519(ssh_key::private::Ed25519Keypair::from_seed(&[5; 32]).public);
        let frame = destinations(&[(
            hop("", "", &[]),
            hop("carl", "db.internal", &[(&host, false), (&ca, true)]),
        )]);
        let Request::AddSmartcardKey { constraints, .. } = decode_request(&frame).unwrap() else {
            panic!("not a smartcard add")
        };
        let list = constraints.destinations.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].to.username, "carl");
        assert_eq!(list[0].to.hostname, "db.internal");
        assert_eq!(
            list[0].to.keys,
            vec![
                KeySpec {
                    key: host.clone(),
                    is_ca: false
                },
                KeySpec {
                    key: ca,
                    is_ca: true
                }
            ]
        );
        for (from, to, why) in [
            (
                hop("", "", &[]),
                hop("", "", &[(&host, false)]),
                "incomplete",
            ),
            (hop("", "db", &[]), hop("", "", &[]), "inconsistent"),
            (
                hop("u", "", &[]),
                hop("", "db", &[(&host, false)]),
                "inconsistent",
            ),
            (
                hop("", "", &[]),
                hop(&"u".repeat(257), "db", &[(&host, false)]),
                "too long",
            ),
        ] {
            let err = decode_request(&destinations(&[(from, to)])).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
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
