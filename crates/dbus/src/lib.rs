//! The little of D-Bus that token-agent speaks, on the tokio runtime it
//! already runs: method calls (desktop notifications) and signal
//! subscriptions (logind's and the screensaver's lock signals) on the system
//! and session buses.
//!
//! It is a client of a message bus only: `unix:path=` and `unix:abstract=`
//! addresses, SASL EXTERNAL, no file descriptor passing. It writes the few
//! argument types token-agent sends, and reads any well-formed message,
//! keeping the arguments of small ones. It runs on whatever tokio runtime
//! calls it, the agent's single thread included.
//!
//! ```no_run
//! # async fn example() -> Result<(), token_agent_dbus::Error> {
//! use token_agent_dbus::{Connection, MatchRule};
//!
//! let bus = Connection::session().await?;
//! let rule = MatchRule::signal()
//!     .interface("org.freedesktop.ScreenSaver")
//!     .member("ActiveChanged");
//! let mut signals = bus.subscribe(vec![rule]).await?;
//! while let Some(signal) = signals.next().await {
//!     println!("locked: {}", signal.bool_argument()?);
//! }
//! # Ok(())
//! # }
//! ```

mod address;
mod connection;
mod wire;

use std::fmt;
use std::time::Duration;

pub use connection::{Connection, Signals};
pub use wire::{Body, Kind, Message, Writer};

/// What can go wrong talking to a bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// There is no session bus to connect to: the agent runs outside a
    /// desktop session.
    #[error("no session bus: {0}")]
    NoBus(&'static str),
    /// The bus address is malformed or lists only transports this client does
    /// not speak.
    #[error("cannot use the bus address {address:?}: {reason}")]
    Address {
        /// The address, as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The bus socket is missing or refused the connection, or reading or
    /// writing it failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The bus did not accept our credentials (a bus of another user).
    #[error("the bus refused authentication: {0}")]
    Auth(String),
    /// The bus accepted the connection and then did not answer in time.
    #[error("the bus did not answer within {0:?}")]
    Timeout(Duration),
    /// A message broke the wire format; the connection is closed.
    #[error("malformed D-Bus message: {0}")]
    Malformed(String),
    /// The called peer answered with an error (for instance
    /// `org.freedesktop.DBus.Error.ServiceUnknown` when no notification
    /// server runs).
    #[error("{name}: {message}")]
    Remote {
        /// The D-Bus error name.
        name: String,
        /// The peer's explanation.
        message: String,
    },
    /// A reply or signal carried other arguments than expected.
    #[error("expected arguments ({expected}), got ({found})")]
    Signature {
        /// The signature expected.
        expected: &'static str,
        /// The signature received.
        found: String,
    },
    /// A reply or signal was longer than this client keeps.
    #[error("a message body of {0} bytes is longer than token-agent reads")]
    TooLarge(usize),
    /// The connection to the bus closed.
    #[error("the bus connection closed")]
    Disconnected,
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which signals a subscription wants: each field that is set must match.
/// Written for the bus as a match rule (`AddMatch`), and checked again here
/// to route signals among a connection's subscriptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchRule {
    interface: Option<String>,
    member: Option<String>,
    path: Option<String>,
    path_namespace: Option<String>,
}

impl MatchRule {
    /// Every signal.
    pub fn signal() -> Self {
        Self::default()
    }

    /// Signals of `interface` only.
    pub fn interface(mut self, interface: &str) -> Self {
        self.interface = Some(interface.to_owned());
        self
    }

    /// Signals named `member` only.
    pub fn member(mut self, member: &str) -> Self {
        self.member = Some(member.to_owned());
        self
    }

    /// Signals of the object at `path` only.
    pub fn path(mut self, path: &str) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    /// Signals of the object at `namespace` or below it only.
    pub fn path_namespace(mut self, namespace: &str) -> Self {
        self.path_namespace = Some(namespace.to_owned());
        self
    }

    /// Whether `message` is a signal this rule selects.
    pub fn matches(&self, message: &Message) -> bool {
        let equal = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|want| Some(want) == have)
        };
        let below = |namespace: &str, path: &str| {
            namespace == "/"
                || path == namespace
                || path
                    .strip_prefix(namespace)
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        message.kind() == Kind::Signal
            && equal(&self.interface, message.interface())
            && equal(&self.member, message.member())
            && equal(&self.path, message.path())
            && self
                .path_namespace
                .as_deref()
                .is_none_or(|namespace| message.path().is_some_and(|p| below(namespace, p)))
    }
}

/// The rule as `AddMatch` takes it.
impl fmt::Display for MatchRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("type='signal'")?;
        let keys = [
            ("interface", &self.interface),
            ("member", &self.member),
            ("path", &self.path),
            ("path_namespace", &self.path_namespace),
        ];
        for (key, value) in keys {
            if let Some(value) = value {
                // Quoted; an apostrophe ends the quote, is escaped, and
                // opens a new one.
                write!(f, ",{key}='{}'", value.replace('\'', "'\\''"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_written_as_add_match_reads_them() {
        let rule = MatchRule::signal()
            .interface("org.freedesktop.login1.Session")
            .path("/org/freedesktop/login1/session/it's");
        assert_eq!(
            rule.to_string(),
            "type='signal',interface='org.freedesktop.login1.Session',\
             path='/org/freedesktop/login1/session/it'\\''s'"
        );
        assert_eq!(
            MatchRule::signal()
                .member("PrepareForSleep")
                .path_namespace("/a")
                .to_string(),
            "type='signal',member='PrepareForSleep',path_namespace='/a'"
        );
    }
}
