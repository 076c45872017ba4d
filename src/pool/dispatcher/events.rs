//! What the dispatcher does with its workers' events: a worker ready or failed to
//! start, a task answered, staged or given back, a worker gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Dispatcher, MAX_START_FAILURES, State, Worker};
use crate::error::Error;
use crate::pool::message::Finished;
use crate::pool::seam::{Conn, Event, Workers};
use crate::wire::Outcome;

impl<W: Workers> Dispatcher<W> {
    pub(super) fn on_event(&mut self, ev: Event<W::Conn>) {
        match ev {
            Event::Ready(conn) => {
                tracing::info!(worker = %conn.name(), pid = conn.pid(), "worker started");
                self.starting -= 1;
                self.failures = 0;
                self.retry_at = None;
                self.workers.push(Worker::new(conn));
            }
            Event::Failed(err) => {
                tracing::warn!(target: "procpool::lifecycle", "a worker failed to start: {err}");
                self.starting -= 1;
                self.failures += 1;
                self.counts.start_failures += 1;
                if self.failures >= MAX_START_FAILURES {
                    if self.workers.is_empty() {
                        self.broken = Some(format!(
                            "the pool cannot start workers ({} failures in a row): {err}",
                            self.failures
                        ));
                    }
                } else {
                    let backoff = Duration::from_millis(10) * 2u32.pow(self.failures);
                    self.retry_at = Some(Instant::now() + backoff.min(Duration::from_secs(2)));
                }
            }
            Event::Done {
                worker,
                id,
                outcome,
            } => self.on_done(worker, id, outcome),
            Event::Stopped => self.dying -= 1,
            Event::Staged { worker, id, result } => self.on_staged(worker, id, result),
            Event::Recalled {
                worker,
                after,
                upto,
            } => self.on_recalled(worker, after, upto),
            Event::Gone {
                worker,
                exit,
                protocol,
            } => {
                let Some(idx) = self.workers.iter().position(|w| w.conn.id() == worker) else {
                    return; // stopped by us already
                };
                let w = &self.workers[idx];
                let err = match protocol {
                    Some(reason) => Error::Protocol {
                        name: w.conn.name().to_string(),
                        reason,
                    },
                    None => Error::WorkerDied {
                        pid: w.conn.pid(),
                        name: w.conn.name().to_string(),
                        reason: exit,
                    },
                };
                let expected = w.retiring && w.inflight.is_empty();
                if expected {
                    tracing::debug!(worker = %w.conn.name(), "worker retired");
                } else {
                    tracing::info!(worker = %w.conn.name(), pid = w.conn.pid(),
                        "worker replaced: {err}");
                }
                self.remove_worker(idx, Some(err));
                if !expected {
                    self.counts.restarts += 1;
                }
            }
        }
    }

    /// Task `id`'s frame is queued for `worker`, or its arguments failed to encode.
    pub(super) fn on_staged(&mut self, worker: u64, id: u64, result: Result<(), Error>) {
        let Some(w) = self.workers.iter_mut().find(|w| w.conn.id() == worker) else {
            return; // the worker is gone: its tasks were put back in the queue
        };
        if !w.staging || w.inflight.back() != Some(&id) {
            return; // the task left this worker while it was encoded
        }
        w.staging = false;
        match result {
            Ok(()) => {
                if let Some(task) = self.tasks.get_mut(&id) {
                    task.state = State::Sent;
                    if task.cancelled {
                        // Behind its Run frame: the worker never starts it.
                        w.conn.skip(id);
                    }
                }
                if w.inflight.len() == 1 {
                    w.head_since = Some(Instant::now());
                }
            }
            Err(e) => {
                // A large map item that could be encoded before cannot be now; nothing
                // of it was queued, so the worker never counts it.
                tracing::debug!(task = id, "task arguments failed to encode again");
                w.inflight.pop_back();
                w.sent -= 1;
                if let Some(task) = self.tasks.remove(&id) {
                    w.inflight_bytes -= task.args.len();
                    if !task.cancelled {
                        self.counts.running -= 1;
                        self.counts.failed += 1;
                    }
                    if let Some(reply) = task.reply {
                        self.answers.push((reply, Err(e)));
                    }
                }
                if w.inflight.is_empty() {
                    w.head_since = None;
                }
            }
        }
        if std::mem::take(&mut w.shutdown_after_staging) {
            w.conn.shutdown();
        }
    }

    pub(super) fn on_done(&mut self, worker: u64, id: u64, outcome: Outcome) {
        let Some(idx) = self.workers.iter().position(|w| w.conn.id() == worker) else {
            return; // a late answer from a worker we stopped
        };
        let w = &mut self.workers[idx];
        if w.inflight.front() != Some(&id) {
            let err = Error::Protocol {
                name: w.conn.name().to_string(),
                reason: format!("answered task {id} out of order"),
            };
            self.stop_worker(idx, Some(err));
            return;
        }
        w.inflight.pop_front();
        let task = self.tasks.remove(&id);
        if let Some(task) = &task {
            w.inflight_bytes = w.inflight_bytes.saturating_sub(task.args.len());
            if task.args.rest.is_some() {
                // It may have had its arguments in the worker's arena.
                w.conn.answered(id);
            }
        }
        if w.inflight.is_empty() {
            w.inflight_bytes = 0;
            if self.pending.is_empty() {
                w.conn.release_buffers();
            }
        }
        let now = Instant::now();
        let took = w.head_since.map(|since| now - since);
        // The next head's clock starts now, unless its frame is not queued yet (its
        // encoding is still running: `on_staged` starts it).
        w.head_since = w
            .inflight
            .front()
            .filter(|id| {
                self.tasks
                    .get(id)
                    .is_none_or(|t| !matches!(t.state, State::Staging))
            })
            .map(|_| now);
        let name = Arc::clone(w.conn.name());
        if let Some(limit) = self.cfg.max_memory_per_child
            && !w.retiring
            && let Some(rss) = w.conn.resident_bytes()
            && rss > limit
        {
            tracing::info!(target: "procpool::lifecycle", worker = %name,
                "worker's resident set is {rss} bytes, over max_memory_per_child \
                 ({limit}); replaced after its tasks");
            w.retiring = true;
            if w.staging {
                // After the staged task's frame, or that task would be lost with it.
                w.shutdown_after_staging = true;
            } else {
                w.conn.shutdown();
            }
            self.counts.restarts += 1;
        }
        let Some(task) = task else {
            return;
        };
        if task.cancelled {
            return; // counted when it was cancelled
        }
        if let Some(took) = took {
            self.task_time = Some(match self.task_time {
                None => took,
                Some(t) => (t * 3 + took) / 4,
            });
        }
        self.counts.running -= 1;
        tracing::debug!(task = id, worker = %name, "task done");
        match outcome {
            Outcome::Value(_) => self.counts.completed += 1,
            _ => self.counts.failed += 1,
        }
        if let Some(reply) = task.reply {
            self.answers.push((
                reply,
                Ok(Finished {
                    outcome,
                    worker: name,
                }),
            ));
        }
    }

    /// Worker `worker` gave back tasks `after + 1 ..= upto` (see `rebalance`): they go
    /// back to the front of the queue, in order, for the idle workers.
    pub(super) fn on_recalled(&mut self, worker: u64, after: u64, upto: u64) {
        let Some(w) = self.workers.iter_mut().find(|w| w.conn.id() == worker) else {
            return; // stopped meanwhile: its tasks went back already
        };
        w.recalling = false;
        let tasks = &mut self.tasks;
        let mut back = Vec::new();
        w.inflight.retain(|id| {
            let seq = tasks.get(id).map_or(0, |t| t.seq);
            let given_back = after < seq && seq <= upto;
            if given_back {
                back.push(*id);
            }
            !given_back
        });
        if w.inflight.is_empty() {
            w.head_since = None;
        }
        for &id in back.iter().rev() {
            let Some(task) = tasks.get_mut(&id) else {
                continue;
            };
            w.inflight_bytes = w.inflight_bytes.saturating_sub(task.args.len());
            if task.args.rest.is_some() {
                w.conn.answered(id);
            }
            if task.cancelled {
                tasks.remove(&id);
                continue;
            }
            task.state = State::Queued;
            task.seq = 0;
            self.counts.running -= 1;
            self.counts.queued += 1;
            self.counts.taken_back += 1;
            self.pending.push_front(id);
        }
        if !back.is_empty() {
            tracing::debug!(worker = %w.conn.name(), tasks = back.len(),
                "tasks sent ahead to a busy worker taken back for an idle one");
        }
    }
}
