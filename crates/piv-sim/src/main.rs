//! `piv-sim`: run virtual YubiKeys by hand against a pcscd with the vpcd driver.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use piv_sim::{CardConfig, Simulator, TouchMode, VirtualCard};

/// A virtual YubiKey 5 PIV card for pcscd's vpcd reader driver (vsmartcard).
#[derive(Debug, Parser)]
#[command(name = "piv-sim", version)]
struct Args {
    /// vpcd address to plug a card into; repeat for several cards (serials count up).
    #[arg(long = "vpcd", default_value = "127.0.0.1:35963")]
    vpcd: Vec<SocketAddr>,

    /// Serial number of the first card.
    #[arg(long, default_value_t = 10_000_001)]
    serial: u32,

    /// Firmware version, as MAJOR.MINOR.PATCH.
    #[arg(long, default_value = "5.4.3", value_parser = parse_version)]
    firmware: [u8; 3],

    /// Keep each card's state in DIR/<serial>.json, so it survives a restart.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// How touches happen: `auto` (at once), `auto:MILLIS`, `manual` (control socket) or `never`.
    #[arg(long, default_value = "auto", value_parser = parse_touch)]
    touch: TouchMode,

    /// Seconds a card waits for a touch before it refuses.
    #[arg(long, default_value_t = 15)]
    touch_timeout: u64,

    /// Unix socket taking control commands (touch, remove, insert, status).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// More logging (-v info, -vv debug: one line per APDU, never its data).
    #[arg(short, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn parse_version(s: &str) -> Result<[u8; 3], String> {
    let parts: Vec<u8> = s
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?} is not MAJOR.MINOR.PATCH"))?;
    <[u8; 3]>::try_from(parts).map_err(|_| format!("{s:?} is not MAJOR.MINOR.PATCH"))
}

fn parse_touch(s: &str) -> Result<TouchMode, String> {
    match s.split_once(':') {
        None if s == "auto" => Ok(TouchMode::AutoAfter(Duration::ZERO)),
        None if s == "manual" => Ok(TouchMode::Manual),
        None if s == "never" => Ok(TouchMode::Never),
        Some(("auto", millis)) => millis
            .parse()
            .map(|m| TouchMode::AutoAfter(Duration::from_millis(m)))
            .map_err(|_| format!("{millis:?} is not a number of milliseconds")),
        _ => Err(format!("{s:?}: use auto, auto:MILLIS, manual or never")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("piv-sim: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), piv_sim::Error> {
    let mut cards = Vec::new();
    for (i, addr) in args.vpcd.iter().enumerate() {
        let config = CardConfig {
            serial: args.serial.wrapping_add(i as u32),
            version: args.firmware,
        };
        let card = match &args.state_dir {
            Some(dir) => {
                VirtualCard::with_state_file(config, &dir.join(format!("{}.json", config.serial)))?
            }
            None => VirtualCard::new(config)?,
        };
        let sim = Simulator::spawn(card, *addr);
        sim.touch().set_mode(args.touch);
        sim.touch()
            .set_timeout(Duration::from_secs(args.touch_timeout));
        eprintln!(
            "piv-sim: card {i} (serial {}) plugs into vpcd at {addr}",
            config.serial
        );
        cards.push(Arc::new(sim));
    }
    if let Some(path) = &args.control {
        piv_sim::control::serve(path, cards.clone())?;
        eprintln!("piv-sim: control socket at {}", path.display());
    }
    // Serve until killed; the cards' threads do the work.
    loop {
        std::thread::park();
    }
}
