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

use super::event::EventCore;
use super::lock::LockCore;
use super::queue::QueueCore;
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
}

/// An object owned by this process's hub.
#[derive(Clone)]
pub(crate) enum Obj {
    Queue(Arc<QueueCore>),
    Lock(Arc<LockCore>),
    Event(Arc<EventCore>),
}

#[derive(Clone)]
enum WeakObj {
    Queue(Weak<QueueCore>),
    Lock(Weak<LockCore>),
    Event(Weak<EventCore>),
}

impl Obj {
    fn kind(&self) -> Kind {
        match self {
            Obj::Queue(_) => Kind::Queue,
            Obj::Lock(_) => Kind::Lock,
            Obj::Event(_) => Kind::Event,
        }
    }

    fn downgrade(&self) -> WeakObj {
        match self {
            Obj::Queue(c) => WeakObj::Queue(Arc::downgrade(c)),
            Obj::Lock(c) => WeakObj::Lock(Arc::downgrade(c)),
            Obj::Event(c) => WeakObj::Event(Arc::downgrade(c)),
        }
    }

    /// The process behind `peer` no longer uses this object.
    fn peer_gone(&self, peer: &Arc<Peer>) {
        match self {
            Obj::Queue(c) => c.peer_gone(peer),
            Obj::Lock(c) => c.peer_gone(peer),
            Obj::Event(c) => c.peer_gone(peer),
        }
    }

    /// Requests of other processes waiting in this object.
    fn parked(&self) -> usize {
        match self {
            Obj::Queue(c) => super::Core::parked(&**c),
            Obj::Lock(c) => super::Core::parked(&**c),
            Obj::Event(c) => super::Core::parked(&**c),
        }
    }

    fn handle(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        match self {
            Obj::Queue(c) => c.remote_op(peer, id, op),
            Obj::Lock(c) => c.remote_op(peer, id, op),
            Obj::Event(c) => c.remote_op(peer, id, op),
        }
    }
}

impl WeakObj {
    fn upgrade(&self) -> Option<Obj> {
        match self {
            WeakObj::Queue(w) => w.upgrade().map(Obj::Queue),
            WeakObj::Lock(w) => w.upgrade().map(Obj::Lock),
            WeakObj::Event(w) => w.upgrade().map(Obj::Event),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Protocol

/// What the first frame of a connection asks for.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Purpose {
    /// A long-lived connection carrying requests for any number of objects.
    Session,
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
    Acquire {
        wait: bool,
    },
    Set,
    Clear,
    IsSet,
    Wait,
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
    /// No such object (it was dropped everywhere, or the id is of another kind).
    Gone,
    /// The request is not valid (`task_done` called too often).
    Invalid(String),
}

// ---------------------------------------------------------------------------------------
// Outbox: frames waiting for the writer task of one connection

/// Frames for one connection, written by a task on the service thread. Pushing never
/// blocks: callers on any thread (async or not) append, the writer takes everything
/// queued in one write.
pub(crate) struct Outbox {
    st: Mutex<OutState>,
    wake: Notify,
}

#[derive(Default)]
struct OutState {
    buf: BytesMut,
    /// Consecutive puts to one queue, sent as one `Puts` frame.
    puts: Option<(u64, Vec<ByteBuf>, usize)>,
    /// Latest acknowledgement per queue, sent before the next frame.
    acks: HashMap<u64, u64>,
    closed: bool,
}

impl OutState {
    fn flush(&mut self) {
        if let Some((obj, items, _)) = self.puts.take()
            && !frame_into(&mut self.buf, &ToHub::Puts { obj, items })
        {
            // Unreachable: every item is at most MAX_ITEM (checked when it is encoded)
            // and a batch never grows past it (`push_put`).
            tracing::error!("a batch of queue items over the frame limit was dropped");
        }
        for (obj, upto) in self.acks.drain() {
            if !frame_into(&mut self.buf, &ToHub::Ack { obj, upto }) {
                unreachable!("an acknowledgement is a few bytes");
            }
        }
    }
}

impl Outbox {
    fn new() -> Arc<Self> {
        Arc::new(Outbox {
            st: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Queues a frame. False if the connection is closed.
    pub(crate) fn push<M: Serialize>(&self, msg: &M) -> bool {
        let mut st = lock(&self.st);
        if st.closed {
            return false;
        }
        st.flush();
        if !frame_into(&mut st.buf, msg) {
            // Items are checked against MAX_ITEM when encoded; nothing else is large.
            tracing::error!("a hub message over the frame limit was not sent");
            return false;
        }
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Queues one item for an unbounded queue, batched with the puts before it.
    fn push_put(&self, obj: u64, item: Vec<u8>) -> bool {
        let mut st = lock(&self.st);
        if st.closed {
            return false;
        }
        let size = item.len();
        match &mut st.puts {
            // Small items go together; a batch never grows past what one frame holds.
            Some((o, items, bytes))
                if *o == obj && *bytes < 64 * 1024 && *bytes + size <= MAX_ITEM =>
            {
                items.push(ByteBuf::from(item));
                *bytes += size;
            }
            _ => {
                st.flush();
                st.puts = Some((obj, vec![ByteBuf::from(item)], size));
            }
        }
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Records that items up to `upto` were handed out (coalesced with earlier acks).
    fn push_ack(&self, obj: u64, upto: u64) {
        let mut st = lock(&self.st);
        if st.closed {
            return;
        }
        if let Some((o, _, _)) = &st.puts
            && *o != obj
        {
            st.flush();
        }
        // Callers on several threads may report out of order: keep the highest.
        let acked = st.acks.entry(obj).or_insert(upto);
        *acked = (*acked).max(upto);
        drop(st);
        self.wake.notify_one();
    }

    fn close(&self) {
        lock(&self.st).closed = true;
        self.wake.notify_one();
    }

    /// Writes queued frames until the outbox is closed and drained, or the peer is gone.
    async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(self: Arc<Self>, mut wr: W) {
        loop {
            let chunk = {
                let mut st = lock(&self.st);
                st.flush();
                if st.buf.is_empty() {
                    if st.closed {
                        return;
                    }
                    None
                } else {
                    Some(st.buf.split().freeze())
                }
            };
            match chunk {
                Some(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        self.close();
                        return;
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

/// The connection of one process to this hub, as objects see it.
pub(crate) struct Peer {
    pub(crate) id: u64,
    out: Arc<Outbox>,
}

impl Peer {
    pub(crate) fn reply(&self, id: u64, reply: Reply) {
        if id != 0 {
            // False: that process is gone; its connection's end cleans up after it.
            self.out.push(&FromHub::Reply { id, reply });
        }
    }

    /// Sends an answer that must reach its caller (a lock grant). False if that
    /// process's connection is closed: the answer was not sent.
    pub(crate) fn offer(&self, id: u64, reply: Reply) -> bool {
        self.out.push(&FromHub::Reply { id, reply })
    }

    pub(crate) fn recall(&self, obj: u64) {
        self.out.push(&FromHub::Recall { obj });
    }
}

// ---------------------------------------------------------------------------------------
// This process's hub

pub(crate) struct Hub {
    pub(crate) me: HubRef,
    /// Objects other processes may open, by id; removed when the object is dropped.
    objects: Mutex<HashMap<u64, Registered>>,
    /// Objects kept alive for copies of their handles serialized outside task arguments,
    /// by ticket, with the object's id, until a process decodes that copy.
    pinned: Mutex<HashMap<u64, (u64, Obj)>>,
    /// Pipe ends parked until claimed, by id, with their key.
    exports: Mutex<HashMap<u64, (u64, OwnedFd)>>,
}

/// An object other processes may open.
struct Registered {
    obj: WeakObj,
    /// The capability: a process must present it to open the object.
    key: u64,
}

/// The sizes of this process's sharing tables (see [`tables`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tables {
    /// Objects of this process that other processes may open (alive ones only).
    pub objects: usize,
    /// Objects kept alive for serialized copies of their handles nobody decoded yet.
    pub pinned: usize,
    /// Pipe ends parked for another process to claim.
    pub exports: usize,
    /// Requests of other processes parked in this process's objects (waiting `lock`,
    /// `get`, `put`, `join` and `wait` calls).
    pub parked: usize,
    /// Connections from this process to other processes' hubs.
    pub clients: usize,
    /// Requests this process sent to other processes' hubs, not answered yet.
    pub pending: usize,
    /// Other processes' objects this process has open.
    pub remotes: usize,
}

/// The sizes of this process's sharing tables, for tests that check nothing leaks.
#[doc(hidden)]
pub fn tables() -> Tables {
    let mut t = Tables::default();
    if let Some(h) = own() {
        let objects: Vec<WeakObj> = lock(&h.objects).values().map(|r| r.obj.clone()).collect();
        // Upgraded (and dropped) outside the table's lock: a drop may unregister.
        let alive: Vec<Obj> = objects.iter().filter_map(WeakObj::upgrade).collect();
        t.objects = alive.len();
        t.parked = alive.iter().map(Obj::parked).sum();
        drop(alive);
        t.pinned = lock(&h.pinned).len();
        t.exports = lock(&h.exports).len();
    }
    let clients: Vec<Arc<Client>> = lock(clients()).values().filter_map(Weak::upgrade).collect();
    t.clients = clients.len();
    for c in &clients {
        t.pending += lock(&c.pending).len();
        t.remotes += lock(&c.remotes)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count();
    }
    t
}

static HUB: OnceLock<Result<Arc<Hub>, String>> = OnceLock::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// A process-unique id for an object or an export.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Object `id` was dropped: no process can open it any more.
pub(crate) fn unregister(id: u64) {
    if let Some(h) = own() {
        lock(&h.objects).remove(&id);
    }
}

/// This process's hub if it was started.
pub(crate) fn own() -> Option<&'static Arc<Hub>> {
    HUB.get().and_then(|h| h.as_ref().ok())
}

/// This process's hub, started on first use.
pub(crate) fn hub() -> Result<&'static Arc<Hub>, String> {
    HUB.get_or_init(start).as_ref().map_err(Clone::clone)
}

fn random_u64() -> Result<u64, String> {
    let mut b = [0u8; 8];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| format!("getrandom failed: {e}"))?;
    Ok(u64::from_ne_bytes(b))
}

fn start() -> Result<Arc<Hub>, String> {
    let me = HubRef {
        name: format!("procpool/{}/{:016x}", std::process::id(), random_u64()?),
        token: random_u64()?,
    };
    let addr = SocketAddr::from_abstract_name(me.name.as_bytes())
        .map_err(|e| format!("bad hub address: {e}"))?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)
        .map_err(|e| format!("cannot listen on the hub socket: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("hub socket: {e}"))?;
    let hub = Arc::new(Hub {
        me,
        objects: Mutex::default(),
        pinned: Mutex::default(),
        exports: Mutex::default(),
    });
    let serving = Arc::clone(&hub);
    crate::runtime::service::run(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("procpool: the hub cannot serve: {e}");
                return;
            }
        };
        serving.accept_loop(listener).await;
    })
    .map_err(|e| e.to_string())?;
    Ok(hub)
}

impl Hub {
    /// Makes `obj` reachable from other processes under `id`, and returns its key (the
    /// same for every copy of its handles).
    pub(crate) fn register(&self, id: u64, obj: &Obj) -> Result<u64, String> {
        let mut objects = lock(&self.objects);
        if let Some(r) = objects.get(&id) {
            return Ok(r.key);
        }
        let key = random_u64()?;
        objects.insert(
            id,
            Registered {
                obj: obj.downgrade(),
                key,
            },
        );
        Ok(key)
    }

    /// The object `id`, if it still exists here and `key` is its key.
    pub(crate) fn find(&self, id: u64, kind: Kind, key: u64) -> Option<Obj> {
        let objects = lock(&self.objects);
        let found = objects
            .get(&id)
            .filter(|r| r.key == key)
            .and_then(|r| r.obj.upgrade());
        // Dropped outside the lock: if it was the last reference, its drop unregisters.
        drop(objects);
        found.filter(|o| o.kind() == kind)
    }

    /// Keeps `obj` (id `id`) alive until a process decodes the copy of its handle that
    /// carries the returned ticket.
    fn pin_ticket(&self, id: u64, obj: Obj) -> u64 {
        // Random, as keys are: a process that has the object open cannot give back
        // tickets of copies in flight to others by counting. (Sequential if the system
        // has no randomness to give, which `register` has already refused.)
        let ticket = random_u64()
            .ok()
            .filter(|&t| t != 0)
            .unwrap_or_else(|| NEXT_TICKET.fetch_add(1, Ordering::Relaxed));
        lock(&self.pinned).insert(ticket, (id, obj));
        ticket
    }

    /// The copy of object `id`'s handle that `ticket` kept alive was decoded (or will
    /// never be: its put failed).
    pub(crate) fn unpin(&self, ticket: u64, id: u64) {
        let mut pinned = lock(&self.pinned);
        let gone = match pinned.get(&ticket) {
            Some((obj, _)) if *obj == id => pinned.remove(&ticket),
            _ => None,
        };
        drop(pinned);
        // Dropped outside the lock (see `find`).
        drop(gone);
    }

    /// Parks a pipe end until another process claims it; returns its id and key.
    pub(crate) fn export(&self, fd: OwnedFd) -> Result<(u64, u64), String> {
        let id = next_id();
        let key = random_u64()?;
        lock(&self.exports).insert(id, (key, fd));
        Ok((id, key))
    }

    /// Takes parked pipe end `id` if `key` is its key.
    pub(crate) fn take_export(&self, id: u64, key: u64) -> Option<OwnedFd> {
        let mut exports = lock(&self.exports);
        match exports.get(&id) {
            Some((k, _)) if *k == key => exports.remove(&id).map(|(_, fd)| fd),
            _ => None,
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let uid = rustix::process::geteuid();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of fds, most likely: wait instead of spinning.
                    tracing::warn!("procpool: the hub cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match rustix::net::sockopt::socket_peercred(&stream) {
                Ok(cred) if cred.uid == uid => {}
                _ => continue,
            }
            let hub = Arc::clone(&self);
            tokio::spawn(async move { hub.serve(stream).await });
        }
    }

    async fn serve(self: Arc<Self>, stream: tokio::net::UnixStream) {
        let (rd, wr) = stream.into_split();
        // Before it is authenticated, a connection may send one small Hello, soon.
        let mut frames = FramedRead::new(rd, wire::codec(MAX_HELLO));
        let purpose = match tokio::time::timeout(HELLO_TIMEOUT, frames.next()).await {
            Ok(Some(Ok(f))) => match wire::from_frame::<ToHub>(&f) {
                Ok(ToHub::Hello { token, purpose }) if token == self.me.token => purpose,
                _ => return,
            },
            _ => return,
        };
        frames.decoder_mut().set_max_frame(MAX_FRAME);
        match purpose {
            Purpose::Claim { export, key } => {
                let fd = self.take_export(export, key);
                if let Err(e) = send_fd(wr.as_ref(), fd).await {
                    tracing::debug!("procpool: handing over a pipe end failed: {e}");
                }
            }
            Purpose::Session => self.session(frames, wr).await,
        }
    }

    async fn session(
        &self,
        mut frames: FramedRead<tokio::net::unix::OwnedReadHalf, wire::FrameCodec>,
        wr: tokio::net::unix::OwnedWriteHalf,
    ) {
        static NEXT_PEER: AtomicU64 = AtomicU64::new(1);
        let out = Outbox::new();
        let peer = Arc::new(Peer {
            id: NEXT_PEER.fetch_add(1, Ordering::Relaxed),
            out: Arc::clone(&out),
        });
        tokio::spawn(Arc::clone(&out).write_loop(wr));
        // What this process opened, with how many times.
        let mut open: HashMap<u64, (Obj, u32)> = HashMap::new();
        while let Some(Ok(frame)) = frames.next().await {
            let Ok(msg) = wire::from_frame::<ToHub>(&frame) else {
                tracing::warn!("procpool: the hub got a malformed frame; dropping that connection");
                break;
            };
            match msg {
                ToHub::Hello { .. } => break,
                ToHub::Open { obj, kind, key } => {
                    if let Some((_, n)) = open.get_mut(&obj) {
                        *n += 1;
                    } else if let Some(o) = self.find(obj, kind, key) {
                        open.insert(obj, (o, 1));
                    }
                }
                ToHub::Unpin { obj, ticket } => {
                    // Only a process that opened the object (it knew the key) may.
                    if open.contains_key(&obj) {
                        self.unpin(ticket, obj);
                    }
                }
                ToHub::Forget { obj } => {
                    if let Some((o, n)) = open.get_mut(&obj) {
                        *n -= 1;
                        if *n == 0 {
                            o.peer_gone(&peer);
                            open.remove(&obj);
                        }
                    }
                }
                ToHub::Req {
                    id, op: Op::Sync, ..
                } => peer.reply(id, Reply::Ok),
                ToHub::Req { id, obj, op } => match open.get(&obj) {
                    Some((o, _)) => o.handle(&peer, id, op),
                    None => peer.reply(id, Reply::Gone),
                },
                ToHub::Puts { obj, items } => {
                    if let Some((Obj::Queue(q), _)) = open.get(&obj) {
                        q.put_many(items);
                    }
                }
                ToHub::Ack { obj, upto } => {
                    if let Some((Obj::Queue(q), _)) = open.get(&obj) {
                        q.ack(&peer, upto);
                    }
                }
                ToHub::Return { obj, from, to } => {
                    if let Some((Obj::Queue(q), _)) = open.get(&obj) {
                        q.give_back(&peer, from, to);
                    }
                }
                ToHub::Cancel { obj, id } => match open.get(&obj) {
                    Some((Obj::Queue(q), _)) => q.cancel(&peer, id),
                    Some((Obj::Lock(l), _)) => l.cancel(&peer, id),
                    Some((Obj::Event(e), _)) => e.cancel(&peer, id),
                    None => {}
                },
                ToHub::Release { obj } => {
                    if let Some((Obj::Lock(l), _)) = open.get(&obj) {
                        l.release_peer(&peer);
                    }
                }
            }
        }
        // The process is gone (or broke the protocol): undo what it held.
        for (_, (o, _)) in open.drain() {
            o.peer_gone(&peer);
        }
        out.close();
    }
}

async fn send_fd(sock: &tokio::net::UnixStream, fd: Option<OwnedFd>) -> std::io::Result<()> {
    loop {
        sock.writable().await?;
        let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
            let byte = [u8::from(fd.is_some())];
            wire::fdpass::send_with_fd(sock, &byte, fd.as_ref().map(|f| f.as_fd()))
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A pipe end on its way: [`claim_later`] fetches it on procpool's service thread while
/// the caller goes on; the end's first use waits for it.
#[derive(Default)]
pub(crate) struct Arrival {
    /// The claim's outcome, until the end that waits for it takes it.
    got: Mutex<Option<Result<OwnedFd, String>>>,
    done: AtomicBool,
    cv: std::sync::Condvar,
    notify: Notify,
}

impl Arrival {
    fn finish(&self, got: Result<OwnedFd, String>) {
        let mut slot = lock(&self.got);
        *slot = Some(got);
        // Under the lock that `wait_blocking` checks it under: no wake-up is lost.
        self.done.store(true, Ordering::Release);
        drop(slot);
        self.cv.notify_all();
        self.notify.notify_waiters();
        arriving_done();
    }

    /// Whether the claim finished (its outcome may already be taken).
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Runs `f` with the outcome slot, under its lock (so that one caller takes it).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Option<Result<OwnedFd, String>>) -> R) -> R {
        f(&mut lock(&self.got))
    }

    /// Blocks this thread until the claim finished (it always does, within
    /// [`CLAIM_TIMEOUT`], more only if the service thread is starved), or at most `limit`.
    pub(crate) fn wait_blocking(&self, limit: Duration) {
        let got = lock(&self.got);
        let waited = self
            .cv
            .wait_timeout_while(got, limit, |_| !self.is_done())
            .map(|(_, t)| t.timed_out())
            .unwrap_or(false);
        if waited && limit >= CLAIM_TIMEOUT {
            tracing::warn!("procpool: a pipe end did not arrive within {limit:?}");
        }
    }

    /// Waits until the claim finished.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }
}

/// Claims in flight from this process (see [`settle`], which waits for them: the sender
/// keeps a pipe end parked only until the child that receives it reports its result).
static ARRIVING: Mutex<usize> = Mutex::new(0);
static ARRIVED: std::sync::Condvar = std::sync::Condvar::new();

fn arriving_done() {
    let mut n = lock(&ARRIVING);
    *n = n.saturating_sub(1);
    ARRIVED.notify_all();
}

/// Starts claiming pipe end `export` from the hub at `hub` without waiting for it: from
/// this process's own hub it is there at once; from another, the claim (a connection
/// and one answer, bounded by [`CLAIM_TIMEOUT`]) runs on a thread of procpool's service
/// runtime, so decoding a pipe end never blocks the caller (an async runtime's thread).
pub(crate) fn claim_later(hub: &HubRef, export: u64, key: u64) -> Arc<Arrival> {
    let arrival = Arc::new(Arrival::default());
    *lock(&ARRIVING) += 1;
    if let Some(h) = own()
        && h.me == *hub
    {
        arrival.finish(claim(hub, export, key));
        return arrival;
    }
    let (hub, filled) = (hub.clone(), Arc::clone(&arrival));
    let started = crate::runtime::service::run(async move {
        let got = tokio::task::spawn_blocking(move || claim(&hub, export, key))
            .await
            .unwrap_or_else(|e| Err(format!("the claim of a pipe end failed: {e}")));
        filled.finish(got);
    });
    if let Err(e) = started {
        arrival.finish(Err(e.to_string()));
    }
    arrival
}

/// Takes pipe end `export` from the hub at `hub` (blocking, briefly: the hub answers at
/// once from its service thread).
pub(crate) fn claim(hub: &HubRef, export: u64, key: u64) -> Result<OwnedFd, String> {
    if let Some(h) = own()
        && h.me == *hub
    {
        return h
            .take_export(export, key)
            .ok_or_else(|| "the pipe end was already taken or dropped".to_owned());
    }
    let gone = |e: std::io::Error| format!("the process that sent the pipe end is gone ({e})");
    let mut sock = hub.connect().map_err(gone)?;
    sock.set_read_timeout(Some(CLAIM_TIMEOUT)).map_err(gone)?;
    let mut hello = BytesMut::new();
    let claim = ToHub::Hello {
        token: hub.token,
        purpose: Purpose::Claim { export, key },
    };
    if !frame_into(&mut hello, &claim) {
        unreachable!("a Hello is a few bytes");
    }
    sock.write_all(&hello).map_err(gone)?;
    let mut byte = [0u8; 1];
    let (got, fd) = wire::fdpass::recv_with_fd(&sock, &mut byte).map_err(gone)?;
    match (got, byte[0], fd) {
        (1, 1, Some(fd)) => Ok(fd),
        (1, 0, _) => Err("the pipe end was already taken or dropped".to_owned()),
        _ => Err("the process that sent the pipe end did not hand it over".to_owned()),
    }
}

// ---------------------------------------------------------------------------------------
// Pins: keeping an object (or an exported fd) alive until its receiver has it

/// Keeps what a serialized handle refers to alive; dropping it lets go.
pub(crate) enum Pin {
    /// An object, for a child that receives it as an argument.
    Obj(#[allow(dead_code)] Obj),
    /// A parked pipe end (id and key; id 0 once kept for good).
    Export(u64, u64),
    /// A ticket of object `.1` (ticket 0 once kept until the copy is decoded).
    Ticket(u64, u64),
}

impl Drop for Pin {
    fn drop(&mut self) {
        let Some(h) = own() else {
            return;
        };
        match *self {
            // Unclaimed: closing it lets the other end see EOF.
            Pin::Export(id, key) if id != 0 => drop(h.take_export(id, key)),
            Pin::Ticket(ticket, obj) if ticket != 0 => h.unpin(ticket, obj),
            _ => {}
        }
    }
}

/// The pins taken while encoding one set of arguments, held until the child that
/// receives them is done with them.
#[derive(Default)]
pub(crate) struct Pins(Vec<Pin>);

impl std::fmt::Debug for Pins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pins({})", self.0.len())
    }
}

impl Pins {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Held while the bytes are on their way: kept (see [`keep`](Self::keep)) unless
    /// [`UntilDecoded::refused`] says they will never be decoded, also if the sending
    /// future is dropped midway (the bytes may have gone).
    pub(crate) fn until_decoded(self) -> UntilDecoded {
        UntilDecoded(Some(self))
    }

    /// The bytes were sent (a put or a pipe message that succeeded): what they refer to
    /// stays until a process decodes them (a ticket is given back by its `Unpin`, a pipe
    /// end by its claim). Dropping `Pins` instead (the send failed) lets go at once.
    pub(crate) fn keep(mut self) {
        for pin in &mut self.0 {
            match pin {
                Pin::Export(id, _) | Pin::Ticket(id, _) => *id = 0,
                Pin::Obj(_) => {}
            }
        }
    }
}

/// Pins of bytes on their way (see [`Pins::until_decoded`]).
pub(crate) struct UntilDecoded(Option<Pins>);

impl UntilDecoded {
    /// The bytes were certainly not delivered (refused, never sent, or their receiver
    /// is gone): let go of what they refer to now.
    pub(crate) fn refused(mut self) {
        drop(self.0.take());
    }
}

impl Drop for UntilDecoded {
    fn drop(&mut self) {
        if let Some(pins) = self.0.take() {
            pins.keep();
        }
    }
}

/// How many pins this thread's collects have taken so far: cheap enough to read around
/// every item of a map.
#[inline]
pub(crate) fn pins_taken() -> usize {
    TAKEN.with(std::cell::Cell::get)
}

/// Lets go of the last `n` pins the current [`collect`] took.
pub(crate) fn unpin_last(n: usize) {
    let dropped = COLLECTOR.with(|c| {
        c.borrow_mut()
            .as_mut()
            .map(|(_, v)| v.split_off(v.len().saturating_sub(n)))
    });
    // Dropped outside the borrow: a pin's drop may touch the hub.
    drop(dropped);
}

/// What the handles serialized by the current encoding are for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// A child's arguments: pinned until that child is done ([`collect`]).
    Args,
    /// A queue item or a pipe message: ticketed, and given back if it is not sent
    /// ([`collect_sent`]).
    Sent,
}

thread_local! {
    static COLLECTOR: std::cell::RefCell<Option<(Carrier, Vec<Pin>)>> =
        const { std::cell::RefCell::new(None) };
    static TAKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn collect_as<R>(carrier: Carrier, f: impl FnOnce() -> R) -> (R, Pins) {
    /// Puts the outer collector back, also if `f` unwinds (a user's `Serialize` that
    /// panics): the pins taken so far are dropped then.
    struct Restore(Option<Option<(Carrier, Vec<Pin>)>>);
    impl Restore {
        fn finish(&mut self) -> Vec<Pin> {
            let outer = self.0.take().unwrap_or_default();
            let mine = COLLECTOR.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
            mine.map(|(_, v)| v).unwrap_or_default()
        }
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            if self.0.is_some() {
                // Dropped outside the borrow (a pin's drop may touch the hub).
                drop(self.finish());
            }
        }
    }
    let outer = COLLECTOR.with(|c| c.borrow_mut().replace((carrier, Vec::new())));
    let mut restore = Restore(Some(outer));
    let r = f();
    let pins = restore.finish();
    (r, Pins(pins))
}

/// Runs `f` (an encoding of a child's arguments) and returns the pins taken by the
/// handles it serialized: they keep the objects alive until the child is done.
pub(crate) fn collect<R>(f: impl FnOnce() -> R) -> (R, Pins) {
    collect_as(Carrier::Args, f)
}

/// Runs `f` (an encoding of a queue item or a pipe message). Call [`Pins::keep`] once
/// the bytes are sent, or drop the pins if they are not.
pub(crate) fn collect_sent<R>(f: impl FnOnce() -> R) -> (R, Pins) {
    collect_as(Carrier::Sent, f)
}

/// Adds `pin` to the current encoding's; false if there is none.
fn add_pin(pin: Pin) -> Result<(), Pin> {
    COLLECTOR.with(|c| match c.borrow_mut().as_mut() {
        Some((_, v)) => {
            v.push(pin);
            TAKEN.with(|t| t.set(t.get() + 1));
            Ok(())
        }
        None => Err(pin),
    })
}

/// Keeps a parked pipe end until the current encoding's carrier lets go of it, or, with
/// no carrier, until it is claimed.
pub(crate) fn pin_export(id: u64, key: u64) {
    if let Err(Pin::Export(id, _)) = &mut add_pin(Pin::Export(id, key)) {
        *id = 0;
    }
}

/// Keeps object `obj` (id `id`) alive for the handle being serialized, and returns the
/// ticket to write with it (0 for a child's arguments, which pin it instead).
pub(crate) fn pin_handle(hub: &Hub, id: u64, obj: Obj) -> u64 {
    let carrier = COLLECTOR.with(|c| c.borrow().as_ref().map(|(k, _)| *k));
    if carrier == Some(Carrier::Args) {
        // Pushed outside any borrow: a pin's drop may touch the hub.
        if add_pin(Pin::Obj(obj)).is_err() {
            unreachable!("a collector is installed");
        }
        return 0;
    }
    let ticket = hub.pin_ticket(id, obj);
    if carrier == Some(Carrier::Sent) && add_pin(Pin::Ticket(ticket, id)).is_err() {
        unreachable!("a collector is installed");
    }
    ticket
}

// ---------------------------------------------------------------------------------------
// The client side: this process using objects of another process

/// One connection from this process to another process's hub.
pub(crate) struct Client {
    pub(crate) out: Arc<Outbox>,
    next_req: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    remotes: Mutex<HashMap<u64, Weak<Remote>>>,
    closed: AtomicBool,
    /// Something was sent since the last [`settle`].
    dirty: AtomicBool,
}

enum Pending {
    /// An answer for a caller; `obj` to undo an unwanted lock grant.
    Reply {
        obj: u64,
        tx: oneshot::Sender<Answer>,
    },
    /// Items for a queue's buffer.
    Want {
        remote: Weak<Remote>,
        done: Option<oneshot::Sender<()>>,
    },
}

fn clients() -> &'static Mutex<HashMap<HubRef, Weak<Client>>> {
    static CLIENTS: OnceLock<Mutex<HashMap<HubRef, Weak<Client>>>> = OnceLock::new();
    CLIENTS.get_or_init(Mutex::default)
}

impl Client {
    /// The connection to `hub`, opened if needed. Does not block: the connect of a unix
    /// socket completes at once, and the I/O runs on the service thread.
    fn get(hub: &HubRef) -> Result<Arc<Client>, String> {
        let mut all = lock(clients());
        if let Some(c) = all.get(hub).and_then(Weak::upgrade)
            && !c.closed.load(Ordering::SeqCst)
        {
            return Ok(c);
        }
        let stream = hub
            .connect()
            .map_err(|e| format!("the process that created it is gone ({e})"))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("hub connection: {e}"))?;
        let client = Arc::new(Client {
            out: Outbox::new(),
            next_req: AtomicU64::new(1),
            pending: Mutex::default(),
            remotes: Mutex::default(),
            closed: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
        });
        client.out.push(&ToHub::Hello {
            token: hub.token,
            purpose: Purpose::Session,
        });
        let io = Arc::clone(&client);
        crate::runtime::service::run(async move { io.run(stream).await })
            .map_err(|e| e.to_string())?;
        all.retain(|_, w| w.strong_count() > 0);
        all.insert(hub.clone(), Arc::downgrade(&client));
        Ok(client)
    }

    async fn run(self: Arc<Self>, stream: std::os::unix::net::UnixStream) {
        // (Runs on the service thread: `Remote::on_recall` may spawn a retry there.)
        let stream = match tokio::net::UnixStream::from_std(stream) {
            Ok(s) => s,
            Err(_) => return self.fail(),
        };
        let (rd, wr) = stream.into_split();
        let writer = tokio::spawn(Arc::clone(&self.out).write_loop(wr));
        let mut frames = FramedRead::new(rd, wire::codec(MAX_FRAME));
        while let Some(Ok(frame)) = frames.next().await {
            match wire::from_frame::<FromHub>(&frame) {
                Ok(FromHub::Reply { id, reply }) => self.on_reply(id, reply),
                Ok(FromHub::Recall { obj }) => {
                    let r = lock(&self.remotes).get(&obj).and_then(Weak::upgrade);
                    if let Some(r) = r {
                        r.on_recall();
                    }
                }
                Err(_) => break,
            }
        }
        writer.abort();
        self.fail();
    }

    fn on_reply(self: &Arc<Self>, id: u64, reply: Reply) {
        let pending = lock(&self.pending).remove(&id);
        match pending {
            Some(Pending::Reply { obj, tx }) => {
                // If the caller is gone, the answer is dropped here (see `Answer`).
                drop(tx.send(Answer {
                    reply: Some(reply),
                    client: Arc::downgrade(self),
                    obj,
                }));
            }
            Some(Pending::Want { remote, done }) => {
                if let Some(r) = remote.upgrade() {
                    r.on_items(id, reply);
                }
                if let Some(done) = done {
                    // Err: the caller stopped waiting; the items stay buffered.
                    done.send(()).ok();
                }
            }
            None => {}
        }
    }

    /// The hub is gone: every waiting caller gets `Closed`.
    fn fail(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.out.close();
        let pending: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        drop(pending);
        let remotes: Vec<Arc<Remote>> = lock(&self.remotes)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for r in remotes {
            r.on_closed();
        }
    }

    pub(crate) fn send<M: Serialize>(&self, msg: &M) -> bool {
        self.dirty.store(true, Ordering::Relaxed);
        self.out.push(msg)
    }

    fn next_id(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }
}

/// An answer from a hub. A lock grant that nobody takes (its caller gave up while it
/// was on its way) is released when the answer is dropped.
pub(crate) struct Answer {
    reply: Option<Reply>,
    client: Weak<Client>,
    obj: u64,
}

impl Answer {
    pub(crate) fn take(mut self) -> Reply {
        self.reply.take().unwrap_or(Reply::Gone)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(Reply::Granted { .. }) = self.reply
            && let Some(c) = self.client.upgrade()
        {
            c.send(&ToHub::Release { obj: self.obj });
        }
    }
}

/// This process's view of one object of another process: shared by every handle to it
/// here.
pub(crate) struct Remote {
    pub(crate) client: Arc<Client>,
    pub(crate) obj: u64,
    /// The queue state (unused for locks and events).
    pub(crate) q: Mutex<super::queue::Buffer>,
    pub(crate) changed: Notify,
}

impl Remote {
    /// Opens object `obj` of `hub` (or joins this process's existing view of it).
    pub(crate) fn open(
        hub: &HubRef,
        obj: u64,
        key: u64,
        kind: Kind,
    ) -> Result<Arc<Remote>, String> {
        let client = Client::get(hub)?;
        let mut remotes = lock(&client.remotes);
        if let Some(r) = remotes.get(&obj).and_then(Weak::upgrade) {
            return Ok(r);
        }
        let r = Arc::new(Remote {
            client: Arc::clone(&client),
            obj,
            q: Mutex::default(),
            changed: Notify::new(),
        });
        remotes.retain(|_, w| w.strong_count() > 0);
        remotes.insert(obj, Arc::downgrade(&r));
        // Queued before the lock is let go: another thread that finds this view next
        // sends its requests (or an `Unpin`) only after the `Open`. (The outbox takes
        // no other lock.)
        client.send(&ToHub::Open { obj, kind, key });
        drop(remotes);
        Ok(r)
    }

    pub(crate) fn closed(&self) -> bool {
        self.client.closed.load(Ordering::SeqCst)
    }

    /// Sends request `op` and returns where its answer will arrive.
    pub(crate) fn request(&self, op: Op) -> Result<(u64, oneshot::Receiver<Answer>), Error> {
        let (tx, rx) = oneshot::channel();
        let id = self.client.next_id();
        lock(&self.client.pending).insert(id, Pending::Reply { obj: self.obj, tx });
        if self.closed()
            || !self.client.send(&ToHub::Req {
                id,
                obj: self.obj,
                op,
            })
        {
            lock(&self.client.pending).remove(&id);
            return Err(Error::Closed);
        }
        Ok((id, rx))
    }

    /// Sends `op` and waits for the answer. If the future is dropped first, the request
    /// is withdrawn (a parked get, put, lock or wait leaves its line; a lock granted on
    /// the way is released, see [`Answer`]).
    pub(crate) async fn call(&self, op: Op) -> Result<Reply, Error> {
        let (id, rx) = self.request(op)?;
        let mut withdraw = Withdraw(self, Some(id));
        let answer = rx.await.map_err(|_| Error::Closed)?;
        withdraw.1 = None;
        Ok(answer.take())
    }

    /// [`call`](Self::call) from synchronous code, for calls that answer at once
    /// (`is_set`, `len`, `try_lock`, ...), which may be made from async code: waits at
    /// most [`OWNER_TIMEOUT`] for an owner that does not answer, then withdraws the
    /// request (an answer that comes later is handled as for a dropped `call`) and
    /// fails with [`Error::Timeout`].
    pub(crate) fn blocking_call(&self, op: Op) -> Result<Reply, Error> {
        let (id, mut rx) = self.request(op)?;
        let limit = owner_timeout();
        match wait_for(&mut rx, limit) {
            Some(Ok(answer)) => Ok(answer.take()),
            Some(Err(_)) => Err(Error::Closed),
            None => {
                self.cancel(id);
                tracing::warn!(
                    "procpool: the owner of a shared object did not answer within {limit:?}"
                );
                Err(Error::Timeout { after: limit })
            }
        }
    }

    /// Asks for queue items; they land in this process's buffer. `done` fires when the
    /// answer arrived.
    pub(crate) fn want(
        self: &Arc<Self>,
        n: u32,
        wait: bool,
        done: Option<oneshot::Sender<()>>,
    ) -> Option<u64> {
        let id = self.client.next_id();
        lock(&self.client.pending).insert(
            id,
            Pending::Want {
                remote: Arc::downgrade(self),
                done,
            },
        );
        let sent = self.client.send(&ToHub::Req {
            id,
            obj: self.obj,
            op: Op::Want { n, wait },
        });
        if !sent {
            lock(&self.client.pending).remove(&id);
            return None;
        }
        Some(id)
    }

    pub(crate) fn cancel(&self, id: u64) {
        self.client.send(&ToHub::Cancel { obj: self.obj, id });
    }

    /// A guard that withdraws request `id` unless disarmed.
    pub(crate) fn withdraw_on_drop(&self, id: u64) -> Withdraw<'_> {
        Withdraw(self, Some(id))
    }

    pub(crate) fn put_unbounded(&self, item: Vec<u8>) -> bool {
        self.client.dirty.store(true, Ordering::Relaxed);
        !self.closed() && self.client.out.push_put(self.obj, item)
    }

    pub(crate) fn ack(&self, upto: u64) {
        self.client.dirty.store(true, Ordering::Relaxed);
        self.client.out.push_ack(self.obj, upto);
    }
}

/// Withdraws a request whose caller went away.
pub(crate) struct Withdraw<'a>(&'a Remote, Option<u64>);

impl Withdraw<'_> {
    /// The answer arrived: nothing to withdraw.
    pub(crate) fn disarm(mut self) {
        self.1 = None;
    }
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.1 {
            self.0.cancel(id);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Every item handed out was acknowledged as it was; whatever is still buffered
        // is put back by the hub when it forgets us.
        self.client.send(&ToHub::Forget { obj: self.obj });
    }
}

/// Waits until everything this process sent to other processes' hubs has been applied.
///
/// A child calls it after each task and before it reports the result, so a parent that
/// sees the result also sees the items the task put, the locks it released and the
/// events it set. Every owner is asked at once, and all of them get [`OWNER_TIMEOUT`]
/// together: an owner that does not answer by then (stopped, or overloaded) is logged
/// as a warning and asked again at the next settle; the result is reported anyway.
pub(crate) fn settle() {
    let limit = owner_timeout();
    let deadline = std::time::Instant::now() + limit;
    // Pipe ends this process is still claiming: their senders let go of them once the
    // result is reported.
    let arriving = lock(&ARRIVING);
    let (arriving, waited) = ARRIVED
        .wait_timeout_while(arriving, limit, |n| *n > 0)
        .unwrap_or_else(|p| p.into_inner());
    if waited.timed_out() {
        tracing::warn!(
            "procpool: {} pipe end(s) did not arrive within {limit:?}",
            *arriving
        );
    }
    drop(arriving);
    let all: Vec<Arc<Client>> = lock(clients()).values().filter_map(Weak::upgrade).collect();
    let mut waiting = Vec::new();
    for c in all {
        if !c.dirty.swap(false, Ordering::Relaxed) || c.closed.load(Ordering::SeqCst) {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        let id = c.next_id();
        lock(&c.pending).insert(id, Pending::Reply { obj: 0, tx });
        if c.out.push(&ToHub::Req {
            id,
            obj: 0,
            op: Op::Sync,
        }) {
            waiting.push((c, rx));
        } else {
            // The hub is gone, and with it anything to wait for.
            lock(&c.pending).remove(&id);
        }
    }
    for (c, mut rx) in waiting {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Some(Err): the hub went away, and with it anything to wait for.
        if wait_for(&mut rx, left).is_none() {
            c.dirty.store(true, Ordering::Relaxed);
            tracing::warn!(
                "procpool: the owner of a shared object did not confirm within {limit:?} \
                 what this process sent it; the result is reported without that \
                 confirmation"
            );
        }
    }
}

/// Reads one frame in blocking mode (tests of the framing use it).
#[cfg(test)]
pub(crate) fn read_frame(mut r: impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_with_the_channel_codec() {
        let mut buf = BytesMut::new();
        assert!(frame_into(
            &mut buf,
            &ToHub::Puts {
                obj: 7,
                items: vec![ByteBuf::from(vec![1, 2, 3]), ByteBuf::new()],
            },
        ));
        let body = read_frame(&buf[..]).unwrap();
        match wire::from_frame::<ToHub>(&body).unwrap() {
            ToHub::Puts { obj: 7, items } => {
                assert_eq!(items, vec![ByteBuf::from(vec![1, 2, 3]), ByteBuf::new()])
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn puts_and_acks_keep_their_order_with_other_frames() {
        let out = Outbox::new();
        assert!(out.push_put(1, vec![1]));
        assert!(out.push_put(1, vec![2]));
        out.push_ack(2, 5);
        assert!(out.push(&ToHub::Forget { obj: 2 }));
        let mut st = lock(&out.st);
        st.flush();
        let mut rest = &st.buf[..];
        let mut got = Vec::new();
        while !rest.is_empty() {
            let body = read_frame(&mut rest).unwrap();
            got.push(format!("{:?}", wire::from_frame::<ToHub>(&body).unwrap()));
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("Puts { obj: 1"), "{got:?}");
        assert!(got[1].starts_with("Ack { obj: 2, upto: 5"), "{got:?}");
        assert!(got[2].starts_with("Forget { obj: 2"), "{got:?}");
    }

    #[test]
    fn an_object_or_a_pipe_end_opens_only_with_its_key() {
        let h = hub().unwrap();
        let core = QueueCore::new(None);
        let id = core.id;
        let obj = Obj::Queue(core);
        let key = h.register(id, &obj).unwrap();
        assert_eq!(h.register(id, &obj).unwrap(), key, "one key per object");
        assert!(h.find(id, Kind::Queue, key).is_some());
        assert!(
            h.find(id, Kind::Queue, key ^ 1).is_none(),
            "a wrong key opens nothing"
        );
        assert!(h.find(id, Kind::Lock, key).is_none(), "nor a wrong kind");
        let other = Obj::Queue(QueueCore::new(None));
        let other_id = match &other {
            Obj::Queue(c) => c.id,
            _ => unreachable!(),
        };
        h.register(other_id, &other).unwrap();
        assert!(
            h.find(other_id, Kind::Queue, key).is_none(),
            "a key opens one object"
        );
        drop(obj);
        assert!(
            h.find(id, Kind::Queue, key).is_none(),
            "a dropped object is gone"
        );
        assert!(!lock(&h.objects).contains_key(&id), "and forgotten at once");

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (export, key) = h.export(a.into()).unwrap();
        assert!(h.take_export(export, key ^ 1).is_none());
        assert!(h.take_export(export + 1, key).is_none());
        assert!(h.take_export(export, key).is_some());
        assert!(h.take_export(export, key).is_none(), "claimed once");
    }

    #[test]
    fn a_late_lower_acknowledgement_does_not_undo_a_higher_one() {
        // Two threads handing out items 6 and 5 of one queue may report them 6, then 5.
        let out = Outbox::new();
        out.push_ack(1, 6);
        out.push_ack(1, 5);
        let mut st = lock(&out.st);
        st.flush();
        let body = read_frame(&st.buf[..]).unwrap();
        match wire::from_frame::<ToHub>(&body).unwrap() {
            ToHub::Ack { obj: 1, upto } => assert_eq!(upto, 6),
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn an_unauthenticated_connection_announcing_a_large_frame_is_dropped_at_once() {
        use std::io::Read;
        let h = hub().unwrap();
        let mut sock = h.me.connect().unwrap();
        // Just under the frame limit, so only the Hello's own cap refuses it.
        sock.write_all(&[0x3f, 0xff, 0xff, 0xff]).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut byte = [0u8; 1];
        match sock.read(&mut byte) {
            Ok(0) => {}
            other => panic!("the hub kept the connection: {other:?}"),
        }
    }
}
