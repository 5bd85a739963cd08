//! Items of FHIRPath collections: nodes borrowed from the input JSON, and system values
//! produced by the engine.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::Value;

use super::budget::BYTES_PER_STEP;
use super::temporal::{DateTimeV, TimeV, calendar_unit};
use crate::fhir::elements::{Kind, model};

/// Where a node sits in the FHIR type model: its type name, plus (for backbone elements, whose
/// children are defined inside the owning type) the owner type and dotted path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeRef {
    /// FHIR type name (`HumanName`, `date`, `BackboneElement`, `Patient`); empty if unknown.
    pub name: &'static str,
    /// Type whose element table defines the children.
    pub owner: &'static str,
    /// Dotted element path within `owner` (empty for a named type).
    pub prefix: &'static str,
}

impl TypeRef {
    /// A node whose type is not known (plain JSON such as an untyped variable).
    pub const UNKNOWN: TypeRef = TypeRef {
        name: "",
        owner: "",
        prefix: "",
    };

    /// A named FHIR type, if the model knows it.
    pub fn named(name: &str) -> TypeRef {
        match model().intern(name) {
            Some(n) => TypeRef {
                name: n,
                owner: n,
                prefix: "",
            },
            None => TypeRef::UNKNOWN,
        }
    }

    /// Whether the type is known.
    pub fn is_known(&self) -> bool {
        !self.name.is_empty()
    }
}

/// JSON held by a node: usually borrowed from the input, owned only for values the engine
/// synthesises (a resource made up by `resolve()` from a reference string).
#[derive(Debug, Clone)]
pub enum JsonRef<'a> {
    /// Borrowed from the input resource or a variable.
    Borrowed(&'a Value),
    /// Created by the engine.
    Owned(Arc<Value>),
}

impl JsonRef<'_> {
    /// The JSON value.
    pub fn get(&self) -> &Value {
        match self {
            JsonRef::Borrowed(v) => v,
            JsonRef::Owned(v) => v,
        }
    }
}

/// An element of the input (a resource, a complex value, or a FHIR primitive).
#[derive(Debug, Clone)]
pub struct Node<'a> {
    /// The element's JSON (`Value::Null` for a primitive that only has extensions).
    pub json: JsonRef<'a>,
    /// The `_name` sibling of a primitive (its `id` and `extension`), when present.
    pub ext: Option<&'a Value>,
    /// The element's type.
    pub ty: TypeRef,
}

/// A System.Quantity value.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    /// The numeric value.
    pub value: f64,
    /// Decimal places written (for formatting).
    pub scale: u8,
    /// UCUM code or calendar keyword (`mg`, `year`); `1` when unitless.
    pub unit: String,
}

/// One item of a result collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// An element of the input JSON, with its FHIR type.
    Node(Node<'a>),
    /// System.Boolean.
    Boolean(bool),
    /// System.String.
    String(String),
    /// System.Integer.
    Integer(i64),
    /// System.Decimal (value and number of decimal places written).
    Decimal(f64, u8),
    /// System.Date.
    Date(DateTimeV),
    /// System.DateTime.
    DateTime(DateTimeV),
    /// System.Time.
    Time(TimeV),
    /// System.Quantity.
    Quantity(Quantity),
}

/// A primitive (system) value, converted from a node or an item for operators.
#[derive(Debug, Clone, PartialEq)]
pub enum Prim<'x> {
    Boolean(bool),
    String(Cow<'x, str>),
    Integer(i64),
    Decimal(f64, u8),
    Date(DateTimeV),
    DateTime(DateTimeV),
    Time(TimeV),
    Quantity(Cow<'x, Quantity>),
}

fn decimal_scale(n: &serde_json::Number) -> u8 {
    let s = n.to_string();
    match s.find('.') {
        Some(d) => (s.len() - d - 1).min(255) as u8,
        None => 0,
    }
}

impl<'a> Item<'a> {
    /// A node for the JSON value `v` (which must not be an array).
    pub fn node(v: &'a Value, ty: TypeRef) -> Item<'a> {
        Item::Node(Node {
            json: JsonRef::Borrowed(v),
            ext: None,
            ty,
        })
    }

    /// A node for a resource or other JSON object, typed from its `resourceType`.
    pub fn root(v: &'a Value) -> Item<'a> {
        let ty = v
            .get("resourceType")
            .and_then(Value::as_str)
            .map(TypeRef::named)
            .unwrap_or(TypeRef::UNKNOWN);
        Item::node(v, ty)
    }

    /// FHIR type name when known (see the crate docs for the list); `System.*` for values
    /// created by the engine.
    pub fn fhir_type(&self) -> Option<&str> {
        Some(match self {
            Item::Node(n) => {
                if n.ty.is_known() {
                    n.ty.name
                } else {
                    return None;
                }
            }
            Item::Boolean(_) => "System.Boolean",
            Item::String(_) => "System.String",
            Item::Integer(_) => "System.Integer",
            Item::Decimal(..) => "System.Decimal",
            Item::Date(_) => "System.Date",
            Item::DateTime(_) => "System.DateTime",
            Item::Time(_) => "System.Time",
            Item::Quantity(_) => "System.Quantity",
        })
    }

    /// The item as JSON: FHIR JSON for nodes, a JSON primitive for primitives, and
    /// `{"value":..,"unit":..}` for quantities.
    pub fn to_json(&self) -> Cow<'_, Value> {
        match self {
            Item::Node(n) => Cow::Borrowed(n.json.get()),
            Item::Boolean(b) => Cow::Owned(Value::Bool(*b)),
            Item::String(s) => Cow::Owned(Value::String(s.clone())),
            Item::Integer(i) => Cow::Owned(Value::from(*i)),
            Item::Decimal(d, _) => Cow::Owned(
                serde_json::Number::from_f64(*d)
                    .map(Value::Number)
                    .unwrap_or(Value::Null),
            ),
            Item::Date(d) | Item::DateTime(d) => Cow::Owned(Value::String(d.format())),
            Item::Time(t) => Cow::Owned(Value::String(t.format())),
            Item::Quantity(q) => {
                let value = if q.scale == 0 && q.value.fract() == 0.0 && q.value.abs() < 1e15 {
                    Value::from(q.value as i64)
                } else {
                    serde_json::Number::from_f64(q.value)
                        .map(Value::Number)
                        .unwrap_or(Value::Null)
                };
                Cow::Owned(serde_json::json!({"value": value, "unit": q.unit}))
            }
        }
    }

    /// `Some(b)` if the item is a boolean (system or FHIR `boolean`).
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Item::Boolean(b) => Some(*b),
            Item::Node(n) => n.json.get().as_bool(),
            _ => None,
        }
    }

    /// The item as a string, if it is a string-like primitive.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Item::String(s) => Some(s),
            Item::Node(n) => n.json.get().as_str(),
            _ => None,
        }
    }

    /// The primitive value of the item, converted by its FHIR type; `None` for complex nodes
    /// (Quantity nodes convert to a quantity).
    pub fn prim(&self) -> Option<Prim<'_>> {
        Some(match self {
            Item::Boolean(b) => Prim::Boolean(*b),
            Item::String(s) => Prim::String(Cow::Borrowed(s)),
            Item::Integer(i) => Prim::Integer(*i),
            Item::Decimal(d, s) => Prim::Decimal(*d, *s),
            Item::Date(d) => Prim::Date(*d),
            Item::DateTime(d) => Prim::DateTime(*d),
            Item::Time(t) => Prim::Time(*t),
            Item::Quantity(q) => Prim::Quantity(Cow::Borrowed(q)),
            Item::Node(n) => return n.prim(),
        })
    }

    /// Whether this item is a node of complex (non-primitive) type.
    pub fn is_complex_node(&self) -> bool {
        matches!(self, Item::Node(n) if n.json.get().is_object())
    }
}

impl Node<'_> {
    /// Convert a primitive node to its system value.
    pub fn prim(&self) -> Option<Prim<'_>> {
        let v = self.json.get();
        let ty = self.ty.name;
        match v {
            Value::Bool(b) => Some(Prim::Boolean(*b)),
            Value::Number(n) => {
                let is_int_type =
                    matches!(ty, "integer" | "positiveInt" | "unsignedInt" | "integer64");
                if (is_int_type || ty.is_empty()) && n.is_i64() {
                    Some(Prim::Integer(n.as_i64()?))
                } else {
                    Some(Prim::Decimal(n.as_f64()?, decimal_scale(n)))
                }
            }
            Value::String(s) => Some(match ty {
                "date" => DateTimeV::parse(s, false)
                    .map(Prim::Date)
                    .unwrap_or(Prim::String(Cow::Borrowed(s))),
                "dateTime" | "instant" => match DateTimeV::parse(s, true) {
                    // A dateTime holding only a date is still a DateTime (with day precision).
                    Some(d) => Prim::DateTime(d),
                    None => Prim::String(Cow::Borrowed(s)),
                },
                "time" => TimeV::parse(s)
                    .map(Prim::Time)
                    .unwrap_or(Prim::String(Cow::Borrowed(s))),
                "decimal" => match s.parse::<f64>() {
                    Ok(d) => {
                        Prim::Decimal(d, s.find('.').map(|p| (s.len() - p - 1) as u8).unwrap_or(0))
                    }
                    Err(_) => Prim::String(Cow::Borrowed(s)),
                },
                _ => Prim::String(Cow::Borrowed(s)),
            }),
            Value::Object(o)
                if !ty.is_empty() && model().is_subtype(ty, "Quantity")
                    || ty.is_empty()
                        && o.contains_key("value")
                        && (o.contains_key("unit") || o.contains_key("code")) =>
            {
                let value = o.get("value")?;
                let n = value.as_f64()?;
                let scale = value.as_number().map(decimal_scale).unwrap_or(0);
                let unit = o
                    .get("code")
                    .and_then(Value::as_str)
                    .filter(|_| {
                        o.get("system")
                            .and_then(Value::as_str)
                            .is_none_or(|s| s == "http://unitsofmeasure.org")
                    })
                    .or_else(|| o.get("unit").and_then(Value::as_str))
                    .unwrap_or("1");
                Some(Prim::Quantity(Cow::Owned(Quantity {
                    value: n,
                    scale,
                    unit: unit.to_string(),
                })))
            }
            _ => None,
        }
    }
}

impl Prim<'_> {
    /// The system value as an owned item.
    pub fn into_item<'a>(self) -> Item<'a> {
        match self {
            Prim::Boolean(b) => Item::Boolean(b),
            Prim::String(s) => Item::String(s.into_owned()),
            Prim::Integer(i) => Item::Integer(i),
            Prim::Decimal(d, s) => Item::Decimal(d, s),
            Prim::Date(d) => Item::Date(d),
            Prim::DateTime(d) => Item::DateTime(d),
            Prim::Time(t) => Item::Time(t),
            Prim::Quantity(q) => Item::Quantity(q.into_owned()),
        }
    }

    /// The system type name (`String`, `Integer`...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Prim::Boolean(_) => "Boolean",
            Prim::String(_) => "String",
            Prim::Integer(_) => "Integer",
            Prim::Decimal(..) => "Decimal",
            Prim::Date(_) => "Date",
            Prim::DateTime(_) => "DateTime",
            Prim::Time(_) => "Time",
            Prim::Quantity(_) => "Quantity",
        }
    }
}

/// Format a decimal with at least its written number of places (`1.0` stays `1.0`).
pub fn format_decimal(v: f64, scale: u8) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        if scale == 0 {
            format!("{}", v as i64)
        } else {
            format!("{:.*}", scale as usize, v)
        }
    } else {
        // Shortest round-trip representation, at least `scale` places.
        let s = format!("{v}");
        let places = s.find('.').map(|p| s.len() - p - 1).unwrap_or(0);
        if places < scale as usize {
            format!("{:.*}", scale as usize, v)
        } else {
            s
        }
    }
}

/// Canonical unit for comparing quantities: calendar keywords and their UCUM codes for
/// weeks and smaller are the same unit; years and months stay distinct from `a`/`mo` for
/// equality, as the spec says.
fn unit_key(u: &str) -> Cow<'_, str> {
    match calendar_unit(u) {
        Some("week") => "wk".into(),
        Some("day") => "d".into(),
        Some("hour") => "h".into(),
        Some("minute") => "min".into(),
        Some("second") => "s".into(),
        Some("millisecond") => "ms".into(),
        Some("year") if u != "a" => "year".into(),
        Some("month") if u != "mo" => "month".into(),
        _ => u.into(),
    }
}

/// Convert two quantities to a common unit where a simple factor exists (same dimension,
/// metric prefixes for grams/metres/litres, time units); `None` if not comparable.
fn common_units(a: &Quantity, b: &Quantity) -> Option<(f64, f64)> {
    let ka = unit_key(&a.unit);
    let kb = unit_key(&b.unit);
    if ka == kb {
        return Some((a.value, b.value));
    }
    let (fa, da) = unit_factor(&ka)?;
    let (fb, db) = unit_factor(&kb)?;
    (da == db).then_some((a.value * fa, b.value * fb))
}

fn unit_factor(u: &str) -> Option<(f64, &'static str)> {
    Some(match u {
        "g" => (1.0, "g"),
        "mg" => (1e-3, "g"),
        "ug" => (1e-6, "g"),
        "kg" => (1e3, "g"),
        "m" => (1.0, "m"),
        "cm" => (1e-2, "m"),
        "mm" => (1e-3, "m"),
        "km" => (1e3, "m"),
        "L" | "l" => (1.0, "L"),
        "mL" | "ml" => (1e-3, "L"),
        "dL" | "dl" => (1e-1, "L"),
        "ms" => (1e-3, "s"),
        "s" => (1.0, "s"),
        "min" => (60.0, "s"),
        "h" => (3600.0, "s"),
        "d" => (86400.0, "s"),
        "wk" => (604800.0, "s"),
        _ => return None,
    })
}

/// Compare two quantities; `None` when the units are not comparable.
pub fn compare_quantities(a: &Quantity, b: &Quantity) -> Option<Ordering> {
    let (x, y) = common_units(a, b)?;
    x.partial_cmp(&y)
}

/// Equality of two primitive values: `Some(true/false)`, or `None` when undecidable (dates of
/// different precision).
pub fn prim_equal(a: &Prim, b: &Prim) -> Option<bool> {
    use Prim::*;
    Some(match (a, b) {
        (Boolean(x), Boolean(y)) => x == y,
        (String(x), String(y)) => x == y,
        (Integer(x), Integer(y)) => x == y,
        (Integer(x), Decimal(y, _)) | (Decimal(y, _), Integer(x)) => (*x as f64) == *y,
        // Equality is by value (`1.10 = 1.1`); only equivalence rounds to a common precision.
        // The tolerance absorbs binary floating point noise (`1.8 - 1.2 = 0.6`).
        (Decimal(x, _), Decimal(y, _)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0),
        (Date(x), Date(y)) | (DateTime(x), DateTime(y)) => {
            return x.compare(y).map(|o| o == Ordering::Equal);
        }
        // A Date is compared with a DateTime as a DateTime of day precision, so a day against
        // a time of that day is undecidable (empty).
        (Date(x), DateTime(y)) | (DateTime(y), Date(x)) => {
            return x.compare(y).map(|o| o == Ordering::Equal);
        }
        (Time(x), Time(y)) => return x.compare(y).map(|o| o == Ordering::Equal),
        (Quantity(x), Quantity(y)) => {
            // Calendar years/months and UCUM `a`/`mo` have different definitions: comparing
            // them is undecidable. Other incomparable units are simply not equal.
            let cal = |q: &crate::fhirpath::Quantity| {
                matches!(calendar_unit(&q.unit), Some("year" | "month"))
            };
            if cal(x) && cal(y) && unit_key(&x.unit) != unit_key(&y.unit) {
                return None;
            }
            return compare_quantities(x, y)
                .map(|o| o == Ordering::Equal)
                .or(Some(false));
        }
        // A string compared with a date/time (e.g. an untyped JSON string): parse it.
        (String(s), Date(_) | DateTime(_) | Time(_)) => {
            return coerce_temporal(s, b)
                .and_then(|p| prim_equal(&p, b))
                .or(Some(false));
        }
        (Date(_) | DateTime(_) | Time(_), String(s)) => {
            return coerce_temporal(s, a)
                .and_then(|p| prim_equal(a, &p))
                .or(Some(false));
        }
        _ => false,
    })
}

/// Parse `s` as the same kind of temporal value as `like`.
pub fn coerce_temporal<'x>(s: &str, like: &Prim) -> Option<Prim<'x>> {
    match like {
        Prim::Date(_) | Prim::DateTime(_) => DateTimeV::parse(s, true).map(|d| {
            if d.has_time() {
                Prim::DateTime(d)
            } else {
                Prim::Date(d)
            }
        }),
        Prim::Time(_) => TimeV::parse(s).map(Prim::Time),
        _ => None,
    }
}

fn normalize_ws(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Equivalence (`~`) of two primitive values.
pub fn prim_equivalent(a: &Prim, b: &Prim) -> bool {
    use Prim::*;
    match (a, b) {
        (String(x), String(y)) => normalize_ws(x) == normalize_ws(y),
        (Decimal(x, sx), Decimal(y, sy)) => {
            let s = (*sx).min(*sy) as i32;
            let f = 10f64.powi(s);
            (x * f).round() == (y * f).round()
        }
        (Integer(x), Decimal(y, s)) | (Decimal(y, s), Integer(x)) => {
            let f = 10f64.powi((*s).min(15) as i32);
            (*x as f64 * f).round() == (y * f).round()
        }
        (Date(x), Date(y)) | (DateTime(x), DateTime(y)) => x.compare(y) == Some(Ordering::Equal),
        // Different precisions are not equivalent (`@2012-04-15 ~ @2012-04-15T10:00:00` is false).
        (Date(x), DateTime(y)) | (DateTime(x), Date(y)) => x.compare(y) == Some(Ordering::Equal),
        (Time(x), Time(y)) => x.compare(y) == Some(Ordering::Equal),
        (Quantity(x), Quantity(y)) => {
            // For equivalence, calendar durations and their UCUM counterparts match.
            let ux = calendar_unit(&x.unit).unwrap_or(&x.unit);
            let uy = calendar_unit(&y.unit).unwrap_or(&y.unit);
            if ux == uy {
                return x.value == y.value;
            }
            // Compare in x's unit, rounded to the precision of the less precise operand
            // (`4 'g' ~ 4040 'mg'`).
            match (
                unit_factor(&unit_key(&x.unit)),
                unit_factor(&unit_key(&y.unit)),
            ) {
                (Some((fx, dx)), Some((fy, dy))) if dx == dy => {
                    let yv = y.value * fy / fx;
                    let y_scale = y.scale as f64 + (fx / fy).log10().round();
                    let s = (x.scale as f64).min(y_scale).max(0.0) as i32;
                    let f = 10f64.powi(s);
                    (x.value * f).round() == (yv * f).round()
                }
                _ => false,
            }
        }
        _ => prim_equal(a, b).unwrap_or(false),
    }
}

/// The work of comparing two primitives: a step, plus the text compared.
fn prim_work(a: &Prim, b: &Prim) -> u64 {
    let text = |p: &Prim| match p {
        Prim::String(s) => s.len(),
        _ => 0,
    };
    1 + (text(a).min(text(b)) / BYTES_PER_STEP) as u64
}

/// Deep equality of two items (`=`): `None` when undecidable. `work` grows by the comparison's
/// cost (a step per JSON value visited, text by length) so callers charge it to the budget.
pub fn item_equal(a: &Item, b: &Item, work: &mut u64) -> Option<bool> {
    match (a.prim(), b.prim()) {
        (Some(x), Some(y)) => {
            *work += prim_work(&x, &y);
            prim_equal(&x, &y)
        }
        (None, None) => Some(json_equal(&a.to_json(), &b.to_json(), false, work)),
        _ => {
            *work += 1;
            Some(false)
        }
    }
}

/// Equivalence of two items (`~`), adding its cost to `work` like [`item_equal`].
pub fn item_equivalent(a: &Item, b: &Item, work: &mut u64) -> bool {
    match (a.prim(), b.prim()) {
        (Some(x), Some(y)) => {
            *work += prim_work(&x, &y);
            prim_equivalent(&x, &y)
        }
        (None, None) => json_equal(&a.to_json(), &b.to_json(), true, work),
        _ => {
            *work += 1;
            false
        }
    }
}

fn json_equal(a: &Value, b: &Value, equiv: bool, work: &mut u64) -> bool {
    *work += 1;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            // `id` is ignored for equivalence (it is not part of the value).
            let keys = |o: &serde_json::Map<String, Value>| {
                o.keys().filter(|k| !(equiv && *k == "id")).count()
            };
            *work += x.len() as u64;
            keys(x) == keys(y)
                && x.iter()
                    .filter(|(k, _)| !(equiv && *k == "id"))
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w, equiv, work)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| json_equal(v, w, equiv, work))
        }
        (Value::String(x), Value::String(y)) => {
            *work += (x.len().min(y.len()) / BYTES_PER_STEP) as u64;
            if equiv {
                normalize_ws(x) == normalize_ws(y)
            } else {
                x == y
            }
        }
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Whether the item is of the given type (namespace `FHIR`, `System`, or unqualified),
/// including subtypes (`Patient` is a `Resource`, `code` is a `string`).
pub fn is_type(item: &Item, namespace: Option<&str>, name: &str) -> bool {
    match item {
        Item::Node(n) => {
            if namespace == Some("System") {
                return false;
            }
            let ty = n.ty.name;
            if ty.is_empty() {
                // Untyped JSON: infer what we can.
                return match n.json.get() {
                    Value::Object(o) => {
                        o.get("resourceType")
                            .and_then(Value::as_str)
                            .is_some_and(|rt| {
                                // A resource type unknown to R4 (a server's custom resource)
                                // is still a Resource, so `Resource.id` works on it.
                                rt == name
                                    || model().is_subtype(rt, name)
                                    || !model().contains(rt)
                                        && matches!(name, "Resource" | "DomainResource")
                            })
                    }
                    Value::Bool(_) => name == "boolean",
                    Value::String(_) => name == "string",
                    Value::Number(x) => name == "decimal" || name == "integer" && x.is_i64(),
                    _ => false,
                };
            }
            if ty == name || model().is_subtype(ty, name) {
                return true;
            }
            // `BackboneElement` nodes also carry their owner path; `Element` matches any element.
            name == "Element" && model().get(ty).is_some_and(|d| d.kind != Kind::Resource)
        }
        _ => {
            if namespace == Some("FHIR") {
                return false;
            }
            let sys = match item {
                Item::Boolean(_) => "Boolean",
                Item::String(_) => "String",
                Item::Integer(_) => "Integer",
                Item::Decimal(..) => "Decimal",
                Item::Date(_) => "Date",
                Item::DateTime(_) => "DateTime",
                Item::Time(_) => "Time",
                Item::Quantity(_) => "Quantity",
                Item::Node(_) => unreachable!(),
            };
            sys == name
        }
    }
}
