//! Logs: every line about a delivery carries its ids; secrets, credentials and bodies never appear.

use crate::common::TestDb;
use crate::delivery::{create, hook, states, with_extensions};
use crate::receiver::{Receiver, Reply};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_logs_carry_ids_and_never_secrets_or_bodies() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // A dropped connection: its error would carry the URL (and its token) if we did not strip it.
    let receiver = Receiver::start(vec![Reply::Drop]).await;
    let mut sub = with_extensions(
        hook(
            &format!("{}?token=QUERY-SECRET-77", receiver.url),
            "Patient",
        ),
        json!([{ "url": "https://www.medplum.com/fhir/StructureDefinition/subscription-secret", "valueString": "HMAC-SECRET-42" }]),
    );
    sub["channel"]["header"] = json!(["Authorization: Bearer HEADER-TOKEN-99"]);
    let sub = create(&db.pool, project, &sub, None).await;
    let trace = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736";
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "name": [{ "family": "BODY-MARKER-Chalmers" }] }),
        Some(trace),
    )
    .await;

    let worker = crate::common::binary()
        .args([
            "run",
            "--database-url",
            &db.url,
            "--allow-unsafe-outbound",
            "--retry-base-ms",
            "20",
            "--retry-cap-ms",
            "50",
            "--log-format",
            "json",
        ])
        .env("FHIR_OUTBOX_LOG", "fhir_outbox=trace,info")
        .env("FHIR_OUTBOX_ADMIN_ADDR", "off")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if states(&db.pool, &sub)
            .await
            .first()
            .is_some_and(|s| s.0 == "succeeded")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = crate::common::stop_and_read_logs(worker);
    assert_eq!(states(&db.pool, &sub).await[0].0, "succeeded");

    let recorded: String = sqlx::query_scalar(
        "SELECT coalesce(string_agg(coalesce(a.error, '') || ' ' || coalesce(d.reason, ''), ' '), '')
         FROM fhir_outbox.delivery_attempt a JOIN fhir_outbox.delivery d ON d.id = a.delivery_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(recorded.contains("error sending request"), "{recorded}");
    for secret in [
        "HMAC-SECRET-42",
        "HEADER-TOKEN-99",
        "QUERY-SECRET-77",
        "BODY-MARKER",
        "Bearer",
    ] {
        assert!(
            !recorded.contains(secret),
            "`{secret}` leaked into the attempt log: {recorded}"
        );
        assert!(
            !logs.contains(secret),
            "`{secret}` leaked into the logs:\n{logs}"
        );
    }
    let attempts = crate::common::json_log_lines(&logs, |m| m == "rest-hook attempt");
    assert_eq!(attempts.len(), 2, "{logs}");
    for line in &attempts {
        let span = &line["span"];
        assert_eq!(span["subscription"], sub["id"], "{line}");
        assert_eq!(span["trace_id"], trace, "{line}");
        for field in ["resource", "version", "attempt", "request_id", "delivery"] {
            assert!(span.get(field).is_some(), "{field} missing in {line}");
        }
    }
}

/// A delivery the preamble stops (here: its resource has no row at all) is logged with its reason
/// and its ids, as its row records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_stopped_before_any_request_is_logged_with_its_reason() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let sub = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    crate::common::ghost_change(&db.pool, project, "ghost").await;

    let worker = crate::common::binary()
        .args([
            "run",
            "--database-url",
            &db.url,
            "--allow-unsafe-outbound",
            "--log-format",
            "json",
        ])
        // The default filter: the line is written without asking for more.
        .env_remove("FHIR_OUTBOX_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        let rows = states(&db.pool, &sub).await;
        if rows.first().is_some_and(|row| row.0 == "skipped") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = crate::common::stop_and_read_logs(worker);
    let rows = states(&db.pool, &sub).await;
    assert_eq!(rows[0].0, "skipped", "{rows:?}");
    let reason = rows[0].2.clone().unwrap();
    let stops = crate::common::json_log_lines(&logs, |m| m == "delivery skipped, nothing sent");
    assert_eq!(stops.len(), 1, "{logs}");
    assert_eq!(stops[0]["fields"]["reason"], reason.as_str(), "{logs}");
    assert_eq!(stops[0]["span"]["subscription"], sub["id"]);
    assert_eq!(stops[0]["span"]["resource"], "Patient/ghost");
    assert_eq!(stops[0]["span"]["trace_id"], crate::common::GHOST_TRACE);
    assert!(receiver.received().is_empty());
}
