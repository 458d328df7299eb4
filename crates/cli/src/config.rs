//! The configuration file: what the flags do not cover.
//!
//! `$XDG_CONFIG_HOME/token-agent/config.toml` (or `~/.config/...`), or the file
//! `--config` names. A missing default file means defaults; a file that does
//! not parse is an error that names the line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

/// One key of the configuration file, as the man page lists it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    /// The table it goes in: "" for the top level, "prompt", "pkcs11.modules" (an array of tables), ...
    pub(crate) section: &'static str,
    /// The key.
    pub(crate) name: &'static str,
    /// An example value, in TOML.
    pub(crate) example: &'static str,
    /// What it means, with its default.
    pub(crate) meaning: &'static str,
}

/// The sections of [`KEYS`] that are arrays of tables (`[[pkcs11.modules]]`).
pub(crate) const ARRAY_SECTIONS: &[&str] = &["pkcs11.modules", "forwarding.keys", "listing"];

/// Every key the file takes, in the order the man page shows them. The one
/// list the documentation is made from; a test checks it against the parser
/// both ways (every key here parses, every key the parser fills is here).
pub(crate) const KEYS: &[Key] = &[
    Key {
        section: "",
        name: "certificates",
        example: r#"["~/.ssh/yubikey-cert.pub"]"#,
        meaning: "Certificate files (*-cert.pub) presented with whichever key they certify, software or token.",
    },
    Key {
        section: "",
        name: "log_file",
        example: r#""~/.local/state/token-agent/agent.log""#,
        meaning: "Where the background agent logs. Default: $XDG_STATE_HOME/token-agent/agent.log; syslog when the file cannot be made.",
    },
    Key {
        section: "",
        name: "log_level",
        example: r#""info""#,
        meaning: "Log filter, e.g. \"info\" (every signature: key, client process, destination) or \"token_agent_server=debug\".",
    },
    Key {
        section: "",
        name: "upstream",
        example: r#"["~/.gnupg/S.gpg-agent.ssh"]"#,
        meaning: "Sockets of other agents whose keys token-agent serves too, after its own and in this order, after those of -A. \
Each signature goes to the agent that holds the key; session binds are passed on, so their destination constraints hold.",
    },
    Key {
        section: "upstreams",
        name: "list_timeout_ms",
        example: "250",
        meaning: "Milliseconds an upstream agent may take to list its keys; one that takes longer is shown by its last list and not asked again until it answers. Default: 250.",
    },
    Key {
        section: "upstreams",
        name: "keep_list_seconds",
        example: "300",
        meaning: "Seconds the last list of an upstream agent that stopped answering is still shown. Default: 300.",
    },
    Key {
        section: "upstreams",
        name: "sign_timeout_seconds",
        example: "120",
        meaning: "Seconds an upstream agent may take to sign, its own confirmation included. Default: 120.",
    },
    Key {
        section: "upstreams",
        name: "add_to",
        example: r#""~/.gnupg/S.gpg-agent.ssh""#,
        meaning: "The upstream (one of its sockets) that keys added with ssh-add go to, constraints and all; without it token-agent keeps them.",
    },
    Key {
        section: "prompt",
        name: "pinentry",
        example: r#""pinentry-gnome3""#,
        meaning: "The pinentry program. Default: $PINENTRY_PROGRAM, else \"pinentry\".",
    },
    Key {
        section: "prompt",
        name: "pin_prompt",
        example: r#""pinentry""#,
        meaning: "Where PINs are asked: \"pinentry\" (default) or \"askpass\" (the $SSH_ASKPASS program).",
    },
    Key {
        section: "prompt",
        name: "timeout_seconds",
        example: "60",
        meaning: "Seconds the person has to answer a prompt (0 counts as 1). Default: 60.",
    },
    Key {
        section: "notice",
        name: "delay_ms",
        example: "500",
        meaning: "Milliseconds a device may take before the touch or PIN-pad notice appears. Default: 500.",
    },
    Key {
        section: "notice",
        name: "command",
        example: r#"'notify-send token-agent "$TOKEN_AGENT_NOTICE"'"#,
        meaning: "A shell command run when a device waits for a touch or a PIN pad, stopped when it answers. \
Its environment carries TOKEN_AGENT_NOTICE (the text), TOKEN_AGENT_NOTICE_KIND (touch or pinpad), \
TOKEN_AGENT_KEY, TOKEN_AGENT_FINGERPRINT, TOKEN_AGENT_DEVICE, TOKEN_AGENT_HOST and TOKEN_AGENT_CLIENT. \
Without it, the notice is a desktop notification (org.freedesktop.Notifications on the session bus), \
closed when the device answers.",
    },
    Key {
        section: "piv",
        name: "enabled",
        example: "true",
        meaning: "Offer the keys of plugged-in YubiKeys (PIV, through pcscd). Default: true.",
    },
    Key {
        section: "piv",
        name: "pin_cache_idle_seconds",
        example: "900",
        meaning: "Seconds a card's PIN is kept without use; 0 never keeps it. Default: 900.",
    },
    Key {
        section: "pkcs11",
        name: "pin_cache_idle_seconds",
        example: "900",
        meaning: "Seconds a token's PIN is kept without use; 0 never keeps it. Default: 900.",
    },
    Key {
        section: "pkcs11",
        name: "timeout_seconds",
        example: "30",
        meaning: "Seconds a module may take to answer a call before its helper process is killed and restarted. Default: 30.",
    },
    Key {
        section: "pkcs11",
        name: "pin_pad_timeout_seconds",
        example: "300",
        meaning: "Seconds a person may take at a reader's PIN pad. Default: 300.",
    },
    Key {
        section: "pkcs11",
        name: "poll_interval_ms",
        example: "2000",
        meaning: "Milliseconds between looks for tokens coming and going. Default: 2000.",
    },
    Key {
        section: "pkcs11",
        name: "parallel_signatures",
        example: "0",
        meaning: "The most signatures one module makes at once; 0 (default) means as many as clients ask for at once, up to 64.",
    },
    Key {
        section: "pkcs11.modules",
        name: "path",
        example: r#""/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so""#,
        meaning: "A PKCS#11 module loaded at start, in a helper process of its own (one [[pkcs11.modules]] table each).",
    },
    Key {
        section: "pkcs11.modules",
        name: "pin",
        example: r#""prompt""#,
        meaning: "Where the module's PIN comes from: \"prompt\" (default: asked as [prompt] says, when a signature needs a login) or \"none\" (never log in).",
    },
    Key {
        section: "fido",
        name: "keys",
        example: r#"["~/.ssh/id_ed25519_sk"]"#,
        meaning: "sk key files offered from the start, as if added with ssh-add.",
    },
    Key {
        section: "fido",
        name: "load_resident",
        example: "false",
        meaning: "Load the resident credentials of connected security keys at start (the PIN is asked then). Default: false.",
    },
    Key {
        section: "fido",
        name: "middleware_timeout_seconds",
        example: "35",
        meaning: "Seconds an sk middleware (ssh-add -S) may take to sign, a touch included, before its helper is killed and restarted. Default: 35.",
    },
    Key {
        section: "forwarding",
        name: "policy",
        example: r#""confirm""#,
        meaning: "What a signature asked over a forwarded agent (ssh -A) may do, for keys no rule covers: \"allow\" (as OpenSSH), \"confirm\" (ask, naming the hosts) or \"refuse\". Default: allow.",
    },
    Key {
        section: "forwarding",
        name: "confirm_cache_seconds",
        example: "0",
        meaning: "Seconds a \"yes\" to a forwarded use is remembered for the same key and host chain; 0 never remembers. Default: 0.",
    },
    Key {
        section: "forwarding",
        name: "known_hosts",
        example: r#"["~/.ssh/known_hosts"]"#,
        meaning: "known_hosts files whose plain entries name the hosts in questions (default: ~/.ssh/known_hosts).",
    },
    Key {
        section: "forwarding.keys",
        name: "fingerprint",
        example: r#""SHA256:...""#,
        meaning: "A rule for the key with this fingerprint. Rules are tried in order; every matcher a rule gives must match.",
    },
    Key {
        section: "forwarding.keys",
        name: "comment",
        example: r#""YubiKey*""#,
        meaning: "A rule for keys whose comment matches this pattern (* and ?).",
    },
    Key {
        section: "forwarding.keys",
        name: "backend",
        example: r#""piv""#,
        meaning: "A rule for the keys of one backend: \"software\", \"pkcs11\", \"piv\", \"fido\" or \"upstream\" (other agents' keys).",
    },
    Key {
        section: "forwarding.keys",
        name: "policy",
        example: r#""refuse""#,
        meaning: "What the rule does: \"allow\", \"confirm\" or \"refuse\".",
    },
    Key {
        section: "forwarding.keys",
        name: "confirm_cache_seconds",
        example: "30",
        meaning: "Seconds the rule remembers a \"yes\"; 0 never remembers.",
    },
    Key {
        section: "listing",
        name: "hosts",
        example: r#"["*.corp.example.com", "!build.corp.example.com"]"#,
        meaning: "The destinations a [[listing]] rule is for: host patterns (* ? and ! to deny), matched against the known_hosts names \
(of [forwarding] known_hosts) of the host ssh logs in to; hashed names match literal hosts. Without hosts, the rule is for every connection, ssh-add -l included. \
The first rule that matches applies; without one, every key is listed.",
    },
    Key {
        section: "listing",
        name: "keys",
        example: r#"["backend:piv", "upstream:*gnupg*", "comment:work*"]"#,
        meaning: "The keys such a connection is shown, in this order: \"SHA256:...\" (a fingerprint, in any hash ssh-add -l -E shows), \"comment:PATTERN\", \
\"backend:NAME\" (software, pkcs11, piv, fido or upstream), \"upstream:PATTERN\" (by socket path) or \"*\" (the rest). Keys no selector takes are not listed; \
they still sign if asked. Keeps the keys a host wants under sshd's MaxAuthTries.",
    },
    Key {
        section: "desktop",
        name: "on_lock",
        example: r#""lock""#,
        meaning: "When the desktop session locks or the machine sleeps: \"nothing\", \"lock\" (lock the agent as ssh-add -x until the session unlocks) or \"forget-pins\" (keys stay usable, PINs are asked again). Default: nothing.",
    },
];

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
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
    /// The PIV YubiKey backend.
    #[serde(default)]
    pub(crate) piv: PivSection,
    /// The PKCS#11 backend.
    #[serde(default)]
    pub(crate) pkcs11: Pkcs11Section,
    /// The FIDO security-key backend.
    #[serde(default)]
    pub(crate) fido: FidoSection,
    /// What keys may do over a forwarded agent (`ssh -A`).
    #[serde(default)]
    pub(crate) forwarding: ForwardingSection,
    /// The desktop session.
    #[serde(default)]
    pub(crate) desktop: DesktopSection,
    /// Sockets of other agents whose keys are served too.
    #[serde(default)]
    pub(crate) upstream: Vec<PathBuf>,
    /// How the upstream agents are used.
    #[serde(default)]
    pub(crate) upstreams: UpstreamsSection,
    /// `[[listing]]`: which keys a destination is shown, in which order.
    #[serde(default)]
    pub(crate) listing: Vec<ListingSection>,
}

/// `[upstreams]`.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamsSection {
    /// Milliseconds an upstream may take to list its keys.
    #[serde(default = "default_list_timeout")]
    pub(crate) list_timeout_ms: u64,
    /// Seconds the last list of an upstream that stopped answering is shown.
    #[serde(default = "default_keep_list")]
    pub(crate) keep_list_seconds: u64,
    /// Seconds an upstream may take to sign.
    #[serde(default = "default_upstream_sign_timeout")]
    pub(crate) sign_timeout_seconds: u64,
    /// The upstream that added keys go to.
    pub(crate) add_to: Option<PathBuf>,
}

impl Default for UpstreamsSection {
    fn default() -> Self {
        Self {
            list_timeout_ms: default_list_timeout(),
            keep_list_seconds: default_keep_list(),
            sign_timeout_seconds: default_upstream_sign_timeout(),
            add_to: None,
        }
    }
}

fn default_list_timeout() -> u64 {
    250
}

fn default_keep_list() -> u64 {
    300
}

fn default_upstream_sign_timeout() -> u64 {
    120
}

/// `[[listing]]`.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListingSection {
    /// Host patterns; none: every connection.
    pub(crate) hosts: Option<Vec<String>>,
    /// Key selectors, in listing order.
    pub(crate) keys: Vec<String>,
}

impl Config {
    /// The server's upstream settings: the sockets of `-A` first, then the file's.
    pub(crate) fn upstreams(
        &self,
        flags: &[PathBuf],
    ) -> token_agent_server::upstream::UpstreamSettings {
        let mut sockets: Vec<PathBuf> = Vec::new();
        for socket in flags.iter().chain(&self.upstream) {
            let socket = expand_home(socket);
            if !sockets.contains(&socket) {
                sockets.push(socket);
            }
        }
        token_agent_server::upstream::UpstreamSettings {
            sockets,
            list_timeout: Duration::from_millis(self.upstreams.list_timeout_ms.max(1)),
            keep_list: Duration::from_secs(self.upstreams.keep_list_seconds),
            sign_timeout: Duration::from_secs(self.upstreams.sign_timeout_seconds.max(1)),
            add_to: self.upstreams.add_to.as_deref().map(expand_home),
        }
    }

    /// The `[[listing]]` rules, checked.
    pub(crate) fn listing(&self) -> anyhow::Result<Vec<token_agent_server::listing::ListingRule>> {
        use token_agent_server::listing::{KeySelector, ListingRule};
        self.listing
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let keys = rule
                    .keys
                    .iter()
                    .map(|k| KeySelector::parse(k))
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|err| anyhow::anyhow!("[[listing]] rule {}: {err}", index + 1))?;
                Ok(ListingRule {
                    hosts: rule.hosts.clone(),
                    keys,
                })
            })
            .collect()
    }
}

/// `[desktop]`.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DesktopSection {
    /// When the session locks or the machine sleeps: "nothing" (the
    /// default), "lock" (lock the agent and forget PINs until the session
    /// unlocks) or "forget-pins" (keys stay usable; PINs are asked again).
    #[serde(default)]
    pub(crate) on_lock: OnLock,
}

/// `on_lock` of `[desktop]`.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OnLock {
    /// Ignore the session.
    #[default]
    Nothing,
    /// Lock the agent, as `ssh-add -x` does, until the session unlocks.
    Lock,
    /// Forget cached PINs; keys stay usable.
    ForgetPins,
}

/// `[forwarding]`: the policy for signatures asked over a forwarded agent.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ForwardingSection {
    /// For keys no rule covers: "allow" (the default, as OpenSSH), "confirm" or "refuse".
    #[serde(default)]
    pub(crate) policy: ForwardingAction,
    /// Seconds a "yes" is remembered for the same key and host chain; 0: never.
    #[serde(default)]
    pub(crate) confirm_cache_seconds: u64,
    /// known_hosts files that name the hosts in questions (default: ~/.ssh/known_hosts).
    #[serde(default = "default_known_hosts")]
    pub(crate) known_hosts: Vec<PathBuf>,
    /// `[[forwarding.keys]]`: rules for some keys; the first that matches wins.
    #[serde(default)]
    pub(crate) keys: Vec<ForwardingRule>,
}

/// `[[forwarding.keys]]`: every matcher given must match.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ForwardingRule {
    /// The key's fingerprint, "SHA256:..." (as `ssh-add -l` prints it).
    pub(crate) fingerprint: Option<String>,
    /// A pattern (`*`, `?`) for the key's comment, e.g. "YubiKey*".
    pub(crate) comment: Option<String>,
    /// The backend: "software", "pkcs11", "piv" or "fido".
    pub(crate) backend: Option<BackendName>,
    /// "allow", "confirm" or "refuse".
    pub(crate) policy: ForwardingAction,
    /// Seconds a "yes" is remembered; 0: never.
    #[serde(default)]
    pub(crate) confirm_cache_seconds: u64,
}

/// `backend` of a `[[forwarding.keys]]` rule: a typo is an error, not a rule
/// that never matches.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BackendName {
    /// Keys added with `ssh-add FILE`.
    Software,
    /// PKCS#11 tokens.
    Pkcs11,
    /// PIV YubiKeys.
    Piv,
    /// FIDO security keys.
    Fido,
    /// The keys of upstream agents (`-A`, `upstream`).
    Upstream,
}

impl BackendName {
    /// The name the backends are routed by.
    fn as_str(self) -> &'static str {
        match self {
            Self::Software => token_agent_server::SOFTWARE_BACKEND,
            Self::Pkcs11 => token_agent_pkcs11::NAME,
            Self::Piv => token_agent_piv::NAME,
            Self::Fido => token_agent_fido::NAME,
            Self::Upstream => token_agent_server::upstream::BACKEND,
        }
    }
}

/// `policy` of `[forwarding]` and its rules.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ForwardingAction {
    /// Sign, as OpenSSH does.
    #[default]
    Allow,
    /// Ask the person, naming the hosts.
    Confirm,
    /// Refuse.
    Refuse,
}

impl Default for ForwardingSection {
    fn default() -> Self {
        Self {
            policy: ForwardingAction::Allow,
            confirm_cache_seconds: 0,
            known_hosts: default_known_hosts(),
            keys: Vec::new(),
        }
    }
}

fn default_known_hosts() -> Vec<PathBuf> {
    vec![PathBuf::from("~/.ssh/known_hosts")]
}

impl ForwardingSection {
    /// The server's policy.
    pub(crate) fn policy(&self) -> token_agent_server::forwarding::ForwardingPolicy {
        use token_agent_server::forwarding::{ForwardedUse, ForwardingPolicy, KeyMatch, Rule};
        let action = |a: ForwardingAction| match a {
            ForwardingAction::Allow => ForwardedUse::Allow,
            ForwardingAction::Confirm => ForwardedUse::Confirm,
            ForwardingAction::Refuse => ForwardedUse::Refuse,
        };
        ForwardingPolicy {
            default: action(self.policy),
            default_confirm_cache: Duration::from_secs(self.confirm_cache_seconds),
            rules: self
                .keys
                .iter()
                .map(|rule| Rule {
                    keys: KeyMatch {
                        fingerprint: rule.fingerprint.clone(),
                        comment: rule.comment.clone(),
                        backend: rule.backend.map(|b| b.as_str().to_owned()),
                    },
                    action: action(rule.policy),
                    confirm_cache: Duration::from_secs(rule.confirm_cache_seconds),
                })
                .collect(),
            known_hosts: self.known_hosts.iter().map(|p| expand_home(p)).collect(),
        }
    }
}

/// `[pkcs11]`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct Pkcs11Section {
    /// Modules loaded at start: `[[pkcs11.modules]]`.
    #[serde(default)]
    pub(crate) modules: Vec<Pkcs11Module>,
    /// Seconds a cached PIN lives without use; 0 never caches it.
    #[serde(default = "default_pin_cache_idle")]
    pub(crate) pin_cache_idle_seconds: u64,
    /// Seconds a module may take to answer a call before its helper is killed and restarted.
    #[serde(default = "default_pkcs11_timeout")]
    pub(crate) timeout_seconds: u64,
    /// Seconds a person may take at a reader's PIN pad.
    #[serde(default = "default_pin_pad_timeout")]
    pub(crate) pin_pad_timeout_seconds: u64,
    /// Milliseconds between looks for tokens coming and going.
    #[serde(default = "default_poll_interval")]
    pub(crate) poll_interval_ms: u64,
    /// The most signatures one module makes at once; 0: as many as clients ask for, up to 64.
    #[serde(default)]
    pub(crate) parallel_signatures: u32,
}

/// `[[pkcs11.modules]]`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct Pkcs11Module {
    /// The module's path, e.g. "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so".
    pub(crate) path: PathBuf,
    /// Where its PIN comes from: "prompt" (pinentry or askpass, as `[prompt]` says) or "none".
    #[serde(default)]
    pub(crate) pin: Pkcs11Pin,
}

/// `pin` of a `[[pkcs11.modules]]`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub(crate) enum Pkcs11Pin {
    /// Ask the person when a signature needs a login.
    #[default]
    Prompt,
    /// Never log in.
    None,
}

impl Default for Pkcs11Section {
    fn default() -> Self {
        Self {
            modules: Vec::new(),
            pin_cache_idle_seconds: default_pin_cache_idle(),
            timeout_seconds: default_pkcs11_timeout(),
            pin_pad_timeout_seconds: default_pin_pad_timeout(),
            poll_interval_ms: default_poll_interval(),
            parallel_signatures: 0,
        }
    }
}

impl Pkcs11Section {
    /// The backend's options; helpers are token-agent-pkcs11-helper beside
    /// this executable, or this executable in `--pkcs11-helper` mode.
    pub(crate) fn options(&self) -> token_agent_pkcs11::Pkcs11Options {
        let helper = token_agent_pkcs11::HelperCommand::for_agent().unwrap_or_else(|_| {
            token_agent_pkcs11::HelperCommand {
                program: PathBuf::from("token-agent"),
                args: vec!["--pkcs11-helper".into()],
                env: Vec::new(),
            }
        });
        let mut options = token_agent_pkcs11::Pkcs11Options::new(helper);
        options.modules = self
            .modules
            .iter()
            .map(|m| token_agent_pkcs11::ModuleConfig {
                path: expand_home(&m.path).to_string_lossy().into_owned(),
                pin: match m.pin {
                    Pkcs11Pin::Prompt => token_agent_pkcs11::PinSource::Prompt,
                    Pkcs11Pin::None => token_agent_pkcs11::PinSource::None,
                },
            })
            .collect();
        options.pin_cache = match self.pin_cache_idle_seconds {
            0 => token_agent_pkcs11::PinCache::Never,
            idle => token_agent_pkcs11::PinCache::Idle(Some(Duration::from_secs(idle))),
        };
        options.call_timeout = Duration::from_secs(self.timeout_seconds.max(1));
        options.pin_pad_timeout = Duration::from_secs(self.pin_pad_timeout_seconds.max(1));
        options.poll_interval = Duration::from_millis(self.poll_interval_ms.max(100));
        options.parallel_signatures = self.parallel_signatures;
        options
    }
}

fn default_pkcs11_timeout() -> u64 {
    30
}

fn default_pin_pad_timeout() -> u64 {
    300
}

fn default_poll_interval() -> u64 {
    2000
}

/// `[fido]`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct FidoSection {
    /// sk key files (`id_ed25519_sk`) offered from the start, as if added with ssh-add.
    #[serde(default)]
    pub(crate) keys: Vec<PathBuf>,
    /// Whether to load the resident credentials of connected security keys at
    /// start (the PIN is asked then).
    #[serde(default)]
    pub(crate) load_resident: bool,
    /// Seconds an sk middleware (`ssh-add -S`) may take to sign, a touch
    /// included, before its helper is killed and restarted.
    #[serde(default = "default_middleware_timeout")]
    pub(crate) middleware_timeout_seconds: u64,
}

impl Default for FidoSection {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            load_resident: false,
            middleware_timeout_seconds: default_middleware_timeout(),
        }
    }
}

impl FidoSection {
    /// How the backend runs middlewares: this executable in `--sk-helper` mode.
    pub(crate) fn middleware(&self) -> token_agent_fido::MiddlewareOptions {
        token_agent_fido::MiddlewareOptions {
            call_timeout: Duration::from_secs(self.middleware_timeout_seconds.max(1)),
            ..token_agent_fido::MiddlewareOptions::default()
        }
    }
}

/// A touch (security keys wait 30 s for one) and a little more.
fn default_middleware_timeout() -> u64 {
    (token_agent_fido::middleware::TOUCH_TIMEOUT + Duration::from_secs(5)).as_secs()
}

/// `[piv]`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct PivSection {
    /// Whether the agent offers the keys of plugged-in YubiKeys.
    #[serde(default = "default_piv_enabled")]
    pub(crate) enabled: bool,
    /// Seconds a cached PIN lives without use; 0 never caches it.
    #[serde(default = "default_pin_cache_idle")]
    pub(crate) pin_cache_idle_seconds: u64,
}

impl Default for PivSection {
    fn default() -> Self {
        Self {
            enabled: default_piv_enabled(),
            pin_cache_idle_seconds: default_pin_cache_idle(),
        }
    }
}

fn default_piv_enabled() -> bool {
    true
}

fn default_pin_cache_idle() -> u64 {
    15 * 60
}

/// `[prompt]`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
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
#[cfg_attr(test, derive(serde::Serialize))]
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
#[cfg_attr(test, derive(serde::Serialize))]
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

/// `$variable` when it is an absolute path, else `fallback` in the home
/// directory: $HOME, or the passwd entry's when HOME is unset (as the
/// default socket's place, [`crate::socket::home_dir`]).
fn xdg_dir(variable: &str, fallback: &str) -> Option<PathBuf> {
    match std::env::var_os(variable) {
        Some(dir) if Path::new(&dir).is_absolute() => Some(PathBuf::from(dir)),
        _ => crate::socket::home_dir()
            .ok()
            .map(|home| home.join(fallback)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KEYS as a file: top-level keys, then one table per section.
    fn keys_as_toml() -> String {
        let mut text = String::new();
        let mut section = "";
        for key in KEYS {
            if key.section != section {
                section = key.section;
                let header = if ARRAY_SECTIONS.contains(&section) {
                    format!("\n[[{section}]]\n")
                } else {
                    format!("\n[{section}]\n")
                };
                text.push_str(&header);
            }
            text.push_str(&format!("{} = {}\n", key.name, key.example));
        }
        text
    }

    fn key_paths(prefix: &str, value: &toml::Value, out: &mut std::collections::BTreeSet<String>) {
        let table = match value {
            toml::Value::Table(table) => table,
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                for item in items {
                    key_paths(prefix, item, out);
                }
                return;
            }
            _ => {
                out.insert(prefix.to_owned());
                return;
            }
        };
        for (name, value) in table {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            key_paths(&path, value, out);
        }
    }

    #[test]
    fn the_key_table_is_the_parser_s_keys() {
        let text = keys_as_toml();
        // Every listed key parses (the parser refuses unknown keys) ...
        let config = Config::parse(&text).unwrap_or_else(|err| panic!("{err:#}\n{text}"));
        // ... and every key the parser fills is listed.
        let mut parsed = std::collections::BTreeSet::new();
        key_paths("", &toml::Value::try_from(&config).unwrap(), &mut parsed);
        let listed: std::collections::BTreeSet<String> = KEYS
            .iter()
            .map(|key| {
                if key.section.is_empty() {
                    key.name.to_owned()
                } else {
                    format!("{}.{}", key.section, key.name)
                }
            })
            .collect();
        assert_eq!(parsed, listed);
        // The defaults the table states are the parser's.
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for key in KEYS
            .iter()
            .filter(|key| key.meaning.contains("Default: ") && !key.section.contains('.'))
        {
            // Keys without a default value (an Option) say where the default comes from instead.
            let Some(value) = key
                .section
                .split('.')
                .filter(|part| !part.is_empty())
                .chain([key.name])
                .try_fold(&defaults, |value, part| value.get(part))
            else {
                continue;
            };
            let shown = value.to_string();
            assert!(
                key.meaning
                    .contains(&format!("Default: {}.", shown.trim_matches('"'))),
                "{}.{}: default {shown}, documented {:?}",
                key.section,
                key.name,
                key.meaning
            );
        }
    }

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
    fn forwarding_rules_parse_and_typos_are_refused() {
        let config = Config::parse(
            r#"
[forwarding]
policy = "confirm"
confirm_cache_seconds = 10

[[forwarding.keys]]
backend = "piv"
policy = "refuse"

[[forwarding.keys]]
comment = "*@laptop"
policy = "allow"
"#,
        )
        .unwrap();
        let policy = config.forwarding.policy();
        use token_agent_server::forwarding::ForwardedUse;
        let key = ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([1; 32]));
        assert_eq!(policy.default, ForwardedUse::Confirm);
        assert_eq!(policy.default_confirm_cache, Duration::from_secs(10));
        assert_eq!(
            policy.decide(&key, "YubiKey", "piv").action,
            ForwardedUse::Refuse
        );
        assert_eq!(
            policy.decide(&key, "me@laptop", "software").action,
            ForwardedUse::Allow
        );
        let typo =
            Config::parse("[[forwarding.keys]]\nbackend = \"yubikey\"\npolicy = \"refuse\"\n");
        assert!(format!("{:#}", typo.unwrap_err()).contains("unknown variant"));
    }

    #[test]
    fn pkcs11_modules_parse() {
        let config = Config::parse(
            r#"
[pkcs11]
pin_cache_idle_seconds = 0
timeout_seconds = 5

[[pkcs11.modules]]
path = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"

[[pkcs11.modules]]
path = "/usr/lib/softhsm/libsofthsm2.so"
pin = "none"
"#,
        )
        .unwrap();
        let options = config.pkcs11.options();
        assert_eq!(options.modules.len(), 2);
        assert_eq!(
            options.modules[0].pin,
            token_agent_pkcs11::PinSource::Prompt
        );
        assert_eq!(options.modules[1].pin, token_agent_pkcs11::PinSource::None);
        assert_eq!(options.pin_cache, token_agent_pkcs11::PinCache::Never);
        assert_eq!(options.call_timeout, Duration::from_secs(5));
        assert!(Config::parse("[[pkcs11.modules]]\npath = \"/x.so\"\npin = \"maybe\"\n").is_err());
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
