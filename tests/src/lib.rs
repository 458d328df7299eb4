//! Support for token-agent's end-to-end tests and benchmark.
//!
//! Every test starts its own daemons (token-agent, OpenSSH's sshd and
//! ssh-agent, pcscd with piv-sim) in its own temporary directory, on loopback
//! only, and stops them by PID when dropped, so tests run in parallel.

pub mod agent;
pub mod bench;
pub mod conformance;
pub mod gpg;
pub mod openssh;
pub mod pcsc;
pub mod softhsm;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The `token-agent` binary of this workspace, built on first use if a
/// `cargo test` run did not build it already, with the PKCS#11 helper beside it.
/// `TOKEN_AGENT_BINARY` names another one to run instead (an older build
/// to compare a benchmark with), with its helper beside it.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(binary) = std::env::var_os("TOKEN_AGENT_BINARY") {
                let binary = PathBuf::from(binary);
                return if binary.is_file() {
                    Ok(binary)
                } else {
                    Err(format!(
                        "TOKEN_AGENT_BINARY={} is not a file",
                        binary.display()
                    ))
                };
            }
            build(
                &[
                    "-p",
                    "token-agent",
                    "--bin",
                    "token-agent",
                    "--bin",
                    "token-agent-pkcs11-helper",
                ],
                "token-agent",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `token-agent-pkcs11-helper`, the process the agent loads each PKCS#11
/// module in, built with [`agent_binary`].
pub fn pkcs11_helper_binary() -> anyhow::Result<PathBuf> {
    let agent = agent_binary()?;
    Ok(agent.with_file_name("token-agent-pkcs11-helper"))
}

/// A binary of this test crate (`scripted-pinentry`, `agent-bench`).
pub fn test_binary(name: &str) -> anyhow::Result<PathBuf> {
    find_or_build("token-agent-e2e", name)
}

/// `token-agent-fido-sim`, built on first use: the agent with a simulated
/// security key attached (the `fido-sim` feature, never in a release).
pub fn fido_sim_agent_binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            build(
                &[
                    "-p",
                    "token-agent",
                    "--features",
                    "fido-sim",
                    "--bin",
                    "token-agent-fido-sim",
                ],
                "token-agent-fido-sim",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `libfido_sim_middleware.so`, fido-sim built as an OpenSSH security-key
/// middleware (its `fido_sim_middleware` example), built on first use.
pub fn fido_sim_middleware() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            build(
                &["-p", "fido-sim", "--example", "fido_sim_middleware"],
                "examples/libfido_sim_middleware.so",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_or_build(package: &str, name: &str) -> anyhow::Result<PathBuf> {
    build(&["-p", package, "--bin", name], name)
}

/// Asks cargo to build `what` with this executable's profile and returns
/// `output`, a path below target/<profile>. Cargo is always asked: it
/// rebuilds only what changed, and a stale binary would test old code.
fn build(what: &[&str], output: &str) -> anyhow::Result<PathBuf> {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let mut dir = exe.parent().context("test executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let mut command = cargo();
    command.args(["build", "--quiet"]).args(what);
    if dir.ends_with("release") {
        command.arg("--release");
    }
    let status = command
        .status()
        .context("cannot run cargo to build the binaries")?;
    if !status.success() {
        bail!("building {output} failed");
    }
    let path = dir.join(output);
    if !path.exists() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}

/// The cargo running these tests, as a command for a nested build, without
/// the variables cargo sets for a test process (CARGO_MANIFEST_DIR,
/// CARGO_PKG_*, ...): build scripts that watch them (ring's declares
/// rerun-if-env-changed for each) would otherwise rebuild their crate and
/// everything above it whenever builds from a test and from the shell alternate.
pub fn cargo() -> std::process::Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(program);
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_for_tests = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || matches!(name, "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR");
        if set_for_tests {
            command.env_remove(name);
        }
    }
    command
}

/// Polls `condition` every 20 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` still runs: it exists and has not exited (a zombie
/// only waits for its parent, which for a background agent is whatever
/// adopted it, to collect its status).
pub fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Standard output of `output` as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Standard error of `output` as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Fails with the command's output unless it succeeded.
pub fn check(output: Output, what: &str) -> anyhow::Result<Output> {
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            stdout(&output),
            stderr(&output)
        );
    }
    Ok(output)
}

/// Writes an executable shell script.
pub fn write_script(path: &Path, body: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Whether this process runs as root (sshd and other-uid tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `keygen` (an `ssh-keygen` command) set to sign `message` in the "file"
/// namespace with the agent's key whose public half is in `public`:
/// `ssh-keygen -Y sign -n file -f PUBLIC MESSAGE`, which writes MESSAGE.sig.
pub fn sign_file(
    mut keygen: std::process::Command,
    public: impl AsRef<std::ffi::OsStr>,
    message: impl AsRef<std::ffi::OsStr>,
) -> std::process::Command {
    keygen
        .args(["-Y", "sign", "-n", "file", "-f"])
        .arg(public)
        .arg(message);
    keygen
}
