//! [`Process`]: run one target in a new OS process and await its return value.

mod handshake;

use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;
use tokio::sync::{oneshot, watch};

pub(crate) use handshake::{channel as child_channel, handshake, hello};

use crate::error::{Error, ExitReason, Result};
use crate::runtime::service::{self, ChildHandle, Spawned};
use crate::runtime::{name_of, next_identity};
use crate::target::{Target, TargetRef, resolve};
use crate::wire::{Down, Outcome, Role, Run, Up, WireError};

// ----------------------------------------------------------------------------- Process

/// A target running (or about to run) in a child process, like Python's
/// `multiprocessing.Process`.
///
/// The child is this same executable, re-executed; it runs `target(args...)` and sends
/// the return value back, which [`join`](Process::join) returns. The child's stdout and
/// stderr are this process's, so its `println!` output appears as yours does.
///
/// ```
/// use procpool::Process;
///
/// fn doubler(x: i64) -> i64 {
///     x * 2
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
/// let mut p = Process::new(doubler, (21,));
/// p.start().await?;
/// assert_eq!(p.join().await?, 42);
/// assert_eq!(p.exitcode(), Some(0));
/// # Ok(()) }
/// ```
///
/// # Drop
///
/// Dropping a `Process` that was started and not joined does **not** stop the child (as
/// with [`std::process::Child`]): it runs to its end, its result is discarded, and a
/// background thread reaps it, so no zombie stays behind. Use [`kill`](Process::kill)
/// first to stop it. The child dies anyway when this whole process dies.
#[must_use = "a Process does nothing until `start().await`"]
pub struct Process<R> {
    name: String,
    identity: Vec<u32>,
    launch: Option<Result<Launch>>,
    run: Option<Running>,
    _output: PhantomData<fn() -> R>,
}

struct Launch {
    target: TargetRef,
    args: Vec<u8>,
    /// Keeps queues, locks, events and pipe ends among the arguments alive until the
    /// child has ended.
    pins: crate::sync::Pins,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("target", &self.target)
            .field("args", &self.args.len())
            .finish_non_exhaustive()
    }
}

/// A started child. Its channel is driven on the service thread (see [`drive`]), which
/// publishes how it ended; `join` waits for that, which is what makes it cancel safe and
/// repeatable.
struct Running {
    child: Arc<ChildHandle>,
    ended: watch::Receiver<Option<Arc<Ended>>>,
}

/// How a child ended: what it sent (if anything) and its exit status.
#[derive(Debug)]
struct Ended {
    outcome: Option<Result<Outcome, String>>,
    exit: ExitReason,
}

impl<R> std::fmt::Debug for Process<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl<R> Process<R>
where
    R: Serialize + DeserializeOwned + Send + 'static,
{
    /// Prepares `target(args...)` to run in a new process, named `Process-N` (N counts
    /// every `Process` created by this process, started or not, as in Python).
    ///
    /// `args` is a tuple: `(5,)`, `(a, b)`, `()`. The arguments are encoded now; if that
    /// fails, [`start`](Process::start) returns the [`Error::Encode`].
    ///
    /// A closure that captures variables does not compile; pass them as arguments.
    pub fn new<F, A, M>(target: F, args: A) -> Self
    where
        F: Target<A, M, Output = R>,
        A: Serialize + DeserializeOwned + Send + 'static,
        M: 'static,
    {
        let _: F = target; // It holds nothing: the child makes its own (see `Target`).
        let identity = next_identity();
        let launch = resolve::<F, M, A>().and_then(|target| {
            let (args, pins) = crate::sync::encode_args(&args);
            let args = args.map_err(Error::encode::<A>)?;
            crate::wire::check_args_len::<A>(args.len())?;
            Ok(Launch { target, args, pins })
        });
        Process {
            name: name_of(&identity),
            identity,
            launch: Some(launch),
            run: None,
            _output: PhantomData,
        }
    }
}

impl<R> Process<R> {
    /// Gives the process a name of your choosing (Python's `name=`). The counter still
    /// advanced when this `Process` was created.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The process's name: `Process-N` or the one given with [`with_name`](Self::with_name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's pid, once started.
    pub fn pid(&self) -> Option<u32> {
        self.run.as_ref().map(|r| r.child.pid)
    }

    /// True from a successful [`start`](Self::start) until the child exits.
    pub fn is_alive(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| r.child.try_exit().is_none())
    }

    /// Python's `exitcode`: `None` while running (or before start), then `Some(0)` after
    /// a normal return, `Some(1)` after a panic, `Some(n)` after `exit(n)`, `Some(-s)`
    /// after signal `s`.
    pub fn exitcode(&self) -> Option<i32> {
        self.run
            .as_ref()
            .and_then(|r| r.child.try_exit())
            .and_then(ExitReason::exitcode)
    }

    /// Sends `SIGTERM` to the child (Python's `terminate()`). Does nothing if it has
    /// already exited.
    ///
    /// # Errors
    ///
    /// [`Error::NotStarted`] before [`start`](Self::start); [`Error::Io`] if the signal
    /// cannot be sent.
    pub fn terminate(&self) -> Result<()> {
        self.signal(rustix::process::Signal::TERM)
    }

    /// Sends `SIGKILL` to the child (Python's `kill()`). Does nothing if it has already
    /// exited.
    ///
    /// # Errors
    ///
    /// As for [`terminate`](Self::terminate).
    pub fn kill(&self) -> Result<()> {
        self.signal(rustix::process::Signal::KILL)
    }

    fn signal(&self, sig: rustix::process::Signal) -> Result<()> {
        let run = self.run.as_ref().ok_or(Error::NotStarted)?;
        run.child.signal(sig).map_err(Error::Io)
    }

    /// Starts the child: spawns it, sends the target and its arguments, and waits for the
    /// child to confirm it is the same build and ready to run.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the arguments could not be encoded,
    /// [`Error::UnsupportedTarget`] if the target is not code of the main executable,
    /// [`Error::Spawn`] if the child could not be started or refused to run,
    /// [`Error::AlreadyStarted`] on a second call.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if the future is dropped before it completes, the child (if any)
    /// sees its channel close, exits without running the target, and is reaped; this
    /// `Process` cannot be started again.
    pub async fn start(&mut self) -> Result<()> {
        let launch = match self.launch.take() {
            None => return Err(Error::AlreadyStarted),
            Some(launch) => launch?,
        };
        let hello = handshake::hello(&self.name, self.identity.clone(), Role::Process, None)?;
        let run = Down::Run(Run {
            id: 0,
            target: launch.target.offset,
            target_name: launch.target.name.to_owned(),
            args: ByteBuf::from(launch.args),
        });
        // Spawning and driving happen in one task on the service thread: one hop there,
        // one back when the child is ready.
        let (started_tx, started) = oneshot::channel();
        let (ended_tx, ended) = watch::channel(None);
        let name = self.name.clone();
        let pins = launch.pins;
        // The child's events are emitted inside the span current at `start` (as a pool
        // task's are inside the span it was submitted in).
        let span = tracing::Span::current();
        let drive_child = async move {
            match service::spawn_here(&name, false) {
                Ok(Spawned { channel, child, .. }) => {
                    drive(channel, child, name, [hello, run], started_tx, ended_tx).await;
                    drop(pins);
                }
                Err(e) => {
                    // The caller may have given up; then there is no one to tell.
                    started_tx.send(Err(e)).ok();
                }
            }
        };
        service::run(tracing::Instrument::instrument(drive_child, span))?;
        let child = started
            .await
            .map_err(|_| Error::spawn("the procpool service thread stopped", None))??;
        self.run = Some(Running { child, ended });
        Ok(())
    }
}

impl<R: DeserializeOwned> Process<R> {
    /// Waits for the child to finish and returns the target's return value.
    ///
    /// Can be called again after it completed (it returns the same outcome, decoding the
    /// stored value again) or after it was cancelled, for example by
    /// `tokio::time::timeout` or the losing branch of `tokio::select!`.
    ///
    /// # Errors
    ///
    /// - [`Error::Panicked`] if the target panicked, with the child's message and location;
    /// - [`Error::WorkerDied`] if the child ended without a result: abort, segfault,
    ///   `std::process::exit`, a signal;
    /// - [`Error::Encode`]/[`Error::Decode`] if the result could not cross;
    /// - [`Error::Protocol`] if the child sent garbage (it was killed);
    /// - [`Error::NotStarted`] before [`start`](Self::start).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is lost if the future is dropped; call `join` again.
    pub async fn join(&mut self) -> Result<R> {
        let name = self.name.clone();
        let run = self.run.as_mut().ok_or(Error::NotStarted)?;
        let ended = run
            .ended
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::spawn("the procpool service thread stopped", None))?
            .clone();
        let Some(ended) = ended else {
            return Err(Error::NotStarted); // wait_for guarantees Some
        };
        match &ended.outcome {
            Some(Ok(outcome)) => outcome.to_result(&name),
            Some(Err(reason)) => Err(Error::Protocol {
                name,
                reason: reason.clone(),
            }),
            None => Err(Error::WorkerDied {
                pid: run.child.pid,
                name,
                reason: ended.exit,
            }),
        }
    }
}

/// Drives one `Process` child on the service thread: handshake, then every frame until
/// the end of the channel (forwarding log events as they come), then the exit status.
///
/// Living on the service thread, it keeps going if the caller's runtime ends or the
/// `Process` is dropped unjoined: the child runs to its end, its log events still reach
/// the parent's subscriber, and it is reaped.
async fn drive(
    channel: std::os::unix::net::UnixStream,
    child: Arc<ChildHandle>,
    name: String,
    first: [Down; 2],
    started: oneshot::Sender<Result<Arc<ChildHandle>>>,
    ended: watch::Sender<Option<Arc<Ended>>>,
) {
    let pid = child.pid;
    let kill = |why: &str| {
        // Kill before the channel closes, so the exit status says it was killed.
        if let Err(e) = child.signal(rustix::process::Signal::KILL) {
            tracing::warn!(target: "procpool::lifecycle", pid, "cannot kill {why} child: {e}");
        }
    };
    let mut chan = match handshake::channel(channel) {
        Ok(chan) => chan,
        Err(e) => {
            kill("unusable");
            child.wait(&mut None).await;
            started
                .send(Err(Error::spawn("cannot use the channel", Some(e))))
                .ok();
            return;
        }
    };
    // Hello and Run go together: a start costs one round trip.
    if let Err(e) = handshake::handshake(&mut chan, &child, &name, &first).await {
        started.send(Err(e)).ok();
        return;
    }
    if started.send(Ok(Arc::clone(&child))).is_err() {
        // The caller gave up on start(): nobody will ever join this child.
        kill("abandoned");
        drop(chan);
        child.wait(&mut None).await;
        return;
    }
    let mut outcome = None;
    loop {
        match chan.recv::<Up>().await {
            Ok(Some(Up::Log(record))) => crate::log::reemit(&name, pid, &record),
            Ok(Some(Up::Done { outcome: o, .. })) if outcome.is_none() => outcome = Some(Ok(o)),
            Ok(Some(other)) => {
                kill("misbehaving");
                outcome = Some(Err(format!("{name} sent {other:?} while running")));
                break;
            }
            // The child ended (or died mid-frame): the exit status tells why.
            Ok(None) | Err(WireError::Truncated | WireError::Io(_)) => break,
            Err(e @ (WireError::Oversize { .. } | WireError::Garbage(_))) => {
                kill("misbehaving");
                outcome = Some(Err(e.to_string()));
                break;
            }
        }
    }
    drop(chan);
    let exit = child.wait(&mut None).await;
    ended.send_replace(Some(Arc::new(Ended { outcome, exit })));
}

/// Creates and starts a [`Process`] in one call (`Process::new(target, args)` then
/// [`start`](Process::start)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> procpool::Result<()> {
/// let mut p = procpool::spawn(|a: u32, b: u32| a + b, (2, 3)).await?;
/// assert_eq!(p.join().await?, 5);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// As for [`Process::start`].
///
/// # Cancel safety
///
/// As for [`Process::start`]: a cancelled spawn leaves no process behind.
pub async fn spawn<F, A, M>(target: F, args: A) -> Result<Process<F::Output>>
where
    F: Target<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
    M: 'static,
{
    let mut p = Process::new(target, args);
    p.start().await?;
    Ok(p)
}
