//! The forwarding policy: what the agent does when a key is used over a
//! forwarded agent connection (`ssh -A`), per key.
//!
//! A connection is a forwarded one when its first session bind
//! (session-bind@openssh.com) was made for forwarding: the local ssh binds
//! every agent channel it forwards to the host it forwards to, and a remote
//! ssh then binds again to the host it logs in to. Whoever is root on the
//! first host can use such a connection, so the policy can allow it (the
//! default, as OpenSSH), ask the person each time, or refuse it. Rules match
//! keys by fingerprint, comment pattern or backend, so token keys that no
//! `ssh-add` ever added are covered too; the first matching rule wins.
//!
//! A "yes" may be remembered for `confirm_cache` (opt-in, per rule): only for
//! the same key over the same chain of host keys, and never longer.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ssh_key::public::KeyData;
use token_agent_core::FingerprintHash;

use crate::constraints::SessionBindings;
use crate::pattern;

/// What to do with a forwarded use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedUse {
    /// Sign, as OpenSSH does.
    #[default]
    Allow,
    /// Ask the person, naming the hosts.
    Confirm,
    /// Refuse.
    Refuse,
}

/// Which keys a rule covers: every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMatch {
    /// The key's fingerprint ("SHA256:...", or of any hash `-E` takes),
    /// whatever hash the agent shows fingerprints in.
    pub fingerprint: Option<String>,
    /// A pattern (`*`, `?`) the key's comment must match.
    pub comment: Option<String>,
    /// The backend holding it: "software", "pkcs11", "piv" or "fido".
    pub backend: Option<String>,
}

/// One rule of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The keys it covers.
    pub keys: KeyMatch,
    /// What it does.
    pub action: ForwardedUse,
    /// How long a "yes" is remembered; zero: never.
    pub confirm_cache: Duration,
}

/// The whole policy: rules first, then the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardingPolicy {
    /// What applies to keys no rule covers.
    pub default: ForwardedUse,
    /// How long the default remembers a "yes".
    pub default_confirm_cache: Duration,
    /// The rules, in order.
    pub rules: Vec<Rule>,
    /// known_hosts files whose plain host names name the hops in questions.
    pub known_hosts: Vec<PathBuf>,
}

/// The decision for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: ForwardedUse,
    /// How long a "yes" is remembered.
    pub confirm_cache: Duration,
}

impl ForwardingPolicy {
    /// What applies to the key `key` with `comment`, held by `backend`.
    pub fn decide(&self, key: &KeyData, comment: &str, backend: &str) -> Decision {
        for rule in &self.rules {
            let keys = &rule.keys;
            let matches = keys
                .fingerprint
                .as_deref()
                .is_none_or(|f| FingerprintHash::matches(f, key))
                && keys
                    .comment
                    .as_deref()
                    .is_none_or(|p| pattern::matches(comment, p))
                && keys.backend.as_deref().is_none_or(|b| b == backend);
            if matches {
                return Decision {
                    action: rule.action,
                    confirm_cache: rule.confirm_cache,
                };
            }
        }
        Decision {
            action: self.default,
            confirm_cache: self.default_confirm_cache,
        }
    }

    /// The names of `bindings`' hops: each host key's first plain name in the
    /// known_hosts files, or its fingerprint; a first hop whose bind did not
    /// verify is named as such.
    pub fn hop_names(&self, bindings: &SessionBindings) -> Vec<String> {
        let entries: Vec<ssh_key::known_hosts::Entry> = self
            .known_hosts
            .iter()
            .filter_map(|path| ssh_key::known_hosts::KnownHosts::read_file(path).ok())
            .flatten()
            .collect();
        let unverified = bindings
            .first_hop_unverified()
            .then(|| UNVERIFIED_HOP.to_owned());
        let named = bindings.hops().iter().map(|hop| {
            let key = hop.host_key.key_data();
            entries
                .iter()
                .filter(|e| e.marker().is_none() && e.public_key().key_data() == key)
                .find_map(|e| match e.host_patterns() {
                    ssh_key::known_hosts::HostPatterns::Patterns(names) => names
                        .iter()
                        .find(|n| !n.starts_with('!') && !n.contains(['*', '?']))
                        .map(|n| bare_host(n)),
                    ssh_key::known_hosts::HostPatterns::HashedName { .. } => None,
                })
                .unwrap_or_else(|| key.fingerprint(ssh_key::HashAlg::Sha256).to_string())
        });
        unverified.into_iter().chain(named).collect()
    }
}

/// How [`ForwardingPolicy::hop_names`] names a first hop whose bind did not verify.
const UNVERIFIED_HOP: &str = "a host whose session bind did not verify";

/// Whether a connection with `bindings` is a forwarded one. A connection
/// whose first bind did not verify counts as one: ssh does not give up when
/// a bind fails, so whether that hop forwards is unknown, and a remote host
/// must not pass for a local client by sending its own bind after it.
pub fn is_forwarded(bindings: &SessionBindings) -> bool {
    bindings.first_hop_unverified() || bindings.hops().first().is_some_and(|hop| hop.forwarded)
}

/// "[host]:port" in known_hosts is "host:port" to a person.
fn bare_host(name: &str) -> String {
    match name.strip_prefix('[').and_then(|n| n.split_once("]:")) {
        Some((host, port)) => format!("{host}:{port}"),
        None => name.to_owned(),
    }
}

/// Remembered "yes" answers.
#[derive(Debug, Default)]
pub struct ConfirmCache {
    entries: std::sync::Mutex<Vec<Remembered>>,
}

/// A "yes" for one key over one chain of host keys, until when.
#[derive(Debug)]
struct Remembered {
    key: Vec<u8>,
    chain: Vec<KeyData>,
    until: Instant,
}

impl ConfirmCache {
    /// Whether a "yes" for `key` over `chain` is still remembered.
    pub fn allows(&self, key: &[u8], chain: &[KeyData]) -> bool {
        let now = Instant::now();
        let mut entries = token_agent_core::lock(&self.entries);
        entries.retain(|r| r.until > now);
        entries.iter().any(|r| r.key == key && r.chain == chain)
    }

    /// Remembers a "yes" for `key` over `chain` for `how_long`.
    pub fn remember(&self, key: &[u8], chain: Vec<KeyData>, how_long: Duration) {
        if how_long.is_zero() {
            return;
        }
        if let Some(until) = Instant::now().checked_add(how_long) {
            token_agent_core::lock(&self.entries).push(Remembered {
                key: key.to_vec(),
                chain,
                until,
            });
        }
    }

    /// Forgets everything (lock, SIGHUP).
    pub fn clear(&self) {
        token_agent_core::lock(&self.entries).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(keys: KeyMatch, action: ForwardedUse) -> Rule {
        Rule {
            keys,
            action,
            confirm_cache: Duration::ZERO,
        }
    }

    #[test]
    fn the_first_matching_rule_wins_then_the_default() {
        let policy = ForwardingPolicy {
            default: ForwardedUse::Confirm,
            rules: vec![
                rule(
                    KeyMatch {
                        backend: Some("piv".into()),
                        ..KeyMatch::default()
                    },
                    ForwardedUse::Refuse,
                ),
                rule(
                    KeyMatch {
                        comment: Some("*@laptop".into()),
                        ..KeyMatch::default()
                    },
                    ForwardedUse::Allow,
                ),
            ],
            ..ForwardingPolicy::default()
        };
        let key = KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([1; 32]));
        let action = |comment, backend| policy.decide(&key, comment, backend).action;
        assert_eq!(action("alice@laptop", "piv"), ForwardedUse::Refuse);
        assert_eq!(action("alice@laptop", "software"), ForwardedUse::Allow);
        assert_eq!(action("work", "software"), ForwardedUse::Confirm);
    }

    #[test]
    fn a_fingerprint_rule_matches_in_its_own_hash() {
        let key = KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([1; 32]));
        let other = KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([2; 32]));
        for hash in [
            FingerprintHash::Md5,
            FingerprintHash::Sha256,
            FingerprintHash::Sha384,
        ] {
            let policy = ForwardingPolicy {
                rules: vec![Rule {
                    keys: KeyMatch {
                        fingerprint: Some(hash.fingerprint(&key)),
                        ..KeyMatch::default()
                    },
                    action: ForwardedUse::Refuse,
                    confirm_cache: Duration::ZERO,
                }],
                ..ForwardingPolicy::default()
            };
            assert_eq!(
                policy.decide(&key, "k", "software").action,
                ForwardedUse::Refuse
            );
            assert_eq!(
                policy.decide(&other, "k", "software").action,
                ForwardedUse::Allow
            );
        }
    }

    #[test]
    fn the_cache_is_per_key_and_chain_and_expires() {
        let cache = ConfirmCache::default();
        let host = KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([1; 32]));
        let other = KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([2; 32]));
        cache.remember(b"key", vec![host.clone()], Duration::from_millis(100));
        assert!(cache.allows(b"key", std::slice::from_ref(&host)));
        assert!(!cache.allows(b"key", &[other]));
        assert!(!cache.allows(b"other", std::slice::from_ref(&host)));
        std::thread::sleep(Duration::from_millis(150));
        assert!(!cache.allows(b"key", &[host]));
    }

    #[test]
    fn bracketed_names_lose_their_brackets() {
        assert_eq!(bare_host("[127.0.0.1]:2222"), "127.0.0.1:2222");
        assert_eq!(bare_host("db.internal"), "db.internal");
    }
}
