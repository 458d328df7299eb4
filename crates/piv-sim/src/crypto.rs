//! The card's cryptography: slot keys (RSA 1024/2048, ECC P-256/P-384), the
//! management key ciphers (3DES, AES-128/192/256) and the attestation certificates.
//!
//! Algorithm identifiers are those of NIST SP 800-78-4 table 6-2 and Yubico's
//! PIV extensions (<https://docs.yubico.com/yesdk/users-manual/application-piv/apdu/>).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use der::asn1::{BitString, OctetString};
use der::{Decode, Encode};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rand::rngs::OsRng;
use rand::RngCore;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPrivateKey};
use signature::Signer;
use thiserror::Error;
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::ext::pkix::BasicConstraints;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::time::Validity;
use zeroize::Zeroizing;

use crate::tlv;

/// Why a cryptographic operation failed; the applet turns these into status words.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// The input does not fit the key: wrong length, not below the modulus, bad point.
    #[error("input does not fit the key")]
    BadInput,
    /// A stored or imported key could not be decoded or is inconsistent.
    #[error("invalid key: {0}")]
    BadKey(String),
    /// Key generation or signing failed inside the crypto library.
    #[error("crypto library failure: {0}")]
    Internal(String),
}

/// An asymmetric key algorithm of a PIV slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    /// 0x06.
    Rsa1024,
    /// 0x07.
    Rsa2048,
    /// 0x05, firmware 5.7 and later.
    Rsa3072,
    /// 0x16, firmware 5.7 and later.
    Rsa4096,
    /// 0x11.
    EccP256,
    /// 0x14.
    EccP384,
}

impl Algorithm {
    /// Parses the algorithm byte of GENERATE, IMPORT and GENERAL AUTHENTICATE.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x06 => Some(Self::Rsa1024),
            0x07 => Some(Self::Rsa2048),
            0x05 => Some(Self::Rsa3072),
            0x16 => Some(Self::Rsa4096),
            0x11 => Some(Self::EccP256),
            0x14 => Some(Self::EccP384),
            _ => None,
        }
    }

    /// The algorithm byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Rsa1024 => 0x06,
            Self::Rsa2048 => 0x07,
            Self::Rsa3072 => 0x05,
            Self::Rsa4096 => 0x16,
            Self::EccP256 => 0x11,
            Self::EccP384 => 0x14,
        }
    }

    /// The first firmware version that has it: a card with an older one
    /// refuses it as it refuses any unknown algorithm.
    pub fn since_firmware(self) -> [u8; 3] {
        match self {
            Self::Rsa3072 | Self::Rsa4096 => [5, 7, 0],
            Self::Rsa1024 | Self::Rsa2048 | Self::EccP256 | Self::EccP384 => [0, 0, 0],
        }
    }

    fn rsa_bits(self) -> Option<usize> {
        match self {
            Self::Rsa1024 => Some(1024),
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::Rsa4096 => Some(4096),
            _ => None,
        }
    }
}

/// A slot's private key, kept as PKCS#8 DER. Debug shows the algorithm only.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredKey {
    /// The key's algorithm.
    pub algorithm: Algorithm,
    #[serde(with = "crate::state::hex_bytes")]
    pkcs8: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoredKey({:?})", self.algorithm)
    }
}

enum PrivateKey {
    Rsa(Box<RsaPrivateKey>),
    P256(p256::SecretKey),
    P384(p384::SecretKey),
}

impl StoredKey {
    /// Generates a fresh key.
    pub fn generate(algorithm: Algorithm) -> Result<Self, CryptoError> {
        let key = match algorithm {
            Algorithm::Rsa1024 | Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
                let bits = algorithm.rsa_bits().unwrap_or(2048);
                let key = RsaPrivateKey::new(&mut OsRng, bits)
                    .map_err(|e| CryptoError::Internal(e.to_string()))?;
                PrivateKey::Rsa(Box::new(key))
            }
            Algorithm::EccP256 => PrivateKey::P256(p256::SecretKey::random(&mut OsRng)),
            Algorithm::EccP384 => PrivateKey::P384(p384::SecretKey::random(&mut OsRng)),
        };
        Self::from_key(algorithm, &key)
    }

    /// Builds an RSA key from the CRT primes of a Yubico IMPORT KEY command.
    pub fn import_rsa(algorithm: Algorithm, p: &[u8], q: &[u8]) -> Result<Self, CryptoError> {
        let bits = algorithm.rsa_bits().ok_or(CryptoError::BadInput)?;
        let key = RsaPrivateKey::from_p_q(
            BigUint::from_bytes_be(p),
            BigUint::from_bytes_be(q),
            BigUint::from(65_537u32),
        )
        .map_err(|e| CryptoError::BadKey(e.to_string()))?;
        if key.size() * 8 != bits {
            return Err(CryptoError::BadInput);
        }
        Self::from_key(algorithm, &PrivateKey::Rsa(Box::new(key)))
    }

    /// Builds an EC key from its private scalar.
    pub fn import_ec(algorithm: Algorithm, scalar: &[u8]) -> Result<Self, CryptoError> {
        let key = match algorithm {
            Algorithm::EccP256 if scalar.len() == 32 => PrivateKey::P256(
                p256::SecretKey::from_slice(scalar).map_err(|_| CryptoError::BadInput)?,
            ),
            Algorithm::EccP384 if scalar.len() == 48 => PrivateKey::P384(
                p384::SecretKey::from_slice(scalar).map_err(|_| CryptoError::BadInput)?,
            ),
            _ => return Err(CryptoError::BadInput),
        };
        Self::from_key(algorithm, &key)
    }

    fn from_key(algorithm: Algorithm, key: &PrivateKey) -> Result<Self, CryptoError> {
        let doc = match key {
            PrivateKey::Rsa(k) => k.to_pkcs8_der(),
            PrivateKey::P256(k) => k.to_pkcs8_der(),
            PrivateKey::P384(k) => k.to_pkcs8_der(),
        }
        .map_err(|e| CryptoError::Internal(e.to_string()))?;
        Ok(Self {
            algorithm,
            pkcs8: Zeroizing::new(doc.as_bytes().to_vec()),
        })
    }

    fn load(&self) -> Result<PrivateKey, CryptoError> {
        let bad = |e: p256::pkcs8::Error| CryptoError::BadKey(e.to_string());
        Ok(match self.algorithm {
            Algorithm::Rsa1024 | Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
                PrivateKey::Rsa(Box::new(
                    RsaPrivateKey::from_pkcs8_der(&self.pkcs8).map_err(bad)?,
                ))
            }
            Algorithm::EccP256 => {
                PrivateKey::P256(p256::SecretKey::from_pkcs8_der(&self.pkcs8).map_err(bad)?)
            }
            Algorithm::EccP384 => {
                PrivateKey::P384(p384::SecretKey::from_pkcs8_der(&self.pkcs8).map_err(bad)?)
            }
        })
    }

    /// The public key as PIV encodes it inside tag 7F49 (SP 800-73-4 part 2 table 11):
    /// `81` modulus `82` exponent for RSA, `86` uncompressed point for ECC.
    pub fn public_tlvs(&self) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::new();
        match self.load()? {
            PrivateKey::Rsa(k) => {
                tlv::push(&mut out, 0x81, &k.n().to_bytes_be());
                tlv::push(&mut out, 0x82, &k.e().to_bytes_be());
            }
            PrivateKey::P256(k) => {
                let point = k.public_key().to_sec1_bytes();
                tlv::push(&mut out, 0x86, &point);
            }
            PrivateKey::P384(k) => {
                let point = k.public_key().to_sec1_bytes();
                tlv::push(&mut out, 0x86, &point);
            }
        }
        Ok(out)
    }

    /// The public key as an X.509 SubjectPublicKeyInfo.
    pub fn spki(&self) -> Result<SubjectPublicKeyInfoOwned, CryptoError> {
        let der = match self.load()? {
            PrivateKey::Rsa(k) => k.to_public_key().to_public_key_der(),
            PrivateKey::P256(k) => k.public_key().to_public_key_der(),
            PrivateKey::P384(k) => k.public_key().to_public_key_der(),
        }
        .map_err(|e| CryptoError::Internal(e.to_string()))?;
        SubjectPublicKeyInfoOwned::from_der(der.as_bytes())
            .map_err(|e| CryptoError::Internal(e.to_string()))
    }

    /// GENERAL AUTHENTICATE with tag 81: raw RSA on a block of exactly the
    /// modulus size (the host did the padding), or ECDSA over a digest, which is
    /// left-padded or truncated to the field size as a YubiKey does.
    pub fn sign(&self, input: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match self.load()? {
            PrivateKey::Rsa(k) => {
                let size = k.size();
                if input.len() != size {
                    return Err(CryptoError::BadInput);
                }
                let c = BigUint::from_bytes_be(input);
                if &c >= k.n() {
                    return Err(CryptoError::BadInput);
                }
                let m = rsa::hazmat::rsa_decrypt_and_check(&*k, Some(&mut OsRng), &c)
                    .map_err(|e| CryptoError::Internal(e.to_string()))?;
                let bytes = m.to_bytes_be();
                let mut out = vec![0u8; size - bytes.len()];
                out.extend_from_slice(&bytes);
                Ok(out)
            }
            PrivateKey::P256(k) => {
                let digest = fit_digest(input, 32);
                let signer = p256::ecdsa::SigningKey::from(k);
                let sig: p256::ecdsa::DerSignature =
                    signature::hazmat::PrehashSigner::sign_prehash(&signer, &digest)
                        .map_err(|e| CryptoError::Internal(e.to_string()))?;
                Ok(sig.as_bytes().to_vec())
            }
            PrivateKey::P384(k) => {
                let digest = fit_digest(input, 48);
                let signer = p384::ecdsa::SigningKey::from(k);
                let sig: p384::ecdsa::DerSignature =
                    signature::hazmat::PrehashSigner::sign_prehash(&signer, &digest)
                        .map_err(|e| CryptoError::Internal(e.to_string()))?;
                Ok(sig.as_bytes().to_vec())
            }
        }
    }

    /// GENERAL AUTHENTICATE with tag 85: ECDH with the peer's uncompressed point,
    /// returning the shared x coordinate.
    pub fn ecdh(&self, peer: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match self.load()? {
            PrivateKey::P256(k) => {
                let peer =
                    p256::PublicKey::from_sec1_bytes(peer).map_err(|_| CryptoError::BadInput)?;
                let shared = p256::ecdh::diffie_hellman(k.to_nonzero_scalar(), peer.as_affine());
                Ok(shared.raw_secret_bytes().to_vec())
            }
            PrivateKey::P384(k) => {
                let peer =
                    p384::PublicKey::from_sec1_bytes(peer).map_err(|_| CryptoError::BadInput)?;
                let shared = p384::ecdh::diffie_hellman(k.to_nonzero_scalar(), peer.as_affine());
                Ok(shared.raw_secret_bytes().to_vec())
            }
            PrivateKey::Rsa(_) => Err(CryptoError::BadInput),
        }
    }

    fn signing_algorithm(&self) -> AlgorithmIdentifierOwned {
        let oid = match self.algorithm {
            // sha256WithRSAEncryption, parameters NULL.
            Algorithm::Rsa1024 | Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
                return AlgorithmIdentifierOwned {
                    oid: ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11"),
                    parameters: Some(der::asn1::Null.into()),
                }
            }
            Algorithm::EccP256 => ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
            Algorithm::EccP384 => ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3"),
        };
        AlgorithmIdentifierOwned {
            oid,
            parameters: None,
        }
    }

    /// Signs `message` as an X.509 signature: PKCS#1 v1.5 with SHA-256 for RSA,
    /// ECDSA with SHA-256 (P-256) or SHA-384 (P-384).
    fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let internal = |e: signature::Error| CryptoError::Internal(e.to_string());
        match self.load()? {
            PrivateKey::Rsa(k) => {
                let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(*k);
                let sig: rsa::pkcs1v15::Signature = signer.try_sign(message).map_err(internal)?;
                Ok(Box::<[u8]>::from(sig).to_vec())
            }
            PrivateKey::P256(k) => {
                let signer = p256::ecdsa::SigningKey::from(k);
                let sig: p256::ecdsa::DerSignature = signer.try_sign(message).map_err(internal)?;
                Ok(sig.as_bytes().to_vec())
            }
            PrivateKey::P384(k) => {
                let signer = p384::ecdsa::SigningKey::from(k);
                let sig: p384::ecdsa::DerSignature = signer.try_sign(message).map_err(internal)?;
                Ok(sig.as_bytes().to_vec())
            }
        }
    }
}

fn fit_digest(input: &[u8], size: usize) -> Vec<u8> {
    if input.len() >= size {
        input[..size].to_vec()
    } else {
        let mut out = vec![0u8; size - input.len()];
        out.extend_from_slice(input);
        out
    }
}

/// The management key algorithm (Yubico: 03 3DES, 08 AES-128, 0A AES-192, 0C AES-256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MgmAlgorithm {
    /// Triple DES with a 24-byte key.
    TripleDes,
    /// AES-128.
    Aes128,
    /// AES-192.
    Aes192,
    /// AES-256.
    Aes256,
}

impl MgmAlgorithm {
    /// Parses the algorithm byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x03 => Some(Self::TripleDes),
            0x08 => Some(Self::Aes128),
            0x0A => Some(Self::Aes192),
            0x0C => Some(Self::Aes256),
            _ => None,
        }
    }

    /// The algorithm byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::TripleDes => 0x03,
            Self::Aes128 => 0x08,
            Self::Aes192 => 0x0A,
            Self::Aes256 => 0x0C,
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::TripleDes | Self::Aes192 => 24,
            Self::Aes128 => 16,
            Self::Aes256 => 32,
        }
    }

    /// Cipher block size: the challenge and witness length.
    pub fn block_len(self) -> usize {
        match self {
            Self::TripleDes => 8,
            _ => 16,
        }
    }
}

/// Encrypts (or decrypts) one block with the management key; `None` if the key
/// or block length does not fit the algorithm.
pub fn mgm_block(alg: MgmAlgorithm, key: &[u8], block: &[u8], encrypt: bool) -> Option<Vec<u8>> {
    if key.len() != alg.key_len() || block.len() != alg.block_len() {
        return None;
    }
    fn run<C: BlockEncrypt + BlockDecrypt + KeyInit>(
        key: &[u8],
        block: &[u8],
        encrypt: bool,
    ) -> Option<Vec<u8>> {
        let cipher = C::new_from_slice(key).ok()?;
        let mut b = GenericArray::clone_from_slice(block);
        if encrypt {
            cipher.encrypt_block(&mut b);
        } else {
            cipher.decrypt_block(&mut b);
        }
        Some(b.to_vec())
    }
    match alg {
        MgmAlgorithm::TripleDes => run::<des::TdesEde3>(key, block, encrypt),
        MgmAlgorithm::Aes128 => run::<aes::Aes128>(key, block, encrypt),
        MgmAlgorithm::Aes192 => run::<aes::Aes192>(key, block, encrypt),
        MgmAlgorithm::Aes256 => run::<aes::Aes256>(key, block, encrypt),
    }
}

/// Random bytes from the operating system.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    OsRng.fill_bytes(&mut out);
    out
}

/// Yubico's attestation extensions (developers.yubico.com/PIV/Introduction/PIV_attestation.html).
const OID_FIRMWARE: &str = "1.3.6.1.4.1.41482.3.3";
const OID_SERIAL: &str = "1.3.6.1.4.1.41482.3.7";
const OID_POLICY: &str = "1.3.6.1.4.1.41482.3.8";
const OID_FORM_FACTOR: &str = "1.3.6.1.4.1.41482.3.9";
/// Form factor byte of a YubiKey 5 NFC (USB-A keychain).
const FORM_FACTOR_USB_A_KEYCHAIN: u8 = 0x01;

/// The facts an attestation certificate states about the attested key.
#[derive(Debug, Clone, Copy)]
pub struct AttestedKey<'a> {
    /// The attested slot.
    pub slot: u8,
    /// The attested key.
    pub key: &'a StoredKey,
    /// Its PIN policy byte.
    pub pin_policy: u8,
    /// Its touch policy byte.
    pub touch_policy: u8,
}

/// The simulated attestation authority: a self-signed certificate for the key in slot F9,
/// named "Yubico PIV Attestation" like a YubiKey's factory intermediate.
pub fn attestation_authority_certificate(key: &StoredKey) -> Result<Vec<u8>, CryptoError> {
    let name = name("CN=Yubico PIV Attestation,O=piv-sim")?;
    let validity = Validity::from_now(Duration::from_secs(20 * 365 * 24 * 3600))
        .map_err(|e| CryptoError::Internal(e.to_string()))?;
    let basic = BasicConstraints {
        ca: true,
        path_len_constraint: None,
    };
    let ext = Extension {
        extn_id: ObjectIdentifier::new_unwrap("2.5.29.19"),
        critical: true,
        extn_value: octets(basic.to_der().map_err(der_err)?)?,
    };
    build_certificate(key, &name, validity, &name, key.spki()?, vec![ext])
}

/// An attestation statement for `attested`, signed by `authority_key` whose certificate
/// is `authority_cert` (the issuer name and validity are copied from it, as a YubiKey does).
pub fn attestation_certificate(
    authority_key: &StoredKey,
    authority_cert: &[u8],
    attested: AttestedKey<'_>,
    serial: u32,
    version: [u8; 3],
) -> Result<Vec<u8>, CryptoError> {
    let authority = Certificate::from_der(authority_cert)
        .map_err(|e| CryptoError::BadKey(format!("attestation certificate: {e}")))?;
    let issuer = authority.tbs_certificate.subject.clone();
    let validity = authority.tbs_certificate.validity;
    let subject = name(&format!("CN=YubiKey PIV Attestation {:02x}", attested.slot))?;
    let oid = ObjectIdentifier::new_unwrap;
    let raw = |id: &str, value: Vec<u8>| -> Result<Extension, CryptoError> {
        Ok(Extension {
            extn_id: oid(id),
            critical: false,
            extn_value: octets(value)?,
        })
    };
    let serial_der = der::asn1::Uint::new(&serial.to_be_bytes())
        .and_then(|u| u.to_der())
        .map_err(der_err)?;
    let extensions = vec![
        raw(OID_FIRMWARE, version.to_vec())?,
        raw(OID_SERIAL, serial_der)?,
        raw(OID_POLICY, vec![attested.pin_policy, attested.touch_policy])?,
        raw(OID_FORM_FACTOR, vec![FORM_FACTOR_USB_A_KEYCHAIN])?,
    ];
    build_certificate(
        authority_key,
        &issuer,
        validity,
        &subject,
        attested.key.spki()?,
        extensions,
    )
}

fn build_certificate(
    signer: &StoredKey,
    issuer: &Name,
    validity: Validity,
    subject: &Name,
    spki: SubjectPublicKeyInfoOwned,
    extensions: Vec<Extension>,
) -> Result<Vec<u8>, CryptoError> {
    let mut serial = random_bytes(16);
    // A positive, non-zero, minimally encoded INTEGER.
    serial[0] = (serial[0] & 0x7F) | 0x01;
    let serial_number = SerialNumber::new(&serial).map_err(der_err)?;
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number,
        signature: signer.signing_algorithm(),
        issuer: issuer.clone(),
        validity,
        subject: subject.clone(),
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };
    let tbs_der = tbs.to_der().map_err(der_err)?;
    let signature = signer.sign_message(&tbs_der)?;
    let cert = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: signer.signing_algorithm(),
        signature: BitString::from_bytes(&signature).map_err(der_err)?,
    };
    cert.to_der().map_err(der_err)
}

fn name(s: &str) -> Result<Name, CryptoError> {
    Name::from_str(s).map_err(der_err)
}

fn octets(value: Vec<u8>) -> Result<OctetString, CryptoError> {
    OctetString::new(value).map_err(der_err)
}

fn der_err(e: der::Error) -> CryptoError {
    CryptoError::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_3des_key_round_trips_a_block() {
        let key: Vec<u8> = (1..=8).cycle().take(24).collect();
        let block = [0x11u8; 8];
        let enc = mgm_block(MgmAlgorithm::TripleDes, &key, &block, true).unwrap_or_default();
        assert_ne!(enc, block.to_vec());
        let dec = mgm_block(MgmAlgorithm::TripleDes, &key, &enc, false).unwrap_or_default();
        assert_eq!(dec, block.to_vec());
        assert!(mgm_block(MgmAlgorithm::Aes128, &key, &block, true).is_none());
    }

    #[test]
    fn ecdsa_signature_verifies() -> Result<(), Box<dyn std::error::Error>> {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let key = StoredKey::generate(Algorithm::EccP256)?;
        let digest = [0x42u8; 32];
        let sig = key.sign(&digest)?;
        let tlvs = key.public_tlvs()?;
        let parsed = tlv::parse(&tlvs)?;
        let point = tlv::find(&parsed, 0x86).ok_or("no point")?;
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(point)?;
        let sig = p256::ecdsa::Signature::from_der(&sig)?;
        vk.verify_prehash(&digest, &sig)?;
        Ok(())
    }

    #[test]
    fn attestation_chain_is_well_formed() -> Result<(), Box<dyn std::error::Error>> {
        let authority = StoredKey::generate(Algorithm::EccP256)?;
        let authority_cert = attestation_authority_certificate(&authority)?;
        let key = StoredKey::generate(Algorithm::EccP384)?;
        let attested = AttestedKey {
            slot: 0x9a,
            key: &key,
            pin_policy: 2,
            touch_policy: 1,
        };
        let cert = attestation_certificate(&authority, &authority_cert, attested, 7, [5, 4, 3])?;
        let parsed = Certificate::from_der(&cert)?;
        assert_eq!(
            parsed.tbs_certificate.subject.to_string(),
            "CN=YubiKey PIV Attestation 9a"
        );
        assert_eq!(parsed.tbs_certificate.subject_public_key_info, key.spki()?);
        Ok(())
    }
}
