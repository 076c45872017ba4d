//! `pipe()`: two connected, duplex message endpoints, usable from any two processes.
//!
//! Here: `pipe()` and the handle, [`Connection`], with its calls and how an end travels to
//! another process; `oneway.rs` holds `pipe_oneway()`, whose two ends are `Connection`s
//! that can each go one way only. What is under a handle (the socket, its buffers, messages framed in
//! and out of them, the waits on it, the end still arriving) is `endpoint.rs`'s.

mod endpoint;
mod oneway;

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::hub::{self, HubRef};
use crate::error::{Error, Result};
use crate::runtime::timer::{self, Sleep};
use crate::wire;

use endpoint::{Endpoint, Want};
pub(crate) use endpoint::{Taken, take_message};
pub use oneway::{Receiver, Sender, pipe_oneway};

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
        // A timer that does not panic outside a runtime: the wait says `Error::Io` then.
        match timer::timeout(Sleep::new(d), wait).await {
            Some(r) => r,
            // Still on its way: nothing to receive yet.
            None if self.ep.here().is_none() => Ok(false),
            None => self.ep.readable_now(),
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
        let (hub, export, key) =
            hub::export_for_handle(sock.as_fd(), "the pipe end").map_err(S::Error::custom)?;
        Wire { hub, export, key }.serialize(s)
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
