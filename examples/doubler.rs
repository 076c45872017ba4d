//! The seed's first program: five processes, each doubling a number.
//!
//! ```text
//! cargo run --example doubler
//! 5 doubled to 10 by process id: 10468
//! ...
//! ```

use procpool::Process;

fn doubler(number: i64) -> i64 {
    let result = number * 2;
    println!(
        "{number} doubled to {result} by process id: {}",
        std::process::id()
    );
    result
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let numbers = [5, 10, 15, 20, 25];
    let mut procs = Vec::new();
    for number in numbers {
        let mut proc = Process::new(doubler, (number,));
        proc.start().await?;
        procs.push(proc);
    }
    for proc in &mut procs {
        proc.join().await?;
    }
    Ok(())
}
