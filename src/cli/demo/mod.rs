//! `fhir-outbox demo`: a guided tour of the whole pipeline on a database (a throwaway cluster by
//! default). It starts a webhook receiver on loopback, creates a few subscriptions, runs the dispatcher
//! and the delivery worker in-process, makes a stream of writes, shows the deliveries as they happen,
//! and ends with a summary and the SQL to look at everything.
//!
//! The output is the documentation: every step says what it does and why.

mod subscriptions;
mod view;
mod writes;

use crate::cli::receiver::{Receiver, ReceiverError};
use crate::cli::table::Table;
use fhir_outbox::capture::{self, StoreError, WriteContext};
use fhir_outbox::delivery::policy::{Backoff, CircuitBreaker};
use fhir_outbox::delivery::{DeliveryConfig, DeliveryState};
use fhir_outbox::dispatch::DispatchConfig;
use fhir_outbox::operations::console;
use fhir_outbox::pipeline::{Pipeline, PipelineError};
use fhir_outbox::{db, project};
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use view::{Frame, Phase, View, queries};

/// The longest wait, after the writes, for the last deliveries and their retries to finish.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// How often the live view is refreshed.
const REFRESH: Duration = Duration::from_millis(500);

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Connecting or migrating failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// A write was refused unexpectedly.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another database error.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// The built-in receiver could not start.
    #[error(transparent)]
    Receiver(#[from] ReceiverError),
    /// The pipeline could not start.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The dispatcher or the worker panicked.
    #[error("a pipeline task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Writing to the terminal failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    /// The operator console could not start.
    #[error("the console could not start: {0}")]
    Console(String),
}

/// How the tour runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the stream of writes lasts.
    pub duration: Duration,
    /// Writes per second.
    pub writes_per_second: u32,
    /// After the summary, keep the pipeline and the receiver running until `shutdown`.
    pub keep_running: bool,
    /// Redraw a live view in place (stdout is a terminal); otherwise print progress lines.
    pub live: bool,
    /// The URL to give psql, when the database stays up after the tour (a throwaway cluster kept
    /// with `--keep-running`). Not shown otherwise: a DATABASE_URL may hold a password.
    pub psql_url: Option<String>,
    /// The database is a throwaway cluster, removed when the demo ends (the SQL hints say so).
    pub throwaway: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: Duration::from_secs(30),
            writes_per_second: 4,
            keep_running: false,
            live: false,
            psql_url: None,
            throwaway: true,
        }
    }
}

/// The demo's pipeline settings. Production defaults wait 20 s before a first retry and up to 8 h
/// between retries, and 10 s to 10 min before probing an endpoint whose circuit opened; here
/// retries and probes must show within the run, and the receiver is on loopback. (All the demo's
/// subscriptions share the receiver's port, so they are one endpoint: the flaky one's 503s open
/// the circuit for all of them.)
fn demo_delivery_config() -> DeliveryConfig {
    DeliveryConfig {
        concurrency: 10,
        lease: Duration::from_secs(10),
        poll_interval: Duration::from_millis(250),
        backoff: Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(4),
        },
        circuit: CircuitBreaker {
            cool_down: Duration::from_millis(500),
            max_cool_down: Duration::from_secs(2),
            ..CircuitBreaker::default()
        },
        request_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
        allow_unsafe_outbound: true,
        // The tour shows every attempt itself; AuditEvents are stored (the default destination, `resource`).
        log_audit_events: false,
        ..DeliveryConfig::default()
    }
}

fn demo_dispatch_config() -> DispatchConfig {
    DispatchConfig {
        poll_interval: Duration::from_millis(250),
        allow_unsafe_outbound: true,
        ..DispatchConfig::default()
    }
}

/// Runs the tour on the database at `database_url` (migrating it first), printing it to `out`.
/// `shutdown` (Ctrl-C) ends the writes early, or the `keep_running` phase; the summary is printed
/// either way.
pub async fn run(
    database_url: &str,
    options: &DemoOptions,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> Result<(), DemoError> {
    // Writer, view, dispatcher, worker (up to 10 requests in flight) and their LISTEN connections.
    let pool = db::connect(database_url, 24).await?;

    section(out, "1. The database")?;
    db::migrate(&pool).await?;
    let project = project::create_project(&pool, "demo").await?;
    let mut writer = writes::Writer::new(pool.clone(), project);
    writer.seed().await?;
    writeln!(
        out,
        "Migrations applied. Project `demo` (a tenant): {project}.\n\
         {} Patients are written first, before any subscription exists: a subscription only sees\n\
         changes committed after it became active, so none of them is sent anywhere.",
        writes::SEED_PATIENTS
    )?;

    section(out, "2. A webhook receiver")?;
    let subscriptions = subscriptions::all();
    let receiver = Receiver::start(subscriptions.iter().map(|s| s.endpoint()).collect()).await?;
    writeln!(
        out,
        "Listening on {} (loopback, built in). For every request it checks both\n\
         signatures with the subscription's secret, as your receiver should:\n\
         - X-Signature: hex HMAC-SHA256 of the body;\n\
         - webhook-signature: Standard Webhooks, HMAC of `webhook-id.webhook-timestamp.body`\n\
         \x20\x20(and a timestamp within 5 minutes, so a replayed request is refused);\n\
         and it counts webhook-ids: delivery is at least once, so a receiver deduplicates on them.\n\
         /flaky answers 503 to the first {} requests of every webhook-id, to show retries.",
        receiver.base_url(),
        subscriptions::FLAKY_FAILURES
    )?;

    section(out, "3. Subscriptions")?;
    let mut names: HashMap<String, &'static str> = HashMap::new();
    let mut list = String::new();
    for subscription in &subscriptions {
        let written = capture::create(
            &pool,
            project,
            &subscription.resource(&receiver.base_url()),
            &WriteContext::default(),
        )
        .await?;
        let id = written.resource["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        names.insert(id, subscription.name);
        list.push_str(&format!(
            "  {:<18} {}\n  {:<18} {}\n",
            subscription.name,
            format!("{} {}", subscription.criteria, subscription.filter).trim_end(),
            "",
            subscription.lesson
        ));
    }
    writeln!(
        out,
        "Four FHIR Subscription resources (rest-hook, each with its own secret), written through\n\
         the store like any resource. Each delivers to {}/<name>.\n\n{}",
        receiver.base_url(),
        list.trim_end()
    )?;

    section(out, "4. The pipeline")?;
    let pipeline = Pipeline::builder(pool.clone())
        .dispatch(demo_dispatch_config())
        .delivery(demo_delivery_config())
        .start()
        .await?;
    writeln!(
        out,
        "Started in this process, as `fhir-outbox run` would (any number of them can share a database):\n\
         - the dispatcher claims committed changes from fhir_outbox.outbox, evaluates the\n\
         \x20\x20subscriptions against each, and inserts one fhir_outbox.delivery row per match;\n\
         - the delivery worker claims due deliveries with a lease, POSTs the signed notification,\n\
         \x20\x20and records every attempt (fhir_outbox.delivery_attempt) and its AuditEvent.\n\
         Demo settings: retries after 0.5 s, 1 s, 2 s … (cap 4 s) instead of 20 s … 8 h, and\n\
         http to loopback allowed (--allow-unsafe-outbound; never in production)."
    )?;

    section(
        out,
        &format!(
            "5. Writes: {} per second for {} s",
            options.writes_per_second,
            options.duration.as_secs()
        ),
    )?;
    writeln!(
        out,
        "Creates, updates and deletes of Patients, Observations and Encounters. Each write commits\n\
         its outbox row in the same transaction: a committed change is never lost, a rolled-back\n\
         one is never sent.\n{}\n",
        if options.live {
            "Below, refreshed twice a second: the last write and who should get it; outbox rows not\n\
             yet dispatched; deliveries by state (\"awaiting retry\": an attempt failed, the next\n\
             one is scheduled); and the receiver's last requests, as they arrive."
        } else {
            "Progress, once a second: writes; outbox rows not yet dispatched; deliveries by state\n\
             (\"awaiting retry\": an attempt failed, the next one is scheduled); receiver counts."
        }
    )?;
    let interrupted = stream(
        &pool,
        project,
        &mut writer,
        &receiver,
        options,
        &shutdown,
        out,
    )
    .await?;

    // Stop before the summary, so that its numbers are final (a stopped worker releases, and so
    // leaves pending, what it could not finish).
    let pipeline = if options.keep_running && !interrupted {
        Some(pipeline)
    } else {
        pipeline.shutdown().await;
        None
    };
    section(out, "6. What happened")?;
    summary(&pool, project, &receiver, &writer, &names, out).await?;
    section(out, "7. Look at everything in SQL")?;
    sql_hints(project, options, out)?;

    if let Some(pipeline) = pipeline {
        keep_running(&pool, project, &receiver, &shutdown, out).await?;
        pipeline.shutdown().await;
    }
    receiver.stop();
    pool.close().await;
    Ok(())
}

fn section(out: &mut impl Write, title: &str) -> std::io::Result<()> {
    writeln!(out, "\n━━ {title} ━━")
}

/// The stream of writes with the live view, then the wait for the last deliveries. Returns whether
/// it was interrupted.
async fn stream(
    pool: &sqlx::PgPool,
    project: Uuid,
    writer: &mut writes::Writer,
    receiver: &Receiver,
    options: &DemoOptions,
    shutdown: &CancellationToken,
    out: &mut impl Write,
) -> Result<bool, DemoError> {
    let mut screen = Screen {
        pool,
        project,
        receiver,
        view: View::new(options.live),
        last_write: None,
    };
    let started = Instant::now();
    let writes_end = tokio::time::Instant::now() + options.duration;
    let mut write_tick =
        tokio::time::interval(Duration::from_secs(1) / options.writes_per_second.max(1));
    write_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                writeln!(out, "\nInterrupted: no more writes.")?;
                return Ok(true);
            }
            _ = tokio::time::sleep_until(writes_end) => break,
            _ = write_tick.tick() => screen.last_write = Some(writer.next().await?),
            _ = refresh.tick() => {
                let phase = Phase::Writing(started.elapsed(), options.duration);
                screen.draw(phase, writer.counts(), false, out).await?;
            }
        }
    }
    let drain_end = tokio::time::Instant::now() + DRAIN_LIMIT;
    loop {
        let snapshot = screen
            .draw(Phase::Draining, writer.counts(), false, out)
            .await?;
        if snapshot.settled() {
            // The final frame, also in plain mode, so the last line shows the end state.
            screen
                .draw(Phase::Draining, writer.counts(), true, out)
                .await?;
            writeln!(
                out,
                "\nAll changes dispatched and all deliveries finished {:.1} s after the last write.",
                (tokio::time::Instant::now() - writes_end).as_secs_f64()
            )?;
            return Ok(false);
        }
        if tokio::time::Instant::now() >= drain_end {
            writeln!(
                out,
                "\nStill open after {} s: the summary shows what is left.",
                DRAIN_LIMIT.as_secs()
            )?;
            return Ok(false);
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                writeln!(out, "\nInterrupted.")?;
                return Ok(true);
            }
            _ = refresh.tick() => {}
        }
    }
}

/// What the live view reads from, and how it draws.
struct Screen<'a> {
    pool: &'a sqlx::PgPool,
    project: Uuid,
    receiver: &'a Receiver,
    view: View,
    last_write: Option<writes::Done>,
}

impl Screen<'_> {
    /// Plain progress: a line a second (every other refresh).
    const PLAIN_EVERY: u32 = 2;

    /// Reads the state and draws a frame (in plain mode, `force` prints a line now).
    async fn draw(
        &mut self,
        phase: Phase,
        writes: writes::WriteCounts,
        force: bool,
        out: &mut impl Write,
    ) -> Result<view::Snapshot, DemoError> {
        let snapshot = queries::snapshot(self.pool, self.project).await?;
        let events = self.receiver.last_events(4);
        self.view.draw(
            out,
            &Frame {
                phase,
                writes,
                last_write: self.last_write.as_ref(),
                snapshot: &snapshot,
                receiver: self.receiver.counts(),
                events: &events,
            },
            Self::PLAIN_EVERY,
            force,
        )?;
        Ok(snapshot)
    }
}

async fn summary(
    pool: &sqlx::PgPool,
    project: Uuid,
    receiver: &Receiver,
    writer: &writes::Writer,
    names: &HashMap<String, &'static str>,
    out: &mut impl Write,
) -> Result<(), DemoError> {
    let name = |id: &str| names.get(id).copied().unwrap_or("?").to_owned();
    let snapshot = queries::snapshot(pool, project).await?;
    let counts = receiver.counts();
    let writes = writer.counts();
    let (audit_events, issues) = queries::audit_and_issues(pool, project).await?;
    let open = snapshot.pending + snapshot.awaiting_retry + snapshot.in_flight;
    writeln!(
        out,
        "Writes:     {} ({} creates, {} updates, {} deletes)\n\
         Outbox:     {} changes captured (the writes, the {} seed Patients and the {} Subscriptions);\n\
         \x20           {} not dispatched\n\
         Deliveries: {} succeeded, {} failed, {} skipped, {} still open{}\n\
         Attempts:   {} HTTP requests; retries: {} (the flaky endpoint's planned 503s)\n\
         Receiver:   {} requests; signatures verified: {}; unverified: {}\n\
         \x20           duplicate webhook-ids: {} (0 expected: nothing crashed)\n\
         Audit:      {} AuditEvents (one per attempt); subscription issues: {}",
        writes.total(),
        writes.creates,
        writes.updates,
        writes.deletes,
        snapshot.changes,
        writes::SEED_PATIENTS,
        names.len(),
        snapshot.backlog,
        snapshot.succeeded,
        snapshot.failed,
        snapshot.skipped,
        open,
        if open > 0 {
            " (they stay in fhir_outbox.delivery:\n            any worker on this database delivers them)"
        } else {
            ""
        },
        snapshot.attempts,
        snapshot.retries,
        counts.requests,
        counts.verified,
        counts.unverified,
        counts.duplicates,
        audit_events,
        issues
    )?;

    let by_path = receiver.counts_by_path();
    let mut table = Table::new([
        "subscription",
        "deliveries",
        "succeeded",
        "skipped",
        "failed",
        "attempts",
        "verified",
        "503s",
    ]);
    let mut rows = queries::per_subscription(pool, project).await?;
    rows.sort_by_key(|row| name(&row.0));
    let mut totals: HashMap<String, (i64, i64)> = HashMap::new();
    for (id, deliveries, succeeded, skipped, failed, attempts) in rows {
        let name = name(&id);
        totals.insert(name.clone(), (deliveries, attempts));
        let at_receiver = by_path
            .get(&format!("/{name}"))
            .copied()
            .unwrap_or_default();
        table.row([
            name,
            deliveries.to_string(),
            succeeded.to_string(),
            skipped.to_string(),
            failed.to_string(),
            attempts.to_string(),
            at_receiver.verified.to_string(),
            at_receiver.planned_failures.to_string(),
        ]);
    }
    writeln!(out, "\nPer subscription:\n{table}")?;
    notice(pool, project, &totals, out).await?;

    let reasons = queries::reasons(pool, project, 3).await?;
    if !reasons.is_empty() {
        writeln!(out, "Why some were not delivered:")?;
        for (state, reason, count) in reasons {
            writeln!(out, "  {count} × {state}: {reason}")?;
        }
        writeln!(
            out,
            "  (a retry that finds a newer version, or the resource deleted, is skipped: the newer\n   \
             change has a delivery of its own, as in Medplum)"
        )?;
    }

    let mut table = Table::new([
        "delivery",
        "subscription",
        "change",
        "state",
        "attempts",
        "status",
        "webhook-id",
    ]);
    for row in queries::last_deliveries(pool, project, 8).await? {
        table.row([
            row.id.to_string(),
            name(&row.subscription_id),
            format!(
                "{} {}/{} v{}",
                row.interaction,
                row.resource_type,
                writes::short(&row.resource_id),
                row.version_id
            ),
            match (row.state, &row.reason) {
                (DeliveryState::Skipped | DeliveryState::Failed, Some(reason)) => {
                    format!("{} ({reason})", row.state)
                }
                (DeliveryState::Pending, _) if row.attempts > 0 => "awaiting retry".to_owned(),
                (state, _) => state.to_string(),
            },
            row.attempts.to_string(),
            row.last_status.map_or("-".to_owned(), |s| s.to_string()),
            format!("{}…", writes::short(&row.webhook_id)),
        ]);
    }
    writeln!(out, "\nThe last deliveries:\n{table}")?;
    Ok(())
}

/// What the numbers show, subscription by subscription.
async fn notice(
    pool: &sqlx::PgPool,
    project: Uuid,
    totals: &HashMap<String, (i64, i64)>,
    out: &mut impl Write,
) -> Result<(), DemoError> {
    let changes = queries::demo_changes(pool, project).await?;
    let changed = |resource_type: &str, interaction: Option<&str>| -> i64 {
        changes
            .iter()
            .filter(|(t, i, _)| t == resource_type && interaction.is_none_or(|wanted| i == wanted))
            .map(|(_, _, count)| count)
            .sum()
    };
    let got = |name: &str| totals.get(name).copied().unwrap_or_default();
    let (flaky, flaky_attempts) = got("flaky");
    writeln!(
        out,
        "What to notice:\n\
         - heart-rate: {} deliveries for {} Observation changes: the criteria keep heart rates only.\n\
         - patient-activated: {} for {} Patient updates: the FHIRPath compares the version with\n\
         \x20 the previous one, so only false → true counts.\n\
         - new-encounter: {} for {} Encounter changes: creates only.\n\
         - flaky: {flaky} deliveries for {} Patient changes, in {flaky_attempts} HTTP attempts: each was refused\n\
         \x20 twice (503) and retried after about 0.5 s, then 1 s, with the same webhook-id (and a new\n\
         \x20 timestamp and signature), until the receiver accepted it.",
        got("heart-rate").0,
        changed("Observation", None),
        got("patient-activated").0,
        changed("Patient", Some("update")),
        got("new-encounter").0,
        changed("Encounter", None),
        changed("Patient", None),
    )?;
    Ok(())
}

fn sql_hints(project: Uuid, options: &DemoOptions, out: &mut impl Write) -> std::io::Result<()> {
    match &options.psql_url {
        Some(url) => writeln!(out, "The database stays up until Ctrl-C: psql '{url}'")?,
        None if options.throwaway => writeln!(
            out,
            "The throwaway database is removed when the demo ends: run it with --keep-running to\n\
             paste these into psql (or point it at your own database with DATABASE_URL)."
        )?,
        None => writeln!(out, "Everything stays in your database (DATABASE_URL):")?,
    }
    writeln!(
        out,
        "
-- Delivery state per subscription, at a glance (also: fhir-outbox status --project {project}):
SELECT subscription_id, pending, succeeded, skipped, failed, oldest_undelivered_age, last_error
  FROM fhir_outbox.subscription_delivery_status WHERE project_id = '{project}';

-- Every committed change, with the request id that made it (demo-1, demo-2, …):
SELECT seq, interaction, resource_type, resource_id, version_id, request_id, dispatched_at
  FROM fhir_outbox.outbox WHERE project_id = '{project}' ORDER BY seq;

-- One delivery per (change, matching subscription): its state, attempts and webhook-id:
SELECT id, subscription_id, interaction, resource_type, resource_id, version_id, state, attempts,
       last_status, reason, webhook_id
  FROM fhir_outbox.delivery WHERE project_id = '{project}' ORDER BY id;

-- Every HTTP attempt: status, duration, error, and what the receiver answered:
SELECT delivery_id, attempt, status, duration_ms, error, response_body
  FROM fhir_outbox.delivery_attempt WHERE project_id = '{project}' ORDER BY id;

-- The AuditEvent of each attempt (one row each, read as a resource by read_resource; never notified):
SELECT id, recorded_at, content ->> 'outcome' AS outcome, content ->> 'outcomeDesc' AS description
  FROM fhir_outbox.audit_event WHERE project_id = '{project}' ORDER BY recorded_at;

-- Subscriptions whose criteria could not be evaluated (none here):
SELECT subscription_id, kind, message, occurrences
  FROM fhir_outbox.subscription_issue WHERE project_id = '{project}';"
    )
}

/// After the tour, with `--keep-running`: the pipeline keeps delivering what the user writes.
async fn keep_running(
    pool: &sqlx::PgPool,
    project: Uuid,
    receiver: &Receiver,
    shutdown: &CancellationToken,
    out: &mut impl Write,
) -> Result<(), DemoError> {
    // The operator console on a free loopback port, with an operator token made for this run.
    let (_, secret) = console::tokens::create(pool, "demo", console::tokens::Role::Operator, None)
        .await
        .map_err(|error| DemoError::Console(error.to_string()))?;
    let (address, console) = console::serve(
        pool.clone(),
        "127.0.0.1:0".parse().expect("an address"),
        fhir_outbox::delivery::DEFAULT_FHIR_BASE_URL.to_owned(),
        shutdown.clone(),
    )
    .await
    .map_err(|error| DemoError::Console(error.to_string()))?;
    writeln!(
        out,
        "\nThe operator console: http://{address}/ — sign in with the token\n\n    {secret}\n\n\
         (the API: curl -H 'Authorization: Bearer {secret}' http://{address}/api/v1/overview)"
    )?;
    let _console = console;
    writeln!(
        out,
        "\nStill running: the dispatcher, the worker and the receiver. Write something and watch it\n\
         arrive below, e.g. (every Patient change goes to /flaky):\n\
         \x20 SELECT resource ->> 'id' FROM fhir_outbox.create_resource('{project}',\n\
         \x20   '{{\"resourceType\": \"Patient\", \"active\": false}}');\n\
         Press Ctrl-C to stop.\n"
    )?;
    out.flush()?;
    let mut seen = receiver.last_events(1).last().map_or(0, |event| event.seq);
    let mut refresh = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = refresh.tick() => {}
        }
        for event in receiver.events_since(seen) {
            seen = event.seq;
            writeln!(out, "{}", view::event_line(&event))?;
        }
        out.flush()?;
    }
}
