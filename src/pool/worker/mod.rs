//! One pool worker as the dispatcher sees it: started and handshaken here, then driven by
//! a reader task (frames in, forwarded as events) and by the dispatcher writing frames
//! out itself (`Conn::flush`; the write path and the arena are in `out.rs`).

mod out;

use out::Link;

use std::sync::Arc;

use bytes::Bytes;
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use super::message::Args;
use super::seam::{Conn, Events, Workers};
use crate::error::Error;
use crate::runtime::service::{ChildHandle, Spawned, spawn_child};
use crate::target::TargetRef;
use crate::wire::{Down, Role, Run, Up, WireError};

/// The events of a process worker.
pub(crate) type Event = super::seam::Event<WorkerConn>;

/// A live worker's handle: where to send frames, and its process.
///
/// # Drop
///
/// Frames already queued are still written; then the parent's end of the channel
/// closes, which a worker takes as the order to exit.
#[derive(Debug)]
pub(crate) struct WorkerConn {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) child: Arc<ChildHandle>,
    link: Link,
}

impl std::ops::Deref for WorkerConn {
    type Target = Link;

    fn deref(&self) -> &Link {
        &self.link
    }
}

impl Conn for WorkerConn {
    fn id(&self) -> u64 {
        self.id
    }

    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn pid(&self) -> u32 {
        self.child.pid
    }

    fn run(&self, id: u64, target: TargetRef, args: &Args) -> Result<(), Error> {
        self.link.send_run(id, target, args)
    }

    /// Encodes on procpool's encoder thread, never on the dispatcher's: the frame is
    /// queued there, and `Event::Staged` on `events` says when (or why not).
    fn stage(&self, id: u64, target: TargetRef, args: Args, events: Events<WorkerConn>) {
        let link = self.link.clone();
        let worker = self.id;
        super::encoder::run(Box::new(move || {
            // Whatever happens, the dispatcher hears back (it sends this worker nothing
            // until then); a panicking `Serialize` is caught inside `Deferred` already.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                link.send_run(id, target, &args)
            }))
            .unwrap_or_else(|_| {
                Err(Error::Encode {
                    type_name: "task arguments".to_owned(),
                    reason: "encoding them panicked".to_owned(),
                })
            });
            // Err: the dispatcher is gone, and with it the task.
            events.send(Event::Staged { worker, id, result }).ok();
        }));
    }

    fn skip(&self, id: u64) {
        self.link.send(&Down::Skip { id });
    }

    fn shutdown(&self) {
        self.link.send(&Down::Shutdown);
    }

    fn recall(&self, upto: u64) -> bool {
        self.link.recall(upto)
    }

    fn answered(&self, id: u64) {
        self.link.answered(id);
    }

    fn release_buffers(&self) {
        self.link.release_buffers();
    }

    fn flush(&self) {
        self.link.flush();
    }

    /// From `/proc/PID/statm`; `None` if it cannot be read (the process is gone: it is
    /// being replaced anyway).
    fn resident_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.child.pid)).ok()?;
        let pages: u64 = statm.split(' ').nth(1)?.parse().ok()?;
        let page = rustix::param::page_size() as u64;
        pages.checked_mul(page)
    }
}

/// The pool's workers: processes of this executable, started with the builder's
/// initializer and timeouts.
#[derive(Debug)]
pub(crate) struct Processes {
    pub(crate) init: Option<Init>,
    pub(crate) start_timeout: std::time::Duration,
    /// How long a stopped worker has between SIGTERM and SIGKILL.
    pub(crate) kill_grace: std::time::Duration,
    /// Where the workers' tasks run.
    pub(crate) runtime: crate::runtime::service::PoolRuntime,
}

impl Workers for Processes {
    type Conn = WorkerConn;

    /// On procpool's pools' runtime, not on the caller's: the pool outlives the runtime
    /// that built it.
    fn start(&self, id: u64, events: Events<WorkerConn>) {
        let identity = crate::runtime::next_identity();
        let task = start(
            id,
            identity,
            self.init.clone(),
            self.start_timeout,
            events.clone(),
        );
        if let Err(e) = self.runtime.spawn(task) {
            // Err: the pool is gone.
            events.send(Event::Failed(e)).ok();
        }
    }

    fn stop(&self, conn: WorkerConn, events: Events<WorkerConn>) {
        let (child, grace) = (Arc::clone(&conn.child), self.kill_grace);
        // Signalled before its channel closes: a worker sees the hang-up and exits at
        // once, and once it is reaped (by whichever waiter sees it first) its group id
        // is gone, so the group must be marked and signalled while the worker lives.
        terminate_group(&child);
        drop(conn);
        let stop = async move {
            kill(child, grace).await;
            // Gone only if the pool is: nobody counts then.
            drop(events.send(Event::Stopped));
        };
        if let Err(e) = self.runtime.spawn(stop) {
            tracing::warn!(target: "procpool::lifecycle", "cannot stop a worker: {e}");
        }
    }

    async fn kill_all(&self, conns: Vec<WorkerConn>) {
        let children: Vec<Arc<ChildHandle>> = conns.iter().map(|c| Arc::clone(&c.child)).collect();
        // Before the channels close, as in `stop`.
        for c in &children {
            c.stop_group();
            super::kill_now(c);
        }
        drop(conns);
        // All were sent SIGKILL, so waiting for them one after the other takes as long
        // as the slowest.
        for c in &children {
            c.wait(&mut None).await;
        }
    }
}

/// SIGTERM to the worker's process group; whatever of the group outlives the worker (a
/// subprocess that ignores SIGTERM, or one the worker had no time to stop) is killed
/// when the worker exits, before it is reaped: by then the group id could no longer be
/// used.
fn terminate_group(child: &ChildHandle) {
    child.stop_group();
    if let Err(e) = child.signal_group(rustix::process::Signal::TERM) {
        tracing::warn!(target: "procpool::lifecycle", worker = %child.name,
            "cannot stop worker: {e}");
    }
}

/// After [`terminate_group`]: a grace period, then SIGKILL; then reap.
async fn kill(child: Arc<ChildHandle>, grace: std::time::Duration) {
    if tokio::time::timeout(grace, child.wait(&mut None))
        .await
        .is_err()
    {
        super::kill_now(&child);
        child.wait(&mut None).await;
    }
}

impl Drop for WorkerConn {
    fn drop(&mut self) {
        self.link.close();
    }
}

/// The initializer every worker runs before its first task.
#[derive(Debug, Clone)]
pub(crate) struct Init {
    pub(crate) target: TargetRef,
    pub(crate) args: Bytes,
}

/// Starts worker `id`, named `name`, and sends `Ready` (or `Failed`) to `events`.
///
/// The dispatcher does not wait: this runs as its own task.
pub(crate) async fn start(
    id: u64,
    identity: Vec<u32>,
    init: Option<Init>,
    start_timeout: std::time::Duration,
    events: mpsc::UnboundedSender<Event>,
) {
    let name: Arc<str> = crate::runtime::worker_name(&identity).into();
    let ev = tokio::select! {
        r = connect(id, &name, identity, init, start_timeout, events.clone()) => match r {
            Ok(conn) => Event::Ready(conn),
            Err(e) => Event::Failed(e),
        },
        // The pool is gone (a cancelled build, a terminated pool) while this worker was
        // starting, perhaps stuck in its initializer: dropping `connect` closes the
        // channel, the worker sees the hang-up and exits, and its handle is reaped.
        () = events.closed() => return,
    };
    if let Err(mpsc::error::SendError(Event::Ready(conn))) = events.send(ev) {
        // The pool is gone: this worker has no one to serve.
        if let Err(e) = conn.child.signal(rustix::process::Signal::KILL) {
            tracing::warn!(target: "procpool::lifecycle", worker = %conn.name,
                "cannot stop unneeded worker: {e}");
        }
    }
}

async fn connect(
    id: u64,
    name: &Arc<str>,
    identity: Vec<u32>,
    init: Option<Init>,
    start_timeout: std::time::Duration,
    events: mpsc::UnboundedSender<Event>,
) -> Result<WorkerConn, Error> {
    let Spawned {
        channel,
        control,
        child,
    } = spawn_child(name, true).await?;
    let control = control.ok_or_else(|| Error::spawn("no recall channel", None))?;
    control
        .set_nonblocking(true)
        .map_err(|e| Error::spawn("cannot set up the recall channel", Some(e)))?;
    let mut channel = crate::process::child_channel(channel)?;
    let init = init.map(|i| Run {
        id: 0,
        target: i.target.offset,
        target_name: i.target.name.to_owned(),
        args: ByteBuf::from(i.args.to_vec()),
    });
    let hello = [crate::process::hello(name, identity, Role::Worker, init)?];
    let handshake = crate::process::handshake(&mut channel, &child, name, &hello);
    match tokio::time::timeout(start_timeout, handshake).await {
        Ok(done) => done?,
        Err(_) => {
            tracing::warn!(target: "procpool::lifecycle", worker = %name,
                "worker not ready within {start_timeout:?} (stuck in its initializer?); killed");
            super::kill_now(&child);
            child.wait(&mut None).await;
            return Err(Error::Timeout {
                after: start_timeout,
            });
        }
    }
    let (mut reader, writer) = channel.split();
    let link = Link::new(Arc::clone(name), writer.into_inner(), control);
    let reader_child = Arc::clone(&child);
    let reader_name = Arc::clone(name);
    tokio::spawn(async move {
        let mut protocol = None;
        loop {
            match reader.recv::<Up>().await {
                Ok(Some(Up::Done { id: task, outcome })) => {
                    let done = Event::Done {
                        worker: id,
                        id: task,
                        outcome,
                    };
                    if events.send(done).is_err() {
                        break;
                    }
                }
                Ok(Some(Up::Log(record))) => {
                    #[cfg(feature = "redis")]
                    crate::log::capture::record(reader_child.pid, &record);
                    let span = crate::log::span_of(record.task);
                    crate::log::reemit_in(span.as_ref(), &reader_name, reader_child.pid, &record);
                }
                Ok(Some(Up::Recalled { after, upto })) => {
                    let back = Event::Recalled {
                        worker: id,
                        after,
                        upto,
                    };
                    if events.send(back).is_err() {
                        break;
                    }
                }
                Ok(Some(other)) => {
                    protocol = Some(format!("unexpected message {other:?}"));
                    break;
                }
                Ok(None) | Err(WireError::Truncated | WireError::Io(_)) => break,
                Err(e @ (WireError::Oversize { .. } | WireError::Garbage(_))) => {
                    protocol = Some(e.to_string());
                    break;
                }
            }
        }
        if protocol.is_some() {
            // Kill before the channel closes, so the exit status says it was killed.
            if let Err(e) = reader_child.signal(rustix::process::Signal::KILL) {
                tracing::warn!(target: "procpool::lifecycle", worker = %reader_name,
                    "cannot kill misbehaving worker: {e}");
            }
        }
        drop(reader);
        let exit = reader_child.wait(&mut None).await;
        drop(events.send(Event::Gone {
            worker: id,
            exit,
            protocol,
        }));
    });
    Ok(WorkerConn {
        id,
        name: Arc::clone(name),
        child,
        link,
    })
}
