//! Topic-based subscriptions: what numbering events costs dispatch (against the same backlog
//! dispatched to Medplum-style criteria subscriptions, in the same run), what a worker delivers of
//! notification bundles end to end, and what the heartbeat check, run at every poll of every
//! worker, costs beside many subscriptions.

use super::fixtures::{self, Env, WorkerProcess};
use super::scenarios::{Results, delivered_by, other};
use super::{BenchError, CpuProfile, Figure, Scenario, Sizes};
use fhir_outbox::capture::{self, WriteContext};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use uuid::Uuid;

const TOPIC: &str = "http://example.org/fhir/SubscriptionTopic/patient-created";
const XVER: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

/// A topic whose every Patient create is an event (the bench's writes are Patient creates).
fn topic() -> Value {
    json!({
        "resourceType": "Basic",
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
        "modifierExtension": [{"url": format!("{XVER}status"), "valueCode": "active"}],
        "extension": [
            {"url": format!("{XVER}url"), "valueUri": TOPIC},
            {"url": format!("{XVER}resourceTrigger"), "extension": [
                {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Patient"},
                {"url": "supportedInteraction", "valueCode": "create"}
            ]}
        ]
    })
}

/// An active subscription to [`TOPIC`], `id-only`, signed as the criteria subscriptions are, with
/// a heartbeat period when given.
fn topic_subscription(endpoint: &str, heartbeat_seconds: Option<u64>) -> Value {
    let mut subscription = fixtures::subscription(endpoint);
    subscription["criteria"] = json!(TOPIC);
    subscription["meta"] = json!({"profile": [format!("{BACKPORT}backport-subscription")]});
    subscription["channel"]["_payload"] = json!({"extension": [
        {"url": format!("{BACKPORT}backport-payload-content"), "valueCode": "id-only"}
    ]});
    if let Some(seconds) = heartbeat_seconds {
        subscription["channel"]["extension"] = json!([
            {"url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": seconds}
        ]);
    }
    subscription
}

/// A project with the topic and `subscriptions` subscriptions to it; their own changes are
/// dispatched before returning, so that only what follows is measured.
async fn project_with_topic_subscriptions(
    pool: &PgPool,
    endpoint: &str,
    subscriptions: usize,
) -> Result<Uuid, BenchError> {
    let project = fhir_outbox::project::create_project(pool, "bench").await?;
    let context = WriteContext::default();
    capture::create(pool, project, &topic(), &context).await?;
    for _ in 0..subscriptions {
        capture::create(pool, project, &topic_subscription(endpoint, None), &context).await?;
    }
    fixtures::dispatch_all(pool).await?;
    Ok(project)
}

/// Every subscription's event numbers are exactly 1..=`events`.
async fn check_numbers(pool: &PgPool, subscriptions: usize, events: u64) -> Result<(), BenchError> {
    let (numbered, wrong): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE n <> events OR top <> events OR events <> $1)
         FROM (SELECT subscription_id, count(DISTINCT event_number) AS n,
                      max(event_number) AS top, count(*) AS events
               FROM fhir_outbox.delivery WHERE notification = 'event-notification'
               GROUP BY subscription_id) s",
    )
    .bind(events as i64)
    .fetch_one(pool)
    .await?;
    if numbered != subscriptions as i64 || wrong != 0 {
        return Err(other(format!(
            "event number check failed: {numbered} subscriptions numbered, {wrong} of them not 1..={events}"
        )));
    }
    Ok(())
}

/// The scenario.
pub async fn run(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    dispatch(env, sizes, results).await?;
    end_to_end(env, sizes, results).await?;
    heartbeat_check(env, sizes, results).await
}

async fn dispatch(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let rows = sizes.dispatch_rows;
    let mut details = Vec::new();
    for subscriptions in [1usize, 20] {
        let mut rates = Vec::new();
        for topics in [false, true] {
            let name = format!("bench_topics_dispatch_{subscriptions}_{topics}");
            let url = env.create_db(&name).await?;
            let pool = fixtures::connect(&url, 8).await?;
            let project = match topics {
                true => {
                    project_with_topic_subscriptions(&pool, &env.receiver.url, subscriptions)
                        .await?
                }
                false => {
                    fixtures::project_with_subscriptions(&pool, &env.receiver.url, subscriptions)
                        .await?
                }
            };
            fixtures::prefill(&pool, project, rows, 4).await?;
            sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
            let (pg0, own0) = (env.postgres_cpu(), env.own_cpu());
            let (changes, deliveries, time) = fixtures::dispatch_all(&pool).await?;
            let (pg1, own1) = (env.postgres_cpu(), env.own_cpu());
            let expected = rows * subscriptions as u64;
            if changes != rows || deliveries != expected {
                return Err(other(format!(
                    "topic dispatch check failed: {changes} changes and {deliveries} deliveries, expected {rows} and {expected}"
                )));
            }
            if topics {
                check_numbers(&pool, subscriptions, rows).await?;
            }
            pool.close().await;
            env.drop_db(&name).await?;
            let secs = time.as_secs_f64();
            let kind = if topics { "topic" } else { "criteria" };
            results.cpu.push(CpuProfile {
                run: format!(
                    "topics: dispatch, {subscriptions} {kind} subs, {rows} rows (dispatcher in the bench process: worker column)"
                ),
                wall_s: secs,
                postgres_s: pg1 - pg0,
                worker_s: own1 - own0,
                bench_s: 0.0,
            });
            details.push(json!({"subscriptions": subscriptions, "kind": kind,
                "deliveries": deliveries, "seconds": secs}));
            rates.push(deliveries as f64 / secs);
        }
        let s = Scenario::Topics;
        results.figures.push(Figure::new(
            s,
            format!("topics.dispatch.subs{subscriptions}.deliveries_per_s"),
            format!(
                "dispatch to {subscriptions} topic subscription(s), events numbered: delivery rows ({rows} changes)"
            ),
            rates[1],
            "rows/s",
        ));
        results.figures.push(Figure::new(
            s,
            format!("topics.dispatch.subs{subscriptions}.vs_criteria_pct"),
            format!(
                "the same, as a share of {subscriptions} criteria subscription(s) in this run ({:.0} rows/s)",
                rates[0]
            ),
            100.0 * rates[1] / rates[0],
            "%",
        ));
    }
    results
        .details
        .insert("topics.dispatch".into(), json!(details));
    Ok(())
}

/// One worker process delivers a dispatched backlog of events as `id-only` notification bundles,
/// and, to compare in the same run, the same backlog to a criteria subscription.
async fn end_to_end(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let backlog = sizes.backlogs.iter().copied().min().unwrap_or(0);
    let concurrency = 10;
    let mut rates = Vec::new();
    for topics in [false, true] {
        let name = "bench_topics_e2e";
        let url = env.create_db(name).await?;
        let pool = fixtures::connect(&url, 8).await?;
        let project = match topics {
            true => project_with_topic_subscriptions(&pool, &env.receiver.url, 1).await?,
            false => fixtures::project_with_subscriptions(&pool, &env.receiver.url, 1).await?,
        };
        fixtures::prefill(&pool, project, backlog, 4).await?;
        fixtures::dispatch_all(&pool).await?;
        sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
        env.receiver.reset();
        let (pg0, own0) = (env.postgres_cpu(), env.own_cpu());
        let started = Instant::now();
        let mut worker =
            WorkerProcess::start_with(env, &url, concurrency, &["--endpoint-concurrency", "10000"])
                .await?;
        let deadline = started + Duration::from_secs(sizes.e2e_max_seconds);
        let in_time = delivered_by(env, &mut worker, &pool, backlog, deadline).await?;
        let secs = started.elapsed().as_secs_f64();
        let worker_cpu = worker.cpu(env.ticks);
        let (pg1, own1) = (env.postgres_cpu(), env.own_cpu());
        worker.stop().await;
        let delivered = env.receiver.count() as f64;
        pool.close().await;
        env.drop_db(name).await?;
        let kind = if topics {
            "events as id-only notification bundles"
        } else {
            "changes to a criteria subscription"
        };
        results.cpu.push(CpuProfile {
            run: format!("topics: end to end, {backlog} {kind}, concurrency {concurrency}"),
            wall_s: secs,
            postgres_s: pg1 - pg0,
            worker_s: worker_cpu,
            bench_s: own1 - own0,
        });
        if !in_time {
            return Err(other(format!(
                "topics end to end: {delivered} of {backlog} delivered in {secs:.0} s"
            )));
        }
        rates.push(delivered / secs);
    }
    results.figures.push(Figure::new(
        Scenario::Topics,
        format!("topics.e2e.{backlog}.c{concurrency}.deliveries_per_s"),
        format!(
            "end to end, {backlog} events as id-only notification bundles, concurrency {concurrency}"
        ),
        rates[1],
        "deliveries/s",
    ));
    results.figures.push(Figure::new(
        Scenario::Topics,
        format!("topics.e2e.{backlog}.c{concurrency}.vs_criteria_pct"),
        format!(
            "the same, as a share of a criteria subscription's in this run ({:.0} deliveries/s)",
            rates[0]
        ),
        100.0 * rates[1] / rates[0],
        "%",
    ));
    Ok(())
}

/// Before migration 20261208000001, the check read every live subscription's content at every
/// call; kept here, as a diagnosis, to compare with `queue_heartbeats` as it is.
const CHECK_BEFORE: &str = "
    SELECT count(*) FROM (
        SELECT r.project_id, r.id, r.last_updated,
               (SELECT (e ->> 'valueUnsignedInt')::bigint
                FROM jsonb_array_elements(v.content #> '{channel,extension}') e
                WHERE e ->> 'url' = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period'
                  AND jsonb_typeof(e -> 'valueUnsignedInt') = 'number'
                LIMIT 1) AS period
        FROM fhir_outbox.resource r
        JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
        WHERE r.resource_type = 'Subscription' AND NOT r.deleted
          AND v.content ->> 'status' = 'active'
          AND v.content #>> '{channel,type}' = 'rest-hook'
          AND jsonb_typeof(v.content #> '{channel,extension}') = 'array') s
    LEFT JOIN fhir_outbox.subscription_event_count c
           ON c.project_id = s.project_id AND c.subscription_id = s.id
    WHERE s.period > 0
      AND greatest(c.last_notification_at, s.last_updated) <= now() - make_interval(secs => s.period)";

/// Median milliseconds of `runs` executions of `sql`.
async fn median_ms(pool: &PgPool, sql: &str, runs: usize) -> Result<f64, BenchError> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        sqlx::query(sql).execute(pool).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

async fn heartbeat_check(
    env: &Env,
    sizes: &Sizes,
    results: &mut Results,
) -> Result<(), BenchError> {
    let total = sizes.heartbeat_subscriptions;
    let with_period = (total / 100).max(1);
    let name = "bench_topics_heartbeats";
    let url = env.create_db(name).await?;
    let pool = fixtures::connect(&url, 2).await?;
    let project = fhir_outbox::project::create_project(&pool, "bench").await?;
    // Criteria subscriptions, and 1 % of topic subscriptions with an hour's period (none due):
    // what is measured is the check itself, as at nearly every poll.
    let subscriptions: Vec<Value> = (0..total)
        .map(|n| match n % 100 {
            0 => topic_subscription(&env.receiver.url, Some(3600)),
            _ => fixtures::subscription(&env.receiver.url),
        })
        .collect();
    for batch in subscriptions.chunks(1000) {
        sqlx::query("SELECT fhir_outbox.create_resources($1, $2)")
            .bind(project)
            .bind(batch)
            .execute(&pool)
            .await?;
    }
    sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
    let runs = 50;
    let now = median_ms(&pool, "SELECT fhir_outbox.queue_heartbeats()", runs).await?;
    let before = median_ms(&pool, CHECK_BEFORE, runs).await?;
    pool.close().await;
    env.drop_db(name).await?;
    let s = Scenario::Topics;
    results.figures.push(Figure::new(
        s,
        format!("topics.heartbeat_check.{total}.ms"),
        format!(
            "heartbeat check (each poll), {total} live subscriptions, {with_period} with a period: median"
        ),
        now,
        "ms",
    ));
    results.figures.push(Figure::new(
        s,
        format!("topics.heartbeat_check_before.{total}.ms"),
        "diagnosis: the same check before migration 20261208000001 (reads every subscription)",
        before,
        "ms",
    ));
    Ok(())
}
