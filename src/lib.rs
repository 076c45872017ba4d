//! Python's `multiprocessing` for async Rust.
//!
//! procpool runs functions in real OS child processes and lets you await their results
//! like any other future. A child is isolated from the parent: a panic, a segfault, an
//! `abort`, a leak or a hang in native code costs that child, never the caller, and
//! comes back as a typed [`Error`]. CPU-bound work runs truly in parallel.
//!
//! ```
//! use procpool::{Process, current_process};
//!
//! fn doubler(number: i64) -> i64 {
//!     let result = number * 2;
//!     println!("{number} doubled to {result} by: {}", current_process().name());
//!     result
//! }
//!
//! #[tokio::main]
//! async fn main() -> procpool::Result<()> {
//!     let mut procs = Vec::new();
//!     for n in [5, 10, 15] {
//!         let mut p = Process::new(doubler, (n,));
//!         p.start().await?;
//!         procs.push(p);
//!     }
//!     for p in &mut procs {
//!         let doubled = p.join().await?;
//!         assert_eq!(p.exitcode(), Some(0));
//!         assert!(doubled % 10 == 0);
//!     }
//!     Ok(())
//! }
//! ```
//!
//! A pool of workers, with futures for everything Python's `Pool` does and timeouts that
//! really stop the work:
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use procpool::{AsyncPool, Error};
//!
//! fn doubler(x: i64) -> i64 {
//!     x * 2
//! }
//!
//! fn hangs() -> i64 {
//!     loop {
//!         std::thread::sleep(Duration::from_secs(60));
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
//! let pool = AsyncPool::new(2).await?;
//! assert_eq!(pool.map(doubler, vec![5, 10, 20]).await?, vec![10, 20, 40]);
//! assert_eq!(pool.apply(doubler, (21,)).await?, 42);
//!
//! let handle = pool.apply_async(doubler, (25,)); // submitted now, like tokio::spawn
//! assert_eq!(handle.await?, 50);
//!
//! // A hung task is stopped: its worker is killed and replaced.
//! let r = pool.apply(hangs, ()).timeout(Duration::from_millis(100)).await;
//! assert!(matches!(r, Err(Error::Timeout { .. })));
//!
//! // imap pulls its input lazily; an endless iterator is fine.
//! let first: Vec<i64> = pool.imap(doubler, 0..).take(3).map(Result::unwrap).collect().await;
//! assert_eq!(first, vec![0, 2, 4]);
//! pool.close().await;
//! # Ok(()) }
//! ```
//!
//! # Configuring a pool
//!
//! [`AsyncPool::builder`] sets what Python's `Pool(...)` arguments set, and more; each
//! setting has its default in [`Builder`]'s docs:
//!
//! ```
//! use std::time::Duration;
//! use procpool::AsyncPool;
//!
//! fn load_model(path: String) {
//!     // Runs once in each worker before its first task (Python's `initializer`).
//!     assert!(!path.is_empty());
//! }
//!
//! fn score(x: u64) -> u64 {
//!     x * x
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
//! let pool = AsyncPool::builder()
//!     .processes(2)
//!     .initializer(load_model, ("model.bin".to_owned(),))
//!     .task_timeout(Duration::from_secs(30)) // a task running longer: worker replaced
//!     .max_tasks_per_child(1_000) // bounds a leak in native code
//!     .max_queued(100) // submitters wait (backpressure) beyond 100 queued tasks
//!     .build()
//!     .await?;
//! assert_eq!(pool.map(score, 1..=3).await?, vec![1, 4, 9]);
//! pool.close().await;
//! # Ok(()) }
//! ```
//!
//! # Runtime needs
//!
//! The futures work under any executor: the pool's dispatcher, its workers' sockets and
//! the owners of queues, locks and events run on procpool's own thread (a small
//! current-thread tokio runtime started on first use), so a pool does not depend on the
//! runtime that built it and outlives it. Under tokio, `.timeout(d)` and the other timed
//! calls use the caller's runtime timer (paused time included: `tokio::time::pause`
//! works in tests); outside a runtime they use procpool's. The blocking calls
//! (`blocking_get`, `blocking_lock`, ...) need no runtime and are the ones for plain
//! (non-`async`) targets in a child. An `async` target runs in its child on a
//! current-thread tokio runtime procpool builds there.
//!
//! # Graceful shutdown
//!
//! [`AsyncPool::close`] stops taking work, lets queued and running tasks finish, stops
//! the workers and reaps them; [`AsyncPool::terminate`] kills them now. A service
//! drains its pool on Ctrl-C or SIGTERM:
//!
//! ```no_run
//! # async fn serve(_: &procpool::AsyncPool) {}
//! # #[tokio::main] async fn main() -> procpool::Result<()> {
//! let pool = procpool::AsyncPool::new(4).await?;
//! tokio::select! {
//!     () = serve(&pool) => {}
//!     _ = tokio::signal::ctrl_c() => tracing::info!("draining"),
//! }
//! pool.close().await; // in-flight tasks finish; every worker is reaped
//! # Ok(()) }
//! ```
//!
//! Workers are in process groups of their own, so a terminal's Ctrl-C reaches the parent
//! only, and the parent decides. Under systemd use `KillMode=mixed` (SIGTERM to the main
//! process, which drains; SIGKILL to what is left at `TimeoutStopSec`): with the default
//! `control-group`, every worker gets the SIGTERM at once and running tasks fail with
//! [`Error::WorkerDied`] instead of finishing. Whatever happens to the parent, even
//! SIGKILL, every child exits within a second (`PR_SET_PDEATHSIG` and a watch on the
//! parent). `examples/shutdown.rs` is a whole service doing this.
//!
//! # Cargo features
//!
//! | feature | what it adds |
//! |---|---|
//! | `redis` | [`remote`]: the same pool with its tasks run on other machines through Redis Streams |
//! | `redis-tls` | `rediss://` URLs (rustls, the system's root certificates) |
//! | `tower` | `AsyncPool::service(f)`: a `tower::Service` whose `poll_ready` follows the pool's queue bound |
//!
//! Inputs for `imap` can be iterators ([`AsyncPool::imap`]) or any `futures::Stream`
//! ([`AsyncPool::imap_stream`]), pulled lazily either way.
//!
//! # What happens when a task fails
//!
//! Never a hang, never a panic in the parent, never a lost handle:
//!
//! | fault in a task | the caller gets | the pool |
//! |---|---|---|
//! | panics | [`Error::Panicked`] with message and location | worker keeps serving |
//! | aborts, segfaults, `process::exit`, is killed | [`Error::WorkerDied`] with signal or code | worker replaced, other tasks unaffected |
//! | exceeds `task_timeout`, `.run_timeout(d)` or `.timeout(d)` | [`Error::Timeout`] | SIGTERM to its process group, grace, SIGKILL; replaced |
//! | argument cannot be encoded | [`Error::Encode`] at submit, nothing sent | unaffected |
//! | result cannot be encoded / decoded | [`Error::Encode`] / [`Error::Decode`] | worker keeps serving |
//! | initializer fails | `build()` or the tasks fail with that error | no endless respawn loop |
//! | the parent dies, even by SIGKILL | — | every child exits within a second |
//!
//! Dropping a future or [`TaskHandle`] cancels its task: a queued task is removed, a
//! running one has its worker stopped and replaced.
//!
//! Two limits per call: `.timeout(d)` bounds the caller's wait (from the first poll,
//! the queue included), `.run_timeout(d)` the task's execution (from its start in a
//! worker, as pebble's `schedule(timeout=)`; for a map, each chunk's).
//!
//! # How it works
//!
//! - **No set-up.** A child is this same executable, started again from
//!   `/proc/self/exe`. A hook that runs before `main` recognises the child's command line,
//!   handshakes with the parent over a private socket, runs the target and exits, so
//!   neither `main` nor a test harness ever runs in the child. Nothing to call, no macro,
//!   no wrapper: it works in `fn main`, `#[tokio::main]`, `#[tokio::test]`, integration
//!   tests, examples, doc tests and benches.
//! - **Targets** are fn items or closures that capture nothing, with up to 8 parameters,
//!   plain or `async`; arguments travel as a tuple in MessagePack (see [`Target`]).
//!   A capturing closure does not compile.
//! - **Same build only.** The child checks that it is the very executable of its parent
//!   before it runs anything.
//! - **No orphans, no zombies.** Every child dies with its parent (even one killed with
//!   `SIGKILL`), and every child is reaped, also when its [`Process`] is dropped.
//! - **stdout is yours.** Children inherit stdout and stderr; the protocol has its own
//!   socket. A child's stdin is `/dev/null`, as in Python's `multiprocessing` (the
//!   socket arrives there, which lets the child start with `posix_spawn`: no copy of the
//!   parent's page tables, however large its heap).
//! - **Large arguments skip the socket.** A pool worker gets a shared memory arena (a
//!   memory file both processes map, 32 MiB of address space, touched only as used): an
//!   argument of 1 to 16 MiB, mostly strings and byte strings, holding no queue, lock,
//!   event or pipe end, is encoded straight into it when its task is sent and decoded
//!   from it in the worker, so each byte is copied twice rather than four times, into
//!   memory reused from task to task.
//!
//! # Queues, pipes, locks and events
//!
//! [`Queue`], [`pipe`] ([`Connection`]), [`pipe_oneway`] ([`Receiver`], [`Sender`]),
//! [`Lock`] and [`Event`] are Python's, async, and travel to children as ordinary
//! arguments, to a [`Process`] or to pool tasks:
//!
//! ```
//! use procpool::{Connection, Event, Lock, Process, Queue, pipe};
//!
//! fn worker(q: Queue<u32>, lock: Lock, ready: Event, conn: Connection<String>) {
//!     let _guard = lock.blocking_lock().expect("the parent is there");
//!     q.blocking_put(42).expect("the parent is there");
//!     ready.set().expect("the parent is there");
//!     conn.blocking_send("done".to_owned()).expect("the parent is there");
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
//! let (q, lock, ready) = (Queue::new(), Lock::new(), Event::new());
//! let (here, there) = pipe();
//! let mut p = Process::new(worker, (q.clone(), lock.clone(), ready.clone(), there));
//! p.start().await?;
//! assert_eq!(q.get().await?, 42);
//! ready.wait().await?;
//! assert_eq!(here.recv().await?, "done");
//! p.join().await?;
//! # Ok(()) }
//! ```
//!
//! Every wait has a `*_timeout` form (`Queue::get_timeout`, `Event::wait_timeout`,
//! `Lock::lock_timeout`, ...) and a `blocking_*_timeout` one for plain targets: they work
//! under any executor or none (outside a tokio runtime, the limit is a timer of
//! procpool's own thread; a blocking call parks its thread until its deadline).
//! [`current_process`] and [`parent_process`] say who this process is and who started
//! it.
//!
//! Each queue item is delivered exactly once, and a lock whose holder dies is released
//! (the next holder is told, see [`LockGuard::abandoned`]) where Python would deadlock.
//! A pipe end whose process dies gives the other end [`Error::Closed`]. A [`Dict`] is a
//! Manager's `dict()`, with an atomic [`Dict::update`] that no dying updater can block.
//!
//! The rest of Python's synchronisation and sharing travels the same way:
//! [`Semaphore`] / [`BoundedSemaphore`] (RAII permits; a dead holder's permits come
//! back), [`Condition`] over a [`Lock`], [`Barrier`] (a party that dies breaks it
//! rather than hang the others: [`Error::BrokenBarrier`]), and [`Value`] / [`Array`],
//! plain data in memory shared by every process that has them (reads, writes and
//! `update`s are atomic, no round trip). `Semaphore`, `Value` and `Array` live in shared
//! memory and outlast the process that made them; `Queue`, `Lock`, `Event`, `Condition`
//! and `Barrier` live in their creator's process. None of them can go to a remote node
//! (they are process-local): passing one to a remote task is
//! [`Error::UnsupportedArgument`].
//!
//! From a process other than the owner, the calls that answer at once
//! (`Event::set`/`clear`/`is_set`, `Queue::len`/`close`/`task_done`/`try_get`/`try_put`,
//! `Lock::try_lock`) take one round trip to the owner, answered in microseconds by its
//! procpool thread. They may be called from async code: an owner that does not answer
//! (stopped, or overloaded) is waited for at most 10 s, then the call fails with
//! [`Error::Timeout`] (`is_set` answers `false`, `len` 0, `try_put` gives
//! [`TryPutError::Failed`]), and a warning is logged. A child's end-of-task confirmation
//! that its owners applied what it sent has the same bound.
//!
//! # Logging
//!
//! A child's `tracing` events are forwarded to the parent and emitted there with the
//! child's name and pid, so the parent's subscriber sees them; [`log_to_stderr`] prints
//! them like Python's `log_to_stderr()`. A forwarded event keeps its own target and
//! level (so a filter such as `RUST_LOG=myapp=debug` treats a child's `myapp` events as
//! it treats the parent's), and has these fields:
//!
//! | field | value |
//! |---|---|
//! | `process` | the child's name (`Process-1`, `PoolWorker-2`) |
//! | `pid` | the child's pid |
//! | `child_target` | the event's target in the child (its module path) |
//! | `fields` | the event's other fields, `key=value` separated by spaces (only if any) |
//! | `message` | the event's message |
//!
//! The child's level is the parent's ([`tracing::level_filters::LevelFilter::current`]
//! when the child starts), so disabled events cost nothing there. Each event is written
//! to the parent before the call that emitted it returns: events from one child keep
//! their order, and the ones just before a panic, `exit` or `abort` are not lost.
//! Under [`log_to_stderr`], children print their events to the shared stderr themselves,
//! in the same format, so a child's log lines keep program order with its own output, as
//! in Python. Under any other subscriber, events go through the parent, and their order
//! relative to a child's direct `println!` output is not guaranteed.
//!
//! # What runs in a child, and what does not
//!
//! A child is this executable started again from `/proc/self/exe`, with the command line
//! `["<name> (procpool)", "--procpool-child-v2", "<parent pid>"]`. What it has before
//! the target runs:
//!
//! - **Constructors.** The dynamic loader runs the constructors of every shared library
//!   the program links (libc, libstdc++, OpenSSL, ...) as usual. In the executable itself,
//!   `.init_array` entries run in link order; procpool's own entry recognises the child
//!   and never returns (the child exits when its work is done), so entries linked
//!   *before* procpool's (including std's own, which has a higher priority) run, and those
//!   linked after it (a `#[ctor]` in a crate the linker places later) do not. Do not rely
//!   on a constructor for set-up a target needs: use [`Builder::initializer`] or the
//!   target itself.
//! - **No `main`.** `main`, `#[tokio::main]` and the test harness never run, so nothing
//!   they set up exists: no runtime (an `async` target runs on a current-thread tokio
//!   runtime procpool builds for it), no logger or subscriber the program installs in
//!   `main` (procpool installs its own forwarder, see [Logging](#logging)), no command
//!   line parsing. std's start-up is missing too, and procpool does its part: a stack
//!   overflow on the thread that runs targets prints std's "thread '…' has overflowed
//!   its stack" and exits with code 77 ([`ExitReason::is_stack_overflow`]; threads a
//!   target starts itself have no such handler, an overflow there is `SIGSEGV`), the
//!   main thread has no name (the panic hook uses the process's name), and `SIGPIPE` is
//!   ignored, as std does.
//! - **Statics are fresh.** A child is a new process: `static`s, `OnceLock`s and
//!   `lazy_static`s start uninitialised, whatever the parent had computed.
//! - **`std::env::args()`** returns the child's own command line above, never the
//!   parent's; `std::env::current_exe()` is the parent's executable.
//! - **Environment and working directory** are the parent's at the moment it started
//!   the child; procpool sets and reads no variable of its own.
//! - **stdout and stderr** are the parent's; stdin is `/dev/null`.
//!
//! # Errors
//!
//! Every fault in a child arrives as an [`Error`] variant: [`Error::Panicked`] with the
//! child's message and location, [`Error::WorkerDied`] with the exit code or signal, and
//! so on. The parent never panics because a child misbehaved.
//!
//! # Layout
//!
//! The modules form layers that import downward only; `ARCHITECTURE.md` in the
//! repository has the map, and `tests/layers.rs` holds the code to it.
//!
//! # Platform
//!
//! Linux only (elsewhere a `compile_error!` says so):
//!
//! - **Kernel.** Linux 5.3 or later for pidfds (`pidfd_open`), which the pool uses to
//!   watch and signal its children without a race on reused pids; on an older kernel it
//!   falls back to polling. memfds (3.17) hold the shared memory of large arguments,
//!   `Semaphore`, `Value` and `Array`; futexes their locks.
//! - **`/proc`.** A child is started from `/proc/self/exe` and the pool reads
//!   `/proc/<pid>` for memory limits: in a container, `/proc` must be mounted (it is in
//!   Docker, Podman and Kubernetes by default).
//! - **Sockets.** Parent and children talk over abstract unix sockets, which belong to
//!   a network namespace: a child moved to another one (`unshare -n`) cannot reach its
//!   parent. Nothing is written to the file system.
//! - **Executables only.** The child runs this very executable again, so procpool works
//!   in binaries, tests, examples and benches; a `cdylib` (a Python extension, a plugin
//!   loaded by another program) cannot start one: a target that is not code of the
//!   main executable is refused with [`Error::UnsupportedTarget`] before anything is
//!   started.
//! - **`panic = "abort"`** works: a panicking task then aborts its worker, which the
//!   caller sees as [`Error::WorkerDied`] (with `SIGABRT`) instead of
//!   [`Error::Panicked`], and the worker is replaced.

#[cfg(not(target_os = "linux"))]
compile_error!(
    "procpool supports Linux only: it is built on pidfds, memfds, abstract unix sockets and \
     futexes (see the crate docs, Platform)"
);

#[doc(hidden)]
#[allow(missing_docs)]
#[path = "fuzz.rs"]
pub mod __fuzz;
mod child;
mod error;
mod log;
#[cfg(feature = "redis")]
mod node;
mod pool;
mod process;
mod runtime;
mod sync;
mod target;
mod wire;

pub use error::{Error, ExitReason, Result};
pub use log::log_to_stderr;
#[cfg(feature = "tower")]
pub use pool::PoolService;
pub use pool::{
    Apply, AsyncPool, Builder, DEFAULT_MAX_QUEUED, Imap, ImapStream, Map, PoolStats, TaskHandle,
    TaskTimeout,
};
pub use process::{Process, spawn};
pub use runtime::{ProcessInfo, active_children, current_process, parent_process};
pub use sync::{
    Array, ArrayGuard, Barrier, BarrierWaitResult, BoundedSemaphore, Condition, Connection, Dict,
    Event, Lock, LockGuard, Queue, Receiver, Semaphore, SemaphorePermit, Sender, TryPutError,
    Value, ValueGuard, pipe, pipe_oneway,
};
#[doc(hidden)]
pub use sync::{Tables as __Tables, set_owner_timeout as __set_owner_timeout, tables as __tables};
pub use target::{Async, Blocking, Target};
pub use wire::DEFAULT_MAX_FRAME;

/// Remote nodes through Redis Streams (feature `redis`; DESIGN.md §10): the same
/// [`AsyncPool`] with its tasks run on other machines.
///
/// A node is this same executable started with `PROCPOOL_NODE=<url>` in its
/// environment (with `PROCPOOL_NAMESPACE`, the key in `PROCPOOL_KEY` or
/// `PROCPOOL_KEY_FILE`, and `PROCPOOL_NODE_PROCESSES`): before `main`, it becomes a node
/// and never runs `main`. [`node`](remote::node) runs one from a program's own `main`.
///
/// What holds today:
/// - tasks go only to nodes of the same build (the ELF build-id, else the SHA-256 of the
///   executable, names the stream); a pool with no such node within
///   [`wait_for_nodes`](crate::Builder::wait_for_nodes) fails with
///   [`Error::NoCompatibleNodes`];
/// - every task and result frame carries an HMAC-SHA256 under the shared key; a node
///   never runs a frame that fails it (it moves it to the namespace's dead letters and
///   logs it), a parent drops a result that fails it;
/// - a node runs each task in a local worker process, so panics, crashes and the
///   `task_timeout` deadline (which travels with the task) behave as locally, with
///   names such as `node-<id>:PoolWorker-2` in errors;
/// - a `Queue`, `Lock`, `Event` or pipe end passed to `apply` is
///   [`Error::UnsupportedArgument`];
/// - a caller that gives up (drops its future, or its `.timeout(d)` passes) cancels the
///   task: deleted from the stream if still queued; on the node that took it, never
///   started, or its worker stopped (its process group with it) if it runs. Cancels go
///   by pub/sub, and into a sorted set a node checks before it starts a task;
/// - the remote pool's connections run on procpool's own runtime, like the local pool.
///
/// - nodes heartbeat the entries they still own every second (`XCLAIM ... JUSTID`,
///   which does not count as a delivery); an entry silent for 3 s is claimed back by
///   the reaper (one a second per build, elected among nodes and parents) and queued
///   again while [`retries`](crate::Builder::retries) are left (default 0), else its
///   caller gets [`Error::NodeLost`], within about 4 s of the node's death;
/// - a node answers and acks through one script that first checks it still owns the
///   entry, so a node presumed lost and then resumed (paused, cut off) writes nothing,
///   and its ack cannot remove the new owner's entry; its heartbeat finds the entries
///   it lost and stops their tasks.
///
/// - a parent renews a key of its own every second (3 s of life) and with every batch
///   it writes: a node drops the unstarted tasks of a parent whose key is gone, and
///   stops its running ones (checked every second), so a parent killed even by SIGKILL
///   leaves no work behind.
///
/// - a node drains on SIGTERM: it unregisters, takes no new task, and waits for the
///   ones it holds up to its grace (30 s, `PROCPOOL_NODE_GRACE`; the rest go to the
///   reaper); it reconnects while its Redis is unreachable, and stops once that lasts
///   past the reaper's threshold (its work is reclaimed elsewhere then).
///
/// - Redis unreachable: a pool reconnects; its tasks in flight fail with
///   [`Error::Backend`] once it has been unreachable for 3 s, and a task submitted
///   meanwhile fails at once; it serves again when Redis is back. A Redis that
///   restarted (its `run_id` changed) fails the tasks in flight at once, and puts them in
///   the cancelled set, even if it kept them (persistence): the pool cannot tell what a
///   restarted server kept, and a task answered `Backend` must not run later. Nodes make
///   the consumer group again and listen for cancels again; a node's tasks whose
///   entries the restart lost are stopped by its heartbeat.
///
/// - a task whose arguments encode to more than Redis holds in one value (512 MiB less
///   the frame) is [`Error::Encode`] at submit.
///
/// - a remote task's `tracing` events (from any of its worker's threads) travel back
///   with its result and are emitted in the parent as a local worker's are (target
///   its own, `process` = `node-<id>:PoolWorker-<n>`, `pid` = the worker's on
///   its node), just before the result is handed on; the node logs them too. At most
///   1,000 events and 256 KiB of text per task travel; the rest are counted in one
///   `WARN` in the parent. What differs from a local pool: they arrive when the task
///   ends, not as they are emitted; a task stopped at its deadline sends the ones
///   emitted until then, a cancelled one none; the level is the node's (`INFO` in node
///   mode), not the parent's.
///
/// `imap` keeps 4 chunks per worker of the nodes that were live when the pool started
/// in flight, so an endless input holds that many entries in Redis, and the parent's
/// memory stays flat (checked over 10 M items).
#[cfg(feature = "redis")]
pub mod remote {
    #[doc(hidden)]
    pub use crate::node::__answer;
    pub use crate::node::node;
    pub use crate::pool::remote::Redis;
}

/// The README's examples, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
