//! Notification bundles in their R4 form, per the IG's profiles
//! `backport-subscription-notification-r4` (the Bundle) and `backport-subscription-status-r4` (the
//! `Parameters` that stands for R5's `SubscriptionStatus`), and a checker of bundles against them.
//!
//! What is emitted, parameter by parameter of the status:
//! - `subscription` (`valueReference` to `{base}/Subscription/{id}`);
//! - `status` and `type` (`valueCode`);
//! - `topic` (`valueCanonical`) except with `empty` payloads: the profile says it SHOULD NOT be
//!   present then (a topic's URL alone can tell what happened), MAY with `id-only`, SHOULD with
//!   `full-resource`. The IG's example bundles all carry it; we follow the profile's text.
//! - `events-since-subscription-start` (`valueString` of digits: the R4 profile types it `string`);
//! - `notification-event`, for `event-notification` and `query-event` only, with parts
//!   `event-number` (`valueString`, likewise), `timestamp` (`valueInstant`) and, except with
//!   `empty` payloads, `focus` (`valueReference` to `{base}/{type}/{id}`);
//! - `error` (`valueCodeableConcept` with the message as `text`).
//!
//! Not emitted: `additional-context`, `related-query`, `authorization-type` and
//! `authorization-value` (no included resources, related queries or authorization hints).
//!
//! Entries: the status first (`fullUrl` `urn:uuid:<its id>`, `request` `GET
//! {base}/Subscription/{id}/$status`, `response` `200`, as the IG's examples); then, for `id-only`
//! and `full-resource`, one entry per event, `fullUrl` `{base}/{type}/{id}`. The R4 profile and
//! history bundles need a `request` and `response` on every entry; the IG's examples show `POST
//! Encounter` / `201`, but which interaction made the change is not known here, and the IG's
//! notifications page allows a `GET` of the resource in place of the original request. So a live
//! focus gets `GET {type}/{id}/_history/{version}` / `200` (the very request that reads the
//! version notified), a deleted one `DELETE {type}/{id}` / `204` (no content) and never a
//! resource. `full-resource` entries carry the resource when the event has it. `empty` payloads
//! have no entry but the status (the IG: SHALL NOT), nor do handshakes, heartbeats and
//! `query-status` answers.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::backport::PayloadContent;

/// The R4 notification Bundle profile.
pub const NOTIFICATION_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4";
/// The R4 status Parameters profile.
pub const STATUS_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";

/// The subscription status codes of FHIR R4 (`http://hl7.org/fhir/ValueSet/subscription-status`).
const STATUS_CODES: [&str; 4] = ["requested", "active", "error", "off"];

/// The kind of a notification: its `type`, from
/// `http://hl7.org/fhir/ValueSet/subscription-notification-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotificationType {
    /// Sent once when a subscription starts, to check the endpoint.
    Handshake,
    /// Sent when nothing happened for the heartbeat period.
    Heartbeat,
    /// One or more events.
    EventNotification,
    /// The answer to `$status`.
    QueryStatus,
    /// The answer to `$events`.
    QueryEvent,
}

impl NotificationType {
    /// All five, in the value set's order.
    pub const ALL: [NotificationType; 5] = [
        NotificationType::Handshake,
        NotificationType::Heartbeat,
        NotificationType::EventNotification,
        NotificationType::QueryStatus,
        NotificationType::QueryEvent,
    ];

    /// The code: `handshake`, `heartbeat`, `event-notification`, `query-status` or `query-event`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationType::Handshake => "handshake",
            NotificationType::Heartbeat => "heartbeat",
            NotificationType::EventNotification => "event-notification",
            NotificationType::QueryStatus => "query-status",
            NotificationType::QueryEvent => "query-event",
        }
    }

    /// Reads a code.
    pub fn parse(code: &str) -> Option<NotificationType> {
        NotificationType::ALL
            .into_iter()
            .find(|kind| kind.as_str() == code)
    }

    /// Whether notifications of this type carry events (`event-notification`, `query-event`).
    pub fn carries_events(self) -> bool {
        matches!(
            self,
            NotificationType::EventNotification | NotificationType::QueryEvent
        )
    }
}

/// One event of a notification: a change that triggered the topic.
#[derive(Debug, Clone, Copy)]
pub struct NotificationEvent<'a> {
    /// Its number in the subscription's sequence of events (from 1).
    pub number: i64,
    /// When the change happened.
    pub timestamp: DateTime<Utc>,
    /// The focus resource's type.
    pub focus_type: &'a str,
    /// The focus resource's id.
    pub focus_id: &'a str,
    /// The focus version the event is about.
    pub focus_version: i64,
    /// The resource, for `full-resource` payloads (`None` for a deleted focus). Without it a
    /// `full-resource` entry has its request and response only, which the IG allows a server
    /// that cannot include a resource.
    pub focus: Option<&'a Value>,
    /// The focus was deleted by the change.
    pub deleted: bool,
}

/// What the status part of a notification says about the subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionStatus<'a> {
    /// The Subscription's id.
    pub subscription_id: &'a str,
    /// The topic's canonical URL.
    pub topic_url: &'a str,
    /// `requested`, `active`, `error` or `off`.
    pub status: &'a str,
    /// The kind of notification.
    pub notification_type: NotificationType,
    /// Events generated since the subscription started, this notification's included (handshakes
    /// and heartbeats do not count).
    pub events_since_subscription_start: i64,
    /// Errors to report, one `error` parameter each.
    pub errors: Vec<String>,
}

fn instant(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn trim_base(base_url: &str) -> &str {
    base_url.trim_end_matches('/')
}

/// The status `Parameters` (`backport-subscription-status-r4`) of a notification or of a
/// `$status` answer, with a fresh UUID as its id. `events` are used only by the types that carry
/// events ([`NotificationType::carries_events`]); `content` decides whether `topic` and event
/// `focus` are given (not for `empty`). See the module documentation for each parameter.
pub fn status_parameters(
    base_url: &str,
    status: &SubscriptionStatus<'_>,
    events: &[NotificationEvent<'_>],
    content: PayloadContent,
) -> Value {
    build_status(
        &Uuid::new_v4().to_string(),
        trim_base(base_url),
        status,
        events,
        content,
    )
}

fn build_status(
    id: &str,
    base: &str,
    status: &SubscriptionStatus<'_>,
    events: &[NotificationEvent<'_>],
    content: PayloadContent,
) -> Value {
    let subscription = format!("{base}/Subscription/{}", status.subscription_id);
    let mut parameter = vec![json!({
        "name": "subscription",
        "valueReference": {"reference": subscription}
    })];
    if content != PayloadContent::Empty {
        parameter.push(json!({"name": "topic", "valueCanonical": status.topic_url}));
    }
    parameter.push(json!({"name": "status", "valueCode": status.status}));
    parameter.push(json!({"name": "type", "valueCode": status.notification_type.as_str()}));
    parameter.push(json!({
        "name": "events-since-subscription-start",
        "valueString": status.events_since_subscription_start.to_string()
    }));
    if status.notification_type.carries_events() {
        for event in events {
            let mut part = vec![
                json!({"name": "event-number", "valueString": event.number.to_string()}),
                json!({"name": "timestamp", "valueInstant": instant(event.timestamp)}),
            ];
            if content != PayloadContent::Empty {
                let focus = format!("{base}/{}/{}", event.focus_type, event.focus_id);
                part.push(json!({"name": "focus", "valueReference": {"reference": focus}}));
            }
            parameter.push(json!({"name": "notification-event", "part": part}));
        }
    }
    for error in &status.errors {
        parameter.push(json!({"name": "error", "valueCodeableConcept": {"text": error}}));
    }
    json!({
        "resourceType": "Parameters",
        "id": id,
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": parameter
    })
}

/// A notification: a `history` Bundle (`backport-subscription-notification-r4`) timestamped
/// `now`, its first entry the status [`status_parameters`], then one entry per event for
/// `id-only` and `full-resource` payloads (see the module documentation for their shape).
pub fn notification_bundle(
    base_url: &str,
    status: &SubscriptionStatus<'_>,
    events: &[NotificationEvent<'_>],
    content: PayloadContent,
    now: DateTime<Utc>,
) -> Value {
    let base = trim_base(base_url);
    let status_id = Uuid::new_v4().to_string();
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{status_id}"),
        "resource": build_status(&status_id, base, status, events, content),
        "request": {
            "method": "GET",
            "url": format!("{base}/Subscription/{}/$status", status.subscription_id)
        },
        "response": {"status": "200"}
    })];
    if status.notification_type.carries_events() && content != PayloadContent::Empty {
        entries.extend(events.iter().map(|event| focus_entry(base, event, content)));
    }
    json!({
        "resourceType": "Bundle",
        "id": Uuid::new_v4().to_string(),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": instant(now),
        "entry": entries
    })
}

fn focus_entry(base: &str, event: &NotificationEvent<'_>, content: PayloadContent) -> Value {
    let (kind, id) = (event.focus_type, event.focus_id);
    let mut entry = Map::new();
    entry.insert("fullUrl".into(), json!(format!("{base}/{kind}/{id}")));
    if event.deleted {
        entry.insert(
            "request".into(),
            json!({"method": "DELETE", "url": format!("{kind}/{id}")}),
        );
        entry.insert("response".into(), json!({"status": "204"}));
        return Value::Object(entry);
    }
    if content == PayloadContent::FullResource {
        if let Some(resource) = event.focus {
            entry.insert("resource".into(), resource.clone());
        }
    }
    entry.insert(
        "request".into(),
        json!({"method": "GET", "url": format!("{kind}/{id}/_history/{}", event.focus_version)}),
    );
    entry.insert("response".into(), json!({"status": "200"}));
    Value::Object(entry)
}

/// Checks a notification bundle against the IG's R4 profiles and says what does not conform, one
/// message each (empty: it conforms). Structural: Bundle type `history`, a `request` and a
/// `response` on every entry (bdl-3, bdl-4), the status `Parameters` first and alone of its type
/// (backport-notification-bundle-r4-1, slice 1..1), its parameters' cardinalities, value types
/// and codes (`status`, `type`), the parts of `notification-event` (`event-number` digits,
/// ascending across events and not above `events-since-subscription-start`; `timestamp` an
/// instant), and the focus entries: an entry whose `fullUrl` is a focus must hold that resource;
/// a bundle carrying resources (so `full-resource`) must have an entry for every focus. What the
/// payload content requires beyond that, [`profile_problems_for`] checks when it is known.
///
/// Also meant for receivers that want to check what they are sent.
pub fn profile_problems(bundle: &Value) -> Vec<String> {
    check(bundle, None)
}

/// [`profile_problems`], and what the IG's payloads page requires of a notification with this
/// payload content: `empty`: no `focus`, no entry besides the status; `id-only`: a `focus` on
/// every event, entries without resources; `full-resource`: a `focus` on every event and an entry
/// for each.
pub fn profile_problems_for(bundle: &Value, content: PayloadContent) -> Vec<String> {
    check(bundle, Some(content))
}

/// What the checks of the status `Parameters` found out, for the checks of the bundle.
struct Events {
    since: Option<u64>,
    /// (event number, focus reference)
    events: Vec<(Option<u64>, Option<String>)>,
}

fn check(bundle: &Value, content: Option<PayloadContent>) -> Vec<String> {
    let mut problems = Vec::new();
    let resource_type = bundle.get("resourceType").and_then(Value::as_str);
    if resource_type != Some("Bundle") {
        problems.push(format!(
            "resourceType is {}, not `Bundle`",
            described(bundle.get("resourceType"))
        ));
        return problems;
    }
    match bundle.get("type").and_then(Value::as_str) {
        Some("history") => {}
        Some(other) => problems.push(format!("Bundle.type is `{other}`, not `history`")),
        None => problems.push("Bundle.type is missing (it must be `history`)".to_owned()),
    }
    if let Some(timestamp) = bundle.get("timestamp") {
        check_instant(timestamp, "Bundle.timestamp", &mut problems);
    }
    let entries = match bundle.get("entry").and_then(Value::as_array) {
        Some(entries) if !entries.is_empty() => entries,
        _ => {
            problems.push(
                "Bundle.entry is missing: the first entry must be the subscription status Parameters"
                    .to_owned(),
            );
            return problems;
        }
    };
    for (index, entry) in entries.iter().enumerate() {
        check_entry(entry, index, &mut problems);
    }
    let status = &entries[0];
    let status_type = status
        .pointer("/resource/resourceType")
        .and_then(Value::as_str);
    for (index, entry) in entries.iter().enumerate().skip(1) {
        if entry
            .pointer("/resource/resourceType")
            .and_then(Value::as_str)
            == Some("Parameters")
        {
            problems.push(format!(
                "entry[{index}] is a second Parameters: a notification has exactly one status (slice subscriptionStatus 1..1)"
            ));
        }
    }
    if status_type != Some("Parameters") {
        problems.push(format!(
            "entry[0].resource is {}, not the status Parameters (backport-notification-bundle-r4-1)",
            described(status.pointer("/resource/resourceType"))
        ));
        return problems;
    }
    let events = check_status(&status["resource"], &mut problems);

    let mut previous_number = None;
    for (number, _) in &events.events {
        if let (Some(previous), Some(number)) = (previous_number, *number) {
            if number <= previous {
                problems.push(format!(
                    "notification-event event-number {number} follows {previous}: event numbers must ascend"
                ));
            }
        }
        previous_number = number.or(previous_number);
        if let (Some(number), Some(since)) = (*number, events.since) {
            if number > since {
                problems.push(format!(
                    "notification-event event-number {number} is above events-since-subscription-start {since}"
                ));
            }
        }
    }
    check_focus_entries(entries, &events, content, &mut problems);
    problems
}

fn described(value: Option<&Value>) -> String {
    match value {
        None => "missing".to_owned(),
        Some(Value::String(text)) => format!("`{text}`"),
        Some(other) => format!("`{other}`"),
    }
}

fn check_entry(entry: &Value, index: usize, problems: &mut Vec<String>) {
    match entry.get("request") {
        Some(request) => {
            let method = request.get("method").and_then(Value::as_str);
            if !method.is_some_and(|method| {
                ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"].contains(&method)
            }) {
                problems.push(format!(
                    "entry[{index}].request.method is {}, not an HTTP verb (GET, HEAD, POST, PUT, DELETE, PATCH)",
                    described(request.get("method"))
                ));
            }
            if !request.get("url").is_some_and(Value::is_string) {
                problems.push(format!("entry[{index}].request.url is missing"));
            }
        }
        None => problems.push(format!(
            "entry[{index}] has no request (a history bundle needs one on every entry, bdl-3)"
        )),
    }
    match entry.get("response") {
        Some(response) if response.get("status").is_some_and(Value::is_string) => {}
        Some(_) => problems.push(format!("entry[{index}].response.status is missing")),
        None => problems.push(format!(
            "entry[{index}] has no response (a history bundle needs one on every entry, bdl-4)"
        )),
    }
    if let Some(resource) = entry.get("resource") {
        if !resource.get("resourceType").is_some_and(Value::is_string) {
            problems.push(format!("entry[{index}].resource has no resourceType"));
        }
    }
}

/// The value member of a parameter or part (`valueString`, ...), checked to be the only value
/// and of the expected type; `None` (with a problem) otherwise. `required`: absence is a problem.
fn value_of<'a>(
    element: &'a Value,
    expected: &str,
    label: &str,
    required: bool,
    problems: &mut Vec<String>,
) -> Option<&'a Value> {
    let members = element.as_object()?;
    let values: Vec<&String> = members
        .keys()
        .filter(|key| key.starts_with("value"))
        .collect();
    if members.contains_key("part") || members.contains_key("resource") {
        problems.push(format!(
            "{label} has {}: it takes a {expected} only (inv-1)",
            if members.contains_key("part") {
                "parts"
            } else {
                "a resource"
            }
        ));
    }
    match values.as_slice() {
        [] if required => {
            problems.push(format!("{label} has no value (a {expected} is required)"));
            None
        }
        [] => None,
        [key] if key.as_str() == expected => members.get(expected),
        keys => {
            problems.push(format!(
                "{label} has {}, not a {expected}",
                keys.iter()
                    .map(|key| key.as_str())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
            None
        }
    }
}

fn check_instant(value: &Value, label: &str, problems: &mut Vec<String>) {
    let ok = value
        .as_str()
        .is_some_and(|text| DateTime::parse_from_rfc3339(text).is_ok() && text.contains('T'));
    if !ok {
        problems.push(format!(
            "{label} {} is not an instant (date, time with seconds, and zone)",
            described(Some(value))
        ));
    }
}

/// A string of digits as a number (R4 carries R5's integer64 counters as strings).
fn digits(value: &Value, label: &str, problems: &mut Vec<String>) -> Option<u64> {
    let text = value.as_str().unwrap_or("");
    let number = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<u64>().ok())
        .flatten();
    if number.is_none() {
        problems.push(format!(
            "{label} {} is not a non-negative whole number",
            described(Some(value))
        ));
    }
    number
}

fn check_status(parameters: &Value, problems: &mut Vec<String>) -> Events {
    let mut found = Events {
        since: None,
        events: Vec::new(),
    };
    let Some(list) = parameters.get("parameter").and_then(Value::as_array) else {
        problems.push(
            "the status Parameters has no parameter (subscription, status and type are required)"
                .to_owned(),
        );
        return found;
    };
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    for (index, parameter) in list.iter().enumerate() {
        let Some(name) = parameter.get("name").and_then(Value::as_str) else {
            problems.push(format!("status parameter[{index}] has no name"));
            continue;
        };
        *counts.entry(name).or_default() += 1;
        let label = format!("status parameter `{name}`");
        match name {
            "subscription" => {
                if let Some(reference) =
                    value_of(parameter, "valueReference", &label, true, problems)
                {
                    match reference.get("reference").and_then(Value::as_str) {
                        Some(text) if !text.contains("Subscription/") => problems
                            .push(format!("{label} references `{text}`, not a Subscription")),
                        Some(_) => {}
                        None if reference.get("identifier").is_some() => {}
                        None => problems.push(format!("{label} has an empty valueReference")),
                    }
                }
            }
            "topic" => {
                value_of(parameter, "valueCanonical", &label, false, problems);
            }
            "status" => {
                if let Some(code) = value_of(parameter, "valueCode", &label, true, problems) {
                    let code = code.as_str().unwrap_or("");
                    if !STATUS_CODES.contains(&code) {
                        problems.push(format!(
                            "{label} `{code}` is not one of {}",
                            STATUS_CODES.join(", ")
                        ));
                    }
                }
            }
            "type" => {
                if let Some(code) = value_of(parameter, "valueCode", &label, true, problems) {
                    let code = code.as_str().unwrap_or("");
                    if NotificationType::parse(code).is_none() {
                        problems.push(format!(
                            "{label} `{code}` is not one of {}",
                            NotificationType::ALL
                                .map(NotificationType::as_str)
                                .join(", ")
                        ));
                    }
                }
            }
            "events-since-subscription-start" => {
                if let Some(value) = value_of(parameter, "valueString", &label, false, problems) {
                    found.since = digits(value, &label, problems);
                }
            }
            "notification-event" => found.events.push(check_event(parameter, problems)),
            "error" => {
                value_of(parameter, "valueCodeableConcept", &label, false, problems);
            }
            // The slicing is open: other parameters are allowed.
            _ => {}
        }
    }
    for (name, min, max) in [
        ("subscription", 1, 1),
        ("topic", 0, 1),
        ("status", 1, 1),
        ("type", 1, 1),
        ("events-since-subscription-start", 0, 1),
    ] {
        let count = counts.get(name).copied().unwrap_or(0);
        if count < min || count > max {
            problems.push(format!(
                "status parameter `{name}` appears {count} times (allowed {min}..{max})"
            ));
        }
    }
    found
}

fn check_event(parameter: &Value, problems: &mut Vec<String>) -> (Option<u64>, Option<String>) {
    let label = "status parameter `notification-event`";
    if parameter.as_object().is_some_and(|members| {
        members.keys().any(|key| key.starts_with("value")) || members.contains_key("resource")
    }) {
        problems.push(format!(
            "{label} has a value or resource; it takes parts only (inv-1)"
        ));
    }
    let parts = parameter
        .get("part")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    let mut number = None;
    let mut focus = None;
    for part in parts {
        let Some(name) = part.get("name").and_then(Value::as_str) else {
            problems.push(format!("{label} has a part without name"));
            continue;
        };
        *counts.entry(name).or_default() += 1;
        let part_label = format!("notification-event part `{name}`");
        match name {
            "event-number" => {
                if let Some(value) = value_of(part, "valueString", &part_label, true, problems) {
                    number = digits(value, &part_label, problems);
                }
            }
            "timestamp" => {
                if let Some(value) = value_of(part, "valueInstant", &part_label, false, problems) {
                    check_instant(value, &part_label, problems);
                }
            }
            "focus" | "additional-context" => {
                if let Some(value) = value_of(part, "valueReference", &part_label, false, problems)
                {
                    let reference = value.get("reference").and_then(Value::as_str);
                    if reference.is_none() && value.get("identifier").is_none() {
                        problems.push(format!("{part_label} has an empty valueReference"));
                    }
                    if name == "focus" {
                        focus = reference.map(str::to_owned);
                    }
                }
            }
            "related-query" => check_related_query(part, problems),
            "authorization-type" => {
                value_of(part, "valueCoding", &part_label, false, problems);
            }
            "authorization-value" => {
                value_of(part, "valueString", &part_label, false, problems);
            }
            _ => {}
        }
    }
    for (name, min, max) in [
        ("event-number", 1, 1),
        ("timestamp", 0, 1),
        ("focus", 0, 1),
        ("authorization-type", 0, 1),
        ("authorization-value", 0, 1),
    ] {
        let count = counts.get(name).copied().unwrap_or(0);
        if count < min || count > max {
            problems.push(format!(
                "notification-event part `{name}` appears {count} times (allowed {min}..{max})"
            ));
        }
    }
    (number, focus)
}

fn check_related_query(part: &Value, problems: &mut Vec<String>) {
    let parts = part
        .get("part")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut queries = 0;
    let mut types = 0;
    for sub in parts {
        match sub.get("name").and_then(Value::as_str) {
            Some("query") => {
                queries += 1;
                value_of(
                    sub,
                    "valueString",
                    "related-query part `query`",
                    true,
                    problems,
                );
            }
            Some("query-type") => {
                types += 1;
                value_of(
                    sub,
                    "valueCoding",
                    "related-query part `query-type`",
                    false,
                    problems,
                );
            }
            _ => {}
        }
    }
    if queries != 1 {
        problems.push(format!(
            "notification-event part `related-query` has {queries} `query` parts (allowed 1..1)"
        ));
    }
    if types > 1 {
        problems.push(format!(
            "notification-event part `related-query` has {types} `query-type` parts (allowed 0..1)"
        ));
    }
}

/// `Type/id` of a reference or full URL (absolute or relative, any `/_history/v` dropped), or
/// the URN itself: what a focus reference and an entry's `fullUrl` are compared by.
fn reference_key(reference: &str) -> Option<String> {
    if reference.starts_with("urn:") {
        return Some(reference.to_owned());
    }
    let unversioned = reference
        .split_once("/_history/")
        .map_or(reference, |(before, _)| before);
    let mut segments = unversioned
        .rsplit('/')
        .filter(|segment| !segment.is_empty());
    let id = segments.next()?;
    let kind = segments.next()?;
    Some(format!("{kind}/{id}"))
}

fn check_focus_entries(
    entries: &[Value],
    events: &Events,
    content: Option<PayloadContent>,
    problems: &mut Vec<String>,
) {
    let others: Vec<(usize, &Value)> = entries.iter().enumerate().skip(1).collect();
    let entry_for = |reference: &str| {
        let key = reference_key(reference);
        others.iter().find(|(_, entry)| {
            entry
                .get("fullUrl")
                .and_then(Value::as_str)
                .and_then(reference_key)
                .is_some_and(|full_url| Some(full_url) == key)
        })
    };
    // An entry with a fullUrl of `Type/id` must hold that resource, if it holds one.
    for (index, entry) in &others {
        let (Some(full_url), Some(resource)) = (
            entry.get("fullUrl").and_then(Value::as_str),
            entry.get("resource"),
        ) else {
            continue;
        };
        let held = format!(
            "{}/{}",
            resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or(""),
            resource.get("id").and_then(Value::as_str).unwrap_or("")
        );
        if !full_url.starts_with("urn:") && reference_key(full_url).as_deref() != Some(&held) {
            problems.push(format!(
                "entry[{index}] has fullUrl `{full_url}` but holds {held}"
            ));
        }
    }
    let carries_resources = others
        .iter()
        .any(|(_, entry)| entry.get("resource").is_some());
    let every_focus_needs_entry = match content {
        Some(PayloadContent::FullResource) => true,
        Some(_) => false,
        None => carries_resources,
    };
    for (position, (number, focus)) in events.events.iter().enumerate() {
        let event = match number {
            Some(number) => format!("notification-event {number}"),
            None => format!("notification-event #{}", position + 1),
        };
        match (focus, content) {
            (Some(_), Some(PayloadContent::Empty)) => problems.push(format!(
                "{event} has a focus, but an empty payload carries none"
            )),
            (None, Some(PayloadContent::IdOnly | PayloadContent::FullResource)) => {
                problems.push(format!(
                    "{event} has no focus; {} payloads SHALL give it",
                    content.map_or("", PayloadContent::as_str)
                ))
            }
            _ => {}
        }
        if let Some(focus) = focus {
            if every_focus_needs_entry && entry_for(focus).is_none() {
                problems.push(format!(
                    "{event} has focus `{focus}` but the bundle has no entry for it"
                ));
            }
        }
    }
    match content {
        Some(PayloadContent::Empty) if !others.is_empty() => problems.push(format!(
            "an empty payload has {} entries besides the status (it SHALL NOT have any)",
            others.len()
        )),
        Some(PayloadContent::IdOnly) => {
            for (index, entry) in &others {
                if entry.get("resource").is_some() {
                    problems.push(format!(
                        "entry[{index}] holds a resource, but an id-only payload carries none"
                    ));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::fixture;

    const BASE: &str = "https://example.org/fhir/";
    const ENCOUNTER_ID: &str = "86009987-eabe-42bf-8c02-b112b18cb616";
    const ENCOUNTER_URL: &str =
        "https://example.org/fhir/Encounter/86009987-eabe-42bf-8c02-b112b18cb616";

    fn now() -> DateTime<Utc> {
        "2020-05-29T16:44:13.188Z".parse().unwrap()
    }

    fn status(
        status: &'static str,
        notification_type: NotificationType,
        since: i64,
    ) -> SubscriptionStatus<'static> {
        SubscriptionStatus {
            subscription_id: "admission",
            topic_url: "http://hl7.org/SubscriptionTopic/admission",
            status,
            notification_type,
            events_since_subscription_start: since,
            errors: Vec::new(),
        }
    }

    fn event(number: i64, focus: Option<&Value>) -> NotificationEvent<'_> {
        NotificationEvent {
            number,
            timestamp: now(),
            focus_type: "Encounter",
            focus_id: ENCOUNTER_ID,
            focus_version: 3,
            focus,
            deleted: false,
        }
    }

    /// The IG's example Encounter (the focus of its full-resource example).
    fn the_encounter() -> Value {
        fixture("Bundle-r4-notification-full-resource.json")["entry"][1]["resource"].clone()
    }

    fn sorted_keys(value: &Value) -> Value {
        let mut keys: Vec<&String> = value
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        keys.sort();
        json!(keys)
    }

    /// The value member of a parameter or part (`valueString`), or its parts' shapes.
    fn parameter_shape(parameter: &Value) -> Value {
        let name = &parameter["name"];
        match parameter.get("part").and_then(Value::as_array) {
            Some(parts) => json!([name, parts.iter().map(parameter_shape).collect::<Vec<_>>()]),
            None => {
                let value = parameter
                    .as_object()
                    .unwrap()
                    .keys()
                    .find(|key| key.starts_with("value"))
                    .cloned();
                json!([name, value])
            }
        }
    }

    /// What a notification must share with the IG's example of its kind: the same members, entry
    /// layout, parameter names and value types, profiles and methods of the status request; not
    /// ids, timestamps or the values that differ by design.
    fn shape(bundle: &Value) -> Value {
        let entries: Vec<Value> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                let resource = entry.get("resource").map(|resource| {
                    match resource.get("parameter").and_then(Value::as_array) {
                        Some(parameters) => json!({
                            "resourceType": resource["resourceType"],
                            "members": sorted_keys(resource),
                            "meta": resource["meta"],
                            "parameter": parameters.iter().map(parameter_shape).collect::<Vec<_>>(),
                        }),
                        None => json!({"resourceType": resource["resourceType"]}),
                    }
                });
                json!({
                    "members": sorted_keys(entry),
                    "request": sorted_keys(&entry["request"]),
                    "response": sorted_keys(&entry["response"]),
                    "resource": resource,
                })
            })
            .collect();
        json!({
            "members": sorted_keys(bundle),
            "resourceType": bundle["resourceType"],
            "meta": bundle["meta"],
            "type": bundle["type"],
            "status request method": bundle["entry"][0]["request"]["method"],
            "entries": entries,
        })
    }

    fn without_topic(mut bundle: Value) -> Value {
        bundle["entry"][0]["resource"]["parameter"]
            .as_array_mut()
            .unwrap()
            .retain(|parameter| parameter["name"] != "topic");
        bundle
    }

    fn assert_conforms(bundle: &Value, content: PayloadContent) {
        let problems = profile_problems(bundle);
        assert!(problems.is_empty(), "{problems:#?}\n{bundle:#}");
        let problems = profile_problems_for(bundle, content);
        assert!(problems.is_empty(), "{problems:#?}\n{bundle:#}");
    }

    #[test]
    fn the_ig_examples_conform() {
        for (name, content) in [
            (
                "Bundle-r4-notification-handshake.json",
                PayloadContent::IdOnly,
            ),
            (
                "Bundle-r4-notification-heartbeat.json",
                PayloadContent::IdOnly,
            ),
            ("Bundle-r4-notification-empty.json", PayloadContent::Empty),
            (
                "Bundle-r4-notification-id-only.json",
                PayloadContent::IdOnly,
            ),
            (
                "Bundle-r4-notification-full-resource.json",
                PayloadContent::FullResource,
            ),
            (
                "Bundle-r4-notification-multi-resource.json",
                PayloadContent::FullResource,
            ),
            ("Bundle-r4-notification-error.json", PayloadContent::IdOnly),
        ] {
            let bundle = fixture(name);
            assert_eq!(profile_problems(&bundle), Vec::<String>::new(), "{name}");
            assert_eq!(
                profile_problems_for(&bundle, content),
                Vec::<String>::new(),
                "{name}"
            );
        }
    }

    #[test]
    fn handshake_and_heartbeat_have_the_status_only_shaped_as_the_ig_examples() {
        let focus = the_encounter();
        let events = [event(2, Some(&focus))];
        for (name, status) in [
            (
                "Bundle-r4-notification-handshake.json",
                status("requested", NotificationType::Handshake, 0),
            ),
            (
                "Bundle-r4-notification-heartbeat.json",
                status("active", NotificationType::Heartbeat, 2),
            ),
        ] {
            // Events given to a handshake or heartbeat are not sent.
            let ours = notification_bundle(BASE, &status, &events, PayloadContent::IdOnly, now());
            assert_conforms(&ours, PayloadContent::IdOnly);
            assert_eq!(shape(&ours), shape(&fixture(name)), "{name}");
        }
    }

    #[test]
    fn an_empty_notification_is_shaped_as_the_ig_example_without_topic() {
        let focus = the_encounter();
        let ours = notification_bundle(
            BASE,
            &status("active", NotificationType::EventNotification, 2),
            &[event(2, Some(&focus))],
            PayloadContent::Empty,
            now(),
        );
        assert_conforms(&ours, PayloadContent::Empty);
        // The IG's example has `topic`; the profile says it SHOULD NOT be there for `empty`.
        let example = without_topic(fixture("Bundle-r4-notification-empty.json"));
        assert_eq!(shape(&ours), shape(&example));
    }

    #[test]
    fn an_id_only_notification_is_shaped_as_the_ig_example_plus_a_focus_entry() {
        let focus = the_encounter();
        let ours = notification_bundle(
            BASE,
            &status("active", NotificationType::EventNotification, 2),
            &[event(2, Some(&focus))],
            PayloadContent::IdOnly,
            now(),
        );
        assert_conforms(&ours, PayloadContent::IdOnly);
        let ours_shape = shape(&ours);
        let example = shape(&fixture("Bundle-r4-notification-id-only.json"));
        assert_eq!(ours_shape["entries"][0], example["entries"][0]);
        // The example's focus entry is commented out in the IG; it has the full-resource
        // example's layout without the resource.
        let mut full = shape(&fixture("Bundle-r4-notification-full-resource.json"));
        full["entries"][1]["members"] = json!(["fullUrl", "request", "response"]);
        full["entries"][1]["resource"] = Value::Null;
        assert_eq!(ours_shape["entries"][1], full["entries"][1]);
        assert_eq!(ours["entry"].as_array().unwrap().len(), 2);

        let entry = &ours["entry"][1];
        assert_eq!(entry["fullUrl"], ENCOUNTER_URL);
        assert_eq!(
            entry["request"],
            json!({"method": "GET", "url": format!("Encounter/{ENCOUNTER_ID}/_history/3")})
        );
        assert_eq!(entry["response"], json!({"status": "200"}));
        let status_entry = &ours["entry"][0];
        let parameters = &status_entry["resource"];
        assert_eq!(
            status_entry["fullUrl"],
            format!("urn:uuid:{}", parameters["id"].as_str().unwrap())
        );
        assert!(Uuid::parse_str(parameters["id"].as_str().unwrap()).is_ok());
        assert_eq!(
            status_entry["request"],
            json!({"method": "GET", "url": "https://example.org/fhir/Subscription/admission/$status"})
        );
        assert_eq!(
            parameters["parameter"][0]["valueReference"]["reference"],
            "https://example.org/fhir/Subscription/admission"
        );
        let event = &parameters["parameter"][5];
        assert_eq!(
            event["part"][0],
            json!({"name": "event-number", "valueString": "2"})
        );
        assert_eq!(
            event["part"][1],
            json!({"name": "timestamp", "valueInstant": "2020-05-29T16:44:13.188Z"})
        );
        assert_eq!(
            event["part"][2]["valueReference"]["reference"],
            ENCOUNTER_URL
        );
        assert_eq!(ours["timestamp"], "2020-05-29T16:44:13.188Z");
    }

    #[test]
    fn a_full_resource_notification_is_shaped_as_the_ig_example() {
        let focus = the_encounter();
        let ours = notification_bundle(
            BASE,
            &status("active", NotificationType::EventNotification, 2),
            &[event(2, Some(&focus))],
            PayloadContent::FullResource,
            now(),
        );
        assert_conforms(&ours, PayloadContent::FullResource);
        // The comparison tells the kinds apart: the id-only example has no focus entry.
        assert_ne!(
            shape(&ours),
            shape(&fixture("Bundle-r4-notification-id-only.json"))
        );
        assert_eq!(
            shape(&ours),
            shape(&fixture("Bundle-r4-notification-full-resource.json"))
        );
        assert_eq!(ours["entry"][1]["resource"], focus);
    }

    #[test]
    fn an_error_status_is_shaped_as_the_ig_example() {
        let mut error = status("error", NotificationType::QueryStatus, 3);
        error.errors.push("the endpoint did not answer".to_owned());
        let ours = notification_bundle(BASE, &error, &[], PayloadContent::IdOnly, now());
        assert_conforms(&ours, PayloadContent::IdOnly);
        assert_eq!(
            shape(&ours),
            shape(&fixture("Bundle-r4-notification-error.json"))
        );
        assert_eq!(
            ours["entry"][0]["resource"]["parameter"][5]["valueCodeableConcept"],
            json!({"text": "the endpoint did not answer"})
        );
    }

    #[test]
    fn status_parameters_are_shaped_as_the_ig_status_example() {
        let ours = status_parameters(
            BASE,
            &status("active", NotificationType::EventNotification, 2),
            &[event(2, None)],
            PayloadContent::Empty,
        );
        let wrap = |parameters: Value| json!({"entry": [{"resource": parameters}]});
        let example = without_topic(wrap(fixture("Parameters-r4-notification-status.json")));
        assert_eq!(
            shape(&wrap(ours.clone()))["entries"],
            shape(&example)["entries"]
        );
        assert!(Uuid::parse_str(ours["id"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn deleted_focuses_and_several_events() {
        let focus = the_encounter();
        let mut deleted = event(8, None);
        deleted.deleted = true;
        deleted.focus_id = "gone";
        let ours = notification_bundle(
            BASE,
            &status("active", NotificationType::EventNotification, 8),
            &[event(7, Some(&focus)), deleted],
            PayloadContent::FullResource,
            now(),
        );
        assert_conforms(&ours, PayloadContent::FullResource);
        let entry = &ours["entry"][2];
        assert_eq!(entry["fullUrl"], "https://example.org/fhir/Encounter/gone");
        assert_eq!(
            entry["request"],
            json!({"method": "DELETE", "url": "Encounter/gone"})
        );
        assert_eq!(entry.get("resource"), None);
        let numbers: Vec<&Value> = ours["entry"][0]["resource"]["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|parameter| parameter["name"] == "notification-event")
            .map(|parameter| &parameter["part"][0]["valueString"])
            .collect();
        assert_eq!(numbers, vec!["7", "8"]);
    }

    /// The problems of a full-resource notification of events 3 and 4 broken by `breaking`.
    fn problems_of(breaking: impl FnOnce(&mut Value)) -> Vec<String> {
        let focus = the_encounter();
        let mut second = the_encounter();
        second["id"] = json!("second");
        let mut second_event = event(4, Some(&second));
        second_event.focus_id = "second";
        let mut bundle = notification_bundle(
            BASE,
            &status("active", NotificationType::EventNotification, 4),
            &[event(3, Some(&focus)), second_event],
            PayloadContent::FullResource,
            now(),
        );
        assert_conforms(&bundle, PayloadContent::FullResource);
        breaking(&mut bundle);
        profile_problems(&bundle)
    }

    fn assert_found(problems: &[String], needle: &str) {
        assert!(
            problems.iter().any(|problem| problem.contains(needle)),
            "`{needle}` not in {problems:#?}"
        );
    }

    #[test]
    fn broken_bundles_are_found_out() {
        let problems = problems_of(|bundle| {
            bundle.as_object_mut().unwrap().remove("type");
        });
        assert_found(&problems, "Bundle.type is missing");

        let problems = problems_of(|bundle| bundle["type"] = json!("collection"));
        assert_found(&problems, "Bundle.type is `collection`");

        let problems = problems_of(|bundle| {
            bundle["entry"][0]["resource"]["parameter"][4] =
                json!({"name": "events-since-subscription-start", "valueInteger": 4});
        });
        assert_found(
            &problems,
            "parameter `events-since-subscription-start` has valueInteger, not a valueString",
        );

        let problems = problems_of(|bundle| {
            bundle["entry"][0]["resource"]["parameter"][5]["part"][0]["valueString"] = json!("5");
        });
        assert_found(&problems, "event-number 4 follows 5");
        assert_found(
            &problems,
            "event-number 5 is above events-since-subscription-start 4",
        );

        let problems = problems_of(|bundle| {
            bundle["entry"].as_array_mut().unwrap().remove(2);
        });
        assert_found(
            &problems,
            "notification-event 4 has focus `https://example.org/fhir/Encounter/second` but the bundle has no entry for it",
        );

        let problems = problems_of(|bundle| {
            bundle["entry"][0]["resource"]["parameter"][2]["valueCode"] = json!("paused");
            bundle["entry"][0]["resource"]["parameter"][3]["valueCode"] = json!("ping");
        });
        assert_found(&problems, "`status` `paused` is not one of");
        assert_found(&problems, "`type` `ping` is not one of");

        let problems = problems_of(|bundle| {
            bundle["entry"][0]["resource"]["parameter"]
                .as_array_mut()
                .unwrap()
                .remove(0);
        });
        assert_found(&problems, "`subscription` appears 0 times");

        let problems = problems_of(|bundle| {
            bundle["entry"][1]
                .as_object_mut()
                .unwrap()
                .remove("request");
            bundle["entry"][1]
                .as_object_mut()
                .unwrap()
                .remove("response");
        });
        assert_found(&problems, "entry[1] has no request");
        assert_found(&problems, "entry[1] has no response");

        let problems = problems_of(|bundle| {
            bundle["entry"].as_array_mut().unwrap().swap(0, 1);
        });
        assert_found(
            &problems,
            "entry[0].resource is `Encounter`, not the status Parameters",
        );

        let problems = problems_of(|bundle| {
            bundle["entry"][1]["resource"]["id"] = json!("other");
        });
        assert_found(&problems, "holds Encounter/other");

        let problems = problems_of(|bundle| {
            bundle["entry"][0]["resource"]["parameter"][5]["part"][1]["valueInstant"] =
                json!("2020-05-29");
        });
        assert_found(&problems, "part `timestamp` `2020-05-29` is not an instant");
    }

    #[test]
    fn the_payload_content_rules_are_checked_when_known() {
        // A full-resource notification whose only focus entry is missing: only knowing the
        // content tells it from an id-only one without entries.
        let focus = the_encounter();
        let mut bundle = notification_bundle(
            BASE,
            &status("active", NotificationType::EventNotification, 2),
            &[event(2, Some(&focus))],
            PayloadContent::FullResource,
            now(),
        );
        bundle["entry"].as_array_mut().unwrap().truncate(1);
        assert!(profile_problems(&bundle).is_empty());
        assert_found(
            &profile_problems_for(&bundle, PayloadContent::FullResource),
            "has no entry for it",
        );

        let full = fixture("Bundle-r4-notification-full-resource.json");
        let problems = profile_problems_for(&full, PayloadContent::IdOnly);
        assert_found(
            &problems,
            "entry[1] holds a resource, but an id-only payload carries none",
        );
        let problems = profile_problems_for(&full, PayloadContent::Empty);
        assert_found(&problems, "has a focus, but an empty payload carries none");
        assert_found(
            &problems,
            "an empty payload has 1 entries besides the status",
        );

        let empty = fixture("Bundle-r4-notification-empty.json");
        assert_found(
            &profile_problems_for(&empty, PayloadContent::IdOnly),
            "has no focus; id-only payloads SHALL give it",
        );
    }
}
