//! A global `tracing` subscriber for a test binary that keeps every event it sees, with
//! the fields procpool puts on events forwarded from children.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Mutex, OnceLock};

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub level: String,
    pub target: String,
    pub process: String,
    pub pid: u64,
    pub child_target: String,
    pub fields: String,
    pub message: String,
    /// The `dropped` field of a warning that events were dropped.
    pub dropped: u64,
    /// The name of the span the event was emitted in, if any.
    pub span: Option<&'static str>,
}

impl Visit for Captured {
    fn record_u64(&mut self, f: &Field, v: u64) {
        match f.name() {
            "pid" => self.pid = v,
            "dropped" => self.dropped = v,
            _ => {}
        }
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.set(f.name(), v.to_owned());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.set(f.name(), format!("{v:?}"));
    }
}

impl Captured {
    fn set(&mut self, name: &str, v: String) {
        match name {
            "process" => self.process = v,
            "child_target" => self.child_target = v,
            "fields" => self.fields = v,
            "message" => self.message = v,
            _ => {}
        }
    }
}

static EVENTS: Mutex<Vec<Captured>> = Mutex::new(Vec::new());

struct Capture;
impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_event(&self, e: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut c = Captured {
            level: e.metadata().level().to_string(),
            target: e.metadata().target().to_owned(),
            span: ctx.event_span(e).map(|s| s.name()),
            ..Captured::default()
        };
        e.record(&mut c);
        EVENTS.lock().unwrap().push(c);
    }
}

/// Installs the one global subscriber of this test binary, at INFO (once).
pub fn capture() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let sub = tracing_subscriber::registry()
            .with(Capture.with_filter(tracing_subscriber::filter::LevelFilter::INFO));
        tracing::subscriber::set_global_default(sub).expect("first subscriber");
    });
}

/// The events seen so far for which `f` holds, in order.
pub fn events_where(f: impl Fn(&Captured) -> bool) -> Vec<Captured> {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .filter(|c| f(c))
        .cloned()
        .collect()
}

/// The events seen so far from process `process`.
pub fn events_of(process: &str) -> Vec<Captured> {
    events_where(|c| c.process == process)
}
