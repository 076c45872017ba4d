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

/// One thread's connection to one hub.
struct Direct {
    rx: BlockingChannel<Stream>,
    /// A second handle to the same socket, for writing.
    tx: UnixStream,
    out: BytesMut,
    next_id: u64,
    /// What this connection opened, and this process's view of it (dead: forget it).
    opened: HashMap<u64, Weak<Remote>>,
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
/// hold nothing).
pub(crate) fn call(remote: &Arc<Remote>, op: Op) -> Result<Reply, Error> {
    if remote.closed() {
        return Err(Error::Closed);
    }
    let limit = owner_timeout();
    let got = DIRECT.with(|all| {
        // Nothing below calls back into here; a thread-local being torn down (a call
        // from another thread-local's destructor) takes the shared connection.
        let Ok(mut all) = all.try_borrow_mut() else {
            return None;
        };
        let conn = match all.entry(remote.hub.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match Direct::open(&remote.hub) {
                Ok(c) => v.insert(c),
                Err(e) => {
                    tracing::debug!("procpool: a direct connection to a hub failed: {e}");
                    return Some(Err(Failed::Closed));
                }
            },
        };
        let got = conn.call(remote, op, limit);
        if let Err(Failed::Closed | Failed::Timeout) = got {
            // Broken, or an answer may still come: never reused.
            all.remove(&remote.hub);
        }
        Some(got)
    });
    match got {
        Some(Ok(reply)) => Ok(reply),
        None => Err(Error::Closed),
        Some(Err(Failed::Closed)) => Err(Error::Closed),
        Some(Err(Failed::TooLarge(reason))) => Err(Error::Encode {
            type_name: "a request to a shared object".to_owned(),
            reason,
        }),
        Some(Err(Failed::Timeout)) => {
            tracing::warn!(
                "procpool: the owner of a shared object did not answer within {limit:?}"
            );
            Err(Error::Timeout { after: limit })
        }
    }
}

impl Direct {
    fn open(hub: &HubRef) -> std::io::Result<Direct> {
        let stream = hub.connect()?;
        let tx = stream.try_clone()?;
        let conn = Direct {
            rx: BlockingChannel::new(Stream(stream), MAX_FRAME),
            tx,
            out: BytesMut::new(),
            next_id: 1,
            opened: HashMap::new(),
        };
        let mut hello = BytesMut::new();
        let fits = frame_into(
            &mut hello,
            &ToHub::Hello {
                token: hub.token,
                purpose: Purpose::Direct,
            },
        );
        debug_assert!(fits, "a hello is a few bytes");
        send_all(&conn.tx, &hello)?;
        Ok(conn)
    }

    fn feed(&mut self, msg: &ToHub) -> Result<(), Failed> {
        let start = self.out.len();
        if !frame_into(&mut self.out, msg) || self.out.len() - start - 4 > MAX_FRAME {
            self.out.truncate(start);
            return Err(Failed::TooLarge(format!(
                "a request is more than a frame holds ({MAX_FRAME} bytes)"
            )));
        }
        Ok(())
    }

    fn call(&mut self, remote: &Arc<Remote>, op: Op, limit: Duration) -> Result<Reply, Failed> {
        let deadline = Instant::now() + limit;
        let id = self.next_id;
        self.next_id += 1;
        self.feed(&ToHub::Req {
            id,
            obj: remote.obj,
            op,
        })?;
        // The request is queued first: a message too large leaves nothing else behind.
        let req = self.out.split();
        let dead: Vec<u64> = self
            .opened
            .iter()
            .filter(|(_, w)| w.strong_count() == 0)
            .map(|(&obj, _)| obj)
            .collect();
        for obj in dead {
            self.opened.remove(&obj);
            self.feed(&ToHub::Forget { obj })?;
        }
        let live = self
            .opened
            .get(&remote.obj)
            .is_some_and(|w| w.strong_count() > 0);
        if !live {
            self.feed(&ToHub::Open {
                obj: remote.obj,
                kind: remote.kind,
                key: remote.key,
            })?;
            self.opened.insert(remote.obj, Arc::downgrade(remote));
        }
        self.out.unsplit(req);
        let sent = send_all(&self.tx, &self.out);
        self.out.clear();
        sent.map_err(|_| Failed::Closed)?;
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

/// Writes all of `buf` (no `SIGPIPE` if the owner is gone: a child does not ignore it).
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
        self.0.read(buf)
    }
}

impl crate::wire::Source for Stream {
    fn read_now(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(rustix::net::recv(&self.0, buf, rustix::net::RecvFlags::DONTWAIT)?.0)
    }
}

/// The most one look of [`SpinRead`] reads (a request is a few dozen bytes; a larger
/// frame takes several looks).
const LOOK: usize = 4 * 1024;

/// A session's reader that, once told to [`spin`](Self::spin) (a direct session), keeps
/// looking for the next frame for [`SPIN`] after each read before it waits for the
/// reactor, giving the service thread back between looks (the task wakes itself; other
/// tasks run in between). Not for the shared sessions: a queue's stream of puts keeps
/// its consumer busy without it, and the looks would take a core from it.
pub(crate) struct SpinRead {
    inner: tokio::net::unix::OwnedReadHalf,
    spins: bool,
    until: Option<Instant>,
}

impl SpinRead {
    pub(crate) fn new(inner: tokio::net::unix::OwnedReadHalf) -> Self {
        SpinRead {
            inner,
            spins: false,
            until: None,
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
            // Straight from the socket: the reactor's readiness is not refreshed while
            // this thread runs tasks. (A small window: it is zeroed at every look.)
            let sock: &tokio::net::UnixStream = self.inner.as_ref();
            let room = buf.initialize_unfilled_to(buf.remaining().min(LOOK));
            match rustix::net::recv(sock, room, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) => {
                    buf.advance(n);
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
