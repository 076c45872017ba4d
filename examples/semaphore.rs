//! A semaphore limits concurrent downloads to 3: eight processes each "download" (a
//! short sleep) while holding a permit, and report how many held one at that moment.
//!
//! ```text
//! cargo run --release --example semaphore
//! ```

use std::time::Duration;

use procpool::{Semaphore, Value, current_process};

fn download(slots: Semaphore, active: Value<u32>, url: String) -> u32 {
    let _permit = slots
        .blocking_acquire()
        .expect("the semaphore is reachable");
    let now = active.update(|n| n + 1).expect("shared memory");
    println!(
        "{} downloads {url} ({now} at once)",
        current_process().name()
    );
    std::thread::sleep(Duration::from_millis(50));
    active.update(|n| n - 1).expect("shared memory");
    now
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let slots = Semaphore::new(3);
    let active = Value::new(0u32);
    let mut procs = Vec::new();
    for i in 0..8 {
        let url = format!("https://example.org/file-{i}");
        procs.push(procpool::spawn(download, (slots.clone(), active.clone(), url)).await?);
    }
    let mut most = 0;
    for p in &mut procs {
        most = most.max(p.join().await?);
    }
    println!("at most {most} downloads ran at once");
    Ok(())
}
