//! fido-sim: a software CTAP 2.1 authenticator for token-agent's tests.
//!
//! It implements [`token_agent_fido::Authenticator`] the way a security key
//! behaves, and knows nothing of the backend that calls it:
//!
//! - Ed25519 (COSE -8) and ES256 (COSE -7) credentials;
//! - key handles that wrap the private key: AES-256-GCM under the simulator's
//!   master key, bound to the relying party id, as real tokens make
//!   non-resident credentials, so a handle from another authenticator or for
//!   another application is refused with CTAP2_ERR_NO_CREDENTIALS;
//! - resident credentials, listed through credential management (PIN needed);
//! - the credProtect extension (CTAP 2.1 section 12.1), levels 1 to 3, kept
//!   in the key handle: a level 3 credential is invisible to getAssertion
//!   without user verification, and credential management reports each
//!   credential's level;
//! - a signature counter that grows with every signature;
//! - the UP and UV flags;
//! - a client PIN with 8 retries that blocks at zero;
//! - user presence given through a [`Control`] handle: touched at once
//!   ([`Presence::Auto`]), waited for until [`Control::touch`] or
//!   [`Control::deny`] or the touch timeout ([`Presence::Wait`]), or refused
//!   ([`Presence::Deny`]); and unplugging ([`Control::set_connected`]).
//!
//! A simulator lives in memory ([`Simulator::new`]) or in a state file
//! ([`Simulator::open`]) that several processes may share one after the
//! other (the enrolment command, then the agent). [`serve_control`] puts the
//! control handle on a Unix socket so a test can touch the simulated key of
//! an agent running in another process.
//!
//! The crate also builds an OpenSSH security-key middleware over the same
//! state file, `libfido_sim_middleware.so` (the `fido_sim_middleware` example,
//! a cdylib; see [`middleware`]), so that OpenSSH's own `ssh-keygen -w` and
//! `ssh-add -S` make and use keys on the simulator.
//!
//! # Example
//!
//! ```
//! use token_agent_fido::ctap::{CoseAlgorithm, GetAssertion, MakeCredential, User};
//! use token_agent_fido::{sk, Authenticator};
//!
//! let sim = fido_sim::Simulator::new("sim");
//! let credential = sim
//!     .make_credential(&MakeCredential {
//!         rp_id: "ssh:".into(),
//!         challenge: b"challenge".to_vec(),
//!         user: User::default(),
//!         algorithm: CoseAlgorithm::EdDsa,
//!         resident: false,
//!         cred_protect: None,
//!         pin: None,
//!     })
//!     .unwrap();
//! let assertion = sim
//!     .get_assertion(&GetAssertion {
//!         rp_id: "ssh:".into(),
//!         message: b"data".to_vec(),
//!         credential_id: credential.id,
//!         user_presence: true,
//!         pin: None,
//!     })
//!     .unwrap();
//! assert!(assertion.flags.user_present());
//! assert_eq!(assertion.counter, 2);
//! ```

#![forbid(unsafe_code)]

mod control;
mod crypto;
pub mod middleware;
mod state;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use token_agent_fido::ctap::{
    Assertion, AuthFlags, CredProtect, Credential, CtapError, GetAssertion, Info, MakeCredential,
    ResidentCredential, User,
};
use token_agent_fido::{sk, Authenticator};

pub use control::{serve_control, Control, Presence};

use crate::control::Shared;
use crate::state::{State, StoredResident};

/// How many PIN retries a fresh or reset PIN has (CTAP 2.1 section 6.5.2.1: 8).
pub const PIN_RETRIES: u32 = 8;

/// How long a real key waits for a touch before CTAP2_ERR_USER_ACTION_TIMEOUT.
pub const DEFAULT_TOUCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A simulated authenticator.
pub struct Simulator {
    name: String,
    state: Mutex<State>,
    file: Option<PathBuf>,
    shared: Arc<Shared>,
}

impl Simulator {
    /// A fresh authenticator in memory, called `name`, with no PIN.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: Mutex::new(State::fresh()),
            file: None,
            shared: Arc::new(Shared::new(DEFAULT_TOUCH_TIMEOUT)),
        }
    }

    /// The authenticator whose state lives in `path`, made fresh if the file
    /// does not exist. The state is read before and written after every
    /// operation, so processes that take turns see one device.
    pub fn open(name: &str, path: &Path) -> std::io::Result<Self> {
        let state = match std::fs::read(path) {
            Ok(bytes) => State::parse(&bytes)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let state = State::fresh();
                state.save(path)?;
                state
            }
            Err(err) => return Err(err),
        };
        Ok(Self {
            name: name.to_owned(),
            state: Mutex::new(state),
            file: Some(path.to_owned()),
            shared: Arc::new(Shared::new(DEFAULT_TOUCH_TIMEOUT)),
        })
    }

    /// The handle that touches, denies, waits and unplugs.
    pub fn control(&self) -> Control {
        Control::new(self.shared.clone())
    }

    /// Sets the client PIN (authenticatorClientPIN setPIN / changePIN) and
    /// resets its retries.
    pub fn set_pin(&self, pin: &str) -> std::io::Result<()> {
        self.update(|state| {
            state.pin = Some(pin.to_owned());
            state.retries = PIN_RETRIES;
        })
    }

    /// How long an operation waits for a touch in [`Presence::Wait`].
    pub fn set_touch_timeout(&self, timeout: Duration) {
        self.shared.set_timeout(timeout);
    }

    /// The signature counter.
    pub fn counter(&self) -> u32 {
        self.with_state(|state| state.counter).unwrap_or(0)
    }

    /// How many resident credentials the device stores.
    pub fn resident_count(&self) -> usize {
        self.with_state(|state| state.residents.len()).unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // State is replaced whole or updated in steps that leave it valid.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the state file (if any) into memory, runs `f`, and writes back.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> std::io::Result<R> {
        let mut state = self.lock();
        if let Some(path) = &self.file {
            *state = State::parse(&std::fs::read(path)?)?;
        }
        let result = f(&mut state);
        if let Some(path) = &self.file {
            state.save(path)?;
        }
        Ok(result)
    }

    fn with_state<R>(&self, f: impl FnOnce(&State) -> R) -> std::io::Result<R> {
        let mut state = self.lock();
        if let Some(path) = &self.file {
            *state = State::parse(&std::fs::read(path)?)?;
        }
        Ok(f(&state))
    }

    fn ensure_connected(&self) -> Result<(), CtapError> {
        if self.shared.connected() {
            Ok(())
        } else {
            Err(CtapError::Removed)
        }
    }

    /// Checks `pin` as authenticatorClientPIN does: a wrong PIN costs a retry,
    /// the last one blocks it, a right one restores all retries.
    fn verify_pin(&self, pin: &SecretString) -> Result<(), CtapError> {
        self.update(|state| {
            let Some(expected) = state.pin.clone() else {
                return Err(CtapError::PinRequired);
            };
            if state.retries == 0 {
                return Err(CtapError::PinBlocked);
            }
            if crypto::constant_time_eq(expected.as_bytes(), pin.expose_secret().as_bytes()) {
                state.retries = PIN_RETRIES;
                Ok(())
            } else {
                state.retries -= 1;
                if state.retries == 0 {
                    Err(CtapError::PinBlocked)
                } else {
                    Err(CtapError::PinInvalid {
                        retries: state.retries,
                    })
                }
            }
        })
        .map_err(io_error)?
    }

    /// Counts one more signature and returns the new counter.
    fn next_counter(&self) -> Result<u32, CtapError> {
        self.update(|state| {
            state.counter = state.counter.wrapping_add(1);
            state.counter
        })
        .map_err(io_error)
    }
}

impl Authenticator for Simulator {
    fn id(&self) -> String {
        format!("fido-sim:{}", self.name)
    }

    fn label(&self) -> String {
        format!("fido-sim {}", self.name)
    }

    fn info(&self) -> Result<Info, CtapError> {
        self.ensure_connected()?;
        let (aaguid, pin_set) = self
            .with_state(|state| (state.aaguid, state.pin.is_some()))
            .map_err(io_error)?;
        Ok(Info {
            versions: vec!["FIDO_2_0".into(), "FIDO_2_1".into()],
            aaguid,
            client_pin_set: pin_set,
            resident_keys: true,
            credential_management: true,
            algorithms: vec![-8, -7],
        })
    }

    fn make_credential(&self, request: &MakeCredential) -> Result<Credential, CtapError> {
        self.ensure_connected()?;
        let pin_set = self
            .with_state(|state| state.pin.is_some())
            .map_err(io_error)?;
        let mut flags = AuthFlags::ATTESTED;
        match &request.pin {
            Some(pin) => {
                self.verify_pin(pin)?;
                flags |= AuthFlags::USER_VERIFIED;
            }
            // CTAP 2.1 section 6.1.2 step 6: with a PIN set, a credential needs
            // user verification (no makeCredUvNotRqd on this device).
            None if pin_set => return Err(CtapError::PinRequired),
            None => {}
        }
        // makeCredential always tests user presence.
        self.shared.wait_for_presence()?;
        flags |= AuthFlags::USER_PRESENT;
        let master = self
            .with_state(|state| state.master_key)
            .map_err(io_error)?;
        // Without the extension a credential is level 1 (CTAP 2.1 section 12.1).
        let cred_protect = request
            .cred_protect
            .unwrap_or(CredProtect::UserVerificationOptional);
        let (id, public_key) =
            crypto::new_credential(&master, &request.rp_id, request.algorithm, cred_protect)?;
        if request.resident {
            let stored = StoredResident {
                rp_id: request.rp_id.clone(),
                credential_id: id.clone(),
                user_id: request.user.id.clone(),
                user_name: request.user.name.clone(),
            };
            self.update(|state| {
                // A new credential for the same RP and user replaces the old one.
                state
                    .residents
                    .retain(|r| r.rp_id != stored.rp_id || r.user_id != stored.user_id);
                state.residents.push(stored);
            })
            .map_err(io_error)?;
        }
        let counter = self.next_counter()?;
        Ok(Credential {
            id,
            public_key,
            flags: AuthFlags(flags),
            counter,
        })
    }

    fn get_assertion(&self, request: &GetAssertion) -> Result<Assertion, CtapError> {
        self.ensure_connected()?;
        let master = self
            .with_state(|state| state.master_key)
            .map_err(io_error)?;
        let secret = crypto::unwrap(&master, &request.rp_id, &request.credential_id)
            .ok_or(CtapError::NoCredentials)?;
        // CTAP 2.1 section 6.2.2 step 7: without user verification a
        // userVerificationRequired credential is left out, even when the
        // allow list names it (levels 1 and 2 are usable when named).
        if secret.cred_protect() == CredProtect::UserVerificationRequired && request.pin.is_none() {
            return Err(CtapError::NoCredentials);
        }
        let mut flags = 0;
        if let Some(pin) = &request.pin {
            self.verify_pin(pin)?;
            flags |= AuthFlags::USER_VERIFIED;
        }
        if request.user_presence {
            self.shared.wait_for_presence()?;
            flags |= AuthFlags::USER_PRESENT;
        }
        // A silent probe (up = false) still counts, as on real keys.
        let counter = self.next_counter()?;
        let client_data_hash = sk::client_data_hash(&request.message);
        let signature =
            crypto::sign_assertion(&secret, &request.rp_id, flags, counter, &client_data_hash)?;
        Ok(Assertion {
            flags: AuthFlags(flags),
            counter,
            signature,
        })
    }

    fn pin_retries(&self) -> Result<u32, CtapError> {
        self.ensure_connected()?;
        self.with_state(|state| state.retries).map_err(io_error)
    }

    fn resident_credentials(
        &self,
        pin: Option<&SecretString>,
    ) -> Result<Vec<ResidentCredential>, CtapError> {
        self.ensure_connected()?;
        // Credential management needs a pinUvAuthToken, hence a PIN.
        let pin = pin.ok_or(CtapError::PinRequired)?;
        self.verify_pin(pin)?;
        let (master, residents) = self
            .with_state(|state| (state.master_key, state.residents.clone()))
            .map_err(io_error)?;
        residents
            .into_iter()
            .map(|stored| {
                let secret = crypto::unwrap(&master, &stored.rp_id, &stored.credential_id)
                    .ok_or_else(|| CtapError::Other("a stored credential is damaged".into()))?;
                Ok(ResidentCredential {
                    public_key: crypto::public_key(&secret)?,
                    cred_protect: Some(secret.cred_protect()),
                    rp_id: stored.rp_id,
                    credential_id: stored.credential_id,
                    user: User {
                        id: stored.user_id,
                        name: stored.user_name,
                    },
                })
            })
            .collect()
    }
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

fn io_error(err: std::io::Error) -> CtapError {
    CtapError::Other(format!("the simulator's state file failed: {err}"))
}
