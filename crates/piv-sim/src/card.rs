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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{mgm_block, MgmAlgorithm};
    use crate::state::DEFAULT_MGM_KEY;

    /// Sends `apdu` and collects a long answer with GET RESPONSE; returns
    /// the data and the final status word.
    fn exchange(card: &mut VirtualCard, apdu: &[u8]) -> (Vec<u8>, u16) {
        let mut data = Vec::new();
        let mut answer = card.transmit(apdu);
        loop {
            let split = answer.len() - 2;
            data.extend_from_slice(&answer[..split]);
            let sw = u16::from_be_bytes([answer[split], answer[split + 1]]);
            if sw & 0xFF00 != 0x6100 {
                return (data, sw);
            }
            answer = card.transmit(&[0x00, 0xC0, 0x00, 0x00, 0x00]);
        }
    }

    /// SELECT PIV, then external authentication with the factory management key.
    fn authenticate(card: &mut VirtualCard) {
        let select = [0x00, 0xA4, 0x04, 0x00, 0x05, 0xA0, 0x00, 0x00, 0x03, 0x08];
        assert_eq!(exchange(card, &select).1, 0x9000);
        let (answer, sw) = exchange(
            card,
            &[0x00, 0x87, 0x03, 0x9B, 0x04, 0x7C, 0x02, 0x81, 0x00],
        );
        assert_eq!(sw, 0x9000);
        let challenge = &answer[4..12];
        let response = mgm_block(MgmAlgorithm::TripleDes, &DEFAULT_MGM_KEY, challenge, true)
            .unwrap_or_default();
        let mut apdu = vec![0x00, 0x87, 0x03, 0x9B, 0x0C, 0x7C, 0x0A, 0x82, 0x08];
        apdu.extend_from_slice(&response);
        assert_eq!(exchange(card, &apdu).1, 0x9000);
    }

    const GENERATE_RSA3072_9D: [u8; 10] =
        [0x00, 0x47, 0x00, 0x9D, 0x05, 0xAC, 0x03, 0x80, 0x01, 0x05];

    #[test]
    fn rsa_3072_keys_need_firmware_5_7() -> Result<(), Error> {
        let mut old = VirtualCard::new(CardConfig::default())?;
        authenticate(&mut old);
        assert_eq!(exchange(&mut old, &GENERATE_RSA3072_9D).1, 0x6A80);

        let mut card = VirtualCard::new(CardConfig {
            version: [5, 7, 1],
            ..CardConfig::default()
        })?;
        authenticate(&mut card);
        let (public, sw) = exchange(&mut card, &GENERATE_RSA3072_9D);
        assert_eq!(sw, 0x9000);
        // 7F49 82 len { 81 82 01 80 <384-byte modulus> 82 03 <exponent> }
        assert_eq!(&public[..2], &[0x7F, 0x49]);
        assert_eq!(&public[5..9], &[0x81, 0x82, 0x01, 0x80]);
        let (metadata, sw) = exchange(&mut card, &[0x00, 0xF7, 0x00, 0x9D, 0x00]);
        assert_eq!(sw, 0x9000);
        assert_eq!(&metadata[..3], &[0x01, 0x01, 0x05]);
        Ok(())
    }
}
