//! Registry of FHIR R4 search parameters, built once from the HL7 SearchParameter bundle.
//!
//! Lookups are by `(resource type, code)`. Parameters declared on the abstract `Resource` and
//! `DomainResource` bases (`_id`, `_lastUpdated`, `_tag`, `_profile`, `_security`, `_source`, ...) apply
//! to every resource type, so a lookup falls back to them. Two Medplum-specific base parameters are added
//! because Medplum subscriptions use them: `_project` (token on `meta.project`) and `_compartment`
//! (reference on `meta.compartment`).

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;

/// The HL7 R4 SearchParameter definitions (reduced bundle, see `data/fhir/README.md`).
static BUNDLE_JSON: &str = include_str!("../../data/fhir/search-parameters-r4.json");

/// The FHIR search parameter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// `number`
    Number,
    /// `date`
    Date,
    /// `string`
    String,
    /// `token`
    Token,
    /// `reference`
    Reference,
    /// `composite`
    Composite,
    /// `quantity`
    Quantity,
    /// `uri`
    Uri,
    /// `special`
    Special,
}

impl ParamType {
    /// The FHIR name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Date => "date",
            ParamType::String => "string",
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Composite => "composite",
            ParamType::Quantity => "quantity",
            ParamType::Uri => "uri",
            ParamType::Special => "special",
        }
    }
}

/// One search parameter definition (the fields criteria matching needs).
#[derive(Debug, Clone)]
pub struct SearchParam {
    /// Canonical URL of the definition.
    pub url: String,
    /// The code used in a query string (`subject`, `_id`, ...).
    pub code: String,
    /// Search parameter type.
    pub kind: ParamType,
    /// FHIRPath expression extracting the values; `None` for parameters HL7 defines without one
    /// (`_text`, `_content`, `_query`), which cannot be evaluated.
    pub expression: Option<String>,
    /// Target resource types of a reference parameter.
    pub targets: Vec<String>,
}

#[derive(Deserialize)]
struct Bundle {
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    resource: RawParam,
}

#[derive(Deserialize)]
struct RawParam {
    url: String,
    code: String,
    #[serde(default)]
    base: Vec<String>,
    #[serde(rename = "type")]
    kind: ParamType,
    expression: Option<String>,
    #[serde(default)]
    target: Vec<String>,
}

struct Registry {
    params: Vec<SearchParam>,
    /// base type -> code -> index in `params`
    by_base: HashMap<String, HashMap<String, usize>>,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(build_registry);

fn build_registry() -> Registry {
    // The bundle is compiled in and covered by tests, so a parse failure is a build defect; degrade
    // to "no parameters known" (every filter then reports itself unsupported) rather than panic.
    let bundle: Bundle = match serde_json::from_str(BUNDLE_JSON) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "embedded search parameter bundle is invalid");
            Bundle { entry: Vec::new() }
        }
    };
    let mut registry = Registry {
        params: Vec::new(),
        by_base: HashMap::new(),
    };
    for entry in bundle.entry {
        let raw = entry.resource;
        registry.add(
            SearchParam {
                url: raw.url,
                code: raw.code,
                kind: raw.kind,
                expression: raw.expression,
                targets: raw.target,
            },
            &raw.base,
        );
    }
    // Medplum extras (documented in Medplum's search parameter definitions): `meta.project` and
    // `meta.compartment` are Medplum extensions of Meta that servers fill in.
    registry.add(
        SearchParam {
            url: "https://medplum.com/fhir/SearchParameter/Resource-project".into(),
            code: "_project".into(),
            kind: ParamType::Token,
            expression: Some("Resource.meta.project".into()),
            targets: Vec::new(),
        },
        &["Resource".to_string()],
    );
    registry.add(
        SearchParam {
            url: "https://medplum.com/fhir/SearchParameter/Resource-compartment".into(),
            code: "_compartment".into(),
            kind: ParamType::Reference,
            expression: Some("Resource.meta.compartment".into()),
            // Any resource type can be a compartment owner; matching treats `_compartment` specially.
            targets: Vec::new(),
        },
        &["Resource".to_string()],
    );
    registry
}

impl Registry {
    fn add(&mut self, param: SearchParam, bases: &[String]) {
        let idx = self.params.len();
        for base in bases {
            self.by_base
                .entry(base.clone())
                .or_default()
                .insert(param.code.clone(), idx);
        }
        self.params.push(param);
    }

    fn get(&self, base: &str, code: &str) -> Option<&SearchParam> {
        self.by_base.get(base)?.get(code).map(|&i| &self.params[i])
    }
}

/// Looks up the search parameter `code` for `resource_type`, falling back to the parameters of the
/// `Resource` and `DomainResource` bases.
pub fn lookup(resource_type: &str, code: &str) -> Option<&'static SearchParam> {
    let r = &*REGISTRY;
    r.get(resource_type, code)
        .or_else(|| r.get("Resource", code))
        .or_else(|| r.get("DomainResource", code))
}

/// Number of definitions loaded (HL7 bundle plus Medplum extras).
pub fn len() -> usize {
    REGISTRY.params.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_whole_bundle() {
        assert_eq!(len(), 1378 + 2);
    }

    #[test]
    fn looks_up_by_type_and_base() {
        let p = lookup("Observation", "subject").unwrap();
        assert_eq!(p.kind, ParamType::Reference);
        assert_eq!(p.targets.len(), 4);
        let p = lookup("Observation", "patient").unwrap();
        assert_eq!(p.targets, vec!["Patient".to_string()]);
        assert_eq!(
            lookup("Patient", "_id").unwrap().expression.as_deref(),
            Some("Resource.id")
        );
        assert_eq!(
            lookup("Patient", "_lastUpdated").unwrap().kind,
            ParamType::Date
        );
        assert_eq!(
            lookup("Patient", "_project").unwrap().kind,
            ParamType::Token
        );
        assert_eq!(
            lookup("Bundle", "_compartment").unwrap().kind,
            ParamType::Reference
        );
        assert!(lookup("Patient", "_text").unwrap().expression.is_none());
        assert_eq!(lookup("Location", "near").unwrap().kind, ParamType::Special);
        assert!(lookup("Patient", "subject").is_none());
        assert!(lookup("Patient", "nope").is_none());
    }
}

/// Keeps, of a multi-resource expression such as `AllergyIntolerance.code | Condition.code | ...`, the
/// union terms that can apply to `resource_type` (those starting with that type, `Resource`,
/// `DomainResource`, or a relative path), like Medplum's per-type expression split. Evaluating 30
/// terms for other types only costs time. Falls back to the whole expression when nothing is kept.
pub fn narrow_expression(expression: &str, resource_type: &str) -> String {
    let mut terms = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0usize);
    for (i, c) in expression.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '`') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            (None, '|') if depth == 0 => {
                terms.push(&expression[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&expression[start..]);
    if terms.len() == 1 {
        return expression.to_string();
    }
    let kept: Vec<&str> = terms
        .into_iter()
        .map(str::trim)
        .filter(|t| {
            let head = t.trim_start_matches('(');
            let ident: &str = &head[..head
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(head.len())];
            ident == resource_type
                || ident == "Resource"
                || ident == "DomainResource"
                || ident.starts_with(|c: char| c.is_ascii_lowercase())
        })
        .collect();
    if kept.is_empty() {
        expression.to_string()
    } else {
        kept.join(" | ")
    }
}

#[cfg(test)]
mod narrow_tests {
    use super::*;

    #[test]
    fn narrows_multi_resource_expressions() {
        let e = lookup("Observation", "patient")
            .unwrap()
            .expression
            .as_deref()
            .unwrap();
        assert_eq!(
            narrow_expression(e, "Observation"),
            "Observation.subject.where(resolve() is Patient)"
        );
        let e = lookup("Observation", "value-quantity")
            .unwrap()
            .expression
            .as_deref()
            .unwrap();
        assert_eq!(narrow_expression(e, "Observation"), e);
        assert_eq!(
            narrow_expression("name | alias", "InsurancePlan"),
            "name | alias"
        );
        assert_eq!(
            narrow_expression("A.x | B.y.where(z = 'a|b') | (B.w)", "B"),
            "B.y.where(z = 'a|b') | (B.w)"
        );
        assert_eq!(narrow_expression("A.x | C.y", "B"), "A.x | C.y");
        assert_eq!(
            narrow_expression("Resource.meta.tag", "Patient"),
            "Resource.meta.tag"
        );
    }
}

#[cfg(test)]
mod engine_tests {
    use super::*;

    /// Every expression, narrowed for each of its base types, must compile with the FHIRPath engine
    /// (otherwise filters on it are reported unsupported).
    #[test]
    fn every_expression_compiles() {
        let bundle: Bundle = serde_json::from_str(BUNDLE_JSON).unwrap();
        let mut failures = Vec::new();
        for e in bundle.entry {
            let Some(expr) = e.resource.expression.as_deref() else {
                continue;
            };
            for base in &e.resource.base {
                let narrowed = narrow_expression(expr, base);
                match crate::fhirpath::compile(&narrowed) {
                    Err(err) => {
                        failures.push(format!("{base}.{}: {narrowed}: {err}", e.resource.code))
                    }
                    Ok(compiled) => {
                        // And evaluates without error on a bare resource of that type.
                        let resource = serde_json::json!({"resourceType": base, "id": "1"});
                        let env = crate::fhirpath::Environment::new();
                        if let Err(err) = compiled.evaluate(&resource, &env) {
                            failures.push(format!("{base}.{}: {narrowed}: {err}", e.resource.code));
                        }
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
