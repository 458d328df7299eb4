//! upstream-bench: what an upstream agent behind token-agent (`-A SOCKET`)
//! costs, and what one that hangs costs, measured side by side with OpenSSH's
//! ssh-agent in one run.
//!
//! Agents: OpenSSH's ssh-agent holding one key (the upstream), token-agent
//! alone with a key of its own, and token-agent with that ssh-agent behind it,
//! first answering, then SIGSTOPped (a hung agent: its socket still accepts,
//! nothing answers), then continued again.
//!
//! For each: list latency over one persistent connection and with a fresh
//! connection per list (every `ssh` opens one), and signatures with the own
//! key and the upstream's key. With the upstream stopped, the first list after
//! the stop (which waits out the list time limit once) is reported on its own.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::bench::{self, parse_identities, run, summarize, Throughput};
use token_agent_e2e::check;
use token_agent_e2e::wire::RawClient;

/// Measure the cost of upstream agents behind token-agent.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

/// A user authentication request's worth of data.
const DATA: [u8; 180] = [0x5a; 180];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let own_file = dir.path().join("id_own");
    keygen(&own_file, "ed25519", "own")?;
    let theirs_file = dir.path().join("id_theirs");
    keygen(&theirs_file, "ed25519", "theirs")?;
    let own = sign_request(&own_file)?;
    let theirs = sign_request(&theirs_file)?;

    let quiet = vec![("TOKEN_AGENT_LOG".to_owned(), "warn".to_owned())];
    let upstream = Agent::start_openssh(&[])?;
    check(upstream.ssh_add([&theirs_file])?, "ssh-add to ssh-agent")?;
    let alone = Agent::start(AgentOptions {
        env: quiet.clone(),
        ..AgentOptions::default()
    })?;
    check(alone.ssh_add([&own_file])?, "ssh-add to token-agent")?;
    let fronted = Agent::start(AgentOptions {
        args: vec!["-A".to_owned(), upstream.socket().display().to_string()],
        env: quiet,
        ..AgentOptions::default()
    })?;
    check(fronted.ssh_add([&own_file])?, "ssh-add to token-agent")?;
    ensure!(
        listed(fronted.socket())? == 2,
        "token-agent does not list both keys"
    );
    let upstream_pid = Pid::from_raw(
        i32::try_from(upstream.pid().context("ssh-agent has no pid")?).context("ssh-agent pid")?,
    );

    println!("# upstream-bench: {} s per scenario", args.seconds);
    println!();
    println!("| agent | scenario | keys listed | req/s | p50 µs | p99 µs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let seconds = args.seconds;
    let rows = |name: &str, socket: &Path, signs: &[(&str, &[u8])]| -> anyhow::Result<()> {
        let keys = listed(socket)?;
        row(name, "list", keys, run(socket, &[11], 1, seconds)?);
        row(
            name,
            "list, new connection each",
            keys,
            fresh_lists(socket, seconds)?,
        );
        for (label, request) in signs {
            row(name, label, keys, run(socket, request, 1, seconds)?);
        }
        Ok(())
    };
    rows(
        "OpenSSH ssh-agent (the upstream)",
        upstream.socket(),
        &[("sign Ed25519", &theirs)],
    )?;
    rows(
        "token-agent, no upstream",
        alone.socket(),
        &[("sign Ed25519", &own)],
    )?;
    rows(
        "token-agent + upstream",
        fronted.socket(),
        &[
            ("sign Ed25519, own key", &own),
            ("sign Ed25519, upstream's key", &theirs),
        ],
    )?;

    kill(upstream_pid, Signal::SIGSTOP).context("SIGSTOP ssh-agent")?;
    let stopped = (|| -> anyhow::Result<()> {
        let start = Instant::now();
        let keys = listed(fronted.socket())?;
        println!(
            "| token-agent + stopped upstream | first list after the stop | {keys} | | {} | |",
            start.elapsed().as_micros()
        );
        rows(
            "token-agent + stopped upstream",
            fronted.socket(),
            &[("sign Ed25519, own key", &own)],
        )
    })();
    kill(upstream_pid, Signal::SIGCONT).context("SIGCONT ssh-agent")?;
    stopped?;

    // Once continued, the upstream answers its pending probe and is listed again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed(fronted.socket())? != 2 {
        ensure!(
            Instant::now() < deadline,
            "the continued upstream was not listed again within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rows(
        "token-agent + continued upstream",
        fronted.socket(),
        &[("sign Ed25519, upstream's key", &theirs)],
    )?;
    Ok(())
}

fn row(agent: &str, scenario: &str, keys: usize, result: Throughput) {
    println!(
        "| {agent} | {scenario} | {keys} | {:.0} | {} | {} |",
        result.per_second, result.p50_us, result.p99_us
    );
}

/// How many keys one list over a fresh connection returns.
fn listed(socket: &Path) -> anyhow::Result<usize> {
    let mut client = RawClient::connect(socket)?;
    let reply = client.request(&[11])?.context("agent closed")?;
    Ok(parse_identities(&reply)?.len())
}

/// Lists for `seconds`, each over a connection of its own (connect included).
fn fresh_lists(socket: &Path, seconds: u64) -> anyhow::Result<Throughput> {
    let mut latencies = Vec::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let start = Instant::now();
        let mut client = RawClient::connect(socket)?;
        let reply = client.request(&[11])?.context("agent closed")?;
        latencies.push(start.elapsed());
        bench::expect_ok(&reply)?;
    }
    Ok(summarize(latencies, seconds))
}

fn sign_request(private: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(private.with_extension("pub"))?;
    let blob = ssh_key::PublicKey::from_openssh(&text)?.to_bytes()?;
    Ok(bench::sign_request(&blob, &DATA, 0))
}
