//! fhir-match: the FHIRPath engine and the FHIR search criteria matcher that subscription matching
//! runs, on `serde_json` values, with the FHIR R4 data they need compiled in.
//!
//! [`fhirpath`] evaluates FHIRPath expressions under a budget; [`criteria`] parses and matches FHIR
//! search criteria (its search parameters are FHIRPath expressions); [`fhir::elements`] is the R4
//! element model that gives FHIRPath its types. Nothing here knows about the database, the outbox or
//! the delivery pipeline: fhir-outbox re-exports these modules (`fhir_outbox::fhirpath`,
//! `fhir_outbox::criteria`, `fhir_outbox::fhir::elements`).

#![warn(missing_docs)]

pub mod criteria;
pub mod fhir;
pub mod fhirpath;
