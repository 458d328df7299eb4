//! Credential keys: generation, wrapping into key handles, assertion signatures.
//!
//! A key handle is `version (1) || nonce (12) || AES-256-GCM(master key,
//! nonce, algorithm (1) || private key (32) || credProtect level (1))` with
//! SHA-256 of the relying party id as associated data, so a handle opens only
//! on the device that made it and only for its own application. Handles made
//! before the level was kept (33 bytes sealed) are level 1.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ed25519_dalek::Signer as _;
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use token_agent_fido::ctap::{CoseAlgorithm, CredProtect, CredentialPublicKey, CtapError};
use zeroize::Zeroizing;

const HANDLE_VERSION: u8 = 1;
const ED25519: u8 = 1;
const ES256: u8 = 2;

/// An unwrapped private key.
pub(crate) struct Secret {
    algorithm: u8,
    key: Zeroizing<[u8; 32]>,
    cred_protect: CredProtect,
}

impl Secret {
    /// The credential's credProtect level.
    pub(crate) fn cred_protect(&self) -> CredProtect {
        self.cred_protect
    }
}

/// Makes a key pair of `algorithm` for `rp_id` with credProtect
/// `cred_protect`: its handle and public key.
pub(crate) fn new_credential(
    master: &[u8; 32],
    rp_id: &str,
    algorithm: CoseAlgorithm,
    cred_protect: CredProtect,
) -> Result<(Vec<u8>, CredentialPublicKey), CtapError> {
    let secret = match algorithm {
        CoseAlgorithm::EdDsa => {
            let mut key = Zeroizing::new([0u8; 32]);
            OsRng.fill_bytes(key.as_mut());
            Secret {
                algorithm: ED25519,
                key,
                cred_protect,
            }
        }
        CoseAlgorithm::Es256 => {
            let signing = p256::ecdsa::SigningKey::random(&mut OsRng);
            let mut key = Zeroizing::new([0u8; 32]);
            key.copy_from_slice(&signing.to_bytes());
            Secret {
                algorithm: ES256,
                key,
                cred_protect,
            }
        }
    };
    let public = public_key(&secret)?;
    Ok((wrap(master, rp_id, &secret)?, public))
}

/// The public key of `secret`.
pub(crate) fn public_key(secret: &Secret) -> Result<CredentialPublicKey, CtapError> {
    match secret.algorithm {
        ED25519 => Ok(CredentialPublicKey::Ed25519(
            ed25519_dalek::SigningKey::from_bytes(&secret.key)
                .verifying_key()
                .to_bytes(),
        )),
        _ => {
            let signing = p256_key(secret)?;
            Ok(CredentialPublicKey::P256(
                signing
                    .verifying_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec(),
            ))
        }
    }
}

/// Signs authenticatorData (rpIdHash || flags || counter) || clientDataHash
/// (WebAuthn section 6.3.3 step 11): raw for Ed25519, DER for ES256.
pub(crate) fn sign_assertion(
    secret: &Secret,
    rp_id: &str,
    flags: u8,
    counter: u32,
    client_data_hash: &[u8; 32],
) -> Result<Vec<u8>, CtapError> {
    let mut signed = Vec::with_capacity(32 + 1 + 4 + 32);
    signed.extend_from_slice(&Sha256::digest(rp_id.as_bytes()));
    signed.push(flags);
    signed.extend_from_slice(&counter.to_be_bytes());
    signed.extend_from_slice(client_data_hash);
    match secret.algorithm {
        ED25519 => Ok(ed25519_dalek::SigningKey::from_bytes(&secret.key)
            .sign(&signed)
            .to_bytes()
            .to_vec()),
        _ => {
            let signature: p256::ecdsa::Signature =
                p256::ecdsa::signature::Signer::sign(&p256_key(secret)?, &signed);
            Ok(signature.to_der().as_bytes().to_vec())
        }
    }
}

/// Opens a key handle made by this master key for `rp_id`; `None` otherwise.
pub(crate) fn unwrap(master: &[u8; 32], rp_id: &str, handle: &[u8]) -> Option<Secret> {
    let (&version, rest) = handle.split_first()?;
    if version != HANDLE_VERSION || rest.len() < 12 {
        return None;
    }
    let (nonce, sealed) = rest.split_at(12);
    let cipher = Aes256Gcm::new_from_slice(master).ok()?;
    let aad = Sha256::digest(rp_id.as_bytes());
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .ok()?,
    );
    let (&algorithm, rest) = plain.split_first()?;
    let (key, cred_protect) = match rest.len() {
        32 => (rest, CredProtect::UserVerificationOptional),
        33 => (&rest[..32], CredProtect::from_level(rest[32])?),
        _ => return None,
    };
    if !matches!(algorithm, ED25519 | ES256) {
        return None;
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(key);
    Some(Secret {
        algorithm,
        key: secret,
        cred_protect,
    })
}

/// Compares without stopping at the first difference.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn wrap(master: &[u8; 32], rp_id: &str, secret: &Secret) -> Result<Vec<u8>, CtapError> {
    let cipher =
        Aes256Gcm::new_from_slice(master).map_err(|_| CtapError::Other("bad master key".into()))?;
    let mut nonce = [0u8; 12];
    OsRng.fill_bytes(&mut nonce);
    let mut plain = Zeroizing::new(Vec::with_capacity(34));
    plain.push(secret.algorithm);
    plain.extend_from_slice(secret.key.as_ref());
    plain.push(secret.cred_protect.level());
    let aad = Sha256::digest(rp_id.as_bytes());
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: &aad,
            },
        )
        .map_err(|_| CtapError::Other("cannot wrap the key".into()))?;
    let mut handle = Vec::with_capacity(1 + 12 + sealed.len());
    handle.push(HANDLE_VERSION);
    handle.extend_from_slice(&nonce);
    handle.extend_from_slice(&sealed);
    Ok(handle)
}

fn p256_key(secret: &Secret) -> Result<p256::ecdsa::SigningKey, CtapError> {
    p256::ecdsa::SigningKey::from_slice(secret.key.as_ref())
        .map_err(|_| CtapError::Other("a stored P-256 key is damaged".into()))
}
