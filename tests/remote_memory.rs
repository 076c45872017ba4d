//! Memory bounds of a remote pool (DESIGN.md §10): `imap` over a long input keeps a
//! window of chunks in Redis and the parent's memory flat; an argument Redis cannot hold
//! is `Encode` at submit. Needs `redis-server` (skips without it, unless
//! `PROCPOOL_REQUIRE_REDIS` is set).
#![cfg(feature = "redis")]

mod support;

#[path = "support/redis.rs"]
mod redis_support;

use futures::StreamExt;
use procpool::Error;
use redis_support::{Nodes, RedisServer, namespace, remote_pool};
use std::time::Duration;

use support::{TempDir, eventually_async, gated_append, ran, status_kib, write_file};

const KEY: &str = "memory-test-key";

fn len_of(b: serde_bytes::ByteBuf) -> usize {
    b.len()
}

fn plus_one(x: u64) -> u64 {
    x + 1
}

/// The length of the one stream matching `pattern`, 0 if there is none yet.
async fn xlen(con: &mut redis::aio::MultiplexedConnection, pattern: &str) -> usize {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(con)
        .await
        .unwrap();
    assert!(keys.len() <= 1, "{keys:?}");
    match keys.first() {
        Some(k) => redis::cmd("XLEN").arg(k).query_async(con).await.unwrap(),
        None => 0,
    }
}

#[tokio::test]
async fn an_argument_redis_cannot_hold_is_encode_at_submit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("too-big");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await;
    let big = serde_bytes::ByteBuf::from(vec![1u8; 513 << 20]);
    match pool.apply(len_of, (big,)).await {
        Err(Error::Encode { reason, .. }) => assert!(reason.contains("512 MiB"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The pool goes on.
    let fine = serde_bytes::ByteBuf::from(vec![1u8; 1 << 20]);
    assert_eq!(pool.apply(len_of, (fine,)).await.unwrap(), 1 << 20);
}

#[tokio::test]
async fn imap_over_ten_million_items_keeps_a_window_in_redis_and_the_parents_memory_flat() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("imap-window");
    let nodes = Nodes::start_logged(&server, &ns, KEY, 1, 2);
    let pool = remote_pool(&server, &ns, KEY).await;
    // Chunks in flight: the window is 4 per worker of the nodes the pool started with.
    let window = 4 * pool.processes();
    let mut con = server.connect().await;
    let (tasks, results) = (format!("{{pp:{ns}}}:b:*:tasks"), format!("{{pp:{ns}}}:r:*"));
    const N: u64 = 10_000_000;
    let mut out = pool.imap(plus_one, 0..N).chunksize(20_000);
    let (mut seen, mut longest, mut rss_at_1m) = (0u64, (0, 0), 0);
    while let Some(r) = out.next().await {
        seen += 1;
        assert_eq!(r.unwrap(), seen, "in order, nothing lost");
        if seen % 200_000 == 0 {
            longest.0 = longest.0.max(xlen(&mut con, &tasks).await);
            longest.1 = longest.1.max(xlen(&mut con, &results).await);
        }
        if seen == 1_000_000 {
            rss_at_1m = status_kib("VmRSS");
        }
    }
    assert_eq!(seen, N);
    assert!(longest.0 > 0, "the task stream was never seen");
    let grown_kib = status_kib("VmRSS").saturating_sub(rss_at_1m);
    // Entries queued or running, and results not read yet: the window and a few more.
    assert!(
        longest.0 <= window + 2 && longest.1 <= window + 2,
        "streams grew to {longest:?} entries (window {window})"
    );
    assert!(
        grown_kib < 64 << 10,
        "the parent grew by {grown_kib} KiB from item 1 M to item 10 M"
    );
    // A healthy run warns of nothing (a heartbeat racing an answer once did).
    let log = nodes.log(nodes.pids()[0]);
    assert!(!log.contains(" WARN "), "{log}");
}

/// 6,000 tasks submitted at once to a pool whose node has one worker: 4,096 (the
/// window) are written to Redis, the rest wait in the pool; one given up while it waits
/// never runs; every other one completes once.
#[tokio::test]
async fn a_remote_pool_keeps_at_most_its_window_of_tasks_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("pool-window");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await;
    let mut con = server.connect().await;
    let dir = TempDir::new("remote-window");
    let (gate, log) = (dir.path("gate"), dir.path("log"));
    const N: u32 = 6_000;
    const WINDOW: usize = 4_096;
    let mut handles: Vec<_> = (0..N)
        .map(|i| pool.apply_async(gated_append, (gate.clone(), log.clone(), i)))
        .collect();
    let waiting = usize::try_from(N).unwrap() - WINDOW;
    assert!(
        eventually_async(Duration::from_secs(30), || pool.stats().queued == waiting).await,
        "{:?}",
        pool.stats()
    );
    assert_eq!(pool.stats().running, WINDOW);
    let tasks = format!("{{pp:{ns}}}:b:*:tasks");
    let in_redis = xlen(&mut con, &tasks).await;
    assert_eq!(in_redis, WINDOW, "entries in the task stream");
    // The last one waits here: given up, it is taken out before the gate opens.
    drop(handles.pop());
    assert!(
        eventually_async(Duration::from_secs(10), || pool.stats().cancelled == 1).await,
        "{:?}",
        pool.stats()
    );
    write_file(&gate, "open");
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), u32::try_from(i).unwrap());
    }
    assert_eq!(
        ran(&log),
        (0..N - 1).collect::<Vec<_>>(),
        "each ran once, but the last"
    );
    // The stats follow the last answer.
    let idle = || {
        let s = pool.stats();
        (s.queued, s.running, s.completed) == (0, 0, u64::from(N - 1))
    };
    assert!(
        eventually_async(Duration::from_secs(10), idle).await,
        "{:?}",
        pool.stats()
    );
}
