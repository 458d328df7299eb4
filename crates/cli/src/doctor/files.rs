//! ~/.ssh: permissions as OpenSSH enforces them, and which private key files
//! are protected by a passphrase. Key material is never printed.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ssh_key::PrivateKey;

use super::{plural, Check, Context, Finding};

/// Key files are small; anything larger is not one.
const MAX_KEY_FILE: u64 = 1024 * 1024;

/// ~/.ssh, its private keys, config and authorized_keys, as ssh and sshd check them.
pub(crate) fn check_permissions(context: &Context) -> Vec<Finding> {
    let check = Check::Permissions;
    let (Some(home), Some(ssh_dir)) = (context.home(), context.ssh_dir()) else {
        return vec![Finding::warning(
            check,
            "home-unset",
            "HOME is not set, so ~/.ssh cannot be checked.",
        )];
    };
    let Ok(ssh_meta) = std::fs::metadata(&ssh_dir) else {
        return vec![Finding::ok(
            check,
            "no-ssh-dir",
            "There is no ~/.ssh, so nothing to check.",
        )];
    };
    let uid = context.uid();
    let mut findings = Vec::new();
    let authorized: Vec<PathBuf> = ["authorized_keys", "authorized_keys2"]
        .iter()
        .map(|name| ssh_dir.join(name))
        .filter(|path| path.exists())
        .collect();

    // sshd's StrictModes: the home folder, ~/.ssh and authorized_keys must
    // belong to the user (or root) and not be writable by group or others,
    // or sshd ignores authorized_keys ("bad ownership or modes").
    if !authorized.is_empty() {
        if let Ok(meta) = std::fs::metadata(&home) {
            if let Some(finding) = strict_mode(context, &home, &meta, "your home folder", "go-w") {
                findings.push(finding);
            }
        }
    }
    if let Some(finding) = strict_mode(context, &ssh_dir, &ssh_meta, "~/.ssh", "700") {
        findings.push(finding);
    }
    for path in &authorized {
        if let Ok(meta) = std::fs::metadata(path) {
            let what = context.show(path);
            if let Some(finding) = strict_mode(context, path, &meta, &what, "600") {
                findings.push(finding);
            }
        }
    }

    // ssh refuses to run at all with a config writable by others.
    let config = ssh_dir.join("config");
    if let Ok(meta) = std::fs::metadata(&config) {
        if !owned_by(&meta, uid) || meta.mode() & 0o022 != 0 {
            findings.push(
                Finding::problem(
                    check,
                    "config-permissions",
                    format!(
                        "~/.ssh/config is {}: ssh refuses to run (\"Bad owner or permissions on \
                         ~/.ssh/config\").",
                        describe_access(&meta, uid)
                    ),
                )
                .fix(fix_for(context, &config, &meta, "600")),
            );
        }
    }

    for key in private_keys(&ssh_dir) {
        findings.extend(key_permissions(context, &key));
    }

    if findings.is_empty() {
        findings.push(Finding::ok(
            check,
            "permissions-ok",
            "~/.ssh, its private keys, config and authorized_keys have permissions OpenSSH \
             accepts.",
        ));
    }
    findings
}

/// ssh's check of a private key file it loads: one the user owns must not
/// be readable or writable by group or others ("UNPROTECTED PRIVATE KEY
/// FILE!"), or ssh ignores it.
pub(crate) fn key_permissions(context: &Context, path: &Path) -> Option<Finding> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.uid() != context.uid() || meta.mode() & 0o077 == 0 {
        return None;
    }
    Some(
        Finding::problem(
            Check::Permissions,
            "unprotected-private-key",
            format!(
                "The private key {} is {} (mode {:04o}): ssh ignores it (\"UNPROTECTED PRIVATE \
                 KEY FILE!\", \"bad permissions\").",
                context.show(path),
                describe_access(&meta, context.uid()),
                meta.mode() & 0o7777
            ),
        )
        .fix(format!("chmod 600 {}", context.shell(path))),
    )
}

/// Passphrase-protected private keys in ~/.ssh: ssh-add (and ssh, for a
/// key not in the agent) ask for the passphrase.
pub(crate) fn check_passphrases(context: &Context) -> Vec<Finding> {
    let check = Check::Passphrases;
    let Some(ssh_dir) = context.ssh_dir() else {
        return Vec::new();
    };
    let keys = private_keys(&ssh_dir);
    let mut findings: Vec<Finding> = keys
        .iter()
        .filter_map(|path| passphrase(context, path))
        .collect();
    if findings.is_empty() {
        let message = if keys.is_empty() {
            "No private key files in ~/.ssh.".to_owned()
        } else {
            format!(
                "None of the {} in ~/.ssh is protected by a passphrase.",
                plural(keys.len(), "private key file")
            )
        };
        findings.push(Finding::ok(check, "no-passphrases", message));
    }
    findings
}

/// An info finding when the private key file at `path` has a passphrase.
pub(crate) fn passphrase(context: &Context, path: &Path) -> Option<Finding> {
    let check = Check::Passphrases;
    let shown = context.show(path);
    let asks = "ssh-add asks for it once, then the agent signs without it";
    match KeyFile::read(path)? {
        KeyFile::OpenSsh { cipher: None }
        | KeyFile::Pem {
            encryption: None, ..
        } => None,
        KeyFile::OpenSsh {
            cipher: Some(cipher),
        } => Some(Finding::info(
            check,
            "passphrase-protected",
            format!("{shown} is protected by a passphrase (OpenSSH format, {cipher}); {asks}."),
        )),
        KeyFile::Pem {
            label,
            encryption: Some(encryption),
        } => Some(
            Finding::info(
                check,
                "passphrase-protected",
                format!(
                    "{shown} is protected by a passphrase ({label}, {encryption}); \
                     {asks}."
                ),
            )
            .fix(format!(
                "ssh-keygen -p -f {} rewrites it in the OpenSSH format, whose passphrase is far \
                 harder to guess",
                context.shell(path)
            )),
        ),
        KeyFile::Unreadable(err) => Some(Finding::info(
            check,
            "key-unreadable",
            format!("Cannot tell whether {shown} has a passphrase: {err}."),
        )),
    }
}

/// What a private key file says about itself, before any passphrase.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyFile {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----` (openssh-key-v1), with its cipher
    /// unless "none".
    OpenSsh { cipher: Option<String> },
    /// An older PEM file: PKCS#1 (`RSA PRIVATE KEY`), SEC1 (`EC PRIVATE
    /// KEY`), `DSA PRIVATE KEY`, or PKCS#8 (`PRIVATE KEY`, `ENCRYPTED PRIVATE KEY`).
    Pem {
        /// "old PEM format, RSA PRIVATE KEY", "PKCS#8 format".
        label: String,
        /// "AES-128-CBC", "PKCS#8 encryption".
        encryption: Option<String>,
    },
    /// An OpenSSH key file ssh-key cannot read.
    Unreadable(String),
}

impl KeyFile {
    /// Reads `path`; `None` when it is not a private key file.
    pub(crate) fn read(path: &Path) -> Option<Self> {
        let file = std::fs::File::open(path).ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(MAX_KEY_FILE).read_to_string(&mut text).ok()?;
        Self::parse(&text)
    }

    /// Classifies the text of a key file.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let text = text.trim_start();
        let first = text.lines().next()?.trim();
        let label = first
            .strip_prefix("-----BEGIN ")?
            .strip_suffix("-----")?
            .trim();
        if !label.ends_with("PRIVATE KEY") {
            return None;
        }
        if label == "OPENSSH PRIVATE KEY" {
            return Some(match PrivateKey::from_openssh(text) {
                Ok(key) => Self::OpenSsh {
                    cipher: key.is_encrypted().then(|| key.cipher().to_string()),
                },
                Err(err) => Self::Unreadable(err.to_string()),
            });
        }
        if label == "ENCRYPTED PRIVATE KEY" {
            return Some(Self::Pem {
                label: "PKCS#8 format".into(),
                encryption: Some("ENCRYPTED PRIVATE KEY".into()),
            });
        }
        // RFC 1421 headers: "Proc-Type: 4,ENCRYPTED" then "DEK-Info: AES-128-CBC,IV".
        let headers: Vec<&str> = text
            .lines()
            .skip(1)
            .take_while(|line| line.contains(':'))
            .collect();
        let encrypted = headers.iter().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("Proc-Type") && value.contains("ENCRYPTED")
            })
        });
        let cipher = headers.iter().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim().eq_ignore_ascii_case("DEK-Info").then(|| {
                value
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
        });
        let label = if label == "PRIVATE KEY" {
            "PKCS#8 format".to_owned()
        } else {
            format!("old PEM format, {label}")
        };
        Some(Self::Pem {
            label,
            encryption: encrypted
                .then(|| cipher.unwrap_or_else(|| "Proc-Type: 4,ENCRYPTED".into())),
        })
    }
}

/// The private key files directly in `dir`, by their first line, sorted.
pub(crate) fn private_keys(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut keys: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.ends_with(".pub")
                && !name.starts_with("known_hosts")
                && !name.starts_with("authorized_keys")
                && name != "config"
                && std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() <= MAX_KEY_FILE)
                && KeyFile::read(path).is_some()
        })
        .collect();
    keys.sort();
    keys
}

/// A StrictModes finding when `path` belongs to someone else or others can write it.
fn strict_mode(
    context: &Context,
    path: &Path,
    meta: &std::fs::Metadata,
    what: &str,
    mode: &str,
) -> Option<Finding> {
    let uid = context.uid();
    if owned_by(meta, uid) && meta.mode() & 0o022 == 0 {
        return None;
    }
    Some(
        Finding::problem(
            Check::Permissions,
            "strict-modes",
            format!(
                "{what} is {} (mode {:04o}): sshd ignores ~/.ssh/authorized_keys (StrictModes, \
                 \"bad ownership or modes\"), and others could put their keys there.",
                describe_access(meta, uid),
                meta.mode() & 0o7777
            ),
        )
        .fix(fix_for(context, path, meta, mode)),
    )
}

/// `chmod MODE PATH`, with a `chown` first when someone else owns it.
fn fix_for(context: &Context, path: &Path, meta: &std::fs::Metadata, mode: &str) -> String {
    let chmod = format!("chmod {mode} {}", context.shell(path));
    if owned_by(meta, context.uid()) {
        return chmod;
    }
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(context.uid()))
        .ok()
        .flatten()
        .map_or_else(|| context.uid().to_string(), |user| user.name);
    format!("sudo chown {user} {} && {chmod}", context.shell(path))
}

fn owned_by(meta: &std::fs::Metadata, uid: u32) -> bool {
    meta.uid() == uid || meta.uid() == 0
}

/// "writable by others", "readable by group", "owned by uid 1001".
fn describe_access(meta: &std::fs::Metadata, uid: u32) -> String {
    let mode = meta.mode();
    let mut parts = Vec::new();
    if !owned_by(meta, uid) {
        parts.push(format!("owned by another user (uid {})", meta.uid()));
    }
    let who = |shift: u32| match (mode >> shift) & 0o7 {
        bits if bits & 0o2 != 0 => Some("writable"),
        bits if bits & 0o4 != 0 => Some("readable"),
        0 => None,
        _ => Some("accessible"),
    };
    match (who(3), who(0)) {
        (Some(group), Some(others)) if group == others => {
            parts.push(format!("{group} by its group and others"));
        }
        (group, others) => {
            parts.extend(group.map(|access| format!("{access} by its group")));
            parts.extend(others.map(|access| format!("{access} by others")));
        }
    }
    if parts.is_empty() {
        "accessible only by you".to_owned()
    } else {
        parts.join(" and ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_pem_keys_are_classified_by_their_headers() {
        let encrypted = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                         DEK-Info: AES-128-CBC,0123456789ABCDEF0123456789ABCDEF\n\nMIIE\n\
                         -----END RSA PRIVATE KEY-----\n";
        assert_eq!(
            KeyFile::parse(encrypted),
            Some(KeyFile::Pem {
                label: "old PEM format, RSA PRIVATE KEY".into(),
                encryption: Some("AES-128-CBC".into())
            })
        );
        let plain = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(
            KeyFile::parse(plain),
            Some(KeyFile::Pem {
                label: "old PEM format, EC PRIVATE KEY".into(),
                encryption: None
            })
        );
        let pkcs8 =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(matches!(
            KeyFile::parse(pkcs8),
            Some(KeyFile::Pem {
                encryption: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn public_keys_and_other_files_are_not_private_keys() {
        assert_eq!(KeyFile::parse("ssh-ed25519 AAAAC3Nza a\n"), None);
        assert_eq!(KeyFile::parse("-----BEGIN CERTIFICATE-----\n"), None);
        assert_eq!(KeyFile::parse(""), None);
    }

    #[test]
    fn a_broken_openssh_key_is_unreadable_not_unprotected() {
        let text = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
        assert!(matches!(KeyFile::parse(text), Some(KeyFile::Unreadable(_))));
    }
}
