//! The PIV backend's benchmark (not a timed test): against one piv-sim card
//! behind a private pcscd, it prints
//!
//! - sign latency through token-agent (agent protocol over its socket) and
//!   through the `yubikey` crate calling the card directly, side by side;
//! - `list` latency (p50/p99) while the card waits for a touch (goal: p99
//!   under 5 ms);
//! - the time from a card's insertion to its keys being listed (goal: under 1 s).
//!
//! `cargo run --release -p token-agent-e2e --bin piv-bench -- --signs 100`

#![forbid(unsafe_code)]

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use piv_sim::{CardConfig, TouchMode};
use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::bench;
use token_agent_e2e::pcsc::PcscRig;
use token_agent_e2e::wire::{RawClient, IDENTITIES_ANSWER};
use yubikey::piv::{AlgorithmId, SlotId};
use yubikey::{MgmKey, PinPolicy, Serial, TouchPolicy, YubiKey};

const SERIAL: u32 = 31_000_001;
const SIGN_RESPONSE: u8 = 14;

/// Options.
#[derive(Debug, Parser)]
struct Args {
    /// Signatures per side.
    #[arg(long, default_value_t = 50)]
    signs: usize,
    /// List requests while the card waits for a touch.
    #[arg(long, default_value_t = 500)]
    lists: usize,
    /// Insertions to time.
    #[arg(long, default_value_t = 5)]
    insertions: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rig = PcscRig::start_with_configs(&[CardConfig {
        serial: SERIAL,
        ..CardConfig::default()
    }])?;
    // This process talks PC/SC to this rig only; libpcsclite reads the
    // variable at its first call, which comes after this line.
    std::env::set_var("PCSCLITE_CSOCK_NAME", rig.socket());
    provision()?;

    let direct = sign_directly(args.signs)?;

    // The variable, not the configuration's log_level: the harness sets
    // TOKEN_AGENT_LOG=debug for tests, and it wins over the file.
    let agent = Agent::start(AgentOptions {
        env: vec![
            (
                "PCSCLITE_CSOCK_NAME".into(),
                rig.socket().display().to_string(),
            ),
            ("TOKEN_AGENT_LOG".into(), "warn".into()),
        ],
        ..AgentOptions::default()
    })?;
    let keys = wait_for_keys(agent.socket(), 2, Duration::from_secs(10))?;
    let (fast, touch) = (keys[1].clone(), keys[0].clone());
    let through_agent = sign_through_agent(agent.socket(), &fast, args.signs)?;

    println!(
        "sign, ECDSA P-256, slot 9e (no PIN, no touch), {} each:",
        args.signs
    );
    println!("  yubikey crate directly   {}", summary(&direct));
    println!("  through token-agent      {}", summary(&through_agent));

    let lists = list_while_touch_waits(&rig, agent.socket(), &touch, args.lists)?;
    println!(
        "list while the card waits for a touch, {} requests: {}",
        args.lists,
        summary(&lists)
    );

    let mut inserted = Vec::new();
    for _ in 0..args.insertions {
        rig.remove_card(0)?;
        wait_for_keys(agent.socket(), 0, Duration::from_secs(5))?;
        let start = Instant::now();
        rig.card(0).insert();
        wait_for_keys(agent.socket(), 2, Duration::from_secs(10))?;
        inserted.push(start.elapsed());
    }
    println!(
        "insertion to keys listed, {} insertions: {}",
        args.insertions,
        summary(&inserted)
    );
    Ok(())
}

/// Slot 9a: touch always (for the list-while-waiting run); 9e: neither PIN nor touch.
fn provision() -> anyhow::Result<()> {
    let mut yubikey = YubiKey::open_by_serial(Serial(SERIAL))?;
    yubikey.authenticate(MgmKey::default())?;
    for (slot, touch) in [
        (SlotId::Authentication, TouchPolicy::Always),
        (SlotId::CardAuthentication, TouchPolicy::Never),
    ] {
        yubikey::piv::generate(
            &mut yubikey,
            slot,
            AlgorithmId::EccP256,
            PinPolicy::Never,
            touch,
        )?;
    }
    if let Err((_, e)) = yubikey.disconnect(pcsc::Disposition::LeaveCard) {
        bail!("{e}");
    }
    Ok(())
}

fn sign_directly(count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut yubikey = YubiKey::open_by_serial(Serial(SERIAL))?;
    let digest = [7u8; 32];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        yubikey::piv::sign_data(
            &mut yubikey,
            &digest,
            AlgorithmId::EccP256,
            SlotId::CardAuthentication,
        )?;
        times.push(start.elapsed());
    }
    if let Err((_, e)) = yubikey.disconnect(pcsc::Disposition::LeaveCard) {
        bail!("{e}");
    }
    Ok(times)
}

fn sign_through_agent(socket: &Path, blob: &[u8], count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = RawClient::connect(socket)?;
    let request = bench::sign_request(blob, b"piv-bench data", 0);
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let reply = client.request(&request)?.context("the agent hung up")?;
        times.push(start.elapsed());
        ensure!(
            reply.first() == Some(&SIGN_RESPONSE),
            "sign failed: {reply:?}"
        );
    }
    Ok(times)
}

fn list_while_touch_waits(
    rig: &PcscRig,
    socket: &Path,
    blob: &[u8],
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let touch = rig.card(0).touch();
    touch.set_mode(TouchMode::Manual);
    let socket_owned = socket.to_path_buf();
    let request = bench::sign_request(blob, b"piv-bench data", 0);
    let signer = thread::spawn(move || -> anyhow::Result<Vec<u8>> {
        let mut client = RawClient::connect(&socket_owned)?;
        client.request(&request)?.context("the agent hung up")
    });
    ensure!(
        touch.wait_until_waiting(Duration::from_secs(10)),
        "the card never waited for a touch"
    );
    let mut client = RawClient::connect(socket)?;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let reply = client.request(&[11])?.context("the agent hung up")?;
        times.push(start.elapsed());
        ensure!(reply.first() == Some(&IDENTITIES_ANSWER));
    }
    ensure!(
        touch.is_waiting(),
        "the touch wait ended before the lists did"
    );
    touch.touch();
    let reply = signer
        .join()
        .map_err(|_| anyhow::anyhow!("the signer panicked"))??;
    ensure!(
        reply.first() == Some(&SIGN_RESPONSE),
        "sign failed: {reply:?}"
    );
    touch.set_mode(TouchMode::AutoAfter(Duration::ZERO));
    Ok(times)
}

/// Waits until the agent lists exactly `count` keys; returns their blobs.
fn wait_for_keys(socket: &Path, count: usize, limit: Duration) -> anyhow::Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + limit;
    let mut client = RawClient::connect(socket)?;
    loop {
        let reply = client.request(&[11])?.context("the agent hung up")?;
        let keys: Vec<Vec<u8>> = bench::parse_identities(&reply)?
            .into_iter()
            .map(|(blob, _)| blob)
            .collect();
        if keys.len() == count {
            return Ok(keys);
        }
        ensure!(
            Instant::now() < deadline,
            "the agent listed {} keys, not {count}",
            keys.len()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// "p50 1.2 ms, p99 3.4 ms, max 5.6 ms".
fn summary(times: &[Duration]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort();
    let pct = |p: usize| {
        sorted
            .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(pct(50)),
        ms(pct(99)),
        ms(sorted.last().copied().unwrap_or_default())
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
