//! `Barrier`: `n` parties across processes wait for each other; a party that dies breaks
//! it instead of hanging the others.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::oneshot;

use super::hub::{self, Kind, Op, Peer, Reply, Served, lock};
use super::queue::{expect_ok, unexpected};
use super::{Access, Core, Handle};
use crate::error::{Error, Result};

pub(crate) struct BarrierCore {
    pub(crate) id: u64,
    parties: u64,
    st: Mutex<BState>,
    me: Weak<BarrierCore>,
}

struct BState {
    /// The parties waiting in this round, by arrival ticket.
    waiting: BTreeMap<u64, Party>,
    /// Broken until [`Barrier::reset`].
    broken: bool,
    next_ticket: u64,
}

enum Party {
    Here(oneshot::Sender<Passed>),
    Peer(Arc<Peer>, u64),
}

/// How a wait ended: through (its arrival index, and whether it came last), or broken.
type Passed = Option<(u64, bool)>;

impl BState {
    /// Every waiter of this round gets `Broken`; the barrier stays broken.
    fn break_it(&mut self) {
        self.broken = true;
        for (_, party) in std::mem::take(&mut self.waiting) {
            match party {
                Party::Here(tx) => drop(tx.send(None)),
                Party::Peer(peer, id) => peer.reply(id, Reply::Broken),
            }
        }
    }
}

/// A local waiter's place; dropped before the round completes (its future was
/// dropped), it breaks the barrier, as a timeout does in Python.
struct Arrival {
    core: Arc<BarrierCore>,
    ticket: u64,
    rx: oneshot::Receiver<Passed>,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut st = lock(&self.core.st);
        if st.waiting.remove(&self.ticket).is_some() {
            st.break_it();
        }
    }
}

impl BarrierCore {
    fn new(parties: u64) -> Arc<Self> {
        Arc::new_cyclic(|me| BarrierCore {
            id: hub::next_id(),
            parties,
            st: Mutex::new(BState {
                waiting: BTreeMap::new(),
                broken: false,
                next_ticket: 0,
            }),
            me: me.clone(),
        })
    }

    /// Party `party` arrives: it waits, or (the last) releases the round; `Err` with
    /// the party back if the barrier is broken.
    fn arrive(&self, st: &mut BState, party: Party) -> Option<u64> {
        if st.broken {
            match party {
                Party::Here(tx) => drop(tx.send(None)),
                Party::Peer(peer, id) => peer.reply(id, Reply::Broken),
            }
            return None;
        }
        let index = u64::try_from(st.waiting.len()).unwrap_or(u64::MAX);
        if index + 1 < self.parties {
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            st.waiting.insert(ticket, party);
            return Some(ticket);
        }
        // The last one: everybody goes through, in arrival order.
        let last = self.parties.saturating_sub(1);
        let round = std::mem::take(&mut st.waiting);
        for (i, p) in round.into_values().chain([party]).enumerate() {
            let i = u64::try_from(i).unwrap_or(u64::MAX);
            let passed = (i, i == last);
            match p {
                Party::Here(tx) => drop(tx.send(Some(passed))),
                Party::Peer(peer, id) => peer.reply(
                    id,
                    Reply::Passed {
                        index: passed.0,
                        leader: passed.1,
                    },
                ),
            }
        }
        None
    }

    async fn wait_here(&self) -> Result<BarrierWaitResult> {
        let core = self.me.upgrade().ok_or(Error::Closed)?;
        let (tx, rx) = oneshot::channel();
        let ticket = {
            let mut st = lock(&self.st);
            self.arrive(&mut st, Party::Here(tx))
        };
        let mut arrival = Arrival {
            core,
            ticket: ticket.unwrap_or(u64::MAX),
            rx,
        };
        let passed = (&mut arrival.rx).await.map_err(|_| Error::Closed)?;
        passed
            .map(|(index, leader)| BarrierWaitResult { index, leader })
            .ok_or(Error::BrokenBarrier)
    }

    fn reset(&self) {
        let mut st = lock(&self.st);
        st.break_it();
        st.broken = false;
    }
}

/// What the hub does with a barrier's frames.
impl Served for BarrierCore {
    fn kind(&self) -> Kind {
        Self::KIND
    }

    fn parked(&self) -> usize {
        lock(&self.st)
            .waiting
            .values()
            .filter(|p| matches!(p, Party::Peer(..)))
            .count()
    }

    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        let mut st = lock(&self.st);
        match op {
            Op::Wait => {
                self.arrive(&mut st, Party::Peer(Arc::clone(peer), id));
            }
            Op::Reset => {
                drop(st);
                self.reset();
                peer.reply(id, Reply::Ok);
            }
            Op::Abort => {
                st.break_it();
                peer.reply(id, Reply::Ok);
            }
            Op::Len => {
                let n = u64::try_from(st.waiting.len()).unwrap_or(u64::MAX);
                peer.reply(id, Reply::Len(n));
            }
            Op::IsSet => peer.reply(id, Reply::Bool(st.broken)),
            _ => peer.reply(id, Reply::Invalid("not a barrier operation".to_owned())),
        }
    }

    /// A waiter of another process gave up: as in Python, the barrier breaks.
    fn cancel(&self, peer: &Peer, id: u64) {
        let mut st = lock(&self.st);
        let mine = st
            .waiting
            .iter()
            .find(|(_, p)| matches!(p, Party::Peer(pp, i) if pp.id == peer.id && *i == id))
            .map(|(t, _)| *t);
        if let Some(t) = mine {
            st.waiting.remove(&t);
            peer.reply(id, Reply::Cancelled);
            st.break_it();
        }
    }

    /// A process with the barrier open went away (died, or dropped its handles) while
    /// parties wait: it may be a party that will never come, so the barrier breaks
    /// rather than hang them.
    fn peer_gone(self: Arc<Self>, peer: &Arc<Peer>) {
        let mut st = lock(&self.st);
        st.waiting
            .retain(|_, p| !matches!(p, Party::Peer(pp, _) if pp.id == peer.id));
        if !st.waiting.is_empty() {
            tracing::warn!(
                "a process left a procpool::Barrier while parties waited in it; it is broken"
            );
            st.break_it();
        }
    }
}

/// `n` parties, in any processes, wait for each other: Python's
/// `multiprocessing.Barrier`. Each [`wait`](Barrier::wait) returns once `n` have
/// called it; the barrier then starts over for the next round.
///
/// ```
/// use procpool::{Barrier, Process};
///
/// fn party(b: Barrier) -> bool {
///     b.blocking_wait().expect("not broken").is_leader()
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let b = Barrier::new(2);
/// let mut p = Process::new(party, (b.clone(),));
/// p.start().await?;
/// let here = b.wait().await?;
/// let there = p.join().await?;
/// assert!(here.is_leader() != there, "one of them came last");
/// # Ok(())
/// # }
/// ```
///
/// # Broken
///
/// Instead of hanging the parties that wait, the barrier *breaks* (they, and every later
/// `wait`, get [`Error::BrokenBarrier`]) when a waiter gives up (its future is dropped,
/// as a timed-out wait in Python), when [`abort`](Barrier::abort) is called, or when a
/// process that has the barrier open goes away while parties wait: it died, or let go of
/// its handle without coming, so it may be a party that never will. (Keep the barrier
/// out of processes that are not parties, or let them keep their handle while others
/// wait.) [`reset`](Barrier::reset) mends it.
///
/// Like [`Lock`](crate::Lock), it lives in the process that created it; once that
/// process is gone, calls elsewhere fail with [`Error::Closed`].
#[derive(Clone)]
pub struct Barrier {
    h: Handle<BarrierCore>,
    parties: u64,
}

/// How a [`Barrier::wait`] went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierWaitResult {
    index: u64,
    leader: bool,
}

impl BarrierWaitResult {
    /// True for exactly one party of each round: the last to arrive (as
    /// `std::sync::Barrier`'s leader).
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// The order this party arrived in, `0..n` (Python's return value of `wait`).
    pub fn index(&self) -> u64 {
        self.index
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("id", &self.h.id)
            .field("parties", &self.parties)
            .field("owned_here", &matches!(self.h.access, Access::Local(_)))
            .finish()
    }
}

impl Barrier {
    /// A barrier for `parties` parties, owned by this process. A barrier of 0 or 1
    /// parties lets every `wait` through at once.
    pub fn new(parties: u64) -> Self {
        let core = BarrierCore::new(parties.max(1));
        Barrier {
            h: Handle::local(core.id, core),
            parties: parties.max(1),
        }
    }

    /// The number of parties it waits for.
    pub fn parties(&self) -> u64 {
        self.parties
    }

    /// Waits until all parties have called `wait` in this round.
    ///
    /// # Errors
    ///
    /// [`Error::BrokenBarrier`] if it is or becomes broken (see [`Barrier`]);
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe by design, as in Python: dropping the future while it waits
    /// breaks the barrier for the other parties (they would wait for this one forever).
    pub async fn wait(&self) -> Result<BarrierWaitResult> {
        match &self.h.access {
            Access::Local(core) => core.wait_here().await,
            Access::Remote(r) => match r.call(Op::Wait).await? {
                Reply::Passed { index, leader } => Ok(BarrierWaitResult { index, leader }),
                Reply::Broken => Err(Error::BrokenBarrier),
                other => Err(unexpected(other)),
            },
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// [`wait`](Self::wait), giving up after `timeout`: then this call is
    /// [`Error::Timeout`] and, as in Python, the barrier breaks for the others (they
    /// would wait for this party forever).
    ///
    /// # Errors
    ///
    /// As for `wait`, and `Timeout`.
    ///
    /// # Cancel safety
    ///
    /// As for `wait`.
    pub async fn wait_timeout(&self, timeout: Duration) -> Result<BarrierWaitResult> {
        let sleep = crate::runtime::timer::Sleep::new(timeout);
        match crate::runtime::timer::timeout(sleep, self.wait()).await {
            Some(r) => r,
            None => Err(Error::Timeout { after: timeout }),
        }
    }

    /// [`wait_timeout`](Self::wait_timeout) for synchronous code: blocks this thread at
    /// most about `timeout` (no runtime needed).
    ///
    /// # Errors
    ///
    /// As for `wait_timeout`.
    pub fn blocking_wait_timeout(&self, timeout: Duration) -> Result<BarrierWaitResult> {
        let deadline = crate::runtime::timer::deadline_in(timeout);
        let sleep = crate::runtime::timer::Sleep::parked_until(deadline);
        crate::runtime::timer::block_on_until(
            async {
                match crate::runtime::timer::timeout(sleep, self.wait()).await {
                    Some(r) => r,
                    None => Err(Error::Timeout { after: timeout }),
                }
            },
            deadline,
        )
    }

    /// [`wait`](Self::wait) for synchronous code: blocks this thread (no runtime
    /// needed). Do not call it from async code.
    ///
    /// # Errors
    ///
    /// As for `wait`.
    pub fn blocking_wait(&self) -> Result<BarrierWaitResult> {
        futures::executor::block_on(self.wait())
    }

    /// Breaks the barrier: the parties waiting, and later ones, get
    /// [`Error::BrokenBarrier`] (Python's `abort()`).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone; [`Error::Timeout`] if, from
    /// another process, the owner does not answer within 10 s.
    pub fn abort(&self) -> Result<()> {
        self.op(Op::Abort, |core| lock(&core.st).break_it())
    }

    /// Mends a broken barrier for a new round; parties waiting now get
    /// [`Error::BrokenBarrier`] (Python's `reset()`).
    ///
    /// # Errors
    ///
    /// As for [`abort`](Self::abort).
    pub fn reset(&self) -> Result<()> {
        self.op(Op::Reset, |core| core.reset())
    }

    /// Whether it is broken (Python's `broken`).
    ///
    /// # Errors
    ///
    /// As for [`abort`](Self::abort).
    pub fn is_broken(&self) -> Result<bool> {
        match &self.h.access {
            Access::Local(core) => Ok(lock(&core.st).broken),
            Access::Remote(r) => match r.blocking_call(Op::IsSet)? {
                Reply::Bool(b) => Ok(b),
                other => Err(unexpected(other)),
            },
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// The parties waiting now (Python's `n_waiting`): a snapshot.
    ///
    /// # Errors
    ///
    /// As for [`abort`](Self::abort).
    pub fn n_waiting(&self) -> Result<u64> {
        match &self.h.access {
            Access::Local(core) => Ok(u64::try_from(lock(&core.st).waiting.len()).unwrap_or(0)),
            Access::Remote(r) => match r.blocking_call(Op::Len)? {
                Reply::Len(n) => Ok(n),
                other => Err(unexpected(other)),
            },
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    fn op(&self, op: Op, here: impl FnOnce(&BarrierCore)) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => {
                here(core);
                Ok(())
            }
            Access::Remote(r) => expect_ok(r.blocking_call(op)?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }
}

/// How a barrier travels: its handle and its parties.
#[derive(Serialize, Deserialize)]
struct BarrierWire<H> {
    h: H,
    parties: u64,
}

struct HandleSer<'a>(&'a Handle<BarrierCore>);

impl Serialize for HandleSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(None, s)
    }
}

struct HandleDe(Handle<BarrierCore>);

impl<'de> Deserialize<'de> for HandleDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(HandleDe(Handle::deserialize(d)?.0))
    }
}

impl Serialize for Barrier {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        BarrierWire {
            h: HandleSer(&self.h),
            parties: self.parties,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Barrier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let w = BarrierWire::<HandleDe>::deserialize(d)?;
        Ok(Barrier {
            h: w.h.0,
            parties: w.parties,
        })
    }
}

impl Core for BarrierCore {
    const KIND: Kind = Kind::Barrier;
}

impl Drop for BarrierCore {
    fn drop(&mut self) {
        super::hub::unregister(self.id);
    }
}
