//! The PIV backend in this process, against piv-sim cards behind a private
//! pcscd. Each test starts its rig in the parent and does its PC/SC work in a
//! child process (libpcsclite reads PCSCLITE_CSOCK_NAME once per process).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use secrecy::SecretString;
use ssh_key::{Algorithm, EcdsaCurve};
use token_agent_core::{Backend, Error, NoticeKind, SignContext, SignFlags, SignRequest};
use token_agent_e2e::conformance;
use token_agent_e2e::pcsc::{control, READER_NAME};
use token_agent_prompt::{Asked, Scripted, ScriptedAnswer};
use yubikey::piv::AlgorithmId::{EccP256, EccP384, Rsa2048};
use yubikey::PinPolicy;
use yubikey::TouchPolicy;

use crate::common::*;

fn request(flags: u32) -> SignRequest {
    SignRequest {
        data: b"token-agent piv test".to_vec(),
        flags: SignFlags::from_bits(flags),
    }
}

fn pins(n: usize, pin: &str) -> Arc<Scripted> {
    Arc::new(Scripted::new(std::iter::repeat_n(
        ScriptedAnswer::Pin(pin.to_owned()),
        n,
    )))
}

async fn sign_ok(
    started: &Started,
    identity: &token_agent_core::Identity,
    prompter: Arc<Scripted>,
) -> Result<()> {
    let request = request(SignFlags::RSA_SHA2_256);
    let signature = started
        .backend
        .sign(identity.key(), &request, &SignContext::default(), prompter)
        .await
        .with_context(|| format!("signing with {}", identity.comment()))?;
    conformance::verify(identity.public_key(), &request.data, &signature)
}

const TWO_A: u32 = 21_000_001;
const TWO_B: u32 = 21_000_002;

#[test]
fn two_cards_are_listed_and_pass_the_conformance_suite() -> Result<()> {
    if rig_or_child(
        &[TWO_A, TWO_B],
        "backend::two_cards_are_listed_and_pass_the_conformance_suite",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        TWO_A,
        &[
            (0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never),
            (0x9c, EccP384, PinPolicy::Always, TouchPolicy::Never),
            (0x9d, Rsa2048, PinPolicy::Once, TouchPolicy::Never),
        ],
    )?;
    provision(
        TWO_B,
        &[
            (0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never),
            (0x9e, EccP256, PinPolicy::Never, TouchPolicy::Never),
        ],
    )?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        wait_keys(&started.published, TWO_A, 3)?;
        let all = wait_keys(&started.published, TWO_B, 2)?;
        ensure!(all.len() == 5, "{:?}", comments(&all));
        let a9a = identity(&all, TWO_A, "9a")?;
        ensure!(
            a9a.comment() == format!("YubiKey 5 #{TWO_A} slot 9a (PIV Authentication)"),
            "{}",
            a9a.comment()
        );
        ensure!(a9a.device().and_then(|d| d.serial()) == Some(&*TWO_A.to_string()));
        conformance::lists_every_key_type(
            &all,
            &[
                Algorithm::Ecdsa {
                    curve: EcdsaCurve::NistP256,
                },
                Algorithm::Ecdsa {
                    curve: EcdsaCurve::NistP384,
                },
                Algorithm::Rsa { hash: None },
            ],
        )?;

        // A's 9a (once) and 9c (always) ask, A's 9d shares 9a's PIN, B's 9a
        // asks once, B's 9e never does.
        let prompter = pins(10, PIN);
        conformance::signs_with_every_key(&*started.backend, &all, prompter.clone()).await?;
        let asked = prompter.pin_requests();
        ensure!(asked.len() == 3, "the PIN was asked {} times", asked.len());
        ensure!(asked.iter().all(|r| r.tries_left == Some(3)));
        ensure!(
            asked[0].description().contains(&format!(
                "Enter the PIN of YubiKey 5 #{TWO_A} to use key YubiKey 5 #{TWO_A} slot 9a"
            )),
            "{}",
            asked[0].description()
        );

        // SHA-1 only when asked for.
        let a9d = identity(&all, TWO_A, "9d")?;
        let legacy = started
            .backend
            .sign(
                a9d.key(),
                &request(0),
                &SignContext::default(),
                pins(1, PIN),
            )
            .await?;
        ensure!(legacy.algorithm() == "ssh-rsa", "{}", legacy.algorithm());

        // A wrong PIN: asked once, never retried; then the right one, asked
        // with the tries left.
        let tries =
            conformance::wrong_pin_is_not_retried(&*started.backend, &a9a, "654321").await?;
        ensure!(tries == Some(2), "tries left {tries:?}");
        conformance::cancelled_pin_is_the_persons_choice(&*started.backend, &a9a).await?;
        let right = pins(1, PIN);
        sign_ok(&started, &a9a, right.clone()).await?;
        ensure!(right.pin_requests()[0].tries_left == Some(2));

        // Card B goes; A stays; B comes back within the hot-plug limit.
        let b9e = identity(&all, TWO_B, "9e")?;
        conformance::device_gone(
            &*started.backend,
            &started.published,
            &b9e,
            || control("remove 1").map(drop),
            HOTPLUG,
        )
        .await?;
        ensure!(started.published.current().len() == 3);
        let inserted = Instant::now();
        control("insert 1")?;
        wait_keys(&started.published, TWO_B, 2)?;
        eprintln!("card B listed {:?} after insertion", inserted.elapsed());
        sign_ok(&started, &b9e, pins(0, PIN)).await
    })
}

const POLICIES: u32 = 21_000_011;

#[test]
fn pin_once_is_cached_until_idle_expiry_or_lock_and_always_asks_each_time() -> Result<()> {
    if rig_or_child(
        &[POLICIES],
        "backend::pin_once_is_cached_until_idle_expiry_or_lock_and_always_asks_each_time",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        POLICIES,
        &[
            (0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never),
            (0x9c, EccP256, PinPolicy::Always, TouchPolicy::Never),
        ],
    )?;
    let started = start_backend(Duration::from_secs(2));
    block_on(async {
        let all = wait_keys(&started.published, POLICIES, 2)?;
        let once = identity(&all, POLICIES, "9a")?;
        let always = identity(&all, POLICIES, "9c")?;
        let prompter = pins(10, PIN);
        let asked = |n: usize| -> Result<()> {
            let got = prompter.pin_requests().len();
            ensure!(got == n, "the PIN was asked {got} times, expected {n}");
            Ok(())
        };
        sign_ok(&started, &once, prompter.clone()).await?;
        sign_ok(&started, &once, prompter.clone()).await?;
        asked(1)?;
        sign_ok(&started, &always, prompter.clone()).await?;
        sign_ok(&started, &always, prompter.clone()).await?;
        asked(3)?;
        // The cached PIN expires after 2 s without use, and the card forgets it.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        sign_ok(&started, &once, prompter.clone()).await?;
        asked(4)?;
        sign_ok(&started, &once, prompter.clone()).await?;
        asked(4)?;
        // Locking the agent forgets it too.
        started.backend.forget_secrets();
        sign_ok(&started, &once, prompter.clone()).await?;
        asked(5)
    })
}

const FIRMWARE_5_2: u32 = 21_000_012;

/// A YubiKey 5 before 5.3 has no GET METADATA: the PIN tries come from an
/// empty VERIFY, which answers 9000 while the PIN is verified. The agent once
/// read that as "0 tries left" and called the PIN blocked when a PIN-always
/// key was used after a PIN-once key had verified it.
#[test]
fn firmware_before_5_3_asks_for_a_pin_always_key_after_a_pin_once_key_verified_the_pin(
) -> Result<()> {
    if rig_or_child_with(
        &[piv_sim::CardConfig {
            serial: FIRMWARE_5_2,
            version: [5, 2, 7],
        }],
        "backend::firmware_before_5_3_asks_for_a_pin_always_key_after_a_pin_once_key_verified_the_pin",
    )?
    .is_some()
    {
        return Ok(());
    }
    setup_with_certificates(
        FIRMWARE_5_2,
        &[
            ("9a", token_agent_piv::PinUse::Once),
            ("9c", token_agent_piv::PinUse::Always),
        ],
    )?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        let all = wait_keys(&started.published, FIRMWARE_5_2, 2)?;
        let once = identity(&all, FIRMWARE_5_2, "9a")?;
        let always = identity(&all, FIRMWARE_5_2, "9c")?;
        let prompter = pins(10, PIN);
        sign_ok(&started, &once, prompter.clone()).await?;
        let asked = prompter.pin_requests();
        ensure!(
            asked.len() == 1 && asked[0].tries_left == Some(3),
            "{asked:?}"
        );
        // The PIN is verified now: the count is unknown, and not zero.
        sign_ok(&started, &always, prompter.clone()).await?;
        let asked = prompter.pin_requests();
        ensure!(
            asked.len() == 2 && asked[1].tries_left.is_none(),
            "{asked:?}"
        );
        sign_ok(&started, &once, prompter.clone()).await?;
        ensure!(prompter.pin_requests().len() == 2);
        Ok(())
    })
}

const COUNTER: u32 = 21_000_021;

/// Runs yubico-piv-tool with a wrong PIN; it resets the card when it leaves.
fn wrong_pin_from_another_program() -> Result<()> {
    let out = std::process::Command::new("yubico-piv-tool")
        .args(["--reader", &format!("{READER_NAME} 00 00")])
        .args(["-a", "verify-pin", "-P", "000000"])
        .output()?;
    ensure!(!out.status.success(), "a wrong PIN was accepted");
    Ok(())
}

/// Another PC/SC client selects PIV, sends `command` and leaves the card as
/// `disposition` says; returns the status word.
fn another_client(command: &[u8], disposition: ::pcsc::Disposition) -> Result<u16> {
    let context = ::pcsc::Context::establish(::pcsc::Scope::User)?;
    let reader = std::ffi::CString::new(format!("{READER_NAME} 00 00"))?;
    let card = context.connect(&reader, ::pcsc::ShareMode::Shared, ::pcsc::Protocols::ANY)?;
    let mut buffer = [0u8; 258];
    let select = [0x00, 0xA4, 0x04, 0x00, 0x05, 0xA0, 0x00, 0x00, 0x03, 0x08];
    let answer = card.transmit(&select, &mut buffer)?;
    ensure!(
        answer.ends_with(&[0x90, 0x00]),
        "SELECT answered {answer:02x?}"
    );
    let answer = card.transmit(command, &mut buffer)?;
    let sw = match answer {
        [.., sw1, sw2] => u16::from_be_bytes([*sw1, *sw2]),
        _ => bail!("an answer without a status word"),
    };
    card.disconnect(disposition).map_err(|(_, e)| e)?;
    Ok(sw)
}

/// A PIN as VERIFY and CHANGE REFERENCE DATA carry it: padded with FF to 8 bytes.
fn padded(pin: &str) -> Vec<u8> {
    let mut bytes = pin.as_bytes().to_vec();
    bytes.resize(8, 0xFF);
    bytes
}

/// A wrong PIN from a program that leaves the card without resetting it.
fn wrong_pin_without_a_reset() -> Result<()> {
    let mut verify = vec![0x00, 0x20, 0x00, 0x80, 0x08];
    verify.extend(padded("000000"));
    let sw = another_client(&verify, ::pcsc::Disposition::LeaveCard)?;
    ensure!(sw & 0xFFF0 == 0x63C0, "a wrong PIN answered {sw:04X}");
    Ok(())
}

#[test]
fn cached_pin_is_not_used_on_the_last_try_and_a_blocked_pin_says_how_to_unblock() -> Result<()> {
    if rig_or_child(
        &[COUNTER],
        "backend::cached_pin_is_not_used_on_the_last_try_and_a_blocked_pin_says_how_to_unblock",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        COUNTER,
        &[(0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never)],
    )?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        let all = wait_keys(&started.published, COUNTER, 1)?;
        let key = identity(&all, COUNTER, "9a")?;
        let prompter = pins(1, PIN);
        sign_ok(&started, &key, prompter.clone()).await?;

        // Another program spends a try and leaves the card as it is: the
        // agent verifies again with its cached PIN (2 tries left).
        wrong_pin_without_a_reset()?;
        sign_ok(&started, &key, prompter.clone()).await?;
        ensure!(prompter.pin_requests().len() == 1);

        // Two wrong PINs elsewhere leave one try: the cached PIN is not used,
        // the person is asked, with a warning.
        wrong_pin_without_a_reset()?;
        wrong_pin_without_a_reset()?;
        let last = Arc::new(Scripted::new([ScriptedAnswer::Pin("000000".into())]));
        let result = started
            .backend
            .sign(
                key.key(),
                &request(0),
                &SignContext::default(),
                last.clone(),
            )
            .await;
        let asked = last.pin_requests();
        ensure!(asked.len() == 1, "asked {} times", asked.len());
        ensure!(asked[0].tries_left == Some(1));
        let warning = asked[0].warning.clone().unwrap_or_default();
        ensure!(
            warning.contains("Only one PIN try is left")
                && warning.contains("saved PIN was not used"),
            "{warning}"
        );
        let remedy = format!("token-agent piv unblock --serial {COUNTER}");
        match result {
            Err(Error::PinBlocked { remedy: r, .. }) if r.contains(&remedy) => {}
            other => bail!("expected a blocked PIN, got {other:?}"),
        }

        // Blocked: fails at once, nobody is asked.
        let nobody = Arc::new(Scripted::new([]));
        let result = started
            .backend
            .sign(
                key.key(),
                &request(0),
                &SignContext::default(),
                nobody.clone(),
            )
            .await;
        ensure!(
            matches!(result, Err(Error::PinBlocked { .. })),
            "{result:?}"
        );
        ensure!(nobody.asked().is_empty());

        // The PUK sets a new PIN, which then works.
        token_agent_piv::manage::unblock(
            Some(COUNTER),
            &SecretString::from(PUK),
            &SecretString::from("234567"),
        )?;
        sign_ok(&started, &key, pins(1, "234567")).await
    })
}

const CHANGED: u32 = 21_000_022;

/// A program that resets the card as it leaves (yubico-piv-tool, ykman,
/// `token-agent piv setup --change-pin`) may have changed the PIN: the agent
/// forgets its cached PIN and asks, instead of spending a try on a PIN nobody
/// typed.
#[test]
fn a_reset_by_another_program_forgets_the_cached_pin() -> Result<()> {
    if rig_or_child(
        &[CHANGED],
        "backend::a_reset_by_another_program_forgets_the_cached_pin",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        CHANGED,
        &[(0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never)],
    )?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        let all = wait_keys(&started.published, CHANGED, 1)?;
        let key = identity(&all, CHANGED, "9a")?;
        let prompter = Arc::new(Scripted::new([
            ScriptedAnswer::Pin(PIN.into()),
            ScriptedAnswer::Pin("654321".into()),
            ScriptedAnswer::Pin("654321".into()),
        ]));
        sign_ok(&started, &key, prompter.clone()).await?;

        let mut change = vec![0x00, 0x24, 0x00, 0x80, 0x10];
        change.extend(padded(PIN));
        change.extend(padded("654321"));
        let sw = another_client(&change, ::pcsc::Disposition::ResetCard)?;
        ensure!(sw == 0x9000, "CHANGE REFERENCE DATA answered {sw:04X}");

        sign_ok(&started, &key, prompter.clone()).await?;
        let asked = prompter.pin_requests();
        ensure!(asked.len() == 2, "the PIN was asked {} times", asked.len());
        ensure!(asked[1].tries_left == Some(3), "{:?}", asked[1].tries_left);
        let status = control("status 0")?;
        ensure!(status.contains("pin-tries=3"), "a try was spent: {status}");
        // The new PIN is cached as the old one was.
        sign_ok(&started, &key, prompter.clone()).await?;
        ensure!(prompter.pin_requests().len() == 2);

        // yubico-piv-tool resets the card when it leaves, too.
        wrong_pin_from_another_program()?;
        sign_ok(&started, &key, prompter.clone()).await?;
        let asked = prompter.pin_requests();
        ensure!(asked.len() == 3, "the PIN was asked {} times", asked.len());
        ensure!(asked[2].tries_left == Some(2), "{:?}", asked[2].tries_left);
        Ok(())
    })
}

const BURST: u32 = 21_000_091;

#[test]
fn requests_that_waited_for_a_wrong_pin_or_a_cancel_fail_with_it_and_do_not_ask_again() -> Result<()>
{
    if rig_or_child(
        &[BURST],
        "backend::requests_that_waited_for_a_wrong_pin_or_a_cancel_fail_with_it_and_do_not_ask_again",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        BURST,
        &[(0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never)],
    )?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        let all = wait_keys(&started.published, BURST, 1)?;
        let key = identity(&all, BURST, "9a")?;
        // Four requests at once, the PIN not yet given: one question.
        let four = |prompter: Arc<Scripted>| {
            let sign = |prompter: Arc<Scripted>| {
                let (backend, key) = (started.backend.clone(), key.clone());
                async move {
                    backend
                        .sign(key.key(), &request(0), &SignContext::default(), prompter)
                        .await
                }
            };
            async move {
                let (a, b, c, d) = tokio::join!(
                    sign(prompter.clone()),
                    sign(prompter.clone()),
                    sign(prompter.clone()),
                    sign(prompter.clone())
                );
                [a, b, c, d]
            }
        };

        // A wrong PIN: all four fail with it, one try spent, nobody asked again.
        let wrong = Arc::new(Scripted::new([
            ScriptedAnswer::Pin("000000".into()),
            ScriptedAnswer::Pin(PIN.into()),
        ]));
        for result in four(wrong.clone()).await {
            ensure!(
                matches!(
                    result,
                    Err(Error::WrongPin {
                        tries_left: Some(2),
                        ..
                    })
                ),
                "{result:?}"
            );
        }
        ensure!(wrong.pin_requests().len() == 1);

        // A Cancel ends the next burst the same way.
        let cancel = Arc::new(Scripted::new([
            ScriptedAnswer::Cancel,
            ScriptedAnswer::Pin(PIN.into()),
        ]));
        for result in four(cancel.clone()).await {
            ensure!(matches!(result, Err(Error::Prompt(_))), "{result:?}");
        }
        ensure!(cancel.pin_requests().len() == 1);

        // A request after that asks again; the right PIN serves the whole
        // burst, the card's tries are back to three.
        let right = pins(4, PIN);
        for result in four(right.clone()).await {
            let signature = result?;
            conformance::verify(key.public_key(), &request(0).data, &signature)?;
        }
        ensure!(right.pin_requests().len() == 1);
        let status = format!("{:?}", started.backend.devices());
        ensure!(status.contains("PIN: 3 tries left"), "{status}");
        let asked = pins(1, PIN);
        sign_ok(&started, &key, asked.clone()).await?;
        ensure!(asked.pin_requests().is_empty());
        Ok(())
    })
}

const PANIC: u32 = 21_000_092;

/// The `yubikey` crate indexes card answers without checking their length,
/// so a malformed answer (here a GET METADATA body missing its algorithm
/// byte) panics it. The card's worker once died with it: the card stayed
/// listed and every later signature said it was removed.
#[test]
fn a_malformed_card_answer_fails_one_signature_and_the_card_keeps_working() -> Result<()> {
    if rig_or_child(
        &[PANIC],
        "backend::a_malformed_card_answer_fails_one_signature_and_the_card_keeps_working",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        PANIC,
        &[(0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never)],
    )?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        let all = wait_keys(&started.published, PANIC, 1)?;
        let key = identity(&all, PANIC, "9a")?;
        // Signing needs the PIN, and the worker reads the tries left (GET
        // METADATA on the PIN) before it asks.
        control("fault malformed-metadata 0")?;
        let result = started
            .backend
            .sign(
                key.key(),
                &request(0),
                &SignContext::default(),
                pins(1, PIN),
            )
            .await;
        match &result {
            Err(Error::Device { message, .. })
                if message.contains("could not read") && message.contains("try again") => {}
            other => bail!("expected the card's answer to be refused, got {other:?}"),
        }
        control("fault none 0")?;
        ensure!(started.published.current().len() == 1);
        let prompter = pins(1, PIN);
        sign_ok(&started, &key, prompter.clone()).await?;
        ensure!(prompter.pin_requests().len() == 1);
        Ok(())
    })
}

const TOUCH: u32 = 21_000_031;

/// Polls the card's control status until it waits for a touch.
async fn wait_for_blinking() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while control("waiting 0")? != "true" {
        ensure!(
            Instant::now() < deadline,
            "the card never waited for a touch"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[test]
fn touch_notice_is_raised_while_the_card_waits_and_a_missing_touch_times_out() -> Result<()> {
    if rig_or_child(
        &[TOUCH],
        "backend::touch_notice_is_raised_while_the_card_waits_and_a_missing_touch_times_out",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        TOUCH,
        &[
            (0x9e, EccP256, PinPolicy::Never, TouchPolicy::Always),
            (0x9a, EccP256, PinPolicy::Never, TouchPolicy::Never),
        ],
    )?;
    let started = Arc::new(start_backend(Duration::from_secs(600)));
    block_on(async {
        let all = wait_keys(&started.published, TOUCH, 2)?;
        let key = identity(&all, TOUCH, "9e")?;
        let plain = identity(&all, TOUCH, "9a")?;
        control("touch-mode manual 0")?;
        let prompter = Arc::new(Scripted::new([]));
        let signing = {
            let (started, key, prompter) = (started.clone(), key.clone(), prompter.clone());
            tokio::spawn(async move { sign_ok(&started, &key, prompter).await })
        };
        wait_for_blinking().await?;
        ensure!(
            prompter.active_notices() == 1,
            "no notice while the card blinks"
        );
        let notice = prompter.asked().into_iter().find_map(|a| match a {
            Asked::Notice(n) => Some(n),
            _ => None,
        });
        ensure!(notice.is_some_and(|n| n.kind == NoticeKind::Touch
            && n.description()
                .starts_with(&format!("Touch YubiKey 5 #{TOUCH}"))));
        control("touch 0")?;
        signing.await??;
        ensure!(prompter.active_notices() == 0, "the notice stayed up");
        // A key without a touch policy raises no notice.
        let quiet = Arc::new(Scripted::new([]));
        sign_ok(&started, &plain, quiet.clone()).await?;
        ensure!(quiet.asked().is_empty());

        control("touch-timeout 1 0")?;
        control("touch-mode never 0")?;
        let result = started
            .backend
            .sign(
                key.key(),
                &request(0),
                &SignContext::default(),
                prompter.clone(),
            )
            .await;
        ensure!(
            matches!(result, Err(Error::TouchTimeout { .. })),
            "{result:?}"
        );
        ensure!(prompter.active_notices() == 0);
        Ok(())
    })
}

const REMOVAL: u32 = 21_000_041;

#[test]
fn card_removed_in_the_middle_of_a_signature_fails_fast_and_comes_back() -> Result<()> {
    if rig_or_child(
        &[REMOVAL],
        "backend::card_removed_in_the_middle_of_a_signature_fails_fast_and_comes_back",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        REMOVAL,
        &[(0x9e, EccP256, PinPolicy::Never, TouchPolicy::Always)],
    )?;
    let started = Arc::new(start_backend(Duration::from_secs(600)));
    block_on(async {
        let all = wait_keys(&started.published, REMOVAL, 1)?;
        let key = identity(&all, REMOVAL, "9e")?;
        // The simulated card gives up waiting soon, so it can be inserted again.
        control("touch-timeout 2 0")?;
        control("touch-mode manual 0")?;
        let signing = {
            let (started, key) = (started.clone(), key.clone());
            tokio::spawn(async move {
                started
                    .backend
                    .sign(
                        key.key(),
                        &request(0),
                        &SignContext::default(),
                        Arc::new(Scripted::new([])),
                    )
                    .await
            })
        };
        wait_for_blinking().await?;
        let pulled = Instant::now();
        control("remove 0")?;
        let result = signing.await?;
        let took = pulled.elapsed();
        ensure!(
            matches!(result, Err(Error::DeviceRemoved { .. })),
            "{result:?}"
        );
        ensure!(took < Duration::from_secs(1), "the failure took {took:?}");
        started
            .published
            .wait_until(HOTPLUG, |ids| ids.is_empty())?;
        let result = started
            .backend
            .sign(
                key.key(),
                &request(0),
                &SignContext::default(),
                Arc::new(Scripted::new([])),
            )
            .await;
        ensure!(
            matches!(result, Err(Error::DeviceRemoved { .. })),
            "{result:?}"
        );

        control("touch-mode auto 0 0")?;
        // Let the card's wait for the touch run out before it goes back.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        control("insert 0")?;
        wait_keys(&started.published, REMOVAL, 1)?;
        sign_ok(&started, &key, Arc::new(Scripted::new([]))).await
    })
}

const SHARED: u32 = 21_000_051;

#[test]
fn another_pcsc_client_in_a_transaction_delays_signing_without_breaking_it() -> Result<()> {
    if rig_or_child(
        &[SHARED],
        "backend::another_pcsc_client_in_a_transaction_delays_signing_without_breaking_it",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        SHARED,
        &[(0x9e, EccP256, PinPolicy::Never, TouchPolicy::Never)],
    )?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        let all = wait_keys(&started.published, SHARED, 1)?;
        let key = identity(&all, SHARED, "9e")?;
        // The agent holds no exclusive access: another client connects and
        // opens a transaction while the agent is connected.
        let (held, holding) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || -> Result<()> {
            let context = ::pcsc::Context::establish(::pcsc::Scope::User)?;
            let reader = std::ffi::CString::new(format!("{READER_NAME} 00 00"))?;
            let mut card =
                context.connect(&reader, ::pcsc::ShareMode::Shared, ::pcsc::Protocols::ANY)?;
            let transaction = card.transaction()?;
            held.send(())?;
            std::thread::sleep(Duration::from_millis(800));
            drop(transaction);
            Ok(())
        });
        holding.recv_timeout(Duration::from_secs(10))?;
        let asked = Instant::now();
        sign_ok(&started, &key, Arc::new(Scripted::new([]))).await?;
        let took = asked.elapsed();
        other
            .join()
            .map_err(|_| anyhow::anyhow!("the other client panicked"))??;
        ensure!(
            took >= Duration::from_millis(500),
            "the agent signed during another client's transaction ({took:?})"
        );
        Ok(())
    })
}

const HELD: u32 = 21_000_071;

/// Another program connects to the card in exclusive mode, as GnuPG's
/// scdaemon does without `pcsc-shared`; it holds the card until dropped.
fn hold_exclusively() -> Result<::pcsc::Card> {
    let context = ::pcsc::Context::establish(::pcsc::Scope::User)?;
    let reader = std::ffi::CString::new(format!("{READER_NAME} 00 00"))?;
    Ok(context.connect(
        &reader,
        ::pcsc::ShareMode::Exclusive,
        ::pcsc::Protocols::ANY,
    )?)
}

/// The status lines of the backend that say a card is held by another program.
fn held_notes(started: &Started) -> Vec<String> {
    started
        .backend
        .devices()
        .into_iter()
        .filter(|d| d.problem)
        .flat_map(|d| d.details)
        .filter(|line| line.contains("holds the card exclusively"))
        .collect()
}

#[test]
fn a_card_held_exclusively_by_another_program_opens_once_it_lets_go() -> Result<()> {
    if rig_or_child(
        &[HELD],
        "backend::a_card_held_exclusively_by_another_program_opens_once_it_lets_go",
    )?
    .is_some()
    {
        return Ok(());
    }
    provision(
        HELD,
        &[(0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never)],
    )?;
    // Held before the agent looks: releasing it changes no pcscd event
    // counter, so only the agent's own retries can find the card again.
    let holder = hold_exclusively()?;
    let started = start_backend(Duration::from_secs(600));
    block_on(async {
        let deadline = Instant::now() + HOTPLUG * 3;
        let notes = loop {
            let notes = held_notes(&started);
            if !notes.is_empty() || Instant::now() > deadline {
                break notes;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        ensure!(
            notes.iter().any(|n| n.contains("GnuPG's scdaemon")
                && n.contains("pcsc-shared in ~/.gnupg/scdaemon.conf")),
            "status while held: {notes:?}"
        );
        // Longer than the agent's first retry, which finds it still held.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ensure!(started.published.current().is_empty());
        drop(holder);
        let all = wait_keys(&started.published, HELD, 1)?;
        ensure!(
            held_notes(&started).is_empty(),
            "{:?}",
            held_notes(&started)
        );
        let key = identity(&all, HELD, "9a")?;
        sign_ok(&started, &key, pins(1, PIN)).await?;

        // Forgetting the PIN lets go of the card (as an idle expiry or a
        // lock does), and another program takes it while it is listed.
        started.backend.forget_secrets();
        let deadline = Instant::now() + HOTPLUG;
        let holder = loop {
            match hold_exclusively() {
                Ok(holder) => break holder,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let result = started
            .backend
            .sign(
                key.key(),
                &request(0),
                &SignContext::default(),
                pins(1, PIN),
            )
            .await;
        match &result {
            Err(Error::Device { message, .. })
                if message.contains("holds the card exclusively")
                    && message.contains("gpgconf --kill scdaemon") => {}
            other => bail!("signing while another program holds the card: {other:?}"),
        }
        drop(holder);
        sign_ok(&started, &key, pins(1, PIN)).await
    })
}

const SECRET: u32 = 21_000_061;

/// Collects everything a tracing subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_pin_never_reaches_the_logs_even_at_trace_level() -> Result<()> {
    if rig_or_child(
        &[SECRET],
        "backend::a_pin_never_reaches_the_logs_even_at_trace_level",
    )?
    .is_some()
    {
        return Ok(());
    }
    // Everything at trace, and `log` records (the yubikey crate's) bridged in.
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    provision(
        SECRET,
        &[(0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never)],
    )?;
    let started = start_backend(Duration::from_secs(600));
    let wrong = "97531864";
    block_on(async {
        let all = wait_keys(&started.published, SECRET, 1)?;
        let key = identity(&all, SECRET, "9a")?;
        let result = started
            .backend
            .sign(
                key.key(),
                &request(0),
                &SignContext::default(),
                pins(1, wrong),
            )
            .await;
        ensure!(matches!(result, Err(Error::WrongPin { .. })), "{result:?}");
        sign_ok(&started, &key, pins(1, PIN)).await
    })?;
    let text = String::from_utf8_lossy(&capture.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?)
        .into_owned();
    ensure!(
        text.contains("YubiKey connected"),
        "the capture saw nothing:\n{text}"
    );
    let decimal = wrong
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let hex: String = wrong.bytes().map(|b| format!("{b:02x}")).collect();
    let right_decimal = PIN
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for secret in [wrong, &decimal, &hex, &hex.to_uppercase(), &right_decimal] {
        ensure!(
            !text.contains(secret),
            "the log shows a PIN ({secret}):\n{text}"
        );
    }
    Ok(())
}

const NEW_ALGORITHMS: u32 = 21_000_081;

/// Generates an RSA 3072 key in `slot` of a firmware 5.7 card with raw APDUs,
/// as ykman does: the `yubikey` crate knows no algorithm newer than 5.3's.
fn generate_rsa3072(slot: u8) -> Result<()> {
    let context = ::pcsc::Context::establish(::pcsc::Scope::User)?;
    let reader = std::ffi::CString::new(format!("{READER_NAME} 00 00"))?;
    let card = context.connect(&reader, ::pcsc::ShareMode::Shared, ::pcsc::Protocols::ANY)?;
    let mut buffer = [0u8; 258];
    // The answer's data, after GET RESPONSE for a long one, and its status word.
    let mut send = |apdu: &[u8]| -> Result<(Vec<u8>, u16)> {
        let mut data = Vec::new();
        let mut answer = card.transmit(apdu, &mut buffer)?.to_vec();
        loop {
            let Some((body, sw)) = answer.split_last_chunk::<2>() else {
                bail!("an answer without a status word");
            };
            data.extend_from_slice(body);
            let sw = u16::from_be_bytes(*sw);
            if sw & 0xFF00 != 0x6100 {
                return Ok((data, sw));
            }
            answer = card
                .transmit(&[0x00, 0xC0, 0x00, 0x00, 0x00], &mut buffer)?
                .to_vec();
        }
    };
    let select = [0x00, 0xA4, 0x04, 0x00, 0x05, 0xA0, 0x00, 0x00, 0x03, 0x08];
    ensure!(send(&select)?.1 == 0x9000, "SELECT failed");
    // External authentication with the factory management key.
    let (answer, sw) = send(&[0x00, 0x87, 0x03, 0x9B, 0x04, 0x7C, 0x02, 0x81, 0x00])?;
    ensure!(sw == 0x9000 && answer.len() == 12, "no challenge: {sw:04X}");
    let response = piv_sim::crypto::mgm_block(
        piv_sim::crypto::MgmAlgorithm::TripleDes,
        &piv_sim::state::DEFAULT_MGM_KEY,
        &answer[4..],
        true,
    )
    .context("encrypting the challenge")?;
    let mut authenticate = vec![0x00, 0x87, 0x03, 0x9B, 0x0C, 0x7C, 0x0A, 0x82, 0x08];
    authenticate.extend_from_slice(&response);
    ensure!(send(&authenticate)?.1 == 0x9000, "management key refused");
    let generate = [0x00, 0x47, 0x00, slot, 0x05, 0xAC, 0x03, 0x80, 0x01, 0x05];
    let (_, sw) = send(&generate)?;
    ensure!(sw == 0x9000, "GENERATE RSA 3072 answered {sw:04X}");
    card.disconnect(::pcsc::Disposition::LeaveCard)
        .map_err(|(_, e)| e)?;
    Ok(())
}

/// Stores the attestation certificate of `slot`'s key as its certificate.
fn certify_with_attestation(serial: u32, slot: u8) -> Result<()> {
    let mut yubikey = yubikey::YubiKey::open_by_serial(yubikey::Serial(serial))?;
    let slot = yubikey::piv::SlotId::try_from(slot)?;
    let der = yubikey::piv::attest(&mut yubikey, slot)?;
    yubikey.authenticate(yubikey::MgmKey::default())?;
    yubikey::certificate::Certificate::from_bytes(der)?.write(
        &mut yubikey,
        slot,
        yubikey::certificate::CertInfo::Uncompressed,
    )?;
    yubikey
        .disconnect(::pcsc::Disposition::LeaveCard)
        .map_err(|(_, e)| e)?;
    Ok(())
}

#[test]
fn keys_the_yubikey_crate_cannot_read_are_logged_once_and_shown_in_status() -> Result<()> {
    let config = piv_sim::CardConfig {
        serial: NEW_ALGORITHMS,
        version: [5, 7, 1],
    };
    if rig_or_child_with(
        &[config],
        "backend::keys_the_yubikey_crate_cannot_read_are_logged_once_and_shown_in_status",
    )?
    .is_some()
    {
        return Ok(());
    }
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    provision(
        NEW_ALGORITHMS,
        &[(0x9a, EccP256, PinPolicy::Once, TouchPolicy::Never)],
    )?;
    generate_rsa3072(0x9d)?;
    generate_rsa3072(0x9e)?;
    certify_with_attestation(NEW_ALGORITHMS, 0x9e)?;
    let started = start_backend(Duration::from_secs(600));
    let log = || -> Result<String> {
        let bytes = capture.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let all = wait_keys(&started.published, NEW_ALGORITHMS, 1)?;
    identity(&all, NEW_ALGORITHMS, "9a")?;
    ensure!(all.len() == 1, "{:?}", comments(&all));

    let without_certificate = "slot 9d skipped: it holds a key of an algorithm new in \
        firmware 5.7 (Ed25519, X25519, RSA 3072 or RSA 4096), which the agent cannot use yet";
    let with_certificate =
        "slot 9e skipped: it holds an RSA 3072 key, which the agent cannot use yet";
    let devices = started.backend.devices();
    let details: Vec<&String> = devices
        .iter()
        .filter(|d| d.label == format!("YubiKey 5 #{NEW_ALGORITHMS}"))
        .flat_map(|d| &d.details)
        .collect();
    for note in [without_certificate, with_certificate] {
        ensure!(
            details.iter().any(|d| d.starts_with(note)),
            "status lacks {note:?}: {details:?}"
        );
    }

    // Pulled out and plugged back in: the card is scanned again, but each
    // skipped slot was logged once.
    control("remove 0")?;
    started
        .published
        .wait_until(HOTPLUG, |ids| ids.is_empty())?;
    control("insert 0")?;
    wait_keys(&started.published, NEW_ALGORITHMS, 1)?;
    let text = log()?;
    ensure!(
        text.matches("YubiKey connected").count() == 2,
        "the card was not opened twice:\n{text}"
    );
    for note in [without_certificate, with_certificate] {
        ensure!(
            text.matches(note).count() == 1,
            "{note:?} is not logged once:\n{text}"
        );
    }
    Ok(())
}
