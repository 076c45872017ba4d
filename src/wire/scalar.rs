//! MessagePack for plain numbers and booleans without serde's machinery.
//!
//! A map over numbers spends nearly all its time encoding and decoding them, four times
//! per item (items in the caller, then in the worker; results in the worker, then in
//! the caller), and rmp-serde's generic path costs several times what the few bytes
//! need (perf: `rmp::encode::write_sint`, `rmp_serde::decode::any_num` and their
//! callers; BENCHMARKS.md). For the primitive types below, [`encode`] writes exactly
//! the bytes rmp-serde writes (the most compact form, as
//! `rmp::encode::write_sint`/`write_uint`), and [`decode`] reads the forms a value of
//! the type can arrive in, leaving anything else to rmp-serde (which then decides, with
//! its own error messages). Every other type goes through serde as before.

use std::any::TypeId;

use serde::de::{Deserialize, Visitor};
use serde::ser::{Impossible, Serialize};

/// Whether [`encode`] and [`decode`] handle `T`: decided once per batch of values.
pub(crate) fn handles<T: 'static>() -> bool {
    let t = TypeId::of::<T>();
    [
        TypeId::of::<i64>(),
        TypeId::of::<u64>(),
        TypeId::of::<i32>(),
        TypeId::of::<u32>(),
        TypeId::of::<i16>(),
        TypeId::of::<u16>(),
        TypeId::of::<i8>(),
        TypeId::of::<u8>(),
        TypeId::of::<isize>(),
        TypeId::of::<usize>(),
        TypeId::of::<f64>(),
        TypeId::of::<f32>(),
        TypeId::of::<bool>(),
    ]
    .contains(&t)
}

/// Appends `v` as rmp-serde would encode it, if it serializes as a single number or
/// bool; false (nothing written) otherwise. Only for types [`handles`] says yes to: a
/// user's `Serialize` must not run twice (once here, once in rmp-serde).
#[inline]
pub(crate) fn encode<T: Serialize + ?Sized>(v: &T, buf: &mut Vec<u8>) -> bool {
    v.serialize(ScalarSer(buf)).is_ok()
}

/// Reads a `T` from the front of `input` and moves past it, if `T` deserializes from a
/// single number or bool and the value is in a form this reads (any integer that fits,
/// for an integer; its own width, for a float). `None` leaves `input` untouched, for
/// rmp-serde. Only for types [`handles`] says yes to, as [`encode`].
#[inline]
pub(crate) fn decode<'de, T: Deserialize<'de>>(input: &mut &'de [u8]) -> Option<T> {
    let mut de = ScalarDe { input };
    let v = T::deserialize(&mut de).ok()?;
    *input = de.input;
    Some(v)
}

/// Not a plain number or bool (or not in a form read here): for rmp-serde.
#[derive(Debug)]
pub(crate) struct NotScalar;

impl std::fmt::Display for NotScalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a plain number or bool")
    }
}

impl std::error::Error for NotScalar {}

impl serde::ser::Error for NotScalar {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        NotScalar
    }
}

impl serde::de::Error for NotScalar {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        NotScalar
    }
}

/// Writes single numbers and bools as `rmp::encode::write_sint`/`write_uint` and
/// rmp-serde do; refuses anything else before writing a byte.
struct ScalarSer<'a>(&'a mut Vec<u8>);

/// As `rmp::encode::write_uint`.
#[inline(always)]
fn write_uint(buf: &mut Vec<u8>, v: u64) {
    if v < 128 {
        buf.push(v as u8);
    } else if v < 256 {
        buf.extend_from_slice(&[0xcc, v as u8]);
    } else if v < 65536 {
        buf.push(0xcd);
        buf.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v < 1 << 32 {
        buf.push(0xce);
        buf.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

/// As `rmp::encode::write_sint`.
#[inline(always)]
fn write_sint(buf: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_uint(buf, v as u64);
    } else if v >= -32 {
        buf.push(v as u8); // negative fixint: the byte is the value
    } else if v >= -128 {
        buf.extend_from_slice(&[0xd0, v as u8]);
    } else if v >= -32768 {
        buf.push(0xd1);
        buf.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= -2147483648 {
        buf.push(0xd2);
        buf.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        buf.push(0xd3);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

macro_rules! refuse {
    ($($name:ident($($arg:ty),*)),* $(,)?) => {$(
        fn $name(self, $(_: $arg),*) -> Result<(), NotScalar> {
            Err(NotScalar)
        }
    )*};
}

impl serde::Serializer for ScalarSer<'_> {
    type Ok = ();
    type Error = NotScalar;
    type SerializeSeq = Impossible<(), NotScalar>;
    type SerializeTuple = Impossible<(), NotScalar>;
    type SerializeTupleStruct = Impossible<(), NotScalar>;
    type SerializeTupleVariant = Impossible<(), NotScalar>;
    type SerializeMap = Impossible<(), NotScalar>;
    type SerializeStruct = Impossible<(), NotScalar>;
    type SerializeStructVariant = Impossible<(), NotScalar>;

    #[inline(always)]
    fn serialize_bool(self, v: bool) -> Result<(), NotScalar> {
        self.0.push(if v { 0xc3 } else { 0xc2 });
        Ok(())
    }
    #[inline(always)]
    fn serialize_i8(self, v: i8) -> Result<(), NotScalar> {
        self.serialize_i64(i64::from(v))
    }
    #[inline(always)]
    fn serialize_i16(self, v: i16) -> Result<(), NotScalar> {
        self.serialize_i64(i64::from(v))
    }
    #[inline(always)]
    fn serialize_i32(self, v: i32) -> Result<(), NotScalar> {
        self.serialize_i64(i64::from(v))
    }
    #[inline(always)]
    fn serialize_i64(self, v: i64) -> Result<(), NotScalar> {
        write_sint(self.0, v);
        Ok(())
    }
    #[inline(always)]
    fn serialize_u8(self, v: u8) -> Result<(), NotScalar> {
        self.serialize_u64(u64::from(v))
    }
    #[inline(always)]
    fn serialize_u16(self, v: u16) -> Result<(), NotScalar> {
        self.serialize_u64(u64::from(v))
    }
    #[inline(always)]
    fn serialize_u32(self, v: u32) -> Result<(), NotScalar> {
        self.serialize_u64(u64::from(v))
    }
    #[inline(always)]
    fn serialize_u64(self, v: u64) -> Result<(), NotScalar> {
        write_uint(self.0, v);
        Ok(())
    }
    #[inline(always)]
    fn serialize_f32(self, v: f32) -> Result<(), NotScalar> {
        self.0.push(0xca);
        self.0.extend_from_slice(&v.to_bits().to_be_bytes());
        Ok(())
    }
    #[inline(always)]
    fn serialize_f64(self, v: f64) -> Result<(), NotScalar> {
        self.0.push(0xcb);
        self.0.extend_from_slice(&v.to_bits().to_be_bytes());
        Ok(())
    }

    refuse!(
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), NotScalar> {
        Err(NotScalar)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<(), NotScalar> {
        Err(NotScalar)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), NotScalar> {
        Err(NotScalar)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, NotScalar> {
        Err(NotScalar)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotScalar> {
        Err(NotScalar)
    }
}

/// Reads single numbers and bools for the types that ask for them by name
/// (`deserialize_i64` and so on); refuses everything else without reading.
struct ScalarDe<'de> {
    input: &'de [u8],
}

/// An integer as MessagePack holds it: unsigned, or negative.
enum Int {
    U(u64),
    I(i64),
}

impl ScalarDe<'_> {
    /// An integer in any of MessagePack's integer forms.
    #[inline(always)]
    fn int(&mut self) -> Result<Int, NotScalar> {
        let b = self.input;
        let m = *b.first().ok_or(NotScalar)?;
        let (v, used) = match m {
            0x00..=0x7f => (Int::U(u64::from(m)), 1),
            0xe0..=0xff => (Int::I(i64::from(m as i8)), 1),
            0xcc => (Int::U(u64::from(u8::from_be_bytes(take(b)?))), 2),
            0xcd => (Int::U(u64::from(u16::from_be_bytes(take(b)?))), 3),
            0xce => (Int::U(u64::from(u32::from_be_bytes(take(b)?))), 5),
            0xcf => (Int::U(u64::from_be_bytes(take(b)?)), 9),
            0xd0 => (Int::I(i64::from(i8::from_be_bytes(take(b)?))), 2),
            0xd1 => (Int::I(i64::from(i16::from_be_bytes(take(b)?))), 3),
            0xd2 => (Int::I(i64::from(i32::from_be_bytes(take(b)?))), 5),
            0xd3 => (Int::I(i64::from_be_bytes(take(b)?)), 9),
            _ => return Err(NotScalar),
        };
        self.input = &b[used..];
        Ok(v)
    }

    /// The `N` bytes after a marker `m`, if the input starts with `m`.
    #[inline(always)]
    fn after<const N: usize>(&mut self, m: u8) -> Result<[u8; N], NotScalar> {
        if self.input.first() != Some(&m) {
            return Err(NotScalar);
        }
        let v = take(self.input)?;
        self.input = &self.input[1 + N..];
        Ok(v)
    }
}

/// The `N` bytes after the first.
#[inline(always)]
fn take<const N: usize>(bytes: &[u8]) -> Result<[u8; N], NotScalar> {
    bytes
        .get(1..1 + N)
        .and_then(|b| b.try_into().ok())
        .ok_or(NotScalar)
}

macro_rules! read_int {
    ($($name:ident: $t:ty => $visit:ident),* $(,)?) => {$(
        #[inline(always)]
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NotScalar> {
            let v = match self.int()? {
                Int::U(v) => <$t>::try_from(v).map_err(|_| NotScalar)?,
                Int::I(v) => <$t>::try_from(v).map_err(|_| NotScalar)?,
            };
            visitor.$visit(v)
        }
    )*};
}

impl<'de> serde::Deserializer<'de> for &mut ScalarDe<'de> {
    type Error = NotScalar;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, NotScalar> {
        Err(NotScalar)
    }

    read_int!(
        deserialize_i8: i8 => visit_i8,
        deserialize_i16: i16 => visit_i16,
        deserialize_i32: i32 => visit_i32,
        deserialize_i64: i64 => visit_i64,
        deserialize_u8: u8 => visit_u8,
        deserialize_u16: u16 => visit_u16,
        deserialize_u32: u32 => visit_u32,
        deserialize_u64: u64 => visit_u64,
    );

    #[inline(always)]
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NotScalar> {
        visitor.visit_f64(f64::from_bits(u64::from_be_bytes(self.after(0xcb)?)))
    }

    #[inline(always)]
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NotScalar> {
        visitor.visit_f32(f32::from_bits(u32::from_be_bytes(self.after(0xca)?)))
    }

    #[inline(always)]
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, NotScalar> {
        let v = match self.input.first() {
            Some(0xc2) => false,
            Some(0xc3) => true,
            _ => return Err(NotScalar),
        };
        self.input = &self.input[1..];
        visitor.visit_bool(v)
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char str string bytes byte_buf option unit unit_struct newtype_struct
        seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values at and around every boundary between MessagePack's forms.
    fn edges() -> Vec<i128> {
        let mut v = vec![0, 1, -1];
        for b in [
            31i128,
            32,
            127,
            128,
            255,
            256,
            32767,
            32768,
            65535,
            65536,
            1 << 31,
            1 << 32,
        ] {
            for d in [-1, 0, 1] {
                v.push(b + d);
                v.push(-(b + d));
            }
        }
        v.extend([
            i128::from(i64::MIN),
            i128::from(i64::MAX),
            i128::from(u64::MAX),
            i128::from(i64::MIN) + 1,
        ]);
        v
    }

    fn same_as_rmp_serde<T>(v: T)
    where
        T: serde::Serialize
            + serde::de::DeserializeOwned
            + PartialEq
            + std::fmt::Debug
            + Copy
            + 'static,
    {
        let theirs = crate::wire::encode_value(&v).unwrap();
        let mut ours = Vec::new();
        assert!(encode(&v, &mut ours));
        assert_eq!(ours, theirs, "{v:?} encodes as rmp-serde does");
        let mut input = &theirs[..];
        assert_eq!(decode::<T>(&mut input), Some(v), "{v:?} decodes");
        assert!(input.is_empty());
    }

    #[test]
    fn numbers_encode_as_rmp_serde_does_and_decode_back() {
        for x in edges() {
            macro_rules! each {
                ($($t:ty),*) => {$(
                    if let Ok(v) = <$t>::try_from(x) {
                        same_as_rmp_serde(v);
                    }
                )*};
            }
            each!(i64, u64, i32, u32, i16, u16, i8, u8, isize, usize);
        }
        for f in [
            0.0f64,
            -0.0,
            1.5,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::INFINITY,
        ] {
            same_as_rmp_serde(f);
            same_as_rmp_serde(f as f32);
        }
        same_as_rmp_serde(true);
        same_as_rmp_serde(false);
        assert!(!handles::<String>() && !handles::<(i64,)>() && !handles::<char>());
        assert!(!encode(&'c', &mut Vec::new()) && !encode(&1i128, &mut Vec::new()));
    }

    #[test]
    fn any_integer_form_that_fits_decodes_and_the_rest_is_left_to_serde() {
        // A u8 sent as a 64-bit integer (any encoder may do this) still reads.
        let mut wide = vec![0xd3];
        wide.extend_from_slice(&7i64.to_be_bytes());
        let mut input = &wide[..];
        assert_eq!(decode::<u8>(&mut input), Some(7));
        assert!(input.is_empty());
        // Too large for the type, a float for an integer, an integer for a float, a
        // string, a short buffer: untouched, for rmp-serde to judge.
        type Refuses = fn(&mut &[u8]) -> bool;
        let cases: [(&[u8], Refuses); 6] = [
            (&[0xcd, 0x01, 0x00], |i| decode::<u8>(i).is_none()),
            (&[0xff], |i| decode::<u32>(i).is_none()),
            (&[0xca, 0, 0, 0, 0], |i| decode::<i64>(i).is_none()),
            (&[0x01], |i| decode::<f64>(i).is_none()),
            (&[0xa1, b'x'], |i| decode::<bool>(i).is_none()),
            (&[0xce, 0x01], |i| decode::<u64>(i).is_none()),
        ];
        for (bytes, refused) in cases {
            let mut input = bytes;
            assert!(refused(&mut input), "{bytes:?}");
            assert_eq!(input, bytes, "untouched");
        }
        assert_eq!(decode::<String>(&mut &[0xa1, b'x'][..]), None);
        assert_eq!(decode::<Option<u8>>(&mut &[0x01][..]), None);
    }
}
