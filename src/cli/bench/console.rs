//! The console scenario: the operator console's reads (`operations::console::queries`, called as
//! its API and pages call them, and the endpoint list of `operations::control`) timed on a
//! database of 1,000,000 delivery attempts (quick: 100,000).
//!
//! The data: 10 projects × 20 subscriptions (written through `fhir_outbox.update_resource`, so
//! they are real resources with chosen ids), 1,000 Patients per project (likewise), 600,000
//! deliveries (quick: 60,000) over the last 24 hours, each change of a project delivered to its 20
//! subscriptions, the projects' changes interleaved, of which about 2 % failed, 0.5 % skipped, 0.5 % cancelled, 0.5 % pending (the newest deliveries
//! of each project's `sub-00`, whose endpoint's circuit is open) and about 100 in flight; and the
//! attempts, spread evenly over the last 24 hours and over the deliveries (1 or 2 each), 5 %
//! failing, durations of 30 ms to a few hundred (timeouts 10 s). Deliveries and attempts are
//! written set-based (`generate_series`), with plain `sqlx::query` (checked at run time, not
//! compile time: this is bench-only set-up, not a query of the product). The console reads
//! attempts by subscription and time or by delivery, never relating their outcome to their
//! delivery's state, so that this data does not keep the two consistent changes nothing of what
//! the reads cost.
//!
//! Each read runs twice to warm up, then `console_runs` times; the table has the median (target:
//! 50 ms, what a page or an API answer may spend in the database) and the note the maximum. A read
//! whose median misses the target is run once more under `auto_explain` and its plans are printed
//! (and kept in the JSON).

use super::fixtures::{self, Env};
use super::scenarios::{Results, other, percentile};
use super::{BenchError, Figure, Scenario, Sizes, Target};
use fhir_outbox::delivery::DeliveryState;
use fhir_outbox::operations::console::queries::{self, DeliveryQuery, Scope};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use uuid::Uuid;

const PROJECTS: i64 = 10;
const SUBSCRIPTIONS: i64 = 20;
const PATIENTS: i64 = 1_000;
/// What one read may take (median): a page or an API answer makes a few of them.
const TARGET_MS: f64 = 50.0;
const WARM_UPS: usize = 2;
const DATABASE: &str = "bench_console";

/// One of the console's reads.
#[derive(Debug, Clone)]
enum Read {
    Overview(Scope),
    Projects,
    Subscriptions(Option<&'static str>),
    Issues,
    Endpoints,
    Deliveries(DeliveryQuery),
    Delivery(i64),
}

/// Runs a read on `project`; returns how many rows it answered (items of its lists).
async fn perform(pool: &PgPool, project: Uuid, read: &Read) -> Result<usize, BenchError> {
    Ok(match read {
        Read::Overview(scope) => {
            let overview = queries::overview(pool, *scope).await?;
            overview.per_minute.len() + overview.failing_subscriptions.len()
        }
        Read::Projects => queries::projects(pool, Scope::All).await?.len(),
        Read::Subscriptions(only) => queries::subscriptions(pool, project, *only).await?.len(),
        Read::Issues => queries::issues(pool, project, None).await?.len(),
        Read::Endpoints => queries::endpoints(pool, project).await?.len(),
        Read::Deliveries(query) => queries::deliveries(pool, project, query)
            .await?
            .deliveries
            .len(),
        Read::Delivery(id) => queries::delivery(pool, project, *id)
            .await?
            .map_or(0, |detail| detail.attempts.len()),
    })
}

pub async fn run(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let url = env.create_db(DATABASE).await?;
    let pool = fixtures::connect(&url, 4).await?;
    let (deliveries, attempts) = (
        sizes.console_deliveries as i64,
        sizes.console_attempts as i64,
    );
    let mut fill = serde_json::Map::new();
    let mut step = |name: &str, started: Instant| {
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("bench: console: {name}: {seconds:.1} s");
        fill.insert(name.into(), json!(seconds));
    };

    let started = Instant::now();
    let mut projects = Vec::new();
    for n in 0..PROJECTS {
        projects.push(
            fhir_outbox::project::create_project(&pool, &format!("bench-console-{n:02}")).await?,
        );
    }
    write_resources(&pool, &projects).await?;
    step("projects, subscriptions and patients", started);

    let started = Instant::now();
    write_deliveries(&pool, &projects, deliveries).await?;
    step("deliveries", started);
    let started = Instant::now();
    write_attempts(&pool, deliveries, attempts).await?;
    step("attempts", started);
    let started = Instant::now();
    write_the_rest(&pool, &projects).await?;
    let project = projects[0];
    let delivery = with_audit_events(&pool, project, deliveries).await?;
    sqlx::query(
        "VACUUM ANALYZE fhir_outbox.delivery, fhir_outbox.delivery_attempt, fhir_outbox.resource,
                        fhir_outbox.resource_version, fhir_outbox.outbox, fhir_outbox.endpoint_circuit,
                        fhir_outbox.subscription_issue, fhir_outbox.subscription_pause",
    )
    .execute(&pool)
    .await?;
    step("vacuum analyze", started);
    let facts = facts(&pool).await?;
    eprintln!("bench: console: {facts}");

    // A Patient of the project changed halfway through the day.
    let patient: String = sqlx::query_scalar(
        "SELECT resource_id FROM fhir_outbox.delivery WHERE project_id = $1 AND id >= $2
         ORDER BY id LIMIT 1",
    )
    .bind(project)
    .bind(deliveries / 2)
    .fetch_one(&pool)
    .await?;
    let now = chrono::Utc::now();
    let hours = |h: i64| Some(now - chrono::Duration::hours(h));
    let page = |query: DeliveryQuery| Read::Deliveries(DeliveryQuery { limit: 50, ..query });
    let deep = deliveries / 10;
    let reads: Vec<(&str, &str, Read)> = vec![
        (
            "overview_all",
            "overview, every project",
            Read::Overview(Scope::All),
        ),
        (
            "overview_project",
            "overview, one project",
            Read::Overview(Scope::Project(project)),
        ),
        ("projects", "projects", Read::Projects),
        (
            "subscriptions",
            "subscriptions of a project (20, with figures)",
            Read::Subscriptions(None),
        ),
        (
            "subscription",
            "one subscription (with figures)",
            Read::Subscriptions(Some("sub-05")),
        ),
        ("issues", "issues of a project", Read::Issues),
        (
            "endpoints",
            "endpoints of a project, with figures",
            Read::Endpoints,
        ),
        (
            "deliveries",
            "deliveries, first page",
            page(DeliveryQuery::default()),
        ),
        (
            "deliveries_failed",
            "deliveries, state=failed",
            page(DeliveryQuery {
                state: Some(DeliveryState::Failed),
                ..Default::default()
            }),
        ),
        (
            "deliveries_pending",
            "deliveries, state=pending",
            page(DeliveryQuery {
                state: Some(DeliveryState::Pending),
                ..Default::default()
            }),
        ),
        (
            "deliveries_in_flight",
            "deliveries, state=in_flight",
            page(DeliveryQuery {
                state: Some(DeliveryState::InFlight),
                ..Default::default()
            }),
        ),
        (
            "deliveries_cancelled",
            "deliveries, state=cancelled",
            page(DeliveryQuery {
                state: Some(DeliveryState::Cancelled),
                ..Default::default()
            }),
        ),
        (
            "deliveries_subscription",
            "deliveries, subscription",
            page(DeliveryQuery {
                subscription: Some("sub-05".into()),
                ..Default::default()
            }),
        ),
        (
            "deliveries_subscription_failed",
            "deliveries, subscription and state=failed",
            page(DeliveryQuery {
                subscription: Some("sub-05".into()),
                state: Some(DeliveryState::Failed),
                ..Default::default()
            }),
        ),
        (
            "deliveries_resource",
            "deliveries, resource",
            page(DeliveryQuery {
                resource: Some(("Patient".into(), patient.clone())),
                ..Default::default()
            }),
        ),
        (
            "deliveries_since",
            "deliveries, since=1h",
            page(DeliveryQuery {
                since: hours(1),
                ..Default::default()
            }),
        ),
        (
            "deliveries_until",
            "deliveries, until=23h (the oldest hour)",
            page(DeliveryQuery {
                until: hours(23),
                ..Default::default()
            }),
        ),
        (
            "deliveries_window",
            "deliveries, since=12h until=11h",
            page(DeliveryQuery {
                since: hours(12),
                until: hours(11),
                ..Default::default()
            }),
        ),
        (
            "deliveries_deep",
            "deliveries, a cursor 90 % deep",
            page(DeliveryQuery {
                before: Some(deep),
                ..Default::default()
            }),
        ),
        (
            "deliveries_failed_deep",
            "deliveries, state=failed, a cursor 90 % deep",
            page(DeliveryQuery {
                state: Some(DeliveryState::Failed),
                before: Some(deep),
                ..Default::default()
            }),
        ),
        (
            "delivery",
            "one delivery (attempts, AuditEvents, payload)",
            Read::Delivery(delivery),
        ),
    ];

    let mut measured = Vec::new();
    let mut plans = serde_json::Map::new();
    for (key, label, read) in &reads {
        for _ in 0..WARM_UPS {
            perform(&pool, project, read).await?;
        }
        let mut times = Vec::with_capacity(sizes.console_runs);
        let mut rows = 0;
        for _ in 0..sizes.console_runs {
            let clock = Instant::now();
            rows = perform(&pool, project, read).await?;
            times.push(clock.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let (median, max) = (percentile(&times, 50.0), times[times.len() - 1]);
        eprintln!("bench: console: {label}: median {median:.2} ms, max {max:.2} ms, {rows} rows");
        if median > TARGET_MS {
            let shapes = explain(&url, project, read).await?;
            eprintln!("bench: console: {label} missed {TARGET_MS} ms; its plans:");
            for shape in &shapes {
                eprintln!("{shape}");
            }
            plans.insert((*key).into(), json!(shapes));
        }
        results.figures.push(
            Figure::new(
                Scenario::Console,
                format!("console.{key}.median_ms"),
                format!(
                    "console: {label} ({rows} {})",
                    if rows == 1 { "row" } else { "rows" }
                ),
                median,
                "ms",
            )
            .target(Target::AtMost(TARGET_MS))
            .note(format!("max {max:.1} ms of {} runs", sizes.console_runs)),
        );
        measured.push(json!({ "read": key, "median_ms": median, "max_ms": max, "rows": rows }));
    }
    pool.close().await;
    env.drop_db(DATABASE).await?;
    results.details.insert(
        "console".into(),
        json!({ "data": facts, "fill_seconds": fill, "reads": measured, "plans": plans,
                "runs": sizes.console_runs, "project": project, "delivery": delivery }),
    );
    Ok(())
}

/// The subscriptions (`sub-00` … `sub-19`, each to an endpoint of its own, with a header and a
/// secret) and Patients (`pat-0000` …) of every project, through the store's write function.
async fn write_resources(pool: &PgPool, projects: &[Uuid]) -> Result<(), BenchError> {
    sqlx::query(
        "SELECT count(*)
         FROM unnest($1::uuid[]) WITH ORDINALITY AS p(id, n)
         CROSS JOIN generate_series(0, $2 - 1) AS s
         CROSS JOIN LATERAL fhir_outbox.update_resource(
             p.id, 'Subscription', 'sub-' || lpad(s::text, 2, '0'),
             jsonb_build_object(
                 'resourceType', 'Subscription', 'id', 'sub-' || lpad(s::text, 2, '0'),
                 'status', 'active', 'reason', 'bench', 'criteria', 'Patient',
                 'channel', jsonb_build_object(
                     'type', 'rest-hook',
                     'endpoint', format('https://hooks-%s-%s.example.com/in?token=bench', p.n, s),
                     'header', jsonb_build_array('Authorization: Bearer bench')),
                 'extension', jsonb_build_array(jsonb_build_object(
                     'url', 'https://www.medplum.com/fhir/StructureDefinition/subscription-secret',
                     'valueString', 'bench-secret')))) w",
    )
    .bind(projects)
    .bind(SUBSCRIPTIONS)
    .execute(pool)
    .await?;
    sqlx::query(
        "SELECT count(*)
         FROM unnest($1::uuid[]) AS p(id)
         CROSS JOIN generate_series(0, $2 - 1) AS i
         CROSS JOIN LATERAL fhir_outbox.update_resource(
             p.id, 'Patient', 'pat-' || lpad(i::text, 4, '0'),
             $3::jsonb || jsonb_build_object('id', 'pat-' || lpad(i::text, 4, '0'))) w",
    )
    .bind(projects)
    .bind(PATIENTS)
    .bind(fixtures::patient(0))
    .execute(pool)
    .await?;
    // Their changes were dispatched long ago.
    sqlx::query("UPDATE fhir_outbox.outbox SET dispatched_at = changed_at")
        .execute(pool)
        .await?;
    Ok(())
}

/// Deliveries `1..=count`, in the order of their changes over the last 24 hours: change `c` (of
/// project `c mod 10`, to Patient `c / 10 mod 1000`) matched the project's 20 subscriptions, so it
/// has 20 deliveries with consecutive ids, as dispatch writes them.
async fn write_deliveries(pool: &PgPool, projects: &[Uuid], count: i64) -> Result<(), BenchError> {
    sqlx::query(
        "WITH r(id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
                state, attempts, next_attempt_at, finished_at, reason, last_status, lease_token,
                lease_expires_at) AS MATERIALIZED (
         SELECT g, p, 'sub-' || lpad(si::text, 2, '0'), c + 1, p, 'Patient',
                'pat-' || lpad(((c / $3) % $5)::text, 4, '0'), 1, 'update', at,
                'bench-' || c, md5(c::text), at + interval '5 ms', state,
                CASE state WHEN 'succeeded' THEN 1 + h % 2 WHEN 'failed' THEN 5
                           WHEN 'pending' THEN 3 ELSE 0 END,
                CASE WHEN state = 'pending' THEN now() + interval '30 seconds' ELSE at END,
                CASE WHEN state IN ('succeeded', 'failed', 'skipped', 'cancelled')
                     THEN at + interval '80 ms' END,
                CASE state WHEN 'failed' THEN 'Received status 503 (5 attempts)'
                           WHEN 'pending' THEN 'Received status 503'
                           WHEN 'skipped' THEN 'a newer version was delivered'
                           WHEN 'cancelled' THEN 'cancelled by bench' END,
                CASE state WHEN 'succeeded' THEN 200 WHEN 'failed' THEN 503 WHEN 'pending' THEN 503 END,
                CASE WHEN state = 'in_flight' THEN gen_random_uuid() END,
                CASE WHEN state = 'in_flight' THEN now() + interval '30 seconds' END
         FROM (SELECT g, c, p, si, h, at,
                      CASE WHEN si = 0 AND g > $2 * 9 / 10 THEN 'pending'
                           WHEN g > $2 - 100 THEN 'in_flight'
                           WHEN si = 1 AND g BETWEEN $2 / 2 AND $2 * 6 / 10 THEN 'cancelled'
                           WHEN h < 20 THEN 'failed'
                           WHEN h < 25 THEN 'skipped'
                           ELSE 'succeeded' END AS state
               FROM (SELECT g, c, ($1::uuid[])[1 + c % $3] AS p, (g - 1) % $4 AS si,
                            (g * 2654435761) % 1000 AS h,
                            now() - interval '24 hours' - interval '1 second'
                                + (c::float8 * $4 / $2) * interval '24 hours' AS at
                     FROM (SELECT g, (g - 1) / $4 AS c FROM generate_series(1::bigint, $2) g) g
                    ) x) y),
         unfinished AS (
             INSERT INTO fhir_outbox.unfinished_delivery
                 (id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                  resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
                  state, attempts, next_attempt_at, reason, last_status, lease_token, lease_expires_at)
             SELECT id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                    resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
                    state, attempts, next_attempt_at, reason, last_status, lease_token, lease_expires_at
             FROM r WHERE state IN ('pending', 'in_flight'))
         INSERT INTO fhir_outbox.finished_delivery
             (id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
              resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
              state, attempts, next_attempt_at, finished_at, reason, last_status)
         SELECT id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
                state, attempts, next_attempt_at, finished_at, reason, last_status
         FROM r WHERE state NOT IN ('pending', 'in_flight')",
    )
    .bind(projects)
    .bind(count)
    .bind(PROJECTS)
    .bind(SUBSCRIPTIONS)
    .bind(PATIENTS)
    .execute(pool)
    .await?;
    sqlx::query("SELECT setval('fhir_outbox.delivery_id_seq', $1)")
        .bind(count)
        .execute(pool)
        .await?;
    Ok(())
}

/// `count` attempts over the last 24 hours, attempt `a` of delivery `1 + (a - 1) × deliveries /
/// count` (1 or 2 per delivery), 5 % failing.
async fn write_attempts(pool: &PgPool, deliveries: i64, count: i64) -> Result<(), BenchError> {
    sqlx::query(
        "INSERT INTO fhir_outbox.delivery_attempt
             (delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
              status, error, response_body)
         SELECT d.id, d.project_id, d.subscription_id,
                CASE WHEN a.a > 1 AND (a.a - 2) * $1 / $2 = (a.a - 1) * $1 / $2 THEN 2 ELSE 1 END,
                now() - interval '24 hours' - interval '1 second'
                    + (a.a::float8 / $2) * interval '24 hours',
                CASE WHEN a.ok THEN 30 + (400 * power(random(), 4))::int
                     WHEN a.h % 3 = 0 THEN 10000
                     ELSE 20 + (100 * random())::int END,
                a.ok,
                CASE WHEN a.ok THEN 200 WHEN a.h % 3 = 0 THEN NULL ELSE 503 END,
                CASE WHEN a.ok THEN NULL WHEN a.h % 3 = 0 THEN 'operation timed out'
                     ELSE 'Received status 503' END,
                CASE WHEN a.ok THEN 'ok' ELSE 'Service Unavailable' END
         FROM (SELECT a, h, h >= 50 AS ok
               FROM (SELECT a, (a * 2654435761) % 1000 AS h
                     FROM generate_series(1::bigint, $2) a) x) a
         JOIN fhir_outbox.delivery d ON d.id = 1 + (a.a - 1) * $1 / $2
         ORDER BY a.a",
    )
    .bind(deliveries)
    .bind(count)
    .execute(pool)
    .await?;
    Ok(())
}

/// The open circuits of every `sub-00`'s endpoint, issues of every `sub-19`, one pause.
async fn write_the_rest(pool: &PgPool, projects: &[Uuid]) -> Result<(), BenchError> {
    for sql in [
        "INSERT INTO fhir_outbox.endpoint_circuit
             (project_id, endpoint, state, consecutive_failures, openings, opened_at, next_probe_at,
              last_failure, last_failure_at)
         SELECT p.id, fhir_outbox.endpoint_origin(format('https://hooks-%s-0.example.com/in', p.n)),
                'open', 12, 3, now() - interval '10 minutes', now() + interval '5 minutes',
                'Received status 503', now() - interval '1 minute'
         FROM unnest($1::uuid[]) WITH ORDINALITY AS p(id, n)",
        "INSERT INTO fhir_outbox.subscription_issue
             (project_id, subscription_id, subscription_version, kind, message, occurrences)
         SELECT p, 'sub-19', 1, 'evaluation_error', 'bench: an evaluation failed', 42
         FROM unnest($1::uuid[]) AS p",
        "INSERT INTO fhir_outbox.subscription_pause (project_id, subscription_id)
         VALUES (($1::uuid[])[2], 'sub-00')",
    ] {
        sqlx::query(sql).bind(projects).execute(pool).await?;
    }
    Ok(())
}

/// A succeeded delivery of `project` halfway through, whose attempts get real AuditEvents (the
/// bulk attempts have none: the detail reads them by primary key, one per attempt shown).
async fn with_audit_events(
    pool: &PgPool,
    project: Uuid,
    deliveries: i64,
) -> Result<i64, BenchError> {
    let delivery: i64 = sqlx::query_scalar(
        "SELECT d.id FROM fhir_outbox.delivery d
         WHERE d.project_id = $1 AND d.state = 'succeeded' AND d.id > $2 / 2
           AND (SELECT count(*) FROM fhir_outbox.delivery_attempt a WHERE a.delivery_id = d.id) = 2
         ORDER BY d.id LIMIT 1",
    )
    .bind(project)
    .bind(deliveries)
    .fetch_one(pool)
    .await?;
    let attempts: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM fhir_outbox.delivery_attempt WHERE delivery_id = $1")
            .bind(delivery)
            .fetch_all(pool)
            .await?;
    for attempt in attempts {
        let event = json!({
            "resourceType": "AuditEvent", "type": { "code": "transmit" },
            "recorded": chrono::Utc::now().to_rfc3339(), "outcome": "0",
            "outcomeDesc": "Attempt 1 received status 200",
            "agent": [{ "type": { "text": "Subscription" }, "requestor": false }],
            "source": { "observer": { "reference": "Subscription/sub-05" } }
        });
        let written = fhir_outbox::capture::create(
            pool,
            project,
            &event,
            &fhir_outbox::capture::WriteContext::default(),
        )
        .await?;
        sqlx::query("UPDATE fhir_outbox.delivery_attempt SET audit_event_id = $1 WHERE id = $2")
            .bind(fixtures::resource_id(&written.resource))
            .bind(attempt)
            .execute(pool)
            .await?;
    }
    Ok(delivery)
}

/// What the database holds: rows per table and state, and sizes.
async fn facts(pool: &PgPool) -> Result<Value, BenchError> {
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM fhir_outbox.delivery GROUP BY state ORDER BY state",
    )
    .fetch_all(pool)
    .await?;
    let (attempts, failed, last_hour): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE NOT succeeded),
                count(*) FILTER (WHERE started_at >= now() - interval '1 hour')
         FROM fhir_outbox.delivery_attempt",
    )
    .fetch_one(pool)
    .await?;
    let bytes = |table: &'static str| super::fixtures::table_bytes(pool, table);
    Ok(json!({
        "projects": PROJECTS, "subscriptions": PROJECTS * SUBSCRIPTIONS,
        "patients": PROJECTS * PATIENTS,
        "deliveries": states.iter().map(|(_, n)| n).sum::<i64>(),
        "delivery_states": states
            .into_iter()
            .map(|(state, n)| (state, json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "attempts": attempts, "failed_attempts": failed, "attempts_last_hour": last_hour,
        "delivery_bytes": bytes("fhir_outbox.unfinished_delivery").await?
            + bytes("fhir_outbox.finished_delivery").await?,
        "delivery_attempt_bytes": bytes("fhir_outbox.delivery_attempt").await?,
    }))
}

/// Runs `read` once on a connection of its own with `auto_explain` (every statement's plan with
/// its actual rows and times, sent back as a notice), and returns each plan's shape: one line per
/// node.
async fn explain(url: &str, project: Uuid, read: &Read) -> Result<Vec<String>, BenchError> {
    use tracing::instrument::WithSubscriber;
    use tracing_subscriber::layer::SubscriberExt;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                for setting in [
                    "LOAD 'auto_explain'",
                    "SET auto_explain.log_min_duration = 0",
                    "SET auto_explain.log_analyze = on",
                    "SET auto_explain.log_buffers = on",
                    "SET auto_explain.log_format = json",
                    "SET auto_explain.log_level = notice",
                ] {
                    sqlx::query(setting).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect_with(PgConnectOptions::from_str(url)?)
        .await?;
    let notices = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Notices(notices.clone()));
    perform(&pool, project, read)
        .with_subscriber(subscriber)
        .await?;
    pool.close().await;
    let notices = notices.lock().map_err(other)?.clone();
    Ok(notices
        .iter()
        .filter_map(|notice| {
            let plan: Value = serde_json::from_str(&notice[notice.find('{')?..]).ok()?;
            let mut shape = format!("{}\n", notice.lines().next().unwrap_or_default());
            render(&plan["Plan"], 1, &mut shape);
            Some(shape)
        })
        .collect())
}

/// One line per plan node: its type, relation, index, rows, loops, time, buffers.
fn render(node: &Value, depth: usize, out: &mut String) {
    use std::fmt::Write as _;
    let text = |key: &str| node[key].as_str().map(str::to_owned);
    let number = |key: &str| node[key].as_f64().unwrap_or_default();
    let mut line = text("Node Type").unwrap_or_default();
    if let Some(relation) = text("Relation Name") {
        let _ = write!(line, " on {relation}");
    }
    if let Some(index) = text("Index Name") {
        let _ = write!(line, " using {index}");
    }
    let _ = writeln!(
        out,
        "{:indent$}{line} (rows {} × {} loops, {:.2} ms, {} buffers)",
        "",
        number("Actual Rows"),
        number("Actual Loops"),
        number("Actual Total Time"),
        number("Shared Hit Blocks") + number("Shared Read Blocks"),
        indent = depth * 2
    );
    for child in node["Plans"].as_array().into_iter().flatten() {
        render(child, depth + 1, out);
    }
}

/// Keeps the text of sqlx's notices (where `auto_explain` puts its plans).
struct Notices(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Notices {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(Option<String>);
        impl tracing::field::Visit for Message {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "message" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        if event.metadata().target() != "sqlx::postgres::notice" {
            return;
        }
        let mut message = Message(None);
        event.record(&mut message);
        if let (Some(message), Ok(mut notices)) = (message.0, self.0.lock()) {
            notices.push(message);
        }
    }
}
