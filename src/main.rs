//! The `fhir-outbox` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fhir_outbox::pgtemp::{Durability, TempCluster};
use fhir_outbox::{db, operations};
use tracing_subscriber::EnvFilter;

/// FHIR Subscription (rest-hook) delivery from a PostgreSQL transactional outbox.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// PostgreSQL connection URL. `demo` starts a throwaway cluster when it is not set.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

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
    /// Start a throwaway PostgreSQL with the schema applied, print its URL, and keep it until Ctrl-C
    /// or SIGTERM (for development: psql exploration, refreshing sqlx's offline query data).
    DevDb {
        /// Also write the URL to this file once the database is ready (for scripts).
        #[arg(long)]
        url_file: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Migrate => {
            let url = cli.database_url.context(
                "no database: set DATABASE_URL or pass --database-url (postgres://user@host/db)",
            )?;
            let pool = db::connect(&url, 2).await?;
            db::migrate(&pool).await?;
            println!("Migrations are up to date.");
            Ok(())
        }
        Command::Demo { keep_running } => demo(cli.database_url, keep_running).await,
        Command::DevDb { url_file } => dev_db(url_file).await,
    }
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
