//! Queues, pipes, locks, events, semaphores, barriers and dicts shared between processes
//! (Python's `Queue`, `Pipe`, `Lock`, `Event`, `Semaphore`, `Barrier` and a Manager's
//! `dict`).
//!
//! Every type here is `Clone + Serialize + Deserialize`: create it in any process (the
//! parent, a [`Process`](crate::Process), a pool worker), pass it to children as an
//! ordinary argument, and use it from async code (`.await`) or from plain synchronous
//! targets (the `blocking_*` methods, tokio's naming).
//!
//! - [`Queue`] and [`Lock`] and [`Event`] live in the process that created them (the
//!   *owner*) and are reached from other processes through the owner's procpool thread
//!   over a unix socket. A process that dies lets go of what it held: its lock is
//!   released (and the next holder told, see [`LockGuard::abandoned`]), the queue items
//!   it had fetched but not handed out go back to the queue.
//! - [`Dict`] (a Python `Manager().dict()`) is owner-held the same way; the owner keeps
//!   encoded keys and values, and [`Dict::update`] is an atomic read-modify-write by
//!   compare-and-swap from the caller's process (it holds nothing, so an updater that
//!   dies or hangs blocks nobody).
//! - A handle is a capability: it opens its own object and nothing else (each object has
//!   a random key, shown to its owner), and a process talks only to owners of its own
//!   user.
//! - A [`pipe`](fn@pipe)'s ends are sockets of their own: after an end reaches its process,
//!   messages go straight between the two processes. The other end sees
//!   [`Error::Closed`](crate::Error::Closed) when an end is dropped or its process dies.
//!
//! Before a child reports a result (a pool task's value, a `Process`'s exit), everything
//! it sent to queues, locks and events was applied by their owners. Code that must not
//! lose what it sent even if its process dies the next instant calls
//! [`Queue::flush`]: a `put` from another process returns `Ok` once the item is accepted
//! for delivery, and `flush` waits until the owner has it.

mod barrier;
mod condition;
mod dict;
mod event;
pub(crate) mod hub;
mod lock;
mod pipe;
mod queue;
mod semaphore;
mod shared;

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use barrier::{Barrier, BarrierWaitResult};
pub use condition::Condition;
pub use dict::Dict;
pub use event::Event;
pub use lock::{Lock, LockGuard};
pub use pipe::{Connection, Receiver, Sender, pipe, pipe_oneway};
pub use queue::{Queue, TryPutError};
pub use semaphore::{BoundedSemaphore, Semaphore, SemaphorePermit};
pub use shared::{Array, ArrayGuard, Value, ValueGuard};

pub(crate) use hub::HubRef;
use hub::{Kind, Obj, Remote};
pub(crate) use hub::{Pins, collect, pins_taken, settle, unpin_last};
#[doc(hidden)]
pub use hub::{Tables, set_owner_timeout, tables};
pub(crate) use pipe::{Taken, take_message};

/// The object behind a handle, as seen from the process the handle is in (what the hub
/// does with it is [`Served`](hub::Served)).
pub(crate) trait Core: hub::Served + Sized + 'static {
    const KIND: Kind;

    /// The object, as the hub holds it.
    fn obj(self: &Arc<Self>) -> Obj {
        Arc::clone(self) as Obj
    }

    /// The object of this kind that the hub found (`None`: another kind).
    fn from_obj(obj: Obj) -> Option<Arc<Self>> {
        obj.as_any().downcast().ok()
    }
}

/// A handle's way to its object.
pub(crate) enum Access<C> {
    /// This process owns it.
    Local(Arc<C>),
    /// Another process owns it.
    Remote(Arc<Remote>),
    /// It could not be reached when the handle arrived; calls fail with `Closed`.
    Dead(#[allow(dead_code)] String),
}

impl<C> Clone for Access<C> {
    fn clone(&self) -> Self {
        match self {
            Access::Local(c) => Access::Local(Arc::clone(c)),
            Access::Remote(r) => Access::Remote(Arc::clone(r)),
            Access::Dead(s) => Access::Dead(s.clone()),
        }
    }
}

/// What every shared object's handle holds.
pub(crate) struct Handle<C> {
    pub(crate) id: u64,
    /// The object's key, for handles of another process's object (see `hub`).
    key: u64,
    pub(crate) access: Access<C>,
    /// The owner's hub, for handles of another process's object.
    owner: Option<HubRef>,
}

impl<C> Clone for Handle<C> {
    fn clone(&self) -> Self {
        Handle {
            id: self.id,
            key: self.key,
            access: self.access.clone(),
            owner: self.owner.clone(),
        }
    }
}

/// How a handle travels.
#[derive(Serialize, Deserialize)]
struct HandleWire {
    hub: HubRef,
    obj: u64,
    /// The capability to open `obj`.
    key: u64,
    /// A queue's bound.
    cap: Option<u64>,
    /// What keeps the object alive until this copy is decoded (0: a child's arguments,
    /// pinned by the parent instead; see `hub`).
    ticket: u64,
}

impl<C: Core> Handle<C> {
    pub(crate) fn local(id: u64, core: Arc<C>) -> Self {
        Handle {
            id,
            key: 0,
            access: Access::Local(core),
            owner: None,
        }
    }

    pub(crate) fn serialize<S: Serializer>(
        &self,
        cap: Option<usize>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let (hub, key, ticket) = match &self.access {
            Access::Local(core) => {
                let hub = hub::hub().map_err(S::Error::custom)?;
                let obj = core.obj();
                let key = hub.register(self.id, &obj).map_err(S::Error::custom)?;
                let ticket = hub::pin_handle(hub, self.id, obj);
                (hub.me.clone(), key, ticket)
            }
            // Kept alive by the owner for as long as this process has it open.
            Access::Remote(_) => match &self.owner {
                Some(h) => (h.clone(), self.key, 0),
                None => return Err(S::Error::custom("a remote handle without its owner")),
            },
            Access::Dead(reason) => {
                return Err(S::Error::custom(format!(
                    "cannot send a handle whose owner process is gone ({reason})"
                )));
            }
        };
        HandleWire {
            hub,
            obj: self.id,
            key,
            cap: cap.and_then(|c| u64::try_from(c).ok()),
            ticket,
        }
        .serialize(s)
    }

    /// The handle and the queue bound it carried.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<(Self, Option<u64>), D::Error> {
        let w = HandleWire::deserialize(d)?;
        let mine = hub::own().filter(|h| h.me == w.hub);
        let access = match mine {
            Some(h) => {
                let found = h.find(w.obj, C::KIND, w.key);
                if w.ticket != 0 {
                    h.unpin(w.ticket, w.obj);
                }
                match found.and_then(C::from_obj) {
                    Some(core) => Access::Local(core),
                    None => Access::Dead("it was dropped".to_owned()),
                }
            }
            None => match Remote::open(&w.hub, w.obj, w.key, C::KIND) {
                Ok(r) => {
                    if w.ticket != 0 {
                        // After the Open (same connection, in order): the object is
                        // held by this process's open when the ticket goes.
                        r.client.send(&hub::ToHub::Unpin {
                            obj: w.obj,
                            ticket: w.ticket,
                        });
                    }
                    Access::Remote(r)
                }
                Err(reason) => Access::Dead(reason),
            },
        };
        Ok((
            Handle {
                id: w.obj,
                key: w.key,
                access,
                owner: Some(w.hub),
            },
            w.cap,
        ))
    }
}

/// Waits until `check` gives a value, checking again each time `changed` is notified.
/// Registered before each check, so a change between the check and the wait is not
/// missed. Cancel safe if `check` is.
pub(crate) async fn wait_until<R>(
    changed: &tokio::sync::Notify,
    mut check: impl FnMut() -> Option<R>,
) -> R {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(r) = check() {
            return r;
        }
        notified.await;
    }
}

/// Encodes task arguments, and returns what keeps the handles among them alive until
/// the receiving child has them.
pub(crate) fn encode_args<T: Serialize + ?Sized>(value: &T) -> (Result<Vec<u8>, String>, Pins) {
    hub::collect(|| crate::wire::encode_value(value))
}
