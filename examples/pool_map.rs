//! The seed's pool program: `pool.map(doubler, [5, 10, 20])`.
//!
//! ```text
//! cargo run --example pool_map
//! [10, 20, 40]
//! ```

use procpool::AsyncPool;

fn doubler(number: i64) -> i64 {
    number * 2
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let numbers = vec![5, 10, 20];
    let pool = AsyncPool::new(3).await?;
    let results = pool.map(doubler, numbers).await?;
    println!("{results:?}");
    pool.close().await;
    Ok(())
}
