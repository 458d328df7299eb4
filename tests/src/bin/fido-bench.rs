//! fido-bench: the FIDO backend's costs, side by side in one run.
//!
//! - Sign latency of an sk-ssh-ed25519 key through the agent (the
//!   `token-agent-fido-sim` build, with fido-sim attached and touching at
//!   once) against calling fido-sim's getAssertion directly (both simulators
//!   keep their state in a file, as the agent's does).
//! - List latency (p50, p99) while another client's signature waits for a
//!   touch that comes only after the measurement. The goal is a p99 under 5 ms.
//!
//! Run: `cargo run --release -p token-agent-e2e --bin fido-bench` (it builds
//! `token-agent-fido-sim` with the same profile first).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use ssh_encoding::Encode;
use token_agent_e2e::wait_for;
use token_agent_e2e::wire::{RawClient, IDENTITIES_ANSWER, SUCCESS};
use token_agent_fido::ctap::{CoseAlgorithm, GetAssertion};
use token_agent_fido::{Authenticator, Enrolment};

/// Sign and list latency of the FIDO backend.
#[derive(Debug, Parser)]
struct Args {
    /// Signatures per side.
    #[arg(long, default_value_t = 300)]
    signs: usize,
    /// List requests while a signature waits for a touch.
    #[arg(long, default_value_t = 1000)]
    lists: usize,
}

const SIGN_REQUEST: u8 = 13;
const SIGN_RESPONSE: u8 = 14;
const ADD_IDENTITY: u8 = 17;
const REQUEST_IDENTITIES: u8 = 11;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("fido-bench").tempdir()?;
    let state = dir.path().join("fido-sim.json");
    let enrolment = Enrolment {
        algorithm: CoseAlgorithm::EdDsa,
        application: "ssh:".into(),
        resident: false,
        verify_required: false,
        no_touch_required: false,
        user: "openssh".into(),
        pin: None,
    };

    // Directly: the same simulator code in this process, with a state file
    // too, so that the difference is the agent's own cost.
    let direct = fido_sim::Simulator::open("direct", &dir.path().join("direct.json"))?;
    let direct_key = token_agent_fido::enroll(&direct, &enrolment)?;
    let mut direct_times = Vec::with_capacity(args.signs);
    for i in 0..args.signs {
        let request = GetAssertion {
            rp_id: "ssh:".into(),
            message: format!("direct {i}").into_bytes(),
            credential_id: direct_key.key_handle().to_vec(),
            user_presence: true,
            pin: None,
        };
        let start = Instant::now();
        direct.get_assertion(&request)?;
        direct_times.push(start.elapsed());
    }

    // Through the agent: a key on the simulator whose state the agent opens.
    let key = {
        let sim = fido_sim::Simulator::open("token", &state)?;
        token_agent_fido::enroll(&sim, &enrolment)?
    };
    let agent = BenchAgent::start(dir.path(), &state)?;
    let mut client = RawClient::connect(&agent.socket)?;
    let mut add = vec![ADD_IDENTITY];
    key.to_keypair()?.encode(&mut add)?;
    b"bench".as_slice().encode(&mut add)?;
    if client.request(&add)?.as_deref() != Some(&[SUCCESS]) {
        bail!("the agent refused the sk key");
    }
    let mut blob = Vec::new();
    key.public_key().encode(&mut blob)?;
    let sign_body = |i: usize| -> anyhow::Result<Vec<u8>> {
        let mut body = vec![SIGN_REQUEST];
        blob.as_slice().encode(&mut body)?;
        format!("through the agent {i}")
            .as_bytes()
            .encode(&mut body)?;
        0u32.encode(&mut body)?;
        Ok(body)
    };
    let mut agent_times = Vec::with_capacity(args.signs);
    for i in 0..args.signs {
        let body = sign_body(i)?;
        let start = Instant::now();
        let reply = client.request(&body)?;
        agent_times.push(start.elapsed());
        if reply.as_ref().and_then(|r| r.first()) != Some(&SIGN_RESPONSE) {
            bail!("a signature through the agent failed");
        }
    }

    // Listing while a signature waits for a touch.
    agent.control("presence wait")?;
    let socket = agent.socket.clone();
    let held = sign_body(usize::MAX)?;
    let waiter = std::thread::spawn(move || -> anyhow::Result<bool> {
        let mut client = RawClient::connect(&socket)?;
        let reply = client.request(&held)?;
        Ok(reply.as_ref().and_then(|r| r.first()) == Some(&SIGN_RESPONSE))
    });
    if !wait_for(Duration::from_secs(10), || {
        agent.control("waiting").is_ok_and(|a| a == "yes")
    }) {
        bail!("the held signature never waited for a touch");
    }
    let mut list_times = Vec::with_capacity(args.lists);
    let mut lister = RawClient::connect(&agent.socket)?;
    for _ in 0..args.lists {
        let start = Instant::now();
        let reply = lister.request(&[REQUEST_IDENTITIES])?;
        list_times.push(start.elapsed());
        if reply.as_ref().and_then(|r| r.first()) != Some(&IDENTITIES_ANSWER) {
            bail!("listing failed");
        }
    }
    let still_waiting = agent.control("waiting")? == "yes";
    agent.control("touch")?;
    let touched = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("the held signer panicked"))??;

    println!("fido-bench ({} build)", profile());
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "", "p50 (ms)", "p99 (ms)", "mean (ms)"
    );
    row("sign, fido-sim called directly", &mut direct_times);
    row("sign, through token-agent (socket + sim)", &mut agent_times);
    row("list while a signature waits for a touch", &mut list_times);
    println!(
        "the held signature was still waiting after the lists: {still_waiting}; \
         it completed after the touch: {touched}"
    );
    Ok(())
}

fn row(name: &str, times: &mut [Duration]) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| {
        let index = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(index).copied().unwrap_or_default()
    };
    let mean = times.iter().sum::<Duration>() / u32::try_from(times.len().max(1)).unwrap_or(1);
    println!(
        "{name:<44} {:>10.3} {:>10.3} {:>10.3}",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(mean)
    );
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// The fido-sim build of the agent, in the foreground.
struct BenchAgent {
    socket: PathBuf,
    control: PathBuf,
    child: Child,
}

impl BenchAgent {
    fn start(dir: &Path, state: &Path) -> anyhow::Result<Self> {
        let binary = token_agent_e2e::fido_sim_agent_binary()?;
        let socket = dir.join("agent.sock");
        let control = dir.join("control.sock");
        let config = dir.join("config.toml");
        std::fs::write(&config, "")?;
        let child = Command::new(binary)
            .arg("-d")
            .arg("-a")
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .env("TOKEN_AGENT_FIDO_SIM", state)
            .env("TOKEN_AGENT_FIDO_SIM_CONTROL", &control)
            .env("TOKEN_AGENT_LOG", "warn")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start token-agent-fido-sim")?;
        let agent = Self {
            socket,
            control,
            child,
        };
        if !wait_for(Duration::from_secs(20), || {
            UnixStream::connect(&agent.socket).is_ok()
        }) {
            bail!("the agent did not start");
        }
        Ok(agent)
    }

    fn control(&self, command: &str) -> anyhow::Result<String> {
        let mut stream = UnixStream::connect(&self.control)?;
        writeln!(stream, "{command}")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
