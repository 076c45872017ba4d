//! Frames waiting for the writer task of one connection, and a peer as objects see
//! it.

use super::*;

/// Frames for one connection, written by a task on the service thread. Pushing never
/// blocks: callers on any thread (async or not) append, the writer takes everything
/// queued in one write.
pub(crate) struct Outbox {
    pub(super) st: Mutex<OutState>,
    wake: Notify,
}

#[derive(Default)]
pub(super) struct OutState {
    pub(super) buf: BytesMut,
    /// Consecutive puts to one queue, sent as one `Puts` frame.
    puts: Option<(u64, Vec<ByteBuf>, usize)>,
    /// Latest acknowledgement per queue, sent before the next frame.
    acks: HashMap<u64, u64>,
    closed: bool,
}

impl OutState {
    pub(super) fn flush(&mut self) {
        if let Some((obj, items, _)) = self.puts.take()
            && !frame_into(&mut self.buf, &ToHub::Puts { obj, items })
        {
            // Unreachable: every item is at most MAX_ITEM (checked when it is encoded)
            // and a batch never grows past it (`push_put`).
            tracing::error!("a batch of queue items over the frame limit was dropped");
        }
        for (obj, upto) in self.acks.drain() {
            if !frame_into(&mut self.buf, &ToHub::Ack { obj, upto }) {
                unreachable!("an acknowledgement is a few bytes");
            }
        }
    }
}

impl Outbox {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Outbox {
            st: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Queues a frame. False if the connection is closed.
    pub(crate) fn push<M: Serialize>(&self, msg: &M) -> bool {
        let mut st = lock(&self.st);
        if st.closed {
            return false;
        }
        st.flush();
        if !frame_into(&mut st.buf, msg) {
            // Items are checked against MAX_ITEM when encoded; nothing else is large.
            tracing::error!("a hub message over the frame limit was not sent");
            return false;
        }
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Queues one item for an unbounded queue, batched with the puts before it.
    pub(super) fn push_put(&self, obj: u64, item: Vec<u8>) -> bool {
        let mut st = lock(&self.st);
        if st.closed {
            return false;
        }
        let size = item.len();
        match &mut st.puts {
            // Small items go together; a batch never grows past what one frame holds.
            Some((o, items, bytes))
                if *o == obj && *bytes < 64 * 1024 && *bytes + size <= MAX_ITEM =>
            {
                items.push(ByteBuf::from(item));
                *bytes += size;
            }
            _ => {
                st.flush();
                st.puts = Some((obj, vec![ByteBuf::from(item)], size));
            }
        }
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Records that items up to `upto` were handed out (coalesced with earlier acks).
    pub(super) fn push_ack(&self, obj: u64, upto: u64) {
        let mut st = lock(&self.st);
        if st.closed {
            return;
        }
        if let Some((o, _, _)) = &st.puts
            && *o != obj
        {
            st.flush();
        }
        // Callers on several threads may report out of order: keep the highest.
        let acked = st.acks.entry(obj).or_insert(upto);
        *acked = (*acked).max(upto);
        drop(st);
        self.wake.notify_one();
    }

    pub(super) fn close(&self) {
        lock(&self.st).closed = true;
        self.wake.notify_one();
    }

    /// Writes queued frames until the outbox is closed and drained, or the peer is gone.
    pub(super) async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(self: Arc<Self>, mut wr: W) {
        loop {
            let chunk = {
                let mut st = lock(&self.st);
                st.flush();
                if st.buf.is_empty() {
                    if st.closed {
                        return;
                    }
                    None
                } else {
                    Some(st.buf.split().freeze())
                }
            };
            match chunk {
                Some(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        self.close();
                        return;
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

/// The connection of one process to this hub, as objects see it.
pub(crate) struct Peer {
    pub(crate) id: u64,
    pub(super) out: Arc<Outbox>,
}

impl Peer {
    pub(crate) fn reply(&self, id: u64, reply: Reply) {
        if id != 0 {
            // False: that process is gone; its connection's end cleans up after it.
            self.out.push(&FromHub::Reply { id, reply });
        }
    }

    /// Sends an answer that must reach its caller (a lock grant). False if that
    /// process's connection is closed: the answer was not sent.
    pub(crate) fn offer(&self, id: u64, reply: Reply) -> bool {
        self.out.push(&FromHub::Reply { id, reply })
    }

    pub(crate) fn recall(&self, obj: u64) {
        self.out.push(&FromHub::Recall { obj });
    }
}
