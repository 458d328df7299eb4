//! Asking through an `SSH_ASKPASS` program, exactly as OpenSSH runs it.
//!
//! The program gets the prompt as its only argument. For a PIN it prints the
//! answer on standard output; for a confirmation OpenSSH sets
//! `SSH_ASKPASS_PROMPT=confirm` and takes exit status 0 as "yes".

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
    /// Uses `program`, giving the person `timeout` to answer.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            timeout,
        }
    }

    /// The program.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Asks for a PIN.
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
        let text = std::str::from_utf8(&answer).map_err(|_| self.failed("answer is not UTF-8"))?;
        let pin = text.trim_end_matches(['\r', '\n']);
        Ok(SecretString::from(pin.to_owned()))
    }

    /// Asks to allow a use of a key: exit status 0 means yes.
    pub async fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        let mut child = self.spawn(&request.description(), Some("confirm"))?;
        match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(Ok(status)) => Ok(status.success()),
            Ok(Err(err)) => Err(self.failed(&err.to_string())),
            // Nobody answered: that is a "no" (the child is killed on drop).
            Err(_) => Ok(false),
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
        command.spawn().map_err(|err| PromptError::Unavailable {
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
