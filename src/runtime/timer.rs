//! Timers for the `*_timeout` calls that work under any executor, or none.
//!
//! tokio's timers panic outside a tokio runtime, and a plain target (or
//! `futures::executor::block_on`) has none. So:
//!
//! - [`Sleep::new`]: inside a tokio runtime, that runtime's timer (its clock, paused in
//!   a test that pauses it); outside one, a timer on procpool's service thread, which
//!   wakes the waiting task from there;
//! - [`block_on_until`]: runs a future on this thread, parking it at most until a
//!   deadline, for the `blocking_*_timeout` calls; a [`Sleep::parked_until`] of that
//!   deadline inside it needs no timer at all (this thread wakes by itself when it is
//!   due).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A timer; see the module docs for which clock it follows.
pub(crate) enum Sleep {
    Tokio(Pin<Box<tokio::time::Sleep>>),
    /// Fired (or dropped) by a task on the service thread.
    Service(oneshot::Receiver<()>),
    /// Due at this instant, checked when polled: only inside [`block_on_until`] with the
    /// same deadline, which polls again when it is due. `None`: never.
    Parked(Option<Instant>),
}

impl Sleep {
    /// Due after `d`, under any executor.
    ///
    /// # Panics
    ///
    /// Inside a tokio runtime built without timers (as `tokio::time::sleep`).
    pub(crate) fn new(d: Duration) -> Sleep {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Sleep::Tokio(Box::pin(tokio::time::sleep(d)));
        }
        let (tx, rx) = oneshot::channel();
        let fired = super::service::run(async move {
            let mut tx = tx;
            tokio::select! {
                () = tokio::time::sleep(d) => {
                    // An error means the waiter went meanwhile: nothing to wake.
                    tx.send(()).ok();
                }
                // Nobody waits any more: end now, not after `d`.
                () = tx.closed() => {}
            }
        });
        match fired {
            Ok(()) => Sleep::Service(rx),
            Err(e) => {
                // No service thread: a thread of its own rather than no timer at all.
                tracing::warn!(target: "procpool::lifecycle",
                    "no service thread for a timer ({e}); using a thread of its own");
                let (tx, rx) = oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("procpool-timer".into())
                    .spawn(move || {
                        std::thread::sleep(d);
                        // An error means nobody waits any more: nothing to wake.
                        tx.send(()).ok();
                    });
                if let Err(e) = spawned {
                    // Then the limit is reached at once: a call that returns too soon
                    // beats one that never returns.
                    tracing::warn!(target: "procpool::lifecycle",
                        "cannot start a timer thread ({e}); the timeout expires now");
                    return Sleep::Parked(Some(Instant::now()));
                }
                Sleep::Service(rx)
            }
        }
    }

    /// Due at `deadline` (`None`: never); only for a future run by [`block_on_until`]
    /// with that same deadline.
    pub(crate) fn parked_until(deadline: Option<Instant>) -> Sleep {
        Sleep::Parked(deadline)
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut *self {
            Sleep::Tokio(s) => s.as_mut().poll(cx),
            // Dropped unfired only if the service's runtime went away: due, then.
            Sleep::Service(rx) => Pin::new(rx).poll(cx).map(drop),
            Sleep::Parked(Some(at)) if Instant::now() >= *at => Poll::Ready(()),
            Sleep::Parked(_) => Poll::Pending,
        }
    }
}

/// `f`'s output, or `None` if `sleep` is due first. `f` is polled first, so what is
/// ready at once is returned even with a zero limit.
pub(crate) async fn timeout<F: Future>(sleep: Sleep, f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut sleep = sleep;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        match Pin::new(&mut sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The deadline `d` from now (`None` if it lies beyond what an `Instant` holds).
pub(crate) fn deadline_in(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// Wakes the thread that runs [`block_on_until`].
struct Unpark {
    thread: std::thread::Thread,
    woken: AtomicBool,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Runs `fut` to its end on this thread, with no runtime: the thread parks between
/// polls until the future is woken, and wakes by itself at `deadline` to poll it again
/// (so a [`Sleep::parked_until`] of it is seen due). Blocks this thread: never call it
/// from async code.
pub(crate) fn block_on_until<F: Future>(fut: F, deadline: Option<Instant>) -> F::Output {
    let unpark = Arc::new(Unpark {
        thread: std::thread::current(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(Arc::clone(&unpark));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let mut deadline = deadline;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        while !unpark.woken.swap(false, Ordering::Acquire) {
            match deadline {
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // Due: poll once more; later waits have no limit.
                        deadline = None;
                        break;
                    }
                    std::thread::park_timeout(left);
                }
                None => std::thread::park(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_sleep_is_due_at_its_deadline_with_no_runtime() {
        let d = Duration::from_millis(50);
        let at = deadline_in(d);
        let start = Instant::now();
        let r = block_on_until(
            timeout(Sleep::parked_until(at), std::future::pending::<()>()),
            at,
        );
        assert_eq!(r, None);
        let took = start.elapsed();
        assert!(took >= d && took < d + Duration::from_secs(5), "{took:?}");
        // Ready at once, even with no time left.
        let now = Some(Instant::now());
        assert_eq!(
            block_on_until(timeout(Sleep::parked_until(now), async { 7 }), now),
            Some(7)
        );
    }

    #[test]
    fn a_service_timer_fires_with_no_runtime() {
        let d = Duration::from_millis(50);
        let start = Instant::now();
        let r = futures::executor::block_on(timeout(Sleep::new(d), std::future::pending::<()>()));
        assert_eq!(r, None);
        let took = start.elapsed();
        assert!(took >= d && took < d + Duration::from_secs(5), "{took:?}");
    }
}
