//! A prompter that answers from a script, for tests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use secrecy::SecretString;
use token_agent_core::{
    lock, ConfirmRequest, Notice, NoticeGuard, PinRequest, PromptError, Prompter,
};

/// One scripted answer, used by the next question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptedAnswer {
    /// Answer a PIN request with this PIN.
    Pin(String),
    /// Answer a confirmation.
    Confirm(bool),
    /// Press Cancel.
    Cancel,
}

/// A question the scripted prompter was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A PIN request.
    Pin(PinRequest),
    /// A confirmation.
    Confirm(ConfirmRequest),
    /// A notice.
    Notice(Notice),
}

/// Answers questions from a script and records them.
#[derive(Debug, Default)]
pub struct Scripted {
    answers: Mutex<VecDeque<ScriptedAnswer>>,
    asked: Mutex<Vec<Asked>>,
    active_notices: Arc<AtomicUsize>,
}

impl Scripted {
    /// A prompter that gives `answers` in order.
    pub fn new(answers: impl IntoIterator<Item = ScriptedAnswer>) -> Self {
        Self {
            answers: Mutex::new(answers.into_iter().collect()),
            ..Self::default()
        }
    }

    /// Everything asked so far.
    pub fn asked(&self) -> Vec<Asked> {
        lock(&self.asked).clone()
    }

    /// The PIN requests asked so far, in order.
    pub fn pin_requests(&self) -> Vec<PinRequest> {
        lock(&self.asked)
            .iter()
            .filter_map(|a| match a {
                Asked::Pin(request) => Some(request.clone()),
                _ => None,
            })
            .collect()
    }

    /// How many notices are raised and not yet withdrawn.
    pub fn active_notices(&self) -> usize {
        self.active_notices.load(Ordering::SeqCst)
    }

    fn next(&self, asked: Asked) -> Result<ScriptedAnswer, PromptError> {
        lock(&self.asked).push(asked);
        lock(&self.answers)
            .pop_front()
            .ok_or_else(|| PromptError::Unavailable {
                what: "an answer".into(),
                reason: "the script has no answers left".into(),
            })
    }
}

#[async_trait]
impl Prompter for Scripted {
    async fn pin(&self, request: &PinRequest) -> Result<SecretString, PromptError> {
        match self.next(Asked::Pin(request.clone()))? {
            ScriptedAnswer::Pin(pin) => Ok(SecretString::from(pin)),
            ScriptedAnswer::Cancel => Err(PromptError::Cancelled),
            other => Err(PromptError::Failed {
                program: "script".into(),
                message: format!("expected a PIN answer, the script has {other:?}"),
            }),
        }
    }

    async fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError> {
        match self.next(Asked::Confirm(request.clone()))? {
            ScriptedAnswer::Confirm(answer) => Ok(answer),
            ScriptedAnswer::Cancel => Ok(false),
            other => Err(PromptError::Failed {
                program: "script".into(),
                message: format!("expected a confirmation, the script has {other:?}"),
            }),
        }
    }

    fn notify(&self, notice: &Notice) -> NoticeGuard {
        lock(&self.asked).push(Asked::Notice(notice.clone()));
        self.active_notices.fetch_add(1, Ordering::SeqCst);
        NoticeGuard::new(Active(self.active_notices.clone()))
    }
}

struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
