//! FHIR R4 definitions shipped with the crate (data from the HL7 specification, `data/fhir/`).

pub mod elements;
