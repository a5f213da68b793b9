//! Whether a value's JSON keeps every float: `serde_json` writes NaN and the infinities as
//! `null`, which reads back as neither (a kept task would then fail every replay, its value
//! gone). [`non_finite`] walks the value through `serde` and names the first such float.

use std::fmt::{self, Display, Write};

use serde::ser::{self, Serialize};

/// Where in `value` a float that is not finite is, and what it is (`` `amount` is NaN ``),
/// or `None` if there is none. A value whose own `Serialize` fails is `None`: the JSON
/// serializer reports that failure itself.
pub(crate) fn non_finite<T: Serialize + ?Sized>(value: &T) -> Option<String> {
    let mut probe = Probe {
        path: String::new(),
        found: None,
    };
    let _ = value.serialize(&mut probe);
    probe.found
}

struct Probe {
    /// The path to the part being walked: `.field`, `[index]`, `[key]`.
    path: String,
    found: Option<String>,
}

impl Probe {
    fn float(&mut self, v: f64) -> Result<(), Stop> {
        if v.is_finite() {
            return Ok(());
        }
        let at = self.path.trim_start_matches('.');
        self.found = Some(if at.is_empty() {
            format!("the value is {v}")
        } else {
            format!("`{at}` is {v}")
        });
        Err(Stop)
    }

    /// Walk `value` with `segment` appended to the path.
    fn within<T: Serialize + ?Sized>(
        &mut self,
        segment: impl Display,
        value: &T,
    ) -> Result<(), Stop> {
        let len = self.path.len();
        let _ = write!(self.path, "{segment}");
        let out = value.serialize(&mut *self);
        self.path.truncate(len);
        out
    }
}

/// The walk stops at the first float found (or at the value's own error).
#[derive(Debug)]
struct Stop;

impl Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stopped")
    }
}

impl std::error::Error for Stop {}

impl ser::Error for Stop {
    fn custom<T: Display>(_: T) -> Self {
        Stop
    }
}

/// A sequence, tuple, map or struct being walked: its next element's index.
struct Compound<'a> {
    probe: &'a mut Probe,
    index: usize,
}

impl Compound<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        let i = self.index;
        self.index += 1;
        self.probe.within(format_args!("[{i}]"), value)
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), Stop> {
        self.probe.within(format_args!(".{key}"), value)
    }
}

macro_rules! fine {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<(), Stop> { Ok(()) })*
    };
}

impl<'a> ser::Serializer for &'a mut Probe {
    type Ok = ();
    type Error = Stop;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fine!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_f32(self, v: f32) -> Result<(), Stop> {
        self.float(v.into())
    }

    fn serialize_f64(self, v: f64) -> Result<(), Stop> {
        self.float(v)
    }

    fn serialize_none(self) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Stop> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Stop> {
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        self.within(format_args!(".{variant}"), value)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a>, Stop> {
        Ok(Compound {
            probe: self,
            index: 0,
        })
    }

    fn serialize_tuple(self, len: usize) -> Result<Compound<'a>, Stop> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Compound<'a>, Stop> {
        self.serialize_seq(Some(len))
    }

    /// The variant's name joins the path; the walk of whatever holds the variant takes it
    /// off again (`Probe::within`).
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, Stop> {
        let _ = write!(self.path, ".{variant}");
        self.serialize_seq(Some(len))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Compound<'a>, Stop> {
        self.serialize_seq(len)
    }

    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Compound<'a>, Stop> {
        self.serialize_seq(Some(len))
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Compound<'a>, Stop> {
        self.serialize_tuple_variant(name, index, variant, len)
    }
}

/// The sequence-like compounds: each element walked with its index.
macro_rules! elements {
    ($($trait:ident::$method:ident),* $(,)?) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Stop;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
                self.element(value)
            }
            fn end(self) -> Result<(), Stop> {
                Ok(())
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = Stop;
    /// Keys are not walked: JSON's keys are strings (`serde_json` refuses a float key that is
    /// not finite itself).
    fn serialize_key<T: Serialize + ?Sized>(&mut self, _: &T) -> Result<(), Stop> {
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        self.element(value)
    }
    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}

/// The struct-like compounds: each field walked with its name.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Stop;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Stop> {
                self.field(key, value)
            }
            fn end(self) -> Result<(), Stop> {
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;

    use super::non_finite;

    #[derive(Serialize)]
    struct Line {
        sku: String,
        price: f64,
    }

    #[derive(Serialize)]
    enum Change {
        Refund { amount: f32 },
        Scale(f64, f64),
    }

    #[derive(Serialize)]
    struct Order {
        id: u64,
        lines: Vec<Line>,
        change: Option<Change>,
        fees: BTreeMap<String, f64>,
    }

    fn order() -> Order {
        Order {
            id: 7,
            lines: vec![
                Line {
                    sku: "a".into(),
                    price: 1.5,
                },
                Line {
                    sku: "b".into(),
                    price: -0.0,
                },
            ],
            change: Some(Change::Scale(1.0, f64::MAX)),
            fees: BTreeMap::from([("ship".into(), 4.0)]),
        }
    }

    #[test]
    fn finite_values_pass_and_the_first_nan_or_infinity_is_named_by_its_path() {
        assert_eq!(non_finite(&order()), None);
        assert_eq!(non_finite(&f64::NAN).as_deref(), Some("the value is NaN"));
        let mut o = order();
        o.lines[1].price = f64::NAN;
        assert_eq!(non_finite(&o).as_deref(), Some("`lines[1].price` is NaN"));
        let mut o = order();
        o.change = Some(Change::Refund {
            amount: f32::NEG_INFINITY,
        });
        assert_eq!(
            non_finite(&o).as_deref(),
            Some("`change.Refund.amount` is -inf")
        );
        let mut o = order();
        o.change = Some(Change::Scale(2.0, f64::INFINITY));
        assert_eq!(non_finite(&o).as_deref(), Some("`change.Scale[1]` is inf"));
        let mut o = order();
        o.fees.insert("tax".into(), f64::NAN);
        assert_eq!(non_finite(&o).as_deref(), Some("`fees[1]` is NaN"));
    }

    #[test]
    fn a_variant_s_name_is_not_left_in_the_path_of_what_follows() {
        #[derive(Serialize)]
        struct Two {
            first: Change,
            second: f64,
        }
        let v = Two {
            first: Change::Scale(1.0, 2.0),
            second: f64::NAN,
        };
        assert_eq!(non_finite(&v).as_deref(), Some("`second` is NaN"));
    }
}
