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

/// The worker stores its AuditEvents with a plain insert of their stored form
/// (`audit::StoredAuditEvent`), made in Rust by the rules `fhir_outbox.create_audit_events` applies
/// in SQL. This keeps the two from drifting apart: the same event, with null and empty elements at
/// several depths and a `meta` of its own, is stored both ways and read back alike, but for the id
/// and the time each was given.
#[tokio::test]
async fn the_worker_stores_audit_events_as_create_audit_events_does() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let event = json!({
        "resourceType": "AuditEvent",
        "type": { "code": "transmit", "display": "" },
        "meta": { "author": { "reference": "Practitioner/x" }, "versionId": "7", "tag": [{ "code": "t" }], "security": [] },
        "agent": [{ "type": { "text": "Subscription" }, "requestor": false, "who": null }, {}, null],
        "entity": [{ "what": { "reference": "Patient/p1", "display": null }, "detail": [{ "type": "", "valueString": "" }] }],
        "period": { "start": "2026-12-03T04:00:00.000Z", "end": null },
        "outcome": "0",
        "outcomeDesc": "",
        "extension": [],
        "source": { "observer": {} }
    });
    let at = chrono::Utc::now();
    let made = fhir_outbox::audit::StoredAuditEvent::new(event.clone(), project, at);
    sqlx::query(
        "INSERT INTO fhir_outbox.audit_event (project_id, id, recorded_at, content) VALUES ($1, $2, $3, $4::jsonb)",
    )
    .bind(project)
    .bind(&made.id)
    .bind(made.recorded_at)
    .bind(&made.content)
    .execute(&db.pool)
    .await
    .unwrap();
    let by_sql: String = sqlx::query_scalar(
        "SELECT audit_event_id FROM fhir_outbox.create_audit_events(ARRAY[$1::uuid], ARRAY[$2::jsonb])",
    )
    .bind(project)
    .bind(&event)
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let ours = capture::read(&db.pool, project, "AuditEvent", &made.id)
        .await
        .unwrap();
    let made_content: serde_json::Value = serde_json::from_str(&made.content).unwrap();
    assert_eq!(ours, made_content, "read back as it was made");
    let theirs = capture::read(&db.pool, project, "AuditEvent", &by_sql)
        .await
        .unwrap();
    let vread = capture::vread(&db.pool, project, "AuditEvent", &made.id, 1)
        .await
        .unwrap();
    assert_eq!(vread, ours);

    let without_id_and_time = |mut content: serde_json::Value| {
        let object = content.as_object_mut().unwrap();
        object.remove("id");
        object["meta"]
            .as_object_mut()
            .unwrap()
            .remove("lastUpdated");
        content
    };
    assert_eq!(
        without_id_and_time(ours.clone()),
        without_id_and_time(theirs.clone())
    );
    assert_eq!(
        ours["entity"],
        json!([{ "what": { "reference": "Patient/p1" }, "detail": [{}] }]),
        "array items are kept, their empty members dropped"
    );
    assert_eq!(
        ours["agent"],
        json!([{ "type": { "text": "Subscription" }, "requestor": false }, {}, null])
    );
    assert!(ours.get("outcomeDesc").is_none() && ours.get("extension").is_none());
    assert_eq!(
        ours["meta"],
        json!({ "versionId": "1", "project": project.to_string(), "tag": [{ "code": "t" }],
                "lastUpdated": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true) })
    );
    // Both ids are UUIDv7 of their time: the first 48 bits are its milliseconds.
    for (id, content) in [(&made.id, &ours), (&by_sql, &theirs)] {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(uuid.get_version_num(), 7, "{id}");
        let millis = u64::from_str_radix(&uuid.simple().to_string()[..12], 16).unwrap();
        let updated =
            chrono::DateTime::parse_from_rfc3339(content["meta"]["lastUpdated"].as_str().unwrap())
                .unwrap();
        assert_eq!(millis as i64, updated.timestamp_millis(), "{id}");
    }
}
