//! Soak: many pool lifecycles and many cancelled or timed-out tasks must leave this
//! process as it was: the same open fds, threads, child processes and (about) the same
//! resident memory.
//!
//! ```sh
//! cargo run --release --example soak            # 1,000 cycles, 10,000 tasks
//! cargo run --release --example soak -- 100 1000
//! ```
//!
//! Prints one line per phase with the counts before and after, and exits with an error
//! if a count grew (fds, threads, children) or the resident set grew by more than 16 MiB.

use std::time::Duration;

use procpool::AsyncPool;

fn doubler(x: i64) -> i64 {
    x * 2
}

fn naps(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Census {
    fds: usize,
    threads: usize,
    children: usize,
    rss_kib: u64,
}

fn census() -> Census {
    let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count());
    let me = std::process::id();
    let children = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(") ")?.1.to_owned();
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(me)
        })
        .count();
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    Census {
        fds: count("/proc/self/fd"),
        threads: count("/proc/self/task"),
        children,
        rss_kib,
    }
}

/// Waits (up to 10 s) until the children are reaped and the fds closed down to
/// `baseline`'s (a stopped worker is reaped, and its pidfd and channel closed, by the
/// service thread a moment after the call that stopped it returns).
async fn settle(want_children: usize, baseline: Option<Census>) -> Census {
    for _ in 0..1000 {
        let c = census();
        if c.children <= want_children && baseline.is_none_or(|b| c.fds <= b.fds) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    census()
}

fn report(phase: &str, before: Census, after: Census) -> bool {
    let grew_rss = after.rss_kib.saturating_sub(before.rss_kib);
    println!(
        "{phase}: fds {} -> {}, threads {} -> {}, children {} -> {}, RSS {} -> {} KiB",
        before.fds,
        after.fds,
        before.threads,
        after.threads,
        before.children,
        after.children,
        before.rss_kib,
        after.rss_kib
    );
    let ok = after.fds <= before.fds
        && after.threads <= before.threads
        && after.children <= before.children
        && grew_rss <= 16 * 1024;
    if !ok {
        println!("{phase}: GREW; open fds now:");
        for e in std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
        {
            let to = std::fs::read_link(e.path()).unwrap_or_default();
            println!("  {} -> {}", e.file_name().to_string_lossy(), to.display());
        }
    }
    ok
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let mut args = std::env::args().skip(1);
    let cycles: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);

    // Warm-up: the service threads, the hub and the allocator's arenas exist from here.
    {
        let pool = AsyncPool::new(2).await?;
        pool.map(doubler, 0..1000).await?;
        pool.terminate().await;
    }
    let mut ok = true;

    let before = settle(0, None).await;
    for i in 0..cycles {
        let pool = AsyncPool::new(2).await?;
        let out = pool.map(doubler, 0..100).await?;
        assert_eq!(out[99], 198, "cycle {i}");
        pool.terminate().await;
    }
    let after = settle(0, Some(before)).await;
    ok &= report(
        &format!("{cycles} build/map/terminate cycles"),
        before,
        after,
    );

    let pool = AsyncPool::builder().processes(2).build().await?;
    pool.apply(doubler, (1,)).await?;
    let before = settle(2, None).await;
    let mut timed_out = 0;
    let mut cancelled = 0;
    for i in 0..tasks {
        if i % 2 == 0 {
            // Times out while running: its worker is stopped and replaced.
            let r = pool
                .apply(naps, (1000,))
                .timeout(Duration::from_millis(1))
                .await;
            timed_out += usize::from(r.is_err());
        } else {
            // Dropped while queued or sent ahead.
            let h = pool.apply_async(naps, (1000,));
            drop(h);
            cancelled += 1;
        }
    }
    // The pool still serves, and its workers were all replaced and reaped.
    assert_eq!(pool.apply(doubler, (21,)).await?, 42);
    let after = settle(2, Some(before)).await;
    ok &= report(
        &format!("{tasks} tasks ({timed_out} timed out, {cancelled} cancelled)"),
        before,
        after,
    );
    println!("{:?}", pool.stats());
    pool.close().await;
    if !ok {
        return Err(procpool::Error::Io(std::io::Error::other(
            "a count grew: see above",
        )));
    }
    Ok(())
}
