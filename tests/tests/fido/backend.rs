use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use fido_sim::{Presence, Simulator};
use secrecy::SecretString;
use ssh_key::Algorithm;
use token_agent_core::{
    AddKey, Backend, ConfirmRequest, Error, Identity, Notice, NoticeGuard, NoticeKind, PinRequest,
    PromptError, Prompter, SignContext, SignFlags, SignRequest, SshSignature,
};
use token_agent_e2e::conformance::{self, Published};
use token_agent_fido::ctap::{
    CoseAlgorithm, CredProtect, CtapError, GetAssertion, MakeCredential, User,
};
use token_agent_fido::{
    sk, Authenticator, EnrolError, Enrolment, FidoBackend, Fixed, HelperCommand, MiddlewareOptions,
    SkKey,
};
use token_agent_prompt::{Asked, Scripted, ScriptedAnswer};

const PIN: &str = "4321";

fn enrolment(algorithm: CoseAlgorithm) -> Enrolment {
    Enrolment {
        algorithm,
        application: "ssh:".into(),
        resident: false,
        verify_required: false,
        no_touch_required: false,
        user: "openssh".into(),
        pin: None,
    }
}

fn make_key(sim: &Simulator, enrolment: &Enrolment) -> anyhow::Result<SkKey> {
    Ok(token_agent_fido::enroll(sim, enrolment)?)
}

/// A backend over `sims`, started, with `keys` added as ssh-add adds them.
async fn backend_with(
    sims: Vec<Arc<Simulator>>,
    keys: &[(&SkKey, &str)],
) -> anyhow::Result<(FidoBackend, Published, Vec<Identity>)> {
    let devices = sims
        .into_iter()
        .map(|s| s as Arc<dyn Authenticator>)
        .collect();
    let backend = FidoBackend::new(Arc::new(Fixed(devices)));
    let published = Published::default();
    backend.start(published.sink());
    let mut identities = Vec::new();
    for (key, comment) in keys {
        identities.push(
            backend
                .add_key(AddKey {
                    keypair: Box::new(key.to_keypair()?),
                    opaque_secret: None,
                    comment: (*comment).to_owned(),
                    certificate: None,
                    sk_provider: None,
                })
                .await?,
        );
    }
    Ok((backend, published, identities))
}

async fn sign(
    backend: &FidoBackend,
    identity: &Identity,
    data: &[u8],
    prompter: Arc<dyn Prompter>,
) -> Result<SshSignature, Error> {
    let request = SignRequest {
        data: data.to_vec(),
        flags: SignFlags::default(),
    };
    backend
        .sign(identity.key(), &request, &SignContext::default(), prompter)
        .await
}

#[tokio::test]
async fn conformance_lists_and_signs_both_sk_types() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("conformance"));
    let ed = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let ec = make_key(&sim, &enrolment(CoseAlgorithm::Es256))?;
    let (backend, published, identities) =
        backend_with(vec![sim.clone()], &[(&ed, "ed25519-sk"), (&ec, "ecdsa-sk")]).await?;
    let listed = published.wait_until(Duration::from_secs(5), |ids| ids.len() == 2)?;
    conformance::lists_every_key_type(
        &listed,
        &[Algorithm::SkEd25519, Algorithm::SkEcdsaSha2NistP256],
    )?;
    conformance::signs_with_every_key(&backend, &identities, Arc::new(Scripted::new([]))).await?;
    Ok(())
}

#[tokio::test]
async fn signatures_carry_flags_and_counter_and_verify_with_ssh_key() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("counter"));
    let key = make_key(&sim, &enrolment(CoseAlgorithm::Es256))?;
    let (backend, _, ids) = backend_with(vec![sim.clone()], &[(&key, "k")]).await?;
    let prompter = Arc::new(Scripted::new([]));
    let first = sign(&backend, &ids[0], b"one", prompter.clone()).await?;
    let second = sign(&backend, &ids[0], b"two", prompter.clone()).await?;
    for (signature, data) in [(&first, b"one"), (&second, b"two")] {
        conformance::verify(ids[0].public_key(), data, signature)?;
        // The wire form: flags and counter follow the signature string.
        let parsed = ssh_key::Signature::try_from(signature.as_bytes())?;
        let trailer = &parsed.as_bytes()[parsed.as_bytes().len() - 5..];
        ensure!(trailer[0] == 0x01, "flags {:#x} lack UP", trailer[0]);
    }
    let counter = |s: &token_agent_core::SshSignature| {
        let b = s.as_bytes();
        u32::from_be_bytes([
            b[b.len() - 4],
            b[b.len() - 3],
            b[b.len() - 2],
            b[b.len() - 1],
        ])
    };
    ensure!(counter(&second) == counter(&first) + 1);
    ensure!(counter(&second) == sim.counter());
    // A signature over other data does not verify.
    ensure!(conformance::verify(ids[0].public_key(), b"other", &first).is_err());
    Ok(())
}

#[tokio::test]
async fn touch_notice_only_for_keys_that_need_a_touch() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("notice"));
    let touch = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let no_touch = make_key(
        &sim,
        &Enrolment {
            no_touch_required: true,
            ..enrolment(CoseAlgorithm::EdDsa)
        },
    )?;
    let (backend, _, ids) = backend_with(
        vec![sim.clone()],
        &[(&touch, "touch"), (&no_touch, "no-touch")],
    )
    .await?;
    let prompter = Arc::new(Scripted::new([]));
    let with_touch = sign(&backend, &ids[0], b"t", prompter.clone()).await?;
    let notices = |p: &Scripted| {
        p.asked()
            .iter()
            .filter(|a| matches!(a, Asked::Notice(n) if n.kind == NoticeKind::Touch))
            .count()
    };
    ensure!(notices(&prompter) == 1, "{:?}", prompter.asked());
    let without = sign(&backend, &ids[1], b"n", prompter.clone()).await?;
    ensure!(
        notices(&prompter) == 1,
        "a no-touch key raised a touch notice"
    );
    conformance::verify(ids[1].public_key(), b"n", &without)?;
    // The no-touch signature says so: UP clear.
    let b = without.as_bytes();
    ensure!(b[b.len() - 5] & 0x01 == 0, "UP set on a no-touch signature");
    let b = with_touch.as_bytes();
    ensure!(b[b.len() - 5] & 0x01 == 0x01);
    Ok(())
}

#[tokio::test]
async fn a_touch_given_while_waiting_completes_the_signature() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("wait"));
    let key = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let (backend, _, ids) = backend_with(vec![sim.clone()], &[(&key, "k")]).await?;
    let control = sim.control();
    control.set_presence(Presence::Wait);
    let toucher = std::thread::spawn(move || {
        control.wait_until_waiting(Duration::from_secs(10)) && control.touch()
    });
    let signature = sign(&backend, &ids[0], b"waited", Arc::new(Scripted::new([]))).await?;
    ensure!(
        toucher.join().unwrap_or(false),
        "nothing waited for a touch"
    );
    conformance::verify(ids[0].public_key(), b"waited", &signature)?;
    Ok(())
}

#[tokio::test]
async fn a_denied_touch_fails_and_says_so() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("deny"));
    let key = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let (backend, _, ids) = backend_with(vec![sim.clone()], &[(&key, "k")]).await?;
    sim.control().set_presence(Presence::Deny);
    match sign(&backend, &ids[0], b"x", Arc::new(Scripted::new([]))).await {
        Err(err @ Error::Device { .. }) => {
            ensure!(err.to_string().contains("denied"), "{err}");
            Ok(())
        }
        other => bail!("expected a denial, got {other:?}"),
    }
}

#[tokio::test]
async fn a_touch_that_never_comes_times_out() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("timeout"));
    let key = make_key(&sim, &enrolment(CoseAlgorithm::Es256))?;
    let (backend, _, ids) = backend_with(vec![sim.clone()], &[(&key, "k")]).await?;
    sim.control().set_presence(Presence::Wait);
    sim.set_touch_timeout(Duration::from_millis(200));
    let prompter = Arc::new(Scripted::new([]));
    match sign(&backend, &ids[0], b"x", prompter.clone()).await {
        Err(Error::TouchTimeout { device }) => {
            ensure!(device.label() == "fido-sim timeout", "{device}");
        }
        other => bail!("expected a touch timeout, got {other:?}"),
    }
    // The notice was raised, and withdrawn when the device gave up.
    ensure!(prompter
        .asked()
        .iter()
        .any(|a| matches!(a, Asked::Notice(_))));
    ensure!(
        prompter.active_notices() == 0,
        "the notice was not withdrawn"
    );
    Ok(())
}

/// Sets `sim`'s PIN and makes a verify-required ed25519-sk key on it.
fn make_verify_required_key(sim: &Simulator) -> anyhow::Result<SkKey> {
    sim.set_pin(PIN)?;
    let key = make_key(
        sim,
        &Enrolment {
            verify_required: true,
            pin: Some(PIN.to_owned().into()),
            ..enrolment(CoseAlgorithm::EdDsa)
        },
    )?;
    ensure!(key.flags() == sk::USER_PRESENCE_REQUIRED | sk::USER_VERIFICATION_REQUIRED);
    Ok(key)
}

async fn verify_required_key() -> anyhow::Result<(Arc<Simulator>, FidoBackend, Identity)> {
    let sim = Arc::new(Simulator::new("pin"));
    let key = make_verify_required_key(&sim)?;
    let (backend, _, mut ids) = backend_with(vec![sim.clone()], &[(&key, "verify")]).await?;
    Ok((sim, backend, ids.remove(0)))
}

#[tokio::test]
async fn verify_required_keys_ask_the_pin_with_tries_left() -> anyhow::Result<()> {
    let (_sim, backend, identity) = verify_required_key().await?;
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.into())]));
    let signature = sign(&backend, &identity, b"uv", prompter.clone()).await?;
    conformance::verify(identity.public_key(), b"uv", &signature)?;
    let b = signature.as_bytes();
    ensure!(
        b[b.len() - 5] == 0x05,
        "flags {:#x}: UP and UV expected",
        b[b.len() - 5]
    );
    let asked = prompter.asked();
    let Some(Asked::Pin(request)) = asked.iter().find(|a| matches!(a, Asked::Pin(_))) else {
        bail!("no PIN asked: {asked:?}");
    };
    ensure!(request.tries_left == Some(8), "{request:?}");
    ensure!(
        request.description().contains("fido-sim pin"),
        "{}",
        request.description()
    );
    conformance::cancelled_pin_is_the_persons_choice(&backend, &identity).await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_pin_is_not_retried_and_says_tries_left() -> anyhow::Result<()> {
    let (_sim, backend, identity) = verify_required_key().await?;
    let tries = conformance::wrong_pin_is_not_retried(&backend, &identity, "9999").await?;
    ensure!(tries == Some(7), "tries left {tries:?}");
    Ok(())
}

/// Four signatures with `identity` at once through `prompter`. The first
/// question is answered only once all four have arrived, as when a person
/// takes a moment to type: the whole burst stands behind that answer.
async fn four_at_once(
    backend: &FidoBackend,
    identity: &Identity,
    prompter: &Arc<Scripted>,
) -> [Result<SshSignature, Error>; 4] {
    let gated = Arc::new(Gated {
        arrived: AtomicUsize::new(0),
        expected: 4,
        inner: prompter.clone(),
    });
    let one = || {
        let gated = gated.clone();
        async move {
            // Counted in the same poll that starts the request, so the
            // count is only ever reached by requests that have arrived.
            gated.arrived.fetch_add(1, Ordering::SeqCst);
            sign(backend, identity, b"burst", gated).await
        }
    };
    let (a, b, c, d) = tokio::join!(one(), one(), one(), one());
    [a, b, c, d]
}

/// A prompter that answers no PIN before `expected` requests have arrived.
#[derive(Debug)]
struct Gated {
    arrived: AtomicUsize,
    expected: usize,
    inner: Arc<Scripted>,
}

#[async_trait::async_trait]
impl Prompter for Gated {
    async fn pin(&self, request: &PinRequest) -> Result<SecretString, PromptError> {
        while self.arrived.load(Ordering::SeqCst) < self.expected {
            tokio::task::yield_now().await;
        }
        self.inner.pin(request).await
    }

    async fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        self.inner.confirm(request).await
    }

    fn notify(&self, notice: &Notice) -> NoticeGuard {
        self.inner.notify(notice)
    }
}

fn answers(first: ScriptedAnswer) -> Arc<Scripted> {
    let right = ScriptedAnswer::Pin(PIN.into());
    Arc::new(Scripted::new([first, right.clone(), right.clone(), right]))
}

#[tokio::test]
async fn signatures_that_waited_behind_a_wrong_pin_or_a_cancel_fail_with_it() -> anyhow::Result<()>
{
    let (sim, backend, identity) = verify_required_key().await?;

    // A wrong PIN: all four fail with it, one try spent, nobody asked again.
    let wrong = answers(ScriptedAnswer::Pin("0000".into()));
    for result in four_at_once(&backend, &identity, &wrong).await {
        ensure!(
            matches!(
                result,
                Err(Error::WrongPin {
                    tries_left: Some(7),
                    ..
                })
            ),
            "{result:?}"
        );
    }
    ensure!(wrong.pin_requests().len() == 1, "{:?}", wrong.asked());
    ensure!(sim.pin_retries()? == 7);

    // A Cancel ends the next burst the same way, and costs no try.
    let cancel = answers(ScriptedAnswer::Cancel);
    for result in four_at_once(&backend, &identity, &cancel).await {
        ensure!(matches!(result, Err(Error::Prompt(_))), "{result:?}");
    }
    ensure!(cancel.pin_requests().len() == 1, "{:?}", cancel.asked());
    ensure!(sim.pin_retries()? == 7);

    // A FIDO PIN serves one assertion: each request of the next burst asks
    // in its turn, and hears the tries the device has by then.
    let right = answers(ScriptedAnswer::Pin(PIN.into()));
    for result in four_at_once(&backend, &identity, &right).await {
        conformance::verify(identity.public_key(), b"burst", &result?)?;
    }
    let tries: Vec<Option<u32>> = right.pin_requests().iter().map(|r| r.tries_left).collect();
    ensure!(
        tries == [Some(7), Some(8), Some(8), Some(8)],
        "tries shown {tries:?}"
    );
    ensure!(sim.pin_retries()? == 8);
    Ok(())
}

#[tokio::test]
async fn middleware_signatures_that_waited_behind_a_wrong_pin_fail_with_it() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("fido-burst").tempdir()?;
    let state = dir.path().join("sim");
    let key = make_verify_required_key(&Simulator::open("token", &state)?)?;
    // The middleware's helper finds the simulator's state file through its
    // environment, which the helper command sets for it alone.
    let helper = HelperCommand {
        program: "env".into(),
        args: vec![
            format!("{}={}", fido_sim::middleware::STATE_ENV, state.display()).into(),
            token_agent_e2e::agent_binary()?.into(),
            "--sk-helper".into(),
        ],
    };
    let backend = FidoBackend::with_middleware(
        Arc::new(Fixed(Vec::new())),
        MiddlewareOptions {
            helper,
            call_timeout: Duration::from_secs(30),
        },
    );
    let published = Published::default();
    backend.start(published.sink());
    let library = token_agent_e2e::fido_sim_middleware()?;
    let identity = backend
        .add_key(AddKey {
            keypair: Box::new(key.to_keypair()?),
            opaque_secret: None,
            comment: "burst".into(),
            certificate: None,
            sk_provider: Some(library.display().to_string()),
        })
        .await?;

    let wrong = answers(ScriptedAnswer::Pin("0000".into()));
    for result in four_at_once(&backend, &identity, &wrong).await {
        ensure!(matches!(result, Err(Error::WrongPin { .. })), "{result:?}");
    }
    ensure!(wrong.pin_requests().len() == 1, "{:?}", wrong.asked());
    ensure!(Simulator::open("token", &state)?.pin_retries()? == 7);

    let right = answers(ScriptedAnswer::Pin(PIN.into()));
    for result in four_at_once(&backend, &identity, &right).await {
        conformance::verify(identity.public_key(), b"burst", &result?)?;
    }
    ensure!(right.pin_requests().len() == 4, "{:?}", right.asked());
    ensure!(Simulator::open("token", &state)?.pin_retries()? == 8);
    Ok(())
}

#[tokio::test]
async fn a_blocked_pin_is_reported_without_asking() -> anyhow::Result<()> {
    let (sim, backend, identity) = verify_required_key().await?;
    for _ in 0..7 {
        let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin("0000".into())]));
        match sign(&backend, &identity, b"x", prompter).await {
            Err(Error::WrongPin { .. }) => {}
            other => bail!("expected a wrong PIN, got {other:?}"),
        }
    }
    // The eighth wrong PIN blocks it.
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin("0000".into())]));
    match sign(&backend, &identity, b"x", prompter).await {
        Err(Error::PinBlocked { .. }) => {}
        other => bail!("expected a blocked PIN, got {other:?}"),
    }
    ensure!(sim.pin_retries()? == 0);
    // From now on the person is not even asked.
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.into())]));
    match sign(&backend, &identity, b"x", prompter.clone()).await {
        Err(err @ Error::PinBlocked { .. }) => {
            ensure!(err.to_string().contains("blocked"), "{err}");
        }
        other => bail!("expected a blocked PIN, got {other:?}"),
    }
    ensure!(prompter.asked().iter().all(|a| !matches!(a, Asked::Pin(_))));
    Ok(())
}

/// A verify-required key on a security key without a PIN (one reset since,
/// say) cannot sign: the person is told to set a PIN, not asked for one
/// that does not exist.
#[tokio::test]
async fn a_verify_required_key_on_a_security_key_without_a_pin_says_to_set_one(
) -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("nopin"));
    let made = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let ssh_key::private::KeypairData::SkEd25519(made) = made.to_keypair()? else {
        bail!("not an sk-ssh-ed25519 key");
    };
    let keypair = ssh_key::private::KeypairData::SkEd25519(ssh_key::private::SkEd25519::new(
        made.public().clone(),
        sk::USER_PRESENCE_REQUIRED | sk::USER_VERIFICATION_REQUIRED,
        made.key_handle().to_vec(),
    )?);
    let key = SkKey::from_keypair(&keypair).context("an sk key")?;
    ensure!(key.needs_pin());
    let (backend, _, ids) = backend_with(vec![sim], &[(&key, "verify")]).await?;
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.into())]));
    match sign(&backend, &ids[0], b"x", prompter.clone()).await {
        Err(err @ Error::Device { .. }) => {
            ensure!(err.to_string().contains("has no PIN set"), "{err}");
        }
        other => bail!("expected a device error, got {other:?}"),
    }
    ensure!(prompter.pin_requests().is_empty(), "{:?}", prompter.asked());
    Ok(())
}

#[tokio::test]
async fn a_short_pin_is_refused_before_it_costs_a_try() -> anyhow::Result<()> {
    let (sim, backend, identity) = verify_required_key().await?;
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin("12".into())]));
    ensure!(sign(&backend, &identity, b"x", prompter).await.is_err());
    ensure!(sim.pin_retries()? == 8);
    Ok(())
}

#[tokio::test]
async fn each_authenticator_is_tried_until_one_holds_the_key() -> anyhow::Result<()> {
    let first = Arc::new(Simulator::new("first"));
    let second = Arc::new(Simulator::new("second"));
    let elsewhere = Simulator::new("elsewhere");
    let on_second = make_key(&second, &enrolment(CoseAlgorithm::EdDsa))?;
    let lost = make_key(&elsewhere, &enrolment(CoseAlgorithm::EdDsa))?;
    let (backend, _, ids) = backend_with(
        vec![first.clone(), second.clone()],
        &[(&on_second, "second"), (&lost, "lost")],
    )
    .await?;
    let prompter = Arc::new(Scripted::new([]));
    let signature = sign(&backend, &ids[0], b"found", prompter.clone()).await?;
    conformance::verify(ids[0].public_key(), b"found", &signature)?;
    let notice_device = prompter.asked().iter().find_map(|a| match a {
        Asked::Notice(n) => n.subject.device.clone(),
        _ => None,
    });
    ensure!(notice_device.is_some_and(|d| d.label() == "fido-sim second"));
    match sign(&backend, &ids[1], b"lost", prompter).await {
        Err(err) => ensure!(
            err.to_string()
                .contains("no connected security key holds this key"),
            "{err}"
        ),
        Ok(_) => bail!("a key from an absent authenticator signed"),
    }
    Ok(())
}

#[tokio::test]
async fn a_handle_is_bound_to_its_application() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("app"));
    let key = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    // The same handle presented for another application opens nothing.
    let other = SkKey::from_credential(
        &token_agent_fido::ctap::CredentialPublicKey::Ed25519([9; 32]),
        "ssh:other",
        sk::USER_PRESENCE_REQUIRED,
        key.key_handle().to_vec(),
    )?;
    let (backend, _, ids) = backend_with(vec![sim.clone()], &[(&other, "other")]).await?;
    ensure!(sign(&backend, &ids[0], b"x", Arc::new(Scripted::new([])))
        .await
        .is_err());
    Ok(())
}

#[tokio::test]
async fn a_removed_key_cannot_sign_and_a_replugged_one_can() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("plug"));
    let key = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let (backend, _, ids) = backend_with(vec![sim.clone()], &[(&key, "k")]).await?;
    sim.control().set_connected(false);
    match sign(&backend, &ids[0], b"x", Arc::new(Scripted::new([]))).await {
        Err(Error::DeviceRemoved { .. }) => {}
        other => bail!("expected removal, got {other:?}"),
    }
    sim.control().set_connected(true);
    sign(&backend, &ids[0], b"x", Arc::new(Scripted::new([]))).await?;
    Ok(())
}

#[tokio::test]
async fn resident_keys_load_with_the_pin_and_sign() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("resident"));
    sim.set_pin(PIN)?;
    let made = make_key(
        &sim,
        &Enrolment {
            resident: true,
            application: "ssh:work".into(),
            pin: Some(PIN.to_owned().into()),
            ..enrolment(CoseAlgorithm::Es256)
        },
    )?;
    // A web site's resident credential is not an SSH key.
    sim.make_credential(&MakeCredential {
        rp_id: "example.org".into(),
        challenge: b"challenge".to_vec(),
        user: User::default(),
        algorithm: CoseAlgorithm::EdDsa,
        resident: true,
        cred_protect: None,
        pin: Some(PIN.to_owned().into()),
    })?;
    ensure!(sim.resident_count() == 2);
    let (backend, published, _) = backend_with(vec![sim.clone()], &[]).await?;
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.into())]));
    let loaded = backend.load_resident(prompter).await?;
    ensure!(loaded.len() == 1, "{loaded:?}");
    let listed = published.wait_until(Duration::from_secs(5), |ids| ids.len() == 1)?;
    let work = listed
        .iter()
        .find(|id| id.public_key() == made.public_key())
        .ok_or_else(|| anyhow::anyhow!("ssh:work not listed"))?;
    ensure!(
        work.comment() == "ssh:work on fido-sim resident",
        "{}",
        work.comment()
    );
    let signature = sign(&backend, work, b"resident", Arc::new(Scripted::new([]))).await?;
    conformance::verify(work.public_key(), b"resident", &signature)?;
    // Without the right PIN nothing loads.
    let wrong = Arc::new(Scripted::new([ScriptedAnswer::Pin("0000".into())]));
    match backend.load_resident(wrong).await {
        Err(Error::WrongPin { tries_left, .. }) => ensure!(tries_left == Some(7)),
        other => bail!("expected a wrong PIN, got {other:?}"),
    }
    Ok(())
}

/// A silent assertion (no PIN) for `credential_id` under `rp_id`.
fn assert_without_pin(sim: &Simulator, rp_id: &str, credential_id: &[u8]) -> Result<(), CtapError> {
    sim.get_assertion(&GetAssertion {
        rp_id: rp_id.into(),
        message: b"probe".to_vec(),
        credential_id: credential_id.to_vec(),
        user_presence: false,
        pin: None,
    })
    .map(drop)
}

#[test]
fn fido_sim_honours_cred_protect_and_lists_each_credentials_level() -> anyhow::Result<()> {
    let sim = Simulator::new("credprotect");
    sim.set_pin(PIN)?;
    let levels = [
        None,
        Some(CredProtect::UserVerificationOptional),
        Some(CredProtect::UserVerificationOptionalWithCredentialIdList),
        Some(CredProtect::UserVerificationRequired),
    ];
    let mut made = Vec::new();
    for (i, level) in levels.into_iter().enumerate() {
        let rp_id = format!("ssh:level{i}");
        let credential = sim.make_credential(&MakeCredential {
            rp_id: rp_id.clone(),
            challenge: b"challenge".to_vec(),
            user: User::default(),
            algorithm: CoseAlgorithm::EdDsa,
            resident: true,
            cred_protect: level,
            pin: Some(PIN.to_owned().into()),
        })?;
        made.push((rp_id, credential.id, level));
    }
    for (rp_id, id, level) in &made {
        let silent = assert_without_pin(&sim, rp_id, id);
        // Levels 1 and 2 serve a request that names the credential; level 3
        // only with user verification (CTAP 2.1 section 6.2.2).
        if *level == Some(CredProtect::UserVerificationRequired) {
            ensure!(
                silent == Err(CtapError::NoCredentials),
                "{rp_id}: {silent:?}"
            );
            let verified = sim.get_assertion(&GetAssertion {
                rp_id: rp_id.clone(),
                message: b"uv".to_vec(),
                credential_id: id.clone(),
                user_presence: false,
                pin: Some(PIN.to_owned().into()),
            })?;
            ensure!(verified.flags.user_verified());
        } else {
            ensure!(silent.is_ok(), "{rp_id}: {silent:?}");
        }
    }
    let listed = sim.resident_credentials(Some(&SecretString::from(PIN)))?;
    for (rp_id, _, level) in &made {
        let found = listed
            .iter()
            .find(|c| &c.rp_id == rp_id)
            .ok_or_else(|| anyhow::anyhow!("{rp_id} not listed"))?;
        // No extension: a level 1 credential.
        let expected = level.unwrap_or(CredProtect::UserVerificationOptional);
        ensure!(found.cred_protect == Some(expected), "{rp_id}: {found:?}");
    }
    Ok(())
}

/// OpenSSH's sk-usbhid asks for credProtect userVerificationRequired for a
/// verify-required key and userVerificationOptionalWithCredentialIDList for
/// another resident key; so does `enroll`.
#[test]
fn enrolment_asks_for_cred_protect_as_openssh() -> anyhow::Result<()> {
    let sim = Simulator::new("enrol-credprotect");
    sim.set_pin(PIN)?;
    let pin = || Some(SecretString::from(PIN));
    let plain = make_key(
        &sim,
        &Enrolment {
            pin: pin(),
            ..enrolment(CoseAlgorithm::EdDsa)
        },
    )?;
    assert_without_pin(&sim, "ssh:", plain.key_handle())?;
    let uv = make_key(
        &sim,
        &Enrolment {
            verify_required: true,
            pin: pin(),
            ..enrolment(CoseAlgorithm::EdDsa)
        },
    )?;
    ensure!(assert_without_pin(&sim, "ssh:", uv.key_handle()) == Err(CtapError::NoCredentials));
    for (application, verify_required, expected) in [
        (
            "ssh:resident",
            false,
            CredProtect::UserVerificationOptionalWithCredentialIdList,
        ),
        (
            "ssh:resident-uv",
            true,
            CredProtect::UserVerificationRequired,
        ),
    ] {
        make_key(
            &sim,
            &Enrolment {
                application: application.into(),
                resident: true,
                verify_required,
                pin: pin(),
                ..enrolment(CoseAlgorithm::Es256)
            },
        )?;
        let listed = sim.resident_credentials(pin().as_ref())?;
        let found = listed
            .iter()
            .find(|c| c.rp_id == application)
            .ok_or_else(|| anyhow::anyhow!("{application} not listed"))?;
        ensure!(found.cred_protect == Some(expected), "{found:?}");
    }
    Ok(())
}

/// A resident credential made with credProtect userVerificationRequired
/// (by OpenSSH's `ssh-keygen -O resident -O verify-required`, or by
/// `enroll`) loads as a verify-required key, as OpenSSH's sk-usbhid loads
/// it: the security key hides it from any assertion without the PIN.
#[tokio::test]
async fn a_resident_key_that_requires_uv_loads_as_verify_required_and_signs_with_the_pin(
) -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("resident-uv"));
    sim.set_pin(PIN)?;
    let credential = sim.make_credential(&MakeCredential {
        rp_id: "ssh:uv".into(),
        challenge: b"challenge".to_vec(),
        user: User {
            id: vec![0; 32],
            name: "openssh".into(),
        },
        algorithm: CoseAlgorithm::EdDsa,
        resident: true,
        cred_protect: Some(CredProtect::UserVerificationRequired),
        pin: Some(PIN.to_owned().into()),
    })?;
    let keys = token_agent_fido::ssh_keys(&*sim, Some(&SecretString::from(PIN)))?;
    let [(key, _)] = keys.as_slice() else {
        bail!("{} keys loaded", keys.len());
    };
    ensure!(key.key_handle() == credential.id.as_slice());
    ensure!(
        key.flags()
            == sk::USER_PRESENCE_REQUIRED | sk::USER_VERIFICATION_REQUIRED | sk::RESIDENT_KEY,
        "flags {:#x}",
        key.flags()
    );
    let (backend, published, _) = backend_with(vec![sim.clone()], &[]).await?;
    let loaded = backend
        .load_resident(Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.into())])))
        .await?;
    ensure!(loaded.len() == 1, "{loaded:?}");
    let listed = published.wait_until(Duration::from_secs(5), |ids| ids.len() == 1)?;
    let prompter = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.into())]));
    let signature = sign(&backend, &listed[0], b"resident uv", prompter.clone()).await?;
    conformance::verify(listed[0].public_key(), b"resident uv", &signature)?;
    ensure!(prompter.pin_requests().len() == 1);
    Ok(())
}

#[test]
fn a_second_resident_key_for_the_same_application_and_user_is_refused_unless_replacing(
) -> anyhow::Result<()> {
    let sim = Simulator::new("duplicate");
    sim.set_pin(PIN)?;
    let resident = Enrolment {
        application: "ssh:dup".into(),
        resident: true,
        pin: Some(PIN.to_owned().into()),
        ..enrolment(CoseAlgorithm::EdDsa)
    };
    let first = make_key(&sim, &resident)?;
    match token_agent_fido::enroll(&sim, &resident) {
        Err(EnrolError::CredentialExists(application)) => ensure!(application == "ssh:dup"),
        other => bail!("expected a refusal, got {other:?}"),
    }
    ensure!(sim.resident_count() == 1);
    let pin = SecretString::from(PIN);
    let listed = sim.resident_credentials(Some(&pin))?;
    ensure!(listed[0].credential_id == first.key_handle());
    // Another application is another credential.
    make_key(
        &sim,
        &Enrolment {
            application: "ssh:other".into(),
            ..resident.clone()
        },
    )?;
    ensure!(sim.resident_count() == 2);
    // Replacing, as ssh-keygen -O force: the device keeps the new one.
    let second = token_agent_fido::enroll_replacing(&sim, &resident)?;
    ensure!(sim.resident_count() == 2);
    let listed = sim.resident_credentials(Some(&pin))?;
    ensure!(listed
        .iter()
        .any(|c| c.rp_id == "ssh:dup" && c.credential_id == second.key_handle()));
    Ok(())
}

#[tokio::test]
async fn ssh_add_d_and_d_capital_remove_client_keys() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("remove"));
    let a = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let b = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let (backend, published, ids) = backend_with(vec![sim], &[(&a, "a"), (&b, "b")]).await?;
    backend.remove_key(ids[0].key()).await?;
    published.wait_until(Duration::from_secs(5), |ids| ids.len() == 1)?;
    ensure!(matches!(
        sign(&backend, &ids[0], b"x", Arc::new(Scripted::new([]))).await,
        Err(Error::KeyNotFound)
    ));
    backend.remove_all().await;
    published.wait_until(Duration::from_secs(5), <[Identity]>::is_empty)?;
    Ok(())
}

/// As OpenSSH, a key added again is replaced where it stands in the list.
#[tokio::test]
async fn a_key_added_again_keeps_its_place() -> anyhow::Result<()> {
    let sim = Arc::new(Simulator::new("order"));
    let a = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let b = make_key(&sim, &enrolment(CoseAlgorithm::EdDsa))?;
    let (backend, published, _) = backend_with(vec![sim], &[(&a, "a"), (&b, "b")]).await?;
    backend
        .add_key(AddKey {
            keypair: Box::new(a.to_keypair()?),
            opaque_secret: None,
            comment: "a again".into(),
            certificate: None,
            sk_provider: None,
        })
        .await?;
    published.wait_until(Duration::from_secs(5), |ids| {
        ids.iter().map(Identity::comment).collect::<Vec<_>>() == ["a again", "b"]
    })?;
    Ok(())
}

/// Collects everything logged, from every thread, at trace level.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut all) = self.0.lock() {
            all.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_pin_never_appears_in_the_logs() -> anyhow::Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (_sim, backend, identity) = verify_required_key().await?;
        // A right PIN, then a wrong one: both pass through the backend.
        let right = Arc::new(Scripted::new([ScriptedAnswer::Pin(PIN.into())]));
        sign(&backend, &identity, b"logged", right).await?;
        let wrong = Arc::new(Scripted::new([ScriptedAnswer::Pin("97531".into())]));
        ensure!(sign(&backend, &identity, b"logged", wrong).await.is_err());
        anyhow::Ok(())
    })?;
    let text =
        String::from_utf8_lossy(&captured.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?)
            .into_owned();
    ensure!(
        !text.is_empty(),
        "nothing was logged, so nothing was checked"
    );
    ensure!(!text.contains(PIN) && !text.contains("97531"), "{text}");
    Ok(())
}
