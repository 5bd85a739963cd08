//! The endpoint isolation scenarios: a noisy neighbour (healthy endpoints of a project beside
//! endpoints of the same project that hang or answer `500`, against a run with only the healthy
//! ones) and slow receivers (one worker process, every receiver taking 100 ms to answer).
//!
//! Every endpoint is a loopback receiver of this process on a port of its own: the worker keys an
//! endpoint by scheme, host and port, so each has its own in-flight allowance and circuit. The
//! backlog is written and dispatched before the worker starts (those phases are timed on their
//! own), so that the delivery figures are the worker's alone.

use super::fixtures::{self, Env, WorkerProcess};
use super::receiver::{Behaviour, Receiver};
use super::scenarios::{
    Results, commit_to_arrival_ms, open_deliveries, other, percentile, top_statements,
};
use super::{BenchError, CpuProfile, Figure, Scenario, Sizes, Target};
use fhir_outbox::delivery::DeliveryConfig;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Healthy endpoints of the noisy-neighbour scenario.
const HEALTHY_ENDPOINTS: usize = 80;
/// Endpoints that accept the connection and never answer.
const HANGING_ENDPOINTS: usize = 10;
/// Endpoints that answer `500`.
const FAILING_ENDPOINTS: usize = 10;
/// How a healthy noisy-neighbour endpoint answers: `200` after 50 to 200 ms.
const HEALTHY_DELAY: Behaviour = Behaviour::Delay {
    min_ms: 50,
    max_ms: 200,
};
/// Endpoints of the slow-receivers scenario, one subscription each.
const SLOW_ENDPOINTS: usize = 20;
/// How a slow receiver answers: `200` after 100 ms.
const SLOW_DELAY: Behaviour = Behaviour::Delay {
    min_ms: 100,
    max_ms: 100,
};
/// The worker's shutdown grace in the noisy-neighbour runs. With the default (30 s) the requests
/// hanging at the end would hold every run that long; what the grace does to them (they are
/// released) is the same with one second.
const SHORT_GRACE: [&str; 2] = ["--shutdown-grace-seconds", "1"];
/// How long the steady phase may wait, after its last write, for its healthy deliveries.
const STEADY_WAIT: Duration = Duration::from_secs(60);

/// The part an endpoint plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Healthy,
    Hanging,
    Failing,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Healthy => "healthy",
            Kind::Hanging => "hanging",
            Kind::Failing => "failing",
        }
    }
}

/// The receivers of one run, each with the part it plays, in the order of their subscriptions.
struct Endpoints {
    receivers: Vec<(Kind, Receiver)>,
}

impl Endpoints {
    /// Starts `count` receivers answering with `behaviour` for each `(kind, behaviour, count)`.
    async fn start(parts: &[(Kind, Behaviour, usize)]) -> Result<Endpoints, BenchError> {
        let mut receivers = Vec::new();
        for &(kind, behaviour, count) in parts {
            for _ in 0..count {
                receivers.push((kind, Receiver::start_with(behaviour).await?));
            }
        }
        Ok(Endpoints { receivers })
    }

    fn urls(&self) -> Vec<String> {
        self.receivers.iter().map(|(_, r)| r.url.clone()).collect()
    }

    fn kinds(&self) -> Vec<Kind> {
        self.receivers.iter().map(|(kind, _)| *kind).collect()
    }

    fn of(&self, kind: Kind) -> impl Iterator<Item = &Receiver> {
        self.receivers
            .iter()
            .filter(move |(k, _)| *k == kind)
            .map(|(_, receiver)| receiver)
    }

    /// Requests the receivers of `kind` received since their last reset.
    fn count(&self, kind: Kind) -> u64 {
        self.of(kind).map(Receiver::count).sum()
    }

    /// The earliest first arrival and the latest last arrival at the receivers of `kind`.
    fn arrivals(&self, kind: Kind) -> (Option<Instant>, Option<Instant>) {
        (
            self.of(kind).filter_map(Receiver::first_arrival).min(),
            self.of(kind).filter_map(Receiver::last_arrival).max(),
        )
    }

    /// The most requests one receiver of `kind` held unanswered at once, and the sum of those
    /// maxima over the receivers.
    fn max_in_flight(&self, kind: Kind) -> (u64, u64) {
        let maxima: Vec<u64> = self.of(kind).map(Receiver::max_in_flight).collect();
        (
            maxima.iter().copied().max().unwrap_or(0),
            maxima.iter().sum(),
        )
    }
}

/// CPU seconds so far of PostgreSQL, this process and the worker.
#[derive(Clone, Copy)]
struct Cpu {
    postgres: f64,
    bench: f64,
    worker: f64,
}

impl Cpu {
    fn now(env: &Env, worker: &WorkerProcess) -> Cpu {
        Cpu {
            postgres: env.postgres_cpu(),
            bench: env.own_cpu(),
            worker: worker.cpu(env.ticks),
        }
    }

    fn profile(self, end: Cpu, run: String, wall: Duration) -> CpuProfile {
        CpuProfile {
            run,
            wall_s: wall.as_secs_f64(),
            postgres_s: end.postgres - self.postgres,
            worker_s: end.worker - self.worker,
            bench_s: end.bench - self.bench,
        }
    }
}

/// Writes `changes` Patients (each matches all `subscriptions`), dispatches them in this process
/// and analyses the tables; returns (write seconds, dispatch seconds).
async fn write_backlog(
    pool: &PgPool,
    project: Uuid,
    changes: u64,
    subscriptions: usize,
) -> Result<(f64, f64), BenchError> {
    let write = fixtures::prefill(pool, project, changes, 4).await?;
    let (_, deliveries, dispatch) = fixtures::dispatch_all(pool).await?;
    let expected = changes * subscriptions as u64;
    if deliveries != expected {
        return Err(other(format!(
            "backlog check failed: {deliveries} deliveries for {changes} changes × {subscriptions} subscriptions"
        )));
    }
    // As the end-to-end scenario: the claim's plan is made on statistics of the real table.
    sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    Ok((write.as_secs_f64(), dispatch.as_secs_f64()))
}

/// With `--statements`: forgets the statistics so far (before a measured phase).
async fn reset_statements(env: &Env, pool: &PgPool) -> Result<(), BenchError> {
    if env.statements {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// With `--statements`: the statements of the phase that took the most time (printed too).
async fn phase_statements(env: &Env, pool: &PgPool, run: &str) -> Result<Value, BenchError> {
    Ok(match env.statements {
        true => json!(top_statements(pool, run).await?),
        false => Value::Null,
    })
}

/// Waits until the receivers of `kind` have received `expected` requests, checking that the worker
/// lives; returns false if `deadline` came first (the phase was cut short).
async fn until_received(
    endpoints: &Endpoints,
    kind: Kind,
    expected: u64,
    worker: &mut WorkerProcess,
    deadline: Instant,
) -> Result<bool, BenchError> {
    loop {
        worker.check_alive()?;
        if endpoints.count(kind) >= expected {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Delivery states, rows and recorded attempts per kind of endpoint, from the table.
async fn deliveries_by_kind(
    pool: &PgPool,
    subscriptions: &[String],
    kinds: &[Kind],
) -> Result<BTreeMap<&'static str, Value>, BenchError> {
    let kind_of: HashMap<&str, Kind> = subscriptions
        .iter()
        .map(String::as_str)
        .zip(kinds.iter().copied())
        .collect();
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT subscription_id, state, count(*), coalesce(sum(attempts), 0)::int8
         FROM fhir_outbox.delivery GROUP BY subscription_id, state",
    )
    .fetch_all(pool)
    .await?;
    let mut by_kind: BTreeMap<&'static str, (BTreeMap<String, i64>, i64)> = BTreeMap::new();
    for (subscription, state, count, attempts) in rows {
        let kind = kind_of
            .get(subscription.as_str())
            .map_or("unknown", |kind| kind.label());
        let entry = by_kind.entry(kind).or_default();
        *entry.0.entry(state).or_default() += count;
        entry.1 += attempts;
    }
    Ok(by_kind
        .into_iter()
        .map(|(kind, (states, attempts))| {
            (
                kind,
                json!({"states": states, "recorded_attempts": attempts}),
            )
        })
        .collect())
}

/// `fhir_outbox.endpoint_health` of the project, summed up per kind of endpoint: how many
/// endpoints are in each circuit state, the openings, and their load.
async fn health_by_kind(
    pool: &PgPool,
    project: Uuid,
    endpoints: &Endpoints,
) -> Result<BTreeMap<&'static str, Value>, BenchError> {
    // The endpoints as the worker keys them, computed by the same SQL function.
    let origins: Vec<String> = sqlx::query_scalar(
        "SELECT fhir_outbox.endpoint_origin(u) FROM unnest($1::text[]) WITH ORDINALITY t(u, i)
         ORDER BY i",
    )
    .bind(endpoints.urls())
    .fetch_all(pool)
    .await?;
    let kind_of: HashMap<String, Kind> = origins.into_iter().zip(endpoints.kinds()).collect();
    let rows: Vec<(String, String, i32, i32, i64, i64)> = sqlx::query_as(
        "SELECT endpoint, state, consecutive_failures, openings, in_flight, pending
         FROM fhir_outbox.endpoint_health WHERE project_id = $1",
    )
    .bind(project)
    .fetch_all(pool)
    .await?;
    #[derive(Default)]
    struct Summary {
        endpoints: u64,
        states: BTreeMap<String, u64>,
        openings_total: i64,
        openings_max: i32,
        consecutive_failures_max: i32,
        in_flight: i64,
        pending: i64,
    }
    let mut by_kind: BTreeMap<&'static str, Summary> = BTreeMap::new();
    for (endpoint, state, failures, openings, in_flight, pending) in rows {
        let kind = kind_of
            .get(&endpoint)
            .map_or("unknown", |kind| kind.label());
        let summary = by_kind.entry(kind).or_default();
        summary.endpoints += 1;
        *summary.states.entry(state).or_default() += 1;
        summary.openings_total += i64::from(openings);
        summary.openings_max = summary.openings_max.max(openings);
        summary.consecutive_failures_max = summary.consecutive_failures_max.max(failures);
        summary.in_flight += in_flight;
        summary.pending += pending;
    }
    Ok(by_kind
        .into_iter()
        .map(|(kind, s)| {
            (
                kind,
                json!({"endpoints": s.endpoints, "circuit_states": s.states,
                       "openings_total": s.openings_total, "openings_max": s.openings_max,
                       "consecutive_failures_max": s.consecutive_failures_max,
                       "in_flight": s.in_flight, "pending": s.pending}),
            )
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Noisy neighbour

/// What one noisy-neighbour run measured.
struct NoisyRun {
    /// Healthy deliveries per second while the backlog drained.
    healthy_per_s: f64,
    /// Why the rate is qualified (the backlog phase was cut short).
    rate_note: Option<String>,
    /// Commit-to-arrival times of the steady phase's healthy deliveries, ms, sorted.
    latencies: Vec<f64>,
    /// Why the latencies are qualified (not every healthy delivery arrived).
    latency_note: Option<String>,
}

/// One run: the 80 healthy endpoints, and with `bad` the 10 hanging and 10 failing ones too, each
/// with one subscription of one project.
///
/// Phase 1, throughput: a backlog of `noisy_changes` changes is written and dispatched, then the
/// worker starts; the rate is the healthy arrivals over the time from the first to the last of
/// them. Phase 2, latency: with the same worker still running (and whatever the bad endpoints hold
/// of it by then), `noisy_rate` changes per second for `noisy_seconds`, each its own transaction,
/// dispatched by the worker's own dispatcher as in production; the latency of a healthy delivery is
/// its arrival at the receiver minus the return of its change's COMMIT. In a backlog every change
/// waits for the whole drain, so commit-to-delivery there would only restate the rate: a steady
/// stream below capacity measures what a delivery waits for beyond its receiver's own delay.
async fn noisy_run(
    env: &Env,
    sizes: &Sizes,
    bad: bool,
    results: &mut Results,
) -> Result<NoisyRun, BenchError> {
    let label = if bad {
        "with bad endpoints"
    } else {
        "baseline"
    };
    let mut parts = vec![(Kind::Healthy, HEALTHY_DELAY, HEALTHY_ENDPOINTS)];
    if bad {
        parts.push((Kind::Hanging, Behaviour::Hang, HANGING_ENDPOINTS));
        parts.push((Kind::Failing, Behaviour::ServerError, FAILING_ENDPOINTS));
    }
    let endpoints = Endpoints::start(&parts).await?;
    let subscriptions = endpoints.receivers.len();
    let name = if bad {
        "bench_noisy_bad"
    } else {
        "bench_noisy_baseline"
    };
    let url = env.create_db(name).await?;
    let pool = fixtures::connect(&url, 16).await?;
    let (project, subscription_ids) =
        fixtures::project_with_endpoints(&pool, &endpoints.urls()).await?;
    let changes = sizes.noisy_changes;
    eprintln!(
        "bench: noisy, {label}: writing and dispatching {changes} changes × {subscriptions} subscriptions…"
    );
    let (write_s, dispatch_s) = write_backlog(&pool, project, changes, subscriptions).await?;

    // Phase 1: the backlog.
    let healthy_expected = changes * HEALTHY_ENDPOINTS as u64;
    eprintln!("bench: noisy, {label}: delivering the backlog…");
    reset_statements(env, &pool).await?;
    let started = Instant::now();
    let mut worker = WorkerProcess::start_with(
        env,
        &url,
        DeliveryConfig::default().concurrency,
        &SHORT_GRACE,
    )
    .await?;
    let cpu0 = Cpu::now(env, &worker);
    let deadline = started + Duration::from_secs(sizes.isolation_max_seconds);
    let complete = until_received(
        &endpoints,
        Kind::Healthy,
        healthy_expected,
        &mut worker,
        deadline,
    )
    .await?;
    let drained = Instant::now();
    let cpu1 = Cpu::now(env, &worker);
    let healthy_received = endpoints.count(Kind::Healthy);
    let (first, last) = endpoints.arrivals(Kind::Healthy);
    let drain = last
        .unwrap_or(drained)
        .saturating_duration_since(first.unwrap_or(started));
    let healthy_per_s = healthy_received.min(healthy_expected) as f64 / drain.as_secs_f64();
    let rate_note = (!complete).then(|| {
        format!(
            "cut short after {} s: {healthy_received} of {healthy_expected} healthy deliveries arrived",
            sizes.isolation_max_seconds
        )
    });
    results.cpu.push(cpu0.profile(
        cpu1,
        format!("noisy, {label}: backlog of {changes} changes to the last healthy arrival"),
        drained - started,
    ));
    let backlog_statements =
        phase_statements(env, &pool, &format!("noisy, {label}, backlog")).await?;
    let backlog = json!({
        "changes": changes, "subscriptions": subscriptions,
        "write_seconds": write_s, "dispatch_seconds": dispatch_s,
        "healthy_expected": healthy_expected, "healthy_received": healthy_received,
        "seconds_first_to_last_healthy_arrival": drain.as_secs_f64(),
        "seconds_from_spawn": (drained - started).as_secs_f64(), "cut_short": !complete,
        "requests_hanging": endpoints.count(Kind::Hanging),
        "requests_failing": endpoints.count(Kind::Failing),
        "healthy_max_in_flight_per_endpoint": endpoints.max_in_flight(Kind::Healthy).0,
        "healthy_max_in_flight_sum_of_endpoints": endpoints.max_in_flight(Kind::Healthy).1,
        "top_statements": backlog_statements,
    });

    // Phase 2, only after a drained backlog: the new deliveries would otherwise queue behind what
    // is left of it, and their latency would only say how much was left.
    let (latencies, latency_note, steady) = if complete {
        let run = RunOf {
            env,
            pool: &pool,
            project,
            endpoints: &endpoints,
            label,
        };
        steady_phase(&run, sizes, &mut worker, results).await?
    } else {
        let note = "not measured: the backlog phase was cut short".to_owned();
        (Vec::new(), Some(note.clone()), json!({ "skipped": note }))
    };

    // The end state while the worker still runs: circuits, and what it holds, as an operator sees
    // them.
    let health = health_by_kind(&pool, project, &endpoints).await?;
    let rss = worker.peak_rss_mib();
    worker.stop().await;
    let deliveries = deliveries_by_kind(&pool, &subscription_ids, &endpoints.kinds()).await?;
    pool.close().await;
    env.drop_db(name).await?;
    let requests = json!({
        "hanging": endpoints.count(Kind::Hanging),
        "failing": endpoints.count(Kind::Failing),
        "hanging_max_in_flight_per_endpoint": endpoints.max_in_flight(Kind::Hanging).0,
    });
    if bad {
        eprintln!(
            "bench: noisy, {label}: requests that reached the hanging endpoints: {}, the failing ones: {}; endpoint_health at the end: {}",
            endpoints.count(Kind::Hanging),
            endpoints.count(Kind::Failing),
            json!(health)
        );
    }
    results.details.insert(
        format!("noisy.{}", if bad { "bad" } else { "baseline" }),
        json!({"backlog": backlog, "steady": steady, "requests_reaching_bad_endpoints": requests,
               "endpoint_health_at_end": health, "deliveries_at_end": deliveries,
               "worker_peak_rss_mib": rss}),
    );
    Ok(NoisyRun {
        healthy_per_s,
        rate_note,
        latencies,
        latency_note,
    })
}

/// What a phase of a noisy-neighbour run works on.
#[derive(Clone, Copy)]
struct RunOf<'a> {
    env: &'a Env,
    pool: &'a PgPool,
    project: Uuid,
    endpoints: &'a Endpoints,
    /// `baseline` or `with bad endpoints`, for progress and CPU rows.
    label: &'a str,
}

/// Phase 2 of a noisy-neighbour run (see [`noisy_run`]): `noisy_rate` changes per second for
/// `noisy_seconds` with the worker running; returns the healthy deliveries' commit-to-arrival times
/// (ms, sorted), why they are qualified if they are, and the details.
async fn steady_phase(
    run: &RunOf<'_>,
    sizes: &Sizes,
    worker: &mut WorkerProcess,
    results: &mut Results,
) -> Result<(Vec<f64>, Option<String>, Value), BenchError> {
    let RunOf {
        env,
        pool,
        project,
        endpoints,
        label,
    } = *run;
    // Only the healthy receivers start afresh; the bad ones keep counting, so that their totals
    // cover the whole run.
    for receiver in endpoints.of(Kind::Healthy) {
        receiver.reset();
        receiver.set_recording(true);
    }
    let (rate, seconds) = (sizes.noisy_rate, sizes.noisy_seconds);
    let steady_expected = rate * seconds * HEALTHY_ENDPOINTS as u64;
    eprintln!("bench: noisy, {label}: {rate} changes/s for {seconds} s with the worker running…");
    reset_statements(env, pool).await?;
    let cpu2 = Cpu::now(env, worker);
    let steady_started = Instant::now();
    let (commits, steady_write_s) =
        fixtures::steady_writes(pool, project, rate, seconds, sizes.noisy_changes).await?;
    let steady_complete = until_received(
        endpoints,
        Kind::Healthy,
        steady_expected,
        worker,
        Instant::now() + STEADY_WAIT,
    )
    .await?;
    let steady_done = Instant::now();
    let cpu3 = Cpu::now(env, worker);
    let mut recorded = Vec::new();
    for receiver in endpoints.of(Kind::Healthy) {
        receiver.set_recording(false);
        recorded.extend(receiver.take_recorded());
    }
    let (latencies, before_commit_returned) = commit_to_arrival_ms(&commits, &recorded);
    let statements = phase_statements(env, pool, &format!("noisy, {label}, steady")).await?;
    results.cpu.push(cpu2.profile(
        cpu3,
        format!("noisy, {label}: {rate} changes/s for {seconds} s (writer in the bench process)"),
        steady_done - steady_started,
    ));
    let latency_note = (latencies.len() as u64 != steady_expected).then(|| {
        format!(
            "{} of {steady_expected} healthy deliveries arrived and matched",
            latencies.len()
        )
    });
    let steady = json!({
        "changes": commits.len(), "changes_per_s_achieved": commits.len() as f64 / steady_write_s,
        "healthy_expected": steady_expected, "healthy_matched": latencies.len(),
        "arrived_before_commit_returned": before_commit_returned, "cut_short": !steady_complete,
        "p50_ms": percentile(&latencies, 50.0), "p95_ms": percentile(&latencies, 95.0),
        "p99_ms": percentile(&latencies, 99.0), "max_ms": latencies.last(),
        "healthy_max_in_flight_per_endpoint": endpoints.max_in_flight(Kind::Healthy).0,
        "top_statements": statements,
    });
    Ok((latencies, latency_note, steady))
}

/// The noisy-neighbour scenario: the baseline run, the run with bad endpoints, and their ratios.
pub async fn noisy_neighbour(
    env: &Env,
    sizes: &Sizes,
    results: &mut Results,
) -> Result<(), BenchError> {
    let baseline = noisy_run(env, sizes, false, results).await?;
    let bad = noisy_run(env, sizes, true, results).await?;
    let s = Scenario::Noisy;
    let changes = sizes.noisy_changes;
    let size_note =
        (changes < 10_000).then(|| format!("{changes} changes, not the 10,000 of the issue"));
    let with_note = |figure: Figure, note: Option<String>| match note {
        Some(note) => figure.note(note),
        None => figure,
    };
    let steady = format!(
        "{} changes/s ({} healthy deliveries/s)",
        sizes.noisy_rate,
        sizes.noisy_rate * HEALTHY_ENDPOINTS as u64
    );
    let mut figures = Vec::new();
    for (key, label, run) in [
        (
            "baseline",
            format!("noisy neighbour, baseline ({HEALTHY_ENDPOINTS} healthy endpoints, 50-200 ms)"),
            &baseline,
        ),
        (
            "bad",
            format!(
                "noisy neighbour, + {HANGING_ENDPOINTS} hanging and {FAILING_ENDPOINTS} failing (500) endpoints"
            ),
            &bad,
        ),
    ] {
        figures.push(with_note(
            Figure::new(
                s,
                format!("noisy.{key}.healthy_per_s"),
                format!("{label}: healthy deliveries/s, backlog of {changes} changes"),
                run.healthy_per_s,
                "deliveries/s",
            ),
            run.rate_note.clone().or_else(|| size_note.clone()),
        ));
        for p in [50.0, 99.0] {
            figures.push(with_note(
                Figure::new(
                    s,
                    format!("noisy.{key}.p{p}_ms"),
                    format!("{label}: healthy commit-to-delivery p{p} at {steady}"),
                    percentile(&run.latencies, p),
                    "ms",
                ),
                run.latency_note.clone(),
            ));
        }
    }
    figures.push(with_note(
        Figure::new(
            s,
            "noisy.healthy_rate_pct",
            "noisy neighbour: healthy deliveries/s with bad endpoints, % of baseline",
            100.0 * bad.healthy_per_s / baseline.healthy_per_s,
            "%",
        )
        .target(Target::AtLeast(90.0)),
        bad.rate_note.or(baseline.rate_note).or(size_note),
    ));
    figures.push(with_note(
        Figure::new(
            s,
            "noisy.healthy_p99_ratio",
            "noisy neighbour: healthy p99 with bad endpoints / baseline p99",
            percentile(&bad.latencies, 99.0) / percentile(&baseline.latencies, 99.0),
            "x",
        )
        .target(Target::AtMost(2.0)),
        bad.latency_note.or(baseline.latency_note),
    ));
    results.figures.extend(figures);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Slow receivers

/// The slow-receivers scenario: 20 endpoints answering `200` after 100 ms, one subscription each, a
/// backlog of `slow_changes` changes written and dispatched first, then one worker process with the
/// default settings delivers it. Rate = succeeded deliveries / (time all are `succeeded` − first
/// arrival), as in the end-to-end scenario; and the worker's peak RSS.
pub async fn slow_receivers(
    env: &Env,
    sizes: &Sizes,
    results: &mut Results,
) -> Result<(), BenchError> {
    let endpoints = Endpoints::start(&[(Kind::Healthy, SLOW_DELAY, SLOW_ENDPOINTS)]).await?;
    let name = "bench_slow";
    let url = env.create_db(name).await?;
    let pool = fixtures::connect(&url, 4).await?;
    let (project, subscription_ids) =
        fixtures::project_with_endpoints(&pool, &endpoints.urls()).await?;
    let changes = sizes.slow_changes;
    let expected = changes * SLOW_ENDPOINTS as u64;
    eprintln!(
        "bench: slow: writing and dispatching {changes} changes × {SLOW_ENDPOINTS} subscriptions…"
    );
    let (write_s, dispatch_s) = write_backlog(&pool, project, changes, SLOW_ENDPOINTS).await?;
    eprintln!("bench: slow: delivering {expected}…");
    let concurrency = DeliveryConfig::default().concurrency;
    reset_statements(env, &pool).await?;
    let started = Instant::now();
    let mut worker = WorkerProcess::start(env, &url, concurrency).await?;
    let cpu0 = Cpu::now(env, &worker);
    let deadline = started + Duration::from_secs(sizes.isolation_max_seconds);
    let mut complete =
        until_received(&endpoints, Kind::Healthy, expected, &mut worker, deadline).await?;
    // Then until every one is recorded, as the end-to-end scenario counts a delivery.
    while complete && open_deliveries(&pool).await? > 0 {
        worker.check_alive()?;
        if Instant::now() >= deadline {
            complete = false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = Instant::now();
    let cpu1 = Cpu::now(env, &worker);
    let rss = worker.peak_rss_mib();
    worker.stop().await;
    results.cpu.push(cpu0.profile(
        cpu1,
        format!("slow receivers, {expected} deliveries to {SLOW_ENDPOINTS} endpoints answering after 100 ms"),
        done - started,
    ));
    let statements = phase_statements(env, &pool, "slow receivers").await?;
    let deliveries = deliveries_by_kind(&pool, &subscription_ids, &endpoints.kinds()).await?;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.delivery WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    env.drop_db(name).await?;
    let received = endpoints.count(Kind::Healthy);
    let (first, _) = endpoints.arrivals(Kind::Healthy);
    let secs = done
        .saturating_duration_since(first.unwrap_or(started))
        .as_secs_f64();
    let (max_per_endpoint, max_sum) = endpoints.max_in_flight(Kind::Healthy);
    let s = Scenario::Slow;
    let mut rate = Figure::new(
        s,
        "slow.deliveries_per_s",
        format!(
            "slow receivers: {SLOW_ENDPOINTS} endpoints answering after 100 ms, {expected} deliveries, one worker"
        ),
        succeeded as f64 / secs,
        "deliveries/s",
    )
    .target(Target::AtLeast(2_000.0));
    if !complete {
        rate = rate.note(format!(
            "cut short after {} s: {succeeded} of {expected} succeeded",
            sizes.isolation_max_seconds
        ));
    } else if succeeded as u64 != expected {
        rate = rate.note(format!("only {succeeded} of {expected} succeeded"));
    }
    results.figures.push(rate);
    if let Some(rss) = rss {
        results.figures.push(
            Figure::new(
                s,
                "slow.worker_peak_rss_mib",
                "slow receivers: worker peak RSS (`fhir-outbox run` child, VmHWM)",
                rss,
                "MiB",
            )
            .target(Target::AtMost(128.0)),
        );
    }
    results.details.insert(
        "slow".into(),
        json!({"changes": changes, "endpoints": SLOW_ENDPOINTS, "expected": expected,
               "received": received, "succeeded": succeeded, "deliveries_at_end": deliveries,
               "write_seconds": write_s, "dispatch_seconds": dispatch_s,
               "seconds_from_first_request": secs,
               "seconds_from_spawn": (done - started).as_secs_f64(), "cut_short": !complete,
               "delivery_concurrency": concurrency,
               "max_in_flight_per_endpoint": max_per_endpoint,
               "max_in_flight_sum_of_endpoints": max_sum,
               "worker_peak_rss_mib": rss, "top_statements": statements}),
    );
    Ok(())
}
