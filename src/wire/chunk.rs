//! The chunk format of `map`, `starmap` and `imap`, both ways: a chunk request is a
//! MessagePack array of items ([`request_head`], [`read_request_len`]; written in
//! `pool::map`, read by `target`'s chunk runner), and its answer is
//! `(Vec<R>, Option<(u32, Outcome)>)`, written by [`ChunkWriter`] in the worker and read
//! by [`read_chunk_output`] in the parent.

use serde::{Serialize, de::DeserializeOwned};

use super::{MAX_ARGS, Outcome, ValueReader, encode_value_into, oversize_reason, scalar};

/// A chunk's array header holds a 32-bit length: larger chunk sizes act as this.
pub(crate) const MAX_CHUNK_ITEMS: usize = u32::MAX as usize;

/// A chunk request's header: a MessagePack array of `items` items, whose encodings follow
/// it.
pub(crate) fn request_head(items: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(5);
    // Writing into a Vec cannot fail.
    let Ok(n) = u32::try_from(items) else {
        unreachable!("a chunk holds at most MAX_CHUNK_ITEMS items");
    };
    drop(rmp::encode::write_array_len(&mut head, n));
    head
}

/// Reads a chunk request's header from the front of `rest`: how many items follow.
pub(crate) fn read_request_len(rest: &mut &[u8]) -> Result<u32, String> {
    rmp::decode::read_array_len(rest).map_err(|e| e.to_string())
}

/// A chunk's answer up to this size leaves its buffer for the next chunk (see
/// [`take_chunk_buffer`]).
const KEPT_CHUNK_BUFFER: usize = 1 << 20;

thread_local! {
    static CHUNK_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An empty buffer for a chunk's answer: the one the last answer gave back (a worker
/// answering chunk after chunk writes into memory it has touched before), or a new one.
fn take_chunk_buffer() -> Vec<u8> {
    CHUNK_BUFFER.with(|b| b.take())
}

/// Keeps `buf` (an answer that was sent) for the next [`take_chunk_buffer`], unless it
/// is large.
pub(crate) fn give_back_chunk_buffer(mut buf: Vec<u8>) {
    if buf.capacity() <= KEPT_CHUNK_BUFFER {
        buf.clear();
        CHUNK_BUFFER.with(|b| b.set(buf));
    }
}

/// Writes what a chunk sends back, `(Vec<R>, Option<(u32, Outcome)>)`: the values of the
/// items that ran, in order, and the failure that stopped it, with the failing item's
/// index in the chunk (items after it did not run). Written value by value into a buffer
/// a worker keeps between chunks, and read the same way ([`read_chunk_output`]).
pub(crate) struct ChunkWriter {
    out: Vec<u8>,
    /// The values are plain numbers or bools (see `wire::scalar`).
    scalar: bool,
    ran: u32,
    /// Where the values written whole end (a value whose `Serialize` failed or panicked
    /// may have left a part of itself after it).
    end: usize,
}

impl ChunkWriter {
    /// Room for about `hint` bytes of values of type `R` (up to the size of buffer a
    /// worker keeps: a larger answer grows as it is written).
    pub(crate) fn new<R: 'static>(hint: usize) -> Self {
        let mut out = take_chunk_buffer();
        out.reserve(hint.min(KEPT_CHUNK_BUFFER) + 16);
        out.push(0x92); // (values, failure)
        out.push(0xdd); // an array with a 32-bit length, written by `finish`
        out.extend_from_slice(&[0; 4]);
        let end = out.len();
        ChunkWriter {
            out,
            scalar: scalar::handles::<R>(),
            ran: 0,
            end,
        }
    }

    /// Appends `value`. After an error (or a panic), push no more: `finish`. A value that
    /// takes the answer past what one message holds is an error (and is not kept).
    pub(crate) fn push<R: Serialize>(&mut self, value: &R) -> Result<(), String> {
        self.out.truncate(self.end);
        if !(self.scalar && scalar::encode(value, &mut self.out)) {
            encode_value_into(&mut self.out, value)?;
        }
        if self.out.len() > MAX_ARGS {
            let len = self.out.len() - self.end;
            self.out.truncate(self.end);
            return Err(oversize_reason(len));
        }
        self.end = self.out.len();
        self.ran += 1;
        Ok(())
    }

    /// The bytes: the values pushed whole, then `failure`.
    pub(crate) fn finish(mut self, failure: &Option<(u32, Outcome)>) -> Result<Vec<u8>, String> {
        self.out.truncate(self.end);
        self.out[2..6].copy_from_slice(&self.ran.to_be_bytes());
        encode_value_into(&mut self.out, failure)?;
        Ok(self.out)
    }
}

/// Reads what a chunk sends back (see [`ChunkWriter`]), appending its values to
/// `values`; returns the failure that stopped the chunk, if one did.
pub(crate) fn read_chunk_output<R: DeserializeOwned + 'static>(
    bytes: &[u8],
    values: &mut Vec<R>,
) -> std::result::Result<Option<(u32, Outcome)>, String> {
    let mut rest = bytes;
    let pair = rmp::decode::read_array_len(&mut rest).map_err(|e| e.to_string())?;
    if pair != 2 {
        return Err(format!("a chunk's answer has {pair} parts, not 2"));
    }
    let n = rmp::decode::read_array_len(&mut rest).map_err(|e| e.to_string())?;
    let mut reader = ValueReader::new::<R>(rest);
    reader.read_into(n, values)?;
    reader.next::<Option<(u32, Outcome)>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a string, then fails: leaves a part of itself behind in the writer.
    struct HalfWritten;
    impl Serialize for HalfWritten {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            use serde::ser::SerializeTuple;
            let mut t = s.serialize_tuple(2)?;
            t.serialize_element("written")?;
            Err(serde::ser::Error::custom("then failed"))
        }
    }

    #[test]
    fn a_chunk_answer_reads_back_whole_and_without_a_failed_value() {
        let mut w = ChunkWriter::new::<(u32, String)>(0);
        w.push(&(1u32, "one".to_string())).unwrap();
        w.push(&(2u32, "two".to_string())).unwrap();
        assert!(w.push(&HalfWritten).is_err());
        let failure = Some((
            2,
            Outcome::Panicked {
                message: "no".into(),
                location: None,
            },
        ));
        let bytes = w.finish(&failure).unwrap();
        // What the parent decoded before values were written one by one.
        type Answer = (Vec<(u32, String)>, Option<(u32, Outcome)>);
        let (values, fail): Answer = crate::wire::decode_value(&bytes).unwrap();
        assert_eq!(values, [(1, "one".into()), (2, "two".into())]);
        assert_eq!(format!("{fail:?}"), format!("{failure:?}"));
        let mut read = vec![(0u32, "before".to_string())];
        let fail = read_chunk_output(&bytes, &mut read).unwrap();
        assert_eq!(
            read,
            [(0, "before".into()), (1, "one".into()), (2, "two".into())]
        );
        assert_eq!(format!("{fail:?}"), format!("{failure:?}"));
        // An answer that claims more values than it holds is an error, not a huge
        // reservation or a panic.
        let mut lying = vec![0x92, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(read_chunk_output::<u32>(&lying, &mut Vec::new()).is_err());
        lying[0] = 0x93;
        assert!(read_chunk_output::<u32>(&lying, &mut Vec::new()).is_err());
    }
}
