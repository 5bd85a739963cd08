//! The SQL of the delivery stage.

use crate::capture::Interaction;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// A delivery claimed by this worker, with its lease.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub webhook_id: Uuid,
    pub project_id: Uuid,
    pub subscription_id: String,
    pub resource_project_id: Uuid,
    pub resource_type: String,
    pub resource_id: String,
    pub version_id: i64,
    pub interaction: Interaction,
    pub changed_at: DateTime<Utc>,
    pub request_id: String,
    pub trace_id: String,
    /// HTTP attempts made before this claim.
    pub attempts: i32,
    pub preamble_failures: i32,
    /// Claims including this one.
    pub claims: i32,
    pub lease_token: Uuid,
}

/// Claims up to `limit` deliveries that are due, or whose lease expired (their worker died), and
/// takes a fresh lease on each. Deliveries of paused subscriptions wait.
pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    lease_seconds: f64,
) -> Result<Vec<ClaimedDelivery>, sqlx::Error> {
    sqlx::query_as!(
        ClaimedDelivery,
        r#"WITH pending AS (
               SELECT id FROM fhir_outbox.delivery d
               WHERE state = 'pending' AND next_attempt_at <= now()
                 AND NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                                 WHERE p.project_id = d.project_id AND p.subscription_id = d.subscription_id)
               ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED),
           expired AS (
               SELECT id FROM fhir_outbox.delivery d
               WHERE state = 'in_flight' AND lease_expires_at < now()
                 AND NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                                 WHERE p.project_id = d.project_id AND p.subscription_id = d.subscription_id)
               ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED),
           due AS (SELECT id FROM expired UNION ALL SELECT id FROM pending LIMIT $1)
           UPDATE fhir_outbox.delivery d
           SET state = 'in_flight', lease_token = gen_random_uuid(),
               lease_expires_at = now() + make_interval(secs => $2), claims = d.claims + 1
           FROM due WHERE d.id = due.id
           RETURNING d.id, d.webhook_id, d.project_id, d.subscription_id, d.resource_project_id,
                     d.resource_type, d.resource_id, d.version_id,
                     d.interaction AS "interaction: Interaction", d.changed_at, d.request_id, d.trace_id,
                     d.attempts, d.preamble_failures, d.claims, d.lease_token AS "lease_token!""#,
        limit,
        lease_seconds
    )
    .fetch_all(conn)
    .await
}

/// Extends the leases of deliveries this worker is still working on.
pub async fn renew_leases(
    conn: &mut PgConnection,
    tokens: &[Uuid],
    lease_seconds: f64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE fhir_outbox.delivery SET lease_expires_at = now() + make_interval(secs => $2)
         WHERE state = 'in_flight' AND lease_token = ANY($1)",
        tokens,
        lease_seconds
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Gives deliveries back (on shutdown): due again at once, for any worker.
pub async fn release(conn: &mut PgConnection, tokens: &[Uuid]) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE fhir_outbox.delivery
         SET state = 'pending', next_attempt_at = now(), lease_token = NULL, lease_expires_at = NULL
         WHERE state = 'in_flight' AND lease_token = ANY($1)",
        tokens
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// The new state of a delivery after one execution.
#[derive(Debug, Clone)]
pub struct Completion {
    /// `pending` (retry later), `succeeded`, `skipped` or `failed`.
    pub state: &'static str,
    pub attempts: i32,
    pub preamble_failures: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub last_status: Option<i32>,
}

/// Writes the completion if, and only if, this worker still holds the lease. Returns false when the
/// lease was lost (another worker took the delivery over): then nothing must be recorded.
pub async fn complete(
    conn: &mut PgConnection,
    id: i64,
    lease_token: Uuid,
    completion: &Completion,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query!(
        "UPDATE fhir_outbox.delivery
         SET state = $3, attempts = $4, preamble_failures = $5,
             next_attempt_at = coalesce($6, next_attempt_at),
             finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END,
             reason = $7, last_status = coalesce($8, last_status),
             lease_token = NULL, lease_expires_at = NULL
         WHERE id = $1 AND lease_token = $2 AND state = 'in_flight'",
        id,
        lease_token,
        completion.state,
        completion.attempts,
        completion.preamble_failures,
        completion.next_attempt_at,
        completion.reason,
        completion.last_status,
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// One HTTP attempt, for the attempt log.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub succeeded: bool,
    pub status: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// Appends to the attempt log.
pub async fn insert_attempt(
    conn: &mut PgConnection,
    delivery: &ClaimedDelivery,
    attempt: &AttemptRecord,
    audit_event_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO fhir_outbox.delivery_attempt
             (delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
              status, error, response_body, audit_event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        delivery.id,
        delivery.project_id,
        delivery.subscription_id,
        attempt.attempt,
        attempt.started_at,
        attempt.duration_ms,
        attempt.succeeded,
        attempt.status,
        attempt.error,
        attempt.response_body,
        audit_event_id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A project's settings (`{}` when it has none, or does not exist).
pub async fn project_settings(
    conn: &mut PgConnection,
    project: Uuid,
) -> Result<serde_json::Value, sqlx::Error> {
    let settings = sqlx::query_scalar!(
        "SELECT settings FROM fhir_outbox.project WHERE id = $1",
        project
    )
    .fetch_optional(conn)
    .await?;
    Ok(settings.unwrap_or_else(|| serde_json::json!({})))
}
