//! The embedded migrations.

use crate::common::empty_database_url;
use fhir_outbox::db;

async fn applied(pool: &sqlx::PgPool) -> Vec<(i64, bool)> {
    sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A new database with the migrations before `version` applied: the schema a previous release
/// left, for a migration's test to fill.
async fn migrated_before(version: i64) -> sqlx::PgPool {
    let pool = db::connect(&empty_database_url().await, 4).await.unwrap();
    let previous = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            db::MIGRATOR
                .iter()
                .filter(|m| m.version < version)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    previous.run(&pool).await.unwrap();
    pool
}

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_are_a_no_op_the_second_time() {
    let url = empty_database_url().await;
    let pool = db::connect(&url, 2).await.unwrap();
    db::migrate(&pool).await.unwrap();
    let first = applied(&pool).await;
    assert_eq!(first.len(), db::MIGRATOR.iter().count());
    assert!(first.iter().all(|(_, success)| *success));
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'fhir_outbox'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(tables >= 5);

    db::migrate(&pool).await.unwrap();
    assert_eq!(applied(&pool).await, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let url = empty_database_url().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let pool = db::connect(&url, 1).await.unwrap();
            db::migrate(&pool).await
        }));
    }
    for task in tasks {
        task.await
            .unwrap()
            .expect("every concurrent migrate succeeds");
    }
    let pool = db::connect(&url, 1).await.unwrap();
    assert_eq!(applied(&pool).await.len(), db::MIGRATOR.iter().count());
}

/// The history migration (issue 17) on a database filled by the schema before it: every delivery,
/// attempt and AuditEvent is still there, read as before, each in its new table, and the pipeline
/// delivers what was pending.
#[tokio::test]
async fn the_history_migration_keeps_every_delivery_attempt_and_audit_event() {
    use crate::delivery::{create, fast_config, hook, pipeline};
    use crate::receiver::Receiver;
    use chrono::{DateTime, Utc};
    use fhir_outbox::capture::{self, WriteContext};
    use serde_json::{Value, json};
    use uuid::Uuid;
    const HISTORY_MIGRATION: i64 = 20261203000001;

    let pool = migrated_before(HISTORY_MIGRATION).await;

    // The previous schema, filled as its code filled it.
    let receiver = Receiver::start(vec![]).await;
    let project: Uuid = sqlx::query_scalar("SELECT fhir_outbox.create_project('before')")
        .fetch_one(&pool)
        .await
        .unwrap();
    let subscription = create(&pool, project, &hook(&receiver.url, "Patient"), None).await;
    let patient = create(&pool, project, &json!({ "resourceType": "Patient" }), None).await;
    sqlx::query("UPDATE fhir_outbox.outbox SET dispatched_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO fhir_outbox.delivery
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
              resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
              state, attempts, next_attempt_at, finished_at, reason, lease_token, lease_expires_at,
              last_status)
         SELECT $1, CASE WHEN s.state = 'pending' THEN $2 ELSE 'gone-' || s.n END, o.seq, $1,
                'Patient', $3, 1, 'create', o.changed_at, o.request_id, o.trace_id, now(), s.state,
                s.attempts, now(), s.finished_at, s.reason, s.lease, s.lease_expires, s.status
         FROM (SELECT * FROM fhir_outbox.outbox WHERE resource_type = 'Patient') o,
              (VALUES (1, 'pending', 0, NULL::timestamptz, NULL, NULL::uuid, NULL::timestamptz, NULL::int),
                      (2, 'in_flight', 1, NULL, 'Received status 503', gen_random_uuid(),
                       now() - interval '1 minute', 503),
                      (3, 'succeeded', 1, now() - interval '10 days', NULL, NULL, NULL, 200),
                      (4, 'succeeded', 1, now() - interval '1 minute', NULL, NULL, NULL, 200),
                      (5, 'failed', 2, now() - interval '2 days', 'Received status 503 (2 attempts)',
                       NULL, NULL, 503),
                      (6, 'skipped', 0, now(), 'a newer version was delivered', NULL, NULL, NULL),
                      (7, 'cancelled', 0, now(), 'cancelled by someone', NULL, NULL, NULL))
              AS s(n, state, attempts, finished_at, reason, lease, lease_expires, status)",
    )
    .bind(project)
    .bind(subscription["id"].as_str().unwrap())
    .bind(patient["id"].as_str().unwrap())
    .execute(&pool)
    .await
    .unwrap();
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT audit_event_id FROM fhir_outbox.create_audit_events(
             ARRAY[$1, $1, $1]::uuid[],
             ARRAY['{\"resourceType\": \"AuditEvent\", \"outcome\": \"0\"}',
                   '{\"resourceType\": \"AuditEvent\", \"outcome\": \"4\"}',
                   '{\"resourceType\": \"AuditEvent\", \"outcome\": \"0\"}']::jsonb[])
         ORDER BY ordinal",
    )
    .bind(project)
    .fetch_all(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO fhir_outbox.delivery_attempt
             (delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
              status, error, audit_event_id)
         SELECT d.id, d.project_id, d.subscription_id, a.n, coalesce(d.finished_at, now()) - interval '1 second',
                20, d.state = 'succeeded', d.last_status, d.reason, ($2::text[])[a.k]
         FROM fhir_outbox.delivery d
         JOIN (VALUES (3, 1, 1), (5, 1, 2), (5, 2, 3)) AS a(delivery, n, k)
           ON d.subscription_id = 'gone-' || a.delivery
         WHERE d.project_id = $1",
    )
    .bind(project)
    .bind(&events)
    .execute(&pool)
    .await
    .unwrap();
    // An application's AuditEvent that it changed afterwards: a versioned resource, it stays one.
    let context = WriteContext::default();
    let own = capture::create(
        &pool,
        project,
        &json!({ "resourceType": "AuditEvent", "outcome": "0" }),
        &context,
    )
    .await
    .unwrap()
    .resource;
    let own_id = own["id"].as_str().unwrap().to_owned();
    let mut changed = own.clone();
    changed["outcome"] = json!("8");
    capture::update(
        &pool,
        project,
        "AuditEvent",
        &own_id,
        &changed,
        None,
        &context,
    )
    .await
    .unwrap();

    type DeliveryRow = (
        i64,
        String,
        Uuid,
        Option<String>,
        i32,
        Option<DateTime<Utc>>,
        Option<Uuid>,
    );
    let deliveries = || {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, DeliveryRow>(
                "SELECT id, state, webhook_id, reason, attempts, finished_at, lease_token
                 FROM fhir_outbox.delivery ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    type AttemptRow = (i64, i64, i32, Option<i32>, Option<String>, DateTime<Utc>);
    let attempts = || {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, AttemptRow>(
                "SELECT id, delivery_id, attempt, status, audit_event_id, started_at
                 FROM fhir_outbox.delivery_attempt ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let read = |id: String, version: Option<i64>| {
        let pool = pool.clone();
        async move {
            match version {
                None => capture::read(&pool, project, "AuditEvent", &id).await,
                Some(v) => capture::vread(&pool, project, "AuditEvent", &id, v).await,
            }
            .unwrap()
        }
    };
    let deliveries_before = deliveries().await;
    let attempts_before = attempts().await;
    let mut events_before: Vec<Value> = Vec::new();
    for id in &events {
        events_before.push(read(id.clone(), None).await);
    }
    assert_eq!(deliveries_before.len(), 7);
    assert_eq!(attempts_before.len(), 3);

    db::migrate(&pool).await.unwrap();

    assert_eq!(deliveries().await, deliveries_before, "the delivery view");
    assert_eq!(attempts().await, attempts_before, "the attempt log");
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.unfinished_delivery").await,
        2,
        "pending and in flight in the hot table"
    );
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.finished_delivery").await,
        5
    );
    let before_today = count(
        "SELECT count(*) FROM fhir_outbox.finished_delivery
         WHERE finished_at < date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    )
    .await;
    assert!(before_today >= 2);
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.finished_delivery_before").await,
        before_today,
        "the days before the migration are in its `_before` partition"
    );
    for (id, before) in events.iter().zip(&events_before) {
        assert_eq!(&read(id.clone(), None).await, before, "read {id}");
        assert_eq!(&read(id.clone(), Some(1)).await, before, "vread {id}");
        let history = capture::history(&pool, project, "AuditEvent", id)
            .await
            .unwrap();
        assert_eq!(history.len(), 1);
    }
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.audit_event").await,
        3
    );
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.resource WHERE resource_type = 'AuditEvent'").await,
        1,
        "only the application's changed AuditEvent is still a resource"
    );
    assert_eq!(
        capture::history(&pool, project, "AuditEvent", &own_id)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        count(
            "SELECT (nextval('fhir_outbox.delivery_id_seq') > (SELECT max(id) FROM fhir_outbox.delivery))::int4::int8"
        )
        .await
            == 1
    );

    // The pending delivery is delivered; the in-flight one, whose lease expired and whose
    // subscription is gone, is skipped. Both end in history, with a stored AuditEvent.
    let p = pipeline(&pool, fast_config());
    p.settle(&pool).await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(
        count("SELECT count(*) FROM fhir_outbox.unfinished_delivery").await,
        0
    );
    let state = |subscription: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT state FROM fhir_outbox.delivery WHERE subscription_id = $1",
            )
            .bind(subscription)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        state(subscription["id"].as_str().unwrap().to_owned()).await,
        "succeeded"
    );
    assert_eq!(state("gone-2".into()).await, "skipped");
    let new_event: String = sqlx::query_scalar(
        "SELECT audit_event_id FROM fhir_outbox.delivery_attempt WHERE id > $1 AND audit_event_id IS NOT NULL",
    )
    .bind(attempts_before.last().unwrap().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        read(new_event.clone(), None).await["id"],
        new_event.as_str(),
        "a new AuditEvent is read by id"
    );
}

/// The migration that gives heartbeats and topics their own tables fills them from what is
/// already stored: exactly the live, active rest-hook subscriptions with a period, and the live
/// topics.
#[tokio::test]
async fn the_heartbeat_migration_lists_the_stored_subscriptions_that_have_a_period() {
    use crate::delivery::create;
    use crate::topics::{BACKPORT, encounter_complete_topic, topic_subscription};
    use fhir_outbox::capture::{self, WriteContext};
    use serde_json::json;
    use uuid::Uuid;
    const HEARTBEAT_MIGRATION: i64 = 20261208000001;

    let pool = migrated_before(HEARTBEAT_MIGRATION).await;
    let project: Uuid = sqlx::query_scalar("SELECT fhir_outbox.create_project('before')")
        .fetch_one(&pool)
        .await
        .unwrap();
    let with_period = |status: &str, seconds: i64| {
        let mut subscription = topic_subscription("https://example.org/hook", status, "empty", &[]);
        subscription["channel"]["extension"] = json!([{
            "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": seconds
        }]);
        subscription
    };
    let mut ids = Vec::new();
    for subscription in [
        with_period("active", 60),
        with_period("requested", 60),
        with_period("active", 0),
        topic_subscription("https://example.org/hook", "active", "empty", &[]),
        with_period("active", 30),
    ] {
        ids.push(
            create(&pool, project, &subscription, None).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    capture::delete(
        &pool,
        project,
        "Subscription",
        &ids[4],
        &WriteContext::default(),
    )
    .await
    .unwrap();

    let topic = create(&pool, project, &encounter_complete_topic(), None).await;
    let deleted_topic = create(&pool, project, &encounter_complete_topic(), None).await;
    capture::delete(
        &pool,
        project,
        "Basic",
        deleted_topic["id"].as_str().unwrap(),
        &WriteContext::default(),
    )
    .await
    .unwrap();
    create(
        &pool,
        project,
        &json!({"resourceType": "Basic", "code": {"text": "not a topic"}}),
        None,
    )
    .await;

    db::MIGRATOR.run(&pool).await.unwrap();
    let topics: Vec<String> = sqlx::query_scalar("SELECT id FROM fhir_outbox.subscription_topic")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(topics, [topic["id"].as_str().unwrap()]);
    let listed: Vec<(String, f64)> = sqlx::query_as(
        "SELECT subscription_id, extract(epoch FROM period)::float8
         FROM fhir_outbox.subscription_heartbeat",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(listed, vec![(ids[0].clone(), 60.0)]);
}
