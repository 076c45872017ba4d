//! `Queue<T>`: a multi-producer, multi-consumer FIFO shared by any number of processes.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::ByteBuf;
use tokio::sync::{Notify, oneshot};

use super::hub::{self, Kind, Op, Peer, Remote, Reply, Served, lock};
use super::{Access, Core, Handle, wait_until};
use crate::error::{Error, Result};
use crate::runtime::timer::{self, Sleep};
use crate::wire;

/// About how many bytes of items one answer to a consumer carries (at least one item).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// The most items a consumer process asks for at once.
const MAX_PREFETCH: u32 = 1024;

mod owner; // the queue in its owner process
mod remote; // another process's queue, as this process sees it

pub(crate) use owner::QueueCore;
use owner::*;
pub(crate) use remote::Buffer;

// ---------------------------------------------------------------------------------------
// The handle

/// A FIFO queue shared by processes: Python's `multiprocessing.Queue`, async.
///
/// Create it in any process, clone it, and pass clones to children as ordinary arguments
/// (to [`Process`](crate::Process) or to pool tasks); every holder can put and get.
/// Each item is delivered to exactly one `get`; items from one producer come out in the
/// order they were put. Items travel as MessagePack, like task arguments.
///
/// ```
/// use procpool::{Process, Queue};
///
/// fn producer(q: Queue<i32>) {
///     for i in 0..3 {
///         q.blocking_put(i).expect("the parent keeps the queue");
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let q = Queue::new();
/// let mut p = Process::new(producer, (q.clone(),));
/// p.start().await?;
/// for i in 0..3 {
///     assert_eq!(q.get().await?, i);
/// }
/// p.join().await?;
/// # Ok(())
/// # }
/// ```
///
/// # How it works, and what it costs
///
/// The queue lives in the process that created it (its *owner*). Other processes reach
/// it over one unix socket each, served by the owner's procpool thread; so the queue
/// works for as long as its owner runs, and calls from other processes fail with
/// [`Error::Closed`] after the owner exits. From the owner, every call is a few
/// instructions under a mutex.
///
/// From another process, `put` on an unbounded queue returns as soon as the item is
/// queued for sending (puts are batched; `Ok` means accepted for delivery, and
/// [`flush`](Self::flush) waits until the owner has it), and `get` prefetches: a consumer that keeps
/// taking items receives them in growing batches. Items a process prefetched but did not
/// hand out go back to the front of the queue when another consumer is waiting, when
/// the process drops its last handle, or when it dies; so nothing is lost and nothing is
/// delivered twice. Only if a consumer process dies in the instant between handing an
/// item to its caller and acknowledging it (the acknowledgement is sent at once, in the
/// background) can that item be delivered again.
///
/// A bounded queue counts prefetched items as in the queue; a `put` to it from another
/// process takes one round trip to the owner.
///
/// Before a child reports its result, everything it sent to queues, locks and events
/// has been applied: once `join` or a task's result returns, the parent sees the items
/// the child put.
///
/// # Lifetime
///
/// The queue (and its items) is freed when no process holds a handle any more. A handle
/// sent as an argument keeps the queue alive until the receiving child is done with it;
/// one serialized by other means (inside an item of another queue, or a pipe message,
/// as in Python's `q.put((job, reply_q))`) keeps it alive until a process decodes that
/// copy, and a put or send that fails lets go of it at once. A copy that is never
/// decoded (an item left in a queue that is dropped) keeps the queue until its owner
/// exits.
///
/// Dropping a handle does nothing else: items stay for the other holders.
pub struct Queue<T> {
    h: Handle<QueueCore>,
    cap: Option<usize>,
    _t: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            h: self.h.clone(),
            cap: self.cap,
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("id", &self.h.id)
            .field("owned_here", &matches!(self.h.access, Access::Local(_)))
            .field("bounded", &self.cap)
            .finish()
    }
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Why [`Queue::try_put`] did not put an item; the item comes back.
#[derive(Debug)]
#[non_exhaustive]
pub enum TryPutError<T> {
    /// The queue is bounded and full.
    Full(T),
    /// The queue was closed, or its owner process is gone.
    Closed(T),
    /// Something else failed (the item cannot be encoded, for example).
    Failed(Error),
}

impl<T> fmt::Display for TryPutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryPutError::Full(_) => f.write_str("the queue is full"),
            TryPutError::Closed(_) => f.write_str("the queue is closed"),
            TryPutError::Failed(e) => e.fmt(f),
        }
    }
}

impl<T: fmt::Debug> std::error::Error for TryPutError<T> {}

impl<T> Queue<T> {
    /// An unbounded queue owned by this process.
    pub fn new() -> Self {
        Self::with_cap(None)
    }

    /// A queue that holds at most `n` items (at least 1): `put` waits for room, in
    /// every process.
    pub fn bounded(n: usize) -> Self {
        Self::with_cap(Some(n.max(1)))
    }

    fn with_cap(cap: Option<usize>) -> Self {
        let core = QueueCore::new(cap);
        Queue {
            h: Handle::local(core.id, core),
            cap,
            _t: PhantomData,
        }
    }

    /// How many items are in the queue (including items other processes fetched and
    /// have not handed out yet). From another process this asks the owner (a round trip,
    /// blocking this thread briefly). Like Python's `qsize`, it may be stale as soon as
    /// it returns. 0 if the owner is gone.
    pub fn len(&self) -> usize {
        match &self.h.access {
            Access::Local(core) => core.len(),
            Access::Remote(r) => match r.blocking_call(Op::Len) {
                Ok(Reply::Len(n)) => n as usize,
                _ => 0,
            },
            Access::Dead(_) => 0,
        }
    }

    /// `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the queue for everyone: further puts fail with [`Error::Closed`]; gets
    /// return the remaining items, then [`Error::Closed`] (so consumers can stop without
    /// a sentinel). Waiting producers and consumers are woken with that error.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// [`Error::Timeout`] if, from another process, the owner does not answer within 10 s
    /// (see [Queues, pipes, locks and events](crate#queues-pipes-locks-and-events)).
    pub fn close(&self) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => {
                core.close();
                Ok(())
            }
            Access::Remote(r) => expect_ok(r.blocking_call(Op::Close)?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// Marks one item taken from the queue as processed (Python's
    /// `JoinableQueue.task_done`). [`join`](Self::join) returns once every item ever put
    /// was marked.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if called more times than items were put;
    /// [`Error::Closed`] if the owner is gone.
    ///
    /// [`Error::Timeout`] if, from another process, the owner does not answer within 10 s
    /// (see [Queues, pipes, locks and events](crate#queues-pipes-locks-and-events)).
    pub fn task_done(&self) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => core
                .task_done()
                .map_err(|reason| Error::InvalidConfig { reason }),
            Access::Remote(r) => expect_ok(r.blocking_call(Op::TaskDone)?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// Waits until every item put has been marked with [`task_done`](Self::task_done)
    /// (Python's `JoinableQueue.join`).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn join(&self) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => {
                wait_until(&core.changed, || (core.unfinished() == 0).then_some(())).await;
                Ok(())
            }
            Access::Remote(r) => expect_ok(r.call(Op::Join).await?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// Waits until everything this process sent to the queue's owner has been applied
    /// there: every [`put`](Self::put) that returned `Ok` is in the queue, every item
    /// handed out here is acknowledged. In the owner, returns at once.
    ///
    /// From another process, a `put` to an unbounded queue returns `Ok` when the item is
    /// *accepted for delivery*: it reaches the owner unless this process dies (an abort,
    /// a signal, `std::process::exit`) before it is sent. After `flush` returns, nothing
    /// this process did to the queue can be lost any more. A task's or a `Process`
    /// target's end flushes by itself (before its result or exit is reported), so only
    /// code that must survive its own crash needs `flush`: a consumer that forwards each
    /// item it takes to another queue, say, calls `flush` on the second queue before it
    /// counts the item as done. A process's operations reach an owner in order, so a
    /// process that dies leaves there a prefix of what it did.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner is gone (what was not applied is lost with it).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped flush only stops waiting.
    pub async fn flush(&self) -> Result<()> {
        match &self.h.access {
            Access::Local(_) => Ok(()),
            Access::Remote(r) => expect_ok(r.call(Op::Sync).await?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// [`flush`](Self::flush) from synchronous code (a plain target).
    ///
    /// # Errors
    ///
    /// As [`flush`](Self::flush).
    pub fn blocking_flush(&self) -> Result<()> {
        futures::executor::block_on(self.flush())
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// Puts `item` at the back, waiting for room if the queue is bounded and full.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the item cannot be encoded; [`Error::Closed`] if the queue
    /// was closed or its owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the item was either
    /// put or not, never put twice; only an unbounded queue's put completes without
    /// waiting, and a bounded put dropped while waiting for room is withdrawn.
    pub async fn put(&self, item: T) -> Result<()> {
        let (bytes, pins) = encode(&item)?;
        let pins = pins.until_decoded();
        let certain = !matches!(self.h.access, Access::Remote(_));
        let put = self.put_bytes(bytes).await;
        settled(put, pins, certain)
    }

    async fn put_bytes(&self, bytes: Vec<u8>) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => {
                // Full hands the item back for the next try.
                let mut item = Some(bytes);
                wait_until(&core.changed, || match core.put(item.take()?) {
                    Put::Done => Some(Ok(())),
                    Put::Closed => Some(Err(Error::Closed)),
                    Put::Full(back) => {
                        item = Some(back);
                        None
                    }
                })
                .await
            }
            Access::Remote(r) if self.cap.is_none() => match r.put_unbounded(bytes) {
                true => Ok(()),
                false => Err(Error::Closed),
            },
            Access::Remote(r) => expect_ok(
                r.call(Op::Put {
                    item: ByteBuf::from(bytes),
                    wait: true,
                })
                .await?,
            ),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// [`put`](Self::put), giving up after `d` with [`Error::Timeout`] if the queue stays
    /// full. A timed-out item was not put. With room now, it puts at once (a zero `d`
    /// makes it a `try_put` that answers [`Error::Timeout`] when full).
    ///
    /// Works under any executor: inside a tokio runtime the limit is that runtime's timer
    /// (it follows paused time), elsewhere (`futures::executor::block_on`, a plain
    /// target) a timer on procpool's own thread.
    ///
    /// # Errors
    ///
    /// As for `put`, and [`Error::Timeout`].
    ///
    /// # Panics
    ///
    /// Inside a tokio runtime built without timers (as `tokio::time::timeout`).
    ///
    /// # Cancel safety
    ///
    /// As for `put`.
    pub async fn put_timeout(&self, item: T, d: Duration) -> Result<()> {
        self.put_within(item, d, Sleep::new(d)).await
    }

    /// [`put_timeout`](Self::put_timeout) for synchronous code: blocks this thread at
    /// most about `d` (then the put is withdrawn; from another process, the owner's
    /// answer to the withdrawal says whether it made it in first). Needs no runtime.
    /// Do not call it from async code (use `put_timeout`).
    ///
    /// # Errors
    ///
    /// As for `put`, and [`Error::Timeout`].
    pub fn blocking_put_timeout(&self, item: T, d: Duration) -> Result<()> {
        let at = timer::deadline_in(d);
        timer::block_on_until(self.put_within(item, d, Sleep::parked_until(at)), at)
    }

    /// [`put_timeout`](Self::put_timeout) with its timer, `d` long.
    async fn put_within(&self, item: T, d: Duration, sleep: Sleep) -> Result<()> {
        let (bytes, pins) = encode(&item)?;
        let pins = pins.until_decoded();
        let certain = !matches!(self.h.access, Access::Remote(_));
        let put = match &self.h.access {
            Access::Remote(r) if self.cap.is_some() => {
                let (id, rx) = r.request(Op::Put {
                    item: ByteBuf::from(bytes),
                    wait: true,
                })?;
                let guard = r.withdraw_on_drop(id);
                tokio::pin!(rx);
                let reply = match timer::timeout(sleep, &mut rx).await {
                    Some(reply) => reply,
                    None => {
                        // Withdraw it; the answer says whether it made it in first.
                        r.cancel(id);
                        rx.await
                    }
                };
                guard.disarm();
                match reply.map_err(|_| Error::Closed)?.take() {
                    Reply::Cancelled => Err(Error::Timeout { after: d }),
                    other => expect_ok(other),
                }
            }
            _ => match timer::timeout(sleep, self.put_bytes(bytes)).await {
                Some(r) => r,
                None => Err(Error::Timeout { after: d }),
            },
        };
        if matches!(put, Err(Error::Timeout { .. })) {
            // Withdrawn (the owner said so) or never put: certain either way.
            pins.refused();
            return put;
        }
        settled(put, pins, certain)
    }

    /// Puts `item` if there is room now.
    ///
    /// From another process, on a bounded queue, this asks the owner (a round trip,
    /// blocking this thread briefly).
    ///
    /// # Errors
    ///
    /// [`TryPutError::Full`] or [`TryPutError::Closed`] with the item;
    /// [`TryPutError::Failed`] if it cannot be encoded.
    pub fn try_put(&self, item: T) -> std::result::Result<(), TryPutError<T>> {
        let (bytes, pins) = match encode(&item) {
            Ok(b) => b,
            Err(e) => return Err(TryPutError::Failed(e)),
        };
        let pins = pins.until_decoded();
        let put = match &self.h.access {
            Access::Local(core) => match core.put(bytes) {
                Put::Done => Ok(()),
                Put::Full(_) => Err(TryPutError::Full(item)),
                Put::Closed => Err(TryPutError::Closed(item)),
            },
            Access::Remote(r) if self.cap.is_none() => match r.put_unbounded(bytes) {
                true => Ok(()),
                false => Err(TryPutError::Closed(item)),
            },
            Access::Remote(r) => match r.blocking_call(Op::Put {
                item: ByteBuf::from(bytes),
                wait: false,
            }) {
                Ok(Reply::Ok) => Ok(()),
                Ok(Reply::Full) => Err(TryPutError::Full(item)),
                Ok(Reply::Closed | Reply::Gone) | Err(Error::Closed) => {
                    Err(TryPutError::Closed(item))
                }
                Ok(other) => Err(TryPutError::Failed(unexpected(other))),
                Err(e) => Err(TryPutError::Failed(e)),
            },
            Access::Dead(_) => Err(TryPutError::Closed(item)),
        };
        // Full is the owner's word; `Closed` and failures (a timeout: the put may still
        // land) keep what the item refers to, to be safe.
        if matches!(put, Err(TryPutError::Full(_)))
            || (!matches!(self.h.access, Access::Remote(_)) && put.is_err())
        {
            pins.refused();
        }
        put
    }

    /// Takes the item at the front, waiting until there is one.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the item is not a `T` (it is consumed); [`Error::Closed`]
    /// once the queue is closed and empty, or its owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: an item is taken only when the future completes with it. Items
    /// already fetched for this process when the future is dropped stay buffered for the
    /// next `get` here, or go back to the queue as soon as a consumer elsewhere waits.
    pub async fn get(&self) -> Result<T> {
        let bytes = match &self.h.access {
            Access::Local(core) => {
                wait_until(&core.changed, || match core.take() {
                    Take::Item(item) => Some(Ok(item)),
                    Take::Closed => Some(Err(Error::Closed)),
                    Take::Empty => None,
                })
                .await?
            }
            Access::Remote(r) => r.get().await?,
            Access::Dead(_) => return Err(Error::Closed),
        };
        decode(&bytes)
    }

    /// [`get`](Self::get), giving up after `d` with [`Error::Timeout`]. An item there
    /// now is taken at once (a zero `d` makes it a `try_get` that answers
    /// [`Error::Timeout`] when empty).
    ///
    /// Works under any executor: inside a tokio runtime the limit is that runtime's timer
    /// (it follows paused time), elsewhere (`futures::executor::block_on`, a plain
    /// target) a timer on procpool's own thread.
    ///
    /// # Errors
    ///
    /// As for `get`, and [`Error::Timeout`].
    ///
    /// # Panics
    ///
    /// Inside a tokio runtime built without timers (as `tokio::time::timeout`).
    ///
    /// # Cancel safety
    ///
    /// As for `get`.
    pub async fn get_timeout(&self, d: Duration) -> Result<T> {
        match timer::timeout(Sleep::new(d), self.get()).await {
            Some(r) => r,
            None => Err(Error::Timeout { after: d }),
        }
    }

    /// [`get_timeout`](Self::get_timeout) for synchronous code: blocks this thread at
    /// most about `d`. Needs no runtime. Do not call it from async code (use
    /// `get_timeout`).
    ///
    /// # Errors
    ///
    /// As for `get`, and [`Error::Timeout`]. Items fetched for this process when the
    /// time runs out stay buffered, as for a dropped `get`.
    pub fn blocking_get_timeout(&self, d: Duration) -> Result<T> {
        let at = timer::deadline_in(d);
        let get = timer::timeout(Sleep::parked_until(at), self.get());
        match timer::block_on_until(get, at) {
            Some(r) => r,
            None => Err(Error::Timeout { after: d }),
        }
    }

    /// Takes the item at the front if there is one now (`Ok(None)` if the queue is
    /// empty). From another process with nothing prefetched, this asks the owner (a
    /// round trip, blocking this thread briefly).
    ///
    /// # Errors
    ///
    /// As for [`get`](Self::get).
    ///
    /// [`Error::Timeout`] if, from another process, the owner does not answer within 10 s
    /// (see [Queues, pipes, locks and events](crate#queues-pipes-locks-and-events)).
    pub fn try_get(&self) -> Result<Option<T>> {
        let bytes = match &self.h.access {
            Access::Local(core) => match core.take() {
                Take::Item(item) => item,
                Take::Empty => return Ok(None),
                Take::Closed => return Err(Error::Closed),
            },
            Access::Remote(r) => match r.try_get()? {
                Some(item) => item,
                None => return Ok(None),
            },
            Access::Dead(_) => return Err(Error::Closed),
        };
        decode(&bytes).map(Some)
    }

    /// [`put`](Self::put) for synchronous code: blocks this thread. Do not call it from
    /// async code (use `put`).
    ///
    /// # Errors
    ///
    /// As for `put`.
    pub fn blocking_put(&self, item: T) -> Result<()> {
        futures::executor::block_on(self.put(item))
    }

    /// [`get`](Self::get) for synchronous code: blocks this thread. Do not call it from
    /// async code (use `get`).
    ///
    /// # Errors
    ///
    /// As for `get`.
    pub fn blocking_get(&self) -> Result<T> {
        futures::executor::block_on(self.get())
    }
}

/// Encodes an item; the pins keep the handles and pipe ends in it alive until it is
/// decoded (`Pins::keep` once it is put), or let go of them if it is not put (dropped).
fn encode<T: Serialize>(item: &T) -> Result<(Vec<u8>, hub::Pins)> {
    let (bytes, pins) = hub::collect_sent(|| wire::encode_value(item));
    let bytes = bytes.map_err(Error::encode::<T>)?;
    if bytes.len() > super::hub::MAX_ITEM {
        // Refused here, before anything is sent: the owner would reject the frame and
        // end the connection (the item lost, and any lock held through it released).
        return Err(Error::Encode {
            type_name: std::any::type_name::<T>().to_owned(),
            reason: format!(
                "{} bytes encoded; a queue item holds at most {} bytes",
                bytes.len(),
                super::hub::MAX_ITEM
            ),
        });
    }
    Ok((bytes, pins))
}

/// Keeps `pins` if `put` succeeded (see [`encode`]); drops them otherwise.
/// Keeps `pins` unless `put` certainly did not put the item: an error from this
/// process's own queue (`certain`); from another process's, only the owner could say,
/// and an error there may come after the item went (a connection that broke).
fn settled<R>(put: Result<R>, pins: hub::UntilDecoded, certain: bool) -> Result<R> {
    if put.is_err() && certain {
        pins.refused();
    }
    put
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    wire::decode_value(bytes).map_err(Error::decode::<T>)
}

pub(crate) fn expect_ok(reply: Reply) -> Result<()> {
    match reply {
        Reply::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn unexpected(reply: Reply) -> Error {
    match reply {
        Reply::Closed | Reply::Gone => Error::Closed,
        Reply::Invalid(reason) => Error::InvalidConfig { reason },
        other => Error::Protocol {
            name: "hub".to_owned(),
            reason: format!("unexpected answer {other:?}"),
        },
    }
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.h.serialize(self.cap, s)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (h, cap) = Handle::deserialize(d)?;
        Ok(Queue {
            h,
            cap: cap.map(|c| c as usize),
            _t: PhantomData,
        })
    }
}
