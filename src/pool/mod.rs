//! [`AsyncPool`]: a pool of worker processes driven by futures.
//!
//! The layout follows tower's `buffer`: [`AsyncPool`] is the cheap handle, `dispatcher`
//! the background task, `message` what travels to it, `future` and `map` the named
//! futures and streams callers await, `worker` one worker's I/O.

mod builder;
mod dispatcher;
mod encoder;
mod future;
mod map;
pub(crate) mod message;
#[cfg(feature = "redis")]
pub(crate) mod remote;
mod seam;
#[cfg(feature = "tower")]
mod service;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

pub use builder::{Builder, DEFAULT_MAX_QUEUED};
pub use future::{Apply, TaskHandle, TaskTimeout};
pub(crate) use map::fuzz_chunk_answer;
pub use map::{Imap, ImapStream, Map};
#[cfg(feature = "tower")]
pub use service::PoolService;

use crate::error::{Error, Result};
use crate::target::{Target, TargetRef};
use message::{Args, Command, Job, Reply};

/// A pool of worker processes, like Python's `multiprocessing.Pool`, driven by futures.
///
/// Workers are this same executable, started as children and named `PoolWorker-N`. Each
/// call sends a target and its arguments to a worker and resolves with the return value.
/// A worker that panics keeps serving; one that crashes, exits or hangs past a timeout
/// is replaced, and only the task it was running fails.
///
/// ```
/// use procpool::AsyncPool;
///
/// fn doubler(x: i64) -> i64 {
///     x * 2
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
/// let pool = AsyncPool::new(2).await?;
/// assert_eq!(pool.map(doubler, vec![5, 10, 20]).await?, vec![10, 20, 40]);
/// assert_eq!(pool.apply(doubler, (21,)).await?, 42);
/// pool.close().await;
/// # Ok(()) }
/// ```
///
/// `AsyncPool` is a cheap handle: clone it into every task of a service. `close` and
/// `terminate` act on the pool behind every clone.
///
/// # Runtimes
///
/// A pool belongs to no runtime: its dispatcher and its workers' I/O run on procpool's
/// own thread (`procpool-pool`). Build it in one runtime and use it from any other,
/// after the first is gone, or from a plain executor (`futures::executor::block_on`);
/// a `static` pool serves every `#[tokio::test]` of a test binary, whatever their
/// flavour:
///
/// ```
/// use procpool::AsyncPool;
/// use tokio::sync::OnceCell;
///
/// async fn pool() -> &'static AsyncPool {
///     static POOL: OnceCell<AsyncPool> = OnceCell::const_new();
///     POOL.get_or_init(|| async { AsyncPool::new(2).await.expect("workers start") })
///         .await
/// }
/// # fn doubler(x: i64) -> i64 { x * 2 }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// assert_eq!(pool().await.apply(doubler, (21,)).await.unwrap(), 42);
/// # }
/// ```
///
/// Which clock each limit follows: a call's `.timeout(d)` is a timer of the runtime
/// that polls the call (so it follows tokio's paused time in a test that pauses it);
/// `task_timeout`, a call's `.run_timeout(d)`, `start_timeout`, the kill grace and the
/// pool's own scheduling follow the real clock, on procpool's thread. `map_async` alone needs a tokio runtime: its
/// map is driven by a task spawned on the caller's.
///
/// # Drop
///
/// The workers live as long as any handle, future or [`TaskHandle`] of the pool. When the
/// last of them is dropped the pool terminates: every worker is killed (its whole process
/// group) and reaped by the background task.
#[derive(Clone)]
pub struct AsyncPool {
    shared: Arc<Shared>,
}

/// Task ids, unique in the process over all pools (the span a task was submitted in is
/// found by its id: `log::TaskSpan`).
static NEXT_TASK: AtomicU64 = AtomicU64::new(1);

pub(crate) struct Shared {
    tx: mpsc::UnboundedSender<Command>,
    closed: AtomicBool,
    stats: Arc<Mutex<PoolStats>>,
    processes: usize,
    /// Places in the queue ([`Builder::max_queued`]): a lazy call takes one before it
    /// submits, and the dispatcher gives it back when the task leaves the queue.
    admission: Arc<tokio::sync::Semaphore>,
    /// Its tasks run on other machines (a remote backend): arguments that refer to
    /// objects of this one (`Queue`, `Lock`, `Event`, pipe ends) cannot go.
    remote: bool,
}

impl std::fmt::Debug for AsyncPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncPool")
            .field("processes", &self.shared.processes)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .field("stats", &self.stats())
            .finish()
    }
}

/// A snapshot of a pool's state, from [`AsyncPool::stats`].
///
/// Tasks are counted as the dispatcher sees them (a chunk of a `map` is one task), and
/// always add up: `submitted == queued + running + completed + failed + cancelled`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker processes alive and serving (including ones about to retire).
    pub workers: usize,
    /// Workers with nothing to do.
    pub idle: usize,
    /// Tasks waiting for a worker.
    pub queued: usize,
    /// Tasks sent to a worker and not finished.
    pub running: usize,
    /// Tasks ever accepted.
    pub submitted: u64,
    /// Tasks that returned a value.
    pub completed: u64,
    /// Tasks that ended in an error (panic, worker death, timeout, encoding).
    pub failed: u64,
    /// Tasks whose caller gave up (dropped, its own timeout) or that `terminate` ended.
    pub cancelled: u64,
    /// Workers replaced because they died, hung, were stopped or outgrew
    /// [`Builder::max_memory_per_child`].
    pub restarts: u64,
    /// Workers that failed to start (their initializer failed, or they were not ready
    /// within [`Builder::start_timeout`] and were killed); the pool retries with back-off.
    pub start_failures: u64,
    /// Tasks sent ahead to a busy worker and taken back, unstarted, for an idle one (a
    /// task never waits behind a busy worker while another is idle).
    pub taken_back: u64,
}

/// SIGKILL to a worker's process group (a failure means it is gone already, or cannot
/// be signalled at all: said in a log event, as there is nothing else to do).
fn kill_now(child: &crate::runtime::service::ChildHandle) {
    if let Err(e) = child.signal_group(rustix::process::Signal::KILL) {
        tracing::warn!(target: "procpool::lifecycle", worker = %child.name,
            "cannot kill worker: {e}");
    }
}

#[cfg(feature = "redis")]
impl AsyncPool {
    /// For a node: runs an encoded task (see `node`), answered on the receiver.
    pub(crate) fn submit_encoded(
        &self,
        target: TargetRef,
        args: bytes::Bytes,
    ) -> Result<(u64, oneshot::Receiver<message::TaskResult>)> {
        self.shared.submit_encoded(target, args)
    }

    /// For a node: the caller of task `id` gave up (its worker is stopped if it runs).
    pub(crate) fn cancel_encoded(&self, id: u64) {
        self.shared.cancel(id, None);
    }
}

impl AsyncPool {
    /// A pool of `processes` workers with default options.
    ///
    /// # Errors
    ///
    /// As for [`Builder::build`]; 0 processes is [`Error::InvalidConfig`].
    ///
    /// # Cancel safety
    ///
    /// As for [`Builder::build`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// assert_eq!(pool.processes(), 2);
    /// assert!(procpool::AsyncPool::new(0).await.is_err()); // InvalidConfig
    /// # Ok(()) }
    /// ```
    pub async fn new(processes: usize) -> Result<AsyncPool> {
        AsyncPool::builder().processes(processes).build().await
    }

    /// A [`Builder`] to configure a pool.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The number of worker processes the pool keeps.
    pub fn processes(&self) -> usize {
        self.shared.processes
    }

    /// Runs `f(args...)` in a worker and resolves with its return value.
    ///
    /// Returns a named future, submitted when first polled. Set options before that:
    /// `.timeout(d)` (the wait), `.run_timeout(d)` (the execution; see
    /// [`Apply::run_timeout`]).
    ///
    /// Arguments are encoded now. Large ones (1 MiB or more of strings and byte strings,
    /// no handles) are encoded again when sent, as a [`map`](Self::map)'s large items
    /// are, so their `Serialize` must give the same bytes both times.
    ///
    /// # Errors
    ///
    /// See the fault table of the crate docs: [`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Timeout`], [`Error::Encode`] (arguments, nothing sent),
    /// [`Error::Decode`], [`Error::PoolClosed`].
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// fn add(a: i32, b: i32) -> i32 {
    ///     a + b
    /// }
    ///
    /// fn spin() -> u8 {
    ///     loop {
    ///         std::hint::spin_loop();
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// assert_eq!(pool.apply(add, (2, 3)).await?, 5);
    /// // A task that never ends is stopped (its worker killed and replaced).
    /// let stuck = pool.apply(spin, ()).timeout(Duration::from_millis(200)).await;
    /// assert!(stuck.unwrap_err().is_timeout());
    /// # Ok(()) }
    /// ```
    pub fn apply<F, A, M>(&self, f: F, args: A) -> Apply<F::Output>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        Apply::new(Arc::clone(&self.shared), encode_call::<F, M, A>(args))
    }

    /// Submits `f(args...)` now, like `tokio::spawn`, and returns a [`TaskHandle`] to
    /// await its result.
    ///
    /// Dropping the handle cancels the task; [`TaskHandle::detach`] lets it run on.
    /// Submission errors ([`Error::Encode`], [`Error::PoolClosed`]) are returned by the
    /// handle.
    ///
    /// ```
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// let handles: Vec<_> = (1..=3).map(|x| pool.apply_async(square, (x,))).collect();
    /// let mut out = Vec::new();
    /// for h in handles {
    ///     out.push(h.await?); // all three run while we wait for the first
    /// }
    /// assert_eq!(out, [1, 4, 9]);
    /// # Ok(()) }
    /// ```
    pub fn apply_async<F, A, M>(&self, f: F, args: A) -> TaskHandle<F::Output>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        // Eager: into the queue at once, full or not (see `Builder::max_queued`).
        TaskHandle::submit(&self.shared, encode_call::<F, M, A>(args), false, None)
    }

    /// Runs `f(item)` for every item, in parallel across the workers, and resolves with
    /// the results in input order.
    ///
    /// Items are sent in chunks; the default chunk size is Python's,
    /// `ceil(len / (4 * processes))`; set it with `.chunksize(n)`. Empty input resolves
    /// to `[]` at once. On the first error the chunks not yet started are cancelled and
    /// that error is returned.
    ///
    /// Every item is encoded before anything is sent: one that cannot be is
    /// [`Error::Encode`] with no task run. An item whose strings and byte strings take
    /// its encoding to 1 MiB or more (a large `serde_bytes::ByteBuf`, say), and that holds
    /// no queue, lock, event or pipe end, is then kept as it is and encoded again
    /// when it is sent, into a buffer the pool reuses, because writing a large encoding
    /// into fresh memory costs more than encoding it twice. So its `Serialize` runs
    /// twice, and must give the same bytes both times; if it does not (or fails, or
    /// panics), that item's chunk fails with [`Error::Encode`] and nothing of it is sent.
    ///
    /// ```
    /// fn double(x: i64) -> i64 {
    ///     x * 2
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// assert_eq!(pool.map(double, [5, 10, 20]).await?, [10, 20, 40]);
    /// let many = pool.map(double, 0..10_000).chunksize(500).await?;
    /// assert_eq!(many[9_999], 19_998);
    /// # Ok(()) }
    /// ```
    pub fn map<F, T, M, I>(&self, f: F, items: I) -> Map<F::Output>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        Map::new(
            Arc::clone(&self.shared),
            crate::target::resolve_map::<F, M, T>(),
            map::encode_items(items),
        )
    }

    /// Like [`map`](Self::map), but each item is a tuple of arguments.
    ///
    /// ```
    /// fn add(a: i32, b: i32) -> i32 {
    ///     a + b
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// assert_eq!(pool.starmap(add, vec![(1, 2), (3, 4)]).await?, [3, 7]);
    /// # Ok(()) }
    /// ```
    pub fn starmap<F, A, M, I>(&self, f: F, items: I) -> Map<F::Output>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = A>,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        Map::new(
            Arc::clone(&self.shared),
            crate::target::resolve_starmap::<F, M, A>(),
            map::encode_items(items),
        )
    }

    /// [`map`](Self::map), submitted now; the [`TaskHandle`] resolves with all results.
    /// [`TaskHandle::run_timeout`] limits each chunk's execution.
    ///
    /// Needs a tokio runtime (the map is driven by a spawned task).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    ///
    /// ```
    /// fn double(x: i64) -> i64 {
    ///     x * 2
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// let handle = pool.map_async(double, 0..100); // running already
    /// // ... other work ...
    /// assert_eq!(handle.await?.iter().sum::<i64>(), 9_900);
    /// # Ok(()) }
    /// ```
    pub fn map_async<F, T, M, I>(&self, f: F, items: I) -> TaskHandle<Vec<F::Output>>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        TaskHandle::spawned_map(self.map(f, items))
    }

    /// [`starmap`](Self::starmap), submitted now, as [`map_async`](Self::map_async) is
    /// [`map`](Self::map): `pool.starmap_async(add, vec![(1, 2), (3, 4)]).await`. The
    /// [`TaskHandle`] resolves with all results in input order; dropping it cancels
    /// every chunk not finished.
    ///
    /// Needs a tokio runtime (the map is driven by a spawned task).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn starmap_async<F, A, M, I>(&self, f: F, items: I) -> TaskHandle<Vec<F::Output>>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = A>,
    {
        TaskHandle::spawned_map(self.starmap(f, items))
    }

    /// A stream of `f(item)` in input order, pulling `items` lazily with a bounded number
    /// in flight: an endless iterator works in constant memory. An error in one item is
    /// that item's `Err`; the stream goes on. If a worker dies (or a task times out) while
    /// running a chunk of several items, every item of that chunk not yet answered gets
    /// that error; `.chunksize(1)` pins it to the one item.
    ///
    /// ```
    /// use futures::StreamExt;
    ///
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// // An endless input: taken as results are consumed.
    /// let mut squares = pool.imap(square, 1..);
    /// let mut first = Vec::new();
    /// while let Some(r) = squares.next().await {
    ///     first.push(r?);
    ///     if first.len() == 5 {
    ///         break; // dropping the stream cancels what is in flight
    ///     }
    /// }
    /// assert_eq!(first, [1, 4, 9, 16, 25]);
    /// # Ok(()) }
    /// ```
    pub fn imap<F, T, M, I>(&self, f: F, items: I) -> Imap<F::Output, I::IntoIter>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        self.imap_with(f, items.into_iter(), true)
    }

    /// Like [`imap`](Self::imap), in completion order.
    ///
    /// ```
    /// use futures::StreamExt;
    ///
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// let mut all: Vec<u64> = pool
    ///     .imap_unordered(square, 1..=4)
    ///     .map(Result::unwrap)
    ///     .collect()
    ///     .await;
    /// all.sort(); // in whatever order they finished
    /// assert_eq!(all, [1, 4, 9, 16]);
    /// # Ok(()) }
    /// ```
    pub fn imap_unordered<F, T, M, I>(&self, f: F, items: I) -> Imap<F::Output, I::IntoIter>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        self.imap_with(f, items.into_iter(), false)
    }

    /// [`imap`](Self::imap) over a [`Stream`](futures::Stream) of items instead of an
    /// iterator: items that arrive over time (from a channel, a socket, a paginated
    /// API) are sent to the workers as they come, in chunks of what has arrived, with
    /// the same bound on what is in flight (the stream is polled only while there is
    /// room). Results come in input order; the stream ends when the input has ended and
    /// every result is out. An input that panics ends it as `imap`'s does.
    ///
    /// ```
    /// use futures::StreamExt;
    ///
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// let (tx, rx) = futures::channel::mpsc::unbounded();
    /// tokio::spawn(async move {
    ///     for x in 1..=4 {
    ///         tx.unbounded_send(x).ok(); // items arrive one by one
    ///         tokio::task::yield_now().await;
    ///     }
    /// });
    /// let squares: Vec<u64> = pool.imap_stream(square, rx).map(Result::unwrap).collect().await;
    /// assert_eq!(squares, [1, 4, 9, 16]);
    /// # Ok(()) }
    /// ```
    pub fn imap_stream<F, T, M, S>(&self, f: F, items: S) -> Imap<F::Output, ImapStream<S>>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        S: futures::Stream<Item = T>,
    {
        self.imap_with(f, ImapStream::new(items), true)
    }

    /// Like [`imap_stream`](Self::imap_stream), in completion order.
    pub fn imap_unordered_stream<F, T, M, S>(
        &self,
        f: F,
        items: S,
    ) -> Imap<F::Output, ImapStream<S>>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        S: futures::Stream<Item = T>,
    {
        self.imap_with(f, ImapStream::new(items), false)
    }

    fn imap_with<F, T, M, I>(&self, f: F, items: I, ordered: bool) -> Imap<F::Output, I>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        Imap::new(
            Arc::clone(&self.shared),
            crate::target::resolve_map::<F, M, T>(),
            items,
            ordered,
        )
    }

    /// Stops taking work, lets queued and running tasks finish, then stops the workers and
    /// waits until they are reaped (Python's `close()` then `join()`). Later calls on any
    /// clone fail with [`Error::PoolClosed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the pool closes anyway; only the wait is abandoned.
    ///
    /// ```
    /// fn double(x: i64) -> i64 {
    ///     x * 2
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// let running = pool.apply_async(double, (21,));
    /// pool.close().await; // the task in flight finishes first
    /// assert_eq!(running.await?, 42);
    /// assert!(matches!(
    ///     pool.apply(double, (1,)).await,
    ///     Err(procpool::Error::PoolClosed)
    /// ));
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) {
        self.shared.close();
        let (done, wait) = oneshot::channel();
        if self.shared.tx.send(Command::Close { done }).is_ok() {
            // An error means the dispatcher already ended: closed either way.
            drop(wait.await);
        }
    }

    /// Kills every worker now; every outstanding future and handle resolves with
    /// [`Error::PoolClosed`]. Waits until the workers are reaped. Later calls fail with
    /// [`Error::PoolClosed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the pool terminates anyway; only the wait is abandoned.
    pub async fn terminate(&self) {
        self.shared.close();
        let (done, wait) = oneshot::channel();
        if self.shared.tx.send(Command::Terminate { done }).is_ok() {
            drop(wait.await);
        }
    }

    /// A snapshot of the pool's counters (the `metrics` example exports them).
    ///
    /// ```
    /// fn double(x: i64) -> i64 {
    ///     x * 2
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
    /// let pool = procpool::AsyncPool::new(2).await?;
    /// pool.apply(double, (1,)).await?;
    /// let stats = pool.stats(); // counters settle just after callers are answered
    /// assert_eq!(stats.submitted, 1);
    /// assert!(stats.completed <= 1);
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> PoolStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Encodes a call: the target's entry point and the argument tuple (large arguments are
/// encoded again when sent, as a map's large items are).
fn encode_call<F, M, A>(args: A) -> Result<(TargetRef, Args, crate::sync::Pins)>
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
    M: 'static,
{
    let target = crate::target::resolve::<F, M, A>()?;
    let (args, pins) = map::encode_call_args(args);
    let args = args.map_err(Error::encode::<A>)?;
    Ok((target, args, pins))
}

/// A lazy call's wait for a place in the queue (made only if it has to wait).
#[derive(Default)]
pub(crate) struct Admission(Option<tokio_util::sync::PollSemaphore>);

impl Shared {
    /// Takes no more work; calls waiting for room in the queue fail with `PoolClosed`.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.admission.close();
    }

    /// A place in the queue if there is one now (see [`Builder::max_queued`]).
    pub(crate) fn try_admit(&self) -> bool {
        match self.admission.try_acquire() {
            Ok(permit) => {
                // Given back by the dispatcher when the task leaves the queue.
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back a place taken by [`try_admit`](Self::try_admit) or
    /// [`poll_admit`](Self::poll_admit) for a task that was not submitted.
    #[cfg(feature = "tower")]
    pub(crate) fn give_back_place(&self) {
        self.admission.add_permits(1);
    }

    /// Waits for a place in the queue; false once the pool is closed.
    pub(crate) fn poll_admit(
        &self,
        wait: &mut Admission,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<bool> {
        if self.try_admit() {
            return std::task::Poll::Ready(true);
        }
        let sem = wait.0.get_or_insert_with(|| {
            tokio_util::sync::PollSemaphore::new(Arc::clone(&self.admission))
        });
        match sem.poll_acquire(cx) {
            std::task::Poll::Ready(Some(permit)) => {
                permit.forget();
                std::task::Poll::Ready(true)
            }
            std::task::Poll::Ready(None) => std::task::Poll::Ready(false),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// Sends a task to the dispatcher; its answer goes to the reply `make_reply` builds
    /// from the task's id (the id exists before the dispatcher can answer). `admitted`:
    /// it took a place in the queue (see [`try_admit`](Self::try_admit)); `run_timeout`:
    /// its own execution limit (see [`Apply::run_timeout`]).
    fn submit(
        &self,
        target: TargetRef,
        args: impl Into<Args>,
        make_reply: impl FnOnce(u64) -> Reply,
        admitted: bool,
        run_timeout: Option<std::time::Duration>,
    ) -> Result<u64> {
        let give_back = |admission: &tokio::sync::Semaphore| {
            if admitted {
                admission.add_permits(1);
            }
        };
        let args = args.into();
        if self.closed.load(Ordering::SeqCst) {
            give_back(&self.admission);
            return Err(Error::PoolClosed);
        }
        if run_timeout.is_some()
            && let Err(e) = self.run_timeout_supported()
        {
            give_back(&self.admission);
            return Err(e);
        }
        if args.len() > crate::wire::MAX_ARGS {
            give_back(&self.admission);
            return Err(Error::Encode {
                type_name: "task arguments".to_owned(),
                reason: format!(
                    "{} bytes encoded; one message holds at most {} bytes",
                    args.len(),
                    crate::wire::MAX_ARGS
                ),
            });
        }
        let id = NEXT_TASK.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id,
            target,
            args,
            reply: make_reply(id),
            admitted,
            run_timeout,
            span: crate::log::TaskSpan::current(id),
        };
        if self.tx.send(Command::Submit(job)).is_err() {
            give_back(&self.admission);
            return Err(Error::PoolClosed);
        }
        Ok(id)
    }

    /// Submits an encoded task as a node received it; its answer comes on the receiver.
    #[cfg(feature = "redis")]
    fn submit_encoded(
        &self,
        target: TargetRef,
        args: bytes::Bytes,
    ) -> Result<(u64, oneshot::Receiver<message::TaskResult>)> {
        let (tx, rx) = oneshot::channel();
        let reply = Reply::One {
            tx,
            pins: crate::sync::Pins::default(),
        };
        // Its events are kept from before it can start, for the node to send back.
        let make_reply = |id| {
            crate::log::capture::open(id);
            reply
        };
        let id = self.submit(target, args, make_reply, false, None)?;
        Ok((id, rx))
    }

    /// Limits task `id`'s execution to `after` from its start (see
    /// [`TaskHandle::run_timeout`]).
    fn set_run_timeout(&self, id: u64, after: std::time::Duration) -> Result<()> {
        self.run_timeout_supported()?;
        // An error means the dispatcher is gone: the task's handle says so.
        drop(self.tx.send(Command::RunTimeout { id, after }));
        Ok(())
    }

    /// A remote pool's tasks have no execution limit of their own (yet): their
    /// deadline travels with them, counted from their submission (`task_timeout`).
    fn run_timeout_supported(&self) -> Result<()> {
        if self.remote {
            return Err(Error::InvalidConfig {
                reason: "run_timeout is not supported by a remote pool; use `.timeout(d)` \
                         or `Builder::task_timeout`"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// Tells the dispatcher the caller of task `id` gave up; `kill`: whether a running
    /// one has its worker stopped (`None`: the pool's [`Builder::kill_on_cancel`]).
    fn cancel(&self, id: u64, kill: Option<bool>) {
        // An error means the dispatcher is gone, and the task with it.
        drop(self.tx.send(Command::Cancel { id, kill }));
    }

    fn processes(&self) -> usize {
        self.processes
    }

    /// [`Error::UnsupportedArgument`] if arguments that took handles (`pins`) would go
    /// to a remote pool.
    fn local_only(&self, pins: &crate::sync::Pins) -> Result<()> {
        if self.remote && !pins.is_empty() {
            return Err(Error::UnsupportedArgument {
                type_name: "a Queue, Lock, Event or pipe end".to_owned(),
            });
        }
        Ok(())
    }
}
