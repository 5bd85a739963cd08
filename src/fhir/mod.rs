//! FHIR data as the pipeline handles it: the nesting limit of stored resources and the decoder of
//! stored JSON. The R4 element definitions ([`elements`]) live in the `fhir-match` crate with the
//! FHIRPath engine that uses them, re-exported here.

pub use fhir_match::fhir::elements;

use serde_json::Value;

/// The deepest nesting of arrays and objects a stored resource may have, the resource object itself
/// being level 1. The store's `checked_content` refuses deeper resources with the same number
/// (migrations/20261201000001_nesting_limit.sql), and the pipeline refuses to decode them, because
/// serde_json gives up at 128 levels: a resource the store accepted but dispatch or a receiver
/// cannot parse could never be delivered. The margin leaves room for envelopes around a resource.
pub const MAX_NESTING_DEPTH: usize = 100;

/// Levels of nested arrays and objects in `value`, as serde_json counts them: a scalar is 0, `{}`
/// and `[]` are 1. Iterative, so that a value built in memory at any depth cannot exhaust the stack.
pub fn nesting_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 1)];
    while let Some((value, level)) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items.iter().map(|child| (child, level + 1))),
            Value::Object(members) => {
                pending.extend(members.values().map(|child| (child, level + 1)))
            }
            _ => continue,
        }
        deepest = deepest.max(level);
    }
    deepest
}

/// Decodes JSON read from the store (a resource's content), one row at a time so that a row that
/// cannot be read fails alone. Refuses what the store would refuse now: more than
/// [`MAX_NESTING_DEPTH`] levels (rows written before the limit existed).
pub fn decode_stored(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|error| error.to_string())?;
    let depth = nesting_depth(&value);
    if depth > MAX_NESTING_DEPTH {
        return Err(format!(
            "nested {depth} levels deep, over the limit of {MAX_NESTING_DEPTH}"
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        // The resource object is one level; the rest are arrays around a scalar.
        format!(
            "{{\"resourceType\":\"Patient\",\"x\":{}1{}}}",
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    }

    #[test]
    fn depth_counts_arrays_and_objects_like_serde_json() {
        assert_eq!(nesting_depth(&serde_json::json!(1)), 0);
        assert_eq!(nesting_depth(&serde_json::json!({})), 1);
        assert_eq!(
            nesting_depth(&serde_json::json!({ "a": [[], { "b": {} }] })),
            4
        );
        let parsed: Value = serde_json::from_str(&nested(127)).unwrap();
        assert_eq!(nesting_depth(&parsed), 127);
        // serde_json's own limit, which the store's limit must stay below.
        let error = serde_json::from_str::<Value>(&nested(128)).unwrap_err();
        assert!(error.to_string().contains("recursion limit"), "{error}");
        const { assert!(MAX_NESTING_DEPTH < 128) };
    }

    #[test]
    fn decoding_refuses_what_the_store_refuses() {
        assert!(decode_stored(&nested(MAX_NESTING_DEPTH)).is_ok());
        let error = decode_stored(&nested(MAX_NESTING_DEPTH + 1)).unwrap_err();
        assert_eq!(error, "nested 101 levels deep, over the limit of 100");
        let error = decode_stored(&nested(129)).unwrap_err();
        assert!(error.contains("recursion limit exceeded"), "{error}");
    }
}
