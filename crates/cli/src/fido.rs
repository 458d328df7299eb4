//! FIDO security keys: the backend's wiring, and `token-agent fido
//! enroll|load-resident`.
//!
//! `enroll` makes a credential on a connected security key and writes an
//! OpenSSH private key file (which holds only the key handle) and its `.pub`,
//! as `ssh-keygen -t ed25519-sk` does. `load-resident` reads the resident
//! "ssh:" credentials of the connected keys (the PIN is asked through the
//! configured pinentry) and adds them to the running agent, as `ssh-add -K`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use secrecy::SecretString;
use ssh_encoding::Encode;
use ssh_key::{LineEnding, PrivateKey};
use token_agent_core::{DeviceInfo, PinRequest, PromptSubject, Prompter};
use token_agent_fido::ctap::CoseAlgorithm;
use token_agent_fido::{Authenticator, Discovery, Enrolment, FidoBackend, SkKey};
use token_agent_prompt::Pinentry;

use crate::config::{Config, FidoSection};

/// Make and load FIDO security-key (sk) SSH keys.
#[derive(Debug, Parser)]
#[command(name = "token-agent fido")]
struct FidoArgs {
    /// The configuration file (for the pinentry program).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: FidoCommand,
}

#[derive(Debug, Subcommand)]
enum FidoCommand {
    /// Make a new sk key on the connected security key and write FILE and FILE.pub.
    Enroll {
        /// The key type.
        #[arg(long = "type", value_enum, default_value = "ed25519-sk")]
        key_type: KeyType,
        /// Store the credential on the security key (load it later with load-resident).
        #[arg(long)]
        resident: bool,
        /// Require the PIN for every signature.
        #[arg(long)]
        verify_required: bool,
        /// Sign without a touch.
        #[arg(long)]
        no_touch_required: bool,
        /// The application, "ssh:" or "ssh:NAME".
        #[arg(long, default_value = "ssh:")]
        application: String,
        /// The comment written in the files.
        #[arg(short = 'C', long)]
        comment: Option<String>,
        /// Where to write the private key file (and FILE.pub).
        #[arg(short = 'f', value_name = "FILE")]
        file: PathBuf,
        /// Replace a resident key the security key already holds for this
        /// application (as ssh-keygen -O force); the old key is lost.
        #[arg(long)]
        force: bool,
    },
    /// Add the resident keys of the connected security keys to the running agent (SSH_AUTH_SOCK).
    LoadResident,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyType {
    /// sk-ssh-ed25519@openssh.com.
    #[value(name = "ed25519-sk")]
    Ed25519Sk,
    /// sk-ecdsa-sha2-nistp256@openssh.com.
    #[value(name = "ecdsa-sk")]
    EcdsaSk,
}

/// The clap definition of `token-agent fido`, for the man page and completions.
pub(crate) fn command() -> clap::Command {
    <FidoArgs as clap::CommandFactory>::command()
}

/// Runs `token-agent fido ...`; `args` starts with "fido".
pub(crate) fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    // clap names the program after the first word; say "token-agent fido".
    let words = std::iter::once(OsString::from("token-agent fido")).chain(args.skip(1));
    let args = match FidoArgs::try_parse_from(words) {
        Ok(args) => args,
        Err(err) => err.exit(),
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("token-agent fido: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// The backend the agent serves: the key files of `[fido] keys`, over the
/// security keys this build reaches.
pub(crate) fn backend(section: &FidoSection) -> anyhow::Result<FidoBackend> {
    let backend = FidoBackend::with_middleware(discovery()?, section.middleware());
    for path in &section.keys {
        let key = PrivateKey::read_openssh_file(path)
            .with_context(|| format!("cannot read the sk key file {}", path.display()))?;
        let sk = SkKey::from_keypair(key.key_data())
            .with_context(|| format!("{} is not an sk key", path.display()))?;
        let comment = if key.comment().is_empty() {
            path.display().to_string()
        } else {
            key.comment().to_owned()
        };
        backend.add_configured(sk, comment);
    }
    Ok(backend)
}

/// Loads the resident keys at start when `[fido] load_resident` says so.
pub(crate) fn load_resident_at_start(
    section: &FidoSection,
    backend: &FidoBackend,
    prompter: Arc<dyn Prompter>,
) {
    if !section.load_resident {
        return;
    }
    let backend = backend.clone();
    tokio::spawn(async move {
        match backend.load_resident(prompter).await {
            Ok(keys) => tracing::info!(keys = keys.len(), "loaded resident FIDO keys"),
            Err(err) => tracing::error!(%err, "cannot load resident FIDO keys"),
        }
    });
}

/// The security keys this build reaches: USB HID security keys, or in a
/// `fido-sim` test build only the simulator named by TOKEN_AGENT_FIDO_SIM.
#[cfg(feature = "fido-sim")]
fn discovery() -> anyhow::Result<Arc<dyn Discovery>> {
    sim::discovery()
}

#[cfg(not(feature = "fido-sim"))]
fn discovery() -> anyhow::Result<Arc<dyn Discovery>> {
    Ok(Arc::new(token_agent_fido::HidDiscovery))
}

/// The simulated security key of test builds.
#[cfg(feature = "fido-sim")]
mod sim {
    use std::path::PathBuf;
    use std::sync::{Arc, OnceLock};

    use anyhow::Context;
    use token_agent_fido::{Authenticator, Discovery};

    /// The simulator, attached once per process.
    static SIM: OnceLock<Option<Arc<fido_sim::Simulator>>> = OnceLock::new();

    /// The simulator in the state file TOKEN_AGENT_FIDO_SIM, plugged in as a
    /// security key; its control socket is TOKEN_AGENT_FIDO_SIM_CONTROL when set.
    pub(super) fn discovery() -> anyhow::Result<Arc<dyn Discovery>> {
        let sim = match SIM.get() {
            Some(sim) => sim.clone(),
            None => {
                let sim = open()?;
                let _ = SIM.set(sim.clone());
                sim
            }
        };
        Ok(Arc::new(SimDiscovery(sim)))
    }

    fn open() -> anyhow::Result<Option<Arc<fido_sim::Simulator>>> {
        let Some(state) = std::env::var_os(fido_sim::middleware::STATE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
        else {
            return Ok(None);
        };
        let sim = Arc::new(
            fido_sim::Simulator::open("token", &state)
                .with_context(|| format!("cannot open the fido-sim state {}", state.display()))?,
        );
        if let Some(millis) = std::env::var(fido_sim::middleware::TOUCH_TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            sim.set_touch_timeout(std::time::Duration::from_millis(millis));
        }
        if let Some(socket) = std::env::var_os("TOKEN_AGENT_FIDO_SIM_CONTROL") {
            fido_sim::serve_control(sim.control(), std::path::Path::new(&socket))
                .context("cannot serve the fido-sim control socket")?;
        }
        tracing::warn!(state = %state.display(), "a simulated FIDO security key is attached (test build)");
        Ok(Some(sim))
    }

    #[derive(Debug)]
    struct SimDiscovery(Option<Arc<fido_sim::Simulator>>);

    impl Discovery for SimDiscovery {
        fn connected(&self) -> Vec<Arc<dyn Authenticator>> {
            match &self.0 {
                Some(sim) if sim.control().connected() => {
                    vec![sim.clone() as Arc<dyn Authenticator>]
                }
                _ => Vec::new(),
            }
        }
    }
}

fn run(args: FidoArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let program = config
        .prompt
        .pinentry
        .clone()
        .or_else(|| std::env::var_os("PINENTRY_PROGRAM").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("pinentry"));
    let pinentry = Pinentry::new(program, config.prompt.timeout_seconds);
    let device = only_device()?;
    match args.command {
        FidoCommand::Enroll {
            key_type,
            resident,
            verify_required,
            no_touch_required,
            application,
            comment,
            file,
            force,
        } => {
            let info = device
                .info()
                .with_context(|| format!("cannot talk to {}", device.label()))?;
            // A device with a PIN wants it for every new credential.
            let pin = if info.client_pin_set || verify_required {
                Some(ask_pin(&pinentry, device.as_ref(), "to make a new key")?)
            } else {
                None
            };
            let enrolment = Enrolment {
                algorithm: match key_type {
                    KeyType::Ed25519Sk => CoseAlgorithm::EdDsa,
                    KeyType::EcdsaSk => CoseAlgorithm::Es256,
                },
                application,
                resident,
                verify_required,
                no_touch_required,
                user: "openssh".into(),
                pin,
            };
            eprintln!("Touch {} to make the key.", device.label());
            let key = if force {
                token_agent_fido::enroll_replacing(device.as_ref(), &enrolment)
            } else {
                token_agent_fido::enroll(device.as_ref(), &enrolment)
            }
            .with_context(|| format!("{} could not make the key", device.label()))?;
            let comment = comment.unwrap_or_else(default_comment);
            write_key_files(&key, &comment, &file)?;
            println!(
                "Wrote {} and {}.pub ({})",
                file.display(),
                file.display(),
                key.public_key().fingerprint(ssh_key::HashAlg::Sha256)
            );
            Ok(())
        }
        FidoCommand::LoadResident => {
            let socket = std::env::var_os("SSH_AUTH_SOCK")
                .context("SSH_AUTH_SOCK is not set: start token-agent first")?;
            let pin = ask_pin(&pinentry, device.as_ref(), "to read its resident keys")?;
            let keys = token_agent_fido::ssh_keys(device.as_ref(), Some(&pin))
                .with_context(|| format!("cannot read the resident keys of {}", device.label()))?;
            if keys.is_empty() {
                bail!("{} holds no resident ssh: keys", device.label());
            }
            for (key, application) in &keys {
                add_to_agent(
                    Path::new(&socket),
                    key,
                    &format!("{application} on {}", device.label()),
                )?;
                println!(
                    "Added {application} ({})",
                    key.public_key().fingerprint(ssh_key::HashAlg::Sha256)
                );
            }
            Ok(())
        }
    }
}

/// The one connected security key.
fn only_device() -> anyhow::Result<Arc<dyn Authenticator>> {
    let mut devices = discovery()?.connected();
    match devices.len() {
        0 => bail!("no security key is connected; plug one in and try again"),
        1 => Ok(devices.remove(0)),
        n => bail!("{n} security keys are connected; leave only the one to use plugged in"),
    }
}

fn ask_pin(
    pinentry: &Pinentry,
    device: &dyn Authenticator,
    why: &str,
) -> anyhow::Result<SecretString> {
    let retries = device
        .pin_retries()
        .with_context(|| format!("cannot read the PIN retries of {}", device.label()))?;
    if retries == 0 {
        bail!(
            "the PIN of {} is blocked; only a reset unblocks it, and a reset deletes all its keys",
            device.label()
        );
    }
    let mut request = PinRequest::new(PromptSubject {
        device: Some(DeviceInfo::new(device.label())),
        ..PromptSubject::default()
    });
    request.tries_left = Some(retries);
    request.warning = Some(format!("token-agent fido asks for the PIN {why}."));
    pinentry.pin(&request).context("asking for the PIN")
}

fn default_comment() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

/// Writes the OpenSSH private key file (mode 0600) and its `.pub`.
fn write_key_files(key: &SkKey, comment: &str, file: &Path) -> anyhow::Result<()> {
    let private = PrivateKey::new(key.to_keypair()?, comment)?;
    if file.exists() {
        bail!(
            "{} exists; choose another file or remove it first",
            file.display()
        );
    }
    private
        .write_openssh_file(file, LineEnding::LF)
        .with_context(|| format!("cannot write {}", file.display()))?;
    let mut public_path = file.as_os_str().to_owned();
    public_path.push(".pub");
    let public = private.public_key().to_openssh()?;
    std::fs::write(&public_path, format!("{public}\n"))
        .with_context(|| format!("cannot write {}", PathBuf::from(&public_path).display()))?;
    Ok(())
}

/// Adds `key` to the agent at `socket` (SSH_AGENTC_ADD_IDENTITY, draft-miller-ssh-agent section 4.2).
fn add_to_agent(socket: &Path, key: &SkKey, comment: &str) -> anyhow::Result<()> {
    const ADD_IDENTITY: u8 = 17;
    const SUCCESS: u8 = 6;
    let mut body = vec![ADD_IDENTITY];
    key.to_keypair()?.encode(&mut body)?;
    comment.as_bytes().encode(&mut body)?;
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the agent at {}", socket.display()))?;
    let length = u32::try_from(body.len())?;
    stream.write_all(&length.to_be_bytes())?;
    stream.write_all(&body)?;
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let mut reply = vec![0u8; usize::try_from(u32::from_be_bytes(length))?.min(256 * 1024)];
    stream.read_exact(&mut reply)?;
    if reply.first() != Some(&SUCCESS) {
        bail!("the agent refused the key");
    }
    Ok(())
}
