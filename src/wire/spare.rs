//! Large buffers kept for reuse.
//!
//! On the machines we measure, the first write to a fresh page costs more than copying
//! into memory already touched (BENCHMARKS.md, "Where the time goes"), and the
//! allocator, with other large blocks freed in between, does not reliably hand the same
//! memory back. So the few buffers that carry large messages (a worker's large frames,
//! the parent's encodings of large map items) are kept.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// The most buffers one [`Spare`] keeps.
const KEPT: usize = 2;

/// Buffers larger than this are never kept.
const MAX_KEPT_SIZE: usize = 64 << 20;

/// A few large buffers, kept for reuse (byte buffers by default; the parent's lists of
/// map item ends are kept the same way).
#[derive(Debug)]
pub(crate) struct Spare<T = u8> {
    kept: Mutex<Vec<Vec<T>>>,
    /// Buffers of more than this many bytes are not kept.
    max: usize,
}

impl Default for Spare {
    fn default() -> Self {
        Spare::with_max(MAX_KEPT_SIZE)
    }
}

impl<T> Spare<T> {
    /// Keeps buffers of at most `max` bytes.
    pub(crate) const fn with_max(max: usize) -> Self {
        Spare {
            kept: Mutex::new(Vec::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<T>>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kept buffer with room for at least `capacity` elements, with what it held.
    pub(crate) fn take(&self, capacity: usize) -> Option<Vec<T>> {
        let mut kept = self.lock();
        let i = kept.iter().position(|b| b.capacity() >= capacity)?;
        Some(kept.swap_remove(i))
    }

    /// Keeps `buf` unless it is too large or as many larger ones are kept.
    pub(crate) fn put(&self, buf: Vec<T>) {
        if buf.capacity().saturating_mul(std::mem::size_of::<T>()) > self.max {
            return;
        }
        let mut kept = self.lock();
        if kept.len() < KEPT {
            kept.push(buf);
        } else if let Some(smallest) = kept.iter_mut().min_by_key(|b| b.capacity())
            && smallest.capacity() < buf.capacity()
        {
            *smallest = buf;
        }
    }

    /// Lets go of every kept buffer.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}

impl Spare {
    /// The first `len` bytes of `buf`, shared; `buf` comes back here once the last
    /// slice of them is dropped.
    pub(crate) fn share(self: &Arc<Self>, buf: Vec<u8>, len: usize) -> Bytes {
        assert!(len <= buf.len(), "a buffer shares only what it holds");
        Bytes::from_owner(Recycled {
            buf,
            len,
            home: Arc::clone(self),
        })
    }
}

/// The owner of [`Spare::share`]'s bytes.
struct Recycled {
    buf: Vec<u8>,
    len: usize,
    home: Arc<Spare>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.home.put(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_buffer_comes_back_when_its_last_slice_is_dropped() {
        let spare = Arc::new(Spare::default());
        let bytes = spare.share(vec![7; 1000], 10);
        assert_eq!(&bytes[..], &[7; 10]);
        let part = bytes.slice(2..4);
        drop(bytes);
        assert!(spare.take(1000).is_none(), "still in use");
        drop(part);
        let back = spare.take(1000).expect("given back");
        assert_eq!(back.len(), 1000, "kept with what it held");
    }

    #[test]
    fn keeps_the_largest_few_and_nothing_huge() {
        let spare = Spare::default();
        for cap in [10, 30, 20] {
            spare.put(Vec::with_capacity(cap));
        }
        assert!(spare.take(21).is_some_and(|b| b.capacity() >= 30));
        assert!(spare.take(20).is_some_and(|b| b.capacity() >= 20));
        assert!(spare.take(1).is_none(), "the smallest was let go");
        spare.put(Vec::with_capacity(MAX_KEPT_SIZE + 1));
        assert!(spare.take(0).is_none());
        spare.put(Vec::with_capacity(5));
        spare.clear();
        assert!(spare.take(0).is_none());
    }
}
