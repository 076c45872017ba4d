//! The seed programs, run as a user runs them: their stdout is checked line by line.
//! This also proves a child's `println!` reaches the parent's stdout.

mod support;

use std::process::Command;

fn run(name: &str) -> String {
    let out = Command::new(support::example_bin(name))
        .output()
        .expect("run example");
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn names_prints_exactly_the_seeds_names() {
    assert_eq!(
        run("names"),
        "5 doubled to 10 by: Process-2\n\
         10 doubled to 20 by: Process-3\n\
         15 doubled to 30 by: Process-4\n\
         20 doubled to 40 by: Process-5\n\
         25 doubled to 50 by: Process-6\n\
         2 doubled to 4 by: Test\n"
    );
}

#[test]
fn doubler_prints_from_five_child_processes() {
    let out = run("doubler");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_by_key(|l| l.split(' ').next().and_then(|n| n.parse::<u32>().ok()));
    assert_eq!(lines.len(), 5, "{out}");
    let mut pids = std::collections::HashSet::new();
    for (line, n) in lines.iter().zip([5, 10, 15, 20, 25]) {
        let prefix = format!("{n} doubled to {} by process id: ", n * 2);
        let pid = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        pids.insert(pid.parse::<u32>().expect("pid"));
    }
    assert_eq!(
        pids.len(),
        5,
        "each number is doubled by its own process: {out}"
    );
}

#[test]
fn queue_prints_the_seeds_lines_in_order() {
    assert_eq!(
        run("queue"),
        "Creating data and putting it on the queue\n\
         data found to be processed: 5\n10\n\
         data found to be processed: 10\n20\n\
         data found to be processed: 13\n26\n\
         data found to be processed: -1\n-2\n"
    );
}

#[test]
fn lock_prints_each_item_whole() {
    let out = run("lock");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["10", "foxtrot", "tango"], "{out}");
}

#[test]
fn pipe_sends_and_receives_each_message_in_order() {
    let out = run("pipe");
    let sent: Vec<&str> = out.lines().filter(|l| l.starts_with("Sent")).collect();
    let received: Vec<&str> = out.lines().filter(|l| l.starts_with("Received")).collect();
    assert_eq!(
        sent,
        ["START", "hello", "world", "END"].map(|m| format!("Sent the message: {m}"))
    );
    assert_eq!(
        received,
        ["START", "hello", "world"].map(|m| format!("Received the message: {m}"))
    );
    assert_eq!(out.lines().count(), 7, "{out}");
}

#[test]
fn shared_memory_prints_pythons_output_and_a_counter_that_lost_nothing() {
    assert_eq!(
        run("shared_memory"),
        "3.1415927\n[0, -1, -2, -3, -4, -5, -6, -7, -8, -9]\n40000\n"
    );
}

#[test]
fn semaphore_lets_at_most_three_download_at_once() {
    let out = run("semaphore");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 9, "{out}");
    assert_eq!(lines[8], "at most 3 downloads ran at once", "{out}");
}

#[test]
fn barrier_lets_nobody_pass_before_all_four_prepared() {
    let out = run("barrier");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert!(lines[..4].iter().all(|l| l.ends_with(" prepared")), "{out}");
    assert!(
        lines[4..].iter().all(|l| l.contains(" passed the barrier")),
        "{out}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("leader")).count(),
        1,
        "{out}"
    );
}

#[test]
fn manager_dict_is_filled_by_pool_workers() {
    assert_eq!(
        run("manager_dict"),
        "[(0, 0), (1, 1), (2, 4), (3, 9), (4, 16), (5, 25), (6, 36), (7, 49)]\ntally: 8\n"
    );
}

#[test]
fn progress_counts_every_range_once() {
    // 148,933 primes below 2,000,000: each of the 2,000 ranges answered exactly once.
    assert_eq!(
        run("progress"),
        "2000 ranges, 148933 primes below 2000000\n"
    );
}

#[test]
fn shutdown_answers_every_task_in_flight_before_it_ends() {
    let out = run("shutdown");
    let lines: Vec<&str> = out.lines().collect();
    let drained = lines
        .iter()
        .position(|l| l.starts_with("SIGINT: draining "));
    let drained = drained.unwrap_or_else(|| panic!("no drain line: {out}"));
    let answered: Vec<u32> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("answered job "))
        .map(|n| n.parse().expect("a job number"))
        .collect();
    assert!(drained >= 3, "three answers before the signal: {out}");
    let last = lines.last().copied().unwrap_or_default();
    let n = answered.len();
    assert_eq!(
        last,
        format!("drained: {n} of {n} tasks answered; workers reaped"),
        "{out}"
    );
    let mut sorted = answered.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..n as u32).collect::<Vec<_>>(),
        "each job answered once: {out}"
    );
}

#[test]
fn metrics_counts_the_faults_it_went_through() {
    let out = run("metrics");
    let done = out
        .split("# sample once done\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no final sample: {out}"));
    let value = |name: &str| -> u64 {
        done.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}: {out}"))
            .parse()
            .expect("a number")
    };
    // The map's chunks, then the panic, the crash and the timeout: the totals add up.
    let submitted = value("procpool_submitted_total");
    let (completed, failed) = (
        value("procpool_completed_total"),
        value("procpool_failed_total"),
    );
    let cancelled = value("procpool_cancelled_total");
    assert_eq!(
        value("procpool_queued") + value("procpool_running"),
        0,
        "{out}"
    );
    assert_eq!(submitted, completed + failed + cancelled, "{out}");
    assert!(completed >= 1 && failed == 2 && cancelled == 1, "{out}");
    assert!(
        value("procpool_restarts_total") >= 1,
        "the crash at least (the timed-out worker may still be on its way out): {out}"
    );
}
