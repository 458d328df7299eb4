//! The conformance suite every [`Backend`] passes, run against its real module
//! or simulator: list, sign with every key type, a wrong PIN (asked once,
//! never retried), and a device that goes away.
//!
//! A backend's test builds the backend over its real device (SoftHSM, piv-sim
//! behind pcscd), starts it with [`Published::sink`], and calls these checks.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use signature::Verifier;
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, Signature};
use token_agent_core::{
    Backend, Error, Identity, IdentitySink, PromptError, Prompter, SignContext, SignFlags,
    SignRequest, SshSignature,
};
use token_agent_prompt::{Asked, Scripted, ScriptedAnswer};

/// What a backend has published, observable by tests.
#[derive(Debug, Clone, Default)]
pub struct Published {
    state: Arc<(Mutex<Option<Vec<Identity>>>, Condvar)>,
}

impl Published {
    /// A sink to start the backend with.
    pub fn sink(&self) -> IdentitySink {
        let state = self.state.clone();
        IdentitySink::new(move |identities| {
            let (lock, changed) = &*state;
            if let Ok(mut current) = lock.lock() {
                *current = Some(identities);
                changed.notify_all();
            }
        })
    }

    /// The latest list (empty before the first publication).
    pub fn current(&self) -> Vec<Identity> {
        self.state
            .0
            .lock()
            .map(|c| c.clone().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Waits up to `limit` for a published list that satisfies `condition`.
    pub fn wait_until(
        &self,
        limit: Duration,
        condition: impl Fn(&[Identity]) -> bool,
    ) -> anyhow::Result<Vec<Identity>> {
        let (lock, changed) = &*self.state;
        let guard = lock.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let (guard, _) = changed
            .wait_timeout_while(guard, limit, |current| {
                !current.as_deref().is_some_and(&condition)
            })
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        match guard.as_deref() {
            Some(list) if condition(list) => Ok(list.to_vec()),
            other => bail!(
                "the backend did not publish the expected identities within {limit:?}; last: {:?}",
                other.map(|l| l.iter().map(Identity::comment).collect::<Vec<_>>())
            ),
        }
    }
}

/// Checks that the identities include one key of each `algorithms`, each with a
/// device and a non-empty comment.
pub fn lists_every_key_type(
    identities: &[Identity],
    algorithms: &[Algorithm],
) -> anyhow::Result<()> {
    for algorithm in algorithms {
        ensure!(
            identities
                .iter()
                .any(|id| &id.public_key().algorithm() == algorithm),
            "no {algorithm} key among {:?}",
            identities.iter().map(Identity::comment).collect::<Vec<_>>()
        );
    }
    for identity in identities {
        ensure!(!identity.comment().is_empty(), "an identity has no comment");
        ensure!(
            identity.device().is_some(),
            "{} names no device",
            identity.comment()
        );
    }
    Ok(())
}

/// Signs `data` with every identity (RSA with both SHA-2 flags) and verifies
/// each signature against the identity's public key.
pub async fn signs_with_every_key(
    backend: &dyn Backend,
    identities: &[Identity],
    prompter: Arc<dyn Prompter>,
) -> anyhow::Result<()> {
    for identity in identities {
        let flags: &[u32] = match identity.public_key() {
            KeyData::Rsa(_) => &[SignFlags::RSA_SHA2_256, SignFlags::RSA_SHA2_512],
            _ => &[0],
        };
        for &flag in flags {
            let data = format!("conformance data for {}", identity.comment()).into_bytes();
            let request = SignRequest {
                data: data.clone(),
                flags: SignFlags::from_bits(flag),
            };
            let signature = backend
                .sign(
                    identity.key(),
                    &request,
                    &SignContext::default(),
                    prompter.clone(),
                )
                .await
                .with_context(|| format!("signing with {}", identity.comment()))?;
            verify(identity.public_key(), &data, &signature)
                .with_context(|| format!("verifying the signature of {}", identity.comment()))?;
        }
    }
    Ok(())
}

/// Verifies an agent signature against `key`.
pub fn verify(key: &KeyData, data: &[u8], signature: &SshSignature) -> anyhow::Result<()> {
    let parsed = Signature::try_from(signature.as_bytes())?;
    key.verify(data, &parsed)?;
    Ok(())
}

/// A wrong PIN fails with [`Error::WrongPin`] naming the device, after the
/// person was asked exactly once: the backend never retries a rejected PIN.
pub async fn wrong_pin_is_not_retried(
    backend: &dyn Backend,
    identity: &Identity,
    wrong_pin: &str,
) -> anyhow::Result<Option<u32>> {
    backend.forget_secrets();
    // A second answer is scripted so that a retry would be seen, not starved.
    let prompter = Arc::new(Scripted::new([
        ScriptedAnswer::Pin(wrong_pin.to_owned()),
        ScriptedAnswer::Pin(wrong_pin.to_owned()),
    ]));
    let request = SignRequest {
        data: b"wrong pin".to_vec(),
        flags: SignFlags::from_bits(SignFlags::RSA_SHA2_256),
    };
    let result = backend
        .sign(
            identity.key(),
            &request,
            &SignContext::default(),
            prompter.clone(),
        )
        .await;
    let pins_asked = prompter
        .asked()
        .iter()
        .filter(|a| matches!(a, Asked::Pin(_)))
        .count();
    ensure!(pins_asked == 1, "the PIN was asked {pins_asked} times");
    match result {
        Err(Error::WrongPin { device, tries_left }) => {
            ensure!(
                Some(&device) == identity.device(),
                "the error names {device}, not the key's device"
            );
            Ok(tries_left)
        }
        other => bail!("expected a wrong-PIN error, got {other:?}"),
    }
}

/// A cancelled PIN prompt fails with [`Error::Prompt`], not a device error.
pub async fn cancelled_pin_is_the_persons_choice(
    backend: &dyn Backend,
    identity: &Identity,
) -> anyhow::Result<()> {
    backend.forget_secrets();
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Cancel]));
    let request = SignRequest {
        data: b"cancelled".to_vec(),
        flags: SignFlags::default(),
    };
    match backend
        .sign(identity.key(), &request, &SignContext::default(), prompter)
        .await
    {
        Err(Error::Prompt(PromptError::Cancelled)) => Ok(()),
        other => bail!("expected a cancelled prompt, got {other:?}"),
    }
}

/// After `remove` takes the device away, its keys leave the published list
/// within `limit`, and signing with one fails with [`Error::DeviceRemoved`] or
/// [`Error::KeyNotFound`].
pub async fn device_gone(
    backend: &dyn Backend,
    published: &Published,
    identity: &Identity,
    remove: impl FnOnce() -> anyhow::Result<()>,
    limit: Duration,
) -> anyhow::Result<()> {
    remove()?;
    let key = identity.key().clone();
    published.wait_until(limit, |ids| ids.iter().all(|id| id.key() != &key))?;
    let request = SignRequest {
        data: b"gone".to_vec(),
        flags: SignFlags::default(),
    };
    let prompter = Arc::new(Scripted::new([]));
    match backend
        .sign(identity.key(), &request, &SignContext::default(), prompter)
        .await
    {
        Err(Error::DeviceRemoved { .. } | Error::KeyNotFound) => Ok(()),
        other => bail!("expected the device to be gone, got {other:?}"),
    }
}
