//! Dispatch: candidate subscriptions (spec §1.3–1.4), fan-out, caching, isolation and crash safety.

use crate::common::TestDb;
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::dispatch::{BatchReport, DispatchConfig, Dispatcher};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

const INTERACTION: &str =
    "https://medplum.com/fhir/StructureDefinition/subscription-supported-interaction";
const FHIRPATH: &str = "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression";

fn rest_hook(criteria: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "active",
        "reason": "test",
        "criteria": criteria,
        "channel": { "type": "rest-hook", "endpoint": "https://example.org/hook" }
    })
}

fn with(mut resource: Value, key: &str, value: Value) -> Value {
    resource[key] = value;
    resource
}

async fn create(pool: &PgPool, project: Uuid, resource: &Value) -> String {
    let written = capture::create(pool, project, resource, &WriteContext::default())
        .await
        .unwrap();
    written.resource["id"].as_str().unwrap().to_owned()
}

pub async fn put(pool: &PgPool, project: Uuid, resource: &Value) {
    let resource_type = resource["resourceType"].as_str().unwrap();
    let id = resource["id"].as_str().unwrap();
    capture::update(
        pool,
        project,
        resource_type,
        id,
        resource,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
}

/// Dispatches everything pending; returns the sum of the batch reports.
async fn dispatch_all(dispatcher: &Dispatcher) -> BatchReport {
    let mut total = BatchReport::default();
    loop {
        let report = dispatcher.dispatch_once().await.unwrap();
        if report.changes == 0 {
            return total;
        }
        total.changes += report.changes;
        total.deliveries += report.deliveries;
        total.evaluation_errors += report.evaluation_errors;
        total.undispatchable += report.undispatchable;
    }
}

fn dispatcher(pool: &PgPool) -> Dispatcher {
    Dispatcher::new(pool.clone(), DispatchConfig::default())
}

/// A dispatcher with server-scope subscriptions on.
fn with_server_scope(pool: &PgPool) -> Dispatcher {
    Dispatcher::new(
        pool.clone(),
        DispatchConfig {
            server_scoped_subscriptions: true,
            ..DispatchConfig::default()
        },
    )
}

/// A new project whose subscriptions are server-scope.
async fn server_scope_project(db: &TestDb) -> Uuid {
    let server = db.project().await;
    sqlx::query("UPDATE fhir_outbox.project SET server_scope = true WHERE id = $1")
        .bind(server)
        .execute(&db.pool)
        .await
        .unwrap();
    server
}

/// (subscription id, resource id, version, interaction) of every delivery, in insertion order.
async fn deliveries(pool: &PgPool) -> Vec<(String, String, i64, String)> {
    sqlx::query_as(
        "SELECT subscription_id, resource_id, version_id, interaction FROM fhir_outbox.delivery ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn delivered_to(pool: &PgPool, subscription: &str) -> Vec<(String, i64, String)> {
    deliveries(pool)
        .await
        .into_iter()
        .filter(|(s, ..)| s == subscription)
        .map(|(_, resource, version, interaction)| (resource, version, interaction))
        .collect()
}

/// Dispatches the subscription writes themselves, so later assertions only see the changes under test.
async fn settle(pool: &PgPool, dispatcher: &Dispatcher) {
    dispatch_all(dispatcher).await;
    sqlx::query("DELETE FROM fhir_outbox.delivery")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn one_change_fans_out_to_exactly_the_matching_subscriptions() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let mut matching = Vec::new();
    for _ in 0..5 {
        matching.push(create(&db.pool, project, &rest_hook("Patient?gender=female")).await);
    }
    create(&db.pool, project, &rest_hook("Patient?gender=male")).await;
    create(&db.pool, project, &rest_hook("Observation")).await;
    settle(&db.pool, &d).await;

    let patient = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "gender": "female" }),
    )
    .await;
    let report = dispatch_all(&d).await;
    assert_eq!(report.changes, 1);
    assert_eq!(report.deliveries, 5);
    let mut got: Vec<String> = deliveries(&db.pool)
        .await
        .into_iter()
        .map(|d| d.0)
        .collect();
    got.sort();
    matching.sort();
    assert_eq!(got, matching);
    assert!(
        deliveries(&db.pool)
            .await
            .iter()
            .all(|d| d.1 == patient && d.2 == 1 && d.3 == "create")
    );

    // The outbox row is dispatched: nothing more to do, and no duplicate.
    assert_eq!(dispatch_all(&d).await, BatchReport::default());
    assert_eq!(deliveries(&db.pool).await.len(), 5);
    let shared_time: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT matched_at) FROM fhir_outbox.delivery")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        shared_time, 1,
        "all deliveries of one change share its evaluation time"
    );
}

#[tokio::test]
async fn only_active_rest_hook_subscriptions_with_an_endpoint_are_candidates() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let active = create(&db.pool, project, &rest_hook("Patient")).await;
    for status in ["off", "requested", "error"] {
        create(
            &db.pool,
            project,
            &with(rest_hook("Patient"), "status", json!(status)),
        )
        .await;
    }
    for channel in [
        json!({ "type": "websocket" }),
        json!({ "type": "email", "endpoint": "mailto:a@b.c" }),
        json!({ "type": "rest-hook" }),
        json!({ "type": "rest-hook", "endpoint": "  " }),
    ] {
        create(
            &db.pool,
            project,
            &with(rest_hook("Patient"), "channel", channel),
        )
        .await;
    }
    let pre_commit = with(
        rest_hook("Patient"),
        "extension",
        json!([{ "url": "https://medplum.com/fhir/StructureDefinition/pre-commit-bot", "valueBoolean": true }]),
    );
    create(&db.pool, project, &pre_commit).await;
    create(
        &db.pool,
        project,
        &with(rest_hook(""), "criteria", json!("")),
    )
    .await;
    settle(&db.pool, &d).await;

    create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    dispatch_all(&d).await;
    let got: Vec<String> = deliveries(&db.pool)
        .await
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(got, [active]);
}

#[tokio::test]
async fn supported_interaction_extensions_are_a_set() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let interactions = |codes: &[&str]| {
        with(
            rest_hook("Patient"),
            "extension",
            Value::Array(
                codes
                    .iter()
                    .map(|c| json!({ "url": INTERACTION, "valueCode": c }))
                    .collect(),
            ),
        )
    };
    let all = create(&db.pool, project, &rest_hook("Patient")).await;
    let create_only = create(&db.pool, project, &interactions(&["create"])).await;
    let create_delete = create(&db.pool, project, &interactions(&["create", "delete"])).await;
    let update_only = create(&db.pool, project, &interactions(&["update"])).await;
    // In meta.extension the extension is ignored (Medplum issue #6704): this one gets everything.
    let mut misplaced = rest_hook("Patient");
    misplaced["meta"] = json!({ "extension": [{ "url": INTERACTION, "valueCode": "update" }] });
    let misplaced = create(&db.pool, project, &misplaced).await;
    settle(&db.pool, &d).await;

    let id = create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    put(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "id": id, "active": true }),
    )
    .await;
    capture::delete(&db.pool, project, "Patient", &id, &WriteContext::default())
        .await
        .unwrap();
    dispatch_all(&d).await;

    let kinds =
        |got: Vec<(String, i64, String)>| got.into_iter().map(|(_, _, i)| i).collect::<Vec<_>>();
    assert_eq!(
        kinds(delivered_to(&db.pool, &all).await),
        ["create", "update", "delete"]
    );
    assert_eq!(
        kinds(delivered_to(&db.pool, &misplaced).await),
        ["create", "update", "delete"]
    );
    assert_eq!(
        kinds(delivered_to(&db.pool, &create_only).await),
        ["create"]
    );
    assert_eq!(
        kinds(delivered_to(&db.pool, &create_delete).await),
        ["create", "delete"]
    );
    assert_eq!(
        kinds(delivered_to(&db.pool, &update_only).await),
        ["update"]
    );
    // The delete is delivered with the tombstone version.
    assert_eq!(delivered_to(&db.pool, &all).await[2].1, 3);
}

#[tokio::test]
async fn criteria_type_accounts_and_fhirpath_with_previous_decide() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let observations = create(&db.pool, project, &rest_hook("Observation?status=final")).await;
    let mut account_sub = rest_hook("Observation");
    account_sub["meta"] = json!({ "account": { "reference": "Organization/a" } });
    let account_sub = create(&db.pool, project, &account_sub).await;
    let status_changed = create(
        &db.pool,
        project,
        &with(
            rest_hook("Observation"),
            "extension",
            json!([{ "url": FHIRPATH, "valueString": "%previous.status != %current.status" }]),
        ),
    )
    .await;
    settle(&db.pool, &d).await;

    let id = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Observation", "status": "preliminary", "code": { "text": "x" },
                 "meta": { "accounts": [{ "reference": "Organization/a" }] } }),
    )
    .await;
    put(&db.pool, project, &json!({ "resourceType": "Observation", "id": id, "status": "final", "code": { "text": "x" } })).await;
    put(&db.pool, project, &json!({ "resourceType": "Observation", "id": id, "status": "final", "code": { "text": "y" } })).await;
    dispatch_all(&d).await;

    let versions =
        |got: Vec<(String, i64, String)>| got.into_iter().map(|(_, v, _)| v).collect::<Vec<_>>();
    assert_eq!(
        versions(delivered_to(&db.pool, &observations).await),
        [2, 3]
    );
    assert_eq!(
        versions(delivered_to(&db.pool, &account_sub).await),
        [1],
        "only version 1 is in the account"
    );
    // Version 1: %previous is {} so %previous.status is empty and the comparison is empty, not true.
    assert_eq!(versions(delivered_to(&db.pool, &status_changed).await), [2]);
}

/// Sequential scans of the outbox so far, this connection's included.
async fn outbox_seq_scans(pool: &PgPool) -> i64 {
    // A backend reports its table counters when it goes idle, at most once a second unless asked.
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query_scalar(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'fhir_outbox.outbox'::regclass",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The statement that writes a batch's deliveries keeps one generic plan: left to choose, PostgreSQL
/// planned it again at every call (its array parameters make a plan for the call's lengths look
/// cheaper), which cost more than executing it (docs/performance-history.md, run AD). The plan is
/// made while the outbox is nearly empty, and still marks the changes by key, never by reading the
/// whole outbox (run Y).
#[tokio::test]
async fn a_dispatch_batch_writes_with_a_plan_made_once() {
    // One connection, so that its prepared statements are the dispatcher's.
    let db = TestDb::with_pool_size(1).await;
    let project = db.project().await;
    create(&db.pool, project, &rest_hook("Patient")).await;
    let d = dispatcher(&db.pool);
    settle(&db.pool, &d).await;
    let scans_before = outbox_seq_scans(&db.pool).await;
    let batches = 8;
    for _ in 0..batches {
        create(&db.pool, project, &json!({"resourceType": "Patient"})).await;
        assert_eq!(dispatch_all(&d).await.deliveries, 1);
    }
    assert_eq!(
        outbox_seq_scans(&db.pool).await,
        scans_before,
        "a dispatch read the whole outbox"
    );
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements
         WHERE statement LIKE '%INSERT INTO fhir_outbox.unfinished_delivery%'
           AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(custom, 0, "planned again at some calls");
    assert!(
        generic >= batches,
        "{generic} executions of the generic plan"
    );
}

#[tokio::test]
async fn a_failing_subscription_is_recorded_and_never_blocks_the_others() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let good = create(&db.pool, project, &rest_hook("Patient")).await;
    // A runtime error: a string function on a collection of two names.
    let failing = create(
        &db.pool,
        project,
        &with(
            rest_hook("Patient"),
            "extension",
            json!([{ "url": FHIRPATH, "valueString": "Patient.name.family.contains('x')" }]),
        ),
    )
    .await;
    let unsupported = create(
        &db.pool,
        project,
        &rest_hook("Patient?organization.name=Acme"),
    )
    .await;
    let invalid = create(
        &db.pool,
        project,
        &rest_hook("Patient?birthdate=not-a-date"),
    )
    .await;
    settle(&db.pool, &d).await;

    for _ in 0..3 {
        create(
            &db.pool,
            project,
            &json!({ "resourceType": "Patient", "name": [{ "family": "a" }, { "family": "b" }] }),
        )
        .await;
    }
    let report = dispatch_all(&d).await;
    assert_eq!(report.changes, 3);
    assert_eq!(report.evaluation_errors, 3);
    assert_eq!(delivered_to(&db.pool, &good).await.len(), 3);
    for other in [&failing, &unsupported, &invalid] {
        assert!(delivered_to(&db.pool, other).await.is_empty());
    }
    let issues: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT subscription_id, kind, occurrences FROM fhir_outbox.subscription_issue ORDER BY kind",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        issues.contains(&(failing.clone(), "evaluation_error".into(), 3)),
        "{issues:?}"
    );
    assert!(
        issues.contains(&(unsupported.clone(), "unsupported".into(), 1)),
        "{issues:?}"
    );
    assert!(
        issues.contains(&(invalid.clone(), "invalid".into(), 1)),
        "{issues:?}"
    );
}

#[tokio::test]
async fn subscription_edits_take_effect_on_the_next_change() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    dispatch_all(&d).await; // warms the cache with no subscriptions
    assert!(deliveries(&db.pool).await.is_empty());

    let sub = create(&db.pool, project, &rest_hook("Patient?gender=male")).await;
    let male = json!({ "resourceType": "Patient", "gender": "male" });
    create(&db.pool, project, &male).await;
    dispatch_all(&d).await;
    assert_eq!(
        delivered_to(&db.pool, &sub).await.len(),
        1,
        "a new subscription is seen"
    );

    let mut edited = rest_hook("Patient?gender=female");
    edited["id"] = json!(sub);
    put(&db.pool, project, &edited).await;
    create(&db.pool, project, &male).await;
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "gender": "female" }),
    )
    .await;
    dispatch_all(&d).await;
    assert_eq!(
        delivered_to(&db.pool, &sub).await.len(),
        2,
        "the edited criteria apply"
    );

    let mut off = edited.clone();
    off["status"] = json!("off");
    put(&db.pool, project, &off).await;
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "gender": "female" }),
    )
    .await;
    dispatch_all(&d).await;
    assert_eq!(
        delivered_to(&db.pool, &sub).await.len(),
        2,
        "a disabled subscription gets nothing"
    );

    // Another dispatcher (another host) sees the same state: its cache starts cold.
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "gender": "female" }),
    )
    .await;
    dispatch_all(&dispatcher(&db.pool)).await;
    assert_eq!(delivered_to(&db.pool, &sub).await.len(), 2);
}

#[tokio::test]
async fn a_subscription_receives_only_changes_written_after_it_became_active() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let before = create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    let sub = create(&db.pool, project, &rest_hook("Patient")).await;
    let after = create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    dispatch_all(&d).await;
    let got: Vec<String> = delivered_to(&db.pool, &sub)
        .await
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(got, [after]);
    assert_ne!(got[0], before);
}

#[tokio::test]
async fn subscriptions_on_subscriptions_except_websocket_ones() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let watcher = create(&db.pool, project, &rest_hook("Subscription")).await;
    let rest = create(
        &db.pool,
        project,
        &with(rest_hook("Patient"), "status", json!("off")),
    )
    .await;
    create(
        &db.pool,
        project,
        &with(
            rest_hook("Patient"),
            "channel",
            json!({ "type": "websocket" }),
        ),
    )
    .await;
    dispatch_all(&d).await;
    let got: Vec<String> = delivered_to(&db.pool, &watcher)
        .await
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(
        got,
        [rest],
        "a rest-hook Subscription write triggers, a websocket one does not"
    );
}

#[tokio::test]
async fn projects_are_isolated_and_server_scope_is_opt_in() {
    let db = TestDb::new().await;
    let a = db.project().await;
    let b = db.project().await;
    let server = server_scope_project(&db).await;
    let in_a = create(&db.pool, a, &rest_hook("Patient")).await;
    let global = create(&db.pool, server, &rest_hook("Patient")).await;
    let d = dispatcher(&db.pool);
    settle(&db.pool, &d).await;

    create(&db.pool, b, &json!({ "resourceType": "Patient" })).await;
    dispatch_all(&d).await;
    assert!(
        deliveries(&db.pool).await.is_empty(),
        "A's and server subscriptions see nothing of B by default"
    );

    let with_server = with_server_scope(&db.pool);
    create(&db.pool, b, &json!({ "resourceType": "Patient" })).await;
    create(&db.pool, a, &json!({ "resourceType": "Patient" })).await;
    dispatch_all(&with_server).await;
    assert_eq!(
        delivered_to(&db.pool, &in_a).await.len(),
        1,
        "A's subscription: A's change only"
    );
    assert_eq!(
        delivered_to(&db.pool, &global).await.len(),
        2,
        "server scope: both projects"
    );
    let owners: Vec<(String, Uuid, Uuid)> = sqlx::query_as(
        "SELECT subscription_id, project_id, resource_project_id FROM fhir_outbox.delivery",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (subscription, owner, _) in owners {
        assert_eq!(owner, if subscription == global { server } else { a });
    }
}

/// `count` active rest-hook subscriptions to every Patient, each to an endpoint of its own, their
/// own writes dispatched.
async fn subscriptions_to_every_patient(pool: &PgPool, d: &Dispatcher, project: Uuid, count: i32) {
    sqlx::query(
        "SELECT fhir_outbox.create_resource($1, jsonb_build_object('resourceType', 'Subscription',
             'status', 'active', 'criteria', 'Patient',
             'channel', jsonb_build_object('type', 'rest-hook', 'endpoint', 'https://example.org/' || n)))
         FROM generate_series(1, $2) n",
    )
    .bind(project)
    .bind(count)
    .execute(pool)
    .await
    .unwrap();
    settle(pool, d).await;
}

#[tokio::test]
async fn there_is_no_cap_on_subscriptions_per_project() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    subscriptions_to_every_patient(&db.pool, &d, project, 1200).await;
    create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    assert_eq!(dispatch_all(&d).await.deliveries, 1200);
}

#[tokio::test]
async fn a_batch_inserts_at_most_50_000_deliveries_and_the_rest_follow() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    subscriptions_to_every_patient(&db.pool, &d, project, 300).await;
    // 170 changes × 300 subscriptions: 51,000 deliveries, within one batch's 500 changes.
    sqlx::query(
        "SELECT fhir_outbox.create_resource($1, '{\"resourceType\": \"Patient\"}')
         FROM generate_series(1, 170)",
    )
    .bind(project)
    .execute(&db.pool)
    .await
    .unwrap();
    let first = d.dispatch_once().await.unwrap();
    assert_eq!(
        first.changes, 166,
        "166 × 300 = 49,800 fit; one more would not"
    );
    assert_eq!(first.deliveries, 49_800);
    let rest = dispatch_all(&d).await;
    assert_eq!((rest.changes, rest.deliveries), (4, 1_200));
    assert_eq!(deliveries(&db.pool).await.len(), 51_000);
}

/// A dispatch commits without waiting for its WAL to reach disk, so a crash of PostgreSQL can lose
/// one whose deliveries a worker already sent. Dispatched again, each delivery must carry the
/// `webhook-id` it was sent with, for receivers to recognise the copy.
#[tokio::test]
async fn a_change_dispatched_again_gets_the_same_webhook_ids() {
    let db = TestDb::new().await;
    let project = db.project().await;
    subscriptions_to_every_patient(&db.pool, &dispatcher(&db.pool), project, 3).await;
    for _ in 0..2 {
        create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    }
    let webhook_ids = || async {
        sqlx::query_as::<_, (i64, String, Uuid)>(
            "SELECT outbox_seq, subscription_id, webhook_id FROM fhir_outbox.delivery
             ORDER BY outbox_seq, subscription_id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    dispatch_all(&dispatcher(&db.pool)).await;
    let first = webhook_ids().await;
    let distinct: std::collections::HashSet<Uuid> = first.iter().map(|row| row.2).collect();
    assert_eq!((first.len(), distinct.len()), (6, 6));
    // What the lost dispatch leaves: its changes undispatched, none of its deliveries.
    sqlx::raw_sql(
        "DELETE FROM fhir_outbox.delivery;
         UPDATE fhir_outbox.outbox SET dispatched_at = NULL WHERE resource_type = 'Patient'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(dispatch_all(&dispatcher(&db.pool)).await.deliveries, 6);
    assert_eq!(webhook_ids().await, first);
}

#[tokio::test]
async fn large_resources_make_small_batches_and_every_change_is_dispatched() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    // A criteria that reads the resource: the versions of its changes are read.
    create(&db.pool, project, &rest_hook("Patient?_id:missing=false")).await;
    settle(&db.pool, &d).await;
    // Seven Patients of about 3 MB each (hex, which compression hardly shrinks): 21 MB as stored,
    // more than a batch reads (16 MiB), in fewer changes than a batch claims (500).
    sqlx::query(
        "SELECT fhir_outbox.create_resource($1, jsonb_build_object('resourceType', 'Patient',
             'text', jsonb_build_object('status', 'generated', 'div',
                 '<div>' || (SELECT string_agg(md5(random()::text || n || g), '')
                             FROM generate_series(1, 95000) g) || '</div>')))
         FROM generate_series(1, 7) n",
    )
    .bind(project)
    .execute(&db.pool)
    .await
    .unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT sum(pg_column_size(content))::int8 FROM fhir_outbox.resource_version
         WHERE project_id = $1 AND resource_type = 'Patient'",
    )
    .bind(project)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        stored > 16 * 1024 * 1024,
        "the seven are {stored} bytes as stored"
    );
    let first = d.dispatch_once().await.unwrap();
    assert!(
        (1..7).contains(&first.changes),
        "the first batch stops at the budget: {} changes",
        first.changes
    );
    let rest = dispatch_all(&d).await;
    assert_eq!(first.changes + rest.changes, 7);
    assert_eq!(first.deliveries + rest.deliveries, 7);
    assert_eq!(deliveries(&db.pool).await.len(), 7);
}

#[tokio::test]
async fn a_row_whose_version_is_missing_is_set_aside_and_others_proceed() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    // A criteria that reads the resource: the versions of its changes are read.
    create(&db.pool, project, &rest_hook("Patient?_id:missing=false")).await;
    settle(&db.pool, &d).await;
    crate::common::ghost_change(&db.pool, project, "ghost").await;
    create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    let report = dispatch_all(&d).await;
    assert_eq!(
        (report.changes, report.deliveries, report.undispatchable),
        (2, 1, 1)
    );
    let error: Option<String> = sqlx::query_scalar(
        "SELECT dispatch_error FROM fhir_outbox.outbox WHERE resource_id = 'ghost'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(error.unwrap().contains("missing"));
}

/// In a project without a Subscription nothing can match, so the dispatcher reads no contents
/// (a version that is missing is not even noticed); a Subscription of any status, in the project
/// or (when configured) in a server-scope project, makes its changes read and matched again.
/// The `dispatch_error` of the outbox row of the resource `id` (one row expected).
async fn dispatch_error_of(pool: &PgPool, id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT dispatch_error FROM fhir_outbox.outbox WHERE resource_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn changes_are_read_only_for_subscriptions_that_evaluate_their_contents() {
    let db = TestDb::new().await;
    let quiet = db.project().await;
    let d = dispatcher(&db.pool);
    let ghost =
        |project: Uuid, id: &'static str| crate::common::ghost_change(&db.pool, project, id);
    let dispatch_error = |id: &'static str| dispatch_error_of(&db.pool, id);
    ghost(quiet, "unread").await;
    create(&db.pool, quiet, &json!({ "resourceType": "Patient" })).await;
    let report = dispatch_all(&d).await;
    assert_eq!(
        (report.changes, report.deliveries, report.undispatchable),
        (2, 0, 0)
    );
    assert_eq!(dispatch_error("unread").await, None);

    // A criteria of the type alone reads nothing of the resource: its change is matched, and
    // dispatched, without reading the version (a missing one fails its delivery, in the worker).
    create(&db.pool, quiet, &rest_hook("Patient")).await;
    settle(&db.pool, &d).await;
    ghost(quiet, "matched unread").await;
    let report = dispatch_all(&d).await;
    assert_eq!(
        (report.changes, report.deliveries, report.undispatchable),
        (1, 1, 0)
    );
    assert_eq!(dispatch_error("matched unread").await, None);

    // A Subscription whose criteria reads the resource makes the project's changes of its type
    // read (and a missing version sets the change aside, for every subscription).
    create(&db.pool, quiet, &rest_hook("Patient?active=true")).await;
    settle(&db.pool, &d).await;
    ghost(quiet, "read").await;
    let report = dispatch_all(&d).await;
    assert_eq!((report.changes, report.undispatchable), (1, 1));
    assert!(dispatch_error("read").await.unwrap().contains("missing"));

    // A server-scope project's Subscription is a candidate for every project's changes, when
    // server-scope subscriptions are on.
    let other = db.project().await;
    let server = server_scope_project(&db).await;
    create(&db.pool, server, &rest_hook("Patient")).await;
    let scoped = with_server_scope(&db.pool);
    settle(&db.pool, &scoped).await;
    create(&db.pool, other, &json!({ "resourceType": "Patient" })).await;
    let report = dispatch_all(&scoped).await;
    assert_eq!((report.changes, report.deliveries), (1, 1));
}

/// The same for subscriptions to a topic: a trigger of interactions alone reads nothing of the
/// resource; a subscription's filters on the type do.
#[tokio::test]
async fn topic_changes_are_read_only_when_a_trigger_or_filter_tests_their_contents() {
    const URL: &str = "http://example.org/fhir/SubscriptionTopic/patient-created";
    const XVER: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";
    let db = TestDb::new().await;
    let project = db.project().await;
    let d = dispatcher(&db.pool);
    let topic = json!({
        "resourceType": "Basic",
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
        "modifierExtension": [{"url": format!("{XVER}status"), "valueCode": "active"}],
        "extension": [
            {"url": format!("{XVER}url"), "valueUri": URL},
            {"url": format!("{XVER}resourceTrigger"), "extension": [
                {"url": "resource", "valueUri": "Patient"},
                {"url": "supportedInteraction", "valueCode": "create"}
            ]},
            {"url": format!("{XVER}canFilterBy"), "extension": [
                {"url": "resource", "valueUri": "Patient"},
                {"url": "filterParameter", "valueString": "gender"}
            ]}
        ]
    });
    let subscription = |filters: &[&str]| {
        let mut subscription = crate::topics::topic_subscription(
            "https://example.org/hook",
            "active",
            "id-only",
            filters,
        );
        subscription["criteria"] = json!(URL);
        subscription
    };
    let dispatch_error = |id: &'static str| dispatch_error_of(&db.pool, id);
    create(&db.pool, project, &topic).await;
    create(&db.pool, project, &subscription(&[])).await;
    settle(&db.pool, &d).await;
    crate::common::ghost_change(&db.pool, project, "unread").await;
    let report = dispatch_all(&d).await;
    assert_eq!(
        (report.changes, report.deliveries, report.undispatchable),
        (1, 1, 0)
    );
    assert_eq!(dispatch_error("unread").await, None);

    create(&db.pool, project, &subscription(&["Patient?gender=male"])).await;
    settle(&db.pool, &d).await;
    crate::common::ghost_change(&db.pool, project, "read").await;
    let report = dispatch_all(&d).await;
    assert_eq!((report.changes, report.undispatchable), (1, 1));
    assert!(dispatch_error("read").await.unwrap().contains("missing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_wakes_the_dispatcher_without_polling() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let sub = create(&db.pool, project, &rest_hook("Patient")).await;
    let dispatcher = std::sync::Arc::new(Dispatcher::new(
        db.pool.clone(),
        DispatchConfig {
            poll_interval: Duration::from_secs(3600),
            ..DispatchConfig::default()
        },
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(dispatcher.run(shutdown.clone()));
    // Let the first pass (which dispatches the subscription's own write) finish and the loop sleep:
    // it registers for a wake-up (writers notify only then, see tests/integration/wakeup.rs), looks
    // once more, and waits.
    for _ in 0..500 {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.dispatcher_waiting WHERE waiting")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    // Polling is an hour away, so only a notification can bring the delivery in this window.
    let mut delivered = false;
    for _ in 0..100 {
        if !delivered_to(&db.pool, &sub).await.is_empty() {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.unwrap();
    assert!(delivered, "the change was dispatched on its notification");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_batch_enqueues_nothing_twice() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut subscriptions = Vec::new();
    for _ in 0..4 {
        subscriptions.push(create(&db.pool, project, &rest_hook("Patient")).await);
    }
    settle(&db.pool, &dispatcher(&db.pool)).await;
    for _ in 0..10 {
        create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    }

    // Hold a lock that makes the dispatcher's delivery insert wait, so it is surely mid-batch when
    // killed: rows claimed, subscriptions evaluated, nothing committed.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE fhir_outbox.delivery IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut worker = crate::common::binary()
        .args(["run", "--database-url", &db.url, "--admin-addr", "off"])
        .spawn()
        .unwrap();
    let mut waiting = false;
    // The dispatch statement (`record_dispatch`), known by its start: pg_stat_activity keeps the
    // first 1 kB of a statement, and its delivery insert comes later.
    for _ in 0..200 {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'fhir-outbox' AND wait_event_type = 'Lock' AND query LIKE 'WITH d AS (%UNNEST%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if blocked > 0 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(waiting, "the worker reached the delivery insert");
    worker.kill().unwrap(); // SIGKILL
    worker.wait().unwrap();
    blocker.rollback().await.unwrap();
    // The dead worker's backend ends its transaction when it finds the connection closed.
    for _ in 0..200 {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fhir-outbox'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Its transaction died with it: nothing enqueued, nothing marked dispatched.
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.outbox WHERE dispatched_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending, 10);
    assert!(deliveries(&db.pool).await.is_empty());

    dispatch_all(&dispatcher(&db.pool)).await;
    assert_eq!(
        deliveries(&db.pool).await.len(),
        40,
        "10 changes x 4 subscriptions, exactly once"
    );
    let distinct: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT (outbox_seq, subscription_id)) FROM fhir_outbox.delivery",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(distinct, 40);
}

#[tokio::test]
async fn unsafe_endpoints_are_skipped_with_the_reason_unless_allowed() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let endpoint = |url: &str| json!({ "type": "rest-hook", "endpoint": url });
    let safe = create(&db.pool, project, &rest_hook("Patient")).await;
    let mut unsafe_ones = Vec::new();
    for url in [
        "http://example.org/hook",
        "https://127.0.0.1/hook",
        "https://169.254.169.254/",
        "https://localhost/x",
    ] {
        unsafe_ones.push(
            create(
                &db.pool,
                project,
                &with(rest_hook("Patient"), "channel", endpoint(url)),
            )
            .await,
        );
    }
    settle(&db.pool, &dispatcher(&db.pool)).await;
    create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    dispatch_all(&dispatcher(&db.pool)).await;
    // Only the safe one is pending; each unsafe one is a skipped delivery saying why.
    let got: Vec<(String, String)> = sqlx::query_as(
        "SELECT subscription_id, state FROM fhir_outbox.delivery WHERE state <> 'skipped'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(got, [(safe, "pending".to_owned())]);
    let skipped: Vec<(String, String)> = sqlx::query_as(
        "SELECT subscription_id, reason FROM fhir_outbox.delivery WHERE state = 'skipped' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(skipped.len(), unsafe_ones.len(), "{skipped:?}");
    for (subscription, reason) in &skipped {
        assert!(unsafe_ones.contains(subscription));
        assert!(
            reason.starts_with("endpoint refused by the outbound URL check: "),
            "{reason}"
        );
    }

    let permissive = Dispatcher::new(
        db.pool.clone(),
        DispatchConfig {
            allow_unsafe_outbound: true,
            ..DispatchConfig::default()
        },
    );
    create(&db.pool, project, &json!({ "resourceType": "Patient" })).await;
    dispatch_all(&permissive).await;
    assert_eq!(
        deliveries(&db.pool).await.len(),
        1 + unsafe_ones.len() + 1 + unsafe_ones.len()
    );
}
