//! `pipe()` across real processes: both directions, message boundaries, 16 MiB, poll,
//! and end-of-stream when the peer is dropped or its process dies.

mod support;

use std::time::{Duration, Instant};

use procpool::{Connection, Error, Event, pipe};
use serde_bytes::ByteBuf;
use support::{SOON, hangs, soon};

/// Echoes every message back until the other end goes away; returns how many.
fn echo(conn: Connection<ByteBuf>) -> usize {
    let mut n = 0;
    while let Ok(msg) = conn.blocking_recv() {
        conn.blocking_send(msg).unwrap();
        n += 1;
    }
    n
}

async fn echo_async(conn: Connection<ByteBuf>) -> usize {
    let mut n = 0;
    while let Ok(msg) = conn.recv().await {
        conn.send(msg).await.unwrap();
        n += 1;
    }
    n
}

#[tokio::test]
async fn messages_keep_their_boundaries_both_ways_including_empty_and_16_mib() {
    for (name, sync) in [("blocking", true), ("async", false)] {
        let (here, there) = pipe::<ByteBuf>();
        let mut child = if sync {
            procpool::spawn(echo, (there,)).await.unwrap()
        } else {
            procpool::spawn(echo_async, (there,)).await.unwrap()
        };
        let big: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
        let msgs = vec![
            ByteBuf::new(),
            ByteBuf::from(b"a".to_vec()),
            ByteBuf::new(),
            ByteBuf::from(big),
            ByteBuf::from(b"last".to_vec()),
        ];
        for m in &msgs {
            here.send(m.clone()).await.unwrap();
        }
        for m in &msgs {
            let back = soon(here.recv()).await.unwrap();
            assert_eq!(back.len(), m.len(), "{name}");
            assert!(back == *m, "{name}: a message changed on the way");
        }
        drop(here);
        assert_eq!(child.join().await.unwrap(), msgs.len(), "{name}");
    }
}

fn send_then_hang(conn: Connection<String>, sent: Event) {
    conn.blocking_send("before dying".to_owned()).unwrap();
    sent.set().unwrap();
    hangs();
}

#[tokio::test]
async fn recv_gives_closed_once_the_peer_process_is_killed() {
    let (here, there) = pipe::<String>();
    let sent = Event::new();
    let mut child = procpool::spawn(send_then_hang, (there, sent.clone()))
        .await
        .unwrap();
    soon(sent.wait()).await.unwrap();
    child.kill().unwrap();
    // What it sent before dying still arrives, then the end.
    assert_eq!(here.recv().await.unwrap(), "before dying");
    let end = soon(here.recv()).await;
    assert!(matches!(end, Err(Error::Closed)), "{end:?}");
    assert!(matches!(
        here.send("anyone?".into()).await,
        Err(Error::Closed)
    ));
    assert!(matches!(child.join().await, Err(Error::WorkerDied { .. })));
}

fn send_and_return(conn: Connection<String>) {
    conn.blocking_send("bye".to_owned()).unwrap();
}

#[tokio::test]
async fn recv_gives_closed_once_the_peer_is_dropped() {
    let (here, there) = pipe::<String>();
    let mut child = procpool::spawn(send_and_return, (there,)).await.unwrap();
    child.join().await.unwrap();
    assert_eq!(here.blocking_recv().unwrap(), "bye");
    assert!(matches!(here.blocking_recv(), Err(Error::Closed)));

    // Both ends in one process, too.
    let (a, b) = pipe::<u8>();
    a.send(1).await.unwrap();
    drop(a);
    assert_eq!(b.recv().await.unwrap(), 1);
    assert!(matches!(b.recv().await, Err(Error::Closed)));
}

/// Waits for `go`, then sends one message.
fn send_on(conn: Connection<u32>, go: Event) {
    go.blocking_wait().unwrap();
    conn.blocking_send(7).unwrap();
}

#[tokio::test]
async fn poll_waits_at_most_its_duration() {
    let (here, there) = pipe::<u32>();
    let go = Event::new();
    let mut child = procpool::spawn(send_on, (there, go.clone())).await.unwrap();
    assert!(
        !here.poll(Duration::ZERO).await.unwrap(),
        "nothing to read yet"
    );
    let t = Instant::now();
    assert!(!here.poll(Duration::from_millis(200)).await.unwrap());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let t = Instant::now();
    assert!(!here.blocking_poll(Duration::from_millis(200)).unwrap());
    assert!(t.elapsed() >= Duration::from_millis(200));
    go.set().unwrap();
    assert!(here.poll(SOON).await.unwrap());
    assert!(
        here.blocking_poll(Duration::ZERO).unwrap(),
        "still there: poll takes nothing"
    );
    assert_eq!(here.recv().await.unwrap(), 7);
    child.join().await.unwrap();
}

fn sender(conn: Connection<String>, msgs: Vec<String>) {
    for m in msgs {
        conn.blocking_send(m).unwrap();
    }
}

fn receiver(conn: Connection<String>) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let m = conn.blocking_recv().unwrap();
        if m == "END" {
            return got;
        }
        got.push(m);
    }
}

#[tokio::test]
async fn both_ends_in_two_children_talk_directly() {
    let (a, b) = pipe::<String>();
    let msgs: Vec<String> = (0..1000)
        .map(|i| i.to_string())
        .chain(["END".into()])
        .collect();
    let mut s = procpool::spawn(sender, (a, msgs.clone())).await.unwrap();
    let mut r = procpool::spawn(receiver, (b,)).await.unwrap();
    s.join().await.unwrap();
    let got = soon(r.join()).await.unwrap();
    assert_eq!(got, msgs[..1000]);
}

#[tokio::test]
async fn a_message_that_is_not_a_t_is_a_decode_error() {
    let (a, b) = pipe::<String>();
    // Same socket, other type: the bytes are a number, not a string.
    let raw: Connection<u64> = serde_json_roundtrip(a);
    raw.send(5).await.unwrap();
    assert!(matches!(b.recv().await, Err(Error::Decode { .. })));
}

/// A `Connection<String>` reinterpreted as `Connection<u64>`, the way a mismatched
/// program would, through its serialized form.
fn serde_json_roundtrip(a: Connection<String>) -> Connection<u64> {
    let bytes = rmp_serde::to_vec(&a).unwrap();
    drop(a);
    rmp_serde::from_slice(&bytes).unwrap()
}
