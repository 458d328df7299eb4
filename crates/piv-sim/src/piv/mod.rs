//! The PIV applet (NIST SP 800-73-4 part 2) as a YubiKey 5 implements it, one
//! module per instruction group; Yubico's own instructions are in the crate's `yubico` module.

mod auth;
mod data;
mod keys;
mod pin;

use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::apdu::{Command, Response, StatusWord};
use crate::state::{CardState, Origin, PinPolicy, SlotKey, TouchPolicy};
use crate::touch::TouchControl;
use crate::{tlv, yubico};

/// The full PIV application identifier (SP 800-73-4 part 1, section 2.2);
/// clients may SELECT any prefix of at least the 5-byte RID-based part.
pub const PIV_AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
];

/// Yubico's OTP applet. A YubiKey 4 has no GET SERIAL in PIV, so PIV clients
/// (libykpiv's `ykpiv_get_serial`, the `yubikey` crate) select this applet,
/// read the serial with `00 01 10 00` and select PIV again. libykpiv selects
/// it by its first 7 bytes, the `yubikey` crate by all 8.
pub const OTP_AID: [u8; 8] = [0xA0, 0x00, 0x00, 0x05, 0x27, 0x20, 0x01, 0x01];

/// How long a touch counts for a key with the "cached" touch policy.
const TOUCH_CACHE: Duration = Duration::from_secs(15);

pub(crate) mod ins {
    pub(crate) const SELECT: u8 = 0xA4;
    pub(crate) const GET_DATA: u8 = 0xCB;
    pub(crate) const PUT_DATA: u8 = 0xDB;
    pub(crate) const VERIFY: u8 = 0x20;
    pub(crate) const CHANGE_REFERENCE: u8 = 0x24;
    pub(crate) const RESET_RETRY: u8 = 0x2C;
    pub(crate) const GENERAL_AUTHENTICATE: u8 = 0x87;
    pub(crate) const GENERATE: u8 = 0x47;
    /// The OTP applet's "API request"; with P1 10 it reads the serial.
    pub(crate) const OTP_REQUEST: u8 = 0x01;
}

/// The applet: the card's persistent state plus what a session (power cycle or
/// SELECT) has established.
#[derive(Debug)]
pub struct Applet {
    pub(crate) state: CardState,
    pub(crate) session: Session,
    pub(crate) touch: TouchControl,
    /// When the card was last touched, for the "cached" touch policy. Like on a
    /// YubiKey, a reset by the reader does not forget it; unplugging does.
    last_touch: Option<Instant>,
    dirty: bool,
    /// A fault a test asked for: GET METADATA answers malformed data.
    pub(crate) malformed_metadata: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Session {
    pub(crate) selected: bool,
    /// The OTP applet is selected instead of PIV (firmware 4 only).
    pub(crate) otp_selected: bool,
    pub(crate) pin_verified: bool,
    /// A VERIFY came right before: one use of a PIN-always key is allowed.
    pub(crate) pin_fresh: bool,
    pub(crate) mgm_authenticated: bool,
    pub(crate) mgm_pending: Option<MgmPending>,
}

/// The first half of a management key authentication.
pub(crate) enum MgmPending {
    /// Mutual: the plaintext of the witness the card sent.
    Witness(Zeroizing<Vec<u8>>),
    /// External: the challenge the card sent.
    Challenge(Vec<u8>),
}

impl std::fmt::Debug for MgmPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The witness plaintext proves knowledge of the key: never print it.
        f.write_str(match self {
            Self::Witness(_) => "Witness(..)",
            Self::Challenge(_) => "Challenge(..)",
        })
    }
}

impl Applet {
    /// An applet over `state` whose touch sensor is `touch`.
    pub fn new(state: CardState, touch: TouchControl) -> Self {
        Self {
            state,
            session: Session::default(),
            touch,
            last_touch: None,
            dirty: false,
            malformed_metadata: false,
        }
    }

    /// The persistent state.
    pub fn state(&self) -> &CardState {
        &self.state
    }

    /// Power off, power on or reset: everything the session established is gone.
    pub fn power_cycle(&mut self) {
        self.session = Session::default();
    }

    /// Forgets a cached touch (the card was unplugged).
    pub fn forget_touch(&mut self) {
        self.last_touch = None;
    }

    /// Whether the persistent state changed since the last call.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub(crate) fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Runs one (already de-chained) command.
    pub fn process(&mut self, cmd: &Command) -> Response {
        let response = if cmd.ins == ins::SELECT {
            self.select(cmd)
        } else if self.session.otp_selected {
            self.otp_request(cmd)
        } else if !self.session.selected {
            // Nothing is selected after power-on: the instruction is unknown.
            StatusWord::INS_NOT_SUPPORTED.into()
        } else {
            match cmd.ins {
                ins::GET_DATA => self.get_data(cmd),
                ins::PUT_DATA => self.put_data(cmd),
                ins::VERIFY => self.verify(cmd),
                ins::CHANGE_REFERENCE => self.change_reference(cmd),
                ins::RESET_RETRY => self.reset_retry(cmd),
                ins::GENERAL_AUTHENTICATE => self.general_authenticate(cmd),
                ins::GENERATE => self.generate(cmd),
                _ => yubico::process(self, cmd),
            }
        };
        tracing::debug!(
            ins = format_args!("{:02X}", cmd.ins),
            p1 = format_args!("{:02X}", cmd.p1),
            p2 = format_args!("{:02X}", cmd.p2),
            lc = cmd.data.len(),
            sw = %response.sw,
            "apdu"
        );
        response
    }

    /// SELECT by AID (ISO 7816-4 section 11.2.2). Only PIV lives here, and on
    /// firmware 4 the OTP applet for its serial: other applets of a YubiKey
    /// (OATH, FIDO, and OTP on firmware 5) answer 6A82 and PIV stays selected.
    fn select(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0x04 {
            return StatusWord::INCORRECT_P1P2.into();
        }
        let aid = cmd.data.as_slice();
        if aid.len() >= 7 && OTP_AID.starts_with(aid) && self.state.version()[0] < 5 {
            // PIV is deselected, and its security state goes with it.
            self.session = Session {
                otp_selected: true,
                ..Session::default()
            };
            return Response::ok(self.otp_status());
        }
        if aid.len() < 5 || !PIV_AID.starts_with(aid) {
            return StatusWord::NOT_FOUND.into();
        }
        // Firmware 5: selecting PIV while it is selected keeps the session
        // (OpenSC re-selects before every operation); the first SELECT after
        // power-on starts one. Firmware 4: every SELECT starts a new session,
        // forgetting a verified PIN and an authenticated management key, which
        // libykpiv relies on to read the PIN tries with an empty VERIFY
        // (`ykpiv_get_pin_retries`: "force a re-select to unverify").
        if !self.session.selected || self.state.version()[0] < 5 {
            self.session = Session {
                selected: true,
                ..Session::default()
            };
        }
        // Application property template (SP 800-73-4 part 2, table 3).
        let mut apt = Vec::new();
        tlv::push(&mut apt, 0x4F, &PIV_AID[5..]);
        let mut authority = Vec::new();
        tlv::push(&mut authority, 0x4F, &PIV_AID[..5]);
        tlv::push(&mut apt, 0x79, &authority);
        Response::ok(tlv::encode(0x61, &apt))
    }

    /// The OTP applet's status, as its SELECT returns it: firmware version,
    /// programming sequence, touch level.
    fn otp_status(&self) -> Vec<u8> {
        let mut status = self.state.version().to_vec();
        status.extend_from_slice(&[0, 0, 0]);
        status
    }

    /// The one OTP applet request PIV clients send: `00 01 10 00`, the serial
    /// as four big-endian bytes.
    fn otp_request(&self, cmd: &Command) -> Response {
        match (cmd.ins, cmd.p1) {
            (ins::OTP_REQUEST, 0x10) => Response::ok(self.state.serial().to_be_bytes().to_vec()),
            _ => StatusWord::INS_NOT_SUPPORTED.into(),
        }
    }

    /// 6982 unless the management key was authenticated in this session.
    pub(crate) fn require_mgm(&self) -> Result<(), StatusWord> {
        if self.session.mgm_authenticated {
            Ok(())
        } else {
            Err(StatusWord::SECURITY_STATUS)
        }
    }

    /// Waits for a touch if the policy asks for one; 6985 when none comes.
    pub(crate) fn require_touch(&mut self, policy: TouchPolicy) -> Result<(), StatusWord> {
        let cached = matches!(policy, TouchPolicy::Cached)
            && self.last_touch.is_some_and(|t| t.elapsed() < TOUCH_CACHE);
        match policy {
            TouchPolicy::Never => Ok(()),
            _ if cached => Ok(()),
            _ => {
                if self.touch.wait_for_touch() {
                    self.last_touch = Some(Instant::now());
                    Ok(())
                } else {
                    Err(StatusWord::CONDITIONS)
                }
            }
        }
    }

    /// Checks the PIN policy of a key before it is used.
    pub(crate) fn require_pin(&self, policy: PinPolicy) -> Result<(), StatusWord> {
        let ok = match policy {
            PinPolicy::Never => true,
            PinPolicy::Once => self.session.pin_verified,
            PinPolicy::Always => self.session.pin_verified && self.session.pin_fresh,
        };
        if ok {
            Ok(())
        } else {
            Err(StatusWord::SECURITY_STATUS)
        }
    }

    /// Puts a key into a slot.
    pub(crate) fn store_key(
        &mut self,
        slot: u8,
        key: crate::crypto::StoredKey,
        (pin_policy, touch_policy): (PinPolicy, TouchPolicy),
        origin: Origin,
    ) {
        self.state.slots.insert(
            slot,
            SlotKey {
                key,
                pin_policy,
                touch_policy,
                origin,
            },
        );
        self.mark_dirty();
    }
}

/// Slots that hold asymmetric keys: 9A, 9C, 9D, 9E, the retired 82-95 and attestation F9.
pub(crate) fn is_key_slot(slot: u8) -> bool {
    matches!(slot, 0x9A | 0x9C | 0x9D | 0x9E | 0x82..=0x95 | 0xF9)
}

/// Reads the optional PIN (AA) and touch (AB) policy bytes of GENERATE and IMPORT;
/// 0 or absent means the slot's default.
pub(crate) fn policies(
    slot: u8,
    tlvs: &[tlv::Tlv<'_>],
) -> Result<(PinPolicy, TouchPolicy), StatusWord> {
    let one = |tag| match tlv::find(tlvs, tag) {
        None => Ok(0),
        Some([b]) => Ok(*b),
        Some(_) => Err(StatusWord::INCORRECT_DATA),
    };
    let pin = match one(0xAA)? {
        0 => PinPolicy::default_for(slot),
        b => PinPolicy::from_byte(b).ok_or(StatusWord::INCORRECT_DATA)?,
    };
    let touch = TouchPolicy::from_byte(one(0xAB)?).ok_or(StatusWord::INCORRECT_DATA)?;
    Ok((pin, touch))
}

/// Turns `Result<Response, StatusWord>` into a response.
pub(crate) fn respond(result: Result<Response, StatusWord>) -> Response {
    result.unwrap_or_else(Response::from)
}
