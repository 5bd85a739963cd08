//! The application AuditEvent library against a real store: recorded events are stored in their
//! project and, being AuditEvents, are never captured for subscriptions.

use crate::common::{TestDb, outbox_count, version_count};
use fhir_outbox::audit::Outcome;
use fhir_outbox::audit::application::{self, RestInteraction};
use fhir_outbox::capture::{self, StoreError, WriteContext};
use serde_json::json;

#[tokio::test]
async fn recorded_rest_event_is_stored_in_its_project_without_an_outbox_row() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let event = application::rest_event(
        RestInteraction::Read,
        "https://fhir.example.com/",
        Outcome::Success,
    )
    .who(json!({ "reference": "Practitioner/pr1", "display": "Alice Smith" }))
    .remote_address("203.0.113.7")
    .resource(&json!({ "reference": "Patient/p1", "display": "Peter Chalmers" }))
    .tracing("req-1", "trace-1")
    .duration(std::time::Duration::from_millis(7))
    .redact(application::redaction_enabled(
        false,
        &json!({ "redactAuditEvents": true }),
    ))
    .build();

    let mut tx = db.pool.begin().await.unwrap();
    let stored = application::record(&mut *tx, project, &event, &WriteContext::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let id = stored["id"].as_str().unwrap();
    assert_eq!(stored["meta"]["project"], project.to_string());
    assert_eq!(stored["meta"]["versionId"], "1");
    let read = capture::read(&db.pool, project, "AuditEvent", id)
        .await
        .unwrap();
    assert_eq!(read, stored);
    assert_eq!(read["subtype"][0]["code"], "read");
    assert_eq!(read["action"], "R");
    assert_eq!(
        read["entity"],
        json!([{ "what": { "reference": "Patient/p1" } }])
    );
    assert_eq!(read["agent"][0]["network"]["address"], "203.0.113.7");
    assert_eq!(version_count(&db.pool, project).await, 1);
    assert_eq!(outbox_count(&db.pool, project).await, 0);

    // Only AuditEvents: a Patient through `record` would be a captured change.
    let refused = application::record(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        &WriteContext::default(),
    )
    .await;
    assert!(matches!(refused, Err(StoreError::InvalidResource(_))));
    assert_eq!(version_count(&db.pool, project).await, 1);
    assert_eq!(outbox_count(&db.pool, project).await, 0);
}
