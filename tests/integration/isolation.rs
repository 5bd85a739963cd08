//! Endpoint isolation: a hanging or failing receiver never delays anyone else's notifications.
//! Each test asserts on what happened (requests that arrived, rows), never on how fast.

use crate::common::TestDb;
use crate::delivery::{create, fast_config, hook};
use crate::receiver::{Receiver, Reply};
use chrono::{DateTime, Utc};
use fhir_outbox::delivery::policy::{CircuitBreaker, EndpointAllowance};
use fhir_outbox::delivery::{DeliveryConfig, DeliveryWorker};
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use serde_json::json;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A dispatcher and a delivery worker running until dropped.
struct Running {
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(pool: &PgPool, config: DeliveryConfig) -> Running {
        let shutdown = CancellationToken::new();
        let dispatcher = Arc::new(Dispatcher::new(
            pool.clone(),
            DispatchConfig {
                allow_unsafe_outbound: true,
                poll_interval: Duration::from_millis(50),
                ..DispatchConfig::default()
            },
        ));
        let worker = Arc::new(DeliveryWorker::new(pool.clone(), config).unwrap());
        let tasks = vec![
            tokio::spawn(dispatcher.run(shutdown.clone())),
            tokio::spawn(worker.run(shutdown.clone())),
        ];
        Running { shutdown, tasks }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// Dispatches every change, so that the backlog is in place before a worker starts.
async fn dispatch_everything(pool: &PgPool) {
    let dispatcher = Dispatcher::new(
        pool.clone(),
        DispatchConfig {
            allow_unsafe_outbound: true,
            ..DispatchConfig::default()
        },
    );
    while dispatcher.dispatch_once().await.unwrap().changes > 0 {}
}

/// Waits until `done`, or panics after `seconds`.
async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, seconds: u64, mut done: F) {
    for _ in 0..seconds * 20 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn count(pool: &PgPool, sql: &str, subscription: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(subscription)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// How many deliveries of `subscription` succeeded.
async fn succeeded(pool: &PgPool, subscription: &str) -> i64 {
    count(pool, "SELECT count(*) FROM fhir_outbox.delivery WHERE subscription_id = $1 AND state = 'succeeded'", subscription).await
}

/// A worker with `concurrency` slots, `allowance` per endpoint, requests slow after 300 ms, and a
/// request timeout (an hour) that no test waits for.
fn hanging_config(concurrency: usize, allowance: EndpointAllowance) -> DeliveryConfig {
    DeliveryConfig {
        concurrency,
        endpoint_allowance: allowance,
        slow_request_after: Duration::from_millis(300),
        request_timeout: Duration::from_secs(3600),
        shutdown_grace: Duration::from_millis(100),
        ..fast_config()
    }
}

async fn subscribe(pool: &PgPool, project: Uuid, url: &str) -> String {
    create(pool, project, &hook(url, "Patient"), None).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn patients(pool: &PgPool, project: Uuid, how_many: usize) {
    for _ in 0..how_many {
        create(pool, project, &json!({ "resourceType": "Patient" }), None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_never_delays_a_healthy_one() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // Accepts every request and never answers (within the test).
    let hanging = Receiver::start(vec![Reply::Stall(Duration::from_secs(3600)); 100]).await;
    let healthy = Receiver::start(vec![]).await;
    let hanging_id = subscribe(&db.pool, project, &hanging.url).await;
    let healthy_id = subscribe(&db.pool, project, &healthy.url).await;
    // 16 request slots in all, 4 per endpoint: without the per-endpoint cap, the hanging endpoint
    // would take every slot and the healthy one would wait for the request timeout.
    let running = Running::start(
        &db.pool,
        DeliveryConfig {
            concurrency: 16,
            endpoint_allowance: EndpointAllowance::fixed(4),
            request_timeout: Duration::from_secs(3600),
            shutdown_grace: Duration::from_millis(100),
            ..fast_config()
        },
    );
    patients(&db.pool, project, 50).await;
    wait_for("the healthy endpoint's 50 deliveries", 60, async || {
        succeeded(&db.pool, &healthy_id).await == 50
    })
    .await;
    // Meanwhile the hanging endpoint holds exactly its allowance, in flight; the rest of its
    // backlog waits in the table, pending, not leased.
    assert_eq!(healthy.received().len(), 50);
    assert_eq!(hanging.received().len(), 4);
    let in_flight = "SELECT count(*) FROM fhir_outbox.delivery WHERE subscription_id = $1 AND state = 'in_flight'";
    let pending = "SELECT count(*) FROM fhir_outbox.delivery WHERE subscription_id = $1 AND state = 'pending'";
    assert_eq!(count(&db.pool, in_flight, &hanging_id).await, 4);
    assert_eq!(count(&db.pool, pending, &hanging_id).await, 46);
    let health: (i64, i64) = sqlx::query_as(
        "SELECT in_flight, pending FROM fhir_outbox.endpoint_health WHERE project_id = $1 AND endpoint = fhir_outbox.endpoint_origin($2)",
    )
    .bind(project)
    .bind(&hanging.url)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(health, (4, 46));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_requests_leave_their_slots_to_other_endpoints() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let hanging = Receiver::start(vec![Reply::Stall(Duration::from_secs(3600)); 100]).await;
    let healthy = Receiver::start(vec![]).await;
    subscribe(&db.pool, project, &hanging.url).await;
    // Four slots, and the hanging endpoint may take all four: only leaving the slots once they
    // count as slow lets anything else through before the (hour-long) request timeout.
    let running = Running::start(&db.pool, hanging_config(4, EndpointAllowance::fixed(4)));
    patients(&db.pool, project, 4).await;
    wait_for("the hanging endpoint's four requests", 30, async || {
        hanging.received().len() == 4
    })
    .await;
    let healthy_id = subscribe(&db.pool, project, &healthy.url).await;
    patients(&db.pool, project, 20).await;
    wait_for("the healthy endpoint's 20 deliveries", 30, async || {
        succeeded(&db.pool, &healthy_id).await == 20
    })
    .await;
    // The places for slow requests do not raise the hanging endpoint's allowance.
    assert_eq!(hanging.received().len(), 4);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hangs_at_a_large_allowance_leaves_slots_to_the_others() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let hanging = Receiver::start(vec![Reply::Stall(Duration::from_secs(3600)); 200]).await;
    let healthy = Receiver::start(vec![]).await;
    subscribe(&db.pool, project, &hanging.url).await;
    // Eight slots, eight slow places, and an allowance (as one grown while the endpoint answered
    // fast) larger than both: the hanging endpoint's first eight requests move to the slow places,
    // and without a limit its next eight would take the freed slots and hang there, past the
    // places, for the (hour-long) request timeout.
    let running = Running::start(&db.pool, hanging_config(8, EndpointAllowance::fixed(64)));
    patients(&db.pool, project, 40).await;
    wait_for(
        "eight requests in the places and more in slots",
        30,
        async || hanging.received().len() >= 10,
    )
    .await;
    // Long enough for the requests in slots to go slow too, and for more to start if they could.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let healthy_id = subscribe(&db.pool, project, &healthy.url).await;
    patients(&db.pool, project, 20).await;
    wait_for("the healthy endpoint's 20 deliveries", 30, async || {
        succeeded(&db.pool, &healthy_id).await == 20
    })
    .await;
    // Its slow share, the allowance's base or a quarter of the slots (the smaller), in slots.
    assert_eq!(hanging.received().len(), 8 + 2);
    running.stop().await;
}

/// An endpoint's grown allowance as `endpoint_health` shows it (`None`: the base).
async fn allowance(pool: &PgPool, project: Uuid, url: &str) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT allowance FROM fhir_outbox.endpoint_health
         WHERE project_id = $1 AND endpoint = fhir_outbox.endpoint_origin($2)",
    )
    .bind(project)
    .bind(url)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_endpoint_earns_a_larger_allowance_and_loses_it_at_its_first_slow_answer() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // 60 prompt answers, then answers that take 800 ms: slow for an allowance (more than a
    // quarter of `slow_request_after`), not yet slow requests.
    let mut script = vec![Reply::Status(200, None); 60];
    script.extend(vec![Reply::Stall(Duration::from_millis(800)); 40]);
    let receiver = Receiver::start(script).await;
    let subscription = subscribe(&db.pool, project, &receiver.url).await;
    let running = Running::start(
        &db.pool,
        DeliveryConfig {
            concurrency: 64,
            endpoint_allowance: EndpointAllowance { base: 2, max: 16 },
            slow_request_after: Duration::from_secs(2),
            ..fast_config()
        },
    );
    patients(&db.pool, project, 60).await;
    wait_for("the 60 prompt deliveries", 60, async || {
        succeeded(&db.pool, &subscription).await == 60
    })
    .await;
    // Each recorded batch of prompt answers doubled it, up to the max.
    assert_eq!(allowance(&db.pool, project, &receiver.url).await, Some(16));
    // The claim honours it: 16 slow requests are in flight at once, eight times the base.
    patients(&db.pool, project, 24).await;
    let in_flight = "SELECT count(*) FROM fhir_outbox.delivery WHERE subscription_id = $1 AND state = 'in_flight'";
    wait_for(
        "16 deliveries in flight to the grown endpoint",
        30,
        async || count(&db.pool, in_flight, &subscription).await == 16,
    )
    .await;
    // The first slow answers put it back to the base; once the requests claimed under the grown
    // allowance are answered, the rest go two at a time.
    wait_for("the allowance back to the base", 30, async || {
        allowance(&db.pool, project, &receiver.url).await.is_none()
    })
    .await;
    wait_for("the requests claimed before", 30, async || {
        count(&db.pool, in_flight, &subscription).await <= 2
    })
    .await;
    for _ in 0..1200 {
        if succeeded(&db.pool, &subscription).await == 84 {
            break;
        }
        assert!(count(&db.pool, in_flight, &subscription).await <= 2);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(succeeded(&db.pool, &subscription).await, 84);
    assert_eq!(allowance(&db.pool, project, &receiver.url).await, None);
    running.stop().await;
}

/// (state, openings, next probe) of an endpoint's circuit; closed when it has none.
async fn circuit(pool: &PgPool, project: Uuid, url: &str) -> (String, i32, Option<DateTime<Utc>>) {
    sqlx::query_as(
        "SELECT state, openings, next_probe_at FROM fhir_outbox.endpoint_health
         WHERE project_id = $1 AND endpoint = fhir_outbox.endpoint_origin($2)",
    )
    .bind(project)
    .bind(url)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_sends_nothing_before_its_probe_and_spends_no_attempts() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // Three failures open the circuit; the first probe fails too; the second succeeds.
    let receiver = Receiver::start(vec![Reply::Status(500, None); 4]).await;
    let subscription = subscribe(&db.pool, project, &receiver.url).await;
    let running = Running::start(
        &db.pool,
        DeliveryConfig {
            // One at a time, so that exactly `failures` requests go before the circuit opens.
            endpoint_allowance: EndpointAllowance::fixed(1),
            circuit: CircuitBreaker {
                failures: 3,
                cool_down: Duration::from_millis(800),
                max_cool_down: Duration::from_secs(5),
            },
            ..fast_config()
        },
    );
    patients(&db.pool, project, 10).await;
    // Every distinct (state, openings, next probe) the circuit goes through.
    let mut seen: Vec<(String, i32, Option<DateTime<Utc>>)> = Vec::new();
    wait_for("all ten deliveries", 60, async || {
        let now = circuit(&db.pool, project, &receiver.url).await;
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        succeeded(&db.pool, &subscription).await == 10
    })
    .await;
    running.stop().await;

    let opened: Vec<&(String, i32, Option<DateTime<Utc>>)> =
        seen.iter().filter(|(state, ..)| state == "open").collect();
    assert_eq!(opened.len(), 2, "opened, probed, opened again: {seen:?}");
    assert_eq!(opened[0].1, 1);
    assert_eq!(opened[1].1, 2, "{seen:?}");
    let first_probe = opened[0].2.unwrap();
    let second_probe = opened[1].2.unwrap();
    assert_eq!(circuit(&db.pool, project, &receiver.url).await.0, "closed");

    // Three requests, then nothing until the probe was due; the failed probe, then nothing until
    // the second one (after a longer cool-down); then the rest.
    let arrivals: Vec<DateTime<Utc>> = receiver.received().iter().map(|r| r.at).collect();
    assert_eq!(arrivals.len(), 3 + 1 + 10);
    assert!(arrivals[3] >= first_probe, "{arrivals:?} {seen:?}");
    assert!(arrivals[4] >= second_probe, "{arrivals:?} {seen:?}");
    assert!(
        second_probe - arrivals[3] > chrono::Duration::milliseconds(1200),
        "the second cool-down doubles the first (800 ms ± 20 %): {seen:?}"
    );
    // An open circuit spends no attempts: the failed deliveries were due again every 5 ms or so
    // (the test's backoff) through both cool-downs, yet the attempts are the 14 requests made (4
    // failures, 10 successes), and no delivery was given up.
    let (attempts, failed): (i64, i64) = sqlx::query_as(
        "SELECT sum(attempts), count(*) FILTER (WHERE state = 'failed')
         FROM fhir_outbox.delivery WHERE subscription_id = $1",
    )
    .bind(&subscription)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((attempts, failed), (14, 0));
}

/// How many requests `receiver` got before `at`.
fn received_before(receiver: &Receiver, at: DateTime<Utc>) -> usize {
    receiver
        .received()
        .iter()
        .filter(|request| request.at < at)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_with_a_big_backlog_does_not_starve_a_small_one() {
    let db = TestDb::new().await;
    let (big, small) = (db.project().await, db.project().await);
    let big_receiver = Receiver::start_with_latency(vec![], Duration::from_millis(20)).await;
    let small_receiver = Receiver::start_with_latency(vec![], Duration::from_millis(20)).await;
    subscribe(&db.pool, big, &big_receiver.url).await;
    subscribe(&db.pool, small, &small_receiver.url).await;
    // The big backlog is older: it would all go first in order of due time.
    patients(&db.pool, big, 200).await;
    patients(&db.pool, small, 10).await;
    dispatch_everything(&db.pool).await;
    let running = Running::start(
        &db.pool,
        DeliveryConfig {
            concurrency: 8,
            endpoint_allowance: EndpointAllowance::fixed(8),
            ..fast_config()
        },
    );
    wait_for("the small project's deliveries", 60, async || {
        small_receiver.received().len() == 10
    })
    .await;
    running.stop().await;
    // Projects take turns: the small project's ten went out among the first of the big one's.
    let last_small = small_receiver.received().last().unwrap().at;
    let big_before = received_before(&big_receiver, last_small);
    eprintln!("big project's deliveries before the small project's last: {big_before}");
    assert!(
        big_before <= 30,
        "{big_before} of the big project's deliveries went before the small project's last"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_endpoints_claimed_batch_does_not_stand_in_front_of_another_endpoint() {
    let db = TestDb::new().await;
    let (busy, quiet) = (db.project().await, db.project().await);
    // The busy endpoint holds its first request until the quiet endpoint's delivery exists, so
    // the test does not depend on how fast that change is dispatched; then answers in 0–200 ms.
    let release = Arc::new(tokio::sync::Notify::new());
    let busy_receiver = Receiver::start_with_latency(
        vec![Reply::Hold(release.clone())],
        Duration::from_millis(200),
    )
    .await;
    let quiet_receiver = Receiver::start(vec![]).await;
    subscribe(&db.pool, busy, &busy_receiver.url).await;
    let quiet_subscription = subscribe(&db.pool, quiet, &quiet_receiver.url).await;
    patients(&db.pool, busy, 60).await;
    dispatch_everything(&db.pool).await;
    // One request slot and a claim batch of 20: the first claim is all the busy endpoint's, and
    // 19 of them wait for the slot. The allowance does not bind, and the held request keeps its
    // slot (it is not moved aside as slow while the test waits).
    let running = Running::start(
        &db.pool,
        DeliveryConfig {
            concurrency: 1,
            claim_batch: 20,
            endpoint_allowance: EndpointAllowance::fixed(100),
            slow_request_after: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            ..fast_config()
        },
    );
    wait_for("the busy endpoint's first request", 30, async || {
        !busy_receiver.received().is_empty()
    })
    .await;
    patients(&db.pool, quiet, 1).await;
    let dispatched = "SELECT count(*) FROM fhir_outbox.delivery WHERE subscription_id = $1";
    wait_for(
        "the quiet endpoint's delivery to be dispatched",
        30,
        async || count(&db.pool, dispatched, &quiet_subscription).await == 1,
    )
    .await;
    release.notify_one();
    wait_for("the quiet endpoint's delivery", 30, async || {
        quiet_receiver.received().len() == 1
    })
    .await;
    running.stop().await;
    // It is claimed with the next claim (when fewer than half the first batch wait) and takes the
    // next free slot: 8–10 of the busy endpoint's requests go before it, also with both cores
    // busy. A claimer that waits for its queue to empty gives 17 (tried), order of claim 20. The
    // bound leaves the claim about three requests (~300 ms) on a loaded machine.
    let busy_before = received_before(&busy_receiver, quiet_receiver.received()[0].at);
    eprintln!("busy endpoint's requests before the quiet endpoint's: {busy_before}");
    assert!(
        busy_before <= 13,
        "{busy_before} of the busy endpoint's requests went before the quiet endpoint's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_an_open_circuit_and_reset_it() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(503, None); 2]).await;
    // A token in the endpoint: no log line or table may show it.
    let url = format!("{}?token=URL-SECRET-77", receiver.url);
    let subscription = subscribe(&db.pool, project, &url).await;
    let worker = crate::common::binary()
        .args([
            "run",
            "--database-url",
            &db.url,
            "--allow-unsafe-outbound",
            "--admin-addr",
            "off",
            "--retry-base-ms",
            "10",
            "--endpoint-concurrency",
            "1",
            "--circuit-failures",
            "2",
            // Far beyond the test: only the reset can close it.
            "--circuit-cool-down-ms",
            "3600000",
            "--circuit-max-cool-down-ms",
            "3600000",
            "--log-format",
            "json",
        ])
        .env("FHIR_OUTBOX_LOG", "fhir_outbox=info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    patients(&db.pool, project, 3).await;
    wait_for("the circuit to open", 60, async || {
        circuit(&db.pool, project, &url).await.0 == "open"
    })
    .await;
    let project_arg = project.to_string();
    let (ok, text) = crate::common::cli(&[
        "endpoints",
        "--database-url",
        &db.url,
        "--project",
        &project_arg,
    ]);
    assert!(ok, "{text}");
    let origin = receiver.url.trim_end_matches("/hook");
    assert!(text.contains(origin) && text.contains("open"), "{text}");
    assert!(text.contains("Received status 503"), "{text}");
    let (ok, text) = crate::common::cli(&["status", "--database-url", &db.url]);
    assert!(ok, "{text}");
    assert!(
        text.contains("Endpoints failing or with an open circuit"),
        "{text}"
    );
    assert!(!text.contains("URL-SECRET-77"), "{text}");
    // Nothing goes out while it is open.
    assert_eq!(receiver.received().len(), 2);

    // An endpoint the project does not use is an error that says what endpoints are.
    let (ok, text) = crate::common::cli(&[
        "reset-endpoint",
        "--database-url",
        &db.url,
        "--project",
        &project_arg,
        "--endpoint",
        "https://elsewhere.example/hook",
    ]);
    assert!(!ok);
    assert!(
        text.contains("no subscription of this project delivers to"),
        "{text}"
    );
    // Any URL on the endpoint names it.
    let (ok, text) = crate::common::cli(&[
        "reset-endpoint",
        "--database-url",
        &db.url,
        "--project",
        &project_arg,
        "--endpoint",
        &url,
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("Circuit closed"), "{text}");
    wait_for("the waiting deliveries", 60, async || {
        succeeded(&db.pool, &subscription).await == 3
    })
    .await;

    let logs = crate::common::stop_and_read_logs(worker);
    assert!(!logs.contains("URL-SECRET-77"), "{logs}");
    let opened: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|line: &serde_json::Value| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("endpoint circuit opened"))
        })
        .collect();
    assert_eq!(opened.len(), 1, "{logs}");
    assert_eq!(opened[0]["fields"]["endpoint"], origin);
    assert_eq!(opened[0]["level"], "WARN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_busy_subscription_gets_its_turn_when_there_are_more_than_a_claim_visits() {
    use fhir_outbox::capture::{self, WriteContext};
    let db = TestDb::new().await;
    let project = db.project().await;
    let busy = Receiver::start(vec![]).await;
    let last = Receiver::start(vec![]).await;
    let put = async |id: &str, url: &str, criteria: &str| {
        let mut subscription = hook(url, criteria);
        subscription["id"] = json!(id);
        capture::update(
            &db.pool,
            project,
            "Subscription",
            id,
            &subscription,
            None,
            &WriteContext::default(),
        )
        .await
        .unwrap();
    };
    // Ten subscriptions with a big backlog come first in the claim's order; the last one, with a
    // single delivery, comes after them all.
    for n in 0..10 {
        put(&format!("a{n:02}"), &busy.url, "Patient").await;
    }
    put("zzz", &last.url, "Observation").await;
    patients(&db.pool, project, 50).await;
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Observation", "status": "final",
                 "code": { "text": "x" } }),
        None,
    )
    .await;
    dispatch_everything(&db.pool).await;
    // A claim of 4 visits 8 subscriptions: fewer than there are busy.
    let running = Running::start(
        &db.pool,
        DeliveryConfig {
            concurrency: 4,
            claim_batch: 4,
            ..fast_config()
        },
    );
    wait_for("the last subscription's delivery", 60, async || {
        last.received().len() == 1
    })
    .await;
    running.stop().await;
    let before = busy
        .received()
        .iter()
        .filter(|request| request.at < last.received()[0].at)
        .count();
    eprintln!("deliveries of the busy subscriptions before the last one's: {before}");
    assert!(
        before <= 50,
        "{before} of the 500 other deliveries went first: the round did not reach the last subscription"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_deliveries_without_a_free_slot_go_back_to_the_table() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let hanging = Receiver::start(vec![Reply::Stall(Duration::from_secs(3600)); 10]).await;
    let subscription = subscribe(&db.pool, project, &hanging.url).await;
    // One slot, held by the first request for good; the endpoint's allowance does not bind.
    let running = Running::start(
        &db.pool,
        DeliveryConfig {
            concurrency: 1,
            endpoint_allowance: EndpointAllowance::fixed(100),
            request_timeout: Duration::from_secs(3600),
            // Never moved to a slow-request place: the slot stays held.
            slow_request_after: Duration::from_secs(3600),
            shutdown_grace: Duration::from_millis(100),
            ..fast_config()
        },
    );
    patients(&db.pool, project, 5).await;
    wait_for("the first request", 30, async || {
        hanging.received().len() == 1
    })
    .await;
    // Long enough for the others to be claimed, wait for the slot, and go back more than once.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let first = hanging.received()[0].at;
    let (attempted, most_claims, given_back): (i64, i32, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts > 0), max(claims),
                count(*) FILTER (WHERE next_attempt_at >= $2)
         FROM fhir_outbox.delivery WHERE subscription_id = $1",
    )
    .bind(&subscription)
    .bind(first + chrono::Duration::milliseconds(900))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    running.stop().await;
    assert_eq!(hanging.received().len(), 1);
    assert_eq!(
        attempted, 0,
        "nothing was attempted but the hanging request"
    );
    // The four others went back to the table (due again when given back, a second or more after
    // they were claimed), unattempted, and their claims were undone each time.
    assert_eq!(given_back, 4);
    assert_eq!(most_claims, 1);
}
