//! An in-process fake of the pool's workers, behind the same seam as processes
//! (`pool::seam`), for testing the dispatcher under `tokio::time::pause()`.
//!
//! Each fake worker is a task that behaves as a worker process does: it runs the tasks
//! it is sent in order (each says how long it takes and how it ends, see [`Script`]),
//! skips the ones it is told to skip, answers recalls at once even while a task runs,
//! exits after `Shutdown` or when its connection is dropped, and dies when killed.
//! Everything it does is noted in a shared [`World`], with the (paused) time.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Error, ExitReason};
use crate::pool::PoolStats;
use crate::pool::message::{Args, Command, Job, Reply, TaskResult};
use crate::pool::seam::{Conn, Event, Events, Workers};
use crate::target::TargetRef;
use crate::wire::Outcome;

use super::Config;

/// What a fake task does: runs this long, then ends so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Script {
    /// Returns its task id.
    Value(Duration),
    Panic(Duration),
    /// Its worker dies (SIGSEGV) after this long.
    Crash(Duration),
    /// Runs until its worker is killed.
    Hang,
}

impl Script {
    fn encode(self) -> Args {
        let (kind, d) = match self {
            Script::Value(d) => (0u8, d),
            Script::Panic(d) => (1, d),
            Script::Crash(d) => (2, d),
            Script::Hang => (3, Duration::ZERO),
        };
        let mut b = vec![kind];
        b.extend_from_slice(
            &u64::try_from(d.as_nanos())
                .unwrap_or(u64::MAX)
                .to_le_bytes(),
        );
        Args::from(Bytes::from(b))
    }

    fn decode(args: &Args) -> Script {
        let b = &args.body;
        let nanos = u64::from_le_bytes(b[1..9].try_into().expect("9 bytes"));
        let d = Duration::from_nanos(nanos);
        match b[0] {
            0 => Script::Value(d),
            1 => Script::Panic(d),
            2 => Script::Crash(d),
            _ => Script::Hang,
        }
    }
}

/// A short task.
pub(super) fn ms(n: u64) -> Script {
    Script::Value(Duration::from_millis(n))
}

/// What happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Note {
    /// Worker `0` was asked to start (counting every attempt).
    Starting(u64),
    Ready(u64),
    /// Worker `.0` was sent task `.1` (at the flush that wrote it).
    Received(u64, u64),
    Ran(u64, u64),
    Skipped(u64, u64),
    /// Worker `.0` gave back its tasks `after + 1 ..= upto` (numbers as sent).
    GaveBack(u64, u64, u64),
    Shutdown(u64),
    /// Worker `.0` was asked to stop (SIGTERM).
    Stopping(u64),
    Exited(u64, ExitReason),
}

/// What the fake workers do, and what they did.
#[derive(Debug)]
pub(super) struct World {
    pub(super) epoch: Instant,
    pub(super) log: Vec<(Duration, Note)>,
    /// How long a worker takes to be ready.
    pub(super) start_delay: Duration,
    /// This many of the next starts fail.
    pub(super) fail_starts: u32,
    /// Workers (by id) that die right after they are ready.
    pub(super) die_after_ready: HashSet<u64>,
    /// Workers ignore `Skip` (as if it came after they started the task).
    pub(super) ignore_skips: bool,
    /// What a worker's resident set is, in bytes.
    pub(super) rss: u64,
    /// Tasks running now, on any worker, and the most at once.
    pub(super) running: usize,
    pub(super) max_running: usize,
}

impl Default for World {
    fn default() -> Self {
        World {
            epoch: Instant::now(),
            log: Vec::new(),
            start_delay: Duration::from_millis(1),
            fail_starts: 0,
            die_after_ready: HashSet::new(),
            ignore_skips: false,
            rss: 1 << 20,
            running: 0,
            max_running: 0,
        }
    }
}

impl World {
    fn note(&mut self, n: Note) {
        self.log.push((self.epoch.elapsed(), n));
    }

    /// When `n` happened first.
    pub(super) fn when(&self, n: &Note) -> Option<Duration> {
        self.log.iter().find(|(_, x)| x == n).map(|(t, _)| *t)
    }

    pub(super) fn count(&self, f: impl Fn(&Note) -> bool) -> usize {
        self.log.iter().filter(|(_, n)| f(n)).count()
    }

    /// The worker that ran task `id`.
    pub(super) fn ran_on(&self, id: u64) -> Option<u64> {
        self.log.iter().find_map(|(_, n)| match *n {
            Note::Ran(w, t) if t == id => Some(w),
            _ => None,
        })
    }
}

pub(super) type Shared = Arc<Mutex<World>>;

pub(super) fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
enum Msg {
    Run(u64, Script),
    Skip(u64),
    Shutdown,
}

/// A fake worker's connection.
#[derive(Debug)]
pub(super) struct FakeConn {
    id: u64,
    name: Arc<str>,
    world: Shared,
    /// Frames queued until `flush`.
    queued: Mutex<Vec<Msg>>,
    tx: mpsc::UnboundedSender<Msg>,
    recalls: mpsc::UnboundedSender<u64>,
    kill: Option<oneshot::Sender<()>>,
    ended: Option<tokio::task::JoinHandle<()>>,
}

impl FakeConn {
    fn queue(&self, m: Msg) {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(m);
    }
}

impl Conn for FakeConn {
    fn id(&self) -> u64 {
        self.id
    }

    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn pid(&self) -> u32 {
        u32::try_from(self.id).unwrap_or(u32::MAX) + 1000
    }

    fn run(&self, id: u64, _: TargetRef, args: &Args) -> Result<(), Error> {
        self.queue(Msg::Run(id, Script::decode(args)));
        Ok(())
    }

    fn stage(&self, id: u64, target: TargetRef, args: Args, events: Events<Self>) {
        let result = self.run(id, target, &args);
        let worker = self.id;
        events.send(Event::Staged { worker, id, result }).ok();
    }

    fn skip(&self, id: u64) {
        self.queue(Msg::Skip(id));
    }

    fn shutdown(&self) {
        self.queue(Msg::Shutdown);
    }

    fn recall(&self, upto: u64) -> bool {
        self.recalls.send(upto).is_ok()
    }

    fn answered(&self, _: u64) {}

    fn release_buffers(&self) {}

    fn flush(&self) {
        let msgs = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|p| p.into_inner()));
        for m in msgs {
            if let Msg::Run(task, _) = m {
                lock(&self.world).note(Note::Received(self.id, task));
            }
            // Err: the worker is gone; the dispatcher hears of it from its events.
            self.tx.send(m).ok();
        }
    }

    fn resident_bytes(&self) -> Option<u64> {
        Some(lock(&self.world).rss)
    }
}

impl Drop for FakeConn {
    fn drop(&mut self) {
        // Queued frames are written; then the channel closes.
        self.flush();
    }
}

/// Starts fake workers that live in `world`.
#[derive(Debug, Clone)]
pub(super) struct Fakes(pub(super) Shared);

impl Workers for Fakes {
    type Conn = FakeConn;

    fn start(&self, id: u64, events: Events<FakeConn>) {
        let world = Arc::clone(&self.0);
        lock(&world).note(Note::Starting(id));
        tokio::spawn(async move {
            let delay = lock(&world).start_delay;
            tokio::time::sleep(delay).await;
            let fail = {
                let mut w = lock(&world);
                let fail = w.fail_starts > 0;
                w.fail_starts = w.fail_starts.saturating_sub(1);
                fail
            };
            if fail {
                events
                    .send(Event::Failed(Error::spawn("fake start failure", None)))
                    .ok();
                return;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let (recalls, recall_rx) = mpsc::unbounded_channel();
            let (kill, killed) = oneshot::channel();
            let name: Arc<str> = format!("FakeWorker-{id}").into();
            let die = lock(&world).die_after_ready.contains(&id);
            let sim = Sim {
                id,
                world: Arc::clone(&world),
                events: events.clone(),
                rx,
                recalls: recall_rx,
                queue: VecDeque::new(),
                received: 0,
                started: 0,
                revoked: Vec::new(),
                skips: HashSet::new(),
            };
            let ended = tokio::spawn(sim.run(killed, die));
            lock(&world).note(Note::Ready(id));
            let conn = FakeConn {
                id,
                name,
                world,
                queued: Mutex::default(),
                tx,
                recalls,
                kill: Some(kill),
                ended: Some(ended),
            };
            // Err: the pool is gone; dropping the connection ends the worker.
            events.send(Event::Ready(conn)).ok();
        });
    }

    fn stop(&self, mut conn: FakeConn, events: Events<FakeConn>) {
        lock(&self.0).note(Note::Stopping(conn.id));
        let (kill, ended) = (conn.kill.take(), conn.ended.take());
        drop(conn);
        tokio::spawn(async move {
            if let Some(kill) = kill {
                kill.send(()).ok();
            }
            if let Some(ended) = ended {
                ended.await.ok();
            }
            events.send(Event::Stopped).ok();
        });
    }

    async fn kill_all(&self, conns: Vec<FakeConn>) {
        let mut ends = Vec::new();
        for mut c in conns {
            if let Some(kill) = c.kill.take() {
                kill.send(()).ok();
            }
            ends.extend(c.ended.take());
        }
        for e in ends {
            e.await.ok();
        }
    }
}

enum Queued {
    Run { seq: u64, id: u64, script: Script },
    Shutdown,
}

/// A fake worker's process.
struct Sim {
    id: u64,
    world: Shared,
    events: Events<FakeConn>,
    rx: mpsc::UnboundedReceiver<Msg>,
    recalls: mpsc::UnboundedReceiver<u64>,
    queue: VecDeque<Queued>,
    /// Tasks received so far (the number of the last).
    received: u64,
    started: u64,
    revoked: Vec<(u64, u64)>,
    skips: HashSet<u64>,
}

/// Why a fake worker stopped waiting.
enum Wake {
    Done,
    Exit(ExitReason),
}

impl Sim {
    async fn run(mut self, mut killed: oneshot::Receiver<()>, die: bool) {
        let exit = if die {
            ExitReason::Signal(11)
        } else {
            self.serve(&mut killed).await
        };
        {
            let mut w = lock(&self.world);
            w.note(Note::Exited(self.id, exit));
        }
        let gone = Event::Gone {
            worker: self.id,
            exit,
            protocol: None,
        };
        self.events.send(gone).ok();
    }

    async fn serve(&mut self, killed: &mut oneshot::Receiver<()>) -> ExitReason {
        loop {
            let Some(next) = self.queue.pop_front() else {
                if let Wake::Exit(e) = self.wait(None, killed).await {
                    return e;
                }
                continue;
            };
            let (seq, id, script) = match next {
                Queued::Shutdown => {
                    lock(&self.world).note(Note::Shutdown(self.id));
                    return ExitReason::Code(0);
                }
                Queued::Run { seq, id, script } => (seq, id, script),
            };
            if self.revoked.iter().any(|&(lo, hi)| lo < seq && seq <= hi) {
                continue; // given back: it runs elsewhere
            }
            self.started = seq;
            let ignore = lock(&self.world).ignore_skips;
            if self.skips.remove(&id) && !ignore {
                lock(&self.world).note(Note::Skipped(self.id, id));
                self.answer(id, Outcome::Skipped);
                continue;
            }
            {
                let mut w = lock(&self.world);
                w.note(Note::Ran(self.id, id));
                w.running += 1;
                w.max_running = w.max_running.max(w.running);
            }
            let end = match script {
                Script::Value(d) | Script::Panic(d) | Script::Crash(d) => Some(Instant::now() + d),
                Script::Hang => None,
            };
            let woke = self.wait(Some(end), killed).await;
            lock(&self.world).running -= 1;
            match (woke, script) {
                (Wake::Exit(e), _) => return e,
                (Wake::Done, Script::Crash(_)) => return ExitReason::Signal(11),
                (Wake::Done, Script::Panic(_)) => self.answer(
                    id,
                    Outcome::Panicked {
                        message: "fake panic".into(),
                        location: None,
                    },
                ),
                (Wake::Done, _) => self.answer(
                    id,
                    Outcome::Value(serde_bytes::ByteBuf::from(id.to_le_bytes().to_vec())),
                ),
            }
        }
    }

    fn answer(&self, id: u64, outcome: Outcome) {
        let done = Event::Done {
            worker: self.id,
            id,
            outcome,
        };
        self.events.send(done).ok();
    }

    /// Takes frames and recalls until `until` (`Some(None)`: never; `None`: the next
    /// frame), or until the worker must exit.
    async fn wait(
        &mut self,
        until: Option<Option<Instant>>,
        killed: &mut oneshot::Receiver<()>,
    ) -> Wake {
        loop {
            let sleep = async {
                match until {
                    Some(Some(at)) => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut *killed => return Wake::Exit(ExitReason::Signal(15)),
                upto = self.recalls.recv() => {
                    if let Some(upto) = upto {
                        let after = self.started.min(upto);
                        if after < upto {
                            self.revoked.push((after, upto));
                        }
                        lock(&self.world).note(Note::GaveBack(self.id, after, upto));
                        let back = Event::Recalled { worker: self.id, after, upto };
                        self.events.send(back).ok();
                    }
                }
                msg = self.rx.recv() => {
                    let Some(msg) = msg else {
                        // The parent hung up.
                        return Wake::Exit(ExitReason::Code(0));
                    };
                    match msg {
                        Msg::Run(id, script) => {
                            self.received += 1;
                            let seq = self.received;
                            self.queue.push_back(Queued::Run { seq, id, script });
                        }
                        Msg::Skip(id) => {
                            self.skips.insert(id);
                        }
                        Msg::Shutdown => self.queue.push_back(Queued::Shutdown),
                    }
                    if until.is_none() {
                        return Wake::Done;
                    }
                }
                () = sleep => return Wake::Done,
            }
        }
    }
}

/// A dispatcher over fake workers, and a caller's side of it.
pub(super) struct Pool {
    pub(super) world: Shared,
    tx: mpsc::UnboundedSender<Command>,
    next: u64,
    stats: Arc<Mutex<PoolStats>>,
    pub(super) run: tokio::task::JoinHandle<()>,
    /// The next submitted task's `run_timeout` (see [`Pool::run_timeout`]).
    run_timeout: Option<Duration>,
}

/// A configuration with the builder's defaults and `processes` workers.
pub(super) fn config(processes: usize) -> Config {
    Config {
        processes,
        max_tasks_per_child: None,
        max_memory_per_child: None,
        task_timeout: None,
        pipeline: 64,
        kill_on_cancel: true,
    }
}

impl Pool {
    /// Starts the workers as `Builder::build` does, then the dispatcher.
    pub(super) async fn build(cfg: Config, world: World) -> Result<Pool, Error> {
        Pool::build_in(cfg, Arc::new(Mutex::new(world))).await
    }

    /// As [`build`](Self::build), in a world the caller keeps.
    pub(super) async fn build_in(cfg: Config, world: Shared) -> Result<Pool, Error> {
        let backend = Fakes(Arc::clone(&world));
        let admission = Arc::new(tokio::sync::Semaphore::new(1000));
        let super::Launched {
            dispatcher,
            commands: tx,
            stats,
        } = super::launch(cfg, backend, admission).await?;
        Ok(Pool {
            world,
            tx,
            next: 1,
            stats,
            run: tokio::spawn(dispatcher.run()),
            run_timeout: None,
        })
    }

    pub(super) async fn new(cfg: Config) -> Pool {
        Pool::build(cfg, World::default()).await.expect("fake pool")
    }

    pub(super) fn world(&self) -> std::sync::MutexGuard<'_, World> {
        lock(&self.world)
    }

    fn send(&mut self, script: Script, reply: impl FnOnce(u64) -> Reply) -> u64 {
        let id = self.next;
        self.next += 1;
        let job = Job {
            id,
            target: TargetRef {
                offset: 0,
                name: "fake",
            },
            args: script.encode(),
            reply: reply(id),
            admitted: false,
            run_timeout: self.run_timeout.take(),
            span: None,
        };
        self.tx
            .send(Command::Submit(job))
            .expect("dispatcher alive");
        id
    }

    /// Submits a task; its answer comes on the receiver.
    pub(super) fn submit(&mut self, script: Script) -> (u64, oneshot::Receiver<TaskResult>) {
        let (tx, rx) = oneshot::channel();
        let id = self.send(script, |_| Reply::One {
            tx,
            pins: crate::sync::Pins::default(),
        });
        (id, rx)
    }

    /// Submits a task answered on a shared channel (as a map's chunks are).
    pub(super) fn submit_many(
        &mut self,
        script: Script,
        tx: &mpsc::UnboundedSender<(u64, TaskResult)>,
    ) -> u64 {
        let tx = tx.clone();
        self.send(script, |id| Reply::Many { key: id, tx })
    }

    /// Gives the next task submitted its own execution limit.
    pub(super) fn run_timeout(&mut self, d: Duration) -> &mut Self {
        self.run_timeout = Some(d);
        self
    }

    /// Sets task `id`'s execution limit after it was submitted.
    pub(super) fn set_run_timeout(&self, id: u64, after: Duration) {
        self.tx.send(Command::RunTimeout { id, after }).ok();
    }

    pub(super) fn cancel(&self, id: u64) {
        self.tx.send(Command::Cancel { id, kill: None }).ok();
    }

    /// Cancels task `id` with the call's own choice of stopping its worker if it runs.
    pub(super) fn cancel_with(&self, id: u64, kill: bool) {
        self.tx
            .send(Command::Cancel {
                id,
                kill: Some(kill),
            })
            .ok();
    }

    /// Asks the pool to close; the receiver answers when it has.
    pub(super) fn close(&self) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Close { done }).ok();
        rx
    }

    pub(super) fn terminate(&self) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Terminate { done }).ok();
        rx
    }

    pub(super) fn stats(&self) -> PoolStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets every task that can run, run, without moving the clock.
pub(super) async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// A task's value (its id), or what it failed with.
pub(super) fn value(r: Result<TaskResult, oneshot::error::RecvError>) -> Result<u64, Error> {
    let done = r.map_err(|_| Error::PoolClosed)??;
    match done.outcome {
        Outcome::Value(b) => Ok(u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))),
        other => Err(Error::Protocol {
            name: done.worker.to_string(),
            reason: format!("{other:?}"),
        }),
    }
}
