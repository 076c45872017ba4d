//! Speed through Redis Streams (feature `redis`): one node of 2 workers on loopback,
//! guarantees included. Prints JSON lines as `examples/compare` does.
//!
//! ```sh
//! cargo run --release --features redis --example remote_bench
//! ```

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use procpool::AsyncPool;
use procpool::remote::Redis;

const KEY: &str = "bench-key";

fn inc(x: u64) -> u64 {
    x + 1
}

fn row(workload: &str, metric: &str, value: f64, unit: &str) {
    println!(
        r#"{{"system": "procpool-redis", "workload": "{workload}", "metric": "{metric}", "value": {value}, "unit": "{unit}"}}"#
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("procpool-rbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("r.sock");
    let redis = Command::new("redis-server")
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
        .spawn()?;
    let _redis = KillOnDrop(redis);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let url = format!("unix://{}", socket.display());
    let node = Command::new(std::env::current_exe()?)
        .env("PROCPOOL_NODE", &url)
        .env("PROCPOOL_NAMESPACE", "bench")
        .env("PROCPOOL_KEY", KEY)
        .env("PROCPOOL_NODE_PROCESSES", "2")
        .stderr(Stdio::null())
        .spawn()?;
    let _node = KillOnDrop(node);
    let pool = AsyncPool::builder()
        .backend(Redis::new(&url).namespace("bench").key(KEY))
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await?;
    // `remote_bench apply_async_100k` runs that row only (for a profiler, say).
    let only: Vec<String> = std::env::args().skip(1).collect();
    let want = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    for i in 0..200 {
        pool.apply(inc, (i,)).await?;
    }
    if want("rtt_apply") {
        rtt(&pool).await?;
    }
    if want("apply_async_100k") {
        apply_async(&pool).await?;
    }
    if want("map_1m") {
        map(&pool).await?;
    }
    pool.close().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

async fn rtt(pool: &AsyncPool) -> procpool::Result<()> {
    let mut rtts = Vec::new();
    for i in 0..2000 {
        let t = Instant::now();
        pool.apply(inc, (i,)).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    row("rtt_apply", "median", rtts[rtts.len() / 2], "us");
    row("rtt_apply", "p99", rtts[rtts.len() * 99 / 100], "us");
    Ok(())
}

async fn apply_async(pool: &AsyncPool) -> procpool::Result<()> {
    let n: u32 = 100_000;
    let t = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| pool.apply_async(inc, (u64::from(i),)))
        .collect();
    for h in handles {
        h.await?;
    }
    row(
        "apply_async_100k",
        "throughput",
        f64::from(n) / t.elapsed().as_secs_f64(),
        "tasks/s",
    );
    Ok(())
}

async fn map(pool: &AsyncPool) -> procpool::Result<()> {
    let items: Vec<u64> = (0..1_000_000).collect();
    let t = Instant::now();
    let out = pool.map(inc, items).await?;
    assert_eq!(out.len(), 1_000_000);
    row(
        "map_1m",
        "throughput",
        1e6 / t.elapsed().as_secs_f64(),
        "items/s",
    );
    Ok(())
}

/// Kills and reaps the child on drop: the server and the node go with the bench, also
/// when it fails or panics (a closed stdout, say).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("cannot stop pid {}: {e}", self.0.id());
        }
        if let Err(e) = self.0.wait() {
            eprintln!("cannot reap pid {}: {e}", self.0.id());
        }
    }
}
