//! `Dict<K, V>` across real processes (DESIGN.md §11): every method from the owner and
//! from a child (async, and blocking from a plain sync target), `update` atomic across
//! four processes, an updater killed (or hung) in its closure blocks nobody and wrote
//! nothing, a value of the wrong type is `Error::Decode`, dropped calls, and a dict filled
//! by pool workers.

mod support;

use futures::FutureExt;
use procpool::{AsyncPool, Dict, Error, Event, Queue};
use support::{hangs, soon};

type Map = Dict<String, i64>;

/// The same calls, in the same order, and what they said, for any process: every
/// method, async.
async fn exercise_async(d: Map, tag: String) -> Vec<String> {
    let k = |s: &str| format!("{tag}{s}");
    let mut said = Vec::new();
    said.push(format!("{:?}", d.insert(k("a"), 1).await.unwrap()));
    said.push(format!("{:?}", d.insert(k("b"), 2).await.unwrap()));
    said.push(format!("{:?}", d.insert(k("a"), 10).await.unwrap()));
    said.push(format!("{:?}", d.get(&k("a")).await.unwrap()));
    said.push(format!("{:?}", d.get(k("none").as_str()).await.unwrap()));
    said.push(format!("{}", d.contains_key(&k("b")).await.unwrap()));
    said.push(format!("{}", d.contains_key(&k("none")).await.unwrap()));
    said.push(format!("{}", d.len().await.unwrap()));
    said.push(format!("{}", d.is_empty().await.unwrap()));
    said.push(format!("{:?}", d.keys().await.unwrap()));
    said.push(format!("{:?}", d.values().await.unwrap()));
    said.push(format!("{:?}", d.items().await.unwrap()));
    said.push(format!(
        "{:?}",
        d.update(k("a"), |v| v.unwrap() + 5).await.unwrap()
    ));
    said.push(format!(
        "{:?}",
        d.update(k("c"), |v| v.unwrap_or(100)).await.unwrap()
    ));
    said.push(format!("{:?}", d.remove(&k("b")).await.unwrap()));
    said.push(format!("{:?}", d.remove(&k("b")).await.unwrap()));
    said.push(format!("{:?}", d.items().await.unwrap()));
    d.clear().await.unwrap();
    said.push(format!(
        "{} {}",
        d.len().await.unwrap(),
        d.is_empty().await.unwrap()
    ));
    d.insert(k("kept"), 7).await.unwrap();
    said
}

/// As [`exercise_async`], with the blocking methods: a plain target, no runtime.
fn exercise_blocking(d: Map, tag: String) -> Vec<String> {
    let k = |s: &str| format!("{tag}{s}");
    let mut said = Vec::new();
    said.push(format!("{:?}", d.blocking_insert(k("a"), 1).unwrap()));
    said.push(format!("{:?}", d.blocking_insert(k("b"), 2).unwrap()));
    said.push(format!("{:?}", d.blocking_insert(k("a"), 10).unwrap()));
    said.push(format!("{:?}", d.blocking_get(&k("a")).unwrap()));
    said.push(format!("{:?}", d.blocking_get(k("none").as_str()).unwrap()));
    said.push(format!("{}", d.blocking_contains_key(&k("b")).unwrap()));
    said.push(format!("{}", d.blocking_contains_key(&k("none")).unwrap()));
    said.push(format!("{}", d.blocking_len().unwrap()));
    said.push(format!("{}", d.blocking_is_empty().unwrap()));
    said.push(format!("{:?}", d.blocking_keys().unwrap()));
    said.push(format!("{:?}", d.blocking_values().unwrap()));
    said.push(format!("{:?}", d.blocking_items().unwrap()));
    said.push(format!(
        "{:?}",
        d.blocking_update(k("a"), |v| v.unwrap() + 5).unwrap()
    ));
    said.push(format!(
        "{:?}",
        d.blocking_update(k("c"), |v| v.unwrap_or(100)).unwrap()
    ));
    said.push(format!("{:?}", d.blocking_remove(&k("b")).unwrap()));
    said.push(format!("{:?}", d.blocking_remove(&k("b")).unwrap()));
    said.push(format!("{:?}", d.blocking_items().unwrap()));
    d.blocking_clear().unwrap();
    said.push(format!(
        "{} {}",
        d.blocking_len().unwrap(),
        d.blocking_is_empty().unwrap()
    ));
    d.blocking_insert(k("kept"), 7).unwrap();
    said
}

/// What [`exercise_async`] and [`exercise_blocking`] say on an empty dict.
fn expected(tag: &str) -> Vec<String> {
    let k = |s: &str| format!("{tag}{s}");
    [
        "None".to_owned(),
        "None".to_owned(),
        "Some(1)".to_owned(),
        "Some(10)".to_owned(),
        "None".to_owned(),
        "true".to_owned(),
        "false".to_owned(),
        "2".to_owned(),
        "false".to_owned(),
        // Insertion order; replacing "a" kept its place.
        format!("[{:?}, {:?}]", k("a"), k("b")),
        "[10, 2]".to_owned(),
        format!("[({:?}, 10), ({:?}, 2)]", k("a"), k("b")),
        "15".to_owned(),
        "100".to_owned(),
        "Some(2)".to_owned(),
        "None".to_owned(),
        format!("[({:?}, 15), ({:?}, 100)]", k("a"), k("c")),
        "0 true".to_owned(),
    ]
    .to_vec()
}

#[tokio::test]
async fn every_method_from_the_owner_async_and_blocking() {
    let d = Map::new();
    assert_eq!(
        exercise_async(d.clone(), "x".to_owned()).await,
        expected("x")
    );
    d.clear().await.unwrap();
    // The blocking methods in the owner are its local calls too.
    assert_eq!(exercise_blocking(d.clone(), "y".to_owned()), expected("y"));
    assert_eq!(d.items().await.unwrap(), [("ykept".to_owned(), 7)]);
}

#[tokio::test]
async fn every_method_from_a_child_async_and_from_a_sync_target() {
    let d = Map::new();
    let mut p = procpool::spawn(exercise_async, (d.clone(), "x".to_owned()))
        .await
        .unwrap();
    assert_eq!(soon(p.join()).await.unwrap(), expected("x"));
    // What the child wrote is in the owner's dict.
    assert_eq!(d.items().await.unwrap(), [("xkept".to_owned(), 7)]);
    d.clear().await.unwrap();
    let mut p = procpool::spawn(exercise_blocking, (d.clone(), "y".to_owned()))
        .await
        .unwrap();
    assert_eq!(soon(p.join()).await.unwrap(), expected("y"));
    assert_eq!(d.items().await.unwrap(), [("ykept".to_owned(), 7)]);
}

/// 1,000 increments of one counter; how many times the closure ran (retries included).
fn count_blocking(d: Map, go: Event) -> u64 {
    go.blocking_wait().unwrap();
    let mut calls = 0;
    for _ in 0..1_000 {
        d.blocking_update("counter".to_owned(), |n| {
            calls += 1;
            n.unwrap_or(0) + 1
        })
        .unwrap();
    }
    calls
}

async fn count_async(d: Map, go: Event) -> u64 {
    go.wait().await.unwrap();
    let mut calls = 0;
    for _ in 0..1_000 {
        d.update("counter".to_owned(), |n| {
            calls += 1;
            n.unwrap_or(0) + 1
        })
        .await
        .unwrap();
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_times_a_thousand_updates_of_one_key_lose_nothing() {
    let d = Map::new();
    let go = Event::new();
    let mut blocking = Vec::new();
    let mut asyncs = Vec::new();
    for _ in 0..2 {
        blocking.push(
            procpool::spawn(count_blocking, (d.clone(), go.clone()))
                .await
                .unwrap(),
        );
        asyncs.push(
            procpool::spawn(count_async, (d.clone(), go.clone()))
                .await
                .unwrap(),
        );
    }
    // All four start together, so their updates interleave.
    go.set().unwrap();
    let mut calls = 0;
    for p in &mut blocking {
        calls += tokio::time::timeout(std::time::Duration::from_secs(120), p.join())
            .await
            .expect("the updaters finish")
            .unwrap();
    }
    for p in &mut asyncs {
        calls += tokio::time::timeout(std::time::Duration::from_secs(120), p.join())
            .await
            .expect("the updaters finish")
            .unwrap();
    }
    assert_eq!(d.get("counter").await.unwrap(), Some(4_000));
    assert!(calls >= 4_000, "{calls}");
    eprintln!(
        "4 x 1,000 updates: the closures ran {calls} times ({} retries)",
        calls - 4_000
    );
}

/// Starts an update of "n" whose closure says so and then hangs.
fn update_and_hang(d: Map, inside: Event) {
    d.blocking_update("n".to_owned(), |_| {
        inside.set().unwrap();
        i64::from(hangs())
    })
    .unwrap();
}

fn add_one(d: Map) -> i64 {
    d.blocking_update("n".to_owned(), |n| n.unwrap() + 1)
        .unwrap()
}

#[tokio::test]
async fn an_updater_killed_in_its_closure_blocks_nobody_and_wrote_nothing() {
    let d = Map::new();
    d.insert("n".to_owned(), 10).await.unwrap();
    let inside = Event::new();
    let mut hung = procpool::spawn(update_and_hang, (d.clone(), inside.clone()))
        .await
        .unwrap();
    soon(inside.wait()).await.unwrap();
    // While it is in its closure, another process's update goes through.
    let mut other = procpool::spawn(add_one, (d.clone(),)).await.unwrap();
    assert_eq!(soon(other.join()).await.unwrap(), 11);
    hung.kill().unwrap();
    assert!(matches!(hung.join().await, Err(Error::WorkerDied { .. })));
    // Nothing half written: the value is the one before the kill.
    assert_eq!(d.get("n").await.unwrap(), Some(11));
    let mut next = procpool::spawn(add_one, (d.clone(),)).await.unwrap();
    assert_eq!(soon(next.join()).await.unwrap(), 12);
    assert_eq!(
        d.update("n".to_owned(), |n| n.unwrap() + 1).await.unwrap(),
        13
    );
}

/// An update whose first try is overtaken by an insert (made from inside the closure):
/// what it returned and how many times the closure ran.
fn overtaken(d: Map) -> (i64, u32) {
    let mut calls = 0;
    let v = d
        .blocking_update("k".to_owned(), |n| {
            calls += 1;
            if calls == 1 {
                d.blocking_insert("k".to_owned(), 100).unwrap();
            }
            n.unwrap_or(0) + 1
        })
        .unwrap();
    (v, calls)
}

#[tokio::test]
async fn an_update_overtaken_by_another_write_runs_again_on_the_new_value() {
    // In the owner (the local path) and from a child.
    let d = Map::new();
    assert_eq!(overtaken(d.clone()), (101, 2));
    assert_eq!(d.get("k").await.unwrap(), Some(101));
    d.clear().await.unwrap();
    let mut p = procpool::spawn(overtaken, (d.clone(),)).await.unwrap();
    assert_eq!(soon(p.join()).await.unwrap(), (101, 2));
    assert_eq!(d.get("k").await.unwrap(), Some(101));
}

/// The parent's dict of strings, seen here as a dict of numbers.
async fn read_as_numbers(d: Map) -> Vec<String> {
    let mut called = false;
    let update = d
        .update("k".to_owned(), |_| {
            called = true;
            0
        })
        .await;
    vec![
        format!("{:?}", d.get("k").await),
        format!("{:?}", d.blocking_get("k")),
        format!("{:?}", d.values().await),
        format!("{:?}", d.items().await),
        format!("{update:?} called={called}"),
        // The keys are strings, as here.
        format!("{:?}", d.keys().await),
    ]
}

/// The parent's dict with string keys, seen here with number keys.
fn keys_as_numbers(d: Dict<i64, String>) -> String {
    format!("{:?}", d.blocking_keys())
}

/// A handle to the same dict with other key and value types.
fn retyped<A, B, C, D>(d: &Dict<A, B>) -> Dict<C, D> {
    rmp_serde::from_slice(&rmp_serde::to_vec(d).unwrap()).unwrap()
}

#[tokio::test]
async fn a_value_that_is_not_a_v_is_a_decode_error() {
    let d: Dict<String, String> = Dict::new();
    d.insert("k".to_owned(), "text".to_owned()).await.unwrap();
    // The same dict, typed otherwise (a handle is only the way to the owner's bytes).
    let numbers: Map = retyped(&d);
    // In the owner too.
    assert!(matches!(numbers.get("k").await, Err(Error::Decode { .. })));
    let mut p = procpool::spawn(read_as_numbers, (numbers,)).await.unwrap();
    let said = soon(p.join()).await.unwrap();
    for s in &said[..5] {
        assert!(s.starts_with("Err(Decode {"), "{said:#?}");
    }
    assert!(said[4].ends_with("called=false"), "{said:#?}");
    assert_eq!(said[5], r#"Ok(["k"])"#);
    let mut p = procpool::spawn(keys_as_numbers, (retyped(&d),))
        .await
        .unwrap();
    let keys = soon(p.join()).await.unwrap();
    assert!(keys.starts_with("Err(Decode {"), "{keys}");
    // Nothing was written by the failed update.
    assert_eq!(d.get("k").await.unwrap().as_deref(), Some("text"));
}

/// Calls dropped in a child: after their first poll (sent) and before it (not sent).
async fn dropped_calls(d: Map) -> Vec<String> {
    // Sent at the first poll: applied by the owner although the caller left.
    let first = d.insert("sent".to_owned(), 1).now_or_never();
    // Never polled: nothing sent.
    drop(d.insert("never".to_owned(), 2));
    // A get given up: its late answer goes nowhere, the next calls get their own.
    let get = d.get("sent").now_or_never();
    // An update given up while it read: its closure never ran, nothing written.
    let mut ran = false;
    let update = d
        .update("sent".to_owned(), |_| {
            ran = true;
            -1
        })
        .now_or_never();
    vec![
        format!("{}", matches!(first, None | Some(Ok(None)))),
        format!("{}", matches!(get, None | Some(Ok(Some(1))))),
        format!("{}", update.is_none() && !ran),
        format!("{:?}", d.get("sent").await.unwrap()),
        format!("{}", d.contains_key("never").await.unwrap()),
        format!("{:?}", d.keys().await.unwrap()),
    ]
}

#[tokio::test]
async fn calls_dropped_in_a_child_took_effect_if_sent_and_leave_no_stray_answers() {
    let d = Map::new();
    let mut p = procpool::spawn(dropped_calls, (d.clone(),)).await.unwrap();
    assert_eq!(
        soon(p.join()).await.unwrap(),
        ["true", "true", "true", "Some(1)", "false", r#"["sent"]"#]
    );
    assert_eq!(d.items().await.unwrap(), [("sent".to_owned(), 1)]);
}

/// A pool task: puts the square of `n` under `n`, and reads the parent's offset.
fn fill((d, n): (Dict<u32, u64>, u32)) -> u64 {
    let offset = d.blocking_get(&u32::MAX).unwrap().unwrap();
    let sq = u64::from(n) * u64::from(n);
    d.blocking_insert(n, sq + offset).unwrap();
    sq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dict_filled_by_pool_workers_is_read_in_the_parent() {
    let pool = AsyncPool::new(2).await.unwrap();
    let d: Dict<u32, u64> = Dict::new();
    d.insert(u32::MAX, 1_000_000).await.unwrap();
    let got = soon(pool.map(fill, (0..100).map(|n| (d.clone(), n))))
        .await
        .unwrap();
    assert_eq!(got, (0..100u64).map(|n| n * n).collect::<Vec<_>>());
    // Every task's insert was applied before its result came back.
    assert_eq!(d.len().await.unwrap(), 101);
    d.remove(&u32::MAX).await.unwrap();
    let mut items = d.items().await.unwrap();
    items.sort_unstable();
    let want: Vec<(u32, u64)> = (0..100u32)
        .map(|n| (n, u64::from(n) * u64::from(n) + 1_000_000))
        .collect();
    assert_eq!(items, want);
    soon(pool.close()).await;
}

/// A dict inside a queue item reaches another process; what it reads there.
async fn read_sent_dict(q: Queue<Map>) -> Option<i64> {
    let d = q.get().await.unwrap();
    d.get("via queue").await.unwrap()
}

#[tokio::test]
async fn a_dict_sent_inside_a_queue_item_is_the_same_dict() {
    let d = Map::new();
    d.insert("via queue".to_owned(), 5).await.unwrap();
    let q = Queue::new();
    let mut p = procpool::spawn(read_sent_dict, (q.clone(),)).await.unwrap();
    q.put(d.clone()).await.unwrap();
    assert_eq!(soon(p.join()).await.unwrap(), Some(5));
}

/// Puts `i` into the queue, then writes `i` into the dict, 500 times.
fn put_then_insert(q: Queue<u32>, d: Dict<u8, u32>) {
    for i in 0..500 {
        q.blocking_put(i).unwrap();
        d.blocking_insert(0, i).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_dict_call_comes_after_what_the_process_did_before() {
    // The dict's blocking calls go over a connection of their own; the puts (which do
    // not wait for the owner) over the process's shared one. The owner still sees them
    // in the order the child made them: whenever the dict says `i`, item `i` is queued.
    let (q, d) = (Queue::new(), Dict::new());
    let mut p = procpool::spawn(put_then_insert, (q.clone(), d.clone()))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let seen = d.get(&0).await.unwrap();
        let queued = q.len();
        if let Some(i) = seen {
            assert!(
                queued > i as usize,
                "the dict says {i} with {queued} queued"
            );
            if i == 499 {
                break;
            }
        }
        assert!(
            start.elapsed() < support::SOON,
            "the child stopped at {seen:?}"
        );
        tokio::task::yield_now().await;
    }
    soon(p.join()).await.unwrap();
}
