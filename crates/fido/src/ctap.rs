//! The [`Authenticator`] trait: the CTAP 2.1 operations the backend needs, as types.
//!
//! Operations follow the CTAP 2.1 specification (section 6, "Authenticator
//! API"): `authenticatorGetInfo` ([`Authenticator::info`]),
//! `authenticatorMakeCredential` ([`Authenticator::make_credential`]),
//! `authenticatorGetAssertion` ([`Authenticator::get_assertion`]),
//! `authenticatorClientPIN` ([`Authenticator::pin_retries`], and the PIN given
//! to the operations that need user verification) and
//! `authenticatorCredentialManagement` ([`Authenticator::resident_credentials`]).
//!
//! # Why the PIN is an argument, not a token
//!
//! On the wire, a PIN becomes a pinUvAuthToken through an ECDH key agreement
//! (CTAP 2.1 section 6.5), and the token then authenticates each request. That
//! dance belongs to the transport: ctap-hid-fido2 does it inside each call
//! given a PIN, and a simulator checks the PIN directly. So operations take the
//! PIN itself and the implementation turns it into whatever its device needs;
//! the backend never sees a pinUvAuthToken and never keeps one.
//!
//! # Blocking
//!
//! Every method blocks until the device answers, which may take as long as
//! the device waits for a touch. The backend calls them only on the device's
//! own worker thread: one thread per device, fed by a queue.

use std::fmt;

use secrecy::SecretString;

/// One connected authenticator.
pub trait Authenticator: Send + Sync + fmt::Debug {
    /// A stable id for this device while it stays connected (a HID path, a
    /// simulator's name): the backend keeps one worker per id.
    fn id(&self) -> String;

    /// The device as a person would name it ("YubiKey 5 NFC", "fido-sim").
    fn label(&self) -> String;

    /// authenticatorGetInfo (CTAP 2.1 section 6.4).
    fn info(&self) -> Result<Info, CtapError>;

    /// authenticatorMakeCredential (CTAP 2.1 section 6.1).
    fn make_credential(&self, request: &MakeCredential) -> Result<Credential, CtapError>;

    /// authenticatorGetAssertion (CTAP 2.1 section 6.2) with one allowed
    /// credential. Fails with [`CtapError::NoCredentials`] when this device did
    /// not make the credential.
    fn get_assertion(&self, request: &GetAssertion) -> Result<Assertion, CtapError>;

    /// authenticatorClientPIN getPINRetries (CTAP 2.1 section 6.5.5.2).
    fn pin_retries(&self) -> Result<u32, CtapError>;

    /// authenticatorCredentialManagement enumerateRPs and
    /// enumerateCredentials (CTAP 2.1 section 6.8): every resident credential,
    /// which needs the PIN.
    fn resident_credentials(
        &self,
        pin: Option<&SecretString>,
    ) -> Result<Vec<ResidentCredential>, CtapError>;
}

/// COSE algorithm identifiers (RFC 8152 / IANA COSE registry) OpenSSH uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoseAlgorithm {
    /// EdDSA over Ed25519 (COSE -8), for sk-ssh-ed25519@openssh.com.
    EdDsa,
    /// ECDSA P-256 with SHA-256 (COSE -7), for sk-ecdsa-sha2-nistp256@openssh.com.
    Es256,
}

impl CoseAlgorithm {
    /// The COSE number.
    pub fn id(self) -> i32 {
        match self {
            Self::EdDsa => -8,
            Self::Es256 => -7,
        }
    }
}

/// A credential public key as the authenticator returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialPublicKey {
    /// An Ed25519 point.
    Ed25519([u8; 32]),
    /// A P-256 point, SEC1 uncompressed (0x04 || x || y).
    P256(Vec<u8>),
}

impl CredentialPublicKey {
    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> CoseAlgorithm {
        match self {
            Self::Ed25519(_) => CoseAlgorithm::EdDsa,
            Self::P256(_) => CoseAlgorithm::Es256,
        }
    }
}

/// What authenticatorGetInfo reports (the fields the backend uses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Info {
    /// Supported versions, e.g. "FIDO_2_0", "FIDO_2_1".
    pub versions: Vec<String>,
    /// The AAGUID.
    pub aaguid: [u8; 16],
    /// Whether a client PIN is set (option "clientPin": true).
    pub client_pin_set: bool,
    /// Whether the device stores resident credentials (option "rk").
    pub resident_keys: bool,
    /// Whether it supports credential management (option "credMgmt").
    pub credential_management: bool,
    /// COSE algorithms it supports.
    pub algorithms: Vec<i32>,
}

/// The authenticator flags of authenticator data (WebAuthn section 6.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthFlags(pub u8);

impl AuthFlags {
    /// UP: the user was present (touched the device).
    pub const USER_PRESENT: u8 = 0x01;
    /// UV: the user was verified (PIN or biometrics).
    pub const USER_VERIFIED: u8 = 0x04;
    /// AT: attested credential data follows.
    pub const ATTESTED: u8 = 0x40;
    /// ED: extension data follows.
    pub const EXTENSIONS: u8 = 0x80;

    /// Whether UP is set.
    pub fn user_present(self) -> bool {
        self.0 & Self::USER_PRESENT != 0
    }

    /// Whether UV is set.
    pub fn user_verified(self) -> bool {
        self.0 & Self::USER_VERIFIED != 0
    }
}

/// The user a credential belongs to (PublicKeyCredentialUserEntity).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    /// The user handle (OpenSSH sends 32 zero bytes unless `-O user=` says otherwise).
    pub id: Vec<u8>,
    /// The user name ("openssh" by default).
    pub name: String,
}

/// authenticatorMakeCredential's parameters.
#[derive(Clone, Debug)]
pub struct MakeCredential {
    /// The relying party id: the sk key's application ("ssh:" by default).
    pub rp_id: String,
    /// The challenge; clientDataHash is its SHA-256 (OpenSSH passes a
    /// random one). The data, not the hash, crosses this trait because
    /// ctap-hid-fido2 hashes what it is given.
    pub challenge: Vec<u8>,
    /// The user.
    pub user: User,
    /// The key type to make.
    pub algorithm: CoseAlgorithm,
    /// Whether to store the credential on the device (option "rk").
    pub resident: bool,
    /// The credProtect extension, when asked for; a device without it, or a
    /// request without it, makes a level 1 credential.
    pub cred_protect: Option<CredProtect>,
    /// The PIN, when user verification is wanted or the device demands it.
    pub pin: Option<SecretString>,
}

/// The credProtect extension's levels (CTAP 2.1 section 12.1): how much a
/// credential hides from getAssertion without user verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CredProtect {
    /// 1, userVerificationOptional: usable without UV (the default).
    UserVerificationOptional,
    /// 2, userVerificationOptionalWithCredentialIDList: without UV, usable
    /// only when named in the allow list (not discoverable).
    UserVerificationOptionalWithCredentialIdList,
    /// 3, userVerificationRequired: usable only with UV.
    UserVerificationRequired,
}

impl CredProtect {
    /// The level as the extension carries it, 1 to 3.
    pub fn level(self) -> u8 {
        match self {
            Self::UserVerificationOptional => 1,
            Self::UserVerificationOptionalWithCredentialIdList => 2,
            Self::UserVerificationRequired => 3,
        }
    }

    /// The level numbered `level`; `None` outside 1 to 3.
    pub fn from_level(level: u8) -> Option<Self> {
        match level {
            1 => Some(Self::UserVerificationOptional),
            2 => Some(Self::UserVerificationOptionalWithCredentialIdList),
            3 => Some(Self::UserVerificationRequired),
            _ => None,
        }
    }
}

/// A new credential (the parts of the attestation object the backend keeps).
#[derive(Clone, Debug)]
pub struct Credential {
    /// The credential id: the key handle OpenSSH stores in the key file.
    pub id: Vec<u8>,
    /// The credential public key.
    pub public_key: CredentialPublicKey,
    /// The flags of the authenticator data.
    pub flags: AuthFlags,
    /// The signature counter.
    pub counter: u32,
}

/// authenticatorGetAssertion's parameters.
#[derive(Clone, Debug)]
pub struct GetAssertion {
    /// The relying party id: the sk key's application.
    pub rp_id: String,
    /// The data to sign; clientDataHash is its SHA-256 (PROTOCOL.u2f). The
    /// data, not the hash, crosses this trait because ctap-hid-fido2 hashes
    /// what it is given.
    pub message: Vec<u8>,
    /// The one allowed credential: the key handle.
    pub credential_id: Vec<u8>,
    /// Option "up": whether to wait for a touch. `false` is a silent probe
    /// (or a key made with no-touch-required).
    pub user_presence: bool,
    /// The PIN, when user verification is required.
    pub pin: Option<SecretString>,
}

/// An assertion: what the authenticator signed and its signature.
#[derive(Clone, Debug)]
pub struct Assertion {
    /// The authenticator flags (UP, UV).
    pub flags: AuthFlags,
    /// The signature counter.
    pub counter: u32,
    /// The signature over authenticatorData || clientDataHash: 64 raw bytes
    /// for Ed25519, ASN.1 DER for ES256.
    pub signature: Vec<u8>,
}

/// A credential stored on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentCredential {
    /// The relying party id ("ssh:..." for OpenSSH keys).
    pub rp_id: String,
    /// The credential id.
    pub credential_id: Vec<u8>,
    /// The user.
    pub user: User,
    /// The public key.
    pub public_key: CredentialPublicKey,
    /// Its credProtect level, when the device reports one.
    pub cred_protect: Option<CredProtect>,
}

/// What an authenticator answered instead of a result (CTAP 2.1 section 8.2
/// status codes, plus the transport's own failures).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CtapError {
    /// CTAP2_ERR_NO_CREDENTIALS: this device did not make the credential.
    #[error("the authenticator does not hold this credential")]
    NoCredentials,
    /// CTAP2_ERR_PIN_INVALID: a wrong PIN, with the retries left.
    #[error("wrong PIN ({retries} tries left)")]
    PinInvalid {
        /// Retries left, as getPINRetries reports after the failure.
        retries: u32,
    },
    /// CTAP2_ERR_PIN_BLOCKED: no retries left; only a reset helps.
    #[error("the PIN is blocked")]
    PinBlocked,
    /// CTAP2_ERR_PIN_AUTH_BLOCKED: three wrong PINs in a row; unplug the device.
    #[error("too many wrong PINs in a row; unplug the device and plug it in again")]
    PinAuthBlocked,
    /// CTAP2_ERR_PIN_REQUIRED / PIN_NOT_SET: the operation needs a PIN.
    #[error("the operation needs a PIN")]
    PinRequired,
    /// CTAP2_ERR_OPERATION_DENIED: the person refused (or the device did).
    #[error("the operation was denied on the authenticator")]
    OperationDenied,
    /// CTAP2_ERR_USER_ACTION_TIMEOUT: no touch within the device's wait.
    #[error("no touch within {seconds} s")]
    UserActionTimeout {
        /// How long the device waited.
        seconds: u64,
    },
    /// CTAP2_ERR_UNSUPPORTED_ALGORITHM / UNSUPPORTED_OPTION.
    #[error("unsupported by the authenticator: {0}")]
    Unsupported(String),
    /// The device went away.
    #[error("the authenticator was removed")]
    Removed,
    /// Anything else, with the device's words.
    #[error("{0}")]
    Other(String),
}
