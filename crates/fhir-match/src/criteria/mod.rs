//! FHIR search criteria: parsing a Subscription criteria string and matching it against a resource.
//!
//! This re-implements Medplum's `parseSearchRequest` + `matchesSearchRequest` (newest semantics, see
//! `docs/medplum-rest-hook.md` §2 at the repository root), with these deliberate differences, each explained where it
//! is implemented:
//! - `number` and `quantity` parameters are matched (Medplum never matches them), with every prefix;
//!   `ap` means "within 10%" for them ([`quantity`]).
//! - Date, number and quantity values may each carry their own prefix (`date=ge2020,le2019`); Medplum
//!   reads one prefix for the whole list and rejects later ones as invalid dates.
//! - Constructs we cannot evaluate (chained/reverse-chained parameters, `_filter`, `_text`, composite,
//!   `near`, unknown parameters, modifiers on date/number/quantity parameters, the `sw` prefix) never
//!   match, as in Medplum, but are reported by [`Criteria::unsupported`] so the dispatcher can tell the
//!   subscription owner once, and by [`Criteria::explain`].
//! - Modifiers Medplum silently degrades to plain equality (`:in`, `:not-in`, `:above`/`:below` on
//!   tokens, `:of-type`, `:identifier`, `:text`, `subject:Patient`, ...) keep Medplum's behaviour but are
//!   listed by [`Criteria::approximations`].
//!
//! Semantics per type (Medplum's):
//! - **reference**: values normalised to strings (`Reference.reference`, canonical strings, inline
//!   resources as `Type/id`, identifier-only references as `identifier:<system>|<value>`). A filter value
//!   with `/` must be equal; a bare id matches `…/<id>` only when the parameter has exactly one target
//!   type, or for `_compartment`. An empty filter value matches a resource without the element.
//! - **string**: case-insensitive substring by default and with `:contains` (Medplum, not FHIR's
//!   starts-with: users migrate from Medplum and their subscriptions must keep firing); `:exact` is
//!   case-sensitive whole-string equality.
//! - **uri**: case-sensitive whole-URI equality (also `:exact`, `:not`); `:above`/`:below`/`:contains`
//!   fall back to case-insensitive substring.
//! - **token**: `system|code`, `system|`, `|code`, `code` (any system, also CodeableConcept text and
//!   Coding display), `|` never matches; comparisons are case-insensitive.
//! - **date**: periods by precision, every prefix (see [`date`]).
//! - `:missing` / `:present`: `:missing=false` and `:present=true` require the element, any other value
//!   (including `TRUE`) requires its absence.
//! - Negation (`:not`, `ne`) matches when no value matches, so a resource without the element matches.
//!
//! ```
//! use fhir_match::criteria::Criteria;
//! let criteria = Criteria::parse("Observation?status=final&code=http://loinc.org|8867-4").unwrap();
//! let obs = serde_json::json!({"resourceType": "Observation", "status": "preliminary",
//!     "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}});
//! assert!(!criteria.matches(&obs).unwrap());
//! let report = criteria.explain(&obs).unwrap();
//! assert_eq!(report.failures[0].to_string(), "`status=final`: resource has status `preliminary`");
//! ```

pub mod date;
mod eval;
mod matcher;
mod parse;
pub mod quantity;
pub mod search_params;
pub mod values;

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

pub use search_params::{ParamType, SearchParam};

use crate::fhirpath::Expression;

/// Longest criteria string accepted (bytes); longer ones are rejected rather than processed.
pub const MAX_CRITERIA_LEN: usize = 64 * 1024;
/// Most parameters (`&`-separated pairs) in one criteria.
pub const MAX_PARAMETERS: usize = 256;
/// Most comma-separated values in one parameter.
pub const MAX_VALUES: usize = 1024;

/// Why a criteria string cannot be used at all, or why evaluating it failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CriteriaError {
    /// The criteria is empty (or blank).
    #[error("criteria is empty")]
    Empty,
    /// No resource type before the `?`.
    #[error("criteria `{0}` does not start with a resource type")]
    NoResourceType(String),
    /// The resource type part contains characters a FHIR type name cannot have.
    #[error("`{0}` is not a valid resource type")]
    InvalidResourceType(String),
    /// The resource type is a well-formed name but no FHIR R4 resource type (nor one of Medplum's
    /// own): a misspelling such as `Patinet` would otherwise silently never match.
    #[error("`{0}` is not a FHIR R4 resource type (nor one of Medplum's own)")]
    UnknownResourceType(String),
    /// The criteria exceeds [`MAX_CRITERIA_LEN`].
    #[error("criteria is too long ({len} bytes, at most {max})")]
    TooLong {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// More than [`MAX_PARAMETERS`] parameters.
    #[error("criteria has too many parameters (more than {max})")]
    TooManyParameters {
        /// Limit.
        max: usize,
    },
    /// More than [`MAX_VALUES`] comma-separated values in one parameter.
    #[error("parameter `{param}` has too many values (more than {max})")]
    TooManyValues {
        /// The parameter.
        param: String,
        /// Limit.
        max: usize,
    },
    /// A date, number or quantity value that does not parse (Medplum answers 400 for dates).
    #[error("invalid {kind} value `{value}` for parameter `{param}`")]
    InvalidValue {
        /// The parameter (with its modifier, if any).
        param: String,
        /// `date`, `number` or `quantity`.
        kind: &'static str,
        /// The offending value.
        value: String,
    },
    /// The FHIRPath engine failed on a search parameter expression for this resource.
    #[error("cannot evaluate search parameter `{param}` (`{expression}`): {message}")]
    Evaluation {
        /// The parameter code.
        param: String,
        /// Its FHIRPath expression.
        expression: String,
        /// The engine's error.
        message: String,
    },
    /// A search parameter expression exhausted the FHIRPath evaluation budget on this resource
    /// (a pathological resource: the expressions themselves are the specification's).
    #[error("search parameter `{param}` (`{expression}`): {error}")]
    BudgetExhausted {
        /// The parameter code.
        param: String,
        /// Its FHIRPath expression.
        expression: String,
        /// The engine's error ([`FhirPathError::BudgetExhausted`](crate::fhirpath::FhirPathError::BudgetExhausted)).
        error: crate::fhirpath::FhirPathError,
    },
}

impl CriteriaError {
    /// Whether evaluation stopped because the FHIRPath budget was exhausted.
    pub fn is_budget_exhausted(&self) -> bool {
        matches!(self, CriteriaError::BudgetExhausted { .. })
    }
}

/// A construct of the criteria that is not (fully) supported, with a human reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The parameter as written (decoded), e.g. `subject.name=Bob`.
    pub parameter: String,
    /// Why it is not supported, e.g. `chained parameters are not supported`.
    pub reason: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.parameter, self.reason)
    }
}

/// Search prefixes of number, date and quantity values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// equal (default)
    Eq,
    /// not equal
    Ne,
    /// less than
    Lt,
    /// less or equal
    Le,
    /// greater than
    Gt,
    /// greater or equal
    Ge,
    /// starts after
    Sa,
    /// ends before
    Eb,
    /// approximately
    Ap,
    /// Medplum's "starts with" prefix (never matches)
    Sw,
}

/// The result of [`Criteria::explain`]: whether the resource matched and, if not, every reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchReport {
    /// True when the resource matches the criteria.
    pub matched: bool,
    /// One entry per failed check (resource type, then each failing filter in criteria order).
    pub failures: Vec<Failure>,
}

/// One failed check of a [`MatchReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The check: `resource type` or the parameter as written (`status=final`).
    pub filter: String,
    /// Human explanation, e.g. "resource has status `preliminary`".
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.filter, self.reason)
    }
}

impl fmt::Display for MatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.matched {
            return write!(f, "matched");
        }
        write!(f, "did not match")?;
        for failure in &self.failures {
            write!(f, "\n- {failure}")?;
        }
        Ok(())
    }
}

/// One parsed search filter (one `code[:modifier]=values` pair of the criteria).
#[derive(Debug, Clone)]
pub struct Filter {
    /// The pair as written (decoded, truncated for display).
    display: String,
    code: String,
    modifier: Option<String>,
    param: Option<&'static SearchParam>,
    /// The parameter's expression narrowed to the criteria's resource type, compiled.
    expression: Option<Arc<Expression>>,
    test: parse::Test,
}

impl Filter {
    /// The parameter as written, e.g. `status:not=cancelled`.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The parameter code (`status`).
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The modifier (`not`), if any.
    pub fn modifier(&self) -> Option<&str> {
        self.modifier.as_deref()
    }

    /// The search parameter definition, when the code is known for the resource type.
    pub fn search_param(&self) -> Option<&'static SearchParam> {
        self.param
    }

    /// The FHIRPath expression evaluated for this filter (the search parameter's expression, keeping
    /// only the terms that apply to the criteria's resource type).
    pub fn expression(&self) -> Option<&str> {
        self.expression.as_deref().map(Expression::source)
    }

    /// Why this filter never matches, when it is unsupported.
    pub fn unsupported_reason(&self) -> Option<&str> {
        match &self.test {
            parse::Test::Unsupported(reason) => Some(reason),
            _ => None,
        }
    }
}

/// A parsed Subscription criteria (`Observation?code=http://loinc.org|1234-5&status=final`).
#[derive(Debug, Clone)]
pub struct Criteria {
    source: String,
    resource_type: String,
    filters: Vec<Filter>,
    unsupported: Vec<Unsupported>,
    approximations: Vec<Unsupported>,
}

impl Criteria {
    /// Parses a criteria string. Unsupported constructs do not fail: they become filters that never
    /// match (see [`Criteria::unsupported`]). Errors are reserved for strings that cannot be a criteria
    /// (empty, no resource type, over the size bounds) and invalid date/number/quantity values.
    pub fn parse(criteria: &str) -> Result<Criteria, CriteriaError> {
        parse::parse(criteria)
    }

    /// The criteria string as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The resource type the criteria selects.
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// The filters, in criteria order (all must match).
    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }

    /// Whether matching reads anything of the resource beyond its type: a criteria of a type alone
    /// (`Patient`) matches every resource of that type. (Unsupported constructs are filters too,
    /// so a criteria that can never match reads the resource as well.)
    pub fn reads_resource(&self) -> bool {
        !self.filters.is_empty()
    }

    /// Constructs that can never match (so the criteria never matches any resource).
    pub fn unsupported(&self) -> impl Iterator<Item = &Unsupported> {
        self.unsupported.iter()
    }

    /// Constructs evaluated in a simplified way, as Medplum does (for example `:in` treated as plain
    /// equality): the criteria can match, but maybe not as its author expects.
    pub fn approximations(&self) -> impl Iterator<Item = &Unsupported> {
        self.approximations.iter()
    }

    /// Does `resource` match? The fast path: no explanation is built.
    pub fn matches(&self, resource: &Value) -> Result<bool, CriteriaError> {
        matcher::evaluate(self, resource, false).map(|r| r.matched)
    }

    /// Like [`Criteria::matches`], and says which checks failed and why (for the `explain` command).
    /// Every filter is evaluated, so all reasons are listed; a FHIRPath evaluation error is reported
    /// as the failure of its filter instead of aborting the explanation.
    pub fn explain(&self, resource: &Value) -> Result<MatchReport, CriteriaError> {
        matcher::evaluate(self, resource, true)
    }
}

impl fmt::Display for Criteria {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}
