//! Who this process is and procpool's own threads: the runtime layer, beneath `log`,
//! `sync`, `process`, `child` and `pool` (see ARCHITECTURE.md).
//!
//! - identity: the process's name (`MainProcess`, `Process-3:1`, `PoolWorker-2`),
//!   [`current_process`], [`active_children`], and the numbering of new children;
//! - [`service`]: the threads that start and reap every child, serve the hub, and run
//!   every pool's dispatcher and I/O;
//! - [`timer`]: the timers of the `*_timeout` calls, under any executor or none.

pub(crate) mod service;
pub(crate) mod timer;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

// ----------------------------------------------------------------------------- naming

/// Children created so far by this process (Python's `_process_counter`).
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Who this process is, when it is a procpool child.
struct SelfId {
    name: String,
    identity: Vec<u32>,
    parent: ProcessInfo,
}

static SELF_ID: OnceLock<SelfId> = OnceLock::new();

/// Called once in a child, before any target runs: its name and identity, and its
/// parent's name and pid.
pub(crate) fn become_child(name: &str, identity: Vec<u32>, parent_name: &str, parent_pid: u32) {
    let me = SelfId {
        name: name.to_owned(),
        identity,
        parent: ProcessInfo {
            name: parent_name.to_owned(),
            pid: parent_pid,
        },
    };
    // Set at most once per process; a second call cannot happen (boot runs once).
    drop(SELF_ID.set(me));
}

/// The identity of the next child: ours plus the next counter value.
pub(crate) fn next_identity() -> Vec<u32> {
    let mut id = SELF_ID
        .get()
        .map(|me| me.identity.clone())
        .unwrap_or_default();
    id.push(COUNTER.fetch_add(1, Ordering::Relaxed) + 1);
    id
}

pub(crate) fn name_of(identity: &[u32]) -> String {
    named("Process", identity)
}

/// `Process-3:1`, `PoolWorker-4`: Python's naming from an identity.
/// What a node puts before its workers' names (`node-<id>`), set once by the node.
static WORKER_PREFIX: OnceLock<String> = OnceLock::new();

/// Makes this process's pool workers `<prefix>:PoolWorker-<n>` from here on (a node
/// does, so that names in errors, logs and `current_process()` say which machine).
/// Only the first call counts.
#[cfg(feature = "redis")]
pub(crate) fn set_worker_prefix(prefix: String) {
    if WORKER_PREFIX.set(prefix).is_err() {
        tracing::debug!(target: "procpool::lifecycle", "the workers' name prefix was set already");
    }
}

/// The name of pool worker `identity`: `PoolWorker-<n>`, after the prefix a node set.
pub(crate) fn worker_name(identity: &[u32]) -> String {
    let name = named("PoolWorker", identity);
    match WORKER_PREFIX.get() {
        Some(prefix) => format!("{prefix}:{name}"),
        None => name,
    }
}

pub(crate) fn named(prefix: &str, identity: &[u32]) -> String {
    let parts: Vec<String> = identity.iter().map(u32::to_string).collect();
    format!("{prefix}-{}", parts.join(":"))
}

/// The name and pid of a process: what [`current_process`] and [`active_children`]
/// return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub(crate) name: String,
    pub(crate) pid: u32,
}

impl ProcessInfo {
    /// `"MainProcess"`, `"Process-3"`, `"Process-3:1"`, `"PoolWorker-1"` or a name given
    /// with [`Process::with_name`](crate::Process::with_name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// This process: `MainProcess` in the program the user started, the child's name in a
/// child (Python's `multiprocessing.current_process()`).
///
/// ```
/// assert_eq!(procpool::current_process().name(), "MainProcess");
/// assert_eq!(procpool::current_process().pid(), std::process::id());
/// ```
pub fn current_process() -> ProcessInfo {
    ProcessInfo {
        name: SELF_ID
            .get()
            .map_or_else(|| "MainProcess".to_owned(), |me| me.name.clone()),
        pid: std::process::id(),
    }
}

/// The process that started this one, in a procpool child (a [`Process`]'s target, a
/// pool worker, a child of a child); `None` in the program the user started (Python's
/// `multiprocessing.parent_process()`).
///
/// Its name is what [`current_process`] said there when this child was started
/// (`MainProcess`, `Process-3`, or a name given with `with_name`); its pid is the
/// parent's, which started this process (so a grandchild's parent is the child).
/// It says who the parent was: it may have ended since.
///
/// ```
/// assert!(procpool::parent_process().is_none());
/// ```
///
/// [`Process`]: crate::Process
pub fn parent_process() -> Option<ProcessInfo> {
    SELF_ID.get().map(|me| me.parent.clone())
}

/// The children of this process that are still running, in the order they were started
/// (Python's `multiprocessing.active_children()`). Children that have ended are reaped
/// as a side effect.
pub fn active_children() -> Vec<ProcessInfo> {
    service::live_children().iter().map(|c| c.info()).collect()
}
