//! Resident credentials and enrolment: the blocking steps a worker (or the
//! `token-agent fido` command) runs on one authenticator.

use rand_core::{OsRng, RngCore};
use secrecy::SecretString;

use crate::ctap::{Authenticator, CoseAlgorithm, CtapError, MakeCredential, User};
use crate::sk::{self, SkKey};

/// The OpenSSH keys stored on `device`: every resident credential whose
/// application starts with "ssh:", with that application. OpenSSH loads them
/// as keys that need a touch (`ssh-keygen -K`, `ssh-add -K`), and so do we.
pub fn ssh_keys(
    device: &dyn Authenticator,
    pin: Option<&SecretString>,
) -> Result<Vec<(SkKey, String)>, CtapError> {
    let mut keys = Vec::new();
    for credential in device.resident_credentials(pin)? {
        if !credential.rp_id.starts_with("ssh:") {
            continue;
        }
        match SkKey::from_credential(
            &credential.public_key,
            &credential.rp_id,
            sk::USER_PRESENCE_REQUIRED | sk::RESIDENT_KEY,
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
}

/// Makes a credential on `device` and returns the sk key for it.
pub fn enroll(device: &dyn Authenticator, enrolment: &Enrolment) -> Result<SkKey, EnrolError> {
    if !enrolment.application.starts_with("ssh:") {
        return Err(EnrolError::Application(enrolment.application.clone()));
    }
    // OpenSSH hashes a random challenge; nobody checks the attestation here.
    let mut challenge = [0u8; 32];
    OsRng.fill_bytes(&mut challenge);
    // As OpenSSH: a 32-byte zero user id unless one is given.
    let request = MakeCredential {
        rp_id: enrolment.application.clone(),
        challenge: challenge.to_vec(),
        user: User {
            id: vec![0; 32],
            name: enrolment.user.clone(),
        },
        algorithm: enrolment.algorithm,
        resident: enrolment.resident,
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
    /// The authenticator refused or failed.
    #[error(transparent)]
    Ctap(#[from] CtapError),
}
