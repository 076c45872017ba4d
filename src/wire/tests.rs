//! Framing tests in the manner of tokio-util's `tests/length_delimited.rs`: partial reads,
//! oversize frames, garbage and end of stream in the middle of a frame.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::Decoder;

use super::*;

/// A reader that hands out the scripted chunks one per read, then end of stream.
struct Script {
    chunks: VecDeque<Vec<u8>>,
}

impl Script {
    fn new(chunks: Vec<Vec<u8>>) -> Self {
        Script {
            chunks: chunks.into(),
        }
    }

    fn bytewise(bytes: &[u8]) -> Self {
        Script::new(bytes.iter().map(|b| vec![*b]).collect())
    }
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(c) = self.chunks.pop_front() {
            buf.put_slice(&c);
        }
        Poll::Ready(Ok(()))
    }
}

impl Read for Script {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self.chunks.pop_front() {
            Some(mut c) => {
                let n = c.len().min(out.len());
                out[..n].copy_from_slice(&c[..n]);
                if n < c.len() {
                    self.chunks.push_front(c.split_off(n));
                }
                Ok(n)
            }
            None => Ok(0),
        }
    }
}

impl super::blocking::Source for Script {
    /// An empty chunk is a moment when nothing has arrived.
    fn read_now(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.chunks.front().is_some_and(Vec::is_empty) {
            self.chunks.pop_front();
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.read(out)
    }
}

impl Write for Script {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn framed(msg: &Up) -> Vec<u8> {
    let body = to_frame(msg);
    let mut v = frame_header(body.len()).unwrap().to_vec();
    v.extend_from_slice(&body);
    v
}

fn ready() -> Up {
    Up::Ready {
        version: PROTOCOL_VERSION,
        pid: 42,
    }
}

fn channel(s: Script, max: usize) -> Channel<Script, tokio::io::Sink> {
    Channel::new(s, tokio::io::sink(), max)
}

#[test]
fn large_frames_arrive_between_other_work_and_their_buffers_are_reused() {
    use super::blocking::Next;
    let frame = |seed: u8| {
        framed(&Up::Refused {
            reason: String::from(char::from(b'a' + seed)).repeat(300_000),
        })
    };
    let mut chunks = Vec::new();
    for seed in 0..3 {
        let f = frame(seed);
        // Header and a bit, nothing yet, most of it, nothing yet, the rest.
        chunks.extend([f[..50].to_vec(), vec![], f[50..250_000].to_vec(), vec![]]);
        chunks.push(f[250_000..].to_vec());
    }
    let mut b = BlockingChannel::new(Script::new(chunks), 1 << 20);
    let mut next = || loop {
        match b.next_frame(false).unwrap() {
            Next::Msg(frame) => return frame,
            Next::Nothing => {}
            Next::End => panic!("ended early"),
        }
    };
    let first = next();
    let second = next();
    assert!(first.ends_with(b"aaaa") && second.ends_with(b"bbbb"));
    let first_at = first.as_ptr();
    drop(first);
    let third = next();
    assert!(third.ends_with(b"cccc"));
    assert_eq!(
        third.as_ptr(),
        first_at,
        "the first frame's buffer is reused"
    );
}

#[tokio::test]
async fn partial_reads_reassemble_frames() {
    let mut bytes = framed(&ready());
    bytes.extend(framed(&Up::Refused { reason: "x".into() }));
    let mut ch = channel(Script::bytewise(&bytes), 1024);
    assert!(matches!(
        ch.recv::<Up>().await,
        Ok(Some(Up::Ready { pid: 42, .. }))
    ));
    assert!(matches!(
        ch.recv::<Up>().await,
        Ok(Some(Up::Refused { .. }))
    ));
    assert!(matches!(ch.recv::<Up>().await, Ok(None)));

    let mut b = BlockingChannel::new(Script::bytewise(&bytes), 1024);
    assert!(matches!(
        b.recv::<Up>(),
        Ok(Some(Up::Ready { pid: 42, .. }))
    ));
    assert!(matches!(b.recv::<Up>(), Ok(Some(Up::Refused { .. }))));
    assert!(matches!(b.recv::<Up>(), Ok(None)));
}

#[tokio::test]
async fn oversize_frame_is_refused_before_reading_it() {
    // A length prefix of 4 GiB - 1 must not allocate or wait for 4 GiB.
    let bytes = vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let mut ch = channel(Script::new(vec![bytes.clone()]), 1024);
    assert!(matches!(
        ch.recv::<Up>().await,
        Err(WireError::Oversize { max: 1024 })
    ));
    let mut b = BlockingChannel::new(Script::new(vec![bytes]), 1024);
    assert!(matches!(
        b.recv::<Up>(),
        Err(WireError::Oversize { max: 1024 })
    ));
}

#[tokio::test]
async fn garbage_body_is_a_typed_error() {
    let mut bytes = 5u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0xc1, 0xc1, 0xc1, 0xc1, 0xc1]); // 0xc1 is never valid
    let mut ch = channel(Script::new(vec![bytes.clone()]), 1024);
    assert!(matches!(ch.recv::<Up>().await, Err(WireError::Garbage(_))));
    let mut b = BlockingChannel::new(Script::new(vec![bytes]), 1024);
    assert!(matches!(b.recv::<Up>(), Err(WireError::Garbage(_))));
}

#[tokio::test]
async fn valid_msgpack_of_the_wrong_shape_is_garbage() {
    let body = rmp_serde::to_vec(&("not", "a", "message")).unwrap();
    let mut bytes = frame_header(body.len()).unwrap().to_vec();
    bytes.extend_from_slice(&body);
    let mut ch = channel(Script::new(vec![bytes]), 1024);
    assert!(matches!(ch.recv::<Up>().await, Err(WireError::Garbage(_))));
}

#[tokio::test]
async fn eof_mid_frame_is_truncated() {
    let bytes = framed(&ready());
    for cut in [1, 3, 4, bytes.len() - 1] {
        let mut ch = channel(Script::new(vec![bytes[..cut].to_vec()]), 1024);
        let got = ch.recv::<Up>().await;
        assert!(
            matches!(got, Err(WireError::Truncated)),
            "cut {cut}: {got:?}"
        );
        let mut b = BlockingChannel::new(Script::new(vec![bytes[..cut].to_vec()]), 1024);
        let got = b.recv::<Up>();
        assert!(
            matches!(got, Err(WireError::Truncated)),
            "cut {cut}: {got:?}"
        );
    }
}

#[test]
fn a_large_frame_arriving_in_pieces_reads_whole_or_truncated() {
    // Past 64 KiB left to read, the blocking reader takes the rest of the frame in one go.
    let big = Up::Refused {
        reason: "x".repeat(300_000),
    };
    let bytes = framed(&big);
    let pieces = |upto: usize| {
        let b = &bytes[..upto];
        vec![
            b[..10].to_vec(),
            b[10..100_000].to_vec(),
            b[100_000..].to_vec(),
        ]
    };
    let mut b = BlockingChannel::new(Script::new(pieces(bytes.len())), 1 << 20);
    match b.recv::<Up>() {
        Ok(Some(Up::Refused { reason })) => assert_eq!(reason.len(), 300_000),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(b.recv::<Up>(), Ok(None)));
    let mut b = BlockingChannel::new(Script::new(pieces(bytes.len() - 1)), 1 << 20);
    let got = b.recv::<Up>();
    assert!(matches!(got, Err(WireError::Truncated)), "{got:?}");
}

#[tokio::test]
async fn sent_frames_read_back() {
    let (a, b) = tokio::io::duplex(64);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let mut tx = Channel::new(ar, aw, 1 << 20);
    let mut rx = Channel::new(br, bw, 1 << 20);
    let big = serde_bytes::ByteBuf::from(vec![7u8; 100_000]);
    let send = tokio::spawn(async move {
        tx.send_all(&[Up::Done {
            id: 9,
            outcome: Outcome::Value(big),
        }])
        .await
        .unwrap();
        tx
    });
    match rx.recv::<Up>().await {
        Ok(Some(Up::Done {
            id: 9,
            outcome: Outcome::Value(v),
        })) => assert_eq!(v.len(), 100_000),
        other => panic!("unexpected {other:?}"),
    }
    drop(send.await.unwrap());
    assert!(matches!(rx.recv::<Up>().await, Ok(None)));
}

#[test]
fn user_values_keep_flatten_and_internal_tags() {
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Inner {
        b: u32,
    }
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Outer {
        a: String,
        #[serde(flatten)]
        inner: Inner,
    }
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    #[serde(tag = "kind")]
    enum Shape {
        Circle { r: f64 },
        Square { side: u8 },
    }
    let v = (
        Outer {
            a: "x".into(),
            inner: Inner { b: 3 },
        },
        vec![Shape::Circle { r: 1.5 }, Shape::Square { side: 2 }],
    );
    let bytes = encode_value(&v).unwrap();
    let back: (Outer, Vec<Shape>) = decode_value(&bytes).unwrap();
    assert_eq!(back, v);
}

#[test]
fn borrowed_run_frame_decodes_as_down_run() {
    for args in [vec![1, 2, 3], vec![], vec![9; 70_000]] {
        run_frame_head_then_args_is_down_run(&args);
    }
}

fn run_frame_head_then_args_is_down_run(sent: &[u8]) {
    let mut framed = BytesMut::from(&b"already queued"[..]);
    assert!(run_frame_head(
        &mut framed,
        7,
        0x1234,
        "crate::doubler",
        sent.len()
    ));
    framed.extend_from_slice(sent);
    let frame = framed.split_off(14);
    let body = &frame[4..];
    assert_eq!(
        frame[..4],
        frame_header(body.len()).unwrap(),
        "length header"
    );
    match from_frame::<Down>(body) {
        Ok(Down::Run(Run {
            id: 7,
            target: 0x1234,
            target_name,
            args,
        })) => {
            assert_eq!(target_name, "crate::doubler");
            assert_eq!(args.as_ref(), sent);
        }
        other => panic!("unexpected {other:?}"),
    }
    let owned = to_frame(&Down::Run(Run {
        id: 7,
        target: 0x1234,
        target_name: "crate::doubler".into(),
        args: serde_bytes::ByteBuf::from(sent.to_vec()),
    }));
    assert_eq!(body, &owned[..], "same bytes as the owned message");
}

#[test]
fn a_message_larger_than_a_frame_is_refused_and_leaves_nothing_queued() {
    use super::blocking::BlockingWriter;
    let mut out = Vec::new();
    let mut w = BlockingWriter::new(&mut out, 64);
    let big = Up::Refused {
        reason: "x".repeat(100),
    };
    assert!(w.feed(&big).is_err());
    w.feed(&ready()).unwrap();
    w.flush().unwrap();
    drop(w);
    assert_eq!(
        out,
        framed(&ready()),
        "only the message that fits is written"
    );
}

#[test]
fn frame_lengths_are_checked_never_truncated() {
    assert_eq!(frame_header(0), Some([0, 0, 0, 0]));
    assert_eq!(
        frame_header(DEFAULT_MAX_FRAME),
        Some(u32::try_from(DEFAULT_MAX_FRAME).unwrap().to_be_bytes())
    );
    assert_eq!(frame_header(DEFAULT_MAX_FRAME + 1), None);
    // 4 GiB + 5 would wrap to 5 in a `u32`: refused instead.
    assert_eq!(frame_header((4usize << 30) + 5), None);
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert!(!run_frame_head(&mut buf, 1, 2, "t", (4usize << 30) + 5));
    assert!(!run_frame_head(&mut buf, 1, 2, "t", DEFAULT_MAX_FRAME));
    assert_eq!(
        &buf[..],
        b"keep",
        "nothing of a refused frame is left behind"
    );
}

#[test]
fn a_header_alone_reserves_room_for_what_arrived_not_for_what_it_announces() {
    let mut c = codec(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::from(&[0x3f, 0xff, 0xff, 0xff][..]);
    assert!(c.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() <= 2 * GROW_FROM,
        "reserved {}",
        buf.capacity()
    );
    // As bytes arrive, room grows with them (about twice what is there, at most).
    buf.extend_from_slice(&vec![7u8; 1 << 20]);
    assert!(c.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() <= 4 << 20, "reserved {}", buf.capacity());
    // A complete frame still decodes, and a stream ending inside one is truncation.
    let mut c = codec(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::from(&[0, 0, 0, 2, 1, 2, 0, 0][..]);
    assert_eq!(&c.decode(&mut buf).unwrap().unwrap()[..], &[1, 2]);
    assert!(c.decode(&mut buf).unwrap().is_none());
    assert!(
        c.decode_eof(&mut buf).is_err(),
        "ended after a partial header"
    );
    let mut c = codec(16);
    let mut buf = BytesMut::from(&[0, 0, 0, 17][..]);
    let e = c.decode(&mut buf).unwrap_err();
    assert!(matches!(
        WireError::from_codec(e, 16),
        WireError::Oversize { max: 16 }
    ));
}

/// Options and units as `encode_value` and `decode_value` carry them (see `wire::nil`).
mod options {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Unit;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Wrap(Option<u8>);

    /// A unit variant of an untagged enum is written as nil, like `()`.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    #[serde(untagged)]
    enum Loose {
        Nothing,
        Number(u8),
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Nested {
        field: Option<Option<u8>>,
        list: Vec<Option<Option<u8>>>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Flat {
        a: u8,
        #[serde(flatten)]
        rest: Nested,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    #[serde(tag = "kind")]
    enum Tagged {
        One { o: Option<Option<u8>> },
    }

    /// `v` after the trip, and checks that its bytes are rmp-serde's own.
    fn trip<T: Serialize + DeserializeOwned>(v: &T) -> T {
        let bytes = encode_value(v).expect("encodes");
        assert_eq!(
            bytes,
            rmp_serde::to_vec_named(v).unwrap(),
            "rmp-serde's bytes"
        );
        decode_value(&bytes).expect("decodes")
    }

    #[test]
    fn options_and_units_that_encode_apart_from_none_cross_unchanged() {
        let () = trip(&());
        assert_eq!(trip(&Unit), Unit);
        assert_eq!(trip(&Some(Unit)), Some(Unit));
        assert_eq!(trip(&Some(Some(Unit))), Some(Some(Unit)));
        assert_eq!(trip(&None::<()>), None);
        assert_eq!(trip(&None::<Option<u8>>), None);
        assert_eq!(trip(&Some(Some(5u8))), Some(Some(5)));
        assert_eq!(trip(&Some(Some(Some(0u8)))), Some(Some(Some(0))));
        assert_eq!(trip(&Some(Wrap(Some(3)))), Some(Wrap(Some(3))));
        assert_eq!(trip(&Wrap(None)), Wrap(None));
        assert_eq!(trip(&Some(Loose::Number(2))), Some(Loose::Number(2)));
        assert_eq!(trip(&Loose::Nothing), Loose::Nothing);
        let n = Nested {
            field: Some(Some(1)),
            list: vec![None, Some(Some(2))],
        };
        assert_eq!(trip(&n), n);
        let f = Flat {
            a: 1,
            rest: Nested {
                field: None,
                list: vec![],
            },
        };
        assert_eq!(trip(&f), f);
    }

    /// The reason `encode_value` gives for `v`, which must be refused.
    fn refused<T: Serialize>(v: &T) -> String {
        let reason = encode_value(v).expect_err("refused");
        assert!(reason.contains("the same bytes as `None`"), "{reason}");
        reason
    }

    #[test]
    fn a_some_that_would_arrive_as_none_is_refused_naming_the_type_inside() {
        assert!(refused(&Some(None::<u8>)).contains("`core::option::Option<u8>`"));
        assert!(refused(&Some(Some(None::<u8>))).contains("`core::option::Option<u8>`"));
        assert!(refused(&Some(())).contains("`()`"));
        assert!(refused(&Some(Some(()))).contains("`()`"));
        assert!(refused(&Some(Wrap(None))).contains("Wrap`"));
        assert!(refused(&Some(Loose::Nothing)).contains("Loose`"));
        refused(&Nested {
            field: Some(None),
            list: vec![],
        });
        refused(&Nested {
            field: None,
            list: vec![Some(Some(1)), Some(None)],
        });
        refused(&(1u8, Some(None::<u8>)));
        refused(&std::collections::BTreeMap::from([(1u8, Some(()))]));
        refused(&std::collections::BTreeMap::from([(Some(None::<u8>), 1u8)]));
        refused(&Flat {
            a: 1,
            rest: Nested {
                field: Some(None),
                list: vec![],
            },
        });
        refused(&Tagged::One { o: Some(None) });
        // And in the other writers of values.
        let mut buf = vec![7];
        assert!(encode_value_into(&mut buf, &Some(())).is_err());
        let mut w = chunk::ChunkWriter::new::<Option<Option<u8>>>(0);
        w.push(&Some(Some(1u8))).unwrap();
        assert!(w.push(&Some(None::<u8>)).is_err());
    }
}
