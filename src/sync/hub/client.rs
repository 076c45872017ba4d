//! The client side: this process using objects of another process, over one connection
//! per owner.

use super::*;

/// One connection from this process to another process's hub.
pub(crate) struct Client {
    pub(crate) out: Arc<Outbox>,
    next_req: AtomicU64,
    pub(super) pending: Mutex<HashMap<u64, Pending>>,
    pub(super) remotes: Mutex<HashMap<u64, Weak<Remote>>>,
    pub(super) closed: AtomicBool,
    /// Something was sent since the last [`settle`].
    dirty: AtomicBool,
}

pub(super) enum Pending {
    /// An answer for a caller; `obj` to undo an unwanted lock grant.
    Reply {
        obj: u64,
        tx: oneshot::Sender<Answer>,
    },
    /// Items for a queue's buffer.
    Want {
        remote: Weak<Remote>,
        done: Option<oneshot::Sender<()>>,
    },
}

pub(super) fn clients() -> &'static Mutex<HashMap<HubRef, Weak<Client>>> {
    static CLIENTS: OnceLock<Mutex<HashMap<HubRef, Weak<Client>>>> = OnceLock::new();
    CLIENTS.get_or_init(Mutex::default)
}

impl Client {
    /// The connection to `hub`, opened if needed. Does not block: the connect of a unix
    /// socket completes at once, and the I/O runs on the service thread.
    pub(super) fn get(hub: &HubRef) -> Result<Arc<Client>, String> {
        let mut all = lock(clients());
        if let Some(c) = all.get(hub).and_then(Weak::upgrade)
            && !c.closed.load(Ordering::SeqCst)
        {
            return Ok(c);
        }
        let stream = hub
            .connect()
            .map_err(|e| format!("the process that created it is gone ({e})"))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("hub connection: {e}"))?;
        let client = Arc::new(Client {
            out: Outbox::new(),
            next_req: AtomicU64::new(1),
            pending: Mutex::default(),
            remotes: Mutex::default(),
            closed: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
        });
        client.out.push(&ToHub::Hello {
            token: hub.token,
            purpose: Purpose::Session,
        });
        let io = Arc::clone(&client);
        crate::runtime::service::run(async move { io.run(stream).await })
            .map_err(|e| e.to_string())?;
        all.retain(|_, w| w.strong_count() > 0);
        all.insert(hub.clone(), Arc::downgrade(&client));
        Ok(client)
    }

    pub(super) async fn run(self: Arc<Self>, stream: std::os::unix::net::UnixStream) {
        // (Runs on the service thread: `Remote::on_recall` may spawn a retry there.)
        let stream = match tokio::net::UnixStream::from_std(stream) {
            Ok(s) => s,
            Err(_) => return self.fail(),
        };
        let (rd, wr) = stream.into_split();
        let writer = tokio::spawn(Arc::clone(&self.out).write_loop(wr));
        let mut frames = FramedRead::new(rd, wire::codec(MAX_FRAME));
        while let Some(Ok(frame)) = frames.next().await {
            match wire::from_frame::<FromHub>(&frame) {
                Ok(FromHub::Reply { id, reply }) => self.on_reply(id, reply),
                Ok(FromHub::Recall { obj }) => {
                    let r = lock(&self.remotes).get(&obj).and_then(Weak::upgrade);
                    if let Some(r) = r {
                        r.on_recall();
                    }
                }
                Err(_) => break,
            }
        }
        writer.abort();
        self.fail();
    }

    pub(super) fn on_reply(self: &Arc<Self>, id: u64, reply: Reply) {
        let pending = lock(&self.pending).remove(&id);
        match pending {
            Some(Pending::Reply { obj, tx }) => {
                // If the caller is gone, the answer is dropped here (see `Answer`).
                drop(tx.send(Answer {
                    reply: Some(reply),
                    client: Arc::downgrade(self),
                    obj,
                }));
            }
            Some(Pending::Want { remote, done }) => {
                if let Some(r) = remote.upgrade() {
                    r.on_items(id, reply);
                }
                if let Some(done) = done {
                    // Err: the caller stopped waiting; the items stay buffered.
                    done.send(()).ok();
                }
            }
            None => {}
        }
    }

    /// The hub is gone: every waiting caller gets `Closed`.
    pub(super) fn fail(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.out.close();
        let pending: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        drop(pending);
        let remotes: Vec<Arc<Remote>> = lock(&self.remotes)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for r in remotes {
            r.on_closed();
        }
    }

    pub(crate) fn send<M: Serialize>(&self, msg: &M) -> bool {
        self.dirty.store(true, Ordering::Relaxed);
        self.out.push(msg)
    }

    pub(super) fn next_id(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the owner to confirm it applied everything sent before, if anything was
    /// sent since the last confirmation; where its answer will arrive. `None` if there is
    /// nothing to confirm, or nothing to wait for (the owner is gone).
    fn ask_confirm(&self) -> Option<oneshot::Receiver<Answer>> {
        if !self.dirty.swap(false, Ordering::AcqRel) || self.closed.load(Ordering::SeqCst) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next_id();
        lock(&self.pending).insert(id, Pending::Reply { obj: 0, tx });
        if self.out.push(&ToHub::Req {
            id,
            obj: 0,
            op: Op::Sync,
        }) {
            Some(rx)
        } else {
            lock(&self.pending).remove(&id);
            None
        }
    }

    /// Waits until the owner applied what this process sent it on this connection (see
    /// [`ask_confirm`](Self::ask_confirm)), at most until `deadline`: a call made on
    /// another connection to the same owner (see `direct`) then comes after all of it,
    /// as a process's operations reach an owner in order.
    pub(crate) fn confirm_sent(&self, deadline: std::time::Instant) -> Result<(), Error> {
        let Some(mut rx) = self.ask_confirm() else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match wait_for(&mut rx, left) {
            Some(Ok(_)) => Ok(()),
            // The hub went away, and with it anything to order against.
            Some(Err(_)) => Ok(()),
            None => {
                self.dirty.store(true, Ordering::Relaxed);
                Err(Error::Timeout {
                    after: owner_timeout(),
                })
            }
        }
    }
}

/// An answer from a hub. A lock grant that nobody takes (its caller gave up while it
/// was on its way) is released when the answer is dropped.
pub(crate) struct Answer {
    reply: Option<Reply>,
    client: Weak<Client>,
    obj: u64,
}

impl Answer {
    pub(crate) fn take(mut self) -> Reply {
        self.reply.take().unwrap_or(Reply::Gone)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(Reply::Granted { .. }) = self.reply
            && let Some(c) = self.client.upgrade()
        {
            c.send(&ToHub::Release { obj: self.obj });
        }
    }
}

/// This process's view of one object of another process: shared by every handle to it
/// here.
pub(crate) struct Remote {
    pub(crate) client: Arc<Client>,
    pub(crate) obj: u64,
    /// The queue state (unused for locks and events).
    pub(crate) q: Mutex<super::super::queue::Buffer>,
    pub(crate) changed: Notify,
    /// Where the object lives, and what opens it: for [`direct`](super::direct) calls,
    /// which open it again on a connection of their own.
    pub(super) hub: HubRef,
    pub(super) key: u64,
    pub(super) kind: Kind,
}

impl Remote {
    /// Opens object `obj` of `hub` (or joins this process's existing view of it).
    pub(crate) fn open(
        hub: &HubRef,
        obj: u64,
        key: u64,
        kind: Kind,
    ) -> Result<Arc<Remote>, String> {
        let client = Client::get(hub)?;
        let mut remotes = lock(&client.remotes);
        if let Some(r) = remotes.get(&obj).and_then(Weak::upgrade) {
            return Ok(r);
        }
        let r = Arc::new(Remote {
            client: Arc::clone(&client),
            obj,
            q: Mutex::default(),
            changed: Notify::new(),
            hub: hub.clone(),
            key,
            kind,
        });
        remotes.retain(|_, w| w.strong_count() > 0);
        remotes.insert(obj, Arc::downgrade(&r));
        // Queued before the lock is let go: another thread that finds this view next
        // sends its requests (or an `Unpin`) only after the `Open`. (The outbox takes
        // no other lock.)
        client.send(&ToHub::Open { obj, kind, key });
        drop(remotes);
        Ok(r)
    }

    pub(crate) fn closed(&self) -> bool {
        self.client.closed.load(Ordering::SeqCst)
    }

    /// Sends request `op` and returns where its answer will arrive.
    pub(crate) fn request(&self, op: Op) -> Result<(u64, oneshot::Receiver<Answer>), Error> {
        let (tx, rx) = oneshot::channel();
        let id = self.client.next_id();
        lock(&self.client.pending).insert(id, Pending::Reply { obj: self.obj, tx });
        if self.closed()
            || !self.client.send(&ToHub::Req {
                id,
                obj: self.obj,
                op,
            })
        {
            lock(&self.client.pending).remove(&id);
            return Err(Error::Closed);
        }
        Ok((id, rx))
    }

    /// Sends `op` and waits for the answer. If the future is dropped first, the request
    /// is withdrawn (a parked get, put, lock or wait leaves its line; a lock granted on
    /// the way is released, see [`Answer`]).
    pub(crate) async fn call(&self, op: Op) -> Result<Reply, Error> {
        let (id, rx) = self.request(op)?;
        let mut withdraw = Withdraw(self, Some(id));
        let answer = rx.await.map_err(|_| Error::Closed)?;
        withdraw.1 = None;
        Ok(answer.take())
    }

    /// [`call`](Self::call) from synchronous code, for calls that answer at once
    /// (`is_set`, `len`, `try_lock`, ...), which may be made from async code: waits at
    /// most [`OWNER_TIMEOUT`] for an owner that does not answer, then withdraws the
    /// request (an answer that comes later is handled as for a dropped `call`) and
    /// fails with [`Error::Timeout`].
    pub(crate) fn blocking_call(&self, op: Op) -> Result<Reply, Error> {
        let (id, mut rx) = self.request(op)?;
        let limit = owner_timeout();
        match wait_for(&mut rx, limit) {
            Some(Ok(answer)) => Ok(answer.take()),
            Some(Err(_)) => Err(Error::Closed),
            None => {
                self.cancel(id);
                tracing::warn!(
                    "procpool: the owner of a shared object did not answer within {limit:?}"
                );
                Err(Error::Timeout { after: limit })
            }
        }
    }

    /// Asks for queue items; they land in this process's buffer. `done` fires when the
    /// answer arrived.
    pub(crate) fn want(
        self: &Arc<Self>,
        n: u32,
        wait: bool,
        done: Option<oneshot::Sender<()>>,
    ) -> Option<u64> {
        let id = self.client.next_id();
        lock(&self.client.pending).insert(
            id,
            Pending::Want {
                remote: Arc::downgrade(self),
                done,
            },
        );
        let sent = self.client.send(&ToHub::Req {
            id,
            obj: self.obj,
            op: Op::Want { n, wait },
        });
        if !sent {
            lock(&self.client.pending).remove(&id);
            return None;
        }
        Some(id)
    }

    pub(crate) fn cancel(&self, id: u64) {
        self.client.send(&ToHub::Cancel { obj: self.obj, id });
    }

    /// A guard that withdraws request `id` unless disarmed.
    pub(crate) fn withdraw_on_drop(&self, id: u64) -> Withdraw<'_> {
        Withdraw(self, Some(id))
    }

    pub(crate) fn put_unbounded(&self, item: Vec<u8>) -> bool {
        self.client.dirty.store(true, Ordering::Relaxed);
        !self.closed() && self.client.out.push_put(self.obj, item)
    }

    pub(crate) fn ack(&self, upto: u64) {
        self.client.dirty.store(true, Ordering::Relaxed);
        self.client.out.push_ack(self.obj, upto);
    }
}

/// Withdraws a request whose caller went away.
pub(crate) struct Withdraw<'a>(&'a Remote, Option<u64>);

impl Withdraw<'_> {
    /// The answer arrived: nothing to withdraw.
    pub(crate) fn disarm(mut self) {
        self.1 = None;
    }
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.1 {
            self.0.cancel(id);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Every item handed out was acknowledged as it was; whatever is still buffered
        // is put back by the hub when it forgets us.
        self.client.send(&ToHub::Forget { obj: self.obj });
    }
}

/// Waits until everything this process sent to other processes' hubs has been applied.
///
/// A child calls it after each task and before it reports the result, so a parent that
/// sees the result also sees the items the task put, the locks it released and the
/// events it set. Every owner is asked at once, and all of them get [`OWNER_TIMEOUT`]
/// together: an owner that does not answer by then (stopped, or overloaded) is logged
/// as a warning and asked again at the next settle; the result is reported anyway.
pub(crate) fn settle() {
    let limit = owner_timeout();
    let deadline = std::time::Instant::now() + limit;
    // Pipe ends this process is still claiming: their senders let go of them once the
    // result is reported.
    let arriving = lock(&ARRIVING);
    let (arriving, waited) = ARRIVED
        .wait_timeout_while(arriving, limit, |n| *n > 0)
        .unwrap_or_else(|p| p.into_inner());
    if waited.timed_out() {
        tracing::warn!(
            "procpool: {} pipe end(s) did not arrive within {limit:?}",
            *arriving
        );
    }
    drop(arriving);
    let all: Vec<Arc<Client>> = lock(clients()).values().filter_map(Weak::upgrade).collect();
    let mut waiting = Vec::new();
    for c in all {
        // None: nothing sent since the last confirmation, or the hub is gone.
        if let Some(rx) = c.ask_confirm() {
            waiting.push((c, rx));
        }
    }
    for (c, mut rx) in waiting {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Some(Err): the hub went away, and with it anything to wait for.
        if wait_for(&mut rx, left).is_none() {
            c.dirty.store(true, Ordering::Relaxed);
            tracing::warn!(
                "procpool: the owner of a shared object did not confirm within {limit:?} \
                 what this process sent it; the result is reported without that \
                 confirmation"
            );
        }
    }
}
