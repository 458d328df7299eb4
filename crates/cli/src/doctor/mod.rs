//! `token-agent doctor [--host HOST]`: check the environment SSH agents live
//! in, the way troubleshooting guides for "sign_and_send_pubkey: signing
//! failed ... agent refused operation" do, and print each problem with the
//! command that fixes it.
//!
//! Each check is a small function from a [`Context`] (the environment and
//! paths it looks at, so tests can point them at temporary directories) to
//! [`Finding`]s. Doctor itself never fails: what it cannot look at becomes a
//! finding too.
//!
//! Exit codes: 0 when nothing is wrong (only `ok` and `info` findings), 1 when
//! at least one problem or warning was found, 2 for a command-line usage
//! error (clap's).
//!
//! Paths come from the environment: `HOME`, `SSH_AUTH_SOCK`,
//! `XDG_RUNTIME_DIR`, `TMPDIR`, `GNUPGHOME`, `PCSCLITE_CSOCK_NAME` (the pcscd
//! socket), `XDG_CONFIG_HOME`, and `TOKEN_AGENT_UDEV_RULES_DIRS` (a
//! colon-separated list of udev rules folders, for tests; by default the
//! system's).

mod agent;
mod devices;
mod files;
mod gpg;
mod host;
mod prompt;
mod socket;

#[cfg(target_os = "linux")]
#[path = "linux.rs"]
mod platform;
#[cfg(not(target_os = "linux"))]
#[path = "other.rs"]
mod platform;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

/// Check the SSH agent environment and print each problem with its fix.
///
/// Looks at what serves SSH_AUTH_SOCK and whether other agents compete with
/// it, ~/.ssh permissions and passphrase-protected keys, the pinentry and
/// SSH_ASKPASS the agent can use, pcscd, udev rules for FIDO keys and smart
/// card readers, and gpg-agent's SSH support. With --host, also what `ssh
/// HOST` would do: its agent, keys, IdentitiesOnly, algorithms, ForwardAgent.
///
/// Exit status: 0 when nothing is wrong, 1 when a problem or warning was
/// found, 2 for a usage error.
#[derive(Debug, Parser)]
#[command(name = "token-agent doctor", bin_name = "token-agent doctor")]
struct DoctorArgs {
    /// Also check how `ssh HOST` would authenticate (reads `ssh -G HOST`).
    #[arg(long, value_name = "HOST", value_parser = parse_host)]
    host: Option<String>,

    /// The ssh configuration file for --host, passed to `ssh -G -F FILE`
    /// (default: ssh's own, ~/.ssh/config).
    #[arg(
        short = 'F',
        long = "ssh-config",
        value_name = "FILE",
        requires = "host"
    )]
    ssh_config: Option<PathBuf>,

    /// token-agent's configuration file, for the pinentry it would use when
    /// no token-agent is running (default: $XDG_CONFIG_HOME/token-agent/config.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print the findings as JSON, for scripts.
    #[arg(long)]
    json: bool,
}

/// The clap definition of `token-agent doctor`, for the man page and completions.
pub(crate) fn command() -> clap::Command {
    <DoctorArgs as clap::CommandFactory>::command()
}

/// Runs `token-agent doctor ...` (`args` starts with "doctor").
pub(crate) fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let args = DoctorArgs::parse_from(args);
    let context = Context::from_process(args.config);
    let target = args.host.map(|host| host::Target {
        host,
        ssh_config: args.ssh_config,
    });
    let findings = run(&context, target.as_ref());
    let report = Report::new(findings);
    let text = if args.json {
        report.json()
    } else {
        report.text()
    };
    // A closed stdout (doctor | head) is no reason for another exit status.
    let _ = std::io::stdout().write_all(text.as_bytes());
    if report.problems + report.warnings == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Every check, in the order a person reads them.
fn run(context: &Context, target: Option<&host::Target>) -> Vec<Finding> {
    let auth = agent::Survey::probe(context);
    let mut findings = agent::check_auth_sock(context, &auth);
    findings.extend(agent::check_other_agents(context, &auth));
    findings.extend(files::check_permissions(context));
    findings.extend(files::check_passphrases(context));
    if let Some(target) = target {
        findings.extend(host::check(context, &auth, target));
    }
    findings.extend(prompt::check(context, &auth));
    findings.extend(devices::check_pcscd(context));
    findings.extend(devices::check_udev(context));
    findings.extend(gpg::check(context));
    findings
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Severity {
    /// ssh will fail (or already fails) because of this.
    Problem,
    /// Likely trouble, or a risk: worth fixing.
    Warning,
    /// A fact worth knowing; nothing to fix.
    Info,
    /// The check passed.
    Ok,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Self::Problem => "problem",
            Self::Warning => "warning",
            Self::Info => "info",
            Self::Ok => "ok",
        }
    }
}

/// Which check a finding comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Check {
    /// What serves SSH_AUTH_SOCK.
    Agent,
    /// Other live agents of this user.
    Agents,
    /// ~/.ssh and key file permissions, as OpenSSH enforces them.
    Permissions,
    /// Passphrase-protected private key files.
    Passphrases,
    /// `--host`: what `ssh HOST` would do.
    Host,
    /// pinentry and SSH_ASKPASS in the agent's environment.
    Prompt,
    /// pcscd, for PIV YubiKeys and smart cards.
    Pcscd,
    /// udev rules for FIDO keys and CCID readers.
    Udev,
    /// gpg-agent's SSH support.
    GpgAgent,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Agents => "agents",
            Self::Permissions => "permissions",
            Self::Passphrases => "passphrases",
            Self::Host => "host",
            Self::Prompt => "prompt",
            Self::Pcscd => "pcscd",
            Self::Udev => "udev",
            Self::GpgAgent => "gpg-agent",
        }
    }
}

/// One thing a check found: what it is, for people, and the command that fixes it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Finding {
    /// The check it comes from.
    pub(crate) check: Check,
    /// A stable name for what was found ("auth-sock-stale"), for scripts and tests.
    pub(crate) code: &'static str,
    /// How bad it is.
    pub(crate) severity: Severity,
    /// What is wrong (or right), in plain words.
    pub(crate) message: String,
    /// The command or change that fixes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fix: Option<String>,
}

impl Finding {
    fn new(check: Check, code: &'static str, severity: Severity, message: String) -> Self {
        Self {
            check,
            code,
            severity,
            message,
            fix: None,
        }
    }

    pub(crate) fn problem(check: Check, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, code, Severity::Problem, message.into())
    }

    pub(crate) fn warning(check: Check, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, code, Severity::Warning, message.into())
    }

    pub(crate) fn info(check: Check, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, code, Severity::Info, message.into())
    }

    pub(crate) fn ok(check: Check, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, code, Severity::Ok, message.into())
    }

    /// The same finding with the command that fixes it.
    pub(crate) fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// The findings and their tally.
#[derive(Debug, Serialize)]
struct Report {
    findings: Vec<Finding>,
    problems: usize,
    warnings: usize,
}

impl Report {
    fn new(findings: Vec<Finding>) -> Self {
        let count = |severity| findings.iter().filter(|f| f.severity == severity).count();
        Self {
            problems: count(Severity::Problem),
            warnings: count(Severity::Warning),
            findings,
        }
    }

    /// One line per finding: severity, check, what is wrong, then the fix.
    fn text(&self) -> String {
        let mut out = String::new();
        for finding in &self.findings {
            out.push_str(&format!(
                "{:<8}{:<13}{}",
                finding.severity.label(),
                finding.check.name(),
                finding.message
            ));
            if let Some(fix) = &finding.fix {
                out.push_str(&format!(" Fix: {fix}"));
            }
            out.push('\n');
        }
        if self.problems + self.warnings == 0 {
            out.push_str("Nothing wrong found.\n");
        } else {
            out.push_str(&format!(
                "{}, {}.\n",
                plural(self.problems, "problem"),
                plural(self.warnings, "warning")
            ));
        }
        out
    }

    fn json(&self) -> String {
        // Serializing plain strings, numbers and enums cannot fail.
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// What the checks look at: the environment (a snapshot, so that tests can
/// make one up) and the user.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    env: BTreeMap<OsString, OsString>,
    uid: u32,
    /// `--config`: token-agent's configuration file.
    config: Option<PathBuf>,
}

impl Context {
    /// This process's environment and user.
    fn from_process(config: Option<PathBuf>) -> Self {
        Self {
            env: std::env::vars_os().collect(),
            uid: nix::unistd::getuid().as_raw(),
            config,
        }
    }

    /// A context with exactly `env`, for unit tests.
    #[cfg(test)]
    pub(crate) fn with_env(env: &[(&str, &str)]) -> Self {
        Self {
            env: env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            uid: nix::unistd::getuid().as_raw(),
            config: None,
        }
    }

    /// The same user with another process's environment (an agent's /proc/PID/environ).
    pub(crate) fn derive(&self, env: Vec<(OsString, OsString)>) -> Self {
        Self {
            env: env.into_iter().collect(),
            uid: self.uid,
            config: None,
        }
    }

    /// The variable `name`, unless unset or empty.
    pub(crate) fn var(&self, name: &str) -> Option<&OsStr> {
        self.env
            .get(OsStr::new(name))
            .map(OsString::as_os_str)
            .filter(|value| !value.is_empty())
    }

    /// The whole environment, for the programs doctor runs (ssh -G, gpgconf).
    pub(crate) fn env(&self) -> &BTreeMap<OsString, OsString> {
        &self.env
    }

    /// This user's uid.
    pub(crate) fn uid(&self) -> u32 {
        self.uid
    }

    /// `--config`.
    pub(crate) fn config(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// `$HOME`. (OpenSSH itself uses the passwd entry's home; they agree
    /// unless someone changed HOME, as the tests do.)
    pub(crate) fn home(&self) -> Option<PathBuf> {
        self.var("HOME").map(PathBuf::from)
    }

    /// `~/.ssh`.
    pub(crate) fn ssh_dir(&self) -> Option<PathBuf> {
        self.home().map(|home| home.join(".ssh"))
    }

    /// `$XDG_RUNTIME_DIR`.
    pub(crate) fn runtime_dir(&self) -> Option<PathBuf> {
        self.var("XDG_RUNTIME_DIR").map(PathBuf::from)
    }

    /// `$TMPDIR`, else /tmp: where ssh-agent (and token-agent) put their sockets.
    pub(crate) fn tmpdir(&self) -> PathBuf {
        self.var("TMPDIR")
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
    }

    /// `$GNUPGHOME`, else ~/.gnupg.
    pub(crate) fn gnupg_home(&self) -> Option<PathBuf> {
        self.var("GNUPGHOME")
            .map(PathBuf::from)
            .or_else(|| self.home().map(|home| home.join(".gnupg")))
    }

    /// pcscd's socket: `$PCSCLITE_CSOCK_NAME` (as libpcsclite reads it), else
    /// /run/pcscd/pcscd.comm.
    pub(crate) fn pcscd_socket(&self) -> PathBuf {
        self.var("PCSCLITE_CSOCK_NAME")
            .map_or_else(|| PathBuf::from("/run/pcscd/pcscd.comm"), PathBuf::from)
    }

    /// The udev rules folders, in udev's order of precedence.
    pub(crate) fn udev_dirs(&self) -> Vec<PathBuf> {
        match self.var("TOKEN_AGENT_UDEV_RULES_DIRS") {
            Some(list) => std::env::split_paths(list).collect(),
            None => [
                "/etc/udev/rules.d",
                "/run/udev/rules.d",
                "/usr/local/lib/udev/rules.d",
                "/usr/lib/udev/rules.d",
                "/lib/udev/rules.d",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
        }
    }

    /// `path` for a message: `~/...` under HOME.
    pub(crate) fn show(&self, path: &Path) -> String {
        match self
            .home()
            .and_then(|home| path.strip_prefix(&home).ok().map(Path::to_path_buf))
        {
            Some(rest) if rest.as_os_str().is_empty() => "~".to_owned(),
            Some(rest) => format!("~/{}", rest.display()),
            None => path.display().to_string(),
        }
    }

    /// `path` for a command a person pastes into a shell: `~/...` under HOME
    /// when that needs no quoting, otherwise quoted.
    pub(crate) fn shell(&self, path: &Path) -> String {
        let shown = self.show(path);
        if let Some(rest) = shown.strip_prefix("~/") {
            if is_shell_safe(rest) {
                return shown;
            }
        } else if shown == "~" {
            return shown;
        }
        shell_quote(&path.display().to_string())
    }
}

/// `text` as one shell word.
pub(crate) fn shell_quote(text: &str) -> String {
    if !text.is_empty() && is_shell_safe(text) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn is_shell_safe(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c))
}

/// `--host`'s value: ssh would take a leading "-" as an option.
fn parse_host(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("the host is empty".into());
    }
    if value.starts_with('-') {
        return Err("a host cannot start with '-'".into());
    }
    Ok(value.to_owned())
}

/// "1 key", "2 keys".
pub(crate) fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_home_are_shown_with_a_tilde_and_quoted_for_the_shell() {
        let context = Context::with_env(&[("HOME", "/home/alice")]);
        assert_eq!(context.show(Path::new("/home/alice/.ssh/id")), "~/.ssh/id");
        assert_eq!(context.shell(Path::new("/home/alice/.ssh/id")), "~/.ssh/id");
        assert_eq!(context.shell(Path::new("/home/alice")), "~");
        assert_eq!(
            context.shell(Path::new("/home/alice/my key")),
            "'/home/alice/my key'"
        );
        assert_eq!(context.shell(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let context = Context::with_env(&[("SSH_AUTH_SOCK", ""), ("TMPDIR", "")]);
        assert!(context.var("SSH_AUTH_SOCK").is_none());
        assert_eq!(context.tmpdir(), Path::new("/tmp"));
    }

    #[test]
    fn hosts_that_look_like_options_are_refused() {
        assert!(parse_host("-oProxyCommand=x").is_err());
        assert!(parse_host("").is_err());
        assert_eq!(parse_host("example.org").as_deref(), Ok("example.org"));
    }

    #[test]
    fn the_text_report_ends_with_a_tally() {
        let report = Report::new(vec![
            Finding::problem(Check::Agent, "x", "broken.").fix("mend it"),
            Finding::ok(Check::Pcscd, "y", "fine."),
        ]);
        let text = report.text();
        assert!(
            text.contains("problem agent        broken. Fix: mend it\n"),
            "{text}"
        );
        assert!(text.ends_with("1 problem, 0 warnings.\n"), "{text}");
    }
}
