//! Cost of forwarding a child's `tracing` events to the parent: one child emitting
//! 20,000 INFO events, with the parent's subscriber at INFO (every event crosses and is
//! re-emitted into a layer that drops it) and at OFF (events disabled in the child: the
//! same process, no forwarding), measured in the same run.
//!
//! ```text
//! cargo bench --bench logging
//! ```

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;

const EVENTS: u32 = 20_000;

fn chatty(n: u32) -> u32 {
    for i in 0..n {
        tracing::info!(seq = i, "event {i}");
    }
    n
}

/// A layer that accepts every event and drops it: the parent's cost is only procpool's.
struct Sink;
impl<S: tracing::Subscriber> Layer<S> for Sink {}

fn logging(c: &mut Criterion) {
    let (filter, handle) = reload::Layer::new(LevelFilter::INFO);
    let subscriber = tracing_subscriber::registry().with(Sink.with_filter(filter));
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let run = || {
        rt.block_on(async {
            let mut p = procpool::Process::new(chatty, (EVENTS,));
            p.start().await.expect("start");
            p.join().await.expect("join")
        })
    };
    let mut g = c.benchmark_group("logging");
    g.sample_size(10);
    g.throughput(Throughput::Elements(u64::from(EVENTS)));
    handle.modify(|f| *f = LevelFilter::OFF).expect("reload");
    g.bench_function("baseline: 20k events disabled (level OFF)", |b| b.iter(run));
    handle.modify(|f| *f = LevelFilter::INFO).expect("reload");
    g.bench_function("20k events forwarded (level INFO)", |b| b.iter(run));
    g.finish();
}

criterion_group!(benches, logging);
criterion_main!(benches);
