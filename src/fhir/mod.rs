//! FHIR data as the pipeline handles it: the nesting limit of stored resources and the decoder of
//! stored JSON. The R4 element definitions ([`elements`]) live in the `fhir-match` crate with the
//! FHIRPath engine that uses them, re-exported here.

pub use fhir_match::fhir::elements;

use serde_json::Value;
use std::ops::Range;

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

/// JSON read from the store (a resource's content), made compact (no whitespace between tokens),
/// with where each of its top-level members is: what a rest-hook sends, and what its AuditEvent
/// names the resource by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactJson {
    /// The compact text.
    pub bytes: Vec<u8>,
    /// Byte ranges in `bytes` of each top-level member's key (between its quotes) and value.
    members: Vec<(Range<usize>, Range<usize>)>,
}

impl CompactJson {
    /// The text of the top-level member `key`'s value, if the JSON is an object that has it.
    pub fn member(&self, key: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(name, _)| &self.bytes[name.clone()] == key.as_bytes())
            .map(|(_, value)| &self.bytes[value.clone()])
    }
}

/// Makes JSON text from the store compact in one pass over its bytes, without decoding it: the
/// text is PostgreSQL's output of a `jsonb` value, so it is valid JSON whose tokens are separated
/// by spaces; strings, numbers and literals are copied as they are (a decimal keeps its written
/// precision, which FHIR says is significant, and a number beyond 64 bits its digits). Decoding
/// it, encoding it again and decoding it once more for the display took about a tenth of the
/// worker's CPU (docs/performance-history.md, run S). Brackets are counted, not matched: the text
/// is trusted to be JSON. Refuses text that ends inside a string or a bracket, or goes on after its
/// value, and what [`decode_stored`] refuses for depth (rows written before the limit).
pub fn compact_stored(text: &str) -> Result<CompactJson, String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut members = Vec::new();
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut closed) = (false, false);
    // Inside the top-level object: where the member being read starts, and its key once read.
    let mut top_object = false;
    let mut key_start: Option<usize> = None;
    let mut key: Option<Range<usize>> = None;
    let mut value_start: Option<usize> = None;
    let text = text.as_bytes();
    let mut at = 0;
    while at < text.len() {
        if in_string {
            // A string's bytes are copied in runs up to its next quote or backslash.
            let run = memchr::memchr2(b'"', b'\\', &text[at..]).map_or(text.len(), |end| at + end);
            bytes.extend_from_slice(&text[at..run]);
            at = run;
            let Some(&byte) = text.get(at) else { break };
            bytes.push(byte);
            at += 1;
            if byte == b'\\' {
                // The escaped byte, whatever it is (`\"`, `\\`, `\u`…), is part of the string.
                bytes.extend(text.get(at));
                at += 1;
            } else {
                in_string = false;
                if let Some(start) = key_start.take() {
                    key = Some(start..bytes.len() - 1);
                }
            }
            continue;
        }
        let byte = text[at];
        at += 1;
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        }
        if closed {
            return Err(format!(
                "characters after the JSON value: `{}`",
                byte as char
            ));
        }
        let at_top_member = top_object && depth == 1;
        match byte {
            b'"' => {
                in_string = true;
                if at_top_member && key.is_none() && value_start.is_none() {
                    key_start = Some(bytes.len() + 1);
                }
            }
            b'{' | b'[' => {
                if depth == 0 {
                    top_object = byte == b'{';
                }
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => {
                if at_top_member {
                    if let (Some(name), Some(start)) = (key.take(), value_start.take()) {
                        members.push((name, start..bytes.len()));
                    }
                }
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("`{}` closes nothing", byte as char))?;
                closed = depth == 0;
            }
            b':' if at_top_member => value_start = Some(bytes.len() + 1),
            b',' if at_top_member => {
                if let (Some(name), Some(start)) = (key.take(), value_start.take()) {
                    members.push((name, start..bytes.len()));
                }
            }
            _ => {}
        }
        bytes.push(byte);
    }
    if in_string || depth > 0 {
        return Err("the JSON text ends inside a string, object or array".into());
    }
    check_depth(deepest)?;
    Ok(CompactJson { bytes, members })
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

    /// What decoding and encoding again gives: the compact text, numbers as serde_json writes them.
    fn transcoded(text: &str) -> Vec<u8> {
        let mut compact = Vec::new();
        let mut reader = serde_json::Deserializer::from_str(text);
        serde_transcode::transcode(&mut reader, &mut serde_json::Serializer::new(&mut compact))
            .unwrap();
        compact
    }

    #[test]
    fn compacting_gives_what_decoding_and_encoding_again_gives() {
        let mut texts: Vec<String> = [
            "1",
            "{}",
            r#"{ "a": [[], { "b": {} }] }"#,
            "{\"s\": \"[{\\\"[\",\n\t\"t\": [\"\\\\\", {\"u\": \"}] é\"}], \"e\": \"\"}",
            &nested(MAX_NESTING_DEPTH),
        ]
        .map(str::to_owned)
        .into();
        // Real resources, as PostgreSQL writes `jsonb` (`", "` and `": "`) and pretty-printed.
        let examples = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crates/fhir-match/tests/data/fhirpath"
        );
        for entry in std::fs::read_dir(examples).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|extension| extension != "json") {
                continue;
            }
            let value: Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let compact = value.to_string();
            texts.push(compact.replace("\",\"", "\", \"").replace("\":", "\": "));
            texts.push(serde_json::to_string_pretty(&value).unwrap());
        }
        assert!(texts.len() > 10);
        for text in &texts {
            let compact = compact_stored(text).unwrap();
            assert_eq!(
                String::from_utf8(compact.bytes).unwrap(),
                String::from_utf8(transcoded(text)).unwrap()
            );
        }
    }

    #[test]
    fn compacting_finds_the_top_level_members() {
        let compact =
            compact_stored(r#"{"name": {"name": "inner"}, "code": [1, "a,b"], "n": "x", "z": {}}"#)
                .unwrap();
        let member = |key| compact.member(key).map(|v| std::str::from_utf8(v).unwrap());
        assert_eq!(member("name"), Some(r#"{"name":"inner"}"#));
        assert_eq!(member("code"), Some(r#"[1,"a,b"]"#));
        assert_eq!(member("n"), Some(r#""x""#));
        assert_eq!(member("z"), Some("{}"));
        assert_eq!(member("inner"), None);
        let list = compact_stored(r#"["name", 1]"#).unwrap();
        assert_eq!(list.member("name"), None);
    }

    #[test]
    fn compacting_keeps_the_value_and_refuses_what_decoding_refuses() {
        let stored = r#"{"id": "p1", "name": [{"given": ["A \"B\"", "C"]}], "n": 1.50, "big": 123456789012345678901234567890}"#;
        let compact = compact_stored(stored).unwrap();
        let text = std::str::from_utf8(&compact.bytes).unwrap();
        // Numbers as written: FHIR decimals keep their precision, big numbers their digits.
        assert_eq!(
            text,
            r#"{"id":"p1","name":[{"given":["A \"B\"","C"]}],"n":1.50,"big":123456789012345678901234567890}"#
        );
        assert!(compact_stored(&nested(MAX_NESTING_DEPTH)).is_ok());
        assert_eq!(
            compact_stored(&nested(MAX_NESTING_DEPTH + 1)).unwrap_err(),
            "nested 101 levels deep, over the limit of 100"
        );
        for broken in [r#"{"a": 1} x"#, r#"{"a": "1}"#, r#"{"a": [1}"#, "]"] {
            assert!(compact_stored(broken).is_err(), "{broken}");
        }
    }
}
