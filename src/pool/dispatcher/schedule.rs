//! Scheduling: which worker gets which task and when (pipelining depth, least loaded
//! first, the `processes` bound), taking back tasks sent ahead to a busy worker, and the
//! deadlines that stop a worker (`task_timeout` or a task's `run_timeout`, the skip grace).

use std::time::Duration;

use tokio::time::Instant;

use super::{Dispatcher, MAX_START_FAILURES, State, Worker};
use crate::error::Error;
use crate::pool::message::Reply;
use crate::pool::seam::{Conn, Workers};

/// How long a worker may take to skip a cancelled task that reached the head of its
/// queue before the dispatcher assumes it is running it and stops the worker. A worker
/// that skips answers in microseconds, but on a loaded machine it may not be scheduled
/// for tens of milliseconds (50 ms was exceeded in CI, replacing a worker that was
/// about to skip); a cancelled task that did start burns at most this long.
pub(super) const SKIP_GRACE: Duration = Duration::from_millis(250);
/// About this much work is sent ahead to each worker (see `Dispatcher::depth`).
const PIPELINE_WORK: Duration = Duration::from_millis(2);

/// Tasks in flight per worker before any task has finished (at most): until then their
/// length is unknown, and a task sent behind a long one waits for it.
const FIRST_DEPTH: usize = 8;

/// At most this many bytes of arguments are sent ahead to a worker: with large ones,
/// pipelining gains nothing, and the worker would hold them all in memory.
const PIPELINE_BYTES: usize = 8 << 20;

/// A task sent ahead to a busy worker is taken back for an idle one once the busy
/// worker's current task has run this long, or twice as long as tasks take, whichever
/// is longer, up to [`RECALL_MAX`] (see `Dispatcher::rebalance`). Below it, the busy
/// worker is about to get to the task anyway.
const RECALL_MIN: Duration = Duration::from_millis(1);
const RECALL_MAX: Duration = Duration::from_millis(50);

impl<W: Workers> Dispatcher<W> {
    /// Tasks in flight per worker: about [`PIPELINE_WORK`] of them by the time tasks have
    /// taken so far, between 1 and the configured depth ([`FIRST_DEPTH`] at most until a
    /// task has finished).
    pub(super) fn depth(&self) -> usize {
        let Some(t) = self.task_time else {
            return self.cfg.pipeline.min(FIRST_DEPTH);
        };
        let n = PIPELINE_WORK.as_nanos() / t.as_nanos().max(1);
        usize::try_from(n)
            .unwrap_or(usize::MAX)
            .clamp(1, self.cfg.pipeline)
    }

    /// Sends queued tasks to workers with room, least loaded first.
    pub(super) fn assign(&mut self) {
        if let Some(reason) = self.broken.clone() {
            while let Some(id) = self.pending.pop_front() {
                if let Some(task) = self.tasks.remove(&id) {
                    self.counts.queued -= 1;
                    self.counts.failed += 1;
                    self.left_queue += usize::from(task.admitted);
                    if let Some(reply) = task.reply {
                        reply.send(Err(Error::spawn(reason.clone(), None)));
                    }
                }
            }
            return;
        }
        let depth = self.depth();
        // Processes running tasks (or being stopped while they may still run one): an
        // idle worker takes a task only while fewer than `processes` do, so replacements
        // started early never add to them.
        let mut busy = self
            .workers
            .iter()
            .filter(|w| !w.inflight.is_empty())
            .count()
            + self.dying;
        while let Some(&id) = self.pending.front() {
            let Some(task) = self.tasks.get_mut(&id) else {
                self.pending.pop_front(); // cancelled while queued
                continue;
            };
            if task.reply.as_ref().is_some_and(Reply::is_closed) {
                // Its map is gone and its cancel on the way: cancelled now (as tower's
                // buffer worker skips a request whose caller left).
                self.pending.pop_front();
                self.cancel(id, None);
                continue;
            }
            let size = task.args.len();
            let may_start = busy < self.cfg.processes;
            let Some(w) = self
                .workers
                .iter_mut()
                .filter(|w| {
                    !w.retiring
                        && !w.staging
                        && w.inflight.len() < depth
                        && if w.inflight.is_empty() {
                            may_start
                        } else {
                            !w.recalling && w.inflight_bytes + size <= PIPELINE_BYTES
                        }
                })
                // Least loaded; of those, the one whose current task started last.
                .min_by_key(|w| (w.inflight.len(), std::cmp::Reverse(w.head_since)))
            else {
                break;
            };
            if w.inflight.is_empty() {
                busy += 1;
            }
            self.pending.pop_front();
            self.counts.queued -= 1;
            // Its place in the queue is free (back in the queue later, it holds none).
            self.left_queue += usize::from(std::mem::take(&mut task.admitted));
            let deferred = task.args.has_deferred();
            if deferred {
                // Encoded elsewhere (a user's `Serialize` of megabytes); the worker's
                // head clock starts once its frame is queued (see `on_staged`).
                w.conn
                    .stage(id, task.target, task.args.clone(), self.events_tx.clone());
                w.staging = true;
                task.state = State::Staging;
            } else if let Err(e) = w.conn.run(id, task.target, &task.args) {
                // A large map item that could be encoded before cannot be now.
                tracing::debug!(task = id, "task arguments failed to encode again");
                self.counts.failed += 1;
                if let Some(reply) = self.tasks.remove(&id).and_then(|t| t.reply) {
                    self.answers.push((reply, Err(e)));
                }
                continue;
            }
            if !deferred {
                task.state = State::Sent;
            }
            w.sent += 1;
            task.seq = w.sent;
            self.counts.running += 1;
            tracing::debug!(task = id, worker = %w.conn.name(), "task sent");
            w.inflight.push_back(id);
            w.inflight_bytes += size;
            if w.inflight.len() == 1 && !deferred {
                w.head_since = Some(Instant::now());
            }
            w.assigned += 1;
            if self
                .cfg
                .max_tasks_per_child
                .is_some_and(|max| w.assigned >= max)
            {
                // Replaced right away (see `maintain`), so a limit never deadlocks the
                // pool (CPython gh-115634).
                w.retiring = true;
                if w.staging {
                    w.shutdown_after_staging = true;
                } else {
                    w.conn.shutdown();
                }
            }
        }
    }

    /// How long a busy worker's current task must have run before the tasks sent ahead
    /// to it are taken back for an idle worker (see [`RECALL_MIN`]).
    pub(super) fn recall_after(&self) -> Duration {
        self.task_time
            .map_or(RECALL_MIN, |t| (t * 2).clamp(RECALL_MIN, RECALL_MAX))
    }

    /// When an idle worker may take a task and none is queued, and the tasks sent
    /// ahead to a busy worker have waited [`recall_after`](Self::recall_after) behind
    /// its current one: the busy worker with the oldest current task, or `None`.
    pub(super) fn recall_candidate(&self) -> Option<(usize, Instant)> {
        if !self.pending.is_empty() {
            return None;
        }
        let busy = self
            .workers
            .iter()
            .filter(|w| !w.inflight.is_empty())
            .count()
            + self.dying;
        let idle = self
            .workers
            .iter()
            .any(|w| !w.retiring && w.inflight.is_empty());
        if !idle || busy >= self.cfg.processes {
            return None;
        }
        let after = self.recall_after();
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.inflight.len() >= 2 && !w.recalling && !w.staging)
            .filter_map(|(i, w)| Some((i, w.head_since? + after)))
            .min_by_key(|&(_, at)| at)
    }

    /// A task never waits behind a busy worker while another is idle (DESIGN.md §9):
    /// the tasks sent ahead to the busy worker that it has not started are taken back
    /// (`WorkerConn::recall`; the worker answers from a thread of its own, even while
    /// its task runs) and go to the idle workers. A recall is certain: the worker's
    /// main thread and the thread that answers agree under a lock on which tasks were
    /// started, so a task runs once, there or elsewhere.
    pub(super) fn rebalance(&mut self) {
        let now = Instant::now();
        while let Some((idx, at)) = self.recall_candidate() {
            if at > now {
                return;
            }
            let w = &mut self.workers[idx];
            // Set either way: a worker whose recall cannot be written is dying, and its
            // reader reports that.
            w.recalling = true;
            if !w.conn.recall(w.sent) {
                tracing::debug!(worker = %w.conn.name(), "cannot send a recall");
            }
        }
    }

    /// When the worker's current task must be over, and the limit that ends it there
    /// (`None`: it was cancelled, and the deadline is the skip grace; a task cancelled
    /// without kill keeps its limit, as if it had not been cancelled). The limit is the
    /// task's own `run_timeout`, else the pool's `task_timeout`; both count from the
    /// task's start (`head_since`), so its wait in the queue or behind another task on
    /// the worker does not count.
    pub(super) fn head_deadline(&self, w: &Worker<W::Conn>) -> Option<(Instant, Option<Duration>)> {
        let since = w.head_since?;
        let head = w.inflight.front()?;
        match self.tasks.get(head) {
            Some(t) if !t.cancelled || t.kept => {
                let limit = t.run_timeout.or(self.cfg.task_timeout)?;
                Some((since + limit, Some(limit)))
            }
            _ => Some((since + SKIP_GRACE, None)),
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let heads = self.workers.iter().filter_map(|w| self.head_deadline(w));
        let retry = self.retry_at.filter(|_| self.failures < MAX_START_FAILURES);
        let recall = self.recall_candidate().map(|(_, at)| at);
        heads.map(|(at, _)| at).chain(retry).chain(recall).min()
    }

    pub(super) fn on_deadline(&mut self) {
        let now = Instant::now();
        let mut idx = self.workers.len();
        while idx > 0 {
            idx -= 1;
            let Some((at, limit)) = self.head_deadline(&self.workers[idx]) else {
                continue;
            };
            if at > now {
                continue;
            }
            let name = self.workers[idx].conn.name();
            let err = match limit {
                Some(after) => {
                    tracing::info!(worker = %name, "task timed out after {after:?}; worker replaced");
                    Some(Error::Timeout { after })
                }
                None => {
                    tracing::info!(worker = %name, "cancelled task did not stop; worker replaced");
                    None
                }
            };
            self.stop_worker(idx, err);
        }
    }
}
