//! GENERAL AUTHENTICATE (SP 800-73-4 part 2, section 3.2.4; dynamic
//! authentication template 7C, part 2 table 7).
//!
//! Key reference 9B is the management key: mutual authentication (80 empty →
//! witness; 80 decrypted witness + 81 challenge → 82 encrypted challenge) or
//! external authentication (81 empty → challenge; 82 response). Any other key
//! reference is a slot key: 82 empty + 81 data signs (raw RSA or ECDSA over a
//! digest), 82 empty + 85 point does ECDH; the slot's PIN and touch policies apply.

use zeroize::Zeroizing;

use super::{is_key_slot, respond, Applet, MgmPending};
use crate::apdu::{Command, Response, StatusWord};
use crate::crypto::{self, CryptoError};
use crate::state::PinPolicy;
use crate::tlv::{self, Tlv};

const SLOT_MGM: u8 = 0x9B;
const TAG_WITNESS: u32 = 0x80;
const TAG_CHALLENGE: u32 = 0x81;
const TAG_RESPONSE: u32 = 0x82;
const TAG_EXPONENTIATION: u32 = 0x85;

fn template(tag: u32, value: &[u8]) -> Response {
    Response::ok(tlv::encode(0x7C, &tlv::encode(tag, value)))
}

impl Applet {
    pub(super) fn general_authenticate(&mut self, cmd: &Command) -> Response {
        respond(self.general_authenticate_inner(cmd))
    }

    fn general_authenticate_inner(&mut self, cmd: &Command) -> Result<Response, StatusWord> {
        let (outer, rest) = tlv::parse_one(&cmd.data).map_err(|_| StatusWord::INCORRECT_DATA)?;
        if outer.tag != 0x7C || !rest.is_empty() {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let items = tlv::parse(outer.value).map_err(|_| StatusWord::INCORRECT_DATA)?;
        if cmd.p2 == SLOT_MGM {
            self.authenticate_mgm(cmd.p1, &items)
        } else if is_key_slot(cmd.p2) {
            self.use_slot_key(cmd.p1, cmd.p2, &items)
        } else {
            Err(StatusWord::INCORRECT_P1P2)
        }
    }

    fn authenticate_mgm(&mut self, alg: u8, items: &[Tlv<'_>]) -> Result<Response, StatusWord> {
        let mgm = self.state.mgm.clone();
        if alg != mgm.algorithm.byte() {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        let block = mgm.algorithm.block_len();
        let cipher = |data: &[u8], encrypt: bool| {
            crypto::mgm_block(mgm.algorithm, &mgm.key, data, encrypt)
                .ok_or(StatusWord::INCORRECT_DATA)
        };
        let witness = tlv::find(items, TAG_WITNESS);
        let challenge = tlv::find(items, TAG_CHALLENGE);
        let response = tlv::find(items, TAG_RESPONSE);
        match (witness, challenge, response) {
            // Mutual, step 1: the card's witness, encrypted.
            (Some([]), None, None) => {
                self.session.mgm_authenticated = false;
                let plain = Zeroizing::new(crypto::random_bytes(block));
                let encrypted = cipher(&plain, true)?;
                self.session.mgm_pending = Some(MgmPending::Witness(plain));
                Ok(template(TAG_WITNESS, &encrypted))
            }
            // Mutual, step 2: the host decrypted the witness and sends its challenge.
            (Some(decrypted), Some(host_challenge), None) => {
                let Some(MgmPending::Witness(expected)) = self.session.mgm_pending.take() else {
                    return Err(StatusWord::CONDITIONS);
                };
                if decrypted.len() != block
                    || host_challenge.len() != block
                    || !constant_time_eq(decrypted, &expected)
                {
                    return Err(StatusWord::SECURITY_STATUS);
                }
                self.require_touch(touch_policy_of_mgm(mgm.touch_required))?;
                self.session.mgm_authenticated = true;
                Ok(template(TAG_RESPONSE, &cipher(host_challenge, true)?))
            }
            // External, step 1: the card's challenge in the clear.
            (None, Some([]), None) => {
                self.session.mgm_authenticated = false;
                let challenge = crypto::random_bytes(block);
                self.session.mgm_pending = Some(MgmPending::Challenge(challenge.clone()));
                Ok(template(TAG_CHALLENGE, &challenge))
            }
            // External, step 2: the host's encryption of the challenge.
            (None, None, Some(host_response)) if !host_response.is_empty() => {
                let Some(MgmPending::Challenge(challenge)) = self.session.mgm_pending.take() else {
                    return Err(StatusWord::CONDITIONS);
                };
                let expected = cipher(&challenge, true)?;
                if !constant_time_eq(host_response, &expected) {
                    return Err(StatusWord::SECURITY_STATUS);
                }
                self.require_touch(touch_policy_of_mgm(mgm.touch_required))?;
                self.session.mgm_authenticated = true;
                Ok(Response::ok_empty())
            }
            _ => Err(StatusWord::INCORRECT_DATA),
        }
    }

    fn use_slot_key(
        &mut self,
        alg: u8,
        slot: u8,
        items: &[Tlv<'_>],
    ) -> Result<Response, StatusWord> {
        let slot_key = self
            .state
            .slots
            .get(&slot)
            .cloned()
            .ok_or(StatusWord::NOT_FOUND)?;
        if alg != slot_key.key.algorithm.byte() {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        if tlv::find(items, TAG_RESPONSE) != Some(&[]) {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let challenge = tlv::find(items, TAG_CHALLENGE);
        let point = tlv::find(items, TAG_EXPONENTIATION);
        if challenge.is_some() == point.is_some() {
            return Err(StatusWord::INCORRECT_DATA);
        }
        self.require_pin(slot_key.pin_policy)?;
        self.require_touch(slot_key.touch_policy)?;
        if slot_key.pin_policy == PinPolicy::Always {
            self.session.pin_fresh = false;
        }
        let result = match (challenge, point) {
            (Some(data), _) => slot_key.key.sign(data),
            (_, Some(peer)) => slot_key.key.ecdh(peer),
            (None, None) => return Err(StatusWord::INCORRECT_DATA),
        };
        match result {
            Ok(out) => Ok(template(TAG_RESPONSE, &out)),
            Err(CryptoError::BadInput) => Err(StatusWord::INCORRECT_DATA),
            Err(e) => {
                tracing::error!(slot = format_args!("{slot:02X}"), error = %e, "private key operation failed");
                Err(StatusWord::UNKNOWN)
            }
        }
    }
}

fn touch_policy_of_mgm(touch_required: bool) -> crate::state::TouchPolicy {
    if touch_required {
        crate::state::TouchPolicy::Always
    } else {
        crate::state::TouchPolicy::Never
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
