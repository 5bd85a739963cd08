//! The pipeline assembled by the library (`Pipeline::builder`): what `fhir-outbox run`, the example
//! and embedding applications start.

use crate::common::{TestDb, empty_database_url};
use crate::delivery::{create, fast_config, hook};
use crate::receiver::Receiver;
use fhir_outbox::db;
use fhir_outbox::dispatch::DispatchConfig;
use fhir_outbox::operations::retention::Retention;
use fhir_outbox::pipeline::{Pipeline, PipelineError};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_pipeline_delivers_and_stops_cleanly() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let running = Pipeline::builder(db.pool.clone())
        .dispatch(DispatchConfig {
            allow_unsafe_outbound: true,
            ..DispatchConfig::default()
        })
        .delivery(fast_config())
        .retention(
            Retention {
                deliveries: Duration::from_secs(3600),
                audit_events: None,
            },
            Duration::from_secs(60),
        )
        .start()
        .await
        .unwrap();
    assert_eq!(running.admin_address(), None);
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let started = Instant::now();
    while receiver.received().is_empty() && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receiver.received().len(), 1);
    running.shutdown().await;
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_outbox.delivery WHERE state IN ('pending', 'in_flight')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(open, 0, "shutdown recorded what finished");
}

#[tokio::test]
async fn a_pipeline_refuses_to_start_on_an_unmigrated_database() {
    let pool = db::connect(&empty_database_url().await, 2).await.unwrap();
    let refused = Pipeline::builder(pool)
        .dispatch(DispatchConfig::default())
        .start()
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(refused, PipelineError::SchemaOutdated),
        "{refused}"
    );
    assert!(refused.to_string().contains("fhir-outbox migrate"));
}
