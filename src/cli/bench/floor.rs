//! The floor under end-to-end delivery on this machine, with nothing of fhir-outbox in it: what the
//! cheapest schema that stores what every delivery must store costs PostgreSQL and its client, and
//! what a bare POST of the same size to the loopback receiver costs. The peer target of issue 17
//! (3 × the fastest peer of `../shared/bench`, where fhir-outbox's figure includes dispatch and a
//! stored AuditEvent per job) asks for at most `cores ÷ (3 × the peer's rate)` of CPU per delivery
//! for every process together; these floors say how fast a design storing the same rows could go
//! here if it did nothing else, and so against which peers a factor of three is within reach at
//! all (docs/performance.md).
//!
//! The schema has a key index per table and one partial index for the claim, none of the history
//! indexes the console reads, no FHIR content, no criteria, no signatures, no fairness between
//! projects. Each of `FLOOR_CONNECTIONS` connections loops over batches of `BATCH`: mark outbox
//! rows dispatched and insert their deliveries; claim due deliveries and read their ~1 KiB
//! payloads; move them to history with an attempt row and a ~1 KiB AuditEvent each, committed
//! durably (the first two asynchronously, as fhir-outbox commits them). Two claims are measured:
//! with a lease written into the row (fhir-outbox's), and with only row locks held across the POST
//! (cheaper; a hanging receiver would then hold a transaction and the xmin horizon open).

use super::fixtures::{self, Env};
use super::scenarios::{Results, other};
use super::{BenchError, Figure, Scenario, Sizes};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Deliveries per transaction: fhir-outbox's default claim batch. Bigger batches cost less per
/// delivery (100 cost about a fifth more than 500 here), so the floor is the one of the batches
/// fhir-outbox takes.
const BATCH: i64 = 400;
/// Connections looping at once: enough to keep two cores busy (`pgbench` with 2 and 4 clients
/// gave the same rows/s within its scatter).
const FLOOR_CONNECTIONS: usize = 4;
/// Concurrent requests of the HTTP floor, as `../shared/bench`'s concurrency.
const HTTP_CONCURRENCY: usize = 10;

const SCHEMA: &str = "
CREATE TABLE floor_outbox (id bigserial PRIMARY KEY, dispatched boolean NOT NULL DEFAULT false,
                           payload jsonb NOT NULL);
CREATE INDEX floor_outbox_undispatched ON floor_outbox (id) WHERE NOT dispatched;
CREATE TABLE floor_delivery (id bigserial PRIMARY KEY, outbox_id bigint NOT NULL,
                             state text NOT NULL, lease_until timestamptz,
                             next_attempt_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX floor_delivery_due ON floor_delivery (next_attempt_at) WHERE state = 'pending';
CREATE TABLE floor_history (id bigint NOT NULL, outbox_id bigint NOT NULL, state text NOT NULL,
                            finished_at timestamptz NOT NULL);
CREATE INDEX floor_history_id ON floor_history (id);
CREATE TABLE floor_attempt (delivery_id bigint NOT NULL, status int NOT NULL,
                            started_at timestamptz NOT NULL, audit_event_id uuid NOT NULL);
CREATE INDEX floor_attempt_delivery ON floor_attempt (delivery_id);
CREATE TABLE floor_audit_event (id uuid NOT NULL, recorded timestamptz NOT NULL,
                                content jsonb NOT NULL);
CREATE INDEX floor_audit_event_id ON floor_audit_event (id);";

/// `$1` rows of ~1 KiB, as the peers' jobs and the bench's Patients.
const FILL: &str = "
INSERT INTO floor_outbox (payload)
SELECT jsonb_build_object('resourceType', 'Patient', 'id', gen_random_uuid(), 'seq', g,
                          'text', repeat(md5(g::text), 29))
FROM generate_series(1, $1::bigint) AS g";

const DISPATCH: &str = "
WITH taken AS (SELECT id FROM floor_outbox WHERE NOT dispatched ORDER BY id LIMIT $1
               FOR UPDATE SKIP LOCKED),
     marked AS (UPDATE floor_outbox o SET dispatched = true FROM taken
                WHERE o.id = taken.id RETURNING o.id)
INSERT INTO floor_delivery (outbox_id, state) SELECT id, 'pending' FROM marked";

/// The claim with a lease: the rows say they are taken, so the transaction ends before the POST.
const CLAIM_LEASED: &str = "
WITH leased AS (
    UPDATE floor_delivery d SET state = 'in_flight', lease_until = now() + interval '30 s'
    FROM (SELECT id FROM floor_delivery WHERE state = 'pending' AND next_attempt_at <= now()
          ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
    WHERE d.id = due.id RETURNING d.id, d.outbox_id)
SELECT leased.id, o.payload::text FROM leased JOIN floor_outbox o ON o.id = leased.outbox_id";

/// The claim without one: only row locks, which hold while the transaction stays open across the
/// POST (the cheapest possible claim; a hanging receiver would hold the transaction and the xmin
/// horizon, which is why fhir-outbox leases).
const CLAIM_LOCKED: &str = "
WITH due AS (SELECT id, outbox_id FROM floor_delivery
             WHERE state = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
SELECT due.id, o.payload::text FROM due JOIN floor_outbox o ON o.id = due.outbox_id";

const COMPLETE: &str = "
WITH finished AS (DELETE FROM floor_delivery WHERE id = ANY ($1) RETURNING id, outbox_id),
     stored AS (INSERT INTO floor_history SELECT id, outbox_id, 'succeeded', now() FROM finished),
     audited AS (SELECT id, gen_random_uuid() AS event FROM finished),
     events AS (
         INSERT INTO floor_audit_event
         SELECT event, now(), jsonb_build_object(
             'resourceType', 'AuditEvent', 'id', event, 'recorded', now(), 'outcome', '0',
             'type', jsonb_build_object('code', 'transmit'),
             'entity', jsonb_build_array(jsonb_build_object('what',
                 jsonb_build_object('reference', 'Patient/' || id))),
             'outcomeDesc', repeat('x', 700))
         FROM audited)
INSERT INTO floor_attempt SELECT id, 200, now(), event FROM audited";

/// How the claim keeps a delivery taken while it is posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// A lease written into the row (fhir-outbox's way: a worker that dies leaves a lease that
    /// expires).
    Leased,
    /// Row locks held by a transaction open across the POST.
    Locked,
}

impl Claim {
    fn key(self) -> &'static str {
        match self {
            Claim::Leased => "leased",
            Claim::Locked => "locked",
        }
    }
}

/// A transaction whose commit does not wait for its WAL to reach the disk, as fhir-outbox commits
/// its dispatches and claims (a crash loses a few, and they are done again).
async fn begin_asynchronous(
    conn: &mut PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, BenchError> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// One batch through the three steps: the outbox rows it dispatched and the deliveries it
/// finished (not always its own: the loops claim each other's).
async fn cycle(conn: &mut PgConnection, claim: Claim) -> Result<(u64, u64), BenchError> {
    let mut tx = begin_asynchronous(conn).await?;
    let dispatched = sqlx::query(DISPATCH)
        .bind(BATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;

    let (mut tx, claimed): (_, Vec<(i64, String)>) = match claim {
        Claim::Leased => {
            let mut tx = begin_asynchronous(conn).await?;
            let rows = sqlx::query_as(CLAIM_LEASED)
                .bind(BATCH)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            (conn.begin().await?, rows)
        }
        Claim::Locked => {
            let mut tx = conn.begin().await?;
            let rows = sqlx::query_as(CLAIM_LOCKED)
                .bind(BATCH)
                .fetch_all(&mut *tx)
                .await?;
            (tx, rows)
        }
    };
    let ids: Vec<i64> = claimed.iter().map(|(id, _)| *id).collect();
    let done = sqlx::query(COMPLETE)
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok((dispatched, done))
}

/// What one round of the bookkeeping floor measured.
struct Round {
    deliveries_per_s: f64,
    /// PostgreSQL's CPU per delivery, microseconds.
    postgres_us: f64,
    /// Its client's (this process's), microseconds: a worker has to send and read these rows too.
    client_us: f64,
}

impl Round {
    fn cpu_us(&self) -> f64 {
        self.postgres_us + self.client_us
    }
}

/// Fresh tables with `rows` undispatched rows, then `seconds` of looping on every connection.
async fn bookkeeping(
    env: &Env,
    pool: &PgPool,
    claim: Claim,
    rows: i64,
    seconds: u64,
) -> Result<Round, BenchError> {
    sqlx::query(
        "TRUNCATE floor_outbox, floor_delivery, floor_history, floor_attempt, floor_audit_event",
    )
    .execute(pool)
    .await?;
    sqlx::query(FILL).bind(rows).execute(pool).await?;
    for sql in [
        "VACUUM ANALYZE floor_outbox",
        "VACUUM ANALYZE floor_delivery",
        "CHECKPOINT",
    ] {
        sqlx::query(sql).execute(pool).await?;
    }
    let mut connections = Vec::with_capacity(FLOOR_CONNECTIONS);
    for _ in 0..FLOOR_CONNECTIONS {
        connections.push(pool.acquire().await?);
    }
    let finished = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (postgres_before, client_before) = (env.postgres_cpu(), env.own_cpu());
    let started = Instant::now();
    let loops: Vec<_> = connections
        .into_iter()
        .map(|mut conn| {
            let finished = finished.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let (dispatched, done) = cycle(&mut conn, claim).await?;
                    finished.fetch_add(done, Ordering::Relaxed);
                    if dispatched == 0 && done == 0 {
                        // The backlog ran out before the time did: the rate so far stands.
                        break;
                    }
                }
                Ok::<_, BenchError>(())
            })
        })
        .collect();
    for task in loops {
        task.await.map_err(other)??;
    }
    let wall = started.elapsed().as_secs_f64();
    let postgres = env.postgres_cpu() - postgres_before;
    let client = env.own_cpu() - client_before;
    let finished = finished.load(Ordering::Relaxed) as f64;
    if finished == 0.0 {
        return Err(other("the bookkeeping floor finished no delivery"));
    }
    Ok(Round {
        deliveries_per_s: finished / wall,
        postgres_us: postgres * 1e6 / finished,
        client_us: client * 1e6 / finished,
    })
}

/// `seconds` of ~1 KiB POSTs to the bench's loopback receiver from `HTTP_CONCURRENCY` tasks on one
/// client: requests per second, and this process's CPU (client and receiver) per request in
/// microseconds.
async fn http(env: &Env, seconds: u64) -> Result<(f64, f64), BenchError> {
    let client = reqwest::Client::new();
    let body = Arc::new(json!({"resourceType": "Bundle", "text": "x".repeat(1000)}).to_string());
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let own_before = env.own_cpu();
    let started = Instant::now();
    let tasks: Vec<_> = (0..HTTP_CONCURRENCY)
        .map(|_| {
            let (client, body, sent) = (client.clone(), body.clone(), sent.clone());
            let url = env.receiver.url.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/fhir+json")
                        .body(body.as_str().to_owned())
                        .send()
                        .await?;
                    response.error_for_status()?.bytes().await?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, reqwest::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(other)?.map_err(other)?;
    }
    let wall = started.elapsed().as_secs_f64();
    let own = env.own_cpu() - own_before;
    let sent = sent.load(Ordering::Relaxed) as f64;
    Ok((sent / wall, own * 1e6 / sent))
}

/// Both floors, each claim twice (alternated), and the rate they bound.
pub async fn run(env: &Env, sizes: &Sizes, results: &mut Results) -> Result<(), BenchError> {
    let name = "bench_floor";
    let url = env.create_db(name).await?;
    let pool = fixtures::connect(&url, FLOOR_CONNECTIONS as u32).await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;
    let seconds = sizes.floor_seconds;
    // More than the loops finish in their time (up to about 53,000 a second here).
    let rows = 80_000 * seconds as i64;
    let s = Scenario::Floor;
    let mut best: Vec<(Claim, Round)> = Vec::new();
    let mut rounds = Vec::new();
    for round in 0..2 {
        for claim in [Claim::Leased, Claim::Locked] {
            eprintln!(
                "bench: floor: bookkeeping, {} claim, round {}…",
                claim.key(),
                round + 1
            );
            let measured = bookkeeping(env, &pool, claim, rows, seconds).await?;
            rounds.push(json!({"claim": claim.key(), "round": round + 1,
                               "deliveries_per_s": measured.deliveries_per_s,
                               "postgres_us": measured.postgres_us,
                               "client_us": measured.client_us}));
            match best.iter_mut().find(|(kept, _)| *kept == claim) {
                // The cheaper of the two rounds: a floor is what the work can cost, and a round
                // slowed by the machine says less about that.
                Some((_, kept)) if kept.cpu_us() <= measured.cpu_us() => {}
                Some((_, kept)) => *kept = measured,
                None => best.push((claim, measured)),
            }
        }
    }
    eprintln!("bench: floor: bare POSTs to the loopback receiver…");
    let (http_rate, http_us) = http(env, seconds).await?;
    pool.close().await;
    env.drop_db(name).await?;

    for (claim, measured) in &best {
        let what = match claim {
            Claim::Leased => "leased claim",
            Claim::Locked => "claim's locks held across the POST",
        };
        results.figures.push(Figure::new(
            s,
            format!("floor.{}.cpu_us", claim.key()),
            format!(
                "floor: bookkeeping CPU per delivery, {what} (PostgreSQL {} µs; {} deliveries/s)",
                super::number(measured.postgres_us),
                super::number(measured.deliveries_per_s)
            ),
            measured.cpu_us(),
            "µs",
        ));
    }
    results.figures.push(Figure::new(
        s,
        "floor.http.us_per_request",
        format!(
            "floor: CPU per bare 1 KiB POST, client and receiver ({} requests/s)",
            super::number(http_rate)
        ),
        http_us,
        "µs",
    ));
    let cheapest = best
        .iter()
        .map(|(_, measured)| measured.cpu_us())
        .fold(f64::INFINITY, f64::min);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ceiling = cores * 1e6 / (cheapest + http_us);
    results.figures.push(Figure::new(
        s,
        "floor.ceiling_per_s",
        format!("floor: deliveries/s on {cores} cores if the floors were all the work"),
        ceiling,
        "deliveries/s",
    ));
    results.figures.push(
        Figure::new(
            s,
            "floor.peer_bound_per_s",
            "floor: the fastest peer 3 × can be reached against (ceiling ÷ 3)",
            ceiling / 3.0,
            "jobs/s",
        )
        .note("beside a faster peer, 3 × needs less CPU than the floors alone"),
    );
    results.details.insert(
        "floor".into(),
        json!({"rounds": rounds, "http_requests_per_s": http_rate, "rows_per_round": rows,
               "seconds": seconds}),
    );
    Ok(())
}
