//! OpenSSH 10.4 added a composite signature key type that signs every message
//! twice, with ML-DSA-44 (FIPS 204) and with Ed25519 (RFC 8032), so that a
//! signature stays unforgeable as long as either half does. The construction
//! is draft-miller-sshm-mldsa44-ed25519-composite-sigs-00, which profiles the
//! `MLDSA44-Ed25519-SHA512` combination of draft-ietf-lamps-pq-composite-sigs
//! (OpenSSH implements revision 18, in `ssh-mldsa-eddsa.c`).
//!
//! # Keys
//!
//! | part        | layout                                    | bytes            |
//! |-------------|-------------------------------------------|------------------|
//! | public key  | ML-DSA-44 public key ‖ Ed25519 public key | 1312 + 32 = 1344 |
//! | private key | ML-DSA-44 seed ξ ‖ Ed25519 seed           | 32 + 32 = 64     |
//! | signature   | ML-DSA-44 signature ‖ Ed25519 signature   | 2420 + 64 = 2484 |
//!
//! The ML-DSA-44 key pair is expanded from ξ with `ML-DSA.KeyGen_internal`
//! (FIPS 204 Algorithm 6), the Ed25519 one from its seed as RFC 8032 §5.1.5
//! says. [`Keypair`](crate::mldsa::Keypair) does both once, when the key is
//! added, and keeps the expanded keys for every later signature.
//!
//! On the SSH wire (OpenSSH's `sshkey` serialization) the public key blob is
//! `string "ssh-mldsa44-ed25519@openssh.com"`, `string pk`; the private part
//! an `ssh-add` sends in `SSH2_AGENTC_ADD_IDENTITY`, and that an unencrypted
//! key file holds, is `string pk`, `string sk` after the key type name. For a
//! certificate (`ssh-mldsa44-ed25519-cert-v01@openssh.com`,
//! [`CERT_ALGORITHM`](crate::mldsa::CERT_ALGORITHM)) the certificate takes
//! the place of the key type and `pk`, and only `string sk` follows: use
//! [`Keypair::from_private`](crate::mldsa::Keypair::from_private) and compare
//! its public key with the certified one.
//!
//! # Signatures
//!
//! For a message `M`, both halves sign the same representative
//!
//! ```text
//! M' = "CompositeAlgorithmSignatures2025" || "COMPSIG-MLDSA44-Ed25519-SHA512"
//!      || u8 len(ctx) || ctx || SHA-512(M)
//! ```
//!
//! with an empty `ctx`: OpenSSH never passes one. ML-DSA-44 signs `M'` with
//! the hedged `ML-DSA.Sign` of FIPS 204 Algorithm 2 (fresh randomness per
//! signature, as OpenSSH does) and the label `COMPSIG-MLDSA44-Ed25519-SHA512`
//! as its context string; Ed25519 signs `M'` as plain PureEdDSA, not Ed25519ph
//! and not Ed25519ctx. The SSH signature blob is `string
//! "ssh-mldsa44-ed25519@openssh.com"`, `string (mldsaSig || ed25519Sig)`.
//!
//! # Example
//!
//! ```
//! # fn demo(pk: &[u8], sk: &[u8]) -> Result<(), token_agent_server::mldsa::Error> {
//! use token_agent_server::mldsa::{self, Keypair};
//!
//! let key = Keypair::from_openssh(pk, sk)?;
//! let blob = key.sign(b"session data")?;
//! mldsa::verify(key.public(), b"session data", &blob)?;
//! # Ok(())
//! # }
//! ```

use std::fmt;

use ed25519_dalek::{Signer as _, Verifier as _};
use ml_dsa::common::getrandom::SysRng;
use ml_dsa::{EncodedVerifyingKey, ExpandedSigningKey, MlDsa44, Seed, Signature, VerifyingKey};
use sha2::{Digest, Sha512};
use token_agent_core::{push_string, read_string};
use zeroize::Zeroizing;

/// The SSH key type and signature algorithm name.
pub const ALGORITHM: &str = "ssh-mldsa44-ed25519@openssh.com";

/// The certificate key type OpenSSH 10.5 defines for these keys. Its
/// signatures are those of [`ALGORITHM`]: OpenSSH has no separate
/// certificate signature algorithm name.
pub const CERT_ALGORITHM: &str = "ssh-mldsa44-ed25519-cert-v01@openssh.com";

/// Bytes in an ML-DSA-44 public key (FIPS 204 Table 2).
pub const MLDSA44_PUBLIC_KEY_LEN: usize = 1312;
/// Bytes in an ML-DSA-44 signature (FIPS 204 Table 2).
pub const MLDSA44_SIGNATURE_LEN: usize = 2420;
/// Bytes in the ML-DSA-44 seed ξ that the key pair is expanded from.
pub const MLDSA44_SEED_LEN: usize = 32;
/// Bytes in an Ed25519 public key (RFC 8032 §5.1.5).
pub const ED25519_PUBLIC_KEY_LEN: usize = 32;
/// Bytes in an Ed25519 signature (RFC 8032 §5.1.6).
pub const ED25519_SIGNATURE_LEN: usize = 64;
/// Bytes in an Ed25519 private key seed (RFC 8032 §5.1.5).
pub const ED25519_SEED_LEN: usize = 32;
/// Bytes in the composite public key: ML-DSA-44 public key ‖ Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = MLDSA44_PUBLIC_KEY_LEN + ED25519_PUBLIC_KEY_LEN;
/// Bytes in the composite private key: ML-DSA-44 seed ‖ Ed25519 seed.
pub const PRIVATE_KEY_LEN: usize = MLDSA44_SEED_LEN + ED25519_SEED_LEN;
/// Bytes in the raw composite signature: ML-DSA-44 signature ‖ Ed25519 signature.
pub const SIGNATURE_LEN: usize = MLDSA44_SIGNATURE_LEN + ED25519_SIGNATURE_LEN;

/// The `Prefix` of every composite message representative
/// (draft-ietf-lamps-pq-composite-sigs; OpenSSH `COMPOSITE_PREFIX`).
pub const COMPOSITE_PREFIX: &[u8] = b"CompositeAlgorithmSignatures2025";
/// The `Label` of MLDSA44-Ed25519-SHA512 (draft-ietf-lamps-pq-composite-sigs;
/// OpenSSH `COMPOSITE_LABEL`): part of the message representative, and the
/// ML-DSA-44 context string.
pub const COMPOSITE_LABEL: &[u8] = b"COMPSIG-MLDSA44-Ed25519-SHA512";

/// What can go wrong parsing, using or checking these keys and signatures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The public key is not 1344 bytes: a truncated or corrupted key blob,
    /// or a key of another type sent under this type's name.
    #[error("an {ALGORITHM} public key is {PUBLIC_KEY_LEN} bytes, not {len}")]
    PublicKeyLength {
        /// The length received.
        len: usize,
    },
    /// The private key is not 64 bytes (two 32-byte seeds): a corrupted key
    /// file or `ssh-add` request, or an expanded ML-DSA secret key (2560
    /// bytes) where OpenSSH stores only the seed.
    #[error("an {ALGORITHM} private key is {PRIVATE_KEY_LEN} bytes of seeds, not {len}")]
    PrivateKeyLength {
        /// The length received.
        len: usize,
    },
    /// The public key derived from the private seeds differs from the public
    /// key sent with them: the two halves of the request come from different
    /// keys, or one of them is corrupted.
    #[error("the {ALGORITHM} public key does not belong to its private key ({half} half differs)")]
    PublicKeyMismatch {
        /// Which half differs first: "ML-DSA-44" or "Ed25519".
        half: &'static str,
    },
    /// A public key blob is not `string "ssh-mldsa44-ed25519@openssh.com"`,
    /// `string pk` with nothing after it.
    #[error("malformed {ALGORITHM} public key blob")]
    MalformedKeyBlob,
    /// A signature blob is not `string algorithm`, `string signature` with
    /// nothing after it: truncated or padded in transit.
    #[error("malformed SSH signature blob")]
    MalformedSignature,
    /// The signature blob names another algorithm: the signer used another
    /// key, or a caller sent the signature to the wrong verifier.
    #[error("the signature is {found:?}, not {ALGORITHM}")]
    WrongAlgorithm {
        /// The algorithm name in the blob (lossy UTF-8).
        found: String,
    },
    /// The raw composite signature is not 2484 bytes.
    #[error("an {ALGORITHM} signature is {SIGNATURE_LEN} bytes, not {len}")]
    SignatureLength {
        /// The length received.
        len: usize,
    },
    /// One half of the signature does not verify: the message, the key or
    /// the signature differs from the one that was signed.
    #[error("the {half} half of the {ALGORITHM} signature does not verify")]
    BadSignature {
        /// Which half failed: "ML-DSA-44" or "Ed25519".
        half: &'static str,
    },
    /// ML-DSA-44 signing failed: the operating system's random number
    /// generator failed (`getrandom`), or, with negligible probability,
    /// rejection sampling ran out of attempts. Trying again may succeed.
    #[error("ML-DSA-44 signing failed (system random number generator unavailable?)")]
    Signing,
}

/// A composite public key: the 1312-byte ML-DSA-44 public key followed by
/// the 32-byte Ed25519 one, as OpenSSH's `string pk` holds them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    bytes: Box<[u8; PUBLIC_KEY_LEN]>,
}

impl PublicKey {
    /// The key from its 1344 raw bytes (the contents of OpenSSH's `string pk`).
    ///
    /// Like OpenSSH, this checks only the length: every 1312-byte string is
    /// an ML-DSA-44 public key, and an Ed25519 half that is not a curve
    /// point makes every signature fail to verify.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let bytes: [u8; PUBLIC_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| Error::PublicKeyLength { len: bytes.len() })?;
        Ok(Self {
            bytes: Box::new(bytes),
        })
    }

    /// The key from its SSH public key blob: `string
    /// "ssh-mldsa44-ed25519@openssh.com"`, `string pk` (RFC 4253 §6.6).
    pub fn from_key_blob(blob: &[u8]) -> Result<Self, Error> {
        let mut rest = blob;
        let name = read_string(&mut rest).ok_or(Error::MalformedKeyBlob)?;
        let pk = read_string(&mut rest).ok_or(Error::MalformedKeyBlob)?;
        if name != ALGORITHM.as_bytes() || !rest.is_empty() {
            return Err(Error::MalformedKeyBlob);
        }
        Self::from_bytes(pk)
    }

    /// The 1344 raw bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.bytes
    }

    /// The SSH public key blob, as `SSH2_AGENT_IDENTITIES_ANSWER` lists it
    /// and `.pub` files carry it in base64.
    pub fn key_blob(&self) -> Vec<u8> {
        let mut blob = Vec::with_capacity(8 + ALGORITHM.len() + PUBLIC_KEY_LEN);
        push_string(&mut blob, ALGORITHM.as_bytes());
        push_string(&mut blob, &self.bytes[..]);
        blob
    }

    fn mldsa(&self) -> &[u8] {
        &self.bytes[..MLDSA44_PUBLIC_KEY_LEN]
    }

    fn ed25519(&self) -> &[u8] {
        &self.bytes[MLDSA44_PUBLIC_KEY_LEN..]
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 1344 bytes are too many to print; the Ed25519 half tells keys apart.
        write!(f, "PublicKey({ALGORITHM}, ed25519 ")?;
        for byte in self.ed25519() {
            write!(f, "{byte:02x}")?;
        }
        write!(f, ")")
    }
}

/// A composite private key, ready to sign.
///
/// It holds the 64 bytes of seeds (zeroized on drop) and both expanded
/// signing keys, so a signature costs only the two signing operations. The
/// expanded keys zeroize themselves on drop too (`ml-dsa`'s `zeroize`
/// feature, `ed25519-dalek`'s `zeroize` feature).
#[derive(Clone)]
pub struct Keypair {
    /// The ML-DSA-44 seed ξ and the Ed25519 seed.
    seeds: Zeroizing<[[u8; 32]; 2]>,
    public: PublicKey,
    // About 24 KiB with the precomputed NTT forms: boxed so that moving a
    // Keypair moves a pointer.
    mldsa: Box<ExpandedSigningKey<MlDsa44>>,
    ed25519: ed25519_dalek::SigningKey,
}

impl Keypair {
    /// The key from OpenSSH's wire parts: `pk` and `sk`, the two strings
    /// after the key type name in `SSH2_AGENTC_ADD_IDENTITY` and in the
    /// private section of an openssh-key-v1 file.
    ///
    /// Checks both lengths and that the key pair expanded from `sk` has the
    /// public key `pk`.
    pub fn from_openssh(pk: &[u8], sk: &[u8]) -> Result<Self, Error> {
        let claimed = PublicKey::from_bytes(pk)?;
        let keypair = Self::from_private(sk)?;
        if keypair.public.mldsa() != claimed.mldsa() {
            return Err(Error::PublicKeyMismatch { half: "ML-DSA-44" });
        }
        if keypair.public.ed25519() != claimed.ed25519() {
            return Err(Error::PublicKeyMismatch { half: "Ed25519" });
        }
        Ok(keypair)
    }

    /// The key from its 64 private bytes alone (ML-DSA-44 seed ξ ‖ Ed25519
    /// seed), deriving the public key. For certificates, whose private part
    /// carries no `pk`.
    pub fn from_private(sk: &[u8]) -> Result<Self, Error> {
        let seeds: &[u8; PRIVATE_KEY_LEN] = sk
            .try_into()
            .map_err(|_| Error::PrivateKeyLength { len: sk.len() })?;
        Ok(Self::from_seeds(seeds))
    }

    /// The key from its 64 private bytes: ML-DSA-44 seed ξ ‖ Ed25519 seed.
    pub fn from_seeds(seeds: &[u8; PRIVATE_KEY_LEN]) -> Self {
        let mut split = Zeroizing::new([[0u8; 32]; 2]);
        split.as_flattened_mut().copy_from_slice(seeds);
        let [mldsa_seed, ed25519_seed] = &*split;

        let xi: Zeroizing<Seed> = Zeroizing::new(Seed::from(*mldsa_seed));
        // ML-DSA.KeyGen_internal(ξ), FIPS 204 Algorithm 6.
        let mldsa = Box::new(ExpandedSigningKey::<MlDsa44>::from_seed(&xi));
        // Recomputes t = A·s1 + s2 from the expanded key (it reuses the
        // matrix A): cheaper than a second key generation.
        let mldsa_public = mldsa.verifying_key().encode();
        let ed25519 = ed25519_dalek::SigningKey::from_bytes(ed25519_seed);

        let mut public = [0u8; PUBLIC_KEY_LEN];
        public[..MLDSA44_PUBLIC_KEY_LEN].copy_from_slice(&mldsa_public);
        public[MLDSA44_PUBLIC_KEY_LEN..].copy_from_slice(ed25519.verifying_key().as_bytes());

        Self {
            seeds: split,
            public: PublicKey {
                bytes: Box::new(public),
            },
            mldsa,
            ed25519,
        }
    }

    /// The public key.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The private part as OpenSSH serializes it after the key type name:
    /// `string pk`, `string sk`.
    pub fn to_openssh_private(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(8 + PUBLIC_KEY_LEN + PRIVATE_KEY_LEN));
        push_string(&mut out, &self.public.bytes[..]);
        push_string(&mut out, self.seeds.as_flattened());
        out
    }

    /// Signs `msg` and returns the SSH signature blob: `string
    /// "ssh-mldsa44-ed25519@openssh.com"`, `string signature`, as an agent
    /// puts it in `SSH2_AGENT_SIGN_RESPONSE` (OpenSSH `ssh_mldsa44_ed25519_sign`).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let raw = self.sign_raw(msg)?;
        let mut blob = Vec::with_capacity(8 + ALGORITHM.len() + SIGNATURE_LEN);
        push_string(&mut blob, ALGORITHM.as_bytes());
        push_string(&mut blob, &raw[..]);
        Ok(blob)
    }

    /// Signs `msg` and returns the raw 2484-byte composite signature:
    /// ML-DSA-44 signature ‖ Ed25519 signature, both over `M'` (OpenSSH
    /// `crypto_sign_mldsa44_ed25519_sign` with an empty context).
    pub fn sign_raw(&self, msg: &[u8]) -> Result<[u8; SIGNATURE_LEN], Error> {
        let m_prime = message_representative(msg);
        // Hedged ML-DSA.Sign (FIPS 204 Algorithm 2): 32 fresh random bytes
        // per signature, the label as context, as OpenSSH's libcrux call.
        let mldsa = self
            .mldsa
            .sign_randomized(&m_prime, COMPOSITE_LABEL, &mut SysRng)
            .map_err(|_| Error::Signing)?
            .encode();
        // Plain Ed25519 (RFC 8032 PureEdDSA) over M', like OpenSSH's
        // crypto_sign_ed25519.
        let ed25519 = self.ed25519.sign(&m_prime).to_bytes();

        let mut raw = [0u8; SIGNATURE_LEN];
        raw[..MLDSA44_SIGNATURE_LEN].copy_from_slice(&mldsa);
        raw[MLDSA44_SIGNATURE_LEN..].copy_from_slice(&ed25519);
        Ok(raw)
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Checks an SSH signature blob (`string algorithm`, `string signature`) on
/// `msg` by `public`, as OpenSSH's `ssh_mldsa44_ed25519_verify` does: the
/// algorithm must be [`ALGORITHM`], nothing may follow the signature, and
/// both halves must verify.
pub fn verify(public: &PublicKey, msg: &[u8], signature: &[u8]) -> Result<(), Error> {
    let mut rest = signature;
    let name = read_string(&mut rest).ok_or(Error::MalformedSignature)?;
    let raw = read_string(&mut rest).ok_or(Error::MalformedSignature)?;
    if name != ALGORITHM.as_bytes() {
        return Err(Error::WrongAlgorithm {
            found: String::from_utf8_lossy(name).into_owned(),
        });
    }
    if !rest.is_empty() {
        return Err(Error::MalformedSignature);
    }
    verify_raw(public, msg, raw)
}

/// Checks a raw 2484-byte composite signature on `msg` by `public`
/// (OpenSSH `crypto_sign_mldsa44_ed25519_verify` with an empty context).
pub fn verify_raw(public: &PublicKey, msg: &[u8], signature: &[u8]) -> Result<(), Error> {
    if signature.len() != SIGNATURE_LEN {
        return Err(Error::SignatureLength {
            len: signature.len(),
        });
    }
    let (mldsa_sig, ed25519_sig) = signature.split_at(MLDSA44_SIGNATURE_LEN);
    let m_prime = message_representative(msg);

    // A PublicKey always has the right lengths; these conversions only
    // restate that for the types.
    let wrong_length = |_| Error::PublicKeyLength {
        len: public.bytes.len(),
    };
    let mldsa_key = EncodedVerifyingKey::<MlDsa44>::try_from(public.mldsa())
        .map(|encoded| VerifyingKey::<MlDsa44>::decode(&encoded))
        .map_err(wrong_length)?;
    let ed25519_key: &[u8; ED25519_PUBLIC_KEY_LEN] =
        public.ed25519().try_into().map_err(wrong_length)?;

    let mldsa_bad = || Error::BadSignature { half: "ML-DSA-44" };
    // An undecodable signature (bad hint encoding) is as bad as a wrong one.
    let mldsa_sig = Signature::<MlDsa44>::try_from(mldsa_sig).map_err(|_| mldsa_bad())?;
    if !mldsa_key.verify_with_context(&m_prime, COMPOSITE_LABEL, &mldsa_sig) {
        return Err(mldsa_bad());
    }

    let ed25519_bad = || Error::BadSignature { half: "Ed25519" };
    let ed25519_key =
        ed25519_dalek::VerifyingKey::from_bytes(ed25519_key).map_err(|_| ed25519_bad())?;
    // OpenSSH's ref10 verifier refuses the neutral point as a key; refusing
    // all eight small-order points loses no honest key.
    if ed25519_key.is_weak() {
        return Err(ed25519_bad());
    }
    let ed25519_sig =
        ed25519_dalek::Signature::from_slice(ed25519_sig).map_err(|_| ed25519_bad())?;
    // Cofactorless, S < L required: the same equation as OpenSSH's
    // crypto_sign_ed25519_open.
    ed25519_key
        .verify(&m_prime, &ed25519_sig)
        .map_err(|_| ed25519_bad())
}

/// `M'` of draft-ietf-lamps-pq-composite-sigs' `Composite-ML-DSA.Sign` with
/// an empty context: Prefix ‖ Label ‖ 0x00 ‖ SHA-512(msg) (OpenSSH
/// `construct_m_prime`).
fn message_representative(msg: &[u8]) -> Vec<u8> {
    let mut m_prime = Vec::with_capacity(COMPOSITE_PREFIX.len() + COMPOSITE_LABEL.len() + 1 + 64);
    m_prime.extend_from_slice(COMPOSITE_PREFIX);
    m_prime.extend_from_slice(COMPOSITE_LABEL);
    m_prime.push(0); // len(ctx): OpenSSH signs with an empty context.
    m_prime.extend_from_slice(&Sha512::digest(msg));
    m_prime
}

#[cfg(test)]
mod tests {
    use ssh_key::private::KeypairData;
    use ssh_key::{HashAlg, PrivateKey, SshSig};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const KEY: &str = include_str!("../tests/fixtures/mldsa/id_mldsa44_ed25519");
    const PUB: &str = include_str!("../tests/fixtures/mldsa/id_mldsa44_ed25519.pub");
    const MESSAGE: &[u8] = include_bytes!("../tests/fixtures/mldsa/message.txt");
    const SIG: &str = include_str!("../tests/fixtures/mldsa/message.txt.sig");

    /// The fixture's `string pk` and `string sk`, read by ssh-key, which keeps
    /// key types it does not know as opaque bytes.
    fn fixture_parts() -> Result<(Vec<u8>, Vec<u8>), Box<dyn std::error::Error>> {
        let key = PrivateKey::from_openssh(KEY)?;
        assert_eq!(key.algorithm().as_str(), ALGORITHM);
        let KeypairData::Other(opaque) = key.key_data() else {
            return Err("ssh-key decoded the fixture as a known key type".into());
        };
        Ok((
            opaque.public.key.as_ref().to_vec(),
            opaque.private.as_ref().to_vec(),
        ))
    }

    fn fixture_keypair() -> Result<Keypair, Box<dyn std::error::Error>> {
        let (pk, sk) = fixture_parts()?;
        Ok(Keypair::from_openssh(&pk, &sk)?)
    }

    fn pub_file_blob() -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        Ok(ssh_key::PublicKey::from_openssh(PUB)?.to_bytes()?)
    }

    /// The data an sshsig signs (PROTOCOL.sshsig §3): "SSHSIG", string
    /// namespace, string reserved, string hash_algorithm, string H(message).
    fn sshsig_signed_data(namespace: &str, msg: &[u8]) -> Vec<u8> {
        let mut data = b"SSHSIG".to_vec();
        push_string(&mut data, namespace.as_bytes());
        push_string(&mut data, b"");
        push_string(&mut data, b"sha512");
        push_string(&mut data, &Sha512::digest(msg));
        data
    }

    /// OpenSSH's signature blob from the fixture's armored sshsig.
    fn openssh_signature() -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let sig = SshSig::from_pem(SIG)?;
        assert_eq!(sig.namespace(), "file");
        assert_eq!(sig.hash_alg(), HashAlg::Sha512);
        assert_eq!(sig.algorithm().as_str(), ALGORITHM);
        let mut blob = Vec::new();
        push_string(&mut blob, sig.algorithm().as_str().as_bytes());
        push_string(&mut blob, sig.signature_bytes());
        Ok(blob)
    }

    #[test]
    fn fixture_private_key_derives_its_public_key() -> TestResult {
        let (pk, sk) = fixture_parts()?;
        assert_eq!((pk.len(), sk.len()), (PUBLIC_KEY_LEN, PRIVATE_KEY_LEN));
        let key = Keypair::from_openssh(&pk, &sk)?;
        // The derivation from the seeds alone is what OpenSSH (libcrux
        // ML-DSA, ref10 Ed25519) derived when it generated the key.
        let derived = Keypair::from_private(&sk)?;
        assert_eq!(derived.public().as_bytes()[..], pk[..]);
        assert_eq!(key.public().key_blob(), pub_file_blob()?);
        assert_eq!(PublicKey::from_key_blob(&pub_file_blob()?)?, *key.public());

        let mut expected = Vec::new();
        push_string(&mut expected, &pk);
        push_string(&mut expected, &sk);
        assert_eq!(key.to_openssh_private()[..], expected[..]);
        Ok(())
    }

    #[test]
    fn openssh_sshsig_verifies_and_a_tampered_message_does_not() -> TestResult {
        let public = PublicKey::from_key_blob(&pub_file_blob()?)?;
        let blob = openssh_signature()?;
        verify(&public, &sshsig_signed_data("file", MESSAGE), &blob)?;

        let mut tampered = MESSAGE.to_vec();
        tampered[0] ^= 1;
        let err = verify(&public, &sshsig_signed_data("file", &tampered), &blob);
        assert!(
            matches!(err, Err(Error::BadSignature { half: "ML-DSA-44" })),
            "{err:?}"
        );
        let err = verify(&public, &sshsig_signed_data("email", MESSAGE), &blob);
        assert!(matches!(err, Err(Error::BadSignature { .. })), "{err:?}");
        Ok(())
    }

    #[test]
    fn each_half_of_openssh_signature_is_checked() -> TestResult {
        let public = PublicKey::from_key_blob(&pub_file_blob()?)?;
        let data = sshsig_signed_data("file", MESSAGE);
        let blob = openssh_signature()?;
        let raw_start = blob.len() - SIGNATURE_LEN;

        let mut bad_mldsa = blob.clone();
        bad_mldsa[raw_start + 100] ^= 0x01;
        let err = verify(&public, &data, &bad_mldsa);
        assert!(
            matches!(err, Err(Error::BadSignature { half: "ML-DSA-44" })),
            "{err:?}"
        );

        let mut bad_ed25519 = blob.clone();
        bad_ed25519[raw_start + MLDSA44_SIGNATURE_LEN + 5] ^= 0x01;
        let err = verify(&public, &data, &bad_ed25519);
        assert!(
            matches!(err, Err(Error::BadSignature { half: "Ed25519" })),
            "{err:?}"
        );
        Ok(())
    }

    /// Checks OpenSSH's signature half by half against M' written out from
    /// ssh-mldsa-eddsa.c, with the two underlying crates directly: plain
    /// Ed25519 (not Ed25519ph or Ed25519ctx), ML-DSA-44 with the label as its
    /// context.
    #[test]
    fn openssh_halves_are_plain_ed25519_and_mldsa_with_label_context() -> TestResult {
        let public = PublicKey::from_key_blob(&pub_file_blob()?)?;
        let blob = openssh_signature()?;
        let raw = &blob[blob.len() - SIGNATURE_LEN..];

        let mut m_prime =
            b"CompositeAlgorithmSignatures2025COMPSIG-MLDSA44-Ed25519-SHA512\x00".to_vec();
        m_prime.extend_from_slice(&Sha512::digest(sshsig_signed_data("file", MESSAGE)));
        assert_eq!(m_prime.len(), 127);
        assert_eq!(
            m_prime,
            message_representative(&sshsig_signed_data("file", MESSAGE))
        );

        let ed_key = ed25519_dalek::VerifyingKey::from_bytes(public.ed25519().try_into()?)?;
        let ed_sig = ed25519_dalek::Signature::from_slice(&raw[MLDSA44_SIGNATURE_LEN..])?;
        ed_key.verify_strict(&m_prime, &ed_sig)?;

        let ml_key = VerifyingKey::<MlDsa44>::decode(&public.mldsa().try_into()?);
        let ml_sig = Signature::<MlDsa44>::try_from(&raw[..MLDSA44_SIGNATURE_LEN])?;
        assert!(ml_key.verify_with_context(&m_prime, COMPOSITE_LABEL, &ml_sig));
        assert!(!ml_key.verify_with_context(&m_prime, b"", &ml_sig));
        Ok(())
    }

    #[test]
    fn our_signature_verifies_and_is_hedged() -> TestResult {
        let key = fixture_keypair()?;
        let msg = b"a session identifier and a userauth request";
        let first = key.sign(msg)?;
        let second = key.sign(msg)?;
        verify(key.public(), msg, &first)?;
        verify(key.public(), msg, &second)?;
        assert_eq!(first.len(), 4 + ALGORITHM.len() + 4 + SIGNATURE_LEN);
        assert_eq!(&first[4..4 + ALGORITHM.len()], ALGORITHM.as_bytes());

        // ML-DSA signs with fresh randomness; Ed25519 is deterministic.
        let (ml1, ed1) = first[first.len() - SIGNATURE_LEN..].split_at(MLDSA44_SIGNATURE_LEN);
        let (ml2, ed2) = second[second.len() - SIGNATURE_LEN..].split_at(MLDSA44_SIGNATURE_LEN);
        assert_ne!(ml1, ml2);
        assert_eq!(ed1, ed2);

        let raw = key.sign_raw(msg)?;
        verify_raw(key.public(), msg, &raw)?;
        assert!(verify_raw(key.public(), b"another message", &raw).is_err());
        Ok(())
    }

    #[test]
    fn wrong_sizes_are_refused() -> TestResult {
        let (pk, sk) = fixture_parts()?;
        let err = Keypair::from_openssh(&pk[..PUBLIC_KEY_LEN - 1], &sk);
        assert!(
            matches!(err, Err(Error::PublicKeyLength { len: 1343 })),
            "{err:?}"
        );
        let err = Keypair::from_openssh(&[pk.as_slice(), &[0]].concat(), &sk);
        assert!(
            matches!(err, Err(Error::PublicKeyLength { len: 1345 })),
            "{err:?}"
        );
        let err = Keypair::from_openssh(&pk, &sk[..32]);
        assert!(
            matches!(err, Err(Error::PrivateKeyLength { len: 32 })),
            "{err:?}"
        );
        // OpenSSH's own secret key (2560 bytes) is not what the format holds.
        let err = Keypair::from_private(&[0u8; 2560 + 32]);
        assert!(
            matches!(err, Err(Error::PrivateKeyLength { len: 2592 })),
            "{err:?}"
        );

        let key = Keypair::from_openssh(&pk, &sk)?;
        let blob = key.sign(MESSAGE)?;
        let err = verify_raw(
            key.public(),
            MESSAGE,
            &blob[blob.len() - SIGNATURE_LEN + 1..],
        );
        assert!(
            matches!(err, Err(Error::SignatureLength { len: 2483 })),
            "{err:?}"
        );

        let mut trailing = blob.clone();
        trailing.push(0);
        let err = verify(key.public(), MESSAGE, &trailing);
        assert!(matches!(err, Err(Error::MalformedSignature)), "{err:?}");
        let err = verify(key.public(), MESSAGE, &blob[..blob.len() - 1]);
        assert!(matches!(err, Err(Error::MalformedSignature)), "{err:?}");

        let mut short_sig = Vec::new();
        push_string(&mut short_sig, ALGORITHM.as_bytes());
        push_string(&mut short_sig, &blob[blob.len() - SIGNATURE_LEN..][..100]);
        let err = verify(key.public(), MESSAGE, &short_sig);
        assert!(
            matches!(err, Err(Error::SignatureLength { len: 100 })),
            "{err:?}"
        );

        let mut other = Vec::new();
        push_string(&mut other, b"ssh-ed25519");
        push_string(&mut other, &[0; 64]);
        let err = verify(key.public(), MESSAGE, &other);
        assert!(
            matches!(&err, Err(Error::WrongAlgorithm { found }) if found == "ssh-ed25519"),
            "{err:?}"
        );

        let mut blob = key.public().key_blob();
        blob.push(0);
        let err = PublicKey::from_key_blob(&blob);
        assert!(matches!(err, Err(Error::MalformedKeyBlob)), "{err:?}");
        Ok(())
    }

    #[test]
    fn public_key_not_matching_the_seeds_is_refused() -> TestResult {
        let (pk, sk) = fixture_parts()?;

        let mut wrong_mldsa = pk.clone();
        wrong_mldsa[700] ^= 0x80;
        let err = Keypair::from_openssh(&wrong_mldsa, &sk);
        assert!(
            matches!(err, Err(Error::PublicKeyMismatch { half: "ML-DSA-44" })),
            "{err:?}"
        );

        let mut wrong_ed25519 = pk.clone();
        wrong_ed25519[PUBLIC_KEY_LEN - 1] ^= 0x01;
        let err = Keypair::from_openssh(&wrong_ed25519, &sk);
        assert!(
            matches!(err, Err(Error::PublicKeyMismatch { half: "Ed25519" })),
            "{err:?}"
        );

        // Seeds of another key, the fixture's public key.
        let mut other_seeds = sk.clone();
        other_seeds[0] ^= 0x01;
        let err = Keypair::from_openssh(&pk, &other_seeds);
        assert!(
            matches!(err, Err(Error::PublicKeyMismatch { half: "ML-DSA-44" })),
            "{err:?}"
        );
        let err = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("does not belong to its private key"), "{err}");
        Ok(())
    }

    #[test]
    fn keys_can_be_shared_between_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Keypair>();
        send_sync::<PublicKey>();
        send_sync::<Error>();
    }

    #[test]
    fn debug_prints_no_secret() -> TestResult {
        let (_, sk) = fixture_parts()?;
        let key = fixture_keypair()?;
        let debug = format!("{key:?} {key:#?}");
        assert!(debug.contains("Keypair"), "{debug}");
        let hex: String = sk.iter().map(|b| format!("{b:02x}")).collect();
        for seed in [&hex[..64], &hex[64..]] {
            assert!(!debug.contains(&seed[..16]), "{debug}");
        }
        assert!(
            !debug.contains(&format!("{:?}", &sk[..8])[1..20]),
            "{debug}"
        );
        Ok(())
    }
}
