//! The console's pages in a real browser (headless Chromium through WebDriver, `browser.rs`), on
//! real data: a real database, real deliveries to loopback receivers (succeeded, failed against a
//! receiver answering 500, pending for a paused subscription), the console served as
//! `fhir-outbox run --console` serves it. Each test asserts on what the pages show and what the
//! database holds afterwards, never on timing.

use crate::browser::{Browser, Viewport};
use crate::common::TestDb;
use crate::delivery::{Pipeline, create, fast_config, hook, pipeline, with_extensions};
use crate::receiver::{Receiver, Reply};
use fhir_outbox::operations::actions::{self, Action, Actor};
use fhir_outbox::operations::console::tokens::Role;
use fhir_outbox::operations::console::{self, tokens};
use fhir_outbox::project::create_project;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::path::Path;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECRET: &str = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret";
const MAX_ATTEMPTS: &str = "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts";
/// What the healthy subscription hides in its secret extension, its header and its endpoint's query
/// string: no page may show any of them.
const SECRETS: [&str; 3] = ["hmac-s3cret", "h3ader-s3cret", "q-s3cret"];

/// Two projects with deliveries in every state an operator meets, and the console serving them.
struct World {
    db: TestDb,
    /// "North Clinic": the project the tests look at.
    project: Uuid,
    /// "South Clinic": another project, which scoped tokens must not see.
    other: Uuid,
    /// Delivered to at once (with a secret, a header and a query string that must stay hidden).
    healthy: String,
    /// One attempt each, against a receiver that answers 500 three times: three failed deliveries.
    failing: String,
    /// Criteria the matcher does not support: an issue, no delivery.
    unsupported: String,
    /// Paused before two Observations were written: two pending deliveries.
    paused: String,
    /// South Clinic's subscription.
    other_subscription: String,
    healthy_receiver: Receiver,
    failing_receiver: Receiver,
    pipeline: Pipeline,
    /// `http://127.0.0.1:PORT`.
    base: String,
    shutdown: CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn id_of(resource: Value) -> String {
    resource["id"].as_str().unwrap().to_owned()
}

fn patient(family: &str) -> Value {
    json!({ "resourceType": "Patient", "name": [{ "family": family, "given": ["Pat"] }] })
}

async fn world() -> World {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let project = create_project(pool, "North Clinic").await.unwrap();
    let other = create_project(pool, "South Clinic").await.unwrap();
    let healthy_receiver = Receiver::start(Vec::new()).await;
    let failing_receiver = Receiver::start(vec![Reply::Status(500, None); 3]).await;

    let mut healthy = hook(
        &format!("{}?token=q-s3cret", healthy_receiver.url),
        "Patient",
    );
    healthy["channel"]["header"] = json!(["Authorization: Bearer h3ader-s3cret"]);
    let healthy = with_extensions(
        healthy,
        json!([{ "url": SECRET, "valueString": "hmac-s3cret" }]),
    );
    let healthy = id_of(create(pool, project, &healthy, None).await);
    let failing = with_extensions(
        hook(&failing_receiver.url, "Patient"),
        json!([{ "url": MAX_ATTEMPTS, "valueInteger": 1 }]),
    );
    let failing = id_of(create(pool, project, &failing, None).await);
    let unsupported = hook(&healthy_receiver.url, "Patient?organization.name=Acme");
    let unsupported = id_of(create(pool, project, &unsupported, None).await);
    let paused = id_of(
        create(
            pool,
            project,
            &hook(&healthy_receiver.url, "Observation"),
            None,
        )
        .await,
    );
    let other_subscription =
        id_of(create(pool, other, &hook(&healthy_receiver.url, "Patient"), None).await);

    let pipeline = pipeline(pool, fast_config());
    for family in ["Chalmers", "Windsor", "Baxter"] {
        create(pool, project, &patient(family), None).await;
    }
    create(pool, other, &patient("Southerly"), None).await;
    pipeline.settle(pool).await;

    actions::act(
        pool,
        project,
        &Actor::command_line(),
        &Action::Pause(paused.clone()),
    )
    .await
    .unwrap();
    for code in ["8867-4", "9279-1"] {
        let observation = json!({ "resourceType": "Observation", "status": "final",
            "code": { "coding": [{ "system": "http://loinc.org", "code": code }] } });
        create(pool, project, &observation, None).await;
    }
    dispatch(&pipeline).await;

    let shutdown = CancellationToken::new();
    let (address, _server) = console::serve(
        pool.clone(),
        "127.0.0.1:0".parse().unwrap(),
        fhir_outbox::delivery::DEFAULT_FHIR_BASE_URL.to_owned(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    World {
        db,
        project,
        other,
        healthy,
        failing,
        unsupported,
        paused,
        other_subscription,
        healthy_receiver,
        failing_receiver,
        pipeline,
        base: format!("http://{address}"),
        shutdown,
    }
}

impl World {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn project_path(&self) -> String {
        format!("/projects/{}", self.project)
    }

    fn subscription_path(&self, id: &str) -> String {
        format!("/projects/{}/subscriptions/{id}", self.project)
    }

    fn delivery_path(&self, id: i64) -> String {
        format!("/projects/{}/deliveries/{id}", self.project)
    }

    /// A token and its secret.
    async fn token(&self, name: &str, role: Role, project: Option<Uuid>) -> String {
        tokens::create(&self.db.pool, name, role, project)
            .await
            .unwrap()
            .1
    }

    /// A browser signed in with `secret`.
    async fn browser(&self, viewport: Viewport, secret: &str) -> Browser {
        let browser = Browser::start(viewport).await;
        sign_in(&browser, &self.base, secret).await;
        browser
    }

    /// The deliveries of a subscription: (id, state, webhook-id), oldest first.
    async fn deliveries(&self, subscription: &str) -> Vec<(i64, String, Uuid)> {
        sqlx::query_as(
            "SELECT id, state, webhook_id FROM fhir_outbox.delivery
             WHERE subscription_id = $1 ORDER BY id",
        )
        .bind(subscription)
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    async fn state_of(&self, delivery: i64) -> String {
        sqlx::query_scalar("SELECT state FROM fhir_outbox.delivery WHERE id = $1")
            .bind(delivery)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn is_paused(&self, subscription: &str) -> bool {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause WHERE subscription_id = $1)",
        )
        .bind(subscription)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// Runs the worker until `delivery` has finished (it is never paused here).
    async fn deliver(&self, delivery: i64) {
        for _ in 0..500 {
            dispatch(&self.pipeline).await;
            self.pipeline.worker.deliver_once().await.unwrap();
            if !["pending", "in_flight"].contains(&self.state_of(delivery).await.as_str()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("delivery {delivery} was not delivered");
    }
}

async fn dispatch(pipeline: &Pipeline) {
    while pipeline.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
}

async fn sign_in(browser: &Browser, base: &str, secret: &str) {
    browser.open(&format!("{base}/login")).await;
    browser.fill("#token", secret).await;
    browser.submit("button[type=submit]").await;
}

/// Follows an action button to its confirmation page, confirms, and returns the question asked and
/// the summary shown after.
async fn confirm(browser: &Browser, button: &str) -> (String, String) {
    browser.submit(button).await;
    let question = browser.text_of("#question").await;
    browser.submit("#confirm").await;
    (question, browser.text_of("#done").await)
}

/// Posts a form the page did not offer (what a forged request does from a page that has the
/// session), and waits for the answer's page.
async fn forge_post(browser: &Browser, path: &str, fields: &[(&str, &str)]) {
    let fields: Vec<Value> = fields.iter().map(|(n, v)| json!([n, v])).collect();
    browser
        .client()
        .execute(
            "const [action, fields] = arguments;
             const form = document.createElement('form');
             form.method = 'post'; form.action = action;
             for (const [name, value] of fields) {
               const input = document.createElement('input');
               input.type = 'hidden'; input.name = name; input.value = value;
               form.appendChild(input);
             }
             const button = document.createElement('button');
             button.type = 'submit'; button.id = 'forged'; button.textContent = 'forged';
             form.appendChild(button);
             document.body.appendChild(form);",
            vec![json!(path), json!(fields)],
        )
        .await
        .unwrap();
    browser.submit("#forged").await;
}

/// What a POST of these fields gets, sent by the page's own script (with its cookie): the HTTP
/// status, or `redirect` (the browser hides a redirect's status from scripts that do not follow
/// it; the pages answer a performed action with one).
async fn post_status(browser: &Browser, path: &str, fields: &[(&str, &str)]) -> String {
    let fields: Vec<Value> = fields.iter().map(|(n, v)| json!([n, v])).collect();
    let answer = browser
        .client()
        .execute_async(
            "const [path, fields, done] = arguments;
             fetch(path, { method: 'POST', body: new URLSearchParams(fields), redirect: 'manual' })
               .then(response => done(response.type === 'opaqueredirect' ? 'redirect' : String(response.status)),
                     error => done(String(error)));",
            vec![json!(path), json!(fields)],
        )
        .await
        .unwrap();
    answer.as_str().expect("a status").to_owned()
}

/// Whether the page fits the viewport's width: nothing makes the page itself scroll sideways.
async fn fits_the_width(browser: &Browser) -> (bool, Value) {
    let widths = browser
        .client()
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            vec![],
        )
        .await
        .unwrap();
    (widths[0].as_u64() <= widths[1].as_u64(), widths)
}

async fn assert_no_secrets(browser: &Browser) {
    let source = browser.page_source().await;
    for secret in SECRETS {
        assert!(
            !source.contains(secret),
            "{} shows {secret}",
            browser.current_url().await
        );
    }
}

/// The stored AuditEvents of operator actions: (action, token name, outcomeDesc).
async fn operator_events(pool: &PgPool, project: Uuid) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT content -> 'subtype' -> 0 ->> 'code', content -> 'agent' -> 0 -> 'who' ->> 'display',
                content ->> 'outcomeDesc'
         FROM fhir_outbox.resource_version
         WHERE project_id = $1 AND resource_type = 'AuditEvent'
           AND content -> 'subtype' -> 0 ->> 'system' = 'https://fhir-outbox.dev/operator-action'
         ORDER BY last_updated",
    )
    .bind(project)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_operator_sees_which_subscriptions_fail_why_and_what_was_sent_and_answered() {
    let world = world().await;
    let operator = world.token("olivia", Role::Operator, None).await;
    let browser = Browser::start(Viewport::DESKTOP).await;

    // No session: the login page; a wrong token is said so.
    browser.open(&world.url("/projects")).await;
    assert_eq!(browser.current_url().await.path(), "/login");
    sign_in(&browser, &world.base, "fo_not-a-token").await;
    assert!(
        browser
            .text_of(".error")
            .await
            .contains("unknown or revoked")
    );
    sign_in(&browser, &world.base, &operator).await;
    assert_eq!(browser.current_url().await.path(), "/");
    assert_eq!(browser.text_of("#who").await, "olivia · operator");

    // The overview: the paused subscription's backlog, its age, the failing subscription and why.
    assert_eq!(browser.text_of("#pending").await, "2");
    assert_eq!(browser.text_of("#in-flight").await, "0");
    assert_eq!(browser.text_of("#open-circuits").await, "0");
    let oldest = browser.text_of("#oldest-undelivered").await;
    assert!(oldest.ends_with("ago") || oldest == "just now", "{oldest}");
    assert_eq!(browser.text_of("#failing-count").await, "1");
    let failing_row = browser.text_of("#failing tbody tr").await;
    assert!(
        failing_row.contains(&format!("Subscription/{}", world.failing)),
        "{failing_row}"
    );
    assert!(
        failing_row.contains("North Clinic") && failing_row.contains("Received status 500"),
        "{failing_row}"
    );
    // The charts, with their accessible descriptions: every attempt of the hour counted (the
    // token sees both projects: 3 + 1 succeeded, 3 failed).
    let source = browser.page_source().await;
    assert!(
        source.contains("In the last hour: 4 attempts succeeded and 3 failed."),
        "{source}"
    );
    assert_eq!(browser.find_all("#deliveries-chart svg").await.len(), 1);
    assert_eq!(browser.find_all("#latency-chart svg").await.len(), 1);
    assert!(
        browser
            .page_source()
            .await
            .contains("<title id=\"latency-chart-title\">")
    );

    // The failing subscription, from the overview: its latest failure, with the status it got.
    browser.submit("#failing tbody tr a").await;
    assert_eq!(
        browser.current_url().await.path(),
        world.subscription_path(&world.failing)
    );
    let latest = browser.text_of("#latest-failure").await;
    assert!(latest.contains("HTTP 500"), "{latest}");
    assert_eq!(
        browser.find_all("#recent-deliveries tbody tr").await.len(),
        3
    );

    // The project's subscriptions: four rows, endpoints redacted, the issue counted.
    browser.open(&world.url(&world.project_path())).await;
    let rows = browser.find_all("#subscriptions tbody tr").await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    let healthy_row = rows
        .iter()
        .find(|row| row.contains(&world.healthy))
        .unwrap();
    assert!(
        healthy_row.contains("/hook?…") && healthy_row.contains("100 %"),
        "{healthy_row}"
    );
    let unsupported_row = rows
        .iter()
        .find(|row| row.contains(&world.unsupported))
        .unwrap();
    assert!(
        unsupported_row.trim_end().ends_with('1'),
        "{unsupported_row}"
    );
    let paused_row = rows.iter().find(|row| row.contains(&world.paused)).unwrap();
    assert!(paused_row.contains("paused"), "{paused_row}");
    assert_no_secrets(&browser).await;

    // The unsupported subscription's issue, word for word.
    let message: String = sqlx::query_scalar(
        "SELECT message FROM fhir_outbox.subscription_issue WHERE subscription_id = $1",
    )
    .bind(&world.unsupported)
    .fetch_one(&world.db.pool)
    .await
    .unwrap();
    browser
        .open(&world.url(&world.subscription_path(&world.unsupported)))
        .await;
    assert_eq!(browser.text_of("#issues .issue-message").await, message);

    // A failed delivery: what was sent (the patient), what came back (500, "ok"), its AuditEvent.
    let failed = world.deliveries(&world.failing).await[0].0;
    browser.open(&world.url(&world.delivery_path(failed))).await;
    assert_eq!(browser.text_of("#state").await, "failed");
    assert!(
        browser
            .text_of("#payload")
            .await
            .contains("\"family\": \"Chalmers\"")
    );
    let attempt = browser.text_of("#attempts li").await;
    assert!(
        attempt.contains("Attempt 1") && attempt.contains("HTTP 500"),
        "{attempt}"
    );
    assert_eq!(browser.text_of("#attempts pre.response").await, "ok");
    browser.click("#attempts details summary").await;
    let event = browser.text_of("#attempts details pre.json").await;
    assert!(
        event.contains("\"code\": \"transmit\"") && event.contains("received status 500"),
        "{event}"
    );
    let resource = browser.text_of("#resource").await;
    let reference = resource.split(' ').next().unwrap();
    assert_eq!(
        browser.find_all("#actions a.button").await,
        [
            "Retry".to_owned(),
            "Replay".to_owned(),
            format!("Resend {reference}")
        ]
    );

    // A delivered one: the header names it carried, never their values.
    let delivered = world.deliveries(&world.healthy).await[0].0;
    browser
        .open(&world.url(&world.delivery_path(delivered)))
        .await;
    let headers = browser.find_all("#header-names li").await;
    for name in ["webhook-id", "x-signature", "authorization"] {
        assert!(headers.iter().any(|h| h == name), "{name} in {headers:?}");
    }
    assert_no_secrets(&browser).await;

    // The list of deliveries: filtered, and paged with "Older →".
    browser
        .open(&world.url(&format!("{}/deliveries", world.project_path())))
        .await;
    browser
        .select("#filters select[name=state]", "failed")
        .await;
    browser.fill("#filters input[name=since]", "1h").await;
    browser.submit("#filters button[type=submit]").await;
    let rows = browser.find_all("#deliveries tbody tr").await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter()
            .all(|row| row.contains("failed") && row.contains(&world.failing))
    );
    browser
        .open(&world.url(&format!("{}/deliveries?limit=4", world.project_path())))
        .await;
    let first_page = browser
        .find_all("#deliveries tbody tr td:first-child")
        .await;
    browser.submit("#older").await;
    let second_page = browser
        .find_all("#deliveries tbody tr td:first-child")
        .await;
    assert_eq!(
        (first_page.len(), second_page.len()),
        (4, 4),
        "{first_page:?} {second_page:?}"
    );
    let lowest_first: i64 = first_page.last().unwrap().parse().unwrap();
    let highest_second: i64 = second_page[0].parse().unwrap();
    assert!(highest_second < lowest_first);
    browser
        .open(&world.url(&format!(
            "{}/deliveries?since=yesterday",
            world.project_path()
        )))
        .await;
    assert!(
        browser
            .text_of("#filter-error")
            .await
            .contains("`yesterday` is not a time")
    );
    browser.close().await;
}

#[tokio::test]
async fn an_operator_replays_retries_cancels_and_resends_deliveries() {
    let world = world().await;
    let operator = world.token("olivia", Role::Operator, None).await;
    let browser = world.browser(Viewport::DESKTOP, &operator).await;

    // Replay a succeeded delivery: the receiver gets the same webhook-id again.
    let (replayed, _, webhook_id) = world.deliveries(&world.healthy).await[0];
    browser
        .open(&world.url(&world.delivery_path(replayed)))
        .await;
    let (question, done) = confirm(&browser, "#actions a[href$='/replay']").await;
    assert!(
        question.starts_with(&format!("Replay succeeded delivery {replayed} (Patient/")),
        "{question}"
    );
    assert!(
        done.starts_with(&format!("replayed delivery {replayed}")),
        "{done}"
    );
    assert_eq!(
        browser.current_url().await.path(),
        world.delivery_path(replayed)
    );
    world.deliver(replayed).await;
    assert_eq!(world.state_of(replayed).await, "succeeded");
    let webhook_id = webhook_id.to_string();
    let same_id = world
        .healthy_receiver
        .received()
        .iter()
        .filter(|request| request.header("webhook-id") == Some(webhook_id.as_str()))
        .count();
    assert_eq!(same_id, 2);
    browser
        .open(&world.url(&world.delivery_path(replayed)))
        .await;
    assert_eq!(browser.text_of("#state").await, "succeeded replay");
    assert_eq!(browser.find_all("#attempts > li").await.len(), 2);

    // Retry a failed delivery: the receiver answers 200 now.
    let failed = world.deliveries(&world.failing).await[0].0;
    browser.open(&world.url(&world.delivery_path(failed))).await;
    let (question, done) = confirm(&browser, "#actions a[href$='/retry']").await;
    assert!(
        question.starts_with(&format!("Retry failed delivery {failed}")),
        "{question}"
    );
    assert_eq!(done, format!("retried 1 delivery (delivery {failed})"));
    world.deliver(failed).await;
    assert_eq!(world.state_of(failed).await, "succeeded");
    assert_eq!(world.failing_receiver.received().len(), 4);

    // Cancel one pending delivery of the paused subscription; no other.
    let pending = world.deliveries(&world.paused).await;
    let cancelled = pending[0].0;
    browser
        .open(&world.url(&world.delivery_path(cancelled)))
        .await;
    assert_eq!(browser.text_of("#state").await, "pending");
    let (question, done) = confirm(&browser, "#actions a[href$='/cancel']").await;
    assert!(
        question.starts_with(&format!("Cancel pending delivery {cancelled}")),
        "{question}"
    );
    assert_eq!(done, format!("cancelled delivery {cancelled}"));
    assert_eq!(world.state_of(cancelled).await, "cancelled");
    assert_eq!(world.state_of(pending[1].0).await, "pending");

    // Resend the resource of a delivery to its subscription: a new delivery of the same version.
    browser
        .open(&world.url(&world.delivery_path(replayed)))
        .await;
    let resource = browser.text_of("#resource").await;
    let reference = resource.split(' ').next().unwrap().to_owned();
    let (question, done) = confirm(&browser, "#actions a[href*='/resend']").await;
    assert_eq!(
        question,
        format!(
            "Resend the current version of {reference} to Subscription/{}?",
            world.healthy
        )
    );
    assert!(
        done.starts_with(&format!(
            "resent {reference} version 1 to Subscription/{}",
            world.healthy
        )),
        "{done}"
    );
    assert_eq!(
        browser.current_url().await.path(),
        format!("{}/deliveries", world.project_path())
    );
    dispatch(&world.pipeline).await;
    let of_resource = world.deliveries(&world.healthy).await.len();
    assert_eq!(of_resource, 4, "three patients and the resend");

    // Each action is recorded with the token's name.
    let events = operator_events(&world.db.pool, world.project).await;
    let by_olivia: Vec<&str> = events
        .iter()
        .filter(|(_, who, _)| who == "olivia")
        .map(|(action, _, _)| action.as_str())
        .collect();
    assert_eq!(by_olivia, ["replay", "retry", "cancel", "resend"]);
    browser.close().await;
}

#[tokio::test]
async fn an_operator_pauses_cancels_the_backlog_and_manages_a_subscription() {
    let world = world().await;
    let operator = world.token("olivia", Role::Operator, None).await;
    let browser = world.browser(Viewport::DESKTOP, &operator).await;
    let healthy = world.subscription_path(&world.healthy);

    // Reset the failing endpoint's circuit (three failures recorded, before anything succeeds
    // there again).
    browser
        .open(&world.url(&format!("{}/endpoints", world.project_path())))
        .await;
    let failing_origin = world
        .failing_receiver
        .url
        .trim_end_matches("/hook")
        .to_owned();
    let row = browser
        .find_all("#endpoints tbody tr")
        .await
        .into_iter()
        .find(|row| row.contains(&failing_origin))
        .unwrap();
    assert!(row.contains("closed"), "{row}");
    // Its receiver's figures: the three failed attempts of the subscription on it.
    assert!(row.contains(" of 3"), "{row}");
    let (question, done) = confirm(&browser, "#endpoints a.button").await;
    assert_eq!(
        question,
        format!("Close the circuit of {failing_origin}/ now?")
    );
    assert!(
        done.contains(&format!("circuit of {failing_origin}")),
        "{done}"
    );
    assert_eq!(
        browser.current_url().await.path(),
        format!("{}/endpoints", world.project_path())
    );

    // Pause.
    browser.open(&world.url(&healthy)).await;
    let (question, done) = confirm(&browser, "#actions a[href$='/pause']").await;
    assert_eq!(question, format!("Pause Subscription/{}?", world.healthy));
    assert_eq!(done, format!("paused Subscription/{}", world.healthy));
    assert!(browser.text_of("#status").await.contains("paused"));
    assert!(world.is_paused(&world.healthy).await);
    // What the subscription is for (its `reason`), the name people know it by.
    assert_eq!(browser.text_of("#subscription-reason").await, "test");

    // Its backlog grows while paused; cancel it.
    create(&world.db.pool, world.project, &patient("Quill"), None).await;
    create(&world.db.pool, world.project, &patient("Roe"), None).await;
    dispatch(&world.pipeline).await;
    world.pipeline.worker.deliver_once().await.unwrap();
    browser.open(&world.url(&healthy)).await;
    assert_eq!(browser.text_of("#sub-pending").await, "2");
    let (question, done) = confirm(&browser, "#actions a[href$='/cancel']").await;
    assert_eq!(
        question,
        format!(
            "Cancel the 2 pending deliveries of Subscription/{}?",
            world.healthy
        )
    );
    assert_eq!(
        done,
        format!(
            "cancelled 2 pending deliveries of Subscription/{}",
            world.healthy
        )
    );
    let states: Vec<String> = world
        .deliveries(&world.healthy)
        .await
        .into_iter()
        .map(|(_, state, _)| state)
        .collect();
    assert_eq!(
        states,
        [
            "succeeded",
            "succeeded",
            "succeeded",
            "cancelled",
            "cancelled"
        ]
    );
    let events = operator_events(&world.db.pool, world.project).await;
    assert!(
        events.contains(&(
            "cancel".to_owned(),
            "olivia".to_owned(),
            format!(
                "cancelled 2 pending deliveries of Subscription/{}",
                world.healthy
            )
        )),
        "{events:?}"
    );
    assert!(
        browser
            .find_all("#actions a[href$='/cancel']")
            .await
            .is_empty(),
        "no backlog left"
    );

    // Resume, disable, enable.
    let (_, done) = confirm(&browser, "#actions a[href$='/resume']").await;
    assert_eq!(done, format!("resumed Subscription/{}", world.healthy));
    assert!(!world.is_paused(&world.healthy).await);
    let (question, done) = confirm(&browser, "#actions a[href$='/disable']").await;
    assert_eq!(question, format!("Disable Subscription/{}?", world.healthy));
    assert_eq!(
        done,
        format!(
            "disabled Subscription/{} (status active → off)",
            world.healthy
        )
    );
    assert!(browser.text_of("#status").await.starts_with("off"));
    let (_, done) = confirm(&browser, "#actions a[href$='/enable']").await;
    assert_eq!(
        done,
        format!(
            "enabled Subscription/{} (status off → active)",
            world.healthy
        )
    );

    // Retry the failing subscription's failed deliveries.
    browser
        .open(&world.url(&world.subscription_path(&world.failing)))
        .await;
    let (question, done) = confirm(&browser, "#actions a[href$='/retry']").await;
    assert_eq!(
        question,
        format!(
            "Retry the 3 failed deliveries of Subscription/{}?",
            world.failing
        )
    );
    assert!(done.starts_with("retried 3 deliveries"), "{done}");
    let failed: Vec<String> = world
        .deliveries(&world.failing)
        .await
        .into_iter()
        .map(|(_, s, _)| s)
        .filter(|s| s == "failed")
        .collect();
    assert!(failed.is_empty());

    browser.close().await;
}

#[tokio::test]
async fn a_viewer_sees_everything_and_can_do_nothing() {
    let world = world().await;
    let viewer = world.token("victor", Role::Viewer, None).await;
    let browser = world.browser(Viewport::DESKTOP, &viewer).await;

    browser
        .open(&world.url(&world.subscription_path(&world.healthy)))
        .await;
    assert!(browser.find_all("#actions").await.is_empty());
    assert!(browser.text_of("#viewer-note").await.contains("viewer"));
    let delivery = world.deliveries(&world.paused).await[0].0;
    browser
        .open(&world.url(&world.delivery_path(delivery)))
        .await;
    assert_eq!(browser.text_of("#state").await, "pending");
    assert!(browser.find_all("#actions").await.is_empty());
    // An endpoint whose allowance grew says so.
    let healthy_origin = world.healthy_receiver.url.trim_end_matches("/hook");
    sqlx::query(
        "INSERT INTO fhir_outbox.endpoint_circuit (project_id, endpoint, allowance)
         VALUES ($1, $2, 48)
         ON CONFLICT (project_id, endpoint) DO UPDATE SET allowance = 48",
    )
    .bind(world.project)
    .bind(healthy_origin)
    .execute(&world.db.pool)
    .await
    .unwrap();
    browser
        .open(&world.url(&format!("{}/endpoints", world.project_path())))
        .await;
    assert!(browser.find_all("#endpoints a.button").await.is_empty());
    let rows: Vec<String> = browser
        .find_all("#endpoints tbody tr")
        .await
        .into_iter()
        .filter(|row| row.contains(healthy_origin))
        .collect();
    assert!(
        rows.len() == 1 && rows[0].contains("allowed 48"),
        "one row for the endpoint, with its allowance: {rows:?}"
    );

    // The confirmation page, asked for by hand: refused.
    browser
        .open(&world.url(&format!(
            "{}/pause",
            world.subscription_path(&world.healthy)
        )))
        .await;
    assert!(
        browser
            .text_of("#error-message")
            .await
            .contains("viewers cannot act")
    );

    // A POST with the session's own CSRF token (a viewer could read it from any form): refused,
    // and nothing changed.
    let csrf = tokens::csrf_token(&viewer);
    browser
        .open(&world.url(&world.subscription_path(&world.healthy)))
        .await;
    let pause = format!("{}/pause", world.subscription_path(&world.healthy));
    forge_post(&browser, &pause, &[("csrf", &csrf)]).await;
    assert_eq!(browser.text_of("h1").await, "Not allowed");
    assert!(
        browser
            .text_of("#error-message")
            .await
            .contains("token `victor` is a viewer")
    );
    assert_eq!(
        post_status(&browser, &pause, &[("csrf", &csrf)]).await,
        "403"
    );
    let cancel = format!("{}/cancel", world.delivery_path(delivery));
    assert_eq!(
        post_status(&browser, &cancel, &[("csrf", &csrf)]).await,
        "403"
    );
    assert!(!world.is_paused(&world.healthy).await);
    assert_eq!(world.state_of(delivery).await, "pending");
    assert!(
        operator_events(&world.db.pool, world.project)
            .await
            .iter()
            .all(|(_, who, _)| who != "victor")
    );
    browser.close().await;
}

#[tokio::test]
async fn a_project_scoped_token_cannot_see_another_project() {
    let world = world().await;
    let scoped = world
        .token("north-only", Role::Operator, Some(world.project))
        .await;
    let browser = world.browser(Viewport::DESKTOP, &scoped).await;

    // Its overview counts its project only (South Clinic has no backlog either, but its one
    // successful attempt is not counted).
    assert!(
        browser
            .page_source()
            .await
            .contains("In the last hour: 3 attempts succeeded and 3 failed.")
    );
    browser.open(&world.url("/projects")).await;
    let rows = browser.find_all("tbody tr").await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].contains("North Clinic"));

    let other_delivery = world.deliveries(&world.other_subscription).await[0].0;
    let other = format!("/projects/{}", world.other);
    for path in [
        other.clone(),
        format!("{other}/subscriptions/{}", world.other_subscription),
        format!("{other}/deliveries"),
        format!("{other}/deliveries/{other_delivery}"),
        format!("{other}/issues"),
        format!("{other}/endpoints"),
        format!("/?project={}", world.other),
    ] {
        browser.open(&world.url(&path)).await;
        assert_eq!(browser.text_of("h1").await, "Not found", "{path}");
        assert_eq!(
            browser.text_of("#error-message").await,
            format!("project {} not found", world.other),
            "{path}"
        );
    }
    // Its own project's delivery ids do not reach the other project's deliveries either.
    browser
        .open(&world.url(&format!(
            "{}/deliveries/{other_delivery}",
            world.project_path()
        )))
        .await;
    assert_eq!(
        browser.text_of("#error-message").await,
        format!("delivery {other_delivery} not found in this project")
    );

    // Acting there, even with a valid CSRF token: "not found", and nothing changed.
    let csrf = tokens::csrf_token(&scoped);
    browser.open(&world.url(&world.project_path())).await;
    let pause = format!("{other}/subscriptions/{}/pause", world.other_subscription);
    forge_post(&browser, &pause, &[("csrf", &csrf)]).await;
    assert_eq!(browser.text_of("h1").await, "Not found");
    assert_eq!(
        post_status(&browser, &pause, &[("csrf", &csrf)]).await,
        "404"
    );
    assert!(!world.is_paused(&world.other_subscription).await);
    browser.close().await;
}

#[tokio::test]
async fn an_action_without_the_sessions_csrf_token_is_refused() {
    let world = world().await;
    let operator = world.token("olivia", Role::Operator, None).await;
    let browser = world.browser(Viewport::DESKTOP, &operator).await;
    let pause = format!("{}/pause", world.subscription_path(&world.healthy));

    browser
        .open(&world.url(&world.subscription_path(&world.healthy)))
        .await;
    forge_post(&browser, &pause, &[("csrf", "0123456789abcdef")]).await;
    assert_eq!(browser.text_of("h1").await, "Not allowed");
    assert!(
        browser
            .text_of("#error-message")
            .await
            .contains("no valid CSRF token")
    );
    assert_eq!(
        post_status(&browser, &pause, &[("csrf", "forged")]).await,
        "403"
    );
    assert_eq!(post_status(&browser, &pause, &[]).await, "403");
    // The API refuses a cookie-authenticated POST without the header just the same.
    let api = format!(
        "/api/v1/projects/{}/subscriptions/{}/pause",
        world.project, world.healthy
    );
    assert_eq!(post_status(&browser, &api, &[]).await, "403");
    assert!(!world.is_paused(&world.healthy).await);
    // No other site can frame a page (a confirmation is one button to overlay), none is cached.
    let headers = browser
        .client()
        .execute_async(
            "const [path, done] = arguments;
             fetch(path).then(r => done([r.headers.get('content-security-policy'),
                                         r.headers.get('cache-control')]));",
            vec![json!(pause)],
        )
        .await
        .unwrap();
    assert!(
        headers[0]
            .as_str()
            .unwrap()
            .contains("frame-ancestors 'none'"),
        "{headers}"
    );
    assert_eq!(headers[1], "no-store");
    // With the right one it works (the same request a confirmation page sends).
    let csrf = tokens::csrf_token(&operator);
    assert_eq!(
        post_status(&browser, &pause, &[("csrf", &csrf)]).await,
        "redirect"
    );
    assert!(world.is_paused(&world.healthy).await);
    browser.close().await;
}

#[tokio::test]
async fn every_page_fits_a_phone() {
    let world = world().await;
    let operator = world.token("olivia", Role::Operator, None).await;
    let browser = world.browser(Viewport::PHONE, &operator).await;
    let failed = world.deliveries(&world.failing).await[0].0;
    let project = world.project_path();
    for path in [
        "/".to_owned(),
        "/projects".to_owned(),
        project.clone(),
        world.subscription_path(&world.failing),
        world.subscription_path(&world.unsupported),
        format!("{project}/deliveries"),
        world.delivery_path(failed),
        format!("{project}/issues"),
        format!("{project}/endpoints"),
        format!("{}/cancel", world.subscription_path(&world.paused)),
    ] {
        browser.open(&world.url(&path)).await;
        assert!(
            browser.find_all("#error-message").await.is_empty(),
            "{path}"
        );
        let (fits, widths) = fits_the_width(&browser).await;
        assert!(
            fits,
            "{path} is wider than the phone: [scrollWidth, innerWidth] = {widths}"
        );
    }
    // The wide table scrolls inside its own box instead.
    browser.open(&world.url(&project)).await;
    let scrolls = browser
        .client()
        .execute(
            "const wrap = document.querySelector('#subscriptions .table-wrap');
             return wrap.scrollWidth > wrap.clientWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(scrolls, json!(true));
    browser.close().await;
}

/// Screenshots of the main pages for README, on realistic data spread over the last hour:
/// `cargo test --test integration console_pages::screenshots -- --ignored`.
#[tokio::test]
#[ignore = "writes docs/screenshots/*.png; run by hand when the pages change"]
async fn screenshots() {
    let world = world().await;
    let pool = &world.db.pool;
    // More traffic: a slow receiver, an endpoint that times out now and then, a dead one.
    let slow =
        Receiver::start_with_latency(Vec::new(), std::time::Duration::from_millis(120)).await;
    create(pool, world.project, &hook(&slow.url, "Patient"), None).await;
    let dead = Receiver::start(vec![Reply::Status(503, None); 40]).await;
    let billing = with_extensions(
        hook(&dead.url, "Patient?family=Nguyen"),
        json!([{ "url": MAX_ATTEMPTS, "valueInteger": 1 }]),
    );
    let billing = id_of(create(pool, world.project, &billing, None).await);
    let families = [
        "Nguyen", "Okafor", "Smith", "Garcia", "Müller", "Kowalski", "Haddad", "Tanaka",
    ];
    for round in 0..12 {
        for family in families {
            create(pool, world.project, &patient(family), None).await;
        }
        if round % 3 == 0 {
            create(pool, world.project, &patient("Nguyen"), None).await;
        }
        for _ in 0..300 {
            dispatch(&world.pipeline).await;
            world.pipeline.worker.deliver_once().await.unwrap();
            // Everything but the paused subscription's and the dead endpoint's (its circuit opens).
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM fhir_outbox.delivery
                 WHERE state = 'in_flight'
                    OR (state = 'pending' AND subscription_id <> ALL ($1))",
            )
            .bind(vec![world.paused.clone(), billing.clone()])
            .fetch_one(pool)
            .await
            .unwrap();
            if open == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let failed: i64 = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.delivery WHERE subscription_id = $1 AND state = 'failed'
         ORDER BY id LIMIT 1",
    )
    .bind(&billing)
    .fetch_one(pool)
    .await
    .unwrap();
    // Spread the hour's attempts over the hour (they were all made just now), so the charts show
    // an hour at work rather than one bar; the timeline shown keeps its real times.
    sqlx::query(
        "UPDATE fhir_outbox.delivery_attempt
         SET started_at = now() - (random() * interval '58 minutes') - interval '30 seconds'
         WHERE delivery_id <> $1",
    )
    .bind(failed)
    .execute(pool)
    .await
    .unwrap();
    let operator = world.token("olivia", Role::Operator, None).await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();

    let browser = world.browser(Viewport::DESKTOP, &operator).await;
    browser.open(&world.url("/")).await;
    browser.screenshot(&dir.join("overview.png")).await;
    browser.open(&world.url(&world.project_path())).await;
    browser.screenshot(&dir.join("subscriptions.png")).await;
    browser
        .open(&world.url(&world.subscription_path(&billing)))
        .await;
    browser.screenshot(&dir.join("subscription.png")).await;
    browser.open(&world.url(&world.delivery_path(failed))).await;
    // Its AuditEvent open, and the page from its top (opening it by a click would scroll).
    browser
        .client()
        .execute(
            "document.querySelector('#attempts details').open = true; window.scrollTo(0, 0);",
            vec![],
        )
        .await
        .unwrap();
    browser.screenshot(&dir.join("delivery.png")).await;
    browser.close().await;

    let phone = world.browser(Viewport::PHONE, &operator).await;
    phone.open(&world.url("/")).await;
    phone.screenshot(&dir.join("overview-phone.png")).await;
    phone.close().await;
}
