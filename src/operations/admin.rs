//! The admin HTTP endpoint of `fhir-outbox run` (loopback by default): `/metrics` in Prometheus text
//! format, `/healthz` (the process answers) and `/readyz` (the database answers and its schema is
//! current). Gauges of the backlog are refreshed by a background task every few seconds with bounded
//! queries, never by a scrape.

use crate::db;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The metrics recorder could not be installed (another one is installed).
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    /// The address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AdminState {
    pool: PgPool,
    metrics: PrometheusHandle,
}

/// Installs the Prometheus recorder and serves the admin endpoint on `address` until `shutdown`.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    pool: PgPool,
    address: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
    let mut builder = PrometheusBuilder::new();
    // Histograms (`_bucket` series), not the exporter's default summaries: quantiles computed per
    // process cannot be aggregated across workers.
    for name in crate::metrics::LATENCY_HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(
                Matcher::Full(name.to_owned()),
                crate::metrics::LATENCY_BUCKETS,
            )
            .map_err(|error| AdminError::Recorder(error.to_string()))?;
    }
    let metrics = builder
        .install_recorder()
        .map_err(|error| AdminError::Recorder(error.to_string()))?;
    crate::metrics::describe();
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| AdminError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { address, source })?;
    let state = AdminState {
        pool: pool.clone(),
        metrics,
    };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    let gauges = tokio::spawn(refresh_gauges(pool, shutdown.clone()));
    let server = tokio::spawn(async move {
        let stop = shutdown.clone();
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::warn!(%error, "admin endpoint stopped");
        }
        gauges.abort();
    });
    tracing::info!(address = %bound, "admin endpoint: /metrics /healthz /readyz");
    Ok((bound, server))
}

async fn render_metrics(State(state): State<AdminState>) -> String {
    state.metrics.render()
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    let check =
        tokio::time::timeout(Duration::from_secs(2), db::migrations_current(&state.pool)).await;
    match check {
        Ok(Ok(true)) => (StatusCode::OK, "ready\n".into()),
        Ok(Ok(false)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the database schema is not up to date (run `fhir-outbox migrate`)\n".into(),
        ),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the database does not answer: {error}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the database did not answer within 2 s\n".into(),
        ),
    }
}

/// Refreshes the backlog gauges every 5 s, or less often when reading them turns slow: they walk
/// the outbox's undispatched index, which a transaction holding the xmin horizon fills with dead
/// entries (1.3-1.8 s a read after 10 minutes of a held horizon, measured by `bench --only
/// horizon`). Waiting 20 times as long as the read took keeps the gauges under 5 % of a core.
async fn refresh_gauges(pool: PgPool, shutdown: CancellationToken) {
    loop {
        let started = std::time::Instant::now();
        match db::backlog_gauges(&pool).await {
            Ok(gauges) => crate::metrics::backlog(&gauges),
            Err(error) => tracing::debug!(%error, "cannot refresh the backlog gauges"),
        }
        let pause = Duration::from_secs(5).max(20 * started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
