//! A FHIRPath engine on `serde_json` values.
