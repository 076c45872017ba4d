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
//!
//! The parts: `frame.rs` (the codec, a message as a frame and back, the frame limit),
//! `channel.rs` (the parent's async end of a channel) and `blocking.rs` (the child's),
//! `message.rs` (every message between a parent and a child), `value.rs` (user values:
//! arguments and results), `chunk.rs` (a map's chunks, both ways), and the helpers
//! `scalar.rs`, `nil.rs`, `spare.rs` and `fdpass.rs`.

mod blocking;
mod channel;
pub(crate) mod chunk;
pub(crate) mod fdpass;
mod frame;
mod message;
mod nil;
pub(crate) mod scalar;
pub(crate) mod spare;
mod value;

pub(crate) use blocking::{BlockingChannel, Next, Outbox, Source};
pub(crate) use channel::Channel;
pub use frame::DEFAULT_MAX_FRAME;
pub(crate) use frame::{
    FrameCodec, GROW_FROM, WireError, codec, frame_header, frame_into, from_frame,
    from_frame_borrowed, to_frame,
};
pub(crate) use message::{
    ARENA_MARK, Arena, Down, DownIn, Hello, LogRecord, Outcome, PROTOCOL_VERSION, RECALL_LEN, Role,
    Run, RunShared, Up, recall, recall_upto, run_frame_head,
};
pub(crate) use nil::SomeCheck;
pub(crate) use value::{
    MAX_ARGS, ValueReader, check_args_len, decode_value, encode_value, encode_value_into,
    oversize_reason,
};

#[cfg(test)]
mod tests;
