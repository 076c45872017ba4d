//! `Lock` and `Event` across real processes: exclusion, a holder killed while holding,
//! cancellation, and every Event method.

mod support;

use std::time::{Duration, Instant};

use procpool::{Error, Event, Lock, Queue};
use support::{SOON, TempDir, hangs, soon};

#[tokio::test]
async fn lock_methods_in_the_owner_process() {
    let lock = Lock::new();
    let g = lock.lock().await.unwrap();
    assert!(!g.abandoned());
    assert!(lock.try_lock().unwrap().is_none(), "try_lock while held");
    // A waiter that gives up leaves the line (cancel safety).
    let gave_up = tokio::time::timeout(Duration::from_millis(50), lock.lock()).await;
    assert!(gave_up.is_err());
    drop(g);
    let g = lock
        .try_lock()
        .unwrap()
        .expect("free after the guard dropped");
    drop(g);
    let l2 = lock.clone();
    let g = tokio::task::spawn_blocking(move || l2.blocking_lock().map(|g| g.abandoned()))
        .await
        .unwrap()
        .unwrap();
    assert!(!g);
    let g = soon(lock.lock()).await.unwrap();
    drop(g);
}

/// Appends `start n` and `end n` to `path` under the lock, `rounds` times.
fn append_under_lock(lock: Lock, path: String, n: u32, rounds: u32) {
    use std::io::Write;
    for _ in 0..rounds {
        let _g = lock.blocking_lock().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        writeln!(f, "start {n}").unwrap();
        f.flush().unwrap();
        std::thread::yield_now();
        writeln!(f, "end {n}").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_excludes_other_processes() {
    let dir = TempDir::new("lock");
    let path = dir.path("log");
    let lock = Lock::new();
    let mut children = Vec::new();
    for n in 0..4 {
        children.push(
            procpool::spawn(append_under_lock, (lock.clone(), path.clone(), n, 50))
                .await
                .unwrap(),
        );
    }
    for c in &mut children {
        c.join().await.unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4 * 50 * 2);
    for pair in lines.chunks(2) {
        let n = pair[0].strip_prefix("start ").expect("a start line");
        assert_eq!(pair[1], format!("end {n}"), "interleaved: {pair:?}");
    }
}

fn hold_and_hang(lock: Lock, held: Event) {
    let _g = lock.blocking_lock().unwrap();
    held.set().unwrap();
    hangs();
}

async fn take_when_free(lock: Lock, waiting: Event) -> bool {
    let pending = lock.lock();
    waiting.set().unwrap();
    pending.await.unwrap().abandoned()
}

#[tokio::test]
async fn a_lock_whose_holder_is_killed_goes_to_the_next_waiter() {
    let lock = Lock::new();
    let held = Event::new();
    let mut holder = procpool::spawn(hold_and_hang, (lock.clone(), held.clone()))
        .await
        .unwrap();
    soon(held.wait()).await.unwrap();
    assert!(lock.try_lock().unwrap().is_none(), "the child holds it");

    let waiting = Event::new();
    let mut next = procpool::spawn(take_when_free, (lock.clone(), waiting.clone()))
        .await
        .unwrap();
    soon(waiting.wait()).await.unwrap();
    holder.kill().unwrap();
    assert!(matches!(holder.join().await, Err(Error::WorkerDied { .. })));
    let abandoned = soon(next.join()).await.unwrap();
    assert!(
        abandoned,
        "the next holder is told the last one died holding it"
    );
    // And it is free again, no longer marked.
    let g = soon(lock.lock()).await.unwrap();
    assert!(!g.abandoned());
}

/// try_lock from a child while the parent holds it, then a lock() that times out, then
/// one that succeeds once the parent lets go (signalled through `go`).
async fn remote_lock_calls(lock: Lock, report: Queue<String>, go: Event) -> bool {
    report
        .put(format!(
            "try_lock held {}",
            lock.try_lock().unwrap().is_none()
        ))
        .await
        .unwrap();
    let t = Instant::now();
    let gave_up = tokio::time::timeout(Duration::from_millis(200), lock.lock()).await;
    report
        .put(format!(
            "gave up {} after {}ms",
            gave_up.is_err(),
            t.elapsed().as_millis()
        ))
        .await
        .unwrap();
    go.wait().await.unwrap();
    let g = lock.lock().await.unwrap();
    let again = lock.try_lock().unwrap().is_none();
    drop(g);
    again
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_calls_from_another_process() {
    let lock = Lock::new();
    let report: Queue<String> = Queue::new();
    let go = Event::new();
    let g = lock.lock().await.unwrap();
    let mut child = procpool::spawn(
        remote_lock_calls,
        (lock.clone(), report.clone(), go.clone()),
    )
    .await
    .unwrap();
    assert_eq!(
        report.get_timeout(SOON).await.unwrap(),
        "try_lock held true"
    );
    let gave_up = report.get_timeout(SOON).await.unwrap();
    // The child's wait gave up on its own timeout: not before 200 ms, and not stuck in
    // a round trip far past it (generous for a loaded machine).
    let waited: u128 = gave_up
        .strip_prefix("gave up true after ")
        .and_then(|r| r.strip_suffix("ms"))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected report: {gave_up}"));
    assert!((200..10_000).contains(&waited), "{gave_up}");
    drop(g);
    go.set().unwrap();
    assert!(soon(child.join()).await.unwrap());
    // The child released it, and its cancelled waiter left no grant behind.
    let g = soon(lock.lock()).await.unwrap();
    drop(g);
}

#[tokio::test]
async fn event_methods_in_the_owner_process() {
    let ev = Event::new();
    assert!(!ev.is_set());
    let t = Instant::now();
    assert!(!ev.wait_timeout(Duration::from_millis(200)).await.unwrap());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    ev.set().unwrap();
    assert!(ev.is_set());
    ev.wait().await.unwrap();
    assert!(ev.wait_timeout(Duration::ZERO).await.unwrap());
    ev.blocking_wait().unwrap();
    ev.clear().unwrap();
    assert!(!ev.is_set());
}

/// Every Event call from a child; `go` is set by the parent, `back` by the child.
async fn remote_event_calls(go: Event, back: Event) -> Vec<String> {
    let mut seen = Vec::new();
    let t = Instant::now();
    let early = go.wait_timeout(Duration::from_millis(200)).await.unwrap();
    let ms = t.elapsed().as_millis();
    seen.push(format!(
        "wait_timeout {early} in time {}",
        (200..3200).contains(&ms)
    ));
    back.set().unwrap();
    go.wait().await.unwrap();
    seen.push(format!("is_set {}", go.is_set()));
    go.clear().unwrap();
    seen.push(format!("cleared {}", !go.is_set()));
    seen
}

fn blocking_waiter(ev: Event) -> bool {
    ev.blocking_wait().unwrap();
    ev.is_set()
}

#[tokio::test]
async fn event_calls_from_another_process() {
    let go = Event::new();
    let back = Event::new();
    let mut child = procpool::spawn(remote_event_calls, (go.clone(), back.clone()))
        .await
        .unwrap();
    soon(back.wait()).await.unwrap();
    go.set().unwrap();
    let seen = soon(child.join()).await.unwrap();
    assert_eq!(
        seen,
        [
            "wait_timeout false in time true",
            "is_set true",
            "cleared true"
        ]
    );
    assert!(!go.is_set(), "the child's clear is visible here");

    let mut child = procpool::spawn(blocking_waiter, (go.clone(),))
        .await
        .unwrap();
    go.set().unwrap();
    assert!(soon(child.join()).await.unwrap());
}

/// Takes the lock, says so through `held`, and lets go once `go` is set.
fn hold_until_go(lock: Lock, held: Event, go: Event) {
    let g = lock.blocking_lock().unwrap();
    held.set().unwrap();
    go.blocking_wait().unwrap();
    drop(g);
}

/// Asks for the held lock `n` times, giving up on each request right after sending it,
/// then sets `done`. The set travels on the same connection after every cancel, so once
/// the owner sees it, it has applied them all.
fn give_up_remotely(lock: Lock, n: u32, done: Event) {
    use futures::FutureExt;
    for _ in 0..n {
        assert!(lock.lock().now_or_never().is_none(), "the lock is held");
    }
    done.set().unwrap();
}

/// The issue: a million `lock()` futures polled once and dropped while a child held
/// the lock left a million dead entries, and the child's release recursed once per
/// entry on the service thread until it overflowed its stack and aborted the parent.
/// Now every dropped future (here and in another process) leaves the line at once.
#[tokio::test]
async fn a_million_dropped_lock_futures_leave_the_line() {
    use futures::FutureExt;
    const HERE: u32 = 1_000_000;
    const THERE: u32 = 100_000;
    let lock = Lock::new();
    let held = Event::new();
    let go = Event::new();
    let mut holder = procpool::spawn(hold_until_go, (lock.clone(), held.clone(), go.clone()))
        .await
        .unwrap();
    soon(held.wait()).await.unwrap();

    let t = Instant::now();
    for _ in 0..HERE {
        assert!(lock.lock().now_or_never().is_none(), "the child holds it");
    }
    eprintln!(
        "{HERE} local lock() futures polled and dropped in {:?}",
        t.elapsed()
    );
    assert_eq!(
        lock.queued_waiters(),
        Some(0),
        "dropped local waiters left the line"
    );

    let done = Event::new();
    let mut quitter = procpool::spawn(give_up_remotely, (lock.clone(), THERE, done.clone()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), done.wait())
        .await
        .expect("the remote requests and cancels were applied within 60 s")
        .unwrap();
    assert_eq!(
        lock.queued_waiters(),
        Some(0),
        "cancelled remote waiters left the line"
    );
    soon(quitter.join()).await.unwrap();

    // A live waiter behind all that gets the lock as soon as the child lets go.
    let next = lock.lock();
    tokio::pin!(next);
    assert!(futures::poll!(next.as_mut()).is_pending());
    assert_eq!(lock.queued_waiters(), Some(1));
    go.set().unwrap();
    let g = soon(next).await.unwrap();
    assert!(!g.abandoned());
    assert_eq!(lock.queued_waiters(), Some(0));
    drop(g);
    soon(holder.join()).await.unwrap();
    assert!(lock.try_lock().unwrap().is_some(), "free again");
}
