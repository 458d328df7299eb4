//! VERIFY, CHANGE REFERENCE DATA and RESET RETRY COUNTER (SP 800-73-4 part 2,
//! sections 3.2.1, 3.2.2 and 3.2.3) for the PIV PIN (key reference 80) and PUK (81).
//!
//! As on a YubiKey: each wrong value costs one try and answers 63Cx with the
//! tries left (63C0 on the last one); a blocked PIN or PUK answers 6983; a new
//! PIN or PUK must be 6 to 8 bytes, padded to 8 with 0xFF.

use super::{respond, Applet};
use crate::apdu::{Command, Response, StatusWord};
use crate::state::Secret;

const REF_PIN: u8 = 0x80;
const REF_PUK: u8 = 0x81;

/// Accepts a new PIN or PUK: 6 to 8 bytes, then only 0xFF padding.
fn valid_new_value(padded: &[u8]) -> bool {
    let len = padded
        .iter()
        .position(|&b| b == 0xFF)
        .unwrap_or(padded.len());
    (6..=8).contains(&len) && padded[len..].iter().all(|&b| b == 0xFF)
}

/// Checks `candidate` against `secret`, counting a failure. Returns whether it matched.
fn check(secret: &mut Secret, candidate: &[u8]) -> Result<(), StatusWord> {
    if secret.is_blocked() {
        return Err(StatusWord::AUTH_BLOCKED);
    }
    if secret.matches(candidate) {
        secret.retries_left = secret.max_retries;
        Ok(())
    } else {
        secret.retries_left = secret.retries_left.saturating_sub(1);
        Err(StatusWord::verify_failed(secret.retries_left))
    }
}

impl Applet {
    /// VERIFY: P2 80 with 8 bytes checks the PIN; without data it reports the
    /// state (9000 verified, 63Cx not, 6983 blocked); P1 FF forgets the verification.
    pub(super) fn verify(&mut self, cmd: &Command) -> Response {
        respond(self.verify_inner(cmd))
    }

    fn verify_inner(&mut self, cmd: &Command) -> Result<Response, StatusWord> {
        if cmd.p2 != REF_PIN {
            return Err(StatusWord::REFERENCE_NOT_FOUND);
        }
        match (cmd.p1, cmd.data.is_empty()) {
            (0xFF, true) => {
                self.session.pin_verified = false;
                self.session.pin_fresh = false;
                return Ok(Response::ok_empty());
            }
            (0x00, _) => {}
            _ => return Err(StatusWord::INCORRECT_P1P2),
        }
        if cmd.data.is_empty() {
            return if self.state.pin.is_blocked() {
                Err(StatusWord::AUTH_BLOCKED)
            } else if self.session.pin_verified {
                Ok(Response::ok_empty())
            } else {
                Err(StatusWord::verify_failed(self.state.pin.retries_left))
            };
        }
        if cmd.data.len() != 8 {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let before = self.state.pin.retries_left;
        let result = check(&mut self.state.pin, &cmd.data);
        if self.state.pin.retries_left != before {
            self.mark_dirty();
        }
        match result {
            Ok(()) => {
                self.session.pin_verified = true;
                self.session.pin_fresh = true;
                Ok(Response::ok_empty())
            }
            Err(sw) => {
                self.session.pin_verified = false;
                self.session.pin_fresh = false;
                Err(sw)
            }
        }
    }

    /// CHANGE REFERENCE DATA: P2 80 (PIN) or 81 (PUK), data old(8) || new(8).
    pub(super) fn change_reference(&mut self, cmd: &Command) -> Response {
        respond(self.change_reference_inner(cmd))
    }

    fn change_reference_inner(&mut self, cmd: &Command) -> Result<Response, StatusWord> {
        if cmd.p1 != 0 {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        let is_pin = match cmd.p2 {
            REF_PIN => true,
            REF_PUK => false,
            _ => return Err(StatusWord::REFERENCE_NOT_FOUND),
        };
        if cmd.data.len() != 16 {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let (old, new) = cmd.data.split_at(8);
        let secret = if is_pin {
            &mut self.state.pin
        } else {
            &mut self.state.puk
        };
        if secret.is_blocked() {
            return Err(StatusWord::AUTH_BLOCKED);
        }
        if !valid_new_value(new) {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let result = check(secret, old);
        if result.is_ok() {
            secret.value = zeroize::Zeroizing::new(new.to_vec());
        }
        self.mark_dirty();
        if is_pin {
            self.session.pin_verified = result.is_ok();
            self.session.pin_fresh = false;
        }
        result.map(|()| Response::ok_empty())
    }

    /// RESET RETRY COUNTER: P2 80, data PUK(8) || new PIN(8); unblocks the PIN.
    pub(super) fn reset_retry(&mut self, cmd: &Command) -> Response {
        respond(self.reset_retry_inner(cmd))
    }

    fn reset_retry_inner(&mut self, cmd: &Command) -> Result<Response, StatusWord> {
        if cmd.p1 != 0 {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        if cmd.p2 != REF_PIN {
            return Err(StatusWord::REFERENCE_NOT_FOUND);
        }
        if cmd.data.len() != 16 {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let (puk, new_pin) = cmd.data.split_at(8);
        if self.state.puk.is_blocked() {
            return Err(StatusWord::AUTH_BLOCKED);
        }
        if !valid_new_value(new_pin) {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let result = check(&mut self.state.puk, puk);
        self.mark_dirty();
        result?;
        let pin = &mut self.state.pin;
        pin.value = zeroize::Zeroizing::new(new_pin.to_vec());
        pin.retries_left = pin.max_retries;
        self.session.pin_verified = false;
        self.session.pin_fresh = false;
        Ok(Response::ok_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::valid_new_value;

    #[test]
    fn new_values_are_six_to_eight_bytes() {
        assert!(valid_new_value(b"123456\xFF\xFF"));
        assert!(valid_new_value(b"12345678"));
        assert!(!valid_new_value(b"12345\xFF\xFF\xFF"));
        assert!(!valid_new_value(b"123456\xFF7"));
    }
}
