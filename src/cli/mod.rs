//! What only the command line needs, kept out of the library: the benchmark (`fhir-outbox bench`),
//! the demo tour with its verifying receiver, and terminal tables.

pub mod bench;
pub mod demo;
pub mod operator;
pub mod receiver;
pub mod table;
