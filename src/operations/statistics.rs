//! Planner statistics that follow the pipeline's tables. The dispatcher and the delivery worker
//! run prepared statements whose plans PostgreSQL keeps until a table's statistics change; a plan
//! made while the outbox or the hot table was nearly empty reads the whole table for every batch
//! once it has grown (docs/performance-history.md, run Y). Autovacuum refreshes statistics, but on
//! its own schedule: its few workers can spend hours on one large table, and none ran in the
//! bench's capture scenario. So every worker process checks every [`CHECK_EVERY`] and analyses the
//! tables of the schema that have more than doubled in size since their statistics were taken
//! (`fhir_outbox.analyze_stale_tables`, one process at a time), which replaces the plans made on
//! the smaller table. The history's days are left to autovacuum: the pipeline only appends to
//! them.

use sqlx::{PgExecutor, PgPool};
use std::time::Duration;

/// How often a worker process checks.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// A table is not analysed again sooner than this after its last analysis, by anyone.
const MIN_AGE_SECONDS: f64 = 10.0;

/// A table analysed by a check.
#[derive(Debug)]
pub struct Analyzed {
    /// The table, in the `fhir_outbox` schema.
    pub table: String,
    /// Its size in pages when its statistics were last taken (0 if they never were).
    pub pages_before: i64,
    /// Its size in pages now.
    pub pages: i64,
}

/// Analyses the tables whose statistics are stale; returns them. Returns nothing while another
/// process runs the same check.
pub async fn analyze_stale(executor: impl PgExecutor<'_>) -> Result<Vec<Analyzed>, sqlx::Error> {
    sqlx::query_as!(
        Analyzed,
        r#"SELECT table_name AS "table!", pages_before AS "pages_before!", pages AS "pages!"
           FROM fhir_outbox.analyze_stale_tables(make_interval(secs => $1))"#,
        MIN_AGE_SECONDS
    )
    .fetch_all(executor)
    .await
}

/// Runs [`analyze_stale`] every [`CHECK_EVERY`] until `shutdown`. Failures are logged and counted,
/// and tried again at the next check.
pub async fn keep_current(pool: PgPool, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        match analyze_stale(&pool).await {
            Ok(analyzed) => {
                for table in &analyzed {
                    tracing::debug!(table = %table.table, pages_before = table.pages_before,
                        pages = table.pages, "analysed a table that has outgrown its planner statistics");
                }
                crate::metrics::statistics_check(Some(analyzed.len()));
            }
            Err(error) => {
                crate::metrics::statistics_check(None);
                tracing::warn!(%error, "could not check the planner statistics; tried again in {} s",
                    CHECK_EVERY.as_secs());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
