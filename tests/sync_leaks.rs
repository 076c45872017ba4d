//! A long-running service must not grow: timed-out and cancelled remote waits, handles
//! and pipe ends sent inside queue items, and failed puts all leave this process's
//! sharing tables (`procpool::__tables`) as they found them.
//!
//! One test function: the tables are per process, and tests of one binary share it.

mod support;

use std::time::Duration;

use futures::FutureExt;
use procpool::{Error, Event, Lock, Queue, pipe};
use support::{SOON, soon};

/// The rounds of each kind.
const ROUNDS: u32 = 10_000;

/// Gives up on each kind of remote wait `ROUNDS` times (each sends its request, then its
/// cancel), then reports how many of this process's requests are still unanswered and
/// how many remote objects it has open.
async fn give_up_waiting(
    lock: Lock,
    ev: Event,
    empty: Queue<u32>,
    unfinished: Queue<u32>,
) -> (usize, usize) {
    // Each future is polled once (its request goes out) and dropped (its cancel goes),
    // as a timeout that expires would; `*_timeout` calls drop theirs the same way.
    for _ in 0..ROUNDS {
        assert!(lock.lock().now_or_never().is_none());
        assert!(ev.wait().now_or_never().is_none());
        assert!(empty.get().now_or_never().is_none());
        assert!(unfinished.join().now_or_never().is_none());
    }
    // And through the `*_timeout` calls, a few times (each takes a timer tick).
    for _ in 0..10 {
        assert!(!ev.wait_timeout(Duration::ZERO).await.unwrap());
        assert!(matches!(
            empty.get_timeout(Duration::ZERO).await,
            Err(Error::Timeout { .. })
        ));
    }
    // Every cancel went before this and is answered before it.
    empty.flush().await.unwrap();
    let t = procpool::__tables();
    (t.pending, t.remotes)
}

/// Serves `jobs` until it is closed: each job is a number and the queue for its answer.
fn serve(jobs: Queue<(u32, Queue<u32>)>) -> u32 {
    let mut served = 0;
    while let Ok((n, reply)) = jobs.blocking_get() {
        reply.blocking_put(n * 2).unwrap();
        served += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_running_use_leaves_the_tables_as_it_found_them() {
    let before = procpool::__tables();

    // 1. Remote waits given up, of every kind. The parent holds the lock, never sets
    //    the event, leaves the queue empty and one item unfinished.
    let lock = Lock::new();
    let held = lock.lock().await.unwrap();
    let ev = Event::new();
    let empty: Queue<u32> = Queue::new();
    let unfinished: Queue<u32> = Queue::new();
    unfinished.put(1).await.unwrap();
    let (pending, remotes) = soon(async {
        procpool::spawn(
            give_up_waiting,
            (lock.clone(), ev.clone(), empty.clone(), unfinished.clone()),
        )
        .await
        .unwrap()
        .join()
        .await
        .unwrap()
    })
    .await;
    assert_eq!(pending, 0, "the child's requests were all answered");
    assert_eq!(remotes, 4, "the child has the four objects open");
    let t = procpool::__tables();
    assert_eq!(
        t.parked, 0,
        "no request of the child is still parked here: {t:?}"
    );
    drop(held);

    // 2. Handles sent inside queue items (Python's `q.put((job, reply_q))`): each reply
    //    queue is freed once both sides are done with it.
    let jobs: Queue<(u32, Queue<u32>)> = Queue::new();
    let server = procpool::spawn(serve, (jobs.clone(),)).await.unwrap();
    let mut rss = Vec::new();
    for n in 0..ROUNDS {
        let reply: Queue<u32> = Queue::new();
        jobs.put((n, reply.clone())).await.unwrap();
        assert_eq!(reply.get_timeout(SOON).await.unwrap(), n * 2);
        if n % 2_000 == 1_999 {
            rss.push(support::status_kib("VmRSS"));
        }
    }
    jobs.close().unwrap();
    let mut server = server;
    assert_eq!(soon(server.join()).await.unwrap(), ROUNDS);

    // 3. A pipe end in a put that failed is let go at once: its peer sees the end.
    let full: Queue<Vec<procpool::Connection<u8>>> = Queue::bounded(1);
    let (a, b) = pipe::<u8>();
    full.try_put(Vec::new()).unwrap();
    let a = match full.try_put(vec![a]) {
        Err(procpool::TryPutError::Full(a)) => a,
        other => panic!("expected Full, got {other:?}"),
    };
    drop(a);
    assert!(
        matches!(soon(b.recv()).await, Err(Error::Closed)),
        "the peer of a pipe end that was never sent sees it closed"
    );
    drop(full);

    drop((lock, ev, empty, unfinished, jobs));
    // The server's exit reaches this process's hub on its own time (the session's end,
    // read by the service thread after `join` returned): what the child held open is
    // let go then. Seen in CI once: `objects` 1 above `before` when looked at at once.
    support::eventually(SOON, || procpool::__tables().objects == before.objects);
    let after = procpool::__tables();
    assert_eq!(after.pinned, before.pinned, "{before:?} -> {after:?}");
    assert_eq!(after.exports, before.exports, "{before:?} -> {after:?}");
    assert_eq!(after.objects, before.objects, "{before:?} -> {after:?}");
    assert_eq!(after.parked, 0, "{after:?}");
    // Memory: flat over the last 8,000 rounds (a leak of 8,000 queues with their tables
    // would show; allocator noise is far below the bound).
    let grew = rss.last().unwrap().saturating_sub(rss[0]);
    assert!(
        grew < 8 * 1024,
        "RSS grew by {grew} KiB over 8,000 rounds: {rss:?}"
    );
}
