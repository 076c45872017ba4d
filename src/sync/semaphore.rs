//! `Semaphore` and `BoundedSemaphore`: permits shared by processes, given back when
//! their holder dies.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::oneshot;

use super::hub::{self, Kind, Op, Peer, Remote, Reply, Served, lock};
use super::queue::{expect_ok, unexpected};
use super::{Access, Core, Handle};
use crate::error::{Error, Result};

pub(crate) struct SemCore {
    pub(crate) id: u64,
    st: Mutex<SState>,
    /// Itself, for the grants made from the hub's hooks (which get `&self`).
    me: Weak<SemCore>,
}

struct SState {
    /// Permits free now.
    free: u64,
    /// A bounded semaphore's permits at creation: free and held never exceed it.
    bound: Option<u64>,
    /// Permits held by callers in this process.
    held_here: u64,
    /// Permits held by other processes, by peer id.
    held: HashMap<u64, u64>,
    /// A holder died holding permits (they were given back); the next taker is told.
    abandoned: bool,
    /// The line, by ticket: first come, first served.
    waiters: BTreeMap<u64, Waiter>,
    /// The ticket of each waiter of another process, by (peer id, request id).
    remote: HashMap<(u64, u64), u64>,
    next_ticket: u64,
}

enum Waiter {
    Here(oneshot::Sender<Grant>),
    Peer(Arc<Peer>, u64),
}

impl SState {
    fn enqueue(&mut self, w: Waiter) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if let Waiter::Peer(p, id) = &w {
            self.remote.insert((p.id, *id), ticket);
        }
        self.waiters.insert(ticket, w);
        ticket
    }

    /// Permits there are now, free and held.
    fn total(&self) -> u64 {
        self.free + self.held_here + self.held.values().sum::<u64>()
    }

    /// One more free permit, unless a bounded semaphore would go over its bound.
    fn add_free(&mut self) -> Result<()> {
        if let Some(bound) = self.bound
            && self.total() >= bound
        {
            return Err(Error::ReleasedTooOften { permits: bound });
        }
        self.free += 1;
        Ok(())
    }

    /// Takes a free permit for peer `peer` if one is free and the grant reaches it.
    fn offer_to(&mut self, peer: &Peer, id: u64) -> bool {
        let abandoned = self.abandoned;
        if self.free > 0 && peer.offer(id, Reply::Granted { abandoned }) {
            self.free -= 1;
            *self.held.entry(peer.id).or_default() += 1;
            self.abandoned = false;
            return true;
        }
        false
    }
}

/// A permit held by a caller in the owner process; dropping it gives it back.
struct Grant {
    core: Arc<SemCore>,
    abandoned: bool,
    /// False for a grant taken back from a waiter that was gone (see `wake`).
    live: bool,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if self.live {
            let mut st = lock(&self.core.st);
            st.held_here = st.held_here.saturating_sub(1);
            st.free += 1;
            drop(st);
            self.core.wake();
        }
    }
}

/// A local caller's place in the line; dropping it takes its entry out (a grant sent
/// but not taken is dropped with `rx`, which gives the permit back).
struct Waiting {
    core: Arc<SemCore>,
    ticket: u64,
    rx: oneshot::Receiver<Grant>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let left = lock(&self.core.st).waiters.remove(&self.ticket);
        drop(left);
    }
}

impl SemCore {
    fn new(permits: u64, bounded: bool) -> Arc<Self> {
        Arc::new_cyclic(|me| SemCore {
            me: me.clone(),
            id: hub::next_id(),
            st: Mutex::new(SState {
                free: permits,
                bound: bounded.then_some(permits),
                held_here: 0,
                held: HashMap::new(),
                abandoned: false,
                waiters: BTreeMap::new(),
                remote: HashMap::new(),
                next_ticket: 0,
            }),
        })
    }

    /// A permit for a caller here (`st` is this core's state, with a free permit).
    fn take_here(&self, st: &mut SState) -> Option<Grant> {
        // Only gone while the core is being dropped, and then nobody waits.
        let core = self.me.upgrade()?;
        st.free -= 1;
        st.held_here += 1;
        Some(Grant {
            core,
            abandoned: std::mem::take(&mut st.abandoned),
            live: true,
        })
    }

    /// Free permits go to the waiters at the front of the line, as many as there are
    /// permits; waiters that are gone are skipped (a loop, however many).
    fn wake(&self) {
        let mut st = lock(&self.st);
        while st.free > 0 {
            let Some((_, waiter)) = st.waiters.pop_first() else {
                return;
            };
            match waiter {
                Waiter::Peer(peer, id) => {
                    st.remote.remove(&(peer.id, id));
                    // Not taken if that process's connection is closed.
                    st.offer_to(&peer, id);
                }
                Waiter::Here(tx) if tx.is_closed() => {}
                Waiter::Here(tx) => {
                    let Some(grant) = self.take_here(&mut st) else {
                        return;
                    };
                    drop(st);
                    // If that caller is leaving right now, its receiver drops the grant,
                    // which gives the permit back (and wakes the next one).
                    if let Err(mut grant) = tx.send(grant) {
                        grant.live = false;
                        let mut back = lock(&self.st);
                        back.held_here -= 1;
                        back.free += 1;
                        back.abandoned |= grant.abandoned;
                    }
                    st = lock(&self.st);
                }
            }
        }
    }

    fn try_acquire_here(&self) -> Option<Grant> {
        let mut st = lock(&self.st);
        if st.free > 0 && st.waiters.is_empty() {
            self.take_here(&mut st)
        } else {
            None
        }
    }

    async fn acquire_here(self: &Arc<Self>) -> Result<Grant> {
        let mut waiting = {
            let mut st = lock(&self.st);
            if st.free > 0 && st.waiters.is_empty() {
                return self.take_here(&mut st).ok_or(Error::Closed);
            }
            let (tx, rx) = oneshot::channel();
            let ticket = st.enqueue(Waiter::Here(tx));
            Waiting {
                core: Arc::clone(self),
                ticket,
                rx,
            }
        };
        (&mut waiting.rx).await.map_err(|_| Error::Closed)
    }

    /// Python's `release()` from this process: one more free permit.
    fn release_here(&self) -> Result<()> {
        lock(&self.st).add_free()?;
        self.wake();
        Ok(())
    }
}

/// What the hub does with a semaphore's frames.
impl Served for SemCore {
    fn kind(&self) -> Kind {
        Self::KIND
    }

    fn parked(&self) -> usize {
        let st = lock(&self.st);
        st.remote.len() + st.waiters.len()
    }

    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        let mut st = lock(&self.st);
        match op {
            Op::Acquire { wait } => {
                // First come, first served: not ahead of those in line.
                let granted = st.waiters.is_empty() && st.offer_to(peer, id);
                if !granted && wait {
                    st.enqueue(Waiter::Peer(Arc::clone(peer), id));
                } else if !granted {
                    peer.reply(id, Reply::Bool(false));
                }
            }
            Op::ReleaseOne => {
                let added = st.add_free();
                drop(st);
                match added {
                    Ok(()) => {
                        peer.reply(id, Reply::Ok);
                        self.wake();
                    }
                    Err(_) => {
                        let permits = st_bound(self);
                        peer.reply(id, Reply::OverReleased { permits });
                    }
                }
            }
            Op::Len => peer.reply(id, Reply::Len(st.free)),
            _ => peer.reply(id, Reply::Invalid("not a semaphore operation".to_owned())),
        }
    }

    /// `ToHub::Release`: a permit of `peer`'s is given back (its holder dropped it).
    fn release_peer(self: Arc<Self>, peer: &Peer) {
        let mut st = lock(&self.st);
        match st.held.get_mut(&peer.id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                st.free += 1;
            }
            // Only a process that broke the protocol releases what it does not hold.
            _ => return,
        }
        drop(st);
        self.wake();
    }

    fn cancel(&self, peer: &Peer, id: u64) {
        let mut st = lock(&self.st);
        if let Some(ticket) = st.remote.remove(&(peer.id, id)) {
            st.waiters.remove(&ticket);
            peer.reply(id, Reply::Cancelled);
        }
    }

    /// `peer`'s process let go of the semaphore or died: the permits it held come back,
    /// and the next taker is told.
    fn peer_gone(self: Arc<Self>, peer: &Arc<Peer>) {
        let mut st = lock(&self.st);
        st.waiters
            .retain(|_, w| !matches!(w, Waiter::Peer(p, _) if p.id == peer.id));
        st.remote.retain(|&(p, _), _| p != peer.id);
        let held = st.held.remove(&peer.id).unwrap_or(0);
        if held > 0 {
            st.free += held;
            st.abandoned = true;
            drop(st);
            tracing::warn!(
                permits = held,
                "a process died holding procpool::Semaphore permits; they were given back"
            );
            self.wake();
        }
    }
}

/// A bounded semaphore's permits.
fn st_bound(core: &SemCore) -> u64 {
    lock(&core.st).bound.unwrap_or(u64::MAX)
}

/// A counter of permits shared by processes: Python's `multiprocessing.Semaphore`,
/// async, with RAII permits.
///
/// `acquire().await` waits (without blocking a thread) until a permit is free and
/// returns it; dropping the [`SemaphorePermit`] gives it back. Waiters are served in the
/// order they asked. [`release`](Semaphore::release) adds a permit without one being
/// held, as Python's `release()` does.
///
/// ```
/// use procpool::{Process, Semaphore};
///
/// fn download(slots: Semaphore, n: u32) {
///     let _slot = slots.blocking_acquire().expect("the parent keeps the semaphore");
///     println!("download {n}: at most 3 run at once");
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let slots = Semaphore::new(3);
/// let mut p = Process::new(download, (slots.clone(), 1));
/// p.start().await?;
/// p.join().await?;
/// # Ok(())
/// # }
/// ```
///
/// # When a holder dies
///
/// The permits held by a process that dies (crash, `SIGKILL`, a pool task stopped on
/// timeout) are given back, and the next taker can tell: its
/// [`SemaphorePermit::abandoned`] is true (what the permits guard may have been left
/// half done). The owner logs a warning as well. Python's semaphore loses those permits
/// for good.
///
/// Like [`Lock`](crate::Lock), it lives in the process that created it; once that
/// process is gone, calls elsewhere fail with [`Error::Closed`].
#[derive(Clone)]
pub struct Semaphore {
    h: Handle<SemCore>,
}

/// A [`Semaphore`] that refuses a [`release`](Semaphore::release) that would make more
/// permits than it was created with: Python's `BoundedSemaphore`. It has every method of
/// `Semaphore` (through `Deref`).
///
/// ```
/// # fn main() -> procpool::Result<()> {
/// let s = procpool::BoundedSemaphore::new(1);
/// let permit = s.try_acquire()?.expect("free");
/// drop(permit);
/// assert!(matches!(s.release(), Err(procpool::Error::ReleasedTooOften { permits: 1 })));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BoundedSemaphore(Semaphore);

impl BoundedSemaphore {
    /// A new bounded semaphore with `permits` free permits, owned by this process.
    pub fn new(permits: u64) -> Self {
        let core = SemCore::new(permits, true);
        BoundedSemaphore(Semaphore {
            h: Handle::local(core.id, core),
        })
    }
}

impl std::ops::Deref for BoundedSemaphore {
    type Target = Semaphore;

    fn deref(&self) -> &Semaphore {
        &self.0
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("id", &self.h.id)
            .field("owned_here", &matches!(self.h.access, Access::Local(_)))
            .finish()
    }
}

/// A permit of a [`Semaphore`]; dropping it gives it back (also when it is dropped by a
/// panic's unwinding). A permit never outlives its process: if the process dies, the
/// owner takes it back.
#[must_use = "the permit is given back as soon as it is dropped"]
pub struct SemaphorePermit {
    held: Held,
    abandoned: bool,
}

enum Held {
    Here(#[allow(dead_code)] Grant),
    Remote(Arc<Remote>),
}

impl SemaphorePermit {
    /// True if, before this permit was taken, a holder died holding permits (see
    /// [`Semaphore`]): what they guard may be inconsistent.
    pub fn abandoned(&self) -> bool {
        self.abandoned
    }
}

impl fmt::Debug for SemaphorePermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphorePermit")
            .field("abandoned", &self.abandoned)
            .finish()
    }
}

impl Drop for SemaphorePermit {
    fn drop(&mut self) {
        if let Held::Remote(r) = &self.held {
            r.client.send(&hub::ToHub::Release { obj: r.obj });
        }
        // `Held::Here` gives back in the grant's own Drop.
    }
}

impl Semaphore {
    /// A new semaphore with `permits` free permits, owned by this process.
    pub fn new(permits: u64) -> Self {
        let core = SemCore::new(permits, false);
        Semaphore {
            h: Handle::local(core.id, core),
        }
    }

    /// Waits for a free permit and returns it.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped, this caller leaves the line, and a permit
    /// granted as it was dropped is given back at once.
    pub async fn acquire(&self) -> Result<SemaphorePermit> {
        match &self.h.access {
            Access::Local(core) => Ok(local_permit(core.acquire_here().await?)),
            Access::Remote(r) => remote_permit(r, r.call(Op::Acquire { wait: true }).await?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// [`acquire`](Self::acquire) for synchronous code: blocks this thread (no runtime
    /// needed). Do not call it from async code.
    ///
    /// # Errors
    ///
    /// As for `acquire`.
    pub fn blocking_acquire(&self) -> Result<SemaphorePermit> {
        futures::executor::block_on(self.acquire())
    }

    /// Takes a permit if one is free now and nobody waits for one (`Ok(None)` if not).
    /// From a process other than the owner this asks the owner (a round trip, blocking
    /// this thread briefly).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone; [`Error::Timeout`] if, from
    /// another process, the owner does not answer within 10 s.
    pub fn try_acquire(&self) -> Result<Option<SemaphorePermit>> {
        match &self.h.access {
            Access::Local(core) => Ok(core.try_acquire_here().map(local_permit)),
            Access::Remote(r) => match r.blocking_call(Op::Acquire { wait: false })? {
                Reply::Bool(false) => Ok(None),
                other => remote_permit(r, other).map(Some),
            },
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// Adds a free permit (Python's `release()`), for code that counts by hand rather
    /// than with permits; the first waiter gets it.
    ///
    /// # Errors
    ///
    /// [`Error::ReleasedTooOften`] for a [`BoundedSemaphore`] already at its permits;
    /// [`Error::Closed`] if the owner process is gone; [`Error::Timeout`] if, from
    /// another process, the owner does not answer within 10 s.
    pub fn release(&self) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => core.release_here(),
            Access::Remote(r) => match r.blocking_call(Op::ReleaseOne)? {
                Reply::OverReleased { permits } => Err(Error::ReleasedTooOften { permits }),
                other => expect_ok(other),
            },
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// The permits free now (Python's `get_value()`): a snapshot, which may change at
    /// once.
    ///
    /// # Errors
    ///
    /// As for [`release`](Self::release), but never `ReleasedTooOften`.
    pub fn available(&self) -> Result<u64> {
        match &self.h.access {
            Access::Local(core) => Ok(lock(&core.st).free),
            Access::Remote(r) => match r.blocking_call(Op::Len)? {
                Reply::Len(n) => Ok(n),
                other => Err(unexpected(other)),
            },
            Access::Dead(_) => Err(Error::Closed),
        }
    }
}

fn local_permit(grant: Grant) -> SemaphorePermit {
    SemaphorePermit {
        abandoned: grant.abandoned,
        held: Held::Here(grant),
    }
}

fn remote_permit(r: &Arc<Remote>, reply: Reply) -> Result<SemaphorePermit> {
    match reply {
        Reply::Granted { abandoned } => Ok(SemaphorePermit {
            held: Held::Remote(Arc::clone(r)),
            abandoned,
        }),
        other => Err(unexpected(other)),
    }
}

impl Serialize for Semaphore {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.h.serialize(None, s)
    }
}

impl<'de> Deserialize<'de> for Semaphore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Semaphore {
            h: Handle::deserialize(d)?.0,
        })
    }
}

impl Core for SemCore {
    const KIND: Kind = Kind::Semaphore;
}

impl Drop for SemCore {
    fn drop(&mut self) {
        super::hub::unregister(self.id);
    }
}
