//! One-shot operations on a card for the `token-agent piv` subcommands:
//! inspect (`list`), the first-run setup yubikey-agent users know (`setup`),
//! and resetting a blocked PIN with the PUK (`unblock`).
//!
//! These open the card directly, in shared mode, and let go of it without a
//! reset, so they work while the agent runs.

use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use ssh_key::public::KeyData;
use token_agent_core::DeviceInfo;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Validity;
use yubikey::certificate::yubikey_signer::{Rsa1024, Rsa2048, YubiRsa};
use yubikey::certificate::Certificate;
use yubikey::{piv, MgmKey, YubiKey};
use zeroize::Zeroizing;

use crate::card::{self, device_info, pin_tries, puk_tries, release};
use crate::pin::pin_bytes;
use crate::slot::{ssh_public_key, KeyAlgorithm, PinUse, Slot, SlotKey, TouchUse};

/// Why a `piv` subcommand failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManageError {
    /// pcscd is not running or not reachable.
    #[error(
        "cannot talk to pcscd ({0}); start it (on Debian and Ubuntu: \
         sudo apt install pcscd && sudo systemctl start pcscd.socket)"
    )]
    Pcsc(String),
    /// No YubiKey is plugged in (or none with the serial asked for).
    #[error("{0}")]
    NotFound(String),
    /// Several YubiKeys are plugged in and none was chosen.
    #[error("several YubiKeys are plugged in ({0}); choose one with --serial")]
    Several(String),
    /// The PIN was wrong.
    #[error("wrong PIN for {device}, {tries} tries left")]
    WrongPin {
        /// The card.
        device: DeviceInfo,
        /// Tries left.
        tries: u8,
    },
    /// The PUK was wrong, or blocked.
    #[error("wrong PUK for {device}, {tries} tries left{}", if *.tries == 0 { ": the PUK is blocked and only a reset of the PIV application (which erases its keys) helps" } else { "" })]
    WrongPuk {
        /// The card.
        device: DeviceInfo,
        /// Tries left.
        tries: u8,
    },
    /// The PIN is blocked.
    #[error("the PIN of {device} is blocked; {}", crate::unblock_remedy(*.serial))]
    PinBlocked {
        /// The card.
        device: DeviceInfo,
        /// Its serial.
        serial: u32,
    },
    /// A PIN or PUK that the card would refuse without spending a try.
    #[error("{0}")]
    BadSecret(String),
    /// The card refused an operation.
    #[error("{device}: {what} failed: {message}")]
    Card {
        /// The card.
        device: DeviceInfo,
        /// The operation.
        what: &'static str,
        /// What the card or library said.
        message: String,
    },
}

/// What `token-agent piv list` shows of one card.
#[derive(Debug, Clone)]
pub struct CardReport {
    /// The card.
    pub device: DeviceInfo,
    /// The PC/SC reader it is in.
    pub reader: String,
    /// The PIV application's version.
    pub firmware: String,
    /// PIN tries left.
    pub pin_tries: Option<u8>,
    /// PUK tries left.
    pub puk_tries: Option<u8>,
    /// Its keys.
    pub keys: Vec<SlotKey>,
}

/// Every YubiKey on every reader, with its keys and counters.
pub fn list() -> Result<Vec<CardReport>, ManageError> {
    crate::quiet_apdu_traces();
    let mut reports = Vec::new();
    for reader in readers()? {
        let Ok(mut yubikey) = card::open_reader(&reader) else {
            continue;
        };
        let keys = card::scan(&mut yubikey).keys;
        reports.push(CardReport {
            device: device_info(&yubikey),
            reader,
            firmware: yubikey.version().to_string(),
            pin_tries: pin_tries(&mut yubikey).ok().flatten(),
            puk_tries: puk_tries(&mut yubikey),
            keys,
        });
        release(yubikey);
    }
    reports.sort_by(|a, b| a.device.serial().cmp(&b.device.serial()));
    Ok(reports)
}

/// What `token-agent piv setup` makes.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// The card; needed only when several are plugged in.
    pub serial: Option<u32>,
    /// The slot for the new key (9a by default).
    pub slot: Slot,
    /// The new key's algorithm (ECCP256 by default).
    pub algorithm: KeyAlgorithm,
    /// Its PIN policy (once by default).
    pub pin_policy: PinUse,
    /// Its touch policy (always by default).
    pub touch_policy: TouchUse,
    /// Replace the management key with a random one stored on the card,
    /// protected by the PIN (as `ykman piv access change-management-key
    /// --generate --protect` does), so that the PIN alone manages the card.
    pub protect_management_key: bool,
}

/// The secrets `setup` needs; Debug prints none of them.
pub struct SetupSecrets {
    /// The current PIN.
    pub pin: SecretString,
    /// A new PIN to replace it with.
    pub new_pin: Option<SecretString>,
    /// The current PUK and a new one to replace it with.
    pub new_puk: Option<(SecretString, SecretString)>,
}

impl std::fmt::Debug for SetupSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetupSecrets")
            .field("new_pin", &self.new_pin.is_some())
            .field("new_puk", &self.new_puk.is_some())
            .finish_non_exhaustive()
    }
}

/// What `setup` made.
#[derive(Debug, Clone)]
pub struct SetupOutcome {
    /// The card.
    pub device: DeviceInfo,
    /// The new key's public key.
    pub public_key: KeyData,
    /// The line for `~/.ssh/authorized_keys`.
    pub authorized_key: String,
}

/// The card with `serial`, or the only card when `serial` is `None`.
pub fn open(serial: Option<u32>) -> Result<YubiKey, ManageError> {
    crate::quiet_apdu_traces();
    let mut found = Vec::new();
    let mut held = false;
    for reader in readers()? {
        match card::open_reader(&reader) {
            Ok(yubikey) => found.push(yubikey),
            Err(card::OpenError::Held) => held = true,
            Err(card::OpenError::Other(_)) => {}
        }
    }
    let wanted = match serial {
        Some(serial) => found.iter().position(|y| y.serial().0 == serial),
        None if found.len() == 1 => Some(0),
        None if found.is_empty() => None,
        None => {
            let serials: Vec<String> = found.iter().map(|y| y.serial().to_string()).collect();
            found.into_iter().for_each(release);
            return Err(ManageError::Several(serials.join(", ")));
        }
    };
    let Some(index) = wanted else {
        found.into_iter().for_each(release);
        let mut message = match serial {
            Some(serial) => format!("no YubiKey with serial {serial} is plugged in"),
            None => "no YubiKey is plugged in (or pcscd cannot see it)".to_owned(),
        };
        if held {
            message.push_str(&format!("; a card could not be opened: {}", card::HELD));
        }
        return Err(ManageError::NotFound(message));
    };
    let yubikey = found.swap_remove(index);
    found.into_iter().for_each(release);
    Ok(yubikey)
}

/// Generates a key, its self-signed certificate and, if asked, new PIN, PUK
/// and management key. The card may wait for a touch while it signs the
/// certificate (touch policy `always` or `cached`).
pub fn setup(options: &SetupOptions, secrets: &SetupSecrets) -> Result<SetupOutcome, ManageError> {
    let mut yubikey = open(options.serial)?;
    let result = setup_on(&mut yubikey, options, secrets);
    // Setup verified the PIN: reset the card so that it does not stay
    // unlocked for whichever program uses it next.
    if let Err((yubikey, e)) = yubikey.disconnect(pcsc::Disposition::ResetCard) {
        tracing::debug!(error = %e, "could not reset the card after setup");
        drop(yubikey);
    }
    result
}

fn setup_on(
    yubikey: &mut YubiKey,
    options: &SetupOptions,
    secrets: &SetupSecrets,
) -> Result<SetupOutcome, ManageError> {
    let device = device_info(yubikey);
    let serial = yubikey.serial().0;
    let card_err = |what: &'static str| {
        let device = device.clone();
        move |e: yubikey::Error| ManageError::Card {
            device: device.clone(),
            what,
            message: e.to_string(),
        }
    };
    let mut pin = checked(&secrets.pin, "PIN")?;
    verify(yubikey, &pin, &device, serial)?;
    if let Some(new_pin) = &secrets.new_pin {
        let new_pin = checked(new_pin, "new PIN")?;
        yubikey
            .change_pin(&pin, &new_pin)
            .map_err(card_err("changing the PIN"))?;
        pin = new_pin;
        verify(yubikey, &pin, &device, serial)?;
    }
    if let Some((puk, new_puk)) = &secrets.new_puk {
        let puk = checked(puk, "PUK")?;
        let new_puk = checked(new_puk, "new PUK")?;
        match yubikey.change_puk(&puk, &new_puk) {
            Ok(()) => {}
            Err(yubikey::Error::WrongPin { tries }) => {
                return Err(ManageError::WrongPuk { device, tries })
            }
            Err(yubikey::Error::PinLocked) => {
                return Err(ManageError::WrongPuk { device, tries: 0 })
            }
            Err(e) => return Err(card_err("changing the PUK")(e)),
        }
    }

    // A management key stored PIN-protected on the card (by an earlier setup
    // or by Yubico's tools) wins over the factory default.
    let management = MgmKey::get_protected(yubikey).unwrap_or_default();
    yubikey
        .authenticate(management)
        .map_err(|_| ManageError::Card {
            device: device.clone(),
            what: "authenticating with the management key",
            message: "the card has neither the default management key nor a PIN-protected one; \
                  generate the key with ykman or yubico-piv-tool and your management key"
                .into(),
        })?;

    let spki = piv::generate(
        yubikey,
        options.slot.id(),
        options.algorithm.id(),
        options.pin_policy.policy(),
        options.touch_policy.policy(),
    )
    .map_err(card_err("generating the key"))?;
    let (_, public_key) = ssh_public_key(&spki).ok_or_else(|| ManageError::Card {
        device: device.clone(),
        what: "reading the new public key",
        message: "the card returned a key of an unexpected type".into(),
    })?;

    // Signing the certificate uses the new key: with PIN policy "always" it
    // needs a VERIFY right before.
    verify(yubikey, &pin, &device, serial)?;
    let subject = Name::from_str(&format!(
        "CN=token-agent,OU={} slot {}",
        device.label().replace('#', ""),
        options.slot
    ))
    .map_err(|e| ManageError::BadSecret(format!("certificate subject: {e}")))?;
    let validity = Validity::from_now(Duration::from_secs(20 * 365 * 24 * 3600)).map_err(|e| {
        ManageError::Card {
            device: device.clone(),
            what: "making the certificate",
            message: e.to_string(),
        }
    })?;
    let mut serial_bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut serial_bytes);
    serial_bytes[0] &= 0x7f;
    let cert_serial = SerialNumber::new(&serial_bytes).map_err(|e| ManageError::Card {
        device: device.clone(),
        what: "making the certificate",
        message: e.to_string(),
    })?;
    let slot = options.slot.id();
    let made = match options.algorithm {
        KeyAlgorithm::P256 => Certificate::generate_self_signed::<_, p256::NistP256>(
            yubikey,
            slot,
            cert_serial,
            validity,
            subject,
            spki,
            |_| Ok(()),
        ),
        KeyAlgorithm::P384 => Certificate::generate_self_signed::<_, p384::NistP384>(
            yubikey,
            slot,
            cert_serial,
            validity,
            subject,
            spki,
            |_| Ok(()),
        ),
        KeyAlgorithm::Rsa2048 => Certificate::generate_self_signed::<_, YubiRsa<Rsa2048>>(
            yubikey,
            slot,
            cert_serial,
            validity,
            subject,
            spki,
            |_| Ok(()),
        ),
        KeyAlgorithm::Rsa1024 => Certificate::generate_self_signed::<_, YubiRsa<Rsa1024>>(
            yubikey,
            slot,
            cert_serial,
            validity,
            subject,
            spki,
            |_| Ok(()),
        ),
    };
    made.map_err(card_err("making the self-signed certificate"))?;

    if options.protect_management_key {
        verify(yubikey, &pin, &device, serial)?;
        MgmKey::generate()
            .set_protected(yubikey)
            .map_err(card_err("storing a random PIN-protected management key"))?;
    }

    let comment = format!(
        "{} slot {} ({})",
        device.label(),
        options.slot,
        options.slot.purpose()
    );
    let authorized_key = ssh_key::PublicKey::new(public_key.clone(), comment)
        .to_openssh()
        .map_err(|e| ManageError::Card {
            device: device.clone(),
            what: "encoding the public key",
            message: e.to_string(),
        })?;
    Ok(SetupOutcome {
        device,
        public_key,
        authorized_key,
    })
}

/// Sets a new PIN with the PUK, which also resets the PIN's tries.
pub fn unblock(
    serial: Option<u32>,
    puk: &SecretString,
    new_pin: &SecretString,
) -> Result<DeviceInfo, ManageError> {
    let mut yubikey = open(serial)?;
    let device = device_info(&yubikey);
    let result = unblock_on(&mut yubikey, &device, puk, new_pin);
    release(yubikey);
    result.map(|()| device)
}

fn unblock_on(
    yubikey: &mut YubiKey,
    device: &DeviceInfo,
    puk: &SecretString,
    new_pin: &SecretString,
) -> Result<(), ManageError> {
    let puk = checked(puk, "PUK")?;
    let new_pin = checked(new_pin, "new PIN")?;
    match yubikey.unblock_pin(&puk, &new_pin) {
        Ok(()) => Ok(()),
        Err(yubikey::Error::WrongPin { tries }) => Err(ManageError::WrongPuk {
            device: device.clone(),
            tries,
        }),
        Err(yubikey::Error::PinLocked) => Err(ManageError::WrongPuk {
            device: device.clone(),
            tries: 0,
        }),
        Err(e) => Err(ManageError::Card {
            device: device.clone(),
            what: "unblocking the PIN",
            message: e.to_string(),
        }),
    }
}

fn verify(
    yubikey: &mut YubiKey,
    pin: &[u8],
    device: &DeviceInfo,
    serial: u32,
) -> Result<(), ManageError> {
    match yubikey.verify_pin(pin) {
        Ok(()) => Ok(()),
        Err(yubikey::Error::WrongPin { tries: 0 } | yubikey::Error::PinLocked) => {
            Err(ManageError::PinBlocked {
                device: device.clone(),
                serial,
            })
        }
        Err(yubikey::Error::WrongPin { tries }) => Err(ManageError::WrongPin {
            device: device.clone(),
            tries,
        }),
        Err(e) => Err(ManageError::Card {
            device: device.clone(),
            what: "verifying the PIN",
            message: e.to_string(),
        }),
    }
}

/// A PIN or PUK's bytes, after the checks that spend no try.
fn checked(secret: &SecretString, what: &str) -> Result<Zeroizing<Vec<u8>>, ManageError> {
    pin_bytes(secret)
        .map_err(|bad| ManageError::BadSecret(format!("the {what}: {}", bad.message())))
}

fn readers() -> Result<Vec<String>, ManageError> {
    let mut context =
        yubikey::reader::Context::open().map_err(|e| ManageError::Pcsc(e.to_string()))?;
    let readers = context
        .iter()
        .map_err(|e| ManageError::Pcsc(e.to_string()))?;
    Ok(readers.map(|r| r.name().into_owned()).collect())
}
