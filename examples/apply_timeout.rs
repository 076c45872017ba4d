//! The seed's `apply_async(doubler, (25,))` with `get(timeout=1)`, then a hung task
//! stopped by its timeout while the pool keeps working.
//!
//! ```text
//! cargo run --example apply_timeout
//! 50
//! hung task: timed out after 500ms (a task still running at its limit was stopped; ...)
//! the pool still works: 42
//! ```

use std::time::Duration;

use procpool::AsyncPool;

fn doubler(number: i64) -> i64 {
    number * 2
}

fn hangs() -> i64 {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let pool = AsyncPool::new(3).await?;

    // Python: result = pool.apply_async(doubler, (25,)); print(result.get(timeout=1))
    let mut result = pool.apply_async(doubler, (25,));
    match tokio::time::timeout(Duration::from_secs(1), &mut result).await {
        Ok(value) => println!("{}", value?),
        Err(_) => println!("not ready after 1 s (still running; await it again later)"),
    }

    // Python cannot stop a task that hangs; here the timeout kills its worker.
    match pool
        .apply(hangs, ())
        .timeout(Duration::from_millis(500))
        .await
    {
        Ok(v) => println!("unexpected: {v}"),
        Err(e) => println!("hung task: {e}"),
    }
    println!(
        "the pool still works: {}",
        pool.apply(doubler, (21,)).await?
    );
    println!("workers replaced so far: {}", pool.stats().restarts);
    pool.close().await;
    Ok(())
}
