//! The one long-lived thread that starts and reaps every child of this process.
//!
//! Two reasons for a dedicated thread:
//!
//! - `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits. Children
//!   forked from a tokio worker or blocking-pool thread would be killed when that thread
//!   retires (blocking-pool threads retire after 10 s idle). This thread never exits.
//! - A child whose `Process` was dropped unjoined must still be reaped (and its channel
//!   drained, so it can finish writing its result) even if the caller's runtime is gone.
//!
//! The thread runs a current-thread tokio runtime; spawning happens synchronously on it.
//! A second thread of the same kind only starts children (see [`spawn_child`]), so that
//! a pool's two workers start at the same time, not one after the other.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::error::{Error, ExitReason};

/// The second word of a child's command line: what makes a process a procpool child
/// (see `child::boot`, which looks for it before `main`).
pub(crate) const MAGIC: &str = "--procpool-child-v2";

struct Service {
    handle: tokio::runtime::Handle,
    /// Runs only `spawn_child`'s spawns, every other one.
    spawner: tokio::runtime::Handle,
    turn: std::sync::atomic::AtomicBool,
}

/// A current-thread runtime on a thread of its own that never exits.
fn forever_thread(name: &str) -> Result<tokio::runtime::Handle, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the {name} runtime: {e}"))?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| format!("cannot start the {name} thread: {e}"))?;
    Ok(handle)
}

fn service() -> Result<&'static Service, Error> {
    static SERVICE: OnceLock<Result<Service, String>> = OnceLock::new();
    let s = SERVICE.get_or_init(|| {
        Ok(Service {
            handle: forever_thread("procpool-service")?,
            spawner: forever_thread("procpool-spawn")?,
            turn: std::sync::atomic::AtomicBool::new(false),
        })
    });
    s.as_ref()
        .map_err(|reason| Error::spawn(reason.clone(), None))
}

/// A started child: its channel, its recall channel (see [`spawn_here`]) and its handle.
pub(crate) struct Spawned {
    pub(crate) channel: UnixStream,
    pub(crate) control: Option<UnixStream>,
    pub(crate) child: Arc<ChildHandle>,
}

/// Starts `/proc/self/exe` as a procpool child named `name`, on the service thread or
/// the spawner thread, in turn: two calls at once start two children at once.
///
/// Cancel safe: if the caller goes away, the child sees its channel close and exits, and
/// the service reaps it.
pub(crate) async fn spawn_child(name: &str, control: bool) -> Result<Spawned, Error> {
    let svc = service()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = name.to_owned();
    let on = if svc
        .turn
        .fetch_xor(true, std::sync::atomic::Ordering::Relaxed)
    {
        &svc.spawner
    } else {
        &svc.handle
    };
    on.spawn(async move {
        // If the caller gave up, dropping the result closes our end of the channel (the
        // child then exits) and its handle hands the child to the reaper.
        tx.send(spawn_here(&name, control)).ok();
    });
    rx.await
        .map_err(|_| Error::spawn("the procpool service thread stopped", None))?
}

/// Starts a child now, on the calling thread. Call it only from a task given to [`run`]
/// (or from `spawn_child`): the parent-death signal follows the thread that forks, and
/// only the service and spawner threads live as long as the process.
///
/// The first byte on the channel is the preamble: `1` with the child's end of a second
/// socket pair attached (`SCM_RIGHTS`) when `control` is asked for, else `0`. A pool
/// worker reads that socket on a thread of its own while its main thread runs tasks, so
/// the pool can take back tasks it sent ahead (see `wire::RECALL`).
pub(crate) fn spawn_here(name: &str, control: bool) -> Result<Spawned, Error> {
    crate::target::keep_boot_linked();
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| Error::spawn("socketpair failed", Some(e)))?;
    widen(&ours);
    widen(&theirs);
    let control = if control {
        let (parent_end, child_end) =
            UnixStream::pair().map_err(|e| Error::spawn("socketpair failed", Some(e)))?;
        send_preamble(&ours, Some(&child_end))?;
        Some(parent_end)
    } else {
        send_preamble(&ours, None)?;
        None
    };
    let child = start(name, theirs)?;
    Ok(Spawned {
        channel: ours,
        control,
        child,
    })
}

/// Writes the channel's first byte (see [`spawn_here`]). The socket is new and empty, so
/// one byte never waits.
fn send_preamble(channel: &UnixStream, control: Option<&UnixStream>) -> Result<(), Error> {
    use std::os::fd::AsFd;
    let byte = [u8::from(control.is_some())];
    match crate::wire::fdpass::send_with_fd(channel, &byte, control.map(|c| c.as_fd())) {
        Ok(1) => Ok(()),
        Ok(_) => Err(Error::spawn("cannot write a child's preamble", None)),
        Err(e) => Err(Error::spawn("cannot write a child's preamble", Some(e))),
    }
}

/// How much one end of a channel may have in flight: a Unix socket's default (about
/// 208 KiB) splits a 5 MB argument into some 25 rounds of "write, wait, wake, read",
/// each paying two wake-ups, which made large payloads much slower (BENCHMARKS.md).
/// The kernel caps it at `net.core.wmem_max` (often the default again) and charges
/// memory only for what is in flight.
const CHANNEL_BUFFER: usize = 4 << 20;

fn widen(end: &UnixStream) {
    // Only a performance hint: the channel works the same without it.
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(end, CHANNEL_BUFFER) {
        tracing::debug!("cannot widen a child channel's buffer: {e}");
    }
}

fn start(name: &str, theirs: UnixStream) -> Result<Arc<ChildHandle>, Error> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(format!("{name} (procpool)"))
        .arg(MAGIC)
        .arg(std::process::id().to_string())
        // The channel, as fd 0: the child moves it and puts /dev/null there (see
        // `child::take_channel`). With nothing to run between fork and exec, std uses
        // `posix_spawn`, which does not copy this process's page tables.
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        // Its own process group, so stopping a task can stop what the task started.
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| Error::spawn("cannot execute /proc/self/exe", Some(e)))?;
    // Our copy of the child's end closes here: the child then holds the only one.
    drop(cmd);
    let pid = child.id();
    // Not reaped yet, so the pid cannot have been reused.
    let pidfd = rustix::process::Pid::from_raw(pid as i32)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let handle = Arc::new(ChildHandle {
        pid,
        name: name.to_owned(),
        pidfd,
        state: Mutex::new(ReapState {
            child: Some(child),
            exit: None,
            kill_group_at_exit: false,
        }),
    });
    register(&handle);
    Ok(handle)
}

/// A child process of ours, reaped exactly once.
///
/// Dropping the last handle to a child that has not been reaped hands it to the service
/// thread, which waits for it to exit and reaps it: no zombie stays behind.
pub(crate) struct ChildHandle {
    pub(crate) pid: u32,
    pub(crate) name: String,
    pidfd: Option<OwnedFd>,
    state: Mutex<ReapState>,
}

struct ReapState {
    child: Option<Child>,
    exit: Option<ExitReason>,
    /// Set by [`ChildHandle::stop_group`]: what is left of the child's process group
    /// is killed once the child has exited, before it is reaped (while its pid, and so
    /// its group id, cannot be anyone else's).
    kill_group_at_exit: bool,
}

impl std::fmt::Debug for ChildHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildHandle")
            .field("pid", &self.pid)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ChildHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReapState> {
        // The state is two plain fields updated together; a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exit reason if the child has exited (reaping it), `None` while it runs.
    pub(crate) fn try_exit(&self) -> Option<ExitReason> {
        let mut st = self.lock();
        if let Some(e) = st.exit {
            return Some(e);
        }
        st.child.as_ref()?;
        let group = rustix::process::Pid::from_raw(self.pid as i32);
        if let (true, Some(pid)) = (st.kill_group_at_exit, group) {
            // Exited? Asked without reaping (WNOWAIT), so the zombie keeps the group id.
            let opts = rustix::process::WaitIdOptions::EXITED
                | rustix::process::WaitIdOptions::NOHANG
                | rustix::process::WaitIdOptions::NOWAIT;
            match rustix::process::waitid(rustix::process::WaitId::Pid(pid), opts) {
                Ok(None) => return None,
                Ok(Some(_)) => {
                    match rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
                        // ESRCH: nothing of the group is left but the zombie.
                        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                        Err(e) => tracing::warn!(target: "procpool::lifecycle",
                        child = %self.name, "cannot kill what the child left running: {e}"),
                    }
                }
                // ECHILD: reaped by someone else; try_wait says so below.
                Err(_) => {}
            }
        }
        let child = st.child.as_mut()?;
        let exit = match child.try_wait() {
            Ok(Some(status)) => ExitReason::from_status(status),
            Ok(None) => return None,
            // ECHILD: someone else reaped it (SIGCHLD ignored, or a waitpid(-1) loop).
            Err(_) => ExitReason::Unknown,
        };
        st.exit = Some(exit);
        st.child = None;
        Some(exit)
    }

    /// Sends `sig` unless the child was already reaped (then its pid may be reused, and
    /// there is nothing to stop).
    pub(crate) fn signal(&self, sig: rustix::process::Signal) -> io::Result<()> {
        let st = self.lock();
        if st.exit.is_some() {
            return Ok(());
        }
        let res = match &self.pidfd {
            Some(fd) => rustix::process::pidfd_send_signal(fd, sig),
            None => match rustix::process::Pid::from_raw(self.pid as i32) {
                Some(p) => rustix::process::kill_process(p, sig),
                None => return Ok(()),
            },
        };
        match res {
            // ESRCH: it has exited but is not reaped yet: nothing to stop.
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `sig` to the child's whole process group (the child and whatever it started
    /// that stayed in its group), unless the child was already reaped: after that its pid,
    /// and so its group id, may belong to someone else.
    pub(crate) fn signal_group(&self, sig: rustix::process::Signal) -> io::Result<()> {
        let st = self.lock();
        if st.exit.is_some() {
            return Ok(());
        }
        let Some(pgid) = rustix::process::Pid::from_raw(self.pid as i32) else {
            return Ok(());
        };
        match rustix::process::kill_process_group(pgid, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// From now on, what is left of the child's process group is killed with SIGKILL
    /// when the child exits, before it is reaped (by whichever waiter reaps it). Once the
    /// child is reaped, its group id may be reused and nothing can be sent to the group.
    pub(crate) fn stop_group(&self) {
        self.lock().kill_group_at_exit = true;
    }

    /// Waits for the child to exit and reaps it.
    ///
    /// Cancel safe. `slot` keeps the registration of the pidfd with the current runtime
    /// between calls.
    pub(crate) async fn wait(&self, slot: &mut Option<AsyncFd<OwnedFd>>) -> ExitReason {
        loop {
            if let Some(e) = self.try_exit() {
                return e;
            }
            if slot.is_none() {
                *slot = self
                    .pidfd
                    .as_ref()
                    .and_then(|fd| fd.try_clone().ok())
                    .and_then(|fd| crate::target::watch_pidfd(fd).ok());
            }
            match slot {
                Some(fd) => match fd.readable().await {
                    Ok(mut guard) => {
                        if self.try_exit().is_none() {
                            guard.clear_ready();
                        }
                    }
                    Err(_) => *slot = None,
                },
                // No pidfd (kernel before 5.3): poll.
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    pub(crate) fn info(&self) -> crate::ProcessInfo {
        crate::ProcessInfo {
            name: self.name.clone(),
            pid: self.pid,
        }
    }
}

impl Drop for ChildHandle {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let Some(child) = st.child.take() else {
            return;
        };
        let orphan = Arc::new(ChildHandle {
            pid: self.pid,
            name: std::mem::take(&mut self.name),
            pidfd: self.pidfd.take(),
            state: Mutex::new(ReapState {
                child: Some(child),
                exit: None,
                kill_group_at_exit: st.kill_group_at_exit,
            }),
        });
        // If even the service is unavailable, the handle is dropped here and the child
        // stays a zombie until we exit: nothing better is possible.
        if let Ok(svc) = service() {
            svc.handle.spawn(async move {
                orphan.wait(&mut None).await;
            });
        }
    }
}

/// Runs `fut` on the service thread.
pub(crate) fn run<F: std::future::Future<Output = ()> + Send + 'static>(
    fut: F,
) -> Result<(), Error> {
    service()?.handle.spawn(fut);
    Ok(())
}

/// Runs `fut` on the pools' runtime: every pool's dispatcher and its workers' I/O, so
/// that a pool belongs to no caller's runtime (DESIGN.md §9). Threads of their own (not
/// the service thread), so that a busy pool does not delay the hub's answers or the
/// reaping of children; two of them (or one on a one-core machine), so that a
/// dispatcher and its workers' readers run side by side, as they did on a caller's
/// multi-thread runtime (on one thread the 100k-task map lost throughput,
/// BENCHMARKS.md).
pub(crate) fn run_pool<F: std::future::Future<Output = ()> + Send + 'static>(
    fut: F,
) -> Result<(), Error> {
    static POOLS: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    POOLS
        .get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("procpool-pool")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot build the pools' runtime: {e}"))
        })
        .as_ref()
        .map_err(|reason| Error::spawn(reason.clone(), None))?
        .spawn(fut);
    Ok(())
}

/// Runs `fut` on the remote pools' thread: a current-thread runtime of its own that never
/// exits, where every remote pool of this process has its dispatcher, its result reader
/// and its Redis connections, so that a task's submission, its write to Redis and its
/// result hand each other on without waking a second thread (on the pools' two threads,
/// a round trip woke both several times).
///
/// # Errors
///
/// [`Error::Spawn`] if the thread cannot be started.
#[cfg(feature = "redis")]
pub(crate) fn run_remote<F: std::future::Future<Output = ()> + Send + 'static>(
    fut: F,
) -> Result<(), Error> {
    static REMOTE: OnceLock<Result<tokio::runtime::Handle, String>> = OnceLock::new();
    REMOTE
        .get_or_init(|| forever_thread("procpool-remote"))
        .as_ref()
        .map_err(|reason| Error::spawn(reason.clone(), None))?
        .spawn(fut);
    Ok(())
}

/// Where a pool's tasks run: procpool's pools' runtime ([`run_pool`]), or, for a node,
/// the node's own thread, so that its reads, its local pool and its workers' readers
/// hand tasks to each other without waking another thread.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolRuntime(Option<tokio::runtime::Handle>);

impl PoolRuntime {
    /// The runtime of `handle`.
    #[cfg(feature = "redis")]
    pub(crate) fn on(handle: tokio::runtime::Handle) -> PoolRuntime {
        PoolRuntime(Some(handle))
    }

    /// Starts `fut` there.
    ///
    /// # Errors
    ///
    /// As [`run_pool`].
    pub(crate) fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(
        &self,
        fut: F,
    ) -> Result<(), Error> {
        match &self.0 {
            Some(handle) => {
                handle.spawn(fut);
                Ok(())
            }
            None => run_pool(fut),
        }
    }
}

/// Children of this process, for [`active_children`](crate::active_children).
fn registry() -> &'static Mutex<Vec<Weak<ChildHandle>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<ChildHandle>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

fn register(child: &Arc<ChildHandle>) {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.retain(|w| w.strong_count() > 0);
    reg.push(Arc::downgrade(child));
}

/// Children that are still running (reaping those that ended).
pub(crate) fn live_children() -> Vec<Arc<ChildHandle>> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.retain(|w| w.upgrade().is_some_and(|c| c.try_exit().is_none()));
    reg.iter().filter_map(Weak::upgrade).collect()
}
