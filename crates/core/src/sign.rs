//! A sign request and the facts known about who asked and for where.

use std::fmt;
use std::path::PathBuf;

use ssh_encoding::Encode;
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, EcdsaCurve, HashAlg, Signature};

use crate::identity::fingerprint;

/// The flags of SSH_AGENTC_SIGN_REQUEST (draft-miller-ssh-agent, section 4.5.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignFlags(u32);

impl SignFlags {
    /// SSH_AGENT_RSA_SHA2_256: an RSA key signs with rsa-sha2-256.
    pub const RSA_SHA2_256: u32 = 0x02;
    /// SSH_AGENT_RSA_SHA2_512: an RSA key signs with rsa-sha2-512.
    pub const RSA_SHA2_512: u32 = 0x04;

    /// Flags as they arrived on the wire; unknown bits are kept and ignored.
    pub fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// The hash an RSA signature uses: SHA-512 wins when both SHA-2 flags are set,
    /// as in OpenSSH; SHA-1 (the legacy "ssh-rsa") only when neither is.
    pub fn rsa_hash(self) -> RsaHash {
        if self.0 & Self::RSA_SHA2_512 != 0 {
            RsaHash::Sha512
        } else if self.0 & Self::RSA_SHA2_256 != 0 {
            RsaHash::Sha256
        } else {
            RsaHash::Sha1
        }
    }
}

/// The digest of an RSA PKCS#1 v1.5 signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaHash {
    /// "ssh-rsa": SHA-1, only for peers that ask for nothing better.
    Sha1,
    /// "rsa-sha2-256".
    Sha256,
    /// "rsa-sha2-512".
    Sha512,
}

impl RsaHash {
    /// The DigestInfo (RFC 8017 section 9.2) of `data` under this hash:
    /// what an RSA PKCS#1 v1.5 signature covers, and what a token that
    /// pads (CKM_RSA_PKCS) or a card that does not (PIV) is given.
    pub fn digest_info(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        // The DER prefixes of RFC 8017 section 9.2, note 1.
        const SHA1: &[u8] = &[
            0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04,
            0x14,
        ];
        const SHA256: &[u8] = &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ];
        const SHA512: &[u8] = &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ];
        let (prefix, digest) = match self {
            Self::Sha1 => (SHA1, sha1::Sha1::digest(data).to_vec()),
            Self::Sha256 => (SHA256, sha2::Sha256::digest(data).to_vec()),
            Self::Sha512 => (SHA512, sha2::Sha512::digest(data).to_vec()),
        };
        let mut info = Vec::with_capacity(prefix.len() + digest.len());
        info.extend_from_slice(prefix);
        info.extend_from_slice(&digest);
        info
    }

    /// The SSH signature algorithm name.
    pub fn algorithm_name(self) -> &'static str {
        match self {
            Self::Sha1 => "ssh-rsa",
            Self::Sha256 => "rsa-sha2-256",
            Self::Sha512 => "rsa-sha2-512",
        }
    }

    /// The `ssh-key` hash for SHA-2 variants; `None` for SHA-1.
    pub fn hash_alg(self) -> Option<HashAlg> {
        match self {
            Self::Sha1 => None,
            Self::Sha256 => Some(HashAlg::Sha256),
            Self::Sha512 => Some(HashAlg::Sha512),
        }
    }
}

/// What to sign, and how.
#[derive(Clone, PartialEq, Eq)]
pub struct SignRequest {
    /// The bytes to sign (for SSH user authentication, the session id and the
    /// SSH_MSG_USERAUTH_REQUEST fields).
    pub data: Vec<u8>,
    /// The request's flags.
    pub flags: SignFlags,
}

impl fmt::Debug for SignRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignRequest")
            .field("data_len", &self.data.len())
            .field("flags", &self.flags)
            .finish()
    }
}

/// The process at the other end of the agent socket, from SO_PEERCRED.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Peer {
    /// Effective uid of the client.
    pub uid: u32,
    /// Process id of the client, when the kernel reports one.
    pub pid: Option<i32>,
    /// The client's executable (`/proc/PID/exe`), when readable.
    pub exe: Option<PathBuf>,
}

impl fmt::Display for Peer {
    /// "ssh (pid 1234)", "pid 1234", or "an unknown process".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .exe
            .as_ref()
            .and_then(|exe| exe.file_name())
            .map(|name| name.to_string_lossy().into_owned());
        match (name, self.pid) {
            (Some(name), Some(pid)) => write!(f, "{name} (pid {pid})"),
            (Some(name), None) => f.write_str(&name),
            (None, Some(pid)) => write!(f, "pid {pid}"),
            (None, None) => f.write_str("an unknown process"),
        }
    }
}

/// Where a signature will be used, learned from session-bind@openssh.com.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The host key the client verified for the server it is talking to.
    pub host_key: KeyData,
    /// The host name, when a destination constraint named it.
    pub hostname: Option<String>,
    /// The user the signature logs in as, when the signed data says so.
    pub user: Option<String>,
}

impl fmt::Display for Destination {
    /// "git@github.com", "github.com", or "the host with key SHA256:...".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.user, &self.hostname) {
            (Some(user), Some(host)) => write!(f, "{user}@{host}"),
            (None, Some(host)) => f.write_str(host),
            (user, None) => {
                if let Some(user) = user {
                    write!(f, "{user}@")?;
                }
                write!(
                    f,
                    "the host with key {}",
                    fingerprint(&self.host_key, HashAlg::Sha256)
                )
            }
        }
    }
}

/// Everything known about a request besides its bytes: who asked and for where.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignContext {
    /// The client process.
    pub peer: Peer,
    /// The host the signature is for, after session-bind@openssh.com.
    pub destination: Option<Destination>,
    /// Whether the connection reached the agent through agent forwarding
    /// (a session bind said so).
    pub forwarded: bool,
}

impl SignContext {
    /// A context for a local client with no session binding.
    pub fn local(peer: Peer) -> Self {
        Self {
            peer,
            destination: None,
            forwarded: false,
        }
    }
}

/// A signature as SSH_AGENT_SIGN_RESPONSE carries it: the encoded signature blob
/// (`string algorithm`, `string signature`, and for sk keys the flags and counter).
///
/// `ssh_key::Signature` cannot hold the legacy SHA-1 "ssh-rsa" form, which an
/// agent must still produce when a client asks for it, hence this type.
#[derive(Clone, PartialEq, Eq)]
pub struct SshSignature {
    blob: Vec<u8>,
}

impl SshSignature {
    /// An RSA PKCS#1 v1.5 signature `raw` made with `hash`.
    pub fn rsa(hash: RsaHash, raw: &[u8]) -> Self {
        let mut blob = Vec::with_capacity(8 + hash.algorithm_name().len() + raw.len());
        push_string(&mut blob, hash.algorithm_name().as_bytes());
        push_string(&mut blob, raw);
        Self { blob }
    }

    /// An ECDSA signature on `curve` from its integers `r` and `s` (big-endian,
    /// unsigned), encoded as RFC 5656 section 3.1.2 asks: two mpints.
    pub fn ecdsa(curve: EcdsaCurve, r: &[u8], s: &[u8]) -> Self {
        let name = Algorithm::Ecdsa { curve };
        let name = name.as_str();
        let inner = mpint_len(r) + mpint_len(s);
        let mut blob = Vec::with_capacity(8 + name.len() + inner);
        push_string(&mut blob, name.as_bytes());
        push_len(&mut blob, inner);
        push_mpint(&mut blob, r);
        push_mpint(&mut blob, s);
        Self { blob }
    }

    /// An ECDSA signature from the fixed-width `r || s` form that PKCS#11
    /// (CKM_ECDSA) and PIV cards return. `None` when the length is odd.
    pub fn ecdsa_fixed(curve: EcdsaCurve, r_and_s: &[u8]) -> Option<Self> {
        if r_and_s.is_empty() || !r_and_s.len().is_multiple_of(2) {
            return None;
        }
        let (r, s) = r_and_s.split_at(r_and_s.len() / 2);
        Some(Self::ecdsa(curve, r, s))
    }

    /// A security-key Ed25519 signature (PROTOCOL.u2f, "SSH U2F signatures"):
    /// the authenticator's 64-byte `signature`, then its `flags` and `counter`.
    pub fn sk_ed25519(signature: &[u8], flags: u8, counter: u32) -> Self {
        let name = Algorithm::SkEd25519.as_str();
        let mut blob = Vec::with_capacity(17 + name.len() + signature.len());
        push_string(&mut blob, name.as_bytes());
        push_string(&mut blob, signature);
        blob.push(flags);
        blob.extend_from_slice(&counter.to_be_bytes());
        Self { blob }
    }

    /// A security-key ECDSA P-256 signature (PROTOCOL.u2f): the integers `r`
    /// and `s` as two mpints in a string, then `flags` and `counter` outside it.
    /// (`ssh_key::Signature` encodes this one with the trailer inside the string.)
    pub fn sk_ecdsa(r: &[u8], s: &[u8], flags: u8, counter: u32) -> Self {
        let name = Algorithm::SkEcdsaSha2NistP256.as_str();
        let inner = mpint_len(r) + mpint_len(s);
        let mut blob = Vec::with_capacity(13 + name.len() + inner);
        push_string(&mut blob, name.as_bytes());
        push_len(&mut blob, inner);
        push_mpint(&mut blob, r);
        push_mpint(&mut blob, s);
        blob.push(flags);
        blob.extend_from_slice(&counter.to_be_bytes());
        Self { blob }
    }

    /// A signature whose body is one string: `string algorithm`, `string
    /// signature` (Ed25519 and the composite ssh-mldsa44-ed25519@openssh.com).
    pub fn plain(algorithm: &str, signature: &[u8]) -> Self {
        let mut blob = Vec::with_capacity(8 + algorithm.len() + signature.len());
        push_string(&mut blob, algorithm.as_bytes());
        push_string(&mut blob, signature);
        Self { blob }
    }

    /// The encoded blob.
    pub fn as_bytes(&self) -> &[u8] {
        &self.blob
    }

    /// The algorithm name the blob starts with.
    pub fn algorithm(&self) -> &str {
        read_string(&mut self.blob.as_slice())
            .and_then(|name| std::str::from_utf8(name).ok())
            .unwrap_or("")
    }
}

impl TryFrom<&Signature> for SshSignature {
    type Error = ssh_key::Error;

    fn try_from(signature: &Signature) -> Result<Self, Self::Error> {
        let mut blob = Vec::new();
        signature.encode(&mut blob)?;
        Ok(Self { blob })
    }
}

impl fmt::Debug for SshSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshSignature")
            .field("algorithm", &self.algorithm())
            .field("len", &self.blob.len())
            .finish()
    }
}

/// The unsigned big-endian `value` as an SSH mpint (RFC 4251 section 5)
/// holds it: without leading zeros, and whether a zero goes first (when the
/// top bit is set).
fn mpint_digits(value: &[u8]) -> (&[u8], bool) {
    let trimmed = match value.iter().position(|b| *b != 0) {
        Some(first) => &value[first..],
        None => &[],
    };
    (trimmed, trimmed.first().is_some_and(|b| b & 0x80 != 0))
}

/// The encoded length of [`push_mpint`]'s mpint, its length prefix included.
fn mpint_len(value: &[u8]) -> usize {
    let (digits, pad) = mpint_digits(value);
    4 + usize::from(pad) + digits.len()
}

/// Appends an SSH mpint of the unsigned big-endian `value`.
fn push_mpint(out: &mut Vec<u8>, value: &[u8]) {
    let (digits, pad) = mpint_digits(value);
    push_len(out, usize::from(pad) + digits.len());
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
}

/// Appends an SSH `string` (RFC 4251 section 5: a u32 length, then the
/// bytes): what [`read_string`] reads.
pub fn push_string(out: &mut Vec<u8>, bytes: &[u8]) {
    push_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Reads an SSH `string` (RFC 4251 section 5: a u32 length, then the
/// bytes) off the front of `buf`; `None` when `buf` is shorter than it says.
pub fn read_string<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = buf.split_first_chunk::<4>()?;
    let (string, rest) = rest.split_at_checked(usize::try_from(u32::from_be_bytes(*len)).ok()?)?;
    *buf = rest;
    Some(string)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    // Lengths here are of signatures, keys, names and messages, far below
    // u32::MAX; one above would saturate, and never wrap to a short length.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_infos_are_der_sequences_ending_in_the_digest() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
            0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
            0xf2, 0x00, 0x15, 0xad,
        ];
        let info = RsaHash::Sha256.digest_info(b"abc");
        assert!(info.ends_with(&abc));
        for (hash, digest_len) in [
            (RsaHash::Sha1, 20),
            (RsaHash::Sha256, 32),
            (RsaHash::Sha512, 64),
        ] {
            let info = hash.digest_info(b"abc");
            // SEQUENCE of the whole; the OCTET STRING's length is the digest's.
            assert_eq!(info[0], 0x30);
            assert_eq!(usize::from(info[1]), info.len() - 2);
            assert_eq!(usize::from(info[info.len() - digest_len - 1]), digest_len);
        }
    }

    #[test]
    fn flags_pick_the_rsa_hash_as_openssh() {
        assert_eq!(SignFlags::from_bits(0).rsa_hash(), RsaHash::Sha1);
        assert_eq!(SignFlags::from_bits(2).rsa_hash(), RsaHash::Sha256);
        assert_eq!(SignFlags::from_bits(4).rsa_hash(), RsaHash::Sha512);
        assert_eq!(SignFlags::from_bits(6).rsa_hash(), RsaHash::Sha512);
    }

    #[test]
    fn ecdsa_fixed_form_becomes_mpints_that_ssh_key_accepts() {
        // r with its high bit set gets a zero byte; s with leading zeros loses them.
        let mut rs = vec![0x80; 32];
        rs.extend(std::iter::repeat_n(0, 31));
        rs.push(7);
        let sig = SshSignature::ecdsa_fixed(EcdsaCurve::NistP256, &rs).unwrap();
        assert_eq!(sig.algorithm(), "ecdsa-sha2-nistp256");
        let parsed = Signature::try_from(sig.as_bytes()).unwrap();
        let inner = parsed.as_bytes();
        assert_eq!(&inner[..5], &[0, 0, 0, 33, 0]);
        assert_eq!(&inner[inner.len() - 5..], &[0, 0, 0, 1, 7]);
        assert!(SshSignature::ecdsa_fixed(EcdsaCurve::NistP256, &[1, 2, 3]).is_none());
    }

    #[test]
    fn strings_are_read_off_the_front_or_not_at_all() {
        let mut buf: &[u8] = &[0, 0, 0, 2, b'h', b'i', 0, 0, 0, 0, 7];
        assert_eq!(read_string(&mut buf), Some(&b"hi"[..]));
        assert_eq!(read_string(&mut buf), Some(&b""[..]));
        assert_eq!(buf, [7]);
        for short in [&[0, 0, 0][..], &[0, 0, 0, 3, b'a', b'b']] {
            let mut rest = short;
            assert_eq!(read_string(&mut rest), None);
            assert_eq!(rest, short, "a failed read consumes nothing");
        }
    }

    #[test]
    fn sha1_rsa_signature_is_encoded_as_ssh_rsa() {
        let sig = SshSignature::rsa(RsaHash::Sha1, &[1, 2, 3]);
        assert_eq!(sig.algorithm(), "ssh-rsa");
        assert_eq!(
            sig.as_bytes(),
            &[0, 0, 0, 7, b's', b's', b'h', b'-', b'r', b's', b'a', 0, 0, 0, 3, 1, 2, 3]
        );
    }
}
