//! Every `unsafe` block of the crate, each with its argument.
//!
//! # Soundness of running a target in a child
//!
//! A target travels as the offset of its *entry point* (`entry::<F, M, A>`, a
//! monomorphised `fn(&[u8], &mut Context) -> Outcome`) from the main executable's load
//! base. The child turns the offset back into a function pointer and calls it. That is
//! sound when all of these hold, and the crate checks each one:
//!
//! 1. **The offset names an entry point of the same type in the child.** The child is
//!    `execve("/proc/self/exe")` of the parent: the very file the parent runs, even if its
//!    path was replaced since. The handshake compares a build fingerprint (device, inode,
//!    size and mtime of the executable, the layout of its code mappings, the protocol and
//!    crate versions); a child whose fingerprint differs refuses every target. Same file,
//!    same code, same offsets.
//! 2. **The offset was computed from a real entry point.** Only the parent writes on the
//!    channel (a `socketpair` whose other end the child gets as its fd 0 at spawn and
//!    nobody else has), and it writes only offsets it computed with
//!    `entry::<F, M, A> as usize`.
//! 3. **The entry point lives in the main executable.** The parent refuses
//!    ([`Error::UnsupportedTarget`](crate::Error::UnsupportedTarget)) an entry point that
//!    is not inside an executable mapping of the main executable (code in a `dlopen`ed
//!    library would be mapped elsewhere, or not at all, in the child). The child checks
//!    the same range again before it makes a pointer.
//! 4. **A value of `F` may be made from nothing.** `F` is zero-sized (checked at compile
//!    time), `Copy` (a bound of `Target`) and inhabited (the parent held a value of it to
//!    call `Process::new`). A fn item or a closure that captures nothing carries no data,
//!    so making one is the same as naming the function. `Copy` rules out a closure that
//!    captures a zero-sized value with drop glue or a one-of-a-kind (non-`Copy`) token:
//!    making those from nothing could run a `Drop` that was never armed or duplicate a
//!    unique proof. What remains, and Rust cannot detect, is a closure capturing a
//!    zero-sized `Copy` type whose existence is a proof `unsafe` code trusts; `Target`'s
//!    docs state that rule for users.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::unix::AsyncFd;

use super::{Entry, Image};

/// Runs before `main` in every program that links procpool; returns at once unless this
/// process is a procpool child, in which case it never returns.
extern "C" fn boot() {
    crate::child::boot();
    #[cfg(feature = "redis")]
    crate::node::boot_from_env();
}

// SAFETY: `.init_array` entries are called once by the dynamic loader (or the static
// start-up code) before `main`, with the C ABI; `boot` is an `extern "C" fn()` that
// takes no arguments (extra ones glibc passes are ignored by the C ABI) and catches
// panics itself, so nothing unwinds into the loader.
#[used]
#[unsafe(link_section = ".init_array")]
static BOOT: extern "C" fn() = boot;

/// Makes sure the object file holding [`BOOT`] is linked into the final executable.
///
/// A linker pulls an archive member only if something refers to it; every path that
/// starts a child calls this, so the hook is present in every program that can have one.
pub(crate) fn keep_boot_linked() {
    std::hint::black_box(&BOOT);
}

/// Makes a value of the zero-sized type `F` out of nothing.
pub(super) fn conjure<F>() -> F {
    const {
        assert!(
            size_of::<F>() == 0,
            "procpool: a target must be a fn item or a closure that captures nothing; \
             pass captured values as arguments instead"
        )
    };
    // SAFETY: `F` is zero-sized (asserted at compile time above), so it has no bytes
    // that could be uninitialised. `F` is inhabited: this is only instantiated for a `F`
    // of which the parent held a value (see point 4 of the module docs).
    unsafe { std::mem::zeroed::<F>() }
}

/// The main program's load bias and its executable segments (`[start, end)`), from the
/// dynamic loader: the first object `dl_iterate_phdr` reports is the main program.
pub(super) fn main_program() -> (usize, Vec<(usize, usize)>) {
    struct Found {
        base: usize,
        code: Vec<(usize, usize)>,
    }
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid `dl_phdr_info` for the duration of the call;
        // `data` is the `&mut Found` that `main_program` passed, borrowed by nothing else
        // while `dl_iterate_phdr` runs; `dlpi_phdr` points to `dlpi_phnum` program
        // headers mapped for the object's lifetime (the main program's: the process's).
        let (info, found) = unsafe { (&*info, &mut *data.cast::<Found>()) };
        let Ok(base) = usize::try_from(info.dlpi_addr) else {
            return 1;
        };
        found.base = base;
        let phdrs = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: see above: `dlpi_phnum` headers at `dlpi_phdr`, aligned and
            // initialised by the loader (or the kernel, for the executable).
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        for ph in phdrs {
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                let start = usize::try_from(ph.p_vaddr)
                    .ok()
                    .and_then(|v| base.checked_add(v));
                let len = usize::try_from(ph.p_memsz).ok();
                if let (Some(start), Some(len)) = (start, len)
                    && let Some(end) = start.checked_add(len)
                {
                    found.code.push((start, end));
                }
            }
        }
        1 // Stop: only the first object, the main program, is wanted.
    }
    let mut found = Found {
        base: 0,
        code: Vec::new(),
    };
    // SAFETY: `first` matches the callback type `dl_iterate_phdr` expects, does not
    // unwind (no call in it panics), and `found` outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(first), (&raw mut found).cast());
    }
    (found.base, found.code)
}

/// Looks an entry point up by the offset a parent sent, checking it is code of the main
/// executable. The caller has matched the parent's build fingerprint first.
pub(crate) fn lookup(offset: u64) -> Result<Entry, String> {
    let image = Image::get()?;
    let addr = image
        .address_of(offset)
        .ok_or_else(|| format!("offset {offset:#x} is not code of this executable"))?;
    // SAFETY: the handshake proved the parent runs this very executable (fingerprint),
    // the parent sends only offsets of `entry::<F, M, A>` functions, and `address_of`
    // checked the address lies in this executable's code (points 1 to 3 above). A fn
    // pointer has the size and representation of a `usize` on every Linux target.
    Ok(unsafe { std::mem::transmute::<usize, Entry>(addr) })
}

/// Registers a pidfd with the current tokio runtime to wait for the process's exit.
pub(crate) fn watch_pidfd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    register_fd(fd, tokio::io::Interest::READABLE)
}

/// Registers `fd` with the current tokio runtime (the reactor of the calling context).
pub(crate) fn register_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `AsyncFd` takes ownership of the `OwnedFd`, so the descriptor stays open
    // and is not replaced for as long as it is registered; it is closed only when the
    // `AsyncFd` is dropped, after deregistration.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into())
}

/// Ignores `SIGPIPE`, as Rust's `main` start-up does (a child never reaches `main`).
pub(crate) fn ignore_sigpipe() {
    // SAFETY: `signal` with `SIG_IGN` installs no handler code; it is called before
    // `main`, while this process has a single thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// What the SIGSEGV handler prints for a stack overflow (std's words), set before the
/// handler is installed.
static OVERFLOW_MESSAGE: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
/// The main thread's guard page: a fault at an address in `GUARD_LO..GUARD_HI` there is
/// a stack overflow.
static GUARD_LO: AtomicUsize = AtomicUsize::new(0);
static GUARD_HI: AtomicUsize = AtomicUsize::new(0);

/// The main thread's alternate signal stack: the handler needs little, the kernel's
/// signal frame some KiB (more with AVX-512 state).
const ALT_STACK: usize = 64 * 1024;

/// Reports a stack overflow of the main thread, where targets run, as std's `main` would:
/// prints "thread '`thread`' has overflowed its stack" and exits with
/// `error::EXIT_STACK_OVERFLOW`. A child never runs `main`, so std never installs its
/// own handler; before this, an overflow was a bare SIGSEGV. Any other SIGSEGV still
/// kills the process with SIGSEGV. Threads a target starts get no alternate stack (std
/// gives one only when its handler is installed): an overflow there stays a SIGSEGV.
/// Call it on the main thread, once.
pub(crate) fn report_stack_overflow(thread: &str) {
    let Some(guard) = main_guard() else {
        return;
    };
    let message = format!(
        "\nthread '{thread}' has overflowed its stack\nfatal runtime error: stack overflow, \
         exiting with code {}\n",
        crate::error::EXIT_STACK_OVERFLOW
    );
    if OVERFLOW_MESSAGE
        .set(message.into_bytes().into_boxed_slice())
        .is_err()
    {
        return; // installed already
    }
    GUARD_LO.store(guard.start, Ordering::Relaxed);
    GUARD_HI.store(guard.end, Ordering::Relaxed);
    let alt: &'static mut [u8] = Vec::leak(vec![0u8; ALT_STACK]);
    let stack = libc::stack_t {
        ss_sp: alt.as_mut_ptr().cast(),
        ss_flags: 0,
        ss_size: alt.len(),
    };
    // SAFETY: `stack` describes leaked memory, valid and used by nothing else for the
    // rest of the process; `sigaltstack` copies the struct and applies to the calling
    // thread (the main thread: `child::serve` calls this).
    if unsafe { libc::sigaltstack(&stack, std::ptr::null_mut()) } != 0 {
        return;
    }
    // SAFETY: an all-zero `sigaction` is a valid value of this C struct (SIG_DFL, an
    // empty mask, no flags); `sigaction` only reads `action` and writes `old`, both
    // valid locals. The handler is installed only over the default disposition (as std
    // does), and uses only async-signal-safe calls (see `on_fault`).
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut old) != 0
            || old.sa_sigaction != libc::SIG_DFL
        {
            return;
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_fault
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut());
    }
}

/// The page below the main thread's stack, as std computes it for its own handler
/// (`install_main_guard` on Linux): the kernel grows the main stack on demand up to its
/// rlimit, and the first access past that faults in this page (stack probes touch each
/// page in turn).
fn main_guard() -> Option<std::ops::Range<usize>> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: `pthread_self` is always valid; `pthread_getattr_np` initialises `attr`
    // when it returns 0, and only then is `attr` read or destroyed below.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return None;
    }
    let mut addr: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialised above; the out-pointers are valid locals; `attr` is
    // destroyed once, after its last use.
    let got = unsafe {
        let got = libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        got
    };
    if got != 0 || addr.is_null() {
        return None;
    }
    let page = rustix::param::page_size();
    let low = (addr as usize).next_multiple_of(page);
    Some(low.checked_sub(page)?..low)
}

/// The SIGSEGV handler of a child (see [`report_stack_overflow`]). Async-signal-safe:
/// atomic loads, `gettid`, `getpid`, `write`, `_exit`, `sigaction` and `raise` only.
extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes an SA_SIGINFO handler a valid `siginfo_t`; the address
    // is only trusted for a fault the kernel raised (`si_code > 0`), not a sent signal.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let on_main = rustix::thread::gettid() == rustix::process::getpid();
    let guard = GUARD_LO.load(Ordering::Relaxed)..GUARD_HI.load(Ordering::Relaxed);
    if code > 0 && on_main && guard.contains(&addr) {
        if let Some(msg) = OVERFLOW_MESSAGE.get() {
            // A failed write (stderr closed) leaves nothing else to try: the exit code
            // still says what happened.
            rustix::io::write(rustix::stdio::stderr(), msg).ok();
        }
        // SAFETY: `_exit` is async-signal-safe and ends the process at once, running
        // nothing of it (no atexit handlers, no destructors, no unwinding).
        unsafe { libc::_exit(crate::error::EXIT_STACK_OVERFLOW) }
    }
    // Not a stack overflow: die of it as without this handler. The signal is blocked
    // while the handler runs, so the raised one is delivered, with the default action,
    // as the handler returns (whether the fault was real or the signal sent).
    // SAFETY: an all-zero `sigaction` is SIG_DFL with an empty mask; `sigaction` and
    // `raise` are async-signal-safe.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        libc::raise(sig);
    }
}

/// A shared mapping of a memory file: a pool worker's arena for large arguments, mapped
/// writable by the parent and read-only by the worker.
///
/// # Soundness
///
/// The mapping is never moved or resized and is unmapped only on drop, so every slice
/// made from it stays in bounds while its `SharedMap` lives (the methods check bounds).
/// Within one process, writing needs `&mut self`, so no slice the process made aliases a
/// written one. Across the two processes, the arena protocol keeps writes and reads of
/// the same bytes apart in time: the parent writes a region only while no task it sent
/// refers to it (before it sends the task, and after the worker answered it), and the
/// worker reads a region only while it holds that task (it drops the task, and with it
/// the slice, before it answers). Both sides are this crate's code, in the same binary
/// (the handshake checks the build); a peer that broke the protocol could race.
#[derive(Debug)]
pub(crate) struct SharedMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; sharing it between threads is
// as sound as sharing a `Box<[u8]>` (see the type's soundness notes for the other process).
unsafe impl Send for SharedMap {}
// SAFETY: as for `Send`: `&self` only reads, `&mut self` is needed to write.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps the first `len` bytes of `fd` (a memory file at least that long).
    pub(crate) fn new(
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
        writable: bool,
    ) -> std::io::Result<SharedMap> {
        use rustix::mm::{MapFlags, ProtFlags};
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a new mapping at an address the kernel chooses, so it overlaps no memory
        // Rust knows about; `len` bytes of the file exist (the parent truncated it so).
        let ptr =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0) }?;
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(SharedMap { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes `offset..offset + len`, or `None` past the end.
    pub(crate) fn get(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len)?;
        // SAFETY: in bounds (checked), the mapping lives as long as `&self`, no `&mut`
        // into it exists in this process while `&self` is borrowed; the other process
        // does not write these bytes while the arena protocol lets us read them.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), end - offset) })
    }

    /// Bytes `offset..offset + len` to write, or `None` past the end.
    pub(crate) fn get_mut(&mut self, offset: usize, len: usize) -> Option<&mut [u8]> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len)?;
        // SAFETY: in bounds (checked), the mapping lives as long as `&mut self`, which
        // also rules out any other slice of it in this process; the other process does
        // not read these bytes while the arena protocol lets us write them.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), end - offset) })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this address and length, and no
        // slice of it outlives `self` (they borrow it).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::warn!("procpool: cannot unmap an arena: {e}");
        }
    }
}

/// A writable memory file shared by processes, for `Value` and `Array`: a lock word
/// (an `AtomicU32`, at offset 0) and `data_len` bytes of data from [`SharedRegion::DATA`],
/// mapped in every process that has it.
///
/// # Soundness
///
/// The mapping is never moved or resized (the file is sealed against shrinking and
/// growing, so no process can truncate it under another's mapping and cause SIGBUS), and
/// is unmapped only on drop. The lock word is only accessed atomically. The data bytes
/// are handed out only as [`SharedRegion::data`], whose caller must hold the region's
/// lock (`sync`'s shared lock on the word, exclusive across processes and threads); every
/// process follows that protocol, being this crate's code.
#[derive(Debug)]
pub(crate) struct SharedRegion {
    ptr: std::ptr::NonNull<u8>,
    data_len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value, accessed atomically (the lock
// word) or under the lock (the data): as sound as sharing a `Mutex<Box<[u8]>>`.
unsafe impl Send for SharedRegion {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Where the data starts: after the lock word, aligned for any type of alignment up
    /// to 64.
    pub(crate) const DATA: usize = 64;

    /// A new zero-filled region of `data_len` data bytes.
    pub(crate) fn create(data_len: usize) -> std::io::Result<SharedRegion> {
        use rustix::fs::{MemfdFlags, SealFlags, fcntl_add_seals, ftruncate, memfd_create};
        let total = Self::DATA
            .checked_add(data_len)
            .ok_or_else(|| std::io::Error::other("too large"))?;
        let fd = memfd_create(
            "procpool-shared",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        ftruncate(&fd, u64::try_from(total).map_err(std::io::Error::other)?)?;
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        Self::map(fd, data_len)
    }

    /// The region of memory file `fd`, which must hold exactly `data_len` data bytes.
    pub(crate) fn open(fd: OwnedFd, data_len: usize) -> std::io::Result<SharedRegion> {
        let size = rustix::fs::fstat(&fd)?.st_size;
        let want = Self::DATA.checked_add(data_len);
        if want.and_then(|w| i64::try_from(w).ok()) != Some(size) {
            return Err(std::io::Error::other(format!(
                "the shared memory holds {size} bytes, not the {} expected",
                Self::DATA.saturating_add(data_len)
            )));
        }
        let seals = rustix::fs::fcntl_get_seals(&fd)?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(std::io::Error::other("the shared memory is not sealed"));
        }
        Self::map(fd, data_len)
    }

    fn map(fd: OwnedFd, data_len: usize) -> std::io::Result<SharedRegion> {
        use rustix::mm::{MapFlags, ProtFlags};
        let total = Self::DATA + data_len;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a new mapping at an address the kernel chooses, so it overlaps no memory
        // Rust knows about; the file holds `total` bytes (made or checked so) and is
        // sealed against shrinking.
        let ptr = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), total, prot, MapFlags::SHARED, &fd, 0)
        }?;
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(SharedRegion { ptr, data_len, fd })
    }

    /// The memory file, to pass to another process.
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The lock word.
    fn word(&self) -> &std::sync::atomic::AtomicU32 {
        self.header(0)
    }

    /// Word `i` of the header (0: the lock; 1: the change counter; 2: its sleepers).
    fn header(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(i < 3, "three header words");
        // SAFETY: offset 4 * i < 12 of a page-aligned mapping of at least 64 bytes is
        // aligned and in bounds for an `AtomicU32`, lives as long as `&self`, and the
        // header words are only ever accessed atomically, in every process.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.as_ptr().add(4 * i).cast()) }
    }

    /// Starts a wait for a change: counts this waiter (so that changes from here on are
    /// announced) and returns the change counter, to look at the data and then to pass to
    /// [`wait_change`](Self::wait_change). Each call is paired with
    /// [`end_wait`](Self::end_wait).
    pub(crate) fn begin_wait(&self) -> u32 {
        use std::sync::atomic::Ordering::SeqCst;
        self.header(2).fetch_add(1, SeqCst);
        self.header(1).load(SeqCst)
    }

    /// Ends what [`begin_wait`](Self::begin_wait) started.
    pub(crate) fn end_wait(&self) {
        self.header(2)
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sleeps until the change counter is no longer `seen`, or at most `limit`; whether
    /// it changed.
    pub(crate) fn wait_change(&self, seen: u32, limit: std::time::Duration) -> bool {
        let ts = rustix::time::Timespec {
            tv_sec: i64::try_from(limit.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(limit.subsec_nanos()),
        };
        let flags = rustix::thread::futex::Flags::empty();
        if let Err(e) = rustix::thread::futex::wait(self.header(1), flags, seen, Some(&ts))
            && !matches!(
                e,
                rustix::io::Errno::AGAIN | rustix::io::Errno::TIMEDOUT | rustix::io::Errno::INTR
            )
        {
            tracing::warn!("procpool: futex wait on shared memory failed: {e}");
            std::thread::sleep(limit);
        }
        self.header(1).load(std::sync::atomic::Ordering::SeqCst) != seen
    }

    /// Announces a change of the data (made under the lock, before this call) to the
    /// waiters counted by [`begin_wait`](Self::begin_wait), if any: a waiter counted
    /// before it looked at the data either saw the change or is woken.
    pub(crate) fn announce_change(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.header(2).load(SeqCst) > 0 {
            self.header(1).fetch_add(1, SeqCst);
            let flags = rustix::thread::futex::Flags::empty();
            if let Err(e) = rustix::thread::futex::wake(self.header(1), flags, u32::MAX >> 1) {
                tracing::warn!("procpool: futex wake on shared memory failed: {e}");
            }
        }
    }

    /// Takes the region's lock, exclusive across every thread of every process that has
    /// the region, waiting as long as it takes; a holder that died holding it is
    /// replaced (the guard says so). Not reentrant: taking it twice in one thread waits
    /// forever.
    ///
    /// The word holds the holder's pid, and [`LOCK_WAITERS`] once someone sleeps on it
    /// (a futex shared by processes); a waiter looks at the holder every
    /// [`LOCK_LOOK`], and takes the lock over from a holder that is dead.
    pub(crate) fn lock(&self) -> RegionGuard<'_> {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let me = my_pid();
        let w = self.word();
        let held = |abandoned| RegionGuard {
            region: self,
            abandoned,
        };
        if w.compare_exchange(0, me, Acquire, Relaxed).is_ok() {
            return held(false);
        }
        let mut spins = 0;
        loop {
            let v = w.load(Relaxed);
            if v == 0 {
                // Taken marked, so that its release wakes whoever still sleeps.
                if w.compare_exchange(0, me | LOCK_WAITERS, Acquire, Relaxed)
                    .is_ok()
                {
                    return held(false);
                }
                continue;
            }
            if spins < 64 {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if holder_is_dead(v & !LOCK_WAITERS) {
                if w.compare_exchange(v, me | LOCK_WAITERS, Acquire, Relaxed)
                    .is_ok()
                {
                    return held(true);
                }
                continue;
            }
            if v & LOCK_WAITERS == 0
                && w.compare_exchange(v, v | LOCK_WAITERS, Relaxed, Relaxed)
                    .is_err()
            {
                continue;
            }
            let look = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: LOCK_LOOK.as_nanos().try_into().unwrap_or(20_000_000),
            };
            // Woken, timed out (look at the holder), interrupted or the word changed:
            // all end in a look at the word.
            let flags = rustix::thread::futex::Flags::empty();
            if let Err(e) = rustix::thread::futex::wait(w, flags, v | LOCK_WAITERS, Some(&look))
                && !matches!(
                    e,
                    rustix::io::Errno::AGAIN
                        | rustix::io::Errno::TIMEDOUT
                        | rustix::io::Errno::INTR
                )
            {
                tracing::warn!("procpool: futex wait on shared memory failed: {e}");
                std::thread::sleep(LOCK_LOOK);
            }
        }
    }
}

/// Set in a region's lock word when a process sleeps on it.
const LOCK_WAITERS: u32 = 1 << 31;

/// How often a waiter for a region's lock looks whether its holder died.
const LOCK_LOOK: std::time::Duration = std::time::Duration::from_millis(20);

/// This process's pid, asked of the kernel once (a syscall is most of an uncontended
/// lock's cost). procpool starts children with a new executable, never a bare `fork`.
pub(crate) fn my_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// Whether process `pid` is gone (or a zombie: dead, not reaped yet).
pub(crate) fn holder_is_dead(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(p) {
        Err(rustix::io::Errno::SRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            })
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

/// A region's lock, held; dropping it lets go.
#[derive(Debug)]
pub(crate) struct RegionGuard<'a> {
    region: &'a SharedRegion,
    abandoned: bool,
}

impl RegionGuard<'_> {
    /// Whether the previous holder died holding the lock (the data may be half written).
    pub(crate) fn abandoned(&self) -> bool {
        self.abandoned
    }

    /// The data bytes (aligned to 64), read-only, for as long as the lock is held.
    pub(crate) fn data_ref(&self) -> &[u8] {
        let r = self.region;
        // SAFETY: as for `data`; a shared borrow of the guard rules out a `data` slice
        // (which borrows it mutably) while this one lives.
        unsafe { std::slice::from_raw_parts(r.ptr.as_ptr().add(SharedRegion::DATA), r.data_len) }
    }

    /// The data bytes (aligned to 64), for as long as the lock is held.
    pub(crate) fn data(&mut self) -> &mut [u8] {
        let r = self.region;
        // SAFETY: in bounds (`DATA + data_len` bytes are mapped), the mapping outlives the
        // guard; the lock, exclusive across threads and processes, is held while this
        // guard lives, and the slice borrows the guard mutably, so no other slice of
        // these bytes exists anywhere meanwhile.
        unsafe {
            std::slice::from_raw_parts_mut(r.ptr.as_ptr().add(SharedRegion::DATA), r.data_len)
        }
    }
}

impl Drop for RegionGuard<'_> {
    fn drop(&mut self) {
        let w = self.region.word();
        if w.swap(0, std::sync::atomic::Ordering::Release) & LOCK_WAITERS != 0
            && let Err(e) = rustix::thread::futex::wake(w, rustix::thread::futex::Flags::empty(), 1)
        {
            tracing::warn!("procpool: futex wake on shared memory failed: {e}");
        }
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this address and length, and no slice
        // of it outlives `self` (they borrow it).
        let unmapped =
            unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), Self::DATA + self.data_len) };
        if let Err(e) = unmapped {
            tracing::warn!("procpool: cannot unmap shared memory: {e}");
        }
    }
}
