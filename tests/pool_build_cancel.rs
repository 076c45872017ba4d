//! A `build()` cancelled at any point leaves no worker behind. Its own test binary, so
//! the census of child processes sees only these pools.

mod support;

use std::time::Duration;

use procpool::AsyncPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_build_leaves_no_worker() {
    // One test, so the census of children sees one scenario at a time.
    // Cut the build short at many points: before, during and after the handshakes.
    for micros in (0..4000).step_by(250) {
        let cut = Duration::from_micros(micros);
        // Err: cancelled mid-build. Ok: built in time, then dropped.
        if let Ok(pool) = tokio::time::timeout(cut, AsyncPool::new(2)).await {
            drop(pool.unwrap());
        }
    }
    assert!(
        support::eventually_async(Duration::from_secs(10), || support::os_children()
            .is_empty())
        .await,
        "workers left behind: {:?}",
        support::describe_os_children()
    );
    cancel_during_a_hanging_initializer().await;
}

fn initializer_hangs() {
    support::hangs();
}

async fn cancel_during_a_hanging_initializer() {
    let build = AsyncPool::builder()
        .processes(2)
        .initializer(initializer_hangs, ())
        .build();
    let r = tokio::time::timeout(Duration::from_millis(500), build).await;
    assert!(r.is_err(), "the initializer never returns");
    assert!(
        support::eventually_async(Duration::from_secs(10), || support::os_children()
            .is_empty())
        .await,
        "workers stuck in their initializer: {:?}",
        support::describe_os_children()
    );
}
