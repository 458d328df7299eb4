//! The helper's lanes, spoken to directly as the agent speaks to them
//! (`token_agent_pkcs11::proto`): the real helper binary, SoftHSM behind it.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use token_agent_e2e::pkcs11_helper_binary;
use token_agent_e2e::softhsm::{build_shim, KeyKind, Shim, SoftHsm, MODULE, PIN};
use token_agent_pkcs11::proto::{
    encode_frame, read_frame, seqpacket_pair, Op, OpenLane, Pin, Reply, Request, Response, Scheme,
};

/// A helper process and the agent's ends of its sockets.
struct Helper {
    child: Child,
    control: UnixStream,
    answers: BufReader<UnixStream>,
    next_id: u64,
}

impl Helper {
    /// Starts the helper binary with SoftHSM's tokens of `hsm`.
    fn start(hsm: &SoftHsm) -> anyhow::Result<Self> {
        let (control, theirs) = seqpacket_pair()?;
        let (answers, output) = UnixStream::pair()?;
        answers.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut command = Command::new(pkcs11_helper_binary()?);
        command
            .envs(hsm.env())
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(output)))
            .stderr(Stdio::piped());
        let child = command.spawn()?;
        drop(command);
        Ok(Self {
            child,
            control: UnixStream::from(control),
            answers: BufReader::new(answers),
            next_id: 1,
        })
    }

    /// Opens a lane: the agent's end of it.
    fn open_lane(&self, retire_after: Option<Duration>) -> anyhow::Result<UnixStream> {
        let (ours, theirs) = seqpacket_pair()?;
        OpenLane { retire_after }.send(&self.control, theirs)?;
        Ok(UnixStream::from(ours))
    }

    /// Writes `op` on `lane`; its id.
    fn send(&mut self, lane: &UnixStream, op: Op) -> std::io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = encode_frame(&Request { id, op })?;
        // A SOCK_SEQPACKET write takes the whole record or fails.
        let written = (&*lane).write(&frame)?;
        assert_eq!(written, frame.len());
        Ok(id)
    }

    /// The next answer, whichever request it is for.
    fn answer(&mut self) -> anyhow::Result<Response> {
        read_frame::<Response>(&mut self.answers)?.context("the helper closed its answers")
    }

    /// Sends `op` on `lane` and waits for its answer.
    fn call(&mut self, lane: &UnixStream, op: Op) -> anyhow::Result<Reply> {
        let id = self.send(lane, op)?;
        let response = self.answer()?;
        anyhow::ensure!(response.id == id, "answer {} for request {id}", response.id);
        response
            .result
            .map_err(|failure| anyhow::anyhow!("{failure}"))
    }

    /// The helper's threads now.
    fn threads(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/task", self.child.id()))?.count())
    }

    /// A loaded module, logged in to the token labelled `label`, with its
    /// slot and the CKA_ID of its P-256 key: lane 0 stays, as the agent's does.
    fn loaded(&mut self, module: &str, label: &str) -> anyhow::Result<(UnixStream, u64, Vec<u8>)> {
        let lane = self.open_lane(None)?;
        self.call(
            &lane,
            Op::Load {
                path: module.into(),
            },
        )?;
        let Reply::Tokens(tokens) = self.call(&lane, Op::List)? else {
            anyhow::bail!("no token list");
        };
        let token = tokens
            .into_iter()
            .find(|t| t.label == label)
            .context("no such token")?;
        self.call(
            &lane,
            Op::Login {
                slot: token.slot,
                pin: Some(Pin::new(PIN.into())),
            },
        )?;
        let key = token
            .keys
            .iter()
            .find(|k| k.label == KeyKind::P256.id_and_label().1)
            .context("no P-256 key")?;
        Ok((lane, token.slot, key.id.clone()))
    }
}

/// A helper with SoftHSM's module loaded and logged in to a token with a
/// P-256 key: the SoftHSM (kept for its files), the helper, lane 0, the
/// token's slot and the key's CKA_ID.
fn loaded_helper() -> anyhow::Result<(SoftHsm, Helper, UnixStream, u64, Vec<u8>)> {
    let hsm = SoftHsm::new()?;
    hsm.token("lanes", &[KeyKind::P256])?;
    let mut helper = Helper::start(&hsm)?;
    let (lane, slot, key) = helper.loaded(MODULE, "lanes")?;
    Ok((hsm, helper, lane, slot, key))
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sign(slot: u64, key_id: &[u8]) -> Op {
    Op::Sign {
        slot,
        key_id: key_id.to_vec(),
        scheme: Scheme::EcdsaSha256,
        message: b"lanes".to_vec(),
        context_pin: None,
        context_pin_pad: false,
    }
}

/// Waits until `condition` holds, for up to 10 s.
fn eventually(mut condition: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition()? {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(false)
}

#[test]
fn an_idle_lane_retires_and_refuses_later_requests_while_lane_0_stays() -> anyhow::Result<()> {
    let (_hsm, mut helper, first, slot, key) = loaded_helper()?;
    let extra = helper.open_lane(Some(Duration::from_millis(200)))?;
    assert!(matches!(
        helper.call(&extra, sign(slot, &key))?,
        Reply::Signature(_)
    ));
    // The main thread, lane 0's and the extra lane's.
    assert_eq!(helper.threads()?, 3);
    // After 200 ms without a request the extra lane's thread ends, and a
    // request on it fails at once instead of being lost.
    assert!(eventually(|| Ok(helper.threads()? == 2))?);
    let refused = helper.send(&extra, Op::List).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::BrokenPipe, "{refused}");
    // Lane 0 never retires.
    std::thread::sleep(Duration::from_millis(400));
    assert!(matches!(
        helper.call(&first, sign(slot, &key))?,
        Reply::Signature(_)
    ));
    Ok(())
}

#[test]
fn no_request_is_lost_when_a_lane_retires_as_it_arrives() -> anyhow::Result<()> {
    let (_hsm, mut helper, _first, slot, key) = loaded_helper()?;
    // Every request either fails to send (the lane is gone, and the agent
    // then sends it on another lane) or is answered. Rounds of three: one
    // sent at once, which the lane answers; one sent once the lane's thread
    // has ended, which fails; and one sent within 3 ms of the moment the lane
    // gives up, which may go either way but must not be lost.
    let idle = Duration::from_millis(250);
    let (mut answered, mut refused) = (0, 0);
    let mut lane = helper.open_lane(Some(idle))?;
    for round in 0u32..30 {
        match round % 3 {
            0 => {}
            1 => assert!(eventually(|| Ok(helper.threads()? == 2))?),
            _ => std::thread::sleep(
                idle + Duration::from_micros(u64::from(round % 13) * 500)
                    - Duration::from_millis(3),
            ),
        }
        match helper.send(&lane, sign(slot, &key)) {
            Ok(id) => {
                anyhow::ensure!(
                    round % 3 != 1,
                    "round {round}: a retired lane took a request"
                );
                let response = helper.answer()?;
                assert_eq!(response.id, id);
                assert!(matches!(response.result, Ok(Reply::Signature(_))));
                answered += 1;
            }
            Err(err) => {
                assert_eq!(err.kind(), ErrorKind::BrokenPipe, "{err}");
                refused += 1;
                lane = helper.open_lane(Some(idle))?;
            }
        }
    }
    assert_eq!(answered + refused, 30);
    assert!(answered >= 10, "{answered} answered, {refused} refused");
    Ok(())
}

#[test]
fn a_lane_stuck_in_the_module_does_not_hold_up_another() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    hsm.token("stuck", &[KeyKind::P256])?;
    let modules = tempfile::Builder::new().prefix("lanes").tempdir()?;
    let hang = build_shim(modules.path(), Shim::Hang, &hsm)?;
    let mut helper = Helper::start(&hsm)?;
    let (first, slot, key) = helper.loaded(&hang.display().to_string(), "stuck")?;
    helper.send(&first, sign(slot, &key))?;
    // C_Sign never returns on lane 0; a second and a third lane answer
    // while it hangs (`call` checks each answer is for its own request, so
    // an answer to the held signature would fail it).
    let second = helper.open_lane(Some(Duration::from_secs(30)))?;
    let started = Instant::now();
    assert!(matches!(helper.call(&second, Op::List)?, Reply::Tokens(t) if t.len() == 1));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let third = helper.open_lane(Some(Duration::from_secs(30)))?;
    assert!(matches!(helper.call(&third, Op::List)?, Reply::Tokens(_)));
    Ok(())
}

#[test]
fn the_helper_exits_when_the_control_socket_closes() -> anyhow::Result<()> {
    let (_hsm, mut helper, _lane, _, _) = loaded_helper()?;
    helper.control.shutdown(std::net::Shutdown::Write)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = helper.child.try_wait()? {
            break status;
        }
        anyhow::ensure!(Instant::now() < deadline, "the helper did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    Ok(())
}

#[test]
fn a_control_record_without_a_socket_ends_the_helper_with_a_reason() -> anyhow::Result<()> {
    let hsm = SoftHsm::new()?;
    let mut helper = Helper::start(&hsm)?;
    (&helper.control).write_all(&OpenLane { retire_after: None }.encode())?;
    let mut stderr = String::new();
    helper
        .child
        .stderr
        .take()
        .context("the helper's stderr")?
        .read_to_string(&mut stderr)?;
    assert_eq!(helper.child.wait()?.code(), Some(2));
    assert!(stderr.contains("came without a socket"), "{stderr}");
    Ok(())
}

#[test]
fn many_clients_at_once_sign_on_lanes_of_one_helper() -> anyhow::Result<()> {
    use signature::Verifier;
    use ssh_encoding::Decode;
    use token_agent_e2e::bench::sign_request;
    use token_agent_e2e::wire::RawClient;

    let hsm = SoftHsm::new()?;
    hsm.token("burst", &[KeyKind::P256])?;
    // Few token polls: each starts a short-lived scanner helper beside the
    // signing one.
    let config =
        format!("[pkcs11]\npoll_interval_ms = 600000\n[[pkcs11.modules]]\npath = \"{MODULE}\"\n");
    let agent = crate::start_agent(&hsm, &[], &config, PIN)?;
    let blob = crate::only_key_blob(&agent)?;
    let key = ssh_key::public::KeyData::decode(&mut blob.as_slice())?;
    // The signing helper, once a scanner started with the agent has gone.
    let mut running = Vec::new();
    anyhow::ensure!(
        eventually(|| {
            running = crate::helpers(&agent)?;
            Ok(running.len() == 1)
        })?,
        "helpers: {running:?}"
    );
    let helper = running[0].0;
    let threads = || -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{helper}/task"))?.count())
    };
    let at_rest = threads()?;

    // 8 clients sign their own data back to back for a second; each
    // signature is checked against the key.
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let (socket, blob, key) = (agent.socket().to_owned(), blob.clone(), key.clone());
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut agent = RawClient::connect(&socket)?;
                let started = Instant::now();
                let mut signed = 0;
                while started.elapsed() < Duration::from_secs(1) {
                    let data = format!("client {client}, signature {signed}");
                    let reply = agent
                        .request(&sign_request(&blob, data.as_bytes(), 0))?
                        .context("the agent closed")?;
                    let (&kind, mut body) = reply.split_first().context("an empty reply")?;
                    anyhow::ensure!(kind == 14, "reply {kind} to signature {signed}");
                    let signature =
                        ssh_key::Signature::decode(&mut <Vec<u8>>::decode(&mut body)?.as_slice())?;
                    key.verify(data.as_bytes(), &signature)?;
                    signed += 1;
                }
                Ok(signed)
            })
        })
        .collect();
    let mut most_threads = 0;
    while clients.iter().any(|c| !c.is_finished()) {
        most_threads = most_threads.max(threads()?);
        std::thread::sleep(Duration::from_millis(20));
    }
    for client in clients {
        let signed = client
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))?
            .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
        assert!(signed > 0);
    }
    // Lanes opened while every open one was busy.
    assert!(
        most_threads > at_rest,
        "the helper had {at_rest} threads at rest and at most {most_threads} while signing"
    );

    // Lanes' memory stays bounded: the helper runs with an arena per CPU
    // (glibc rewrites the variable in place as it reads it, so only its
    // first setting still shows in /proc; the client's unit tests check the
    // whole of it).
    let environment = std::fs::read(format!("/proc/{helper}/environ"))?;
    let tunables = environment
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"GLIBC_TUNABLES="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .context("the helper has no GLIBC_TUNABLES")?;
    assert!(
        tunables.starts_with("glibc.malloc.arena_max="),
        "{tunables}"
    );
    Ok(())
}
