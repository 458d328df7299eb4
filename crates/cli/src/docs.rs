//! `token-agent --generate-docs DIR`: the man page token-agent(1) and the
//! bash, zsh and fish completions, made from the clap definitions the parser
//! itself uses (ssh-agent's flags in [`crate::args`], each subcommand in its
//! module) and from the configuration's key table ([`crate::config::KEYS`]),
//! so the documentation cannot drift from the code. A hidden mode, for the
//! package script (`scripts/package-deb`).

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

use crate::args::Args;
use crate::config::KEYS;

/// What `--generate-docs DIR` writes in DIR.
pub(crate) const FILES: [&str; 4] = [
    "token-agent.1",
    "token-agent.bash",
    "_token-agent",
    "token-agent.fish",
];

/// Runs `token-agent --generate-docs DIR` (`args` starts after the flag).
pub(crate) fn main(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: token-agent --generate-docs DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("token-agent: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// Writes [`FILES`] into `dir`, creating it if needed.
pub(crate) fn generate(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let path: PathBuf = dir.join(name);
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write(FILES[0], &man_page()?)?;
    for (shell, name) in [
        (Shell::Bash, FILES[1]),
        (Shell::Zsh, FILES[2]),
        (Shell::Fish, FILES[3]),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut full_command(), "token-agent", &mut script);
        write(name, &script)?;
    }
    Ok(())
}

/// The subcommands dispatched before the ssh-agent-style parse (main.rs), as
/// clap commands named by their word. A subcommand added there is added here
/// too, and so appears in the man page and the completions.
fn subcommands() -> Vec<Command> {
    vec![
        crate::piv::command().name("piv"),
        crate::fido::command().name("fido"),
        crate::status::command().name("status"),
        crate::doctor::command().name("doctor"),
    ]
}

/// ssh-agent's flags with the subcommands, for the completions; without the
/// hidden internal flags, which clap_complete would otherwise offer.
fn full_command() -> Command {
    let args = Args::command();
    let shown: Vec<Arg> = args
        .get_arguments()
        .filter(|arg| !arg.is_hide_set())
        .cloned()
        .collect();
    Command::new("token-agent")
        .about(args.get_about().cloned().unwrap_or_default())
        .disable_version_flag(true)
        .args(shown)
        .subcommands(subcommands())
        // clap's own help subcommand is not one of ours.
        .disable_help_subcommand(true)
}

/// token-agent(1), in roff.
fn man_page() -> anyhow::Result<Vec<u8>> {
    let man = Man::new(Args::command())
        .manual("User Commands")
        .source(format!("token-agent {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    subcommand_synopsis().to_writer(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    subcommands_section().to_writer(&mut out)?;
    man.render_extra_section(&mut out)?;
    configuration_section().to_writer(&mut out)?;
    tail_sections().to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    out.flush()?;
    Ok(out)
}

/// One synopsis line per subcommand, below ssh-agent's.
fn subcommand_synopsis() -> Roff {
    let mut roff = Roff::new();
    for command in subcommands() {
        roff.control("br", []);
        let mut line = vec![bold(format!("token-agent {}", command.get_name()))];
        line.push(roman(" "));
        let names: Vec<&str> = command.get_subcommands().map(Command::get_name).collect();
        if names.is_empty() {
            line.push(roman("[OPTIONS]"));
        } else {
            line.push(roman("[OPTIONS] "));
            line.push(italic(names.join("|")));
            line.push(roman(" [OPTIONS]"));
        }
        roff.text(line);
    }
    roff
}

/// SUBCOMMANDS: each with its options and its own subcommands.
fn subcommands_section() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SUBCOMMANDS"]);
    roff.text([roman(
        "A first word naming one of these runs it instead of the agent; \
         the ssh-agent flags above do not apply to it.",
    )]);
    for command in subcommands() {
        let name = format!("token-agent {}", command.get_name());
        roff.control("SS", [name.as_str()]);
        if let Some(about) = command.get_long_about().or(command.get_about()) {
            roff.text([roman(about.to_string())]);
        }
        options(&mut roff, &command);
        for sub in command.get_subcommands() {
            roff.control("TP", []);
            roff.text([bold(format!("{name} {}", sub.get_name()))]);
            if let Some(about) = sub.get_long_about().or(sub.get_about()) {
                roff.text([roman(about.to_string())]);
            }
            if sub.get_arguments().any(shown) {
                roff.control("RS", []);
                options(&mut roff, sub);
                roff.control("RE", []);
            }
        }
    }
    roff
}

/// The documented arguments of `command`, as tagged paragraphs.
fn options(roff: &mut Roff, command: &Command) {
    for arg in command.get_arguments().filter(|arg| shown(arg)) {
        roff.control("TP", []);
        roff.text(arg_head(arg));
        let mut help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|value| value.to_string_lossy().into_owned())
            .collect();
        if !defaults.is_empty() {
            help.push_str(&format!(" [default: {}]", defaults.join(",")));
        }
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|value| !value.is_hide_set())
            .map(|value| value.get_name().to_owned())
            .collect();
        if !values.is_empty() && takes_value(arg) {
            help.push_str(&format!(" [possible values: {}]", values.join(", ")));
        }
        roff.text([roman(help)]);
    }
}

/// Whether an argument belongs in the page: not hidden, not clap's own --help.
fn shown(arg: &Arg) -> bool {
    !arg.is_hide_set() && arg.get_id() != "help"
}

fn takes_value(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Set | ArgAction::Append)
}

/// `-C, --comment COMMENT`, `--slot SLOT`, `FILE`.
fn arg_head(arg: &Arg) -> Vec<Inline> {
    let mut head = Vec::new();
    let value = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map(ToString::to_string)
        .unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
    if arg.is_positional() {
        head.push(italic(value));
        return head;
    }
    if let Some(short) = arg.get_short() {
        head.push(bold(format!("-{short}")));
    }
    if let Some(long) = arg.get_long() {
        if !head.is_empty() {
            head.push(roman(", "));
        }
        head.push(bold(format!("--{long}")));
    }
    if takes_value(arg) {
        head.push(roman(" "));
        head.push(italic(value));
    }
    head
}

/// CONFIGURATION and FILES: every key of the file, from the key table.
fn configuration_section() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["CONFIGURATION"]);
    roff.text([
        roman("Flags cover what ssh-agent does; everything else is in a TOML file, "),
        italic("$XDG_CONFIG_HOME/token-agent/config.toml"),
        roman(" (usually "),
        italic("~/.config/token-agent/config.toml"),
        roman("), or the file "),
        bold("--config"),
        roman(
            " names. Every key is optional; an unknown key or a wrong value is an error \
             that names its line and column. The keys, by table:",
        ),
    ]);
    let mut section = None;
    for key in KEYS {
        if section != Some(key.section) {
            section = Some(key.section);
            let title = match key.section {
                "" => "Top level".to_owned(),
                section if crate::config::ARRAY_SECTIONS.contains(&section) => {
                    format!("[[{section}]]")
                }
                other => format!("[{other}]"),
            };
            roff.control("SS", [title.as_str()]);
        }
        roff.control("TP", []);
        roff.text([bold(key.name), roman(" = "), italic(key.example)]);
        roff.text([roman(key.meaning)]);
    }
    roff.control("SH", ["FILES"]);
    for (path, meaning) in [
        (
            "~/.config/token-agent/config.toml",
            "The configuration ($XDG_CONFIG_HOME/token-agent/config.toml).",
        ),
        (
            "~/.local/state/token-agent/agent.log",
            "The background agent's log ($XDG_STATE_HOME/token-agent/agent.log), unless log_file says otherwise; syslog when it cannot be made.",
        ),
        (
            "~/.ssh/agent/s.HOSTHASH.agent.RANDOM",
            "The default socket, named as OpenSSH 10.1 and later name it.",
        ),
        (
            "$XDG_RUNTIME_DIR/token-agent/ssh-agent.sock",
            "The socket of the systemd user units token-agent.socket and token-agent.service.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([italic(path)]);
        roff.text([roman(meaning)]);
    }
    roff
}

/// ENVIRONMENT and SEE ALSO.
fn tail_sections() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in [
        (
            "SSH_AUTH_SOCK",
            "Printed for the shell; read by ssh, ssh-add and token-agent status.",
        ),
        (
            "SSH_AGENT_PID",
            "Printed for the shell; the agent -k stops.",
        ),
        (
            "SSH_ASKPASS",
            "Asks confirmations of ssh-add -c keys, and PINs with pin_prompt = \"askpass\".",
        ),
        (
            "PINENTRY_PROGRAM",
            "The pinentry program when [prompt] pinentry is not set.",
        ),
        (
            "TOKEN_AGENT_LOG",
            "A log filter that overrides log_level, e.g. debug.",
        ),
        (
            "LISTEN_FDS, LISTEN_PID",
            "Socket activation, with -d or -D and without -a.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(name)]);
        roff.text([roman(meaning)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(
        "ssh-agent(1), ssh-add(1), ssh(1), ssh-keygen(1), pinentry(1), pcscd(8), systemctl(1)",
    )]);
    roff
}

#[cfg(test)]
mod tests {
    use std::process::Command as Process;

    use super::*;

    /// What `man -l` shows of the generated page, as plain ASCII text.
    fn rendered(page: &Path) -> String {
        let output = Process::new("man")
            .arg("-l")
            .arg(page)
            .env("LC_ALL", "C")
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "200")
            .output()
            .expect("man (Debian's man-db) runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn issue_17_the_man_page_documents_every_flag_subcommand_and_key() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        for name in FILES {
            assert!(dir.path().join(name).is_file(), "{name}");
        }
        let text = rendered(&dir.path().join("token-agent.1"));
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "SUBCOMMANDS",
            "CONFIGURATION",
            "FILES",
            "ENVIRONMENT",
        ] {
            assert!(
                text.contains(&format!("\n{section}\n")),
                "{section}:\n{text}"
            );
        }
        // Every flag of the ssh-agent parse, from its clap definition.
        for arg in Args::command()
            .get_arguments()
            .filter(|arg| !arg.is_hide_set())
        {
            if let Some(short) = arg.get_short() {
                assert!(text.contains(&format!("-{short}")), "-{short}:\n{text}");
            }
            if let Some(long) = arg.get_long() {
                assert!(text.contains(&format!("--{long}")), "--{long}:\n{text}");
            }
        }
        // The hidden ones stay out.
        assert!(!text.contains("--daemon-child"), "{text}");
        // Every subcommand, its own subcommands and their flags.
        for command in subcommands() {
            let name = format!("token-agent {}", command.get_name());
            assert!(text.contains(&name), "{name}:\n{text}");
            for sub in command.get_subcommands() {
                assert!(
                    text.contains(&format!("{name} {}", sub.get_name())),
                    "{name} {}",
                    sub.get_name()
                );
                for arg in sub.get_arguments().filter(|arg| shown(arg)) {
                    if let Some(long) = arg.get_long() {
                        assert!(text.contains(&format!("--{long}")), "{name}: --{long}");
                    }
                }
            }
        }
        // Every configuration key under its table.
        for key in KEYS {
            assert!(
                text.contains(&format!("{} = ", key.name)),
                "{}:\n{text}",
                key.name
            );
        }
        for table in [
            "[prompt]",
            "[notice]",
            "[piv]",
            "[pkcs11]",
            "[[pkcs11.modules]]",
            "[fido]",
        ] {
            assert!(text.contains(table), "{table}");
        }
    }

    #[test]
    fn issue_17_completions_name_every_flag_and_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let bash = dir.path().join("token-agent.bash");
        let status = Process::new("bash").arg("-n").arg(&bash).status().unwrap();
        assert!(status.success(), "bash -n {}", bash.display());
        let zsh = fs::read_to_string(dir.path().join("_token-agent")).unwrap();
        let fish = fs::read_to_string(dir.path().join("token-agent.fish")).unwrap();
        let bash = fs::read_to_string(&bash).unwrap();
        assert!(zsh.starts_with("#compdef token-agent"), "{zsh}");
        for arg in Args::command()
            .get_arguments()
            .filter(|arg| !arg.is_hide_set())
        {
            if let Some(short) = arg.get_short() {
                assert!(bash.contains(&format!("-{short}")), "bash: -{short}");
                // `-c[help]`, or `-a+[help]` for a flag with a value.
                assert!(
                    zsh.contains(&format!("-{short}[")) || zsh.contains(&format!("-{short}+[")),
                    "zsh: -{short}"
                );
                assert!(fish.contains(&format!("-s {short}")), "fish: -{short}");
            }
        }
        for command in subcommands() {
            let name = command.get_name();
            assert!(
                bash.contains(name) && zsh.contains(name) && fish.contains(name),
                "{name}"
            );
        }
        assert!(!bash.contains("daemon-child") && !fish.contains("daemon-child"));
    }
}
