//! The applet driven APDU by APDU, without pcscd: instructions no installed
//! tool exercises (AES management keys, IMPORT KEY, SET PIN RETRIES), transport
//! details (chaining, GET RESPONSE, extended lengths), robustness against
//! garbage, and that no PIN reaches the logs.

use std::io::Write;
use std::sync::{Arc, Mutex};

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use piv_sim::tlv;
use piv_sim::{CardConfig, VirtualCard};
use rand::{Rng, RngCore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SELECT: &[u8] = &[0x00, 0xA4, 0x04, 0x00, 0x05, 0xA0, 0x00, 0x00, 0x03, 0x08];
const DEFAULT_3DES: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];

/// Sends an APDU; returns (data, SW).
fn send(card: &mut VirtualCard, apdu: &[u8]) -> (Vec<u8>, u16) {
    let mut r = card.transmit(apdu);
    assert!(r.len() >= 2, "response without status word");
    let sw = u16::from_be_bytes([r[r.len() - 2], r[r.len() - 1]]);
    r.truncate(r.len() - 2);
    (r, sw)
}

fn apdu(cla: u8, ins: u8, p1: u8, p2: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![cla, ins, p1, p2];
    if !data.is_empty() {
        out.push(u8::try_from(data.len()).unwrap_or(0));
        out.extend_from_slice(data);
    }
    out
}

fn fresh_card() -> Result<VirtualCard, piv_sim::Error> {
    let mut card = VirtualCard::new(CardConfig::default())?;
    assert_eq!(send(&mut card, SELECT).1, 0x9000);
    Ok(card)
}

fn cipher(alg: u8, key: &[u8], block: &[u8], encrypt: bool) -> Vec<u8> {
    fn run<C: BlockEncrypt + BlockDecrypt + KeyInit>(
        key: &[u8],
        block: &[u8],
        enc: bool,
    ) -> Vec<u8> {
        let Ok(c) = C::new_from_slice(key) else {
            return Vec::new();
        };
        let mut b = GenericArray::clone_from_slice(block);
        if enc {
            c.encrypt_block(&mut b);
        } else {
            c.decrypt_block(&mut b);
        }
        b.to_vec()
    }
    match alg {
        0x03 => run::<des::TdesEde3>(key, block, encrypt),
        0x08 => run::<aes::Aes128>(key, block, encrypt),
        0x0A => run::<aes::Aes192>(key, block, encrypt),
        _ => run::<aes::Aes256>(key, block, encrypt),
    }
}

/// Mutual authentication with the management key as yubico-piv-tool does it;
/// returns the final status word.
fn authenticate(card: &mut VirtualCard, alg: u8, key: &[u8]) -> u16 {
    let (resp, sw) = send(card, &apdu(0, 0x87, alg, 0x9B, &[0x7C, 0x02, 0x80, 0x00]));
    if sw != 0x9000 {
        return sw;
    }
    let Ok(outer) = tlv::parse(&resp) else {
        return 0;
    };
    let Some(inner) = outer.first().and_then(|t| tlv::parse(t.value).ok()) else {
        return 0;
    };
    let Some(witness) = tlv::find(&inner, 0x80) else {
        return 0;
    };
    let decrypted = cipher(alg, key, witness, false);
    let mut challenge = vec![0u8; witness.len()];
    rand::thread_rng().fill_bytes(&mut challenge);
    let mut body = Vec::new();
    tlv::push(&mut body, 0x80, &decrypted);
    tlv::push(&mut body, 0x81, &challenge);
    let (resp, sw) = send(card, &apdu(0, 0x87, alg, 0x9B, &tlv::encode(0x7C, &body)));
    if sw != 0x9000 {
        return sw;
    }
    // The card proves it knows the key too.
    let expected = tlv::encode(
        0x7C,
        &tlv::encode(0x82, &cipher(alg, key, &challenge, true)),
    );
    assert_eq!(resp, expected, "card's response to the host challenge");
    sw
}

#[test]
fn aes_management_keys_authenticate_as_on_firmware_5_4() -> TestResult {
    let mut card = fresh_card()?;
    // Before authentication PUT DATA is refused.
    let put = apdu(
        0,
        0xDB,
        0x3F,
        0xFF,
        &[0x5C, 0x03, 0x5F, 0xC1, 0x02, 0x53, 0x01, 0xAA],
    );
    assert_eq!(send(&mut card, &put).1, 0x6982);
    assert_eq!(authenticate(&mut card, 0x03, &DEFAULT_3DES), 0x9000);
    assert_eq!(send(&mut card, &put).1, 0x9000);

    let mut current = (0x03u8, DEFAULT_3DES.to_vec());
    for (alg, len) in [(0x08u8, 16usize), (0x0A, 24), (0x0C, 32)] {
        let mut key = vec![0u8; len];
        rand::thread_rng().fill_bytes(&mut key);
        let mut data = vec![alg, 0x9B, len as u8];
        data.extend_from_slice(&key);
        assert_eq!(send(&mut card, &apdu(0, 0xFF, 0xFF, 0xFE, &data)).1, 0x9000);
        // A new session: the old key and the wrong algorithm are refused.
        card.power_cycle();
        assert_eq!(send(&mut card, SELECT).1, 0x9000);
        assert_eq!(authenticate(&mut card, current.0, &current.1), 0x6A86);
        let mut wrong = key.clone();
        wrong[0] ^= 1;
        assert_eq!(authenticate(&mut card, alg, &wrong), 0x6982);
        assert_eq!(authenticate(&mut card, alg, &key), 0x9000);
        // GET METADATA of 9B reports the algorithm and that it is not the default.
        let (meta, sw) = send(&mut card, &[0, 0xF7, 0, 0x9B]);
        assert_eq!(sw, 0x9000);
        let items = tlv::parse(&meta)?;
        assert_eq!(tlv::find(&items, 0x01), Some(&[alg][..]));
        assert_eq!(tlv::find(&items, 0x05), Some(&[0u8][..]));
        current = (alg, key);
    }
    Ok(())
}

#[test]
fn chained_put_data_and_get_response_round_trip() -> TestResult {
    let mut card = fresh_card()?;
    assert_eq!(authenticate(&mut card, 0x03, &DEFAULT_3DES), 0x9000);
    let object: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let mut body = vec![0x5C, 0x03, 0x5F, 0xC1, 0x05];
    tlv::push(&mut body, 0x53, &object);
    let chunks: Vec<&[u8]> = body.chunks(255).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let cla = if i + 1 < chunks.len() { 0x10 } else { 0x00 };
        assert_eq!(
            send(&mut card, &apdu(cla, 0xDB, 0x3F, 0xFF, chunk)).1,
            0x9000
        );
    }

    // Short GET DATA: 256 bytes at a time, 61xx until the last piece.
    let get = [
        0x00, 0xCB, 0x3F, 0xFF, 0x05, 0x5C, 0x03, 0x5F, 0xC1, 0x05, 0x00,
    ];
    let (mut data, mut sw) = send(&mut card, &get);
    while sw >> 8 == 0x61 {
        assert_eq!(data.len() % 256, 0);
        let (more, next) = send(&mut card, &[0x00, 0xC0, 0x00, 0x00, 0x00]);
        data.extend_from_slice(&more);
        sw = next;
    }
    assert_eq!(sw, 0x9000);
    assert_eq!(data, tlv::encode(0x53, &object));

    // Extended GET DATA: everything in one response.
    let get_ext = [
        0x00, 0xCB, 0x3F, 0xFF, 0x00, 0x00, 0x05, 0x5C, 0x03, 0x5F, 0xC1, 0x05, 0x00, 0x00,
    ];
    let (data, sw) = send(&mut card, &get_ext);
    assert_eq!(sw, 0x9000);
    assert_eq!(data, tlv::encode(0x53, &object));

    // GET RESPONSE with nothing pending, and an object that is too large.
    assert_eq!(send(&mut card, &[0x00, 0xC0, 0x00, 0x00, 0x00]).1, 0x6985);
    let mut huge = vec![0x5C, 0x03, 0x5F, 0xC1, 0x0A];
    tlv::push(&mut huge, 0x53, &vec![0u8; 4000]);
    let mut ext = vec![0x00, 0xDB, 0x3F, 0xFF, 0x00];
    ext.extend_from_slice(&u16::try_from(huge.len())?.to_be_bytes());
    ext.extend_from_slice(&huge);
    assert_eq!(send(&mut card, &ext).1, 0x6A84);
    Ok(())
}

#[test]
fn import_key_metadata_and_signature() -> TestResult {
    let mut card = fresh_card()?;
    assert_eq!(authenticate(&mut card, 0x03, &DEFAULT_3DES), 0x9000);
    let secret = p256::SecretKey::random(&mut rand::thread_rng());
    let mut data = Vec::new();
    tlv::push(&mut data, 0x06, &secret.to_bytes());
    tlv::push(&mut data, 0xAA, &[0x01]);
    tlv::push(&mut data, 0xAB, &[0x01]);
    assert_eq!(send(&mut card, &apdu(0, 0xFE, 0x11, 0x9D, &data)).1, 0x9000);

    let (meta, sw) = send(&mut card, &[0, 0xF7, 0, 0x9D]);
    assert_eq!(sw, 0x9000);
    let items = tlv::parse(&meta)?;
    assert_eq!(tlv::find(&items, 0x01), Some(&[0x11][..]));
    assert_eq!(tlv::find(&items, 0x02), Some(&[0x01, 0x01][..]));
    assert_eq!(
        tlv::find(&items, 0x03),
        Some(&[0x02][..]),
        "origin: imported"
    );
    let point = secret.public_key().to_sec1_bytes();
    assert_eq!(
        tlv::find(&items, 0x04),
        Some(&tlv::encode(0x86, &point)[..])
    );

    // An imported key cannot be attested.
    assert_eq!(send(&mut card, &[0, 0xF9, 0x9D, 0x00]).1, 0x6A80);

    // PIN policy never: it signs without VERIFY.
    let digest = [0x33u8; 32];
    let mut body = Vec::new();
    tlv::push(&mut body, 0x82, &[]);
    tlv::push(&mut body, 0x81, &digest);
    let (resp, sw) = send(
        &mut card,
        &apdu(0, 0x87, 0x11, 0x9D, &tlv::encode(0x7C, &body)),
    );
    assert_eq!(sw, 0x9000);
    let outer = tlv::parse(&resp)?;
    let inner = tlv::parse(outer[0].value)?;
    let sig = p256::ecdsa::Signature::from_der(tlv::find(&inner, 0x82).ok_or("no signature")?)?;
    p256::ecdsa::VerifyingKey::from(secret.public_key()).verify_prehash(&digest, &sig)?;
    // The wrong algorithm for the slot's key.
    let wrong = apdu(0, 0x87, 0x14, 0x9D, &tlv::encode(0x7C, &body));
    assert_eq!(send(&mut card, &wrong).1, 0x6A86);
    Ok(())
}

#[test]
fn set_pin_retries_needs_pin_and_management_key() -> TestResult {
    let mut card = fresh_card()?;
    let verify = apdu(0, 0x20, 0, 0x80, b"123456\xFF\xFF");
    assert_eq!(send(&mut card, &[0, 0xFA, 5, 6]).1, 0x6982);
    assert_eq!(authenticate(&mut card, 0x03, &DEFAULT_3DES), 0x9000);
    assert_eq!(
        send(&mut card, &[0, 0xFA, 5, 6]).1,
        0x6982,
        "PIN not verified"
    );
    assert_eq!(send(&mut card, &verify).1, 0x9000);
    assert_eq!(send(&mut card, &[0, 0xFA, 5, 6]).1, 0x9000);
    let (meta, _) = send(&mut card, &[0, 0xF7, 0, 0x80]);
    assert_eq!(tlv::find(&tlv::parse(&meta)?, 0x06), Some(&[5, 5][..]));
    let (meta, _) = send(&mut card, &[0, 0xF7, 0, 0x81]);
    assert_eq!(tlv::find(&tlv::parse(&meta)?, 0x06), Some(&[6, 6][..]));
    // Wrong PINs count down from 5; VERIFY without data reports the state.
    let wrong = apdu(0, 0x20, 0, 0x80, b"999999\xFF\xFF");
    assert_eq!(send(&mut card, &wrong).1, 0x63C4);
    assert_eq!(send(&mut card, &[0, 0x20, 0, 0x80]).1, 0x63C4);
    assert_eq!(send(&mut card, &verify).1, 0x9000);
    assert_eq!(send(&mut card, &[0, 0x20, 0, 0x80]).1, 0x9000);
    // P1 FF forgets the verification.
    assert_eq!(send(&mut card, &[0, 0x20, 0xFF, 0x80]).1, 0x9000);
    assert_eq!(send(&mut card, &[0, 0x20, 0, 0x80]).1, 0x63C5);
    // A new PIN must have 6 to 8 characters.
    let short = apdu(0, 0x24, 0, 0x80, b"123456\xFF\xFF12345\xFF\xFF\xFF");
    assert_eq!(send(&mut card, &short).1, 0x6A80);
    Ok(())
}

/// A card of `version` with PIV selected.
fn card_of(version: [u8; 3]) -> Result<VirtualCard, piv_sim::Error> {
    let mut card = VirtualCard::new(CardConfig {
        serial: 4_300_001,
        version,
    })?;
    assert_eq!(send(&mut card, SELECT).1, 0x9000);
    Ok(card)
}

#[test]
fn older_firmware_lacks_metadata_and_serial_and_a_yubikey_4_reselect_unverifies() -> TestResult {
    let verify = apdu(0, 0x20, 0, 0x80, b"123456\xFF\xFF");
    let empty_verify = [0, 0x20, 0, 0x80];
    let otp_select = apdu(
        0,
        0xA4,
        0x04,
        0,
        &[0xA0, 0x00, 0x00, 0x05, 0x27, 0x20, 0x01],
    );

    // 5.4: metadata and GET SERIAL; a re-select keeps the PIN verified; no OTP applet.
    let mut card = card_of([5, 4, 3])?;
    assert_eq!(send(&mut card, &[0, 0xF7, 0, 0x80]).1, 0x9000);
    assert_eq!(send(&mut card, &[0, 0xF8, 0, 0]).1, 0x9000);
    assert_eq!(send(&mut card, &verify).1, 0x9000);
    assert_eq!(send(&mut card, SELECT).1, 0x9000);
    assert_eq!(send(&mut card, &empty_verify).1, 0x9000);
    assert_eq!(send(&mut card, &otp_select).1, 0x6A82);

    // 5.2: no GET METADATA yet; otherwise as 5.4.
    let mut card = card_of([5, 2, 7])?;
    assert_eq!(send(&mut card, &[0, 0xF7, 0, 0x80]).1, 0x6D00);
    assert_eq!(send(&mut card, &[0, 0xF7, 0, 0x9A]).1, 0x6D00);
    assert_eq!(send(&mut card, &[0, 0xF8, 0, 0]).1, 0x9000);
    assert_eq!(send(&mut card, &verify).1, 0x9000);
    assert_eq!(send(&mut card, SELECT).1, 0x9000);
    assert_eq!(send(&mut card, &empty_verify).1, 0x9000);

    // 4.3: no GET METADATA, no GET SERIAL: the serial comes from the OTP applet.
    let mut card = card_of([4, 3, 7])?;
    assert_eq!(send(&mut card, &[0, 0xF7, 0, 0x80]).1, 0x6D00);
    assert_eq!(send(&mut card, &[0, 0xF8, 0, 0]).1, 0x6D00);
    let (version, sw) = send(&mut card, &[0, 0xFD, 0, 0]);
    assert_eq!((version, sw), (vec![4, 3, 7], 0x9000));
    // A re-select forgets the verified PIN and the management key.
    assert_eq!(send(&mut card, &verify).1, 0x9000);
    assert_eq!(authenticate(&mut card, 0x03, &DEFAULT_3DES), 0x9000);
    assert_eq!(send(&mut card, &empty_verify).1, 0x9000);
    assert_eq!(send(&mut card, SELECT).1, 0x9000);
    assert_eq!(send(&mut card, &empty_verify).1, 0x63C3);
    assert_eq!(
        send(&mut card, &[0, 0xFA, 5, 6]).1,
        0x6982,
        "management key forgotten"
    );
    // The OTP applet gives the serial; PIV is deselected meanwhile and
    // selecting it again starts a new session.
    assert_eq!(send(&mut card, &verify).1, 0x9000);
    let (status, sw) = send(&mut card, &otp_select);
    assert_eq!((&status[..3], sw), (&[4, 3, 7][..], 0x9000));
    let (serial, sw) = send(&mut card, &[0, 0x01, 0x10, 0]);
    assert_eq!((serial, sw), (4_300_001u32.to_be_bytes().to_vec(), 0x9000));
    assert_eq!(
        send(&mut card, &[0, 0xFD, 0, 0]).1,
        0x6D00,
        "PIV is not selected"
    );
    assert_eq!(send(&mut card, SELECT).1, 0x9000);
    assert_eq!(send(&mut card, &empty_verify).1, 0x63C3);
    // The `yubikey` crate selects the OTP applet by its full AID.
    let full = apdu(
        0,
        0xA4,
        0x04,
        0,
        &[0xA0, 0x00, 0x00, 0x05, 0x27, 0x20, 0x01, 0x01],
    );
    assert_eq!(send(&mut card, &full).1, 0x9000);
    assert_eq!(send(&mut card, &[0, 0x01, 0x10, 0, 0]).1, 0x9000);
    Ok(())
}

#[test]
fn garbage_never_panics_and_always_gets_a_status_word() {
    let Ok(mut card) = VirtualCard::new(CardConfig::default()) else {
        panic!("no card");
    };
    let mut rng = rand::thread_rng();
    for i in 0..20_000 {
        let len = rng.gen_range(0..300);
        let mut apdu = vec![0u8; len];
        rng.fill_bytes(&mut apdu);
        if len >= 2 && i % 2 == 0 {
            // Mostly valid classes and PIV instructions, so the applet is reached.
            apdu[0] &= 0x10;
            const INS: [u8; 16] = [
                0xA4, 0xCB, 0xDB, 0x20, 0x24, 0x2C, 0x87, 0x47, 0xFD, 0xF8, 0xFF, 0xFE, 0xF7, 0xF9,
                0xFA, 0xFB,
            ];
            apdu[1] = INS[rng.gen_range(0..INS.len())];
        }
        if i % 1000 == 0 {
            let _ = send(&mut card, SELECT);
        }
        let r = card.transmit(&apdu);
        assert!(r.len() >= 2);
    }
}

/// A log sink the test can read back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn pin_and_keys_never_reach_the_logs() -> TestResult {
    let sink = Captured::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // The global default: a scoped one can lose to callsite interest cached by
    // the tests running in parallel threads. Only this test installs one.
    tracing::subscriber::set_global_default(subscriber)?;
    let mut card = fresh_card()?;
    let change = apdu(0, 0x24, 0, 0x80, b"123456\xFF\xFF864209\xFF\xFF");
    assert_eq!(send(&mut card, &change).1, 0x9000);
    assert_eq!(
        send(&mut card, &apdu(0, 0x20, 0, 0x80, b"864209\xFF\xFF")).1,
        0x9000
    );
    assert_eq!(
        send(&mut card, &apdu(0, 0x20, 0, 0x80, b"864201\xFF\xFF")).1,
        0x63C2
    );
    assert_eq!(authenticate(&mut card, 0x03, &DEFAULT_3DES), 0x9000);
    let log = String::from_utf8(sink.0.lock().map_err(|_| "poisoned")?.clone())?;
    assert!(log.contains("apdu"), "the APDUs were logged: {log}");
    for secret in [
        "864209",
        "864201",
        "383634323039",
        "38 36 34",
        "010203040506",
    ] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
    }
    Ok(())
}
