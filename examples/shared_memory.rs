//! Python's "Sharing state between processes: shared memory" example, with `Value` and
//! `Array`, then a counter that four processes increment at once.
//!
//! ```text
//! cargo run --release --example shared_memory
//! 3.1415927
//! [0, -1, -2, -3, -4, -5, -6, -7, -8, -9]
//! 40000
//! ```

use procpool::{Array, Process, Value};

// Python's example sets this literal (not `std::f64::consts::PI`).
#[allow(clippy::approx_constant)]
fn f(n: Value<f64>, a: Array<i32>) {
    n.set(3.1415927).expect("shared memory");
    let mut all = a.lock().expect("shared memory");
    for x in all.iter_mut() {
        *x = -*x;
    }
}

fn count(counter: Value<u64>, times: u32) {
    for _ in 0..times {
        counter.update(|c| c + 1).expect("shared memory");
    }
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let num = Value::new(0.0f64);
    let arr = Array::from_slice(&(0..10).collect::<Vec<i32>>())?;
    let mut p = Process::new(f, (num.clone(), arr.clone()));
    p.start().await?;
    p.join().await?;
    println!("{}", num.get()?);
    println!("{:?}", arr.to_vec()?);

    let counter = Value::new(0u64);
    let mut procs = Vec::new();
    for _ in 0..4 {
        procs.push(procpool::spawn(count, (counter.clone(), 10_000)).await?);
    }
    for p in &mut procs {
        p.join().await?;
    }
    println!("{}", counter.get()?);
    Ok(())
}
