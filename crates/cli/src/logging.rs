//! Where logs go: stderr in the foreground, a file in the background.
//!
//! Logs never carry secrets: PINs and passwords are `SecretString`s whose
//! Debug prints nothing, and requests are logged by fingerprint and size.

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `default_level` unless TOKEN_AGENT_LOG or `configured` says otherwise.
pub(crate) fn to_stderr(default_level: &str, configured: Option<&str>) {
    tracing_subscriber::fmt()
        .with_env_filter(from_environment(default_level, configured))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Logs to `path` (created 0600, appended to). Returns the file once more,
/// for the background agent's standard error: what its PKCS#11 helpers and
/// notice commands write there lands in the log too.
pub(crate) fn to_file(
    path: &Path,
    default_level: &str,
    configured: Option<&str>,
) -> anyhow::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    let again = file
        .try_clone()
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(from_environment(default_level, configured))
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .init();
    Ok(again)
}

/// The filter TOKEN_AGENT_LOG gives, else the `configured` one, else `default_level`.
fn from_environment(default_level: &str, configured: Option<&str>) -> EnvFilter {
    let environment = std::env::var("TOKEN_AGENT_LOG").ok();
    filter(environment.as_deref(), configured, default_level)
}

/// The first of `environment`, `configured` and `default_level` that parses.
/// All three go through one parser, so its code is the only one the agent
/// keeps resident; `default_level` is a level name and always parses.
fn filter(environment: Option<&str>, configured: Option<&str>, default_level: &str) -> EnvFilter {
    [environment, configured, Some(default_level)]
        .into_iter()
        .flatten()
        .find_map(|text| EnvFilter::try_new(text).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_wins_then_the_configuration_then_the_default() {
        let shown = |environment, configured| filter(environment, configured, "info").to_string();
        assert_eq!(shown(Some("debug"), Some("warn")), "debug");
        assert_eq!(shown(Some("token_agent=[bad"), Some("warn")), "warn");
        assert_eq!(shown(None, Some("token_agent=[bad")), "info");
        assert_eq!(shown(None, None), "info");
    }
}
