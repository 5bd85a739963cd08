//! The `fhir-outbox` command line.

/// `println!` for this binary: std's, except that a standard output closed by its reader
/// (`fhir-outbox deliveries list | head`) ends the process quietly, as Unix tools end, instead of
/// a panic with a backtrace. Defined before `mod cli` so that every module of the binary uses it.
macro_rules! println {
    () => {
        $crate::print_to_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::print_to_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for this binary, as [`println!`] above.
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::print_to_stdout(format_args!($($arg)*))
    };
}

mod cli;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use cli::table::Table;
use fhir_outbox::capture::Interaction;
use fhir_outbox::delivery::policy::{Backoff, CircuitBreaker, EndpointAllowance};
use fhir_outbox::delivery::{DeliveryConfig, DeliveryState, auto_disable};
use fhir_outbox::dispatch::DispatchConfig;
use fhir_outbox::operations::actions::{self, Action, Actor, CancelScope, RetryScope};
use fhir_outbox::operations::admin::AdminError;
use fhir_outbox::operations::console::ConsoleError;
use fhir_outbox::operations::console::queries::DeliveryQuery;
use fhir_outbox::operations::control;
use fhir_outbox::operations::retention::{self, Retention};
use fhir_outbox::pipeline::{Pipeline, PipelineError};
use fhir_outbox::{db, operations};
use pgtemp::{Durability, TempCluster};
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
    /// A guided tour on a throwaway PostgreSQL (or on DATABASE_URL): a receiver, subscriptions, a
    /// stream of writes and their deliveries as they happen, then the SQL to look at everything.
    Demo {
        /// After the tour, keep the pipeline, the receiver and the throwaway cluster running until
        /// Ctrl-C, to look with psql and write more.
        #[arg(long)]
        keep_running: bool,
        /// How long the stream of writes lasts, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        duration_seconds: u64,
        /// Writes per second.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=200))]
        writes_per_second: u32,
    },
    /// Run the pipeline against DATABASE_URL until Ctrl-C or SIGTERM: dispatch and delivery.
    Run {
        #[command(flatten)]
        dispatch: DispatchArgs,
        #[command(flatten)]
        delivery: DeliveryArgs,
        #[command(flatten)]
        retention: RetentionArgs,
        /// Address of the admin endpoint (/metrics, /healthz, /readyz); `off` to disable.
        #[arg(long, env = "FHIR_OUTBOX_ADMIN_ADDR", default_value = "127.0.0.1:9464")]
        admin_addr: String,
        /// Address of the operator console and its API (e.g. 127.0.0.1:8080); `off` (the default)
        /// serves none. Every request needs a token (`fhir-outbox token create`).
        #[arg(long, env = "FHIR_OUTBOX_CONSOLE_ADDR", default_value = "off")]
        console_addr: String,
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
    /// Delivery state per subscription, and the outbox backlog.
    Status {
        /// Only this project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Option<Uuid>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List deliveries, newest first; `deliveries show ID` shows one: what was sent, each attempt
    /// and what the receiver answered.
    #[command(args_conflicts_with_subcommands = true)]
    Deliveries {
        #[command(subcommand)]
        show: Option<cli::operator::DeliveriesCommand>,
        /// Only this project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Option<Uuid>,
        /// Only this subscription (its id).
        #[arg(long)]
        subscription: Option<String>,
        /// Only this state.
        #[arg(long, value_parser = clap::builder::TypedValueParser::try_map(
            clap::builder::PossibleValuesParser::new(DeliveryState::NAMES),
            |name| name.parse::<DeliveryState>(),
        ))]
        state: Option<DeliveryState>,
        /// Only changes made since this time: RFC 3339 (2026-11-22T08:00:00Z) or a duration ago
        /// (90s, 15m, 1h, 7d).
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
        /// At most this many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Retry failed deliveries: one, all of a subscription, or all since a time.
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["delivery", "subscription", "failed_since"])))]
    Retry {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// One delivery (failed, skipped or cancelled), by id.
        #[arg(long)]
        delivery: Option<i64>,
        /// Every failed delivery of this subscription.
        #[arg(long)]
        subscription: Option<String>,
        /// Every failed delivery whose change was made since this time: RFC 3339 or a duration
        /// ago (1h).
        #[arg(long, value_parser = parse_since)]
        failed_since: Option<DateTime<Utc>>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a resource's current version again, to all subscriptions or one (Medplum's $resend).
    Resend {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// The resource: `Type/id`.
        #[arg(long)]
        resource: String,
        /// Only this subscription (its id).
        #[arg(long)]
        subscription: Option<String>,
        /// `update` (default, with the previous version) or `create`.
        #[arg(long, value_parser = parse_interaction, default_value = "update")]
        interaction: Interaction,
    },
    /// Pause a subscription: its deliveries wait until it is resumed (nothing is skipped).
    Pause {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// The subscription id.
        #[arg(long)]
        subscription: String,
    },
    /// Resume a paused subscription.
    Resume {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// The subscription id.
        #[arg(long)]
        subscription: String,
    },
    /// Send a finished delivery again (succeeded, failed, skipped or cancelled): its own version and
    /// `webhook-id`, as a new attempt, even if the resource changed or was deleted since.
    Replay {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// The delivery, by id.
        #[arg(long)]
        delivery: i64,
    },
    /// Cancel pending deliveries: one, or a subscription's whole backlog. They are never sent
    /// (state `cancelled`; `replay` sends one after all).
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["delivery", "subscription"])))]
    Cancel {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// One pending delivery, by id.
        #[arg(long)]
        delivery: Option<i64>,
        /// Every pending delivery of this subscription.
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Disable a subscription (its `status` becomes `off`, a new version): its pending deliveries
    /// are skipped.
    Disable {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// The subscription id.
        #[arg(long)]
        subscription: String,
    },
    /// Enable a subscription (`status` `active`, its `error` removed, its final failures forgotten),
    /// after it was disabled by an operator or automatically.
    Enable {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// The subscription id.
        #[arg(long)]
        subscription: String,
    },
    /// Subscriptions with their endpoint (redacted), state and figures of the last hour and day.
    Subscriptions {
        #[command(subcommand)]
        command: cli::operator::SubscriptionsCommand,
    },
    /// Console tokens: create (the secret is shown once), list, revoke.
    Token {
        #[command(subcommand)]
        command: cli::operator::TokenCommand,
    },
    /// Serve the operator console and its API (`/api/v1`) without running the pipeline (`run
    /// --console-addr` serves it beside the pipeline).
    Console {
        /// Address to listen on.
        #[arg(
            long,
            env = "FHIR_OUTBOX_CONSOLE_ADDR",
            default_value = "127.0.0.1:8080"
        )]
        console_addr: String,
        /// The base URL of your FHIR API, which `$status` and `$events` refer to resources by.
        #[arg(long, env = "FHIR_OUTBOX_FHIR_BASE_URL", default_value = fhir_outbox::delivery::DEFAULT_FHIR_BASE_URL, value_parser = parse_base_url)]
        fhir_base_url: String,
    },
    /// Endpoints (a project's scheme://host:port) whose circuit is open or half-open or that have
    /// failed since their last healthy answer, with their load and next probe.
    Endpoints {
        /// Only this project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Option<Uuid>,
        /// Every endpoint in use, healthy ones too.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Close an endpoint's circuit now (once its receiver is fixed): its waiting deliveries go out
    /// without waiting for the probe.
    ResetEndpoint {
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// The endpoint: `scheme://host:port`, or any URL on it (only those parts count).
        #[arg(long)]
        endpoint: String,
    },
    /// Create, list and configure projects (the tenants).
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Remove what is past its retention now: whole days of history, dispatched outbox rows (`run` also does it periodically).
    Prune {
        #[command(flatten)]
        retention: RetentionArgs,
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
        /// Run only these scenarios: capture, bulk (bulk writes through the SQL functions),
        /// dispatch, e2e (with RSS), latency, claim, fhirpath (hostile FHIRPath criteria against
        /// the evaluation budget; no database), noisy (healthy endpoints beside hanging and failing
        /// ones), slow (receivers answering after 100 ms),
        /// console (the console's reads on a database of 1,000,000 attempts), retention (a day of
        /// history dropped), horizon (throughput while a snapshot holds the xmin horizon), scaling
        /// (1, 2 and 4 worker processes), topics (subscriptions to a topic against criteria ones),
        /// floor (the cheapest schema storing what a delivery must, and a bare POST: how fast any
        /// design could go here).
        #[arg(long, value_delimiter = ',')]
        only: Vec<cli::bench::Scenario>,
        /// Load pg_stat_statements and report the statements that took the most database time in
        /// each end-to-end, capture and dispatch run (a diagnosis: it costs a little throughput).
        #[arg(long)]
        statements: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Create a project and print its id.
    Create {
        /// Its name.
        name: String,
        /// Its settings, a JSON object, e.g. `{"redactAuditEvents": true}`.
        #[arg(long)]
        settings: Option<String>,
        /// Its subscriptions apply to every project's changes when `run` has
        /// `--server-scoped-subscriptions`.
        #[arg(long)]
        server_scope: bool,
    },
    /// List the projects: id, name, server scope, creation time.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one project, settings included (JSON).
    Show {
        /// The project id.
        id: Uuid,
    },
    /// Print a project's settings, or replace them with `--set`.
    Settings {
        /// The project id.
        id: Uuid,
        /// The new settings, a JSON object (they replace the old ones whole).
        #[arg(long)]
        set: Option<String>,
    },
}

/// Settings of the dispatch stage.
#[derive(Debug, clap::Args)]
struct DispatchArgs {
    /// Outbox rows claimed per dispatch transaction.
    #[arg(long, env = "FHIR_OUTBOX_DISPATCH_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    dispatch_batch_size: i64,
    /// Concurrent dispatch loops in this process.
    #[arg(long, env = "FHIR_OUTBOX_DISPATCH_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    dispatch_workers: u16,
    /// Milliseconds between looks for work when no notification arrives.
    #[arg(long, env = "FHIR_OUTBOX_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    poll_interval_ms: u64,
    /// Milliseconds a dispatch loop waits after a batch that took every waiting change and found more than one, so that the next carries more (0: claim again at once).
    #[arg(long, env = "FHIR_OUTBOX_DISPATCH_LINGER_MS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    dispatch_linger_ms: u64,
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
            linger: Duration::from_millis(self.dispatch_linger_ms),
            server_scoped_subscriptions: self.server_scoped_subscriptions,
        }
    }
}

/// How long finished work is kept.
#[derive(Debug, clap::Args)]
struct RetentionArgs {
    /// Hours finished deliveries, their attempts and dispatched outbox rows are kept (history goes by whole days: at most a day more).
    #[arg(long, env = "FHIR_OUTBOX_RETENTION_HOURS", default_value_t = 168, value_parser = clap::value_parser!(u64).range(0..=876_000))]
    retention_hours: u64,
    /// Days AuditEvents are kept; unset keeps them for good (they are the audit trail).
    #[arg(long, env = "FHIR_OUTBOX_AUDIT_EVENT_RETENTION_DAYS", value_parser = clap::value_parser!(u64).range(1..=36_500))]
    audit_event_retention_days: Option<u64>,
    /// Seconds between pruning passes in `run`.
    #[arg(long, env = "FHIR_OUTBOX_PRUNE_INTERVAL_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    prune_interval_seconds: u64,
}

impl RetentionArgs {
    fn retention(&self) -> Retention {
        Retention {
            deliveries: Duration::from_secs(self.retention_hours * 3600),
            audit_events: self
                .audit_event_retention_days
                .map(|days| Duration::from_secs(days * 86_400)),
        }
    }
}

/// Settings of the delivery stage.
#[derive(Debug, clap::Args)]
struct DeliveryArgs {
    /// Requests in flight at once in this process. High by default: a slow receiver holds a slot
    /// for up to the request timeout, and a slot costs a task and a connection, not a thread. A
    /// freed slot goes to the endpoint with work waiting that holds the fewest: one endpoint uses
    /// them all only while no other has work waiting.
    #[arg(long, env = "FHIR_OUTBOX_DELIVERY_CONCURRENCY", default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    delivery_concurrency: u16,
    /// Deliveries in progress at once to one endpoint (a project's scheme, host and port), from
    /// claim until their outcome is recorded, counted across every worker sharing the database:
    /// where each endpoint starts, and where it falls back to at its first slow answer, 429, 5xx or
    /// failure to answer.
    #[arg(long, env = "FHIR_OUTBOX_ENDPOINT_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    endpoint_concurrency: u16,
    /// The most an endpoint's allowance grows to while all its answers come fast (within a
    /// quarter of --slow-request-ms): it doubles with each recorded batch. At or below
    /// --endpoint-concurrency the allowance is fixed.
    #[arg(long, env = "FHIR_OUTBOX_ENDPOINT_CONCURRENCY_MAX", default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    endpoint_concurrency_max: u16,
    /// Milliseconds a request may hold its slot: one still unanswered after this moves to one of
    /// as many places kept for slow requests (while one is free), so that hanging or slow
    /// endpoints do not hold the slots the others need.
    #[arg(long, env = "FHIR_OUTBOX_SLOW_REQUEST_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    slow_request_ms: u64,
    /// Consecutive failing attempts (no answer, or a 5xx) that open an endpoint's circuit.
    #[arg(long, env = "FHIR_OUTBOX_CIRCUIT_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    circuit_failures: u32,
    /// An open circuit's first cool-down before its probe, in milliseconds (doubles with each
    /// opening, ±20% jitter).
    #[arg(long, env = "FHIR_OUTBOX_CIRCUIT_COOL_DOWN_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    circuit_cool_down_ms: u64,
    /// The longest cool-down of an open circuit, in milliseconds.
    #[arg(long, env = "FHIR_OUTBOX_CIRCUIT_MAX_COOL_DOWN_MS", default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(1..))]
    circuit_max_cool_down_ms: u64,
    /// Deliveries claimed per claim query, ahead of the request slots; one that waits 1 s for a
    /// slot goes back to the table for any worker.
    #[arg(long, env = "FHIR_OUTBOX_DELIVERY_CLAIM_BATCH", default_value_t = 400, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    delivery_claim_batch: u16,
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
    /// The base URL of your FHIR API (e.g. https://fhir.example.org/fhir): notification bundles of
    /// subscriptions to topics refer to their focus resources and subscriptions by it.
    #[arg(long, env = "FHIR_OUTBOX_FHIR_BASE_URL", default_value = fhir_outbox::delivery::DEFAULT_FHIR_BASE_URL, value_parser = parse_base_url)]
    fhir_base_url: String,
    /// Auto-disable triggers, a JSON array like `[{"maxConsecutiveFailures":5,"timeWindowSeconds":3600}]`
    /// (a project's `subscriptionAutoDisable` setting overrides it). Default: off.
    #[arg(long, env = "FHIR_OUTBOX_AUTO_DISABLE")]
    auto_disable: Option<String>,
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
        let auto_disable = match &self.auto_disable {
            None => Vec::new(),
            Some(text) => {
                let value: serde_json::Value =
                    serde_json::from_str(text).context("--auto-disable is not JSON")?;
                auto_disable::parse_triggers(&value)
                    .map_err(|problem| anyhow::anyhow!("--auto-disable: {problem}"))?
            }
        };
        if self.circuit_cool_down_ms > self.circuit_max_cool_down_ms {
            anyhow::bail!(
                "--circuit-cool-down-ms ({}) is larger than --circuit-max-cool-down-ms ({})",
                self.circuit_cool_down_ms,
                self.circuit_max_cool_down_ms
            );
        }
        Ok(DeliveryConfig {
            auto_disable,
            concurrency: usize::from(self.delivery_concurrency),
            endpoint_allowance: EndpointAllowance {
                base: u32::from(self.endpoint_concurrency),
                max: u32::from(self.endpoint_concurrency_max),
            },
            slow_request_after: Duration::from_millis(self.slow_request_ms),
            circuit: CircuitBreaker {
                failures: self.circuit_failures,
                cool_down: Duration::from_millis(self.circuit_cool_down_ms),
                max_cool_down: Duration::from_millis(self.circuit_max_cool_down_ms),
            },
            claim_batch: usize::from(self.delivery_claim_batch),
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
            fhir_base_url: self.fhir_base_url.clone(),
            ..DeliveryConfig::default()
        })
    }
}

/// An absolute http(s) URL, kept without its trailing `/`.
fn parse_base_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|error| format!("not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
        return Err("an http(s) URL without a query is expected".to_owned());
    }
    Ok(text.trim_end_matches('/').to_owned())
}

fn parse_interaction(code: &str) -> Result<Interaction, String> {
    Interaction::parse(code).ok_or_else(|| format!("`{code}` is not create, update or delete"))
}

fn require_url(url: Option<String>) -> Result<String> {
    url.context("no database: set DATABASE_URL or pass --database-url (postgres://user@host/db)")
}

/// Connects, and refuses a database whose schema lacks migrations of this build, saying what to do.
async fn connect_migrated(url: &str, max_connections: u32) -> Result<sqlx::PgPool> {
    let pool = db::connect(url, max_connections).await?;
    if let Err(error) = db::require_migrated(&pool).await {
        pool.close().await;
        return Err(error.into());
    }
    Ok(pool)
}

/// An error naming an unknown project.
/// Endpoints and their circuits, as `status` and `endpoints` print them.
fn endpoint_table(endpoints: &[control::EndpointHealth]) -> Table {
    let mut table = Table::new([
        "project",
        "endpoint",
        "circuit",
        "failures",
        "next probe",
        "in flight",
        "allowance",
        "pending",
        "last failure",
    ]);
    for e in endpoints {
        table.row([
            e.project_id.to_string(),
            e.endpoint.clone(),
            e.state.clone(),
            e.consecutive_failures.to_string(),
            e.next_probe_at.map_or_else(
                || "-".to_owned(),
                |at| format!("in {}s", (at - Utc::now()).num_seconds().max(0)),
            ),
            e.in_flight.to_string(),
            e.allowance
                .map_or_else(|| "base".to_owned(), |grown| grown.to_string()),
            e.pending.to_string(),
            e.last_failure.clone().unwrap_or_default(),
        ]);
    }
    table
}

fn unknown_project(project: Uuid) -> anyhow::Error {
    anyhow::anyhow!("unknown project {project} (`fhir-outbox project list` shows the projects)")
}

/// Fails unless the project exists.
async fn require_project(pool: &sqlx::PgPool, project: Uuid) -> Result<()> {
    if fhir_outbox::project::exists(pool, project).await? {
        Ok(())
    } else {
        Err(unknown_project(project))
    }
}

/// The message of an error and of those of its causes that it does not already quote, on one line.
fn one_line(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// `--since` and `--failed-since`: RFC 3339, or a duration ago (`1h`).
fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    control::parse_time(text, Utc::now()).map_err(|error| error.to_string())
}

/// An address option, or `None` for `off`.
fn parse_address(option: &str, text: &str) -> Result<Option<std::net::SocketAddr>> {
    match text {
        "off" => Ok(None),
        address => Ok(Some(address.parse().with_context(|| {
            format!("{option} `{address}` is not an address like 127.0.0.1:8080 (or `off`)")
        })?)),
    }
}

/// Writes to standard output; when its reader has gone (a broken pipe), exits with success: the
/// reader asked for no more. Any other failure panics, as std's `print!` does.
fn print_to_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(error) = std::io::stdout().lock().write_fmt(text) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        panic!("failed printing to stdout: {error}");
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(execute(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line, never a backtrace (anyhow's Debug form adds one under RUST_BACKTRACE).
            eprintln!("error: {}", one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Migrate => {
            let url = require_url(cli.database_url)?;
            let pool = db::connect(&url, 2).await?;
            db::migrate(&pool).await?;
            println!("Migrations are up to date.");
            Ok(())
        }
        Command::Demo {
            keep_running,
            duration_seconds,
            writes_per_second,
        } => {
            let options = cli::demo::DemoOptions {
                duration: Duration::from_secs(duration_seconds),
                writes_per_second,
                keep_running,
                ..cli::demo::DemoOptions::default()
            };
            demo(cli.database_url, options).await
        }
        Command::DevDb { url_file } => dev_db(url_file).await,
        Command::Bench {
            quick,
            json,
            only,
            statements,
        } => bench(quick, json, only, statements).await,
        command @ (Command::Status { .. }
        | Command::Deliveries { .. }
        | Command::Retry { .. }
        | Command::Resend { .. }
        | Command::Pause { .. }
        | Command::Resume { .. }
        | Command::Endpoints { .. }
        | Command::ResetEndpoint { .. }
        | Command::Replay { .. }
        | Command::Cancel { .. }
        | Command::Disable { .. }
        | Command::Enable { .. }) => operate(cli.database_url, command).await,
        Command::Subscriptions { command } => {
            let pool = connect_migrated(&require_url(cli.database_url)?, 2).await?;
            cli::operator::subscriptions(&pool, command).await
        }
        Command::Token { command } => {
            let pool = connect_migrated(&require_url(cli.database_url)?, 2).await?;
            cli::operator::token(&pool, command).await
        }
        Command::Console {
            console_addr,
            fhir_base_url,
        } => {
            let address = parse_address("--console-addr", &console_addr)?
                .context("--console-addr cannot be `off` for `fhir-outbox console`")?;
            let pool = connect_migrated(&require_url(cli.database_url)?, 8).await?;
            cli::operator::serve_console(pool, address, fhir_base_url).await
        }
        Command::Project { command } => {
            project_command(&require_url(cli.database_url)?, command).await
        }
        Command::Prune { retention } => {
            let pool = connect_migrated(&require_url(cli.database_url)?, 2).await?;
            let pruned = retention::prune(&pool, retention.retention()).await?;
            println!(
                "Pruned {} deliveries, {} attempts, {} outbox rows, {} AuditEvents, {} event counters of deleted subscriptions, {} issues of earlier subscription versions; {} history partitions dropped (their rows as PostgreSQL's statistics of each partition count them).",
                pruned.deliveries,
                pruned.attempts,
                pruned.outbox_rows,
                pruned.audit_events,
                pruned.event_counters,
                pruned.issues,
                pruned.partitions
            );
            Ok(())
        }
        Command::Run {
            dispatch,
            delivery,
            retention,
            admin_addr,
            console_addr,
        } => {
            let dispatch = dispatch.config(cli.allow_unsafe_outbound);
            let delivery = delivery.config(cli.allow_unsafe_outbound)?;
            let admin = parse_address("--admin-addr", &admin_addr)?;
            let console = parse_address("--console-addr", &console_addr)?;
            let pruning = (
                retention.retention(),
                Duration::from_secs(retention.prune_interval_seconds),
            );
            run(
                require_url(cli.database_url)?,
                dispatch,
                delivery,
                pruning,
                admin,
                console,
            )
            .await
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
                Some(url) => Some(connect_migrated(url, 2).await?),
                None => None,
            };
            if let (Some(pool), Some(project)) = (&pool, project) {
                require_project(pool, project).await?;
            }
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

async fn project_command(url: &str, command: ProjectCommand) -> Result<()> {
    use fhir_outbox::project;
    let pool = connect_migrated(url, 2).await?;
    match command {
        ProjectCommand::Create {
            name,
            settings,
            server_scope,
        } => {
            let settings = match settings {
                Some(text) => project::parse_settings(&text)?,
                None => project::ProjectSettings::default(),
            };
            let id = project::create_project_with(&pool, &name, &settings, server_scope).await?;
            println!("{id}");
        }
        ProjectCommand::List { json } => {
            let projects = project::list(&pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&projects)?);
            } else {
                let mut table = Table::new(["id", "name", "server scope", "created"]);
                for p in &projects {
                    table.row([
                        p.id.to_string(),
                        p.name.clone(),
                        p.server_scope.to_string(),
                        p.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    ]);
                }
                println!("{table}");
            }
        }
        ProjectCommand::Show { id } => {
            let project = match project::get(&pool, id).await {
                Err(project::ProjectError::Unknown(id)) => return Err(unknown_project(id)),
                other => other?,
            };
            println!("{}", serde_json::to_string_pretty(&project)?);
        }
        ProjectCommand::Settings { id, set } => {
            if let Some(text) = set {
                let settings = project::parse_settings(&text)?;
                match project::set_settings(&pool, id, &settings).await {
                    Err(project::ProjectError::Unknown(id)) => return Err(unknown_project(id)),
                    other => other?,
                }
            }
            let stored = match project::get(&pool, id).await {
                Err(project::ProjectError::Unknown(id)) => return Err(unknown_project(id)),
                other => other?,
            };
            println!("{}", serde_json::to_string_pretty(&stored.settings)?);
        }
    }
    pool.close().await;
    Ok(())
}

async fn operate(url: Option<String>, command: Command) -> Result<()> {
    let pool = connect_migrated(&require_url(url)?, 2).await?;
    let project = match &command {
        Command::Status { project, .. }
        | Command::Deliveries { project, .. }
        | Command::Endpoints { project, .. } => *project,
        Command::Retry { project, .. }
        | Command::Resend { project, .. }
        | Command::Pause { project, .. }
        | Command::Resume { project, .. }
        | Command::ResetEndpoint { project, .. }
        | Command::Replay { project, .. }
        | Command::Cancel { project, .. }
        | Command::Disable { project, .. }
        | Command::Enable { project, .. } => Some(*project),
        _ => None,
    };
    if let Some(project) = project {
        require_project(&pool, project).await?;
    }
    match command {
        Command::Status { project, json } => {
            let subscriptions = control::subscription_status(&pool, project).await?;
            let backlog = control::backlog(&pool, project).await?;
            let set_aside = control::set_aside(&pool, project, 20).await?;
            let endpoints = control::endpoint_health(&pool, project, false).await?;
            if json {
                let value = serde_json::json!({ "subscriptions": subscriptions, "outbox_backlog": backlog,
                                                "set_aside": set_aside, "endpoints": endpoints });
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(());
            }
            let mut table = Table::new([
                "project",
                "subscription",
                "status",
                "pending",
                "in flight",
                "succeeded",
                "skipped",
                "failed",
                "cancelled",
                "oldest undelivered",
                "issues",
                "last error",
            ]);
            for s in &subscriptions {
                let mut status = s.status.clone().unwrap_or_else(|| "?".to_owned());
                if s.paused {
                    status.push_str(" (paused)");
                }
                if s.suspended_reason.is_some() {
                    status.push_str(" (suspended: over budget)");
                }
                table.row([
                    s.project_id.to_string(),
                    s.subscription_id.clone(),
                    status,
                    s.pending.to_string(),
                    s.in_flight.to_string(),
                    s.succeeded.to_string(),
                    s.skipped.to_string(),
                    s.failed.to_string(),
                    s.cancelled.to_string(),
                    s.oldest_undelivered_at.map_or_else(
                        || "-".to_owned(),
                        |at| format!("{}s ago", (Utc::now() - at).num_seconds()),
                    ),
                    s.issues.to_string(),
                    s.last_error.clone().unwrap_or_default(),
                ]);
            }
            println!("Subscriptions:\n{table}");
            let mut table = Table::new(["project", "undispatched changes", "dispatch lag"]);
            for b in &backlog {
                table.row([
                    b.project_id.to_string(),
                    b.undispatched.to_string(),
                    format!("{:.1}s", b.dispatch_lag_seconds),
                ]);
            }
            println!("Outbox backlog:\n{table}");
            if !endpoints.is_empty() {
                println!(
                    "Endpoints failing or with an open circuit (all in fhir_outbox.endpoint_health; \
                     `fhir-outbox reset-endpoint` closes one):\n{}",
                    endpoint_table(&endpoints)
                );
            }
            if !set_aside.is_empty() {
                let mut table = Table::new(["seq", "project", "resource", "version", "error"]);
                for s in &set_aside {
                    table.row([
                        s.seq.to_string(),
                        s.project_id.to_string(),
                        s.resource.clone(),
                        s.version_id.to_string(),
                        s.dispatch_error.clone(),
                    ]);
                }
                println!(
                    "Changes set aside by dispatch, never delivered (newest {}; all in \
                     fhir_outbox.outbox_dispatch_error):\n{table}",
                    set_aside.len()
                );
            }
        }
        Command::Deliveries {
            show: Some(show), ..
        } => cli::operator::show_delivery(&pool, show).await?,
        Command::Deliveries {
            show: None,
            project,
            subscription,
            state,
            since,
            limit,
            json,
        } => {
            if let (Some(project), Some(subscription)) = (project, &subscription) {
                let mut conn = pool.acquire().await?;
                actions::require_known_subscription(&mut conn, project, subscription).await?;
            }
            let query = DeliveryQuery {
                subscription,
                state,
                since,
                limit,
                ..DeliveryQuery::default()
            };
            let rows = operations::console::queries::deliveries(&pool, project, &query)
                .await?
                .deliveries;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            let mut table = Table::new([
                "id",
                "subscription",
                "resource",
                "version",
                "interaction",
                "state",
                "attempts",
                "last status",
                "changed at",
                "reason",
            ]);
            for d in &rows {
                table.row([
                    d.id.to_string(),
                    d.subscription_id.clone(),
                    d.resource.clone(),
                    d.version_id.to_string(),
                    match d.carries() {
                        Some(carries) => format!("{} ({carries})", d.interaction),
                        None => d.interaction.clone(),
                    },
                    d.state.to_string(),
                    d.attempts.to_string(),
                    d.last_status.map(|s| s.to_string()).unwrap_or_default(),
                    d.changed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    d.reason.clone().unwrap_or_default(),
                ]);
            }
            println!("{table}");
        }
        Command::Retry {
            project,
            delivery,
            subscription,
            failed_since,
            json,
        } => {
            let scope = match (delivery, subscription, failed_since) {
                (Some(id), _, _) => RetryScope::Delivery(id),
                (_, Some(subscription), _) => RetryScope::Subscription(subscription),
                (_, _, Some(since)) => RetryScope::FailedSince(since),
                _ => unreachable!("clap requires one scope"),
            };
            let ids = actions::act(
                &pool,
                project,
                &Actor::command_line(),
                &Action::Retry(scope),
            )
            .await?
            .deliveries;
            if json {
                println!("{}", serde_json::json!({ "retried": ids }));
            } else if ids.is_empty() {
                println!("Nothing to retry: no failed delivery matches.");
            } else {
                println!("Retrying {} deliveries: {:?}", ids.len(), ids);
            }
        }
        Command::Resend {
            project,
            resource,
            subscription,
            interaction,
        } => {
            let (resource_type, id) = resource
                .split_once('/')
                .context("--resource must be Type/id, e.g. Patient/123")?;
            let action = Action::Resend {
                resource_type: resource_type.to_owned(),
                id: id.to_owned(),
                subscription,
                interaction,
            };
            let seq = actions::act(&pool, project, &Actor::command_line(), &action)
                .await?
                .outbox_seq
                .unwrap_or_default();
            println!("Resent {resource} as `{interaction}` (outbox row {seq}).");
        }
        Command::Pause {
            project,
            subscription,
        } => {
            let action = Action::Pause(subscription.clone());
            let changed = actions::act(&pool, project, &Actor::command_line(), &action)
                .await?
                .changed;
            println!(
                "Subscription/{subscription} {}.",
                if changed {
                    "paused: its deliveries wait"
                } else {
                    "was already paused"
                }
            );
        }
        Command::Resume {
            project,
            subscription,
        } => {
            let action = Action::Resume(subscription.clone());
            let changed = actions::act(&pool, project, &Actor::command_line(), &action)
                .await?
                .changed;
            println!(
                "Subscription/{subscription} {}.",
                if changed { "resumed" } else { "was not paused" }
            );
        }
        Command::Endpoints { project, all, json } => {
            let endpoints = control::endpoint_health(&pool, project, all).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&endpoints)?);
            } else if endpoints.is_empty() && all {
                println!("No endpoints: no current subscription has a channel endpoint.");
            } else if endpoints.is_empty() {
                println!(
                    "No endpoint is failing or has an open circuit (`--all` lists every one)."
                );
            } else {
                println!("{}", endpoint_table(&endpoints));
            }
        }
        Command::ResetEndpoint { project, endpoint } => {
            let action = Action::ResetEndpoint(endpoint);
            let closed = actions::act(&pool, project, &Actor::command_line(), &action)
                .await?
                .changed;
            println!(
                "{}",
                if closed {
                    "Circuit closed: the endpoint's waiting deliveries go out now."
                } else {
                    "The endpoint's circuit was closed already."
                }
            );
        }
        Command::Replay { project, delivery } => {
            cli::operator::act(&pool, project, Action::Replay(delivery)).await?;
        }
        Command::Cancel {
            project,
            delivery,
            subscription,
        } => {
            let scope = match (delivery, subscription) {
                (Some(id), _) => CancelScope::Delivery(id),
                (_, Some(subscription)) => CancelScope::Subscription(subscription),
                _ => unreachable!("clap requires one scope"),
            };
            cli::operator::act(&pool, project, Action::Cancel(scope)).await?;
        }
        Command::Disable {
            project,
            subscription,
        } => cli::operator::act(&pool, project, Action::Disable(subscription)).await?,
        Command::Enable {
            project,
            subscription,
        } => cli::operator::act(&pool, project, Action::Enable(subscription)).await?,
        _ => unreachable!("not an operator command"),
    }
    pool.close().await;
    Ok(())
}

async fn run(
    url: String,
    dispatch: DispatchConfig,
    delivery: DeliveryConfig,
    (retention, prune_every): (Retention, Duration),
    admin: Option<std::net::SocketAddr>,
    console: Option<std::net::SocketAddr>,
) -> Result<()> {
    let shutdown = shutdown_signal();
    // The pipeline checks the schema itself when it starts; the console's requests get connections
    // of their own, so that a busy page never takes the pipeline's.
    let console_connections = if console.is_some() { 4 } else { 0 };
    let pool = db::connect(
        &url,
        Pipeline::connections(&dispatch, &delivery) + console_connections,
    )
    .await?;
    let mut builder = Pipeline::builder(pool.clone())
        .dispatch(dispatch)
        .delivery(delivery)
        .retention(retention, prune_every);
    if let Some(address) = admin {
        builder = builder.admin(address);
    }
    if let Some(address) = console {
        builder = builder.console(address);
    }
    let running = builder.start().await.map_err(|error| match error {
        PipelineError::Admin(AdminError::Bind { address, source }) => anyhow::anyhow!(
            "the admin endpoint cannot listen on {address}: {source} (is another `fhir-outbox \
             run` on this host?); choose another address with --admin-addr or \
             FHIR_OUTBOX_ADMIN_ADDR (`127.0.0.1:0` takes any free port), or `off`"
        ),
        PipelineError::Console(ConsoleError::Bind { address, source }) => anyhow::anyhow!(
            "the console cannot listen on {address}: {source}; choose another address with \
             --console-addr or FHIR_OUTBOX_CONSOLE_ADDR (`127.0.0.1:0` takes any free port)"
        ),
        other => other.into(),
    })?;
    if let Some(address) = running.console_address() {
        tracing::info!(
            "console on http://{address}/ (API under /api/v1; `fhir-outbox token create` makes a token)"
        );
    }
    match running.admin_address() {
        Some(address) => tracing::info!(
            "running: dispatch and delivery; admin endpoint on http://{address}/ (/metrics, /healthz, /readyz)"
        ),
        None => tracing::info!("running: dispatch and delivery"),
    }
    shutdown.await;
    tracing::info!("shutting down: no new claims; finishing requests in flight");
    running.shutdown().await;
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
    let shutdown = shutdown_signal();
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
    shutdown.await;
    tokio::task::spawn_blocking(move || cluster.stop()).await?;
    Ok(())
}

async fn bench(
    quick: bool,
    json: Option<std::path::PathBuf>,
    only: Vec<cli::bench::Scenario>,
    statements: bool,
) -> Result<()> {
    use cli::bench::{BenchOptions, Sizes};
    let sizes = if quick { Sizes::quick() } else { Sizes::full() };
    let options = BenchOptions {
        sizes,
        quick,
        only,
        statements,
    };
    let report = tokio::select! {
        report = cli::bench::run(&options) => report?,
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

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called, not when the
/// future is first awaited: a command calls it before it announces that it is ready, so that a signal
/// sent as soon as the announcement is read ends it cleanly instead of killing it with the default
/// action.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    }
}

async fn demo(database_url: Option<String>, mut options: cli::demo::DemoOptions) -> Result<()> {
    use std::io::IsTerminal;
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
    options.live = std::io::stdout().is_terminal();
    options.throwaway = cluster.is_some();
    if options.keep_running && cluster.is_some() {
        options.psql_url = Some(url.clone());
    }
    // The first Ctrl-C (or SIGTERM) ends the tour cleanly: no more writes, the pipeline stops, the
    // summary is printed. A second one stops at once.
    let shutdown = CancellationToken::new();
    let (force_tx, force_rx) = tokio::sync::oneshot::channel::<()>();
    let first_signal = shutdown_signal();
    let signals = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            first_signal.await;
            shutdown.cancel();
            shutdown_signal().await;
            let _ = force_tx.send(());
        }
    });
    // The tour runs on a thread of its own, with a runtime of its own, so that its log filter can
    // differ: the worker logs every attempt at info, which would scroll the live view away, and the
    // tour shows each attempt itself. Warnings still show; FHIR_OUTBOX_LOG still decides when set.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let tour_shutdown = shutdown.clone();
    std::thread::spawn(move || {
        let filter =
            EnvFilter::try_from_env("FHIR_OUTBOX_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
        let quiet = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .finish();
        let _guard = tracing::subscriber::set_default(quiet);
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                runtime
                    .block_on(cli::demo::run(
                        &url,
                        &options,
                        tour_shutdown,
                        &mut std::io::stdout(),
                    ))
                    .map_err(anyhow::Error::from)
            });
        let _ = done_tx.send(result);
    });
    let result = tokio::select! {
        result = done_rx => result.unwrap_or_else(|_| Err(anyhow::anyhow!("the tour thread ended without a result"))),
        _ = force_rx => {
            println!("\nInterrupted again: stopping now.");
            Ok(())
        }
    };
    signals.abort();
    if let Some(mut cluster) = cluster {
        tokio::task::spawn_blocking(move || cluster.stop()).await?;
        println!("The throwaway cluster is stopped and removed.");
    }
    result
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("FHIR_OUTBOX_LOG")
        .unwrap_or_else(|_| EnvFilter::new("fhir_outbox=info,warn"));
    // Colours only for a terminal: a log written to a file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
