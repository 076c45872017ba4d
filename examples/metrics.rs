//! A pool's counters as gauges: `AsyncPool::stats()` is a cheap snapshot
//! ([`procpool::PoolStats`]), so a sampler can export it as often as a scraper asks.
//!
//! This example prints the samples in Prometheus' text format, which is what an
//! exporter serves; with the `metrics` crate each line is one
//! `metrics::gauge!("procpool_idle").set(stats.idle as f64)` (and a `counter!` with
//! `absolute(..)` for the totals) in the same sampler.
//!
//! It runs a burst of work (a `map` of 20 items: each of its chunks counts as one task),
//! then one task that panics, one that crashes and one that times out, and prints the
//! stats while the burst runs and once everything is done. The counts always add up:
//! `submitted = queued + running + completed + failed + cancelled`.
//!
//! ```text
//! cargo run --release --example metrics
//! # sample while busy
//! procpool_workers 2
//! procpool_running 7
//! ...
//! # sample once done
//! procpool_submitted_total 10
//! procpool_completed_total 7
//! procpool_failed_total 2
//! procpool_cancelled_total 1
//! procpool_restarts_total 2
//! ```

use std::time::Duration;

use procpool::{AsyncPool, PoolStats};

fn work(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn panics() {
    panic!("a bug in one task");
}

fn crashes() {
    std::process::abort();
}

fn hangs() {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// One sample, in Prometheus' text exposition format.
fn exposition(s: &PoolStats) -> String {
    let gauges = [
        ("workers", s.workers as u64, "live worker processes"),
        ("idle", s.idle as u64, "workers with no task"),
        ("queued", s.queued as u64, "tasks waiting for a worker"),
        (
            "running",
            s.running as u64,
            "tasks sent to a worker, not finished",
        ),
    ];
    let counters = [
        ("submitted", s.submitted, "tasks submitted"),
        ("completed", s.completed, "tasks answered with their result"),
        ("failed", s.failed, "tasks answered with an error"),
        ("cancelled", s.cancelled, "tasks whose caller gave up"),
        ("restarts", s.restarts, "workers replaced"),
    ];
    let mut out = String::new();
    for (name, v, help) in gauges {
        out += &format!("# HELP procpool_{name} {help}\n# TYPE procpool_{name} gauge\n");
        out += &format!("procpool_{name} {v}\n");
    }
    for (name, v, help) in counters {
        out += &format!("# HELP procpool_{name}_total {help}\n");
        out += &format!("# TYPE procpool_{name}_total counter\nprocpool_{name}_total {v}\n");
    }
    out
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let pool = AsyncPool::builder().processes(2).build().await?;
    let burst = pool.map_async(work, vec![50; 20]);
    // Sampled while the burst runs: both workers busy, the rest queued.
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("# sample while busy\n{}", exposition(&pool.stats()));
    burst.await?;

    let faults = [
        pool.apply(panics, ()).await.is_err(),
        pool.apply(crashes, ()).await.is_err(),
        pool.apply(hangs, ())
            .timeout(Duration::from_millis(200))
            .await
            .is_err(),
    ];
    assert_eq!(faults, [true; 3], "each fault is an error for its caller");
    // The timed-out caller has its answer at once; the pool stops that task's worker
    // and counts it a moment later (SIGTERM, then the kill grace): a scraper sees it
    // in its next sample. Here, wait until the counts have settled.
    for _ in 0..1_000 {
        let s = pool.stats();
        if s.queued + s.running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("# sample once done\n{}", exposition(&pool.stats()));
    pool.close().await;
    Ok(())
}
