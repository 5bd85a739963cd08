//! Faults: workers killed at random points, several workers at once, PostgreSQL restarted mid-run,
//! receivers misbehaving, a transaction holding back the xmin horizon. Each prints what it injected and
//! what it counted. CI runs short variants; the full ones:
//!
//! FHIR_OUTBOX_FAULT_DELIVERIES=5000 FHIR_OUTBOX_FAULT_KILLS=10 cargo test --test integration faults -- --nocapture

use crate::common::TestDb;
use crate::delivery::{create, fast_config, hook, pipeline, with_extensions};
use crate::receiver::{Receiver, Reply};
use fhir_outbox::delivery::DeliveryConfig;
use pgtemp::{Durability, TempCluster};
use rand::Rng;
use serde_json::json;
use sqlx::PgPool;
use std::collections::HashMap;
use std::process::Child;
use std::time::{Duration, Instant};
use uuid::Uuid;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A worker process with 1 s leases (so that takeovers after a kill happen within the test), unless
/// `extra` sets `--lease-seconds`.
fn spawn_worker(database_url: &str, extra: &[&str]) -> Child {
    let lease: &[&str] = if extra.contains(&"--lease-seconds") {
        &[]
    } else {
        &["--lease-seconds", "1"]
    };
    crate::common::binary()
        .args([
            "run",
            "--database-url",
            database_url,
            "--allow-unsafe-outbound",
        ])
        .args(lease)
        .args(["--retry-base-ms", "50", "--retry-cap-ms", "200"])
        .args(extra)
        .spawn()
        .unwrap()
}

fn terminate(mut child: Child) {
    crate::common::sigterm(&child);
    child.wait().unwrap();
}

/// Writes `n` Patients in one statement through the SQL interface.
async fn write_patients(pool: &PgPool, project: Uuid, n: usize) {
    sqlx::query(
        "SELECT fhir_outbox.create_resource($1, '{\"resourceType\": \"Patient\"}') FROM generate_series(1, $2)",
    )
    .bind(project)
    .bind(n as i32)
    .execute(pool)
    .await
    .unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until `expected` deliveries succeeded (or panics after `limit`).
async fn wait_delivered(pool: &PgPool, expected: i64, limit: Duration) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if count(
            pool,
            "SELECT count(*) FROM fhir_outbox.delivery WHERE state = 'succeeded'",
        )
        .await
            >= expected
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM fhir_outbox.delivery GROUP BY state")
            .fetch_all(pool)
            .await
            .unwrap();
    panic!("not all {expected} deliveries succeeded within {limit:?}: {states:?}");
}

/// How often each webhook-id reached the receiver.
fn per_webhook_id(receiver: &Receiver) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for request in receiver.received() {
        *seen
            .entry(request.header("webhook-id").unwrap().to_owned())
            .or_default() += 1;
    }
    seen
}

/// Every delivery's webhook-id reached the receiver at least once, and every request received
/// carries a stored delivery's webhook-id (a copy under another id, as a dispatch lost in a crash
/// and made again with new ids would send, is one a receiver cannot recognise); returns the
/// duplicates.
async fn check_none_lost(pool: &PgPool, receiver: &Receiver) -> usize {
    let ids: Vec<String> = sqlx::query_scalar("SELECT webhook_id::text FROM fhir_outbox.delivery")
        .fetch_all(pool)
        .await
        .unwrap();
    let seen = per_webhook_id(receiver);
    let lost: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(lost.is_empty(), "{} deliveries lost", lost.len());
    let stored: std::collections::HashSet<&String> = ids.iter().collect();
    let strangers = seen.keys().filter(|id| !stored.contains(id)).count();
    assert_eq!(strangers, 0, "requests under a webhook-id no delivery has");
    seen.values().map(|n| n - 1).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing() {
    let deliveries = setting("FHIR_OUTBOX_FAULT_DELIVERIES", 1000);
    let kills = setting("FHIR_OUTBOX_FAULT_KILLS", 3);
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    write_patients(&db.pool, project, deliveries).await;

    for _ in 0..kills {
        let worker = spawn_worker(&db.url, &[]);
        let pause = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let mut worker = worker;
        worker.kill().unwrap(); // SIGKILL
        worker.wait().unwrap();
    }
    let worker = spawn_worker(&db.url, &[]);
    wait_delivered(&db.pool, deliveries as i64, Duration::from_secs(180)).await;
    terminate(worker);
    let duplicates = check_none_lost(&db.pool, &receiver).await;
    println!(
        "sigkill: injected {kills} SIGKILLs at random points; {deliveries} deliveries, 0 lost, {duplicates} duplicates (each with its delivery's webhook-id)"
    );
    // Only attempts made but not yet recorded at a kill can repeat: those in flight (the
    // concurrency), those queued for the recorder and those in the batch it is writing (a claim
    // batch each at most).
    let config = DeliveryConfig::default();
    assert!(
        duplicates <= kills * (config.concurrency + 2 * config.claim_batch),
        "{duplicates} duplicates"
    );
}

/// Writes `changes` updates spread over `resources` Patients in one statement, so that all but the
/// last version of each Patient are superseded before they are delivered.
async fn write_versions(pool: &PgPool, project: Uuid, changes: usize, resources: usize) {
    sqlx::query(
        "SELECT fhir_outbox.update_resource($1, 'Patient', 'p' || (g % $3),
                jsonb_build_object('resourceType', 'Patient', 'id', 'p' || (g % $3),
                                   'name', jsonb_build_array(jsonb_build_object('family', 'v' || g))))
         FROM generate_series(1, $2) g",
    )
    .bind(project)
    .bind(changes as i32)
    .bind(resources as i32)
    .execute(pool)
    .await
    .unwrap();
}

/// A worker that dies after claiming, before any attempt is recorded, leaves leases that another
/// worker takes over; that is not a retry, so superseded versions are still sent (every version of
/// a state transition matters). Deterministic: the dead worker's claim is written as the claim
/// statement writes it.
#[tokio::test]
async fn a_taken_over_lease_is_a_first_attempt_even_for_a_superseded_version() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    write_versions(&db.pool, project, 3, 1).await;
    let p = pipeline(&db.pool, fast_config());
    while p.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
    let taken = sqlx::query(
        "UPDATE fhir_outbox.delivery SET state = 'in_flight', lease_token = gen_random_uuid(),
                lease_expires_at = now() - interval '1 second', claims = claims + 1",
    )
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(taken, 3);
    p.settle(&db.pool).await;

    let rows: Vec<(i64, String, i32, i32)> = sqlx::query_as(
        "SELECT version_id, state, attempts, claims FROM fhir_outbox.delivery ORDER BY version_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [1, 2, 3].map(|v| (v, "succeeded".to_owned(), 1, 2)),
        "every version sent once, after the takeover"
    );
    let mut versions: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.json()["meta"]["versionId"].as_str().unwrap().to_owned())
        .collect();
    versions.sort();
    assert_eq!(versions, ["1", "2", "3"]);
}

/// A worker whose lease was taken over while its request was in flight (it stalled past its lease,
/// and another worker claimed the delivery) records nothing of that attempt: not the completion, not
/// the attempt row, not the AuditEvent. The delivery is the new lease holder's; what it sends is the
/// attempt on record. (The recorder writes the completion, the attempt rows and the AuditEvents in
/// one statement, fenced by the lease token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_after_a_takeover_records_no_attempt_and_no_audit_event() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Stall(Duration::from_millis(1500))]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    write_patients(&db.pool, project, 1).await;
    let p = pipeline(&db.pool, fast_config());
    p.settle_dispatch().await;
    let worker = p.worker.clone();
    let delivering = tokio::spawn(async move { worker.deliver_once().await.unwrap() });
    let started = Instant::now();
    while receiver.received().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Another worker takes the delivery over, as the claim writes a takeover.
    let taken = sqlx::query(
        "UPDATE fhir_outbox.delivery SET lease_token = gen_random_uuid(), claims = claims + 1
         WHERE state = 'in_flight'",
    )
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(taken, 1);
    assert_eq!(delivering.await.unwrap(), 1, "the stalled request was made");

    let state: (String, i32) = sqlx::query_as("SELECT state, attempts FROM fhir_outbox.delivery")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        state,
        ("in_flight".to_owned(), 0),
        "the new holder's delivery is untouched"
    );
    let attempts = count(
        &db.pool,
        "SELECT count(*) FROM fhir_outbox.delivery_attempt",
    )
    .await;
    let events = count(&db.pool, "SELECT count(*) FROM fhir_outbox.audit_event").await;
    assert_eq!(
        (attempts, events),
        (0, 0),
        "nothing of the discarded outcome is stored"
    );
}

/// The field case behind the test above: two workers killed at random while a slow receiver holds
/// requests in flight, every change an update of one of a few Patients (so nearly every version is
/// superseded when it is sent). Nothing may be lost or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_superseded_versions_loses_nothing() {
    let changes = setting("FHIR_OUTBOX_FAULT_DELIVERIES", 1000);
    let kills = setting("FHIR_OUTBOX_FAULT_KILLS", 4);
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start_with_latency(vec![], Duration::from_millis(100)).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    write_versions(&db.pool, project, changes, 20).await;

    let mut workers: Vec<Child> = (0..2).map(|_| spawn_worker(&db.url, &[])).collect();
    for _ in 0..kills {
        let pause = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim = rand::rng().random_range(0..workers.len());
        let mut killed = std::mem::replace(&mut workers[victim], spawn_worker(&db.url, &[]));
        killed.kill().unwrap(); // SIGKILL
        killed.wait().unwrap();
    }
    wait_settled(&db.pool, Duration::from_secs(240)).await;
    workers.into_iter().for_each(terminate);
    let outcomes: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM fhir_outbox.delivery GROUP BY state")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        outcomes,
        [("succeeded".to_owned(), changes as i64)],
        "every change delivered, none skipped"
    );
    let duplicates = check_none_lost(&db.pool, &receiver).await;
    println!(
        "sigkill, superseded versions: {kills} SIGKILLs of 2 workers, receiver 0-100 ms; {changes} changes to 20 Patients, 0 lost, 0 skipped, {duplicates} duplicates (each with its delivery's webhook-id)"
    );
    let config = DeliveryConfig::default();
    assert!(duplicates <= kills * (config.concurrency + 2 * config.claim_batch));
}

/// Waits until no delivery is pending or in flight and every change is dispatched.
async fn wait_settled(pool: &PgPool, limit: Duration) {
    let started = Instant::now();
    while started.elapsed() < limit {
        let open = count(
            pool,
            "SELECT (SELECT count(*) FROM fhir_outbox.delivery WHERE state IN ('pending', 'in_flight'))
                  + (SELECT count(*) FROM fhir_outbox.outbox WHERE dispatched_at IS NULL)",
        )
        .await;
        if open == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("deliveries did not settle within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_four_workers_deliver_exactly_once_without_faults() {
    for workers in [2, 4] {
        let db = TestDb::new().await;
        let project = db.project().await;
        let receiver = Receiver::start(vec![]).await;
        for _ in 0..3 {
            create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
        }
        let changes = setting("FHIR_OUTBOX_FAULT_DELIVERIES", 1000) / 3;
        write_patients(&db.pool, project, changes).await;
        // A lease that expires because a loaded machine stalled its renewal for a second is a
        // fault (a takeover, a possible duplicate): without faults, leases outlast any stall.
        let running: Vec<Child> = (0..workers)
            .map(|_| spawn_worker(&db.url, &["--lease-seconds", "30"]))
            .collect();
        wait_delivered(&db.pool, (changes * 3) as i64, Duration::from_secs(180)).await;
        running.into_iter().for_each(terminate);
        let duplicates = check_none_lost(&db.pool, &receiver).await;
        println!(
            "{workers} workers: {} deliveries, 0 lost, {duplicates} duplicates",
            changes * 3
        );
        assert_eq!(duplicates, 0, "exactly once without faults");
        assert_eq!(receiver.received().len(), changes * 3);
    }
}

/// PostgreSQL stopped while a worker is busy, down 3 s, then started again: readiness reports the
/// outage, the worker survives it, and every change is delivered. `crash` kills the server
/// (immediate shutdown: crash recovery, which empties unlogged tables) instead of stopping it.
async fn postgresql_down_mid_run(crash: bool) {
    // Durable, so that a crash keeps every commit it acknowledged.
    let mut cluster = tokio::task::spawn_blocking(|| TempCluster::start(Durability::Durable))
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let pool = fhir_outbox::db::connect(&url, 4).await.unwrap();
    fhir_outbox::db::migrate(&pool).await.unwrap();
    let project = fhir_outbox::project::create_project(&pool, "restart")
        .await
        .unwrap();
    let receiver = Receiver::start(vec![]).await;
    create(&pool, project, &hook(&receiver.url, "Patient"), None).await;
    write_patients(&pool, project, 300).await;

    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{admin_port}");
    let worker = spawn_worker(&url, &["--admin-addr", &admin]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    pool.close().await;

    // Down while the worker is busy; meanwhile, readiness must report the outage.
    let restarting = std::thread::spawn(move || {
        let down = Duration::from_secs(3);
        match crash {
            true => cluster.crash_and_restart(down, Durability::Durable),
            false => cluster.restart(down, Durability::Durable),
        }
        .unwrap();
        cluster
    });
    let client = reqwest::Client::new();
    let mut saw_not_ready = false;
    for _ in 0..60 {
        if let Ok(response) = client.get(format!("http://{admin}/readyz")).send().await {
            if response.status() == 503 {
                saw_not_ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cluster = restarting.join().unwrap();
    assert!(saw_not_ready, "readiness reported the outage");

    let pool = fhir_outbox::db::connect(&url, 4).await.unwrap();
    write_patients(&pool, project, 100).await;
    wait_delivered(&pool, 400, Duration::from_secs(120)).await;
    let mut worker = worker;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker survived the outage (no crash loop)"
    );
    let ready = client
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(ready, 200);
    terminate(worker);
    let duplicates = check_none_lost(&pool, &receiver).await;
    let how = if crash { "crashed" } else { "restarted" };
    println!("PostgreSQL {how}, down 3 s mid-run; 400 deliveries, 0 lost, {duplicates} duplicates");
    pool.close().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_mid_run() {
    postgresql_down_mid_run(false).await;
}

/// A crash empties the unlogged tables (the claim's cursor, the dispatchers' wake-up requests):
/// claims and wake-ups start afresh, nothing stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_crashed_mid_run() {
    postgresql_down_mid_run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_receivers_are_recorded_and_retried_per_policy() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let two_attempts = |url: &str| {
        with_extensions(
            hook(url, "Patient"),
            json!([{ "url": "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts", "valueInteger": 2 }]),
        )
    };
    let timeout = Receiver::start(vec![Reply::Stall(Duration::from_secs(5))]).await;
    let error = Receiver::start(vec![Reply::Status(500, None)]).await;
    let reset = Receiver::start(vec![Reply::Drop]).await;
    let slow = Receiver::start(vec![Reply::Stall(Duration::from_millis(300))]).await;
    let huge = Receiver::start(vec![Reply::Huge(50 * 1024 * 1024)]).await;
    let plain = Receiver::start(vec![Reply::Status(200, None); 4]).await;
    let tls_url = plain.url.replace("http://", "https://");
    let mut ids = HashMap::new();
    for (name, url) in [
        ("timeout", &timeout.url),
        ("500", &error.url),
        ("reset", &reset.url),
        ("slow", &slow.url),
        ("huge", &huge.url),
        ("tls", &tls_url),
    ] {
        let sub = create(&db.pool, project, &two_attempts(url), None).await;
        ids.insert(sub["id"].as_str().unwrap().to_owned(), name);
    }
    let p = pipeline(
        &db.pool,
        DeliveryConfig {
            request_timeout: Duration::from_millis(800),
            ..fast_config()
        },
    );
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;

    let rows: Vec<(String, String, i32, Option<String>)> =
        sqlx::query_as("SELECT subscription_id, state, attempts, reason FROM fhir_outbox.delivery")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let outcome: HashMap<&str, (String, i32, Option<String>)> = rows
        .into_iter()
        .map(|(sub, state, attempts, reason)| (ids[&sub], (state, attempts, reason)))
        .collect();
    println!("receiver faults: {outcome:#?}");
    assert_eq!(outcome["timeout"].0, "succeeded");
    assert_eq!(outcome["timeout"].1, 2);
    assert_eq!(
        (outcome["500"].0.as_str(), outcome["500"].1),
        ("succeeded", 2)
    );
    assert_eq!(
        (outcome["reset"].0.as_str(), outcome["reset"].1),
        ("succeeded", 2)
    );
    assert_eq!(
        (outcome["slow"].0.as_str(), outcome["slow"].1),
        ("succeeded", 1)
    );
    assert_eq!(
        (outcome["huge"].0.as_str(), outcome["huge"].1),
        ("succeeded", 1)
    );
    assert_eq!((outcome["tls"].0.as_str(), outcome["tls"].1), ("failed", 2));
    let errors: Vec<(Option<String>, Option<i32>)> = sqlx::query_as(
        "SELECT error, length(response_body) FROM fhir_outbox.delivery_attempt ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        errors
            .iter()
            .any(|(e, _)| e.as_deref().is_some_and(|e| e.contains("timed out"))),
        "{errors:?}"
    );
    assert!(
        errors.iter().all(|(_, body)| body.unwrap_or(0) <= 4096),
        "bounded response prefix"
    );
    assert!(
        errors.iter().any(|(_, body)| *body == Some(4096)),
        "the huge answer was cut at 4 KiB"
    );
    let tls = outcome["tls"]
        .2
        .as_deref()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        tls.contains("corrupt message") || tls.contains("tls") || tls.contains("certificate"),
        "{tls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_holding_xmin_does_not_stop_claiming() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let n = setting("FHIR_OUTBOX_FAULT_DELIVERIES", 1000) / 2;
    let p = pipeline(&db.pool, fast_config());
    let rate = |label: &'static str| {
        let (pool, p) = (&db.pool, &p);
        async move {
            write_patients(pool, project, n).await;
            let started = Instant::now();
            p.settle(pool).await;
            let per_second = n as f64 / started.elapsed().as_secs_f64();
            println!("held xmin: {label}: {n} changes delivered at {per_second:.0}/s");
            per_second
        }
    };
    let free = rate("no long transaction").await;
    // A transaction that took a snapshot and stays open: VACUUM cannot remove anything newer.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *holder)
        .await
        .unwrap();
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.delivery")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let held = rate("snapshot held open").await;
    holder.rollback().await.unwrap();
    println!(
        "held xmin: throughput with the snapshot held is {:.0}% of without",
        100.0 * held / free
    );
    assert_eq!(receiver.received().len(), 2 * n);
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // The "private" target stands for 169.254.169.254 and the like: it must never be reached.
    let private = Receiver::start(vec![]).await;
    let redirecting = Receiver::start(vec![Reply::Redirect(private.url.clone())]).await;
    create(&db.pool, project, &hook(&redirecting.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    assert_eq!(redirecting.received().len(), 1);
    assert!(
        private.received().is_empty(),
        "the redirect was not followed"
    );
    let status: Option<i32> = sqlx::query_scalar("SELECT status FROM fhir_outbox.delivery_attempt")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        status,
        Some(302),
        "recorded as answered (3xx counts as success, as in Medplum)"
    );
}
