//! The Subscriptions Backport's operations, in FHIR JSON, under `/fhir/{project}` on the console's
//! address, with the console's token rules (any role; a token scoped to a project sees that
//! project only):
//!
//! - `GET /fhir/{project}/Subscription/{id}/$status` and `GET /fhir/{project}/Subscription/$status?id=a,b`:
//!   a `searchset` Bundle of subscription status `Parameters` (`type` `query-status`), with an
//!   `error` for each issue of the subscription's current version and for a failed latest
//!   notification;
//! - `GET /fhir/{project}/Subscription/{id}/$events?eventsSinceNumber=&eventsUntilNumber=&content=`:
//!   the stored events in that range as a `history` Bundle (`type` `query-event`), so that a
//!   receiver that saw a gap in the event numbers recovers what it missed (up to
//!   [`EVENTS_PER_PAGE`] per request, the retention period back).
//!
//! Errors are `OperationOutcome`s with the status of the console's refusals, a missing or bad
//! token's 401 included (a FHIR client reads those, not the console's JSON).

use super::api::visible_project;
use super::queries::{self, StoredEvent, TopicSubscriptionStatus};
use super::{Authenticated, ConsoleState, Refusal};
use crate::topic::{
    self, BackportSubscription, NotificationEvent, NotificationType, PayloadContent,
    SubscriptionStatus,
};
use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

/// Most events one `$events` request returns (ask again from the last number for more).
pub const EVENTS_PER_PAGE: i64 = 100;

/// Most subscriptions one `$status` request reports on.
const STATUSES_PER_REQUEST: usize = 100;

/// The operations' routes, relative to `/fhir`.
pub(super) fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/{project}/Subscription/$status", get(statuses))
        .route("/{project}/Subscription/{id}/$status", get(status))
        .route("/{project}/Subscription/{id}/$events", get(events))
}

/// A FHIR answer: the resource as `application/fhir+json`, or an `OperationOutcome`.
struct Fhir(Result<Value, Refusal>);

impl IntoResponse for Fhir {
    fn into_response(self) -> Response {
        let (status, body) = match self.0 {
            Ok(resource) => (StatusCode::OK, resource),
            Err(refusal) => (refusal.status, operation_outcome(&refusal)),
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            body.to_string(),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(super::BEARER_CHALLENGE),
            );
        }
        response
    }
}

/// The caller, authenticated as the console's API does, refused with an `OperationOutcome`.
struct FhirCaller(Authenticated);

impl FromRequestParts<ConsoleState> for FhirCaller {
    type Rejection = Fhir;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        Authenticated::from_request_parts(parts, state)
            .await
            .map(FhirCaller)
            .map_err(|refusal| Fhir(Err(refusal)))
    }
}

fn operation_outcome(refusal: &Refusal) -> Value {
    let code = match refusal.status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "security",
        StatusCode::BAD_REQUEST => "invalid",
        _ => "exception",
    };
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": refusal.message}]
    })
}

fn bad_request(message: String) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, message)
}

#[derive(Deserialize)]
struct StatusQuery {
    /// Comma-separated subscription ids (repeating `id` is not supported by this form).
    id: Option<String>,
}

async fn statuses(
    State(state): State<ConsoleState>,
    FhirCaller(auth): FhirCaller,
    Path(project): Path<String>,
    Query(query): Query<StatusQuery>,
) -> Fhir {
    let ids: Vec<String> = query
        .id
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    Fhir(status_bundle(&state, &auth, &project, ids).await)
}

async fn status(
    State(state): State<ConsoleState>,
    FhirCaller(auth): FhirCaller,
    Path((project, id)): Path<(String, String)>,
) -> Fhir {
    Fhir(status_bundle(&state, &auth, &project, vec![id]).await)
}

/// A `searchset` of the status of each named subscription (each must be a subscription to a
/// topic in the project).
async fn status_bundle(
    state: &ConsoleState,
    auth: &Authenticated,
    project: &str,
    ids: Vec<String>,
) -> Result<Value, Refusal> {
    let project = visible_project(auth, project)?;
    if ids.is_empty() {
        return Err(bad_request(
            "name the subscriptions: Subscription/{id}/$status or Subscription/$status?id=a,b"
                .to_owned(),
        ));
    }
    if ids.len() > STATUSES_PER_REQUEST {
        return Err(bad_request(format!(
            "at most {STATUSES_PER_REQUEST} subscriptions per $status request"
        )));
    }
    let found = queries::topic_subscription_statuses(&state.pool, project, &ids)
        .await
        .map_err(Refusal::internal)?;
    let mut entries = Vec::with_capacity(ids.len());
    for id in &ids {
        let stored = found
            .iter()
            .find(|found| &found.subscription_id == id)
            .ok_or_else(|| not_found(id))?;
        let subscription = backport(stored)?;
        let status = SubscriptionStatus {
            subscription_id: id,
            topic_url: &subscription.topic_url,
            status: &stored.status,
            notification_type: NotificationType::QueryStatus,
            events_since_subscription_start: stored.events_since_start,
            errors: stored.errors.clone(),
        };
        let parameters =
            topic::status_parameters(&state.fhir_base_url, &status, &[], subscription.content);
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": parameters,
            "search": {"mode": "match"}
        }));
    }
    Ok(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "total": entries.len(),
        "entry": entries
    }))
}

fn not_found(id: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("Subscription/{id} is not a subscription to a topic in this project"),
    )
}

/// The subscription as the backport profile reads it (what it does not support does not matter
/// to `$status` and `$events`).
fn backport(stored: &TopicSubscriptionStatus) -> Result<BackportSubscription, Refusal> {
    let content = stored.content.as_ref().map_err(Refusal::internal)?;
    let (subscription, _) = BackportSubscription::parse(content).map_err(|error| {
        bad_request(format!(
            "Subscription/{} cannot be read as a subscription to a topic: {error}",
            stored.subscription_id
        ))
    })?;
    Ok(subscription)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventsQuery {
    events_since_number: Option<String>,
    events_until_number: Option<String>,
    content: Option<String>,
}

fn number(name: &str, value: Option<&str>) -> Result<Option<i64>, Refusal> {
    value
        .map(|text| {
            text.parse::<i64>()
                .ok()
                .filter(|number| *number >= 1)
                .ok_or_else(|| bad_request(format!("{name} `{text}` is not a positive integer")))
        })
        .transpose()
}

async fn events(
    State(state): State<ConsoleState>,
    FhirCaller(auth): FhirCaller,
    Path((project, id)): Path<(String, String)>,
    Query(query): Query<EventsQuery>,
) -> Fhir {
    Fhir(events_bundle(&state, &auth, &project, &id, &query).await)
}

async fn events_bundle(
    state: &ConsoleState,
    auth: &Authenticated,
    project: &str,
    id: &str,
    query: &EventsQuery,
) -> Result<Value, Refusal> {
    let project = visible_project(auth, project)?;
    let since = number("eventsSinceNumber", query.events_since_number.as_deref())?.unwrap_or(1);
    let until =
        number("eventsUntilNumber", query.events_until_number.as_deref())?.unwrap_or(i64::MAX);
    if until < since {
        return Err(bad_request(format!(
            "eventsUntilNumber {until} is below eventsSinceNumber {since}"
        )));
    }
    let found = queries::topic_subscription_statuses(&state.pool, project, &[id.to_owned()])
        .await
        .map_err(Refusal::internal)?;
    let stored = found.first().ok_or_else(|| not_found(id))?;
    let subscription = backport(stored)?;
    let content = match query.content.as_deref() {
        None => subscription.content,
        Some(code) => PayloadContent::parse(code).ok_or_else(|| {
            bad_request(format!(
                "content `{code}` is not empty, id-only or full-resource"
            ))
        })?,
    };
    let stored_events: Vec<StoredEvent> = queries::stored_events(
        &state.pool,
        project,
        id,
        since,
        until,
        EVENTS_PER_PAGE,
        content == PayloadContent::FullResource,
    )
    .await
    .map_err(Refusal::internal)?;
    let mut focuses = Vec::with_capacity(stored_events.len());
    for event in &stored_events {
        focuses.push(match &event.content {
            Some(Ok(content)) => Some(content),
            Some(Err(error)) => return Err(Refusal::internal(error)),
            None => None,
        });
    }
    let events: Vec<NotificationEvent<'_>> = stored_events
        .iter()
        .zip(focuses)
        .map(|(event, focus)| NotificationEvent {
            number: event.event_number,
            timestamp: event.changed_at,
            focus_type: &event.resource_type,
            focus_id: &event.resource_id,
            focus_version: event.version_id,
            focus,
            deleted: event.deleted,
        })
        .collect();
    let status = SubscriptionStatus {
        subscription_id: id,
        topic_url: &subscription.topic_url,
        status: &stored.status,
        notification_type: NotificationType::QueryEvent,
        events_since_subscription_start: stored.events_since_start,
        errors: stored.errors.clone(),
    };
    Ok(topic::notification_bundle(
        &state.fhir_base_url,
        &status,
        &events,
        content,
        Utc::now(),
    ))
}
