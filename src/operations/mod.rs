//! Operations: what people who run fhir-outbox use directly: the operator commands (`control`),
//! `explain`, the admin endpoint, retention and the planner statistics of the pipeline's tables.

pub mod actions;
pub mod admin;
pub mod console;
pub mod control;
pub mod explain;
pub mod retention;
pub mod statistics;
