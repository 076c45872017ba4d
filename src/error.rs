//! The one error type of the crate.

use std::fmt;
use std::time::Duration;

/// A specialised [`Result`](std::result::Result) whose error is [`procpool::Error`](Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit code of a child whose main thread (where targets run) overflowed its stack; it
/// printed std's "thread '…' has overflowed its stack" first (see
/// `target::report_stack_overflow`). [`ExitReason::is_stack_overflow`] names it.
pub(crate) const EXIT_STACK_OVERFLOW: i32 = 77;

/// How a child process ended, in the words of `waitpid`.
///
/// [`Error::WorkerDied`] carries one. [`ExitReason::exitcode`] gives Python's convention
/// (`0`, `n` or `-signal`).
///
/// A child whose target overflows the stack (of the thread that runs targets) prints
/// std's "thread '…' has overflowed its stack" and exits with code 77:
/// [`is_stack_overflow`](Self::is_stack_overflow) tells, and the message says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExitReason {
    /// The process called `exit(code)` (or returned from `main`).
    Code(i32),
    /// The process was killed by this signal number (`9` for `SIGKILL`, `11` for `SIGSEGV`).
    Signal(i32),
    /// The exit status could not be read (the child was reaped by someone else, for example
    /// because the program set `SIGCHLD` to `SIG_IGN`).
    Unknown,
}

impl ExitReason {
    /// Python's `Process.exitcode`: `Some(code)`, `Some(-signal)`, or `None` when unknown.
    pub fn exitcode(self) -> Option<i32> {
        match self {
            ExitReason::Code(c) => Some(c),
            ExitReason::Signal(s) => Some(-s),
            ExitReason::Unknown => None,
        }
    }

    /// The reverse of [`exitcode`](Self::exitcode) (for results from remote nodes).
    #[cfg(any(feature = "redis", test))]
    pub(crate) fn from_exitcode(code: Option<i32>) -> ExitReason {
        match code {
            Some(c) if c < 0 => ExitReason::Signal(-c),
            Some(c) => ExitReason::Code(c),
            None => ExitReason::Unknown,
        }
    }

    /// True if the child reported that its target overflowed its stack (exit code 77).
    pub fn is_stack_overflow(self) -> bool {
        self == ExitReason::Code(EXIT_STACK_OVERFLOW)
    }

    pub(crate) fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => ExitReason::Code(c),
            (None, Some(s)) => ExitReason::Signal(s),
            (None, None) => ExitReason::Unknown,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(c) if self.is_stack_overflow() => {
                write!(f, "a stack overflow (exit code {c})")
            }
            ExitReason::Code(c) => write!(f, "exit code {c}"),
            ExitReason::Signal(s) => write!(f, "signal {s} ({})", signal_name(s)),
            ExitReason::Unknown => f.write_str("an unknown exit status"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => "other signal",
    }
}

/// Everything that can go wrong when running work in another process.
///
/// The variants that matter to callers are stable and matched by name in tests:
/// [`Timeout`](Error::Timeout), [`WorkerDied`](Error::WorkerDied),
/// [`Panicked`](Error::Panicked), [`Encode`](Error::Encode), [`Decode`](Error::Decode),
/// [`PoolClosed`](Error::PoolClosed), [`Cancelled`](Error::Cancelled),
/// [`Spawn`](Error::Spawn), [`Protocol`](Error::Protocol), [`Closed`](Error::Closed) and
/// [`Io`](Error::Io). New variants may be added, so match with a wildcard arm.
///
/// A panic or a crash in a child is never a panic in the parent: it arrives here.
///
/// ```
/// use procpool::{Error, ExitReason};
///
/// fn parse(text: String) -> u32 {
///     text.parse().expect("a number")
/// }
///
/// fn crash() -> u8 {
///     std::process::abort()
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
/// let pool = procpool::AsyncPool::new(1).await?;
/// match pool.apply(parse, ("x".to_owned(),)).await {
///     Err(Error::Panicked { message, .. }) => assert!(message.contains("a number")),
///     other => panic!("{other:?}"),
/// }
/// match pool.apply(crash, ()).await {
///     Err(Error::WorkerDied { reason, .. }) => assert_eq!(reason, ExitReason::Signal(6)),
///     other => panic!("{other:?}"),
/// }
/// // The pool replaced the worker and goes on.
/// assert_eq!(pool.apply(parse, ("7".to_owned(),)).await?, 7);
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The work did not finish within its time limit; a task still running was stopped.
    #[error(
        "timed out after {after:?} (a task still running at its limit was stopped; raise \
         the limit if the work needs longer)"
    )]
    #[non_exhaustive]
    Timeout {
        /// The limit that expired.
        after: Duration,
    },

    /// The child process ended before it delivered a result: it aborted, crashed, called
    /// `std::process::exit`, or was killed.
    #[error("process {name} (pid {pid}) died with {reason} before returning a result")]
    #[non_exhaustive]
    WorkerDied {
        /// The child's pid.
        pid: u32,
        /// The child's name (`Process-3`, `PoolWorker-1`, ...).
        name: String,
        /// How it ended: an exit code or a signal.
        reason: ExitReason,
    },

    /// The target panicked in the child. The child's panic message and source location are
    /// carried over, like [`tokio::task::JoinError::is_panic`] but across processes.
    #[error("the target panicked in process {name} at {}: {message}", location.as_deref().unwrap_or("<unknown location>"))]
    #[non_exhaustive]
    Panicked {
        /// The panic message (`"index out of bounds: ..."`).
        message: String,
        /// `file:line:column` of the panic, when known.
        location: Option<String>,
        /// The name of the process that panicked.
        name: String,
    },

    /// A value could not be encoded as MessagePack: an argument (nothing was sent) or a
    /// result (in the child).
    #[error(
        "could not encode a value of type `{type_name}`: {reason} (check its `Serialize` impl)"
    )]
    #[non_exhaustive]
    Encode {
        /// The Rust type that failed to encode.
        type_name: String,
        /// What the encoder said.
        reason: String,
    },

    /// A value could not be decoded from MessagePack as the expected type.
    #[error(
        "could not decode a value of type `{type_name}`: {reason} (check its `Deserialize` impl)"
    )]
    #[non_exhaustive]
    Decode {
        /// The Rust type that failed to decode.
        type_name: String,
        /// What the decoder said.
        reason: String,
    },

    /// The pool was closed or terminated; it takes no new work.
    #[error("the pool is closed or terminated and takes no new work")]
    PoolClosed,

    /// The work was cancelled before it produced a result.
    #[error("the task was cancelled before it finished")]
    Cancelled,

    /// A child process could not be started, or it refused to run (not the same build).
    #[error("could not start a child process: {reason}")]
    #[non_exhaustive]
    Spawn {
        /// What went wrong.
        reason: String,
        /// The OS error, if there was one.
        #[source]
        source: Option<std::io::Error>,
    },

    /// A child sent something that is not valid protocol (garbage, a frame over the size
    /// limit, an unexpected message). The child has been killed.
    #[error("protocol error from process {name}: {reason}; the child was killed")]
    #[non_exhaustive]
    Protocol {
        /// The child's name.
        name: String,
        /// What was wrong with the data.
        reason: String,
    },

    /// The other side of a queue, pipe or channel is gone.
    #[error("the other side is gone (closed, dropped, or its process died)")]
    Closed,

    /// The target cannot be run in a child process: it does not live in the main
    /// executable (for example, it comes from a dynamically loaded library).
    #[error("target `{name}` cannot run in a child process: {reason}")]
    #[non_exhaustive]
    UnsupportedTarget {
        /// The target's type name.
        name: String,
        /// Why it was refused.
        reason: String,
    },

    /// A [`BoundedSemaphore`](crate::BoundedSemaphore) was released more often than it
    /// was acquired: Python's `ValueError: Semaphore released too many times`.
    #[error(
        "a bounded semaphore of {permits} permits was released more often than it was \
         acquired (nothing changed)"
    )]
    #[non_exhaustive]
    ReleasedTooOften {
        /// The permits it was created with.
        permits: u64,
    },

    /// An index or range past the end of an [`Array`](crate::Array).
    #[error("index {index} is out of bounds: the array has {len} elements")]
    #[non_exhaustive]
    OutOfBounds {
        /// The first index past the end that was asked for.
        index: usize,
        /// The array's length.
        len: usize,
    },

    /// A [`Barrier`](crate::Barrier) is broken: a party died (or gave up) while others
    /// waited, so the ones waiting and every later `wait` get this, as Python's
    /// `BrokenBarrierError`. [`Barrier::reset`](crate::Barrier::reset) mends it.
    #[error("the barrier is broken: a party died or gave up while others waited")]
    BrokenBarrier,

    /// An option has a value that cannot work (for example a pool of 0 processes).
    #[error("invalid configuration: {reason}")]
    #[non_exhaustive]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },

    /// [`Process::join`](crate::Process::join) or a similar call was made on a process
    /// that was never started.
    #[error("the process was not started: call `start().await` first")]
    NotStarted,

    /// [`Process::start`](crate::Process::start) was called twice. A process runs once.
    #[error("the process was already started; create a new `Process` to run again")]
    AlreadyStarted,

    /// A future or handle that already gave its result was polled again. Every named
    /// future of the crate answers so (it never panics), and reports
    /// [`FusedFuture::is_terminated`](futures::future::FusedFuture::is_terminated) once it
    /// has given its result.
    #[error(
        "this future already gave its result; a finished future has nothing more to give \
         (keep the result of the first completion)"
    )]
    AlreadyCompleted,

    /// A remote task's node died or vanished while it ran the task (its heartbeat
    /// stopped), and no retry was left (see `Builder::retries`).
    #[error("node {node} was lost while it ran the task (no retry left)")]
    #[non_exhaustive]
    NodeLost {
        /// The node's id.
        node: String,
    },

    /// No node of this program's build was registered within `wait_for_nodes`: nodes
    /// run only tasks of their own build (DESIGN.md §10).
    #[error(
        "no node of this build ({build}) registered within {waited:?}; start nodes from this \
         same executable (PROCPOOL_NODE=<redis url>)"
    )]
    #[non_exhaustive]
    NoCompatibleNodes {
        /// This program's build fingerprint.
        build: String,
        /// How long the pool waited.
        waited: Duration,
    },

    /// The remote backend (Redis) could not be used: unreachable past the reconnect
    /// window, or it answered with an error.
    #[error("the remote backend failed: {reason}")]
    #[non_exhaustive]
    Backend {
        /// What went wrong.
        reason: String,
    },

    /// An argument cannot cross machines: a `Queue`, `Lock`, `Event`, pipe end or other
    /// handle of a process-local object was passed to a remote task.
    #[error(
        "an argument of type `{type_name}` cannot reach a remote node: it refers to an \
         object of this machine"
    )]
    #[non_exhaustive]
    UnsupportedArgument {
        /// What was passed.
        type_name: String,
    },

    /// An operating-system error. Its message is the `io::Error`'s (and its source the
    /// `io::Error`'s source), so a chain of errors (anyhow, eyre) prints it once.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True for [`Error::Panicked`].
    pub fn is_panic(&self) -> bool {
        matches!(self, Error::Panicked { .. })
    }

    /// True for [`Error::WorkerDied`].
    pub fn is_worker_died(&self) -> bool {
        matches!(self, Error::WorkerDied { .. })
    }

    /// A copy of this error for another caller, where the variant carries plain data
    /// (`Io` and the source of `Spawn` cannot be copied; their text is kept).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Error::Timeout { after } => Error::Timeout { after: *after },
            Error::WorkerDied { pid, name, reason } => Error::WorkerDied {
                pid: *pid,
                name: name.clone(),
                reason: *reason,
            },
            Error::Panicked {
                message,
                location,
                name,
            } => Error::Panicked {
                message: message.clone(),
                location: location.clone(),
                name: name.clone(),
            },
            Error::Encode { type_name, reason } => Error::Encode {
                type_name: type_name.clone(),
                reason: reason.clone(),
            },
            Error::Decode { type_name, reason } => Error::Decode {
                type_name: type_name.clone(),
                reason: reason.clone(),
            },
            Error::PoolClosed => Error::PoolClosed,
            Error::Cancelled => Error::Cancelled,
            Error::Closed => Error::Closed,
            Error::NotStarted => Error::NotStarted,
            Error::AlreadyStarted => Error::AlreadyStarted,
            Error::AlreadyCompleted => Error::AlreadyCompleted,
            Error::Protocol { name, reason } => Error::Protocol {
                name: name.clone(),
                reason: reason.clone(),
            },
            Error::UnsupportedTarget { name, reason } => Error::UnsupportedTarget {
                name: name.clone(),
                reason: reason.clone(),
            },
            Error::InvalidConfig { reason } => Error::InvalidConfig {
                reason: reason.clone(),
            },
            Error::ReleasedTooOften { permits } => Error::ReleasedTooOften { permits: *permits },
            Error::BrokenBarrier => Error::BrokenBarrier,
            Error::OutOfBounds { index, len } => Error::OutOfBounds {
                index: *index,
                len: *len,
            },
            Error::NodeLost { node } => Error::NodeLost { node: node.clone() },
            Error::NoCompatibleNodes { build, waited } => Error::NoCompatibleNodes {
                build: build.clone(),
                waited: *waited,
            },
            Error::Backend { reason } => Error::Backend {
                reason: reason.clone(),
            },
            Error::UnsupportedArgument { type_name } => Error::UnsupportedArgument {
                type_name: type_name.clone(),
            },
            Error::Spawn { reason, .. } => Error::spawn(reason.clone(), None),
            Error::Io(e) => Error::Io(std::io::Error::new(e.kind(), e.to_string())),
        }
    }

    pub(crate) fn spawn(reason: impl Into<String>, source: Option<std::io::Error>) -> Self {
        Error::Spawn {
            reason: reason.into(),
            source,
        }
    }

    pub(crate) fn encode<T: ?Sized>(err: impl fmt::Display) -> Self {
        Error::Encode {
            type_name: std::any::type_name::<T>().to_owned(),
            reason: err.to_string(),
        }
    }

    pub(crate) fn decode<T: ?Sized>(err: impl fmt::Display) -> Self {
        Error::Decode {
            type_name: std::any::type_name::<T>().to_owned(),
            reason: err.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exitcode_follows_python() {
        assert_eq!(ExitReason::Code(3).exitcode(), Some(3));
        assert_eq!(ExitReason::Signal(9).exitcode(), Some(-9));
        assert_eq!(ExitReason::Unknown.exitcode(), None);
        for r in [
            ExitReason::Code(0),
            ExitReason::Code(3),
            ExitReason::Signal(9),
            ExitReason::Unknown,
        ] {
            assert_eq!(
                ExitReason::from_exitcode(r.exitcode()),
                r,
                "round trip of {r:?}"
            );
        }
        assert_eq!(ExitReason::Signal(11).to_string(), "signal 11 (SIGSEGV)");
        assert!(ExitReason::Code(77).is_stack_overflow());
        assert!(!ExitReason::Signal(11).is_stack_overflow());
        assert_eq!(ExitReason::Code(77).exitcode(), Some(77));
        let e = Error::WorkerDied {
            pid: 7,
            name: "PoolWorker-1".into(),
            reason: ExitReason::Code(77),
        };
        assert_eq!(
            e.to_string(),
            "process PoolWorker-1 (pid 7) died with a stack overflow (exit code 77) before \
             returning a result"
        );
    }

    #[test]
    fn duplicates_keep_variant_and_data() {
        let e = Error::WorkerDied {
            pid: 7,
            name: "PoolWorker-1".into(),
            reason: ExitReason::Signal(9),
        };
        assert_eq!(e.duplicate().to_string(), e.to_string());
        assert!(
            matches!(Error::Timeout { after: Duration::from_secs(1) }.duplicate(), Error::Timeout { after } if after == Duration::from_secs(1))
        );
        let io = Error::Io(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"));
        assert!(
            matches!(io.duplicate(), Error::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
        );
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = Error::Panicked {
            message: "boom".into(),
            location: Some("src/main.rs:3:5".into()),
            name: "Process-1".into(),
        };
        assert_eq!(
            e.to_string(),
            "the target panicked in process Process-1 at src/main.rs:3:5: boom"
        );
        // Transparent: the io::Error's message, and its source (none here), so that an
        // error chain does not print it twice.
        let io = Error::from(std::io::Error::other("x"));
        assert_eq!(io.to_string(), "x");
        assert!(std::error::Error::source(&io).is_none());
        let sp = Error::spawn("exec failed", Some(std::io::Error::other("nope")));
        assert!(std::error::Error::source(&sp).is_some());
    }
}
