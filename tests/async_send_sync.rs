//! Public types are Send and Sync where a service needs them to be (after tokio's
//! `tests/async_send_sync.rs`): compile-time checks.
#![allow(dead_code)]

use procpool::*;

fn require_send<T: Send>() {}
fn require_sync<T: Sync>() {}
fn require_unpin<T: Unpin>() {}

#[test]
fn send_sync_unpin() {
    require_send::<AsyncPool>();
    require_sync::<AsyncPool>();
    require_send::<Apply<i32>>();
    require_sync::<Apply<i32>>();
    require_unpin::<Apply<i32>>();
    require_send::<Map<String>>();
    require_sync::<Map<String>>();
    require_unpin::<Map<String>>();
    require_send::<TaskHandle<Vec<u8>>>();
    require_sync::<TaskHandle<Vec<u8>>>();
    require_unpin::<TaskHandle<Vec<u8>>>();
    require_send::<TaskTimeout<i32>>();
    require_sync::<TaskTimeout<i32>>();
    require_send::<Imap<i32, std::vec::IntoIter<i32>>>();
    require_sync::<Imap<i32, std::vec::IntoIter<i32>>>();
    require_unpin::<Imap<i32, std::ops::RangeFrom<i32>>>();
    require_send::<Process<i32>>();
    require_sync::<Process<i32>>();
    require_send::<Error>();
    require_sync::<Error>();
    require_send::<PoolStats>();
    require_send::<Builder>();
    require_send::<ProcessInfo>();
    require_send::<Queue<String>>();
    require_sync::<Queue<String>>();
    require_send::<Connection<Vec<u8>>>();
    require_sync::<Connection<Vec<u8>>>();
    require_send::<procpool::Receiver<Vec<u8>>>();
    require_sync::<procpool::Receiver<Vec<u8>>>();
    require_send::<procpool::Sender<Vec<u8>>>();
    require_sync::<procpool::Sender<Vec<u8>>>();
    require_send::<Lock>();
    require_sync::<Lock>();
    require_send::<LockGuard>();
    require_sync::<LockGuard>();
    require_send::<Event>();
    require_sync::<Event>();
    require_send::<TryPutError<String>>();
    require_send::<Dict<String, Vec<u8>>>();
    require_sync::<Dict<String, Vec<u8>>>();
    require_send::<Semaphore>();
    require_sync::<Semaphore>();
    require_send::<BoundedSemaphore>();
    require_sync::<BoundedSemaphore>();
    require_send::<SemaphorePermit>();
    require_sync::<SemaphorePermit>();
    require_send::<Condition>();
    require_sync::<Condition>();
    require_send::<Barrier>();
    require_sync::<Barrier>();
    require_send::<Value<u64>>();
    require_sync::<Value<u64>>();
    require_send::<Array<f64>>();
    require_sync::<Array<f64>>();
}

// The futures of the new primitives' async methods can be `tokio::spawn`ed.
async fn primitives_futures(s: Semaphore, c: Condition, b: Barrier, mut g: LockGuard) {
    require_send_val(&s.acquire());
    require_send_val(&s.acquire_timeout(std::time::Duration::ZERO));
    require_send_val(&b.wait());
    require_send_val(&c.wait(&mut g));
}

// Futures returned by async fns are Send, so they can be `tokio::spawn`ed.
fn require_send_val<T: Send>(_: &T) {}

async fn uses_everything(pool: AsyncPool) {
    let f = pool.close();
    require_send_val(&f);
    let f = pool.terminate();
    require_send_val(&f);
    let f = AsyncPool::new(1);
    require_send_val(&f);
    let mut p = Process::new(|| 1u8, ());
    require_send_val(&p.start());
    require_send_val(&p.join());
    let q: Queue<String> = Queue::new();
    require_send_val(&q.put(String::new()));
    require_send_val(&q.get());
    require_send_val(&q.get_timeout(std::time::Duration::ZERO));
    require_send_val(&q.put_timeout(String::new(), std::time::Duration::ZERO));
    require_send_val(&q.join());
    let (a, _b) = pipe::<String>();
    require_send_val(&a.send(String::new()));
    require_send_val(&a.recv());
    require_send_val(&a.poll(std::time::Duration::ZERO));
    let lock = Lock::new();
    require_send_val(&lock.lock());
    let ev = Event::new();
    require_send_val(&ev.wait());
    require_send_val(&ev.wait_timeout(std::time::Duration::ZERO));
    let d: Dict<String, u64> = Dict::new();
    require_send_val(&d.insert(String::new(), 1));
    require_send_val(&d.get("k"));
    require_send_val(&d.remove("k"));
    require_send_val(&d.items());
    require_send_val(&d.update(String::new(), |n| n.unwrap_or(0) + 1));
}
