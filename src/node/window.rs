//! How many tasks a node holds (read from the stream, not yet answered): about twice
//! what it finishes in [`HOLD`], between [`MIN_PER_WORKER`] and [`MAX_PER_WORKER`] per
//! local worker.
//!
//! Holding many tasks is what makes tiny tasks fast (their Redis round trips overlap:
//! 16 per worker gave 24–30 k tasks/s, 64 gave 38–41 k, 256 gave 45–49 k; BENCHMARKS.md),
//! and what makes long ones unfair: a task held here waits for this node's workers while
//! another node may be idle. Holding what the node finishes in a few milliseconds serves
//! both: a stream of 20 µs tasks is held by the hundred, a burst of one-second tasks two
//! per worker, the rest left in the stream for other nodes.
//!
//! The rate is counted over at least [`HOLD`] between adjustments, at each answer and
//! before each read: an idle node's window shrinks to the fewest before it reads again,
//! and a stream of short tasks grows it back within one [`HOLD`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The work a node holds, as time: about twice what it finishes in this long.
const HOLD: Duration = Duration::from_millis(10);
/// The fewest held per worker: one running, one ready to start. Also what a node
/// starts with: a burst of long tasks at its start is shared with the other nodes.
const MIN_PER_WORKER: usize = 2;
const START_PER_WORKER: usize = MIN_PER_WORKER;
/// The most held per worker.
const MAX_PER_WORKER: usize = 128;

pub(super) struct Window {
    slots: Arc<Semaphore>,
    min: usize,
    max: usize,
    st: Mutex<State>,
}

struct State {
    /// Permits in the semaphore or held by tasks, less those `owed`.
    total: usize,
    /// Permits to retire as tasks give them back (the window shrank while they ran).
    owed: usize,
    /// Tasks answered since `since`.
    done: u64,
    since: Instant,
    /// Draining: no more adjustments (see [`Window::freeze`]).
    frozen: bool,
}

impl Window {
    pub(super) fn new(workers: usize) -> Window {
        let workers = workers.max(1);
        let total = workers.saturating_mul(START_PER_WORKER);
        Window {
            slots: Arc::new(Semaphore::new(total)),
            min: workers.saturating_mul(MIN_PER_WORKER),
            max: workers.saturating_mul(MAX_PER_WORKER),
            st: Mutex::new(State {
                total,
                owed: 0,
                done: 0,
                since: Instant::now(),
                frozen: false,
            }),
        }
    }

    /// One permit per task held.
    pub(super) fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }

    /// A task was answered (or dropped): its permit goes back, or is retired if the
    /// window shrank; at least every [`HOLD`] the window follows the rate.
    pub(super) fn done(&self, permit: OwnedSemaphorePermit) {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        st.done += 1;
        self.adjust(&mut st);
        if st.owed > 0 {
            st.owed -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
    }

    /// Before the node reads tasks: the window follows the rate (so an idle node's
    /// shrinks to the fewest), and how long the read may wait for tasks. A read for more
    /// than the fewest waits at most [`HOLD`]: a window grown for short tasks must not
    /// take, with a read sent before a pause, a burst of long ones that comes after it.
    pub(super) fn before_read(&self) -> Option<Duration> {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        self.adjust(&mut st);
        (st.total > self.min).then_some(HOLD)
    }

    /// At least [`HOLD`] after the last adjustment: the tasks answered since then, per
    /// `HOLD`, twice over, become the window.
    fn adjust(&self, st: &mut State) {
        let elapsed = st.since.elapsed();
        if !st.frozen && elapsed >= HOLD {
            // Finished per HOLD, twice over (f64: no overflow; clamped before the cast).
            let per_hold = st.done as f64 * HOLD.as_secs_f64() / elapsed.as_secs_f64();
            let want = (2.0 * per_hold)
                .ceil()
                .clamp(self.min as f64, self.max as f64) as usize;
            if want > st.total {
                let more = want - st.total;
                // Owed retirements are cancelled first.
                let cancelled = more.min(st.owed);
                st.owed -= cancelled;
                self.slots.add_permits(more - cancelled);
            } else if want < st.total {
                let fewer = st.total - want;
                let retired = self.slots.forget_permits(fewer);
                st.owed += fewer - retired;
            }
            st.total = want;
            st.done = 0;
            st.since = Instant::now();
        }
    }

    /// Stops adjusting (the node drains); the permits there are once every held task
    /// gave its back (none is retired from here on).
    pub(super) fn freeze(&self) -> usize {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        st.frozen = true;
        st.total += std::mem::take(&mut st.owed);
        st.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn take(w: &Window) -> OwnedSemaphorePermit {
        Arc::clone(w.slots()).acquire_owned().await.unwrap()
    }

    /// 20 µs tasks, one at a time: hundreds per HOLD, so the window grows to its most.
    async fn short_tasks(w: &Window, n: usize) {
        for _ in 0..n {
            let p = take(w).await;
            tokio::time::advance(Duration::from_micros(20)).await;
            w.done(p);
        }
    }

    /// Long enough that the short tasks before it count for nothing.
    const LONG: Duration = Duration::from_secs(100);

    /// A window of one worker grown to its most, 16 tasks taken, and one slow answer:
    /// shrunk to 2 with 15 still held, 13 of them owed (the answered one was retired).
    async fn shrunk_while_holding_15() -> (Window, Vec<OwnedSemaphorePermit>) {
        let w = Window::new(1);
        short_tasks(&w, 1_000).await;
        let mut held: Vec<_> = futures::future::join_all((0..16).map(|_| take(&w))).await;
        tokio::time::advance(LONG).await;
        w.done(held.pop().unwrap());
        (w, held)
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_grows_with_short_tasks_and_shrinks_with_long_ones() {
        let w = Window::new(2);
        assert_eq!(w.slots().available_permits(), 2 * MIN_PER_WORKER);
        short_tasks(&w, 1_000).await;
        assert_eq!(w.slots().available_permits(), 2 * MAX_PER_WORKER);

        // Long tasks: the fewest; the permits of tasks still running when it shrank
        // are retired as they come back.
        let running: Vec<_> = futures::future::join_all((0..10).map(|_| take(&w))).await;
        tokio::time::advance(LONG).await;
        for p in running {
            w.done(p);
        }
        assert_eq!(w.slots().available_permits(), 2 * MIN_PER_WORKER);

        // Short tasks again: back up within a HOLD or two.
        short_tasks(&w, 2_000).await;
        assert_eq!(w.slots().available_permits(), 2 * MAX_PER_WORKER);

        // Draining: what it holds no longer changes.
        let held = take(&w).await;
        assert_eq!(w.freeze(), 2 * MAX_PER_WORKER);
        tokio::time::advance(LONG).await;
        w.done(held);
        assert_eq!(w.slots().available_permits(), 2 * MAX_PER_WORKER);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_node_reads_again_with_the_fewest_and_a_grown_one_waits_briefly() {
        let w = Window::new(2);
        assert_eq!(w.before_read(), None, "the fewest: a read may wait long");
        short_tasks(&w, 1_000).await;
        assert_eq!(w.before_read(), Some(HOLD));
        // A pause with nothing to answer: the next read asks for the fewest.
        tokio::time::advance(LONG).await;
        assert_eq!(w.before_read(), None);
        assert_eq!(w.slots().available_permits(), 2 * MIN_PER_WORKER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_that_grows_back_first_cancels_what_it_owed() {
        let (w, mut held) = shrunk_while_holding_15().await;
        assert_eq!(w.slots().available_permits(), 0);
        w.done(held.pop().unwrap());
        w.done(held.pop().unwrap());
        // Three answers in one HOLD: 6 wanted, four of the owed cancelled instead of
        // new permits added.
        tokio::time::advance(HOLD).await;
        w.done(held.pop().unwrap());
        assert_eq!(w.slots().available_permits(), 0);
        // The twelve still held come back: six retired, six free.
        for p in held {
            w.done(p);
        }
        assert_eq!(w.slots().available_permits(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_every_held_task_even_after_a_shrink() {
        let (w, mut held) = shrunk_while_holding_15().await;
        let all = w.freeze();
        assert_eq!(all, 15, "every permit a held task has");
        let drained = Arc::clone(w.slots()).acquire_many_owned(u32::try_from(all).unwrap());
        tokio::pin!(drained);
        for p in held.drain(..14) {
            w.done(p);
        }
        assert!(
            futures::poll!(&mut drained).is_pending(),
            "one task is still held"
        );
        w.done(held.pop().unwrap());
        assert!(drained.await.is_ok());
    }
}
