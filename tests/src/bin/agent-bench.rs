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

use anyhow::Context;
use clap::Parser;
use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::bench::{self, held_run, run};
use token_agent_e2e::wire::RawClient;
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
        let outcome = if result.signed { "signed" } else { "refused" };
        println!(
            "| {name} | {} | {} | {} | {outcome} after {:.1} s |",
            result.count,
            result.p50_us,
            result.p99_us,
            result.held_for.as_secs_f64()
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

/// A user authentication request's worth of data: 32-byte session id and fields.
const DATA: [u8; 180] = [0x5a; 180];

fn sign_request(blob: &[u8], flags: u32) -> Vec<u8> {
    bench::sign_request(blob, &DATA, flags)
}

fn scenarios(keys: &Keys) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = vec![("list".to_owned(), vec![11u8])];
    for (label, blob, flags) in &keys.blobs {
        out.push(((*label).to_owned(), sign_request(blob, *flags)));
    }
    Ok(out)
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
    let blobs: Vec<Vec<u8>> = bench::parse_identities(&reply)?
        .into_iter()
        .map(|(blob, _)| blob)
        .collect();
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
