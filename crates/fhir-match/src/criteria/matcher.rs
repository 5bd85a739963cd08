//! Matching a parsed criteria against a resource (Medplum's `matchesSearchRequest`, §2.2–2.3).
//!
//! Each filter is checked by one function shared by the fast path and `explain`: the explanation is only
//! formatted when asked for.

use serde_json::Value;

use super::date::Period;
use super::parse::{Test, TokenQuery};
use super::quantity::{NumValue, num_values};
use super::values::{Token, eq_ci, references, strings, tokens};
use super::{Criteria, CriteriaError, Failure, Filter, MatchReport, Prefix, date};

/// Most resource values quoted in an explanation.
const MAX_QUOTED: usize = 5;
/// Longest quoted value in an explanation.
const MAX_QUOTED_LEN: usize = 120;

pub(super) fn evaluate(
    criteria: &Criteria,
    resource: &Value,
    explain: bool,
) -> Result<MatchReport, CriteriaError> {
    let mut report = MatchReport {
        matched: true,
        failures: Vec::new(),
    };
    let actual_type = resource.get("resourceType").and_then(Value::as_str);
    if actual_type != Some(criteria.resource_type.as_str()) {
        report.matched = false;
        if !explain {
            return Ok(report);
        }
        report.failures.push(Failure {
            filter: "resource type".into(),
            reason: match actual_type {
                Some(t) => format!("type `{t}` != `{}`", criteria.resource_type),
                None => "the resource has no `resourceType`".into(),
            },
        });
        // The filters' search parameters belong to the criteria's type; evaluating them on another
        // type would only add noise.
        return Ok(report);
    }
    for filter in &criteria.filters {
        let outcome = match check_filter(filter, resource, explain) {
            Ok(outcome) => outcome,
            // Explaining keeps going so the other filters are still reported; the fast path
            // propagates the error (the dispatcher skips this subscription, like Medplum).
            Err(e) if explain => Some(format!("evaluation failed: {e}")),
            Err(e) => return Err(e),
        };
        if let Some(reason) = outcome {
            report.matched = false;
            if !explain {
                return Ok(report);
            }
            report.failures.push(Failure {
                filter: filter.display.clone(),
                reason,
            });
        }
    }
    Ok(report)
}

/// Collected resource values of one filter's parameter, typed for its search parameter type.
struct Values {
    /// Number of FHIRPath results (what `:missing`/`:present` and empty references look at).
    count: usize,
    /// Display forms, only filled when explaining.
    shown: Vec<String>,
}

/// Evaluates the filter's expression and hands each typed result to `f`.
fn for_each_value(
    filter: &Filter,
    resource: &Value,
    explain: bool,
    mut f: impl FnMut(Option<&str>, &Value),
) -> Result<Values, CriteriaError> {
    let mut values = Values {
        count: 0,
        shown: Vec::new(),
    };
    let expression = filter
        .expression
        .as_deref()
        .ok_or_else(|| internal(filter, "no expression"))?;
    super::eval::evaluate(&filter.code, expression, resource, |fhir_type, json| {
        values.count += 1;
        if explain && values.shown.len() < MAX_QUOTED {
            values.shown.push(quote(json));
        }
        f(fhir_type, json);
    })?;
    Ok(values)
}

fn internal(filter: &Filter, what: &str) -> CriteriaError {
    // Unreachable by construction (such filters are parsed as unsupported); an error, not a panic.
    CriteriaError::Evaluation {
        param: filter.code.clone(),
        expression: String::new(),
        message: what.into(),
    }
}

fn quote(json: &Value) -> String {
    let s = match json {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut end = s.len().min(MAX_QUOTED_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("`{}…`", &s[..end])
    } else {
        format!("`{s}`")
    }
}

/// Explanation of a failed positive filter: what the resource has instead.
fn has_instead(code: &str, values: &Values) -> String {
    if values.count == 0 {
        format!("resource has no {code}")
    } else {
        let more = if values.count > values.shown.len() {
            ", …"
        } else {
            ""
        };
        format!("resource has {code} {}{more}", values.shown.join(", "))
    }
}

/// Checks one filter. `Ok(None)` = passed; `Ok(Some(reason))` = failed (the reason is empty unless
/// `explain`).
fn check_filter(
    filter: &Filter,
    resource: &Value,
    explain: bool,
) -> Result<Option<String>, CriteriaError> {
    let code = filter.code.as_str();
    let fail =
        |reason: &dyn Fn() -> String| Ok(Some(if explain { reason() } else { String::new() }));
    match &filter.test {
        Test::Unsupported(reason) => fail(&|| format!("not supported: {reason}")),
        Test::Presence { want_exists } => {
            let values = for_each_value(filter, resource, explain, |_, _| {})?;
            let exists = values.count > 0;
            if exists == *want_exists {
                Ok(None)
            } else if exists {
                fail(&|| format!("{code} is present ({})", values.shown.join(", ")))
            } else {
                fail(&|| format!("{code} is missing"))
            }
        }
        Test::Reference {
            negated,
            empty,
            values: wanted,
            suffix_ok,
        } => {
            let mut refs = Vec::new();
            let values = for_each_value(filter, resource, explain, |_, json| {
                references(json, &mut refs)
            })?;
            if *empty && values.count == 0 {
                // Medplum: `subject=` selects resources without a subject; `subject:not=` selects none.
                return if *negated {
                    fail(&|| format!("resource has no {code}"))
                } else {
                    Ok(None)
                };
            }
            let found = wanted
                .iter()
                .find_map(|w| refs.iter().find(|r| reference_matches(r, w, *suffix_ok)));
            decide(
                *negated,
                found.map(|r| format!("`{r}`")),
                explain,
                || {
                    let shown = Values {
                        count: refs.len(),
                        shown: refs
                            .iter()
                            .take(MAX_QUOTED)
                            .map(|r| format!("`{r}`"))
                            .collect(),
                    };
                    has_instead(code, &shown)
                },
                code,
            )
        }
        // Strings and URIs differ only in how their filters were parsed (what `exact` means for each).
        Test::String {
            negated,
            exact,
            values: wanted,
        }
        | Test::Uri {
            negated,
            exact,
            values: wanted,
        } => {
            let mut strs = Vec::new();
            let values = for_each_value(filter, resource, explain, |t, json| {
                strings(t, json, &mut strs)
            })?;
            let found = strs.iter().find(|s| {
                if *exact {
                    wanted.iter().any(|w| *s == w)
                } else {
                    let lower = s.to_lowercase();
                    wanted.iter().any(|w| lower.contains(w.as_str()))
                }
            });
            decide(
                *negated,
                found.map(|s| format!("`{s}`")),
                explain,
                || has_instead(code, &values),
                code,
            )
        }
        Test::Token {
            negated,
            values: wanted,
        } => {
            let mut toks = Vec::new();
            let values = for_each_value(filter, resource, explain, |t, json| {
                tokens(t, json, &mut toks)
            })?;
            let found = toks
                .iter()
                .find(|t| wanted.iter().any(|q| token_matches(t, q)));
            decide(
                *negated,
                found.map(|t| format!("`{t}`")),
                explain,
                || {
                    if toks.is_empty() {
                        return has_instead(code, &values);
                    }
                    let shown = Values {
                        count: toks.len(),
                        shown: toks
                            .iter()
                            .take(MAX_QUOTED)
                            .map(|t| format!("`{t}`"))
                            .collect(),
                    };
                    has_instead(code, &shown)
                },
                code,
            )
        }
        Test::Date { values: wanted } => {
            let mut periods = Vec::new();
            let values = for_each_value(filter, resource, explain, |t, json| {
                date::value_periods(t, json, &mut periods)
            })?;
            let ok = wanted.iter().any(|(prefix, f)| match prefix {
                // `ne` holds when no resource period overlaps (so also when there is none).
                Prefix::Ne => !periods.iter().any(|r| date_matches(Prefix::Eq, r, f)),
                p => periods.iter().any(|r| date_matches(*p, r, f)),
            });
            if ok {
                Ok(None)
            } else {
                fail(&|| has_instead(code, &values))
            }
        }
        Test::Number { values: wanted } => {
            let mut nums: Vec<NumValue> = Vec::new();
            let values = for_each_value(filter, resource, explain, |t, json| {
                num_values(t, json, &mut nums)
            })?;
            let ok = wanted.iter().any(|q| match q.prefix {
                Prefix::Ne => !nums.iter().any(|v| q.matches(v)),
                _ => nums.iter().any(|v| q.matches(v)),
            });
            if ok {
                Ok(None)
            } else {
                fail(&|| {
                    if nums.is_empty() {
                        return has_instead(code, &values);
                    }
                    let shown = Values {
                        count: nums.len(),
                        shown: nums
                            .iter()
                            .take(MAX_QUOTED)
                            .map(|n| format!("`{n}`"))
                            .collect(),
                    };
                    has_instead(code, &shown)
                })
            }
        }
    }
}

/// Shared decision of the equality-like types: positive filters pass when something matched, negated
/// ones when nothing did.
fn decide(
    negated: bool,
    found: Option<String>,
    explain: bool,
    instead: impl FnOnce() -> String,
    code: &str,
) -> Result<Option<String>, CriteriaError> {
    match (negated, found) {
        (false, Some(_)) | (true, None) => Ok(None),
        (true, Some(f)) if explain => Ok(Some(format!("resource has {code} {f}"))),
        (false, None) if explain => Ok(Some(instead())),
        _ => Ok(Some(String::new())),
    }
}

/// Reference equality; a bare id (no `/`) also matches `…/<id>` when allowed.
fn reference_matches(reference: &str, wanted: &str, suffix_ok: bool) -> bool {
    if reference == wanted {
        return true;
    }
    suffix_ok
        && !wanted.is_empty()
        && !wanted.contains('/')
        && reference.len() > wanted.len()
        && reference.ends_with(wanted)
        && reference.as_bytes()[reference.len() - wanted.len() - 1] == b'/'
}

fn token_matches(token: &Token, query: &TokenQuery) -> bool {
    let system_is = |s: &str| token.system.as_deref().is_some_and(|ts| eq_ci(ts, s));
    match query {
        TokenQuery::SystemCode(s, c) => system_is(s) && eq_ci(&token.code, c),
        TokenQuery::System(s) => system_is(s),
        TokenQuery::NoSystem(c) => token.system.is_none() && eq_ci(&token.code, c),
        TokenQuery::Code(c) => eq_ci(&token.code, c),
        TokenQuery::Never => false,
    }
}

/// Date comparison on half-open periods `[start, end)`. Medplum states these with inclusive ends
/// (`le`: resStart ≤ fltEnd, `ge`: resEnd ≥ fltStart, `sa`: resStart > fltEnd, `eb`: resEnd < fltStart);
/// with exclusive ends the same relations read as below.
pub(super) fn date_matches(prefix: Prefix, r: &Period, f: &Period) -> bool {
    match prefix {
        // Medplum gives `ap` no approximation window (reported as an approximation at parse time).
        Prefix::Eq | Prefix::Ap => r.start < f.end && r.end > f.start,
        Prefix::Ne => !(r.start < f.end && r.end > f.start),
        Prefix::Lt => r.start < f.start,
        Prefix::Le => r.start < f.end,
        Prefix::Gt => r.end > f.end,
        Prefix::Ge => r.end > f.start,
        Prefix::Sa => r.start >= f.end,
        Prefix::Eb => r.end <= f.start,
        Prefix::Sw => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Period {
        date::parse_period(s).unwrap()
    }

    #[test]
    fn date_prefixes_on_a_day() {
        let birth = p("1990-01-01");
        let cases = [
            (Prefix::Eq, "1990-01-01", true),
            (Prefix::Eq, "1990-01-02", false),
            (Prefix::Eq, "1990", true),
            (Prefix::Eq, "1990-01-01T10:00:00Z", true),
            (Prefix::Ne, "1990-01-01", false),
            (Prefix::Ne, "1990-01-02", true),
            (Prefix::Gt, "1980-01-01", true),
            (Prefix::Gt, "2000-01-01", false),
            (Prefix::Gt, "1990-01-01", false),
            (Prefix::Ge, "1980-01-01", true),
            (Prefix::Ge, "2000-01-01", false),
            (Prefix::Ge, "1990-01-01", true),
            (Prefix::Lt, "1980-01-01", false),
            (Prefix::Lt, "2000-01-01", true),
            (Prefix::Lt, "1990-01-01", false),
            (Prefix::Le, "1980-01-01", false),
            (Prefix::Le, "2000-01-01", true),
            (Prefix::Le, "1990-01-01", true),
            (Prefix::Sa, "1989-12-31", true),
            (Prefix::Sa, "1990-01-01", false),
            (Prefix::Eb, "1990-01-02", true),
            (Prefix::Eb, "1990-01-01", false),
            (Prefix::Ap, "1990-01-01", true),
            (Prefix::Sw, "1990-01-01", false),
        ];
        for (prefix, f, want) in cases {
            assert_eq!(date_matches(prefix, &birth, &p(f)), want, "{prefix:?} {f}");
        }
    }

    #[test]
    fn date_prefixes_on_a_period() {
        // Medplum's Task due-date test: period 12:00–13:00 against 12:00.
        let r = Period {
            start: p("2023-01-01T12:00:00.000Z").start,
            end: p("2023-01-01T13:00:00.000Z").end,
        };
        let f = p("2023-01-01T12:00:00.000Z");
        assert!(!date_matches(Prefix::Lt, &r, &f));
        assert!(date_matches(Prefix::Le, &r, &f));
        assert!(date_matches(Prefix::Ge, &r, &f));
        assert!(date_matches(Prefix::Gt, &r, &f));
        assert!(date_matches(Prefix::Eq, &r, &f));
    }

    #[test]
    fn references_and_tokens() {
        assert!(reference_matches("Patient/123", "Patient/123", false));
        assert!(!reference_matches("Patient/123", "123", false));
        assert!(reference_matches("Patient/123", "123", true));
        assert!(!reference_matches("Patient/1123", "123", true));
        assert!(!reference_matches("Patient/123", "", true));
        let t = Token {
            system: Some("http://Example.com".into()),
            code: "ABC".into(),
        };
        assert!(token_matches(
            &t,
            &TokenQuery::SystemCode("http://example.com".into(), "abc".into())
        ));
        assert!(token_matches(
            &t,
            &TokenQuery::System("http://example.com".into())
        ));
        assert!(!token_matches(&t, &TokenQuery::NoSystem("abc".into())));
        assert!(token_matches(&t, &TokenQuery::Code("abc".into())));
        assert!(!token_matches(&t, &TokenQuery::Code("ab".into())));
        assert!(!token_matches(&t, &TokenQuery::Never));
    }
}
