//! Bot endpoints: handlers registered by the embedding application, their AuditEvents and retries.

use crate::common::TestDb;
use crate::delivery::{Pipeline, create, fast_config, states, with_extensions};
use fhir_outbox::bots::{BotFailure, BotInput, BotOutput, BotRegistry, HANDLER_EXTENSION};
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::delivery::{DeliveryConfig, DeliveryWorker};
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn bot_pipeline(pool: &PgPool, bots: BotRegistry, config: DeliveryConfig) -> Pipeline {
    Pipeline {
        dispatcher: Dispatcher::new(pool.clone(), DispatchConfig::default()),
        worker: Arc::new(
            DeliveryWorker::new(pool.clone(), config)
                .unwrap()
                .with_bots(bots),
        ),
    }
}

fn bot(handler: &str, trigger: Option<&str>, destinations: &[&str]) -> Value {
    let mut bot = json!({
        "resourceType": "Bot", "name": "test bot",
        "extension": [{ "url": HANDLER_EXTENSION, "valueString": handler }]
    });
    if let Some(trigger) = trigger {
        bot["auditEventTrigger"] = json!(trigger);
    }
    if !destinations.is_empty() {
        bot["auditEventDestination"] = json!(destinations);
    }
    bot
}

fn bot_subscription(bot_id: &str) -> Value {
    json!({
        "resourceType": "Subscription", "status": "active", "reason": "bot", "criteria": "Patient",
        "channel": { "type": "rest-hook", "endpoint": format!("Bot/{bot_id}") }
    })
}

async fn execute_events(pool: &PgPool, bot_id: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT content FROM fhir_outbox.audit_event
         WHERE content -> 'type' ->> 'code' = 'execute' AND content -> 'source' -> 'observer' ->> 'reference' = $1
         ORDER BY recorded_at",
    )
    .bind(format!("Bot/{bot_id}"))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_bot_gets_the_resource_or_the_deleted_one_with_rest_hook_headers() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let seen: Arc<Mutex<Vec<BotInput>>> = Arc::default();
    let mut bots = BotRegistry::new();
    let record = seen.clone();
    bots.register("echo", move |input: BotInput| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(input.clone());
            Ok(BotOutput {
                log: format!("saw {}", input.interaction),
                replacement: None,
            })
        }
    });
    let bot_id = create(&db.pool, project, &bot("echo", None, &[]), None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sub = with_extensions(
        bot_subscription(&bot_id),
        json!([{ "url": "https://www.medplum.com/fhir/StructureDefinition/subscription-secret", "valueString": "s" }]),
    );
    let sub = create(&db.pool, project, &sub, None).await;
    let p = bot_pipeline(&db.pool, bots, fast_config());
    let patient = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "active": true }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    capture::delete(
        &db.pool,
        project,
        "Patient",
        patient["id"].as_str().unwrap(),
        &WriteContext::default(),
    )
    .await
    .unwrap();
    p.settle(&db.pool).await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].input, patient);
    assert_eq!(seen[1].input, json!({ "deletedResource": patient }));
    let header = |input: &BotInput, name: &str| {
        input
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header(&seen[0], "x-medplum-subscription"),
        sub["id"].as_str().map(str::to_owned)
    );
    assert_eq!(
        header(&seen[1], "x-medplum-interaction").as_deref(),
        Some("delete")
    );
    let signed = serde_json::to_vec(&seen[1].input).unwrap();
    assert_eq!(
        header(&seen[1], "x-signature"),
        Some(fhir_outbox::delivery::signature::x_signature("s", &signed))
    );
    let events = execute_events(&db.pool, &bot_id).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["type"]["code"], "execute");
    assert_eq!(events[0]["outcome"], "0");
    assert_eq!(events[0]["outcomeDesc"], "saw create");
    let roles: Vec<&str> = events[0]["entity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["role"]["display"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["Domain", "Patient", "Subscriber"]);
    assert!(
        states(&db.pool, &sub)
            .await
            .iter()
            .all(|s| s.0 == "succeeded")
    );
}

#[tokio::test]
async fn every_trigger_and_destination_combination() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut bots = BotRegistry::new();
    bots.register("quiet", |_| async { Ok(BotOutput::default()) });
    bots.register("talkative", |_| async {
        Ok(BotOutput {
            log: "output".into(),
            replacement: None,
        })
    });
    bots.register("failing", |_| async { Err(BotFailure::new("boom")) });
    let mut expected = Vec::new();
    for trigger in ["always", "never", "on-error", "on-output"] {
        for destinations in [&["resource"][..], &["log"][..], &["resource", "log"][..]] {
            for handler in ["quiet", "talkative", "failing"] {
                let bot_id = create(
                    &db.pool,
                    project,
                    &bot(handler, Some(trigger), destinations),
                    None,
                )
                .await["id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let sub = with_extensions(
                    bot_subscription(&bot_id),
                    json!([{ "url": "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts", "valueInteger": 1 }]),
                );
                create(&db.pool, project, &sub, None).await;
                let fires = match trigger {
                    "always" => true,
                    "never" => false,
                    "on-error" => handler == "failing",
                    _ => handler != "quiet",
                };
                let stored = fires && destinations.contains(&"resource");
                expected.push((bot_id, trigger, destinations.join("+"), handler, stored));
            }
        }
    }
    let p = bot_pipeline(&db.pool, bots, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    for (bot_id, trigger, destinations, handler, stored) in expected {
        let events = execute_events(&db.pool, &bot_id).await;
        assert_eq!(
            events.len(),
            usize::from(stored),
            "{trigger} / {destinations} / {handler}"
        );
        if let Some(event) = events.first() {
            assert_eq!(
                event["outcome"],
                if handler == "failing" { "4" } else { "0" }
            );
        }
    }
}

#[tokio::test]
async fn output_is_cut_to_its_last_bytes() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut bots = BotRegistry::new();
    bots.register("long", |_| async {
        Ok(BotOutput {
            log: format!("{}THE-END", "x".repeat(20 * 1024)),
            replacement: None,
        })
    });
    let default_bot = create(&db.pool, project, &bot("long", None, &[]), None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    create(&db.pool, project, &bot_subscription(&default_bot), None).await;
    let p = bot_pipeline(&db.pool, bots.clone(), fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;
    let desc = execute_events(&db.pool, &default_bot).await[0]["outcomeDesc"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(desc.len(), 10 * 1024);
    assert!(desc.ends_with("THE-END"));

    let project = db.project().await;
    let small_bot = create(&db.pool, project, &bot("long", None, &[]), None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    create(&db.pool, project, &bot_subscription(&small_bot), None).await;
    let p = bot_pipeline(
        &db.pool,
        bots,
        DeliveryConfig {
            bot_output_limit_resource: 100,
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
    p.settle(&db.pool).await;
    assert_eq!(
        execute_events(&db.pool, &small_bot).await[0]["outcomeDesc"]
            .as_str()
            .unwrap()
            .len(),
        100
    );
}

#[tokio::test]
async fn a_missing_handler_fails_clearly_and_a_failing_handler_is_retried() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut bots = BotRegistry::new();
    let counter = calls.clone();
    bots.register("flaky", move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(BotFailure::new("first call fails"))
            } else {
                Ok(BotOutput::default())
            }
        }
    });
    let two = json!([{ "url": "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts", "valueInteger": 2 }]);
    let unregistered = create(
        &db.pool,
        project,
        &bot("nobody-registered-this", None, &[]),
        None,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let missing_sub = create(
        &db.pool,
        project,
        &with_extensions(bot_subscription(&unregistered), two.clone()),
        None,
    )
    .await;
    let no_bot_sub = create(
        &db.pool,
        project,
        &with_extensions(bot_subscription("does-not-exist"), two.clone()),
        None,
    )
    .await;
    let flaky = create(&db.pool, project, &bot("flaky", None, &[]), None).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let flaky_sub = create(
        &db.pool,
        project,
        &with_extensions(bot_subscription(&flaky), two),
        None,
    )
    .await;
    let p = bot_pipeline(&db.pool, bots, fast_config());
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle(&db.pool).await;

    let missing = states(&db.pool, &missing_sub).await;
    assert_eq!((missing[0].0.as_str(), missing[0].1), ("failed", 2));
    assert!(
        missing[0]
            .2
            .as_deref()
            .unwrap()
            .contains("no handler is registered as `nobody-registered-this`"),
        "{missing:?}"
    );
    let no_bot = states(&db.pool, &no_bot_sub).await;
    assert!(
        no_bot[0]
            .2
            .as_deref()
            .unwrap()
            .contains("Bot/does-not-exist does not exist"),
        "{no_bot:?}"
    );
    assert_eq!(
        states(&db.pool, &flaky_sub).await[0],
        ("succeeded".into(), 2, None)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let events = execute_events(&db.pool, &flaky).await;
    assert_eq!(
        (events[0]["outcome"].as_str(), events[1]["outcome"].as_str()),
        (Some("4"), Some("0"))
    );
    assert_eq!(events[0]["outcomeDesc"], "first call fails");
}
