//! Frames on their way to a worker: the write path the dispatcher writes through
//! without a task hop, the writer task for a full socket, and the arena for large
//! arguments.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::error::Error;
use crate::pool::message::{Args, Part};
use crate::target::{SharedMap, TargetRef};
use crate::wire::Down;
use crate::wire::spare::Spare;

/// Where frames for a worker go: shared by its [`WorkerConn`](super::WorkerConn) and the encoder thread
/// staging a task for it (see [`Conn::stage`](crate::pool::seam::Conn::stage)).
#[derive(Debug, Clone)]
pub(crate) struct Link {
    name: Arc<str>,
    out: Arc<Out>,
    /// The recall channel (see `process::service::spawn_here`), non-blocking.
    control: Arc<std::os::unix::net::UnixStream>,
}

/// Frames on their way to a worker.
///
/// The dispatcher appends frames and then [`flush`](Link::flush)es, writing
/// straight to the socket (no task hop, no wake-up: a write that fits costs one
/// syscall). Only when the socket is full does the rest wait for the writer task, which
/// owns the waiting for writability.
#[derive(Debug)]
struct Out {
    io: OwnedWriteHalf,
    state: Mutex<OutState>,
    wake: Notify,
    /// Buffers for large map items, encoded as they are sent (see `Deferred`).
    spare: Arc<Spare>,
    /// Where large arguments go instead of the socket, once made (see `wire::Arena`).
    /// Held while a task's large items are encoded into it (a user's `Serialize`, on
    /// the encoder thread): the dispatcher never takes it, only `live`.
    arena: Mutex<ArenaSlot>,
    /// The arena's regions of tasks sent (or being written) and not answered, as
    /// `(task, start, end)`, in the order sent, which is the order of their answers.
    live: Mutex<VecDeque<(u64, usize, usize)>>,
}

/// The parent's side of a worker's arena.
#[derive(Debug, Default)]
enum ArenaSlot {
    #[default]
    NotYet,
    /// It could not be made: large arguments go through the socket.
    Unavailable,
    Ready(ParentArena),
}

/// How large a worker's arena is. Only what tasks use is ever touched, and it is reused
/// from its start whenever no task refers to it.
const ARENA_SIZE: usize = 32 << 20;

struct ParentArena {
    map: SharedMap,
}

impl std::fmt::Debug for ParentArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParentArena")
            .field("len", &self.map.len())
            .finish_non_exhaustive()
    }
}

impl ParentArena {
    /// A memory file of [`ARENA_SIZE`] bytes, mapped here, sealed, and handed to the
    /// worker on its recall channel; and the message that tells the worker its size.
    ///
    /// The seals (shrink, grow, writes through any new mapping, further seals) mean the
    /// worker (or anyone it leaks the file to) can only map it read-only, and cannot
    /// truncate it under the parent's mapping, which would kill the parent with SIGBUS.
    fn create(control: &std::os::unix::net::UnixStream) -> Result<(ParentArena, Down), String> {
        use rustix::fs::{MemfdFlags, SealFlags, fcntl_add_seals, ftruncate, memfd_create};
        let fd = memfd_create(
            "procpool-arena",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| e.to_string())?;
        let size = u64::try_from(ARENA_SIZE).map_err(|e| e.to_string())?;
        ftruncate(&fd, size).map_err(|e| e.to_string())?;
        let map = SharedMap::new(fd.as_fd(), ARENA_SIZE, true).map_err(|e| e.to_string())?;
        fcntl_add_seals(
            &fd,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE | SealFlags::SEAL,
        )
        .map_err(|e| format!("cannot seal the arena: {e}"))?;
        let mark = crate::wire::recall(crate::wire::ARENA_MARK);
        // Before the `Down::Arena` that needs it; 8 bytes on a socket that holds at most
        // one recall besides: written whole, or the arena is not used.
        match crate::wire::fdpass::send_with_fd(control, &mark, Some(fd.as_fd())) {
            Ok(n) if n == mark.len() => {}
            Ok(n) => return Err(format!("the arena went with {n} of 8 bytes")),
            Err(e) => return Err(format!("cannot hand the arena over: {e}")),
        }
        let msg = Down::Arena(crate::wire::Arena { size });
        Ok((ParentArena { map }, msg))
    }
}

/// Where `len` bytes fit in an arena of `size` bytes after the `live` regions (a ring:
/// answers free its front).
fn place(live: &VecDeque<(u64, usize, usize)>, size: usize, len: usize) -> Option<usize> {
    let (Some(&(_, first, _)), Some(&(_, _, end))) = (live.front(), live.back()) else {
        return (len <= size).then_some(0);
    };
    if first < end {
        if end + len <= size {
            Some(end)
        } else {
            (len <= first).then_some(0)
        }
    } else {
        (end + len <= first).then_some(end)
    }
}

#[derive(Debug, Default)]
struct OutState {
    /// Bytes ready to go, in order, before `buf` (the first perhaps partly written):
    /// sealed parts of `buf`, and large arguments, which are sent from where they are.
    queue: VecDeque<Bytes>,
    /// Small frames being assembled, after everything in `queue`.
    buf: BytesMut,
    /// The socket was full: the writer task is in charge until everything is written.
    blocked: bool,
    /// The handle is gone: the writer task ends once everything queued is written.
    closed: bool,
    /// A write failed: the worker is gone (its reader reports it); drop what comes.
    dead: bool,
}

/// Arguments at least this large are written from their own buffer, not copied.
const COPY_LIMIT: usize = 64 * 1024;
/// Buffers per vectored write.
const MAX_IOV: usize = 64;

impl OutState {
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.buf.is_empty()
    }

    /// Moves what `buf` holds to the end of `queue`.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.queue.push_back(self.buf.split().freeze());
        }
    }

    /// Appends `bytes`, copied if small, else queued as they are.
    fn push(&mut self, bytes: &Bytes) {
        if bytes.len() < COPY_LIMIT {
            self.buf.extend_from_slice(bytes);
        } else {
            self.seal();
            self.queue.push_back(bytes.clone());
        }
    }

    /// Forgets `n` written bytes.
    fn written(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if front.len() > n {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }
}

impl Out {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what it can without waiting. Returns true if bytes are left over.
    fn write_now(&self, st: &mut OutState) -> bool {
        st.seal();
        while !st.queue.is_empty() {
            let res = {
                let mut iov = [std::io::IoSlice::new(&[]); MAX_IOV];
                let n = st
                    .queue
                    .iter()
                    .zip(iov.iter_mut())
                    .map(|(b, slot)| *slot = std::io::IoSlice::new(b))
                    .count();
                self.io.try_write_vectored(&iov[..n])
            };
            match res {
                Ok(n) => st.written(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    st.dead = true;
                    st.queue.clear();
                }
            }
        }
        false
    }
}

impl Link {
    /// The write path to a worker over `io`, with its recall channel `control`; the
    /// writer task starts now, on the current runtime.
    pub(super) fn new(
        name: Arc<str>,
        io: OwnedWriteHalf,
        control: std::os::unix::net::UnixStream,
    ) -> Link {
        let out = Arc::new(Out {
            io,
            state: Mutex::default(),
            wake: Notify::new(),
            spare: Arc::default(),
            arena: Mutex::default(),
            live: Mutex::default(),
        });
        tokio::spawn(write_task(Arc::clone(&out)));
        Link {
            name,
            out,
            control: Arc::new(control),
        }
    }

    /// The handle is gone: the writer task ends once everything queued is written,
    /// and the worker's channel closes.
    pub(super) fn close(&self) {
        self.out.lock().closed = true;
        self.out.wake.notify_one();
    }

    /// Queues a message; it is written by the next [`flush`](Self::flush).
    pub(crate) fn send(&self, msg: &Down) {
        let mut st = self.out.lock();
        if !st.dead && !crate::wire::frame_into(&mut st.buf, msg) {
            // Only the small messages of the protocol come here.
            tracing::error!(worker = %self.name, "a control message over the frame limit was dropped");
        }
    }

    /// Queues task `id` (see [`send`](Self::send)). Large arguments are not copied;
    /// large map items are encoded now (see `Deferred`), into the worker's arena if they
    /// fit; if one cannot be encoded, nothing is queued and that is the error.
    pub(crate) fn send_run(&self, id: u64, target: TargetRef, args: &Args) -> Result<(), Error> {
        let parts = args.rest.as_deref().unwrap_or_default();
        if args.has_deferred()
            && args.len() <= ARENA_SIZE / 2
            && let Some(sent) = self.send_run_shared(id, target, args)
        {
            return sent;
        }
        let mut encoded = Vec::new();
        for part in parts {
            if let Part::Deferred(item) = part {
                let mut buf =
                    (self.out.spare.take(item.len)).unwrap_or_else(|| Vec::with_capacity(item.len));
                buf.clear();
                item.encode_into(&mut buf)?;
                encoded.push(self.out.spare.share(buf, item.len));
            }
        }
        let mut encoded = encoded.into_iter();
        let mut st = self.out.lock();
        if st.dead {
            return Ok(());
        }
        if !crate::wire::run_frame_head(&mut st.buf, id, target.offset, target.name, args.len()) {
            return Err(Error::Encode {
                type_name: "task arguments".to_owned(),
                reason: crate::wire::oversize_reason(args.len()),
            });
        }
        st.buf.extend_from_slice(&args.head);
        st.push(&args.body);
        for part in parts {
            match part {
                Part::Bytes(bytes) => st.push(bytes),
                Part::Deferred(_) => {
                    let bytes = encoded.next().expect("one encoding per deferred item");
                    st.push(&bytes);
                }
            }
        }
        Ok(())
    }

    /// Writes task `id`'s arguments into the worker's arena and queues a `RunShared`;
    /// `None` if there is no arena or no room in it now (the socket takes them then).
    fn send_run_shared(
        &self,
        id: u64,
        target: TargetRef,
        args: &Args,
    ) -> Option<Result<(), Error>> {
        let mut slot = self.out.arena.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*slot, ArenaSlot::NotYet) {
            *slot = match ParentArena::create(&self.control) {
                Ok((arena, announce)) => {
                    self.send(&announce);
                    ArenaSlot::Ready(arena)
                }
                Err(e) => {
                    tracing::debug!(worker = %self.name, "no arena for large arguments: {e}");
                    ArenaSlot::Unavailable
                }
            };
        }
        let ArenaSlot::Ready(arena) = &mut *slot else {
            return None;
        };
        let len = args.len();
        let start = {
            let mut live = self.out.live.lock().unwrap_or_else(|p| p.into_inner());
            let start = place(&live, arena.map.len(), len)?;
            // Reserved before it is written, so the region is this task's alone; the
            // write below holds only the arena's lock, which the dispatcher never takes.
            live.push_back((id, start, start + len));
            start
        };
        let written = match arena.map.get_mut(start, len) {
            Some(region) => write_args(region, args).map(|()| true),
            None => Ok(false),
        };
        if !matches!(written, Ok(true)) {
            self.answered(id);
            return written.err().map(Err);
        }
        drop(slot);
        self.send(&Down::RunShared(crate::wire::RunShared {
            id,
            target: target.offset,
            target_name: target.name,
            offset: start as u64,
            len: len as u64,
        }));
        Some(Ok(()))
    }

    /// Asks the worker to give back the tasks it was sent up to number `upto` that it
    /// has not started; it answers [`Event::Recalled`](crate::pool::seam::Event::Recalled) at once, even while it runs a
    /// task. False if the request could not be written (the worker is dying: its reader
    /// reports that).
    pub(crate) fn recall(&self, upto: u64) -> bool {
        use std::io::Write;
        let msg = crate::wire::recall(upto);
        // 8 bytes on an empty socket (one recall at a time): written whole or not at all.
        matches!((&*self.control).write(&msg), Ok(n) if n == msg.len())
    }

    /// Task `id` was answered: its arena region may be written again.
    pub(crate) fn answered(&self, id: u64) {
        let mut live = self.out.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = live.iter().position(|&(task, _, _)| task == id) {
            // Always the front: a worker answers in the order it was sent tasks.
            live.remove(i);
        }
    }

    /// Lets go of the buffers kept for large map items (the worker has no more tasks).
    pub(crate) fn release_buffers(&self) {
        self.out.spare.clear();
    }

    /// Writes what is queued, as far as the socket takes it now; the writer task writes
    /// the rest when it can. A worker whose socket fails is dying; its reader reports
    /// it, so a failed write needs no handling here.
    pub(crate) fn flush(&self) {
        let mut st = self.out.lock();
        if st.blocked || st.is_empty() {
            return;
        }
        if self.out.write_now(&mut st) {
            st.blocked = true;
            self.out.wake.notify_one();
        }
    }
}

/// Writes `args` whole into `region`, which is exactly as long.
fn write_args(mut region: &mut [u8], args: &Args) -> Result<(), Error> {
    use std::io::Write;
    let too_short = || Error::Encode {
        type_name: "task arguments".to_owned(),
        reason: "they no longer fit the size they were encoded to".to_owned(),
    };
    region.write_all(&args.head).map_err(|_| too_short())?;
    region.write_all(&args.body).map_err(|_| too_short())?;
    for part in args.rest.as_deref().unwrap_or_default() {
        match part {
            Part::Bytes(bytes) => region.write_all(bytes).map_err(|_| too_short())?,
            Part::Deferred(item) => item.encode_to(&mut region)?,
        }
    }
    if region.is_empty() {
        Ok(())
    } else {
        Err(too_short())
    }
}

/// Writes what [`Link::flush`] could not, as the socket drains, until the handle is
/// dropped and everything queued is written.
async fn write_task(out: Arc<Out>) {
    enum Next {
        Sleep,
        AwaitWritable,
        End,
    }
    loop {
        let next = {
            let mut st = out.lock();
            if !st.dead && (st.blocked || st.closed) && !st.is_empty() {
                st.blocked = out.write_now(&mut st);
            } else {
                st.blocked = false;
            }
            if st.dead || (st.closed && !st.blocked) {
                Next::End
            } else if st.blocked {
                Next::AwaitWritable
            } else {
                Next::Sleep
            }
        };
        match next {
            Next::End => return,
            Next::Sleep => out.wake.notified().await,
            Next::AwaitWritable => {
                if out.io.writable().await.is_err() {
                    out.lock().dead = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_goes_sealed_over_the_recall_channel() {
        use rustix::fs::{SealFlags, fcntl_get_seals, ftruncate};
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (arena, msg) = ParentArena::create(&ours).unwrap();
        assert!(
            matches!(msg, Down::Arena(crate::wire::Arena { size }) if size == ARENA_SIZE as u64)
        );
        let mut mark = [0u8; crate::wire::RECALL_LEN];
        let (n, fd) = crate::wire::fdpass::recv_with_fd(&theirs, &mut mark).unwrap();
        assert_eq!(n, mark.len());
        assert_eq!(crate::wire::recall_upto(mark), crate::wire::ARENA_MARK);
        let fd = fd.expect("the arena's file came with its message");
        let seals = fcntl_get_seals(&fd).unwrap();
        for seal in [
            SealFlags::SHRINK,
            SealFlags::GROW,
            SealFlags::FUTURE_WRITE,
            SealFlags::SEAL,
        ] {
            assert!(seals.contains(seal), "{seals:?} lacks {seal:?}");
        }
        // What a worker could do with it: shrink it (SIGBUS in the parent), grow it, or
        // map it writable. All refused.
        assert!(ftruncate(&fd, 0).is_err());
        assert!(ftruncate(&fd, 2 * ARENA_SIZE as u64).is_err());
        assert!(SharedMap::new(fd.as_fd(), ARENA_SIZE, true).is_err());
        assert!(SharedMap::new(fd.as_fd(), ARENA_SIZE, false).is_ok());
        // The parent's own mapping still writes.
        let mut arena = arena;
        arena.map.get_mut(0, 4).unwrap().copy_from_slice(b"ok!!");
    }

    #[test]
    fn the_arena_is_a_ring_freed_from_its_front() {
        let mut live = VecDeque::new();
        assert_eq!(place(&live, 100, 101), None);
        assert_eq!(place(&live, 100, 100), Some(0));
        live.push_back((1, 0, 40));
        assert_eq!(place(&live, 100, 60), Some(40));
        assert_eq!(
            place(&live, 100, 61),
            None,
            "no room at the end, none before 0"
        );
        live.push_back((2, 40, 90));
        live.pop_front(); // task 1 answered: 0..40 free again
        assert_eq!(place(&live, 100, 30), Some(0), "wraps to the start");
        live.push_back((3, 0, 30));
        assert_eq!(
            place(&live, 100, 10),
            Some(30),
            "after the wrap, up to the front"
        );
        assert_eq!(place(&live, 100, 11), None);
        live.clear();
        assert_eq!(
            place(&live, 100, 50),
            Some(0),
            "empty: from the start again"
        );
    }
}
