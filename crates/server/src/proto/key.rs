//! Private keys as clients send them in SSH_AGENTC_ADD_IDENTITY
//! (draft-miller-ssh-agent section 3.2.3 and OpenSSH's
//! `sshkey_private_deserialize`): `string key type` followed by fields that
//! depend on the type. A certificate type sends the certificate first and
//! then only the private fields (plus the fields OpenSSH repeats and checks
//! against the certificate):
//!
//! | key type | fields after the type name |
//! | --- | --- |
//! | `ssh-ed25519` | `string pk` `string sk (seed ‖ pk)` |
//! | `ecdsa-sha2-nistpN` | `string curve` `string Q` `mpint d` |
//! | `ssh-rsa` | `mpint n` `mpint e` `mpint d` `mpint iqmp` `mpint p` `mpint q` |
//! | `sk-ssh-ed25519@openssh.com` | `string pk` `string application` `byte flags` `string handle` `string reserved` |
//! | `sk-ecdsa-sha2-nistp256@openssh.com` | `string curve` `string Q` `string application` `byte flags` `string handle` `string reserved` |
//! | `ssh-mldsa44-ed25519@openssh.com` | `string pk` `string sk` |
//! | `ssh-ed25519-cert-v01@openssh.com` | `string cert` `string pk` `string sk` |
//! | `ecdsa-sha2-nistpN-cert-v01@openssh.com` | `string cert` `mpint d` |
//! | `ssh-rsa-cert-v01@openssh.com` | `string cert` `mpint d` `mpint iqmp` `mpint p` `mpint q` |
//! | `sk-ssh-ed25519-cert-v01@openssh.com` | `string cert` `string pk` `string application` `byte flags` `string handle` `string reserved` |
//! | `sk-ecdsa-sha2-nistp256-cert-v01@openssh.com` | `string cert` `string application` `byte flags` `string handle` `string reserved` |
//!
//! DSA keys (`ssh-dss`, removed in OpenSSH 10.0) are refused.

use ssh_encoding::{Decode, Reader};
use ssh_key::certificate::Certificate;
use ssh_key::private::{
    EcdsaKeypair, EcdsaPrivateKey, Ed25519Keypair, KeypairData, OpaqueKeypair, RsaKeypair,
    RsaPrivateKey, SkEcdsaSha2NistP256, SkEd25519,
};
use ssh_key::public::{EcdsaPublicKey, KeyData};
use ssh_key::{Algorithm, EcdsaCurve, Mpint};
use zeroize::Zeroizing;

use crate::mldsa;

/// A public key blob: a plain key, or a certificate (a user's, or a host's
/// in a session bind or a hostbound user authentication request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrCertificate {
    /// A plain key.
    Plain(KeyData),
    /// A certificate.
    Certificate(Box<Certificate>),
}

impl KeyOrCertificate {
    /// The key that signs (a certificate's subject key).
    pub fn key_data(&self) -> &KeyData {
        match self {
            Self::Plain(key) => key,
            Self::Certificate(cert) => cert.public_key(),
        }
    }

    /// Decodes `blob`, which it must fill exactly.
    pub fn decode(blob: &[u8]) -> Result<Self, String> {
        let algorithm = String::decode(&mut &*blob).map_err(|e| e.to_string())?;
        if Algorithm::new_certificate(&algorithm).is_ok() {
            let cert = super::message::decode_exact::<Certificate>(blob)?;
            Ok(Self::Certificate(Box::new(cert)))
        } else {
            Ok(Self::Plain(super::message::decode_exact::<KeyData>(blob)?))
        }
    }
}

/// A private key, and the certificate it was sent with.
pub struct PrivateKey {
    /// The key pair, on the heap (see `AddKey::keypair`); ssh-key zeroizes
    /// its secret half on drop. A key type ssh-key does not know has an
    /// empty private half here.
    pub keypair: Box<KeypairData>,
    /// The private half of such a key (ssh-mldsa44-ed25519@openssh.com),
    /// which ssh-key's opaque type would not zeroize.
    pub opaque_secret: Option<Zeroizing<Vec<u8>>>,
    /// The certificate, for the `-cert-v01@openssh.com` types.
    pub certificate: Option<Certificate>,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.keypair.algorithm().ok())
            .field("certificate", &self.certificate.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads a private key (type name and fields) off the front of `reader`.
pub fn decode(reader: &mut &[u8]) -> Result<PrivateKey, String> {
    let name = String::decode(reader).map_err(|e| format!("key type: {e}"))?;
    if name == "ssh-dss" || name == "ssh-dss-cert-v01@openssh.com" {
        return Err("DSA keys are not supported (OpenSSH 10 removed them)".into());
    }
    if name.ends_with("-cert-v01@openssh.com") {
        return decode_certified(reader, &name);
    }
    let algorithm = Algorithm::new(&name).map_err(|_| format!("unknown key type {name}"))?;
    let keypair = Box::new(match algorithm {
        Algorithm::Ecdsa { curve } => {
            let public = read_ecdsa_public(reader, curve)?;
            EcdsaKeypairParts { public }.with_scalar(read_mpint(reader)?)?
        }
        Algorithm::Other(ref other) if other.as_str() == mldsa::ALGORITHM => {
            let public = Zeroizing::new(Vec::<u8>::decode(reader).map_err(field("pk"))?);
            let private = Zeroizing::new(Vec::<u8>::decode(reader).map_err(field("sk"))?);
            // Checks the sizes and that the public key derives from the seeds.
            mldsa::Keypair::from_openssh(&public, &private).map_err(|e| e.to_string())?;
            let keypair = KeypairData::Other(OpaqueKeypair::new(
                Vec::new(),
                ssh_key::public::OpaquePublicKey::new(public.to_vec(), algorithm),
            ));
            return Ok(PrivateKey {
                keypair: Box::new(keypair),
                opaque_secret: Some(private),
                certificate: None,
            });
        }
        Algorithm::Other(_) => return Err(format!("unknown key type {name}")),
        algorithm => KeypairData::decode_as(reader, algorithm).map_err(|e| e.to_string())?,
    });
    Ok(PrivateKey {
        keypair,
        opaque_secret: None,
        certificate: None,
    })
}

/// A certificate type: the certificate, then the private fields of its key.
fn decode_certified(reader: &mut &[u8], name: &str) -> Result<PrivateKey, String> {
    let certificate = reader
        .read_prefixed(Certificate::decode)
        .map_err(|e| format!("certificate: {e}"))?;
    // The type named must be the certificate's own: sk and post-quantum
    // certificate names are not their key's name plus a suffix
    // (sk-ssh-ed25519@openssh.com, sk-ssh-ed25519-cert-v01@openssh.com).
    let algorithm = certificate.algorithm();
    if algorithm.to_certificate_type() != name {
        return Err(format!(
            "the certificate is for a {} key, not {name}",
            algorithm.as_str()
        ));
    }
    let mismatch = |what: &str| format!("the {what} does not match the certificate");
    let keypair = match certificate.public_key() {
        KeyData::Ed25519(public) => {
            let keypair = read_ed25519(reader)?;
            if &keypair.public != public {
                return Err(mismatch("public key"));
            }
            KeypairData::Ed25519(keypair)
        }
        KeyData::Ecdsa(public) => {
            EcdsaKeypairParts { public: *public }.with_scalar(read_mpint(reader)?)?
        }
        KeyData::Rsa(public) => KeypairData::Rsa(RsaKeypair {
            public: public.clone(),
            private: RsaPrivateKey::decode(reader).map_err(|e| e.to_string())?,
        }),
        KeyData::SkEd25519(public) => {
            if read_string(reader, "pk")?.as_slice() != public.public_key().0.as_slice() {
                return Err(mismatch("public key"));
            }
            let (flags, handle) = read_sk_private(reader, public.application())?;
            KeypairData::SkEd25519(
                SkEd25519::new(public.clone(), flags, handle).map_err(|e| e.to_string())?,
            )
        }
        KeyData::SkEcdsaSha2NistP256(public) => {
            let (flags, handle) = read_sk_private(reader, public.application())?;
            KeypairData::SkEcdsaSha2NistP256(
                SkEcdsaSha2NistP256::new(public.clone(), flags, handle)
                    .map_err(|e| e.to_string())?,
            )
        }
        KeyData::Other(public) if public.algorithm().as_str() == mldsa::ALGORITHM => {
            // A certificate's private half is `string sk` alone.
            let private = Zeroizing::new(Vec::<u8>::decode(reader).map_err(field("sk"))?);
            mldsa::Keypair::from_openssh(public.as_ref(), &private).map_err(|e| e.to_string())?;
            let keypair = KeypairData::Other(OpaqueKeypair::new(Vec::new(), public.clone()));
            return Ok(PrivateKey {
                keypair: Box::new(keypair),
                opaque_secret: Some(private),
                certificate: Some(certificate),
            });
        }
        other => {
            return Err(format!(
                "certificates of {} keys are not supported",
                other.algorithm().as_str()
            ))
        }
    };
    Ok(PrivateKey {
        keypair: Box::new(keypair),
        opaque_secret: None,
        certificate: Some(certificate),
    })
}

/// `string pk` `string sk`: an Ed25519 key pair whose halves agree.
fn read_ed25519(reader: &mut &[u8]) -> Result<Ed25519Keypair, String> {
    Ed25519Keypair::decode(reader).map_err(|e| format!("Ed25519 key: {e}"))
}

/// The private fields of an sk key after its public part: the repeated
/// application (which must match), flags, key handle and a reserved string.
fn read_sk_private(reader: &mut &[u8], application: &str) -> Result<(u8, Vec<u8>), String> {
    let sent = String::decode(reader).map_err(field("application"))?;
    if sent != application {
        return Err("the application does not match the certificate".into());
    }
    let flags = u8::decode(reader).map_err(field("flags"))?;
    let handle = Vec::<u8>::decode(reader).map_err(field("key handle"))?;
    Vec::<u8>::decode(reader).map_err(field("reserved"))?;
    Ok((flags, handle))
}

/// `string curve` `string Q`, checked against the key type's curve.
fn read_ecdsa_public(reader: &mut &[u8], curve: EcdsaCurve) -> Result<EcdsaPublicKey, String> {
    let named = String::decode(reader).map_err(field("curve"))?;
    if named != curve.as_str() {
        return Err(format!(
            "curve {named} does not match the key type's {}",
            curve.as_str()
        ));
    }
    let point = read_string(reader, "public point")?;
    let public = EcdsaPublicKey::from_sec1_bytes(&point).map_err(|e| e.to_string())?;
    if public.curve() != curve {
        return Err("the public point is not on the key type's curve".into());
    }
    Ok(public)
}

struct EcdsaKeypairParts {
    public: EcdsaPublicKey,
}

impl EcdsaKeypairParts {
    /// Joins the public point with the scalar `d`. OpenSSH sends `d` as a
    /// minimal mpint, so a scalar whose top byte is zero arrives shorter than
    /// the curve's size (about one P-256 key in 256, and many P-521 keys);
    /// `ssh-key` reads only the full width, so widen it first.
    fn with_scalar(self, d: Mpint) -> Result<KeypairData, String> {
        let scalar = d
            .as_positive_bytes()
            .ok_or("the ECDSA private scalar is negative")?;
        let keypair = match self.public {
            EcdsaPublicKey::NistP256(public) => EcdsaKeypair::NistP256 {
                public,
                private: widen::<32>(scalar)?,
            },
            EcdsaPublicKey::NistP384(public) => EcdsaKeypair::NistP384 {
                public,
                private: widen::<48>(scalar)?,
            },
            EcdsaPublicKey::NistP521(public) => EcdsaKeypair::NistP521 {
                public,
                private: widen::<66>(scalar)?,
            },
        };
        Ok(KeypairData::Ecdsa(keypair))
    }
}

/// `scalar` left-padded with zeros to `N` bytes, as ssh-key's private key type.
fn widen<const N: usize>(scalar: &[u8]) -> Result<EcdsaPrivateKey<N>, String> {
    if scalar.len() > N {
        return Err(format!("an ECDSA private scalar of {} bytes", scalar.len()));
    }
    // ssh-key builds its scalar type only by decoding: a string of N bytes.
    let mut encoded = Zeroizing::new(Vec::with_capacity(4 + N));
    encoded.extend_from_slice(&u32::try_from(N).unwrap_or(u32::MAX).to_be_bytes());
    encoded.resize(4 + N - scalar.len(), 0);
    encoded.extend_from_slice(scalar);
    EcdsaPrivateKey::<N>::decode(&mut encoded.as_slice()).map_err(|e| e.to_string())
}

fn read_mpint(reader: &mut &[u8]) -> Result<Mpint, String> {
    Mpint::decode(reader).map_err(|e| format!("private scalar: {e}"))
}

fn read_string(reader: &mut &[u8], what: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    Vec::<u8>::decode(reader)
        .map(Zeroizing::new)
        .map_err(field(what))
}

fn field(what: &str) -> impl Fn(ssh_encoding::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

#[cfg(test)]
mod tests {
    use ssh_encoding::Encode;

    use super::*;

    fn string(out: &mut Vec<u8>, bytes: &[u8]) {
        bytes.encode(out).unwrap();
    }

    #[test]
    fn a_short_ecdsa_scalar_is_widened() {
        let key = ssh_key::PrivateKey::random(
            &mut rand_core::OsRng,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
        )
        .unwrap();
        let KeypairData::Ecdsa(EcdsaKeypair::NistP256 { public, private }) = key.key_data() else {
            unreachable!()
        };
        let mut frame = Vec::new();
        "ecdsa-sha2-nistp256".encode(&mut frame).unwrap();
        "nistp256".encode(&mut frame).unwrap();
        string(&mut frame, public.as_bytes());
        // The scalar with its leading zero bytes stripped, as OpenSSH sends it.
        let mut scalar = private.as_slice().to_vec();
        scalar[0] = 0;
        scalar[1] = 0;
        Mpint::from_positive_bytes(&scalar)
            .unwrap()
            .encode(&mut frame)
            .unwrap();
        let decoded = decode(&mut frame.as_slice()).unwrap();
        let KeypairData::Ecdsa(EcdsaKeypair::NistP256 { private, .. }) = *decoded.keypair else {
            panic!("not P-256")
        };
        assert_eq!(private.as_slice(), scalar.as_slice());
    }

    #[test]
    fn dsa_unknown_types_and_wrong_curves_are_refused() {
        let mut dsa = Vec::new();
        "ssh-dss".encode(&mut dsa).unwrap();
        assert!(decode(&mut dsa.as_slice()).unwrap_err().contains("DSA"));
        let mut unknown = Vec::new();
        "ssh-foo@example.com".encode(&mut unknown).unwrap();
        assert!(decode(&mut unknown.as_slice())
            .unwrap_err()
            .contains("unknown key type"));
        let mut curve = Vec::new();
        "ecdsa-sha2-nistp256".encode(&mut curve).unwrap();
        "nistp384".encode(&mut curve).unwrap();
        assert!(decode(&mut curve.as_slice())
            .unwrap_err()
            .contains("does not match"));
    }

    #[test]
    fn an_ed25519_certificate_needs_its_own_key() {
        let ca = ssh_key::PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519).unwrap();
        let subject =
            ssh_key::PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519).unwrap();
        let other = Ed25519Keypair::from_seed(&[7; 32]);
        let mut builder = ssh_key::certificate::Builder::new_with_random_nonce(
            &mut rand_core::OsRng,
            subject.public_key().key_data().clone(),
            0,
            // 2100-01-01: ssh-key's builder refuses "forever".
            4_102_444_800,
        )
        .unwrap();
        builder.valid_principal("alice").unwrap();
        let cert = builder.sign(&ca).unwrap();
        let frame = |keypair: &Ed25519Keypair| {
            let mut out = Vec::new();
            "ssh-ed25519-cert-v01@openssh.com".encode(&mut out).unwrap();
            cert.encode_prefixed(&mut out).unwrap();
            keypair.encode(&mut out).unwrap();
            out
        };
        let KeypairData::Ed25519(own) = subject.key_data() else {
            unreachable!()
        };
        let decoded = decode(&mut frame(own).as_slice()).unwrap();
        assert!(decoded.certificate.is_some());
        assert!(decode(&mut frame(&other).as_slice())
            .unwrap_err()
            .contains("does not match the certificate"));
    }
}
