//! hot-code: writes the linker scripts (crates/cli/hot-code/*.ld) that put the
//! code token-agent and its PKCS#11 helper run day to day at the start of
//! their text, so that the pages they keep resident hold that code and little
//! else. The kernel maps 64 KiB around each page a process first touches: with
//! the functions that run scattered over the whole binary, almost all of it
//! ends up resident.
//!
//! It runs the release agent under valgrind's callgrind (the helpers too),
//! started once in the foreground (as systemd starts it) and once in the
//! background (as `eval "$(token-agent)"` does), drives the second through
//! a day's work with OpenSSH's tools (a SoftHSM token added
//! with `ssh-add -s`, software keys of each type, with a lifetime and with a
//! confirmation, signatures with every key, removal, lock and unlock, status),
//! ending the signing helper with SIGTERM, on which valgrind writes its
//! profile (unloading a module kills it with SIGKILL, which leaves none),
//! and writes, for each binary, every function that ran as a section pattern
//! whose symbol hashes are wildcards, so a script stays right across rebuilds
//! and dependency updates that do not rename functions. Code missing from a
//! script still runs: it is only laid out among the rest.
//!
//! `cargo build --release -p token-agent && cargo run --release -p token-agent-e2e --bin hot-code`

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::bench;
use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
use token_agent_e2e::wire::RawClient;
use token_agent_e2e::{check, write_script};

/// The binaries a script is written for.
const BINARIES: [&str; 2] = ["token-agent", "token-agent-pkcs11-helper"];

/// Modules (as v0 symbols spell their path) whose code runs under valgrind
/// in place of code that needs an instruction valgrind's CPU lacks, each
/// with that code: SHA-256 in software, where the CPU has the SHA
/// extensions (valgrind 3.19 does not), and the intrinsics it calls (SHA and
/// SSSE3), which are functions of their own at opt-level "s".
const CPU_PATHS: [(&str, &[&str]); 1] = [(
    "_4sha26sha2564soft",
    &[
        "_4sha26sha2563x86",
        "_4core9core_arch3x863sha",
        "_4core9core_arch3x865ssse3",
    ],
)];

/// Write the linker scripts that cluster the agent's day-to-day code.
#[derive(Debug, Parser)]
struct Args {
    /// The release agent (its helper is the token-agent-pkcs11-helper beside it).
    #[arg(long, default_value = "target/release/token-agent")]
    agent: PathBuf,
    /// Where the scripts go.
    #[arg(long, default_value = "crates/cli/hot-code")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let agent = std::fs::canonicalize(&args.agent)
        .with_context(|| format!("no agent at {}", args.agent.display()))?;
    let dir = tempfile::tempdir()?;
    let profiles = dir.path().join("profiles");
    std::fs::create_dir(&profiles)?;
    run_a_day(&agent, dir.path(), &profiles)?;

    let mut ran: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&profiles)? {
        let path = entry?.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("callgrind."))
        {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let Some(binary) = BINARIES.iter().find(|b| command_is(&text, b)) else {
            continue;
        };
        ran.entry(binary).or_default().extend(functions_in(&text));
    }
    std::fs::create_dir_all(&args.out)?;
    let folder = agent.parent().context("the agent has no folder")?;
    for binary in BINARIES {
        let defined = defined_functions(&folder.join(binary))?;
        let mut functions: BTreeSet<&String> = ran
            .get(binary)
            .with_context(|| format!("no profile of {binary}: did it run under valgrind?"))?
            .iter()
            .filter(|f| defined.contains(*f))
            .collect();
        // Code the CPU runs where valgrind's emulated CPU took another path.
        for (under_valgrind, on_the_cpu) in CPU_PATHS {
            if functions.iter().any(|f| f.contains(under_valgrind)) {
                functions.extend(
                    defined
                        .iter()
                        .filter(|f| on_the_cpu.iter().any(|path| f.contains(path))),
                );
            }
        }
        let patterns: BTreeSet<String> = functions.iter().filter_map(|f| pattern(f)).collect();
        let script = args.out.join(format!("{binary}.ld"));
        std::fs::write(&script, linker_script(binary, &patterns))?;
        println!(
            "{}: {} functions ran, {} patterns",
            script.display(),
            functions.len(),
            patterns.len()
        );
    }
    Ok(())
}

/// Starts `agent` under callgrind, with its profiles in `profiles`, and uses it.
fn run_a_day(agent: &Path, dir: &Path, profiles: &Path) -> anyhow::Result<()> {
    check(
        std::process::Command::new("valgrind")
            .arg("--version")
            .output()
            .context("cannot run valgrind (install valgrind)")?,
        "valgrind --version",
    )?;
    let hsm = SoftHsm::new()?;
    hsm.token("day", &[KeyKind::P256, KeyKind::Rsa2048])?;
    let askpass = dir.join("askpass");
    // PINs, lock passwords, and "yes" to confirmations.
    write_script(
        &askpass,
        &format!("if [ \"$SSH_ASKPASS_PROMPT\" = confirm ]; then echo yes; else echo {PIN}; fi"),
    )?;
    let wrapper = dir.join("token-agent-under-callgrind");
    write_script(
        &wrapper,
        &format!(
            // Backtraces are captured only when a developer asks for them.
            "unset RUST_BACKTRACE RUST_LIB_BACKTRACE\n\
             exec valgrind --tool=callgrind --demangle=no --trace-children=yes \
             --callgrind-out-file={profiles}/callgrind.%p --log-file={profiles}/valgrind.%p \
             {agent} \"$@\"",
            profiles = profiles.display(),
            agent = agent.display(),
        ),
    )?;
    let mut env = hsm.env();
    env.extend([
        ("SSH_ASKPASS".to_owned(), askpass.display().to_string()),
        ("SSH_ASKPASS_REQUIRE".to_owned(), "force".to_owned()),
        ("DISPLAY".to_owned(), ":0".to_owned()),
    ]);
    let options = AgentOptions {
        env,
        config: Some("[prompt]\npin_prompt = \"askpass\"\n".to_owned()),
        ..AgentOptions::default()
    };
    // Started in the foreground, as systemd starts it (`-D`; `-d` runs the
    // same code), at the level a user's agent logs at: its start and a list.
    let mut foreground = Agent::start_binary(
        &wrapper,
        AgentOptions {
            env: [("TOKEN_AGENT_LOG".to_owned(), "info".to_owned())]
                .into_iter()
                .chain(options.env.iter().cloned())
                .collect(),
            ..options.clone()
        },
    )?;
    // No keys yet: ssh-add -l says so and exits 1.
    foreground.ssh_add(["-l"])?;
    foreground.stop()?;
    // The day itself, in the background as `eval "$(token-agent)"` starts
    // it, logging to its file at its default level.
    let mut day = Agent::start_background_binary(&wrapper, options)?;
    // OpenSSH's tools, answered by the askpass program.
    let tool = |program: &str| {
        let mut command = day.command(program);
        command
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0");
        command
    };
    let ssh_add = |args: &[&str]| -> anyhow::Result<()> {
        check(
            tool("ssh-add").args(args).output()?,
            &format!("ssh-add {}", args.join(" ")),
        )?;
        Ok(())
    };
    ssh_add(&["-l"]).ok();
    ssh_add(&["-s", MODULE])?;
    let mut keys = Vec::new();
    for (kind, flags) in [
        ("ed25519", &[][..]),
        ("ecdsa-256", &["-t", "600"][..]),
        ("rsa-2048", &["-c"][..]),
    ] {
        let key = dir.join(kind);
        keygen(&key, kind, kind)?;
        let mut args: Vec<&str> = flags.to_vec();
        let path = key.display().to_string();
        args.push(&path);
        ssh_add(&args)?;
        keys.push(key);
    }
    ssh_add(&["-l"])?;
    let message = dir.join("message");
    std::fs::write(&message, "a day's work\n")?;
    for (i, public) in day.listed()?.iter().enumerate() {
        let file = dir.join(format!("listed-{i}.pub"));
        std::fs::write(&file, format!("{public}\n"))?;
        let _ = std::fs::remove_file(dir.join("message.sig"));
        check(
            tool("ssh-keygen")
                .args(["-Y", "sign", "-n", "file", "-f"])
                .arg(&file)
                .arg(&message)
                .output()?,
            "ssh-keygen -Y sign",
        )
        .with_context(|| format!("the agent's log:\n{}", day.log_text()))?;
    }
    // Eight at once with the first key (the token's): the paths of a busy agent.
    let first = dir.join("listed-0.pub");
    let signers = (0..8)
        .map(|i| {
            let message = dir.join(format!("message-{i}"));
            std::fs::write(&message, "at once\n")?;
            Ok(day
                .command("ssh-keygen")
                .args(["-Y", "sign", "-n", "file", "-f"])
                .arg(&first)
                .arg(&message)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for mut signer in signers {
        anyhow::ensure!(
            signer.wait()?.success(),
            "a concurrent ssh-keygen -Y sign failed"
        );
    }
    // What the benchmarks do: many lists and signatures on 1 and 8 connections.
    let mut client = RawClient::connect(day.socket())?;
    let reply = client
        .request(&[11])?
        .context("the agent closed the connection")?;
    for (blob, _) in bench::parse_identities(&reply)? {
        for clients in [1, 8] {
            bench::run(day.socket(), &[11], clients, 2)?;
            bench::run(
                day.socket(),
                &bench::sign_request(&blob, &[0x5a; 180], 2),
                clients,
                2,
            )?;
        }
    }
    check(
        day.command(agent)
            .args(["status", "--socket"])
            .arg(day.socket())
            .output()?,
        "token-agent status",
    )?;
    ssh_add(&["-d", &format!("{}.pub", keys[0].display())])?;
    ssh_add(&["-x"])?;
    ssh_add(&["-X"])?;
    // The token scanner's polls.
    std::thread::sleep(Duration::from_secs(12));
    // Unloading a module kills its helper with SIGKILL, which leaves no
    // profile: end the signing helper first with SIGTERM, on which valgrind
    // still writes it, and wait until it has.
    let helpers = end_helpers(profiles)?;
    anyhow::ensure!(helpers > 0, "no signing helper ran under valgrind");
    ssh_add(&["-D"])?;
    day.stop()?;
    // The helpers write their profiles once they see the agent gone.
    std::thread::sleep(Duration::from_secs(3));
    Ok(())
}

/// Sends SIGTERM to every helper still running under valgrind (as its log
/// in `profiles` names it) and waits until each has written its profile;
/// how many there were.
fn end_helpers(profiles: &Path) -> anyhow::Result<usize> {
    let mut ended = Vec::new();
    for entry in std::fs::read_dir(profiles)? {
        let path = entry?.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("valgrind."))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let log = std::fs::read_to_string(&path)?;
        let helper = log
            .lines()
            .find_map(|line| line.split_once("Command: ").map(|(_, command)| command))
            .and_then(|command| command.split_whitespace().next())
            .is_some_and(|program| Path::new(program).file_name() == Some(BINARIES[1].as_ref()));
        let pid = nix::unistd::Pid::from_raw(pid);
        if helper && nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            ended.push((path, profiles.join(format!("callgrind.{pid}"))));
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (log, profile) in &ended {
        // Written in full when valgrind's log gives the totals.
        while !std::fs::read_to_string(log)?.contains("Collected") {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{} did not end on SIGTERM",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::ensure!(profile.exists(), "no profile at {}", profile.display());
    }
    Ok(ended.len())
}

/// Whether the callgrind profile `text` is of a process running `binary`.
fn command_is(text: &str, binary: &str) -> bool {
    text.lines()
        .find_map(|line| line.strip_prefix("cmd: "))
        .and_then(|command| command.split_whitespace().next())
        .is_some_and(|program| Path::new(program).file_name() == Some(binary.as_ref()))
}

/// The function symbols `binary` defines (`nm --defined-only`).
fn defined_functions(binary: &Path) -> anyhow::Result<BTreeSet<String>> {
    let output = check(
        std::process::Command::new("nm")
            .arg("--defined-only")
            .arg(binary)
            .output()
            .context("cannot run nm (install binutils)")?,
        "nm --defined-only",
    )?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
            matches!(kind, "t" | "T" | "w" | "W").then(|| name.to_owned())
        })
        .collect())
}

/// The symbols of the functions that ran in the profile `text`, in any
/// object: callgrind attributes code in a section of its own (`.text.hot`)
/// to no object, so the caller keeps those its binary defines. In
/// callgrind's compressed format `fn=(N) name` names an id the first time,
/// and later lines give the id alone.
fn functions_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeMap::new();
    let mut ran = BTreeSet::new();
    for line in text.lines() {
        let Some((key @ ("fn" | "cfn"), value)) = line.split_once('=') else {
            continue;
        };
        let Some((id, name)) = compressed(value) else {
            continue;
        };
        if let Some(name) = name {
            names.insert(id, name);
        }
        if key == "fn" {
            if let Some(name) = names.get(id) {
                ran.insert((*name).to_owned());
            }
        }
    }
    ran
}

/// `(N) name` or `(N)`.
fn compressed(value: &str) -> Option<(&str, Option<&str>)> {
    let rest = value.strip_prefix('(')?;
    let (id, rest) = rest.split_once(')')?;
    let name = rest.strip_prefix(' ').filter(|n| !n.is_empty());
    Some((id, name))
}

/// The section pattern for the function `symbol`: what changes when the
/// toolchain or a dependency does becomes a wildcard (a legacy Rust symbol's
/// hash `17h<16 hex digits>E`; in a v0 symbol the crate disambiguators
/// `Cs<base 62>_`, and the back-references `B<base 62>_`, which are offsets
/// into the symbol and move when a disambiguator's length does). None for
/// what has no symbol. A wildcard only widens a pattern: it still matches
/// the symbol, even where it replaced part of a name.
fn pattern(symbol: &str) -> Option<String> {
    if symbol.starts_with("0x") || symbol.starts_with('(') {
        return None;
    }
    let legacy = symbol
        .strip_suffix('E')
        .and_then(|s| {
            s.get(..s.len().checked_sub(19)?)
                .map(|head| (head, &s[s.len() - 19..]))
        })
        .filter(|(_, hash)| {
            hash.starts_with("17h") && hash[3..].bytes().all(|b| b.is_ascii_hexdigit())
        });
    if let Some((head, _)) = legacy {
        return Some(format!("{head}17h*"));
    }
    if !symbol.starts_with("_R") {
        return Some(symbol.to_owned());
    }
    let mut out = String::with_capacity(symbol.len());
    let mut rest = &symbol[2..];
    out.push_str("_R");
    while let Some(at) = rest.find(['C', 'B']) {
        out.push_str(&rest[..at]);
        let tag = if rest[at..].starts_with("Cs") {
            "Cs"
        } else {
            &rest[at..=at]
        };
        let after = &rest[at + tag.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_alphanumeric).count();
        let wildcard = tag != "C" && after[digits..].starts_with('_');
        if wildcard {
            out.push_str(tag);
            out.push_str("*_");
            rest = &after[digits + 1..];
        } else {
            out.push_str(tag);
            rest = after;
        }
    }
    out.push_str(rest);
    Some(out)
}

/// A linker script that puts the sections of `patterns` first in the text.
fn linker_script(binary: &str, patterns: &BTreeSet<String>) -> String {
    let mut script = format!(
        "/* The functions {binary} ran in a day's work, first in its text: written by\n   \
         `cargo run --release -p token-agent-e2e --bin hot-code`; do not edit. */\n\
         SECTIONS\n{{\n  .text.hot :\n  {{\n"
    );
    for pattern in patterns {
        // Cold code (panics, first-time initialization) is in .text.unlikely.*.
        script.push_str(&format!(
            "    *(.text.{pattern} .text.unlikely.{pattern})\n"
        ));
    }
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_become_wildcards() {
        assert_eq!(
            pattern("_ZN3std4sync9once_lock17OnceLock$LT$T$GT$10initialize17h61531c289dd5648fE")
                .unwrap(),
            "_ZN3std4sync9once_lock17OnceLock$LT$T$GT$10initialize17h*"
        );
        assert_eq!(
            pattern("_RNvMs4_NtCslNYArtu3iFV_5alloc7raw_vecNtB5_11RawVecInner11finish_growCsjrHSEGnQ3l9_3std")
                .unwrap(),
            "_RNvMs4_NtCs*_5alloc7raw_vecNtB*_11RawVecInner11finish_growCs*_3std"
        );
        assert_eq!(pattern("main").unwrap(), "main");
        assert_eq!(pattern("0x0000000000193d30"), None);
        assert_eq!(pattern("(below main)"), None);
    }

    #[test]
    fn profiles_name_their_functions_once() {
        let text = "cmd:  /x/token-agent -d\nob=(1) /x/token-agent\nfn=(1) a\ncfn=(2) b\n\
                    cfn=(4) d\nob=(2) ???\nfn=(3) c\nob=(1)\nfn=(2)\n";
        assert!(command_is(text, "token-agent"));
        assert!(!command_is(text, "token-agent-pkcs11-helper"));
        let ran: Vec<_> = functions_in(text).into_iter().collect();
        assert_eq!(ran, ["a", "b", "c"]);
    }
}
