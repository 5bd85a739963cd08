//! What operators read with the command line: delivery status, endpoints' health (the delivery
//! list is the console's, `console::queries`); and the errors of operator actions (`actions.rs`). The SQL is here, over the public
//! views of `migrations/`.

use crate::capture::StoreError;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Why an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The subscription does not exist in the project.
    #[error("Subscription/{0} not found in this project")]
    UnknownSubscription(String),
    /// The delivery does not exist in the project.
    #[error("delivery {0} not found in this project")]
    UnknownDelivery(i64),
    /// No subscription of the project delivers to the endpoint, and it has no circuit.
    #[error(
        "no subscription of this project delivers to {0} (endpoints are scheme://host:port; `fhir-outbox endpoints --all` lists them)"
    )]
    UnknownEndpoint(String),
    /// The resource cannot be resent.
    #[error("cannot resend {reference}: {reason}")]
    Resend {
        /// `Type/id`.
        reference: String,
        /// Why.
        reason: String,
    },
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ControlError {
    fn from(error: sqlx::Error) -> Self {
        ControlError::Store(StoreError::from(error))
    }
}

/// One row of `fhir_outbox.subscription_delivery_status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SubscriptionStatus {
    /// Project.
    pub project_id: Uuid,
    /// Subscription id.
    pub subscription_id: String,
    /// Its `status`.
    pub status: Option<String>,
    /// Its channel type.
    pub channel_type: Option<String>,
    /// Its criteria.
    pub criteria: Option<String>,
    /// Paused by an operator.
    pub paused: bool,
    /// Deliveries waiting (including retries).
    pub pending: i64,
    /// Deliveries being sent.
    pub in_flight: i64,
    /// Delivered.
    pub succeeded: i64,
    /// Not sent, with a reason (subscription or resource gone, stale version).
    pub skipped: i64,
    /// Given up.
    pub failed: i64,
    /// Cancelled by an operator.
    pub cancelled: i64,
    /// When the oldest undelivered change was made.
    pub oldest_undelivered_at: Option<DateTime<Utc>>,
    /// The latest error of a failed or retrying delivery.
    pub last_error: Option<String>,
    /// The latest skip reason.
    pub last_skip_reason: Option<String>,
    /// Problems recorded for the subscription's current version (`fhir_outbox.subscription_issue`).
    pub issues: i64,
    /// Why the current version is suspended (its evaluation exhausted its budget), if it is.
    pub suspended_reason: Option<String>,
}

/// Delivery state per subscription, optionally for one project.
pub async fn subscription_status(
    pool: &PgPool,
    project: Option<Uuid>,
) -> Result<Vec<SubscriptionStatus>, ControlError> {
    Ok(sqlx::query_as!(
        SubscriptionStatus,
        r#"SELECT project_id AS "project_id!", subscription_id AS "subscription_id!", status, channel_type,
                  criteria, paused AS "paused!", pending AS "pending!", in_flight AS "in_flight!",
                  succeeded AS "succeeded!", skipped AS "skipped!", failed AS "failed!",
                  cancelled AS "cancelled!", oldest_undelivered_at, last_error, last_skip_reason, issues AS "issues!",
                  suspended_reason
           FROM fhir_outbox.subscription_delivery_status
           WHERE $1::uuid IS NULL OR project_id = $1
           ORDER BY project_id, subscription_id"#,
        project
    )
    .fetch_all(pool)
    .await?)
}

/// One row of `fhir_outbox.outbox_backlog`.
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    /// Project.
    pub project_id: Uuid,
    /// Changes not yet dispatched.
    pub undispatched: i64,
    /// How far behind dispatch is (seconds since the oldest undispatched change).
    pub dispatch_lag_seconds: f64,
}

/// The outbox backlog per project.
pub async fn backlog(pool: &PgPool, project: Option<Uuid>) -> Result<Vec<Backlog>, ControlError> {
    Ok(sqlx::query_as!(
        Backlog,
        r#"SELECT project_id AS "project_id!", undispatched AS "undispatched!",
                  extract(epoch FROM dispatch_lag)::float8 AS "dispatch_lag_seconds!"
           FROM fhir_outbox.outbox_backlog
           WHERE $1::uuid IS NULL OR project_id = $1
           ORDER BY project_id"#,
        project
    )
    .fetch_all(pool)
    .await?)
}

/// A change dispatch set aside (`fhir_outbox.outbox_dispatch_error`): never delivered.
#[derive(Debug, Clone, Serialize)]
pub struct SetAside {
    /// Outbox sequence number.
    pub seq: i64,
    /// Project.
    pub project_id: Uuid,
    /// `Type/id`.
    pub resource: String,
    /// Version.
    pub version_id: i64,
    /// Why it could not be dispatched.
    pub dispatch_error: String,
    /// When it was set aside.
    pub dispatched_at: DateTime<Utc>,
}

/// The changes dispatch set aside, newest first, at most `limit`.
pub async fn set_aside(
    pool: &PgPool,
    project: Option<Uuid>,
    limit: i64,
) -> Result<Vec<SetAside>, ControlError> {
    Ok(sqlx::query_as!(
        SetAside,
        r#"SELECT seq AS "seq!", project_id AS "project_id!",
                  resource_type || '/' || resource_id AS "resource!", version_id AS "version_id!",
                  dispatch_error AS "dispatch_error!", dispatched_at AS "dispatched_at!"
           FROM fhir_outbox.outbox_dispatch_error
           WHERE $1::uuid IS NULL OR project_id = $1
           ORDER BY seq DESC LIMIT $2"#,
        project,
        limit
    )
    .fetch_all(pool)
    .await?)
}

/// One row of `fhir_outbox.endpoint_health`: an endpoint (a project's scheme, host and port), its
/// circuit and its load.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EndpointHealth {
    /// Project.
    pub project_id: Uuid,
    /// `scheme://host:port`.
    pub endpoint: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Failing attempts since its last healthy answer.
    pub consecutive_failures: i32,
    /// Openings since it last closed (each doubles the cool-down).
    pub openings: i32,
    /// When its circuit opened.
    pub opened_at: Option<DateTime<Utc>>,
    /// When its probe goes (open), or until when the probe in flight holds it (half-open).
    pub next_probe_at: Option<DateTime<Utc>>,
    /// The last failure's error.
    pub last_failure: Option<String>,
    /// When it last failed.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Its deliveries in flight.
    pub in_flight: i64,
    /// Its deliveries waiting.
    pub pending: i64,
    /// Deliveries it may have in progress, when grown beyond the configured base (it answers
    /// fast); `None`: the base.
    pub allowance: Option<i32>,
}

/// Endpoints from `fhir_outbox.endpoint_health`: those with an open or half-open circuit or
/// recent failures, or every one with `all`.
pub async fn endpoint_health(
    pool: &PgPool,
    project: Option<Uuid>,
    all: bool,
) -> Result<Vec<EndpointHealth>, StoreError> {
    Ok(sqlx::query_as!(
        EndpointHealth,
        r#"SELECT project_id AS "project_id!", endpoint AS "endpoint!", state AS "state!",
                  consecutive_failures AS "consecutive_failures!", openings AS "openings!",
                  opened_at, next_probe_at, last_failure, last_failure_at,
                  in_flight AS "in_flight!", pending AS "pending!", allowance
           FROM fhir_outbox.endpoint_health
           WHERE ($1::uuid IS NULL OR project_id = $1)
             AND ($2 OR state <> 'closed' OR consecutive_failures > 0)
           ORDER BY project_id, state <> 'closed' DESC, endpoint"#,
        project,
        all
    )
    .fetch_all(pool)
    .await?)
}

/// A time that is neither RFC 3339 nor a duration ago.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a time: give an RFC 3339 time (2026-11-22T08:00:00Z) or a duration ago (90s, 15m, 1h, 7d)"
)]
pub struct InvalidTime(pub String);

/// A time given as RFC 3339 (`2026-11-22T08:00:00Z`) or as a duration before `now` (`90s`, `15m`,
/// `1h`, `7d`): what `--since` and the console's filters accept.
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, InvalidTime> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let invalid = || InvalidTime(text.to_owned());
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (amount, unit) = text.split_at(unit_at);
    let amount: i64 = amount.parse().map_err(|_| invalid())?;
    let ago = match unit {
        "s" => chrono::Duration::try_seconds(amount),
        "m" => chrono::Duration::try_minutes(amount),
        "h" => chrono::Duration::try_hours(amount),
        "d" => chrono::Duration::try_days(amount),
        _ => None,
    }
    .ok_or_else(invalid)?;
    now.checked_sub_signed(ago).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |text| parse_time(text, now).map(|at| at.to_rfc3339());
        assert_eq!(at("1h").unwrap(), "2026-12-02T11:00:00+00:00");
        assert_eq!(at("90s").unwrap(), "2026-12-02T11:58:30+00:00");
        assert_eq!(at("7d").unwrap(), "2026-11-25T12:00:00+00:00");
        assert_eq!(
            at("2026-11-22T08:00:00Z").unwrap(),
            "2026-11-22T08:00:00+00:00"
        );
        for bad in ["", "h", "1y", "1.5h", "yesterday", "99999999999999999999d"] {
            assert_eq!(at(bad), Err(InvalidTime(bad.to_owned())), "{bad}");
        }
    }
}
