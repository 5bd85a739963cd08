//! Parsing a criteria string into filters (Medplum's `parseSearchRequest`, §2.1).

use super::date::{self, Period};
use super::quantity::NumQuery;
use super::search_params::{self, ParamType, SearchParam};
use super::{
    Criteria, CriteriaError, Filter, MAX_CRITERIA_LEN, MAX_PARAMETERS, MAX_VALUES, Prefix,
    Unsupported,
};

/// Longest filter text kept for display (explanations stay readable with hostile input).
const MAX_DISPLAY: usize = 200;

/// Parameters that control the result set, not which resources match: ignored, like Medplum.
const RESULT_CONTROL: &[&str] = &[
    "_sort",
    "_count",
    "_offset",
    "_cursor",
    "_total",
    "_summary",
    "_include",
    "_revinclude",
    "_fields",
    "_elements",
    "_type",
    "_format",
    "_pretty",
];

/// What a filter checks, with its values pre-processed so matching does no parsing.
#[derive(Debug, Clone)]
pub(super) enum Test {
    /// Never matches; the reason is reported.
    Unsupported(String),
    /// `:missing` / `:present`: matches when "has at least one value" equals `want_exists`.
    Presence { want_exists: bool },
    /// Reference equality (see `matcher`).
    Reference {
        negated: bool,
        empty: bool,
        values: Vec<String>,
        suffix_ok: bool,
    },
    /// String: `exact` = case-sensitive equality, else case-insensitive substring (values lower-cased).
    String {
        negated: bool,
        exact: bool,
        values: Vec<String>,
    },
    /// URI: `exact` = case-sensitive equality, else case-insensitive substring (values lower-cased).
    Uri {
        negated: bool,
        exact: bool,
        values: Vec<String>,
    },
    /// Token queries.
    Token {
        negated: bool,
        values: Vec<TokenQuery>,
    },
    /// Date values with their prefixes.
    Date { values: Vec<(Prefix, Period)> },
    /// Number or quantity values with their prefixes.
    Number { values: Vec<NumQuery> },
}

/// One token search value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TokenQuery {
    /// `system|code`
    SystemCode(String, String),
    /// `system|`
    System(String),
    /// `|code`: a token without system.
    NoSystem(String),
    /// `code`: any system.
    Code(String),
    /// `|`: never matches.
    Never,
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte. Malformed escapes are
/// kept literally and invalid UTF-8 is replaced, so decoding never fails (and is linear).
pub(super) fn form_decode(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(b[i + 1]) * 16 + hex(b[i + 2]));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits a value list on commas; `\,` is a literal comma (Medplum's `splitSearchOnComma`).
pub(super) fn split_on_comma(value: &str, param: &str) -> Result<Vec<String>, CriteriaError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&',') => {
                cur.push(',');
                chars.next();
            }
            ',' => {
                if out.len() + 1 >= MAX_VALUES {
                    return Err(CriteriaError::TooManyValues {
                        param: param.to_string(),
                        max: MAX_VALUES,
                    });
                }
                out.push(std::mem::take(&mut cur));
            }
            c => cur.push(c),
        }
    }
    out.push(cur);
    Ok(out)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Splits off a two-letter prefix of a date/number/quantity value.
fn split_prefix(v: &str) -> (Prefix, &str) {
    let p = match v.get(..2) {
        Some("eq") => Prefix::Eq,
        Some("ne") => Prefix::Ne,
        Some("lt") => Prefix::Lt,
        Some("le") => Prefix::Le,
        Some("gt") => Prefix::Gt,
        Some("ge") => Prefix::Ge,
        Some("sa") => Prefix::Sa,
        Some("eb") => Prefix::Eb,
        Some("ap") => Prefix::Ap,
        Some("sw") => Prefix::Sw,
        _ => return (Prefix::Eq, v),
    };
    (p, &v[2..])
}

pub(super) fn parse(criteria: &str) -> Result<Criteria, CriteriaError> {
    if criteria.len() > MAX_CRITERIA_LEN {
        return Err(CriteriaError::TooLong {
            len: criteria.len(),
            max: MAX_CRITERIA_LEN,
        });
    }
    let trimmed = criteria.trim();
    if trimmed.is_empty() {
        return Err(CriteriaError::Empty);
    }
    let (path, query) = trimmed.split_once('?').unwrap_or((trimmed, ""));
    // `https://example.org/fhir/Observation` or `Observation/` → the last non-empty segment.
    let resource_type = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("");
    if resource_type.is_empty() {
        return Err(CriteriaError::NoResourceType(truncate(
            trimmed,
            MAX_DISPLAY,
        )));
    }
    // Medplum compares whatever is there; a string that cannot be a FHIR type name (`status=final`
    // without `Type?`) can never match anything, so it is rejected as not being a criteria at all.
    let valid_type = resource_type.starts_with(|c: char| c.is_ascii_alphabetic())
        && resource_type.chars().all(|c| c.is_ascii_alphanumeric());
    if !valid_type {
        return Err(CriteriaError::InvalidResourceType(truncate(
            resource_type,
            MAX_DISPLAY,
        )));
    }

    if !is_resource_type(resource_type) {
        return Err(CriteriaError::UnknownResourceType(truncate(
            resource_type,
            MAX_DISPLAY,
        )));
    }

    let mut criteria = Criteria {
        source: criteria.to_string(),
        resource_type: resource_type.to_string(),
        filters: Vec::new(),
        unsupported: Vec::new(),
        approximations: Vec::new(),
    };
    for (n, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
        if n >= MAX_PARAMETERS {
            return Err(CriteriaError::TooManyParameters {
                max: MAX_PARAMETERS,
            });
        }
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = form_decode(raw_key);
        let value = form_decode(raw_value);
        // `_` is a cache buster some clients add; result-control parameters select nothing.
        if key.is_empty() || key == "_" || RESULT_CONTROL.contains(&key.as_str()) {
            continue;
        }
        let (code, modifier) = match key.split_once(':') {
            Some((c, m)) => (c.to_string(), Some(m.to_string())),
            None => (key.clone(), None),
        };
        let display = truncate(&format!("{key}={value}"), MAX_DISPLAY);
        let param = search_params::lookup(resource_type, &code);
        let mut approximation = None;
        let test = build_test(
            &criteria.resource_type,
            &key,
            &code,
            modifier.as_deref(),
            &value,
            param,
            &mut approximation,
        )?;
        let mut test = test;
        let mut expression = None;
        if let (false, Some(e)) = (
            matches!(test, Test::Unsupported(_)),
            param.and_then(|p| p.expression.as_deref()),
        ) {
            let narrowed = search_params::narrow_expression(e, resource_type);
            match super::eval::compile(&narrowed) {
                Ok(compiled) => expression = Some(compiled),
                // An engine gap must not make the criteria silently wrong: report it like any
                // other unsupported construct.
                Err(message) => {
                    test = Test::Unsupported(format!(
                        "the FHIRPath engine cannot evaluate `{narrowed}`: {message}"
                    ))
                }
            }
        }
        if let Test::Unsupported(reason) = &test {
            criteria.unsupported.push(Unsupported {
                parameter: display.clone(),
                reason: reason.clone(),
            });
        }
        if let Some(reason) = approximation {
            criteria.approximations.push(Unsupported {
                parameter: display.clone(),
                reason,
            });
        }
        criteria.filters.push(Filter {
            display,
            code,
            modifier,
            param,
            expression,
            test,
        });
    }
    Ok(criteria)
}

/// Medplum's own resource types (not in FHIR R4), which Medplum subscriptions may be about.
const MEDPLUM_RESOURCE_TYPES: &[&str] = &[
    "AccessPolicy",
    "Agent",
    "AsyncJob",
    "Bot",
    "BulkDataExport",
    "ClientApplication",
    "DomainConfiguration",
    "IdentityProvider",
    "JsonWebKey",
    "Login",
    "PasswordChangeRequest",
    "Project",
    "ProjectMembership",
    "SmartAppLaunch",
    "User",
    "UserConfiguration",
    "UserSecurityRequest",
];

/// Whether `name` is a concrete resource type: of FHIR R4 (not the abstract `Resource` and
/// `DomainResource`, which no resource has as its `resourceType`) or of Medplum.
fn is_resource_type(name: &str) -> bool {
    use crate::fhir::elements::{Kind, model};
    MEDPLUM_RESOURCE_TYPES.contains(&name)
        || !matches!(name, "Resource" | "DomainResource")
            && model()
                .get(name)
                .is_some_and(|def| def.kind == Kind::Resource)
}

/// The modifiers FHIR R4 defines for a parameter type (besides `missing`, handled before, and
/// `present`, Medplum's), with the ones we evaluate exactly or approximate. Anything else is
/// unknown: a filter with an unknown modifier never matches (FHIR R4 search: servers "SHALL reject"
/// a search parameter with an unsupported modifier; Medplum silently uses plain equality).
fn unknown_modifier(kind: ParamType, modifier: &str) -> bool {
    let known: &[&str] = match kind {
        ParamType::String => &["not", "exact", "contains", "text"],
        ParamType::Uri => &["not", "exact", "contains", "above", "below"],
        ParamType::Token => &["not", "text", "in", "not-in", "above", "below", "of-type"],
        // `:[type]` (a resource type name, `subject:Patient`) as well.
        ParamType::Reference => {
            return !matches!(modifier, "not" | "identifier" | "above" | "below" | "text")
                && !is_resource_type(modifier);
        }
        _ => &[],
    };
    !known.contains(&modifier)
}

fn build_test(
    resource_type: &str,
    key: &str,
    code: &str,
    modifier: Option<&str>,
    value: &str,
    param: Option<&'static SearchParam>,
    approximation: &mut Option<String>,
) -> Result<Test, CriteriaError> {
    let unsupported = |reason: String| Ok(Test::Unsupported(reason));
    // Medplum keys these on the raw key (`subject:Patient.name` is chained too).
    if key.starts_with("_has") {
        return unsupported("reverse chaining (`_has`) is not supported".into());
    }
    if key.contains('.') {
        return unsupported("chained parameters are not supported".into());
    }
    match code {
        "_filter" => return unsupported("`_filter` expressions are not supported".into()),
        "_text" | "_content" => return unsupported("full-text search is not supported".into()),
        "_query" => return unsupported("named queries (`_query`) are not supported".into()),
        "_list" => return unsupported("`_list` is not supported".into()),
        _ => {}
    }
    let Some(param) = param else {
        return unsupported(format!(
            "`{code}` is not a search parameter of `{resource_type}`"
        ));
    };
    if param.expression.is_none() {
        return unsupported(format!("`{code}` has no FHIRPath expression in FHIR R4"));
    }
    if let Some(m @ ("missing" | "present")) = modifier {
        // Medplum's odd rule: only exactly `false` (missing) / `true` (present) ask for the element.
        let want_exists =
            (m == "missing" && value == "false") || (m == "present" && value == "true");
        return Ok(Test::Presence { want_exists });
    }
    let kind = param.kind;
    if let Some(m) = modifier.filter(|m| unknown_modifier(kind, m)) {
        if matches!(
            kind,
            ParamType::Reference | ParamType::String | ParamType::Uri | ParamType::Token
        ) {
            return unsupported(format!(
                "unknown modifier `:{m}` on {} parameter `{code}`",
                kind.as_str()
            ));
        }
    }
    match kind {
        ParamType::Composite => unsupported("composite parameters are not supported".into()),
        ParamType::Special => unsupported(format!(
            "special parameters (like `{code}`) are not supported"
        )),
        ParamType::Date | ParamType::Number | ParamType::Quantity => {
            if let Some(m) = modifier {
                // Medplum ignores such modifiers; FHIR defines none for these types (except
                // missing), so a modifier here is a mistake we report rather than guess at.
                return unsupported(format!(
                    "modifier `:{m}` is not supported on {} parameters",
                    kind.as_str()
                ));
            }
            let mut dates = Vec::new();
            let mut nums = Vec::new();
            for v in split_on_comma(value, key)? {
                // Each value has its own prefix (FHIR); Medplum reads one for the whole list and
                // then fails on the next prefixed value as an invalid date.
                let (prefix, rest) = split_prefix(&v);
                if prefix == Prefix::Sw {
                    return unsupported(format!(
                        "prefix `sw` is not defined for {} parameters",
                        kind.as_str()
                    ));
                }
                // Invalid dates are a hard error as in Medplum (400); invalid numbers and
                // quantities, which Medplum never evaluates, are treated the same way for
                // consistency rather than silently never matching.
                let invalid = || CriteriaError::InvalidValue {
                    param: key.to_string(),
                    kind: kind.as_str(),
                    value: truncate(&v, MAX_DISPLAY),
                };
                match kind {
                    ParamType::Date => {
                        if prefix == Prefix::Ap {
                            *approximation = Some(
                                "`ap` on dates is matched like `eq` (no approximation window)"
                                    .into(),
                            );
                        }
                        // A literal `+` in a timezone offset (`T10:00:00+02:00`) arrives as a
                        // space after form decoding. Medplum rejects it (400); people write it by
                        // hand, so we read it as the offset it obviously is.
                        let period = date::parse_period(rest)
                            .or_else(|| date::parse_period(&rest.replace(' ', "+")))
                            .ok_or_else(invalid)?;
                        dates.push((prefix, period));
                    }
                    ParamType::Number => {
                        nums.push(NumQuery::parse_number(prefix, rest).ok_or_else(invalid)?)
                    }
                    _ => nums.push(NumQuery::parse_quantity(prefix, rest).ok_or_else(invalid)?),
                }
            }
            if kind == ParamType::Quantity {
                *approximation = Some("quantities are compared without unit conversion".into());
            }
            Ok(if kind == ParamType::Date {
                Test::Date { values: dates }
            } else {
                Test::Number { values: nums }
            })
        }
        ParamType::Reference => {
            let negated = modifier == Some("not");
            if let Some(m) = modifier.filter(|m| *m != "not") {
                *approximation = Some(format!(
                    "modifier `:{m}` is ignored on reference parameters (plain equality)"
                ));
            }
            Ok(Test::Reference {
                negated,
                empty: value.is_empty(),
                values: split_on_comma(value, key)?,
                // Medplum: a bare id is unambiguous only with a single target type; `_compartment`
                // keeps it for backwards compatibility.
                suffix_ok: param.targets.len() == 1 || code == "_compartment",
            })
        }
        ParamType::String => {
            let negated = modifier == Some("not");
            let exact = modifier == Some("exact");
            if let Some(m) = modifier.filter(|m| !matches!(*m, "not" | "exact" | "contains")) {
                *approximation = Some(format!(
                    "modifier `:{m}` is ignored on string parameters (substring match)"
                ));
            }
            let mut values = split_on_comma(value, key)?;
            if !exact {
                values.iter_mut().for_each(|v| *v = v.to_lowercase());
            }
            Ok(Test::String {
                negated,
                exact,
                values,
            })
        }
        ParamType::Uri => {
            let negated = modifier == Some("not");
            let exact = !matches!(modifier, Some("above" | "below" | "contains"));
            match modifier {
                Some(m @ ("above" | "below")) => {
                    *approximation = Some(format!(
                        "`:{m}` on uri parameters is a case-insensitive substring match"
                    ))
                }
                Some(m) if !matches!(m, "not" | "exact" | "contains") => {
                    *approximation = Some(format!(
                        "modifier `:{m}` is ignored on uri parameters (exact match)"
                    ))
                }
                _ => {}
            }
            let mut values = split_on_comma(value, key)?;
            if !exact {
                values.iter_mut().for_each(|v| *v = v.to_lowercase());
            }
            Ok(Test::Uri {
                negated,
                exact,
                values,
            })
        }
        ParamType::Token => {
            let negated = modifier == Some("not");
            if let Some(m) = modifier.filter(|m| *m != "not") {
                *approximation = Some(match m {
                    "text" => {
                        "`:text` is matched as equality with the text/display (no text search)"
                            .into()
                    }
                    "in" | "not-in" | "above" | "below" => {
                        format!("`:{m}` needs terminology services; matched as plain code equality")
                    }
                    _ => format!("modifier `:{m}` is ignored on token parameters (plain equality)"),
                });
            }
            let values = split_on_comma(value, key)?
                .into_iter()
                .map(|v| token_query(&v))
                .collect();
            Ok(Test::Token { negated, values })
        }
    }
}

/// Splits at the first `|` (so `a|b|c` is system `a`, code `b|c`; Medplum would drop `|c`).
fn token_query(v: &str) -> TokenQuery {
    match v.split_once('|') {
        None => TokenQuery::Code(v.to_string()),
        Some(("", "")) => TokenQuery::Never,
        Some(("", code)) => TokenQuery::NoSystem(code.to_string()),
        Some((system, "")) => TokenQuery::System(system.to_string()),
        Some((system, code)) => TokenQuery::SystemCode(system.to_string(), code.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(form_decode("a+b%20c%2Cd"), "a b c,d");
        assert_eq!(form_decode("%"), "%");
        assert_eq!(form_decode("%4"), "%4");
        assert_eq!(form_decode("%zz%41"), "%zzA");
        assert_eq!(form_decode("%C3%A9"), "é");
        assert_eq!(form_decode("%FF"), "\u{FFFD}");
        assert_eq!(form_decode("100%25"), "100%");
    }

    #[test]
    fn comma_lists() {
        assert_eq!(split_on_comma("a,b\\,c,", "p").unwrap(), ["a", "b,c", ""]);
        assert_eq!(split_on_comma("a\\b", "p").unwrap(), ["a\\b"]);
        assert!(matches!(
            split_on_comma(&",".repeat(5000), "p"),
            Err(CriteriaError::TooManyValues { .. })
        ));
    }

    #[test]
    fn token_queries() {
        assert_eq!(
            token_query("s|c"),
            TokenQuery::SystemCode("s".into(), "c".into())
        );
        assert_eq!(token_query("s|"), TokenQuery::System("s".into()));
        assert_eq!(token_query("|c"), TokenQuery::NoSystem("c".into()));
        assert_eq!(token_query("|"), TokenQuery::Never);
        assert_eq!(token_query("c"), TokenQuery::Code("c".into()));
    }

    #[test]
    fn prefixes() {
        assert_eq!(split_prefix("ge2020"), (Prefix::Ge, "2020"));
        assert_eq!(split_prefix("2020"), (Prefix::Eq, "2020"));
        assert_eq!(split_prefix("x"), (Prefix::Eq, "x"));
        assert_eq!(split_prefix("é1"), (Prefix::Eq, "é1"));
    }
}
