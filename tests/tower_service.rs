//! `pool.service(f)` (feature `tower`): a `tower::Service` whose `poll_ready` follows the
//! pool's queue bound, under tower's `Timeout` (which stops the work) and
//! `ConcurrencyLimit` layers.
#![cfg(feature = "tower")]

mod support;

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use procpool::{AsyncPool, Error};
use support::{TempDir, read_file_async, write_file};
use tower::{Service, ServiceBuilder, ServiceExt};

fn square(x: u64) -> u64 {
    x * x
}

/// Says its pid in `dir/started-<n>`, waits for `dir/gate`, answers `n`.
fn gated((dir, n): (String, u32)) -> u32 {
    write_file(
        &format!("{dir}/started-{n}"),
        &std::process::id().to_string(),
    );
    support::wait_for_file(&format!("{dir}/gate"));
    n
}

fn hangs(report: String) -> u8 {
    write_file(&report, &std::process::id().to_string());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `poll_ready` once, now: `Some` if ready (or failed), `None` if it would wait.
async fn ready_now<S: Service<R>, R>(svc: &mut S) -> Option<Result<(), S::Error>> {
    poll_fn(|cx| match svc.poll_ready(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[tokio::test]
async fn many_requests_under_concurrency_limit_and_timeout_layers_all_answer() {
    let pool = AsyncPool::new(2).await.unwrap();
    let svc = ServiceBuilder::new()
        .timeout(support::SOON)
        .concurrency_limit(3)
        .service(pool.service(square));
    let answers: Vec<u64> = support::soon(
        svc.call_all(futures::stream::iter(0..200u64))
            .collect::<Vec<_>>(),
    )
    .await
    .into_iter()
    .map(|r: Result<u64, tower::BoxError>| r.unwrap())
    .collect();
    assert_eq!(answers, (0..200u64).map(|x| x * x).collect::<Vec<_>>());
    let s = pool.stats();
    assert_eq!((s.submitted, s.completed), (200, 200), "{s:?}");
}

#[tokio::test]
async fn poll_ready_waits_while_the_queue_is_full_and_wakes_when_it_has_room() {
    // One worker, one task at a time: queued tasks stay in the queue, two at most.
    let pool = AsyncPool::builder()
        .processes(1)
        .pipeline_depth(1)
        .max_queued(2)
        .build()
        .await
        .unwrap();
    let dir = TempDir::new("tower-full");
    let arg = |n: u32| (dir.root().display().to_string(), n);
    let svc = pool.service(gated);
    let mut calls = Vec::new();
    // The first runs (and leaves the queue) ...
    let mut first = svc.clone();
    assert!(ready_now(&mut first).await.unwrap().is_ok());
    calls.push(tokio::spawn(first.call(arg(0))));
    read_file_async(&dir.path("started-0"), support::SOON).await;
    // ... two more fill the queue ...
    for n in 1..=2 {
        let mut s = svc.clone();
        assert!(ready_now(&mut s).await.unwrap().is_ok(), "place {n}");
        calls.push(tokio::spawn(s.call(arg(n))));
    }
    // ... and the next waits: the bound holds, however many try.
    let mut waiting: Vec<_> = (0..5).map(|_| svc.clone()).collect();
    for s in &mut waiting {
        assert!(ready_now(s).await.is_none(), "ready with a full queue");
    }
    assert!(
        support::eventually_async(support::SOON, || {
            let st = pool.stats();
            (st.running, st.queued, st.submitted) == (1, 2, 3)
        })
        .await,
        "{:?}",
        pool.stats()
    );
    // Room again: the waiting ones get places as tasks leave the queue, and all answer.
    write_file(&dir.path("gate"), "go");
    for (i, mut s) in waiting.into_iter().enumerate() {
        let n = 3 + i as u32;
        let s = support::soon(s.ready()).await.unwrap();
        calls.push(tokio::spawn(s.call(arg(n))));
    }
    for (n, c) in calls.into_iter().enumerate() {
        assert_eq!(support::soon(c).await.unwrap().unwrap(), n as u32);
    }
    assert!(pool.stats().queued <= 2);
    assert_eq!(pool.stats().completed, 8);
}

#[tokio::test]
async fn a_service_dropped_holding_a_place_gives_it_back() {
    let pool = AsyncPool::builder()
        .processes(1)
        .pipeline_depth(1)
        .max_queued(1)
        .build()
        .await
        .unwrap();
    let dir = TempDir::new("tower-drop");
    let svc = pool.service(gated);
    let mut running = svc.clone();
    assert!(ready_now(&mut running).await.unwrap().is_ok());
    let run = running.call((dir.root().display().to_string(), 0));
    read_file_async(&dir.path("started-0"), support::SOON).await;
    // The one place: held, then given back by the drop.
    let mut holder = svc.clone();
    assert!(ready_now(&mut holder).await.unwrap().is_ok());
    let mut other = svc.clone();
    assert!(ready_now(&mut other).await.is_none(), "the place is held");
    drop(holder);
    assert!(ready_now(&mut other).await.unwrap().is_ok(), "given back");
    // Ready twice is one place, not two.
    assert!(ready_now(&mut other).await.unwrap().is_ok());
    assert!(ready_now(&mut svc.clone()).await.is_none());
    write_file(&dir.path("gate"), "go");
    assert_eq!(support::soon(run).await.unwrap(), 0);
}

#[tokio::test]
async fn towers_timeout_stops_the_task_and_its_worker_is_replaced() {
    let pool = AsyncPool::new(1).await.unwrap();
    let dir = TempDir::new("tower-timeout");
    let report = dir.path("pid");
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(300))
        .service(pool.service(hangs));
    let err = support::soon(svc.ready().await.unwrap().call(report.clone()))
        .await
        .unwrap_err();
    assert!(
        err.is::<tower::timeout::error::Elapsed>(),
        "tower's timeout: {err}"
    );
    let pid: u32 = read_file_async(&report, support::SOON)
        .await
        .parse()
        .unwrap();
    support::gone_within(pid, support::SOON).await;
    assert!(
        support::eventually_async(support::SOON, || {
            let s = pool.stats();
            s.restarts == 1 && s.cancelled == 1 && s.workers == 1
        })
        .await,
        "{:?}",
        pool.stats()
    );
    // The service goes on, on the replacement.
    let mut sq = pool.service(square);
    assert_eq!(sq.ready().await.unwrap().call(9).await.unwrap(), 81);
}

#[tokio::test]
async fn a_closed_pools_service_is_not_ready() {
    let pool = AsyncPool::new(1).await.unwrap();
    let mut svc = pool.service(square);
    pool.close().await;
    match ready_now(&mut svc).await {
        Some(Err(Error::PoolClosed)) => {}
        other => panic!("expected PoolClosed, got {other:?}"),
    }
}
