//! piv-sim: a virtual YubiKey 5 PIV card that plugs into pcscd through
//! vsmartcard's vpcd reader driver, so that tests run the real PC/SC path
//! (the `yubikey` crate, `yubico-piv-tool` or OpenSC → libpcsclite → pcscd →
//! vpcd → piv-sim) without a physical key.
//!
//! It owns the card side only: the vpcd wire protocol ([`transport`]), APDU
//! parsing, command chaining and GET RESPONSE ([`apdu`]), the PIV applet with
//! Yubico's extensions ([`piv`], and the `yubico` module), the card's keys and
//! attestation ([`crypto`]), the touch sensor ([`touch`]) and the card's memory
//! ([`state`]). It knows nothing of token-agent's backends, and it starts no
//! pcscd: the test rig (the `token-agent-e2e` crate's `pcsc` module) does.
//!
//! Firmware 5.4 behaviour is the model: PIN 123456, PUK 12345678, 3DES
//! management key 010203040506070801020304050607080102030405060708, three
//! tries each, RSA 1024/2048 and ECC P-256/P-384, PIN and touch policies;
//! with firmware 5.7 or later in [`CardConfig`], RSA 3072/4096 too (not yet
//! the Ed25519 and X25519 keys a real 5.7 card also holds).
//! The attestation key is simulated (P-256, self-signed "Yubico PIV
//! Attestation"), so attestation statements chain to it and not to Yubico's CA.
//! An older firmware version in [`CardConfig`] takes away what that firmware
//! lacks, as far as PIV clients can tell: before 5.3 no GET METADATA (6D00);
//! on 4.x no GET SERIAL (the serial comes from the OTP applet) and every
//! SELECT of PIV forgets the verified PIN and the management key.
//!
//! ```no_run
//! use std::time::Duration;
//! use piv_sim::{CardConfig, Simulator, TouchMode, VirtualCard};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // pcscd runs with a reader.conf entry `DEVICENAME /dev/null:35963` for the vpcd driver.
//! let card = VirtualCard::new(CardConfig { serial: 12_345_678, ..CardConfig::default() })?;
//! let sim = Simulator::spawn(card, "127.0.0.1:35963".parse()?);
//! sim.wait_detections(1, Duration::from_secs(10));
//! // Keys with a touch policy now wait until the test touches the card.
//! sim.touch().set_mode(TouchMode::Manual);
//! if sim.touch().wait_until_waiting(Duration::from_secs(30)) {
//!     sim.touch().touch();
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod apdu;
mod card;
pub mod control;
pub mod crypto;
mod error;
pub mod piv;
mod sim;
pub mod state;
pub mod tlv;
pub mod touch;
pub mod transport;
mod yubico;

pub use card::VirtualCard;
pub use error::Error;
pub use sim::Simulator;
pub use state::CardConfig;
pub use touch::{TouchControl, TouchMode};
