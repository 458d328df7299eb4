//! What the card remembers across power cycles: PIN, PUK, retry counters, the
//! management key, slot keys with their policies, and data objects; and how it is
//! kept in a JSON state file so a card survives the simulator's restart.
//!
//! The state file holds private keys, PIN and PUK in the clear: it is a test
//! fixture, never a place for real secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{self, Algorithm, CryptoError, MgmAlgorithm, StoredKey};
use crate::Error;

/// The factory PIN, PUK and management key of a YubiKey.
pub const DEFAULT_PIN: &[u8] = b"123456";
/// The factory PUK.
pub const DEFAULT_PUK: &[u8] = b"12345678";
/// The factory management key (3DES) of firmware before 5.7.
pub const DEFAULT_MGM_KEY: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];
/// Retries of a fresh PIN and PUK.
pub const DEFAULT_RETRIES: u8 = 3;

/// GET DATA tag of the attestation certificate (Yubico object 5FFF01).
pub const OBJ_ATTESTATION: u32 = 0x5F_FF_01;
/// The attestation key's slot.
pub const SLOT_ATTESTATION: u8 = 0xF9;

/// Identity and configuration of a new card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardConfig {
    /// The serial number GET SERIAL returns.
    pub serial: u32,
    /// The firmware version GET VERSION returns (5.4.3 by default).
    pub version: [u8; 3],
}

impl Default for CardConfig {
    fn default() -> Self {
        Self {
            serial: 10_000_001,
            version: [5, 4, 3],
        }
    }
}

/// A PIN or PUK with its retry counter. The value is stored padded to 8 bytes with 0xFF.
#[derive(Clone, Serialize, Deserialize)]
pub struct Secret {
    #[serde(with = "hex_bytes")]
    pub(crate) value: Zeroizing<Vec<u8>>,
    pub(crate) max_retries: u8,
    pub(crate) retries_left: u8,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("retries_left", &self.retries_left)
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

impl Secret {
    pub(crate) fn new(value: &[u8], retries: u8) -> Self {
        Self {
            value: pad8(value),
            max_retries: retries,
            retries_left: retries,
        }
    }

    /// Whether the counter has run out.
    pub fn is_blocked(&self) -> bool {
        self.retries_left == 0
    }

    /// Tries left.
    pub fn retries_left(&self) -> u8 {
        self.retries_left
    }

    /// Whether the value is still `default` (GET METADATA tag 05).
    pub fn is_default(&self, default: &[u8]) -> bool {
        self.matches(&pad8(default))
    }

    /// Constant-time comparison with an 8-byte padded candidate.
    pub(crate) fn matches(&self, candidate: &[u8]) -> bool {
        candidate.len() == self.value.len()
            && candidate
                .iter()
                .zip(self.value.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Pads a PIN to the 8 bytes PIV sends, with 0xFF.
pub(crate) fn pad8(value: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(value.to_vec());
    out.resize(8, 0xFF);
    out
}

/// The management key.
#[derive(Clone, Serialize, Deserialize)]
pub struct MgmKey {
    pub(crate) algorithm: MgmAlgorithm,
    #[serde(with = "hex_bytes")]
    pub(crate) key: Zeroizing<Vec<u8>>,
    pub(crate) touch_required: bool,
}

impl fmt::Debug for MgmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MgmKey")
            .field("algorithm", &self.algorithm)
            .field("touch_required", &self.touch_required)
            .finish_non_exhaustive()
    }
}

impl Default for MgmKey {
    fn default() -> Self {
        Self {
            algorithm: MgmAlgorithm::TripleDes,
            key: Zeroizing::new(DEFAULT_MGM_KEY.to_vec()),
            touch_required: false,
        }
    }
}

impl MgmKey {
    /// Whether this is still the factory key.
    pub fn is_default(&self) -> bool {
        self.algorithm == MgmAlgorithm::TripleDes && self.key.as_slice() == DEFAULT_MGM_KEY
    }
}

/// PIN policy bytes (Yubico): 1 never, 2 once per session, 3 always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PinPolicy {
    /// No PIN needed.
    Never,
    /// The PIN once per session (since SELECT).
    Once,
    /// A VERIFY right before every use.
    Always,
}

impl PinPolicy {
    /// Parses a policy byte; 0 ("default") is resolved by the caller.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Never),
            2 => Some(Self::Once),
            3 => Some(Self::Always),
            _ => None,
        }
    }

    /// The policy byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Never => 1,
            Self::Once => 2,
            Self::Always => 3,
        }
    }

    /// The default of a slot: always for 9C (signature), never for 9E (card
    /// authentication), once elsewhere.
    pub fn default_for(slot: u8) -> Self {
        match slot {
            0x9C => Self::Always,
            0x9E => Self::Never,
            _ => Self::Once,
        }
    }
}

/// Touch policy bytes (Yubico): 1 never, 2 always, 3 cached for 15 seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TouchPolicy {
    /// No touch.
    Never,
    /// A touch for every use.
    Always,
    /// A touch, then 15 seconds without.
    Cached,
}

impl TouchPolicy {
    /// Parses a policy byte; 0 ("default") means never.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 | 1 => Some(Self::Never),
            2 => Some(Self::Always),
            3 => Some(Self::Cached),
            _ => None,
        }
    }

    /// The policy byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Never => 1,
            Self::Always => 2,
            Self::Cached => 3,
        }
    }
}

/// Whether the card made a key or it was imported (GET METADATA tag 03).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// GENERATE ASYMMETRIC KEY PAIR.
    Generated,
    /// IMPORT KEY.
    Imported,
}

/// A key in a slot with its policies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotKey {
    pub(crate) key: StoredKey,
    pub(crate) pin_policy: PinPolicy,
    pub(crate) touch_policy: TouchPolicy,
    pub(crate) origin: Origin,
}

/// Everything a card keeps across power cycles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CardState {
    pub(crate) serial: u32,
    pub(crate) version: [u8; 3],
    pub(crate) pin: Secret,
    pub(crate) puk: Secret,
    pub(crate) mgm: MgmKey,
    pub(crate) slots: BTreeMap<u8, SlotKey>,
    #[serde(with = "object_map")]
    pub(crate) objects: BTreeMap<u32, Vec<u8>>,
}

impl CardState {
    /// A factory-fresh card with a new simulated attestation key and certificate.
    pub fn new(config: CardConfig) -> Result<Self, CryptoError> {
        let mut state = Self {
            serial: config.serial,
            version: config.version,
            pin: Secret::new(DEFAULT_PIN, DEFAULT_RETRIES),
            puk: Secret::new(DEFAULT_PUK, DEFAULT_RETRIES),
            mgm: MgmKey::default(),
            slots: BTreeMap::new(),
            objects: BTreeMap::new(),
        };
        // The simulated attestation key is P-256 rather than a YubiKey's RSA 2048:
        // it signs the same statements and is made in milliseconds.
        let key = StoredKey::generate(Algorithm::EccP256)?;
        let cert = crypto::attestation_authority_certificate(&key)?;
        state.slots.insert(
            SLOT_ATTESTATION,
            SlotKey {
                key,
                pin_policy: PinPolicy::Never,
                touch_policy: TouchPolicy::Never,
                origin: Origin::Imported,
            },
        );
        state.objects.insert(OBJ_ATTESTATION, cert);
        Ok(state)
    }

    /// The card's serial number.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// The firmware version.
    pub fn version(&self) -> [u8; 3] {
        self.version
    }

    /// The PIN's counter.
    pub fn pin(&self) -> &Secret {
        &self.pin
    }

    /// The PUK's counter.
    pub fn puk(&self) -> &Secret {
        &self.puk
    }

    /// Factory reset, as Yubico's RESET does: keys, objects, PIN, PUK and management
    /// key go back to the defaults. Serial, firmware and the attestation key and
    /// certificate survive, as they do on a YubiKey.
    pub(crate) fn factory_reset(&mut self) {
        let attestation_key = self.slots.remove(&SLOT_ATTESTATION);
        let attestation_cert = self.objects.remove(&OBJ_ATTESTATION);
        self.pin = Secret::new(DEFAULT_PIN, DEFAULT_RETRIES);
        self.puk = Secret::new(DEFAULT_PUK, DEFAULT_RETRIES);
        self.mgm = MgmKey::default();
        self.slots.clear();
        self.objects.clear();
        if let Some(key) = attestation_key {
            self.slots.insert(SLOT_ATTESTATION, key);
        }
        if let Some(cert) = attestation_cert {
            self.objects.insert(OBJ_ATTESTATION, cert);
        }
    }

    /// Reads a state file written by [`CardState::save`].
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = fs::read_to_string(path).map_err(|source| Error::StateIo {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::StateFormat {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Writes the state atomically (a temporary file renamed over the old one), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let io_err = |source| Error::StateIo {
            path: path.to_path_buf(),
            source,
        };
        let json =
            Zeroizing::new(
                serde_json::to_vec_pretty(self).map_err(|e| Error::StateFormat {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?,
            );
        let tmp = temp_path(path);
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(io_err)?;
        file.write_all(&json).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        fs::rename(&tmp, path).map_err(io_err)
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Serde helper: bytes as a lowercase hex string.
pub(crate) mod hex_bytes {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(bytes))
    }

    pub(crate) fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: From<Zeroizing<Vec<u8>>>,
    {
        let text = Zeroizing::new(String::deserialize(d)?);
        super::from_hex(&text)
            .map(|v| T::from(Zeroizing::new(v)))
            .ok_or_else(|| D::Error::custom("invalid hex"))
    }
}

/// Serde helper: the object map with hex tags and hex values.
mod object_map {
    use std::collections::BTreeMap;

    use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        map: &BTreeMap<u32, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        map.iter()
            .map(|(tag, value)| (format!("{tag:06x}"), super::to_hex(value)))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u32, Vec<u8>>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(tag, value)| {
                let tag = u32::from_str_radix(&tag, 16).map_err(D::Error::custom)?;
                let value =
                    super::from_hex(&value).ok_or_else(|| D::Error::custom("invalid hex"))?;
                Ok((tag, value))
            })
            .collect()
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_save_and_load() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("card.json");
        let mut state = CardState::new(CardConfig::default())?;
        state.objects.insert(0x5F_C1_02, vec![1, 2, 3]);
        state.pin.retries_left = 1;
        state.save(&path)?;
        let loaded = CardState::load(&path)?;
        assert_eq!(loaded.serial, state.serial);
        assert_eq!(loaded.pin.retries_left, 1);
        assert_eq!(loaded.objects.get(&0x5F_C1_02), Some(&vec![1, 2, 3]));
        assert!(loaded.pin.matches(&pad8(DEFAULT_PIN)));
        assert!(loaded.slots.contains_key(&SLOT_ATTESTATION));
        Ok(())
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(
            from_hex(&to_hex(&[0, 0xAB, 0xFF])),
            Some(vec![0, 0xAB, 0xFF])
        );
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
