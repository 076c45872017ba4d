//! A service that drains its pool on Ctrl-C (or SIGTERM): it stops taking requests,
//! lets the tasks in flight finish and hands their answers over, then closes the pool,
//! which reaps every worker. Nothing is lost and nothing is left behind.
//!
//! Run it and press Ctrl-C, or let it send itself the SIGINT (it does after the first
//! three answers unless given `--wait`):
//!
//! ```text
//! cargo run --release --example shutdown
//! answered job 0
//! ...
//! SIGINT: draining 4 tasks in flight
//! answered job 5
//! ...
//! drained: 9 of 9 tasks answered; workers reaped
//! ```
//!
//! Under systemd use `KillMode=mixed`, so the SIGTERM reaches this process alone and
//! the workers finish their tasks (see the crate docs, Graceful shutdown).

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use procpool::AsyncPool;
use tokio::signal::unix::{SignalKind, signal};

/// A request's work, in a worker process.
fn job(n: u32) -> u32 {
    std::thread::sleep(Duration::from_millis(200));
    n
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let wait_for_user = std::env::args().any(|a| a == "--wait");
    let pool = AsyncPool::new(2).await?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;

    // Requests keep coming (one every 50 ms) until the signal; each is a task.
    let mut in_flight = FuturesUnordered::new();
    let mut requests = tokio::time::interval(Duration::from_millis(50));
    let (mut submitted, mut answered) = (0u32, 0u32);
    let signal_name = loop {
        tokio::select! {
            _ = requests.tick() => {
                in_flight.push(pool.apply_async(job, (submitted,)));
                submitted += 1;
            }
            Some(r) = in_flight.next() => {
                println!("answered job {}", r?);
                answered += 1;
                if answered == 3 && !wait_for_user {
                    // As if the user pressed Ctrl-C now.
                    let me = std::process::id().to_string();
                    std::process::Command::new("kill").args(["-INT", &me]).status()?;
                }
            }
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
        }
    };

    println!(
        "{signal_name}: draining {} tasks in flight",
        in_flight.len()
    );
    while let Some(r) = in_flight.next().await {
        println!("answered job {}", r?);
        answered += 1;
    }
    pool.close().await;
    println!("drained: {answered} of {submitted} tasks answered; workers reaped");
    Ok(())
}
