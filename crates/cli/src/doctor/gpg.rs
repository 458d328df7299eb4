//! gpg-agent with enable-ssh-support, which competes for SSH_AUTH_SOCK.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::socket::{self, SocketState};
use super::{Check, Context, Finding};

/// gpg-agent's SSH support: off, or where it is turned on and where it listens.
pub(crate) fn check(context: &Context) -> Vec<Finding> {
    let check = Check::GpgAgent;
    let live = ssh_sockets(context)
        .into_iter()
        .find(|path| matches!(socket::probe(path), SocketState::Live(_)));
    let configured = configured(context);
    let finding = match (configured, live) {
        (Some(source), Some(socket)) => Finding::warning(
            check,
            "gpg-ssh-support",
            format!(
                "gpg-agent serves SSH on {} (enable-ssh-support in {source}): it competes with \
                 token-agent for SSH_AUTH_SOCK, which GnuPG and many desktop sessions point at it.",
                context.show(&socket)
            ),
        ),
        (None, Some(socket)) => Finding::warning(
            check,
            "gpg-ssh-support",
            format!(
                "gpg-agent serves SSH on {} (started with --enable-ssh-support, or by systemd's \
                 gpg-agent-ssh.socket): it competes with token-agent for SSH_AUTH_SOCK.",
                context.show(&socket)
            ),
        ),
        (Some(source), None) => Finding::warning(
            check,
            "gpg-ssh-support-configured",
            format!(
                "{source} turns on enable-ssh-support: the next gpg-agent that starts serves SSH \
                 and competes with token-agent for SSH_AUTH_SOCK."
            ),
        ),
        (None, None) => {
            return vec![Finding::ok(
                check,
                "gpg-no-ssh",
                "gpg-agent's SSH support is off.",
            )]
        }
    };
    vec![finding.fix(turn_off_ssh(context))]
}

/// How to turn gpg-agent's SSH support off.
pub(crate) fn turn_off_ssh(context: &Context) -> String {
    let conf =
        conf_file(context).map_or_else(|| "gpg-agent.conf".to_owned(), |path| context.shell(&path));
    format!(
        "remove enable-ssh-support from {conf}, then gpgconf --kill gpg-agent (and, where \
         systemd starts it, systemctl --user disable --now gpg-agent-ssh.socket)"
    )
}

/// The sockets where gpg-agent serves SSH: what `gpgconf --list-dirs
/// agent-ssh-socket` says, and the usual places when gpgconf is missing.
pub(crate) fn ssh_sockets(context: &Context) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(text) = gpgconf(context, &["--list-dirs", "agent-ssh-socket"]) {
        paths.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(|line| PathBuf::from(unescape(line))),
        );
    }
    if let Some(home) = context.gnupg_home() {
        paths.push(home.join("S.gpg-agent.ssh"));
    }
    if let Some(runtime) = context.runtime_dir() {
        paths.push(runtime.join("gnupg/S.gpg-agent.ssh"));
    }
    paths.dedup();
    paths
}

/// Where enable-ssh-support is turned on: gpg-agent.conf, or what gpgconf
/// reports (a global /etc/gnupg/gpg-agent.conf).
fn configured(context: &Context) -> Option<String> {
    if let Some(path) = conf_file(context) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let enabled = text.lines().any(|line| {
            let line = line.trim();
            !line.starts_with('#') && line.split_whitespace().next() == Some("enable-ssh-support")
        });
        if enabled {
            return Some(context.show(&path));
        }
    }
    // NAME:FLAGS:LEVEL:DESCRIPTION:TYPE:ALT-TYPE:ARGNAME:DEFAULT:ARGDEF:VALUE
    let options = gpgconf(context, &["--list-options", "gpg-agent"])?;
    let on = options.lines().any(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        fields.first() == Some(&"enable-ssh-support")
            && fields.get(9).is_some_and(|value| !value.is_empty())
    });
    on.then(|| "GnuPG's configuration (gpgconf --list-options gpg-agent)".to_owned())
}

fn conf_file(context: &Context) -> Option<PathBuf> {
    context.gnupg_home().map(|home| home.join("gpg-agent.conf"))
}

/// Runs gpgconf with the context's environment; `None` when it is missing or fails.
fn gpgconf(context: &Context, args: &[&str]) -> Option<String> {
    let output = Command::new("gpgconf")
        .args(args)
        .env_clear()
        .envs(context.env())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// gpgconf percent-escapes some characters in paths (":" as %3a).
fn unescape(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpgconf_escapes_are_undone() {
        assert_eq!(
            unescape("/run/user/1000/gnupg/S.gpg-agent.ssh"),
            "/run/user/1000/gnupg/S.gpg-agent.ssh"
        );
        assert_eq!(unescape("/tmp/a%3ab"), "/tmp/a:b");
        assert_eq!(unescape("/tmp/100%"), "/tmp/100%");
    }

    #[test]
    fn enable_ssh_support_is_found_in_gpg_agent_conf() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let context = Context::with_env(&[("GNUPGHOME", home), ("PATH", "/nonexistent")]);
        std::fs::write(dir.path().join("gpg-agent.conf"), "# enable-ssh-support\n").unwrap();
        assert_eq!(configured(&context), None);
        std::fs::write(
            dir.path().join("gpg-agent.conf"),
            "default-cache-ttl 60\n enable-ssh-support\n",
        )
        .unwrap();
        assert!(configured(&context).is_some());
    }
}
