//! Where logs go: stderr in the foreground, a file in the background.
//!
//! Logs never carry secrets: PINs and passwords are `SecretString`s whose
//! Debug prints nothing, and requests are logged by fingerprint and size.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `default_level` unless TOKEN_AGENT_LOG or `configured` says otherwise.
pub(crate) fn to_stderr(default_level: &str, configured: Option<&str>) {
    tracing_subscriber::fmt()
        .with_env_filter(filter(default_level, configured))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Logs to `path` (created 0600, appended to).
pub(crate) fn to_file(
    path: &Path,
    default_level: &str,
    configured: Option<&str>,
) -> anyhow::Result<()> {
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
    tracing_subscriber::fmt()
        .with_env_filter(filter(default_level, configured))
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .init();
    Ok(())
}

fn filter(default_level: &str, configured: Option<&str>) -> EnvFilter {
    std::env::var("TOKEN_AGENT_LOG")
        .ok()
        .and_then(|text| EnvFilter::try_new(text).ok())
        .or_else(|| configured.and_then(|text| EnvFilter::try_new(text).ok()))
        .unwrap_or_else(|| EnvFilter::new(default_level))
}
