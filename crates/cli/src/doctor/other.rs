//! Systems without /proc and SO_PEERCRED: the listening process stays unknown.

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::socket::Process;

/// Unknown here.
pub(crate) fn server_process(_stream: &UnixStream, _path: &Path) -> Option<Process> {
    None
}

/// Unknown here.
pub(crate) fn process(_pid: i32) -> Option<Process> {
    None
}

/// Unknown here.
pub(crate) fn environ(_pid: i32) -> Option<Vec<(OsString, OsString)>> {
    None
}

/// Unknown here.
pub(crate) fn cmdline(_pid: i32) -> Option<Vec<OsString>> {
    None
}

/// Unknown here.
pub(crate) fn stdin_is_terminal(_pid: i32) -> bool {
    false
}
