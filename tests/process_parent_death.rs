//! Every child dies when its parent dies, even by SIGKILL.
//!
//! The helper program is a procpool child of this test (the test binary re-executed): it
//! starts a grandchild, reports the grandchild's pid through a file, and waits. The test
//! SIGKILLs the helper and checks that the grandchild is gone within a second.

mod support;

use std::time::{Duration, Instant};

use procpool::{Error, ExitReason, Process};
use support::{TempDir, ended_within, hangs, is_dead, read_file_async, running, write_file};

async fn helper(report: String) -> u8 {
    let grandchild = procpool::spawn(hangs, ()).await.expect("grandchild");
    let pid = grandchild.pid().expect("pid");
    write_file(&report, &pid.to_string());
    std::future::pending::<()>().await;
    unreachable!()
}

#[tokio::test]
async fn grandchild_dies_within_a_second_of_a_sigkilled_parent() {
    let dir = TempDir::new("orphan");
    let report = dir.path("grandchild.pid");
    let mut p = Process::new(helper, (report.clone(),));
    p.start().await.unwrap();
    let text = read_file_async(&report, Duration::from_secs(60)).await;
    let grandchild: u32 = text.trim().parse().unwrap();
    assert!(
        !is_dead(grandchild),
        "grandchild must be running before the kill"
    );

    p.kill().unwrap();
    let killed_at = Instant::now();
    match p.join().await {
        Err(Error::WorkerDied {
            reason: ExitReason::Signal(9),
            ..
        }) => {}
        other => panic!("expected WorkerDied(SIGKILL), got {other:?}"),
    }
    // The grandchild is not our child: once dead it disappears, or at worst stays a
    // zombie of a subreaper that does not reap. Either way it is no longer running.
    // Judged by the looks started after the kill, not by when this test got to look.
    ended_within(grandchild, killed_at, Duration::from_secs(1), running).await;
}
