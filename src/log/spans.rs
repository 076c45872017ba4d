//! The span each pool task was submitted in, so that its child's events are emitted again
//! inside it (a request id on the caller's span appears on its task's lines).
//!
//! A task submitted where a span is current is registered ([`TaskSpan::current`]) under
//! its id (task ids are unique in the process, over all pools) until the pool is done
//! with it (the registration is dropped with the task); the readers of its events look
//! its span up by the id the events carry ([`of`]). Nothing is kept, and no lock taken,
//! for tasks submitted outside any span.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tracing::Span;

/// How many tasks have a span registered: none, and [`of`] takes no lock.
static LIVE: AtomicUsize = AtomicUsize::new(0);

static SPANS: Mutex<Option<HashMap<u64, Span>>> = Mutex::new(None);

fn spans() -> std::sync::MutexGuard<'static, Option<HashMap<u64, Span>>> {
    SPANS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Task `id`'s span, registered while this lives.
#[derive(Debug)]
pub(crate) struct TaskSpan {
    id: u64,
}

impl TaskSpan {
    /// Registers the span current here for task `id`; `None` (nothing registered) if no
    /// span is current, or the subscriber does not record it.
    pub(crate) fn current(id: u64) -> Option<TaskSpan> {
        let span = Span::current();
        if span.is_none() || span.is_disabled() {
            return None;
        }
        spans().get_or_insert_with(HashMap::new).insert(id, span);
        LIVE.fetch_add(1, Ordering::Relaxed);
        Some(TaskSpan { id })
    }
}

impl Drop for TaskSpan {
    fn drop(&mut self) {
        let span = spans().as_mut().and_then(|m| m.remove(&self.id));
        LIVE.fetch_sub(1, Ordering::Relaxed);
        // Closed (if this was its last reference) outside the lock: a subscriber's
        // `on_close` may log.
        drop(span);
    }
}

/// The span task `id` was submitted in, if it was registered and still is.
pub(crate) fn of(id: Option<u64>) -> Option<Span> {
    let id = id?;
    if LIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    spans().as_ref().and_then(|m| m.get(&id)).cloned()
}
