//! The futures a caller awaits for one task: [`Apply`], [`TaskHandle`], [`TaskTimeout`].

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::FusedFuture;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;

use super::message::{Args, Reply, TaskResult};
use super::{Map, Shared};
use crate::error::{Error, Result};
use crate::sync::Pins;
use crate::target::TargetRef;

/// The future of [`AsyncPool::apply`](super::AsyncPool::apply): runs one task and
/// resolves with its return value.
///
/// Submits the task when first polled. Options go before that: [`timeout`](Self::timeout)
/// (the caller's wait), [`run_timeout`](Self::run_timeout) (the task's execution).
///
/// Polled again after it gave its result, it answers [`Error::AlreadyCompleted`] (it
/// never panics), and it is a [`FusedFuture`], so `futures::select!` can tell.
///
/// # Drop
///
/// Dropping it before it resolves cancels the task: a queued task is removed, a running
/// one has its worker stopped and replaced (unless [`kill_on_cancel`](Self::kill_on_cancel)
/// or the pool's setting is off: then it runs to its end, its result dropped).
#[must_use = "futures do nothing unless polled"]
pub struct Apply<R> {
    shared: Arc<Shared>,
    call: Option<Result<(TargetRef, Args, Pins)>>,
    timeout: Option<Duration>,
    run_timeout: Option<Duration>,
    /// Its own `kill_on_cancel` (`None`: the pool's).
    kill: Option<bool>,
    /// The timeout's timer, from the first poll (it counts the wait for room).
    sleep: Option<Pin<Box<Sleep>>>,
    /// Waiting for room in the queue (see `Builder::max_queued`).
    admission: super::Admission,
    running: Option<TaskTimeout<R>>,
}

impl<R> std::fmt::Debug for Apply<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apply")
            .field("timeout", &self.timeout)
            .field("run_timeout", &self.run_timeout)
            .field("kill_on_cancel", &self.kill)
            .field("submitted", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl<R> Apply<R> {
    pub(super) fn new(shared: Arc<Shared>, call: Result<(TargetRef, Args, Pins)>) -> Self {
        Apply {
            shared,
            call: Some(call),
            timeout: None,
            run_timeout: None,
            kill: None,
            sleep: None,
            admission: super::Admission::default(),
            running: None,
        }
    }

    /// Gives up after `d` from the first poll: the future resolves with
    /// [`Error::Timeout`] and the task is cancelled (its worker stopped if it is running).
    /// The time spent waiting for room in a full queue counts (see
    /// [`Builder::max_queued`](super::Builder::max_queued)).
    ///
    /// The limit is a tokio timer: await a call with a timeout inside a tokio runtime
    /// with time enabled (under another executor, a plain call works; put that
    /// executor's own timer around it).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Limits the task's execution to `d`, counted from when it starts in a worker
    /// (pebble's `schedule(timeout=)`): its wait in the queue, or behind another task on
    /// a busy worker, does not count. A task that runs longer is stopped as
    /// [`Builder::task_timeout`](super::Builder::task_timeout) stops one (SIGTERM to its
    /// worker's process group, a grace, SIGKILL; the worker is replaced) and the future
    /// resolves with [`Error::Timeout`] (`after` = `d`). In place of the pool's
    /// `task_timeout` for this task; with [`timeout`](Self::timeout) as well, whichever
    /// expires first ends it.
    ///
    /// Its start is the pool's estimate: when the task was sent to an idle worker, or
    /// when the task before it on that worker finished. The limit follows the real
    /// clock (on procpool's thread), not a test's paused time.
    ///
    /// A remote pool has no such limit: the future resolves with
    /// [`Error::InvalidConfig`] and nothing runs.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// fn nap(ms: u64) -> u64 {
    ///     std::thread::sleep(Duration::from_millis(ms));
    ///     ms
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(1).await?;
    /// let first = pool.apply_async(nap, (300,));
    /// // Queued behind `first` for 300 ms, then runs 10: only the 10 count.
    /// let second = pool.apply(nap, (10,)).run_timeout(Duration::from_millis(200));
    /// assert_eq!(second.await?, 10);
    /// assert_eq!(first.await?, 300);
    /// # Ok(()) }
    /// ```
    pub fn run_timeout(mut self, d: Duration) -> Self {
        self.run_timeout = Some(d);
        self
    }

    /// Whether the task's worker is stopped if its caller gives up while it runs (drops
    /// this future, or its [`timeout`](Self::timeout) passes), in place of the pool's
    /// [`Builder::kill_on_cancel`](super::Builder::kill_on_cancel) for this call.
    /// `false`: the task runs to its end (or to its `run_timeout` / `task_timeout`, which
    /// still stop it) and its result is dropped, and the worker stays; `true`: it is
    /// stopped and replaced. A queued task given up never runs either way.
    ///
    /// Local pools only: a remote task given up is always stopped on its node.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # fn embed(text: String) -> usize { text.len() }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(1).await?;
    /// // A worker that loaded a model is worth more than the rest of this task.
    /// let quick = pool
    ///     .apply(embed, ("some text".to_owned(),))
    ///     .timeout(Duration::from_secs(5))
    ///     .kill_on_cancel(false);
    /// assert_eq!(quick.await?, 9);
    /// # Ok(()) }
    /// ```
    pub fn kill_on_cancel(mut self, kill: bool) -> Self {
        self.kill = Some(kill);
        self
    }
}

impl<R: DeserializeOwned> Future for Apply<R> {
    type Output = Result<R>;

    /// Polled again after its result: [`Error::AlreadyCompleted`].
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        let this = &mut *self;
        if this.running.is_none() {
            if this.call.is_none() {
                return Poll::Ready(Err(Error::AlreadyCompleted));
            }
            if let Some(after) = this.timeout {
                this.sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
            }
            // A call that cannot be submitted fails at once, without a place.
            let admitted = match &this.call {
                Some(Ok(_)) => match this.shared.poll_admit(&mut this.admission, cx) {
                    Poll::Ready(admitted) => admitted,
                    Poll::Pending => {
                        if let (Some(sleep), Some(after)) = (this.sleep.as_mut(), this.timeout)
                            && sleep.as_mut().poll(cx).is_ready()
                        {
                            this.call = None;
                            return Poll::Ready(Err(Error::Timeout { after }));
                        }
                        return Poll::Pending;
                    }
                },
                _ => false,
            };
            let Some(call) = this.call.take() else {
                return Poll::Ready(Err(Error::AlreadyCompleted));
            };
            // Closed while it waited: `submit` refuses it (`PoolClosed`).
            let mut handle = TaskHandle::submit(&this.shared, call, admitted, this.run_timeout);
            if let Some(kill) = this.kill {
                handle = handle.kill_on_cancel(kill);
            }
            let mut running = TaskTimeout::new(handle, this.timeout);
            running.sleep = this.sleep.take();
            this.running = Some(running);
        }
        match this.running.as_mut() {
            Some(t) => Pin::new(t).poll(cx),
            None => Poll::Ready(Err(Error::AlreadyCompleted)),
        }
    }
}

impl<R: DeserializeOwned> FusedFuture for Apply<R> {
    fn is_terminated(&self) -> bool {
        match &self.running {
            Some(t) => t.is_terminated(),
            None => self.call.is_none(),
        }
    }
}

/// A task submitted with [`AsyncPool::apply_async`](super::AsyncPool::apply_async) or
/// [`map_async`](super::AsyncPool::map_async); a `Future` of its result.
///
/// - `handle.await` waits for the result.
/// - `tokio::time::timeout(d, &mut handle)` waits at most `d` and does **not** cancel:
///   wait again later (Python's `get(timeout)`).
/// - [`handle.timeout(d)`](Self::timeout) waits at most `d`, then cancels.
/// - [`handle.run_timeout(d)`](Self::run_timeout) limits the task's execution (or each
///   chunk's, for `map_async`) to `d`, counted from its start in a worker.
///
/// Polled again after it gave its result, a handle answers [`Error::AlreadyCompleted`]
/// (it never panics); it is a [`FusedFuture`].
///
/// # Drop
///
/// Dropping the handle before the task finished cancels it (a queued task is removed, a
/// running one has its worker stopped and replaced, unless
/// [`kill_on_cancel`](Self::kill_on_cancel) is off), like dropping an [`Apply`]. A task
/// already sent ahead to a worker is skipped there; one that the skip reaches only as it
/// starts (workers look for skips between tasks, at most every 50 µs while they have
/// tasks queued) runs, and its result is dropped.
/// [`detach`](Self::detach) lets the task run on unobserved.
#[must_use = "dropping a TaskHandle cancels its task; call `detach()` to let it run"]
pub struct TaskHandle<R> {
    inner: Inner<R>,
}

enum Inner<R> {
    Task {
        shared: Arc<Shared>,
        id: u64,
        rx: oneshot::Receiver<TaskResult>,
        finished: bool,
        /// Its own `kill_on_cancel` (`None`: the pool's).
        kill: Option<bool>,
        _r: PhantomData<fn() -> R>,
    },
    Spawned {
        join: tokio::task::JoinHandle<Result<R>>,
        finished: bool,
        /// To the spawned map: the chunks' execution limit (see `spawned_map`).
        run_limit: mpsc::UnboundedSender<Duration>,
        /// The spawned map's `kill_on_cancel`, read when it is dropped.
        kill: KillChoice,
    },
    /// Submission failed; the error is handed out once.
    Failed(Option<Error>),
    Detached,
}

impl<R> std::fmt::Debug for TaskHandle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl<R> TaskHandle<R> {
    pub(super) fn submit(
        shared: &Arc<Shared>,
        call: Result<(TargetRef, Args, Pins)>,
        admitted: bool,
        run_timeout: Option<Duration>,
    ) -> Self {
        let submitted = call.and_then(|(target, args, pins)| {
            let (tx, rx) = oneshot::channel();
            let reply = Reply::One { tx, pins };
            shared
                .submit(target, args, |_| reply, admitted, run_timeout)
                .map(|id| (id, rx))
        });
        let inner = match submitted {
            Ok((id, rx)) => Inner::Task {
                shared: Arc::clone(shared),
                id,
                rx,
                finished: false,
                kill: None,
                _r: PhantomData,
            },
            Err(e) => Inner::Failed(Some(e)),
        };
        TaskHandle { inner }
    }

    /// True once the result is ready (awaiting will not wait).
    pub fn is_finished(&self) -> bool {
        match &self.inner {
            Inner::Task { rx, finished, .. } => *finished || !rx.is_empty() || rx.is_terminated(),
            Inner::Spawned { join, finished, .. } => *finished || join.is_finished(),
            Inner::Failed(_) | Inner::Detached => true,
        }
    }

    /// Lets the task run to its end without anyone waiting for it.
    ///
    /// ```
    /// fn write(path: String) -> bool {
    ///     std::fs::write(path, "done").is_ok()
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// # let path = std::env::temp_dir().join(format!("procpool-detach-{}", std::process::id()));
    /// # let path = path.to_string_lossy().into_owned();
    /// let pool = procpool::AsyncPool::new(1).await?;
    /// pool.apply_async(write, (path.clone(),)).detach(); // dropped, yet it runs
    /// pool.close().await; // waits for it
    /// assert_eq!(std::fs::read_to_string(&path)?, "done");
    /// # std::fs::remove_file(&path)?;
    /// # Ok(()) }
    /// ```
    pub fn detach(mut self) {
        self.inner = Inner::Detached;
    }

    /// Waits at most `d`; then resolves with [`Error::Timeout`] and cancels the task.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// fn nap(ms: u64) -> u64 {
    ///     std::thread::sleep(Duration::from_millis(ms));
    ///     ms
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(1).await?;
    /// let slow = pool.apply_async(nap, (60_000,)).timeout(Duration::from_millis(100));
    /// assert!(slow.await.unwrap_err().is_timeout()); // and its worker is replaced
    /// assert_eq!(pool.apply(nap, (1,)).await?, 1);
    /// # Ok(()) }
    /// ```
    pub fn timeout(self, d: Duration) -> TaskTimeout<R> {
        TaskTimeout::new(self, Some(d))
    }

    /// Limits the task's execution to `d` from when it starts in a worker, as
    /// [`Apply::run_timeout`] does; for a [`map_async`](super::AsyncPool::map_async)
    /// handle, each chunk's execution (as [`Map::run_timeout`]). The task is submitted
    /// already: the limit reaches the pool a moment later, and a task that has run `d`
    /// by then is stopped at once (its start still counts from when it started).
    /// Set again, the last limit counts. It replaces the pool's `task_timeout` for this
    /// task. Chain [`timeout`](Self::timeout) after it to bound the wait as well.
    ///
    /// A remote pool has no such limit: the handle resolves with
    /// [`Error::InvalidConfig`] and the task is cancelled.
    pub fn run_timeout(mut self, d: Duration) -> Self {
        match &self.inner {
            Inner::Task { shared, id, .. } => {
                if let Err(e) = shared.set_run_timeout(*id, d) {
                    // Cancelled by the old handle's drop; this one answers why.
                    let old = std::mem::replace(&mut self.inner, Inner::Failed(Some(e)));
                    drop(TaskHandle { inner: old });
                }
            }
            Inner::Spawned { run_limit, .. } => {
                // An error means the map is over: its result is there to take.
                run_limit.send(d).ok();
            }
            Inner::Failed(_) | Inner::Detached => {}
        }
        self
    }

    /// Whether the task's worker is stopped if the handle is dropped (or its
    /// [`timeout`](Self::timeout) passes) while the task runs, in place of the pool's
    /// [`Builder::kill_on_cancel`](super::Builder::kill_on_cancel), as
    /// [`Apply::kill_on_cancel`]; for a [`map_async`](super::AsyncPool::map_async) handle,
    /// for each of its running chunks. Set again, the last choice counts.
    pub fn kill_on_cancel(mut self, kill: bool) -> Self {
        match &mut self.inner {
            Inner::Task { kill: k, .. } => *k = Some(kill),
            Inner::Spawned { kill: k, .. } => k.set(kill),
            Inner::Failed(_) | Inner::Detached => {}
        }
        self
    }
}

/// A call's own `kill_on_cancel`, shared between a map and the handle of the task that
/// drives it (`map_async`): the map reads it when it is dropped.
#[derive(Debug, Clone, Default)]
pub(super) struct KillChoice(Arc<std::sync::atomic::AtomicU8>);

impl KillChoice {
    const UNSET: u8 = 0;
    const KILL: u8 = 1;
    const KEEP: u8 = 2;

    pub(super) fn set(&self, kill: bool) {
        let v = if kill { Self::KILL } else { Self::KEEP };
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// `None`: the pool's setting.
    pub(super) fn get(&self) -> Option<bool> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            Self::UNSET => None,
            v => Some(v == Self::KILL),
        }
    }
}

impl<R: DeserializeOwned + Send + 'static> TaskHandle<Vec<R>> {
    /// A map driven by a task spawned on the caller's runtime (`map_async`,
    /// `starmap_async`); [`run_timeout`](Self::run_timeout) reaches its chunks through
    /// that task.
    pub(super) fn spawned_map(map: Map<R>) -> Self {
        let (run_limit, mut limits) = mpsc::unbounded_channel::<Duration>();
        let kill = map.kill_choice().clone();
        let drive = async move {
            let mut map = map;
            loop {
                tokio::select! {
                    res = &mut map => return res,
                    // Disabled once the handle is gone (it aborts this task anyway).
                    Some(d) = limits.recv() => map.set_run_timeout(d)?,
                }
            }
        };
        // Its chunks are submitted from this task: in the caller's span, so their
        // events are emitted inside it.
        let join = tokio::spawn(tracing::Instrument::instrument(
            drive,
            tracing::Span::current(),
        ));
        TaskHandle {
            inner: Inner::Spawned {
                join,
                finished: false,
                run_limit,
                kill,
            },
        }
    }
}

impl<R: DeserializeOwned> Future for TaskHandle<R> {
    type Output = Result<R>;

    /// Polled again after its result: [`Error::AlreadyCompleted`].
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        match &mut self.inner {
            Inner::Task { finished: true, .. } | Inner::Spawned { finished: true, .. } => {
                Poll::Ready(Err(Error::AlreadyCompleted))
            }
            Inner::Task { rx, finished, .. } => {
                let res = ready!(Pin::new(rx).poll(cx));
                *finished = true;
                Poll::Ready(match res {
                    Ok(Ok(done)) => done.outcome.to_result(&done.worker),
                    Ok(Err(e)) => Err(e),
                    // The dispatcher dropped the task without answering: it was terminated.
                    Err(_) => Err(Error::PoolClosed),
                })
            }
            Inner::Spawned { join, finished, .. } => {
                let res = ready!(Pin::new(join).poll(cx));
                *finished = true;
                Poll::Ready(match res {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => Err(Error::Cancelled),
                })
            }
            Inner::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(Error::AlreadyCompleted))),
            Inner::Detached => Poll::Ready(Err(Error::AlreadyCompleted)),
        }
    }
}

impl<R: DeserializeOwned> FusedFuture for TaskHandle<R> {
    /// True once the handle gave its result (polling it again gives
    /// [`Error::AlreadyCompleted`]).
    fn is_terminated(&self) -> bool {
        match &self.inner {
            Inner::Task { finished, .. } | Inner::Spawned { finished, .. } => *finished,
            Inner::Failed(e) => e.is_none(),
            Inner::Detached => true,
        }
    }
}

impl<R> Drop for TaskHandle<R> {
    fn drop(&mut self) {
        match &mut self.inner {
            Inner::Task {
                shared,
                id,
                finished: false,
                kill,
                ..
            } => shared.cancel(*id, *kill),
            Inner::Spawned {
                join,
                finished: false,
                ..
            } => join.abort(),
            _ => {}
        }
    }
}

/// A [`TaskHandle`] with a deadline, from [`TaskHandle::timeout`] (and what
/// [`Apply::timeout`] uses).
///
/// # Drop
///
/// Dropping it cancels the task, as dropping the handle does.
#[must_use = "futures do nothing unless polled"]
pub struct TaskTimeout<R> {
    handle: TaskHandle<R>,
    after: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl<R> std::fmt::Debug for TaskTimeout<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskTimeout")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl<R> TaskTimeout<R> {
    fn new(handle: TaskHandle<R>, after: Option<Duration>) -> Self {
        TaskTimeout {
            handle,
            after,
            sleep: None,
            done: false,
        }
    }
}

impl<R: DeserializeOwned> Future for TaskTimeout<R> {
    type Output = Result<R>;

    /// Polled again after its result: [`Error::AlreadyCompleted`].
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(Err(Error::AlreadyCompleted));
        }
        if let Poll::Ready(r) = Pin::new(&mut this.handle).poll(cx) {
            this.done = true;
            return Poll::Ready(r);
        }
        let Some(after) = this.after else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        ready!(sleep.as_mut().poll(cx));
        // Cancel now, not when this future is dropped.
        this.handle = TaskHandle {
            inner: Inner::Failed(None),
        };
        this.done = true;
        Poll::Ready(Err(Error::Timeout { after }))
    }
}

impl<R: DeserializeOwned> FusedFuture for TaskTimeout<R> {
    fn is_terminated(&self) -> bool {
        self.done
    }
}
