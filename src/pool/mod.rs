//! [`AsyncPool`]: a pool of worker processes driven by futures.
//!
//! The layout follows tower's `buffer`: [`AsyncPool`] is the cheap handle, `dispatcher`
//! the background task, `message` what travels to it, `future` and `map` the named
//! futures and streams callers await, `worker` one worker's I/O.

mod dispatcher;
mod encoder;
mod future;
mod map;
mod message;
mod seam;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

pub use future::{Apply, TaskHandle, TaskTimeout};
pub(crate) use map::fuzz_chunk_answer;
pub use map::{Imap, Map};

use crate::error::{Error, Result};
use crate::target::{Target, TargetRef};
use dispatcher::Config;
use message::{Args, Command, Job, Reply};
use worker::Init;

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
/// `task_timeout`, `start_timeout`, the kill grace and the pool's own scheduling follow
/// the real clock, on procpool's thread. `map_async` alone needs a tokio runtime: its
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

pub(crate) struct Shared {
    tx: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
    closed: AtomicBool,
    stats: Arc<Mutex<PoolStats>>,
    processes: usize,
    /// Places in the queue ([`Builder::max_queued`]): a lazy call takes one before it
    /// submits, and the dispatcher gives it back when the task leaves the queue.
    admission: Arc<tokio::sync::Semaphore>,
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

/// Configures an [`AsyncPool`]; made by [`AsyncPool::builder`].
#[derive(Debug)]
#[must_use = "a Builder does nothing until `build().await`"]
pub struct Builder {
    processes: Option<usize>,
    init: Option<Result<Init>>,
    max_tasks_per_child: Option<u32>,
    max_memory_per_child: Option<u64>,
    task_timeout: Option<Duration>,
    start_timeout: Duration,
    kill_grace: Duration,
    pipeline: usize,
    max_queued: usize,
}

/// How long a worker may take to start (and run its initializer) by default.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// How many tasks may wait in a pool's queue by default (see [`Builder::max_queued`]).
pub const DEFAULT_MAX_QUEUED: usize = 10_000;

impl Builder {
    /// Number of worker processes. Default: [`std::thread::available_parallelism`].
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// Runs `f(args...)` once in each worker before its first task (Python's
    /// `initializer`/`initargs`). Default: none.
    ///
    /// If it panics or fails in the first workers, [`build`](Self::build) returns that
    /// error. If it fails in replacement workers, the pool retries with back-off and, after
    /// 5 failures in a row with no worker left, fails the queued and new tasks with
    /// [`Error::Spawn`] instead of respawning forever.
    ///
    /// `task_timeout` does not apply to the initializer; [`start_timeout`](Self::start_timeout)
    /// does: a worker whose initializer has not returned by then is killed.
    pub fn initializer<F, A, M>(mut self, f: F, args: A) -> Self
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        self.init = Some(crate::target::resolve::<F, M, A>().and_then(|target| {
            let args = crate::wire::encode_value(&args).map_err(Error::encode::<A>)?;
            crate::wire::check_args_len::<A>(args.len())?;
            Ok(Init {
                target,
                args: Bytes::from(args),
            })
        }));
        self
    }

    /// Replaces each worker after it has run `n` tasks (Python's `maxtasksperchild`), to
    /// bound leaks in native code. The replacement is started as soon as the limit is
    /// reached, so the pool never stalls, but it takes no task while `processes` others
    /// run tasks. A chunk of a `map` counts as one task. 0 is
    /// [`Error::InvalidConfig`] at [`build`](Self::build). Default: no limit.
    pub fn max_tasks_per_child(mut self, n: u32) -> Self {
        self.max_tasks_per_child = Some(n);
        self
    }

    /// Replaces a worker whose resident set (RSS, from `/proc/PID/statm`) is over
    /// `bytes` after a task: the task's result is delivered, the worker finishes what
    /// was already sent to it and exits, and a replacement starts (counted in
    /// [`PoolStats::restarts`]). Bounds leaks that `max_tasks_per_child` bounds only
    /// blindly. Checked after each task (a chunk of a `map` is one task), never during
    /// one. 0 is [`Error::InvalidConfig`]. Default: no limit.
    pub fn max_memory_per_child(mut self, bytes: u64) -> Self {
        self.max_memory_per_child = Some(bytes);
        self
    }

    /// How long a worker may take to start: spawn, handshake and its
    /// [`initializer`](Self::initializer). A worker not ready by then is killed (its
    /// whole process group). In [`build`](Self::build) that is [`Error::Timeout`]; for a
    /// replacement worker, the pool retries with back-off (counted in
    /// [`PoolStats::start_failures`]). Zero is [`Error::InvalidConfig`]. Default: 60 s.
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }

    /// Limits the execution time of every task (time spent queued does not count). A task
    /// over the limit fails with [`Error::Timeout`] and its worker is stopped (SIGTERM to
    /// its process group, [`kill_grace`](Self::kill_grace), SIGKILL) and replaced.
    /// Default: no limit.
    pub fn task_timeout(mut self, d: Duration) -> Self {
        self.task_timeout = Some(d);
        self
    }

    /// How long a worker being stopped gets between SIGTERM and SIGKILL. Default: 100 ms.
    pub fn kill_grace(mut self, d: Duration) -> Self {
        self.kill_grace = d;
        self
    }

    /// How many tasks may be sent ahead to one worker (it runs them in order). More hides
    /// the round trip for small tasks and lets the pool wake workers less often; 1 makes
    /// every task wait for a free worker. Default: 64.
    ///
    /// This is the most: once tasks have finished, the pool sends about 2 ms of work
    /// ahead to each worker, as measured on the tasks so far, so long tasks go one at a
    /// time and a task does not wait behind a long one while another worker is free.
    /// A pool's first tasks, before any has finished, are sent at most 8 ahead. Nor
    /// does a worker with a task in flight get more than 8 MiB of arguments ahead. A
    /// task sent ahead to a worker that is still busy is taken back and given to an
    /// idle worker when one is free. 0 is [`Error::InvalidConfig`].
    pub fn pipeline_depth(mut self, n: usize) -> Self {
        self.pipeline = n;
        self
    }

    /// At most `n` tasks wait in the pool's queue (submitted, not yet at a worker).
    /// Default: [`DEFAULT_MAX_QUEUED`] (10,000).
    ///
    /// When the queue is full, the lazy calls wait for room before they submit: an
    /// `apply(...).await` waits (its `.timeout(d)` counts that wait), a `map` or
    /// `starmap` submits its chunks as room frees up (an `imap` keeps only a few chunks
    /// per worker in flight on its own, and is not counted). That is how a service
    /// that submits faster than its workers finish is pushed back instead of queueing
    /// without limit. The eager calls, [`apply_async`](AsyncPool::apply_async) and
    /// [`map_async`](AsyncPool::map_async), never wait: `apply_async` submits at once
    /// even into a full queue (over the bound, as Python's `apply_async` does);
    /// `map_async` runs a `map`, which waits for room as above. A chunk resubmitted after
    /// one of its items failed does not wait either. 0 is [`Error::InvalidConfig`].
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }

    /// Starts the workers and waits until every one has handshaken and run the
    /// initializer.
    ///
    /// A worker that dies after it was ready, while others still start, is replaced
    /// (after 5 such deaths the build fails with [`Error::Spawn`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for 0 processes (or another setting of 0 where it says
    /// so); the initializer's error if it fails (for example [`Error::Panicked`]);
    /// [`Error::Timeout`] if a worker is not ready within
    /// [`start_timeout`](Self::start_timeout); [`Error::Spawn`] if a worker cannot start.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: workers started so far are killed and reaped if the future is
    /// dropped.
    pub async fn build(self) -> Result<AsyncPool> {
        let invalid = |reason: &str| {
            Err(Error::InvalidConfig {
                reason: reason.to_owned(),
            })
        };
        let processes = match self.processes {
            Some(0) => return invalid("a pool needs at least 1 process"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if self.max_tasks_per_child == Some(0) {
            return invalid("max_tasks_per_child must be at least 1");
        }
        if self.max_memory_per_child == Some(0) {
            return invalid("max_memory_per_child must be more than 0 bytes");
        }
        if self.pipeline == 0 {
            return invalid("pipeline_depth must be at least 1");
        }
        if self.start_timeout.is_zero() {
            return invalid("start_timeout must be more than zero");
        }
        if self.max_queued == 0 {
            return invalid("max_queued must be at least 1");
        }
        let max_queued = self.max_queued.min(tokio::sync::Semaphore::MAX_PERMITS);
        let admission = Arc::new(tokio::sync::Semaphore::new(max_queued));
        let backend = worker::Processes {
            init: self.init.transpose()?,
            start_timeout: self.start_timeout,
            kill_grace: self.kill_grace,
        };
        let cfg = Config {
            processes,
            max_tasks_per_child: self.max_tasks_per_child,
            max_memory_per_child: self.max_memory_per_child,
            task_timeout: self.task_timeout,
            pipeline: self.pipeline,
        };
        let dispatcher::Launched {
            dispatcher,
            commands: tx,
            stats,
        } = dispatcher::launch(cfg, backend, Arc::clone(&admission)).await?;
        crate::runtime::service::run_pool(dispatcher.run())?;
        Ok(AsyncPool {
            shared: Arc::new(Shared {
                tx,
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                stats,
                processes,
                admission,
            }),
        })
    }
}

/// SIGKILL to a worker's process group (a failure means it is gone already, or cannot
/// be signalled at all: said in a log event, as there is nothing else to do).
fn kill_now(child: &crate::runtime::service::ChildHandle) {
    if let Err(e) = child.signal_group(rustix::process::Signal::KILL) {
        tracing::warn!(target: "procpool::lifecycle", worker = %child.name,
            "cannot kill worker: {e}");
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
    pub async fn new(processes: usize) -> Result<AsyncPool> {
        AsyncPool::builder().processes(processes).build().await
    }

    /// A [`Builder`] to configure a pool.
    pub fn builder() -> Builder {
        Builder {
            processes: None,
            init: None,
            max_tasks_per_child: None,
            max_memory_per_child: None,
            task_timeout: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            kill_grace: Duration::from_millis(100),
            pipeline: 64,
            max_queued: DEFAULT_MAX_QUEUED,
        }
    }

    /// The number of worker processes the pool keeps.
    pub fn processes(&self) -> usize {
        self.shared.processes
    }

    /// Runs `f(args...)` in a worker and resolves with its return value.
    ///
    /// Returns a named future, submitted when first polled. Set options before that:
    /// `.timeout(d)`.
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
    pub fn apply_async<F, A, M>(&self, f: F, args: A) -> TaskHandle<F::Output>
    where
        F: Target<A, M>,
        A: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        // Eager: into the queue at once, full or not (see `Builder::max_queued`).
        TaskHandle::submit(&self.shared, encode_call::<F, M, A>(args), false)
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

    /// Like [`map`](Self::map), but each item is a tuple of arguments:
    /// `pool.starmap(add, vec![(1, 2), (3, 4)])`.
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
    ///
    /// Needs a tokio runtime (the map is driven by a spawned task).
    pub fn map_async<F, T, M, I>(&self, f: F, items: I) -> TaskHandle<Vec<F::Output>>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        TaskHandle::spawned(tokio::spawn(self.map(f, items)))
    }

    /// A stream of `f(item)` in input order, pulling `items` lazily with a bounded number
    /// in flight: an endless iterator works in constant memory. An error in one item is
    /// that item's `Err`; the stream goes on. If a worker dies (or a task times out) while
    /// running a chunk of several items, every item of that chunk not yet answered gets
    /// that error; `.chunksize(1)` pins it to the one item.
    pub fn imap<F, T, M, I>(&self, f: F, items: I) -> Imap<F::Output, I::IntoIter>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        self.imap_with(f, items, true)
    }

    /// Like [`imap`](Self::imap), in completion order.
    pub fn imap_unordered<F, T, M, I>(&self, f: F, items: I) -> Imap<F::Output, I::IntoIter>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        self.imap_with(f, items, false)
    }

    fn imap_with<F, T, M, I>(&self, f: F, items: I, ordered: bool) -> Imap<F::Output, I::IntoIter>
    where
        F: Target<(T,), M>,
        T: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
        I: IntoIterator<Item = T>,
    {
        let _: F = f; // It holds nothing: the child makes its own (see `Target`).
        Imap::new(
            Arc::clone(&self.shared),
            crate::target::resolve_map::<F, M, T>(),
            items.into_iter(),
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

    /// A snapshot of the pool's counters.
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
    /// it took a place in the queue (see [`try_admit`](Self::try_admit)).
    fn submit(
        &self,
        target: TargetRef,
        args: impl Into<Args>,
        make_reply: impl FnOnce(u64) -> Reply,
        admitted: bool,
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id,
            target,
            args,
            reply: make_reply(id),
            admitted,
        };
        if self.tx.send(Command::Submit(job)).is_err() {
            give_back(&self.admission);
            return Err(Error::PoolClosed);
        }
        Ok(id)
    }

    /// Tells the dispatcher the caller of task `id` gave up.
    fn cancel(&self, id: u64) {
        // An error means the dispatcher is gone, and the task with it.
        drop(self.tx.send(Command::Cancel { id }));
    }

    fn processes(&self) -> usize {
        self.processes
    }
}
