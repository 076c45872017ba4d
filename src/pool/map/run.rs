//! [`Map`], the future of `map` and `starmap`: submits an [`Encoded`]'s chunks as the
//! queue has room and puts their answers back in input order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::FusedFuture;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Sleep;

use super::answer::{decode_chunk, decode_chunk_into};
use super::encode::Encoded;
use crate::error::{Error, Result};
use crate::pool::message::{Reply, TaskResult};
use crate::pool::{Admission, Shared};
use crate::target::TargetRef;
use crate::wire::chunk::MAX_CHUNK_ITEMS;

/// The future of [`AsyncPool::map`](crate::pool::AsyncPool::map) and
/// [`starmap`](crate::pool::AsyncPool::starmap): resolves with every result in input
/// order.
///
/// Submits its chunks when first polled. Options go before that:
/// [`chunksize`](Self::chunksize), [`timeout`](Self::timeout) (the caller's wait),
/// [`run_timeout`](Self::run_timeout) (each chunk's execution).
///
/// # Drop
///
/// Dropping it cancels every chunk not yet finished (queued ones are removed, running
/// ones have their workers stopped and replaced, unless
/// [`kill_on_cancel`](Self::kill_on_cancel) is off).
#[must_use = "futures do nothing unless polled"]
pub struct Map<R> {
    shared: Arc<Shared>,
    input: Option<Result<(TargetRef, Encoded)>>,
    chunksize: Option<usize>,
    timeout: Option<Duration>,
    /// Each chunk's execution limit (see [`Map::run_timeout`]).
    run_timeout: Option<Duration>,
    /// Its own `kill_on_cancel`, for its running chunks.
    kill: crate::pool::future::KillChoice,
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
    admission: Admission,
}

impl<R> MapRun<R> {
    /// Submits chunks while the queue has room; `Err` if one cannot be submitted (the
    /// ones submitted are cancelled by the map's drop).
    fn submit_more(
        &mut self,
        shared: &Shared,
        run_timeout: Option<Duration>,
        cx: &mut Context<'_>,
    ) -> Result<()> {
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
            let id = shared.submit(self.target, args, |_| reply, true, run_timeout)?;
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
            .field("run_timeout", &self.run_timeout)
            .field("kill_on_cancel", &self.kill.get())
            .finish_non_exhaustive()
    }
}

impl<R> Map<R> {
    pub(in crate::pool) fn new(
        shared: Arc<Shared>,
        target: Result<TargetRef>,
        items: Result<Encoded>,
    ) -> Self {
        Map {
            shared,
            input: Some(target.and_then(|t| Ok((t, items?)))),
            chunksize: None,
            timeout: None,
            run_timeout: None,
            kill: Default::default(),
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
    /// chunk not finished. A tokio timer, as
    /// [`Apply::timeout`](crate::pool::Apply::timeout)'s.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Limits each chunk's execution to `d`, counted from when the chunk starts in a
    /// worker (its wait in the queue does not count), as
    /// [`Apply::run_timeout`](crate::pool::Apply::run_timeout) limits a task's: a chunk
    /// of several items has `d` for all of them together. A chunk that runs longer is
    /// stopped (its worker replaced), and the map resolves with [`Error::Timeout`],
    /// cancelling the chunks not finished, as on any other chunk's error. With
    /// `.chunksize(1)`, `d` is each item's limit.
    ///
    /// A remote pool has no such limit: the map resolves with [`Error::InvalidConfig`].
    pub fn run_timeout(mut self, d: Duration) -> Self {
        self.run_timeout = Some(d);
        self
    }

    /// Whether the workers of its running chunks are stopped if the map is given up
    /// (dropped, its [`timeout`](Self::timeout) passes, or another chunk fails), in
    /// place of the pool's [`Builder::kill_on_cancel`](crate::pool::Builder::kill_on_cancel),
    /// as [`Apply::kill_on_cancel`](crate::pool::Apply::kill_on_cancel) for one task.
    pub fn kill_on_cancel(self, kill: bool) -> Self {
        self.kill.set(kill);
        self
    }

    /// Its `kill_on_cancel`, shared with a `map_async` handle.
    pub(in crate::pool) fn kill_choice(&self) -> &crate::pool::future::KillChoice {
        &self.kill
    }

    /// Sets [`run_timeout`](Self::run_timeout) after the map started (for a
    /// `map_async` handle): for the chunks submitted and not answered, and the rest.
    pub(in crate::pool) fn set_run_timeout(&mut self, d: Duration) -> Result<()> {
        self.run_timeout = Some(d);
        if let Some(run) = &self.run {
            for (id, res) in run.ids.iter().zip(&run.results) {
                if res.is_none() {
                    self.shared.set_run_timeout(*id, d)?;
                }
            }
        }
        Ok(())
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
        self.shared.local_only(&pins)?;
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
            admission: Admission::default(),
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
        if let Err(e) = run.submit_more(&this.shared, this.run_timeout, cx) {
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
            let kill = self.kill.get();
            for (id, res) in run.ids.iter().zip(&run.results) {
                if res.is_none() {
                    self.shared.cancel(*id, kill);
                }
            }
        }
    }
}

/// Python's default: `ceil(len / (4 * processes))`.
fn default_chunksize(len: usize, processes: usize) -> usize {
    len.div_ceil(4 * processes.max(1)).max(1)
}
