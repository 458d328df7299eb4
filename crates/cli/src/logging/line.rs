//! How an event becomes a line: tracing-subscriber's full format (time,
//! level, the spans it is in with their fields, target, message, fields),
//! written with a fraction of the work.
//!
//! A signature's audit line is logged at info, the agent's default level,
//! so its cost is paid on every signature. tracing-subscriber's own
//! formatter styles every field name and `=` through `nu_ansi_term` even
//! when colours are off, and writes every value through `core::fmt`: for
//! the audit line, more instructions than the rest of the agent's work on
//! a signature. Here plain text is written as it is, and styles only when
//! the line goes to a terminal.
//!
//! The output is tracing-subscriber's, byte for byte (a test compares the
//! two), but for one thing: values are sanitized like messages, and line
//! breaks and the other control characters are escaped in both, so that no
//! text a client controls (its executable's name, a key's comment) can
//! start a line of its own in the log or drive the terminal.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format, with `clock` for the time at the start of a line.
pub(super) struct Format<T> {
    pub(super) clock: T,
}

/// The fields format (of events and spans).
pub(super) struct Fields;

/// ANSI styles, as tracing-subscriber (through `nu_ansi_term`) writes them.
const BOLD: &str = "\x1b[1m";
const DIMMED: &str = "\x1b[2m";
const ITALIC: &str = "\x1b[3m";
const RESET: &str = "\x1b[0m";

impl<S, T> FormatEvent<S, Fields> for Format<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, Fields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A `log` record's own target, not the bridge's.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let ansi = writer.has_ansi_escapes();
        let styled = |style: &'static str| if ansi { style } else { "" };
        let (dimmed, bold, reset) = (styled(DIMMED), styled(BOLD), styled(RESET));

        writer.write_str(dimmed)?;
        if self.clock.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_str(reset)?;
        writer.write_char(' ')?;

        let level = match *meta.level() {
            Level::TRACE => ("\x1b[35m", "TRACE"),
            Level::DEBUG => ("\x1b[34m", "DEBUG"),
            Level::INFO => ("\x1b[32m", " INFO"),
            Level::WARN => ("\x1b[33m", " WARN"),
            Level::ERROR => ("\x1b[31m", "ERROR"),
        };
        writer.write_str(styled(level.0))?;
        writer.write_str(level.1)?;
        writer.write_str(reset)?;
        writer.write_char(' ')?;

        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                seen = true;
                write!(writer, "{bold}{}{reset}", span.metadata().name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<Fields>>() {
                    if !fields.is_empty() {
                        write!(writer, "{bold}{{{reset}{fields}{bold}}}{reset}")?;
                    }
                }
                write!(writer, "{dimmed}:{reset}")?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }

        write!(writer, "{dimmed}{}{reset}{dimmed}:{reset} ", meta.target())?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

impl<'writer> FormatFields<'writer> for Fields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes fields as `message name=value ...`, values in their Debug form.
struct Visitor<'a> {
    writer: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// Writes one field: the message as it is, the others as `name=value`,
    /// with `value` written by `value`.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Sanitized<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // A `log` record's metadata, already shown as the target.
        if name.starts_with("log.") {
            return;
        }
        self.result = self.write_field(name, value);
    }

    fn write_field(
        &mut self,
        name: &str,
        value: impl FnOnce(&mut Sanitized<'_>) -> fmt::Result,
    ) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            if self.writer.has_ansi_escapes() {
                write!(self.writer, "{ITALIC}{name}{RESET}{DIMMED}={RESET}")?;
            } else {
                write!(self.writer, "{name}=")?;
            }
        }
        value(&mut Sanitized {
            inner: &mut self.writer,
        })
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, |out| out.write_str(value));
        } else {
            self.field(field, |out| quoted(out, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let ansi = self.writer.has_ansi_escapes();
        self.field(field, |out| {
            write!(out, "{value}")?;
            let Some(mut source) = value.source() else {
                return Ok(());
            };
            // `name.sources=[first, second]`: each error under this one.
            let name = field.name();
            if ansi {
                write!(
                    out.inner,
                    " {ITALIC}{name}{RESET}{ITALIC}.sources{RESET}{DIMMED}={RESET}["
                )?;
            } else {
                write!(out.inner, " {name}.sources=[")?;
            }
            write!(out, "{source}")?;
            while let Some(next) = source.source() {
                write!(out, ", {next}")?;
                source = next;
            }
            out.inner.write_char(']')
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| write!(out, "{value:?}"));
    }
}

/// `value` as its Debug form quotes it. Most strings in a log (names,
/// comments, fingerprints) are printable ASCII with no quote or backslash,
/// whose Debug form is the text in quotes: those are written at once.
fn quoted(out: &mut Sanitized<'_>, value: &str) -> fmt::Result {
    let plain = value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
    if plain {
        out.write_char('"')?;
        out.inner.write_str(value)?;
        out.write_char('"')
    } else {
        write!(out, "{value:?}")
    }
}

/// A writer that escapes the characters a terminal or a log reader takes
/// as commands: line breaks and the other C0 controls but tab, DEL, and
/// the C1 controls, written as `\n`, `\x1b`, `\u{9b}`.
/// tracing-subscriber escapes ESC, BEL, BS, FF, DEL and C1 in messages
/// only, and only unless told not to; here it is always done.
struct Sanitized<'a> {
    inner: &'a mut dyn Write,
}

impl Write for Sanitized<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // C1 controls are U+0080 to U+009F: 0xC2 then 0x80 to 0x9F in UTF-8.
        let clean = text
            .bytes()
            .all(|b| (b >= b' ' || b == b'\t') && b != 0x7f && b != 0xc2);
        if clean {
            return self.inner.write_str(text);
        }
        for ch in text.chars() {
            match ch {
                '\n' => self.inner.write_str("\\n")?,
                '\r' => self.inner.write_str("\\r")?,
                '\t' => self.inner.write_char('\t')?,
                '\0'..='\x1f' | '\x7f' => write!(self.inner, "\\x{:02x}", u32::from(ch))?,
                '\u{80}'..='\u{9f}' => write!(self.inner, "\\u{{{:x}}}", u32::from(ch))?,
                _ => self.inner.write_char(ch)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A time that is the same on every line.
    struct Noon;

    impl FormatTime for Noon {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-07T12:00:00.000000Z")
        }
    }

    /// Collects what is written, for reading back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Failed(&'static str, Option<Box<Failed>>);

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// Events of every shape the agent logs, and some it might.
    fn events() {
        tracing::info!("token-agent started");
        tracing::info!(
            key = %"SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
            comment = "bench: p256",
            backend = "pkcs11",
            device = Some("bench #08cc8da7b4ccfc99"),
            client = %"ssh (pid 42)",
            uid = 1000u32,
            destination = None::<String>,
            forwarded = false,
            "signed"
        );
        tracing::warn!(r#type = "odd", count = -3i64, ratio = 0.5f64, "raw names");
        tracing::warn!(
            text = "quote \" backslash \\ tab \t é ✓ \u{301}",
            "strings that need their Debug form"
        );
        tracing::warn!(field = "no message");
        tracing::error!(message = "a message given as a field", extra = 1u8);
        let nested = Failed(
            "outer",
            Some(Box::new(Failed(
                "middle",
                Some(Box::new(Failed("inner", None))),
            ))),
        );
        tracing::error!(err = &nested as &dyn std::error::Error, "with sources");
        tracing::error!(
            err = &Failed("alone", None) as &dyn std::error::Error,
            "no sources"
        );
        tracing::error!(%nested, "displayed");
        tracing::warn!(bytes = ?b"\x00\x01", "debug value");
        tracing::warn!("a bell \x07 and escape \x1b[31m in a message");
        let client = tracing::info_span!("client", pid = 42, exe = "/usr/bin/ssh");
        let _client = client.enter();
        tracing::debug!("in one span");
        let request = tracing::info_span!("request", kind = 13u8);
        let _request = request.enter();
        tracing::info!(len = 9, "in two spans");
        let empty = tracing::info_span!("empty");
        let _empty = empty.enter();
        request.record("kind", 11u8);
        tracing::info!("in three spans, one without fields");
        let record = log::Record::builder()
            .args(format_args!("from the log crate"))
            .level(log::Level::Warn)
            .target("cryptoki::context")
            .module_path(Some("cryptoki::context"))
            .file(Some("context.rs"))
            .line(Some(7))
            .build();
        tracing_log::format_trace(&record).unwrap();
    }

    fn theirs(ansi: bool) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(ansi)
            .with_timer(Noon)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        buffer.text()
    }

    fn ours(ansi: bool, events: fn()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(ansi)
            .fmt_fields(Fields)
            .event_format(Format { clock: Noon })
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        buffer.text()
    }

    #[test]
    fn lines_are_tracing_subscribers_full_format() {
        for ansi in [false, true] {
            let (ours, theirs) = (ours(ansi, events), theirs(ansi));
            assert_eq!(ours.lines().count(), 15, "{ours}");
            for (ours, theirs) in ours.lines().zip(theirs.lines()) {
                assert_eq!(ours, theirs, "ansi: {ansi}");
            }
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn text_a_client_controls_cannot_start_a_line_or_drive_a_terminal() {
        let text = ours(false, || {
            tracing::info!(
                client = %"evil\n2026-12-07T12:00:00.000000Z  INFO forged",
                exe = %"/tmp/\x1b[2J\u{9b}x\ty",
                comment = "new\nline",
                "signed\r\nagain"
            );
        });
        assert_eq!(
            text,
            "2026-12-07T12:00:00.000000Z  INFO token_agent::logging::line::tests: \
             signed\\r\\nagain client=evil\\n2026-12-07T12:00:00.000000Z  INFO forged \
             exe=/tmp/\\x1b[2J\\u{9b}x\ty comment=\"new\\nline\"\n"
        );
    }
}
