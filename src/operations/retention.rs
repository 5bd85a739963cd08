//! History upkeep: the days ahead of the history tables (`finished_delivery`, `delivery_attempt`,
//! `audit_event`, partitioned by day) are created in advance, and retention drops whole days once
//! all of a day is past its retention period. A drop is a catalogue change: it takes milliseconds
//! whatever the day held, writes no WAL per row and leaves nothing for VACUUM. So a row is kept at
//! least its retention period, and at most one day longer.
//!
//! Dispatched outbox rows are deleted in bounded batches (the outbox is a hot table); AuditEvents
//! that applications wrote as resources (`create_resource`) follow the AuditEvent retention by
//! batched deletes too.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use std::time::Duration;

/// Rows deleted per statement, where rows are deleted.
const BATCH: i64 = 5_000;

/// Days of history partitions kept ready ahead of today. A worker creates them at start and every
/// upkeep pass, so a gap of a week in upkeep is needed before a write finds no partition (and then
/// the recorder creates them itself, see `delivery::recorder`).
pub const DAYS_AHEAD: i32 = 7;

/// How long things are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Finished deliveries, their attempts, and dispatched outbox rows.
    pub deliveries: Duration,
    /// AuditEvents; `None` keeps them.
    pub audit_events: Option<Duration>,
}

/// What one pass removed. Rows of dropped history partitions are as each partition's statistics
/// (`pg_class.reltuples`) count them, exact for a partition never analysed: counting a day of
/// history would read all of it and take longer than the drop, so those counts can be off by the
/// statistics' error (a few rows in a million).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Finished deliveries.
    pub deliveries: u64,
    /// Attempt rows.
    pub attempts: u64,
    /// Dispatched outbox rows.
    pub outbox_rows: u64,
    /// AuditEvents.
    pub audit_events: u64,
    /// History partitions dropped.
    pub partitions: u64,
    /// Event counters (`subscription_event_count`) of subscriptions deleted for longer than the
    /// delivery retention whose events are all gone.
    pub event_counters: u64,
    /// Issues (`subscription_issue`) of subscription versions that are no longer current, last
    /// seen before the delivery retention.
    pub issues: u64,
}

/// Creates the missing daily partitions of the history tables from today to [`DAYS_AHEAD`] days
/// ahead. Returns the names of those created.
pub async fn ensure_partitions(executor: impl PgExecutor<'_>) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT p AS "partition!" FROM fhir_outbox.ensure_history_partitions($1) AS p"#,
        DAYS_AHEAD
    )
    .fetch_all(executor)
    .await
}

/// Removes everything past its retention, as of the database's clock now.
pub async fn prune(pool: &PgPool, retention: Retention) -> Result<Pruned, sqlx::Error> {
    let now: DateTime<Utc> = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(pool)
        .await?;
    prune_as_of(pool, retention, now).await
}

/// Removes everything that is past its retention at `as_of`: [`prune`] at another time, to see
/// what retention will remove (and to test it).
pub async fn prune_as_of(
    pool: &PgPool,
    retention: Retention,
    as_of: DateTime<Utc>,
) -> Result<Pruned, sqlx::Error> {
    let mut pruned = Pruned::default();
    let deliveries_before = as_of - retention.deliveries;
    for (table, count) in [
        ("finished_delivery", &mut pruned.deliveries),
        ("delivery_attempt", &mut pruned.attempts),
    ] {
        let dropped = drop_partitions(pool, table, deliveries_before).await?;
        pruned.partitions += dropped.len() as u64;
        *count += dropped.iter().map(|(_, rows)| *rows as u64).sum::<u64>();
    }
    loop {
        let deleted = sqlx::query!(
            "DELETE FROM fhir_outbox.outbox WHERE seq IN (
                 SELECT seq FROM fhir_outbox.outbox
                 WHERE dispatched_at < $1
                 ORDER BY dispatched_at LIMIT $2)",
            deliveries_before,
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
    // A counter goes only when nothing can number or read its events any more: the subscription
    // was deleted before the retention horizon (no dispatcher compiled before that deletion is
    // still at work, so none can give the next number) and none of its events is stored (so a
    // subscription written again under that id, counting from 1, repeats no stored number).
    pruned.event_counters = sqlx::query!(
        "DELETE FROM fhir_outbox.subscription_event_count c
         WHERE NOT EXISTS (
                   SELECT 1 FROM fhir_outbox.resource r
                   WHERE r.project_id = c.project_id AND r.resource_type = 'Subscription'
                     AND r.id = c.subscription_id AND (NOT r.deleted OR r.last_updated >= $1))
           AND NOT EXISTS (
                   SELECT 1 FROM fhir_outbox.unfinished_delivery d
                   WHERE d.project_id = c.project_id AND d.subscription_id = c.subscription_id
                     AND d.notification = 'event-notification')
           AND NOT EXISTS (
                   SELECT 1 FROM fhir_outbox.finished_delivery d
                   WHERE d.project_id = c.project_id AND d.subscription_id = c.subscription_id
                     AND d.notification = 'event-notification')",
        deliveries_before
    )
    .execute(pool)
    .await?
    .rows_affected();
    // Only the current version's issues are shown and acted on (a budget suspension is one);
    // those of earlier versions and of deleted subscriptions are history, kept as long as
    // deliveries are.
    pruned.issues = sqlx::query!(
        "DELETE FROM fhir_outbox.subscription_issue i
         WHERE i.last_seen < $1
           AND NOT EXISTS (
                   SELECT 1 FROM fhir_outbox.resource r
                   WHERE r.project_id = i.project_id AND r.resource_type = 'Subscription'
                     AND r.id = i.subscription_id AND r.version_id = i.subscription_version
                     AND NOT r.deleted)",
        deliveries_before
    )
    .execute(pool)
    .await?
    .rows_affected();
    if let Some(audit) = retention.audit_events {
        let audit_before = as_of - audit;
        let dropped = drop_partitions(pool, "audit_event", audit_before).await?;
        pruned.partitions += dropped.len() as u64;
        pruned.audit_events += dropped.iter().map(|(_, rows)| *rows as u64).sum::<u64>();
        // AuditEvents that applications stored as resources.
        loop {
            let deleted = sqlx::query!(
                "WITH gone AS (
                     DELETE FROM fhir_outbox.resource_version WHERE (project_id, resource_type, id, version_id) IN (
                         SELECT project_id, resource_type, id, version_id FROM fhir_outbox.resource_version
                         WHERE resource_type = 'AuditEvent' AND last_updated < $1
                         ORDER BY last_updated LIMIT $2)
                     RETURNING project_id, id)
                 , resources AS (
                     DELETE FROM fhir_outbox.resource r USING gone
                     WHERE r.project_id = gone.project_id AND r.resource_type = 'AuditEvent' AND r.id = gone.id
                       AND r.last_updated < $1)
                 SELECT count(*) AS \"count!\" FROM gone",
                audit_before,
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

async fn drop_partitions(
    pool: &PgPool,
    table: &str,
    before: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let dropped = sqlx::query!(
        r#"SELECT partition AS "partition!", rows AS "rows!"
           FROM fhir_outbox.drop_history_partitions($1, $2)"#,
        table,
        before
    )
    .fetch_all(pool)
    .await?;
    for partition in &dropped {
        tracing::info!(
            partition = %partition.partition,
            rows = partition.rows,
            "dropped a history partition past its retention"
        );
    }
    Ok(dropped
        .into_iter()
        .map(|row| (row.partition, row.rows))
        .collect())
}

/// How long [`upkeep_continuously`] waits between passes when no retention runs: partitions are
/// created days ahead, so an hour is plenty.
pub const PARTITION_UPKEEP_EVERY: Duration = Duration::from_secs(3600);

/// Keeps the history partitions ready, and prunes when `retention` is given, every `every`, until
/// `shutdown`. Failures are logged and tried again next pass.
pub async fn upkeep_continuously(
    pool: PgPool,
    retention: Option<Retention>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match ensure_partitions(&pool).await {
            Ok(created) if !created.is_empty() => {
                tracing::info!(?created, "created history partitions ahead")
            }
            Ok(_) => {}
            Err(error) => tracing::error!(
                %error,
                "could not create the history partitions ahead; it will be tried again"
            ),
        }
        if let Some(retention) = retention {
            match prune(&pool, retention).await {
                Ok(pruned) if pruned != Pruned::default() => {
                    tracing::info!(?pruned, "pruned finished work past its retention")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "pruning failed; it will be tried again"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
