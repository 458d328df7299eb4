//! pkcs11-bench: signatures with SoftHSM keys through token-agent, through
//! OpenSSH's ssh-agent (`ssh-add -s`, ssh-pkcs11-helper), and directly
//! through cryptoki (C_Sign in a loop, one session per thread: the ceiling),
//! side by side in one run.
//!
//! Scenarios, each for `--seconds`:
//! - P-256 and RSA-2048 signatures per second and p50/p99 latency with 1 and
//!   8 clients, next to the direct ceiling with 1 and 2 threads;
//! - list p99 alone, and while another client signs continuously;
//! - list p50/p99 while one signature is held by a module that hangs in C_Sign.

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use sha2::Digest;
use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::bench::{self, expect_ok, held_run, run, summarize, Throughput};
use token_agent_e2e::softhsm::{build_shim, KeyKind, Shim, SoftHsm, MODULE, PIN};
use token_agent_e2e::wire::RawClient;
use token_agent_e2e::{check, write_script};

/// Compare PKCS#11 signing through token-agent, OpenSSH's agent and cryptoki.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// The keys to sign with.
    #[arg(long, value_delimiter = ',', default_values = ["p256", "rsa"])]
    keys: Vec<BenchKey>,
    /// The numbers of concurrent clients to sign with.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    clients: Vec<usize>,
    /// Measure signatures only, not listing (for profiling one scenario).
    #[arg(long)]
    signatures_only: bool,
}

/// A key of the bench token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchKey {
    /// ECDSA P-256.
    P256,
    /// RSA 2048.
    Rsa,
}

/// The data of each signature: a session id and a user-auth request's worth.
const DATA: [u8; 180] = [0x5a; 180];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let hsm = SoftHsm::new()?;
    hsm.token("bench", &[KeyKind::P256, KeyKind::Rsa2048])?;
    let hang_hsm = SoftHsm::new()?;
    hang_hsm.token("hang", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new().prefix("pkcs11-bench").tempdir()?;
    let hang = build_shim(modules.path(), Shim::Hang, &hang_hsm)?;
    let askpass = modules.path().join("askpass");
    write_script(&askpass, &format!("echo '{PIN}'"))?;

    let mut env = hsm.env();
    env.push(("SSH_ASKPASS".into(), askpass.display().to_string()));
    env.push(("SSH_ASKPASS_REQUIRE".into(), "force".into()));
    env.push(("TOKEN_AGENT_LOG".into(), "warn".into()));
    let allow = format!("/usr/lib*/*,{}/*", modules.path().display());
    let token = Agent::start(AgentOptions {
        args: vec!["-P".into(), allow],
        env: env.clone(),
        config: Some("[prompt]\npin_prompt = \"askpass\"\n[pkcs11]\ntimeout_seconds = 4\n".into()),
    })?;
    let openssh = Agent::start_openssh(&env)?;
    for agent in [&token, &openssh] {
        add_provider(agent, Path::new(MODULE), &askpass)?;
    }
    add_provider(&token, &hang, &askpass)?;

    println!(
        "# pkcs11-bench: SoftHSM2 keys, {} s per scenario",
        args.seconds
    );
    println!();
    println!("## Signatures");
    println!();
    println!("| key | path | clients | sign/s | p50 µs | p99 µs | ratio to ceiling |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (kind, prefix, flags) in [
        (KeyKind::P256, "ecdsa-sha2-nistp256", 0u32),
        (KeyKind::Rsa2048, "ssh-rsa", 2u32),
    ] {
        let wanted = match kind {
            KeyKind::P256 => BenchKey::P256,
            _ => BenchKey::Rsa,
        };
        if !args.keys.contains(&wanted) {
            continue;
        }
        let ceiling_1 = ceiling(&hsm, kind, 1, args.seconds)?;
        let ceiling_2 = ceiling(&hsm, kind, 2, args.seconds)?;
        let name = kind.id_and_label().1;
        println!(
            "| {name} | cryptoki C_Sign (ceiling) | 1 thread | {:.0} | {} | {} | 1.00 |",
            ceiling_1.per_second, ceiling_1.p50_us, ceiling_1.p99_us
        );
        println!(
            "| {name} | cryptoki C_Sign (ceiling) | 2 threads | {:.0} | {} | {} | 1.00 |",
            ceiling_2.per_second, ceiling_2.p50_us, ceiling_2.p99_us
        );
        for (agent_name, agent) in [("token-agent", &token), ("OpenSSH ssh-agent", &openssh)] {
            let blob = key_blob(agent, prefix, "bench")?;
            let request = sign_request(&blob, flags);
            for &clients in &args.clients {
                let result = run(agent.socket(), &request, clients, args.seconds)?;
                let base = if clients == 1 { &ceiling_1 } else { &ceiling_2 };
                println!(
                    "| {name} | {agent_name} | {clients} | {:.0} | {} | {} | {:.2} |",
                    result.per_second,
                    result.p50_us,
                    result.p99_us,
                    result.per_second / base.per_second
                );
            }
        }
    }

    if args.signatures_only {
        return Ok(());
    }
    println!();
    println!("## Listing");
    println!();
    println!(
        "| agent | list p99 alone µs | list p99 while another client signs P-256 µs | ratio |"
    );
    println!("| --- | --- | --- | --- |");
    for (agent_name, agent) in [("token-agent", &token), ("OpenSSH ssh-agent", &openssh)] {
        let alone = run(agent.socket(), &[11], 1, args.seconds)?;
        let blob = key_blob(agent, "ecdsa-sha2-nistp256", "bench")?;
        let busy = list_while_signing(agent.socket(), &sign_request(&blob, 0), args.seconds)?;
        println!(
            "| {agent_name} | {} | {} | {:.2} |",
            alone.p99_us,
            busy.p99_us,
            busy.p99_us as f64 / alone.p99_us.max(1) as f64
        );
    }

    println!();
    println!("## Listing while a signature is held by a module hanging in C_Sign (token-agent)");
    println!();
    let blob = key_blob(&token, "ecdsa-sha2-nistp256", "hang")?;
    let held = held_run(token.socket(), &sign_request(&blob, 0))?;
    println!("| lists | p50 µs | p99 µs | held signature |");
    println!("| --- | --- | --- | --- |");
    let outcome = if held.signed {
        "signed"
    } else {
        "failed (module killed)"
    };
    println!(
        "| {} | {} | {} | {outcome} after {:.1} s |",
        held.count,
        held.p50_us,
        held.p99_us,
        held.held_for.as_secs_f64()
    );
    Ok(())
}

fn add_provider(agent: &Agent, module: &Path, askpass: &Path) -> anyhow::Result<()> {
    check(
        agent
            .command("ssh-add")
            .arg("-s")
            .arg(module)
            .env("SSH_ASKPASS", askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .output()?,
        "ssh-add -s",
    )?;
    Ok(())
}

/// The blob of the listed key whose algorithm starts with `prefix` and whose comment names `token`.
fn key_blob(agent: &Agent, prefix: &str, token: &str) -> anyhow::Result<Vec<u8>> {
    let mut client = RawClient::connect(agent.socket())?;
    let reply = client.request(&[11])?.context("agent closed")?;
    let mut found = None;
    for (blob, comment) in bench::parse_identities(&reply)? {
        let algorithm = blob
            .get(4..4 + prefix.len())
            .map(|a| a == prefix.as_bytes())
            .unwrap_or(false);
        // OpenSSH's agent lists a provider's keys by their CKA_LABEL; this
        // bench loads only the "bench" token into it.
        let named = comment.contains(token) || !comment.contains(": ");
        if algorithm && named && found.is_none() {
            found = Some(blob);
        }
    }
    found.with_context(|| format!("no {prefix} key of {token} is listed"))
}

fn sign_request(blob: &[u8], flags: u32) -> Vec<u8> {
    bench::sign_request(blob, &DATA, flags)
}

/// List latency while another client signs back to back.
fn list_while_signing(socket: &Path, sign: &[u8], seconds: u64) -> anyhow::Result<Throughput> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signer = {
        let (stop, socket, sign) = (stop.clone(), socket.to_owned(), sign.to_vec());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut client = RawClient::connect(&socket)?;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                expect_ok(&client.request(&sign)?.context("agent closed")?)?;
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let result = run(socket, &[11], 1, seconds);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    signer
        .join()
        .map_err(|_| anyhow::anyhow!("signer panicked"))??;
    result
}

/// C_Sign in a loop through cryptoki, one session per thread: the ceiling.
fn ceiling(
    hsm: &SoftHsm,
    kind: KeyKind,
    threads: usize,
    seconds: u64,
) -> anyhow::Result<Throughput> {
    // The ceiling runs in this process: SoftHSM reads SOFTHSM2_CONF at C_Initialize.
    std::env::set_var("SOFTHSM2_CONF", hsm.conf());
    let context = Pkcs11::new(MODULE)?;
    context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = context
        .get_slots_with_initialized_token()?
        .into_iter()
        .find(|s| {
            context
                .get_token_info(*s)
                .map(|i| i.label().trim() == "bench")
                .unwrap_or(false)
        })
        .context("no bench token")?;
    let login = context.open_ro_session(slot)?;
    login.login(UserType::User, Some(&PIN.to_owned().into()))?;
    let (id, _) = kind.id_and_label();
    let id = vec![u8::from_str_radix(id, 16)?];
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (context, barrier, id) = (context.clone(), barrier.clone(), id.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let session = context.open_ro_session(slot)?;
                let key = *session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Id(id),
                    ])?
                    .first()
                    .context("no private key")?;
                let mut latencies = Vec::new();
                barrier.wait();
                let end = Instant::now() + Duration::from_secs(seconds);
                while Instant::now() < end {
                    let start = Instant::now();
                    match kind {
                        KeyKind::Rsa2048 => {
                            let mut input = vec![
                                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
                                0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20,
                            ];
                            input.extend_from_slice(&sha2::Sha256::digest(DATA));
                            session.sign(&Mechanism::RsaPkcs, key, &input)?;
                        }
                        _ => {
                            session.sign(&Mechanism::Ecdsa, key, &sha2::Sha256::digest(DATA))?;
                        }
                    }
                    latencies.push(start.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        all.extend(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("signing thread panicked"))??,
        );
    }
    drop(login);
    context.finalize()?;
    Ok(summarize(all, seconds))
}
