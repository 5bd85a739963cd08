//! What operators read and steer: delivery status, the delivery list, retry, resend, pause and
//! resume, endpoints' health and the reset of a circuit. The CLI prints these; the SQL is here, over the public views of `migrations/`.
//!
//! Every write action names its project: an operator acting on project A can never touch B's
//! deliveries or resources.

use crate::capture::{self, Interaction, StoreError};
use crate::delivery::DeliveryState;
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
                  oldest_undelivered_at, last_error, last_skip_reason, issues AS "issues!",
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

/// One delivery, for `fhir-outbox deliveries`.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    /// Delivery id.
    pub id: i64,
    /// The `webhook-id` header its requests carry (the same on every retry): what a receiver logs.
    pub webhook_id: Uuid,
    /// Project.
    pub project_id: Uuid,
    /// Subscription id.
    pub subscription_id: String,
    /// `Type/id`.
    pub resource: String,
    /// Version delivered.
    pub version_id: i64,
    /// create, update or delete.
    pub interaction: String,
    /// pending, in_flight, succeeded, skipped or failed.
    pub state: DeliveryState,
    /// HTTP attempts made.
    pub attempts: i32,
    /// The HTTP status of the last attempt that got a response (none yet, or only network errors:
    /// `None`).
    pub last_status: Option<i32>,
    /// When the change was made.
    pub changed_at: DateTime<Utc>,
    /// Next attempt (pending) .
    pub next_attempt_at: DateTime<Utc>,
    /// Last error or skip reason.
    pub reason: Option<String>,
}

/// Filters of [`deliveries`].
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// Only this project.
    pub project: Option<Uuid>,
    /// Only this subscription.
    pub subscription: Option<String>,
    /// Only this state.
    pub state: Option<DeliveryState>,
    /// Only changes made since.
    pub since: Option<DateTime<Utc>>,
    /// At most this many, newest first.
    pub limit: i64,
}

/// Deliveries, newest first.
pub async fn deliveries(
    pool: &PgPool,
    filter: &DeliveryFilter,
) -> Result<Vec<DeliveryRow>, ControlError> {
    Ok(sqlx::query_as!(
        DeliveryRow,
        r#"SELECT id, webhook_id, project_id, subscription_id,
                  resource_type || '/' || resource_id AS "resource!", version_id, interaction,
                  state AS "state: DeliveryState", attempts, last_status, changed_at, next_attempt_at,
                  reason
           FROM fhir_outbox.delivery
           WHERE ($1::uuid IS NULL OR project_id = $1)
             AND ($2::text IS NULL OR subscription_id = $2)
             AND ($3::text IS NULL OR state = $3)
             AND ($4::timestamptz IS NULL OR changed_at >= $4)
           ORDER BY id DESC
           LIMIT $5"#,
        filter.project,
        filter.subscription,
        filter.state.map(DeliveryState::as_str),
        filter.since,
        filter.limit
    )
    .fetch_all(pool)
    .await?)
}

/// Which failed deliveries to retry. Besides failed ones, every scope takes the deliveries skipped
/// because the endpoint was refused by the outbound URL check (`http`, a private address, before
/// the allow-unsafe-outbound setting was turned on).
#[derive(Debug, Clone)]
pub enum RetryScope {
    /// One delivery (failed or skipped).
    Delivery(i64),
    /// Every failed delivery of a subscription.
    Subscription(String),
    /// Every failed delivery of the project whose change was made since.
    FailedSince(DateTime<Utc>),
}

/// Puts failed deliveries (and those skipped for a refused endpoint) back to pending with a fresh
/// attempt budget; they keep their `webhook-id`. Returns the ids retried.
pub async fn retry(
    pool: &PgPool,
    project: Uuid,
    scope: &RetryScope,
) -> Result<Vec<i64>, ControlError> {
    let (delivery, subscription, since) = match scope {
        RetryScope::Delivery(id) => (Some(*id), None, None),
        RetryScope::Subscription(id) => (None, Some(id.as_str()), None),
        RetryScope::FailedSince(at) => (None, None, Some(*at)),
    };
    let mut tx = pool.begin().await?;
    let ids = sqlx::query_scalar!(
        "UPDATE fhir_outbox.delivery
         SET state = 'pending', next_attempt_at = now(), attempts = 0, preamble_failures = 0, claims = 0,
             finished_at = NULL, reason = 'retried by an operator'
         WHERE project_id = $1
           AND (state = 'failed'
                OR (state = 'skipped' AND ($2::bigint IS NOT NULL OR starts_with(reason, $5))))
           AND ($2::bigint IS NULL OR id = $2)
           AND ($3::text IS NULL OR subscription_id = $3)
           AND ($4::timestamptz IS NULL OR changed_at >= $4)
         RETURNING id",
        project,
        delivery,
        subscription,
        since,
        crate::dispatch::matching::ENDPOINT_REFUSED
    )
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query!("SELECT pg_notify('fhir_outbox_delivery', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if ids.is_empty() {
        // Nothing to retry is an answer; an id that names nothing is an error.
        match scope {
            RetryScope::Delivery(id) => {
                let exists = sqlx::query_scalar!(
                    r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.delivery
                                      WHERE project_id = $1 AND id = $2) AS "exists!""#,
                    project,
                    id
                )
                .fetch_one(pool)
                .await?;
                if !exists {
                    return Err(ControlError::UnknownDelivery(*id));
                }
            }
            RetryScope::Subscription(subscription) => {
                require_known_subscription(pool, project, subscription).await?;
            }
            RetryScope::FailedSince(_) => {}
        }
    }
    Ok(ids)
}

/// Fails unless the subscription exists in the project, or did and still has deliveries or a
/// pause (a deleted subscription's deliveries can still be listed, retried or resumed).
pub async fn require_known_subscription(
    pool: &PgPool,
    project: Uuid,
    subscription: &str,
) -> Result<(), ControlError> {
    match require_subscription(pool, project, subscription).await {
        Err(ControlError::UnknownSubscription(_)) => {}
        other => return other,
    }
    let known = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.delivery
                          WHERE project_id = $1 AND subscription_id = $2)
               OR EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause
                          WHERE project_id = $1 AND subscription_id = $2) AS "known!""#,
        project,
        subscription
    )
    .fetch_one(pool)
    .await?;
    if known {
        Ok(())
    } else {
        Err(ControlError::UnknownSubscription(subscription.to_owned()))
    }
}

async fn require_subscription(
    pool: &PgPool,
    project: Uuid,
    subscription: &str,
) -> Result<(), ControlError> {
    match capture::read(pool, project, "Subscription", subscription).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound(_) | StoreError::Gone(_) | StoreError::InvalidId(_)) => {
            Err(ControlError::UnknownSubscription(subscription.to_owned()))
        }
        Err(error) => Err(error.into()),
    }
}

/// Pauses a subscription: its deliveries wait (they are still enqueued). Returns false if it was
/// already paused.
pub async fn pause(pool: &PgPool, project: Uuid, subscription: &str) -> Result<bool, ControlError> {
    require_subscription(pool, project, subscription).await?;
    let inserted = sqlx::query!(
        "INSERT INTO fhir_outbox.subscription_pause (project_id, subscription_id) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
        project,
        subscription
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Resumes a paused subscription; its waiting deliveries go out. Returns false if it was not paused,
/// and fails if the project has no such subscription.
pub async fn resume(
    pool: &PgPool,
    project: Uuid,
    subscription: &str,
) -> Result<bool, ControlError> {
    require_known_subscription(pool, project, subscription).await?;
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query!(
        "DELETE FROM fhir_outbox.subscription_pause WHERE project_id = $1 AND subscription_id = $2",
        project,
        subscription
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query!("SELECT pg_notify('fhir_outbox_delivery', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(deleted == 1)
}

/// Sends a resource's current version again (Medplum's `$resend`): an outbox row marked `resend`,
/// evaluated by dispatch like any change, for every subscription or only `subscription`. The
/// interaction is `update` by default, with the version before the current one as previous version;
/// `create` sends it with no previous version. Returns the outbox position.
pub async fn resend(
    pool: &PgPool,
    project: Uuid,
    resource_type: &str,
    id: &str,
    subscription: Option<&str>,
    interaction: Interaction,
) -> Result<i64, ControlError> {
    let reference = format!("{resource_type}/{id}");
    if let Some(subscription) = subscription {
        require_subscription(pool, project, subscription).await?;
    }
    if interaction == Interaction::Delete {
        return Err(ControlError::Resend {
            reference,
            reason: "only create and update can be resent".into(),
        });
    }
    let history = capture::history(pool, project, resource_type, id).await?;
    let Some(current) = history.first() else {
        return Err(ControlError::Resend {
            reference,
            reason: "it does not exist in this project".into(),
        });
    };
    if current.deleted {
        return Err(ControlError::Resend {
            reference,
            reason: "it is deleted".into(),
        });
    }
    let previous = match interaction {
        Interaction::Update => history
            .get(1)
            .filter(|entry| !entry.deleted)
            .map(|entry| entry.version_id),
        _ => None,
    };
    let mut tx = pool.begin().await?;
    let seq = sqlx::query_scalar!(
        "INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id,
             previous_version_id, interaction, changed_at, request_id, trace_id, resend,
             resend_subscription_id)
         VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp(), gen_random_uuid()::text,
                 gen_random_uuid()::text, true, $7)
         RETURNING seq",
        project,
        resource_type,
        id,
        current.version_id,
        previous,
        interaction.as_str(),
        subscription
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!("SELECT pg_notify('fhir_outbox_change', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(seq)
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
}

/// Endpoints from `fhir_outbox.endpoint_health`: those with an open or half-open circuit or
/// recent failures, or every one with `all`.
pub async fn endpoint_health(
    pool: &PgPool,
    project: Option<Uuid>,
    all: bool,
) -> Result<Vec<EndpointHealth>, ControlError> {
    Ok(sqlx::query_as!(
        EndpointHealth,
        r#"SELECT project_id AS "project_id!", endpoint AS "endpoint!", state AS "state!",
                  consecutive_failures AS "consecutive_failures!", openings AS "openings!",
                  opened_at, next_probe_at, last_failure, last_failure_at,
                  in_flight AS "in_flight!", pending AS "pending!"
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

/// Closes an endpoint's circuit now (`fhir_outbox.reset_endpoint`), and wakes the workers so that
/// its waiting deliveries go out. `endpoint` may be any URL of it (only scheme, host and port
/// count). Returns false if its circuit was closed already; fails if the project has no such
/// endpoint.
pub async fn reset_endpoint(
    pool: &PgPool,
    project: Uuid,
    endpoint: &str,
) -> Result<bool, ControlError> {
    let mut tx = pool.begin().await?;
    let known = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.endpoint_health
                          WHERE project_id = $1 AND endpoint = fhir_outbox.endpoint_origin($2))
               AS "known!""#,
        project,
        endpoint
    )
    .fetch_one(&mut *tx)
    .await?;
    if !known {
        return Err(ControlError::UnknownEndpoint(endpoint.to_owned()));
    }
    let reset = sqlx::query_scalar!(
        r#"SELECT fhir_outbox.reset_endpoint($1, $2) AS "reset!""#,
        project,
        endpoint
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!("SELECT pg_notify('fhir_outbox_delivery', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(reset)
}
