//! OpenSSH security-key middlewares (`ssh-add -S libmiddleware.so`), each
//! run in a helper process.
//!
//! A key added with the sk-provider@openssh.com constraint is signed as
//! OpenSSH's ssh-agent signs it: through that library's `sk_sign`, loaded
//! with the sk-api loader (`token-agent-sk-api`) inside a child process
//! (`token-agent --sk-helper`, see [`run_helper`]), never in the agent. There
//! is one helper per library, started when the first key names it, serving
//! one call at a time (a middleware drives a device, and a device does one
//! thing at once), and killed when a call outlives the time limit or when no
//! key names the library any more. A helper that died or was killed is
//! started again at once, so the error can say so and the next signature
//! works.
//!
//! The router has already checked the library against the `-P` allowlist and
//! refused it to forwarded connections; this module gets canonical paths.

mod client;
mod helper;
mod proto;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use token_agent_core::lock;
use token_agent_sk_api::SkError;

use self::client::{CallError, Helper};
use self::proto::{Failure, Op, Reply};

pub(crate) use self::proto::{Pin, Sign, Signed};

pub use self::helper::run as run_helper;

/// How long a security key waits for a touch before it gives up (CTAP
/// authenticators wait about 30 s, as fido-sim does).
pub const TOUCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How the agent starts a middleware helper.
#[derive(Debug, Clone)]
pub struct HelperCommand {
    /// The program (the token-agent binary).
    pub program: PathBuf,
    /// Its arguments (`--sk-helper`).
    pub args: Vec<OsString>,
}

impl HelperCommand {
    /// The running executable with `--sk-helper`: how token-agent starts its helpers.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
            args: vec!["--sk-helper".into()],
        })
    }
}

/// How the backend runs middlewares.
#[derive(Debug, Clone)]
pub struct MiddlewareOptions {
    /// How to start a helper.
    pub helper: HelperCommand,
    /// How long one call may take before the helper is killed: long enough
    /// for the person to touch the key ([`TOUCH_TIMEOUT`]) and a little more.
    pub call_timeout: Duration,
}

impl Default for MiddlewareOptions {
    fn default() -> Self {
        Self {
            helper: HelperCommand::current_exe().unwrap_or_else(|_| HelperCommand {
                program: PathBuf::from("token-agent"),
                args: vec!["--sk-helper".into()],
            }),
            call_timeout: TOUCH_TIMEOUT + Duration::from_secs(5),
        }
    }
}

/// Why a middleware did not sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum MiddlewareError {
    /// The middleware answered with an SSH_SK_ERR_* code.
    #[error("the sk middleware {path}: {error}")]
    Sk {
        /// The library.
        path: String,
        /// What it answered.
        error: SkError,
    },
    /// The library could not be loaded: missing, not a middleware, another API
    /// version, or the helper could not start.
    #[error("{reason}")]
    Load {
        /// Why, in a sentence that names the library.
        reason: String,
    },
    /// The helper died during a call: the middleware crashed.
    #[error(
        "the sk middleware {path} crashed in {function} ({how}){}",
        restart_suffix(restarted)
    )]
    Crashed {
        /// The library.
        path: String,
        /// The function it was in.
        function: &'static str,
        /// How the helper ended ("signal 11, SIGSEGV").
        how: String,
        /// Whether a new helper is running, or why not.
        restarted: Result<(), String>,
    },
    /// A call outlived the time limit; the helper was killed.
    #[error(
        "the sk middleware {path} did not answer {function} within {} s; killed it{}",
        limit.as_secs(),
        restart_suffix(restarted)
    )]
    TimedOut {
        /// The library.
        path: String,
        /// The function it was in.
        function: &'static str,
        /// The time limit.
        limit: Duration,
        /// Whether a new helper is running, or why not.
        restarted: Result<(), String>,
    },
    /// The helper had ended (while idle) before the request reached it, and
    /// so had the fresh one it was sent to again: the middleware never saw it.
    #[error(
        "the helper of the sk middleware {path} ended ({how}) before the {function} request \
         reached it, twice{}",
        restart_suffix(restarted)
    )]
    Gone {
        /// The library.
        path: String,
        /// The function the request was for.
        function: &'static str,
        /// How the second helper ended.
        how: String,
        /// Whether a new helper is running, or why not.
        restarted: Result<(), String>,
    },
    /// The helper took no request for a while (it was stopped, or the
    /// middleware took over its input); it was killed, and the request never
    /// reached the middleware.
    #[error(
        "the helper of the sk middleware {path} took no {function} request within {} s; \
         killed it{}",
        limit.as_secs(),
        restart_suffix(restarted)
    )]
    NotReading {
        /// The library.
        path: String,
        /// The function the request was for.
        function: &'static str,
        /// How long the write waited.
        limit: Duration,
        /// Whether a new helper is running, or why not.
        restarted: Result<(), String>,
    },
    /// The middleware claimed success with an unusable answer, or the helper
    /// spoke out of turn.
    #[error("the sk middleware {path} answered {function} with something unusable: {reason}")]
    Malformed {
        /// The library.
        path: String,
        /// The function.
        function: &'static str,
        /// What was wrong.
        reason: String,
    },
}

fn restart_suffix(restarted: &Result<(), String>) -> String {
    match restarted {
        Ok(()) => "; restarted it".to_owned(),
        Err(reason) => format!("; could not restart it: {reason}"),
    }
}

/// Every middleware in use, by canonical path.
#[derive(Debug)]
pub(crate) struct Middlewares {
    options: MiddlewareOptions,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One library and its helper; the mutex serialises calls to it.
#[derive(Debug)]
struct Slot {
    path: String,
    helper: Mutex<Option<Helper>>,
}

impl Middlewares {
    pub(crate) fn new(options: MiddlewareOptions) -> Self {
        Self {
            options,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Makes sure the middleware at `path` runs in a helper: loaded, and of the
    /// right API version. A library that cannot be used is refused when the
    /// key is added, not at its first signature.
    pub(crate) async fn load(&self, path: &str) -> Result<(), MiddlewareError> {
        let slot = self.slot(path);
        let options = self.options.clone();
        blocking(move || {
            let mut helper = lock(&slot.helper);
            slot.running(&mut helper, &options).map(|_| ())
        })
        .await
    }

    /// `sk_sign` through the middleware at `path`.
    pub(crate) async fn sign(&self, path: &str, sign: Sign) -> Result<Signed, MiddlewareError> {
        let slot = self.slot(path);
        let options = self.options.clone();
        blocking(move || slot.sign(&options, sign)).await
    }

    /// Stops the helpers of the libraries not in `in_use`.
    pub(crate) fn retain(&self, in_use: &[String]) {
        lock(&self.slots).retain(|path, _| in_use.contains(path));
    }

    fn slot(&self, path: &str) -> Arc<Slot> {
        lock(&self.slots)
            .entry(path.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    path: path.to_owned(),
                    helper: Mutex::new(None),
                })
            })
            .clone()
    }
}

impl Slot {
    /// The running helper, started (and its library loaded) when there is none.
    fn running<'a>(
        &self,
        helper: &'a mut Option<Helper>,
        options: &MiddlewareOptions,
    ) -> Result<&'a mut Helper, MiddlewareError> {
        if helper.as_ref().is_some_and(Helper::is_dead) {
            *helper = None;
        }
        if helper.is_none() {
            *helper = Some(self.start(options)?);
        }
        helper.as_mut().ok_or_else(|| MiddlewareError::Load {
            reason: format!("the helper of the sk middleware {} vanished", self.path),
        })
    }

    fn start(&self, options: &MiddlewareOptions) -> Result<Helper, MiddlewareError> {
        let load_error = |reason: String| MiddlewareError::Load { reason };
        let mut helper = Helper::spawn(&options.helper).map_err(|err| {
            load_error(format!(
                "cannot start the helper {} for the sk middleware {}: {err}",
                options.helper.program.display(),
                self.path
            ))
        })?;
        let op = Op::Load {
            path: self.path.clone(),
        };
        match helper.call(&op, options.call_timeout) {
            Ok(Reply::Loaded { version }) => {
                tracing::info!(
                    middleware = self.path,
                    version = format_args!("{version:#010x}"),
                    "loaded sk middleware in a helper"
                );
                Ok(helper)
            }
            Ok(other) => Err(load_error(format!(
                "the helper of the sk middleware {} answered {other:?} to loading it",
                self.path
            ))),
            // The loader's words name the library already.
            Err(CallError::Failed(Failure::Load(reason))) => Err(load_error(reason)),
            Err(CallError::Failed(other)) => Err(load_error(format!(
                "cannot load the sk middleware {}: {other}",
                self.path
            ))),
            Err(CallError::Died(how)) => Err(load_error(format!(
                "the sk middleware {} crashed while loading ({how})",
                self.path
            ))),
            Err(CallError::Gone(how)) => Err(load_error(format!(
                "the helper for the sk middleware {} ended before it could load it ({how})",
                self.path
            ))),
            Err(CallError::TimedOut(limit)) => Err(load_error(format!(
                "the sk middleware {} did not finish loading within {} s",
                self.path,
                limit.as_secs()
            ))),
            Err(CallError::NotReading(limit)) => Err(load_error(format!(
                "the helper for the sk middleware {} took no request within {} s; killed it",
                self.path,
                limit.as_secs()
            ))),
        }
    }

    fn sign(&self, options: &MiddlewareOptions, sign: Sign) -> Result<Signed, MiddlewareError> {
        const FUNCTION: &str = "sk_sign";
        let mut guard = lock(&self.helper);
        let op = Op::Sign(sign);
        let mut result = self
            .running(&mut guard, options)?
            .call(&op, options.call_timeout);
        if let Err(CallError::Gone(how)) = &result {
            // The helper died while idle, and the agent had not seen it yet:
            // the request reached no middleware, so a fresh helper gets it.
            tracing::warn!(
                middleware = self.path,
                how = how.as_str(),
                "the sk middleware helper had ended while idle; started it again"
            );
            *guard = None;
            result = self
                .running(&mut guard, options)?
                .call(&op, options.call_timeout);
        }
        let malformed = |reason: String| MiddlewareError::Malformed {
            path: self.path.clone(),
            function: FUNCTION,
            reason,
        };
        match result {
            Ok(Reply::Signed(signed)) => Ok(signed),
            Ok(other) => Err(malformed(format!("{other:?}"))),
            Err(CallError::Failed(Failure::Sk { code })) => Err(MiddlewareError::Sk {
                path: self.path.clone(),
                error: SkError::from_code(code),
            }),
            Err(CallError::Failed(Failure::Malformed(reason))) => Err(malformed(reason)),
            Err(CallError::Failed(other)) => Err(malformed(other.to_string())),
            Err(CallError::Died(how)) => Err(MiddlewareError::Crashed {
                path: self.path.clone(),
                function: FUNCTION,
                how,
                restarted: self.restart(&mut guard, options),
            }),
            Err(CallError::TimedOut(limit)) => Err(MiddlewareError::TimedOut {
                path: self.path.clone(),
                function: FUNCTION,
                limit,
                restarted: self.restart(&mut guard, options),
            }),
            Err(CallError::Gone(how)) => Err(MiddlewareError::Gone {
                path: self.path.clone(),
                function: FUNCTION,
                how,
                restarted: self.restart(&mut guard, options),
            }),
            Err(CallError::NotReading(limit)) => Err(MiddlewareError::NotReading {
                path: self.path.clone(),
                function: FUNCTION,
                limit,
                restarted: self.restart(&mut guard, options),
            }),
        }
    }

    /// Replaces a dead or killed helper with a fresh one, now, so the key's
    /// next signature does not pay for the start.
    fn restart(
        &self,
        helper: &mut Option<Helper>,
        options: &MiddlewareOptions,
    ) -> Result<(), String> {
        if let Some(old) = helper.take() {
            old.kill();
        }
        match self.start(options) {
            Ok(fresh) => {
                *helper = Some(fresh);
                Ok(())
            }
            Err(err) => {
                tracing::error!(middleware = self.path, %err, "cannot restart the sk middleware helper");
                Err(err.to_string())
            }
        }
    }
}

/// Runs blocking helper I/O off the async threads.
async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, MiddlewareError> + Send + 'static,
) -> Result<T, MiddlewareError> {
    tokio::task::spawn_blocking(job)
        .await
        .unwrap_or_else(|err| {
            Err(MiddlewareError::Load {
                reason: format!("the thread talking to an sk middleware helper failed: {err}"),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_and_timeout_messages_say_what_happened_and_what_was_done() {
        let crashed = MiddlewareError::Crashed {
            path: "/x/libfoo.so".into(),
            function: "sk_sign",
            how: "signal 11, SIGSEGV".into(),
            restarted: Ok(()),
        };
        assert_eq!(
            crashed.to_string(),
            "the sk middleware /x/libfoo.so crashed in sk_sign (signal 11, SIGSEGV); restarted it"
        );
        let hung = MiddlewareError::TimedOut {
            path: "/x/libfoo.so".into(),
            function: "sk_sign",
            limit: Duration::from_secs(35),
            restarted: Err("cannot start the helper".into()),
        };
        assert_eq!(
            hung.to_string(),
            "the sk middleware /x/libfoo.so did not answer sk_sign within 35 s; killed it; \
             could not restart it: cannot start the helper"
        );
        let stopped = MiddlewareError::NotReading {
            path: "/x/libfoo.so".into(),
            function: "sk_sign",
            limit: Duration::from_secs(5),
            restarted: Ok(()),
        };
        assert_eq!(
            stopped.to_string(),
            "the helper of the sk middleware /x/libfoo.so took no sk_sign request within 5 s; \
             killed it; restarted it"
        );
    }

    #[tokio::test]
    async fn a_helper_program_that_cannot_start_refuses_the_library() {
        let middlewares = Middlewares::new(MiddlewareOptions {
            helper: HelperCommand {
                program: "/nonexistent/token-agent".into(),
                args: Vec::new(),
            },
            call_timeout: Duration::from_secs(5),
        });
        let err = middlewares.load("/usr/lib/libsk.so").await.unwrap_err();
        assert!(
            err.to_string().starts_with(
                "cannot start the helper /nonexistent/token-agent for the sk middleware \
                 /usr/lib/libsk.so: "
            ),
            "{err}"
        );
    }

    fn frame<T: serde::Serialize>(message: &T) -> Vec<u8> {
        let mut bytes = Vec::new();
        proto::write_frame(&mut bytes, message).unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_request_to_a_helper_that_ended_while_idle_goes_to_a_fresh_one() {
        // The first helper loads, then closes its input and lingers with its
        // output open: to the agent it is a helper that died while idle
        // before the reader saw it (a write gets EPIPE). The sign request
        // reached no middleware, so it goes to a second helper, which signs.
        let dir = std::env::temp_dir().join(format!("sk-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sign = || Sign {
            alg: 1,
            data: vec![1, 2, 3],
            application: "ssh:".into(),
            key_handle: vec![4; 16],
            flags: 1,
            pin: None,
        };
        let load = proto::Request {
            id: 1,
            op: Op::Load { path: "/x".into() },
        };
        let signing = proto::Request {
            id: 2,
            op: Op::Sign(sign()),
        };
        let loaded = proto::Response {
            id: 1,
            result: Ok(Reply::Loaded {
                version: 0x000a0000,
            }),
        };
        let signed = proto::Response {
            id: 2,
            result: Ok(Reply::Signed(Signed {
                flags: 1,
                counter: 7,
                sig_r: vec![9; 64],
                sig_s: Vec::new(),
            })),
        };
        std::fs::write(dir.join("loaded"), frame(&loaded)).unwrap();
        std::fs::write(dir.join("signed"), frame(&signed)).unwrap();
        let script = format!(
            "cd {dir}; head -c {load} >/dev/null; cat loaded; \
             if [ -e started ]; then head -c {sign} >/dev/null; cat signed; \
             else touch started; exec 0<&-; fi; sleep 60",
            dir = dir.display(),
            load = frame(&load).len(),
            sign = frame(&signing).len(),
        );
        let middlewares = Middlewares::new(MiddlewareOptions {
            helper: HelperCommand {
                program: "sh".into(),
                args: vec!["-c".into(), script.into()],
            },
            call_timeout: Duration::from_secs(10),
        });
        middlewares.load("/x").await.unwrap();
        // Time for the first helper to close its input.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let result = middlewares.sign("/x", sign()).await;
        middlewares.retain(&[]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(result.unwrap().counter, 7);
    }
}
