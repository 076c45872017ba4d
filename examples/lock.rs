//! The seed's lock program: three processes print an item each, one at a time, under a
//! shared `Lock`.
//!
//! ```text
//! cargo run --release --example lock
//! tango
//! foxtrot
//! 10
//! ```
//!
//! The three processes run at once; the lock makes each print whole. (As in Python, the
//! order is whichever process gets the lock first; it is usually the start order.)

use procpool::{Lock, Process};
use serde::{Deserialize, Serialize};

/// The seed prints strings and a number: `items = ['tango', 'foxtrot', 10]`.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Item {
    Word(String),
    Number(i64),
}

fn printer(item: Item, lock: Lock) {
    let _guard = lock.blocking_lock().expect("the lock is reachable");
    match item {
        Item::Word(w) => println!("{w}"),
        Item::Number(n) => println!("{n}"),
    }
}

#[tokio::main]
async fn main() -> procpool::Result<()> {
    let lock = Lock::new();
    let items = [
        Item::Word("tango".into()),
        Item::Word("foxtrot".into()),
        Item::Number(10),
    ];
    let mut procs = Vec::new();
    for item in items {
        let mut p = Process::new(printer, (item, lock.clone()));
        p.start().await?;
        procs.push(p);
    }
    for mut p in procs {
        p.join().await?;
    }
    Ok(())
}
