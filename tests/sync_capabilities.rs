//! A handle opens its own object and nothing else: object ids are a counter, but each
//! object has a random key, the capability a process must show its owner.

mod support;

use procpool::{Error, Queue};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// How a handle travels (procpool's private wire layout, mirrored to forge one).
#[derive(Serialize, Deserialize)]
struct HubRef {
    name: String,
    token: u64,
}

#[derive(Serialize, Deserialize)]
struct HandleWire {
    hub: HubRef,
    obj: u64,
    key: u64,
    cap: Option<u64>,
    ticket: u64,
}

/// Uses a real handle, then one forged from it to name another object.
fn use_both(legit: Queue<String>, forged: ByteBuf) -> (String, String) {
    let forged: Queue<String> = rmp_serde::from_slice(&forged).expect("well-formed");
    (
        format!("{:?}", legit.try_get()),
        format!("{:?}", forged.try_get()),
    )
}

#[tokio::test]
async fn a_handle_forged_from_another_opens_nothing() {
    let mine: Queue<String> = Queue::new();
    let secret: Queue<String> = Queue::new();
    mine.put("mine".into()).await.unwrap();
    secret.put("secret".into()).await.unwrap();
    // What a child holding `mine` can learn: its hub, token, id and key; the other
    // queue's id is the next number (or any number: ids are a counter).
    let wire: HandleWire = rmp_serde::from_slice(&rmp_serde::to_vec(&mine).unwrap()).unwrap();
    let other: HandleWire = rmp_serde::from_slice(&rmp_serde::to_vec(&secret).unwrap()).unwrap();
    assert_ne!(wire.key, other.key);
    let forged = HandleWire {
        obj: other.obj,
        ticket: 0,
        ..wire
    };
    let forged = ByteBuf::from(rmp_serde::to_vec(&forged).unwrap());
    let mut child = procpool::spawn(use_both, (mine.clone(), forged))
        .await
        .unwrap();
    let (legit, forged) = support::soon(child.join()).await.unwrap();
    assert_eq!(legit, r#"Ok(Some("mine"))"#);
    assert_eq!(
        forged,
        format!("{:?}", Err::<Option<String>, _>(Error::Closed))
    );
    assert_eq!(secret.len(), 1, "the secret was not taken");
}
