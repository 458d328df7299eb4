use std::sync::Arc;
use std::time::Duration;

use token_agent_core::Backend;
use token_agent_e2e::conformance::{self, Published};
use token_agent_e2e::pkcs11_helper_binary;
use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
use token_agent_pkcs11::{HelperCommand, ModuleConfig, PinSource, Pkcs11Backend, Pkcs11Options};
use token_agent_prompt::{Asked, Scripted, ScriptedAnswer};

fn backend(hsm: &SoftHsm) -> anyhow::Result<Pkcs11Backend> {
    let mut options = Pkcs11Options::new(HelperCommand {
        program: pkcs11_helper_binary()?,
        args: Vec::new(),
        env: hsm
            .env()
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    });
    options.modules.push(ModuleConfig {
        path: MODULE.to_owned(),
        pin: PinSource::Prompt,
    });
    options.poll_interval = Duration::from_millis(200);
    Ok(Pkcs11Backend::new(options))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn softhsm_passes_the_backend_conformance_suite() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("conformance", &KeyKind::ALL)?;
    let backend = backend(&hsm)?;
    let published = Published::default();
    backend.start(published.sink());
    let identities = published.wait_until(Duration::from_secs(30), |ids| ids.len() == 4)?;
    let algorithms: Vec<_> = KeyKind::ALL.iter().map(|k| k.algorithm()).collect();
    conformance::lists_every_key_type(&identities, &algorithms)?;
    for identity in &identities {
        assert!(
            identity.comment().starts_with("conformance: ") && identity.comment().ends_with("-key"),
            "{}",
            identity.comment()
        );
    }

    // One PIN for all four keys: asked once, then the token stays logged in.
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.to_owned())]));
    conformance::signs_with_every_key(&backend, &identities, prompter.clone()).await?;
    let asked = prompter
        .asked()
        .iter()
        .filter(|a| matches!(a, Asked::Pin(_)))
        .count();
    assert_eq!(asked, 1);

    // After forgetting, the PIN is asked again, and a wrong one is not retried.
    let tries =
        conformance::wrong_pin_is_not_retried(&backend, &identities[0], "wrong-pin").await?;
    // SoftHSM reports only "count low", not a number.
    assert_eq!(tries, None);
    conformance::cancelled_pin_is_the_persons_choice(&backend, &identities[0]).await?;

    // Signing still works with the right PIN after the wrong one.
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.to_owned())]));
    conformance::signs_with_every_key(&backend, &identities[..1], prompter).await?;

    conformance::device_gone(
        &backend,
        &published,
        &identities[0],
        || hsm.delete_token("conformance"),
        Duration::from_secs(20),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_signatures_on_one_token() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("parallel", &[KeyKind::P256, KeyKind::Ed25519])?;
    let backend = Arc::new(backend(&hsm)?);
    let published = Published::default();
    backend.start(published.sink());
    let identities = published.wait_until(Duration::from_secs(30), |ids| ids.len() == 2)?;
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.to_owned())]));
    conformance::signs_with_every_key(&*backend, &identities, prompter.clone()).await?;
    let mut tasks = Vec::new();
    for round in 0..16 {
        let backend = backend.clone();
        let identity = identities[round % identities.len()].clone();
        let prompter = prompter.clone();
        tasks.push(tokio::spawn(async move {
            conformance::signs_with_every_key(&*backend, &[identity], prompter).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    // Still the one PIN asked at the start.
    assert_eq!(prompter.asked().len(), 1);
    Ok(())
}
