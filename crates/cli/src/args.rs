//! Command-line flags, compatible with OpenSSH's ssh-agent(1), and their
//! checked form.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use token_agent_core::FingerprintHash;

/// An SSH agent for keys in hardware tokens, and a drop-in for OpenSSH's ssh-agent.
///
/// Without a command, token-agent starts in the background and prints the
/// shell commands that point SSH_AUTH_SOCK at it: eval "$(token-agent -s)".
/// With a command, it runs the command with the agent's environment and exits
/// when the command does.
#[derive(Debug, Parser)]
#[command(name = "token-agent", version, about, long_about)]
pub(crate) struct Args {
    /// Bind the agent to the UNIX-domain socket at this path.
    #[arg(short = 'a', value_name = "BIND_ADDRESS")]
    pub(crate) bind_address: Option<PathBuf>,

    /// Print C-shell commands on stdout.
    #[arg(short = 'c', conflicts_with = "sh")]
    pub(crate) csh: bool,

    /// Print Bourne shell commands on stdout.
    #[arg(short = 's')]
    pub(crate) sh: bool,

    /// Debug mode: stay in the foreground and log debug messages to stderr.
    #[arg(short = 'd', conflicts_with = "foreground")]
    pub(crate) debug: bool,

    /// Foreground mode: stay in the foreground and log to stderr.
    #[arg(short = 'D')]
    pub(crate) foreground: bool,

    /// Kill the agent named by SSH_AGENT_PID.
    #[arg(short = 'k')]
    pub(crate) kill: bool,

    /// Default lifetime of added keys, in seconds or OpenSSH time format (1h30m).
    #[arg(short = 't', value_name = "LIFE")]
    pub(crate) lifetime: Option<String>,

    /// Pattern-list of PKCS#11 providers (`ssh-add -s`) and sk middlewares (`ssh-add -S`) the agent may load.
    #[arg(short = 'P', value_name = "ALLOWED_PROVIDERS")]
    pub(crate) allowed_providers: Option<String>,

    /// Fingerprint hash for logs and prompts: md5, sha256 (default) or sha512.
    #[arg(short = 'E', value_name = "FINGERPRINT_HASH")]
    pub(crate) fingerprint_hash: Option<String>,

    /// OpenSSH option: allow-remote-pkcs11, no-restrict-websafe, websafe-allow=LIST.
    #[arg(short = 'O', value_name = "OPTION")]
    pub(crate) options: Vec<String>,

    /// The configuration file (default: $XDG_CONFIG_HOME/token-agent/config.toml).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Internal: this process is the agent a parent token-agent started.
    #[arg(long, hide = true)]
    pub(crate) daemon_child: bool,

    /// Internal: exit when this process (the one running COMMAND) exits.
    #[arg(long, hide = true, value_name = "PID")]
    pub(crate) parent_pid: Option<i32>,

    /// A command to run with the agent's environment; the agent exits with it.
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

/// Which shell syntax to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shell {
    /// `VAR=value; export VAR;`
    Bourne,
    /// `setenv VAR value;`
    C,
}

/// What the process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Start the agent in the background and print the environment.
    Daemon,
    /// Serve in the foreground (`-D`, or `-d` with debug logs).
    Foreground {
        /// `-d`.
        debug: bool,
    },
    /// The background agent a parent started.
    DaemonChild,
    /// Kill the agent in SSH_AGENT_PID.
    Kill,
}

/// The flags, checked.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// What to run as.
    pub(crate) mode: Mode,
    /// `-a`.
    pub(crate) bind_address: Option<PathBuf>,
    /// `-c` / `-s` / $SHELL.
    pub(crate) shell: Shell,
    /// `-t`.
    pub(crate) default_lifetime: Option<Duration>,
    /// `-P`.
    pub(crate) allowed_providers: Option<String>,
    /// `-E`.
    pub(crate) fingerprint_hash: FingerprintHash,
    /// `-O allow-remote-pkcs11`.
    pub allow_remote_pkcs11: bool,
    /// `--config`.
    pub(crate) config: Option<PathBuf>,
    /// `--parent-pid`.
    pub(crate) parent_pid: Option<i32>,
    /// The command to run.
    pub(crate) command: Vec<OsString>,
}

impl TryFrom<Args> for Options {
    type Error = anyhow::Error;

    fn try_from(args: Args) -> anyhow::Result<Self> {
        let mode = if args.kill {
            Mode::Kill
        } else if args.daemon_child {
            Mode::DaemonChild
        } else if args.debug || args.foreground {
            Mode::Foreground { debug: args.debug }
        } else {
            Mode::Daemon
        };
        if !args.command.is_empty() && matches!(mode, Mode::Foreground { .. } | Mode::Kill) {
            bail!("a command cannot be combined with -d, -D or -k");
        }
        let shell = if args.csh {
            Shell::C
        } else if args.sh {
            Shell::Bourne
        } else if std::env::var("SHELL").is_ok_and(|shell| shell.ends_with("csh")) {
            Shell::C
        } else {
            Shell::Bourne
        };
        let default_lifetime = args
            .lifetime
            .as_deref()
            .map(parse_lifetime)
            .transpose()
            .context("invalid lifetime for -t")?;
        let fingerprint_hash = match args.fingerprint_hash.as_deref() {
            None => FingerprintHash::default(),
            Some(name) => name
                .parse()
                .map_err(|err: String| anyhow::anyhow!("{err} for -E"))?,
        };
        let mut allow_remote_pkcs11 = false;
        for option in &args.options {
            match option.as_str() {
                "allow-remote-pkcs11" => allow_remote_pkcs11 = true,
                // FIDO "websafe" restrictions apply to sk keys signing web
                // challenges; accepted for compatibility, enforced by the FIDO backend.
                "no-restrict-websafe" => {}
                other if other.starts_with("websafe-allow=") => {}
                other => bail!(
                    "unknown -O option \"{other}\": known are allow-remote-pkcs11, \
                     no-restrict-websafe and websafe-allow=LIST"
                ),
            }
        }
        Ok(Self {
            mode,
            bind_address: args.bind_address,
            shell,
            default_lifetime,
            allowed_providers: args.allowed_providers,
            fingerprint_hash,
            allow_remote_pkcs11,
            config: args.config,
            parent_pid: args.parent_pid,
            command: args.command,
        })
    }
}

/// Parses an OpenSSH time value (sshd_config(5) TIME FORMATS): a number of
/// seconds, or a sequence of numbers each followed by s, m, h, d or w.
pub(crate) fn parse_lifetime(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    if text.is_empty() {
        bail!("empty time");
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit: u64 = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => bail!("\"{text}\" is not a time (use seconds, or e.g. 1h30m)"),
        };
        let value: u64 = number.parse().with_context(|| {
            format!("\"{text}\" is not a time (a unit needs a number before it)")
        })?;
        total = value
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .context("time too large")?;
        number.clear();
    }
    if !number.is_empty() {
        let value: u64 = number.parse().context("time too large")?;
        total = total.checked_add(value).context("time too large")?;
    }
    // The protocol carries lifetimes as uint32 seconds.
    if total == 0 || total > u64::from(u32::MAX) {
        bail!("\"{text}\" is out of range (1 second to about 136 years)");
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_like_openssh() {
        assert_eq!(parse_lifetime("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_lifetime("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_lifetime("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(
            parse_lifetime("1w1s").unwrap(),
            Duration::from_secs(604_801)
        );
        assert!(parse_lifetime("").is_err());
        assert!(parse_lifetime("10x").is_err());
        assert!(parse_lifetime("h").is_err());
        assert!(parse_lifetime("0").is_err());
    }

    #[test]
    fn flags_parse_like_ssh_agent() {
        let args = Args::try_parse_from([
            "token-agent",
            "-a",
            "sock",
            "-t",
            "1h",
            "-P",
            "/usr/lib/*",
            "-O",
            "allow-remote-pkcs11",
            "-D",
        ])
        .unwrap();
        let options = Options::try_from(args).unwrap();
        assert_eq!(options.mode, Mode::Foreground { debug: false });
        assert_eq!(options.default_lifetime, Some(Duration::from_secs(3600)));
        assert!(options.allow_remote_pkcs11);
        assert_eq!(options.bind_address.as_deref(), Some("sock".as_ref()));

        let args = Args::try_parse_from(["token-agent", "-s", "sh", "-c", "echo hi"]).unwrap();
        let options = Options::try_from(args).unwrap();
        assert_eq!(options.mode, Mode::Daemon);
        assert_eq!(options.shell, Shell::Bourne);
        assert_eq!(options.command, ["sh", "-c", "echo hi"]);

        let args = Args::try_parse_from(["token-agent", "-O", "bogus"]).unwrap();
        assert!(Options::try_from(args).is_err());
    }
}
