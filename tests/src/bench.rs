//! What the benchmarks share: agent requests, concurrent clients driving a
//! socket for a fixed time, and latency percentiles.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use token_agent_core::{push_string, read_string};

use crate::wire::{RawClient, IDENTITIES_ANSWER, SIGN_RESPONSE};

/// SSH_AGENTC_SIGN_REQUEST for the key `blob` over `data` with `flags`.
pub fn sign_request(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
    let mut out = vec![13u8];
    push_string(&mut out, blob);
    push_string(&mut out, data);
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// Requests per second and latency of a run.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Completed requests per second.
    pub per_second: f64,
    /// Median latency.
    pub p50_us: u128,
    /// 99th-percentile latency.
    pub p99_us: u128,
    /// The CPU time the serving processes (the agent and its helpers) spent
    /// per request, where it was measured.
    pub cpu_per_request: Option<Duration>,
}

/// Summarizes the latencies of a run of `seconds`.
pub fn summarize(mut all: Vec<Duration>, seconds: u64) -> Throughput {
    all.sort();
    Throughput {
        per_second: all.len() as f64 / seconds.max(1) as f64,
        p50_us: percentile(&all, 50).as_micros(),
        p99_us: percentile(&all, 99).as_micros(),
        cpu_per_request: None,
    }
}

/// `clients` connections each send `request` back to back for `seconds`.
pub fn run(
    socket: &Path,
    request: &[u8],
    clients: usize,
    seconds: u64,
) -> anyhow::Result<Throughput> {
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
    Ok(summarize(join_latencies(handles)?, seconds))
}

/// One of the agents [`interleaved`] compares: its socket and the request
/// its clients send.
#[derive(Debug, Clone)]
pub struct Contender {
    /// The agent's socket.
    pub socket: std::path::PathBuf,
    /// The request each client sends back to back.
    pub request: Vec<u8>,
    /// The process that serves it: its CPU time and its descendants'
    /// during the contender's turns is charged to its requests.
    pub pid: Option<u32>,
}

/// `clients` connections to each contender send its request back to back,
/// the contenders taking turns in `slices` slices of `slice` each (A B C A
/// B C ...), so that a machine whose speed drifts over seconds slows them
/// all alike. Connections are kept across slices (an agent that starts a
/// helper per connection pays for it once, before measuring), and every
/// client of every contender sends one request before the first slice. One
/// result per contender, over all its slices, with the CPU time its
/// processes spent per request where [`Contender::pid`] names them.
pub fn interleaved(
    contenders: &[Contender],
    clients: usize,
    slice: Duration,
    slices: usize,
) -> anyhow::Result<Vec<Throughput>> {
    let mut results = Vec::new();
    let mut turns = Vec::new();
    for contender in contenders {
        // The contender's clients and this thread meet at the start and the
        // end of each of its turns.
        let turn = Arc::new(Barrier::new(clients + 1));
        let deadline = Arc::new(std::sync::Mutex::new(Instant::now()));
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (turn, deadline) = (turn.clone(), deadline.clone());
                let (socket, request) = (contender.socket.clone(), contender.request.clone());
                std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let ready = (|| -> anyhow::Result<RawClient> {
                        let mut client = RawClient::connect(&socket)?;
                        expect_ok(&client.request(&request)?.context("agent closed")?)?;
                        Ok(client)
                    })();
                    let mut latencies = Vec::new();
                    let mut failure = None;
                    let mut client = match ready {
                        Ok(client) => Some(client),
                        Err(err) => {
                            failure = Some(err);
                            None
                        }
                    };
                    // Every contender is connected and warm before any slice.
                    turn.wait();
                    for _ in 0..slices {
                        turn.wait();
                        let end = *deadline.lock().unwrap_or_else(|e| e.into_inner());
                        while let Some(agent) = client.as_mut().filter(|_| Instant::now() < end) {
                            let start = Instant::now();
                            let reply = agent.request(&request).and_then(|r| {
                                r.ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
                            });
                            match reply
                                .map_err(anyhow::Error::from)
                                .and_then(|r| expect_ok(&r))
                            {
                                Ok(()) => latencies.push(start.elapsed()),
                                Err(err) => {
                                    failure = Some(err);
                                    client = None;
                                }
                            }
                        }
                        // Every turn is waited out, so that a failed client
                        // never leaves the others at the barrier.
                        turn.wait();
                    }
                    // The connection stays open until the last turn's CPU
                    // time is read: an agent may end what served it (the
                    // floor's helper) as soon as it closes.
                    turn.wait();
                    drop(client);
                    match failure {
                        Some(err) => Err(err),
                        None => Ok(latencies),
                    }
                })
            })
            .collect();
        turns.push((turn, deadline, handles));
    }
    for (turn, _, _) in &turns {
        turn.wait();
    }
    let mut cpu = vec![Duration::ZERO; contenders.len()];
    for _ in 0..slices {
        for ((turn, deadline, _), (contender, spent)) in
            turns.iter().zip(contenders.iter().zip(&mut cpu))
        {
            // Sampled outside the turn: walking /proc takes a while.
            let before = contender.pid.map(tree_cpu).transpose()?;
            *deadline.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + slice;
            turn.wait();
            turn.wait();
            if let (Some(pid), Some(before)) = (contender.pid, before) {
                *spent += cpu_since(pid, &before)?;
            }
        }
    }
    for (turn, _, _) in &turns {
        turn.wait();
    }
    let measured = slice * u32::try_from(slices).unwrap_or(u32::MAX);
    for ((_, _, handles), (contender, spent)) in turns.into_iter().zip(contenders.iter().zip(cpu)) {
        let latencies = join_latencies(handles)?;
        let requests = u32::try_from(latencies.len()).unwrap_or(u32::MAX).max(1);
        let mut result = summarize_over(latencies, measured);
        result.cpu_per_request = contender.pid.map(|_| spent / requests);
        results.push(result);
    }
    Ok(results)
}

/// Every latency the threads of `handles` measured, once they all ended.
pub fn join_latencies(
    handles: Vec<std::thread::JoinHandle<anyhow::Result<Vec<Duration>>>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut all = Vec::new();
    for handle in handles {
        all.extend(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    Ok(all)
}

/// Summarizes the latencies of a run that lasted `measured`.
pub fn summarize_over(mut all: Vec<Duration>, measured: Duration) -> Throughput {
    all.sort();
    Throughput {
        per_second: all.len() as f64 / measured.as_secs_f64().max(f64::EPSILON),
        p50_us: percentile(&all, 50).as_micros(),
        p99_us: percentile(&all, 99).as_micros(),
        cpu_per_request: None,
    }
}

/// Listing while another client's signature is held.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Lists answered while the signature waited.
    pub count: usize,
    /// Median list latency.
    pub p50_us: u128,
    /// 99th-percentile list latency.
    pub p99_us: u128,
    /// How long the held signature took.
    pub held_for: Duration,
    /// Whether it ended with a signature.
    pub signed: bool,
}

/// One client sends `held_request`, which the agent holds (a confirmation, a
/// hung module, a touch); another lists until it returns.
pub fn held_run(socket: &Path, held_request: &[u8]) -> anyhow::Result<Held> {
    let socket_owned = socket.to_owned();
    let request = held_request.to_vec();
    let holder = std::thread::spawn(move || -> anyhow::Result<(Duration, bool)> {
        let mut client = RawClient::connect(&socket_owned)?;
        let start = Instant::now();
        let reply = client.request(&request)?.context("agent closed")?;
        Ok((start.elapsed(), reply.first() == Some(&SIGN_RESPONSE)))
    });
    // Let the signature reach its wait first.
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
        held_for,
        signed,
    })
}

/// The (key blob, comment) pairs of an SSH_AGENT_IDENTITIES_ANSWER.
pub fn parse_identities(reply: &[u8]) -> anyhow::Result<Vec<(Vec<u8>, String)>> {
    let mut rest = reply
        .strip_prefix(&[IDENTITIES_ANSWER])
        .context("not an identities answer")?;
    let (count, tail) = rest
        .split_first_chunk::<4>()
        .context("truncated identities answer")?;
    rest = tail;
    let mut identities = Vec::new();
    for _ in 0..u32::from_be_bytes(*count) {
        let mut take = || read_string(&mut rest).context("truncated identities answer");
        let blob = take()?.to_vec();
        let comment = String::from_utf8_lossy(take()?).into_owned();
        identities.push((blob, comment));
    }
    Ok(identities)
}

/// Fails unless `reply` is an identities answer or a signature.
pub fn expect_ok(reply: &[u8]) -> anyhow::Result<()> {
    match reply.first() {
        Some(&IDENTITIES_ANSWER) | Some(&SIGN_RESPONSE) => Ok(()),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// The `pct`th percentile of sorted latencies.
pub fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = (sorted.len() * pct / 100).min(sorted.len() - 1);
    sorted[index]
}

/// The resident memory of a process and all its descendants, at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeMemory {
    /// How many processes the tree has.
    pub processes: usize,
    /// The sum of their VmRSS, in KiB (shared pages counted in each).
    pub rss_kib: u64,
    /// The sum of their PSS, in KiB (shared pages split among the processes mapping them).
    pub pss_kib: u64,
}

/// [`TreeMemory`] of `pid` and its descendants now.
pub fn tree_memory(pid: u32) -> anyhow::Result<TreeMemory> {
    let mut memory = TreeMemory::default();
    for process in tree(pid)? {
        // A process may end between listing and reading: it then uses nothing.
        let field = |file: &str, name: &str| -> Option<u64> {
            let text = std::fs::read_to_string(format!("/proc/{process}/{file}")).ok()?;
            let line = text.lines().find(|line| line.starts_with(name))?;
            line[name.len()..].split_whitespace().next()?.parse().ok()
        };
        let (Some(rss), Some(pss)) = (field("status", "VmRSS:"), field("smaps_rollup", "Pss:"))
        else {
            continue;
        };
        memory.processes += 1;
        memory.rss_kib += rss;
        memory.pss_kib += pss;
    }
    Ok(memory)
}

/// The CPU time each thread of `pid` and its descendants has run, by
/// thread id, now: what [`cpu_since`] subtracts.
#[derive(Debug, Clone, Default)]
pub struct TreeCpu {
    threads: Vec<(u32, Duration)>,
}

/// [`TreeCpu`] of `pid` and its descendants now, from each thread's
/// `schedstat` (nanoseconds on a CPU).
pub fn tree_cpu(pid: u32) -> anyhow::Result<TreeCpu> {
    let mut cpu = TreeCpu::default();
    for process in tree(pid)? {
        // A process may end between listing and reading: it then has no threads.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{process}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let ran = std::fs::read_to_string(format!("/proc/{process}/task/{tid}/schedstat"))
                .ok()
                .and_then(|text| text.split_whitespace().next()?.parse().ok());
            if let Some(nanos) = ran {
                cpu.threads.push((tid, Duration::from_nanos(nanos)));
            }
        }
    }
    Ok(cpu)
}

/// The CPU time the tree of `pid` has used since `before` (see
/// [`TreeCpu::since`]).
pub fn cpu_since(pid: u32, before: &TreeCpu) -> anyhow::Result<Duration> {
    Ok(tree_cpu(pid)?.since(before))
}

impl TreeCpu {
    /// The CPU time used between `before` and this sample: each thread's
    /// time since then, and all of a thread's time if it started since. A
    /// thread that ended in between is not counted for its last stretch.
    pub fn since(&self, before: &TreeCpu) -> Duration {
        self.threads
            .iter()
            .map(|(tid, ran)| {
                let earlier = before
                    .threads
                    .iter()
                    .find(|(t, _)| t == tid)
                    .map_or(Duration::ZERO, |(_, r)| *r);
                ran.saturating_sub(earlier)
            })
            .sum()
    }
}

/// `pid` and its descendants, parents first.
fn tree(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let name = entry?.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // The parent is the second field after the command name, which is in
        // parentheses and may itself hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(parent) = parent {
            parents.push((child, parent));
        }
    }
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        next += 1;
    }
    Ok(tree)
}

/// Samples [`tree_memory`] every 100 ms for `seconds`: the median sample
/// (by RSS) and the largest.
pub fn sample_tree_memory(pid: u32, seconds: u64) -> anyhow::Result<(TreeMemory, TreeMemory)> {
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        samples.push(tree_memory(pid)?);
        std::thread::sleep(Duration::from_millis(100));
    }
    samples.sort_by_key(|m| m.rss_kib);
    let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
    let largest = samples.last().copied().unwrap_or_default();
    Ok((median, largest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(threads: &[(u32, u64)]) -> TreeCpu {
        TreeCpu {
            threads: threads
                .iter()
                .map(|&(tid, ms)| (tid, Duration::from_millis(ms)))
                .collect(),
        }
    }

    #[test]
    fn cpu_since_counts_what_each_thread_ran_in_between() {
        let before = sample(&[(1, 100), (2, 50), (3, 70)]);
        // 1 ran 20 ms more, 2 did not run, 3 ended, 4 started and ran 5 ms.
        let now = sample(&[(1, 120), (2, 50), (4, 5)]);
        assert_eq!(now.since(&before), Duration::from_millis(25));
        assert_eq!(before.since(&before), Duration::ZERO);
    }

    #[test]
    fn tree_cpu_reads_the_process_and_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let cpu = tree_cpu(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        let cpu = cpu.unwrap();
        // The main thread's id is the process id; it has run.
        assert!(cpu
            .threads
            .iter()
            .any(|(tid, ran)| *tid == std::process::id() && *ran > Duration::ZERO));
        assert!(cpu.threads.iter().any(|(tid, _)| *tid == child.id()));
    }
}
