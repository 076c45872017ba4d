//! `pipe()`: two connected, duplex message endpoints, usable from any two processes.

use std::fmt;
use std::io::Read;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use rustix::event::{PollFd, PollFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::unix::AsyncFd;

use super::hub::{self, HubRef, lock};
use crate::error::{Error, Result};
use crate::wire;

/// The largest message (the child channel's limit).
const MAX_MESSAGE: usize = wire::DEFAULT_MAX_FRAME;
const READ_CHUNK: usize = 64 * 1024;

/// Creates a pipe: two connected [`Connection`]s (Python's `Pipe()`, duplex). What one
/// sends, the other receives, in order, with message boundaries kept.
///
/// Send either end (or both) to other processes as an argument. Each end is a unix
/// socket of its own: once a process has its end, messages go straight from process to
/// process, not through the parent.
///
/// If the sockets cannot be created (out of file descriptors), both ends are returned
/// broken: every call on them fails with [`Error::Io`].
///
/// ```
/// use procpool::{Connection, Process, pipe};
///
/// fn echo(conn: Connection<String>) {
///     // Until the parent drops its end.
///     while let Ok(msg) = conn.blocking_recv() {
///         conn.blocking_send(msg.to_uppercase()).expect("the parent is there");
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let (here, there) = pipe::<String>();
/// let mut p = Process::new(echo, (there,));
/// p.start().await?;
/// here.send("hello".to_owned()).await?;
/// assert_eq!(here.recv().await?, "HELLO");
/// drop(here);
/// p.join().await?;
/// # Ok(())
/// # }
/// ```
pub fn pipe<T>() -> (Connection<T>, Connection<T>) {
    match UnixStream::pair().and_then(|(a, b)| {
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((a, b))
    }) {
        Ok((a, b)) => (Connection::from_stream(a), Connection::from_stream(b)),
        Err(e) => {
            let reason = format!("cannot create the pipe: {e}");
            (
                Connection::broken(reason.clone()),
                Connection::broken(reason),
            )
        }
    }
}

/// One end of a [`pipe`]: sends and receives messages of type `T`.
///
/// Clones share the end (like a duplicated file descriptor). The other end sees
/// end-of-stream, and its `recv` returns [`Error::Closed`], once every clone of this end
/// is dropped in every process, including when the process holding it dies. Messages
/// sent before that are still received first.
///
/// Async methods need a tokio runtime (any flavour); `blocking_*` ones are for plain
/// synchronous code and block the thread.
///
/// Dropping the last clone closes the socket. A send that was cancelled halfway through
/// a large message leaves the rest queued here; the next send on this end, or the drop,
/// writes it if the socket takes it without waiting.
pub struct Connection<T> {
    ep: Arc<Endpoint>,
    _t: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Connection<T> {
    fn clone(&self) -> Self {
        Connection {
            ep: Arc::clone(&self.ep),
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ep.sock.get() {
            Some(Ok(s)) => f.debug_struct("Connection").field("socket", s).finish(),
            Some(Err(e)) => f.debug_struct("Connection").field("broken", e).finish(),
            None => f
                .debug_struct("Connection")
                .field("arriving", &true)
                .finish(),
        }
    }
}

struct Endpoint {
    /// The socket, once it is here (at once, except for an end decoded from another
    /// process, which is claimed in the background: see `arrival`).
    sock: OnceLock<std::result::Result<UnixStream, String>>,
    /// The claim of an end decoded from another process.
    arrival: Option<Arc<hub::Arrival>>,
    rx: Mutex<RxState>,
    tx: Mutex<TxState>,
    /// The socket's registration with the runtime that last used it asynchronously.
    reg: Mutex<Option<(tokio::runtime::Id, Arc<AsyncFd<OwnedFd>>)>>,
}

#[derive(Default)]
struct RxState {
    buf: BytesMut,
    eof: bool,
}

#[derive(Default)]
struct TxState {
    buf: BytesMut,
    /// Bytes ever queued, and ever written: a send is done once `written` passes the end
    /// of its message.
    queued: u64,
    written: u64,
}

enum Want {
    Read,
    Write,
}

impl Endpoint {
    /// The socket, waiting (blocking, bounded) for a claim still on its way.
    fn sock(&self) -> Result<&UnixStream> {
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
    fn here(&self) -> Option<&std::result::Result<UnixStream, String>> {
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
    async fn arrived(&self) {
        if self.sock.get().is_none()
            && let Some(a) = &self.arrival
        {
            a.wait().await;
        }
    }

    /// A complete message if one is buffered or can be read without waiting; `None` if
    /// reading would wait.
    fn try_recv(&self) -> Result<Option<BytesMut>> {
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
    fn queue(&self, body: &[u8]) -> Result<u64> {
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
    fn flush(&self, upto: u64) -> Result<bool> {
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
    async fn ready(&self, want: Want) -> Result<()> {
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
    fn block(&self, want: Want, deadline: Option<Instant>) -> Result<bool> {
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
    fn readable_now(&self) -> Result<bool> {
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

impl<T> Connection<T> {
    fn from_stream(sock: UnixStream) -> Self {
        Self::with(OnceLock::from(Ok(sock)), None)
    }

    fn broken(reason: String) -> Self {
        Self::with(OnceLock::from(Err(reason)), None)
    }

    /// An end claimed in the background (see `hub::claim_later`).
    fn arriving(arrival: Arc<hub::Arrival>) -> Self {
        Self::with(OnceLock::new(), Some(arrival))
    }

    fn with(
        cell: OnceLock<std::result::Result<UnixStream, String>>,
        arrival: Option<Arc<hub::Arrival>>,
    ) -> Self {
        Connection {
            ep: Arc::new(Endpoint {
                sock: cell,
                arrival,
                rx: Mutex::default(),
                tx: Mutex::default(),
                reg: Mutex::default(),
            }),
            _t: PhantomData,
        }
    }

    /// Waits at most `d` for something to receive: `true` if a message (or part of
    /// one, or the end of the stream) is there, so `recv` will not wait long (Python's
    /// `poll(timeout)`). `poll(Duration::ZERO)` checks without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket fails or there is no tokio runtime.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it receives nothing.
    pub async fn poll(&self, d: Duration) -> Result<bool> {
        let wait = async {
            self.ep.arrived().await;
            loop {
                if self.ep.readable_now()? {
                    return Ok(true);
                }
                self.ep.ready(Want::Read).await?;
            }
        };
        match tokio::time::timeout(d, wait).await {
            Ok(r) => r,
            // Still on its way: nothing to receive yet.
            Err(_) if self.ep.here().is_none() => Ok(false),
            Err(_) => self.ep.readable_now(),
        }
    }

    /// [`poll`](Self::poll) for synchronous code: blocks this thread at most `d`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket fails.
    pub fn blocking_poll(&self, d: Duration) -> Result<bool> {
        let deadline = Instant::now() + d;
        // An end still on its way counts its wait in `d`.
        if self.ep.here().is_none()
            && let Some(a) = &self.ep.arrival
        {
            a.wait_blocking(d);
            if self.ep.here().is_none() {
                return Ok(false);
            }
        }
        loop {
            if self.ep.readable_now()? {
                return Ok(true);
            }
            if !self.ep.block(Want::Read, Some(deadline))? {
                return Ok(false);
            }
        }
    }
}

impl<T: Serialize + DeserializeOwned> Connection<T> {
    /// Sends one message. Returns once it is in the socket (the other end may not have
    /// read it yet); a large message is written as the other end reads.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if `msg` cannot be encoded (nothing is sent); [`Error::Closed`]
    /// if the other end is gone; [`Error::Io`] if the socket fails or there is no tokio
    /// runtime.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe for large messages: a message is queued whole when `send` is
    /// first polled, so dropping the future never splits it, but it may be written
    /// later (by the next send or the drop of this end) or, if neither happens, be left
    /// unsent with a truncated prefix on the wire.
    pub async fn send(&self, msg: T) -> Result<()> {
        self.ep.arrived().await;
        let (body, pins) = encode_message(&msg)?;
        let upto = self.ep.queue(&body)?;
        // Queued whole: it goes, even if this future is dropped (see `until_decoded`).
        let pins = pins.until_decoded();
        let sent = async {
            while !self.ep.flush(upto)? {
                self.ep.ready(Want::Write).await?;
            }
            Ok(())
        };
        delivered(sent.await, pins)
    }

    /// Receives the next message, waiting until one arrives.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the other end is gone (dropped everywhere, or its process
    /// died) and every message it sent was received; [`Error::Decode`] if a message is
    /// not a `T` (it is consumed); [`Error::Protocol`] if the stream is cut inside a
    /// message; [`Error::Io`] if the socket fails or there is no tokio runtime.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a message is taken only when the future completes with it; bytes
    /// read so far stay buffered for the next `recv`.
    pub async fn recv(&self) -> Result<T> {
        self.ep.arrived().await;
        loop {
            if let Some(frame) = self.ep.try_recv()? {
                return wire::decode_value(&frame).map_err(Error::decode::<T>);
            }
            self.ep.ready(Want::Read).await?;
        }
    }

    /// [`send`](Self::send) for synchronous code: blocks this thread.
    ///
    /// # Errors
    ///
    /// As for `send`, without the runtime requirement.
    pub fn blocking_send(&self, msg: T) -> Result<()> {
        let (body, pins) = encode_message(&msg)?;
        let upto = self.ep.queue(&body)?;
        let pins = pins.until_decoded();
        let sent = (|| {
            while !self.ep.flush(upto)? {
                self.ep.block(Want::Write, None)?;
            }
            Ok(())
        })();
        delivered(sent, pins)
    }

    /// [`recv`](Self::recv) for synchronous code: blocks this thread.
    ///
    /// # Errors
    ///
    /// As for `recv`, without the runtime requirement.
    pub fn blocking_recv(&self) -> Result<T> {
        loop {
            if let Some(frame) = self.ep.try_recv()? {
                return wire::decode_value(&frame).map_err(Error::decode::<T>);
            }
            self.ep.block(Want::Read, None)?;
        }
    }
}

/// Encodes a message; the pins keep the handles and pipe ends in it until it is
/// decoded, or are dropped (letting go of them) if it is not sent.
fn encode_message<T: Serialize>(msg: &T) -> Result<(Vec<u8>, hub::Pins)> {
    let (body, pins) = hub::collect_sent(|| wire::encode_value(msg));
    Ok((body.map_err(Error::encode::<T>)?, pins))
}

/// What a send that got its message queued returns: handles and pipe ends in the
/// message stay until it is decoded, unless the socket failed (the other end is gone,
/// and nobody will decode it).
fn delivered(sent: Result<()>, pins: hub::UntilDecoded) -> Result<()> {
    if sent.is_err() {
        pins.refused();
    }
    sent
}

/// How an end travels: the hub holding its fd, the export's number and its key.
#[derive(Serialize, Deserialize)]
struct Wire {
    hub: HubRef,
    export: u64,
    key: u64,
}

impl<T> Serialize for Connection<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        // An end still arriving is waited for (bounded: see `hub::Arrival`).
        let sock = self
            .ep
            .sock()
            .map_err(|e| S::Error::custom(format!("cannot send a broken pipe end: {e}")))?;
        let dup = sock
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| S::Error::custom(format!("cannot duplicate the pipe end: {e}")))?;
        let hub = hub::hub().map_err(S::Error::custom)?;
        let (export, key) = hub.export(dup).map_err(S::Error::custom)?;
        hub::pin_export(export, key);
        Wire {
            hub: hub.me.clone(),
            export,
            key,
        }
        .serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for Connection<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let w = Wire::deserialize(d)?;
        // Decoding never waits: the end is fetched in the background, and its first use
        // waits for it (an async method asynchronously).
        Ok(Connection::arriving(hub::claim_later(
            &w.hub, w.export, w.key,
        )))
    }
}
