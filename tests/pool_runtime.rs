//! A pool belongs to no runtime (DESIGN.md §9): its dispatcher and its workers' I/O run
//! on procpool's own thread, so it keeps serving after the runtime that built it is
//! gone, and one `static` pool serves every `#[tokio::test]` of a binary (each has a
//! runtime of its own, of either flavour).

mod support;

use std::time::Duration;

use procpool::{AsyncPool, Error};
use tokio::sync::OnceCell;

fn double(x: u64) -> u64 {
    x * 2
}

fn pid() -> u32 {
    std::process::id()
}

fn sleeps(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[test]
fn a_pool_built_in_one_runtime_serves_another_after_the_first_is_dropped() {
    let first = tokio::runtime::Runtime::new().unwrap();
    let pool = first.block_on(AsyncPool::new(2)).unwrap();
    assert_eq!(first.block_on(pool.apply(double, (1,))).unwrap(), 2);
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        assert_eq!(pool.apply(double, (21,)).await.unwrap(), 42);
        let doubled = pool.map(double, 0..100u64).await.unwrap();
        assert_eq!(doubled, (0..100).map(|x| x * 2).collect::<Vec<_>>());
        // Timeouts and cancels work too (the worker is stopped and replaced).
        let late = pool
            .apply(sleeps, (60_000,))
            .timeout(Duration::from_millis(100))
            .await;
        assert!(matches!(late, Err(Error::Timeout { .. })), "{late:?}");
        assert_eq!(support::soon(pool.apply(double, (5,))).await.unwrap(), 10);
        pool.close().await;
    });
}

#[test]
fn a_pool_works_under_a_plain_executor() {
    // No tokio runtime at all: futures' own `block_on`.
    futures::executor::block_on(async {
        let pool = AsyncPool::new(1).await.unwrap();
        assert_eq!(pool.apply(double, (4,)).await.unwrap(), 8);
        let handle = pool.apply_async(double, (5,));
        assert_eq!(handle.await.unwrap(), 10);
        pool.terminate().await;
    });
}

/// One pool for every test below, built by whichever runs first, in its runtime.
async fn shared() -> &'static AsyncPool {
    static POOL: OnceCell<AsyncPool> = OnceCell::const_new();
    POOL.get_or_init(|| async { AsyncPool::new(2).await.unwrap() })
        .await
}

async fn use_the_shared_pool(n: u64) {
    let pool = shared().await;
    assert_eq!(pool.apply(double, (n,)).await.unwrap(), 2 * n);
    let items: Vec<u64> = (0..50).map(|i| i + n).collect();
    let want: Vec<u64> = items.iter().map(|x| x * 2).collect();
    assert_eq!(pool.map(double, items).chunksize(5).await.unwrap(), want);
    assert_ne!(pool.apply(pid, ()).await.unwrap(), std::process::id());
}

macro_rules! shared_pool_tests {
    ($($name:ident: $flavor:literal, $n:expr;)*) => {$(
        #[tokio::test(flavor = $flavor)]
        async fn $name() {
            use_the_shared_pool($n).await;
        }
    )*};
}

shared_pool_tests! {
    shared_pool_current_thread_1: "current_thread", 1;
    shared_pool_current_thread_2: "current_thread", 2;
    shared_pool_current_thread_3: "current_thread", 3;
    shared_pool_current_thread_4: "current_thread", 4;
    shared_pool_current_thread_5: "current_thread", 5;
    shared_pool_multi_thread_6: "multi_thread", 6;
    shared_pool_multi_thread_7: "multi_thread", 7;
    shared_pool_multi_thread_8: "multi_thread", 8;
    shared_pool_multi_thread_9: "multi_thread", 9;
    shared_pool_multi_thread_10: "multi_thread", 10;
}
