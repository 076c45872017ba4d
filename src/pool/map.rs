//! `map`, `starmap` and `imap`: many items through the pool in chunks.
//!
//! Items are encoded one by one into a single buffer when the call is made (so an item
//! that cannot be encoded fails at once); a chunk is a MessagePack array header followed
//! by a slice of that buffer, so chunking copies nothing twice. A worker runs a chunk's
//! items in order and stops at the first failing one, reporting its index; the results
//! of the items before it are kept.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::future::FusedFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::Shared;
use super::message::{Args, Deferred, Finished, Part, Reply, TaskResult};
use crate::error::{Error, Result};
use crate::target::TargetRef;
use crate::wire::spare::Spare;
use crate::wire::{Outcome, SomeCheck};

/// Items encoded back to back; `ends[i]` is where item `i` ends. A large item takes no
/// room in `buf`: it is in `deferred` (see [`Deferred`]).
#[derive(Debug, Default)]
pub(crate) struct Encoded {
    buf: Vec<u8>,
    /// `buf`, once chunks are taken from it (they share it, uncopied).
    frozen: Bytes,
    ends: Ends,
    /// The large items, by index, in order.
    deferred: Vec<(usize, Arc<Deferred>)>,
    /// Keeps queues, locks, events and pipe ends among the items alive while the items
    /// are in flight.
    pins: crate::sync::Pins,
}

/// The item ends of an [`Encoded`]; a large one goes back to a pool when dropped.
#[derive(Debug, Default)]
struct Ends(Vec<usize>);

/// Item-end vectors of at least this many entries are reused (see [`Ends`]).
const POOLED_ENDS: usize = 4096;

/// At most this many bytes of buffers are kept for reuse by each of the two pools of
/// map encodings (item bytes and item ends); larger ones are let go.
const KEPT_ENCODING: usize = 8 << 20;

/// Kept item-end vectors: the allocator gives a large block back to the system when it
/// is freed and maps a fresh one (whose first touches cost, see `wire::spare`) when the
/// next map asks for one of the same size.
static KEPT_ENDS: Spare<usize> = Spare::with_max(KEPT_ENCODING);

impl Ends {
    /// Room for `n` ends: a kept vector if `n` is large.
    fn with_capacity(n: usize) -> Ends {
        if n >= POOLED_ENDS
            && let Some(mut kept) = KEPT_ENDS.take(n)
        {
            kept.clear();
            return Ends(kept);
        }
        Ends(Vec::with_capacity(n))
    }
}

impl Drop for Ends {
    fn drop(&mut self) {
        if self.0.capacity() >= POOLED_ENDS {
            KEPT_ENDS.put(std::mem::take(&mut self.0));
        }
    }
}

impl std::ops::Deref for Ends {
    type Target = Vec<usize>;
    fn deref(&self) -> &Vec<usize> {
        &self.0
    }
}

impl std::ops::DerefMut for Ends {
    fn deref_mut(&mut self) -> &mut Vec<usize> {
        &mut self.0
    }
}

/// Kept buffers for the encoded items of maps (see [`KEPT_ENDS`]).
fn encode_buffers() -> &'static Arc<Spare> {
    static KEPT: std::sync::OnceLock<Arc<Spare>> = std::sync::OnceLock::new();
    KEPT.get_or_init(|| Arc::new(Spare::with_max(KEPT_ENCODING)))
}

/// Items that encode to more than this many bytes (counting small writes only up to
/// here, see [`Capped`]) are encoded again when sent instead of being kept encoded (see
/// [`Deferred`]); under it, a second encoding costs more than it saves.
const DEFER_SIZE: usize = 1 << 20;

/// Writes of at most this many bytes are always stored (see [`Capped`]).
const SMALL_WRITE: usize = 16;

/// The encoder's output for [`Encoded::fill`]: an item's first `limit` bytes go into
/// `buf`, the rest are only counted, except for small writes (so an item counts as
/// large when its strings and byte strings make it so).
struct Capped<'a> {
    buf: &'a mut Vec<u8>,
    /// Where the current item starts.
    start: usize,
    /// Where it must end to be stored whole; 0 once it did not.
    end: usize,
    /// Bytes of the current item counted, not stored.
    over: usize,
}

impl<'a> Capped<'a> {
    /// An encoder appending to `buf`, as `wire::encode_value` encodes (structs as maps;
    /// values are written through `wire::SomeCheck`, see `encode_item`).
    fn serializer(buf: &'a mut Vec<u8>) -> CappedSerializer<'a> {
        let out = Capped {
            buf,
            start: 0,
            end: 0,
            over: 0,
        };
        rmp_serde::Serializer::new(out).with_struct_map()
    }

    fn begin(&mut self, limit: usize) {
        self.start = self.buf.len();
        self.end = self.start.saturating_add(limit);
        self.over = 0;
    }

    /// The current item's size, stored or not.
    fn item_len(&self) -> usize {
        self.buf.len() - self.start + self.over
    }
}

impl std::io::Write for Capped<'_> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    #[inline(always)]
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        // Markers and numbers (a known, small size once inlined) are stored as a `Vec`
        // would store them; the limit is for the copies of strings and byte strings.
        if data.len() <= SMALL_WRITE || self.buf.len() + data.len() <= self.end {
            self.buf.extend_from_slice(data);
        } else {
            self.end = 0;
            self.over += data.len();
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type CappedSerializer<'a> = rmp_serde::Serializer<
    Capped<'a>,
    rmp_serde::config::StructMapConfig<rmp_serde::config::DefaultConfig>,
>;

/// Appends `item`'s encoding to the serializer's buffer, or, for a large item that took
/// no handle, nothing: it is returned to be encoded again when sent. Run it inside
/// [`crate::sync::collect`]. An item that fails to encode leaves nothing behind.
fn encode_item<T: Serialize + Send + 'static>(
    ser: &mut CappedSerializer<'_>,
    item: T,
) -> std::result::Result<Option<Deferred>, String> {
    ser.get_mut().begin(DEFER_SIZE);
    let pins = crate::sync::pins_taken();
    let mut res = item.serialize(SomeCheck::new(&mut *ser));
    let out = ser.get_mut();
    if res.is_ok() && out.over > 0 {
        let len = out.item_len();
        out.buf.truncate(out.start);
        let taken = crate::sync::pins_taken() - pins;
        if taken == 0 {
            return Ok(Some(Deferred::new(item, len)));
        }
        // Handles are pinned once, by the encoding that is sent: this one.
        crate::sync::unpin_last(taken);
        ser.get_mut().begin(usize::MAX);
        res = item.serialize(SomeCheck::new(&mut *ser));
    }
    if let Err(e) = res {
        let out = ser.get_mut();
        out.buf.truncate(out.start);
        return Err(e.to_string());
    }
    Ok(None)
}

/// Encodes the arguments of one call (as [`Encoded::fill`] does an item of a map: a
/// large one is deferred), with the pins its handles took.
pub(crate) fn encode_call_args<T: Serialize + Send + 'static>(
    args: T,
) -> (std::result::Result<Args, String>, crate::sync::Pins) {
    crate::sync::collect(|| {
        let mut buf = Vec::new();
        let deferred = encode_item(&mut Capped::serializer(&mut buf), args)?;
        Ok(match deferred {
            Some(item) => Args {
                rest: Some(Arc::new([Part::Deferred(Arc::new(item))])),
                ..Args::default()
            },
            None => Args::from(Bytes::from(buf)),
        })
    })
}

impl Encoded {
    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Appends items until `limit` are held or `items` ends (then returns true), with
    /// one encoder for all of them. Run it inside [`crate::sync::collect`] (once for many
    /// items: it is not free) and keep the pins in `self.pins`. An item that fails to
    /// encode leaves nothing behind and is the error.
    fn fill<T: Serialize + Send + 'static>(
        &mut self,
        items: &mut impl Iterator<Item = T>,
        limit: usize,
    ) -> std::result::Result<bool, String> {
        if crate::wire::scalar::handles::<T>() {
            // Plain numbers: they always encode, are never large and hold no handle.
            // (Worked on as locals: the compiler keeps their lengths in registers.)
            let mut buf = std::mem::take(&mut self.buf);
            let mut ends = std::mem::take(&mut self.ends.0);
            let mut done = false;
            while ends.len() < limit {
                let Some(item) = items.next() else {
                    done = true;
                    break;
                };
                crate::wire::scalar::encode(&item, &mut buf);
                ends.push(buf.len());
            }
            self.buf = buf;
            self.ends.0 = ends;
            return Ok(done);
        }
        let mut ser = Capped::serializer(&mut self.buf);
        while self.ends.len() < limit {
            let Some(item) = items.next() else {
                return Ok(true);
            };
            if let Some(item) = encode_item(&mut ser, item)? {
                self.deferred.push((self.ends.len(), Arc::new(item)));
            }
            self.ends.push(ser.get_ref().buf.len());
        }
        Ok(false)
    }

    /// Where item `i` starts in `buf`.
    fn start(&self, i: usize) -> usize {
        if i == 0 { 0 } else { self.ends[i - 1] }
    }

    /// Items `range` as one MessagePack array: a header, then the items, not copied.
    /// No item is pushed after the first chunk is taken.
    fn chunk(&mut self, range: std::ops::Range<usize>) -> Args {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let len = buf.len();
            // Back to the pool once the last chunk's bytes are let go.
            self.frozen = encode_buffers().share(buf, len);
        }
        let (start, end) = (self.start(range.start), self.ends[range.end - 1]);
        let mut head = Vec::with_capacity(5);
        // Writing into a Vec cannot fail.
        let Ok(n) = u32::try_from(range.len()) else {
            unreachable!("a chunk holds at most MAX_CHUNK_ITEMS items");
        };
        drop(rmp::encode::write_array_len(&mut head, n));
        let from = self.deferred.partition_point(|(i, _)| *i < range.start);
        let to = self.deferred.partition_point(|(i, _)| *i < range.end);
        if from == to {
            return Args {
                head: Bytes::from(head),
                body: self.frozen.slice(start..end),
                rest: None,
            };
        }
        let mut rest = Vec::with_capacity(2 * (to - from) + 1);
        let mut at = start;
        for (i, item) in &self.deferred[from..to] {
            let here = self.start(*i);
            if here > at {
                rest.push(Part::Bytes(self.frozen.slice(at..here)));
            }
            rest.push(Part::Deferred(Arc::clone(item)));
            at = here;
        }
        if end > at {
            rest.push(Part::Bytes(self.frozen.slice(at..end)));
        }
        Args {
            head: Bytes::from(head),
            body: Bytes::new(),
            rest: Some(rest.into()),
        }
    }

    /// Appends item `i` of `other` (to resubmit the rest of a chunk).
    fn push_item(&mut self, other: &Encoded, i: usize) {
        let all = if other.frozen.is_empty() {
            &other.buf[..]
        } else {
            &other.frozen[..]
        };
        self.buf
            .extend_from_slice(&all[other.start(i)..other.ends[i]]);
        if let Ok(k) = other.deferred.binary_search_by_key(&i, |(j, _)| *j) {
            let item = Arc::clone(&other.deferred[k].1);
            self.deferred.push((self.ends.len(), item));
        }
        self.ends.push(self.buf.len());
    }
}

/// Encodes every item now; the first that fails is the error.
pub(crate) fn encode_items<T: Serialize + Send + 'static, I: IntoIterator<Item = T>>(
    items: I,
) -> Result<Encoded> {
    let mut items = items.into_iter();
    let mut enc = Encoded::default();
    let expect = items.size_hint().0;
    enc.ends = Ends::with_capacity(expect);
    if expect >= POOLED_ENDS
        && let Some(mut buf) = encode_buffers().take(0)
    {
        buf.clear();
        enc.buf = buf;
    }
    let (res, pins) = crate::sync::collect(|| enc.fill(&mut items, usize::MAX));
    enc.pins = pins;
    res.map_err(Error::encode::<T>)?;
    Ok(enc)
}

/// Python's default: `ceil(len / (4 * processes))`.
fn default_chunksize(len: usize, processes: usize) -> usize {
    len.div_ceil(4 * processes.max(1)).max(1)
}

/// Decodes `bytes` as a chunk's answer, as a map and an imap would, for a few result
/// types (the fuzz targets' entry; see `crate::fuzz`).
pub(crate) fn fuzz_chunk_answer(bytes: &[u8]) {
    fn both<R: DeserializeOwned + 'static>(bytes: &[u8]) {
        let done = || Finished {
            outcome: Outcome::Value(serde_bytes::ByteBuf::from(bytes.to_vec())),
            worker: Arc::from("fuzz"),
        };
        drop(decode_chunk::<R>(done()));
        let mut values = Vec::new();
        drop(decode_chunk_into::<R>(done(), &mut values));
    }
    both::<i64>(bytes);
    both::<u8>(bytes);
    both::<bool>(bytes);
    both::<f64>(bytes);
    both::<String>(bytes);
    both::<serde_bytes::ByteBuf>(bytes);
    both::<(u32, Option<String>)>(bytes);
    both::<Vec<i64>>(bytes);
}

/// Decodes a chunk's answer: its values, or the error that stopped it (with how many
/// items ran before it).
fn decode_chunk<R: DeserializeOwned + 'static>(done: Finished) -> (Vec<R>, Option<Error>) {
    let mut values = Vec::new();
    let err = decode_chunk_into(done, &mut values);
    (values, err)
}

/// Appends a chunk's values to `values` as they are decoded (no vector of its own), and
/// returns the error that stopped the chunk, if one did.
fn decode_chunk_into<R: DeserializeOwned + 'static>(
    done: Finished,
    values: &mut Vec<R>,
) -> Option<Error> {
    let failed = |outcome: &Outcome| outcome.to_result::<()>(&done.worker).err();
    let bytes = match &done.outcome {
        Outcome::Value(bytes) => bytes,
        other => return Some(failed(other).unwrap_or(Error::Cancelled)),
    };
    match read_chunk_output(bytes, values) {
        Ok(None) => None,
        Ok(Some((_, failure))) => Some(failed(&failure).unwrap_or(Error::Cancelled)),
        Err(reason) => Some(Error::decode::<R>(reason)),
    }
}

/// Reads what a chunk sends back (see `target::ChunkWriter`), appending its values to
/// `values`; returns the failure that stopped the chunk, if one did.
fn read_chunk_output<R: DeserializeOwned + 'static>(
    bytes: &[u8],
    values: &mut Vec<R>,
) -> std::result::Result<Option<(u32, Outcome)>, String> {
    let mut rest = bytes;
    let pair = rmp::decode::read_array_len(&mut rest).map_err(|e| e.to_string())?;
    if pair != 2 {
        return Err(format!("a chunk's answer has {pair} parts, not 2"));
    }
    let n = rmp::decode::read_array_len(&mut rest).map_err(|e| e.to_string())?;
    let mut reader = crate::wire::ValueReader::new::<R>(rest);
    reader.read_into(n, values)?;
    reader.next::<Option<(u32, Outcome)>>()
}

// --------------------------------------------------------------------------- Map

/// The future of [`AsyncPool::map`](super::AsyncPool::map) and
/// [`starmap`](super::AsyncPool::starmap): resolves with every result in input order.
///
/// Submits its chunks when first polled. Options go before that:
/// [`chunksize`](Self::chunksize), [`timeout`](Self::timeout).
///
/// # Drop
///
/// Dropping it cancels every chunk not yet finished (queued ones are removed, running
/// ones have their workers stopped and replaced).
#[must_use = "futures do nothing unless polled"]
pub struct Map<R> {
    shared: Arc<Shared>,
    input: Option<Result<(TargetRef, Encoded)>>,
    chunksize: Option<usize>,
    timeout: Option<Duration>,
    run: Option<MapRun<R>>,
    /// It gave its result: polled again, it answers [`Error::AlreadyCompleted`].
    done: bool,
}

// Nothing is pinned inside: results are plain values, never polled in place.
impl<R> Unpin for Map<R> {}

struct MapRun<R> {
    rx: mpsc::UnboundedReceiver<(u64, TaskResult)>,
    ids: Vec<u64>,
    /// The values of chunks `..next`, in order: a chunk answered in its turn is decoded
    /// straight into it.
    all: Vec<R>,
    next: usize,
    /// `Some` for each chunk answered: the values of one answered before its turn
    /// (empty once moved into `all`, or if it went straight there).
    results: Vec<Option<Vec<R>>>,
    remaining: usize,
    sleep: Option<Pin<Box<Sleep>>>,
    after: Duration,
    /// Held until the map is over (see [`Encoded`]).
    _pins: crate::sync::Pins,
    /// What is left to submit: chunks `next_chunk..` of `items`, `size` items each, as
    /// the queue has room (see `Builder::max_queued`).
    target: TargetRef,
    items: Encoded,
    size: usize,
    next_chunk: usize,
    /// Dropped once every chunk is submitted: then the channel ends only when every
    /// chunk's answer (or the dispatcher) is gone.
    tx: Option<mpsc::UnboundedSender<(u64, TaskResult)>>,
    admission: super::Admission,
}

impl<R> MapRun<R> {
    /// Submits chunks while the queue has room; `Err` if one cannot be submitted (the
    /// ones submitted are cancelled by the map's drop).
    fn submit_more(&mut self, shared: &Shared, cx: &mut Context<'_>) -> Result<()> {
        let n = self.items.len();
        while self.next_chunk * self.size < n {
            match shared.poll_admit(&mut self.admission, cx) {
                // Closed: `submit` says so.
                Poll::Ready(_) => {}
                Poll::Pending => return Ok(()),
            }
            let (idx, start) = (self.next_chunk, self.next_chunk * self.size);
            let Some(tx) = self.tx.clone() else {
                unreachable!("the sender is kept until the last chunk is submitted");
            };
            let reply = Reply::Many {
                key: u64::try_from(idx).unwrap_or(u64::MAX),
                tx,
            };
            let args = self.items.chunk(start..(start + self.size).min(n));
            let id = shared.submit(self.target, args, |_| reply, true)?;
            self.ids.push(id);
            self.next_chunk += 1;
        }
        self.tx = None;
        Ok(())
    }
}

impl<R> std::fmt::Debug for Map<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map")
            .field("chunksize", &self.chunksize)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<R> Map<R> {
    pub(super) fn new(
        shared: Arc<Shared>,
        target: Result<TargetRef>,
        items: Result<Encoded>,
    ) -> Self {
        Map {
            shared,
            input: Some(target.and_then(|t| Ok((t, items?)))),
            chunksize: None,
            timeout: None,
            run: None,
            done: false,
        }
    }

    /// Items per chunk (per message to a worker). Default: `ceil(len / (4 * processes))`.
    /// 0 makes the map resolve with [`Error::InvalidConfig`].
    pub fn chunksize(mut self, n: usize) -> Self {
        self.chunksize = Some(n);
        self
    }

    /// Gives up after `d` from the first poll with [`Error::Timeout`], cancelling every
    /// chunk not finished. A tokio timer, as [`Apply::timeout`](super::Apply::timeout)'s.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    fn start(&mut self) -> Result<Option<Vec<R>>> {
        let (target, mut items) = self.input.take().ok_or(Error::AlreadyCompleted)??;
        if self.chunksize == Some(0) {
            return Err(Error::InvalidConfig {
                reason: "a map's chunksize must be at least 1".into(),
            });
        }
        let n = items.len();
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
        let size = self
            .chunksize
            .unwrap_or_else(|| default_chunksize(n, self.shared.processes()))
            .min(MAX_CHUNK_ITEMS);
        let (tx, rx) = mpsc::unbounded_channel();
        let chunks = n.div_ceil(size);
        let pins = std::mem::take(&mut items.pins);
        self.run = Some(MapRun {
            rx,
            ids: Vec::with_capacity(chunks),
            all: Vec::with_capacity(n),
            next: 0,
            results: (0..chunks).map(|_| None).collect(),
            remaining: chunks,
            sleep: self.timeout.map(|d| Box::pin(tokio::time::sleep(d))),
            after: self.timeout.unwrap_or_default(),
            _pins: pins,
            target,
            items,
            size,
            next_chunk: 0,
            tx: Some(tx),
            admission: super::Admission::default(),
        });
        Ok(None)
    }
}

impl<R: DeserializeOwned + 'static> Future for Map<R> {
    type Output = Result<Vec<R>>;

    /// Polled again after its result: [`Error::AlreadyCompleted`].
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<R>>> {
        if self.done {
            return Poll::Ready(Err(Error::AlreadyCompleted));
        }
        let res = ready!(self.poll_run(cx));
        self.done = true;
        Poll::Ready(res)
    }
}

impl<R: DeserializeOwned + 'static> FusedFuture for Map<R> {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl<R: DeserializeOwned + 'static> Map<R> {
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<R>>> {
        let this = self;
        if this.run.is_none() {
            match this.start() {
                Ok(None) => {}
                Ok(Some(empty)) => return Poll::Ready(Ok(empty)),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let Some(run) = this.run.as_mut() else {
            return Poll::Ready(Err(Error::AlreadyCompleted));
        };
        if let Err(e) = run.submit_more(&this.shared, cx) {
            return Poll::Ready(Err(e));
        }
        while let Poll::Ready(msg) = run.rx.poll_recv(cx) {
            let Some((key, res)) = msg else {
                // Every sender dropped without an answer: the dispatcher is gone.
                return Poll::Ready(Err(Error::PoolClosed));
            };
            // The key is the chunk's index (see `submit_more`).
            let idx = usize::try_from(key).unwrap_or(usize::MAX);
            if run.results.get(idx).is_none_or(Option::is_some) {
                continue; // answered once already
            }
            run.remaining -= 1;
            // Answered: Drop leaves it alone (and, on an error, cancels the rest).
            run.results[idx] = Some(Vec::new());
            let done = match res {
                Ok(done) => done,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if idx == run.next {
                if let Some(e) = decode_chunk_into(done, &mut run.all) {
                    return Poll::Ready(Err(e));
                }
                run.next += 1;
                // Chunks answered before their turn, now in it.
                while let Some(Some(values)) = run.results.get_mut(run.next) {
                    run.all.append(values);
                    run.next += 1;
                }
            } else {
                let (values, err) = decode_chunk::<R>(done);
                if let Some(e) = err {
                    return Poll::Ready(Err(e));
                }
                run.results[idx] = Some(values);
            }
            if run.remaining == 0 {
                let all = std::mem::take(&mut run.all);
                this.run = None;
                return Poll::Ready(Ok(all));
            }
        }
        if let Some(sleep) = run.sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(Error::Timeout { after: run.after }));
        }
        Poll::Pending
    }
}

impl<R> Drop for Map<R> {
    fn drop(&mut self) {
        if let Some(run) = &self.run {
            for (id, res) in run.ids.iter().zip(&run.results) {
                if res.is_none() {
                    self.shared.cancel(*id);
                }
            }
        }
    }
}

/// A chunk's array header holds a 32-bit length: larger chunk sizes act as this.
const MAX_CHUNK_ITEMS: usize = u32::MAX as usize;

// -------------------------------------------------------------------------- Imap

/// Chunks in flight per worker in an [`Imap`]: bounds its memory.
const IMAP_WINDOW_PER_WORKER: usize = 4;
/// Adaptive chunking aims for chunks of about this duration.
const IMAP_CHUNK_TARGET: Duration = Duration::from_millis(5);
const IMAP_MAX_CHUNK: usize = 4096;

/// The stream of [`AsyncPool::imap`](super::AsyncPool::imap) and
/// [`imap_unordered`](super::AsyncPool::imap_unordered).
///
/// Pulls items from its iterator only as chunks finish, with at most
/// `4 × processes` chunks in flight, so an endless iterator works in constant memory.
/// Chunks start at one item and adapt to about 5 ms of work each; set a fixed size with
/// [`chunksize`](Self::chunksize) before the first poll.
///
/// An item that panics, that cannot be encoded here or decoded in the worker, or whose
/// result cannot be encoded, is that item's `Err`; the stream goes on, and the items
/// around it in its chunk keep their results.
/// A worker that dies fails the items of the chunk it was running.
///
/// # Drop
///
/// Dropping the stream cancels every chunk in flight.
#[must_use = "streams do nothing unless polled"]
pub struct Imap<R, I> {
    shared: Arc<Shared>,
    target: Option<Result<TargetRef>>,
    items: I,
    exhausted: bool,
    ordered: bool,
    fixed_chunk: Option<usize>,
    /// Seconds per item, smoothed: drives the adaptive chunk size.
    per_item: Option<f64>,
    tx: mpsc::UnboundedSender<(u64, TaskResult)>,
    rx: mpsc::UnboundedReceiver<(u64, TaskResult)>,
    /// Chunks in flight by task id.
    inflight: BTreeMap<u64, Chunk>,
    next_seq: u64,
    /// Ordered mode: results by sequence number, waiting for their turn.
    parked: BTreeMap<u64, Parked<R>>,
    emit_seq: u64,
    out: VecDeque<Result<R>>,
    /// The input iterator panicked: the last item, once everything before it is out.
    input_panic: Option<Error>,
    _r: PhantomData<fn() -> R>,
}

// Nothing is pinned inside: results are plain values, never polled in place.
impl<R, I: Unpin> Unpin for Imap<R, I> {}

/// A chunk in flight: its items (kept to resubmit the rest after a failing item).
struct Chunk {
    seq: u64,
    items: Encoded,
    sent: Instant,
}

struct Parked<R> {
    results: Vec<Result<R>>,
    complete: bool,
}

impl<R, I> std::fmt::Debug for Imap<R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imap")
            .field("ordered", &self.ordered)
            .field("in_flight", &self.inflight.len())
            .finish_non_exhaustive()
    }
}

impl<R, I> Imap<R, I> {
    pub(super) fn new(
        shared: Arc<Shared>,
        target: Result<TargetRef>,
        items: I,
        ordered: bool,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Imap {
            shared,
            target: Some(target),
            items,
            exhausted: false,
            ordered,
            fixed_chunk: None,
            per_item: None,
            tx,
            rx,
            inflight: BTreeMap::new(),
            next_seq: 0,
            parked: BTreeMap::new(),
            emit_seq: 0,
            out: VecDeque::new(),
            input_panic: None,
            _r: PhantomData,
        }
    }

    /// Items per chunk, fixed. Default: adaptive (see the type's docs). 0 makes the
    /// stream's one item [`Error::InvalidConfig`].
    pub fn chunksize(mut self, n: usize) -> Self {
        if n == 0 {
            self.target = Some(Err(Error::InvalidConfig {
                reason: "imap's chunksize must be at least 1".into(),
            }));
        }
        self.fixed_chunk = Some(n.max(1));
        self
    }

    fn chunk_size(&self) -> usize {
        if let Some(n) = self.fixed_chunk {
            return n.min(MAX_CHUNK_ITEMS);
        }
        match self.per_item {
            None => 1,
            Some(s) if s <= 0.0 => IMAP_MAX_CHUNK,
            Some(s) => ((IMAP_CHUNK_TARGET.as_secs_f64() / s) as usize).clamp(1, IMAP_MAX_CHUNK),
        }
    }

    fn submit(&mut self, target: TargetRef, seq: u64, mut items: Encoded) -> Result<()> {
        let tx = self.tx.clone();
        let args = items.chunk(0..items.len());
        // Not counted against `max_queued`: an imap keeps a few chunks per worker in
        // flight on its own (`IMAP_WINDOW_PER_WORKER`).
        let id = self
            .shared
            .submit(target, args, move |id| Reply::Many { key: id, tx }, false)?;
        self.inflight.insert(
            id,
            Chunk {
                seq,
                items,
                sent: Instant::now(),
            },
        );
        Ok(())
    }

    fn deliver(&mut self, seq: u64, results: Vec<Result<R>>, complete: bool) {
        if !self.ordered {
            self.out.extend(results);
            return;
        }
        let p = self.parked.entry(seq).or_insert(Parked {
            results: Vec::new(),
            complete: false,
        });
        p.results.extend(results);
        p.complete |= complete;
        while let Some(p) = self.parked.get_mut(&self.emit_seq) {
            self.out.extend(p.results.drain(..));
            if !p.complete {
                break;
            }
            self.parked.remove(&self.emit_seq);
            self.emit_seq += 1;
        }
    }
}

impl<R, I, T> Imap<R, I>
where
    R: DeserializeOwned + 'static,
    I: Iterator<Item = T>,
    T: Serialize + Send + 'static,
{
    /// Pulls items and submits chunks until the window is full.
    fn fill(&mut self, target: TargetRef) {
        let window = IMAP_WINDOW_PER_WORKER * self.shared.processes().max(1);
        // Results parked behind a slow chunk (ordered mode) count against the window too,
        // or a stuck head would let memory grow without bound.
        while !self.exhausted && self.inflight.len() + self.parked.len() < window {
            let size = self.chunk_size();
            let mut items = Encoded::default();
            let mut bad = None;
            let mut input = CatchPanic {
                inner: &mut self.items,
                panicked: None,
            };
            let (res, pins) = crate::sync::collect(|| items.fill(&mut input, size));
            items.pins = pins;
            match res {
                Ok(ended) => self.exhausted |= ended,
                Err(reason) => bad = Some(Error::encode::<T>(reason)),
            }
            if let Some(payload) = input.panicked {
                // What was pulled before the panic is sent; the panic is the stream's
                // last item, after every result (also in completion order).
                let (message, _) = crate::target::panic_details(&*payload);
                self.exhausted = true;
                self.input_panic = Some(Error::Panicked {
                    message: format!("the input iterator of imap panicked: {message}"),
                    location: None,
                    name: crate::runtime::current_process().name().to_owned(),
                });
            }
            if items.len() > 0 {
                let seq = self.next_seq;
                self.next_seq += 1;
                if let Err(e) = self.submit(target, seq, items) {
                    self.deliver(seq, vec![Err(e)], true);
                    self.exhausted = true;
                }
            }
            if let Some(e) = bad {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.deliver(seq, vec![Err(e)], true);
            }
        }
    }

    fn on_result(&mut self, target: TargetRef, id: u64, res: TaskResult) {
        let Some(mut chunk) = self.inflight.remove(&id) else {
            return;
        };
        let n = chunk.items.len();
        let (values, err) = match res {
            Ok(done) => decode_chunk::<R>(done),
            Err(e) => (Vec::new(), Some(e)),
        };
        let ran = values.len();
        if err.is_none() && n > 0 {
            let s = chunk.sent.elapsed().as_secs_f64() / n as f64;
            self.per_item = Some(self.per_item.map_or(s, |p| 0.7 * p + 0.3 * s));
        }
        let mut results: Vec<Result<R>> = values.into_iter().map(Ok).collect();
        let Some(err) = err else {
            self.deliver(chunk.seq, results, true);
            return;
        };
        let item_failed = matches!(
            err,
            Error::Panicked { .. } | Error::Encode { .. } | Error::Decode { .. }
        );
        if item_failed && ran < n {
            // The item at `ran` failed; the ones after it never ran: send them again.
            results.push(Err(err));
            let mut rest = Encoded {
                // Handles among the items stay alive while the rest is in flight.
                pins: std::mem::take(&mut chunk.items.pins),
                ..Encoded::default()
            };
            for i in ran + 1..n {
                rest.push_item(&chunk.items, i);
            }
            let complete = rest.len() == 0;
            self.deliver(chunk.seq, results, complete);
            if !complete && let Err(e) = self.submit(target, chunk.seq, rest) {
                self.deliver(chunk.seq, vec![Err(e)], true);
            }
        } else {
            // The worker died, timed out or the pool closed: every item not answered gets
            // that error (which of them was running is unknown).
            for _ in ran + 1..n {
                results.push(Err(err.duplicate()));
            }
            results.push(Err(err));
            self.deliver(chunk.seq, results, true);
        }
    }
}

/// An iterator that ends where its inner one panics, keeping the panic: an input that
/// panics at item `n` still has items `..n` computed (Python's `imap` yields them, then
/// raises).
struct CatchPanic<'a, I> {
    inner: &'a mut I,
    panicked: Option<Box<dyn std::any::Any + Send>>,
}

impl<I: Iterator> Iterator for CatchPanic<'_, I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        if self.panicked.is_some() {
            return None;
        }
        // The inner iterator is never touched again after a panic.
        let inner = std::panic::AssertUnwindSafe(&mut *self.inner);
        match std::panic::catch_unwind(move || { inner }.0.next()) {
            Ok(item) => item,
            Err(payload) => {
                self.panicked = Some(payload);
                None
            }
        }
    }
}

impl<R, I, T> Stream for Imap<R, I>
where
    R: DeserializeOwned + 'static,
    I: Iterator<Item = T> + Unpin,
    T: Serialize + Send + 'static,
{
    type Item = Result<R>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<R>>> {
        let this = &mut *self;
        let target = match this.target.take() {
            None => return Poll::Ready(None),
            Some(Err(e)) => {
                // The target itself cannot run: one error, then the end.
                return Poll::Ready(Some(Err(e)));
            }
            Some(Ok(t)) => t,
        };
        this.target = Some(Ok(target));
        loop {
            if let Some(r) = this.out.pop_front() {
                return Poll::Ready(Some(r));
            }
            this.fill(target);
            if let Some(r) = this.out.pop_front() {
                return Poll::Ready(Some(r));
            }
            if this.inflight.is_empty() && this.exhausted {
                this.target = None;
                return Poll::Ready(this.input_panic.take().map(Err));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some((id, res))) => this.on_result(target, id, res),
                // Unreachable while `self.tx` lives; end rather than spin.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<R, I> Drop for Imap<R, I> {
    fn drop(&mut self) {
        for &id in self.inflight.keys() {
            self.shared.cancel(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    /// The bytes a worker would receive for `args`.
    fn sent(args: &Args) -> Vec<u8> {
        let mut out = [&args.head[..], &args.body[..]].concat();
        for part in args.rest.iter().flat_map(|r| r.iter()) {
            match part {
                Part::Bytes(b) => out.extend_from_slice(b),
                Part::Deferred(d) => d.encode_into(&mut out).unwrap(),
            }
        }
        assert_eq!(out.len(), args.len());
        out
    }

    #[test]
    fn deferred_items_reach_the_worker_as_if_encoded_up_front() {
        // Encoded sizes: a 1..5 byte header, then the bytes.
        let sizes = [
            10,
            DEFER_SIZE + 5,
            3,
            DEFER_SIZE,
            DEFER_SIZE - 10,
            2 * DEFER_SIZE,
        ];
        let items: Vec<ByteBuf> = sizes
            .iter()
            .map(|&n| ByteBuf::from(vec![n as u8; n]))
            .collect();
        let mut enc = encode_items(items.clone()).unwrap();
        let deferred: Vec<usize> = enc.deferred.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            deferred,
            [1, 3, 5],
            "only items over DEFER_SIZE encoded are deferred"
        );
        for range in [0..6, 1..4, 2..3, 0..1, 3..6, 5..6] {
            let want = rmp_serde::to_vec_named(&items[range.clone()]).unwrap();
            assert!(sent(&enc.chunk(range.clone())) == want, "chunk {range:?}");
        }
        // The rest of a chunk, resubmitted after its first item failed.
        let mut rest = Encoded::default();
        for i in 1..6 {
            rest.push_item(&enc, i);
        }
        let want = rmp_serde::to_vec_named(&items[1..]).unwrap();
        assert!(sent(&rest.chunk(0..5)) == want);
    }

    /// Encodes differently each time.
    struct Fickle(std::sync::atomic::AtomicUsize);

    impl Serialize for Fickle {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            s.serialize_bytes(&vec![0; DEFER_SIZE + n])
        }
    }

    #[test]
    fn an_item_that_encodes_differently_when_sent_is_an_error_and_leaves_nothing() {
        let mut enc = encode_items([Fickle(0.into())]).unwrap();
        let args = enc.chunk(0..1);
        let Some(Part::Deferred(d)) = args.rest.as_deref().and_then(|r| r.first()) else {
            panic!("a large item is deferred");
        };
        let mut out = vec![1, 2, 3];
        match d.encode_into(&mut out) {
            Err(Error::Encode { type_name, reason }) => {
                assert!(type_name.ends_with("Fickle"), "{type_name}");
                assert!(reason.contains("encoded again"), "{reason}");
            }
            other => panic!("expected an Encode error, got {other:?}"),
        }
        assert_eq!(out, [1, 2, 3]);
    }

    /// Writes a string, then fails: leaves a part of itself behind in the writer.
    struct HalfWritten;
    impl Serialize for HalfWritten {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            use serde::ser::SerializeTuple;
            let mut t = s.serialize_tuple(2)?;
            t.serialize_element("written")?;
            Err(serde::ser::Error::custom("then failed"))
        }
    }

    #[test]
    fn a_chunk_answer_reads_back_whole_and_without_a_failed_value() {
        let mut w = crate::target::ChunkWriter::new::<(u32, String)>(0);
        w.push(&(1u32, "one".to_string())).unwrap();
        w.push(&(2u32, "two".to_string())).unwrap();
        assert!(w.push(&HalfWritten).is_err());
        let failure = Some((
            2,
            Outcome::Panicked {
                message: "no".into(),
                location: None,
            },
        ));
        let bytes = w.finish(&failure).unwrap();
        // What the parent decoded before values were written one by one.
        type Answer = (Vec<(u32, String)>, Option<(u32, Outcome)>);
        let (values, fail): Answer = crate::wire::decode_value(&bytes).unwrap();
        assert_eq!(values, [(1, "one".into()), (2, "two".into())]);
        assert_eq!(format!("{fail:?}"), format!("{failure:?}"));
        let mut read = vec![(0u32, "before".to_string())];
        let fail = read_chunk_output(&bytes, &mut read).unwrap();
        assert_eq!(
            read,
            [(0, "before".into()), (1, "one".into()), (2, "two".into())]
        );
        assert_eq!(format!("{fail:?}"), format!("{failure:?}"));
        // An answer that claims more values than it holds is an error, not a huge
        // reservation or a panic.
        let mut lying = vec![0x92, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(read_chunk_output::<u32>(&lying, &mut Vec::new()).is_err());
        lying[0] = 0x93;
        assert!(read_chunk_output::<u32>(&lying, &mut Vec::new()).is_err());
    }

    #[test]
    fn items_and_arguments_that_would_arrive_as_none_are_refused_when_encoded() {
        match encode_items([Some(Some(1u8)), Some(None)]) {
            Err(Error::Encode { type_name, reason }) => {
                assert!(
                    type_name.contains("Option<core::option::Option<u8>>"),
                    "{type_name}"
                );
                assert!(reason.contains("the same bytes as `None`"), "{reason}");
            }
            other => panic!("expected Encode, got {other:?}"),
        }
        assert!(encode_call_args((Some(()),)).0.is_err());
        // A large item is checked too (its first encoding is the check).
        let big = (ByteBuf::from(vec![0; DEFER_SIZE + 1]), Some(None::<u8>));
        assert!(encode_items([big]).is_err());
        assert!(encode_call_args((Some(Some(2u8)), None::<()>)).0.is_ok());
    }
}
