//! The rows of the fault table (DESIGN.md §4) that apply to a lone `Process`, plus
//! reaping: no zombie, no orphan.

mod support;

use std::time::Duration;

use procpool::{Error, ExitReason, Process};
use support::{
    TempDir, eventually_async, hangs, is_dead, overflows, proc_state, segfaults, wait_for_file,
    write_file,
};

fn panics(msg: String) -> u8 {
    panic!("{msg}");
}

fn aborts() -> u8 {
    std::process::abort();
}

fn exits(code: i32) -> u8 {
    std::process::exit(code);
}

fn stops_itself() -> u8 {
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP)
        .expect("SIGSTOP to self");
    hangs()
}

async fn died(p: &mut Process<impl serde::de::DeserializeOwned>) -> (u32, ExitReason) {
    match p.join().await {
        Err(Error::WorkerDied {
            pid, reason, name, ..
        }) => {
            assert_eq!(name, p.name());
            (pid, reason)
        }
        Err(e) => panic!("expected WorkerDied, got {e:?}"),
        Ok(_) => panic!("expected WorkerDied, got a value"),
    }
}

#[tokio::test]
async fn panic_gives_message_and_location() {
    let mut p = procpool::spawn(panics, ("index 7 is out of range".to_string(),))
        .await
        .unwrap();
    match p.join().await {
        Err(Error::Panicked {
            message,
            location,
            name,
            ..
        }) => {
            assert_eq!(message, "index 7 is out of range");
            let loc = location.expect("location");
            assert!(loc.starts_with("tests/process_faults.rs:"), "{loc}");
            assert_eq!(name, p.name());
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(
        p.exitcode(),
        Some(1),
        "Python's exitcode after an exception"
    );
}

#[tokio::test]
async fn abort_is_worker_died_with_sigabrt() {
    let mut p = procpool::spawn(aborts, ()).await.unwrap();
    let (pid, reason) = died(&mut p).await;
    assert_eq!(Some(pid), p.pid());
    assert_eq!(reason, ExitReason::Signal(6));
    assert_eq!(p.exitcode(), Some(-6));
}

#[tokio::test]
async fn segfault_is_worker_died_with_sigsegv() {
    let mut p = procpool::spawn(segfaults, ()).await.unwrap();
    let (_, reason) = died(&mut p).await;
    assert_eq!(reason, ExitReason::Signal(11));
    assert!(!reason.is_stack_overflow());
    assert_eq!(p.exitcode(), Some(-11));
}

#[tokio::test]
async fn stack_overflow_is_worker_died_that_says_so() {
    let mut p = procpool::spawn(overflows, (0,)).await.unwrap();
    let err = p.join().await.expect_err("no value");
    assert!(err.to_string().contains("stack overflow"), "{err}");
    match err {
        Error::WorkerDied { reason, .. } => assert!(reason.is_stack_overflow(), "{reason}"),
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    assert_eq!(p.exitcode(), Some(77));
}

#[tokio::test]
async fn exit_is_worker_died_with_the_code() {
    let mut p = procpool::spawn(exits, (3,)).await.unwrap();
    let (_, reason) = died(&mut p).await;
    assert_eq!(reason, ExitReason::Code(3));
    assert_eq!(p.exitcode(), Some(3));
    // exit(0) before returning a value is a death too, not a value.
    let mut p = procpool::spawn(exits, (0,)).await.unwrap();
    assert_eq!(died(&mut p).await.1, ExitReason::Code(0));
}

#[tokio::test]
async fn sigkill_is_worker_died_with_minus_nine() {
    let mut p = procpool::spawn(hangs, ()).await.unwrap();
    p.kill().unwrap();
    let (_, reason) = died(&mut p).await;
    assert_eq!(reason, ExitReason::Signal(9));
    assert_eq!(p.exitcode(), Some(-9));
}

#[tokio::test]
async fn sigterm_is_worker_died_with_minus_fifteen() {
    let mut p = procpool::spawn(hangs, ()).await.unwrap();
    p.terminate().unwrap();
    let (_, reason) = died(&mut p).await;
    assert_eq!(reason, ExitReason::Signal(15));
    assert_eq!(p.exitcode(), Some(-15));
}

#[tokio::test]
async fn kill_stops_a_stopped_child_too() {
    let mut p = procpool::spawn(stops_itself, ()).await.unwrap();
    let pid = p.pid().unwrap();
    assert!(eventually_async(Duration::from_secs(30), || proc_state(pid) == Some('T')).await);
    p.kill().unwrap();
    assert_eq!(died(&mut p).await.1, ExitReason::Signal(9));
}

fn finish_after(release: String, done: String) -> u8 {
    wait_for_file(&release);
    write_file(&done, "done");
    5
}

#[tokio::test]
async fn dropping_an_unjoined_process_neither_kills_nor_leaves_a_zombie() {
    let dir = TempDir::new("drop");
    let (release, done) = (dir.path("release"), dir.path("done"));
    let p = procpool::spawn(finish_after, (release.clone(), done.clone()))
        .await
        .unwrap();
    let pid = p.pid().unwrap();
    drop(p);
    // Still running after the drop: it waits for the release and then finishes its work.
    assert_eq!(proc_state(pid).map(|s| s != 'Z'), Some(true));
    write_file(&release, "go");
    support::read_file_async(&done, Duration::from_secs(30)).await;
    // Reaped in the background: the pid disappears from /proc entirely (no zombie).
    assert!(
        eventually_async(Duration::from_secs(30), || proc_state(pid).is_none()).await,
        "child {pid} left in state {:?}",
        proc_state(pid)
    );
}

#[tokio::test]
async fn a_joined_child_is_reaped() {
    let mut p = procpool::spawn(exits, (0,)).await.unwrap();
    let pid = p.pid().unwrap();
    let _ = p.join().await;
    assert_eq!(
        proc_state(pid),
        None,
        "joined child must not linger as a zombie"
    );
    assert!(is_dead(pid));
}
