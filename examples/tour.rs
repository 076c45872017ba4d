//! A tour of every feature built so far. Run it with
//!
//! ```text
//! cargo run --release --example tour
//! ```

use std::time::Duration;

use procpool::{Error, Process, current_process};

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
    Ok(())
}

fn report<T: std::fmt::Debug>(r: procpool::Result<T>) {
    match r {
        Ok(v) => println!("  ok: {v:?}"),
        Err(e @ Error::Panicked { .. }) => println!("  Panicked: {e}"),
        Err(e @ Error::WorkerDied { .. }) => println!("  WorkerDied: {e}"),
        Err(e) => println!("  error: {e}"),
    }
}
