//! fhir-outbox: FHIR Subscription delivery from a PostgreSQL transactional outbox.
//!
//! The pipeline, one module per stage (see ARCHITECTURE.md):
//! [`capture`] (the versioned store and its same-transaction outbox) → [`dispatch`] (subscription
//! matching, delivery rows) → [`delivery`] → [`audit`] → [`operations`], all started together by
//! [`pipeline`]. Supporting modules: [`db`] (pool, migrations), [`project`] (tenants and their
//! settings), [`fhir`], [`fhirpath`] and [`criteria`] (FHIR data, FHIRPath and search criteria for
//! subscription matching; the last two from the `fhir-match` crate).

#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod audit;
pub mod bots;
pub mod capture;
pub mod db;
pub mod delivery;
pub mod dispatch;
pub mod fhir;
pub mod metrics;
pub mod operations;
pub mod pipeline;
pub mod project;
pub mod subscription;
pub mod topic;

/// The FHIRPath engine and the search criteria matcher live in the `fhir-match` crate
/// (crates/fhir-match); they are re-exported so that `fhir_outbox::fhirpath` and
/// `fhir_outbox::criteria` keep their paths.
pub use fhir_match::{criteria, fhirpath};
