//! Real authenticators over USB HID, through ctap-hid-fido2.
//!
//! Untested on physical keys: no hardware was at hand when this was written
//! (see the README's "Running the hardware tests"). The CTAP logic it feeds
//! is exercised against fido-sim.
//!
//! Three quirks of the library are handled here:
//! - it panics when hidapi cannot initialise (`HidApi::new().expect(..)`),
//!   for instance without /dev/hidraw* or without permission: enumeration
//!   runs under `catch_unwind` and only when a hidraw node exists;
//! - it prints "Touch the sensor" on stdout while the device waits: the
//!   keep-alive message is turned off (the agent's touch notice says it);
//! - it hashes the challenge it is given into clientDataHash, which is why
//!   [`GetAssertion`] carries the message, not its hash.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use ctap_hid_fido2::fidokey::credential_management::credential_management_params::CredentialProtectionPolicy;
use ctap_hid_fido2::fidokey::get_assertion::get_assertion_params::GetAssertionArgsBuilder;
use ctap_hid_fido2::fidokey::make_credential::make_credential_params::{
    CredentialSupportedKeyType, Extension as MakeCredentialExtension, MakeCredentialArgsBuilder,
};
use ctap_hid_fido2::public_key::{PublicKey, PublicKeyType};
use ctap_hid_fido2::public_key_credential_user_entity::PublicKeyCredentialUserEntity;
use ctap_hid_fido2::{FidoKeyHid, HidParam, LibCfg};
use secrecy::{ExposeSecret, SecretString};

use crate::backend::Discovery;
use crate::ctap::{
    Assertion, AuthFlags, Authenticator, CoseAlgorithm, CredProtect, Credential,
    CredentialPublicKey, CtapError, GetAssertion, Info, MakeCredential, ResidentCredential, User,
};

/// The FIDO HID devices plugged in now.
#[derive(Debug, Default, Clone, Copy)]
pub struct HidDiscovery;

impl Discovery for HidDiscovery {
    fn connected(&self) -> Vec<Arc<dyn Authenticator>> {
        if !hidraw_present() {
            return Vec::new();
        }
        match std::panic::catch_unwind(ctap_hid_fido2::get_fidokey_devices) {
            Ok(devices) => devices
                .into_iter()
                .filter_map(|device| match device.param {
                    HidParam::Path(path) => Some(Arc::new(HidAuthenticator {
                        path,
                        product: device.product_string,
                    }) as Arc<dyn Authenticator>),
                    HidParam::VidPid { .. } => None,
                })
                .collect(),
            Err(_) => {
                tracing::warn!(
                    "cannot open the HID subsystem; are the udev rules installed (see the README)?"
                );
                Vec::new()
            }
        }
    }
}

/// Whether any /dev/hidraw* node exists; without one hidapi would fail.
fn hidraw_present() -> bool {
    std::fs::read_dir("/dev").is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("hidraw"))
    })
}

/// One FIDO HID device, opened for each operation on its worker thread.
#[derive(Debug)]
struct HidAuthenticator {
    path: String,
    product: String,
}

impl HidAuthenticator {
    fn open(&self) -> Result<FidoKeyHid, CtapError> {
        let mut config = LibCfg::init();
        // The agent tells the person to touch; the library must not print.
        config.enable_keep_alive_msg = false;
        config.keep_alive_msg = String::new();
        config.enable_log = false;
        let params = [HidParam::Path(self.path.clone())];
        std::panic::catch_unwind(AssertUnwindSafe(|| FidoKeyHid::new(&params, &config)))
            .map_err(|_| CtapError::Removed)?
            .map_err(|_| CtapError::Removed)
    }
}

impl HidAuthenticator {
    /// A wrong PIN's error carries no count: ask the device for it.
    fn with_retries(&self, error: CtapError) -> CtapError {
        match error {
            CtapError::PinInvalid { .. } => match self.pin_retries() {
                Ok(0) => CtapError::PinBlocked,
                Ok(retries) => CtapError::PinInvalid { retries },
                Err(other) => other,
            },
            other => other,
        }
    }
}

impl Authenticator for HidAuthenticator {
    fn id(&self) -> String {
        format!("hid:{}", self.path)
    }

    fn label(&self) -> String {
        if self.product.is_empty() {
            "security key".to_owned()
        } else {
            self.product.clone()
        }
    }

    fn info(&self) -> Result<Info, CtapError> {
        let info = self.open()?.get_info().map_err(ctap_error)?;
        let option = |name: &str| info.options.iter().any(|(k, v)| k == name && *v);
        let mut aaguid = [0u8; 16];
        if info.aaguid.len() == 16 {
            aaguid.copy_from_slice(&info.aaguid);
        }
        Ok(Info {
            versions: info.versions.clone(),
            aaguid,
            client_pin_set: option("clientPin"),
            resident_keys: option("rk"),
            credential_management: option("credMgmt") || option("credentialMgmtPreview"),
            algorithms: info
                .algorithms
                .iter()
                .filter_map(|(_, alg)| alg.parse().ok())
                .collect(),
        })
    }

    fn make_credential(&self, request: &MakeCredential) -> Result<Credential, CtapError> {
        let key_type = match request.algorithm {
            CoseAlgorithm::EdDsa => CredentialSupportedKeyType::Ed25519,
            CoseAlgorithm::Es256 => CredentialSupportedKeyType::Ecdsa256,
        };
        let user = PublicKeyCredentialUserEntity::new(
            Some(&request.user.id),
            Some(&request.user.name),
            Some(&request.user.name),
        );
        let mut builder = MakeCredentialArgsBuilder::new(&request.rp_id, &request.challenge)
            .key_type(key_type)
            .user_entity(&user);
        builder = match &request.pin {
            Some(pin) => builder.pin(pin.expose_secret()),
            None => builder.without_pin_and_uv(),
        };
        if request.resident {
            builder = builder.resident_key();
        }
        let extensions;
        if let Some(level) = request.cred_protect {
            extensions = [MakeCredentialExtension::CredProtect(Some(match level {
                CredProtect::UserVerificationOptional => {
                    CredentialProtectionPolicy::UserVerificationOptional
                }
                CredProtect::UserVerificationOptionalWithCredentialIdList => {
                    CredentialProtectionPolicy::UserVerificationOptionalWithCredentialIdList
                }
                CredProtect::UserVerificationRequired => {
                    CredentialProtectionPolicy::UserVerificationRequired
                }
            }))];
            builder = builder.extensions(&extensions);
        }
        let attestation = self
            .open()?
            .make_credential_with_args(&builder.build())
            .map_err(|e| self.with_retries(ctap_error(e)))?;
        Ok(Credential {
            id: attestation.credential_descriptor.id.clone(),
            public_key: public_key(&attestation.credential_publickey)?,
            flags: AuthFlags(flags_byte(
                attestation.flags.user_present_result,
                attestation.flags.user_verified_result,
            )),
            counter: attestation.sign_count,
        })
    }

    fn get_assertion(&self, request: &GetAssertion) -> Result<Assertion, CtapError> {
        let mut builder = GetAssertionArgsBuilder::new(&request.rp_id, &request.message)
            .credential_id(&request.credential_id);
        builder = match &request.pin {
            Some(pin) => builder.pin(pin.expose_secret()),
            None => builder.without_pin_and_uv(),
        };
        if !request.user_presence {
            builder = builder.without_up();
        }
        let assertions = self
            .open()?
            .get_assertion_with_args(&builder.build())
            .map_err(|e| self.with_retries(ctap_error(e)))?;
        let assertion = assertions
            .into_iter()
            .next()
            .ok_or(CtapError::NoCredentials)?;
        Ok(Assertion {
            flags: AuthFlags(flags_byte(
                assertion.flags.user_present_result,
                assertion.flags.user_verified_result,
            )),
            counter: assertion.sign_count,
            signature: assertion.signature,
        })
    }

    fn pin_retries(&self) -> Result<u32, CtapError> {
        let retries = self.open()?.get_pin_retries().map_err(ctap_error)?;
        Ok(u32::try_from(retries).unwrap_or(0))
    }

    fn resident_credentials(
        &self,
        pin: Option<&SecretString>,
    ) -> Result<Vec<ResidentCredential>, CtapError> {
        let device = self.open()?;
        let pin = pin.map(|p| p.expose_secret());
        let mut found = Vec::new();
        for rp in device
            .credential_management_enumerate_rps(pin)
            .map_err(|e| self.with_retries(ctap_error(e)))?
        {
            for credential in device
                .credential_management_enumerate_credentials(pin, &rp.rpid_hash)
                .map_err(ctap_error)?
            {
                found.push(ResidentCredential {
                    rp_id: rp.public_key_credential_rp_entity.id.clone(),
                    credential_id: credential.public_key_credential_descriptor.id.clone(),
                    user: User {
                        id: credential.public_key_credential_user_entity.id.clone(),
                        name: credential.public_key_credential_user_entity.name.clone(),
                    },
                    public_key: public_key(&credential.public_key)?,
                    cred_protect: match credential.cred_protect {
                        CredentialProtectionPolicy::UserVerificationOptional => {
                            Some(CredProtect::UserVerificationOptional)
                        }
                        CredentialProtectionPolicy::UserVerificationOptionalWithCredentialIdList => {
                            Some(CredProtect::UserVerificationOptionalWithCredentialIdList)
                        }
                        CredentialProtectionPolicy::UserVerificationRequired => {
                            Some(CredProtect::UserVerificationRequired)
                        }
                        CredentialProtectionPolicy::Unknown => None,
                    },
                });
            }
        }
        Ok(found)
    }
}

fn flags_byte(user_present: bool, user_verified: bool) -> u8 {
    let mut flags = 0;
    if user_present {
        flags |= AuthFlags::USER_PRESENT;
    }
    if user_verified {
        flags |= AuthFlags::USER_VERIFIED;
    }
    flags
}

/// The point at the end of the SubjectPublicKeyInfo the library returns.
fn public_key(key: &PublicKey) -> Result<CredentialPublicKey, CtapError> {
    let der = &key.der;
    match key.key_type {
        PublicKeyType::Ed25519 if der.len() >= 32 => {
            let mut point = [0u8; 32];
            point.copy_from_slice(&der[der.len() - 32..]);
            Ok(CredentialPublicKey::Ed25519(point))
        }
        PublicKeyType::Ecdsa256 if der.len() >= 65 => {
            Ok(CredentialPublicKey::P256(der[der.len() - 65..].to_vec()))
        }
        _ => Err(CtapError::Unsupported(
            "a credential key that is neither Ed25519 nor P-256".into(),
        )),
    }
}

/// The library reports CTAP status codes in its error text ("0x31
/// CTAP2_ERR_PIN_INVALID ..."); map the ones a person must hear about.
fn ctap_error(error: anyhow::Error) -> CtapError {
    let text = format!("{error:#}");
    let has = |code: &str| text.contains(code);
    if has("read err") || has("write error") {
        // hidapi could not read or write the device: it was pulled out in
        // the middle of the operation. ctap-hid-fido2 3.6 says "read err =
        // 0xFE" while it waits for the answer, "read error" or "write error"
        // elsewhere, with no status code from the device.
        CtapError::Removed
    } else if has("CTAP2_ERR_NO_CREDENTIALS") {
        CtapError::NoCredentials
    } else if has("CTAP2_ERR_PIN_INVALID") {
        CtapError::PinInvalid { retries: 0 }
    } else if has("CTAP2_ERR_PIN_BLOCKED") {
        CtapError::PinBlocked
    } else if has("CTAP2_ERR_PIN_AUTH_BLOCKED") {
        CtapError::PinAuthBlocked
    } else if has("CTAP2_ERR_PIN_REQUIRED") || has("CTAP2_ERR_PIN_NOT_SET") {
        CtapError::PinRequired
    } else if has("CTAP2_ERR_OPERATION_DENIED") {
        CtapError::OperationDenied
    } else if has("CTAP2_ERR_USER_ACTION_TIMEOUT") || has("CTAP2_ERR_KEEPALIVE_CANCEL") {
        CtapError::UserActionTimeout { seconds: 30 }
    } else {
        CtapError::Other(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_pulled_out_mid_operation_is_removed_not_a_device_error() {
        // The texts ctap-hid-fido2 3.6.1 makes when hidapi's read or write
        // fails (ctaphid.rs, fidokey/mod.rs).
        for text in ["read err = 0xFE", "read error", "write error"] {
            assert!(
                matches!(ctap_error(anyhow::anyhow!(text)), CtapError::Removed),
                "{text}"
            );
        }
        assert!(matches!(
            ctap_error(anyhow::anyhow!(
                "response_status err = 0x31 CTAP2_ERR_PIN_INVALID PIN Invalid."
            )),
            CtapError::PinInvalid { .. }
        ));
        assert!(matches!(
            ctap_error(anyhow::anyhow!("ciborium parse error")),
            CtapError::Other(_)
        ));
    }
}
