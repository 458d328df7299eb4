//! `token-agent piv list|setup|unblock`: inspect and set up YubiKeys' PIV keys.
//!
//! PINs, PUKs and new PINs are asked through the configured pinentry (as the
//! agent asks them), never taken from the command line, where other users
//! could read them.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use token_agent_core::{DeviceInfo, PinKind, PinRequest, PromptSubject};
use token_agent_piv::manage::{self, SetupOptions, SetupSecrets};
use token_agent_piv::{KeyAlgorithm, PinUse, Slot, TouchUse};
use token_agent_prompt::Pinentry;

use crate::config::Config;

/// Inspect and set up the PIV keys of YubiKeys.
#[derive(Debug, Parser)]
#[command(name = "token-agent piv")]
struct PivArgs {
    /// The YubiKey to use, by serial number (needed when several are plugged in).
    #[arg(long, global = true)]
    serial: Option<u32>,

    /// The configuration file (for the pinentry program).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: PivCommand,
}

#[derive(Debug, Subcommand)]
enum PivCommand {
    /// List YubiKeys with their slots, algorithms, policies and PIN tries left.
    List,
    /// Generate a key with a self-signed certificate and print its authorized_keys line.
    Setup {
        /// The slot.
        #[arg(long, default_value = "9a")]
        slot: Slot,
        /// ECCP256, ECCP384, RSA2048 or RSA1024.
        #[arg(long, default_value = "ECCP256")]
        algorithm: KeyAlgorithm,
        /// When the card asks for the PIN: never, once, always.
        #[arg(long, default_value = "once")]
        pin_policy: PinUse,
        /// When the card waits for a touch: never, always, cached.
        #[arg(long, default_value = "always")]
        touch_policy: TouchUse,
        /// Also replace the PIN (asked twice).
        #[arg(long)]
        change_pin: bool,
        /// Also replace the PUK (the current one and the new one twice).
        #[arg(long)]
        change_puk: bool,
        /// Replace the management key with a random one stored on the card and
        /// protected by the PIN, as Yubico's tools do.
        #[arg(long)]
        protect_management_key: bool,
    },
    /// Set a new PIN with the PUK, after the PIN was blocked.
    Unblock,
}

/// The clap definition of `token-agent piv`, for the man page and completions.
pub(crate) fn command() -> clap::Command {
    <PivArgs as clap::CommandFactory>::command()
}

/// Runs `token-agent piv ...` (`args` starts with "piv").
pub(crate) fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let args = PivArgs::parse_from(args);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("token-agent piv: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: PivArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let program = config
        .prompt
        .pinentry
        .clone()
        .or_else(|| std::env::var_os("PINENTRY_PROGRAM").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("pinentry"));
    let asker = Asker {
        pinentry: Pinentry::new(program, config.prompt.timeout_seconds),
    };
    match args.command {
        PivCommand::List => list(),
        PivCommand::Setup {
            slot,
            algorithm,
            pin_policy,
            touch_policy,
            change_pin,
            change_puk,
            protect_management_key,
        } => {
            let options = SetupOptions {
                serial: args.serial,
                slot,
                algorithm,
                pin_policy,
                touch_policy,
                protect_management_key,
            };
            let device = device_named(args.serial);
            let pin = asker.ask(&device, PinKind::Pin, "the current PIN")?;
            let new_pin = if change_pin {
                Some(asker.new_secret(&device, PinKind::Pin)?)
            } else {
                None
            };
            let new_puk = if change_puk {
                let puk = asker.ask(&device, PinKind::Puk, "the current PUK")?;
                Some((puk, asker.new_secret(&device, PinKind::Puk)?))
            } else {
                None
            };
            if touch_policy.may_wait() {
                eprintln!("Touch the YubiKey when it blinks, to sign the new key's certificate.");
            }
            let outcome = manage::setup(
                &options,
                &SetupSecrets {
                    pin,
                    new_pin,
                    new_puk,
                },
            )?;
            eprintln!(
                "Generated a {algorithm} key in slot {slot} of {} (PIN {pin_policy}, touch {touch_policy}).\n\
                 Add this line to ~/.ssh/authorized_keys on the servers you log in to:",
                outcome.device
            );
            println!("{}", outcome.authorized_key);
            Ok(())
        }
        PivCommand::Unblock => {
            let device = device_named(args.serial);
            let puk = asker.ask(&device, PinKind::Puk, "the PUK")?;
            let new_pin = asker.new_secret(&device, PinKind::Pin)?;
            let device = manage::unblock(args.serial, &puk, &new_pin)?;
            println!("The PIN of {device} is set and unblocked.");
            Ok(())
        }
    }
}

fn list() -> anyhow::Result<()> {
    let cards = manage::list()?;
    if cards.is_empty() {
        println!("No YubiKey found.");
    }
    for card in cards {
        let tries = |t: Option<u8>| t.map_or_else(|| "?".to_owned(), |t| t.to_string());
        println!(
            "{} (firmware {}, reader \"{}\"): PIN tries left {}, PUK tries left {}",
            card.device,
            card.firmware,
            card.reader,
            tries(card.pin_tries),
            tries(card.puk_tries)
        );
        if card.keys.is_empty() {
            println!("  no keys");
        }
        for key in card.keys {
            println!(
                "  slot {} ({}): {}, PIN {}, touch {}{}, {}",
                key.slot,
                key.slot.purpose(),
                key.algorithm,
                key.pin,
                key.touch,
                if key.has_certificate {
                    ", certificate"
                } else {
                    ""
                },
                token_agent_core::fingerprint(&key.public_key, ssh_key::HashAlg::Sha256)
            );
        }
    }
    Ok(())
}

fn device_named(serial: Option<u32>) -> DeviceInfo {
    match serial {
        Some(serial) => {
            DeviceInfo::new(format!("YubiKey #{serial}")).with_serial(serial.to_string())
        }
        None => DeviceInfo::new("your YubiKey"),
    }
}

struct Asker {
    pinentry: Pinentry,
}

impl Asker {
    fn ask(&self, device: &DeviceInfo, kind: PinKind, what: &str) -> anyhow::Result<SecretString> {
        let mut request = PinRequest::new(PromptSubject {
            device: Some(device.clone()),
            ..PromptSubject::default()
        });
        request.kind = kind;
        request.warning = Some(format!("token-agent piv asks for {what}."));
        self.pinentry
            .pin(&request)
            .with_context(|| format!("asking for {what}"))
    }

    /// A new PIN or PUK, typed twice.
    fn new_secret(&self, device: &DeviceInfo, kind: PinKind) -> anyhow::Result<SecretString> {
        let what = if kind == PinKind::Puk {
            "the new PUK"
        } else {
            "the new PIN"
        };
        let first = self.ask(device, kind, what)?;
        let again = self.ask(device, kind, &format!("{what} again"))?;
        anyhow::ensure!(
            first.expose_secret() == again.expose_secret(),
            "the two entries of {what} differ; nothing was changed"
        );
        Ok(first)
    }
}
