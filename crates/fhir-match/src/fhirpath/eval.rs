//! The evaluator: walks the syntax tree over collections of [`Item`]s.
//!
//! Evaluation is synchronous and borrows from the input: navigating `Patient.name.given`
//! creates `Item::Node`s that point into the caller's `serde_json::Value` — no JSON is copied.
//! Every collection an expression node produces is charged to the evaluation's budget
//! (`super::budget`), as is every comparison and scan, so hostile or buggy expressions end with
//! [`FhirPathError::BudgetExhausted`] instead of hanging or exhausting memory.

use serde_json::Value;

use super::Environment;
use super::ast::{BinOp, Expr, Literal, TypeSpec};
use super::budget::Meter;
use super::error::{FhirPathError, Result};
use super::value::{
    Item, JsonRef, Node, Prim, Quantity, TypeRef, coerce_temporal, compare_quantities, is_type,
    item_equal, item_equivalent,
};
use crate::fhir::elements::{Kind, model};

static NULL: Value = Value::Null;

/// The variables visible to an expression part: `$this`, `$index`, `$total`.
#[derive(Clone, Copy)]
pub(crate) struct Scope<'s, 'a> {
    pub this: &'s [Item<'a>],
    pub index: Option<usize>,
    pub total: Option<&'s [Item<'a>]>,
}

/// State of one evaluation.
pub(crate) struct Ctx<'e, 'a> {
    pub env: &'e Environment<'a>,
    pub resource: &'a Value,
    pub meter: Meter,
}

impl<'e, 'a> Ctx<'e, 'a> {
    pub fn new(env: &'e Environment<'a>, resource: &'a Value) -> Self {
        Ctx {
            env,
            resource,
            meter: Meter::new(env.limits),
        }
    }

    /// Charge `n` steps against the budget.
    pub fn charge(&self, n: u64) -> Result<()> {
        self.meter.charge(n)
    }

    /// Fail if a produced collection is too large.
    pub fn check_len(&self, n: usize) -> Result<()> {
        self.meter.check_len(n)
    }

    /// Fail if a string about to be built is too long.
    pub fn check_str(&self, n: usize) -> Result<()> {
        self.meter.check_str(n)
    }

    /// Equality of two items, charged by the work of the comparison.
    pub fn equal(&self, a: &Item, b: &Item) -> Result<Option<bool>> {
        let mut work = 0;
        let r = item_equal(a, b, &mut work);
        self.charge(work)?;
        Ok(r)
    }

    /// Equivalence of two items, charged by the work of the comparison.
    pub fn equivalent(&self, a: &Item, b: &Item) -> Result<bool> {
        let mut work = 0;
        let r = item_equivalent(a, b, &mut work);
        self.charge(work)?;
        Ok(r)
    }

    /// Whether `hay` holds an item equal to `x` (a step per comparison at least).
    pub fn contains(&self, hay: &[Item], x: &Item) -> Result<bool> {
        for h in hay {
            if self.equal(x, h)? == Some(true) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Evaluate `e` in scope `sc`.
    ///
    /// Every collection any expression produces is charged here ([`Meter::produced`]), so
    /// operators and functions pay for their output without charging it themselves.
    pub fn eval(&self, e: &Expr, sc: Scope<'_, 'a>) -> Result<Vec<Item<'a>>> {
        self.charge(1)?;
        let out = match e {
            Expr::Empty => Vec::new(),
            Expr::Literal(l) => vec![literal(l)],
            Expr::Ident(name) => {
                let mut out = Vec::new();
                let first_upper = name.starts_with(|c: char| c.is_ascii_uppercase());
                for item in sc.this {
                    // A type name as first step (`Patient.name`, `Resource.id`) selects the
                    // focus when it is of that type.
                    if first_upper && is_type(item, None, name) {
                        out.push(item.clone());
                    } else {
                        navigate(item, name, &mut out, &self.meter);
                    }
                    self.check_len(out.len())?;
                    self.meter.check()?;
                }
                // See `Expr::Member`.
                self.meter.note(3 * out.len() as u64);
                out
            }
            Expr::Member(target, name) => {
                let base = self.eval(target, sc)?;
                let mut out = Vec::new();
                for item in &base {
                    navigate(item, name, &mut out, &self.meter);
                    self.check_len(out.len())?;
                    self.meter.check()?;
                }
                // A navigated item costs about four times an item merely passed on (model
                // lookups, the `_name` sibling; measured by `bench --only fhirpath`): it pays
                // three steps here and one when produced.
                self.meter.note(3 * out.len() as u64);
                out
            }
            Expr::Call {
                target,
                func,
                args,
                type_arg,
            } => {
                super::functions::call(self, *func, target.as_deref(), args, type_arg.as_ref(), sc)?
            }
            Expr::Index(target, idx) => {
                let base = self.eval(target, sc)?;
                let i = self.eval(idx, sc)?;
                match single_integer(&i)? {
                    Some(n) if n >= 0 => base.into_iter().nth(n as usize).into_iter().collect(),
                    _ => Vec::new(),
                }
            }
            Expr::Neg(inner) => {
                let v = self.eval(inner, sc)?;
                match singleton(&v, "unary -")? {
                    None => Vec::new(),
                    Some(item) => match item.prim() {
                        // Overflow (negating the minimum integer) gives empty, like other overflows.
                        Some(Prim::Integer(i)) => {
                            i.checked_neg().map(Item::Integer).into_iter().collect()
                        }
                        Some(Prim::Decimal(d, s)) => vec![Item::Decimal(-d, s)],
                        Some(Prim::Quantity(q)) => {
                            let mut q = q.into_owned();
                            q.value = -q.value;
                            vec![Item::Quantity(q)]
                        }
                        _ => return Err(FhirPathError::eval("unary - needs a number or quantity")),
                    },
                }
            }
            Expr::Binary(op, l, r) => self.binary(*op, l, r, sc)?,
            Expr::Is(inner, ts) => {
                let v = self.eval(inner, sc)?;
                match singleton(&v, "is")? {
                    None => Vec::new(),
                    Some(item) => vec![Item::Boolean(type_matches(item, ts))],
                }
            }
            Expr::As(inner, ts) => {
                let v = self.eval(inner, sc)?;
                v.into_iter().filter(|i| cast_matches(i, ts)).collect()
            }
            Expr::Var(name) => self.variable(name)?,
            Expr::This => sc.this.to_vec(),
            Expr::IndexVar => sc
                .index
                .map(|i| Item::Integer(i as i64))
                .into_iter()
                .collect(),
            Expr::Total => sc.total.map(<[Item]>::to_vec).unwrap_or_default(),
        };
        self.meter.produced(&out)?;
        Ok(out)
    }

    fn variable(&self, name: &str) -> Result<Vec<Item<'a>>> {
        if let Some(v) = self.env.var(name) {
            return Ok(json_items(v));
        }
        let s = |s: &str| Ok(vec![Item::String(s.to_string())]);
        match name {
            "resource" | "context" | "rootResource" => Ok(vec![Item::root(self.resource)]),
            "ucum" => s("http://unitsofmeasure.org"),
            "sct" => s("http://snomed.info/sct"),
            "loinc" => s("http://loinc.org"),
            _ => {
                if let Some(rest) = name.strip_prefix("vs-") {
                    s(&format!("http://hl7.org/fhir/ValueSet/{rest}"))
                } else if let Some(rest) = name.strip_prefix("ext-") {
                    s(&format!("http://hl7.org/fhir/StructureDefinition/{rest}"))
                } else {
                    Err(FhirPathError::UndefinedVariable(name.to_string()))
                }
            }
        }
    }

    fn binary(&self, op: BinOp, l: &Expr, r: &Expr, sc: Scope<'_, 'a>) -> Result<Vec<Item<'a>>> {
        use BinOp::*;
        // Boolean operators short-circuit where the result is already decided.
        if matches!(op, And | Or | Implies) {
            let a = to_bool3(&self.eval(l, sc)?, "left operand")?;
            match (op, a) {
                (And, Some(false)) => return Ok(vec![Item::Boolean(false)]),
                (Or, Some(true)) => return Ok(vec![Item::Boolean(true)]),
                (Implies, Some(false)) => return Ok(vec![Item::Boolean(true)]),
                _ => {}
            }
            let b = to_bool3(&self.eval(r, sc)?, "right operand")?;
            let res = match op {
                And => match (a, b) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                Or => match (a, b) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
                _ => match (a, b) {
                    (_, Some(true)) => Some(true),
                    (Some(true), Some(false)) => Some(false),
                    _ => None,
                },
            };
            return Ok(res.map(Item::Boolean).into_iter().collect());
        }
        let a = self.eval(l, sc)?;
        let b = self.eval(r, sc)?;
        Ok(match op {
            Xor => {
                let x = to_bool3(&a, "left operand")?;
                let y = to_bool3(&b, "right operand")?;
                match (x, y) {
                    (Some(x), Some(y)) => vec![Item::Boolean(x != y)],
                    _ => Vec::new(),
                }
            }
            Eq | Ne => {
                if a.is_empty() || b.is_empty() {
                    return Ok(Vec::new());
                }
                let eq = self.collections_equal(&a, &b)?;
                match eq {
                    Some(v) => vec![Item::Boolean(if op == Eq { v } else { !v })],
                    None => Vec::new(),
                }
            }
            Equiv | NotEquiv => {
                let v = self.collections_equivalent(&a, &b)?;
                vec![Item::Boolean(if op == Equiv { v } else { !v })]
            }
            Lt | Gt | Le | Ge => {
                let (Some(x), Some(y)) =
                    (singleton(&a, "comparison")?, singleton(&b, "comparison")?)
                else {
                    return Ok(Vec::new());
                };
                match compare_items(x, y)? {
                    None => Vec::new(),
                    Some(o) => {
                        let v = match op {
                            Lt => o.is_lt(),
                            Gt => o.is_gt(),
                            Le => o.is_le(),
                            _ => o.is_ge(),
                        };
                        vec![Item::Boolean(v)]
                    }
                }
            }
            Union => {
                let mut out: Vec<Item<'a>> = Vec::with_capacity(a.len() + b.len());
                for item in a.into_iter().chain(b) {
                    self.charge(1)?;
                    if !self.contains(&out, &item)? {
                        out.push(item);
                    }
                }
                out
            }
            In | Contains => {
                let (needle, hay) = if op == In { (a, b) } else { (b, a) };
                match singleton(&needle, "membership")? {
                    None => Vec::new(),
                    Some(n) => vec![Item::Boolean(self.contains(&hay, n)?)],
                }
            }
            Concat => {
                let x = concat_operand(&a)?;
                let y = concat_operand(&b)?;
                self.check_str(x.len() + y.len())?;
                vec![Item::String(x + &y)]
            }
            Add | Sub | Mul | Div | IntDiv | Mod => {
                let (Some(x), Some(y)) =
                    (singleton(&a, "arithmetic")?, singleton(&b, "arithmetic")?)
                else {
                    return Ok(Vec::new());
                };
                // String `+` grows text like `&`: bound the result before building it.
                if let (Some(Prim::String(p)), Some(Prim::String(q))) = (x.prim(), y.prim()) {
                    self.check_str(p.len() + q.len())?;
                }
                arithmetic(op, x, y)?.into_iter().collect()
            }
            And | Or | Implies => unreachable!("handled above"),
        })
    }
}

impl Ctx<'_, '_> {
    /// `=` on collections: `None` when empty / undecidable.
    pub(crate) fn collections_equal(&self, a: &[Item], b: &[Item]) -> Result<Option<bool>> {
        if a.len() != b.len() {
            return Ok(Some(false));
        }
        let mut undecided = false;
        for (x, y) in a.iter().zip(b) {
            match self.equal(x, y)? {
                Some(false) => return Ok(Some(false)),
                None => undecided = true,
                _ => {}
            }
        }
        Ok(if undecided { None } else { Some(true) })
    }

    /// `~` on collections: order does not matter, so this compares pairwise (and is charged
    /// per comparison).
    fn collections_equivalent(&self, a: &[Item], b: &[Item]) -> Result<bool> {
        if a.len() != b.len() {
            return Ok(false);
        }
        self.meter.alloc(b.len())?;
        let mut used = vec![false; b.len()];
        'next: for x in a {
            // Skipping used items is work too.
            self.charge(b.len() as u64)?;
            for (k, y) in b.iter().enumerate() {
                if !used[k] && self.equivalent(x, y)? {
                    used[k] = true;
                    continue 'next;
                }
            }
            return Ok(false);
        }
        Ok(true)
    }
}

fn concat_operand(c: &[Item]) -> Result<String> {
    match singleton(c, "&")? {
        None => Ok(String::new()),
        Some(i) => match i.prim() {
            Some(Prim::String(s)) => Ok(s.into_owned()),
            Some(p) => Ok(super::functions::prim_to_string(&p)),
            None => Err(FhirPathError::eval("& needs strings")),
        },
    }
}

/// Literal to item.
fn literal<'a>(l: &Literal) -> Item<'a> {
    match l {
        Literal::Bool(b) => Item::Boolean(*b),
        Literal::String(s) => Item::String(s.clone()),
        Literal::Integer(i) => Item::Integer(*i),
        Literal::Decimal(d, s) => Item::Decimal(*d, *s),
        Literal::Date(d) => Item::Date(*d),
        Literal::DateTime(d) => Item::DateTime(*d),
        Literal::Time(t) => Item::Time(*t),
        Literal::Quantity(v, s, u) => Item::Quantity(Quantity {
            value: *v,
            scale: *s,
            unit: u.clone(),
        }),
    }
}

/// The items for a variable's JSON value: an array is a collection, an object a (typed)
/// resource or element, a primitive a system value.
pub(crate) fn json_items(v: &Value) -> Vec<Item<'_>> {
    match v {
        Value::Array(a) => a.iter().flat_map(json_items).collect(),
        Value::Null => Vec::new(),
        // `{}` is how callers say "no previous version": it is the empty collection, so
        // `%previous.exists()` is false and `%previous.status` is empty.
        Value::Object(o) if o.is_empty() => Vec::new(),
        Value::Object(_) => vec![Item::root(v)],
        _ => vec![Item::node(v, TypeRef::UNKNOWN)],
    }
}

/// Whether `item` matches a type specifier.
pub(crate) fn type_matches(item: &Item, ts: &TypeSpec) -> bool {
    is_type(item, ts.namespace.as_deref(), &ts.name)
}

/// Whether `item` survives `as`/`ofType`: like [`type_matches`], except that FHIR primitive
/// specialisations are distinct types here (`gender.is(string)` is true but
/// `gender.as(string)` is empty, as the official suite expects).
pub(crate) fn cast_matches(item: &Item, ts: &TypeSpec) -> bool {
    if let Item::Node(n) = item
        && ts.namespace.as_deref() != Some("System")
        && model()
            .get(n.ty.name)
            .is_some_and(|d| d.kind == Kind::PrimitiveType)
    {
        return n.ty.name == ts.name;
    }
    type_matches(item, ts)
}

/// The single item of a collection, `None` if empty, an error if several.
pub(crate) fn singleton<'c, 'a>(c: &'c [Item<'a>], what: &str) -> Result<Option<&'c Item<'a>>> {
    match c {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(FhirPathError::eval(format!(
            "{what} expects a single item, got {}",
            c.len()
        ))),
    }
}

/// A singleton integer argument.
pub(crate) fn single_integer(c: &[Item]) -> Result<Option<i64>> {
    match singleton(c, "integer argument")? {
        None => Ok(None),
        Some(i) => match i.prim() {
            Some(Prim::Integer(n)) => Ok(Some(n)),
            Some(Prim::Decimal(d, _)) if d.fract() == 0.0 => Ok(Some(d as i64)),
            _ => Err(FhirPathError::eval("expected an integer")),
        },
    }
}

/// Convert a collection to a three-valued boolean per the singleton evaluation rules.
pub(crate) fn to_bool3(c: &[Item], what: &str) -> Result<Option<bool>> {
    match singleton(c, what)? {
        None => Ok(None),
        Some(i) => Ok(Some(i.as_bool().unwrap_or(true))),
    }
}

/// Ordering of two items for `< > <= >=`: `None` when undecidable, an error when the types
/// cannot be compared.
pub(crate) fn compare_items(x: &Item, y: &Item) -> Result<Option<std::cmp::Ordering>> {
    use Prim::*;
    let (Some(a), Some(b)) = (x.prim(), y.prim()) else {
        return Err(FhirPathError::eval("cannot compare complex values"));
    };
    // Untyped strings compared with dates: parse them (JSON has no date type).
    let a = match (&a, &b) {
        (String(s), Date(_) | DateTime(_) | Time(_)) => coerce_temporal(s, &b).unwrap_or(a),
        _ => a,
    };
    let b = match (&a, &b) {
        (Date(_) | DateTime(_) | Time(_), String(s)) => coerce_temporal(s, &a).unwrap_or(b),
        _ => b,
    };
    Ok(match (&a, &b) {
        (Integer(p), Integer(q)) => Some(p.cmp(q)),
        (Integer(p), Decimal(q, _)) => (*p as f64).partial_cmp(q),
        (Decimal(p, _), Integer(q)) => p.partial_cmp(&(*q as f64)),
        (Decimal(p, _), Decimal(q, _)) => p.partial_cmp(q),
        (String(p), String(q)) => Some(p.cmp(q)),
        (Date(p) | DateTime(p), Date(q) | DateTime(q)) => p.compare(q),
        (Time(p), Time(q)) => p.compare(q),
        (Quantity(p), Quantity(q)) => compare_quantities(p, q),
        _ => {
            return Err(FhirPathError::eval(format!(
                "cannot compare {} with {}",
                a.type_name(),
                b.type_name()
            )));
        }
    })
}

fn arithmetic<'a>(op: BinOp, x: &Item, y: &Item) -> Result<Option<Item<'a>>> {
    use Prim::*;
    let (Some(a), Some(b)) = (x.prim(), y.prim()) else {
        return Err(FhirPathError::eval("arithmetic needs primitive values"));
    };
    let num = |p: &Prim| match p {
        Integer(i) => Some((*i as f64, 0u8)),
        Decimal(d, s) => Some((*d, *s)),
        _ => None,
    };
    let r = match (op, &a, &b) {
        (BinOp::Add, String(p), String(q)) => Some(Item::String(format!("{p}{q}"))),
        (BinOp::Add | BinOp::Sub | BinOp::Mul, Integer(p), Integer(q)) => {
            let r = match op {
                BinOp::Add => p.checked_add(*q),
                BinOp::Sub => p.checked_sub(*q),
                _ => p.checked_mul(*q),
            };
            r.map(Item::Integer)
        }
        (BinOp::IntDiv, Integer(p), Integer(q)) => {
            if *q == 0 {
                None
            } else {
                Some(Item::Integer(p.wrapping_div(*q)))
            }
        }
        (BinOp::Mod, Integer(p), Integer(q)) => {
            if *q == 0 {
                None
            } else {
                Some(Item::Integer(p.wrapping_rem(*q)))
            }
        }
        (_, Integer(_) | Decimal(..), Integer(_) | Decimal(..)) => {
            let (p, ps) = num(&a).unwrap_or((0.0, 0));
            let (q, qs) = num(&b).unwrap_or((0.0, 0));
            let scale = ps.max(qs);
            match op {
                BinOp::Add => Some(Item::Decimal(p + q, scale)),
                BinOp::Sub => Some(Item::Decimal(p - q, scale)),
                BinOp::Mul => Some(Item::Decimal(p * q, ps + qs)),
                BinOp::Div => (q != 0.0).then(|| Item::Decimal(p / q, 8)),
                BinOp::IntDiv => (q != 0.0).then(|| Item::Integer((p / q).trunc() as i64)),
                _ => (q != 0.0).then(|| Item::Decimal(p % q, scale)),
            }
        }
        (BinOp::Add | BinOp::Sub, Quantity(p), Quantity(q)) => {
            let sign = if op == BinOp::Sub { -1.0 } else { 1.0 };
            if p.unit == q.unit {
                Some(Item::Quantity(super::value::Quantity {
                    value: p.value + sign * q.value,
                    scale: p.scale.max(q.scale),
                    unit: p.unit.clone(),
                }))
            } else {
                None
            }
        }
        (BinOp::Mul, Quantity(p), Integer(_) | Decimal(..))
        | (BinOp::Mul, Integer(_) | Decimal(..), Quantity(p)) => {
            let n = num(if matches!(a, Quantity(_)) { &b } else { &a })
                .map(|t| t.0)
                .unwrap_or(1.0);
            Some(Item::Quantity(super::value::Quantity {
                value: p.value * n,
                scale: p.scale,
                unit: p.unit.clone(),
            }))
        }
        (BinOp::Div, Quantity(p), Integer(_) | Decimal(..)) => {
            let n = num(&b).map(|t| t.0).unwrap_or(1.0);
            (n != 0.0).then(|| {
                Item::Quantity(super::value::Quantity {
                    value: p.value / n,
                    scale: 8,
                    unit: p.unit.clone(),
                })
            })
        }
        (BinOp::Mul | BinOp::Div, Quantity(p), Quantity(q)) => {
            // Only the dimensionless cases and same-unit division are supported without UCUM.
            if op == BinOp::Div && p.unit == q.unit && q.value != 0.0 {
                Some(Item::Quantity(super::value::Quantity {
                    value: p.value / q.value,
                    scale: 8,
                    unit: "1".into(),
                }))
            } else if q.unit == "1" || p.unit == "1" {
                let unit = if q.unit == "1" {
                    p.unit.clone()
                } else {
                    q.unit.clone()
                };
                let v = if op == BinOp::Mul {
                    p.value * q.value
                } else {
                    p.value / q.value
                };
                Some(Item::Quantity(super::value::Quantity {
                    value: v,
                    scale: 8,
                    unit,
                }))
            } else {
                return Err(FhirPathError::Unsupported(
                    "quantity multiplication/division with units (UCUM)".into(),
                ));
            }
        }
        (BinOp::Add | BinOp::Sub, Date(d) | DateTime(d), Quantity(q)) => {
            let sign = if op == BinOp::Sub { -1.0 } else { 1.0 };
            let r = d.add(sign * q.value, &q.unit).ok_or_else(|| {
                FhirPathError::eval(format!("cannot add '{}' to a date/time", q.unit))
            })?;
            Some(if matches!(a, Date(_)) {
                Item::Date(r)
            } else {
                Item::DateTime(r)
            })
        }
        (BinOp::Add | BinOp::Sub, Time(t), Quantity(q)) => {
            let sign = if op == BinOp::Sub { -1.0 } else { 1.0 };
            let r = t
                .add(sign * q.value, &q.unit)
                .ok_or_else(|| FhirPathError::eval(format!("cannot add '{}' to a time", q.unit)))?;
            Some(Item::Time(r))
        }
        _ => {
            return Err(FhirPathError::eval(format!(
                "operator {op:?} is not defined for {} and {}",
                a.type_name(),
                b.type_name()
            )));
        }
    };
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Navigation

/// The FHIR type of an element declared with type code `t` at `owner`/`path`.
fn element_type(owner: &'static str, path: &'static str, t: &'static str) -> TypeRef {
    if t == "BackboneElement" || t == "Element" {
        return TypeRef {
            name: t,
            owner,
            prefix: path,
        };
    }
    if let Some(r) = t.strip_prefix('#') {
        // A content reference (`#Questionnaire.item`): the children are defined there.
        return match r.split_once('.') {
            Some((o, p)) => match model().intern(o) {
                Some(o) => TypeRef {
                    name: "BackboneElement",
                    owner: o,
                    prefix: p,
                },
                None => TypeRef::UNKNOWN,
            },
            None => TypeRef::named(r),
        };
    }
    if let Some(sys) = t.strip_prefix("http://hl7.org/fhirpath/System.") {
        let fhir = match sys {
            "String"
                if path == "id" && model().get(owner).is_some_and(|d| d.kind == Kind::Resource) =>
            {
                "id"
            }
            "String" => "string",
            "Boolean" => "boolean",
            "Integer" => "integer",
            "Decimal" => "decimal",
            "Date" => "date",
            "DateTime" => "dateTime",
            "Time" => "time",
            _ => "string",
        };
        return TypeRef::named(fhir);
    }
    TypeRef::named(t)
}

/// Look up element `name` below node type `ty`.
fn lookup(
    ty: &TypeRef,
    name: &str,
) -> Option<(
    &'static str,
    &'static crate::fhir::elements::ElementDef,
    &'static str,
)> {
    let m = model();
    if ty.prefix.is_empty() {
        let (p, d) = m.element(ty.owner, name)?;
        return Some((p, d, ty.owner));
    }
    // Backbone children are keyed `prefix.name`; build the key on the stack (this runs for
    // every navigation step, and the model's longest paths are well under the buffer size).
    let mut buf = [0u8; 160];
    let path = join_key(&mut buf, ty.prefix, ".", name);
    if let Some((p, d)) = path.and_then(|path| m.element(ty.owner, path)) {
        return Some((p, d, ty.owner));
    }
    // Inherited from BackboneElement/Element: id, extension, modifierExtension.
    let base = if ty.name == "Element" {
        "Element"
    } else {
        "BackboneElement"
    };
    let (p, d) = m.element(base, name)?;
    Some((p, d, base))
}

/// Concatenate `a`, `sep` and `b` into `buf` without allocating; `None` if it does not fit
/// (the caller then finds nothing, which is right: no FHIR element name is that long).
fn join_key<'b>(buf: &'b mut [u8], a: &str, sep: &str, b: &str) -> Option<&'b str> {
    let len = a.len() + sep.len() + b.len();
    if len > buf.len() {
        return None;
    }
    buf[..a.len()].copy_from_slice(a.as_bytes());
    buf[a.len()..a.len() + sep.len()].copy_from_slice(sep.as_bytes());
    buf[a.len() + sep.len()..len].copy_from_slice(b.as_bytes());
    std::str::from_utf8(&buf[..len]).ok()
}

/// Capitalise a type code for a choice property name (`dateTime` -> `DateTime`).
fn choice_suffix_matches(suffix: &str, t: &str) -> bool {
    let mut a = suffix.chars();
    let mut b = t.chars();
    match (a.next(), b.next()) {
        (Some(x), Some(y)) if x == y.to_ascii_uppercase() => a.eq(b),
        _ => false,
    }
}

/// Append the children called `name` of `item` to `out`. Keys scanned are noted on `meter`
/// (the items pushed are charged when the expression's result is); an array longer than the
/// collection cap is cut one item past it, so the caller's size check fails before the whole
/// array is copied.
pub(crate) fn navigate<'a>(item: &Item<'a>, name: &str, out: &mut Vec<Item<'a>>, meter: &Meter) {
    let Item::Node(n) = item else { return };
    let v = n.json.get();
    let Value::Object(obj) = v else {
        // A primitive: only its `id` and `extension` (from the `_name` sibling) are children.
        if let Some(ext) = n.ext {
            match name {
                "extension" => push_borrowed(
                    ext.get("extension"),
                    None,
                    TypeRef::named("Extension"),
                    out,
                    meter,
                ),
                "id" => push_borrowed(ext.get("id"), None, TypeRef::named("string"), out, meter),
                _ => {}
            }
        }
        return;
    };
    if n.ty.is_known()
        && let Some((path, def, owner)) = lookup(&n.ty, name)
    {
        if def.choice {
            // Find the property `name` + capitalised type (`valueQuantity`).
            meter.note(obj.len() as u64);
            for (k, child) in obj {
                if k.len() <= name.len() || !k.starts_with(name) {
                    continue;
                }
                let suffix = &k[name.len()..];
                if let Some(t) = def.types.iter().find(|t| choice_suffix_matches(suffix, t)) {
                    {
                        let ext = if child.is_object() {
                            None
                        } else {
                            sibling(n, k)
                        };
                        push_json(
                            n,
                            k,
                            Some(child),
                            ext,
                            element_type(owner, path, t),
                            out,
                            meter,
                        );
                    }
                }
            }
            return;
        }
        let child = obj.get(name);
        let ty = def
            .types
            .first()
            .map(|t| element_type(owner, path, t))
            .unwrap_or(TypeRef::UNKNOWN);
        let ext = if ty.name.starts_with(|c: char| c.is_ascii_lowercase()) {
            sibling(n, name)
        } else {
            None
        };
        push_json(n, name, child, ext, ty, out, meter);
        return;
    }
    // Untyped (or unknown element): plain JSON navigation.
    if let Some(child) = obj.get(name) {
        let ext = if child.is_object() {
            None
        } else {
            sibling(n, name)
        };
        push_json(n, name, Some(child), ext, TypeRef::UNKNOWN, out, meter);
        return;
    }
    // An untyped choice element: `value` finds `valueQuantity`, typed by its suffix.
    meter.note(obj.len() as u64);
    for (k, child) in obj {
        if k.len() > name.len()
            && k.starts_with(name)
            && k[name.len()..].starts_with(|c: char| c.is_ascii_uppercase())
        {
            let suffix = &k[name.len()..];
            let ty = model()
                .intern(suffix)
                .or_else(|| {
                    let mut lower = suffix.to_string();
                    lower[..1].make_ascii_lowercase();
                    model().intern(&lower)
                })
                .map(TypeRef::named)
                .unwrap_or(TypeRef::UNKNOWN);
            push_json(n, k, Some(child), None, ty, out, meter);
        }
    }
}

/// The `_name` sibling (primitive extensions) of property `name` in a borrowed node.
fn sibling<'a>(n: &Node<'a>, name: &str) -> Option<&'a Value> {
    match &n.json {
        JsonRef::Borrowed(v) => {
            let mut buf = [0u8; 96];
            v.get(join_key(&mut buf, "_", "", name)?)
        }
        JsonRef::Owned(_) => None,
    }
}

/// Push the items of property `key` of `parent` (arrays flatten; `null`s without extension
/// are skipped).
fn push_json<'a>(
    parent: &Node<'a>,
    key: &str,
    child: Option<&Value>,
    ext: Option<&'a Value>,
    ty: TypeRef,
    out: &mut Vec<Item<'a>>,
    meter: &Meter,
) {
    // Borrowed parents yield borrowed children (re-fetched with the input's lifetime);
    // owned (synthesised) parents yield owned copies.
    match &parent.json {
        JsonRef::Borrowed(pv) => {
            let pv: &'a Value = pv;
            push_borrowed(pv.get(key), ext, ty, out, meter);
        }
        JsonRef::Owned(_) => match child {
            Some(Value::Array(items)) => {
                for it in items.iter().take(meter.room(out.len())) {
                    push_one(
                        JsonRef::Owned(std::sync::Arc::new(it.clone())),
                        None,
                        ty,
                        out,
                    );
                }
            }
            Some(c) => push_one(
                JsonRef::Owned(std::sync::Arc::new(c.clone())),
                None,
                ty,
                out,
            ),
            None => {}
        },
    }
}

fn push_one<'a>(c: JsonRef<'a>, e: Option<&'a Value>, ty: TypeRef, out: &mut Vec<Item<'a>>) {
    if c.get().is_null() && e.is_none() {
        return;
    }
    // `Resource`-typed elements (contained, Bundle.entry.resource) take their actual type.
    let ty = match c.get().get("resourceType").and_then(Value::as_str) {
        Some(rt) if ty.name == "Resource" || !ty.is_known() => TypeRef::named(rt),
        _ => ty,
    };
    out.push(Item::Node(Node {
        json: c,
        ext: e,
        ty,
    }));
}

/// Push a borrowed JSON property value and its `_name` sibling.
fn push_borrowed<'a>(
    c: Option<&'a Value>,
    ext: Option<&'a Value>,
    ty: TypeRef,
    out: &mut Vec<Item<'a>>,
    meter: &Meter,
) {
    match (c, ext) {
        (Some(Value::Array(items)), _) => {
            for (i, it) in items.iter().enumerate().take(meter.room(out.len())) {
                let e = ext.and_then(|e| e.get(i)).filter(|e| !e.is_null());
                push_one(JsonRef::Borrowed(it), e, ty, out);
            }
        }
        (Some(c), _) => push_one(JsonRef::Borrowed(c), ext, ty, out),
        (None, Some(e)) => {
            // Only the extension exists (`"_birthDate": {...}`).
            if let Value::Array(es) = e {
                for x in es
                    .iter()
                    .filter(|x| !x.is_null())
                    .take(meter.room(out.len()))
                {
                    push_one(JsonRef::Borrowed(&NULL), Some(x), ty, out);
                }
            } else {
                push_one(JsonRef::Borrowed(&NULL), Some(e), ty, out);
            }
        }
        (None, None) => {}
    }
}

/// All children of an item (for `children()` / `descendants()`), noting the work on `meter`.
pub(crate) fn children<'a>(item: &Item<'a>, out: &mut Vec<Item<'a>>, meter: &Meter) {
    let Item::Node(n) = item else { return };
    let Value::Object(obj) = n.json.get() else {
        return;
    };
    meter.note(obj.len() as u64);
    for (k, v) in obj {
        if k == "resourceType" || k.starts_with('_') && obj.contains_key(&k[1..]) {
            continue;
        }
        let k = k.strip_prefix('_').unwrap_or(k);
        if n.ty.is_known() {
            if lookup(&n.ty, k).is_some() {
                navigate(item, k, out, meter);
                continue;
            }
            // A choice property (`valueQuantity`): navigate its element name, filtered to it.
            if let Some(split) = k
                .char_indices()
                .skip(1)
                .find(|(_, c)| c.is_ascii_uppercase())
                .map(|(i, _)| i)
                && lookup(&n.ty, &k[..split]).is_some_and(|(_, d, _)| d.choice)
            {
                let mut tmp = Vec::new();
                navigate(item, &k[..split], &mut tmp, meter);
                out.extend(tmp.into_iter().filter(|c| matches!(c, Item::Node(cn) if std::ptr::eq(cn.json.get(), v) || v.is_array())));
                continue;
            }
        }
        let mut tmp = Vec::new();
        let untyped = Item::Node(Node {
            json: n.json.clone(),
            ext: None,
            ty: TypeRef::UNKNOWN,
        });
        navigate(&untyped, k, &mut tmp, meter);
        out.extend(tmp);
    }
}
