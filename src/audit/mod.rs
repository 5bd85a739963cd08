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
    display_of_members(resource.get("name"), resource.get("code"))
}

/// [`display`] of a resource given as compact JSON text, decoding its `name` and `code` alone (the
/// worker sends the text as it is stored and never decodes the rest).
pub fn display_of_json(resource: &crate::fhir::CompactJson) -> Option<String> {
    let member = |key| {
        resource
            .member(key)
            .and_then(|text| serde_json::from_slice::<Value>(text).ok())
    };
    display_of_members(member("name").as_ref(), member("code").as_ref())
}

/// [`display`] from a resource's `name` and `code`.
fn display_of_members(name: Option<&Value>, code: Option<&Value>) -> Option<String> {
    match name {
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
    code?.get("text").and_then(Value::as_str).map(str::to_owned)
}

/// A Reference to a resource, with its display unless redacted.
pub fn reference(resource_type: &str, id: &str, display: Option<String>, redact: bool) -> Value {
    serde_json::to_value(EventReference {
        reference: format!("{resource_type}/{id}").into(),
        display: display.as_deref().filter(|_| !redact),
    })
    .expect("a reference serializes")
}

/// The entity role Medplum gives a resource type.
pub fn entity_role(resource_type: &str) -> Value {
    serde_json::to_value(EntityRole::of(resource_type)).expect("a role serializes")
}

/// The tracing extension.
pub fn tracing_extension(request_id: &str, trace_id: &str) -> Value {
    serde_json::to_value(TracingExtension::new(request_id, trace_id))
        .expect("an extension serializes")
}

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// What the `transmit` AuditEvents of a subscription take from it: read once per subscription and
/// batch, not once per attempt.
#[derive(Debug)]
pub struct TransmitSubscription {
    /// `Subscription/<id>`.
    reference: String,
    /// Its display, unless redacted.
    display: Option<String>,
    /// `meta.account`, without empty elements.
    account: Option<Value>,
    /// `meta.accounts`, without empty elements.
    accounts: Option<Value>,
}

impl TransmitSubscription {
    /// Reads `subscription` (redacting its display when `redact`).
    pub fn new(subscription: &Value, redact: bool) -> Self {
        let id = subscription
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let meta = |key: &str| {
            let mut value = subscription.get("meta")?.get(key)?.clone();
            strip_empty(&mut value);
            (!is_empty(&value)).then_some(value)
        };
        TransmitSubscription {
            reference: format!("Subscription/{id}"),
            display: display(subscription).filter(|display| !redact && !display.is_empty()),
            account: meta("account"),
            accounts: meta("accounts"),
        }
    }
}

/// One delivery attempt, as the transmit AuditEvent describes it.
pub struct TransmitAttempt<'a> {
    /// The Subscription (current version), as its events name it.
    pub subscription: &'a TransmitSubscription,
    /// The triggering resource's type and id.
    pub resource_type: &'a str,
    /// The triggering resource's id.
    pub resource_id: &'a str,
    /// Its display, when known.
    pub resource_display: Option<&'a str>,
    /// `period.start`: when the change was made.
    pub started: DateTime<Utc>,
    /// `period.end` and `recorded`.
    pub ended: DateTime<Utc>,
    /// Success or minor failure.
    pub outcome: Outcome,
    /// `Attempt <n> received status <s>` or `Attempt <n> received error <e>`.
    pub outcome_desc: &'a str,
    /// Of the write.
    pub request_id: &'a str,
    /// Of the write.
    pub trace_id: &'a str,
    /// Strip displays from references (server or project setting).
    pub redact: bool,
}

/// The `transmit` AuditEvent of one rest-hook attempt, as JSON text: `meta.account(s)` are copied
/// from the subscription; `meta.project` is the store's (see [`StoredAuditEvent::transmit`]).
/// Typed rather than a `serde_json::Value`: the worker makes one per attempt, and building and
/// dropping that tree cost it about a sixth of its CPU (docs/performance-history.md). It has no
/// null or empty element, as stored AuditEvents have none.
pub fn transmit_event(attempt: &TransmitAttempt<'_>) -> String {
    TransmitEvent::new(attempt, None).to_json()
}

/// The shape of a transmit AuditEvent (Medplum's), with the stored form's id and `meta` stamps.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TransmitEvent<'a> {
    resource_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "EventMeta::is_empty")]
    meta: EventMeta<'a>,
    period: Period,
    recorded: String,
    #[serde(rename = "type")]
    kind: Code,
    agent: [SubscriptionAgent; 1],
    source: Source<'a>,
    entity: [Entity<'a>; 2],
    outcome: &'static str,
    outcome_desc: &'a str,
    extension: [TracingExtension<'a>; 1],
}

/// The stamps of a stored AuditEvent (`fhir_outbox.stamped`'s for version 1).
struct Stamps<'a> {
    id: &'a str,
    last_updated: String,
    project: String,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct EventMeta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accounts: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_id: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_updated: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<String>,
}

impl EventMeta<'_> {
    fn is_empty(&self) -> bool {
        self.account.is_none() && self.accounts.is_none() && self.version_id.is_none()
    }
}

#[derive(serde::Serialize)]
struct Period {
    start: String,
    end: String,
}

#[derive(serde::Serialize)]
struct Code {
    code: &'static str,
}

#[derive(serde::Serialize)]
struct SubscriptionAgent {
    #[serde(rename = "type")]
    kind: AgentType,
    requestor: bool,
}

#[derive(serde::Serialize)]
struct AgentType {
    text: &'static str,
}

#[derive(serde::Serialize)]
struct Source<'a> {
    observer: EventReference<'a>,
}

#[derive(serde::Serialize)]
struct Entity<'a> {
    what: EventReference<'a>,
    role: EntityRole,
}

#[derive(serde::Serialize)]
struct EventReference<'a> {
    reference: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct EntityRole {
    code: &'static str,
    display: &'static str,
}

impl EntityRole {
    fn of(resource_type: &str) -> Self {
        let (code, display) = match resource_type {
            "Patient" => ("1", "Patient"),
            "Subscription" => ("9", "Subscriber"),
            _ => ("4", "Domain"),
        };
        EntityRole { code, display }
    }
}

#[derive(serde::Serialize)]
struct TracingExtension<'a> {
    url: &'static str,
    extension: [IdExtension<'a>; 2],
}

impl<'a> TracingExtension<'a> {
    fn new(request_id: &'a str, trace_id: &'a str) -> Self {
        TracingExtension {
            url: TRACING_EXTENSION,
            extension: [
                IdExtension {
                    url: "requestId",
                    value_id: request_id,
                },
                IdExtension {
                    url: "traceId",
                    value_id: trace_id,
                },
            ],
        }
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct IdExtension<'a> {
    url: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    value_id: &'a str,
}

impl<'a> TransmitEvent<'a> {
    fn new(attempt: &'a TransmitAttempt<'a>, stamps: Option<Stamps<'a>>) -> Self {
        let subscription = attempt.subscription;
        let subscription_ref = || EventReference {
            reference: subscription.reference.as_str().into(),
            display: subscription.display.as_deref(),
        };
        let (id, version_id, last_updated, project) = match stamps {
            Some(stamps) => (
                Some(stamps.id),
                Some("1"),
                Some(stamps.last_updated),
                Some(stamps.project),
            ),
            None => (None, None, None, None),
        };
        TransmitEvent {
            resource_type: "AuditEvent",
            id,
            meta: EventMeta {
                account: subscription.account.as_ref(),
                accounts: subscription.accounts.as_ref(),
                version_id,
                last_updated,
                project,
            },
            period: Period {
                start: instant(attempt.started),
                end: instant(attempt.ended),
            },
            recorded: instant(attempt.ended),
            kind: Code { code: "transmit" },
            agent: [SubscriptionAgent {
                kind: AgentType {
                    text: "Subscription",
                },
                requestor: false,
            }],
            source: Source {
                observer: subscription_ref(),
            },
            entity: [
                Entity {
                    what: EventReference {
                        reference: format!("{}/{}", attempt.resource_type, attempt.resource_id)
                            .into(),
                        display: attempt
                            .resource_display
                            .filter(|display| !attempt.redact && !display.is_empty()),
                    },
                    role: EntityRole::of(attempt.resource_type),
                },
                Entity {
                    what: subscription_ref(),
                    role: EntityRole::of("Subscription"),
                },
            ],
            outcome: attempt.outcome.code(),
            outcome_desc: attempt.outcome_desc,
            extension: [TracingExtension::new(attempt.request_id, attempt.trace_id)],
        }
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an AuditEvent serializes")
    }
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
    /// The resource as JSON text: without null or empty elements (as `jsonb_strip_nulls` and
    /// `fhir_outbox.strip_empty` leave it), with its `id` and its `meta` stamped as
    /// `fhir_outbox.stamped` stamps version 1.
    pub content: String,
}

impl StoredAuditEvent {
    /// The stored form of `event`, written in `project` at `recorded_at`.
    pub fn new(mut event: Value, project: uuid::Uuid, recorded_at: DateTime<Utc>) -> Self {
        strip_empty(&mut event);
        let id = uuid_v7(recorded_at);
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
            content: event.to_string(),
        }
    }

    /// The stored form of a transmit AuditEvent ([`transmit_event`]), as [`StoredAuditEvent::new`]
    /// would make it, without a JSON tree.
    pub fn transmit(
        attempt: &TransmitAttempt<'_>,
        project: uuid::Uuid,
        recorded_at: DateTime<Utc>,
    ) -> Self {
        let id = uuid_v7(recorded_at);
        let stamps = Stamps {
            id: &id,
            last_updated: instant(recorded_at),
            project: project.to_string(),
        };
        let content = TransmitEvent::new(attempt, Some(stamps)).to_json();
        StoredAuditEvent {
            id,
            recorded_at,
            content,
        }
    }
}

fn uuid_v7(at: DateTime<Utc>) -> String {
    uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        at.timestamp().max(0) as u64,
        at.timestamp_subsec_nanos(),
    ))
    .to_string()
}

/// Whether a member with this value is one that FHIR has not (null, `""`, `[]` or `{}`).
fn is_empty(value: &Value) -> bool {
    matches!(value, Value::Null)
        || value.as_str() == Some("")
        || value.as_array().is_some_and(Vec::is_empty)
        || value.as_object().is_some_and(Map::is_empty)
}

/// Removes, at any depth, the members of objects that are null, `""`, `{}` or `[]` once their own
/// members are removed (FHIR has no empty elements); array items are kept, as
/// `fhir_outbox.strip_empty` keeps them.
fn strip_empty(value: &mut Value) {
    match value {
        Value::Object(members) => members.retain(|_, member| {
            strip_empty(member);
            !is_empty(member)
        }),
        Value::Array(items) => items.iter_mut().for_each(strip_empty),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt_at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn transmit_event_has_medplums_shape() {
        let subscription = json!({ "resourceType": "Subscription", "id": "s1",
            "meta": { "account": { "reference": "Organization/o" } } });
        let at = attempt_at();
        let named = TransmitSubscription::new(&subscription, false);
        let attempt = TransmitAttempt {
            subscription: &named,
            resource_type: "Patient",
            resource_id: "p1",
            resource_display: Some("Peter Chalmers"),
            started: at,
            ended: at,
            outcome: Outcome::Success,
            outcome_desc: "Attempt 0 received status 200",
            request_id: "r",
            trace_id: "t",
            redact: false,
        };
        let event: Value = serde_json::from_str(&transmit_event(&attempt)).unwrap();
        assert_eq!(event["type"], json!({ "code": "transmit" }));
        assert_eq!(event["outcome"], "0");
        assert_eq!(event["source"]["observer"]["reference"], "Subscription/s1");
        assert_eq!(event["entity"][0]["what"]["reference"], "Patient/p1");
        assert_eq!(event["entity"][0]["what"]["display"], "Peter Chalmers");
        assert_eq!(event["entity"][0]["role"]["code"], "1");
        assert_eq!(event["entity"][1]["role"]["code"], "9");
        assert_eq!(
            event["meta"],
            json!({ "account": { "reference": "Organization/o" } })
        );
        assert_eq!(event["period"]["start"], "2026-01-01T00:00:00.000Z");
        assert_eq!(event["extension"][0]["extension"][1]["valueId"], "t");
        assert!(event.get("id").is_none(), "only the stored form has an id");
        let redacted_subscription = TransmitSubscription::new(&subscription, true);
        let redacted: Value = serde_json::from_str(&transmit_event(&TransmitAttempt {
            subscription: &redacted_subscription,
            redact: true,
            ..attempt
        }))
        .unwrap();
        assert!(redacted["entity"][0]["what"].get("display").is_none());
        assert!(redacted["source"]["observer"].get("display").is_none());
    }

    /// The typed transmit event, stored, is what the general rules (`StoredAuditEvent::new`, the
    /// same as `create_audit_events`') make of Medplum's event written out as JSON, empty elements
    /// included.
    #[test]
    fn a_stored_transmit_event_is_the_stored_form_of_medplums_event() {
        let subscription = json!({ "resourceType": "Subscription", "id": "s1", "name": "Feed",
            "meta": { "account": { "reference": "Organization/o", "display": "" },
                      "accounts": [], "author": { "reference": "Practitioner/a" } } });
        let named = TransmitSubscription::new(&subscription, false);
        let (started, ended) = (
            attempt_at(),
            attempt_at() + chrono::Duration::milliseconds(1500),
        );
        let project = uuid::Uuid::new_v4();
        for (display, request_id) in [(Some("Peter Chalmers"), "r"), (Some(""), ""), (None, "r")] {
            let attempt = TransmitAttempt {
                subscription: &named,
                resource_type: "Observation",
                resource_id: "o1",
                resource_display: display,
                started,
                ended,
                outcome: Outcome::MinorFailure,
                outcome_desc: "Attempt 2 received status 500",
                request_id,
                trace_id: "t",
                redact: false,
            };
            let medplums = json!({
                "resourceType": "AuditEvent",
                "meta": { "account": { "reference": "Organization/o", "display": "" }, "accounts": [] },
                "period": { "start": "2026-01-01T00:00:00.000Z", "end": "2026-01-01T00:00:01.500Z" },
                "recorded": "2026-01-01T00:00:01.500Z",
                "type": { "code": "transmit" },
                "agent": [{ "type": { "text": "Subscription" }, "requestor": false }],
                "source": { "observer": { "reference": "Subscription/s1", "display": "Feed" } },
                "entity": [
                    { "what": { "reference": "Observation/o1", "display": display },
                      "role": { "code": "4", "display": "Domain" } },
                    { "what": { "reference": "Subscription/s1", "display": "Feed" },
                      "role": { "code": "9", "display": "Subscriber" } }
                ],
                "outcome": "4",
                "outcomeDesc": "Attempt 2 received status 500",
                "extension": [{ "url": TRACING_EXTENSION, "extension": [
                    { "url": "requestId", "valueId": request_id },
                    { "url": "traceId", "valueId": "t" }
                ] }]
            });
            let typed = StoredAuditEvent::transmit(&attempt, project, ended);
            let general = StoredAuditEvent::new(medplums, project, ended);
            let mut typed_content: Value = serde_json::from_str(&typed.content).unwrap();
            let mut general_content: Value = serde_json::from_str(&general.content).unwrap();
            assert_eq!(typed_content["id"], typed.id.as_str());
            assert_eq!(
                typed.id[..13],
                general.id[..13],
                "UUIDv7 of the same millisecond"
            );
            typed_content["id"] = Value::Null;
            general_content["id"] = Value::Null;
            assert_eq!(typed_content, general_content, "display {display:?}");
        }
    }

    #[test]
    fn the_display_of_json_text_is_the_display_of_the_resource() {
        for resource in [
            json!({ "resourceType": "Patient", "name": [{ "given": ["Peter", "James"], "family": "Chalmers" }] }),
            json!({ "resourceType": "Patient", "name": [{ "text": "Dr. Who", "family": "Who" }] }),
            json!({ "resourceType": "Patient", "name": [{ "given": [1, "Jim"] }], "code": { "text": "c" } }),
            json!({ "resourceType": "Patient", "name": [{}], "code": { "text": "c" } }),
            json!({ "resourceType": "Organization", "name": "Acme" }),
            json!({ "resourceType": "Observation", "code": { "text": "Glucose" }, "valueQuantity": { "value": 6.3 } }),
            json!({ "resourceType": "Observation", "status": "final" }),
            json!({ "resourceType": "Basic", "name": 3, "code": "x" }),
        ] {
            let stored = crate::fhir::compact_stored(&resource.to_string()).unwrap();
            assert_eq!(display_of_json(&stored), display(&resource), "{resource}");
        }
        let stored = crate::fhir::compact_stored(r#"{"name": "Acme", "code": {"text": "c"}}"#);
        assert_eq!(display_of_json(&stored.unwrap()).as_deref(), Some("Acme"));
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
