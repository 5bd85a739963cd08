//! The FHIR R4 Subscription resource as fhir-outbox reads it: status, channel, criteria, and Medplum's
//! extensions. Dispatch and delivery both read subscriptions through this module, so an extension URL
//! is spelled in one place.

use serde_json::Value;

/// Extension URLs (Medplum's, so existing subscriptions work unchanged).
pub mod extension {
    /// `valueString`: a FHIRPath expression that must evaluate to a single `true`.
    pub const FHIRPATH_CRITERIA: &str =
        "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression";
    /// `valueCode` (repeatable): `create`, `update` or `delete`; none means all three.
    pub const SUPPORTED_INTERACTION: &str =
        "https://medplum.com/fhir/StructureDefinition/subscription-supported-interaction";
    /// `valueBoolean`: a synchronous pre-commit subscription, ignored by the asynchronous worker.
    pub const PRE_COMMIT: &str = "https://medplum.com/fhir/StructureDefinition/pre-commit-bot";
    /// `valueString`: the HMAC secret (note the `www`).
    pub const SECRET: &str = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret";
    /// `valueString`: the legacy spelling of the secret extension.
    pub const SECRET_LEGACY: &str =
        "https://www.medplum.com/fhir/StructureDefinition-subscriptionSecret";
    /// `valueString`: the non-`www` spelling that third-party IGs declare.
    pub const SECRET_NO_WWW: &str =
        "https://medplum.com/fhir/StructureDefinition/subscription-secret";
    /// `valueInteger`: total HTTP attempts.
    pub const MAX_ATTEMPTS: &str =
        "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts";
    /// `valueString`: success status codes and ranges, e.g. `200,201,410-600`.
    pub const SUCCESS_CODES: &str =
        "https://medplum.com/fhir/StructureDefinition/subscription-success-codes";
    /// `valueCode` (repeatable): `resource` or `log`.
    pub const AUDIT_EVENT_DESTINATION: &str =
        "https://medplum.com/fhir/StructureDefinition/subscription-audit-event-destination";
}

/// The top-level extensions of `resource` with this URL (never those in `meta.extension`: Medplum
/// ignores those too, see its issue #6704).
pub fn extensions<'a>(resource: &'a Value, url: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    resource
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |extension| extension.get("url").and_then(Value::as_str) == Some(url))
}

/// The first extension with this URL, its `value<type>` member (e.g. `valueString`).
pub fn extension_value<'a>(
    resource: &'a Value,
    url: &'a str,
    value_member: &str,
) -> Option<&'a Value> {
    extensions(resource, url).find_map(|extension| extension.get(value_member))
}

/// `status`.
pub fn status(subscription: &Value) -> &str {
    subscription
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `channel.type`.
pub fn channel_type(subscription: &Value) -> &str {
    subscription
        .pointer("/channel/type")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `channel.endpoint`, when present and not blank.
pub fn endpoint(subscription: &Value) -> Option<&str> {
    subscription
        .pointer("/channel/endpoint")
        .and_then(Value::as_str)
        .filter(|endpoint| !endpoint.trim().is_empty())
}

/// The account references of a resource: the union of `meta.account` and `meta.accounts`.
pub fn accounts(resource: &Value) -> Vec<&str> {
    let single = resource.pointer("/meta/account");
    let many = resource
        .pointer("/meta/accounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let mut accounts: Vec<&str> = single
        .into_iter()
        .chain(many)
        .filter_map(|account| account.get("reference").and_then(Value::as_str))
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    accounts
}
