//! Child `tracing` events reach the parent's subscriber with the child's name and pid,
//! in order, at the parent's level, even right before the child dies.

mod support;

#[path = "support/capture.rs"]
mod capture_support;

use capture_support::{capture, events_of, events_where};
use procpool::{AsyncPool, Error, Process};
use tracing::Level;

fn greets() -> (bool, bool) {
    tracing::warn!(answer = 42, "hello from the child");
    tracing::debug!("too verbose for the parent");
    (
        tracing::enabled!(Level::INFO),
        tracing::enabled!(Level::DEBUG),
    )
}

#[tokio::test]
async fn an_event_reaches_the_parent_with_name_pid_level_and_message() {
    capture();
    let mut p = Process::new(greets, ()).with_name("greeter");
    p.start().await.unwrap();
    let (info, debug) = p.join().await.unwrap();
    // The child's level follows the parent's filter: DEBUG is disabled there.
    assert!(info && !debug, "info {info}, debug {debug}");
    let evs = events_of("greeter");
    let hello = evs
        .iter()
        .find(|e| e.message == "hello from the child")
        .unwrap_or_else(|| panic!("not forwarded: {evs:?}"));
    assert_eq!(hello.level, "WARN");
    assert_eq!(hello.target, "log_forward", "its own target");
    assert_eq!(hello.pid, u64::from(p.pid().unwrap()));
    assert_eq!(hello.child_target, "log_forward");
    assert_eq!(hello.fields, "answer=42");
    assert!(
        evs.iter()
            .all(|e| e.message != "too verbose for the parent")
    );
    // Python's lifecycle lines, in order.
    let lifecycle: Vec<&str> = evs
        .iter()
        .filter(|e| e.message.contains("process") && !e.message.contains("hello"))
        .inspect(|e| {
            // Their own target, apart from the crate's other events.
            assert_eq!(e.child_target, "procpool::lifecycle", "{e:?}");
        })
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(
        lifecycle,
        [
            "child process calling self.run()",
            "process shutting down",
            "process exiting with exitcode 0"
        ]
    );
}

fn chatty(n: u32) -> u32 {
    for i in 0..n {
        tracing::info!(seq = i, "event {i}");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_from_four_children_arrive_complete_and_in_order() {
    capture();
    let mut procs = Vec::new();
    for _ in 0..4 {
        let mut p = Process::new(chatty, (2500,));
        p.start().await.unwrap();
        procs.push(p);
    }
    for p in &mut procs {
        assert_eq!(p.join().await.unwrap(), 2500);
    }
    for p in &procs {
        let seqs: Vec<String> = events_of(p.name())
            .into_iter()
            .filter(|e| e.message.starts_with("event "))
            .map(|e| e.message)
            .collect();
        let want: Vec<String> = (0..2500).map(|i| format!("event {i}")).collect();
        assert_eq!(seqs.len(), 2500, "{} lost events", p.name());
        assert_eq!(seqs, want, "{} out of order", p.name());
    }
}

fn last_words_then(how: u8) -> u8 {
    tracing::error!("last words before {how}");
    match how {
        0 => panic!("boom"),
        1 => std::process::exit(3),
        _ => std::process::abort(),
    }
}

#[tokio::test]
async fn events_just_before_a_panic_exit_or_abort_arrive() {
    capture();
    for how in 0..3u8 {
        let mut p = Process::new(last_words_then, (how,));
        p.start().await.unwrap();
        let r = p.join().await;
        assert!(
            matches!(r, Err(Error::Panicked { .. } | Error::WorkerDied { .. })),
            "{r:?}"
        );
        let evs = events_of(p.name());
        assert!(
            evs.iter()
                .any(|e| e.message == format!("last words before {how}")),
            "case {how}: {evs:?}"
        );
    }
}

fn work_and_log(x: u32) -> u32 {
    tracing::info!(x, "working");
    x
}

#[tokio::test]
async fn pool_workers_forward_too() {
    capture();
    let pool = AsyncPool::new(1).await.unwrap();
    let worker_pid = pool.apply(std::process::id, ()).await.unwrap();
    assert_eq!(pool.apply(work_and_log, (7,)).await.unwrap(), 7);
    let evs = events_where(|e| e.pid == u64::from(worker_pid) && e.message == "working");
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert!(evs[0].process.starts_with("PoolWorker-"));
    assert_eq!(evs[0].fields, "x=7");
}

/// What examples/logging.rs prints on stderr, and with its stdout if `with_output`.
fn logging_example_lines(with_output: bool) -> Vec<String> {
    let mut want = vec!["[INFO/MainProcess] starting 3 printers".to_string()];
    for (n, item) in [(1, "tango"), (2, "foxtrot"), (3, "10")] {
        want.push(format!(
            "[INFO/Process-{n}] child process calling self.run()"
        ));
        if with_output {
            want.push(item.to_string());
        }
        want.push(format!("[INFO/Process-{n}] printed {item}"));
        want.push(format!("[INFO/Process-{n}] process shutting down"));
        want.push(format!(
            "[INFO/Process-{n}] process exiting with exitcode 0"
        ));
    }
    want
}

#[test]
fn log_to_stderr_prints_pythons_format_line_by_line() {
    let out = std::process::Command::new(support::example_bin("logging"))
        .output()
        .expect("run the logging example");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tango\nfoxtrot\n10\n");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let want = logging_example_lines(false);
    assert_eq!(stderr.lines().collect::<Vec<_>>(), want);
}

#[test]
fn with_log_to_stderr_a_childs_lines_keep_program_order_with_its_output() {
    // stdout and stderr into one pipe, as on a terminal.
    let bin = support::example_bin("logging");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{}' 2>&1", bin.display()))
        .output()
        .expect("run the logging example");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let want = logging_example_lines(true);
    assert_eq!(text.lines().collect::<Vec<_>>(), want);
}

#[test]
fn log_to_stderr_twice_is_an_error_not_a_panic() {
    capture(); // a global subscriber is now set
    assert!(matches!(
        procpool::log_to_stderr(Level::INFO),
        Err(Error::InvalidConfig { .. })
    ));
}
