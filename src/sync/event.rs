//! `Event`: a flag shared by processes that tasks can wait for.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::Notify;

use super::hub::{self, Kind, Op, Peer, Reply, Served, lock};
use super::queue::expect_ok;
use super::{Access, Core, Handle, wait_until};
use crate::error::{Error, Result};
use crate::runtime::timer::{self, Sleep};

pub(crate) struct EventCore {
    pub(crate) id: u64,
    st: Mutex<EState>,
    changed: Notify,
}

struct EState {
    set: bool,
    /// Waiters in other processes.
    waiters: Vec<(Arc<Peer>, u64)>,
}

impl EventCore {
    fn new() -> Arc<Self> {
        Arc::new(EventCore {
            id: hub::next_id(),
            st: Mutex::new(EState {
                set: false,
                waiters: Vec::new(),
            }),
            changed: Notify::new(),
        })
    }

    fn set(&self) {
        let mut st = lock(&self.st);
        st.set = true;
        for (peer, id) in st.waiters.drain(..) {
            peer.reply(id, Reply::Ok);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    fn clear(&self) {
        lock(&self.st).set = false;
    }

    fn is_set(&self) -> bool {
        lock(&self.st).set
    }
}

/// What the hub does with an event's frames.
impl Served for EventCore {
    fn kind(&self) -> Kind {
        Self::KIND
    }

    fn parked(&self) -> usize {
        lock(&self.st).waiters.len()
    }

    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        match op {
            Op::Set => {
                self.set();
                peer.reply(id, Reply::Ok);
            }
            Op::Clear => {
                self.clear();
                peer.reply(id, Reply::Ok);
            }
            Op::IsSet => peer.reply(id, Reply::Bool(self.is_set())),
            Op::Wait => {
                let mut st = lock(&self.st);
                if st.set {
                    peer.reply(id, Reply::Ok);
                } else {
                    st.waiters.push((Arc::clone(peer), id));
                }
            }
            _ => peer.reply(id, Reply::Invalid("not an event operation".to_owned())),
        }
    }

    /// A waiter of another process gave up: it leaves the line and is answered
    /// `Cancelled` (which clears the request on its side). Not in line: it was answered.
    fn cancel(&self, peer: &Peer, id: u64) {
        let mut st = lock(&self.st);
        let before = st.waiters.len();
        st.waiters.retain(|(p, i)| !(p.id == peer.id && *i == id));
        if st.waiters.len() < before {
            peer.reply(id, Reply::Cancelled);
        }
    }

    fn peer_gone(self: Arc<Self>, peer: &Arc<Peer>) {
        lock(&self.st).waiters.retain(|(p, _)| p.id != peer.id);
    }
}

/// A flag shared by processes: Python's `multiprocessing.Event`. Tasks wait until some
/// process sets it.
///
/// ```
/// use procpool::{Event, Process};
///
/// fn waiter(ev: Event) -> String {
///     ev.blocking_wait().expect("the parent keeps the event");
///     "released".to_owned()
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let ev = Event::new();
/// let mut p = Process::new(waiter, (ev.clone(),));
/// p.start().await?;
/// ev.set()?;
/// assert_eq!(p.join().await?, "released");
/// # Ok(())
/// # }
/// ```
///
/// Like the [`Queue`](crate::Queue), the event lives in the process that created it;
/// once that process is gone, calls elsewhere fail with [`Error::Closed`] (and `is_set`
/// reports `false`). From another process, `set`, `clear` and `is_set` are a round trip
/// to the owner, blocking the thread briefly, so they are ordered with everything else
/// that process did. Dropping a handle does nothing to the flag.
#[derive(Clone)]
pub struct Event {
    h: Handle<EventCore>,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.h.id)
            .field("owned_here", &matches!(self.h.access, Access::Local(_)))
            .finish()
    }
}

impl Default for Event {
    fn default() -> Self {
        Self::new()
    }
}

impl Event {
    /// A new event, not set, owned by this process.
    pub fn new() -> Self {
        let core = EventCore::new();
        Event {
            h: Handle::local(core.id, core),
        }
    }

    /// Sets the flag and wakes every waiter, in every process.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// [`Error::Timeout`] if, from another process, the owner does not answer within 10 s
    /// (see [Queues, pipes, locks and events](crate#queues-pipes-locks-and-events)).
    pub fn set(&self) -> Result<()> {
        self.simple(Op::Set, EventCore::set)
    }

    /// Clears the flag: later waits wait again.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// [`Error::Timeout`] if, from another process, the owner does not answer within 10 s
    /// (see [Queues, pipes, locks and events](crate#queues-pipes-locks-and-events)).
    pub fn clear(&self) -> Result<()> {
        self.simple(Op::Clear, EventCore::clear)
    }

    fn simple(&self, op: Op, here: fn(&EventCore)) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => {
                here(core);
                Ok(())
            }
            Access::Remote(r) => expect_ok(r.blocking_call(op)?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// Whether the flag is set. `false` if the owner process is gone.
    pub fn is_set(&self) -> bool {
        match &self.h.access {
            Access::Local(core) => core.is_set(),
            Access::Remote(r) => matches!(r.blocking_call(Op::IsSet), Ok(Reply::Bool(true))),
            Access::Dead(_) => false,
        }
    }

    /// Waits until the flag is set (at once if it is).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait(&self) -> Result<()> {
        match &self.h.access {
            Access::Local(core) => {
                wait_until(&core.changed, || core.is_set().then_some(())).await;
                Ok(())
            }
            Access::Remote(r) => expect_ok(r.call(Op::Wait).await?),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// [`wait`](Self::wait) for at most `d`: `Ok(true)` if the flag was set, `Ok(false)`
    /// if the time ran out (Python's `wait(timeout)`). A flag set now answers at once.
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
    /// Cancel safe.
    pub async fn wait_timeout(&self, d: Duration) -> Result<bool> {
        match timer::timeout(Sleep::new(d), self.wait()).await {
            Some(r) => r.map(|()| true),
            None => Ok(false),
        }
    }

    /// [`wait_timeout`](Self::wait_timeout) for synchronous code: blocks this thread at
    /// most about `d`. Needs no runtime. Do not call it from async code.
    ///
    /// # Errors
    ///
    /// As for `wait`.
    pub fn blocking_wait_timeout(&self, d: Duration) -> Result<bool> {
        let at = timer::deadline_in(d);
        let wait = timer::timeout(Sleep::parked_until(at), self.wait());
        match timer::block_on_until(wait, at) {
            Some(r) => r.map(|()| true),
            None => Ok(false),
        }
    }

    /// [`wait`](Self::wait) for synchronous code: blocks this thread. Do not call it
    /// from async code.
    ///
    /// # Errors
    ///
    /// As for `wait`.
    pub fn blocking_wait(&self) -> Result<()> {
        futures::executor::block_on(self.wait())
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.h.serialize(None, s)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Event {
            h: Handle::deserialize(d)?.0,
        })
    }
}

impl Drop for EventCore {
    fn drop(&mut self) {
        hub::unregister(self.id);
    }
}

impl Core for EventCore {
    const KIND: Kind = Kind::Event;
}
