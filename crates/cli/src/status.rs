//! `token-agent status`: asks the running agent what it holds and why it
//! refused what it refused, through the `status@token-agent` extension.
//!
//! Exit codes: 0 when the agent answered, 1 when it could not be reached or
//! is not token-agent, 2 for a usage error.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;
use token_agent_core::{push_string, read_string};
use token_agent_server::status::EXTENSION;

/// Show the running agent: devices, keys with their constraints, and the
/// last refusals with their reasons.
#[derive(Debug, Parser)]
#[command(name = "token-agent status")]
struct Args {
    /// Print the agent's answer as JSON, for scripts.
    #[arg(long)]
    json: bool,
    /// The agent's socket (default: $SSH_AUTH_SOCK).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// The clap definition of `token-agent status`, for the man page and completions.
pub(crate) fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// Runs `token-agent status ARGS` (`args` starts with "status").
pub(crate) fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(args);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("token-agent status: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let socket = match &args.socket {
        Some(socket) => socket.clone(),
        None => std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .context("SSH_AUTH_SOCK is not set: start the agent (eval \"$(token-agent -s)\") or name it with --socket")?,
    };
    let document = ask(&socket)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
    } else {
        write!(out, "{}", render(&document, &socket))?;
    }
    Ok(())
}

/// Sends the extension request and returns the agent's JSON document.
fn ask(socket: &std::path::Path) -> anyhow::Result<Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to the agent at {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut body = vec![27u8];
    push_string(&mut body, EXTENSION.as_bytes());
    let mut frame = u32::try_from(body.len())?.to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    stream.write_all(&frame)?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .context("the agent closed the connection")?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 * 1024 * 1024 {
        bail!("the agent's answer claims {len} bytes");
    }
    let mut reply = vec![0u8; len];
    stream.read_exact(&mut reply)?;
    let mut rest = match reply.split_first() {
        Some((29, rest)) => rest,
        _ => bail!(
            "the agent at {} is not token-agent, or refused to tell (it answers status only to \
             its own user, never over a forwarded connection); `token-agent doctor` says what \
             serves this socket",
            socket.display()
        ),
    };
    let name = read_string(&mut rest).context("a malformed answer")?;
    if name != EXTENSION.as_bytes() {
        bail!("the agent answered another extension");
    }
    let json = read_string(&mut rest).context("a malformed answer")?;
    serde_json::from_slice(json).context("the agent's answer is not JSON")
}

/// How the agent is locked, and what unlocks it.
fn lock_state(doc: &Value) -> &'static str {
    let flag = |name: &str| doc[name].as_bool().unwrap_or(false);
    match (flag("locked_with_password"), flag("locked_with_session")) {
        (true, true) => "LOCKED (ssh-add -X, and unlocking the desktop session, unlock it)",
        (true, false) => "LOCKED (ssh-add -X unlocks)",
        (false, true) => "LOCKED with the desktop session (unlocking the session unlocks it)",
        // An agent from before the two flags.
        (false, false) if flag("locked") => "LOCKED",
        (false, false) => "unlocked",
    }
}

/// The document in words.
fn render(doc: &Value, socket: &std::path::Path) -> String {
    let mut out = String::new();
    let text = |v: &Value| clean(v.as_str().unwrap_or(""));
    out.push_str(&format!(
        "token-agent {} (pid {}) on {}, up {}, {}\n",
        text(&doc["version"]),
        doc["pid"],
        socket.display(),
        duration(doc["uptime_seconds"].as_u64().unwrap_or(0)),
        lock_state(doc)
    ));
    out.push_str("\nDevices:\n");
    let mut any_device = false;
    for backend in doc["backends"].as_array().into_iter().flatten() {
        for device in backend["devices"].as_array().into_iter().flatten() {
            any_device = true;
            let mark = if device["problem"].as_bool().unwrap_or(false) {
                "!"
            } else {
                " "
            };
            out.push_str(&format!(
                "{mark} {}: {}\n",
                text(&backend["name"]),
                text(&device["label"])
            ));
            for detail in device["details"].as_array().into_iter().flatten() {
                out.push_str(&format!("      {}\n", text(detail)));
            }
        }
    }
    if !any_device {
        out.push_str("  none\n");
    }
    out.push_str("\nKeys:\n");
    let keys = doc["keys"].as_array().cloned().unwrap_or_default();
    if keys.is_empty() {
        out.push_str("  none\n");
    }
    for key in &keys {
        out.push_str(&format!(
            "  {} {} ({}, {}{})\n",
            text(&key["fingerprint"]),
            text(&key["comment"]),
            text(&key["type"]),
            text(&key["backend"]),
            key["device"]
                .as_str()
                .map(|d| format!(", {}", clean(d)))
                .unwrap_or_default()
        ));
        let c = &key["constraints"];
        if c.is_object() {
            let mut parts = Vec::new();
            if let Some(left) = c["lifetime_left_seconds"].as_u64() {
                parts.push(format!("expires in {}", duration(left)));
            }
            if c["confirm"].as_bool().unwrap_or(false) {
                parts.push("confirm each use".to_owned());
            }
            let destinations = strings(&c["destinations"]);
            if !destinations.is_empty() {
                parts.push(format!("only to {}", destinations.join(", ")));
            }
            if !parts.is_empty() {
                out.push_str(&format!("      {}\n", parts.join("; ")));
            }
        }
        let cert = &key["certificate"];
        if cert.is_object() {
            let principals = strings(&cert["principals"]);
            out.push_str(&format!(
                "      certificate \"{}\" for {}, valid {} to {}{}\n",
                text(&cert["key_id"]),
                if principals.is_empty() {
                    "any principal".to_owned()
                } else {
                    principals.join(", ")
                },
                time(cert["valid_after"].as_u64().unwrap_or(0)),
                time(cert["valid_before"].as_u64().unwrap_or(u64::MAX)),
                if cert["valid_now"].as_bool().unwrap_or(true) {
                    ""
                } else {
                    " (NOT VALID NOW)"
                }
            ));
        }
    }
    let upstreams = doc["upstreams"].as_array().cloned().unwrap_or_default();
    if !upstreams.is_empty() {
        out.push_str("\nUpstream agents:\n");
    }
    for upstream in &upstreams {
        let state = text(&upstream["state"]);
        let mark = if state == "down" || state == "not answering" {
            "!"
        } else {
            " "
        };
        let mut line = format!(
            "{mark} {}: {state}, {} keys",
            text(&upstream["socket"]),
            upstream["keys"].as_u64().unwrap_or(0)
        );
        if let Some(ago) = upstream["listed_seconds_ago"].as_u64() {
            line.push_str(&format!(", listed {} ago", duration(ago)));
        }
        out.push_str(&line);
        out.push('\n');
        if let Some(reason) = upstream["reason"].as_str().map(clean) {
            let since = upstream["since_seconds"]
                .as_u64()
                .map(|s| format!(" (for {})", duration(s)))
                .unwrap_or_default();
            out.push_str(&format!("      {reason}{since}\n"));
        }
    }
    out.push_str("\nRecent refusals:\n");
    let refusals = doc["refusals"].as_array().cloned().unwrap_or_default();
    if refusals.is_empty() {
        out.push_str("  none\n");
    }
    for refusal in &refusals {
        let client = strings(&refusal["client"]);
        out.push_str(&format!(
            "  {} {} {}: {}\n      {}\n      by {}{}\n",
            time(refusal["time"].as_u64().unwrap_or(0)),
            text(&refusal["operation"]),
            clean(refusal["key"].as_str().unwrap_or("-")),
            text(&refusal["reason"]),
            text(&refusal["message"]),
            client.join(" < "),
            refusal["destination"]
                .as_str()
                .map(|d| format!(", via {}", clean(d)))
                .unwrap_or_default()
        ));
    }
    out
}

/// The strings of a JSON array (nothing for anything else).
fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| clean(v.as_str().unwrap_or("")))
        .collect()
}

/// `text` safe to print on a terminal: key comments, device labels and
/// messages come from clients, upstream agents and modules, and a control
/// character (an escape sequence, a newline) could rewrite what the
/// person sees; such characters are shown escaped.
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// "2h 3m", "45s".
fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A Unix time as "2026-12-02 16:50:01 UTC"; "forever" for the end of time.
fn time(unix: u64) -> String {
    if unix == u64::MAX {
        return "forever".to_owned();
    }
    if unix == 0 {
        return "the beginning".to_owned();
    }
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_read_well() {
        assert_eq!(time(1_764_694_201), "2025-12-02 16:50:01 UTC");
        assert_eq!(time(u64::MAX), "forever");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(7380), "2h 3m");
    }

    #[test]
    fn text_from_others_cannot_rewrite_the_terminal() {
        assert_eq!(
            clean("laptop\u{1b}[2J\nfake line"),
            "laptop\\u{1b}[2J\\nfake line"
        );
        assert_eq!(clean("plain é"), "plain é");
    }

    #[test]
    fn the_lock_says_what_unlocks_it() {
        let doc = |password: bool, session: bool| {
            serde_json::json!({
                "locked": password || session,
                "locked_with_password": password,
                "locked_with_session": session,
            })
        };
        assert_eq!(lock_state(&doc(false, false)), "unlocked");
        assert_eq!(lock_state(&doc(true, false)), "LOCKED (ssh-add -X unlocks)");
        assert!(lock_state(&doc(false, true)).contains("unlocking the session unlocks it"));
        assert!(!lock_state(&doc(false, true)).contains("ssh-add -X"));
        assert!(lock_state(&doc(true, true)).contains("ssh-add -X, and unlocking"));
    }
}
