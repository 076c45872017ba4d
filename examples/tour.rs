//! A tour of every feature built so far. Run it with
//!
//! ```text
//! cargo run --release --example tour
//! ```

use std::time::Duration;

use futures::StreamExt;
use procpool::{AsyncPool, Error, Process, current_process};

fn doubler(number: i64) -> i64 {
    let result = number * 2;
    println!(
        "  {number} doubled to {result} by: {}",
        current_process().name()
    );
    result
}

fn divide(a: i32, b: i32) -> Result<i32, String> {
    if b == 0 {
        Err("division by zero".into())
    } else {
        Ok(a / b)
    }
}

async fn fetch_len(url: String) -> usize {
    tokio::time::sleep(Duration::from_millis(5)).await;
    url.len()
}

fn panics() -> u8 {
    let v: Vec<u8> = Vec::new();
    v[3]
}

fn aborts() -> u8 {
    std::process::abort()
}

fn hangs() -> u8 {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

async fn spawns_a_grandchild() -> String {
    let mut p = procpool::spawn(|| current_process().name().to_owned(), ())
        .await
        .expect("spawn grandchild");
    p.join().await.expect("join grandchild")
}

fn pool_worker_name(_: u8) -> String {
    current_process().name().to_owned()
}

fn unlucky(x: u32) -> u32 {
    if x == 3 {
        panic!("3 is unlucky");
    }
    x * 10
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    println!(
        "== Process: start, join, exitcode (parent is {})",
        current_process().name()
    );
    let mut procs = Vec::new();
    for n in [5, 10, 15] {
        let mut p = Process::new(doubler, (n,));
        p.start().await?;
        procs.push(p);
    }
    let mut p = Process::new(doubler, (2,)).with_name("Test");
    p.start().await?;
    procs.push(p);
    for p in &mut procs {
        let value = p.join().await?;
        println!(
            "  {} (pid {:?}) returned {value}, exitcode {:?}",
            p.name(),
            p.pid(),
            p.exitcode()
        );
    }

    println!("== Targets: closures, several arguments, async, Result not flattened");
    let mut p = procpool::spawn(|a: u32, b: u32, c: u32| a * b * c, (2, 3, 7)).await?;
    println!("  closure(2, 3, 7) = {}", p.join().await?);
    let mut p = procpool::spawn(fetch_len, ("https://example.org".to_string(),)).await?;
    println!("  async fetch_len = {}", p.join().await?);
    let mut p = procpool::spawn(divide, (1, 0)).await?;
    println!("  divide(1, 0) = {:?}", p.join().await?);

    println!("== Faults come back as errors, the parent carries on");
    let mut p = procpool::spawn(panics, ()).await?;
    report(p.join().await);
    let mut p = procpool::spawn(aborts, ()).await?;
    report(p.join().await);

    println!("== A hung child: join under a timeout, then kill");
    let mut p = procpool::spawn(hangs, ()).await?;
    println!("  active children: {:?}", procpool::active_children());
    if tokio::time::timeout(Duration::from_millis(200), p.join())
        .await
        .is_err()
    {
        println!("  still running after 200 ms: is_alive = {}", p.is_alive());
    }
    p.kill()?;
    report(p.join().await);
    println!("  exitcode {:?}", p.exitcode());

    println!("== Nested processes are named like Python's");
    let mut p = procpool::spawn(spawns_a_grandchild, ()).await?;
    let grandchild = p.join().await?;
    println!("  {} started {grandchild}", p.name());

    println!("== AsyncPool: map, apply, apply_async, starmap, imap");
    let pool = AsyncPool::new(2).await?;
    println!(
        "  map(doubler, [5, 10, 20]) = {:?}",
        pool.map(|x: i64| x * 2, vec![5, 10, 20]).await?
    );
    let mut names = pool.map(pool_worker_name, vec![0; 8]).chunksize(1).await?;
    names.sort();
    names.dedup();
    println!("  workers: {names:?}");
    println!(
        "  apply(divide, (7, 2)) = {:?}",
        pool.apply(divide, (7, 2)).await?
    );
    let handle = pool.apply_async(fetch_len, ("procpool".to_string(),));
    println!("  apply_async(fetch_len).await = {}", handle.await?);
    println!(
        "  starmap = {:?}",
        pool.starmap(|a: u32, b: u32| a * b, vec![(2, 3), (4, 5)])
            .await?
    );
    let per_item: Vec<String> = pool
        .imap(unlucky, 0..6)
        .map(|r| match r {
            Ok(v) => v.to_string(),
            Err(e) => format!("Err({})", e.to_string().split(": ").last().unwrap_or("")),
        })
        .collect()
        .await;
    println!("  imap(unlucky, 0..6) = {per_item:?} (an error is one item's, the stream goes on)");

    println!("== Pool faults: one task fails, the pool serves on");
    report(pool.apply(panics, ()).await);
    report(pool.apply(aborts, ()).await);
    report(
        pool.apply(hangs, ())
            .timeout(Duration::from_millis(200))
            .await,
    );
    let racing = tokio::select! {
        r = pool.apply(hangs, ()) => format!("{r:?}"),
        () = tokio::time::sleep(Duration::from_millis(100)) => "select! deadline won; the task was cancelled and its worker stopped".to_string(),
    };
    println!("  {racing}");
    println!(
        "  still serving: {}",
        pool.apply(|x: u8| x + 1, (41,)).await?
    );
    println!("  stats: {:?}", pool.stats());
    pool.close().await;
    println!("  after close: {:?}", pool.apply(|x: u8| x, (1,)).await);

    println!("== Logging: child tracing events in the parent, Python's log_to_stderr");
    procpool::log_to_stderr(tracing::Level::INFO)?;
    tracing::info!("the parent logs too");
    let mut p = procpool::spawn(logs_and_doubles, (21,)).await?;
    let value = p.join().await?;
    println!("  {} returned {value}", p.name());
    Ok(())
}

fn logs_and_doubles(x: u32) -> u32 {
    tracing::info!(x, "doubling");
    x * 2
}

fn report<T: std::fmt::Debug>(r: procpool::Result<T>) {
    match r {
        Ok(v) => println!("  ok: {v:?}"),
        Err(e @ Error::Panicked { .. }) => println!("  Panicked: {e}"),
        Err(e @ Error::WorkerDied { .. }) => println!("  WorkerDied: {e}"),
        Err(e) => println!("  error: {e}"),
    }
}
