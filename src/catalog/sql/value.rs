//! Values as they cross to and from either engine, a query's parameters, and a row read whole.

use super::{Error, Result};
use std::rc::Rc;

/// A value as it crosses to or from either engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

pub trait ToValue {
    fn to_value(&self) -> Value;
}

pub trait FromValue: Sized {
    /// `Err` says what was found instead.
    fn from_value(v: &Value) -> std::result::Result<Self, String>;
}

fn found(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Int(i) => format!("integer {i}"),
        Value::Real(r) => format!("real {r}"),
        Value::Text(t) => format!("text {:?}", t.chars().take(40).collect::<String>()),
        Value::Blob(b) => format!("{} bytes", b.len()),
    }
}

macro_rules! integer {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
        impl FromValue for $t {
            fn from_value(v: &Value) -> std::result::Result<$t, String> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i).map_err(|_| format!("integer {i} out of range")),
                    other => Err(format!("expected an integer, found {}", found(other))),
                }
            }
        }
    )*};
}
integer!(i32, i64, u32, u16, u8);

impl ToValue for u64 {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl FromValue for u64 {
    fn from_value(v: &Value) -> std::result::Result<u64, String> {
        i64::from_value(v).map(|i| i as u64)
    }
}
impl ToValue for usize {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> std::result::Result<bool, String> {
        match v {
            Value::Int(i) => Ok(*i != 0),
            other => Err(format!("expected a flag, found {}", found(other))),
        }
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> std::result::Result<f64, String> {
        match v {
            Value::Real(r) => Ok(*r),
            Value::Int(i) => Ok(*i as f64),
            other => Err(format!("expected a number, found {}", found(other))),
        }
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for std::borrow::Cow<'_, str> {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> std::result::Result<String, String> {
        match v {
            Value::Text(t) => Ok(t.clone()),
            other => Err(format!("expected text, found {}", found(other))),
        }
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> std::result::Result<Vec<u8>, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(format!("expected bytes, found {}", found(other))),
        }
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl FromValue for Value {
    fn from_value(v: &Value) -> std::result::Result<Value, String> {
        Ok(v.clone())
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> std::result::Result<Option<T>, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A query's parameters: `params![a, b]`, an array of one type, or `()` for none.
pub trait Params {
    fn values(self) -> Vec<Value>;
}
impl Params for () {
    fn values(self) -> Vec<Value> {
        vec![]
    }
}
impl Params for &[&dyn ToValue] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}
impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(ToValue::to_value).collect()
    }
}
impl Params for Vec<Value> {
    fn values(self) -> Vec<Value> {
        self
    }
}

/// `params![a, b, c]`: parameters of different types for one query.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::catalog::sql::ToValue] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::catalog::sql::ToValue),+] as &[&dyn $crate::catalog::sql::ToValue] };
}

/// One row, read whole.
#[derive(Debug, Clone)]
pub struct Row {
    pub(super) names: Rc<[String]>,
    pub(super) values: Vec<Value>,
}

/// A column by position or by name.
pub trait RowIndex {
    fn index(&self, row: &Row) -> Result<usize>;
}
impl RowIndex for usize {
    fn index(&self, row: &Row) -> Result<usize> {
        if *self < row.values.len() {
            Ok(*self)
        } else {
            Err(Error::Column { column: self.to_string(), problem: "no such column".into() })
        }
    }
}
impl RowIndex for &str {
    fn index(&self, row: &Row) -> Result<usize> {
        row.names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(self))
            .ok_or_else(|| Error::Column { column: self.to_string(), problem: "no such column".into() })
    }
}

impl Row {
    pub fn get<I: RowIndex, T: FromValue>(&self, i: I) -> Result<T> {
        let at = i.index(self)?;
        T::from_value(&self.values[at]).map_err(|problem| Error::Column { column: self.names[at].clone(), problem })
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn values(&self) -> &[Value] {
        &self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_reads_by_position_and_name_and_says_what_it_found() {
        let row =
            Row { names: vec!["n".to_string(), "t".to_string()].into(), values: vec![Value::Int(3), Value::Null] };
        assert_eq!(row.get::<_, u32>(0).unwrap(), 3);
        assert_eq!(row.get::<_, Option<String>>("T").unwrap(), None);
        let e = row.get::<_, String>("n").unwrap_err().to_string();
        assert_eq!(e, "column n: expected text, found integer 3");
        assert!(row.get::<_, i64>("missing").is_err());
    }
}
