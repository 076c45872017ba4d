//! `Condition`: a condition variable over a [`Lock`], across processes.
//!
//! A wait is two steps with the owner of the condition: *enter* (the waiter gets a
//! ticket, counted by `notify` from then on), then, after the lock is let go, *wait* on
//! the ticket. A notify sent by a process that took the lock after the waiter let go of
//! it is therefore handled after the waiter entered: no wake-up is lost.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::oneshot;

use super::hub::{self, Kind, Op, Peer, Remote, Reply, Served, lock};
use super::queue::{expect_ok, unexpected};
use super::{Access, Core, Handle, Lock, LockGuard};
use crate::error::{Error, Result};

pub(crate) struct CondCore {
    pub(crate) id: u64,
    st: Mutex<CState>,
}

#[derive(Default)]
struct CState {
    /// Tickets entered and not woken yet, in order, with who holds them (`None`: this
    /// process).
    entered: BTreeMap<u64, Option<u64>>,
    /// Tickets notified whose waiter has not come to wait yet.
    notified: HashMap<u64, Option<u64>>,
    /// Waiters parked on their ticket.
    parked: HashMap<u64, Parked>,
    next_ticket: u64,
}

enum Parked {
    Here(oneshot::Sender<()>),
    Peer(Arc<Peer>, u64),
}

impl CState {
    fn enter(&mut self, who: Option<u64>) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.entered.insert(t, who);
        t
    }

    /// Wakes the first `n` tickets entered.
    fn notify(&mut self, n: usize) {
        for _ in 0..n {
            let Some((t, who)) = self.entered.pop_first() else {
                return;
            };
            match self.parked.remove(&t) {
                Some(Parked::Here(tx)) => {
                    if tx.send(()).is_err() {
                        // Its waiter is leaving: the wake-up goes to the next one.
                        self.notify(1);
                    }
                }
                Some(Parked::Peer(peer, id)) => {
                    if !peer.offer(id, Reply::Ok) {
                        // Its process is gone (its connection closed): the next one.
                        self.notify(1);
                    }
                }
                None => {
                    self.notified.insert(t, who);
                }
            }
        }
    }

    /// Ticket `t` is given up: if it had been woken, the wake-up goes to the next one.
    fn leave(&mut self, t: u64) {
        self.parked.remove(&t);
        if self.entered.remove(&t).is_none() && self.notified.remove(&t).is_some() {
            self.notify(1);
        }
    }

    /// Parks `p` on ticket `t`, or answers it at once if `t` was woken already.
    fn park(&mut self, t: u64, p: Parked) {
        if self.notified.remove(&t).is_some() {
            match p {
                Parked::Here(tx) => tx.send(()).unwrap_or(()),
                Parked::Peer(peer, id) => peer.reply(id, Reply::Ok),
            }
        } else if self.entered.contains_key(&t) {
            self.parked.insert(t, p);
        } else if let Parked::Peer(peer, id) = p {
            peer.reply(id, Reply::Invalid("no such ticket".to_owned()));
        }
    }
}

impl CondCore {
    fn new() -> Arc<Self> {
        Arc::new(CondCore {
            id: hub::next_id(),
            st: Mutex::new(CState::default()),
        })
    }
}

/// What the hub does with a condition's frames.
impl Served for CondCore {
    fn kind(&self) -> Kind {
        Self::KIND
    }

    fn parked(&self) -> usize {
        lock(&self.st)
            .parked
            .values()
            .filter(|p| matches!(p, Parked::Peer(..)))
            .count()
    }

    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        let mut st = lock(&self.st);
        match op {
            Op::CondEnter => {
                let t = st.enter(Some(peer.id));
                peer.reply(id, Reply::Len(t));
            }
            Op::CondWait { ticket } => st.park(ticket, Parked::Peer(Arc::clone(peer), id)),
            Op::CondLeave { ticket } => {
                st.leave(ticket);
                peer.reply(id, Reply::Ok);
            }
            Op::Notify { all } => {
                let n = if all { usize::MAX } else { 1 };
                st.notify(n);
                peer.reply(id, Reply::Ok);
            }
            _ => peer.reply(id, Reply::Invalid("not a condition operation".to_owned())),
        }
    }

    /// A waiter of another process gave up: its ticket goes (a wake-up it had goes on).
    fn cancel(&self, peer: &Peer, id: u64) {
        let mut st = lock(&self.st);
        let t = st
            .parked
            .iter()
            .find(|(_, p)| matches!(p, Parked::Peer(pp, i) if pp.id == peer.id && *i == id))
            .map(|(t, _)| *t);
        if let Some(t) = t {
            st.leave(t);
            peer.reply(id, Reply::Cancelled);
        }
    }

    /// A process went away: its tickets go, and wake-ups it had go to the next waiters.
    fn peer_gone(self: Arc<Self>, peer: &Arc<Peer>) {
        let mut st = lock(&self.st);
        let mine: Vec<u64> = st
            .entered
            .iter()
            .chain(st.notified.iter())
            .filter(|(_, who)| **who == Some(peer.id))
            .map(|(t, _)| *t)
            .collect();
        for t in mine {
            st.leave(t);
        }
    }
}

/// A condition variable over a [`Lock`], across processes: Python's
/// `multiprocessing.Condition`.
///
/// A process holding the lock [`wait`](Condition::wait)s: the lock is let go, the
/// process sleeps until another [`notify_one`](Condition::notify_one)s or
/// [`notify_all`](Condition::notify_all)s, and it takes the lock again before `wait`
/// returns. Waiters are woken in the order they came. No wake-up is lost: a notify from
/// a process that took the lock after a waiter let go of it wakes that waiter (or one
/// that came before it). As everywhere, a wake-up may find the condition false again
/// (another process got there first): wait in a loop, or with
/// [`wait_for`](Condition::wait_for).
///
/// ```
/// use procpool::{Condition, Lock, Process, Value};
///
/// fn produce(c: Condition, ready: Value<u8>) {
///     let _g = c.lock().blocking_lock().unwrap();
///     ready.set(1).unwrap();
///     c.notify_all().unwrap();
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let c = Condition::new(Lock::new());
/// let ready = Value::new(0u8);
/// let mut g = c.lock().lock().await?;
/// let mut p = Process::new(produce, (c.clone(), ready.clone()));
/// p.start().await?;
/// c.wait_for(&mut g, || ready.get().unwrap() == 1).await?;
/// drop(g);
/// p.join().await?;
/// # Ok(())
/// # }
/// ```
///
/// The condition lives in the process that created it (like [`Lock`]); notifying does
/// not need the lock, as in Python it should be held for the state it announces. A
/// waiter that dies, or whose wait is dropped, gives its place up, and a wake-up meant
/// for it goes to the next waiter.
#[derive(Clone)]
pub struct Condition {
    h: Handle<CondCore>,
    lock: Lock,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("id", &self.h.id)
            .field("lock", &self.lock)
            .finish()
    }
}

/// A local waiter's ticket: given up (and a wake-up it had passed on) unless it was
/// answered.
struct Ticket<'a> {
    core: &'a CondCore,
    t: u64,
    done: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.core.st).leave(self.t);
        }
    }
}

/// A remote waiter's ticket: given up unless it was answered.
struct RemoteTicket<'a> {
    r: &'a Remote,
    t: u64,
    done: bool,
}

impl Drop for RemoteTicket<'_> {
    fn drop(&mut self) {
        if !self.done {
            // No answer wanted (id 0).
            self.r.client.send(&hub::ToHub::Req {
                id: 0,
                obj: self.r.obj,
                op: Op::CondLeave { ticket: self.t },
            });
        }
    }
}

impl Condition {
    /// A condition over `lock`, owned by this process.
    pub fn new(lock: Lock) -> Self {
        let core = CondCore::new();
        Condition {
            h: Handle::local(core.id, core),
            lock,
        }
    }

    /// Its lock (Python's `with cond:` takes it).
    pub fn lock(&self) -> &Lock {
        &self.lock
    }

    /// Lets go of the lock `guard` holds (this condition's lock), waits for a notify,
    /// and takes the lock again into `guard`.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner of the condition or of the lock is gone; `guard`
    /// then no longer holds the lock ([`LockGuard::is_held`]).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped, this waiter gives its place up (a wake-up it had goes
    /// to the next waiter), and `guard` no longer holds the lock unless the wait had
    /// finished: check [`LockGuard::is_held`] before relying on it, or drop it.
    pub async fn wait(&self, guard: &mut LockGuard) -> Result<()> {
        self.wait_with(guard, std::future::pending())
            .await
            .map(|_| ())
    }

    /// [`wait`](Self::wait), giving up after `timeout`: `Ok(false)` if it was not
    /// notified by then (the lock is taken again either way).
    ///
    /// # Errors
    ///
    /// As for `wait`.
    ///
    /// # Cancel safety
    ///
    /// As for `wait`.
    pub async fn wait_timeout(&self, guard: &mut LockGuard, timeout: Duration) -> Result<bool> {
        // The runtime's timer, or procpool's own outside one (see `runtime::timer`).
        let sleep = crate::runtime::timer::Sleep::new(timeout);
        self.wait_with(guard, sleep).await
    }

    /// Waits until `pred()` is true, checking it with the lock held: before the first
    /// wait and after every wake-up (Python's `wait_for`).
    ///
    /// # Errors
    ///
    /// As for `wait`.
    ///
    /// # Cancel safety
    ///
    /// As for `wait`.
    pub async fn wait_for(
        &self,
        guard: &mut LockGuard,
        mut pred: impl FnMut() -> bool,
    ) -> Result<()> {
        while !pred() {
            self.wait(guard).await?;
        }
        Ok(())
    }

    /// [`wait`](Self::wait) for synchronous code: blocks this thread (no runtime
    /// needed). Do not call it from async code.
    ///
    /// # Errors
    ///
    /// As for `wait`.
    pub fn blocking_wait(&self, guard: &mut LockGuard) -> Result<()> {
        futures::executor::block_on(self.wait(guard))
    }

    /// [`wait_timeout`](Self::wait_timeout) for synchronous code (no runtime needed).
    ///
    /// # Errors
    ///
    /// As for `wait`.
    pub fn blocking_wait_timeout(&self, guard: &mut LockGuard, timeout: Duration) -> Result<bool> {
        use crate::runtime::timer::{Sleep, block_on_until, deadline_in};
        let deadline = deadline_in(timeout);
        block_on_until(
            self.wait_with(guard, Sleep::parked_until(deadline)),
            deadline,
        )
    }

    /// [`wait_for`](Self::wait_for) for synchronous code (no runtime needed).
    ///
    /// # Errors
    ///
    /// As for `wait`.
    pub fn blocking_wait_for(
        &self,
        guard: &mut LockGuard,
        mut pred: impl FnMut() -> bool,
    ) -> Result<()> {
        while !pred() {
            self.blocking_wait(guard)?;
        }
        Ok(())
    }

    /// Wakes the first waiter, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone; [`Error::Timeout`] if, from
    /// another process, the owner does not answer within 10 s.
    pub fn notify_one(&self) -> Result<()> {
        self.notify(false)
    }

    /// Wakes every waiter.
    ///
    /// # Errors
    ///
    /// As for [`notify_one`](Self::notify_one).
    pub fn notify_all(&self) -> Result<()> {
        self.notify(true)
    }

    fn notify(&self, all: bool) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => {
                lock(&core.st).notify(if all { usize::MAX } else { 1 });
                Ok(())
            }
            Access::Remote(r) => expect_ok(r.blocking_call(Op::Notify { all })?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// Enter, let go of the lock, wait on the ticket until woken or `timer` fires,
    /// take the lock again. True if woken.
    async fn wait_with(
        &self,
        guard: &mut LockGuard,
        timer: impl std::future::Future<Output = ()>,
    ) -> Result<bool> {
        if !guard.is_held() {
            return Err(Error::InvalidConfig {
                reason: "Condition::wait needs a guard that holds the lock".to_owned(),
            });
        }
        let woken = match &self.h.access {
            Access::Local(core) => {
                let mut ticket = Ticket {
                    core,
                    t: lock(&core.st).enter(None),
                    done: false,
                };
                let (tx, mut rx) = oneshot::channel();
                guard.release_for_wait();
                lock(&core.st).park(ticket.t, Parked::Here(tx));
                tokio::pin!(timer);
                let woken = tokio::select! {
                    r = &mut rx => r.is_ok(),
                    // A wake-up that came with the timer counts.
                    () = &mut timer => rx.try_recv().is_ok(),
                };
                ticket.done = woken;
                woken
            }
            Access::Remote(r) => {
                let t = match r.call(Op::CondEnter).await? {
                    Reply::Len(t) => t,
                    other => return Err(unexpected(other)),
                };
                let mut ticket = RemoteTicket { r, t, done: false };
                guard.release_for_wait();
                let wait = r.call(Op::CondWait { ticket: t });
                tokio::pin!(wait, timer);
                let woken = tokio::select! {
                    r = &mut wait => {
                        expect_ok(r?)?;
                        true
                    }
                    () = &mut timer => false,
                };
                ticket.done = woken;
                woken
            }
            Access::Dead(_) => return Err(Error::Closed),
        };
        let again = self.lock.lock().await?;
        guard.rehold(again);
        Ok(woken)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        struct H<'a>(&'a Handle<CondCore>);
        impl Serialize for H<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                self.0.serialize(None, s)
            }
        }
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&H(&self.h))?;
        t.serialize_element(&self.lock)?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct H(Handle<CondCore>);
        impl<'de> Deserialize<'de> for H {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                Ok(H(Handle::deserialize(d)?.0))
            }
        }
        let (h, lock) = <(H, Lock)>::deserialize(d)?;
        Ok(Condition { h: h.0, lock })
    }
}

impl Core for CondCore {
    const KIND: Kind = Kind::Condition;
}

impl Drop for CondCore {
    fn drop(&mut self) {
        super::hub::unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wake-up for a waiter that gives its place up before it came to wait goes to
    /// the next waiter, and one for a waiter already parked is answered at once.
    #[test]
    fn a_wake_up_of_a_waiter_that_leaves_goes_to_the_next() {
        let mut st = CState::default();
        let (a, b) = (st.enter(None), st.enter(None));
        st.notify(1);
        assert!(st.notified.contains_key(&a) && st.entered.contains_key(&b));
        st.leave(a);
        assert!(st.notified.contains_key(&b), "passed on to b");
        let (tx, mut rx) = oneshot::channel();
        st.park(b, Parked::Here(tx));
        assert!(
            rx.try_recv().is_ok(),
            "b was woken before it parked: answered at once"
        );
        let c = st.enter(None);
        let (tx, mut rx) = oneshot::channel();
        st.park(c, Parked::Here(tx));
        assert!(rx.try_recv().is_err());
        st.notify(usize::MAX);
        assert!(rx.try_recv().is_ok());
        assert!(st.entered.is_empty() && st.notified.is_empty() && st.parked.is_empty());
    }
}
