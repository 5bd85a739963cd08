//! `fhir-outbox explain`, run as a user would.

use crate::common::{TestDb, cli};
use fhir_outbox::capture::{self, WriteContext};
use serde_json::{Value, json};

fn explain(args: &[&str]) -> (bool, String) {
    cli(&[&["explain"], args].concat())
}

fn write_json(dir: &tempfile::TempDir, name: &str, value: &Value) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn explain_files_says_which_filter_failed() {
    let dir = tempfile::tempdir().unwrap();
    let subscription = write_json(
        &dir,
        "sub.json",
        &json!({
            "resourceType": "Subscription", "id": "s1", "status": "active", "reason": "r",
            "criteria": "Observation?status=final&code=http://loinc.org|8867-4",
            "channel": { "type": "rest-hook", "endpoint": "https://example.org/hook" }
        }),
    );
    let observation = write_json(
        &dir,
        "obs.json",
        &json!({
            "resourceType": "Observation", "id": "o1", "status": "preliminary",
            "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] }
        }),
    );
    let (ok, text) = explain(&["--subscription", &subscription, "--resource", &observation]);
    assert!(ok, "{text}");
    assert!(
        text.contains("Subscription/s1 vs Observation/o1 (create)"),
        "{text}"
    );
    assert!(text.contains("NO MATCH"), "{text}");
    assert!(text.contains("status=final"), "{text}");
    assert!(text.contains("preliminary"), "{text}");

    let final_obs = write_json(
        &dir,
        "final.json",
        &json!({
            "resourceType": "Observation", "id": "o1", "status": "final",
            "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] }
        }),
    );
    let (ok, text) = explain(&[
        "--subscription",
        &subscription,
        "--resource",
        &final_obs,
        "--json",
    ]);
    assert!(ok, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["matched"], true);
    assert_eq!(answer["interaction"], "create");

    let (ok, text) = explain(&[
        "--subscription",
        &subscription,
        "--resource",
        &final_obs,
        "--interaction",
        "patch",
    ]);
    assert!(!ok);
    assert!(text.contains("not create, update or delete"), "{text}");
}

#[tokio::test]
async fn explain_reads_stored_versions_and_uses_the_previous_one() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let ctx = WriteContext::default();
    let subscription = capture::create(&db.pool, project, &json!({
        "resourceType": "Subscription", "status": "active", "reason": "r", "criteria": "Patient",
        "channel": { "type": "rest-hook", "endpoint": "https://example.org/hook" },
        "extension": [{ "url": "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression",
                        "valueString": "%previous.active = false and %current.active = true" }]
    }), &ctx).await.unwrap();
    let sub_id = subscription.resource["id"].as_str().unwrap().to_owned();
    capture::update(
        &db.pool,
        project,
        "Patient",
        "p1",
        &json!({ "resourceType": "Patient", "id": "p1", "active": false }),
        None,
        &ctx,
    )
    .await
    .unwrap();
    capture::update(
        &db.pool,
        project,
        "Patient",
        "p1",
        &json!({ "resourceType": "Patient", "id": "p1", "active": true }),
        None,
        &ctx,
    )
    .await
    .unwrap();
    let project = project.to_string();
    let base = [
        "--database-url",
        db.url.as_str(),
        "--project",
        project.as_str(),
        "--subscription",
        sub_id.as_str(),
    ];

    let (ok, text) = explain(&[&base[..], &["--resource", "Patient/p1"]].concat());
    assert!(ok, "{text}");
    assert!(
        text.contains("(update)") && text.contains("MATCH: a delivery would be enqueued"),
        "{text}"
    );

    let (ok, text) = explain(&[&base[..], &["--resource", "Patient/p1/_history/1"]].concat());
    assert!(ok, "{text}");
    assert!(
        text.contains("(create)") && text.contains("NO MATCH") && text.contains("%previous.active"),
        "{text}"
    );

    // Another project sees nothing of this one.
    let other = db.project().await.to_string();
    let (ok, text) = explain(&[
        "--database-url",
        &db.url,
        "--project",
        &other,
        "--subscription",
        &sub_id,
        "--resource",
        "Patient/p1",
    ]);
    assert!(!ok);
    assert!(text.contains("not found"), "{text}");
}
