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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::PoolStats;
use super::message::{Args, Command, Job, Reply, TaskResult};
use super::seam::{Conn, Event, Events, Workers};
use crate::error::Error;
use crate::target::TargetRef;
use ids::IdMap;

mod events;
#[cfg(test)]
mod fake;
mod ids;
mod schedule;
mod startup;
#[cfg(test)]
mod tests;
pub(crate) use startup::{Launched, launch};

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
    /// Whether dropping a running task stops its worker (else it finishes, unheard).
    pub(crate) kill_on_cancel: bool,
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
    /// Cancelled without kill (`kill_on_cancel` off): if its worker runs it, it runs to
    /// its end or its time limit, not only to the skip grace.
    kept: bool,
    /// Its number among the tasks sent to its worker (see `Worker::sent`), once sent.
    seq: u64,
    /// Its own execution limit, in place of `Config::task_timeout`.
    run_timeout: Option<Duration>,
    /// The span it was submitted in, for its events, registered as long as it is here.
    _span: Option<crate::log::TaskSpan>,
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
            Command::Cancel { id, kill } => self.cancel(id, kill),
            Command::RunTimeout { id, after } => {
                // Gone: it finished (or was cancelled) first, and needs no limit.
                if let Some(task) = self.tasks.get_mut(&id) {
                    task.run_timeout = Some(after);
                }
            }
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
                kept: false,
                seq: 0,
                run_timeout: job.run_timeout,
                _span: job.span,
            },
        );
        self.pending.push_back(job.id);
    }

    /// The caller of task `id` gave up; `kill`: whether a running one has its worker
    /// stopped (`None`: the pool's `kill_on_cancel`).
    fn cancel(&mut self, id: u64, kill: Option<bool>) {
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
                let kill = kill.unwrap_or(self.cfg.kill_on_cancel);
                self.counts.running -= 1;
                task.cancelled = true;
                task.kept = !kill;
                task.reply = None;
                let Some(idx) = self.workers.iter().position(|w| w.inflight.contains(&id)) else {
                    self.tasks.remove(&id);
                    return;
                };
                if self.workers[idx].inflight.front() == Some(&id) && !kill {
                    // Running, and the pool keeps its workers: it finishes, its answer
                    // goes nowhere (`on_done` drops what a cancelled task gives).
                    tracing::debug!(task = id, worker = %self.workers[idx].conn.name(),
                        "task cancelled; left to finish, its result dropped");
                } else if self.workers[idx].inflight.front() == Some(&id) {
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

    /// Hands callers the answers of this round. Callers hear of finished tasks after the
    /// workers got their next ones, and all at once: a caller awaiting several wakes
    /// once per round, not once per task.
    fn deliver_answers(&mut self) {
        for (reply, res) in self.answers.drain(..) {
            reply.send(res);
        }
    }

    // ------------------------------------------------------------------- workers

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
