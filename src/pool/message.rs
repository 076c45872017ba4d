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

/// A task's encoded arguments: `head` then `body`, together one MessagePack value.
///
/// In two parts so that a chunk of a map is never copied before it reaches the socket:
/// `head` is its array header, `body` a slice of the items, encoded once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Args {
    pub(crate) head: Bytes,
    pub(crate) body: Bytes,
}

impl Args {
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

impl From<Bytes> for Args {
    fn from(body: Bytes) -> Self {
        Args {
            head: Bytes::new(),
            body,
        }
    }
}

/// One unit of work: a call of a target, or one chunk of a map.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) target: TargetRef,
    pub(crate) args: Args,
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
