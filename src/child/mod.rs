//! What runs in a child before `main`: recognise the command line, handshake, serve, exit.
//!
//! A child is `/proc/self/exe` of its parent, started with the command line
//! `[title, MAGIC, parent pid]` and its channel to the parent as fd 0 (see
//! [`take_channel`]). The hook in `target::sys` calls [`boot`] in
//! every program that links procpool before `main`; it returns at once unless `argv[1]`
//! is [`MAGIC`]. A child never returns from [`boot`]: it exits, so the program's own
//! `main` (or the test harness) never runs in it. No environment variable is set or read,
//! so a child's environment is exactly its parent's.
//!
//! Here: the start and the handshake, up to `Ready`. Then `tasks.rs` serves (a
//! `Process`'s one target, a pool worker's tasks), and `watch.rs` watches the parent on a
//! thread of its own (and answers a pool worker's recalls).

mod tasks;
mod watch;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::target::{self, Context, Image};
use crate::wire::{
    self, BlockingChannel, Down, Hello, Outbox, Outcome, PROTOCOL_VERSION, Role, Up,
};
use tasks::{execute, run_once, serve_pool};
use watch::{Gate, Handover, watch_parent};

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
    // The pid is the one on the command line, checked above to be our parent's.
    let parent = u32::try_from(args.parent).unwrap_or_default();
    crate::runtime::become_child(
        &hello.name,
        hello.identity.clone(),
        &hello.parent_name,
        parent,
    );
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
