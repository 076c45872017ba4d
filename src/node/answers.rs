//! A node's answers, written in batches: one script call takes every answer that came
//! while the previous call was in flight, so a node under load pays one Redis round
//! trip (and one script run) for many tasks, and an idle node's single answer leaves at
//! once, as it did alone.

use tokio::sync::{mpsc, oneshot};

use crate::pool::remote::Con;
use crate::pool::remote::frame::GROUP;

/// At most this many answers go in one script call.
const MAX_BATCH: usize = 128;

/// Past this many bytes of frames, a batch takes no more answers (a 5 MB result goes in a
/// call of its own, not with a hundred others).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Answers tasks and takes their entries off, each only if this node still owns its
/// entry: a node presumed lost (paused, cut off) whose entry was reclaimed writes
/// nothing for it, and its ack cannot remove the new owner's entry (a plain `XACK` from
/// a former owner would).
///
/// `KEYS[1]` is the task stream, `KEYS[1 + i]` answer `i`'s result stream; `ARGV[1]`
/// the group, `ARGV[2]` the consumer, then per answer its entry, frame and MAC (an
/// empty frame only takes the entry off: a cancelled task's, a refused frame's).
/// Returns 1 or 0 per answer: written, or not owned. The acks and deletions are one
/// `XACK` and one `XDEL` for the batch.
const ANSWER: &str = r"
local done, owned, seen = {}, {}, {}
local n = (#ARGV - 2) / 3
for i = 1, n do
  local id, f, m = ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2]
  done[i] = 0
  if not seen[id] then
    seen[id] = true
    local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if not p['err'] and #p == 1 and p[1][2] == ARGV[2] then
      if f ~= '' then
        redis.call('XADD', KEYS[i + 1], '*', 'f', f, 'm', m)
      end
      owned[#owned + 1] = id
      done[i] = 1
    end
  end
end
if #owned > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(owned))
  redis.call('XDEL', KEYS[1], unpack(owned))
end
return done
";

fn script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(ANSWER))
}

/// One answer: a task's stream entry, and its result (the parent's result stream, the
/// frame, its MAC), or none to take the entry off only.
pub(crate) struct Answer {
    pub(crate) entry: String,
    pub(crate) result: Written,
}

/// What an answer writes: the parent's result stream, the frame, its MAC.
pub(crate) type Written = Option<(String, Vec<u8>, Vec<u8>)>;

struct Pending {
    answer: Answer,
    done: oneshot::Sender<redis::RedisResult<bool>>,
}

/// Where a node's tasks hand their answers; the batches are written by the task
/// [`Answers::start`] spawns, which ends when every `Answers` is dropped.
#[derive(Clone)]
pub(crate) struct Answers {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Answers {
    /// Starts writing the answers of consumer `consumer` of task stream `stream`.
    pub(crate) fn start(con: Con, stream: String, consumer: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(con, stream, consumer, rx));
        Self { tx }
    }

    /// Writes `answer` (in the next batch); true if this node still owned its entry.
    ///
    /// # Cancel safety
    ///
    /// Dropped, the answer is written all the same (it is queued at the first poll).
    pub(crate) async fn send(&self, answer: Answer) -> redis::RedisResult<bool> {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Pending { answer, done }).is_err() {
            return Err(stopped());
        }
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "the node's answer writer stopped"))
}

async fn write(
    mut con: Con,
    stream: String,
    consumer: String,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = size(&first.answer);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += size(&p.answer);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (answers, waiting): (Vec<Answer>, Vec<_>) =
            batch.into_iter().map(|p| (p.answer, p.done)).unzip();
        let mut res = invoke(&mut con, &stream, &consumer, &answers).await;
        if let Err(e) = &res
            && crate::pool::remote::connection_broke(e)
        {
            // Once more, on the connection made again: the script may have run before
            // its reply was lost, and is safe to run twice (what it answered is acked,
            // so not this consumer's any more: a task answered so reads "reclaimed").
            res = invoke(&mut con, &stream, &consumer, &answers).await;
        }
        match res {
            Ok(owned) => {
                for (done, owned) in waiting.into_iter().zip(owned) {
                    // A task that no longer waits (its node is stopping) needs no word.
                    drop(done.send(Ok(owned)));
                }
            }
            Err(e) => {
                for done in waiting {
                    drop(done.send(Err(e.clone())));
                }
            }
        }
    }
}

fn size(a: &Answer) -> usize {
    a.result.as_ref().map_or(0, |(_, f, m)| f.len() + m.len())
}

/// Runs [`ANSWER`] for `answers`: whether this consumer still owned each one's entry.
///
/// # Errors
///
/// Redis's error, or a reply that does not have one flag per answer.
pub(crate) async fn invoke(
    con: &mut Con,
    stream: &str,
    consumer: &str,
    answers: &[Answer],
) -> redis::RedisResult<Vec<bool>> {
    let mut call = script().prepare_invoke();
    call.key(stream);
    for a in answers {
        match &a.result {
            Some((results, _, _)) => call.key(results.as_str()),
            None => call.key(stream),
        };
    }
    call.arg(GROUP).arg(consumer);
    for a in answers {
        call.arg(a.entry.as_str());
        match &a.result {
            Some((_, f, m)) => call.arg(f.as_slice()).arg(m.as_slice()),
            None => call.arg("").arg(""),
        };
    }
    let flags: Vec<i64> = call.invoke_async(con).await?;
    if flags.len() != answers.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "the answer script returned the wrong number of flags",
            format!("{} for {} answers", flags.len(), answers.len()),
        )));
    }
    Ok(flags.into_iter().map(|f| f == 1).collect())
}
