//! Against a physical security key: runs only with TOKEN_AGENT_FIDO_HARDWARE=1
//! (one key plugged in; touch it when it blinks; set
//! TOKEN_AGENT_FIDO_HARDWARE_PIN when it has a PIN).

use std::sync::Arc;

use anyhow::ensure;
use token_agent_core::{AddKey, Backend, SignContext, SignFlags, SignRequest};
use token_agent_e2e::conformance;
use token_agent_fido::ctap::CoseAlgorithm;
use token_agent_fido::{Discovery, Enrolment, FidoBackend, HidDiscovery};
use token_agent_prompt::{Scripted, ScriptedAnswer};

fn enabled() -> bool {
    if std::env::var_os("TOKEN_AGENT_FIDO_HARDWARE").is_some() {
        return true;
    }
    eprintln!("skipped: set TOKEN_AGENT_FIDO_HARDWARE=1 with one security key plugged in");
    false
}

#[test]
fn hid_discovery_never_panics() {
    // Whatever this machine has (no hidraw, no permission, a key), it answers.
    let _ = HidDiscovery.connected();
}

#[tokio::test]
async fn enrol_and_sign_on_a_physical_key() -> anyhow::Result<()> {
    if !enabled() {
        return Ok(());
    }
    let devices = HidDiscovery.connected();
    ensure!(
        devices.len() == 1,
        "plug in exactly one security key, found {}",
        devices.len()
    );
    let device = devices[0].clone();
    let pin = std::env::var("TOKEN_AGENT_FIDO_HARDWARE_PIN").ok();
    let info = device.info()?;
    eprintln!("touch {} to make a test credential", device.label());
    let key = token_agent_fido::enroll(
        device.as_ref(),
        &Enrolment {
            algorithm: CoseAlgorithm::EdDsa,
            application: "ssh:token-agent-test".into(),
            resident: false,
            verify_required: false,
            no_touch_required: false,
            user: "openssh".into(),
            pin: if info.client_pin_set {
                pin.map(Into::into)
            } else {
                None
            },
        },
    )?;
    let backend = FidoBackend::new(Arc::new(HidDiscovery));
    let identity = backend
        .add_key(AddKey {
            keypair: Box::new(key.to_keypair()?),
            opaque_secret: None,
            comment: "hardware test".into(),
            certificate: None,
            sk_provider: None,
        })
        .await?;
    eprintln!("touch {} to sign", device.label());
    let request = SignRequest {
        data: b"token-agent hardware test".to_vec(),
        flags: SignFlags::default(),
    };
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Cancel]));
    let signature = backend
        .sign(identity.key(), &request, &SignContext::default(), prompter)
        .await?;
    conformance::verify(identity.public_key(), &request.data, &signature)?;
    Ok(())
}
