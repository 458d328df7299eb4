use std::path::Path;
use std::time::Duration;

use token_agent_core::push_string as string;
use token_agent_e2e::check;
use token_agent_e2e::softhsm::{build_shim, KeyKind, Shim, SoftHsm, MODULE, PIN};
use token_agent_e2e::wire::{
    session_bind, unverifiable_session_bind, RawClient, EXTENSION_FAILURE, FAILURE, SUCCESS,
};

use crate::{
    add_provider, add_provider_with, start_agent, start_agent_asking, try_sign, wait_listed,
};

/// SSH_AGENTC_ADD_SMARTCARD_KEY.
const ADD_SMARTCARD_KEY: u8 = 20;

fn add_smartcard(provider: &str, pin: &str) -> Vec<u8> {
    let mut body = vec![ADD_SMARTCARD_KEY];
    string(&mut body, provider.as_bytes());
    string(&mut body, pin.as_bytes());
    body
}

#[test]
fn a_module_outside_the_allowlist_is_refused() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("erin", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new()
        .prefix("pkcs11-modules")
        .tempdir()?;
    let shim = build_shim(modules.path(), Shim::Crash, &hsm)?;
    // OpenSSH's default list: /usr/lib*/*,/usr/local/lib*/*.
    let agent = start_agent(&hsm, &[], "", PIN)?;
    let output = add_provider(&agent, &shim, PIN)?;
    assert!(!output.status.success());
    let log = agent.log_text();
    assert!(log.contains("is not in the allowlist"), "{log}");
    // A symbolic link inside an allowed directory is judged by its target.
    let link = modules.path().join("link.so");
    std::os::unix::fs::symlink(&shim, &link)?;
    let agent = start_agent(&hsm, &["-P", "/usr/lib*/*,/nowhere/*"], "", PIN)?;
    assert!(!add_provider(&agent, &link, PIN)?.status.success());
    assert!(agent.listed()?.is_empty());
    // Named by -P, it loads.
    let allow = format!("{}/*", modules.path().display());
    let agent = start_agent(&hsm, &["-P", &allow], "", PIN)?;
    assert!(add_provider(&agent, &shim, PIN)?.status.success());
    assert_eq!(agent.listed()?.len(), 1);
    Ok(())
}

#[test]
fn a_provider_request_over_a_forwarded_connection_is_refused() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("frank", &[KeyKind::P256])?;
    let agent = start_agent(&hsm, &[], "", PIN)?;
    let mut client = RawClient::connect(agent.socket())?;
    let reply = client.request(&session_bind(agent.dir(), true)?)?;
    assert_eq!(reply.as_deref(), Some(&[SUCCESS][..]));
    let reply = client.request(&add_smartcard(MODULE, PIN))?;
    assert_eq!(reply.as_deref(), Some(&[FAILURE][..]));
    let log = agent.log_text();
    assert!(
        log.contains("requested over a forwarded connection"),
        "{log}"
    );
    assert!(agent.listed()?.is_empty());
    // So is one whose session bind did not verify: it came through ssh all
    // the same (OpenSSH's socket_is_remote).
    let mut unverified = RawClient::connect(agent.socket())?;
    let reply = unverified.request(&unverifiable_session_bind(agent.dir(), false)?)?;
    assert_eq!(reply.as_deref(), Some(&[EXTENSION_FAILURE][..]));
    let reply = unverified.request(&add_smartcard(MODULE, PIN))?;
    assert_eq!(reply.as_deref(), Some(&[FAILURE][..]));
    assert!(agent.listed()?.is_empty());
    // A local connection may load it.
    let mut local = RawClient::connect(agent.socket())?;
    let reply = local.request(&add_smartcard(MODULE, PIN))?;
    assert_eq!(reply.as_deref(), Some(&[SUCCESS][..]));
    assert_eq!(agent.listed()?.len(), 1);

    // -O allow-remote-pkcs11 allows it, as in OpenSSH.
    let agent = start_agent(&hsm, &["-O", "allow-remote-pkcs11"], "", PIN)?;
    let mut client = RawClient::connect(agent.socket())?;
    let reply = client.request(&session_bind(agent.dir(), true)?)?;
    assert_eq!(reply.as_deref(), Some(&[SUCCESS][..]));
    let reply = client.request(&add_smartcard(MODULE, PIN))?;
    assert_eq!(reply.as_deref(), Some(&[SUCCESS][..]));
    assert_eq!(agent.listed()?.len(), 1);
    Ok(())
}

/// `ssh-add -c -s` confirms every key of the module, as OpenSSH: also the
/// keys of a token that appears after the load.
#[test]
fn ssh_add_constraints_cover_tokens_inserted_later() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("first", &[KeyKind::P256])?;
    let dir = tempfile::tempdir()?;
    let program = dir.path().join("askpass");
    token_agent_e2e::write_script(
        &program,
        &format!("if [ \"$SSH_ASKPASS_PROMPT\" = confirm ]; then echo no; else echo '{PIN}'; fi"),
    )?;
    let agent = start_agent_asking(&hsm, &[], "", &program)?;
    check(
        add_provider_with(&agent, &["-c"], Path::new(MODULE), PIN)?,
        "ssh-add -c -s",
    )?;
    wait_listed(&agent, 1, Duration::from_secs(5))?;
    hsm.token("later", &[KeyKind::P256])?;
    let listed = wait_listed(&agent, 2, Duration::from_secs(20))?;
    for line in &listed {
        assert!(
            !try_sign(&agent, line, "declined")?.status.success(),
            "{line} signed without its confirmation\n{}",
            agent.log_text()
        );
    }
    assert!(agent.log_text().matches("declined").count() >= 2);
    Ok(())
}
