//! A tour of every feature built so far. Run it with
//!
//! ```text
//! cargo run --release --example tour
//! ```

use std::time::Duration;

use futures::StreamExt;
use procpool::{
    Array, AsyncPool, Barrier, Condition, Connection, Dict, Error, Event, Lock, Process, Queue,
    Semaphore, Value, current_process, pipe,
};

fn doubler(number: i64) -> i64 {
    let result = number * 2;
    println!(
        "  {number} doubled to {result} by: {}",
        current_process().name()
    );
    result
}

fn divide(a: i32, b: i32) -> Result<i32, String> {
    if b == 0 {
        Err("division by zero".into())
    } else {
        Ok(a / b)
    }
}

async fn fetch_len(url: String) -> usize {
    tokio::time::sleep(Duration::from_millis(5)).await;
    url.len()
}

fn panics() -> u8 {
    let v: Vec<u8> = Vec::new();
    v[3]
}

fn aborts() -> u8 {
    std::process::abort()
}

fn hangs() -> u8 {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

async fn spawns_a_grandchild() -> String {
    let mut p = procpool::spawn(|| current_process().name().to_owned(), ())
        .await
        .expect("spawn grandchild");
    p.join().await.expect("join grandchild")
}

fn pool_worker_name(_: u8) -> String {
    current_process().name().to_owned()
}

fn unlucky(x: u32) -> u32 {
    if x == 3 {
        panic!("3 is unlucky");
    }
    x * 10
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "== Process: start, join, exitcode (parent is {})",
        current_process().name()
    );
    let mut procs = Vec::new();
    for n in [5, 10, 15] {
        let mut p = Process::new(doubler, (n,));
        p.start().await?;
        procs.push(p);
    }
    let mut p = Process::new(doubler, (2,)).with_name("Test");
    p.start().await?;
    procs.push(p);
    for p in &mut procs {
        let value = p.join().await?;
        println!(
            "  {} (pid {:?}) returned {value}, exitcode {:?}",
            p.name(),
            p.pid(),
            p.exitcode()
        );
    }

    println!("== Targets: closures, several arguments, async, Result not flattened");
    let mut p = procpool::spawn(|a: u32, b: u32, c: u32| a * b * c, (2, 3, 7)).await?;
    println!("  closure(2, 3, 7) = {}", p.join().await?);
    let mut p = procpool::spawn(fetch_len, ("https://example.org".to_string(),)).await?;
    println!("  async fetch_len = {}", p.join().await?);
    let mut p = procpool::spawn(divide, (1, 0)).await?;
    println!("  divide(1, 0) = {:?}", p.join().await?);

    println!("== Faults come back as errors, the parent carries on");
    let mut p = procpool::spawn(panics, ()).await?;
    report(p.join().await);
    let mut p = procpool::spawn(aborts, ()).await?;
    report(p.join().await);

    println!("== A hung child: join under a timeout, then kill");
    let mut p = procpool::spawn(hangs, ()).await?;
    println!("  active children: {:?}", procpool::active_children());
    if tokio::time::timeout(Duration::from_millis(200), p.join())
        .await
        .is_err()
    {
        println!("  still running after 200 ms: is_alive = {}", p.is_alive());
    }
    p.kill()?;
    report(p.join().await);
    println!("  exitcode {:?}", p.exitcode());

    println!("== Nested processes are named like Python's");
    let mut p = procpool::spawn(spawns_a_grandchild, ()).await?;
    let grandchild = p.join().await?;
    println!("  {} started {grandchild}", p.name());

    println!("== AsyncPool: map, apply, apply_async, starmap, imap");
    let pool = AsyncPool::new(2).await?;
    println!(
        "  map(doubler, [5, 10, 20]) = {:?}",
        pool.map(|x: i64| x * 2, vec![5, 10, 20]).await?
    );
    let mut names = pool.map(pool_worker_name, vec![0; 8]).chunksize(1).await?;
    names.sort();
    names.dedup();
    println!("  workers: {names:?}");
    println!(
        "  apply(divide, (7, 2)) = {:?}",
        pool.apply(divide, (7, 2)).await?
    );
    let handle = pool.apply_async(fetch_len, ("procpool".to_string(),));
    println!("  apply_async(fetch_len).await = {}", handle.await?);
    println!(
        "  starmap = {:?}",
        pool.starmap(|a: u32, b: u32| a * b, vec![(2, 3), (4, 5)])
            .await?
    );
    let per_item: Vec<String> = pool
        .imap(unlucky, 0..6)
        .map(|r| match r {
            Ok(v) => v.to_string(),
            Err(e) => format!("Err({})", e.to_string().split(": ").last().unwrap_or("")),
        })
        .collect()
        .await;
    println!("  imap(unlucky, 0..6) = {per_item:?} (an error is one item's, the stream goes on)");

    println!("== Pool faults: one task fails, the pool serves on");
    report(pool.apply(panics, ()).await);
    report(pool.apply(aborts, ()).await);
    report(
        pool.apply(hangs, ())
            .timeout(Duration::from_millis(200))
            .await,
    );
    let racing = tokio::select! {
        r = pool.apply(hangs, ()) => format!("{r:?}"),
        () = tokio::time::sleep(Duration::from_millis(100)) => "select! deadline won; the task was cancelled and its worker stopped".to_string(),
    };
    println!("  {racing}");
    println!(
        "  still serving: {}",
        pool.apply(|x: u8| x + 1, (41,)).await?
    );
    println!("  stats: {:?}", pool.stats());
    pool.close().await;
    println!("  after close: {:?}", pool.apply(|x: u8| x, (1,)).await);

    println!("== Queue: a creator and a consumer process, the sentinel -1 ends it");
    let q = Queue::new();
    let mut creator = Process::new(creator, (vec![5, 10, 13, -1], q.clone()));
    let mut consumer = Process::new(consumer, (q.clone(),));
    creator.start().await?;
    consumer.start().await?;
    creator.join().await?;
    consumer.join().await?;

    println!("== Lock: three processes print under one lock");
    let lock = Lock::new();
    let mut printers = Vec::new();
    for item in ["tango", "foxtrot", "10"] {
        printers.push(procpool::spawn(printer, (item.to_owned(), lock.clone())).await?);
    }
    for mut p in printers {
        p.join().await?;
    }

    println!("== Lock: the holder is SIGKILLed; the next waiter gets it, and is told");
    let held = Event::new();
    let holder = procpool::spawn(hold_forever, (lock.clone(), held.clone())).await?;
    held.wait().await?;
    println!(
        "  try_lock while a child holds it: {:?}",
        lock.try_lock()?.map(|_| "got it")
    );
    holder.kill()?;
    let guard = lock.lock().await?;
    println!(
        "  after the kill: locked, abandoned = {}",
        guard.abandoned()
    );
    drop(guard);

    println!("== Pipe: a sender and a receiver process, START to END");
    let (a, b) = pipe();
    let mut tx = procpool::spawn(sender, (a,)).await?;
    let mut rx = procpool::spawn(receiver, (b,)).await?;
    tx.join().await?;
    rx.join().await?;

    println!("== Queue and Event through pool tasks");
    let pool = AsyncPool::builder().processes(2).build().await?;
    let results: Queue<String> = Queue::new();
    let go = Event::new();
    pool.starmap(report_square, (1..=3).map(|x| (x, results.clone())))
        .await?;
    let waiting = pool.apply_async(wait_then_report, (go.clone(), results.clone()));
    go.set()?;
    waiting.await?;
    while let Some(line) = results.try_get()? {
        println!("  {line}");
    }
    pool.close().await;

    println!("== Semaphore, Barrier, Condition, Value and Array across processes");
    let slots = Semaphore::new(2);
    let counter = Value::new(0u64);
    let barrier = Barrier::new(3);
    let mut procs = Vec::new();
    for _ in 0..3 {
        let args = (slots.clone(), counter.clone(), barrier.clone());
        procs.push(procpool::spawn(count_in_slots, args).await?);
    }
    let mut leaders = 0;
    for p in &mut procs {
        leaders += u32::from(p.join().await?);
    }
    println!(
        "  3 processes, 2 at a time, 1,000 increments each: {}; one leader: {}",
        counter.get()?,
        leaders == 1
    );
    let lock = Lock::new();
    let ready = Condition::new(lock.clone());
    let squares: Array<u32> = Array::new(5);
    let mut g = lock.lock().await?;
    let mut p = procpool::spawn(fill_and_notify, (ready.clone(), squares.clone())).await?;
    ready
        .wait_for(&mut g, || squares.get(4).unwrap_or(0) != 0)
        .await?;
    drop(g);
    p.join().await?;
    println!(
        "  filled by a child, announced with a Condition: {:?}",
        squares.to_vec()?
    );
    let words: Dict<String, usize> = Dict::new();
    let mut p = procpool::spawn(count_words, (words.clone(),)).await?;
    p.join().await?;
    println!(
        "  a Manager-style Dict filled by a child: {:?}",
        words.items().await?
    );

    println!("== Logging: child tracing events in the parent, Python's log_to_stderr");
    procpool::log_to_stderr(tracing::Level::INFO)?;
    tracing::info!("the parent logs too");
    let mut p = procpool::spawn(logs_and_doubles, (21,)).await?;
    let value = p.join().await?;
    println!("  {} returned {value}", p.name());

    remote_nodes().await
}

#[cfg(feature = "redis")]
#[path = "support/local_cluster.rs"]
mod local_cluster;

/// The same pool, its tasks on two nodes through Redis Streams.
#[cfg(feature = "redis")]
async fn remote_nodes() -> Result<(), Box<dyn std::error::Error>> {
    use local_cluster::{INSTALL_REDIS, LocalCluster};
    println!("== Remote nodes: the same pool through Redis Streams (feature redis)");
    let Some(cluster) = LocalCluster::start("tour", "tour-key", 2, 2).await? else {
        println!("  skipped, this part needs redis-server: {INSTALL_REDIS}");
        return Ok(());
    };
    println!(
        "  a redis-server of its own, two nodes (this binary in node mode): pids {:?}",
        cluster.nodes
    );
    let pool = AsyncPool::builder()
        .backend(
            procpool::remote::Redis::new(&cluster.url)
                .namespace("tour")
                .key("tour-key"),
        )
        .wait_for_nodes(Duration::from_secs(20))
        .build()
        .await?;
    println!(
        "  map: {:?}",
        pool.map(|x: i64| x * 2, vec![5, 10, 20]).await?
    );
    let mut names = pool.map(pool_worker_name, vec![0; 8]).chunksize(1).await?;
    names.sort();
    names.dedup();
    println!("  ran on: {names:?}");
    report(pool.apply(panics, ()).await);
    // Its event travels back with its result and is printed here, named after its worker.
    println!(
        "  logged remotely, returned {}",
        pool.apply(logs_and_doubles, (21,)).await?
    );
    pool.close().await;
    Ok(())
}

#[cfg(not(feature = "redis"))]
async fn remote_nodes() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "== Remote nodes: `cargo run --release --features redis --example tour` runs the same \
         pool on two nodes through Redis Streams (it needs redis-server)"
    );
    Ok(())
}

fn creator(data: Vec<i64>, q: Queue<i64>) {
    println!("  Creating data and putting it on the queue");
    for item in data {
        q.blocking_put(item).expect("the parent keeps the queue");
    }
}

fn consumer(q: Queue<i64>) {
    loop {
        let data = q.blocking_get().expect("the parent keeps the queue");
        println!("  data found to be processed: {data}");
        println!("  {}", data * 2);
        if data == -1 {
            return;
        }
    }
}

fn printer(item: String, lock: Lock) {
    let _guard = lock.blocking_lock().expect("the parent keeps the lock");
    println!("  {item}");
}

fn hold_forever(lock: Lock, held: Event) {
    let _guard = lock.blocking_lock().expect("the parent keeps the lock");
    held.set().expect("the parent keeps the event");
    loop {
        std::thread::park();
    }
}

fn sender(conn: Connection<String>) {
    for msg in ["START", "hello", "world", "END"] {
        conn.blocking_send(msg.to_owned())
            .expect("the receiver is there");
    }
}

fn receiver(conn: Connection<String>) {
    loop {
        let msg = conn.blocking_recv().expect("the sender ends with END");
        if msg == "END" {
            return;
        }
        println!("  Received the message: {msg}");
    }
}

fn report_square(x: u32, out: Queue<String>) {
    let line = format!("{} squared {x}: {}", current_process().name(), x * x);
    out.blocking_put(line).expect("the parent keeps the queue");
}

async fn wait_then_report(go: Event, out: Queue<String>) {
    go.wait().await.expect("the parent keeps the event");
    let line = format!("{} saw the event set", current_process().name());
    out.put(line).await.expect("the parent keeps the queue");
}

/// 1,000 increments while holding one of the semaphore's permits, then the barrier:
/// whether it was the leader.
fn count_in_slots(slots: Semaphore, counter: Value<u64>, barrier: Barrier) -> bool {
    {
        let _permit = slots
            .blocking_acquire()
            .expect("the parent keeps the semaphore");
        for _ in 0..1000 {
            counter.update(|c| c + 1).expect("shared memory");
        }
    }
    barrier
        .blocking_wait()
        .expect("nobody breaks it")
        .is_leader()
}

fn count_words(words: Dict<String, usize>) {
    for w in "the cat saw the dog".split(' ') {
        words
            .blocking_update(w.to_owned(), |n| n.unwrap_or(0) + 1)
            .expect("the parent keeps the dict");
    }
}

fn fill_and_notify(ready: Condition, squares: Array<u32>) {
    let _g = ready
        .lock()
        .blocking_lock()
        .expect("the parent keeps the lock");
    for i in 0..5u32 {
        squares
            .set(i as usize, (i + 1) * (i + 1))
            .expect("in bounds");
    }
    ready.notify_all().expect("the parent keeps the condition");
}

fn logs_and_doubles(x: u32) -> u32 {
    tracing::info!(x, "doubling");
    x * 2
}

fn report<T: std::fmt::Debug>(r: procpool::Result<T>) {
    match r {
        Ok(v) => println!("  ok: {v:?}"),
        Err(e @ Error::Panicked { .. }) => println!("  Panicked: {e}"),
        Err(e @ Error::WorkerDied { .. }) => println!("  WorkerDied: {e}"),
        Err(e) => println!("  error: {e}"),
    }
}
