//! User values on the wire (argument tuples and return values): encoded with a `Some` of
//! nil refused, read back one after another, and the most bytes one message holds.

use serde::{Serialize, de::DeserializeOwned};

use super::{DEFAULT_MAX_FRAME, SomeCheck, scalar};

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

/// The reason of an [`Outcome::Encode`](super::Outcome::Encode) for a result of `len`
/// bytes over [`MAX_ARGS`].
pub(crate) fn oversize_reason(len: usize) -> String {
    format!("{len} bytes encoded; one message holds at most {MAX_ARGS} bytes")
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
