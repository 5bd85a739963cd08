//! A FHIRPath (N1, FHIR R4 flavour) engine on `serde_json` values.
//!
//! Subscription matching evaluates expressions for every change × subscription, so the engine
//! is synchronous and allocation-light: results borrow from the input resource, and parsed
//! expressions are cached ([`compile`]).
//!
//! ## What bounds an evaluation
//!
//! Criteria are user input evaluated for every change, so one hostile expression must not stall
//! dispatch. Parsing is bounded by expression length and nesting depth (so evaluation cannot
//! overflow the stack): exceeding those is [`FhirPathError::LimitExceeded`]. Each evaluation then
//! runs under one budget, [`Limits`]:
//!
//! - **work** (`max_steps`): a step for every node of the expression evaluated, every item any
//!   node produces (navigation, function results, each iteration of `where`, `select`, `repeat`,
//!   `all`, `exists`, `aggregate`...), every pairwise comparison (`distinct`, `union`/`|`,
//!   `intersect`, `exclude`, `subsetOf`, `isDistinct`, `=`/`~` on collections, `in`), every
//!   JSON value a deep comparison visits, every key navigation scans, and every 64 bytes of
//!   text scanned or compared;
//! - **memory** (`max_bytes`): bytes allocated for result collections and the strings they hold,
//!   counted cumulatively, so the total bounds peak memory from above;
//! - the size of any one collection (`max_collection`) and of any one string (`max_string`),
//!   checked before a big result is built.
//!
//! Output is charged centrally: every expression node's result passes through one accounting
//! point, so functions pay for what they produce without charging it themselves. Running out of
//! any part is [`FhirPathError::BudgetExhausted`] naming the part ([`Budget`]);
//! [`FhirPathError::is_budget_exhausted`] tells it apart from errors in the expression. The
//! defaults keep any expression on any resource up to the store's 4 MiB within about 100 ms of
//! CPU and 64 MiB of memory; [`hostile`] is the family of expressions they are checked against
//! (tests, and `fhir-outbox bench --only fhirpath`).
//!
//! ## Conformance notes
//!
//! - Paths are lenient: a name that is not an element of the node's type is looked up as a
//!   plain JSON property (so `Observation.valueQuantity` works as people write it in criteria)
//!   and otherwise yields empty rather than a static error (the suite's `mode="strict"` tests
//!   are skipped); type names as first step (`Patient.name`, `Resource.id`) select the focus
//!   when it is of that type.
//! - Choice elements navigate by their base name (`Observation.value` finds `valueQuantity`);
//!   every node carries its FHIR type from `data/fhir/elements-r4.json`.
//! - Dates/times compare per precision (undecidable comparisons are empty, including a Date
//!   against a DateTime of the same day and a zoned against an unzoned time, as the official
//!   suite expects); two zoned values are compared in UTC.
//! - Decimals are `f64` with the number of written decimal places, which drives formatting
//!   and equality/equivalence "at the precision of the less precise operand".
//! - Quantities compare when their units are identical, calendar durations vs. their UCUM
//!   codes (weeks and below), or simple metric prefixes of g/m/L and time units; no UCUM unit
//!   algebra.
//! - `resolve()` finds contained resources (`#id`) and bundle entries; otherwise a relative
//!   or absolute `Type/id` reference yields a stand-in `{"resourceType": Type, "id": id}`.
//! - Boolean contexts (`and`, `not()`, `iif()`, `where()`...) require a singleton; a single
//!   non-boolean item counts as `true`.
//! - `is` accepts subtypes (`code` is a `string`); `as`/`ofType` treat FHIR primitive
//!   specialisations as distinct (`gender.as(string)` is empty) and, unlike the spec, `as`
//!   filters a collection instead of failing on several items (R4 search parameters such as
//!   `(ActivityDefinition.useContext.value as CodeableConcept)` rely on that).
//! - An unknown lower-case type name (`ofType(string1)`) is a semantic error at parse time.
//! - A variable bound to `{}` or `null` is the empty collection.
//! - Terminology (`memberOf`, `subsumes`), `conformsTo`, `htmlChecks` and `comparable` return
//!   [`FhirPathError::Unsupported`].
//!
//! ```
//! use fhir_match::fhirpath::{Environment, Expression};
//! let patient = serde_json::json!({"resourceType": "Patient", "name": [{"given": ["Peter"]}]});
//! let expr = Expression::parse("Patient.name.given.first() = 'Peter'").unwrap();
//! let out = expr.evaluate(&patient, &Environment::new()).unwrap();
//! assert_eq!(out[0].as_bool(), Some(true));
//! ```

// Everything reachable from outside is documented (the criteria engine codes against it).
#![warn(missing_docs)]

mod ast;
mod budget;
mod error;
mod eval;
mod functions;
pub mod hostile;
mod parser;
pub mod temporal;
mod value;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

pub use error::{Budget, FhirPathError};
pub use value::{Item, JsonRef, Node, Quantity, TypeRef};

/// A parsed FHIRPath expression (immutable, `Send + Sync`, cheap to share through [`compile`]).
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    ast: ast::Expr,
}

impl Expression {
    /// Parse `source`. Syntax errors report the character position; unknown functions and
    /// wrong argument counts are semantic errors; too deep or too long input is a limit error.
    pub fn parse(source: &str) -> Result<Expression, FhirPathError> {
        let ast = parser::parse(source)?;
        Ok(Expression {
            source: source.to_string(),
            ast,
        })
    }

    /// The expression text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluate against `resource` (also `%resource` and `%context`).
    ///
    /// Runs under the environment's [`Limits`]; running out of them is
    /// [`FhirPathError::BudgetExhausted`].
    pub fn evaluate<'a>(
        &self,
        resource: &'a Value,
        env: &Environment<'a>,
    ) -> Result<Vec<Item<'a>>, FhirPathError> {
        self.evaluate_measured(resource, env).0
    }

    /// Like [`Expression::evaluate`], and also report how much of the budget the evaluation
    /// spent (whether it succeeded or not), for measurements and logs.
    pub fn evaluate_measured<'a>(
        &self,
        resource: &'a Value,
        env: &Environment<'a>,
    ) -> (Result<Vec<Item<'a>>, FhirPathError>, Spent) {
        let cx = eval::Ctx::new(env, resource);
        let root = [Item::root(resource)];
        let this: &[Item<'a>] = if resource.is_null() { &[] } else { &root };
        let out = cx.eval(
            &self.ast,
            eval::Scope {
                this,
                index: None,
                total: None,
            },
        );
        let (steps, bytes) = cx.meter.spent();
        (out, Spent { steps, bytes })
    }

    /// Evaluate and convert the result to a boolean per FHIRPath's singleton rules: empty is
    /// `None`, a single boolean is itself, any other single item is `true`; several items are
    /// an error.
    pub fn evaluate_bool<'a>(
        &self,
        resource: &'a Value,
        env: &Environment<'a>,
    ) -> Result<Option<bool>, FhirPathError> {
        let out = self.evaluate(resource, env)?;
        eval::to_bool3(&out, "result")
    }
}

/// Maximum number of parsed expressions kept by [`compile`].
pub const CACHE_CAPACITY: usize = 2048;

static CACHE: LazyLock<Mutex<HashMap<String, Arc<Expression>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Parse through a bounded, thread-safe cache keyed by source text.
///
/// When the cache is full it is emptied (expressions come from a bounded set of subscriptions
/// and search parameters, so a rare full reset is simpler and cheaper than LRU bookkeeping).
/// Parse errors are not cached.
pub fn compile(source: &str) -> Result<Arc<Expression>, FhirPathError> {
    // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
    if let Some(e) = CACHE.lock().unwrap_or_else(|p| p.into_inner()).get(source) {
        return Ok(e.clone());
    }
    let expr = Arc::new(Expression::parse(source)?);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= CACHE_CAPACITY {
        cache.clear();
    }
    cache.insert(source.to_string(), expr.clone());
    Ok(expr)
}

/// The budget of one evaluation. Exceeding any part is [`FhirPathError::BudgetExhausted`]
/// naming the part ([`Budget`]).
///
/// The defaults keep any expression on any resource up to 4 MiB of JSON within about 100 ms
/// of CPU (release build) and 64 MiB of memory; `fhir-outbox bench --only fhirpath` measures
/// that on hostile expressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Units of work: every item produced or visited (navigation, function results, each
    /// iteration of `where`/`select`/`repeat`/`aggregate`...), every comparison made by
    /// `distinct`, `union`, `=`, `in`..., and text scanned or compared (a step per 64 bytes).
    pub max_steps: u64,
    /// Bytes allocated for collections and strings, cumulatively (freed memory is not given
    /// back), so it bounds the evaluation's peak memory from above. A collection is charged once
    /// it exists, so the peak can exceed this by one collection (at most `max_collection` items
    /// of about 80 bytes) and one string (`max_string`).
    pub max_bytes: u64,
    /// Items in any one collection.
    pub max_collection: usize,
    /// Bytes of any one string the engine builds.
    pub max_string: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps: 800_000,
            max_bytes: 40 << 20,
            max_collection: 100_000,
            max_string: 1 << 20,
        }
    }
}

/// How much of its budget an evaluation spent ([`Expression::evaluate_measured`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    /// Units of work (compare with [`Limits::max_steps`]).
    pub steps: u64,
    /// Bytes allocated, cumulatively (compare with [`Limits::max_bytes`]).
    pub bytes: u64,
}

/// Variables and limits for evaluation.
#[derive(Debug, Clone, Default)]
pub struct Environment<'a> {
    vars: Vec<(String, &'a Value)>,
    limits: Limits,
}

impl<'a> Environment<'a> {
    /// An environment without variables and with default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Define `%name` (give the name without `%`, e.g. `current`, `previous`). A JSON object
    /// is a resource or element, an array a collection, `null` and `{}` the empty collection
    /// (`{}` is what callers pass for "no previous version": `%previous.exists()` is false and
    /// `%previous.status` is empty).
    pub fn with_variable(mut self, name: &str, value: &'a Value) -> Self {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_string(), value));
        self
    }

    /// Replace the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The current limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn var(&self, name: &str) -> Option<&'a Value> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests;
