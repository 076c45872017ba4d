//! What travels from callers to the dispatcher, and back.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::Error;
use crate::target::TargetRef;
use crate::wire::Outcome;

/// A task's outcome as the dispatcher hands it to its caller.
pub(crate) type TaskResult = Result<Finished, Error>;

/// A task that ran: its outcome and the worker that ran it (for error messages).
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) outcome: Outcome,
    pub(crate) worker: Arc<str>,
}

/// How the dispatcher answers a caller: a oneshot for one task, a shared channel for the
/// chunks of a map.
pub(crate) type Reply = Box<dyn FnOnce(TaskResult) + Send>;

/// One unit of work: a call of a target, or one chunk of a map.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) target: TargetRef,
    pub(crate) args: Bytes,
    pub(crate) reply: Reply,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("target", &self.target.name)
            .field("args", &self.args.len())
            .finish_non_exhaustive()
    }
}

/// Caller to dispatcher.
#[derive(Debug)]
pub(crate) enum Command {
    Submit(Job),
    /// The caller gave up on task `id` (dropped, or its own timeout expired).
    Cancel {
        id: u64,
    },
    /// Finish queued work, stop the workers, then answer.
    Close {
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// Kill everything now, fail every outstanding task, then answer.
    Terminate {
        done: tokio::sync::oneshot::Sender<()>,
    },
}
