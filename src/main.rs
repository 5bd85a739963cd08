//! The `fhir-outbox` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fhir_outbox::capture::Interaction;
use fhir_outbox::delivery::policy::Backoff;
use fhir_outbox::delivery::{DeliveryConfig, DeliveryWorker};
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use fhir_outbox::pgtemp::{Durability, TempCluster};
use fhir_outbox::{db, operations};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

/// FHIR Subscription (rest-hook) delivery from a PostgreSQL transactional outbox.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// PostgreSQL connection URL. `demo` starts a throwaway cluster when it is not set.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Allow endpoints with `http` and non-public addresses (loopback receivers in tests and the demo).
    /// Never in production: subscriptions could then reach the network the worker runs in.
    #[arg(long, env = "FHIR_OUTBOX_ALLOW_UNSAFE_OUTBOUND", global = true)]
    allow_unsafe_outbound: bool,

    /// Log format on standard error.
    #[arg(long, env = "FHIR_OUTBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the embedded schema migrations (safe to run concurrently; a no-op when up to date).
    Migrate,
    /// A guided tour on a throwaway PostgreSQL (or on DATABASE_URL): writes, history and the outbox.
    Demo {
        /// Keep the throwaway cluster running after the tour, until Ctrl-C, to look at it with psql.
        #[arg(long)]
        keep_running: bool,
    },
    /// Run the pipeline against DATABASE_URL until Ctrl-C or SIGTERM: dispatch and delivery.
    Run {
        #[command(flatten)]
        dispatch: DispatchArgs,
        #[command(flatten)]
        delivery: DeliveryArgs,
    },
    /// Explain whether a subscription matches a resource change, and if not, which check failed.
    Explain {
        /// The Subscription: a JSON file, or its id (read from the database).
        #[arg(long)]
        subscription: String,
        /// The resource: a JSON file, or a reference (`Patient/123`, `Patient/123/_history/2`).
        #[arg(long)]
        resource: String,
        /// The previous version (a file or a reference). Default: the preceding stored version.
        #[arg(long)]
        previous: Option<String>,
        /// The interaction. Default: `update` when there is a previous version, else `create`.
        #[arg(long, value_parser = parse_interaction)]
        interaction: Option<Interaction>,
        /// The project to read references from.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Option<Uuid>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Start a throwaway PostgreSQL with the schema applied, print its URL, and keep it until Ctrl-C
    /// or SIGTERM (for development: psql exploration, refreshing sqlx's offline query data).
    DevDb {
        /// Also write the URL to this file once the database is ready (for scripts).
        #[arg(long)]
        url_file: Option<std::path::PathBuf>,
    },
    /// Measure the performance figures on a throwaway durable PostgreSQL with a loopback receiver,
    /// and print them next to their targets (see docs/performance.md).
    Bench {
        /// Small sizes (2k backlog, 10k finished rows, 3 s runs): a minute or two.
        #[arg(long)]
        quick: bool,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Run only these scenarios: capture, dispatch, e2e (with RSS), latency, claim.
        #[arg(long, value_delimiter = ',')]
        only: Vec<operations::bench::Scenario>,
    },
}

/// Settings of the dispatch stage.
#[derive(Debug, clap::Args)]
struct DispatchArgs {
    /// Outbox rows claimed per dispatch transaction.
    #[arg(long, env = "FHIR_OUTBOX_DISPATCH_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    dispatch_batch_size: i64,
    /// Concurrent dispatch loops in this process.
    #[arg(long, env = "FHIR_OUTBOX_DISPATCH_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    dispatch_workers: u16,
    /// Milliseconds between looks for work when no notification arrives.
    #[arg(long, env = "FHIR_OUTBOX_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    poll_interval_ms: u64,
    /// Evaluate the subscriptions of server-scope projects for changes in every project.
    #[arg(long, env = "FHIR_OUTBOX_SERVER_SCOPED_SUBSCRIPTIONS")]
    server_scoped_subscriptions: bool,
}

impl DispatchArgs {
    fn config(&self, allow_unsafe_outbound: bool) -> DispatchConfig {
        DispatchConfig {
            allow_unsafe_outbound,
            batch_size: self.dispatch_batch_size,
            workers: usize::from(self.dispatch_workers),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            server_scoped_subscriptions: self.server_scoped_subscriptions,
        }
    }
}

/// Settings of the delivery stage.
#[derive(Debug, clap::Args)]
struct DeliveryArgs {
    /// Requests in flight at once in this process.
    #[arg(long, env = "FHIR_OUTBOX_DELIVERY_CONCURRENCY", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    delivery_concurrency: u16,
    /// Seconds a claim holds a delivery; an expired lease is claimed again by any worker.
    #[arg(long, env = "FHIR_OUTBOX_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_seconds: u64,
    /// Delay before the first retry, in milliseconds (doubles per failure, ±10% jitter).
    #[arg(long, env = "FHIR_OUTBOX_RETRY_BASE_MS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    retry_base_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(long, env = "FHIR_OUTBOX_RETRY_CAP_MS", default_value_t = 8 * 3600 * 1000, value_parser = clap::value_parser!(u64).range(1..))]
    retry_cap_ms: u64,
    /// Connect timeout, in milliseconds.
    #[arg(long, env = "FHIR_OUTBOX_CONNECT_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout_ms: u64,
    /// Timeout of a whole request, in milliseconds.
    #[arg(long, env = "FHIR_OUTBOX_REQUEST_TIMEOUT_MS", default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_ms: u64,
    /// Seconds allowed on shutdown for requests in flight before their deliveries are released.
    #[arg(long, env = "FHIR_OUTBOX_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Strip displays from AuditEvent references (every project; projects can also ask for it).
    #[arg(long, env = "FHIR_OUTBOX_REDACT_AUDIT_EVENTS")]
    redact_audit_events: bool,
    /// Do not write AuditEvents whose destination is `log` to the log.
    #[arg(long, env = "FHIR_OUTBOX_NO_AUDIT_LOG")]
    no_audit_log: bool,
}

impl DeliveryArgs {
    fn config(&self, allow_unsafe_outbound: bool) -> Result<DeliveryConfig> {
        if self.retry_base_ms > self.retry_cap_ms {
            anyhow::bail!(
                "--retry-base-ms ({}) is larger than --retry-cap-ms ({})",
                self.retry_base_ms,
                self.retry_cap_ms
            );
        }
        Ok(DeliveryConfig {
            concurrency: usize::from(self.delivery_concurrency),
            lease: Duration::from_secs(self.lease_seconds),
            backoff: Backoff {
                base: Duration::from_millis(self.retry_base_ms),
                cap: Duration::from_millis(self.retry_cap_ms),
            },
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            allow_unsafe_outbound,
            redact_audit_events: self.redact_audit_events,
            log_audit_events: !self.no_audit_log,
            ..DeliveryConfig::default()
        })
    }
}

fn parse_interaction(code: &str) -> Result<Interaction, String> {
    Interaction::parse(code).ok_or_else(|| format!("`{code}` is not create, update or delete"))
}

fn require_url(url: Option<String>) -> Result<String> {
    url.context("no database: set DATABASE_URL or pass --database-url (postgres://user@host/db)")
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Migrate => {
            let url = require_url(cli.database_url)?;
            let pool = db::connect(&url, 2).await?;
            db::migrate(&pool).await?;
            println!("Migrations are up to date.");
            Ok(())
        }
        Command::Demo { keep_running } => demo(cli.database_url, keep_running).await,
        Command::DevDb { url_file } => dev_db(url_file).await,
        Command::Bench { quick, json, only } => bench(quick, json, only).await,
        Command::Run { dispatch, delivery } => {
            let dispatch = dispatch.config(cli.allow_unsafe_outbound);
            let delivery = delivery.config(cli.allow_unsafe_outbound)?;
            run(require_url(cli.database_url)?, dispatch, delivery).await
        }
        Command::Explain {
            subscription,
            resource,
            previous,
            interaction,
            project,
            json,
        } => {
            let pool = match &cli.database_url {
                Some(url) => Some(db::connect(url, 2).await?),
                None => None,
            };
            let source = operations::explain::Source {
                pool: pool.as_ref(),
                project,
                allow_unsafe_outbound: cli.allow_unsafe_outbound,
            };
            let explanation = operations::explain::explain(
                &subscription,
                &resource,
                previous.as_deref(),
                interaction,
                &source,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&explanation)?);
            } else {
                print!("{explanation}");
            }
            Ok(())
        }
    }
}

async fn run(url: String, dispatch: DispatchConfig, delivery: DeliveryConfig) -> Result<()> {
    let connections = dispatch.workers as u32 + delivery.concurrency as u32 + 4;
    let pool = db::connect(&url, connections).await?;
    if !db::migrations_current(&pool).await.unwrap_or(false) {
        anyhow::bail!("the database schema is not up to date: run `fhir-outbox migrate` first");
    }
    let shutdown = CancellationToken::new();
    let dispatcher = Arc::new(Dispatcher::new(pool.clone(), dispatch));
    let dispatching = tokio::spawn(dispatcher.run(shutdown.clone()));
    let worker = Arc::new(DeliveryWorker::new(pool.clone(), delivery)?);
    let delivering = tokio::spawn(worker.run(shutdown.clone()));
    tracing::info!("running: dispatch and delivery");
    shutdown_signal().await;
    tracing::info!("shutting down: no new claims; finishing requests in flight");
    shutdown.cancel();
    dispatching.await?;
    delivering.await?;
    pool.close().await;
    Ok(())
}

async fn start_cluster() -> Result<TempCluster> {
    tokio::task::spawn_blocking(|| TempCluster::start(Durability::Fast))
        .await
        .context("the cluster start-up task failed")?
        .context("cannot start a throwaway PostgreSQL")
}

async fn dev_db(url_file: Option<std::path::PathBuf>) -> Result<()> {
    let mut cluster = start_cluster().await?;
    let url = cluster.url("postgres");
    let pool = db::connect(&url, 1).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    println!("{url}");
    if let Some(path) = url_file {
        std::fs::write(&path, format!("{url}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    shutdown_signal().await;
    tokio::task::spawn_blocking(move || cluster.stop()).await?;
    Ok(())
}

async fn bench(
    quick: bool,
    json: Option<std::path::PathBuf>,
    only: Vec<operations::bench::Scenario>,
) -> Result<()> {
    use operations::bench::{BenchOptions, Sizes};
    let sizes = if quick { Sizes::quick() } else { Sizes::full() };
    let options = BenchOptions { sizes, quick, only };
    let report = tokio::select! {
        report = operations::bench::run(&options) => report?,
        _ = shutdown_signal() => anyhow::bail!("interrupted"),
    };
    let text = serde_json::to_string_pretty(&report)?;
    print!("{}", report.table());
    println!("{text}");
    if let Some(path) = json {
        std::fs::write(&path, format!("{text}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !report.errors.is_empty() {
        anyhow::bail!("some scenarios failed: {}", report.errors.join("; "));
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

async fn demo(database_url: Option<String>, keep_running: bool) -> Result<()> {
    // The cluster lives here, outside the tour, so that Ctrl-C (which ends the tour early) still stops
    // it and removes its directory when it is dropped.
    let cluster = match &database_url {
        Some(_) => None,
        None => {
            println!("Starting a throwaway PostgreSQL cluster…");
            let cluster = start_cluster().await?;
            println!("PostgreSQL is listening on 127.0.0.1:{}.", cluster.port());
            Some(cluster)
        }
    };
    let url = match (&database_url, &cluster) {
        (Some(url), _) => url.clone(),
        (None, Some(cluster)) => cluster.url("postgres"),
        (None, None) => unreachable!("a cluster is started when no URL is given"),
    };
    let tour = async {
        operations::demo::run(&url, &mut std::io::stdout()).await?;
        if keep_running && cluster.is_some() {
            println!(
                "\nThe cluster keeps running: psql '{url}'\nPress Ctrl-C to stop and remove it."
            );
            std::future::pending::<()>().await;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = tour => result?,
        _ = shutdown_signal() => println!("\nInterrupted."),
    }
    if let Some(mut cluster) = cluster {
        tokio::task::spawn_blocking(move || cluster.stop()).await?;
        println!("The throwaway cluster is stopped and removed.");
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("FHIR_OUTBOX_LOG")
        .unwrap_or_else(|_| EnvFilter::new("fhir_outbox=info,warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
