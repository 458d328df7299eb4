//! Public keys from PKCS#11 objects: RSA modulus and exponent, EC parameters
//! and points (both the DER-wrapped and the raw forms modules use), Ed25519
//! (both parameter forms), and the subject key of an X.509 certificate.

use der::Decode;
use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey};
use ssh_key::{EcdsaCurve, Mpint};

/// DER of the named-curve OIDs a CKA_EC_PARAMS holds.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const P521_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];
/// id-Ed25519 (RFC 8410).
const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const ED25519: &str = "1.3.101.112";

/// A key type token-agent can sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Curve {
    /// An ECDSA curve.
    Ecdsa(EcdsaCurve),
    /// Ed25519.
    Ed25519,
}

/// An RSA public key from CKA_MODULUS and CKA_PUBLIC_EXPONENT.
pub(crate) fn rsa(modulus: &[u8], exponent: &[u8]) -> Result<KeyData, String> {
    let n = Mpint::from_positive_bytes(modulus).map_err(|e| format!("bad modulus: {e}"))?;
    let e = Mpint::from_positive_bytes(exponent).map_err(|e| format!("bad exponent: {e}"))?;
    Ok(KeyData::Rsa(RsaPublicKey { e, n }))
}

/// The curve a CKA_EC_PARAMS names. Ed25519 comes as the RFC 8410 OID or, as
/// OpenSC's pkcs11-tool writes it into SoftHSM, as the PrintableString
/// "edwards25519" (the PKCS#11 3.0 curve-name form).
pub(crate) fn curve(params: &[u8]) -> Result<Curve, String> {
    match params {
        P256_OID => Ok(Curve::Ecdsa(EcdsaCurve::NistP256)),
        P384_OID => Ok(Curve::Ecdsa(EcdsaCurve::NistP384)),
        P521_OID => Ok(Curve::Ecdsa(EcdsaCurve::NistP521)),
        ED25519_OID => Ok(Curve::Ed25519),
        [0x13 | 0x0c, len, name @ ..] if usize::from(*len) == name.len() => match name {
            b"edwards25519" => Ok(Curve::Ed25519),
            other => Err(format!(
                "unsupported curve {:?}",
                String::from_utf8_lossy(other)
            )),
        },
        other => Err(format!("unsupported EC parameters {}", hex(other))),
    }
}

/// An EC or Ed25519 public key from CKA_EC_PARAMS and CKA_EC_POINT.
pub(crate) fn ec(params: &[u8], point: &[u8]) -> Result<KeyData, String> {
    let curve = curve(params)?;
    let raw_len = match curve {
        Curve::Ecdsa(EcdsaCurve::NistP256) => 65,
        Curve::Ecdsa(EcdsaCurve::NistP384) => 97,
        Curve::Ecdsa(EcdsaCurve::NistP521) => 133,
        Curve::Ed25519 => 32,
    };
    // PKCS#11 says CKA_EC_POINT is a DER OCTET STRING; some modules give the
    // raw point. A raw point has exactly the curve's length.
    let raw = if point.len() == raw_len {
        point
    } else {
        unwrap_octet_string(point).ok_or_else(|| format!("malformed EC point {}", hex(point)))?
    };
    point_key(curve, raw)
}

/// The public key of a DER X.509 certificate (CKA_VALUE of a CKO_CERTIFICATE).
pub(crate) fn certificate(der: &[u8]) -> Result<KeyData, String> {
    let cert =
        x509_cert::Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let bits = spki.subject_public_key.raw_bytes();
    match spki.algorithm.oid.to_string().as_str() {
        RSA_ENCRYPTION => {
            use rsa::pkcs1::DecodeRsaPublicKey;
            let key = rsa::RsaPublicKey::from_pkcs1_der(bits)
                .map_err(|e| format!("bad RSA key in certificate: {e}"))?;
            RsaPublicKey::try_from(&key)
                .map(KeyData::Rsa)
                .map_err(|e| e.to_string())
        }
        EC_PUBLIC_KEY => {
            let params = spki
                .algorithm
                .parameters
                .as_ref()
                .ok_or("EC certificate without curve")?;
            let params = der::Encode::to_der(params).map_err(|e| e.to_string())?;
            point_key(curve(&params)?, bits)
        }
        ED25519 => point_key(Curve::Ed25519, bits),
        other => Err(format!("unsupported certificate key algorithm {other}")),
    }
}

fn point_key(curve: Curve, raw: &[u8]) -> Result<KeyData, String> {
    match curve {
        Curve::Ed25519 => {
            let bytes: [u8; 32] = raw
                .try_into()
                .map_err(|_| format!("Ed25519 point of {} bytes", raw.len()))?;
            Ok(KeyData::Ed25519(Ed25519PublicKey(bytes)))
        }
        Curve::Ecdsa(expected) => {
            let key =
                EcdsaPublicKey::from_sec1_bytes(raw).map_err(|e| format!("bad point: {e}"))?;
            if key.curve() != expected {
                return Err(format!("point does not lie on {expected}"));
            }
            Ok(KeyData::Ecdsa(key))
        }
    }
}

/// The content of a DER OCTET STRING that fills `bytes` exactly.
fn unwrap_octet_string(bytes: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    (rest.len() == len).then_some(rest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_params_in_both_forms() {
        assert_eq!(curve(ED25519_OID).unwrap(), Curve::Ed25519);
        let mut printable = vec![0x13, 12];
        printable.extend_from_slice(b"edwards25519");
        assert_eq!(curve(&printable).unwrap(), Curve::Ed25519);
        let mut wrong = vec![0x13, 10];
        wrong.extend_from_slice(b"curve25519");
        assert!(curve(&wrong).is_err());
    }

    #[test]
    fn ec_points_wrapped_or_raw() {
        // The P-256 generator point.
        let mut raw = vec![0x04];
        raw.extend_from_slice(&[
            0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4,
            0x40, 0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45,
            0xd8, 0x98, 0xc2, 0x96, 0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7,
            0xeb, 0x4a, 0x7c, 0x0f, 0x9e, 0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce,
            0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51, 0xf5,
        ]);
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&raw);
        let a = ec(P256_OID, &raw).unwrap();
        let b = ec(P256_OID, &wrapped).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.algorithm().to_string(), "ecdsa-sha2-nistp256");
        assert!(ec(P384_OID, &wrapped).is_err());
    }

    #[test]
    fn ed25519_point_wrapped_or_raw() {
        let raw = [7u8; 32];
        let mut wrapped = vec![0x04, 32];
        wrapped.extend_from_slice(&raw);
        assert_eq!(
            ec(ED25519_OID, &wrapped).unwrap(),
            KeyData::Ed25519(Ed25519PublicKey(raw))
        );
        assert_eq!(
            ec(ED25519_OID, &raw).unwrap(),
            KeyData::Ed25519(Ed25519PublicKey(raw))
        );
    }
}
