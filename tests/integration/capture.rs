//! The store and its capture guarantee through the Rust API.

use crate::common::{TestDb, outbox_count, version_count};
use fhir_outbox::capture::{self, DeleteOutcome, StoreError, WriteContext, WriteOutcome};
use serde_json::{Value, json};
use uuid::Uuid;

fn patient(family: &str) -> Value {
    json!({ "resourceType": "Patient", "name": [{ "family": family }] })
}

fn with_id(mut resource: Value, id: &str) -> Value {
    resource["id"] = json!(id);
    resource
}

/// `capture::update` on the test database with the default context.
async fn put(
    db: &TestDb,
    project: Uuid,
    resource_type: &str,
    id: &str,
    resource: &Value,
    if_match: Option<i64>,
) -> Result<capture::Written, StoreError> {
    capture::update(
        &db.pool,
        project,
        resource_type,
        id,
        resource,
        if_match,
        &WriteContext::default(),
    )
    .await
}

#[tokio::test]
async fn each_committed_change_is_captured_once_with_its_versions() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let context = WriteContext {
        author: Some("Practitioner/1".into()),
        request_id: Some("req-1".into()),
        trace_id: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    };

    let created = capture::create(&db.pool, project, &patient("A"), &context)
        .await
        .unwrap();
    assert_eq!(created.outcome, WriteOutcome::Created);
    assert_eq!(created.version_id, 1);
    let id = created.resource["id"].as_str().unwrap().to_owned();
    let updated = capture::update(
        &db.pool,
        project,
        "Patient",
        &id,
        &with_id(patient("B"), &id),
        Some(1),
        &context,
    )
    .await
    .unwrap();
    assert_eq!(updated.outcome, WriteOutcome::Updated);
    assert_eq!(updated.version_id, 2);
    let deleted = capture::delete(&db.pool, project, "Patient", &id, &context)
        .await
        .unwrap();
    assert_eq!(deleted.outcome, DeleteOutcome::Deleted);
    assert_eq!(deleted.version_id, 3);

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
    for change in &changes {
        assert_eq!(change.project_id, project);
        assert_eq!(change.resource_type, "Patient");
        assert_eq!(change.resource_id, id);
        assert_eq!(change.request_id, "req-1");
        assert_eq!(change.trace_id, context.trace_id.clone().unwrap());
    }
    assert!(changes[0].changed_at <= changes[1].changed_at);

    // Without ids, each write gets its own random UUIDs.
    for _ in 0..2 {
        capture::create(&db.pool, project, &patient("C"), &WriteContext::default())
            .await
            .unwrap();
    }
    let generated = &capture::changes_since(&db.pool, project, changes[2].seq, 10)
        .await
        .unwrap();
    assert_eq!(generated.len(), 2);
    for change in generated {
        assert!(Uuid::parse_str(&change.request_id).is_ok(), "{change:?}");
        assert!(Uuid::parse_str(&change.trace_id).is_ok(), "{change:?}");
        assert_ne!(change.request_id, change.trace_id);
    }
    assert_ne!(generated[0].request_id, generated[1].request_id);
    assert_ne!(generated[0].trace_id, generated[1].trace_id);
}

#[tokio::test]
async fn the_store_sets_meta_and_ignores_the_callers() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let claimed = json!({
        "resourceType": "Patient",
        "id": "chosen-by-client",
        "meta": {
            "versionId": "99", "lastUpdated": "1999-01-01T00:00:00Z",
            "project": Uuid::new_v4().to_string(), "author": { "reference": "Practitioner/forged" },
            "tag": [{ "system": "http://example.org", "code": "kept" }]
        },
        "gender": "",
        "name": [{ "family": "A", "given": [] }],
        "active": null
    });
    let context = WriteContext {
        author: Some("Practitioner/real".into()),
        ..Default::default()
    };
    let created = capture::create(&db.pool, project, &claimed, &context)
        .await
        .unwrap();
    let stored = &created.resource;
    assert_ne!(stored["id"], "chosen-by-client", "create assigns the id");
    assert!(Uuid::parse_str(stored["id"].as_str().unwrap()).is_ok());
    assert_eq!(stored["meta"]["versionId"], "1");
    assert_eq!(stored["meta"]["project"], project.to_string());
    assert_eq!(
        stored["meta"]["author"],
        json!({ "reference": "Practitioner/real" })
    );
    assert_ne!(stored["meta"]["lastUpdated"], "1999-01-01T00:00:00Z");
    assert_eq!(stored["meta"]["tag"][0]["code"], "kept");
    // Empty values are dropped like Medplum's stringify does; they would make FHIR JSON invalid.
    assert_eq!(stored.get("gender"), None);
    assert_eq!(stored.get("active"), None);
    assert_eq!(stored["name"], json!([{ "family": "A" }]));

    let id = stored["id"].as_str().unwrap();
    let read = capture::read(&db.pool, project, "Patient", id)
        .await
        .unwrap();
    assert_eq!(&read, stored);
}

/// The milliseconds since the epoch that a UUIDv7 begins with.
fn uuid_v7_millis(id: &str) -> i64 {
    let uuid = Uuid::parse_str(id).unwrap_or_else(|_| panic!("{id} is not a UUID"));
    assert_eq!(uuid.get_version_num(), 7, "{id} is not a UUIDv7");
    let bytes = uuid.as_bytes();
    bytes[..6]
        .iter()
        .fold(0, |ms, byte| ms << 8 | i64::from(*byte))
}

#[tokio::test]
async fn created_resources_get_time_ordered_ids_of_their_creation() {
    // Ids that begin with their creation time keep new keys at the right edge of the primary
    // keys (migrations/20261218000003_time_ordered_resource_ids.sql).
    let db = TestDb::new().await;
    let project = db.project().await;
    let context = WriteContext::default();
    let patient = json!({ "resourceType": "Patient", "active": true });
    let one = capture::create(&db.pool, project, &patient, &context)
        .await
        .unwrap();
    let many = capture::create_many(&db.pool, project, &[patient.clone(), patient], &context)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for written in std::iter::once(&one).chain(&many) {
        let id = written.resource["id"].as_str().unwrap();
        let updated = written.resource["meta"]["lastUpdated"].as_str().unwrap();
        let updated = chrono::DateTime::parse_from_rfc3339(updated).unwrap();
        assert_eq!(uuid_v7_millis(id), updated.timestamp_millis(), "{id}");
        ids.push(id.to_owned());
    }
    assert_ne!(ids[1], ids[2], "each resource of a batch has its own id");
    assert!(uuid_v7_millis(&ids[0]) <= uuid_v7_millis(&ids[1]));
}

#[tokio::test]
async fn an_update_with_the_same_content_writes_and_captures_nothing() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let ctx = WriteContext::default();
    let created = capture::create(&db.pool, project, &patient("A"), &ctx)
        .await
        .unwrap();
    let id = created.resource["id"].as_str().unwrap().to_owned();

    // The same content, with different server-managed meta and an empty value: still no change.
    let mut same = created.resource.clone();
    same["meta"]["versionId"] = json!("7");
    same["meta"]["lastUpdated"] = json!("2000-01-01T00:00:00Z");
    same["telecom"] = json!([]);
    let unchanged = put(&db, project, "Patient", &id, &same, None)
        .await
        .unwrap();
    assert_eq!(unchanged.outcome, WriteOutcome::Unchanged);
    assert_eq!(unchanged.version_id, 1);
    assert_eq!(unchanged.resource, created.resource);
    assert_eq!(outbox_count(&db.pool, project).await, 1);
    assert_eq!(version_count(&db.pool, project).await, 1);

    // A change in client-owned meta (a tag) is a change.
    let mut tagged = created.resource.clone();
    tagged["meta"]["tag"] = json!([{ "code": "x" }]);
    let updated = put(&db, project, "Patient", &id, &tagged, None)
        .await
        .unwrap();
    assert_eq!(updated.outcome, WriteOutcome::Updated);
    assert_eq!(outbox_count(&db.pool, project).await, 2);
}

/// In the caller's transaction: the application's own row `note`, then a Patient created and
/// updated; returns the Patient's id.
async fn note_create_update(
    tx: &mut sqlx::PgConnection,
    project: uuid::Uuid,
    note: &str,
) -> String {
    let ctx = WriteContext::default();
    sqlx::query("INSERT INTO app_note VALUES ($1)")
        .bind(note)
        .execute(&mut *tx)
        .await
        .unwrap();
    let created = capture::create(&mut *tx, project, &patient("A"), &ctx)
        .await
        .unwrap();
    let id = created.resource["id"].as_str().unwrap().to_owned();
    capture::update(
        &mut *tx,
        project,
        "Patient",
        &id,
        &with_id(patient("B"), &id),
        None,
        &ctx,
    )
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_resource_and_no_outbox_row() {
    let db = TestDb::new().await;
    let project = db.project().await;
    sqlx::query("CREATE TABLE app_note (note text)")
        .execute(&db.pool)
        .await
        .unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let id = note_create_update(&mut tx, project, "rolled back").await;
    tx.rollback().await.unwrap();
    assert_eq!(outbox_count(&db.pool, project).await, 0);
    assert_eq!(version_count(&db.pool, project).await, 0);
    assert!(matches!(
        capture::read(&db.pool, project, "Patient", &id).await,
        Err(StoreError::NotFound(_))
    ));

    // The same in a committed transaction: the application's row and both changes land together.
    let mut tx = db.pool.begin().await.unwrap();
    note_create_update(&mut tx, project, "committed").await;
    tx.commit().await.unwrap();
    assert_eq!(outbox_count(&db.pool, project).await, 2);
    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM app_note")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(notes, ["committed"]);
}

#[tokio::test]
async fn audit_events_are_stored_but_never_captured() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let ctx = WriteContext::default();
    let audit = json!({ "resourceType": "AuditEvent", "type": { "code": "transmit" }, "recorded": "2026-01-01T00:00:00Z" });
    let created = capture::create(&db.pool, project, &audit, &ctx)
        .await
        .unwrap();
    let id = created.resource["id"].as_str().unwrap().to_owned();
    let mut changed = created.resource.clone();
    changed["outcome"] = json!("4");
    put(&db, project, "AuditEvent", &id, &changed, None)
        .await
        .unwrap();
    capture::delete(&db.pool, project, "AuditEvent", &id, &ctx)
        .await
        .unwrap();
    assert_eq!(version_count(&db.pool, project).await, 3);
    assert_eq!(outbox_count(&db.pool, project).await, 0);
}

#[tokio::test]
async fn delete_keeps_history_and_put_creates_or_restores_as_update() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let ctx = WriteContext::default();

    // A PUT to a new id creates the resource; it is captured as an update, like Medplum does.
    let created = put(
        &db,
        project,
        "Patient",
        "p1",
        &with_id(patient("A"), "p1"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(created.outcome, WriteOutcome::Created);
    put(
        &db,
        project,
        "Patient",
        "p1",
        &with_id(patient("B"), "p1"),
        None,
    )
    .await
    .unwrap();
    let deleted = capture::delete(&db.pool, project, "Patient", "p1", &ctx)
        .await
        .unwrap();
    assert_eq!(
        (deleted.outcome, deleted.version_id),
        (DeleteOutcome::Deleted, 3)
    );
    let again = capture::delete(&db.pool, project, "Patient", "p1", &ctx)
        .await
        .unwrap();
    assert_eq!(
        (again.outcome, again.version_id),
        (DeleteOutcome::AlreadyDeleted, 3)
    );

    assert!(matches!(
        capture::read(&db.pool, project, "Patient", "p1").await,
        Err(StoreError::Gone(_))
    ));
    assert!(matches!(
        capture::vread(&db.pool, project, "Patient", "p1", 3).await,
        Err(StoreError::Gone(_))
    ));
    let old = capture::vread(&db.pool, project, "Patient", "p1", 2)
        .await
        .unwrap();
    assert_eq!(old["name"][0]["family"], "B");
    assert_eq!(old["meta"]["versionId"], "2");

    let restored = put(
        &db,
        project,
        "Patient",
        "p1",
        &with_id(patient("C"), "p1"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (restored.outcome, restored.version_id),
        (WriteOutcome::Restored, 4)
    );

    let history = capture::history(&db.pool, project, "Patient", "p1")
        .await
        .unwrap();
    let versions: Vec<_> = history.iter().map(|h| (h.version_id, h.deleted)).collect();
    assert_eq!(versions, [(4, false), (3, true), (2, false), (1, false)]);
    assert!(history[1].resource.is_none());

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
            ("update", 1, None),
            ("update", 2, Some(1)),
            ("delete", 3, Some(2)),
            ("update", 4, None)
        ]
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_a_named_problem_and_writes_nothing() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let ctx = WriteContext::default();
    let existing = put(
        &db,
        project,
        "Patient",
        "p1",
        &with_id(patient("A"), "p1"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(existing.version_id, 1);

    let error = capture::create(&db.pool, project, &json!([1, 2]), &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidResource(m) if m.contains("JSON object")),
        "{error}"
    );
    let error = capture::create(&db.pool, project, &json!({ "id": "x" }), &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidResource(m) if m.contains("resourceType")),
        "{error}"
    );
    let error = capture::create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "meta": [] }),
        &ctx,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidResource(m) if m.contains("meta")),
        "{error}"
    );
    let error = capture::create(
        &db.pool,
        project,
        &json!({ "resourceType": "Pateint" }),
        &ctx,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, StoreError::UnknownResourceType(m) if m.contains("Pateint")),
        "{error}"
    );
    let error = put(
        &db,
        project,
        "Patient",
        "p1",
        &with_id(patient("A"), "p2"),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, StoreError::IdMismatch(m) if m.contains("p2") && m.contains("p1")),
        "{error}"
    );
    let error = put(&db, project, "Patient", "p1", &patient("A"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::IdMismatch(m) if m.contains("no id")),
        "{error}"
    );
    let error = put(
        &db,
        project,
        "Observation",
        "p1",
        &with_id(patient("A"), "p1"),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, StoreError::IdMismatch(m) if m.contains("Observation")),
        "{error}"
    );
    let error = put(
        &db,
        project,
        "Patient",
        "bad id!",
        &with_id(patient("A"), "bad id!"),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidId(m) if m.contains("bad id!")),
        "{error}"
    );
    let unknown = Uuid::new_v4();
    let error = capture::create(&db.pool, unknown, &patient("A"), &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::UnknownProject(m) if m.contains(&unknown.to_string())),
        "{error}"
    );
    let error = put(
        &db,
        project,
        "Patient",
        "p1",
        &with_id(patient("B"), "p1"),
        Some(5),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &error,
            StoreError::VersionConflict {
                current_version: Some(1),
                ..
            }
        ),
        "{error}"
    );
    let error = put(
        &db,
        project,
        "Patient",
        "new",
        &with_id(patient("B"), "new"),
        Some(1),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &error,
            StoreError::VersionConflict {
                current_version: None,
                ..
            }
        ),
        "{error}"
    );
    let bad_trace = WriteContext {
        trace_id: Some("not-a-trace".into()),
        ..Default::default()
    };
    let error = capture::create(&db.pool, project, &patient("A"), &bad_trace)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidContext(m) if m.contains("not-a-trace")),
        "{error}"
    );
    for bad_request in [String::new(), "r".repeat(201)] {
        let context = WriteContext {
            request_id: Some(bad_request),
            ..Default::default()
        };
        let error = capture::create(&db.pool, project, &patient("A"), &context)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, StoreError::InvalidContext(m) if m.contains("request id must be 1 to 200 characters")),
            "{error}"
        );
    }
    let error = capture::delete(&db.pool, project, "Patient", "nobody", &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::NotFound(m) if m.contains("Patient/nobody")),
        "{error}"
    );

    // The size limit is a database setting, the same for every application.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL fhir_outbox.max_resource_bytes = 200")
        .execute(&mut *tx)
        .await
        .unwrap();
    let big = json!({ "resourceType": "Patient", "text": { "status": "generated", "div": "x".repeat(300) } });
    let error = capture::create(&mut *tx, project, &big, &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::TooLarge { limit: 200, size, .. } if *size > 300),
        "{error}"
    );
    drop(tx);

    assert_eq!(outbox_count(&db.pool, project).await, 1);
    assert_eq!(version_count(&db.pool, project).await, 1);
}

#[tokio::test]
async fn projects_are_isolated() {
    let db = TestDb::new().await;
    let a = db.project().await;
    let b = db.project().await;
    let ctx = WriteContext::default();
    put(
        &db,
        a,
        "Patient",
        "same-id",
        &with_id(patient("A"), "same-id"),
        None,
    )
    .await
    .unwrap();
    // The same id in another project is another resource.
    let in_b = put(
        &db,
        b,
        "Patient",
        "same-id",
        &with_id(patient("B"), "same-id"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(in_b.outcome, WriteOutcome::Created);
    let read_a = capture::read(&db.pool, a, "Patient", "same-id")
        .await
        .unwrap();
    assert_eq!(read_a["name"][0]["family"], "A");
    assert!(matches!(
        capture::delete(&db.pool, b, "Patient", "only-in-a", &ctx).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        capture::changes_since(&db.pool, a, 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        capture::changes_since(&db.pool, b, 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_batch_is_written_and_captured_in_one_statement_like_single_creates() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let context = WriteContext {
        author: Some("Device/importer".into()),
        request_id: Some("import-1".into()),
        trace_id: None,
    };
    let mut batch: Vec<Value> = (0..300).map(|i| patient(&format!("P{i}"))).collect();
    batch.push(json!({ "resourceType": "AuditEvent", "type": { "code": "import" } }));
    batch.push(json!({ "resourceType": "Subscription", "status": "active",
                       "criteria": "Patient", "channel": { "type": "rest-hook" } }));

    let written = capture::create_many(&db.pool, project, &batch, &context)
        .await
        .unwrap();
    assert_eq!(written.len(), 302);
    for (i, written) in written.iter().take(300).enumerate() {
        assert_eq!(written.outcome, WriteOutcome::Created);
        assert_eq!(written.version_id, 1);
        assert_eq!(written.resource["name"][0]["family"], format!("P{i}"));
        assert_eq!(written.resource["meta"]["versionId"], "1");
        assert_eq!(
            written.resource["meta"]["author"]["reference"],
            "Device/importer"
        );
        // Readable as any resource, the stored content being what was returned.
        let id = written.resource["id"].as_str().unwrap();
        let read = capture::read(&db.pool, project, "Patient", id)
            .await
            .unwrap();
        assert_eq!(read, written.resource);
    }
    // One change per resource, in the order given, none for the AuditEvent.
    assert_eq!(version_count(&db.pool, project).await, 302);
    assert_eq!(outbox_count(&db.pool, project).await, 301);
    let changes: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT resource_id, interaction, request_id FROM fhir_outbox.outbox
         WHERE project_id = $1 ORDER BY seq",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected: Vec<&str> = written
        .iter()
        .filter(|w| w.resource["resourceType"] != "AuditEvent")
        .map(|w| w.resource["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        changes.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        expected
    );
    assert!(changes.iter().all(|c| c.1 == "create" && c.2 == "import-1"));
    // The Subscription counts: dispatchers reload the project's subscriptions.
    let epoch: i64 =
        sqlx::query_scalar("SELECT subscription_epoch FROM fhir_outbox.project WHERE id = $1")
            .bind(project)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(epoch > 0);
    // A batch without one does not: cached subscriptions stay valid.
    capture::create_many(&db.pool, project, &batch[..3], &WriteContext::default())
        .await
        .unwrap();
    let after: i64 =
        sqlx::query_scalar("SELECT subscription_epoch FROM fhir_outbox.project WHERE id = $1")
            .bind(project)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(after, epoch);

    // In the caller's transaction: rolled back, nothing stays.
    let mut tx = db.pool.begin().await.unwrap();
    capture::create_many(&mut *tx, project, &batch[..10], &WriteContext::default())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(outbox_count(&db.pool, project).await, 304);
}

#[tokio::test]
async fn one_bad_resource_fails_its_batch_by_position_and_writes_nothing() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut batch: Vec<Value> = (0..5).map(|i| patient(&format!("P{i}"))).collect();
    batch[3] = json!({ "resourceType": "NoSuchType" });
    let error = capture::create_many(&db.pool, project, &batch, &WriteContext::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::UnknownResourceType(message)
            if message.starts_with("resource 4 of 5: unknown resourceType \"NoSuchType\"")),
        "{error:?}"
    );
    batch[3] = json!(["not", "an", "object"]);
    let error = capture::create_many(&db.pool, project, &batch, &WriteContext::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidResource(message) if message.starts_with("resource 4 of 5: ")),
        "{error:?}"
    );
    let too_many = vec![patient("X"); 10_001];
    let error = capture::create_many(&db.pool, project, &too_many, &WriteContext::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("at most 10000"), "{error}");
    assert_eq!(version_count(&db.pool, project).await, 0);
    assert_eq!(outbox_count(&db.pool, project).await, 0);
    // The project is looked up once for the batch, and its refusal is named like the others.
    let nowhere = Uuid::new_v4();
    let error = capture::create_many(&db.pool, nowhere, &batch[..2], &WriteContext::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::UnknownProject(message)
            if message.starts_with(&format!("resource 1 of 2: unknown project {nowhere}"))),
        "{error:?}"
    );
    assert_eq!(version_count(&db.pool, project).await, 0);
    assert_eq!(outbox_count(&db.pool, project).await, 0);
    // An empty batch writes nothing and is no error, whatever the project.
    let none = capture::create_many(&db.pool, project, &[], &WriteContext::default())
        .await
        .unwrap();
    assert!(none.is_empty());
    let none = capture::create_many(&db.pool, nowhere, &[], &WriteContext::default())
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn a_batch_stores_each_resource_as_a_single_write_would() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // Empty values and nulls (removed), braces and quotes inside strings (kept), a resource
    // with nothing to remove, nested nulls without empty values (removed: the null check is a
    // search of the text), and the word inside a string (kept).
    let batch = vec![
        json!({ "resourceType": "Patient", "gender": "", "name": [{ "family": "A", "given": [] }],
                "active": null, "contact": {} }),
        json!({ "resourceType": "Patient", "name": [{ "text": "{} [] \"\"" }] }),
        json!({ "resourceType": "Patient", "active": true }),
        json!({ "resourceType": "Patient", "name": [{ "family": "B", "text": null }],
                "active": null }),
        json!({ "resourceType": "Patient", "name": [{ "text": "null" }] }),
    ];
    let written = capture::create_many(&db.pool, project, &batch, &WriteContext::default())
        .await
        .unwrap();
    for (given, written) in batch.iter().zip(&written) {
        let single = capture::create(&db.pool, project, given, &WriteContext::default())
            .await
            .unwrap();
        let without_stamps = |resource: &Value| {
            let mut resource = resource.clone();
            resource.as_object_mut().unwrap().remove("id");
            resource.as_object_mut().unwrap().remove("meta");
            resource
        };
        assert_eq!(
            without_stamps(&written.resource),
            without_stamps(&single.resource)
        );
    }
    assert_eq!(written[0].resource["name"], json!([{ "family": "A" }]));
    assert!(written[0].resource.get("gender").is_none());
    assert!(written[0].resource.get("contact").is_none());
    assert!(written[0].resource.get("active").is_none());
    assert_eq!(written[1].resource["name"][0]["text"], "{} [] \"\"");
    assert_eq!(written[3].resource["name"], json!([{ "family": "B" }]));
    assert!(written[3].resource.get("active").is_none());
    assert_eq!(written[4].resource["name"], json!([{ "text": "null" }]));
}
