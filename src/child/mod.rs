//! What runs in a child before `main`: recognise the command line, handshake, serve, exit.
//!
//! A child is `/proc/self/exe` of its parent, started with the command line
//! `[title, MAGIC, parent pid]` and its channel to the parent as fd 0 (see
//! [`take_channel`]). The hook in `target::sys` calls [`boot`] in
//! every program that links procpool before `main`; it returns at once unless `argv[1]`
//! is [`MAGIC`]. A child never returns from [`boot`]: it exits, so the program's own
//! `main` (or the test harness) never runs in it. No environment variable is set or read,
//! so a child's environment is exactly its parent's.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::target::{self, Context, Image, SharedMap};
use crate::wire::{
    self, BlockingChannel, Down, DownIn, Hello, Next, Outbox, Outcome, PROTOCOL_VERSION, Role, Run,
    Up,
};

/// `argv[1]` of every procpool child.
pub(crate) use crate::runtime::service::MAGIC;

/// Exit code of a child that ran a target which panicked (Python's `exitcode` 1).
const EXIT_PANICKED: i32 = 1;
/// Exit code of a child whose parent spoke a protocol it could not follow.
const EXIT_PROTOCOL: i32 = 76;
/// Exit code of a child that refused to run because it is not the parent's build.
const EXIT_REFUSED: i32 = 78;
/// Exit code of a child whose parent went away.
const EXIT_ORPHANED: i32 = 79;

/// What the parent put on the command line.
#[derive(Debug)]
struct Args {
    parent: i32,
}

/// Called before `main` in every program that links procpool.
pub(crate) fn boot() {
    let cmdline = match std::fs::read("/proc/self/cmdline") {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut argv = cmdline.split(|b| *b == 0);
    let _title = argv.next();
    if argv.next() != Some(MAGIC.as_bytes()) {
        return;
    }
    let mut num = || -> Option<i32> { std::str::from_utf8(argv.next()?).ok()?.parse().ok() };
    let args = match num() {
        Some(parent) => Args { parent },
        _ => {
            eprintln!(
                "procpool: malformed child command line; this program was not started by procpool"
            );
            std::process::exit(EXIT_PROTOCOL);
        }
    };
    // From here on this process is a child: it never returns to the loader, so `main`
    // never runs.
    let code = std::panic::catch_unwind(|| serve(args)).unwrap_or(EXIT_PROTOCOL);
    std::process::exit(code);
}

fn serve(args: Args) -> i32 {
    target::ignore_sigpipe();
    // Die with the parent. The signal is armed first, then the parent checked, so a parent
    // that died in between is noticed too.
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
    {
        eprintln!("procpool: cannot arm the parent-death signal: {e}");
    }
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(args.parent) {
        return EXIT_ORPHANED;
    }
    let stream = match take_channel() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("procpool: child cannot use its channel: {e}");
            return EXIT_PROTOCOL;
        }
    };
    let control = match take_control(&stream) {
        Ok(Some(c)) => c,
        Ok(None) => return EXIT_ORPHANED,
        Err(e) => {
            eprintln!("procpool: child cannot read its preamble: {e}");
            return EXIT_PROTOCOL;
        }
    };
    let outbox = match stream.try_clone() {
        Ok(w) => Outbox::new(w, wire::DEFAULT_MAX_FRAME),
        Err(_) => return EXIT_PROTOCOL,
    };
    let mut chan = BlockingChannel::new(stream, wire::DEFAULT_MAX_FRAME);
    let hello: Hello = match chan.recv::<Down>() {
        Ok(Some(Down::Hello(h))) => h,
        Ok(None) => return EXIT_ORPHANED,
        Ok(Some(_)) | Err(_) => return EXIT_PROTOCOL,
    };
    if let Err(reason) = check_build(&hello) {
        // The parent reports this as a spawn error; a failed send only means it is gone.
        let sent = outbox.send(&Up::Refused { reason });
        return if sent.is_ok() {
            EXIT_REFUSED
        } else {
            EXIT_ORPHANED
        };
    }
    // Watching for the parent's end to close takes a thread, and starting one costs time
    // (BENCHMARKS.md): with an initializer to run it must watch from now; without one,
    // it starts after `Ready` (the poll is level-triggered: a parent gone in between is
    // seen at once).
    let watching_early = hello.init.is_some();
    let gate = Arc::new(Mutex::new(Gate::default()));
    let handover = Arc::new(Handover::default());
    let mut control =
        control.map(|c| (c, Arc::clone(&gate), outbox.clone(), Arc::clone(&handover)));
    if watching_early {
        watch_parent(chan.get_ref(), control.take());
    }
    crate::runtime::become_child(&hello.name, hello.identity.clone());
    crate::log::install_forwarding(hello.log_level, hello.log_print, outbox.clone());
    set_title(&hello.name);
    // Python prints the traceback of a `Process` that raised, not of a pool task (the
    // pool hands the error to the caller instead).
    install_panic_hook(&hello.name, hello.role == Role::Process);
    // Before any user code runs here (the initializer, the targets): std installs its
    // handler in `main`, which a child never reaches.
    target::report_stack_overflow(&hello.name);
    let mut cx = Context::default();
    if let Some(init) = hello.init {
        let outcome = execute(&init, &mut cx);
        if !matches!(outcome, Outcome::Value(_)) {
            return match outbox.send(&Up::InitFailed { outcome }) {
                Ok(()) => EXIT_PANICKED,
                Err(_) => EXIT_ORPHANED,
            };
        }
    }
    let ready = Up::Ready {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
    };
    if outbox.send(&ready).is_err() {
        return EXIT_ORPHANED;
    }
    if !watching_early {
        watch_parent(chan.get_ref(), control.take());
    }
    match hello.role {
        Role::Process => run_once(chan, outbox, cx),
        Role::Worker => serve_pool(chan, outbox, cx, &gate, &handover),
    }
}

/// Reads the channel's first byte (see `process::service::spawn_here`): the recall
/// channel of a pool worker, or none. `Ok(None)`: the parent is gone already.
fn take_control(stream: &UnixStream) -> std::io::Result<Option<Option<UnixStream>>> {
    let mut byte = [0u8; 1];
    let (got, fd) = wire::fdpass::recv_with_fd(stream, &mut byte)?;
    match (got, byte[0], fd) {
        (0, _, _) => Ok(None),
        (1, 0, None) => Ok(Some(None)),
        (1, 1, Some(fd)) => Ok(Some(Some(UnixStream::from(fd)))),
        _ => Err(std::io::Error::other("malformed preamble")),
    }
}

/// Takes the channel to the parent, which arrives as fd 0, and puts `/dev/null` there
/// instead, as Python's `multiprocessing` does for a child's stdin.
///
/// The channel travels as stdin because std starts a child with `posix_spawn` (a
/// `vfork`, which does not copy the parent's page tables, so that a large heap does not
/// slow the start: BENCHMARKS.md) only when nothing runs between fork and exec, and
/// making any other descriptor inheritable would need such a step. The channel is kept
/// close-on-exec, so what this child starts does not inherit it.
fn take_channel() -> std::io::Result<UnixStream> {
    use rustix::fs::{FileType, Mode, OFlags};
    let stdin = rustix::stdio::stdin();
    let st = rustix::fs::fstat(stdin)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(std::io::Error::other(
            "fd 0 is not a socket: this process was not started by procpool",
        ));
    }
    let channel = rustix::io::fcntl_dupfd_cloexec(stdin, 3)?;
    let null = rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    rustix::stdio::dup2_stdin(&null)?;
    Ok(UnixStream::from(channel))
}

/// Runs one task: looks its entry point up and calls it.
fn execute(run: &Run, cx: &mut Context) -> Outcome {
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

fn check_build(hello: &Hello) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} in the parent, {PROTOCOL_VERSION} in the child",
            hello.version
        ));
    }
    let ours = Image::get()?.fingerprint();
    if hello.fingerprint != ours {
        return Err(
            "the child is not the same build as the parent (the executable changed?); \
             it refuses to run any target"
                .to_owned(),
        );
    }
    Ok(())
}

/// The `Process` role: run one target, send its outcome, exit.
fn run_once(mut chan: BlockingChannel, outbox: Outbox, mut cx: Context) -> i32 {
    let run = match chan.recv::<Down>() {
        Ok(Some(Down::Run(run))) => run,
        Ok(None) => return EXIT_ORPHANED,
        Ok(Some(_)) | Err(_) => return EXIT_PROTOCOL,
    };
    // Python's wording, so people recognise them.
    tracing::info!("child process calling self.run()");
    let outcome = execute(&run, &mut cx);
    // What the target sent to queues, locks and events is applied before we report.
    crate::sync::settle();
    let code = match outcome {
        Outcome::Panicked { .. } => EXIT_PANICKED,
        _ => 0,
    };
    tracing::info!("process shutting down");
    tracing::info!("process exiting with exitcode {code}");
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
/// end-of-channel watch (see [`watch_parent`]) exits the process if the parent goes
/// away; a skip that arrives while its task runs is moot (the dispatcher stops a worker
/// that does not move on).
fn serve_pool(
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
            let outcome = execute_parts(task.target, &task.target_name, &task.args, &mut cx);
            crate::sync::settle();
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

/// The arena's file, from the watcher (which reads the recall channel it came on) to the
/// main thread.
#[derive(Default)]
struct Handover {
    fd: Mutex<Option<OwnedFd>>,
    came: std::sync::Condvar,
}

impl Handover {
    fn give(&self, fd: OwnedFd) {
        *self.fd.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
        self.came.notify_all();
    }

    fn take(&self, limit: Duration) -> Result<OwnedFd, String> {
        let slot = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let (mut slot, _) = self
            .came
            .wait_timeout_while(slot, limit, |fd| fd.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.take()
            .ok_or_else(|| format!("its file did not arrive within {limit:?}"))
    }
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

/// Which tasks a pool worker has started, and which the parent took back: the one
/// place where the main thread (starting tasks) and the watcher (answering recalls)
/// meet, so that every task is either started here or given back, never both.
#[derive(Debug, Default)]
struct Gate {
    /// The number of the last task started (or answered as skipped).
    started: u64,
    /// Tasks `lo + 1 ..= hi` were given back: they are dropped unanswered.
    revoked: VecDeque<(u64, u64)>,
}

impl Gate {
    /// Called before task `seq` runs: false if it was given back.
    fn start(&mut self, seq: u64) -> bool {
        while self.revoked.front().is_some_and(|&(_, hi)| hi < seq) {
            self.revoked.pop_front();
        }
        if self.revoked.iter().any(|&(lo, hi)| lo < seq && seq <= hi) {
            return false;
        }
        self.started = self.started.max(seq);
        true
    }

    /// The parent asks for every task up to `upto` not started yet: gives back
    /// `after + 1 ..= upto` and returns `after`.
    fn recall(&mut self, upto: u64) -> u64 {
        let after = self.started.min(upto);
        if after < upto {
            self.revoked.push_back((after, upto));
        }
        after
    }
}

/// The watcher's part of a pool worker's recall channel: the socket, the gate, and
/// where answers go.
type Control = (UnixStream, Arc<Mutex<Gate>>, Outbox, Arc<Handover>);

/// Watches the parent on a thread of its own while the main thread runs tasks:
///
/// - exits as soon as the parent's end of the channel closes (the parent died, or gave
///   up on this child): the parent-death signal alone misses a parent that gave up
///   while staying alive, for example a cancelled pool build while an initializer runs.
///   It polls for the peer's hang-up without reading, so it never takes a frame meant
///   for the thread that serves tasks;
/// - answers recalls on a pool worker's recall channel (`wire::RECALL`): the tasks sent
///   ahead that have not started are given back at once, even while a long task runs,
///   so the parent can run them on an idle worker.
fn watch_parent(stream: &UnixStream, control: Option<Control>) {
    let Ok(stream) = stream.try_clone() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("procpool-eof-watch".into())
        .spawn(move || {
            use rustix::event::{PollFd, PollFlags, poll};
            let mut control = control;
            loop {
                let mut fds = vec![PollFd::new(&stream, PollFlags::RDHUP)];
                if let Some((c, ..)) = &control {
                    fds.push(PollFd::new(c, PollFlags::IN));
                }
                match poll(&mut fds, None) {
                    Ok(_) => {
                        let got = fds[0].revents();
                        if got.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) {
                            std::process::exit(EXIT_ORPHANED);
                        }
                        let ready = fds.get(1).is_some_and(|f| !f.revents().is_empty());
                        drop(fds);
                        if ready
                            && let Some(c) = &control
                            && !answer_recall(c)
                        {
                            // The parent closed it: no more recalls; keep watching.
                            control = None;
                        }
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(_) => std::process::exit(EXIT_ORPHANED),
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("procpool: cannot watch the parent channel: {e}");
    }
}

/// Reads one recall and answers it; false once the recall channel is closed or broken.
fn answer_recall((sock, gate, outbox, handover): &Control) -> bool {
    use std::io::Read;
    let mut msg = [0u8; wire::RECALL_LEN];
    // The arena's file comes with the first byte of its message.
    let (got, fd) = match wire::fdpass::recv_with_fd(sock, &mut msg) {
        Ok((0, _)) | Err(_) => return false,
        Ok(got) => got,
    };
    if got < msg.len() && (&*sock).read_exact(&mut msg[got..]).is_err() {
        return false;
    }
    let upto = wire::recall_upto(msg);
    if upto == wire::ARENA_MARK {
        match fd {
            Some(fd) => handover.give(fd),
            // A parent that broke the protocol: the main thread's wait for the file
            // gives up and says so.
            None => tracing::error!("procpool: the arena's message came without its file"),
        }
        return true;
    }
    let after = gate.lock().unwrap_or_else(|p| p.into_inner()).recall(upto);
    // A failed send means the parent is gone; the EOF watch ends the process.
    outbox.send(&Up::Recalled { after, upto }).is_ok()
}

/// Names the process so `ps` and `top` show what it is (`comm`, 15 bytes at most).
fn set_title(name: &str) {
    let short: String = name.chars().take(15).collect();
    if let Ok(c) = std::ffi::CString::new(short) {
        // Only cosmetic: a failure leaves the executable's name in place.
        if let Err(e) = rustix::thread::set_name(&c) {
            eprintln!("procpool: cannot set the process title: {e}");
        }
    }
}

/// Records where a panic happened (the payload does not carry it), then prints it as
/// Rust's default hook would, as Python prints the traceback of an exception in a child.
/// The main thread is named after the process: std never learnt its name, since `main`
/// did not run.
fn install_panic_hook(process: &str, print: bool) {
    let process = process.to_owned();
    std::panic::set_hook(Box::new(move |info| {
        let loc = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        if !print {
            target::note_panic_location(loc);
            return;
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or(&process);
        let msg = target::payload_message(info.payload());
        let at = loc.as_deref().unwrap_or("<unknown>");
        let bt = std::backtrace::Backtrace::capture();
        let trace = match bt.status() {
            std::backtrace::BacktraceStatus::Captured => format!("stack backtrace:\n{bt}"),
            _ => "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
                .to_owned(),
        };
        eprint!("\nthread '{name}' panicked at {at}:\n{msg}\n{trace}");
        target::note_panic_location(loc);
    }));
}
