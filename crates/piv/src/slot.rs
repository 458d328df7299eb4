//! PIV key slots (SP 800-73-4 part 1, section 3.1; Yubico's retired slots
//! 82-95) and what one holds: algorithm, policies, public key.

use std::fmt;
use std::str::FromStr;

use ssh_key::public::{EcdsaPublicKey, KeyData, RsaPublicKey};
use ssh_key::EcdsaCurve;
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use yubikey::piv::{AlgorithmId, SlotId};
use yubikey::{PinPolicy, TouchPolicy};

/// A key slot: 9a, 9c, 9d, 9e or one of the retired slots 82-95.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(u8);

impl Slot {
    /// Every slot that can hold a key for signing, in the order they are listed.
    pub fn all() -> impl Iterator<Item = Slot> {
        [0x9a, 0x9c, 0x9d, 0x9e]
            .into_iter()
            .chain(0x82..=0x95)
            .map(Slot)
    }

    /// The slot numbered `byte`, when it is a key slot.
    pub fn from_byte(byte: u8) -> Option<Self> {
        matches!(byte, 0x9a | 0x9c | 0x9d | 0x9e | 0x82..=0x95).then_some(Self(byte))
    }

    /// The slot's number.
    pub fn byte(self) -> u8 {
        self.0
    }

    /// The `yubikey` crate's name for it.
    pub fn id(self) -> SlotId {
        // Every value `Slot` can hold is a key slot the crate knows (see `from_byte`).
        SlotId::try_from(self.0).unwrap_or(SlotId::Authentication)
    }

    /// "PIV Authentication", "Digital Signature", ... or "Retired Key 3".
    pub fn purpose(self) -> String {
        match self.0 {
            0x9a => "PIV Authentication".to_owned(),
            0x9c => "Digital Signature".to_owned(),
            0x9d => "Key Management".to_owned(),
            0x9e => "Card Authentication".to_owned(),
            n => format!("Retired Key {}", n - 0x81),
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}", self.0)
    }
}

impl FromStr for Slot {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u8::from_str_radix(s.trim_start_matches("0x"), 16)
            .ok()
            .and_then(Slot::from_byte)
            .ok_or_else(|| format!("{s:?} is not a PIV key slot (9a, 9c, 9d, 9e or 82-95)"))
    }
}

/// The key algorithms a PIV slot of a YubiKey 5 (before 5.7) holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// RSA 1024 (listed, signs; OpenSSH refuses keys this short by default).
    Rsa1024,
    /// RSA 2048.
    Rsa2048,
    /// ECDSA on NIST P-256.
    P256,
    /// ECDSA on NIST P-384.
    P384,
}

impl KeyAlgorithm {
    /// The `yubikey` crate's name for it.
    pub fn id(self) -> AlgorithmId {
        match self {
            Self::Rsa1024 => AlgorithmId::Rsa1024,
            Self::Rsa2048 => AlgorithmId::Rsa2048,
            Self::P256 => AlgorithmId::EccP256,
            Self::P384 => AlgorithmId::EccP384,
        }
    }

    /// From the `yubikey` crate's name.
    pub fn from_id(id: AlgorithmId) -> Self {
        match id {
            AlgorithmId::Rsa1024 => Self::Rsa1024,
            AlgorithmId::Rsa2048 => Self::Rsa2048,
            AlgorithmId::EccP256 => Self::P256,
            AlgorithmId::EccP384 => Self::P384,
        }
    }

    /// The modulus length in bytes for RSA.
    pub(crate) fn rsa_len(self) -> Option<usize> {
        match self {
            Self::Rsa1024 => Some(128),
            Self::Rsa2048 => Some(256),
            Self::P256 | Self::P384 => None,
        }
    }

    /// The curve for ECDSA.
    pub(crate) fn curve(self) -> Option<EcdsaCurve> {
        match self {
            Self::P256 => Some(EcdsaCurve::NistP256),
            Self::P384 => Some(EcdsaCurve::NistP384),
            Self::Rsa1024 | Self::Rsa2048 => None,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rsa1024 => "RSA1024",
            Self::Rsa2048 => "RSA2048",
            Self::P256 => "ECCP256",
            Self::P384 => "ECCP384",
        })
    }
}

impl FromStr for KeyAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "RSA1024" => Ok(Self::Rsa1024),
            "RSA2048" => Ok(Self::Rsa2048),
            "ECCP256" | "P256" | "P-256" => Ok(Self::P256),
            "ECCP384" | "P384" | "P-384" => Ok(Self::P384),
            _ => Err(format!(
                "{s:?} is not a PIV algorithm (ECCP256, ECCP384, RSA2048, RSA1024)"
            )),
        }
    }
}

/// When the card asks for the PIN before using a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinUse {
    /// Never (the default of slot 9e).
    Never,
    /// Once per session: after one VERIFY the key signs until the card is reset.
    Once,
    /// Before every signature (the default of slot 9c).
    Always,
}

impl PinUse {
    /// From a slot's metadata; `Default` means the slot's own default.
    pub(crate) fn from_policy(policy: PinPolicy, slot: Slot) -> Self {
        match policy {
            PinPolicy::Never => Self::Never,
            PinPolicy::Once => Self::Once,
            PinPolicy::Always => Self::Always,
            PinPolicy::Default => Self::default_for(slot),
        }
    }

    /// What the card does when nothing was set (SP 800-73-4 and Yubico's defaults).
    pub(crate) fn default_for(slot: Slot) -> Self {
        match slot.byte() {
            0x9c => Self::Always,
            0x9e => Self::Never,
            _ => Self::Once,
        }
    }

    /// The `yubikey` crate's name for it.
    pub fn policy(self) -> PinPolicy {
        match self {
            Self::Never => PinPolicy::Never,
            Self::Once => PinPolicy::Once,
            Self::Always => PinPolicy::Always,
        }
    }
}

impl fmt::Display for PinUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Never => "never",
            Self::Once => "once",
            Self::Always => "always",
        })
    }
}

impl FromStr for PinUse {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(Self::Never),
            "once" => Ok(Self::Once),
            "always" => Ok(Self::Always),
            _ => Err(format!("{s:?} is not a PIN policy (never, once, always)")),
        }
    }
}

/// When the card waits for a touch before using a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TouchUse {
    /// Never.
    Never,
    /// Before every signature.
    Always,
    /// Once, then not again for 15 seconds.
    Cached,
}

impl TouchUse {
    pub(crate) fn from_policy(policy: TouchPolicy) -> Self {
        match policy {
            TouchPolicy::Always => Self::Always,
            TouchPolicy::Cached => Self::Cached,
            TouchPolicy::Never | TouchPolicy::Default => Self::Never,
        }
    }

    /// The `yubikey` crate's name for it.
    pub fn policy(self) -> TouchPolicy {
        match self {
            Self::Never => TouchPolicy::Never,
            Self::Always => TouchPolicy::Always,
            Self::Cached => TouchPolicy::Cached,
        }
    }

    /// Whether a signature may wait for a touch.
    pub fn may_wait(self) -> bool {
        self != Self::Never
    }
}

impl fmt::Display for TouchUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Never => "never",
            Self::Always => "always",
            Self::Cached => "cached",
        })
    }
}

impl FromStr for TouchUse {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(Self::Never),
            "always" => Ok(Self::Always),
            "cached" => Ok(Self::Cached),
            _ => Err(format!(
                "{s:?} is not a touch policy (never, always, cached)"
            )),
        }
    }
}

/// What one slot holds.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotKey {
    /// The slot.
    pub slot: Slot,
    /// The key's algorithm.
    pub algorithm: KeyAlgorithm,
    /// The public key.
    pub public_key: KeyData,
    /// The PIN policy (the slot's default when the card has no metadata).
    pub pin: PinUse,
    /// The touch policy (`never` when the card has no metadata).
    pub touch: TouchUse,
    /// Whether the key was found through its certificate.
    pub has_certificate: bool,
}

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
// RFC 8410, section 3.
const X25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.110");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// The SSH public key and algorithm of a SubjectPublicKeyInfo (RFC 5280 section
/// 4.1.2.7; RFC 3279 for RSA, RFC 5480 for EC), when it is one a PIV slot holds.
pub(crate) fn ssh_public_key(spki: &SubjectPublicKeyInfoOwned) -> Option<(KeyAlgorithm, KeyData)> {
    let bits = spki.subject_public_key.as_bytes()?;
    if spki.algorithm.oid == RSA_ENCRYPTION {
        use rsa::pkcs1::DecodeRsaPublicKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPublicKey::from_pkcs1_der(bits).ok()?;
        let algorithm = match key.size() {
            128 => KeyAlgorithm::Rsa1024,
            256 => KeyAlgorithm::Rsa2048,
            _ => return None,
        };
        let ssh = RsaPublicKey::try_from(&key).ok()?;
        return Some((algorithm, KeyData::Rsa(ssh)));
    }
    if spki.algorithm.oid == EC_PUBLIC_KEY {
        let curve: ObjectIdentifier = spki.algorithm.parameters.as_ref()?.decode_as().ok()?;
        let algorithm = match curve {
            P256 => KeyAlgorithm::P256,
            P384 => KeyAlgorithm::P384,
            _ => return None,
        };
        let key = EcdsaPublicKey::from_sec1_bytes(bits).ok()?;
        return Some((algorithm, KeyData::Ecdsa(key)));
    }
    None
}

/// The key of `spki` in words, for a slot the agent cannot use: "an Ed25519
/// key", "an RSA 4096 key".
pub(crate) fn describe_key(spki: &SubjectPublicKeyInfoOwned) -> String {
    let oid = spki.algorithm.oid;
    if oid == RSA_ENCRYPTION {
        use rsa::pkcs1::DecodeRsaPublicKey;
        use rsa::traits::PublicKeyParts;
        return match spki
            .subject_public_key
            .as_bytes()
            .and_then(|bits| rsa::RsaPublicKey::from_pkcs1_der(bits).ok())
        {
            Some(key) => format!("an RSA {} key", key.size() * 8),
            None => "a malformed RSA key".to_owned(),
        };
    }
    if oid == ED25519 {
        return "an Ed25519 key".to_owned();
    }
    if oid == X25519 {
        return "an X25519 key".to_owned();
    }
    if oid == EC_PUBLIC_KEY {
        return match spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
        {
            Some(curve) => format!("an ECC key on curve {curve}"),
            None => "an ECC key".to_owned(),
        };
    }
    format!("a key of algorithm {oid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_signing_slots() {
        let all: Vec<String> = Slot::all().map(|s| s.to_string()).collect();
        assert_eq!(all.len(), 24);
        assert_eq!(&all[..5], &["9a", "9c", "9d", "9e", "82"]);
        assert_eq!(all.last().map(String::as_str), Some("95"));
        assert_eq!("9C".parse::<Slot>(), Ok(Slot(0x9c)));
        assert!("f9".parse::<Slot>().is_err());
        assert!("80".parse::<Slot>().is_err());
        assert_eq!(Slot(0x84).purpose(), "Retired Key 3");
        for slot in Slot::all() {
            assert_eq!(u8::from(slot.id()), slot.byte());
        }
    }

    #[test]
    fn default_pin_policies_follow_the_spec() {
        assert_eq!(PinUse::default_for(Slot(0x9a)), PinUse::Once);
        assert_eq!(PinUse::default_for(Slot(0x9c)), PinUse::Always);
        assert_eq!(PinUse::default_for(Slot(0x9e)), PinUse::Never);
    }
}
