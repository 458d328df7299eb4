//! Which keys a connection is shown, and in which order (`[[listing]]`).
//!
//! sshd closes a connection after MaxAuthTries keys (6 by default), and ssh
//! offers the agent's keys in the order they are listed: with a few tokens
//! and an upstream agent or two, the key a host wants can come too late.
//! Rules name the destination by host pattern and list, in order, which
//! keys it is offered; keys no selector of the rule takes are not listed to
//! it. The first rule whose hosts match applies; a connection no rule
//! matches sees every key: token-agent's own first, then each upstream's.
//!
//! The destination is the host key of the connection's last session bind
//! (the host ssh logs in to), named by the known_hosts files of
//! `[forwarding]`: plain entries by their patterns, hashed entries
//! (`HashKnownHosts yes`) by hashing each literal host of the rule with the
//! entry's salt, as ssh itself looks them up. A rule without hosts applies
//! to every connection, `ssh-add -l` included. Filtering only shapes the
//! list: a signature for a key that was not listed is still served.

use std::path::PathBuf;

use hmac::{Hmac, Mac};
use ssh_key::known_hosts::{HostPatterns, KnownHosts};
use ssh_key::public::KeyData;
use token_agent_core::FingerprintHash;

use crate::constraints::SessionBindings;
use crate::pattern;

/// One `[[listing]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingRule {
    /// Host patterns (`*`, `?`, `!` to deny) the destination must match;
    /// None: every connection.
    pub hosts: Option<Vec<String>>,
    /// The keys listed, in this order.
    pub keys: Vec<KeySelector>,
}

/// Which keys a selector takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySelector {
    /// The key with this fingerprint ("SHA256:...", or of any hash `-E`
    /// takes), whatever hash the agent shows fingerprints in.
    Fingerprint(String),
    /// Keys whose comment matches the pattern.
    Comment(String),
    /// Keys of one backend ("software", "pkcs11", "piv", "fido"), or of
    /// every upstream ("upstream").
    Backend(String),
    /// Keys of the upstreams whose socket path matches the pattern.
    Upstream(String),
    /// Every key not taken yet.
    Any,
}

impl KeySelector {
    /// Parses "SHA256:...", "comment:PATTERN", "backend:NAME",
    /// "upstream:PATTERN" or "*".
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::Any);
        }
        let (kind, value) = text.split_once(':').ok_or_else(|| {
            format!(
                "{text:?} is not a key selector: use \"SHA256:...\", \"comment:PATTERN\", \
                 \"backend:NAME\", \"upstream:PATTERN\" or \"*\""
            )
        })?;
        match kind {
            "MD5" | "SHA1" | "SHA256" | "SHA384" | "SHA512" => {
                Ok(Self::Fingerprint(text.to_owned()))
            }
            "comment" => Ok(Self::Comment(value.to_owned())),
            "backend" => match value {
                "software" | "pkcs11" | "piv" | "fido" | "upstream" => {
                    Ok(Self::Backend(value.to_owned()))
                }
                other => Err(format!(
                    "backend {other:?} is not one of software, pkcs11, piv, fido, upstream"
                )),
            },
            "upstream" => Ok(Self::Upstream(value.to_owned())),
            other => Err(format!("{other:?} is not a kind of key selector")),
        }
    }

    fn takes(&self, key: &Candidate<'_>) -> bool {
        match self {
            Self::Fingerprint(fingerprint) => key
                .key
                .is_some_and(|k| FingerprintHash::matches(fingerprint, k)),
            Self::Comment(p) => pattern::matches(key.comment, p),
            Self::Backend(name) => key.backend == name,
            Self::Upstream(p) => key
                .upstream
                .is_some_and(|socket| pattern::matches(socket, p)),
            Self::Any => true,
        }
    }
}

/// One key that may be listed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    /// Its key (a certificate's key for a certificate), if the blob reads.
    pub(crate) key: Option<&'a KeyData>,
    pub(crate) comment: &'a str,
    /// Its backend's name, or "upstream".
    pub(crate) backend: &'a str,
    /// The upstream's socket, for upstream keys.
    pub(crate) upstream: Option<&'a str>,
}

/// The rule for a connection with `bindings`, if any.
pub(crate) fn rule_for<'r>(
    rules: &'r [ListingRule],
    bindings: &SessionBindings,
    known_hosts: &[PathBuf],
) -> Option<&'r ListingRule> {
    let destination = bindings.hops().last().map(|hop| hop.host_key.key_data());
    let mut entries = None;
    rules.iter().find(|rule| match (&rule.hosts, destination) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(hosts), Some(key)) => {
            let entries = entries.get_or_insert_with(|| read_known_hosts(known_hosts));
            host_matches(hosts, key, entries)
        }
    })
}

/// The order in which `rule` lists `candidates`: indices into it, each once.
pub(crate) fn order(rule: &ListingRule, candidates: &[Candidate<'_>]) -> Vec<usize> {
    let mut taken = vec![false; candidates.len()];
    let mut out = Vec::new();
    for selector in &rule.keys {
        for (index, candidate) in candidates.iter().enumerate() {
            if !taken[index] && selector.takes(candidate) {
                taken[index] = true;
                out.push(index);
            }
        }
    }
    out
}

fn read_known_hosts(paths: &[PathBuf]) -> Vec<ssh_key::known_hosts::Entry> {
    paths
        .iter()
        .filter_map(|path| KnownHosts::read_file(path).ok())
        .flatten()
        .filter(|entry| entry.marker().is_none())
        .collect()
}

/// Whether the host with `key` has a known_hosts name that the patterns
/// `hosts` allow (some pattern matches, no `!` pattern does).
fn host_matches(hosts: &[String], key: &KeyData, entries: &[ssh_key::known_hosts::Entry]) -> bool {
    let names: Vec<Name<'_>> = entries
        .iter()
        .filter(|entry| entry.public_key().key_data() == key)
        .flat_map(|entry| match entry.host_patterns() {
            HostPatterns::Patterns(names) => names
                .iter()
                .filter(|n| !n.starts_with('!'))
                .map(|n| Name::Plain(n.as_str()))
                .collect::<Vec<_>>(),
            HostPatterns::HashedName { salt, hash } => vec![Name::Hashed { salt, hash }],
        })
        .collect();
    let mut allowed = false;
    for host in hosts {
        let (negated, p) = match host.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, host.as_str()),
        };
        if names.iter().any(|name| name.matches(p)) {
            if negated {
                return false;
            }
            allowed = true;
        }
    }
    allowed
}

enum Name<'a> {
    Plain(&'a str),
    Hashed { salt: &'a [u8], hash: &'a [u8; 20] },
}

impl Name<'_> {
    fn matches(&self, p: &str) -> bool {
        match self {
            Self::Plain(name) => pattern::matches(&bare(name), p) || pattern::matches(name, p),
            // A hashed name can only be compared with a literal host.
            Self::Hashed { salt, hash } if !p.contains(['*', '?']) => {
                let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                    return false;
                };
                mac.update(p.as_bytes());
                mac.verify_slice(&hash[..]).is_ok()
            }
            Self::Hashed { .. } => false,
        }
    }
}

/// "[host]:port" is "host" to a host pattern.
fn bare(name: &str) -> String {
    name.strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
        .map_or_else(|| name.to_owned(), |(host, _)| host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate<'a>(
        comment: &'a str,
        backend: &'a str,
        upstream: Option<&'a str>,
    ) -> Candidate<'a> {
        Candidate {
            key: None,
            comment,
            backend,
            upstream,
        }
    }

    #[test]
    fn selectors_parse_and_typos_are_errors() {
        assert_eq!(KeySelector::parse("*").unwrap(), KeySelector::Any);
        assert_eq!(
            KeySelector::parse("backend:piv").unwrap(),
            KeySelector::Backend("piv".into())
        );
        assert!(KeySelector::parse("backend:yubikey").is_err());
        assert!(KeySelector::parse("colour:red").is_err());
        assert!(KeySelector::parse("work").is_err());
        assert_eq!(
            KeySelector::parse("SHA256:abc").unwrap(),
            KeySelector::Fingerprint("SHA256:abc".into())
        );
    }

    #[test]
    fn a_fingerprint_selector_matches_in_its_own_hash() {
        let key = KeyData::Ed25519(ssh_key::private::Ed25519Keypair::from_seed(&[3; 32]).public);
        let keys = [
            Candidate {
                key: Some(&key),
                comment: "mine",
                backend: "software",
                upstream: None,
            },
            candidate("other", "software", None),
        ];
        for hash in [
            FingerprintHash::Md5,
            FingerprintHash::Sha1,
            FingerprintHash::Sha256,
            FingerprintHash::Sha384,
            FingerprintHash::Sha512,
        ] {
            let selector = KeySelector::parse(&hash.fingerprint(&key)).unwrap();
            let rule = ListingRule {
                hosts: None,
                keys: vec![selector],
            };
            assert_eq!(order(&rule, &keys), vec![0], "{hash:?}");
        }
    }

    #[test]
    fn the_order_follows_the_selectors_and_leaves_out_the_rest() {
        let keys = [
            candidate("laptop", "software", None),
            candidate("YubiKey 9a", "piv", None),
            candidate(
                "gpg card",
                "upstream",
                Some("/run/user/1/gnupg/S.gpg-agent.ssh"),
            ),
            candidate("work", "upstream", Some("/tmp/other.sock")),
        ];
        let rule = ListingRule {
            hosts: None,
            keys: vec![
                KeySelector::Upstream("*gnupg*".into()),
                KeySelector::Backend("piv".into()),
            ],
        };
        assert_eq!(order(&rule, &keys), vec![2, 1]);
        let everything = ListingRule {
            hosts: None,
            keys: vec![KeySelector::Comment("work".into()), KeySelector::Any],
        };
        assert_eq!(order(&everything, &keys), vec![3, 0, 1, 2]);
    }

    #[test]
    fn hashed_known_hosts_names_match_literal_hosts() {
        // `ssh-keygen -H` of "github.com" with a fixed salt, computed here.
        let salt = [7u8; 20];
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).unwrap();
        mac.update(b"github.com");
        let hash: [u8; 20] = mac.finalize().into_bytes().into();
        let name = Name::Hashed {
            salt: &salt,
            hash: &hash,
        };
        assert!(name.matches("github.com"));
        assert!(!name.matches("gitlab.com"));
        assert!(!name.matches("*.com"));
        assert!(Name::Plain("[db.test]:2222").matches("db.test"));
        assert!(Name::Plain("db.test").matches("*.test"));
    }
}
