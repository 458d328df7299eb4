use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use token_agent_e2e::agent::{keygen, Agent, AgentOptions};
use token_agent_e2e::{agent_binary, check, running, stderr, stdout, wait_for};

/// Compares `actual` with the snapshot file `name`; UPDATE_SNAPSHOTS=1 rewrites it.
pub(crate) fn snapshot(name: &str, actual: &str) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual)?;
        return Ok(());
    }
    let expected = std::fs::read_to_string(&path)?;
    assert_eq!(
        actual, expected,
        "{name} changed; review it and run with UPDATE_SNAPSHOTS=1 to accept"
    );
    Ok(())
}

fn token_agent(dir: &Path) -> anyhow::Result<Command> {
    Ok(isolated(agent_binary()?, dir))
}

/// `program` with HOME, TMPDIR and the XDG directories in `dir`, and no agent.
fn isolated(program: impl AsRef<std::ffi::OsStr>, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .env("XDG_STATE_HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("SSH_AGENT_PID");
    command
}

fn variable(text: &str, name: &str) -> Option<String> {
    text.split(&format!("{name}="))
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .map(str::to_owned)
}

#[test]
fn background_start_prints_the_environment_and_k_kills() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let output = check(
        token_agent(dir.path())?.arg("-s").output()?,
        "token-agent -s",
    )?;
    let text = stdout(&output);
    let socket = variable(&text, "SSH_AUTH_SOCK").unwrap_or_default();
    let pid = variable(&text, "SSH_AGENT_PID").unwrap_or_default();
    assert!(text.contains("export SSH_AUTH_SOCK;"), "{text}");
    assert!(
        text.ends_with(&format!("echo Agent pid {pid};\n")),
        "{text}"
    );
    let listed = Command::new("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", &socket)
        .output()?;
    assert!(stdout(&listed).contains("The agent has no identities."));

    let killed = check(
        token_agent(dir.path())?
            .arg("-k")
            .env("SSH_AGENT_PID", &pid)
            .output()?,
        "token-agent -k",
    )?;
    assert_eq!(
        stdout(&killed),
        format!("unset SSH_AUTH_SOCK;\nunset SSH_AGENT_PID;\necho Agent pid {pid} killed;\n")
    );
    let pid: i32 = pid.parse()?;
    assert!(wait_for(Duration::from_secs(10), || !running(pid)));
    assert!(wait_for(Duration::from_secs(5), || !Path::new(&socket).exists()));
    Ok(())
}

#[test]
fn c_shell_output() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = stdout(&check(
        token_agent(dir.path())?.arg("-c").output()?,
        "token-agent -c",
    )?);
    assert!(text.starts_with("setenv SSH_AUTH_SOCK "), "{text}");
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("setenv SSH_AGENT_PID "))
        .and_then(|p| p.strip_suffix(';'))
        .unwrap_or_default()
        .to_owned();
    check(
        token_agent(dir.path())?
            .args(["-k", "-c"])
            .env("SSH_AGENT_PID", &pid)
            .output()?,
        "token-agent -k -c",
    )?;
    Ok(())
}

#[test]
fn command_mode_runs_the_command_and_exits_with_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("id");
    keygen(&key, "ed25519", "command-mode")?;
    let script = format!(
        "ssh-add -q {} && ssh-add -l && echo pid=$SSH_AGENT_PID",
        key.display()
    );
    let output = check(
        token_agent(dir.path())?
            .args(["sh", "-c", &script])
            .output()?,
        "token-agent sh -c",
    )?;
    let text = stdout(&output);
    assert!(text.contains("command-mode (ED25519)"), "{text}");
    let pid: i32 = text
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap_or_default()
        .parse()?;
    assert!(
        wait_for(Duration::from_secs(10), || !running(pid)),
        "the agent outlived its command"
    );
    Ok(())
}

#[test]
fn a_broken_config_names_the_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[prompt]\npin_prompt = \"carrier-pigeon\"\n")?;
    let output = token_agent(dir.path())?
        .arg("-D")
        .arg("-a")
        .arg(dir.path().join("s"))
        .arg("--config")
        .arg(&config)
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output).replace(&dir.path().display().to_string(), "DIR");
    snapshot("config-error.txt", &text)?;
    Ok(())
}

#[test]
fn background_start_reports_a_failure() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let occupied = dir.path().join("occupied");
    std::fs::write(&occupied, "")?;
    let output = token_agent(dir.path())?.arg("-a").arg(&occupied).output()?;
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output).replace(&dir.path().display().to_string(), "DIR");
    snapshot("bind-error.txt", &text)?;
    Ok(())
}

#[test]
fn usage_errors_and_help_text() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let help = stdout(&token_agent(dir.path())?.arg("--help").output()?);
    snapshot("help.txt", &help)?;
    let bad_time = token_agent(dir.path())?
        .args(["-t", "10x", "-D"])
        .output()?;
    assert_eq!(bad_time.status.code(), Some(1));
    snapshot("bad-lifetime.txt", &stderr(&bad_time))?;
    let kill = token_agent(dir.path())?.arg("-k").output()?;
    assert_eq!(kill.status.code(), Some(1));
    snapshot("kill-without-pid.txt", &stderr(&kill))?;
    Ok(())
}

#[test]
fn issue_12_a_second_agent_on_a_live_socket_leaves_it_alone() -> anyhow::Result<()> {
    let first = Agent::start(AgentOptions::default())?;
    let key = first.dir().join("id");
    keygen(&key, "ed25519", "still-here")?;
    check(first.ssh_add([&key])?, "ssh-add")?;
    for foreground in ["-D", "-d"] {
        let second = token_agent(first.dir())?
            .arg(foreground)
            .arg("-a")
            .arg(first.socket())
            .output()?;
        assert_eq!(second.status.code(), Some(1));
        assert!(
            stderr(&second).contains("Address already in use"),
            "{}",
            stderr(&second)
        );
    }
    // And in the background, as `eval $(token-agent -a S)` starts it.
    let background = token_agent(first.dir())?
        .arg("-a")
        .arg(first.socket())
        .output()?;
    assert_eq!(background.status.code(), Some(1));
    assert!(
        first.socket().exists(),
        "the first agent's socket was removed"
    );
    let listed = check(first.ssh_add(["-l"])?, "ssh-add -l on the first agent")?;
    assert!(
        stdout(&listed).contains("still-here"),
        "{}",
        stdout(&listed)
    );
    Ok(())
}

#[test]
fn issue_12_e_md5_shows_md5_fingerprints() -> anyhow::Result<()> {
    let agent = Agent::start(AgentOptions {
        args: vec!["-E".into(), "md5".into()],
        ..AgentOptions::default()
    })?;
    let key = agent.dir().join("id");
    keygen(&key, "ecdsa-256", "md5-key")?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    let expected = stdout(&check(
        Command::new("ssh-keygen")
            .args(["-l", "-E", "md5", "-f"])
            .arg(key.with_extension("pub"))
            .output()?,
        "ssh-keygen -l -E md5",
    )?);
    let md5 = expected
        .split_whitespace()
        .find(|word| word.starts_with("MD5:"))
        .unwrap_or_default()
        .to_owned();
    assert_eq!(md5.len(), "MD5:".len() + 16 * 3 - 1, "{expected}");
    let message = agent.dir().join("message");
    std::fs::write(&message, "md5")?;
    let public = key.with_extension("pub");
    check(
        token_agent_e2e::sign_file(agent.command("ssh-keygen"), &public, &message).output()?,
        "ssh-keygen -Y sign",
    )?;
    let log = agent.log_text();
    assert!(log.contains(&format!("key={md5}")), "{md5} not in\n{log}");
    // Any case, as OpenSSH; other names are refused with the valid ones.
    let dir = tempfile::tempdir()?;
    let upper = token_agent(dir.path())?
        .args(["-E", "MD5", "-k"])
        .output()?;
    assert!(
        !stderr(&upper).contains("fingerprint hash"),
        "{}",
        stderr(&upper)
    );
    let bad = token_agent(dir.path())?
        .args(["-E", "crc32", "-D"])
        .output()?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains(
            "invalid fingerprint hash \"crc32\": use md5, sha1, sha256, sha384 or sha512"
        ),
        "{}",
        stderr(&bad)
    );
    Ok(())
}

/// Socket paths a shell would split, expand or run if printed bare, and one
/// a line-based handoff from the background agent would cut.
fn awkward_socket_paths(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    let names: [&[u8]; 6] = [
        b"sp ace/s",
        b"it's a \"socket\"",
        b"a$HOME`id`;b",
        b"back\\slash and\ttab",
        b"caf\xe9!",
        b"new\nline",
    ];
    let mut paths = Vec::new();
    for name in names {
        let path = dir.join(std::ffi::OsStr::from_bytes(name));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        paths.push(path);
    }
    Ok(paths)
}

/// Stops the agent with this pid (as printed) when dropped, however the test ends.
struct StopOnDrop(String);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        stop_printed_agent(&self.0);
    }
}

/// Stops the agent a test started, by the pid it printed (the last line of
/// `printed` that is a number: warnings may come before it), if it still runs.
fn stop_printed_agent(printed: &str) {
    let pid = printed
        .lines()
        .rev()
        .find_map(|line| line.trim().parse::<i32>().ok());
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

#[test]
fn socket_paths_survive_eval_in_sh_and_csh_background_and_foreground() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir()?;
    let binary = agent_binary()?;
    // A C shell is checked where one is installed.
    let csh = ["tcsh", "csh"].into_iter().find(|shell| {
        Command::new("sh")
            .args(["-c", &format!("command -v {shell}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let lines_file = dir.path().join("lines");
    for socket in awkward_socket_paths(dir.path())? {
        let bytes = socket.as_os_str().as_bytes();
        let shown = socket.display();
        // A C shell's eval "`...`" turns every newline into a space.
        let csh = csh.filter(|_| !bytes.contains(&b'\n'));

        // In the background, as a login script starts it.
        let output = isolated("sh", dir.path())
            .args([
                "-c",
                r#"eval "$("$1" -s -a "$2")" >/dev/null
                   printf '%s\n' "$SSH_AGENT_PID" >&2
                   ssh-add -l >/dev/null 2>&1
                   [ $? -le 1 ] || exit 1
                   printf %s "$SSH_AUTH_SOCK""#,
                "sh",
            ])
            .arg(&binary)
            .arg(&socket)
            .output()?;
        let agent = StopOnDrop(stderr(&output));
        let output = check(
            output,
            &format!("sh: eval \"$(token-agent -s -a {shown:?})\" and ssh-add -l"),
        )?;
        assert_eq!(output.stdout, bytes, "sh, background, {shown:?}");
        // The next agent binds the same path.
        drop(agent);
        anyhow::ensure!(
            wait_for(Duration::from_secs(30), || !socket.exists()),
            "the agent on {shown:?} did not stop and remove its socket"
        );

        if let Some(csh) = csh {
            let output = check(
                token_agent(dir.path())?
                    .arg("-c")
                    .arg("-a")
                    .arg(&socket)
                    .output()?,
                &format!("token-agent -c -a {shown:?}"),
            )?;
            let agent = StopOnDrop(
                stdout(&output)
                    .split("setenv SSH_AGENT_PID ")
                    .nth(1)
                    .and_then(|rest| rest.split(';').next())
                    .unwrap_or_default()
                    .to_owned(),
            );
            std::fs::write(&lines_file, &output.stdout)?;
            let seen = isolated(csh, dir.path())
                .args([
                    "-f",
                    "-c",
                    "eval \"`cat $LINES`\" >/dev/null; printf %s \"$SSH_AUTH_SOCK\"",
                ])
                .env("LINES", &lines_file)
                .output()?;
            assert_eq!(seen.stdout, bytes, "csh, background, {shown:?}");
            drop(agent);
            anyhow::ensure!(
                wait_for(Duration::from_secs(30), || !socket.exists()),
                "the agent on {shown:?} did not stop and remove its socket"
            );
        }

        // In the foreground: the lines come first, then the agent serves on.
        for (flag, shell) in [("-s", Some("sh")), ("-c", csh)] {
            let Some(shell) = shell else { continue };
            let mut agent = token_agent(dir.path())?
                .args(["-D", flag, "-a"])
                .arg(&socket)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let mut lines = Vec::new();
            if let Some(stdout) = agent.stdout.take() {
                let mut reader = BufReader::new(stdout);
                loop {
                    let start = lines.len();
                    if reader.read_until(b'\n', &mut lines)? == 0
                        || lines[start..].starts_with(b"echo Agent pid")
                    {
                        break;
                    }
                }
            }
            std::fs::write(&lines_file, &lines)?;
            let args = if flag == "-s" {
                [
                    "-c",
                    r#"eval "$(cat "$LINES")" >/dev/null; printf %s "$SSH_AUTH_SOCK""#,
                    "",
                ]
            } else {
                [
                    "-f",
                    "-c",
                    "eval \"`cat $LINES`\" >/dev/null; printf %s \"$SSH_AUTH_SOCK\"",
                ]
            };
            let seen = isolated(shell, dir.path())
                .args(args.into_iter().filter(|arg| !arg.is_empty()))
                .env("LINES", &lines_file)
                .output()?;
            stop_printed_agent(&agent.id().to_string());
            let _ = agent.wait();
            assert_eq!(
                seen.stdout,
                bytes,
                "{shell}, foreground, {shown:?}, lines {:?}",
                String::from_utf8_lossy(&lines)
            );
        }
    }
    Ok(())
}

#[test]
fn background_agent_leaves_no_pipe_behind_and_a_helper_that_warns_still_answers(
) -> anyhow::Result<()> {
    use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE, PIN};
    // A token with a key the PKCS#11 helper skips with a warning on its
    // standard error (secp256k1), next to one it offers.
    let hsm = SoftHsm::new()?;
    hsm.token("warns", &[KeyKind::P256])?;
    check(
        Command::new("pkcs11-tool")
            .envs(hsm.env())
            .args(["--module", MODULE, "--token-label", "warns", "--login"])
            .args(["--pin", PIN, "--keypairgen", "--key-type", "EC:secp256k1"])
            .args(["--id", "0b", "--label", "k1"])
            .output()?,
        "pkcs11-tool --keypairgen secp256k1",
    )?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    let output = check(
        token_agent(dir.path())?
            .envs(hsm.env())
            .args(["-s", "-a"])
            .arg(&socket)
            .output()?,
        "token-agent -s",
    )?;
    let pid = variable(&stdout(&output), "SSH_AGENT_PID").unwrap_or_default();
    let _agent = StopOnDrop(pid.clone());
    let fd = |n: u32| std::fs::read_link(format!("/proc/{pid}/fd/{n}"));
    assert_eq!(fd(0)?, Path::new("/dev/null"));
    assert_eq!(fd(1)?, Path::new("/dev/null"));
    let log = dir.path().join("token-agent/agent.log");
    assert_eq!(fd(2)?, log, "standard error goes to the log");

    let askpass = dir.path().join("askpass");
    token_agent_e2e::write_script(&askpass, &format!("echo {PIN}"))?;
    let mut add = Command::new("ssh-add")
        .args(["-s", MODULE])
        .env("SSH_AUTH_SOCK", &socket)
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut status = None;
    wait_for(Duration::from_secs(20), || {
        status = add.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = add.kill();
        let _ = add.wait();
    }
    assert!(
        status.is_some_and(|status| status.success()),
        "ssh-add -s: {status:?}"
    );
    let listed = Command::new("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", &socket)
        .output()?;
    assert!(stdout(&listed).contains("warns"), "{}", stdout(&listed));
    let log = std::fs::read_to_string(&log)?;
    assert!(
        log.contains("pkcs11 helper: skipping an object"),
        "the helper's warning is not in the log:\n{log}"
    );
    Ok(())
}

#[test]
fn e_sha1_and_sha384_show_those_fingerprints() -> anyhow::Result<()> {
    for (hash, prefix) in [("sha1", "SHA1:"), ("sha384", "SHA384:")] {
        let agent = Agent::start(AgentOptions {
            args: vec!["-E".into(), hash.into()],
            ..AgentOptions::default()
        })?;
        let key = agent.dir().join("id");
        keygen(&key, "ed25519", hash)?;
        check(agent.ssh_add([&key])?, "ssh-add")?;
        let public = key.with_extension("pub");
        let expected = stdout(&check(
            Command::new("ssh-keygen")
                .args(["-l", "-E", hash, "-f"])
                .arg(&public)
                .output()?,
            "ssh-keygen -l -E",
        )?);
        let fingerprint = expected
            .split_whitespace()
            .find(|word| word.starts_with(prefix))
            .unwrap_or_default()
            .to_owned();
        let message = agent.dir().join("message");
        std::fs::write(&message, hash)?;
        check(
            token_agent_e2e::sign_file(agent.command("ssh-keygen"), &public, &message).output()?,
            "ssh-keygen -Y sign",
        )?;
        let log = agent.log_text();
        assert!(
            !fingerprint.is_empty() && log.contains(&format!("key={fingerprint}")),
            "{fingerprint:?} not in\n{log}"
        );
    }
    Ok(())
}

#[test]
fn t_0_means_no_lifetime_and_t_1_5_one_second_as_openssh() -> anyhow::Result<()> {
    let forever = Agent::start(AgentOptions {
        args: vec!["-t".into(), "0".into()],
        ..AgentOptions::default()
    })?;
    let brief = Agent::start(AgentOptions {
        args: vec!["-t".into(), "1.5".into()],
        ..AgentOptions::default()
    })?;
    let key = forever.dir().join("id");
    keygen(&key, "ed25519", "lifetime")?;
    check(forever.ssh_add([&key])?, "ssh-add to -t 0")?;
    check(brief.ssh_add([&key])?, "ssh-add to -t 1.5")?;
    assert!(
        wait_for(Duration::from_secs(10), || brief
            .listed()
            .is_ok_and(|keys| keys.is_empty())),
        "the key outlived -t 1.5"
    );
    assert_eq!(forever.listed()?.len(), 1, "-t 0 gave the key a lifetime");
    Ok(())
}

/// Starts `command` (a background start) and checks the agent it printed
/// answers, then stops it; returns what it said on stderr.
fn starts_in_the_background(mut command: Command, socket: &Path) -> anyhow::Result<String> {
    let output = check(command.output()?, "token-agent -s")?;
    let pid = variable(&stdout(&output), "SSH_AGENT_PID").unwrap_or_default();
    let listed = Command::new("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", socket)
        .output();
    stop_printed_agent(&pid);
    let listed = listed?;
    assert!(
        stdout(&listed).contains("The agent has no identities."),
        "the agent does not answer: {}",
        stderr(&listed)
    );
    Ok(stderr(&output))
}

#[test]
fn background_agent_starts_without_a_log_file_and_says_so() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // HOME is a file: no log directory can be made under it.
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("home-is-a-file");
    std::fs::write(&home, "")?;
    let socket = dir.path().join("s");
    let mut command = token_agent(dir.path())?;
    command
        .env("HOME", &home)
        .env_remove("XDG_STATE_HOME")
        .args(["-s", "-a"])
        .arg(&socket);
    let said = starts_in_the_background(command, &socket)?;
    assert!(
        said.starts_with("token-agent: warning: cannot create the log directory")
            && (said.contains("logging to syslog instead") || said.contains("logs nothing")),
        "{said}"
    );

    // As a user whose passwd home does not exist, without HOME: the log
    // would go under the passwd entry's home, which cannot be made.
    if !nix::unistd::getuid().is_root() {
        eprintln!("not root: the run as nobody is left out");
        return Ok(());
    }
    let shared = tempfile::tempdir()?;
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777))?;
    let binary = shared.path().join("token-agent");
    std::fs::copy(agent_binary()?, &binary)?;
    let socket = shared.path().join("s");
    let mut command = isolated("setpriv", shared.path());
    command
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&binary)
        .args(["-s", "-a"])
        .arg(&socket)
        .env_remove("HOME")
        .env_remove("XDG_STATE_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .current_dir(shared.path());
    let said = starts_in_the_background(command, &socket)?;
    assert!(
        said.contains("/nonexistent/.local/state/token-agent"),
        "the passwd entry's home is not where the log was tried: {said}"
    );
    Ok(())
}

/// The processes `pid` started (any of its threads).
fn children(pid: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn a_helper_the_background_agent_starts_at_once_writes_to_the_log() -> anyhow::Result<()> {
    use token_agent_e2e::softhsm::{KeyKind, SoftHsm, MODULE};
    // A module in the configuration: its helper starts as soon as the
    // backends do, which once raced the agent's letting go of its pipes.
    let hsm = SoftHsm::new()?;
    hsm.token("at-once", &[KeyKind::P256])?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[[pkcs11.modules]]\npath = \"{MODULE}\"\n"),
    )?;
    let log = dir.path().join("token-agent/agent.log");
    // The race was lost about one start in five.
    for round in 0..20 {
        // Each agent its own socket: one stopped while its helper starts
        // may take seconds to go.
        let socket = dir.path().join(format!("s{round}"));
        let output = check(
            token_agent(dir.path())?
                .envs(hsm.env())
                .arg("--config")
                .arg(&config)
                .args(["-s", "-a"])
                .arg(&socket)
                .output()?,
            "token-agent -s",
        )?;
        let pid = variable(&stdout(&output), "SSH_AGENT_PID").unwrap_or_default();
        let mut helpers = Vec::new();
        wait_for(Duration::from_secs(10), || {
            helpers = children(&pid);
            !helpers.is_empty()
        });
        // (A process that is already gone is left out.)
        let stderrs: Vec<_> = helpers
            .iter()
            .filter_map(|helper| std::fs::read_link(format!("/proc/{helper}/fd/2")).ok())
            .collect();
        stop_printed_agent(&pid);
        assert!(!helpers.is_empty(), "no helper started");
        for stderr in stderrs {
            assert_eq!(stderr, log, "a helper's stderr is not the log");
        }
    }
    Ok(())
}

#[test]
fn the_background_agent_logs_each_signature_at_info_with_its_time() -> anyhow::Result<()> {
    let mut agent = Agent::start_background(AgentOptions::default())?;
    let pid = i32::try_from(agent.pid().context("no pid")?)?;
    let key = agent.dir().join("id");
    keygen(&key, "ed25519", "audited")?;
    check(agent.ssh_add([&key])?, "ssh-add")?;
    let message = agent.dir().join("message");
    std::fs::write(&message, "signed in the background\n")?;
    check(
        agent
            .command("ssh-keygen")
            .args(["-Y", "sign", "-n", "file", "-f"])
            .arg(&key)
            .arg(&message)
            .output()?,
        "ssh-keygen -Y sign",
    )?;
    // The default log file under the agent's HOME, at the default level;
    // the audit line follows the answer.
    agent.log_shows("signed key=SHA256:");
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|line| line.contains("signed key=SHA256:"))
        .with_context(|| format!("no audit line in the log:\n{log}"))?;
    let (time, rest) = line.split_once(' ').unwrap_or_default();
    assert!(
        time.len() > 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{line}"
    );
    assert!(rest.trim_start().starts_with("INFO "), "{line}");
    assert!(line.contains("comment=\"audited\""), "{line}");
    assert!(
        !log.contains(" DEBUG "),
        "debug lines at the default level:\n{log}"
    );
    agent.stop()?;
    assert!(!running(pid), "the agent outlived SIGTERM");
    Ok(())
}
