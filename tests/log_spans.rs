//! A child's events are emitted in the parent inside the span that was current where its
//! task was submitted (or its `Process` started), so a request id on the caller's span
//! appears on its child's lines: checked with tracing-subscriber's JSON format, as a
//! service would log.

mod support;

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use procpool::{AsyncPool, Process};
use serde_json::Value;
use tracing::Instrument;

/// Every line the JSON subscriber wrote.
static OUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Lines;

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        OUT.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The JSON subscriber of this binary, installed once for all its tests.
fn json_subscriber() {
    static SET: OnceLock<()> = OnceLock::new();
    SET.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| Lines)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    });
}

/// The JSON lines of events whose message is `message`.
fn events(message: &str) -> Vec<Value> {
    let out = OUT.lock().unwrap().clone();
    String::from_utf8(out)
        .expect("utf-8 lines")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

/// The one event with `message`: its current span's `request_id`, or `None` if it has
/// no span, and the target it was emitted with.
fn span_of(message: &str) -> (Option<i64>, String) {
    let found = events(message);
    assert_eq!(found.len(), 1, "one event {message:?}: {found:?}");
    let e = &found[0];
    assert!(
        e["fields"]["process"]
            .as_str()
            .is_some_and(|p| p.contains("Worker") || p.starts_with("Process")),
        "emitted again from a child: {e}"
    );
    (
        e["span"]["request_id"].as_i64(),
        e["target"].as_str().unwrap_or_default().to_owned(),
    )
}

fn work(n: u32) -> u32 {
    tracing::info!(target: "myapp::work", "working on {n}");
    n
}

#[tokio::test]
async fn a_tasks_events_are_emitted_inside_the_span_it_was_submitted_in() {
    json_subscriber();
    let pool = AsyncPool::new(2).await.unwrap();
    // Awaited inside the span.
    let span = tracing::info_span!("request", request_id = 101);
    let got = pool.apply(work, (101,)).instrument(span).await.unwrap();
    assert_eq!(got, 101);
    // Submitted inside the span, awaited outside it.
    let handle = {
        let _in = tracing::info_span!("request", request_id = 102).entered();
        pool.apply_async(work, (102,))
    };
    assert_eq!(support::soon(handle).await.unwrap(), 102);
    // Submitted in no span: none.
    assert_eq!(support::soon(pool.apply(work, (103,))).await.unwrap(), 103);
    pool.close().await;

    assert_eq!(span_of("working on 101"), (Some(101), "myapp::work".into()));
    assert_eq!(span_of("working on 102"), (Some(102), "myapp::work".into()));
    assert_eq!(span_of("working on 103"), (None, "myapp::work".into()));
    let e = &events("working on 101")[0];
    assert_eq!(e["spans"][0]["name"], "request", "the span list: {e}");
}

#[tokio::test]
async fn tasks_of_different_spans_in_flight_together_keep_their_own() {
    json_subscriber();
    // One worker: the three tasks are queued on it together, and run one after another.
    let pool = AsyncPool::new(1).await.unwrap();
    let handles: Vec<_> = [201, 202, 203]
        .into_iter()
        .map(|n| {
            let _in = tracing::info_span!("request", request_id = n).entered();
            pool.apply_async(work, (n as u32,))
        })
        .collect();
    for (h, n) in handles.into_iter().zip([201, 202, 203]) {
        assert_eq!(support::soon(h).await.unwrap(), n);
    }
    pool.close().await;
    for n in [201, 202, 203] {
        assert_eq!(
            span_of(&format!("working on {n}")).0,
            Some(i64::from(n)),
            "task {n}"
        );
    }
}

#[tokio::test]
async fn every_chunk_of_a_map_is_emitted_inside_the_callers_span() {
    json_subscriber();
    let pool = AsyncPool::new(2).await.unwrap();
    let items: Vec<u32> = (300..310).collect();
    let span = tracing::info_span!("request", request_id = 300);
    let got = pool
        .map(work, items.clone())
        .chunksize(2)
        .instrument(span)
        .await
        .unwrap();
    assert_eq!(got, items);
    // map_async drives its map from a task of its own: still the caller's span.
    let handle = {
        let _in = tracing::info_span!("request", request_id = 310).entered();
        pool.map_async(work, (310..320u32).collect::<Vec<_>>())
    };
    assert_eq!(support::soon(handle).await.unwrap().len(), 10);
    pool.close().await;
    for n in 300..310 {
        assert_eq!(span_of(&format!("working on {n}")).0, Some(300), "item {n}");
    }
    for n in 310..320 {
        assert_eq!(span_of(&format!("working on {n}")).0, Some(310), "item {n}");
    }
}

#[tokio::test]
async fn a_process_events_are_emitted_inside_the_span_it_was_started_in() {
    json_subscriber();
    let mut p = Process::new(work, (401,));
    let span = tracing::info_span!("request", request_id = 401);
    p.start().instrument(span).await.unwrap();
    // Joined outside the span: the span is the one it was started in.
    assert_eq!(support::soon(p.join()).await.unwrap(), 401);
    assert_eq!(span_of("working on 401").0, Some(401));
}
