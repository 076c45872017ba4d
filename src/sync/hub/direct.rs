//! Direct calls: a blocking call to an object of another process made on the calling
//! thread, over a connection of that thread's own, with no procpool thread in between.
//!
//! A call through the process's shared connection ([`Remote::blocking_call`]) crosses
//! four threads: the caller hands its request to procpool's writer task, the owner's
//! service thread answers, this process's service thread reads the answer and wakes the
//! caller. Each hand-off to a sleeping thread costs a wake-up, and on a virtual machine
//! waking an idle CPU costs tens of microseconds, more than a whole round trip between two
//! running processes. A direct call writes its request itself, and reads the answer
//! itself, looking for it for [`SPIN`] before it sleeps; the owner's session looks for
//! the next request as long (see [`SpinRead`]). Back-to-back calls then cost a round
//! trip between two running processes.
//!
//! Only for requests the owner answers at once and that leave nothing held by the
//! connection (a `Dict`'s): a lock granted, or queue items handed out, belong to the
//! connection they went through, and stay on the shared one.
//!
//! The connection opens the object for itself (the owner keeps it alive while it is
//! open there) and forgets it at the first call after this process's last handle to it
//! is gone, or when the thread ends.

use std::cell::RefCell;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, ReadBuf};

use super::*;
use crate::wire::{BlockingChannel, Next};

/// How long a direct caller, and an owner's session, look for the next frame before
/// they sleep. About one wake-up of an idle CPU: a peer that answers (or asks again)
/// sooner costs no wake-up at all; one that does not costs this much CPU.
pub(crate) const SPIN: Duration = Duration::from_micros(50);

thread_local! {
    /// This thread's direct connections, by hub.
    static DIRECT: RefCell<HashMap<HubRef, Direct>> = RefCell::default();
}

/// Direct connections open in this process (every thread's), for [`tables`].
pub(super) static OPEN: AtomicUsize = AtomicUsize::new(0);

/// One thread's connection to one hub.
struct Direct {
    /// Read with a timeout, and written (with one) through `get_ref`.
    rx: BlockingChannel<Stream>,
    out: BytesMut,
    next_id: u64,
    /// What this connection opened, and this process's view of it (dead: forget it).
    opened: HashMap<u64, Weak<Remote>>,
    /// The process's shared connection to the same hub: once it is closed, the owner
    /// is gone.
    shared: Weak<Client>,
}

impl Drop for Direct {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a direct call failed.
enum Failed {
    /// The owner is gone or the connection broke.
    Closed,
    /// The request is more than a frame holds (nothing was sent).
    TooLarge(String),
    /// No answer within the limit.
    Timeout,
}

/// Sends `op` to `remote`'s object from this thread and waits at most the owner timeout
/// for the answer (as [`Remote::blocking_call`], which it replaces for requests that
/// hold nothing, and which it falls back to when this thread cannot have a connection
/// of its own: its thread-locals are being torn down, or the connect failed).
pub(crate) fn call(remote: &Arc<Remote>, op: Op) -> Result<Reply, Error> {
    let limit = owner_timeout();
    let deadline = Instant::now() + limit;
    // What this process sent the owner on the shared connection (an unbounded put, a
    // lock released, an acknowledgement) is applied before this request.
    remote.client.confirm_sent(deadline)?;
    let mut op = Some(op);
    let got = DIRECT.try_with(|all| {
        // Nothing below calls back into here.
        let mut all = all.try_borrow_mut().ok()?;
        // Connections to owners that are gone, or that hold nothing this process
        // still has a handle to, are closed (which lets go of what they opened).
        all.retain(|_, c| c.in_use());
        if remote.closed() {
            return Some(Err(Failed::Closed));
        }
        let conn = match all.entry(remote.hub.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match Direct::open(remote) {
                Ok(c) => v.insert(c),
                Err(e) => {
                    tracing::debug!("procpool: a direct connection to a hub failed: {e}");
                    return None;
                }
            },
        };
        let got = conn.call(remote, op.take()?, deadline);
        if let Err(Failed::Closed | Failed::Timeout) = got {
            // Broken, or an answer may still come: never reused.
            all.remove(&remote.hub);
        }
        Some(got)
    });
    match got {
        Ok(Some(Ok(reply))) => Ok(reply),
        Ok(Some(Err(Failed::Closed))) => Err(Error::Closed),
        Ok(Some(Err(Failed::TooLarge(reason)))) => Err(Error::Encode {
            type_name: "a request to a shared object".to_owned(),
            reason,
        }),
        Ok(Some(Err(Failed::Timeout))) => {
            tracing::warn!(
                "procpool: the owner of a shared object did not answer within {limit:?}"
            );
            Err(Error::Timeout { after: limit })
        }
        // No connection of this thread's: the shared one.
        Ok(None) | Err(_) => match op {
            Some(op) => remote.blocking_call(op),
            None => Err(Error::Closed),
        },
    }
}

impl Direct {
    fn open(remote: &Remote) -> std::io::Result<Direct> {
        let stream = remote.hub.connect()?;
        OPEN.fetch_add(1, Ordering::Relaxed);
        let mut conn = Direct {
            rx: BlockingChannel::new(Stream(stream), MAX_FRAME),
            out: BytesMut::new(),
            next_id: 1,
            opened: HashMap::new(),
            shared: Arc::downgrade(&remote.client),
        };
        let fits = frame_into(
            &mut conn.out,
            &ToHub::Hello {
                token: remote.hub.token,
                purpose: Purpose::Direct,
            },
        );
        debug_assert!(fits, "a hello is a few bytes");
        Ok(conn)
    }

    /// Whether the owner is there and this connection holds something this process
    /// still has a handle to.
    fn in_use(&self) -> bool {
        let owner_there = self
            .shared
            .upgrade()
            .is_some_and(|c| !c.closed.load(Ordering::SeqCst));
        owner_there && self.opened.values().any(|w| w.strong_count() > 0)
    }

    fn feed(&mut self, msg: &ToHub) -> Result<(), Failed> {
        if frame_into(&mut self.out, msg) {
            return Ok(());
        }
        Err(Failed::TooLarge(format!(
            "a request is more than a frame holds ({MAX_FRAME} bytes)"
        )))
    }

    fn call(&mut self, remote: &Arc<Remote>, op: Op, deadline: Instant) -> Result<Reply, Failed> {
        // Objects this process no longer holds are forgotten, before the request (an
        // earlier view of this same object stays open: the new one takes its place).
        let dead: Vec<u64> = self
            .opened
            .iter()
            .filter(|&(&obj, w)| obj != remote.obj && w.strong_count() == 0)
            .map(|(&obj, _)| obj)
            .collect();
        let open = !self.opened.contains_key(&remote.obj);
        // (A new connection's hello is already there.)
        let start = self.out.len();
        for &obj in &dead {
            self.feed(&ToHub::Forget { obj })?;
        }
        if open {
            self.feed(&ToHub::Open {
                obj: remote.obj,
                kind: remote.kind,
                key: remote.key,
            })?;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) = self.feed(&ToHub::Req {
            id,
            obj: remote.obj,
            op,
        }) {
            // Nothing was sent, and nothing changed.
            self.out.truncate(start);
            return Err(e);
        }
        for obj in dead {
            self.opened.remove(&obj);
        }
        self.opened.insert(remote.obj, Arc::downgrade(remote));
        let sock = &self.rx.get_ref().0;
        let left = deadline.saturating_duration_since(Instant::now());
        let sent = sock
            // (Zero would mean no limit.)
            .set_write_timeout(Some(left.max(Duration::from_millis(1))))
            .and_then(|()| send_all(sock, &self.out));
        self.out.clear();
        if self.out.capacity() > KEEP {
            self.out = BytesMut::new();
        }
        match sent {
            Ok(()) => {}
            // A stopped owner whose socket is full.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Failed::Timeout);
            }
            Err(_) => return Err(Failed::Closed),
        }
        self.answer(id, deadline)
    }

    /// Reads until the answer to request `id` (looking for [`SPIN`] before sleeping).
    fn answer(&mut self, id: u64, deadline: Instant) -> Result<Reply, Failed> {
        let spin_until = Instant::now() + SPIN;
        let mut wait = false;
        loop {
            if wait {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Failed::Timeout);
                }
                // (Zero would mean no limit.)
                let left = left.max(Duration::from_millis(1));
                self.rx
                    .get_ref()
                    .0
                    .set_read_timeout(Some(left))
                    .map_err(|_| Failed::Closed)?;
            }
            match self.rx.next_frame(wait) {
                Ok(Next::Msg(frame)) => match wire::from_frame::<FromHub>(&frame) {
                    Ok(FromHub::Reply { id: got, reply }) if got == id => return Ok(reply),
                    // A recall is for queues; an older answer cannot come (a connection
                    // that timed out is not reused).
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!("procpool: a hub sent a malformed answer: {e}");
                        return Err(Failed::Closed);
                    }
                },
                Ok(Next::End) | Err(_) => return Err(Failed::Closed),
                Ok(Next::Nothing) => {}
            }
            if !wait {
                if Instant::now() < spin_until {
                    std::hint::spin_loop();
                } else {
                    wait = true;
                }
            } else if Instant::now() >= deadline {
                return Err(Failed::Timeout);
            }
        }
    }
}

/// The most a connection's send buffer keeps between calls (a large request's is let
/// go after it).
const KEEP: usize = 64 * 1024;

/// Writes all of `buf` (`NOSIGNAL`: an owner gone is an error, not a signal).
fn send_all(sock: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match rustix::net::send(sock, buf, rustix::net::SendFlags::NOSIGNAL) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The socket a direct connection reads (blocking, with a read timeout).
struct Stream(UnixStream);

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf) {
            // A signal: back to `answer`, which waits only what is left of its limit
            // (a retried read would wait the whole timeout again, for ever under a
            // steady signal).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
            other => other,
        }
    }
}

impl crate::wire::Source for Stream {
    fn read_now(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        crate::wire::Source::read_now(&mut self.0, buf)
    }
}

/// The most one look of [`SpinRead`] reads (a request is a few dozen bytes), and after
/// a look that filled its room (a large frame is coming).
const LOOK: usize = 4 * 1024;
const LOOK_MORE: usize = 256 * 1024;

/// A session's reader that, once told to [`spin`](Self::spin) (a direct session), keeps
/// looking for the next frame for [`SPIN`] after each read before it waits for the
/// reactor, giving the service thread back between looks (the task wakes itself; other
/// tasks run in between). Not for the shared sessions: a queue's stream of puts keeps
/// its consumer busy without it, and the looks would take a core from it.
pub(crate) struct SpinRead {
    inner: tokio::net::unix::OwnedReadHalf,
    spins: bool,
    until: Option<Instant>,
    look: usize,
}

impl SpinRead {
    pub(crate) fn new(inner: tokio::net::unix::OwnedReadHalf) -> Self {
        SpinRead {
            inner,
            spins: false,
            until: None,
            look: LOOK,
        }
    }

    pub(crate) fn spin(&mut self) {
        self.spins = true;
    }
}

impl AsyncRead for SpinRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(until) = self.until
            && buf.remaining() > 0
        {
            // As every tokio resource: a task that always finds data still yields.
            let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
            // Straight from the socket: the reactor's readiness is not refreshed while
            // this thread runs tasks. (The room is zeroed at every look: small, unless
            // the last look filled it.)
            let look = self.look;
            let sock: &tokio::net::UnixStream = self.inner.as_ref();
            let room = buf.initialize_unfilled_to(buf.remaining().min(look));
            let len = room.len();
            match rustix::net::recv(sock, room, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) => {
                    buf.advance(n);
                    coop.made_progress();
                    self.look = if n == len { LOOK_MORE } else { LOOK };
                    self.until = Some(Instant::now() + SPIN);
                    return Poll::Ready(Ok(()));
                }
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR)
                    if Instant::now() < until =>
                {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => self.until = None,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
        let before = buf.filled().len();
        let got = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = got
            && self.spins
            && buf.filled().len() > before
        {
            self.until = Some(Instant::now() + SPIN);
        }
        got
    }
}
