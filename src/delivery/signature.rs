//! Signing what we send, so receivers can tell it came from us and refuse replays.
//!
//! Two signatures over the exact body bytes:
//! - `X-Signature`: lowercase hex HMAC-SHA256 of the body (Medplum's, kept for existing receivers);
//! - Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`), where
//!   the HMAC covers `{id}.{timestamp}.{body}`, so a receiver can deduplicate by id and refuse old
//!   timestamps with any off-the-shelf verifier.

use crate::subscription::{self, extension};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::fmt::Write;

type HmacSha256 = Hmac<Sha256>;

/// The subscription's HMAC secret, from the first of Medplum's three extension spellings that holds a
/// non-empty string: the `www` URL, the legacy URL, then the non-`www` URL.
pub fn secret(subscription: &Value) -> Option<&str> {
    [
        extension::SECRET,
        extension::SECRET_LEGACY,
        extension::SECRET_NO_WWW,
    ]
    .into_iter()
    .find_map(|url| {
        subscription::extension_value(subscription, url, "valueString")
            .and_then(Value::as_str)
            .filter(|secret| !secret.is_empty())
    })
}

fn mac(secret: &str) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any size")
}

/// `X-Signature`: lowercase hex HMAC-SHA256 of `body` keyed with `secret`.
pub fn x_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`.
///
/// Standard Webhooks verifiers decode a `whsec_`-prefixed base64 secret; ours are Medplum's plain
/// strings, so the key is the secret's UTF-8 bytes (README shows receivers how to configure theirs).
pub fn webhook_signature(secret: &str, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn x_signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            x_signature("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn webhook_signature_covers_id_timestamp_and_body() {
        let expected = {
            let mut mac = HmacSha256::new_from_slice(b"s3cret").unwrap();
            mac.update(b"msg_1.1700000000.{}");
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        };
        assert_eq!(
            webhook_signature("s3cret", "msg_1", 1_700_000_000, b"{}"),
            expected
        );
        assert_ne!(
            webhook_signature("s3cret", "msg_2", 1_700_000_000, b"{}"),
            expected
        );
        assert_ne!(
            webhook_signature("s3cret", "msg_1", 1_700_000_001, b"{}"),
            expected
        );
    }

    /// The worked example of README.md ("Verifying notifications"): keep the two in step.
    #[test]
    fn readme_worked_example() {
        let body = br#"{"resourceType":"Patient","id":"p1"}"#;
        assert_eq!(
            x_signature("whsec-demo-secret", body),
            "82bf63184f6471ecbd0951ded5619a25dd579dfbab7f66eb93299c03983c91ff"
        );
        assert_eq!(
            webhook_signature(
                "whsec-demo-secret",
                "5f1b3c9e-3d7a-4a51-9a8e-2f8c6d0b7e41",
                1_763_800_000,
                body
            ),
            "v1,5Vwi1zv68otZBMtmH3GWoYHlJko3wxgEiPwJP+q++eo="
        );
        let readme = include_str!("../../README.md");
        for value in [
            "82bf63184f6471ecbd0951ded5619a25dd579dfbab7f66eb93299c03983c91ff",
            "v1,5Vwi1zv68otZBMtmH3GWoYHlJko3wxgEiPwJP+q++eo=",
        ] {
            assert!(readme.contains(value), "README.md shows {value}");
        }
    }

    #[test]
    fn the_secret_comes_from_any_of_the_three_urls_in_order() {
        let with =
            |url: &str, value: &str| json!({ "extension": [{ "url": url, "valueString": value }] });
        assert_eq!(secret(&with(extension::SECRET, "a")), Some("a"));
        assert_eq!(secret(&with(extension::SECRET_LEGACY, "b")), Some("b"));
        assert_eq!(secret(&with(extension::SECRET_NO_WWW, "c")), Some("c"));
        assert_eq!(secret(&with(extension::SECRET, "")), None);
        assert_eq!(secret(&json!({})), None);
        let both = json!({ "extension": [
            { "url": extension::SECRET_NO_WWW, "valueString": "late" },
            { "url": extension::SECRET, "valueString": "first" }
        ] });
        assert_eq!(secret(&both), Some("first"));
    }
}
