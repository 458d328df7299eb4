//! Yubico's PIV extensions
//! (<https://docs.yubico.com/yesdk/users-manual/application-piv/apdu/>):
//! GET VERSION (FD), GET SERIAL (F8), SET MANAGEMENT KEY (FF), IMPORT KEY (FE),
//! GET METADATA (F7), ATTEST (F9), SET PIN RETRIES (FA) and RESET (FB).

use zeroize::Zeroizing;

use crate::apdu::{Command, Response, StatusWord};
use crate::crypto::{self, Algorithm, AttestedKey, MgmAlgorithm, StoredKey};
use crate::piv::{is_key_slot, policies, respond, Applet};
use crate::state::{
    MgmKey, Origin, Secret, DEFAULT_PIN, DEFAULT_PUK, OBJ_ATTESTATION, SLOT_ATTESTATION,
};
use crate::tlv;

const INS_GET_VERSION: u8 = 0xFD;
const INS_GET_SERIAL: u8 = 0xF8;
const INS_SET_MGM_KEY: u8 = 0xFF;
const INS_IMPORT_KEY: u8 = 0xFE;
const INS_GET_METADATA: u8 = 0xF7;
const INS_ATTEST: u8 = 0xF9;
const INS_SET_PIN_RETRIES: u8 = 0xFA;
const INS_RESET: u8 = 0xFB;

/// Runs a Yubico instruction; anything else is 6D00, and so are the
/// instructions the card's firmware predates: GET SERIAL came with 5.0 (a
/// YubiKey 4 gives its serial through the OTP applet) and GET METADATA with
/// 5.3 (clients such as the `yubikey` crate and ykman fall back on older
/// firmware when they see 6D00).
pub(crate) fn process(applet: &mut Applet, cmd: &Command) -> Response {
    let version = applet.state.version();
    respond(match cmd.ins {
        INS_GET_SERIAL if version < [5, 0, 0] => Err(StatusWord::INS_NOT_SUPPORTED),
        INS_GET_METADATA if version < [5, 3, 0] => Err(StatusWord::INS_NOT_SUPPORTED),
        INS_GET_VERSION => Ok(Response::ok(applet.state.version().to_vec())),
        INS_GET_SERIAL => Ok(Response::ok(applet.state.serial().to_be_bytes().to_vec())),
        INS_SET_MGM_KEY => set_mgm_key(applet, cmd),
        INS_IMPORT_KEY => import_key(applet, cmd),
        INS_GET_METADATA => metadata(applet, cmd),
        INS_ATTEST => attest(applet, cmd),
        INS_SET_PIN_RETRIES => set_pin_retries(applet, cmd),
        INS_RESET => reset(applet, cmd),
        _ => Err(StatusWord::INS_NOT_SUPPORTED),
    })
}

/// `00 FF FF FE|FF <alg> 9B <len> <key>`: P2 FF makes the key require a touch.
fn set_mgm_key(applet: &mut Applet, cmd: &Command) -> Result<Response, StatusWord> {
    let touch_required = match (cmd.p1, cmd.p2) {
        (0xFF, 0xFE) => false,
        (0xFF, 0xFF) => true,
        _ => return Err(StatusWord::INCORRECT_P1P2),
    };
    applet.require_mgm()?;
    let [alg, 0x9B, len, key @ ..] = cmd.data.as_slice() else {
        return Err(StatusWord::INCORRECT_DATA);
    };
    let algorithm = MgmAlgorithm::from_byte(*alg).ok_or(StatusWord::INCORRECT_DATA)?;
    if usize::from(*len) != key.len() || key.len() != algorithm.key_len() {
        return Err(StatusWord::INCORRECT_DATA);
    }
    applet.state.mgm = MgmKey {
        algorithm,
        key: Zeroizing::new(key.to_vec()),
        touch_required,
    };
    applet.mark_dirty();
    Ok(Response::ok_empty())
}

/// `00 FE <alg> <slot>` with 01 p, 02 q, 03 dp, 04 dq, 05 qinv (RSA) or 06 d (ECC),
/// and optional AA/AB policies. Needs the management key.
fn import_key(applet: &mut Applet, cmd: &Command) -> Result<Response, StatusWord> {
    let slot = cmd.p2;
    if !is_key_slot(slot) {
        return Err(StatusWord::INCORRECT_P1P2);
    }
    let algorithm = Algorithm::from_byte(cmd.p1)
        .filter(|a| applet.state.version() >= a.since_firmware())
        .ok_or(StatusWord::INCORRECT_P1P2)?;
    applet.require_mgm()?;
    let items = tlv::parse(&cmd.data).map_err(|_| StatusWord::INCORRECT_DATA)?;
    let policies = policies(slot, &items)?;
    let key = match algorithm {
        Algorithm::Rsa1024 | Algorithm::Rsa2048 | Algorithm::Rsa3072 | Algorithm::Rsa4096 => {
            let (Some(p), Some(q)) = (tlv::find(&items, 0x01), tlv::find(&items, 0x02)) else {
                return Err(StatusWord::INCORRECT_DATA);
            };
            StoredKey::import_rsa(algorithm, p, q)
        }
        Algorithm::EccP256 | Algorithm::EccP384 => {
            let d = tlv::find(&items, 0x06).ok_or(StatusWord::INCORRECT_DATA)?;
            StoredKey::import_ec(algorithm, d)
        }
    }
    .map_err(|_| StatusWord::INCORRECT_DATA)?;
    applet.store_key(slot, key, policies, Origin::Imported);
    Ok(Response::ok_empty())
}

/// `00 F7 00 <slot>`: 01 algorithm, 02 policies, 03 origin, 04 public key,
/// 05 is-default, 06 retries (total, left).
fn metadata(applet: &mut Applet, cmd: &Command) -> Result<Response, StatusWord> {
    if cmd.p1 != 0 {
        return Err(StatusWord::INCORRECT_P1P2);
    }
    if applet.malformed_metadata {
        // An algorithm TLV without its byte: what a card with a firmware
        // bug, or a damaged transfer, could send.
        return Ok(Response::ok(vec![0x01, 0x00]));
    }
    let state = &applet.state;
    let mut out = Vec::new();
    let pin_puk = |out: &mut Vec<u8>, secret: &Secret, default: &[u8]| {
        tlv::push(out, 0x01, &[0xFF]);
        tlv::push(out, 0x05, &[u8::from(secret.is_default(default))]);
        tlv::push(out, 0x06, &[secret.max_retries, secret.retries_left]);
    };
    match cmd.p2 {
        0x80 => pin_puk(&mut out, &state.pin, DEFAULT_PIN),
        0x81 => pin_puk(&mut out, &state.puk, DEFAULT_PUK),
        0x9B => {
            let mgm = &state.mgm;
            tlv::push(&mut out, 0x01, &[mgm.algorithm.byte()]);
            let touch = if mgm.touch_required { 2 } else { 1 };
            tlv::push(&mut out, 0x02, &[0x00, touch]);
            tlv::push(&mut out, 0x05, &[u8::from(mgm.is_default())]);
        }
        slot if is_key_slot(slot) => {
            let key = state.slots.get(&slot).ok_or(StatusWord::NOT_FOUND)?;
            tlv::push(&mut out, 0x01, &[key.key.algorithm.byte()]);
            tlv::push(
                &mut out,
                0x02,
                &[key.pin_policy.byte(), key.touch_policy.byte()],
            );
            let origin = match key.origin {
                Origin::Generated => 1,
                Origin::Imported => 2,
            };
            tlv::push(&mut out, 0x03, &[origin]);
            let public = key.key.public_tlvs().map_err(|_| StatusWord::UNKNOWN)?;
            tlv::push(&mut out, 0x04, &public);
        }
        _ => return Err(StatusWord::INCORRECT_P1P2),
    }
    Ok(Response::ok(out))
}

/// `00 F9 <slot> 00`: an X.509 attestation statement for a key the card
/// generated, signed by the key in slot F9.
fn attest(applet: &mut Applet, cmd: &Command) -> Result<Response, StatusWord> {
    let slot = cmd.p1;
    if cmd.p2 != 0 || !is_key_slot(slot) || slot == SLOT_ATTESTATION {
        return Err(StatusWord::INCORRECT_P1P2);
    }
    let state = &applet.state;
    let key = state.slots.get(&slot).ok_or(StatusWord::NOT_FOUND)?;
    if key.origin != Origin::Generated {
        return Err(StatusWord::INCORRECT_DATA);
    }
    let (Some(authority), Some(authority_cert)) = (
        state.slots.get(&SLOT_ATTESTATION),
        state.objects.get(&OBJ_ATTESTATION),
    ) else {
        return Err(StatusWord::INCORRECT_DATA);
    };
    let attested = AttestedKey {
        slot,
        key: &key.key,
        pin_policy: key.pin_policy.byte(),
        touch_policy: key.touch_policy.byte(),
    };
    crypto::attestation_certificate(
        &authority.key,
        authority_cert,
        attested,
        state.serial(),
        state.version(),
    )
    .map(Response::ok)
    .map_err(|e| {
        tracing::error!(error = %e, "attestation failed");
        StatusWord::INCORRECT_DATA
    })
}

/// `00 FA <pin tries> <puk tries>`: needs the management key and the PIN;
/// sets both counters and puts PIN and PUK back to their defaults.
fn set_pin_retries(applet: &mut Applet, cmd: &Command) -> Result<Response, StatusWord> {
    if cmd.p1 == 0 || cmd.p2 == 0 {
        return Err(StatusWord::INCORRECT_P1P2);
    }
    applet.require_mgm()?;
    if !applet.session.pin_verified {
        return Err(StatusWord::SECURITY_STATUS);
    }
    applet.state.pin = Secret::new(DEFAULT_PIN, cmd.p1);
    applet.state.puk = Secret::new(DEFAULT_PUK, cmd.p2);
    applet.session.pin_verified = false;
    applet.session.pin_fresh = false;
    applet.mark_dirty();
    Ok(Response::ok_empty())
}

/// `00 FB 00 00`: factory reset, refused (6985) unless PIN and PUK are both blocked.
fn reset(applet: &mut Applet, cmd: &Command) -> Result<Response, StatusWord> {
    if cmd.p1 != 0 || cmd.p2 != 0 {
        return Err(StatusWord::INCORRECT_P1P2);
    }
    if !(applet.state.pin.is_blocked() && applet.state.puk.is_blocked()) {
        return Err(StatusWord::CONDITIONS);
    }
    applet.state.factory_reset();
    applet.session.pin_verified = false;
    applet.session.pin_fresh = false;
    applet.session.mgm_authenticated = false;
    applet.session.mgm_pending = None;
    applet.mark_dirty();
    Ok(Response::ok_empty())
}
