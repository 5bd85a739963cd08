//! Retry timing: a retry goes out when it is due, not on the worker's next poll; a delivery that is
//! given up says so once in the log.

use crate::common::TestDb;
use crate::delivery::{create, hook, states};
use crate::receiver::{Receiver, Reply};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How late after its `next_attempt_at` a retry may arrive: far below the poll interval (1 s) that
/// retries waited for before, with room for a machine busy running the other tests.
const ON_TIME: Duration = Duration::from_millis(200);

/// (attempts made, when the next one is due), as the delivery row said.
type Due = (i32, DateTime<Utc>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_out_when_due_and_a_final_failure_is_logged_once() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None); 4]).await;
    // A token in the endpoint: the final-failure line must not show it.
    let sub = create(
        &db.pool,
        project,
        &hook(&format!("{}?token=URL-SECRET-31", receiver.url), "Patient"),
        None,
    )
    .await;
    let sub_id = sub["id"].as_str().unwrap().to_owned();

    let worker = crate::common::binary()
        .args([
            "run",
            "--database-url",
            &db.url,
            "--allow-unsafe-outbound",
            "--retry-base-ms",
            "300",
            "--retry-cap-ms",
            "10000",
            "--log-format",
            "json",
        ])
        // Only warnings: the final-failure line must stand on its own.
        .env("FHIR_OUTBOX_LOG", "fhir_outbox=warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Watches the row: after attempt n fails it is pending with the n+1th attempt's due time.
    let due: Arc<Mutex<Vec<Due>>> = Arc::default();
    let watcher = {
        let (pool, due, sub_id) = (db.pool.clone(), due.clone(), sub_id.clone());
        tokio::spawn(async move {
            loop {
                let row: Option<Due> = sqlx::query_as(
                    "SELECT attempts, next_attempt_at FROM fhir_outbox.delivery
                     WHERE subscription_id = $1 AND state = 'pending' AND attempts > 0",
                )
                .bind(&sub_id)
                .fetch_optional(&pool)
                .await
                .unwrap();
                if let Some(row) = row {
                    let mut due = due.lock().unwrap();
                    if !due.contains(&row) {
                        due.push(row);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    for _ in 0..200 {
        if states(&db.pool, &sub)
            .await
            .first()
            .is_some_and(|s| s.0 == "failed")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    let logs = crate::common::stop_and_read_logs(worker);

    let state = states(&db.pool, &sub).await;
    assert_eq!(
        (state[0].0.as_str(), state[0].1),
        ("failed", 4),
        "{state:?}"
    );
    let received = receiver.received();
    assert_eq!(received.len(), 4, "four attempts (the default)");

    // Gaps between attempts: base × 2^(n−1) with its ±10 % jitter, plus at most ON_TIME.
    let gaps: Vec<f64> = received
        .windows(2)
        .map(|pair| (pair[1].at - pair[0].at).as_seconds_f64())
        .collect();
    eprintln!("gaps between attempts (s): {gaps:?}");
    for (gap, nominal) in gaps.iter().zip([0.3, 0.6, 1.2]) {
        assert!(
            *gap >= nominal * 0.9 - ON_TIME.as_secs_f64()
                && *gap <= nominal * 1.1 + ON_TIME.as_secs_f64(),
            "gap {gap} s for a nominal {nominal} s: {gaps:?}"
        );
    }
    // And each retry arrived within ON_TIME after the time its row said it was due.
    let due = due.lock().unwrap().clone();
    assert_eq!(
        due.iter()
            .map(|(attempts, _)| *attempts)
            .collect::<Vec<_>>(),
        [1, 2, 3],
        "{due:?}"
    );
    let late: Vec<f64> = due
        .iter()
        .map(|(attempts, at)| (received[*attempts as usize].at - *at).as_seconds_f64())
        .collect();
    eprintln!("arrival after next_attempt_at (s): {late:?}");
    for late in &late {
        assert!(
            (-0.002..=ON_TIME.as_secs_f64()).contains(late),
            "a retry arrived {late} s after it was due: {due:?}"
        );
    }

    // The final failure: one warn line with what an operator needs, and never the endpoint.
    let given_up =
        crate::common::json_log_lines(&logs, |m| m.starts_with("delivery failed for good"));
    assert_eq!(given_up.len(), 1, "{logs}");
    let line = &given_up[0];
    assert_eq!(line["level"], "WARN", "{line}");
    let fields = &line["fields"];
    assert_eq!(
        fields["webhook_id"].as_str(),
        received[0].header("webhook-id"),
        "{line}"
    );
    assert_eq!(fields["subscription"], sub_id, "{line}");
    assert_eq!(fields["attempts"], 4, "{line}");
    assert_eq!(fields["last_status"], 500, "{line}");
    assert!(fields["delivery"].is_i64(), "{line}");
    assert!(
        fields["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("exhausted 4 attempts")),
        "{line}"
    );
    assert!(!logs.contains("URL-SECRET-31"), "{logs}");
    assert!(!logs.contains(&receiver.url), "{logs}");
}
