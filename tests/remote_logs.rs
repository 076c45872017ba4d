//! A remote task's `tracing` events reach the subscriber of the parent that submitted it
//! (DESIGN.md §10), named after the node's worker, with their fields, bounded per task.
//! Needs `redis-server` (skips without it, unless `PROCPOOL_REQUIRE_REDIS` is set).
#![cfg(feature = "redis")]

mod support;

#[path = "support/capture.rs"]
mod capture_support;

#[path = "support/redis.rs"]
mod redis_support;

use redis_support::{Nodes, RedisServer, namespace, remote_pool};
// For the fixture (`super::TempDir`).
use support::TempDir;

use capture_support::{capture, events_where};

const KEY: &str = "logs-test-key";

fn greets(request: u32) -> String {
    tracing::warn!(request, "hello from a node");
    // From another thread of the task too.
    std::thread::spawn(move || tracing::info!(request, "and from its thread"))
        .join()
        .unwrap();
    procpool::current_process().name().to_owned()
}

#[tokio::test]
async fn a_remote_tasks_events_reach_the_parent_named_after_its_node_worker() {
    capture();
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("logs");
    let _nodes = Nodes::start_logged(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await;
    let worker = pool.apply(greets, (7,)).await.unwrap();
    assert!(
        worker.starts_with("node-") && worker.contains(":PoolWorker-"),
        "{worker}"
    );
    // Emitted here before the result was handed on.
    let evs = events_where(|c| c.process == worker);
    let hello = evs
        .iter()
        .find(|e| e.message == "hello from a node")
        .unwrap_or_else(|| panic!("not forwarded: {evs:?}"));
    assert_eq!(hello.level, "WARN");
    assert_eq!(hello.target, "remote_logs", "its own target");
    assert_eq!(hello.child_target, "remote_logs");
    assert_eq!(hello.fields, "request=7");
    let thread = evs
        .iter()
        .find(|e| e.message == "and from its thread")
        .unwrap_or_else(|| panic!("the thread's event is missing: {evs:?}"));
    assert_eq!(thread.fields, "request=7");
    assert_eq!(hello.span, None, "submitted in no span");
    // Each task's events come once, with that task; inside the span it was submitted in.
    let span = tracing::info_span!("remote_request", request = 8);
    let got = tracing::Instrument::instrument(pool.apply(greets, (8,)), span).await;
    assert_eq!(got.unwrap(), worker);
    let hellos = events_where(|c| c.process == worker && c.message == "hello from a node");
    let requests: Vec<&str> = hellos.iter().map(|e| e.fields.as_str()).collect();
    assert_eq!(requests, ["request=7", "request=8"]);
    assert_eq!(hellos[1].span, Some("remote_request"), "{hellos:?}");
}

fn chatty(n: u32) -> u32 {
    for i in 0..n {
        tracing::info!(i, "chatty");
    }
    n
}

#[tokio::test]
async fn a_remote_tasks_events_are_bounded_and_the_rest_counted() {
    capture();
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("logs-bound");
    let _nodes = Nodes::start_logged(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns, KEY).await;
    assert_eq!(pool.apply(chatty, (1500,)).await.unwrap(), 1500);
    let got = events_where(|c| c.message == "chatty");
    assert_eq!(got.len(), 1000, "the first 1,000 travel");
    assert_eq!(got[999].fields, "i=999", "in order");
    let warned = events_where(|c| c.dropped > 0);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0].dropped, 500);
    assert_eq!(warned[0].level, "WARN");
}
