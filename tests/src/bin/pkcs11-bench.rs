//! pkcs11-bench: signatures with SoftHSM keys through token-agent, through
//! OpenSSH's ssh-agent (`ssh-add -s`, ssh-pkcs11-helper), and directly
//! through cryptoki (C_Sign in a loop, one session per thread: the ceiling),
//! side by side in one run.
//!
//! Scenarios, each for `--seconds`:
//! - resident memory (RSS and PSS) of each agent with its helpers, with one
//!   module loaded, idle, after signing and after more bursts of signing;
//! - P-256 and RSA-2048 signatures per second and p50/p99 latency with 1 and
//!   8 clients, next to the direct ceiling with 1 and 2 threads, and next to
//!   the floor (see [`floor`]): what a minimal relay through a helper process
//!   reaches on this machine, which tells the cost of the process boundary
//!   itself from the cost of token-agent's own work. The floor, token-agent
//!   and OpenSSH's agent sign in turns of a quarter of `--seconds` each (see
//!   [`interleaved`]), and each agent's signatures per second are shown
//!   against the floor's of the same run, with the CPU time each agent's
//!   processes (agent and helpers; the floor's relay and helpers) spent per
//!   signature in its turns, which a machine whose wake-up latency varies
//!   moves far less than the rates;
//! - list p99 alone, and while another client signs continuously, in turns
//!   of a quarter of `--seconds` each (alone, signing, alone, ...), so that
//!   the machine's drift in speed touches both alike;
//! - list p50/p99 while one signature is held by a module that hangs in C_Sign.
//!
//! `--rounds N` repeats the signature scenarios and shows, for each row, the
//! round with the median ratio to its ceiling and the range of the ratios,
//! and the median and range of the ratio to the floor; and it repeats the
//! listing scenario, showing the round with the median ratio of list p99
//! while signing to list p99 alone, and the range of that ratio.
//!
//! token-agent runs at log level `warn` unless `--agent-log` says otherwise:
//! `--agent-log info` measures the audit line every signature writes at the
//! agent's own default level.

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
use token_agent_core::RsaHash;
use token_agent_e2e::agent::{Agent, AgentOptions};
use token_agent_e2e::bench::{
    self, expect_ok, held_run, interleaved, join_latencies, run, summarize, Contender, Throughput,
};
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
    /// How many times to measure the signatures, for a machine whose speed
    /// varies: each row then shows the round with the median ratio.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Measure signatures only, not listing (for profiling one scenario).
    #[arg(long)]
    signatures_only: bool,
    /// token-agent's log filter (TOKEN_AGENT_LOG). `info`, the level the
    /// agent logs at unless told otherwise, adds the audit line each
    /// signature writes.
    #[arg(long, default_value = "warn")]
    agent_log: String,
    /// Internal: serve as the floor's relay on this socket.
    #[arg(long, hide = true)]
    floor_relay: Option<std::path::PathBuf>,
    /// Internal: serve as a floor helper on stdin.
    #[arg(long, hide = true)]
    floor_helper: bool,
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

/// How many turns each agent gets in a signature scenario: the floor,
/// token-agent and OpenSSH's agent sign in turn (see [`interleaved`]), so
/// that this machine's drift in speed slows them alike.
const SLICES: u32 = 4;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(socket) = &args.floor_relay {
        return floor::relay(socket);
    }
    if args.floor_helper {
        return floor::helper();
    }
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
    env.push(("TOKEN_AGENT_LOG".into(), args.agent_log.clone()));
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
    let floor = floor::Relay::start(&modules.path().join("floor.sock"), &hsm.env())?;

    println!(
        "# pkcs11-bench: SoftHSM2 keys, {} s per scenario, {} round(s)",
        args.seconds, args.rounds
    );
    println!();
    if !args.signatures_only {
        memory(&env, &askpass, args.seconds)?;
    }
    println!("## Signatures");
    println!();
    if args.rounds > 1 {
        println!(
            "Each row is the round with the median ratio; the range is over all rounds. \
             Each round measures its own ceiling just before."
        );
        println!();
    }
    let mut rows = Rows::default();
    for _ in 0..args.rounds {
        rows.start_round();
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
            let name = kind.id_and_label().1;
            let ceiling_1 = ceiling(&hsm, kind, 1, args.seconds)?;
            let ceiling_2 = ceiling(&hsm, kind, 2, args.seconds)?;
            rows.add(
                name,
                "cryptoki C_Sign (ceiling)",
                "1 thread",
                ceiling_1,
                1.0,
                None,
            );
            rows.add(
                name,
                "cryptoki C_Sign (ceiling)",
                "2 threads",
                ceiling_2,
                1.0,
                None,
            );
            let blob = key_blob(&token, prefix, "bench")?;
            let contenders = [
                (
                    FLOOR,
                    floor.socket.as_path(),
                    blob.clone(),
                    Some(floor.pid()),
                ),
                ("token-agent", token.socket(), blob, token.pid()),
                (
                    "OpenSSH ssh-agent",
                    openssh.socket(),
                    key_blob(&openssh, prefix, "bench")?,
                    openssh.pid(),
                ),
            ];
            let interleave: Vec<Contender> = contenders
                .iter()
                .map(|(_, socket, blob, pid)| Contender {
                    socket: socket.to_path_buf(),
                    request: sign_request(blob, flags),
                    pid: *pid,
                })
                .collect();
            for &clients in &args.clients {
                let slice = Duration::from_secs(args.seconds) / SLICES;
                let results = interleaved(&interleave, clients, slice, SLICES as usize)?;
                let base = if clients == 1 { &ceiling_1 } else { &ceiling_2 };
                let floor_rate = results[0].per_second;
                for ((path, _, _, _), result) in contenders.iter().zip(results) {
                    let against_floor = (*path != FLOOR).then(|| result.per_second / floor_rate);
                    let ratio = result.per_second / base.per_second;
                    rows.add(
                        name,
                        path,
                        &clients.to_string(),
                        result,
                        ratio,
                        against_floor,
                    );
                }
            }
        }
    }
    rows.print();
    drop(floor);

    if args.signatures_only {
        return Ok(());
    }
    println!();
    println!("## Listing");
    println!();
    if args.rounds > 1 {
        println!("Each row is the round with the median ratio; the range is over all rounds.");
        println!();
    }
    println!(
        "| agent | list p99 alone µs | list p99 while another client signs P-256 µs | ratio | ratio range |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (agent_name, agent) in [("token-agent", &token), ("OpenSSH ssh-agent", &openssh)] {
        let blob = key_blob(agent, "ecdsa-sha2-nistp256", "bench")?;
        let mut rounds = list_while_signing(
            agent.socket(),
            &sign_request(&blob, 0),
            args.seconds,
            args.rounds,
        )?;
        let ratio = |(alone, busy): &(Throughput, Throughput)| {
            busy.p99_us as f64 / alone.p99_us.max(1) as f64
        };
        rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
        let median = rounds[rounds.len() / 2];
        println!(
            "| {agent_name} | {} | {} | {:.2} | {:.2}–{:.2} |",
            median.0.p99_us,
            median.1.p99_us,
            ratio(&median),
            ratio(&rounds[0]),
            ratio(&rounds[rounds.len() - 1])
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

/// Resident memory of each agent with its helpers, with the bench token's
/// module loaded and nothing else: idle (sampled across several token
/// polls), then after `seconds` of P-256 and RSA signatures from 8 clients,
/// and after two more such bursts with pauses between them.
/// Fresh agents, so the other scenarios' modules do not count. Both run as
/// a person runs them: started in the background (`eval "$(token-agent)"`,
/// `eval "$(ssh-agent)"`), token-agent logging to its file at its default
/// level (each signature's audit line among it), not at `--agent-log`.
fn memory(env: &[(String, String)], askpass: &Path, seconds: u64) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = env
        .iter()
        .filter(|(key, _)| key != "TOKEN_AGENT_LOG")
        .cloned()
        .collect();
    let token = Agent::start_background(AgentOptions {
        env: env.clone(),
        config: Some("[prompt]\npin_prompt = \"askpass\"\n".into()),
        ..AgentOptions::default()
    })?;
    let openssh = Agent::start_openssh_background(&env)?;
    let agents = [("token-agent", &token), ("OpenSSH ssh-agent", &openssh)];
    for (_, agent) in agents {
        add_provider(agent, Path::new(MODULE), askpass)?;
    }
    println!(
        "## Memory with one PKCS#11 module loaded (agent and its helpers, started in the background)"
    );
    println!();
    println!(
        "Sampled every 100 ms for 5 s: the median sample and the largest \
         (a token scan's short-lived process, for token-agent)."
    );
    println!();
    println!(
        "| agent | when | processes | RSS KiB (median) | PSS KiB (median) | RSS KiB (largest) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let show = |name: &str, when: &str, agent: &Agent| -> anyhow::Result<()> {
        let pid = agent.pid().context("agent not running")?;
        let (median, largest) = bench::sample_tree_memory(pid, 5)?;
        println!(
            "| {name} | {when} | {} | {} | {} | {} |",
            median.processes, median.rss_kib, median.pss_kib, largest.rss_kib
        );
        Ok(())
    };
    for (name, agent) in agents {
        show(name, "idle", agent)?;
    }
    // 8 clients sign with P-256, then with RSA, for `seconds` each.
    let burst = |agent: &Agent| -> anyhow::Result<()> {
        for prefix in ["ecdsa-sha2-nistp256", "ssh-rsa"] {
            let flags = if prefix == "ssh-rsa" { 2 } else { 0 };
            let request = sign_request(&key_blob(agent, prefix, "bench")?, flags);
            run(agent.socket(), &request, 8, seconds)?;
        }
        Ok(())
    };
    for (name, agent) in agents {
        burst(agent)?;
        show(name, "after signing", agent)?;
    }
    // Two more bursts, each after a pause in which token-agent's extra
    // lanes retire (10 s without a request), and the same pause after the
    // last: what the agents keep in the long run of bursty use.
    let pause = Duration::from_secs(11);
    for _ in 0..2 {
        std::thread::sleep(pause);
        for (_, agent) in agents {
            burst(agent)?;
        }
    }
    std::thread::sleep(pause);
    for (name, agent) in agents {
        show(name, "3 bursts later, 11 s after the last", agent)?;
    }
    println!();
    Ok(())
}

/// The floor's row name.
const FLOOR: &str = "floor: minimal relay + helper process";

/// The rows of the signature table, one measurement per round each.
#[derive(Default)]
struct Rows {
    rows: Vec<Row>,
    /// The next row of the current round.
    next: usize,
}

struct Row {
    key: &'static str,
    path: &'static str,
    clients: String,
    /// Each round's result and its ratio to the ceiling.
    rounds: Vec<(Throughput, f64)>,
    /// Each round's signatures per second against the floor's in the same
    /// interleaved run.
    against_floor: Vec<f64>,
}

impl Rows {
    fn start_round(&mut self) {
        self.next = 0;
    }

    fn add(
        &mut self,
        key: &'static str,
        path: &'static str,
        clients: &str,
        result: Throughput,
        ratio: f64,
        against_floor: Option<f64>,
    ) {
        if self.next == self.rows.len() {
            self.rows.push(Row {
                key,
                path,
                clients: clients.to_owned(),
                rounds: Vec::new(),
                against_floor: Vec::new(),
            });
        }
        let row = &mut self.rows[self.next];
        row.rounds.push((result, ratio));
        row.against_floor.extend(against_floor);
        self.next += 1;
    }

    fn print(&self) {
        println!(
            "| key | path | clients | sign/s | p50 µs | p99 µs | ratio to ceiling | ratio range \
             | against the floor | range | CPU µs per signature |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for row in &self.rows {
            let mut rounds = row.rounds.clone();
            rounds.sort_by(|a, b| a.1.total_cmp(&b.1));
            let (median, ratio) = rounds[rounds.len() / 2];
            let (low, high) = (rounds[0].1, rounds[rounds.len() - 1].1);
            let mut floor = row.against_floor.clone();
            floor.sort_by(f64::total_cmp);
            let (against, range) = match (floor.first(), floor.last()) {
                (Some(low), Some(high)) => (
                    format!("{:.2}x", floor[floor.len() / 2]),
                    format!("{low:.2}–{high:.2}"),
                ),
                _ => (String::new(), String::new()),
            };
            let cpu = median
                .cpu_per_request
                .map(|cpu| format!("{:.0}", cpu.as_secs_f64() * 1e6))
                .unwrap_or_default();
            println!(
                "| {} | {} | {} | {:.0} | {} | {} | {ratio:.2} | {low:.2}–{high:.2} | {against} | {range} | {cpu} |",
                row.key, row.path, row.clients, median.per_second, median.p50_us, median.p99_us
            );
        }
    }
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

/// What the signer of [`list_while_signing`] is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signer {
    Sign,
    Pause,
    Stop,
}

/// What the signer of [`list_while_signing`] is told, and whether it is
/// between signatures; `changed` wakes whoever waits for either.
#[derive(Default)]
struct Control {
    state: std::sync::Mutex<SignerState>,
    changed: std::sync::Condvar,
}

struct SignerState {
    order: Signer,
    between_signatures: bool,
}

impl Default for SignerState {
    fn default() -> Self {
        Self {
            order: Signer::Pause,
            between_signatures: false,
        }
    }
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, SignerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(
        &self,
        state: std::sync::MutexGuard<'a, SignerState>,
    ) -> std::sync::MutexGuard<'a, SignerState> {
        self.changed
            .wait(state)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// List latency alone and while another client signs back to back, one pair
/// per round. Each round takes turns of a `SLICES`th of `seconds` (alone,
/// signing, alone, signing, ...): a machine whose speed drifts over seconds
/// slows both halves of a round alike. The signer finishes the signature it
/// is in before a turn alone begins.
fn list_while_signing(
    socket: &Path,
    sign: &[u8],
    seconds: u64,
    rounds: u32,
) -> anyhow::Result<Vec<(Throughput, Throughput)>> {
    let control = Arc::new(Control::default());
    let signer = {
        let (control, socket, sign) = (control.clone(), socket.to_owned(), sign.to_vec());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let result = (|| -> anyhow::Result<()> {
                let mut client = RawClient::connect(&socket)?;
                expect_ok(&client.request(&sign)?.context("agent closed")?)?;
                loop {
                    {
                        let mut state = control.lock();
                        state.between_signatures = true;
                        control.changed.notify_all();
                        while state.order == Signer::Pause {
                            state = control.wait(state);
                        }
                        if state.order == Signer::Stop {
                            return Ok(());
                        }
                        state.between_signatures = false;
                    }
                    expect_ok(&client.request(&sign)?.context("agent closed")?)?;
                }
            })();
            // Whatever happened, the lister is not left waiting for it.
            *control.lock() = SignerState {
                order: Signer::Stop,
                between_signatures: true,
            };
            control.changed.notify_all();
            result
        })
    };
    let tell = |order: Signer| {
        let mut state = control.lock();
        if state.order != Signer::Stop {
            state.order = order;
        }
        control.changed.notify_all();
        // Turns alone start once the signature in flight has ended.
        while order == Signer::Pause && state.order == Signer::Pause && !state.between_signatures {
            state = control.wait(state);
        }
    };
    let listed = (|| -> anyhow::Result<Vec<(Throughput, Throughput)>> {
        let mut client = RawClient::connect(socket)?;
        expect_ok(&client.request(&[11])?.context("agent closed")?)?;
        let slice = Duration::from_secs(seconds) / SLICES;
        let mut results = Vec::new();
        for _ in 0..rounds {
            let (mut alone, mut busy) = (Vec::new(), Vec::new());
            for _ in 0..SLICES {
                for (order, latencies) in [(Signer::Pause, &mut alone), (Signer::Sign, &mut busy)] {
                    tell(order);
                    let end = Instant::now() + slice;
                    while Instant::now() < end {
                        let start = Instant::now();
                        let reply = client.request(&[11])?.context("agent closed")?;
                        latencies.push(start.elapsed());
                        expect_ok(&reply)?;
                    }
                }
            }
            let measured = slice * SLICES;
            results.push((
                bench::summarize_over(alone, measured),
                bench::summarize_over(busy, measured),
            ));
        }
        Ok(results)
    })();
    tell(Signer::Stop);
    let signed = signer
        .join()
        .map_err(|_| anyhow::anyhow!("signer panicked"))?;
    let results = listed?;
    signed?;
    Ok(results)
}

/// SoftHSM (as SOFTHSM2_CONF says) initialized, and a session logged in to
/// the bench token.
fn bench_token() -> anyhow::Result<(Pkcs11, cryptoki::session::Session)> {
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
    let session = context.open_ro_session(slot)?;
    session.login(UserType::User, Some(&PIN.to_owned().into()))?;
    Ok((context, session))
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
    let (context, login) = bench_token()?;
    let slot = login.get_session_info()?.slot_id();
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
                            let input = RsaHash::Sha256.digest_info(&DATA);
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
    let all = join_latencies(handles)?;
    drop(login);
    context.finalize()?;
    Ok(summarize(all, seconds))
}

/// The floor: the least any agent that keeps the module in a helper process
/// can do. A relay process (this binary, `--floor-relay`) answers each
/// client connection through a helper process of its own (`--floor-helper`)
/// that signs with a session opened once: blocking reads and writes, no
/// parsing beyond the data to sign, nothing else.
mod floor {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    use anyhow::Context;
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use sha2::Digest;
    use token_agent_core::{read_string, RsaHash};

    /// The key blob and data of an SSH_AGENTC_SIGN_REQUEST (13, string
    /// blob, string data, uint32 flags).
    fn sign_request_parts(body: &[u8]) -> Option<(&[u8], &[u8])> {
        let mut rest = body.strip_prefix(&[13])?;
        let blob = read_string(&mut rest)?;
        let data = read_string(&mut rest)?;
        Some((blob, data))
    }

    fn read_frame(input: &mut impl Read, buffer: &mut Vec<u8>) -> std::io::Result<bool> {
        let mut prefix = [0u8; 4];
        match input.read_exact(&mut prefix) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(err) => return Err(err),
        }
        buffer.resize(u32::from_be_bytes(prefix) as usize, 0);
        input.read_exact(buffer)?;
        Ok(true)
    }

    fn write_frame(output: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(body);
        output.write_all(&frame)
    }

    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A running relay process, killed when dropped.
    pub(crate) struct Relay {
        child: Child,
        pub(crate) socket: PathBuf,
    }

    impl Relay {
        /// The relay process (its helpers are its children).
        pub(crate) fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Starts a relay on `socket` and waits until it listens.
        pub(crate) fn start(socket: &Path, env: &[(String, String)]) -> anyhow::Result<Self> {
            let mut child = Command::new(std::env::current_exe()?)
                .arg("--floor-relay")
                .arg(socket)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::piped())
                .spawn()?;
            let stdout = child.stdout.take().context("the relay's stdout")?;
            let relay = Self {
                child,
                socket: socket.to_owned(),
            };
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            anyhow::ensure!(line.trim() == "ready", "the floor relay did not start");
            Ok(relay)
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            // Its helpers end when their sockets close with it.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Relays each connection on `socket` to a helper of its own.
    pub(crate) fn relay(socket: &Path) -> anyhow::Result<()> {
        let listener = UnixListener::bind(socket)?;
        println!("ready");
        std::io::stdout().flush()?;
        for client in listener.incoming() {
            let mut client = client?;
            std::thread::spawn(move || {
                if let Err(err) = serve(&mut client) {
                    eprintln!("floor relay: {err:#}");
                }
            });
        }
        Ok(())
    }

    fn serve(client: &mut UnixStream) -> anyhow::Result<()> {
        let (mut helper, theirs) = UnixStream::pair()?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--floor-helper")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null());
        // SoftHSM fails when several processes open one token directory at
        // the same moment: helpers start one at a time, each saying when
        // it is ready with an empty frame.
        let mut buffer = Vec::new();
        let mut child = {
            let _one = STARTING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut child = command.spawn()?;
            // The command holds the helper's end: close it here, or a
            // helper that dies would never be noticed.
            drop(command);
            if !read_frame(&mut helper, &mut buffer)? {
                anyhow::bail!("the helper did not start: {}", child.wait()?);
            }
            child
        };
        while read_frame(client, &mut buffer)? {
            write_frame(&mut helper, &buffer)?;
            if !read_frame(&mut helper, &mut buffer)? {
                anyhow::bail!("the helper ended: {}", child.wait()?);
            }
            write_frame(client, &buffer)?;
        }
        drop(helper);
        child.wait()?;
        Ok(())
    }

    /// Signs each sign request that comes on stdin with the bench token's
    /// key whose blob it names, answering on the same socket.
    pub(crate) fn helper() -> anyhow::Result<()> {
        use std::os::fd::AsFd;
        // Stdin is the socket to the relay.
        let mut stream = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        let (_context, session) = super::bench_token()?;
        let key = |id: u8| -> anyhow::Result<_> {
            session
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Id(vec![id]),
                ])?
                .first()
                .copied()
                .context("no private key")
        };
        let (rsa, p256) = (key(1)?, key(2)?);
        write_frame(&mut stream, b"")?;
        let mut buffer = Vec::new();
        while read_frame(&mut stream, &mut buffer)? {
            let (blob, data) = sign_request_parts(&buffer).context("not a sign request")?;
            let signature = if blob.windows(7).any(|w| w == b"ssh-rsa") {
                session.sign(&Mechanism::RsaPkcs, rsa, &RsaHash::Sha256.digest_info(data))?
            } else {
                session.sign(&Mechanism::Ecdsa, p256, &sha2::Sha256::digest(data))?
            };
            let mut answer = vec![14u8];
            answer.extend_from_slice(&signature);
            write_frame(&mut stream, &answer)?;
        }
        Ok(())
    }
}
