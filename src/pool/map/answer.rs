//! Reading a chunk's answer as a map and an imap want it: its values, and the error that
//! stopped it (the answer's format is `wire::chunk`'s).

use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::pool::message::Finished;
use crate::wire::Outcome;
use crate::wire::chunk::read_chunk_output;

/// Decodes `bytes` as a chunk's answer, as a map and an imap would, for a few result
/// types (the fuzz targets' entry; see `crate::fuzz`).
pub(crate) fn fuzz_chunk_answer(bytes: &[u8]) {
    fn both<R: DeserializeOwned + 'static>(bytes: &[u8]) {
        let done = || Finished {
            outcome: Outcome::Value(serde_bytes::ByteBuf::from(bytes.to_vec())),
            worker: Arc::from("fuzz"),
        };
        drop(decode_chunk::<R>(done()));
        let mut values = Vec::new();
        drop(decode_chunk_into::<R>(done(), &mut values));
    }
    both::<i64>(bytes);
    both::<u8>(bytes);
    both::<bool>(bytes);
    both::<f64>(bytes);
    both::<String>(bytes);
    both::<serde_bytes::ByteBuf>(bytes);
    both::<(u32, Option<String>)>(bytes);
    both::<Vec<i64>>(bytes);
}

/// Decodes a chunk's answer: its values, or the error that stopped it (with how many
/// items ran before it).
pub(super) fn decode_chunk<R: DeserializeOwned + 'static>(
    done: Finished,
) -> (Vec<R>, Option<Error>) {
    let mut values = Vec::new();
    let err = decode_chunk_into(done, &mut values);
    (values, err)
}

/// Appends a chunk's values to `values` as they are decoded (no vector of its own), and
/// returns the error that stopped the chunk, if one did.
pub(super) fn decode_chunk_into<R: DeserializeOwned + 'static>(
    done: Finished,
    values: &mut Vec<R>,
) -> Option<Error> {
    let failed = |outcome: &Outcome| outcome.to_result::<()>(&done.worker).err();
    let bytes = match &done.outcome {
        Outcome::Value(bytes) => bytes,
        other => return Some(failed(other).unwrap_or(Error::Cancelled)),
    };
    match read_chunk_output(bytes, values) {
        Ok(None) => None,
        Ok(Some((_, failure))) => Some(failed(&failure).unwrap_or(Error::Cancelled)),
        Err(reason) => Some(Error::decode::<R>(reason)),
    }
}
