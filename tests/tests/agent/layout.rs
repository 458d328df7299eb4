//! Issue 18: token-agent and its PKCS#11 helper are linked for a small
//! resident set: the functions they run day to day first in their text (the
//! linker scripts of crates/cli/hot-code, through crates/cli/build.rs), and
//! packed relative relocations where glibc reads them. The memory itself is
//! measured by pkcs11-bench, not here.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context};
use token_agent_e2e::{agent_binary, check, pkcs11_helper_binary, stdout};

/// The size of section `name` in `readelf -SW` output.
fn section_size(sections: &str, name: &str) -> Option<u64> {
    sections.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == name)?;
        u64::from_str_radix(fields.get(at + 4)?, 16).ok()
    })
}

fn readelf(flag: &str, binary: &Path) -> anyhow::Result<String> {
    let output = Command::new("readelf")
        .arg(flag)
        .arg(binary)
        .output()
        .context("cannot run readelf (install binutils)")?;
    Ok(stdout(&check(output, "readelf")?))
}

/// Whether this machine's glibc reads DT_RELR (2.36 and later), as build.rs decides.
fn glibc_reads_relr() -> anyhow::Result<bool> {
    let output = check(
        Command::new("getconf").arg("GNU_LIBC_VERSION").output()?,
        "getconf GNU_LIBC_VERSION",
    )?;
    let text = stdout(&output);
    let version = text.trim().strip_prefix("glibc ").context("not glibc")?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (2, 36))
}

#[test]
fn issue_18_the_day_to_day_code_comes_first_and_relocations_are_packed() -> anyhow::Result<()> {
    for (binary, script) in [
        (agent_binary()?, "token-agent.ld"),
        (pkcs11_helper_binary()?, "token-agent-pkcs11-helper.ld"),
    ] {
        let patterns = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../crates/cli/hot-code")
                .join(script),
        )?
        .lines()
        .filter(|line| line.trim_start().starts_with("*(.text."))
        .count();
        ensure!(patterns > 50, "{script} names only {patterns} functions");
        let sections = readelf("-SW", &binary)?;
        let hot = section_size(&sections, ".text.hot")
            .with_context(|| format!("{} has no .text.hot:\n{sections}", binary.display()))?;
        let rest = section_size(&sections, ".text").context("no .text")?;
        // The day's code is a real part of the binary, and not all of it.
        ensure!(
            hot >= 32 * 1024 && hot < rest,
            "{}: .text.hot is {hot} bytes, .text {rest}",
            binary.display()
        );
        if glibc_reads_relr()? {
            let dynamic = readelf("-dW", &binary)?;
            ensure!(
                dynamic.contains("(RELR)"),
                "{} has no packed relocations:\n{dynamic}",
                binary.display()
            );
        }
    }
    Ok(())
}
