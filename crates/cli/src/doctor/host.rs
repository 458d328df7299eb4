//! `--host HOST`: what `ssh HOST` would do, from `ssh -G HOST`, compared
//! with the keys its agent holds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PrivateKey, PublicKey};

use super::agent::{AgentSocket, Survey};
use super::files::{self, KeyFile};
use super::socket::{AgentKey, SocketState};
use super::{plural, Check, Context, Finding, Severity};

/// sshd's default MaxAuthTries: after this many rejected keys it disconnects.
const MAX_AUTH_TRIES: usize = 6;

/// OpenSSH's default IdentityFile list (ssh -G prints it when none is set).
const DEFAULT_IDENTITIES: &[&str] = &[
    "id_rsa",
    "id_ecdsa",
    "id_ecdsa_sk",
    "id_ed25519",
    "id_ed25519_sk",
    "id_xmss",
    "id_dsa",
];

/// The host to check and the ssh configuration to read it from.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// As given to ssh.
    pub(crate) host: String,
    /// `-F FILE`.
    pub(crate) ssh_config: Option<PathBuf>,
}

/// What `ssh -G` says about a host, the options doctor looks at.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct HostConfig {
    /// `user`.
    pub(crate) user: String,
    /// `hostname`.
    pub(crate) hostname: String,
    /// `port`.
    pub(crate) port: String,
    /// `identityagent`, when set.
    pub(crate) identity_agent: Option<String>,
    /// `identityfile`, in order, unexpanded.
    pub(crate) identity_files: Vec<String>,
    /// `identitiesonly yes`.
    pub(crate) identities_only: bool,
    /// `pubkeyacceptedalgorithms`, split.
    pub(crate) pubkey_algorithms: Vec<String>,
    /// `forwardagent`: "no", "yes", or a socket.
    pub(crate) forward_agent: String,
}

impl HostConfig {
    /// Parses `ssh -G` output: one lower-case keyword and its value per line.
    pub(crate) fn parse(text: &str) -> Self {
        let mut config = Self {
            forward_agent: "no".into(),
            ..Self::default()
        };
        for line in text.lines() {
            let Some((key, value)) = line.split_once(' ') else {
                continue;
            };
            let value = value.trim().to_owned();
            match key {
                "user" => config.user = value,
                "hostname" => config.hostname = value,
                "port" => config.port = value,
                "identityagent" => config.identity_agent = Some(value),
                "identityfile" => config.identity_files.push(value),
                "identitiesonly" => config.identities_only = value == "yes",
                "pubkeyacceptedalgorithms" | "pubkeyacceptedkeytypes" => {
                    config.pubkey_algorithms = value.split(',').map(str::to_owned).collect();
                }
                "forwardagent" => config.forward_agent = value,
                _ => {}
            }
        }
        config
    }

    /// Whether these are OpenSSH's defaults rather than IdentityFile lines.
    fn default_identities(&self) -> bool {
        self.identity_files.iter().all(|file| {
            file.strip_prefix("~/.ssh/")
                .is_some_and(|name| DEFAULT_IDENTITIES.contains(&name))
        })
    }

    /// Whether some accepted algorithm matches `name` (entries may be patterns).
    fn accepts(&self, name: &str) -> bool {
        self.pubkey_algorithms
            .iter()
            .any(|pattern| glob(pattern.as_bytes(), name.as_bytes()))
    }
}

/// `ssh HOST`: its agent, expected keys, IdentitiesOnly, RSA algorithms, ForwardAgent.
pub(crate) fn check(context: &Context, survey: &Survey, target: &Target) -> Vec<Finding> {
    let check = Check::Host;
    let host = &target.host;
    let config_name = target
        .ssh_config
        .as_deref()
        .map_or_else(|| "~/.ssh/config".to_owned(), |path| context.show(path));
    let config = match ssh_g(context, target) {
        Ok(text) => HostConfig::parse(&text),
        Err(err) => {
            return vec![Finding::problem(
                check,
                "ssh-config-error",
                format!("ssh -G {host} fails: {}.", err.trim_end_matches('.')),
            )
            .fix(format!("correct the line ssh names in {config_name}"))]
        }
    };
    let mut findings = Vec::new();
    let block = format!("in {config_name}, under Host {host}");

    // The agent ssh uses for this host.
    let own;
    let agent: Option<&AgentSocket> = match config.identity_agent.as_deref() {
        None | Some("SSH_AUTH_SOCK") => survey.auth.as_ref(),
        Some("none") => {
            findings.push(Finding::info(
                check,
                "identity-agent-none",
                format!("ssh {host} uses no agent (IdentityAgent none): the agent's keys are not offered."),
            ));
            None
        }
        Some(value) => {
            let path = match value.strip_prefix('$') {
                Some(name) => context
                    .var(name.trim_start_matches('{').trim_end_matches('}'))
                    .map(PathBuf::from),
                None => Some(expand_tilde(context, value)),
            };
            let same = |auth: &&AgentSocket| Some(&auth.path) == path.as_ref();
            match (survey.auth.as_ref().filter(same), path) {
                (Some(auth), _) => Some(auth),
                (None, Some(path)) => {
                    own = AgentSocket::probe(path);
                    Some(&own)
                }
                (None, None) => {
                    findings.push(
                        Finding::problem(
                            check,
                            "identity-agent-dead",
                            format!("IdentityAgent for {host} is {value}, which is not set: ssh uses no agent."),
                        )
                        .fix(format!("set {value}, or correct IdentityAgent {block}")),
                    );
                    None
                }
            }
        }
    };
    if let (Some(agent), Some(value)) = (agent, config.identity_agent.as_deref()) {
        if value != "SSH_AUTH_SOCK" {
            let shown = context.show(&agent.path);
            match agent.server() {
                Some(server) => findings.push(Finding::info(
                    check,
                    "identity-agent",
                    format!(
                        "ssh {host} uses the agent at {shown} (IdentityAgent), {}, not SSH_AUTH_SOCK.",
                        server.describe()
                    ),
                )),
                None => findings.push(
                    Finding::problem(
                        check,
                        "identity-agent-dead",
                        format!(
                            "IdentityAgent for {host} is {shown}, where {}: ssh uses no agent.",
                            state_words(&agent.state)
                        ),
                    )
                    .fix(format!("start the agent there, or correct IdentityAgent {block}")),
                ),
            }
        }
    }
    let agent_keys: Option<&[AgentKey]> = agent.and_then(AgentSocket::keys);

    // The IdentityFile keys, and whether the agent holds them.
    let identities: Vec<Identity> = config
        .identity_files
        .iter()
        .filter(|file| file.as_str() != "none")
        .filter_map(|file| match expand(context, &config, host, file) {
            Ok(path) => Some(Identity::load(path)),
            Err(token) => {
                findings.push(Finding::info(
                    check,
                    "identity-file-unexpanded",
                    format!("Cannot tell which file IdentityFile {file} names ({token} is not expanded here)."),
                ));
                None
            }
        })
        .collect();
    let explicit = !config.default_identities();
    let in_agent = |key: &KeyData| {
        agent_keys.is_some_and(|keys| keys.iter().any(|k| k.key.as_ref() == Some(key)))
    };
    let mut files_offered = 0;
    for identity in &identities {
        let shown = context.show(&identity.path);
        // Key files in ~/.ssh were checked already; others are checked here.
        let in_ssh_dir = context
            .ssh_dir()
            .is_some_and(|dir| identity.path.starts_with(dir));
        if identity.private && !in_ssh_dir {
            findings.extend(files::key_permissions(context, &identity.path));
            findings.extend(files::passphrase(context, &identity.path));
        }
        let Some(public) = &identity.public else {
            if identity.private {
                files_offered += 1;
                findings.push(
                    Finding::info(
                        check,
                        "identity-no-public",
                        format!(
                            "Cannot tell whether {shown} is in the agent: there is no {shown}.pub."
                        ),
                    )
                    .fix(format!(
                        "ssh-keygen -y -f {0} > {0}.pub",
                        context.shell(&identity.path)
                    )),
                );
            } else if explicit {
                findings.push(
                    Finding::warning(
                        check,
                        "identity-file-missing",
                        format!("IdentityFile {shown} for {host} does not exist (nor its .pub)."),
                    )
                    .fix(format!("correct or remove that IdentityFile line {block}")),
                );
            }
            continue;
        };
        let fingerprint = public.fingerprint(HashAlg::Sha256);
        if in_agent(public) {
            continue;
        }
        if identity.private {
            files_offered += 1;
        }
        if agent_keys.is_none() {
            continue;
        }
        if identity.private {
            findings.push(
                Finding::warning(
                    check,
                    "key-not-in-agent",
                    format!(
                        "The key {shown} ({fingerprint}) for {host} is not in the agent: ssh reads \
                         the file itself, and asks its passphrase (if any) at every connection."
                    ),
                )
                .fix(format!("ssh-add {}", context.shell(&identity.path))),
            );
        } else {
            findings.push(
                Finding::problem(
                    check,
                    "key-not-in-agent",
                    format!(
                        "The key {shown} ({fingerprint}) for {host} is not in the agent, and there is \
                         no private key file: ssh has nothing to sign with (\"sign_and_send_pubkey: \
                         signing failed\", \"Permission denied (publickey)\")."
                    ),
                )
                .fix("plug in the token that holds it (token-agent then lists it), or ssh-add its private key file"),
            );
        }
    }

    // The keys ssh offers, in its order: the agent's (only those named by
    // IdentityFile with IdentitiesOnly), then the files.
    let publics: Vec<&KeyData> = identities
        .iter()
        .filter_map(|i| i.public.as_ref())
        .collect();
    let offered_from_agent: Vec<&AgentKey> = agent_keys
        .unwrap_or_default()
        .iter()
        .filter(|key| {
            !config.identities_only || key.key.as_ref().is_some_and(|k| publics.contains(&k))
        })
        .collect();
    let offered = offered_from_agent.len() + files_offered;
    let total_agent = agent_keys.map_or(0, <[AgentKey]>::len);

    if config.identities_only && offered == 0 && total_agent > 0 {
        findings.push(
            Finding::problem(
                check,
                "nothing-offered",
                format!(
                    "IdentitiesOnly is on for {host}, but no IdentityFile names one of the agent's \
                     {}: ssh offers none (\"Permission denied (publickey)\").",
                    plural(total_agent, "key")
                ),
            )
            .fix(format!(
                "save the key's public half (ssh-add -L) as ~/.ssh/KEY.pub and add IdentityFile \
                 ~/.ssh/KEY.pub {block}"
            )),
        );
    }
    if !config.identities_only && offered > MAX_AUTH_TRIES {
        findings.push(
            Finding::warning(
                check,
                "too-many-keys",
                format!(
                    "ssh offers {} to {host} one after another (IdentitiesOnly is off), and an sshd \
                     with the default MaxAuthTries of {MAX_AUTH_TRIES} disconnects before it reaches \
                     the right one: \"Too many authentication failures\".",
                    plural(offered, "key")
                ),
            )
            .fix(format!(
                "{block}: IdentitiesOnly yes and IdentityFile ~/.ssh/KEY.pub naming the key that \
                 server knows (ssh-add -L prints the agent's public keys)"
            )),
        );
    }

    // RSA keys sign as ssh-rsa (SHA-1), rsa-sha2-256 or rsa-sha2-512.
    let rsa_offered = offered_from_agent.iter().any(|key| key.is_rsa())
        || identities
            .iter()
            .filter(|i| i.private || i.public.as_ref().is_some_and(&in_agent))
            .any(|i| matches!(i.public, Some(KeyData::Rsa(_))));
    if rsa_offered && !config.accepts("rsa-sha2-256") && !config.accepts("rsa-sha2-512") {
        if config.accepts("ssh-rsa") {
            findings.push(
                Finding::problem(
                    check,
                    "rsa-sha1-only",
                    format!(
                        "PubkeyAcceptedAlgorithms for {host} lets an RSA key sign only as ssh-rsa \
                         (SHA-1), which servers since OpenSSH 8.8 refuse: ssh says \"no mutual \
                         signature supported\" and skips the key."
                    ),
                )
                .fix(format!(
                    "{block}: PubkeyAcceptedAlgorithms +rsa-sha2-512,rsa-sha2-256 (or remove that \
                     line); better, an ed25519 key"
                )),
            );
        } else {
            findings.push(
                Finding::warning(
                    check,
                    "rsa-not-accepted",
                    format!(
                        "PubkeyAcceptedAlgorithms for {host} has no RSA algorithm: ssh never offers \
                         your RSA key."
                    ),
                )
                .fix(format!("{block}: PubkeyAcceptedAlgorithms +rsa-sha2-512,rsa-sha2-256")),
            );
        }
    }

    if config.forward_agent != "no" {
        findings.push(
            Finding::warning(
                check,
                "forward-agent",
                format!(
                    "ForwardAgent is on for {host}: while you are logged in, anyone with root there \
                     can use your agent's keys."
                ),
            )
            .fix(format!(
                "{block}: ForwardAgent no, and reach machines behind it with ProxyJump (ssh -J \
                 {host} TARGET); if you must forward, add keys with ssh-add -c so that each use asks"
            )),
        );
    }

    let bad = findings
        .iter()
        .any(|f| f.check == check && matches!(f.severity, Severity::Problem | Severity::Warning));
    if !bad {
        findings.push(Finding::ok(
            check,
            "host-ok",
            format!(
                "ssh {host} ({}@{}:{}) offers {}{}.",
                config.user,
                config.hostname,
                config.port,
                plural(offered, "key"),
                match offered_from_agent.as_slice() {
                    [] => String::new(),
                    keys @ [_, ..] if keys.len() <= 3 => format!(
                        ", from the agent: {}",
                        keys.iter()
                            .map(|k| k.describe())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    keys => format!(", {} from the agent", keys.len()),
                }
            ),
        ));
    }
    findings
}

/// An IdentityFile and what is there.
#[derive(Debug)]
struct Identity {
    /// The expanded path.
    path: PathBuf,
    /// Its public key: PATH.pub, PATH itself if it is one, or the public
    /// half an OpenSSH private key file carries (even an encrypted one).
    public: Option<KeyData>,
    /// Whether PATH is a private key file ssh can load itself.
    private: bool,
}

impl Identity {
    fn load(path: PathBuf) -> Self {
        let read_public = |file: &Path| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|text| PublicKey::from_openssh(text.trim()).ok())
                .map(|key| key.key_data().clone())
        };
        let private = KeyFile::read(&path).is_some();
        let mut pub_path = path.clone().into_os_string();
        pub_path.push(".pub");
        let public = read_public(Path::new(&pub_path))
            .or_else(|| read_public(&path))
            .or_else(|| {
                let text = std::fs::read_to_string(&path).ok()?;
                let key = PrivateKey::from_openssh(text).ok()?;
                Some(key.public_key().key_data().clone())
            });
        Self {
            path,
            public,
            private,
        }
    }
}

/// Runs `ssh -G [-F FILE] HOST` with the context's environment.
fn ssh_g(context: &Context, target: &Target) -> Result<String, String> {
    let mut command = Command::new("ssh");
    command.arg("-G");
    if let Some(file) = &target.ssh_config {
        command.arg("-F").arg(file);
    }
    let output = command
        .arg(&target.host)
        .env_clear()
        .envs(context.env())
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run ssh: {err} (install openssh-client)"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        return Err(if said.is_empty() {
            format!("exit status {}", output.status)
        } else {
            said.join("; ")
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// An IdentityFile with ssh's tokens expanded; `Err(token)` for one not known here.
fn expand(
    context: &Context,
    config: &HostConfig,
    host: &str,
    file: &str,
) -> Result<PathBuf, String> {
    let home = context
        .home()
        .map(|h| h.display().to_string())
        .unwrap_or_default();
    let local_user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(context.uid()))
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_default();
    let mut out = String::new();
    let mut chars = file.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '%' => {
                let token = chars.next().unwrap_or('%');
                match token {
                    '%' => out.push('%'),
                    'd' => out.push_str(&home),
                    'u' => out.push_str(&local_user),
                    'r' => out.push_str(&config.user),
                    'h' => out.push_str(&config.hostname),
                    'n' => out.push_str(host),
                    'p' => out.push_str(&config.port),
                    'i' => out.push_str(&context.uid().to_string()),
                    other => return Err(format!("%{other}")),
                }
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                match context.var(&name) {
                    Some(value) => out.push_str(&value.to_string_lossy()),
                    None => return Err(format!("${{{name}}}")),
                }
            }
            _ => out.push(c),
        }
    }
    Ok(expand_tilde(context, &out))
}

fn expand_tilde(context: &Context, path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), context.home()) {
        (Some(rest), Some(home)) => home.join(rest),
        _ if path == "~" => context.home().unwrap_or_else(|| PathBuf::from(path)),
        _ => PathBuf::from(path),
    }
}

/// "nothing listens", for a socket that is not live.
fn state_words(state: &SocketState) -> String {
    match state {
        SocketState::Missing => "there is no socket".into(),
        SocketState::NotSocket => "the file is not a socket".into(),
        SocketState::Stale => "nothing listens".into(),
        SocketState::Denied => "permission is denied".into(),
        SocketState::Unreachable(err) => format!("connecting fails ({err})"),
        SocketState::Live(_) => "an agent listens".into(),
    }
}

/// ssh's pattern matching: `*` and `?`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], text) || (!text.is_empty() && glob(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSH_G: &str = "host work\nuser alice\nhostname work.example.org\nport 2222\n\
                         identitiesonly yes\nidentityagent /run/user/1000/agent\n\
                         pubkeyacceptedalgorithms ssh-ed25519,ssh-rsa\n\
                         identityfile %d/.ssh/%r@%h\nidentityfile ~/.ssh/id_work\n\
                         forwardagent yes\n";

    #[test]
    fn ssh_g_output_is_parsed() {
        let config = HostConfig::parse(SSH_G);
        assert_eq!(config.user, "alice");
        assert_eq!(config.hostname, "work.example.org");
        assert!(config.identities_only);
        assert_eq!(
            config.identity_agent.as_deref(),
            Some("/run/user/1000/agent")
        );
        assert_eq!(config.identity_files.len(), 2);
        assert!(!config.default_identities());
        assert!(config.accepts("ssh-rsa"));
        assert!(!config.accepts("rsa-sha2-256"));
        assert_eq!(config.forward_agent, "yes");
    }

    #[test]
    fn identity_file_tokens_are_expanded() {
        let context = Context::with_env(&[("HOME", "/home/alice"), ("KEYS", "/keys")]);
        let config = HostConfig::parse(SSH_G);
        let expand = |file| expand(&context, &config, "work", file);
        assert_eq!(
            expand("%d/.ssh/%r@%h").unwrap(),
            Path::new("/home/alice/.ssh/alice@work.example.org")
        );
        assert_eq!(
            expand("~/.ssh/id_%n").unwrap(),
            Path::new("/home/alice/.ssh/id_work")
        );
        assert_eq!(expand("${KEYS}/k%%").unwrap(), Path::new("/keys/k%"));
        assert_eq!(expand("%C").unwrap_err(), "%C");
    }

    #[test]
    fn the_default_identity_list_is_recognised() {
        let text = DEFAULT_IDENTITIES
            .iter()
            .map(|name| format!("identityfile ~/.ssh/{name}\n"))
            .collect::<String>();
        assert!(HostConfig::parse(&text).default_identities());
    }

    #[test]
    fn patterns_match_as_in_ssh() {
        assert!(glob(b"rsa-sha2-*", b"rsa-sha2-512"));
        assert!(glob(b"ssh-ed2551?", b"ssh-ed25519"));
        assert!(!glob(b"rsa-sha2-*", b"ssh-rsa"));
    }
}
