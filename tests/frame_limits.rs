//! Arguments over the frame limit are refused with `Error::Encode` before any child is
//! started, and results over it are `Error::Encode` naming their type; nothing hangs,
//! no worker dies and no child is left. Its own test binary: the census of
//! children sees only these, and the 1 GiB buffers are not multiplied by parallel tests.

mod support;

use std::time::Duration;

use procpool::{AsyncPool, Error, Process};
use serde_bytes::ByteBuf;

fn len_of(b: ByteBuf) -> usize {
    b.len()
}

fn init_with(b: ByteBuf) {
    assert!(!b.is_empty());
}

/// Just over one frame: `vec!` of zeros is lazily mapped, so only encoding touches it.
fn oversize() -> ByteBuf {
    ByteBuf::from(vec![0u8; procpool::DEFAULT_MAX_FRAME + 16])
}

fn returns_oversize() -> ByteBuf {
    oversize()
}

fn pid() -> u32 {
    std::process::id()
}

/// As `support::soon`, with more room: each step here makes (and, in a child, checks)
/// a value of 64 MB in a debug build, which took up to 14 s on a loaded 2-core machine
/// while the rest of the suite ran. A hang still fails the test.
async fn within_a_minute<F: std::future::Future>(f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(60), f).await {
        Ok(out) => out,
        Err(_) => panic!("did not finish within a minute"),
    }
}

/// One test, so the census of children at its end sees only its own scenarios.
#[tokio::test]
async fn oversize_values_are_encode_errors_and_nothing_hangs_or_is_lost() {
    an_oversize_remote_put_is_encode_and_loses_nothing_nor_the_lock().await;
    arguments_and_results_over_the_frame_limit_are_encode_errors_and_leave_no_child().await;
}

async fn arguments_and_results_over_the_frame_limit_are_encode_errors_and_leave_no_child() {
    let mut p = Process::new(len_of, (oversize(),));
    let r = within_a_minute(p.start()).await;
    match r {
        Err(Error::Encode {
            type_name, reason, ..
        }) => {
            assert!(type_name.contains("ByteBuf"), "{type_name}");
            assert!(reason.contains("one message holds at most"), "{reason}");
        }
        other => panic!("expected Encode at start, got {other:?}"),
    }
    assert!(matches!(p.join().await, Err(Error::NotStarted)));

    let r = AsyncPool::builder()
        .processes(1)
        .initializer(init_with, (oversize(),))
        .build();
    match within_a_minute(r).await {
        Err(Error::Encode { type_name, .. }) => assert!(type_name.contains("ByteBuf")),
        other => panic!("expected Encode at build, got {other:?}"),
    }

    let pool = AsyncPool::new(1).await.unwrap();
    let r = within_a_minute(pool.apply(len_of, (oversize(),))).await;
    assert!(matches!(r, Err(Error::Encode { .. })), "{r:?}");
    assert_eq!(
        pool.apply(len_of, (ByteBuf::from(vec![1; 10]),))
            .await
            .unwrap(),
        10
    );

    // A result over the limit: Encode naming its type, and the same worker serves on.
    let me = pool.apply(pid, ()).await.unwrap();
    match within_a_minute(pool.apply(returns_oversize, ())).await {
        Err(Error::Encode {
            type_name, reason, ..
        }) => {
            assert!(type_name.contains("ByteBuf"), "{type_name}");
            assert!(reason.contains("one message holds at most"), "{reason}");
        }
        other => panic!("expected Encode for the result, got {other:?}"),
    }
    let r = within_a_minute(pool.map(|_: u8| returns_oversize(), vec![1u8])).await;
    assert!(matches!(r, Err(Error::Encode { .. })), "{r:?}");
    assert_eq!(
        pool.apply(pid, ()).await.unwrap(),
        me,
        "the worker kept serving"
    );
    assert_eq!(pool.stats().restarts, 0);
    pool.terminate().await;
    assert!(
        support::eventually_async(Duration::from_secs(10), || support::os_children()
            .is_empty())
        .await,
        "children left: {:?}",
        support::describe_os_children()
    );
}

/// Holds `lock`, tries to put an item over the limit, reports what `put` said, puts a
/// small one, and lets go of the lock only when `go` is set.
fn puts_oversize_while_holding(
    lock: procpool::Lock,
    q: procpool::Queue<ByteBuf>,
    report: procpool::Queue<String>,
    go: procpool::Event,
) {
    let guard = lock.blocking_lock().expect("lock");
    let r = q.blocking_put(ByteBuf::from(vec![0u8; procpool::DEFAULT_MAX_FRAME - 1000]));
    report.blocking_put(format!("{r:?}")).expect("report");
    q.blocking_put(ByteBuf::from(vec![7])).expect("small put");
    go.blocking_wait().expect("go");
    drop(guard);
}

async fn an_oversize_remote_put_is_encode_and_loses_nothing_nor_the_lock() {
    let (lock, q, report, go) = (
        procpool::Lock::new(),
        procpool::Queue::new(),
        procpool::Queue::new(),
        procpool::Event::new(),
    );
    let mut p = Process::new(
        puts_oversize_while_holding,
        (lock.clone(), q.clone(), report.clone(), go.clone()),
    );
    p.start().await.unwrap();
    let said = within_a_minute(report.get()).await.unwrap();
    assert!(said.starts_with("Err(Encode"), "{said}");
    assert!(said.contains("a queue item holds at most"), "{said}");
    // The child's connection lives on: its next item arrives, and it still holds the
    // lock (an ended session would have released it).
    assert_eq!(
        within_a_minute(q.get()).await.unwrap(),
        ByteBuf::from(vec![7])
    );
    assert!(
        lock.try_lock().unwrap().is_none(),
        "the lock was released early"
    );
    go.set().unwrap();
    within_a_minute(p.join()).await.unwrap();
    assert!(within_a_minute(lock.lock()).await.is_ok());
}
