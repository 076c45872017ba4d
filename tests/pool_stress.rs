//! Cancellation stress, in the spirit of deadpool's `managed_cancellation.rs`: hundreds of
//! tasks (quick, panicking, slow, never-ending) under random timeouts and drops on a
//! multi-thread runtime, then the invariants. Its own test binary, so that the census of
//! child processes and fds sees only this pool.

mod support;

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use procpool::{AsyncPool, Error};

fn task(kind: u8, ms: u64) -> u64 {
    match kind {
        0 => ms,
        1 => panic!("task fails"),
        2 => {
            std::thread::sleep(Duration::from_millis(ms));
            ms
        }
        _ => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}

fn doubler(x: u64) -> u64 {
    x * 2
}

/// A small deterministic generator (no dependency, same sequence every run).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_timeouts_and_drops_leave_a_consistent_pool() {
    // Warm up procpool's process-wide threads (the service thread; the pools' runtime,
    // started with the first pool and kept) so that their fds are in the baseline.
    drop(procpool::spawn(doubler, (1,)).await.unwrap().join().await);
    AsyncPool::new(1).await.unwrap().terminate().await;
    let fds_before = open_fds();

    let pool = AsyncPool::builder()
        .processes(2)
        .kill_grace(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    let mut rng = Lcg(7);
    let mut futs = FuturesUnordered::new();
    let (mut resolved, mut dropped) = (0u32, 0u32);
    for i in 0..300u32 {
        let kind = (rng.next() % 4) as u8;
        let ms = rng.next() % 20;
        let timeout = Duration::from_millis(rng.next() % 60 + 1);
        match rng.next() % 3 {
            // Awaited with a caller timeout: resolves one way or another.
            0 => {
                let f = pool.apply(task, (kind, ms)).timeout(timeout);
                futs.push(Box::pin(async move { Some(f.await) })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>);
            }
            // A handle dropped after a random while (cancellation by drop).
            1 => {
                let h = pool.apply_async(task, (kind, ms));
                futs.push(Box::pin(async move {
                    tokio::time::sleep(timeout).await;
                    drop(h);
                    None
                }));
            }
            // Raced in select! against a timer: the loser is dropped.
            _ => {
                let f = pool.apply(task, (kind, ms));
                futs.push(Box::pin(async move {
                    tokio::select! {
                        r = f => Some(r),
                        () = tokio::time::sleep(timeout) => None,
                    }
                }));
            }
        }
        if i % 50 == 49 {
            while let Some(r) = futs.next().await {
                match r {
                    Some(Ok(_)) | Some(Err(Error::Panicked { .. } | Error::Timeout { .. })) => {
                        resolved += 1
                    }
                    Some(Err(e)) => panic!("unexpected error {e:?}"),
                    None => dropped += 1,
                }
            }
        }
    }
    assert_eq!(resolved + dropped, 300, "every future resolved or dropped");

    // The dispatcher settles: nothing queued or running, the counts add up.
    assert!(
        support::eventually_async(Duration::from_secs(30), || {
            let s = pool.stats();
            s.queued == 0 && s.running == 0 && s.workers == 2
        })
        .await,
        "{:?}",
        pool.stats()
    );
    let s = pool.stats();
    assert_eq!(s.submitted, 300, "{s:?}");
    assert_eq!(s.submitted, s.completed + s.failed + s.cancelled, "{s:?}");

    // The pool still does real work.
    let xs: Vec<u64> = (0..1000).collect();
    let out = pool.map(doubler, xs.clone()).await.unwrap();
    assert_eq!(out, xs.iter().map(|x| x * 2).collect::<Vec<_>>());

    // No process beyond the pool's two workers (killed ones are reaped) ...
    assert!(
        support::eventually_async(Duration::from_secs(10), || support::os_children().len()
            == 2)
        .await,
        "children: {:?}",
        support::os_children()
    );
    // ... and nothing at all, fds included, once the pool is gone.
    pool.terminate().await;
    drop(pool);
    assert!(
        support::eventually_async(Duration::from_secs(10), || support::os_children()
            .is_empty())
        .await,
        "children left: {:?}",
        support::os_children()
    );
    assert!(
        support::eventually_async(Duration::from_secs(10), || open_fds() <= fds_before).await,
        "fds: {} before, {} after",
        fds_before,
        open_fds()
    );
}
