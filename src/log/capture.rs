//! A node's capture of its workers' events, per task: they travel back with the task's
//! result, so they reach the subscriber of the parent that submitted it (DESIGN.md §10).
//!
//! Only tasks a node opened ([`open`], when it submits one to its local pool) are
//! captured, so a pool that is not a node's keeps nothing, and an event that comes after
//! its task was [taken](take) (a worker killed at a deadline) is not kept either.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::wire::LogRecord;

/// The most events of one task that travel to its parent; the rest are counted.
pub(crate) const MAX_EVENTS: usize = 1000;

/// The most text (targets, messages, fields) of one task's events that travels to its
/// parent; the rest are counted.
pub(crate) const MAX_BYTES: usize = 256 << 10;

/// A task's events, as they travel with its result.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct TaskEvents {
    /// The worker process that emitted them (on its node).
    pub(crate) pid: u32,
    pub(crate) events: Vec<LogRecord>,
    /// Events over [`MAX_EVENTS`] or [`MAX_BYTES`], not sent.
    pub(crate) dropped: u64,
    #[serde(skip)]
    bytes: usize,
}

/// Whether any task was opened (a fast path for pools that are not a node's).
static CAPTURING: AtomicBool = AtomicBool::new(false);

static OPEN: Mutex<Option<HashMap<u64, TaskEvents>>> = Mutex::new(None);

fn open_tasks() -> std::sync::MutexGuard<'static, Option<HashMap<u64, TaskEvents>>> {
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the events of local pool task `id` from here on, until [`take`].
pub(crate) fn open(id: u64) {
    CAPTURING.store(true, Ordering::Relaxed);
    open_tasks()
        .get_or_insert_with(HashMap::new)
        .insert(id, TaskEvents::default());
}

/// Keeps `record`, emitted by worker `pid`, if its task is open and within the bounds.
pub(crate) fn record(pid: u32, record: &LogRecord) {
    let Some(task) = record.task else { return };
    if !CAPTURING.load(Ordering::Relaxed) {
        return;
    }
    let mut open = open_tasks();
    let Some(kept) = open.as_mut().and_then(|m| m.get_mut(&task)) else {
        return;
    };
    let len = record.target.len() + record.message.len() + record.fields.len();
    if kept.events.len() >= MAX_EVENTS || kept.bytes.saturating_add(len) > MAX_BYTES {
        kept.dropped = kept.dropped.saturating_add(1);
        return;
    }
    kept.pid = pid;
    kept.bytes += len;
    kept.events.push(record.clone());
}

/// The events kept for task `id`, which is closed: nothing more is kept for it.
pub(crate) fn take(id: u64) -> TaskEvents {
    open_tasks()
        .as_mut()
        .and_then(|m| m.remove(&id))
        .unwrap_or_default()
}
