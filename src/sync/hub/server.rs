//! This process's hub: its tables, the listener and each connection's session, and the
//! pipe ends it hands over (claims).

use super::*;

pub(crate) struct Hub {
    pub(crate) me: HubRef,
    /// Objects other processes may open, by id; removed when the object is dropped.
    pub(super) objects: Mutex<HashMap<u64, Registered>>,
    /// Objects kept alive for copies of their handles serialized outside task arguments,
    /// by ticket, with the object's id, until a process decodes that copy.
    pinned: Mutex<HashMap<u64, (u64, Obj)>>,
    /// Pipe ends parked until claimed, by id, with their key.
    exports: Mutex<HashMap<u64, (u64, OwnedFd)>>,
}

/// An object other processes may open.
pub(super) struct Registered {
    obj: WeakObj,
    /// The capability: a process must present it to open the object.
    key: u64,
}

/// The sizes of this process's sharing tables (see [`tables`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tables {
    /// Objects of this process that other processes may open (alive ones only).
    pub objects: usize,
    /// Objects kept alive for serialized copies of their handles nobody decoded yet.
    pub pinned: usize,
    /// Pipe ends parked for another process to claim.
    pub exports: usize,
    /// Requests of other processes parked in this process's objects (waiting `lock`,
    /// `get`, `put`, `join` and `wait` calls).
    pub parked: usize,
    /// Connections from this process to other processes' hubs.
    pub clients: usize,
    /// Requests this process sent to other processes' hubs, not answered yet.
    pub pending: usize,
    /// Other processes' objects this process has open.
    pub remotes: usize,
    /// Connections of single threads to other processes' hubs, for their blocking
    /// `Dict` calls (every thread's).
    pub direct: usize,
}

/// The sizes of this process's sharing tables, for tests that check nothing leaks.
#[doc(hidden)]
pub fn tables() -> Tables {
    let mut t = Tables::default();
    if let Some(h) = own() {
        let objects: Vec<WeakObj> = lock(&h.objects).values().map(|r| r.obj.clone()).collect();
        // Upgraded (and dropped) outside the table's lock: a drop may unregister.
        let alive: Vec<Obj> = objects.iter().filter_map(WeakObj::upgrade).collect();
        t.objects = alive.len();
        t.parked = alive.iter().map(|o| o.parked()).sum();
        drop(alive);
        t.pinned = lock(&h.pinned).len();
        t.exports = lock(&h.exports).len();
    }
    t.direct = super::direct::OPEN.load(Ordering::Relaxed);
    let clients: Vec<Arc<Client>> = lock(clients()).values().filter_map(Weak::upgrade).collect();
    t.clients = clients.len();
    for c in &clients {
        t.pending += lock(&c.pending).len();
        t.remotes += lock(&c.remotes)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count();
    }
    t
}

pub(super) static HUB: OnceLock<Result<Arc<Hub>, String>> = OnceLock::new();
pub(super) static NEXT_ID: AtomicU64 = AtomicU64::new(1);
pub(super) static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// A process-unique id for an object or an export.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Object `id` was dropped: no process can open it any more.
pub(crate) fn unregister(id: u64) {
    if let Some(h) = own() {
        lock(&h.objects).remove(&id);
    }
}

/// This process's hub if it was started.
pub(crate) fn own() -> Option<&'static Arc<Hub>> {
    HUB.get().and_then(|h| h.as_ref().ok())
}

/// This process's hub, started on first use.
pub(crate) fn hub() -> Result<&'static Arc<Hub>, String> {
    HUB.get_or_init(start).as_ref().map_err(Clone::clone)
}

pub(super) fn random_u64() -> Result<u64, String> {
    let mut b = [0u8; 8];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| format!("getrandom failed: {e}"))?;
    Ok(u64::from_ne_bytes(b))
}

pub(super) fn start() -> Result<Arc<Hub>, String> {
    let me = HubRef {
        name: format!("procpool/{}/{:016x}", std::process::id(), random_u64()?),
        token: random_u64()?,
    };
    let addr = SocketAddr::from_abstract_name(me.name.as_bytes())
        .map_err(|e| format!("bad hub address: {e}"))?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)
        .map_err(|e| format!("cannot listen on the hub socket: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("hub socket: {e}"))?;
    let hub = Arc::new(Hub {
        me,
        objects: Mutex::default(),
        pinned: Mutex::default(),
        exports: Mutex::default(),
    });
    let serving = Arc::clone(&hub);
    crate::runtime::service::run(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("procpool: the hub cannot serve: {e}");
                return;
            }
        };
        serving.accept_loop(listener).await;
    })
    .map_err(|e| e.to_string())?;
    Ok(hub)
}

impl Hub {
    /// Makes `obj` reachable from other processes under `id`, and returns its key (the
    /// same for every copy of its handles).
    pub(crate) fn register(&self, id: u64, obj: &Obj) -> Result<u64, String> {
        let mut objects = lock(&self.objects);
        if let Some(r) = objects.get(&id) {
            return Ok(r.key);
        }
        let key = random_u64()?;
        objects.insert(
            id,
            Registered {
                obj: Arc::downgrade(obj),
                key,
            },
        );
        Ok(key)
    }

    /// The object `id`, if it still exists here and `key` is its key.
    pub(crate) fn find(&self, id: u64, kind: Kind, key: u64) -> Option<Obj> {
        let objects = lock(&self.objects);
        let found = objects
            .get(&id)
            .filter(|r| r.key == key)
            .and_then(|r| r.obj.upgrade());
        // Dropped outside the lock: if it was the last reference, its drop unregisters.
        drop(objects);
        found.filter(|o| o.kind() == kind)
    }

    /// Keeps `obj` (id `id`) alive until a process decodes the copy of its handle that
    /// carries the returned ticket.
    pub(super) fn pin_ticket(&self, id: u64, obj: Obj) -> u64 {
        // Random, as keys are: a process that has the object open cannot give back
        // tickets of copies in flight to others by counting. (Sequential if the system
        // has no randomness to give, which `register` has already refused.)
        let ticket = random_u64()
            .ok()
            .filter(|&t| t != 0)
            .unwrap_or_else(|| NEXT_TICKET.fetch_add(1, Ordering::Relaxed));
        lock(&self.pinned).insert(ticket, (id, obj));
        ticket
    }

    /// The copy of object `id`'s handle that `ticket` kept alive was decoded (or will
    /// never be: its put failed).
    pub(crate) fn unpin(&self, ticket: u64, id: u64) {
        let mut pinned = lock(&self.pinned);
        let gone = match pinned.get(&ticket) {
            Some((obj, _)) if *obj == id => pinned.remove(&ticket),
            _ => None,
        };
        drop(pinned);
        // Dropped outside the lock (see `find`).
        drop(gone);
    }

    /// Parks a pipe end until another process claims it; returns its id and key.
    pub(crate) fn export(&self, fd: OwnedFd) -> Result<(u64, u64), String> {
        let id = next_id();
        let key = random_u64()?;
        lock(&self.exports).insert(id, (key, fd));
        Ok((id, key))
    }

    /// Takes parked pipe end `id` if `key` is its key.
    pub(crate) fn take_export(&self, id: u64, key: u64) -> Option<OwnedFd> {
        let mut exports = lock(&self.exports);
        match exports.get(&id) {
            Some((k, _)) if *k == key => exports.remove(&id).map(|(_, fd)| fd),
            _ => None,
        }
    }

    pub(super) async fn accept_loop(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let uid = rustix::process::geteuid();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of fds, most likely: wait instead of spinning.
                    tracing::warn!("procpool: the hub cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match rustix::net::sockopt::socket_peercred(&stream) {
                Ok(cred) if cred.uid == uid => {}
                _ => continue,
            }
            let hub = Arc::clone(&self);
            tokio::spawn(async move { hub.serve(stream).await });
        }
    }

    pub(super) async fn serve(self: Arc<Self>, stream: tokio::net::UnixStream) {
        let (rd, wr) = stream.into_split();
        // Before it is authenticated, a connection may send one small Hello, soon.
        let mut frames = FramedRead::new(SpinRead::new(rd), wire::codec(MAX_HELLO));
        let purpose = match tokio::time::timeout(HELLO_TIMEOUT, frames.next()).await {
            Ok(Some(Ok(f))) => match wire::from_frame::<ToHub>(&f) {
                Ok(ToHub::Hello { token, purpose }) if token == self.me.token => purpose,
                _ => return,
            },
            _ => return,
        };
        frames.decoder_mut().set_max_frame(MAX_FRAME);
        match purpose {
            Purpose::Claim { export, key } => {
                let fd = self.take_export(export, key);
                if let Err(e) = send_fd(wr.as_ref(), fd).await {
                    tracing::debug!("procpool: handing over a pipe end failed: {e}");
                }
            }
            Purpose::Session => self.session(frames, wr).await,
            Purpose::Direct => {
                frames.get_mut().spin();
                self.session(frames, wr).await
            }
        }
    }

    pub(super) async fn session(
        &self,
        mut frames: FramedRead<SpinRead, wire::FrameCodec>,
        wr: tokio::net::unix::OwnedWriteHalf,
    ) {
        static NEXT_PEER: AtomicU64 = AtomicU64::new(1);
        let out = Outbox::new();
        let peer = Arc::new(Peer {
            id: NEXT_PEER.fetch_add(1, Ordering::Relaxed),
            out: Arc::clone(&out),
        });
        tokio::spawn(Arc::clone(&out).write_loop(wr));
        // What this process opened, with how many times.
        let mut open: HashMap<u64, (Obj, u32)> = HashMap::new();
        while let Some(Ok(frame)) = frames.next().await {
            let Ok(msg) = wire::from_frame::<ToHub>(&frame) else {
                tracing::warn!("procpool: the hub got a malformed frame; dropping that connection");
                break;
            };
            match msg {
                ToHub::Hello { .. } => break,
                ToHub::Open { obj, kind, key } => {
                    if let Some((_, n)) = open.get_mut(&obj) {
                        *n += 1;
                    } else if let Some(o) = self.find(obj, kind, key) {
                        open.insert(obj, (o, 1));
                    }
                }
                ToHub::Unpin { obj, ticket } => {
                    // Only a process that opened the object (it knew the key) may.
                    if open.contains_key(&obj) {
                        self.unpin(ticket, obj);
                    }
                }
                ToHub::Forget { obj } => {
                    if let Some((_, n)) = open.get_mut(&obj) {
                        *n -= 1;
                        if *n == 0
                            && let Some((o, _)) = open.remove(&obj)
                        {
                            o.peer_gone(&peer);
                        }
                    }
                }
                ToHub::Req {
                    id, op: Op::Sync, ..
                } => peer.reply(id, Reply::Ok),
                ToHub::Req { id, obj, op } => match open.get(&obj) {
                    Some((o, _)) => o.remote_op(&peer, id, op),
                    None => peer.reply(id, Reply::Gone),
                },
                ToHub::Cancel { obj, id } => {
                    if let Some((o, _)) = open.get(&obj) {
                        o.cancel(&peer, id);
                    }
                }
                // A queue's or a lock's frames: an object of another kind ignores them.
                ToHub::Puts { obj, items } => {
                    if let Some((o, _)) = open.get(&obj) {
                        o.puts(items);
                    }
                }
                ToHub::Ack { obj, upto } => {
                    if let Some((o, _)) = open.get(&obj) {
                        o.ack(&peer, upto);
                    }
                }
                ToHub::Return { obj, from, to } => {
                    if let Some((o, _)) = open.get(&obj) {
                        o.give_back(&peer, from, to);
                    }
                }
                ToHub::Release { obj } => {
                    if let Some((o, _)) = open.get(&obj) {
                        Arc::clone(o).release_peer(&peer);
                    }
                }
            }
        }
        // The process is gone (or broke the protocol): undo what it held.
        for (_, (o, _)) in open.drain() {
            o.peer_gone(&peer);
        }
        out.close();
    }
}

pub(super) async fn send_fd(
    sock: &tokio::net::UnixStream,
    fd: Option<OwnedFd>,
) -> std::io::Result<()> {
    loop {
        sock.writable().await?;
        let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
            let byte = [u8::from(fd.is_some())];
            wire::fdpass::send_with_fd(sock, &byte, fd.as_ref().map(|f| f.as_fd()))
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A pipe end on its way: [`claim_later`] fetches it on procpool's service thread while
/// the caller goes on; the end's first use waits for it.
#[derive(Default)]
pub(crate) struct Arrival {
    /// The claim's outcome, until the end that waits for it takes it.
    got: Mutex<Option<Result<OwnedFd, String>>>,
    done: AtomicBool,
    cv: std::sync::Condvar,
    notify: Notify,
}

impl Arrival {
    pub(super) fn finish(&self, got: Result<OwnedFd, String>) {
        let mut slot = lock(&self.got);
        *slot = Some(got);
        // Under the lock that `wait_blocking` checks it under: no wake-up is lost.
        self.done.store(true, Ordering::Release);
        drop(slot);
        self.cv.notify_all();
        self.notify.notify_waiters();
        arriving_done();
    }

    /// Whether the claim finished (its outcome may already be taken).
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Runs `f` with the outcome slot, under its lock (so that one caller takes it).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Option<Result<OwnedFd, String>>) -> R) -> R {
        f(&mut lock(&self.got))
    }

    /// Blocks this thread until the claim finished (it always does, within
    /// [`CLAIM_TIMEOUT`], more only if the service thread is starved), or at most `limit`.
    pub(crate) fn wait_blocking(&self, limit: Duration) {
        let got = lock(&self.got);
        let waited = self
            .cv
            .wait_timeout_while(got, limit, |_| !self.is_done())
            .map(|(_, t)| t.timed_out())
            .unwrap_or(false);
        if waited && limit >= CLAIM_TIMEOUT {
            tracing::warn!("procpool: a pipe end did not arrive within {limit:?}");
        }
    }

    /// Waits until the claim finished.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }
}

/// Claims in flight from this process (see [`settle`], which waits for them: the sender
/// keeps a pipe end parked only until the child that receives it reports its result).
pub(super) static ARRIVING: Mutex<usize> = Mutex::new(0);
pub(super) static ARRIVED: std::sync::Condvar = std::sync::Condvar::new();

pub(super) fn arriving_done() {
    let mut n = lock(&ARRIVING);
    *n = n.saturating_sub(1);
    ARRIVED.notify_all();
}

/// Starts claiming pipe end `export` from the hub at `hub` without waiting for it: from
/// this process's own hub it is there at once; from another, the claim (a connection
/// and one answer, bounded by [`CLAIM_TIMEOUT`]) runs on a thread of procpool's service
/// runtime, so decoding a pipe end never blocks the caller (an async runtime's thread).
pub(crate) fn claim_later(hub: &HubRef, export: u64, key: u64) -> Arc<Arrival> {
    let arrival = Arc::new(Arrival::default());
    *lock(&ARRIVING) += 1;
    if let Some(h) = own()
        && h.me == *hub
    {
        arrival.finish(claim(hub, export, key));
        return arrival;
    }
    let (hub, filled) = (hub.clone(), Arc::clone(&arrival));
    let started = crate::runtime::service::run(async move {
        let got = tokio::task::spawn_blocking(move || claim(&hub, export, key))
            .await
            .unwrap_or_else(|e| Err(format!("the claim of a pipe end failed: {e}")));
        filled.finish(got);
    });
    if let Err(e) = started {
        arrival.finish(Err(e.to_string()));
    }
    arrival
}

/// Takes pipe end `export` from the hub at `hub` (blocking, briefly: the hub answers at
/// once from its service thread).
pub(crate) fn claim(hub: &HubRef, export: u64, key: u64) -> Result<OwnedFd, String> {
    if let Some(h) = own()
        && h.me == *hub
    {
        return h
            .take_export(export, key)
            .ok_or_else(|| "the pipe end was already taken or dropped".to_owned());
    }
    let gone = |e: std::io::Error| format!("the process that sent the pipe end is gone ({e})");
    let mut sock = hub.connect().map_err(gone)?;
    sock.set_read_timeout(Some(CLAIM_TIMEOUT)).map_err(gone)?;
    let mut hello = BytesMut::new();
    let claim = ToHub::Hello {
        token: hub.token,
        purpose: Purpose::Claim { export, key },
    };
    if !frame_into(&mut hello, &claim) {
        unreachable!("a Hello is a few bytes");
    }
    sock.write_all(&hello).map_err(gone)?;
    let mut byte = [0u8; 1];
    let (got, fd) = wire::fdpass::recv_with_fd(&sock, &mut byte).map_err(gone)?;
    match (got, byte[0], fd) {
        (1, 1, Some(fd)) => Ok(fd),
        (1, 0, _) => Err("the pipe end was already taken or dropped".to_owned()),
        _ => Err("the process that sent the pipe end did not hand it over".to_owned()),
    }
}
