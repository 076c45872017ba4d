//! `Value` and `Array`: plain data in memory shared by processes (Python's
//! `multiprocessing.Value` and `Array`), under a lock released when its holder dies.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use bytemuck::Pod;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::hub::{self, HubRef};
use crate::error::{Error, Result};
use crate::target::{RegionGuard, SharedRegion};

/// The memory under a `Value` or `Array` handle: mapped here, or on its way from the
/// process that sent the handle (mapped at its first use).
pub(super) struct Memory {
    region: OnceLock<std::result::Result<SharedRegion, String>>,
    arrival: Option<Arc<hub::Arrival>>,
    data_len: usize,
}

impl Memory {
    pub(super) fn new(data_len: usize) -> Result<Arc<Memory>> {
        let region = SharedRegion::create(data_len)?;
        Ok(Arc::new(Memory {
            region: OnceLock::from(Ok(region)),
            arrival: None,
            data_len,
        }))
    }

    fn arriving(arrival: Arc<hub::Arrival>, data_len: usize) -> Arc<Memory> {
        Arc::new(Memory {
            region: OnceLock::new(),
            arrival: Some(arrival),
            data_len,
        })
    }

    /// The mapping, once it is here.
    pub(super) fn region(&self) -> Result<&SharedRegion> {
        let got = self.region.get_or_init(|| {
            let Some(a) = &self.arrival else {
                return Err("no shared memory".to_owned());
            };
            a.wait_blocking(2 * hub::CLAIM_TIMEOUT);
            let fd = a.with(Option::take).unwrap_or_else(|| {
                Err("the shared memory did not arrive from the process that sent it".to_owned())
            })?;
            SharedRegion::open(fd, self.data_len).map_err(|e| e.to_string())
        });
        got.as_ref().map_err(|e| {
            Error::Io(std::io::Error::other(format!(
                "the shared memory of this handle is not here: {e}"
            )))
        })
    }

    fn lock(&self) -> Result<RegionGuard<'_>> {
        Ok(self.region()?.lock())
    }
}

/// How a `Value` or an `Array` travels: the memory file, parked in the sender's hub
/// until the receiver claims it, and what the receiver checks it against.
#[derive(Serialize, Deserialize)]
struct Wire {
    hub: HubRef,
    export: u64,
    key: u64,
    /// Elements (1 for a `Value`).
    len: u64,
    /// `std::any::type_name` of the element type (the same binary on both sides).
    elem: String,
}

pub(super) fn serialize_memory<S: Serializer, T>(
    mem: &Memory,
    len: usize,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::Error as _;
    let region = mem.region().map_err(S::Error::custom)?;
    let (hub, export, key) =
        hub::export_for_handle(region.fd(), "shared memory").map_err(S::Error::custom)?;
    Wire {
        hub,
        export,
        key,
        len: u64::try_from(len).map_err(S::Error::custom)?,
        elem: std::any::type_name::<T>().to_owned(),
    }
    .serialize(s)
}

/// The memory of a handle being decoded, and its number of elements.
pub(super) fn deserialize_memory<'de, D: Deserializer<'de>, T>(
    d: D,
) -> std::result::Result<(Arc<Memory>, usize), D::Error> {
    use serde::de::Error as _;
    let w = Wire::deserialize(d)?;
    if w.elem != std::any::type_name::<T>() {
        return Err(D::Error::custom(format!(
            "shared memory of {} elements decoded as {}",
            w.elem,
            std::any::type_name::<T>()
        )));
    }
    let len = usize::try_from(w.len).map_err(D::Error::custom)?;
    let data_len = data_len::<T>(len).map_err(D::Error::custom)?;
    // Decoding never waits: the memory is claimed in the background, and mapped at its
    // first use.
    let arrival = hub::claim_later(&w.hub, w.export, w.key);
    Ok((Memory::arriving(arrival, data_len), len))
}

/// The bytes of `len` elements of `T`, if `T` fits the region's alignment.
pub(super) fn data_len<T>(len: usize) -> Result<usize> {
    if std::mem::align_of::<T>() > SharedRegion::DATA {
        return Err(Error::InvalidConfig {
            reason: format!(
                "{} needs an alignment of {}; shared memory gives at most {}",
                std::any::type_name::<T>(),
                std::mem::align_of::<T>(),
                SharedRegion::DATA
            ),
        });
    }
    len.checked_mul(std::mem::size_of::<T>())
        .filter(|&n| n <= isize::MAX as usize - SharedRegion::DATA)
        .ok_or_else(|| Error::InvalidConfig {
            reason: format!(
                "{len} elements of {} do not fit in memory",
                std::any::type_name::<T>()
            ),
        })
}

/// A value of plain data (`T: bytemuck::Pod`: integers, floats, arrays and `#[repr(C)]`
/// structs of them, with `#[derive(bytemuck::Pod, bytemuck::Zeroable)]`; not `bool` or
/// enums, whose bytes could be invalid: use a `u8`) in memory shared by processes:
/// Python's `multiprocessing.Value`.
///
/// Every process that has a clone reads and writes the same memory, without a round trip
/// to another process: [`get`](Value::get), [`set`](Value::set) and
/// [`update`](Value::update) each take the value's lock (shared by all processes, a
/// futex) for the copy only, so each is atomic; [`lock`](Value::lock) holds it for
/// longer (`*guard += 1`). The memory stays as long as some process has the value,
/// including after the one that created it is gone.
///
/// ```
/// use procpool::{Process, Value};
///
/// fn add(counter: Value<i64>, n: i64) {
///     for _ in 0..n {
///         counter.update(|x| x + 1).unwrap();
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procpool::Result<()> {
/// let counter = Value::new(0i64);
/// let mut p = Process::new(add, (counter.clone(), 1000));
/// p.start().await?;
/// add(counter.clone(), 1000);
/// p.join().await?;
/// assert_eq!(counter.get()?, 2000);
/// # Ok(())
/// # }
/// ```
///
/// # When a holder dies
///
/// A process that dies holding the lock (inside `update`'s closure or a [`ValueGuard`])
/// does not block the others: the next taker finds the holder gone and takes the lock
/// over, and its guard's [`abandoned`](ValueGuard::abandoned) is true. `get`, `set` and
/// `update` write the value in one copy, so it is never half written by them; a guard's
/// holder may have left it as it was at any point.
///
/// All methods block the calling thread while another process holds the lock (briefly,
/// unless it holds a guard): like `std::sync::Mutex`, fine from async code for such
/// short waits. The lock is not reentrant: `update` or `get` while this thread holds a
/// guard waits forever.
pub struct Value<T> {
    mem: Arc<Memory>,
    _t: PhantomData<fn() -> T>,
}

/// The lock of a [`Value`], held: the value reads and writes through it (`*guard`);
/// dropping it lets go.
pub struct ValueGuard<'a, T> {
    g: RegionGuard<'a>,
    _t: PhantomData<&'a mut T>,
}

impl<T: Pod> Value<T> {
    /// A new value in new shared memory.
    ///
    /// # Panics
    ///
    /// If the system cannot make shared memory (out of memory or of file descriptors);
    /// [`try_new`](Self::try_new) returns the error instead.
    pub fn new(value: T) -> Self {
        Self::try_new(value).unwrap_or_else(|e| panic!("cannot make shared memory: {e}"))
    }

    /// A new value in new shared memory.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the system cannot make shared memory; [`Error::InvalidConfig`]
    /// for a `T` aligned to more than 64 bytes.
    pub fn try_new(value: T) -> Result<Self> {
        let v = Value {
            mem: Memory::new(data_len::<T>(1)?)?,
            _t: PhantomData,
        };
        v.set(value)?;
        Ok(v)
    }

    /// Takes the lock: the guard reads and writes the value until it is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if this handle's memory never arrived from the process that sent it
    /// (it died first).
    pub fn lock(&self) -> Result<ValueGuard<'_, T>> {
        Ok(ValueGuard {
            g: self.mem.lock()?,
            _t: PhantomData,
        })
    }

    /// The value now.
    ///
    /// # Errors
    ///
    /// As for [`lock`](Self::lock).
    pub fn get(&self) -> Result<T> {
        Ok(*self.lock()?)
    }

    /// Sets the value.
    ///
    /// # Errors
    ///
    /// As for [`lock`](Self::lock).
    pub fn set(&self, value: T) -> Result<()> {
        *self.lock()? = value;
        Ok(())
    }

    /// Replaces the value by `f(value)`, atomically (under the lock), and returns the new
    /// value. `f` should be short: every process waits for it.
    ///
    /// # Errors
    ///
    /// As for [`lock`](Self::lock).
    pub fn update(&self, f: impl FnOnce(T) -> T) -> Result<T> {
        let mut g = self.lock()?;
        let new = f(*g);
        *g = new;
        Ok(new)
    }
}

impl<T> ValueGuard<'_, T> {
    /// True if the previous holder died holding the lock: the value may be as it left it
    /// at any point.
    pub fn abandoned(&self) -> bool {
        self.g.abandoned()
    }
}

impl<T: Pod> std::ops::Deref for ValueGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // `data` needs the guard mutably; reading through a shared borrow of the guard
        // copies nothing and cannot alias a write (the guard is borrowed).
        let bytes: &[u8] = region_bytes(&self.g);
        bytemuck::from_bytes(bytes)
    }
}

impl<T: Pod> std::ops::DerefMut for ValueGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        bytemuck::from_bytes_mut(self.g.data())
    }
}

/// The data of a held region, read-only.
fn region_bytes<'a>(g: &'a RegionGuard<'_>) -> &'a [u8] {
    g.data_ref()
}

impl<T> Clone for Value<T> {
    fn clone(&self) -> Self {
        Value {
            mem: Arc::clone(&self.mem),
            _t: PhantomData,
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Value");
        match self.get() {
            Ok(v) => d.field("value", &v),
            Err(e) => d.field("error", &e.to_string()),
        };
        d.finish()
    }
}

impl<T> Serialize for Value<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_memory::<S, T>(&self.mem, 1, s)
    }
}

impl<'de, T> Deserialize<'de> for Value<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let (mem, len) = deserialize_memory::<D, T>(d)?;
        if len != 1 {
            return Err(D::Error::custom("an Array decoded as a Value"));
        }
        Ok(Value {
            mem,
            _t: PhantomData,
        })
    }
}

/// A fixed-length array of plain data (`T: bytemuck::Pod`) in memory shared by
/// processes: Python's `multiprocessing.Array`.
///
/// As for [`Value`]: one lock for the whole array, taken by each call for its copy only
/// (so [`get`](Array::get), [`set`](Array::set), [`update`](Array::update),
/// [`read`](Array::read) and [`write`](Array::write) are each atomic), or held by
/// [`lock`](Array::lock), whose guard is a `&mut [T]`. An index or range past the end
/// is [`Error::OutOfBounds`], never a panic. The same dead-holder rule as `Value`.
///
/// ```
/// # fn main() -> procpool::Result<()> {
/// let a: procpool::Array<f64> = procpool::Array::new(4);
/// a.set(1, 2.5)?;
/// a.write(2, &[3.0, 4.0])?;
/// assert_eq!(a.to_vec()?, [0.0, 2.5, 3.0, 4.0]);
/// assert!(matches!(a.get(4), Err(procpool::Error::OutOfBounds { index: 4, len: 4, .. })));
/// let mut all = a.lock()?;
/// all.iter_mut().for_each(|x| *x *= 2.0);
/// # Ok(())
/// # }
/// ```
pub struct Array<T> {
    mem: Arc<Memory>,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

/// The lock of an [`Array`], held: a `&mut [T]` of the whole array; dropping it lets go.
pub struct ArrayGuard<'a, T> {
    g: RegionGuard<'a>,
    _t: PhantomData<&'a mut T>,
}

impl<T: Pod> Array<T> {
    /// A zero-filled array of `len` elements in new shared memory.
    ///
    /// # Panics
    ///
    /// As [`Value::new`]; [`try_new`](Self::try_new) returns the error instead.
    pub fn new(len: usize) -> Self {
        Self::try_new(len).unwrap_or_else(|e| panic!("cannot make shared memory: {e}"))
    }

    /// A zero-filled array of `len` elements in new shared memory.
    ///
    /// # Errors
    ///
    /// As [`Value::try_new`], and [`Error::InvalidConfig`] if `len` elements do not fit
    /// in memory.
    pub fn try_new(len: usize) -> Result<Self> {
        Ok(Array {
            mem: Memory::new(data_len::<T>(len)?)?,
            len,
            _t: PhantomData,
        })
    }

    /// An array holding a copy of `items`.
    ///
    /// # Errors
    ///
    /// As [`try_new`](Self::try_new).
    pub fn from_slice(items: &[T]) -> Result<Self> {
        let a = Self::try_new(items.len())?;
        a.lock()?.copy_from_slice(items);
        Ok(a)
    }

    /// Its number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the lock: the guard is the whole array until it is dropped.
    ///
    /// # Errors
    ///
    /// As [`Value::lock`].
    pub fn lock(&self) -> Result<ArrayGuard<'_, T>> {
        Ok(ArrayGuard {
            g: self.mem.lock()?,
            _t: PhantomData,
        })
    }

    fn check(&self, index: usize, n: usize) -> Result<()> {
        match index.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds {
                index: index.max(self.len),
                len: self.len,
            }),
        }
    }

    /// Element `index`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] past the end; as [`Value::lock`].
    pub fn get(&self, index: usize) -> Result<T> {
        self.check(index, 1)?;
        Ok(self.lock()?[index])
    }

    /// Sets element `index`.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    pub fn set(&self, index: usize, value: T) -> Result<()> {
        self.check(index, 1)?;
        self.lock()?[index] = value;
        Ok(())
    }

    /// Replaces element `index` by `f(element)`, atomically; returns the new element.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    pub fn update(&self, index: usize, f: impl FnOnce(T) -> T) -> Result<T> {
        self.check(index, 1)?;
        let mut g = self.lock()?;
        let new = f(g[index]);
        g[index] = new;
        Ok(new)
    }

    /// A copy of elements `range` (Python's slice read).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] for a range past the end; as [`Value::lock`].
    pub fn read(&self, range: std::ops::Range<usize>) -> Result<Vec<T>> {
        if range.start > range.end {
            return Err(Error::OutOfBounds {
                index: range.start,
                len: self.len,
            });
        }
        self.check(range.start, range.end - range.start)?;
        Ok(self.lock()?[range].to_vec())
    }

    /// Writes `items` from element `start` on, atomically (Python's slice assignment).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if they do not fit; as [`Value::lock`].
    pub fn write(&self, start: usize, items: &[T]) -> Result<()> {
        self.check(start, items.len())?;
        self.lock()?[start..start + items.len()].copy_from_slice(items);
        Ok(())
    }

    /// A copy of the whole array.
    ///
    /// # Errors
    ///
    /// As [`Value::lock`].
    pub fn to_vec(&self) -> Result<Vec<T>> {
        Ok(self.lock()?.to_vec())
    }
}

impl<T> ArrayGuard<'_, T> {
    /// As [`ValueGuard::abandoned`].
    pub fn abandoned(&self) -> bool {
        self.g.abandoned()
    }
}

impl<T: Pod> std::ops::Deref for ArrayGuard<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(region_bytes(&self.g))
    }
}

impl<T: Pod> std::ops::DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.g.data())
    }
}

impl<T> Clone for Array<T> {
    fn clone(&self) -> Self {
        Array {
            mem: Arc::clone(&self.mem),
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array")
            .field("len", &self.len)
            .field("elem", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValueGuard")
            .field("abandoned", &self.g.abandoned())
            .finish()
    }
}

impl<T> fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArrayGuard")
            .field("abandoned", &self.g.abandoned())
            .finish()
    }
}

impl<T> Serialize for Array<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_memory::<S, T>(&self.mem, self.len, s)
    }
}

impl<'de, T> Deserialize<'de> for Array<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (mem, len) = deserialize_memory::<D, T>(d)?;
        Ok(Array {
            mem,
            len,
            _t: PhantomData,
        })
    }
}
