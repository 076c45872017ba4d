//! `Semaphore`, `BoundedSemaphore` and `Barrier` across real processes (DESIGN.md §11):
//! concurrency bounded by the permits, permits of a killed holder given back (and the
//! next holder told), over-release refused, a barrier's rounds, leader and indices, and a
//! barrier broken (not hung) by a party that dies, by `abort`, and mended by `reset`;
//! a `Condition`'s producer/consumer over a bounded buffer with no lost wake-up.

mod support;

use std::time::Duration;

use procpool::{Barrier, BoundedSemaphore, Condition, Error, Event, Lock, Queue, Semaphore, Value};
use support::{hangs, soon};

/// Takes a permit, says so, waits for `go`, gives the permit back.
fn slot(s: Semaphore, inside: Queue<u32>, go: Event, n: u32) {
    let permit = s.blocking_acquire().unwrap();
    assert!(!permit.abandoned());
    inside.blocking_put(n).unwrap();
    go.blocking_wait().unwrap();
}

#[tokio::test]
async fn a_semaphore_of_three_lets_three_of_eight_processes_in_at_once() {
    let s = Semaphore::new(3);
    let (inside, go) = (Queue::new(), Event::new());
    let mut procs = Vec::new();
    for n in 0..8 {
        let args = (s.clone(), inside.clone(), go.clone(), n);
        procs.push(procpool::spawn(slot, args).await.unwrap());
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(soon(inside.get()).await.unwrap());
    }
    // Three hold a permit and wait for `go`: nobody else gets in meanwhile.
    let fourth = tokio::time::timeout(Duration::from_millis(300), inside.get()).await;
    assert!(fourth.is_err(), "a fourth process got in: {fourth:?}");
    assert_eq!(s.available().unwrap(), 0);
    assert!(s.try_acquire().unwrap().is_none());
    go.set().unwrap();
    for p in &mut procs {
        soon(p.join()).await.unwrap();
    }
    let mut all = first;
    while let Some(n) = inside.try_get().unwrap() {
        all.push(n);
    }
    all.sort_unstable();
    assert_eq!(all, (0..8).collect::<Vec<_>>());
    assert_eq!(s.available().unwrap(), 3, "every permit came back");
}

fn hold_two_and_hang(s: Semaphore, held: Event) {
    let a = s.blocking_acquire().unwrap();
    let b = s.blocking_acquire().unwrap();
    held.set().unwrap();
    let _keep = (a, b);
    hangs();
}

async fn take_one(s: Semaphore) -> bool {
    s.acquire().await.unwrap().abandoned()
}

#[tokio::test]
async fn the_permits_of_a_killed_holder_come_back_and_the_next_taker_is_told() {
    let s = Semaphore::new(2);
    let held = Event::new();
    let mut holder = procpool::spawn(hold_two_and_hang, (s.clone(), held.clone()))
        .await
        .unwrap();
    soon(held.wait()).await.unwrap();
    assert_eq!(s.available().unwrap(), 0);
    let mut next = procpool::spawn(take_one, (s.clone(),)).await.unwrap();
    holder.kill().unwrap();
    assert!(matches!(holder.join().await, Err(Error::WorkerDied { .. })));
    assert!(soon(next.join()).await.unwrap(), "the next taker is told");
    // Both permits are back (the child's second taker dropped its permit on exit).
    let (a, b) = (
        soon(s.acquire()).await.unwrap(),
        soon(s.acquire()).await.unwrap(),
    );
    assert!(!a.abandoned() && !b.abandoned(), "told once only");
    drop((a, b));
    assert_eq!(s.available().unwrap(), 2);
}

/// From another process: try_acquire on an empty semaphore, a waiting acquire that
/// gives up (it must leave the line), `release` (Python's) and a bounded over-release.
async fn remote_semaphore_calls(s: Semaphore, b: BoundedSemaphore) -> (bool, bool, u64, bool) {
    let none = s.try_acquire().unwrap().is_none();
    let gave_up = tokio::time::timeout(Duration::from_millis(100), s.acquire())
        .await
        .is_err();
    s.release().unwrap();
    let after = s.available().unwrap();
    let over = matches!(b.release(), Err(Error::ReleasedTooOften { permits: 1, .. }));
    (none, gave_up, after, over)
}

#[tokio::test]
async fn semaphore_calls_from_another_process() {
    let s = Semaphore::new(0);
    let b = BoundedSemaphore::new(1);
    let mut p = procpool::spawn(remote_semaphore_calls, (s.clone(), b.clone()))
        .await
        .unwrap();
    let (none, gave_up, after, over) = soon(p.join()).await.unwrap();
    assert!(none && gave_up, "try_acquire {none}, gave up {gave_up}");
    // The waiter that gave up keeps nothing: the released permit is free, not lost
    // (its waiting thread may take it an instant before it stops, and gives it back).
    assert!(after <= 1, "{after}");
    assert!(support::eventually(support::SOON, || s
        .available()
        .unwrap()
        == 1));
    assert!(
        over,
        "a bounded semaphore refused the release from the child"
    );
    // Locally too, and a permit given back is not an over-release.
    let permit = b.try_acquire().unwrap().expect("one permit");
    assert!(b.try_acquire().unwrap().is_none());
    drop(permit);
    assert!(matches!(
        b.release(),
        Err(Error::ReleasedTooOften { permits: 1, .. })
    ));
    assert_eq!(b.available().unwrap(), 1);
}

/// Two rounds of the barrier; what each `wait` said.
fn party(b: Barrier) -> Vec<(u64, bool)> {
    (0..2)
        .map(|_| {
            let r = b.blocking_wait().unwrap();
            (r.index(), r.is_leader())
        })
        .collect()
}

#[tokio::test]
async fn a_barrier_of_four_processes_goes_round_twice_with_one_leader_each_time() {
    let b = Barrier::new(4);
    assert_eq!(b.parties(), 4);
    let mut procs = Vec::new();
    for _ in 0..4 {
        procs.push(procpool::spawn(party, (b.clone(),)).await.unwrap());
    }
    let mut rounds = vec![Vec::new(), Vec::new()];
    for p in &mut procs {
        for (round, r) in soon(p.join()).await.unwrap().into_iter().enumerate() {
            rounds[round].push(r);
        }
    }
    for round in rounds {
        let mut idx: Vec<u64> = round.iter().map(|r| r.0).collect();
        idx.sort_unstable();
        assert_eq!(idx, [0, 1, 2, 3], "{round:?}");
        let leaders: Vec<_> = round.iter().filter(|r| r.1).collect();
        assert_eq!(leaders, [&(3, true)], "the last to arrive leads: {round:?}");
    }
    assert_eq!(b.n_waiting().unwrap(), 0);
}

/// Says it is about to wait, then waits: what the wait said.
async fn wait_at(b: Barrier, ready: Queue<u32>) -> Result<bool, String> {
    ready.put(std::process::id()).await.unwrap();
    b.wait()
        .await
        .map(|r| r.is_leader())
        .map_err(|e| e.to_string())
}

fn never_arrives(b: Barrier, ready: Queue<u32>) {
    let _keep = b;
    ready.blocking_put(std::process::id()).unwrap();
    hangs();
}

#[tokio::test]
async fn a_party_that_dies_breaks_the_barrier_instead_of_hanging_the_others() {
    let b = Barrier::new(3);
    let ready = Queue::new();
    let mut dying = procpool::spawn(never_arrives, (b.clone(), ready.clone()))
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        waiting.push(
            procpool::spawn(wait_at, (b.clone(), ready.clone()))
                .await
                .unwrap(),
        );
    }
    for _ in 0..3 {
        soon(ready.get()).await.unwrap();
    }
    // Both waiters are in the barrier before the third party dies.
    assert!(support::eventually(support::SOON, || b
        .n_waiting()
        .unwrap()
        == 2));
    dying.kill().unwrap();
    assert!(matches!(dying.join().await, Err(Error::WorkerDied { .. })));
    for p in &mut waiting {
        let r = soon(p.join()).await.unwrap();
        assert!(
            matches!(&r, Err(m) if m.contains("barrier is broken")),
            "{r:?}"
        );
    }
    assert!(b.is_broken().unwrap());
    assert!(matches!(soon(b.wait()).await, Err(Error::BrokenBarrier)));
    // Mended, it works again.
    b.reset().unwrap();
    assert!(!b.is_broken().unwrap());
    let mut p = procpool::spawn(wait_at, (b.clone(), ready.clone()))
        .await
        .unwrap();
    let mut q = procpool::spawn(wait_at, (b.clone(), ready.clone()))
        .await
        .unwrap();
    let here = soon(b.wait()).await.unwrap();
    let there = [soon(p.join()).await.unwrap(), soon(q.join()).await.unwrap()];
    let leaders =
        usize::from(here.is_leader()) + there.iter().filter(|r| matches!(r, Ok(true))).count();
    assert_eq!(leaders, 1, "{here:?} {there:?}");
}

#[tokio::test]
async fn abort_breaks_the_barrier_for_a_waiting_process_and_a_dropped_wait_breaks_it_too() {
    let b = Barrier::new(2);
    let ready = Queue::new();
    let mut p = procpool::spawn(wait_at, (b.clone(), ready.clone()))
        .await
        .unwrap();
    soon(ready.get()).await.unwrap();
    assert!(support::eventually(support::SOON, || b
        .n_waiting()
        .unwrap()
        == 1));
    b.abort().unwrap();
    let r = soon(p.join()).await.unwrap();
    assert!(matches!(&r, Err(m) if m.contains("broken")), "{r:?}");
    b.reset().unwrap();
    // A wait given up (as a timed-out wait in Python) breaks it.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), b.wait()).await;
    assert!(gave_up.is_err());
    assert!(b.is_broken().unwrap());
}

/// A bounded buffer in shared memory: 8 slots, then the head and the length.
type Ring = [u64; 10];
const SLOTS: u64 = 8;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Buffer {
    lock: Lock,
    not_full: Condition,
    not_empty: Condition,
    ring: Value<Ring>,
}

impl Buffer {
    fn put(&self, item: u64) {
        let mut g = self.lock.blocking_lock().unwrap();
        self.not_full
            .blocking_wait_for(&mut g, || self.ring.get().unwrap()[9] < SLOTS)
            .unwrap();
        self.ring
            .update(|mut r| {
                let tail = (r[8] + r[9]) % SLOTS;
                r[usize::try_from(tail).unwrap()] = item;
                r[9] += 1;
                r
            })
            .unwrap();
        self.not_empty.notify_one().unwrap();
    }

    fn take(&self) -> u64 {
        let mut g = self.lock.blocking_lock().unwrap();
        self.not_empty
            .blocking_wait_for(&mut g, || self.ring.get().unwrap()[9] > 0)
            .unwrap();
        let mut item = 0;
        self.ring
            .update(|mut r| {
                item = r[usize::try_from(r[8]).unwrap()];
                r[8] = (r[8] + 1) % SLOTS;
                r[9] -= 1;
                r
            })
            .unwrap();
        self.not_full.notify_one().unwrap();
        item
    }
}

fn produce(b: Buffer, from: u64, n: u64) {
    for i in 0..n {
        b.put(from + i);
    }
}

/// Takes items until a 0; how many and their sum.
fn consume(b: Buffer) -> (u64, u64) {
    let (mut n, mut sum) = (0, 0);
    loop {
        match b.take() {
            0 => return (n, sum),
            x => {
                n += 1;
                sum += x;
            }
        }
    }
}

#[tokio::test]
async fn a_bounded_buffer_of_two_producers_and_two_consumers_loses_no_wake_up() {
    let lock = Lock::new();
    let b = Buffer {
        not_full: Condition::new(lock.clone()),
        not_empty: Condition::new(lock.clone()),
        lock,
        ring: Value::new([0; 10]),
    };
    let mut producers = Vec::new();
    for from in [1, 1001] {
        let p = procpool::spawn(produce, (b.clone(), from, 300))
            .await
            .unwrap();
        producers.push(p);
    }
    let mut consumers = Vec::new();
    for _ in 0..2 {
        consumers.push(procpool::spawn(consume, (b.clone(),)).await.unwrap());
    }
    for p in &mut producers {
        soon(p.join()).await.unwrap();
    }
    // One end mark per consumer, through the same buffer from the owner process.
    let marks = b.clone();
    tokio::task::spawn_blocking(move || (marks.put(0), marks.put(0)))
        .await
        .unwrap();
    let (mut n, mut sum) = (0, 0);
    for c in &mut consumers {
        let (cn, cs) = soon(c.join()).await.unwrap();
        n += cn;
        sum += cs;
    }
    assert_eq!(n, 600);
    let want: u64 = (1..=300).chain(1001..=1300).sum();
    assert_eq!(sum, want);
    assert_eq!(b.ring.get().unwrap()[9], 0, "the buffer is empty");
}

/// From a child with no runtime: a timed wait nobody notifies.
fn timed_wait(c: Condition) -> (bool, u128, bool) {
    let mut g = c.lock().blocking_lock().unwrap();
    let t0 = std::time::Instant::now();
    let woken = c
        .blocking_wait_timeout(&mut g, Duration::from_millis(200))
        .unwrap();
    (woken, t0.elapsed().as_millis(), g.is_held())
}

async fn notified_wait(c: Condition, waiting: Event) -> bool {
    let mut g = c.lock().lock().await.unwrap();
    waiting.set().unwrap();
    c.wait_timeout(&mut g, Duration::from_secs(30))
        .await
        .unwrap()
        && g.is_held()
}

#[tokio::test]
async fn a_condition_wait_times_out_or_is_woken_and_holds_the_lock_again() {
    let c = Condition::new(Lock::new());
    let mut p = procpool::spawn(timed_wait, (c.clone(),)).await.unwrap();
    let (woken, ms, held) = soon(p.join()).await.unwrap();
    assert!(!woken && held, "woken {woken}, held {held}");
    assert!((200..5_000).contains(&ms), "timed out after {ms} ms");
    // Woken: the child is parked once it let go of the lock, which this takes.
    let waiting = Event::new();
    let mut p = procpool::spawn(notified_wait, (c.clone(), waiting.clone()))
        .await
        .unwrap();
    soon(waiting.wait()).await.unwrap();
    let g = soon(c.lock().lock()).await.unwrap();
    c.notify_all().unwrap();
    drop(g);
    assert!(soon(p.join()).await.unwrap(), "woken, and holding the lock");
}

/// From a child with no runtime: a semaphore with no permit free, then one free.
fn timed_acquires(s: Semaphore) -> (bool, u128, bool, u128) {
    let t0 = std::time::Instant::now();
    let none = s
        .blocking_acquire_timeout(Duration::from_millis(150))
        .unwrap()
        .is_none();
    let waited = t0.elapsed().as_millis();
    s.release().unwrap();
    let t1 = std::time::Instant::now();
    let some = s
        .blocking_acquire_timeout(Duration::from_secs(20))
        .unwrap()
        .is_some();
    (none, waited, some, t1.elapsed().as_millis())
}

/// From a child with no runtime: a barrier of 2 nobody else comes to.
fn timed_barrier(b: Barrier) -> (String, u128) {
    let t0 = std::time::Instant::now();
    let r = b.blocking_wait_timeout(Duration::from_millis(150));
    (format!("{r:?}"), t0.elapsed().as_millis())
}

#[tokio::test]
async fn semaphore_and_barrier_timeouts_return_after_about_their_limit_with_no_runtime() {
    let s = Semaphore::new(0);
    let mut p = procpool::spawn(timed_acquires, (s.clone(),)).await.unwrap();
    let (none, waited, some, at_once) = soon(p.join()).await.unwrap();
    assert!(
        none && (150..5_000).contains(&waited),
        "{none} after {waited} ms"
    );
    assert!(some && at_once < 2_000, "{some} after {at_once} ms");
    // In async code too (the child's permit came back as it exited: held here), and a
    // free permit is taken at once whatever the limit.
    let held = soon(s.acquire()).await.unwrap();
    let t0 = std::time::Instant::now();
    assert!(
        s.acquire_timeout(Duration::from_millis(100))
            .await
            .unwrap()
            .is_none()
    );
    assert!(t0.elapsed() >= Duration::from_millis(100));
    drop(held);
    assert!(s.acquire_timeout(Duration::ZERO).await.unwrap().is_some());

    let b = Barrier::new(2);
    let mut p = procpool::spawn(timed_barrier, (b.clone(),)).await.unwrap();
    let (r, ms) = soon(p.join()).await.unwrap();
    assert!(r.contains("Timeout"), "{r}");
    assert!((150..5_000).contains(&ms), "after {ms} ms");
    assert!(
        b.is_broken().unwrap(),
        "a timed-out party breaks it, as in Python"
    );
}
