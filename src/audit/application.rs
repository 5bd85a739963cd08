//! AuditEvents for applications that share the store: login, logout and REST interaction events,
//! built the way Medplum's `createAuditEvent` builds them, so an application's own AuditEvents and
//! fhir-outbox's transmit events read alike and land in the same place.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool, project: uuid::Uuid) -> Result<(), Box<dyn std::error::Error>> {
//! use fhir_outbox::audit::Outcome;
//! use fhir_outbox::audit::application::{self, RestInteraction};
//! use fhir_outbox::capture::WriteContext;
//! use serde_json::json;
//!
//! let settings = json!({ "redactAuditEvents": true }); // the project's settings
//! let event = application::rest_event(RestInteraction::Read, "https://fhir.example.com/", Outcome::Success)
//!     .who(json!({ "reference": "Practitioner/123", "display": "Dr Alice" }))
//!     .remote_address("203.0.113.7")
//!     .resource(&json!({ "reference": "Patient/p1" }))
//!     .duration(std::time::Duration::from_millis(12))
//!     .tracing("req-1", "4bf92f35-77b3-4da6-a3ce-929d0e0e4736")
//!     .redact(application::redaction_enabled(false, &settings))
//!     .build();
//! application::log_audit_event(&event, true);
//! let stored = application::record(&pool, project, &event, &WriteContext::default()).await?;
//! # let _ = stored; Ok(()) }
//! ```

use super::{Outcome, display, instant, reference, tracing_extension};
use crate::capture::{self, StoreError, WriteContext};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sqlx::PgExecutor;
use std::time::Duration;
use uuid::Uuid;

/// The DICOM code system (login, logout, user authentication).
pub const DICOM_CODE_SYSTEM: &str = "http://dicom.nema.org/resources/ontology/DCM";

/// The AuditEvent type code system (`rest`).
pub const AUDIT_EVENT_TYPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";

/// The FHIR RESTful interaction code system (the subtypes of `rest` events).
pub const RESTFUL_INTERACTION_SYSTEM: &str = "http://hl7.org/fhir/restful-interaction";

/// Extension carrying how long the audited operation took, in whole milliseconds (`valueInteger`).
pub const DURATION_EXTENSION: &str = "https://medplum.com/fhir/StructureDefinition/durationMs";

/// A fixed Coding: the event types and subtypes are all known in advance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coding {
    /// `Coding.system`.
    pub system: &'static str,
    /// `Coding.code`.
    pub code: &'static str,
    /// `Coding.display`.
    pub display: &'static str,
}

impl Coding {
    /// The Coding as FHIR JSON.
    pub fn to_json(self) -> Value {
        json!({ "system": self.system, "code": self.code, "display": self.display })
    }
}

/// Event type of logins and logouts: DICOM `110114` "User Authentication".
pub const USER_AUTHENTICATION: Coding = Coding {
    system: DICOM_CODE_SYSTEM,
    code: "110114",
    display: "User Authentication",
};

/// Event type of REST interactions: `rest` "Restful Operation".
pub const RESTFUL_OPERATION: Coding = Coding {
    system: AUDIT_EVENT_TYPE_SYSTEM,
    code: "rest",
    display: "Restful Operation",
};

/// Subtype of a login: DICOM `110122` "Login".
pub const LOGIN: Coding = Coding {
    system: DICOM_CODE_SYSTEM,
    code: "110122",
    display: "Login",
};

/// Subtype of a logout: DICOM `110123` "Logout".
pub const LOGOUT: Coding = Coding {
    system: DICOM_CODE_SYSTEM,
    code: "110123",
    display: "Logout",
};

/// `AuditEvent.action`: what the audited operation did to data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `C`
    Create,
    /// `R`
    Read,
    /// `U`
    Update,
    /// `D`
    Delete,
    /// `E`: part of the value set, though no built-in subtype maps to it.
    Execute,
}

impl Action {
    /// The code.
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// A FHIR RESTful interaction: the subtype of a `rest` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestInteraction {
    /// `read`
    Read,
    /// `vread`
    Vread,
    /// `update`
    Update,
    /// `patch`
    Patch,
    /// `delete`
    Delete,
    /// `history`
    History,
    /// `create`
    Create,
    /// `search`
    Search,
    /// `batch`
    Batch,
    /// `transaction`
    Transaction,
    /// `operation` (`$everything`, `$validate`, …)
    Operation,
}

impl RestInteraction {
    /// Every interaction.
    pub const ALL: [RestInteraction; 11] = [
        RestInteraction::Read,
        RestInteraction::Vread,
        RestInteraction::Update,
        RestInteraction::Patch,
        RestInteraction::Delete,
        RestInteraction::History,
        RestInteraction::Create,
        RestInteraction::Search,
        RestInteraction::Batch,
        RestInteraction::Transaction,
        RestInteraction::Operation,
    ];

    /// The code in [`RESTFUL_INTERACTION_SYSTEM`].
    pub fn code(self) -> &'static str {
        match self {
            RestInteraction::Read => "read",
            RestInteraction::Vread => "vread",
            RestInteraction::Update => "update",
            RestInteraction::Patch => "patch",
            RestInteraction::Delete => "delete",
            RestInteraction::History => "history",
            RestInteraction::Create => "create",
            RestInteraction::Search => "search",
            RestInteraction::Batch => "batch",
            RestInteraction::Transaction => "transaction",
            RestInteraction::Operation => "operation",
        }
    }

    /// Parses a code.
    pub fn parse(code: &str) -> Option<RestInteraction> {
        RestInteraction::ALL.into_iter().find(|i| i.code() == code)
    }

    /// The subtype Coding; its display is the code, as Medplum has it.
    pub fn coding(self) -> Coding {
        Coding {
            system: RESTFUL_INTERACTION_SYSTEM,
            code: self.code(),
            display: self.code(),
        }
    }

    /// The action Medplum records for it. Batches, transactions and operations have none: what they
    /// do depends on their content.
    pub fn action(self) -> Option<Action> {
        match self {
            RestInteraction::Create => Some(Action::Create),
            RestInteraction::Read
            | RestInteraction::Vread
            | RestInteraction::History
            | RestInteraction::Search => Some(Action::Read),
            RestInteraction::Update | RestInteraction::Patch => Some(Action::Update),
            RestInteraction::Delete => Some(Action::Delete),
            RestInteraction::Batch | RestInteraction::Transaction | RestInteraction::Operation => {
                None
            }
        }
    }
}

/// What an application event is about. The event type follows from it, so a login can never be
/// typed as a REST operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventSubtype {
    /// A user logged in (type User Authentication).
    Login,
    /// A user logged out (type User Authentication).
    Logout,
    /// A REST interaction (type Restful Operation).
    Rest(RestInteraction),
}

impl EventSubtype {
    /// `AuditEvent.type`.
    pub fn event_type(self) -> Coding {
        match self {
            EventSubtype::Login | EventSubtype::Logout => USER_AUTHENTICATION,
            EventSubtype::Rest(_) => RESTFUL_OPERATION,
        }
    }

    /// The one entry of `AuditEvent.subtype`.
    pub fn coding(self) -> Coding {
        match self {
            EventSubtype::Login => LOGIN,
            EventSubtype::Logout => LOGOUT,
            EventSubtype::Rest(interaction) => interaction.coding(),
        }
    }

    /// `AuditEvent.action`; none for logins and logouts.
    pub fn action(self) -> Option<Action> {
        match self {
            EventSubtype::Login | EventSubtype::Logout => None,
            EventSubtype::Rest(interaction) => interaction.action(),
        }
    }
}

/// Whether AuditEvents of a project are redacted: the server setting, or the project setting
/// `redactAuditEvents` set to `true`. `project_settings` is the project's `settings` column (a JSON
/// object of name → value); Medplum's `Project.setting` list (`[{ "name", "valueBoolean" }]`) is
/// accepted too, for applications that keep settings in that shape.
pub fn redaction_enabled(server: bool, project_settings: &Value) -> bool {
    if server {
        return true;
    }
    match project_settings {
        Value::Object(settings) => settings.get("redactAuditEvents") == Some(&Value::Bool(true)),
        Value::Array(settings) => settings.iter().any(|setting| {
            setting.get("name").and_then(Value::as_str) == Some("redactAuditEvents")
                && setting.get("valueBoolean") == Some(&Value::Bool(true))
        }),
        _ => false,
    }
}

/// A Reference to `target`: a resource (it has `resourceType` and `id`) becomes `Type/id` with its
/// display; anything else is taken to be a Reference already. `None` for a resource without an id,
/// which has nothing to point at.
fn to_reference(target: &Value, redact: bool) -> Option<Value> {
    if let Some(resource_type) = target.get("resourceType").and_then(Value::as_str) {
        let id = target.get("id").and_then(Value::as_str)?;
        return Some(reference(resource_type, id, display(target), redact));
    }
    Some(redacted(target.clone(), redact))
}

/// The reference without its `display` when redacting: displays carry names, references do not.
fn redacted(mut reference: Value, redact: bool) -> Value {
    if redact && let Value::Object(fields) = &mut reference {
        fields.remove("display");
    }
    reference
}

/// Builds one application AuditEvent. Start from [`login_event`], [`logout_event`], [`rest_event`] or
/// [`AuditEventBuilder::new`], add what is known, then [`build`](AuditEventBuilder::build).
///
/// The result has no `meta.project`: [`record`] (or `capture::create`) stores it in a project and the
/// store sets `meta.project` (and `id`, `versionId`, `lastUpdated`) itself.
#[derive(Debug, Clone)]
pub struct AuditEventBuilder {
    subtype: EventSubtype,
    outcome: Outcome,
    base_url: String,
    who: Option<Value>,
    remote_address: Option<String>,
    description: Option<String>,
    resource: Option<Value>,
    search_query: Option<String>,
    duration: Option<Duration>,
    tracing: Option<(String, String)>,
    redact: bool,
    recorded: Option<DateTime<Utc>>,
}

impl AuditEventBuilder {
    /// An event of `subtype` with `outcome`, observed by the server at `base_url`
    /// (`source.observer.identifier.value`).
    pub fn new(subtype: EventSubtype, outcome: Outcome, base_url: impl Into<String>) -> Self {
        AuditEventBuilder {
            subtype,
            outcome,
            base_url: base_url.into(),
            who: None,
            remote_address: None,
            description: None,
            resource: None,
            search_query: None,
            duration: None,
            tracing: None,
            redact: false,
            recorded: None,
        }
    }

    /// The user or client that made the request (`agent[0].who`): a Reference, or the profile
    /// resource itself.
    pub fn who(mut self, who: Value) -> Self {
        self.who = Some(who);
        self
    }

    /// The client's network address (`agent[0].network`, type `2`: IP address). An empty address is
    /// ignored.
    pub fn remote_address(mut self, address: impl Into<String>) -> Self {
        self.remote_address = Some(address.into());
        self
    }

    /// `outcomeDesc`: what happened, typically the error of a failure.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The resource acted on (`entity[0].what`): the resource itself or a Reference to it. Wins over
    /// [`search_query`](Self::search_query) when both are given.
    pub fn resource(mut self, resource: &Value) -> Self {
        self.resource = Some(resource.clone());
        self
    }

    /// The search performed (`entity[0].query`), e.g. `Patient?name=Smith`.
    pub fn search_query(mut self, query: impl Into<String>) -> Self {
        self.search_query = Some(query.into());
        self
    }

    /// How long the operation took: the duration extension, in rounded milliseconds. A zero duration
    /// adds nothing, as in Medplum.
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }

    /// The request and trace ids of the request (the tracing extension), as the transmit events carry
    /// them.
    pub fn tracing(mut self, request_id: impl Into<String>, trace_id: impl Into<String>) -> Self {
        self.tracing = Some((request_id.into(), trace_id.into()));
        self
    }

    /// Strip `display` from every reference (see [`redaction_enabled`]).
    pub fn redact(mut self, redact: bool) -> Self {
        self.redact = redact;
        self
    }

    /// `recorded`; now (at [`build`](Self::build)) unless set.
    pub fn recorded(mut self, at: DateTime<Utc>) -> Self {
        self.recorded = Some(at);
        self
    }

    /// The AuditEvent as FHIR JSON. Optional elements that are unknown are absent, not null.
    pub fn build(&self) -> Value {
        let mut agent = Map::new();
        if let Some(who) = self.who.as_ref().and_then(|w| to_reference(w, self.redact)) {
            agent.insert("who".into(), who);
        }
        agent.insert("requestor".into(), json!(true));
        if let Some(address) = self.remote_address.as_deref().filter(|a| !a.is_empty()) {
            agent.insert("network".into(), json!({ "address": address, "type": "2" }));
        }
        let observer = redacted(
            json!({ "identifier": { "value": self.base_url } }),
            self.redact,
        );
        let mut event = json!({
            "resourceType": "AuditEvent",
            "type": self.subtype.event_type().to_json(),
            "subtype": [self.subtype.coding().to_json()],
            "recorded": instant(self.recorded.unwrap_or_else(Utc::now)),
            "source": { "observer": observer },
            "agent": [agent],
            "outcome": self.outcome.code(),
        });
        if let Some(action) = self.subtype.action() {
            event["action"] = json!(action.code());
        }
        if let Some(description) = &self.description {
            event["outcomeDesc"] = json!(description);
        }
        let entity = match (&self.resource, &self.search_query) {
            (Some(resource), _) => {
                to_reference(resource, self.redact).map(|what| json!({ "what": what }))
            }
            (None, Some(query)) => Some(json!({ "query": query })),
            (None, None) => None,
        };
        if let Some(entity) = entity {
            event["entity"] = json!([entity]);
        }
        let mut extension = Vec::new();
        if let Some((request_id, trace_id)) = &self.tracing {
            extension.push(tracing_extension(request_id, trace_id));
        }
        if let Some(duration) = self.duration.filter(|d| !d.is_zero()) {
            let ms = (duration.as_secs_f64() * 1000.0).round() as i64;
            extension.push(json!({ "url": DURATION_EXTENSION, "valueInteger": ms }));
        }
        if !extension.is_empty() {
            event["extension"] = Value::Array(extension);
        }
        event
    }
}

/// A login (type User Authentication, subtype Login, no action).
pub fn login_event(base_url: impl Into<String>, outcome: Outcome) -> AuditEventBuilder {
    AuditEventBuilder::new(EventSubtype::Login, outcome, base_url)
}

/// A logout (type User Authentication, subtype Logout, no action).
pub fn logout_event(base_url: impl Into<String>, outcome: Outcome) -> AuditEventBuilder {
    AuditEventBuilder::new(EventSubtype::Logout, outcome, base_url)
}

/// A REST interaction (type Restful Operation, subtype the interaction, action as
/// [`RestInteraction::action`]).
pub fn rest_event(
    interaction: RestInteraction,
    base_url: impl Into<String>,
    outcome: Outcome,
) -> AuditEventBuilder {
    AuditEventBuilder::new(EventSubtype::Rest(interaction), outcome, base_url)
}

/// Writes the event as one JSON log line when `enabled` (the server's `logAuditEvents` setting),
/// exactly as the delivery worker logs transmit events: `info` on target `fhir_outbox::audit`, the
/// event in the field `audit_event`. Does nothing otherwise.
pub fn log_audit_event(event: &(impl std::fmt::Display + ?Sized), enabled: bool) {
    if enabled {
        tracing::info!(target: "fhir_outbox::audit", audit_event = %event, "AuditEvent");
    }
}

/// Stores an AuditEvent in `project` through [`capture::create`], with the store's guarantees: in the
/// caller's transaction when given one, `meta.project` set by the store, and no outbox row (AuditEvents
/// never trigger subscriptions). Returns the stored resource. Anything but an AuditEvent is refused
/// with [`StoreError::InvalidResource`], so this can never capture a change by mistake.
pub async fn record<'e>(
    db: impl PgExecutor<'e>,
    project: Uuid,
    event: &Value,
    context: &WriteContext,
) -> Result<Value, StoreError> {
    let resource_type = event.get("resourceType").and_then(Value::as_str);
    if resource_type != Some("AuditEvent") {
        return Err(StoreError::InvalidResource(format!(
            "record stores AuditEvents only, got {}",
            resource_type.unwrap_or("no resourceType")
        )));
    }
    Ok(capture::create(db, project, event, context).await?.resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    const BASE: &str = "https://fhir.example.com/";

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn practitioner() -> Value {
        json!({ "resourceType": "Practitioner", "id": "pr1", "name": [{ "given": ["Alice"], "family": "Smith" }] })
    }

    #[test]
    fn login_event_is_user_authentication_without_action() {
        let event = login_event(BASE, Outcome::Success)
            .who(json!({ "reference": "Practitioner/pr1", "display": "Alice Smith" }))
            .recorded(at())
            .build();
        assert_eq!(
            event,
            json!({
                "resourceType": "AuditEvent",
                "type": { "system": DICOM_CODE_SYSTEM, "code": "110114", "display": "User Authentication" },
                "subtype": [{ "system": DICOM_CODE_SYSTEM, "code": "110122", "display": "Login" }],
                "recorded": "2026-01-02T03:04:05.678Z",
                "source": { "observer": { "identifier": { "value": BASE } } },
                "agent": [{ "who": { "reference": "Practitioner/pr1", "display": "Alice Smith" }, "requestor": true }],
                "outcome": "0"
            })
        );
    }

    #[test]
    fn logout_event_has_logout_subtype_and_no_action() {
        let event = logout_event(BASE, Outcome::Success).build();
        assert_eq!(event["type"]["code"], "110114");
        assert_eq!(event["subtype"], json!([LOGOUT.to_json()]));
        assert_eq!(event["subtype"][0]["code"], "110123");
        assert!(event.get("action").is_none());
        assert!(event["agent"][0].get("who").is_none());
        assert_eq!(event["agent"][0]["requestor"], true);
    }

    #[test]
    fn failed_login_carries_outcome_and_description() {
        let event = login_event(BASE, Outcome::MinorFailure)
            .description("Invalid password")
            .build();
        assert_eq!(event["outcome"], "4");
        assert_eq!(event["outcomeDesc"], "Invalid password");
        assert!(
            login_event(BASE, Outcome::Success)
                .build()
                .get("outcomeDesc")
                .is_none()
        );
    }

    #[test]
    fn outcome_codes() {
        for (outcome, code) in [
            (Outcome::Success, "0"),
            (Outcome::MinorFailure, "4"),
            (Outcome::SeriousFailure, "8"),
            (Outcome::MajorFailure, "12"),
        ] {
            assert_eq!(
                rest_event(RestInteraction::Read, BASE, outcome).build()["outcome"],
                code
            );
        }
    }

    #[test]
    fn each_rest_interaction_has_medplums_action() {
        let expected = [
            ("read", Some("R")),
            ("vread", Some("R")),
            ("update", Some("U")),
            ("patch", Some("U")),
            ("delete", Some("D")),
            ("history", Some("R")),
            ("create", Some("C")),
            ("search", Some("R")),
            ("batch", None),
            ("transaction", None),
            ("operation", None),
        ];
        assert_eq!(RestInteraction::ALL.len(), expected.len());
        for (interaction, (code, action)) in RestInteraction::ALL.into_iter().zip(expected) {
            assert_eq!(RestInteraction::parse(code), Some(interaction));
            let event = rest_event(interaction, BASE, Outcome::Success).build();
            assert_eq!(event["type"], RESTFUL_OPERATION.to_json());
            assert_eq!(event["type"]["system"], AUDIT_EVENT_TYPE_SYSTEM);
            assert_eq!(event["type"]["code"], "rest");
            assert_eq!(
                event["subtype"],
                json!([{ "system": RESTFUL_INTERACTION_SYSTEM, "code": code, "display": code }])
            );
            assert_eq!(
                event.get("action").and_then(Value::as_str),
                action,
                "{code}"
            );
        }
        assert_eq!(RestInteraction::parse("bogus"), None);
        assert_eq!(Action::Execute.code(), "E");
    }

    #[test]
    fn entity_is_a_reference_to_the_resource_or_the_query() {
        let patient = json!({ "resourceType": "Patient", "id": "p1", "name": [{ "family": "Chalmers", "given": ["Peter"] }] });
        let read = rest_event(RestInteraction::Read, BASE, Outcome::Success)
            .resource(&patient)
            .build();
        assert_eq!(
            read["entity"],
            json!([{ "what": { "reference": "Patient/p1", "display": "Peter Chalmers" } }])
        );
        let by_reference = rest_event(RestInteraction::Delete, BASE, Outcome::Success)
            .resource(&json!({ "reference": "Patient/p2" }))
            .build();
        assert_eq!(
            by_reference["entity"],
            json!([{ "what": { "reference": "Patient/p2" } }])
        );

        let search = rest_event(RestInteraction::Search, BASE, Outcome::Success)
            .search_query("Patient?name=Chalmers")
            .build();
        assert_eq!(
            search["entity"],
            json!([{ "query": "Patient?name=Chalmers" }])
        );

        // As in Medplum, the resource wins when both are given.
        let both = rest_event(RestInteraction::Read, BASE, Outcome::Success)
            .search_query("Patient?name=Chalmers")
            .resource(&patient)
            .build();
        assert_eq!(both["entity"][0]["what"]["reference"], "Patient/p1");
        assert!(both["entity"][0].get("query").is_none());

        let none = rest_event(RestInteraction::Batch, BASE, Outcome::Success).build();
        assert!(none.get("entity").is_none());
        let unsaved = rest_event(RestInteraction::Create, BASE, Outcome::MinorFailure)
            .resource(&json!({ "resourceType": "Patient" }))
            .build();
        assert!(unsaved.get("entity").is_none());
    }

    #[test]
    fn remote_address_gives_a_network_agent() {
        let event = login_event(BASE, Outcome::Success)
            .who(practitioner())
            .remote_address("203.0.113.7")
            .build();
        assert_eq!(
            event["agent"],
            json!([{
                "who": { "reference": "Practitioner/pr1", "display": "Alice Smith" },
                "requestor": true,
                "network": { "address": "203.0.113.7", "type": "2" }
            }])
        );
        let empty = login_event(BASE, Outcome::Success)
            .remote_address("")
            .build();
        assert!(empty["agent"][0].get("network").is_none());
    }

    #[test]
    fn duration_and_tracing_extensions() {
        let event = rest_event(RestInteraction::Read, BASE, Outcome::Success)
            .tracing("req-1", "trace-1")
            .duration(Duration::from_micros(12_500))
            .build();
        assert_eq!(
            event["extension"],
            json!([
                {
                    "url": super::super::TRACING_EXTENSION,
                    "extension": [
                        { "url": "requestId", "valueId": "req-1" },
                        { "url": "traceId", "valueId": "trace-1" }
                    ]
                },
                { "url": DURATION_EXTENSION, "valueInteger": 13 }
            ])
        );
        let rounded_down = rest_event(RestInteraction::Read, BASE, Outcome::Success)
            .duration(Duration::from_micros(12_499))
            .build();
        assert_eq!(
            rounded_down["extension"],
            json!([{ "url": DURATION_EXTENSION, "valueInteger": 12 }])
        );
        let plain = rest_event(RestInteraction::Read, BASE, Outcome::Success)
            .duration(Duration::ZERO)
            .build();
        assert!(plain.get("extension").is_none());
    }

    #[test]
    fn recorded_defaults_to_now() {
        let before = Utc::now();
        let event = logout_event(BASE, Outcome::Success).build();
        let recorded = DateTime::parse_from_rfc3339(event["recorded"].as_str().unwrap()).unwrap();
        assert!(recorded >= before - chrono::Duration::milliseconds(1));
        assert!(recorded <= Utc::now());
    }

    #[test]
    fn redaction_comes_from_the_server_or_the_project_setting() {
        let off = json!({});
        let on = json!({ "redactAuditEvents": true });
        assert!(!redaction_enabled(false, &off));
        assert!(redaction_enabled(true, &off));
        assert!(redaction_enabled(false, &on));
        assert!(redaction_enabled(true, &on));
        assert!(!redaction_enabled(
            false,
            &json!({ "redactAuditEvents": false })
        ));
        assert!(!redaction_enabled(
            false,
            &json!({ "redactAuditEvents": "true" })
        ));
        assert!(!redaction_enabled(false, &Value::Null));
        let medplum_shape = json!([{ "name": "redactAuditEvents", "valueBoolean": true }]);
        assert!(redaction_enabled(false, &medplum_shape));
        assert!(!redaction_enabled(
            false,
            &json!([{ "name": "redactAuditEvents", "valueBoolean": false }])
        ));
    }

    #[test]
    fn redaction_strips_displays_from_every_reference() {
        let patient = json!({ "resourceType": "Patient", "id": "p1", "name": [{ "text": "Peter Chalmers" }] });
        let build = |settings: &Value, server: bool| {
            rest_event(RestInteraction::Read, BASE, Outcome::Success)
                .who(practitioner())
                .resource(&patient)
                .redact(redaction_enabled(server, settings))
                .build()
        };
        let plain = build(&json!({}), false);
        assert_eq!(plain["agent"][0]["who"]["display"], "Alice Smith");
        assert_eq!(plain["entity"][0]["what"]["display"], "Peter Chalmers");
        for redacted in [
            build(&json!({}), true),
            build(&json!({ "redactAuditEvents": true }), false),
        ] {
            assert_eq!(
                redacted["agent"][0]["who"],
                json!({ "reference": "Practitioner/pr1" })
            );
            assert_eq!(
                redacted["entity"][0]["what"],
                json!({ "reference": "Patient/p1" })
            );
            assert_eq!(
                redacted["source"]["observer"],
                json!({ "identifier": { "value": BASE } })
            );
        }
        // References given as such lose their display too, and keep everything else.
        let given = rest_event(RestInteraction::Update, BASE, Outcome::Success)
            .who(json!({ "reference": "Practitioner/pr1", "display": "Alice Smith", "type": "Practitioner" }))
            .resource(&json!({ "reference": "Patient/p1", "display": "Peter Chalmers" }))
            .redact(true)
            .build();
        assert_eq!(
            given["agent"][0]["who"],
            json!({ "reference": "Practitioner/pr1", "type": "Practitioner" })
        );
        assert_eq!(
            given["entity"][0]["what"],
            json!({ "reference": "Patient/p1" })
        );
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `log_audit_event` writes through a JSON subscriber like the server's `--log-format json`.
    fn logged(event: &Value, enabled: bool) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || log_audit_event(event, enabled));
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn logging_writes_one_json_line_only_when_enabled() {
        let event = rest_event(RestInteraction::Read, BASE, Outcome::Success)
            .search_query("Patient?name=x")
            .build();
        let output = logged(&event, true);
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 1, "{output}");
        let line: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["target"], "fhir_outbox::audit");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["message"], "AuditEvent");
        let logged_event: Value =
            serde_json::from_str(line["fields"]["audit_event"].as_str().unwrap()).unwrap();
        assert_eq!(logged_event, event);

        assert_eq!(logged(&event, false), "");
    }
}
