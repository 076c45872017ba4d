//! `Dict<K, V>`: a map shared by processes (a Python `Manager().dict()`), owner-held like
//! the `Queue`, with an atomic `update` by compare-and-swap.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::ByteBuf;

use super::hub::{self, Kind, Op, Peer, Reply, Served, lock};
use super::queue::{expect_ok, unexpected};
use super::{Access, Core, Handle};
use crate::error::{Error, Result};
use crate::wire;

// ---------------------------------------------------------------------------------------
// The dict in its owner process: encoded keys to encoded values

pub(crate) struct DictCore {
    pub(crate) id: u64,
    st: Mutex<DState>,
}

struct DState {
    /// By encoded key.
    map: HashMap<Vec<u8>, Entry>,
    /// The keys in insertion order, by `Entry::seq`.
    order: BTreeMap<u64, Vec<u8>>,
    /// The next insertion number and version (one counter: never 0, never reused).
    next: u64,
}

struct Entry {
    /// Its place in `order` (kept when the value is replaced, as Python's dict does).
    seq: u64,
    /// Changes with every write of the key; what `DictSetIf` compares.
    version: u64,
    value: Vec<u8>,
}

impl DState {
    fn stamp(&mut self) -> u64 {
        let n = self.next;
        self.next += 1;
        n
    }

    /// Writes `value` under `key`; the value it replaced.
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Option<Vec<u8>> {
        let version = self.stamp();
        if let Some(e) = self.map.get_mut(&key) {
            e.version = version;
            return Some(std::mem::replace(&mut e.value, value));
        }
        let seq = version;
        self.order.insert(seq, key.clone());
        self.map.insert(
            key,
            Entry {
                seq,
                version,
                value,
            },
        );
        None
    }

    fn remove(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        let e = self.map.remove(key)?;
        self.order.remove(&e.seq);
        Some(e.value)
    }
}

/// The largest snapshot (`keys`, `values`, `items`) one answer to another process
/// carries: a frame, less room for the message around it.
const MAX_SNAPSHOT: usize = hub::MAX_ITEM;

impl DictCore {
    fn new() -> Arc<Self> {
        Arc::new(DictCore {
            id: hub::next_id(),
            st: Mutex::new(DState {
                map: HashMap::new(),
                order: BTreeMap::new(),
                next: 1,
            }),
        })
    }

    /// Applies a dict request (from this process or, `remote`, from another) and
    /// answers it. Never waits and never calls user code.
    fn apply(&self, op: Op, remote: bool) -> Reply {
        let mut st = lock(&self.st);
        match op {
            Op::DictInsert { key, value } => Reply::Entry {
                value: st
                    .insert(key.into_vec(), value.into_vec())
                    .map(ByteBuf::from),
                version: 0,
            },
            Op::DictGet { key } => match st.map.get(key.as_slice()) {
                Some(e) => Reply::Entry {
                    value: Some(ByteBuf::from(e.value.clone())),
                    version: e.version,
                },
                None => Reply::Entry {
                    value: None,
                    version: 0,
                },
            },
            Op::DictRemove { key } => Reply::Entry {
                value: st.remove(&key).map(ByteBuf::from),
                version: 0,
            },
            Op::DictContains { key } => Reply::Bool(st.map.contains_key(key.as_slice())),
            Op::DictSetIf {
                key,
                version,
                value,
            } => {
                let now = st.map.get(key.as_slice()).map_or(0, |e| e.version);
                if now != version {
                    return Reply::Bool(false);
                }
                st.insert(key.into_vec(), value.into_vec());
                Reply::Bool(true)
            }
            Op::DictEntries { keys, values } => {
                if remote {
                    let bytes: usize = st
                        .map
                        .iter()
                        .map(|(k, e)| {
                            (if keys { k.len() + 8 } else { 0 })
                                + (if values { e.value.len() + 8 } else { 0 })
                        })
                        .sum();
                    if bytes > MAX_SNAPSHOT {
                        return Reply::Invalid(format!(
                            "the dict's snapshot takes {bytes} bytes; one answer to another \
                             process holds at most {MAX_SNAPSHOT}"
                        ));
                    }
                }
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for key in st.order.values() {
                    if keys {
                        ks.push(ByteBuf::from(key.clone()));
                    }
                    if values && let Some(e) = st.map.get(key) {
                        vs.push(ByteBuf::from(e.value.clone()));
                    }
                }
                Reply::Entries {
                    keys: ks,
                    values: vs,
                }
            }
            Op::Len => Reply::Len(st.map.len() as u64),
            Op::Clear => {
                st.map.clear();
                st.order.clear();
                Reply::Ok
            }
            _ => Reply::Invalid("not a dict operation".to_owned()),
        }
    }
}

/// What the hub does with a dict's frames: every request is answered at once.
impl Served for DictCore {
    fn kind(&self) -> Kind {
        Self::KIND
    }

    fn parked(&self) -> usize {
        0
    }

    fn remote_op(&self, peer: &Arc<Peer>, id: u64, op: Op) {
        peer.reply(id, self.apply(op, true));
    }

    /// Nothing waits in a dict: a request given up was answered already (and applied).
    fn cancel(&self, _peer: &Peer, _id: u64) {}

    /// A dict holds nothing for a process (no lease, no lock): nothing to undo.
    fn peer_gone(self: Arc<Self>, _peer: &Arc<Peer>) {}
}

impl Drop for DictCore {
    fn drop(&mut self) {
        hub::unregister(self.id);
    }
}

impl Core for DictCore {
    const KIND: Kind = Kind::Dict;
}

// ---------------------------------------------------------------------------------------
// The handle

/// What a `Dict` handle says of its types: invariant in both, and `Send + Sync` whatever
/// they are (it holds no `K` or `V`).
type Types<K, V> = fn(K, V) -> (K, V);

/// A map shared by processes: the `dict()` of Python's `multiprocessing.Manager`, async,
/// with an atomic [`update`](Dict::update).
///
/// Create it in any process, clone it, and pass clones to children as ordinary arguments
/// (to [`Process`](crate::Process) or to pool tasks); every holder reads and writes the
/// same map. Keys and values travel as MessagePack, like task arguments.
///
/// ```
/// use procpool::{Dict, Process};
///
/// fn count(words: Dict<String, u32>, text: String) {
///     for w in text.split_whitespace() {
///         words
///             .blocking_update(w.to_owned(), |n| n.unwrap_or(0) + 1)
///             .expect("the parent keeps the dict");
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let words = Dict::new();
/// let mut p = Process::new(count, (words.clone(), "to be or not to be".to_owned()));
/// p.start().await?;
/// p.join().await?;
/// assert_eq!(words.get("to").await?, Some(2));
/// assert_eq!(words.keys().await?, ["to", "be", "or", "not"]);
/// # Ok(())
/// # }
/// ```
///
/// # How it works, and what it costs
///
/// The dict lives in the process that created it (its *owner*), which keeps every key
/// and value as its encoded bytes (it need not know `K` or `V`). From the owner, a call
/// is an encoding and a few instructions under a mutex; from another process, one round
/// trip to the owner's procpool thread over a unix socket (`update`: two, see below).
/// Once the owner is gone, calls elsewhere fail with [`Error::Closed`]. Each call is
/// atomic; `keys`, `values` and `items` are one consistent snapshot, in insertion order
/// (as Python's dict: replacing a value keeps the key's place).
///
/// Every call has an async version and a `blocking_*` one for synchronous code (a plain
/// target with no runtime); the blocking ones wait at most 10 s for an owner that does
/// not answer, then fail with [`Error::Timeout`].
///
/// From another process, the `blocking_*` calls are the fast ones: each thread that makes
/// them has a connection of its own to the owner, writes its request and reads the
/// answer itself, and both ends look for the next message for about 50 µs before they
/// sleep, so back-to-back calls cost a round trip between two running processes (about
/// 10 µs here, where Python's manager dict takes 60 µs and more) instead of waking
/// sleeping threads. The async calls go through procpool's thread, like a queue's (about
/// 70 µs here). They stay in order with everything else the process sent the owner: a
/// blocking call made after an unconfirmed queue put or a released lock first waits for
/// the owner to confirm those. A thread's connection lets go of a dict at its next call
/// to that owner after the process's last handle to that dict is dropped, and is closed
/// at the thread's next blocking `Dict` call once its owner is gone or it holds nothing
/// the process still uses (or when the thread ends).
///
/// # Keys
///
/// Two keys are the same key when their encodings are the same bytes: a `K` whose equal
/// values always encode alike works as with a `HashMap` (integers, strings, bools, tuples,
/// structs and enums of those; `str` and `String` encode alike, so `get("a")` finds the
/// key `"a".to_owned()`). A `HashMap` inside a key encodes in its iteration order, so two
/// equal maps may be two keys (use a `BTreeMap`); floats compare by their bits, so `0.0`
/// and `-0.0` are two keys and a `NaN` finds itself. No `Eq + Hash` is asked of `K`.
///
/// # `update`: read, modify, compare and swap
///
/// A closure cannot travel to the owner, so [`update`](Self::update) runs it in the
/// calling process: it reads the value with its version (every write of a key gives it a
/// new one), calls the closure, and asks the owner to write the result *only if the
/// version is still the one it read*; if another write came in between, it reads again
/// and calls the closure again. So an update is atomic with every other write of the
/// key (`insert`, `remove`, `clear` and other updates), in every process, and the
/// closure may run more than once: keep it free of side effects.
///
/// Nothing is held between the read and the write (no lease, no lock), so an updater
/// that dies or hangs in its closure blocks nobody, and leaves nothing half written: the
/// write is one message, and a process killed before it sent it wrote nothing (the next
/// update sees the old value).
///
/// # Handles in values
///
/// A value may hold a `Queue`, `Lock`, `Event` or another `Dict`. As for an item of a
/// queue, such a handle keeps its object alive until a process first decodes it (a
/// `get`), and then while some process holds it; keep a handle elsewhere for as long as
/// readers of the dict should reach the object.
pub struct Dict<K, V> {
    h: Handle<DictCore>,
    _t: PhantomData<Types<K, V>>,
}

impl<K, V> Clone for Dict<K, V> {
    fn clone(&self) -> Self {
        Dict {
            h: self.h.clone(),
            _t: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for Dict<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dict")
            .field("id", &self.h.id)
            .field("owned_here", &matches!(self.h.access, Access::Local(_)))
            .finish()
    }
}

impl<K, V> Default for Dict<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> Dict<K, V> {
    /// A new, empty dict owned by this process.
    pub fn new() -> Self {
        let core = DictCore::new();
        Dict {
            h: Handle::local(core.id, core),
            _t: PhantomData,
        }
    }

    /// Sends `op` to the dict and waits for the answer.
    async fn ask(&self, op: Op) -> Result<Reply> {
        match &self.h.access {
            Access::Local(core) => Ok(core.apply(op, false)),
            Access::Remote(r) => r.call(op).await,
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// [`ask`](Self::ask) from synchronous code, waiting at most the owner timeout.
    fn blocking_ask(&self, op: Op) -> Result<Reply> {
        match &self.h.access {
            Access::Local(core) => Ok(core.apply(op, false)),
            // On this thread's own connection: no procpool thread in between.
            Access::Remote(r) => hub::direct_call(r, op),
            Access::Dead(_) => Err(Error::Closed),
        }
    }

    /// Whether an error certainly means the request never reached the dict.
    fn certain(&self) -> bool {
        !matches!(self.h.access, Access::Remote(_))
    }

    /// How many entries there are.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (it changes nothing).
    pub async fn len(&self) -> Result<usize> {
        len(self.ask(Op::Len).await?)
    }

    /// [`len`](Self::len) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for `len`, and [`Error::Timeout`] if, from another process, the owner does not
    /// answer within 10 s.
    pub fn blocking_len(&self) -> Result<usize> {
        len(self.blocking_ask(Op::Len)?)
    }

    /// Whether there are no entries.
    ///
    /// # Errors
    ///
    /// As for [`len`](Self::len).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (it changes nothing).
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// [`is_empty`](Self::is_empty) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for [`blocking_len`](Self::blocking_len).
    pub fn blocking_is_empty(&self) -> Result<bool> {
        Ok(self.blocking_len()? == 0)
    }

    /// Removes every entry.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: from another process, the request is sent when the future is
    /// first polled and the owner applies it even if the future is dropped after that.
    pub async fn clear(&self) -> Result<()> {
        expect_ok(self.ask(Op::Clear).await?)
    }

    /// [`clear`](Self::clear) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for `clear`, and [`Error::Timeout`] if, from another process, the owner does
    /// not answer within 10 s (the dict may have been cleared).
    pub fn blocking_clear(&self) -> Result<()> {
        expect_ok(self.blocking_ask(Op::Clear)?)
    }
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> Dict<K, V> {
    /// Sets `key` to `value`, and returns the value it replaced (`None` if the key was
    /// new).
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the key or value cannot be encoded (nothing is sent);
    /// [`Error::Decode`] if the replaced value is not a `V` (the new one is in);
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: from another process, the insert is sent when the future is
    /// first polled, and the owner applies it even if the future is dropped after that
    /// (the replaced value is then lost to the caller). A future dropped before its first
    /// poll sent nothing. In the owner process it completes at its first poll.
    pub async fn insert(&self, key: K, value: V) -> Result<Option<V>> {
        let (op, pins) = insert_op(&key, &value)?;
        let reply = self.ask(op).await;
        settled(reply, pins, self.certain()).and_then(old_value)
    }

    /// [`insert`](Self::insert) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for `insert`, and [`Error::Timeout`] if, from another process, the owner does
    /// not answer within 10 s (the value may have been inserted).
    pub fn blocking_insert(&self, key: K, value: V) -> Result<Option<V>> {
        let (op, pins) = insert_op(&key, &value)?;
        let reply = self.blocking_ask(op);
        settled(reply, pins, self.certain()).and_then(old_value)
    }

    /// The value of `key`, if there is one. `key` may be any borrowed form of `K` that
    /// encodes as `K` does (`&str` for `String`; see [Keys](Dict#keys)).
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the key cannot be encoded; [`Error::Decode`] if the value is
    /// not a `V` (it stays in the dict); [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (it changes nothing).
    pub async fn get<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key::<K, Q>(key)?;
        old_value(self.ask(Op::DictGet { key }).await?)
    }

    /// [`get`](Self::get) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for `get`, and [`Error::Timeout`] if, from another process, the owner does not
    /// answer within 10 s.
    pub fn blocking_get<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key::<K, Q>(key)?;
        old_value(self.blocking_ask(Op::DictGet { key })?)
    }

    /// Removes `key`, and returns its value if there was one.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the key cannot be encoded; [`Error::Decode`] if the removed
    /// value is not a `V` (it is removed all the same); [`Error::Closed`] if the owner
    /// process is gone.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe, as [`insert`](Self::insert): once sent, the removal is applied
    /// even if the future is dropped, and the removed value is then lost.
    pub async fn remove<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key::<K, Q>(key)?;
        old_value(self.ask(Op::DictRemove { key }).await?)
    }

    /// [`remove`](Self::remove) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for `remove`, and [`Error::Timeout`] if, from another process, the owner does
    /// not answer within 10 s (the key may have been removed).
    pub fn blocking_remove<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key::<K, Q>(key)?;
        old_value(self.blocking_ask(Op::DictRemove { key })?)
    }

    /// Whether `key` has a value.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the key cannot be encoded; [`Error::Closed`] if the owner
    /// process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (it changes nothing).
    pub async fn contains_key<Q>(&self, key: &Q) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key::<K, Q>(key)?;
        flag(self.ask(Op::DictContains { key }).await?)
    }

    /// [`contains_key`](Self::contains_key) for synchronous code: blocks this thread
    /// briefly.
    ///
    /// # Errors
    ///
    /// As for `contains_key`, and [`Error::Timeout`] if, from another process, the owner
    /// does not answer within 10 s.
    pub fn blocking_contains_key<Q>(&self, key: &Q) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key::<K, Q>(key)?;
        flag(self.blocking_ask(Op::DictContains { key })?)
    }

    /// The keys, in insertion order: a snapshot.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if a key is not a `K`; [`Error::Encode`] if, from another
    /// process, the snapshot does not fit one message (about 1 GiB);
    /// [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (it changes nothing).
    pub async fn keys(&self) -> Result<Vec<K>> {
        let (keys, _) = entries::<Vec<K>>(self.ask(keys_op(true, false)).await?)?;
        decode_all(&keys)
    }

    /// [`keys`](Self::keys) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for `keys`, and [`Error::Timeout`] if, from another process, the owner does
    /// not answer within 10 s.
    pub fn blocking_keys(&self) -> Result<Vec<K>> {
        let (keys, _) = entries::<Vec<K>>(self.blocking_ask(keys_op(true, false))?)?;
        decode_all(&keys)
    }

    /// The values, in the insertion order of their keys: a snapshot.
    ///
    /// # Errors
    ///
    /// As for [`keys`](Self::keys), with values.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (it changes nothing).
    pub async fn values(&self) -> Result<Vec<V>> {
        let (_, values) = entries::<Vec<V>>(self.ask(keys_op(false, true)).await?)?;
        decode_all(&values)
    }

    /// [`values`](Self::values) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for [`blocking_keys`](Self::blocking_keys), with values.
    pub fn blocking_values(&self) -> Result<Vec<V>> {
        let (_, values) = entries::<Vec<V>>(self.blocking_ask(keys_op(false, true))?)?;
        decode_all(&values)
    }

    /// Every `(key, value)`, in insertion order: one consistent snapshot (Python's
    /// `items()`, or `dict.copy()` as a `Vec`).
    ///
    /// # Errors
    ///
    /// As for [`keys`](Self::keys), with keys and values.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (it changes nothing).
    pub async fn items(&self) -> Result<Vec<(K, V)>> {
        pairs(self.ask(keys_op(true, true)).await?)
    }

    /// [`items`](Self::items) for synchronous code: blocks this thread briefly.
    ///
    /// # Errors
    ///
    /// As for [`blocking_keys`](Self::blocking_keys), with keys and values.
    pub fn blocking_items(&self) -> Result<Vec<(K, V)>> {
        pairs(self.blocking_ask(keys_op(true, true))?)
    }

    /// Sets `key` to `f(its value)` atomically, and returns the value written: `f` gets
    /// the current value (`None` if there is none).
    ///
    /// `f` runs in this process and may run more than once: if another write of `key`
    /// (from any process) comes between the read and the write, the write is refused and
    /// `f` is called again with the newer value (see
    /// [`update`](Dict#update-read-modify-compare-and-swap)). So `f` should only compute;
    /// an `update` never waits for another process and never blocks one.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procpool::Result<()> {
    /// let hits: procpool::Dict<String, u64> = procpool::Dict::new();
    /// assert_eq!(hits.update("/".to_owned(), |n| n.unwrap_or(0) + 1).await?, 1);
    /// assert_eq!(hits.update("/".to_owned(), |n| n.unwrap_or(0) + 1).await?, 2);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the key or the new value cannot be encoded (nothing is
    /// written); [`Error::Decode`] if the current value is not a `V` (`f` is not called,
    /// nothing is written); [`Error::Closed`] if the owner process is gone.
    ///
    /// # Cancel safety
    ///
    /// The update happens wholly or not at all: a future dropped before it sent its write
    /// wrote nothing; one dropped after that wrote `f`'s result if the key had not
    /// changed meanwhile (its return value is then lost to the caller).
    pub async fn update<F>(&self, key: K, mut f: F) -> Result<V>
    where
        F: FnMut(Option<V>) -> V,
    {
        let key = encode_key::<K, K>(&key)?;
        loop {
            let read = self.ask(Op::DictGet { key: key.clone() }).await?;
            let (op, pins, new) = set_if_op::<K, V>(&key, read, &mut f)?;
            let written = settled(self.ask(op).await, pins, self.certain()).and_then(flag)?;
            if written {
                return Ok(new);
            }
        }
    }

    /// [`update`](Self::update) for synchronous code: blocks this thread briefly for each
    /// round trip (two per try).
    ///
    /// # Errors
    ///
    /// As for `update`, and [`Error::Timeout`] if, from another process, the owner does
    /// not answer within 10 s (if that was the write, it may have been applied).
    pub fn blocking_update<F>(&self, key: K, mut f: F) -> Result<V>
    where
        F: FnMut(Option<V>) -> V,
    {
        let key = encode_key::<K, K>(&key)?;
        loop {
            let read = self.blocking_ask(Op::DictGet { key: key.clone() })?;
            let (op, pins, new) = set_if_op::<K, V>(&key, read, &mut f)?;
            let written = settled(self.blocking_ask(op), pins, self.certain()).and_then(flag)?;
            if written {
                return Ok(new);
            }
        }
    }
}

/// Encodes a key, or a value, with the pins that keep the handles in it alive until a
/// process decodes it (see `Queue`'s items).
fn encode<T: Serialize + ?Sized>(x: &T) -> Result<(Vec<u8>, hub::Pins)> {
    let (bytes, pins) = hub::collect_sent(|| wire::encode_value(x));
    Ok((bytes.map_err(Error::encode::<T>)?, pins))
}

/// An encoded key to look up (`Q` stands for `K`, which names it in errors). A handle
/// in a key looked up (not stored) is let go of at once.
fn encode_key<K, Q: Serialize + ?Sized>(key: &Q) -> Result<ByteBuf> {
    let (bytes, pins) = encode(key)?;
    drop(pins);
    check_size::<K>(bytes.len())?;
    Ok(ByteBuf::from(bytes))
}

/// Refuses an entry larger than one message to the owner holds (before anything is
/// sent: the owner would reject the frame and end the connection).
fn check_size<T: ?Sized>(len: usize) -> Result<()> {
    if len <= hub::MAX_ITEM {
        return Ok(());
    }
    Err(Error::Encode {
        type_name: std::any::type_name::<T>().to_owned(),
        reason: format!(
            "{len} bytes encoded; a dict entry holds at most {} bytes",
            hub::MAX_ITEM
        ),
    })
}

fn insert_op<K: Serialize, V: Serialize>(key: &K, value: &V) -> Result<(Op, hub::UntilDecoded)> {
    let ((key, value), pins) =
        hub::collect_sent(|| (wire::encode_value(key), wire::encode_value(value)));
    let key = key.map_err(Error::encode::<K>)?;
    let value = value.map_err(Error::encode::<V>)?;
    check_size::<(K, V)>(key.len() + value.len())?;
    let op = Op::DictInsert {
        key: ByteBuf::from(key),
        value: ByteBuf::from(value),
    };
    Ok((op, pins.until_decoded()))
}

/// From the answer to a versioned read: the write of `f(value)` if that version stays.
fn set_if_op<K, V: Serialize + DeserializeOwned>(
    key: &ByteBuf,
    read: Reply,
    f: &mut impl FnMut(Option<V>) -> V,
) -> Result<(Op, hub::UntilDecoded, V)> {
    let Reply::Entry { value, version } = read else {
        return Err(unexpected(read));
    };
    let old = value.map(|b| decode::<V>(&b)).transpose()?;
    let new = f(old);
    let (bytes, pins) = encode(&new)?;
    check_size::<(K, V)>(key.len() + bytes.len())?;
    let op = Op::DictSetIf {
        key: key.clone(),
        version,
        value: ByteBuf::from(bytes),
    };
    Ok((op, pins.until_decoded(), new))
}

/// The answer to a write, keeping the pins of what was written unless it certainly did
/// not reach the dict (an error in the owner process; a refused compare-and-swap).
fn settled(reply: Result<Reply>, pins: hub::UntilDecoded, certain: bool) -> Result<Reply> {
    match &reply {
        Err(_) if certain => pins.refused(),
        Ok(Reply::Bool(false)) => pins.refused(),
        _ => drop(pins),
    }
    reply
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    wire::decode_value(bytes).map_err(Error::decode::<T>)
}

fn decode_all<T: DeserializeOwned>(all: &[ByteBuf]) -> Result<Vec<T>> {
    all.iter().map(|b| decode(b)).collect()
}

fn old_value<V: DeserializeOwned>(reply: Reply) -> Result<Option<V>> {
    match reply {
        Reply::Entry { value, .. } => value.map(|b| decode(&b)).transpose(),
        other => Err(unexpected(other)),
    }
}

fn flag(reply: Reply) -> Result<bool> {
    match reply {
        Reply::Bool(b) => Ok(b),
        other => Err(unexpected(other)),
    }
}

fn len(reply: Reply) -> Result<usize> {
    match reply {
        Reply::Len(n) => usize::try_from(n).map_err(|_| Error::Protocol {
            name: "hub".to_owned(),
            reason: format!("a dict of {n} entries"),
        }),
        other => Err(unexpected(other)),
    }
}

fn keys_op(keys: bool, values: bool) -> Op {
    Op::DictEntries { keys, values }
}

/// The keys and values of a snapshot; a snapshot too large to send is `Encode` (of `T`,
/// what the caller wanted).
fn entries<T>(reply: Reply) -> Result<(Vec<ByteBuf>, Vec<ByteBuf>)> {
    match reply {
        Reply::Entries { keys, values } => Ok((keys, values)),
        Reply::Invalid(reason) => Err(Error::Encode {
            type_name: std::any::type_name::<T>().to_owned(),
            reason,
        }),
        other => Err(unexpected(other)),
    }
}

fn pairs<K: DeserializeOwned, V: DeserializeOwned>(reply: Reply) -> Result<Vec<(K, V)>> {
    let (keys, values) = entries::<Vec<(K, V)>>(reply)?;
    if keys.len() != values.len() {
        return Err(Error::Protocol {
            name: "hub".to_owned(),
            reason: format!(
                "a dict snapshot of {} keys, {} values",
                keys.len(),
                values.len()
            ),
        });
    }
    keys.iter()
        .zip(&values)
        .map(|(k, v)| Ok((decode(k)?, decode(v)?)))
        .collect()
}

impl<K, V> Serialize for Dict<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.h.serialize(None, s)
    }
}

impl<'de, K, V> Deserialize<'de> for Dict<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Dict {
            h: Handle::deserialize(d)?.0,
            _t: PhantomData,
        })
    }
}
