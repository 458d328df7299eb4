//! GENERATE ASYMMETRIC KEY PAIR (SP 800-73-4 part 2, section 3.3.2), with
//! Yubico's PIN policy (AA) and touch policy (AB) tags in the control template AC.

use super::{is_key_slot, policies, respond, Applet};
use crate::apdu::{Command, Response, StatusWord};
use crate::crypto::{Algorithm, StoredKey};
use crate::state::Origin;
use crate::tlv;

impl Applet {
    /// `00 47 00 <slot> AC { 80 <alg> [AA <pin policy>] [AB <touch policy>] }`,
    /// answered with the public key in template 7F49. Needs the management key.
    pub(super) fn generate(&mut self, cmd: &Command) -> Response {
        respond(self.generate_inner(cmd))
    }

    fn generate_inner(&mut self, cmd: &Command) -> Result<Response, StatusWord> {
        if cmd.p1 != 0 || !is_key_slot(cmd.p2) {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        self.require_mgm()?;
        let (control, rest) = tlv::parse_one(&cmd.data).map_err(|_| StatusWord::INCORRECT_DATA)?;
        if control.tag != 0xAC || !rest.is_empty() {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let items = tlv::parse(control.value).map_err(|_| StatusWord::INCORRECT_DATA)?;
        let algorithm = match tlv::find(&items, 0x80) {
            Some([b]) => Algorithm::from_byte(*b)
                .filter(|a| self.state.version() >= a.since_firmware())
                .ok_or(StatusWord::INCORRECT_DATA)?,
            _ => return Err(StatusWord::INCORRECT_DATA),
        };
        let policies = policies(cmd.p2, &items)?;
        let key = StoredKey::generate(algorithm).map_err(|e| {
            tracing::error!(error = %e, "key generation failed");
            StatusWord::MEMORY_FAILURE
        })?;
        let public = key.public_tlvs().map_err(|_| StatusWord::UNKNOWN)?;
        self.store_key(cmd.p2, key, policies, Origin::Generated);
        Ok(Response::ok(tlv::encode(0x7F49, &public)))
    }
}
