//! The seed's naming program: one unused process, five numbered ones, one named `Test`.
//!
//! ```text
//! cargo run --release --example names
//! 5 doubled to 10 by: Process-2
//! 10 doubled to 20 by: Process-3
//! 15 doubled to 30 by: Process-4
//! 20 doubled to 40 by: Process-5
//! 25 doubled to 50 by: Process-6
//! 2 doubled to 4 by: Test
//! ```
//!
//! As in Python, the counter advances when a `Process` is created, not when it starts:
//! the unused first process takes `Process-1`.

use procpool::{Process, current_process};

fn doubler(number: i64) -> i64 {
    let result = number * 2;
    println!(
        "{number} doubled to {result} by: {}",
        current_process().name()
    );
    result
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let numbers = [5, 10, 15, 20, 25];
    let _unused = Process::new(doubler, (5,));
    for number in numbers {
        let mut proc = Process::new(doubler, (number,));
        proc.start().await?;
        // Joined in turn so the lines come out in the seed's order on a loaded machine.
        proc.join().await?;
    }
    let mut proc = Process::new(doubler, (2,)).with_name("Test");
    proc.start().await?;
    proc.join().await?;
    Ok(())
}
