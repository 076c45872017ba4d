//! Issue 16 item 6, the missing calls, across real processes: `parent_process`,
//! `pipe_oneway`, `starmap_async`, `run_timeout`, and the `*_timeout` calls of `Queue`,
//! `Event` and `Lock` from synchronous code with no tokio runtime.

mod support;

use std::time::{Duration, Instant};

use procpool::{Error, Event, Lock, Process, Queue};
use support::soon;

/// What a child saw of one timed call: its name, how long it took (ms), and how it ended.
type Seen = Vec<(String, u64, String)>;

fn kind<T: std::fmt::Debug>(r: &procpool::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(Error::Timeout { .. }) => "timeout".to_owned(),
        Err(e) => format!("error {e}"),
    }
}

fn timed<T: std::fmt::Debug>(seen: &mut Seen, name: &str, f: impl FnOnce() -> procpool::Result<T>) {
    let start = Instant::now();
    let r = f();
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    seen.push((name.to_owned(), ms, kind(&r)));
}

/// A plain (sync) target: no tokio runtime anywhere in this process. The async
/// `*_timeout` calls are driven by `futures`' executor, which has no timer.
fn async_timeouts_under_a_plain_executor(empty: Queue<u32>, full: Queue<u32>, ev: Event) -> Seen {
    let d = Duration::from_millis(100);
    let mut seen = Seen::new();
    timed(&mut seen, "get_timeout", || {
        futures::executor::block_on(empty.get_timeout(d))
    });
    timed(&mut seen, "put_timeout", || {
        futures::executor::block_on(full.put_timeout(7, d))
    });
    timed(&mut seen, "wait_timeout", || {
        futures::executor::block_on(ev.wait_timeout(d))
    });
    seen
}

fn assert_timed_out(seen: &Seen, d: Duration) {
    for (name, ms, how) in seen {
        assert_eq!(how, "timeout", "{name} ended so: {seen:?}");
        let took = Duration::from_millis(*ms);
        assert!(
            took >= d,
            "{name} returned after {took:?}, before its {d:?}"
        );
        assert!(
            took < d + Duration::from_secs(3),
            "{name} took {took:?} for {d:?}"
        );
    }
}

#[tokio::test]
async fn async_timeouts_work_under_a_plain_executor_in_a_child() {
    let (empty, full, ev) = (Queue::new(), Queue::bounded(1), Event::new());
    full.put(1).await.unwrap();
    let mut p = Process::new(
        async_timeouts_under_a_plain_executor,
        (empty, full.clone(), ev),
    );
    p.start().await.unwrap();
    let seen = soon(p.join()).await.expect("the child reports what it saw");
    // Event::wait_timeout answers Ok(false), not Timeout.
    let (ev_seen, rest): (Seen, Seen) = seen.into_iter().partition(|(n, ..)| n == "wait_timeout");
    assert_timed_out(&rest, Duration::from_millis(100));
    assert_eq!(ev_seen.len(), 1);
    assert_eq!(ev_seen[0].2, "ok false", "{ev_seen:?}");
    assert_eq!(full.len(), 1, "the timed-out put put nothing");
}

/// A plain target calling every `blocking_*_timeout` (and `lock_timeout`) on objects of
/// the parent (`empty`, `full`, `ev`, `held` time out; `one`, `set`, `free` answer at
/// once) and on a queue of its own.
fn blocking_timeouts(
    (empty, full, ev, held): (Queue<u32>, Queue<u32>, Event, Lock),
    (one, set, free): (Queue<u32>, Event, Lock),
) -> Seen {
    let d = Duration::from_millis(100);
    let long = Duration::from_secs(20);
    let mut seen = Seen::new();
    timed(&mut seen, "remote get", || empty.blocking_get_timeout(d));
    timed(&mut seen, "remote put", || full.blocking_put_timeout(7, d));
    timed(&mut seen, "remote wait", || ev.blocking_wait_timeout(d));
    timed(&mut seen, "remote lock", || {
        held.blocking_lock_timeout(d).map(|g| g.is_some())
    });
    timed(&mut seen, "remote lock async", || {
        futures::executor::block_on(held.lock_timeout(d)).map(|g| g.is_some())
    });
    let own: Queue<u32> = Queue::new();
    timed(&mut seen, "own get", || own.blocking_get_timeout(d));
    let own_full: Queue<u32> = Queue::bounded(1);
    own_full.blocking_put(1).expect("a queue of this process");
    timed(&mut seen, "own put", || own_full.blocking_put_timeout(2, d));
    let own_lock = Lock::new();
    let _guard = own_lock.blocking_lock().expect("a lock of this process");
    timed(&mut seen, "own lock", || {
        own_lock.blocking_lock_timeout(d).map(|g| g.is_some())
    });
    // What can answer now does, however long the limit, or however short.
    timed(&mut seen, "now remote get", || {
        one.blocking_get_timeout(long)
    });
    timed(&mut seen, "now remote wait", || {
        set.blocking_wait_timeout(long)
    });
    timed(&mut seen, "now remote lock", || {
        free.blocking_lock_timeout(long).map(|g| g.is_some())
    });
    own.blocking_put(5).expect("a queue of this process");
    timed(&mut seen, "now own get", || own.blocking_get_timeout(long));
    timed(&mut seen, "now zero get", || {
        empty.blocking_get_timeout(Duration::ZERO)
    });
    timed(&mut seen, "now zero lock", || {
        held.blocking_lock_timeout(Duration::ZERO)
            .map(|g| g.is_some())
    });
    seen
}

#[tokio::test]
async fn blocking_timeouts_work_in_a_child_with_no_runtime() {
    let (empty, full, ev, held) = (Queue::new(), Queue::bounded(1), Event::new(), Lock::new());
    full.put(1).await.unwrap();
    let guard = held.lock().await.unwrap();
    let (one, set, free) = (Queue::new(), Event::new(), Lock::new());
    one.put(3).await.unwrap();
    set.set().unwrap();
    let mut p = Process::new(
        blocking_timeouts,
        (
            (empty.clone(), full.clone(), ev.clone(), held.clone()),
            (one.clone(), set, free.clone()),
        ),
    );
    p.start().await.unwrap();
    let seen = soon(p.join()).await.expect("the child reports what it saw");
    drop(guard);
    let d = Duration::from_millis(100);
    let expected = [
        ("remote get", "timeout"),
        ("remote put", "timeout"),
        ("remote wait", "ok false"),
        ("remote lock", "ok false"),
        ("remote lock async", "ok false"),
        ("own get", "timeout"),
        ("own put", "timeout"),
        ("own lock", "ok false"),
        ("now remote get", "ok 3"),
        ("now remote wait", "ok true"),
        ("now remote lock", "ok true"),
        ("now own get", "ok 5"),
        ("now zero get", "timeout"),
        ("now zero lock", "ok false"),
    ];
    assert_eq!(seen.len(), expected.len(), "{seen:?}");
    for ((name, ms, how), (want_name, want)) in seen.iter().zip(expected) {
        assert_eq!((name.as_str(), how.as_str()), (want_name, want), "{seen:?}");
        let took = Duration::from_millis(*ms);
        if name.starts_with("now") {
            assert!(
                took < Duration::from_secs(2),
                "{name} took {took:?}: {seen:?}"
            );
        } else {
            assert!(
                took >= d,
                "{name} returned after {took:?}, before its {d:?}"
            );
            assert!(
                took < d + Duration::from_secs(3),
                "{name} took {took:?} for {d:?}"
            );
        }
    }
    // What timed out left nothing behind: the put did not land, the lock's line is
    // empty, and the lock taken at once went back when the child ended.
    assert_eq!(full.len(), 1);
    assert_eq!(held.queued_waiters(), Some(0));
    assert!(held.try_lock().unwrap().is_some());
    assert!(free.try_lock().unwrap().is_some());
    assert_eq!(one.len(), 0);
}

#[tokio::test]
async fn lock_timeout_in_the_owner_and_across_processes_from_async_code() {
    let lock = Lock::new();
    let guard = lock.lock_timeout(Duration::from_secs(20)).await.unwrap();
    assert!(guard.is_some(), "a free lock is taken at once");
    let start = Instant::now();
    let again = lock.lock_timeout(Duration::from_millis(100)).await.unwrap();
    assert!(again.is_none());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        lock.queued_waiters(),
        Some(0),
        "the waiter whose time ran out left"
    );
    drop(guard);
    assert!(lock.lock_timeout(Duration::ZERO).await.unwrap().is_some());
}

// ------------------------------------------------------------------ parent_process

/// This process's parent as `parent_process()` says: (name, pid), or `None`.
fn parent_seen() -> Option<(String, u32)> {
    procpool::parent_process().map(|p| (p.name().to_owned(), p.pid()))
}

/// (me, my parent, my child's parent): a child that starts a grandchild.
type Family = ((String, u32), Option<(String, u32)>, Option<(String, u32)>);

async fn starts_a_grandchild() -> Family {
    let me = procpool::current_process();
    let mut p = Process::new(parent_seen, ());
    p.start().await.expect("the grandchild starts");
    let grandchild = p.join().await.expect("the grandchild answers");
    ((me.name().to_owned(), me.pid()), parent_seen(), grandchild)
}

#[tokio::test]
async fn parent_process_in_main_child_grandchild_and_pool_worker() {
    assert!(
        procpool::parent_process().is_none(),
        "the main process has none"
    );
    let main = (
        procpool::current_process().name().to_owned(),
        std::process::id(),
    );
    assert_eq!(main.0, "MainProcess");

    let mut p = Process::new(parent_seen, ()).with_name("named-child");
    p.start().await.unwrap();
    assert_eq!(soon(p.join()).await.unwrap(), Some(main.clone()));

    let mut p = Process::new(starts_a_grandchild, ());
    p.start().await.unwrap();
    let child_pid = p.pid().expect("started");
    let (me, parent, grandchild) = soon(p.join()).await.unwrap();
    assert_eq!(me.1, child_pid);
    assert_eq!(parent, Some(main.clone()));
    // The grandchild's parent is the child, under the child's name.
    assert_eq!(grandchild, Some(me.clone()));
    assert!(me.0.starts_with("Process-"), "{me:?}");

    let pool = procpool::AsyncPool::new(1).await.unwrap();
    assert_eq!(
        pool.apply(parent_seen, ()).await.unwrap(),
        Some(main.clone())
    );
    // A pool worker's own child names the worker.
    let (worker, parent, grandchild) = pool.apply(starts_a_grandchild, ()).await.unwrap();
    assert!(worker.0.starts_with("PoolWorker-"), "{worker:?}");
    assert_eq!(parent, Some(main));
    assert_eq!(grandchild, Some(worker));
    pool.close().await;
}

// ------------------------------------------------------------------ pipe_oneway

/// A plain target that sends `0..n` and returns.
fn sends(to: procpool::Sender<u32>, n: u32) {
    for i in 0..n {
        to.blocking_send(i).expect("the receiver is there");
    }
}

/// An async target that receives until every sender is gone, and says what it got.
async fn receives_all(from: procpool::Receiver<u32>) -> Vec<u32> {
    let mut got = Vec::new();
    loop {
        match from.recv().await {
            Ok(x) => got.push(x),
            Err(Error::Closed) => return got,
            Err(e) => panic!("recv failed: {e}"),
        }
    }
}

/// A plain target: polls, receives one with the blocking calls, and returns it.
fn receives_one_blocking(from: procpool::Receiver<String>) -> (bool, String) {
    let ready = from
        .blocking_poll(Duration::from_secs(20))
        .expect("the socket works");
    (ready, from.blocking_recv().expect("a message comes"))
}

#[tokio::test]
async fn pipe_oneway_child_sends_parent_receives() {
    let (rx, tx) = procpool::pipe_oneway::<u32>();
    // Two senders: a clone in each child; the parent lets go of its own.
    let mut a = Process::new(sends, (tx.clone(), 3));
    let mut b = Process::new(sends, (tx, 2));
    a.start().await.unwrap();
    b.start().await.unwrap();
    let got = soon(receives_all(rx)).await;
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 0, 1, 1, 2], "{got:?}");
    soon(a.join()).await.unwrap();
    soon(b.join()).await.unwrap();
}

#[tokio::test]
async fn pipe_oneway_parent_sends_child_receives() {
    let (rx, tx) = procpool::pipe_oneway::<u32>();
    let mut p = Process::new(receives_all, (rx,));
    p.start().await.unwrap();
    for i in 10..15 {
        tx.send(i).await.unwrap();
    }
    drop(tx);
    assert_eq!(soon(p.join()).await.unwrap(), vec![10, 11, 12, 13, 14]);

    // A blocking receiver in a plain child, and an async poll on ours.
    let (rx, tx) = procpool::pipe_oneway::<String>();
    let mut p = Process::new(receives_one_blocking, (rx,));
    p.start().await.unwrap();
    tx.blocking_send("hi".to_owned()).unwrap();
    assert_eq!(soon(p.join()).await.unwrap(), (true, "hi".to_owned()));
    // The receiver went with its process: sends fail.
    let err = soon(async {
        loop {
            if let Err(e) = tx.send("anyone?".to_owned()).await {
                return e;
            }
        }
    })
    .await;
    assert!(matches!(err, Error::Closed), "{err:?}");
}

#[tokio::test]
async fn pipe_oneway_between_two_children_and_through_pool_tasks() {
    // Child to child: the messages do not pass through the parent.
    let (rx, tx) = procpool::pipe_oneway::<u32>();
    let mut reader = Process::new(receives_all, (rx,));
    let mut writer = Process::new(sends, (tx, 4));
    reader.start().await.unwrap();
    writer.start().await.unwrap();
    soon(writer.join()).await.unwrap();
    assert_eq!(soon(reader.join()).await.unwrap(), vec![0, 1, 2, 3]);

    // Pool tasks: one sends, one receives, on two workers.
    let pool = procpool::AsyncPool::new(2).await.unwrap();
    let (rx, tx) = procpool::pipe_oneway::<u32>();
    let receiving = pool.apply_async(receives_all, (rx,));
    pool.apply(sends, (tx, 3)).await.unwrap();
    assert_eq!(soon(receiving).await.unwrap(), vec![0, 1, 2]);

    // Ours, polled: nothing yet, then a message.
    let (rx, tx) = procpool::pipe_oneway::<u32>();
    assert!(!rx.poll(Duration::ZERO).await.unwrap());
    pool.apply(sends, (tx, 1)).await.unwrap();
    assert!(rx.poll(Duration::from_secs(20)).await.unwrap());
    assert_eq!(rx.recv().await.unwrap(), 0);
    assert!(matches!(soon(rx.recv()).await, Err(Error::Closed)));
    pool.close().await;
}

// ------------------------------------------------------------------ run_timeout, starmap_async

/// Blocks its worker until `go` is set; returns the worker's pid.
fn waits_for(go: Event) -> u32 {
    go.blocking_wait().expect("the parent keeps the event");
    std::process::id()
}

/// Returns at once: `x` and the worker's pid.
fn quick(x: u32) -> (u32, u32) {
    (x, std::process::id())
}

fn add(a: u32, b: u32) -> u32 {
    a + b
}

/// Hangs for item 0, returns the others.
fn hangs_on_zero(x: u32) -> u32 {
    if x == 0 {
        support::hangs();
    }
    x
}

fn pid() -> u32 {
    std::process::id()
}

const D: Duration = Duration::from_millis(300);

/// Occupies the one worker of `pool` until `go` is set, and returns a probe that
/// resolves with `Timeout` [`D`] after its first poll: by then, every task submitted
/// before that poll has waited more than `D`.
fn busy_worker(
    pool: &procpool::AsyncPool,
    go: &Event,
) -> (procpool::TaskHandle<u32>, procpool::TaskTimeout<(u32, u32)>) {
    let busy = pool.apply_async(waits_for, (go.clone(),));
    let probe = pool.apply_async(quick, (99,)).timeout(D);
    (busy, probe)
}

#[tokio::test]
async fn run_timeout_does_not_count_the_wait_but_timeout_does() {
    let pool = procpool::AsyncPool::new(1).await.unwrap();
    let go = Event::new();
    let (busy, probe) = busy_worker(&pool, &go);
    // Queued behind the busy worker, in all three forms of a call (a lazy `apply`
    // submits when first polled).
    let mut applied = Box::pin(pool.apply(quick, (1,)).run_timeout(D));
    assert!(futures::poll!(applied.as_mut()).is_pending());
    let handle = pool.apply_async(quick, (2,)).run_timeout(D);
    let mapped = pool.map_async(quick, vec![3, 4, 5]).run_timeout(D);
    let timed = pool.apply(quick, (6,)).timeout(D);
    // `timeout` counts the wait: it expires while the worker is still busy.
    let (probe, timed) = soon(async { tokio::join!(probe, timed) }).await;
    assert!(
        matches!(probe, Err(Error::Timeout { after: D, .. })),
        "{probe:?}"
    );
    assert!(
        matches!(timed, Err(Error::Timeout { after: D, .. })),
        "{timed:?}"
    );
    // The run_timeout calls have waited longer than D by now, and still succeed.
    go.set().unwrap();
    let worker = soon(busy).await.unwrap();
    assert_eq!(soon(applied).await.unwrap(), (1, worker));
    assert_eq!(soon(handle).await.unwrap(), (2, worker));
    let mapped = soon(mapped).await.unwrap();
    assert_eq!(mapped, vec![(3, worker), (4, worker), (5, worker)]);
    assert_eq!(pool.stats().restarts, 0, "no worker was stopped");
    pool.close().await;
}

#[tokio::test]
async fn run_timeout_stops_a_task_that_runs_too_long_and_replaces_its_worker() {
    let pool = procpool::AsyncPool::builder()
        .processes(1)
        .task_timeout(Duration::from_secs(600))
        .build()
        .await
        .unwrap();
    let before = pool.apply(pid, ()).await.unwrap();
    let start = Instant::now();
    let r = soon(pool.apply(support::hangs, ()).run_timeout(D)).await;
    let took = start.elapsed();
    assert!(matches!(r, Err(Error::Timeout { after: D, .. })), "{r:?}");
    assert!(took >= D && took < D + Duration::from_secs(10), "{took:?}");
    let after = pool.apply(pid, ()).await.unwrap();
    assert_ne!(before, after, "the worker was replaced");
    assert!(
        support::eventually_async(Duration::from_secs(10), || support::is_dead(before)).await,
        "the stopped worker {before} is gone"
    );

    // The same through a handle, a map's chunk and a starmap_async.
    let r = soon(pool.apply_async(support::hangs, ()).run_timeout(D)).await;
    assert!(matches!(r, Err(Error::Timeout { after: D, .. })), "{r:?}");
    let r = soon(
        pool.map(hangs_on_zero, vec![0, 1])
            .chunksize(1)
            .run_timeout(D),
    )
    .await;
    assert!(matches!(r, Err(Error::Timeout { after: D, .. })), "{r:?}");
    let r = soon(pool.map_async(hangs_on_zero, vec![1, 0]).run_timeout(D)).await;
    assert!(matches!(r, Err(Error::Timeout { after: D, .. })), "{r:?}");
    let last = pool.apply(pid, ()).await.unwrap();
    assert_ne!(last, after);
    assert_eq!(pool.stats().restarts, 4, "{:?}", pool.stats());
    pool.close().await;
}

#[tokio::test]
async fn starmap_async_submits_now_and_resolves_in_order() {
    let pool = procpool::AsyncPool::new(2).await.unwrap();
    let items: Vec<(u32, u32)> = (0..50).map(|i| (i, 100)).collect();
    let handle = pool.starmap_async(add, items);
    let want: Vec<u32> = (100..150).collect();
    assert_eq!(soon(handle).await.unwrap(), want);
    assert_eq!(
        soon(pool.starmap_async(add, Vec::new())).await.unwrap(),
        Vec::<u32>::new()
    );

    // Submitted before it is awaited: the tasks run while nobody polls the handle.
    let ran: Queue<u32> = Queue::new();
    let handle = pool.starmap_async(reports, vec![(ran.clone(), 1), (ran.clone(), 2)]);
    let mut seen = vec![
        soon(ran.get()).await.unwrap(),
        soon(ran.get()).await.unwrap(),
    ];
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2]);
    assert_eq!(soon(handle).await.unwrap(), vec![1, 2]);
    pool.close().await;
}

/// Puts `x` on `ran`, returns it.
fn reports(ran: Queue<u32>, x: u32) -> u32 {
    ran.blocking_put(x).expect("the parent keeps the queue");
    x
}
