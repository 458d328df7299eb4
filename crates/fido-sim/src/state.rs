//! What the simulated authenticator remembers, in memory or in its state file.

use std::path::Path;

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::PIN_RETRIES;

/// The whole persistent state of one authenticator.
///
/// The master key is in the clear in the state file: this is a test device,
/// and its file lives in a test's temporary directory.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) master_key: [u8; 32],
    pub(crate) aaguid: [u8; 16],
    pub(crate) pin: Option<String>,
    pub(crate) retries: u32,
    pub(crate) counter: u32,
    pub(crate) residents: Vec<StoredResident>,
}

/// A resident credential: its id is a wrapped handle like any other.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredResident {
    pub(crate) rp_id: String,
    pub(crate) credential_id: Vec<u8>,
    pub(crate) user_id: Vec<u8>,
    pub(crate) user_name: String,
}

impl State {
    /// A device fresh from the factory: a random master key, no PIN.
    pub(crate) fn fresh() -> Self {
        let mut master_key = [0u8; 32];
        OsRng.fill_bytes(&mut master_key);
        let mut aaguid = [0u8; 16];
        OsRng.fill_bytes(&mut aaguid);
        Self {
            master_key,
            aaguid,
            pin: None,
            retries: PIN_RETRIES,
            counter: 0,
            residents: Vec::new(),
        }
    }

    pub(crate) fn parse(bytes: &[u8]) -> std::io::Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes the state next to `path` and renames it over, so a reader never
    /// sees half a file.
    pub(crate) fn save(&self, path: &Path) -> std::io::Result<()> {
        if path.as_os_str().is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the simulator's state file has no name",
            ));
        }
        let json = serde_json::to_vec(self)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(format!(".{}.tmp", std::process::id()));
        std::fs::write(&temporary, json)?;
        std::fs::rename(&temporary, path)
    }
}
