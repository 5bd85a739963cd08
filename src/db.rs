//! Connecting to PostgreSQL and applying the embedded migrations.

use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// The schema migrations, embedded in the binary at build time from `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Errors of connecting or migrating.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database URL could not be parsed.
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed to apply.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database lacks migrations this build has.
    #[error("{}", SCHEMA_OUTDATED)]
    SchemaOutdated,
    /// The applied migrations could not be read.
    #[error("cannot read the schema's migrations: {0}")]
    Query(#[source] sqlx::Error),
}

/// What every entry point says when the schema lacks migrations this build has.
pub const SCHEMA_OUTDATED: &str = "the database has no fhir-outbox schema, or an older one than this \
                                   fhir-outbox: run `fhir-outbox migrate` first";

/// Opens a connection pool of at most `max_connections`.
pub async fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options = PgConnectOptions::from_str(database_url)
        .map_err(DbError::InvalidUrl)?
        .application_name("fhir-outbox");
    // One direct connection first: a pool retries until its timeout and then reports only that it
    // timed out, while this names the cause (refused, unknown host, authentication, …) at once.
    let probe = PgConnection::connect_with(&options)
        .await
        .map_err(DbError::Connect)?;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(DbError::Connect)
}

/// Applies every migration not yet applied. Safe to run from several processes at once: the migrator
/// holds a PostgreSQL advisory lock while it works, and an up-to-date database is left untouched.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Bumps `wake` whenever a notification arrives on `channel`, until `shutdown`. Survives connection
/// loss: it reconnects, and bumps `wake` after every (re)connection too, because notifications sent
/// while it was away are lost and the waiting loops must look for work themselves. Notifications
/// whose payload is `own` are ignored: they come from this process, which has told its waiting
/// loop directly.
pub async fn listen(
    pool: PgPool,
    channel: &'static str,
    wake: tokio::sync::watch::Sender<u64>,
    own: Option<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    listen_for(pool, channel, wake, None, own, shutdown).await
}

/// [`listen`], publishing in `backend` the PostgreSQL backend pid of the connection that LISTENs
/// (`None` while none does) before the bump that follows each (re)connection. The dispatcher names
/// that backend when it asks writers for a wake-up, so a request whose backend is gone can be
/// recognised as stale.
pub async fn listen_on_backend(
    pool: PgPool,
    channel: &'static str,
    wake: tokio::sync::watch::Sender<u64>,
    backend: tokio::sync::watch::Sender<Option<i32>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    listen_for(pool, channel, wake, Some(backend), None, shutdown).await
}

async fn listen_for(
    pool: PgPool,
    channel: &'static str,
    wake: tokio::sync::watch::Sender<u64>,
    backend: Option<tokio::sync::watch::Sender<Option<i32>>>,
    own: Option<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let bump = || wake.send_modify(|count| *count = count.wrapping_add(1));
    let publish = |pid: Option<i32>| {
        if let Some(backend) = &backend {
            backend.send_replace(pid);
        }
    };
    while !shutdown.is_cancelled() {
        publish(None);
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, channel, "cannot LISTEN; polling until it can");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let listening = async {
            listener.listen(channel).await?;
            backend_pid(&mut listener, backend.is_some()).await
        };
        match listening.await {
            Ok(pid) => publish(pid),
            Err(error) => {
                tracing::warn!(%error, channel, "cannot LISTEN; polling until it can");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        }
        bump();
        loop {
            tokio::select! {
                notification = listener.try_recv() => match notification {
                    Ok(Some(notification)) => {
                        if own.as_deref() != Some(notification.payload()) {
                            bump();
                        }
                    }
                    // The connection was lost and the listener has reconnected and re-listened on a
                    // new backend (it reports a failed reconnection as an error).
                    Ok(None) => {
                        publish(None);
                        match backend_pid(&mut listener, backend.is_some()).await {
                            Ok(pid) => publish(pid),
                            Err(error) => {
                                tracing::warn!(%error, channel, "LISTEN connection failed; reconnecting");
                                bump();
                                break;
                            }
                        }
                        bump();
                    }
                    Err(error) => {
                        tracing::warn!(%error, channel, "LISTEN connection failed; reconnecting");
                        publish(None);
                        break;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// The backend pid of the listener's connection, when `wanted` (one round trip, so only then).
async fn backend_pid(
    listener: &mut sqlx::postgres::PgListener,
    wanted: bool,
) -> Result<Option<i32>, sqlx::Error> {
    if !wanted {
        return Ok(None);
    }
    let pid = sqlx::query_scalar!(r#"SELECT pg_backend_pid() AS "pid!""#)
        .fetch_one(listener)
        .await?;
    Ok(Some(pid))
}

/// Whether every embedded migration has been applied successfully (`false` on a database that was
/// never migrated).
pub async fn migrations_current(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> = match sqlx::query_scalar!(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version"
    )
    .fetch_all(pool)
    .await
    {
        Ok(applied) => applied,
        // undefined_table: no migration ever ran here.
        Err(error)
            if error.as_database_error().and_then(|e| e.code()).as_deref() == Some("42P01") =>
        {
            return Ok(false);
        }
        Err(error) => return Err(error),
    };
    Ok(MIGRATOR
        .iter()
        .all(|migration| applied.binary_search(&migration.version).is_ok()))
}

/// Fails with [`DbError::SchemaOutdated`] unless every embedded migration has been applied: what
/// every command but `migrate` checks first.
pub async fn require_migrated(pool: &PgPool) -> Result<(), DbError> {
    match migrations_current(pool).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(DbError::SchemaOutdated),
        Err(error) => Err(DbError::Query(error)),
    }
}

/// The backlog figures behind the metrics gauges, from bounded index scans.
pub struct BacklogGauges {
    /// Undispatched outbox rows, counted up to 100,000.
    pub undispatched: i64,
    /// Age of the oldest undispatched change, in seconds (0 when none).
    pub oldest_undispatched_seconds: f64,
    /// Pending deliveries, counted up to 100,000.
    pub pending: i64,
    /// Age of the oldest change among the next 1,000 due deliveries, in seconds (0 when none).
    pub oldest_pending_seconds: f64,
    /// Endpoints whose circuit is open or half-open.
    pub open_circuits: i64,
}

/// Reads [`BacklogGauges`]. Every part is bounded, so a scrape never costs a scan of a big table.
pub async fn backlog_gauges(pool: &PgPool) -> Result<BacklogGauges, sqlx::Error> {
    sqlx::query_as!(
        BacklogGauges,
        r#"SELECT
             (SELECT count(*) FROM (SELECT 1 FROM fhir_outbox.outbox WHERE dispatched_at IS NULL
                                    LIMIT 100000) u) AS "undispatched!",
             coalesce((SELECT extract(epoch FROM now() - changed_at)::float8 FROM fhir_outbox.outbox
                       WHERE dispatched_at IS NULL ORDER BY seq LIMIT 1), 0) AS "oldest_undispatched_seconds!",
             (SELECT count(*) FROM (SELECT 1 FROM fhir_outbox.delivery WHERE state = 'pending'
                                    LIMIT 100000) p) AS "pending!",
             coalesce((SELECT extract(epoch FROM now() - min(changed_at))::float8 FROM
                         (SELECT changed_at FROM fhir_outbox.delivery WHERE state = 'pending'
                          ORDER BY next_attempt_at LIMIT 1000) d), 0) AS "oldest_pending_seconds!",
             (SELECT count(*) FROM fhir_outbox.endpoint_circuit WHERE state <> 'closed')
                 AS "open_circuits!""#
    )
    .fetch_one(pool)
    .await
}
