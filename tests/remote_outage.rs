//! Redis itself failing (DESIGN.md §10): killed and restarted empty, every handle
//! resolves, no child is left running, and the pool goes on with the new server. Needs
//! `redis-server` (skips without it, unless `PROCPOOL_REQUIRE_REDIS` is set).
#![cfg(feature = "redis")]

mod support;

#[path = "support/redis.rs"]
mod redis_support;

use std::time::Duration;

use procpool::Error;
use redis_support::{Nodes, RedisServer, namespace, remote_pool};
use support::{
    TempDir, eventually, eventually_async, gated_append, is_dead, ran, read_file_within, write_file,
};

const KEY: &str = "outage-test-key";

fn doubler(x: i64) -> i64 {
    x * 2
}

/// Writes its pid to `started`, then waits (up to a minute) for a file never written.
fn hold(started: String, never: String) -> u8 {
    write_file(&started, &std::process::id().to_string());
    support::wait_for_file(&never);
    1
}

#[tokio::test]
async fn a_redis_restart_resolves_every_handle_leaves_no_child_and_the_pool_goes_on() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("restart");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 2);
    let pool = remote_pool(&server, &ns, KEY).await;
    let dir = TempDir::new("remote-restart");
    let never = dir.path("never");
    // Two run (the node has two workers), one waits on the node.
    let handles: Vec<_> = (0..3)
        .map(|i| pool.apply_async(hold, (dir.path(&format!("started{i}")), never.clone())))
        .collect();
    let workers: Vec<u32> = (0..2)
        .map(|i| {
            read_file_within(&dir.path(&format!("started{i}")), Duration::from_secs(30))
                .parse()
                .unwrap()
        })
        .collect();
    server.restart();
    for (i, h) in handles.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .unwrap_or_else(|_| panic!("handle {i} still pending after the restart"));
        assert!(
            matches!(got, Err(Error::Backend { .. })),
            "handle {i}: {got:?}"
        );
    }
    for w in workers {
        assert!(
            eventually(Duration::from_secs(20), || is_dead(w)),
            "worker {w} still runs the task Redis lost"
        );
    }
    assert!(
        !std::path::Path::new(&dir.path("started2")).exists(),
        "the task that waited ran after all"
    );
    // The node re-registers and makes its group again; the pool reconnects.
    let again = tokio::time::timeout(Duration::from_secs(30), pool.apply(doubler, (21,)))
        .await
        .expect("the pool answers after the restart");
    assert_eq!(again.unwrap(), 42);
}

#[tokio::test]
async fn redis_gone_for_good_fails_what_is_in_flight_and_the_pool_serves_once_it_is_back() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("gone");
    let mut nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await;
    let dir = TempDir::new("remote-gone");
    let running = pool.apply_async(hold, (dir.path("started"), dir.path("never")));
    let worker: u32 = read_file_within(&dir.path("started"), Duration::from_secs(30))
        .parse()
        .unwrap();
    server.kill();
    let t0 = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the running task's handle resolves while Redis is down");
    assert!(matches!(got, Err(Error::Backend { .. })), "{got:?}");
    // The reconnect window is 3 s: not answered before it, nor long after.
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(2), "failed after {took:?}");
    // Submitted while Redis is down: an error at once, not a hang.
    let down = tokio::time::timeout(Duration::from_secs(20), pool.apply(doubler, (1,)))
        .await
        .expect("a task submitted while Redis is down is answered");
    assert!(matches!(down, Err(Error::Backend { .. })), "{down:?}");
    // The node gives up past the claim threshold, and stops its worker.
    let node = nodes.pids()[0];
    let st = nodes.wait(node, Duration::from_secs(30));
    assert!(!st.success(), "the node without Redis exited with {st}");
    assert!(
        eventually(Duration::from_secs(20), || is_dead(worker)),
        "worker {worker} outlived its node"
    );
    server.start_again();
    let _next = Nodes::start(&server, &ns, KEY, 1, 1);
    let again = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // The first submit may meet the connection that broke, or no node yet.
            if let Ok(v) = pool.apply(doubler, (21,)).await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the pool answers once Redis is back");
    assert_eq!(again, 42);
}

/// Redis restarts while tasks wait in the pool (beyond its window of 4,096 in Redis):
/// those in Redis fail with `Backend`, but those waiting lose nothing and run on the new
/// server, but for the few written while it was down (one task per pause, each
/// failing); nothing runs twice.
#[tokio::test]
async fn tasks_waiting_in_the_pool_survive_a_redis_restart() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("restart-waiting");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await;
    let dir = TempDir::new("remote-restart-waiting");
    let (gate, log) = (dir.path("gate"), dir.path("log"));
    const N: u32 = 5_000;
    const WINDOW: u32 = 4_096;
    let mut handles: Vec<_> = (0..N)
        .map(|i| Some(pool.apply_async(gated_append, (gate.clone(), log.clone(), i))))
        .collect();
    let waiting = usize::try_from(N - WINDOW).unwrap();
    assert!(
        eventually_async(Duration::from_secs(30), || pool.stats().queued == waiting).await,
        "{:?}",
        pool.stats()
    );
    server.kill();
    let down = std::time::Instant::now();
    // A task in Redis given up frees room: the pool tries to write a waiting one, which
    // fails while Redis is down.
    drop(handles[0].take());
    assert!(
        eventually_async(Duration::from_secs(20), || pool.stats().failed >= 1).await,
        "{:?}",
        pool.stats()
    );
    server.start_again();
    // Under the reconnect window (3 s), past which what waits fails too, and a node
    // without Redis stops.
    let outage = down.elapsed();
    assert!(
        outage < Duration::from_millis(2500),
        "Redis was down {outage:?}"
    );
    write_file(&gate, "open");
    let (mut ok, mut backend) = (Vec::new(), Vec::new());
    for (i, h) in handles.into_iter().enumerate() {
        let Some(h) = h else { continue };
        match tokio::time::timeout(Duration::from_secs(60), h).await {
            Ok(Ok(v)) => ok.push(v),
            Ok(Err(Error::Backend { .. })) => backend.push(u32::try_from(i).unwrap()),
            other => panic!("task {i}: {other:?}"),
        }
    }
    // Every one in Redis failed (their state went with it), and only a few waiting.
    assert!(
        ok.iter().all(|&i| i >= WINDOW),
        "a task Redis lost completed: {ok:?}"
    );
    assert!(
        ok.len() + 10 >= waiting,
        "{} of the {waiting} waiting tasks completed, {} failed",
        ok.len(),
        backend.len()
    );
    // What completed ran once; of the others, only a few: those the node held when
    // Redis went (it may finish one before it sees it lost; task 0, given up, too), and
    // a probe written to the new server before the pool heard it restarted.
    let ran = ran(&log);
    let mut extra = ran.clone();
    extra.retain(|i| !ok.contains(i));
    assert!(
        ok.iter().all(|i| ran.binary_search(i).is_ok()),
        "ran {} (of them {extra:?} not completed), completed {}",
        ran.len(),
        ok.len()
    );
    assert!(
        extra.iter().all(|&i| i == 0 || backend.contains(&i)) && extra.len() <= 8,
        "not completed but ran: {extra:?}"
    );
    let mut once = ran.clone();
    once.dedup();
    assert_eq!(once, ran, "a task ran twice");
    // Counted as they ended: those Redis lost failed, the one given up was cancelled.
    let counted = || {
        let s = pool.stats();
        let n = |v: &Vec<u32>| u64::try_from(v.len()).unwrap();
        (s.completed, s.failed, s.cancelled) == (n(&ok), n(&backend), 1)
    };
    assert!(
        eventually_async(Duration::from_secs(10), counted).await,
        "{:?}, {} completed, {} failed",
        pool.stats(),
        ok.len(),
        backend.len()
    );
}

/// Redis refuses writes but answers (out of memory here; read-only or MISCONF alike):
/// the tasks fail with `Backend` at once, a batch per round trip, not one per pause as
/// when it cannot be reached; once it takes writes again the pool serves.
#[tokio::test]
async fn tasks_redis_refuses_to_store_fail_at_once() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("refused");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await;
    assert_eq!(pool.apply(doubler, (1,)).await.unwrap(), 2);
    let mut con = server.connect().await;
    let set = |what: &'static str, v: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg(what).arg(v);
        cmd
    };
    let _: () = set("maxmemory-policy", "noeviction")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = set("maxmemory", "1").query_async(&mut con).await.unwrap();
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = (0..300).map(|i| pool.apply_async(doubler, (i,))).collect();
    for h in handles {
        let got = tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("a refused task is answered");
        match got {
            Err(Error::Backend { reason, .. }) => assert!(reason.contains("OOM"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "300 refused tasks took {took:?}"
    );
    let _: () = set("maxmemory", "0").query_async(&mut con).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(30), pool.apply(doubler, (21,)))
        .await
        .expect("the pool answers once Redis takes writes");
    assert_eq!(again.unwrap(), 42);
}
