//! agent-bench: drives agent sockets and compares token-agent with OpenSSH's
//! ssh-agent holding the same keys, side by side, in one run.
//!
//! Scenarios, each for a fixed time per agent:
//! - list and sign (Ed25519, ECDSA P-256, RSA-2048 with rsa-sha2-256) round
//!   trips per second with 1 and 8 concurrent clients, with p50 and p99 latency;
//! - list latency while another client's signature is held by a confirmation
//!   that takes `--hold-seconds` to answer;
//! - memory of the agent process (RSS, and PSS, which splits shared library
//!   pages among the processes that map them), idle with the keys loaded and after the run.
//!
//! `--socket PATH` drives one already running agent instead (list and sign with
//! whatever keys it holds).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::wire::{RawClient, IDENTITIES_ANSWER};
use token_agent_e2e::{check, write_script};

/// Compare agents: throughput, latency, and memory.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds each scenario runs per agent.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Concurrent client counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    clients: Vec<usize>,
    /// How long the confirmation of the held signature takes to answer.
    #[arg(long, default_value_t = 3)]
    hold_seconds: u64,
    /// Drive this running agent only, instead of starting both.
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// SSH_AGENT_SIGN_RESPONSE.
const SIGN_RESPONSE: u8 = 14;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(socket) = &args.socket {
        return drive_one(&args, socket);
    }
    let dir = tempfile::tempdir()?;
    let keys = make_keys(dir.path())?;
    let askpass = dir.path().join("slow-askpass");
    write_script(&askpass, &format!("sleep {}\nexit 0", args.hold_seconds))?;
    let env = vec![
        ("SSH_ASKPASS".to_owned(), askpass.display().to_string()),
        ("SSH_ASKPASS_REQUIRE".to_owned(), "force".to_owned()),
        ("DISPLAY".to_owned(), ":0".to_owned()),
        ("TOKEN_AGENT_LOG".to_owned(), "warn".to_owned()),
    ];
    let token = Agent::start(AgentOptions {
        env: env.clone(),
        ..AgentOptions::default()
    })?;
    let openssh = Agent::start_openssh(&env)?;
    let agents = [("token-agent", &token), ("OpenSSH ssh-agent", &openssh)];
    for (_, agent) in &agents {
        load(agent, &keys)?;
    }

    println!("# agent-bench: {} s per scenario", args.seconds);
    println!();
    println!("## Memory (VmRSS)");
    println!();
    println!("| agent | RSS, idle with keys loaded | PSS (shared libraries split) |");
    println!("| --- | --- | --- |");
    for (name, agent) in &agents {
        let pid = agent.pid();
        println!(
            "| {name} | {} | {} |",
            memory(pid, "status", "VmRSS:")?,
            memory(pid, "smaps_rollup", "Pss:")?
        );
    }

    println!();
    println!("## Round trips");
    println!();
    println!("| scenario | clients | agent | req/s | p50 µs | p99 µs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let scenarios = scenarios(&keys)?;
    for (label, request) in &scenarios {
        for &clients in &args.clients {
            for (name, agent) in &agents {
                let result = run(agent.socket(), request, clients, args.seconds)?;
                println!(
                    "| {label} | {clients} | {name} | {:.0} | {} | {} |",
                    result.per_second, result.p50_us, result.p99_us
                );
            }
        }
    }

    println!();
    println!(
        "## Listing while another client's signature waits {} s for a confirmation",
        args.hold_seconds
    );
    println!();
    println!("| agent | lists answered | p50 µs | p99 µs | held signature |");
    println!("| --- | --- | --- | --- | --- |");
    let held = sign_request(&keys.confirm_blob, 0);
    for (name, agent) in &agents {
        let result = held_run(agent.socket(), &held)?;
        println!(
            "| {name} | {} | {} | {} | {} |",
            result.count, result.p50_us, result.p99_us, result.held
        );
    }

    println!();
    println!("## Memory after the run (VmRSS)");
    println!();
    for (name, agent) in &agents {
        let pid = agent.pid();
        println!(
            "- {name}: RSS {}, PSS {}",
            memory(pid, "status", "VmRSS:")?,
            memory(pid, "smaps_rollup", "Pss:")?
        );
    }
    Ok(())
}

struct Keys {
    files: Vec<PathBuf>,
    confirm_file: PathBuf,
    blobs: Vec<(&'static str, Vec<u8>, u32)>,
    confirm_blob: Vec<u8>,
}

fn make_keys(dir: &Path) -> anyhow::Result<Keys> {
    let mut files = Vec::new();
    let mut blobs = Vec::new();
    for (label, kind, flags) in [
        ("sign Ed25519", "ed25519", 0u32),
        ("sign ECDSA P-256", "ecdsa-256", 0),
        ("sign RSA-2048 (rsa-sha2-256)", "rsa-2048", 2),
    ] {
        let path = dir.join(format!("id_{kind}"));
        keygen(&path, kind, kind)?;
        blobs.push((label, public_blob(&path)?, flags));
        files.push(path);
    }
    let confirm_file = dir.join("id_confirm");
    keygen(&confirm_file, "ed25519", "held")?;
    let confirm_blob = public_blob(&confirm_file)?;
    Ok(Keys {
        files,
        confirm_file,
        blobs,
        confirm_blob,
    })
}

fn public_blob(private: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(private.with_extension("pub"))?;
    let key = ssh_key::PublicKey::from_openssh(&text)?;
    Ok(key.to_bytes()?)
}

fn load(agent: &Agent, keys: &Keys) -> anyhow::Result<()> {
    for file in &keys.files {
        check(agent.ssh_add([file])?, "ssh-add")?;
    }
    check(
        agent.ssh_add(["-c".as_ref(), keys.confirm_file.as_os_str()])?,
        "ssh-add -c",
    )?;
    Ok(())
}

fn scenarios(keys: &Keys) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = vec![("list".to_owned(), vec![11u8])];
    for (label, blob, flags) in &keys.blobs {
        out.push(((*label).to_owned(), sign_request(blob, *flags)));
    }
    Ok(out)
}

fn sign_request(blob: &[u8], flags: u32) -> Vec<u8> {
    // 32-byte session id plus a user authentication request's worth of data.
    let data = vec![0x5a; 180];
    let mut out = vec![13u8];
    out.extend_from_slice(&u32::try_from(blob.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(blob);
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

struct Throughput {
    per_second: f64,
    p50_us: u128,
    p99_us: u128,
}

/// `clients` connections each send `request` back to back for `seconds`.
fn run(socket: &Path, request: &[u8], clients: usize, seconds: u64) -> anyhow::Result<Throughput> {
    let barrier = Arc::new(Barrier::new(clients));
    let request = Arc::new(request.to_vec());
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (barrier, request, socket) = (barrier.clone(), request.clone(), socket.to_owned());
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut client = RawClient::connect(&socket)?;
                let mut latencies = Vec::new();
                barrier.wait();
                let end = Instant::now() + Duration::from_secs(seconds);
                while Instant::now() < end {
                    let start = Instant::now();
                    let reply = client.request(&request)?.context("agent closed")?;
                    latencies.push(start.elapsed());
                    expect_ok(&reply)?;
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        let latencies = handle
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        all.extend(latencies);
    }
    all.sort();
    let count = all.len();
    Ok(Throughput {
        per_second: count as f64 / seconds as f64,
        p50_us: percentile(&all, 50).as_micros(),
        p99_us: percentile(&all, 99).as_micros(),
    })
}

struct Held {
    count: usize,
    p50_us: u128,
    p99_us: u128,
    held: String,
}

/// One client's signature waits for a slow confirmation while another lists.
fn held_run(socket: &Path, held_request: &[u8]) -> anyhow::Result<Held> {
    let socket_owned = socket.to_owned();
    let request = held_request.to_vec();
    let holder = std::thread::spawn(move || -> anyhow::Result<(Duration, bool)> {
        let mut client = RawClient::connect(&socket_owned)?;
        let start = Instant::now();
        let reply = client.request(&request)?.context("agent closed")?;
        Ok((start.elapsed(), reply.first() == Some(&SIGN_RESPONSE)))
    });
    // Let the signature reach the confirmation first.
    std::thread::sleep(Duration::from_millis(300));
    let mut lister = RawClient::connect(socket)?;
    let mut latencies = Vec::new();
    while !holder.is_finished() {
        let start = Instant::now();
        let reply = lister.request(&[11])?.context("agent closed")?;
        latencies.push(start.elapsed());
        expect_ok(&reply)?;
    }
    let (held_for, signed) = holder
        .join()
        .map_err(|_| anyhow::anyhow!("holder panicked"))??;
    latencies.sort();
    Ok(Held {
        count: latencies.len(),
        p50_us: percentile(&latencies, 50).as_micros(),
        p99_us: percentile(&latencies, 99).as_micros(),
        held: format!(
            "{} after {:.1} s",
            if signed { "signed" } else { "refused" },
            held_for.as_secs_f64()
        ),
    })
}

fn expect_ok(reply: &[u8]) -> anyhow::Result<()> {
    match reply.first() {
        Some(&IDENTITIES_ANSWER) | Some(&SIGN_RESPONSE) => Ok(()),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = (sorted.len() * pct / 100).min(sorted.len() - 1);
    sorted[index]
}

/// A memory figure (`field`, e.g. "VmRSS:") from `/proc/PID/FILE`.
fn memory(pid: Option<u32>, file: &str, field: &str) -> anyhow::Result<String> {
    let pid = pid.context("agent not running")?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    Ok(text
        .lines()
        .find(|line| line.starts_with(field))
        .map(|line| line.trim_start_matches(field).trim().to_owned())
        .unwrap_or_else(|| "unknown".into()))
}

/// Lists and signs with every key of an agent that is already running.
fn drive_one(args: &Args, socket: &Path) -> anyhow::Result<()> {
    let mut client = RawClient::connect(socket)?;
    let reply = client.request(&[11])?.context("agent closed")?;
    let blobs = parse_identities(&reply)?;
    println!("| scenario | clients | req/s | p50 µs | p99 µs |");
    println!("| --- | --- | --- | --- | --- |");
    let mut requests = vec![("list".to_owned(), vec![11u8])];
    for (index, blob) in blobs.iter().enumerate() {
        requests.push((format!("sign with key {index}"), sign_request(blob, 2)));
    }
    for (label, request) in &requests {
        for &clients in &args.clients {
            let result = run(socket, request, clients, args.seconds)?;
            println!(
                "| {label} | {clients} | {:.0} | {} | {} |",
                result.per_second, result.p50_us, result.p99_us
            );
        }
    }
    Ok(())
}

fn parse_identities(reply: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut rest = reply
        .strip_prefix(&[IDENTITIES_ANSWER])
        .context("not an identities answer")?;
    let mut take = |len: usize| -> anyhow::Result<Vec<u8>> {
        if rest.len() < len {
            bail!("truncated identities answer");
        }
        let (head, tail) = rest.split_at(len);
        rest = tail;
        Ok(head.to_vec())
    };
    let count = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default());
    let mut blobs = Vec::new();
    for _ in 0..count {
        let len = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default()) as usize;
        blobs.push(take(len)?);
        let comment_len = u32::from_be_bytes(take(4)?.try_into().unwrap_or_default()) as usize;
        take(comment_len)?;
    }
    Ok(blobs)
}
