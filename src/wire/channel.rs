//! The parent's end of a child's channel: frames over an async socket, read and written
//! by a reader task and a writer task.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::{FrameCodec, WireError, codec, from_frame, to_frame};

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
