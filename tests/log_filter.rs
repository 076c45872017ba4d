//! A child's events keep their own target and level in the parent, so filters written
//! for the parent's own events (`EnvFilter` directives such as `myapp=debug`) select
//! them the same way; records of the `log` crate in a child arrive as events too.

mod support;

use std::sync::Mutex;

use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{EnvFilter, Layer};

/// (which layer, target, level, message) of every event a layer let through.
static SEEN: Mutex<Vec<(&'static str, String, String, String)>> = Mutex::new(Vec::new());

struct Record(&'static str);

impl<S: Subscriber> Layer<S> for Record {
    fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        e.record(&mut m);
        let meta = e.metadata();
        SEEN.lock().unwrap().push((
            self.0,
            meta.target().to_owned(),
            meta.level().to_string(),
            m.0,
        ));
    }
}

fn work() -> u8 {
    tracing::debug!(target: "myapp::work", "working");
    tracing::info!(target: "myapp::work", "done");
    tracing::debug!(target: "other", "noise");
    log::info!(target: "myapp::legacy", "from the log crate");
    log::debug!(target: "myapp::legacy", "a log debug record");
    1
}

#[tokio::test]
async fn a_childs_events_pass_the_parents_env_filter_by_their_own_target_and_level() {
    let debug = Record("myapp=debug").with_filter(EnvFilter::new("myapp=debug"));
    let info = Record("myapp=info").with_filter(EnvFilter::new("myapp=info"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(debug).with(info))
        .expect("the only subscriber of this test binary");
    let mut p = procpool::spawn(work, ()).await.unwrap();
    assert_eq!(support::soon(p.join()).await.unwrap(), 1);
    let seen = SEEN.lock().unwrap().clone();
    let of = |layer: &str| -> Vec<(String, String, String)> {
        seen.iter()
            .filter(|s| s.0 == layer && s.3 != "child process calling self.run()")
            .filter(|s| s.1.starts_with("myapp") || s.1 == "other")
            .map(|s| (s.1.clone(), s.2.clone(), s.3.clone()))
            .collect()
    };
    let row = |l: &str, m: &str| ("myapp::work".to_owned(), l.to_owned(), m.to_owned());
    let log = |l: &str, m: &str| ("myapp::legacy".to_owned(), l.to_owned(), m.to_owned());
    assert_eq!(
        of("myapp=debug"),
        [
            row("DEBUG", "working"),
            row("INFO", "done"),
            log("INFO", "from the log crate"),
            log("DEBUG", "a log debug record")
        ],
        "{seen:?}"
    );
    assert_eq!(
        of("myapp=info"),
        [row("INFO", "done"), log("INFO", "from the log crate")],
        "{seen:?}"
    );
}
