//! Large arguments (a megabyte or more encoded, of map items or of single calls) are
//! encoded again when they are sent, straight into a buffer the pool reuses; these tests
//! hold that to the contract.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use procpool::{AsyncPool, Connection, Error, Queue, pipe};
use serde::{Deserialize, Serialize, Serializer};
use serde_bytes::ByteBuf;
use support::pattern;

const MB: usize = 1 << 20;

fn reversed(mut b: ByteBuf) -> ByteBuf {
    b.reverse();
    b
}

/// Panics on a payload that starts with 0xEE.
fn checked_len(b: ByteBuf) -> usize {
    assert!(b.first() != Some(&0xEE), "bad payload");
    b.len()
}

/// Generous: a debug build on a loaded machine; a stall would hang forever.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("large items stalled")
}

#[tokio::test]
async fn large_and_small_items_share_chunks_and_arrive_intact_in_order() {
    let pool = AsyncPool::new(2).await.unwrap();
    let sizes = [10, 2 * MB, 5, MB + 3, MB - 100, 0, 3 * MB, 7, MB];
    let items: Vec<ByteBuf> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i as u8))
        .collect();
    for chunksize in [1, 2, 4] {
        let got = within(pool.map(reversed, items.clone()).chunksize(chunksize))
            .await
            .unwrap();
        assert_eq!(got.len(), items.len());
        for (i, (got, sent)) in got.iter().zip(&items).enumerate() {
            assert!(
                got.iter().eq(sent.iter().rev()),
                "item {i} (chunksize {chunksize}) changed on the way"
            );
        }
    }
    pool.close().await;
}

#[tokio::test]
async fn after_a_large_item_fails_the_rest_of_its_chunk_is_sent_again() {
    let pool = AsyncPool::new(2).await.unwrap();
    let mut items: Vec<ByteBuf> = (0..8).map(|i| pattern(MB + i * 1000, 1)).collect();
    items[1] = ByteBuf::from(vec![0xEE; 2 * MB]);
    items[6] = ByteBuf::from(vec![0xEE; 10]);
    let got: Vec<_> = within(
        pool.imap(checked_len, items.clone())
            .chunksize(4)
            .collect::<Vec<_>>(),
    )
    .await;
    for (i, (got, sent)) in got.into_iter().zip(&items).enumerate() {
        match (i, got) {
            (1 | 6, Err(Error::Panicked { message, .. })) => {
                assert!(message.contains("bad payload"))
            }
            (_, Ok(len)) => assert_eq!(len, sent.len(), "item {i}"),
            (_, other) => panic!("item {i}: {other:?}"),
        }
    }
    pool.close().await;
}

fn echo_len(conn: Connection<usize>, q: Queue<usize>, payload: ByteBuf) {
    q.blocking_put(payload.len()).unwrap();
    conn.blocking_send(payload.len()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_inside_large_items_work_in_the_worker() {
    // A handle is pinned by the encoding that is sent, so such an item is not deferred.
    let pool = AsyncPool::new(2).await.unwrap();
    let q: Queue<usize> = Queue::new();
    let (ours, theirs) = pipe::<usize>();
    let items = vec![(theirs, q.clone(), pattern(2 * MB, 3))];
    within(pool.starmap(echo_len, items)).await.unwrap();
    assert_eq!(within(ours.recv()).await.unwrap(), 2 * MB);
    assert_eq!(q.try_get().unwrap(), Some(2 * MB));
    // The same as a single call's arguments.
    let (ours, theirs) = pipe::<usize>();
    let args = (theirs, q.clone(), pattern(3 * MB, 4));
    within(pool.apply(echo_len, args)).await.unwrap();
    assert_eq!(within(ours.recv()).await.unwrap(), 3 * MB);
    assert_eq!(q.try_get().unwrap(), Some(3 * MB));
    pool.close().await;
}

/// Its second encoding (the one that is sent) is one byte longer, or panics.
#[derive(Deserialize)]
struct Fickle {
    data: ByteBuf,
    panics: bool,
    #[serde(skip)]
    encoded: AtomicUsize,
}

impl Fickle {
    fn new(panics: bool) -> Fickle {
        Fickle {
            data: ByteBuf::from(vec![1; 2 * MB]),
            panics,
            encoded: AtomicUsize::new(0),
        }
    }
}

impl Serialize for Fickle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let again = self.encoded.fetch_add(1, Ordering::SeqCst) > 0;
        assert!(!(again && self.panics), "encoded twice");
        let mut st = s.serialize_struct("Fickle", 2)?;
        let extra = if again { vec![0] } else { Vec::new() };
        st.serialize_field("data", &ByteBuf::from([&self.data[..], &extra].concat()))?;
        st.serialize_field("panics", &self.panics)?;
        st.end()
    }
}

fn fickle_len(f: Fickle) -> usize {
    f.data.len()
}

#[tokio::test]
async fn a_large_argument_that_encodes_differently_when_sent_fails_alone_with_encode() {
    let pool = AsyncPool::new(1).await.unwrap();
    for panics in [false, true] {
        let err = within(pool.map(fickle_len, vec![Fickle::new(panics)]))
            .await
            .unwrap_err();
        match err {
            Error::Encode {
                type_name, reason, ..
            } => {
                assert!(type_name.ends_with("Fickle"), "{type_name}");
                assert!(reason.contains("encoded again"), "{reason}");
            }
            other => panic!("expected Encode, got {other:?}"),
        }
    }
    // The same for a single call's arguments.
    for panics in [false, true] {
        let err = within(pool.apply(fickle_len, (Fickle::new(panics),)))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Encode { type_name, reason, .. }
                if type_name.contains("Fickle") && reason.contains("encoded again")),
            "{err:?}"
        );
    }
    // Nothing was sent for them, and the pool serves on.
    let stats = pool.stats();
    assert_eq!((stats.failed, stats.restarts), (4, 0));
    let ok = within(pool.map(reversed, vec![pattern(2 * MB, 9)])).await;
    assert!(ok.unwrap()[0].iter().eq(pattern(2 * MB, 9).iter().rev()));
    pool.close().await;
}

/// Waits for `gate` if the payload starts with 0, then returns its length.
fn gated_len(gate: String, b: ByteBuf) -> usize {
    if b.first() == Some(&0) {
        support::wait_for_file(&gate);
    }
    b.len()
}

#[tokio::test]
async fn a_worker_gets_at_most_8_mib_of_arguments_ahead() {
    // One worker, its first task held by a gate: of six 3 MB items, the second fits in
    // the 8 MiB ahead, the third would not; the rest wait in the pool's queue.
    let pool = AsyncPool::new(1).await.unwrap();
    let dir = support::TempDir::new("bytes-ahead");
    let gate = dir.path("gate");
    let items: Vec<_> = (0..6u8)
        .map(|i| (gate.clone(), ByteBuf::from(vec![i; 3_000_000])))
        .collect();
    let map = pool.starmap(gated_len, items).chunksize(1);
    let task = tokio::spawn(map);
    let settled = support::eventually_async(Duration::from_secs(60), || {
        let stats = pool.stats();
        assert!(stats.running <= 2, "{stats:?}");
        stats.running == 2 && stats.queued == 4
    });
    assert!(settled.await, "{:?}", pool.stats());
    support::write_file(&gate, "go");
    let lens = within(task).await.unwrap().unwrap();
    assert_eq!(lens, vec![3_000_000; 6]);
    pool.close().await;
}

#[tokio::test]
async fn large_arguments_of_single_calls_arrive_intact() {
    let pool = AsyncPool::new(2).await.unwrap();
    let sent: Vec<ByteBuf> = (0..4).map(|i| pattern(MB + 7 * i, i as u8)).collect();
    let handles: Vec<_> = sent
        .iter()
        .map(|b| pool.apply_async(reversed, (b.clone(),)))
        .collect();
    let one = within(pool.apply(reversed, (pattern(3 * MB, 0x5A),)))
        .await
        .unwrap();
    assert!(one.iter().eq(pattern(3 * MB, 0x5A).iter().rev()));
    for (h, sent) in handles.into_iter().zip(&sent) {
        let got = within(h).await.unwrap();
        assert!(
            got.iter().eq(sent.iter().rev()),
            "a payload changed on the way"
        );
    }
    pool.close().await;
}

/// The payload's length; aborts the worker if it starts with 0xAB.
fn len_or_abort(b: ByteBuf) -> usize {
    if b.first() == Some(&0xAB) {
        std::process::abort();
    }
    b.len()
}

#[tokio::test]
async fn a_worker_dying_on_a_large_argument_is_replaced_and_the_rest_arrive() {
    // Large arguments travel through the worker's arena; its replacement gets its own.
    let pool = AsyncPool::new(1).await.unwrap();
    let mut items: Vec<ByteBuf> = (0..6).map(|i| pattern(MB + i * 4096, 7)).collect();
    items[2] = ByteBuf::from(vec![0xAB; 2 * MB]);
    let got: Vec<_> = within(
        pool.imap(len_or_abort, items.clone())
            .chunksize(1)
            .collect::<Vec<_>>(),
    )
    .await;
    for (i, (got, sent)) in got.into_iter().zip(&items).enumerate() {
        match (i, got) {
            (2, Err(Error::WorkerDied { .. })) => {}
            (_, Ok(len)) => assert_eq!(len, sent.len(), "item {i}"),
            (_, other) => panic!("item {i}: {other:?}"),
        }
    }
    assert!(pool.stats().restarts >= 1);
    pool.close().await;
}

#[tokio::test]
async fn many_large_arguments_cycle_through_a_workers_arena_intact() {
    // One worker, two or three items in flight at a time: their regions go round the
    // arena several times, each written only once the task before it there is answered.
    let pool = AsyncPool::new(1).await.unwrap();
    let items: Vec<ByteBuf> = (0..40)
        .map(|i| pattern(MB + (i * 777_777) % (3 * MB), i as u8))
        .collect();
    let got = within(pool.map(reversed, items.clone()).chunksize(1))
        .await
        .unwrap();
    for (i, (got, sent)) in got.iter().zip(&items).enumerate() {
        assert!(
            got.iter().eq(sent.iter().rev()),
            "item {i} changed on the way"
        );
    }
    // Larger than half the arena: through the socket instead.
    let huge = pattern(20 * MB, 0x3C);
    let back = within(pool.apply(reversed, (huge.clone(),))).await.unwrap();
    assert!(back.iter().eq(huge.iter().rev()));
    pool.close().await;
}

#[tokio::test]
async fn large_arguments_of_cancelled_tasks_leave_the_arena_usable() {
    let pool = AsyncPool::new(1).await.unwrap();
    let dir = support::TempDir::new("arena-cancel");
    let gate = dir.path("gate");
    // The first waits at the gate; the others are queued behind it, some in the worker.
    let items: Vec<_> = (0..5u8)
        .map(|i| (gate.clone(), ByteBuf::from(vec![i; 2 * MB])))
        .collect();
    let map = pool.starmap(gated_len, items).chunksize(1);
    let task = tokio::spawn(map);
    let sent = support::eventually_async(Duration::from_secs(60), || pool.stats().running >= 2);
    assert!(sent.await, "{:?}", pool.stats());
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // The running one's worker is replaced; what follows uses the arena as before.
    let items: Vec<ByteBuf> = (0..8).map(|i| pattern(2 * MB + i, i as u8)).collect();
    let got = within(pool.map(reversed, items.clone()).chunksize(1))
        .await
        .unwrap();
    for (got, sent) in got.iter().zip(&items) {
        assert!(got.iter().eq(sent.iter().rev()));
    }
    support::write_file(&gate, "go");
    pool.close().await;
}

#[tokio::test]
async fn a_skipped_large_argument_frees_its_place_in_the_arena() {
    // Three large tasks in one worker; the middle one's caller gives up, so the worker
    // skips it. The arena must free its region when that skip is answered.
    let pool = AsyncPool::new(1).await.unwrap();
    let dir = support::TempDir::new("arena-skip");
    let gate = dir.path("gate");
    let big = |i: u8| (gate.clone(), ByteBuf::from(vec![i; 2 * MB]));
    let first = pool.apply_async(gated_len, big(0));
    let middle = pool.apply_async(gated_len, big(1));
    let last = pool.apply_async(gated_len, big(2));
    let sent = support::eventually_async(Duration::from_secs(60), || pool.stats().running >= 3);
    assert!(sent.await, "{:?}", pool.stats());
    drop(middle);
    // The gate opens only once the pool has taken the drop in (and sent the skip): a
    // drop that reaches it after the first task ends finds the middle one running, and
    // stopping its worker is then the right answer, not the one this test is about.
    let skipped =
        support::eventually_async(Duration::from_secs(60), || pool.stats().cancelled == 1);
    assert!(skipped.await, "{:?}", pool.stats());
    support::write_file(&gate, "go");
    assert_eq!(within(first).await.unwrap(), 2 * MB);
    assert_eq!(within(last).await.unwrap(), 2 * MB);
    let items: Vec<ByteBuf> = (0..12).map(|i| pattern(3 * MB - i, i as u8)).collect();
    let got = within(pool.map(reversed, items.clone()).chunksize(1))
        .await
        .unwrap();
    for (got, sent) in got.iter().zip(&items) {
        assert!(got.iter().eq(sent.iter().rev()));
    }
    let stats = pool.stats();
    assert_eq!((stats.cancelled, stats.restarts), (1, 0), "{stats:?}");
    pool.close().await;
}

/// A large map item whose second encoding (the one made when it is sent) waits until
/// the test lets it go, and says on which thread it ran.
struct SlowToSend(ByteBuf);

static SLOW_ENCODINGS: AtomicUsize = AtomicUsize::new(0);
static SLOW_GATE: std::sync::Mutex<(bool, Option<String>)> = std::sync::Mutex::new((false, None));
static SLOW_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

impl Serialize for SlowToSend {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if SLOW_ENCODINGS.fetch_add(1, Ordering::SeqCst) == 1 {
            let mut gate = SLOW_GATE.lock().unwrap();
            gate.1 = std::thread::current().name().map(str::to_owned);
            SLOW_CHANGED.notify_all();
            while !gate.0 {
                gate = SLOW_CHANGED.wait(gate).unwrap();
            }
        }
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SlowToSend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ByteBuf::deserialize(d).map(SlowToSend)
    }
}

fn slow_len(item: SlowToSend) -> usize {
    item.0.len()
}

/// Lets the slow encoding go when dropped: a failing test must not leave a thread
/// waiting for ever (the runtime's shutdown would wait for it).
struct OpenGate;

impl Drop for OpenGate {
    fn drop(&mut self) {
        let mut gate = SLOW_GATE.lock().unwrap_or_else(|p| p.into_inner());
        gate.0 = true;
        SLOW_CHANGED.notify_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_serialize_of_a_large_item_stalls_nothing_else() {
    let open = OpenGate;
    let pool = AsyncPool::new(2).await.unwrap();
    let big = pool.map_async(slow_len, vec![SlowToSend(pattern(2 * MB, 3))]);
    // The item is being encoded for its worker (its second encoding waits)...
    let thread = {
        let mut gate = SLOW_GATE.lock().unwrap();
        let deadline = std::time::Instant::now() + support::SOON;
        while gate.1.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "the item was never encoded for sending");
            gate = SLOW_CHANGED.wait_timeout(gate, left).unwrap().0;
        }
        gate.1.clone()
    };
    assert_eq!(
        thread.as_deref(),
        Some("procpool-encode"),
        "not on a dispatcher"
    );
    // ... and meanwhile the pool answers other calls, on the other worker.
    assert_eq!(
        within(pool.apply(checked_len, (pattern(10, 1),)))
            .await
            .unwrap(),
        10
    );
    drop(open);
    assert_eq!(within(big).await.unwrap(), vec![2 * MB]);
}

/// A large item; the second encoding of one marked `slow` (the one made when it is sent)
/// writes `marker` and waits until the test lets it go; the target of one not marked
/// slow returns only once `marker` exists, so its answer comes while the slow one's
/// encoding is under way.
struct SlowSecond {
    slow: bool,
    marker: String,
    bytes: ByteBuf,
}

static SECOND_ENCODINGS: AtomicUsize = AtomicUsize::new(0);
static SECOND_GATE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
static SECOND_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

impl Serialize for SlowSecond {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.slow && SECOND_ENCODINGS.fetch_add(1, Ordering::SeqCst) == 1 {
            support::write_file(&self.marker, "encoding");
            let mut open = SECOND_GATE.lock().unwrap();
            while !*open {
                open = SECOND_CHANGED.wait(open).unwrap();
            }
        }
        (self.slow, &self.marker, &self.bytes).serialize(s)
    }
}

impl<'de> Deserialize<'de> for SlowSecond {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (slow, marker, bytes) = <(bool, String, ByteBuf)>::deserialize(d)?;
        Ok(SlowSecond {
            slow,
            marker,
            bytes,
        })
    }
}

fn second_len(item: SlowSecond) -> usize {
    if !item.slow {
        support::wait_for_file(&item.marker);
    }
    item.bytes.len()
}

struct OpenSecondGate;

impl Drop for OpenSecondGate {
    fn drop(&mut self) {
        *SECOND_GATE.lock().unwrap_or_else(|p| p.into_inner()) = true;
        SECOND_CHANGED.notify_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_serialize_behind_a_large_task_on_one_worker_holds_up_no_answer() {
    let open = OpenSecondGate;
    let dir = support::TempDir::new("slow-second");
    let marker = dir.path("encoding");
    let pool = AsyncPool::new(1).await.unwrap();
    // Both go to the one worker: the first through its arena, while the second is
    // encoded (slowly) for it; the first answers only once that encoding has begun, and
    // its answer frees its arena region.
    let items = vec![
        SlowSecond {
            slow: false,
            marker: marker.clone(),
            bytes: pattern(2 * MB, 1),
        },
        SlowSecond {
            slow: true,
            marker: marker.clone(),
            bytes: pattern(2 * MB, 2),
        },
    ];
    let mut results = pool.imap(second_len, items).chunksize(1);
    assert_eq!(within(results.next()).await.unwrap().unwrap(), 2 * MB);
    drop(open);
    assert_eq!(within(results.next()).await.unwrap().unwrap(), 2 * MB);
    assert!(within(results.next()).await.is_none());
}
