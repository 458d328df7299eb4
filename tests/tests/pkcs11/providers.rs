use std::path::Path;
use std::time::Duration;

use token_agent_e2e::check;
use token_agent_e2e::openssh::Sshd;
use token_agent_e2e::softhsm::{build_shim, KeyKind, Shim, SoftHsm, MODULE, PIN};

use crate::{
    add_provider, add_provider_with, sign_and_verify, start_agent, start_agent_asking, try_sign,
    wait_listed,
};

#[test]
fn ssh_add_s_loads_two_tokens_signs_and_logs_in_to_sshd() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("alice", &KeyKind::ALL)?;
    hsm.token("bob", &[KeyKind::P256, KeyKind::Rsa2048])?;
    let agent = start_agent(&hsm, &[], "", "unused")?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 6, Duration::from_secs(5))?;
    for comment in [
        "alice: rsa-key",
        "alice: p256-key",
        "alice: p384-key",
        "alice: ed25519-key",
        "bob: p256-key",
        "bob: rsa-key",
    ] {
        assert!(
            listed.iter().any(|l| l.ends_with(comment)),
            "{comment} not in {listed:?}"
        );
    }
    assert!(listed.iter().any(|l| l.starts_with("ssh-ed25519 ")));
    for (index, line) in listed.iter().enumerate() {
        sign_and_verify(&agent, line, &format!("key{index}"))?;
    }

    // A login to sshd through the RSA and the Ed25519 key of alice.
    for wanted in ["alice: rsa-key", "alice: ed25519-key"] {
        let line = listed
            .iter()
            .find(|l| l.ends_with(wanted))
            .cloned()
            .unwrap_or_default();
        let sshd = Sshd::start(&format!("{line}\n"), None)?;
        let login = sshd.login(&agent)?;
        sshd.ensure_logged_in(&login, &agent.log_text())
            .map_err(|err| err.context(format!("logging in with {wanted}")))?;
    }

    // The PIN never reaches the log, not even at trace level.
    let log = agent.log_text();
    assert!(log.contains("loaded PKCS#11 provider"), "{log}");
    assert!(!log.contains(PIN), "the PIN is in the log:\n{log}");

    // ssh-add -e unloads it; ssh-add -D unloads runtime providers too.
    check(agent.ssh_add(["-e", MODULE])?, "ssh-add -e")?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    check(
        add_provider(&agent, Path::new(MODULE), PIN)?,
        "ssh-add -s again",
    )?;
    wait_listed(&agent, 6, Duration::from_secs(5))?;
    check(agent.ssh_add(["-D"])?, "ssh-add -D")?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn a_wrong_pin_from_ssh_add_is_refused_and_not_retried() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("carol", &[KeyKind::P256])?;
    let agent = start_agent(&hsm, &[], "", "unused")?;
    let output = add_provider(&agent, Path::new(MODULE), "not-the-pin")?;
    assert!(!output.status.success());
    let log = agent.log_text();
    assert!(log.contains("PIN incorrect for carol #"), "{log}");
    assert_eq!(log.matches("PKCS#11 login failed").count(), 1, "{log}");
    assert!(agent.listed()?.is_empty());
    // Nothing stayed loaded: the right PIN works next.
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(5))?;
    sign_and_verify(&agent, &listed[0], "carol")?;
    Ok(())
}

#[test]
fn a_locked_pin_is_reported_as_blocked() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("dave", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new()
        .prefix("pkcs11-modules")
        .tempdir()?;
    let locked = build_shim(modules.path(), Shim::Locked, &hsm)?;
    let allow = format!("/usr/lib*/*,{}/*", modules.path().display());
    let agent = start_agent(&hsm, &["-P", &allow], "", PIN)?;
    let output = add_provider(&agent, &locked, PIN)?;
    assert!(!output.status.success());
    let log = agent.log_text();
    assert!(log.contains("the PIN of dave #"), "{log}");
    assert!(
        log.contains("is blocked; unblock it with the token's SO PIN"),
        "{log}"
    );
    // Loaded without a PIN, its keys list, and signing says blocked without asking.
    check(
        add_provider(&agent, &locked, "")?,
        "ssh-add -s without a PIN",
    )?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(5))?;
    let output = crate::try_sign(&agent, &listed[0], "dave")?;
    assert!(!output.status.success());
    let log = agent.log_text();
    assert!(log.matches("is blocked").count() >= 2, "{log}");
    Ok(())
}

#[test]
fn keys_that_always_authenticate_ask_the_pin_for_each_signature() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("erin", &[])?;
    hsm.keygen_always_authenticate("erin", KeyKind::Rsa2048)?;
    hsm.keygen_always_authenticate("erin", KeyKind::P256)?;
    // The agent's askpass answers what `answer` holds and counts its questions.
    let answer = hsm.dir().join("answer");
    let asked = hsm.dir().join("asked");
    std::fs::write(&answer, format!("{PIN}\n"))?;
    let program = hsm.dir().join("counting-askpass");
    token_agent_e2e::write_script(
        &program,
        &format!(
            "echo asked >> '{}'\ncat '{}'",
            asked.display(),
            answer.display()
        ),
    )?;
    let questions = || {
        std::fs::read_to_string(&asked)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    };
    let agent = start_agent_asking(&hsm, &[], "", &program)?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    let rsa = listed
        .iter()
        .find(|l| l.ends_with("erin: rsa-key"))
        .cloned()
        .unwrap_or_default();

    // ssh-add's PIN logged the token in, yet each signature asks again:
    // the cached PIN is not used for a context-specific login.
    sign_and_verify(&agent, &rsa, "first")?;
    assert_eq!(questions(), 1);
    sign_and_verify(&agent, &rsa, "second")?;
    assert_eq!(questions(), 2);

    // A wrong PIN fails that signature, asked once and never retried.
    std::fs::write(&answer, "not-the-pin\n")?;
    let output = try_sign(&agent, &rsa, "wrong")?;
    assert!(!output.status.success());
    assert_eq!(questions(), 3);
    let log = agent.log_text();
    assert!(log.contains("PIN incorrect for erin #"), "{log}");

    // SoftHSM takes the context login only after C_SignInit and has no
    // CKM_ECDSA_SHA256 to sign in parts: the P-256 key fails, saying why,
    // without spending a PIN try.
    std::fs::write(&answer, format!("{PIN}\n"))?;
    let p256 = listed
        .iter()
        .find(|l| l.ends_with("erin: p256-key"))
        .cloned()
        .unwrap_or_default();
    let output = try_sign(&agent, &p256, "p256")?;
    assert!(!output.status.success());
    let log = agent.log_text();
    assert!(log.contains("CKA_ALWAYS_AUTHENTICATE"), "{log}");

    // The right PIN signs again.
    sign_and_verify(&agent, &rsa, "third")?;
    Ok(())
}

#[test]
fn a_reader_with_a_pin_pad_logs_in_there_and_says_so() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("frank", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new()
        .prefix("pkcs11-modules")
        .tempdir()?;
    let pad = modules.path().join("typed-on-the-pad");
    let shim = build_shim(modules.path(), Shim::PinPad(pad.clone()), &hsm)?;
    let notices = modules.path().join("notices");
    let config = format!(
        "[notice]\ndelay_ms = 0\ncommand = \"echo \\\"$TOKEN_AGENT_NOTICE_KIND: $TOKEN_AGENT_NOTICE\\\" >> '{}'\"\n\
         [[pkcs11.modules]]\npath = \"{}\"\n",
        notices.display(),
        shim.display()
    );
    // No PIN may be asked of the person through askpass: it answers wrongly.
    let agent = start_agent(&hsm, &[], &config, "not-the-pin")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(20))?;

    // The person types the PIN once the notice tells them to.
    let typist = {
        let (notices, pad) = (notices.clone(), pad.clone());
        std::thread::spawn(move || -> anyhow::Result<String> {
            let shown = token_agent_e2e::wait_for(Duration::from_secs(20), || {
                std::fs::read_to_string(&notices).is_ok_and(|text| text.contains("pinpad"))
            });
            anyhow::ensure!(shown, "no PIN pad notice appeared");
            std::fs::write(&pad, format!("{PIN}\n"))?;
            Ok(std::fs::read_to_string(&notices)?)
        })
    };
    sign_and_verify(&agent, &listed[0], "pad")?;
    let shown = typist
        .join()
        .map_err(|_| anyhow::anyhow!("typist panicked"))??;
    assert!(shown.contains("pinpad: "), "{shown}");
    assert!(shown.contains("PIN"), "{shown}");
    let log = agent.log_text();
    assert!(log.contains("enter the PIN on the reader's pad"), "{log}");
    assert!(log.contains("logged in to PKCS#11 token"), "{log}");
    // Logged in: the next signature needs no pad.
    std::fs::remove_file(&pad)?;
    sign_and_verify(&agent, &listed[0], "again")?;
    Ok(())
}

#[test]
fn a_pin_pad_login_on_a_one_session_token_has_the_pin_pad_limit() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("grace", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new()
        .prefix("pkcs11-modules")
        .tempdir()?;
    let pad = modules.path().join("typed-on-the-pad");
    let shim = build_shim(modules.path(), Shim::PinPadOneSession(pad.clone()), &hsm)?;
    // Calls have 2 s, the pad 60 s; tokens are looked for every 200 ms,
    // and each look lists the token, which needs its one session.
    let notices = modules.path().join("notices");
    let config = format!(
        "[notice]\ndelay_ms = 0\ncommand = \"echo \\\"$TOKEN_AGENT_NOTICE_KIND\\\" >> '{}'\"\n\
         [pkcs11]\ntimeout_seconds = 2\npin_pad_timeout_seconds = 60\npoll_interval_ms = 200\n\
         [[pkcs11.modules]]\npath = \"{}\"\n",
        notices.display(),
        shim.display()
    );
    let agent = start_agent(&hsm, &[], &config, "not-the-pin")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(20))?;

    // The person takes 5 s to type the PIN: past the call limit, well
    // within the pad's. Meanwhile a second signature waits behind the
    // login for the token's one session.
    let (signed, behind) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let signing = scope.spawn(|| sign_and_verify(&agent, &listed[0], "pad"));
        let asked = token_agent_e2e::wait_for(Duration::from_secs(20), || {
            std::fs::read_to_string(&notices).is_ok_and(|text| text.contains("pinpad"))
        });
        anyhow::ensure!(asked, "the pad was never asked for\n{}", agent.log_text());
        std::thread::sleep(Duration::from_secs(1));
        let behind = scope.spawn(|| sign_and_verify(&agent, &listed[0], "behind"));
        std::thread::sleep(Duration::from_secs(4));
        std::fs::write(&pad, format!("{PIN}\n"))?;
        let joined = |handle: std::thread::ScopedJoinHandle<'_, anyhow::Result<()>>| {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a signer panicked"))
        };
        Ok((joined(signing)?, joined(behind)?))
    })?;
    let log = agent.log_text();
    signed.map_err(|err| anyhow::anyhow!("{err}\n{log}"))?;
    behind.map_err(|err| anyhow::anyhow!("{err}\n{log}"))?;
    assert!(!log.contains("killed it"), "{log}");
    assert!(log.contains("logged in to PKCS#11 token"), "{log}");
    // Listing goes on after the login: the token stays, and signs again.
    std::fs::remove_file(&pad)?;
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(agent.listed()?.len(), 1);
    sign_and_verify(&agent, &listed[0], "again")?;
    assert!(!agent.log_text().contains("killed it"));
    Ok(())
}

#[test]
fn issue_12_token_keys_expire_with_ssh_add_t() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("erin", &[KeyKind::P256, KeyKind::Ed25519])?;
    let agent = start_agent(&hsm, &[], "", "unused")?;
    check(
        add_provider_with(&agent, &["-t", "3"], Path::new(MODULE), PIN)?,
        "ssh-add -t 3 -s",
    )?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    sign_and_verify(&agent, &listed[0], "before-expiry")?;
    // Gone from the list once the lifetime runs out, and refused for signing.
    wait_listed(&agent, 0, Duration::from_secs(10))?;
    assert!(!try_sign(&agent, &listed[0], "after-expiry")?
        .status
        .success());
    let log = agent.log_text();
    assert!(log.contains("key lifetime expired"), "{log}");
    // ssh-add -e and -s again: a fresh load without -t never expires.
    check(agent.ssh_add(["-e", MODULE])?, "ssh-add -e")?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent.listed()?.len(), 2);
    sign_and_verify(&agent, &listed[1], "reloaded")?;
    Ok(())
}

#[test]
fn issue_12_the_agents_default_lifetime_applies_to_token_keys() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("frank", &[KeyKind::P256])?;
    let agent = start_agent(&hsm, &["-t", "3"], "", "unused")?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(5))?;
    sign_and_verify(&agent, &listed[0], "frank")?;
    wait_listed(&agent, 0, Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn issue_12_token_keys_honour_ssh_add_c() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("grace", &[KeyKind::P256])?;
    // The agent's askpass answers PINs and confirmations: "no" refuses.
    let dir = tempfile::tempdir()?;
    let answer = dir.path().join("answer");
    std::fs::write(&answer, "yes\n")?;
    let program = dir.path().join("askpass");
    token_agent_e2e::write_script(
        &program,
        &format!(
            "if [ \"$SSH_ASKPASS_PROMPT\" = confirm ]; then cat '{}'; else echo '{PIN}'; fi",
            answer.display()
        ),
    )?;
    let agent = start_agent_asking(&hsm, &[], "", &program)?;
    check(
        add_provider_with(&agent, &["-c"], Path::new(MODULE), PIN)?,
        "ssh-add -c -s",
    )?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(5))?;
    sign_and_verify(&agent, &listed[0], "confirmed")?;
    std::fs::write(&answer, "no\n")?;
    assert!(!try_sign(&agent, &listed[0], "declined")?.status.success());
    assert!(
        agent.log_text().contains("declined"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn issue_12_ssh_add_d_removes_one_token_key() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("heidi", &[KeyKind::P256, KeyKind::Ed25519])?;
    let agent = start_agent(&hsm, &[], "", "unused")?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    let public = agent.dir().join("removed.pub");
    std::fs::write(&public, format!("{}\n", listed[0]))?;
    check(
        agent.ssh_add(["-d".as_ref(), public.as_os_str()])?,
        "ssh-add -d",
    )?;
    let left = wait_listed(&agent, 1, Duration::from_secs(5))?;
    assert_eq!(left[0], listed[1]);
    assert!(!try_sign(&agent, &listed[0], "removed")?.status.success());
    sign_and_verify(&agent, &listed[1], "kept")?;
    Ok(())
}

#[test]
fn issue_14_a_wrong_pin_is_a_reason_and_tokens_show_in_status() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("judy", &[KeyKind::P256])?;
    let agent = start_agent(&hsm, &[], "", "unused")?;
    assert!(!add_provider(&agent, Path::new(MODULE), "not-the-pin")?
        .status
        .success());
    let doc = agent.status()?;
    let refusal = &doc["refusals"][0];
    assert_eq!(refusal["reason"], "wrong-pin", "{doc:#}");
    assert_eq!(refusal["operation"], "add provider");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap_or("")
            .contains("PIN incorrect for judy #"),
        "{refusal}"
    );
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    let doc = agent.status()?;
    let pkcs11 = doc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["name"] == "pkcs11")
        .cloned()
        .unwrap_or_default();
    let token = &pkcs11["devices"][0];
    assert!(
        token["label"].as_str().unwrap_or("").starts_with("judy #"),
        "{pkcs11:#}"
    );
    let details = token["details"].to_string();
    assert!(details.contains("loaded with ssh-add -s"), "{details}");
    assert!(details.contains("\"1 key\""), "{details}");
    Ok(())
}

#[test]
fn issue_13_sigusr1_removes_provider_keys_and_the_provider_loads_again() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("ivan", &[KeyKind::P256])?;
    let agent = start_agent(&hsm, &[], "", "unused")?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let software = agent.dir().join("id_software");
    token_agent_e2e::agent::keygen(&software, "ed25519", "software")?;
    check(agent.ssh_add([&software])?, "ssh-add")?;
    wait_listed(&agent, 2, Duration::from_secs(5))?;
    let pid = i32::try_from(agent.pid().unwrap_or_default())?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )?;
    wait_listed(&agent, 0, Duration::from_secs(5))?;
    assert!(agent.log_text().contains("SIGUSR1"), "{}", agent.log_text());
    // The module was unloaded with its keys, so ssh-add -s loads it again.
    check(
        add_provider(&agent, Path::new(MODULE), PIN)?,
        "ssh-add -s after SIGUSR1",
    )?;
    let listed = wait_listed(&agent, 1, Duration::from_secs(5))?;
    sign_and_verify(&agent, &listed[0], "after-sigusr1")?;
    Ok(())
}

/// An agent with `module` configured whose askpass answers with `answers`
/// (see [`crate::counting_askpass`]): the agent, how many questions the
/// askpass was asked so far, and the blob of the token's one key.
fn counting_agent(
    hsm: &SoftHsm,
    module: &Path,
    answers: &[&str],
) -> anyhow::Result<(token_agent_e2e::agent::Agent, impl Fn() -> usize, Vec<u8>)> {
    let (program, questions) = crate::counting_askpass(hsm.dir(), answers)?;
    let config = format!("[[pkcs11.modules]]\npath = \"{}\"\n", module.display());
    let agent = crate::start_agent_asking(hsm, &[], &config, &program)?;
    let blob = crate::only_key_blob(&agent)?;
    Ok((agent, questions, blob))
}

/// What the agent answers `clients` clients that ask for a signature with
/// `blob` at the same moment: each reply's message number.
fn sign_together(
    agent: &token_agent_e2e::agent::Agent,
    blob: &[u8],
    clients: usize,
) -> anyhow::Result<Vec<u8>> {
    use std::sync::{Arc, Barrier};

    use anyhow::Context;
    use token_agent_e2e::bench::sign_request;
    use token_agent_e2e::wire::RawClient;

    let start = Arc::new(Barrier::new(clients));
    let clients: Vec<_> = (0..clients)
        .map(|client| {
            let (socket, blob, start) = (agent.socket().to_owned(), blob.to_vec(), start.clone());
            std::thread::spawn(move || -> anyhow::Result<u8> {
                let mut agent = RawClient::connect(&socket)?;
                let request = sign_request(&blob, format!("client {client}").as_bytes(), 0);
                start.wait();
                let reply = agent.request(&request)?.context("the agent closed")?;
                reply.first().copied().context("an empty reply")
            })
        })
        .collect();
    clients
        .into_iter()
        .map(|client| {
            client
                .join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))?
        })
        .collect()
}

#[test]
fn issue_18_signatures_that_arrive_together_ask_for_the_pin_once() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("together", &[KeyKind::P256])?;
    let (agent, questions, blob) = counting_agent(&hsm, Path::new(MODULE), &[PIN])?;
    // Eight clients send their first signature at the same moment, before
    // the token is logged in.
    let replies = sign_together(&agent, &blob, 8)?;
    assert_eq!(replies, [14; 8], "{}", agent.log_text());
    assert_eq!(questions(), 1, "{}", agent.log_text());
    Ok(())
}

#[test]
fn issue_18_a_wrong_pin_fails_the_signatures_that_waited_for_it() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("together", &[KeyKind::P256])?;
    let (agent, questions, blob) = counting_agent(&hsm, Path::new(MODULE), &["99999999", PIN])?;
    // One wrong PIN fails all eight: none of them asks again, which would
    // spend another of the card's tries each.
    let replies = sign_together(&agent, &blob, 8)?;
    assert_eq!(replies, [5; 8], "{}", agent.log_text());
    assert_eq!(questions(), 1);
    let log = agent.log_text();
    assert_eq!(log.matches("PKCS#11 login failed").count(), 1, "{log}");
    // A signature asked after that asks again, and the right PIN signs.
    let replies = sign_together(&agent, &blob, 1)?;
    assert_eq!(replies, [14], "{}", agent.log_text());
    assert_eq!(questions(), 2);
    Ok(())
}

#[test]
fn issue_18_a_login_by_another_lane_during_the_key_search_is_not_a_missing_key(
) -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("race", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new().prefix("race").tempdir()?;
    // The search for the private key finds nothing (the token is not logged
    // in yet), and the token is logged in before the helper asks why, as
    // when another lane's login lands just then: the signature logs in
    // (already done) and signs, instead of calling the key gone.
    let shim = build_shim(modules.path(), Shim::LoginRace(PIN.into()), &hsm)?;
    let (agent, _, blob) = counting_agent(&hsm, &shim, &[PIN])?;
    let replies = sign_together(&agent, &blob, 1)?;
    assert_eq!(replies, [14], "{}", agent.log_text());
    Ok(())
}

#[test]
fn a_nul_padded_token_label_lists_and_signs() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("nully", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new()
        .prefix("pkcs11-modules")
        .tempdir()?;
    // The module pads the token's label, model and serial with NULs, not spaces.
    let shim = build_shim(modules.path(), Shim::NulPadded, &hsm)?;
    let allow = format!("/usr/lib*/*,{}/*", modules.path().display());
    let agent = start_agent(&hsm, &["-P", &allow], "", "unused")?;
    let software = agent.dir().join("id_software");
    token_agent_e2e::agent::keygen(&software, "ed25519", "software")?;
    check(agent.ssh_add([&software])?, "ssh-add")?;
    check(add_provider(&agent, &shim, PIN)?, "ssh-add -s")?;
    // ssh-add -l reads every comment as text: one NUL in one comment used
    // to fail the listing of every key ("invalid format").
    let output = check(agent.ssh_add(["-l"])?, "ssh-add -l")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(text.contains(" nully: p256-key (ECDSA)"), "{text:?}");
    assert!(text.contains(" software (ED25519)"), "{text:?}");
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    let token_key = listed
        .iter()
        .find(|l| l.ends_with(" nully: p256-key"))
        .cloned()
        .unwrap_or_default();
    sign_and_verify(&agent, &token_key, "nully")?;
    Ok(())
}

#[test]
fn a_token_that_refuses_the_pin_of_ssh_add_s_is_skipped_as_openssh_does() -> anyhow::Result<()> {
    use token_agent_e2e::openssh::OpenSsh;

    let hsm = SoftHsm::new()?;
    hsm.token("alice", &[KeyKind::P256, KeyKind::Rsa2048])?;
    hsm.token_with_pin("carol", "carols-pin-4711", &[KeyKind::P384])?;
    let (program, questions) = crate::counting_askpass(hsm.dir(), &[PIN])?;
    let config = "[pkcs11]\npoll_interval_ms = 200\n";
    let agent = start_agent_asking(&hsm, &[], config, &program)?;

    // The keys of the tokens the PIN opens load; carol's do not.
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    assert!(listed.iter().all(|l| l.contains(" alice: ")), "{listed:?}");
    // OpenSSH 10.5's ssh-agent loads the same keys.
    let reference =
        token_agent_e2e::agent::Agent::start_openssh_with(&OpenSsh::v10()?, &[], &hsm.env())?;
    check(
        add_provider(&reference, Path::new(MODULE), PIN)?,
        "ssh-add -s to OpenSSH's agent",
    )?;
    let key = |line: &String| {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut theirs: Vec<String> = reference.listed()?.iter().map(key).collect();
    let mut ours: Vec<String> = listed.iter().map(key).collect();
    theirs.sort();
    ours.sort();
    assert_eq!(ours, theirs);

    // carol's PIN was tried once, the log and status say which token
    // refused it, and later polls do not bring its keys back.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.listed()?.len(), 2);
    let log = agent.log_text();
    assert_eq!(log.matches("PKCS#11 login failed").count(), 1, "{log}");
    assert!(
        log.contains("the PIN of ssh-add -s did not open this PKCS#11 token")
            && log.contains("PIN incorrect for carol #"),
        "{log}"
    );
    let status = agent.status()?.to_string();
    assert!(status.contains("refused the PIN of ssh-add -s"), "{status}");

    // alice is logged in: her keys sign without asking.
    for (index, line) in listed.iter().enumerate() {
        sign_and_verify(&agent, line, &format!("alice{index}"))?;
    }
    assert_eq!(questions(), 0);

    // When no token the PIN opens has a key, the add fails, naming the token.
    check(agent.ssh_add(["-e", MODULE])?, "ssh-add -e")?;
    hsm.delete_token("alice")?;
    let output = add_provider(&agent, Path::new(MODULE), PIN)?;
    assert!(!output.status.success());
    let doc = agent.status()?;
    let refusals = doc["refusals"].as_array().cloned().unwrap_or_default();
    let last = refusals.last().cloned().unwrap_or_default();
    assert_eq!(last["reason"], "wrong-pin", "{doc:#}");
    assert!(
        last["message"]
            .as_str()
            .unwrap_or("")
            .contains("PIN incorrect for carol #"),
        "{last}"
    );
    Ok(())
}

#[test]
fn a_refused_ssh_add_s_leaves_no_pin_cached() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    // alice takes the PIN ssh-add sends, carol (who holds the only key) does not.
    hsm.token("alice", &[])?;
    hsm.token_with_pin("carol", "carols-pin-4711", &[KeyKind::P256])?;
    let (program, questions) = crate::counting_askpass(hsm.dir(), &[PIN])?;
    let agent = start_agent_asking(&hsm, &[], "", &program)?;
    let output = add_provider(&agent, Path::new(MODULE), PIN)?;
    assert!(!output.status.success(), "{}", agent.log_text());
    assert!(agent.listed()?.is_empty());

    // alice gets a key, and the module is loaded again without a PIN.
    hsm.keygen("alice", KeyKind::Ed25519)?;
    check(
        add_provider(&agent, Path::new(MODULE), "")?,
        "ssh-add -s without a PIN",
    )?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    let alice = listed
        .iter()
        .find(|l| l.ends_with(" alice: ed25519-key"))
        .cloned()
        .unwrap_or_default();
    // The PIN of the refused load was forgotten with it: signing asks for it.
    sign_and_verify(&agent, &alice, "alice")?;
    assert_eq!(questions(), 1, "{}", agent.log_text());
    Ok(())
}

#[test]
fn an_ed25519_key_that_always_authenticates_fails_before_any_pin_is_asked() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("olga", &[])?;
    hsm.keygen_always_authenticate("olga", KeyKind::Ed25519)?;
    hsm.keygen_always_authenticate("olga", KeyKind::Rsa2048)?;
    let (program, questions) = crate::counting_askpass(hsm.dir(), &[PIN])?;
    let agent = start_agent_asking(&hsm, &[], "", &program)?;
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(5))?;
    let find = |suffix: &str| {
        listed
            .iter()
            .find(|l| l.ends_with(suffix))
            .cloned()
            .unwrap_or_default()
    };

    // SoftHSM takes the context login only after C_SignInit, and CKM_EDDSA
    // signs in one part only: token-agent cannot sign with this key, and
    // says so before it asks for a PIN (which would spend a try for nothing).
    let output = try_sign(&agent, &find(" olga: ed25519-key"), "ed25519")?;
    assert!(!output.status.success());
    assert_eq!(questions(), 0, "{}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("CKA_ALWAYS_AUTHENTICATE") && log.contains("no PIN was asked"),
        "{log}"
    );
    assert!(!log.contains("C_SignUpdate"), "{log}");

    // The RSA key beside it, which signs in parts, asks and signs.
    sign_and_verify(&agent, &find(" olga: rsa-key"), "rsa")?;
    assert_eq!(questions(), 1);
    // Asked again, the Ed25519 key still fails without a question.
    assert!(!try_sign(&agent, &find(" olga: ed25519-key"), "again")?
        .status
        .success());
    assert_eq!(questions(), 1);
    Ok(())
}

#[test]
fn keys_whose_public_objects_are_private_list_at_ssh_add_s_and_stay_after_a_logout(
) -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("pia", &[KeyKind::Rsa2048])?;
    // The P-256 key's public key object is CKA_PRIVATE: the token shows it
    // only to a session logged in.
    hsm.keygen_with_pin("pia", PIN, KeyKind::P256, &["--private"])?;
    let (program, questions) = crate::counting_askpass(hsm.dir(), &[PIN])?;
    let config = "[pkcs11]\npoll_interval_ms = 300\n";
    let agent = start_agent_asking(&hsm, &[], config, &program)?;

    // ssh-add -s logs in first, so its reply (and the list right after it)
    // has the key, as with OpenSSH's agent.
    check(add_provider(&agent, Path::new(MODULE), PIN)?, "ssh-add -s")?;
    let listed = agent.listed()?;
    assert_eq!(listed.len(), 2, "{listed:?}\n{}", agent.log_text());
    let private = listed
        .iter()
        .find(|l| l.ends_with(" pia: p256-key"))
        .cloned()
        .unwrap_or_default();

    // SIGHUP forgets the PIN and logs out; the polls after it still list
    // the key, and signing with it asks for the PIN and logs in again.
    let pid = i32::try_from(agent.pid().unwrap_or_default())?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    token_agent_e2e::wait_for(Duration::from_secs(5), || {
        agent
            .log_text()
            .contains("forgot cached PKCS#11 PINs and logging out")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(agent.listed()?, listed, "{}", agent.log_text());
    sign_and_verify(&agent, &private, "private")?;
    assert_eq!(questions(), 1, "{}", agent.log_text());
    Ok(())
}
