//! A queue of another process, as this process sees it: the buffer of prefetched
//! items, and getting, acknowledging and giving back.

use super::*;

/// Items delivered to this process and not yet handed to a caller.
#[derive(Default)]
pub(crate) struct Buffer {
    items: VecDeque<(u64, Vec<u8>)>,
    /// The outstanding request for items, if any.
    want: Option<u64>,
    /// The last sequence number handed to a caller (acknowledged as it is).
    consumed: u64,
    /// Items handed out since the last request: how many to ask for next.
    streak: u32,
    getters: usize,
    closed: bool,
    /// When a caller last took an item from this buffer.
    last_take: Option<std::time::Instant>,
}

/// How long a consumer that is taking items keeps its batch when recalled.
pub(super) const RECALL_GRACE: Duration = Duration::from_millis(2);

impl Remote {
    pub(crate) fn on_items(&self, id: u64, reply: Reply) {
        let mut q = lock(&self.q);
        if q.want == Some(id) {
            q.want = None;
        }
        match reply {
            Reply::Items { first, items } => {
                for (i, item) in items.into_iter().enumerate() {
                    q.items.push_back((first + i as u64, item.into_vec()));
                }
            }
            Reply::Closed | Reply::Gone => q.closed = true,
            _ => {}
        }
        drop(q);
        self.changed.notify_waiters();
    }

    /// The owner wants back what we hold and have not handed out (someone else waits).
    /// A consumer still taking from its batch keeps it and is asked again shortly;
    /// an idle one gives everything back at once.
    pub(crate) fn on_recall(self: &Arc<Self>) {
        let mut q = lock(&self.q);
        if q.items.is_empty() {
            return;
        }
        if q.last_take.is_some_and(|t| t.elapsed() < RECALL_GRACE) {
            drop(q);
            let r = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(RECALL_GRACE).await;
                r.on_recall();
            });
            return;
        }
        if let (Some((from, _)), Some((to, _))) = (q.items.front(), q.items.back()) {
            let (from, to) = (*from, *to);
            q.items.clear();
            // Sent under the lock: no request for more items may overtake it.
            self.client.send(&hub::ToHub::Return {
                obj: self.obj,
                from,
                to,
            });
        }
    }

    pub(crate) fn on_closed(&self) {
        lock(&self.q).closed = true;
        self.changed.notify_waiters();
    }

    /// The next buffered item, acknowledged; `Err(Closed)` when none will come.
    pub(super) fn pop(&self) -> Result<Option<Vec<u8>>> {
        let mut q = lock(&self.q);
        match q.items.pop_front() {
            Some((seq, item)) => {
                q.consumed = seq;
                q.streak += 1;
                q.last_take = Some(std::time::Instant::now());
                drop(q);
                self.ack(seq);
                Ok(Some(item))
            }
            None if q.closed => Err(Error::Closed),
            None => Ok(None),
        }
    }

    /// Makes sure a request for items is on its way.
    pub(super) fn ensure_want(self: &Arc<Self>) {
        let mut q = lock(&self.q);
        if q.want.is_some() || q.closed {
            return;
        }
        let n = (q.streak * 2).clamp(1, MAX_PREFETCH);
        q.streak = 0;
        match self.want(n, true, None) {
            Some(id) => q.want = Some(id),
            None => q.closed = true,
        }
    }

    pub(super) async fn get(self: &Arc<Self>) -> Result<Vec<u8>> {
        let _getter = Getter::new(self);
        wait_until(&self.changed, || match self.pop() {
            Ok(Some(item)) => Some(Ok(item)),
            Ok(None) => {
                self.ensure_want();
                None
            }
            Err(e) => Some(Err(e)),
        })
        .await
    }

    pub(super) fn try_get(self: &Arc<Self>) -> Result<Option<Vec<u8>>> {
        if let Some(item) = self.pop()? {
            return Ok(Some(item));
        }
        let (tx, mut rx) = oneshot::channel();
        if self.want(1, false, Some(tx)).is_none() {
            return Err(Error::Closed);
        }
        // Some(Err): the connection ended; `pop` reports it. None: the owner did not
        // answer in time; an answer that comes later lands in the buffer.
        let limit = hub::owner_timeout();
        if hub::wait_for(&mut rx, limit).is_none() {
            tracing::warn!("procpool: the owner of a queue did not answer within {limit:?}");
            return Err(Error::Timeout { after: limit });
        }
        self.pop()
    }
}

/// Counts a waiting `get`; the last one to leave cancels the request for items nobody
/// waits for any more (items already on their way stay buffered here, or are recalled).
pub(super) struct Getter<'a>(&'a Arc<Remote>);

impl<'a> Getter<'a> {
    pub(super) fn new(r: &'a Arc<Remote>) -> Self {
        lock(&r.q).getters += 1;
        Getter(r)
    }
}

impl Drop for Getter<'_> {
    fn drop(&mut self) {
        let mut q = lock(&self.0.q);
        q.getters -= 1;
        if q.getters == 0
            && let Some(id) = q.want.take()
        {
            drop(q);
            self.0.cancel(id);
        }
    }
}
