//! The parent's side of a remote pool: a dispatcher that takes the same
//! [`Command`]s as the local one and answers the same [`Reply`]s, with tasks written to
//! its build's stream and results read from its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};

use super::fingerprint::fingerprint;
use super::frame::{self, Keys, ResultFrame, TaskFrame};
use super::{Con, Redis, backend};

use crate::error::{Error, Result};
use crate::pool::PoolStats;
use crate::pool::message::{Command, Job, Reply};

/// What the builder decided for a remote pool.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) wait_for_nodes: Duration,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) retries: u32,
}

/// A running remote pool's handles: where commands go, its stats, and how many
/// worker processes its nodes had when it started.
pub(crate) struct Launched {
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) stats: Arc<Mutex<PoolStats>>,
    pub(crate) processes: usize,
}

/// Connects, waits for a node of this build, and starts the dispatcher, all on
/// procpool's remote pools' thread (`run_remote`): the connections' drivers run there, not on the caller's
/// runtime, so the pool serves callers that block their thread or whose runtime is gone.
///
/// # Errors
///
/// [`Error::InvalidConfig`] without a key; [`Error::Backend`] if Redis cannot be
/// reached; [`Error::NoCompatibleNodes`] if no node of this build registered within
/// `wait_for_nodes`.
///
/// # Cancel safety
///
/// Cancel safe: dropped, the start stops where it is and nothing is left running.
pub(crate) async fn launch(
    redis: Redis,
    opts: Options,
    admission: Arc<tokio::sync::Semaphore>,
) -> Result<Launched> {
    let (mut tx, rx) = oneshot::channel();
    crate::runtime::service::run_remote(async move {
        let started = tokio::select! {
            r = start(redis, opts, admission) => r,
            () = tx.closed() => return, // the build was dropped
        };
        match started {
            Ok((launched, dispatcher, reader)) => {
                if tx.send(Ok(launched)).is_ok() {
                    tokio::spawn(reader);
                    // Tasks of nodes that all died are answered too: parents reap.
                    let reaper = super::reaper::Reaper {
                        keys: dispatcher.keys.clone(),
                        build: dispatcher.build,
                        key: Arc::clone(&dispatcher.key),
                        me: format!("reaper-{}", dispatcher.parent),
                    };
                    let reaping = tokio::spawn(reaper.run(dispatcher.con.clone()));
                    let alive_key = dispatcher.keys.parent(&dispatcher.parent);
                    let mut con = dispatcher.con.clone();
                    let alive = tokio::spawn(keep_alive(con.clone(), alive_key.clone()));
                    dispatcher.run().await;
                    reaping.abort();
                    alive.abort();
                    let gone: redis::RedisResult<i64> = redis::cmd("DEL")
                        .arg(&alive_key)
                        .query_async(&mut con)
                        .await;
                    if let Err(e) = gone {
                        tracing::debug!(target: "procpool::remote", "cannot remove the parent's key: {e}");
                    }
                }
            }
            Err(e) => drop(tx.send(Err(e))),
        }
    })?;
    rx.await.unwrap_or(Err(Error::PoolClosed))
}

/// Says this parent is alive (its key, for 3 s) every second until dropped; a parent
/// that dies, even by SIGKILL, is seen gone by its nodes within 3 s.
async fn keep_alive(mut con: Con, key: String) {
    loop {
        tokio::time::sleep(super::reaper::HEARTBEAT).await;
        let set: redis::RedisResult<()> = super::again_once(&mut con, &alive(&key)).await;
        if let Err(e) = set {
            tracing::warn!(target: "procpool::remote", "cannot renew the parent's key: {e}");
        }
    }
}

/// The command that says parent key `key` is alive for the next 3 s.
fn alive(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(1)
        .arg("PX")
        .arg(u64::try_from(super::reaper::LOST_AFTER.as_millis()).unwrap_or(3000));
    cmd
}

/// The parts of a started remote pool: its handles, its dispatcher, its result reader.
type Started = (
    Launched,
    RemoteDispatcher,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
);

async fn start(
    redis: Redis,
    opts: Options,
    admission: Arc<tokio::sync::Semaphore>,
) -> Result<Started> {
    let key = redis.load_key()?;
    let build = fingerprint().map_err(|reason| Error::spawn(reason, None))?;
    let client =
        redis::Client::open(redis.url.as_str()).map_err(|e| backend("bad Redis URL", e))?;
    let mut con = super::connect(&client).await?;
    let mut reader = super::connect_blocking(&client).await?;
    let server = run_id(&mut reader)
        .await
        .map_err(|e| backend("cannot ask Redis who it is", e))?;
    let keys = Keys::new(&redis.namespace);
    let processes = wait_for_nodes(&mut con, &keys, build, opts.wait_for_nodes).await?;
    let parent = frame::random_id();
    // Alive before its first task is written (see `keep_alive`).
    let _: () = super::again_once(&mut con, &alive(&keys.parent(&parent)))
        .await
        .map_err(|e| backend("cannot register the parent", e))?;
    let (commands, cmds) = mpsc::unbounded_channel();
    let (results_tx, results) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(PoolStats {
        workers: processes,
        idle: processes,
        ..PoolStats::default()
    }));
    let d = RemoteDispatcher {
        key: Arc::new(key),
        keys,
        build,
        parent,
        opts,
        con,
        cmds,
        results,
        inflight: HashMap::new(),
        waiting: std::collections::VecDeque::new(),
        jobs: HashMap::new(),
        window: window_for(processes),
        paused: None,
        pause: WRITE_PAUSE,
        failing_since: None,
        stats: Arc::clone(&stats),
        counts: PoolStats::default(),
        closing: Vec::new(),
        admission,
    };
    let read = Box::pin(
        Reader {
            client,
            con: Some(reader),
            server,
            stream: d.keys.results(&d.parent),
            key: Arc::clone(&d.key),
            out: results_tx,
        }
        .run(),
    );
    let launched = Launched {
        commands,
        stats,
        processes,
    };
    Ok((launched, d, read))
}

/// The worker processes of the live nodes of `build`, once there is one; polled every
/// 50 ms until `wait`.
async fn wait_for_nodes(con: &mut Con, keys: &Keys, build: &str, wait: Duration) -> Result<usize> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys.nodes(build))
            .arg(frame::now_ms())
            .arg("+inf")
            .query_async(con)
            .await
            .map_err(|e| backend("cannot list nodes", e))?;
        let processes: usize = live
            .iter()
            .filter_map(|m| m.rsplit_once('/')?.1.parse::<usize>().ok())
            .sum();
        if !live.is_empty() {
            return Ok(processes.max(1));
        }
        if tokio::time::Instant::now() >= until {
            return Err(Error::NoCompatibleNodes {
                build: build.to_owned(),
                waited: wait,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many of a pool's tasks are in Redis at most (queued or running there, see
/// [`window_for`]); the others wait in the pool, in order. A pool that submits a
/// million tasks holds them in its own memory (as a local pool does), not in Redis's,
/// and a node still finds more queued than it can take.
const WINDOW: usize = 4096;

/// How long the dispatcher waits after a failed write before it writes again.
const WRITE_PAUSE: Duration = Duration::from_millis(200);

/// A round trip takes no more tasks once their arguments reach this size.
const WRITE_BATCH_BYTES: usize = 4 << 20;

/// How a write of tasks went.
enum Wrote {
    All,
    /// No task of the batch could be framed: Redis was not asked.
    Nothing,
    /// Redis answered with an error.
    Refused,
    /// Redis could not be reached.
    Unreachable,
}

/// At most this many tasks are written in one round trip.
const WRITE_BATCH: usize = 256;

/// The window of a pool whose nodes had `processes` workers when it started: at least
/// twice what they can hold (a node holds up to 128 tasks per worker), and [`WINDOW`].
fn window_for(processes: usize) -> usize {
    WINDOW.max(processes.saturating_mul(256))
}

/// The largest arguments a remote task takes: Redis's default `proto-max-bulk-len`
/// (512 MiB, the most one stream field holds) less room for the rest of the frame.
const MAX_REMOTE_ARGS: usize = (512 << 20) - (64 << 10);

/// What the result reader tells the dispatcher.
enum FromReader {
    /// A verified result.
    Result(ResultFrame),
    /// Redis has been unreachable for [`RECONNECT_WINDOW`]: what is in flight fails.
    Unreachable(Error),
    /// Redis came back as another server (it restarted: a new `run_id`), which may have
    /// lost the tasks in flight and their results: they fail, and are cancelled.
    Restarted,
}

/// How long the pool waits for an unreachable Redis before failing the tasks in flight
/// (the reaper's threshold: by then a node that cannot reach it has stopped).
const RECONNECT_WINDOW: Duration = super::reaper::LOST_AFTER;

/// The `run_id` of the server behind `con` (it changes when Redis restarts).
async fn run_id(con: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(con).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// Reads this parent's result stream, drops what fails its MAC, and hands the rest to
/// the dispatcher; read entries are deleted. Reconnects while Redis is unreachable.
/// Ends when the dispatcher does.
struct Reader {
    client: redis::Client,
    con: Option<redis::aio::MultiplexedConnection>,
    /// The `run_id` of the server the pool started with, or last reconnected to.
    server: String,
    stream: String,
    key: Arc<Vec<u8>>,
    out: mpsc::UnboundedSender<FromReader>,
}

impl Reader {
    async fn run(mut self) {
        let mut last = "0".to_owned();
        // Results read and not yet deleted: deleted in the same round trip as the next
        // read (one wake-up of Redis and of this thread per read, not two).
        let mut read_ids: Vec<String> = Vec::new();
        'reading: loop {
            let Some(con) = self.con.as_mut() else {
                let out = self.out.clone();
                tokio::select! {
                    () = self.reconnect() => continue,
                    () = out.closed() => break,
                }
            };
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(1024)
                .arg("BLOCK")
                .arg(super::BLOCK.as_millis().to_string())
                .arg("STREAMS")
                .arg(&self.stream)
                .arg(&last);
            // Each command's own answer: a deletion refused does not cost the read.
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let deleting = !read_ids.is_empty();
            if deleting {
                pipe.cmd("XDEL").arg(&self.stream).arg(&read_ids);
            }
            pipe.add_command(cmd);
            let read = pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(con);
            let replies = tokio::select! {
                r = read => r,
                () = self.out.closed() => break,
            };
            let reply = replies.and_then(|mut replies| {
                let read = replies.pop();
                if deleting {
                    if let Some(Err(e)) = replies.pop() {
                        tracing::debug!(target: "procpool::remote", "cannot delete read results: {e}");
                    }
                    read_ids.clear();
                }
                let read = read.unwrap_or_else(|| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "no answer to the read",
                    )))
                })?;
                Ok(<Option<redis::streams::StreamReadReply> as redis::FromRedisValue>::from_redis_value(read)?)
            });
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(target: "procpool::remote", "cannot read results: {e}; reconnecting");
                    self.con = None;
                    continue;
                }
            };
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                let (f, m) = (entry.get::<Vec<u8>>("f"), entry.get::<Vec<u8>>("m"));
                last.clone_from(&entry.id);
                read_ids.push(entry.id);
                let Some((f, m)) = f.zip(m) else {
                    tracing::warn!(target: "procpool::remote", "a result without its frame or MAC was dropped");
                    continue;
                };
                if !frame::verify(&self.key, &f, &m) {
                    tracing::warn!(target: "procpool::remote", "a result that failed its MAC was dropped");
                    continue;
                }
                match frame::decode::<ResultFrame>(&f) {
                    Ok(mut r) => {
                        let span = crate::log::span_of(Some(r.task));
                        reemit(span.as_ref(), &r.worker, std::mem::take(&mut r.events));
                        if self.out.send(FromReader::Result(r)).is_err() {
                            break 'reading; // the dispatcher is gone
                        }
                    }
                    Err(e) => {
                        tracing::warn!(target: "procpool::remote", "a result was dropped: {e}")
                    }
                }
            }
        }
        if let Some(con) = self.con.as_mut() {
            let del: redis::RedisResult<i64> =
                redis::cmd("DEL").arg(&self.stream).query_async(con).await;
            if let Err(e) = del {
                tracing::debug!(target: "procpool::remote", "cannot delete the result stream: {e}");
            }
        }
    }

    /// Connects again, every 100 ms; past [`RECONNECT_WINDOW`] the dispatcher fails what
    /// is in flight (once), and the reader keeps trying, for the tasks submitted later.
    /// A server with another `run_id` restarted: the dispatcher hears it.
    async fn reconnect(&mut self) {
        let since = tokio::time::Instant::now();
        let mut told = false;
        loop {
            let connected = match super::connect_blocking(&self.client).await {
                Ok(mut c) => run_id(&mut c)
                    .await
                    .map(|id| (c, id))
                    .map_err(|e| backend("", e)),
                Err(e) => Err(e),
            };
            match connected {
                Ok((c, id)) => {
                    tracing::info!(target: "procpool::remote", "reconnected to Redis");
                    if id != self.server {
                        self.server = id;
                        self.out.send(FromReader::Restarted).ok();
                    }
                    self.con = Some(c);
                    return;
                }
                Err(e) => {
                    if !told && since.elapsed() >= RECONNECT_WINDOW {
                        told = true;
                        let e = Error::Backend {
                            reason: format!(
                                "Redis has been unreachable for {RECONNECT_WINDOW:?} ({e})"
                            ),
                        };
                        self.out.send(FromReader::Unreachable(e)).ok();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct Inflight {
    reply: Reply,
    /// The stream entry, while it may still be queued.
    entry: Option<String>,
    admitted: bool,
    /// The span it was submitted in: its events (which come with its result) are emitted
    /// inside it.
    _span: Option<crate::log::TaskSpan>,
}

struct RemoteDispatcher {
    key: Arc<Vec<u8>>,
    keys: Keys,
    build: &'static str,
    parent: String,
    opts: Options,
    con: Con,
    cmds: mpsc::UnboundedReceiver<Command>,
    results: mpsc::UnboundedReceiver<FromReader>,
    inflight: HashMap<u64, Inflight>,
    /// Tasks submitted and not yet written, in order (see [`WINDOW`]): their ids, and
    /// the tasks by id (one given up while waiting is only taken out of `jobs`).
    waiting: std::collections::VecDeque<u64>,
    jobs: HashMap<u64, Job>,
    /// How many tasks may be in Redis at once.
    window: usize,
    /// A write failed for want of Redis: the waiting tasks are not written before then,
    /// and the next write is of one task. A failed write fails its own tasks (some of
    /// them may be in Redis), so an outage costs one task per pause (200 ms, doubling up
    /// to 2 s), not every task waiting: the others are written once Redis is back, or
    /// fail once the writes have failed for the reconnect window. The dispatcher goes on
    /// hearing cancels, `close` and `terminate` meanwhile. A write Redis refuses (full,
    /// read-only) fails its tasks, and the next goes at once.
    paused: Option<tokio::time::Instant>,
    /// The next pause after a failed write.
    pause: Duration,
    /// Since when every write has failed for want of Redis (see [`Self::paused`]):
    /// past [`RECONNECT_WINDOW`], what waits fails at each failed write.
    failing_since: Option<tokio::time::Instant>,
    stats: Arc<Mutex<PoolStats>>,
    counts: PoolStats,
    closing: Vec<oneshot::Sender<()>>,
    admission: Arc<tokio::sync::Semaphore>,
}

impl RemoteDispatcher {
    async fn run(mut self) {
        loop {
            // After every result that came is handled (below), so that tasks are
            // written in round trips of many, not one per answer.
            if self
                .paused
                .is_some_and(|at| tokio::time::Instant::now() >= at)
            {
                self.paused = None;
            }
            if !self.jobs.is_empty() && self.inflight.len() < self.window && self.paused.is_none() {
                self.write_waiting().await;
            }
            self.publish();
            if !self.closing.is_empty() && self.inflight.is_empty() && self.jobs.is_empty() {
                for done in self.closing.drain(..) {
                    done.send(()).ok();
                }
                return;
            }
            let pause = self.paused;
            tokio::select! {
                () = until(pause) => {}
                cmd = self.cmds.recv() => {
                    let batch = with_queued(cmd, &mut self.cmds, 256);
                    if batch.is_empty() {
                        // Every handle is gone (a detached task's too): as `terminate`.
                        self.cancel_in_flight().await;
                        return self.fail_all(Error::PoolClosed);
                    }
                    if !self.on_commands(batch).await {
                        return;
                    }
                }
                Some(msg) = self.results.recv() => {
                    for msg in with_queued(Some(msg), &mut self.results, 1024) {
                        match msg {
                            FromReader::Result(r) => self.on_result(r),
                            FromReader::Unreachable(e) => self.fail_all(e),
                            FromReader::Restarted => self.on_restart().await,
                        }
                    }
                }
            }
        }
    }

    /// Handles a batch; false once terminated.
    async fn on_commands(&mut self, batch: Vec<Command>) -> bool {
        for cmd in batch {
            match cmd {
                Command::Submit(job) => {
                    self.counts.submitted += 1;
                    self.waiting.push_back(job.id);
                    self.jobs.insert(job.id, job);
                }
                // A remote task given up is always stopped on its node.
                Command::Cancel { id, kill: _ } => {
                    // Still waiting here (submitted in this same batch, say): it never
                    // leaves this process.
                    if let Some(job) = self.jobs.remove(&id) {
                        self.counts.cancelled += 1;
                        self.give_back(job.admitted);
                        if self.jobs.is_empty() {
                            // Only the ids of tasks given up are left.
                            self.waiting.clear();
                        }
                    } else {
                        self.cancel(id).await;
                    }
                }
                Command::RunTimeout { id, .. } => {
                    // `Shared` refuses run_timeout for a remote pool before it sends
                    // anything (InvalidConfig to the caller), so none should come.
                    tracing::warn!(target: "procpool::remote", task = id,
                        "a run_timeout reached the remote backend, which has none; ignored");
                }
                Command::Close { done } => self.closing.push(done),
                Command::Terminate { done } => {
                    self.cancel_in_flight().await;
                    self.fail_all(Error::PoolClosed);
                    done.send(()).ok();
                    for done in self.closing.drain(..) {
                        done.send(()).ok();
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Writes waiting tasks, in order, while the window has room (in round trips of
    /// at most [`WRITE_BATCH`] tasks).
    async fn write_waiting(&mut self) {
        while self.inflight.len() < self.window {
            // One task only, after a failed write: a probe.
            let batch = if self.failing_since.is_some() {
                1
            } else {
                WRITE_BATCH
            };
            let room = (self.window - self.inflight.len()).min(batch);
            let (mut jobs, mut bytes) = (Vec::with_capacity(room.min(self.jobs.len())), 0);
            // A round trip's frames are encoded and signed on the remote pools' one
            // thread: at most a few MB of them, so that no pool's keep-alive waits.
            while jobs.len() < room && bytes < WRITE_BATCH_BYTES {
                let Some(id) = self.waiting.pop_front() else {
                    break;
                };
                // Not there: given up while it waited.
                if let Some(job) = self.jobs.remove(&id) {
                    bytes += job.args.len();
                    jobs.push(job);
                }
            }
            if jobs.is_empty() {
                return;
            }
            match self.submit(jobs).await {
                // Refused: Redis answered (full, read-only, refused by its ACL), so the
                // error is its tasks', and the next ones are tried at once.
                Wrote::All | Wrote::Refused => {
                    self.failing_since = None;
                    self.pause = WRITE_PAUSE;
                }
                Wrote::Nothing => {}
                Wrote::Unreachable => {
                    let now = tokio::time::Instant::now();
                    let since = *self.failing_since.get_or_insert(now);
                    if now.duration_since(since) >= RECONNECT_WINDOW {
                        // As what is in Redis does past the window; a later outage
                        // gets its own window.
                        self.fail_waiting(&Error::Backend {
                            reason: format!("Redis has been unreachable for {RECONNECT_WINDOW:?}"),
                        });
                        self.failing_since = None;
                    }
                    self.paused = Some(now + self.pause);
                    self.pause = (self.pause * 2).min(WRITE_PAUSE * 10);
                    return;
                }
            }
        }
    }

    /// Writes the tasks to the build's stream, in one round trip; if that fails, its
    /// tasks fail.
    async fn submit(&mut self, jobs: Vec<Job>) -> Wrote {
        let stream = self.keys.tasks(self.build);
        let deadline_ms = self.opts.task_timeout.map_or(0, |t| {
            frame::now_ms().saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
        });
        // Alive when its tasks are read, even just after a Redis restart (which loses the
        // key until `keep_alive` renews it): a node drops the tasks of a parent whose key
        // is missing.
        let mut pipe = redis::pipe();
        pipe.add_command(alive(&self.keys.parent(&self.parent)))
            .ignore();
        let mut sent = Vec::new();
        for job in jobs {
            let framed = self.frame(&job, deadline_ms);
            match framed {
                Ok((f, m)) => {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("f")
                        .arg(f)
                        .arg("m")
                        .arg(m);
                    sent.push(job);
                }
                Err(e) => {
                    self.counts.failed += 1;
                    self.give_back(job.admitted);
                    job.reply.send(Err(e));
                }
            }
        }
        if sent.is_empty() {
            return Wrote::Nothing;
        }
        let ids: redis::RedisResult<Vec<String>> = pipe.query_async(&mut self.con).await;
        match ids {
            Ok(ids) => {
                for (job, entry) in sent.into_iter().zip(ids) {
                    self.counts.running += 1;
                    self.inflight.insert(
                        job.id,
                        Inflight {
                            reply: job.reply,
                            entry: Some(entry),
                            admitted: job.admitted,
                            _span: job.span,
                        },
                    );
                }
            }
            Err(e) => {
                for job in sent {
                    self.counts.failed += 1;
                    self.give_back(job.admitted);
                    job.reply.send(Err(backend("cannot queue the task", &e)));
                }
                // Unreachable, or there but not serving yet (LOADING after a restart,
                // MASTERDOWN, TRYAGAIN): worth waiting for, unlike a refusal.
                use redis::RetryMethod::{
                    Reconnect, ReconnectFromInitialConnections, WaitAndRetry,
                };
                let down = super::connection_broke(&e)
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || matches!(
                        e.retry_method(),
                        Reconnect | ReconnectFromInitialConnections | WaitAndRetry
                    );
                return if down {
                    Wrote::Unreachable
                } else {
                    Wrote::Refused
                };
            }
        }
        Wrote::All
    }

    /// A job's frame and MAC; arguments that refer to objects of this machine cannot go.
    fn frame(&self, job: &Job, deadline_ms: u64) -> Result<(Vec<u8>, Vec<u8>)> {
        if let Reply::One { pins, .. } = &job.reply
            && !pins.is_empty()
        {
            return Err(Error::UnsupportedArgument {
                type_name: "a Queue, Lock, Event or pipe end".to_owned(),
            });
        }
        if job.args.len() > MAX_REMOTE_ARGS {
            return Err(Error::Encode {
                type_name: format!("the arguments of {}", job.target.name),
                reason: format!(
                    "they encode to {} bytes; a remote task's are at most {MAX_REMOTE_ARGS} \
                     (Redis takes at most 512 MiB in one value, its proto-max-bulk-len)",
                    job.args.len()
                ),
            });
        }
        let f = frame::encode(&TaskFrame {
            task: job.id,
            parent: self.parent.clone(),
            build: self.build.to_owned(),
            attempt: 0,
            retries: self.opts.retries,
            deadline_ms,
            target: job.target.offset,
            target_name: job.target.name.to_owned(),
            args: ByteBuf::from(job.args.to_vec()?),
        })?;
        let m = frame::sign(&self.key, &f);
        Ok((f, m))
    }

    /// A cancelled task's entry is deleted if it is still queued; a node that took it
    /// hears of the cancel on the channel (or finds it in the cancelled set before it
    /// starts the task) and stops its worker.
    async fn cancel(&mut self, id: u64) {
        let Some(t) = self.inflight.remove(&id) else {
            return;
        };
        self.counts.cancelled += 1;
        self.counts.running -= 1;
        self.give_back(t.admitted);
        let mut pipe = redis::pipe();
        self.queue_cancel(&mut pipe, id, t.entry.as_deref());
        let sent: redis::RedisResult<()> = super::again_once(&mut self.con, &pipe).await;
        if let Err(e) = sent {
            tracing::warn!(target: "procpool::remote", task = id, "cannot cancel a remote task: {e}");
        }
    }

    /// Adds the cancel of task `id` to `pipe`. Its queued entry is deleted first: from
    /// then on no node can read it, so a node that reads it did so before the cancel
    /// was published, and hears it unless it was not listening (the node's `Cancels`
    /// relies on this order). Then the cancelled set (trimmed of old names) and the
    /// channel.
    fn queue_cancel(&self, pipe: &mut redis::Pipeline, id: u64, entry: Option<&str>) {
        let name = frame::cancel_name(&self.parent, id);
        let now = frame::now_ms();
        if let Some(entry) = entry {
            pipe.cmd("XDEL")
                .arg(self.keys.tasks(self.build))
                .arg(entry)
                .ignore();
        }
        pipe.cmd("ZADD")
            .arg(self.keys.cancelled())
            .arg(now)
            .arg(&name)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.cancelled())
            .arg("-inf")
            .arg(now.saturating_sub(frame::CANCEL_KEPT_MS))
            .ignore()
            .cmd("PUBLISH")
            .arg(self.keys.cancel_channel())
            .arg(&name)
            .ignore();
    }

    fn on_result(&mut self, r: ResultFrame) {
        // The first result of a task wins; later ones (a retry's) are dropped.
        let Some(t) = self.inflight.remove(&r.task) else {
            return;
        };
        self.counts.running -= 1;
        self.give_back(t.admitted);
        let res = r.end.into_result(r.worker.into());
        if matches!(&res, Ok(done) if matches!(done.outcome, crate::wire::Outcome::Value(_))) {
            self.counts.completed += 1;
        } else {
            self.counts.failed += 1;
        }
        t.reply.send(res);
    }

    /// Redis restarted: whatever it held of the tasks in flight may be gone (their
    /// entries, the nodes' pending lists, their results), so they fail, and go into the
    /// cancelled set, so that a Redis that kept them (with persistence) does not have
    /// them run after their callers were answered. The pool goes on with the new server.
    async fn on_restart(&mut self) {
        tracing::warn!(target: "procpool::remote", tasks = self.inflight.len(),
            "Redis restarted; the tasks in flight fail with Backend");
        // A Redis with persistence may have kept the entries, which must not run now
        // that their callers are answered.
        self.cancel_in_flight().await;
        // The tasks still waiting here lost nothing: they go to the new server.
        self.fail_in_flight(Error::Backend {
            reason: "Redis restarted; the task's state there may be lost".to_owned(),
        });
    }

    /// Cancels every task in flight on its nodes, as [`cancel`](Self::cancel) does one
    /// (in its order): a terminated pool's queued tasks must not start, and its running
    /// ones are stopped, before its key goes.
    async fn cancel_in_flight(&mut self) {
        if self.inflight.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (id, t) in &self.inflight {
            self.queue_cancel(&mut pipe, *id, t.entry.as_deref());
        }
        let sent: redis::RedisResult<()> = super::again_once(&mut self.con, &pipe).await;
        if let Err(e) = sent {
            tracing::warn!(target: "procpool::remote", tasks = self.inflight.len(),
                "cannot cancel the tasks in flight: {e}");
        }
    }

    fn give_back(&self, admitted: bool) {
        if admitted {
            self.admission.add_permits(1);
        }
    }

    /// Counts a task ended by `e`: cancelled if the pool was closed, else failed.
    fn count_ended(&mut self, e: &Error) {
        if matches!(e, Error::PoolClosed) {
            self.counts.cancelled += 1;
        } else {
            self.counts.failed += 1;
        }
    }

    /// Fails every task: in Redis, and waiting here.
    fn fail_all(&mut self, e: Error) {
        self.fail_waiting(&e);
        self.fail_in_flight(e);
    }

    /// Fails the tasks waiting here.
    fn fail_waiting(&mut self, e: &Error) {
        self.waiting.clear();
        for (_, job) in std::mem::take(&mut self.jobs) {
            self.count_ended(e);
            self.give_back(job.admitted);
            job.reply.send(Err(e.duplicate()));
        }
    }

    /// Fails the tasks in Redis.
    fn fail_in_flight(&mut self, e: Error) {
        for (_, t) in std::mem::take(&mut self.inflight) {
            self.count_ended(&e);
            if t.admitted {
                self.admission.add_permits(1);
            }
            t.reply.send(Err(e.duplicate()));
        }
        self.counts.running = 0;
        self.publish();
    }

    fn publish(&self) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let PoolStats { workers, idle, .. } = *s;
        *s = PoolStats {
            workers,
            idle,
            queued: self.jobs.len(),
            ..self.counts
        };
    }
}

/// `first` and what else `rx` holds already, at most `max` in all (none if `first` is
/// none: the channel closed).
fn with_queued<T>(first: Option<T>, rx: &mut mpsc::UnboundedReceiver<T>, max: usize) -> Vec<T> {
    let Some(first) = first else {
        return Vec::new();
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    batch
}

/// Completes at `at`, never if there is none.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Emits here the events a remote task's worker emitted (as a local worker's are, named
/// `node-<id>:PoolWorker-<n>`), before its result is handed on.
fn reemit(span: Option<&tracing::Span>, worker: &str, events: crate::log::capture::TaskEvents) {
    for e in &events.events {
        crate::log::reemit_in(span, worker, events.pid, e);
    }
    if events.dropped > 0 {
        tracing::warn!(target: "procpool::remote", process = worker, dropped = events.dropped,
            "a remote task emitted more events than travel with its result (at most {} \
            events, {} KiB of text); the rest were dropped (its node logged them)",
            crate::log::capture::MAX_EVENTS, crate::log::capture::MAX_BYTES >> 10);
    }
}
