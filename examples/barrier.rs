//! A barrier of 4 worker processes: each prepares, waits for the others, then goes on;
//! the last to arrive is the leader of the round.
//!
//! ```text
//! cargo run --release --example barrier
//! ```

use procpool::{Barrier, Queue, current_process};

fn worker(barrier: Barrier, log: Queue<String>) {
    let me = current_process().name().to_owned();
    log.blocking_put(format!("{me} prepared"))
        .expect("the parent keeps the queue");
    let r = barrier.blocking_wait().expect("nobody breaks the barrier");
    let role = if r.is_leader() {
        " (leader: arrived last)"
    } else {
        ""
    };
    log.blocking_put(format!("{me} passed the barrier{role}"))
        .expect("the parent keeps the queue");
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let barrier = Barrier::new(4);
    let log = Queue::new();
    let mut procs = Vec::new();
    for _ in 0..4 {
        procs.push(procpool::spawn(worker, (barrier.clone(), log.clone())).await?);
    }
    for p in &mut procs {
        p.join().await?;
    }
    // Every "prepared" comes before every "passed": nobody went on early.
    while let Some(line) = log.try_get()? {
        println!("{line}");
    }
    Ok(())
}
