//! What the agent prints for the shell to evaluate, as ssh-agent prints it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;

use crate::args::{Options, Shell};

/// The lines that set SSH_AUTH_SOCK and SSH_AGENT_PID (`pid` is `None` in
/// foreground mode, where ssh-agent prints no SSH_AGENT_PID either).
pub(crate) fn environment(
    shell: Shell,
    socket: &Path,
    pid: u32,
    with_pid_variable: bool,
) -> String {
    let socket = socket.display();
    let mut out = match shell {
        Shell::Bourne => format!("SSH_AUTH_SOCK={socket}; export SSH_AUTH_SOCK;\n"),
        Shell::C => format!("setenv SSH_AUTH_SOCK {socket};\n"),
    };
    if with_pid_variable {
        out.push_str(&match shell {
            Shell::Bourne => format!("SSH_AGENT_PID={pid}; export SSH_AGENT_PID;\n"),
            Shell::C => format!("setenv SSH_AGENT_PID {pid};\n"),
        });
    }
    out.push_str(&format!("echo Agent pid {pid};\n"));
    out
}

/// `-k`: kill the agent in SSH_AGENT_PID and print the lines that unset its environment.
pub(crate) fn kill(options: &Options) -> anyhow::Result<ExitCode> {
    let Some(text) = std::env::var_os("SSH_AGENT_PID") else {
        bail!("SSH_AGENT_PID not set, cannot kill agent");
    };
    let text = text.to_string_lossy();
    let pid: i32 = text
        .parse()
        .ok()
        .filter(|pid| *pid >= 2)
        .with_context(|| format!("SSH_AGENT_PID=\"{text}\", which is not a good PID"))?;
    send_signal(Pid::from_raw(pid), Signal::SIGTERM)
        .with_context(|| format!("cannot kill agent pid {pid}"))?;
    let unset = |name: &str| match options.shell {
        Shell::Bourne => format!("unset {name};\n"),
        Shell::C => format!("unsetenv {name};\n"),
    };
    println!(
        "{}{}echo Agent pid {pid} killed;",
        unset("SSH_AUTH_SOCK"),
        unset("SSH_AGENT_PID")
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bourne_and_c_shell_lines_match_ssh_agent() {
        let socket = Path::new("/tmp/ssh-abc/agent.1");
        assert_eq!(
            environment(Shell::Bourne, socket, 42, true),
            "SSH_AUTH_SOCK=/tmp/ssh-abc/agent.1; export SSH_AUTH_SOCK;\n\
             SSH_AGENT_PID=42; export SSH_AGENT_PID;\necho Agent pid 42;\n"
        );
        assert_eq!(
            environment(Shell::C, socket, 42, true),
            "setenv SSH_AUTH_SOCK /tmp/ssh-abc/agent.1;\nsetenv SSH_AGENT_PID 42;\necho Agent pid 42;\n"
        );
        assert_eq!(
            environment(Shell::Bourne, socket, 42, false),
            "SSH_AUTH_SOCK=/tmp/ssh-abc/agent.1; export SSH_AUTH_SOCK;\necho Agent pid 42;\n"
        );
    }
}
