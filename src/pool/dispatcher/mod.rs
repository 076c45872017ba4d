//! The pool's central task: owns the workers, the queue of pending tasks, the in-flight
//! table and the deadlines; assigns work, reaps and replaces workers, answers callers.
//!
//! Callers hold only futures and handles; everything they ask goes through [`Command`]s,
//! everything workers say arrives as [`Event`]s. State changes happen here and nowhere
//! else, so there are no locks to hold across awaits and cancellation of a caller is just
//! one more message.
//!
//! Pipelining: a worker may have up to `pipeline` tasks in flight; it runs them in order,
//! so the head of its in-flight list is the one running. How many it gets adapts to how
//! long tasks take (see `Dispatcher::depth`): enough to hide the round trip for small
//! tasks, one at a time for long ones, so that a task never waits behind a long one
//! while another worker is idle. Its start time is when it was
//! sent to an idle worker, or when the task before it finished. A task whose caller gave
//! up is skipped by the worker if it has not started (`Down::Skip`); if it is running,
//! the worker is stopped (SIGTERM to its process group, a grace period, SIGKILL) and
//! replaced, and the tasks queued behind it go back to the front of the queue.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::PoolStats;
use super::message::{Args, Command, Finished, Job, Reply, TaskResult};
use super::seam::{Conn, Event, Events, Workers};
use crate::error::Error;
use crate::target::TargetRef;
use crate::wire::Outcome;

#[cfg(test)]
mod fake;
mod startup;
#[cfg(test)]
mod tests;
pub(crate) use startup::{Launched, launch};

/// How long a worker may take to skip a cancelled task that reached the head of its
/// queue before the dispatcher assumes it is running it and stops the worker.
const SKIP_GRACE: Duration = Duration::from_millis(50);

/// Tasks by id. Ids are consecutive, and the table is mostly walked in id order: hashed
/// to themselves, consecutive tasks sit in neighbouring buckets (with a random hash, each
/// lookup in a table of 100k tasks was a cache miss, the dispatcher's top cost).
type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The hash of an id is the id itself in its low bits (the bucket), with its top 7 bits,
/// which the table compares first within a group, taken from a multiplication so that
/// neighbouring ids differ there.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64 keys; any mixing will do.
        for b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        const TOP7: u64 = !(u64::MAX >> 7);
        self.0 = (id & !TOP7) | (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) & TOP7);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

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

/// Consecutive failed worker starts after which the pool stops trying.
pub(crate) const MAX_START_FAILURES: u32 = 5;

/// What the builder decided.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) processes: usize,
    pub(crate) max_tasks_per_child: Option<u32>,
    pub(crate) max_memory_per_child: Option<u64>,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) pipeline: usize,
}

/// What `build` hands the dispatcher: the ready workers, the next worker id, and how
/// many workers were replaced while the pool was being built.
pub(crate) struct Initial<C> {
    pub(crate) workers: Vec<C>,
    pub(crate) next_worker: u64,
    pub(crate) restarts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    /// Its worker has it, its large map items being encoded for it on the encoder
    /// thread (see `WorkerConn::stage`); its frame is not queued yet.
    Staging,
    Sent,
}

struct Task {
    target: TargetRef,
    args: Args,
    /// It holds a place in the queue (see `Shared::admission`) until it leaves it.
    admitted: bool,
    reply: Option<Reply>,
    state: State,
    /// The caller gave up; the task stays here only until its worker moves past it.
    cancelled: bool,
    /// Its number among the tasks sent to its worker (see `Worker::sent`), once sent.
    seq: u64,
}

struct Worker<C> {
    conn: C,
    inflight: VecDeque<u64>,
    /// Bytes of arguments of the tasks in `inflight`.
    inflight_bytes: usize,
    /// When the head of `inflight` started (estimated).
    head_since: Option<Instant>,
    assigned: u32,
    /// Sent `Shutdown`: takes no more tasks, exits when done.
    retiring: bool,
    /// Tasks sent to it so far: the number of the last one (the worker counts the same).
    sent: u64,
    /// A recall is on its way (see `rebalance`): no more tasks until it is answered.
    recalling: bool,
    /// A task is being staged for it (see `State::Staging`): no frame may overtake it,
    /// so it gets nothing else (and no recall) until that task's frame is queued.
    staging: bool,
    /// It reached `max_tasks_per_child` with a task staging: `Shutdown` goes after it.
    shutdown_after_staging: bool,
}

#[derive(Debug, Default)]
struct Counts {
    submitted: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    restarts: u64,
    start_failures: u64,
    taken_back: u64,
    queued: usize,
    running: usize,
}

pub(crate) struct Dispatcher<W: Workers> {
    cfg: Config,
    /// What starts and stops the workers.
    backend: W,
    cmds: mpsc::UnboundedReceiver<Command>,
    events_tx: mpsc::UnboundedSender<Event<W::Conn>>,
    events: mpsc::UnboundedReceiver<Event<W::Conn>>,
    stats: Arc<Mutex<PoolStats>>,
    workers: Vec<Worker<W::Conn>>,
    starting: usize,
    /// Workers stopped and not reaped yet: their task may still be running.
    dying: usize,
    pending: VecDeque<u64>,
    tasks: IdMap<Task>,
    next_worker: u64,
    counts: Counts,
    closing: Option<Vec<oneshot::Sender<()>>>,
    failures: u32,
    retry_at: Option<Instant>,
    broken: Option<String>,
    /// Answers of tasks finished in this round, delivered at its end.
    answers: Vec<(Reply, TaskResult)>,
    /// How long a task takes, from its start to its answer, smoothed; `None` until the
    /// first answer.
    task_time: Option<Duration>,
    /// The queue's places (`Builder::max_queued`), and how many tasks left the queue in
    /// this round: their places are given back at its end, together (one wake-up for a
    /// producer waiting for many).
    admission: Arc<tokio::sync::Semaphore>,
    left_queue: usize,
}

impl<W: Workers> Dispatcher<W> {
    /// See [`launch`], which makes one.
    fn new(
        cfg: Config,
        backend: W,
        initial: Initial<W::Conn>,
        (events_tx, events): (Events<W::Conn>, mpsc::UnboundedReceiver<Event<W::Conn>>),
        cmds: mpsc::UnboundedReceiver<Command>,
        stats: Arc<Mutex<PoolStats>>,
        admission: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        let Initial {
            workers,
            next_worker,
            restarts,
        } = initial;
        let workers = workers.into_iter().map(Worker::new).collect();
        Dispatcher {
            cfg,
            backend,
            cmds,
            events_tx,
            events,
            stats,
            workers,
            starting: 0,
            dying: 0,
            pending: VecDeque::new(),
            tasks: IdMap::default(),
            next_worker,
            counts: Counts {
                restarts,
                ..Counts::default()
            },
            closing: None,
            failures: 0,
            retry_at: None,
            broken: None,
            answers: Vec::new(),
            task_time: None,
            admission,
            left_queue: 0,
        }
    }

    /// Runs until the pool is closed, terminated, or its last handle is dropped.
    pub(crate) async fn run(mut self) {
        loop {
            self.assign();
            self.rebalance();
            self.maintain();
            self.shut_idle_workers_when_closing();
            // Frames are written before the counters are published: what `stats()`
            // shows (a cancel, say) has reached the workers' sockets.
            for w in &self.workers {
                w.conn.flush();
            }
            if self.left_queue > 0 {
                self.admission
                    .add_permits(std::mem::take(&mut self.left_queue));
            }
            self.publish_stats();
            if self.closed_down() {
                self.deliver_answers();
                for done in self.closing.take().unwrap_or_default() {
                    // A caller that stopped waiting for close() needs no answer.
                    done.send(()).ok();
                }
                return;
            }
            self.deliver_answers();
            let deadline = self.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(ev) = self.events.recv() => {
                    self.on_event(ev);
                    // Take whatever else is ready before assigning again: batching.
                    for _ in 0..256 {
                        let Ok(ev) = self.events.try_recv() else { break };
                        self.on_event(ev);
                    }
                }
                cmd = self.cmds.recv() => {
                    // Handle a batch, fetching only what will be handled: a command taken
                    // from the channel must never be left behind.
                    let mut next = cmd;
                    for budget in (0..256).rev() {
                        match next.take() {
                            None => return self.terminate(None).await,
                            Some(Command::Terminate { done }) => {
                                return self.terminate(Some(done)).await;
                            }
                            Some(cmd) => self.on_command(cmd),
                        }
                        if budget == 0 {
                            break;
                        }
                        match self.cmds.try_recv() {
                            Ok(cmd) => next = Some(cmd),
                            Err(_) => break,
                        }
                    }
                }
                () = sleep => self.on_deadline(),
            }
        }
    }

    // ------------------------------------------------------------------ commands

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(job) => self.submit(job),
            Command::Cancel { id } => self.cancel(id),
            Command::Close { done } => self.closing.get_or_insert_with(Vec::new).push(done),
            Command::Terminate { .. } => unreachable!("handled by run"),
        }
    }

    fn submit(&mut self, job: Job) {
        if let Some(reason) = &self.broken {
            self.left_queue += usize::from(job.admitted);
            job.reply.send(Err(Error::spawn(reason.clone(), None)));
            return;
        }
        self.counts.submitted += 1;
        self.counts.queued += 1;
        self.tasks.insert(
            job.id,
            Task {
                target: job.target,
                args: job.args,
                admitted: job.admitted,
                reply: Some(job.reply),
                state: State::Queued,
                cancelled: false,
                seq: 0,
            },
        );
        self.pending.push_back(job.id);
    }

    fn cancel(&mut self, id: u64) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return; // already finished
        };
        if task.cancelled {
            return;
        }
        self.counts.cancelled += 1;
        match task.state {
            State::Queued => {
                tracing::debug!(task = id, "task cancelled while queued");
                self.counts.queued -= 1;
                self.left_queue += usize::from(task.admitted);
                // Its id stays in `pending` and is skipped there.
                self.tasks.remove(&id);
            }
            State::Staging => {
                // Not at its worker yet: skipped once its frame is queued (`on_staged`).
                tracing::debug!(task = id, "task cancelled while its arguments were encoded");
                self.counts.running -= 1;
                task.cancelled = true;
                task.reply = None;
            }
            State::Sent => {
                self.counts.running -= 1;
                task.cancelled = true;
                task.reply = None;
                let Some(idx) = self.workers.iter().position(|w| w.inflight.contains(&id)) else {
                    self.tasks.remove(&id);
                    return;
                };
                if self.workers[idx].inflight.front() == Some(&id) {
                    // Running: stop the worker so no CPU goes to unwanted work.
                    tracing::info!(task = id, worker = %self.workers[idx].conn.name(),
                        "task cancelled; worker replaced");
                    self.stop_worker(idx, None);
                } else {
                    self.workers[idx].conn.skip(id);
                }
            }
        }
    }

    // -------------------------------------------------------------------- events

    fn on_event(&mut self, ev: Event<W::Conn>) {
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
    fn on_staged(&mut self, worker: u64, id: u64, result: Result<(), Error>) {
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

    fn on_done(&mut self, worker: u64, id: u64, outcome: Outcome) {
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
    fn on_recalled(&mut self, worker: u64, after: u64, upto: u64) {
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

    fn on_deadline(&mut self) {
        let now = Instant::now();
        let mut idx = self.workers.len();
        while idx > 0 {
            idx -= 1;
            let Some((at, cancelled)) = self.head_deadline(&self.workers[idx]) else {
                continue;
            };
            if at > now {
                continue;
            }
            let name = self.workers[idx].conn.name();
            let err = match (cancelled, self.cfg.task_timeout) {
                (false, Some(after)) => {
                    tracing::info!(worker = %name, "task timed out after {after:?}; worker replaced");
                    Some(Error::Timeout { after })
                }
                _ => {
                    tracing::info!(worker = %name, "cancelled task did not stop; worker replaced");
                    None
                }
            };
            self.stop_worker(idx, err);
        }
    }

    /// Hands callers the answers of this round. Callers hear of finished tasks after the
    /// workers got their next ones, and all at once: a caller awaiting several wakes
    /// once per round, not once per task.
    fn deliver_answers(&mut self) {
        for (reply, res) in self.answers.drain(..) {
            reply.send(res);
        }
    }

    // ------------------------------------------------------------------- workers

    /// Tasks in flight per worker: about [`PIPELINE_WORK`] of them by the time tasks have
    /// taken so far, between 1 and the configured depth ([`FIRST_DEPTH`] at most until a
    /// task has finished).
    fn depth(&self) -> usize {
        let Some(t) = self.task_time else {
            return self.cfg.pipeline.min(FIRST_DEPTH);
        };
        let n = PIPELINE_WORK.as_nanos() / t.as_nanos().max(1);
        usize::try_from(n)
            .unwrap_or(usize::MAX)
            .clamp(1, self.cfg.pipeline)
    }

    /// Sends queued tasks to workers with room, least loaded first.
    fn assign(&mut self) {
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
                self.cancel(id);
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
    fn recall_after(&self) -> Duration {
        self.task_time
            .map_or(RECALL_MIN, |t| (t * 2).clamp(RECALL_MIN, RECALL_MAX))
    }

    /// When an idle worker may take a task and none is queued, and the tasks sent
    /// ahead to a busy worker have waited [`recall_after`](Self::recall_after) behind
    /// its current one: the busy worker with the oldest current task, or `None`.
    fn recall_candidate(&self) -> Option<(usize, Instant)> {
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
    fn rebalance(&mut self) {
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

    /// Starts workers until there are as many as configured (or as needed to finish the
    /// queue while closing), backing off after failures.
    fn maintain(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let want = match self.closing {
            Some(_) if self.counts.queued == 0 => 0,
            _ => self.cfg.processes,
        };
        let active = self.workers.iter().filter(|w| !w.retiring).count() + self.starting;
        if active >= want || self.failures >= MAX_START_FAILURES {
            return;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        // The backoff is over: a deadline left in the past would wake the loop at once,
        // again and again, until the workers started now are ready (a spin).
        self.retry_at = None;
        for _ in active..want {
            self.starting += 1;
            let id = self.next_worker;
            self.next_worker += 1;
            self.backend.start(id, self.events_tx.clone());
        }
    }

    /// Removes worker `idx`: its running task fails with `head_err`, the tasks queued
    /// behind it go back to the front of the queue.
    fn remove_worker(&mut self, idx: usize, head_err: Option<Error>) -> Worker<W::Conn> {
        let mut w = self.workers.swap_remove(idx);
        // A head still staging never reached the worker: it goes back with the rest.
        let head_sent = w.inflight.front().is_some_and(|id| {
            self.tasks
                .get(id)
                .is_none_or(|t| !matches!(t.state, State::Staging))
        });
        if head_sent
            && let Some(head) = w.inflight.pop_front()
            && let Some(task) = self.tasks.remove(&head)
            && !task.cancelled
        {
            self.counts.running -= 1;
            self.counts.failed += 1;
            if let (Some(reply), Some(err)) = (task.reply, head_err) {
                reply.send(Err(err));
            }
        }
        for id in w.inflight.drain(..).rev() {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            if task.cancelled {
                self.tasks.remove(&id);
                continue;
            }
            task.state = State::Queued;
            self.counts.running -= 1;
            self.counts.queued += 1;
            self.pending.push_front(id);
        }
        w
    }

    /// Stops worker `idx` (SIGTERM to its group, grace, SIGKILL) and forgets it; a
    /// replacement is started by `maintain`.
    fn stop_worker(&mut self, idx: usize, head_err: Option<Error>) {
        let w = self.remove_worker(idx, head_err);
        self.counts.restarts += 1;
        self.dying += 1;
        self.backend.stop(w.conn, self.events_tx.clone());
    }

    fn head_deadline(&self, w: &Worker<W::Conn>) -> Option<(Instant, bool)> {
        let since = w.head_since?;
        let head = w.inflight.front()?;
        let cancelled = self.tasks.get(head).is_none_or(|t| t.cancelled);
        let limit = if cancelled {
            SKIP_GRACE
        } else {
            self.cfg.task_timeout?
        };
        Some((since + limit, cancelled))
    }

    fn next_deadline(&self) -> Option<Instant> {
        let heads = self.workers.iter().filter_map(|w| self.head_deadline(w));
        let retry = self.retry_at.filter(|_| self.failures < MAX_START_FAILURES);
        let recall = self.recall_candidate().map(|(_, at)| at);
        heads.map(|(at, _)| at).chain(retry).chain(recall).min()
    }

    // ------------------------------------------------------------- closing down

    fn shut_idle_workers_when_closing(&mut self) {
        if self.closing.is_none() || self.counts.queued > 0 {
            return;
        }
        for w in &mut self.workers {
            if !w.retiring && w.inflight.is_empty() {
                w.retiring = true;
                w.conn.shutdown();
            }
        }
    }

    fn closed_down(&self) -> bool {
        self.closing.is_some()
            && self.counts.queued == 0
            && self.workers.is_empty()
            && self.starting == 0
    }

    /// Kills every worker, fails every outstanding task with `PoolClosed`, waits until
    /// every worker is reaped.
    async fn terminate(mut self, done: Option<oneshot::Sender<()>>) {
        // Tasks that finished before the order came keep their answers.
        self.deliver_answers();
        for (_, task) in self.tasks.drain() {
            if let (false, Some(reply)) = (task.cancelled, task.reply) {
                self.counts.cancelled += 1;
                reply.send(Err(Error::PoolClosed));
            }
        }
        self.pending.clear();
        self.counts.queued = 0;
        self.counts.running = 0;
        let mut conns: Vec<W::Conn> = self.workers.drain(..).map(|w| w.conn).collect();
        // Workers still starting: refuse their Ready (their start task then kills them),
        // and take the ones already reported.
        self.events.close();
        while let Some(ev) = self.events.recv().await {
            if let Event::Ready(conn) = ev {
                conns.push(conn);
            }
        }
        self.backend.kill_all(conns).await;
        self.publish_stats();
        if let Some(done) = done {
            done.send(()).ok();
        }
        for done in self.closing.take().unwrap_or_default() {
            done.send(()).ok();
        }
    }

    fn publish_stats(&self) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        *s = PoolStats {
            workers: self.workers.len(),
            idle: self
                .workers
                .iter()
                .filter(|w| !w.retiring && w.inflight.is_empty())
                .count(),
            queued: self.counts.queued,
            running: self.counts.running,
            submitted: self.counts.submitted,
            completed: self.counts.completed,
            failed: self.counts.failed,
            cancelled: self.counts.cancelled,
            restarts: self.counts.restarts,
            start_failures: self.counts.start_failures,
            taken_back: self.counts.taken_back,
        };
    }
}

impl<C: Conn> Worker<C> {
    fn new(conn: C) -> Self {
        Worker {
            conn,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            head_since: None,
            assigned: 0,
            retiring: false,
            sent: 0,
            recalling: false,
            staging: false,
            shutdown_after_staging: false,
        }
    }
}

#[cfg(test)]
mod hash_tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn task_ids_keep_their_order_in_the_low_bits_and_differ_in_the_top_bits() {
        let h = BuildHasherDefault::<IdHasher>::default();
        let low = u64::MAX >> 7;
        let tops: std::collections::HashSet<u64> =
            (1000..1016u64).map(|id| h.hash_one(id) >> 57).collect();
        for id in [0u64, 1, 2, 99_999, 1 << 40] {
            assert_eq!(h.hash_one(id) & low, id & low, "bucket bits of {id}");
        }
        assert!(tops.len() > 8, "16 neighbours share top bits: {tops:?}");
    }
}
