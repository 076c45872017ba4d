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
//! In the parent, each forwarded event is emitted again with its own target and level
//! (a callsite is made for each distinct pair, at most 1,024; past that, target
//! `procpool::child`) and these fields, so whatever subscriber and filter the parent
//! installed (fmt, JSON, OpenTelemetry, `EnvFilter`) sees it as it sees its own:
//!
//! | field | value |
//! |---|---|
//! | `process` | the child's name (`Process-1`, `PoolWorker-2`) |
//! | `pid` | the child's pid |
//! | `child_target` | the event's target in the child (its module path) |
//! | `fields` | the event's other fields, `key=value` separated by spaces (only if any) |
//! | `message` | the event's message |
//!
//! Each is emitted inside the span that was current where its task was submitted (for a
//! [`Process`](crate::Process), where it was started; for `map_async`, where it was
//! called), whichever thread reads it: a request id on the caller's span appears on its
//! child's lines, and span-based filters select them. The span stays open until the pool
//! is done with the task. A pool worker's events outside any task (its initializer's)
//! are emitted in no span.
//!
//! A target that installs its own global subscriber in a child fails to (one is already
//! set); it should emit events and let the parent decide where they go.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::error::{Error, Result};
use crate::wire::{LogRecord, Outbox, Up};

#[cfg(feature = "redis")]
pub(crate) mod capture;
mod spans;
pub(crate) use spans::{TaskSpan, of as span_of};

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
            // What `LogTracer` adds to a `log` record (its metadata, normalized above).
            n if n.starts_with("log.") => {}
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
            n if n.starts_with("log.") => {}
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
        use tracing_log::NormalizeEvent;
        let mut f = Fields::default();
        event.record(&mut f);
        // A record of the `log` crate (through `LogTracer`): its own target and level,
        // not `log`'s.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
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
    // Records of the `log` crate become events, and go the same way, at the same level.
    use tracing_log::log::LevelFilter as Log;
    let max = [
        Log::Off,
        Log::Error,
        Log::Warn,
        Log::Info,
        Log::Debug,
        Log::Trace,
    ];
    let max = max[usize::from(level.min(5))];
    if let Err(e) = tracing_log::LogTracer::builder().with_max_level(max).init() {
        tracing::debug!(
            "procpool: a `log` logger was already set in this child ({e}); its records stay with it"
        );
    }
}

// ------------------------------------------------------------------------ parent

/// The fields of every event emitted again from a child.
const FIELDS: &[&str] = &["message", "process", "pid", "child_target", "fields"];

/// A callsite made at run time for one (target, level) of a child's events: tracing
/// needs `'static` metadata, so each distinct pair is made once and kept (as
/// `tracing-log` does for `log` records), at most [`MAX_CALLSITES`] of them.
struct ChildCallsite {
    meta: OnceLock<Metadata<'static>>,
}

impl tracing::callsite::Callsite for ChildCallsite {
    fn set_interest(&self, _: tracing::subscriber::Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        // Set before the callsite is registered, the only way it is reached.
        self.meta.get().unwrap_or(&FALLBACK_META)
    }
}

/// The most distinct (target, level) pairs of children's events kept as callsites;
/// events of further targets are emitted with target `procpool::child` (their own in
/// the `child_target` field).
const MAX_CALLSITES: usize = 1024;

/// By target, one callsite per level (ERROR .. TRACE).
type Callsites = HashMap<String, [Option<&'static Metadata<'static>>; 5]>;

static CALLSITES: Mutex<Option<Callsites>> = Mutex::new(None);

/// Never used for an event: what [`ChildCallsite::metadata`] answers before it is set.
static FALLBACK_META: Metadata<'static> = Metadata::new(
    "event from a child",
    "procpool::child",
    Level::INFO,
    None,
    None,
    None,
    tracing::field::FieldSet::new(FIELDS, tracing::callsite::Identifier(&FALLBACK_SITE)),
    tracing::metadata::Kind::EVENT,
);

static FALLBACK_SITE: ChildCallsite = ChildCallsite {
    meta: OnceLock::new(),
};

fn level_of(level: u8) -> Level {
    match level {
        1 => Level::ERROR,
        2 => Level::WARN,
        3 => Level::INFO,
        4 => Level::DEBUG,
        _ => Level::TRACE,
    }
}

/// The metadata for a child's events of `target` at `level`, made the first time.
fn callsite_for(target: &str, level: u8) -> Option<&'static Metadata<'static>> {
    let slot = usize::from(level.clamp(1, 5) - 1);
    let mut sites = CALLSITES.lock().unwrap_or_else(|p| p.into_inner());
    let sites = sites.get_or_insert_with(HashMap::new);
    // Looked up by `&str`: no allocation for a target seen before.
    if let Some(meta) = sites.get(target).and_then(|levels| levels[slot]) {
        return Some(meta);
    }
    let made: usize = sites.values().flatten().filter(|m| m.is_some()).count();
    if made >= MAX_CALLSITES {
        return None;
    }
    let name: &'static str = Box::leak(target.to_owned().into_boxed_str());
    let site: &'static ChildCallsite = Box::leak(Box::new(ChildCallsite {
        meta: OnceLock::new(),
    }));
    let meta = Metadata::new(
        "event from a child",
        name,
        level_of(level),
        None,
        None,
        None,
        tracing::field::FieldSet::new(FIELDS, tracing::callsite::Identifier(site)),
        tracing::metadata::Kind::EVENT,
    );
    let meta: &'static Metadata<'static> = site.meta.get_or_init(|| meta);
    // Under the lock: one callsite per pair. Subscribers' `register_callsite` does not
    // come back here.
    tracing::callsite::register(site);
    sites.entry(target.to_owned()).or_default()[slot] = Some(meta);
    Some(meta)
}

/// Emits an event forwarded by child `name` (pid `pid`) in this process, with the
/// event's own target and level (so `RUST_LOG=myapp=debug` selects a child's `myapp`
/// events as it does the parent's), and the fields `process`, `pid`, `child_target`
/// and `fields`. Inside `span` if there is one (the span its task was submitted in, see
/// [`TaskSpan`]), else inside the span current here.
pub(crate) fn reemit_in(span: Option<&tracing::Span>, name: &str, pid: u32, r: &LogRecord) {
    match span {
        // Entered, not only named as the parent: filters that look at the current span
        // (`EnvFilter`'s `[span{field=..}]` directives) see it too.
        Some(span) => span.in_scope(|| reemit(name, pid, r)),
        None => reemit(name, pid, r),
    }
}

/// [`reemit_in`] the span current here.
pub(crate) fn reemit(name: &str, pid: u32, r: &LogRecord) {
    let Some(meta) = callsite_for(&r.target, r.level) else {
        return reemit_as_procpool_child(name, pid, r);
    };
    if !tracing::dispatcher::get_default(|d| d.enabled(meta)) {
        return;
    }
    let fields = meta.fields();
    let field = |n: &str| fields.field(n);
    let (Some(f_msg), Some(f_proc), Some(f_pid), Some(f_target), Some(f_fields)) = (
        field("message"),
        field("process"),
        field("pid"),
        field("child_target"),
        field("fields"),
    ) else {
        return reemit_as_procpool_child(name, pid, r);
    };
    let message = tracing::field::display(&r.message);
    let target = r.target.as_str();
    let rest = r.fields.as_str();
    let values: [(&tracing::field::Field, Option<&dyn tracing::Value>); 5] = [
        (&f_msg, Some(&message)),
        (&f_proc, Some(&name)),
        (&f_pid, Some(&pid)),
        (&f_target, Some(&target)),
        (
            &f_fields,
            (!rest.is_empty()).then_some(&rest as &dyn tracing::Value),
        ),
    ];
    tracing::Event::dispatch(meta, &fields.value_set(&values));
}

/// [`reemit`] past [`MAX_CALLSITES`] targets: target `procpool::child`.
fn reemit_as_procpool_child(name: &str, pid: u32, r: &LogRecord) {
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
