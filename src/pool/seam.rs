//! The seam between the dispatcher and its workers: what it asks of a worker
//! ([`Conn`]), of the thing that starts and stops them ([`Workers`]), and the
//! [`Event`]s that come back.
//!
//! The pool's workers are processes (`pool::worker`: [`Processes`](super::worker::Processes));
//! the dispatcher's tests drive an in-process fake through the same seam under
//! `tokio::time::pause()` (`dispatcher/fake.rs`). A backend that runs tasks elsewhere
//! (remote nodes) sits one level up, beside the dispatcher: it takes the same
//! [`Command`](super::message::Command)s and answers the same
//! [`Reply`](super::message::Reply)s.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::message::Args;
use crate::error::{Error, ExitReason};
use crate::target::TargetRef;
use crate::wire::Outcome;

/// Where a worker's events go: the dispatcher's one inbox.
pub(crate) type Events<C> = mpsc::UnboundedSender<Event<C>>;

/// What workers (and the tasks that start and stop them) tell the dispatcher.
#[derive(Debug)]
pub(crate) enum Event<C> {
    /// A worker finished its handshake (and initializer).
    Ready(C),
    /// A worker could not be started.
    Failed(Error),
    /// Task `id` finished on worker `worker`.
    Done {
        worker: u64,
        id: u64,
        outcome: Outcome,
    },
    /// Worker `worker` is gone (its channel closed and it was reaped).
    Gone {
        worker: u64,
        exit: ExitReason,
        protocol: Option<String>,
    },
    /// A worker the dispatcher stopped (see [`Workers::stop`]) is reaped.
    Stopped,
    /// Task `id`'s arguments for worker `worker` were encoded off the dispatcher (see
    /// [`Conn::stage`]): its frame is queued, or the encoding failed.
    Staged {
        worker: u64,
        id: u64,
        result: Result<(), Error>,
    },
    /// Worker `worker` gave back the tasks it was sent as numbers `after + 1 ..= upto`:
    /// they will not run there (see [`Conn::recall`]).
    Recalled { worker: u64, after: u64, upto: u64 },
}

/// One live worker as the dispatcher drives it.
///
/// Frames are queued by the calls and written by [`flush`](Self::flush), which the
/// dispatcher calls once per round. A worker runs its tasks in the order it was sent
/// them and answers each ([`Event::Done`]), a skipped one too.
///
/// # Drop
///
/// Frames already queued are still written; then the worker is told to exit (its
/// channel closes).
pub(crate) trait Conn: Send + 'static {
    /// The dispatcher's number for it (in its events).
    fn id(&self) -> u64;
    /// Its name, as in `current_process().name()` there.
    fn name(&self) -> &Arc<str>;
    /// Its process id (for error messages).
    fn pid(&self) -> u32;
    /// Queues task `id`. Large map items are encoded now; if one cannot be, nothing is
    /// queued and that is the error.
    fn run(&self, id: u64, target: TargetRef, args: &Args) -> Result<(), Error>;
    /// Queues task `id` as [`run`](Self::run) does, but encodes its large items off the
    /// dispatcher; [`Event::Staged`] on `events` says when it is queued, or why not.
    /// Nothing else may be queued for this worker until then.
    fn stage(&self, id: u64, target: TargetRef, args: Args, events: Events<Self>)
    where
        Self: Sized;
    /// Asks it to skip task `id` if it has not started it.
    fn skip(&self, id: u64);
    /// Asks it to exit after the tasks it was sent.
    fn shutdown(&self);
    /// Asks it to give back the tasks it was sent up to number `upto` that it has not
    /// started ([`Event::Recalled`] answers, even while a task runs). False if the
    /// request could not be written (it is dying: [`Event::Gone`] follows).
    fn recall(&self, upto: u64) -> bool;
    /// Task `id`, sent with large arguments, was answered or given back.
    fn answered(&self, id: u64);
    /// It has no more tasks: buffers kept for large arguments may go.
    fn release_buffers(&self);
    /// Writes what is queued.
    fn flush(&self);
    /// Its resident set in bytes, `None` if it cannot be read.
    fn resident_bytes(&self) -> Option<u64>;
}

/// What starts and stops workers.
pub(crate) trait Workers: Send + Sync + 'static {
    type Conn: Conn;
    /// Starts worker `id`; [`Event::Ready`] or [`Event::Failed`] follows on `events`
    /// (nothing, if `events` closes first: the worker is then killed). Returns at once.
    fn start(&self, id: u64, events: Events<Self::Conn>);
    /// Stops `conn` (asked to stop, then killed after a grace period); `Event::Stopped`
    /// follows once it is reaped. Returns at once.
    fn stop(&self, conn: Self::Conn, events: Events<Self::Conn>);
    /// Kills `conns` at once and resolves when every one is reaped.
    fn kill_all(&self, conns: Vec<Self::Conn>) -> impl Future<Output = ()> + Send;
}
