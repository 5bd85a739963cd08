//! Operating it: auto-disable, and the operator commands run as a user would (CLI output included).

use crate::common::{TestDb, cli};
use crate::delivery::{audit_events, create, fast_config, hook, pipeline, states, with_extensions};
use crate::receiver::{Receiver, Reply};
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::delivery::auto_disable::{self, Trigger};
use fhir_outbox::delivery::{DeliveryConfig, FailureReason};
use serde_json::{Value, json};
use sqlx::PgPool;

const MAX_ATTEMPTS: &str = "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts";

fn one_attempt(url: &str) -> Value {
    with_extensions(
        hook(url, "Patient"),
        json!([{ "url": MAX_ATTEMPTS, "valueInteger": 1 }]),
    )
}

async fn subscription(pool: &PgPool, project: uuid::Uuid, subscription: &Value) -> Value {
    capture::read(
        pool,
        project,
        "Subscription",
        subscription["id"].as_str().unwrap(),
    )
    .await
    .unwrap()
}

fn disabling(after: u32) -> DeliveryConfig {
    DeliveryConfig {
        auto_disable: vec![Trigger {
            max_consecutive_failures: after,
            time_window_seconds: 3600,
        }],
        ..fast_config()
    }
}

#[tokio::test]
async fn final_failures_disable_a_subscription_and_a_success_resets_the_count() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![
        Reply::Status(500, None),
        Reply::Status(200, None),
        Reply::Status(500, None),
        Reply::Status(500, None),
    ])
    .await;
    let sub = create(&db.pool, project, &one_attempt(&receiver.url), None).await;
    let p = pipeline(&db.pool, disabling(2));
    let patient = json!({ "resourceType": "Patient" });
    for _ in 0..3 {
        create(&db.pool, project, &patient, None).await;
        p.settle(&db.pool).await;
    }
    // failure, success (resets), failure: still active.
    assert_eq!(
        subscription(&db.pool, project, &sub).await["status"],
        "active"
    );
    create(&db.pool, project, &patient, None).await;
    p.settle(&db.pool).await;
    let disabled = subscription(&db.pool, project, &sub).await;
    assert_eq!(disabled["status"], "off");
    assert_eq!(
        disabled["error"],
        "Automatically disabled after 2 consecutive failed events in the last 3600 seconds"
    );
    let events = audit_events(&db.pool, &sub).await;
    assert_eq!(events.last().unwrap().0, "8");
    // A disabled subscription gets nothing more.
    create(&db.pool, project, &patient, None).await;
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 4);
}

#[tokio::test]
async fn a_410_disables_at_once_and_a_project_can_turn_auto_disable_off() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let gone = Receiver::start(vec![Reply::Status(410, None)]).await;
    let sub = create(&db.pool, project, &hook(&gone.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    assert_eq!(gone.received().len(), 1, "no retry after 410");
    assert_eq!(
        states(&db.pool, &sub).await,
        [(
            "failed".into(),
            1,
            Some(FailureReason::Gone { attempts: 1 }.to_string())
        )]
    );
    let disabled = subscription(&db.pool, project, &sub).await;
    assert_eq!(disabled["status"], "off");
    assert_eq!(
        disabled["error"],
        "Automatically disabled: the endpoint answered 410 Gone"
    );

    let other = db.project().await;
    let settings = fhir_outbox::project::ProjectSettings {
        subscription_auto_disable: Some(Vec::new()),
        ..Default::default()
    };
    fhir_outbox::project::set_settings(&db.pool, other, &settings)
        .await
        .unwrap();
    assert_eq!(
        fhir_outbox::project::settings(&db.pool, other)
            .await
            .unwrap(),
        settings
    );
    let failing = Receiver::start(vec![Reply::Status(500, None); 5]).await;
    let kept = create(&db.pool, other, &one_attempt(&failing.url), None).await;
    let p = pipeline(&db.pool, disabling(1));
    create(&db.pool, other, &json!({ "resourceType": "Patient" }), None).await;
    p.settle(&db.pool).await;
    assert_eq!(
        subscription(&db.pool, other, &kept).await["status"],
        "active"
    );
}

#[tokio::test]
async fn auto_disable_never_overrides_an_administrator() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut sub = create(
        &db.pool,
        project,
        &hook("https://example.org/x", "Patient"),
        None,
    )
    .await;
    sub["status"] = json!("error");
    sub["error"] = json!("set by an administrator");
    let id = sub["id"].as_str().unwrap().to_owned();
    capture::update(
        &db.pool,
        project,
        "Subscription",
        &id,
        &sub,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let disabled = auto_disable::disable(
        &mut conn,
        project,
        &id,
        "Automatically disabled",
        &WriteContext::default(),
    )
    .await
    .unwrap();
    assert!(!disabled);
    let current = subscription(&db.pool, project, &sub).await;
    assert_eq!(
        (current["status"].as_str(), current["error"].as_str()),
        (Some("error"), Some("set by an administrator"))
    );
}

#[tokio::test]
async fn find_a_failed_delivery_in_sql_and_retry_it_from_the_cli() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None)]).await;
    let sub = create(&db.pool, project, &one_attempt(&receiver.url), None).await;
    let sub_id = sub["id"].as_str().unwrap();
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;

    // The one SQL query README gives operators.
    let (failed_id, last_error): (i64, String) = sqlx::query_as(
        "SELECT id, reason FROM fhir_outbox.delivery WHERE state = 'failed' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(last_error.contains("Received status 500"));

    let project = project.to_string();
    let (ok, text) = cli(&["status", "--database-url", &db.url, "--project", &project]);
    assert!(ok, "{text}");
    assert!(
        text.contains(sub_id) && text.contains("Received status 500"),
        "{text}"
    );
    let (ok, text) = cli(&[
        "deliveries",
        "--database-url",
        &db.url,
        "--project",
        &project,
        "--state",
        "failed",
        "--json",
    ]);
    assert!(ok, "{text}");
    let rows: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rows[0]["id"], failed_id);
    // What a receiver logs (webhook-id), what it answered last, and how often it was tried.
    assert_eq!(
        rows[0]["webhook_id"].as_str(),
        receiver.received()[0].header("webhook-id"),
        "{text}"
    );
    assert_eq!(rows[0]["last_status"], 500, "{text}");
    assert_eq!(rows[0]["attempts"], 1, "{text}");
    let (ok, text) = cli(&[
        "deliveries",
        "--database-url",
        &db.url,
        "--project",
        &project,
        "--state",
        "failed",
    ]);
    assert!(
        ok && text.contains("last status") && text.contains("500"),
        "{text}"
    );

    let (ok, text) = cli(&[
        "retry",
        "--database-url",
        &db.url,
        "--project",
        &project,
        "--delivery",
        &failed_id.to_string(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("Retrying 1 deliveries: [{failed_id}]")),
        "{text}"
    );
    p.settle(&db.pool).await;
    assert_eq!(states(&db.pool, &sub).await[0].0, "succeeded");
    assert_eq!(receiver.received().len(), 2);
    assert_eq!(
        receiver.received()[0].header("webhook-id"),
        receiver.received()[1].header("webhook-id")
    );

    let (ok, text) = cli(&[
        "retry",
        "--database-url",
        &db.url,
        "--project",
        &project,
        "--subscription",
        sub_id,
    ]);
    assert!(ok && text.contains("Nothing to retry"), "{text}");
    // Another project cannot see or retry this one's deliveries.
    let other = db.project().await.to_string();
    let (ok, text) = cli(&[
        "status",
        "--database-url",
        &db.url,
        "--project",
        &other,
        "--json",
    ]);
    assert!(ok, "{text}");
    let status: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["subscriptions"], json!([]), "{text}");
    let (ok, text) = cli(&[
        "deliveries",
        "--database-url",
        &db.url,
        "--project",
        &other,
        "--json",
    ]);
    assert!(
        ok && serde_json::from_str::<Value>(&text).unwrap() == json!([]),
        "{text}"
    );
    sqlx::query("UPDATE fhir_outbox.delivery SET state = 'failed'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (ok, text) = cli(&[
        "retry",
        "--database-url",
        &db.url,
        "--project",
        &other,
        "--delivery",
        &failed_id.to_string(),
    ]);
    // Another project's delivery is unknown here: an error, and it is left as it is.
    assert!(
        !ok && text.contains(&format!("delivery {failed_id} not found in this project")),
        "{text}"
    );
    let state: String = sqlx::query_scalar("SELECT state FROM fhir_outbox.delivery WHERE id = $1")
        .bind(failed_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "failed");
}

#[tokio::test]
async fn pause_holds_deliveries_and_resume_sends_them() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let sub = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let sub_id = sub["id"].as_str().unwrap();
    let p = pipeline(&db.pool, fast_config());
    let project_text = project.to_string();
    let (ok, text) = cli(&[
        "pause",
        "--database-url",
        &db.url,
        "--project",
        &project_text,
        "--subscription",
        sub_id,
    ]);
    assert!(ok && text.contains("paused"), "{text}");
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    while p.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
    p.worker.deliver_once().await.unwrap();
    assert!(receiver.received().is_empty());
    assert_eq!(states(&db.pool, &sub).await[0].0, "pending");
    let (ok, text) = cli(&[
        "status",
        "--database-url",
        &db.url,
        "--project",
        &project_text,
        "--json",
    ]);
    assert!(ok, "{text}");
    let status: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["subscriptions"][0]["paused"], true);
    assert_eq!(status["subscriptions"][0]["pending"], 1);

    let (ok, text) = cli(&[
        "resume",
        "--database-url",
        &db.url,
        "--project",
        &project_text,
        "--subscription",
        sub_id,
    ]);
    assert!(ok && text.contains("resumed"), "{text}");
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 1);
    let (ok, text) = cli(&[
        "pause",
        "--database-url",
        &db.url,
        "--project",
        &project_text,
        "--subscription",
        "nope",
    ]);
    assert!(
        !ok && text.contains("Subscription/nope not found"),
        "{text}"
    );
}

#[tokio::test]
async fn resend_sends_the_current_version_again_to_one_or_all() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let a = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let b = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    let patient = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let id = patient["id"].as_str().unwrap();
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
    assert_eq!(receiver.received().len(), 4);

    let project_text = project.to_string();
    let reference = format!("Patient/{id}");
    let (ok, text) = cli(&[
        "resend",
        "--database-url",
        &db.url,
        "--project",
        &project_text,
        "--resource",
        &reference,
        "--subscription",
        a["id"].as_str().unwrap(),
    ]);
    assert!(ok && text.contains("Resent"), "{text}");
    p.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), 5);
    assert_eq!(
        received[4].header("x-medplum-subscription"),
        a["id"].as_str()
    );
    assert_eq!(received[4].header("x-medplum-interaction"), Some("update"));
    assert_eq!(received[4].json()["meta"]["versionId"], "2");

    let (ok, _) = cli(&[
        "resend",
        "--database-url",
        &db.url,
        "--project",
        &project_text,
        "--resource",
        &reference,
    ]);
    assert!(ok);
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 7, "to both");
    let _ = b;

    let other = db.project().await.to_string();
    let (ok, text) = cli(&[
        "resend",
        "--database-url",
        &db.url,
        "--project",
        &other,
        "--resource",
        &reference,
    ]);
    assert!(
        !ok && text.contains("does not exist in this project"),
        "{text}"
    );
    capture::delete(&db.pool, project, "Patient", id, &WriteContext::default())
        .await
        .unwrap();
    let (ok, text) = cli(&[
        "resend",
        "--database-url",
        &db.url,
        "--project",
        &project_text,
        "--resource",
        &reference,
    ]);
    assert!(!ok && text.contains("it is deleted"), "{text}");
}

#[tokio::test]
async fn retention_prunes_finished_work_and_keeps_what_is_open() {
    use fhir_outbox::operations::retention::{self, Pruned, Retention};
    use std::time::Duration;
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let sub = create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    for _ in 0..3 {
        create(
            &db.pool,
            project,
            &json!({ "resourceType": "Patient" }),
            None,
        )
        .await;
    }
    p.settle(&db.pool).await;
    // One change still waiting: neither its outbox row nor anything else open may go.
    let waiting = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    let count = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    let week = Retention {
        deliveries: Duration::from_secs(7 * 86_400),
        audit_events: None,
    };
    assert_eq!(
        retention::prune(&db.pool, week).await.unwrap(),
        Pruned::default(),
        "nothing is old yet"
    );
    let partitions = || {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'fhir_outbox.finished_delivery'::regclass ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let before = partitions().await;
    assert!(
        before.len() >= 8,
        "today and 7 days ahead are ready: {before:?}"
    );

    // Retention drops whole days: what finished today goes once all of today is past retention,
    // here as seen from the day after tomorrow with nothing kept.
    let now = Retention {
        deliveries: Duration::ZERO,
        audit_events: None,
    };
    let day_after_tomorrow = chrono::Utc::now() + chrono::Duration::days(2);
    let pruned = retention::prune_as_of(&db.pool, now, day_after_tomorrow)
        .await
        .unwrap();
    assert_eq!(
        (pruned.deliveries, pruned.attempts, pruned.audit_events),
        (3, 3, 0)
    );
    assert!(pruned.outbox_rows >= 3);
    assert!(
        pruned.partitions >= 4,
        "today's and the days before of both tables: {pruned:?}"
    );
    assert_eq!(count("SELECT count(*) FROM fhir_outbox.delivery").await, 0);
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.outbox WHERE dispatched_at IS NULL").await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.audit_event").await,
        3
    );
    let after = partitions().await;
    assert!(
        after.len() < before.len() && after.iter().all(|p| before.contains(p)),
        "partitions were dropped, none created: {before:?} → {after:?}"
    );

    let everything = Retention {
        deliveries: Duration::ZERO,
        audit_events: Some(Duration::ZERO),
    };
    assert_eq!(
        retention::prune_as_of(&db.pool, everything, day_after_tomorrow)
            .await
            .unwrap()
            .audit_events,
        3
    );
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.audit_event").await,
        0
    );
    // Resources and the Subscription are untouched, and the waiting change is still delivered.
    assert!(
        capture::read(
            &db.pool,
            project,
            "Patient",
            waiting["id"].as_str().unwrap()
        )
        .await
        .is_ok()
    );
    p.settle(&db.pool).await;
    assert_eq!(states(&db.pool, &sub).await.len(), 1);
    assert_eq!(receiver.received().len(), 4);
}

/// Issues of a subscription's earlier versions (never shown, never acted on) go once they were
/// last seen before the retention horizon; the current version's stay, however old.
#[tokio::test]
async fn retention_removes_the_issues_of_earlier_subscription_versions() {
    use fhir_outbox::operations::retention::{self, Retention};
    use std::time::Duration;
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let fixed = create(
        &db.pool,
        project,
        &hook(&receiver.url, "Patient?nmae=x"),
        None,
    )
    .await;
    let broken = create(
        &db.pool,
        project,
        &hook(&receiver.url, "Patient?nmae=y"),
        None,
    )
    .await;
    let p = pipeline(&db.pool, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    let issues = || async {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT subscription_id, subscription_version FROM fhir_outbox.subscription_issue
             ORDER BY 1, 2",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let (fixed_id, broken_id) = (
        fixed["id"].as_str().unwrap().to_owned(),
        broken["id"].as_str().unwrap().to_owned(),
    );
    let mut both = vec![(fixed_id.clone(), 1), (broken_id.clone(), 1)];
    both.sort();
    assert_eq!(issues().await, both, "one unknown-parameter issue each");
    let mut corrected = hook(&receiver.url, "Patient");
    corrected["id"] = json!(fixed_id);
    capture::update(
        &db.pool,
        project,
        "Subscription",
        &fixed_id,
        &corrected,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();

    let week = Retention {
        deliveries: Duration::from_secs(7 * 86_400),
        audit_events: None,
    };
    assert_eq!(retention::prune(&db.pool, week).await.unwrap().issues, 0);
    let nothing = Retention {
        deliveries: Duration::ZERO,
        audit_events: None,
    };
    let later = chrono::Utc::now() + chrono::Duration::days(2);
    let pruned = retention::prune_as_of(&db.pool, nothing, later)
        .await
        .unwrap();
    assert_eq!(pruned.issues, 1, "the corrected version's old issue");
    assert_eq!(
        issues().await,
        [(broken_id, 1)],
        "the current version's stays"
    );
}
