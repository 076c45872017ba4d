//! Unit tests of the hub's framing, tables and keys.

use super::*;
use crate::sync::queue::QueueCore;

#[test]
fn frames_decode_with_the_channel_codec() {
    let mut buf = BytesMut::new();
    assert!(frame_into(
        &mut buf,
        &ToHub::Puts {
            obj: 7,
            items: vec![ByteBuf::from(vec![1, 2, 3]), ByteBuf::new()],
        },
    ));
    let body = read_frame(&buf[..]).unwrap();
    match wire::from_frame::<ToHub>(&body).unwrap() {
        ToHub::Puts { obj: 7, items } => {
            assert_eq!(items, vec![ByteBuf::from(vec![1, 2, 3]), ByteBuf::new()])
        }
        other => panic!("decoded {other:?}"),
    }
}

#[test]
fn puts_and_acks_keep_their_order_with_other_frames() {
    let out = Outbox::new();
    assert!(out.push_put(1, vec![1]));
    assert!(out.push_put(1, vec![2]));
    out.push_ack(2, 5);
    assert!(out.push(&ToHub::Forget { obj: 2 }));
    let mut st = lock(&out.st);
    st.flush();
    let mut rest = &st.buf[..];
    let mut got = Vec::new();
    while !rest.is_empty() {
        let body = read_frame(&mut rest).unwrap();
        got.push(format!("{:?}", wire::from_frame::<ToHub>(&body).unwrap()));
    }
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0].starts_with("Puts { obj: 1"), "{got:?}");
    assert!(got[1].starts_with("Ack { obj: 2, upto: 5"), "{got:?}");
    assert!(got[2].starts_with("Forget { obj: 2"), "{got:?}");
}

#[test]
fn an_object_or_a_pipe_end_opens_only_with_its_key() {
    let h = hub().unwrap();
    let core = QueueCore::new(None);
    let id = core.id;
    let obj: Obj = core;
    let key = h.register(id, &obj).unwrap();
    assert_eq!(h.register(id, &obj).unwrap(), key, "one key per object");
    assert!(h.find(id, Kind::Queue, key).is_some());
    assert!(
        h.find(id, Kind::Queue, key ^ 1).is_none(),
        "a wrong key opens nothing"
    );
    assert!(h.find(id, Kind::Lock, key).is_none(), "nor a wrong kind");
    let other_core = QueueCore::new(None);
    let other_id = other_core.id;
    let other: Obj = other_core;
    h.register(other_id, &other).unwrap();
    assert!(
        h.find(other_id, Kind::Queue, key).is_none(),
        "a key opens one object"
    );
    drop(obj);
    assert!(
        h.find(id, Kind::Queue, key).is_none(),
        "a dropped object is gone"
    );
    assert!(!lock(&h.objects).contains_key(&id), "and forgotten at once");

    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (export, key) = h.export(a.into()).unwrap();
    assert!(h.take_export(export, key ^ 1).is_none());
    assert!(h.take_export(export + 1, key).is_none());
    assert!(h.take_export(export, key).is_some());
    assert!(h.take_export(export, key).is_none(), "claimed once");
}

#[test]
fn a_late_lower_acknowledgement_does_not_undo_a_higher_one() {
    // Two threads handing out items 6 and 5 of one queue may report them 6, then 5.
    let out = Outbox::new();
    out.push_ack(1, 6);
    out.push_ack(1, 5);
    let mut st = lock(&out.st);
    st.flush();
    let body = read_frame(&st.buf[..]).unwrap();
    match wire::from_frame::<ToHub>(&body).unwrap() {
        ToHub::Ack { obj: 1, upto } => assert_eq!(upto, 6),
        other => panic!("decoded {other:?}"),
    }
}

#[test]
fn an_unauthenticated_connection_announcing_a_large_frame_is_dropped_at_once() {
    use std::io::Read;
    let h = hub().unwrap();
    let mut sock = h.me.connect().unwrap();
    // Just under the frame limit, so only the Hello's own cap refuses it.
    sock.write_all(&[0x3f, 0xff, 0xff, 0xff]).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut byte = [0u8; 1];
    match sock.read(&mut byte) {
        Ok(0) => {}
        other => panic!("the hub kept the connection: {other:?}"),
    }
}

/// Reads one frame in blocking mode (tests of the framing use it).
pub(crate) fn read_frame(mut r: impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[tokio::test(flavor = "current_thread")]
async fn a_spinning_session_reader_reads_what_comes_and_the_end() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let (rd, _wr) = a.into_split();
    let mut rd = SpinRead::new(rd);
    rd.spin();
    let mut b = b;
    b.write_all(b"first").await.unwrap();
    let mut got = [0u8; 5];
    rd.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"first");
    // Now it looks at the socket itself: what comes next, then the end.
    b.write_all(b"second").await.unwrap();
    let mut got = [0u8; 6];
    rd.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"second");
    // Data that comes after the look has ended (tokio's readiness again, stale: the
    // looks read past it), then the end.
    let late = tokio::spawn(async move {
        tokio::time::sleep(super::direct::SPIN * 20).await;
        b.write_all(b"late").await.unwrap();
        b
    });
    let mut got = [0u8; 4];
    rd.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"late");
    drop(late.await.unwrap());
    let mut rest = Vec::new();
    assert_eq!(rd.read_to_end(&mut rest).await.unwrap(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_spinning_session_reader_reads_a_large_frame_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
    let (rd, _wr) = a.into_split();
    let mut rd = SpinRead::new(rd);
    rd.spin();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let writer = tokio::spawn({
        let big = big.clone();
        async move {
            b.write_all(&big).await.unwrap();
        }
    });
    let mut got = vec![0u8; big.len()];
    rd.read_exact(&mut got).await.unwrap();
    writer.await.unwrap();
    assert!(got == big, "the bytes arrived changed");
}
