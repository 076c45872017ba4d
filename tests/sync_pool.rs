//! Queues, locks, events and pipe ends passed to pool tasks as ordinary arguments.

mod support;

use std::time::Duration;

use procpool::{AsyncPool, Connection, Error, Event, Lock, Queue, pipe};
use support::soon;

fn put_double(x: u32, q: Queue<u32>) {
    q.blocking_put(x * 2).unwrap();
}

fn try_lock_in_task(lock: Lock) -> bool {
    lock.try_lock().unwrap().is_some()
}

async fn wait_in_task(ev: Event) -> bool {
    ev.wait().await.unwrap();
    ev.is_set()
}

fn echo_once(conn: Connection<String>) {
    let m = conn.blocking_recv().unwrap();
    conn.blocking_send(m + "!").unwrap();
}

fn hold_until_killed(lock: Lock, held: Event) {
    let _g = lock.blocking_lock().unwrap();
    held.set().unwrap();
    loop {
        std::thread::park();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primitives_pass_through_pool_tasks() {
    let pool = AsyncPool::builder().processes(2).build().await.unwrap();

    // A queue in every item of a map; the results come after the puts are applied.
    let q: Queue<u32> = Queue::new();
    pool.starmap(put_double, (0..100).map(|x| (x, q.clone())))
        .await
        .unwrap();
    let mut got: Vec<u32> = (0..100).map(|_| q.try_get().unwrap().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..100).map(|x| x * 2).collect::<Vec<_>>());

    // A lock the parent holds is not free in a task; then it is.
    let lock = Lock::new();
    let g = lock.lock().await.unwrap();
    assert!(!pool.apply(try_lock_in_task, (lock.clone(),)).await.unwrap());
    drop(g);
    assert!(pool.apply(try_lock_in_task, (lock.clone(),)).await.unwrap());

    // An event set by the parent releases a task.
    let ev = Event::new();
    let task = pool.apply_async(wait_in_task, (ev.clone(),));
    ev.set().unwrap();
    assert!(soon(task).await.unwrap());

    // A pipe end, moved into a task.
    let (here, there) = pipe::<String>();
    let task = pool.apply_async(echo_once, (there,));
    here.send("hi".into()).await.unwrap();
    assert_eq!(here.recv().await.unwrap(), "hi!");
    task.await.unwrap();
    // The task is over and the end it had is gone with it.
    assert!(matches!(soon(here.recv()).await, Err(Error::Closed)));
    pool.close().await;
}

#[tokio::test]
async fn a_lock_held_by_a_timed_out_task_is_released() {
    let pool = AsyncPool::builder().processes(1).build().await.unwrap();
    let lock = Lock::new();
    let held = Event::new();
    let task = pool
        .apply(hold_until_killed, (lock.clone(), held.clone()))
        .timeout(Duration::from_secs(600));
    let killer = async {
        held.wait().await.unwrap();
        // The worker running it is stopped when the caller gives up.
    };
    tokio::select! {
        _ = task => panic!("the task cannot finish"),
        () = killer => {}
    }
    let g = soon(lock.lock()).await.unwrap();
    assert!(g.abandoned(), "the worker died holding it");
    pool.close().await;
}
