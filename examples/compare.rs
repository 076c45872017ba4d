//! The workloads of `../shared/bench/python_baseline.py`, on procpool, with the same
//! sizes, printed in its format: one JSON object per line,
//! `{"system", "workload", "metric", "value", "unit"}`. Raw references measured in the
//! same run are printed with `"system": "raw"`.
//!
//! ```text
//! cargo run --release --example compare              # every workload
//! cargo run --release --example compare rtt_apply    # some of them
//! scripts/compare.sh                                 # beside Python, as a table
//! ```

use std::hint::black_box;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use procpool::{AsyncPool, Connection, Dict, Event, Process, Queue, Semaphore, Value, pipe};
use serde_bytes::ByteBuf;

const WORKERS: usize = 2;
const N_TINY: i64 = 100_000;
const N_RTT: usize = 2_000;
const N_CPU_TASKS: usize = 8;
const CPU_TARGET: Duration = Duration::from_millis(200);
const N_STARTUP: usize = 20;
const N_PAYLOAD: usize = 20;
const PAYLOAD_BYTES: usize = 5_000_000;
const N_QUEUE: u64 = 100_000;
const N_PINGPONG: usize = 10_000;
const N_SPAWN: usize = 50;
const N_IMAP: u64 = 10_000_000;
const BUSY_MOD: u64 = 1_000_003;
const N_SEM: usize = 10_000;
const N_INCR: i64 = 200_000;

/// Batches of `n` acquires and releases of `s`: each batch's microseconds per acquire
/// and release (a timer read per round trip would cost as much as the round trip).
fn sem_child(s: Semaphore, n: usize) -> Vec<f64> {
    (0..20)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..n {
                drop(
                    s.blocking_acquire()
                        .expect("the parent keeps the semaphore"),
                );
            }
            t0.elapsed().as_secs_f64() * 1e6 / n as f64
        })
        .collect()
}

/// `n` inserts of a key and reads of it back into `d` (owned by the parent): pairs per
/// second.
fn dict_child(d: Dict<u64, u64>, n: u64) -> f64 {
    let t0 = Instant::now();
    for i in 0..n {
        d.blocking_insert(i, i).expect("the parent keeps the dict");
        assert_eq!(
            d.blocking_get(&i).expect("the parent keeps the dict"),
            Some(i)
        );
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// `n` increments of `v` once `go` is set.
fn incr(v: Value<i64>, n: i64, go: Event) {
    go.blocking_wait().expect("the parent keeps the event");
    for _ in 0..n {
        v.update(|x| x + 1).expect("shared memory");
    }
}

fn emit(system: &str, workload: &str, metric: &str, value: f64, unit: &str) {
    println!(
        "{{\"system\": \"{system}\", \"workload\": \"{workload}\", \"metric\": \"{metric}\", \"value\": {value}, \"unit\": \"{unit}\"}}"
    );
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
    xs[i]
}

fn doubler(x: i64) -> i64 {
    x * 2
}

fn busy(n: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..black_box(n) {
        acc = (acc + i * i) % BUSY_MOD;
    }
    acc
}

fn length(b: ByteBuf) -> usize {
    b.len()
}

fn noop() {}

fn echo(conn: Connection<u64>) {
    while let Ok(x) = conn.blocking_recv() {
        if conn.blocking_send(x).is_err() {
            return;
        }
    }
}

fn q_producer(q: Queue<Option<u64>>, go: Queue<()>) -> u128 {
    go.blocking_get().expect("go");
    let t0 = Instant::now();
    for i in 0..N_QUEUE {
        q.blocking_put(Some(i)).expect("put");
    }
    q.blocking_put(None).expect("put");
    t0.elapsed().as_nanos()
}

async fn q_consumer(q: Queue<Option<u64>>, go: Queue<()>) -> u64 {
    go.put(()).await.expect("go");
    let mut got = 0;
    while q.get().await.expect("get").is_some() {
        got += 1;
    }
    got
}

/// Peak resident set of this process since the last reset, in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn reset_peak_rss() {
    // "5" resets the peak RSS (Linux 4.0+); without it the peak is since start.
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("compare: cannot reset the peak RSS: {e}");
    }
}

/// The raw reference for round trips: 8 bytes through `cat` and back, blocking pipes.
fn raw_pingpong() -> std::io::Result<()> {
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let (Some(mut to), Some(mut from)) = (cat.stdin.take(), cat.stdout.take()) else {
        unreachable!("both were piped");
    };
    let mut lat = Vec::new();
    let mut buf = [0u8; 8];
    for i in 0..N_PINGPONG + 200 {
        let t0 = Instant::now();
        to.write_all(&[7u8; 8])?;
        from.read_exact(&mut buf)?;
        if i >= 200 {
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(to);
    cat.wait()?;
    emit("raw", "pipe_pingpong", "median", median(&mut lat), "us");
    Ok(())
}

/// Median time to start and join a `Process` of a no-op, in ms.
async fn spawn_ms() -> procpool::Result<f64> {
    let mut ts = Vec::new();
    for _ in 0..N_SPAWN {
        let t0 = Instant::now();
        let mut p = Process::new(noop, ());
        p.start().await?;
        p.join().await?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
        assert_eq!(p.exitcode(), Some(0));
    }
    Ok(median(&mut ts))
}

/// Median time to run `/bin/true` to its end, in ms.
fn raw_spawn_ms() -> std::io::Result<f64> {
    let mut ts = Vec::new();
    for _ in 0..N_SPAWN {
        let t0 = Instant::now();
        let status = Command::new("/bin/true").status()?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
        assert!(status.success());
    }
    Ok(median(&mut ts))
}

fn want(only: &[String], w: &str) -> bool {
    only.is_empty() || only.iter().any(|o| o == w)
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let sys = "procpool";

    if want(&only, "imap_10m") {
        // First, while the heap is small.
        let pool = AsyncPool::new(WORKERS).await?;
        reset_peak_rss();
        let before = peak_rss_mb();
        let t0 = Instant::now();
        let mut stream = pool.imap(doubler, 0..N_IMAP as i64);
        let mut n = 0u64;
        while let Some(r) = stream.next().await {
            r?;
            n += 1;
        }
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(n, N_IMAP);
        emit(sys, "imap_10m", "throughput", N_IMAP as f64 / dt, "items/s");
        emit(sys, "imap_10m", "peak_rss", peak_rss_mb(), "MB");
        emit(sys, "imap_10m", "rss_before", before, "MB");
        pool.close().await;
    }

    if want(&only, "pool_startup") {
        let mut ts = Vec::new();
        for _ in 0..N_STARTUP {
            let t0 = Instant::now();
            let pool = AsyncPool::new(WORKERS).await?;
            let r = pool.apply(doubler, (21,)).await?;
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(r, 42);
            pool.terminate().await;
        }
        let first = ts[0];
        emit(sys, "pool_startup", "median", median(&mut ts), "ms");
        emit(sys, "pool_startup", "first", first, "ms");
    }

    if ["tiny_map", "apply_async", "rtt_apply", "large_payload"]
        .iter()
        .any(|w| want(&only, w))
    {
        let pool = AsyncPool::new(WORKERS).await?;
        for i in 0..200 {
            pool.apply(doubler, (i,)).await?;
        }
        if want(&only, "tiny_map") {
            for (label, cs) in [
                ("cs=1", Some(1)),
                ("cs=1000", Some(1000)),
                ("cs=12500", None),
            ] {
                let mut dts = Vec::new();
                for _ in 0..if cs == Some(1) { 1 } else { 5 } {
                    let t0 = Instant::now();
                    let map = pool.map(doubler, 0..N_TINY);
                    let res = match cs {
                        Some(cs) => map.chunksize(cs).await?,
                        None => map.await?,
                    };
                    dts.push(t0.elapsed().as_secs_f64());
                    assert_eq!(res.len(), N_TINY as usize);
                }
                let v = N_TINY as f64 / median(&mut dts);
                emit(
                    sys,
                    &format!("tiny_map[{label}]"),
                    "throughput",
                    v,
                    "tasks/s",
                );
            }
        }
        if want(&only, "apply_async") {
            let t0 = Instant::now();
            let handles: Vec<_> = (0..N_TINY)
                .map(|x| pool.apply_async(doubler, (x,)))
                .collect();
            for h in handles {
                h.await?;
            }
            let v = N_TINY as f64 / t0.elapsed().as_secs_f64();
            emit(sys, "apply_async_100k", "throughput", v, "tasks/s");
        }
        if want(&only, "rtt_apply") {
            let mut lat = Vec::new();
            for i in 0..N_RTT as i64 {
                let t0 = Instant::now();
                let r = pool.apply(doubler, (i,)).await?;
                lat.push(t0.elapsed().as_secs_f64() * 1e6);
                assert_eq!(r, 2 * i);
            }
            emit(sys, "rtt_apply", "median", median(&mut lat), "us");
            emit(sys, "rtt_apply", "p99", pct(&mut lat, 99.0), "us");
            raw_pingpong()?;
        }
        if want(&only, "large_payload") {
            let payloads: Vec<ByteBuf> = (0..N_PAYLOAD)
                .map(|i| ByteBuf::from(vec![i as u8; PAYLOAD_BYTES]))
                .collect();
            let total: usize = payloads.iter().map(|p| p.len()).sum();
            let t0 = Instant::now();
            let res = pool.map(length, payloads).chunksize(1).await?;
            let dt = t0.elapsed().as_secs_f64();
            assert_eq!(res.iter().sum::<usize>(), total);
            emit(
                sys,
                "large_payload",
                "throughput",
                total as f64 / 1e6 / dt,
                "MB/s",
            );
        }
        pool.close().await;
    }

    if want(&only, "cpu_scaling") {
        // Calibrated in-process to about 200 ms, as the Python harness does.
        let probe = 20_000_000u64;
        let t = (0..3)
            .map(|_| {
                let t0 = Instant::now();
                black_box(busy(probe));
                t0.elapsed()
            })
            .min()
            .unwrap_or(Duration::from_millis(1));
        let n = (probe as f64 * CPU_TARGET.as_secs_f64() / t.as_secs_f64()) as u64;
        let mut walls = [0.0; 3];
        for nw in [1, 2] {
            let pool = AsyncPool::new(nw).await?;
            pool.map(doubler, 0..(4 * nw as i64)).chunksize(1).await?;
            let t0 = Instant::now();
            pool.map(busy, vec![n; N_CPU_TASKS]).chunksize(1).await?;
            walls[nw] = t0.elapsed().as_secs_f64();
            pool.close().await;
        }
        emit(sys, "cpu_scaling", "wall_1w", walls[1], "s");
        emit(sys, "cpu_scaling", "wall_2w", walls[2], "s");
        emit(sys, "cpu_scaling", "speedup", walls[1] / walls[2], "x");
        // Reference: the same tasks on 2 threads of this process.
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..N_CPU_TASKS / 2 {
                        black_box(busy(n));
                    }
                });
            }
        });
        let threads2 = t0.elapsed().as_secs_f64();
        emit("raw", "cpu_scaling", "wall_2threads", threads2, "s");
    }

    if want(&only, "queue_throughput") {
        let q = Queue::new();
        let go = Queue::new();
        let mut cons = procpool::spawn(q_consumer, (q.clone(), go.clone())).await?;
        // The consumer is connected before the producer starts.
        go.get().await?;
        let mut prod = procpool::spawn(q_producer, (q.clone(), go.clone())).await?;
        let t0 = Instant::now();
        go.put(()).await?;
        let got = cons.join().await?;
        let dt = t0.elapsed().as_secs_f64();
        prod.join().await?;
        assert_eq!(got, N_QUEUE);
        emit(
            sys,
            "queue_throughput",
            "throughput",
            N_QUEUE as f64 / dt,
            "items/s",
        );
    }

    if want(&only, "pipe_pingpong") {
        let (a, b) = pipe::<u64>();
        let mut p = Process::new(echo, (b,));
        p.start().await?;
        for i in 0..200 {
            a.send(i).await?;
            a.recv().await?;
        }
        let mut lat = Vec::new();
        for i in 0..N_PINGPONG as u64 {
            let t0 = Instant::now();
            a.send(i).await?;
            let r = a.recv().await?;
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
            assert_eq!(r, i);
        }
        drop(a);
        p.join().await?;
        emit(sys, "pipe_pingpong", "median", median(&mut lat), "us");
        emit(sys, "pipe_pingpong", "p99", pct(&mut lat, 99.0), "us");

        raw_pingpong()?;
    }

    if want(&only, "sem_roundtrip") {
        let s = Semaphore::new(1);
        let mut p = Process::new(sem_child, (s.clone(), N_SEM));
        p.start().await?;
        let mut lat = p.join().await?;
        emit(sys, "sem_roundtrip", "median", median(&mut lat), "us");
        // The floor of any semaphore: a take and a give back, one atomic each, here.
        let count = std::sync::atomic::AtomicU64::new(1);
        let mut raw: Vec<f64> = (0..20)
            .map(|_| {
                let t0 = Instant::now();
                for _ in 0..N_SEM {
                    use std::sync::atomic::Ordering::{AcqRel, Release};
                    black_box(count.fetch_sub(1, AcqRel));
                    black_box(count.fetch_add(1, Release));
                }
                t0.elapsed().as_secs_f64() * 1e6 / N_SEM as f64
            })
            .collect();
        emit("raw", "sem_roundtrip", "median", median(&mut raw), "us");
    }

    if want(&only, "value_incr_2p") {
        let (v, go) = (Value::new(0i64), Event::new());
        let mut ps = Vec::new();
        for _ in 0..2 {
            ps.push(procpool::spawn(incr, (v.clone(), N_INCR, go.clone())).await?);
        }
        let t0 = Instant::now();
        go.set()?;
        for p in &mut ps {
            p.join().await?;
        }
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(v.get()?, 2 * N_INCR);
        emit(
            sys,
            "value_incr_2p",
            "throughput",
            2.0 * N_INCR as f64 / dt,
            "items/s",
        );
    }

    if want(&only, "dict_insert_get") {
        let d = Dict::new();
        let mut p = Process::new(dict_child, (d.clone(), 20_000));
        p.start().await?;
        let rate = p.join().await?;
        emit(sys, "dict_insert_get", "throughput", rate, "items/s");
    }

    if want(&only, "process_spawn") {
        emit(sys, "process_spawn", "median", spawn_ms().await?, "ms");
        // Reference: `/bin/true` (std's spawn, posix_spawn).
        emit("raw", "process_spawn", "median", raw_spawn_ms()?, "ms");

        // The same with 100 MB of touched heap in this process, as in a real service:
        // a `fork` would copy its page tables, `posix_spawn` does not.
        let ballast: Vec<Vec<u8>> = (0..100).map(|i| vec![i as u8; 1 << 20]).collect();
        let wl = "process_spawn[heap=100MB]";
        emit(sys, wl, "median", spawn_ms().await?, "ms");
        emit("raw", wl, "median", raw_spawn_ms()?, "ms");
        drop(black_box(ballast));
    }
    Ok(())
}
