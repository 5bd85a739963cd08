//! The request headers of a notification (docs/medplum-rest-hook.md §1.7), plus the Standard Webhooks headers.

use crate::capture::Interaction;
use regex::Regex;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use std::sync::LazyLock;

/// A `channel.header` entry that cannot be sent. The delivery fails at once with this reason: no
/// request, no retry (retrying cannot fix the subscription).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// No `:` in the entry.
    #[error("channel.header entry #{index} has no `:` (expected `Name: value`)")]
    NoColon {
        /// Position in `channel.header` (from 0).
        index: usize,
    },
    /// The name is not an HTTP header name.
    #[error("channel.header entry #{index} has an invalid header name `{name}`")]
    InvalidName {
        /// Position in `channel.header`.
        index: usize,
        /// The name (the value is not repeated: it may be a credential).
        name: String,
    },
    /// The value contains CR, LF or another byte a header value cannot hold.
    #[error(
        "channel.header entry #{index} (`{name}`) has a value with CR, LF or other control characters"
    )]
    InvalidValue {
        /// Position in `channel.header`.
        index: usize,
        /// The header name.
        name: String,
    },
    /// An entry that is not a string.
    #[error("channel.header entry #{index} is not a string")]
    NotAString {
        /// Position in `channel.header`.
        index: usize,
    },
}

/// The subscription's `channel.header` entries as (name, value), split at the **first** colon and
/// trimmed. Medplum splits at every colon and drops everything after the second one (so
/// `X-Url: https://a` became `https`); we keep the whole value on purpose.
pub fn custom_headers(subscription: &Value) -> Result<Vec<(HeaderName, HeaderValue)>, HeaderError> {
    let entries = subscription
        .pointer("/channel/header")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut headers = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let entry = entry.as_str().ok_or(HeaderError::NotAString { index })?;
        let (name, value) = entry
            .split_once(':')
            .ok_or(HeaderError::NoColon { index })?;
        let name = name.trim();
        let header_name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| HeaderError::InvalidName {
                index,
                name: name.chars().take(100).collect(),
            })?;
        let header_value =
            HeaderValue::from_str(value.trim()).map_err(|_| HeaderError::InvalidValue {
                index,
                name: name.to_owned(),
            })?;
        headers.push((header_name, header_value));
    }
    Ok(headers)
}

static TRACEPARENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^([0-9a-f]{2}-)?[0-9a-f]{32}-[0-9a-f]{16}(-[0-9a-f]{1,2})?$")
        .expect("valid regex")
});

/// Everything needed to build the header set of one request.
pub struct RequestHeaders<'a> {
    /// The Subscription's id.
    pub subscription_id: &'a str,
    /// The change's interaction.
    pub interaction: Interaction,
    /// `Type/id`, for deletes.
    pub deleted_resource: Option<&'a str>,
    /// The subscription's `channel.header` entries, already validated.
    pub custom: &'a [(HeaderName, HeaderValue)],
    /// The write's trace id (a UUID or a W3C traceparent).
    pub trace_id: &'a str,
    /// The delivery's stable id (`webhook-id`).
    pub webhook_id: &'a str,
    /// Seconds since the epoch (`webhook-timestamp`).
    pub timestamp: i64,
    /// The HMAC secret, if the subscription has one.
    pub secret: Option<&'a str>,
    /// The exact body bytes.
    pub body: &'a [u8],
}

/// Builds the header map, assigning in Medplum's order so later entries win: the standard
/// `X-Medplum-*` headers, then the custom ones (which may overwrite them), then the signatures and
/// tracing headers (which custom headers cannot forge).
pub fn build(request: &RequestHeaders<'_>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set("content-type", "application/fhir+json");
    set("x-medplum-subscription", request.subscription_id);
    set("x-medplum-interaction", request.interaction.as_str());
    if let Some(deleted) = request.deleted_resource {
        set("x-medplum-deleted-resource", deleted);
    }
    for (name, value) in request.custom {
        headers.insert(name.clone(), value.clone());
    }
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set("x-trace-id", request.trace_id);
    if TRACEPARENT.is_match(request.trace_id) {
        set("traceparent", request.trace_id);
    }
    set("webhook-id", request.webhook_id);
    set("webhook-timestamp", &request.timestamp.to_string());
    if let Some(secret) = request.secret {
        set(
            "x-signature",
            &super::signature::x_signature(secret, request.body),
        );
        set(
            "webhook-signature",
            &super::signature::webhook_signature(
                secret,
                request.webhook_id,
                request.timestamp,
                request.body,
            ),
        );
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn channel(headers: Value) -> Value {
        json!({ "channel": { "type": "rest-hook", "endpoint": "https://x", "header": headers } })
    }

    #[test]
    fn headers_split_at_the_first_colon() {
        let parsed = custom_headers(&channel(json!([
            "Authorization: Basic xyz",
            "X-Url: https://a:8443/p"
        ])))
        .unwrap();
        assert_eq!(parsed[0].0, "authorization");
        assert_eq!(parsed[0].1, "Basic xyz");
        assert_eq!(parsed[1].1, "https://a:8443/p");
    }

    #[test]
    fn bad_header_entries_are_named() {
        assert_eq!(
            custom_headers(&channel(json!(["NoColon"]))),
            Err(HeaderError::NoColon { index: 0 })
        );
        assert!(matches!(
            custom_headers(&channel(json!(["ok: 1", "Bad Name: x"]))),
            Err(HeaderError::InvalidName { index: 1, .. })
        ));
        assert!(matches!(
            custom_headers(&channel(json!(["X-A: a\r\nInjected: 1"]))),
            Err(HeaderError::InvalidValue { index: 0, .. })
        ));
        assert_eq!(
            custom_headers(&channel(json!([1]))),
            Err(HeaderError::NotAString { index: 0 })
        );
        assert_eq!(custom_headers(&json!({})), Ok(vec![]));
    }

    #[test]
    fn the_header_set_is_exactly_the_expected_one() {
        let custom = custom_headers(&channel(json!([
            "Authorization: Basic xyz",
            "X-Signature: forged"
        ])))
        .unwrap();
        let request = RequestHeaders {
            subscription_id: "sub1",
            interaction: Interaction::Create,
            deleted_resource: None,
            custom: &custom,
            trace_id: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            webhook_id: "11111111-2222-3333-4444-555555555555",
            timestamp: 1_700_000_000,
            secret: Some("s"),
            body: b"{}",
        };
        let headers = build(&request);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "authorization",
                "content-type",
                "traceparent",
                "webhook-id",
                "webhook-signature",
                "webhook-timestamp",
                "x-medplum-interaction",
                "x-medplum-subscription",
                "x-signature",
                "x-trace-id"
            ]
        );
        assert_eq!(
            headers["x-signature"],
            super::super::signature::x_signature("s", b"{}").as_str()
        );
        // A plain UUID trace id gives only x-trace-id.
        let uuid_trace = RequestHeaders {
            trace_id: "4bf92f35-77b3-4da6-a3ce-929d0e0e4736",
            secret: None,
            ..request
        };
        let headers = build(&uuid_trace);
        assert!(headers.get("traceparent").is_none());
        // Without a secret nothing is signed; a custom X-Signature passes through, as in Medplum.
        assert!(headers.get("webhook-signature").is_none());
        assert_eq!(headers["x-signature"], "forged");
        assert_eq!(
            headers["x-trace-id"],
            "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
        );
    }
}
