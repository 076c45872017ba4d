//! Encoding a map's items when the call is made ([`Encoded`]: one buffer, large items
//! deferred) and cutting chunks from them uncopied; the arguments of a single call
//! ([`encode_call_args`]) are encoded the same way.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::pool::message::{Args, Deferred, Part};
use crate::wire::SomeCheck;
use crate::wire::chunk;
use crate::wire::spare::Spare;

/// Items encoded back to back; `ends[i]` is where item `i` ends. A large item takes no
/// room in `buf`: it is in `deferred` (see [`Deferred`]).
#[derive(Debug, Default)]
pub(crate) struct Encoded {
    buf: Vec<u8>,
    /// `buf`, once chunks are taken from it (they share it, uncopied).
    frozen: Bytes,
    ends: Ends,
    /// The large items, by index, in order.
    pub(super) deferred: Vec<(usize, Arc<Deferred>)>,
    /// Keeps queues, locks, events and pipe ends among the items alive while the items
    /// are in flight.
    pub(super) pins: crate::sync::Pins,
}

/// The item ends of an [`Encoded`]; a large one goes back to a pool when dropped.
#[derive(Debug, Default)]
struct Ends(Vec<usize>);

/// Item-end vectors of at least this many entries are reused (see [`Ends`]).
const POOLED_ENDS: usize = 4096;

/// At most this many bytes of buffers are kept for reuse by each of the two pools of
/// map encodings (item bytes and item ends); larger ones are let go.
const KEPT_ENCODING: usize = 8 << 20;

/// Kept item-end vectors: the allocator gives a large block back to the system when it
/// is freed and maps a fresh one (whose first touches cost, see `wire::spare`) when the
/// next map asks for one of the same size.
static KEPT_ENDS: Spare<usize> = Spare::with_max(KEPT_ENCODING);

impl Ends {
    /// Room for `n` ends: a kept vector if `n` is large.
    fn with_capacity(n: usize) -> Ends {
        if n >= POOLED_ENDS
            && let Some(mut kept) = KEPT_ENDS.take(n)
        {
            kept.clear();
            return Ends(kept);
        }
        Ends(Vec::with_capacity(n))
    }
}

impl Drop for Ends {
    fn drop(&mut self) {
        if self.0.capacity() >= POOLED_ENDS {
            KEPT_ENDS.put(std::mem::take(&mut self.0));
        }
    }
}

impl std::ops::Deref for Ends {
    type Target = Vec<usize>;
    fn deref(&self) -> &Vec<usize> {
        &self.0
    }
}

impl std::ops::DerefMut for Ends {
    fn deref_mut(&mut self) -> &mut Vec<usize> {
        &mut self.0
    }
}

/// Kept buffers for the encoded items of maps (see [`KEPT_ENDS`]).
fn encode_buffers() -> &'static Arc<Spare> {
    static KEPT: std::sync::OnceLock<Arc<Spare>> = std::sync::OnceLock::new();
    KEPT.get_or_init(|| Arc::new(Spare::with_max(KEPT_ENCODING)))
}

/// Items that encode to more than this many bytes (counting small writes only up to
/// here, see [`Capped`]) are encoded again when sent instead of being kept encoded (see
/// [`Deferred`]); under it, a second encoding costs more than it saves.
pub(super) const DEFER_SIZE: usize = 1 << 20;

/// Writes of at most this many bytes are always stored (see [`Capped`]).
const SMALL_WRITE: usize = 16;

/// The encoder's output for [`Encoded::fill`]: an item's first `limit` bytes go into
/// `buf`, the rest are only counted, except for small writes (so an item counts as
/// large when its strings and byte strings make it so).
struct Capped<'a> {
    buf: &'a mut Vec<u8>,
    /// Where the current item starts.
    start: usize,
    /// Where it must end to be stored whole; 0 once it did not.
    end: usize,
    /// Bytes of the current item counted, not stored.
    over: usize,
}

impl<'a> Capped<'a> {
    /// An encoder appending to `buf`, as `wire::encode_value` encodes (structs as maps;
    /// values are written through `wire::SomeCheck`, see `encode_item`).
    fn serializer(buf: &'a mut Vec<u8>) -> CappedSerializer<'a> {
        let out = Capped {
            buf,
            start: 0,
            end: 0,
            over: 0,
        };
        rmp_serde::Serializer::new(out).with_struct_map()
    }

    fn begin(&mut self, limit: usize) {
        self.start = self.buf.len();
        self.end = self.start.saturating_add(limit);
        self.over = 0;
    }

    /// The current item's size, stored or not.
    fn item_len(&self) -> usize {
        self.buf.len() - self.start + self.over
    }
}

impl std::io::Write for Capped<'_> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    #[inline(always)]
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        // Markers and numbers (a known, small size once inlined) are stored as a `Vec`
        // would store them; the limit is for the copies of strings and byte strings.
        if data.len() <= SMALL_WRITE || self.buf.len() + data.len() <= self.end {
            self.buf.extend_from_slice(data);
        } else {
            self.end = 0;
            self.over += data.len();
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type CappedSerializer<'a> = rmp_serde::Serializer<
    Capped<'a>,
    rmp_serde::config::StructMapConfig<rmp_serde::config::DefaultConfig>,
>;

/// Appends `item`'s encoding to the serializer's buffer, or, for a large item that took
/// no handle, nothing: it is returned to be encoded again when sent. Run it inside
/// [`crate::sync::collect`]. An item that fails to encode leaves nothing behind.
fn encode_item<T: Serialize + Send + 'static>(
    ser: &mut CappedSerializer<'_>,
    item: T,
) -> std::result::Result<Option<Deferred>, String> {
    ser.get_mut().begin(DEFER_SIZE);
    let pins = crate::sync::pins_taken();
    let mut res = item.serialize(SomeCheck::new(&mut *ser));
    let out = ser.get_mut();
    if res.is_ok() && out.over > 0 {
        let len = out.item_len();
        out.buf.truncate(out.start);
        let taken = crate::sync::pins_taken() - pins;
        if taken == 0 {
            return Ok(Some(Deferred::new(item, len)));
        }
        // Handles are pinned once, by the encoding that is sent: this one.
        crate::sync::unpin_last(taken);
        ser.get_mut().begin(usize::MAX);
        res = item.serialize(SomeCheck::new(&mut *ser));
    }
    if let Err(e) = res {
        let out = ser.get_mut();
        out.buf.truncate(out.start);
        return Err(e.to_string());
    }
    Ok(None)
}

/// Encodes the arguments of one call (as [`Encoded::fill`] does an item of a map: a
/// large one is deferred), with the pins its handles took.
pub(crate) fn encode_call_args<T: Serialize + Send + 'static>(
    args: T,
) -> (std::result::Result<Args, String>, crate::sync::Pins) {
    crate::sync::collect(|| {
        let mut buf = Vec::new();
        let deferred = encode_item(&mut Capped::serializer(&mut buf), args)?;
        Ok(match deferred {
            Some(item) => Args {
                rest: Some(Arc::new([Part::Deferred(Arc::new(item))])),
                ..Args::default()
            },
            None => Args::from(Bytes::from(buf)),
        })
    })
}

impl Encoded {
    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Appends items until `limit` are held or `items` ends (then returns true), with
    /// one encoder for all of them. Run it inside [`crate::sync::collect`] (once for many
    /// items: it is not free) and keep the pins in `self.pins`. An item that fails to
    /// encode leaves nothing behind and is the error.
    pub(super) fn fill<T: Serialize + Send + 'static>(
        &mut self,
        items: &mut impl Iterator<Item = T>,
        limit: usize,
    ) -> std::result::Result<bool, String> {
        if crate::wire::scalar::handles::<T>() {
            // Plain numbers: they always encode, are never large and hold no handle.
            // (Worked on as locals: the compiler keeps their lengths in registers.)
            let mut buf = std::mem::take(&mut self.buf);
            let mut ends = std::mem::take(&mut self.ends.0);
            let mut done = false;
            while ends.len() < limit {
                let Some(item) = items.next() else {
                    done = true;
                    break;
                };
                crate::wire::scalar::encode(&item, &mut buf);
                ends.push(buf.len());
            }
            self.buf = buf;
            self.ends.0 = ends;
            return Ok(done);
        }
        let mut ser = Capped::serializer(&mut self.buf);
        while self.ends.len() < limit {
            let Some(item) = items.next() else {
                return Ok(true);
            };
            if let Some(item) = encode_item(&mut ser, item)? {
                self.deferred.push((self.ends.len(), Arc::new(item)));
            }
            self.ends.push(ser.get_ref().buf.len());
        }
        Ok(false)
    }

    /// Where item `i` starts in `buf`.
    fn start(&self, i: usize) -> usize {
        if i == 0 { 0 } else { self.ends[i - 1] }
    }

    /// Items `range` as one MessagePack array: a header, then the items, not copied.
    /// No item is pushed after the first chunk is taken.
    pub(super) fn chunk(&mut self, range: std::ops::Range<usize>) -> Args {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let len = buf.len();
            // Back to the pool once the last chunk's bytes are let go.
            self.frozen = encode_buffers().share(buf, len);
        }
        let (start, end) = (self.start(range.start), self.ends[range.end - 1]);
        let head = chunk::request_head(range.len());
        let from = self.deferred.partition_point(|(i, _)| *i < range.start);
        let to = self.deferred.partition_point(|(i, _)| *i < range.end);
        if from == to {
            return Args {
                head: Bytes::from(head),
                body: self.frozen.slice(start..end),
                rest: None,
            };
        }
        let mut rest = Vec::with_capacity(2 * (to - from) + 1);
        let mut at = start;
        for (i, item) in &self.deferred[from..to] {
            let here = self.start(*i);
            if here > at {
                rest.push(Part::Bytes(self.frozen.slice(at..here)));
            }
            rest.push(Part::Deferred(Arc::clone(item)));
            at = here;
        }
        if end > at {
            rest.push(Part::Bytes(self.frozen.slice(at..end)));
        }
        Args {
            head: Bytes::from(head),
            body: Bytes::new(),
            rest: Some(rest.into()),
        }
    }

    /// Appends item `i` of `other` (to resubmit the rest of a chunk).
    pub(super) fn push_item(&mut self, other: &Encoded, i: usize) {
        let all = if other.frozen.is_empty() {
            &other.buf[..]
        } else {
            &other.frozen[..]
        };
        self.buf
            .extend_from_slice(&all[other.start(i)..other.ends[i]]);
        if let Ok(k) = other.deferred.binary_search_by_key(&i, |(j, _)| *j) {
            let item = Arc::clone(&other.deferred[k].1);
            self.deferred.push((self.ends.len(), item));
        }
        self.ends.push(self.buf.len());
    }
}

/// Encodes every item now; the first that fails is the error.
pub(crate) fn encode_items<T: Serialize + Send + 'static, I: IntoIterator<Item = T>>(
    items: I,
) -> Result<Encoded> {
    let mut items = items.into_iter();
    let mut enc = Encoded::default();
    let expect = items.size_hint().0;
    enc.ends = Ends::with_capacity(expect);
    if expect >= POOLED_ENDS
        && let Some(mut buf) = encode_buffers().take(0)
    {
        buf.clear();
        enc.buf = buf;
    }
    let (res, pins) = crate::sync::collect(|| enc.fill(&mut items, usize::MAX));
    enc.pins = pins;
    res.map_err(Error::encode::<T>)?;
    Ok(enc)
}
