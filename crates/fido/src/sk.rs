//! OpenSSH security keys: the key (PROTOCOL.u2f "SSH U2F keys") and the
//! signature made from an assertion (PROTOCOL.u2f "SSH U2F signatures").

use std::fmt;

use p256::ecdsa::Signature as P256Signature;
use sha2::{Digest, Sha256};
use ssh_key::private::{KeypairData, SkEcdsaSha2NistP256, SkEd25519};
use ssh_key::public::{self, KeyData};
use ssh_key::Algorithm;
use token_agent_core::{Error, SshSignature};

use crate::ctap::{Assertion, CoseAlgorithm, CredentialPublicKey};

/// SSH_SK_USER_PRESENCE_REQD: every signature needs a touch (cleared by
/// `ssh-keygen -O no-touch-required`).
pub const USER_PRESENCE_REQUIRED: u8 = 0x01;
/// SSH_SK_USER_VERIFICATION_REQD: every signature needs the PIN (`-O verify-required`).
pub const USER_VERIFICATION_REQUIRED: u8 = 0x04;
/// SSH_SK_FORCE_OPERATION: overwrite a resident credential on enrolment.
pub const FORCE_OPERATION: u8 = 0x10;
/// SSH_SK_RESIDENT_KEY: the credential is stored on the device (`-O resident`).
pub const RESIDENT_KEY: u8 = 0x20;

/// An sk key as OpenSSH's key file and ssh-add hold it: the public key, the
/// application, the flags and the key handle. Nothing here is secret: the
/// private key stays in the authenticator (or is wrapped inside the handle).
#[derive(Clone, PartialEq, Eq)]
pub struct SkKey {
    public: KeyData,
    flags: u8,
    key_handle: Vec<u8>,
}

impl SkKey {
    /// The sk key in `keypair`; `None` for any other kind of key.
    pub fn from_keypair(keypair: &KeypairData) -> Option<Self> {
        match keypair {
            KeypairData::SkEd25519(key) => Some(Self {
                public: KeyData::SkEd25519(key.public().clone()),
                flags: key.flags(),
                key_handle: key.key_handle().to_vec(),
            }),
            KeypairData::SkEcdsaSha2NistP256(key) => Some(Self {
                public: KeyData::SkEcdsaSha2NistP256(key.public().clone()),
                flags: key.flags(),
                key_handle: key.key_handle().to_vec(),
            }),
            _ => None,
        }
    }

    /// The sk key for a credential made or found on an authenticator.
    pub fn from_credential(
        public_key: &CredentialPublicKey,
        application: &str,
        flags: u8,
        key_handle: Vec<u8>,
    ) -> Result<Self, Error> {
        let public = match public_key {
            CredentialPublicKey::Ed25519(point) => KeyData::SkEd25519(public::SkEd25519::new(
                public::Ed25519PublicKey(*point),
                application,
            )),
            CredentialPublicKey::P256(sec1) => {
                let point = public::EcdsaPublicKey::from_sec1_bytes(sec1)
                    .map_err(|e| invalid(format!("bad P-256 public key: {e}")))?;
                match point {
                    public::EcdsaPublicKey::NistP256(point) => KeyData::SkEcdsaSha2NistP256(
                        public::SkEcdsaSha2NistP256::new(point, application),
                    ),
                    _ => return Err(invalid("not a P-256 public key".into())),
                }
            }
        };
        Ok(Self {
            public,
            flags,
            key_handle,
        })
    }

    /// The public key (with its application).
    pub fn public_key(&self) -> &KeyData {
        &self.public
    }

    /// The application, the FIDO relying party id ("ssh:" by default).
    pub fn application(&self) -> &str {
        match &self.public {
            KeyData::SkEd25519(key) => key.application(),
            KeyData::SkEcdsaSha2NistP256(key) => key.application(),
            // Only sk public keys are ever stored in an SkKey.
            _ => "",
        }
    }

    /// The key handle (the FIDO credential id).
    pub fn key_handle(&self) -> &[u8] {
        &self.key_handle
    }

    /// The SSH_SK_* flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether a signature needs a touch.
    pub fn needs_touch(&self) -> bool {
        self.flags & USER_PRESENCE_REQUIRED != 0
    }

    /// Whether a signature needs the PIN.
    pub fn needs_pin(&self) -> bool {
        self.flags & USER_VERIFICATION_REQUIRED != 0
    }

    /// The COSE algorithm of the credential.
    pub fn algorithm(&self) -> CoseAlgorithm {
        match self.public.algorithm() {
            Algorithm::SkEd25519 => CoseAlgorithm::EdDsa,
            _ => CoseAlgorithm::Es256,
        }
    }

    /// The key as OpenSSH's private key file and SSH2_AGENTC_ADD_IDENTITY carry it.
    pub fn to_keypair(&self) -> Result<KeypairData, Error> {
        match &self.public {
            KeyData::SkEd25519(public) => Ok(KeypairData::SkEd25519(
                SkEd25519::new(public.clone(), self.flags, self.key_handle.clone())
                    .map_err(|e| invalid(e.to_string()))?,
            )),
            KeyData::SkEcdsaSha2NistP256(public) => Ok(KeypairData::SkEcdsaSha2NistP256(
                SkEcdsaSha2NistP256::new(public.clone(), self.flags, self.key_handle.clone())
                    .map_err(|e| invalid(e.to_string()))?,
            )),
            _ => Err(invalid("not a security-key key".into())),
        }
    }

    /// The SSH signature an assertion makes for this key (PROTOCOL.u2f "SSH U2F
    /// signatures"): the authenticator's signature, its flags and its counter.
    pub fn signature(&self, assertion: &Assertion) -> Result<SshSignature, Error> {
        match &self.public {
            KeyData::SkEcdsaSha2NistP256(_) => {
                // CTAP returns ES256 signatures in ASN.1 DER; SSH wants r and s.
                let sig = P256Signature::from_der(&assertion.signature)
                    .map_err(|e| invalid(format!("bad ES256 signature: {e}")))?;
                let (r, s) = sig.split_bytes();
                self.signature_from_parts(assertion.flags.0, assertion.counter, &r, &s)
            }
            _ => self.signature_from_parts(
                assertion.flags.0,
                assertion.counter,
                &assertion.signature,
                &[],
            ),
        }
    }

    /// The SSH signature for what a middleware's `sk_sign` returned
    /// (`struct sk_sign_response`), encoded as OpenSSH's `ssh-sk.c` does
    /// (PROTOCOL.u2f "SSH U2F signatures"): for Ed25519, `sig_r` is the
    /// 64-byte signature and `sig_s` is empty; for ECDSA they are the
    /// big-endian integers r and s.
    pub fn signature_from_parts(
        &self,
        flags: u8,
        counter: u32,
        sig_r: &[u8],
        sig_s: &[u8],
    ) -> Result<SshSignature, Error> {
        match &self.public {
            KeyData::SkEd25519(_) => {
                if sig_r.len() != 64 || !sig_s.is_empty() {
                    return Err(invalid(format!(
                        "the authenticator returned a {}-byte Ed25519 signature",
                        sig_r.len() + sig_s.len()
                    )));
                }
                Ok(SshSignature::sk_ed25519(sig_r, flags, counter))
            }
            KeyData::SkEcdsaSha2NistP256(_) => {
                // A P-256 scalar has 32 bytes; leading zeros may be dropped.
                let fits = |n: &[u8]| {
                    let significant = n.iter().skip_while(|&&b| b == 0).count();
                    significant > 0 && significant <= 32
                };
                if !fits(sig_r) || !fits(sig_s) {
                    return Err(invalid(format!(
                        "the authenticator returned an ECDSA signature with a {}-byte r and a \
                         {}-byte s",
                        sig_r.len(),
                        sig_s.len()
                    )));
                }
                Ok(SshSignature::sk_ecdsa(sig_r, sig_s, flags, counter))
            }
            _ => Err(invalid("not a security-key key".into())),
        }
    }
}

impl fmt::Debug for SkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SkKey")
            .field("algorithm", &self.public.algorithm().to_string())
            .field("application", &self.application())
            .field("flags", &format_args!("{:#04x}", self.flags))
            .field("key_handle_len", &self.key_handle.len())
            .finish()
    }
}

/// The clientDataHash OpenSSH passes for a signature: SHA-256 of the data.
pub fn client_data_hash(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Whether `algorithm` is an sk key type the backend signs with.
pub fn is_sk(algorithm: &Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::SkEd25519 | Algorithm::SkEcdsaSha2NistP256
    )
}

fn invalid(reason: String) -> Error {
    Error::InvalidKey { reason }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signer as _;
    use signature::Verifier as _;

    use super::*;
    use crate::ctap::AuthFlags;

    /// authenticatorData || clientDataHash, as an authenticator signs it.
    fn signed_data(application: &str, flags: u8, counter: u32, data: &[u8]) -> Vec<u8> {
        let mut signed = Sha256::digest(application.as_bytes()).to_vec();
        signed.push(flags);
        signed.extend_from_slice(&counter.to_be_bytes());
        signed.extend_from_slice(&client_data_hash(data));
        signed
    }

    fn verify(key: &SkKey, data: &[u8], signature: &SshSignature) -> bool {
        let Ok(parsed) = ssh_key::Signature::try_from(signature.as_bytes()) else {
            return false;
        };
        key.public_key().verify(data, &parsed).is_ok()
    }

    #[test]
    fn ed25519_assertions_become_protocol_u2f_signatures() {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let key = SkKey::from_credential(
            &CredentialPublicKey::Ed25519(signing.verifying_key().to_bytes()),
            "ssh:test",
            USER_PRESENCE_REQUIRED,
            vec![1, 2, 3],
        )
        .unwrap();
        let assertion = Assertion {
            flags: AuthFlags(AuthFlags::USER_PRESENT),
            counter: 42,
            signature: signing
                .sign(&signed_data("ssh:test", 1, 42, b"data"))
                .to_bytes()
                .to_vec(),
        };
        let signature = key.signature(&assertion).unwrap();
        assert_eq!(signature.algorithm(), "sk-ssh-ed25519@openssh.com");
        // string name, string signature (64), byte flags, uint32 counter.
        let blob = signature.as_bytes();
        assert_eq!(blob.len(), 4 + 26 + 4 + 64 + 1 + 4);
        assert_eq!(&blob[blob.len() - 5..], &[1, 0, 0, 0, 42]);
        assert!(verify(&key, b"data", &signature));
        assert!(!verify(&key, b"other data", &signature));
    }

    #[test]
    fn es256_assertions_become_protocol_u2f_signatures() {
        let signing = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
        let point = signing.verifying_key().to_encoded_point(false);
        let key = SkKey::from_credential(
            &CredentialPublicKey::P256(point.as_bytes().to_vec()),
            "ssh:",
            USER_PRESENCE_REQUIRED | USER_VERIFICATION_REQUIRED,
            vec![4; 64],
        )
        .unwrap();
        assert!(key.needs_pin());
        let der: p256::ecdsa::DerSignature = signing.sign(&signed_data("ssh:", 5, 7, b"msg"));
        let assertion = Assertion {
            flags: AuthFlags(5),
            counter: 7,
            signature: der.as_bytes().to_vec(),
        };
        let signature = key.signature(&assertion).unwrap();
        assert_eq!(signature.algorithm(), "sk-ecdsa-sha2-nistp256@openssh.com");
        // The flags and counter follow the signature string, outside it.
        assert_eq!(
            &signature.as_bytes()[signature.as_bytes().len() - 5..],
            &[5, 0, 0, 0, 7]
        );
        assert!(verify(&key, b"msg", &signature));
        // A wrong counter in the blob breaks the signature.
        let mut tampered = signature.as_bytes().to_vec();
        let last = tampered.len() - 1;
        tampered[last] = 8;
        let parsed = ssh_key::Signature::try_from(tampered.as_slice()).unwrap();
        assert!(key.public_key().verify(b"msg", &parsed).is_err());
    }

    #[test]
    fn key_files_round_trip_through_keypair_data() {
        let key = SkKey::from_credential(
            &CredentialPublicKey::Ed25519([3; 32]),
            "ssh:round",
            USER_PRESENCE_REQUIRED | RESIDENT_KEY,
            vec![5; 40],
        )
        .unwrap();
        let keypair = key.to_keypair().unwrap();
        let back = SkKey::from_keypair(&keypair).unwrap();
        assert_eq!(back, key);
        assert_eq!(back.application(), "ssh:round");
        assert!(back.needs_touch());
        assert!(!back.needs_pin());
        let file = ssh_key::PrivateKey::new(keypair, "c").unwrap();
        let text = file.to_openssh(ssh_key::LineEnding::LF).unwrap();
        let read = ssh_key::PrivateKey::from_openssh(text.as_bytes()).unwrap();
        assert_eq!(SkKey::from_keypair(read.key_data()).unwrap(), key);
    }

    #[test]
    fn middleware_answers_make_the_same_signatures_as_assertions() {
        let signing = p256::ecdsa::SigningKey::from_slice(&[11; 32]).unwrap();
        let point = signing.verifying_key().to_encoded_point(false);
        let key = SkKey::from_credential(
            &CredentialPublicKey::P256(point.as_bytes().to_vec()),
            "ssh:",
            USER_PRESENCE_REQUIRED,
            vec![1; 32],
        )
        .unwrap();
        let der: p256::ecdsa::DerSignature = signing.sign(&signed_data("ssh:", 1, 3, b"m"));
        let from_assertion = key
            .signature(&Assertion {
                flags: AuthFlags(1),
                counter: 3,
                signature: der.as_bytes().to_vec(),
            })
            .unwrap();
        let plain = p256::ecdsa::Signature::from_der(der.as_bytes()).unwrap();
        let (r, s) = plain.split_bytes();
        // sk_sign returns r and s without leading zeros (BN_bn2bin).
        let strip = |n: &[u8]| {
            n.iter()
                .skip_while(|&&b| b == 0)
                .copied()
                .collect::<Vec<_>>()
        };
        let from_parts = key
            .signature_from_parts(1, 3, &strip(&r), &strip(&s))
            .unwrap();
        assert_eq!(from_parts.as_bytes(), from_assertion.as_bytes());
        assert!(verify(&key, b"m", &from_parts));
        assert!(key.signature_from_parts(1, 3, &[1; 33], &s).is_err());
        assert!(key.signature_from_parts(1, 3, &[], &s).is_err());
    }

    #[test]
    fn short_ed25519_signatures_are_refused() {
        let key =
            SkKey::from_credential(&CredentialPublicKey::Ed25519([3; 32]), "ssh:", 1, vec![1])
                .unwrap();
        let assertion = Assertion {
            flags: AuthFlags(1),
            counter: 1,
            signature: vec![0; 63],
        };
        assert!(key.signature(&assertion).is_err());
    }
}
