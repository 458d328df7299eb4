//! What the agent does around the card's raw signature: hashing, PKCS#1 v1.5
//! padding for RSA (the card only does the modular exponentiation), and turning
//! the card's DER ECDSA signature into SSH's form.

use sha2::Digest;
use token_agent_core::{RsaHash, SignFlags, SshSignature};
use zeroize::Zeroizing;

use crate::slot::KeyAlgorithm;

/// What the card is given to sign for `data`: a digest for ECDSA (SHA-256 for
/// P-256, SHA-384 for P-384, as RFC 5656 section 6.2.1 pairs them), or the
/// whole PKCS#1 v1.5 block for RSA.
pub(crate) fn card_input(algorithm: KeyAlgorithm, flags: SignFlags, data: &[u8]) -> Vec<u8> {
    match algorithm {
        KeyAlgorithm::P256 => sha2::Sha256::digest(data).to_vec(),
        KeyAlgorithm::P384 => sha2::Sha384::digest(data).to_vec(),
        KeyAlgorithm::Rsa1024 | KeyAlgorithm::Rsa2048 => {
            let len = algorithm.rsa_len().unwrap_or(256);
            pkcs1_v15_block(flags.rsa_hash(), data, len)
        }
    }
}

/// EMSA-PKCS1-v1_5 (RFC 8017 section 9.2): `00 01 FF..FF 00 DigestInfo`.
pub(crate) fn pkcs1_v15_block(hash: RsaHash, data: &[u8], len: usize) -> Vec<u8> {
    let digest_info = hash.digest_info(data);
    let t_len = digest_info.len();
    // 128 and 256 byte moduli leave at least 8 bytes of FF after the longest
    // DigestInfo (83 bytes), as the standard asks.
    let pad = len.saturating_sub(t_len + 3);
    let mut block = Vec::with_capacity(len);
    block.extend_from_slice(&[0x00, 0x01]);
    block.extend(std::iter::repeat_n(0xff, pad));
    block.push(0x00);
    block.extend_from_slice(&digest_info);
    block
}

/// Turns the card's answer into the SSH signature blob.
pub(crate) fn ssh_signature(
    algorithm: KeyAlgorithm,
    flags: SignFlags,
    card_output: &[u8],
) -> Option<SshSignature> {
    if let Some(curve) = algorithm.curve() {
        let (r, s) = parse_der_signature(card_output)?;
        return Some(SshSignature::ecdsa(curve, r, s));
    }
    let len = algorithm.rsa_len()?;
    // The card returns the signature as an integer; give it the modulus length.
    let raw = card_output.get(card_output.len().saturating_sub(len)..)?;
    let mut padded = Zeroizing::new(vec![0u8; len - raw.len()]);
    padded.extend_from_slice(raw);
    Some(SshSignature::rsa(flags.rsa_hash(), &padded))
}

/// `SEQUENCE { INTEGER r, INTEGER s }` (RFC 3279 section 2.2.3) into r and s.
pub(crate) fn parse_der_signature(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (tag, body, rest) = der_tlv(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let (r_tag, r, rest) = der_tlv(body)?;
    let (s_tag, s, rest) = der_tlv(rest)?;
    (r_tag == 0x02 && s_tag == 0x02 && rest.is_empty() && !r.is_empty() && !s.is_empty())
        .then_some((r, s))
}

/// One DER TLV with a short or one/two-byte long length: (tag, value, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, input) = input.split_first()?;
    let (len, input) = match first {
        0..=0x7f => (usize::from(first), input),
        0x81 => (usize::from(*input.first()?), input.get(1..)?),
        0x82 => (
            usize::from(u16::from_be_bytes([*input.first()?, *input.get(1)?])),
            input.get(2..)?,
        ),
        _ => return None,
    };
    let value = input.get(..len)?;
    Some((tag, value, input.get(len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs1_block_matches_the_rsa_crate() -> Result<(), Box<dyn std::error::Error>> {
        use rsa::traits::PublicKeyParts;
        let mut rng = rand::rngs::OsRng;
        let key = rsa::RsaPrivateKey::new(&mut rng, 1024)?;
        let data = b"to be signed";
        for (hash, scheme) in [
            (RsaHash::Sha256, rsa::Pkcs1v15Sign::new::<sha2::Sha256>()),
            (RsaHash::Sha512, rsa::Pkcs1v15Sign::new::<sha2::Sha512>()),
            (RsaHash::Sha1, rsa::Pkcs1v15Sign::new::<sha1::Sha1>()),
        ] {
            let digest = match hash {
                RsaHash::Sha1 => sha1::Sha1::digest(data).to_vec(),
                RsaHash::Sha256 => sha2::Sha256::digest(data).to_vec(),
                RsaHash::Sha512 => sha2::Sha512::digest(data).to_vec(),
            };
            let expected = key.sign(scheme, &digest)?;
            // Raw RSA over our block, as the card does it.
            let block = pkcs1_v15_block(hash, data, key.size());
            let m = rsa::BigUint::from_bytes_be(&block);
            let raw = rsa::hazmat::rsa_decrypt_and_check(&key, Some(&mut rng), &m)?;
            // The integer drops its leading zero bytes (one signature in 256
            // starts with one); a signature is as long as the modulus.
            let raw = raw.to_bytes_be();
            let mut signature = vec![0u8; key.size() - raw.len()];
            signature.extend_from_slice(&raw);
            assert_eq!(signature, expected, "{hash:?}");
        }
        Ok(())
    }

    #[test]
    fn der_signature_parts() {
        let der = [0x30, 0x08, 0x02, 0x02, 0x00, 0x80, 0x02, 0x02, 0x01, 0x02];
        assert_eq!(
            parse_der_signature(&der),
            Some((&[0x00, 0x80][..], &[0x01, 0x02][..]))
        );
        assert_eq!(parse_der_signature(&der[..9]), None);
        assert_eq!(parse_der_signature(&[0x31, 0x00]), None);
    }

    #[test]
    fn ecdsa_input_is_the_curves_hash() {
        let flags = SignFlags::default();
        assert_eq!(card_input(KeyAlgorithm::P256, flags, b"x").len(), 32);
        assert_eq!(card_input(KeyAlgorithm::P384, flags, b"x").len(), 48);
        let rsa = card_input(
            KeyAlgorithm::Rsa2048,
            SignFlags::from_bits(SignFlags::RSA_SHA2_512),
            b"x",
        );
        assert_eq!(rsa.len(), 256);
        assert_eq!(&rsa[..2], &[0, 1]);
    }
}
