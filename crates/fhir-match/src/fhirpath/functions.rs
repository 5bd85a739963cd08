//! The FHIRPath function library.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use regex::Regex;
use serde_json::Value;

use super::ast::{Expr, Func, TypeSpec};
use super::error::{FhirPathError, Result};
use super::eval::{
    Ctx, Scope, cast_matches, children, navigate, single_integer, singleton, to_bool3, type_matches,
};
use super::temporal::{DateTimeV, Precision, TimeV, calendar_unit};
use super::value::{Item, JsonRef, Node, Prim, Quantity, TypeRef, format_decimal};

/// Evaluate a function call.
pub(crate) fn call<'a>(
    cx: &Ctx<'_, 'a>,
    func: Func,
    target: Option<&Expr>,
    args: &[Expr],
    type_arg: Option<&TypeSpec>,
    sc: Scope<'_, 'a>,
) -> Result<Vec<Item<'a>>> {
    let input: Vec<Item<'a>> = match target {
        Some(t) => cx.eval(t, sc)?,
        None => sc.this.to_vec(),
    };
    // Evaluate argument `i` once, in the caller's scope (non-lambda arguments).
    let arg = |i: usize| -> Result<Vec<Item<'a>>> { cx.eval(&args[i], sc) };
    // Evaluate a lambda argument for each input item.
    let each = |i: usize, item: &Item<'a>, idx: usize| -> Result<Vec<Item<'a>>> {
        let this = std::slice::from_ref(item);
        cx.eval(
            &args[i],
            Scope {
                this,
                index: Some(idx),
                total: sc.total,
            },
        )
    };
    let b = |v: bool| Ok(vec![Item::Boolean(v)]);
    use Func::*;
    match func {
        Empty => b(input.is_empty()),
        Exists => {
            if args.is_empty() {
                return b(!input.is_empty());
            }
            for (i, item) in input.iter().enumerate() {
                if to_bool3(&each(0, item, i)?, "exists() criteria")? == Some(true) {
                    return b(true);
                }
            }
            b(false)
        }
        All => {
            for (i, item) in input.iter().enumerate() {
                if to_bool3(&each(0, item, i)?, "all() criteria")? != Some(true) {
                    return b(false);
                }
            }
            b(true)
        }
        AllTrue | AnyTrue | AllFalse | AnyFalse => {
            let mut vals = Vec::with_capacity(input.len());
            for i in &input {
                vals.push(
                    i.as_bool()
                        .ok_or_else(|| FhirPathError::eval(format!("{func:?}() needs booleans")))?,
                );
            }
            b(match func {
                AllTrue => vals.iter().all(|v| *v),
                AnyTrue => vals.iter().any(|v| *v),
                AllFalse => vals.iter().all(|v| !*v),
                _ => vals.iter().any(|v| !*v),
            })
        }
        SubsetOf | SupersetOf => {
            let other = arg(0)?;
            let (small, big) = if func == SubsetOf {
                (&input, &other)
            } else {
                (&other, &input)
            };
            for x in small {
                if !cx.contains(big, x)? {
                    return b(false);
                }
            }
            b(true)
        }
        Count => Ok(vec![Item::Integer(input.len() as i64)]),
        Distinct => distinct(cx, input),
        IsDistinct => {
            let n = input.len();
            b(distinct(cx, input)?.len() == n)
        }
        Where => {
            let mut out = Vec::new();
            for (i, item) in input.iter().enumerate() {
                if to_bool3(&each(0, item, i)?, "where() criteria")? == Some(true) {
                    out.push(item.clone());
                }
            }
            Ok(out)
        }
        Select => {
            let mut out = Vec::new();
            for (i, item) in input.iter().enumerate() {
                out.extend(each(0, item, i)?);
                cx.check_len(out.len())?;
            }
            Ok(out)
        }
        Repeat => {
            // Items already seen are not expanded again: nodes by identity (a JSON tree is
            // finite, so this terminates), system values by their text; both O(1).
            let mut seen = Seen::default();
            let mut out: Vec<Item<'a>> = Vec::new();
            let mut queue = input;
            while !queue.is_empty() {
                let mut next = Vec::new();
                for (i, item) in queue.iter().enumerate() {
                    for r in each(0, item, i)? {
                        cx.charge(1)?;
                        if seen.insert(&r, cx)? {
                            out.push(r.clone());
                            next.push(r);
                            cx.check_len(out.len())?;
                        }
                    }
                }
                queue = next;
            }
            Ok(out)
        }
        OfType | As => {
            let ts = type_arg.expect("parser supplies the type");
            Ok(input.into_iter().filter(|i| cast_matches(i, ts)).collect())
        }
        Is => {
            let ts = type_arg.expect("parser supplies the type");
            match singleton(&input, "is()")? {
                None => Ok(Vec::new()),
                Some(i) => b(type_matches(i, ts)),
            }
        }
        First => Ok(input.into_iter().take(1).collect()),
        Last => Ok(input.into_iter().last().into_iter().collect()),
        Tail => Ok(input.into_iter().skip(1).collect()),
        Skip => {
            let n = single_integer(&arg(0)?)?.unwrap_or(0).max(0) as usize;
            Ok(input.into_iter().skip(n).collect())
        }
        Take => {
            let n = single_integer(&arg(0)?)?.unwrap_or(0).max(0) as usize;
            Ok(input.into_iter().take(n).collect())
        }
        Single => match input.len() {
            0 | 1 => Ok(input),
            n => Err(FhirPathError::eval(format!(
                "single() on a collection of {n} items"
            ))),
        },
        Intersect => {
            let other = arg(0)?;
            let mut kept = Vec::new();
            for x in input {
                if contains_item(cx, &other, &x)? {
                    kept.push(x);
                }
            }
            distinct(cx, kept)
        }
        Exclude => {
            let other = arg(0)?;
            let mut out = Vec::new();
            for x in input {
                if !contains_item(cx, &other, &x)? {
                    out.push(x);
                }
            }
            Ok(out)
        }
        Union => {
            let mut all = input;
            all.extend(arg(0)?);
            distinct(cx, all)
        }
        Combine => {
            let mut all = input;
            all.extend(arg(0)?);
            cx.check_len(all.len())?;
            Ok(all)
        }
        Iif => {
            // The criterion and branches see the invocation target as `$this` when there is
            // one (`x.iif(...)`), otherwise the caller's scope.
            if target.is_some() && input.len() > 1 {
                return Err(FhirPathError::eval(
                    "iif() on a collection of several items",
                ));
            }
            let scope = if target.is_some() {
                Scope {
                    this: &input,
                    index: sc.index,
                    total: sc.total,
                }
            } else {
                sc
            };
            let cond = to_bool3(&cx.eval(&args[0], scope)?, "iif() criterion")?;
            if cond == Some(true) {
                cx.eval(&args[1], scope)
            } else if args.len() > 2 {
                cx.eval(&args[2], scope)
            } else {
                Ok(Vec::new())
            }
        }
        Not => match to_bool3(&input, "not()")? {
            None => Ok(Vec::new()),
            Some(v) => b(!v),
        },
        Type => Ok(input.iter().map(type_info).collect()),
        ToString | ToInteger | ToDecimal | ToBoolean | ToDate | ToDateTime | ToTime
        | ToQuantity => {
            let Some(item) = singleton(&input, "conversion")? else {
                return Ok(Vec::new());
            };
            let unit = if func == ToQuantity && !args.is_empty() {
                single_string(&arg(0)?)?
            } else {
                None
            };
            Ok(convert(func, item, unit.as_deref()).into_iter().collect())
        }
        ConvertsToString | ConvertsToInteger | ConvertsToDecimal | ConvertsToBoolean
        | ConvertsToDate | ConvertsToDateTime | ConvertsToTime | ConvertsToQuantity => {
            let Some(item) = singleton(&input, "conversion")? else {
                return Ok(Vec::new());
            };
            let target = match func {
                ConvertsToString => ToString,
                ConvertsToInteger => ToInteger,
                ConvertsToDecimal => ToDecimal,
                ConvertsToBoolean => ToBoolean,
                ConvertsToDate => ToDate,
                ConvertsToDateTime => ToDateTime,
                ConvertsToTime => ToTime,
                _ => ToQuantity,
            };
            let unit = if func == ConvertsToQuantity && !args.is_empty() {
                single_string(&arg(0)?)?
            } else {
                None
            };
            b(convert(target, item, unit.as_deref()).is_some())
        }
        IndexOf | Substring | StartsWith | EndsWith | Contains | Upper | Lower | Replace
        | MatchesFull | Matches | ReplaceMatches | Length | ToChars | Split | Trim => {
            let Some(s) = string_input(&input, func)? else {
                return Ok(Vec::new());
            };
            string_function(cx, func, &s, args.len(), &arg)
        }
        Join => {
            let sep = if args.is_empty() {
                None
            } else {
                single_string(&arg(0)?)?
            };
            let sep = sep.as_deref().unwrap_or("");
            let mut parts = Vec::with_capacity(input.len());
            for i in &input {
                match i.prim() {
                    Some(Prim::String(s)) => parts.push(s),
                    _ => return Err(FhirPathError::eval("join() needs strings")),
                }
            }
            // Bound the result before building it.
            let len = parts.iter().map(|p| p.len() + sep.len()).sum::<usize>();
            cx.check_str(len)?;
            Ok(vec![Item::String(parts.join(sep))])
        }
        Abs | Ceiling | Exp | Floor | Ln | Log | Power | Round | Sqrt | Truncate => {
            math(func, &input, args.len(), &arg)
        }
        Children => {
            let mut out = Vec::new();
            for i in &input {
                children(i, &mut out, &cx.meter);
                cx.check_len(out.len())?;
                cx.meter.check()?;
            }
            Ok(out)
        }
        Descendants => {
            let mut out = Vec::new();
            let mut frontier = input;
            while !frontier.is_empty() {
                let mut next = Vec::new();
                for i in &frontier {
                    cx.charge(1)?;
                    children(i, &mut next, &cx.meter);
                    cx.check_len(out.len() + next.len())?;
                }
                // Each level is a new collection: charge it like an expression's result.
                cx.meter.produced(&next)?;
                out.extend(next.iter().cloned());
                frontier = next;
            }
            Ok(out)
        }
        Trace => {
            let name = single_string(&arg(0)?)?.unwrap_or_default();
            tracing::debug!(target: "fhirpath", name = %name, items = input.len(), "trace()");
            Ok(input)
        }
        Now => Ok(vec![Item::DateTime(DateTimeV::now())]),
        Today => {
            let mut d = DateTimeV::now().date_part();
            d.precision = Precision::Day;
            Ok(vec![Item::Date(d)])
        }
        TimeOfDay => {
            let n = DateTimeV::now();
            Ok(vec![Item::Time(TimeV {
                hour: n.hour,
                minute: n.minute,
                second: n.second,
                millis: n.millis,
                precision: Precision::Millisecond,
            })])
        }
        HasValue => b(
            matches!(input.as_slice(), [i] if i.prim().is_some() && !matches!(i, Item::Node(n) if n.json.get().is_null()) && !i.is_complex_node()),
        ),
        GetValue => match input.as_slice() {
            [i] if !i.is_complex_node() => Ok(i.prim().map(Prim::into_item).into_iter().collect()),
            _ => Ok(Vec::new()),
        },
        Resolve => {
            let mut out = Vec::new();
            for i in &input {
                resolve(cx, i, &mut out)?;
            }
            Ok(out)
        }
        Extension => {
            let url = single_string(&arg(0)?)?.unwrap_or_default();
            let mut out = Vec::new();
            for i in &input {
                let mut exts = Vec::new();
                navigate(i, "extension", &mut exts, &cx.meter);
                cx.meter.check()?;
                out.extend(exts.into_iter().filter(|e| matches!(e, Item::Node(n) if n.json.get().get("url").and_then(Value::as_str) == Some(url.as_str()))));
            }
            Ok(out)
        }
        Aggregate => {
            let mut total: Vec<Item<'a>> = if args.len() > 1 { arg(1)? } else { Vec::new() };
            for (i, item) in input.iter().enumerate() {
                let this = std::slice::from_ref(item);
                total = cx.eval(
                    &args[0],
                    Scope {
                        this,
                        index: Some(i),
                        total: Some(&total),
                    },
                )?;
            }
            Ok(total)
        }
        MemberOf | ConformsTo | HtmlChecks | Comparable | Subsumes | SubsumedBy => {
            Err(FhirPathError::Unsupported(format!(
                "{func:?} (needs a terminology server or profiles)"
            )))
        }
    }
}

/// `type()`: a `{namespace, name}` object describing the item's type.
fn type_info<'a>(item: &Item) -> Item<'a> {
    let (ns, name) = match item {
        Item::Node(n) => ("FHIR", n.ty.name),
        other => (
            "System",
            other
                .fhir_type()
                .and_then(|t| t.strip_prefix("System."))
                .unwrap_or(""),
        ),
    };
    let v = serde_json::json!({"namespace": ns, "name": name});
    Item::Node(Node {
        json: JsonRef::Owned(Arc::new(v)),
        ext: None,
        ty: TypeRef::UNKNOWN,
    })
}

/// A set of items for de-duplication in `repeat()`.
#[derive(Default)]
struct Seen {
    nodes: std::collections::HashSet<(usize, usize)>,
    values: std::collections::HashSet<String>,
}

impl Seen {
    /// Insert; `false` if already present. The set's memory is charged to the budget.
    fn insert(&mut self, item: &Item, cx: &Ctx) -> Result<bool> {
        match item {
            Item::Node(Node {
                json: JsonRef::Borrowed(v),
                ext,
                ..
            }) => {
                cx.meter.alloc(2 * size_of::<(usize, usize)>())?;
                let e = ext.map(|e| e as *const Value as usize).unwrap_or(0);
                Ok(self.nodes.insert((*v as *const Value as usize, e)))
            }
            other => {
                let key = format!("{:?}|{}", other.fhir_type(), other.to_json());
                cx.meter.alloc(key.len() + size_of::<String>())?;
                cx.meter.scan(key.len())?;
                Ok(self.values.insert(key))
            }
        }
    }
}

fn same_node(a: &Item, b: &Item) -> bool {
    match (a, b) {
        (Item::Node(x), Item::Node(y)) => match (&x.json, &y.json) {
            (JsonRef::Borrowed(p), JsonRef::Borrowed(q)) => {
                std::ptr::eq(*p, *q)
                    && x.ext.map(|e| e as *const Value) == y.ext.map(|e| e as *const Value)
            }
            _ => false,
        },
        _ => false,
    }
}

/// Membership by equality; nodes at the same place in the input are the same item (a cheap
/// check before the deep comparison). Charged per comparison: callers loop over collections.
fn contains_item(cx: &Ctx, c: &[Item], x: &Item) -> Result<bool> {
    for y in c {
        cx.charge(1)?;
        if same_node(x, y) || cx.equal(x, y)? == Some(true) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// De-duplicate by equality: quadratic, which the per-comparison charge keeps in budget.
fn distinct<'a>(cx: &Ctx<'_, 'a>, input: Vec<Item<'a>>) -> Result<Vec<Item<'a>>> {
    let mut out: Vec<Item<'a>> = Vec::with_capacity(input.len());
    for i in input {
        cx.charge(1)?;
        if !contains_item(cx, &out, &i)? {
            out.push(i);
        }
    }
    Ok(out)
}

/// A singleton string argument (`None` when empty).
fn single_string(c: &[Item]) -> Result<Option<String>> {
    match singleton(c, "string argument")? {
        None => Ok(None),
        Some(i) => match i.prim() {
            Some(Prim::String(s)) => Ok(Some(s.into_owned())),
            _ => Err(FhirPathError::eval("expected a string argument")),
        },
    }
}

/// The string a string function works on: the input must be empty or a single string.
fn string_input<'c>(input: &'c [Item], func: Func) -> Result<Option<Cow<'c, str>>> {
    match input {
        [] => Ok(None),
        [i] => match i.prim() {
            Some(Prim::String(s)) => Ok(Some(s)),
            // Date/number nodes and values are strings in JSON; string functions see their text.
            Some(p) if matches!(i, Item::Node(_)) => Ok(i
                .as_str()
                .map(Cow::Borrowed)
                .or_else(|| Some(Cow::Owned(prim_to_string(&p))))),
            _ => Err(FhirPathError::eval(format!(
                "{func:?}() expects a string input"
            ))),
        },
        _ => Err(FhirPathError::eval(format!(
            "{func:?}() expects a single string, got {} items",
            input.len()
        ))),
    }
}

static REGEX_CACHE: LazyLock<Mutex<HashMap<String, Arc<Regex>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Compile a regex through a small bounded cache (criteria reuse the same patterns).
fn regex(pattern: &str) -> Result<Arc<Regex>> {
    if let Ok(c) = REGEX_CACHE.lock()
        && let Some(r) = c.get(pattern)
    {
        return Ok(r.clone());
    }
    // `(?s)`: `.` matches newlines as in the spec's reference regex flavour.
    let r = regex::RegexBuilder::new(&format!("(?s){pattern}"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| FhirPathError::eval(format!("invalid regular expression: {e}")))?;
    let r = Arc::new(r);
    if let Ok(mut c) = REGEX_CACHE.lock() {
        if c.len() >= 256 {
            c.clear();
        }
        c.insert(pattern.to_string(), r.clone());
    }
    Ok(r)
}

/// Charge `passes` regex runs of `pattern` over `s` before making them. A regex costs more per
/// byte than a plain scan (measured: about four times with capture groups), the more so the
/// bigger the pattern (when the lazy DFA gives up, the engine simulates the automaton, whose size
/// follows the pattern's), so the text is weighted by the pattern's length.
fn regex_scan(cx: &Ctx, s: &str, pattern: &str, passes: usize) -> Result<()> {
    let weight = passes * 4 * (1 + pattern.len() / 8);
    cx.meter.scan(s.len().saturating_mul(weight))
}

fn string_function<'a>(
    cx: &Ctx<'_, 'a>,
    func: Func,
    s: &str,
    nargs: usize,
    arg: &dyn Fn(usize) -> Result<Vec<Item<'a>>>,
) -> Result<Vec<Item<'a>>> {
    use Func::*;
    let str_arg = |i: usize| -> Result<Option<String>> { single_string(&arg(i)?) };
    let st = |v: String| -> Result<Vec<Item<'a>>> {
        cx.check_str(v.len())?;
        Ok(vec![Item::String(v)])
    };
    // Every string function reads its input at least once (arguments are charged when
    // evaluated, results when returned).
    cx.meter.scan(s.len())?;
    Ok(match func {
        IndexOf => {
            let Some(sub) = str_arg(0)? else {
                return Ok(Vec::new());
            };
            let idx = match s.find(&sub) {
                Some(byte) => s[..byte].chars().count() as i64,
                None => -1,
            };
            vec![Item::Integer(idx)]
        }
        Substring => {
            let Some(start) = single_integer(&arg(0)?)? else {
                return Ok(Vec::new());
            };
            let len = if nargs > 1 {
                single_integer(&arg(1)?)?
            } else {
                None
            };
            let n = s.chars().count() as i64;
            if start < 0 || start >= n {
                return Ok(Vec::new());
            }
            let take = len.map(|l| l.max(0) as usize).unwrap_or(usize::MAX);
            return st(s.chars().skip(start as usize).take(take).collect());
        }
        StartsWith | EndsWith | Contains => {
            let Some(sub) = str_arg(0)? else {
                return Ok(Vec::new());
            };
            let v = match func {
                StartsWith => s.starts_with(&sub),
                EndsWith => s.ends_with(&sub),
                _ => s.contains(&sub),
            };
            vec![Item::Boolean(v)]
        }
        // Case mapping can lengthen text (up to three bytes per byte): bound it first.
        Upper | Lower => {
            cx.check_str(s.len().saturating_mul(3))?;
            return st(if func == Upper {
                s.to_uppercase()
            } else {
                s.to_lowercase()
            });
        }
        Trim => return st(s.trim().to_string()),
        Length => vec![Item::Integer(s.chars().count() as i64)],
        ToChars => {
            cx.check_len(s.chars().count())?;
            s.chars().map(|c| Item::String(c.to_string())).collect()
        }
        Split => {
            let Some(sep) = str_arg(0)? else {
                return Ok(Vec::new());
            };
            // Count the parts before making them (a long string splits into many).
            let parts = if sep.is_empty() {
                s.chars().count()
            } else {
                s.matches(sep.as_str()).count() + 1
            };
            cx.check_len(parts)?;
            if sep.is_empty() {
                s.chars().map(|c| Item::String(c.to_string())).collect()
            } else {
                s.split(sep.as_str())
                    .map(|p| Item::String(p.to_string()))
                    .collect()
            }
        }
        Replace => {
            let (Some(pat), Some(rep)) = (str_arg(0)?, str_arg(1)?) else {
                return Ok(Vec::new());
            };
            // Bound the result before building it: each match can grow the string.
            let matches = if pat.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(pat.as_str()).count()
            };
            cx.check_str(s.len() + matches.saturating_mul(rep.len()))?;
            return st(s.replace(pat.as_str(), &rep));
        }
        Matches => {
            let Some(pat) = str_arg(0)? else {
                return Ok(Vec::new());
            };
            regex_scan(cx, s, &pat, 1)?;
            vec![Item::Boolean(regex(&pat)?.is_match(s))]
        }
        MatchesFull => {
            let Some(pat) = str_arg(0)? else {
                return Ok(Vec::new());
            };
            regex_scan(cx, s, &pat, 1)?;
            vec![Item::Boolean(regex(&format!("^(?:{pat})$"))?.is_match(s))]
        }
        ReplaceMatches => {
            let (Some(pat), Some(rep)) = (str_arg(0)?, str_arg(1)?) else {
                return Ok(Vec::new());
            };
            // An empty pattern matches nowhere useful; the suite expects the input unchanged.
            if pat.is_empty() {
                return st(s.to_string());
            }
            let re = regex(&pat)?;
            // The counting pass and the replacing pass each run the regex over the input.
            regex_scan(cx, s, &pat, 2)?;
            let n = re.find_iter(s).count();
            cx.check_str(s.len() + n.saturating_mul(rep.len() + 16))?;
            return st(re.replace_all(s, rep.as_str()).into_owned());
        }
        _ => unreachable!("not a string function"),
    })
}

fn math<'a>(
    func: Func,
    input: &[Item],
    nargs: usize,
    arg: &dyn Fn(usize) -> Result<Vec<Item<'a>>>,
) -> Result<Vec<Item<'a>>> {
    use Func::*;
    let Some(item) = singleton(input, "math function")? else {
        return Ok(Vec::new());
    };
    let p = item.prim();
    let (x, is_int, scale) = match &p {
        Some(Prim::Integer(i)) => (*i as f64, true, 0),
        Some(Prim::Decimal(d, s)) => (*d, false, *s),
        Some(Prim::Quantity(q)) if func == Abs => {
            let mut q = q.clone().into_owned();
            q.value = q.value.abs();
            return Ok(vec![Item::Quantity(q)]);
        }
        _ => return Err(FhirPathError::eval(format!("{func:?}() needs a number"))),
    };
    let num_arg = |i: usize| -> Result<Option<f64>> {
        match singleton(&arg(i)?, "math argument")? {
            None => Ok(None),
            Some(a) => match a.prim() {
                Some(Prim::Integer(n)) => Ok(Some(n as f64)),
                Some(Prim::Decimal(d, _)) => Ok(Some(d)),
                _ => Err(FhirPathError::eval("expected a number argument")),
            },
        }
    };
    let dec = |v: f64| -> Vec<Item<'a>> {
        if v.is_finite() {
            vec![Item::Decimal(v, 8)]
        } else {
            Vec::new()
        }
    };
    Ok(match func {
        Abs => {
            if is_int {
                (x as i64)
                    .checked_abs()
                    .map(Item::Integer)
                    .into_iter()
                    .collect()
            } else {
                vec![Item::Decimal(x.abs(), scale)]
            }
        }
        Ceiling => vec![Item::Integer(x.ceil() as i64)],
        Floor => vec![Item::Integer(x.floor() as i64)],
        Truncate => vec![Item::Integer(x.trunc() as i64)],
        Exp => dec(x.exp()),
        Ln => dec(x.ln()),
        Sqrt => {
            if x < 0.0 {
                Vec::new()
            } else {
                dec(x.sqrt())
            }
        }
        Log => {
            let Some(base) = num_arg(0)? else {
                return Ok(Vec::new());
            };
            dec(x.ln() / base.ln())
        }
        Power => {
            let Some(e) = num_arg(0)? else {
                return Ok(Vec::new());
            };
            let r = x.powf(e);
            if is_int
                && e.fract() == 0.0
                && e >= 0.0
                && r.abs() < 9.0e15
                && matches!(arg(0)?.first().and_then(Item::prim), Some(Prim::Integer(_)))
            {
                vec![Item::Integer(r as i64)]
            } else {
                dec(r)
            }
        }
        Round => {
            let places = if nargs > 0 { num_arg(0)? } else { None };
            let places = places.unwrap_or(0.0).max(0.0) as i32;
            let f = 10f64.powi(places);
            let r = (x * f).round() / f;
            vec![Item::Decimal(r, places as u8)]
        }
        _ => unreachable!("not a math function"),
    })
}

/// Text of a primitive for `toString()` and `&`.
pub(crate) fn prim_to_string(p: &Prim) -> String {
    match p {
        Prim::Boolean(b) => b.to_string(),
        Prim::String(s) => s.to_string(),
        Prim::Integer(i) => i.to_string(),
        Prim::Decimal(d, s) => format_decimal(*d, *s),
        Prim::Date(d) | Prim::DateTime(d) => d.format(),
        Prim::Time(t) => t.format(),
        Prim::Quantity(q) => {
            // Calendar keywords stay keywords (`1 week`); UCUM units are quoted (`1 'wk'`).
            let keyword = q.unit.len() > 3 && calendar_unit(&q.unit).is_some();
            if keyword {
                format!("{} {}", format_decimal(q.value, q.scale), q.unit)
            } else {
                format!("{} '{}'", format_decimal(q.value, q.scale), q.unit)
            }
        }
    }
}

static QUANTITY_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([+-]?\d+(?:\.\d+)?)\s*(?:'([^']+)'|([a-z]+))?$").expect("valid regex")
});

fn parse_decimal(s: &str) -> Option<(f64, u8)> {
    let t = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || s.ends_with('.')
    {
        return None;
    }
    Some((s.parse().ok()?, frac.len().min(255) as u8))
}

/// Convert one item for the `toX()` functions; `None` when not convertible.
fn convert<'a>(func: Func, item: &Item, unit: Option<&str>) -> Option<Item<'a>> {
    use Func::*;
    let p = item.prim()?;
    Some(match func {
        ToString => Item::String(prim_to_string(&p)),
        ToInteger => match p {
            Prim::Integer(i) => Item::Integer(i),
            Prim::Boolean(b) => Item::Integer(b as i64),
            Prim::String(s) => {
                let t = s.strip_prefix(['+', '-']).unwrap_or(&s);
                if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                Item::Integer(s.parse().ok()?)
            }
            _ => return None,
        },
        ToDecimal => match p {
            Prim::Integer(i) => Item::Decimal(i as f64, 0),
            Prim::Decimal(d, s) => Item::Decimal(d, s),
            Prim::Boolean(b) => Item::Decimal(if b { 1.0 } else { 0.0 }, 1),
            Prim::String(s) => {
                let (v, sc) = parse_decimal(&s)?;
                Item::Decimal(v, sc)
            }
            _ => return None,
        },
        ToBoolean => match p {
            Prim::Boolean(b) => Item::Boolean(b),
            Prim::Integer(1) => Item::Boolean(true),
            Prim::Integer(0) => Item::Boolean(false),
            Prim::Decimal(1.0, _) => Item::Boolean(true),
            Prim::Decimal(0.0, _) => Item::Boolean(false),
            Prim::String(s) => match s.to_lowercase().as_str() {
                "true" | "t" | "yes" | "y" | "1" | "1.0" => Item::Boolean(true),
                "false" | "f" | "no" | "n" | "0" | "0.0" => Item::Boolean(false),
                _ => return None,
            },
            _ => return None,
        },
        ToDate => match p {
            Prim::Date(d) => Item::Date(d),
            Prim::DateTime(d) => Item::Date(d.date_part()),
            Prim::String(s) => Item::Date(DateTimeV::parse(&s, true)?.date_part()),
            _ => return None,
        },
        ToDateTime => match p {
            Prim::Date(d) | Prim::DateTime(d) => Item::DateTime(d),
            Prim::String(s) => Item::DateTime(DateTimeV::parse(&s, true)?),
            _ => return None,
        },
        ToTime => match p {
            Prim::Time(t) => Item::Time(t),
            Prim::String(s) => Item::Time(TimeV::parse(&s)?),
            _ => return None,
        },
        ToQuantity => {
            let q = match p {
                Prim::Quantity(q) => q.into_owned(),
                Prim::Integer(i) => Quantity {
                    value: i as f64,
                    scale: 0,
                    unit: "1".into(),
                },
                Prim::Decimal(d, s) => Quantity {
                    value: d,
                    scale: s,
                    unit: "1".into(),
                },
                Prim::Boolean(b) => Quantity {
                    value: if b { 1.0 } else { 0.0 },
                    scale: 1,
                    unit: "1".into(),
                },
                Prim::String(s) => {
                    let c = QUANTITY_RE.captures(s.trim())?;
                    let (v, sc) = parse_decimal(c.get(1)?.as_str())?;
                    let unit = match (c.get(2), c.get(3)) {
                        (Some(u), _) => u.as_str().to_string(),
                        (None, Some(w)) => calendar_unit(w.as_str())
                            .filter(|_| w.as_str().len() > 2)?
                            .to_string(),
                        _ => "1".to_string(),
                    };
                    Quantity {
                        value: v,
                        scale: sc,
                        unit,
                    }
                }
                _ => return None,
            };
            match unit {
                None => Item::Quantity(q),
                Some(u) if u == q.unit => Item::Quantity(q),
                Some(u) => {
                    let target = Quantity {
                        value: 1.0,
                        scale: 0,
                        unit: u.to_string(),
                    };
                    let ratio = unit_ratio(&q, &target)?;
                    Item::Quantity(Quantity {
                        value: q.value * ratio,
                        scale: q.scale,
                        unit: u.to_string(),
                    })
                }
            }
        }
        _ => return None,
    })
}

/// How many `to` units make one `from` unit, for the few conversions that need no UCUM table.
fn unit_ratio(from: &Quantity, to: &Quantity) -> Option<f64> {
    let base = |u: &str| -> Option<(f64, &'static str)> {
        Some(match u {
            "g" => (1.0, "g"),
            "mg" => (1e-3, "g"),
            "ug" => (1e-6, "g"),
            "kg" => (1e3, "g"),
            "m" => (1.0, "m"),
            "mm" => (1e-3, "m"),
            "cm" => (1e-2, "m"),
            "km" => (1e3, "m"),
            "L" => (1.0, "L"),
            "mL" => (1e-3, "L"),
            "dL" => (1e-1, "L"),
            "s" | "second" | "seconds" => (1.0, "s"),
            "ms" | "millisecond" | "milliseconds" => (1e-3, "s"),
            "min" | "minute" | "minutes" => (60.0, "s"),
            "h" | "hour" | "hours" => (3600.0, "s"),
            "d" | "day" | "days" => (86400.0, "s"),
            "wk" | "week" | "weeks" => (604800.0, "s"),
            _ => return None,
        })
    };
    let (f, d1) = base(&from.unit)?;
    let (t, d2) = base(&to.unit)?;
    (d1 == d2).then_some(f / t)
}

/// `resolve()`: contained resources (`#id`), bundle entries, or a stand-in resource made from
/// a relative reference (`Patient/123` yields `{"resourceType":"Patient","id":"123"}`, which
/// is enough for `resolve() is Patient`).
fn resolve<'a>(cx: &Ctx<'_, 'a>, item: &Item<'a>, out: &mut Vec<Item<'a>>) -> Result<()> {
    let reference: Option<&str> = match item {
        Item::Node(n) => match n.json.get() {
            Value::Object(o) => o.get("reference").and_then(Value::as_str),
            Value::String(s) => Some(s.as_str()),
            _ => None,
        },
        Item::String(s) => Some(s.as_str()),
        _ => None,
    };
    let Some(r) = reference else { return Ok(()) };
    let root = cx.resource;
    if let Some(id) = r.strip_prefix('#') {
        if let Some(Value::Array(cs)) = root.get("contained") {
            // Resolving each of many references scans the list again: charge the scan.
            cx.charge(cs.len() as u64)?;
            for c in cs {
                if c.get("id").and_then(Value::as_str) == Some(id) {
                    out.push(Item::root(c));
                    return Ok(());
                }
            }
        }
        return Ok(());
    }
    if let Some(Value::Array(entries)) = root.get("entry") {
        cx.charge(entries.len() as u64)?;
        for e in entries {
            let Some(res) = e.get("resource") else {
                continue;
            };
            let full = e.get("fullUrl").and_then(Value::as_str);
            let rel = match (
                res.get("resourceType").and_then(Value::as_str),
                res.get("id").and_then(Value::as_str),
            ) {
                (Some(t), Some(i)) => Some(format!("{t}/{i}")),
                _ => None,
            };
            if full == Some(r)
                || rel.as_deref() == Some(r)
                || rel
                    .as_deref()
                    .is_some_and(|rel| r.ends_with(&format!("/{rel}")))
            {
                out.push(Item::root(res));
                return Ok(());
            }
        }
    }
    // `[base/]Type/id[/_history/v]`.
    let path = r.split("/_history/").next().unwrap_or(r);
    let mut parts = path.rsplit('/');
    let (Some(id), Some(ty)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let Some(def) = crate::fhir::elements::model().get(ty) else {
        return Ok(());
    };
    if def.kind != crate::fhir::elements::Kind::Resource || id.is_empty() {
        return Ok(());
    }
    let v = serde_json::json!({"resourceType": ty, "id": id});
    out.push(Item::Node(Node {
        json: JsonRef::Owned(Arc::new(v)),
        ext: None,
        ty: TypeRef::named(ty),
    }));
    Ok(())
}
