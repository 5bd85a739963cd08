//! An application that embeds fhir-outbox: it registers a bot handler (run for a subscription whose
//! endpoint is `Bot/<id>`) and a pre-commit handler (run inside its own writes), runs the dispatcher
//! and the delivery worker in-process, and writes resources.
//!
//! `cargo run --example embedded` (a throwaway PostgreSQL is started; set DATABASE_URL to use yours).
//! It checks what it shows and exits non-zero if anything is off, so CI runs it.

use anyhow::{Context, Result, ensure};
use fhir_outbox::bots::precommit::{PreCommit, PreCommitError};
use fhir_outbox::bots::{BotFailure, BotOutput, BotRegistry, HANDLER_EXTENSION};
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::delivery::DeliveryConfig;
use fhir_outbox::dispatch::DispatchConfig;
use fhir_outbox::pipeline::Pipeline;
use fhir_outbox::{db, project};
use pgtemp::{Durability, TempCluster};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<()> {
    let cluster = match std::env::var("DATABASE_URL") {
        Ok(_) => None,
        Err(_) => {
            Some(tokio::task::spawn_blocking(|| TempCluster::start(Durability::Fast)).await??)
        }
    };
    let url = match &cluster {
        Some(cluster) => cluster.url("postgres"),
        None => std::env::var("DATABASE_URL")?,
    };
    let pool = db::connect(
        &url,
        Pipeline::connections(&DispatchConfig::default(), &DeliveryConfig::default()),
    )
    .await?;
    db::migrate(&pool).await?;
    let project = project::create_project(&pool, "embedded example").await?;
    let mut settings = project::settings(&pool, project).await?;
    settings.pre_commit_subscriptions_enabled = Some(true);
    project::set_settings(&pool, project, &settings).await?;

    // The application's handlers. A bot handler is any async function of its input.
    let alerts: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut bots = BotRegistry::new();
    let seen = alerts.clone();
    bots.register("heart-rate-alert", move |input| {
        let seen = seen.clone();
        async move {
            let value = input
                .input
                .pointer("/valueQuantity/value")
                .and_then(Value::as_f64);
            match value {
                Some(bpm) if bpm > 120.0 => {
                    let alert = format!(
                        "tachycardia: {bpm} bpm in Observation/{}",
                        input.input["id"].as_str().unwrap_or("?")
                    );
                    seen.lock().unwrap().push(alert.clone());
                    Ok(BotOutput {
                        log: alert,
                        replacement: None,
                    })
                }
                Some(bpm) => Ok(BotOutput {
                    log: format!("{bpm} bpm is fine"),
                    replacement: None,
                }),
                None => Err(BotFailure::new("the Observation has no valueQuantity")),
            }
        }
    });
    bots.register("require-name", |input| async move {
        if input.input.get("name").is_none() {
            return Err(BotFailure::new("a Patient must have a name"));
        }
        let mut patient = input.input.clone();
        patient["meta"] =
            json!({ "tag": [{ "system": "https://example.org/checks", "code": "name-checked" }] });
        Ok(BotOutput {
            log: String::new(),
            replacement: Some(patient),
        })
    });

    // Bots and subscriptions are resources like any other.
    let ctx = WriteContext::default();
    let bot = |handler: &str| json!({ "resourceType": "Bot", "name": handler, "extension": [{ "url": HANDLER_EXTENSION, "valueString": handler }] });
    let alert_bot = capture::create(&pool, project, &bot("heart-rate-alert"), &ctx)
        .await?
        .resource;
    let name_bot = capture::create(&pool, project, &bot("require-name"), &ctx)
        .await?
        .resource;
    capture::create(&pool, project, &json!({
        "resourceType": "Subscription", "status": "active", "reason": "heart rate alerts",
        "criteria": "Observation?code=http://loinc.org|8867-4",
        "channel": { "type": "rest-hook", "endpoint": format!("Bot/{}", alert_bot["id"].as_str().unwrap()) }
    }), &ctx).await?;
    capture::create(&pool, project, &json!({
        "resourceType": "Subscription", "status": "active", "reason": "patients need names", "criteria": "Patient",
        "channel": { "type": "rest-hook", "endpoint": format!("Bot/{}", name_bot["id"].as_str().unwrap()) },
        "extension": [{ "url": "https://medplum.com/fhir/StructureDefinition/pre-commit-bot", "valueBoolean": true }]
    }), &ctx).await?;

    // The pipeline, in-process.
    let running = Pipeline::builder(pool.clone())
        .dispatch(DispatchConfig::default())
        .delivery(DeliveryConfig::default())
        .bots(bots.clone())
        .start()
        .await?;

    // The application's writes go through the pre-commit path, in its own transactions.
    let pre_commit = PreCommit::new(bots, true);
    let mut tx = pool.begin().await?;
    match pre_commit
        .create(
            &mut tx,
            project,
            &json!({ "resourceType": "Patient" }),
            &ctx,
        )
        .await
    {
        Err(PreCommitError::Rejected { outcome, .. }) => {
            println!("rejected before commit: {outcome}")
        }
        other => anyhow::bail!("the nameless Patient should have been rejected: {other:?}"),
    }
    tx.rollback().await?;
    let mut tx = pool.begin().await?;
    let patient = pre_commit
        .create(
            &mut tx,
            project,
            &json!({ "resourceType": "Patient", "name": [{ "family": "Chalmers" }] }),
            &ctx,
        )
        .await?
        .resource;
    tx.commit().await?;
    println!(
        "stored with the pre-commit bot's tag: {}",
        patient["meta"]["tag"]
    );
    ensure!(
        patient["meta"]["tag"][0]["code"] == "name-checked",
        "the replacement was not stored"
    );

    let subject = format!("Patient/{}", patient["id"].as_str().context("an id")?);
    for bpm in [72, 135, 88, 150] {
        let observation = json!({
            "resourceType": "Observation", "status": "final", "subject": { "reference": subject },
            "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
            "valueQuantity": { "value": bpm, "unit": "beats/minute" }
        });
        capture::create(&pool, project, &observation, &ctx).await?;
    }

    // The bot runs asynchronously, after each commit; each run is recorded as an AuditEvent.
    let executions = || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM fhir_outbox.audit_event WHERE content -> 'type' ->> 'code' = 'execute'",
        )
        .fetch_one(&pool)
    };
    let mut waited = Duration::ZERO;
    while executions().await? < 4 && waited < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    running.shutdown().await;
    let alerts = alerts.lock().unwrap().clone();
    for alert in &alerts {
        println!("bot alert: {alert}");
    }
    ensure!(alerts.len() == 2, "expected two alerts, got {alerts:?}");
    let executions = executions().await?;
    println!("{executions} bot runs recorded as AuditEvents");
    ensure!(
        executions == 4,
        "expected an execute AuditEvent per bot run"
    );
    pool.close().await;
    Ok(())
}
