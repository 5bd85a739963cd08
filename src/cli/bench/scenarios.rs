//! The measurements.

use super::fixtures::{self, Env, WorkerProcess, patient};
use super::{BenchError, CpuProfile, Figure, Scenario, Sizes, Target};
use fhir_outbox::delivery::{DeliveryConfig, lease};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What the scenarios measured so far.
#[derive(Default)]
pub struct Results {
    pub figures: Vec<Figure>,
    pub cpu: Vec<CpuProfile>,
    pub details: serde_json::Map<String, Value>,
}

/// Runs one scenario.
pub async fn run(
    scenario: Scenario,
    env: &Env,
    sizes: &Sizes,
    results: &mut Results,
) -> Result<(), BenchError> {
    match scenario {
        Scenario::Capture => capture_cost(env, sizes, results).await,
        Scenario::Bulk => super::bulk::run(env, sizes, results).await,
        Scenario::Dispatch => dispatch(env, sizes, results).await,
        Scenario::E2e => end_to_end(env, sizes, results).await,
        Scenario::Latency => latency(env, sizes, results).await,
        Scenario::Claim => claim(env, sizes, results).await,
        Scenario::Noisy => super::isolation::noisy_neighbour(env, sizes, results).await,
        Scenario::Slow => super::isolation::slow_receivers(env, sizes, results).await,
        Scenario::Console => super::console::run(env, sizes, results).await,
        Scenario::Fhirpath => super::fhirpath::run(results),
        Scenario::Retention => super::storage::retention(env, sizes, results).await,
        Scenario::Horizon => super::storage::horizon(env, sizes, results).await,
        Scenario::Scaling => super::scaling::run(env, sizes, results).await,
        Scenario::Topics => super::topics::run(env, sizes, results).await,
        Scenario::Floor => super::floor::run(env, sizes, results).await,
    }
}

/// An error said in words.
pub(super) fn other(error: impl std::fmt::Display) -> BenchError {
    BenchError::Other(error.to_string())
}

// ---------------------------------------------------------------------------------------------
// Capture cost

/// The write paths the capture scenario compares. All run while a real dispatcher (`fhir-outbox
/// run`, a child process) works on the same database, as in production: it drains the outbox as
/// the writers fill it, and whether writers notify depends on it (migration 7: only while a
/// dispatch loop waits for a wake-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// No outbox row: `write_version` writes the version (and bumps the Subscription epoch) only.
    Without,
    /// The installed functions: the outbox row, and a notification at commit only while a dispatch
    /// loop waits for one.
    With,
    /// Diagnosis, the behaviour before migration 7: the outbox row and a `pg_notify` in every write
    /// (the commit-time trigger still runs; its notification, if any, folds into that one).
    NotifyEveryWrite,
    /// Diagnosis, the floor of capture: the outbox row, with the commit-time trigger's
    /// once-per-transaction marker set beforehand, so that its check is never queued and no write
    /// ever notifies.
    NeverNotify,
}

impl Variant {
    /// Interleaved in this order (the declaration order: `variant as usize` indexes it), then in
    /// the reverse order, so that a change of background load hits every one alike.
    const ALL: [Variant; 4] = [
        Variant::Without,
        Variant::With,
        Variant::NotifyEveryWrite,
        Variant::NeverNotify,
    ];

    /// The schema whose `create_resource`/`update_resource` the writers call.
    fn schema(self) -> &'static str {
        match self {
            Variant::Without => "fhir_outbox_bench",
            Variant::With => "fhir_outbox",
            Variant::NotifyEveryWrite => "fhir_outbox_bench_notify",
            Variant::NeverNotify => "fhir_outbox_bench_quiet",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Without => "without",
            Variant::With => "with",
            Variant::NotifyEveryWrite => "notify_every_write",
            Variant::NeverNotify => "never_notify",
        }
    }

    /// Whether its writes have outbox rows.
    fn captured(self) -> bool {
        self != Variant::Without
    }

    /// What the bench copy of `write_version` does after the version insert and the epoch bump
    /// (`None` for the installed functions).
    fn capture_sql(self) -> Option<String> {
        let outbox_insert = "IF p_type <> 'AuditEvent' THEN
        INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id,
                                        previous_version_id, interaction, changed_at, request_id, trace_id)
        VALUES (p_project, p_type, p_id, p_version, p_previous, p_interaction, p_at, p_request_id, p_trace_id);";
        match self {
            Variant::With => None,
            Variant::Without => Some(String::new()),
            Variant::NotifyEveryWrite => Some(format!(
                "{outbox_insert}
        PERFORM pg_notify('fhir_outbox_change', '');
    END IF;"
            )),
            Variant::NeverNotify => Some(format!(
                "PERFORM set_config('{WAKEUP_QUEUED}', 'on', true);
    {outbox_insert}
    END IF;"
            )),
        }
    }
}

/// The transaction-local setting with which the trigger `outbox_wake_waiting_dispatchers`
/// (migration 20261218000001) remembers that it has queued this transaction's commit-time check:
/// set before the first outbox row, no check is ever queued.
const WAKEUP_QUEUED: &str = "fhir_outbox.wakeup_queued";

/// The bench copy of `write_version` for `variant`. What differs from the installed one (migration
/// 7) is only what follows the version insert and the Subscription epoch bump: see
/// [`Variant::capture_sql`]. `create_resource` and `update_resource` are the installed definitions,
/// read back with `pg_get_functiondef` and re-created in the bench schema with only their calls to
/// `write_version` redirected, so that validation, normalisation, stamping and locking stay
/// identical and cannot drift from the real functions.
fn write_version_variant(schema: &str, capture_sql: &str) -> String {
    format!(
        r#"
CREATE FUNCTION {schema}.write_version(
    p_project uuid, p_type text, p_id text, p_version bigint, p_previous bigint, p_interaction text,
    p_content jsonb, p_at timestamptz, p_author text, p_request_id text, p_trace_id text)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO fhir_outbox.resource_version
        (project_id, resource_type, id, version_id, deleted, content, last_updated, author)
    VALUES (p_project, p_type, p_id, p_version, p_content IS NULL, p_content, p_at, p_author);
    IF p_type = 'Subscription' THEN
        UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1 WHERE id = p_project;
    END IF;
    {capture_sql}
END
$$"#
    )
}

async fn install_variants(pool: &PgPool) -> Result<(), BenchError> {
    // The quiet variant relies on the trigger's marker: make sure it is still the one in use.
    let trigger: String = sqlx::query_scalar(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger \
         WHERE tgname = 'outbox_wake_waiting_dispatchers' AND tgrelid = 'fhir_outbox.outbox'::regclass",
    )
    .fetch_one(pool)
    .await?;
    if !trigger.contains(WAKEUP_QUEUED) {
        return Err(other(format!(
            "the trigger outbox_wake_waiting_dispatchers no longer uses {WAKEUP_QUEUED}: update the bench"
        )));
    }
    for variant in Variant::ALL {
        let Some(capture_sql) = variant.capture_sql() else {
            continue;
        };
        let schema = variant.schema();
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(pool)
            .await?;
        sqlx::query(&write_version_variant(schema, &capture_sql))
            .execute(pool)
            .await?;
        for function in ["create_resource", "update_resource"] {
            let definition: String =
                sqlx::query_scalar("SELECT pg_get_functiondef(($1 || $2)::regproc)")
                    .bind("fhir_outbox.")
                    .bind(function)
                    .fetch_one(pool)
                    .await?;
            let header = format!("FUNCTION fhir_outbox.{function}(");
            if !definition.contains(&header) || !definition.contains("fhir_outbox.write_version(") {
                return Err(other(format!(
                    "unexpected definition of fhir_outbox.{function}: cannot derive the bench copy"
                )));
            }
            let copy = definition
                .replace(&header, &format!("FUNCTION {schema}.{function}("))
                .replace(
                    "fhir_outbox.write_version(",
                    &format!("{schema}.write_version("),
                );
            sqlx::query(&copy).execute(pool).await?;
        }
    }
    Ok(())
}

/// Write transactions (a create, then an update of it: two transactions) for `seconds` from
/// `writers` connections; returns transactions per second.
async fn write_for(
    pool: &PgPool,
    project: Uuid,
    writers: usize,
    seconds: u64,
    schema: &str,
    round: u64,
) -> Result<(u64, f64), BenchError> {
    // The same statement shape as capture::create / capture::update, in both variants.
    let create_sql = format!(
        "SELECT outcome, resource, version_id FROM {schema}.create_resource($1, $2, $3, $4, $5)"
    );
    let update_sql = format!(
        "SELECT outcome, resource, version_id FROM {schema}.update_resource($1, $2, $3, $4, $5, $6, $7, $8)"
    );
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers as u64 {
        let (pool, count) = (pool.clone(), count.clone());
        let (create_sql, update_sql) = (create_sql.clone(), update_sql.clone());
        tasks.spawn(async move {
            let mut n = round * 1_000_000_000 + writer * 10_000_000;
            while Instant::now() < deadline {
                n += 1;
                let row = sqlx::query(&create_sql)
                    .bind(project)
                    .bind(patient(n))
                    .bind(None::<String>)
                    .bind(None::<String>)
                    .bind(None::<String>)
                    .fetch_one(&pool)
                    .await?;
                let mut resource: Value = row.try_get("resource")?;
                let id = resource["id"].as_str().unwrap_or_default().to_owned();
                resource["active"] = json!(false);
                resource["birthDate"] = json!("1975-01-01");
                sqlx::query(&update_sql)
                    .bind(project)
                    .bind("Patient")
                    .bind(&id)
                    .bind(&resource)
                    .bind(None::<i64>)
                    .bind(None::<String>)
                    .bind(None::<String>)
                    .bind(None::<String>)
                    .fetch_one(&pool)
                    .await?;
                count.fetch_add(2, Ordering::Relaxed);
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(other)??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let total = count.load(Ordering::Relaxed);
    Ok((total, elapsed))
}

/// Counts the notifications on `fhir_outbox_change` while it lives: one per notifying transaction
/// (PostgreSQL folds a transaction's identical notifications into one).
struct NotificationCounter {
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl NotificationCounter {
    async fn start(url: &str) -> Result<NotificationCounter, BenchError> {
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen("fhir_outbox_change").await?;
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let task = tokio::spawn(async move {
            while listener.recv().await.is_ok() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(NotificationCounter { count, task })
    }

    /// The count, once the notifications of the last commits have had time to arrive.
    async fn stop(self) -> u64 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.task.abort();
        let _ = self.task.await;
        self.count.load(Ordering::Relaxed)
    }
}

async fn undispatched(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.outbox WHERE dispatched_at IS NULL")
            .fetch_one(pool)
            .await?,
    )
}

/// Waits until the worker's dispatcher has drained the outbox and waits for a wake-up again.
async fn until_dispatcher_idle(
    pool: &PgPool,
    worker: &mut WorkerProcess,
    limit: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + limit;
    loop {
        worker.check_alive()?;
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.dispatcher_waiting WHERE waiting")
                .fetch_one(pool)
                .await?;
        if waiting > 0 && undispatched(pool).await? == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(other(format!(
                "the dispatcher did not drain the outbox and wait within {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Accumulated over the rounds of one variant.
#[derive(Default, Clone, Copy)]
struct VariantTotals {
    transactions: u64,
    seconds: f64,
    notifying: u64,
    postgres_s: f64,
    worker_s: f64,
    bench_s: f64,
}

async fn capture_cost(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let url = env.create_db("bench_capture").await?;
    let pool = fixtures::connect(&url, sizes.capture_writers as u32 + 2).await?;
    let project = fhir_outbox::project::create_project(&pool, "bench").await?;
    install_variants(&pool).await?;
    // The dispatcher of production. No subscriptions: it claims the rows, finds no candidates and
    // marks them dispatched, which is the work (and the wake-up protocol) every write causes.
    let mut worker = WorkerProcess::start(env, &url, 10).await?;
    until_dispatcher_idle(&pool, &mut worker, Duration::from_secs(30)).await?;
    let mut totals = [VariantTotals::default(); Variant::ALL.len()];
    let mut rounds = Vec::new();
    let mut captured_writes = 0;
    for round in 0..2u64 {
        // The second round runs the variants in reverse order, so that a slow drift of the
        // machine's speed weighs on every variant alike instead of on the later ones.
        let order: Vec<Variant> = match round % 2 {
            0 => Variant::ALL.to_vec(),
            _ => Variant::ALL.iter().rev().copied().collect(),
        };
        for variant in order {
            // Each variant starts with an empty outbox, an idle dispatcher and a checkpoint just
            // done: otherwise the checkpoint that the WAL of the earlier slices brings on falls
            // in whichever variant runs at that moment (its full-page writes slow every writer),
            // always the same ones in a fixed order.
            until_dispatcher_idle(&pool, &mut worker, Duration::from_secs(60)).await?;
            sqlx::query("CHECKPOINT").execute(&pool).await?;
            let checkpoints_before = fixtures::checkpoints(&pool).await?;
            // Only for the real functions: counting adds a listening backend (as a second
            // dispatcher process would), which notifying commits signal.
            let counter = if variant == Variant::With {
                Some(NotificationCounter::start(&url).await?)
            } else {
                None
            };
            if env.statements {
                sqlx::query("SELECT pg_stat_statements_reset()")
                    .execute(&pool)
                    .await?;
            }
            let (pg0, own0, worker0) = (env.postgres_cpu(), env.own_cpu(), worker.cpu(env.ticks));
            let (count, secs) = write_for(
                &pool,
                project,
                sizes.capture_writers,
                sizes.capture_seconds,
                variant.schema(),
                round * Variant::ALL.len() as u64 + variant as u64,
            )
            .await?;
            let (pg1, own1, worker1) = (env.postgres_cpu(), env.own_cpu(), worker.cpu(env.ticks));
            let checkpoints = fixtures::checkpoints(&pool).await? - checkpoints_before;
            let backlog = undispatched(&pool).await?;
            let statements = match env.statements {
                true => {
                    json!(top_statements(&pool, &format!("capture, {}", variant.label())).await?)
                }
                false => Value::Null,
            };
            let notifying = match counter {
                Some(counter) => Some(counter.stop().await),
                None => None,
            };
            let total = &mut totals[variant as usize];
            total.transactions += count;
            total.seconds += secs;
            total.notifying += notifying.unwrap_or(0);
            total.postgres_s += pg1 - pg0;
            total.worker_s += worker1 - worker0;
            total.bench_s += own1 - own0;
            if variant.captured() {
                captured_writes += count;
            }
            rounds.push(
                json!({"round": round, "variant": variant.label(), "transactions": count,
                               "seconds": secs, "per_s": count as f64 / secs,
                               "notifying_transactions": notifying,
                               "undispatched_at_end": backlog, "checkpoints": checkpoints,
                               "statements": statements}),
            );
        }
    }
    until_dispatcher_idle(&pool, &mut worker, Duration::from_secs(60)).await?;
    worker.stop().await;
    let (outbox_rows, dispatched): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(dispatched_at) FROM fhir_outbox.outbox")
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    env.drop_db("bench_capture").await?;
    if outbox_rows as u64 != captured_writes || dispatched != outbox_rows {
        return Err(other(format!(
            "capture check failed: {captured_writes} captured writes, {outbox_rows} outbox rows, {dispatched} dispatched"
        )));
    }
    let rate = |variant: Variant| {
        let total = totals[variant as usize];
        total.transactions as f64 / total.seconds
    };
    let without_rate = rate(Variant::Without);
    let cost = |variant: Variant| 100.0 * (1.0 - rate(variant) / without_rate);
    let with = totals[Variant::With as usize];
    let s = Scenario::Capture;
    let writers = sizes.capture_writers;
    let figures = &mut results.figures;
    figures.push(Figure::new(
        s,
        "capture.without.tx_per_s",
        format!(
            "writes without capture ({writers} writers; create+update of 1 KiB Patients; dispatcher running)"
        ),
        without_rate,
        "tx/s",
    ));
    figures.push(Figure::new(
        s,
        "capture.with.tx_per_s",
        format!("writes with capture ({writers} writers; dispatcher running)"),
        rate(Variant::With),
        "tx/s",
    ));
    figures.push(
        Figure::new(
            s,
            "capture.cost_pct",
            "capture cost (throughput lost)",
            cost(Variant::With),
            "%",
        )
        .target(Target::AtMost(25.0)),
    );
    figures.push(Figure::new(
        s,
        "capture.with.notifying_pct",
        "diagnosis: write transactions with capture that notified",
        100.0 * with.notifying as f64 / (with.transactions.max(1)) as f64,
        "%",
    ));
    figures.push(Figure::new(
        s,
        "capture.notify_every_write.tx_per_s",
        "diagnosis: writes with a pg_notify in every write (before migration 7)",
        rate(Variant::NotifyEveryWrite),
        "tx/s",
    ));
    figures.push(Figure::new(
        s,
        "capture.notify_every_write.cost_pct",
        "diagnosis: capture cost with a pg_notify in every write",
        cost(Variant::NotifyEveryWrite),
        "%",
    ));
    figures.push(Figure::new(
        s,
        "capture.never_notify.tx_per_s",
        "diagnosis: writes with the outbox row that never notify",
        rate(Variant::NeverNotify),
        "tx/s",
    ));
    figures.push(Figure::new(
        s,
        "capture.never_notify.cost_pct",
        "diagnosis: cost of the outbox row and its dispatch, without notifications",
        cost(Variant::NeverNotify),
        "%",
    ));
    for (variant, total) in Variant::ALL.iter().zip(totals) {
        results.cpu.push(CpuProfile {
            run: format!(
                "capture, {} ({writers} writers in the bench process; worker: the dispatcher)",
                variant.label()
            ),
            wall_s: total.seconds,
            postgres_s: total.postgres_s,
            worker_s: total.worker_s,
            bench_s: total.bench_s,
        });
    }
    results.details.insert(
        "capture".into(),
        json!({"rounds": rounds, "outbox_rows": outbox_rows, "dispatched": dispatched}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dispatch

async fn dispatch(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let mut details = Vec::new();
    // A criteria of the type alone reads nothing of the resources; one with a search parameter
    // makes the dispatcher read and decode every change's versions (the bench's Patients are all
    // active, so both match every change).
    for (subscriptions, criteria, key) in [
        (1usize, "Patient", "subs1"),
        (20, "Patient", "subs20"),
        (1, "Patient?active=true", "subs1_reading"),
    ] {
        let name = format!("bench_dispatch_{key}");
        let url = env.create_db(&name).await?;
        let pool = fixtures::connect(&url, 8).await?;
        let project =
            fixtures::project_with_criteria(&pool, &env.receiver.url, subscriptions, criteria)
                .await?;
        let prefill = fixtures::prefill(&pool, project, sizes.dispatch_rows, 4).await?;
        sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
        if env.statements {
            sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(&pool)
                .await?;
        }
        let (pg0, own0) = (env.postgres_cpu(), env.own_cpu());
        let (changes, deliveries, time) = fixtures::dispatch_all(&pool).await?;
        let (pg1, own1) = (env.postgres_cpu(), env.own_cpu());
        let statements = match env.statements {
            true => json!(
                top_statements(&pool, &format!("dispatch, {subscriptions} × {criteria}")).await?
            ),
            false => Value::Null,
        };
        pool.close().await;
        env.drop_db(&name).await?;
        let expected = sizes.dispatch_rows * subscriptions as u64;
        if changes != sizes.dispatch_rows || deliveries != expected {
            return Err(other(format!(
                "dispatch check failed: {changes} changes and {deliveries} deliveries, expected {} and {expected}",
                sizes.dispatch_rows
            )));
        }
        let secs = time.as_secs_f64();
        let s = Scenario::Dispatch;
        let rows = sizes.dispatch_rows;
        results.figures.push(Figure::new(
            s,
            format!("dispatch.{key}.rows_per_s"),
            format!(
                "dispatch, {subscriptions} matching subscription(s), criteria {criteria}: outbox rows ({rows})"
            ),
            changes as f64 / secs,
            "rows/s",
        ));
        results.figures.push(Figure::new(
            s,
            format!("dispatch.{key}.deliveries_per_s"),
            format!(
                "dispatch, {subscriptions} matching subscription(s), criteria {criteria}: delivery rows"
            ),
            deliveries as f64 / secs,
            "rows/s",
        ));
        results.cpu.push(CpuProfile {
            run: format!(
                "dispatch, {subscriptions} × {criteria}, {rows} rows (dispatcher in the bench process: worker column)"
            ),
            wall_s: secs,
            postgres_s: pg1 - pg0,
            worker_s: own1 - own0,
            bench_s: 0.0,
        });
        details.push(
            json!({"subscriptions": subscriptions, "criteria": criteria, "changes": changes,
            "deliveries": deliveries, "seconds": secs, "prefill_seconds": prefill.as_secs_f64(),
            "statements": statements}),
        );
    }
    results.details.insert("dispatch".into(), json!(details));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// End to end

/// Deliveries not finished yet (pending or in flight).
pub(super) async fn open_deliveries(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM fhir_outbox.delivery WHERE state IN ('pending', 'in_flight')",
    )
    .fetch_one(pool)
    .await?)
}

/// Waits until the receiver has `count` requests and no delivery is open, or `deadline`; whether
/// it was reached in time. Fails when the worker dies.
pub(super) async fn delivered_by(
    env: &Env,
    worker: &mut WorkerProcess,
    pool: &PgPool,
    count: u64,
    deadline: Instant,
) -> Result<bool, BenchError> {
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        worker.check_alive()?;
        if env.receiver.count() >= count && open_deliveries(pool).await? == 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// The statements of this database that took the most execution time since the last reset
/// (pg_stat_statements, `--statements`), printed to standard error and returned for the report.
pub(super) async fn top_statements(pool: &PgPool, run: &str) -> Result<Vec<Value>, BenchError> {
    let rows: Vec<(String, i64, f64, f64, i64, f64)> = sqlx::query_as(
        "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time, total_plan_time, rows,
                max_exec_time
         FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY total_exec_time + total_plan_time DESC LIMIT 30",
    )
    .fetch_all(pool)
    .await?;
    eprintln!("bench: top statements by execution time, {run}:");
    eprintln!("bench:  exec ms  plan ms   max ms     calls        rows  statement");
    Ok(rows
        .into_iter()
        .map(|(query, calls, total_ms, plan_ms, rows, max_ms)| {
            let shown: String = query.chars().take(100).collect();
            eprintln!(
                "bench: {total_ms:>8.0} {plan_ms:>8.0} {max_ms:>8.1} {calls:>9} {rows:>11}  {shown}"
            );
            json!({ "query": query, "calls": calls, "total_ms": total_ms, "plan_ms": plan_ms,
                    "rows": rows, "max_ms": max_ms })
        })
        .collect())
}

/// Transactions committed in the current database so far (pg_stat_database).
async fn database_commits(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

async fn end_to_end(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let mut details = Vec::new();
    let largest = sizes.backlogs.iter().copied().max().unwrap_or(0);
    let smallest = sizes.backlogs.iter().copied().min().unwrap_or(0);
    let mut peak_rss: Option<f64> = None;
    for &backlog in &sizes.backlogs {
        let template = format!("bench_backlog_{backlog}");
        let url = env.create_db(&template).await?;
        let pool = fixtures::connect(&url, 8).await?;
        let project = fixtures::project_with_subscriptions(&pool, &env.receiver.url, 1).await?;
        eprintln!("bench: e2e: writing and dispatching a backlog of {backlog}…");
        let prefill = fixtures::prefill(&pool, project, backlog, 4).await?;
        let (_, deliveries, dispatch_time) = fixtures::dispatch_all(&pool).await?;
        if deliveries != backlog {
            return Err(other(format!(
                "backlog check failed: {deliveries} deliveries for {backlog} writes"
            )));
        }
        sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
        pool.close().await;
        env.seal(&template).await?;
        // One receiver is one endpoint: its allowance is lifted, so that these figures measure the
        // pipeline with `concurrency` requests in flight (an allowance counts deliveries from
        // claim until recorded, so one equal to the concurrency would bind first; the
        // per-endpoint limit has its own scenarios, noisy and slow). One more run, at concurrency
        // 10 with the default limit, shows what one receiver gets from a default configuration.
        let mut runs: Vec<(usize, bool)> = sizes.concurrencies.iter().map(|&c| (c, true)).collect();
        if backlog == smallest {
            runs.push((10, false));
        }
        for (concurrency, lifted) in runs {
            let run_name = match lifted {
                true => format!("backlog {backlog}, concurrency {concurrency}"),
                false => {
                    format!("backlog {backlog}, concurrency {concurrency}, default endpoint limit")
                }
            };
            eprintln!("bench: e2e: {run_name}…");
            let run_db = "bench_e2e_run";
            let run_url = env.copy_db(&template, run_db).await?;
            let pool = fixtures::connect(&run_url, 2).await?;
            let commits0 = database_commits(&pool).await?;
            if env.statements {
                sqlx::query("SELECT pg_stat_statements_reset()")
                    .execute(&pool)
                    .await?;
            }
            env.receiver.reset();
            let (pg0, own0) = (env.postgres_cpu(), env.own_cpu());
            let started = Instant::now();
            let lift: &[&str] = match lifted {
                true => &["--endpoint-concurrency", "10000"],
                false => &[],
            };
            let mut worker = WorkerProcess::start_with(env, &run_url, concurrency, lift).await?;
            let deadline = started + Duration::from_secs(sizes.e2e_max_seconds);
            let cut_short = !delivered_by(env, &mut worker, &pool, backlog, deadline).await?;
            let done = Instant::now();
            let rss = worker.peak_rss_mib();
            let worker_cpu = worker.cpu(env.ticks);
            let (pg1, own1) = (env.postgres_cpu(), env.own_cpu());
            worker.stop().await;
            // Commits of the run's database (the worker's; the bench's own polling adds a few).
            // Statistics are flushed when sessions end or go idle: wait for that.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let commits = database_commits(&pool).await? - commits0;
            let statements = match env.statements {
                true => top_statements(&pool, &run_name).await?,
                false => Vec::new(),
            };
            let states: Vec<(String, i64)> = sqlx::query_as(
                "SELECT state, count(*) FROM fhir_outbox.delivery GROUP BY state ORDER BY state",
            )
            .fetch_all(&pool)
            .await?;
            let audit_events: i64 =
                sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.audit_event")
                    .fetch_one(&pool)
                    .await?;
            pool.close().await;
            env.drop_db(run_db).await?;
            let succeeded = states
                .iter()
                .find(|(state, _)| state == "succeeded")
                .map_or(0, |(_, n)| *n);
            let received = env.receiver.count();
            let first = env.receiver.first_arrival().unwrap_or(started);
            let secs = done.duration_since(first).as_secs_f64();
            let rate = succeeded as f64 / secs;
            let (key, label) = match lifted {
                true => (
                    format!("e2e.backlog{backlog}.c{concurrency}.deliveries_per_s"),
                    format!("end to end, {run_name}"),
                ),
                false => (
                    format!("e2e.backlog{backlog}.c{concurrency}.default_limit.deliveries_per_s"),
                    format!("diagnosis: end to end, {run_name} (one receiver)"),
                ),
            };
            let mut figure = Figure::new(Scenario::E2e, key, label, rate, "deliveries/s");
            if lifted {
                figure = figure.target(Target::AtLeast(10_000.0));
            }
            if cut_short {
                figure = figure.note(format!(
                    "cut short after {} s: {succeeded} of {backlog} succeeded",
                    sizes.e2e_max_seconds
                ));
            } else if succeeded as u64 != backlog {
                figure = figure.note(format!("only {succeeded} of {backlog} succeeded"));
            }
            results.figures.push(figure);
            results.cpu.push(CpuProfile {
                run: format!("e2e, {run_name}"),
                wall_s: done.duration_since(started).as_secs_f64(),
                postgres_s: pg1 - pg0,
                worker_s: worker_cpu,
                bench_s: own1 - own0,
            });
            if backlog == largest {
                peak_rss = match (peak_rss, rss) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            details.push(json!({
                "backlog": backlog, "concurrency": concurrency, "endpoint_limit_lifted": lifted,
                "states": states
                    .iter().map(|(s, n)| (s.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "received": received, "audit_events": audit_events,
                "commits": commits,
                "commits_per_delivery": commits as f64 / (succeeded.max(1) as f64), "seconds_from_first_request": secs,
                "seconds_from_spawn": done.duration_since(started).as_secs_f64(),
                "cut_short": cut_short, "worker_peak_rss_mib": rss, "top_statements": statements,
                "prefill_seconds": prefill.as_secs_f64(),
                "dispatch_seconds": dispatch_time.as_secs_f64(),
            }));
        }
        env.drop_db(&template).await?;
    }
    if let Some(rss) = peak_rss {
        let mut figure = Figure::new(
            Scenario::E2e,
            "worker.peak_rss_mib",
            format!("worker peak RSS (`fhir-outbox run` child, VmHWM), backlog {largest}"),
            rss,
            "MiB",
        )
        .target(Target::AtMost(64.0));
        if largest < 100_000 {
            figure = figure.note(format!("backlog {largest}, not the 100k of the target"));
        }
        results.figures.push(figure);
    }
    results.details.insert("e2e".into(), json!(details));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Latency

/// Commit-to-arrival times of recorded requests whose body is a resource written by the bench
/// (`commits`: when each one's COMMIT returned, by id), in ms and sorted, and how many arrived
/// before their COMMIT returned.
pub(super) fn commit_to_arrival_ms(
    commits: &HashMap<String, Instant>,
    recorded: &[(Instant, Vec<u8>)],
) -> (Vec<f64>, u64) {
    let mut latencies = Vec::with_capacity(recorded.len());
    let mut before_commit_returned = 0u64;
    for (arrived, body) in recorded {
        let Ok(resource) = serde_json::from_slice::<Value>(body) else {
            continue;
        };
        let Some(committed) = resource["id"].as_str().and_then(|id| commits.get(id)) else {
            continue;
        };
        // A delivery can arrive before the writer has seen its COMMIT acknowledged (the change is
        // visible to the dispatcher first): that counts as 0 ms, and is counted.
        if arrived < committed {
            before_commit_returned += 1;
        }
        latencies.push(arrived.saturating_duration_since(*committed).as_secs_f64() * 1000.0);
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    (latencies, before_commit_returned)
}

/// The `p`th percentile (nearest rank) of sorted values; NaN when there are none.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One of the slowest writes of the latency run, with where its time went: stages between the
/// server's timestamps (one clock), and the total from the bench's clock.
#[derive(Debug, serde::Serialize)]
struct SlowWrite {
    /// Seconds after the run started that the write's COMMIT returned.
    at_s: f64,
    /// Commit-to-arrival, as the latency figures measure it.
    total_ms: f64,
    write_to_dispatch_start_ms: f64,
    dispatch_start_to_match_ms: f64,
    match_to_request_ms: f64,
}

/// The slowest `percent` % of the writes by commit-to-arrival (at least one when any arrived),
/// slowest first, each with its stages from `per_write` (resource id, then the three stages in ms).
fn slowest_writes(
    commits: &HashMap<String, Instant>,
    recorded: &[(Instant, Vec<u8>)],
    per_write: &[(String, f64, f64, f64)],
    started: Instant,
    percent: f64,
) -> Vec<SlowWrite> {
    let stages: HashMap<&str, (f64, f64, f64)> = per_write
        .iter()
        .map(|(id, a, b, c)| (id.as_str(), (*a, *b, *c)))
        .collect();
    let mut writes: Vec<SlowWrite> = recorded
        .iter()
        .filter_map(|(arrived, body)| {
            let resource = serde_json::from_slice::<Value>(body).ok()?;
            let id = resource["id"].as_str()?;
            let committed = commits.get(id)?;
            let (a, b, c) = stages.get(id).copied()?;
            Some(SlowWrite {
                at_s: committed.saturating_duration_since(started).as_secs_f64(),
                total_ms: arrived.saturating_duration_since(*committed).as_secs_f64() * 1000.0,
                write_to_dispatch_start_ms: a,
                dispatch_start_to_match_ms: b,
                match_to_request_ms: c,
            })
        })
        .collect();
    writes.sort_by(|x, y| y.total_ms.total_cmp(&x.total_ms));
    let keep = ((writes.len() as f64 * percent / 100.0).ceil() as usize).min(writes.len());
    writes.truncate(keep);
    writes
}

async fn latency(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let name = "bench_latency";
    let url = env.create_db(name).await?;
    let pool = fixtures::connect(&url, 24).await?;
    let project = fixtures::project_with_subscriptions(&pool, &env.receiver.url, 1).await?;
    // A database in use, not a new one: ten times the measured writes already written,
    // dispatched, delivered, vacuumed and analysed (as autovacuum keeps it). In a new database the worker's statistics check
    // (`operations::statistics`) analyses the tables as they first grow, and every connection
    // then plans its statements again: a one-time stall of tens of milliseconds on two cores,
    // which a run in use only sees at the rarer statistics changes.
    let history = 10 * sizes.latency_rate * sizes.latency_seconds;
    fixtures::prefill(&pool, project, history, 4).await?;
    fixtures::dispatch_all(&pool).await?;
    env.receiver.reset();
    let mut worker = WorkerProcess::start(env, &url, 10).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    if !delivered_by(env, &mut worker, &pool, history, deadline).await? {
        return Err(other("the history was not delivered within 60 s"));
    }
    sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
    // Then a second of writes at the measured rate, so that the writers' connections are open
    // and have planned the write functions (each new connection plans them once: on two cores,
    // a burst of that at the start delayed every process by tens of milliseconds), and every
    // connection has planned its statements since the statistics changed.
    let warm_up = sizes.latency_rate;
    fixtures::steady_writes(&pool, project, sizes.latency_rate, 1, 1_000_000).await?;
    if !delivered_by(env, &mut worker, &pool, history + warm_up, deadline).await? {
        return Err(other("the warm-up writes were not delivered within 60 s"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.receiver.reset();
    env.receiver.set_recording(true);
    if env.statements {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await?;
    }
    let total = sizes.latency_rate * sizes.latency_seconds;
    let (pg0, own0, worker0) = (env.postgres_cpu(), env.own_cpu(), worker.cpu(env.ticks));
    let started = Instant::now();
    let (commits, write_secs) =
        fixtures::steady_writes(&pool, project, sizes.latency_rate, sizes.latency_seconds, 1)
            .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.receiver.count() < total && Instant::now() < deadline {
        worker.check_alive()?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let (pg1, own1, worker1) = (env.postgres_cpu(), env.own_cpu(), worker.cpu(env.ticks));
    env.receiver.set_recording(false);
    let rss = worker.peak_rss_mib();
    worker.stop().await;
    let statements = match env.statements {
        true => json!(top_statements(&pool, "latency").await?),
        false => Value::Null,
    };
    // Where the time goes, from the rows (server clocks), per write: write (clock_timestamp
    // inside the writing transaction, before its commit) to the start of the dispatcher's
    // transaction (the outbox row's `dispatched_at`: the writer's commit and the wake-up), that
    // start to match (the dispatcher's reads and evaluation), and match to the start of the HTTP
    // attempt. The stages' percentiles and the slowest writes both come from these rows.
    let per_write: Vec<(String, f64, f64, f64)> = sqlx::query_as(
        "SELECT d.resource_id,
                extract(epoch FROM o.dispatched_at - d.changed_at)::float8 * 1000,
                extract(epoch FROM d.matched_at - o.dispatched_at)::float8 * 1000,
                extract(epoch FROM a.started_at - d.matched_at)::float8 * 1000
         FROM fhir_outbox.delivery d JOIN fhir_outbox.delivery_attempt a ON a.delivery_id = d.id
         JOIN fhir_outbox.outbox o ON o.seq = d.outbox_seq
         WHERE d.changed_at >= now() - make_interval(secs => $1)",
    )
    .bind(wall)
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    env.drop_db(name).await?;
    let recorded = env.receiver.take_recorded();
    let (latencies, before_commit_returned) = commit_to_arrival_ms(&commits, &recorded);
    let tail = slowest_writes(&commits, &recorded, &per_write, started, 1.0);
    let stage_ms = |stage: fn(&(String, f64, f64, f64)) -> f64, p: f64| {
        let mut values: Vec<f64> = per_write.iter().map(stage).collect();
        values.sort_by(f64::total_cmp);
        percentile(&values, p)
    };
    let s = Scenario::Latency;
    let rate = sizes.latency_rate;
    let note = (latencies.len() as u64 != total).then(|| {
        format!(
            "{} of {total} writes delivered and matched",
            latencies.len()
        )
    });
    let mut figures = vec![
        Figure::new(
            s,
            "latency.write_rate",
            format!("latency run: writes/s achieved (asked {rate})"),
            total as f64 / write_secs,
            "writes/s",
        ),
        Figure::new(
            s,
            "latency.p50_ms",
            format!("commit-to-delivery p50 at {rate} writes/s"),
            percentile(&latencies, 50.0),
            "ms",
        )
        .target(Target::AtMost(5.0)),
        Figure::new(
            s,
            "latency.p95_ms",
            format!("commit-to-delivery p95 at {rate} writes/s"),
            percentile(&latencies, 95.0),
            "ms",
        ),
        Figure::new(
            s,
            "latency.p99_ms",
            format!("commit-to-delivery p99 at {rate} writes/s"),
            percentile(&latencies, 99.0),
            "ms",
        )
        .target(Target::AtMost(25.0)),
    ];
    if let Some(note) = note {
        for figure in &mut figures[1..] {
            figure.note = Some(note.clone());
        }
    }
    let stage = |key: &str, label: &str, value: f64| Figure::new(s, key, label, value, "ms");
    figures.push(stage(
        "latency.write_to_match_p50_ms",
        "diagnosis: write to dispatch match, p50 (server clock)",
        stage_ms(|w| w.1 + w.2, 50.0),
    ));
    figures.push(stage(
        "latency.write_to_match_p99_ms",
        "diagnosis: write to dispatch match, p99",
        stage_ms(|w| w.1 + w.2, 99.0),
    ));
    figures.push(stage(
        "latency.write_to_dispatch_start_p50_ms",
        "diagnosis: … of which write to the dispatcher's transaction start, p50",
        stage_ms(|w| w.1, 50.0),
    ));
    figures.push(stage(
        "latency.dispatch_start_to_match_p50_ms",
        "diagnosis: … and the dispatcher's transaction start to match, p50",
        stage_ms(|w| w.2, 50.0),
    ));
    figures.push(stage(
        "latency.match_to_request_p50_ms",
        "diagnosis: dispatch match to request start, p50",
        stage_ms(|w| w.3, 50.0),
    ));
    figures.push(stage(
        "latency.match_to_request_p99_ms",
        "diagnosis: dispatch match to request start, p99",
        stage_ms(|w| w.3, 99.0),
    ));
    let mean =
        |part: fn(&SlowWrite) -> f64| tail.iter().map(part).sum::<f64>() / tail.len().max(1) as f64;
    let slowest = format!("the slowest 1 % ({} writes)", tail.len());
    figures.push(stage(
        "latency.slowest.write_to_dispatch_start_ms",
        &format!("diagnosis: {slowest}, mean: write to the dispatcher's transaction start"),
        mean(|w| w.write_to_dispatch_start_ms),
    ));
    figures.push(stage(
        "latency.slowest.dispatch_start_to_match_ms",
        &format!("diagnosis: {slowest}, mean: the dispatcher's transaction start to match"),
        mean(|w| w.dispatch_start_to_match_ms),
    ));
    figures.push(stage(
        "latency.slowest.match_to_request_ms",
        &format!("diagnosis: {slowest}, mean: match to request start"),
        mean(|w| w.match_to_request_ms),
    ));
    figures.push(stage(
        "latency.slowest.rest_ms",
        &format!(
            "diagnosis: {slowest}, mean: the rest (the request's way to the receiver, less the writer's commit)"
        ),
        mean(|w| w.total_ms - w.write_to_dispatch_start_ms - w.dispatch_start_to_match_ms - w.match_to_request_ms),
    ));
    let windows: std::collections::BTreeSet<u64> =
        tail.iter().map(|w| (w.at_s * 10.0) as u64).collect();
    figures.push(Figure::new(
        s,
        "latency.slowest.windows",
        format!(
            "diagnosis: {slowest}: the distinct 100 ms windows of the run they were written in"
        ),
        windows.len() as f64,
        "windows",
    ));
    results.figures.extend(figures);
    results.cpu.push(CpuProfile {
        run: format!(
            "latency, {rate} writes/s for {} s (writer in the bench process)",
            sizes.latency_seconds
        ),
        wall_s: wall,
        postgres_s: pg1 - pg0,
        worker_s: worker1 - worker0,
        bench_s: own1 - own0,
    });
    results.details.insert(
        "latency".into(),
        json!({"writes": total, "delivered": recorded.len(), "matched": latencies.len(),
               "arrived_before_commit_returned": before_commit_returned,
               "max_ms": latencies.last(), "worker_peak_rss_mib": rss, "statements": statements,
               "slowest": tail}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Claim rate

/// Inserts delivery rows `from..=to` for 100 subscriptions of one project: `pending` ones as dispatch
/// writes them (into the hot table), or `succeeded` ones as a success leaves them (in history).
async fn insert_deliveries(
    pool: &PgPool,
    state: &str,
    from: u64,
    to: u64,
) -> Result<(), BenchError> {
    let table = match state {
        "pending" => "unfinished_delivery",
        _ => "finished_delivery",
    };
    let finished = if state == "pending" {
        ""
    } else {
        ", finished_at"
    };
    sqlx::query(&format!(
        "INSERT INTO fhir_outbox.{table}
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type, resource_id,
              version_id, interaction, changed_at, request_id, trace_id, matched_at, state, attempts,
              next_attempt_at, last_status, claims{finished})
         SELECT p, 'bench-subscription-' || g % 100, g, p, 'Patient', 'p' || g, 1, 'create', now(), 'bench',
                gen_random_uuid()::text, now(), $1,
                CASE WHEN $1 = 'succeeded' THEN 1 ELSE 0 END,
                now() - interval '1 hour' + g * interval '1 microsecond',
                CASE WHEN $1 = 'succeeded' THEN 200 END,
                CASE WHEN $1 = 'succeeded' THEN 1 ELSE 0 END
                {}
         FROM (SELECT gen_random_uuid() AS p) project, generate_series($2::bigint, $3::bigint) g",
        if state == "pending" { "" } else { ", now()" }
    ))
    .bind(state)
    .bind(from as i64)
    .bind(to as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims (a default claim batch at a time) and completes (one statement per batch, as the worker
/// records) `rows` deliveries from 4 concurrent loops; returns (rows per second, mean milliseconds
/// per claim statement).
async fn claim_loop(pool: &PgPool, rows: u64) -> Result<(f64, f64), BenchError> {
    let claimed = Arc::new(AtomicU64::new(0));
    let claim_micros = Arc::new(AtomicU64::new(0));
    let claims = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (pool, claimed, claim_micros, claims) = (
            pool.clone(),
            claimed.clone(),
            claim_micros.clone(),
            claims.clone(),
        );
        tasks.spawn(async move {
            while claimed.load(Ordering::Relaxed) < rows {
                let clock = Instant::now();
                let mut conn = pool.acquire().await?;
                // The worker's own claim and completion statements (`delivery::lease`).
                let batch = lease::lease_due(
                    &mut conn,
                    DeliveryConfig::default().claim_batch as i64,
                    Duration::from_secs(30),
                    DeliveryConfig::default().endpoint_allowance,
                )
                .await?;
                claim_micros.fetch_add(clock.elapsed().as_micros() as u64, Ordering::Relaxed);
                claims.fetch_add(1, Ordering::Relaxed);
                if batch.is_empty() {
                    break;
                }
                lease::complete_succeeded(&mut conn, &batch, 200).await?;
                claimed.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(other)??;
    }
    let secs = start.elapsed().as_secs_f64();
    let total = claimed.load(Ordering::Relaxed);
    let mean_ms = claim_micros.load(Ordering::Relaxed) as f64
        / 1000.0
        / claims.load(Ordering::Relaxed).max(1) as f64;
    Ok((total as f64 / secs, mean_ms))
}

async fn claim(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let variants = [
        ("bench_claim_small", 0, sizes.claim_pending),
        ("bench_claim_big", sizes.claim_finished, sizes.claim_pending),
    ];
    let mut pools = Vec::new();
    let mut table_bytes = Vec::new();
    for (name, finished, pending) in variants {
        let url = env.create_db(name).await?;
        let pool = fixtures::connect(&url, 6).await?;
        eprintln!("bench: claim: {finished} finished and {pending} pending rows…");
        if finished > 0 {
            insert_deliveries(&pool, "succeeded", 1, finished).await?;
        }
        insert_deliveries(&pool, "pending", finished + 1, finished + pending).await?;
        sqlx::query(
            "VACUUM ANALYZE fhir_outbox.unfinished_delivery, fhir_outbox.finished_delivery",
        )
        .execute(&pool)
        .await?;
        // The history's size, summed over its partitions, with the hot table's.
        let size: i64 = sqlx::query_scalar(
            "SELECT (SELECT sum(pg_total_relation_size(relid))::int8
                     FROM pg_partition_tree('fhir_outbox.finished_delivery'))
                    + pg_total_relation_size('fhir_outbox.unfinished_delivery')",
        )
        .fetch_one(&pool)
        .await?;
        table_bytes.push(size);
        pools.push(pool);
    }
    // Rounds interleaved (small, big, small, big, …), each claiming a share of the rows, so that a
    // change of background load hits both alike. Each loop starts right after a checkpoint: the
    // prefill of 10,000,000 rows leaves WAL and dirty pages whose checkpoint otherwise falls in
    // whichever loops run while it writes, and every loop then pays the same first-touch
    // full-page writes. Checkpoints that still begin during a loop are counted in the details.
    const ROUNDS: u64 = 4;
    let mut totals = [(0f64, 0f64, 0f64); 2];
    let mut loops = Vec::new();
    for round in 0..ROUNDS {
        for (index, pool) in pools.iter().enumerate() {
            sqlx::query("CHECKPOINT").execute(pool).await?;
            let checkpoints_before = fixtures::checkpoints(pool).await?;
            let (rate, mean_ms) = claim_loop(pool, sizes.claim_rows / ROUNDS).await?;
            let checkpoints = fixtures::checkpoints(pool).await? - checkpoints_before;
            let rows = (sizes.claim_rows / ROUNDS) as f64;
            totals[index].0 += rows;
            totals[index].1 += rows / rate;
            totals[index].2 += mean_ms / ROUNDS as f64;
            loops.push(
                json!({"round": round, "variant": variants[index].0, "rows_per_s": rate,
                              "mean_claim_ms": mean_ms, "checkpoints": checkpoints}),
            );
        }
    }
    for (pool, (name, _, _)) in pools.into_iter().zip(variants) {
        pool.close().await;
        env.drop_db(name).await?;
    }
    let measured: Vec<(u64, u64, f64, f64, i64)> = variants
        .iter()
        .zip(totals)
        .zip(table_bytes)
        .map(|(((_, finished, pending), (rows, secs, mean_ms)), size)| {
            (*finished, *pending, rows / secs, mean_ms, size)
        })
        .collect();
    let s = Scenario::Claim;
    let (small, big) = (measured[0], measured[1]);
    results.figures.push(Figure::new(
        s,
        "claim.small.rows_per_s",
        format!(
            "claim+complete, {} pending rows, empty history (4 loops × {}; mean claim {:.2} ms)",
            small.1,
            fhir_outbox::delivery::DeliveryConfig::default().claim_batch,
            small.3
        ),
        small.2,
        "rows/s",
    ));
    results.figures.push(Figure::new(
        s,
        "claim.big.rows_per_s",
        format!(
            "claim+complete, {} finished + {} pending rows (mean claim {:.2} ms)",
            big.0, big.1, big.3
        ),
        big.2,
        "rows/s",
    ));
    let mut ratio = Figure::new(
        s,
        "claim.big_vs_small_pct",
        "claim rate, with the history vs with none",
        100.0 * big.2 / small.2,
        "%",
    )
    .target(Target::AtLeast(95.0));
    if big.0 < 10_000_000 {
        ratio = ratio.note(format!("{} finished rows, not 10M", big.0));
    }
    results.figures.push(ratio);
    let variants_measured: Vec<Value> = measured
        .iter()
        .map(|(f, p, r, m, size)| {
            json!({"finished": f, "pending": p, "rows_per_s": r, "mean_claim_ms": m,
                   "delivery_table_bytes": size})
        })
        .collect();
    results.details.insert(
        "claim".into(),
        json!({"variants": variants_measured, "loops": loops}),
    );
    Ok(())
}
