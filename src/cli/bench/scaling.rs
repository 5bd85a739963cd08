//! Scaling out: the same undispatched backlog drained by 1, 2 and 4 worker processes (each
//! `fhir-outbox run`, dispatch and delivery), with what each delivery costs the database: CPU, WAL,
//! connections (docs/scaling.md).

use super::fixtures::{self, Env, WorkerProcess};
use super::scenarios::Results;
use super::{BenchError, CpuProfile, Figure, Scenario, Sizes};
use serde_json::json;
use sqlx::PgPool;
use std::time::{Duration, Instant};

/// WAL written so far, in bytes since the cluster began.
async fn wal_bytes(pool: &PgPool) -> Result<f64, BenchError> {
    Ok(
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
            .fetch_one(pool)
            .await?,
    )
}

async fn connections(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

async fn succeeded(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM fhir_outbox.finished_delivery WHERE state = 'succeeded'",
    )
    .fetch_one(pool)
    .await?)
}

pub async fn run(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let backlog = sizes.scaling_backlog;
    let template = "bench_scaling";
    let url = env.create_db(template).await?;
    let pool = fixtures::connect(&url, 8).await?;
    let project = fixtures::project_with_subscriptions(&pool, &env.receiver.url, 1).await?;
    eprintln!("bench: scaling: writing an undispatched backlog of {backlog}…");
    fixtures::prefill(&pool, project, backlog, 4).await?;
    sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
    pool.close().await;
    env.seal(template).await?;
    let mut details = Vec::new();
    for processes in [1usize, 2, 4] {
        eprintln!("bench: scaling: {processes} worker process(es)…");
        let run_db = "bench_scaling_run";
        let run_url = env.copy_db(template, run_db).await?;
        let pool = fixtures::connect(&run_url, 2).await?;
        env.receiver.reset();
        let wal0 = wal_bytes(&pool).await?;
        let pg0 = env.postgres_cpu();
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..processes {
            workers.push(
                WorkerProcess::start_with(env, &run_url, 10, &["--endpoint-concurrency", "10000"])
                    .await?,
            );
        }
        let deadline = started + Duration::from_secs(sizes.e2e_max_seconds * 2);
        let mut peak_connections = 0;
        let mut cut_short = false;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            for worker in &mut workers {
                worker.check_alive()?;
            }
            peak_connections = peak_connections.max(connections(&pool).await?);
            if env.receiver.count() >= backlog && succeeded(&pool).await? >= backlog as i64 {
                break;
            }
            if Instant::now() >= deadline {
                cut_short = true;
                break;
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let pg = env.postgres_cpu() - pg0;
        let worker_cpu: f64 = workers.iter().map(|w| w.cpu(env.ticks)).sum();
        let wal = wal_bytes(&pool).await? - wal0;
        for worker in workers {
            worker.stop().await;
        }
        let delivered = succeeded(&pool).await?.max(1) as f64;
        pool.close().await;
        env.drop_db(run_db).await?;
        let rate = delivered / wall;
        let mut figure = Figure::new(
            Scenario::Scaling,
            format!("scaling.p{processes}.deliveries_per_s"),
            format!(
                "{processes} worker process(es), backlog {backlog} undispatched (dispatch included): PostgreSQL {:.2} ms CPU, {:.1} KiB WAL per delivery; {peak_connections} connections",
                1000.0 * pg / delivered,
                wal / delivered / 1024.0
            ),
            rate,
            "deliveries/s",
        );
        if cut_short {
            figure = figure.note(format!("cut short: {delivered} of {backlog}"));
        }
        results.figures.push(figure);
        results.cpu.push(CpuProfile {
            run: format!("scaling, {processes} process(es)"),
            wall_s: wall,
            postgres_s: pg,
            worker_s: worker_cpu,
            bench_s: 0.0,
        });
        details.push(json!({
            "processes": processes, "deliveries": delivered, "seconds": wall,
            "postgres_cpu_ms_per_delivery": 1000.0 * pg / delivered,
            "worker_cpu_ms_per_delivery": 1000.0 * worker_cpu / delivered,
            "wal_bytes_per_delivery": wal / delivered,
            "peak_connections": peak_connections, "cut_short": cut_short,
        }));
    }
    env.drop_db(template).await?;
    results.details.insert("scaling".into(), json!(details));
    Ok(())
}
