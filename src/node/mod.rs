//! A node: this executable serving a remote pool's tasks from Redis Streams in its own
//! local worker processes (DESIGN.md §10), started by `PROCPOOL_NODE` before `main` or
//! by [`node`] from a program's `main`.

mod answers;
mod window;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use redis::streams::StreamId;

use crate::error::{Error, Result};
use crate::log::capture::TaskEvents;
use crate::pool::AsyncPool;
use crate::pool::remote::fingerprint::fingerprint;
use crate::pool::remote::frame::{self, End, GROUP, Keys, ResultFrame, TaskFrame};
use crate::pool::remote::{self, Con, Redis, backend};
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
///
/// The node runs on a thread of its own (its Redis connections, its local pool's
/// dispatcher and its workers' readers all on one current-thread runtime), not on the
/// caller's runtime.
///
/// # Cancel safety
///
/// Dropped, the node stops where it is (without draining): its local pool is terminated
/// (its workers' process groups killed, within 5 s), then its thread's runtime and every
/// task on it end.
pub async fn node(config: Redis) -> Result<()> {
    let (done, result) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("procpool-node".into())
        .spawn(move || {
            let stopped = async move {
                // Err: `node` was dropped (nothing is ever sent).
                drop(stopped.await);
            };
            drop(done.send(run_here(config, stopped)));
        })
        .map_err(|e| Error::spawn("cannot start the node's thread", Some(e)))?;
    let res = result.await.unwrap_or(Err(Error::PoolClosed));
    drop(stop);
    res
}

/// Runs a node on this thread until it stops or `stop` completes; the runtime, and
/// every task of the node on it, is dropped before this returns.
fn run_here(config: Redis, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::spawn("the node cannot start its runtime", Some(e)))?;
    // The local pool, once it runs: stopped, the node terminates it before its runtime
    // goes, so that its workers' process groups (the programs its tasks started) go
    // too, not only the workers (which exit when their channels close).
    let pool: Arc<OnceLock<AsyncPool>> = Arc::default();
    runtime.block_on(async {
        tokio::select! {
            r = serve(config, Arc::clone(&pool)) => r,
            () = stop => {
                if let Some(pool) = pool.get()
                    && tokio::time::timeout(STOP_WAIT, pool.terminate()).await.is_err()
                {
                    tracing::warn!(target: "procpool::lifecycle",
                        "the stopped node's workers did not end within {STOP_WAIT:?}");
                }
                Ok(())
            }
        }
    })
}

/// How long a node dropped from its caller waits for its workers to be stopped.
const STOP_WAIT: Duration = Duration::from_secs(5);

async fn serve(config: Redis, stopping: Arc<OnceLock<AsyncPool>>) -> Result<()> {
    let key = Arc::new(config.load_key()?);
    let build = fingerprint().map_err(|reason| Error::spawn(reason, None))?;
    let client =
        redis::Client::open(config.url.as_str()).map_err(|e| backend("bad Redis URL", e))?;
    let mut con = remote::connect(&client).await?;
    let mut reader = remote::connect_blocking(&client).await?;
    let keys = Keys::new(&config.namespace);
    let stream = keys.tasks(build);
    create_group(&mut con, &stream).await?;
    let processes = config
        .node_processes
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Host and pid first, so that logs and NodeLost name a node one can find.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "node".to_owned(), |h| h.trim().to_owned());
    let id = format!("{host}-{}-{}", std::process::id(), &frame::random_id()[..6]);
    crate::runtime::set_worker_prefix(format!("node-{id}"));
    let pool = AsyncPool::builder()
        .processes(processes)
        .on_runtime(tokio::runtime::Handle::current())
        .build()
        .await?;
    stopping.get_or_init(|| pool.clone());
    tracing::info!(target: "procpool::lifecycle", node = %id, build, processes,
        "node serving namespace {}", config.namespace);
    let member = format!("{id}/{processes}");
    let register = {
        let (mut con, nodes, member) = (con.clone(), keys.nodes(build), member.clone());
        async move {
            loop {
                let now = frame::now_ms();
                let expires = now + u64::try_from(REGISTRATION.as_millis()).unwrap_or(3000);
                let mut pipe = redis::pipe();
                pipe.cmd("ZADD")
                    .arg(&nodes)
                    .arg(expires)
                    .arg(&member)
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&nodes)
                    .arg("-inf")
                    .arg(now)
                    .ignore();
                let res: redis::RedisResult<()> = remote::again_once(&mut con, &pipe).await;
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
    // What the node holds follows how fast it answers (see `window`).
    let window = Arc::new(window::Window::new(processes));
    let slots = Arc::clone(window.slots());
    let ctx = Arc::new(Ctx {
        cancels: Mutex::default(),
        entries: Mutex::default(),
        consumer: id.clone(),
        key,
        build,
        keys,
        stream: stream.clone(),
        node: format!("node-{id}"),
        answers: answers::Answers::start(con.clone(), stream.clone(), id.clone()),
        pool,
    });
    let pubsub = subscribe(&client, ctx.keys.cancel_channel()).await?;
    let listener = tokio::spawn(Arc::clone(&ctx).listen(client.clone(), pubsub, con.clone()));
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
        let block = window.before_read().unwrap_or(remote::BLOCK);
        let free = slots.available_permits().max(1);
        let first = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
            _ = term.recv() => break Ok(()),
        };
        // Before the read is sent: see `Cancels`.
        let lapses = ctx.cancels.lock().unwrap_or_else(|p| p.into_inner()).lapses;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&id)
            .arg("COUNT")
            .arg(free)
            .arg("BLOCK")
            .arg(block.as_millis().to_string())
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
            Err(e) if e.code() == Some("NOGROUP") => {
                // Redis restarted without its data (or the stream was deleted): the
                // group is made again, and reading goes on.
                tracing::warn!(target: "procpool::remote", "the task stream's group is gone \
                    (Redis restarted?); it is created again");
                if let Err(e) = create_group(&mut con, &ctx.stream).await {
                    tracing::warn!(target: "procpool::remote", "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
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
                match remote::connect_blocking(&client).await {
                    Ok(c) => reader = c,
                    Err(e) => tracing::debug!(target: "procpool::remote", "{e}"),
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
            let (ctx, con, window) = (Arc::clone(&ctx), con.clone(), Arc::clone(&window));
            ctx.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(entry.id.clone(), Held::default());
            tokio::spawn(async move {
                ctx.serve(con, entry, lapses).await;
                window.done(p);
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
        let all = u32::try_from(window.freeze()).unwrap_or(u32::MAX);
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

/// For tests: runs a node's answer script for `answers` (entry, and result: stream,
/// frame, MAC) as consumer `consumer` of group `nodes` of task stream `stream`, in one
/// call; whether the consumer owned each entry. Not part of the API.
///
/// # Errors
///
/// [`Error::Backend`] if Redis cannot be reached or the script fails.
#[doc(hidden)]
pub async fn __answer(
    url: &str,
    stream: &str,
    consumer: &str,
    answers: Vec<(String, answers::Written)>,
) -> Result<Vec<bool>> {
    let client = redis::Client::open(url).map_err(|e| backend("bad Redis URL", e))?;
    let mut con = remote::connect(&client).await?;
    let answers: Vec<answers::Answer> = answers
        .into_iter()
        .map(|(entry, result)| answers::Answer { entry, result })
        .collect();
    answers::invoke(&mut con, stream, consumer, &answers)
        .await
        .map_err(|e| backend("the answer script failed", e))
}

/// How long a node drains on SIGTERM by default (see `Redis::node_grace`).
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// The node's tasks by cancel name (see `frame::cancel_name`), and the cancels heard
/// for tasks it has not started.
///
/// A task starts without asking Redis whether it was cancelled when no cancel can have
/// been missed since it was read: `lapses` counts the times one could have been (the
/// channel was dropped and subscribed again, or `early` was emptied), and a task read
/// at the same count can only have had its cancel published after it was read (the
/// parent deletes a queued entry before it publishes the cancel), so heard here. A task
/// read at an older count looks the cancelled set up first, as every task did before
/// (a Redis round trip, a fifth of a remote round trip: BENCHMARKS.md).
#[derive(Default)]
struct Cancels {
    running: std::collections::HashMap<String, u64>,
    early: HashSet<String>,
    lapses: u64,
    /// The node heard its own probe on its current subscription (see `listen`).
    /// Until it does, and once the subscription is seen gone, every task looks up.
    hearing: bool,
    /// When each parent was last seen alive (its key in Redis), so that a task of a
    /// parent seen within a heartbeat starts without asking again; one whose key has
    /// expired since is stopped by `watch_parents` within a heartbeat.
    alive: HashMap<String, tokio::time::Instant>,
}

/// At most this many cancels of tasks not started are remembered (the cancelled set in
/// Redis has every one).
const EARLY_CANCELS: usize = 10_000;

/// What a node publishes on the cancel channel to check that it hears it (no cancel
/// name starts so: those are `<parent>/<task>`).
const PROBE: &str = "probe:";

/// How long a node waits to hear its probe before it subscribes again.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// What every task of a node shares.
struct Ctx {
    cancels: Mutex<Cancels>,
    /// The stream entries this node holds (read, until their answer is written), for
    /// the heartbeat.
    entries: Mutex<HashMap<String, Held>>,
    /// This node's consumer name in the group.
    consumer: String,
    key: Arc<Vec<u8>>,
    build: &'static str,
    keys: Keys,
    stream: String,
    node: String,
    pool: AsyncPool,
    answers: answers::Answers,
}

/// Renews the idle time of the entries (`ARGV[3..]`) consumer `ARGV[2]` still owns
/// (`XCLAIM ... JUSTID`, which does not count as a delivery), and returns the others:
/// entries reclaimed while the node was paused or cut off, or lost by a Redis that
/// restarted. A plain `XCLAIM` would take a reclaimed entry back from its new owner.
const RENEW: &str = r"
local lost = {}
for i = 3, #ARGV do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p['err'] or #p == 0 or p[1][2] ~= ARGV[2] then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return lost
";

/// A stream entry the node holds.
#[derive(Default)]
struct Held {
    /// Its task's cancel name, once its frame is read.
    name: Option<String>,
    /// Its answer is being written: if the heartbeat finds it lost, the answer says so
    /// (and writes nothing).
    answering: bool,
}

/// The node's scripts, hashed once.
struct Scripts {
    renew: redis::Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        renew: redis::Script::new(RENEW),
    })
}

/// Makes the consumer group of the task stream `stream` (and the stream), if missing.
async fn create_group(con: &mut Con, stream: &str) -> Result<()> {
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM");
    let created: redis::RedisResult<()> = remote::again_once(con, &create).await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => {
            Err(backend("cannot create the consumer group", e))
        }
        _ => Ok(()),
    }
}

/// A connection subscribed to the cancel channel.
async fn subscribe(client: &redis::Client, channel: String) -> Result<redis::aio::PubSub> {
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|e| backend("cannot listen for cancels", e))?;
    pubsub
        .subscribe(channel)
        .await
        .map_err(|e| backend("cannot listen for cancels", e))?;
    Ok(pubsub)
}

impl Ctx {
    /// Stops the running tasks of parents that are gone (their key expired: dead, even
    /// by SIGKILL, or cut off), once a heartbeat.
    async fn watch_parents(self: Arc<Self>, mut con: Con) {
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
            {
                // Parents with nothing running here are looked up again when they send.
                let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
                let stale = crate::pool::remote::reaper::HEARTBEAT * 2;
                c.alive.retain(|_, at| at.elapsed() < stale);
            }
            for parent in parents {
                let mut exists = redis::cmd("EXISTS");
                exists.arg(self.keys.parent(&parent));
                let alive: redis::RedisResult<bool> = remote::again_once(&mut con, &exists).await;
                match alive {
                    Ok(true) => {
                        let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
                        c.alive.insert(parent, tokio::time::Instant::now());
                    }
                    Ok(false) => {
                        let prefix = format!("{parent}/");
                        // Under one lock: a task of this parent that starts later
                        // asks Redis (its parent is no longer marked alive).
                        let names: Vec<String> = {
                            let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
                            c.alive.remove(&parent);
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

    /// Hears cancels on the channel until the node stops.
    ///
    /// A subscription counts once the node hears its own probe on it: redis-rs reports
    /// a refused `SUBSCRIBE` (`NOPERM`, from an ACL without it) as a success, and such a
    /// node would never hear a cancel. Each time it hears one, it looks up the cancelled
    /// set for the tasks that run here (for cancels published while it was not
    /// listening), and the tasks it starts later look themselves up (see `Cancels`).
    /// When Redis drops the subscription (it restarted, the connection broke), or the
    /// probe does not come back within [`PROBE_WAIT`], it subscribes again.
    async fn listen(
        self: Arc<Self>,
        client: redis::Client,
        first: redis::aio::PubSub,
        mut con: Con,
    ) {
        use futures::StreamExt;
        let mut pubsub = first;
        let mut probes = 0u64;
        loop {
            let mut msgs = pubsub.into_on_message();
            probes += 1;
            let probe = format!("{PROBE}{}:{probes}", self.consumer);
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(self.keys.cancel_channel()).arg(&probe);
            let sent: redis::RedisResult<i64> = remote::again_once(&mut con, &publish).await;
            // Without a probe (PUBLISH refused: a node user of an older DEPLOY.md), this
            // subscription is kept, never trusted: every task looks itself up.
            let mut awaiting_probe = match sent {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(target: "procpool::remote", "cannot probe the cancel \
                        channel ({e}); every task asks Redis whether it was cancelled");
                    self.look_up_missed_cancels(&mut con, false).await;
                    false
                }
            };
            let unheard = tokio::time::sleep(PROBE_WAIT);
            tokio::pin!(unheard);
            loop {
                let msg = tokio::select! {
                    msg = msgs.next() => msg,
                    () = &mut unheard, if awaiting_probe => {
                        tracing::warn!(target: "procpool::remote",
                            "cannot hear the cancel channel (does the node's Redis user \
                            lack SUBSCRIBE or PUBLISH? DEPLOY.md lists what it needs); \
                            subscribing again");
                        break;
                    }
                };
                let Some(msg) = msg else {
                    tracing::warn!(target: "procpool::remote",
                        "the cancel channel was dropped; listening again");
                    break;
                };
                match msg.get_payload::<String>() {
                    Ok(name) if name == probe => {
                        awaiting_probe = false;
                        self.look_up_missed_cancels(&mut con, true).await;
                    }
                    Ok(name) if name.starts_with(PROBE) => {} // another node's
                    Ok(name) => self.on_cancel(name),
                    Err(e) => {
                        tracing::warn!(target: "procpool::remote", "a cancel that is not text: {e}")
                    }
                }
            }
            drop(msgs);
            self.cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .hearing = false;
            pubsub = loop {
                match subscribe(&client, self.keys.cancel_channel()).await {
                    Ok(p) => break p,
                    Err(e) => {
                        tracing::debug!(target: "procpool::remote", "{e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
        }
    }

    /// The node listens (again; `hearing`: and knows it hears): the tasks running now
    /// are looked up in the cancelled set here; those that start later, in `run`.
    async fn look_up_missed_cancels(&self, con: &mut Con, hearing: bool) {
        let names: Vec<String> = {
            let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
            c.lapses += 1;
            c.hearing = hearing;
            c.running.keys().cloned().collect()
        };
        if names.is_empty() {
            return;
        }
        let mut lookup = redis::cmd("ZMSCORE");
        lookup.arg(self.keys.cancelled()).arg(&names);
        let scores: redis::RedisResult<Vec<Option<f64>>> = remote::again_once(con, &lookup).await;
        match scores {
            Ok(scores) => {
                for (name, score) in names.into_iter().zip(scores) {
                    if score.is_some() {
                        self.on_cancel(name);
                    }
                }
            }
            Err(e) => tracing::warn!(target: "procpool::remote", "cannot look up cancels: {e}"),
        }
    }

    /// Renews the idle time of every entry this node holds, once a heartbeat, so the
    /// reaper leaves them alone; the task of an entry the node no longer owns is
    /// stopped (see [`RENEW`]): its result would be dropped, and its parent has been
    /// answered or has another node run it.
    async fn heartbeat(self: Arc<Self>, mut con: Con) {
        loop {
            tokio::time::sleep(crate::pool::remote::reaper::HEARTBEAT).await;
            let ids: Vec<String> = self
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            if ids.is_empty() {
                continue;
            }
            let renewed: redis::RedisResult<Vec<String>> = scripts()
                .renew
                .key(&self.stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(&ids)
                .invoke_async(&mut con)
                .await;
            let lost = match renewed {
                Ok(lost) => lost,
                Err(e) => {
                    tracing::warn!(target: "procpool::remote", "cannot heartbeat the node's tasks: {e}");
                    continue;
                }
            };
            for entry in lost {
                let held = {
                    let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                    match entries.get(&entry) {
                        // Its answer says whether it was still this node's.
                        Some(held) if held.answering => continue,
                        Some(_) => entries.remove(&entry),
                        None => None,
                    }
                };
                // Not held any more: answered between the look at `entries` and the
                // script (which then found it gone), nothing was lost.
                let Some(Held { name, .. }) = held else {
                    continue;
                };
                tracing::warn!(target: "procpool::remote", entry = %entry, task = ?name,
                    "this node no longer owns a task it holds (reclaimed while the node was \
                    unreachable, or lost by a Redis restart); the task is stopped");
                if let Some(name) = name {
                    self.on_cancel(name);
                }
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
                    c.lapses += 1;
                }
                c.early.insert(name);
            }
        }
    }

    /// Runs one stream entry and answers its parent; an entry that fails its MAC, does
    /// not decode or is for another build is never run: it goes to the dead letters.
    async fn serve(&self, mut con: Con, entry: StreamId, lapses: u64) {
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
        let mut task = match task {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(target: "procpool::remote", entry = %entry.id,
                    "a task frame was refused and not run: {reason}");
                let dead: redis::RedisResult<()> = redis::cmd("XADD")
                    .arg(self.keys.dead_letters())
                    .arg("*")
                    .arg("f")
                    .arg(f.unwrap_or_default())
                    .arg("why")
                    .arg(&reason)
                    .query_async(&mut con)
                    .await;
                if let Err(e) = dead {
                    tracing::warn!(target: "procpool::remote", "cannot move a refused frame aside: {e}");
                }
                if let Err(e) = self.answer(&entry.id, None).await {
                    tracing::warn!(target: "procpool::remote", "cannot take a refused frame off: {e}");
                }
                return;
            }
        };
        let cancel = frame::cancel_name(&task.parent, task.task);
        let held = match self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&entry.id)
        {
            Some(held) => {
                held.name = Some(cancel);
                true
            }
            None => false,
        };
        if !held {
            // The heartbeat found the entry lost (reclaimed, or gone with a Redis that
            // restarted) before its frame was even read here, when it had no name to
            // stop: it must not start now (its caller was answered, or another node has
            // it). Seen once in CI: a task answered Backend after a Redis restart ran.
            tracing::info!(target: "procpool::remote", entry = %entry.id,
                "a task this node no longer owns was not started");
            return;
        }
        // Moved, not copied (they may be hundreds of MB).
        let args = std::mem::take(&mut task.args);
        let Some((worker, end, events)) = self.run(&mut con, &task, args, lapses).await else {
            // Cancelled: its caller is gone; the entry goes, unanswered.
            if let Err(e) = self.answer(&entry.id, None).await {
                tracing::warn!(target: "procpool::remote", "cannot drop a cancelled task: {e}");
            }
            return;
        };
        let mut result = ResultFrame {
            task: task.task,
            attempt: task.attempt,
            // The node's workers are named after it (`node-<id>:PoolWorker-2`).
            worker: if worker.is_empty() {
                self.node.clone()
            } else {
                worker
            },
            end,
            events,
        };
        let f = frame::encode(&result).or_else(|e| {
            tracing::error!(target: "procpool::remote", task = task.task, "cannot encode a result: {e}");
            let reason = format!("the node cannot encode the task's result: {e}");
            result.end = End::Failed { reason };
            frame::encode(&result)
        });
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                // Not even a failure encodes: the entry stays, and the reaper answers
                // the parent (NodeLost) once the heartbeat has stopped renewing it.
                tracing::error!(target: "procpool::remote", task = task.task, "cannot encode a failure: {e}");
                return;
            }
        };
        let m = frame::sign(&self.key, &f);
        let results = self.keys.results(&task.parent);
        match self.answer(&entry.id, Some((results, f, m))).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(target: "procpool::remote", task = task.task,
                "the task was reclaimed from this node meanwhile; its result is dropped"),
            Err(e) => {
                tracing::warn!(target: "procpool::remote", task = task.task, "cannot answer a task: {e}")
            }
        }
    }

    /// Takes stream entry `entry` off (its ack and its deletion) and writes `result`
    /// (the parent's stream, the frame, its MAC) if there is one, all only if this node
    /// still owns the entry (see `answers`); false if it does not.
    async fn answer(&self, entry: &str, result: answers::Written) -> redis::RedisResult<bool> {
        // Held, and renewed by the heartbeat, until the answer is written: one that waits
        // for its batch keeps its entry from the reaper meanwhile.
        if let Some(held) = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(entry)
        {
            held.answering = true;
        }
        let answer = answers::Answer {
            entry: entry.to_owned(),
            result,
        };
        let res = self.answers.send(answer).await;
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(entry);
        res
    }

    /// Runs a task in a local worker, within its deadline; which worker, how it ended,
    /// and the events it emitted.
    /// `None`: it was cancelled (before it started, or its worker was stopped), and
    /// nobody waits for its result.
    async fn run(
        &self,
        con: &mut Con,
        task: &TaskFrame,
        args: serde_bytes::ByteBuf,
        lapses: u64,
    ) -> Option<(String, End, TaskEvents)> {
        let Some(name) = intern(&task.target_name) else {
            let reason = "too many distinct target names".to_owned();
            let failed = End::Failed { reason };
            return Some((String::new(), failed, TaskEvents::default()));
        };
        let target = TargetRef {
            offset: task.target,
            name,
        };
        let cancel = frame::cancel_name(&task.parent, task.task);
        let args = Bytes::from(args.into_vec());
        // Redis is asked only what this node cannot know (see `Cancels`): whether a
        // cancel it may have missed is in the cancelled set, whether a parent it has not
        // seen within a heartbeat is alive (one that is gone wants nothing).
        let mut seen = lapses;
        // Redis answered since `seen`: what it said holds until the next lapse.
        let mut looked = false;
        let (id, rx) = loop {
            {
                let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
                if c.early.remove(&cancel) {
                    return None;
                }
                // A retry's entry is a new one, which the parent's cancel does not
                // delete (it knows the first): its cancel may have come before it
                // was read. A node not sure it hears the channel asks every time.
                let ask_cancelled =
                    c.lapses != seen || (!looked && (!c.hearing || task.attempt > 0));
                let ask_alive = !looked
                    && c.alive
                        .get(&task.parent)
                        .is_none_or(|at| at.elapsed() >= crate::pool::remote::reaper::HEARTBEAT);
                if !ask_cancelled && !ask_alive {
                    match self.pool.submit_encoded(target, args) {
                        Ok((id, rx)) => {
                            c.running.insert(cancel.clone(), id);
                            break (id, rx);
                        }
                        Err(e) => {
                            let failed = End::from_error(&e);
                            return Some((String::new(), failed, TaskEvents::default()));
                        }
                    }
                }
                seen = c.lapses;
            }
            let mut lookup = redis::pipe();
            lookup
                .cmd("ZSCORE")
                .arg(self.keys.cancelled())
                .arg(&cancel)
                .cmd("EXISTS")
                .arg(self.keys.parent(&task.parent));
            let listed: redis::RedisResult<(Option<f64>, bool)> =
                remote::again_once(con, &lookup).await;
            match listed {
                Ok((Some(_), _)) => return None,
                Ok((None, false)) => {
                    tracing::info!(target: "procpool::remote", task = %cancel,
                        "the task's parent is gone; dropped unstarted");
                    return None;
                }
                Ok((None, true)) => {
                    looked = true;
                    let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
                    c.alive
                        .insert(task.parent.clone(), tokio::time::Instant::now());
                }
                Err(e) => {
                    // Started all the same, as if both answers were no: nothing is
                    // known, and a task that never ran is worse than one stopped later.
                    // Its parent is not marked alive for the others.
                    tracing::warn!(target: "procpool::remote", "cannot look up cancels: {e}");
                    looked = true;
                }
            }
        };
        let (worker, end) = self.wait(task, id, rx).await;
        // Its worker's events came before its answer; any later (a worker killed at the
        // deadline) are not kept.
        let events = crate::log::capture::take(id);
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
        Some((worker, end, events))
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
    // As a child does: `main` (whose start-up ignores SIGPIPE) never runs, and a write
    // to a connection Redis has just dropped, or to a worker just killed, would end
    // the node without a word.
    crate::target::ignore_sigpipe();
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
    match run_here(config, std::future::pending()) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(target: "procpool::lifecycle", "the node stopped: {e}");
            std::process::exit(1);
        }
    }
}
