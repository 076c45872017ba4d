//! [`Imap`], the stream of `imap` and `imap_unordered`: pulls items as chunks finish,
//! sizes chunks to their work, and resubmits what follows an item that failed.

use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::answer::decode_chunk;
use super::encode::Encoded;
use crate::error::{Error, Result};
use crate::pool::Shared;
use crate::pool::message::{Reply, TaskResult};
use crate::target::TargetRef;
use crate::wire::chunk::MAX_CHUNK_ITEMS;

/// Chunks in flight per worker in an [`Imap`]: bounds its memory.
const IMAP_WINDOW_PER_WORKER: usize = 4;
/// Adaptive chunking aims for chunks of about this duration.
const IMAP_CHUNK_TARGET: Duration = Duration::from_millis(5);
const IMAP_MAX_CHUNK: usize = 4096;

/// The stream of [`AsyncPool::imap`](crate::pool::AsyncPool::imap) and
/// [`imap_unordered`](crate::pool::AsyncPool::imap_unordered) (`I` is the input
/// iterator), and of [`imap_stream`](crate::pool::AsyncPool::imap_stream) and
/// [`imap_unordered_stream`](crate::pool::AsyncPool::imap_unordered_stream) (`I` is
/// [`ImapStream`]).
///
/// Pulls items from its input only as chunks finish, with at most
/// `4 × processes` chunks in flight, so an endless input works in constant memory. A
/// stream input that has nothing yet does not hold back what it gave: those items go as
/// a smaller chunk.
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
/// Dropping the stream cancels every chunk in flight (running ones have their workers
/// stopped and replaced, unless [`kill_on_cancel`](Self::kill_on_cancel) is off).
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
    /// Its own `kill_on_cancel` (`None`: the pool's).
    kill: Option<bool>,
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
    pub(in crate::pool) fn new(
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
            kill: None,
            _r: PhantomData,
        }
    }

    /// Whether the workers of its running chunks are stopped if the stream is dropped
    /// before its end, in place of the pool's
    /// [`Builder::kill_on_cancel`](crate::pool::Builder::kill_on_cancel), as
    /// [`Apply::kill_on_cancel`](crate::pool::Apply::kill_on_cancel) for one task.
    pub fn kill_on_cancel(mut self, kill: bool) -> Self {
        self.kill = Some(kill);
        self
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
        let id = self.shared.submit(
            target,
            args,
            move |id| Reply::Many { key: id, tx },
            false,
            None,
        )?;
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

/// The input of an imap over a [`Stream`], from
/// [`AsyncPool::imap_stream`](crate::pool::AsyncPool::imap_stream) and
/// [`imap_unordered_stream`](crate::pool::AsyncPool::imap_unordered_stream): the type
/// parameter of its [`Imap`].
pub struct ImapStream<S>(Pin<Box<S>>);

impl<S> ImapStream<S> {
    pub(in crate::pool) fn new(stream: S) -> Self {
        ImapStream(Box::pin(stream))
    }
}

impl<S> std::fmt::Debug for ImapStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapStream").finish_non_exhaustive()
    }
}

/// Where an imap's items come from: an iterator (always ready), or a stream (perhaps
/// not yet: then what was pulled goes as a smaller chunk, and the stream wakes the imap).
trait Input {
    type Item;
    fn pull(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::Item>>;
    fn bounds(&self) -> (usize, Option<usize>);
}

impl<I: Iterator> Input for I {
    type Item = I::Item;

    fn pull(&mut self, _: &mut Context<'_>) -> Poll<Option<I::Item>> {
        Poll::Ready(self.next())
    }

    fn bounds(&self) -> (usize, Option<usize>) {
        self.size_hint()
    }
}

impl<S: Stream> Input for ImapStream<S> {
    type Item = S::Item;

    fn pull(&mut self, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.0.as_mut().poll_next(cx)
    }

    fn bounds(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

// Only private methods: `Input` stays out of the public interface.
#[allow(private_bounds)]
impl<R, I, T> Imap<R, I>
where
    R: DeserializeOwned + 'static,
    I: Input<Item = T>,
    T: Serialize + Send + 'static,
{
    /// Pulls items and submits chunks until the window is full (or a stream input has
    /// nothing more yet).
    fn fill(&mut self, target: TargetRef, cx: &mut Context<'_>) {
        let window = IMAP_WINDOW_PER_WORKER * self.shared.processes().max(1);
        // Results parked behind a slow chunk (ordered mode) count against the window too,
        // or a stuck head would let memory grow without bound.
        while !self.exhausted && self.inflight.len() + self.parked.len() < window {
            let size = self.chunk_size();
            let mut items = Encoded::default();
            let mut bad = None;
            let mut input = Pull {
                inner: &mut self.items,
                cx: &mut *cx,
                panicked: None,
                waiting: false,
            };
            let (res, pins) = crate::sync::collect(|| items.fill(&mut input, size));
            match (res, self.shared.local_only(&pins)) {
                (_, Err(e)) => {
                    // Nothing of this chunk goes; the stream ends with the error.
                    items = Encoded::default();
                    self.exhausted = true;
                    bad = Some(e);
                }
                // Ended, unless it only has nothing yet (a stream).
                (Ok(ended), Ok(())) => self.exhausted |= ended && !input.waiting,
                (Err(reason), Ok(())) => bad = Some(Error::encode::<T>(reason)),
            }
            items.pins = pins;
            let waiting = input.waiting;
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
            if waiting {
                // Woken by the stream when it has more.
                break;
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
            let mut rest = Encoded::default();
            // Handles among the items stay alive while the rest is in flight.
            rest.pins = std::mem::take(&mut chunk.items.pins);
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

/// The items of an [`Input`] as an iterator, for one chunk: it ends where the input
/// ends, has nothing yet (`waiting`: a stream that is not ready), or panics (keeping the
/// panic: an input that panics at item `n` still has items `..n` computed, as Python's
/// `imap` yields them, then raises).
struct Pull<'a, 'c, I> {
    inner: &'a mut I,
    cx: &'a mut Context<'c>,
    panicked: Option<Box<dyn std::any::Any + Send>>,
    waiting: bool,
}

impl<I: Input> Iterator for Pull<'_, '_, I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        if self.panicked.is_some() || self.waiting {
            return None;
        }
        // The input is never touched again after a panic.
        let (inner, cx) = (&mut *self.inner, &mut *self.cx);
        let pull = std::panic::AssertUnwindSafe(move || inner.pull(cx));
        match std::panic::catch_unwind(pull) {
            Ok(Poll::Ready(item)) => item,
            Ok(Poll::Pending) => {
                self.waiting = true;
                None
            }
            Err(payload) => {
                self.panicked = Some(payload);
                None
            }
        }
    }
}

// Only private methods: `Input` stays out of the public interface.
#[allow(private_bounds)]
impl<R, I, T> Imap<R, I>
where
    R: DeserializeOwned + 'static,
    I: Input<Item = T>,
    T: Serialize + Send + 'static,
{
    /// `poll_next` of both kinds of input.
    fn poll_items(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<R>>> {
        let this = self;
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
            this.fill(target, cx);
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

/// Over an iterator.
impl<R, I, T> Stream for Imap<R, I>
where
    R: DeserializeOwned + 'static,
    I: Iterator<Item = T> + Unpin,
    T: Serialize + Send + 'static,
{
    type Item = Result<R>;

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.remaining()
    }

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<R>>> {
        self.poll_items(cx)
    }
}

/// Over a stream ([`AsyncPool::imap_stream`](crate::pool::AsyncPool::imap_stream)).
impl<R, S, T> Stream for Imap<R, ImapStream<S>>
where
    R: DeserializeOwned + 'static,
    S: Stream<Item = T>,
    T: Serialize + Send + 'static,
{
    type Item = Result<R>;

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.remaining()
    }

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<R>>> {
        self.poll_items(cx)
    }
}

/// Ended once it has given its last item (`None` from then on), so `futures::select!`
/// can poll it in a loop.
impl<R, I, T> futures::stream::FusedStream for Imap<R, I>
where
    R: DeserializeOwned + 'static,
    I: Iterator<Item = T> + Unpin,
    T: Serialize + Send + 'static,
{
    fn is_terminated(&self) -> bool {
        self.target.is_none() && self.out.is_empty()
    }
}

/// As over an iterator.
impl<R, S, T> futures::stream::FusedStream for Imap<R, ImapStream<S>>
where
    R: DeserializeOwned + 'static,
    S: Stream<Item = T>,
    T: Serialize + Send + 'static,
{
    fn is_terminated(&self) -> bool {
        self.target.is_none() && self.out.is_empty()
    }
}

// Only private methods: `Input` stays out of the public interface.
#[allow(private_bounds)]
impl<R, I> Imap<R, I>
where
    I: Input,
{
    /// Bounds on the results still to come: those ready now, at least; at most one per
    /// item not yet given (queued, in flight, or still in the input, as far as its
    /// `size_hint` tells), plus the error of an input that panicked.
    fn remaining(&self) -> (usize, Option<usize>) {
        match &self.target {
            None => return (self.out.len(), Some(self.out.len())),
            Some(Err(_)) => return (1, Some(1)),
            Some(Ok(_)) => {}
        }
        let in_flight: usize = self.inflight.values().map(|c| c.items.len()).sum();
        let parked: usize = self.parked.values().map(|p| p.results.len()).sum();
        let known = self.out.len() + in_flight + parked + 1;
        let upper = if self.exhausted {
            Some(known)
        } else {
            self.items.bounds().1.and_then(|u| u.checked_add(known))
        };
        (self.out.len(), upper)
    }
}

impl<R, I> Drop for Imap<R, I> {
    fn drop(&mut self) {
        for &id in self.inflight.keys() {
            self.shared.cancel(id, self.kill);
        }
    }
}
