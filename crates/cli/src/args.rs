//! Command-line flags, compatible with OpenSSH's ssh-agent(1), and their
//! checked form.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use token_agent_core::FingerprintHash;
use token_agent_server::websafe::Websafe;

/// An SSH agent for keys in hardware tokens, and a drop-in for OpenSSH's ssh-agent.
///
/// Without a command, token-agent starts in the background and prints the
/// shell commands that point SSH_AUTH_SOCK at it: eval "$(token-agent -s)".
/// With a command, it runs the command with the agent's environment and exits
/// when the command does.
#[derive(Debug, Parser)]
#[command(
    name = "token-agent",
    version,
    about,
    long_about,
    disable_version_flag = true,
    after_long_help = "Signals: SIGTERM (and SIGINT with -d or -D) stops the agent and removes \
its socket; SIGUSR1 removes every key clients added, as ssh-agent; SIGHUP makes it forget \
cached PINs and let go of its tokens, and it goes on serving.\n\n\
Socket activation: with -d or -D, without -a, and LISTEN_FDS=1 and LISTEN_PID set by a \
supervisor such as systemd, the agent serves the socket it inherits on file descriptor 3 and \
never removes it."
)]
pub(crate) struct Args {
    /// Bind the agent to the UNIX-domain socket at this path (default: a random name in ~/.ssh/agent/, as OpenSSH 10.1 and later).
    #[arg(
        short = 'a',
        value_name = "BIND_ADDRESS",
        overrides_with = "bind_address"
    )]
    pub(crate) bind_address: Option<PathBuf>,

    /// Print C-shell commands on stdout.
    #[arg(short = 'c', conflicts_with = "sh", overrides_with = "csh")]
    pub(crate) csh: bool,

    /// Print Bourne shell commands on stdout.
    #[arg(short = 's', overrides_with = "sh")]
    pub(crate) sh: bool,

    /// Debug mode: stay in the foreground and log debug messages to stderr.
    #[arg(short = 'd', conflicts_with = "foreground")]
    pub(crate) debug: bool,

    /// Foreground mode: stay in the foreground and log to stderr.
    #[arg(short = 'D')]
    pub(crate) foreground: bool,

    /// Kill the agent named by SSH_AGENT_PID.
    #[arg(short = 'k', overrides_with = "kill")]
    pub(crate) kill: bool,

    /// Bind the socket in a new `$TMPDIR/ssh-XXXXXXXXXX/agent.<ppid>` instead of ~/.ssh/agent/ (as before OpenSSH 10.1).
    #[arg(short = 'T', overrides_with = "temp_dir")]
    pub(crate) temp_dir: bool,

    /// Do not clean up stale agent sockets under ~/.ssh/agent/ at start.
    #[arg(short = 'U', overrides_with = "no_cleanup")]
    pub(crate) no_cleanup: bool,

    /// Only clean up stale agent sockets under ~/.ssh/agent/ made on this host, then exit; given twice, whichever host made them.
    #[arg(short = 'u', action = ArgAction::Count)]
    pub(crate) cleanup: u8,

    /// Default lifetime of added keys, in seconds or OpenSSH time format (1h30m); 0: none.
    #[arg(short = 't', value_name = "LIFE", action = ArgAction::Append)]
    pub(crate) lifetime: Vec<String>,

    /// Pattern-list of PKCS#11 providers (`ssh-add -s`) and sk middlewares (`ssh-add -S`) the agent may load.
    #[arg(short = 'P', value_name = "ALLOWED_PROVIDERS")]
    pub(crate) allowed_providers: Option<String>,

    /// Fingerprint hash for logs and prompts: md5, sha1, sha256 (default), sha384 or sha512.
    #[arg(short = 'E', value_name = "FINGERPRINT_HASH", action = ArgAction::Append)]
    pub(crate) fingerprint_hash: Vec<String>,

    /// OpenSSH option, may be repeated: allow-remote-pkcs11, no-restrict-websafe, websafe-allow=LIST.
    ///
    /// allow-remote-pkcs11: let forwarded connections load PKCS#11 providers and sk middlewares.
    ///
    /// no-restrict-websafe: let FIDO (sk) keys sign data that is neither an SSH login nor an
    /// ssh-keygen signature (it could be a web login) whatever their application.
    ///
    /// websafe-allow=LIST: the pattern-list of sk key applications that may sign anything
    /// (default "ssh:*"), e.g. websafe-allow=ssh:*,example.org.
    #[arg(short = 'O', value_name = "OPTION")]
    pub(crate) options: Vec<String>,

    /// Also serve the keys of the agent at SOCKET (gpg-agent's SSH socket,
    /// another ssh-agent, a password manager's): listed after token-agent's
    /// own, each signature sent to the agent that holds the key. Repeatable;
    /// before the configuration's `upstream`.
    #[arg(short = 'A', value_name = "SOCKET")]
    pub(crate) upstreams: Vec<PathBuf>,

    /// Print the version on stderr and exit, as ssh-agent -V.
    #[arg(short = 'V', long = "version", overrides_with = "version")]
    pub(crate) version: bool,

    /// The configuration file (default: $XDG_CONFIG_HOME/token-agent/config.toml).
    #[arg(long, value_name = "FILE", overrides_with = "config")]
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
    /// `-u`: remove stale sockets under ~/.ssh/agent/ and exit.
    Cleanup {
        /// `-uu`: also those made on other hosts.
        any_host: bool,
    },
    /// `-V`: print the version and exit.
    Version,
}

/// Where the agent's socket goes when it binds one itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketPlace {
    /// `-a PATH`.
    Path(PathBuf),
    /// `-T`: `$TMPDIR/ssh-XXXXXXXXXX/agent.<ppid>`.
    TempDir,
    /// The default: `~/.ssh/agent/s.<host hash>.agent.<random>`, after
    /// removing stale sockets there unless `clean` is false (`-U`).
    Home {
        /// Remove stale sockets first.
        clean: bool,
    },
}

/// The flags, checked.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// What to run as.
    pub(crate) mode: Mode,
    /// `-a`, `-T`, `-U`.
    pub(crate) socket: SocketPlace,
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
    /// `-O no-restrict-websafe`, `-O websafe-allow=LIST`.
    pub(crate) websafe: Websafe,
    /// `-A`.
    pub(crate) upstreams: Vec<PathBuf>,
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
        // In ssh-agent's order: -V wins over everything, then -k, then -u.
        let mode = if args.version {
            Mode::Version
        } else if args.kill {
            Mode::Kill
        } else if args.cleanup > 0 {
            Mode::Cleanup {
                any_host: args.cleanup > 1,
            }
        } else if args.daemon_child {
            Mode::DaemonChild
        } else if args.debug || args.foreground {
            Mode::Foreground { debug: args.debug }
        } else {
            Mode::Daemon
        };
        if !args.command.is_empty()
            && matches!(
                mode,
                Mode::Foreground { .. } | Mode::Kill | Mode::Cleanup { .. }
            )
        {
            bail!("a command cannot be combined with -d, -D, -k or -u");
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
        // A flag given twice: the last one counts, as with ssh-agent's
        // getopt, but every value must be valid, as each is read there.
        let mut default_lifetime = None;
        for text in &args.lifetime {
            default_lifetime = parse_lifetime(text).context("invalid lifetime for -t")?;
        }
        let mut fingerprint_hash = FingerprintHash::default();
        for name in &args.fingerprint_hash {
            fingerprint_hash = name
                .parse()
                .map_err(|err: String| anyhow::anyhow!("{err} for -E"))?;
        }
        let mut allow_remote_pkcs11 = false;
        let mut restrict_websafe = true;
        let mut websafe_allow: Option<String> = None;
        for option in &args.options {
            match option.as_str() {
                "allow-remote-pkcs11" => allow_remote_pkcs11 = true,
                "no-restrict-websafe" => restrict_websafe = false,
                other if other.starts_with("websafe-allow=") => {
                    if websafe_allow.is_some() {
                        bail!("websafe-allow already set: give -O websafe-allow=LIST once, with every pattern in LIST");
                    }
                    websafe_allow = Some(other["websafe-allow=".len()..].to_owned());
                }
                other => bail!(
                    "unknown -O option \"{other}\": known are allow-remote-pkcs11, \
                     no-restrict-websafe and websafe-allow=LIST"
                ),
            }
        }
        // As ssh-agent: -T wins over -a, and -U matters only for the default place.
        let socket = match (args.temp_dir, args.bind_address) {
            (true, _) => SocketPlace::TempDir,
            (false, Some(path)) => SocketPlace::Path(path),
            (false, None) => SocketPlace::Home {
                clean: !args.no_cleanup,
            },
        };
        Ok(Self {
            mode,
            socket,
            shell,
            default_lifetime,
            allowed_providers: args.allowed_providers,
            fingerprint_hash,
            allow_remote_pkcs11,
            websafe: Websafe::new(restrict_websafe, websafe_allow),
            upstreams: args.upstreams,
            config: args.config,
            parent_pid: args.parent_pid,
            command: args.command,
        })
    }
}

/// Parses an OpenSSH time value exactly as OpenSSH 10.5's `convtime()`
/// (sshd_config(5) TIME FORMATS): a sequence of numbers, each followed by
/// s, m, h, d or w (either case) or by nothing, meaning seconds; seconds are
/// given at most once and may have a fraction, which is dropped (`1.5` is
/// one second). The total is at most 2^31-1 seconds. `0` (or a fraction of
/// a second) is `None`: no lifetime, as ssh-agent's `-t 0`.
pub(crate) fn parse_lifetime(text: &str) -> anyhow::Result<Option<Duration>> {
    let not_a_time = || anyhow::anyhow!("\"{text}\" is not a time (use seconds, or e.g. 1h30m)");
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        bail!("empty time");
    }
    let mut total = 0.0_f64;
    let mut seen_seconds = false;
    let mut at = 0;
    while at < bytes.len() {
        // The number: what strtod() reads of the longest run of digits and
        // dots, which convtime() takes only if strtod() reads all of it.
        let run = bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit() || **b == b'.')
            .count();
        let number = &text[at..at + run];
        let fraction = number.contains('.');
        if number.matches('.').count() > 1 || !number.bytes().any(|b| b.is_ascii_digit()) {
            return Err(not_a_time());
        }
        let value: f64 = number.parse().map_err(|_| not_a_time())?;
        at += run;
        let multiplier = match bytes.get(at).map(u8::to_ascii_lowercase) {
            None | Some(b's') => {
                if std::mem::replace(&mut seen_seconds, true) {
                    return Err(not_a_time());
                }
                1.0
            }
            Some(b'm') => 60.0,
            Some(b'h') => 3600.0,
            Some(b'd') => 86_400.0,
            Some(b'w') => 604_800.0,
            Some(_) => return Err(not_a_time()),
        };
        // A fraction only of seconds, and with a digit after the dot.
        if fraction && (multiplier > 1.0 || number.ends_with('.')) {
            return Err(not_a_time());
        }
        total += value * multiplier;
        at += 1;
    }
    if total > f64::from(i32::MAX) {
        bail!("\"{text}\" is out of range (at most 2147483647 seconds, about 68 years)");
    }
    // Truncating, as convtime()'s (int): 1.5 is one second, 0.5 none.
    // In range: 0 <= total <= i32::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let seconds = total as u64;
    Ok((seconds > 0).then(|| Duration::from_secs(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_like_openssh_10_convtime() {
        let seconds = |text| {
            parse_lifetime(text)
                .map(|lifetime| lifetime.map_or(0, |d| d.as_secs()))
                .ok()
        };
        // What OpenSSH 10.5's ssh-agent -t accepts, and as how many seconds.
        for (text, expected) in [
            ("600", 600),
            ("1h30m", 5400),
            ("1H30M", 5400),
            ("2d", 172_800),
            ("1w1s", 604_801),
            ("1m30", 90),
            ("0", 0),
            ("1.5", 1),
            ("1.5s", 1),
            ("0.5", 0),
            (".5", 0),
            ("1h1.5", 3601),
            ("2147483647", 2_147_483_647),
        ] {
            assert_eq!(seconds(text), Some(expected), "{text}");
        }
        // And what it refuses.
        for text in [
            "",
            "10x",
            "h",
            "1.5m",
            "1.",
            "1s2s",
            "5s10",
            " 10",
            "10 ",
            "1.2.3",
            ".",
            "1e3",
            "0x10",
            "-5",
            "2147483648",
            "3551w",
        ] {
            assert_eq!(seconds(text), None, "{text}");
        }
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
        assert_eq!(options.socket, SocketPlace::Path("sock".into()));
        assert_eq!(options.websafe, Websafe::default());

        let args = Args::try_parse_from(["token-agent", "-s", "sh", "-c", "echo hi"]).unwrap();
        let options = Options::try_from(args).unwrap();
        assert_eq!(options.mode, Mode::Daemon);
        assert_eq!(options.shell, Shell::Bourne);
        assert_eq!(options.command, ["sh", "-c", "echo hi"]);

        let args = Args::try_parse_from(["token-agent", "-O", "bogus"]).unwrap();
        assert!(Options::try_from(args).is_err());
    }

    fn options(args: &[&str]) -> anyhow::Result<Options> {
        let mut all = vec!["token-agent"];
        all.extend_from_slice(args);
        Options::try_from(Args::try_parse_from(all)?)
    }

    #[test]
    fn a_flag_given_twice_counts_the_last_time_as_with_getopt() {
        let parsed = options(&[
            "-a", "x1", "-a", "x2", "-t", "5", "-t", "0", "-E", "md5", "-E", "sha1", "-s", "-s",
            "-k", "-k",
        ])
        .unwrap();
        assert_eq!(parsed.socket, SocketPlace::Path("x2".into()));
        assert_eq!(parsed.default_lifetime, None);
        assert_eq!(parsed.fingerprint_hash, FingerprintHash::Sha1);
        assert_eq!(parsed.shell, Shell::Bourne);
        assert_eq!(parsed.mode, Mode::Kill);
        // Each value is read, as getopt hands each to ssh-agent.
        assert!(options(&["-t", "10x", "-t", "5"]).is_err());
        // ssh-agent's usage() for these.
        assert!(options(&["-d", "-d"]).is_err());
        assert!(options(&["-c", "-s"]).is_err());
    }

    #[test]
    fn socket_places_follow_ssh_agent() {
        assert_eq!(
            options(&[]).unwrap().socket,
            SocketPlace::Home { clean: true }
        );
        assert_eq!(
            options(&["-U"]).unwrap().socket,
            SocketPlace::Home { clean: false }
        );
        assert_eq!(options(&["-T"]).unwrap().socket, SocketPlace::TempDir);
        // ssh-agent binds in $TMPDIR when given both -T and -a.
        assert_eq!(
            options(&["-a", "sock", "-T"]).unwrap().socket,
            SocketPlace::TempDir
        );
    }

    #[test]
    fn u_v_and_their_combinations() {
        assert_eq!(
            options(&["-u"]).unwrap().mode,
            Mode::Cleanup { any_host: false }
        );
        assert_eq!(
            options(&["-uu"]).unwrap().mode,
            Mode::Cleanup { any_host: true }
        );
        assert_eq!(
            options(&["-u", "-u"]).unwrap().mode,
            Mode::Cleanup { any_host: true }
        );
        assert!(options(&["-u", "sh"]).is_err());
        assert_eq!(options(&["-V"]).unwrap().mode, Mode::Version);
        assert_eq!(options(&["-k", "-V"]).unwrap().mode, Mode::Version);
        assert_eq!(options(&["--version"]).unwrap().mode, Mode::Version);
    }

    #[test]
    fn websafe_options_as_openssh() {
        let parsed = options(&["-O", "no-restrict-websafe"]).unwrap();
        assert!(!parsed.websafe.restricts());
        let parsed = options(&["-O", "websafe-allow=ssh:*,example.org"]).unwrap();
        assert!(parsed.websafe.restricts());
        assert_eq!(parsed.websafe.allowlist(), "ssh:*,example.org");
        let twice = options(&["-O", "websafe-allow=a", "-O", "websafe-allow=b"]).unwrap_err();
        assert!(
            twice.to_string().contains("websafe-allow already set"),
            "{twice}"
        );
    }
}
