//! Refuses the values MessagePack would change on the way: a `Some` whose value encodes
//! as nil.
//!
//! rmp-serde writes `None` and `()` as nil and `Some(x)` as `x` alone, so `Some(None)`,
//! `Some(())`, and `Some(x)` for any `x` written as nil (a unit variant of an untagged
//! enum, a newtype around one of these) are the very bytes of `None`, and arrive as
//! `None`. Carrying them would take a tag in the bytes and a decoder that looks for it,
//! which rmp-serde's slice decoder cannot do (it shows no bytes ahead); so such a value
//! is an encoding error instead, naming the type. Only those values are refused:
//! `None`, `Some(Some(5))` and `Some(UnitStruct)` (an empty array) cross unchanged, and
//! every byte written is what rmp-serde alone writes.

use serde::ser::{self, Serialize, Serializer};

/// `inner`, except that a `Some` whose value encodes as nil is an error.
pub(crate) struct SomeCheck<S> {
    inner: S,
    /// The type of the value of the `Some` being written, while its value is written
    /// (through newtype structs, which rmp-serde writes as their content).
    in_some: Option<&'static str>,
}

impl<S> SomeCheck<S> {
    pub(crate) fn new(inner: S) -> Self {
        SomeCheck {
            inner,
            in_some: None,
        }
    }
}

/// A value written through [`SomeCheck`].
struct Checked<'a, T: ?Sized> {
    value: &'a T,
    in_some: Option<&'static str>,
}

impl<T: Serialize + ?Sized> Serialize for Checked<'_, T> {
    #[inline]
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(SomeCheck {
            inner: s,
            in_some: self.in_some,
        })
    }
}

/// An element of a sequence, tuple, map or struct: not inside a `Some` of its own.
#[inline]
fn element<T: ?Sized>(value: &T) -> Checked<'_, T> {
    Checked {
        value,
        in_some: None,
    }
}

impl<S: Serializer> SomeCheck<S> {
    /// The error for `what` (nil) as the value of a `Some`; `None` outside one.
    fn collapses(&self, what: &str) -> Option<S::Error> {
        self.in_some.map(|ty| {
            <S::Error as ser::Error>::custom(format!(
                "`Some` of {what} (a value of type `{ty}`) encodes as nil, the same bytes \
                 as `None`, and would arrive as `None`; use an enum of your own instead \
                 of an `Option` whose value can be `None` or `()`"
            ))
        })
    }
}

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {$(
        #[inline]
        fn $name(self, $($arg: $ty),*) -> Result<S::Ok, S::Error> {
            self.inner.$name($($arg),*)
        }
    )*};
}

impl<S: Serializer> Serializer for SomeCheck<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Each<S::SerializeSeq>;
    type SerializeTuple = Each<S::SerializeTuple>;
    type SerializeTupleStruct = Each<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Each<S::SerializeTupleVariant>;
    type SerializeMap = Each<S::SerializeMap>;
    type SerializeStruct = Each<S::SerializeStruct>;
    type SerializeStructVariant = Each<S::SerializeStructVariant>;

    #[inline]
    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }

    forward!(
        serialize_bool(v: bool),
        serialize_i8(v: i8),
        serialize_i16(v: i16),
        serialize_i32(v: i32),
        serialize_i64(v: i64),
        serialize_i128(v: i128),
        serialize_u8(v: u8),
        serialize_u16(v: u16),
        serialize_u32(v: u32),
        serialize_u64(v: u64),
        serialize_u128(v: u128),
        serialize_f32(v: f32),
        serialize_f64(v: f64),
        serialize_char(v: char),
        serialize_str(v: &str),
        serialize_bytes(v: &[u8]),
        serialize_unit_struct(name: &'static str),
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str),
    );

    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        match self.collapses("`None`") {
            Some(e) => Err(e),
            None => self.inner.serialize_none(),
        }
    }

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        match self.collapses("a unit value") {
            Some(e) => Err(e),
            None => self.inner.serialize_unit(),
        }
    }

    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        self.inner.serialize_some(&Checked {
            value,
            in_some: Some(std::any::type_name::<T>()),
        })
    }

    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        // Written as its content: still the value of the `Some`, if it is one.
        let in_some = self.in_some;
        self.inner
            .serialize_newtype_struct(name, &Checked { value, in_some })
    }

    #[inline]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.inner
            .serialize_newtype_variant(name, index, variant, &element(value))
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        self.inner.serialize_seq(len).map(Each)
    }

    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        self.inner.serialize_tuple(len).map(Each)
    }

    #[inline]
    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        self.inner.serialize_tuple_struct(name, len).map(Each)
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        self.inner
            .serialize_tuple_variant(name, index, variant, len)
            .map(Each)
    }

    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        self.inner.serialize_map(len).map(Each)
    }

    #[inline]
    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        self.inner.serialize_struct(name, len).map(Each)
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        self.inner
            .serialize_struct_variant(name, index, variant, len)
            .map(Each)
    }
}

/// A compound value of [`SomeCheck`]: its parts are checked too.
pub(crate) struct Each<C>(C);

/// The compound kinds whose parts are plain values: each part is checked, the end
/// forwarded.
macro_rules! each_part {
    ($($kind:ident::$method:ident),*) => {$(
        impl<C: ser::$kind> ser::$kind for Each<C> {
            type Ok = C::Ok;
            type Error = C::Error;

            #[inline]
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
                self.0.$method(&element(value))
            }

            #[inline]
            fn end(self) -> Result<C::Ok, C::Error> {
                self.0.end()
            }
        }
    )*};
}

each_part!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl<C: ser::SerializeMap> ser::SerializeMap for Each<C> {
    type Ok = C::Ok;
    type Error = C::Error;

    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), C::Error> {
        self.0.serialize_key(&element(key))
    }

    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
        self.0.serialize_value(&element(value))
    }

    #[inline]
    fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &mut self,
        key: &K,
        value: &V,
    ) -> Result<(), C::Error> {
        self.0.serialize_entry(&element(key), &element(value))
    }

    #[inline]
    fn end(self) -> Result<C::Ok, C::Error> {
        self.0.end()
    }
}

/// The compound kinds whose parts are named fields: each value is checked.
macro_rules! each_field {
    ($($kind:ident),*) => {$(
        impl<C: ser::$kind> ser::$kind for Each<C> {
            type Ok = C::Ok;
            type Error = C::Error;

            #[inline]
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), C::Error> {
                self.0.serialize_field(key, &element(value))
            }

            #[inline]
            fn skip_field(&mut self, key: &'static str) -> Result<(), C::Error> {
                self.0.skip_field(key)
            }

            #[inline]
            fn end(self) -> Result<C::Ok, C::Error> {
                self.0.end()
            }
        }
    )*};
}

each_field!(SerializeStruct, SerializeStructVariant);
