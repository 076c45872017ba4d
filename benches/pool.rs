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

mod support;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use procpool::AsyncPool;

fn doubler(x: i64) -> i64 {
    x * 2
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
    g.finish();
    rt.block_on(pool.close());
}

criterion_group!(benches, pool);
criterion_main!(benches);
