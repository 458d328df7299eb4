//! The helper process: `token-agent --sk-helper` loads one sk middleware and
//! answers the agent's requests on its standard input and output.
//!
//! The middleware's code runs only here, so when it crashes, hangs or
//! scribbles over memory, the agent loses a child it restarts, not itself or
//! its secrets; OpenSSH isolates middlewares the same way (`ssh-sk-helper`).
//! The protocol runs on private copies of the descriptors the agent gave as
//! standard input and output, as OpenSSH's `ssh-sk-helper` moves its own
//! away: before the library is loaded, standard input becomes /dev/null (a
//! middleware that reads it, as `getpass()` does without a terminal, reads
//! nothing instead of the agent's requests) and standard output becomes
//! standard error (where anything the middleware prints goes).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use token_agent_sk_api::{Algorithm, Library, LoadError, SignRequest};

use super::proto::{read_frame, write_frame, Failure, Op, Reply, Request, Response, Signed};

/// Serves requests on standard input until it closes, then exits the process.
pub fn run() -> ! {
    // The PIN passes through this process: no core dumps, no ptrace by the user's other processes.
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("token-agent sk helper: cannot make the process non-dumpable: {err}");
    }
    // Unbuffered both ways: a request is read with two read_exact calls
    // straight into a wiped buffer, and a BufReader would keep its own copy
    // of it (the PIN included) for the life of the process.
    let (mut input, mut output) = match protocol_channel() {
        Ok(channel) => channel,
        Err(err) => {
            eprintln!("token-agent sk helper: cannot set up its input and output: {err}");
            std::process::exit(2);
        }
    };
    let mut library = None;
    loop {
        match read_frame::<Request>(&mut input) {
            Ok(Some(request)) => {
                let result = handle(&mut library, request.op);
                let response = Response {
                    id: request.id,
                    result,
                };
                if write_frame(&mut output, &response).is_err() {
                    // The agent is gone: nothing left to serve.
                    std::process::exit(0);
                }
            }
            Ok(None) => std::process::exit(0),
            Err(err) => {
                eprintln!("token-agent sk helper: bad request from the agent: {err}");
                std::process::exit(2);
            }
        }
    }
}

/// Duplicates of standard input and output for the protocol; standard input
/// itself then reads /dev/null and standard output points at standard error,
/// so the middleware can neither steal a request nor write into an answer.
fn protocol_channel() -> io::Result<(File, File)> {
    let input = io::stdin().as_fd().try_clone_to_owned()?;
    let output = io::stdout().as_fd().try_clone_to_owned()?;
    let null = File::open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), io::stdin().as_raw_fd()).map_err(io::Error::from)?;
    nix::unistd::dup2(io::stderr().as_raw_fd(), io::stdout().as_raw_fd())
        .map_err(io::Error::from)?;
    Ok((File::from(input), File::from(output)))
}

fn handle(library: &mut Option<Library>, op: Op) -> Result<Reply, Failure> {
    match op {
        Op::Load { path } => {
            if library.is_some() {
                return Err(Failure::Protocol("a middleware is already loaded".into()));
            }
            let loaded = Library::open(&path).map_err(|e| Failure::Load(e.to_string()))?;
            let version = loaded.version();
            *library = Some(loaded);
            Ok(Reply::Loaded { version })
        }
        Op::Sign(sign) => {
            let library = library
                .as_ref()
                .ok_or_else(|| Failure::Protocol("no middleware is loaded".into()))?;
            let algorithm = Algorithm::from_code(sign.alg)
                .ok_or_else(|| Failure::Protocol(format!("unknown algorithm {}", sign.alg)))?;
            let request = SignRequest {
                algorithm,
                data: &sign.data,
                application: &sign.application,
                key_handle: &sign.key_handle,
                flags: sign.flags,
                pin: sign.pin.as_ref().map(|pin| pin.expose()),
                options: &[],
            };
            match library.sign(&request) {
                Ok(response) => Ok(Reply::Signed(Signed {
                    flags: response.flags,
                    counter: response.counter,
                    sig_r: response.sig_r,
                    sig_s: response.sig_s,
                })),
                Err(LoadError::Middleware(error)) => Err(Failure::Sk { code: error.code() }),
                Err(other) => Err(Failure::Malformed(other.to_string())),
            }
        }
    }
}
