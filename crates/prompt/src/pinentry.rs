//! Asking through a pinentry program (GnuPG's Assuan protocol, via the `pinentry` crate).

use std::io::IsTerminal;
use std::path::PathBuf;

use secrecy::SecretString;
use token_agent_core::{ConfirmRequest, PinRequest, PromptError};

/// A pinentry program: `pinentry-gnome3`, `pinentry-qt`, `pinentry-curses`, `pinentry-mac`, ...
#[derive(Debug, Clone)]
pub struct Pinentry {
    program: PathBuf,
    timeout_seconds: u16,
}

impl Pinentry {
    /// Uses `program` (a path, or a name looked up in PATH), giving the person
    /// `timeout_seconds` to answer.
    pub fn new(program: impl Into<PathBuf>, timeout_seconds: u16) -> Self {
        Self {
            program: program.into(),
            timeout_seconds,
        }
    }

    /// The program, as configured.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Asks for a PIN. Blocking: run it off the async runtime.
    pub fn pin(&self, request: &PinRequest) -> Result<SecretString, PromptError> {
        self.check_display(&request.title())?;
        let Some(mut input) = ::pinentry::PassphraseInput::with_binary(&self.program) else {
            return Err(self.not_found());
        };
        let (title, label) = (request.title(), request.label());
        let description = assuan_line(request.description());
        input
            .with_title(&title)
            .with_description(&description)
            .with_prompt(&label)
            .with_timeout(self.timeout_seconds)
            .required("The PIN cannot be empty.");
        input.interact().map_err(|e| self.error(e))
    }

    /// Asks to allow a use of a key. Blocking: run it off the async runtime.
    pub fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        self.check_display("a confirmation")?;
        let Some(mut dialog) = ::pinentry::ConfirmationDialog::with_binary(&self.program) else {
            return Err(self.not_found());
        };
        dialog
            .with_title("token-agent")
            .with_ok("Allow")
            .with_cancel("Deny")
            .with_timeout(self.timeout_seconds);
        // Only the OK button allows: Cancel, "Not confirmed" and a closed
        // window are a no; a timeout or any other failure is an error (and so
        // refuses too).
        match dialog.confirm(&assuan_line(request.description())) {
            Ok(answer) => Ok(answer),
            Err(::pinentry::Error::Timeout) => Err(PromptError::TimedOut {
                seconds: u64::from(self.timeout_seconds),
            }),
            // Some pinentries answer Deny with GPG_ERR_NOT_CONFIRMED, which the
            // crate turns into a "no" only when a third button was set.
            Err(::pinentry::Error::Gpg(err)) if err.code() == GPG_ERR_NOT_CONFIRMED => Ok(false),
            Err(err) => Err(self.error(err)),
        }
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

    fn error(&self, err: ::pinentry::Error) -> PromptError {
        match err {
            ::pinentry::Error::Cancelled => PromptError::Cancelled,
            ::pinentry::Error::Timeout => PromptError::TimedOut {
                seconds: u64::from(self.timeout_seconds),
            },
            other => PromptError::Failed {
                program: self.program.display().to_string(),
                message: other.to_string(),
            },
        }
    }
}

/// libgpg-error's "Not confirmed" (err-codes.h).
const GPG_ERR_NOT_CONFIRMED: u16 = 114;

/// Assuan lines are limited to 1,000 bytes, escapes included (and the
/// `pinentry` crate panics past that). The crate escapes `%`, CR and LF into
/// three bytes each, so a description is measured escaped: past
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
    use super::*;

    /// The line the `pinentry` crate sends for `SETDESC text`, escaped as it
    /// escapes it (`encode_request`).
    fn setdesc(text: &str) -> String {
        let mut line = String::from("SETDESC ");
        for c in text.chars() {
            match c {
                '\n' => line.push_str("%0A"),
                '\r' => line.push_str("%0D"),
                '%' => line.push_str("%25"),
                c => line.push(c),
            }
        }
        if line.ends_with('\\') {
            line.pop();
            line.push_str("%5C");
        }
        line.push('\n');
        line
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
            let line = setdesc(&shortened);
            assert!(line.len() <= 1000, "{} bytes: {line:?}", line.len());
            assert!(text.starts_with(shortened.trim_end_matches('…')));
        }
        // Cut where the escaped text reaches the limit, not before.
        let shortened = assuan_line("%".repeat(700));
        assert_eq!(shortened, format!("{}…", "%".repeat((MAX_ESCAPED - 3) / 3)));
    }
}
