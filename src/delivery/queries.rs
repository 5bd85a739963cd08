//! The SQL of the delivery stage.

use super::outcome::Completion;
use crate::capture::Interaction;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// A delivery claimed by this worker, with its lease.
#[derive(Debug, Clone)]
pub(super) struct ClaimedDelivery {
    pub id: i64,
    pub webhook_id: Uuid,
    pub project_id: Uuid,
    pub subscription_id: String,
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

/// A claimed delivery, with what its preamble needs, read in the claim's own statement.
#[derive(Debug)]
pub(super) struct Claimed {
    pub delivery: ClaimedDelivery,
    pub resource: ResourceNow,
    /// Its subscription as it stands now: on the first delivery of each subscription in the batch
    /// only (the others share it).
    pub subscription: Option<SubscriptionNow>,
}

/// A subscription as it stands now, with its project's settings: shared by the deliveries of a
/// batch to it.
#[derive(Debug)]
pub(super) struct SubscriptionNow {
    /// `None` when the subscription was deleted (or never existed).
    pub content: Option<std::sync::Arc<serde_json::Value>>,
    /// The project's settings (`{}` when it has none).
    pub settings: serde_json::Value,
    /// Why the subscription (or the settings) could not be decoded: its deliveries cannot be made.
    pub undecodable: Option<String>,
}

/// Where a delivery's resource stands now, and the content of the version it needs.
#[derive(Debug)]
pub(super) struct ResourceNow {
    /// The resource's newest version (its tombstone when deleted); `None` if it never existed.
    pub current_version: Option<i64>,
    pub deleted: bool,
    /// The content of the version sent (for a delete, the last live version, which a bot
    /// receives); `None` when that version is a deletion or is gone.
    pub content: Option<serde_json::Value>,
    /// Why the content could not be decoded: this delivery cannot be made.
    pub undecodable: Option<String>,
}

struct ClaimRow {
    id: i64,
    webhook_id: Uuid,
    project_id: Uuid,
    subscription_id: String,
    resource_type: String,
    resource_id: String,
    version_id: i64,
    interaction: Interaction,
    changed_at: DateTime<Utc>,
    request_id: String,
    trace_id: String,
    attempts: i32,
    preamble_failures: i32,
    claims: i32,
    lease_token: Uuid,
    current_version: Option<i64>,
    deleted: bool,
    content: Option<String>,
    first_of_subscription: bool,
    subscription: Option<String>,
    settings: Option<String>,
}

/// Claims up to `limit` deliveries that are due, or whose lease expired (their worker died), and
/// takes a fresh lease on each. Deliveries of paused subscriptions wait. The same statement reads
/// what the preamble needs (each subscription once, each resource), so that a claim is one round
/// trip. The JSON travels as text and is decoded row by row: one that cannot be decoded stops its
/// own deliveries (see `ResourceNow::undecodable`), never the claim.
pub(super) async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    lease_seconds: f64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query_as!(
        ClaimRow,
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
           due AS (SELECT id FROM expired UNION ALL SELECT id FROM pending LIMIT $1),
           claimed AS (
               UPDATE fhir_outbox.delivery d
               SET state = 'in_flight', lease_token = gen_random_uuid(),
                   lease_expires_at = now() + make_interval(secs => $2), claims = d.claims + 1
               FROM due WHERE d.id = due.id
               RETURNING d.*),
           numbered AS (
               SELECT c.*, row_number() OVER (PARTITION BY c.project_id, c.subscription_id ORDER BY c.id) = 1
                          AS first_of_subscription
               FROM claimed c)
           SELECT c.id, c.webhook_id, c.project_id, c.subscription_id, c.resource_type, c.resource_id, c.version_id,
                  c.interaction AS "interaction!: Interaction", c.changed_at, c.request_id, c.trace_id,
                  c.attempts, c.preamble_failures, c.claims, c.lease_token AS "lease_token!",
                  r.version_id AS "current_version?", coalesce(r.deleted, false) AS "deleted!",
                  v.content::text AS "content?", c.first_of_subscription AS "first_of_subscription!",
                  sv.content::text AS "subscription?",
                  CASE WHEN c.first_of_subscription THEN coalesce(p.settings, '{}')::text END AS "settings?"
           FROM numbered c
           LEFT JOIN fhir_outbox.resource r
                  ON r.project_id = c.resource_project_id AND r.resource_type = c.resource_type
                 AND r.id = c.resource_id
           -- A delete's tombstone directly follows the last live version: that is the one read.
           LEFT JOIN fhir_outbox.resource_version v
                  ON v.project_id = c.resource_project_id AND v.resource_type = c.resource_type
                 AND v.id = c.resource_id
                 AND v.version_id = CASE WHEN c.interaction = 'delete' THEN c.version_id - 1
                                         ELSE c.version_id END
           LEFT JOIN fhir_outbox.resource sr
                  ON c.first_of_subscription AND sr.project_id = c.project_id
                 AND sr.resource_type = 'Subscription' AND sr.id = c.subscription_id AND NOT sr.deleted
           LEFT JOIN fhir_outbox.resource_version sv
                  ON sv.project_id = sr.project_id AND sv.resource_type = sr.resource_type
                 AND sv.id = sr.id AND sv.version_id = sr.version_id
           LEFT JOIN fhir_outbox.project p ON c.first_of_subscription AND p.id = c.project_id
           ORDER BY c.id"#,
        limit,
        lease_seconds
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| Claimed {
            subscription: row
                .first_of_subscription
                .then(|| subscription_now(row.subscription, row.settings)),
            resource: {
                let (content, undecodable) =
                    match row.content.as_deref().map(crate::fhir::decode_stored) {
                        None => (None, None),
                        Some(Ok(content)) => (Some(content), None),
                        Some(Err(error)) => {
                            (None, Some(format!("cannot decode resource: {error}")))
                        }
                    };
                ResourceNow {
                    current_version: row.current_version,
                    deleted: row.deleted,
                    content,
                    undecodable,
                }
            },
            delivery: ClaimedDelivery {
                id: row.id,
                webhook_id: row.webhook_id,
                project_id: row.project_id,
                subscription_id: row.subscription_id,
                resource_type: row.resource_type,
                resource_id: row.resource_id,
                version_id: row.version_id,
                interaction: row.interaction,
                changed_at: row.changed_at,
                request_id: row.request_id,
                trace_id: row.trace_id,
                attempts: row.attempts,
                preamble_failures: row.preamble_failures,
                claims: row.claims,
                lease_token: row.lease_token,
            },
        })
        .collect())
}

fn subscription_now(subscription: Option<String>, settings: Option<String>) -> SubscriptionNow {
    let decoded = subscription
        .as_deref()
        .map(crate::fhir::decode_stored)
        .transpose()
        .map_err(|error| format!("cannot decode subscription: {error}"))
        .and_then(|content| {
            let settings = settings
                .as_deref()
                .map(crate::fhir::decode_stored)
                .transpose()
                .map_err(|error| format!("cannot decode project settings: {error}"))?;
            Ok((content, settings))
        });
    match decoded {
        Ok((content, settings)) => SubscriptionNow {
            content: content.map(std::sync::Arc::new),
            settings: settings.unwrap_or_else(|| serde_json::json!({})),
            undecodable: None,
        },
        Err(problem) => SubscriptionNow {
            content: None,
            settings: serde_json::json!({}),
            undecodable: Some(problem),
        },
    }
}

/// When the claimer should look again: the earliest `next_attempt_at` later than `after` among
/// pending deliveries of subscriptions not paused (as the claim excludes them), as seconds from the
/// database's clock now (`None`: nothing is scheduled), and that clock. Uses the `delivery_due` index
/// and starts past `after`, the clock of the previous look: a due row that the claim since then could
/// not take (locked by another worker's claim) is returned once, never in a loop.
pub(super) async fn next_due(
    conn: &mut PgConnection,
    after: DateTime<Utc>,
) -> Result<(Option<f64>, DateTime<Utc>), sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT clock_timestamp() AS "now!",
                  extract(epoch FROM (
                      SELECT d.next_attempt_at FROM fhir_outbox.delivery d
                      WHERE d.state = 'pending' AND d.next_attempt_at > $1
                        AND NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                                        WHERE p.project_id = d.project_id
                                          AND p.subscription_id = d.subscription_id)
                      ORDER BY d.next_attempt_at LIMIT 1) - clock_timestamp())::float8 AS "wait?""#,
        after
    )
    .fetch_one(conn)
    .await?;
    Ok((row.wait, row.now))
}

/// Extends the leases of deliveries this worker is still working on. Rows locked by someone else
/// are skipped rather than waited for: they are being recorded (by this worker's recorder) or taken
/// over, and waiting on them would delay the renewal of all the others past their expiry.
pub(super) async fn renew_leases(
    conn: &mut PgConnection,
    tokens: &[Uuid],
    lease_seconds: f64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE fhir_outbox.delivery SET lease_expires_at = now() + make_interval(secs => $2)
         WHERE id IN (SELECT id FROM fhir_outbox.delivery
                      WHERE state = 'in_flight' AND lease_token = ANY($1)
                      FOR UPDATE SKIP LOCKED)",
        tokens,
        lease_seconds
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Gives deliveries back (on shutdown): due again at once, for any worker.
pub(super) async fn release(conn: &mut PgConnection, tokens: &[Uuid]) -> Result<u64, sqlx::Error> {
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

/// Writes each completion if, and only if, this worker still holds that delivery's lease, in one
/// statement. Returns the ids written; a delivery missing from it lost its lease (another worker took
/// it over), so nothing else about it may be recorded.
pub(super) async fn complete(
    conn: &mut PgConnection,
    completions: &[(i64, Uuid, &Completion)],
) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = completions.iter().map(|(id, _, _)| *id).collect();
    let tokens: Vec<Uuid> = completions.iter().map(|(_, token, _)| *token).collect();
    let states: Vec<&str> = completions
        .iter()
        .map(|(_, _, c)| c.state.as_str())
        .collect();
    let attempts: Vec<i32> = completions.iter().map(|(_, _, c)| c.attempts).collect();
    let preamble_failures: Vec<i32> = completions
        .iter()
        .map(|(_, _, c)| c.preamble_failures)
        .collect();
    let next_attempts: Vec<Option<DateTime<Utc>>> = completions
        .iter()
        .map(|(_, _, c)| c.next_attempt_at)
        .collect();
    let reasons: Vec<Option<String>> = completions
        .iter()
        .map(|(_, _, c)| c.reason.as_ref().map(ToString::to_string))
        .collect();
    let statuses: Vec<Option<i32>> = completions.iter().map(|(_, _, c)| c.last_status).collect();
    sqlx::query_scalar!(
        r#"UPDATE fhir_outbox.delivery d
           SET state = c.state, attempts = c.attempts, preamble_failures = c.preamble_failures,
               next_attempt_at = coalesce(c.next_attempt_at, d.next_attempt_at),
               finished_at = CASE WHEN c.state = 'pending' THEN NULL ELSE now() END,
               reason = c.reason, last_status = coalesce(c.last_status, d.last_status),
               lease_token = NULL, lease_expires_at = NULL
           FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::int4[], $5::int4[], $6::timestamptz[],
                       $7::text[], $8::int4[])
                AS c(id, lease_token, state, attempts, preamble_failures, next_attempt_at, reason,
                     last_status)
           WHERE d.id = c.id AND d.lease_token = c.lease_token AND d.state = 'in_flight'
           RETURNING d.id"#,
        &ids,
        &tokens,
        &states as &[&str],
        &attempts,
        &preamble_failures,
        &next_attempts as &[Option<DateTime<Utc>>],
        &reasons as &[Option<String>],
        &statuses as &[Option<i32>],
    )
    .fetch_all(conn)
    .await
}

/// One HTTP attempt, for the attempt log.
#[derive(Debug, Clone)]
pub(super) struct AttemptRecord {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub succeeded: bool,
    pub status: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// Appends to the attempt log, with the id of each attempt's stored AuditEvent (if any).
pub(super) async fn insert_attempts(
    conn: &mut PgConnection,
    attempts: &[(&ClaimedDelivery, &AttemptRecord, Option<&str>)],
) -> Result<(), sqlx::Error> {
    let delivery_ids: Vec<i64> = attempts.iter().map(|(d, _, _)| d.id).collect();
    let projects: Vec<Uuid> = attempts.iter().map(|(d, _, _)| d.project_id).collect();
    let subscriptions: Vec<&str> = attempts
        .iter()
        .map(|(d, _, _)| d.subscription_id.as_str())
        .collect();
    let numbers: Vec<i32> = attempts.iter().map(|(_, a, _)| a.attempt).collect();
    let started: Vec<DateTime<Utc>> = attempts.iter().map(|(_, a, _)| a.started_at).collect();
    let durations: Vec<i32> = attempts.iter().map(|(_, a, _)| a.duration_ms).collect();
    let succeeded: Vec<bool> = attempts.iter().map(|(_, a, _)| a.succeeded).collect();
    let statuses: Vec<Option<i32>> = attempts.iter().map(|(_, a, _)| a.status).collect();
    let errors: Vec<Option<&str>> = attempts
        .iter()
        .map(|(_, a, _)| a.error.as_deref())
        .collect();
    let bodies: Vec<Option<&str>> = attempts
        .iter()
        .map(|(_, a, _)| a.response_body.as_deref())
        .collect();
    let events: Vec<Option<&str>> = attempts.iter().map(|(_, _, event)| *event).collect();
    sqlx::query!(
        "INSERT INTO fhir_outbox.delivery_attempt
             (delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
              status, error, response_body, audit_event_id)
         SELECT * FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::int4[], $5::timestamptz[],
                              $6::int4[], $7::bool[], $8::int4[], $9::text[], $10::text[], $11::text[])",
        &delivery_ids,
        &projects,
        &subscriptions as &[&str],
        &numbers,
        &started,
        &durations,
        &succeeded,
        &statuses as &[Option<i32>],
        &errors as &[Option<&str>],
        &bodies as &[Option<&str>],
        &events as &[Option<&str>],
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores AuditEvents (`fhir_outbox.create_audit_events`: stamped as `create_resource` stamps, no
/// outbox rows), each in its project. Returns their ids in the order given.
pub(super) async fn create_audit_events(
    conn: &mut PgConnection,
    events: &[(Uuid, &serde_json::Value)],
) -> Result<Vec<String>, sqlx::Error> {
    let projects: Vec<Uuid> = events.iter().map(|(project, _)| *project).collect();
    let bodies: Vec<&serde_json::Value> = events.iter().map(|(_, event)| *event).collect();
    sqlx::query_scalar!(
        r#"SELECT audit_event_id AS "id!" FROM fhir_outbox.create_audit_events($1, $2) ORDER BY ordinal"#,
        &projects,
        &bodies as &[&serde_json::Value],
    )
    .fetch_all(conn)
    .await
}
