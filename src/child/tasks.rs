//! What a child serves once it is ready: a `Process`'s one target, or a pool worker's
//! tasks, one at a time in the order they arrive, with the arena its large arguments
//! arrive in.

use std::collections::{HashSet, VecDeque};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::watch::{Gate, Handover};
use super::{EXIT_ORPHANED, EXIT_PANICKED, EXIT_PROTOCOL};
use crate::target::{self, Context, SharedMap};
use crate::wire::{self, BlockingChannel, Down, DownIn, Next, Outbox, Outcome, Run, Up};

/// Runs one task: looks its entry point up and calls it.
pub(super) fn execute(run: &Run, cx: &mut Context) -> Outcome {
    execute_parts(run.target, run.target_name.as_bytes(), &run.args, cx)
}

/// [`execute`] from a task's parts; the name (checked UTF-8 when the frame was decoded)
/// is only read for an error.
fn execute_parts(target: u64, target_name: &[u8], args: &[u8], cx: &mut Context) -> Outcome {
    match target::lookup(target) {
        Ok(entry) => entry(args, cx),
        Err(reason) => Outcome::BadTarget {
            reason: format!("{}: {reason}", String::from_utf8_lossy(target_name)),
        },
    }
}

/// The `Process` role: run one target, send its outcome, exit.
pub(super) fn run_once(mut chan: BlockingChannel, outbox: Outbox, mut cx: Context) -> i32 {
    let run = match chan.recv::<Down>() {
        Ok(Some(Down::Run(run))) => run,
        Ok(None) => return EXIT_ORPHANED,
        Ok(Some(_)) | Err(_) => return EXIT_PROTOCOL,
    };
    // Python's wording, so people recognise them; on their own target, so that a filter
    // can keep or drop them apart from the crate's other events.
    tracing::info!(target: "procpool::lifecycle", "child process calling self.run()");
    let outcome = execute(&run, &mut cx);
    // What the target sent to queues, locks and events is applied before we report.
    crate::sync::settle();
    let code = match outcome {
        Outcome::Panicked { .. } => EXIT_PANICKED,
        _ => 0,
    };
    tracing::info!(target: "procpool::lifecycle", "process shutting down");
    tracing::info!(target: "procpool::lifecycle", "process exiting with exitcode {code}");
    match outbox.send(&Up::Done {
        id: run.id,
        outcome,
    }) {
        Ok(()) => code,
        Err(_) => EXIT_ORPHANED,
    }
}

/// A frame the worker keeps until its turn.
enum Job {
    Run(Task),
    Shutdown,
}

/// A task as a worker keeps it: slices of the frame it came in, not copies.
struct Task {
    id: u64,
    /// Its number in the order tasks arrived (1 for the first).
    seq: u64,
    target: u64,
    target_name: Bytes,
    args: Bytes,
}

/// How often a worker with tasks queued looks for frames that arrived meanwhile (new
/// tasks, skips of queued ones). A skip that arrives within this time before its task
/// starts is missed, as one arriving while its task runs always was: the task runs and
/// the dispatcher drops its answer.
const LOOK_EVERY: Duration = Duration::from_micros(50);

/// The `Worker` role: tasks run one at a time, in the order they arrive.
///
/// One thread does it all, with no hand-off between threads on the way (each would cost
/// a wake-up per task): it takes every frame that has arrived without waiting, notes
/// skips, runs the oldest task, writes its answer at once (an earlier answer must never
/// wait for a later task to finish), and waits for frames only when it has nothing to
/// run. With tasks queued, it looks for new frames at most every [`LOOK_EVERY`]: tiny
/// tasks arrive in batches, and a look that finds nothing cost a syscall per task (a
/// large part of the CPU time of tiny tasks, BENCHMARKS.md). While a task runs, the
/// end-of-channel watch (see [`watch_parent`](super::watch::watch_parent)) exits the
/// process if the parent goes away; a skip that arrives while its task runs is moot (the
/// dispatcher stops a worker that does not move on).
pub(super) fn serve_pool(
    mut chan: BlockingChannel,
    outbox: Outbox,
    mut cx: Context,
    gate: &Mutex<Gate>,
    handover: &Handover,
) -> i32 {
    let mut queue: VecDeque<Job> = VecDeque::new();
    // Tasks are numbered in the order they arrive, as the parent numbers them.
    let mut received: u64 = 0;
    // Ids of queued tasks to skip; only ids in `queue` are ever added.
    let mut skips: HashSet<u64> = HashSet::new();
    let mut looked = Instant::now();
    // A task as it arrives, numbered (its name sliced from its frame, not copied).
    let mut task = |frame: &Bytes, id, target, name: &str, args| {
        received += 1;
        Job::Run(Task {
            id,
            seq: received,
            target,
            target_name: frame.slice_ref(name.as_bytes()),
            args,
        })
    };
    // Where large arguments arrive (see `wire::Arena`), once the parent sends it.
    let mut arena: Option<Arc<SharedMap>> = None;
    loop {
        // Every frame already here, then (if there is nothing to run) wait for one. With
        // tasks queued, this look (a syscall that mostly finds nothing, as tasks come in
        // batches) is taken at most every `LOOK_EVERY`.
        if queue.is_empty() || looked.elapsed() >= LOOK_EVERY {
            loop {
                let frame = match chan.next_frame(queue.is_empty()) {
                    Ok(Next::Msg(frame)) => frame,
                    Ok(Next::Nothing) => break,
                    Ok(Next::End) => return EXIT_ORPHANED,
                    Err(_) => return EXIT_PROTOCOL,
                };
                match wire::from_frame_borrowed::<DownIn<'_>>(&frame) {
                    Ok(DownIn::Run(run)) => {
                        let args = frame.slice_ref(run.args);
                        queue.push_back(task(&frame, run.id, run.target, run.target_name, args));
                    }
                    Ok(DownIn::Skip { id }) => {
                        if queue.iter().any(|j| matches!(j, Job::Run(t) if t.id == id)) {
                            skips.insert(id);
                        }
                    }
                    Ok(DownIn::Shutdown) => queue.push_back(Job::Shutdown),
                    Ok(DownIn::Arena(a)) => match open_arena(&a, handover) {
                        Ok(map) => arena = Some(Arc::new(map)),
                        Err(e) => {
                            eprintln!("procpool: worker cannot map its arena: {e}");
                            return EXIT_PROTOCOL;
                        }
                    },
                    Ok(DownIn::RunShared(run)) => {
                        let Some(args) = arena.as_ref().and_then(|map| {
                            ArenaBytes::new(
                                map,
                                run.offset.try_into().ok()?,
                                run.len.try_into().ok()?,
                            )
                        }) else {
                            return EXIT_PROTOCOL;
                        };
                        let args = Bytes::from_owner(args);
                        queue.push_back(task(&frame, run.id, run.target, run.target_name, args));
                    }
                    Ok(DownIn::Hello(_)) | Err(_) => return EXIT_PROTOCOL,
                }
            }
            looked = Instant::now();
        }
        let task = match queue.pop_front() {
            Some(Job::Run(task)) => task,
            // Whatever came before it has been answered.
            Some(Job::Shutdown) => return 0,
            None => continue,
        };
        if !gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .start(task.seq)
        {
            // Taken back by the parent (see `watch_parent`): it was answered already.
            skips.remove(&task.id);
            continue;
        }
        let outcome = if skips.remove(&task.id) {
            Outcome::Skipped
        } else {
            crate::log::set_task(Some(task.id));
            let outcome = execute_parts(task.target, &task.target_name, &task.args, &mut cx);
            crate::sync::settle();
            crate::log::set_task(None);
            outcome
        };
        // The frame's memory goes back before the answer is written.
        let id = task.id;
        drop(task);
        let done = Up::Done { id, outcome };
        if outbox.send(&done).is_err() {
            return EXIT_ORPHANED;
        }
        if let Up::Done {
            outcome: Outcome::Value(bytes),
            ..
        } = done
        {
            wire::chunk::give_back_chunk_buffer(bytes.into_vec());
        }
    }
}

/// How long the main thread waits for the arena's file, which the parent sent before the
/// `Down::Arena` that announces it: only for the watcher thread to be scheduled.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Maps the arena the parent made for this worker, read-only.
fn open_arena(a: &wire::Arena, handover: &Handover) -> Result<SharedMap, String> {
    let fd = handover.take(HANDOVER_TIMEOUT)?;
    let size = usize::try_from(a.size).map_err(|e| e.to_string())?;
    SharedMap::new(fd.as_fd(), size, false).map_err(|e| e.to_string())
}

/// A task's arguments in the arena: valid until the task is dropped, which the worker does
/// before it answers (after which the parent may write there again).
struct ArenaBytes {
    map: Arc<SharedMap>,
    offset: usize,
    len: usize,
}

impl ArenaBytes {
    /// `None` if the bytes are not all inside the arena.
    fn new(map: &Arc<SharedMap>, offset: usize, len: usize) -> Option<ArenaBytes> {
        map.get(offset, len)?;
        Some(ArenaBytes {
            map: Arc::clone(map),
            offset,
            len,
        })
    }
}

impl AsRef<[u8]> for ArenaBytes {
    fn as_ref(&self) -> &[u8] {
        // Checked in `new`.
        self.map.get(self.offset, self.len).unwrap_or_default()
    }
}
