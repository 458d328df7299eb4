//! A pinentry program that answers from a script, for end-to-end tests: it
//! speaks the Assuan protocol as pinentry does, so the agent's real pinentry
//! path runs.
//!
//! Environment:
//! - `SCRIPTED_PINENTRY_SCRIPT`: a file of answers, one per line, consumed
//!   one per question: `pin TEXT`, `confirm yes`, `confirm no`, `cancel`.
//! - `SCRIPTED_PINENTRY_LOG`: a file to which every SETTITLE, SETDESC and
//!   SETPROMPT, and each question, is appended.

#![forbid(unsafe_code)]

use std::io::{BufRead, Write};
use std::path::PathBuf;

const CANCELLED: &str = "ERR 83886179 Operation cancelled <Pinentry>";
const NOT_CONFIRMED: &str = "ERR 83886194 Not confirmed <Pinentry>";

fn main() {
    let script = std::env::var_os("SCRIPTED_PINENTRY_SCRIPT").map(PathBuf::from);
    let log = std::env::var_os("SCRIPTED_PINENTRY_LOG").map(PathBuf::from);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "OK Pleased to meet you");
    let _ = out.flush();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let (command, argument) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let argument = decode(argument);
        let reply = match command {
            "SETTITLE" | "SETDESC" | "SETPROMPT" | "SETERROR" => {
                record(log.as_ref(), &format!("{command} {argument}"));
                "OK".to_owned()
            }
            "GETPIN" => {
                record(log.as_ref(), "GETPIN");
                match next_answer(script.as_ref()).as_deref() {
                    Some(answer) if answer.starts_with("pin ") => {
                        format!("D {}\nOK", encode(&answer[4..]))
                    }
                    _ => CANCELLED.to_owned(),
                }
            }
            "CONFIRM" => {
                record(log.as_ref(), "CONFIRM");
                match next_answer(script.as_ref()).as_deref() {
                    Some("confirm yes") => "OK".to_owned(),
                    Some("confirm no") => NOT_CONFIRMED.to_owned(),
                    _ => CANCELLED.to_owned(),
                }
            }
            "BYE" => {
                let _ = writeln!(out, "OK closing connection");
                break;
            }
            _ => "OK".to_owned(),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}

/// Pops the first line of the script file.
fn next_answer(script: Option<&PathBuf>) -> Option<String> {
    let script = script?;
    let text = std::fs::read_to_string(script).ok()?;
    let mut lines = text.lines();
    let first = lines.next()?.to_owned();
    let rest: Vec<&str> = lines.collect();
    let mut remaining = rest.join("\n");
    if !remaining.is_empty() {
        remaining.push('\n');
    }
    std::fs::write(script, remaining).ok()?;
    Some(first)
}

fn record(log: Option<&PathBuf>, text: &str) {
    if let Some(log) = log {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(file, "{text}");
        }
    }
}

/// Assuan percent-decoding.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(value) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(value);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Assuan percent-encoding of a data line.
fn encode(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\n', "%0A")
        .replace('\r', "%0D")
}
