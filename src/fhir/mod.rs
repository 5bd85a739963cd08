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

/// Levels of nested arrays and objects in JSON text, counted as [`nesting_depth`] counts them in
/// the decoded value, without decoding it (the text is assumed to be JSON).
fn text_nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    deepest
}

/// JSON read from the store (a resource's content), made compact (no whitespace between tokens)
/// without decoding it into a tree: what a rest-hook sends. Refuses what [`decode_stored`] refuses.
pub fn compact_stored(text: &str) -> Result<Vec<u8>, String> {
    let mut compact = Vec::with_capacity(text.len());
    let mut reader = serde_json::Deserializer::from_str(text);
    serde_transcode::transcode(&mut reader, &mut serde_json::Serializer::new(&mut compact))
        .and_then(|()| reader.end())
        .map_err(|error| error.to_string())?;
    check_depth(text_nesting_depth(text))?;
    Ok(compact)
}

fn check_depth(depth: usize) -> Result<(), String> {
    if depth > MAX_NESTING_DEPTH {
        return Err(format!(
            "nested {depth} levels deep, over the limit of {MAX_NESTING_DEPTH}"
        ));
    }
    Ok(())
}

/// Decodes JSON read from the store (a resource's content), one row at a time so that a row that
/// cannot be read fails alone. Refuses what the store would refuse now: more than
/// [`MAX_NESTING_DEPTH`] levels (rows written before the limit existed).
pub fn decode_stored(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|error| error.to_string())?;
    check_depth(nesting_depth(&value))?;
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

    #[test]
    fn text_depth_counts_as_the_decoded_value_does() {
        for text in [
            "1",
            "{}",
            r#"{ "a": [[], { "b": {} }] }"#,
            r#"{"s": "[{\"[", "t": ["\\", {"u": "}]}"}]}"#,
            &nested(127),
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(text_nesting_depth(text), nesting_depth(&value), "{text}");
        }
    }

    #[test]
    fn compacting_keeps_the_value_and_refuses_what_decoding_refuses() {
        let stored = r#"{"id": "p1", "name": [{"given": ["A \"B\"", "C"]}], "n": 1.50, "big": 12345678901234567890}"#;
        let compact = compact_stored(stored).unwrap();
        let text = std::str::from_utf8(&compact).unwrap();
        assert!(!text.contains(": ") && !text.contains(", "), "{text}");
        assert_eq!(
            serde_json::from_str::<Value>(text).unwrap(),
            decode_stored(stored).unwrap()
        );
        assert!(compact_stored(&nested(MAX_NESTING_DEPTH)).is_ok());
        assert_eq!(
            compact_stored(&nested(MAX_NESTING_DEPTH + 1)).unwrap_err(),
            "nested 101 levels deep, over the limit of 100"
        );
        assert!(
            compact_stored(r#"{"a": 1} x"#).is_err(),
            "trailing characters"
        );
    }
}
