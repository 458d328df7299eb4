//! Can the agent ask the person? pinentry for PINs, SSH_ASKPASS for
//! confirmations (`ssh-add -c`), in the agent's own environment: a
//! background agent has no terminal, so both need a graphical session.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::agent::Survey;
use super::socket::AgentKind;
use super::{platform, Check, Context, Finding};
use crate::config::{Config, PinPrompt};

/// pinentry and SSH_ASKPASS, for the agent on SSH_AUTH_SOCK or, when that
/// is not token-agent, for a token-agent started from this session.
pub(crate) fn check(context: &Context, survey: &Survey) -> Vec<Finding> {
    let server = survey.auth_server();
    let running = server.and_then(|server| {
        let pid = server.pid()?;
        let wanted = matches!(server.kind, AgentKind::TokenAgent | AgentKind::OpenSsh);
        let environ = platform::environ(pid).filter(|_| wanted)?;
        Some((server.kind.clone(), pid, environ))
    });
    match running {
        Some((AgentKind::OpenSsh, pid, environ)) => {
            let env = context.derive(environ);
            let who = format!("OpenSSH's ssh-agent (pid {pid})");
            openssh_askpass(&env, &who)
        }
        Some((_, pid, environ)) => {
            let env = context.derive(environ);
            let who = format!("token-agent's environment (pid {pid})");
            let config = running_config(&env, pid);
            token_agent(
                &env,
                &Prompter {
                    who,
                    terminal: platform::stdin_is_terminal(pid),
                    config,
                },
            )
        }
        None => {
            let config = context
                .config()
                .map(Path::to_path_buf)
                .or_else(|| default_config(context));
            token_agent(
                context,
                &Prompter {
                    who: "this session's environment (which a token-agent started here gets)"
                        .into(),
                    // The background agent's standard input is /dev/null.
                    terminal: false,
                    config,
                },
            )
        }
    }
}

/// Whose environment is checked, and what it has.
#[derive(Debug)]
struct Prompter {
    /// "token-agent's environment (pid 42)".
    who: String,
    /// Whether the agent's standard input is a terminal (run with -D there).
    terminal: bool,
    /// token-agent's configuration file.
    config: Option<PathBuf>,
}

fn token_agent(env: &Context, prompter: &Prompter) -> Vec<Finding> {
    let check = Check::Prompt;
    let who = &prompter.who;
    let mut findings = Vec::new();
    let config = match prompter.config.as_deref().filter(|path| path.exists()) {
        None => Config::default(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(anyhow::Error::from)
            .and_then(|text| Config::parse(&text))
        {
            Ok(config) => config,
            Err(err) => {
                findings.push(
                    Finding::warning(
                        check,
                        "config-invalid",
                        format!(
                            "token-agent's configuration {} cannot be read: {}",
                            env.show(path),
                            one_line(&format!("{err:#}"))
                        ),
                    )
                    .fix(format!(
                        "correct {} (token-agent refuses to start with it)",
                        env.shell(path)
                    )),
                );
                Config::default()
            }
        },
    };
    let config_name = prompter.config.as_deref().map_or_else(
        || "token-agent's config.toml".to_owned(),
        |path| env.show(path),
    );
    let display = has_display(env);

    if config.prompt.pin_prompt == PinPrompt::Pinentry {
        let (program, source) = match &config.prompt.pinentry {
            Some(program) => (
                expand_home(env, program),
                format!("[prompt] pinentry in {config_name}"),
            ),
            None => match env.var("PINENTRY_PROGRAM") {
                Some(program) => (PathBuf::from(program), "PINENTRY_PROGRAM".to_owned()),
                None => (PathBuf::from("pinentry"), "the default".to_owned()),
            },
        };
        let shown = program.display();
        match resolve(env, &program) {
            None => findings.push(
                Finding::problem(
                    check,
                    "pinentry-missing",
                    format!(
                        "The pinentry program {shown} ({source}) is not found or not executable \
                         in {who}: token PINs cannot be asked, and signing fails with \"agent \
                         refused operation\"."
                    ),
                )
                .fix(format!(
                    "sudo apt install pinentry-gnome3 (or pinentry-qt), or name one that exists \
                     in PINENTRY_PROGRAM or [prompt] pinentry in {config_name}"
                )),
            ),
            Some(path) if is_terminal_pinentry(&path) && !prompter.terminal => findings.push(
                Finding::warning(
                    check,
                    "pinentry-needs-terminal",
                    format!(
                        "The pinentry program {shown} ({}) asks on a terminal, which the background agent \
                         does not have: PIN prompts fail.",
                        real(&path).display()
                    ),
                )
                .fix(format!(
                    "sudo apt install pinentry-gnome3 and set pinentry = \"pinentry-gnome3\" under \
                     [prompt] in {config_name} (or PINENTRY_PROGRAM where the agent starts)"
                )),
            ),
            Some(path) if !is_terminal_pinentry(&path) && display.is_none() && !prompter.terminal => {
                findings.push(
                    Finding::warning(
                        check,
                        "pinentry-no-display",
                        format!(
                            "{who} has neither DISPLAY nor WAYLAND_DISPLAY, so the pinentry \
                             {shown} cannot open its window: PIN prompts fail (\"needs a \
                             graphical session\")."
                        ),
                    )
                    .fix(
                        "start token-agent from your desktop session (or run systemctl --user \
                         import-environment DISPLAY WAYLAND_DISPLAY before it starts), or set \
                         pin_prompt = \"askpass\" with an SSH_ASKPASS that can ask",
                    ),
                )
            }
            Some(path) => findings.push(Finding::ok(
                check,
                "pinentry-ok",
                format!(
                    "{who} can ask for PINs through {}{}.",
                    path.display(),
                    display.map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            )),
        }
    }

    let askpass_needed = config.prompt.pin_prompt == PinPrompt::Askpass;
    findings.extend(askpass(env, who, askpass_needed, &config_name));
    findings
}

/// SSH_ASKPASS: PINs with pin_prompt = "askpass", confirmations of `ssh-add -c` keys.
fn askpass(env: &Context, who: &str, needed: bool, config_name: &str) -> Vec<Finding> {
    let check = Check::Prompt;
    let Some(program) = env.var("SSH_ASKPASS").map(PathBuf::from) else {
        if needed {
            return vec![Finding::problem(
                check,
                "askpass-unset",
                format!(
                    "{config_name} asks PINs through askpass (pin_prompt = \"askpass\"), but \
                     SSH_ASKPASS is not set in {who}."
                ),
            )
            .fix("set SSH_ASKPASS (e.g. /usr/bin/ssh-askpass) where the agent starts, or pin_prompt = \"pinentry\"")];
        }
        return Vec::new();
    };
    let shown = program.display();
    match resolve(env, &program) {
        None => vec![Finding::problem(
            check,
            "askpass-missing",
            format!(
                "SSH_ASKPASS in {who} names {shown}, which is not found or not executable: \
                 confirmations (ssh-add -c){} fail.",
                if needed { " and PINs" } else { "" }
            ),
        )
        .fix("sudo apt install ssh-askpass-gnome (or ssh-askpass), and point SSH_ASKPASS at it")],
        Some(_)
            if has_display(env).is_none()
                && env.var("SSH_ASKPASS_REQUIRE").is_none_or(|v| v != "force") =>
        {
            vec![Finding::warning(
                check,
                "askpass-no-display",
                format!(
                    "SSH_ASKPASS ({shown}) opens a window, but {who} has neither DISPLAY nor \
                     WAYLAND_DISPLAY: confirmations (ssh-add -c) are refused."
                ),
            )
            .fix("start the agent from your desktop session")]
        }
        Some(path) => vec![Finding::ok(
            check,
            "askpass-ok",
            format!(
                "{who} can ask confirmations through SSH_ASKPASS ({}).",
                path.display()
            ),
        )],
    }
}

/// OpenSSH's ssh-agent asks only confirmations, through SSH_ASKPASS or its default.
fn openssh_askpass(env: &Context, who: &str) -> Vec<Finding> {
    if env.var("SSH_ASKPASS").is_some() {
        return askpass(env, who, false, "");
    }
    let default = Path::new("/usr/bin/ssh-askpass");
    if is_executable(default) {
        return vec![Finding::ok(
            Check::Prompt,
            "askpass-ok",
            format!("{who} can ask confirmations through {}.", default.display()),
        )];
    }
    vec![Finding::info(
        Check::Prompt,
        "askpass-none",
        format!(
            "{who} has no SSH_ASKPASS (and there is no /usr/bin/ssh-askpass): keys added with \
             ssh-add -c are refused."
        ),
    )]
}

/// The configuration of the token-agent `pid`: its `--config`, or the default path.
fn running_config(env: &Context, pid: i32) -> Option<PathBuf> {
    let args = platform::cmdline(pid).unwrap_or_default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    default_config(env)
}

/// `$XDG_CONFIG_HOME/token-agent/config.toml`, or `~/.config/token-agent/config.toml`.
fn default_config(env: &Context) -> Option<PathBuf> {
    env.var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env.home().map(|home| home.join(".config")))
        .map(|dir| dir.join("token-agent/config.toml"))
}

/// "DISPLAY=:0", when the environment has a graphical session.
fn has_display(env: &Context) -> Option<String> {
    ["WAYLAND_DISPLAY", "DISPLAY"].iter().find_map(|name| {
        env.var(name)
            .map(|value| format!("{name}={}", value.to_string_lossy()))
    })
}

/// `program` as the agent would run it: a path, or searched in its PATH.
fn resolve(env: &Context, program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 || program.is_absolute() {
        return is_executable(program).then(|| program.to_owned());
    }
    let path = env.var("PATH").map_or_else(
        || OsString::from("/usr/local/bin:/usr/bin:/bin"),
        OsString::from,
    );
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The program behind symbolic links (Debian's pinentry alternative).
fn real(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// pinentry-curses and pinentry-tty ask on a terminal; the others open a window.
fn is_terminal_pinentry(path: &Path) -> bool {
    let name = real(path)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.contains("curses") || name.contains("tty")
}

fn expand_home(env: &Context, path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), env.home()) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_owned(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_the_agents_path() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("my-pinentry");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        let env = Context::with_env(&[("PATH", dir.path().to_str().unwrap())]);
        assert_eq!(
            resolve(&env, Path::new("my-pinentry")),
            None,
            "not executable yet"
        );
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve(&env, Path::new("my-pinentry")),
            Some(program.clone())
        );
        assert_eq!(resolve(&env, &program), Some(program));
        assert_eq!(resolve(&env, Path::new("pinentry-nonexistent")), None);
    }

    #[test]
    fn curses_and_tty_pinentries_need_a_terminal() {
        assert!(is_terminal_pinentry(Path::new(
            "/nonexistent/pinentry-curses"
        )));
        assert!(is_terminal_pinentry(Path::new("/nonexistent/pinentry-tty")));
        assert!(!is_terminal_pinentry(Path::new(
            "/nonexistent/pinentry-gnome3"
        )));
    }
}
