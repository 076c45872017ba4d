//! The queue itself, in the process that created it (its owner): items, holders in
//! other processes, and the requests parked there.

use super::*;

pub(crate) struct QueueCore {
    pub(crate) id: u64,
    pub(super) st: Mutex<QState>,
    /// Wakes waiters in this process: items, room, closing, `join`.
    pub(super) changed: Notify,
}

pub(super) struct QState {
    items: VecDeque<Vec<u8>>,
    cap: Option<usize>,
    closed: bool,
    /// Items put and not yet marked done (`task_done`).
    unfinished: u64,
    /// Items handed to other processes and not yet acknowledged, by process.
    held: HashMap<u64, Held>,
    held_count: usize,
    /// Consumers in other processes waiting for items.
    wants: VecDeque<(Arc<Peer>, u64, u32)>,
    /// Producers in other processes waiting for room.
    puts: VecDeque<(Arc<Peer>, u64, Vec<u8>)>,
    joiners: Vec<(Arc<Peer>, u64)>,
}

pub(super) struct Held {
    peer: Arc<Peer>,
    next_seq: u64,
    items: VecDeque<(u64, Vec<u8>)>,
    recalled: bool,
}

pub(super) enum Take {
    Item(Vec<u8>),
    Empty,
    Closed,
}

pub(super) enum Put {
    Done,
    Full(Vec<u8>),
    Closed,
}

impl QState {
    pub(super) fn count(&self) -> usize {
        self.items.len() + self.held_count
    }

    pub(super) fn has_room(&self) -> bool {
        self.cap.is_none_or(|c| self.count() < c)
    }

    /// Whether a process other than `peer` holds items it has not acknowledged. While
    /// one does, nobody else is served: those items may come back (recalled, or their
    /// holder died) and must then be handed out before anything newer, or a consumer
    /// could see a producer's items out of order.
    pub(super) fn others_hold(&self, peer: Option<u64>) -> bool {
        self.held
            .iter()
            .any(|(p, h)| Some(*p) != peer && !h.items.is_empty())
    }

    /// Closed, and nothing left that could still be handed out.
    pub(super) fn drained(&self) -> bool {
        self.closed && self.items.is_empty() && self.held_count == 0
    }

    pub(super) fn push(&mut self, item: Vec<u8>) {
        self.items.push_back(item);
        self.unfinished += 1;
    }

    /// Hands items to waiting consumers of other processes and admits waiting producers,
    /// until neither can move.
    pub(super) fn serve(&mut self, qid: u64) {
        loop {
            let mut moved = false;
            while !self.items.is_empty() {
                let Some(peer) = self.wants.front().map(|(p, _, _)| p.id) else {
                    break;
                };
                if self.others_hold(Some(peer)) {
                    self.recall(qid, Some(peer));
                    break;
                }
                let Some((peer, id, n)) = self.wants.pop_front() else {
                    break;
                };
                self.deliver(&peer, id, n);
                moved = true;
            }
            while self.has_room() && !self.closed {
                let Some((peer, id, item)) = self.puts.pop_front() else {
                    break;
                };
                self.push(item);
                peer.reply(id, Reply::Ok);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        if self.items.is_empty() && !self.wants.is_empty() {
            self.recall(qid, None);
        }
        if self.drained() {
            for (peer, id, _) in self.wants.drain(..) {
                peer.reply(id, Reply::Closed);
            }
        }
    }

    pub(super) fn deliver(&mut self, peer: &Arc<Peer>, id: u64, n: u32) {
        let held = self.held.entry(peer.id).or_insert_with(|| Held {
            peer: Arc::clone(peer),
            next_seq: 1,
            items: VecDeque::new(),
            recalled: false,
        });
        held.recalled = false;
        let first = held.next_seq;
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < n.max(1) as usize && (out.is_empty() || bytes < MAX_BATCH_BYTES) {
            let Some(item) = self.items.pop_front() else {
                break;
            };
            bytes += item.len();
            out.push(ByteBuf::from(item.clone()));
            held.items.push_back((held.next_seq, item));
            held.next_seq += 1;
        }
        self.held_count += out.len();
        peer.reply(id, Reply::Items { first, items: out });
    }

    /// Asks processes sitting on items they have not handed out to give them back:
    /// someone (`except` aside) is waiting.
    pub(super) fn recall(&mut self, qid: u64, except: Option<u64>) {
        for (pid, held) in &mut self.held {
            if Some(*pid) != except && !held.recalled && !held.items.is_empty() {
                held.recalled = true;
                held.peer.recall(qid);
            }
        }
    }

    pub(super) fn requeue(&mut self, items: impl DoubleEndedIterator<Item = Vec<u8>>) {
        for item in items.rev() {
            self.items.push_front(item);
        }
    }
}

impl QueueCore {
    pub(crate) fn new(cap: Option<usize>) -> Arc<Self> {
        Arc::new(QueueCore {
            id: hub::next_id(),
            st: Mutex::new(QState {
                items: VecDeque::new(),
                cap,
                closed: false,
                unfinished: 0,
                held: HashMap::new(),
                held_count: 0,
                wants: VecDeque::new(),
                puts: VecDeque::new(),
                joiners: Vec::new(),
            }),
            changed: Notify::new(),
        })
    }

    pub(super) fn update<R>(&self, f: impl FnOnce(&mut QState) -> R) -> R {
        let mut st = lock(&self.st);
        let r = f(&mut st);
        st.serve(self.id);
        drop(st);
        self.changed.notify_waiters();
        r
    }

    /// Takes the front item. Waiters are notified only when something changed: a
    /// waiter's own failed attempt must not wake it.
    pub(super) fn take(&self) -> Take {
        let mut st = lock(&self.st);
        if st.drained() {
            return Take::Closed;
        }
        if st.others_hold(None) {
            st.recall(self.id, None);
            return Take::Empty;
        }
        match st.items.pop_front() {
            Some(item) => {
                st.serve(self.id);
                drop(st);
                self.changed.notify_waiters();
                Take::Item(item)
            }
            None => {
                st.recall(self.id, None);
                Take::Empty
            }
        }
    }

    pub(super) fn put(&self, item: Vec<u8>) -> Put {
        let mut st = lock(&self.st);
        if st.closed {
            Put::Closed
        } else if st.has_room() {
            st.push(item);
            st.serve(self.id);
            drop(st);
            self.changed.notify_waiters();
            Put::Done
        } else {
            Put::Full(item)
        }
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.st).count()
    }

    pub(super) fn close(&self) {
        // `update` serves: waiting consumers get what is left, then `Closed`.
        self.update(|st| {
            st.closed = true;
            for (peer, id, _) in st.puts.drain(..) {
                peer.reply(id, Reply::Closed);
            }
        });
    }

    pub(super) fn task_done(&self) -> std::result::Result<(), String> {
        self.update(|st| {
            if st.unfinished == 0 {
                return Err("task_done() called more times than there were items".to_owned());
            }
            st.unfinished -= 1;
            if st.unfinished == 0 {
                for (peer, id) in st.joiners.drain(..) {
                    peer.reply(id, Reply::Ok);
                }
            }
            Ok(())
        })
    }

    pub(super) fn unfinished(&self) -> u64 {
        lock(&self.st).unfinished
    }
}

/// What the hub does with a queue's frames.
impl Served for QueueCore {
    fn kind(&self) -> Kind {
        Self::KIND
    }

    fn parked(&self) -> usize {
        let st = lock(&self.st);
        st.wants.len() + st.puts.len() + st.joiners.len()
    }

    /// Items for an unbounded queue from another process.
    fn puts(&self, items: Vec<ByteBuf>) {
        self.update(|st| {
            if !st.closed {
                for item in items {
                    st.push(item.into_vec());
                }
            }
        });
    }

    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        match op {
            Op::Close => {
                self.close();
                peer.reply(id, Reply::Ok);
            }
            Op::TaskDone => match self.task_done() {
                Ok(()) => peer.reply(id, Reply::Ok),
                Err(e) => peer.reply(id, Reply::Invalid(e)),
            },
            op => self.update(|st| match op {
                Op::Put { item, wait } => {
                    if st.closed {
                        peer.reply(id, Reply::Closed);
                    } else if st.has_room() {
                        st.push(item.into_vec());
                        peer.reply(id, Reply::Ok);
                    } else if wait {
                        st.puts.push_back((Arc::clone(peer), id, item.into_vec()));
                    } else {
                        peer.reply(id, Reply::Full);
                    }
                }
                Op::Want { n, wait } => {
                    if !st.items.is_empty() && !st.others_hold(Some(peer.id)) {
                        st.deliver(peer, id, n);
                    } else if st.drained() {
                        peer.reply(id, Reply::Closed);
                    } else if wait {
                        st.wants.push_back((Arc::clone(peer), id, n));
                        st.recall(self.id, Some(peer.id));
                    } else {
                        st.recall(self.id, Some(peer.id));
                        peer.reply(id, Reply::Empty);
                    }
                }
                Op::Len => peer.reply(id, Reply::Len(st.count() as u64)),
                Op::Join if st.unfinished == 0 => peer.reply(id, Reply::Ok),
                Op::Join => st.joiners.push((Arc::clone(peer), id)),
                _ => peer.reply(id, Reply::Invalid("not a queue operation".to_owned())),
            }),
        }
    }

    /// `peer` handed out every item it got up to sequence number `upto`.
    fn ack(&self, peer: &Peer, upto: u64) {
        self.update(|st| {
            if let Some(held) = st.held.get_mut(&peer.id) {
                let before = held.items.len();
                while held.items.front().is_some_and(|(s, _)| *s <= upto) {
                    held.items.pop_front();
                }
                let acked = before - held.items.len();
                if acked > 0 {
                    // Progress: if someone still waits, ask again for the rest.
                    held.recalled = false;
                }
                st.held_count -= acked;
            }
        });
    }

    /// `peer` gives back items `from..=to` that it did not hand out.
    fn give_back(&self, peer: &Peer, from: u64, to: u64) {
        self.update(|st| {
            let Some(held) = st.held.get_mut(&peer.id) else {
                return;
            };
            let (back, keep): (Vec<_>, Vec<_>) = held
                .items
                .drain(..)
                .partition(|(s, _)| (from..=to).contains(s));
            held.items = keep.into();
            st.held_count -= back.len();
            st.requeue(back.into_iter().map(|(_, i)| i));
        });
    }

    /// A request of another process was given up: if it still waits here it leaves its
    /// line and is answered `Cancelled` (which clears it on the other side); if not, it
    /// was answered already.
    fn cancel(&self, peer: &Peer, id: u64) {
        self.update(|st| {
            let mine = |p: &Arc<Peer>, i: &u64| p.id == peer.id && *i == id;
            let before = st.wants.len() + st.joiners.len() + st.puts.len();
            st.wants.retain(|(p, i, _)| !mine(p, i));
            st.joiners.retain(|(p, i)| !mine(p, i));
            st.puts.retain(|(p, i, _)| !mine(p, i));
            if st.wants.len() + st.joiners.len() + st.puts.len() < before {
                peer.reply(id, Reply::Cancelled);
            }
        });
    }

    /// `peer`'s process dropped the queue or died: what it held and did not hand out
    /// goes back to the front, in order; its waiting requests are dropped.
    fn peer_gone(self: Arc<Self>, peer: &Arc<Peer>) {
        self.update(|st| {
            if let Some(held) = st.held.remove(&peer.id) {
                st.held_count -= held.items.len();
                st.requeue(held.items.into_iter().map(|(_, i)| i));
            }
            st.wants.retain(|(p, _, _)| p.id != peer.id);
            st.puts.retain(|(p, _, _)| p.id != peer.id);
            st.joiners.retain(|(p, _)| p.id != peer.id);
        });
    }
}

impl Core for QueueCore {
    const KIND: Kind = Kind::Queue;
}

impl Drop for QueueCore {
    fn drop(&mut self) {
        hub::unregister(self.id);
    }
}
