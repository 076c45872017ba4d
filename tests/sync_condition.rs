//! A `Condition` waiter killed while it waits gives its place up: the next notify wakes
//! the live waiter. A test binary of its own: it counts the requests parked in this
//! process's hub, which other tests running beside it would change.

mod support;

use procpool::{Condition, Error, Lock, Queue};
use support::soon;

/// Waits on `c` (holding its lock first), then says so in `woken`.
fn wait_then_say(c: Condition, woken: Queue<u32>) {
    let mut g = c.lock().blocking_lock().unwrap();
    c.blocking_wait(&mut g).unwrap();
    woken.blocking_put(std::process::id()).unwrap();
}

#[tokio::test]
async fn a_condition_waiter_that_is_killed_gives_its_place_up_and_a_notify_wakes_the_next() {
    let c = Condition::new(Lock::new());
    let woken = Queue::new();
    let mut first = procpool::spawn(wait_then_say, (c.clone(), woken.clone()))
        .await
        .unwrap();
    // Parked here, in that order: the first waiter's request, then the second's.
    assert!(support::eventually(support::SOON, || procpool::__tables()
        .parked
        == 1));
    let mut second = procpool::spawn(wait_then_say, (c.clone(), woken.clone()))
        .await
        .unwrap();
    assert!(support::eventually(support::SOON, || procpool::__tables()
        .parked
        == 2));
    first.kill().unwrap();
    assert!(matches!(first.join().await, Err(Error::WorkerDied { .. })));
    // The owner has seen it go: its ticket left with it.
    assert!(support::eventually(support::SOON, || procpool::__tables()
        .parked
        == 1));
    c.notify_one().unwrap();
    let pid = soon(woken.get()).await.unwrap();
    assert_eq!(
        Some(pid),
        second.pid(),
        "the one notify woke the live waiter"
    );
    soon(second.join()).await.unwrap();
}
