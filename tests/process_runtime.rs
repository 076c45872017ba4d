//! Targets started from both tokio runtime flavours, and 20 tests of one binary spawning
//! children at the same time.

mod support;

use std::time::Duration;

use procpool::Process;
use support::{
    TempDir, eventually, is_dead, proc_state, read_file_within, wait_for_file, write_file,
};

fn square(x: u64) -> u64 {
    x * x
}

async fn async_square(x: u64) -> u64 {
    tokio::task::yield_now().await;
    x * x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_a_multi_thread_runtime() {
    let mut p = Process::new(square, (12,));
    p.start().await.unwrap();
    assert_eq!(p.join().await.unwrap(), 144);
    // Joining from another task of the runtime works too (Process is Send).
    let handle = tokio::spawn(async move {
        let mut p = procpool::spawn(async_square, (3,)).await.unwrap();
        p.join().await.unwrap()
    });
    assert_eq!(handle.await.unwrap(), 9);
}

#[tokio::test(flavor = "current_thread")]
async fn from_a_current_thread_runtime() {
    let mut p = Process::new(async_square, (11,));
    p.start().await.unwrap();
    assert_eq!(p.join().await.unwrap(), 121);
}

fn finish_after(release: String, done: String) -> u8 {
    wait_for_file(&release);
    write_file(&done, "done");
    1
}

#[test]
fn a_child_outlives_the_runtime_that_started_it() {
    // The service thread forks every child, not the caller's runtime threads: shutting
    // the runtime down must not kill the child (PR_SET_PDEATHSIG follows the thread).
    let dir = TempDir::new("outlive");
    let (release, done) = (dir.path("release"), dir.path("done"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = rt
        .block_on(procpool::spawn(
            finish_after,
            (release.clone(), done.clone()),
        ))
        .unwrap();
    let pid = p.pid().unwrap();
    drop(rt);
    assert!(!is_dead(pid), "child died with the runtime that started it");
    write_file(&release, "go");
    read_file_within(&done, Duration::from_secs(30));
    drop(p);
    assert!(eventually(Duration::from_secs(30), || proc_state(pid).is_none()));
}

macro_rules! parallel {
    ($($name:ident),*) => {$(
        #[tokio::test]
        async fn $name() {
            let n = line!() as u64;
            let mut a = procpool::spawn(square, (n,)).await.unwrap();
            let mut b = procpool::spawn(async_square, (n + 1,)).await.unwrap();
            assert_eq!(a.join().await.unwrap(), n * n);
            assert_eq!(b.join().await.unwrap(), (n + 1) * (n + 1));
        }
    )*};
}

parallel!(
    par_01, par_02, par_03, par_04, par_05, par_06, par_07, par_08, par_09, par_10, par_11, par_12,
    par_13, par_14, par_15, par_16, par_17, par_18, par_19, par_20
);
