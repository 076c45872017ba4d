//! The child's end of the channel: the same codec over a blocking socket.
//!
//! The child needs no async runtime to talk to its parent, so a plain target never pays
//! for one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::Decoder;

use super::spare::Spare;
use super::{FrameCodec, WireError, codec, frame_into, from_frame};

/// A byte source that can also be read without waiting.
pub(crate) trait Source: Read {
    /// Reads what is already there; `ErrorKind::WouldBlock` if nothing is.
    fn read_now(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl Source for UnixStream {
    fn read_now(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(rustix::net::recv(&*self, buf, rustix::net::RecvFlags::DONTWAIT)?.0)
    }
}

/// What [`BlockingChannel::next_frame`] found.
#[derive(Debug)]
pub(crate) enum Next<M> {
    /// A whole message.
    Msg(M),
    /// Nothing yet (perhaps part of a message).
    Nothing,
    /// The peer closed its end.
    End,
}

/// A blocking, framed channel over a Unix socket.
#[derive(Debug)]
pub(crate) struct BlockingChannel<S = UnixStream> {
    io: S,
    buf: BytesMut,
    codec: FrameCodec,
    max_frame: usize,
    /// The large frame being read, if any (see `next_frame`).
    large: Option<Large>,
    /// Buffers of large frames that were dropped, for the next ones.
    spare: Arc<Spare>,
}

/// A large frame being read into a buffer of its own.
#[derive(Debug)]
struct Large {
    /// At least `len` bytes, all initialized.
    buf: Vec<u8>,
    /// Bytes of the frame read so far.
    filled: usize,
    len: usize,
}

impl<S: Source> BlockingChannel<S> {
    pub(crate) fn new(io: S, max_frame: usize) -> Self {
        BlockingChannel {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            codec: codec(max_frame),
            max_frame,
            large: None,
            spare: Arc::default(),
        }
    }

    /// Reads the next message; `Ok(None)` at a clean end of stream.
    pub(crate) fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, WireError> {
        match self.next_frame(true)? {
            Next::Msg(frame) => from_frame(&frame).map(Some),
            // A blocking read returns something or the end.
            Next::End | Next::Nothing => Ok(None),
        }
    }

    /// The next frame, undecoded (so that a message can borrow from it); waits for one
    /// if `wait`, else returns what has fully arrived.
    pub(crate) fn next_frame(&mut self, wait: bool) -> Result<Next<Bytes>, WireError> {
        loop {
            if let Some(done) = self.large.take_if(|l| l.filled == l.len) {
                return Ok(Next::Msg(self.spare.share(done.buf, done.len)));
            }
            if let Some(large) = &mut self.large {
                let room = &mut large.buf[large.filled..large.len];
                let res = if wait {
                    self.io.read(room)
                } else {
                    self.io.read_now(room)
                };
                match res {
                    Ok(0) => return Err(WireError::Truncated),
                    Ok(n) => large.filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Ok(Next::Nothing);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(WireError::Io(e)),
                }
                continue;
            }
            let frame = self
                .codec
                .decode(&mut self.buf)
                .map_err(|e| WireError::from_codec(e, self.max_frame))?;
            if let Some(frame) = frame {
                return Ok(Next::Msg(frame.freeze()));
            }
            let missing = self.codec.missing(self.buf.len());
            if missing >= LARGE_REST {
                // The rest of a large frame is read straight into a buffer of its own,
                // reused once its frame is dropped: fresh memory is slow to touch.
                let len = self.buf.len() + missing;
                let mut buf = match self.spare.take(len) {
                    Some(mut buf) => {
                        buf.resize(buf.capacity(), 0);
                        buf
                    }
                    // Zeroed by the allocator, which fresh memory already is.
                    None => vec![0; len],
                };
                buf[..self.buf.len()].copy_from_slice(&self.buf);
                self.large = Some(Large {
                    buf,
                    filled: self.buf.len(),
                    len,
                });
                self.buf.clear();
                // The frame's header is read; the next frame starts afresh.
                self.codec = codec(self.max_frame);
                continue;
            }
            // (The codec reserves room for a frame as its bytes arrive.)
            self.buf.reserve(8 * 1024);
            let n = match read_buf(&mut self.io, &mut self.buf, wait) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Next::Nothing),
                Err(e) => return Err(WireError::Io(e)),
            };
            if n == 0 {
                return match self.codec.decode_eof(&mut self.buf) {
                    Ok(Some(frame)) => Ok(Next::Msg(frame.freeze())),
                    Ok(None) => Ok(Next::End),
                    Err(e) => Err(WireError::from_codec(e, self.max_frame)),
                };
            }
        }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.io
    }
}

/// Encodes frames into a buffer and writes them in one go: the child's side of batching.
#[derive(Debug)]
pub(crate) struct BlockingWriter<S = UnixStream> {
    io: S,
    buf: BytesMut,
    max_frame: usize,
}

impl<S: Write> BlockingWriter<S> {
    pub(crate) fn new(io: S, max_frame: usize) -> Self {
        BlockingWriter {
            io,
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// Queues one message, encoded straight into the buffer; nothing is written until
    /// [`flush`](Self::flush). A message larger than a frame may be is an error, and
    /// nothing of it stays queued.
    pub(crate) fn feed<M: Serialize>(&mut self, msg: &M) -> std::io::Result<()> {
        let start = self.buf.len();
        let fits = frame_into(&mut self.buf, msg);
        let len = self.buf.len().saturating_sub(start + 4);
        if !fits || len > self.max_frame {
            self.buf.truncate(start);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a message is more than a frame holds ({} bytes)",
                    self.max_frame
                ),
            ));
        }
        Ok(())
    }

    /// Writes everything queued.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.io.write_all(&self.buf)?;
        self.buf.clear();
        self.io.flush()
    }
}

/// A frame with at least this much left to read is read in one go (see `next_frame`).
const LARGE_REST: usize = 64 * 1024;

/// The most one read takes: the spare capacity is zeroed before reading, so this bounds
/// that cost (the rest of a large frame is read by another path, into a buffer kept for
/// reuse).
const READ_WINDOW: usize = 64 * 1024;

/// Reads once into the spare capacity of `buf`, waiting for data if `wait`.
fn read_buf<S: Source>(io: &mut S, buf: &mut BytesMut, wait: bool) -> std::io::Result<usize> {
    let start = buf.len();
    buf.resize(buf.capacity().min(start + READ_WINDOW), 0);
    let res = loop {
        let res = if wait {
            io.read(&mut buf[start..])
        } else {
            io.read_now(&mut buf[start..])
        };
        match res {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    buf.truncate(start + *res.as_ref().unwrap_or(&0));
    res
}

/// A child's one way out: results and log events are written under one lock, each whole,
/// before `send` returns (so nothing is lost if the process ends right after).
#[derive(Debug, Clone)]
pub(crate) struct Outbox(Arc<Mutex<BlockingWriter<UnixStream>>>);

impl Outbox {
    pub(crate) fn new(stream: UnixStream, max_frame: usize) -> Self {
        Outbox(Arc::new(Mutex::new(BlockingWriter::new(stream, max_frame))))
    }

    /// Writes one message.
    pub(crate) fn send<M: Serialize>(&self, msg: &M) -> std::io::Result<()> {
        self.send_all(std::slice::from_ref(msg))
    }

    /// Writes several messages with as few writes as possible.
    pub(crate) fn send_all<M: Serialize>(&self, msgs: &[M]) -> std::io::Result<()> {
        // A panic while holding the lock leaves at worst a partial buffer, which `flush`
        // would send as garbage; the parent then kills this child. Keep going.
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for m in msgs {
            w.feed(m)?;
        }
        w.flush()
    }
}
