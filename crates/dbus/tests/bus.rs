//! The client against a real message bus: a private `dbus-daemon` per test,
//! with `dbus-send` as the other peer.

use std::process::Stdio;

use anyhow::Context;
use token_agent_dbus::{Body, Connection, Error, Kind, MatchRule, NameOwner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// A private bus (`dbus-daemon --session`) listening on `listen`, stopped
/// when dropped.
struct Daemon {
    child: tokio::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(listen: impl FnOnce(&std::path::Path) -> String) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address={}", listen(dir.path())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start dbus-daemon (Debian's dbus-daemon package)")?;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let mut printed = Vec::new();
        while !printed.ends_with(b"\n") {
            let mut byte = [0u8; 1];
            anyhow::ensure!(stdout.read(&mut byte).await? == 1, "dbus-daemon exited");
            printed.push(byte[0]);
        }
        let address = String::from_utf8(printed)?.trim().to_owned();
        Ok(Self {
            child,
            address,
            _dir: dir,
        })
    }

    async fn path() -> anyhow::Result<Self> {
        Self::start(|dir| format!("unix:path={}/bus", dir.display())).await
    }

    /// Runs `dbus-send` on this bus; its output, or its error output as the
    /// error.
    async fn send(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("dbus-send")
            .arg(format!("--bus={}", self.address))
            .args(args)
            .output()
            .await?;
        anyhow::ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }
}

/// Asks the bus for its id (`org.freedesktop.DBus.GetId`).
async fn bus_id(bus: &Connection) -> token_agent_dbus::Result<token_agent_dbus::Message> {
    bus.call(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetId",
        &Body::new(),
    )
    .await
}

#[tokio::test]
async fn calls_get_their_replies_and_errors() -> anyhow::Result<()> {
    let daemon = Daemon::path().await?;
    let bus = Connection::connect(&daemon.address).await?;
    assert!(bus.unique_name().starts_with(':'), "{}", bus.unique_name());

    let id = bus_id(&bus).await?.str_argument()?;
    assert_eq!(id.len(), 32, "{id}");

    let missing = bus
        .call(
            "org.example.Missing",
            "/org/example/Missing",
            "org.example.Missing",
            "Nothing",
            &Body::new().u32(1),
        )
        .await;
    match missing {
        Err(Error::Remote { name, .. }) => {
            assert_eq!(name, "org.freedesktop.DBus.Error.ServiceUnknown");
        }
        other => anyhow::bail!("expected ServiceUnknown, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn signals_reach_only_the_subscriptions_whose_rules_match() -> anyhow::Result<()> {
    let daemon = Daemon::path().await?;
    let bus = Connection::connect(&daemon.address).await?;
    let mut exact = bus
        .subscribe(vec![MatchRule::signal()
            .interface("org.example.Lock")
            .member("Changed")
            .path("/org/example/one")])
        .await?;
    let mut below = bus
        .subscribe(vec![MatchRule::signal()
            .interface("org.example.Lock")
            .path_namespace("/org/example")])
        .await?;
    for (path, member, value) in [
        (
            "/org/example/two",
            "org.example.Lock.Changed",
            "boolean:true",
        ),
        ("/org/example/one", "org.example.Lock.Other", "boolean:true"),
        ("/org/examples", "org.example.Lock.Changed", "boolean:true"),
        (
            "/org/example/one",
            "org.example.Lock.Changed",
            "boolean:false",
        ),
    ] {
        daemon.send(&["--type=signal", path, member, value]).await?;
    }
    let signal = exact.next().await.context("no signal")?;
    assert_eq!(signal.kind(), Kind::Signal);
    assert_eq!(
        (signal.path(), signal.member()),
        (Some("/org/example/one"), Some("Changed"))
    );
    assert!(!signal.bool_argument()?);

    let mut seen = Vec::new();
    for _ in 0..3 {
        let signal = below.next().await.context("no signal")?;
        seen.push(format!(
            "{} {}",
            signal.path().unwrap_or_default(),
            signal.member().unwrap_or_default()
        ));
    }
    assert_eq!(
        seen,
        [
            "/org/example/two Changed",
            "/org/example/one Other",
            "/org/example/one Changed"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn other_peers_get_answers_to_ping_and_to_unknown_methods() -> anyhow::Result<()> {
    let daemon = Daemon::path().await?;
    let bus = Connection::connect(&daemon.address).await?;
    let name = bus.unique_name();
    daemon
        .send(&[
            "--print-reply",
            &format!("--dest={name}"),
            "/",
            "org.freedesktop.DBus.Peer.Ping",
        ])
        .await?;
    let unknown = daemon
        .send(&[
            "--print-reply",
            &format!("--dest={name}"),
            "/",
            "org.example.Nothing.Here",
        ])
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("org.freedesktop.DBus.Error.UnknownMethod"),
        "{unknown}"
    );
    Ok(())
}

/// A signal sent straight to a connection passes its match rules, the
/// sender's too; [`NameOwner`] tells the name's owner from anyone else, and
/// follows the name to a new owner and to none.
#[tokio::test]
async fn only_a_names_owner_is_taken_for_it() -> anyhow::Result<()> {
    const NAME: &str = "org.example.Saver";
    let daemon = Daemon::path().await?;
    let bus = Connection::connect(&daemon.address).await?;
    let mut signals = bus
        .subscribe(vec![
            NameOwner::rule(NAME),
            MatchRule::signal().sender(NAME).interface(NAME),
        ])
        .await?;
    let mut saver = NameOwner::query(&bus, NAME).await?;
    assert_eq!(saver.owner(), None);

    // The reference implementation owns the name and sends as its owner.
    let owner = zbus::connection::Builder::address(daemon.address.as_str())?
        .name(NAME)?
        .build()
        .await?;
    let changed = signals.next().await.context("no NameOwnerChanged")?;
    assert!(saver.update(&changed));
    let owner_name = owner.unique_name().context("no unique name")?.to_string();
    assert_eq!(saver.owner(), Some(owner_name.as_str()));

    // Another peer: its broadcast never arrives; sent straight to us, it
    // does, and is not the owner's.
    daemon
        .send(&["--type=signal", "/", &format!("{NAME}.Broadcast")])
        .await?;
    daemon
        .send(&[
            "--type=signal",
            &format!("--dest={}", bus.unique_name()),
            "/",
            &format!("{NAME}.Direct"),
        ])
        .await?;
    let forged = signals.next().await.context("no signal")?;
    assert_eq!(forged.member(), Some("Direct"));
    assert!(!saver.update(&forged));
    assert!(!saver.sent(&forged));

    owner
        .emit_signal(None::<&str>, "/", NAME, "ActiveChanged", &(true,))
        .await?;
    let real = signals.next().await.context("no signal")?;
    assert_eq!(real.member(), Some("ActiveChanged"));
    assert!(!saver.update(&real));
    assert!(saver.sent(&real));

    drop(owner);
    let gone = signals.next().await.context("no NameOwnerChanged")?;
    assert!(saver.update(&gone));
    assert_eq!(saver.owner(), None);
    assert!(!saver.sent(&real));
    Ok(())
}

#[tokio::test]
async fn abstract_socket_addresses_connect() -> anyhow::Result<()> {
    let daemon = Daemon::start(|dir| {
        format!(
            "unix:abstract=token-agent-dbus-test{}",
            dir.display().to_string().replace('/', "-")
        )
    })
    .await?;
    assert!(daemon.address.starts_with("unix:abstract="));
    let bus = Connection::connect(&daemon.address).await?;
    assert!(bus.unique_name().starts_with(':'));
    Ok(())
}

#[tokio::test]
async fn a_bus_that_goes_away_ends_subscriptions_and_fails_calls() -> anyhow::Result<()> {
    let mut daemon = Daemon::path().await?;
    let bus = Connection::connect(&daemon.address).await?;
    let mut signals = bus
        .subscribe(vec![MatchRule::signal().interface("org.example.Lock")])
        .await?;
    assert!(!bus.is_closed());
    daemon.child.kill().await?;
    assert!(signals.next().await.is_none());
    assert!(bus.is_closed());
    let call = bus_id(&bus).await;
    assert!(matches!(call, Err(Error::Disconnected)), "{call:?}");
    Ok(())
}

#[tokio::test]
async fn a_missing_socket_names_its_path() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("no-bus");
    let err = Connection::connect(&format!("unix:path={}", path.display()))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    Ok(())
}

/// A socket that answers the handshake with `answer`, then sends `then`.
async fn fake_bus(
    answer: &'static [u8],
    then: &'static [u8],
) -> anyhow::Result<(String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bus");
    let listener = tokio::net::UnixListener::bind(&path)?;
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut line = [0u8; 256];
        let _ = stream.read(&mut line).await;
        let _ = stream.write_all(answer).await;
        let _ = stream.read(&mut line).await;
        let _ = stream.write_all(then).await;
        let _ = stream.read(&mut line).await;
    });
    Ok((format!("unix:path={}", path.display()), dir))
}

#[tokio::test]
async fn a_refused_handshake_says_what_the_bus_answered() -> anyhow::Result<()> {
    let (address, _dir) = fake_bus(b"REJECTED EXTERNAL\r\n", b"").await?;
    let err = Connection::connect(&address).await.map(|_| ()).unwrap_err();
    assert!(matches!(err, Error::Auth(_)), "{err:?}");
    assert!(err.to_string().contains("REJECTED EXTERNAL"), "{err}");
    Ok(())
}

#[tokio::test]
async fn garbage_from_the_bus_fails_the_connection_cleanly() -> anyhow::Result<()> {
    let (address, _dir) = fake_bus(
        b"OK 0123456789abcdef0123456789abcdef\r\n",
        b"xxxxxxxxxxxxxxxxxxxxxxxx",
    )
    .await?;
    let err = Connection::connect(&address).await.map(|_| ()).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
    assert!(err.to_string().contains("endianness"), "{err}");
    Ok(())
}
