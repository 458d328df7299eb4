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
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

mod line;

/// Logs to stderr at `default_level` unless TOKEN_AGENT_LOG or `configured` says otherwise.
pub(crate) fn to_stderr(default_level: &str, configured: Option<&str>) {
    install(Sink::Stderr, default_level, configured);
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
    install(Sink::File(Mutex::new(file)), default_level, configured);
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
    let syslog = Syslog {
        socket,
        pid: std::process::id(),
    };
    install(Sink::Syslog(syslog), default_level, configured);
    true
}

/// Makes `sink` the process's log.
fn install(sink: Sink, default_level: &str, configured: Option<&str>) {
    // With the `log` crate's records too (some modules' Rust bindings log).
    subscriber(sink, from_environment(default_level, configured)).init();
}

/// The formatter, one for every sink: the agent then carries (and keeps
/// resident) one instance of its code, and the code a test or the hot-code
/// profile runs in one mode is the code every mode runs.
fn subscriber(sink: Sink, filter: EnvFilter) -> impl tracing::Subscriber + Send + Sync {
    let ansi = matches!(sink, Sink::Stderr) && std::io::stderr().is_terminal();
    // Syslog stamps each message itself.
    let clock = Clock {
        shown: !matches!(sink, Sink::Syslog(_)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .fmt_fields(line::Fields)
        .event_format(line::Format { clock })
        .with_writer(sink)
        .finish()
}

/// The time of each line, or nothing (the line then starts with the space
/// after it, which [`SyslogLine`] drops).
struct Clock {
    shown: bool,
}

impl FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        if self.shown {
            SystemTime.format_time(w)
        } else {
            Ok(())
        }
    }
}

/// Where log lines go.
enum Sink {
    Stderr,
    File(Mutex<File>),
    Syslog(Syslog),
}

/// One event's writer for a [`Sink`].
enum Line<'a> {
    Stderr(std::io::Stderr),
    File(MutexGuard<'a, File>),
    Syslog(SyslogLine<'a>),
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        match self {
            Sink::Stderr => Line::Stderr(std::io::stderr()),
            // A thread that panicked while writing left at worst half a line.
            Sink::File(file) => Line::File(file.lock().unwrap_or_else(PoisonError::into_inner)),
            Sink::Syslog(syslog) => Line::Syslog(syslog.line(6)),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        match self {
            // err, warning, info, debug (trace too).
            Sink::Syslog(syslog) => Line::Syslog(syslog.line(match *meta.level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            })),
            _ => self.make_writer(),
        }
    }
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self {
            Line::Stderr(stderr) => stderr.write(bytes),
            Line::File(file) => file.write(bytes),
            Line::Syslog(line) => {
                line.line.extend_from_slice(bytes);
                Ok(bytes.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Line::Stderr(stderr) => stderr.flush(),
            Line::File(file) => file.flush(),
            Line::Syslog(_) => Ok(()),
        }
    }
}

/// Each event as one syslog datagram (RFC 3164, as syslog(3) sends it).
struct Syslog {
    socket: UnixDatagram,
    pid: u32,
}

impl Syslog {
    fn line(&self, severity: u8) -> SyslogLine<'_> {
        SyslogLine {
            syslog: self,
            severity,
            line: Vec::new(),
        }
    }
}

/// One event's line, sent when the formatter is done with it.
struct SyslogLine<'a> {
    syslog: &'a Syslog,
    severity: u8,
    line: Vec<u8>,
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        let message = self.line.trim_ascii();
        if message.is_empty() {
            return;
        }
        // Facility auth (4), as ssh-agent's SYSLOG_FACILITY_AUTH.
        let mut datagram = format!(
            "<{}>token-agent[{}]: ",
            4 * 8 + self.severity,
            self.syslog.pid
        )
        .into_bytes();
        datagram.extend_from_slice(message);
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
        let syslog = Syslog {
            socket: ours,
            pid: 42,
        };
        let subscriber = subscriber(Sink::Syslog(syslog), filter(None, None, "info"));
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
        assert!(info.starts_with("<38>token-agent[42]: INFO "), "{info}");
        assert!(info.ends_with("signed key=\"SHA256:x\""), "{info}");
        let warn = next();
        assert!(warn.starts_with("<36>token-agent[42]: WARN "), "{warn}");
        assert!(warn.ends_with("degraded"), "{warn}");
    }

    #[test]
    fn a_file_gets_each_event_on_a_line_of_its_own_with_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let file = File::create(&path).unwrap();
        let subscriber = subscriber(Sink::File(Mutex::new(file)), filter(None, None, "info"));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(key = "SHA256:x", "signed");
            tracing::debug!("not at info");
            tracing::warn!("degraded");
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        for (line, level, message) in [
            (lines[0], " INFO ", "signed key=\"SHA256:x\""),
            (lines[1], " WARN ", "degraded"),
        ] {
            // An RFC 3339 time in UTC, then the level; no colours in a file.
            let (time, rest) = line.split_once(' ').unwrap();
            let bytes = time.as_bytes();
            assert!(
                time.len() > 20
                    && time.ends_with('Z')
                    && (bytes[4], bytes[10], bytes[13]) == (b'-', b'T', b':'),
                "{line}"
            );
            assert!(format!(" {rest}").contains(level), "{line}");
            assert!(line.ends_with(message) && !line.contains('\x1b'), "{line}");
        }
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
