//! Bus addresses (the specification's "Server Addresses"): where the system
//! and session buses listen, and the `unix:` transport's two forms a client
//! connects to.

use std::path::PathBuf;

use crate::{Error, Result};

/// The system bus when DBUS_SYSTEM_BUS_ADDRESS does not say otherwise.
const SYSTEM_DEFAULT: &str = "unix:path=/var/run/dbus/system_bus_socket";

/// A socket a client can connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `unix:path=`: a socket in the file system.
    Path(PathBuf),
    /// `unix:abstract=`: a socket in Linux's abstract namespace (dbus-launch's).
    Abstract(Vec<u8>),
}

/// The system bus's address.
pub(crate) fn system() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| SYSTEM_DEFAULT.to_owned())
}

/// The session bus's address: DBUS_SESSION_BUS_ADDRESS, or the socket a
/// systemd user session keeps at `$XDG_RUNTIME_DIR/bus`.
pub(crate) fn session() -> Result<String> {
    if let Ok(address) = std::env::var("DBUS_SESSION_BUS_ADDRESS") {
        return Ok(address);
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").ok_or(Error::NoBus(
        "DBUS_SESSION_BUS_ADDRESS and XDG_RUNTIME_DIR are unset",
    ))?;
    let socket = PathBuf::from(runtime).join("bus");
    if !socket.exists() {
        return Err(Error::NoBus(
            "DBUS_SESSION_BUS_ADDRESS is unset and there is no $XDG_RUNTIME_DIR/bus",
        ));
    }
    Ok(format!("unix:path={}", escape(&socket.to_string_lossy())))
}

/// The endpoints of `address`, in the order to try them. Entries of other
/// transports (`tcp:`, `autolaunch:`, ...) are left out; an address with
/// none this client speaks is an error that names them.
pub(crate) fn parse(address: &str) -> Result<Vec<Endpoint>> {
    let refuse = |reason: String| Error::Address {
        address: address.to_owned(),
        reason,
    };
    let mut endpoints = Vec::new();
    let mut skipped = Vec::new();
    for entry in address.split(';').filter(|entry| !entry.is_empty()) {
        let (transport, keys) = entry
            .split_once(':')
            .ok_or_else(|| refuse(format!("{entry:?} names no transport")))?;
        if transport != "unix" {
            skipped.push(transport.to_owned());
            continue;
        }
        let mut endpoint = None;
        for pair in keys.split(',').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| refuse(format!("{pair:?} is not key=value")))?;
            let value = unescape(value).map_err(|why| refuse(why.to_owned()))?;
            match key {
                "path" => endpoint = Some(Endpoint::Path(PathBuf::from(bytes_to_path(value)))),
                "abstract" => endpoint = Some(Endpoint::Abstract(value)),
                // Listening forms, meaningless to a client.
                "dir" | "tmpdir" | "runtime" => {
                    skipped.push(format!("unix:{key}="));
                }
                _ => {}
            }
        }
        endpoints.extend(endpoint);
    }
    if endpoints.is_empty() {
        return Err(refuse(if skipped.is_empty() {
            "it lists no address".to_owned()
        } else {
            format!(
                "token-agent connects over unix:path= and unix:abstract= only, not {}",
                skipped.join(", ")
            )
        }));
    }
    Ok(endpoints)
}

fn bytes_to_path(bytes: Vec<u8>) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(bytes)
}

/// Undoes the address escaping: `%` and two hex digits stand for a byte.
fn unescape(value: &str) -> std::result::Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(byte) = bytes.next() {
        if byte != b'%' {
            out.push(byte);
            continue;
        }
        let digits = [bytes.next(), bytes.next()];
        let [Some(high), Some(low)] = digits else {
            return Err("a % escape without two hex digits");
        };
        let digit = |d: u8| char::from(d).to_digit(16);
        match (digit(high), digit(low)) {
            (Some(high), Some(low)) => out.push((high * 16 + low) as u8),
            _ => return Err("a % escape without two hex digits"),
        }
    }
    Ok(out)
}

/// Escapes a value for an address: every byte but `[-0-9A-Za-z_/.\]` as `%xx`.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_/.\\".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_paths_and_abstract_names_are_read_in_order() -> anyhow::Result<()> {
        assert_eq!(
            parse("unix:path=/run/user/1000/bus")?,
            [Endpoint::Path("/run/user/1000/bus".into())]
        );
        assert_eq!(
            parse("unix:abstract=/tmp/dbus-Ab%3d,guid=0123;unix:path=/tmp/a%20b")?,
            [
                Endpoint::Abstract(b"/tmp/dbus-Ab=".to_vec()),
                Endpoint::Path("/tmp/a b".into())
            ]
        );
        assert_eq!(
            parse("tcp:host=localhost,port=1;unix:path=/x")?,
            [Endpoint::Path("/x".into())]
        );
        Ok(())
    }

    #[test]
    fn addresses_without_a_client_endpoint_are_refused_with_the_reason() {
        let err = parse("tcp:host=localhost,port=1").map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("not tcp"), "{err}");
        assert!(parse("").is_err());
        assert!(parse("unix:path=/a%4").is_err());
        assert!(parse("nocolon").is_err());
        assert!(parse("unix:tmpdir=/tmp").is_err());
    }

    #[test]
    fn escaping_round_trips() -> anyhow::Result<()> {
        let path = "/run/user/1000/a b;c,d=%";
        let address = format!("unix:path={}", escape(path));
        assert_eq!(parse(&address)?, [Endpoint::Path(path.into())]);
        Ok(())
    }
}
