//! An owner that stops answering (here: SIGSTOPped) pins no thread for ever: the calls
//! that answer at once fail with `Timeout` after the owner bound, and a child's end of
//! task report goes out after it, unconfirmed.

mod support;

use std::time::{Duration, Instant};

use procpool::{Connection, Dict, Error, Event, Lock, Process, Queue, pipe};
use rustix::process::{Pid, Signal, kill_process};
use support::{SOON, hangs, soon};

/// The bound, shortened for the test (the default is 10 s).
const BOUND: Duration = Duration::from_millis(300);

type Objects = (Event, Lock, Queue<u32>, Dict<u32, u32>, Dict<u32, Vec<u8>>);

/// A call on a stopped owner's object, described by what it returned.
type Call = Box<dyn FnOnce() -> String + Send>;

/// Creates the objects, hands them to the parent, and waits.
fn own_objects(to_parent: Queue<Objects>) -> u8 {
    let q: Queue<u32> = Queue::new();
    q.blocking_put(7).unwrap();
    let d = Dict::new();
    d.blocking_insert(1, 2).unwrap();
    to_parent
        .blocking_put((Event::new(), Lock::new(), q, d, Dict::new()))
        .unwrap();
    hangs()
}

/// Puts into a queue whose owner is stopped, then returns.
fn put_then_return(q: Queue<u32>) -> String {
    procpool::__set_owner_timeout(BOUND);
    q.blocking_put(1).unwrap();
    "returned".to_owned()
}

fn signal(p: &Process<u8>, sig: Signal) {
    let raw = p.pid().unwrap();
    let pid = Pid::from_raw(raw as i32).unwrap();
    kill_process(pid, sig).unwrap();
    if sig == Signal::STOP {
        // A stop takes effect when the process's threads next run in the kernel: wait
        // until every one of them is stopped, not only the main thread.
        assert!(
            support::eventually(SOON, || all_threads_stopped(raw)),
            "process {raw} did not stop"
        );
    }
}

fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        matches!(
            stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
            Some('T')
        )
    })
}

/// Runs `call` on a thread of its own and returns what it gave and how long it took;
/// fails the test if it does not return within `SOON` (it would hang without a bound;
/// the thread is not joined, so a hung call cannot hang the test too).
async fn timed<R: Send + 'static>(call: impl FnOnce() -> R + Send + 'static) -> (R, Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let start = Instant::now();
    std::thread::spawn(move || tx.send(call()).ok());
    let r = tokio::time::timeout(SOON, rx)
        .await
        .expect("the call returned")
        .unwrap();
    (r, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_owner_times_calls_out_instead_of_hanging_them() {
    procpool::__set_owner_timeout(BOUND);
    let to_parent: Queue<Objects> = Queue::new();
    let mut owner = Process::new(own_objects, (to_parent.clone(),));
    owner.start().await.unwrap();
    let (ev, lock, q, d, big) = to_parent.get_timeout(SOON).await.unwrap();
    // Reachable while it runs.
    assert!(!ev.is_set());
    assert_eq!(q.len(), 1);
    assert_eq!(d.blocking_get(&1).unwrap(), Some(2));

    signal(&owner, Signal::STOP);
    let calls: Vec<(&str, Call)> = vec![
        // First, while nothing sent on the shared connection awaits confirmation (the
        // dict's call above confirmed it): more than the socket holds, so the write
        // itself waits, within the same bound.
        ("dict insert of 4 MB", {
            let big = big.clone();
            Box::new(move || format!("{:?}", big.blocking_insert(1, vec![7; 4 << 20])))
        }),
        ("set", {
            let ev = ev.clone();
            Box::new(move || format!("{:?}", ev.set()))
        }),
        ("clear", {
            let ev = ev.clone();
            Box::new(move || format!("{:?}", ev.clear()))
        }),
        ("try_lock", {
            let lock = lock.clone();
            Box::new(move || format!("{:?}", lock.try_lock().map(|g| g.is_some())))
        }),
        ("task_done", {
            let q = q.clone();
            Box::new(move || format!("{:?}", q.task_done()))
        }),
        ("try_get", {
            let q = q.clone();
            Box::new(move || format!("{:?}", q.try_get()))
        }),
        ("close", {
            let q = q.clone();
            Box::new(move || format!("{:?}", q.close()))
        }),
        // A dict's blocking calls go over the calling thread's own connection.
        ("dict get", {
            let d = d.clone();
            Box::new(move || format!("{:?}", d.blocking_get(&1)))
        }),
        ("dict insert", {
            let d = d.clone();
            Box::new(move || format!("{:?}", d.blocking_insert(3, 4)))
        }),
    ];
    let timeout = format!("Err(Timeout {{ after: {BOUND:?} }})");
    for (what, call) in calls {
        let (got, took) = timed(call).await;
        assert!(
            got.starts_with("Err(Timeout"),
            "{what}: {got}, expected {timeout}"
        );
        assert!(took >= BOUND, "{what} returned after {took:?}");
    }
    let (set, took) = timed({
        let ev = ev.clone();
        move || ev.is_set()
    })
    .await;
    assert!(!set && took >= BOUND, "is_set: {set} after {took:?}");

    // A child that used an object of the stopped owner still reports its result.
    let mut child = Process::new(put_then_return, (q.clone(),));
    child.start().await.unwrap();
    assert_eq!(
        tokio::time::timeout(SOON, child.join())
            .await
            .expect("the child reported")
            .unwrap(),
        "returned"
    );

    // A thread whose dict call timed out is answered again once the owner resumes (its
    // connection, which the late answer may still reach, is replaced).
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let (resumed_tx, resumed_rx) = std::sync::mpsc::channel::<()>();
    let again = std::thread::spawn({
        let d = d.clone();
        move || {
            first_tx.send(format!("{:?}", d.blocking_get(&1))).unwrap();
            resumed_rx.recv().unwrap();
            format!("{:?}", d.blocking_get(&1))
        }
    });
    let first = soon(first_rx).await.unwrap();
    assert!(first.starts_with("Err(Timeout"), "while stopped: {first}");
    signal(&owner, Signal::CONT);
    resumed_tx.send(()).unwrap();
    let again = soon(tokio::task::spawn_blocking(move || again.join()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, "Ok(Some(2))", "after it resumed");

    owner.kill().unwrap();
    assert!(owner.join().await.is_err());
    // Gone: `Closed`.
    let (got, took) = timed(move || d.blocking_get(&1)).await;
    assert!(matches!(got, Err(Error::Closed)), "{got:?} after {took:?}");
}

/// Sends one end of a new pipe to the parent, a message into the other, says so, waits.
fn send_an_end(ends: Queue<Connection<String>>, sent: Queue<u8>) -> u8 {
    let (mine, theirs) = pipe::<String>();
    ends.blocking_put(theirs).unwrap();
    mine.blocking_send("hello".to_owned()).unwrap();
    sent.blocking_put(1).unwrap();
    hangs()
}

#[tokio::test(flavor = "current_thread")]
async fn decoding_a_pipe_end_from_a_stopped_process_does_not_block_the_runtime() {
    let ends: Queue<Connection<String>> = Queue::new();
    let sent: Queue<u8> = Queue::new();
    let mut sender = Process::new(send_an_end, (ends.clone(), sent.clone()));
    sender.start().await.unwrap();
    sent.get_timeout(SOON).await.unwrap();
    // The end is parked in the sender's hub, which cannot answer while it is stopped.
    signal(&sender, Signal::STOP);
    let start = Instant::now();
    let end = ends.get_timeout(SOON).await.unwrap();
    // This (only) runtime thread was not blocked by the decode: timers still fire.
    let early = tokio::time::timeout(Duration::from_millis(200), end.recv()).await;
    assert!(
        early.is_err(),
        "nothing arrives from a stopped process, got {early:?}"
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "decoding blocked for {took:?}"
    );
    signal(&sender, Signal::CONT);
    assert_eq!(soon(end.recv()).await.unwrap(), "hello");
    sender.kill().unwrap();
    assert!(sender.join().await.is_err());
}
