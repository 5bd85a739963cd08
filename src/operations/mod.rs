//! Operations: what people who run fhir-outbox use directly (the demo tour, `explain`; later the CLI
//! views, metrics and admin endpoint).

pub mod bench;
pub mod demo;
pub mod explain;
mod table;

pub use table::Table;
