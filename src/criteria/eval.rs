//! Glue to the FHIRPath engine: evaluates a search parameter expression on a resource.

use serde_json::Value;

use super::CriteriaError;

/// Evaluates `expression` (of search parameter `code`) on `resource` and hands each result, with its
/// FHIR type when known, to `f`.
pub(super) fn evaluate(
    code: &str,
    expression: &str,
    _resource: &Value,
    _f: impl FnMut(Option<&str>, &Value),
) -> Result<(), CriteriaError> {
    // Placeholder until the FHIRPath engine (branch `fhirpath`) is merged.
    Err(CriteriaError::Evaluation {
        param: code.to_string(),
        expression: expression.to_string(),
        message: "FHIRPath engine not available".into(),
    })
}
