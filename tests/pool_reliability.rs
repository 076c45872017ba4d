//! The pool's "never a hang, nothing lost" promises where review and other projects' test
//! suites found them broken: scheduling, replacement, settings, finished futures, stuck
//! and leaking workers. Each test is named for the behaviour it proves.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::FusedFuture;
use procpool::{AsyncPool, Error, Event};
use support::{TempDir, is_dead, soon, wait_for_file, write_file};

fn square(x: i64) -> i64 {
    x * x
}

fn doubler(x: i64) -> i64 {
    x * 2
}

fn naps(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn waits_for(ev: Event) -> u8 {
    ev.blocking_wait().expect("the parent is there");
    1
}

// ----------------------------------------------------------------- head-of-line blocking

#[tokio::test]
async fn a_task_queued_behind_a_blocked_worker_moves_to_an_idle_one() {
    // The seen deadlock: 5 workers, one task waiting on an Event that is set only after
    // a map of 5 short items ends. On a new pool, one chunk of the map was pipelined
    // behind the blocked task and never ran.
    let pool = AsyncPool::new(5).await.unwrap();
    let ev = Event::new();
    let blocked = pool.apply_async(waits_for, (ev.clone(),));
    let map = pool.map(naps, vec![10u64; 5]).chunksize(1);
    let out = tokio::time::timeout(Duration::from_secs(60), map).await;
    ev.set().unwrap();
    let out = out.expect("the map must not wait behind the blocked worker");
    assert_eq!(out.unwrap(), vec![10; 5]);
    assert_eq!(soon(blocked).await.unwrap(), 1);
}

#[tokio::test]
async fn tasks_sent_ahead_to_a_blocked_worker_are_taken_back_for_an_idle_one() {
    // With 2 workers, a map of 6 single items must queue some behind the blocked task
    // (the pipeline is 8 deep before any task has finished): they are taken back.
    let pool = AsyncPool::new(2).await.unwrap();
    let ev = Event::new();
    let blocked = pool.apply_async(waits_for, (ev.clone(),));
    let map = pool.map(naps, vec![10u64; 6]).chunksize(1);
    let out = tokio::time::timeout(Duration::from_secs(60), map).await;
    ev.set().unwrap();
    let out = out.expect("the map must not wait behind the blocked worker");
    assert_eq!(out.unwrap(), vec![10; 6]);
    assert!(pool.stats().taken_back >= 1, "{:?}", pool.stats());
    assert_eq!(soon(blocked).await.unwrap(), 1);
}

#[tokio::test]
async fn short_tasks_do_not_wait_behind_a_long_one_while_a_worker_is_idle() {
    // Seen: one 3 s task running, 5 short ones finished at 100, 3049, 3049, 3149, 3149 ms.
    let pool = AsyncPool::new(2).await.unwrap();
    let ev = Event::new();
    let long = pool.apply_async(waits_for, (ev.clone(),));
    let start = Instant::now();
    let short: Vec<_> = (0..5).map(|_| pool.apply_async(naps, (50,))).collect();
    // Every short task finishes while the long one still runs: it ends only when the
    // Event is set, after them.
    for h in short {
        assert_eq!(soon(h).await.unwrap(), 50);
    }
    let took = start.elapsed();
    ev.set().unwrap();
    assert_eq!(soon(long).await.unwrap(), 1);
    // 5 x 50 ms on one worker: 250 ms of work; generous for a loaded machine.
    assert!(took < Duration::from_secs(20), "short tasks took {took:?}");
}

/// Runs once: a second run of task `i` finds its file and panics.
fn runs_once(dir: String, i: u32, ms: u64) -> u32 {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(format!("{dir}/ran-{i}"))
        .unwrap_or_else(|e| panic!("task {i} ran twice: {e}"));
    std::thread::sleep(Duration::from_millis(ms));
    i
}

#[tokio::test]
async fn a_task_taken_back_from_a_busy_worker_runs_exactly_once() {
    let pool = AsyncPool::new(2).await.unwrap();
    let dir = TempDir::new("runs-once");
    let base = dir.path("");
    let base = base.trim_end_matches('/').to_owned();
    let mut i = 0;
    for round in 0..20u64 {
        // Uneven lengths: some workers idle while others have tasks queued behind a
        // task of a few milliseconds, so tasks are taken back while heads finish.
        let handles: Vec<_> = (0..12u64)
            .map(|k| {
                i += 1;
                let ms = if k == 0 { 20 } else { (k * 7 + round) % 3 };
                pool.apply_async(runs_once, (base.clone(), i, ms))
            })
            .collect();
        for h in handles {
            soon(h).await.unwrap();
        }
    }
    let s = pool.stats();
    assert_eq!((s.completed, s.failed), (240, 0), "{s:?}");
    assert!(s.taken_back > 0, "no task was taken back: {s:?}");
}

// ------------------------------------------------------ concurrency during replacement

/// Counts tasks running at once across processes, with a file lock: `dir/state` holds
/// "running max order...".
fn enter_leave(dir: &str, i: u32, enter: bool) {
    use std::io::{Read, Seek, Write};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(format!("{dir}/state"))
        .unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let mut s = String::new();
    (&f).read_to_string(&mut s).unwrap();
    let mut words: Vec<String> = s.split_whitespace().map(str::to_owned).collect();
    if words.len() < 2 {
        words = vec!["0".into(), "0".into()];
    }
    let mut running: i64 = words[0].parse().unwrap();
    let mut max: i64 = words[1].parse().unwrap();
    if enter {
        running += 1;
        max = max.max(running);
        words.push(i.to_string());
    } else {
        running -= 1;
    }
    words[0] = running.to_string();
    words[1] = max.to_string();
    (&f).rewind().unwrap();
    f.set_len(0).unwrap();
    (&f).write_all(words.join(" ").as_bytes()).unwrap();
}

fn counted(dir: String, i: u32, ms: u64) -> u32 {
    enter_leave(&dir, i, true);
    std::thread::sleep(Duration::from_millis(ms));
    enter_leave(&dir, i, false);
    i
}

async fn run_counted(processes: usize, tasks: u32) -> (i64, Vec<u32>) {
    let pool = AsyncPool::builder()
        .processes(processes)
        .max_tasks_per_child(1)
        .build()
        .await
        .unwrap();
    let dir = TempDir::new("concurrency");
    let base = dir.path("");
    let base = base.trim_end_matches('/').to_owned();
    let handles: Vec<_> = (0..tasks)
        .map(|i| pool.apply_async(counted, (base.clone(), i, 30)))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(soon(h).await.unwrap(), i as u32);
    }
    pool.close().await;
    let state = std::fs::read_to_string(format!("{base}/state")).unwrap();
    let words: Vec<&str> = state.split_whitespace().collect();
    let max = words[1].parse().unwrap();
    let order = words[2..].iter().map(|w| w.parse().unwrap()).collect();
    (max, order)
}

#[tokio::test]
async fn processes_bounds_running_tasks_while_workers_are_replaced() {
    let (max, order) = run_counted(1, 4).await;
    assert_eq!(max, 1, "tasks overlapping in a pool of 1");
    assert_eq!(
        order,
        vec![0, 1, 2, 3],
        "a FIFO pool of 1 starts tasks in order"
    );
    let (max, order) = run_counted(2, 6).await;
    assert!(max <= 2, "{max} tasks at once in a pool of 2");
    let mut first_two = order[..2].to_vec();
    first_two.sort();
    assert_eq!(
        first_two,
        vec![0, 1],
        "tasks 0 and 1 start first: {order:?}"
    );
}

// ------------------------------------------------------------- a worker dying in build

/// The first worker to run this exits right after its `Ready`, while the others wait in
/// their initializer until it is dead.
fn first_dies_after_ready(dir: String) {
    let first = format!("{dir}/first");
    let me = std::process::id();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(format!("{dir}/claim"))
        .is_ok();
    if created {
        write_file(&first, &me.to_string());
        let returned = format!("{dir}/returned");
        std::thread::spawn(move || {
            // Ready goes out as the initializer returns; then the main thread sleeps
            // reading its channel ('S'). Only then die.
            wait_for_file(&returned);
            let stat = format!("/proc/self/task/{me}/stat");
            loop {
                let s = std::fs::read_to_string(&stat).unwrap_or_default();
                if s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('S')) {
                    std::process::abort();
                }
                std::thread::yield_now();
            }
        });
        write_file(&format!("{dir}/returned"), "");
        return;
    }
    wait_for_file(&first);
    let pid: u32 = std::fs::read_to_string(&first).unwrap().parse().unwrap();
    while !is_dead(pid) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[tokio::test]
async fn a_worker_that_dies_after_ready_during_build_is_replaced_and_nothing_hangs() {
    let dir = TempDir::new("dies-in-build");
    let base = dir.path("");
    let base = base.trim_end_matches('/').to_owned();
    let built = AsyncPool::builder()
        .processes(3)
        .initializer(first_dies_after_ready, (base,))
        .build();
    let pool = match soon(built).await {
        Ok(pool) => pool,
        // Failing the build is allowed too; hanging is not.
        Err(e) => return eprintln!("build failed, as allowed: {e}"),
    };
    let out = soon(pool.map(doubler, 0..64).chunksize(1)).await.unwrap();
    assert_eq!(out, (0..64).map(|x| x * 2).collect::<Vec<_>>());
    let handles: Vec<_> = (0..32).map(|i| pool.apply_async(doubler, (i,))).collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(soon(h).await.unwrap(), 2 * i as i64);
    }
    soon(pool.close()).await;
}

// ------------------------------------------------------------------ invalid settings

#[tokio::test]
async fn zero_settings_are_invalid_config_not_clamped() {
    let r = AsyncPool::builder().max_tasks_per_child(0).build().await;
    assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    let r = AsyncPool::builder().pipeline_depth(0).build().await;
    assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    let pool = AsyncPool::new(1).await.unwrap();
    let r = pool.map(doubler, 0..10).chunksize(0).await;
    assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    let r: Vec<_> = pool.imap(doubler, 0..10).chunksize(0).collect().await;
    assert!(
        matches!(r.as_slice(), [Err(Error::InvalidConfig { .. })]),
        "{r:?}"
    );
    assert_eq!(pool.apply(doubler, (2,)).await.unwrap(), 4);
}

// ------------------------------------------------------------- imap's input panicking

#[tokio::test]
async fn imap_yields_what_is_done_before_its_input_panics_then_the_error() {
    let pool = AsyncPool::new(2).await.unwrap();
    for ordered in [true, false] {
        let input = (0..10i64).map(|i| {
            if i == 3 {
                panic!("input broke at 3")
            } else {
                i
            }
        });
        let stream = if ordered {
            pool.imap(square, input)
        } else {
            pool.imap_unordered(square, input)
        };
        let out: Vec<_> = soon(stream.collect()).await;
        let (last, done) = out.split_last().expect("some items");
        let mut done: Vec<i64> = done.iter().map(|r| *r.as_ref().unwrap()).collect();
        if !ordered {
            done.sort();
        }
        assert_eq!(done, vec![0, 1, 4], "ordered: {ordered}");
        match last {
            Err(Error::Panicked { message, .. }) => {
                assert!(message.contains("input broke at 3"), "{message}")
            }
            other => panic!("expected the input's panic, got {other:?}"),
        }
    }
    assert_eq!(pool.apply(square, (3,)).await.unwrap(), 9);
}

// ----------------------------------------------------- polling a finished future again

fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    Pin::new(f).poll(&mut Context::from_waker(&waker))
}

fn assert_finished<F>(what: &str, f: &mut F)
where
    F: Future<Output = procpool::Result<i64>> + FusedFuture + Unpin,
{
    assert!(f.is_terminated(), "{what}: is_terminated after its result");
    match poll_once(f) {
        Poll::Ready(Err(Error::AlreadyCompleted)) => {}
        other => panic!("{what}: polled again gave {other:?}"),
    }
}

#[tokio::test]
async fn a_finished_future_polled_again_answers_already_completed() {
    let pool = AsyncPool::new(1).await.unwrap();
    let mut h = pool.apply_async(doubler, (1,));
    assert!(!h.is_terminated());
    assert_eq!((&mut h).await.unwrap(), 2);
    assert_finished("TaskHandle", &mut h);

    let mut t = pool
        .apply_async(doubler, (2,))
        .timeout(Duration::from_secs(60));
    assert_eq!((&mut t).await.unwrap(), 4);
    assert_finished("TaskTimeout", &mut t);

    let mut a = pool.apply(doubler, (3,));
    assert_eq!((&mut a).await.unwrap(), 6);
    assert_finished("Apply", &mut a);

    let mut a = pool.apply(doubler, (3,)).timeout(Duration::from_secs(60));
    assert_eq!((&mut a).await.unwrap(), 6);
    assert_finished("Apply with timeout", &mut a);

    let mut m = pool.map_async(doubler, vec![1, 2]);
    assert_eq!((&mut m).await.unwrap(), vec![2, 4]);
    assert!(m.is_terminated());
    assert!(matches!(
        poll_once(&mut m),
        Poll::Ready(Err(Error::AlreadyCompleted))
    ));

    let mut m = pool.map(doubler, vec![1, 2]);
    assert_eq!((&mut m).await.unwrap(), vec![2, 4]);
    assert!(m.is_terminated());
    assert!(matches!(
        poll_once(&mut m),
        Poll::Ready(Err(Error::AlreadyCompleted))
    ));

    // An error is a result too: polled again, the same answer.
    let mut m = pool.map(doubler, vec![1]).chunksize(0);
    assert!(matches!((&mut m).await, Err(Error::InvalidConfig { .. })));
    assert!(matches!(
        poll_once(&mut m),
        Poll::Ready(Err(Error::AlreadyCompleted))
    ));
}

// ------------------------------------------------------------ stuck in an initializer

/// Hangs in the initializer in every worker after the first `n` started in `dir`; each
/// writes its pid to `dir/started-<i>`.
fn init_hangs_after(dir: String, n: u32) {
    use std::io::Write;
    let mut i = 0;
    let mut file = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(format!("{dir}/started-{i}"))
        {
            Ok(f) => break f,
            Err(_) => i += 1,
        }
    };
    write!(file, "{}", std::process::id()).unwrap();
    drop(file);
    if i >= n {
        support::hangs();
    }
}

/// The pids `init_hangs_after` wrote, in start order.
fn started_pids(dir: &str) -> Vec<u32> {
    (0..)
        .map_while(|i| std::fs::read_to_string(format!("{dir}/started-{i}")).ok())
        .map(|s| s.parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_worker_stuck_in_its_initializer_fails_build_with_timeout() {
    let limit = Duration::from_millis(500);
    let dir = TempDir::new("stuck-build");
    let base = dir.path("");
    let base = base.trim_end_matches('/').to_owned();
    let start = Instant::now();
    let r = AsyncPool::builder()
        .processes(2)
        .initializer(init_hangs_after, (base.clone(), 0))
        .start_timeout(limit)
        .build();
    let r = soon(r).await;
    assert!(
        matches!(r, Err(Error::Timeout { after, .. }) if after == limit),
        "{r:?}"
    );
    assert!(start.elapsed() >= limit);
    // No stuck worker is left behind.
    let pids = started_pids(&base);
    assert_eq!(pids.len(), 2, "{pids:?}");
    for pid in pids {
        support::gone_within(pid, Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn a_stuck_replacement_is_killed_retried_and_counted() {
    let dir = TempDir::new("stuck-replacement");
    let base = dir.path("");
    let base = base.trim_end_matches('/').to_owned();
    let pool = AsyncPool::builder()
        .processes(1)
        .max_tasks_per_child(1)
        .initializer(init_hangs_after, (base.clone(), 2))
        .start_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // Workers 0 and 1 start; 2 and later (the replacement after the second task) hang
    // in their initializer and are killed after 300 ms each, retried with backoff.
    assert_eq!(soon(pool.apply(doubler, (1,))).await.unwrap(), 2);
    assert_eq!(soon(pool.apply(doubler, (2,))).await.unwrap(), 4);
    assert!(
        support::eventually_async(Duration::from_secs(30), || pool.stats().start_failures >= 2)
            .await,
        "{:?}",
        pool.stats()
    );
    // The stuck ones were killed: every worker but the last one started is dead.
    let pids = started_pids(&base);
    assert!(pids.len() >= 4, "{pids:?}");
    for &pid in &pids[..pids.len() - 1] {
        support::gone_within(pid, Duration::from_secs(10)).await;
    }
    pool.terminate().await;
}

// ------------------------------------------------------------------- leaking workers

fn leaks(mib: usize) -> u32 {
    let v: Vec<u8> = vec![1; mib << 20];
    std::mem::forget(std::hint::black_box(v));
    std::process::id()
}

#[tokio::test]
async fn a_worker_over_max_memory_per_child_is_replaced_after_its_task() {
    let pool = AsyncPool::builder()
        .processes(1)
        .max_memory_per_child(64 << 20)
        .build()
        .await
        .unwrap();
    let small = pool.apply(leaks, (0,)).await.unwrap();
    assert_eq!(
        pool.apply(leaks, (0,)).await.unwrap(),
        small,
        "no leak: same worker"
    );
    // 100 MiB leaked: the task's result arrives, then its worker is replaced.
    let big = pool.apply(leaks, (100,)).await.unwrap();
    assert_eq!(big, small);
    support::gone_within(big, Duration::from_secs(10)).await;
    let next = pool.apply(leaks, (0,)).await.unwrap();
    assert_ne!(next, big, "the leaking worker was replaced");
    assert_eq!(pool.stats().restarts, 1, "{:?}", pool.stats());
    pool.close().await;
}
