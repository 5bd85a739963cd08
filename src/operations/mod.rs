//! Operations: what people who run fhir-outbox use directly (the demo tour; later the CLI views,
//! metrics and admin endpoint).

pub mod demo;
mod table;

pub use table::Table;
