//! Cancellation by drop: queued tasks are removed, running ones have their worker stopped
//! and replaced; waiting under tokio's timeout does not cancel.

mod support;

use std::time::Duration;

use procpool::{AsyncPool, Error};
use support::{TempDir, gone_within, read_file_async, write_file};

fn doubler(x: i64) -> i64 {
    x * 2
}

fn runs_and_reports(report: String) -> u8 {
    write_file(&report, &std::process::id().to_string());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn marks(path: String) -> u8 {
    write_file(&path, "ran");
    0
}

/// One worker that is sent one task at a time: a queued task stays in the dispatcher.
async fn one_worker_one_task_at_a_time() -> AsyncPool {
    AsyncPool::builder()
        .processes(1)
        .pipeline_depth(1)
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn dropping_a_running_task_stops_its_worker() {
    let pool = one_worker_one_task_at_a_time().await;
    let dir = TempDir::new("cancel-running");
    let report = dir.path("pid");
    let fut = pool.apply(runs_and_reports, (report.clone(),));
    let queued_marker = dir.path("queued-ran");
    let queued = pool.apply_async(marks, (queued_marker.clone(),));
    // Poll the running task until it reports, then drop it (select!'s losing branch).
    let mut fut = Box::pin(fut);
    let worker = tokio::select! {
        _ = &mut fut => unreachable!("it never returns"),
        text = read_file_async(&report, Duration::from_secs(60)) => text.parse::<u32>().unwrap(),
    };
    drop(fut);
    gone_within(worker, Duration::from_secs(5)).await;
    // The queued task runs on the replacement.
    assert_eq!(queued.await.unwrap(), 0);
    assert!(std::path::Path::new(&queued_marker).exists());
    let s = pool.stats();
    assert_eq!((s.cancelled, s.restarts, s.completed), (1, 1, 1));
    assert_eq!(pool.apply(doubler, (2,)).await.unwrap(), 4);
}

#[tokio::test]
async fn dropping_a_queued_task_removes_it() {
    let pool = one_worker_one_task_at_a_time().await;
    let dir = TempDir::new("cancel-queued");
    let report = dir.path("pid");
    let blocker = pool.apply_async(runs_and_reports, (report.clone(),));
    let worker: u32 = read_file_async(&report, Duration::from_secs(60))
        .await
        .parse()
        .unwrap();
    let marker = dir.path("never");
    let queued = pool.apply_async(marks, (marker.clone(),));
    drop(queued);
    // Stop the blocker; the replacement must not run the dropped task.
    drop(blocker);
    gone_within(worker, Duration::from_secs(5)).await;
    assert_eq!(pool.apply(doubler, (1,)).await.unwrap(), 2);
    pool.close().await;
    assert!(
        !std::path::Path::new(&marker).exists(),
        "a dropped queued task ran"
    );
    assert_eq!(pool.stats().cancelled, 2);
}

#[tokio::test]
async fn a_dropped_pipelined_task_is_skipped_by_its_worker_and_never_runs() {
    // Default pipelining: the second task is already sent to the busy worker. Dropping
    // it sends a Skip, written to the worker's socket before the pool's counters show
    // the cancel; the worker reads every frame that arrived before it starts its next
    // task, so it skips the dropped one: it never runs, and the worker is not replaced.
    let pool = AsyncPool::new(1).await.unwrap();
    let dir = TempDir::new("cancel-pipelined");
    let (report, marker) = (dir.path("pid"), dir.path("never"));
    let gate = dir.path("gate");
    let first = pool.apply_async(waits_then_marks, (gate.clone(), report.clone()));
    let second = pool.apply_async(marks, (marker.clone(),));
    read_file_async(&report, Duration::from_secs(60)).await;
    // The second submission may reach the dispatcher after the first task started.
    assert!(
        support::eventually_async(Duration::from_secs(10), || pool.stats().running == 2).await,
        "the second task was not sent ahead: {:?}",
        pool.stats()
    );
    drop(second);
    assert!(
        support::eventually_async(Duration::from_secs(10), || pool.stats().cancelled == 1).await
    );
    write_file(&gate, "go");
    assert_eq!(first.await.unwrap(), 7);
    assert_eq!(pool.apply(doubler, (1,)).await.unwrap(), 2);
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the dropped pipelined task ran"
    );
    let s = pool.stats();
    assert_eq!(
        (s.submitted, s.completed, s.cancelled, s.failed, s.restarts),
        (3, 2, 1, 0, 0)
    );
}

fn waits_then_marks(gate: String, report: String) -> u8 {
    write_file(&report, "started");
    support::wait_for_file(&gate);
    7
}

#[tokio::test]
async fn tokio_timeout_on_a_handle_does_not_cancel_but_handle_timeout_does() {
    let pool = AsyncPool::new(1).await.unwrap();
    let dir = TempDir::new("handle-timeout");
    let gate = dir.path("gate");
    let report = dir.path("r");
    let mut h = pool.apply_async(waits_then_marks, (gate.clone(), report.clone()));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut h)
            .await
            .is_err()
    );
    write_file(&gate, "go");
    assert_eq!(h.await.unwrap(), 7);

    let report2 = dir.path("r2");
    let h = pool.apply_async(runs_and_reports, (report2.clone(),));
    let worker: u32 = read_file_async(&report2, Duration::from_secs(60))
        .await
        .parse()
        .unwrap();
    let r = h.timeout(Duration::from_millis(50)).await;
    assert!(matches!(r, Err(Error::Timeout { .. })));
    gone_within(worker, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn dropping_a_map_cancels_its_chunks() {
    let pool = AsyncPool::new(2).await.unwrap();
    let dir = TempDir::new("cancel-map");
    let report = dir.path("pid");
    let map = pool
        .map(runs_and_reports, vec![report.clone(); 4])
        .chunksize(1);
    let mut map = Box::pin(map);
    tokio::select! {
        _ = &mut map => unreachable!(),
        _ = read_file_async(&report, Duration::from_secs(60)) => {}
    }
    drop(map);
    assert!(
        support::eventually_async(Duration::from_secs(10), || {
            let s = pool.stats();
            s.queued == 0 && s.running == 0
        })
        .await
    );
    assert_eq!(pool.stats().cancelled, 4);
    assert_eq!(pool.map(doubler, 0..10).await.unwrap().len(), 10);
}

/// Says its pid in `dir/started`, waits for `dir/gate`, then writes `dir/finished`.
fn finish_after_gate(dir: String) -> u32 {
    write_file(&format!("{dir}/started"), &std::process::id().to_string());
    support::wait_for_file(&format!("{dir}/gate"));
    write_file(&format!("{dir}/finished"), "");
    std::process::id()
}

#[tokio::test]
async fn with_kill_on_cancel_off_a_dropped_running_task_finishes_and_its_worker_stays() {
    let pool = AsyncPool::builder()
        .processes(1)
        .kill_on_cancel(false)
        .build()
        .await
        .unwrap();
    let dir = TempDir::new("detached-cancel");
    let handle = pool.apply_async(finish_after_gate, (dir.root().display().to_string(),));
    let started = read_file_async(&dir.path("started"), support::SOON).await;
    let pid: u32 = started.parse().unwrap();
    drop(handle);
    assert!(
        support::eventually_async(support::SOON, || pool.stats().cancelled == 1).await,
        "{:?}",
        pool.stats()
    );
    // Still running: it finishes once let go.
    assert!(support::running(pid));
    write_file(&dir.path("gate"), "go");
    read_file_async(&dir.path("finished"), support::SOON).await;
    // The same worker serves the next task; nothing was replaced.
    let next = pool.apply(std::process::id, ()).await.unwrap();
    assert_eq!(next, pid);
    let st = pool.stats();
    assert_eq!(
        (st.restarts, st.cancelled, st.completed),
        (0, 1, 1),
        "{st:?}"
    );
}

/// How a caller gives up on a running `finish_after_gate` task, with the call's own
/// `kill_on_cancel` (`None`: the pool's).
#[derive(Debug, Clone, Copy)]
enum GiveUp {
    Apply(Option<bool>),
    Handle(Option<bool>),
    Map(Option<bool>),
    Imap(Option<bool>),
}

/// Runs `finish_after_gate` on `pool` (one worker), gives up on it as `how` says once it
/// runs, and answers whether its worker was left to finish it (else it was stopped and
/// replaced, and the task never finished).
async fn worker_kept_after(pool: &AsyncPool, how: GiveUp) -> bool {
    use futures::StreamExt;
    let dir = TempDir::new("call-kill-on-cancel");
    let arg = dir.root().display().to_string();
    let (p, f) = (pool.clone(), arg.clone());
    // Each way is driven by a task of its own and aborted (dropped) once it runs.
    let driver = match how {
        GiveUp::Apply(kill) => tokio::spawn(async move {
            let call = p.apply(finish_after_gate, (f,));
            let call = match kill {
                Some(k) => call.kill_on_cancel(k),
                None => call,
            };
            drop(call.await);
        }),
        GiveUp::Handle(kill) => {
            let h = p.apply_async(finish_after_gate, (f,));
            let h = match kill {
                Some(k) => h.kill_on_cancel(k),
                None => h,
            };
            tokio::spawn(async move { drop(h.await) })
        }
        GiveUp::Map(kill) => tokio::spawn(async move {
            let map = p.map(finish_after_gate, vec![f]);
            let map = match kill {
                Some(k) => map.kill_on_cancel(k),
                None => map,
            };
            drop(map.await);
        }),
        GiveUp::Imap(kill) => tokio::spawn(async move {
            let s = p.imap(finish_after_gate, vec![f]);
            let mut s = match kill {
                Some(k) => s.kill_on_cancel(k),
                None => s,
            };
            drop(s.next().await);
        }),
    };
    let pid: u32 = read_file_async(&dir.path("started"), support::SOON)
        .await
        .parse()
        .unwrap();
    let (restarts, cancelled) = (pool.stats().restarts, pool.stats().cancelled);
    driver.abort();
    assert!(driver.await.unwrap_err().is_cancelled());
    assert!(
        support::eventually_async(support::SOON, || pool.stats().cancelled == cancelled + 1).await,
        "{how:?}: {:?}",
        pool.stats()
    );
    // A stopped worker is replaced; one left to finish serves the next task once let go.
    write_file(&dir.path("gate"), "go");
    let next = support::soon(pool.apply(std::process::id, ()))
        .await
        .unwrap();
    let kept = next == pid;
    if kept {
        read_file_async(&dir.path("finished"), support::SOON).await;
        assert_eq!(pool.stats().restarts, restarts, "{how:?}: none replaced");
    } else {
        gone_within(pid, support::SOON).await;
        assert_eq!(pool.stats().restarts, restarts + 1, "{how:?}: one replaced");
    }
    kept
}

#[tokio::test]
async fn a_calls_own_kill_on_cancel_overrides_the_pools() {
    let killing = AsyncPool::builder().processes(1).build().await.unwrap();
    let keeping = AsyncPool::builder()
        .processes(1)
        .kill_on_cancel(false)
        .build()
        .await
        .unwrap();
    for (pool, default_kept) in [(&killing, false), (&keeping, true)] {
        for make in [GiveUp::Apply, GiveUp::Handle, GiveUp::Map, GiveUp::Imap] {
            assert_eq!(
                worker_kept_after(pool, make(None)).await,
                default_kept,
                "{:?} keeps the pool's setting",
                make(None)
            );
            assert!(
                worker_kept_after(pool, make(Some(false))).await,
                "{:?}",
                make(Some(false))
            );
            assert!(
                !worker_kept_after(pool, make(Some(true))).await,
                "{:?}",
                make(Some(true))
            );
        }
    }
}
