//! A whole virtual card: the PIV applet behind the APDU layer, its reaction to
//! the reader's power and reset messages, and its state file.

use std::path::{Path, PathBuf};

use crate::apdu::Exchange;
use crate::piv::Applet;
use crate::state::{CardConfig, CardState};
use crate::touch::TouchControl;
use crate::transport::{Request, YUBIKEY5_ATR};
use crate::Error;

/// A virtual YubiKey 5 with its PIV applet.
#[derive(Debug)]
pub struct VirtualCard {
    applet: Applet,
    exchange: Exchange,
    state_file: Option<PathBuf>,
}

impl VirtualCard {
    /// A factory-fresh card kept in memory only.
    pub fn new(config: CardConfig) -> Result<Self, Error> {
        let state = CardState::new(config).map_err(Error::Crypto)?;
        Ok(Self::from_state(state, None))
    }

    /// A card whose state lives in `path`: loaded if the file exists (the serial
    /// and firmware of `config` are then ignored), created otherwise, and
    /// rewritten after every command that changes it.
    pub fn with_state_file(config: CardConfig, path: &Path) -> Result<Self, Error> {
        let state = if path.exists() {
            CardState::load(path)?
        } else {
            let state = CardState::new(config).map_err(Error::Crypto)?;
            state.save(path)?;
            state
        };
        Ok(Self::from_state(state, Some(path.to_path_buf())))
    }

    fn from_state(state: CardState, state_file: Option<PathBuf>) -> Self {
        Self {
            applet: Applet::new(state, TouchControl::new()),
            exchange: Exchange::default(),
            state_file,
        }
    }

    /// The card's touch sensor.
    pub fn touch_control(&self) -> TouchControl {
        self.applet.touch.clone()
    }

    /// The persistent state (serial, counters, keys, objects).
    pub fn state(&self) -> &CardState {
        self.applet.state()
    }

    /// A fault for tests of clients' robustness: while `on`, GET METADATA
    /// answers 9000 with a malformed body (an algorithm TLV without its byte).
    pub fn set_malformed_metadata(&mut self, on: bool) {
        self.applet.malformed_metadata = on;
    }

    /// Handles one vpcd message; returns the answer, if the message gets one.
    pub fn handle(&mut self, request: Request) -> Option<Vec<u8>> {
        match request {
            Request::PowerOff | Request::PowerOn | Request::Reset => {
                self.power_cycle();
                None
            }
            Request::Atr => Some(YUBIKEY5_ATR.to_vec()),
            Request::UnknownControl(byte) => {
                tracing::warn!(byte, "unknown vpcd control byte ignored");
                None
            }
            Request::Apdu(apdu) => Some(self.transmit(&apdu)),
        }
    }

    /// Sends one command APDU and returns the response APDU.
    pub fn transmit(&mut self, apdu: &[u8]) -> Vec<u8> {
        let applet = &mut self.applet;
        let response = self.exchange.handle(apdu, |cmd| applet.process(cmd));
        if self.applet.take_dirty() {
            if let Some(path) = &self.state_file {
                if let Err(e) = self.applet.state().save(path) {
                    tracing::error!(error = %e, "could not save the card state");
                }
            }
        }
        response.to_bytes()
    }

    /// The session ends: PIN and management key verification, pending chains and
    /// responses are forgotten, as when the reader cuts power or resets the card.
    pub fn power_cycle(&mut self) {
        self.applet.power_cycle();
        self.exchange.reset();
    }

    /// The card was pulled out: a power cycle that also forgets a cached touch.
    pub fn unplugged(&mut self) {
        self.power_cycle();
        self.applet.forget_touch();
    }
}
