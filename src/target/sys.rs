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
//!    time) and inhabited (the parent held a value of it to call `Process::new`). A
//!    zero-sized fn item or closure carries no data, so making one is the same as naming
//!    the function. The one caveat: a closure that captures a zero-sized *token* type gets
//!    that token in the child without calling its constructor; don't capture tokens.

use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

use super::{Entry, Image};

/// Runs before `main` in every program that links procpool; returns at once unless this
/// process is a procpool child, in which case it never returns.
extern "C" fn boot() {
    crate::child::boot();
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
