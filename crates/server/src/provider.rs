//! Which providers `ssh-add -s` may load: the `-P` allowlist.
//!
//! As in OpenSSH, the provider path is made canonical (symlinks resolved)
//! before it is matched, so a link in an allowed directory cannot point
//! outside it; the default list is OpenSSH's.

use std::path::Path;

use crate::pattern;

/// OpenSSH's default `-P` list.
pub const DEFAULT_PROVIDERS: &str = "/usr/lib*/*,/usr/local/lib*/*";

/// The `-P` pattern list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderAllowlist {
    patterns: String,
}

impl Default for ProviderAllowlist {
    fn default() -> Self {
        Self {
            patterns: DEFAULT_PROVIDERS.to_owned(),
        }
    }
}

impl ProviderAllowlist {
    /// An allowlist of the comma-separated `patterns`.
    pub fn new(patterns: impl Into<String>) -> Self {
        Self {
            patterns: patterns.into(),
        }
    }

    /// The patterns.
    pub fn patterns(&self) -> &str {
        &self.patterns
    }

    /// The canonical path of `provider`, if it exists.
    pub fn canonical(&self, provider: &str) -> Option<String> {
        std::fs::canonicalize(Path::new(provider))
            .ok()
            .and_then(|p| p.to_str().map(str::to_owned))
    }

    /// The canonical path of `provider` if the allowlist admits it, or why not.
    pub fn check(&self, provider: &str) -> Result<String, String> {
        let canonical = std::fs::canonicalize(Path::new(provider))
            .map_err(|e| format!("cannot load provider {provider}: {e}"))?;
        let canonical = canonical
            .to_str()
            .ok_or_else(|| format!("provider path {provider} is not valid UTF-8"))?
            .to_owned();
        if pattern::matches_list(&canonical, &self.patterns) {
            Ok(canonical)
        } else {
            Err(format!(
                "provider {canonical} is not in the allowlist \"{}\" (start the agent with \
                 -P to allow it)",
                self.patterns
            ))
        }
    }
}
