//! Link settings that keep the resident agent small.
//!
//! - `hot-code/<binary>.ld` (written by the e2e crate's `hot-code` tool) puts
//!   the functions the agent and its PKCS#11 helper run day to day at the
//!   start of their text. The kernel maps 64 KiB around each code page a
//!   process first touches, so scattered functions make nearly the whole
//!   binary resident; clustered, only their own pages are.
//! - Packed relative relocations (DT_RELR) shrink the relocation table the
//!   dynamic linker reads, and keeps resident, from 250 KB to a few KB; glibc
//!   reads them from 2.36 on (and refuses a binary that needs them before).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    for binary in ["token-agent", "token-agent-pkcs11-helper"] {
        let script = Path::new(&dir)
            .join("hot-code")
            .join(format!("{binary}.ld"));
        println!("cargo:rerun-if-changed={}", script.display());
        if script.is_file() {
            println!(
                "cargo:rustc-link-arg-bin={binary}=-Wl,-T,{}",
                script.display()
            );
        }
    }
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
        && std::env::var("TARGET") == std::env::var("HOST")
        && glibc_reads_relr()
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether this machine's glibc is 2.36 or later (`getconf GNU_LIBC_VERSION`
/// prints `glibc 2.36`).
fn glibc_reads_relr() -> bool {
    let Ok(output) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (2, 36)
}
