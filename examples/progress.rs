//! A long map with a progress bar: `imap_unordered` hands each result over as soon as it
//! is ready, so the bar moves with the work (indicatif draws it on stderr, and hides it
//! when stderr is not a terminal).
//!
//! ```text
//! cargo run --release --example progress
//!   [00:00:02] ########################-------- 1480/2000 primes counted
//! 2000 ranges, 148933 primes below 2000000
//! ```

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use procpool::AsyncPool;

const RANGES: u64 = 2_000;
const WIDTH: u64 = 1_000;

/// CPU work in a worker: the primes in `[start, start + WIDTH)`.
fn count_primes(start: u64) -> u64 {
    (start..start + WIDTH).filter(|&n| is_prime(n)).count() as u64
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let pool = AsyncPool::new(num_cpus()).await?;
    let bar = ProgressBar::new(RANGES).with_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:32} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.set_message("primes counted");
    let starts = (0..RANGES).map(|i| i * WIDTH);
    let mut results = pool.imap_unordered(count_primes, starts);
    let mut total = 0;
    while let Some(r) = results.next().await {
        total += r?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{RANGES} ranges, {total} primes below {}", RANGES * WIDTH);
    pool.close().await;
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
