//! Least-privilege roles (docs/roles.sql): the worker cannot alter the schema; an application's
//! writer role can write resources and nothing else.

use crate::common::TestDb;
use crate::delivery::{create, fast_config, hook, pipeline};
use crate::receiver::Receiver;
use crate::topics;
use sqlx::postgres::PgPoolOptions;

#[tokio::test]
async fn writer_and_worker_roles_have_exactly_what_they_need() {
    let db = TestDb::new().await;
    let project = db.project().await;
    db.psql(include_str!("../../docs/roles.sql"))
        .expect("roles.sql applies");
    db.psql(include_str!("../../docs/roles.sql"))
        .expect("roles.sql applies again");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (writer, worker) = (format!("writer_{suffix}"), format!("worker_{suffix}"));
    db.psql(&format!(
        "CREATE ROLE {writer} LOGIN IN ROLE fhir_outbox_writer; CREATE ROLE {worker} LOGIN IN ROLE fhir_outbox_worker;"
    ))
    .unwrap();
    let as_role = |role: &str| db.url.replacen("postgres@", &format!("{role}@"), 1);

    // The writer writes resources through the functions, and is refused everything else.
    let writer_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&as_role(&writer))
        .await
        .unwrap();
    // With a dispatcher waiting, so that the commit-time wake-up trigger notifies as the writer.
    let waiting = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO fhir_outbox.dispatcher_waiting (listener, backend_pid) VALUES ($1, pg_backend_pid())")
        .bind(waiting)
        .execute(&db.pool)
        .await
        .unwrap();
    let id: String = sqlx::query_scalar(
        "SELECT resource ->> 'id' FROM fhir_outbox.create_resource($1, '{\"resourceType\": \"Patient\"}')",
    )
    .bind(project)
    .fetch_one(&writer_pool)
    .await
    .expect("a writer creates resources");
    let read: serde_json::Value =
        sqlx::query_scalar("SELECT fhir_outbox.read_resource($1, 'Patient', $2)")
            .bind(project)
            .bind(&id)
            .fetch_one(&writer_pool)
            .await
            .expect("a writer reads resources");
    assert_eq!(read["id"], id.as_str());
    let taken: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.dispatcher_waiting WHERE waiting")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        taken, 0,
        "the writer's commit took the waiting request (and notified)"
    );
    // The answered request's row would stay as long as its backend lives: out of the way of the
    // dispatcher's checks below.
    sqlx::query("DELETE FROM fhir_outbox.dispatcher_waiting WHERE listener = $1")
        .bind(waiting)
        .execute(&db.pool)
        .await
        .unwrap();
    for refused in [
        "SELECT count(*) FROM fhir_outbox.outbox",
        "SELECT count(*) FROM fhir_outbox.delivery",
        "INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id, interaction, changed_at, request_id, trace_id) VALUES (gen_random_uuid(), 'Patient', 'x', 1, 'create', now(), 'r', 't')",
        "UPDATE fhir_outbox.resource SET deleted = true",
        "SELECT fhir_outbox.strip_empty('{}')",
        "SELECT count(*) FROM fhir_outbox.dispatcher_waiting",
        "DELETE FROM fhir_outbox.dispatcher_waiting",
        "CREATE TABLE fhir_outbox.mine (x int)",
    ] {
        let error = sqlx::query(refused)
            .execute(&writer_pool)
            .await
            .expect_err(refused);
        assert!(
            error.to_string().contains("permission denied"),
            "{refused}: {error}"
        );
    }

    // The worker runs the pipeline, and cannot touch the schema.
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    sqlx::query("SELECT fhir_outbox.create_resource($1, '{\"resourceType\": \"Patient\"}')")
        .bind(project)
        .execute(&writer_pool)
        .await
        .unwrap();
    let worker_pool = PgPoolOptions::new()
        .max_connections(12)
        .connect(&as_role(&worker))
        .await
        .unwrap();
    pipeline(&worker_pool, fast_config())
        .settle(&worker_pool)
        .await;
    // Its statistics check analyses as the schema's owner.
    fhir_outbox::operations::statistics::analyze_stale(&worker_pool)
        .await
        .unwrap();
    // A running dispatcher registers for wake-ups, removes stale requests, and withdraws its own.
    sqlx::query(
        "INSERT INTO fhir_outbox.dispatcher_waiting (listener, backend_pid) VALUES ($1, 0)",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&db.pool)
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let dispatcher = std::sync::Arc::new(fhir_outbox::dispatch::Dispatcher::new(
        worker_pool.clone(),
        fhir_outbox::dispatch::DispatchConfig::default(),
    ));
    let running = tokio::spawn(dispatcher.run(shutdown.clone()));
    let mut registered: Vec<i32> = Vec::new();
    for _ in 0..500 {
        registered = sqlx::query_scalar("SELECT backend_pid FROM fhir_outbox.dispatcher_waiting")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        if registered.len() == 1 && registered[0] != 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        registered.len() == 1 && registered[0] != 0,
        "the worker's dispatcher registered, and removed the stale row: {registered:?}"
    );
    shutdown.cancel();
    running.await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.dispatcher_waiting")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the worker's dispatcher removed its row");
    assert_eq!(
        receiver.received().len(),
        1,
        "the worker role delivers (and writes its AuditEvent)"
    );
    assert!(
        fhir_outbox::db::migrations_current(&worker_pool)
            .await
            .unwrap()
    );

    // Topic subscriptions: the worker applies a handshake's outcome (which locks the subscription
    // it updates) and queues heartbeats.
    create(&db.pool, project, &topics::encounter_complete_topic(), None).await;
    let requested = create(
        &db.pool,
        project,
        &topics::topic_subscription(&receiver.url, "requested", "empty", &[]),
        None,
    )
    .await;
    pipeline(&worker_pool, fast_config())
        .settle(&worker_pool)
        .await;
    let requested = requested["id"].as_str().unwrap();
    assert_eq!(
        topics::status_of(&db.pool, project, requested).await,
        "active",
        "the worker role's handshake activated the subscription"
    );
    let mut beating = topics::topic_subscription(&receiver.url, "active", "empty", &[]);
    beating["channel"]["extension"] = serde_json::json!([{
        "url": format!("{}backport-heartbeat-period", topics::BACKPORT), "valueUnsignedInt": 1
    }]);
    create(&db.pool, project, &beating, None).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let queued: i32 = sqlx::query_scalar("SELECT fhir_outbox.queue_heartbeats()")
        .fetch_one(&worker_pool)
        .await
        .expect("the worker role queues heartbeats");
    assert_eq!(queued, 1);
    for refused in [
        "ALTER TABLE fhir_outbox.delivery ADD COLUMN x int",
        "DROP TABLE fhir_outbox.delivery_attempt",
        "CREATE TABLE fhir_outbox.mine (x int)",
        "DROP FUNCTION fhir_outbox.strip_empty(jsonb)",
        "TRUNCATE fhir_outbox.outbox",
        "UPDATE fhir_outbox.resource_version SET content = '{}'",
    ] {
        let error = sqlx::query(refused)
            .execute(&worker_pool)
            .await
            .expect_err(refused);
        let text = error.to_string();
        assert!(
            text.contains("permission denied") || text.contains("must be owner"),
            "{refused}: {text}"
        );
    }
}
