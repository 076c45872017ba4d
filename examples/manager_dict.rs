//! A Manager's dict filled by pool workers (Python's `Manager().dict()` example): each
//! task puts its square in the dict and counts itself in a shared tally, and the parent
//! reads it all back.
//!
//! ```text
//! cargo run --release --example manager_dict
//! [(0, 0), (1, 1), (2, 4), (3, 9), (4, 16), (5, 25), (6, 36), (7, 49)]
//! tally: 8
//! ```

use procpool::{AsyncPool, Dict};

fn square_into(x: u32, squares: Dict<u32, u32>, tally: Dict<String, u32>) -> u32 {
    squares
        .blocking_insert(x, x * x)
        .expect("the parent keeps the dict");
    tally
        .blocking_update("tasks".to_owned(), |n| n.unwrap_or(0) + 1)
        .expect("the parent keeps the dict");
    x
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let pool = AsyncPool::new(2).await?;
    let (squares, tally) = (Dict::new(), Dict::new());
    let args = (0..8).map(|x| (x, squares.clone(), tally.clone()));
    pool.starmap(square_into, args).await?;
    let mut items = squares.items().await?;
    items.sort_unstable();
    println!("{items:?}");
    println!("tally: {}", tally.get("tasks").await?.unwrap_or(0));
    pool.close().await;
    Ok(())
}
