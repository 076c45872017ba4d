//! Memory bounds of a remote pool (DESIGN.md §10): an argument Redis cannot hold is
//! `Encode` at submit. Needs `redis-server` (skips without it, unless
//! `PROCPOOL_REQUIRE_REDIS` is set).
#![cfg(feature = "redis")]

mod support;

#[path = "support/redis.rs"]
mod redis_support;

use std::time::Duration;

use procpool::remote::Redis;
use procpool::{AsyncPool, Error};
use redis_support::{Nodes, RedisServer, namespace};
use support::TempDir;

const KEY: &str = "memory-test-key";

fn len_of(b: serde_bytes::ByteBuf) -> usize {
    b.len()
}

async fn remote_pool(server: &RedisServer, ns: &str) -> AsyncPool {
    AsyncPool::builder()
        .backend(Redis::new(&server.url).namespace(ns).key(KEY))
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_argument_redis_cannot_hold_is_encode_at_submit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ns = namespace("too-big");
    let _nodes = Nodes::start(&server, &ns, KEY, 1, 1);
    let pool = remote_pool(&server, &ns).await;
    let big = serde_bytes::ByteBuf::from(vec![1u8; 513 << 20]);
    match pool.apply(len_of, (big,)).await {
        Err(Error::Encode { reason, .. }) => assert!(reason.contains("512 MiB"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The pool goes on.
    let fine = serde_bytes::ByteBuf::from(vec![1u8; 1 << 20]);
    assert_eq!(pool.apply(len_of, (fine,)).await.unwrap(), 1 << 20);
}
