//! Frames: a 4-byte big-endian length, then the message. The codec both sides use, a
//! message written as a frame and read back, and the largest frame either side accepts.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// The largest frame either side accepts: 1 GiB. A length prefix above it is treated as
/// garbage rather than an allocation request.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;

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
pub(super) fn seal_frame(buf: &mut BytesMut, start: usize, len: usize) -> bool {
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

/// Decodes one protocol message.
pub(crate) fn from_frame<M: DeserializeOwned>(frame: &[u8]) -> Result<M, WireError> {
    from_frame_borrowed(frame)
}

/// Decodes one protocol message that may borrow from `frame`.
pub(crate) fn from_frame_borrowed<'a, M: Deserialize<'a>>(frame: &'a [u8]) -> Result<M, WireError> {
    rmp_serde::from_slice(frame).map_err(|e| WireError::Garbage(e.to_string()))
}
