//! piv-sim conformance (issue 5): Yubico's yubico-piv-tool, OpenSC's pkcs11-tool
//! and opensc-tool, and the `yubikey` crate against piv-sim through a private
//! pcscd and vpcd. Each test starts its own rig, so they run in parallel.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use piv_sim::{CardConfig, TouchMode, VirtualCard};
use token_agent_e2e::pcsc::{self, PcscRig};

const PIN: &str = "123456";
const PUK: &str = "12345678";
const SERIAL: u32 = 13_572_468;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs yubico-piv-tool on card `i` and fails with its output unless it succeeded.
fn piv_ok_on(rig: &PcscRig, i: usize, args: &[&str]) -> Result<String> {
    let out = rig.piv_tool_on(i, args)?;
    ensure!(
        out.status.success(),
        "yubico-piv-tool {args:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    Ok(text(&out))
}

fn piv_ok(rig: &PcscRig, args: &[&str]) -> Result<String> {
    piv_ok_on(rig, 0, args)
}

/// Runs yubico-piv-tool and fails unless it failed.
fn piv_fails(rig: &PcscRig, args: &[&str]) -> Result<String> {
    let out = rig.piv_tool(args)?;
    ensure!(
        !out.status.success(),
        "yubico-piv-tool {args:?} should have failed:\n{}",
        text(&out)
    );
    Ok(text(&out))
}

/// Runs a command of the rig and fails with its output unless it succeeded.
fn run_ok(rig: &PcscRig, program: &str, args: &[&str]) -> Result<String> {
    let out = rig.run(rig.command(program).args(args))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    Ok(text(&out))
}

fn s(p: &Path) -> Result<&str> {
    p.to_str().context("temporary path is not UTF-8")
}

/// What a slot got in [`provision`].
struct Provisioned {
    public_key: PathBuf,
    certificate: PathBuf,
}

/// Generates a key in `slot` with yubico-piv-tool, gives it a certificate and
/// imports that, as a person sets a YubiKey up.
///
/// `-a selfsign-certificate` is run first. Debian 12's yubico-piv-tool 2.2.0
/// cannot sign a certificate with OpenSSL 3 (Yubico/yubico-piv-tool#388, the
/// same with a real YubiKey): it fails on the host with "Failed signing
/// certificate" before sending the card anything. In that case, and only then,
/// the certificate for the card's public key is made with openssl instead.
fn provision(
    rig: &PcscRig,
    slot: &str,
    algorithm: &str,
    pin_policy: &str,
    touch_policy: &str,
) -> Result<Provisioned> {
    let public_key = rig.dir().join(format!("pub-{slot}.pem"));
    let certificate = rig.dir().join(format!("cert-{slot}.pem"));
    piv_ok(
        rig,
        &[
            "-a",
            "generate",
            "-s",
            slot,
            "-A",
            algorithm,
            &format!("--pin-policy={pin_policy}"),
            &format!("--touch-policy={touch_policy}"),
            "-o",
            s(&public_key)?,
        ],
    )?;
    let subject = format!("/CN=piv-sim {slot}/");
    let out = rig.piv_tool(&[
        "-a",
        "verify-pin",
        "-P",
        PIN,
        "-a",
        "selfsign-certificate",
        "-s",
        slot,
        "-A",
        algorithm,
        "-S",
        &subject,
        "-i",
        s(&public_key)?,
        "-o",
        s(&certificate)?,
    ])?;
    if !out.status.success() {
        let why = text(&out);
        ensure!(
            why.contains("Failed signing certificate") && tool_has_openssl3_selfsign_bug(rig)?,
            "selfsign-certificate failed:\n{why}"
        );
        let ca_key = rig.dir().join(format!("ca-{slot}.key"));
        run_ok(
            rig,
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                s(&ca_key)?,
            ],
        )?;
        run_ok(
            rig,
            "openssl",
            &[
                "x509",
                "-new",
                "-subj",
                &format!("/CN=piv-sim {slot}"),
                "-key",
                s(&ca_key)?,
                "-force_pubkey",
                s(&public_key)?,
                "-days",
                "30",
                "-out",
                s(&certificate)?,
            ],
        )?;
    }
    piv_ok(
        rig,
        &[
            "-a",
            "import-certificate",
            "-s",
            slot,
            "-i",
            s(&certificate)?,
        ],
    )?;
    Ok(Provisioned {
        public_key,
        certificate,
    })
}

/// Whether this yubico-piv-tool is 2.2.x, which cannot sign certificates with OpenSSL 3.
fn tool_has_openssl3_selfsign_bug(rig: &PcscRig) -> Result<bool> {
    let version = run_ok(rig, "yubico-piv-tool", &["--version"])?;
    let openssl = run_ok(rig, "openssl", &["version"])?;
    Ok(version.contains(" 2.2.") && openssl.starts_with("OpenSSL 3"))
}

#[test]
fn status_reports_version_serial_and_pin_tries() -> Result<()> {
    let rig = PcscRig::start_with_configs(&[CardConfig {
        serial: 31_415_926,
        version: [5, 4, 3],
    }])?;
    let out = piv_ok(&rig, &["-a", "status"])?;
    ensure!(out.contains("Version:\t5.4.3"), "{out}");
    ensure!(out.contains("Serial Number:\t31415926"), "{out}");
    ensure!(out.contains("PIN tries left:\t3"), "{out}");
    ensure!(out.contains("CHUID:\tNo data available"), "{out}");
    let out = piv_ok(&rig, &["-a", "version"])?;
    ensure!(out.contains("5.4.3"), "{out}");
    Ok(())
}

#[test]
fn three_wrong_pins_block_the_pin_and_the_puk_unblocks_it() -> Result<()> {
    let rig = PcscRig::start()?;
    piv_ok(&rig, &["-a", "verify-pin", "-P", PIN])?;
    let out = piv_fails(&rig, &["-a", "verify-pin", "-P", "000000"])?;
    ensure!(out.contains("2 tries left"), "{out}");
    let out = piv_fails(&rig, &["-a", "verify-pin", "-P", "000000"])?;
    ensure!(out.contains("1 tries left"), "{out}");
    let out = piv_fails(&rig, &["-a", "verify-pin", "-P", "000000"])?;
    ensure!(out.contains("Pin code blocked"), "{out}");
    // Blocked: even the right PIN is refused now.
    let out = piv_fails(&rig, &["-a", "verify-pin", "-P", PIN])?;
    ensure!(out.contains("blocked"), "{out}");
    let out = piv_ok(&rig, &["-a", "status"])?;
    ensure!(out.contains("PIN tries left:\t0"), "{out}");

    // A wrong PUK costs a PUK try and leaves the PIN blocked.
    let out = piv_fails(
        &rig,
        &["-a", "unblock-pin", "-P", "87654321", "-N", "654321"],
    )?;
    ensure!(out.contains("2 tries left"), "{out}");
    piv_ok(&rig, &["-a", "unblock-pin", "-P", PUK, "-N", "654321"])?;
    piv_ok(&rig, &["-a", "verify-pin", "-P", "654321"])?;
    let out = piv_ok(&rig, &["-a", "status"])?;
    ensure!(out.contains("PIN tries left:\t3"), "{out}");
    Ok(())
}

#[test]
fn reset_works_only_when_pin_and_puk_are_blocked() -> Result<()> {
    let rig = PcscRig::start()?;
    piv_ok(&rig, &["-a", "change-pin", "-P", PIN, "-N", "111111"])?;
    piv_fails(&rig, &["-a", "reset"])?;
    for _ in 0..3 {
        piv_fails(&rig, &["-a", "verify-pin", "-P", "000000"])?;
    }
    // The PIN is blocked but the PUK is not: still refused.
    piv_fails(&rig, &["-a", "reset"])?;
    for _ in 0..3 {
        piv_fails(
            &rig,
            &["-a", "change-puk", "-P", "00000000", "-N", "11111111"],
        )?;
    }
    piv_ok(&rig, &["-a", "reset"])?;
    // Factory state: the default PIN works again.
    piv_ok(&rig, &["-a", "verify-pin", "-P", PIN])?;
    Ok(())
}

#[test]
fn change_pin_and_change_puk() -> Result<()> {
    let rig = PcscRig::start()?;
    piv_ok(&rig, &["-a", "change-pin", "-P", PIN, "-N", "24681357"])?;
    piv_fails(&rig, &["-a", "verify-pin", "-P", PIN])?;
    piv_ok(&rig, &["-a", "verify-pin", "-P", "24681357"])?;
    piv_ok(&rig, &["-a", "change-puk", "-P", PUK, "-N", "87654321"])?;
    piv_fails(&rig, &["-a", "unblock-pin", "-P", PUK, "-N", "111111"])?;
    piv_ok(
        &rig,
        &["-a", "unblock-pin", "-P", "87654321", "-N", "222222"],
    )?;
    piv_ok(&rig, &["-a", "verify-pin", "-P", "222222"])?;
    Ok(())
}

#[test]
fn set_mgm_key_replaces_the_default_key() -> Result<()> {
    let rig = PcscRig::start()?;
    let new_key = "00112233445566778899aabbccddeeff0011223344556677";
    piv_ok(&rig, &["-a", "set-mgm-key", "-n", new_key])?;
    let out = piv_fails(&rig, &["-a", "generate", "-s", "9e", "-A", "ECCP256"])?;
    ensure!(out.contains("authentication"), "{out}");
    piv_ok(
        &rig,
        &[
            "-a",
            "generate",
            "-s",
            "9e",
            "-A",
            "ECCP256",
            &format!("--key={new_key}"),
        ],
    )?;
    Ok(())
}

#[test]
fn generate_certificates_signatures_and_attestation() -> Result<()> {
    let rig = PcscRig::start()?;
    let f9 = rig.dir().join("f9.pem");
    piv_ok(&rig, &["-a", "read-certificate", "-s", "f9", "-o", s(&f9)?])?;
    for (slot, algorithm, pin_policy, touch_policy) in [
        ("9a", "RSA2048", "once", "never"),
        ("9c", "ECCP256", "always", "always"),
        ("9d", "ECCP384", "never", "cached"),
    ] {
        let p = provision(&rig, slot, algorithm, pin_policy, touch_policy)?;
        let read = rig.dir().join(format!("read-{slot}.pem"));
        piv_ok(
            &rig,
            &["-a", "read-certificate", "-s", slot, "-o", s(&read)?],
        )?;
        ensure!(
            fs::read(&read)? == fs::read(&p.certificate)?,
            "slot {slot}: certificate differs"
        );
        let out = piv_ok(
            &rig,
            &[
                "-a",
                "verify-pin",
                "-P",
                PIN,
                "-a",
                "test-signature",
                "-s",
                slot,
                "-i",
                s(&p.certificate)?,
            ],
        )?;
        ensure!(out.contains("Successful"), "{out}");

        let attestation = rig.dir().join(format!("attest-{slot}.pem"));
        piv_ok(&rig, &["-a", "attest", "-s", slot, "-o", s(&attestation)?])?;
        let out = run_ok(
            &rig,
            "openssl",
            &["verify", "-CAfile", s(&f9)?, s(&attestation)?],
        )?;
        ensure!(out.contains(": OK"), "{out}");
        // The attestation certifies the generated key, with the card's serial.
        let attested = run_ok(
            &rig,
            "openssl",
            &["x509", "-in", s(&attestation)?, "-noout", "-pubkey"],
        )?;
        ensure!(
            attested.trim() == fs::read_to_string(&p.public_key)?.trim(),
            "slot {slot}: attested key differs"
        );
        let dump = run_ok(
            &rig,
            "openssl",
            &["x509", "-in", s(&attestation)?, "-noout", "-text"],
        )?;
        ensure!(
            dump.contains(&format!("YubiKey PIV Attestation {slot}")),
            "{dump}"
        );
        ensure!(
            dump.contains("1.3.6.1.4.1.41482.3.7"),
            "no serial extension: {dump}"
        );
    }
    let out = piv_ok(&rig, &["-a", "status"])?;
    for (slot, algorithm) in [("9a", "RSA2048"), ("9c", "ECCP256"), ("9d", "ECCP384")] {
        ensure!(out.contains(&format!("Slot {slot}:")), "{out}");
        ensure!(out.contains(algorithm), "{out}");
    }
    Ok(())
}

#[test]
fn pin_policy_always_needs_a_verify_before_each_signature() -> Result<()> {
    let rig = PcscRig::start()?;
    let p = provision(&rig, "9c", "ECCP256", "always", "never")?;
    // Without VERIFY the card answers 6982 and the tool fails.
    piv_fails(
        &rig,
        &["-a", "test-signature", "-s", "9c", "-i", s(&p.certificate)?],
    )?;
    piv_ok(
        &rig,
        &[
            "-a",
            "verify-pin",
            "-P",
            PIN,
            "-a",
            "test-signature",
            "-s",
            "9c",
            "-i",
            s(&p.certificate)?,
        ],
    )?;
    Ok(())
}

#[test]
fn touch_policy_waits_for_a_touch_and_times_out_without_one() -> Result<()> {
    let rig = PcscRig::start()?;
    let p = provision(&rig, "9a", "ECCP256", "once", "always")?;
    let card = rig.card(0);
    card.touch().set_mode(TouchMode::Manual);
    let cert = s(&p.certificate)?.to_string();
    let args = [
        "-a",
        "verify-pin",
        "-P",
        PIN,
        "-a",
        "test-signature",
        "-s",
        "9a",
        "-i",
        &cert,
    ];

    thread::scope(|scope| -> Result<()> {
        let tool = scope.spawn(|| rig.piv_tool(&args));
        ensure!(
            card.touch().wait_until_waiting(Duration::from_secs(60)),
            "the card never asked for a touch"
        );
        // The signature is held while the card blinks.
        thread::sleep(Duration::from_millis(300));
        ensure!(!tool.is_finished(), "the tool finished without a touch");
        card.touch().touch();
        let out = tool
            .join()
            .map_err(|_| anyhow::anyhow!("tool thread panicked"))??;
        ensure!(
            out.status.success(),
            "signature after touch failed:\n{}",
            text(&out)
        );
        Ok(())
    })?;

    // Nobody touches: the card gives up after its timeout, as a YubiKey does.
    card.touch().set_mode(TouchMode::Never);
    card.touch().set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let out = rig.piv_tool(&args)?;
    ensure!(
        !out.status.success(),
        "signed without a touch:\n{}",
        text(&out)
    );
    ensure!(
        started.elapsed() >= Duration::from_secs(2),
        "gave up too early"
    );

    // Auto-touch after a delay.
    card.touch()
        .set_mode(TouchMode::AutoAfter(Duration::from_millis(500)));
    let before = card.touch().requests();
    piv_ok(&rig, &args)?;
    ensure!(
        card.touch().requests() == before + 1,
        "one touch per signature"
    );
    Ok(())
}

#[test]
fn cached_touch_policy_asks_once_for_several_signatures() -> Result<()> {
    let rig = PcscRig::start()?;
    let p = provision(&rig, "9d", "ECCP256", "once", "cached")?;
    let card = rig.card(0);
    let cert = s(&p.certificate)?.to_string();
    let args = [
        "-a",
        "verify-pin",
        "-P",
        PIN,
        "-a",
        "test-signature",
        "-s",
        "9d",
        "-i",
        &cert,
    ];
    let before = card.touch().requests();
    piv_ok(&rig, &args)?;
    piv_ok(&rig, &args)?;
    ensure!(
        card.touch().requests() == before + 1,
        "a cached touch should cover the second signature"
    );
    Ok(())
}

#[test]
fn pkcs11_tool_lists_keys_and_signs_with_opensc() -> Result<()> {
    let module = opensc_module()?;
    let rig = PcscRig::start()?;
    let p9a = provision(&rig, "9a", "RSA2048", "once", "never")?;
    let p9c = provision(&rig, "9c", "ECCP384", "always", "never")?;
    let module = s(&module)?;

    let out = run_ok(
        &rig,
        "pkcs11-tool",
        &[
            "--module",
            module,
            "--login",
            "--pin",
            PIN,
            "--list-objects",
        ],
    )?;
    ensure!(out.contains("Private Key Object; RSA"), "{out}");
    ensure!(out.contains("Private Key Object; EC"), "{out}");
    ensure!(out.contains("CN=piv-sim 9a"), "{out}");

    let data = rig.dir().join("data.txt");
    fs::write(&data, b"signed by piv-sim through OpenSC\n")?;
    for (id, mechanism, digest, public_key) in [
        ("01", "SHA256-RSA-PKCS", "-sha256", &p9a.public_key),
        ("02", "ECDSA-SHA384", "-sha384", &p9c.public_key),
    ] {
        let sig = rig.dir().join(format!("sig-{id}.der"));
        run_ok(
            &rig,
            "pkcs11-tool",
            &[
                "--module",
                module,
                "--login",
                "--pin",
                PIN,
                "--sign",
                "--id",
                id,
                "-m",
                mechanism,
                "--signature-format",
                "openssl",
                "-i",
                s(&data)?,
                "-o",
                s(&sig)?,
            ],
        )?;
        let out = run_ok(
            &rig,
            "openssl",
            &[
                "dgst",
                digest,
                "-verify",
                s(public_key)?,
                "-signature",
                s(&sig)?,
                s(&data)?,
            ],
        )?;
        ensure!(out.contains("Verified OK"), "{out}");
    }
    Ok(())
}

fn opensc_module() -> Result<PathBuf> {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
        "/usr/lib64/opensc-pkcs11.so",
        "/usr/lib/opensc-pkcs11.so",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("opensc-pkcs11.so not found: install Debian's opensc-pkcs11 package")
}

#[test]
fn opensc_tool_gets_yubikey_status_words_for_bad_apdus() -> Result<()> {
    let rig = PcscRig::start()?;
    let cases = [
        ("00:A4:04:00:05:A0:00:00:03:08", "0x90, SW2=0x00"),
        ("80:FD:00:00", "0x6E, SW2=0x00"),
        ("00:99:00:00", "0x6D, SW2=0x00"),
        ("00:CB:3F:FF:05:5C:03:5F:C1:02:00", "0x6A, SW2=0x82"),
        ("00:CB:3F:00:05:5C:03:5F:C1:02:00", "0x6A, SW2=0x86"),
        ("00:CB:3F:FF:05:5C:03:12:34:56:00", "0x6A, SW2=0x80"),
        ("00:DB:3F:FF:07:5C:03:5F:C1:02:53:00", "0x69, SW2=0x82"),
        ("00:47:00:9A:05:AC:03:80:01:11", "0x69, SW2=0x82"),
        ("00:20:00:80:02:31:32", "0x6A, SW2=0x80"),
        ("00:20:00:81:00", "0x6A, SW2=0x88"),
        ("00:FB:00:00", "0x69, SW2=0x85"),
        ("00:F7:00:9A:00", "0x6A, SW2=0x82"),
        ("00:87:11:9A:06:7C:04:82:00:81:00", "0x6A, SW2=0x82"),
        ("00:A4:04:00:05:A0:00:00:05:27", "0x6A, SW2=0x82"),
        ("00:20:00:80:00", "0x63, SW2=0xC3"),
    ];
    let mut args = vec!["-r".to_string(), rig.reader_name(0)];
    for (apdu, _) in &cases {
        args.push("-s".into());
        args.push((*apdu).into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok(&rig, "opensc-tool", &args)?;
    let received: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("Received (SW1="))
        .collect();
    ensure!(received.len() == cases.len(), "one answer per APDU:\n{out}");
    for ((apdu, expected), got) in cases.iter().zip(received) {
        ensure!(
            got.starts_with(expected),
            "{apdu}: expected SW1={expected}, got {got}\n{out}"
        );
    }
    Ok(())
}

#[test]
fn yubikey_crate_opens_by_serial_and_reads_metadata() -> Result<()> {
    const NAME: &str = "yubikey_crate_opens_by_serial_and_reads_metadata";
    if pcsc::is_child() {
        return yubikey_crate_child();
    }
    let rig = PcscRig::start_with_configs(&[
        CardConfig {
            serial: SERIAL - 1,
            version: [5, 4, 3],
        },
        CardConfig {
            serial: SERIAL,
            version: [5, 7, 1],
        },
    ])?;
    let args = [
        "-a",
        "generate",
        "-s",
        "9a",
        "-A",
        "ECCP256",
        "--pin-policy=once",
        "--touch-policy=cached",
    ];
    piv_ok_on(&rig, 1, &args)?;
    rig.run_child_test(NAME)?;
    Ok(())
}

/// The child half: runs with `PCSCLITE_CSOCK_NAME` set to the rig's socket.
fn yubikey_crate_child() -> Result<()> {
    use yubikey::piv::{self, AlgorithmId, ManagementSlotId, SlotId};
    use yubikey::{MgmKey, Serial, YubiKey};

    let mut yk = YubiKey::open_by_serial(Serial(SERIAL)).context("open_by_serial")?;
    ensure!(yk.serial() == Serial(SERIAL));
    ensure!(
        yk.version().to_string() == "5.7.1",
        "version {}",
        yk.version()
    );

    let meta = piv::metadata(&mut yk, SlotId::Authentication).context("metadata 9a")?;
    ensure!(
        meta.algorithm == piv::ManagementAlgorithmId::Asymmetric(AlgorithmId::EccP256),
        "{meta:?}"
    );
    ensure!(
        meta.policy == Some((yubikey::PinPolicy::Once, yubikey::TouchPolicy::Cached)),
        "{meta:?}"
    );
    ensure!(meta.origin == Some(piv::Origin::Generated), "{meta:?}");
    ensure!(meta.public.is_some(), "{meta:?}");

    let meta = piv::metadata(&mut yk, SlotId::Management(ManagementSlotId::Pin))?;
    ensure!(meta.default == Some(true), "{meta:?}");
    let retries = meta.retries.context("PIN retries")?;
    ensure!(
        (retries.retry_count, retries.remaining_count) == (3, 3),
        "{retries:?}"
    );
    // Empty slot: the card says "not found" and the crate reports an error.
    ensure!(piv::metadata(&mut yk, SlotId::KeyManagement).is_err());

    yk.verify_pin(PIN.as_bytes()).context("verify_pin")?;
    yk.authenticate(MgmKey::default())
        .context("authenticate with the default 3DES key")?;
    let digest = [0x5Au8; 32];
    let signature = piv::sign_data(
        &mut yk,
        &digest,
        AlgorithmId::EccP256,
        SlotId::Authentication,
    )
    .context("sign_data")?;
    let spki = meta_public(&mut yk)?;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&spki)?;
    let signature = p256::ecdsa::Signature::from_der(&signature)?;
    key.verify_prehash(&digest, &signature)
        .context("the card's signature does not verify")?;
    Ok(())
}

fn meta_public(yk: &mut yubikey::YubiKey) -> Result<Vec<u8>> {
    let meta = yubikey::piv::metadata(yk, yubikey::piv::SlotId::Authentication)?;
    let spki = meta.public.context("no public key")?;
    Ok(spki.subject_public_key.raw_bytes().to_vec())
}

#[test]
fn removal_and_insertion_keep_the_card_state() -> Result<()> {
    let rig = PcscRig::start()?;
    piv_fails(&rig, &["-a", "verify-pin", "-P", "000000"])?;
    rig.remove_card(0)?;
    let out = rig.piv_tool(&["-a", "status"])?;
    ensure!(
        !out.status.success(),
        "status with the card out:\n{}",
        text(&out)
    );
    rig.insert_card(0)?;
    let out = piv_ok(&rig, &["-a", "status"])?;
    ensure!(out.contains("PIN tries left:\t2"), "{out}");
    Ok(())
}

#[test]
fn state_file_keeps_the_card_across_simulator_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("card.json");
    let config = CardConfig {
        serial: 24_680_135,
        version: [5, 4, 3],
    };
    {
        let rig = PcscRig::start_with(vec![VirtualCard::with_state_file(config, &state)?])?;
        provision(&rig, "9a", "ECCP256", "once", "never")?;
        piv_ok(&rig, &["-a", "change-pin", "-P", PIN, "-N", "97531864"])?;
    }
    let rig = PcscRig::start_with(vec![VirtualCard::with_state_file(
        CardConfig::default(),
        &state,
    )?])?;
    let out = piv_ok(&rig, &["-a", "status"])?;
    ensure!(out.contains("Serial Number:\t24680135"), "{out}");
    ensure!(out.contains("Slot 9a:"), "{out}");
    piv_ok(&rig, &["-a", "verify-pin", "-P", "97531864"])?;
    Ok(())
}

#[test]
fn several_cards_on_one_pcscd() -> Result<()> {
    let configs: Vec<CardConfig> = (0..2)
        .map(|i| CardConfig {
            serial: 50_000_000 + i,
            version: [5, 4, 3],
        })
        .collect();
    let rig = PcscRig::start_with_configs(&configs)?;
    for (i, config) in configs.iter().enumerate() {
        let out = piv_ok_on(&rig, i, &["-a", "status"])?;
        ensure!(
            out.contains(&format!("Serial Number:\t{}", config.serial)),
            "card {i} in {}:\n{out}",
            rig.reader_name(i)
        );
    }
    // Cards are independent: blocking one PIN leaves the others alone.
    for _ in 0..3 {
        let out = rig.piv_tool_on(1, &["-a", "verify-pin", "-P", "000000"])?;
        ensure!(!out.status.success());
    }
    ensure!(piv_ok_on(&rig, 1, &["-a", "status"])?.contains("PIN tries left:\t0"));
    ensure!(piv_ok_on(&rig, 0, &["-a", "status"])?.contains("PIN tries left:\t3"));
    // More cards run on more rigs, in parallel.
    let other = PcscRig::start_with_configs(&[CardConfig {
        serial: 50_000_002,
        version: [5, 4, 3],
    }])?;
    ensure!(piv_ok(&other, &["-a", "status"])?.contains("Serial Number:\t50000002"));
    ensure!(PcscRig::start_with_configs(&[CardConfig::default(); 3]).is_err());
    Ok(())
}

#[test]
fn rig_keeps_away_from_the_system_pcscd() -> Result<()> {
    let rig = PcscRig::start()?;
    ensure!(
        rig.socket().starts_with(rig.dir()),
        "socket outside the rig"
    );
    ensure!(
        rig.socket().exists(),
        "no socket at {}",
        rig.socket().display()
    );
    // pcscd wrote its pid file into the rig's private /run, not the system one.
    let pid_file = rig.dir().join("run/pcscd/pcscd.pid");
    ensure!(pid_file.exists(), "no pid file in the rig's /run");
    let system_pid = Path::new("/run/pcscd/pcscd.pid");
    if let Ok(pid) = fs::read_to_string(system_pid) {
        if pid.trim() == fs::read_to_string(&pid_file)?.trim() {
            bail!("the rig's pcscd wrote the system pid file");
        }
    }
    Ok(())
}
