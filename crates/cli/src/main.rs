//! `token-agent`: an SSH agent for keys in hardware tokens, and a drop-in for
//! OpenSSH's ssh-agent.
//!
//! This binary owns the wiring: flags (ssh-agent compatible) and the
//! configuration file are checked into [`args::Options`] and
//! [`config::Config`] before anything runs; then it either starts the agent
//! in the background and prints its environment, serves in the foreground,
//! or kills a running agent. Exit codes, as ssh-agent's: 0 on success, 1 on
//! any error, usage errors included; 2 when a signal or the exit of
//! COMMAND's process stops the agent (0 for SIGTERM under socket
//! activation). The subcommands (`piv`, `fido`, `status`, `doctor`) keep
//! clap's 2 for a usage error.

#![forbid(unsafe_code)]

mod activation;
mod args;
mod config;
mod daemon;
mod docs;
mod doctor;
mod fido;
mod logging;
mod piv;
mod serve;
mod session_lock;
mod shell;
mod socket;
mod status;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Args, Mode, Options};

fn main() -> ExitCode {
    // The first word picks the mode before ssh-agent-style parsing, where any
    // trailing words are a COMMAND to run with the agent's environment.
    let first = std::env::args_os().nth(1);
    match first.as_deref().and_then(std::ffi::OsStr::to_str) {
        // Hidden helper mode: the agent runs each PKCS#11 module in a child
        // token-agent-pkcs11-helper, speaking token_agent_pkcs11::proto on
        // stdio, or in `token-agent --pkcs11-helper` where that is missing.
        Some("--pkcs11-helper") => token_agent_pkcs11::helper::run(),
        // Hidden helper mode: each sk middleware (`ssh-add -S`) runs in a child
        // `token-agent --sk-helper`, loaded there and never in the agent.
        Some("--sk-helper") => token_agent_fido::middleware::run_helper(),
        // These ask for PINs, PUKs and management keys: as the agent, not
        // dumpable, so no other process of the user can read them.
        Some("piv") => {
            not_dumpable();
            return piv::main(std::env::args_os().skip(1));
        }
        Some("fido") => {
            not_dumpable();
            return fido::main(std::env::args_os().skip(1));
        }
        Some("status") => return status::main(std::env::args_os().skip(1)),
        Some("doctor") => return doctor::main(std::env::args_os().skip(1)),
        Some("--generate-docs") => return docs::main(std::env::args_os().skip(2)),
        _ => {}
    }
    // ssh-agent's usage() exits 1, where clap's errors exit 2.
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 1 } else { 0 });
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("token-agent: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// No core dumps, and no ptrace by other processes of the user.
fn not_dumpable() {
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("token-agent: cannot make the process non-dumpable: {err}");
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let options = Options::try_from(args)?;
    match options.mode {
        Mode::Version => {
            // As ssh-agent -V: on stderr, exit 0.
            eprintln!("token-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Mode::Kill => shell::kill(&options),
        Mode::Cleanup { any_host } => cleanup(any_host),
        Mode::Daemon => daemon::start(&options),
        Mode::Foreground { debug } => {
            // As ssh-agent in every mode: whatever the starting process left
            // open (not close-on-exec) would reach the helpers, which run
            // module code, and every program the agent starts.
            daemon::close_inherited_fds_but(activation::passed_fds());
            serve::run(&options, serve::Role::Foreground { debug })
        }
        Mode::DaemonChild => {
            daemon::close_inherited_fds();
            serve::run(&options, serve::Role::DaemonChild)
        }
    }
}

/// `-u` / `-uu`: remove stale sockets under ~/.ssh/agent and say so, as ssh-agent.
fn cleanup(any_host: bool) -> anyhow::Result<ExitCode> {
    logging::to_stderr("warn", None);
    let home = socket::home_dir()?;
    socket::cleanup_stale(&home, any_host);
    println!("Deleted stale agent sockets in ~/{}", socket::SOCKET_DIR);
    Ok(ExitCode::SUCCESS)
}
