//! Bulk writes through the SQL functions: the set-based `fhir_outbox.create_resources` against
//! `create_resource` called once per resource, 1,000 resources per statement (one transaction)
//! from one connection, as `../shared/bench` enqueues its peers' jobs in bulk.

use super::fixtures::{self, Env, patient};
use super::scenarios::{Results, other};
use super::{BenchError, Figure, Scenario, Sizes, Target};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::Instant;

/// Resources per statement, as the peer harness's bulk enqueue.
const PER_STATEMENT: usize = 1_000;

/// The fastest peer's bulk enqueue in `../shared/bench` on the development VM (graphile-worker,
/// jobs/s, 2026-12-02; docs/performance.md): the issue asks for at least that.
const FASTEST_PEER_BULK_ENQUEUE: f64 = 22_199.0;

/// Writes `count` Patients through `statement` (`$1` the project, `$2` the batch as jsonb[]) and
/// returns resources per second.
async fn write_all(
    pool: &PgPool,
    project: uuid::Uuid,
    count: u64,
    statement: &str,
) -> Result<f64, BenchError> {
    let batches: Vec<Vec<Value>> = (0..count)
        .map(patient)
        .collect::<Vec<_>>()
        .chunks(PER_STATEMENT)
        .map(<[Value]>::to_vec)
        .collect();
    let started = Instant::now();
    for batch in &batches {
        let written: i64 = sqlx::query_scalar(statement)
            .bind(project)
            .bind(batch)
            .fetch_one(pool)
            .await?;
        if written as usize != batch.len() {
            return Err(other(format!(
                "bulk write: {written} of {} resources written",
                batch.len()
            )));
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let name = "bench_bulk";
    let url = env.create_db(name).await?;
    let pool = fixtures::connect(&url, 2).await?;
    let project = fhir_outbox::project::create_project(&pool, "bench").await?;
    let count = sizes.bulk_resources;
    // A round of each to warm up, then the measured rounds, alternating.
    let set_based = "SELECT count(*) FROM fhir_outbox.create_resources($1, $2)";
    let per_row = "SELECT count(*) FROM unnest($2::jsonb[]) AS r(doc)
                   CROSS JOIN LATERAL fhir_outbox.create_resource($1, r.doc)";
    write_all(&pool, project, PER_STATEMENT as u64, set_based).await?;
    write_all(&pool, project, PER_STATEMENT as u64, per_row).await?;
    let (mut batched, mut single) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        batched.push(write_all(&pool, project, count, set_based).await?);
        single.push(write_all(&pool, project, count, per_row).await?);
    }
    let captured: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.outbox")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    env.drop_db(name).await?;
    let expected = 2 * PER_STATEMENT as u64 + 4 * count;
    if captured as u64 != expected {
        return Err(other(format!(
            "bulk write: {captured} outbox rows for {expected} resources"
        )));
    }
    let mean = |rates: &[f64]| rates.iter().sum::<f64>() / rates.len() as f64;
    results.figures.push(
        Figure::new(
            Scenario::Bulk,
            "bulk.create_resources.per_s",
            format!(
                "bulk writes, set-based (fhir_outbox.create_resources, {PER_STATEMENT} ~1 KiB Patients per statement, one connection, {count} twice; target: the fastest peer's bulk enqueue)"
            ),
            mean(&batched),
            "resources/s",
        )
        .target(Target::AtLeast(FASTEST_PEER_BULK_ENQUEUE)),
    );
    results.figures.push(Figure::new(
        Scenario::Bulk,
        "bulk.create_resource.per_s",
        format!(
            "bulk writes, one create_resource per resource ({PER_STATEMENT} per statement, as ../shared/bench enqueues)"
        ),
        mean(&single),
        "resources/s",
    ));
    results.details.insert(
        "bulk".into(),
        json!({ "create_resources_per_s": batched, "create_resource_per_s": single,
                "outbox_rows": captured }),
    );
    Ok(())
}
