//! Queue throughput and Pipe latency between processes, beside raw references measured
//! in the same run.
//!
//! ```text
//! cargo bench --bench sync
//! ```
//!
//! - `baseline: pipe ping-pong (cat)`: 8 bytes to `cat` through a pipe and back,
//!   blocking I/O: the floor for a round trip between two processes.
//! - `Pipe ping-pong`: a `u64` to a child that echoes it over a `procpool::pipe`, and
//!   back; blocking calls on both sides, then async calls in the parent.
//! - `Queue 1 -> 1, 100k items`: a producer process puts 100,000 `u64`s on a queue owned
//!   by the parent, a consumer process takes them (Python's workload: 160 k items/s).
//! - `Dict insert+get from a child, 10k pairs`: a child process inserts into a `Dict`
//!   owned by the parent and reads the value back, 10,000 times (two round trips each:
//!   what a Python `Manager().dict()` costs per call too; `python_baseline.py` has no
//!   dict row yet).

mod support;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use procpool::{Connection, Dict, Process, Queue, pipe};

const ITEMS: u64 = 100_000;
const DICT_PAIRS: u64 = 10_000;

fn echo(conn: Connection<u64>) {
    while let Ok(x) = conn.blocking_recv() {
        if conn.blocking_send(x).is_err() {
            return;
        }
    }
}

/// Each round number on `go` starts a round of ITEMS puts.
fn producer(go: Queue<u64>, q: Queue<u64>) {
    while let Ok(round) = go.blocking_get() {
        for i in 0..ITEMS {
            q.blocking_put(round * ITEMS + i).expect("put");
        }
    }
}

/// Takes ITEMS items per round, then reports on `done`.
async fn consumer(q: Queue<u64>, done: Queue<u64>) {
    loop {
        let mut last = 0;
        for _ in 0..ITEMS {
            match q.get().await {
                Ok(x) => last = x,
                Err(_) => return,
            }
        }
        if done.put(last).await.is_err() {
            return;
        }
    }
}

/// Each round number on `go`: DICT_PAIRS inserts into the parent's dict, each read back;
/// then the last value read, on `done`.
fn dict_user(go: Queue<u64>, d: Dict<u64, u64>, done: Queue<u64>) {
    while let Ok(round) = go.blocking_get() {
        let mut last = 0;
        for i in 0..DICT_PAIRS {
            d.blocking_insert(i % 100, round + i).expect("insert");
            last = d.blocking_get(&(i % 100)).expect("get").expect("inserted");
        }
        done.blocking_put(last).expect("done");
    }
}

fn sync(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("sync");

    let mut cat = support::CatPingPong::start();
    g.bench_function("baseline: pipe ping-pong (cat)", |b| {
        b.iter(|| cat.round_trip())
    });
    drop(cat);

    let (here, there) = pipe::<u64>();
    let mut child = Process::new(echo, (there,));
    rt.block_on(child.start()).expect("start echo");
    g.bench_function("Pipe ping-pong (blocking)", |b| {
        b.iter(|| {
            here.blocking_send(7).expect("send");
            here.blocking_recv().expect("recv")
        })
    });
    g.bench_function("Pipe ping-pong (async)", |b| {
        b.iter(|| {
            rt.block_on(async {
                here.send(7).await.expect("send");
                here.recv().await.expect("recv")
            })
        })
    });
    drop(here);
    rt.block_on(child.join()).expect("echo ends");

    let go: Queue<u64> = Queue::new();
    let q: Queue<u64> = Queue::new();
    let done: Queue<u64> = Queue::new();
    let mut prod = Process::new(producer, (go.clone(), q.clone()));
    let mut cons = Process::new(consumer, (q.clone(), done.clone()));
    rt.block_on(async {
        prod.start().await.expect("producer");
        cons.start().await.expect("consumer");
    });
    g.sample_size(10);
    g.throughput(Throughput::Elements(ITEMS));
    let mut round = 0;
    g.bench_function("Queue 1 -> 1, 100k items", |b| {
        b.iter(|| {
            rt.block_on(async {
                go.put(round).await.expect("go");
                let last = done.get().await.expect("done");
                assert_eq!(last, round * ITEMS + ITEMS - 1);
                round += 1;
            })
        })
    });

    let dict_go: Queue<u64> = Queue::new();
    let d: Dict<u64, u64> = Dict::new();
    let mut user = Process::new(dict_user, (dict_go.clone(), d.clone(), done.clone()));
    rt.block_on(user.start()).expect("dict user");
    g.throughput(Throughput::Elements(DICT_PAIRS));
    let mut round = 0;
    g.bench_function("Dict insert+get from a child, 10k pairs", |b| {
        b.iter(|| {
            rt.block_on(async {
                dict_go.put(round).await.expect("go");
                let last = done.get().await.expect("done");
                assert_eq!(last, round + DICT_PAIRS - 1);
                round += 1;
            })
        })
    });
    g.finish();
    dict_go.close().expect("close");
    rt.block_on(user.join()).expect("dict user ends");
    go.close().expect("close");
    q.close().expect("close");
    rt.block_on(async {
        prod.join().await.expect("producer ends");
        cons.join().await.expect("consumer ends");
    });
}

criterion_group!(benches, sync);
criterion_main!(benches);
