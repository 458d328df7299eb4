//! The little of D-Bus that token-agent speaks, on the tokio runtime it
//! already runs: method calls (desktop notifications) and signal
//! subscriptions (logind's and the screensaver's lock signals) on the system
//! and session buses, and who owns a name ([`NameOwner`]): the one check
//! that a signal came from the service it claims to come from.
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
///
/// A match rule is no proof of who sent a signal. The bus applies rules to
/// broadcast signals only: a signal a peer sends straight to this connection
/// reaches it whatever its rules say, and on the system bus any local user
/// may send one. A rule's well-known [`sender`](MatchRule::sender) narrows
/// what the bus broadcasts to us, but only the receiver can check that a
/// signal came from the name's owner: see [`NameOwner`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchRule {
    sender: Option<String>,
    interface: Option<String>,
    member: Option<String>,
    path: Option<String>,
    path_namespace: Option<String>,
    arg0: Option<String>,
}

impl MatchRule {
    /// Every signal.
    pub fn signal() -> Self {
        Self::default()
    }

    /// Signals sent by `name` only. The bus checks a well-known name against
    /// its current owner for broadcast signals; here, where owners are not
    /// known, only a unique name (`:1.42`) or the bus's own
    /// `org.freedesktop.DBus` is checked, and a well-known name lets signals
    /// sent straight to us through: check those with [`NameOwner::sent`].
    pub fn sender(mut self, name: &str) -> Self {
        self.sender = Some(name.to_owned());
        self
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

    /// Signals whose first argument is the string `value` only.
    pub fn arg0(mut self, value: &str) -> Self {
        self.arg0 = Some(value.to_owned());
        self
    }

    /// Whether `message` is a signal this rule selects (for a well-known
    /// sender, as far as can be told here: see [`MatchRule::sender`]).
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
        let sender = match self.sender.as_deref() {
            Some(name) if name.starts_with(':') || name == BUS_NAME => {
                message.sender() == Some(name)
            }
            _ => true,
        };
        message.kind() == Kind::Signal
            && sender
            && equal(&self.interface, message.interface())
            && equal(&self.member, message.member())
            && equal(&self.path, message.path())
            && self
                .path_namespace
                .as_deref()
                .is_none_or(|namespace| message.path().is_some_and(|p| below(namespace, p)))
            && self
                .arg0
                .as_deref()
                .is_none_or(|want| message.arg0().as_deref() == Some(want))
    }
}

/// The rule as `AddMatch` takes it.
impl fmt::Display for MatchRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("type='signal'")?;
        let keys = [
            ("sender", &self.sender),
            ("interface", &self.interface),
            ("member", &self.member),
            ("path", &self.path),
            ("path_namespace", &self.path_namespace),
            ("arg0", &self.arg0),
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

/// The bus's own name: the sender of the signals the bus itself sends.
const BUS_NAME: &str = "org.freedesktop.DBus";

/// Who owns a well-known name on a bus, followed as the owner changes: how a
/// receiver knows that a signal came from the service it claims to come
/// from.
///
/// Subscribe to [`NameOwner::rule`] in the same subscription as the signals
/// to check, so that changes of owner and the owner's signals arrive in the
/// order the bus sent them; then ask [`NameOwner::query`], pass every signal
/// to [`NameOwner::update`], and act only on those [`NameOwner::sent`].
///
/// ```no_run
/// # async fn example() -> Result<(), token_agent_dbus::Error> {
/// use token_agent_dbus::{Connection, MatchRule, NameOwner};
///
/// let bus = Connection::system().await?;
/// let sleep = MatchRule::signal()
///     .sender("org.freedesktop.login1")
///     .interface("org.freedesktop.login1.Manager")
///     .member("PrepareForSleep");
/// let mut signals = bus
///     .subscribe(vec![NameOwner::rule("org.freedesktop.login1"), sleep])
///     .await?;
/// let mut logind = NameOwner::query(&bus, "org.freedesktop.login1").await?;
/// while let Some(signal) = signals.next().await {
///     if !logind.update(&signal) && logind.sent(&signal) {
///         println!("sleeping: {}", signal.bool_argument()?);
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameOwner {
    name: String,
    owner: Option<String>,
}

impl NameOwner {
    /// The bus's `NameOwnerChanged` signals about `name`.
    pub fn rule(name: &str) -> MatchRule {
        MatchRule::signal()
            .sender(BUS_NAME)
            .interface(BUS_NAME)
            .member("NameOwnerChanged")
            .path("/org/freedesktop/DBus")
            .arg0(name)
    }

    /// Asks the bus which connection owns `name` now (`GetNameOwner`).
    pub async fn query(bus: &Connection, name: &str) -> Result<Self> {
        let owner = match bus
            .call(
                BUS_NAME,
                "/org/freedesktop/DBus",
                BUS_NAME,
                "GetNameOwner",
                &Body::new().str(name),
            )
            .await
        {
            Ok(reply) => Some(reply.str_argument()?),
            Err(Error::Remote { name, .. })
                if name == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
            {
                None
            }
            Err(err) => return Err(err),
        };
        Ok(Self {
            name: name.to_owned(),
            owner,
        })
    }

    /// Follows `message` if it is the bus's `NameOwnerChanged` about this
    /// name, and says whether it was. Only the bus itself can send it: a
    /// peer's message always carries the peer's own unique name as sender.
    pub fn update(&mut self, message: &Message) -> bool {
        let from_bus = message.kind() == Kind::Signal
            && message.sender() == Some(BUS_NAME)
            && message.interface() == Some(BUS_NAME)
            && message.member() == Some("NameOwnerChanged");
        if !from_bus {
            return false;
        }
        match message.str_arguments().as_deref() {
            Ok([name, _old, new]) if *name == self.name => {
                self.owner = Some(new.clone()).filter(|new| !new.is_empty());
                tracing::debug!(name, owner = new, "a bus name changed hands");
                true
            }
            _ => false,
        }
    }

    /// Whether `message` came from the name's current owner.
    pub fn sent(&self, message: &Message) -> bool {
        self.owner.is_some() && message.sender() == self.owner.as_deref()
    }

    /// The unique name of the current owner, if the name has one.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The well-known name followed.
    pub fn name(&self) -> &str {
        &self.name
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
        assert_eq!(
            NameOwner::rule("org.freedesktop.login1").to_string(),
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',\
             member='NameOwnerChanged',path='/org/freedesktop/DBus',\
             arg0='org.freedesktop.login1'"
        );
    }
}
