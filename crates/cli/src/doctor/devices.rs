//! What the hardware backends need from the system: pcscd for PIV YubiKeys
//! and smart cards, udev rules for FIDO keys and CCID readers.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{Check, Context, Finding};

/// Our rules file, as the README installs it.
pub(crate) const RULES: &str = "70-token-agent.rules";
/// The README's install command, run from a token-agent checkout.
pub(crate) const INSTALL_RULES: &str = "sudo install -m 0644 udev/70-token-agent.rules \
     /etc/udev/rules.d/ && sudo udevadm control --reload && sudo udevadm trigger (from a \
     token-agent checkout)";

/// Rules files that give the seat's user FIDO HID devices: ours, libfido2's
/// and libu2f-udev's, and systemd's (244 and later: 60-fido-id.rules marks
/// FIDO tokens, which 70-uaccess.rules then hands to the user).
const FIDO_RULES: &[&str] = &[
    RULES,
    "70-u2f.rules",
    "70-old-u2f.rules",
    "60-fido-id.rules",
];
/// Rules files for CCID smart-card readers: ours, and libccid's (for pcscd).
const CCID_RULES: &[&str] = &[RULES, "92-libccid.rules"];

/// pcscd listening on its socket.
pub(crate) fn check_pcscd(context: &Context) -> Vec<Finding> {
    let check = Check::Pcscd;
    let socket = context.pcscd_socket();
    let shown = context.show(&socket);
    match UnixStream::connect(&socket) {
        Ok(_) => vec![Finding::ok(
            check,
            "pcscd-running",
            format!("pcscd is running ({shown})."),
        )],
        Err(err) => {
            let why = match err.kind() {
                std::io::ErrorKind::NotFound => format!("there is no {shown}"),
                std::io::ErrorKind::ConnectionRefused => format!("nothing listens on {shown}"),
                _ => format!("cannot connect to {shown}: {err}"),
            };
            let custom = context.var("PCSCLITE_CSOCK_NAME").is_some();
            let fix = if custom {
                "start the pcscd that PCSCLITE_CSOCK_NAME names, or unset PCSCLITE_CSOCK_NAME"
                    .to_owned()
            } else if installed("pcscd") {
                "sudo systemctl enable --now pcscd.socket".to_owned()
            } else {
                "sudo apt install pcscd (Fedora: sudo dnf install pcsc-lite; Arch: sudo pacman -S \
                 pcsclite), then sudo systemctl enable --now pcscd.socket"
                    .to_owned()
            };
            vec![Finding::warning(
                check,
                "pcscd-not-running",
                format!(
                    "pcscd is not running ({why}): token-agent cannot \
                     see PIV YubiKeys or smart cards."
                ),
            )
            .fix(fix)]
        }
    }
}

/// udev rules that let the logged-in user open FIDO keys and CCID readers.
pub(crate) fn check_udev(context: &Context) -> Vec<Finding> {
    let check = Check::Udev;
    let dirs = context.udev_dirs();
    let looked = dirs
        .iter()
        .map(|dir| context.show(dir))
        .collect::<Vec<_>>()
        .join(", ");
    let mut findings = Vec::new();
    match find_rules(&dirs, FIDO_RULES) {
        Some(path) => findings.push(Finding::ok(
            check,
            "udev-fido",
            format!(
                "udev rules give you FIDO security keys ({}).",
                context.show(&path)
            ),
        )),
        None => findings.push(
            Finding::warning(
                check,
                "udev-fido-missing",
                format!(
                    "No udev rules give you access to FIDO security keys (looked in {looked}): \
                     token-agent cannot open them without root."
                ),
            )
            .fix(format!("{INSTALL_RULES}; or sudo apt install libfido2-1")),
        ),
    }
    match find_rules(&dirs, CCID_RULES) {
        Some(path) => findings.push(Finding::ok(
            check,
            "udev-ccid",
            format!(
                "udev rules cover CCID smart-card readers ({}).",
                context.show(&path)
            ),
        )),
        None => findings.push(
            Finding::warning(
                check,
                "udev-ccid-missing",
                format!(
                    "No udev rules cover CCID smart-card readers (looked in {looked}): pcscd may \
                     not get the reader of a YubiKey or smart card."
                ),
            )
            .fix(format!("{INSTALL_RULES}; or sudo apt install libccid")),
        ),
    }
    findings
}

/// The first of `names` installed in `dirs`. A file in an earlier folder
/// hides one of the same name in a later one; an empty file (or a link to
/// /dev/null) turns the rules off.
fn find_rules(dirs: &[PathBuf], names: &[&str]) -> Option<PathBuf> {
    for name in names {
        for dir in dirs {
            let path = dir.join(name);
            if let Ok(meta) = std::fs::metadata(&path) {
                if meta.is_file() && meta.len() > 0 {
                    return Some(path);
                }
                // Masked here: later folders do not count.
                break;
            }
        }
    }
    None
}

/// Whether `program` is installed in the usual system folders.
fn installed(program: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"]
        .iter()
        .any(|dir| Path::new(dir).join(program).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_masked_in_an_earlier_folder_do_not_count() {
        let etc = tempfile::tempdir().unwrap();
        let lib = tempfile::tempdir().unwrap();
        let dirs = vec![etc.path().to_owned(), lib.path().to_owned()];
        assert_eq!(find_rules(&dirs, FIDO_RULES), None);
        std::fs::write(lib.path().join("70-u2f.rules"), "x").unwrap();
        assert_eq!(
            find_rules(&dirs, FIDO_RULES),
            Some(lib.path().join("70-u2f.rules"))
        );
        std::fs::write(etc.path().join("70-u2f.rules"), "").unwrap();
        assert_eq!(find_rules(&dirs, FIDO_RULES), None);
    }
}
