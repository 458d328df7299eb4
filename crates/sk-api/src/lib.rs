//! OpenSSH's security-key middleware interface ("SecurityKeyProvider",
//! `sk-api.h`, API version 0x000a0000, OpenSSH 8.9 and later, 10.5
//! included), for Rust.
//!
//! A middleware is a shared library exporting four C functions:
//! `sk_api_version`, `sk_enroll`, `sk_sign` and `sk_load_resident_keys`.
//! OpenSSH loads it for `ssh-keygen -w`, `ssh-add -S` and the
//! `SecurityKeyProvider` option, always inside `ssh-sk-helper`.
//!
//! What this crate owns: the C types of the header ([`ffi`]), the Rust types
//! they carry ([`EnrollRequest`], [`SignResponse`], ...), a [`Library`] loader
//! that opens a middleware and calls it with owned Rust values in and out
//! (freeing what the library allocated with `free(3)`, as OpenSSH does), and
//! the opposite direction: a [`Provider`] trait and the [`export_provider!`]
//! macro that turn a Rust type into a middleware OpenSSH can load.
//!
//! What it must not do: anything else. It is the one crate of token-agent
//! allowed unsafe code, because it is the C boundary; every unsafe block says
//! why it is sound. It knows nothing of the agent, of CTAP or of devices, and
//! it never keeps a PIN beyond the call that carries it. Loading a library runs
//! its code: only ever do it inside a helper process, never in the agent.
//!
//! # Example
//!
//! Loading a middleware and signing with a key handle (in a helper process):
//!
//! ```no_run
//! use token_agent_sk_api::{Algorithm, Library, SignRequest, USER_PRESENCE_REQD};
//!
//! let library = Library::open("/usr/local/lib/libsk-example.so")?;
//! let response = library.sign(&SignRequest {
//!     algorithm: Algorithm::Ed25519,
//!     data: b"data to sign",
//!     application: "ssh:",
//!     key_handle: &[0u8; 64],
//!     flags: USER_PRESENCE_REQD,
//!     pin: None,
//!     options: &[],
//! })?;
//! println!("counter {}, flags {:#04x}", response.counter, response.flags);
//! # Ok::<(), token_agent_sk_api::LoadError>(())
//! ```
//!
//! Making a middleware: implement [`Provider`] for a type with a `Default`,
//! build the crate as a `cdylib`, and invoke the macro once:
//!
//! ```
//! use token_agent_sk_api::{
//!     EnrollRequest, EnrollResponse, Provider, ResidentKey, SignRequest, SignResponse, SkError,
//!     SkOption,
//! };
//!
//! #[derive(Default)]
//! struct Refuses;
//!
//! impl Provider for Refuses {
//!     fn enroll(&self, _: &EnrollRequest<'_>) -> Result<EnrollResponse, SkError> {
//!         Err(SkError::DeviceNotFound)
//!     }
//!     fn sign(&self, _: &SignRequest<'_>) -> Result<SignResponse, SkError> {
//!         Err(SkError::DeviceNotFound)
//!     }
//!     fn load_resident_keys(
//!         &self,
//!         _: Option<&str>,
//!         _: &[SkOption],
//!     ) -> Result<Vec<ResidentKey>, SkError> {
//!         Ok(Vec::new())
//!     }
//! }
//!
//! token_agent_sk_api::export_provider!(Refuses);
//! ```
//!
//! # Why a macro, and where the unsafe code is
//!
//! The exported functions must be `#[no_mangle] extern "C"` items of the
//! library crate itself, which the workspace's `unsafe_code` lint forbids
//! writing there. The macro expands to thin shims whose bodies call into
//! [`export`], where the pointer handling lives and is documented; the lint
//! does not fire on code expanded from another crate's macro, so the crate that
//! invokes it keeps `#![forbid(unsafe_code)]` for everything it writes itself.

pub mod export;
pub mod ffi;
mod loader;

use std::fmt;

pub use export::Provider;
pub use loader::{Library, LoadError};

/// The API version this crate speaks (`SSH_SK_VERSION_MAJOR`, sk-api.h 1.15).
pub const API_VERSION: u32 = 0x000a_0000;

/// The part of a version that must match (`SSH_SK_VERSION_MAJOR_MASK`).
pub const API_VERSION_MAJOR_MASK: u32 = 0xffff_0000;

/// SSH_SK_USER_PRESENCE_REQD: every signature needs a touch.
pub const USER_PRESENCE_REQD: u8 = 0x01;
/// SSH_SK_USER_VERIFICATION_REQD: every signature needs the PIN (or biometrics).
pub const USER_VERIFICATION_REQD: u8 = 0x04;
/// SSH_SK_FORCE_OPERATION: overwrite an existing resident credential.
pub const FORCE_OPERATION: u8 = 0x10;
/// SSH_SK_RESIDENT_KEY: store the credential on the device.
pub const RESIDENT_KEY: u8 = 0x20;

/// The key types of sk-api.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// SSH_SK_ECDSA (0): ECDSA over NIST P-256 (`sk-ecdsa-sha2-nistp256@openssh.com`).
    Ecdsa,
    /// SSH_SK_ED25519 (1): Ed25519 (`sk-ssh-ed25519@openssh.com`).
    Ed25519,
}

impl Algorithm {
    /// The header's number.
    pub fn code(self) -> u32 {
        match self {
            Self::Ecdsa => 0,
            Self::Ed25519 => 1,
        }
    }

    /// The algorithm numbered `code`, if sk-api.h defines one.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::Ecdsa),
            1 => Some(Self::Ed25519),
            _ => None,
        }
    }
}

/// The errors a middleware returns (SSH_SK_ERR_*), as negative numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SkError {
    /// SSH_SK_ERR_GENERAL (-1): anything else. OpenSSH's own middleware
    /// answers it for a denied or missed touch and for a key handle the device
    /// does not know, so it carries no reason.
    #[error("the middleware failed (SSH_SK_ERR_GENERAL)")]
    General,
    /// SSH_SK_ERR_UNSUPPORTED (-2): the device cannot do what was asked (an
    /// algorithm, an option).
    #[error("the middleware or device does not support this (SSH_SK_ERR_UNSUPPORTED)")]
    Unsupported,
    /// SSH_SK_ERR_PIN_REQUIRED (-3): the operation needs a PIN, or the PIN
    /// given was wrong (sk-api.h has no separate code for a wrong PIN).
    #[error("a PIN is required, or the PIN was wrong (SSH_SK_ERR_PIN_REQUIRED)")]
    PinRequired,
    /// SSH_SK_ERR_DEVICE_NOT_FOUND (-4): no security key is connected.
    #[error("no security key was found (SSH_SK_ERR_DEVICE_NOT_FOUND)")]
    DeviceNotFound,
    /// SSH_SK_ERR_CREDENTIAL_EXISTS (-5): a resident credential for this
    /// application and user exists; enrol with SSH_SK_FORCE_OPERATION to replace it.
    #[error("a resident credential exists already (SSH_SK_ERR_CREDENTIAL_EXISTS)")]
    CredentialExists,
    /// A code sk-api.h does not define.
    #[error("the middleware returned the unknown error code {0}")]
    Other(i32),
}

impl SkError {
    /// The C return value.
    pub fn code(self) -> i32 {
        match self {
            Self::General => -1,
            Self::Unsupported => -2,
            Self::PinRequired => -3,
            Self::DeviceNotFound => -4,
            Self::CredentialExists => -5,
            Self::Other(code) => code,
        }
    }

    /// The error a non-zero C return value means.
    pub fn from_code(code: i32) -> Self {
        match code {
            -1 => Self::General,
            -2 => Self::Unsupported,
            -3 => Self::PinRequired,
            -4 => Self::DeviceNotFound,
            -5 => Self::CredentialExists,
            other => Self::Other(other),
        }
    }
}

/// A named option (`struct sk_option`): OpenSSH passes `device` (a device
/// path) and, on enrolment, `user` (the user id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkOption {
    /// The name.
    pub name: String,
    /// The value.
    pub value: String,
    /// Whether a middleware that does not know the option must refuse.
    pub required: bool,
}

/// The arguments of `sk_enroll`.
#[derive(Clone, Copy)]
pub struct EnrollRequest<'a> {
    /// The key type to make.
    pub algorithm: Algorithm,
    /// The challenge; the middleware hashes it (SHA-256) into the clientDataHash.
    pub challenge: &'a [u8],
    /// The application ("ssh:" or "ssh:NAME"), the FIDO relying party id.
    pub application: &'a str,
    /// SSH_SK_* flags: resident, verify-required, touch-required, force.
    pub flags: u8,
    /// The PIN, when the person gave one.
    pub pin: Option<&'a str>,
    /// Options (`device`, `user`).
    pub options: &'a [SkOption],
}

/// The arguments of `sk_sign`.
#[derive(Clone, Copy)]
pub struct SignRequest<'a> {
    /// The key type.
    pub algorithm: Algorithm,
    /// The data to sign; the middleware hashes it (SHA-256) into the
    /// clientDataHash (PROTOCOL.u2f).
    pub data: &'a [u8],
    /// The key's application.
    pub application: &'a str,
    /// The key handle.
    pub key_handle: &'a [u8],
    /// The key's SSH_SK_* flags: whether to ask for a touch, and for the PIN.
    pub flags: u8,
    /// The PIN, when the key needs it.
    pub pin: Option<&'a str>,
    /// Options (`device`).
    pub options: &'a [SkOption],
}

/// What `sk_enroll` returns, copied out of the middleware's memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrollResponse {
    /// The flags the key file should carry.
    pub flags: u8,
    /// The public key: 32 bytes (Ed25519) or a SEC1 uncompressed point (P-256).
    pub public_key: Vec<u8>,
    /// The key handle.
    pub key_handle: Vec<u8>,
    /// The attestation signature (may be empty).
    pub signature: Vec<u8>,
    /// The attestation certificate (may be empty).
    pub attestation_cert: Vec<u8>,
    /// The attestation's authenticator data (may be empty).
    pub authdata: Vec<u8>,
}

/// What `sk_sign` returns, copied out of the middleware's memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignResponse {
    /// The authenticator flags (UP, UV).
    pub flags: u8,
    /// The signature counter.
    pub counter: u32,
    /// Ed25519: the 64-byte signature; ECDSA: r, big-endian.
    pub sig_r: Vec<u8>,
    /// ECDSA: s, big-endian; Ed25519: empty.
    pub sig_s: Vec<u8>,
}

/// One resident credential from `sk_load_resident_keys`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentKey {
    /// The header's algorithm number; [`Algorithm::from_code`] says which (if any).
    pub alg: u32,
    /// The middleware's index of the credential.
    pub slot: usize,
    /// The application ("ssh:...").
    pub application: String,
    /// The public key and key handle.
    pub key: EnrollResponse,
    /// SSH_SK_USER_VERIFICATION_REQD when the credential needs the PIN.
    pub flags: u8,
    /// The user id it was made for.
    pub user_id: Vec<u8>,
}

impl fmt::Debug for EnrollRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("algorithm", &self.algorithm)
            .field("challenge_len", &self.challenge.len())
            .field("application", &self.application)
            .field("flags", &format_args!("{:#04x}", self.flags))
            .field("pin", &self.pin.map(|_| "<redacted>"))
            .field("options", &self.options)
            .finish()
    }
}

impl fmt::Debug for SignRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignRequest")
            .field("algorithm", &self.algorithm)
            .field("data_len", &self.data.len())
            .field("application", &self.application)
            .field("key_handle_len", &self.key_handle.len())
            .field("flags", &format_args!("{:#04x}", self.flags))
            .field("pin", &self.pin.map(|_| "<redacted>"))
            .field("options", &self.options)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip() {
        for error in [
            SkError::General,
            SkError::Unsupported,
            SkError::PinRequired,
            SkError::DeviceNotFound,
            SkError::CredentialExists,
            SkError::Other(-77),
        ] {
            assert_eq!(SkError::from_code(error.code()), error);
        }
        assert_eq!(SkError::PinRequired.code(), -3);
        assert_eq!(SkError::CredentialExists.code(), -5);
    }

    #[test]
    fn algorithms_have_the_header_numbers() {
        assert_eq!(Algorithm::Ecdsa.code(), 0);
        assert_eq!(Algorithm::Ed25519.code(), 1);
        assert_eq!(Algorithm::from_code(1), Some(Algorithm::Ed25519));
        assert_eq!(Algorithm::from_code(2), None);
    }

    #[test]
    fn debug_never_shows_the_pin() {
        let request = SignRequest {
            algorithm: Algorithm::Ed25519,
            data: b"x",
            application: "ssh:",
            key_handle: b"h",
            flags: USER_VERIFICATION_REQD,
            pin: Some("246810"),
            options: &[],
        };
        let text = format!("{request:?}");
        assert!(!text.contains("246810"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
