//! One pool worker as the dispatcher sees it: started and handshaken here, then driven by
//! a reader task (frames in, forwarded as events) and a writer task (frames out, batched).

use std::sync::Arc;

use bytes::Bytes;
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use crate::error::{Error, ExitReason};
use crate::process::{ChildHandle, Spawned, spawn_child};
use crate::target::TargetRef;
use crate::wire::{Down, Outcome, Role, Run, Up, WireError};

/// What a worker's I/O tasks tell the dispatcher.
#[derive(Debug)]
pub(crate) enum Event {
    /// A worker finished its handshake (and initializer).
    Ready(WorkerConn),
    /// A worker could not be started.
    Failed(Error),
    /// Task `id` finished on worker `worker`.
    Done {
        worker: u64,
        id: u64,
        outcome: Outcome,
    },
    /// Worker `worker` is gone (its channel closed and it was reaped).
    Gone {
        worker: u64,
        exit: ExitReason,
        protocol: Option<String>,
    },
}

/// A live worker's handle: where to send frames, and its process.
#[derive(Debug)]
pub(crate) struct WorkerConn {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) child: Arc<ChildHandle>,
    frames: mpsc::UnboundedSender<Bytes>,
}

impl WorkerConn {
    /// Queues a frame for the writer task. A worker whose writer stopped is dying; its
    /// reader reports it, so a failed send needs no handling here.
    pub(crate) fn send(&self, msg: &Down) {
        self.send_frame(crate::wire::to_frame(msg));
    }

    /// Queues an encoded frame (see [`send`](Self::send)).
    pub(crate) fn send_frame(&self, frame: Bytes) {
        drop(self.frames.send(frame));
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
    events: mpsc::UnboundedSender<Event>,
) {
    let name: Arc<str> = crate::process::named("PoolWorker", &identity).into();
    let ev = tokio::select! {
        r = connect(id, &name, identity, init, events.clone()) => match r {
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
            eprintln!("procpool: cannot stop unneeded worker {}: {e}", conn.name);
        }
    }
}

async fn connect(
    id: u64,
    name: &Arc<str>,
    identity: Vec<u32>,
    init: Option<Init>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<WorkerConn, Error> {
    let Spawned { channel, child } = spawn_child(name).await?;
    let mut channel = crate::process::child_channel(channel)?;
    let init = init.map(|i| Run {
        id: 0,
        target: i.target.offset,
        target_name: i.target.name.to_owned(),
        args: ByteBuf::from(i.args.to_vec()),
    });
    let hello = crate::process::hello(name, identity, Role::Worker, init)?;
    crate::process::handshake(&mut channel, &child, name, &[hello]).await?;
    let (mut reader, mut writer) = channel.split();
    let (frames, mut queued) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        // Batching: everything queued while the previous write ran goes in one write.
        while let Some(frame) = queued.recv().await {
            let mut res = writer.feed(frame).await;
            while res.is_ok() {
                match queued.try_recv() {
                    Ok(more) => res = writer.feed(more).await,
                    Err(_) => break,
                }
            }
            if res.is_err() || writer.flush().await.is_err() {
                // The worker is gone; the reader reports it.
                return;
            }
        }
    });
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
                    crate::log::reemit(&reader_name, reader_child.pid, &record);
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
                eprintln!("procpool: cannot kill misbehaving worker: {e}");
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
        frames,
    })
}
