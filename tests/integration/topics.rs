//! Topic-based subscriptions (the Subscriptions R5 Backport for R4) end to end: topics stored as
//! Basic resources, handshakes, heartbeats, event notifications in each payload content, filters,
//! event numbers across dispatchers (one of them killed), `$status` and `$events`, and a Medplum
//! criteria subscription alongside. Real writes, real dispatchers and workers, real HTTP to
//! loopback receivers; every bundle checked against the backport's R4 profiles.

use crate::common::TestDb;
use crate::delivery::{create, fast_config, hook, pipeline};
use crate::dispatch::put;
use crate::receiver::{Received, Receiver, Reply};
use fhir_outbox::capture;
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use fhir_outbox::topic::profile_problems;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use uuid::Uuid;

const TOPIC: &str = "http://example.org/fhir/SubscriptionTopic/encounter-complete";
pub const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
const XVER: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";

/// The backport IG's encounter-complete topic, in its R4 representation (a Basic resource): an
/// Encounter that becomes `finished` (created finished, or updated from another status),
/// filterable by subject.
pub fn encounter_complete_topic() -> Value {
    json!({
        "resourceType": "Basic",
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
        "modifierExtension": [{"url": format!("{XVER}status"), "valueCode": "active"}],
        "extension": [
            {"url": format!("{XVER}url"), "valueUri": TOPIC},
            {"url": format!("{XVER}resourceTrigger"), "extension": [
                {"url": "description", "valueMarkdown": "An encounter is completed."},
                {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Encounter"},
                {"url": "supportedInteraction", "valueCode": "create"},
                {"url": "supportedInteraction", "valueCode": "update"},
                {"url": "queryCriteria", "extension": [
                    {"url": "previous", "valueString": "status:not=finished"},
                    {"url": "resultForCreate", "valueCode": "test-passes"},
                    {"url": "current", "valueString": "status=finished"},
                    {"url": "resultForDelete", "valueCode": "test-fails"},
                    {"url": "requireBoth", "valueBoolean": true}
                ]}
            ]},
            {"url": format!("{XVER}canFilterBy"), "extension": [
                {"url": "resource", "valueUri": "Encounter"},
                {"url": "filterParameter", "valueString": "subject"}
            ]}
        ]
    })
}

/// A subscription to [`TOPIC`] per the backport profile.
pub fn topic_subscription(url: &str, status: &str, content: &str, filters: &[&str]) -> Value {
    let mut subscription = json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}backport-subscription")]},
        "status": status,
        "reason": "test",
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": url,
            "payload": "application/fhir+json",
            "_payload": {"extension": [
                {"url": format!("{BACKPORT}backport-payload-content"), "valueCode": content}
            ]}
        }
    });
    if !filters.is_empty() {
        subscription["_criteria"] = json!({"extension": filters.iter().map(|filter| json!({
            "url": format!("{BACKPORT}backport-filter-criteria"), "valueString": filter
        })).collect::<Vec<_>>()});
    }
    subscription
}

fn encounter(id: &str, status: &str, subject: &str) -> Value {
    json!({
        "resourceType": "Encounter", "id": id, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": subject}
    })
}

/// The first entry's parameters of a notification bundle, by name.
fn parameter<'a>(bundle: &'a Value, name: &str) -> Option<&'a Value> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()?
        .iter()
        .find(|parameter| parameter["name"] == name)
}

fn notification_type(bundle: &Value) -> &str {
    parameter(bundle, "type")
        .and_then(|parameter| parameter["valueCode"].as_str())
        .unwrap_or_default()
}

/// The event numbers a notification carries.
fn event_numbers(bundle: &Value) -> Vec<i64> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|parameter| parameter["name"] == "notification-event")
        .filter_map(|event| {
            event["part"].as_array()?.iter().find_map(|part| {
                (part["name"] == "event-number")
                    .then(|| part["valueString"].as_str()?.parse().ok())
                    .flatten()
            })
        })
        .collect()
}

/// Every bundle received, each checked against the backport's profiles.
fn bundles(receiver: &Receiver) -> Vec<Value> {
    receiver
        .received()
        .iter()
        .map(|received: &Received| {
            let bundle = received.json();
            let problems = profile_problems(&bundle);
            assert!(problems.is_empty(), "{problems:?} in {bundle:#}");
            bundle
        })
        .collect()
}

/// A console answer to GET `path`, asked with a viewer token of `project` (the answer must be a
/// 200 in JSON).
async fn fhir_get(pool: &PgPool, project: Uuid, path: &str) -> Value {
    use fhir_outbox::operations::console::{self, tokens};
    let (_, token) = tokens::create(pool, "receiver", tokens::Role::Viewer, Some(project))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = console::router(pool.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // No proxy: one from the environment would stand between the test and loopback.
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let answer = response.json().await.unwrap();
    server.abort();
    answer
}

pub async fn status_of(pool: &PgPool, project: Uuid, id: &str) -> String {
    capture::read(pool, project, "Subscription", id)
        .await
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_activates_and_events_arrive_in_each_payload_content_beside_a_criteria_subscription()
 {
    let db = TestDb::new().await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    let receivers = [
        Receiver::start(vec![]).await,
        Receiver::start(vec![]).await,
        Receiver::start(vec![]).await,
    ];
    let mut subscriptions = Vec::new();
    for (receiver, content) in receivers.iter().zip(["empty", "id-only", "full-resource"]) {
        let subscription = topic_subscription(&receiver.url, "requested", content, &[]);
        subscriptions.push(create(&db.pool, project, &subscription, None).await);
    }
    let medplum = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&medplum.url, "Encounter"), None).await;
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;

    for ((receiver, subscription), content) in
        receivers
            .iter()
            .zip(&subscriptions)
            .zip(["empty", "id-only", "full-resource"])
    {
        let id = subscription["id"].as_str().unwrap();
        let received = bundles(receiver);
        assert_eq!(received.len(), 1, "one handshake");
        assert_eq!(notification_type(&received[0]), "handshake");
        // The status profile: no topic in an `empty` notification.
        assert_eq!(
            parameter(&received[0], "topic").map(|topic| &topic["valueCanonical"]),
            (content != "empty").then_some(&json!(TOPIC)),
            "{content}"
        );
        assert_eq!(
            status_of(&db.pool, project, id).await,
            "active",
            "the handshake's success activates the subscription"
        );
    }

    // Two events (planned → finished, created finished); two changes that are not.
    put(&db.pool, project, &encounter("e1", "planned", "Patient/a")).await;
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    put(&db.pool, project, &encounter("e2", "finished", "Patient/b")).await;
    put(&db.pool, project, &encounter("e2", "finished", "Patient/c")).await;
    p.settle(&db.pool).await;

    for (receiver, content) in receivers.iter().zip(["empty", "id-only", "full-resource"]) {
        let events: Vec<Value> = bundles(receiver)
            .into_iter()
            .filter(|bundle| notification_type(bundle) == "event-notification")
            .collect();
        let mut numbers: Vec<i64> = events.iter().flat_map(event_numbers).collect();
        numbers.sort_unstable();
        assert_eq!(numbers, [1, 2], "{content}: events 1 and 2, once each");
        for bundle in &events {
            let entries = bundle["entry"].as_array().unwrap();
            let number = event_numbers(bundle)[0];
            let id = if number == 1 { "e1" } else { "e2" };
            match content {
                "empty" => assert_eq!(entries.len(), 1, "empty: the status alone"),
                "id-only" => {
                    assert_eq!(entries.len(), 2);
                    assert!(
                        entries[1]["fullUrl"]
                            .as_str()
                            .unwrap()
                            .ends_with(&format!("Encounter/{id}"))
                    );
                    assert!(entries[1].get("resource").is_none(), "id-only: no resource");
                }
                _ => {
                    assert_eq!(entries.len(), 2);
                    assert_eq!(entries[1]["resource"]["id"], id);
                    assert_eq!(entries[1]["resource"]["status"], "finished");
                }
            }
        }
    }
    // The Medplum subscription got every Encounter change, as Medplum sends them.
    let medplum_bodies: Vec<Value> = medplum.received().iter().map(Received::json).collect();
    assert_eq!(medplum_bodies.len(), 4);
    assert!(
        medplum_bodies
            .iter()
            .all(|body| body["resourceType"] == "Encounter")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_narrow_a_topic_and_an_undeclared_filter_matches_nothing_with_an_issue() {
    let db = TestDb::new().await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    let for_a = Receiver::start(vec![]).await;
    let undeclared = Receiver::start(vec![]).await;
    let a = topic_subscription(
        &for_a.url,
        "active",
        "id-only",
        &["Encounter?subject=Patient/a"],
    );
    create(&db.pool, project, &a, None).await;
    let bad = topic_subscription(
        &undeclared.url,
        "active",
        "id-only",
        &["Encounter?status=finished"],
    );
    let bad = create(&db.pool, project, &bad, None).await;
    let p = pipeline(&db.pool, fast_config());
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    put(&db.pool, project, &encounter("e2", "finished", "Patient/b")).await;
    put(&db.pool, project, &encounter("e3", "finished", "Patient/a")).await;
    p.settle(&db.pool).await;

    let received = bundles(&for_a);
    // Delivered concurrently: in any order.
    let mut focuses: Vec<&str> = received
        .iter()
        .map(|bundle| bundle["entry"][1]["fullUrl"].as_str().unwrap())
        .collect();
    focuses.sort_unstable();
    assert_eq!(focuses.len(), 2, "{focuses:?}");
    assert!(focuses[0].ends_with("Encounter/e1") && focuses[1].ends_with("Encounter/e3"));
    let mut numbers: Vec<i64> = received.iter().flat_map(event_numbers).collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        [1, 2],
        "numbered among this subscription's own events"
    );

    assert!(
        undeclared.received().is_empty(),
        "a refused filter matches nothing"
    );
    let issues: Vec<String> = sqlx::query_scalar(
        "SELECT message FROM fhir_outbox.subscription_issue WHERE subscription_id = $1",
    )
    .bind(bad["id"].as_str().unwrap())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        issues.iter().any(|message| message.contains("status")),
        "the refused filter is named: {issues:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handshake_sets_the_subscription_to_error() {
    let db = TestDb::new().await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    let receiver = Receiver::start(vec![Reply::Status(500, None); 3]).await;
    let mut subscription = topic_subscription(&receiver.url, "requested", "empty", &[]);
    subscription["extension"] = json!([{
        "url": "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts",
        "valueInteger": 2
    }]);
    let subscription = create(&db.pool, project, &subscription, None).await;
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 2, "two attempts");
    let id = subscription["id"].as_str().unwrap();
    assert_eq!(status_of(&db.pool, project, id).await, "error");
    // $status tells the receiver's owner why.
    let status = fhir_get(
        &db.pool,
        project,
        &format!("/fhir/{project}/Subscription/{id}/$status"),
    )
    .await;
    assert_eq!(parameter(&status, "status").unwrap()["valueCode"], "error");
    let error = parameter(&status, "error").unwrap()["valueCodeableConcept"]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("its latest notification failed") && error.contains("500"),
        "{error}"
    );
    // An error subscription is sent nothing.
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 2);
}

/// A handshake whose outcome cannot be written (here another application's trigger refuses the
/// new version) is not lost in the server log: the subscription keeps `requested`, and carries a
/// `status_update_failed` issue that `status` counts and that names the cause.
#[tokio::test]
async fn a_status_that_cannot_be_set_after_the_handshake_is_an_issue_in_status() {
    let db = TestDb::new().await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    db.psql(
        "CREATE FUNCTION public.no_active_subscriptions() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.content ->> 'status' = 'active' THEN
                 RAISE EXCEPTION 'subscriptions are activated by hand here';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER no_active_subscriptions BEFORE INSERT ON fhir_outbox.resource_version
             FOR EACH ROW WHEN (NEW.resource_type = 'Subscription')
             EXECUTE FUNCTION public.no_active_subscriptions();",
    )
    .unwrap();
    let receiver = Receiver::start(vec![]).await;
    let subscription = create(
        &db.pool,
        project,
        &topic_subscription(&receiver.url, "requested", "empty", &[]),
        None,
    )
    .await;
    pipeline(&db.pool, fast_config()).settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 1, "the handshake was sent");
    let id = subscription["id"].as_str().unwrap();
    assert_eq!(status_of(&db.pool, project, id).await, "requested");
    let (state, issues): (String, i64) = sqlx::query_as(
        "SELECT d.state, s.issues FROM fhir_outbox.delivery d
         JOIN fhir_outbox.subscription_delivery_status s USING (project_id, subscription_id)
         WHERE d.project_id = $1 AND d.subscription_id = $2 AND d.notification = 'handshake'",
    )
    .bind(project)
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), issues),
        ("succeeded", 1),
        "the delivery is recorded, and status counts the issue"
    );
    let message: String = sqlx::query_scalar(
        "SELECT message FROM fhir_outbox.subscription_issue
         WHERE project_id = $1 AND subscription_id = $2 AND kind = 'status_update_failed'",
    )
    .bind(project)
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        message.contains("could not be set to active")
            && message.contains("subscriptions are activated by hand here"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_subscription_gets_heartbeats_from_the_running_pipeline() {
    let db = TestDb::new().await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    let receiver = Receiver::start(vec![]).await;
    let mut subscription = topic_subscription(&receiver.url, "active", "id-only", &[]);
    subscription["channel"]["extension"] = json!([{
        "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": 1
    }]);
    create(&db.pool, project, &subscription, None).await;
    let running = fhir_outbox::pipeline::Pipeline::builder(db.pool.clone())
        .dispatch(DispatchConfig {
            allow_unsafe_outbound: true,
            poll_interval: Duration::from_millis(200),
            ..DispatchConfig::default()
        })
        .delivery(fast_config())
        .start()
        .await
        .unwrap();
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    let started = Instant::now();
    while receiver.received().len() < 3 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await;
    let received = bundles(&receiver);
    let types: Vec<&str> = received.iter().map(notification_type).collect();
    assert!(types.contains(&"event-notification"), "{types:?}");
    let heartbeats: Vec<&Value> = received
        .iter()
        .filter(|bundle| notification_type(bundle) == "heartbeat")
        .collect();
    assert!(heartbeats.len() >= 2, "{types:?}");
    let last = heartbeats.last().unwrap();
    assert_eq!(
        parameter(last, "events-since-subscription-start").unwrap()["valueString"],
        "1",
        "a heartbeat after the event counts it"
    );
    assert_eq!(
        last["entry"].as_array().unwrap().len(),
        1,
        "a heartbeat has no focus"
    );
}

/// A deleted subscription's event counter stays while its events are stored and for the retention
/// period after the deletion, so a subscription written again under that id never repeats a stored
/// number; then retention removes it.
#[tokio::test]
async fn retention_removes_the_event_counter_of_a_deleted_subscription_last() {
    use fhir_outbox::operations::retention::{self, Retention};
    let db = TestDb::new().await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    let receiver = Receiver::start(vec![]).await;
    let kept = create(
        &db.pool,
        project,
        &topic_subscription(&receiver.url, "active", "id-only", &[]),
        None,
    )
    .await;
    let deleted = create(
        &db.pool,
        project,
        &topic_subscription(&receiver.url, "active", "id-only", &[]),
        None,
    )
    .await;
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    pipeline(&db.pool, fast_config()).settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 2);
    let deleted = deleted["id"].as_str().unwrap();
    capture::delete(
        &db.pool,
        project,
        "Subscription",
        deleted,
        &capture::WriteContext::default(),
    )
    .await
    .unwrap();
    let counters = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT subscription_id FROM fhir_outbox.subscription_event_count ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let mut both = vec![kept["id"].as_str().unwrap().to_owned(), deleted.to_owned()];
    both.sort();
    let week = Retention {
        deliveries: Duration::from_secs(7 * 86_400),
        audit_events: None,
    };
    let pruned = retention::prune(&db.pool, week).await.unwrap();
    assert_eq!(pruned.event_counters, 0, "deleted just now, events stored");
    assert_eq!(counters().await, both);
    // Two days on with nothing kept: the events are gone, the deletion is past the horizon.
    let nothing = Retention {
        deliveries: Duration::ZERO,
        audit_events: None,
    };
    let later = chrono::Utc::now() + chrono::Duration::days(2);
    let pruned = retention::prune_as_of(&db.pool, nothing, later)
        .await
        .unwrap();
    assert_eq!(pruned.event_counters, 1);
    assert_eq!(
        counters().await,
        vec![kept["id"].as_str().unwrap().to_owned()]
    );
}

/// A heartbeat period that is not a whole number of seconds in range (too big for any integer, a
/// fraction, negative, a string, an object) never fails the Subscription's write, nor anyone
/// else's heartbeats: the dispatcher records it as an issue, and a valid one beside it beats.
#[tokio::test]
async fn odd_heartbeat_periods_refuse_no_write_and_stop_no_other_heartbeat() {
    let db = TestDb::new().await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    let receiver = Receiver::start(vec![]).await;
    let with_period = |value: Value| {
        let mut subscription = topic_subscription(&receiver.url, "active", "empty", &[]);
        subscription["channel"]["extension"] = json!([{
            "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": value
        }]);
        subscription
    };
    let odd: Vec<Value> = [
        json!(1e300),
        json!(1.5),
        json!(-3),
        json!("60"),
        json!({"seconds": 60}),
        json!(0),
        json!(4_294_967_296u64),
    ]
    .into_iter()
    .map(with_period)
    .collect();
    let written = capture::create_many(&db.pool, project, &odd, &Default::default())
        .await
        .expect("odd heartbeat periods refuse no write");
    assert_eq!(written.len(), odd.len());
    let valid = create(&db.pool, project, &with_period(json!(1)), None).await;
    let listed: Vec<String> =
        sqlx::query_scalar("SELECT subscription_id FROM fhir_outbox.subscription_heartbeat")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(listed, [valid["id"].as_str().unwrap()]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let queued: i32 = sqlx::query_scalar("SELECT fhir_outbox.queue_heartbeats()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 1, "the valid one beats");
    // The dispatcher says what is wrong with the others.
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    pipeline(&db.pool, fast_config()).settle(&db.pool).await;
    let with_issue: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT subscription_id) FROM fhir_outbox.subscription_issue
         WHERE project_id = $1 AND message LIKE '%backport-heartbeat-period%'",
    )
    .bind(project)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(with_issue, odd.len() as i64);
}

/// A topic rewritten as something else is gone for its subscriptions at once: they match nothing
/// and say so, as when it is deleted.
#[tokio::test]
async fn a_basic_that_stops_being_a_topic_unbinds_its_subscriptions() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let topic = create(&db.pool, project, &encounter_complete_topic(), None).await;
    let receiver = Receiver::start(vec![]).await;
    create(
        &db.pool,
        project,
        &topic_subscription(&receiver.url, "active", "id-only", &[]),
        None,
    )
    .await;
    let p = pipeline(&db.pool, fast_config());
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 1);

    let id = topic["id"].as_str().unwrap();
    capture::update(
        &db.pool,
        project,
        "Basic",
        id,
        &json!({"resourceType": "Basic", "id": id, "code": {"text": "no longer a topic"}}),
        None,
        &capture::WriteContext::default(),
    )
    .await
    .unwrap();
    put(&db.pool, project, &encounter("e2", "finished", "Patient/a")).await;
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 1, "no topic, no event");
    let issues: Vec<String> = sqlx::query_scalar(
        "SELECT message FROM fhir_outbox.subscription_issue WHERE project_id = $1",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        issues
            .iter()
            .any(|issue| issue.contains("no topic with url")),
        "{issues:?}"
    );
}

/// Writes `count` Encounters created finished (each one event of the topic), a few at a time.
async fn write_events(pool: &PgPool, project: Uuid, count: usize) {
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..4 {
        let pool = pool.clone();
        writers.spawn(async move {
            for n in (writer..count).step_by(4) {
                put(
                    &pool,
                    project,
                    &encounter(&format!("e{n}"), "finished", "Patient/a"),
                )
                .await;
            }
        });
    }
    while writers.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_numbers_have_no_gaps_across_two_dispatchers_and_one_killed_mid_batch() {
    let db = TestDb::with_pool_size(12).await;
    let project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    // Nothing listens there: this test is about the numbers the dispatchers give.
    let subscription = topic_subscription("http://127.0.0.1:9/hook", "active", "id-only", &[]);
    let subscription = create(&db.pool, project, &subscription, None).await;
    let id = subscription["id"].as_str().unwrap().to_owned();
    const EVENTS: usize = 600;

    // A dispatcher in a process of its own, killed while it dispatches.
    write_events(&db.pool, project, EVENTS / 2).await;
    let mut killed = crate::common::binary()
        .args([
            "run",
            "--database-url",
            &db.url,
            "--allow-unsafe-outbound",
            "--delivery-concurrency",
            "1",
        ])
        .env("FHIR_OUTBOX_DISPATCH_BATCH_SIZE", "20")
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let numbered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM fhir_outbox.delivery WHERE subscription_id = $1",
        )
        .bind(&id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if numbered > 0 || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed.kill().unwrap(); // SIGKILL, mid-dispatch
    killed.wait().unwrap();

    // Two dispatchers finish while more events are written.
    let config = DispatchConfig {
        allow_unsafe_outbound: true,
        batch_size: 25,
        ..DispatchConfig::default()
    };
    let dispatchers = [
        std::sync::Arc::new(Dispatcher::new(db.pool.clone(), config.clone())),
        std::sync::Arc::new(Dispatcher::new(db.pool.clone(), config)),
    ];
    let mut running = tokio::task::JoinSet::new();
    let writing = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for n in EVENTS / 2..EVENTS {
                put(
                    &pool,
                    project,
                    &encounter(&format!("e{n}"), "finished", "Patient/a"),
                )
                .await;
            }
        })
    };
    for dispatcher in &dispatchers {
        let dispatcher = dispatcher.clone();
        running.spawn(async move {
            let mut idle = 0;
            while idle < 50 {
                if dispatcher.dispatch_once().await.unwrap().changes == 0 {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                } else {
                    idle = 0;
                }
            }
        });
    }
    writing.await.unwrap();
    while running.join_next().await.is_some() {}

    let numbers: Vec<i64> = sqlx::query_scalar(
        "SELECT event_number FROM fhir_outbox.delivery
         WHERE subscription_id = $1 AND notification = 'event-notification' ORDER BY event_number",
    )
    .bind(&id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected: Vec<i64> = (1..=EVENTS as i64).collect();
    assert_eq!(numbers, expected, "1..{EVENTS}, no gap, no repeat");
    let focuses: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT resource_id) FROM fhir_outbox.delivery WHERE subscription_id = $1",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(focuses, EVENTS as i64, "one event per change");
    let counted: i64 = sqlx::query_scalar(
        "SELECT events_since_start FROM fhir_outbox.subscription_event_count WHERE subscription_id = $1",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(counted, EVENTS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_events_let_a_receiver_recover_the_events_it_missed() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let other_project = db.project().await;
    create(&db.pool, project, &encounter_complete_topic(), None).await;
    // Events 2 and 3 fail for good (one attempt each): the receiver misses them.
    let receiver = Receiver::start(vec![
        Reply::Status(200, None),
        Reply::Status(500, None),
        Reply::Status(500, None),
    ])
    .await;
    let mut subscription = topic_subscription(&receiver.url, "active", "full-resource", &[]);
    subscription["extension"] = json!([{
        "url": "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts",
        "valueInteger": 1
    }]);
    let subscription = create(&db.pool, project, &subscription, None).await;
    let id = subscription["id"].as_str().unwrap();
    let p = pipeline(&db.pool, fast_config());
    for n in 1..=4 {
        put(
            &db.pool,
            project,
            &encounter(&format!("e{n}"), "finished", "Patient/a"),
        )
        .await;
        // One at a time, so that the receiver's script meets the events in order.
        p.settle(&db.pool).await;
    }
    let delivered: Vec<i64> = bundles(&receiver).iter().flat_map(event_numbers).collect();
    assert_eq!(delivered, [1, 2, 3, 4], "every event was attempted once");

    let console = fhir_outbox::operations::console::router_with(
        db.pool.clone(),
        "https://fhir.example.org/r4".to_owned(),
    );
    let (_, token) = fhir_outbox::operations::console::tokens::create(
        &db.pool,
        "receiver",
        fhir_outbox::operations::console::tokens::Role::Viewer,
        Some(project),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, console).await.unwrap() });
    // No proxy: one from the environment would stand between the test and loopback.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: String, token: String| {
        let request = http.get(format!("{base}{path}")).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|value| value.to_str().unwrap().to_owned());
            (
                status,
                content_type,
                response.json::<Value>().await.unwrap(),
            )
        }
    };

    // $status: the receiver learns there were 4 events.
    let (code, content_type, status) = get(
        format!("/fhir/{project}/Subscription/{id}/$status"),
        token.clone(),
    )
    .await;
    assert_eq!(code, 200, "{status:#}");
    assert_eq!(content_type.as_deref(), Some("application/fhir+json"));
    assert_eq!(status["type"], "searchset");
    let parameters = &status["entry"][0]["resource"];
    assert_eq!(parameters["resourceType"], "Parameters");
    let value = |name: &str| {
        parameters["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|parameter| parameter["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(value("events-since-subscription-start")["valueString"], "4");
    assert_eq!(value("type")["valueCode"], "query-status");
    assert_eq!(value("status")["valueCode"], "active");
    assert_eq!(
        value("subscription")["valueReference"]["reference"],
        format!("https://fhir.example.org/r4/Subscription/{id}")
    );

    // $events: it asks for the two it missed, and gets them with their focus.
    let (code, _, events) = get(
        format!(
            "/fhir/{project}/Subscription/{id}/$events?eventsSinceNumber=2&eventsUntilNumber=3"
        ),
        token.clone(),
    )
    .await;
    assert_eq!(code, 200, "{events:#}");
    let problems = profile_problems(&events);
    assert!(problems.is_empty(), "{problems:?} in {events:#}");
    assert_eq!(notification_type(&events), "query-event");
    assert_eq!(event_numbers(&events), [2, 3]);
    let focus: Vec<&str> = events["entry"].as_array().unwrap()[1..]
        .iter()
        .map(|entry| entry["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(focus, ["e2", "e3"]);
    // …or asks for them id-only.
    let (_, _, id_only) = get(
        format!("/fhir/{project}/Subscription/{id}/$events?eventsSinceNumber=2&eventsUntilNumber=3&content=id-only"),
        token.clone(),
    )
    .await;
    assert!(id_only["entry"][1].get("resource").is_none());
    assert_eq!(
        id_only["entry"][1]["fullUrl"],
        "https://fhir.example.org/r4/Encounter/e2"
    );

    // Bad input is named; another project's token sees nothing of it.
    let (code, _, outcome) = get(
        format!("/fhir/{project}/Subscription/{id}/$events?eventsSinceNumber=zero"),
        token.clone(),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("eventsSinceNumber")
    );
    let (_, other_token) = fhir_outbox::operations::console::tokens::create(
        &db.pool,
        "other",
        fhir_outbox::operations::console::tokens::Role::Viewer,
        Some(other_project),
    )
    .await
    .unwrap();
    let (code, _, _) = get(
        format!("/fhir/{project}/Subscription/{id}/$status"),
        other_token,
    )
    .await;
    assert_eq!(code, 404, "another project's token: not found");
    let (code, _, outcome) = get(
        format!("/fhir/{project}/Subscription/{id}/$status"),
        "not-a-token".to_owned(),
    )
    .await;
    assert_eq!(code, 401);
    assert_eq!(
        (
            outcome["resourceType"].as_str(),
            outcome["issue"][0]["code"].as_str()
        ),
        (Some("OperationOutcome"), Some("security")),
        "a FHIR client is refused in FHIR: {outcome}"
    );

    // An operator sees what each delivery carries, in the console's API and on the command line.
    let (code, _, page) = get(
        format!("/api/v1/projects/{project}/deliveries?subscription={id}"),
        token.clone(),
    )
    .await;
    assert_eq!(code, 200, "{page:#}");
    let carried: Vec<(String, Value, String)> = page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["notification"].as_str().unwrap().to_owned(),
                item["event_number"].clone(),
                item["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let event = |number: i64, state: &str| {
        (
            "event-notification".to_owned(),
            json!(number),
            state.to_owned(),
        )
    };
    assert_eq!(
        carried,
        [
            event(4, "succeeded"),
            event(3, "failed"),
            event(2, "failed"),
            event(1, "succeeded")
        ]
    );
    let failed = page["deliveries"][2]["id"].as_i64().unwrap().to_string();
    let shown = crate::operator_cli::ok(
        &db.url,
        &[
            "deliveries",
            "show",
            &failed,
            "--project",
            &project.to_string(),
        ],
    );
    assert!(
        shown.contains("carries:     event-notification, event 2") && shown.contains("  focus:\n"),
        "{shown}"
    );
    let listed =
        crate::operator_cli::ok(&db.url, &["deliveries", "--project", &project.to_string()]);
    assert!(listed.contains("(event-notification, event 2)"), "{listed}");
    let page = http
        .get(format!("{base}/projects/{project}/deliveries/{failed}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("event 2")
            && page.contains("<code>event-notification</code> notification bundle"),
        "the delivery page says what it carries"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_an_unusable_or_missing_topic_matches_nothing_and_says_why() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut unusable = encounter_complete_topic();
    unusable["extension"][0]["valueUri"] =
        json!("http://example.org/fhir/SubscriptionTopic/events");
    // A topic of event triggers only: fhir-outbox evaluates resource triggers.
    unusable["extension"][1] = json!({
        "url": format!("{XVER}eventTrigger"),
        "extension": [{"url": "event", "valueCodeableConcept": {"text": "admission"}},
                      {"url": "resource", "valueUri": "Encounter"}]
    });
    create(&db.pool, project, &unusable, None).await;
    let receiver = Receiver::start(vec![]).await;
    let mut to_unusable = topic_subscription(&receiver.url, "active", "id-only", &[]);
    to_unusable["criteria"] = json!("http://example.org/fhir/SubscriptionTopic/events");
    let to_unusable = create(&db.pool, project, &to_unusable, None).await;
    let mut to_missing = topic_subscription(&receiver.url, "active", "id-only", &[]);
    to_missing["criteria"] = json!("http://example.org/fhir/SubscriptionTopic/nowhere");
    let to_missing = create(&db.pool, project, &to_missing, None).await;
    let p = pipeline(&db.pool, fast_config());
    put(&db.pool, project, &encounter("e1", "finished", "Patient/a")).await;
    p.settle(&db.pool).await;
    assert!(receiver.received().is_empty());
    let issue = |subscription: Value| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT string_agg(message, ' | ') FROM fhir_outbox.subscription_issue WHERE subscription_id = $1",
            )
            .bind(subscription["id"].as_str().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let unusable_issue = issue(to_unusable).await;
    assert!(
        unusable_issue.contains("cannot be used") && unusable_issue.contains("eventTrigger"),
        "{unusable_issue}"
    );
    let missing_issue = issue(to_missing).await;
    assert!(
        missing_issue.contains("no topic with url"),
        "{missing_issue}"
    );
}

/// A topic whose FHIRPath is hostile (the nested `select` of the hostile tests, on a Patient with
/// 3,000 identifiers) costs its subscription one evaluation budget, then the subscription is
/// suspended; another project's subscription to a topic gets every event meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_topic_suspends_its_subscription_and_never_holds_up_another_project() {
    let db = TestDb::new().await;
    let (a, b) = (db.project().await, db.project().await);
    let patient_topic = |fhirpath: Option<&str>| {
        let mut trigger = vec![
            json!({"url": "resource", "valueUri": "Patient"}),
            json!({"url": "supportedInteraction", "valueCode": "create"}),
        ];
        if let Some(expression) = fhirpath {
            trigger.push(json!({"url": "fhirPathCriteria", "valueString": expression}));
        }
        json!({
            "resourceType": "Basic",
            "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
            "extension": [
                {"url": format!("{XVER}url"), "valueUri": TOPIC},
                {"url": format!("{XVER}resourceTrigger"), "extension": trigger}
            ]
        })
    };
    create(
        &db.pool,
        a,
        &patient_topic(Some(
            "%current.identifier.select(%current.identifier.select(%current.identifier.count())).count() > 0",
        )),
        None,
    )
    .await;
    create(&db.pool, b, &patient_topic(None), None).await;
    let (receiver_a, receiver_b) = (Receiver::start(vec![]).await, Receiver::start(vec![]).await);
    let hostile = create(
        &db.pool,
        a,
        &topic_subscription(&receiver_a.url, "active", "id-only", &[]),
        None,
    )
    .await;
    create(
        &db.pool,
        b,
        &topic_subscription(&receiver_b.url, "active", "id-only", &[]),
        None,
    )
    .await;
    let identifiers: Vec<Value> = (0..3_000)
        .map(|i| json!({ "system": "urn:example:mrn", "value": format!("mrn-{i}") }))
        .collect();
    for _ in 0..5 {
        let big = json!({ "resourceType": "Patient", "identifier": identifiers });
        create(&db.pool, a, &big, None).await;
        create(&db.pool, b, &json!({ "resourceType": "Patient" }), None).await;
    }
    let p = pipeline(&db.pool, fast_config());
    p.settle(&db.pool).await;

    let mut numbers: Vec<i64> = bundles(&receiver_b)
        .iter()
        .flat_map(event_numbers)
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3, 4, 5], "every event of project B");
    assert!(receiver_a.received().is_empty());
    let issues: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, occurrences FROM fhir_outbox.subscription_issue
         WHERE project_id = $1 AND subscription_id = $2 AND kind = 'budget_exhausted'",
    )
    .bind(a)
    .bind(hostile["id"].as_str().unwrap())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        issues,
        [("budget_exhausted".to_owned(), 1)],
        "one budget, then suspended"
    );
}
