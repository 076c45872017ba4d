//! `pipe_oneway()`: a pipe whose ends say which way messages go (Python's
//! `Pipe(duplex=False)`), over the same ends as [`pipe`](super::pipe).

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Connection, pipe};
use crate::error::Result;

/// Creates a one-way pipe: `(receiver, sender)`, as Python's `Pipe(duplex=False)`
/// returns the reading end first. What the [`Sender`] sends, the [`Receiver`] receives,
/// in order, with message boundaries kept; the types say which end does what.
///
/// Each end is a [`Connection`] underneath, and behaves as one: send either end (or
/// both) to other processes as an argument, to a [`Process`](crate::Process) or to
/// pool tasks; clones share the end; once every clone of the sender is gone (dropped,
/// or its process died), the receiver gets what was sent, then
/// [`Error::Closed`](crate::Error::Closed), and once every clone of the receiver is
/// gone, a send fails with [`Error::Closed`](crate::Error::Closed).
///
/// If the sockets cannot be created (out of file descriptors), both ends are returned
/// broken: every call on them fails with [`Error::Io`](crate::Error::Io).
///
/// ```
/// use procpool::{Process, Sender, pipe_oneway};
///
/// fn count(to: Sender<u32>) {
///     for i in 0..3 {
///         to.blocking_send(i).expect("the parent is there");
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let (rx, tx) = pipe_oneway::<u32>();
/// let mut p = Process::new(count, (tx,));
/// p.start().await?;
/// for i in 0..3 {
///     assert_eq!(rx.recv().await?, i);
/// }
/// p.join().await?;
/// // The child's end went with it.
/// assert!(matches!(rx.recv().await, Err(procpool::Error::Closed)));
/// # Ok(())
/// # }
/// ```
pub fn pipe_oneway<T>() -> (Receiver<T>, Sender<T>) {
    let (r, s) = pipe();
    (Receiver { conn: r }, Sender { conn: s })
}

/// The receiving end of a [`pipe_oneway`].
///
/// Async methods need a tokio runtime (any flavour); `blocking_*` ones are for plain
/// synchronous code and block the thread.
///
/// # Drop
///
/// Dropping the last clone (in every process) closes the end: the sender's next send
/// fails with [`Error::Closed`](crate::Error::Closed).
pub struct Receiver<T> {
    conn: Connection<T>,
}

/// The sending end of a [`pipe_oneway`].
///
/// Async methods need a tokio runtime (any flavour); `blocking_*` ones are for plain
/// synchronous code and block the thread.
///
/// # Drop
///
/// Dropping the last clone (in every process) closes the end: the receiver gets the
/// messages sent before, then [`Error::Closed`](crate::Error::Closed). A send cancelled
/// halfway through a large message leaves the rest queued here, written by the next
/// send or by the drop if the socket takes it without waiting.
pub struct Sender<T> {
    conn: Connection<T>,
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        Receiver {
            conn: self.conn.clone(),
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            conn: self.conn.clone(),
        }
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Receiver").field(&self.conn).finish()
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Sender").field(&self.conn).finish()
    }
}

impl<T> Receiver<T> {
    /// Waits at most `d` for something to receive: `true` if a message (or part of one,
    /// or the end of the stream) is there, so `recv` will not wait long (Python's
    /// `poll(timeout)`). `poll(Duration::ZERO)` checks without waiting.
    ///
    /// # Errors
    ///
    /// As [`Connection::poll`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it receives nothing.
    pub async fn poll(&self, d: Duration) -> Result<bool> {
        self.conn.poll(d).await
    }

    /// [`poll`](Self::poll) for synchronous code: blocks this thread at most `d`.
    ///
    /// # Errors
    ///
    /// As [`Connection::blocking_poll`].
    pub fn blocking_poll(&self, d: Duration) -> Result<bool> {
        self.conn.blocking_poll(d)
    }
}

impl<T: Serialize + DeserializeOwned> Receiver<T> {
    /// Receives the next message, waiting until one arrives.
    ///
    /// # Errors
    ///
    /// As [`Connection::recv`]: [`Error::Closed`](crate::Error::Closed) once every
    /// sender is gone and everything it sent was received.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a message is taken only when the future completes with it; bytes
    /// read so far stay buffered for the next `recv`.
    pub async fn recv(&self) -> Result<T> {
        self.conn.recv().await
    }

    /// [`recv`](Self::recv) for synchronous code: blocks this thread.
    ///
    /// # Errors
    ///
    /// As for `recv`, without the runtime requirement.
    pub fn blocking_recv(&self) -> Result<T> {
        self.conn.blocking_recv()
    }
}

impl<T: Serialize + DeserializeOwned> Sender<T> {
    /// Sends one message. Returns once it is in the socket (the receiver may not have
    /// read it yet); a large message is written as the receiver reads.
    ///
    /// # Errors
    ///
    /// As [`Connection::send`]: [`Error::Encode`](crate::Error::Encode) (nothing sent),
    /// [`Error::Closed`](crate::Error::Closed) once every receiver is gone.
    ///
    /// # Cancel safety
    ///
    /// As [`Connection::send`]: not cancel safe for large messages (a message is queued
    /// whole when first polled, so it is never split, but a dropped send may leave it
    /// to be written later, or unsent with a truncated prefix on the wire).
    pub async fn send(&self, msg: T) -> Result<()> {
        self.conn.send(msg).await
    }

    /// [`send`](Self::send) for synchronous code: blocks this thread.
    ///
    /// # Errors
    ///
    /// As for `send`, without the runtime requirement.
    pub fn blocking_send(&self, msg: T) -> Result<()> {
        self.conn.blocking_send(msg)
    }
}

impl<T> Serialize for Receiver<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.conn.serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for Receiver<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Receiver {
            conn: Connection::deserialize(d)?,
        })
    }
}

impl<T> Serialize for Sender<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.conn.serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for Sender<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Sender {
            conn: Connection::deserialize(d)?,
        })
    }
}
