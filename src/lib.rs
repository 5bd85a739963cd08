//! fhir-outbox: FHIR Subscription delivery from a PostgreSQL transactional outbox.

pub mod criteria;
pub mod fhir;
pub mod fhirpath;
