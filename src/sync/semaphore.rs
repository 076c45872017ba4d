//! `Semaphore` and `BoundedSemaphore`: permits in memory shared by processes, given
//! back when their holder dies.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::shared::{Memory, data_len, deserialize_memory, serialize_memory};
use crate::error::{Error, Result};
use crate::target::RegionGuard;

/// The most processes that hold permits at once.
const HOLDERS: usize = 256;

/// How often a waiter looks whether a holder died, when nothing else happens.
const LOOK: Duration = Duration::from_millis(20);

/// A semaphore's state, in its shared memory, read and written under its lock.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct State {
    /// Permits free now.
    free: u64,
    /// Permits there are, free and held (grows with a `release` that returned none).
    total: u64,
    /// The permits at creation: a bounded semaphore's most.
    bound: u64,
    /// A holder died holding permits (given back since); the next taker is told.
    abandoned: u32,
    /// 1 for a `BoundedSemaphore`.
    bounded: u32,
    holders: [Holder; HOLDERS],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Holder {
    pid: u32,
    held: u32,
}

impl State {
    fn of<'a>(g: &'a mut RegionGuard<'_>) -> &'a mut State {
        let abandoned = g.abandoned();
        let st: &mut State = bytemuck::from_bytes_mut(g.data());
        if abandoned {
            // A process died inside the lock: the count is made again from what is
            // held, which each update writes before the count.
            st.repair();
        }
        st
    }

    fn repair(&mut self) {
        let held: u64 = self.holders.iter().map(|h| u64::from(h.held)).sum();
        self.free = self.total.saturating_sub(held);
        self.abandoned = 1;
    }

    /// Gives back the permits of holders that died.
    fn reclaim_dead(&mut self) {
        for h in &mut self.holders {
            if h.held > 0 && crate::target::holder_is_dead(h.pid) {
                tracing::warn!(
                    pid = h.pid,
                    permits = h.held,
                    "a process died holding procpool::Semaphore permits; they were given back"
                );
                self.free += u64::from(h.held);
                // Its pid stays: a slot once used never ends another pid's probe.
                h.held = 0;
                self.abandoned = 1;
            }
        }
    }

    /// The slots `pid` may use, from its own (`pid % HOLDERS`) on, up to the first one
    /// never used: a process finds its slot at once unless another holds it.
    fn probe(&self, pid: u32) -> impl Iterator<Item = usize> + '_ {
        let start = usize::try_from(pid).unwrap_or(0) % HOLDERS;
        (0..HOLDERS)
            .map(move |i| (start + i) % HOLDERS)
            .take_while(move |&i| {
                // Stops after a never-used slot (included).
                i == start || {
                    let prev = (i + HOLDERS - 1) % HOLDERS;
                    self.holders[prev].pid != 0
                }
            })
    }

    /// `pid`'s slot, or a free one for it.
    fn slot(&mut self, pid: u32) -> Option<&mut Holder> {
        let mut free = None;
        let mut mine = None;
        for i in self.probe(pid) {
            let h = self.holders[i];
            if h.pid == pid {
                mine = Some(i);
                break;
            }
            if h.held == 0 && free.is_none() {
                free = Some(i);
            }
        }
        let h = &mut self.holders[mine.or(free)?];
        h.pid = pid;
        Some(h)
    }

    /// One of `pid`'s permits comes back; false if it holds none.
    fn give_back(&mut self, pid: u32) -> bool {
        let found = self
            .probe(pid)
            .find(|&i| self.holders[i].pid == pid && self.holders[i].held > 0);
        match found {
            Some(i) => {
                self.holders[i].held -= 1;
                self.free += 1;
                true
            }
            None => false,
        }
    }
}

fn me() -> u32 {
    crate::target::my_pid()
}

/// A counter of permits shared by processes: Python's `multiprocessing.Semaphore`,
/// async, with RAII permits.
///
/// `acquire().await` waits (without blocking the caller's thread) until a permit is free
/// and returns it; dropping the [`SemaphorePermit`] gives it back.
/// [`release`](Semaphore::release) adds a permit without one being held, as Python's
/// `release()` does. The count lives in memory shared by every process that has the
/// semaphore (as Python's does), so taking and giving back a free permit is a few atomic
/// operations, with no round trip to another process; a waiter sleeps on a futex. Waiters
/// are not served in a fixed order (nor are Python's).
///
/// ```
/// use procpool::{Process, Semaphore};
///
/// fn download(slots: Semaphore, n: u32) {
///     let _slot = slots.blocking_acquire().expect("the parent keeps the semaphore");
///     println!("download {n}: at most 3 run at once");
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let slots = Semaphore::new(3);
/// let mut p = Process::new(download, (slots.clone(), 1));
/// p.start().await?;
/// p.join().await?;
/// # Ok(())
/// # }
/// ```
///
/// # When a holder dies
///
/// The permits held by a process that dies (crash, `SIGKILL`, a pool task stopped on
/// timeout) are given back (a waiter looks for dead holders every 20 ms), and the next
/// taker can tell: its [`SemaphorePermit::abandoned`] is true (what the permits guard
/// may have been left half done), and a warning is logged. Python's semaphore loses
/// those permits for good. At most 256 processes can hold permits at once.
///
/// The memory stays as long as some process has the semaphore, including after the
/// one that created it is gone.
#[derive(Clone)]
pub struct Semaphore {
    mem: Arc<Memory>,
}

/// A [`Semaphore`] that refuses a [`release`](Semaphore::release) that would make more
/// permits than it was created with: Python's `BoundedSemaphore`. It has every method of
/// `Semaphore` (through `Deref`).
///
/// ```
/// # fn main() -> procpool::Result<()> {
/// let s = procpool::BoundedSemaphore::new(1);
/// let permit = s.try_acquire()?.expect("free");
/// drop(permit);
/// assert!(matches!(s.release(), Err(procpool::Error::ReleasedTooOften { permits: 1, .. })));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BoundedSemaphore(Semaphore);

impl BoundedSemaphore {
    /// A new bounded semaphore with `permits` free permits.
    ///
    /// # Panics
    ///
    /// As [`Semaphore::new`].
    pub fn new(permits: u64) -> Self {
        BoundedSemaphore(Semaphore::make(permits, true))
    }
}

impl std::ops::Deref for BoundedSemaphore {
    type Target = Semaphore;

    fn deref(&self) -> &Semaphore {
        &self.0
    }
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Semaphore");
        match self.available() {
            Ok(n) => d.field("available", &n),
            Err(e) => d.field("error", &e.to_string()),
        };
        d.finish()
    }
}

/// A permit of a [`Semaphore`]; dropping it gives it back (also when it is dropped by a
/// panic's unwinding). A permit never outlives its process: if the process dies, the
/// next waiter takes it back.
#[must_use = "the permit is given back as soon as it is dropped"]
pub struct SemaphorePermit {
    mem: Arc<Memory>,
    abandoned: bool,
}

impl SemaphorePermit {
    /// True if, before this permit was taken, a holder died holding permits (see
    /// [`Semaphore`]): what they guard may be inconsistent.
    pub fn abandoned(&self) -> bool {
        self.abandoned
    }
}

impl std::fmt::Debug for SemaphorePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemaphorePermit")
            .field("abandoned", &self.abandoned)
            .finish()
    }
}

impl Drop for SemaphorePermit {
    fn drop(&mut self) {
        // A permit exists only where its memory is mapped.
        if let Ok(region) = self.mem.region() {
            let mut g = region.lock();
            State::of(&mut g).give_back(me());
            drop(g);
            region.announce_change();
        }
    }
}

/// Tells a waiting thread to stop, when the `acquire` future that started it is dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Semaphore {
    /// A new semaphore with `permits` free permits, in new shared memory.
    ///
    /// # Panics
    ///
    /// If the system cannot make shared memory (out of memory or of file descriptors),
    /// as [`Value::new`](crate::Value::new).
    pub fn new(permits: u64) -> Self {
        Self::make(permits, false)
    }

    fn make(permits: u64, bounded: bool) -> Self {
        let made = data_len::<State>(1).and_then(Memory::new);
        let mem = made.unwrap_or_else(|e| panic!("cannot make shared memory: {e}"));
        let sem = Semaphore { mem };
        if let Ok(region) = sem.mem.region() {
            let mut g = region.lock();
            let st = State::of(&mut g);
            st.free = permits;
            st.total = permits;
            st.bound = permits;
            st.bounded = u32::from(bounded);
        }
        sem
    }

    /// A free permit, if there is one (`reclaim`: after giving back dead holders').
    fn take(&self, reclaim: bool) -> Result<Option<SemaphorePermit>> {
        let region = self.mem.region()?;
        let mut g = region.lock();
        let st = State::of(&mut g);
        if st.free == 0 && reclaim {
            st.reclaim_dead();
        }
        if st.free == 0 {
            return Ok(None);
        }
        let Some(slot) = st.slot(me()) else {
            return Err(Error::InvalidConfig {
                reason: format!("more than {HOLDERS} processes hold permits of one semaphore"),
            });
        };
        // What is held first, then the count (see `State::of`).
        slot.held += 1;
        st.free -= 1;
        let abandoned = std::mem::take(&mut st.abandoned) != 0;
        Ok(Some(SemaphorePermit {
            mem: Arc::clone(&self.mem),
            abandoned,
        }))
    }

    /// Waits for a permit on this thread, until `stop` is set or `deadline` passes.
    fn wait_for_permit(
        &self,
        stop: &AtomicBool,
        deadline: Option<Instant>,
    ) -> Result<Option<SemaphorePermit>> {
        let region = self.mem.region()?;
        let mut quiet = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let look = match deadline {
                Some(at) => match at.checked_duration_since(Instant::now()) {
                    // Due: one last look below, without waiting.
                    None => Duration::ZERO,
                    Some(left) => left.min(LOOK),
                },
                None => LOOK,
            };
            let seen = region.begin_wait();
            // Dead holders are looked for when nothing happened for a while.
            let taken = self.take(quiet);
            if !matches!(taken, Ok(None)) {
                region.end_wait();
                return taken;
            }
            if look.is_zero() {
                region.end_wait();
                return Ok(None);
            }
            quiet = !region.wait_change(seen, look);
            region.end_wait();
        }
    }

    /// Waits for a free permit and returns it.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if this handle's memory never arrived from the process that sent it
    /// (it died first); [`Error::InvalidConfig`] if 256 other processes hold permits.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped, no permit is kept (one taken as it was
    /// dropped is given back at once). A free permit is taken at once; otherwise the wait
    /// runs on a thread of procpool's own runtime (the caller's is not blocked).
    pub async fn acquire(&self) -> Result<SemaphorePermit> {
        self.acquire_until(None).await?.ok_or(Error::Cancelled)
    }

    /// [`acquire`](Self::acquire), giving up after `timeout`: `Ok(None)` if no permit was
    /// free by then (Python's `acquire(timeout=)` answering `False`). A free permit is
    /// taken at once, whatever the limit.
    ///
    /// # Errors
    ///
    /// As for `acquire`.
    ///
    /// # Cancel safety
    ///
    /// As for `acquire`.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Option<SemaphorePermit>> {
        // A limit past what an `Instant` holds is no deadline.
        self.acquire_until(crate::runtime::timer::deadline_in(timeout))
            .await
    }

    /// [`acquire_timeout`](Self::acquire_timeout) for synchronous code: blocks this
    /// thread at most about `timeout` (no runtime needed).
    ///
    /// # Errors
    ///
    /// As for `acquire`.
    pub fn blocking_acquire_timeout(&self, timeout: Duration) -> Result<Option<SemaphorePermit>> {
        let deadline = crate::runtime::timer::deadline_in(timeout);
        self.wait_for_permit(&AtomicBool::new(false), deadline)
    }

    async fn acquire_until(&self, deadline: Option<Instant>) -> Result<Option<SemaphorePermit>> {
        if let Some(p) = self.take(false)? {
            return Ok(Some(p));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let _stop = StopOnDrop(Arc::clone(&stop));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        crate::runtime::service::run(async move {
            let got =
                tokio::task::spawn_blocking(move || me.wait_for_permit(&stop, deadline)).await;
            let got = got.unwrap_or_else(|e| {
                Err(Error::Io(std::io::Error::other(format!(
                    "the semaphore's wait failed: {e}"
                ))))
            });
            // Err: the caller is gone, and the permit (if any) goes back as it drops.
            drop(tx.send(got));
        })?;
        match rx.await {
            Ok(got) => got,
            Err(_) => Err(Error::Closed),
        }
    }

    /// [`acquire`](Self::acquire) for synchronous code: blocks this thread (no runtime
    /// needed).
    ///
    /// # Errors
    ///
    /// As for `acquire`.
    pub fn blocking_acquire(&self) -> Result<SemaphorePermit> {
        self.wait_for_permit(&AtomicBool::new(false), None)?
            .ok_or(Error::Cancelled)
    }

    /// Takes a permit if one is free now (`Ok(None)` if not), never waiting (but for the
    /// lock, held by others only for a few instructions).
    ///
    /// # Errors
    ///
    /// As for [`acquire`](Self::acquire).
    pub fn try_acquire(&self) -> Result<Option<SemaphorePermit>> {
        self.take(true)
    }

    /// Adds a free permit (Python's `release()`), for code that counts by hand rather
    /// than with permits; a waiter gets it. From a process that holds permits it gives
    /// one of them back.
    ///
    /// # Errors
    ///
    /// [`Error::ReleasedTooOften`] for a [`BoundedSemaphore`] already at its permits;
    /// [`Error::Io`] as for [`acquire`](Self::acquire).
    pub fn release(&self) -> Result<()> {
        let region = self.mem.region()?;
        let mut g = region.lock();
        let st = State::of(&mut g);
        if !st.give_back(me()) {
            if st.bounded != 0 && st.total >= st.bound {
                return Err(Error::ReleasedTooOften { permits: st.bound });
            }
            st.total += 1;
            st.free += 1;
        }
        drop(g);
        region.announce_change();
        Ok(())
    }

    /// The permits free now (Python's `get_value()`): a snapshot, which may change at
    /// once.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] as for [`acquire`](Self::acquire).
    pub fn available(&self) -> Result<u64> {
        let region = self.mem.region()?;
        let mut g = region.lock();
        Ok(State::of(&mut g).free)
    }
}

impl Serialize for Semaphore {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_memory::<S, State>(&self.mem, 1, s)
    }
}

impl<'de> Deserialize<'de> for Semaphore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Semaphore {
            mem: deserialize_memory::<D, State>(d)?.0,
        })
    }
}
