//! Resource-side values of token, reference and string/uri parameters, derived from typed FHIRPath
//! results `(fhir_type, json)`. When the engine gives no FHIR type (engine-made values, or an element
//! it could not type), the JSON shape decides, so matching does not depend on typing being perfect.

use std::fmt;

use serde_json::{Map, Value};

/// Bound on strings collected from one complex value (hostile resources with huge nested objects).
const MAX_STRINGS_PER_VALUE: usize = 256;

/// A search token: optional system and a code (or text/display/value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// `Coding.system`, `Identifier.system`, `ContactPoint.system`; `None` for text and primitives.
    pub system: Option<String>,
    /// `Coding.code`, `Identifier.value`, text, display, or a primitive's string form.
    pub code: String,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.system {
            Some(s) => write!(f, "{s}|{}", self.code),
            None => write!(f, "{}", self.code),
        }
    }
}

fn str_of<'v>(obj: &'v Map<String, Value>, key: &str) -> Option<&'v str> {
    obj.get(key).and_then(Value::as_str)
}

/// The string form of a JSON primitive (booleans become `true`/`false`, numbers their JSON text).
pub fn primitive_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn coding_tokens(obj: &Map<String, Value>, out: &mut Vec<Token>) {
    let system = str_of(obj, "system").map(str::to_string);
    if let Some(code) = str_of(obj, "code") {
        out.push(Token {
            system,
            code: code.to_string(),
        });
    }
    if let Some(display) = str_of(obj, "display") {
        out.push(Token {
            system: None,
            code: display.to_string(),
        });
    }
}

/// Tokens of one value of a token parameter (see the module docs of `criteria` for the rules).
pub fn tokens(fhir_type: Option<&str>, json: &Value, out: &mut Vec<Token>) {
    let obj = match json {
        Value::Object(obj) => obj,
        other => {
            if let Some(s) = primitive_string(other) {
                out.push(Token {
                    system: None,
                    code: s,
                });
            }
            return;
        }
    };
    let kind = match fhir_type {
        Some(t @ ("CodeableConcept" | "Coding" | "Identifier" | "ContactPoint")) => t,
        _ if obj.contains_key("coding") || (obj.contains_key("text") && obj.len() == 1) => {
            "CodeableConcept"
        }
        _ if obj.contains_key("code") => "Coding",
        _ if obj.contains_key("value") && obj.contains_key("use") && obj.contains_key("system") => {
            // Identifier and ContactPoint look alike; ContactPoint.system is a fixed code list.
            if matches!(
                str_of(obj, "system"),
                Some("phone" | "fax" | "email" | "pager" | "url" | "sms" | "other")
            ) {
                "ContactPoint"
            } else {
                "Identifier"
            }
        }
        _ if obj.contains_key("value") => "Identifier",
        _ => "",
    };
    match kind {
        "CodeableConcept" => {
            if let Some(text) = str_of(obj, "text") {
                out.push(Token {
                    system: None,
                    code: text.to_string(),
                });
            }
            for coding in obj
                .get("coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(c) = coding.as_object() {
                    coding_tokens(c, out);
                }
            }
        }
        "Coding" => coding_tokens(obj, out),
        "Identifier" => {
            if let Some(value) = str_of(obj, "value") {
                out.push(Token {
                    system: str_of(obj, "system").map(str::to_string),
                    code: value.to_string(),
                });
            }
            if let Some(text) = obj
                .get("type")
                .and_then(|t| t.get("text"))
                .and_then(Value::as_str)
            {
                out.push(Token {
                    system: None,
                    code: text.to_string(),
                });
            }
        }
        "ContactPoint" => {
            if let Some(value) = str_of(obj, "value") {
                out.push(Token {
                    system: str_of(obj, "system").map(str::to_string),
                    code: value.to_lowercase(),
                });
            }
        }
        _ => {}
    }
}

/// Normalised reference strings of one value of a reference parameter: `Reference.reference`,
/// canonical/uri strings as they are, inline resources as `Type/id`, identifier-only references as
/// `identifier:<system>|<value>`.
pub fn references(json: &Value, out: &mut Vec<String>) {
    match json {
        Value::String(s) => out.push(s.clone()),
        Value::Object(obj) => {
            if let Some(r) = str_of(obj, "reference") {
                out.push(r.to_string());
            } else if let (Some(rt), Some(id)) = (str_of(obj, "resourceType"), str_of(obj, "id")) {
                out.push(format!("{rt}/{id}"));
            } else if let Some(ident) = obj.get("identifier").and_then(Value::as_object) {
                let system = str_of(ident, "system").unwrap_or_default();
                if let Some(value) = str_of(ident, "value") {
                    out.push(format!("identifier:{system}|{value}"));
                }
            }
        }
        _ => {}
    }
}

/// Strings of one value of a string or uri parameter. Primitives give their string form. `HumanName`
/// gives its formatted full name (`prefix given family suffix`) and each part; `Address` its formatted
/// text and each part; any other complex value its string leaves (bounded), so something is searchable.
pub fn strings(fhir_type: Option<&str>, json: &Value, out: &mut Vec<String>) {
    let obj = match json {
        Value::Object(obj) => obj,
        other => {
            if let Some(s) = primitive_string(other) {
                out.push(s);
            }
            return;
        }
    };
    let list = |k: &str| -> Vec<&str> {
        match obj.get(k) {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(s)) => vec![s.as_str()],
            _ => Vec::new(),
        }
    };
    let is_name = fhir_type == Some("HumanName")
        || (fhir_type.is_none() && (obj.contains_key("family") || obj.contains_key("given")));
    let is_address = fhir_type == Some("Address")
        || (fhir_type.is_none()
            && (obj.contains_key("line")
                || obj.contains_key("city")
                || obj.contains_key("postalCode")));
    let keys: &[&str] = if is_name {
        &["prefix", "given", "family", "suffix"]
    } else if is_address {
        &["line", "city", "district", "state", "postalCode", "country"]
    } else {
        collect_leaves(json, out, 0);
        return;
    };
    let parts: Vec<&str> = keys.iter().flat_map(|k| list(k)).collect();
    if let Some(text) = str_of(obj, "text") {
        out.push(text.to_string());
    }
    if parts.len() > 1 {
        out.push(parts.join(" "));
    }
    out.extend(parts.into_iter().map(str::to_string));
}

fn collect_leaves(v: &Value, out: &mut Vec<String>, depth: usize) {
    if depth > 16 || out.len() >= MAX_STRINGS_PER_VALUE {
        return;
    }
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_leaves(x, out, depth + 1)),
        Value::Object(o) => o.values().for_each(|x| collect_leaves(x, out, depth + 1)),
        _ => {}
    }
}

/// Unicode case-insensitive equality without allocating (the same folding as `to_lowercase`).
pub fn eq_ci(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn toks(t: Option<&str>, v: Value) -> Vec<String> {
        let mut out = Vec::new();
        tokens(t, &v, &mut out);
        out.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn token_extraction() {
        let cc = json!({"text": "Blood", "coding": [{"system": "http://loinc.org", "code": "1-2", "display": "Hb"}]});
        assert_eq!(
            toks(Some("CodeableConcept"), cc.clone()),
            ["Blood", "http://loinc.org|1-2", "Hb"]
        );
        assert_eq!(toks(None, cc), ["Blood", "http://loinc.org|1-2", "Hb"]);
        let id = json!({"system": "urn:x", "value": "42", "type": {"text": "MRN"}});
        assert_eq!(toks(Some("Identifier"), id.clone()), ["urn:x|42", "MRN"]);
        assert_eq!(toks(None, id), ["urn:x|42", "MRN"]);
        assert_eq!(
            toks(
                Some("ContactPoint"),
                json!({"system": "email", "value": "A@B.org"})
            ),
            ["email|a@b.org"]
        );
        assert_eq!(
            toks(
                None,
                json!({"system": "email", "value": "A@B.org", "use": "work"})
            ),
            ["email|a@b.org"]
        );
        assert_eq!(toks(Some("Coding"), json!({"code": "x"})), ["x"]);
        assert_eq!(toks(Some("boolean"), json!(true)), ["true"]);
        assert_eq!(toks(Some("code"), json!("final")), ["final"]);
        assert_eq!(toks(Some("integer"), json!(3)), ["3"]);
        assert!(toks(Some("Reference"), json!({"reference": "Patient/1"})).is_empty());
    }

    #[test]
    fn reference_normalisation() {
        let mut out = Vec::new();
        references(&json!({"reference": "Patient/1", "display": "x"}), &mut out);
        references(&json!("http://example.org/Questionnaire/q"), &mut out);
        references(&json!({"resourceType": "Patient", "id": "2"}), &mut out);
        references(
            &json!({"identifier": {"system": "urn:s", "value": "v"}}),
            &mut out,
        );
        references(&json!({"display": "only"}), &mut out);
        assert_eq!(
            out,
            [
                "Patient/1",
                "http://example.org/Questionnaire/q",
                "Patient/2",
                "identifier:urn:s|v"
            ]
        );
    }

    #[test]
    fn string_formatting() {
        let mut out = Vec::new();
        strings(
            Some("HumanName"),
            &json!({"given": ["Homer", "J"], "family": "Simpson"}),
            &mut out,
        );
        assert_eq!(out, ["Homer J Simpson", "Homer", "J", "Simpson"]);
        out.clear();
        strings(
            None,
            &json!({"line": ["742 Evergreen Terrace"], "city": "Springfield", "text": "home"}),
            &mut out,
        );
        assert_eq!(
            out,
            [
                "home",
                "742 Evergreen Terrace Springfield",
                "742 Evergreen Terrace",
                "Springfield"
            ]
        );
        out.clear();
        strings(Some("string"), &json!("Test Bot"), &mut out);
        assert_eq!(out, ["Test Bot"]);
    }

    #[test]
    fn case_insensitive() {
        assert!(eq_ci("ÉTÉ", "été"));
        assert!(!eq_ci("abc", "abcd"));
    }
}
