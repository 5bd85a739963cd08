//! Number and quantity parameters.
//!
//! Deliberately beyond Medplum, whose matcher never matches `number` or `quantity` parameters: users
//! want `Observation?value-quantity=gt100|http://unitsofmeasure.org|mg` to fire. Semantics follow FHIR
//! R4 search (§3.1.1.4.2 number, §3.1.1.4.6 quantity):
//! - the search value's implicit precision makes `eq` a range: `100` means `[99.5, 100.5)`,
//!   `100.00` means `[99.995, 100.005)`, `1e2` means `[50, 150)`;
//! - `lt le gt ge` compare against the exact value, `sa`/`eb` like `gt`/`lt`;
//! - `ap` is "within 10% of the value" (the FHIR recommendation);
//! - `ne` matches when no resource value is `eq`.
//!
//! Decimals are compared exactly (scaled integers), not as floats, so boundaries such as `0.35` behave.
//! There is no unit conversion: `system`/`code` must be equal as written (UCUM codes are case-sensitive).

use std::cmp::Ordering;

use serde_json::Value;

use super::Prefix;

/// Bounds that keep every scaled value well inside `i128`: at most 17 significant digits once the
/// exponent is applied, at most 19 fraction digits, exponents within ±17.
const MAX_DIGITS: usize = 17;
const MAX_SCALE: i32 = 19;
const MAX_EXP: i32 = 17;

/// An exact decimal `mantissa × 10^-scale`, remembering the precision it was written with.
#[derive(Debug, Clone, Copy)]
pub struct Decimal {
    mantissa: i128,
    /// Fraction digits of `mantissa` (0..=20).
    scale: u32,
    /// Position of the last written digit, as a scale (`100` → 0, `1.50` → 2, `1e2` → -2).
    precision: i32,
}

impl Decimal {
    /// Parses a decimal (`-12.50`, `1e2`, `1.5E-3`, leading `+`). Returns `None` when invalid or beyond
    /// 17 significant digits, 19 fraction digits or exponent ±17.
    pub fn parse(s: &str) -> Option<Decimal> {
        if s.is_empty() || s.len() > 64 {
            return None;
        }
        let (body, exp) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], s[i + 1..].parse::<i32>().ok()?),
            None => (s, 0),
        };
        if !(-MAX_EXP..=MAX_EXP).contains(&exp) {
            return None;
        }
        let (neg, body) = match body.as_bytes().first()? {
            b'-' => (true, &body[1..]),
            b'+' => (false, &body[1..]),
            _ => (false, body),
        };
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().all(|c| c.is_ascii_digit()) || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let mut digits = int.trim_start_matches('0').len() + frac.len();
        let precision = frac.len() as i32 - exp;
        let mut mantissa: i128 = 0;
        for c in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa.checked_mul(10)? + i128::from(c - b'0');
        }
        let scale = if precision < 0 {
            // `1e2`: store the value as an integer but keep the written precision.
            digits += (-precision) as usize;
            mantissa *= 10i128.checked_pow((-precision) as u32)?;
            0
        } else {
            precision
        };
        if digits > MAX_DIGITS || scale > MAX_SCALE {
            return None;
        }
        if neg {
            mantissa = -mantissa;
        }
        Some(Decimal {
            mantissa,
            scale: scale as u32,
            precision,
        })
    }

    /// Reads a JSON number (FHIR decimals are JSON numbers; serde keeps their text form for integers and
    /// the shortest round-trip form for floats).
    pub fn from_json(v: &Value) -> Option<Decimal> {
        match v {
            Value::Number(n) => Decimal::parse(&n.to_string()),
            _ => None,
        }
    }

    fn exact(mantissa: i128, scale: u32) -> Decimal {
        Decimal {
            mantissa,
            scale,
            precision: scale as i32,
        }
    }

    /// Value scaled to `scale` fraction digits (caller guarantees `scale >= self.scale`; the bounds
    /// above keep the result below 10^38).
    fn at_scale(self, scale: u32) -> i128 {
        self.mantissa * 10i128.pow(scale - self.scale)
    }

    /// Half a unit in the last written digit: the implicit precision of a search value.
    fn half_unit(self) -> Decimal {
        let p = self.precision + 1;
        if p >= 0 {
            Decimal::exact(5, p as u32)
        } else {
            Decimal::exact(5 * 10i128.pow((-p) as u32), 0)
        }
    }

    fn add(self, other: Decimal) -> Decimal {
        let scale = self.scale.max(other.scale);
        Decimal::exact(self.at_scale(scale) + other.at_scale(scale), scale)
    }

    fn neg(self) -> Decimal {
        Decimal {
            mantissa: -self.mantissa,
            ..self
        }
    }

    /// 10% of the absolute value (the FHIR `ap` window).
    fn tenth_abs(self) -> Decimal {
        Decimal::exact(self.mantissa.abs(), self.scale + 1)
    }
}

impl PartialEq for Decimal {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Decimal {}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let scale = self.scale.max(other.scale);
        self.at_scale(scale).cmp(&other.at_scale(scale))
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.scale == 0 {
            return write!(f, "{}", self.mantissa);
        }
        let s = self.scale as usize;
        let digits = self.mantissa.unsigned_abs().to_string();
        let digits = format!("{digits:0>width$}", width = s + 1);
        let (i, fr) = digits.split_at(digits.len() - s);
        write!(f, "{}{i}.{fr}", if self.mantissa < 0 { "-" } else { "" })
    }
}

/// A resource-side numeric value: a point or a closed range (`Range.low`..`Range.high`, either bound
/// may be open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumValue {
    /// Lower bound (`None` = unbounded).
    pub low: Option<Decimal>,
    /// Upper bound (`None` = unbounded).
    pub high: Option<Decimal>,
    /// Quantity system, if the value came from a Quantity.
    pub system: Option<String>,
    /// Quantity code (or Money currency).
    pub code: Option<String>,
    /// Quantity unit (human text; matched by `value||unit` like a code, per FHIR).
    pub unit: Option<String>,
}

impl std::fmt::Display for NumValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.low, self.high) {
            (Some(l), Some(h)) if l == h => write!(f, "{l}")?,
            (l, h) => write!(
                f,
                "{}..{}",
                l.map(|d| d.to_string()).unwrap_or_default(),
                h.map(|d| d.to_string()).unwrap_or_default()
            )?,
        }
        if let Some(u) = self.code.as_deref().or(self.unit.as_deref()) {
            write!(f, " {u}")?;
        }
        if let Some(s) = &self.system {
            write!(f, " ({s})")?;
        }
        Ok(())
    }
}

/// A parsed number or quantity search value: `[prefix]number[|system|code]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumQuery {
    /// Comparison prefix.
    pub prefix: Prefix,
    /// The number.
    pub value: Decimal,
    /// Required system (quantity only; `None` = any).
    pub system: Option<String>,
    /// Required code (quantity only; `None` = any). Without a system it may also match the unit.
    pub code: Option<String>,
}

impl NumQuery {
    /// Parses a number search value (after the prefix was removed).
    pub fn parse_number(prefix: Prefix, s: &str) -> Option<NumQuery> {
        Some(NumQuery {
            prefix,
            value: Decimal::parse(s)?,
            system: None,
            code: None,
        })
    }

    /// Parses a quantity search value `number`, `number|system|code`, `number||code` (after the prefix).
    pub fn parse_quantity(prefix: Prefix, s: &str) -> Option<NumQuery> {
        let mut parts = s.splitn(3, '|');
        let value = Decimal::parse(parts.next()?)?;
        let system = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
        let code = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
        // `5.4|http://unitsofmeasure.org` (a system with no code slot) is not a FHIR form.
        if system.is_some() && s.matches('|').count() != 2 {
            return None;
        }
        Some(NumQuery {
            prefix,
            value,
            system,
            code,
        })
    }

    /// Does the resource value satisfy this search value (before `ne` negation, which the caller applies
    /// across all resource values)? For `ne` this answers the `eq` question.
    pub fn matches(&self, v: &NumValue) -> bool {
        if let Some(system) = &self.system
            && v.system.as_deref() != Some(system.as_str())
        {
            return false;
        }
        if let Some(code) = &self.code {
            let code_ok = v.code.as_deref() == Some(code.as_str())
                || (self.system.is_none() && v.unit.as_deref() == Some(code.as_str()));
            if !code_ok {
                return false;
            }
        }
        let x = self.value;
        match self.prefix {
            Prefix::Eq | Prefix::Ne => {
                // The resource value (or range) must lie within the search value's precision range.
                let half = x.half_unit();
                let (lo, hi) = (x.add(half.neg()), x.add(half));
                matches!((v.low, v.high), (Some(l), Some(h)) if l >= lo && h < hi)
            }
            Prefix::Lt | Prefix::Eb => v.low.is_none_or(|l| l < x),
            Prefix::Le => v.low.is_none_or(|l| l <= x),
            Prefix::Gt | Prefix::Sa => v.high.is_none_or(|h| h > x),
            Prefix::Ge => v.high.is_none_or(|h| h >= x),
            Prefix::Ap => {
                let w = x.tenth_abs();
                let (lo, hi) = (x.add(w.neg()), x.add(w));
                v.low.is_none_or(|l| l <= hi) && v.high.is_none_or(|h| h >= lo)
            }
            // `sw` is rejected at parse time for numbers; never matches if it gets here.
            Prefix::Sw => false,
        }
    }
}

/// Converts a resource value of a number/quantity parameter: JSON numbers (integer, decimal, ...),
/// Quantity and its profiles (Age, Duration, Count, Distance, SimpleQuantity), Money, and Range.
/// SampledData and anything else yield nothing.
pub fn num_values(fhir_type: Option<&str>, json: &Value, out: &mut Vec<NumValue>) {
    let point = |d: Decimal| NumValue {
        low: Some(d),
        high: Some(d),
        system: None,
        code: None,
        unit: None,
    };
    match json {
        Value::Number(_) => {
            if let Some(d) = Decimal::from_json(json) {
                out.push(point(d));
            }
        }
        // Some engines hand decimals over as strings; accept their text form.
        Value::String(s)
            if matches!(
                fhir_type,
                Some("decimal" | "integer" | "System.Decimal" | "System.Integer")
            ) =>
        {
            if let Some(d) = Decimal::parse(s) {
                out.push(point(d));
            }
        }
        Value::Object(obj) => {
            let is_range = fhir_type == Some("Range")
                || (fhir_type.is_none() && (obj.contains_key("low") || obj.contains_key("high")));
            if is_range {
                let bound = |k: &str| {
                    obj.get(k)
                        .and_then(|q| q.get("value"))
                        .and_then(Decimal::from_json)
                };
                let (low, high) = (bound("low"), bound("high"));
                if low.is_none() && high.is_none() {
                    return;
                }
                let q = obj.get("low").or_else(|| obj.get("high"));
                let s = |k: &str| {
                    q.and_then(|q| q.get(k))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                out.push(NumValue {
                    low,
                    high,
                    system: s("system"),
                    code: s("code"),
                    unit: s("unit"),
                });
                return;
            }
            let Some(d) = obj.get("value").and_then(Decimal::from_json) else {
                return;
            };
            let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
            if let Some(currency) = s("currency") {
                // Money: its currency acts as the code of the ISO 4217 system.
                out.push(NumValue {
                    system: Some("urn:iso:std:iso:4217".into()),
                    code: Some(currency),
                    ..point(d)
                });
                return;
            }
            // Quantity comparators (`<`, `>=`, ...) widen the value into an open range.
            let (low, high) = match obj.get("comparator").and_then(Value::as_str) {
                Some("<" | "<=") => (None, Some(d)),
                Some(">" | ">=") => (Some(d), None),
                _ => (Some(d), Some(d)),
            };
            out.push(NumValue {
                low,
                high,
                system: s("system"),
                code: s("code"),
                unit: s("unit"),
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    #[test]
    fn decimals() {
        assert_eq!(d("1.50"), d("1.5"));
        assert!(d("-2") < d("-1.999"));
        assert_eq!(d("1e2"), d("100"));
        assert_eq!(d("1.5E-3"), d("0.0015"));
        assert_eq!(d("+7").to_string(), "7");
        assert_eq!(d("-0.05").to_string(), "-0.05");
        assert_eq!(d("1e2").to_string(), "100");
        for bad in [
            "",
            "-",
            ".",
            "1.2.3",
            "abc",
            "1e",
            "1e99",
            "12345678901234567890",
            "1,5",
            " ",
            "0x10",
        ] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
    }

    fn q(prefix: Prefix, s: &str) -> NumQuery {
        NumQuery::parse_quantity(prefix, s).unwrap()
    }

    fn pv(s: &str) -> NumValue {
        let mut out = Vec::new();
        num_values(None, &serde_json::from_str(s).unwrap(), &mut out);
        out.pop().unwrap()
    }

    #[test]
    fn number_prefixes() {
        let v = pv("100");
        let cases = [
            (Prefix::Eq, "100", true),
            (Prefix::Eq, "100.0", true),
            (Prefix::Eq, "99.6", false),
            (Prefix::Eq, "1e2", true),
            (Prefix::Lt, "100", false),
            (Prefix::Lt, "100.1", true),
            (Prefix::Le, "100", true),
            (Prefix::Le, "99", false),
            (Prefix::Gt, "100", false),
            (Prefix::Gt, "99.9", true),
            (Prefix::Ge, "100", true),
            (Prefix::Ge, "101", false),
            (Prefix::Sa, "99", true),
            (Prefix::Sa, "100", false),
            (Prefix::Eb, "101", true),
            (Prefix::Eb, "100", false),
            (Prefix::Ap, "110", true),
            (Prefix::Ap, "91", true),
            (Prefix::Ap, "112", false),
            (Prefix::Ap, "90", false),
        ];
        for (p, s, want) in cases {
            assert_eq!(q(p, s).matches(&v), want, "{p:?} {s}");
        }
        // Implicit precision of the search value.
        assert!(q(Prefix::Eq, "100").matches(&pv("100.4")));
        assert!(q(Prefix::Eq, "100").matches(&pv("99.5")));
        assert!(!q(Prefix::Eq, "100").matches(&pv("100.5")));
        assert!(!q(Prefix::Eq, "100.00").matches(&pv("100.005")));
        assert!(q(Prefix::Eq, "0.35").matches(&pv("0.35")));
        assert!(q(Prefix::Ap, "-10").matches(&pv("-10.5")));
    }

    #[test]
    fn quantities() {
        let v = pv(
            r#"{"value": 5.4, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}"#,
        );
        assert!(q(Prefix::Eq, "5.4|http://unitsofmeasure.org|mg").matches(&v));
        assert!(q(Prefix::Eq, "5.4||mg").matches(&v));
        assert!(q(Prefix::Eq, "5.4").matches(&v));
        assert!(!q(Prefix::Eq, "5.4|http://unitsofmeasure.org|g").matches(&v));
        assert!(!q(Prefix::Eq, "5.4|http://snomed.info/sct|mg").matches(&v));
        assert!(!q(Prefix::Eq, "5.4||MG").matches(&v));
        assert!(q(Prefix::Gt, "5|http://unitsofmeasure.org|mg").matches(&v));
        let by_unit = pv(r#"{"value": 5.4, "unit": "milligram"}"#);
        assert!(q(Prefix::Eq, "5.4||milligram").matches(&by_unit));
        assert!(!q(Prefix::Eq, "5.4|x|milligram").matches(&by_unit));
        let money = pv(r#"{"value": 12.5, "currency": "EUR"}"#);
        assert!(q(Prefix::Ge, "12.5|urn:iso:std:iso:4217|EUR").matches(&money));
        assert!(q(Prefix::Eq, "12.5||EUR").matches(&money));
        let range =
            pv(r#"{"low": {"value": 10, "unit": "a"}, "high": {"value": 20, "unit": "a"}}"#);
        assert!(q(Prefix::Gt, "15").matches(&range));
        assert!(!q(Prefix::Gt, "20").matches(&range));
        assert!(q(Prefix::Lt, "11").matches(&range));
        assert!(!q(Prefix::Eq, "15").matches(&range));
        assert!(q(Prefix::Ap, "21").matches(&range));
        let lt = pv(r#"{"value": 5, "comparator": "<"}"#);
        assert!(q(Prefix::Lt, "1").matches(&lt));
        assert!(!q(Prefix::Gt, "6").matches(&lt));
        assert!(NumQuery::parse_quantity(Prefix::Eq, "abc|x|y").is_none());
        assert!(NumQuery::parse_quantity(Prefix::Eq, "5|http://x").is_none());
    }
}
