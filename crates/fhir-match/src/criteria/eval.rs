//! Glue to the FHIRPath engine (`crate::fhirpath`): compiles and evaluates search parameter
//! expressions.

use std::sync::Arc;

use serde_json::Value;

use super::CriteriaError;
use crate::fhirpath::{self, Environment, Expression};

/// Compiles (through the engine's cache) a search parameter expression; the error text is reported
/// as the reason the filter is unsupported.
pub(super) fn compile(expression: &str) -> Result<Arc<Expression>, String> {
    fhirpath::compile(expression).map_err(|e| e.to_string())
}

/// Evaluates `expression` (of search parameter `code`) on `resource` and hands each result, with its
/// FHIR type when the engine knows it, to `f`.
pub(super) fn evaluate(
    code: &str,
    expression: &Expression,
    resource: &Value,
    mut f: impl FnMut(Option<&str>, &Value),
) -> Result<(), CriteriaError> {
    let env = Environment::new();
    let items = expression.evaluate(resource, &env).map_err(|e| {
        let param = code.to_string();
        let expression = expression.source().to_string();
        if e.is_budget_exhausted() {
            CriteriaError::BudgetExhausted {
                param,
                expression,
                error: e,
            }
        } else {
            CriteriaError::Evaluation {
                param,
                expression,
                message: e.to_string(),
            }
        }
    })?;
    for item in &items {
        let json = item.to_json();
        f(item.fhir_type(), &json);
    }
    Ok(())
}
