//! Asking through an `SSH_ASKPASS` program, exactly as OpenSSH runs it.
//!
//! The program gets the prompt as its only argument. For a PIN it prints the
//! answer on standard output, of which only the first line counts; for a
//! confirmation OpenSSH sets `SSH_ASKPASS_PROMPT=confirm` and takes exit
//! status 0 as "yes".

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use secrecy::SecretString;
use token_agent_core::{ConfirmRequest, PinRequest, PromptError};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use zeroize::Zeroizing;

/// An askpass program.
#[derive(Debug, Clone)]
pub struct Askpass {
    program: PathBuf,
    timeout: Duration,
}

impl Askpass {
    /// Uses `program`, giving the person `timeout` to answer. Less than a
    /// second counts as one, as for [`Pinentry`](crate::Pinentry): 0 would
    /// refuse every question before the program could answer.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            timeout: timeout.max(Duration::from_secs(1)),
        }
    }

    /// The `SSH_ASKPASS` program of the agent's environment, giving the
    /// person `timeout`: none when `SSH_ASKPASS` is unset or empty, or when
    /// `SSH_ASKPASS_REQUIRE=never` forbids askpass, as it does for OpenSSH.
    pub fn from_environment(timeout: Duration) -> Option<Self> {
        Self::from_variables(|name| std::env::var_os(name), timeout)
    }

    /// [`Askpass::from_environment`] with the variables `var` gives.
    fn from_variables(
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
        timeout: Duration,
    ) -> Option<Self> {
        let never =
            var("SSH_ASKPASS_REQUIRE").is_some_and(|require| require.eq_ignore_ascii_case("never"));
        let program = var("SSH_ASKPASS").filter(|program| !program.is_empty())?;
        (!never).then(|| Self::new(program, timeout))
    }

    /// The program.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Asks for a PIN: the first line the program prints. An empty answer is
    /// [`PromptError::Cancelled`], never an empty PIN that would spend a try.
    pub async fn pin(&self, request: &PinRequest) -> Result<SecretString, PromptError> {
        let mut child = self.spawn(&request.description(), None)?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| self.failed("no stdout"))?;
        let mut answer = Zeroizing::new(Vec::new());
        let read = async {
            stdout.read_to_end(&mut answer).await?;
            child.wait().await
        };
        let status = match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(status)) => status,
            Ok(Err(err)) => return Err(self.failed(&err.to_string())),
            Err(_) => {
                return Err(PromptError::TimedOut {
                    seconds: self.timeout.as_secs(),
                })
            }
        };
        if !status.success() {
            return Err(PromptError::Cancelled);
        }
        match first_line(&answer) {
            Ok(Some(pin)) => Ok(SecretString::from(pin.to_owned())),
            // Nothing typed: sending an empty PIN would only spend a try.
            Ok(None) => Err(PromptError::Cancelled),
            Err(_) => Err(self.failed("answer is not UTF-8")),
        }
    }

    /// Asks to allow a use of a key. As OpenSSH's `ask_permission()`, only
    /// an exit status of 0 with an empty answer or the word "yes" (any case)
    /// allows it; anything else the program prints ("no", "deny", ...) or a
    /// non-zero exit is a no, and no answer within the timeout is
    /// [`PromptError::TimedOut`].
    pub async fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        let mut child = self.spawn(&request.description(), Some("confirm"))?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| self.failed("no stdout"))?;
        let mut answer = Vec::new();
        let read = async {
            // The answer is one short line: read at most a bound of it, then
            // close the pipe so a program that floods stdout cannot stall us.
            let mut limited = (&mut stdout).take(MAX_CONFIRM_ANSWER);
            limited.read_to_end(&mut answer).await?;
            drop(stdout);
            child.wait().await
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(status)) => Ok(status.success() && affirmative(&answer)),
            Ok(Err(err)) => Err(self.failed(&err.to_string())),
            // Nobody answered: a refusal, reported as such (the child is
            // killed on drop).
            Err(_) => Err(PromptError::TimedOut {
                seconds: self.timeout.as_secs(),
            }),
        }
    }

    fn spawn(
        &self,
        prompt: &str,
        kind: Option<&str>,
    ) -> Result<tokio::process::Child, PromptError> {
        let mut command = Command::new(&self.program);
        command
            .arg(prompt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        match kind {
            Some(kind) => command.env("SSH_ASKPASS_PROMPT", kind),
            None => command.env_remove("SSH_ASKPASS_PROMPT"),
        };
        let spawned = crate::retry_busy(|| command.spawn());
        spawned.map_err(|err| PromptError::Unavailable {
            what: "an answer".into(),
            reason: format!(
                "cannot run the askpass program {}: {err}; check SSH_ASKPASS",
                self.program.display()
            ),
        })
    }

    fn failed(&self, message: &str) -> PromptError {
        PromptError::Failed {
            program: self.program.display().to_string(),
            message: message.to_owned(),
        }
    }
}

/// A PIN answer: its first line (up to CR or LF), as OpenSSH's
/// `ssh_askpass()` reads it, so anything an askpass prints after the PIN never
/// reaches the token; `None` when that line is empty.
fn first_line(answer: &[u8]) -> Result<Option<&str>, std::str::Utf8Error> {
    let line = answer
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let line = std::str::from_utf8(line)?;
    Ok((!line.is_empty()).then_some(line))
}

/// The most of a confirmation answer that is read; "yes" needs four bytes.
const MAX_CONFIRM_ANSWER: u64 = 1024;

/// Whether a confirmation answer says yes: the first line (up to CR or LF)
/// is empty or "yes" in any case, exactly as OpenSSH's `ask_permission()`.
fn affirmative(answer: &[u8]) -> bool {
    let line = answer
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    line.is_empty() || line.eq_ignore_ascii_case(b"yes")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use secrecy::ExposeSecret;
    use token_agent_core::{DeviceInfo, PromptSubject};

    use super::*;

    #[test]
    fn ssh_askpass_require_never_forbids_askpass_as_for_openssh() {
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            Askpass::from_variables(
                move |name| {
                    pairs
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, v)| std::ffi::OsString::from(v))
                },
                Duration::from_secs(5),
            )
            .map(|askpass| askpass.program().to_owned())
        };
        assert_eq!(with(&[]), None);
        assert_eq!(with(&[("SSH_ASKPASS", "")]), None);
        assert_eq!(
            with(&[("SSH_ASKPASS", "/usr/bin/ssh-askpass")]),
            Some("/usr/bin/ssh-askpass".into())
        );
        assert_eq!(
            with(&[("SSH_ASKPASS", "/a"), ("SSH_ASKPASS_REQUIRE", "never")]),
            None
        );
        assert_eq!(
            with(&[("SSH_ASKPASS", "/a"), ("SSH_ASKPASS_REQUIRE", "NEVER")]),
            None
        );
        assert_eq!(
            with(&[("SSH_ASKPASS", "/a"), ("SSH_ASKPASS_REQUIRE", "force")]),
            Some("/a".into())
        );
    }

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("askpass");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn pin_request() -> PinRequest {
        let mut request = PinRequest::new(PromptSubject {
            device: Some(DeviceInfo::new("Token #1")),
            ..PromptSubject::default()
        });
        request.tries_left = Some(2);
        request
    }

    #[tokio::test]
    async fn a_pin_is_read_from_standard_output_and_the_prompt_is_the_argument() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let program = script(
            dir.path(),
            &format!(
                "printf '%s|%s' \"$SSH_ASKPASS_PROMPT\" \"$1\" > {}; echo 123456",
                seen.display()
            ),
        );
        let askpass = Askpass::new(program, Duration::from_secs(10));
        let pin = askpass.pin(&pin_request()).await.unwrap();
        assert_eq!(pin.expose_secret(), "123456");
        let seen = std::fs::read_to_string(seen).unwrap();
        assert!(seen.starts_with("|Enter the PIN of Token #1"), "{seen}");
        assert!(seen.ends_with("2 tries left."), "{seen}");
    }

    #[tokio::test]
    async fn a_failing_askpass_is_a_cancel_and_confirm_reads_the_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let no = Askpass::new(script(dir.path(), "exit 1"), Duration::from_secs(10));
        assert!(matches!(
            no.pin(&pin_request()).await,
            Err(PromptError::Cancelled)
        ));
        let confirm = ConfirmRequest {
            subject: PromptSubject::default(),
            question: None,
        };
        assert!(!no.confirm(&confirm).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let yes = Askpass::new(
            script(dir.path(), "[ \"$SSH_ASKPASS_PROMPT\" = confirm ]"),
            Duration::from_secs(10),
        );
        assert!(yes.confirm(&confirm).await.unwrap());
    }

    #[tokio::test]
    async fn confirm_allows_only_an_empty_answer_or_yes() {
        let dir = tempfile::tempdir().unwrap();
        let confirm = ConfirmRequest {
            subject: PromptSubject::default(),
            question: None,
        };
        let cases = [
            ("exit 0", true),
            ("echo", true),
            ("echo yes", true),
            ("printf 'YeS\\r\\n'", true),
            ("echo no", false),
            ("echo deny", false),
            ("echo 'yes please'", false),
            ("echo ' yes'", false),
            ("echo yes; exit 1", false),
            ("exit 1", false),
        ];
        for (i, (body, allowed)) in cases.into_iter().enumerate() {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).unwrap();
            let askpass = Askpass::new(script(&sub, body), Duration::from_secs(10));
            assert_eq!(
                askpass.confirm(&confirm).await.unwrap(),
                allowed,
                "askpass `{body}`"
            );
        }
    }

    #[test]
    fn affirmative_reads_the_first_line_only() {
        assert!(affirmative(b""));
        assert!(affirmative(b"\n"));
        assert!(affirmative(b"yes\nno\n"));
        assert!(!affirmative(b"no\nyes\n"));
        assert!(!affirmative(b"y"));
    }

    #[test]
    fn a_pin_answer_is_its_first_line_and_an_empty_one_is_none() {
        assert_eq!(first_line(b"123456\n"), Ok(Some("123456")));
        assert_eq!(first_line(b"123456\r\n"), Ok(Some("123456")));
        assert_eq!(first_line(b"123456\njunk\n"), Ok(Some("123456")));
        assert_eq!(first_line(b"123456"), Ok(Some("123456")));
        assert_eq!(first_line(b" 12 34 \n"), Ok(Some(" 12 34 ")));
        assert_eq!(first_line(b""), Ok(None));
        assert_eq!(first_line(b"\n"), Ok(None));
        assert_eq!(first_line(b"\r\n123456\n"), Ok(None));
        assert!(first_line(b"\xff\n").is_err());
    }

    #[tokio::test]
    async fn a_pin_is_the_first_line_and_an_empty_answer_is_a_cancel() {
        let cases = [
            ("printf '123456\\njunk\\n'", Some("123456")),
            ("printf '123456\\r\\nmore'", Some("123456")),
            ("exit 0", None),
            ("echo", None),
        ];
        for (body, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let askpass = Askpass::new(script(dir.path(), body), Duration::from_secs(10));
            match (askpass.pin(&pin_request()).await, want) {
                (Ok(pin), Some(want)) => assert_eq!(pin.expose_secret(), want, "`{body}`"),
                (Err(PromptError::Cancelled), None) => {}
                (other, _) => panic!("askpass `{body}`: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_timeout_of_0_is_1_second_not_an_immediate_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let askpass = Askpass::new(script(dir.path(), "sleep 0.2; echo 123456"), Duration::ZERO);
        assert_eq!(
            askpass.pin(&pin_request()).await.unwrap().expose_secret(),
            "123456"
        );
        let confirm = ConfirmRequest {
            subject: PromptSubject::default(),
            question: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let askpass = Askpass::new(script(dir.path(), "sleep 0.2"), Duration::ZERO);
        assert!(askpass.confirm(&confirm).await.unwrap());
    }

    #[tokio::test]
    async fn an_askpass_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let slow = Askpass::new(script(dir.path(), "sleep 30"), Duration::from_millis(300));
        assert!(matches!(
            slow.pin(&pin_request()).await,
            Err(PromptError::TimedOut { .. })
        ));
        let confirm = ConfirmRequest {
            subject: PromptSubject::default(),
            question: None,
        };
        assert!(matches!(
            slow.confirm(&confirm).await,
            Err(PromptError::TimedOut { .. })
        ));
    }
}
