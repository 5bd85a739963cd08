//! Operations: what people who run fhir-outbox use directly: the operator commands (`control`),
//! `explain`, the admin endpoint, retention, and the demo tour with its verifying receiver.

pub mod admin;
pub mod bench;
pub mod control;
pub mod demo;
pub mod explain;
pub mod receiver;
pub mod retention;
mod table;

pub use table::Table;
