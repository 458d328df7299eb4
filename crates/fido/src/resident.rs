//! Resident credentials and enrolment: the blocking steps a worker (or the
//! `token-agent fido` command) runs on one authenticator.

use rand_core::{OsRng, RngCore};
use secrecy::SecretString;

use crate::ctap::{Authenticator, CoseAlgorithm, CredProtect, CtapError, MakeCredential, User};
use crate::sk::{self, SkKey};

/// The OpenSSH keys stored on `device`: every resident credential whose
/// application starts with "ssh:", with that application. OpenSSH loads them
/// as keys that need a touch (`ssh-keygen -K`, `ssh-add -K`), and so do we;
/// like OpenSSH's sk-usbhid (`read_rks`), a credential whose credProtect is
/// userVerificationRequired becomes a verify-required key: the device hides
/// it from any getAssertion without the PIN, so without the flag it could
/// never sign.
pub fn ssh_keys(
    device: &dyn Authenticator,
    pin: Option<&SecretString>,
) -> Result<Vec<(SkKey, String)>, CtapError> {
    let mut keys = Vec::new();
    for credential in device.resident_credentials(pin)? {
        if !credential.rp_id.starts_with("ssh:") {
            continue;
        }
        let mut flags = sk::USER_PRESENCE_REQUIRED | sk::RESIDENT_KEY;
        if credential.cred_protect == Some(CredProtect::UserVerificationRequired) {
            flags |= sk::USER_VERIFICATION_REQUIRED;
        }
        match SkKey::from_credential(
            &credential.public_key,
            &credential.rp_id,
            flags,
            credential.credential_id.clone(),
        ) {
            Ok(key) => keys.push((key, credential.rp_id)),
            Err(err) => {
                tracing::warn!(rp_id = credential.rp_id, %err, "skipping a resident credential")
            }
        }
    }
    Ok(keys)
}

/// What to enrol: the options of `ssh-keygen -t ed25519-sk` / `ecdsa-sk`.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// Ed25519 or ES256.
    pub algorithm: CoseAlgorithm,
    /// The application ("ssh:" or "ssh:NAME").
    pub application: String,
    /// Store the credential on the device (`-O resident`).
    pub resident: bool,
    /// Require the PIN for every signature (`-O verify-required`).
    pub verify_required: bool,
    /// Sign without a touch (`-O no-touch-required`).
    pub no_touch_required: bool,
    /// The user name stored with a resident credential.
    pub user: String,
    /// The PIN, needed by devices with a PIN set for resident credentials or
    /// verify-required keys.
    pub pin: Option<SecretString>,
}

impl Enrolment {
    /// The SSH_SK_* flags the key file records.
    pub fn flags(&self) -> u8 {
        let mut flags = 0;
        if !self.no_touch_required {
            flags |= sk::USER_PRESENCE_REQUIRED;
        }
        if self.verify_required {
            flags |= sk::USER_VERIFICATION_REQUIRED;
        }
        if self.resident {
            flags |= sk::RESIDENT_KEY;
        }
        flags
    }

    /// The credProtect level asked of the device, as OpenSSH's sk-usbhid
    /// chooses it: a verify-required key is usable only with the PIN (level
    /// 3), a resident key only by whoever has its key handle or the PIN
    /// (level 2, so that `ssh-add -K` on a borrowed key needs the PIN); other
    /// keys get the device's default.
    pub fn cred_protect(&self) -> Option<CredProtect> {
        if self.verify_required {
            Some(CredProtect::UserVerificationRequired)
        } else if self.resident {
            Some(CredProtect::UserVerificationOptionalWithCredentialIdList)
        } else {
            None
        }
    }
}

/// Makes a credential on `device` and returns the sk key for it. A resident
/// key is refused when the device already holds one for the same
/// application and user, as `ssh-keygen` refuses without `-O force`: the
/// device would replace the old credential (CTAP 2.1 section 6.1.2), and the
/// old key would be gone. Checking needs the PIN (credential management), so
/// without one (a device with no PIN set) nothing is checked.
pub fn enroll(device: &dyn Authenticator, enrolment: &Enrolment) -> Result<SkKey, EnrolError> {
    make(device, enrolment, false)
}

/// [`enroll`], replacing a resident credential the device holds for the same
/// application and user (`ssh-keygen -O force`).
pub fn enroll_replacing(
    device: &dyn Authenticator,
    enrolment: &Enrolment,
) -> Result<SkKey, EnrolError> {
    make(device, enrolment, true)
}

fn make(
    device: &dyn Authenticator,
    enrolment: &Enrolment,
    replace: bool,
) -> Result<SkKey, EnrolError> {
    if !enrolment.application.starts_with("ssh:") {
        return Err(EnrolError::Application(enrolment.application.clone()));
    }
    // As OpenSSH: a 32-byte zero user id unless one is given.
    let user_id = vec![0; 32];
    if let (true, false, Some(pin)) = (enrolment.resident, replace, &enrolment.pin) {
        let exists = device
            .resident_credentials(Some(pin))?
            .iter()
            .any(|c| c.rp_id == enrolment.application && c.user.id == user_id);
        if exists {
            return Err(EnrolError::CredentialExists(enrolment.application.clone()));
        }
    }
    // OpenSSH hashes a random challenge; nobody checks the attestation here.
    let mut challenge = [0u8; 32];
    OsRng.fill_bytes(&mut challenge);
    let request = MakeCredential {
        rp_id: enrolment.application.clone(),
        challenge: challenge.to_vec(),
        user: User {
            id: user_id,
            name: enrolment.user.clone(),
        },
        algorithm: enrolment.algorithm,
        resident: enrolment.resident,
        cred_protect: enrolment.cred_protect(),
        pin: enrolment.pin.clone(),
    };
    let credential = device.make_credential(&request)?;
    if credential.public_key.algorithm() != enrolment.algorithm {
        return Err(EnrolError::Ctap(CtapError::Other(
            "the authenticator made a key of another type".into(),
        )));
    }
    SkKey::from_credential(
        &credential.public_key,
        &enrolment.application,
        enrolment.flags(),
        credential.id,
    )
    .map_err(|e| EnrolError::Ctap(CtapError::Other(e.to_string())))
}

/// Why an enrolment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrolError {
    /// OpenSSH only accepts applications that start with "ssh:".
    #[error("the application {0:?} does not start with \"ssh:\"")]
    Application(String),
    /// The device already holds a resident key for this application and user.
    #[error(
        "the security key already holds a resident key for {0}, which a new one would replace \
         (the old key would be lost); choose another application (ssh:NAME), or replace it \
         with --force"
    )]
    CredentialExists(String),
    /// The authenticator refused or failed.
    #[error(transparent)]
    Ctap(#[from] CtapError),
}
