//! The control interface of the `piv-sim` binary: a Unix socket that takes one
//! command per line and answers one line, `ok ...` or `error ...`. It plays the
//! person in front of the cards (touch, pull out, plug in).
//!
//! ```text
//! touch [CARD]                      touch the card now (only counts while it blinks)
//! touch-mode auto MILLIS [CARD]     touch every request after MILLIS
//! touch-mode manual [CARD]          wait for `touch`, time out otherwise
//! touch-mode never [CARD]           never touch: every request times out
//! touch-timeout SECONDS [CARD]      how long the card waits for a touch (15 by default)
//! remove [CARD] | insert [CARD]     pull the card out of its reader, put it back
//! status [CARD]                     serial, connection, touch and PIN state
//!                                   (waits while the card works, e.g. for a touch)
//! waiting [CARD]                    `true` while the card waits for a touch (never waits)
//! fault malformed-metadata [CARD]   GET METADATA answers a malformed body (for robustness tests)
//! fault none [CARD]                 back to well-formed answers
//! ```
//!
//! CARD is the card's index in the order of `--vpcd` options, 0 by default.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::{Error, Simulator, TouchMode};

/// Listens on `path` and serves control commands for `cards` on a thread.
pub fn serve(path: &Path, cards: Vec<Arc<Simulator>>) -> Result<JoinHandle<()>, Error> {
    let control_err = |source| Error::Control {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(control_err)?;
    thread::Builder::new()
        .name("piv-sim control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let cards = cards.clone();
                let _ = thread::Builder::new()
                    .name("piv-sim control client".into())
                    .spawn(move || client(stream, &cards));
            }
        })
        .map_err(control_err)
}

fn client(stream: UnixStream, cards: &[Arc<Simulator>]) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else {
            return;
        };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match apply(cards, &line) {
            Ok(text) if text.is_empty() => "ok\n".to_string(),
            Ok(text) => format!("ok {text}\n"),
            Err(text) => format!("error {text}\n"),
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Runs one command line against `cards`.
pub fn apply(cards: &[Arc<Simulator>], line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (command, args) = words.split_first().ok_or("empty command")?;
    let (args, card) = match args {
        [rest @ .., last] if last.parse::<usize>().is_ok() && takes_card_last(command, rest) => {
            (rest, last.parse::<usize>().unwrap_or(0))
        }
        _ => (args, 0),
    };
    let sim = cards
        .get(card)
        .ok_or_else(|| format!("no card {card}: there are {}", cards.len()))?;
    let touch = sim.touch();
    match (*command, args) {
        ("touch", []) => touch.touch(),
        ("touch-mode", ["auto", millis]) => {
            let millis: u64 = millis.parse().map_err(|_| "MILLIS must be a number")?;
            touch.set_mode(TouchMode::AutoAfter(Duration::from_millis(millis)));
        }
        ("touch-mode", ["manual"]) => touch.set_mode(TouchMode::Manual),
        ("touch-mode", ["never"]) => touch.set_mode(TouchMode::Never),
        ("touch-timeout", [secs]) => {
            let secs: u64 = secs.parse().map_err(|_| "SECONDS must be a number")?;
            touch.set_timeout(Duration::from_secs(secs));
        }
        ("fault", ["malformed-metadata"]) => sim.with_card(|c| c.set_malformed_metadata(true)),
        ("fault", ["none"]) => sim.with_card(|c| c.set_malformed_metadata(false)),
        ("remove", []) => sim.remove(),
        ("insert", []) => sim.insert(),
        // Answers at once: unlike `status`, it does not need the card's lock,
        // which the card holds while it waits for the touch.
        ("waiting", []) => return Ok(touch.is_waiting().to_string()),
        ("status", []) => {
            let (serial, pin_tries) =
                sim.with_card(|c| (c.state().serial(), c.state().pin().retries_left()));
            return Ok(format!(
                "serial={serial} connected={} waiting-for-touch={} pin-tries={pin_tries}",
                sim.is_connected(),
                touch.is_waiting()
            ));
        }
        _ => return Err(format!("unknown command: {line}")),
    }
    Ok(String::new())
}

/// Whether the last number of a line is a card index rather than the command's
/// own numeric argument.
fn takes_card_last(command: &str, rest: &[&str]) -> bool {
    match command {
        "touch-mode" => rest.len() == 2 || rest == ["manual"] || rest == ["never"],
        "touch-timeout" => rest.len() == 1,
        "fault" => rest.len() == 1,
        _ => rest.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CardConfig, VirtualCard};

    #[test]
    fn commands_reach_the_right_card() -> Result<(), Box<dyn std::error::Error>> {
        // Nothing listens on port 9 of loopback: the cards stay out of any reader.
        let addr = "127.0.0.1:9".parse()?;
        let cards: Vec<Arc<Simulator>> = (0..2)
            .map(|i| {
                let config = CardConfig {
                    serial: 100 + i,
                    ..CardConfig::default()
                };
                VirtualCard::new(config).map(|card| Arc::new(Simulator::spawn(card, addr)))
            })
            .collect::<Result<_, _>>()?;
        assert_eq!(apply(&cards, "touch-mode never 1"), Ok(String::new()));
        assert_eq!(cards[1].touch().mode(), TouchMode::Never);
        assert_eq!(cards[0].touch().mode(), TouchMode::default());
        apply(&cards, "touch-mode auto 250")?;
        assert_eq!(
            cards[0].touch().mode(),
            TouchMode::AutoAfter(Duration::from_millis(250))
        );
        apply(&cards, "touch-timeout 3 1")?;
        let status = apply(&cards, "status 1")?;
        assert!(status.contains("serial=101"), "{status}");
        assert!(status.contains("connected=false"), "{status}");
        assert_eq!(apply(&cards, "waiting 1"), Ok("false".to_string()));
        apply(&cards, "fault malformed-metadata 1")?;
        apply(&cards, "fault none 1")?;
        assert!(apply(&cards, "fault sparks").is_err());
        assert!(apply(&cards, "touch 7").is_err());
        assert!(apply(&cards, "dance").is_err());
        assert!(apply(&cards, "").is_err());
        Ok(())
    }
}
