//! The same pool, its tasks on two nodes through Redis Streams (feature `redis`).
//!
//! ```sh
//! cargo run --features redis --example cluster
//! ```
//!
//! Starts a `redis-server` of its own (unix socket, no persistence) and two nodes (this
//! example's own binary, in node mode through `PROCPOOL_NODE`), runs
//! `pool.map(doubler, [5, 10, 20])` on them and says which node and worker ran each
//! item, then kills a node in the middle of a task and shows the `NodeLost` its caller
//! gets.

#[path = "support/local_cluster.rs"]
mod local_cluster;

use std::time::{Duration, Instant};

use local_cluster::{INSTALL_REDIS, LocalCluster};
use procpool::remote::Redis;
use procpool::{AsyncPool, Error, current_process};

const KEY: &str = "cluster-example-key";

fn doubler(x: i64) -> i64 {
    x * 2
}

/// The item doubled, with the node (its pid) and the worker that ran it.
fn doubler_where(x: i64) -> (i64, u32, String) {
    let node = std::os::unix::process::parent_id();
    (x * 2, node, current_process().name().to_owned())
}

/// Says which node runs it (in `path`), then works for a minute.
fn long_task(path: String) -> u8 {
    let node = std::os::unix::process::parent_id();
    std::fs::write(&path, node.to_string()).expect("write the node's pid");
    std::thread::sleep(Duration::from_secs(60));
    0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(mut cluster) = LocalCluster::start("cluster", KEY, 2, 2).await? else {
        eprintln!("this example needs redis-server: {INSTALL_REDIS}");
        std::process::exit(1);
    };
    println!("redis-server on {}", cluster.url);
    println!("nodes started: pids {:?}", cluster.nodes);

    let pool = AsyncPool::builder()
        .backend(Redis::new(&cluster.url).namespace("cluster").key(KEY))
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await?;
    println!("{:?}", pool.map(doubler, vec![5, 10, 20]).await?);
    for (x, (doubled, node, worker)) in [5, 10, 20]
        .into_iter()
        .zip(pool.map(doubler_where, vec![5, 10, 20]).await?)
    {
        println!("  {x} -> {doubled} on node pid {node}, {worker}");
    }

    // A node dies in the middle of a task: its caller hears NodeLost (retries(0)).
    let marker = cluster.path("running-on");
    let task = pool.apply_async(long_task, (marker.clone(),));
    let node: u32 = loop {
        if let Ok(pid) = std::fs::read_to_string(&marker) {
            break pid.trim().parse()?;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("a long task runs on node pid {node}; killing that node");
    cluster.kill_node(node)?;
    let t0 = Instant::now();
    match task.await {
        Err(e @ Error::NodeLost { .. }) => {
            println!("after {:.1} s: {e}", t0.elapsed().as_secs_f64());
        }
        other => println!("unexpected: {other:?}"),
    }
    pool.close().await;
    Ok(())
}
