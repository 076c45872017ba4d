//! Every call of DESIGN.md §3 against real worker processes.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use procpool::{AsyncPool, Error, current_process};
use serde::{Deserialize, Serialize};
use support::{TempDir, pattern, wait_for_file, write_file};

fn doubler(x: i64) -> i64 {
    x * 2
}

fn add3(a: i32, b: i32, c: i32) -> i32 {
    a + b + c
}

async fn async_square(x: u64) -> u64 {
    tokio::task::yield_now().await;
    x * x
}

fn whoami() -> (String, u32) {
    (current_process().name().to_owned(), std::process::id())
}

fn maybe_panic(x: u32) -> u32 {
    if x % 10 == 3 {
        panic!("item {x} is unlucky");
    }
    x
}

/// Item 0 waits for `gate`; item 1 opens it.
fn ordered_pair(i: u32, gate: String) -> u32 {
    if i == 0 {
        wait_for_file(&gate);
    } else {
        write_file(&gate, "go");
    }
    i
}

#[tokio::test]
async fn zero_processes_is_an_error() {
    assert!(matches!(
        AsyncPool::new(0).await,
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        AsyncPool::builder().processes(0).build().await,
        Err(Error::InvalidConfig { .. })
    ));
}

#[tokio::test]
async fn apply_map_starmap() {
    let pool = AsyncPool::new(2).await.unwrap();
    assert_eq!(pool.processes(), 2);
    assert_eq!(pool.apply(doubler, (21,)).await.unwrap(), 42);
    assert_eq!(pool.apply(add3, (1, 2, 3)).await.unwrap(), 6);
    assert_eq!(pool.apply(async_square, (9,)).await.unwrap(), 81);
    assert_eq!(pool.apply(|a: u8, b: u8| a * b, (6, 7)).await.unwrap(), 42);

    assert_eq!(
        pool.map(doubler, vec![5, 10, 20]).await.unwrap(),
        vec![10, 20, 40]
    );
    let xs: Vec<i64> = (0..1000).collect();
    let want: Vec<i64> = xs.iter().map(|x| x * 2).collect();
    assert_eq!(pool.map(doubler, xs.clone()).await.unwrap(), want);
    assert_eq!(
        pool.map(doubler, xs.clone()).chunksize(1).await.unwrap(),
        want
    );
    assert_eq!(
        pool.map(doubler, xs.clone()).chunksize(7).await.unwrap(),
        want
    );
    assert_eq!(
        pool.map(async_square, 0..5u64).await.unwrap(),
        vec![0, 1, 4, 9, 16]
    );
    assert_eq!(
        pool.starmap(add3, vec![(1, 2, 3), (4, 5, 6)])
            .await
            .unwrap(),
        vec![6, 15]
    );
    let empty: Vec<i64> = pool.map(doubler, Vec::<i64>::new()).await.unwrap();
    assert!(empty.is_empty());
    assert_eq!(
        pool.map_async(doubler, vec![1, 2]).await.unwrap(),
        vec![2, 4]
    );
    pool.close().await;
}

#[tokio::test]
async fn named_futures_work_in_join_all_and_select() {
    let pool = AsyncPool::new(2).await.unwrap();
    let futs: Vec<_> = (0..10).map(|i| pool.apply(doubler, (i,))).collect();
    let out = futures::future::join_all(futs).await;
    let out: Vec<i64> = out.into_iter().map(Result::unwrap).collect();
    assert_eq!(out, (0..10).map(|i| i * 2).collect::<Vec<_>>());

    let mut unordered: futures::stream::FuturesUnordered<_> =
        (0..5).map(|i| pool.apply(doubler, (i,))).collect();
    let mut sum = 0;
    while let Some(r) = unordered.next().await {
        sum += r.unwrap();
    }
    assert_eq!(sum, 20);

    tokio::select! {
        r = pool.apply(doubler, (4,)) => assert_eq!(r.unwrap(), 8),
        () = std::future::pending() => unreachable!(),
    }
    let r = tokio::time::timeout(Duration::from_secs(30), pool.map(doubler, vec![1])).await;
    assert_eq!(r.unwrap().unwrap(), vec![2]);
}

// Multi-thread: the test blocks its own thread on files while the dispatcher works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_async_handles() {
    let pool = AsyncPool::new(2).await.unwrap();
    let h = pool.apply_async(doubler, (5,));
    assert_eq!(h.await.unwrap(), 10);

    // Python's get(timeout): waiting under tokio's timeout does not cancel.
    let dir = TempDir::new("handle");
    let gate = dir.path("gate");
    let mut h = pool.apply_async(ordered_pair, (0, gate.clone()));
    assert!(!h.is_finished());
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut h)
            .await
            .is_err()
    );
    write_file(&gate, "go");
    assert_eq!(h.await.unwrap(), 0);

    // A finished handle says so before it is awaited.
    let h = pool.apply_async(doubler, (1,));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !h.is_finished() {
        assert!(tokio::time::Instant::now() < deadline, "never finished");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(h.await.unwrap(), 2);

    // detach: runs on with nobody waiting.
    let marker = dir.path("detached");
    pool.apply_async(ordered_pair, (1, marker.clone())).detach();
    support::read_file_async(&marker, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn workers_are_pool_workers_and_pool_is_a_cheap_clone() {
    let pool = AsyncPool::new(2).await.unwrap();
    let (name, pid) = pool.apply(whoami, ()).await.unwrap();
    assert!(name.starts_with("PoolWorker-"), "{name}");
    assert_ne!(pid, std::process::id());

    let clone = pool.clone();
    let task = tokio::spawn(async move { clone.apply(doubler, (3,)).await });
    assert_eq!(task.await.unwrap().unwrap(), 6);

    let other = pool.clone();
    pool.close().await;
    assert!(matches!(
        other.apply(doubler, (1,)).await,
        Err(Error::PoolClosed)
    ));
    assert!(matches!(
        other.map(doubler, vec![1]).await,
        Err(Error::PoolClosed)
    ));
    assert!(matches!(
        other.apply_async(doubler, (1,)).await,
        Err(Error::PoolClosed)
    ));
}

#[tokio::test]
async fn imap_keeps_input_order_and_imap_unordered_does_not() {
    let pool = AsyncPool::new(2).await.unwrap();
    let got: Vec<i64> = pool
        .imap(doubler, 0..100)
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(got, (0..100).map(|x| x * 2).collect::<Vec<_>>());

    let dir = TempDir::new("imap");
    // Item 0 waits for a gate the test opens only after it has received item 1's result
    // (unordered) or seen item 1 complete (ordered): deterministic either way.
    fn gated(a: (u32, Option<String>)) -> u32 {
        if let Some(gate) = a.1 {
            wait_for_file(&gate);
        }
        a.0
    }
    let none: Vec<u32> = pool
        .imap(gated, Vec::new())
        .map(Result::unwrap)
        .collect()
        .await;
    assert!(none.is_empty());

    let gate = dir.path("unordered");
    let mut s = pool
        .imap_unordered(gated, vec![(0, Some(gate.clone())), (1, None)])
        .chunksize(1);
    assert_eq!(s.next().await.unwrap().unwrap(), 1, "completion order");
    write_file(&gate, "go");
    assert_eq!(s.next().await.unwrap().unwrap(), 0);
    assert!(s.next().await.is_none());

    let gate = dir.path("ordered");
    let completed = pool.stats().completed;
    let mut s = pool
        .imap(gated, vec![(0, Some(gate.clone())), (1, None)])
        .chunksize(1);
    let first = tokio::spawn(async move {
        let first = s.next().await.unwrap().unwrap();
        (first, s)
    });
    // Item 1 is done before item 0 can be; the ordered stream still holds it back.
    assert!(
        support::eventually_async(Duration::from_secs(30), || pool.stats().completed
            > completed)
        .await
    );
    assert!(!first.is_finished());
    write_file(&gate, "go");
    let (first, mut s) = first.await.unwrap();
    assert_eq!(first, 0, "input order");
    assert_eq!(s.next().await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn imap_errors_are_per_item() {
    let pool = AsyncPool::new(2).await.unwrap();
    for chunk in [1, 4, 10] {
        let got: Vec<Result<u32, Error>> = pool
            .imap(maybe_panic, 0..30)
            .chunksize(chunk)
            .collect()
            .await;
        assert_eq!(got.len(), 30);
        for (i, r) in got.iter().enumerate() {
            if i % 10 == 3 {
                assert!(
                    matches!(r, Err(Error::Panicked { message, .. }) if message == &format!("item {i} is unlucky")),
                    "chunk {chunk}, item {i}: {r:?}"
                );
            } else {
                assert_eq!(r.as_ref().unwrap(), &(i as u32), "chunk {chunk}");
            }
        }
    }
}

fn aborts_on_5(x: u32) -> u32 {
    if x == 5 {
        std::process::abort();
    }
    x
}

#[tokio::test]
async fn imap_a_crash_fails_the_unanswered_items_of_its_chunk_only() {
    let pool = AsyncPool::new(2).await.unwrap();
    let got: Vec<Result<u32, Error>> = pool.imap(aborts_on_5, 0..12).chunksize(4).collect().await;
    assert_eq!(got.len(), 12);
    for (i, r) in got.iter().enumerate() {
        if (4..8).contains(&i) {
            // The chunk [4, 5, 6, 7] ran on the worker that died; its answers were lost.
            assert!(
                matches!(
                    r,
                    Err(Error::WorkerDied {
                        reason: procpool::ExitReason::Signal(6),
                        ..
                    })
                ),
                "item {i}: {r:?}"
            );
        } else {
            assert_eq!(r.as_ref().unwrap(), &(i as u32));
        }
    }
}

#[tokio::test]
async fn imap_pulls_an_endless_iterator_lazily() {
    let pool = AsyncPool::new(2).await.unwrap();
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let endless = (0u64..).inspect(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let first: Vec<u64> = pool
        .imap(async_square, endless)
        .chunksize(1)
        .take(200)
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(first, (0..200u64).map(|x| x * x).collect::<Vec<_>>());
    let n = pulled.load(Ordering::Relaxed);
    // At most the in-flight window (4 chunks per worker, of 1 item) beyond what was taken.
    assert!(
        n <= 200 + 2 * 8,
        "pulled {n} items for 200 results: not lazy"
    );
}

#[tokio::test]
async fn imap_stream_sends_items_as_they_arrive_and_ends_with_its_input() {
    let pool = AsyncPool::new(2).await.unwrap();
    let (tx, rx) = futures::channel::mpsc::unbounded::<u64>();
    let mut results = pool.imap_stream(async_square, rx);
    // One item, and the input stays open: its result comes without waiting for more.
    tx.unbounded_send(3).unwrap();
    assert_eq!(support::soon(results.next()).await.unwrap().unwrap(), 9);
    for x in [4, 5, 6] {
        tx.unbounded_send(x).unwrap();
    }
    let mut next = Vec::new();
    for _ in 0..3 {
        next.push(support::soon(results.next()).await.unwrap().unwrap());
    }
    assert_eq!(next, [16, 25, 36], "in input order");
    drop(tx);
    assert!(
        support::soon(results.next()).await.is_none(),
        "ends with its input"
    );
    assert!(futures::stream::FusedStream::is_terminated(&results));
    assert_eq!(futures::Stream::size_hint(&results), (0, Some(0)));
}

#[tokio::test]
async fn imap_unordered_stream_answers_every_item_and_a_stream_input_panic_ends_it() {
    let pool = AsyncPool::new(2).await.unwrap();
    let items = futures::stream::iter(0..50u32);
    let mut got: Vec<u32> = pool
        .imap_unordered_stream(maybe_panic, items)
        .map(|r| r.unwrap_or(u32::MAX))
        .collect()
        .await;
    got.sort();
    // maybe_panic panics in the worker on 3, 13, ...: those items' Err; the rest answer.
    let mut want: Vec<u32> = (0..50)
        .map(|x| if x % 10 == 3 { u32::MAX } else { x })
        .collect();
    want.sort();
    assert_eq!(got, want);
    // An input stream that panics at its fourth item: the three before it, then the panic.
    let panicking = futures::stream::iter(0..10i64).map(|x| {
        assert!(x != 3, "the input broke");
        x
    });
    let out: Vec<_> = support::soon(pool.imap_stream(doubler, panicking).collect::<Vec<_>>()).await;
    let values: Vec<i64> = out
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(values, [0, 2, 4]);
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(
        matches!(&out[3], Err(Error::Panicked { message, .. }) if message.contains("the input broke")),
        "{out:?}"
    );
}

#[tokio::test]
async fn imap_stream_pulls_an_endless_stream_lazily() {
    let pool = AsyncPool::new(2).await.unwrap();
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let endless = futures::stream::iter(0u64..).inspect(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let first: Vec<u64> = pool
        .imap_stream(async_square, endless)
        .chunksize(1)
        .take(200)
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(first, (0..200u64).map(|x| x * x).collect::<Vec<_>>());
    let n = pulled.load(Ordering::Relaxed);
    assert!(
        n <= 200 + 2 * 8,
        "pulled {n} items for 200 results: not lazy"
    );
}

#[tokio::test]
async fn map_stops_at_the_first_error() {
    let pool = AsyncPool::new(2).await.unwrap();
    let err = pool.map(maybe_panic, 0..100).await.unwrap_err();
    assert!(matches!(err, Error::Panicked { .. }), "{err:?}");
    // The pool serves on.
    assert_eq!(pool.map(maybe_panic, vec![1, 2]).await.unwrap(), vec![1, 2]);
}

#[tokio::test]
async fn stats_add_up() {
    let pool = AsyncPool::new(2).await.unwrap();
    let s = pool.stats();
    assert_eq!((s.workers, s.idle, s.queued, s.running), (2, 2, 0, 0));
    for i in 0..5 {
        pool.apply(doubler, (i,)).await.unwrap();
    }
    assert!(pool.apply(maybe_panic, (3,)).await.is_err());
    let s = pool.stats();
    assert_eq!(s.completed, 5);
    assert_eq!(s.failed, 1);
    assert_eq!(s.submitted, 6);
    assert_eq!(
        s.submitted,
        s.completed + s.failed + s.cancelled + (s.queued + s.running) as u64
    );
}

static INIT_VALUE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn init(v: String) {
    INIT_VALUE.set(v).expect("initializer runs once per worker");
}

fn read_init() -> Option<String> {
    INIT_VALUE.get().cloned()
}

fn failing_init() {
    panic!("no database");
}

#[tokio::test]
async fn initializer_runs_once_per_worker_before_tasks() {
    let pool = AsyncPool::builder()
        .processes(2)
        .initializer(init, ("ready".to_string(),))
        .build()
        .await
        .unwrap();
    let got = pool
        .map(|_: u8| read_init(), vec![0; 20])
        .chunksize(1)
        .await
        .unwrap();
    assert!(got.iter().all(|v| v.as_deref() == Some("ready")), "{got:?}");
}

#[tokio::test]
async fn an_initializer_that_fails_fails_build() {
    let err = AsyncPool::builder()
        .processes(2)
        .initializer(failing_init, ())
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Panicked { message, .. } if message == "no database"),
        "{err:?}"
    );
}

/// The payload back, reversed: every byte must have crossed both ways intact.
fn reversed(mut b: serde_bytes::ByteBuf) -> serde_bytes::ByteBuf {
    b.reverse();
    b
}

#[tokio::test]
async fn payloads_larger_than_the_socket_buffer_cross_intact_and_in_order() {
    // Tens of MB in flight at once: more than a socket buffer holds, so the parent's
    // writes block part-way and resume, with small tasks queued behind the large ones.
    let pool = AsyncPool::new(2).await.unwrap();
    let big: Vec<_> = (0..6).map(|i| pattern(3_000_000 + i, i as u8)).collect();
    let large = pool.map(reversed, big.clone()).chunksize(1);
    let small: Vec<_> = (0..200).map(|i| pool.apply_async(doubler, (i,))).collect();
    let huge = pool.apply(reversed, (pattern(12_000_000, 0xA5),));
    // Generous: a debug build on a loaded machine; a stalled write would hang forever.
    let (large, huge) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(large, huge)
    })
    .await
    .expect("large payloads stalled");
    for (i, h) in small.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), 2 * i as i64);
    }
    for (got, sent) in large.unwrap().iter().zip(&big) {
        assert_eq!(got.len(), sent.len());
        assert!(
            got.iter().eq(sent.iter().rev()),
            "a payload changed on the way"
        );
    }
    let huge = huge.unwrap();
    assert!(huge.iter().eq(pattern(12_000_000, 0xA5).iter().rev()));
    pool.close().await;
}

fn sleeps(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Waits for `gate`, then returns `id`.
fn waits_for(gate: String, id: u32) -> u32 {
    wait_for_file(&gate);
    id
}

#[tokio::test]
async fn once_tasks_are_known_to_be_long_none_waits_behind_a_long_one() {
    // Tasks of 30 ms teach the pool that tasks are long (more than its 2 ms of work
    // sent ahead), so it stops pipelining: the short tasks after the long one must all
    // finish on the other worker while the long one still runs. (The sleeps only make
    // the tasks long; the order is fixed by the gate.)
    let pool = AsyncPool::new(2).await.unwrap();
    pool.map(sleeps, vec![30u64; 4]).chunksize(1).await.unwrap();
    let dir = TempDir::new("no-head-of-line");
    let gate = dir.path("gate");
    let long = pool.apply_async(waits_for, (gate.clone(), 99));
    let shorts: Vec<_> = (0..4).map(|_| pool.apply_async(sleeps, (5u64,))).collect();
    for h in shorts {
        let got = tokio::time::timeout(Duration::from_secs(60), h).await;
        assert_eq!(
            got.expect("a short task waited behind the long one")
                .unwrap(),
            5
        );
    }
    write_file(&gate, "go");
    assert_eq!(long.await.unwrap(), 99);
}

#[tokio::test]
async fn before_any_task_finishes_a_worker_gets_at_most_eight_ahead() {
    // Their length is unknown until one finishes, so the default depth (64) is not used
    // yet: the rest wait in the pool's queue, where any free worker can take them.
    let pool = AsyncPool::new(1).await.unwrap();
    let dir = TempDir::new("first-depth");
    let gate = dir.path("gate");
    let handles: Vec<_> = (0..20)
        .map(|i| pool.apply_async(waits_for, (gate.clone(), i)))
        .collect();
    let settled = support::eventually_async(Duration::from_secs(30), || {
        let stats = pool.stats();
        assert!(stats.running <= 8, "{stats:?}");
        stats.running + stats.queued == 20 && stats.running == 8
    });
    assert!(settled.await, "{:?}", pool.stats());
    write_file(&gate, "go");
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), i as u32);
    }
    pool.close().await;
}

/// A value whose encoding, in a worker, fails for 3 and panics for 6.
#[derive(Debug, PartialEq)]
struct Touchy(u32);

impl<'de> Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (v, tag) = <(u32, String)>::deserialize(d)?;
        assert_eq!(tag, "touchy", "read what was written");
        Ok(Touchy(v))
    }
}

impl Serialize for Touchy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if current_process().name() != "MainProcess" {
            match self.0 {
                3 => return Err(serde::ser::Error::custom("3 does not encode")),
                6 => panic!("6 panics while encoding"),
                _ => {}
            }
        }
        // Written as a pair, so a failure above happens after a part of it (the header) is out.
        (self.0, "touchy").serialize(s)
    }
}

/// An item that a worker refuses to decode when it is 8, and panics decoding when 10.
#[derive(Debug, Serialize)]
struct NotEight(u32);

impl<'de> Deserialize<'de> for NotEight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if current_process().name() != "MainProcess" {
            match v {
                8 => return Err(serde::de::Error::custom("8 does not decode here")),
                10 => panic!("10 panics while decoding"),
                _ => {}
            }
        }
        Ok(NotEight(v))
    }
}

fn touchy(x: NotEight) -> Touchy {
    Touchy(x.0)
}

impl Touchy {
    fn check(r: &Result<Touchy, Error>, i: u32) {
        match i {
            3 => assert!(
                matches!(r, Err(Error::Encode { reason, .. }) if reason.contains("3 does not encode")),
                "item {i}: {r:?}"
            ),
            6 => assert!(
                matches!(r, Err(Error::Panicked { message, .. }) if message.contains("6 panics")),
                "item {i}: {r:?}"
            ),
            8 => assert!(
                matches!(r, Err(Error::Decode { reason, .. }) if reason.contains("8 does not decode")),
                "item {i}: {r:?}"
            ),
            10 => assert!(
                matches!(r, Err(Error::Panicked { message, .. }) if message.contains("10 panics")),
                "item {i}: {r:?}"
            ),
            _ => assert_eq!(r.as_ref().unwrap(), &Touchy(i), "item {i}"),
        }
    }
}

#[tokio::test]
async fn a_chunk_keeps_the_results_before_an_item_that_fails_to_encode_decode_or_panics() {
    // Chunks decode their items and encode their results one at a time in the worker: a
    // failing item must leave the results before it whole (and nothing of itself), fail
    // alone, and let the items after it run (imap sends them again).
    let pool = AsyncPool::new(2).await.unwrap();
    for chunk in [1, 5, 12] {
        let got: Vec<Result<Touchy, Error>> = pool
            .imap(touchy, (0..12).map(NotEight))
            .chunksize(chunk)
            .collect()
            .await;
        assert_eq!(got.len(), 12, "chunk {chunk}");
        for (i, r) in got.iter().enumerate() {
            Touchy::check(r, i as u32);
        }
    }
    // map fails with the first failure (chunk of 12: the encode failure of item 3).
    let r = pool.map(touchy, (0..12).map(NotEight)).chunksize(12).await;
    assert!(
        matches!(&r, Err(Error::Encode { reason, .. }) if reason.contains("3 does not encode")),
        "{r:?}"
    );
    // Without the failing items, all is well, in order.
    let ok = pool
        .map(touchy, [0, 1, 2, 4, 5, 7, 9, 11].map(NotEight))
        .chunksize(3)
        .await
        .unwrap();
    assert_eq!(ok, [0, 1, 2, 4, 5, 7, 9, 11].map(Touchy));
    // A single call's arguments and result fail the same ways.
    for i in [3, 6, 8, 10, 11] {
        Touchy::check(&pool.apply(touchy, (NotEight(i),)).await, i);
    }
    assert_eq!(pool.stats().restarts, 0, "no worker died");
}

fn negate(x: i64) -> i64 {
    x.wrapping_neg()
}
fn halve(x: u64) -> u64 {
    x / 2
}
fn narrow(x: i32) -> i16 {
    x as i16
}
fn wrap_add(x: u8) -> u8 {
    x.wrapping_add(200)
}
fn sqrt(x: f64) -> f64 {
    x.sqrt()
}
fn to_f32(x: f64) -> f32 {
    x as f32
}
fn is_even(x: usize) -> bool {
    x.is_multiple_of(2)
}
fn wide(x: i128) -> i128 {
    x * 3
}

#[tokio::test]
async fn plain_numbers_and_bools_cross_intact_at_every_encoding_boundary() {
    // Numbers and bools take their own encoding path (wire::scalar); every width
    // MessagePack has, both signs, and the extremes must come back exact.
    let pool = AsyncPool::new(2).await.unwrap();
    let mut edges: Vec<i64> = vec![0, 1, -1, i64::MIN, i64::MAX, i64::MIN + 1];
    for b in [
        31i64,
        32,
        127,
        128,
        255,
        256,
        32767,
        32768,
        65535,
        65536,
        1 << 31,
        1 << 32,
    ] {
        for d in [-1, 0, 1] {
            edges.extend([b + d, -(b + d)]);
        }
    }
    let got = pool.map(negate, edges.clone()).chunksize(7).await.unwrap();
    assert_eq!(got, edges.iter().map(|x| negate(*x)).collect::<Vec<_>>());
    let unsigned: Vec<u64> = edges
        .iter()
        .map(|x| x.unsigned_abs())
        .chain([u64::MAX])
        .collect();
    let got = pool.map(halve, unsigned.clone()).await.unwrap();
    assert_eq!(got, unsigned.iter().map(|x| x / 2).collect::<Vec<_>>());
    let ints: Vec<i32> = edges.iter().map(|x| *x as i32).collect();
    let got = pool.map(narrow, ints.clone()).await.unwrap();
    assert_eq!(got, ints.iter().map(|x| *x as i16).collect::<Vec<_>>());
    let got = pool.map(wrap_add, 0..=255u8).chunksize(10).await.unwrap();
    assert_eq!(got, (0..=255u8).map(wrap_add).collect::<Vec<_>>());
    let floats = [
        0.0,
        -0.0,
        2.25,
        1e300,
        f64::MIN_POSITIVE,
        f64::INFINITY,
        -1.0,
    ];
    let got = pool.map(sqrt, floats).await.unwrap();
    let want: Vec<u64> = floats.iter().map(|x| x.sqrt().to_bits()).collect();
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want,
        "bit for bit, NaN too"
    );
    let got = pool.map(to_f32, floats).await.unwrap();
    assert_eq!(got, floats.map(|x| x as f32));
    let got = pool.map(is_even, 0..1000usize).await.unwrap();
    assert_eq!(got, (0..1000usize).map(is_even).collect::<Vec<_>>());
    // Not a plain number to MessagePack (serde writes it as bytes): the general path.
    let big = [i128::MAX / 3, i128::MIN / 3, 0];
    assert_eq!(pool.map(wide, big).await.unwrap(), big.map(wide));
    // The same through imap, whose chunks are decoded the same way.
    let got: Vec<i64> = pool
        .imap(negate, edges.clone())
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(got, edges.iter().map(|x| negate(*x)).collect::<Vec<_>>());
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct UnitMarker;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct NestedOptions {
    field: Option<Option<u8>>,
    list: Vec<Option<Option<u8>>>,
}

fn some_none() -> Option<Option<u8>> {
    Some(None)
}

fn some_some_unit() -> Option<Option<()>> {
    Some(Some(()))
}

fn some_unit() -> Option<()> {
    Some(())
}

fn no_unit() -> Option<()> {
    None
}

fn unit() {}

fn unit_marker() -> (UnitMarker, Option<UnitMarker>) {
    (UnitMarker, Some(UnitMarker))
}

/// `Some(None)` in the struct's field, or in its list.
fn nested(in_field: bool) -> NestedOptions {
    if in_field {
        NestedOptions {
            field: Some(None),
            list: vec![],
        }
    } else {
        NestedOptions {
            field: Some(Some(1)),
            list: vec![None, Some(Some(2)), Some(None)],
        }
    }
}

fn echo(x: Option<Option<u8>>) -> Option<Option<u8>> {
    x
}

/// MessagePack writes `Some(None)`, `Some(())` and `None` alike: such a value is
/// `Error::Encode` naming its type (a result in the worker, an argument or item in the
/// caller, before anything is sent), never a silent `None`; every other option and unit
/// arrives as it left, and the worker serves on.
#[tokio::test]
async fn options_and_units_arrive_unchanged_or_are_refused() {
    fn refused<T: std::fmt::Debug>(r: Result<T, Error>, ty: &str) {
        match r {
            Err(Error::Encode {
                type_name, reason, ..
            }) => {
                assert!(type_name.contains(ty), "{type_name} names {ty}");
                assert!(reason.contains("the same bytes as `None`"), "{reason}");
            }
            other => panic!("expected Encode for {ty}, got {other:?}"),
        }
    }
    let pool = AsyncPool::new(1).await.unwrap();
    refused(
        pool.apply(some_none, ()).await,
        "Option<core::option::Option<u8>>",
    );
    refused(
        pool.apply(some_some_unit, ()).await,
        "Option<core::option::Option<()>>",
    );
    refused(pool.apply(some_unit, ()).await, "Option<()>");
    refused(pool.apply(nested, (true,)).await, "NestedOptions");
    refused(pool.apply(nested, (false,)).await, "NestedOptions");
    refused(pool.map(nested, [false]).await, "NestedOptions");
    refused(pool.apply(echo, (Some(None),)).await, "Option<u8>");
    refused(
        pool.map(echo, [Some(Some(1)), Some(None)]).await,
        "Option<u8>",
    );

    assert_eq!(pool.apply(no_unit, ()).await.unwrap(), None);
    let () = pool.apply(unit, ()).await.unwrap();
    assert_eq!(
        pool.apply(unit_marker, ()).await.unwrap(),
        (UnitMarker, Some(UnitMarker))
    );
    assert_eq!(
        pool.apply(echo, (Some(Some(7)),)).await.unwrap(),
        Some(Some(7))
    );
    assert_eq!(pool.apply(echo, (None,)).await.unwrap(), None);
    assert_eq!(
        pool.map(echo, [None, Some(Some(2)), Some(Some(0))])
            .await
            .unwrap(),
        [None, Some(Some(2)), Some(Some(0))]
    );
    assert_eq!(pool.stats().restarts, 0, "no worker died of it");
    pool.close().await;
}

fn plus_one(x: u32) -> u32 {
    x + 1
}

fn twice(x: u32) -> u32 {
    x * 2
}

/// `futures::select!` in a loop needs fused futures and streams: an `Apply` and an
/// `Imap` are, and both end cleanly (`complete`); `Imap::size_hint` bounds what is left.
#[tokio::test]
async fn apply_and_imap_are_fused_for_select_and_imap_says_what_is_left() {
    use futures::Stream as _;
    use futures::stream::FusedStream;
    let pool = AsyncPool::new(2).await.unwrap();
    let fast = pool.apply(plus_one, (1,));
    futures::pin_mut!(fast);
    let mut items = pool.imap(twice, 0..5u32);
    let (mut got, mut sum, mut n) = (None, 0, 0);
    loop {
        futures::select! {
            r = fast => got = Some(r.unwrap()),
            x = items.next() => if let Some(x) = x {
                sum += x.unwrap();
                n += 1;
            },
            complete => break,
        }
    }
    assert_eq!((got, sum, n), (Some(2), 20, 5));
    assert!(items.is_terminated());
    assert_eq!(items.size_hint(), (0, Some(0)));

    let imap = pool.imap(twice, 0..10u32);
    let (lo, hi) = imap.size_hint();
    let hi = hi.expect("a range tells its length");
    assert!(lo == 0 && (10..=11).contains(&hi), "({lo}, {hi})");
    assert_eq!(imap.collect::<Vec<_>>().await.len(), 10);
    pool.close().await;
}
