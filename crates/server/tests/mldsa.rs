//! Our ssh-mldsa44-ed25519@openssh.com signatures, checked by OpenSSH 10.5's
//! own `ssh-keygen -Y check-novalidate`.
//!
//! The distribution's OpenSSH is older and knows no such key, so this test
//! needs the 10.5 build: `TOKEN_AGENT_OPENSSH10` names a directory with
//! `bin/ssh-keygen`, else `target/openssh-10.5` under the workspace root is
//! used. Without either the test fails and says how to build it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha512};
use ssh_key::public::{KeyData, OpaquePublicKey};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, SshSig};
use token_agent_server::mldsa::{self, Keypair, ALGORITHM};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mldsa");

/// OpenSSH 10.5's ssh-keygen, or an error saying how to build it.
fn ssh_keygen() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("TOKEN_AGENT_OPENSSH10") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/openssh-10.5"),
    };
    let keygen = dir.join("bin/ssh-keygen");
    if keygen.is_file() {
        Ok(keygen)
    } else {
        Err(format!(
            "{} not found: build OpenSSH 10.5 with `shared/vendor/build-openssh.sh \
             target/openssh-10.5` (from the workspace root), or set TOKEN_AGENT_OPENSSH10 \
             to a directory holding bin/ssh-keygen",
            keygen.display()
        ))
    }
}

/// The fixture key pair, through ssh-key's opaque keypair data.
fn fixture_keypair() -> Result<Keypair, Box<dyn std::error::Error>> {
    let key = PrivateKey::read_openssh_file(&Path::new(FIXTURES).join("id_mldsa44_ed25519"))?;
    let ssh_key::private::KeypairData::Other(opaque) = key.key_data() else {
        return Err("the fixture is not an opaque key".into());
    };
    Ok(Keypair::from_openssh(
        opaque.public.key.as_ref(),
        opaque.private.as_ref(),
    )?)
}

/// Our sshsig (PROTOCOL.sshsig) of `message` in the "file" namespace,
/// armored as `ssh-keygen -Y sign` writes it.
fn our_sshsig(key: &Keypair, message: &[u8]) -> Result<String, Box<dyn std::error::Error>> {
    let signed = SshSig::signed_data("file", HashAlg::Sha512, message)?;
    // The same bytes, spelled out from PROTOCOL.sshsig §3.
    let mut expected = b"SSHSIG".to_vec();
    for field in [&b"file"[..], b"", b"sha512", &Sha512::digest(message)] {
        expected.extend_from_slice(&u32::try_from(field.len())?.to_be_bytes());
        expected.extend_from_slice(field);
    }
    assert_eq!(signed, expected);

    let raw = key.sign_raw(&signed)?;
    let algorithm = Algorithm::new(ALGORITHM)?;
    let public = KeyData::Other(OpaquePublicKey::new(
        key.public().as_bytes().to_vec(),
        algorithm.clone(),
    ));
    let signature = ssh_key::Signature::new(algorithm, raw.to_vec())?;
    // Our full blob and ssh-key's encoding of the same signature agree.
    let blob = key.sign(&signed)?;
    mldsa::verify(key.public(), &signed, &blob)?;
    let sig = SshSig::new(public, "file", HashAlg::Sha512, signature)?;
    Ok(sig.to_pem(LineEnding::LF)?)
}

fn check_novalidate(
    keygen: &Path,
    public: &Path,
    sig: &Path,
    message: &[u8],
) -> Result<Output, Box<dyn std::error::Error>> {
    use std::io::Write as _;
    let mut child = Command::new(keygen)
        .args(["-Y", "check-novalidate", "-n", "file", "-f"])
        .arg(public)
        .arg("-s")
        .arg(sig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or("no stdin for ssh-keygen")?
        .write_all(message)?;
    Ok(child.wait_with_output()?)
}

#[test]
fn openssh_10_5_accepts_our_signature() -> TestResult {
    let keygen = ssh_keygen()?;
    let key = fixture_keypair()?;
    let dir = tempfile::tempdir()?;
    let message = b"signed by token-agent with ssh-mldsa44-ed25519@openssh.com\n";
    let sig_path = dir.path().join("message.sig");
    std::fs::write(&sig_path, our_sshsig(&key, message)?)?;
    let public = Path::new(FIXTURES).join("id_mldsa44_ed25519.pub");

    let out = check_novalidate(&keygen, &public, &sig_path, message)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Good \"file\" signature"),
        "ssh-keygen refused our signature: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The same check fails for another message: it can tell.
    let out = check_novalidate(&keygen, &public, &sig_path, b"another message\n")?;
    assert!(
        !out.status.success(),
        "ssh-keygen accepted our signature on the wrong message"
    );
    Ok(())
}
