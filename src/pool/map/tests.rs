//! Unit tests of a map's encoding: deferred items, chunks and resubmitted rests, items
//! refused when encoded.

use serde::Serialize;
use serde_bytes::ByteBuf;

use super::encode::{DEFER_SIZE, Encoded, encode_call_args, encode_items};
use crate::error::Error;
use crate::pool::message::{Args, Part};

/// The bytes a worker would receive for `args`.
fn sent(args: &Args) -> Vec<u8> {
    let mut out = [&args.head[..], &args.body[..]].concat();
    for part in args.rest.iter().flat_map(|r| r.iter()) {
        match part {
            Part::Bytes(b) => out.extend_from_slice(b),
            Part::Deferred(d) => d.encode_into(&mut out).unwrap(),
        }
    }
    assert_eq!(out.len(), args.len());
    out
}

#[test]
fn deferred_items_reach_the_worker_as_if_encoded_up_front() {
    // Encoded sizes: a 1..5 byte header, then the bytes.
    let sizes = [
        10,
        DEFER_SIZE + 5,
        3,
        DEFER_SIZE,
        DEFER_SIZE - 10,
        2 * DEFER_SIZE,
    ];
    let items: Vec<ByteBuf> = sizes
        .iter()
        .map(|&n| ByteBuf::from(vec![n as u8; n]))
        .collect();
    let mut enc = encode_items(items.clone()).unwrap();
    let deferred: Vec<usize> = enc.deferred.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        deferred,
        [1, 3, 5],
        "only items over DEFER_SIZE encoded are deferred"
    );
    for range in [0..6, 1..4, 2..3, 0..1, 3..6, 5..6] {
        let want = rmp_serde::to_vec_named(&items[range.clone()]).unwrap();
        assert!(sent(&enc.chunk(range.clone())) == want, "chunk {range:?}");
    }
    // The rest of a chunk, resubmitted after its first item failed.
    let mut rest = Encoded::default();
    for i in 1..6 {
        rest.push_item(&enc, i);
    }
    let want = rmp_serde::to_vec_named(&items[1..]).unwrap();
    assert!(sent(&rest.chunk(0..5)) == want);
}

/// Encodes differently each time.
struct Fickle(std::sync::atomic::AtomicUsize);

impl Serialize for Fickle {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.serialize_bytes(&vec![0; DEFER_SIZE + n])
    }
}

#[test]
fn an_item_that_encodes_differently_when_sent_is_an_error_and_leaves_nothing() {
    let mut enc = encode_items([Fickle(0.into())]).unwrap();
    let args = enc.chunk(0..1);
    let Some(Part::Deferred(d)) = args.rest.as_deref().and_then(|r| r.first()) else {
        panic!("a large item is deferred");
    };
    let mut out = vec![1, 2, 3];
    match d.encode_into(&mut out) {
        Err(Error::Encode { type_name, reason }) => {
            assert!(type_name.ends_with("Fickle"), "{type_name}");
            assert!(reason.contains("encoded again"), "{reason}");
        }
        other => panic!("expected an Encode error, got {other:?}"),
    }
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn items_and_arguments_that_would_arrive_as_none_are_refused_when_encoded() {
    match encode_items([Some(Some(1u8)), Some(None)]) {
        Err(Error::Encode { type_name, reason }) => {
            assert!(
                type_name.contains("Option<core::option::Option<u8>>"),
                "{type_name}"
            );
            assert!(reason.contains("the same bytes as `None`"), "{reason}");
        }
        other => panic!("expected Encode, got {other:?}"),
    }
    assert!(encode_call_args((Some(()),)).0.is_err());
    // A large item is checked too (its first encoding is the check).
    let big = (ByteBuf::from(vec![0; DEFER_SIZE + 1]), Some(None::<u8>));
    assert!(encode_items([big]).is_err());
    assert!(encode_call_args((Some(Some(2u8)), None::<()>)).0.is_ok());
}
