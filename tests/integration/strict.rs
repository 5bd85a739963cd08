//! No silent failures: a refused endpoint leaves skipped deliveries and one issue that `retry`
//! can act on; misconfigurations are recorded with the exact problem; Medplum's FHIRPath syntax
//! (double-quoted strings) fires end to end.

use crate::common::{TestDb, cli};
use crate::delivery::{create, fast_config, hook, pipeline, states, with_extensions};
use crate::receiver::Receiver;
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::delivery::{DeliveryConfig, DeliveryWorker};
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use fhir_outbox::operations::actions::{self, Action, Actor, RetryScope};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const FHIRPATH: &str = "https://medplum.com/fhir/StructureDefinition/fhir-path-criteria-expression";
const MAX_ATTEMPTS: &str = "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts";
const REFUSED: &str = "endpoint refused by the outbound URL check: ";

fn strict_dispatcher(pool: &PgPool) -> Dispatcher {
    Dispatcher::new(pool.clone(), DispatchConfig::default())
}

async fn dispatch_all(dispatcher: &Dispatcher) {
    while dispatcher.dispatch_once().await.unwrap().changes > 0 {}
}

/// (kind, message) of the issues recorded for a subscription.
async fn issues(pool: &PgPool, subscription: &Value) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT kind, message FROM fhir_outbox.subscription_issue
         WHERE subscription_id = $1 ORDER BY kind, message",
    )
    .bind(subscription["id"].as_str().unwrap())
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn update(pool: &PgPool, project: Uuid, resource: &Value) {
    capture::update(
        pool,
        project,
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap(),
        resource,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unsafe_endpoint_leaves_skipped_deliveries_one_issue_and_retry_sends_them() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // A loopback `http` receiver: refused unless unsafe outbound is allowed.
    let receiver = Receiver::start(Vec::new()).await;
    let sub = create(
        &db.pool,
        project,
        &hook(&receiver.url, "Patient?gender=male"),
        None,
    )
    .await;
    let dispatcher = strict_dispatcher(&db.pool);
    dispatch_all(&dispatcher).await;
    for gender in ["male", "female", "male"] {
        create(
            &db.pool,
            project,
            &json!({ "resourceType": "Patient", "gender": gender }),
            None,
        )
        .await;
    }
    dispatch_all(&dispatcher).await;
    // A second dispatcher (a restart) compiles the version again: still one issue.
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "gender": "male" }),
        None,
    )
    .await;
    dispatch_all(&strict_dispatcher(&db.pool)).await;

    // Only the matching changes, each a skipped delivery with the reason, finished.
    let got = states(&db.pool, &sub).await;
    assert_eq!(got.len(), 3, "{got:?}");
    for (state, attempts, reason) in &got {
        assert_eq!((state.as_str(), *attempts), ("skipped", 0));
        let reason = reason.as_deref().unwrap();
        assert!(reason.starts_with(REFUSED), "{reason}");
        assert!(reason.contains("scheme `http` is not allowed"), "{reason}");
    }
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.delivery WHERE finished_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(unfinished, 0);
    let recorded = issues(&db.pool, &sub).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].0, "endpoint_refused");
    assert!(
        recorded[0]
            .1
            .contains("refused without the allow-unsafe-outbound setting"),
        "{recorded:?}"
    );
    // The status view shows them.
    let (skipped, issue_count, last_skip): (i64, i64, Option<String>) = sqlx::query_as(
        "SELECT skipped, issues, last_skip_reason FROM fhir_outbox.subscription_delivery_status
         WHERE subscription_id = $1",
    )
    .bind(sub["id"].as_str().unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((skipped, issue_count), (3, 1));
    assert!(last_skip.unwrap().starts_with(REFUSED));

    // A strict worker has nothing to send.
    let strict_worker = std::sync::Arc::new(
        DeliveryWorker::new(
            db.pool.clone(),
            DeliveryConfig {
                allow_unsafe_outbound: false,
                ..fast_config()
            },
        )
        .unwrap(),
    );
    strict_worker.deliver_once().await.unwrap();
    assert!(receiver.received().is_empty());

    // The operator allows unsafe outbound and retries the subscription: all three are sent.
    let retried = actions::act(
        &db.pool,
        project,
        &Actor::command_line(),
        &Action::Retry(RetryScope::Subscription(
            sub["id"].as_str().unwrap().to_owned(),
        )),
    )
    .await
    .unwrap()
    .deliveries;
    assert_eq!(retried.len(), 3);
    pipeline(&db.pool, fast_config()).settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 3);
    let got = states(&db.pool, &sub).await;
    assert!(
        got.iter()
            .all(|(state, attempts, _)| state == "succeeded" && *attempts == 1),
        "{got:?}"
    );
}

#[tokio::test]
async fn misconfigurations_are_recorded_with_the_exact_problem() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let hook_url = "https://example.org/hook";
    let badmod = create(
        &db.pool,
        project,
        &hook(hook_url, "Patient?name:badmod=foo"),
        None,
    )
    .await;
    let unknown_param = create(&db.pool, project, &hook(hook_url, "Patient?nmae=foo"), None).await;
    let unknown_type = create(&db.pool, project, &hook(hook_url, "Patinet?name=foo"), None).await;
    let mut no_endpoint = hook(hook_url, "Patient");
    no_endpoint["channel"] = json!({ "type": "rest-hook" });
    let no_endpoint = create(&db.pool, project, &no_endpoint, None).await;
    let malformed = create(&db.pool, project, &hook("not a url", "Patient"), None).await;
    let attempts = |n: i64| {
        with_extensions(
            hook(hook_url, "Patient"),
            json!([{ "url": MAX_ATTEMPTS, "valueInteger": n }]),
        )
    };
    let zero = create(&db.pool, project, &attempts(0), None).await;
    let nineteen = create(&db.pool, project, &attempts(19), None).await;
    let fine = create(&db.pool, project, &attempts(18), None).await;
    let dispatcher = strict_dispatcher(&db.pool);
    dispatch_all(&dispatcher).await;
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "name": [{ "family": "foo", "given": ["foo"] }] }),
        None,
    )
    .await;
    dispatch_all(&dispatcher).await;

    let one = |kind: &str, message: &str| vec![(kind.to_owned(), message.to_owned())];
    assert_eq!(
        issues(&db.pool, &badmod).await,
        one(
            "unsupported",
            "criteria `name:badmod=foo`: unknown modifier `:badmod` on string parameter `name`; this filter never matches"
        )
    );
    assert_eq!(
        issues(&db.pool, &unknown_param).await,
        one(
            "unsupported",
            "criteria `nmae=foo`: `nmae` is not a search parameter of `Patient`; this filter never matches"
        )
    );
    assert_eq!(
        issues(&db.pool, &unknown_type).await,
        one(
            "invalid",
            "invalid criteria: `Patinet` is not a FHIR R4 resource type (nor one of Medplum's own)"
        )
    );
    assert_eq!(
        issues(&db.pool, &no_endpoint).await,
        one(
            "invalid",
            "rest-hook channel has no endpoint (channel.endpoint); nothing is delivered"
        )
    );
    let malformed_issues = issues(&db.pool, &malformed).await;
    assert_eq!(malformed_issues.len(), 1, "{malformed_issues:?}");
    assert_eq!(malformed_issues[0].0, "invalid");
    assert!(
        malformed_issues[0]
            .1
            .starts_with("malformed endpoint: endpoint is not a valid absolute URL"),
        "{malformed_issues:?}"
    );
    assert_eq!(
        issues(&db.pool, &zero).await,
        one(
            "invalid",
            "subscription-max-attempts 0 is not an integer from 1 to 18; using the default 4"
        )
    );
    assert_eq!(
        issues(&db.pool, &nineteen).await,
        one(
            "invalid",
            "subscription-max-attempts 19 is not an integer from 1 to 18; using the default 4"
        )
    );
    assert!(issues(&db.pool, &fine).await.is_empty());

    // What it does not understand never matches; the max-attempts ones deliver (with the default).
    for silent in [&badmod, &unknown_param, &unknown_type, &no_endpoint] {
        assert!(states(&db.pool, silent).await.is_empty(), "{silent}");
    }
    for delivered in [&zero, &nineteen, &fine] {
        assert_eq!(states(&db.pool, delivered).await.len(), 1, "{delivered}");
    }
    // A malformed endpoint is refused too: a skipped delivery says so.
    let got = states(&db.pool, &malformed).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "skipped");
    assert!(got[0].2.as_deref().unwrap().starts_with(REFUSED), "{got:?}");
}

#[test]
fn explain_says_no_match_for_an_unknown_modifier_and_not_sent_for_a_refused_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, value: &Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let patient = write(
        "patient.json",
        &json!({ "resourceType": "Patient", "id": "p1", "name": [{ "family": "foo" }] }),
    );
    let mut subscription = hook("https://example.org/hook", "Patient?name:badmod=foo");
    subscription["id"] = json!("s1");
    let badmod = write("badmod.json", &subscription);
    let (ok, text) = cli(&["explain", "--subscription", &badmod, "--resource", &patient]);
    assert!(ok, "{text}");
    assert!(
        text.contains("NO MATCH: search criteria")
            && text.contains("unknown modifier `:badmod` on string parameter `name`"),
        "{text}"
    );
    assert!(
        text.contains("note: criteria `name:badmod=foo`: unknown modifier"),
        "{text}"
    );

    let mut subscription = hook("http://127.0.0.1:9/hook", "Patient?name=foo");
    subscription["id"] = json!("s2");
    let refused = write("refused.json", &subscription);
    let (ok, text) = cli(&[
        "explain",
        "--subscription",
        &refused,
        "--resource",
        &patient,
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("MATCH, NOT SENT: endpoint refused by the outbound URL check")
            && text.contains("`skipped` delivery"),
        "{text}"
    );
}

#[tokio::test]
async fn a_double_quoted_fhirpath_criteria_fires_on_the_transition_only() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(Vec::new()).await;
    let sub = create(
        &db.pool,
        project,
        &with_extensions(
            hook(&receiver.url, "Encounter"),
            json!([{ "url": FHIRPATH,
                "valueString": r#"%previous.status = "in-progress" and %current.status = "completed""# }]),
        ),
        None,
    )
    .await;
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;
    assert!(issues(&db.pool, &sub).await.is_empty());

    let encounter = |status: &str| {
        json!({ "resourceType": "Encounter", "status": status,
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" } })
    };
    // Created completed: no previous, no transition.
    create(&db.pool, project, &encounter("completed"), None).await;
    // planned → in-progress → completed → completed (another change): one transition.
    let mut e = create(&db.pool, project, &encounter("planned"), None).await;
    for status in ["in-progress", "completed"] {
        e["status"] = json!(status);
        update(&db.pool, project, &e).await;
    }
    e["class"]["code"] = json!("IMP");
    update(&db.pool, project, &e).await;
    // in-progress → finished is another transition, not this one.
    let mut other = create(&db.pool, project, &encounter("in-progress"), None).await;
    other["status"] = json!("finished");
    update(&db.pool, project, &other).await;
    p.settle(&db.pool).await;

    let got = states(&db.pool, &sub).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "succeeded");
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let body = received[0].json();
    assert_eq!(body["id"], e["id"]);
    assert_eq!(body["status"], "completed");
    assert_eq!(body["meta"]["versionId"], "3");
}
