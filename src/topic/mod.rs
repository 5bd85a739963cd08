//! Topic-based subscriptions: FHIR R5 `SubscriptionTopic`s and topic-based `Subscription`s as the
//! Subscriptions R5 Backport IG (`hl7.fhir.uv.subscriptions-backport`) carries them in FHIR R4.
//! Pure functions on JSON: no database, no HTTP.
//!
//! A **topic** says which changes are worth a notification: for each resource type it triggers on,
//! the interactions (create, update, delete), search criteria on the version before and the
//! version after the change, and a FHIRPath expression over both; and which search parameters a
//! subscriber may narrow it with (`canFilterBy`). A **subscription** names one topic by its
//! canonical URL in `Subscription.criteria`, narrows it with filters, and chooses how much of the
//! resource a notification carries (`empty`, `id-only`, `full-resource`). A **notification** is a
//! `history` Bundle whose first entry is a `Parameters` holding what R5 calls a
//! `SubscriptionStatus`.
//!
//! R4 has no `SubscriptionTopic` resource. The IG represents one as a `Basic` whose
//! `code.coding` is `http://hl7.org/fhir/fhir-types|SubscriptionTopic` and whose elements are
//! cross-version extensions (`http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.<element>`,
//! or the `4.3` spelling; the IG's own example mixes both); `status` is a modifier extension.
//! Subscriptions keep R4's `Subscription` with the IG's extensions (the `backport-subscription`
//! profile), and notifications follow the R4 profiles `backport-subscription-notification-r4` and
//! `backport-subscription-status-r4`.
//!
//! - [`definition`]: reading a topic ([`Topic::parse`]) and deciding whether a change triggers it
//!   ([`Topic::evaluate`]).
//! - [`backport`]: reading a backport subscription ([`BackportSubscription::parse`]), checking its
//!   filters against its topic and applying them.
//! - [`notification`]: building notification bundles and status `Parameters`, and checking a bundle
//!   against the R4 profiles ([`profile_problems`]).
//!
//! Whatever of a topic or subscription we do not implement is refused by name (the parse functions
//! return those messages beside what they read), never silently dropped: a notification narrower
//! or wider than the author asked for would look like it works.

pub mod backport;
pub mod definition;
pub mod notification;

pub use backport::{BackportSubscription, PayloadContent, is_backport_subscription};
pub use definition::{
    FilterDefinition, QueryCriteria, ResourceTrigger, TestResult, Topic, TriggerError,
    is_topic_resource, topic_url,
};
pub use notification::{
    NotificationEvent, NotificationType, SubscriptionStatus, notification_bundle, profile_problems,
    profile_problems_for, status_parameters,
};

use serde_json::Value;

/// The nested extensions of an extension (`extension[].extension`), or of any element.
fn sub_extensions(element: &Value) -> impl Iterator<Item = &Value> {
    element
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// An extension's `url`, or `""` (an extension without one is matched by nothing).
fn extension_url(extension: &Value) -> &str {
    extension.get("url").and_then(Value::as_str).unwrap_or("")
}

/// A fixture ported from the IG (tests/fixtures/backport/README.md).
#[cfg(test)]
fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/backport/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{path}: {error}"))
}
