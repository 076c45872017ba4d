//! `Queue` across real processes: every method, timeouts, backpressure, exactly-once
//! delivery, and what happens to items when a consumer dies or idles.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use procpool::{Error, Event, Process, Queue, TryPutError};
use support::{SOON, hangs, soon};

fn elapsed_about(start: Instant, d: Duration) {
    let took = start.elapsed();
    assert!(took >= d, "returned after {took:?}, before its {d:?}");
    assert!(
        took < d + Duration::from_secs(3),
        "returned after {took:?} for {d:?}"
    );
}

#[tokio::test]
async fn every_method_in_the_owner_process() {
    let q: Queue<String> = Queue::new();
    assert!(q.is_empty());
    assert_eq!(q.len(), 0);
    q.put("a".into()).await.unwrap();
    q.blocking_put("b".into()).unwrap();
    q.try_put("c".into()).unwrap();
    assert_eq!(q.len(), 3);
    assert!(!q.is_empty());
    assert_eq!(q.get().await.unwrap(), "a");
    assert_eq!(q.blocking_get().unwrap(), "b");
    assert_eq!(q.try_get().unwrap().as_deref(), Some("c"));
    assert_eq!(q.try_get().unwrap(), None);

    let start = Instant::now();
    let err = q.get_timeout(Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    elapsed_about(start, Duration::from_millis(200));

    let b: Queue<u8> = Queue::bounded(1);
    b.put(1).await.unwrap();
    assert!(matches!(b.try_put(2), Err(TryPutError::Full(2))));
    let start = Instant::now();
    let err = b
        .put_timeout(3, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    elapsed_about(start, Duration::from_millis(200));
    assert_eq!(b.len(), 1, "a timed-out put put nothing");

    // close: puts fail, gets drain then fail.
    q.put("last".into()).await.unwrap();
    q.close().unwrap();
    assert!(matches!(q.put("x".into()).await, Err(Error::Closed)));
    assert!(matches!(q.try_put("x".into()), Err(TryPutError::Closed(_))));
    assert_eq!(q.get().await.unwrap(), "last");
    assert!(matches!(q.get().await, Err(Error::Closed)));
    assert!(matches!(q.try_get(), Err(Error::Closed)));
}

#[tokio::test]
async fn task_done_and_join_in_the_owner() {
    let q: Queue<u8> = Queue::new();
    q.join().await.unwrap();
    q.put(1).await.unwrap();
    q.put(2).await.unwrap();
    let joined = tokio::time::timeout(Duration::from_millis(100), q.join()).await;
    assert!(joined.is_err(), "join returned with two unfinished items");
    q.get().await.unwrap();
    q.task_done().unwrap();
    q.get().await.unwrap();
    q.task_done().unwrap();
    soon(q.join()).await.unwrap();
    assert!(matches!(q.task_done(), Err(Error::InvalidConfig { .. })));
}

/// What a child saw, as text, so the parent can assert it all in one place.
fn remote_calls(q: Queue<u32>, full: Queue<u32>, empty: Queue<u32>) -> Vec<String> {
    let mut seen = Vec::new();
    seen.push(format!("len {}", q.len()));
    seen.push(format!("get {}", q.blocking_get().unwrap()));
    seen.push(format!("try_get {:?}", q.try_get().unwrap()));
    q.blocking_put(10).unwrap();
    q.try_put(11).unwrap();
    seen.push(format!("len after puts {}", q.len()));
    let t = Instant::now();
    seen.push(format!("try_get empty {:?}", empty.try_get().unwrap()));
    seen.push(format!("empty is_empty {}", empty.is_empty()));
    let quick = t.elapsed() < Duration::from_secs(2);
    seen.push(format!("non-blocking calls quick {quick}"));
    let full_err = match full.try_put(5) {
        Err(TryPutError::Full(5)) => "Full(5)".to_owned(),
        other => format!("{other:?}"),
    };
    seen.push(format!("try_put full {full_err}"));
    seen
}

#[tokio::test]
async fn every_method_from_another_process() {
    let q: Queue<u32> = Queue::new();
    let full: Queue<u32> = Queue::bounded(1);
    let empty: Queue<u32> = Queue::new();
    full.put(0).await.unwrap();
    q.put(1).await.unwrap();
    q.put(2).await.unwrap();
    let seen = procpool::spawn(remote_calls, (q.clone(), full.clone(), empty.clone()))
        .await
        .unwrap()
        .join()
        .await
        .unwrap();
    assert_eq!(
        seen,
        [
            "len 2",
            "get 1",
            "try_get Some(2)",
            "len after puts 2",
            "try_get empty None",
            "empty is_empty true",
            "non-blocking calls quick true",
            "try_put full Full(5)",
        ]
    );
    // The child's puts were applied before its result came back.
    assert_eq!(q.try_get().unwrap(), Some(10));
    assert_eq!(q.try_get().unwrap(), Some(11));
    assert_eq!(full.len(), 1);
}

/// Timeouts measured in the child, from async code.
async fn remote_timeouts(empty: Queue<u32>, full: Queue<u32>) -> (String, u64, String, u64) {
    let d = Duration::from_millis(300);
    let t = Instant::now();
    let got = format!("{:?}", empty.get_timeout(d).await);
    let get_ms = t.elapsed().as_millis() as u64;
    let t = Instant::now();
    let put = format!("{:?}", full.put_timeout(7, d).await);
    let put_ms = t.elapsed().as_millis() as u64;
    (got, get_ms, put, put_ms)
}

#[tokio::test]
async fn timeouts_from_another_process_return_after_about_their_duration() {
    let empty: Queue<u32> = Queue::new();
    let full: Queue<u32> = Queue::bounded(1);
    full.put(1).await.unwrap();
    let (got, get_ms, put, put_ms) =
        procpool::spawn(remote_timeouts, (empty.clone(), full.clone()))
            .await
            .unwrap()
            .join()
            .await
            .unwrap();
    assert!(got.starts_with("Err(Timeout"), "{got}");
    assert!(put.starts_with("Err(Timeout"), "{put}");
    for ms in [get_ms, put_ms] {
        assert!(
            (300..3300).contains(&ms),
            "took {ms} ms for a 300 ms timeout"
        );
    }
    assert_eq!(full.len(), 1, "the timed-out put was withdrawn");
    assert_eq!(full.try_get().unwrap(), Some(1));
    assert_eq!(full.try_get().unwrap(), None);
}

fn produce(q: Queue<Option<(u32, u32)>>, producer: u32, n: u32) {
    for i in 0..n {
        q.blocking_put(Some((producer, i))).unwrap();
    }
}

async fn consume(q: Queue<Option<(u32, u32)>>) -> Vec<(u32, u32)> {
    let mut got = Vec::new();
    while let Some(item) = q.get().await.unwrap() {
        got.push(item);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_producers_four_consumers_deliver_every_item_exactly_once() {
    const PER_PRODUCER: u32 = 25_000;
    let q: Queue<Option<(u32, u32)>> = Queue::new();
    let mut consumers = Vec::new();
    for _ in 0..4 {
        consumers.push(procpool::spawn(consume, (q.clone(),)).await.unwrap());
    }
    let mut producers = Vec::new();
    for p in 0..4 {
        producers.push(
            procpool::spawn(produce, (q.clone(), p, PER_PRODUCER))
                .await
                .unwrap(),
        );
    }
    for p in &mut producers {
        p.join().await.unwrap();
    }
    for _ in 0..4 {
        q.put(None).await.unwrap();
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for c in &mut consumers {
        let got = c.join().await.unwrap();
        // FIFO per producer, as each consumer sees it.
        let mut last = [None::<u32>; 4];
        for &(p, i) in &got {
            let prev = &mut last[p as usize];
            assert!(
                prev.is_none_or(|prev| prev < i),
                "producer {p}: {i} after {prev:?}"
            );
            *prev = Some(i);
            assert!(seen.insert((p, i)), "({p}, {i}) delivered twice");
        }
        total += got.len();
    }
    assert_eq!(total, 4 * PER_PRODUCER as usize, "items lost");
    assert!(q.is_empty(), "left behind: {}", q.len());
}

/// Puts `n` items, reporting each on `progress` once it is in.
fn fill(q: Queue<u32>, progress: Queue<u32>, n: u32) {
    for i in 0..n {
        q.blocking_put(i).unwrap();
        progress.blocking_put(i).unwrap();
    }
}

#[tokio::test]
async fn a_bounded_queue_blocks_a_producer_in_another_process() {
    let q: Queue<u32> = Queue::bounded(2);
    let progress: Queue<u32> = Queue::new();
    let mut child = procpool::spawn(fill, (q.clone(), progress.clone(), 5))
        .await
        .unwrap();
    assert_eq!(progress.get_timeout(SOON).await.unwrap(), 0);
    assert_eq!(progress.get_timeout(SOON).await.unwrap(), 1);
    // The third put waits for room.
    let blocked = progress.get_timeout(Duration::from_millis(300)).await;
    assert!(matches!(blocked, Err(Error::Timeout { .. })), "{blocked:?}");
    assert_eq!(q.len(), 2);
    for expect in 0..5 {
        assert_eq!(q.get_timeout(SOON).await.unwrap(), expect);
    }
    child.join().await.unwrap();
    assert_eq!(q.len(), 0);
}

/// Takes `n` items quickly (so it prefetches more) and reports them.
fn take_and_report(q: &Queue<u32>, report: &Queue<Vec<u32>>, n: usize) {
    let got = (0..n).map(|_| q.blocking_get().unwrap()).collect();
    report.blocking_put(got).unwrap();
}

fn take_then_idle(q: Queue<u32>, report: Queue<Vec<u32>>, n: usize, release: Event) {
    take_and_report(&q, &report, n);
    release.blocking_wait().unwrap();
}

fn take_then_hang(q: Queue<u32>, report: Queue<Vec<u32>>, n: usize) {
    take_and_report(&q, &report, n);
    hangs();
}

#[tokio::test]
async fn items_an_idle_consumer_prefetched_are_recalled_for_a_waiting_one() {
    let q: Queue<u32> = Queue::new();
    let report: Queue<Vec<u32>> = Queue::new();
    let release = Event::new();
    let mut child = procpool::spawn(
        take_then_idle,
        (q.clone(), report.clone(), 20, release.clone()),
    )
    .await
    .unwrap();
    // Fed one at a time while it is taking, so it keeps asking for bigger batches.
    for i in 0..200 {
        q.put(i).await.unwrap();
    }
    let got = report.get_timeout(SOON).await.unwrap();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    // Whatever it prefetched beyond 20 and holds while idle comes back once we wait on
    // an otherwise empty queue: we get every other item, each once.
    let mut rest = Vec::new();
    while rest.len() < 180 {
        rest.push(q.get_timeout(SOON).await.unwrap());
    }
    rest.sort_unstable();
    assert_eq!(rest, (20..200).collect::<Vec<_>>());
    assert!(q.is_empty());
    release.set().unwrap();
    child.join().await.unwrap();
}

#[tokio::test]
async fn items_a_killed_consumer_prefetched_go_back_to_the_queue() {
    let q: Queue<u32> = Queue::new();
    let report: Queue<Vec<u32>> = Queue::new();
    for i in 0..200 {
        q.put(i).await.unwrap();
    }
    let mut child = procpool::spawn(take_then_hang, (q.clone(), report.clone(), 20))
        .await
        .unwrap();
    let got = report.get_timeout(SOON).await.unwrap();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    child.kill().unwrap();
    assert!(matches!(child.join().await, Err(Error::WorkerDied { .. })));
    // What it had prefetched goes back to the front once the owner sees its connection
    // close, which may be just after `join` returns: every item comes, each once.
    let mut rest = Vec::new();
    while rest.len() < 180 {
        rest.push(q.get_timeout(SOON).await.unwrap());
    }
    rest.sort_unstable();
    assert_eq!(rest, (20..200).collect::<Vec<_>>());
    assert!(q.is_empty());
}

/// Forwards `n` items from `a` to `b`, makes sure `b`'s owner has them, says so in
/// `marker`, and dies without any clean-up.
fn forward_flush_then_abort(
    a: Queue<serde_bytes::ByteBuf>,
    b: Queue<serde_bytes::ByteBuf>,
    n: usize,
    marker: String,
) -> u8 {
    for _ in 0..n {
        let item = a.blocking_get().unwrap();
        b.blocking_put(item).unwrap();
    }
    b.blocking_flush().unwrap();
    support::write_file(&marker, &n.to_string());
    std::process::abort()
}

fn index_of(item: &[u8]) -> u64 {
    u64::from_le_bytes(item[..8].try_into().unwrap())
}

#[tokio::test]
async fn puts_flushed_before_an_abort_reach_the_owner_and_nothing_is_lost() {
    // Large items: the last put's bytes are far from sent when `put` returns, so without
    // the flush the abort would lose it.
    const N: usize = 8;
    const M: usize = 8;
    let dir = support::TempDir::new("flush-abort");
    let marker = dir.path("forwarded");
    let a: Queue<serde_bytes::ByteBuf> = Queue::new();
    let b: Queue<serde_bytes::ByteBuf> = Queue::new();
    for i in 0..(N + M) as u64 {
        let mut item = vec![0u8; 4 << 20];
        item[..8].copy_from_slice(&i.to_le_bytes());
        a.put(serde_bytes::ByteBuf::from(item)).await.unwrap();
    }
    let mut child = procpool::spawn(
        forward_flush_then_abort,
        (a.clone(), b.clone(), N, marker.clone()),
    )
    .await
    .unwrap();
    assert!(
        matches!(child.join().await, Err(Error::WorkerDied { .. })),
        "the child aborts"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the child flushed before it aborted"),
        N.to_string()
    );
    // Every forwarded item is in `b` (it was there before the child died) ...
    assert_eq!(b.len(), N, "puts the child flushed are at the owner");
    let mut seen = HashSet::new();
    for _ in 0..N {
        assert!(seen.insert(index_of(&b.try_get().unwrap().expect("an item"))));
    }
    // ... and every other item comes back to `a` (what the child had prefetched, once
    // the owner sees its connection close): each item exactly once.
    for _ in 0..M {
        assert!(seen.insert(index_of(&a.get_timeout(SOON).await.unwrap())));
    }
    assert_eq!(seen, (0..(N + M) as u64).collect::<HashSet<_>>());
    assert!(a.is_empty() && b.is_empty());
}

fn get_until_closed(q: Queue<u32>, ready: Event) -> String {
    ready.set().unwrap();
    format!("{:?}", q.blocking_get())
}

#[tokio::test]
async fn closing_wakes_a_consumer_in_another_process() {
    let q: Queue<u32> = Queue::new();
    let ready = Event::new();
    let mut child = procpool::spawn(get_until_closed, (q.clone(), ready.clone()))
        .await
        .unwrap();
    soon(ready.wait()).await.unwrap();
    q.close().unwrap();
    let got = soon(child.join()).await.unwrap();
    assert_eq!(got, "Err(Closed)");
}

fn make_queue() -> Queue<u32> {
    let q = Queue::new();
    q.blocking_put(1).unwrap();
    q
}

#[tokio::test]
async fn a_queue_whose_owner_exited_is_closed() {
    let q = procpool::spawn(make_queue, ())
        .await
        .unwrap()
        .join()
        .await
        .unwrap();
    // Its owner (the child) has exited: nothing can be reached.
    assert!(
        matches!(q.get_timeout(SOON).await, Err(Error::Closed)),
        "{:?}",
        q
    );
    assert!(matches!(q.try_get(), Err(Error::Closed)));
    assert!(matches!(q.put(2).await, Err(Error::Closed)));
    assert_eq!(q.len(), 0);
}

fn mark_done(q: Queue<u32>) {
    while let Ok(Some(_)) = q.try_get() {
        q.task_done().unwrap();
    }
}

#[tokio::test]
async fn join_waits_for_task_done_from_another_process() {
    let q: Queue<u32> = Queue::new();
    for i in 0..10 {
        q.put(i).await.unwrap();
    }
    let mut child = Process::new(mark_done, (q.clone(),));
    child.start().await.unwrap();
    soon(q.join()).await.unwrap();
    child.join().await.unwrap();
}
