//! `Value` and `Array` in shared memory across real processes (DESIGN.md §11): atomic
//! updates that lose nothing, indexed and slice access with typed errors past the end,
//! through pool tasks, and a holder killed while it holds the lock.

mod support;

use std::time::Duration;

use procpool::{Array, AsyncPool, Error, Event, Value};
use support::{hangs, soon};

fn add(counter: Value<i64>, n: i64) {
    for _ in 0..n {
        counter.update(|x| x + 1).unwrap();
    }
}

#[tokio::test]
async fn four_processes_of_ten_thousand_increments_lose_nothing() {
    let counter = Value::new(0i64);
    let mut procs = Vec::new();
    for _ in 0..4 {
        procs.push(
            procpool::spawn(add, (counter.clone(), 10_000))
                .await
                .unwrap(),
        );
    }
    for p in &mut procs {
        soon(p.join()).await.unwrap();
    }
    assert_eq!(counter.get().unwrap(), 40_000);
    // The guard: a read-modify-write of its own.
    *counter.lock().unwrap() -= 1;
    assert_eq!(counter.get().unwrap(), 39_999);
    counter.set(7).unwrap();
    assert_eq!(format!("{counter:?}"), "Value { value: 7 }");
}

/// From a child: what it reads, its errors past the end, then its writes.
fn use_array(a: Array<u32>) -> (Vec<u32>, String, String, bool) {
    let seen = a.to_vec().unwrap();
    let past = a.get(4).unwrap_err().to_string();
    let past_write = a.write(3, &[1, 2]).unwrap_err().to_string();
    a.set(0, 10).unwrap();
    a.write(1, &[11, 12]).unwrap();
    a.update(3, |x| x + 100).unwrap();
    let bad_range = matches!(
        a.read(3..5),
        Err(Error::OutOfBounds {
            index: 4,
            len: 4,
            ..
        })
    );
    (seen, past, past_write, bad_range)
}

#[tokio::test]
async fn an_array_is_read_and_written_by_index_and_slice_from_a_child() {
    let a = Array::from_slice(&[1u32, 2, 3, 4]).unwrap();
    assert_eq!(a.len(), 4);
    let mut p = procpool::spawn(use_array, (a.clone(),)).await.unwrap();
    let (seen, past, past_write, bad_range) = soon(p.join()).await.unwrap();
    assert_eq!(seen, [1, 2, 3, 4]);
    assert_eq!(past, "index 4 is out of bounds: the array has 4 elements");
    assert_eq!(past_write, past);
    assert!(bad_range);
    assert_eq!(a.to_vec().unwrap(), [10, 11, 12, 104]);
    assert_eq!(a.read(1..3).unwrap(), [11, 12]);
    assert!(matches!(
        a.set(usize::MAX, 0),
        Err(Error::OutOfBounds { .. })
    ));
    let zeros: Array<f64> = Array::new(3);
    assert_eq!(zeros.to_vec().unwrap(), [0.0; 3]);
}

fn square_into(i: usize, a: Array<u64>, total: Value<u64>) -> usize {
    let sq = u64::try_from(i * i).unwrap();
    a.set(i, sq).unwrap();
    total.update(|t| t + sq).unwrap();
    i
}

#[tokio::test]
async fn pool_workers_fill_an_array_and_sum_into_a_value() {
    let pool = AsyncPool::new(2).await.unwrap();
    let a: Array<u64> = Array::new(100);
    let total = Value::new(0u64);
    let items = (0..100).map(|i| (i, a.clone(), total.clone()));
    let done = soon(pool.starmap(square_into, items)).await.unwrap();
    assert_eq!(done, (0..100).collect::<Vec<_>>());
    let want: Vec<u64> = (0..100).map(|i| i * i).collect();
    assert_eq!(a.to_vec().unwrap(), want);
    assert_eq!(total.get().unwrap(), want.iter().sum::<u64>());
    pool.close().await;
}

fn hold_half_written(v: Value<[u64; 2]>, held: Event) {
    let mut g = v.lock().unwrap();
    g[0] = 1;
    held.set().unwrap();
    hangs();
}

fn wait_for_it(v: Value<[u64; 2]>, waiting: Event) -> (bool, [u64; 2]) {
    waiting.set().unwrap();
    let g = v.lock().unwrap();
    (g.abandoned(), *g)
}

#[tokio::test]
async fn a_holder_killed_inside_the_lock_does_not_block_the_others_who_are_told() {
    let v = Value::new([0u64, 0]);
    let held = Event::new();
    let mut holder = procpool::spawn(hold_half_written, (v.clone(), held.clone()))
        .await
        .unwrap();
    soon(held.wait()).await.unwrap();
    let waiting = Event::new();
    let mut next = procpool::spawn(wait_for_it, (v.clone(), waiting.clone()))
        .await
        .unwrap();
    soon(waiting.wait()).await.unwrap();
    holder.kill().unwrap();
    assert!(matches!(holder.join().await, Err(Error::WorkerDied { .. })));
    let (abandoned, seen) = soon(next.join()).await.unwrap();
    assert!(abandoned, "the next holder is told");
    assert_eq!(seen, [1, 0], "as the dead holder left it");
    // Free again, and no longer marked.
    let g = tokio::time::timeout(Duration::from_secs(10), async { v.lock().unwrap() })
        .await
        .unwrap();
    assert!(!g.abandoned());
}
