//! Where logs go: stderr in the foreground, a file in the background, or
//! syslog when no file can be made there.
//!
//! Logs never carry secrets: PINs and passwords are `SecretString`s whose
//! Debug prints nothing, and requests are logged by fingerprint and size.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
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

/// Logs to syslog through /dev/log (the journal, where systemd runs), as
/// ssh-agent's background agent logs: facility auth, tag `token-agent`, each
/// event with the severity of its level. False when /dev/log cannot be
/// reached; nothing is logged then.
pub(crate) fn to_syslog(default_level: &str, configured: Option<&str>) -> bool {
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    if socket.connect("/dev/log").is_err() {
        return false;
    }
    tracing_subscriber::fmt()
        .with_env_filter(from_environment(default_level, configured))
        .with_ansi(false)
        .without_time()
        .with_writer(Syslog {
            socket,
            pid: std::process::id(),
        })
        .init();
    true
}

/// Each event as one syslog datagram (RFC 3164, as syslog(3) sends it).
struct Syslog {
    socket: UnixDatagram,
    pid: u32,
}

/// One event's line, sent when the formatter is done with it.
struct SyslogLine<'a> {
    syslog: &'a Syslog,
    severity: u8,
    line: Vec<u8>,
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine {
            syslog: self,
            severity: 6,
            line: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        // err, warning, info, debug (trace too).
        let severity = match *meta.level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        SyslogLine {
            syslog: self,
            severity,
            line: Vec::new(),
        }
    }
}

impl Write for SyslogLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        // Facility auth (4), as ssh-agent's SYSLOG_FACILITY_AUTH.
        let mut datagram = format!(
            "<{}>token-agent[{}]: ",
            4 * 8 + self.severity,
            self.syslog.pid
        )
        .into_bytes();
        datagram.extend_from_slice(self.line.trim_ascii_end());
        // A log line that cannot be sent is lost, as with syslog(3).
        let _ = self.syslog.socket.send(&datagram);
    }
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
    fn syslog_gets_one_datagram_per_event_with_its_severity() {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(Syslog {
                socket: ours,
                pid: 42,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(key = "SHA256:x", "signed");
            tracing::warn!("degraded");
        });
        let mut datagram = [0; 512];
        let mut next = || {
            let n = theirs.recv(&mut datagram).unwrap();
            String::from_utf8_lossy(&datagram[..n]).into_owned()
        };
        let info = next();
        assert!(info.starts_with("<38>token-agent[42]: "), "{info}");
        assert!(info.ends_with("signed key=\"SHA256:x\""), "{info}");
        let warn = next();
        assert!(warn.starts_with("<36>token-agent[42]: "), "{warn}");
        assert!(warn.ends_with("degraded"), "{warn}");
    }

    #[test]
    fn the_environment_wins_then_the_configuration_then_the_default() {
        let shown = |environment, configured| filter(environment, configured, "info").to_string();
        assert_eq!(shown(Some("debug"), Some("warn")), "debug");
        assert_eq!(shown(Some("token_agent=[bad"), Some("warn")), "warn");
        assert_eq!(shown(None, Some("token_agent=[bad")), "info");
        assert_eq!(shown(None, None), "info");
    }
}
