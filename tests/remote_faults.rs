//! The remote fault table, first rows (DESIGN.md §10): a timeout or a dropped handle
//! stops the task's worker on its node (its process group with it), a cancelled task not
//! started never runs, a crash on a node is `WorkerDied` once. Needs `redis-server`
//! (skips without it, unless `PROCPOOL_REQUIRE_REDIS` is set).
#![cfg(feature = "redis")]

mod support;

#[path = "support/redis.rs"]
mod redis_support;

use std::time::{Duration, Instant};

use procpool::remote::Redis;
use procpool::{AsyncPool, Error, ExitReason};
use redis_support::{Nodes, Proxy, RedisServer, namespace, task_stream, zcard_reaches};
use support::{TempDir, eventually, is_dead, read_file_within, read_line_within, write_file};

const KEY: &str = "another-test-key";

fn doubler(x: i64) -> i64 {
    x * 2
}

/// Writes its pid and that of a `sleep` it started (same process group), then sleeps.
fn sleeper(dir: String) -> u8 {
    let mut sleep = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    write_file(
        &format!("{dir}/pids"),
        &format!("{} {}", std::process::id(), sleep.id()),
    );
    // Killed with its worker's process group long before it ends.
    sleep.wait().map_or(1, |_| 0)
}

fn touch(path: String) -> bool {
    std::fs::write(path, b"ran").is_ok()
}

/// Counts its run in a file, then aborts (SIGABRT).
fn crash(path: String) -> u8 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(b"ran\n").unwrap();
    drop(f);
    std::process::abort()
}

/// Notes its run (its node's pid) in `path`; the first run then hangs, a second returns
/// how many runs there were.
fn first_run_hangs(path: String) -> usize {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    writeln!(f, "{}", std::os::unix::process::parent_id()).unwrap();
    drop(f);
    let runs = std::fs::read_to_string(&path).unwrap().lines().count();
    if runs == 1 {
        std::thread::sleep(Duration::from_secs(600));
    }
    runs
}

async fn remote_pool(server: &RedisServer, ns: &str) -> AsyncPool {
    remote_pool_with(server, ns, 0).await
}

async fn remote_pool_with(server: &RedisServer, ns: &str, retries: u32) -> AsyncPool {
    AsyncPool::builder()
        .backend(Redis::new(&server.url).namespace(ns).key(KEY))
        .retries(retries)
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await
        .unwrap()
}

fn pids(dir: &TempDir) -> Vec<u32> {
    read_file_within(&dir.path("pids"), Duration::from_secs(30))
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Starts `sleeper` on `pool`; its handle and the pids of its worker and its `sleep`.
fn start_sleeper(pool: &AsyncPool, dir: &TempDir) -> (procpool::TaskHandle<u8>, u32, u32) {
    let running = pool.apply_async(sleeper, (dir.root().to_string_lossy().into_owned(),));
    let [worker, sleep] = pids(dir)[..] else {
        panic!("two pids")
    };
    (running, worker, sleep)
}

/// Drops a running `sleeper` and checks that its worker and its `sleep` are stopped
/// within 5 s.
fn a_dropped_sleeper_is_stopped(pool: &AsyncPool, tag: &str) {
    let dir = TempDir::new(tag);
    let (running, worker, sleep) = start_sleeper(pool, &dir);
    drop(running);
    assert!(eventually(Duration::from_secs(5), || is_dead(worker) && is_dead(sleep)));
}

#[tokio::test]
async fn a_timeout_stops_the_task_and_its_process_group_on_the_node() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("timeout");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 2);
    let pool = remote_pool(&server, &ns).await;
    let dir = TempDir::new("remote-timeout");
    let t0 = Instant::now();
    let res = pool
        .apply(sleeper, (dir.root().to_string_lossy().into_owned(),))
        .timeout(Duration::from_millis(200))
        .await;
    let took = t0.elapsed();
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    if std::path::Path::new(&dir.path("pids")).exists() {
        // It ran: its worker and the worker's own subprocess are stopped.
        for pid in pids(&dir) {
            assert!(
                eventually(Duration::from_secs(5), || is_dead(pid)),
                "{pid} lives"
            );
        }
    } else {
        // Cancelled before it started: it never starts.
        assert!(!eventually(Duration::from_secs(2), || {
            std::path::Path::new(&dir.path("pids")).exists()
        }));
    }
    // The node keeps serving.
    assert_eq!(pool.apply(doubler, (4,)).await.unwrap(), 8);
}

#[tokio::test]
async fn dropping_a_running_remote_task_kills_it_and_a_dropped_queued_one_never_runs() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("drop");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns).await;
    let dir = TempDir::new("remote-drop");
    let marker = dir.path("queued-ran");
    let running = pool.apply_async(sleeper, (dir.root().to_string_lossy().into_owned(),));
    let [worker, sleep] = pids(&dir)[..] else {
        panic!("two pids")
    };
    // Behind the sleeper on the node's only worker.
    let queued = pool.apply_async(touch, (marker.clone(),));
    // Written to Redis (so the node may have taken it) before it is dropped.
    assert!(eventually(Duration::from_secs(10), || pool.stats().running == 2));
    drop(queued);
    let t0 = Instant::now();
    drop(running);
    assert!(eventually(Duration::from_secs(5), || is_dead(worker) && is_dead(sleep)));
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
    // The node's pool is FIFO: a task submitted now ends after the dropped one would.
    assert_eq!(pool.apply(doubler, (5,)).await.unwrap(), 10);
    assert!(
        !std::path::Path::new(&marker).exists(),
        "a dropped task ran"
    );
    let s = pool.stats();
    assert_eq!(s.cancelled, 2, "{s:?}");
}

/// A cancel published while the node cannot hear it (its subscription dropped, and
/// refused by an ACL until the test allows it again) still stops its task, and the node
/// keeps trying until it hears the channel again.
#[tokio::test]
async fn a_node_refused_its_subscription_misses_no_cancel_and_listens_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("deaf");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns).await;
    let dir = TempDir::new("remote-deaf");
    let (running, worker, sleep) = start_sleeper(&pool, &dir);
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let subscribers = |con: &mut redis::aio::MultiplexedConnection| {
        let mut con = con.clone();
        async move {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut con)
                .await
                .unwrap();
            list.lines().count()
        }
    };
    assert_eq!(subscribers(&mut con).await, 1, "the node listens");
    let () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "-subscribe"][..])
        .query_async(&mut con)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"][..])
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(subscribers(&mut con).await, 0);
    drop(running);
    let cancelled = format!("{{pp:{ns}}}:cancelled");
    assert_eq!(
        zcard_reaches(&mut con, &cancelled, 1, Duration::from_secs(10)).await,
        1,
        "the parent published the cancel"
    );
    // Nobody heard it: the task still runs (the node retries its subscription).
    assert!(
        !is_dead(worker) && !is_dead(sleep),
        "stopped without the cancel"
    );
    let () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "+subscribe"][..])
        .query_async(&mut con)
        .await
        .unwrap();
    // Stopped all the same: its entry is gone, which the heartbeat notices, or the
    // cancelled set is looked up once the node hears the channel again.
    assert!(
        eventually(Duration::from_secs(10), || is_dead(worker)
            && is_dead(sleep)),
        "the missed cancel was never found"
    );
    // redis-rs took the refused SUBSCRIBE for a success: the node must notice that it
    // hears nothing and subscribe again, or it would stay deaf.
    let mut listening = false;
    for _ in 0..1000 {
        if subscribers(&mut con).await == 1 {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(listening, "the node never subscribed again");
    a_dropped_sleeper_is_stopped(&pool, "remote-deaf-2");
    assert_eq!(pool.apply(doubler, (4,)).await.unwrap(), 8);
}

#[tokio::test]
async fn a_crash_on_a_node_is_worker_died_with_its_signal_and_runs_once() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("crash");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns).await;
    let dir = TempDir::new("remote-crash");
    let count = dir.path("count");
    match pool.apply(crash, (count.clone(),)).await {
        Err(Error::WorkerDied { reason, name, .. }) => {
            assert_eq!(reason, ExitReason::Signal(6));
            assert!(name.starts_with("node-"), "{name}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pool.apply(doubler, (1,)).await.unwrap(), 2);
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "ran\n");
}

#[tokio::test]
async fn a_node_killed_mid_task_is_node_lost_within_seconds() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("lost");
    let mut nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns).await;
    let dir = TempDir::new("remote-lost");
    let handle = pool.apply_async(sleeper, (dir.root().to_string_lossy().into_owned(),));
    let worker = pids(&dir)[0];
    let t0 = Instant::now();
    nodes.kill(nodes.pids()[0]);
    match handle.await {
        Err(Error::NodeLost { node, .. }) => assert!(!node.is_empty()),
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    // 3 s of silence, then the next reaper round (1 s); generous on a loaded machine.
    assert!(took < Duration::from_secs(10), "NodeLost after {took:?}");
    assert!(eventually(Duration::from_secs(5), || is_dead(worker)));
}

#[tokio::test]
async fn with_a_retry_a_lost_task_completes_on_another_node_and_runs_at_most_twice() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("retry");
    let mut nodes = Nodes::start(&server, &ns, KEY, 2, 1);
    let pool = remote_pool_with(&server, &ns, 1).await;
    let dir = TempDir::new("remote-retry");
    let runs = dir.path("runs");
    let handle = pool.apply_async(first_run_hangs, (runs.clone(),));
    let first_node: u32 = read_line_within(&runs, Duration::from_secs(30))
        .parse()
        .unwrap();
    nodes.kill(first_node);
    assert_eq!(handle.await.unwrap(), 2);
    let lines: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_ne!(lines[0], lines[1], "the retry ran on the other node");
}

/// Run twice: by the test harness (it kills the parent it starts), and as that parent
/// (this test binary again, with `PROCPOOL_TEST_PARENT_OF` set).
#[tokio::test]
async fn a_dead_parents_running_task_is_stopped_and_its_queued_one_dropped() {
    const ME: &str = "a_dead_parents_running_task_is_stopped_and_its_queued_one_dropped";
    if let Some(url) = std::env::var_os("PROCPOOL_TEST_PARENT_OF") {
        let ns = std::env::var("PROCPOOL_TEST_NS").unwrap();
        let dir = std::env::var("PROCPOOL_TEST_DIR").unwrap();
        let pool = AsyncPool::builder()
            .backend(Redis::new(url.to_string_lossy()).namespace(ns).key(KEY))
            .wait_for_nodes(Duration::from_secs(20))
            .build()
            .await
            .unwrap();
        let running = pool.apply_async(sleeper, (dir.clone(),));
        let queued = pool.apply_async(touch, (format!("{dir}/queued-ran"),));
        assert!(eventually(Duration::from_secs(10), || pool.stats().running == 2));
        write_file(&format!("{dir}/submitted"), "");
        // Killed here, holding both.
        let _held = (running, queued);
        std::future::pending::<()>().await;
    }
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("orphans");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let dir = TempDir::new("remote-orphans");
    let mut parent = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", ME, "--nocapture"])
        .env("PROCPOOL_TEST_PARENT_OF", &server.url)
        .env("PROCPOOL_TEST_NS", &ns)
        .env("PROCPOOL_TEST_DIR", dir.root())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let [worker, sleep] = pids(&dir)[..] else {
        panic!("two pids")
    };
    read_file_within(&dir.path("submitted"), Duration::from_secs(30));
    parent.kill().unwrap();
    parent.wait().unwrap();
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || is_dead(worker)
            && is_dead(sleep)),
        "the dead parent's task still runs"
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(8), "stopped after {took:?}");
    // The node's pool is FIFO: a task of a live parent ends after the orphan would have.
    let pool = remote_pool(&server, &ns).await;
    assert_eq!(pool.apply(doubler, (3,)).await.unwrap(), 6);
    assert!(
        !std::path::Path::new(&dir.path("queued-ran")).exists(),
        "an orphan ran"
    );
}

/// Says it started, waits for `gate`, returns 1.
fn gated(started: String, gate: String) -> u8 {
    write_file(&started, "");
    support::wait_for_file(&gate);
    1
}

#[tokio::test]
async fn sigterm_drains_a_node_and_loses_nothing() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("drain");
    let mut nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns).await;
    let dir = TempDir::new("remote-drain");
    let (started, gate) = (dir.path("started"), dir.path("gate"));
    let held = pool.apply_async(gated, (started.clone(), gate.clone()));
    read_file_within(&started, Duration::from_secs(30));
    let node = nodes.pids()[0];
    nodes.terminate(node);
    // Taken by the draining node, or left in the stream for the next one.
    let after = pool.apply_async(doubler, (2,));
    write_file(&gate, "go");
    assert_eq!(held.await.unwrap(), 1, "the task it held finished");
    let st = nodes.wait(node, Duration::from_secs(20));
    assert!(st.success(), "the drained node exited with {st}");
    let _next = Nodes::start(&server, &ns, KEY, 1, 1);
    assert_eq!(after.await.unwrap(), 4, "nothing was lost");
}

/// Appends the id of its node (its worker's parent) to `dir/runs`; run `n` then waits
/// for `dir/go<n>`. Returns `n`.
fn held_per_run(dir: String) -> usize {
    use std::io::Write;
    let path = format!("{dir}/runs");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let me = std::process::id();
    writeln!(f, "{} {me}", std::os::unix::process::parent_id()).unwrap();
    drop(f);
    let n = std::fs::read_to_string(&path).unwrap().lines().count();
    support::wait_for_file(&format!("{dir}/go{n}"));
    n
}

/// The (node, worker) of each run of `held_per_run` so far.
fn runs_of(path: &str) -> Vec<(u32, u32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (node, worker) = l.split_once(' ').unwrap();
            (node.parse().unwrap(), worker.parse().unwrap())
        })
        .collect()
}

/// The first ten entries pending in the nodes' group of `stream`, and their consumers.
async fn pending_entries(
    con: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, String)> {
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("nodes")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(con)
        .await
        .unwrap();
    pending
        .into_iter()
        .map(|(id, who, _, _)| (id, who))
        .collect()
}

/// The task stream of `ns` has one entry pending, owned by the node of pid `node`.
async fn assert_one_entry_pending_for(server: &RedisServer, ns: &str, node: u32) {
    let mut con = server.connect().await;
    let stream = task_stream(&mut con, ns).await;
    let pending = pending_entries(&mut con, &stream).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert!(
        pending[0].1.contains(&format!("-{node}-")),
        "the entry is not node {node}'s: {pending:?}"
    );
}

/// One call of the node's answer script with answers for four entries read by consumer
/// `a`: one of them reclaimed by `b` meanwhile, one answered twice in the same batch,
/// one only taken off. Only `a`'s own entries are answered and taken off, each once;
/// `b`'s stays pending with `b`, and an entry read but not answered stays with `a`.
#[tokio::test]
async fn a_batch_of_answers_writes_only_what_the_node_still_owns() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut con = server.connect().await;
    let (stream, to_a, to_b) = ("{t}:tasks", "{t}:results-a", "{t}:results-b");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("nodes")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("f")
            .arg(i)
            .query_async(&mut con)
            .await
            .unwrap();
        ids.push(id);
    }
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("nodes")
        .arg("a")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(stream)
        .arg("nodes")
        .arg("b")
        .arg(0)
        .arg(&ids[1])
        .arg("JUSTID")
        .query_async(&mut con)
        .await
        .unwrap();
    // Two parents' result streams: each answer goes to its own.
    let result = |to: &str, f: &str| Some((to.to_owned(), f.as_bytes().to_vec(), b"mac".to_vec()));
    let answers = vec![
        (ids[0].clone(), result(to_a, "zero")),
        (ids[1].clone(), result(to_b, "one, reclaimed")),
        (ids[2].clone(), None),
        (ids[3].clone(), result(to_b, "three")),
        (ids[3].clone(), result(to_a, "three again")),
    ];
    let owned = procpool::remote::__answer(&server.url, stream, "a", answers)
        .await
        .unwrap();
    assert_eq!(owned, [true, false, true, true, false]);
    for (to, want) in [(to_a, "zero"), (to_b, "three")] {
        let written: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(to)
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .unwrap();
        let frames: Vec<&str> = written.iter().map(|(_, f)| f[0].1.as_str()).collect();
        assert_eq!(frames, [want], "in {to}");
    }
    let pending = pending_entries(&mut con, stream).await;
    let pending: Vec<(&str, &str)> = pending
        .iter()
        .map(|(id, who)| (id.as_str(), who.as_str()))
        .collect();
    assert_eq!(pending, [(ids[1].as_str(), "b"), (ids[4].as_str(), "a")]);
    let left: usize = redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(left, 2, "the answered entries are deleted, the others kept");
}

/// Node A runs a task and is paused (SIGSTOP) past the claim threshold: the task goes
/// to node B (a retry). A resumes while B still runs it, its own run finished
/// (`a_finishes`: its answer comes late) or still running (A must stop it). Either way
/// A's answer and ack must not touch B's entry, and the caller gets B's result.
async fn zombie(a_finishes: bool) {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("zombie");
    let nodes = Nodes::start_logged(&server, &ns, KEY, 2, 1);
    let pool = remote_pool_with(&server, &ns, 1).await;
    let dir = TempDir::new("remote-zombie");
    let runs = dir.path("runs");
    let handle = pool.apply_async(held_per_run, (dir.root().display().to_string(),));
    // The file exists a moment before its first line does.
    assert!(
        eventually(Duration::from_secs(30), || !runs_of(&runs).is_empty()),
        "the task never started"
    );
    let (first, first_worker) = runs_of(&runs)[0];
    nodes.signal(first, "STOP");
    let reclaimed = eventually(Duration::from_secs(30), || runs_of(&runs).len() == 2);
    assert!(
        reclaimed,
        "the task was not run again after its node stopped"
    );
    let (second, _) = runs_of(&runs)[1];
    assert_ne!(first, second, "the retry ran on the other node");
    if a_finishes {
        write_file(&dir.path("go1"), "go");
    }
    nodes.signal(first, "CONT");
    let found_out = eventually(Duration::from_secs(30), || {
        let log = nodes.log(first);
        log.contains("its result is dropped") || log.contains("no longer owns a task")
    });
    assert!(found_out, "node A never found out: {}", nodes.log(first));
    if !a_finishes {
        assert!(
            eventually(Duration::from_secs(10), || is_dead(first_worker)),
            "node A's stale run still goes on"
        );
    }
    // B's entry is still B's, pending; the caller has not been answered by A.
    assert_one_entry_pending_for(&server, &ns, second).await;
    write_file(&dir.path("go2"), "go");
    let got = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("answered");
    assert_eq!(
        got.unwrap(),
        2,
        "the caller got the retry's result, not A's"
    );
    assert_eq!(runs_of(&runs).len(), 2, "ran twice, no more");
}

#[tokio::test]
async fn a_zombie_nodes_late_result_is_ignored_and_its_ack_leaves_the_new_owners_entry() {
    zombie(true).await;
}

#[tokio::test]
async fn a_zombie_node_stops_the_task_it_lost_and_leaves_the_new_owners_entry() {
    zombie(false).await;
}

/// Node A runs a task and is cut off from Redis (a proxy that stops forwarding, its
/// connections left open): the task is reclaimed and run again on node B. A's run then
/// finishes and answers into the cut; on heal that late answer reaches Redis and is
/// refused (A no longer owns the entry): B's entry stays, the caller gets B's result.
#[tokio::test]
async fn a_node_cut_off_has_its_task_reclaimed_and_its_late_answer_fenced() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("cut");
    let proxies = [Proxy::start(&server), Proxy::start(&server)];
    let nodes = Nodes::start_via(&[&proxies[0].url, &proxies[1].url], &ns, KEY, 1);
    let pool = remote_pool_with(&server, &ns, 1).await;
    let dir = TempDir::new("remote-cut");
    let runs = dir.path("runs");
    let handle = pool.apply_async(held_per_run, (dir.root().display().to_string(),));
    // The file exists a moment before its first line does.
    assert!(
        eventually(Duration::from_secs(30), || !runs_of(&runs).is_empty()),
        "the task never started"
    );
    let (first, _) = runs_of(&runs)[0];
    let a = nodes.pids().iter().position(|&p| p == first).unwrap();
    proxies[a].cut();
    assert!(
        eventually(Duration::from_secs(30), || runs_of(&runs).len() == 2),
        "the task was not run again after its node was cut off"
    );
    let (second, _) = runs_of(&runs)[1];
    assert_ne!(first, second, "the retry ran on the other node");
    // A's run finishes; its answer (to this parent's result stream) is held by the cut.
    write_file(&dir.path("go1"), "go");
    let answer = format!("{{pp:{ns}}}:r:");
    assert!(
        eventually(Duration::from_secs(30), || proxies[a]
            .held_upstream_contains(&answer)),
        "node A never answered: {}",
        nodes.log(first)
    );
    proxies[a].heal();
    assert!(
        eventually(Duration::from_secs(30), || nodes
            .log(first)
            .contains("its result is dropped")),
        "node A's late answer was not refused: {}",
        nodes.log(first)
    );
    assert_one_entry_pending_for(&server, &ns, second).await;
    write_file(&dir.path("go2"), "go");
    let got = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("answered");
    assert_eq!(got.unwrap(), 2, "the caller got B's result, not A's");
    assert_eq!(runs_of(&runs).len(), 2, "ran twice, no more");
}

/// The Redis users DEPLOY.md gives a parent and a node (its `ACL SETUSER` lines, run
/// as written but for the namespace and passwords) are enough: a map, a cancelled
/// running task, and nothing refused in `ACL LOG`.
#[tokio::test]
async fn the_acl_users_of_deploy_md_are_enough() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("acl");
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await
        .unwrap();
    let version: Vec<u32> = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap()
        .trim()
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    let deploy =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/DEPLOY.md")).unwrap();
    for user in ["procpool-parent", "procpool-node"] {
        let line = deploy
            .lines()
            .find(|l| l.starts_with(&format!("ACL SETUSER {user} ")))
            .unwrap_or_else(|| panic!("DEPLOY.md has no ACL line for {user}"));
        let mut line = line
            .replace("{pp:thumbs}", &format!("{{pp:{ns}}}"))
            .replace("PARENT-PASSWORD", "parent-pw")
            .replace("NODE-PASSWORD", "node-pw");
        if version[..2] < [7, 2][..] {
            // As DEPLOY.md says: the command does not exist before 7.2.
            line = line.replace(" +client|setinfo", "");
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let () = redis::cmd(words[0])
            .arg(&words[1..])
            .query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    let as_user = |user: &str, pw: &str| format!("{}?user={user}&pass={pw}", server.url);
    let node_url = as_user("procpool-node", "node-pw");
    let nodes = Nodes::start_via(&[node_url.as_str()], &ns, KEY, 1);
    let pool = AsyncPool::builder()
        .backend(
            Redis::new(as_user("procpool-parent", "parent-pw"))
                .namespace(&ns)
                .key(KEY),
        )
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    let out = pool.map(doubler, 0..50).await.unwrap();
    assert_eq!(out, (0..50).map(|x| x * 2).collect::<Vec<i64>>());
    a_dropped_sleeper_is_stopped(&pool, "remote-acl");
    assert_eq!(pool.apply(doubler, (7,)).await.unwrap(), 14);
    let refused: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut con)
        .await
        .unwrap();
    let node_pid = nodes.pids()[0];
    assert!(
        refused.is_empty(),
        "refused: {refused:?}\nnode log:\n{}",
        nodes.log(node_pid)
    );
    assert!(
        !nodes.log(node_pid).contains("cannot hear"),
        "{}",
        nodes.log(node_pid)
    );
}

/// Counts itself in `dir` (one file per run), after a short wait.
fn counted(dir: String, i: u32) -> u32 {
    std::thread::sleep(Duration::from_millis(20));
    write_file(&format!("{dir}/ran-{i}"), "");
    i
}

fn runs_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ran-"))
        })
        .count()
}

/// `terminate` cancels what a remote pool has in flight on its nodes: the queued tasks
/// never start (their entries are deleted), the running one is stopped. Before, only
/// the parent's key went, and a node that had seen the parent alive within a second
/// went on starting its queued tasks for up to that second.
#[tokio::test]
async fn a_terminated_remote_pools_queued_tasks_never_start() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("terminate");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns).await;
    let dir = TempDir::new("remote-terminate");
    let root = dir.root().to_string_lossy().into_owned();
    let handles: Vec<_> = (0..300)
        .map(|i| pool.apply_async(counted, (root.clone(), i)))
        .collect();
    assert!(eventually(Duration::from_secs(30), || runs_in(dir.root()) >= 3));
    pool.terminate().await;
    let at_terminate = runs_in(dir.root());
    for h in handles {
        assert!(matches!(h.await, Err(Error::PoolClosed) | Ok(_)));
    }
    // Two seconds: past the heartbeat by which a node stops the tasks of a parent
    // that is gone, so a node that went on would have run about a hundred more.
    std::thread::sleep(Duration::from_secs(2));
    let later = runs_in(dir.root());
    // The one running as terminate was called may still finish its write.
    assert!(
        later <= at_terminate + 1,
        "{} tasks started after terminate",
        later - at_terminate
    );
}

/// A node runs before `main` (from `PROCPOOL_NODE`), so std's start-up, which ignores
/// SIGPIPE, never ran: a write to a connection Redis had just dropped (a restart) or to
/// a worker just killed then ended the node silently, and its tasks hung (seen: a
/// remote_outage test, one run in ten under load). The node ignores SIGPIPE itself.
#[tokio::test]
async fn a_node_ignores_sigpipe() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("sigpipe");
    let nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    // Serving: whatever the node does before `node` runs is done by then.
    let pool = remote_pool(&server, &ns).await;
    assert_eq!(pool.apply(doubler, (1,)).await.unwrap(), 2);
    let node = nodes.pids()[0];
    let status = std::fs::read_to_string(format!("/proc/{node}/status")).unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    const SIGPIPE: u32 = 13;
    assert!(
        ignored & (1 << (SIGPIPE - 1)) != 0,
        "SIGPIPE is not ignored in node {node} (SigIgn {ignored:x})"
    );
}

/// `procpool::remote::node` run from a program's own `main` (here, a test's runtime)
/// serves tasks; once its future is dropped it stops: its workers exit, with the
/// programs a running task started, and its registration is no longer renewed (it
/// lapses within 3 s).
#[tokio::test]
async fn a_node_run_from_main_serves_and_stops_when_dropped() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("in-main");
    let config = Redis::new(&server.url)
        .namespace(&ns)
        .key(KEY)
        .node_processes(1);
    let node = tokio::spawn(procpool::remote::node(config));
    let pool = remote_pool(&server, &ns).await;
    assert_eq!(pool.apply(doubler, (21,)).await.unwrap(), 42);
    let workers: Vec<u32> = procpool::active_children()
        .iter()
        .filter(|c| c.name().starts_with("node-"))
        .map(|c| c.pid())
        .collect();
    assert_eq!(workers.len(), 1, "{:?}", procpool::active_children());
    let dir = TempDir::new("remote-in-main");
    let (_running, worker, sleep) = start_sleeper(&pool, &dir);
    assert_eq!(worker, workers[0]);
    node.abort();
    assert!(node.await.unwrap_err().is_cancelled());
    assert!(
        eventually(Duration::from_secs(10), || is_dead(worker)),
        "the dropped node's worker {worker} still runs"
    );
    assert!(
        eventually(Duration::from_secs(10), || is_dead(sleep)),
        "the program its task started ({sleep}) still runs"
    );
    let mut con = server.connect().await;
    let key = format!("{{pp:{ns}}}:b:*:nodes");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // Registrations still valid: scored with their expiry (ms since the epoch).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let live: usize = redis::cmd("ZCOUNT")
            .arg(&keys[0])
            .arg(u64::try_from(now).unwrap())
            .arg("+inf")
            .query_async(&mut con)
            .await
            .unwrap();
        if live == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped node is still registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
