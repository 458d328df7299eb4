//! What the agent prints for the shell to evaluate, as ssh-agent prints it.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;

use crate::args::{Options, Shell};

/// The lines that set SSH_AUTH_SOCK and SSH_AGENT_PID (without
/// `with_pid_variable` in foreground mode, where ssh-agent prints no
/// SSH_AGENT_PID either), as bytes: a socket path need not be UTF-8, and is
/// printed as it is.
pub(crate) fn environment(
    shell: Shell,
    socket: &Path,
    pid: u32,
    with_pid_variable: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    match shell {
        Shell::Bourne => out.extend_from_slice(b"SSH_AUTH_SOCK="),
        Shell::C => out.extend_from_slice(b"setenv SSH_AUTH_SOCK "),
    }
    out.extend_from_slice(&word(shell, socket.as_os_str().as_bytes()));
    match shell {
        Shell::Bourne => out.extend_from_slice(b"; export SSH_AUTH_SOCK;\n"),
        Shell::C => out.extend_from_slice(b";\n"),
    }
    if with_pid_variable {
        out.extend_from_slice(
            match shell {
                Shell::Bourne => format!("SSH_AGENT_PID={pid}; export SSH_AGENT_PID;\n"),
                Shell::C => format!("setenv SSH_AGENT_PID {pid};\n"),
            }
            .as_bytes(),
        );
    }
    out.extend_from_slice(format!("echo Agent pid {pid};\n").as_bytes());
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

/// `value` as one shell word that `shell` reads back as exactly `value`.
///
/// Written as OpenSSH 10's `argv_assemble()` writes it (backslash before
/// `\\`, `'` and `"`; in double quotes when there is a space or a tab)
/// whenever the shell reads that back right, so the lines match ssh-agent's
/// for every ordinary path. argv_assemble() leaves `$`, `` ` ``, `;`,
/// newlines and the like as they are, which the shell would expand or run,
/// and its backslashes stay in a C shell's double quotes and before `'` in
/// a Bourne shell's: such a value goes in single quotes instead.
fn word(shell: Shell, value: &[u8]) -> Vec<u8> {
    let blank = value.iter().any(|&b| b == b' ' || b == b'\t');
    let openssh_reads_back = value.iter().all(|&b| match b {
        b' ' | b'\t' => true,
        // In double quotes, a Bourne shell keeps the backslash before `'`,
        // and a C shell every backslash.
        b'\'' => !blank,
        b'\\' | b'"' => !blank || shell == Shell::Bourne,
        _ => literal(b),
    });
    if openssh_reads_back {
        return argv_assemble(value, blank);
    }
    let mut out = vec![b'\''];
    for &b in value {
        match (b, shell) {
            (b'\'', _) => out.extend_from_slice(b"'\\''"),
            // csh expands history even in single quotes.
            (b'!', Shell::C) => out.extend_from_slice(b"'\\!'"),
            // csh ends a quoted word at a bare newline. (A csh that reads
            // the lines through `eval "`...`"` turns any newline into a
            // space all the same: it cannot set a value with one.)
            (b'\n', Shell::C) => out.extend_from_slice(b"\\\n"),
            _ => out.push(b),
        }
    }
    out.push(b'\'');
    out
}

/// Bytes that mean themselves unquoted and in double quotes, to sh and csh.
fn literal(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b >= 0x80 || b"/._-+,:@%=".contains(&b)
}

/// OpenSSH's `argv_assemble()` of the one word `value`.
fn argv_assemble(value: &[u8], blank: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 2);
    if blank {
        out.push(b'"');
    }
    for &b in value {
        if matches!(b, b'\\' | b'\'' | b'"') {
            out.push(b'\\');
        }
        out.push(b);
    }
    if blank {
        out.push(b'"');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(shell: Shell, socket: &str) -> String {
        String::from_utf8(environment(shell, Path::new(socket), 42, true)).unwrap()
    }

    #[test]
    fn bourne_and_c_shell_lines_match_ssh_agent() {
        let socket = "/tmp/ssh-abc/agent.1";
        assert_eq!(
            shown(Shell::Bourne, socket),
            "SSH_AUTH_SOCK=/tmp/ssh-abc/agent.1; export SSH_AUTH_SOCK;\n\
             SSH_AGENT_PID=42; export SSH_AGENT_PID;\necho Agent pid 42;\n"
        );
        assert_eq!(
            shown(Shell::C, socket),
            "setenv SSH_AUTH_SOCK /tmp/ssh-abc/agent.1;\nsetenv SSH_AGENT_PID 42;\necho Agent pid 42;\n"
        );
        assert_eq!(
            environment(Shell::Bourne, Path::new(socket), 42, false),
            b"SSH_AUTH_SOCK=/tmp/ssh-abc/agent.1; export SSH_AUTH_SOCK;\necho Agent pid 42;\n"
        );
    }

    #[test]
    fn socket_paths_are_quoted_as_openssh_10_quotes_them() {
        let first = |shell, socket| shown(shell, socket).lines().next().unwrap().to_owned();
        // What OpenSSH 10.5's ssh-agent prints for the same paths.
        assert_eq!(
            first(Shell::Bourne, "/tmp/sp ace/s"),
            r#"SSH_AUTH_SOCK="/tmp/sp ace/s"; export SSH_AUTH_SOCK;"#
        );
        assert_eq!(
            first(Shell::C, "/tmp/sp ace/s"),
            r#"setenv SSH_AUTH_SOCK "/tmp/sp ace/s";"#
        );
        assert_eq!(
            first(Shell::Bourne, "/tmp/t\tab/s\"q"),
            "SSH_AUTH_SOCK=\"/tmp/t\tab/s\\\"q\"; export SSH_AUTH_SOCK;"
        );
        assert_eq!(
            first(Shell::C, r#"/tmp/a\b'c"d"#),
            r#"setenv SSH_AUTH_SOCK /tmp/a\\b\'c\"d;"#
        );
        // Where OpenSSH's form would not read back right: single quotes.
        assert_eq!(
            first(Shell::Bourne, "/tmp/sp ace/it's"),
            r#"SSH_AUTH_SOCK='/tmp/sp ace/it'\''s'; export SSH_AUTH_SOCK;"#
        );
        assert_eq!(
            first(Shell::Bourne, "/tmp/$HOME/`x`;y"),
            "SSH_AUTH_SOCK='/tmp/$HOME/`x`;y'; export SSH_AUTH_SOCK;"
        );
        assert_eq!(
            first(Shell::C, r#"/tmp/sp ace/a\b"#),
            r#"setenv SSH_AUTH_SOCK '/tmp/sp ace/a\b';"#
        );
        assert_eq!(
            first(Shell::C, "/tmp/a!b"),
            r#"setenv SSH_AUTH_SOCK '/tmp/a'\!'b';"#
        );
        assert_eq!(
            shown(Shell::Bourne, "/tmp/a\nb"),
            "SSH_AUTH_SOCK='/tmp/a\nb'; export SSH_AUTH_SOCK;\n\
             SSH_AGENT_PID=42; export SSH_AGENT_PID;\necho Agent pid 42;\n"
        );
    }
}
