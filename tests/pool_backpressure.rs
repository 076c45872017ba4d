//! `Builder::max_queued`: the lazy calls wait for room in a full queue (their timeout
//! counts the wait), the eager ones never wait (`tests/pool_backpressure_memory.rs`: a
//! million submissions through the lazy path keep the parent's memory bounded).

mod support;

use std::time::{Duration, Instant};

use futures::FutureExt;
use procpool::{AsyncPool, Error, Event};
use support::soon;

fn wait_for(ev: Event) -> u8 {
    ev.blocking_wait().unwrap();
    1
}

fn double(x: u64) -> u64 {
    x * 2
}

#[tokio::test]
async fn max_queued_zero_is_invalid() {
    let r = AsyncPool::builder()
        .processes(1)
        .max_queued(0)
        .build()
        .await;
    assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_lazy_calls_wait_and_eager_ones_go_over() {
    // One task at a worker at a time: the rest waits in the queue.
    let pool = AsyncPool::builder()
        .processes(1)
        .pipeline_depth(1)
        .max_queued(1)
        .build()
        .await
        .unwrap();
    let gate = Event::new();
    // The worker is busy until the gate opens.
    let busy = pool.apply_async(wait_for, (gate.clone(),));
    assert!(support::eventually_async(support::SOON, || pool.stats().running == 1).await);
    // One lazy call takes the queue's one place ...
    let mut queued = Box::pin(pool.apply(wait_for, (gate.clone(),)));
    assert!((&mut queued).now_or_never().is_none());
    assert!(support::eventually_async(support::SOON, || pool.stats().queued == 1).await);
    // ... so the next waits for room, not in the queue, and its timeout counts the wait.
    let start = Instant::now();
    let waited = pool
        .apply(double, (1,))
        .timeout(Duration::from_millis(300))
        .await;
    let took = start.elapsed();
    assert!(matches!(waited, Err(Error::Timeout { .. })), "{waited:?}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(
        pool.stats().submitted,
        2,
        "the timed-out call was never submitted"
    );
    // An eager call never waits: it goes into the full queue, over the bound.
    let eager = pool.apply_async(double, (2,));
    assert!(support::eventually_async(support::SOON, || pool.stats().queued == 2).await);
    // A lazy call waiting for room gets in as soon as there is some.
    let later = tokio::spawn(pool.apply(double, (3,)));
    gate.set().unwrap();
    assert_eq!(soon(busy).await.unwrap(), 1);
    assert_eq!(soon(queued).await.unwrap(), 1);
    assert_eq!(soon(eager).await.unwrap(), 4);
    assert_eq!(soon(later).await.unwrap().unwrap(), 6);
    // Closing wakes a call waiting for room with `PoolClosed`.
    let blocker = pool.apply_async(wait_for, (Event::new(),));
    assert!(support::eventually_async(support::SOON, || pool.stats().running == 1).await);
    let mut first = Box::pin(pool.apply(double, (4,)));
    assert!((&mut first).now_or_never().is_none());
    let waiting = tokio::spawn(pool.apply(double, (5,)));
    pool.terminate().await;
    assert!(matches!(
        soon(waiting).await.unwrap(),
        Err(Error::PoolClosed)
    ));
    drop((blocker, first));
}
