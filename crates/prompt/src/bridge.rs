//! The prompter the agent runs with: chooses pinentry or askpass per question.
//!
//! - PINs go through pinentry, unless the configuration chooses askpass.
//! - Confirmations (`ssh-add -c`) go through `SSH_ASKPASS` when the agent's
//!   environment sets it (and `SSH_ASKPASS_REQUIRE` is not `never`), as
//!   OpenSSH's agent does, since that is what its users have configured;
//!   otherwise through pinentry.
//! - Notices go to the [`Notifier`].
//!
//! One question is asked at a time: two pinentry windows at once would leave
//! the person guessing which device each is for. So each way of asking bounds
//! its own wait (the timeout; for pinentry, a few seconds of grace past its
//! own `SETTIMEOUT`, then the program is killed): a prompt nobody answers
//! cannot hold the turn from the questions after it.

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;
use token_agent_core::{
    ConfirmRequest, Notice, NoticeGuard, PinRequest, PromptError, PromptSubject, Prompter,
};

use crate::askpass::Askpass;
use crate::notice::Notifier;
use crate::pinentry::Pinentry;

/// Where PINs are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PinSource {
    /// A pinentry program (the default).
    #[default]
    Pinentry,
    /// The `SSH_ASKPASS` program.
    Askpass,
}

/// The agent's prompter.
#[derive(Debug)]
pub struct Bridge {
    pinentry: Arc<Pinentry>,
    askpass: Option<Askpass>,
    pin_source: PinSource,
    notifier: Notifier,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Bridge {
    /// A bridge asking PINs from `pin_source`, with `askpass` from `SSH_ASKPASS`
    /// when set.
    pub fn new(
        pinentry: Pinentry,
        askpass: Option<Askpass>,
        pin_source: PinSource,
        notifier: Notifier,
    ) -> Self {
        Self {
            pinentry: Arc::new(pinentry),
            askpass,
            pin_source,
            notifier,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }
}

#[async_trait]
impl Prompter for Bridge {
    async fn pin(&self, request: &PinRequest) -> Result<SecretString, PromptError> {
        let _turn = self.one_at_a_time.lock().await;
        match (self.pin_source, &self.askpass) {
            (PinSource::Askpass, Some(askpass)) => askpass.pin(request).await,
            (PinSource::Askpass, None) => Err(PromptError::Unavailable {
                what: request.title(),
                reason: "the configuration asks for PINs through askpass, but SSH_ASKPASS is \
                         not set in the agent's environment (or SSH_ASKPASS_REQUIRE=never \
                         forbids it)"
                    .into(),
            }),
            (PinSource::Pinentry, _) => {
                let pinentry = self.pinentry.clone();
                let request = request.clone();
                blocking(move || pinentry.pin(&request)).await
            }
        }
    }

    async fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        let _turn = self.one_at_a_time.lock().await;
        match &self.askpass {
            Some(askpass) => askpass.confirm(request).await,
            None => {
                let pinentry = self.pinentry.clone();
                let request = request.clone();
                blocking(move || pinentry.confirm(&request)).await
            }
        }
    }

    fn notify(&self, notice: &Notice) -> NoticeGuard {
        self.notifier.notify(notice)
    }

    fn refused(&self, text: &str, subject: &PromptSubject) {
        self.notifier.announce_refusal(text, subject);
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PromptError> + Send + 'static,
) -> Result<T, PromptError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| {
            Err(PromptError::Failed {
                program: "pinentry".into(),
                message: join.to_string(),
            })
        })
}
