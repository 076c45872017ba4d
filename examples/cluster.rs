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

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // Gone already is fine: the point is that nothing outlives the example.
            if c.kill().is_ok() {
                c.wait().ok();
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("procpool-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("redis.sock");
    let redis = match Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
        ])
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "this example needs redis-server ({e}): install it with \
                 `apt-get install redis-server` (Debian, Ubuntu) or `brew install redis`"
            );
            std::process::exit(1);
        }
    };
    let mut children = Killed(vec![redis]);
    let until = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > until {
            return Err("redis-server did not open its socket within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let url = format!("unix://{}", socket.display());
    println!("redis-server on {url}");

    // Two nodes: this same executable with PROCPOOL_NODE set becomes a node before main.
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let node = Command::new(std::env::current_exe()?)
            .env("PROCPOOL_NODE", &url)
            .env("PROCPOOL_NAMESPACE", "cluster")
            .env("PROCPOOL_KEY", KEY)
            .env("PROCPOOL_NODE_PROCESSES", "2")
            .stderr(Stdio::null())
            .spawn()?;
        nodes.push(node.id());
        children.0.push(node);
    }
    println!("nodes started: pids {nodes:?}");

    let pool = AsyncPool::builder()
        .backend(Redis::new(&url).namespace("cluster").key(KEY))
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
    let marker = dir.join("running-on").to_string_lossy().into_owned();
    let task = pool.apply_async(long_task, (marker.clone(),));
    let node: u32 = loop {
        if let Ok(pid) = std::fs::read_to_string(&marker) {
            break pid.trim().parse()?;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("a long task runs on node pid {node}; killing that node");
    if let Some(c) = children.0.iter_mut().find(|c| c.id() == node) {
        c.kill()?;
        c.wait()?;
    }
    let t0 = Instant::now();
    match task.await {
        Err(e @ Error::NodeLost { .. }) => {
            println!("after {:.1} s: {e}", t0.elapsed().as_secs_f64());
        }
        other => println!("unexpected: {other:?}"),
    }
    pool.close().await;
    drop(children);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
