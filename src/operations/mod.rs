//! Operations: what people who run fhir-outbox use directly (the demo tour, `explain`; later the CLI
//! views, metrics and admin endpoint).

pub mod admin;
pub mod control;
pub mod demo;
pub mod explain;
pub mod retention;
mod table;

pub use table::Table;
