//! Software keys: private keys a client adds with `ssh-add`, held in memory.
//!
//! Each added credential (a key, or a key with its certificate) is one entry,
//! as in OpenSSH's agent: `ssh-add id_ed25519` with `id_ed25519-cert.pub` adds
//! two. Secret halves are zeroized when an entry is removed and when the agent
//! exits: `ssh-key` zeroizes its private types on drop, and OpenSSL clears the
//! private numbers of RSA and EC keys when they are freed (`BN_clear_free`).
//!
//! RSA and ECDSA sign with OpenSSL, as OpenSSH's agent does, on the blocking
//! thread pool: a 2048-bit RSA signature takes about a millisecond of CPU, and
//! running it on the async workers would stall every other client. Ed25519
//! signs in tens of microseconds and runs inline.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use async_trait::async_trait;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::{hash, MessageDigest};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::Signer;
use sha2::Digest;
use signature::Signer as _;
use ssh_key::private::{EcdsaKeypair, KeypairData, RsaKeypair};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, EcdsaCurve, Signature};
use token_agent_core::{
    AddKey, Backend, Error, Identity, IdentitySink, KeyRef, Prompter, RsaHash, SignContext,
    SignRequest, SshSignature,
};
use zeroize::Zeroizing;

use crate::mldsa;
use crate::proto::message::encode_blob;

/// The name software keys are routed by.
pub const NAME: &str = "software";

/// Keys held in the agent's memory.
#[derive(Debug, Default)]
pub struct SoftwareKeys {
    entries: Mutex<Vec<Entry>>,
    sink: OnceLock<IdentitySink>,
}

struct Entry {
    identity: Identity,
    signer: Arc<KeySigner>,
}

/// A private key ready to sign, in the form its signer wants.
enum KeySigner {
    Rsa(PKey<Private>),
    Ecdsa {
        key: EcKey<Private>,
        curve: EcdsaCurve,
    },
    Ed25519(Box<KeypairData>),
    /// ssh-mldsa44-ed25519@openssh.com, with both halves expanded once.
    MlDsa44Ed25519(Box<mldsa::Keypair>),
}

impl SoftwareKeys {
    /// An empty key store.
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        // A panic while holding this lock leaves only whole entries behind.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, entries: &[Entry]) {
        if let Some(sink) = self.sink.get() {
            sink.publish(entries.iter().map(|e| e.identity.clone()).collect());
        }
    }
}

#[async_trait]
impl Backend for SoftwareKeys {
    fn name(&self) -> &str {
        NAME
    }

    fn start(&self, sink: IdentitySink) {
        let entries = self.entries();
        if self.sink.set(sink).is_ok() {
            self.publish(&entries);
        }
    }

    async fn sign(
        &self,
        key: &KeyRef,
        request: &SignRequest,
        _context: &SignContext,
        _prompter: Arc<dyn Prompter>,
    ) -> Result<SshSignature, Error> {
        let signer = self
            .entries()
            .iter()
            .find(|e| e.identity.key() == key)
            .map(|e| e.signer.clone())
            .ok_or(Error::KeyNotFound)?;
        let hash = request.flags.rsa_hash();
        if matches!(*signer, KeySigner::Ed25519(_)) {
            return signer.sign(&request.data, hash);
        }
        let data = request.data.clone();
        tokio::task::spawn_blocking(move || signer.sign(&data, hash))
            .await
            .map_err(|e| Error::InvalidKey {
                reason: format!("signing failed: {e}"),
            })?
    }

    fn accepts_key(&self, algorithm: &Algorithm) -> bool {
        match algorithm {
            Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. } => true,
            Algorithm::Other(name) => name.as_str() == mldsa::ALGORITHM,
            _ => false,
        }
    }

    async fn add_key(&self, key: AddKey) -> Result<Identity, Error> {
        let public = KeyData::try_from(&*key.keypair).map_err(|e| Error::InvalidKey {
            reason: e.to_string(),
        })?;
        if let Some(cert) = &key.certificate {
            if cert.public_key() != &public {
                return Err(Error::InvalidKey {
                    reason: "the certificate does not certify this key".into(),
                });
            }
        }
        let blob = match &key.certificate {
            Some(cert) => encode_blob(cert.as_ref()),
            None => encode_blob(&public),
        }
        .map_err(|e| Error::InvalidKey {
            reason: e.to_string(),
        })?;
        let handle = sha2::Sha256::digest(&blob).to_vec();
        let mut identity = Identity::new(public, key.comment, KeyRef::new(NAME, handle));
        if let Some(cert) = key.certificate {
            identity = identity.with_certificate(cert);
        }
        let signer = Arc::new(KeySigner::new(key.keypair, key.opaque_secret)?);
        let mut entries = self.entries();
        let entry = Entry {
            identity: identity.clone(),
            signer,
        };
        // Adding a key again replaces it, comment and all, in its place in
        // the list, as in OpenSSH.
        match entries
            .iter_mut()
            .find(|e| e.identity.key() == identity.key())
        {
            Some(held) => *held = entry,
            None => entries.push(entry),
        }
        self.publish(&entries);
        Ok(identity)
    }

    async fn remove_key(&self, key: &KeyRef) -> Result<(), Error> {
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|e| e.identity.key() != key);
        if entries.len() == before {
            return Err(Error::KeyNotFound);
        }
        self.publish(&entries);
        Ok(())
    }

    async fn remove_all(&self) {
        let mut entries = self.entries();
        entries.clear();
        self.publish(&entries);
    }
}

/// The shortest RSA key held, in bits.
const MIN_RSA_BITS: u32 = 1024;

impl KeySigner {
    fn new(
        keypair: Box<KeypairData>,
        opaque_secret: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Self, Error> {
        let invalid = |e: openssl::error::ErrorStack| Error::InvalidKey {
            reason: format!("the key is inconsistent: {e}"),
        };
        match &*keypair {
            KeypairData::Rsa(rsa) => {
                let key = rsa_key(rsa).map_err(invalid)?;
                // As OpenSSH (SSH_RSA_MINIMUM_MODULUS_SIZE).
                if key.bits() < MIN_RSA_BITS {
                    return Err(Error::InvalidKey {
                        reason: format!(
                            "a {}-bit RSA key is too short: OpenSSH refuses keys under \
                             {MIN_RSA_BITS} bits",
                            key.bits()
                        ),
                    });
                }
                Ok(Self::Rsa(key))
            }
            KeypairData::Ecdsa(ecdsa) => Ok(Self::Ecdsa {
                key: ec_key(ecdsa).map_err(invalid)?,
                curve: ecdsa.curve(),
            }),
            KeypairData::Ed25519(_) => Ok(Self::Ed25519(keypair)),
            KeypairData::Other(opaque)
                if opaque.public.algorithm().as_str() == mldsa::ALGORITHM =>
            {
                let secret = opaque_secret.ok_or_else(|| Error::InvalidKey {
                    reason: "the ML-DSA key came without its private half".into(),
                })?;
                let keypair = mldsa::Keypair::from_openssh(opaque.public.as_ref(), &secret)
                    .map_err(|e| Error::InvalidKey {
                        reason: e.to_string(),
                    })?;
                Ok(Self::MlDsa44Ed25519(Box::new(keypair)))
            }
            other => Err(Error::InvalidKey {
                reason: format!(
                    "{} keys cannot be held in software",
                    other
                        .algorithm()
                        .map_or("unknown".into(), |a| a.to_string())
                ),
            }),
        }
    }

    fn sign(&self, data: &[u8], rsa_hash: RsaHash) -> Result<SshSignature, Error> {
        let failed = |e: &dyn std::fmt::Display| Error::InvalidKey {
            reason: format!("signing failed: {e}"),
        };
        match self {
            Self::Rsa(key) => {
                let digest = match rsa_hash {
                    RsaHash::Sha1 => MessageDigest::sha1(),
                    RsaHash::Sha256 => MessageDigest::sha256(),
                    RsaHash::Sha512 => MessageDigest::sha512(),
                };
                // PKCS#1 v1.5; OpenSSL blinds RSA private-key operations.
                let mut signer = Signer::new(digest, key).map_err(|e| failed(&e))?;
                signer
                    .set_rsa_padding(Padding::PKCS1)
                    .map_err(|e| failed(&e))?;
                let raw = signer.sign_oneshot_to_vec(data).map_err(|e| failed(&e))?;
                Ok(SshSignature::rsa(rsa_hash, &raw))
            }
            Self::Ecdsa { key, curve } => {
                // RFC 5656 section 6.2.1: the hash follows the curve size.
                let digest = match curve {
                    EcdsaCurve::NistP256 => hash(MessageDigest::sha256(), data),
                    EcdsaCurve::NistP384 => hash(MessageDigest::sha384(), data),
                    EcdsaCurve::NistP521 => hash(MessageDigest::sha512(), data),
                }
                .map_err(|e| failed(&e))?;
                let signature = EcdsaSig::sign(&digest, key).map_err(|e| failed(&e))?;
                Ok(SshSignature::ecdsa(
                    *curve,
                    &signature.r().to_vec(),
                    &signature.s().to_vec(),
                ))
            }
            Self::Ed25519(keypair) => {
                let signature: Signature = keypair.try_sign(data).map_err(|e| failed(&e))?;
                SshSignature::try_from(&signature).map_err(|e| failed(&e))
            }
            Self::MlDsa44Ed25519(keypair) => {
                let raw = keypair.sign_raw(data).map_err(|e| failed(&e))?;
                Ok(SshSignature::plain(mldsa::ALGORITHM, &raw))
            }
        }
    }
}

/// OpenSSL's RSA key for an OpenSSH RSA key pair. OpenSSH keys carry p, q and
/// q⁻¹ mod p; the other CRT values, d mod (p-1) and d mod (q-1), are derived.
fn rsa_key(keypair: &RsaKeypair) -> Result<PKey<Private>, openssl::error::ErrorStack> {
    let int = |mpint: &ssh_key::Mpint| BigNum::from_slice(mpint.as_positive_bytes().unwrap_or(&[]));
    let (d, p, q) = (
        int(&keypair.private.d)?,
        int(&keypair.private.p)?,
        int(&keypair.private.q)?,
    );
    let mut ctx = BigNumContext::new_secure()?;
    let one = BigNum::from_u32(1)?;
    let mut p1 = BigNum::new_secure()?;
    p1.checked_sub(&p, &one)?;
    let mut q1 = BigNum::new_secure()?;
    q1.checked_sub(&q, &one)?;
    let mut dmp1 = BigNum::new_secure()?;
    dmp1.nnmod(&d, &p1, &mut ctx)?;
    let mut dmq1 = BigNum::new_secure()?;
    dmq1.nnmod(&d, &q1, &mut ctx)?;
    let rsa = Rsa::from_private_components(
        int(&keypair.public.n)?,
        int(&keypair.public.e)?,
        d,
        p,
        q,
        dmp1,
        dmq1,
        int(&keypair.private.iqmp)?,
    )?;
    // Consistency, not primality: n = p·q and e·d ≡ 1 modulo p-1 and q-1 mean
    // the key signs correctly. (RSA_check_key would also test p and q for
    // primality, which costs milliseconds and pages of libcrypto for nothing
    // the agent needs: OpenSSH's agent does not test them either.)
    let consistent = {
        let (Some(p), Some(q), d) = (rsa.p(), rsa.q(), rsa.d()) else {
            return Err(openssl::error::ErrorStack::get());
        };
        let mut product = BigNum::new()?;
        product.checked_mul(p, q, &mut ctx)?;
        let mut ed = BigNum::new_secure()?;
        ed.checked_mul(rsa.e(), d, &mut ctx)?;
        let mut residue_p = BigNum::new_secure()?;
        residue_p.nnmod(&ed, &p1, &mut ctx)?;
        let mut residue_q = BigNum::new_secure()?;
        residue_q.nnmod(&ed, &q1, &mut ctx)?;
        product == *rsa.n() && residue_p == one && residue_q == one
    };
    if !consistent {
        return Err(openssl::error::ErrorStack::get());
    }
    PKey::from_rsa(rsa)
}

/// OpenSSL's EC key for an OpenSSH ECDSA key pair.
fn ec_key(keypair: &EcdsaKeypair) -> Result<EcKey<Private>, openssl::error::ErrorStack> {
    let (nid, public, private) = match keypair {
        EcdsaKeypair::NistP256 { public, private } => {
            (Nid::X9_62_PRIME256V1, public.as_bytes(), private.as_slice())
        }
        EcdsaKeypair::NistP384 { public, private } => {
            (Nid::SECP384R1, public.as_bytes(), private.as_slice())
        }
        EcdsaKeypair::NistP521 { public, private } => {
            (Nid::SECP521R1, public.as_bytes(), private.as_slice())
        }
    };
    let group = EcGroup::from_curve_name(nid)?;
    let mut ctx = BigNumContext::new()?;
    let point = EcPoint::from_bytes(&group, public, &mut ctx)?;
    let scalar = BigNum::from_slice(private)?;
    let key = EcKey::from_private_components(&group, &scalar, &point)?;
    key.check_key()?;
    Ok(key)
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The bytes a key or certificate is listed with.
pub(crate) fn identity_blob(identity: &Identity) -> Result<Vec<u8>, ssh_encoding::Error> {
    match identity.certificate() {
        Some(cert) => encode_blob(cert),
        None => encode_blob(identity.public_key()),
    }
}

#[cfg(test)]
mod tests {
    use signature::Verifier;
    use ssh_key::private::Ed25519Keypair;
    use token_agent_core::SignFlags;

    use super::*;

    #[derive(Debug)]
    struct NoPrompt;

    #[async_trait]
    impl Prompter for NoPrompt {
        async fn pin(
            &self,
            _: &token_agent_core::PinRequest,
        ) -> Result<token_agent_core::SecretString, token_agent_core::PromptError> {
            Err(token_agent_core::PromptError::Cancelled)
        }
        async fn confirm(
            &self,
            _: &token_agent_core::ConfirmRequest,
        ) -> Result<bool, token_agent_core::PromptError> {
            Ok(false)
        }
        fn notify(&self, _: &token_agent_core::Notice) -> token_agent_core::NoticeGuard {
            token_agent_core::NoticeGuard::none()
        }
    }

    async fn add(keys: &SoftwareKeys, keypair: KeypairData) -> Identity {
        keys.add_key(AddKey {
            keypair: Box::new(keypair),
            opaque_secret: None,
            comment: "test".into(),
            certificate: None,
            sk_provider: None,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn signs_with_each_rsa_hash_the_flags_ask_for() {
        let keys = SoftwareKeys::new();
        let rsa = RsaKeypair::random(&mut rand_core::OsRng, 2048).unwrap();
        let public = KeyData::Rsa(rsa.public.clone());
        let id = add(&keys, KeypairData::Rsa(rsa)).await;
        for (flags, name) in [(2, "rsa-sha2-256"), (4, "rsa-sha2-512"), (0, "ssh-rsa")] {
            let request = SignRequest {
                data: b"hello".to_vec(),
                flags: SignFlags::from_bits(flags),
            };
            let sig = keys
                .sign(
                    id.key(),
                    &request,
                    &SignContext::default(),
                    Arc::new(NoPrompt),
                )
                .await
                .unwrap();
            assert_eq!(sig.algorithm(), name);
            if flags != 0 {
                let parsed = Signature::try_from(sig.as_bytes()).unwrap();
                public.verify(b"hello", &parsed).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn signs_and_verifies_with_every_key_type() {
        use ssh_key::private::EcdsaKeypair;
        let keys = SoftwareKeys::new();
        let mut rng = rand_core::OsRng;
        let keypairs = [
            KeypairData::Ed25519(Ed25519Keypair::random(&mut rng)),
            KeypairData::Ecdsa(EcdsaKeypair::random(&mut rng, EcdsaCurve::NistP256).unwrap()),
            KeypairData::Ecdsa(EcdsaKeypair::random(&mut rng, EcdsaCurve::NistP384).unwrap()),
            KeypairData::Ecdsa(EcdsaKeypair::random(&mut rng, EcdsaCurve::NistP521).unwrap()),
        ];
        for keypair in keypairs {
            let public = KeyData::try_from(&keypair).unwrap();
            let id = add(&keys, keypair).await;
            for round in 0..20u8 {
                let data = vec![round; 64];
                let request = SignRequest {
                    data: data.clone(),
                    flags: SignFlags::default(),
                };
                let sig = keys
                    .sign(
                        id.key(),
                        &request,
                        &SignContext::default(),
                        Arc::new(NoPrompt),
                    )
                    .await
                    .unwrap();
                let parsed = Signature::try_from(sig.as_bytes()).unwrap();
                public.verify(&data, &parsed).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn an_inconsistent_rsa_key_is_refused() {
        let mut rsa = RsaKeypair::random(&mut rand_core::OsRng, 2048).unwrap();
        rsa.private.d = ssh_key::Mpint::from_positive_bytes(&[0x42; 255]).unwrap();
        let result = SoftwareKeys::new()
            .add_key(AddKey {
                keypair: Box::new(KeypairData::Rsa(rsa)),
                opaque_secret: None,
                comment: "broken".into(),
                certificate: None,
                sk_provider: None,
            })
            .await;
        assert!(
            matches!(result, Err(Error::InvalidKey { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn rsa_keys_under_1024_bits_are_refused() {
        let rsa = openssl::rsa::Rsa::generate(768).unwrap();
        let mpint =
            |n: &openssl::bn::BigNumRef| ssh_key::Mpint::from_positive_bytes(&n.to_vec()).unwrap();
        let keypair = RsaKeypair {
            public: ssh_key::public::RsaPublicKey {
                e: mpint(rsa.e()),
                n: mpint(rsa.n()),
            },
            private: ssh_key::private::RsaPrivateKey {
                d: mpint(rsa.d()),
                iqmp: mpint(rsa.iqmp().unwrap()),
                p: mpint(rsa.p().unwrap()),
                q: mpint(rsa.q().unwrap()),
            },
        };
        let result = SoftwareKeys::new()
            .add_key(AddKey {
                keypair: Box::new(KeypairData::Rsa(keypair)),
                opaque_secret: None,
                comment: "short".into(),
                certificate: None,
                sk_provider: None,
            })
            .await;
        let Err(Error::InvalidKey { reason }) = result else {
            panic!("{result:?}");
        };
        assert!(reason.contains("768-bit"), "{reason}");
    }

    #[tokio::test]
    async fn a_key_added_again_keeps_its_place() {
        let keys = SoftwareKeys::new();
        let key = |seed| KeypairData::Ed25519(Ed25519Keypair::from_seed(&[seed; 32]));
        let first = add(&keys, key(1)).await;
        let second = add(&keys, key(2)).await;
        add(&keys, key(1)).await;
        let order: Vec<KeyRef> = keys
            .entries()
            .iter()
            .map(|e| e.identity.key().clone())
            .collect();
        assert_eq!(order, [first.key().clone(), second.key().clone()]);
    }

    #[tokio::test]
    async fn removal_forgets_the_key() {
        let keys = SoftwareKeys::new();
        let id = add(
            &keys,
            KeypairData::Ed25519(Ed25519Keypair::from_seed(&[7; 32])),
        )
        .await;
        keys.remove_key(id.key()).await.unwrap();
        let request = SignRequest {
            data: vec![],
            flags: SignFlags::default(),
        };
        assert!(matches!(
            keys.sign(
                id.key(),
                &request,
                &SignContext::default(),
                Arc::new(NoPrompt)
            )
            .await,
            Err(Error::KeyNotFound)
        ));
        assert!(matches!(
            keys.remove_key(id.key()).await,
            Err(Error::KeyNotFound)
        ));
    }
}
