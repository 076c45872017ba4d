//! Logging across processes: a child's `tracing` events are forwarded to its parent and
//! emitted there; [`log_to_stderr`] prints them the way Python's `log_to_stderr` does.
//!
//! # How events travel
//!
//! If the parent's subscriber is [`log_to_stderr`]'s, a child prints its events itself in
//! the same format (program order with its own output, as in Python). Otherwise, in a
//! child, procpool installs a subscriber whose only layer encodes each event
//! (level, target, message, other fields) and writes it on the child's channel at once,
//! under the same lock as results: an event is on the wire before the call that emitted
//! it returns, so events emitted just before a child exits, aborts or panics are not
//! lost, and one child's events keep their order. The child's level is the parent's
//! ([`LevelFilter::current`] when the child starts): disabled events cost nothing there.
//!
//! In the parent, each forwarded event is emitted again with target `procpool::child`
//! and these fields, so whatever subscriber the parent installed (fmt, JSON,
//! OpenTelemetry) sees it:
//!
//! | field | value |
//! |---|---|
//! | `process` | the child's name (`Process-1`, `PoolWorker-2`) |
//! | `pid` | the child's pid |
//! | `child_target` | the event's target in the child (its module path) |
//! | `fields` | the event's other fields, `key=value` separated by spaces (only if any) |
//! | `message` | the event's message |
//!
//! A target that installs its own global subscriber in a child fails to (one is already
//! set); it should emit events and let the parent decide where they go.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::error::{Error, Result};
use crate::wire::{LogRecord, Outbox, Up};

#[cfg(feature = "redis")]
pub(crate) mod capture;

/// Set by [`log_to_stderr`]: children then print their events themselves, in the same
/// format, so their lines keep program order with their own stdout (as in Python).
static STDERR_FORMAT: AtomicBool = AtomicBool::new(false);

/// Whether children should print events to stderr themselves (see [`log_to_stderr`]).
pub(crate) fn children_print() -> bool {
    STDERR_FORMAT.load(Ordering::Relaxed)
}

/// The level the parent passes to a child: 0 = off, 1 = ERROR .. 5 = TRACE.
pub(crate) fn current_level() -> u8 {
    match LevelFilter::current().into_level() {
        None => 0,
        Some(l) => level_to_u8(l),
    }
}

fn level_to_u8(level: Level) -> u8 {
    match level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

fn filter_of(level: u8) -> LevelFilter {
    match level {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// Collects an event's message and other fields as text.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    /// Set on events forwarded from a child.
    process: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "process" => self.process = Some(value.to_owned()),
            "fields" => self.push_raw(value),
            "pid" | "child_target" => {}
            name => self.push(name, format_args!("{value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => {
                // Writing into a String cannot fail.
                write!(self.message, "{value:?}").ok();
            }
            "process" => self.process = Some(format!("{value:?}")),
            "fields" => self.push_raw(&format!("{value:?}")),
            "pid" | "child_target" => {}
            name => self.push(name, format_args!("{value:?}")),
        }
    }
}

impl Fields {
    fn push(&mut self, name: &str, value: fmt::Arguments<'_>) {
        if !self.rest.is_empty() {
            self.rest.push(' ');
        }
        write!(self.rest, "{name}={value}").ok();
    }

    fn push_raw(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.rest.is_empty() {
            self.rest.push(' ');
        }
        self.rest.push_str(text);
    }
}

// ------------------------------------------------------------------------- child

/// The pool task this child runs, [`NO_TASK`] between tasks.
static TASK: AtomicU64 = AtomicU64::new(NO_TASK);
const NO_TASK: u64 = u64::MAX;

/// In a pool worker: the task it runs from here on (`None`: none), which its events
/// carry.
pub(crate) fn set_task(id: Option<u64>) {
    TASK.store(id.unwrap_or(NO_TASK), Ordering::Relaxed);
}

fn current_task() -> Option<u64> {
    let id = TASK.load(Ordering::Relaxed);
    (id != NO_TASK).then_some(id)
}

/// The child's layer: every event goes to the parent.
struct Forward {
    outbox: Outbox,
}

impl<S: Subscriber> Layer<S> for Forward {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let meta = event.metadata();
        let record = LogRecord {
            level: level_to_u8(*meta.level()),
            target: meta.target().to_owned(),
            message: f.message,
            fields: f.rest,
            task: current_task(),
        };
        // Fails only if the parent is gone, and then this child is about to exit too.
        self.outbox.send(&Up::Log(record)).ok();
    }
}

/// Installs forwarding in a child, at the parent's level; or, if the parent's subscriber
/// is [`log_to_stderr`]'s, the same printer here.
pub(crate) fn install_forwarding(level: u8, print_here: bool, outbox: Outbox) {
    let set = if print_here {
        tracing::subscriber::set_global_default(python_format_subscriber(filter_of(level)))
    } else {
        let subscriber =
            tracing_subscriber::registry().with(Forward { outbox }.with_filter(filter_of(level)));
        tracing::subscriber::set_global_default(subscriber)
    };
    if set.is_err() {
        eprintln!(
            "procpool: a tracing subscriber was already set in this child; its events stay here"
        );
    }
}

// ------------------------------------------------------------------------ parent

/// Emits an event forwarded by child `name` (pid `pid`) in this process.
pub(crate) fn reemit(name: &str, pid: u32, r: &LogRecord) {
    macro_rules! emit {
        ($level:expr) => {
            if r.fields.is_empty() {
                tracing::event!(target: "procpool::child", $level, process = name, pid,
                    child_target = %r.target, "{}", r.message)
            } else {
                tracing::event!(target: "procpool::child", $level, process = name, pid,
                    child_target = %r.target, fields = %r.fields, "{}", r.message)
            }
        };
    }
    match r.level {
        1 => emit!(Level::ERROR),
        2 => emit!(Level::WARN),
        3 => emit!(Level::INFO),
        4 => emit!(Level::DEBUG),
        _ => emit!(Level::TRACE),
    }
}

/// Prints every event at `level` or above to stderr, one line each, as Python's
/// `multiprocessing.log_to_stderr()` does: `[INFO/MainProcess] message` for this
/// process, `[INFO/Process-1] message` for events forwarded from a child.
///
/// Installs a global `tracing` subscriber. Children inherit it: they print their events at
/// `level` or above to the shared stderr themselves, in the same format, so a child's
/// lines keep program order with its own output (as in Python). Under any other
/// subscriber, children's events are forwarded to this process instead.
///
/// ```
/// procpool::log_to_stderr(tracing::Level::INFO).expect("no other subscriber yet");
/// tracing::info!("starting");   // prints: [INFO/MainProcess] starting
/// ```
///
/// # Errors
///
/// [`Error::InvalidConfig`] if a global subscriber is already set (nothing changes).
pub fn log_to_stderr(level: Level) -> Result<()> {
    let subscriber = python_format_subscriber(LevelFilter::from_level(level));
    tracing::subscriber::set_global_default(subscriber).map_err(|e| Error::InvalidConfig {
        reason: format!("log_to_stderr: {e}"),
    })?;
    STDERR_FORMAT.store(true, Ordering::Relaxed);
    Ok(())
}

fn python_format_subscriber(level: LevelFilter) -> impl Subscriber + Send + Sync {
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(PythonFormat)
        .finish()
}

/// `[LEVEL/process] message key=value ...`
struct PythonFormat;

impl<S, N> FormatEvent<S, N> for PythonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        let name = f
            .process
            .unwrap_or_else(|| crate::current_process().name().to_owned());
        write!(
            writer,
            "[{}/{name}] {}",
            event.metadata().level(),
            f.message
        )?;
        if !f.rest.is_empty() {
            write!(writer, " {}", f.rest)?;
        }
        writeln!(writer)
    }
}
