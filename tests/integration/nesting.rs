//! Deeply nested resources (issue 12): the store refuses what the pipeline cannot read, and a legacy
//! row that the pipeline cannot read fails alone, in dispatch and in delivery, never its batch.

use crate::common::{TestDb, cli};
use crate::delivery::{create, fast_config, hook, pipeline};
use crate::receiver::Receiver;
use fhir_outbox::capture::{self, StoreError, WriteContext};
use fhir_outbox::delivery::DeliveryWorker;
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use fhir_outbox::fhir::MAX_NESTING_DEPTH;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A Patient nested exactly `depth` levels deep (the Patient object is level 1), as FHIR nests
/// things: extensions within extensions. Text, because serde_json refuses depths from 128 on.
fn deep_patient(id: &str, depth: usize) -> String {
    let pairs = (depth - 1) / 2;
    let tail = if (depth - 1) % 2 == 1 {
        r#""valueCodeableConcept":{"text":"deepest"}"#
    } else {
        r#""valueString":"deepest""#
    };
    format!(
        r#"{{"resourceType":"Patient","id":"{id}",{}{tail}{}}}"#,
        r#""extension":[{"url":"http://example.org/nested","#.repeat(pairs),
        "}]".repeat(pairs)
    )
}

/// Replaces the stored content of a resource's current version, bypassing the store's checks (and
/// the trigger that keeps versions immutable): a row written before the nesting limit existed.
async fn make_legacy(pool: &PgPool, project: Uuid, resource_type: &str, id: &str, content: &str) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    let updated = sqlx::query(
        "UPDATE fhir_outbox.resource_version v SET content = $4::text::jsonb
         FROM fhir_outbox.resource r
         WHERE r.project_id = $1 AND r.resource_type = $2 AND r.id = $3
           AND v.project_id = r.project_id AND v.resource_type = r.resource_type AND v.id = r.id
           AND v.version_id = r.version_id",
    )
    .bind(project)
    .bind(resource_type)
    .bind(id)
    .bind(content)
    .execute(&mut *conn)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(updated, 1);
    sqlx::query("RESET session_replication_role")
        .execute(&mut *conn)
        .await
        .unwrap();
}

async fn patient(pool: &PgPool, project: Uuid, id: &str) {
    let body = serde_json::json!({ "resourceType": "Patient", "id": id });
    capture::update(
        pool,
        project,
        "Patient",
        id,
        &body,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
}

/// The ids of the Patients the receiver got.
fn received_ids(receiver: &Receiver) -> BTreeSet<String> {
    receiver
        .received()
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// (resource id, dispatch_error) of every outbox row about a Patient.
async fn dispatch_errors(pool: &PgPool) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT resource_id, dispatch_error FROM fhir_outbox.outbox
         WHERE resource_type = 'Patient' AND dispatched_at IS NOT NULL ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Runs the dispatcher (two loops, so that one may hold a row the other skips) and a delivery
/// worker until `done`, or panics after 30 seconds.
async fn run_until<F: AsyncFn() -> bool>(pool: &PgPool, done: F) {
    let shutdown = CancellationToken::new();
    let dispatcher = Arc::new(Dispatcher::new(
        pool.clone(),
        DispatchConfig {
            allow_unsafe_outbound: true,
            workers: 2,
            batch_size: 10,
            poll_interval: Duration::from_millis(50),
            ..DispatchConfig::default()
        },
    ));
    let worker = Arc::new(DeliveryWorker::new(pool.clone(), fast_config()).unwrap());
    let dispatching = tokio::spawn(dispatcher.run(shutdown.clone()));
    let delivering = tokio::spawn(worker.run(shutdown.clone()));
    let mut finished = false;
    for _ in 0..600 {
        if done().await {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    dispatching.await.unwrap();
    delivering.await.unwrap();
    assert!(finished, "the pipeline did not get there in 30 seconds");
}

#[tokio::test]
async fn the_store_refuses_a_resource_nested_deeper_than_the_limit() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // The resource of issue 12: 64 nested extensions, 129 levels, one more than serde_json reads.
    for (function, depth) in [("create", 129), ("update", MAX_NESTING_DEPTH + 1)] {
        let sql = match function {
            "create" => "SELECT fhir_outbox.create_resource($1, $2::text::jsonb)",
            _ => "SELECT fhir_outbox.update_resource($1, 'Patient', 'p', $2::text::jsonb)",
        };
        let error = sqlx::query(sql)
            .bind(project)
            .bind(deep_patient("p", depth))
            .execute(&db.pool)
            .await
            .unwrap_err();
        let database = error.as_database_error().unwrap();
        assert_eq!(database.code().as_deref(), Some("OB001"), "{function}");
        assert_eq!(
            database.message(),
            "resource is nested too deeply: more than 100 levels of objects and arrays"
        );
        assert!(matches!(
            StoreError::from(error),
            StoreError::InvalidResource(_)
        ));
    }
    assert_eq!(crate::common::outbox_count(&db.pool, project).await, 0);
}

#[tokio::test]
async fn a_resource_at_the_limit_is_stored_dispatched_and_delivered_one_level_more_is_not() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let ctx = WriteContext::default();
    let at_limit: Value =
        serde_json::from_str(&deep_patient("at-limit", MAX_NESTING_DEPTH)).unwrap();
    assert_eq!(
        fhir_outbox::fhir::nesting_depth(&at_limit),
        MAX_NESTING_DEPTH
    );
    let stored = capture::create(&db.pool, project, &at_limit, &ctx)
        .await
        .expect("the limit itself is accepted");
    let id = stored.resource["id"].as_str().unwrap().to_owned();
    let over: Value = serde_json::from_str(&deep_patient("over", MAX_NESTING_DEPTH + 1)).unwrap();
    let error = capture::create(&db.pool, project, &over, &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidResource(m) if m.contains("more than 100 levels")),
        "{error}"
    );
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        fhir_outbox::fhir::nesting_depth(&received[0].json()),
        MAX_NESTING_DEPTH
    );
    assert_eq!(received[0].json()["id"], id.as_str());
    assert_eq!(dispatch_errors(&db.pool).await, [(id, None)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_deep_row_is_set_aside_alone_and_every_other_change_is_delivered() {
    let db = TestDb::new().await;
    let (a, b) = (db.project().await, db.project().await);
    let receiver_a = Receiver::start(vec![]).await;
    let receiver_b = Receiver::start(vec![]).await;
    // Criteria that read the resource: the dispatcher reads the versions of their changes.
    let every_patient = "Patient?_id:missing=false";
    create(&db.pool, a, &hook(&receiver_a.url, every_patient), None).await;
    create(&db.pool, b, &hook(&receiver_b.url, every_patient), None).await;
    // A second subscription in A whose own content became unreadable: it alone is out of play.
    let broken = create(&db.pool, a, &hook(&receiver_a.url, "Patient"), None).await;
    let broken_id = broken["id"].as_str().unwrap();
    let deep_subscription = deep_patient(broken_id, 129).replace(
        r#""resourceType":"Patient""#,
        r#""resourceType":"Subscription","status":"active""#,
    );
    make_legacy(&db.pool, a, "Subscription", broken_id, &deep_subscription).await;

    // Innocent changes in both projects, around rows written before the limit existed: one that
    // serde_json cannot decode (129 levels) and one it can but that is over the limit (110).
    for id in ["a1", "a2"] {
        patient(&db.pool, a, id).await;
    }
    patient(&db.pool, b, "b1").await;
    patient(&db.pool, a, "deep-a").await;
    make_legacy(
        &db.pool,
        a,
        "Patient",
        "deep-a",
        &deep_patient("deep-a", 129),
    )
    .await;
    for id in ["a3", "b2"] {
        patient(&db.pool, if id.starts_with('a') { a } else { b }, id).await;
    }
    patient(&db.pool, b, "deep-b").await;
    make_legacy(
        &db.pool,
        b,
        "Patient",
        "deep-b",
        &deep_patient("deep-b", 110),
    )
    .await;
    for id in ["b3", "a4"] {
        patient(&db.pool, if id.starts_with('a') { a } else { b }, id).await;
    }

    let everyone = |receiver: &Receiver, ids: &[&str]| {
        received_ids(receiver) == ids.iter().map(|id| id.to_string()).collect()
    };
    run_until(&db.pool, async || {
        everyone(&receiver_a, &["a1", "a2", "a3", "a4"])
            && everyone(&receiver_b, &["b1", "b2", "b3"])
    })
    .await;

    let errors = dispatch_errors(&db.pool).await;
    let marked: Vec<&(String, Option<String>)> =
        errors.iter().filter(|(_, error)| error.is_some()).collect();
    assert_eq!(marked.len(), 2, "{errors:?}");
    assert_eq!(marked[0].0, "deep-a");
    let error = marked[0].1.as_deref().unwrap();
    assert!(
        error.starts_with("cannot decode resource: version 1: recursion limit exceeded"),
        "{error}"
    );
    assert_eq!(marked[1].0, "deep-b");
    let error = marked[1].1.as_deref().unwrap();
    assert_eq!(
        error,
        "cannot decode resource: version 1: nested 110 levels deep, over the limit of 100"
    );
    assert_eq!(errors.len(), 9, "every change was dispatched: {errors:?}");
    // Each innocent change was delivered once, to its own project's subscription only.
    assert_eq!(receiver_a.received().len(), 4);
    assert_eq!(receiver_b.received().len(), 3);
    let issue: String = sqlx::query_scalar(
        "SELECT message FROM fhir_outbox.subscription_issue WHERE subscription_id = $1",
    )
    .bind(broken_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(issue.starts_with("cannot decode subscription: recursion limit exceeded"));

    // Operators see them: the view and `fhir-outbox status`. (The broken subscription's own change
    // is set aside too: its content cannot be decoded to evaluate it.)
    let set_aside: Vec<String> = sqlx::query_scalar(
        "SELECT resource_id FROM fhir_outbox.outbox_dispatch_error ORDER BY seq",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(set_aside, [broken_id, "deep-a", "deep-b"]);
    let (ok, text) = cli(&["status", "--database-url", &db.url]);
    assert!(ok, "{text}");
    assert!(text.contains("Changes set aside by dispatch"), "{text}");
    assert!(
        text.contains("Patient/deep-a") && text.contains("over the limit of 100"),
        "{text}"
    );

    // And dispatch keeps going.
    patient(&db.pool, b, "b4").await;
    run_until(&db.pool, async || received_ids(&receiver_b).contains("b4")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_fails_alone_is_set_aside_and_no_other() {
    let db = TestDb::new().await;
    let (a, b) = (db.project().await, db.project().await);
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, a, &hook(&receiver.url, "Patient"), None).await;
    create(&db.pool, b, &hook(&receiver.url, "Patient"), None).await;
    // A change whose deliveries the database refuses, every time (a stand-in for any row that
    // breaks a constraint): its whole batch fails until it is found.
    sqlx::query(
        "ALTER TABLE fhir_outbox.unfinished_delivery ADD CONSTRAINT no_poison CHECK (resource_id <> 'poison')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    for (project, id) in [(a, "a1"), (b, "b1"), (a, "poison"), (b, "b2"), (a, "a2")] {
        patient(&db.pool, project, id).await;
    }
    let expected: BTreeSet<String> = ["a1", "a2", "b1", "b2"].map(String::from).into();
    // The innocent rows may be delivered before the poison is narrowed down to itself, so wait for
    // both: it is set aside only once every batch around it has gone through without it.
    run_until(&db.pool, async || {
        received_ids(&receiver) == expected && dispatch_errors(&db.pool).await.len() == 5
    })
    .await;
    let errors = dispatch_errors(&db.pool).await;
    assert_eq!(errors.len(), 5, "{errors:?}");
    for (id, error) in &errors {
        match id.as_str() {
            "poison" => {
                let error = error.as_deref().unwrap_or_default();
                assert!(
                    error.starts_with("set aside: ") && error.contains("no_poison"),
                    "{error}"
                );
            }
            _ => assert_eq!(error, &None, "{id} is innocent"),
        }
    }
    assert_eq!(receiver.received().len(), 4);
}

#[tokio::test]
async fn a_deep_row_in_a_delivery_claim_fails_alone() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let other = create(
        &db.pool,
        project,
        &hook(&receiver.url, "Patient?_id=p3"),
        None,
    )
    .await;
    for id in ["p1", "p2", "p3"] {
        patient(&db.pool, project, id).await;
    }
    let p = pipeline(&db.pool, fast_config());
    while p.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
    // Between dispatch and delivery, a resource and a subscription become unreadable.
    make_legacy(&db.pool, project, "Patient", "p2", &deep_patient("p2", 129)).await;
    let other_id = other["id"].as_str().unwrap();
    let deep_subscription = deep_patient(other_id, 129).replace(
        r#""resourceType":"Patient""#,
        r#""resourceType":"Subscription","status":"active""#,
    );
    make_legacy(
        &db.pool,
        project,
        "Subscription",
        other_id,
        &deep_subscription,
    )
    .await;

    assert_eq!(p.worker.deliver_once().await.unwrap(), 4);
    assert_eq!(
        received_ids(&receiver),
        ["p1", "p3"].map(String::from).into()
    );
    let states: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT resource_id, state, reason FROM fhir_outbox.delivery ORDER BY subscription_id = $1, resource_id",
    )
    .bind(other_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let summary: Vec<(&str, &str, &str)> = states
        .iter()
        .map(|(id, state, reason)| {
            let reason = reason.as_deref().unwrap_or("");
            (id.as_str(), state.as_str(), &reason[..reason.len().min(48)])
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("p1", "succeeded", ""),
            (
                "p2",
                "failed",
                // The body is made compact without decoding: the depth check names the depth.
                "cannot decode resource: nested 129 levels deep, "
            ),
            ("p3", "succeeded", ""),
            (
                "p3",
                "failed",
                "cannot decode subscription: recursion limit exce"
            ),
        ]
    );
}
