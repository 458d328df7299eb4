//! Asking through a pinentry program, speaking GnuPG's Assuan protocol to it.
//!
//! The agent enforces the time limit itself. pinentry's `SETTIMEOUT` is only
//! a request, and a pinentry that never answers (hung, or drawing on a screen
//! nobody looks at) would otherwise hold the bridge's one-question-at-a-time
//! turn, and so every later PIN and confirmation, until killed by hand. So the
//! conversation runs on a thread of its own while the caller keeps the child
//! process, and kills it once the limit has passed.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use token_agent_core::{ConfirmRequest, PinRequest, PromptError};
use zeroize::Zeroizing;

/// A pinentry program: `pinentry-gnome3`, `pinentry-qt`, `pinentry-curses`, `pinentry-mac`, ...
#[derive(Debug, Clone)]
pub struct Pinentry {
    program: PathBuf,
    timeout_seconds: u16,
}

impl Pinentry {
    /// Uses `program` (a path, or a name looked up in PATH), giving the person
    /// `timeout_seconds` to answer. The program is asked to close its dialog
    /// then (`SETTIMEOUT`); one still running five seconds later is killed.
    ///
    /// 0 counts as 1 second, as for [`Askpass`](crate::Askpass): the agent
    /// never waits without a limit (pinentry would take `SETTIMEOUT 0` as
    /// "wait forever", and the question would hold up every one after it).
    pub fn new(program: impl Into<PathBuf>, timeout_seconds: u16) -> Self {
        Self {
            program: program.into(),
            timeout_seconds: timeout_seconds.max(1),
        }
    }

    /// The program, as configured.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Asks for a PIN. Blocking (for at most the timeout and five seconds):
    /// run it off the async runtime.
    pub fn pin(&self, request: &PinRequest) -> Result<SecretString, PromptError> {
        self.check_display(&request.title())?;
        self.ask_pin(request)
    }

    /// Asks to allow a use of a key. Blocking (for at most the timeout and
    /// five seconds): run it off the async runtime.
    pub fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        self.check_display("a confirmation")?;
        self.ask_confirm(request)
    }

    fn ask_pin(&self, request: &PinRequest) -> Result<SecretString, PromptError> {
        let title = assuan_line(request.title());
        let description = assuan_line(request.description());
        let label = assuan_line(request.label());
        let timeout = self.timeout_seconds.to_string();
        let pin = self.converse(move |session| {
            session.request("SETTITLE", &title)?;
            session.request("SETDESC", &description)?;
            session.request("SETPROMPT", &label)?;
            session.request("SETTIMEOUT", &timeout)?;
            loop {
                // An empty entry comes back without data: ask again (an
                // empty PIN would only spend a try).
                match session.command("GETPIN", None)? {
                    Some(pin) => return Ok(pin),
                    None => session.request("SETERROR", "The PIN cannot be empty.")?,
                }
            }
        })?;
        let pin = std::str::from_utf8(&pin).map_err(|_| self.failed("the PIN is not UTF-8"))?;
        Ok(SecretString::from(pin))
    }

    fn ask_confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        let description = assuan_line(request.description());
        let timeout = self.timeout_seconds.to_string();
        let answer = self.converse(move |session| {
            session.request("SETTITLE", "token-agent")?;
            session.request("SETDESC", &description)?;
            session.request("SETOK", "Allow")?;
            session.request("SETCANCEL", "Deny")?;
            session.request("SETTIMEOUT", &timeout)?;
            session.command("CONFIRM", None).map(|_| ())
        });
        // Only the OK button allows: Deny, "Not confirmed" and a closed
        // window are a no; a timeout or any other failure is an error (and so
        // refuses too).
        match answer {
            Ok(()) => Ok(true),
            Err(PromptError::Cancelled) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Runs the pinentry and `talk`s to it on a thread of its own, waiting
    /// at most the timeout and [`GRACE`]; past that the pinentry is killed,
    /// which also ends the conversation's thread (its reads see the pipe
    /// close), and the answer is [`PromptError::TimedOut`].
    fn converse<T: Send + 'static>(
        &self,
        talk: impl FnOnce(&mut Session) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, PromptError> {
        let mut child = self.spawn()?;
        let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
            stop(&mut child);
            return Err(self.failed("no pipes to the program"));
        };
        let (send, answer) = mpsc::channel();
        let talker = std::thread::Builder::new()
            .name("pinentry".into())
            .spawn(move || {
                let mut session = Session {
                    to,
                    from: Lines::new(from),
                };
                let result = session.open().and_then(|()| talk(&mut session));
                session.bye();
                // The caller has gone when it gave up waiting: nothing to do.
                let _ = send.send(result);
            });
        if let Err(err) = talker {
            stop(&mut child);
            return Err(self.failed(&format!("cannot start a thread for it: {err}")));
        }
        let limit = Duration::from_secs(u64::from(self.timeout_seconds)) + GRACE;
        match answer.recv_timeout(limit) {
            Ok(result) => {
                finish(&mut child);
                result.map_err(|failure| self.error(failure))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    program = %self.program.display(),
                    seconds = limit.as_secs(),
                    "the pinentry did not answer in time; stopped it"
                );
                stop(&mut child);
                Err(self.timed_out())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                stop(&mut child);
                Err(self.failed("the conversation with it ended without an answer"))
            }
        }
    }

    fn spawn(&self) -> Result<Child, PromptError> {
        let mut command = Command::new(&self.program);
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let spawned = crate::retry_busy(|| command.spawn());
        spawned.map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => self.not_found(),
            _ => PromptError::Unavailable {
                what: "an answer".into(),
                reason: format!("cannot run the pinentry {}: {err}", self.program.display()),
            },
        })
    }

    /// The agent usually runs without a terminal; a pinentry then needs a
    /// graphical session, and without one it would fail obscurely or wait for
    /// a window nobody sees. Say so plainly instead. (An agent run in the
    /// foreground on a terminal, `-D`, can use pinentry-curses there.)
    fn check_display(&self, what: &str) -> Result<(), PromptError> {
        let has = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        if has("DISPLAY") || has("WAYLAND_DISPLAY") || std::io::stdin().is_terminal() {
            return Ok(());
        }
        Err(PromptError::Unavailable {
            what: what.to_owned(),
            reason: format!(
                "{} needs a graphical session, but neither DISPLAY nor WAYLAND_DISPLAY is set \
                 in the agent's environment; start the agent from your desktop session, or set \
                 pin_prompt = \"askpass\" in the configuration with SSH_ASKPASS naming a program \
                 that can ask here",
                self.program.display()
            ),
        })
    }

    fn not_found(&self) -> PromptError {
        PromptError::Unavailable {
            what: "a PIN".into(),
            reason: format!(
                "the pinentry program {} was not found or is not executable; install one \
                 (Debian: apt install pinentry-gnome3 or pinentry-curses) or set \
                 PINENTRY_PROGRAM",
                self.program.display()
            ),
        }
    }

    fn timed_out(&self) -> PromptError {
        PromptError::TimedOut {
            seconds: u64::from(self.timeout_seconds),
        }
    }

    fn failed(&self, message: &str) -> PromptError {
        PromptError::Failed {
            program: self.program.display().to_string(),
            message: message.to_owned(),
        }
    }

    fn error(&self, failure: Failure) -> PromptError {
        match failure {
            // Some pinentries answer Deny with "Not confirmed" rather than
            // "Cancelled": both are the person saying no.
            Failure::Refused {
                code: GPG_ERR_CANCELED | GPG_ERR_NOT_CONFIRMED,
                ..
            } => PromptError::Cancelled,
            Failure::Refused {
                code: GPG_ERR_TIMEOUT,
                ..
            } => self.timed_out(),
            Failure::Refused { code, text } => self.failed(&format!("error {code}: {text}")),
            Failure::Io(err) => self.failed(&err.to_string()),
            Failure::Closed => self.failed("it closed the connection without answering"),
            Failure::Protocol(what) => self.failed(what),
        }
    }
}

/// How long past its own `SETTIMEOUT` a pinentry may take before it is
/// killed: time to start and draw its window, and to report its own timeout.
const GRACE: Duration = Duration::from_secs(5);

/// How long a pinentry may take to exit after `BYE` before it is killed.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// libgpg-error's codes (err-codes.h), as the low 16 bits of an `ERR` line.
const GPG_ERR_TIMEOUT: u16 = 62;
const GPG_ERR_CANCELED: u16 = 99;
const GPG_ERR_NOT_CONFIRMED: u16 = 114;

/// Why a conversation with a pinentry did not end in OK.
#[derive(Debug)]
enum Failure {
    /// The pinentry answered `ERR`: the low 16 bits of its code, and its text.
    Refused { code: u16, text: String },
    /// Writing to or reading from it failed.
    Io(std::io::Error),
    /// It closed its output mid-conversation (it crashed, or was killed).
    Closed,
    /// It sent a line that is not Assuan, or we had one too long to send.
    Protocol(&'static str),
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err)
    }
}

/// The Assuan conversation with one pinentry process
/// (<https://gnupg.org/documentation/manuals/assuan/Client-requests.html>).
struct Session {
    to: ChildStdin,
    from: Lines,
}

/// The longest line read from a pinentry: Assuan's 1,000 bytes.
const MAX_LINE: usize = 1000;

/// The lines a pinentry writes, read into buffers sized once and zeroed
/// when dropped. A `D` line holds the PIN: a `BufReader`'s buffer, or a
/// vector that grows (each reallocation leaves the old bytes in freed
/// memory), would keep copies of it nothing wipes.
struct Lines {
    from: ChildStdout,
    /// Read but not yet returned; never longer than a line and a read.
    pending: Zeroizing<Vec<u8>>,
}

/// How much one read takes.
const READ: usize = 1024;

impl Lines {
    fn new(from: ChildStdout) -> Self {
        Self {
            from,
            pending: Zeroizing::new(Vec::with_capacity(MAX_LINE + READ + 1)),
        }
    }

    /// The next line, with its newline, into `line` (cleared first, and
    /// given room for a whole line up front); 0 at the end of the output.
    fn next(&mut self, line: &mut Zeroizing<Vec<u8>>) -> std::io::Result<usize> {
        line.clear();
        line.reserve(MAX_LINE + 1);
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&self.pending[..=end]);
                self.pending.drain(..=end);
                return Ok(end + 1);
            }
            if self.pending.len() > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a line longer than Assuan's 1,000 bytes",
                ));
            }
            let mut chunk = Zeroizing::new([0u8; READ]);
            let read = self.from.read(&mut chunk[..])?;
            if read == 0 {
                return Ok(0);
            }
            self.pending.extend_from_slice(&chunk[..read]);
        }
    }
}

impl Session {
    /// Reads the greeting and tells the pinentry which terminal to use, as
    /// the `pinentry` crate did (pinentry-curses draws there).
    fn open(&mut self) -> Result<(), Failure> {
        self.response()?;
        self.request("OPTION", "ttyname=/dev/tty")?;
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
        self.request("OPTION", &format!("ttytype={term}"))
    }

    /// Sends `command parameter`; any data in the answer is dropped.
    fn request(&mut self, command: &str, parameter: &str) -> Result<(), Failure> {
        self.command(command, Some(parameter)).map(drop)
    }

    /// Sends a command and waits for its OK; returns the data lines of the
    /// answer, decoded and joined, or `None` when there were none.
    fn command(
        &mut self,
        command: &str,
        parameter: Option<&str>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, Failure> {
        let line = encode(command, parameter).ok_or(Failure::Protocol(
            "a request longer than an Assuan line (1,000 bytes)",
        ))?;
        self.to.write_all(line.as_bytes())?;
        self.to.flush()?;
        self.response()
    }

    fn response(&mut self) -> Result<Option<Zeroizing<Vec<u8>>>, Failure> {
        let mut data: Option<Zeroizing<Vec<u8>>> = None;
        loop {
            // The line may hold the PIN: zeroed when dropped.
            let mut line = Zeroizing::new(Vec::new());
            if self.from.next(&mut line)? == 0 {
                return Err(Failure::Closed);
            }
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text == b"OK" || text.starts_with(b"OK ") {
                return Ok(data);
            } else if let Some(rest) = text.strip_prefix(b"ERR ") {
                return Err(refusal(rest));
            } else if let Some(rest) = text.strip_prefix(b"D ") {
                // Room for a whole answer up front: no reallocation
                // leaves part of the PIN behind.
                let data = data.get_or_insert_with(|| Zeroizing::new(Vec::with_capacity(MAX_LINE)));
                decode(rest, data);
            } else if text.starts_with(b"INQUIRE ") {
                // pinentry does not inquire; decline, and its ERR follows.
                self.to.write_all(b"CAN\n")?;
                self.to.flush()?;
            } else if !(text.starts_with(b"S ") || text.starts_with(b"#") || text.is_empty()) {
                return Err(Failure::Protocol("a line that is not Assuan"));
            }
        }
    }

    /// Says goodbye; the pinentry exits (and is killed if it does not).
    fn bye(&mut self) {
        let _ = self.to.write_all(b"BYE\n");
        let _ = self.to.flush();
    }
}

/// `command parameter` as an Assuan line: `%`, CR and LF escaped, and a
/// trailing backslash too; `None` past the protocol's 1,000 bytes.
fn encode(command: &str, parameter: Option<&str>) -> Option<String> {
    let mut line = command.to_owned();
    if let Some(parameter) = parameter {
        line.push(' ');
        for c in parameter.chars() {
            match c {
                '%' => line.push_str("%25"),
                '\r' => line.push_str("%0D"),
                '\n' => line.push_str("%0A"),
                c => line.push(c),
            }
        }
    }
    if line.ends_with('\\') {
        line.pop();
        line.push_str("%5C");
    }
    line.push('\n');
    (line.len() <= 1000).then_some(line)
}

/// Appends a data line to `data`, undoing its `%XX` escapes.
fn decode(line: &[u8], data: &mut Vec<u8>) {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut i = 0;
    while i < line.len() {
        if line[i] == b'%' {
            if let (Some(high), Some(low)) = (
                line.get(i + 1).copied().and_then(hex),
                line.get(i + 2).copied().and_then(hex),
            ) {
                // Two hex digits make at most 0xff.
                data.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        data.push(line[i]);
        i += 1;
    }
}

/// An `ERR code text` line: libgpg-error keeps the code in the low 16 bits
/// (the high ones name the source, e.g. 83886179 is pinentry's "cancelled").
fn refusal(rest: &[u8]) -> Failure {
    let rest = String::from_utf8_lossy(rest);
    let (code, text) = rest.split_once(' ').unwrap_or((&rest, ""));
    Failure::Refused {
        code: code.parse::<u32>().map_or(0, |code| (code & 0xffff) as u16),
        text: text.to_owned(),
    }
}

/// Lets the pinentry exit after `BYE`, killing it if it lingers.
fn finish(child: &mut Child) {
    let deadline = Instant::now() + CLOSE_WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) | Err(_) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    stop(child);
}

/// Kills the pinentry and reaps it. (A child of its own, such as a
/// shell script's, is not killed with it.)
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Assuan lines are limited to 1,000 bytes, escapes included ([`encode`]
/// refuses longer ones). `%`, CR and LF are escaped into three bytes each,
/// so a description is measured escaped: past
/// [`MAX_ESCAPED`] bytes it is cut at a character boundary and ends in "…".
fn assuan_line(mut text: String) -> String {
    const ELLIPSIS: char = '…';
    if text.chars().map(escaped_len).sum::<usize>() <= MAX_ESCAPED {
        return text;
    }
    let budget = MAX_ESCAPED - ELLIPSIS.len_utf8();
    let mut used = 0;
    let mut end = 0;
    for (at, c) in text.char_indices() {
        used += escaped_len(c);
        if used > budget {
            break;
        }
        end = at + c.len_utf8();
    }
    text.truncate(end);
    text.push(ELLIPSIS);
    text
}

/// The most bytes a description takes once escaped: 1,000 less room for the
/// command ("SETDESC "), a trailing backslash's escape and the newline.
const MAX_ESCAPED: usize = 900;

/// The bytes `c` takes on an Assuan line.
fn escaped_len(c: char) -> usize {
    match c {
        '%' | '\r' | '\n' => 3,
        c => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use secrecy::ExposeSecret;
    use token_agent_core::PromptSubject;

    use super::*;

    /// A fake pinentry in `dir`: OK to everything, `getpin` and `confirm`
    /// (shell commands) for the questions; it writes its pid to `dir/pid`.
    fn fake(dir: &std::path::Path, getpin: &str, confirm: &str) -> PathBuf {
        let path = dir.join("pinentry");
        let body = format!(
            "#!/bin/sh\necho $$ > '{}'\necho 'OK Pleased to meet you'\n\
             while read -r line; do\n  case \"$line\" in\n    \
             GETPIN*) {getpin} ;;\n    CONFIRM*) {confirm} ;;\n    \
             BYE*) echo OK; exit 0 ;;\n    *) echo OK ;;\n  esac\ndone\n",
            dir.join("pid").display()
        );
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn confirm_request() -> ConfirmRequest {
        ConfirmRequest {
            subject: PromptSubject::default(),
            question: None,
        }
    }

    #[test]
    fn a_pin_is_read_from_data_lines_and_an_empty_one_is_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let getpin = "n=$((n+1)); if [ $n = 1 ]; then echo OK; \
                      else printf 'S PROGRESS\\n# hi\\nD 12%%2534\\nD 56\\nOK\\n'; fi";
        let pinentry = Pinentry::new(fake(dir.path(), getpin, "echo OK"), 10);
        let request = PinRequest::new(PromptSubject::default());
        let pin = pinentry.ask_pin(&request).unwrap();
        assert_eq!(pin.expose_secret(), "12%3456");
    }

    #[test]
    fn cancel_deny_and_the_pinentry_s_own_timeout_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let cancelled = "echo 'ERR 83886179 Operation cancelled <Pinentry>'";
        let pinentry = Pinentry::new(fake(dir.path(), cancelled, cancelled), 10);
        let request = PinRequest::new(PromptSubject::default());
        assert!(matches!(
            pinentry.ask_pin(&request),
            Err(PromptError::Cancelled)
        ));
        assert!(!pinentry.ask_confirm(&confirm_request()).unwrap());
        let cases = [
            ("echo OK", Some(true)),
            ("echo 'ERR 83886194 Not confirmed <Pinentry>'", Some(false)),
            ("echo 'ERR 83886142 Timeout <Pinentry>'", None),
        ];
        for (confirm, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let pinentry = Pinentry::new(fake(dir.path(), "echo OK", confirm), 10);
            match (pinentry.ask_confirm(&confirm_request()), want) {
                (Ok(answer), Some(want)) => assert_eq!(answer, want, "{confirm}"),
                (Err(PromptError::TimedOut { seconds: 10 }), None) => {}
                (other, _) => panic!("{confirm}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_pinentry_that_never_answers_is_killed_after_the_timeout() {
        for question in ["pin", "confirm"] {
            let dir = tempfile::tempdir().unwrap();
            // Reads the question and waits for a line that never comes.
            let hang = "read -r never";
            let pinentry = Pinentry::new(fake(dir.path(), hang, hang), 1);
            let started = Instant::now();
            let answer = match question {
                "pin" => pinentry
                    .ask_pin(&PinRequest::new(PromptSubject::default()))
                    .map(drop),
                _ => pinentry.ask_confirm(&confirm_request()).map(drop),
            };
            assert!(
                matches!(answer, Err(PromptError::TimedOut { seconds: 1 })),
                "{question}: {answer:?}"
            );
            let took = started.elapsed();
            assert!(took >= Duration::from_secs(1) + GRACE, "{took:?}");
            assert!(took < Duration::from_secs(1) + GRACE * 2, "{took:?}");
            let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap();
            assert!(
                !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
                "the pinentry {} still runs",
                pid.trim()
            );
        }
    }

    #[test]
    fn a_timeout_of_0_is_1_second_not_forever() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("lines");
        // Records every request; CONFIRM gets its OK as any other.
        let record = format!("echo \"$line\" >> '{}'; echo OK", lines.display());
        let path = fake(dir.path(), "echo OK", &record);
        let script = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, script.replace("*) echo OK", &format!("*) {record}"))).unwrap();
        let pinentry = Pinentry::new(path, 0);
        assert!(pinentry.ask_confirm(&confirm_request()).unwrap());
        let lines = std::fs::read_to_string(lines).unwrap();
        assert!(lines.contains("SETTIMEOUT 1\n"), "{lines}");
        assert!(!lines.contains("SETTIMEOUT 0"), "{lines}");
    }

    #[test]
    fn lines_are_escaped_and_data_unescaped() {
        assert_eq!(
            encode("SETDESC", Some("50% off\r\nnow\\")).unwrap(),
            "SETDESC 50%25 off%0D%0Anow%5C\n"
        );
        assert_eq!(encode("GETPIN", None).unwrap(), "GETPIN\n");
        assert!(encode("SETDESC", Some(&"a".repeat(992))).is_none());
        let mut data = Vec::new();
        decode(b"a%25b%0A%zz%4", &mut data);
        assert_eq!(data, b"a%b\n%zz%4");
    }

    #[test]
    fn lines_are_read_whole_and_bounded() {
        let mut printf = Command::new("printf")
            .arg(format!(
                "OK hello\\nD a%%25b\\n{}\\n",
                "x".repeat(MAX_LINE + 10)
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = Lines::new(printf.stdout.take().unwrap());
        let mut line = Zeroizing::new(Vec::new());
        assert_eq!(lines.next(&mut line).unwrap(), 9);
        assert_eq!(&line[..], b"OK hello\n");
        lines.next(&mut line).unwrap();
        assert_eq!(&line[..], b"D a%25b\n");
        assert!(lines.next(&mut line).is_err(), "a line past 1,000 bytes");
        let _ = printf.wait();
    }

    #[test]
    fn long_descriptions_are_shortened() {
        let text = assuan_line("é".repeat(1000));
        assert!(text.len() <= MAX_ESCAPED);
        assert!(text.ends_with('…'));
        assert_eq!(assuan_line("short".into()), "short");
        let exact = "a".repeat(MAX_ESCAPED);
        assert_eq!(assuan_line(exact.clone()), exact);
    }

    #[test]
    fn descriptions_fit_an_assuan_line_once_escaped() {
        let cases = [
            "%".repeat(700),
            "\n".repeat(400),
            "\r\n".repeat(300),
            format!("Allow use of key {}?", "%é\n".repeat(300)),
            format!("{}\\", "a".repeat(MAX_ESCAPED - 1)),
            "€%".repeat(400),
        ];
        for text in cases {
            let shortened = assuan_line(text.clone());
            let line = encode("SETDESC", Some(&shortened));
            assert!(line.is_some(), "too long: {shortened:?}");
            assert!(text.starts_with(shortened.trim_end_matches('…')));
        }
        // Cut where the escaped text reaches the limit, not before.
        let shortened = assuan_line("%".repeat(700));
        assert_eq!(shortened, format!("{}…", "%".repeat((MAX_ESCAPED - 3) / 3)));
    }
}
