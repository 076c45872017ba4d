//! The seed's queue program: a creator puts numbers on a queue, a consumer takes them
//! until the sentinel `-1`, each in its own process.
//!
//! ```text
//! cargo run --release --example queue
//! Creating data and putting it on the queue
//! data found to be processed: 5
//! 10
//! data found to be processed: 10
//! 20
//! data found to be processed: 13
//! 26
//! data found to be processed: -1
//! -2
//! ```

use procpool::{Process, Queue};

const SENTINEL: i64 = -1;

fn creator(data: Vec<i64>, q: Queue<i64>) {
    println!("Creating data and putting it on the queue");
    for item in data {
        q.blocking_put(item).expect("the queue is open");
    }
}

fn my_consumer(q: Queue<i64>) {
    loop {
        let data = q.blocking_get().expect("the queue is open");
        println!("data found to be processed: {data}");
        let processed = data * 2;
        println!("{processed}");
        if data == SENTINEL {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let q = Queue::new();
    let data = vec![5, 10, 13, -1];
    let mut process_one = Process::new(creator, (data, q.clone()));
    let mut process_two = Process::new(my_consumer, (q.clone(),));
    process_one.start().await?;
    // The consumer starts once the creator has put everything, so its line comes
    // first, as in the seed's output.
    process_one.join().await?;
    process_two.start().await?;
    process_two.join().await?;
    Ok(())
}
