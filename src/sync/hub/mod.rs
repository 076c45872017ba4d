//! The hub: how a `Queue`, `Lock` or `Event` created in one process is reached from the
//! others, and how a pipe end's file descriptor travels to another process.
//!
//! Every process that hands one of its objects to another process starts a hub: a unix
//! socket in the abstract namespace (`procpool/<pid>/<nonce>`), served on the procpool
//! service thread. A handle crosses the boundary as `(hub address, token, object id,
//! object key)`: the token lets a process of the same user connect, and the key, random
//! per object, is the capability to open that one object (ids alone are a counter). A
//! pipe end parked for a claim has a key of its own too, so holding one handle opens
//! nothing else. Each side checks the other's uid (`SO_PEERCRED`).
//! Another process deserializing it connects to that hub once (one connection per pair of
//! processes, shared by every object) and opens the object; the hub keeps an object alive
//! while a process has it open, and forgets what a process held when its connection ends.
//! That is how a lock whose holder dies is released and how items a dead consumer had
//! taken but not yet handed out are put back.
//!
//! A pipe end travels differently: its fd is parked in the hub's export table, and the
//! receiver claims it over a short-lived connection with `SCM_RIGHTS`, so afterwards the
//! two ends talk over their own socketpair, with no process in between.
//!
//! Connections are authenticated by a random token (and the peer's uid), and every frame
//! is length-prefixed MessagePack with the same codec as the child channel.
//!
//! # How long an object lives
//!
//! A handle serialized as a task's (or a `Process`'s) argument keeps its object alive
//! until that child is done with it (the [`Pins`] the encoding took). A handle serialized
//! any other way (inside a queue item or a pipe message, or by the program itself) gets a
//! *ticket*: its object stays alive until a process decodes that copy (which sends
//! `Unpin`), or until this process exits. A put that fails gives its tickets back at
//! once. What is serialized and never decoded (an item in a queue that is dropped full)
//! keeps its object until this process exits. A handle of *another* process's object,
//! forwarded inside an item, takes no ticket (its owner is elsewhere): the object lives
//! while some process holds it open, so keep a handle until the receiver has decoded its
//! copy.

use std::any::Any;
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, oneshot};
use tokio_util::codec::FramedRead;

use crate::error::Error;
use crate::wire::{self, frame_into};

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here updates plain fields without calling user code).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The largest frame on a hub connection (the child channel's limit).
const MAX_FRAME: usize = wire::DEFAULT_MAX_FRAME;

/// The largest frame a connection may send before it is authenticated: its Hello.
const MAX_HELLO: usize = 4 * 1024;
/// How long a new connection has to send its Hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest encoded queue item: a frame, less room for the message around it (a
/// larger one is `Error::Encode` at `put`, before anything is sent).
pub(crate) const MAX_ITEM: usize = MAX_FRAME - 64 * 1024;

/// How long a claim of a pipe end may take before it is given up.
pub(crate) const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call that answers at once (`Event::is_set`, `Queue::len`,
/// `Lock::try_lock`, ...) waits for the owner of the object before it fails with
/// `Error::Timeout`, and how long [`settle`] waits for the owners to confirm what this
/// process sent: an owner answers from its procpool thread in microseconds unless it is
/// stopped or overloaded.
pub(crate) const OWNER_TIMEOUT: Duration = Duration::from_secs(10);

/// [`OWNER_TIMEOUT`], or what a test set with [`set_owner_timeout`] (in nanoseconds).
static OWNER_TIMEOUT_NS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn owner_timeout() -> Duration {
    match OWNER_TIMEOUT_NS.load(Ordering::Relaxed) {
        0 => OWNER_TIMEOUT,
        ns => Duration::from_nanos(ns),
    }
}

/// Shortens (for this process) how long calls wait for a stuck owner, so that tests of
/// that bound need not take [`OWNER_TIMEOUT`].
#[doc(hidden)]
pub fn set_owner_timeout(d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    OWNER_TIMEOUT_NS.store(ns, Ordering::Relaxed);
}

/// Polls `fut` on this thread (no runtime needed) until it is ready or `limit` passed.
pub(crate) fn wait_for<F: std::future::Future + Unpin>(
    fut: &mut F,
    limit: Duration,
) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl futures::task::ArcWake for Unpark {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.unpark();
        }
    }
    let waker = futures::task::waker(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let std::task::Poll::Ready(v) = std::pin::Pin::new(&mut *fut).poll(&mut cx) {
            return Some(v);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::park_timeout(left);
    }
}

/// Where a hub listens and the token that opens it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct HubRef {
    pub(crate) name: String,
    pub(crate) token: u64,
}

impl HubRef {
    /// Connects to the hub, and checks that a process of this user serves it (an
    /// abstract socket name can be bound by anyone in the network namespace).
    fn connect(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        let addr = SocketAddr::from_abstract_name(self.name.as_bytes())?;
        let sock = std::os::unix::net::UnixStream::connect_addr(&addr)?;
        let cred = rustix::net::sockopt::socket_peercred(&sock)?;
        if cred.uid != rustix::process::geteuid() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the socket {} is served by uid {}, not this process's user",
                    self.name,
                    cred.uid.as_raw()
                ),
            ));
        }
        Ok(sock)
    }
}

/// What kind of object an id names (checked when a process opens it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Kind {
    Queue,
    Lock,
    Event,
    Barrier,
    Condition,
    Dict,
}

/// An object this process's hub serves to other processes: what a session does with the
/// frames that name it. Each kind (queue, lock, event) implements it, so the hub knows no
/// kind: it checks a [`Kind`] when a process opens an object and passes the rest on.
///
/// Every method runs on the session's task (procpool's service thread) and must not
/// block: it updates the object under its own mutex and answers through `peer`, whose
/// outbox never waits. A frame that does not apply to the object's kind (`Puts` to a lock,
/// `Release` to a queue) comes only from a process that broke the protocol (a process
/// opens an object only with its kind, and sends only that kind's frames): the default
/// hooks ignore it (as before: it changes nothing here).
pub(crate) trait Served: AsAny + Send + Sync {
    /// What kind it is (a process opens it only with this kind).
    fn kind(&self) -> Kind;

    /// Requests of other processes waiting in this object.
    fn parked(&self) -> usize;

    /// Request `id` of `peer` (answered through `peer`, at once or when it can be).
    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op);

    /// `peer` gave up request `id`: if it still waits here it leaves its line and is
    /// answered `Cancelled` (which clears it on the other side); if not, it was answered
    /// already.
    fn cancel(&self, peer: &Peer, id: u64);

    /// The process behind `peer` no longer uses this object (it let go of its last
    /// handle, or its connection ended): undo what it held.
    fn peer_gone(self: Arc<Self>, peer: &Arc<Peer>);

    /// `ToHub::Puts`: items for an unbounded queue.
    fn puts(&self, _items: Vec<ByteBuf>) {}

    /// `ToHub::Ack`: `peer` handed out every item it got up to sequence number `upto`.
    fn ack(&self, _peer: &Peer, _upto: u64) {}

    /// `ToHub::Return`: `peer` gives back items `from..=to` that it did not hand out.
    fn give_back(&self, _peer: &Peer, _from: u64, _to: u64) {}

    /// `ToHub::Release`: `peer` lets go of the lock it holds.
    fn release_peer(self: Arc<Self>, _peer: &Peer) {}
}

/// The concrete object behind a [`Served`], for `Core::from_obj` (a supertrait, not a
/// method each kind writes; and not trait upcasting, newer than the crate's Rust).
pub(crate) trait AsAny {
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Any + Send + Sync> AsAny for T {
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// An object owned by this process's hub.
pub(crate) type Obj = Arc<dyn Served>;

type WeakObj = Weak<dyn Served>;

// ---------------------------------------------------------------------------------------
// Protocol

/// What the first frame of a connection asks for.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Purpose {
    /// A long-lived connection carrying requests for any number of objects.
    Session,
    /// A session of one thread's blocking calls (see `direct`): it asks, waits for the
    /// answer and soon asks again, so the hub looks for its next request a while before
    /// it sleeps.
    Direct,
    /// Hand over exported pipe end `export`, whose key is `key`, then close.
    Claim { export: u64, key: u64 },
}

/// A process using an object, to its creator's hub.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToHub {
    Hello {
        token: u64,
        purpose: Purpose,
    },
    /// This process holds a handle to `obj`, whose key is `key` (sent once per process;
    /// an unknown id, a wrong key or kind opens nothing, and requests for it are `Gone`).
    Open {
        obj: u64,
        kind: Kind,
        key: u64,
    },
    /// This process decoded the copy of a handle to `obj` that `ticket` kept alive.
    Unpin {
        obj: u64,
        ticket: u64,
    },
    /// This process dropped its last handle to `obj`.
    Forget {
        obj: u64,
    },
    /// A request; the answer is `FromHub::Reply` with the same id (0: no answer wanted).
    Req {
        id: u64,
        obj: u64,
        op: Op,
    },
    /// Items for an unbounded queue, in order; no answer.
    Puts {
        obj: u64,
        items: Vec<ByteBuf>,
    },
    /// Every item delivered to this process with a sequence number `<= upto` was handed
    /// to a caller.
    Ack {
        obj: u64,
        upto: u64,
    },
    /// Items `from..=to` delivered to this process were not handed out: put them back.
    Return {
        obj: u64,
        from: u64,
        to: u64,
    },
    /// The caller of request `id` gave up.
    Cancel {
        obj: u64,
        id: u64,
    },
    /// Releases the lock this process holds.
    Release {
        obj: u64,
    },
}

/// Operations on objects.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Op {
    /// Answered `Ok` once everything sent before it on this connection has been applied.
    Sync,
    Put {
        item: ByteBuf,
        wait: bool,
    },
    /// Up to `n` items (and about `MAX_BATCH_BYTES`); parked while empty if `wait`.
    Want {
        n: u32,
        wait: bool,
    },
    Len,
    Close,
    TaskDone,
    Join,
    /// A lock; `Bool(false)` if not free and not `wait`.
    Acquire {
        wait: bool,
    },
    Set,
    Clear,
    /// An event's flag; a barrier's `broken`.
    IsSet,
    /// An event's wait; a barrier party's arrival.
    Wait,
    /// A barrier's `reset()`.
    Reset,
    /// A barrier's `abort()`.
    Abort,
    /// A condition's waiter enters: answered `Len(ticket)`.
    CondEnter,
    /// A condition's waiter waits on its ticket: answered `Ok` when woken.
    CondWait {
        ticket: u64,
    },
    /// A condition's waiter gives its ticket up.
    CondLeave {
        ticket: u64,
    },
    /// A condition's `notify_one` / `notify_all`.
    Notify {
        all: bool,
    },
    /// A dict's `insert`: answered `Entry` with the value it replaced.
    DictInsert {
        key: ByteBuf,
        value: ByteBuf,
    },
    /// A dict's `get`: answered `Entry` with the value and its version.
    DictGet {
        key: ByteBuf,
    },
    /// A dict's `remove`: answered `Entry` with the value it took out.
    DictRemove {
        key: ByteBuf,
    },
    /// A dict's `contains_key`: answered `Bool`.
    DictContains {
        key: ByteBuf,
    },
    /// A dict's keys and/or values in insertion order: answered `Entries`.
    DictEntries {
        keys: bool,
        values: bool,
    },
    /// A dict's compare-and-swap (`update`): writes `value` if the key's version is
    /// still `version` (0: absent); answered `Bool(written)`.
    DictSetIf {
        key: ByteBuf,
        version: u64,
        value: ByteBuf,
    },
}

/// A hub to a process using its objects.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromHub {
    Reply {
        id: u64,
        reply: Reply,
    },
    /// Give back what you hold of `obj` and have not handed out: someone else is waiting.
    Recall {
        obj: u64,
    },
}

/// Answers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Ok,
    Bool(bool),
    Len(u64),
    /// Queue items, numbered from `first`.
    Items {
        first: u64,
        items: Vec<ByteBuf>,
    },
    Empty,
    Full,
    /// The queue was closed.
    Closed,
    /// The request was cancelled before it took effect.
    Cancelled,
    Granted {
        abandoned: bool,
    },
    /// A barrier party went through: its arrival index, and whether it came last.
    Passed {
        index: u64,
        leader: bool,
    },
    /// The barrier is broken.
    Broken,
    /// No such object (it was dropped everywhere, or the id is of another kind).
    Gone,
    /// The request is not valid (`task_done` called too often).
    Invalid(String),
    /// A dict entry: its value (`None`: no such key) and version (0: none).
    Entry {
        value: Option<ByteBuf>,
        version: u64,
    },
    /// A dict's keys and values in insertion order (each empty unless asked for).
    Entries {
        keys: Vec<ByteBuf>,
        values: Vec<ByteBuf>,
    },
}

// This file: the protocol (what crosses a hub connection) and what every part shares.
mod client; // this process using another process's objects
mod direct; // blocking calls on the caller's own connection
mod outbox; // frames waiting for a connection's writer
mod pins; // what keeps an object alive until its receiver has it
mod server; // this process's hub: tables, listener, sessions, claims
#[cfg(test)]
mod tests;

pub(crate) use client::*;
pub(crate) use direct::{SpinRead, call as direct_call};
pub(crate) use outbox::*;
pub(crate) use pins::*;
pub(crate) use server::*;
pub use server::{Tables, tables};
