//! The wire between a parent and one child: length-prefixed frames, MessagePack bodies.
//!
//! Every child has its own `socketpair(2)`; the child's stdin, stdout and stderr are left
//! alone. A frame is a 4-byte big-endian length followed by that many bytes of
//! MessagePack ([`tokio_util::codec::LengthDelimitedCodec`]). A frame longer than
//! [`DEFAULT_MAX_FRAME`] is a protocol error; the parent kills a child that sends one.
//!
//! The conversation:
//!
//! ```text
//! parent                                   child (before main)
//!   Hello {version, fingerprint, name} ──▶  checks version and build fingerprint
//!   Run {target offset, args}          ──▶
//!                                      ◀──  Ready {pid}   or   Refused {reason}
//!                                      ◀──  Done {outcome}
//! ```
//!
//! The parent sends `Hello` and `Run` without waiting, so a start costs one round trip.

mod blocking;
pub(crate) mod chunk;
pub(crate) mod fdpass;
mod nil;
pub(crate) mod scalar;
pub(crate) mod spare;

pub(crate) use blocking::{BlockingChannel, Next, Outbox};
pub(crate) use nil::SomeCheck;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite, LengthDelimitedCodec};

/// Version of this protocol; both sides must agree.
pub(crate) const PROTOCOL_VERSION: u32 = 3;

/// Length of a recall on a pool worker's recall channel: the number (in the order the
/// worker received them) of the last task the parent sent, little-endian. The worker
/// gives back every task up to it that it has not started and answers
/// [`Up::Recalled`].
pub(crate) const RECALL_LEN: usize = 8;

/// The recall-channel message that carries a worker's arena file (no task has this
/// number).
pub(crate) const ARENA_MARK: u64 = u64::MAX;

/// A recall of the tasks up to number `upto` (see [`RECALL_LEN`]).
pub(crate) fn recall(upto: u64) -> [u8; RECALL_LEN] {
    upto.to_le_bytes()
}

/// The `upto` of a recall.
pub(crate) fn recall_upto(msg: [u8; RECALL_LEN]) -> u64 {
    u64::from_le_bytes(msg)
}

/// The largest frame either side accepts: 1 GiB. A length prefix above it is treated as
/// garbage rather than an allocation request.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;

/// The most encoded arguments one task (or a process's target, or an initializer) may
/// have, and the most encoded bytes of a result: a frame, less room for the rest of the
/// message (ids and the target's name).
pub(crate) const MAX_ARGS: usize = DEFAULT_MAX_FRAME - 64 * 1024;

/// [`Error::Encode`](crate::Error::Encode) for `len` bytes of arguments of type `T` if
/// they cannot fit one message: refused before anything is sent or spawned.
pub(crate) fn check_args_len<T: ?Sized>(len: usize) -> crate::Result<()> {
    if len <= MAX_ARGS {
        return Ok(());
    }
    Err(crate::Error::Encode {
        type_name: std::any::type_name::<T>().to_owned(),
        reason: oversize_reason(len),
    })
}

/// The reason of an [`Outcome::Encode`] for a result of `len` bytes over [`MAX_ARGS`].
pub(crate) fn oversize_reason(len: usize) -> String {
    format!("{len} bytes encoded; one message holds at most {MAX_ARGS} bytes")
}

/// What a child is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Role {
    /// Run one target, send its outcome, exit.
    Process,
    /// Serve tasks for a pool, in order, until `Shutdown` or the end of the channel.
    Worker,
}

/// First frame from the parent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) version: u32,
    pub(crate) fingerprint: u64,
    pub(crate) name: String,
    /// Python's `_identity`: `[3]` for `Process-3`, `[3, 1]` for `Process-3:1`.
    pub(crate) identity: Vec<u32>,
    pub(crate) role: Role,
    /// A pool's initializer: runs once before `Ready`.
    pub(crate) init: Option<Run>,
    /// The most verbose level the parent's subscriber wants (0 = off, 1 = ERROR ..
    /// 5 = TRACE): events above it are disabled in the child and cost nothing.
    pub(crate) log_level: u8,
    /// The parent's subscriber is `log_to_stderr`'s: print events here in its format.
    pub(crate) log_print: bool,
}

/// Run one target.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Run {
    pub(crate) id: u64,
    /// Offset of the target's entry point from the executable's load base.
    pub(crate) target: u64,
    pub(crate) target_name: String,
    pub(crate) args: ByteBuf,
}

/// [`Down`] as a worker decodes it: a task's arguments are borrowed from the frame.
#[derive(Debug, Deserialize)]
pub(crate) enum DownIn<'a> {
    Hello(serde::de::IgnoredAny),
    #[serde(borrow)]
    Run(RunIn<'a>),
    Skip {
        id: u64,
    },
    Shutdown,
    Arena(Arena),
    #[serde(borrow)]
    RunShared(RunShared<'a>),
}

/// A worker's arena for large arguments: a memory file of `size` bytes the parent maps
/// too. The file itself went first, on the worker's recall channel (a message of
/// [`ARENA_MARK`] with the descriptor attached), sealed so that only the parent's
/// mapping writes it and nobody can shrink it under the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Arena {
    pub(crate) size: u64,
}

/// [`Run`] whose arguments are bytes `offset..offset + len` of the worker's arena. The
/// parent writes them before it sends this and not again until the task is answered.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RunShared<'a> {
    pub(crate) id: u64,
    pub(crate) target: u64,
    pub(crate) target_name: &'a str,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// [`Run`] with borrowed arguments (see [`DownIn`]).
#[derive(Debug, Deserialize)]
pub(crate) struct RunIn<'a> {
    pub(crate) id: u64,
    pub(crate) target: u64,
    pub(crate) target_name: &'a str,
    pub(crate) args: &'a [u8],
}

/// Parent to child.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Down {
    Hello(Hello),
    Run(Run),
    /// Do not run task `id` if it has not started (its caller gave up).
    Skip {
        id: u64,
    },
    /// Finish the tasks already sent, then exit.
    Shutdown,
    /// The worker's arena (see [`Arena`]), before the first [`RunShared`].
    Arena(Arena),
    /// Read by workers as [`DownIn`] only.
    #[serde(skip_deserializing)]
    RunShared(RunShared<'static>),
}

/// Child to parent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Up {
    Ready {
        version: u32,
        pid: u32,
    },
    Refused {
        reason: String,
    },
    /// The pool's initializer failed; the child exits.
    InitFailed {
        outcome: Outcome,
    },
    Done {
        id: u64,
        outcome: Outcome,
    },
    /// A `tracing` event emitted in the child.
    Log(LogRecord),
    /// The answer to a recall of the tasks up to number `upto`: tasks `after + 1 ..=
    /// upto` are given back and will not run (nor be answered); the ones up to `after`
    /// run (or ran) here.
    Recalled {
        after: u64,
        upto: u64,
    },
}

/// A child's `tracing` event as it crosses.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LogRecord {
    /// 1 = ERROR .. 5 = TRACE.
    pub(crate) level: u8,
    pub(crate) target: String,
    pub(crate) message: String,
    /// The event's other fields, `key=value` separated by spaces.
    pub(crate) fields: String,
}

/// What running a target produced.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// The encoded return value.
    Value(ByteBuf),
    Panicked {
        message: String,
        location: Option<String>,
    },
    Encode {
        type_name: String,
        reason: String,
    },
    Decode {
        type_name: String,
        reason: String,
    },
    /// The child refused the target (not a function of this executable).
    BadTarget {
        reason: String,
    },
    /// The task was skipped on request (`Down::Skip`).
    Skipped,
}

impl Outcome {
    /// What the caller gets: the decoded value or the matching error. Does not consume
    /// the outcome, so a result can be read again (`Process::join` twice).
    pub(crate) fn to_result<R: DeserializeOwned>(&self, name: &str) -> crate::Result<R> {
        use crate::Error;
        match self {
            Outcome::Value(bytes) => decode_value::<R>(bytes).map_err(Error::decode::<R>),
            Outcome::Panicked { message, location } => Err(Error::Panicked {
                message: message.clone(),
                location: location.clone(),
                name: name.to_owned(),
            }),
            Outcome::Encode { type_name, reason } => Err(Error::Encode {
                type_name: type_name.clone(),
                reason: reason.clone(),
            }),
            Outcome::Decode { type_name, reason } => Err(Error::Decode {
                type_name: type_name.clone(),
                reason: reason.clone(),
            }),
            Outcome::BadTarget { reason } => Err(Error::UnsupportedTarget {
                name: name.to_owned(),
                reason: reason.clone(),
            }),
            Outcome::Skipped => Err(Error::Cancelled),
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("frame of more than {max} bytes")]
    Oversize { max: usize },
    #[error("undecodable message: {0}")]
    Garbage(String),
    #[error("I/O error on the channel: {0}")]
    Io(std::io::Error),
}

impl WireError {
    pub(crate) fn from_codec(e: std::io::Error, max: usize) -> Self {
        let oversize = e.get_ref().is_some_and(|inner| {
            inner.is::<FrameTooLarge>()
                || inner.is::<tokio_util::codec::LengthDelimitedCodecError>()
        });
        if oversize {
            WireError::Oversize { max }
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Truncated
        } else {
            WireError::Io(e)
        }
    }
}

/// The codec both sides use: frames of a 4-byte big-endian length, then the message.
///
/// Decoding is its own, not [`LengthDelimitedCodec`]'s, for two reasons:
///
/// - A frame's header announces a length that comes from another process. Room for it
///   is reserved only as its bytes arrive, doubling from [`GROW_FROM`] up to it: a peer
///   that sends a header announcing 1 GiB and nothing else makes the reader hold 64 KiB,
///   not reserve 1 GiB (`LengthDelimitedCodec` reserves the whole length on the header
///   alone). So the memory of a reader is at most about twice the bytes that arrived.
/// - A stream that ends after a header, or inside a frame, is truncation, never a clean
///   end of stream.
///
/// Encoding is [`LengthDelimitedCodec`]'s (it refuses frames over the limit).
#[derive(Debug)]
pub(crate) struct FrameCodec {
    inner: LengthDelimitedCodec,
    max_frame: usize,
    /// The length of the frame whose header was read and whose body is awaited.
    in_frame: Option<usize>,
}

/// A frame's body gets room for at least this much at first (or all of it if smaller).
pub(crate) const GROW_FROM: usize = 64 * 1024;

/// A frame's header announced more than the limit.
#[derive(Debug, thiserror::Error)]
#[error("a frame of {len} bytes is over the {max}-byte limit")]
pub(crate) struct FrameTooLarge {
    len: usize,
    max: usize,
}

impl FrameCodec {
    /// Bytes of the current frame not yet in the `buffered` bytes after its header.
    pub(crate) fn missing(&self, buffered: usize) -> usize {
        self.in_frame.map_or(0, |len| len.saturating_sub(buffered))
    }

    /// A new limit for frames from here on (a hub connection's `Hello` has a small one).
    pub(crate) fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max;
        self.inner.set_max_frame_length(max);
    }
}

pub(crate) fn codec(max_frame: usize) -> FrameCodec {
    FrameCodec {
        inner: LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(max_frame)
            .new_codec(),
        max_frame,
        in_frame: None,
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<BytesMut>> {
        let len = match self.in_frame {
            Some(len) => len,
            None => {
                let Some(head) = src.get(..4) else {
                    return Ok(None);
                };
                let announced = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let len = usize::try_from(announced).unwrap_or(usize::MAX);
                if len > self.max_frame {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        FrameTooLarge {
                            len,
                            max: self.max_frame,
                        },
                    ));
                }
                src.advance(4);
                self.in_frame = Some(len);
                len
            }
        };
        if src.len() >= len {
            self.in_frame = None;
            return Ok(Some(src.split_to(len)));
        }
        // Room for what is missing, but never more than what has arrived (or GROW_FROM):
        // the buffer grows with the bytes, not with the header's word.
        let missing = len - src.len();
        src.reserve(missing.min(src.len().max(GROW_FROM)));
        Ok(None)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> std::io::Result<Option<BytesMut>> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && self.in_frame.is_none() => Ok(None),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stream ended inside a frame",
            )),
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> std::io::Result<()> {
        self.inner.encode(item, dst)
    }
}

/// Encodes one protocol message.
pub(crate) fn to_frame<M: Serialize>(msg: &M) -> Bytes {
    // Our own messages contain only strings, integers and byte buffers: encoding them
    // cannot fail short of memory exhaustion, which aborts anyway.
    match rmp_serde::to_vec(msg) {
        Ok(v) => Bytes::from(v),
        Err(e) => unreachable!("protocol messages always encode: {e}"),
    }
}

/// Appends one message to `buf` as a whole frame: its 4-byte length, then the message
/// (what [`FrameCodec`] would write for [`to_frame`]'s output, without the intermediate
/// buffer). Used for the child channels and the sync hubs' connections alike.
///
/// False, with nothing of it left in `buf`, if the message is larger than any frame
/// may be ([`DEFAULT_MAX_FRAME`]): its length is never truncated into the header.
/// Callers check the sizes of user data before they get here; this is the backstop.
#[must_use = "a message over the frame limit is not written"]
pub(crate) fn frame_into<M: Serialize>(buf: &mut BytesMut, msg: &M) -> bool {
    let start = buf.len();
    buf.put_u32(0);
    // As in `to_frame`: our messages always encode.
    if let Err(e) = rmp_serde::encode::write(&mut (&mut *buf).writer(), msg) {
        unreachable!("protocol messages always encode: {e}");
    }
    seal_frame(buf, start, buf.len() - start - 4)
}

/// Writes the header of the frame that starts at `start` in `buf`, `len` bytes long
/// after its header; if no frame may be that long, removes it and returns false.
fn seal_frame(buf: &mut BytesMut, start: usize, len: usize) -> bool {
    match frame_header(len) {
        Some(header) => {
            buf[start..start + 4].copy_from_slice(&header);
            true
        }
        None => {
            buf.truncate(start);
            false
        }
    }
}

/// The 4-byte header of a frame of `len` bytes; `None` if no frame may be that long.
pub(crate) fn frame_header(len: usize) -> Option<[u8; 4]> {
    if len > DEFAULT_MAX_FRAME {
        return None;
    }
    u32::try_from(len).ok().map(u32::to_be_bytes)
}

/// The start of a `Down::Run` frame, appended to `buf`: everything up to its arguments,
/// which the caller sends next, `args_len` bytes of them. The dispatcher sends one per
/// task; the arguments are never copied into an owned [`Run`], nor (when large) into
/// the outgoing buffer. With the arguments after it, it is the frame [`frame_into`]
/// writes for `Down::Run` (tested).
///
/// False, with nothing left in `buf`, if the frame would be over the limit (the pool
/// refuses such arguments at submission; this is the backstop).
#[must_use = "a frame over the limit is not written"]
pub(crate) fn run_frame_head(
    buf: &mut BytesMut,
    id: u64,
    target: u64,
    target_name: &str,
    args_len: usize,
) -> bool {
    #[derive(Serialize)]
    struct RunRef<'a> {
        id: u64,
        target: u64,
        target_name: &'a str,
        #[serde(with = "serde_bytes")]
        args: &'a [u8],
    }
    /// Mirrors [`Down`] up to `Run`: same variant names and indices.
    #[derive(Serialize)]
    enum DownRef<'a> {
        #[allow(dead_code)]
        Hello(()),
        Run(RunRef<'a>),
    }
    let start = buf.len();
    let Ok(bin_len) = u32::try_from(args_len) else {
        return false;
    };
    // The message with empty arguments ends with their empty `bin 8` (0xc4 0x00): the
    // arguments are the last field. That header is replaced by the real one.
    let run = DownRef::Run(RunRef {
        id,
        target,
        target_name,
        args: &[],
    });
    if !frame_into(buf, &run) {
        return false;
    }
    if !buf.ends_with(&[0xc4, 0x00]) {
        unreachable!("an empty byte string encodes as bin 8 of length 0");
    }
    buf.truncate(buf.len() - 2);
    // Writing into a BytesMut cannot fail.
    drop(rmp::encode::write_bin_len(
        &mut (&mut *buf).writer(),
        bin_len,
    ));
    seal_frame(buf, start, buf.len() - start - 4 + args_len)
}

/// Decodes one protocol message.
pub(crate) fn from_frame<M: DeserializeOwned>(frame: &[u8]) -> Result<M, WireError> {
    from_frame_borrowed(frame)
}

/// Decodes one protocol message that may borrow from `frame`.
pub(crate) fn from_frame_borrowed<'a, M: Deserialize<'a>>(frame: &'a [u8]) -> Result<M, WireError> {
    rmp_serde::from_slice(frame).map_err(|e| WireError::Garbage(e.to_string()))
}

/// Encodes a user value (an argument tuple or a return value). Structs are written as
/// maps, so `#[serde(flatten)]` and internally tagged enums work. A `Some` whose value
/// encodes as nil (`Some(None)`, `Some(())`) is an error: it would arrive as `None` (see
/// [`SomeCheck`]).
pub(crate) fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    encode_value_into(&mut buf, value)?;
    Ok(buf)
}

/// Encodes a user value at the end of `buf`, as [`encode_value`] does; on an error,
/// part of it may have been written.
pub(crate) fn encode_value_into<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    value: &T,
) -> Result<(), String> {
    value
        .serialize(SomeCheck::new(
            &mut rmp_serde::Serializer::new(buf).with_struct_map(),
        ))
        .map_err(|e| e.to_string())
}

/// Reads values one after another from MessagePack bytes, and then what follows them:
/// plain numbers and bools by [`scalar`] when the values are of such a type, anything
/// else by rmp-serde.
pub(crate) enum ValueReader<'a> {
    Serde(rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'a, [u8]>>),
    Scalar(&'a [u8]),
}

impl<'a> ValueReader<'a> {
    /// A reader for values of type `T` (and whatever follows them) in `bytes`.
    pub(crate) fn new<T: 'static>(bytes: &'a [u8]) -> Self {
        if scalar::handles::<T>() {
            ValueReader::Scalar(bytes)
        } else {
            ValueReader::Serde(rmp_serde::Deserializer::from_read_ref(bytes))
        }
    }

    /// Appends the next `n` values to `out`.
    pub(crate) fn read_into<V: DeserializeOwned + 'static>(
        &mut self,
        n: u32,
        out: &mut Vec<V>,
    ) -> Result<(), String> {
        // The length comes from another process: reserve by what the bytes can hold.
        let left = match self {
            ValueReader::Serde(de) => de.get_ref().len(),
            ValueReader::Scalar(rest) => rest.len(),
        };
        out.reserve((n as usize).min(left));
        match self {
            // As `next`, with the choice made once for the whole run.
            ValueReader::Serde(de) => {
                for _ in 0..n {
                    out.push(serde_next(de)?);
                }
            }
            ValueReader::Scalar(rest) => {
                for _ in 0..n {
                    out.push(scalar_next(rest)?);
                }
            }
        }
        Ok(())
    }

    /// The next value.
    #[inline]
    pub(crate) fn next<V: DeserializeOwned + 'static>(&mut self) -> Result<V, String> {
        match self {
            ValueReader::Serde(de) => serde_next(de),
            ValueReader::Scalar(rest) => scalar_next(rest),
        }
    }
}

#[inline(always)]
fn serde_next<'a, V: DeserializeOwned>(
    de: &mut rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'a, [u8]>>,
) -> Result<V, String> {
    V::deserialize(de).map_err(|e| e.to_string())
}

#[inline(always)]
fn scalar_next<V: DeserializeOwned>(rest: &mut &[u8]) -> Result<V, String> {
    match scalar::decode::<V>(rest) {
        Some(v) => Ok(v),
        // Reads exactly the value's bytes, moving `rest` past them.
        None => V::deserialize(&mut rmp_serde::Deserializer::new(rest)).map_err(|e| e.to_string()),
    }
}

/// Decodes a user value.
pub(crate) fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

/// The parent's end of a child's channel.
#[derive(Debug)]
pub(crate) struct Channel<R, W> {
    reader: FrameReader<R>,
    writer: FrameWriter<W>,
}

/// The reading half of a [`Channel`].
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    rd: FramedRead<R, FrameCodec>,
    max_frame: usize,
}

/// The writing half of a [`Channel`].
#[derive(Debug)]
pub(crate) struct FrameWriter<W> {
    wr: FramedWrite<W, FrameCodec>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Channel<R, W> {
    pub(crate) fn new(rd: R, wr: W, max_frame: usize) -> Self {
        Channel {
            reader: FrameReader {
                rd: FramedRead::new(rd, codec(max_frame)),
                max_frame,
            },
            writer: FrameWriter {
                wr: FramedWrite::new(wr, codec(max_frame)),
            },
        }
    }

    /// See [`FrameReader::recv`].
    pub(crate) async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, WireError> {
        self.reader.recv().await
    }

    /// See [`FrameWriter::send_all`].
    pub(crate) async fn send_all<M: Serialize>(&mut self, msgs: &[M]) -> std::io::Result<()> {
        self.writer.send_all(msgs).await
    }

    /// The two halves, for a reader task and a writer task.
    pub(crate) fn split(self) -> (FrameReader<R>, FrameWriter<W>) {
        (self.reader, self.writer)
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads the next message; `Ok(None)` at a clean end of stream.
    ///
    /// Cancel safe: a partly read frame stays buffered for the next call.
    pub(crate) async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, WireError> {
        match self.rd.next().await {
            None => Ok(None),
            Some(Ok(frame)) => from_frame(&frame).map(Some),
            Some(Err(e)) => Err(WireError::from_codec(e, self.max_frame)),
        }
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Queues messages and writes them in as few writes as possible.
    ///
    /// Not cancel safe: a message may be partly written.
    pub(crate) async fn send_all<M: Serialize>(&mut self, msgs: &[M]) -> std::io::Result<()> {
        for m in msgs {
            self.wr.feed(to_frame(m)).await?;
        }
        SinkExt::<Bytes>::flush(&mut self.wr).await
    }

    /// The socket itself; anything queued and not flushed is lost.
    pub(crate) fn into_inner(self) -> W {
        self.wr.into_inner()
    }
}

#[cfg(test)]
mod tests;
