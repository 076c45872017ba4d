//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for their corpus replay
//! in `cargo test` (`tests/fuzz_corpus.rs`): every decoder that reads bytes from another
//! process. Not part of the API: hidden, and may change in any release.
//!
//! Each function must return (never panic, hang or allocate far beyond its input) for
//! any input.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::sync::hub::{FromHub, ToHub};
use crate::wire::{self, Down, DownIn, Up};

/// Feeds `data[1..]` to the frame codec in pieces of `data[0] + 1` bytes, as a reader
/// gets them, and decodes every frame as each message a peer may send ([`messages`]).
/// The codec's buffer stays within about twice what arrived.
pub fn frames(data: &[u8]) {
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let mut codec = wire::codec(wire::DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut arrived = 0;
    for piece in data.chunks(usize::from(piece) + 1) {
        buf.extend_from_slice(piece);
        arrived += piece.len();
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => messages(&frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(
            buf.capacity() <= 2 * arrived + 4 * wire::GROW_FROM,
            "a reader reserved {} bytes after {arrived} arrived",
            buf.capacity()
        );
    }
    drop(codec.decode_eof(&mut buf));
}

/// Decodes one frame's body as every message a peer may send: a parent's to its worker
/// (as the worker borrows it, and owned), a child's to its parent (a chunk answer in it
/// decoded too), and the hub protocol both ways, its Hello before authentication
/// included.
pub fn messages(frame: &[u8]) {
    drop(wire::from_frame_borrowed::<DownIn<'_>>(frame));
    drop(wire::from_frame::<Down>(frame));
    if let Ok(Up::Done {
        outcome: wire::Outcome::Value(bytes),
        ..
    }) = wire::from_frame::<Up>(frame)
    {
        chunk_answer(&bytes);
    }
    drop(wire::from_frame::<ToHub>(frame));
    drop(wire::from_frame::<FromHub>(frame));
}

/// Decodes `data` as a map chunk's answer, for several result types.
pub fn chunk_answer(data: &[u8]) {
    crate::pool::fuzz_chunk_answer(data);
}

/// `data` as the bytes a pipe end receives: messages taken as they arrive, each decoded
/// as a few item types.
pub fn pipe(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(crate::sync::Taken::Message(m)) = crate::sync::take_message(&mut buf) {
        drop(wire::decode_value::<String>(&m));
        drop(wire::decode_value::<Vec<i64>>(&m));
        drop(wire::decode_value::<(
            u8,
            Option<String>,
            serde_bytes::ByteBuf,
        )>(&m));
    }
}
