//! Issue 17: what a package ships beside the binary, checked as shipped: the
//! man page and completions from `--generate-docs`, the systemd user units
//! and the environment.d file under dist/.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use token_agent_e2e::agent::keygen;
use token_agent_e2e::{agent_binary, check, stderr, stdout, wait_for};

/// The repository's dist/ folder.
fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// The value of `key=` in `text` (a unit file or an environment.d file); the
/// last one wins, as in systemd.
fn setting(text: &str, key: &str) -> Option<String> {
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .map(|value| value.trim().to_owned())
}

fn unit(name: &str) -> anyhow::Result<String> {
    let path = dist().join("systemd").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// The installed path of the binary in ExecStart, replaced by the one under test.
const INSTALLED: &str = "/usr/bin/token-agent";

#[test]
fn issue_17_generate_docs_writes_the_man_page_and_completions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("docs");
    let output = Command::new(agent_binary()?)
        .arg("--generate-docs")
        .arg(&out)
        .output()?;
    check(output, "token-agent --generate-docs")?;
    for name in [
        "token-agent.1",
        "token-agent.bash",
        "_token-agent",
        "token-agent.fish",
    ] {
        ensure!(out.join(name).is_file(), "{name} was not written");
    }
    let man = Command::new("man")
        .arg("-l")
        .arg(out.join("token-agent.1"))
        .env("LC_ALL", "C")
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "200")
        .output()
        .context("cannot run man (Debian's man-db)")?;
    let text = stdout(&man);
    ensure!(man.status.success(), "man -l: {}", stderr(&man));
    // The flags the binary's own help names are all in the page.
    let help = Command::new(agent_binary()?).arg("--help").output()?;
    let help = stdout(&help);
    let flags: Vec<&str> = help
        .split_whitespace()
        .map(|word| word.trim_end_matches(','))
        .filter(|word| word.len() == 2 && word.starts_with('-') && word != &"--")
        .collect();
    ensure!(flags.len() >= 14, "too few flags in --help: {flags:?}");
    for flag in flags {
        ensure!(text.contains(flag), "{flag} missing from the man page");
    }
    for subcommand in ["token-agent piv", "token-agent fido", "token-agent status"] {
        ensure!(text.contains(subcommand), "{subcommand} missing");
    }
    let bash = Command::new("bash")
        .arg("-n")
        .arg(out.join("token-agent.bash"))
        .output()?;
    check(bash, "bash -n on the bash completion")?;
    // Without a directory: a usage error.
    let bare = Command::new(agent_binary()?)
        .arg("--generate-docs")
        .output()?;
    ensure!(bare.status.code() == Some(2), "{bare:?}");
    Ok(())
}

#[test]
fn issue_17_the_units_exec_start_serves_the_socket_of_listen_stream() -> anyhow::Result<()> {
    let socket_unit = unit("token-agent.socket")?;
    let service_unit = unit("token-agent.service")?;
    let dir = tempfile::tempdir()?;
    let runtime = dir.path().join("run");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;

    // The socket systemd makes from ListenStream, with %t the runtime dir.
    let listen = setting(&socket_unit, "ListenStream").context("no ListenStream")?;
    ensure!(
        listen.starts_with("%t/"),
        "ListenStream {listen} is not under %t"
    );
    let socket = PathBuf::from(listen.replace("%t", &runtime.to_string_lossy()));
    ensure!(setting(&socket_unit, "SocketMode").as_deref() == Some("0600"));
    ensure!(setting(&socket_unit, "DirectoryMode").as_deref() == Some("0700"));
    // environment.d points SSH_AUTH_SOCK at that same socket.
    let environment = std::fs::read_to_string(dist().join("environment.d/50-token-agent.conf"))?;
    let auth_sock = setting(&environment, "SSH_AUTH_SOCK").context("no SSH_AUTH_SOCK")?;
    ensure!(
        auth_sock.replace("${XDG_RUNTIME_DIR}", &runtime.to_string_lossy())
            == socket.to_string_lossy(),
        "environment.d says {auth_sock}, the socket unit listens on {listen}"
    );
    // As systemd: the directory 0700.
    let parent = socket.parent().context("socket without a directory")?;
    std::fs::create_dir_all(parent)?;
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;

    // The service's ExecStart, with the binary under test in place of the installed one.
    let exec = setting(&service_unit, "ExecStart").context("no ExecStart")?;
    let mut words = exec.split_whitespace();
    ensure!(
        words.next() == Some(INSTALLED),
        "ExecStart {exec} does not run {INSTALLED}"
    );
    let args: Vec<&str> = words.collect();
    ensure!(
        args.contains(&"-D"),
        "ExecStart {exec} is not in the foreground"
    );

    let log = dir.path().join("stderr");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg("-E")
        .arg(format!("HOME={}", home.display()))
        .arg("-E")
        .arg(format!("XDG_CONFIG_HOME={}", home.display()))
        .arg("-E")
        .arg(format!("XDG_STATE_HOME={}", home.display()))
        .arg(agent_binary()?)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout"))?)
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("cannot run systemd-socket-activate (Debian's systemd package)")?;
    let log = || std::fs::read_to_string(&log).unwrap_or_default();
    ensure!(
        wait_for(Duration::from_secs(10), || socket.exists()),
        "{}",
        log()
    );

    // The first connection starts the agent, as systemd starts the service.
    let ssh_add = |args: &[&str]| {
        Command::new("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &socket)
            .env_remove("SSH_ASKPASS")
            .stdin(Stdio::null())
            .output()
    };
    let empty = ssh_add(&["-l"])?;
    let key = home.join("id");
    keygen(&key, "ed25519", "from-the-unit")?;
    let added = ssh_add(&[key.to_str().unwrap_or_default()])?;
    let listed = ssh_add(&["-l"])?;
    let _ = kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGTERM);
    if !wait_for(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        let _ = child.kill();
    }
    let status = child.wait()?;
    ensure!(
        empty.status.code() == Some(1) && stdout(&empty).contains("no identities"),
        "ssh-add -l on a fresh agent: {empty:?}\n{}",
        log()
    );
    check(added, "ssh-add through the unit's socket")?;
    ensure!(
        stdout(&listed).contains("from-the-unit"),
        "{}",
        stdout(&listed)
    );
    ensure!(status.code() == Some(0), "SIGTERM: {status:?}\n{}", log());
    ensure!(socket.exists(), "the agent removed the supervisor's socket");
    Ok(())
}

#[test]
fn issue_17_systemd_analyze_verifies_the_units() -> anyhow::Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian's systemd package)");
        return Ok(());
    }
    // The units as installed, with ExecStart naming the binary under test:
    // verify checks that the command exists.
    let dir = tempfile::tempdir()?;
    let units = dir.path().join("units");
    std::fs::create_dir_all(&units)?;
    let binary = agent_binary()?;
    for name in ["token-agent.socket", "token-agent.service"] {
        let text = unit(name)?.replace(INSTALLED, &binary.to_string_lossy());
        std::fs::write(units.join(name), text)?;
    }
    let runtime = dir.path().join("run");
    std::fs::create_dir_all(&runtime)?;
    let output = Command::new("systemd-analyze")
        // The man page is checked by the package test, where it is installed.
        .args(["--man=no", "verify", "--user"])
        .arg(units.join("token-agent.socket"))
        .arg(units.join("token-agent.service"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("HOME", dir.path())
        .output()?;
    // verify warns on unknown keys and bad values but still exits 0.
    let text = stderr(&output);
    let complaints: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("token-agent"))
        .collect();
    ensure!(
        output.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {:?}\n{}",
        output.status,
        text
    );
    Ok(())
}
