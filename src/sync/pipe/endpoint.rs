//! What is under a pipe end: its socket (once it is here), the buffers of what it
//! receives and sends, messages framed in and out of them, and the waits on the socket
//! (async, on the runtime it is registered with, or blocking the thread).

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use rustix::event::{PollFd, PollFlags};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::sync::hub::{self, lock};
use crate::wire;

/// The largest message (the child channel's limit).
const MAX_MESSAGE: usize = wire::DEFAULT_MAX_FRAME;
const READ_CHUNK: usize = 64 * 1024;

pub(super) struct Endpoint {
    /// The socket, once it is here (at once, except for an end decoded from another
    /// process, which is claimed in the background: see `arrival`).
    pub(super) sock: OnceLock<std::result::Result<UnixStream, String>>,
    /// The claim of an end decoded from another process.
    pub(super) arrival: Option<Arc<hub::Arrival>>,
    pub(super) rx: Mutex<RxState>,
    pub(super) tx: Mutex<TxState>,
    /// The socket's registration with the runtime that last used it asynchronously.
    pub(super) reg: Mutex<Option<(tokio::runtime::Id, Arc<AsyncFd<OwnedFd>>)>>,
}

#[derive(Default)]
pub(super) struct RxState {
    buf: BytesMut,
    eof: bool,
}

#[derive(Default)]
pub(super) struct TxState {
    buf: BytesMut,
    /// Bytes ever queued, and ever written: a send is done once `written` passes the end
    /// of its message.
    queued: u64,
    written: u64,
}

pub(super) enum Want {
    Read,
    Write,
}

impl Endpoint {
    /// The socket, waiting (blocking, bounded) for a claim still on its way.
    pub(super) fn sock(&self) -> Result<&UnixStream> {
        if self.sock.get().is_none()
            && let Some(a) = &self.arrival
        {
            a.wait_blocking(2 * hub::CLAIM_TIMEOUT);
        }
        match self.here() {
            Some(Ok(sock)) => Ok(sock),
            Some(Err(e)) => Err(Error::Io(std::io::Error::other(e.clone()))),
            None => Err(Error::Io(std::io::Error::other(
                "the pipe end did not arrive from the process that sent it",
            ))),
        }
    }

    /// The socket if it is here (taking it from a finished claim).
    pub(super) fn here(&self) -> Option<&std::result::Result<UnixStream, String>> {
        if let Some(s) = self.sock.get() {
            return Some(s);
        }
        if let Some(a) = &self.arrival {
            // Under the arrival's lock: one caller takes the outcome and sets `sock`.
            a.with(|got| {
                if self.sock.get().is_none()
                    && let Some(got) = got.take()
                {
                    let sock = got.and_then(|fd| {
                        let sock = UnixStream::from(fd);
                        sock.set_nonblocking(true)
                            .map(|()| sock)
                            .map_err(|e| format!("pipe end: {e}"))
                    });
                    if self.sock.set(sock).is_err() {
                        unreachable!("set under the arrival's lock, once");
                    }
                }
            });
        }
        self.sock.get()
    }

    /// Waits (asynchronously) for a claim still on its way.
    pub(super) async fn arrived(&self) {
        if self.sock.get().is_none()
            && let Some(a) = &self.arrival
        {
            a.wait().await;
        }
    }

    /// A complete message if one is buffered or can be read without waiting; `None` if
    /// reading would wait.
    pub(super) fn try_recv(&self) -> Result<Option<BytesMut>> {
        let sock = self.sock()?;
        let mut rx = lock(&self.rx);
        loop {
            let len = match take_message(&mut rx.buf)? {
                Taken::Message(m) => return Ok(Some(m)),
                Taken::Partial(len) => len,
            };
            if rx.eof {
                return if rx.buf.is_empty() {
                    Err(Error::Closed)
                } else {
                    Err(Error::Protocol {
                        name: "pipe".to_owned(),
                        reason: "the other end closed in the middle of a message".to_owned(),
                    })
                };
            }
            // Room for the message in progress as its bytes arrive (the length is the
            // peer's word: it is not reserved on the header alone); read a window.
            let need = len.map_or(0, |len| 4 + len - rx.buf.len());
            let grow = need.min(rx.buf.len().max(crate::wire::GROW_FROM));
            rx.buf.reserve(grow);
            if let Filled::WouldBlock = fill(sock, &mut rx)? {
                return Ok(None);
            }
        }
    }

    /// Queues a message; returns the position its send completes at.
    pub(super) fn queue(&self, body: &[u8]) -> Result<u64> {
        if body.len() > MAX_MESSAGE {
            return Err(Error::Encode {
                type_name: "pipe message".to_owned(),
                reason: format!(
                    "{} bytes is over the {MAX_MESSAGE}-byte message limit",
                    body.len()
                ),
            });
        }
        let Some(header) = crate::wire::frame_header(body.len()) else {
            unreachable!("checked against MAX_MESSAGE above");
        };
        let mut tx = lock(&self.tx);
        tx.buf.extend_from_slice(&header);
        tx.buf.extend_from_slice(body);
        tx.queued += 4 + body.len() as u64;
        Ok(tx.queued)
    }

    /// Writes what the socket takes now; true once everything up to `upto` is written.
    pub(super) fn flush(&self, upto: u64) -> Result<bool> {
        let sock = self.sock()?;
        let mut tx = lock(&self.tx);
        while tx.written < upto && !tx.buf.is_empty() {
            match rustix::net::send(sock, &tx.buf, rustix::net::SendFlags::NOSIGNAL) {
                Ok(n) => {
                    tx.buf.advance(n);
                    tx.written += n as u64;
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                    return Err(Error::Closed);
                }
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
        Ok(tx.written >= upto)
    }

    /// This socket registered with the current runtime.
    fn registered(&self) -> Result<Arc<AsyncFd<OwnedFd>>> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| {
            Error::Io(std::io::Error::other(format!(
                "{e}; use the blocking_ methods"
            )))
        })?;
        let mut reg = lock(&self.reg);
        if let Some((id, fd)) = &*reg
            && *id == rt.id()
        {
            return Ok(Arc::clone(fd));
        }
        let dup = self
            .sock()?
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::Io)?;
        let fd = Arc::new(
            crate::target::register_fd(
                dup,
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )
            .map_err(Error::Io)?,
        );
        *reg = Some((rt.id(), Arc::clone(&fd)));
        Ok(fd)
    }

    /// Waits until the socket may be readable or writable.
    pub(super) async fn ready(&self, want: Want) -> Result<()> {
        let fd = self.registered()?;
        let guard = match want {
            Want::Read => fd.readable().await,
            Want::Write => fd.writable().await,
        };
        match guard {
            Ok(mut g) => {
                // The caller retries the syscall; a stale readiness only costs a retry.
                g.clear_ready();
                Ok(())
            }
            Err(e) => {
                // The runtime it was registered with is gone: register again next time.
                *lock(&self.reg) = None;
                Err(Error::Io(e))
            }
        }
    }

    /// Blocks until the socket may be readable or writable, or `deadline` passes.
    pub(super) fn block(&self, want: Want, deadline: Option<Instant>) -> Result<bool> {
        let sock = self.sock()?;
        let flags = match want {
            Want::Read => PollFlags::IN,
            Want::Write => PollFlags::OUT,
        };
        loop {
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    Some(rustix::time::Timespec {
                        tv_sec: left.as_secs() as i64,
                        tv_nsec: i64::from(left.subsec_nanos()),
                    })
                }
                None => None,
            };
            let mut fds = [PollFd::new(sock, flags)];
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(0) => {}
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
    }

    /// Whether bytes or end-of-stream are there to read, without waiting.
    pub(super) fn readable_now(&self) -> Result<bool> {
        {
            let rx = lock(&self.rx);
            if !rx.buf.is_empty() || rx.eof {
                return Ok(true);
            }
        }
        match self.try_recv_peek() {
            Ok(b) => Ok(b),
            Err(Error::Closed) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Reads what is there into the buffer without taking a message.
    fn try_recv_peek(&self) -> Result<bool> {
        let sock = self.sock()?;
        Ok(matches!(fill(sock, &mut lock(&self.rx))?, Filled::Some))
    }
}

enum Filled {
    /// Bytes were read, or the end of the stream was reached.
    Some,
    WouldBlock,
}

/// What the front of a pipe end's buffer holds.
pub(crate) enum Taken {
    /// A whole message, taken out of the buffer.
    Message(BytesMut),
    /// Not a whole message yet: its length, if the header has arrived.
    Partial(Option<usize>),
}

/// Takes the message at the front of `buf` (a 4-byte big-endian length, then the
/// message) if it has fully arrived. A length over [`MAX_MESSAGE`] is
/// [`Error::Protocol`]: the bytes come from another process.
pub(crate) fn take_message(buf: &mut BytesMut) -> Result<Taken> {
    let Some(h) = buf.get(..4) else {
        return Ok(Taken::Partial(None));
    };
    let len = usize::try_from(u32::from_be_bytes([h[0], h[1], h[2], h[3]])).unwrap_or(usize::MAX);
    if len > MAX_MESSAGE {
        return Err(Error::Protocol {
            name: "pipe".to_owned(),
            reason: format!("a message of {len} bytes is over the {MAX_MESSAGE}-byte limit"),
        });
    }
    if buf.len() - 4 >= len {
        buf.advance(4);
        return Ok(Taken::Message(buf.split_to(len)));
    }
    Ok(Taken::Partial(Some(len)))
}

/// Reads once into `rx` (retrying on EINTR). The buffer is zeroed before the read, so
/// one read takes at most `READ_CHUNK` bytes beyond what is reserved, and zeroes at most
/// 1 MiB: a large message is not zeroed again on every read.
fn fill(sock: &UnixStream, rx: &mut RxState) -> Result<Filled> {
    let have = rx.buf.len();
    let window = rx
        .buf
        .capacity()
        .saturating_sub(have)
        .clamp(READ_CHUNK, 1 << 20);
    rx.buf.resize(have + window, 0);
    loop {
        let got = (&*sock).read(&mut rx.buf[have..]);
        let (n, filled) = match got {
            Ok(0) => {
                rx.eof = true;
                (0, Ok(Filled::Some))
            }
            Ok(n) => (n, Ok(Filled::Some)),
            Err(e) => match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => (0, Ok(Filled::WouldBlock)),
                std::io::ErrorKind::ConnectionReset => {
                    rx.eof = true;
                    (0, Ok(Filled::Some))
                }
                _ => (0, Err(Error::Io(e))),
            },
        };
        rx.buf.truncate(have + n);
        return filled;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Best effort for a cancelled send's remainder; never wait in drop.
        if let Some(Ok(sock)) = self.sock.get() {
            let tx = self.tx.get_mut().unwrap_or_else(|p| p.into_inner());
            while !tx.buf.is_empty() {
                match rustix::net::send(sock, &tx.buf, rustix::net::SendFlags::NOSIGNAL) {
                    Ok(n) => tx.buf.advance(n),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
