//! A node: this executable serving a remote pool's tasks from Redis Streams in its own
//! local worker processes (DESIGN.md §10), started by `PROCPOOL_NODE` before `main` or
//! by [`node`] from a program's `main`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamId;

use crate::error::{Error, Result};
use crate::pool::AsyncPool;
use crate::pool::remote::fingerprint::fingerprint;
use crate::pool::remote::frame::{self, End, GROUP, Keys, ResultFrame, TaskFrame};
use crate::pool::remote::{self, Redis, backend};
use crate::target::TargetRef;

/// How long a node's registration lasts unless renewed (it is renewed every second).
const REGISTRATION: Duration = Duration::from_secs(3);

/// Runs a node until its Redis fails: reads the tasks of this build from the
/// namespace's stream, checks each frame's MAC and build, runs it in one of
/// `node_processes` local workers, and writes the result to its parent's stream.
///
/// # Errors
///
/// [`Error::InvalidConfig`] without a key; [`Error::Backend`] when Redis cannot be
/// reached; the local pool's error if its workers cannot start.
pub async fn node(config: Redis) -> Result<()> {
    let key = Arc::new(config.load_key()?);
    let build = fingerprint().map_err(|reason| Error::spawn(reason, None))?;
    let client =
        redis::Client::open(config.url.as_str()).map_err(|e| backend("bad Redis URL", e))?;
    let mut con = remote::connect(&client, false).await?;
    let mut reader = remote::connect(&client, true).await?;
    let keys = Keys::new(&config.namespace);
    let stream = keys.tasks(build);
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await;
    if let Err(e) = created
        && e.code() != Some("BUSYGROUP")
    {
        return Err(backend("cannot create the consumer group", e));
    }
    let processes = config
        .node_processes
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = AsyncPool::new(processes).await?;
    // Host and pid first, so that logs and NodeLost name a node one can find.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "node".to_owned(), |h| h.trim().to_owned());
    let id = format!("{host}-{}-{}", std::process::id(), &frame::random_id()[..6]);
    tracing::info!(target: "procpool::lifecycle", node = %id, build, processes,
        "node serving namespace {}", config.namespace);
    let member = format!("{id}/{processes}");
    let register = {
        let (mut con, nodes, member) = (con.clone(), keys.nodes(build), member.clone());
        async move {
            loop {
                let now = frame::now_ms();
                let expires = now + u64::try_from(REGISTRATION.as_millis()).unwrap_or(3000);
                let res: redis::RedisResult<()> = redis::pipe()
                    .cmd("ZADD")
                    .arg(&nodes)
                    .arg(expires)
                    .arg(&member)
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&nodes)
                    .arg("-inf")
                    .arg(now)
                    .ignore()
                    .query_async(&mut con)
                    .await;
                if let Err(e) = res {
                    tracing::warn!(target: "procpool::remote", "cannot renew the node's registration: {e}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let registration = tokio::spawn(register);
    let reaper = crate::pool::remote::reaper::Reaper {
        keys: keys.clone(),
        build,
        key: Arc::clone(&key),
        me: format!("reaper-{id}"),
    };
    let reaping = tokio::spawn(reaper.run(con.clone()));
    // At most HELD_PER_WORKER tasks per worker are held at once.
    let slots = Arc::new(tokio::sync::Semaphore::new(processes * HELD_PER_WORKER));
    let ctx = Arc::new(Ctx {
        cancels: Mutex::default(),
        entries: Mutex::default(),
        consumer: id.clone(),
        key,
        build,
        keys,
        stream,
        node: format!("node-{id}"),
        pool,
    });
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|e| backend("cannot listen for cancels", e))?;
    pubsub
        .subscribe(ctx.keys.cancel_channel())
        .await
        .map_err(|e| backend("cannot listen for cancels", e))?;
    let listen = {
        let ctx = Arc::clone(&ctx);
        let mut msgs = pubsub.into_on_message();
        async move {
            use futures::StreamExt;
            while let Some(msg) = msgs.next().await {
                match msg.get_payload::<String>() {
                    Ok(name) => ctx.on_cancel(name),
                    Err(e) => {
                        tracing::warn!(target: "procpool::remote", "a cancel that is not text: {e}")
                    }
                }
            }
        }
    };
    let listener = tokio::spawn(listen);
    let heartbeat = tokio::spawn(Arc::clone(&ctx).heartbeat(con.clone()));
    let parents = tokio::spawn(Arc::clone(&ctx).watch_parents(con.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::spawn("cannot watch for SIGTERM", Some(e)))?;
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut draining = false;
    let res = loop {
        if draining {
            break Ok(());
        }
        let free = slots.available_permits().max(1);
        let first = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
            _ = term.recv() => break Ok(()),
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&id)
            .arg("COUNT")
            .arg(free)
            .arg("BLOCK")
            .arg(remote::BLOCK.as_millis().to_string())
            .arg("STREAMS")
            .arg(&ctx.stream)
            .arg(">");
        // A read sent is never dropped: Redis hands the entries it delivers to this
        // consumer whether or not the answer is read, and entries dropped here would sit
        // in its pending list until reaped. SIGTERM ends the loop after this read.
        let read = {
            let read = cmd.query_async::<Option<redis::streams::StreamReadReply>>(&mut reader);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    r = &mut read => break r,
                    _ = term.recv(), if !draining => draining = true,
                }
            }
        };
        let entries: Vec<StreamId> = match read {
            Ok(r) => {
                failing_since = None;
                r.into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect()
            }
            Err(e) => {
                // Unreachable past the reaper's threshold: its work is reclaimed
                // elsewhere anyway, so the node stops; until then it reconnects.
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > crate::pool::remote::reaper::LOST_AFTER {
                    break Err(backend("cannot read tasks", e));
                }
                tracing::warn!(target: "procpool::remote", "cannot read tasks: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(c) = remote::connect(&client, true).await {
                    reader = c;
                }
                continue;
            }
        };
        let mut permit = Some(first);
        for entry in entries {
            let p = match permit.take() {
                Some(p) => p,
                None => match Arc::clone(&slots).acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (ctx, con) = (Arc::clone(&ctx), con.clone());
            ctx.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(entry.id.clone());
            tokio::spawn(async move {
                ctx.serve(con, entry).await;
                drop(p);
            });
        }
    };
    // No new task from here on: unregistered, and the ones held finish within the grace.
    registration.abort();
    let unregistered: redis::RedisResult<()> = redis::cmd("ZREM")
        .arg(ctx.keys.nodes(build))
        .arg(&member)
        .query_async(&mut con)
        .await;
    if let Err(e) = unregistered {
        tracing::debug!(target: "procpool::remote", "cannot unregister the node: {e}");
    }
    if res.is_ok() {
        let grace = config.node_grace.unwrap_or(DRAIN_GRACE);
        let all = u32::try_from(processes * HELD_PER_WORKER).unwrap_or(u32::MAX);
        match tokio::time::timeout(grace, slots.acquire_many(all)).await {
            Ok(_) => tracing::info!(target: "procpool::lifecycle", node = %id, "node drained"),
            Err(_) => tracing::warn!(target: "procpool::lifecycle", node = %id,
                "drain grace of {grace:?} over; tasks still held go to the reaper"),
        }
    }
    listener.abort();
    heartbeat.abort();
    parents.abort();
    reaping.abort();
    res
}

/// Tasks a node holds per local worker (read from the stream, not answered): enough
/// that the round trips to Redis of one task overlap the others' (with 2 per worker,
/// 100k `apply_async` ran at 12 k/s, bound by 4 tasks in flight per node; BENCHMARKS.md),
/// few enough that one node does not take a burst another idle node could run.
const HELD_PER_WORKER: usize = 16;

/// How long a node drains on SIGTERM by default (see `Redis::node_grace`).
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// The node's tasks by cancel name (see `frame::cancel_name`), and the cancels heard
/// for tasks it has not started.
#[derive(Default)]
struct Cancels {
    running: std::collections::HashMap<String, u64>,
    early: HashSet<String>,
}

/// At most this many cancels of tasks not started are remembered (the cancelled set in
/// Redis has every one).
const EARLY_CANCELS: usize = 10_000;

/// What every task of a node shares.
struct Ctx {
    cancels: Mutex<Cancels>,
    /// The stream entries this node holds (read, not answered): heartbeat.
    entries: Mutex<HashSet<String>>,
    /// This node's consumer name in the group.
    consumer: String,
    key: Arc<Vec<u8>>,
    build: &'static str,
    keys: Keys,
    stream: String,
    node: String,
    pool: AsyncPool,
}

/// Answers a task and takes its entry off, only if this node still owns the entry:
/// a node presumed lost (paused, cut off) whose entry was reclaimed writes nothing, and
/// its ack cannot remove the new owner's entry (a plain `XACK` from a former owner would).
const ANSWER: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XADD', KEYS[2], '*', 'f', ARGV[4], 'm', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
";

impl Ctx {
    /// Stops the running tasks of parents that are gone (their key expired: dead, even
    /// by SIGKILL, or cut off), once a heartbeat.
    async fn watch_parents(self: Arc<Self>, mut con: MultiplexedConnection) {
        loop {
            tokio::time::sleep(crate::pool::remote::reaper::HEARTBEAT).await;
            let parents: Vec<String> = {
                let c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
                let set: HashSet<&str> = c
                    .running
                    .keys()
                    .filter_map(|name| Some(name.rsplit_once('/')?.0))
                    .collect();
                set.into_iter().map(str::to_owned).collect()
            };
            for parent in parents {
                let alive: redis::RedisResult<bool> = redis::cmd("EXISTS")
                    .arg(self.keys.parent(&parent))
                    .query_async(&mut con)
                    .await;
                match alive {
                    Ok(true) => {}
                    Ok(false) => {
                        let prefix = format!("{parent}/");
                        let names: Vec<String> = {
                            let c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
                            c.running
                                .keys()
                                .filter(|n| n.starts_with(&prefix))
                                .cloned()
                                .collect()
                        };
                        tracing::info!(target: "procpool::remote", parent = %parent,
                            tasks = names.len(), "a parent is gone; its tasks are stopped");
                        for name in names {
                            self.on_cancel(name);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(target: "procpool::remote", "cannot check a parent: {e}")
                    }
                }
            }
        }
    }

    /// Renews the idle time of every entry this node holds, once a heartbeat, so the
    /// reaper leaves them alone (`XCLAIM ... JUSTID` does not count as a delivery).
    async fn heartbeat(self: Arc<Self>, mut con: MultiplexedConnection) {
        loop {
            tokio::time::sleep(crate::pool::remote::reaper::HEARTBEAT).await;
            let ids: Vec<String> = self
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            if ids.is_empty() {
                continue;
            }
            let renewed: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                .arg(&self.stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(0)
                .arg(&ids)
                .arg("JUSTID")
                .query_async(&mut con)
                .await;
            if let Err(e) = renewed {
                tracing::warn!(target: "procpool::remote", "cannot heartbeat the node's tasks: {e}");
            }
        }
    }

    /// A cancel heard on the channel: the task's worker is stopped if it runs here.
    fn on_cancel(&self, name: String) {
        let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
        match c.running.remove(&name) {
            Some(id) => {
                tracing::debug!(target: "procpool::remote", task = %name, "cancelled; its worker is stopped");
                self.pool.cancel_encoded(id);
            }
            None => {
                if c.early.len() >= EARLY_CANCELS {
                    c.early.clear();
                }
                c.early.insert(name);
            }
        }
    }

    /// Runs one stream entry and answers its parent; an entry that fails its MAC, does
    /// not decode or is for another build is never run: it goes to the dead letters.
    async fn serve(&self, mut con: MultiplexedConnection, entry: StreamId) {
        let (f, m) = (entry.get::<Vec<u8>>("f"), entry.get::<Vec<u8>>("m"));
        let task = match f.as_ref().zip(m.as_ref()) {
            None => Err("a frame or its MAC is missing".to_owned()),
            Some((f, m)) if !frame::verify(&self.key, f, m) => {
                Err("its MAC does not match (wrong key, or forged)".to_owned())
            }
            Some((f, _)) => match frame::decode::<TaskFrame>(f) {
                Err(e) => Err(e.to_string()),
                Ok(t) if t.build != self.build => Err(format!("it is for build {}", t.build)),
                Ok(t) => Ok(t),
            },
        };
        let task = match task {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(target: "procpool::remote", entry = %entry.id,
                    "a task frame was refused and not run: {reason}");
                let mut pipe = redis::pipe();
                pipe.cmd("XADD")
                    .arg(self.keys.dead_letters())
                    .arg("*")
                    .arg("f")
                    .arg(f.unwrap_or_default())
                    .arg("why")
                    .arg(&reason)
                    .ignore();
                self.take_off(&mut pipe, &entry.id);
                let dead: redis::RedisResult<()> = pipe.query_async(&mut con).await;
                if let Err(e) = dead {
                    tracing::warn!(target: "procpool::remote", "cannot move a refused frame aside: {e}");
                }
                return;
            }
        };
        let Some((worker, end)) = self.run(&mut con, &task).await else {
            // Cancelled: its caller is gone; the entry goes, unanswered.
            let mut pipe = redis::pipe();
            self.take_off(&mut pipe, &entry.id);
            let res: redis::RedisResult<()> = pipe.query_async(&mut con).await;
            if let Err(e) = res {
                tracing::warn!(target: "procpool::remote", "cannot drop a cancelled task: {e}");
            }
            return;
        };
        let result = ResultFrame {
            task: task.task,
            attempt: task.attempt,
            worker: format!("{}:{worker}", self.node),
            end,
        };
        let f = match frame::encode(&result) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(target: "procpool::remote", "cannot encode a result: {e}");
                return;
            }
        };
        let m = frame::sign(&self.key, &f);
        let res: redis::RedisResult<i64> = redis::Script::new(ANSWER)
            .key(&self.stream)
            .key(self.keys.results(&task.parent))
            .arg(GROUP)
            .arg(&entry.id)
            .arg(&self.consumer)
            .arg(f)
            .arg(m)
            .invoke_async(&mut con)
            .await;
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&entry.id);
        match res {
            Ok(1) => {}
            Ok(_) => tracing::info!(target: "procpool::remote", task = task.task,
                "the task was reclaimed from this node meanwhile; its result is dropped"),
            Err(e) => {
                tracing::warn!(target: "procpool::remote", task = task.task, "cannot answer a task: {e}")
            }
        }
    }

    /// Appends what takes stream entry `entry` off for good: its ack and its deletion.
    fn take_off(&self, pipe: &mut redis::Pipeline, entry: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(entry);
        pipe.cmd("XACK")
            .arg(&self.stream)
            .arg(GROUP)
            .arg(entry)
            .ignore()
            .cmd("XDEL")
            .arg(&self.stream)
            .arg(entry)
            .ignore();
    }

    /// Runs a task in a local worker, within its deadline; which worker, and how it
    /// ended.
    /// `None`: it was cancelled (before it started, or its worker was stopped), and
    /// nobody waits for its result.
    async fn run(
        &self,
        con: &mut MultiplexedConnection,
        task: &TaskFrame,
    ) -> Option<(String, End)> {
        let Some(name) = intern(&task.target_name) else {
            let reason = "too many distinct target names".to_owned();
            return Some((String::new(), End::Failed { reason }));
        };
        let target = TargetRef {
            offset: task.target,
            name,
        };
        let cancel = frame::cancel_name(&task.parent, task.task);
        // A cancel published before this node listened, or lost: the set has it. A
        // parent that is gone wants nothing.
        let listed: redis::RedisResult<(Option<f64>, bool)> = redis::pipe()
            .cmd("ZSCORE")
            .arg(self.keys.cancelled())
            .arg(&cancel)
            .cmd("EXISTS")
            .arg(self.keys.parent(&task.parent))
            .query_async(con)
            .await;
        match listed {
            Ok((Some(_), _)) => return None,
            Ok((None, false)) => {
                tracing::info!(target: "procpool::remote", task = %cancel,
                    "the task's parent is gone; dropped unstarted");
                return None;
            }
            Ok((None, true)) => {}
            Err(e) => tracing::warn!(target: "procpool::remote", "cannot look up cancels: {e}"),
        }
        let args = Bytes::from(task.args.clone().into_vec());
        let (id, rx) = {
            let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
            if c.early.remove(&cancel) {
                return None;
            }
            match self.pool.submit_encoded(target, args) {
                Ok((id, rx)) => {
                    c.running.insert(cancel.clone(), id);
                    (id, rx)
                }
                Err(e) => return Some((String::new(), End::from_error(&e))),
            }
        };
        let answer = self.wait(task, id, rx).await;
        let cancelled = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .running
            .remove(&cancel)
            .is_none();
        if cancelled {
            return None;
        }
        Some(answer)
    }

    /// Waits for local task `id` within `task`'s deadline.
    async fn wait(
        &self,
        task: &TaskFrame,
        id: u64,
        rx: tokio::sync::oneshot::Receiver<crate::pool::message::TaskResult>,
    ) -> (String, End) {
        let left = match task.deadline_ms {
            0 => None,
            at => Some(Duration::from_millis(at.saturating_sub(frame::now_ms()))),
        };
        let answer = match left {
            None => rx.await,
            Some(left) => match tokio::time::timeout(left, rx).await {
                Ok(a) => a,
                Err(_) => {
                    // Stops its worker (its process group), as a local timeout does.
                    self.pool.cancel_encoded(id);
                    let after_ms = left.as_millis();
                    let after_ms = u64::try_from(after_ms).unwrap_or(u64::MAX);
                    return (String::new(), End::Timeout { after_ms });
                }
            },
        };
        match answer {
            Ok(Ok(done)) => (done.worker.to_string(), End::Ran(done.outcome)),
            Ok(Err(e)) => (worker_of(&e), End::from_error(&e)),
            Err(_) => (String::new(), End::from_error(&Error::PoolClosed)),
        }
    }
}

fn worker_of(e: &Error) -> String {
    match e {
        Error::WorkerDied { name, .. } => name.clone(),
        _ => String::new(),
    }
}

/// Target names as `&'static str` (what a local pool's tasks carry), each kept once;
/// at most 4,096 distinct ones (only authenticated frames get here).
fn intern(name: &str) -> Option<&'static str> {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.get(name) {
        return Some(n);
    }
    if names.len() >= 4096 {
        return None;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    Some(leaked)
}

/// Called before `main`: if `PROCPOOL_NODE` is set, this process is a node and never
/// returns (it exits when the node stops).
pub(crate) fn boot_from_env() {
    let Some(url) = std::env::var_os("PROCPOOL_NODE") else {
        return;
    };
    // In node mode `main` never runs, so nobody else installs a subscriber.
    let fmt = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if fmt.try_init().is_err() {
        // One is installed already: it gets the node's events.
    }
    let mut config = Redis::new(url.to_string_lossy().into_owned());
    if let Some(ns) = std::env::var_os("PROCPOOL_NAMESPACE") {
        config = config.namespace(ns.to_string_lossy().into_owned());
    }
    if let Some(n) = std::env::var_os("PROCPOOL_NODE_PROCESSES") {
        match n.to_string_lossy().parse::<usize>() {
            Ok(n) if n > 0 => config = config.node_processes(n),
            _ => {
                tracing::error!(target: "procpool::lifecycle",
                    "PROCPOOL_NODE_PROCESSES must be a number of processes, at least 1");
                std::process::exit(2);
            }
        }
    }
    if let Some(g) = std::env::var_os("PROCPOOL_NODE_GRACE") {
        match g.to_string_lossy().parse::<u64>() {
            Ok(secs) => config = config.node_grace(Duration::from_secs(secs)),
            Err(_) => {
                tracing::error!(target: "procpool::lifecycle",
                    "PROCPOOL_NODE_GRACE must be a number of seconds");
                std::process::exit(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(target: "procpool::lifecycle", "the node cannot start its runtime: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(node(config)) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(target: "procpool::lifecycle", "the node stopped: {e}");
            std::process::exit(1);
        }
    }
}
