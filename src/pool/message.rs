//! What travels from callers to the dispatcher, and back.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::sync::Pins;
use crate::target::TargetRef;
use crate::wire::Outcome;

/// A task's outcome as the dispatcher hands it to its caller.
pub(crate) type TaskResult = Result<Finished, Error>;

/// A task that ran: its outcome and the worker that ran it (for error messages).
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) outcome: Outcome,
    pub(crate) worker: Arc<str>,
}

/// How the dispatcher answers a caller, and asks whether anyone still listens.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The one caller of a task (`apply`, `apply_async`); what its arguments referred to
    /// stays pinned until it is answered (see `sync::Pins`).
    One {
        tx: oneshot::Sender<TaskResult>,
        pins: Pins,
    },
    /// One of the tasks of a `map` or an `imap`, answered on their shared channel under
    /// `key` (a map's chunk index, an imap's task id).
    Many {
        key: u64,
        tx: mpsc::UnboundedSender<(u64, TaskResult)>,
    },
}

impl Reply {
    /// Hands the caller its answer; a caller that stopped waiting needs none.
    pub(crate) fn send(self, res: TaskResult) {
        match self {
            Reply::One { tx, pins } => {
                drop(tx.send(res));
                // The task is over: what its arguments referred to may go.
                drop(pins);
            }
            Reply::Many { key, tx } => drop(tx.send((key, res))),
        }
    }

    /// Nobody will read the answer and the task need not run: the `map` or `imap` it
    /// belongs to was dropped (its cancels are on their way). Never for [`Reply::One`]:
    /// a detached `TaskHandle` has dropped its receiver, yet its task runs.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Reply::One { .. } => false,
            Reply::Many { tx, .. } => tx.is_closed(),
        }
    }
}

/// A task's encoded arguments: `head`, `body`, then `rest`, together one MessagePack
/// value.
///
/// In parts so that a chunk of a map is never copied before it reaches the socket:
/// `head` is its array header, `body` a slice of the items, encoded once. Large items
/// are encoded only when sent, by the dispatcher, into a buffer it reuses (`rest`; see
/// [`Deferred`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Args {
    pub(crate) head: Bytes,
    pub(crate) body: Bytes,
    pub(crate) rest: Option<Arc<[Part]>>,
}

impl Args {
    /// Whether a large map item among them is encoded only when sent (see `Deferred`).
    pub(crate) fn has_deferred(&self) -> bool {
        self.rest
            .as_deref()
            .is_some_and(|parts| parts.iter().any(|p| matches!(p, Part::Deferred(_))))
    }

    /// All of them in one buffer (for a remote node); a large item is encoded again now.
    #[cfg(feature = "redis")]
    pub(crate) fn to_vec(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.body);
        for part in self.rest.as_deref().unwrap_or_default() {
            match part {
                Part::Bytes(b) => out.extend_from_slice(b),
                Part::Deferred(item) => item.encode_into(&mut out)?,
            }
        }
        Ok(out)
    }

    pub(crate) fn len(&self) -> usize {
        let rest = self.rest.iter().flat_map(|r| r.iter());
        self.head.len() + self.body.len() + rest.map(Part::len).sum::<usize>()
    }
}

impl From<Bytes> for Args {
    fn from(body: Bytes) -> Self {
        Args {
            body,
            ..Args::default()
        }
    }
}

/// Part of a task's arguments after its `body`.
#[derive(Debug, Clone)]
pub(crate) enum Part {
    Bytes(Bytes),
    Deferred(Arc<Deferred>),
}

impl Part {
    pub(crate) fn len(&self) -> usize {
        match self {
            Part::Bytes(b) => b.len(),
            Part::Deferred(d) => d.len,
        }
    }
}

/// A large map item, encoded once by the caller to check that it can be (and to learn
/// its size) without keeping the bytes, and again by the dispatcher when it is sent,
/// straight into a buffer it reuses. Encoding it up front would write every byte into
/// fresh memory, which costs more than the copies (BENCHMARKS.md).
pub(crate) struct Deferred {
    /// Its encoded size, from the first encoding.
    pub(crate) len: usize,
    pub(crate) type_name: &'static str,
    item: Box<dyn Reencode>,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Deferred({}, {} bytes)", self.type_name, self.len)
    }
}

trait Reencode: Send + Sync {
    fn encode(&self, out: &mut Counted<'_>) -> Result<(), String>;
}

/// A writer that counts what it took, and notes when it ran out of room (a slice writer
/// takes no more than fits).
pub(crate) struct Counted<'a> {
    inner: &'a mut dyn std::io::Write,
    n: usize,
    full: bool,
}

impl std::io::Write for Counted<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.n += n;
        self.full |= n < data.len();
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A `Mutex` only to be `Sync`: it is never contended.
struct Held<T>(std::sync::Mutex<T>);

impl<T: serde::Serialize + Send> Reencode for Held<T> {
    fn encode(&self, out: &mut Counted<'_>) -> Result<(), String> {
        let item = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
        item.serialize(crate::wire::SomeCheck::new(&mut ser))
            .map_err(|e| e.to_string())
    }
}

impl Deferred {
    /// `item`, whose encoding took no handle and was `len` bytes long.
    pub(crate) fn new<T: serde::Serialize + Send + 'static>(item: T, len: usize) -> Self {
        Deferred {
            len,
            type_name: std::any::type_name::<T>(),
            item: Box::new(Held(std::sync::Mutex::new(item))),
        }
    }

    /// Appends the item's encoding to `out`, or nothing and why not: its encoding may
    /// fail, panic, take a handle, or differ in size now (the caller saw none of that).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let start = out.len();
        self.encode_to(out).inspect_err(|_| out.truncate(start))
    }

    /// Writes the item's encoding to `out` (which may have taken part of it when this
    /// fails; see [`encode_into`](Self::encode_into) for why it may).
    pub(crate) fn encode_to(&self, out: &mut dyn std::io::Write) -> Result<(), Error> {
        let mut out = Counted {
            inner: out,
            n: 0,
            full: false,
        };
        let (res, pins) = crate::sync::collect(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.item.encode(&mut out)))
        });
        let res = match res {
            Err(_) => Err("its Serialize panicked when it was encoded again".to_owned()),
            Ok(Err(_)) if out.full => Err(format!(
                "it was {} bytes when first encoded, more when encoded again",
                self.len
            )),
            Ok(Err(reason)) => Err(reason),
            Ok(Ok(())) if !pins.is_empty() => {
                Err("it took a handle when it was encoded again".to_owned())
            }
            Ok(Ok(())) if out.n != self.len => Err(format!(
                "it was {} bytes when first encoded, {} bytes when encoded again",
                self.len, out.n
            )),
            Ok(Ok(())) => Ok(()),
        };
        res.map_err(|reason| Error::Encode {
            type_name: self.type_name.to_owned(),
            reason,
        })
    }
}

/// One unit of work: a call of a target, or one chunk of a map.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) target: TargetRef,
    pub(crate) args: Args,
    pub(crate) reply: Reply,
    /// It took a place in the queue (see `Shared::admission`), which the dispatcher
    /// gives back when the task leaves the queue.
    pub(crate) admitted: bool,
    /// Its own limit on its execution (`run_timeout`), counted from when it starts in a
    /// worker; in place of the pool's `task_timeout`.
    pub(crate) run_timeout: Option<std::time::Duration>,
    /// The span it was submitted in, registered for its events while the task lives.
    pub(crate) span: Option<crate::log::TaskSpan>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("target", &self.target.name)
            .field("args", &self.args.len())
            .finish_non_exhaustive()
    }
}

/// Caller to dispatcher.
#[derive(Debug)]
pub(crate) enum Command {
    Submit(Job),
    /// The caller gave up on task `id` (dropped, or its own timeout expired).
    Cancel {
        id: u64,
        /// Whether a running task's worker is stopped (`Builder::kill_on_cancel`, or the
        /// call's own `kill_on_cancel`); `None`: the pool's setting.
        kill: Option<bool>,
    },
    /// Task `id`, submitted already, may run at most `after` from its start (see
    /// `Job::run_timeout`); if it has run longer, it is stopped now.
    RunTimeout {
        id: u64,
        after: std::time::Duration,
    },
    /// Finish queued work, stop the workers, then answer.
    Close {
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// Kill everything now, fail every outstanding task, then answer.
    Terminate {
        done: tokio::sync::oneshot::Sender<()>,
    },
}
