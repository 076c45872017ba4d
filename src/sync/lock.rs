//! `Lock`: a mutual-exclusion lock shared by processes, released when its holder dies.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::oneshot;

use super::hub::{self, Kind, Op, Peer, Remote, Reply, Served, lock};
use super::queue::unexpected;
use super::{Access, Core, Handle};
use crate::error::{Error, Result};
use crate::runtime::timer::{self, Sleep};

pub(crate) struct LockCore {
    pub(crate) id: u64,
    st: Mutex<LState>,
}

struct LState {
    holder: Option<Holder>,
    /// The last holder died holding it; the next one is told.
    abandoned: bool,
    /// The line, by ticket: first come, first served. A waiter that gives up takes its
    /// entry out at once (see [`Waiting`] and [`LockCore::cancel`]).
    waiters: BTreeMap<u64, Waiter>,
    /// The ticket of each waiter of another process, by (peer id, request id).
    remote: HashMap<(u64, u64), u64>,
    next_ticket: u64,
}

impl LState {
    /// Puts `w` at the back of the line; returns its ticket.
    fn enqueue(&mut self, w: Waiter) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if let Waiter::Peer(p, id) = &w {
            self.remote.insert((p.id, *id), ticket);
        }
        self.waiters.insert(ticket, w);
        ticket
    }
}

#[derive(PartialEq, Eq)]
enum Holder {
    Here,
    Peer(u64),
}

enum Waiter {
    Here(oneshot::Sender<Grant>),
    Peer(Arc<Peer>, u64),
}

/// The lock, held by a caller in the owner process. Dropping it releases the lock,
/// including when it was granted to a caller that had already gone away.
struct Grant {
    core: Arc<LockCore>,
    abandoned: bool,
    /// False for a grant that [`LockCore::release`] took back from a waiter that was
    /// gone: its drop must not release (release goes on to the next waiter itself).
    live: bool,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if self.live {
            self.core.release();
        }
    }
}

/// A local `lock()` caller's place in the line. Dropping it (the future was dropped,
/// or it got the lock) takes its entry out; a grant that was sent but not taken is
/// dropped with `rx`, which releases the lock.
struct Waiting {
    core: Arc<LockCore>,
    ticket: u64,
    rx: oneshot::Receiver<Grant>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let left = lock(&self.core.st).waiters.remove(&self.ticket);
        // The sender is dropped outside the lock.
        drop(left);
    }
}

impl LockCore {
    fn new() -> Arc<Self> {
        Arc::new(LockCore {
            id: hub::next_id(),
            st: Mutex::new(LState {
                holder: None,
                abandoned: false,
                waiters: BTreeMap::new(),
                remote: HashMap::new(),
                next_ticket: 0,
            }),
        })
    }

    fn grant(self: &Arc<Self>, abandoned: bool) -> Grant {
        Grant {
            core: Arc::clone(self),
            abandoned,
            live: true,
        }
    }

    /// The holder lets go: the first waiter still there gets it. A loop, not a
    /// recursion: waiters that are gone are skipped, however many there are, and the
    /// `abandoned` mark goes to the first one that takes the lock.
    fn release(self: &Arc<Self>) {
        let mut st = lock(&self.st);
        st.holder = None;
        loop {
            let Some((_, waiter)) = st.waiters.pop_first() else {
                return;
            };
            match waiter {
                Waiter::Peer(peer, id) => {
                    st.remote.remove(&(peer.id, id));
                    let abandoned = st.abandoned;
                    if peer.offer(id, Reply::Granted { abandoned }) {
                        st.holder = Some(Holder::Peer(peer.id));
                        st.abandoned = false;
                        return;
                    }
                    // That process's connection is closed: it never gets the answer.
                }
                // Its caller left (only while its `Waiting` is being dropped).
                Waiter::Here(tx) if tx.is_closed() => {}
                Waiter::Here(tx) => {
                    st.holder = Some(Holder::Here);
                    let grant = self.grant(std::mem::take(&mut st.abandoned));
                    drop(st);
                    match tx.send(grant) {
                        // If that caller is leaving right now, its receiver drops the
                        // grant, which releases the lock again (one level, not more).
                        Ok(()) => return,
                        Err(mut grant) => {
                            // It left before the send: take the lock back, go on.
                            grant.live = false;
                            st = lock(&self.st);
                            st.holder = None;
                            st.abandoned |= grant.abandoned;
                        }
                    }
                }
            }
        }
    }

    fn try_acquire_here(self: &Arc<Self>) -> Option<Grant> {
        let mut st = lock(&self.st);
        if st.holder.is_some() {
            return None;
        }
        st.holder = Some(Holder::Here);
        let abandoned = std::mem::take(&mut st.abandoned);
        Some(self.grant(abandoned))
    }

    async fn acquire_here(self: &Arc<Self>) -> Result<Grant> {
        let mut waiting = {
            let mut st = lock(&self.st);
            if st.holder.is_none() {
                st.holder = Some(Holder::Here);
                let abandoned = std::mem::take(&mut st.abandoned);
                return Ok(self.grant(abandoned));
            }
            let (tx, rx) = oneshot::channel();
            let ticket = st.enqueue(Waiter::Here(tx));
            Waiting {
                core: Arc::clone(self),
                ticket,
                rx,
            }
        };
        // The sender stays in our own state until it is used or `waiting` takes it
        // out: it is never dropped unsent while we wait.
        (&mut waiting.rx).await.map_err(|_| Error::Closed)
    }
}

/// What the hub does with a lock's frames.
impl Served for LockCore {
    fn kind(&self) -> Kind {
        Self::KIND
    }

    fn parked(&self) -> usize {
        // Both tables, so that an entry left in either shows.
        let st = lock(&self.st);
        st.remote.len() + st.waiters.len()
    }

    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        let mut st = lock(&self.st);
        match op {
            Op::Acquire { wait } => {
                if st.holder.is_none() {
                    let abandoned = st.abandoned;
                    // Not taken if that process's connection is already closed.
                    if peer.offer(id, Reply::Granted { abandoned }) {
                        st.holder = Some(Holder::Peer(peer.id));
                        st.abandoned = false;
                    }
                } else if wait {
                    st.enqueue(Waiter::Peer(Arc::clone(peer), id));
                } else {
                    peer.reply(id, Reply::Bool(false));
                }
            }
            _ => peer.reply(id, Reply::Invalid("not a lock operation".to_owned())),
        }
    }

    fn release_peer(self: Arc<Self>, peer: &Peer) {
        let held = lock(&self.st).holder == Some(Holder::Peer(peer.id));
        if held {
            self.release();
        }
    }

    /// A waiter of another process gave up (`ToHub::Cancel`): its entry leaves the line
    /// and it is answered `Cancelled`, which clears the request on its side. If it is no
    /// longer in line it was granted: the grant's `Answer` there sends the release.
    fn cancel(&self, peer: &Peer, id: u64) {
        let mut st = lock(&self.st);
        if let Some(ticket) = st.remote.remove(&(peer.id, id)) {
            st.waiters.remove(&ticket);
            peer.reply(id, Reply::Cancelled);
        }
    }

    /// `peer`'s process let go of the lock's handle or died: if it held the lock, the
    /// lock is released and marked abandoned for the next holder.
    fn peer_gone(self: Arc<Self>, peer: &Arc<Peer>) {
        let mut st = lock(&self.st);
        st.waiters
            .retain(|_, w| !matches!(w, Waiter::Peer(p, _) if p.id == peer.id));
        st.remote.retain(|&(p, _), _| p != peer.id);
        if st.holder == Some(Holder::Peer(peer.id)) {
            st.abandoned = true;
            drop(st);
            tracing::warn!(
                "a process died holding a procpool::Lock; it was released for the next waiter"
            );
            self.release();
        }
    }
}

/// A lock shared by processes: Python's `multiprocessing.Lock`, async, with an RAII
/// guard.
///
/// Create it in any process and pass clones to children as arguments. `lock().await`
/// waits without blocking a thread; [`blocking_lock`](Lock::blocking_lock) is for plain
/// synchronous targets. Waiters get the lock in the order they asked for it.
///
/// ```
/// use procpool::{Lock, Process};
///
/// fn worker(lock: Lock, n: u32) {
///     let guard = lock.blocking_lock().expect("the parent keeps the lock");
///     println!("worker {n} has the lock (abandoned: {})", guard.abandoned());
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let lock = Lock::new();
/// let mut p = Process::new(worker, (lock.clone(), 1));
/// p.start().await?;
/// p.join().await?;
/// # Ok(())
/// # }
/// ```
///
/// # When the holder dies
///
/// A lock held by a process that dies (crash, `SIGKILL`, a pool task stopped on
/// timeout) is released, and the next waiter gets it: Python deadlocks here. The new
/// holder can tell: [`LockGuard::abandoned`] is true, meaning whatever the lock protects
/// may have been left half-updated. The owner logs a warning as well.
///
/// Like the [`Queue`](crate::Queue), the lock lives in the process that created it; once
/// that process is gone, calls elsewhere fail with [`Error::Closed`]. It is not
/// reentrant: locking it twice from one process without releasing waits forever, as
/// with Python's `Lock`.
///
/// Dropping a `Lock` handle does not release a guard taken through it (the guard keeps
/// what it needs).
#[derive(Clone)]
pub struct Lock {
    h: Handle<LockCore>,
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("id", &self.h.id)
            .field("owned_here", &matches!(self.h.access, Access::Local(_)))
            .finish()
    }
}

impl Default for Lock {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds a [`Lock`]; dropping it releases the lock (also when it is dropped by a
/// panic's unwinding). A guard never outlives its process: if the process dies, the
/// owner releases the lock.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    held: Held,
    abandoned: bool,
}

enum Held {
    Here(#[allow(dead_code)] Grant),
    Remote(Arc<Remote>),
    /// Let go of by a [`Condition`](crate::Condition) wait that did not take it back
    /// (it failed, or its future was dropped).
    Released,
}

impl LockGuard {
    /// True if the previous holder died holding the lock (see [`Lock`]): what the lock
    /// protects may be inconsistent.
    pub fn abandoned(&self) -> bool {
        self.abandoned
    }

    /// Whether this guard holds its lock: always, except after a
    /// [`Condition`](crate::Condition) wait through it failed or was dropped before it
    /// took the lock back.
    pub fn is_held(&self) -> bool {
        !matches!(self.held, Held::Released)
    }

    /// Lets go of the lock (for a condition's wait); the guard holds nothing after.
    pub(crate) fn release_for_wait(&mut self) {
        let held = std::mem::replace(&mut self.held, Held::Released);
        if let Held::Remote(r) = &held {
            r.client.send(&hub::ToHub::Release { obj: r.obj });
        }
        // `Held::Here`'s grant releases as it drops here.
        drop(held);
    }

    /// Holds the lock again, through `taken` (a new guard of the same lock).
    pub(crate) fn rehold(&mut self, mut taken: LockGuard) {
        self.abandoned = taken.abandoned;
        self.held = std::mem::replace(&mut taken.held, Held::Released);
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("abandoned", &self.abandoned)
            .finish()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Held::Remote(r) = &self.held {
            r.client.send(&hub::ToHub::Release { obj: r.obj });
        }
        // `Held::Here` releases in the grant's own Drop.
    }
}

impl Lock {
    /// A new, unlocked lock owned by this process.
    pub fn new() -> Self {
        let core = LockCore::new();
        Lock {
            h: Handle::local(core.id, core),
        }
    }

    /// Waits for the lock and returns its guard.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped, this caller leaves the queue of waiters,
    /// and a grant that raced with the drop is released at once.
    pub async fn lock(&self) -> Result<LockGuard> {
        match &self.h.access {
            Access::Local(core) => {
                let grant = core.acquire_here().await?;
                Ok(LockGuard {
                    abandoned: grant.abandoned,
                    held: Held::Here(grant),
                })
            }
            Access::Remote(r) => remote_guard(r, r.call(Op::Acquire { wait: true }).await?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// [`lock`](Self::lock) for synchronous code: blocks this thread. Do not call it
    /// from async code.
    ///
    /// # Errors
    ///
    /// As for `lock`.
    pub fn blocking_lock(&self) -> Result<LockGuard> {
        futures::executor::block_on(self.lock())
    }

    /// [`lock`](Self::lock) for at most `d`: `Ok(Some(guard))` if it was taken,
    /// `Ok(None)` if the time ran out (Python's `acquire(timeout=d)` answering `False`).
    /// A free lock is taken at once, whatever `d`.
    ///
    /// Works under any executor: inside a tokio runtime the limit is that runtime's timer
    /// (it follows paused time), elsewhere (`futures::executor::block_on`, a plain
    /// target) a timer on procpool's own thread.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Panics
    ///
    /// Inside a tokio runtime built without timers (as `tokio::time::timeout`).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`lock`](Self::lock): a caller whose time ran out, or whose
    /// future is dropped, leaves the line, and a grant that raced with it is released.
    pub async fn lock_timeout(&self, d: Duration) -> Result<Option<LockGuard>> {
        timer::timeout(Sleep::new(d), self.lock()).await.transpose()
    }

    /// [`lock_timeout`](Self::lock_timeout) for synchronous code: blocks this thread at
    /// most about `d`. Needs no runtime. Do not call it from async code.
    ///
    /// # Errors
    ///
    /// As for `lock`.
    pub fn blocking_lock_timeout(&self, d: Duration) -> Result<Option<LockGuard>> {
        let at = timer::deadline_in(d);
        let taking = timer::timeout(Sleep::parked_until(at), self.lock());
        timer::block_on_until(taking, at).transpose()
    }

    /// How many callers wait in this lock's line, in this process and others; `None`
    /// outside the owner process. For procpool's own tests.
    #[doc(hidden)]
    pub fn queued_waiters(&self) -> Option<usize> {
        match &self.h.access {
            Access::Local(core) => Some(lock(&core.st).waiters.len()),
            _ => None,
        }
    }

    /// Takes the lock if it is free now (`Ok(None)` if not). From a process other than
    /// the owner this asks the owner (a round trip, blocking this thread briefly).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// [`Error::Timeout`] if, from another process, the owner does not answer within 10 s
    /// (see [Queues, pipes, locks and events](crate#queues-pipes-locks-and-events)).
    pub fn try_lock(&self) -> Result<Option<LockGuard>> {
        match &self.h.access {
            Access::Local(core) => Ok(core.try_acquire_here().map(|grant| LockGuard {
                abandoned: grant.abandoned,
                held: Held::Here(grant),
            })),
            Access::Remote(r) => match r.blocking_call(Op::Acquire { wait: false })? {
                Reply::Bool(false) => Ok(None),
                other => remote_guard(r, other).map(Some),
            },
            Access::Dead(_) => Err(Error::Closed),
        }
    }
}

fn remote_guard(r: &Arc<Remote>, reply: Reply) -> Result<LockGuard> {
    match reply {
        Reply::Granted { abandoned } => Ok(LockGuard {
            held: Held::Remote(Arc::clone(r)),
            abandoned,
        }),
        other => Err(unexpected(other)),
    }
}

impl Serialize for Lock {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.h.serialize(None, s)
    }
}

impl<'de> Deserialize<'de> for Lock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Lock {
            h: Handle::deserialize(d)?.0,
        })
    }
}

impl Core for LockCore {
    const KIND: Kind = Kind::Lock;
}

impl Drop for LockCore {
    fn drop(&mut self) {
        super::hub::unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub holds objects as `Arc<dyn Served>`: a handle decoded in its owner gets
    /// its own core back, and an object of another kind is not taken for a lock.
    #[test]
    fn the_hub_gives_back_the_same_core_and_only_to_its_kind() {
        let core = LockCore::new();
        let obj = core.obj();
        assert_eq!(obj.kind(), Kind::Lock);
        let back = LockCore::from_obj(obj).expect("a lock's object is a lock");
        assert!(Arc::ptr_eq(&back, &core));
        let queue = super::super::queue::QueueCore::new(None).obj();
        assert_eq!(queue.kind(), Kind::Queue);
        assert!(LockCore::from_obj(queue).is_none());
    }

    /// A million waiters that left without taking their entry out (what every dropped
    /// `lock()` future did before): one release skips them all on a 2 MiB test-thread
    /// stack, and the `abandoned` mark reaches the live waiter behind them.
    #[test]
    fn release_skips_a_million_dead_waiters_without_recursion() {
        let core = LockCore::new();
        let first = core.try_acquire_here().expect("a new lock is free");
        let mut live = {
            let mut st = lock(&core.st);
            for _ in 0..1_000_000 {
                let (tx, rx) = oneshot::channel();
                drop(rx);
                st.enqueue(Waiter::Here(tx));
            }
            let (tx, rx) = oneshot::channel();
            st.enqueue(Waiter::Here(tx));
            // As if the holder had died: the mark must survive the skipped waiters.
            st.abandoned = true;
            rx
        };
        drop(first);
        let grant = live.try_recv().expect("the live waiter got the lock");
        assert!(grant.abandoned);
        {
            let st = lock(&core.st);
            assert!(st.waiters.is_empty() && st.remote.is_empty());
            assert!(st.holder == Some(Holder::Here) && !st.abandoned);
        }
        drop(grant);
        assert!(lock(&core.st).holder.is_none());
    }

    /// A grant sent to a waiter that leaves before taking it is released with it.
    #[test]
    fn a_grant_racing_with_a_dropped_waiter_is_released() {
        let core = LockCore::new();
        let first = core.try_acquire_here().expect("free");
        let mut fut = Box::pin(core.acquire_here());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(lock(&core.st).waiters.len(), 1);
        drop(first); // sent to `fut`'s receiver, not yet taken
        assert!(lock(&core.st).holder == Some(Holder::Here));
        drop(fut);
        let st = lock(&core.st);
        assert!(st.holder.is_none() && st.waiters.is_empty());
    }
}
