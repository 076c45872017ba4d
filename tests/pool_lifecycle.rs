//! close, terminate, dropping the last handle, and a SIGKILLed parent.

mod support;

use std::time::{Duration, Instant};

use procpool::{AsyncPool, Error, Process};
use support::{
    TempDir, ended_within, hangs, is_dead, not_reaped, read_file_async, running, wait_for_file,
    write_file,
};

fn pid() -> u32 {
    std::process::id()
}

fn waits_then_returns(gate: String, v: u32) -> u32 {
    wait_for_file(&gate);
    v
}

async fn worker_pids(pool: &AsyncPool) -> Vec<u32> {
    // One task per worker at a time (chunksize 1), enough tasks to reach both.
    let mut pids: Vec<u32> = pool
        .map(|_: u8| pid(), vec![0; 64])
        .chunksize(1)
        .await
        .unwrap();
    pids.sort();
    pids.dedup();
    pids
}

/// Every pid in `pids` reaped (gone from `/proc`, not even a zombie), judged from
/// `since` by [`ended_within`].
async fn reaped_within(pids: &[u32], since: Instant, limit: Duration) {
    for &p in pids {
        ended_within(p, since, limit, not_reaped).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lets_queued_work_finish_then_reaps() {
    let pool = AsyncPool::new(2).await.unwrap();
    let pids = worker_pids(&pool).await;
    let dir = TempDir::new("close");
    let gate = dir.path("gate");
    let handles: Vec<_> = (0..10)
        .map(|i| pool.apply_async(waits_then_returns, (gate.clone(), i)))
        .collect();
    // The first poll of close() marks the pool closed; it then waits for the queue.
    let mut closing = Box::pin(pool.close());
    assert!(futures::poll!(&mut closing).is_pending());
    // New work is refused at once, while the queued work is still waiting.
    assert!(matches!(pool.apply(pid, ()).await, Err(Error::PoolClosed)));
    write_file(&gate, "go");
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.await.unwrap(),
            i as u32,
            "queued work finishes after close"
        );
    }
    closing.await;
    // close() returns once its workers are reaped; a second is generous for the look.
    reaped_within(&pids, Instant::now(), Duration::from_secs(1)).await;
    assert_eq!(pool.stats().workers, 0);
}

#[tokio::test]
async fn terminate_resolves_everything_within_a_second_and_reaps() {
    let pool = AsyncPool::new(2).await.unwrap();
    let pids = worker_pids(&pool).await;
    let busy: Vec<_> = (0..2).map(|_| pool.apply_async(hangs, ())).collect();
    let queued: Vec<_> = (0..5).map(|_| pool.apply_async(hangs, ())).collect();
    let start = Instant::now();
    pool.terminate().await;
    // Everything is resolved by the time terminate() returns: no poll here waits.
    for h in busy.into_iter().chain(queued) {
        let r = futures::FutureExt::now_or_never(h);
        assert!(matches!(r, Some(Err(Error::PoolClosed))), "{r:?}");
    }
    reaped_within(&pids, start, Duration::from_secs(1)).await;
    assert!(matches!(pool.apply(pid, ()).await, Err(Error::PoolClosed)));
}

#[tokio::test]
async fn dropping_the_last_handle_kills_and_reaps_the_workers() {
    let pool = AsyncPool::new(2).await.unwrap();
    let pids = worker_pids(&pool).await;
    let busy = pool.apply_async(hangs, ());
    busy.detach();
    let dropped = Instant::now();
    drop(pool);
    // DESIGN.md: within a second none is left running or a zombie.
    reaped_within(&pids, dropped, Duration::from_secs(1)).await;
}

async fn pool_reporting_its_workers(report: String) -> u8 {
    let pool = AsyncPool::new(2).await.expect("pool in helper");
    let pids = worker_pids(&pool).await;
    let text: Vec<String> = pids.iter().map(u32::to_string).collect();
    write_file(&report, &text.join(" "));
    std::future::pending::<()>().await;
    unreachable!()
}

#[tokio::test]
async fn a_sigkilled_parent_leaves_no_pool_worker_running() {
    let dir = TempDir::new("pool-orphans");
    let report = dir.path("workers");
    let mut helper = Process::new(pool_reporting_its_workers, (report.clone(),));
    helper.start().await.unwrap();
    let text = read_file_async(&report, Duration::from_secs(60)).await;
    let workers: Vec<u32> = text.split(' ').map(|p| p.parse().unwrap()).collect();
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|&w| !is_dead(w)));
    helper.kill().unwrap();
    let killed = Instant::now();
    assert!(matches!(helper.join().await, Err(Error::WorkerDied { .. })));
    // DESIGN.md: every child exits within 1 s of its parent's SIGKILL.
    for w in workers {
        ended_within(w, killed, Duration::from_secs(1), running).await;
    }
}
