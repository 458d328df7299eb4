//! GET DATA and PUT DATA (SP 800-73-4 part 2, sections 3.1.2 and 3.3.2) for the
//! PIV data objects (part 1, table 3) and Yubico's objects (admin data 5FFF00,
//! attestation certificate 5FFF01, MS container map and roots 5FFF10-5FFF15).

use super::{respond, Applet};
use crate::apdu::{Command, Response, StatusWord};
use crate::tlv;

/// The discovery object (part 1, section 3.3.2): the PIV AID and a PIN usage
/// policy of "PIV Card Application PIN only", as a YubiKey returns it.
const DISCOVERY: [u8; 20] = [
    0x7E, 0x12, 0x4F, 0x0B, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x5F,
    0x2F, 0x02, 0x40, 0x00,
];
const TAG_DISCOVERY: u32 = 0x7E;
const TAG_BIT_GROUP: u32 = 0x7F61;
/// The largest object a YubiKey 5 stores.
const MAX_OBJECT: usize = 3052;

/// Objects that SP 800-73-4 marks "PIN" for read access: fingerprints, printed
/// information, facial image, iris images.
fn needs_pin_to_read(tag: u32) -> bool {
    matches!(tag, 0x5F_C1_03 | 0x5F_C1_08 | 0x5F_C1_09 | 0x5F_C1_21)
}

/// Tags a container may be stored under.
fn is_writable(tag: u32) -> bool {
    matches!(tag, 0x5F_C1_01..=0x5F_C1_23 | 0x5F_FF_00..=0x5F_FF_15)
}

/// Reads the 5C tag list: the tag of one object.
fn object_tag(data: &[u8]) -> Result<(u32, &[u8]), StatusWord> {
    let (first, rest) = tlv::parse_one(data).map_err(|_| StatusWord::INCORRECT_DATA)?;
    if first.tag != 0x5C || first.value.is_empty() || first.value.len() > 3 {
        return Err(StatusWord::INCORRECT_DATA);
    }
    let tag = first
        .value
        .iter()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    Ok((tag, rest))
}

impl Applet {
    /// GET DATA: `00 CB 3F FF 5C <tag>`, answered with `53 <object>`.
    pub(super) fn get_data(&mut self, cmd: &Command) -> Response {
        respond(self.get_data_inner(cmd))
    }

    fn get_data_inner(&self, cmd: &Command) -> Result<Response, StatusWord> {
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF) {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        let (tag, rest) = object_tag(&cmd.data)?;
        if !rest.is_empty() {
            return Err(StatusWord::INCORRECT_DATA);
        }
        if tag == TAG_DISCOVERY {
            return Ok(Response::ok(DISCOVERY.to_vec()));
        }
        if tag != TAG_BIT_GROUP && !is_writable(tag) {
            return Err(StatusWord::INCORRECT_DATA);
        }
        if needs_pin_to_read(tag) && !self.session.pin_verified {
            return Err(StatusWord::SECURITY_STATUS);
        }
        let object = self.state.objects.get(&tag).ok_or(StatusWord::NOT_FOUND)?;
        Ok(Response::ok(tlv::encode(0x53, object)))
    }

    /// PUT DATA: `00 DB 3F FF 5C <tag> 53 <object>`; an empty 53 deletes the object.
    /// Needs the management key.
    pub(super) fn put_data(&mut self, cmd: &Command) -> Response {
        respond(self.put_data_inner(cmd))
    }

    fn put_data_inner(&mut self, cmd: &Command) -> Result<Response, StatusWord> {
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF) {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        self.require_mgm()?;
        let (tag, rest) = object_tag(&cmd.data)?;
        let (body, trailing) = tlv::parse_one(rest).map_err(|_| StatusWord::INCORRECT_DATA)?;
        if body.tag != 0x53 || !trailing.is_empty() || !is_writable(tag) {
            return Err(StatusWord::INCORRECT_DATA);
        }
        if body.value.len() > MAX_OBJECT {
            return Err(StatusWord::NO_SPACE);
        }
        if body.value.is_empty() {
            self.state.objects.remove(&tag);
        } else {
            self.state.objects.insert(tag, body.value.to_vec());
        }
        self.mark_dirty();
        Ok(Response::ok_empty())
    }
}
