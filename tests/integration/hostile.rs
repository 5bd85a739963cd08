//! Hostile input: malformed Subscriptions (each field wrong in turn), huge and deeply nested
//! resources, SQL-looking strings, header injection. Each gets a clear error or is set aside, and
//! nothing is lost or blocked: a good subscription next to them keeps receiving.

use crate::common::TestDb;
use crate::delivery::{create, fast_config, hook, pipeline, states, with_extensions};
use crate::receiver::Receiver;
use fhir_outbox::capture::{self, StoreError, WriteContext};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_subscriptions_never_block_a_good_one() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let good = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let base = hook(&receiver.url, "Patient");
    let broken: Vec<(&str, Value)> = vec![
        ("status", json!(7)),
        ("criteria", json!({ "not": "a string" })),
        (
            "criteria",
            json!("Patient?name=';DROP TABLE fhir_outbox.delivery;--"),
        ),
        (
            "criteria",
            json!(format!("Patient?{}", "a=1&".repeat(10_000))),
        ),
        (
            "criteria",
            json!("Patient?birthdate=gt'; SELECT pg_sleep(10)--"),
        ),
        (
            "criteria",
            json!("Patient?_has:Observation:subject:code=1234"),
        ),
        ("channel", json!("rest-hook")),
        ("channel", json!({ "type": 42, "endpoint": receiver.url })),
        (
            "channel",
            json!({ "type": "rest-hook", "endpoint": ["not", "a", "url"] }),
        ),
        (
            "channel",
            json!({ "type": "rest-hook", "endpoint": receiver.url, "header": "Authorization: x" }),
        ),
        (
            "channel",
            json!({ "type": "rest-hook", "endpoint": receiver.url, "header": [42, "X-Evil: a\r\nInjected: b"] }),
        ),
        (
            "channel",
            json!({ "type": "rest-hook", "endpoint": "javascript:alert(1)" }),
        ),
        ("extension", json!("not an array")),
        (
            "extension",
            json!([{ "url": "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression", "valueString": "((((((((((" }]),
        ),
        (
            "extension",
            json!([{ "url": "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression", "valueString": "Patient.repeat(name).repeat(given).descendants().descendants()" }]),
        ),
        (
            "extension",
            json!([{ "url": "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression", "valueInteger": 3 }]),
        ),
        (
            "extension",
            json!([{ "url": "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts", "valueInteger": -5 }]),
        ),
        (
            "extension",
            json!([{ "url": "https://medplum.com/fhir/StructureDefinition/subscription-supported-interaction", "valueCode": "'; DROP" }]),
        ),
        ("meta", json!({ "account": "Organization/x" })),
    ];
    let total = broken.len();
    for (field, value) in broken {
        let mut subscription = base.clone();
        subscription[field] = value;
        // The store accepts any JSON object of a known type: Subscriptions are data like any other.
        create(&db.pool, project, &subscription, None).await;
    }
    let p = pipeline(&db.pool, fast_config());
    for n in 0..5 {
        create(&db.pool, project, &json!({ "resourceType": "Patient", "name": [{ "family": format!("p{n}"), "given": ["a", "b"] }] }), None).await;
    }
    p.settle(&db.pool).await;
    assert_eq!(
        states(&db.pool, &good).await.len(),
        5,
        "the good subscription got every change"
    );
    assert!(
        states(&db.pool, &good)
            .await
            .iter()
            .all(|s| s.0 == "succeeded")
    );
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'fhir_outbox'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(tables >= 8, "nothing was dropped");
    let issues: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.subscription_issue")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    println!(
        "hostile subscriptions: {total} malformed, {issues} issues recorded, the good one got 5/5"
    );
    assert!(issues >= 3, "unsupported and invalid criteria are reported");
}

#[tokio::test]
async fn huge_deep_and_sql_looking_resources_get_clear_errors() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let ctx = WriteContext::default();

    let ten_mb = json!({ "resourceType": "Binary", "contentType": "text/plain", "data": "A".repeat(10 * 1024 * 1024) });
    let error = capture::create(&db.pool, project, &ten_mb, &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            StoreError::TooLarge {
                limit: 4_194_304,
                ..
            }
        ),
        "{error}"
    );
    // Raised for one transaction, the same 10 MB resource is stored.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL fhir_outbox.max_resource_bytes = 16777216")
        .execute(&mut *tx)
        .await
        .unwrap();
    capture::create(&mut *tx, project, &ten_mb, &ctx)
        .await
        .expect("stored under a raised limit");
    tx.commit().await.unwrap();

    // Deep nesting, built as text because serde_json refuses to parse it (a good sign).
    for depth in [3_000, 100_000] {
        let text = format!(
            "{{\"resourceType\":\"Patient\",\"x\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let error = sqlx::query("SELECT fhir_outbox.create_resource($1, $2::text::jsonb)")
            .bind(project)
            .bind(&text)
            .execute(&db.pool)
            .await
            .unwrap_err();
        let error = StoreError::from(error);
        assert!(
            matches!(&error, StoreError::InvalidResource(m) if m.contains("nested too deeply")),
            "{depth}: {error}"
        );
    }

    for id in ["1;DROP TABLE x", "a'b", "../../etc", &"x".repeat(65)] {
        let resource = json!({ "resourceType": "Patient", "id": id });
        let error = capture::update(&db.pool, project, "Patient", id, &resource, None, &ctx)
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::InvalidId(_)), "{id}: {error}");
    }
    let error = capture::create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient'; DROP TABLE fhir_outbox.outbox; --" }),
        &ctx,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, StoreError::UnknownResourceType(_)),
        "{error}"
    );
    let stored = capture::create(&db.pool, project, &json!({ "resourceType": "Patient", "name": [{ "family": "Robert'); DROP TABLE Students;--" }] }), &ctx)
        .await
        .unwrap();
    assert_eq!(
        stored.resource["name"][0]["family"],
        "Robert'); DROP TABLE Students;--"
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        outbox, 2,
        "the big Binary and Robert; nothing else was written"
    );
}

/// A hostile FHIRPath subscription in project A (the incident's nested `select` on a Patient with
/// 3,000 identifiers: 2.7e10 iterations) costs one evaluation budget and is then suspended: recorded
/// once, shown by the status view, never evaluated again, while project B's changes written between
/// A's are all delivered. Nothing here depends on timing: a dispatcher that evaluated the expression
/// for each of A's changes would record it more than once, and one without a budget would not end.
/// A new version of the subscription lifts the suspension.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_expression_is_suspended_after_one_budget_and_never_holds_up_another_project() {
    let db = TestDb::new().await;
    let (a, b) = (db.project().await, db.project().await);
    let (receiver_a, receiver_b) = (Receiver::start(vec![]).await, Receiver::start(vec![]).await);
    let fhirpath = |expression: &str| {
        json!([{ "url": "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression",
                 "valueString": expression }])
    };
    let hostile = create(
        &db.pool,
        a,
        &with_extensions(
            hook(&receiver_a.url, "Patient"),
            fhirpath(
                "%current.identifier.select(%current.identifier.select(%current.identifier.count())).count() > 0",
            ),
        ),
        None,
    )
    .await;
    let healthy = create(&db.pool, b, &hook(&receiver_b.url, "Patient"), None).await;
    let identifiers: Vec<Value> = (0..3_000)
        .map(|i| json!({ "system": "urn:example:mrn", "value": format!("mrn-{i}") }))
        .collect();
    for _ in 0..5 {
        let big = json!({ "resourceType": "Patient", "identifier": identifiers });
        create(&db.pool, a, &big, None).await;
        create(&db.pool, b, &json!({ "resourceType": "Patient" }), None).await;
    }
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;

    assert_eq!(
        receiver_b.received().len(),
        5,
        "every change of project B delivered"
    );
    assert_eq!(states(&db.pool, &healthy).await.len(), 5);
    assert!(receiver_a.received().is_empty());
    let issues: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT kind, occurrences, message FROM fhir_outbox.subscription_issue
         WHERE project_id = $1 AND subscription_id = $2",
    )
    .bind(a)
    .bind(hostile["id"].as_str().unwrap())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!((issues[0].0.as_str(), issues[0].1), ("budget_exhausted", 1));
    assert!(issues[0].2.contains("budget"), "{issues:?}");
    let (suspended, open_issues): (Option<String>, i64) = sqlx::query_as(
        "SELECT suspended_reason, issues FROM fhir_outbox.subscription_delivery_status
         WHERE project_id = $1 AND subscription_id = $2",
    )
    .bind(a)
    .bind(hostile["id"].as_str().unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(suspended.is_some() && open_issues == 1);

    // A fresh dispatcher (another process, say) reads the suspension instead of paying again.
    let fresh = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        a,
        &json!({ "resourceType": "Patient", "identifier": identifiers }),
        None,
    )
    .await;
    fresh.settle(&db.pool).await;
    let occurrences: i64 = sqlx::query_scalar(
        "SELECT sum(occurrences)::int8 FROM fhir_outbox.subscription_issue WHERE project_id = $1",
    )
    .bind(a)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(occurrences, 1, "a suspended version is not evaluated again");

    // Fixing the subscription (a new version) lifts the suspension.
    let mut fixed = with_extensions(
        hook(&receiver_a.url, "Patient"),
        fhirpath("%current.active = true"),
    );
    fixed["id"] = hostile["id"].clone();
    let id = hostile["id"].as_str().unwrap();
    capture::update(
        &db.pool,
        a,
        "Subscription",
        id,
        &fixed,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    create(
        &db.pool,
        a,
        &json!({ "resourceType": "Patient", "active": true }),
        None,
    )
    .await;
    fresh.settle(&db.pool).await;
    assert_eq!(receiver_a.received().len(), 1);
}
