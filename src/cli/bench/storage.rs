//! Storage scenarios: retention of a day of history, and throughput while a transaction holds the
//! xmin horizon.

use super::fixtures::{self, Env, WorkerProcess};
use super::scenarios::Results;
use super::{BenchError, Figure, Scenario, Sizes, Target};
use fhir_outbox::operations::retention::{self, Retention};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};

/// Rounds of the horizon scenario before the snapshot is taken. The before-ratio (held / control)
/// divides the figure, so its scatter is the figure's: run P's three rounds put the held database
/// 16 % ahead of its identical control with nothing held.
const ROUNDS_BEFORE: usize = 8;

async fn history_bytes(pool: &PgPool) -> Result<i64, BenchError> {
    let mut total = 0;
    for table in [
        "fhir_outbox.finished_delivery",
        "fhir_outbox.delivery_attempt",
        "fhir_outbox.audit_event",
    ] {
        total += fixtures::table_bytes(pool, table).await?;
    }
    Ok(total)
}

/// A day of history (`retention_rows` finished deliveries, as many attempts and AuditEvents, all
/// in today's partitions), then one retention pass as seen from the day after tomorrow: the time it
/// takes, and what is left.
pub async fn retention(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let name = "bench_retention";
    let url = env.create_db(name).await?;
    let pool = fixtures::connect(&url, 2).await?;
    let rows = sizes.retention_rows as i64;
    eprintln!(
        "bench: retention: writing a day of history ({rows} deliveries, attempts and AuditEvents)…"
    );
    for sql in [
        "INSERT INTO fhir_outbox.finished_delivery
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type, resource_id,
              version_id, interaction, changed_at, request_id, trace_id, matched_at, state, attempts,
              next_attempt_at, finished_at, last_status, claims)
         SELECT p, 'sub-' || g % 100, g, p, 'Patient', 'p' || g, 1, 'create', now(), 'bench',
                md5(g::text), now(), 'succeeded', 1, now(), now(), 200, 1
         FROM (SELECT gen_random_uuid() AS p) project, generate_series(1::bigint, $1) g",
        "INSERT INTO fhir_outbox.delivery_attempt
             (delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
              status, response_body, audit_event_id)
         SELECT g, gen_random_uuid(), 'sub-' || g % 100, 1, now(), 20, true, 200, 'ok',
                gen_random_uuid()::text
         FROM generate_series(1::bigint, $1) g",
        "INSERT INTO fhir_outbox.audit_event (project_id, id, recorded_at, content)
         SELECT gen_random_uuid(), fhir_outbox.uuid_v7(now())::text, now(),
                jsonb_build_object('resourceType', 'AuditEvent', 'outcome', '0',
                    'outcomeDesc', 'Attempt 1 received status 200',
                    'type', jsonb_build_object('code', 'transmit'),
                    'entity', jsonb_build_array(jsonb_build_object('what',
                        jsonb_build_object('reference', 'Patient/p' || g))))
         FROM generate_series(1::bigint, $1) g",
    ] {
        sqlx::query(sql).bind(rows).execute(&pool).await?;
    }
    // As autovacuum has by the time a day is past retention. VACUUM too, not only ANALYZE: a
    // million rows just inserted start autovacuum on a partition, and the DROP then waits for the
    // lock (`lock_timeout`, 1 s) and leaves the partition for the next pass (run S: 1.30 s, one
    // partition of three left), which says nothing of a day-old partition's retention.
    sqlx::query(
        "VACUUM ANALYZE fhir_outbox.finished_delivery, fhir_outbox.delivery_attempt,
                        fhir_outbox.audit_event",
    )
    .execute(&pool)
    .await?;
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    let before = history_bytes(&pool).await?;
    let as_of = chrono::Utc::now() + chrono::Duration::days(2);
    let keep = Retention {
        deliveries: Duration::from_secs(86_400),
        audit_events: Some(Duration::from_secs(86_400)),
    };
    let started = Instant::now();
    let pruned = retention::prune_as_of(&pool, keep, as_of).await?;
    let secs = started.elapsed().as_secs_f64();
    let after = history_bytes(&pool).await?;
    let removed = pruned.deliveries + pruned.attempts + pruned.audit_events;
    let mut figure = Figure::new(
        Scenario::Retention,
        "retention.day_seconds",
        format!(
            "retention of a day of history ({} deliveries + {} attempts + {} AuditEvents, {} partitions dropped)",
            pruned.deliveries, pruned.attempts, pruned.audit_events, pruned.partitions
        ),
        secs,
        "s",
    )
    .target(Target::AtMost(1.0));
    if sizes.retention_rows < 1_000_000 {
        figure = figure.note(format!("{} rows per table, not 1M", sizes.retention_rows));
    }
    results.figures.push(figure);
    results.figures.push(Figure::new(
        Scenario::Retention,
        "retention.history_mib_after",
        format!(
            "history on disk after it: {:.1} MiB of {:.1} MiB (nothing left to vacuum)",
            after as f64 / 1048576.0,
            before as f64 / 1048576.0
        ),
        after as f64 / 1048576.0,
        "MiB",
    ));
    results.details.insert(
        "retention".into(),
        json!({ "pruned": pruned, "rows_removed": removed, "seconds": secs,
                "history_bytes_before": before, "history_bytes_after": after }),
    );
    pool.close().await;
    env.drop_db(name).await?;
    Ok(())
}

/// Dead tuples and size (with indexes) of the hot table, over its lanes, and its lane switches.
async fn hot_table(pool: &PgPool) -> Result<(i64, i64, i64), BenchError> {
    Ok(sqlx::query_as(
        "SELECT coalesce(sum(s.n_dead_tup), 0)::int8,
                coalesce(sum(pg_total_relation_size(t.relid)), 0)::int8,
                (SELECT switches FROM fhir_outbox.delivery_lane)
         FROM pg_partition_tree('fhir_outbox.unfinished_delivery') t
         LEFT JOIN pg_stat_user_tables s ON s.relid = t.relid",
    )
    .fetch_one(pool)
    .await?)
}

/// Diagnosis of a cycle under the held horizon: where dead row versions pile up (the tables with
/// the most), and the checkpoints so far (their full-page writes slow every writer for a while).
async fn dead_versions(pool: &PgPool) -> Result<Value, BenchError> {
    let tables: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables
         WHERE schemaname = 'fhir_outbox' ORDER BY n_dead_tup DESC LIMIT 6",
    )
    .fetch_all(pool)
    .await?;
    let checkpoints = fixtures::checkpoints(pool).await?;
    let tables: serde_json::Map<String, Value> = tables
        .into_iter()
        .map(|(table, dead)| (table, dead.into()))
        .collect();
    Ok(json!({ "dead_tuples": tables, "checkpoints": checkpoints }))
}

/// What the database's sessions were doing during a cycle: `pg_stat_activity` sampled every
/// 100 ms (this database, active sessions but the sampler), counted by wait event and the
/// statement's first words, and the longest-running statement seen. It tells a slow cycle's cause
/// (a lock, I/O, CPU) from the database's own account rather than from guesses.
struct ActivitySampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<Value, sqlx::Error>>,
}

impl ActivitySampler {
    fn start(pool: &PgPool) -> ActivitySampler {
        let pool = pool.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let mut counts: std::collections::HashMap<String, u64> = Default::default();
            let mut longest = (0.0f64, String::new());
            let mut samples = 0u64;
            loop {
                let rows: Vec<(String, String, f64)> = sqlx::query_as(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'),
                            left(regexp_replace(query, '\\s+', ' ', 'g'), 70),
                            extract(epoch FROM clock_timestamp() - query_start)::float8
                     FROM pg_stat_activity
                     WHERE datname = current_database() AND state = 'active'
                       AND pid <> pg_backend_pid()",
                )
                .fetch_all(&mut *conn)
                .await?;
                samples += 1;
                for (wait, query, running) in rows {
                    if running > longest.0 {
                        longest = (running, query.clone());
                    }
                    *counts.entry(format!("{wait} | {query}")).or_default() += 1;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = &mut stopped => break,
                }
            }
            let mut counts: Vec<(String, u64)> = counts.into_iter().collect();
            counts.sort_by_key(|count| std::cmp::Reverse(count.1));
            counts.truncate(8);
            let top: serde_json::Map<String, Value> =
                counts.into_iter().map(|(k, n)| (k, n.into())).collect();
            Ok(json!({ "samples": samples, "active_sessions": top,
                        "longest_statement_seconds": longest.0, "longest_statement": longest.1 }))
        });
        ActivitySampler { stop, task }
    }

    async fn finish(self) -> Result<Value, BenchError> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(result) => Ok(result?),
            Err(error) => Err(super::scenarios::other(format!(
                "activity sampler: {error}"
            ))),
        }
    }
}

/// One cycle's timing: the rate from the first write until the last delivery succeeded, and the
/// seconds spent writing (the writers) and then draining what was left.
struct Cycle {
    rate: f64,
    write_seconds: f64,
    drain_seconds: f64,
    /// What the sessions did meanwhile ([`ActivitySampler`]).
    activity: Value,
}

/// Writes `count` changes (4 writers, 100 per transaction) while `fhir-outbox run` dispatches and
/// delivers them.
async fn cycle(
    env: &Env,
    pool: &PgPool,
    project: uuid::Uuid,
    count: u64,
    worker: &mut WorkerProcess,
) -> Result<Cycle, BenchError> {
    let started = Instant::now();
    let sampler = ActivitySampler::start(pool);
    let target = env.receiver.count() + count;
    fixtures::prefill(pool, project, count, 4).await?;
    let written = started.elapsed().as_secs_f64();
    while env.receiver.count() < target {
        tokio::time::sleep(Duration::from_millis(10)).await;
        worker.check_alive()?;
        if started.elapsed() > Duration::from_secs(600) {
            return Err(super::scenarios::other(format!(
                "a cycle of {count} changes did not drain in 600 s"
            )));
        }
    }
    let total = started.elapsed().as_secs_f64();
    Ok(Cycle {
        rate: count as f64 / total,
        write_seconds: written,
        drain_seconds: total - written,
        activity: sampler.finish().await?,
    })
}

/// One database of the horizon scenario, with its project (one subscription to the receiver) and
/// its own `fhir-outbox run`.
struct HorizonDb {
    name: &'static str,
    pool: PgPool,
    project: uuid::Uuid,
    worker: WorkerProcess,
}

impl HorizonDb {
    async fn start(env: &Env, name: &'static str) -> Result<HorizonDb, BenchError> {
        let url = env.create_db(name).await?;
        let pool = fixtures::connect(&url, 7).await?;
        let project = fixtures::project_with_subscriptions(&pool, &env.receiver.url, 1).await?;
        let worker =
            WorkerProcess::start_with(env, &url, 10, &["--endpoint-concurrency", "10000"]).await?;
        Ok(HorizonDb {
            name,
            pool,
            project,
            worker,
        })
    }

    async fn cycle(&mut self, env: &Env, count: u64) -> Result<Cycle, BenchError> {
        cycle(env, &self.pool, self.project, count, &mut self.worker).await
    }

    async fn stop(self, env: &Env) -> Result<(), BenchError> {
        self.worker.stop().await;
        self.pool.close().await;
        env.drop_db(self.name).await
    }
}

/// Deliveries per second over rounds, (held, control): changes over summed cycle durations, `count`
/// changes a cycle.
fn rates<'a>(rounds: impl IntoIterator<Item = &'a Round>, count: u64) -> (f64, f64) {
    let (mut cycles, mut held, mut control) = (0u64, 0.0, 0.0);
    for round in rounds {
        cycles += 1;
        held += round.held;
        control += round.control;
    }
    let changes = (cycles * count) as f64;
    (changes / held, changes / control)
}

/// One cycle in each database, one after the other: when it began (seconds since the snapshot was
/// taken, negative before) and how long each took.
struct Round {
    began: f64,
    held: f64,
    control: f64,
}

/// The cost of a held xmin horizon, measured against a control. Two databases in the one cluster,
/// each with its own `fhir-outbox run` (dispatch and delivery to the loopback receiver), take turns
/// at cycles of `horizon_cycle` changes written and drained (each round one cycle in each database,
/// which goes first alternating): a warm-up round, [`ROUNDS_BEFORE`] rounds before, then rounds for
/// `horizon_seconds` while a session in the first database holds a snapshot open
/// (`REPEATABLE READ`, as a long report or a forgotten `BEGIN` does: nothing dead since it began can
/// be vacuumed). PostgreSQL computes a table's horizon from the sessions of the table's own database,
/// so the control database is vacuumed as usual while running the same cycles on the same machine
/// minutes apart at most. This VM's speed moves by a third within ten minutes (a run without any
/// snapshot held measured the first database 23 % faster after ten minutes than before), so the cost
/// is the fall of the held database's rate *relative to the control's*: 1 − (held / control in the
/// second half of the held period) / (held / control before). Also the hot table's dead tuples.
pub async fn horizon(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let mut held_db = HorizonDb::start(env, "bench_horizon").await?;
    let mut control_db = HorizonDb::start(env, "bench_horizon_control").await?;
    env.receiver.reset();
    let count = sizes.horizon_cycle;
    // Rounds alternate which database goes first, so that what follows a cycle (the other worker
    // settling, the receiver's connections) and drift within a round fall on both alike.
    let mut rounds_so_far = 0u32;
    let mut round = async |held_db: &mut HorizonDb,
                           control_db: &mut HorizonDb,
                           began: f64|
           -> Result<(Round, Cycle), BenchError> {
        let held_first = rounds_so_far % 2 == 0;
        rounds_so_far += 1;
        let (held, control) = if held_first {
            let held = held_db.cycle(env, count).await?;
            (held, control_db.cycle(env, count).await?)
        } else {
            let control = control_db.cycle(env, count).await?;
            (held_db.cycle(env, count).await?, control)
        };
        let round = Round {
            began,
            held: held.write_seconds + held.drain_seconds,
            control: control.write_seconds + control.drain_seconds,
        };
        Ok((round, held))
    };
    round(&mut held_db, &mut control_db, -1.0).await?;
    let mut before = Vec::new();
    for _ in 0..ROUNDS_BEFORE {
        before.push(round(&mut held_db, &mut control_db, -1.0).await?.0);
    }
    let (held_before, control_before) = rates(&before, count);
    let (dead_before, bytes_before, switches_before) = hot_table(&held_db.pool).await?;
    eprintln!(
        "bench: horizon: {held_before:.0} deliveries/s (control {control_before:.0}); now holding a snapshot for {} s…",
        sizes.horizon_seconds
    );
    if env.statements {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&held_db.pool)
            .await?;
    }
    let mut holder = held_db.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *holder)
        .await?;
    sqlx::query("SELECT count(*) FROM fhir_outbox.project")
        .execute(&mut *holder)
        .await?;
    let held = Instant::now();
    let mut samples = Vec::new();
    let mut rounds: Vec<Round> = Vec::new();
    while held.elapsed() < Duration::from_secs(sizes.horizon_seconds) || rounds.len() < 3 {
        let began = held.elapsed().as_secs_f64();
        let (
            this,
            Cycle {
                rate,
                write_seconds,
                drain_seconds,
                activity,
            },
        ) = round(&mut held_db, &mut control_db, began).await?;
        let (dead, bytes, switches) = hot_table(&held_db.pool).await?;
        samples.push(
            json!({ "seconds": held.elapsed().as_secs_f64(), "rate": rate,
                             "control_rate": count as f64 / this.control,
                             "write_seconds": write_seconds, "drain_seconds": drain_seconds,
                             "hot_dead_tuples": dead, "hot_bytes": bytes, "lane_switches": switches,
                             "diagnosis": dead_versions(&held_db.pool).await?,
                             "activity": activity }),
        );
        rounds.push(this);
    }
    // The second half of the held period (every round that began in it, at least the last three):
    // long enough to count the slow cycles as well as the fast ones.
    let held_for = held.elapsed().as_secs_f64();
    let since = (held_for / 2.0).min(rounds[rounds.len() - 3].began);
    let (held_late, control_late) =
        rates(rounds.iter().filter(|round| round.began >= since), count);
    let (dead_after, bytes_after, switches_after) = hot_table(&held_db.pool).await?;
    let statements = match env.statements {
        true => super::scenarios::top_statements(&held_db.pool, "under the held horizon").await?,
        false => Vec::new(),
    };
    holder.rollback().await?;
    let warnings = held_db.worker.warnings();
    held_db.stop(env).await?;
    control_db.stop(env).await?;
    let (ratio_before, ratio_late) = (held_before / control_before, held_late / control_late);
    let cost = 100.0 * (1.0 - ratio_late / ratio_before);
    let mut figure = Figure::new(
        Scenario::Horizon,
        "horizon.throughput_cost_pct",
        format!(
            "throughput lost after {held_for:.0} s of a held xmin horizon, against a control database taking turns with it (held / control {ratio_before:.3} before, {ratio_late:.3} in the second half; held {held_before:.0} → {held_late:.0}, control {control_before:.0} → {control_late:.0} deliveries/s; cycles of {count} changes written and delivered)"
        ),
        cost,
        "%",
    )
    .target(Target::AtMost(10.0));
    if sizes.horizon_seconds < 600 {
        figure = figure.note(format!("held {} s, not 600", sizes.horizon_seconds));
    }
    results.figures.push(figure);
    results.figures.push(Figure::new(
        Scenario::Horizon,
        "horizon.hot_dead_tuples",
        format!(
            "hot table dead tuples: {dead_before} before the horizon, {dead_after} after {held_for:.0} s ({:.1} → {:.1} MiB; {} lane switches)",
            bytes_before as f64 / 1048576.0,
            bytes_after as f64 / 1048576.0,
            switches_after - switches_before
        ),
        dead_after as f64,
        "tuples",
    ));
    let written = count * 2 * (4 + rounds.len() as u64);
    results.details.insert(
        "horizon".into(),
        json!({ "baseline_per_s": held_before, "under_horizon_per_s": held_late,
                "control_baseline_per_s": control_before, "control_late_per_s": control_late,
                "held_seconds": held_for, "written": written,
                "samples": samples, "top_statements": statements,
                "worker_warnings": warnings }),
    );
    Ok(())
}
