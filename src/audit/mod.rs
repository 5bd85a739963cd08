//! Audit: the AuditEvents fhir-outbox records, built exactly as Medplum's `auditevent.ts` builds them
//! (docs/medplum-rest-hook.md §1.10), so tools that read Medplum's AuditEvents read ours. [`application`] is the same for
//! the login, logout and REST events of applications sharing the store.

pub mod application;

pub mod bot;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// Extension carrying the request and trace ids of the write that caused the event.
pub const TRACING_EXTENSION: &str = "https://medplum.com/fhir/StructureDefinition/tracing";

/// AuditEvent.outcome codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `0`
    Success,
    /// `4`: a failed attempt.
    MinorFailure,
    /// `8`: used when a subscription is disabled automatically.
    SeriousFailure,
    /// `12`
    MajorFailure,
}

impl Outcome {
    /// The code.
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
            Outcome::MajorFailure => "12",
        }
    }
}

/// Where a subscription's AuditEvents go (extension `subscription-audit-event-destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destinations {
    /// Stored as AuditEvent resources.
    pub resource: bool,
    /// Written as one JSON log line.
    pub log: bool,
}

/// The destinations a subscription asks for; none means `resource` only.
pub fn destinations(subscription: &Value) -> Destinations {
    let codes: Vec<&str> = crate::subscription::extensions(
        subscription,
        crate::subscription::extension::AUDIT_EVENT_DESTINATION,
    )
    .filter_map(|extension| extension.get("valueCode").and_then(Value::as_str))
    .collect();
    if codes.is_empty() {
        return Destinations {
            resource: true,
            log: false,
        };
    }
    Destinations {
        resource: codes.contains(&"resource"),
        log: codes.contains(&"log"),
    }
}

/// A human display for a resource, as Medplum's `getDisplayString` gives for the common cases: a
/// HumanName (`given family`), a `name` string, or `code.text`.
pub fn display(resource: &Value) -> Option<String> {
    match resource.get("name") {
        Some(Value::String(name)) => return Some(name.clone()),
        Some(Value::Array(names)) => {
            if let Some(name) = names.first() {
                if let Some(text) = name.get("text").and_then(Value::as_str) {
                    return Some(text.to_owned());
                }
                let mut parts: Vec<&str> = name
                    .get("given")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if let Some(family) = name.get("family").and_then(Value::as_str) {
                    parts.push(family);
                }
                if !parts.is_empty() {
                    return Some(parts.join(" "));
                }
            }
        }
        _ => {}
    }
    resource
        .pointer("/code/text")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// A Reference to a resource, with its display unless redacted.
pub fn reference(resource_type: &str, id: &str, display: Option<String>, redact: bool) -> Value {
    let mut reference = Map::new();
    reference.insert("reference".into(), json!(format!("{resource_type}/{id}")));
    if let (Some(display), false) = (display, redact) {
        reference.insert("display".into(), json!(display));
    }
    Value::Object(reference)
}

/// The entity role Medplum gives a resource type.
pub fn entity_role(resource_type: &str) -> Value {
    match resource_type {
        "Patient" => json!({ "code": "1", "display": "Patient" }),
        "Subscription" => json!({ "code": "9", "display": "Subscriber" }),
        _ => json!({ "code": "4", "display": "Domain" }),
    }
}

/// The tracing extension.
pub fn tracing_extension(request_id: &str, trace_id: &str) -> Value {
    json!({
        "url": TRACING_EXTENSION,
        "extension": [
            { "url": "requestId", "valueId": request_id },
            { "url": "traceId", "valueId": trace_id }
        ]
    })
}

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One delivery attempt, as the transmit AuditEvent describes it.
pub struct TransmitAttempt<'a> {
    /// The Subscription (current version).
    pub subscription: &'a Value,
    /// The triggering resource's type and id.
    pub resource_type: &'a str,
    /// The triggering resource's id.
    pub resource_id: &'a str,
    /// Its display, when known.
    pub resource_display: Option<String>,
    /// `period.start`: when the change was made.
    pub started: DateTime<Utc>,
    /// `period.end` and `recorded`.
    pub ended: DateTime<Utc>,
    /// Success or minor failure.
    pub outcome: Outcome,
    /// `Attempt <n> received status <s>` or `Attempt <n> received error <e>`.
    pub outcome_desc: String,
    /// Of the write.
    pub request_id: &'a str,
    /// Of the write.
    pub trace_id: &'a str,
    /// Strip displays from references (server or project setting).
    pub redact: bool,
}

/// The `transmit` AuditEvent of one rest-hook attempt. `meta.project` is set by the store (the
/// subscription's project); `meta.account(s)` are copied from the subscription.
pub fn transmit_event(attempt: &TransmitAttempt<'_>) -> Value {
    let subscription_id = attempt
        .subscription
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let subscription_ref = reference(
        "Subscription",
        subscription_id,
        display(attempt.subscription),
        attempt.redact,
    );
    let mut meta = Map::new();
    for key in ["account", "accounts"] {
        if let Some(value) = attempt.subscription.pointer(&format!("/meta/{key}")) {
            meta.insert(key.into(), value.clone());
        }
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "period": { "start": instant(attempt.started), "end": instant(attempt.ended) },
        "recorded": instant(attempt.ended),
        "type": { "code": "transmit" },
        "agent": [{ "type": { "text": "Subscription" }, "requestor": false }],
        "source": { "observer": subscription_ref.clone() },
        "entity": [
            {
                "what": reference(attempt.resource_type, attempt.resource_id, attempt.resource_display.clone(), attempt.redact),
                "role": entity_role(attempt.resource_type)
            },
            { "what": subscription_ref, "role": entity_role("Subscription") }
        ],
        "outcome": attempt.outcome.code(),
        "outcomeDesc": attempt.outcome_desc,
        "extension": [tracing_extension(attempt.request_id, attempt.trace_id)]
    });
    if !meta.is_empty() {
        event["meta"] = Value::Object(meta);
    }
    event
}

/// The AuditEvent recorded when a subscription is disabled automatically: outcome 8, about the
/// subscription.
pub fn disable_event(
    subscription: &Value,
    message: &str,
    at: DateTime<Utc>,
    context: &crate::capture::WriteContext,
) -> Value {
    let id = subscription
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let subscription_ref = reference("Subscription", id, None, true);
    let mut event = json!({
        "resourceType": "AuditEvent",
        "period": { "start": instant(at), "end": instant(at) },
        "recorded": instant(at),
        "type": { "code": "transmit" },
        "agent": [{ "type": { "text": "Subscription" }, "requestor": false }],
        "source": { "observer": subscription_ref.clone() },
        "entity": [{ "what": subscription_ref, "role": entity_role("Subscription") }],
        "outcome": Outcome::SeriousFailure.code(),
        "outcomeDesc": message
    });
    if let (Some(request), Some(trace)) = (&context.request_id, &context.trace_id) {
        event["extension"] = json!([tracing_extension(request, trace)]);
    }
    event
}

/// Who performed an operator action, as its AuditEvent names them.
pub struct OperatorAgent<'a> {
    /// The name shown (a console token's name, or the command line's user).
    pub name: &'a str,
    /// A console token's id, when the action came through the console or its API.
    pub token_id: Option<uuid::Uuid>,
    /// `viewer` or `operator` (tokens), or `command line`.
    pub role: &'a str,
}

/// The AuditEvent of an operator action (retry, replay, cancel, pause, …): type `rest`, a subtype
/// naming the action, the operator as requesting agent, the subscription, resource or delivery acted
/// on as entities, and what it did as `outcomeDesc`.
pub fn operator_action_event(
    action: &str,
    agent: &OperatorAgent<'_>,
    entities: Vec<Value>,
    summary: &str,
    at: DateTime<Utc>,
) -> Value {
    let mut who = json!({ "display": agent.name });
    if let Some(token) = agent.token_id {
        who["identifier"] = json!({ "system": CONSOLE_TOKEN_SYSTEM, "value": token.to_string() });
    }
    json!({
        "resourceType": "AuditEvent",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation"
        },
        "subtype": [{ "system": OPERATOR_ACTION_SYSTEM, "code": action }],
        "action": "E",
        "period": { "start": instant(at), "end": instant(at) },
        "recorded": instant(at),
        "outcome": Outcome::Success.code(),
        "outcomeDesc": summary,
        "agent": [{ "type": { "text": agent.role }, "who": who, "requestor": true }],
        "source": { "observer": { "display": "fhir-outbox operations" } },
        "entity": entities
    })
}

/// The code system of operator actions in AuditEvent `subtype`.
pub const OPERATOR_ACTION_SYSTEM: &str = "https://fhir-outbox.dev/operator-action";
/// The identifier system of console tokens in AuditEvent `agent.who`.
pub const CONSOLE_TOKEN_SYSTEM: &str = "https://fhir-outbox.dev/console-token";
/// The identifier system of deliveries (their `delivery.id`) in AuditEvent `entity.what`.
pub const DELIVERY_SYSTEM: &str = "https://fhir-outbox.dev/delivery";

/// An AuditEvent as `fhir_outbox.audit_event` stores it: what `fhir_outbox.create_audit_events`
/// (migration 20261203000001) would store for the same event and time, made here so that the worker
/// writes its AuditEvents with a plain insert. That function checks each event and then strips,
/// stamps and names it in SQL, which cost PostgreSQL more than the insert itself (about 55 µs of
/// 65 per event); the worker's own events need no checking, so the same rules run here. Both
/// places follow `create_resource`'s: a change to one is a change to the other, and the integration
/// test `audit_library::the_worker_stores_audit_events_as_create_audit_events_does` compares them.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAuditEvent {
    /// A UUIDv7 of `recorded_at`, as `fhir_outbox.uuid_v7` makes them.
    pub id: String,
    /// Its `meta.lastUpdated`; the history partition it is stored in.
    pub recorded_at: DateTime<Utc>,
    /// The resource: without null or empty elements (as `jsonb_strip_nulls` and
    /// `fhir_outbox.strip_empty` leave it), with its `id` and its `meta` stamped as
    /// `fhir_outbox.stamped` stamps version 1.
    pub content: Value,
}

impl StoredAuditEvent {
    /// The stored form of `event`, written in `project` at `recorded_at`.
    pub fn new(mut event: Value, project: uuid::Uuid, recorded_at: DateTime<Utc>) -> Self {
        strip_empty(&mut event);
        let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            recorded_at.timestamp().max(0) as u64,
            recorded_at.timestamp_subsec_nanos(),
        ))
        .to_string();
        if let Value::Object(members) = &mut event {
            members.insert("id".to_owned(), Value::String(id.clone()));
            let mut meta = match members.remove("meta") {
                Some(Value::Object(meta)) => meta,
                _ => Map::new(),
            };
            meta.remove("author");
            meta.insert("versionId".to_owned(), json!("1"));
            meta.insert("lastUpdated".to_owned(), json!(instant(recorded_at)));
            meta.insert("project".to_owned(), json!(project.to_string()));
            members.insert("meta".to_owned(), Value::Object(meta));
        }
        StoredAuditEvent {
            id,
            recorded_at,
            content: event,
        }
    }
}

/// Removes, at any depth, the members of objects that are null, `""`, `{}` or `[]` once their own
/// members are removed (FHIR has no empty elements); array items are kept, as
/// `fhir_outbox.strip_empty` keeps them.
fn strip_empty(value: &mut Value) {
    match value {
        Value::Object(members) => members.retain(|_, member| {
            strip_empty(member);
            !matches!(member, Value::Null)
                && member.as_str() != Some("")
                && member.as_array().is_none_or(|items| !items.is_empty())
                && member.as_object().is_none_or(|inner| !inner.is_empty())
        }),
        Value::Array(items) => items.iter_mut().for_each(strip_empty),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_event_has_medplums_shape() {
        let subscription = json!({ "resourceType": "Subscription", "id": "s1",
            "meta": { "account": { "reference": "Organization/o" } } });
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let attempt = TransmitAttempt {
            subscription: &subscription,
            resource_type: "Patient",
            resource_id: "p1",
            resource_display: Some("Peter Chalmers".into()),
            started: at,
            ended: at,
            outcome: Outcome::Success,
            outcome_desc: "Attempt 0 received status 200".into(),
            request_id: "r",
            trace_id: "t",
            redact: false,
        };
        let event = transmit_event(&attempt);
        assert_eq!(event["type"], json!({ "code": "transmit" }));
        assert_eq!(event["outcome"], "0");
        assert_eq!(event["source"]["observer"]["reference"], "Subscription/s1");
        assert_eq!(event["entity"][0]["what"]["display"], "Peter Chalmers");
        assert_eq!(event["entity"][0]["role"]["code"], "1");
        assert_eq!(event["entity"][1]["role"]["code"], "9");
        assert_eq!(event["meta"]["account"]["reference"], "Organization/o");
        assert_eq!(event["period"]["start"], "2026-01-01T00:00:00.000Z");
        assert_eq!(event["extension"][0]["extension"][1]["valueId"], "t");
        let redacted = transmit_event(&TransmitAttempt {
            redact: true,
            ..attempt
        });
        assert!(redacted["entity"][0]["what"].get("display").is_none());
    }

    #[test]
    fn destinations_default_to_resource() {
        let url = crate::subscription::extension::AUDIT_EVENT_DESTINATION;
        assert_eq!(
            destinations(&json!({})),
            Destinations {
                resource: true,
                log: false
            }
        );
        let both = json!({ "extension": [{ "url": url, "valueCode": "log" }, { "url": url, "valueCode": "resource" }] });
        assert_eq!(
            destinations(&both),
            Destinations {
                resource: true,
                log: true
            }
        );
        let log = json!({ "extension": [{ "url": url, "valueCode": "log" }] });
        assert_eq!(
            destinations(&log),
            Destinations {
                resource: false,
                log: true
            }
        );
    }
}
