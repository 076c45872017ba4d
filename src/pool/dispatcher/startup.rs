//! Starting a pool's first workers (what `Builder::build` waits for).

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{Config, Dispatcher, Initial, MAX_START_FAILURES};
use crate::error::Error;
use crate::pool::PoolStats;
use crate::pool::message::Command;
use crate::pool::seam::{Conn, Event, Events, Workers};

/// A dispatcher ready to run, with what its pool's handles hold.
pub(crate) struct Launched<W: Workers> {
    pub(crate) dispatcher: Dispatcher<W>,
    /// Where callers send their [`Command`]s.
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    /// What it publishes for `AsyncPool::stats`.
    pub(crate) stats: Arc<Mutex<PoolStats>>,
}

/// Starts `cfg.processes` workers through `backend` (see [`start_all`]) and makes the
/// dispatcher that will drive them; `admission` holds the queue's places.
///
/// # Errors
///
/// As for [`start_all`].
pub(crate) async fn launch<W: Workers>(
    cfg: Config,
    backend: W,
    admission: Arc<tokio::sync::Semaphore>,
) -> Result<Launched<W>, Error> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let initial = start_all(&backend, cfg.processes, &events_tx, &mut events).await?;
    let (commands, cmds) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(PoolStats {
        workers: cfg.processes,
        idle: cfg.processes,
        restarts: initial.restarts,
        ..PoolStats::default()
    }));
    let dispatcher = Dispatcher::new(
        cfg,
        backend,
        initial,
        (events_tx, events),
        cmds,
        Arc::clone(&stats),
        admission,
    );
    Ok(Launched {
        dispatcher,
        commands,
        stats,
    })
}

/// Starts `processes` workers through `backend` and waits until every one is ready; a
/// worker that dies after it was ready (while others still start) is replaced, up to
/// [`MAX_START_FAILURES`] times.
///
/// # Errors
///
/// The first worker's failure to start ([`Error::Timeout`] for one stuck in its
/// initializer, the initializer's own error); [`Error::Spawn`] when workers keep dying
/// right after they started. The workers started so far are killed and reaped first.
///
/// # Cancel safety
///
/// Cancel safe: every connection made so far is held here until it is returned, and
/// dropping one tells its worker to exit (tests/pool_build_cancel.rs). Workers still
/// starting find `events` gone and are killed (see [`Workers::start`]) once the caller
/// drops the receiver.
async fn start_all<W: Workers>(
    backend: &W,
    processes: usize,
    events_tx: &Events<W::Conn>,
    events: &mut mpsc::UnboundedReceiver<Event<W::Conn>>,
) -> Result<Initial<W::Conn>, Error> {
    let mut next_worker = 0;
    let start_one = |next_worker: &mut u64| {
        backend.start(*next_worker, events_tx.clone());
        *next_worker += 1;
    };
    for _ in 0..processes {
        start_one(&mut next_worker);
    }
    let mut ready: Vec<W::Conn> = Vec::with_capacity(processes);
    let mut died = 0u64;
    let mut failure = None;
    while ready.len() < processes {
        let Some(ev) = events.recv().await else {
            break; // unreachable: `events_tx` is borrowed from the caller
        };
        let lost = match ev {
            Event::Ready(conn) => {
                ready.push(conn);
                continue;
            }
            Event::Failed(e) => {
                failure = Some(e);
                break;
            }
            Event::Gone { worker, exit, .. } => {
                // A worker that was ready died before the pool was built.
                let Some(i) = ready.iter().position(|c| c.id() == worker) else {
                    continue;
                };
                let conn = ready.swap_remove(i);
                tracing::info!(target: "procpool::lifecycle", worker = %conn.name(),
                    "worker died with {exit} while the pool was being built; replaced");
                format!("the last, {}, with {exit}", conn.name())
            }
            Event::Done { worker, .. } => {
                // No task was sent yet: a worker answering one broke the protocol.
                let Some(i) = ready.iter().position(|c| c.id() == worker) else {
                    continue;
                };
                let conn = ready.swap_remove(i);
                tracing::warn!(target: "procpool::lifecycle", worker = %conn.name(),
                    "worker answered a task it was never given; replaced");
                let why = format!(
                    "the last, {}, answered a task it was never given",
                    conn.name()
                );
                backend.stop(conn, events_tx.clone());
                why
            }
            // No task was sent yet: nothing was staged or recalled.
            Event::Stopped | Event::Recalled { .. } | Event::Staged { .. } => continue,
        };
        died += 1;
        if died >= u64::from(MAX_START_FAILURES) {
            failure = Some(Error::spawn(
                format!("{died} workers died right after they started ({lost})"),
                None,
            ));
            break;
        }
        start_one(&mut next_worker);
    }
    if let Some(e) = failure {
        backend.kill_all(ready).await;
        return Err(e);
    }
    Ok(Initial {
        workers: ready,
        next_worker,
        restarts: died,
    })
}
