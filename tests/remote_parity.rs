//! The same `AsyncPool` through Redis Streams and two nodes (DESIGN.md §10): results as
//! the local pool gives them, frames refused without the key, and what cannot cross
//! machines refused at submit. Needs `redis-server` (skips without it, unless
//! `PROCPOOL_REQUIRE_REDIS` is set).
#![cfg(feature = "redis")]

mod support;

#[path = "support/redis.rs"]
mod redis_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use procpool::remote::Redis;
use procpool::{AsyncPool, Error, Queue, current_process};
use redis_support::{Nodes, RedisServer, namespace, task_stream, zcard_reaches};
use serde::{Deserialize, Serialize};
use support::TempDir;

const KEY: &str = "test-key-of-some-length";

fn doubler(x: i64) -> i64 {
    x * 2
}

fn add3(a: i32, b: i32, c: i32) -> i32 {
    a + b + c
}

fn whoami(_: u8) -> String {
    current_process().name().to_owned()
}

fn boom(_: u8) -> u8 {
    panic!("remote boom")
}

fn len_of(b: serde_bytes::ByteBuf) -> usize {
    b.len()
}

fn touch(path: String) -> bool {
    std::fs::write(path, b"ran").is_ok()
}

fn queue_len(q: Queue<u8>) -> usize {
    drop(q);
    0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
enum Shape {
    Circle { r: f64 },
    Square { side: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tagged {
    name: String,
    #[serde(flatten)]
    extra: BTreeMap<String, u32>,
}

fn area(s: Shape) -> Shape {
    match s {
        Shape::Circle { r } => Shape::Circle { r: r * 2.0 },
        Shape::Square { side } => Shape::Square { side: side * side },
    }
}

fn tag(mut t: Tagged) -> Tagged {
    t.extra.insert("seen".into(), 1);
    t
}

async fn remote_pool(server: &RedisServer, ns: &str, key: &str) -> procpool::Result<AsyncPool> {
    AsyncPool::builder()
        .backend(Redis::new(&server.url).namespace(ns).key(key))
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await
}

#[tokio::test]
async fn apply_map_starmap_imap_through_two_nodes_give_the_local_pools_results() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("parity");
    let _nodes = Nodes::start(&server, &ns, KEY, 2, 2);
    let pool = remote_pool(&server, &ns, KEY).await.unwrap();
    let local = AsyncPool::new(2).await.unwrap();

    assert_eq!(
        pool.map(doubler, vec![5, 10, 20]).await.unwrap(),
        vec![10, 20, 40]
    );
    assert_eq!(pool.apply(doubler, (21,)).await.unwrap(), 42);
    let triples = vec![(1, 2, 3), (4, 5, 6)];
    assert_eq!(
        pool.starmap(add3, triples.clone()).await.unwrap(),
        local.starmap(add3, triples).await.unwrap()
    );
    let xs: Vec<i64> = (0..200).collect();
    let ours: Vec<i64> = pool
        .imap(doubler, xs.clone())
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(ours, local.map(doubler, xs.clone()).await.unwrap());
    let mut unordered: Vec<i64> = pool
        .imap_unordered(doubler, xs.clone())
        .map(|r| r.unwrap())
        .collect()
        .await;
    unordered.sort_unstable();
    assert_eq!(unordered, ours);
    let shapes = vec![Shape::Circle { r: 1.5 }, Shape::Square { side: 3.0 }];
    assert_eq!(
        pool.map(area, shapes.clone()).await.unwrap(),
        local.map(area, shapes).await.unwrap()
    );
    let t = Tagged {
        name: "x".into(),
        extra: [("a".to_owned(), 7)].into(),
    };
    assert_eq!(
        pool.apply(tag, (t.clone(),)).await.unwrap(),
        local.apply(tag, (t,)).await.unwrap()
    );
    let big = serde_bytes::ByteBuf::from(vec![7u8; 5 << 20]);
    assert_eq!(pool.apply(len_of, (big,)).await.unwrap(), 5 << 20);

    // The node ran it, in one of its workers, and says so in names and errors.
    let names = pool.map(whoami, vec![0u8; 8]).await.unwrap();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("node-") && n.contains(":PoolWorker-")),
        "{names:?}"
    );
    match pool.apply(boom, (0,)).await {
        Err(Error::Panicked { message, name, .. }) => {
            assert!(message.contains("remote boom"), "{message}");
            assert!(
                name.starts_with("node-") && name.contains(":PoolWorker-"),
                "{name}"
            );
        }
        other => panic!("{other:?}"),
    }
    pool.close().await;
    local.close().await;
}

#[tokio::test]
async fn without_a_node_of_this_build_the_pool_is_no_compatible_nodes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let t0 = Instant::now();
    let res = AsyncPool::builder()
        .backend(
            Redis::new(&server.url)
                .namespace(namespace("empty"))
                .key(KEY),
        )
        .wait_for_nodes(Duration::from_millis(300))
        .build()
        .await;
    match res {
        Err(Error::NoCompatibleNodes { waited, build, .. }) => {
            assert_eq!(waited, Duration::from_millis(300));
            assert!(
                build.starts_with("id-") || build.starts_with("sha-"),
                "{build}"
            );
        }
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_task_signed_with_another_key_or_unsigned_is_never_run() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("auth");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let dir = TempDir::new("remote-auth");
    let marker = dir.path("ran");
    // Registered nodes are visible with any key: only frames are authenticated.
    let forger = remote_pool(&server, &ns, "not-the-key").await.unwrap();
    let res = forger
        .apply(touch, (marker.clone(),))
        .timeout(Duration::from_secs(2))
        .await;
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    // A raw entry with no MAC at all.
    let mut con = server.connect().await;
    let streams: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{pp:{ns}}}:b:*:tasks"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(streams.len(), 1, "{streams:?}");
    let _: String = redis::cmd("XADD")
        .arg(&streams[0])
        .arg("*")
        .arg("f")
        .arg(b"\x93\x01\x02\x03".as_slice())
        .query_async(&mut con)
        .await
        .unwrap();
    let dead = format!("{{pp:{ns}}}:dead");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let n: usize = redis::cmd("XLEN")
            .arg(&dead)
            .query_async(&mut con)
            .await
            .unwrap();
        if n == 2 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{n} frames in the dead letters after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!std::path::Path::new(&marker).exists(), "a forged task ran");
    // The node still serves tasks with the right key.
    let pool = remote_pool(&server, &ns, KEY).await.unwrap();
    assert!(pool.apply(touch, (marker.clone(),)).await.unwrap());
    assert!(std::path::Path::new(&marker).exists());
}

#[tokio::test]
async fn a_queue_cannot_reach_a_remote_task() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("local-only");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await.unwrap();
    let q: Queue<u8> = Queue::new();
    match pool.apply(queue_len, (q.clone(),)).await {
        Err(Error::UnsupportedArgument { .. }) => {}
        other => panic!("{other:?}"),
    }
    // In a map's items, or an imap's, as well: nothing of it runs.
    match pool.map(queue_len, vec![q.clone(), q.clone()]).await {
        Err(Error::UnsupportedArgument { .. }) => {}
        other => panic!("map: {other:?}"),
    }
    let got: Vec<_> = pool
        .imap(queue_len, vec![q.clone(), q.clone()])
        .collect()
        .await;
    assert!(
        matches!(got.as_slice(), [Err(Error::UnsupportedArgument { .. })]),
        "imap: {got:?}"
    );
    // The pool still serves.
    assert_eq!(pool.apply(doubler, (4,)).await.unwrap(), 8);
}

/// A long task: which node's worker ran it.
fn slow_whoami(_: u8) -> String {
    std::thread::sleep(Duration::from_millis(300));
    current_process().name().to_owned()
}

/// `XPENDING <stream> <group>`: how many, the first and last ids, and by consumer.
type PendingSummary = (
    u64,
    Option<String>,
    Option<String>,
    Option<Vec<(String, u64)>>,
);

/// The entries each node holds (read, not answered), by consumer.
async fn held(con: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<(String, u64)> {
    let (_, _, _, by): PendingSummary = redis::cmd("XPENDING")
        .arg(stream)
        .arg("nodes")
        .query_async(con)
        .await
        .unwrap();
    by.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_long_tasks_is_shared_by_the_nodes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("share");
    let _nodes = Nodes::start(&server, &ns, KEY, 2, 1);
    let pool = remote_pool(&server, &ns, KEY).await.unwrap();
    let mut con = server.connect().await;
    let stream = task_stream(&mut con, &ns).await;
    // Both nodes are up (registered, just before they read).
    let nodes = stream.replace(":tasks", ":nodes");
    let up = zcard_reaches(&mut con, &nodes, 2, support::SOON).await;
    assert_eq!(up, 2, "{up} node(s) up");

    // Eight tasks of 300 ms for two nodes of one worker: a node holds two of them at
    // most (the one it runs and the next), and leaves the rest to the other; before,
    // one node took up to 16 and the other sat idle.
    let burst = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.map(slow_whoami, vec![0u8; 8])
                .chunksize(1)
                .await
                .unwrap()
        }
    });
    let mut most = 0;
    while !burst.is_finished() {
        for (_, n) in held(&mut con, &stream).await {
            most = most.max(n);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let names = burst.await.unwrap();
    assert!(most <= 2, "a node held {most} long tasks at once");
    let mut by_node = BTreeMap::new();
    for n in &names {
        let node = n.split(':').next().unwrap().to_owned();
        *by_node.entry(node).or_insert(0) += 1;
    }
    assert_eq!(by_node.len(), 2, "{names:?}");
    assert!(by_node.values().all(|&n| n >= 2), "{by_node:?}");
}

/// Results written to a parent's result stream by someone without the key (no MAC, a
/// wrong one, a frame that is not one) are dropped: the caller gets its task's own
/// result, and the pool goes on.
#[tokio::test]
async fn a_spoofed_result_is_dropped() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("spoof");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await.unwrap();
    // A first result makes the parent's result stream, to find its name.
    assert_eq!(pool.apply(doubler, (1,)).await.unwrap(), 2);
    let mut con = server.connect().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{pp:{ns}}}:r:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // A real result, read beside the parent's reader (from the stream's last id, so
    // whichever reaches Redis first), to forge one of the right shape.
    let info: redis::streams::StreamInfoStreamReply = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(&keys[0])
        .query_async(&mut con)
        .await
        .unwrap();
    let mut watcher = server.connect().await;
    let watch = async {
        let r: redis::streams::StreamReadReply = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(10_000)
            .arg("STREAMS")
            .arg(&keys[0])
            .arg(&info.last_generated_id)
            .query_async(&mut watcher)
            .await
            .unwrap();
        r
    };
    let (seen, two) = tokio::join!(watch, async { pool.apply(doubler, (1,)).await });
    assert_eq!(two.unwrap(), 2);
    let real = &seen.keys[0].ids[0];
    let (mut f, m): (Vec<u8>, Vec<u8>) = (real.get("f").unwrap(), real.get("m").unwrap());
    // The frame is a MessagePack map whose first entry is `task`, a small number: the
    // next task's id is one more.
    let at = f.windows(5).position(|w| w == b"\xa4task").unwrap() + 5;
    assert!(f[at] < 0x7f, "task id byte {:#x}", f[at]);
    f[at] += 1;
    let dir = TempDir::new("remote-spoof");
    let (gate, log) = (dir.path("gate"), dir.path("log"));
    let handle = pool.apply_async(support::gated_append, (gate.clone(), log, 7));
    // While it waits for the gate: forgeries without a MAC, with a wrong one, and that
    // real answer (2) made the waiting task's, under the MAC of the frame it was.
    let forged: [&[(&str, &[u8])]; 3] = [
        &[("f", &f)],
        &[("f", &f), ("m", &[0u8; 32])],
        &[("f", &f), ("m", &m)],
    ];
    for fields in forged {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&keys[0]).arg("*");
        for (k, v) in fields {
            xadd.arg(*k).arg(*v);
        }
        let _: String = xadd.query_async(&mut con).await.unwrap();
    }
    // Read (and deleted) by the parent before the task can finish.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let n: usize = redis::cmd("XLEN")
            .arg(&keys[0])
            .query_async(&mut con)
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        assert!(Instant::now() < until, "{n} forged results still unread");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    support::write_file(&gate, "open");
    let got = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the task's own result arrives");
    assert_eq!(got.unwrap(), 7);
    assert_eq!(pool.apply(doubler, (21,)).await.unwrap(), 42);
    // Four tasks completed, none failed (the stats follow the last answer).
    let counted = || {
        let s = pool.stats();
        (s.completed, s.failed, s.running) == (4, 0, 0)
    };
    assert!(
        support::eventually_async(Duration::from_secs(10), counted).await,
        "{:?}",
        pool.stats()
    );
}
