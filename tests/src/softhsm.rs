//! SoftHSM2 for tests: a private token directory per test, tokens made with
//! `softhsm2-util`, keys with OpenSC's `pkcs11-tool`, and the misbehaving
//! test modules of `tests/fixtures/pkcs11` compiled with gcc.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use tempfile::TempDir;

use crate::check;

/// SoftHSM's module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The user PIN of every test token.
pub const PIN: &str = "tok-pin-7359";

/// The SO PIN of every test token.
pub const SO_PIN: &str = "12345678";

/// A key type pkcs11-tool can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048.
    Rsa2048,
    /// ECDSA P-256.
    P256,
    /// ECDSA P-384.
    P384,
    /// Ed25519 (CKA_EC_PARAMS as the printable string "edwards25519").
    Ed25519,
}

impl KeyKind {
    /// Every kind.
    pub const ALL: [KeyKind; 4] = [Self::Rsa2048, Self::P256, Self::P384, Self::Ed25519];

    fn key_type(self) -> &'static str {
        match self {
            Self::Rsa2048 => "rsa:2048",
            Self::P256 => "EC:prime256v1",
            Self::P384 => "EC:secp384r1",
            Self::Ed25519 => "EC:edwards25519",
        }
    }

    /// The key's CKA_ID (hex) and CKA_LABEL on the token.
    pub fn id_and_label(self) -> (&'static str, &'static str) {
        match self {
            Self::Rsa2048 => ("01", "rsa-key"),
            Self::P256 => ("02", "p256-key"),
            Self::P384 => ("03", "p384-key"),
            Self::Ed25519 => ("04", "ed25519-key"),
        }
    }

    /// The SSH algorithm of the key.
    pub fn algorithm(self) -> ssh_key::Algorithm {
        use ssh_key::{Algorithm, EcdsaCurve};
        match self {
            Self::Rsa2048 => Algorithm::Rsa { hash: None },
            Self::P256 => Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Self::P384 => Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Self::Ed25519 => Algorithm::Ed25519,
        }
    }
}

/// A SoftHSM configuration with its own token directory.
#[derive(Debug)]
pub struct SoftHsm {
    dir: TempDir,
    conf: PathBuf,
}

impl SoftHsm {
    /// A fresh, empty SoftHSM.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("softhsm-test").tempdir()?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens)?;
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        Ok(Self { dir, conf })
    }

    /// The configuration file (SOFTHSM2_CONF).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// A directory for the test's own files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The environment that points SoftHSM at this configuration.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.display().to_string())]
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SOFTHSM2_CONF", &self.conf);
        command
    }

    /// Makes a token `label` with [`PIN`] and [`SO_PIN`] and keys of `kinds`.
    pub fn token(&self, label: &str, kinds: &[KeyKind]) -> anyhow::Result<()> {
        check(
            self.command("softhsm2-util")
                .args(["--init-token", "--free", "--label", label, "--pin", PIN])
                .args(["--so-pin", SO_PIN])
                .output()
                .context("cannot run softhsm2-util (install softhsm2)")?,
            "softhsm2-util --init-token",
        )?;
        for kind in kinds {
            self.keygen(label, *kind)?;
        }
        Ok(())
    }

    /// Generates a key pair of `kind` on token `label`.
    pub fn keygen(&self, label: &str, kind: KeyKind) -> anyhow::Result<()> {
        self.keygen_with(label, kind, &[])
    }

    /// Generates a key pair of `kind` on token `label` whose private key has
    /// CKA_ALWAYS_AUTHENTICATE: each signature needs a context-specific login.
    pub fn keygen_always_authenticate(&self, label: &str, kind: KeyKind) -> anyhow::Result<()> {
        self.keygen_with(label, kind, &["--always-auth"])
    }

    fn keygen_with(&self, label: &str, kind: KeyKind, extra: &[&str]) -> anyhow::Result<()> {
        let (id, key_label) = kind.id_and_label();
        check(
            self.command("pkcs11-tool")
                .args(["--module", MODULE, "--token-label", label, "--keypairgen"])
                .args(extra)
                .args([
                    "--key-type",
                    kind.key_type(),
                    "--id",
                    id,
                    "--label",
                    key_label,
                ])
                .args(["--login", "--pin", PIN])
                .output()
                .context("cannot run pkcs11-tool (install opensc)")?,
            "pkcs11-tool --keypairgen",
        )?;
        Ok(())
    }

    /// Makes a token `label` whose user PIN is `pin` (not [`PIN`]), with
    /// keys of `kinds`.
    pub fn token_with_pin(&self, label: &str, pin: &str, kinds: &[KeyKind]) -> anyhow::Result<()> {
        check(
            self.command("softhsm2-util")
                .args(["--init-token", "--free", "--label", label, "--pin", pin])
                .args(["--so-pin", SO_PIN])
                .output()
                .context("cannot run softhsm2-util (install softhsm2)")?,
            "softhsm2-util --init-token",
        )?;
        for kind in kinds {
            self.keygen_with_pin(label, pin, *kind, &[])?;
        }
        Ok(())
    }

    /// Generates a key pair of `kind` on token `label`, logging in with
    /// `pin`, with more pkcs11-tool options `extra` (`--private`: the public
    /// key object is private too, visible only after a login;
    /// `--always-auth`).
    pub fn keygen_with_pin(
        &self,
        label: &str,
        pin: &str,
        kind: KeyKind,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let (id, key_label) = kind.id_and_label();
        check(
            self.command("pkcs11-tool")
                .args(["--module", MODULE, "--token-label", label, "--keypairgen"])
                .args(extra)
                .args([
                    "--key-type",
                    kind.key_type(),
                    "--id",
                    id,
                    "--label",
                    key_label,
                ])
                .args(["--login", "--pin", pin])
                .output()
                .context("cannot run pkcs11-tool (install opensc)")?,
            "pkcs11-tool --keypairgen",
        )?;
        Ok(())
    }

    /// Deletes token `label`, as if it were pulled out.
    pub fn delete_token(&self, label: &str) -> anyhow::Result<()> {
        check(
            self.command("softhsm2-util")
                .args(["--delete-token", "--token", label])
                .output()?,
            "softhsm2-util --delete-token",
        )?;
        Ok(())
    }
}

/// How a test module misbehaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shim {
    /// C_Sign aborts (SIGABRT).
    Crash,
    /// C_Sign never returns.
    Hang,
    /// The user PIN is locked.
    Locked,
    /// C_Sign prints to standard output and reads standard input.
    Chatty,
    /// The token sits in a reader with a PIN pad: logins take no PIN from
    /// the agent and wait until the PIN is "typed" into the file named.
    PinPad(PathBuf),
    /// The first search for a private key that finds nothing (not logged
    /// in) logs the token in with this PIN as it ends: another lane's login
    /// landing between the search and what the helper does next.
    LoginRace(String),
    /// C_GetTokenInfo pads the token's label, manufacturer, model and
    /// serial with NULs instead of the spaces PKCS#11 asks for.
    NulPadded,
    /// C_Sign waits this many milliseconds, then signs.
    Slow(u32),
    /// As [`Shim::PinPad`], on a token that takes one session at a time
    /// (ulMaxSessionCount 1), as many smart cards do.
    PinPadOneSession(PathBuf),
}

/// Compiles `tests/fixtures/pkcs11/shim.c` in `mode` into `dir`, forwarding to
/// SoftHSM with the tokens of `softhsm`.
pub fn build_shim(dir: &Path, mode: Shim, softhsm: &SoftHsm) -> anyhow::Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pkcs11/shim.c");
    let (define, name) = match mode {
        Shim::Crash => ("-DSHIM_CRASH".to_owned(), "libcrash-pkcs11.so"),
        Shim::Hang => ("-DSHIM_HANG".to_owned(), "libhang-pkcs11.so"),
        Shim::Locked => ("-DSHIM_LOCKED".to_owned(), "liblocked-pkcs11.so"),
        Shim::Chatty => ("-DSHIM_CHATTY".to_owned(), "libchatty-pkcs11.so"),
        Shim::PinPad(file) => (
            format!("-DSHIM_PIN_PAD=\"{}\"", file.display()),
            "libpinpad-pkcs11.so",
        ),
        Shim::LoginRace(pin) => (
            format!("-DSHIM_LOGIN_RACE=\"{pin}\""),
            "libloginrace-pkcs11.so",
        ),
        Shim::NulPadded => ("-DSHIM_NUL_PADDED".to_owned(), "libnulpadded-pkcs11.so"),
        Shim::Slow(ms) => (format!("-DSHIM_SLOW={ms}"), "libslow-pkcs11.so"),
        Shim::PinPadOneSession(file) => (
            format!("-DSHIM_PIN_PAD_ONE_SESSION=\"{}\"", file.display()),
            "libpinpad1-pkcs11.so",
        ),
    };
    let output = dir.join(name);
    check(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O1", &define])
            .arg(format!("-DSHIM_CONF=\"{}\"", softhsm.conf().display()))
            .arg("-o")
            .arg(&output)
            .arg(&source)
            .output()
            .context("cannot run gcc")?,
        "gcc shim.c",
    )?;
    Ok(output)
}
