//! One worker thread per authenticator.
//!
//! A CTAP device answers one request at a time, and a request may block for
//! as long as the device waits for a touch (30 s on most keys). Each device
//! therefore gets a thread of its own that owns the calls to it, fed by a
//! queue: two devices work in parallel, one device never sees two requests at
//! once, and the async runtime never blocks on hardware.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use token_agent_core::{DeviceInfo, Error};

use crate::ctap::Authenticator;

type Job = Box<dyn FnOnce() + Send>;

/// The workers of every device seen so far, by device id.
#[derive(Debug, Default)]
pub(crate) struct Workers {
    queues: Mutex<HashMap<String, mpsc::Sender<Job>>>,
}

impl Workers {
    /// Runs `job` with `device` on that device's worker and awaits its result.
    pub(crate) async fn run<R, F>(
        &self,
        device: &Arc<dyn Authenticator>,
        job: F,
    ) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Authenticator) -> R + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let target = device.clone();
        let boxed: Job = Box::new(move || {
            let _ = reply.send(job(target.as_ref()));
        });
        self.queue(&device.id())?
            .send(boxed)
            .map_err(|_| worker_gone(device.as_ref()))?;
        answer.await.map_err(|_| worker_gone(device.as_ref()))
    }

    /// Lets the workers of devices no longer connected end: each finishes
    /// what it was given and stops once its queue is dropped.
    pub(crate) fn retain(&self, connected: &[String]) {
        if let Ok(mut queues) = self.queues.lock() {
            queues.retain(|id, _| connected.contains(id));
        }
    }

    /// The queue of device `id`, starting its worker if it has none.
    fn queue(&self, id: &str) -> Result<mpsc::Sender<Job>, Error> {
        let mut queues = self.queues.lock().map_err(|_| Error::Device {
            device: DeviceInfo::new("FIDO backend"),
            message: "internal state poisoned".into(),
        })?;
        if let Some(queue) = queues.get(id) {
            return Ok(queue.clone());
        }
        let (sender, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("fido {id}"))
            .spawn(move || {
                // The thread ends when the last sender (the map's) is dropped.
                // A panic inside the device library fails that one request (its
                // reply is dropped) and the worker goes on with the next.
                for job in receiver {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| Error::Device {
                device: DeviceInfo::new(id),
                message: format!("cannot start a worker thread: {e}"),
            })?;
        queues.insert(id.to_owned(), sender.clone());
        Ok(sender)
    }
}

fn worker_gone(device: &dyn Authenticator) -> Error {
    // The job panicked inside the device library: treat the device as gone.
    Error::DeviceRemoved {
        device: DeviceInfo::new(device.label()),
    }
}
