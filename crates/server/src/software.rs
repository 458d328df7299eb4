//! Software keys: private keys a client adds with `ssh-add`, held in memory.
//!
//! Each added credential (a key, or a key with its certificate) is one entry,
//! as in OpenSSH's agent: `ssh-add id_ed25519` with `id_ed25519-cert.pub` adds
//! two. Secret halves are zeroized when an entry is removed and when the agent
//! exits (`ssh-key` and `rsa` zeroize their private types on drop).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::proto::message::encode_blob;
use async_trait::async_trait;
use rand_core::OsRng;
use rsa::Pkcs1v15Sign;
use sha2::Digest;
use signature::Signer;
use ssh_key::private::{KeypairData, RsaKeypair};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, Signature};
use token_agent_core::{
    AddKey, Backend, Error, Identity, IdentitySink, KeyRef, Prompter, RsaHash, SignContext,
    SignRequest, SshSignature,
};

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

/// A private key ready to sign. RSA keys keep their CRT form so each signature
/// does not recompute it.
enum KeySigner {
    Rsa(Box<rsa::RsaPrivateKey>),
    Other(KeypairData),
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
        signer.sign(&request.data, request.flags.rsa_hash())
    }

    fn accepts_key(&self, algorithm: &Algorithm) -> bool {
        matches!(
            algorithm,
            Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. }
        )
    }

    async fn add_key(&self, key: AddKey) -> Result<Identity, Error> {
        let public = KeyData::try_from(&key.keypair).map_err(|e| Error::InvalidKey {
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
        let signer = Arc::new(KeySigner::new(key.keypair)?);
        let mut entries = self.entries();
        // Adding a key again replaces it, comment and all, as in OpenSSH.
        entries.retain(|e| e.identity.key() != identity.key());
        entries.push(Entry {
            identity: identity.clone(),
            signer,
        });
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

impl KeySigner {
    fn new(keypair: KeypairData) -> Result<Self, Error> {
        match &keypair {
            KeypairData::Rsa(rsa) => Ok(Self::Rsa(Box::new(rsa_private_key(rsa)?))),
            KeypairData::Ed25519(_) | KeypairData::Ecdsa(_) => Ok(Self::Other(keypair)),
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
                // Blinded PKCS#1 v1.5 over the digest the client asked for.
                let (padding, digest) = match rsa_hash {
                    RsaHash::Sha1 => (
                        Pkcs1v15Sign::new::<sha1::Sha1>(),
                        sha1::Sha1::digest(data).to_vec(),
                    ),
                    RsaHash::Sha256 => (
                        Pkcs1v15Sign::new::<sha2::Sha256>(),
                        sha2::Sha256::digest(data).to_vec(),
                    ),
                    RsaHash::Sha512 => (
                        Pkcs1v15Sign::new::<sha2::Sha512>(),
                        sha2::Sha512::digest(data).to_vec(),
                    ),
                };
                let raw = key
                    .sign_with_rng(&mut OsRng, padding, &digest)
                    .map_err(|e| failed(&e))?;
                Ok(SshSignature::rsa(rsa_hash, &raw))
            }
            Self::Other(keypair) => {
                let signature: Signature = keypair.try_sign(data).map_err(|e| failed(&e))?;
                SshSignature::try_from(&signature).map_err(|e| failed(&e))
            }
        }
    }
}

/// The `rsa` crate's key for an OpenSSH RSA key pair, with its CRT values.
///
/// Built here rather than with `ssh-key`'s `TryFrom`, which (in 0.6.7) passes
/// the prime `p` twice instead of `p` and `q`, and so rejects every key.
fn rsa_private_key(keypair: &RsaKeypair) -> Result<rsa::RsaPrivateKey, Error> {
    let int = |mpint: &ssh_key::Mpint| {
        mpint
            .as_positive_bytes()
            .map(rsa::BigUint::from_bytes_be)
            .ok_or_else(|| Error::InvalidKey {
                reason: "RSA key component is not a positive integer".into(),
            })
    };
    let mut key = rsa::RsaPrivateKey::from_components(
        int(&keypair.public.n)?,
        int(&keypair.public.e)?,
        int(&keypair.private.d)?,
        vec![int(&keypair.private.p)?, int(&keypair.private.q)?],
    )
    .map_err(|e| Error::InvalidKey {
        reason: format!("RSA key is inconsistent: {e}"),
    })?;
    key.validate().map_err(|e| Error::InvalidKey {
        reason: format!("RSA key is inconsistent: {e}"),
    })?;
    key.precompute().map_err(|e| Error::InvalidKey {
        reason: format!("RSA key is inconsistent: {e}"),
    })?;
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
            keypair,
            comment: "test".into(),
            certificate: None,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn signs_with_each_rsa_hash_the_flags_ask_for() {
        let keys = SoftwareKeys::new();
        let rsa = RsaKeypair::random(&mut OsRng, 2048).unwrap();
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
