//! The admin endpoint of `fhir-outbox run`: metrics that move, health, readiness.

use crate::common::TestDb;
use crate::delivery::{create, hook};
use crate::receiver::{Receiver, Reply};
use serde_json::json;
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `fhir-outbox run` on `database_url` with `args`, its admin endpoint on a free port.
fn run_with_admin(database_url: &str, args: &[&str]) -> (std::process::Child, u16) {
    let port = free_port();
    let worker = crate::common::binary()
        .args([
            "run",
            "--database-url",
            database_url,
            "--allow-unsafe-outbound",
        ])
        .args(args)
        .env("FHIR_OUTBOX_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    (worker, port)
}

/// The value of an unlabelled metric, or of one with `label`, in Prometheus text.
fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter(|line| label.is_none_or(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_readiness_reports_the_schema() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None)]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let (mut worker, port) =
        run_with_admin(&db.url, &["--retry-base-ms", "50", "--retry-cap-ms", "100"]);
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let get = |path: &str| {
        let request = client.get(format!("{base}{path}"));
        async move {
            let response = request.send().await.ok()?;
            let status = response.status().as_u16();
            Some((status, response.text().await.ok()?))
        }
    };
    let mut up = false;
    for _ in 0..100 {
        if get("/healthz").await.is_some() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the admin endpoint answers");
    assert_eq!(get("/readyz").await.unwrap(), (200, "ready\n".to_owned()));

    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let mut text = String::new();
    for _ in 0..100 {
        text = get("/metrics").await.unwrap().1;
        if metric(
            &text,
            "fhir_outbox_delivery_attempts_total",
            Some("succeeded"),
        ) >= 1.0
            && metric(
                &text,
                "fhir_outbox_subscription_total_duration_seconds_count",
                None,
            ) >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(
            &text,
            "fhir_outbox_delivery_attempts_total",
            Some("outcome=\"failed\"")
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "fhir_outbox_delivery_attempts_total",
            Some("outcome=\"succeeded\"")
        ),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, "fhir_outbox_dispatched_changes_total", None) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("fhir_outbox_subscription_rest_hook_fetch_duration_seconds"),
        "{text}"
    );
    // The latency metrics are histograms (aggregatable across workers), with buckets for webhooks.
    for name in [
        "fhir_outbox_subscription_queued_duration_seconds",
        "fhir_outbox_subscription_execution_duration_seconds",
        "fhir_outbox_subscription_total_duration_seconds",
        "fhir_outbox_subscription_failed_execution_duration_seconds",
        "fhir_outbox_subscription_rest_hook_fetch_duration_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name} is a histogram: {text}"
        );
        for le in ["0.005", "120", "+Inf"] {
            assert!(
                text.contains(&format!("{name}_bucket{{le=\"{le}\"}}")),
                "{name} has the bucket le={le}: {text}"
            );
        }
        assert!(
            metric(&text, &format!("{name}_count"), None) >= 1.0,
            "{text}"
        );
    }
    assert!(!text.contains("quantile="), "no summaries: {text}");
    assert!(
        !text.contains(&project.to_string()),
        "no tenant appears in metrics"
    );

    // The schema falls behind: not ready.
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
        .execute(&db.pool)
        .await
        .unwrap();
    let (status, body) = get("/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("not up to date"), "{body}");

    crate::common::sigterm(&worker);
    assert!(worker.wait().unwrap().success());
}

/// Heartbeats show in the metrics: a flat `fhir_outbox_heartbeats_queued_total` while subscriptions
/// have periods is what an operator alerts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_heartbeats_are_counted_in_the_metrics() {
    use crate::topics::{BACKPORT, encounter_complete_topic, topic_subscription};
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    let mut subscription = topic_subscription(&receiver.url, "active", "empty", &[]);
    subscription["channel"]["extension"] = json!([{
        "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": 1
    }]);
    create(&db.pool, project, &subscription, None).await;
    let (worker, port) = run_with_admin(&db.url, &[]);
    let text = stop_once_counted(worker, port, "fhir_outbox_heartbeats_queued_total", 2.0).await;
    assert_eq!(
        metric(&text, "fhir_outbox_heartbeat_check_failures_total", None),
        0.0
    );
    // One heartbeat is queued only when the one before it has finished.
    assert!(!receiver.received().is_empty(), "the heartbeats were sent");
}

/// Scrapes `/metrics` on `port` every 100 ms until counter `name` reaches `at_least` (15 s at
/// most), stops `worker` (SIGTERM: a clean exit), asserts the counter got there; the last scrape.
async fn stop_once_counted(
    mut worker: std::process::Child,
    port: u16,
    name: &str,
    at_least: f64,
) -> String {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut text = String::new();
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        else {
            continue;
        };
        text = response.text().await.unwrap();
        if metric(&text, name, None) >= at_least {
            break;
        }
    }
    crate::common::sigterm(&worker);
    assert!(worker.wait().unwrap().success());
    assert!(metric(&text, name, None) >= at_least, "{name}: {text}");
    text
}

/// A delivery that found no request slot within 1 s went back to the table: operators see it in
/// `fhir_outbox_deliveries_given_back_total` (every slot held by slower requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_given_back_without_a_slot_are_counted() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Stall(Duration::from_secs(3600)); 10]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    for _ in 0..3 {
        let patient = json!({ "resourceType": "Patient" });
        create(&db.pool, project, &patient, None).await;
    }
    // One slot, held by the first request for good (never moved out as slow).
    let (worker, port) = run_with_admin(
        &db.url,
        &[
            "--delivery-concurrency",
            "1",
            "--slow-request-ms",
            "3600000",
            "--shutdown-grace-seconds",
            "0",
        ],
    );
    stop_once_counted(worker, port, "fhir_outbox_deliveries_given_back_total", 2.0).await;
    assert_eq!(receiver.received().len(), 1, "only the first was sent");
}
