//! The dispatcher's scheduling, tested in-process over fake workers (`fake.rs`) under
//! a paused clock: each test takes milliseconds of real time, and its times are exact.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::fake::{Note, Pool, Script, World, config, lock, ms, settle, value};
use super::schedule::SKIP_GRACE;
use crate::error::{Error, ExitReason};
use crate::wire::Outcome;

const MS: Duration = Duration::from_millis(1);

fn received(p: &Pool, task: u64) -> bool {
    p.world()
        .count(|n| matches!(*n, Note::Received(_, t) if t == task))
        > 0
}

#[tokio::test(start_paused = true)]
async fn tasks_are_answered_with_their_own_values() {
    let mut p = Pool::new(config(1)).await;
    let tasks: Vec<_> = (0..3).map(|_| p.submit(ms(10))).collect();
    for (id, rx) in tasks {
        assert_eq!(value(rx.await).unwrap(), id);
    }
    settle().await;
    let s = p.stats();
    assert_eq!((s.submitted, s.completed, s.failed), (3, 3, 0));
    assert_eq!((s.running, s.queued, s.idle, s.workers), (0, 0, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn before_any_task_finished_a_worker_is_sent_at_most_eight() {
    let mut p = Pool::new(config(1)).await;
    let tasks: Vec<_> = (0..20).map(|_| p.submit(ms(10))).collect();
    settle().await;
    assert_eq!(
        p.world().count(|n| matches!(n, Note::Received(..))),
        8,
        "pipelined before any task's length is known"
    );
    for (id, rx) in tasks {
        assert_eq!(value(rx.await).unwrap(), id);
    }
}

#[tokio::test(start_paused = true)]
async fn once_tasks_are_known_to_be_long_a_worker_has_one_at_a_time() {
    let mut p = Pool::new(config(1)).await;
    let (_, first) = p.submit(ms(100));
    value(first.await).unwrap();
    let tasks: Vec<_> = (0..5).map(|_| p.submit(ms(100))).collect();
    settle().await;
    assert_eq!(p.world().count(|n| matches!(n, Note::Received(..))), 2);
    for (id, rx) in tasks {
        assert_eq!(value(rx.await).unwrap(), id);
    }
}

#[tokio::test(start_paused = true)]
async fn short_tasks_never_wait_behind_a_long_one_while_a_worker_is_idle() {
    let mut p = Pool::new(config(2)).await;
    let t0 = Instant::now();
    let (_, long) = p.submit(Script::Value(Duration::from_secs(3)));
    let short: Vec<_> = (0..5).map(|_| p.submit(ms(100))).collect();
    for (id, rx) in short {
        assert_eq!(value(rx.await).unwrap(), id);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "waited behind the long task"
        );
    }
    assert!(p.stats().taken_back >= 1, "{:?}", p.stats());
    value(long.await).unwrap();
    let w = p.world();
    for id in 1..=6 {
        assert_eq!(
            w.count(|n| *n == Note::Ran(0, id) || *n == Note::Ran(1, id)),
            1
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_map_never_waits_behind_a_task_that_waits_for_it() {
    // Issue 13's deadlock: a task blocked until after the map, five idle workers.
    let mut p = Pool::new(config(5)).await;
    let (_, blocked) = p.submit(Script::Hang);
    let t0 = Instant::now();
    let items: Vec<_> = (0..5).map(|_| p.submit(ms(10))).collect();
    for (id, rx) in items {
        assert_eq!(value(rx.await).unwrap(), id);
    }
    assert!(t0.elapsed() <= 30 * MS, "{:?}", t0.elapsed());
    drop(blocked);
}

#[tokio::test(start_paused = true)]
async fn tasks_go_to_idle_workers_first() {
    let mut p = Pool::new(config(3)).await;
    let tasks: Vec<_> = (0..3).map(|_| p.submit(ms(100))).collect();
    for (_, rx) in tasks {
        value(rx.await).unwrap();
    }
    let w = p.world();
    let mut on: Vec<_> = (1..=3).map(|id| w.ran_on(id).unwrap()).collect();
    on.sort_unstable();
    assert_eq!(on, [0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_queued_task_never_reaches_a_worker() {
    let mut cfg = config(1);
    cfg.pipeline = 1;
    let mut p = Pool::new(cfg).await;
    let (_, long) = p.submit(ms(100));
    let (queued, rx) = p.submit(ms(10));
    settle().await;
    assert_eq!(p.stats().queued, 1);
    p.cancel(queued);
    settle().await;
    assert!(rx.await.is_err(), "a cancelled task is dropped unanswered");
    assert_eq!((p.stats().queued, p.stats().cancelled), (0, 1));
    value(long.await).unwrap();
    settle().await;
    assert!(!received(&p, queued));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_task_sent_ahead_is_skipped_and_the_worker_kept() {
    let mut p = Pool::new(config(1)).await;
    let (_, long) = p.submit(ms(100));
    let (ahead, _rx) = p.submit(ms(10));
    let (_, after) = p.submit(ms(10));
    settle().await;
    assert!(received(&p, ahead));
    p.cancel(ahead);
    value(long.await).unwrap();
    value(after.await).unwrap();
    let w = p.world();
    assert_eq!(w.count(|n| *n == Note::Skipped(0, ahead)), 1);
    assert_eq!(w.count(|n| *n == Note::Ran(0, ahead)), 0);
    assert_eq!(w.count(|n| matches!(n, Note::Stopping(_))), 0);
    drop(w);
    assert_eq!(p.stats().restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_running_task_stops_its_worker_and_the_rest_run_on_a_replacement() {
    let mut p = Pool::new(config(1)).await;
    let (running, _rx) = p.submit(Script::Hang);
    let (behind, rx) = p.submit(ms(10));
    settle().await;
    p.cancel(running);
    assert_eq!(value(rx.await).unwrap(), behind);
    {
        let w = p.world();
        assert_eq!(w.ran_on(behind), Some(1), "on the replacement");
        assert!(w.when(&Note::Stopping(0)).is_some());
        assert_eq!(w.count(|n| matches!(n, Note::Exited(0, _))), 1);
    }
    settle().await;
    let s = p.stats();
    assert_eq!((s.restarts, s.cancelled, s.completed), (1, 1, 1));
}

/// A long task (2 s) given up while it runs, with kill on cancel off (by the pool's
/// setting or the call's own): it runs to its end on the same worker, past the skip
/// grace, and the task behind it runs there after it; nothing is stopped.
async fn a_kept_task_runs_to_its_end(pool_kills: bool) {
    let mut cfg = config(1);
    cfg.kill_on_cancel = pool_kills;
    let mut p = Pool::new(cfg).await;
    let t0 = Instant::now();
    let (long, _rx) = p.submit(ms(2000));
    let (behind, rx) = p.submit(ms(10));
    settle().await;
    if pool_kills {
        p.cancel_with(long, false);
    } else {
        p.cancel(long);
    }
    assert_eq!(value(rx.await).unwrap(), behind);
    assert!(
        t0.elapsed() >= 2000 * MS,
        "after the long one: {:?}",
        t0.elapsed()
    );
    {
        let w = p.world();
        assert_eq!(
            w.count(|n| matches!(n, Note::Stopping(_))),
            0,
            "{:?}",
            w.log
        );
        assert_eq!(w.ran_on(behind), Some(0), "on the same worker");
    }
    settle().await;
    let s = p.stats();
    assert_eq!((s.restarts, s.cancelled, s.completed), (0, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn with_kill_on_cancel_off_a_cancelled_running_task_runs_past_the_skip_grace() {
    a_kept_task_runs_to_its_end(false).await;
}

#[tokio::test(start_paused = true)]
async fn a_calls_own_kill_on_cancel_off_keeps_its_running_task_in_a_killing_pool() {
    a_kept_task_runs_to_its_end(true).await;
}

#[tokio::test(start_paused = true)]
async fn a_calls_own_kill_on_cancel_on_stops_its_worker_in_a_keeping_pool() {
    let mut cfg = config(1);
    cfg.kill_on_cancel = false;
    let mut p = Pool::new(cfg).await;
    let (running, _rx) = p.submit(Script::Hang);
    let (behind, rx) = p.submit(ms(10));
    settle().await;
    p.cancel_with(running, true);
    assert_eq!(value(rx.await).unwrap(), behind);
    assert_eq!(p.world().ran_on(behind), Some(1), "on the replacement");
    settle().await;
    assert_eq!(p.stats().restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_kept_cancelled_task_is_still_stopped_at_its_task_timeout() {
    let mut cfg = config(1);
    cfg.kill_on_cancel = false;
    cfg.task_timeout = Some(Duration::from_secs(1));
    let mut p = Pool::new(cfg).await;
    let t0 = Instant::now();
    let (running, _rx) = p.submit(Script::Hang);
    settle().await;
    p.cancel(running);
    while p.world().when(&Note::Stopping(0)).is_none() {
        tokio::time::sleep(MS).await;
    }
    let stopped = t0.elapsed();
    assert!(
        (1000 * MS..=1002 * MS).contains(&stopped),
        "stopped at {stopped:?}, not at the skip grace"
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_runs_a_cancelled_task_is_stopped_after_the_skip_grace() {
    let world = World {
        ignore_skips: true,
        ..World::default()
    };
    let mut p = Pool::build(config(1), world).await.unwrap();
    let t0 = Instant::now();
    let (_, long) = p.submit(ms(100));
    let (ahead, _rx) = p.submit(Script::Hang);
    settle().await;
    p.cancel(ahead);
    value(long.await).unwrap();
    // It became the head at 100 ms; the worker ran it anyway.
    while p.world().when(&Note::Stopping(0)).is_none() {
        tokio::time::sleep(MS).await;
    }
    let stopped = t0.elapsed();
    assert!(
        (100 * MS + SKIP_GRACE..=102 * MS + SKIP_GRACE).contains(&stopped),
        "stopped at {stopped:?}"
    );
    assert_eq!(p.world().count(|n| *n == Note::Ran(0, ahead)), 1);
}

#[tokio::test(start_paused = true)]
async fn task_timeout_fails_the_task_with_timeout_and_replaces_the_worker() {
    let mut cfg = config(1);
    cfg.task_timeout = Some(Duration::from_secs(1));
    let mut p = Pool::new(cfg).await;
    let t0 = Instant::now();
    let (_, stuck) = p.submit(Script::Hang);
    let (behind, rx) = p.submit(ms(10));
    match value(stuck.await) {
        Err(Error::Timeout { after }) => assert_eq!(after, Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
    let at = t0.elapsed();
    assert!((1000 * MS..1002 * MS).contains(&at), "{at:?}");
    assert_eq!(value(rx.await).unwrap(), behind);
    assert_eq!(p.world().ran_on(behind), Some(1));
    settle().await;
    assert_eq!((p.stats().restarts, p.stats().failed), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn task_timeout_counts_from_a_tasks_start_not_its_submission() {
    let mut cfg = config(1);
    cfg.task_timeout = Some(Duration::from_secs(1));
    let mut p = Pool::new(cfg).await;
    let a = p.submit(ms(700));
    let b = p.submit(ms(700));
    settle().await;
    assert!(
        received(&p, b.0),
        "sent ahead, so its wait is on the worker"
    );
    assert_eq!(value(a.1.await).unwrap(), a.0);
    assert_eq!(value(b.1.await).unwrap(), b.0);
    assert_eq!(p.stats().restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn run_timeout_counts_a_tasks_execution_and_overrides_task_timeout() {
    let mut cfg = config(1);
    cfg.task_timeout = Some(Duration::from_secs(10));
    let mut p = Pool::new(cfg).await;
    let t0 = Instant::now();
    let (_, busy) = p.submit(ms(700));
    // Waits 700 ms behind `busy`, then runs 500 ms: within its 600 ms.
    let (waits, waits_rx) = p.run_timeout(600 * MS).submit(ms(500));
    // Runs past its 600 ms (not past the pool's 10 s): stopped 600 ms after its start.
    let (_, stuck) = p.run_timeout(600 * MS).submit(Script::Hang);
    assert!(value(busy.await).is_ok());
    assert_eq!(value(waits_rx.await).unwrap(), waits);
    match value(stuck.await) {
        Err(Error::Timeout { after }) => assert_eq!(after, 600 * MS),
        other => panic!("{other:?}"),
    }
    let at = t0.elapsed();
    assert!((1800 * MS..1803 * MS).contains(&at), "{at:?}");
    settle().await;
    assert_eq!((p.stats().restarts, p.stats().failed), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn run_timeout_set_while_a_task_runs_counts_from_its_start() {
    let mut p = Pool::new(config(1)).await;
    let t0 = Instant::now();
    let (stuck, rx) = p.submit(Script::Hang);
    tokio::time::sleep(300 * MS).await;
    p.set_run_timeout(stuck, 500 * MS);
    match value(rx.await) {
        Err(Error::Timeout { after }) => assert_eq!(after, 500 * MS),
        other => panic!("{other:?}"),
    }
    let at = t0.elapsed();
    assert!((500 * MS..503 * MS).contains(&at), "{at:?}");
    // A limit already past stops it at once.
    let (late, rx) = p.submit(Script::Hang);
    tokio::time::sleep(300 * MS).await;
    let t1 = Instant::now();
    p.set_run_timeout(late, 100 * MS);
    assert!(matches!(value(rx.await), Err(Error::Timeout { .. })));
    assert!(t1.elapsed() < 3 * MS, "{:?}", t1.elapsed());
}

#[tokio::test(start_paused = true)]
async fn max_tasks_per_child_retires_each_worker_after_its_tasks() {
    let mut cfg = config(1);
    cfg.max_tasks_per_child = Some(2);
    let mut p = Pool::new(cfg).await;
    let tasks: Vec<_> = (0..5).map(|_| p.submit(ms(10))).collect();
    for (id, rx) in tasks {
        assert_eq!(value(rx.await).unwrap(), id);
    }
    let w = p.world();
    let on: Vec<_> = (1..=5).map(|id| w.ran_on(id).unwrap()).collect();
    assert_eq!(on, [0, 0, 1, 1, 2]);
    assert_eq!(w.count(|n| matches!(n, Note::Shutdown(0 | 1))), 2);
    assert_eq!(w.max_running, 1);
}

#[tokio::test(start_paused = true)]
async fn processes_bounds_concurrency_while_workers_are_replaced() {
    for n in [1, 2] {
        let mut cfg = config(n);
        cfg.max_tasks_per_child = Some(1);
        let mut p = Pool::new(cfg).await;
        let tasks: Vec<_> = (0..8).map(|_| p.submit(ms(50))).collect();
        for (id, rx) in tasks {
            assert_eq!(value(rx.await).unwrap(), id);
        }
        let w = p.world();
        assert_eq!(w.max_running, n, "processes({n})");
        let first = w.log.iter().find_map(|(_, n)| match n {
            Note::Ran(_, t) => Some(*t),
            _ => None,
        });
        assert_eq!(first, Some(1), "FIFO: the first task starts first");
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_fails_the_running_task_and_the_ones_behind_it_run_on_a_replacement() {
    let mut p = Pool::new(config(1)).await;
    let (_, crashed) = p.submit(Script::Crash(10 * MS));
    let (behind, rx) = p.submit(ms(10));
    match value(crashed.await) {
        Err(Error::WorkerDied { name, reason, .. }) => {
            assert_eq!(name, "FakeWorker-0");
            assert_eq!(reason, ExitReason::Signal(11));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(value(rx.await).unwrap(), behind);
    assert_eq!(p.world().ran_on(behind), Some(1));
    settle().await;
    let s = p.stats();
    assert_eq!((s.restarts, s.failed, s.completed), (1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_an_answer_and_the_worker_keeps_serving() {
    let mut p = Pool::new(config(1)).await;
    let (_, panicked) = p.submit(Script::Panic(MS));
    let (next, rx) = p.submit(ms(1));
    let done = panicked.await.unwrap().unwrap();
    assert!(matches!(done.outcome, Outcome::Panicked { .. }));
    assert_eq!(value(rx.await).unwrap(), next);
    assert_eq!(p.world().ran_on(next), Some(0));
    assert_eq!(p.stats().restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn failed_starts_are_retried_with_a_doubling_backoff() {
    let mut p = Pool::new(config(1)).await;
    p.world().fail_starts = 3;
    let (_, crashed) = p.submit(Script::Crash(MS));
    let (behind, rx) = p.submit(ms(1));
    assert!(value(crashed.await).is_err());
    assert_eq!(value(rx.await).unwrap(), behind);
    let w = p.world();
    let starts: Vec<Duration> = (1..=4)
        .map(|id| w.when(&Note::Starting(id)).unwrap())
        .collect();
    let gaps: Vec<Duration> = starts.windows(2).map(|s| s[1] - s[0]).collect();
    // Each failure takes the fake's 1 ms start, then 20, 40, 80 ms of backoff.
    assert_eq!(gaps, [21 * MS, 41 * MS, 81 * MS]);
    assert_eq!(w.ran_on(behind), Some(4));
    drop(w);
    assert_eq!(p.stats().start_failures, 3);
}

#[tokio::test(start_paused = true)]
async fn a_pool_that_cannot_start_workers_fails_its_tasks_instead_of_hanging() {
    let mut p = Pool::new(config(1)).await;
    p.world().fail_starts = u32::MAX;
    let (_, crashed) = p.submit(Script::Crash(MS));
    let (_, behind) = p.submit(ms(1));
    assert!(value(crashed.await).is_err());
    match value(behind.await) {
        Err(Error::Spawn { reason, .. }) => {
            assert!(reason.contains("cannot start workers"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let (_, later) = p.submit(ms(1));
    assert!(matches!(value(later.await), Err(Error::Spawn { .. })));
    assert_eq!(p.world().count(|n| matches!(n, Note::Starting(_))), 1 + 5);
}

#[tokio::test(start_paused = true)]
async fn close_finishes_queued_work_then_stops_every_worker() {
    let mut p = Pool::new(config(2)).await;
    let tasks: Vec<_> = (0..6).map(|_| p.submit(ms(20))).collect();
    let closed = p.close();
    for (id, rx) in tasks {
        assert_eq!(value(rx.await).unwrap(), id);
    }
    closed.await.unwrap();
    settle().await;
    assert!(p.run.is_finished(), "the dispatcher ends once closed");
    let w = p.world();
    assert_eq!(w.count(|n| matches!(n, Note::Shutdown(0 | 1))), 2);
    assert_eq!(w.count(|n| matches!(n, Note::Starting(_))), 2);
}

#[tokio::test(start_paused = true)]
async fn terminate_fails_outstanding_tasks_with_pool_closed_and_kills_the_workers() {
    let mut cfg = config(1);
    cfg.pipeline = 1;
    let mut p = Pool::new(cfg).await;
    let (_, running) = p.submit(Script::Hang);
    let (_, queued) = p.submit(ms(1));
    settle().await;
    p.terminate().await.unwrap();
    for rx in [running, queued] {
        assert!(matches!(rx.await, Ok(Err(Error::PoolClosed))));
    }
    assert!(
        p.world()
            .when(&Note::Exited(0, ExitReason::Signal(15)))
            .is_some()
    );
    settle().await;
    assert!(p.run.is_finished());
}

#[tokio::test(start_paused = true)]
async fn queued_chunks_of_a_dropped_map_are_not_sent() {
    let mut cfg = config(1);
    cfg.pipeline = 1;
    let mut p = Pool::new(cfg).await;
    let (_, long) = p.submit(ms(100));
    let (tx, rx) = mpsc::unbounded_channel();
    let chunks: Vec<u64> = (0..2).map(|_| p.submit_many(ms(10), &tx)).collect();
    settle().await;
    // The map is dropped; its cancels have not arrived yet.
    drop((tx, rx));
    value(long.await).unwrap();
    settle().await;
    for c in chunks {
        assert!(!received(&p, c), "chunk {c} was sent");
    }
    assert_eq!(p.stats().cancelled, 2);
}

#[tokio::test(start_paused = true)]
async fn a_worker_over_max_memory_is_replaced_after_its_task() {
    let mut cfg = config(1);
    cfg.max_memory_per_child = Some(1 << 20);
    let world = World {
        rss: 2 << 20,
        ..World::default()
    };
    let mut p = Pool::build(cfg, world).await.unwrap();
    let (_, first) = p.submit(ms(1));
    value(first.await).unwrap();
    let (second, rx) = p.submit(ms(1));
    assert_eq!(value(rx.await).unwrap(), second);
    let w = p.world();
    assert!(w.when(&Note::Shutdown(0)).is_some());
    assert_eq!(w.ran_on(second), Some(1));
    drop(w);
    assert!(p.stats().restarts >= 1);
}

#[tokio::test(start_paused = true)]
async fn build_replaces_a_worker_that_dies_after_it_was_ready() {
    let world = World {
        die_after_ready: [0].into(),
        ..World::default()
    };
    let mut p = Pool::build(config(2), world).await.unwrap();
    let tasks: Vec<_> = (0..2).map(|_| p.submit(ms(100))).collect();
    for (id, rx) in tasks {
        assert_eq!(value(rx.await).unwrap(), id);
    }
    let w = p.world();
    let mut on: Vec<_> = (1..=2).map(|id| w.ran_on(id).unwrap()).collect();
    on.sort_unstable();
    assert_eq!(on, [1, 2]);
    drop(w);
    assert_eq!(p.stats().restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn build_fails_with_a_start_failure_and_leaves_no_worker_behind() {
    let world = std::sync::Arc::new(std::sync::Mutex::new(World {
        fail_starts: 1,
        ..World::default()
    }));
    let err = Pool::build_in(config(3), world.clone()).await.err();
    assert!(matches!(err, Some(Error::Spawn { .. })), "{err:?}");
    settle().await;
    let w = lock(&world);
    let ready = w.count(|n| matches!(n, Note::Ready(_)));
    let exited = w.count(|n| matches!(n, Note::Exited(..)));
    assert_eq!((ready, exited), (2, 2), "{:?}", w.log);
}

#[tokio::test(start_paused = true)]
async fn stats_count_queued_running_and_idle() {
    let mut cfg = config(2);
    cfg.pipeline = 1;
    let mut p = Pool::new(cfg).await;
    let _tasks: Vec<_> = (0..3).map(|_| p.submit(Script::Hang)).collect();
    settle().await;
    let s = p.stats();
    assert_eq!((s.running, s.queued, s.idle, s.workers), (2, 1, 0, 2));
    p.terminate().await.unwrap();
    let s = p.stats();
    assert_eq!((s.running, s.queued, s.cancelled), (0, 0, 3));
}
