//! fido-sim as an OpenSSH security-key middleware.
//!
//! [`Middleware`] implements the sk-api [`Provider`] trait; the
//! `fido_sim_middleware` example exports it (through
//! [`token_agent_sk_api::export_provider!`]) as a `cdylib`, so OpenSSH's own
//! tools make and use keys on the simulator:
//!
//! ```text
//! cargo build -p fido-sim --example fido_sim_middleware
//! TOKEN_AGENT_FIDO_SIM=/tmp/sim.json ssh-keygen -t ed25519-sk \
//!     -w target/debug/examples/libfido_sim_middleware.so
//! ```
//!
//! Each call opens the simulator in the state file [`STATE_ENV`] names (made
//! fresh when missing), so the middleware, the `token-agent fido` commands and
//! the agent's attached simulator all share one authenticator: a key handle
//! made through OpenSSH signs through the agent's own CTAP code and back.
//! ssh-keygen runs the middleware inside `ssh-sk-helper`, which inherits the
//! environment.
//!
//! It behaves as OpenSSH's own middleware (`sk-usbhid.c`) over a security
//! key: `sk_sign` hashes `data` with SHA-256 into the clientDataHash, asks for
//! presence only under SSH_SK_USER_PRESENCE_REQD, answers
//! SSH_SK_ERR_PIN_REQUIRED for a missing or a wrong PIN (sk-api.h has no other
//! code for it), and SSH_SK_ERR_GENERAL for a refused or missed touch and for a
//! handle the device does not know.
//!
//! Test-only environment (never set outside tests):
//!
//! - [`PRESENCE_ENV`]: `touch` (default), `deny`, or `never` (wait until the
//!   touch timeout, [`TOUCH_TIMEOUT_ENV`] milliseconds or 30 s);
//! - [`ALWAYS_UV_ENV`]: `1` makes the device demand the PIN for every
//!   signature, whatever the key's flags (a CTAP 2.1 authenticator with
//!   `alwaysUv` set), so that `sk_sign` without a PIN answers
//!   SSH_SK_ERR_PIN_REQUIRED;
//! - [`FAULT_ENV`]: `crash-in-sign` aborts the process inside `sk_sign`,
//!   `hang-in-sign` never returns from it: a broken middleware, for the agent's
//!   isolation tests.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use token_agent_fido::ctap::{
    CoseAlgorithm, CredProtect, CredentialPublicKey, CtapError, GetAssertion, MakeCredential, User,
};
use token_agent_fido::Authenticator;
use token_agent_sk_api::{
    Algorithm, EnrollRequest, EnrollResponse, Provider, ResidentKey, SignRequest, SignResponse,
    SkError, SkOption, RESIDENT_KEY, USER_PRESENCE_REQD, USER_VERIFICATION_REQD,
};

use crate::{Presence, Simulator};

/// The state file of the simulated authenticator (shared with the agent's
/// `fido-sim` build, which reads the same variable).
pub const STATE_ENV: &str = "TOKEN_AGENT_FIDO_SIM";

/// How the simulated person answers presence: `touch`, `deny` or `never`.
pub const PRESENCE_ENV: &str = "TOKEN_AGENT_FIDO_SIM_PRESENCE";

/// Milliseconds a request for presence waits before it times out.
pub const TOUCH_TIMEOUT_ENV: &str = "TOKEN_AGENT_FIDO_SIM_TOUCH_TIMEOUT_MS";

/// `1`: every signature needs the PIN (CTAP 2.1 alwaysUv).
pub const ALWAYS_UV_ENV: &str = "TOKEN_AGENT_FIDO_SIM_ALWAYS_UV";

/// Test only: `crash-in-sign`, `hang-in-sign`, or `read-stdin-in-sign` (reads
/// standard input before signing, as `getpass()` does without a terminal).
pub const FAULT_ENV: &str = "TOKEN_AGENT_FIDO_SIM_FAULT";

/// The middleware: a simulator opened from [`STATE_ENV`] for each call.
#[derive(Debug, Default)]
pub struct Middleware;

impl Provider for Middleware {
    fn enroll(&self, request: &EnrollRequest<'_>) -> Result<EnrollResponse, SkError> {
        let sim = simulator()?;
        let credential = sim
            .make_credential(&MakeCredential {
                rp_id: request.application.to_owned(),
                challenge: request.challenge.to_vec(),
                user: User {
                    id: user_id(request.options)?,
                    name: "openssh".into(),
                },
                algorithm: cose(request.algorithm),
                resident: request.flags & RESIDENT_KEY != 0,
                // As sk-usbhid: verify-required keys need UV, resident keys
                // need their handle or UV.
                cred_protect: if request.flags & USER_VERIFICATION_REQD != 0 {
                    Some(CredProtect::UserVerificationRequired)
                } else if request.flags & RESIDENT_KEY != 0 {
                    Some(CredProtect::UserVerificationOptionalWithCredentialIdList)
                } else {
                    None
                },
                pin: request.pin.map(|pin| SecretString::from(pin.to_owned())),
            })
            .map_err(sk_error)?;
        Ok(EnrollResponse {
            // The key file carries the flags asked for, as with sk-usbhid.
            flags: request.flags,
            public_key: public_key(&credential.public_key),
            key_handle: credential.id,
            // No attestation: nothing in these tests checks one.
            ..EnrollResponse::default()
        })
    }

    fn sign(&self, request: &SignRequest<'_>) -> Result<SignResponse, SkError> {
        fault_in_sign()?;
        let sim = simulator()?;
        // sk-usbhid asks the device for UV without a PIN, which a key without
        // built-in verification refuses: the caller must come back with one.
        // A device with alwaysUv refuses every assertion without it.
        let always_uv = std::env::var(ALWAYS_UV_ENV).is_ok_and(|v| v == "1");
        if (always_uv || request.flags & USER_VERIFICATION_REQD != 0) && request.pin.is_none() {
            return Err(SkError::PinRequired);
        }
        let assertion = sim
            .get_assertion(&GetAssertion {
                rp_id: request.application.to_owned(),
                // The simulator's clientDataHash is SHA-256 of this, as
                // sk-usbhid hashes `data` before it goes to the device.
                message: request.data.to_vec(),
                credential_id: request.key_handle.to_vec(),
                user_presence: request.flags & USER_PRESENCE_REQD != 0,
                pin: request.pin.map(|pin| SecretString::from(pin.to_owned())),
            })
            .map_err(sk_error)?;
        let (sig_r, sig_s) = match request.algorithm {
            // A handle of the other type signs, but not as the caller expects.
            Algorithm::Ed25519 if assertion.signature.len() == 64 => {
                (assertion.signature, Vec::new())
            }
            Algorithm::Ed25519 => return Err(SkError::General),
            Algorithm::Ecdsa => {
                let signature = p256::ecdsa::Signature::from_der(&assertion.signature)
                    .map_err(|_| SkError::General)?;
                let (r, s) = signature.split_bytes();
                // Big-endian integers without leading zeros, as BN_bn2bin gives them.
                (minimal(&r), minimal(&s))
            }
        };
        Ok(SignResponse {
            flags: assertion.flags.0,
            counter: assertion.counter,
            sig_r,
            sig_s,
        })
    }

    fn load_resident_keys(
        &self,
        pin: Option<&str>,
        _options: &[SkOption],
    ) -> Result<Vec<ResidentKey>, SkError> {
        let sim = simulator()?;
        // Credential management needs a pinUvAuthToken, hence the PIN.
        let pin = SecretString::from(pin.ok_or(SkError::PinRequired)?.to_owned());
        let credentials = sim.resident_credentials(Some(&pin)).map_err(sk_error)?;
        Ok(credentials
            .into_iter()
            .filter(|credential| credential.rp_id.starts_with("ssh:"))
            .enumerate()
            .map(|(slot, credential)| ResidentKey {
                alg: match credential.public_key.algorithm() {
                    CoseAlgorithm::EdDsa => Algorithm::Ed25519,
                    CoseAlgorithm::Es256 => Algorithm::Ecdsa,
                }
                .code(),
                slot,
                key: EnrollResponse {
                    public_key: public_key(&credential.public_key),
                    key_handle: credential.credential_id,
                    ..EnrollResponse::default()
                },
                application: credential.rp_id,
                // As sk-usbhid's read_rks: a credential that needs UV is a
                // verify-required key.
                flags: if credential.cred_protect == Some(CredProtect::UserVerificationRequired) {
                    USER_VERIFICATION_REQD
                } else {
                    0
                },
                user_id: credential.user.id,
            })
            .collect())
    }
}

/// The simulator of [`STATE_ENV`], with presence and timeout from the environment.
fn simulator() -> Result<Simulator, SkError> {
    let Some(path) = std::env::var_os(STATE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
    else {
        eprintln!("fido-sim middleware: {STATE_ENV} names no state file: no security key");
        return Err(SkError::DeviceNotFound);
    };
    let sim = Simulator::open("middleware", &path).map_err(|err| {
        eprintln!("fido-sim middleware: cannot open {}: {err}", path.display());
        SkError::DeviceNotFound
    })?;
    let presence = match std::env::var(PRESENCE_ENV).as_deref() {
        Err(_) | Ok("" | "touch") => Presence::Auto,
        Ok("deny") => Presence::Deny,
        // Nobody touches a middleware's simulator: waiting ends in a timeout.
        Ok("never") => Presence::Wait,
        Ok(other) => {
            eprintln!("fido-sim middleware: {PRESENCE_ENV}={other} is not touch, deny or never");
            return Err(SkError::General);
        }
    };
    sim.control().set_presence(presence);
    if let Some(millis) = std::env::var(TOUCH_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        sim.set_touch_timeout(Duration::from_millis(millis));
    }
    Ok(sim)
}

/// Crashes or hangs when the test-only [`FAULT_ENV`] says so.
fn fault_in_sign() -> Result<(), SkError> {
    match std::env::var(FAULT_ENV).as_deref() {
        Err(_) | Ok("") => Ok(()),
        Ok("crash-in-sign") => {
            eprintln!("fido-sim middleware: {FAULT_ENV}=crash-in-sign: aborting in sk_sign");
            std::process::abort()
        }
        Ok("read-stdin-in-sign") => {
            // Whatever standard input holds is read and ignored; at its end
            // (or on an error) the signature goes on.
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            Ok(())
        }
        Ok("hang-in-sign") => {
            eprintln!(
                "fido-sim middleware: {FAULT_ENV}=hang-in-sign: never returning from sk_sign"
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Ok(other) => {
            eprintln!(
                "fido-sim middleware: {FAULT_ENV}={other} is not crash-in-sign, hang-in-sign \
                 or read-stdin-in-sign"
            );
            Err(SkError::General)
        }
    }
}

/// The user id OpenSSH asks for: 32 zero bytes, or the `user` option's text
/// in them, as sk-usbhid makes it (31 characters at most).
fn user_id(options: &[SkOption]) -> Result<Vec<u8>, SkError> {
    let mut id = vec![0u8; 32];
    for option in options {
        match option.name.as_str() {
            "user" => {
                let user = option.value.as_bytes();
                if user.len() >= id.len() {
                    return Err(SkError::General);
                }
                id[..user.len()].copy_from_slice(user);
            }
            // One simulated device: any device path names it.
            "device" => {}
            _ if option.required => return Err(SkError::General),
            _ => {}
        }
    }
    Ok(id)
}

fn cose(algorithm: Algorithm) -> CoseAlgorithm {
    match algorithm {
        Algorithm::Ed25519 => CoseAlgorithm::EdDsa,
        Algorithm::Ecdsa => CoseAlgorithm::Es256,
    }
}

/// The public key as sk-api carries it: 32 bytes, or SEC1 uncompressed.
fn public_key(key: &CredentialPublicKey) -> Vec<u8> {
    match key {
        CredentialPublicKey::Ed25519(point) => point.to_vec(),
        CredentialPublicKey::P256(sec1) => sec1.clone(),
    }
}

fn minimal(integer: &[u8]) -> Vec<u8> {
    let start = integer
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(integer.len());
    integer[start..].to_vec()
}

/// What sk-usbhid answers for each CTAP failure (its `fidoerr_to_skerr`).
fn sk_error(error: CtapError) -> SkError {
    match error {
        CtapError::PinRequired | CtapError::PinInvalid { .. } => SkError::PinRequired,
        CtapError::Unsupported(_) => SkError::Unsupported,
        CtapError::Removed => SkError::DeviceNotFound,
        _ => SkError::General,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_padded_to_32_bytes_as_openssh_makes_them() {
        assert_eq!(user_id(&[]).unwrap(), vec![0; 32]);
        let id = user_id(&[SkOption {
            name: "user".into(),
            value: "alice".into(),
            required: false,
        }])
        .unwrap();
        assert_eq!(&id[..5], b"alice");
        assert!(id[5..].iter().all(|&b| b == 0));
        let unknown = SkOption {
            name: "colour".into(),
            value: "blue".into(),
            required: true,
        };
        assert_eq!(user_id(&[unknown]).unwrap_err(), SkError::General);
    }

    #[test]
    fn integers_lose_their_leading_zeros() {
        assert_eq!(minimal(&[0, 0, 1, 2]), vec![1, 2]);
        assert_eq!(minimal(&[0, 0]), Vec::<u8>::new());
    }

    #[test]
    fn ctap_failures_map_as_in_sk_usbhid() {
        assert_eq!(
            sk_error(CtapError::PinInvalid { retries: 3 }),
            SkError::PinRequired
        );
        assert_eq!(sk_error(CtapError::NoCredentials), SkError::General);
        assert_eq!(sk_error(CtapError::Removed), SkError::DeviceNotFound);
    }
}
