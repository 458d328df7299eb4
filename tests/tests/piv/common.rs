//! Helpers shared by the PIV tests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use secrecy::SecretString;
use token_agent_core::{Backend, Identity};
use token_agent_e2e::conformance::Published;
use token_agent_e2e::pcsc::{self, PcscRig};
use token_agent_piv::manage::{self, SetupOptions, SetupSecrets};
use token_agent_piv::{KeyAlgorithm, PinUse, PivBackend, PivConfig, TouchUse};
use yubikey::piv::{AlgorithmId, SlotId};
use yubikey::{MgmKey, PinPolicy, Serial, TouchPolicy, YubiKey};

pub(crate) const PIN: &str = "123456";
pub(crate) const PUK: &str = "12345678";

/// How long a hot-plug change may take to show in the published list.
pub(crate) const HOTPLUG: Duration = Duration::from_secs(2);

/// One key to generate: slot, algorithm, PIN policy, touch policy.
pub(crate) type KeySpec = (u8, AlgorithmId, PinPolicy, TouchPolicy);

/// In the parent: starts a rig with one card per serial and re-runs `test`
/// in a child. In the child: `None`, and the caller does the work.
pub(crate) fn rig_or_child(serials: &[u32], test: &str) -> Result<Option<PcscRig>> {
    let configs: Vec<piv_sim::CardConfig> = serials
        .iter()
        .map(|&serial| piv_sim::CardConfig {
            serial,
            ..piv_sim::CardConfig::default()
        })
        .collect();
    rig_or_child_with(&configs, test)
}

/// [`rig_or_child`] with cards as `configs` say (firmware versions).
pub(crate) fn rig_or_child_with(
    configs: &[piv_sim::CardConfig],
    test: &str,
) -> Result<Option<PcscRig>> {
    if pcsc::is_child() {
        return Ok(None);
    }
    let rig = PcscRig::start_with_configs(configs)?;
    rig.run_child_test(test)?;
    Ok(Some(rig))
}

/// Generates `keys` on the card `serial` with the factory management key.
pub(crate) fn provision(serial: u32, keys: &[KeySpec]) -> Result<()> {
    let mut yubikey = YubiKey::open_by_serial(Serial(serial))
        .with_context(|| format!("opening card {serial}"))?;
    yubikey.authenticate(MgmKey::default())?;
    for &(slot, algorithm, pin, touch) in keys {
        yubikey::piv::generate(&mut yubikey, SlotId::try_from(slot)?, algorithm, pin, touch)
            .with_context(|| format!("generating a key in slot {slot:02x}"))?;
    }
    if let Err((_, e)) = yubikey.disconnect(pcsc_disposition()) {
        bail!("disconnecting: {e}");
    }
    Ok(())
}

/// Makes a key in each of `slots` (P-256, touch never) with a self-signed
/// certificate, as `token-agent piv setup` does: cards before firmware 5.3
/// have no GET METADATA, so only a certificate shows a slot's key.
pub(crate) fn setup_with_certificates(serial: u32, slots: &[(&str, PinUse)]) -> Result<()> {
    for &(slot, pin_policy) in slots {
        let options = SetupOptions {
            serial: Some(serial),
            slot: slot.parse().map_err(anyhow::Error::msg)?,
            algorithm: KeyAlgorithm::P256,
            pin_policy,
            touch_policy: TouchUse::Never,
            protect_management_key: false,
        };
        let secrets = SetupSecrets {
            pin: SecretString::from(PIN),
            new_pin: None,
            new_puk: None,
        };
        manage::setup(&options, &secrets).with_context(|| format!("setting up slot {slot}"))?;
    }
    Ok(())
}

fn pcsc_disposition() -> ::pcsc::Disposition {
    ::pcsc::Disposition::LeaveCard
}

/// Runs `body` on a multi-threaded runtime.
pub(crate) fn block_on<F: Future<Output = Result<()>>>(body: F) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(body)
}

/// A started backend and what it publishes.
pub(crate) struct Started {
    pub(crate) backend: Arc<PivBackend>,
    pub(crate) published: Published,
}

/// Starts the backend with a PIN cache of `idle`.
pub(crate) fn start_backend(idle: Duration) -> Started {
    let backend = Arc::new(PivBackend::new(PivConfig {
        pin_cache_idle: idle,
    }));
    let published = Published::default();
    backend.start(published.sink());
    Started { backend, published }
}

/// The identity in `slot` of card `serial`.
pub(crate) fn identity(list: &[Identity], serial: u32, slot: &str) -> Result<Identity> {
    let handle = format!("{serial}/{slot}");
    list.iter()
        .find(|id| id.key().handle() == handle.as_bytes())
        .cloned()
        .with_context(|| format!("no key {handle} among {:?}", comments(list)))
}

pub(crate) fn comments(list: &[Identity]) -> Vec<String> {
    list.iter().map(|id| id.comment().to_owned()).collect()
}

/// Waits until card `serial` publishes `count` keys.
pub(crate) fn wait_keys(published: &Published, serial: u32, count: usize) -> Result<Vec<Identity>> {
    let prefix = format!("{serial}/");
    published.wait_until(HOTPLUG * 5, |ids| {
        ids.iter()
            .filter(|id| id.key().handle().starts_with(prefix.as_bytes()))
            .count()
            == count
    })
}
