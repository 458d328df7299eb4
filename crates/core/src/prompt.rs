//! Asking the person: the [`Prompter`] trait and what it is asked.
//!
//! A backend never opens a terminal, a pinentry window or a socket itself. It
//! describes what it needs (a [`PinRequest`], a [`ConfirmRequest`], a [`Notice`]
//! while a device waits for a touch) and the prompter decides how to ask. The
//! wording lives here, so every prompter says the same thing the same way.

use std::fmt;

use async_trait::async_trait;
use secrecy::SecretString;

use crate::error::PromptError;
use crate::identity::DeviceInfo;
use crate::sign::SignContext;

/// The bridge to the person at the keyboard.
///
/// Implementations: pinentry and SSH_ASKPASS programs, notice commands and
/// desktop notifications (crate `token-agent-prompt`), and a scripted prompter
/// for tests.
#[async_trait]
pub trait Prompter: Send + Sync + fmt::Debug {
    /// Asks for a PIN (or PUK, or passphrase). The answer is checked by the
    /// device, never by the prompter.
    async fn pin(&self, request: &PinRequest) -> Result<SecretString, PromptError>;

    /// Asks the person to allow a use of a key. `Ok(false)` means they said no.
    async fn confirm(&self, request: &ConfirmRequest) -> Result<bool, PromptError>;

    /// Tells the person that a device waits for them (a touch, a PIN pad).
    ///
    /// The notice may be shown only after a short delay, so fast operations
    /// show nothing; it is withdrawn when the returned guard is dropped, which
    /// the backend does when the device answers.
    fn notify(&self, notice: &Notice) -> NoticeGuard;

    /// Tells the person the agent just refused a request they caused or can
    /// fix (`text` says what happened and what to do), through the same
    /// channel as [`Prompter::notify`]. It stays up on its own; nothing
    /// withdraws it. The default says nothing.
    fn refused(&self, text: &str, subject: &PromptSubject) {
        let _ = (text, subject);
    }
}

/// Who and what a prompt is about. Every field is optional: a prompter says what it knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptSubject {
    /// The key's comment, e.g. "YubiKey 5 #123 slot 9a" or "alice@laptop".
    pub key: Option<String>,
    /// The key's fingerprint ("SHA256:...").
    pub fingerprint: Option<String>,
    /// The device holding the key.
    pub device: Option<DeviceInfo>,
    /// The process asking, e.g. "ssh (pid 1234)".
    pub requester: Option<String>,
    /// Where the signature will be used, e.g. "git@github.com".
    pub destination: Option<String>,
}

impl PromptSubject {
    /// Fills requester and destination from a request's context.
    #[must_use]
    pub fn with_context(mut self, context: &SignContext) -> Self {
        self.requester = Some(context.peer.to_string());
        self.destination = context.destination.as_ref().map(ToString::to_string);
        self
    }

    /// "key alice@laptop (SHA256:...)", or as much of it as is known.
    fn key_phrase(&self) -> Option<String> {
        let key = self.key.as_deref().map(|key| shown(key, SHORT));
        match (key, &self.fingerprint) {
            (Some(key), Some(fp)) => Some(format!("key {key} ({fp})")),
            (Some(key), None) => Some(format!("key {key}")),
            (None, Some(fp)) => Some(format!("key {fp}")),
            (None, None) => None,
        }
    }

    /// " for ssh (pid 1234) connecting to git@github.com", or as much as is known.
    fn request_phrase(&self) -> String {
        let mut phrase = String::new();
        if let Some(requester) = &self.requester {
            phrase.push_str(" for ");
            phrase.push_str(&shown(requester, SHORT));
        }
        if let Some(destination) = &self.destination {
            phrase.push_str(" connecting to ");
            phrase.push_str(&shown(destination, SHORT));
        }
        phrase
    }
}

/// How long a name in a prompt may be: a key comment, a process, a host.
const SHORT: usize = 120;
/// How long a question of its own may be (a forwarded use names hosts).
const LONG: usize = 400;

/// `text` as it may appear in a prompt, at most `max` characters. Parts of
/// a prompt come from others: key comments from clients, the user name from
/// the data a remote host has signed. A newline there could push the
/// question out of view below a text of the sender's choosing, and a
/// terminal escape or a bidirectional override could disguise it; such
/// characters are shown escaped (`\n`, `\u{1b}`).
fn shown(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (count, c) in text.chars().enumerate() {
        if count == max {
            out.push('…');
            break;
        }
        let disguising = matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        );
        if c.is_control() || disguising {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Which secret is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinKind {
    /// The user PIN of a token or card.
    Pin,
    /// The PIV PIN Unblocking Key.
    Puk,
    /// A passphrase (a lock password, a key file's passphrase).
    Passphrase,
}

impl PinKind {
    fn noun(self) -> &'static str {
        match self {
            Self::Pin => "PIN",
            Self::Puk => "PUK",
            Self::Passphrase => "passphrase",
        }
    }
}

/// A request for a PIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinRequest {
    /// What the PIN unlocks and who asks.
    pub subject: PromptSubject,
    /// PIN, PUK or passphrase.
    pub kind: PinKind,
    /// Tries left before the secret blocks, when the device says.
    pub tries_left: Option<u32>,
    /// Said before anything else, e.g. after a wrong PIN.
    pub warning: Option<String>,
}

impl PinRequest {
    /// A request for the PIN of the key in `subject`.
    pub fn new(subject: PromptSubject) -> Self {
        Self {
            subject,
            kind: PinKind::Pin,
            tries_left: None,
            warning: None,
        }
    }

    /// The window title: "PIN for YubiKey 5 #123".
    pub fn title(&self) -> String {
        match &self.subject.device {
            Some(device) => format!("{} for {device}", self.kind.noun()),
            None => format!("token-agent {}", self.kind.noun()),
        }
    }

    /// The prompt label: "PIN:".
    pub fn label(&self) -> String {
        format!("{}:", self.kind.noun())
    }

    /// The full text: which device, which key, who asks, for where, tries left.
    pub fn description(&self) -> String {
        let mut text = String::new();
        if let Some(warning) = &self.warning {
            text.push_str(warning);
            text.push_str("\n\n");
        }
        text.push_str("Enter the ");
        text.push_str(self.kind.noun());
        if let Some(device) = &self.subject.device {
            text.push_str(" of ");
            text.push_str(device.label());
        }
        if let Some(key) = self.subject.key_phrase() {
            text.push_str(" to use ");
            text.push_str(&key);
        }
        text.push_str(&self.subject.request_phrase());
        text.push('.');
        match self.tries_left {
            Some(1) => text.push_str("\nOnly 1 try is left: a wrong PIN now blocks it."),
            Some(n) => text.push_str(&format!("\n{n} tries left.")),
            None => {}
        }
        text
    }
}

/// A request to allow one use of a key: a confirm-constrained key
/// (`ssh-add -c`), or a use over a forwarded agent that the forwarding
/// policy asks about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfirmRequest {
    /// The key and who asks.
    pub subject: PromptSubject,
    /// Said first, when the question has a reason of its own, e.g.
    /// "bastion.example.com wants to use ... to log in to db.internal as carl".
    pub question: Option<String>,
}

impl ConfirmRequest {
    /// The question, worded as OpenSSH's agent words it, plus who asks and for where:
    /// "Allow use of key alice@laptop?\nKey fingerprint SHA256:....\nRequested by ssh (pid 12) ...".
    pub fn description(&self) -> String {
        let key = self
            .subject
            .key
            .as_deref()
            .map_or_else(|| "(no comment)".to_owned(), |key| shown(key, SHORT));
        let mut text = match &self.question {
            Some(question) => format!("{}\n", shown(question, LONG)),
            None => String::new(),
        };
        text.push_str(&format!("Allow use of key {key}?"));
        if let Some(fp) = &self.subject.fingerprint {
            text.push_str("\nKey fingerprint ");
            text.push_str(fp);
            text.push('.');
        }
        let request = self.subject.request_phrase();
        if !request.is_empty() {
            text.push_str("\nRequested");
            text.push_str(&request);
            text.push('.');
        }
        text
    }
}

/// What a device waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    /// A touch of the security key or YubiKey.
    Touch,
    /// The PIN typed on the reader's own PIN pad.
    PinPad,
}

/// A notice that a device waits for the person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// What the device waits for.
    pub kind: NoticeKind,
    /// The key and device and who asks.
    pub subject: PromptSubject,
}

impl Notice {
    /// "Touch YubiKey 5 #123 to use key ... for ssh (pid 1) connecting to host."
    pub fn description(&self) -> String {
        let device = self
            .subject
            .device
            .as_ref()
            .map_or("your security key", DeviceInfo::label);
        let mut text = match self.kind {
            NoticeKind::Touch => format!("Touch {device}"),
            NoticeKind::PinPad => format!("Enter the PIN on the PIN pad of {device}"),
        };
        if let Some(key) = self.subject.key_phrase() {
            text.push_str(" to use ");
            text.push_str(&key);
        }
        text.push_str(&self.subject.request_phrase());
        text.push('.');
        text
    }
}

/// Keeps a [`Notice`] up; dropping it withdraws the notice.
#[must_use = "the notice is withdrawn as soon as the guard is dropped"]
pub struct NoticeGuard {
    _withdraw: Option<Box<dyn Send + Sync>>,
}

impl NoticeGuard {
    /// A guard whose drop runs `withdraw`'s own `Drop` (e.g. cancels a timer and closes a notification).
    pub fn new(withdraw: impl Send + Sync + 'static) -> Self {
        Self {
            _withdraw: Some(Box::new(withdraw)),
        }
    }

    /// A guard with nothing to withdraw.
    pub fn none() -> Self {
        Self { _withdraw: None }
    }
}

impl fmt::Debug for NoticeGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoticeGuard")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> PromptSubject {
        PromptSubject {
            key: Some("slot 9a".into()),
            fingerprint: Some("SHA256:abc".into()),
            device: Some(DeviceInfo::new("YubiKey 5 #1234567")),
            requester: Some("ssh (pid 42)".into()),
            destination: Some("git@example.org".into()),
        }
    }

    #[test]
    fn pin_text_names_device_key_requester_destination_and_tries() {
        let mut request = PinRequest::new(subject());
        request.tries_left = Some(2);
        assert_eq!(request.title(), "PIN for YubiKey 5 #1234567");
        assert_eq!(
            request.description(),
            "Enter the PIN of YubiKey 5 #1234567 to use key slot 9a (SHA256:abc) \
             for ssh (pid 42) connecting to git@example.org.\n2 tries left."
        );
        request.tries_left = Some(1);
        assert!(request.description().contains("Only 1 try is left"));
    }

    #[test]
    fn text_from_others_cannot_break_the_lines_of_a_prompt() {
        // A remote host chose the user name in the data it had signed.
        let request = ConfirmRequest {
            subject: PromptSubject {
                key: Some("laptop\u{1b}[2J\u{202e}".into()),
                destination: Some("git.\n\nThis is a LOCAL request; it is safe.".into()),
                ..subject()
            },
            question: Some("bastion wants to use key k to log in to db as git.\n\n\n".into()),
        };
        let text = request.description();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.starts_with("bastion wants to use key k to log in to db as git.\\n"));
        assert!(
            text.contains("Allow use of key laptop\\u{1b}[2J\\u{202e}?"),
            "{text}"
        );
        assert!(text.contains("connecting to git.\\n\\nThis is a LOCAL request"));
        let long = "x".repeat(1000);
        let request = ConfirmRequest {
            subject: PromptSubject {
                key: Some(long),
                ..subject()
            },
            question: None,
        };
        assert!(request
            .description()
            .contains(&format!("{}…?", "x".repeat(120))));
    }

    #[test]
    fn confirm_text_follows_openssh() {
        let request = ConfirmRequest {
            subject: subject(),
            question: None,
        };
        assert!(request
            .description()
            .starts_with("Allow use of key slot 9a?\nKey fingerprint SHA256:abc."));
    }

    #[test]
    fn notice_text_says_touch() {
        let notice = Notice {
            kind: NoticeKind::Touch,
            subject: subject(),
        };
        assert!(notice
            .description()
            .starts_with("Touch YubiKey 5 #1234567 to use key slot 9a"));
    }

    #[test]
    fn dropping_the_guard_withdraws() {
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let withdrawn = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = NoticeGuard::new(Flag(withdrawn.clone()));
        assert!(!withdrawn.load(std::sync::atomic::Ordering::SeqCst));
        drop(guard);
        assert!(withdrawn.load(std::sync::atomic::Ordering::SeqCst));
    }
}
