//! The configuration file: what the flags do not cover.
//!
//! `$XDG_CONFIG_HOME/token-agent/config.toml` (or `~/.config/...`), or the file
//! `--config` names. A missing default file means defaults; a file that does
//! not parse is an error that names the line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// How the agent asks the person.
    #[serde(default)]
    pub(crate) prompt: PromptConfig,
    /// Touch notices.
    #[serde(default)]
    pub(crate) notice: NoticeSection,
    /// Certificate files (`*-cert.pub`) presented with whichever key they certify.
    #[serde(default)]
    pub(crate) certificates: Vec<PathBuf>,
    /// Where the background agent logs (default: $XDG_STATE_HOME/token-agent/agent.log).
    pub(crate) log_file: Option<PathBuf>,
    /// Log filter, e.g. "info" or "token_agent_server=debug".
    pub(crate) log_level: Option<String>,
}

/// `[prompt]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PromptConfig {
    /// The pinentry program (default: $PINENTRY_PROGRAM, else "pinentry").
    pub(crate) pinentry: Option<PathBuf>,
    /// Where PINs are asked: "pinentry" or "askpass" (SSH_ASKPASS).
    #[serde(default)]
    pub(crate) pin_prompt: PinPrompt,
    /// Seconds the person has to answer.
    #[serde(default = "default_timeout")]
    pub(crate) timeout_seconds: u16,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            pinentry: None,
            pin_prompt: PinPrompt::default(),
            timeout_seconds: default_timeout(),
        }
    }
}

fn default_timeout() -> u16 {
    60
}

/// `pin_prompt`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PinPrompt {
    /// A pinentry program.
    #[default]
    Pinentry,
    /// The SSH_ASKPASS program.
    Askpass,
}

/// `[notice]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoticeSection {
    /// Milliseconds a device may take before the touch notice appears.
    #[serde(default = "default_delay")]
    pub(crate) delay_ms: u64,
    /// A shell command run when a notice appears (see the README for its environment).
    pub(crate) command: Option<String>,
}

impl Default for NoticeSection {
    fn default() -> Self {
        Self {
            delay_ms: default_delay(),
            command: None,
        }
    }
}

fn default_delay() -> u64 {
    500
}

impl NoticeSection {
    /// The delay as a duration.
    pub(crate) fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms)
    }
}

impl Config {
    /// Loads `explicit`, or the default file if it exists.
    pub(crate) fn load(explicit: Option<&Path>) -> anyhow::Result<Self> {
        let path = match explicit {
            Some(path) => path.to_owned(),
            None => match default_path() {
                Some(path) if path.exists() => path,
                _ => return Ok(Self::default()),
            },
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        let mut config = Self::parse(&text)
            .with_context(|| format!("in the configuration {}", path.display()))?;
        for certificate in &mut config.certificates {
            *certificate = expand_home(certificate);
        }
        config.log_file = config.log_file.as_deref().map(expand_home);
        config.prompt.pinentry = config.prompt.pinentry.as_deref().map(expand_home);
        Ok(config)
    }

    /// Parses a configuration; errors name the line and column.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        // toml's message names the line and column and quotes the line.
        Ok(toml::from_str(text)?)
    }
}

/// `$XDG_CONFIG_HOME/token-agent/config.toml`, or `~/.config/token-agent/config.toml`.
pub(crate) fn default_path() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config").map(|dir| dir.join("token-agent").join("config.toml"))
}

/// `$XDG_STATE_HOME/token-agent/agent.log`, or `~/.local/state/token-agent/agent.log`.
pub(crate) fn default_log_file() -> Option<PathBuf> {
    xdg_dir("XDG_STATE_HOME", ".local/state").map(|dir| dir.join("token-agent").join("agent.log"))
}

/// `~/x` as `$HOME/x`, as a person writes paths in a configuration file.
fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_owned(),
    }
}

fn xdg_dir(variable: &str, fallback: &str) -> Option<PathBuf> {
    match std::env::var_os(variable) {
        Some(dir) if Path::new(&dir).is_absolute() => Some(PathBuf::from(dir)),
        _ => std::env::var_os("HOME").map(|home| PathBuf::from(home).join(fallback)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let config = Config::parse(
            r#"
certificates = ["/etc/ssh/yubikey-cert.pub"]
log_level = "debug"

[prompt]
pinentry = "pinentry-gnome3"
pin_prompt = "askpass"
timeout_seconds = 30

[notice]
delay_ms = 250
command = "notify-send token-agent \"$TOKEN_AGENT_NOTICE\""
"#,
        )
        .unwrap();
        assert_eq!(config.prompt.pin_prompt, PinPrompt::Askpass);
        assert_eq!(config.prompt.timeout_seconds, 30);
        assert_eq!(config.notice.delay(), Duration::from_millis(250));
        assert_eq!(config.certificates.len(), 1);
    }

    #[test]
    fn home_is_expanded() {
        let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
        assert_eq!(
            expand_home(Path::new("~/.ssh/c.pub")),
            home.join(".ssh/c.pub")
        );
        assert_eq!(
            expand_home(Path::new("/etc/c.pub")),
            Path::new("/etc/c.pub")
        );
    }

    #[test]
    fn errors_name_the_line() {
        let err = Config::parse("[prompt]\npin_prompt = \"carrier-pigeon\"\n").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("line 2"), "{text}");
        let err = Config::parse("[prompt]\n\nunknown_key = 1\n").unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("line 3") && text.contains("unknown_key"),
            "{text}"
        );
    }
}
