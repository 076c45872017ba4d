//! `map`, `starmap` and `imap`: many items through the pool in chunks.
//!
//! Items are encoded one by one into a single buffer when the call is made (so an item
//! that cannot be encoded fails at once); a chunk is a MessagePack array header followed
//! by a slice of that buffer, so chunking copies nothing twice. A worker runs a chunk's
//! items in order and stops at the first failing one, reporting its index; the results
//! of the items before it are kept.
//!
//! The parts: `encode` (the items, encoded when the call is made, and the chunks cut
//! from them), `answer` (a chunk's answer, read), `run` ([`Map`]) and `imap` ([`Imap`]).
//! The chunk format itself, both ways, is `wire::chunk`'s.

mod answer;
mod encode;
mod imap;
mod run;

pub(crate) use answer::fuzz_chunk_answer;
pub(crate) use encode::{encode_call_args, encode_items};
pub use imap::{Imap, ImapStream};
pub use run::Map;

#[cfg(test)]
mod tests;
