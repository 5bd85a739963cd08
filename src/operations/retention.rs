//! Retention: finished deliveries (with their attempt rows) and dispatched outbox rows are deleted
//! after a retention period, so the hot tables stay small; AuditEvents follow their own setting
//! (kept by default: they are the audit trail). Deletes run in bounded batches so pruning never holds
//! long locks or competes with delivery for long.

use serde::Serialize;
use sqlx::PgPool;
use std::time::Duration;

/// Rows deleted per statement.
const BATCH: i64 = 5_000;

/// How long things are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Finished deliveries, their attempts, and dispatched outbox rows.
    pub deliveries: Duration,
    /// AuditEvents; `None` keeps them.
    pub audit_events: Option<Duration>,
}

/// What one pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Deliveries in a final state.
    pub deliveries: u64,
    /// Their attempt rows.
    pub attempts: u64,
    /// Dispatched outbox rows.
    pub outbox_rows: u64,
    /// AuditEvent versions.
    pub audit_events: u64,
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Deletes everything past its retention, batch by batch, until nothing is left to delete.
pub async fn prune(pool: &PgPool, retention: Retention) -> Result<Pruned, sqlx::Error> {
    let mut pruned = Pruned::default();
    let keep = seconds(retention.deliveries);
    loop {
        let mut tx = pool.begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar!(
            "SELECT id FROM fhir_outbox.delivery
             WHERE finished_at < now() - make_interval(secs => $1) AND state IN ('succeeded', 'skipped', 'failed', 'cancelled')
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            keep,
            BATCH
        )
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            break;
        }
        pruned.attempts += sqlx::query!(
            "DELETE FROM fhir_outbox.delivery_attempt WHERE delivery_id = ANY($1)",
            &ids
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        pruned.deliveries +=
            sqlx::query!("DELETE FROM fhir_outbox.delivery WHERE id = ANY($1)", &ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
    }
    loop {
        let deleted = sqlx::query!(
            "DELETE FROM fhir_outbox.outbox WHERE seq IN (
                 SELECT seq FROM fhir_outbox.outbox
                 WHERE dispatched_at < now() - make_interval(secs => $1)
                 ORDER BY dispatched_at LIMIT $2)",
            keep,
            BATCH
        )
        .execute(pool)
        .await?
        .rows_affected();
        pruned.outbox_rows += deleted;
        if deleted < BATCH as u64 {
            break;
        }
    }
    if let Some(audit) = retention.audit_events {
        loop {
            let deleted = sqlx::query!(
                "WITH gone AS (
                     DELETE FROM fhir_outbox.resource_version WHERE (project_id, resource_type, id, version_id) IN (
                         SELECT project_id, resource_type, id, version_id FROM fhir_outbox.resource_version
                         WHERE resource_type = 'AuditEvent' AND last_updated < now() - make_interval(secs => $1)
                         ORDER BY last_updated LIMIT $2)
                     RETURNING project_id, id)
                 , resources AS (
                     DELETE FROM fhir_outbox.resource r USING gone
                     WHERE r.project_id = gone.project_id AND r.resource_type = 'AuditEvent' AND r.id = gone.id
                       AND r.last_updated < now() - make_interval(secs => $1))
                 SELECT count(*) AS \"count!\" FROM gone",
                seconds(audit),
                BATCH
            )
            .fetch_one(pool)
            .await?
            .count as u64;
            pruned.audit_events += deleted;
            if deleted < BATCH as u64 {
                break;
            }
        }
    }
    Ok(pruned)
}
