//! Pre-commit subscriptions: gated by server and project settings, a bot that rejects the write
//! (nothing written, nothing captured) or replaces the resource (the replacement is stored and captured).

use crate::common::{TestDb, outbox_count, version_count};
use crate::delivery::{create, fast_config, pipeline};
use fhir_outbox::bots::precommit::{PreCommit, PreCommitError};
use fhir_outbox::bots::{BotFailure, BotOutput, BotRegistry, HANDLER_EXTENSION};
use fhir_outbox::capture::{self, WriteContext};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

async fn setup(db: &TestDb, project_enabled: bool) -> uuid::Uuid {
    let project = db.project().await;
    let settings = fhir_outbox::project::ProjectSettings {
        pre_commit_subscriptions_enabled: Some(project_enabled),
        ..Default::default()
    };
    fhir_outbox::project::set_settings(&db.pool, project, &settings)
        .await
        .unwrap();
    let bot = create(
        &db.pool,
        project,
        &json!({
            "resourceType": "Bot", "name": "gatekeeper",
            "extension": [{ "url": HANDLER_EXTENSION, "valueString": "gatekeeper" }]
        }),
        None,
    )
    .await;
    create(&db.pool, project, &json!({
        "resourceType": "Subscription", "status": "active", "reason": "pre-commit", "criteria": "Patient",
        "channel": { "type": "rest-hook", "endpoint": format!("Bot/{}", bot["id"].as_str().unwrap()) },
        "extension": [{ "url": "https://medplum.com/fhir/StructureDefinition/pre-commit-bot", "valueBoolean": true }]
    }), None).await;
    project
}

/// Rejects Patients without a name; stamps a tag on the others.
fn gatekeeper(calls: Arc<AtomicUsize>) -> BotRegistry {
    let mut bots = BotRegistry::new();
    bots.register("gatekeeper", move |input| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let resource = input
                .input
                .get("deletedResource")
                .unwrap_or(&input.input)
                .clone();
            if resource.get("name").is_none() {
                return Err(BotFailure::new("a Patient needs a name"));
            }
            let mut replacement = resource;
            replacement["meta"] = json!({ "tag": [{ "code": "checked" }] });
            Ok(BotOutput {
                log: String::new(),
                replacement: Some(replacement),
            })
        }
    });
    bots
}

#[tokio::test]
async fn a_pre_commit_bot_rejects_or_replaces_the_write() {
    let db = TestDb::new().await;
    let project = setup(&db, true).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let pre_commit = PreCommit::new(gatekeeper(calls.clone()), true);
    let ctx = WriteContext::default();
    let (outbox_before, versions_before) = (
        outbox_count(&db.pool, project).await,
        version_count(&db.pool, project).await,
    );

    let mut tx = db.pool.begin().await.unwrap();
    let error = pre_commit
        .create(
            &mut tx,
            project,
            &json!({ "resourceType": "Patient" }),
            &ctx,
        )
        .await
        .unwrap_err();
    drop(tx);
    match &error {
        PreCommitError::Rejected {
            message, outcome, ..
        } => {
            assert_eq!(message, "a Patient needs a name");
            assert_eq!(
                outcome["issue"][0]["details"]["text"],
                "a Patient needs a name"
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        outbox_count(&db.pool, project).await,
        outbox_before,
        "nothing captured"
    );
    assert_eq!(
        version_count(&db.pool, project).await,
        versions_before,
        "nothing written"
    );

    let mut tx = db.pool.begin().await.unwrap();
    let written = pre_commit
        .create(
            &mut tx,
            project,
            &json!({ "resourceType": "Patient", "name": [{ "family": "A" }] }),
            &ctx,
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        written.resource["meta"]["tag"][0]["code"], "checked",
        "the replacement is stored"
    );
    let id = written.resource["id"].as_str().unwrap();
    let stored = capture::read(&db.pool, project, "Patient", id)
        .await
        .unwrap();
    assert_eq!(stored["meta"]["tag"][0]["code"], "checked");
    assert_eq!(
        outbox_count(&db.pool, project).await,
        outbox_before + 1,
        "the replacement is captured"
    );

    // A delete is shown to the bot too, and can be refused.
    let mut unnamed = stored.clone();
    unnamed.as_object_mut().unwrap().remove("name");
    let mut tx = db.pool.begin().await.unwrap();
    capture::update(&mut *tx, project, "Patient", id, &unnamed, None, &ctx)
        .await
        .unwrap();
    let refused = pre_commit
        .delete(&mut tx, project, "Patient", id, &ctx)
        .await;
    assert!(matches!(refused, Err(PreCommitError::Rejected { .. })));
    drop(tx);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // The asynchronous worker never delivers to a pre-commit subscription.
    pipeline(&db.pool, fast_config()).settle(&db.pool).await;
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.delivery")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(deliveries, 0);
}

#[tokio::test]
async fn pre_commit_needs_both_the_server_and_the_project_setting() {
    let db = TestDb::new().await;
    let ctx = WriteContext::default();
    let unnamed: Value = json!({ "resourceType": "Patient" });
    for (server, project_enabled) in [(false, true), (true, false)] {
        let project = setup(&db, project_enabled).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let pre_commit = PreCommit::new(gatekeeper(calls.clone()), server);
        let mut tx = db.pool.begin().await.unwrap();
        pre_commit
            .create(&mut tx, project, &unnamed, &ctx)
            .await
            .expect("not gated: written");
        tx.commit().await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "server {server}, project {project_enabled}"
        );
    }
}
