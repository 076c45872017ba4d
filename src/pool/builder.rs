//! [`Builder`]: a pool's settings, each with its default, and `build`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::dispatcher::{self, Config};
use super::worker::{self, Init};
use super::{AsyncPool, Shared};
use crate::error::{Error, Result};
use crate::target::Target;

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
    kill_on_cancel: bool,
    #[cfg(feature = "redis")]
    remote: Option<super::remote::Redis>,
    #[cfg(feature = "redis")]
    wait_for_nodes: Duration,
    #[cfg(feature = "redis")]
    retries: u32,
    runtime: crate::runtime::service::PoolRuntime,
}

/// How long a worker may take to start (and run its initializer) by default.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// How many tasks may wait in a pool's queue by default (see [`Builder::max_queued`]).
pub const DEFAULT_MAX_QUEUED: usize = 10_000;

#[cfg(feature = "redis")]
impl Builder {
    /// Runs the pool's tasks on remote nodes through Redis Streams instead of local
    /// processes (feature `redis`; see [`procpool::remote`](crate::remote)). Every
    /// method of the pool keeps its meaning; settings about local workers
    /// (`processes`, `initializer`, `max_tasks_per_child`, `max_memory_per_child`,
    /// `start_timeout`) are the nodes' own and are ignored here; `task_timeout` travels
    /// with each task and its node enforces it.
    pub fn backend(mut self, redis: super::remote::Redis) -> Self {
        self.remote = Some(redis);
        self
    }

    /// With a remote backend: how many times a task whose node was lost (it stopped
    /// heartbeating, about 3 s) is queued again for another node. Default 0:
    /// at-most-once, the task fails with [`Error::NodeLost`]. With `n > 0` a task may
    /// run up to `n + 1` times (a lost node may have run part of it); the first result
    /// wins, a late one from a node presumed lost is dropped.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// With a remote backend: how long `build` waits for a node of this build to
    /// register before it fails with [`Error::NoCompatibleNodes`]. Default: 10 s.
    pub fn wait_for_nodes(mut self, d: Duration) -> Self {
        self.wait_for_nodes = d;
        self
    }
}

impl Builder {
    /// The defaults, as each setting documents them.
    pub(super) fn new() -> Builder {
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
            kill_on_cancel: true,
            #[cfg(feature = "redis")]
            remote: None,
            #[cfg(feature = "redis")]
            wait_for_nodes: Duration::from_secs(10),
            #[cfg(feature = "redis")]
            retries: 0,
            runtime: crate::runtime::service::PoolRuntime::default(),
        }
    }

    /// For a node: the pool's dispatcher and its workers' tasks run on the runtime of
    /// `handle` (the node's thread) instead of procpool's pools' runtime.
    #[cfg(feature = "redis")]
    pub(crate) fn on_runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = crate::runtime::service::PoolRuntime::on(handle);
        self
    }

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
    /// [`PoolStats::restarts`](super::PoolStats::restarts)). Bounds leaks that `max_tasks_per_child` bounds only
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
    /// [`PoolStats::start_failures`](super::PoolStats::start_failures)). Zero is [`Error::InvalidConfig`]. Default: 60 s.
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

    /// Whether a task whose caller gives up (drops its future or handle, or its
    /// `.timeout(d)` passes) while it runs has its worker stopped and replaced. Default:
    /// `true`, so no CPU goes to unwanted work. With `false`, the task runs to its end
    /// (or to `task_timeout` / `.run_timeout(d)`, which still stop it) and its result is
    /// dropped: for workers that are expensive to start (an initializer that loads a
    /// model). A queued task given up never runs either way. Local pools only: a remote
    /// task given up is always stopped on its node.
    ///
    /// One call can choose otherwise: [`Apply::kill_on_cancel`](super::Apply::kill_on_cancel),
    /// [`TaskHandle::kill_on_cancel`](super::TaskHandle::kill_on_cancel),
    /// [`Map::kill_on_cancel`](super::Map::kill_on_cancel),
    /// [`Imap::kill_on_cancel`](super::Imap::kill_on_cancel).
    pub fn kill_on_cancel(mut self, kill: bool) -> Self {
        self.kill_on_cancel = kill;
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
        #[cfg(feature = "redis")]
        if let Some(redis) = self.remote {
            let opts = super::remote::client::Options {
                wait_for_nodes: self.wait_for_nodes,
                task_timeout: self.task_timeout,
                retries: self.retries,
            };
            let launched =
                super::remote::client::launch(redis, opts, Arc::clone(&admission)).await?;
            return Ok(AsyncPool {
                shared: Arc::new(Shared {
                    tx: launched.commands,
                    closed: AtomicBool::new(false),
                    stats: launched.stats,
                    processes: launched.processes,
                    admission,
                    remote: true,
                }),
            });
        }
        let backend = worker::Processes {
            init: self.init.transpose()?,
            start_timeout: self.start_timeout,
            kill_grace: self.kill_grace,
            runtime: self.runtime.clone(),
        };
        let cfg = Config {
            processes,
            max_tasks_per_child: self.max_tasks_per_child,
            max_memory_per_child: self.max_memory_per_child,
            task_timeout: self.task_timeout,
            pipeline: self.pipeline,
            kill_on_cancel: self.kill_on_cancel,
        };
        let dispatcher::Launched {
            dispatcher,
            commands: tx,
            stats,
        } = dispatcher::launch(cfg, backend, Arc::clone(&admission)).await?;
        self.runtime.spawn(dispatcher.run())?;
        Ok(AsyncPool {
            shared: Arc::new(Shared {
                tx,
                closed: AtomicBool::new(false),
                stats,
                processes,
                admission,
                remote: false,
            }),
        })
    }
}
