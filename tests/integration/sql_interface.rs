//! The documented SQL interface, used the way another application would: through `psql`.

use crate::common::{TestDb, outbox_count, version_count};
use fhir_outbox::capture;

#[tokio::test]
async fn psql_writes_are_captured_exactly_once_and_not_on_rollback() {
    let db = TestDb::new().await;
    let project = db.project().await;

    let id = db
        .psql(&format!(
            "BEGIN;
             SELECT resource ->> 'id' FROM fhir_outbox.create_resource('{project}', '{{\"resourceType\": \"Patient\", \"active\": true}}');
             COMMIT;"
        ))
        .unwrap();
    assert_eq!(outbox_count(&db.pool, project).await, 1);

    db.psql(&format!(
        "BEGIN;
         SELECT fhir_outbox.create_resource('{project}', '{{\"resourceType\": \"Patient\"}}');
         SELECT fhir_outbox.update_resource('{project}', 'Patient', '{id}', '{{\"resourceType\": \"Patient\", \"id\": \"{id}\", \"active\": false}}');
         ROLLBACK;"
    ))
    .unwrap();
    assert_eq!(outbox_count(&db.pool, project).await, 1);
    assert_eq!(version_count(&db.pool, project).await, 1);

    // A no-op update through SQL reports `unchanged` and captures nothing.
    let outcome = db
        .psql(&format!(
            "SELECT outcome FROM fhir_outbox.update_resource('{project}', 'Patient', '{id}', '{{\"resourceType\": \"Patient\", \"id\": \"{id}\", \"active\": true}}')"
        ))
        .unwrap();
    assert_eq!(outcome, "unchanged");

    let outcome = db
        .psql(&format!(
            "SELECT outcome || ' ' || version_id FROM fhir_outbox.update_resource('{project}', 'Patient', '{id}',
                 '{{\"resourceType\": \"Patient\", \"id\": \"{id}\", \"active\": false}}', p_if_match => 1,
                 p_trace_id => '4bf92f35-77b3-4da6-a3ce-929d0e0e4736')"
        ))
        .unwrap();
    assert_eq!(outcome, "updated 2");
    let outcome = db
        .psql(&format!(
            "SELECT outcome FROM fhir_outbox.delete_resource('{project}', 'Patient', '{id}')"
        ))
        .unwrap();
    assert_eq!(outcome, "deleted");

    // What psql wrote, the Rust API reads, and the outbox holds the same rows either way.
    let changes = capture::changes_since(&db.pool, project, 0, 10)
        .await
        .unwrap();
    let summary: Vec<_> = changes
        .iter()
        .map(|c| (c.interaction.as_str(), c.version_id, c.previous_version_id))
        .collect();
    assert_eq!(
        summary,
        [
            ("create", 1, None),
            ("update", 2, Some(1)),
            ("delete", 3, Some(2))
        ]
    );
    assert_eq!(changes[1].trace_id, "4bf92f35-77b3-4da6-a3ce-929d0e0e4736");
    let history = capture::history(&db.pool, project, "Patient", &id)
        .await
        .unwrap();
    assert_eq!(history.len(), 3);
}

#[tokio::test]
async fn psql_gets_the_same_errors() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let error = db
        .psql(&format!(
            "SELECT fhir_outbox.create_resource('{project}', '{{\"resourceType\": \"Nope\"}}')"
        ))
        .unwrap_err();
    assert!(error.contains("unknown resourceType \"Nope\""), "{error}");
    let error = db
        .psql(&format!(
            "SELECT fhir_outbox.update_resource('{project}', 'Patient', 'a', '{{\"resourceType\": \"Patient\", \"id\": \"a\"}}', p_if_match => 3)"
        ))
        .unwrap_err();
    assert!(error.contains("version conflict"), "{error}");
    // Versions are immutable even for a writer with table access.
    db.psql(&format!(
        "SELECT fhir_outbox.create_resource('{project}', '{{\"resourceType\": \"Patient\"}}')"
    ))
    .unwrap();
    let error = db
        .psql("UPDATE fhir_outbox.resource_version SET content = '{}'")
        .unwrap_err();
    assert!(error.contains("immutable"), "{error}");
    assert_eq!(outbox_count(&db.pool, project).await, 1);
}
