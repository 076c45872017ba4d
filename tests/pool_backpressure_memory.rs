//! A million tasks submitted through the lazy path (`apply(...).await`) from 100
//! concurrent callers against 2 workers keep the parent's peak RSS bounded: a test
//! binary of its own, so that nothing else moves the peak.

mod support;

use futures::StreamExt;
use procpool::AsyncPool;

fn double(x: u64) -> u64 {
    x * 2
}

/// The process's peak resident set so far.
fn peak_rss_kib() -> u64 {
    support::status_kib("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_lazy_submissions_from_100_callers_keep_memory_bounded() {
    const CALLERS: u64 = 100;
    const EACH: u64 = 10_000;
    let pool = AsyncPool::builder()
        .processes(2)
        .max_queued(1_000)
        .build()
        .await
        .unwrap();
    let before = peak_rss_kib();
    let mut callers = tokio::task::JoinSet::new();
    for c in 0..CALLERS {
        let pool = pool.clone();
        callers.spawn(async move {
            // Each caller keeps 16 calls going: 1,600 at once against a queue of 1,000.
            let calls = futures::stream::iter(0..EACH)
                .map(|i| pool.apply(double, (c * EACH + i,)))
                .buffer_unordered(16);
            futures::StreamExt::fold(calls, 0u64, |n, r| async move {
                r.unwrap();
                n + 1
            })
            .await
        });
    }
    let mut done = 0;
    while let Some(n) = callers.join_next().await {
        done += n.unwrap();
    }
    assert_eq!(done, CALLERS * EACH);
    let grew = peak_rss_kib().saturating_sub(before);
    // Bound: 64 MiB over the start, for a million tasks (unbounded, their queue alone
    // would need several hundred MiB).
    assert!(grew < 64 * 1024, "peak RSS grew by {grew} KiB");
    let s = pool.stats();
    assert_eq!(s.submitted, CALLERS * EACH, "{s:?}");
}
