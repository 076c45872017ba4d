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
use support::{TempDir, eventually, is_dead, read_file_within, write_file};

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
