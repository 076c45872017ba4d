//! Pool throughput and latency beside a raw pipe round trip measured in the same run.
//!
//! ```text
//! cargo bench --bench pool
//! ```
//!
//! - `baseline: pipe ping-pong`: 8 bytes to `cat` through a pipe and back, blocking I/O:
//!   the floor for any request/response between two processes.
//! - `apply round trip`: one `pool.apply(doubler, (x,))` awaited, 2 workers.
//! - `map 100k`: `pool.map(doubler, 0..100_000)` with default options.
//! - `apply_async 100k`: 100,000 `apply_async` submitted, then all awaited (no chunking).
//! - `start to first result`: `AsyncPool::new(2)` and one `apply` (the `terminate`
//!   after it is not timed).
//! - `map 20 x 5 MB`: 20 `serde_bytes::ByteBuf`s of 5 MB through `map` (chunksize 1),
//!   the target returning their length.
//! - `cpu 8 x 20 ms`: 8 CPU-bound tasks on 1 worker, on 2 workers, and (the reference)
//!   on 2 threads of this process. DESIGN.md's 8 x 200 ms is in `examples/compare.rs`.
//! - `imap 1M`: `imap(doubler, 0..1_000_000)` consumed as a stream (`compare` runs 10 M
//!   items and reports the peak RSS).

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use procpool::AsyncPool;
use serde_bytes::ByteBuf;

fn doubler(x: i64) -> i64 {
    x * 2
}

fn length(b: ByteBuf) -> usize {
    b.len()
}

fn busy(n: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..black_box(n) {
        acc = (acc + i * i) % 1_000_003;
    }
    acc
}

/// Iterations of `busy` that take about `d` here.
fn calibrate(d: Duration) -> u64 {
    let probe = 2_000_000;
    let t0 = Instant::now();
    black_box(busy(probe));
    (probe as f64 * d.as_secs_f64() / t0.elapsed().as_secs_f64().max(1e-9)) as u64
}

fn pool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let pool = rt.block_on(AsyncPool::new(2)).expect("pool");

    let mut g = c.benchmark_group("pool");
    let mut cat = support::CatPingPong::start();
    g.bench_function("baseline: pipe ping-pong (cat)", |b| {
        b.iter(|| cat.round_trip())
    });
    drop(cat);

    g.bench_function("apply round trip", |b| {
        b.iter(|| rt.block_on(pool.apply(doubler, (21,))).expect("apply"))
    });

    g.sample_size(10);
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("map 100k (default chunks)", |b| {
        b.iter(|| {
            let out = rt.block_on(pool.map(doubler, 0..100_000i64)).expect("map");
            assert_eq!(out.len(), 100_000);
        })
    });
    g.bench_function("apply_async 100k (no chunking)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let handles: Vec<_> = (0..100_000i64)
                    .map(|x| pool.apply_async(doubler, (x,)))
                    .collect();
                for h in handles {
                    h.await.expect("task");
                }
            })
        })
    });

    g.throughput(Throughput::Elements(1_000_000));
    g.bench_function("imap 1M (adaptive chunks)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut n = 0;
                let mut s = pool.imap(doubler, 0..1_000_000i64);
                while let Some(r) = s.next().await {
                    r.expect("item");
                    n += 1;
                }
                assert_eq!(n, 1_000_000);
            })
        })
    });

    g.throughput(Throughput::Bytes(20 * 5_000_000));
    g.bench_function("map 20 x 5 MB (serde_bytes)", |b| {
        b.iter_batched(
            || vec![ByteBuf::from(vec![7u8; 5_000_000]); 20],
            |payloads| {
                let out = rt
                    .block_on(pool.map(length, payloads).chunksize(1))
                    .expect("map");
                assert_eq!(out.len(), 20);
            },
            criterion::BatchSize::PerIteration,
        )
    });
    rt.block_on(pool.close());

    g.throughput(Throughput::Elements(1));
    g.bench_function("start to first result (2 workers)", |b| {
        // Timed until the first result; stopping the pool is not part of it.
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(async {
                    let t0 = Instant::now();
                    let pool = AsyncPool::new(2).await.expect("pool");
                    assert_eq!(pool.apply(doubler, (21,)).await.expect("apply"), 42);
                    total += t0.elapsed();
                    pool.terminate().await;
                })
            }
            total
        })
    });

    let n = calibrate(Duration::from_millis(20));
    g.throughput(Throughput::Elements(8));
    for workers in [1, 2] {
        let pool = rt.block_on(AsyncPool::new(workers)).expect("pool");
        g.bench_function(format!("cpu 8 x 20 ms, {workers} worker(s)"), |b| {
            b.iter(|| {
                rt.block_on(pool.map(busy, vec![n; 8]).chunksize(1))
                    .expect("map")
            })
        });
        rt.block_on(pool.close());
    }
    g.bench_function("baseline: cpu 8 x 20 ms, 2 threads", |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| (0..4).map(|_| busy(n)).sum::<u64>());
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, pool);
criterion_main!(benches);
