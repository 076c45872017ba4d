//! The table of tasks by id, hashed for ids that come in order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Tasks by id. Ids are consecutive, and the table is mostly walked in id order: hashed
/// to themselves, consecutive tasks sit in neighbouring buckets (with a random hash, each
/// lookup in a table of 100k tasks was a cache miss, the dispatcher's top cost).
pub(super) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The hash of an id is the id itself in its low bits (the bucket), with its top 7 bits,
/// which the table compares first within a group, taken from a multiplication so that
/// neighbouring ids differ there.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64 keys; any mixing will do.
        for b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        const TOP7: u64 = !(u64::MAX >> 7);
        self.0 = (id & !TOP7) | (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) & TOP7);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn task_ids_keep_their_order_in_the_low_bits_and_differ_in_the_top_bits() {
        let h = BuildHasherDefault::<IdHasher>::default();
        let low = u64::MAX >> 7;
        let tops: std::collections::HashSet<u64> =
            (1000..1016u64).map(|id| h.hash_one(id) >> 57).collect();
        for id in [0u64, 1, 2, 99_999, 1 << 40] {
            assert_eq!(h.hash_one(id) & low, id & low, "bucket bits of {id}");
        }
        assert!(tops.len() > 8, "16 neighbours share top bits: {tops:?}");
    }
}
