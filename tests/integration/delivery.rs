//! Delivery end to end: real writes, the real dispatcher and worker, real HTTP to loopback receivers
//! (spec §1.5–1.12).

use crate::common::TestDb;
use crate::receiver::{Receiver, Reply};
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::delivery::policy::Backoff;
use fhir_outbox::delivery::{
    DeliveryConfig, DeliveryWorker, FailureReason, Reason, SkipReason, signature,
};
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const SECRET: &str = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret";
const INTERACTION: &str =
    "https://medplum.com/fhir/StructureDefinition/subscription-supported-interaction";

pub struct Pipeline {
    pub dispatcher: Dispatcher,
    pub worker: Arc<DeliveryWorker>,
}

pub fn fast_config() -> DeliveryConfig {
    DeliveryConfig {
        allow_unsafe_outbound: true,
        backoff: Backoff {
            base: Duration::from_millis(5),
            cap: Duration::from_millis(50),
        },
        request_timeout: Duration::from_secs(5),
        ..DeliveryConfig::default()
    }
}

pub fn pipeline(pool: &PgPool, config: DeliveryConfig) -> Pipeline {
    let dispatcher = Dispatcher::new(
        pool.clone(),
        DispatchConfig {
            allow_unsafe_outbound: true,
            ..DispatchConfig::default()
        },
    );
    let worker = Arc::new(DeliveryWorker::new(pool.clone(), config).unwrap());
    Pipeline { dispatcher, worker }
}

impl Pipeline {
    /// Dispatches until no change is left (delivering nothing).
    pub async fn settle_dispatch(&self) {
        while self.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
    }

    /// Dispatches and delivers until no delivery is pending or in flight.
    pub async fn settle(&self, pool: &PgPool) {
        for _ in 0..1000 {
            while self.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
            self.worker.deliver_once().await.unwrap();
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM fhir_outbox.delivery WHERE state IN ('pending', 'in_flight')",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            let undispatched: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM fhir_outbox.outbox WHERE dispatched_at IS NULL",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if open == 0 && undispatched == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("deliveries did not settle");
    }
}

pub fn hook(url: &str, criteria: &str) -> Value {
    json!({
        "resourceType": "Subscription", "status": "active", "reason": "test", "criteria": criteria,
        "channel": { "type": "rest-hook", "endpoint": url }
    })
}

pub fn with_extensions(mut subscription: Value, extensions: Value) -> Value {
    subscription["extension"] = extensions;
    subscription
}

pub async fn create(pool: &PgPool, project: Uuid, resource: &Value, trace: Option<&str>) -> Value {
    let context = WriteContext {
        trace_id: trace.map(str::to_owned),
        ..WriteContext::default()
    };
    capture::create(pool, project, resource, &context)
        .await
        .unwrap()
        .resource
}

/// (state, attempts, reason) of the deliveries to a subscription, oldest first.
pub async fn states(pool: &PgPool, subscription: &Value) -> Vec<(String, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT state, attempts, reason FROM fhir_outbox.delivery WHERE subscription_id = $1 ORDER BY id",
    )
    .bind(subscription["id"].as_str().unwrap())
    .fetch_all(pool)
    .await
    .unwrap()
}

/// outcome and outcomeDesc of the stored AuditEvents about a subscription, oldest first.
pub async fn audit_events(pool: &PgPool, subscription: &Value) -> Vec<(String, String)> {
    let reference = format!("Subscription/{}", subscription["id"].as_str().unwrap());
    let events: Vec<Value> = sqlx::query_scalar(
        "SELECT content FROM (
             SELECT content::jsonb, recorded_at AS at FROM fhir_outbox.audit_event
             UNION ALL
             SELECT content, last_updated FROM fhir_outbox.resource_version
             WHERE resource_type = 'AuditEvent') e
         WHERE content -> 'source' -> 'observer' ->> 'reference' = $1
         ORDER BY at",
    )
    .bind(reference)
    .fetch_all(pool)
    .await
    .unwrap();
    events
        .iter()
        .map(|e| {
            (
                e["outcome"].as_str().unwrap().to_owned(),
                e["outcomeDesc"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_201_is_success_and_the_request_is_exactly_as_specified() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(201, None)]).await;
    let mut subscription = hook(&receiver.url, "Patient");
    subscription["channel"]["header"] = json!([
        "Authorization: Basic xyz",
        "X-Url: https://a.example:8443/p"
    ]);
    let subscription = create(&db.pool, project, &subscription, None).await;
    let p = pipeline(&db.pool, fast_config());
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let patient = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "active": true }),
        Some(trace),
    )
    .await;
    p.settle(&db.pool).await;

    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.json(), patient, "the body is the exact version");
    // Compact JSON: the same members with no whitespace between tokens (in the store's order,
    // which is not serde_json's), so exactly as long as serde_json's compact form.
    assert_eq!(
        request.body.len(),
        serde_json::to_vec(&patient).unwrap().len(),
        "compact JSON: {}",
        String::from_utf8_lossy(&request.body)
    );
    let names: Vec<&str> = request.headers.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "accept",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "traceparent",
            "user-agent",
            "webhook-id",
            "webhook-timestamp",
            "x-medplum-interaction",
            "x-medplum-subscription",
            "x-trace-id",
            "x-url"
        ]
    );
    assert_eq!(
        request.header("content-type"),
        Some("application/fhir+json")
    );
    assert_eq!(request.header("authorization"), Some("Basic xyz"));
    assert_eq!(
        request.header("x-url"),
        Some("https://a.example:8443/p"),
        "split at the first colon"
    );
    assert_eq!(
        request.header("x-medplum-subscription"),
        subscription["id"].as_str()
    );
    assert_eq!(request.header("x-medplum-interaction"), Some("create"));
    assert_eq!(request.header("x-trace-id"), Some(trace));
    assert_eq!(request.header("traceparent"), Some(trace));
    let webhook_id: String =
        sqlx::query_scalar("SELECT webhook_id::text FROM fhir_outbox.delivery")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(request.header("webhook-id"), Some(webhook_id.as_str()));

    assert_eq!(
        states(&db.pool, &subscription).await,
        [("succeeded".into(), 1, None)]
    );
    assert_eq!(
        audit_events(&db.pool, &subscription).await,
        [("0".into(), "Attempt 0 received status 201".into())]
    );
    let attempt: (i32, Option<i32>, bool, Option<String>) = sqlx::query_as(
        "SELECT a.attempt, a.status, a.succeeded, v.content ->> 'outcome'
         FROM fhir_outbox.delivery_attempt a
         JOIN fhir_outbox.audit_event v ON v.id = a.audit_event_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        attempt,
        (1, Some(201), true, Some("0".into())),
        "the attempt log joins its AuditEvent"
    );
}

#[tokio::test]
async fn numbers_are_sent_as_another_app_stored_them() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Observation"), None).await;
    let p = pipeline(&db.pool, fast_config());
    // Through the SQL interface, where `jsonb` keeps a decimal's scale and every digit.
    sqlx::query(
        r#"SELECT fhir_outbox.create_resource($1, '{"resourceType": "Observation", "status": "final",
             "code": {"text": "Glucose"}, "valueQuantity": {"value": 6.30, "unit": "mmol/L"},
             "extension": [{"url": "https://example.org/n", "valueInteger64": 123456789012345678901234}]}')"#,
    )
    .bind(project)
    .execute(&db.pool)
    .await
    .unwrap();
    p.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let body = String::from_utf8(received[0].body.to_vec()).unwrap();
    // FHIR: a decimal's precision is significant (6.30 is not 6.3).
    assert!(body.contains(r#""value":6.30"#), "{body}");
    assert!(body.contains(r#":123456789012345678901234}"#), "{body}");
    assert!(
        !body.contains(": ") && !body.contains(", "),
        "compact: {body}"
    );
}

#[tokio::test]
async fn interactions_and_a_signed_delete() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let only = |code: &str| {
        with_extensions(
            hook(&receiver.url, "Patient"),
            json!([{ "url": INTERACTION, "valueCode": code }, { "url": SECRET, "valueString": "s3cret" }]),
        )
    };
    let create_only = create(&db.pool, project, &only("create"), None).await;
    let delete_only = create(&db.pool, project, &only("delete"), None).await;
    let p = pipeline(&db.pool, fast_config());
    let patient = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let id = patient["id"].as_str().unwrap();
    // Settle after each write: a create whose resource is deleted before delivery is (rightly) skipped.
    p.settle(&db.pool).await;
    capture::update(
        &db.pool,
        project,
        "Patient",
        id,
        &json!({ "resourceType": "Patient", "id": id, "active": true }),
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    p.settle(&db.pool).await;
    capture::delete(&db.pool, project, "Patient", id, &WriteContext::default())
        .await
        .unwrap();
    p.settle(&db.pool).await;

    let received = receiver.received();
    assert_eq!(
        received.len(),
        2,
        "create to one, delete to the other, nothing for the update"
    );
    assert!(received.iter().all(|r| r.path == "/hook"));
    let by = |sub: &Value| {
        received
            .iter()
            .find(|r| r.header("x-medplum-subscription") == sub["id"].as_str())
            .unwrap()
            .clone()
    };
    let created = by(&create_only);
    assert_eq!(created.header("x-medplum-interaction"), Some("create"));
    assert_eq!(
        created.header("x-signature"),
        Some(signature::x_signature("s3cret", &created.body).as_str())
    );
    let deleted = by(&delete_only);
    assert_eq!(deleted.body, b"{}");
    assert_eq!(deleted.header("x-medplum-interaction"), Some("delete"));
    assert_eq!(
        deleted.header("x-medplum-deleted-resource"),
        Some(format!("Patient/{id}").as_str())
    );
    assert_eq!(
        deleted.header("x-signature"),
        Some(signature::x_signature("s3cret", b"{}").as_str())
    );
    let expected = signature::webhook_signature(
        "s3cret",
        deleted.header("webhook-id").unwrap(),
        deleted
            .header("webhook-timestamp")
            .unwrap()
            .parse()
            .unwrap(),
        b"{}",
    );
    assert_eq!(deleted.header("webhook-signature"), Some(expected.as_str()));
}

#[tokio::test]
async fn every_secret_url_signs() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let urls = [
        SECRET,
        "https://www.medplum.com/fhir/StructureDefinition-subscriptionSecret",
        "https://medplum.com/fhir/StructureDefinition/subscription-secret",
    ];
    for (n, url) in urls.iter().enumerate() {
        let sub = with_extensions(
            hook(&receiver.url, "Patient"),
            json!([{ "url": url, "valueString": format!("secret-{n}") }]),
        );
        create(&db.pool, project, &sub, None).await;
    }
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), 3);
    let mut secrets: Vec<String> = received
        .iter()
        .map(|r| {
            (0..3)
                .map(|n| format!("secret-{n}"))
                .find(|s| {
                    r.header("x-signature") == Some(signature::x_signature(s, &r.body).as_str())
                })
                .expect("signed with one of the secrets")
        })
        .collect();
    secrets.sort();
    assert_eq!(secrets, ["secret-0", "secret-1", "secret-2"]);
}

#[tokio::test]
async fn a_429_then_success_and_a_network_error_then_success() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let limited = Receiver::start(vec![Reply::Status(429, Some("1"))]).await;
    let flaky = Receiver::start(vec![Reply::Drop]).await;
    let sub_limited = create(&db.pool, project, &hook(&limited.url, "Patient"), None).await;
    let sub_flaky = create(&db.pool, project, &hook(&flaky.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;

    assert_eq!(limited.received().len(), 2);
    assert_eq!(flaky.received().len(), 2);
    assert_eq!(
        states(&db.pool, &sub_limited).await,
        [("succeeded".into(), 2, None)]
    );
    assert_eq!(
        states(&db.pool, &sub_flaky).await,
        [("succeeded".into(), 2, None)]
    );
    assert_eq!(
        audit_events(&db.pool, &sub_limited).await,
        [
            ("4".into(), "Attempt 0 received status 429".into()),
            ("0".into(), "Attempt 1 received status 200".into())
        ]
    );
    let flaky_events = audit_events(&db.pool, &sub_flaky).await;
    assert!(
        flaky_events[0].1.starts_with("Attempt 0 received error "),
        "{flaky_events:?}"
    );
    assert_eq!(
        flaky_events[1],
        ("0".into(), "Attempt 1 received status 200".into())
    );
    // Both attempts of one delivery carry the same webhook-id.
    let ids: Vec<_> = limited
        .received()
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids[0], ids[1]);
}

#[tokio::test]
async fn max_attempts_exhausted_and_custom_success_codes() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let failing = Receiver::start(vec![Reply::Status(500, None); 10]).await;
    let gone_ok = Receiver::start(vec![Reply::Status(404, None)]).await;
    let three = with_extensions(
        hook(&failing.url, "Patient"),
        json!([{ "url": "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts", "valueInteger": 3 }]),
    );
    let three = create(&db.pool, project, &three, None).await;
    let codes = with_extensions(
        hook(&gone_ok.url, "Patient"),
        json!([{ "url": "https://medplum.com/fhir/StructureDefinition/subscription-success-codes", "valueString": "200-299, 404" }]),
    );
    let codes = create(&db.pool, project, &codes, None).await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;

    assert_eq!(
        failing.received().len(),
        3,
        "max attempts counts total HTTP attempts"
    );
    let state = states(&db.pool, &three).await;
    assert_eq!((state[0].0.as_str(), state[0].1), ("failed", 3));
    assert_eq!(
        state[0].2,
        Some(
            Reason::Failed(FailureReason::Exhausted {
                attempts: 3,
                last: "Received status 500".into()
            })
            .to_string()
        ),
        "{state:?}"
    );
    assert_eq!(audit_events(&db.pool, &three).await.len(), 3);
    assert_eq!(
        states(&db.pool, &codes).await,
        [("succeeded".into(), 1, None)]
    );
}

#[tokio::test]
async fn audit_event_destinations() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let destination = |codes: &[&str]| {
        with_extensions(
            hook(&receiver.url, "Patient"),
            Value::Array(codes.iter().map(|c| json!({
                "url": "https://medplum.com/fhir/StructureDefinition/subscription-audit-event-destination",
                "valueCode": c
            })).collect()),
        )
    };
    let log = create(&db.pool, project, &destination(&["log"]), None).await;
    let resource = create(&db.pool, project, &destination(&["resource"]), None).await;
    let both = create(&db.pool, project, &destination(&["resource", "log"]), None).await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 3);
    assert_eq!(audit_events(&db.pool, &log).await.len(), 0);
    assert_eq!(audit_events(&db.pool, &resource).await.len(), 1);
    assert_eq!(audit_events(&db.pool, &both).await.len(), 1);
    let linked: Vec<(String, bool)> = sqlx::query_as(
        "SELECT subscription_id, audit_event_id IS NOT NULL FROM fhir_outbox.delivery_attempt",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (subscription, has_event) in linked {
        assert_eq!(has_event, subscription != log["id"].as_str().unwrap());
    }
}

#[tokio::test]
async fn subscription_or_resource_gone_before_delivery_stops_silently() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let ctx = WriteContext::default();
    let disabled = create(
        &db.pool,
        project,
        &hook(&receiver.url, "Patient?gender=male"),
        None,
    )
    .await;
    let deleted = create(
        &db.pool,
        project,
        &hook(&receiver.url, "Patient?gender=male"),
        None,
    )
    .await;
    let watcher = create(
        &db.pool,
        project,
        &hook(&receiver.url, "Patient?gender=female"),
        None,
    )
    .await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "gender": "male" }),
        None,
    )
    .await;
    let female = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "gender": "female" }),
        None,
    )
    .await;
    while p.dispatcher.dispatch_once().await.unwrap().changes > 0 {}

    let mut off = disabled.clone();
    off["status"] = json!("off");
    capture::update(
        &db.pool,
        project,
        "Subscription",
        disabled["id"].as_str().unwrap(),
        &off,
        None,
        &ctx,
    )
    .await
    .unwrap();
    capture::delete(
        &db.pool,
        project,
        "Subscription",
        deleted["id"].as_str().unwrap(),
        &ctx,
    )
    .await
    .unwrap();
    capture::delete(
        &db.pool,
        project,
        "Patient",
        female["id"].as_str().unwrap(),
        &ctx,
    )
    .await
    .unwrap();
    p.settle(&db.pool).await;

    assert!(
        receiver
            .received()
            .iter()
            .all(|r| r.header("x-medplum-interaction") == Some("delete")),
        "nothing but the watcher's delete notification was sent"
    );
    assert_eq!(
        states(&db.pool, &disabled).await,
        [(
            "skipped".into(),
            0,
            Some(SkipReason::Status("off".into()).to_string())
        )]
    );
    assert_eq!(
        states(&db.pool, &deleted).await,
        [(
            "skipped".into(),
            0,
            Some(SkipReason::SubscriptionDeleted.to_string())
        )]
    );
    let watcher_states = states(&db.pool, &watcher).await;
    assert_eq!(
        watcher_states[0],
        (
            "skipped".into(),
            0,
            Some(SkipReason::ResourceDeleted.to_string())
        )
    );
    assert_eq!(
        watcher_states[1].0, "succeeded",
        "the delete itself is delivered"
    );
    assert!(audit_events(&db.pool, &disabled).await.is_empty());
    assert!(audit_events(&db.pool, &deleted).await.is_empty());
}

/// A change whose resource has no row at all (written into the outbox by hand) matched by a criteria
/// of its type alone: the dispatcher does not read its versions, and the worker skips its delivery
/// with a reason that says what is wrong, never "deleted".
#[tokio::test]
async fn a_change_whose_resource_is_not_stored_is_skipped_with_that_reason() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let subscription = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;
    crate::common::ghost_change(&db.pool, project, "ghost").await;
    p.settle(&db.pool).await;
    assert_eq!(
        states(&db.pool, &subscription).await,
        [(
            "skipped".into(),
            0,
            Some(SkipReason::ResourceNotStored.to_string())
        )]
    );
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn a_stale_version_is_not_retried() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None)]).await;
    let sub = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let p = pipeline(
        &db.pool,
        DeliveryConfig {
            backoff: Backoff {
                base: Duration::from_millis(300),
                cap: Duration::from_millis(300),
            },
            ..fast_config()
        },
    );
    let patient = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let id = patient["id"].as_str().unwrap();
    while p.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
    p.worker.deliver_once().await.unwrap(); // version 1: 500, retry scheduled
    capture::update(
        &db.pool,
        project,
        "Patient",
        id,
        &json!({ "resourceType": "Patient", "id": id, "active": true }),
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    p.settle(&db.pool).await;

    let got = states(&db.pool, &sub).await;
    assert_eq!(got[0].0, "skipped");
    assert_eq!(
        got[0].2,
        Some(
            SkipReason::Superseded {
                version: 1,
                current: 2
            }
            .to_string()
        ),
        "{got:?}"
    );
    assert_eq!(got[1], ("succeeded".into(), 1, None));
    let versions: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.json()["meta"]["versionId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(versions, ["1", "2"]);
}

#[tokio::test]
async fn an_invalid_header_fails_at_once_without_a_request() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let mut sub = hook(&receiver.url, "Patient");
    sub["channel"]["header"] = json!(["Authorization Basic xyz"]);
    let sub = create(&db.pool, project, &sub, None).await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    assert!(receiver.received().is_empty());
    let got = states(&db.pool, &sub).await;
    assert_eq!((got[0].0.as_str(), got[0].1), ("failed", 0));
    assert!(
        got[0].2.as_deref().unwrap().contains("has no `:`"),
        "{got:?}"
    );
    assert!(audit_events(&db.pool, &sub).await.is_empty());
}

#[tokio::test]
async fn a_refused_endpoint_is_a_failed_attempt_with_the_reason() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // Matched while unsafe targets were allowed, delivered by a worker that refuses them.
    let sub = create(
        &db.pool,
        project,
        &hook("http://127.0.0.1:9/hook", "Patient"),
        None,
    )
    .await;
    let strict = pipeline(
        &db.pool,
        DeliveryConfig {
            allow_unsafe_outbound: false,
            ..fast_config()
        },
    );
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    strict.settle(&db.pool).await;
    let got = states(&db.pool, &sub).await;
    assert_eq!((got[0].0.as_str(), got[0].1), ("failed", 4));
    assert!(
        got[0]
            .2
            .as_deref()
            .unwrap()
            .contains("scheme `http` is not allowed"),
        "{got:?}"
    );
    let events = audit_events(&db.pool, &sub).await;
    assert_eq!(events.len(), 4);
    assert!(
        events[0]
            .1
            .contains("received error endpoint scheme `http` is not allowed"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_delivery_loses_nothing() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // The first request is held open, so the worker is surely mid-delivery when it is killed.
    let receiver = Receiver::start(vec![Reply::Stall(Duration::from_secs(30))]).await;
    let sub = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;

    let mut worker = crate::common::binary()
        .args([
            "run",
            "--database-url",
            &db.url,
            "--allow-unsafe-outbound",
            "--lease-seconds",
            "2",
        ])
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if !receiver.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        receiver.received().len(),
        1,
        "the worker reached the receiver"
    );
    worker.kill().unwrap(); // SIGKILL
    worker.wait().unwrap();

    // Another worker takes the delivery over once the lease expires.
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), 2, "delivered again after the kill");
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id"),
        "same webhook-id"
    );
    let got = states(&db.pool, &sub).await;
    assert_eq!(got[0].0, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_or_releases_them() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![
        Reply::Stall(Duration::from_millis(1500)),
        Reply::Stall(Duration::from_secs(20)),
    ])
    .await;
    let sub = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let run = |grace: &str| {
        crate::common::binary()
            .args([
                "run",
                "--database-url",
                &db.url,
                "--allow-unsafe-outbound",
                "--shutdown-grace-seconds",
                grace,
            ])
            .spawn()
            .unwrap()
    };
    let wait_for_request = |n: usize| {
        let receiver = &receiver;
        async move {
            for _ in 0..200 {
                if receiver.received().len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no request reached the receiver");
        }
    };

    // A generous grace period: the request in flight (1.5 s) completes before the process exits.
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let mut worker = run("10");
    wait_for_request(1).await;
    crate::common::sigterm(&worker);
    assert!(worker.wait().unwrap().success());
    assert_eq!(
        states(&db.pool, &sub).await,
        [("succeeded".into(), 1, None)]
    );

    // A short one: the stalled request is abandoned and its delivery released at once, not left to
    // its lease.
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let mut worker = run("0");
    wait_for_request(2).await;
    crate::common::sigterm(&worker);
    assert!(worker.wait().unwrap().success());
    let (state, lease): (String, Option<Uuid>) = sqlx::query_as(
        "SELECT state, lease_token FROM fhir_outbox.delivery ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), lease), ("pending", None));
    pipeline(&db.pool, fast_config()).settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 3);
    assert!(
        states(&db.pool, &sub)
            .await
            .iter()
            .all(|s| s.0 == "succeeded")
    );
}

/// A change matched by several subscriptions is read once by the claim that takes its deliveries
/// (the first carries the content for the others), and each receiver gets it whole. Another
/// project's resource with the same type, id and version (written by hand here: ids are UUIDs the
/// store makes) is a change of its own: its delivery never carries the first project's content.
#[tokio::test]
async fn the_deliveries_of_one_change_share_its_content_within_their_project() {
    let db = TestDb::new().await;
    let (a, b) = (db.project().await, db.project().await);
    let receiver = Receiver::start(vec![]).await;
    let p = pipeline(&db.pool, fast_config());
    for n in 0..3 {
        create(
            &db.pool,
            a,
            &hook(&format!("{}/a{n}", receiver.url), "Patient"),
            None,
        )
        .await;
    }
    create(
        &db.pool,
        b,
        &hook(&format!("{}/b", receiver.url), "Patient"),
        None,
    )
    .await;
    p.settle_dispatch().await;

    let in_a = create(
        &db.pool,
        a,
        &json!({ "resourceType": "Patient", "gender": "female" }),
        None,
    )
    .await;
    let id = in_a["id"].as_str().unwrap();
    let in_b = json!({ "resourceType": "Patient", "id": id, "gender": "male" });
    sqlx::query(
        "INSERT INTO fhir_outbox.resource (project_id, resource_type, id, version_id, live_version_id,
                                           deleted, last_updated)
         VALUES ($1, 'Patient', $2, 1, 1, false, now());
         ",
    )
    .bind(b)
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "SELECT fhir_outbox.write_version($1, 'Patient', $2, 1, NULL, 'create', $3, now(), NULL, 'r',
                                          gen_random_uuid()::text)",
    )
    .bind(b)
    .bind(id)
    .bind(&in_b)
    .execute(&db.pool)
    .await
    .unwrap();
    p.settle(&db.pool).await;

    let received = receiver.received();
    let mut paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/hook/a0", "/hook/a1", "/hook/a2", "/hook/b"]);
    for request in &received {
        let expected = if request.path == "/hook/b" {
            &in_b
        } else {
            &in_a
        };
        assert_eq!(
            &request.json(),
            expected,
            "the body sent to {}",
            request.path
        );
    }
    // Each of A's deliveries went out on its first claim.
    let claims: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT d.claims) FROM fhir_outbox.delivery d WHERE d.project_id = $1",
    )
    .bind(a)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(claims, 1);
}
