//! FHIR R4 element definitions: types and cardinality of every element (used by FHIRPath).
