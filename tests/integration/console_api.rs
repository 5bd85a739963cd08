//! The console's JSON API (`/api/v1`), served for real on a loopback port and called over HTTP:
//! every route's success and its refusals (401, 403, 404, 400, 422, CSRF), what each action does to
//! the rows and the AuditEvent it writes, redaction, pagination; and every answer of every test is
//! checked against `openapi.json` (its status must be documented for the route, its body must have
//! the documented shape), so the document cannot drift from the API unnoticed.

use crate::common::TestDb;
use crate::delivery::{Pipeline, create, fast_config, hook, pipeline, with_extensions};
use crate::receiver::{Receiver, Reply};
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::delivery::DeliveryConfig;
use fhir_outbox::delivery::policy::CircuitBreaker;
use fhir_outbox::operations::console::{self, api, tokens};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

const MAX_ATTEMPTS: &str = "https://medplum.com/fhir/StructureDefinition/subscription-max-attempts";
const SECRET_EXTENSION: &str =
    "https://www.medplum.com/fhir/StructureDefinition/subscription-secret";

// ---------------------------------------------------------------------------------------------
// The harness: the console on a loopback port, a client that checks every answer against the
// OpenAPI document, tokens.

/// A console token.
struct Token {
    id: Uuid,
    name: String,
    secret: String,
}

async fn token(pool: &PgPool, name: &str, role: tokens::Role, project: Option<Uuid>) -> Token {
    let (info, secret) = tokens::create(pool, name, role, project).await.unwrap();
    Token {
        id: info.id,
        name: info.name,
        secret,
    }
}

async fn operator(pool: &PgPool) -> Token {
    token(pool, "alice at ops", tokens::Role::Operator, None).await
}

/// How a request proves who it is.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    /// The session cookie's secret, and the `x-csrf-token` header, if any.
    Cookie(&'a str, Option<&'a str>),
}

/// One answer of the API.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: Value,
    www_authenticate: Option<String>,
}

impl Answer {
    /// The body of a 200, or a panic that shows what came instead.
    fn ok(self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        self.body
    }

    /// The error message of a refusal with this status.
    fn refused(self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        self.body["error"].as_str().unwrap().to_owned()
    }
}

/// The console, served on a loopback port until dropped.
struct Console {
    base: String,
    http: reqwest::Client,
    doc: Value,
    /// Every body it answered, for the redaction checks.
    bodies: Mutex<Vec<String>>,
    /// (method, documented path) of every 2xx answer.
    answered: Mutex<BTreeSet<(String, String)>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Console {
    async fn start(pool: &PgPool) -> Console {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
        let app = console::router(pool.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Console {
            base,
            // No proxy: a proxy from the environment would stand between the test and loopback.
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            doc: serde_json::from_str(api::OPENAPI).expect("openapi.json is JSON"),
            bodies: Mutex::new(Vec::new()),
            answered: Mutex::new(BTreeSet::new()),
            server,
        }
    }

    async fn send(&self, method: &str, path: &str, auth: Auth<'_>, body: Option<&Value>) -> Answer {
        let url = format!("{}{path}", self.base);
        let mut request = match method {
            "get" => self.http.get(&url),
            "post" => self.http.post(&url),
            other => panic!("no {other} in this API"),
        };
        request = match auth {
            Auth::None => request,
            Auth::Bearer(secret) => request.bearer_auth(secret),
            Auth::Cookie(secret, csrf) => {
                let request = request.header(
                    reqwest::header::COOKIE,
                    format!("theme=dark; {}={secret}", console::SESSION_COOKIE),
                );
                match csrf {
                    Some(csrf) => request.header("x-csrf-token", csrf),
                    None => request,
                }
            }
        };
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let header = |name| {
            response
                .headers()
                .get(name)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        let www_authenticate = header(reqwest::header::WWW_AUTHENTICATE);
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let text = response.text().await.unwrap();
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "{method} {path}: {status} {text}"
        );
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!("{method} {path}: {status}: not JSON ({error}): {text}")
        });
        self.check_documented(method, path, status, &body);
        self.bodies.lock().unwrap().push(text);
        Answer {
            status,
            body,
            www_authenticate,
        }
    }

    async fn get(&self, token: &Token, path: &str) -> Answer {
        self.send("get", path, Auth::Bearer(&token.secret), None)
            .await
    }

    async fn post(&self, token: &Token, path: &str, body: Option<Value>) -> Answer {
        self.send("post", path, Auth::Bearer(&token.secret), body.as_ref())
            .await
    }

    /// Checks an answer against the document: the route is documented, its status is documented
    /// for it, and its body has the documented shape.
    fn check_documented(&self, method: &str, path: &str, status: StatusCode, body: &Value) {
        let template = documented_path(&self.doc, method, path)
            .unwrap_or_else(|| panic!("openapi.json has no {method} {path}"));
        let operation = &self.doc["paths"][&template][method];
        let response = operation["responses"]
            .get(status.as_str())
            .unwrap_or_else(|| {
                panic!("openapi.json: {method} {template} does not document {status}: {body}")
            });
        let response = resolve(&self.doc, response);
        let schema = &response["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "openapi.json: {method} {template} {status} has no JSON schema"
        );
        let mut errors = Vec::new();
        conforms(&self.doc, schema, body, "$", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {path} answered {status} unlike openapi.json says:\n{}\n{body}",
            errors.join("\n")
        );
        if status.is_success() {
            self.answered
                .lock()
                .unwrap()
                .insert((method.to_owned(), template));
        }
    }

    /// Asserts that no body answered so far contains `secret`.
    fn never_showed(&self, secret: &str) {
        for body in self.bodies.lock().unwrap().iter() {
            assert!(!body.contains(secret), "`{secret}` shown in {body}");
        }
    }
}

/// The document's path template for a concrete path (its query string ignored): the one with the
/// most literal segments among those that match and have `method`.
fn documented_path(doc: &Value, method: &str, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap();
    let segments: Vec<&str> = path.split('/').collect();
    doc["paths"]
        .as_object()?
        .iter()
        .filter(|(_, item)| item.get(method).is_some())
        .filter_map(|(template, _)| {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut literal = 0;
            for (part, segment) in parts.iter().zip(&segments) {
                if part.starts_with('{') {
                    continue;
                }
                if part != segment {
                    return None;
                }
                literal += 1;
            }
            Some((literal, template.clone()))
        })
        .max()
        .map(|(_, template)| template)
}

/// A schema or response with its `$ref`s followed.
fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> &'a Value {
    while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let pointer = reference.strip_prefix('#').expect("a local $ref");
        schema = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("openapi.json: {reference} is not defined"));
    }
    schema
}

/// Checks `value` against the JSON Schema subset the document uses: `$ref`, `type` (one or a
/// list), `enum`, `format` (uuid, date-time), `required`, `properties`, `additionalProperties`,
/// `items`.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            other => panic!("openapi.json: `type` {other} at {at}"),
        };
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        if !(types.contains(&actual) || (actual == "integer" && types.contains(&"number"))) {
            errors.push(format!("{at}: {actual} {value}, documented as {types:?}"));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            errors.push(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    if let (Some(format), Some(text)) =
        (schema.get("format").and_then(Value::as_str), value.as_str())
    {
        let valid = match format {
            "uuid" => Uuid::parse_str(text).is_ok(),
            "date-time" => chrono::DateTime::parse_from_rfc3339(text).is_ok(),
            _ => true,
        };
        if !valid {
            errors.push(format!("{at}: `{text}` is not a {format}"));
        }
    }
    match value {
        Value::Object(object) => {
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap();
                if !object.contains_key(name) {
                    errors.push(format!("{at}: required `{name}` is missing"));
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            for (name, property) in object {
                let at = format!("{at}.{name}");
                match (
                    properties.and_then(|p| p.get(name)),
                    schema.get("additionalProperties"),
                ) {
                    (Some(declared), _) => conforms(doc, declared, property, &at, errors),
                    (None, Some(Value::Bool(false))) => {
                        errors.push(format!("{at}: not in the document"));
                    }
                    (None, Some(extra @ Value::Object(_))) => {
                        conforms(doc, extra, property, &at, errors);
                    }
                    (None, _) => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for (index, element) in items.iter().enumerate() {
                    conforms(doc, item, element, &format!("{at}[{index}]"), errors);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Data

fn id(resource: &Value) -> String {
    resource["id"].as_str().unwrap().to_owned()
}

fn one_attempt(subscription: Value) -> Value {
    with_extensions(
        subscription,
        json!([{ "url": MAX_ATTEMPTS, "valueInteger": 1 }]),
    )
}

async fn patient(pool: &PgPool, project: Uuid) -> Value {
    create(pool, project, &json!({ "resourceType": "Patient" }), None).await
}

/// Dispatches every change (deliveries made, none sent).
async fn dispatch(p: &Pipeline) {
    while p.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
}

/// A project with a subscription to an address nothing listens on and one pending delivery (only
/// dispatched): (subscription, patient, delivery id).
async fn pending_delivery(pool: &PgPool, project: Uuid) -> (String, String, i64) {
    let subscription = create(
        pool,
        project,
        &hook("http://127.0.0.1:9/hook", "Patient"),
        None,
    )
    .await;
    let patient = patient(pool, project).await;
    dispatch(&pipeline(pool, fast_config())).await;
    let delivery: i64 = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.delivery WHERE project_id = $1 AND subscription_id = $2",
    )
    .bind(project)
    .bind(id(&subscription))
    .fetch_one(pool)
    .await
    .unwrap();
    (id(&subscription), id(&patient), delivery)
}

async fn scalar<T>(pool: &PgPool, sql: &str, bind: impl ToString) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .bind(bind.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn delivery_state(pool: &PgPool, delivery: i64) -> String {
    sqlx::query_scalar("SELECT state FROM fhir_outbox.delivery WHERE id = $1")
        .bind(delivery)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn audit_event_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM fhir_outbox.resource WHERE resource_type = 'AuditEvent'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The AuditEvent that recorded an action's `result`, checked to name the action and the token.
async fn audited(pool: &PgPool, project: Uuid, result: &Value, token: &Token) -> Value {
    let event = capture::read(
        pool,
        project,
        "AuditEvent",
        result["audit_event_id"].as_str().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(event["subtype"][0]["code"], result["action"], "{event}");
    assert_eq!(event["outcomeDesc"], result["summary"], "{event}");
    let who = &event["agent"][0]["who"];
    assert_eq!(who["display"], token.name.as_str(), "{event}");
    assert_eq!(who["identifier"]["value"], token.id.to_string(), "{event}");
    event
}

// ---------------------------------------------------------------------------------------------
// The document

#[test]
fn openapi_describes_exactly_the_routes() {
    let doc: Value = serde_json::from_str(api::OPENAPI).expect("openapi.json is JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            let Some(operation) = item.get(method) else {
                continue;
            };
            documented.insert((method.to_owned(), path.clone()));
            // Every parameter of the template is declared as a path parameter.
            let declared: BTreeSet<String> = item["parameters"]
                .as_array()
                .into_iter()
                .chain(operation["parameters"].as_array())
                .flatten()
                .map(|parameter| resolve(&doc, parameter))
                .filter(|parameter| parameter["in"] == "path")
                .map(|parameter| parameter["name"].as_str().unwrap().to_owned())
                .collect();
            let in_template: BTreeSet<String> = path
                .split('/')
                .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
                .map(str::to_owned)
                .collect();
            assert_eq!(declared, in_template, "path parameters of {method} {path}");
            assert!(
                operation["responses"]["200"].is_object(),
                "{method} {path} documents no 200"
            );
            assert!(operation["operationId"].is_string(), "{method} {path}");
        }
    }
    let routes: BTreeSet<(String, String)> = api::ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(
        documented, routes,
        "openapi.json and api::ROUTES differ (left: the document)"
    );
    // Every $ref resolves.
    fn walk(doc: &Value, node: &Value) {
        match node {
            Value::Object(object) => {
                if object.contains_key("$ref") {
                    resolve(doc, node);
                }
                object.values().for_each(|child| walk(doc, child));
            }
            Value::Array(items) => items.iter().for_each(|child| walk(doc, child)),
            _ => {}
        }
    }
    walk(&doc, &doc);
}

/// One success of every route, each answer checked against the document (as every answer of every
/// test is); at the end, the routes that answered 2xx are exactly [`api::ROUTES`].
#[tokio::test]
async fn every_route_answers_as_documented() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None)]).await;
    let subscription = id(&create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await);
    let p = pipeline(&db.pool, fast_config());
    let patient = id(&patient(&db.pool, project).await);
    p.settle(&db.pool).await;
    let delivery: i64 = sqlx::query_scalar("SELECT id FROM fhir_outbox.delivery")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;

    // The document itself needs no token.
    let doc = api
        .send("get", "/openapi.json", Auth::None, None)
        .await
        .ok();
    assert_eq!(doc, api.doc);
    let me = api.get(&alice, "/whoami").await.ok();
    assert_eq!(
        me,
        json!({ "token_id": alice.id, "name": alice.name, "role": "operator", "project": null })
    );
    api.get(&alice, "/overview").await.ok();
    api.get(&alice, &format!("/overview?project={project}"))
        .await
        .ok();
    let projects = api.get(&alice, "/projects").await.ok();
    assert_eq!(projects["projects"][0]["id"], project.to_string());
    let base = format!("/projects/{project}");
    let subscriptions = api.get(&alice, &format!("{base}/subscriptions")).await.ok();
    assert_eq!(subscriptions["subscriptions"][0]["id"], subscription);
    let one = api
        .get(&alice, &format!("{base}/subscriptions/{subscription}"))
        .await
        .ok();
    assert_eq!(one["id"], subscription);
    assert_eq!(one["open_issues"], json!([]));
    api.get(&alice, &format!("{base}/issues")).await.ok();
    let endpoints = api.get(&alice, &format!("{base}/endpoints")).await.ok();
    assert_eq!(endpoints["endpoints"].as_array().unwrap().len(), 1);
    let page = api.get(&alice, &format!("{base}/deliveries")).await.ok();
    assert_eq!(page["deliveries"][0]["id"], delivery);
    let detail = api
        .get(&alice, &format!("{base}/deliveries/{delivery}"))
        .await
        .ok();
    assert_eq!(detail["attempts"].as_array().unwrap().len(), 2);

    let paused = api
        .post(
            &alice,
            &format!("{base}/subscriptions/{subscription}/pause"),
            None,
        )
        .await
        .ok();
    assert_eq!(paused["changed"], true);
    let replayed = api
        .post(
            &alice,
            &format!("{base}/deliveries/{delivery}/replay"),
            None,
        )
        .await
        .ok();
    assert_eq!(replayed["deliveries"], json!([delivery]));
    let resent = api
        .post(
            &alice,
            &format!("{base}/resources/Patient/{patient}/resend"),
            None,
        )
        .await
        .ok();
    assert!(resent["outbox_seq"].is_i64(), "{resent}");
    let reset = api
        .post(
            &alice,
            &format!("{base}/endpoints/reset"),
            Some(json!({ "endpoint": receiver.url })),
        )
        .await
        .ok();
    assert_eq!(reset["action"], "reset-endpoint");

    let answered = api.answered.lock().unwrap().clone();
    let routes: BTreeSet<(String, String)> = api::ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(answered, routes, "routes that answered 2xx vs api::ROUTES");
}

// ---------------------------------------------------------------------------------------------
// Reads

#[tokio::test]
async fn reads_show_figures_attempts_and_the_payload_sent() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // The first request fails; its delivery's retry and the two others succeed: 4 attempts, 3 good.
    let receiver = Receiver::start(vec![Reply::Status(500, None)]).await;
    let subscription = id(&create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await);
    let p = pipeline(&db.pool, fast_config());
    for _ in 0..3 {
        patient(&db.pool, project).await;
    }
    p.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), 4);
    let failed_patient = received[0].json()["id"].as_str().unwrap().to_owned();
    let webhook_id = received[0].header("webhook-id").unwrap().to_owned();
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");

    let summary = api
        .get(&alice, &format!("{base}/subscriptions/{subscription}"))
        .await
        .ok();
    assert_eq!(summary["endpoint"], receiver.url.as_str());
    assert_eq!(summary["status"], "active");
    assert_eq!(summary["criteria"], "Patient");
    assert_eq!(summary["paused"], false);
    assert_eq!(summary["auto_disabled"], false);
    assert_eq!(summary["issues"], 0);
    // Closed, or never recorded: a batch whose failure is followed by a success writes no circuit,
    // and the order of results within a batch is the order the requests finished.
    assert!(
        [Value::Null, json!("closed")].contains(&summary["circuit"]),
        "{summary}"
    );
    assert_eq!(
        (summary["pending"].as_i64(), summary["in_flight"].as_i64()),
        (Some(0), Some(0))
    );
    for window in ["last_hour", "last_day"] {
        let figures = &summary[window];
        assert_eq!(figures["attempts"], 4, "{window}: {figures}");
        assert_eq!(figures["succeeded"], 3, "{window}: {figures}");
        assert_eq!(figures["success_rate"], 0.75, "{window}: {figures}");
        let (p50, p99) = (
            figures["p50_ms"].as_f64().unwrap(),
            figures["p99_ms"].as_f64().unwrap(),
        );
        assert!(0.0 <= p50 && p50 <= p99, "{window}: {figures}");
        assert_eq!(figures["sampled"], false);
    }
    let list = api.get(&alice, &format!("{base}/subscriptions")).await.ok();
    assert_eq!(list["subscriptions"].as_array().unwrap().len(), 1);
    // The list shows what the detail shows, without the issues.
    let mut listed = list["subscriptions"][0].clone();
    listed["open_issues"] = summary["open_issues"].clone();
    assert_eq!(listed, summary);

    let overview = api.get(&alice, "/overview").await.ok();
    assert_eq!(
        (
            &overview["pending"],
            &overview["in_flight"],
            &overview["undispatched"],
            &overview["oldest_undelivered_at"],
        ),
        (&json!(0), &json!(0), &json!(0), &Value::Null)
    );
    assert_eq!(
        overview["failing_subscriptions"],
        json!([{ "project_id": project, "subscription_id": subscription, "failed_last_hour": 1,
                 "attempts_last_hour": 4, "last_error": "Received status 500" }])
    );
    let minutes = overview["per_minute"].as_array().unwrap();
    let total = |key: &str| {
        minutes
            .iter()
            .map(|m| m[key].as_i64().unwrap())
            .sum::<i64>()
    };
    assert_eq!((total("succeeded"), total("failed")), (3, 1));
    let projects = api.get(&alice, "/projects").await.ok();
    assert_eq!(projects["projects"][0]["subscriptions"], 1);
    assert_eq!(projects["projects"][0]["pending"], 0);

    let page = api
        .get(
            &alice,
            &format!("{base}/deliveries?resource=Patient/{failed_patient}"),
        )
        .await
        .ok();
    assert_eq!(page["deliveries"].as_array().unwrap().len(), 1);
    let item = &page["deliveries"][0];
    assert_eq!(item["webhook_id"], webhook_id.as_str());
    assert_eq!(item["state"], "succeeded");
    assert_eq!(item["attempts"], 2);
    assert_eq!(item["last_status"], 200);
    let delivery = item["id"].as_i64().unwrap();
    let detail = api
        .get(&alice, &format!("{base}/deliveries/{delivery}"))
        .await
        .ok();
    assert_eq!(detail["webhook_id"], webhook_id.as_str());
    assert_eq!(detail["resource"], format!("Patient/{failed_patient}"));
    assert_eq!(detail["replay"], false);
    assert_eq!(detail["endpoint"], receiver.url.as_str());
    // The payload is the body that was sent, as the receiver got it.
    assert_eq!(detail["payload"], received[0].json());
    let names: Vec<&str> = detail["header_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    for name in ["webhook-id", "webhook-timestamp", "x-medplum-subscription"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    let (first, second) = (&attempts[0], &attempts[1]);
    assert_eq!(
        (
            &first["attempt"],
            &first["succeeded"],
            &first["status"],
            &first["response_body"]
        ),
        (&json!(1), &json!(false), &json!(500), &json!("ok"))
    );
    assert_eq!(
        (&second["attempt"], &second["succeeded"], &second["status"]),
        (&json!(2), &json!(true), &json!(200))
    );
    assert_eq!(first["error"], "Received status 500");
    assert_eq!(second["error"], Value::Null);
    for attempt in attempts {
        assert!(attempt["duration_ms"].as_i64().unwrap() >= 0);
        let event = &attempt["audit_event"];
        assert_eq!(event["resourceType"], "AuditEvent", "{attempt}");
        assert_eq!(event["id"], attempt["audit_event_id"]);
        assert_eq!(
            event["entity"][1]["what"]["reference"],
            format!("Subscription/{subscription}")
        );
    }
    assert_eq!(first["audit_event"]["outcome"], "4");
    assert_eq!(second["audit_event"]["outcome"], "0");

    let issues = api.get(&alice, &format!("{base}/issues")).await.ok();
    assert_eq!(issues, json!({ "issues": [] }));
}

#[tokio::test]
async fn issues_are_listed_per_project_and_per_subscription() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // An endpoint with a user name is refused whatever the settings: an issue, a skipped delivery.
    let refused = id(&create(
        &db.pool,
        project,
        &hook("http://someone@127.0.0.1:9/hook", "Patient"),
        None,
    )
    .await);
    let fine = id(&create(
        &db.pool,
        project,
        &hook("http://127.0.0.1:9/hook", "Patient"),
        None,
    )
    .await);
    patient(&db.pool, project).await;
    dispatch(&pipeline(&db.pool, fast_config())).await;
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");

    let issues = api.get(&alice, &format!("{base}/issues")).await.ok();
    let issues = issues["issues"].as_array().unwrap();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0]["subscription_id"], refused);
    assert_eq!(issues[0]["subscription_version"], 1);
    assert!(
        issues[0]["message"]
            .as_str()
            .unwrap()
            .contains("user name or password"),
        "{issues:?}"
    );
    let only = api
        .get(&alice, &format!("{base}/issues?subscription={refused}"))
        .await
        .ok();
    assert_eq!(only["issues"].as_array().unwrap(), issues);
    let none = api
        .get(&alice, &format!("{base}/issues?subscription={fine}"))
        .await
        .ok();
    assert_eq!(none, json!({ "issues": [] }));
    let detail = api
        .get(&alice, &format!("{base}/subscriptions/{refused}"))
        .await
        .ok();
    assert_eq!(detail["issues"], 1);
    assert_eq!(detail["open_issues"].as_array().unwrap(), issues);
    let skipped = api
        .get(&alice, &format!("{base}/deliveries?state=skipped"))
        .await
        .ok();
    assert_eq!(skipped["deliveries"][0]["subscription_id"], refused);
}

#[tokio::test]
async fn deliveries_filter_and_page_without_overlap() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let good = Receiver::start(vec![]).await;
    let bad = Receiver::start(vec![Reply::Status(500, None); 7]).await;
    let good_sub = id(&create(&db.pool, project, &hook(&good.url, "Patient"), None).await);
    let bad_sub = id(&create(
        &db.pool,
        project,
        &one_attempt(hook(&bad.url, "Patient")),
        None,
    )
    .await);
    let p = pipeline(&db.pool, fast_config());
    let mut patients = Vec::new();
    for _ in 0..7 {
        patients.push(id(&patient(&db.pool, project).await));
    }
    p.settle(&db.pool).await;
    // Another project's delivery, never listed here.
    let other = db.project().await;
    pending_delivery(&db.pool, other).await;
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}/deliveries");
    let all: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.delivery WHERE project_id = $1 ORDER BY id DESC",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(all.len(), 14);

    let ids = |page: &Value| -> Vec<i64> {
        page["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_i64().unwrap())
            .collect()
    };
    // Every page by the cursor: newest first, disjoint, together everything.
    let walk = async |filter: &str, limit: usize| -> (Vec<i64>, usize) {
        let (mut seen, mut pages, mut cursor) = (Vec::new(), 0, None::<i64>);
        loop {
            let cursor_part = cursor.map_or(String::new(), |c| format!("&cursor={c}"));
            let page = api
                .get(
                    &alice,
                    &format!("{base}?limit={limit}{filter}{cursor_part}"),
                )
                .await
                .ok();
            let got = ids(&page);
            assert!(got.len() <= limit);
            pages += 1;
            seen.extend(got);
            match page["next_cursor"].as_i64() {
                Some(next) => {
                    assert_eq!(Some(&next), seen.last(), "the cursor is the page's last id");
                    cursor = Some(next);
                }
                None => return (seen, pages),
            }
        }
    };
    let (seen, pages) = walk("", 3).await;
    assert_eq!(seen, all, "pages in order, no overlap, nothing missing");
    assert_eq!(pages, 5);
    let failed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.delivery WHERE project_id = $1 AND state = 'failed' ORDER BY id DESC",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(failed.len(), 7);
    let (seen, pages) = walk("&state=failed", 2).await;
    assert_eq!((seen, pages), (failed.clone(), 4));
    let (seen, _) = walk("", 500).await;
    assert_eq!(seen, all);

    let count =
        async |filter: &str| ids(&api.get(&alice, &format!("{base}?{filter}")).await.ok()).len();
    assert_eq!(count("state=failed").await, 7);
    assert_eq!(count("state=succeeded").await, 7);
    assert_eq!(count("state=pending").await, 0);
    assert_eq!(count(&format!("subscription={good_sub}")).await, 7);
    assert_eq!(
        count(&format!("subscription={bad_sub}&state=failed")).await,
        7
    );
    assert_eq!(
        count(&format!("subscription={bad_sub}&state=succeeded")).await,
        0
    );
    assert_eq!(count(&format!("resource=Patient/{}", patients[3])).await, 2);
    assert_eq!(
        count(&format!("resource=Patient/{}&state=failed", patients[3])).await,
        1
    );
    assert_eq!(count("since=1h").await, 14);
    assert_eq!(count("until=1h").await, 0);
    assert_eq!(count("since=2d&until=0s").await, 14);
    let future = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(count(&format!("since={future}")).await, 0);
    assert_eq!(count(&format!("until={future}")).await, 14);
    // An offset's `+` must be sent as %2B (a `+` in a query string is a space).
    let at = (chrono::Utc::now() - chrono::Duration::hours(1))
        .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    assert!(at.ends_with("+01:00"));
    assert_eq!(
        count(&format!("since={}", at.replace('+', "%2B"))).await,
        14
    );
    // Page sizes outside 1 to 500 are brought into it; a cursor past the end is an empty last page.
    assert_eq!(count("limit=0").await, 1);
    assert_eq!(count("limit=-3").await, 1);
    assert_eq!(count("limit=100000").await, 14);
    let past = api
        .get(&alice, &format!("{base}?cursor={}", all.last().unwrap()))
        .await
        .ok();
    assert_eq!(past, json!({ "deliveries": [], "next_cursor": null }));
    // Empty parameters (what a form sends) are no filter.
    assert_eq!(
        count("state=&subscription=&resource=&since=&until=").await,
        14
    );

    for (filter, says) in [
        ("state=done", "done"),
        ("since=yesterday", "yesterday"),
        ("until=5x", "5x"),
        ("resource=Patient", "Patient"),
        ("resource=/123", "/123"),
        ("cursor=abc", "cursor"),
        ("limit=many", "limit"),
    ] {
        let message = api
            .get(&alice, &format!("{base}?{filter}"))
            .await
            .refused(StatusCode::BAD_REQUEST);
        assert!(message.contains(says), "{filter}: {message}");
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals

#[tokio::test]
async fn no_token_or_a_bad_one_is_401() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let (subscription, patient, delivery) = pending_delivery(&db.pool, project).await;
    let api = Console::start(&db.pool).await;
    let revoked = operator(&db.pool).await;
    assert_eq!(api.get(&revoked, "/whoami").await.status, StatusCode::OK);
    assert!(tokens::revoke(&db.pool, revoked.id).await.unwrap());
    let fill = |path: &str| {
        path.replace("{project}", &project.to_string())
            .replace("{id}/{action}", &format!("{delivery}/retry"))
            .replace(
                "subscriptions/{id}",
                &format!("subscriptions/{subscription}"),
            )
            .replace("{resource_type}/{id}", &format!("Patient/{patient}"))
            .replace("{id}", &delivery.to_string())
    };
    let mut checked = 0;
    for (method, route) in api::ROUTES {
        if *route == "/openapi.json" {
            continue;
        }
        let path = fill(route);
        let body = (*route == "/projects/{project}/endpoints/reset")
            .then(|| json!({ "endpoint": "http://127.0.0.1:9" }));
        for auth in [
            Auth::None,
            Auth::Bearer("fo_not-a-token"),
            Auth::Bearer("not even the prefix"),
            Auth::Bearer(&revoked.secret),
            Auth::Cookie("fo_not-a-token", None),
        ] {
            let answer = api.send(method, &path, auth, body.as_ref()).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path}: {:?}",
                answer.body
            );
            assert_eq!(
                answer.www_authenticate.as_deref(),
                Some("Bearer realm=\"fhir-outbox\""),
                "{method} {path}"
            );
            assert!(answer.body["error"].as_str().unwrap().contains("token"));
            checked += 1;
        }
    }
    assert_eq!(checked, (api::ROUTES.len() - 1) * 5);
    // Another scheme is no token.
    let basic = api
        .http
        .get(format!("{}/whoami", api.base))
        .header("authorization", "Basic YWxpY2U6cHc=")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
    // Nothing was done.
    assert_eq!(delivery_state(&db.pool, delivery).await, "pending");
    assert_eq!(audit_event_count(&db.pool).await, 0);
}

#[tokio::test]
async fn a_project_token_sees_and_acts_on_its_project_only() {
    let db = TestDb::new().await;
    let (mine, theirs) = (db.project().await, db.project().await);
    let (my_sub, _, my_delivery) = pending_delivery(&db.pool, mine).await;
    let (their_sub, their_patient, their_delivery) = pending_delivery(&db.pool, theirs).await;
    let scoped = token(&db.pool, "mine only", tokens::Role::Operator, Some(mine)).await;
    let everyone = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;

    let me = api.get(&scoped, "/whoami").await.ok();
    assert_eq!(me["project"], mine.to_string());
    let projects = api.get(&scoped, "/projects").await.ok();
    let listed: Vec<&str> = projects["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [mine.to_string()]);
    assert_eq!(
        api.get(&everyone, "/projects").await.ok()["projects"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The overview is of its project: one pending delivery, not both.
    assert_eq!(api.get(&scoped, "/overview").await.ok()["pending"], 1);
    assert_eq!(api.get(&everyone, "/overview").await.ok()["pending"], 2);
    assert_eq!(
        api.get(&scoped, &format!("/overview?project={mine}"))
            .await
            .ok()["pending"],
        1
    );

    // Another project is "not found", word for word like a project that does not exist.
    let nowhere = Uuid::new_v4();
    let requests = |project: Uuid| {
        let base = format!("/projects/{project}");
        vec![
            ("get", format!("/overview?project={project}"), None),
            ("get", format!("{base}/subscriptions"), None),
            ("get", format!("{base}/subscriptions/{their_sub}"), None),
            ("get", format!("{base}/issues"), None),
            ("get", format!("{base}/endpoints"), None),
            ("get", format!("{base}/deliveries"), None),
            ("get", format!("{base}/deliveries/{their_delivery}"), None),
            (
                "post",
                format!("{base}/subscriptions/{their_sub}/pause"),
                None,
            ),
            (
                "post",
                format!("{base}/subscriptions/{their_sub}/disable"),
                None,
            ),
            (
                "post",
                format!("{base}/deliveries/{their_delivery}/cancel"),
                None,
            ),
            (
                "post",
                format!("{base}/resources/Patient/{their_patient}/resend"),
                None,
            ),
            (
                "post",
                format!("{base}/endpoints/reset"),
                Some(json!({ "endpoint": "http://127.0.0.1:9" })),
            ),
        ]
    };
    for ((method, path, body), (_, nowhere_path, _)) in
        requests(theirs).into_iter().zip(requests(nowhere))
    {
        let refused = api
            .send(method, &path, Auth::Bearer(&scoped.secret), body.as_ref())
            .await
            .refused(StatusCode::NOT_FOUND);
        let absent = api
            .send(
                method,
                &nowhere_path,
                Auth::Bearer(&scoped.secret),
                body.as_ref(),
            )
            .await
            .refused(StatusCode::NOT_FOUND);
        assert_eq!(
            refused.replace(&theirs.to_string(), "…"),
            absent.replace(&nowhere.to_string(), "…"),
            "{method} {path}"
        );
        assert_eq!(refused, format!("project {theirs} not found"));
    }
    // Their delivery and subscription named under its own project: not found either.
    let base = format!("/projects/{mine}");
    api.get(&scoped, &format!("{base}/deliveries/{their_delivery}"))
        .await
        .refused(StatusCode::NOT_FOUND);
    api.post(
        &scoped,
        &format!("{base}/deliveries/{their_delivery}/cancel"),
        None,
    )
    .await
    .refused(StatusCode::NOT_FOUND);
    api.get(&scoped, &format!("{base}/subscriptions/{their_sub}"))
        .await
        .refused(StatusCode::NOT_FOUND);
    api.post(
        &scoped,
        &format!("{base}/subscriptions/{their_sub}/pause"),
        None,
    )
    .await
    .refused(StatusCode::NOT_FOUND);
    let listed = api.get(&scoped, &format!("{base}/deliveries")).await.ok();
    assert_eq!(listed["deliveries"].as_array().unwrap().len(), 1);
    assert_eq!(listed["deliveries"][0]["id"], my_delivery);
    // Nothing of theirs changed, nothing was recorded there.
    assert_eq!(delivery_state(&db.pool, their_delivery).await, "pending");
    let paused: i64 = scalar(
        &db.pool,
        "SELECT count(*) FROM fhir_outbox.subscription_pause WHERE subscription_id = $1",
        &their_sub,
    )
    .await;
    assert_eq!(paused, 0);
    assert_eq!(audit_event_count(&db.pool).await, 0);
    // Its own project it reads and acts on.
    api.get(&scoped, &format!("{base}/subscriptions/{my_sub}"))
        .await
        .ok();
    let cancelled = api
        .post(
            &scoped,
            &format!("{base}/deliveries/{my_delivery}/cancel"),
            None,
        )
        .await
        .ok();
    assert_eq!(cancelled["changed"], true);
    audited(&db.pool, mine, &cancelled, &scoped).await;
    // The token that sees everything reads theirs.
    api.get(
        &everyone,
        &format!("/projects/{theirs}/deliveries/{their_delivery}"),
    )
    .await
    .ok();

    // A project id that is not a UUID: 400, on every route that names one.
    for (method, route) in api::ROUTES {
        if !route.contains("{project}") {
            continue;
        }
        let path = route
            .replace("{project}", "not-a-uuid")
            .replace("{resource_type}", "Patient")
            .replace("{action}", "retry")
            .replace("{id}", "1");
        let message = api
            .send(
                method,
                &path,
                Auth::Bearer(&everyone.secret),
                Some(&json!({ "endpoint": "http://127.0.0.1:9" })),
            )
            .await
            .refused(StatusCode::BAD_REQUEST);
        assert!(message.contains("not-a-uuid"), "{method} {path}: {message}");
    }
    api.get(&everyone, "/overview?project=not-a-uuid")
        .await
        .refused(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn viewers_read_but_cannot_act() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let (subscription, patient, delivery) = pending_delivery(&db.pool, project).await;
    let viewer = token(&db.pool, "carol, read only", tokens::Role::Viewer, None).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");
    api.get(&viewer, &format!("{base}/deliveries/{delivery}"))
        .await
        .ok();
    api.get(&viewer, &format!("{base}/subscriptions/{subscription}"))
        .await
        .ok();
    let outbox_before = crate::common::outbox_count(&db.pool, project).await;
    let mut posts = Vec::new();
    for action in ["pause", "resume", "disable", "enable", "cancel", "retry"] {
        posts.push((
            format!("{base}/subscriptions/{subscription}/{action}"),
            None,
        ));
    }
    for action in ["retry", "replay", "cancel"] {
        posts.push((format!("{base}/deliveries/{delivery}/{action}"), None));
    }
    posts.push((format!("{base}/resources/Patient/{patient}/resend"), None));
    posts.push((
        format!("{base}/endpoints/reset"),
        Some(json!({ "endpoint": "http://127.0.0.1:9" })),
    ));
    for (path, body) in posts {
        let message = api
            .post(&viewer, &path, body)
            .await
            .refused(StatusCode::FORBIDDEN);
        assert!(message.contains("viewer"), "{path}: {message}");
        // From a browser session with the right CSRF token too.
        let csrf = tokens::csrf_token(&viewer.secret);
        api.send(
            "post",
            &path,
            Auth::Cookie(&viewer.secret, Some(&csrf)),
            Some(&json!({ "endpoint": "http://127.0.0.1:9" })),
        )
        .await
        .refused(StatusCode::FORBIDDEN);
    }
    assert_eq!(delivery_state(&db.pool, delivery).await, "pending");
    assert_eq!(audit_event_count(&db.pool).await, 0);
    assert_eq!(
        crate::common::outbox_count(&db.pool, project).await,
        outbox_before
    );
    let current = capture::read(&db.pool, project, "Subscription", &subscription)
        .await
        .unwrap();
    assert_eq!(current["meta"]["versionId"], "1");
    let paused: i64 = scalar(
        &db.pool,
        "SELECT count(*) FROM fhir_outbox.subscription_pause WHERE subscription_id = $1",
        &subscription,
    )
    .await;
    assert_eq!(paused, 0);
}

#[tokio::test]
async fn cookie_sessions_need_the_csrf_token_to_act() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let (subscription, _, _) = pending_delivery(&db.pool, project).await;
    let alice = operator(&db.pool).await;
    let bob = token(&db.pool, "bob", tokens::Role::Operator, None).await;
    let api = Console::start(&db.pool).await;
    let pause = format!("/projects/{project}/subscriptions/{subscription}/pause");
    let is_paused = async || {
        scalar::<i64>(
            &db.pool,
            "SELECT count(*) FROM fhir_outbox.subscription_pause WHERE subscription_id = $1",
            &subscription,
        )
        .await
            == 1
    };

    // Reading needs no CSRF token.
    let me = api
        .send("get", "/whoami", Auth::Cookie(&alice.secret, None), None)
        .await
        .ok();
    assert_eq!(me["name"], alice.name.as_str());
    let bobs = tokens::csrf_token(&bob.secret);
    for csrf in [None, Some("wrong"), Some(""), Some(bobs.as_str())] {
        let message = api
            .send("post", &pause, Auth::Cookie(&alice.secret, csrf), None)
            .await
            .refused(StatusCode::FORBIDDEN);
        assert!(message.contains("CSRF"), "{message}");
    }
    assert!(!is_paused().await);
    assert_eq!(audit_event_count(&db.pool).await, 0);
    let csrf = tokens::csrf_token(&alice.secret);
    let paused = api
        .send(
            "post",
            &pause,
            Auth::Cookie(&alice.secret, Some(&csrf)),
            None,
        )
        .await
        .ok();
    assert!(is_paused().await);
    audited(&db.pool, project, &paused, &alice).await;
    // A bearer token needs none: a browser never sends it by itself.
    let resumed = api
        .post(&alice, &pause.replace("/pause", "/resume"), None)
        .await
        .ok();
    assert_eq!(resumed["changed"], true);
    assert!(!is_paused().await);
}

#[tokio::test]
async fn unknown_deliveries_subscriptions_actions_and_projects_are_404() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let (subscription, _, delivery) = pending_delivery(&db.pool, project).await;
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");
    let not_found = async |method: &str, path: String| {
        api.send(method, &path, Auth::Bearer(&alice.secret), None)
            .await
            .refused(StatusCode::NOT_FOUND)
    };
    assert_eq!(
        not_found("get", format!("{base}/deliveries/999999")).await,
        "delivery 999999 not found in this project"
    );
    assert_eq!(
        not_found("get", format!("{base}/subscriptions/nope")).await,
        "Subscription/nope not found in this project"
    );
    for action in ["pause", "resume", "disable", "enable", "cancel", "retry"] {
        let message = not_found("post", format!("{base}/subscriptions/nope/{action}")).await;
        assert_eq!(
            message, "Subscription/nope not found in this project",
            "{action}"
        );
    }
    for action in ["retry", "replay", "cancel"] {
        let message = not_found("post", format!("{base}/deliveries/999999/{action}")).await;
        assert_eq!(
            message, "delivery 999999 not found in this project",
            "{action}"
        );
    }
    let message = not_found(
        "post",
        format!("{base}/subscriptions/{subscription}/explode"),
    )
    .await;
    assert!(message.contains("`explode` is not an action"), "{message}");
    let message = not_found("post", format!("{base}/deliveries/{delivery}/pause")).await;
    assert!(message.contains("`pause` is not an action"), "{message}");
    // A delivery id that is not a number is a bad request, in the API's error shape.
    let message = api
        .get(&alice, &format!("{base}/deliveries/abc"))
        .await
        .refused(StatusCode::BAD_REQUEST);
    assert!(message.contains("abc"), "{message}");
    api.post(&alice, &format!("{base}/deliveries/abc/retry"), None)
        .await
        .refused(StatusCode::BAD_REQUEST);
    // A project that does not exist, for a token that sees every project.
    let nowhere = format!("/projects/{}", Uuid::new_v4());
    for path in ["subscriptions", "issues", "endpoints", "deliveries"] {
        not_found("get", format!("{nowhere}/{path}")).await;
    }
    not_found(
        "post",
        format!("{nowhere}/subscriptions/{subscription}/pause"),
    )
    .await;
    not_found("post", format!("{nowhere}/deliveries/{delivery}/retry")).await;
    let unknown_endpoint = api
        .post(
            &alice,
            &format!("{base}/endpoints/reset"),
            Some(json!({ "endpoint": "https://nowhere.example:8443/x" })),
        )
        .await
        .refused(StatusCode::NOT_FOUND);
    assert!(unknown_endpoint.contains("no subscription of this project delivers to"));
    assert_eq!(delivery_state(&db.pool, delivery).await, "pending");
    assert_eq!(
        audit_event_count(&db.pool).await,
        0,
        "refused actions record nothing"
    );
}

/// `resume`, `cancel` and `retry` of a subscription accept a deleted subscription that still has
/// deliveries or a pause (`actions::require_known_subscription`). (They answered 500 before
/// `actions::require_subscription` asked with a query: the read it made before aborted the
/// action's transaction when the subscription was not found.)
#[tokio::test]
async fn a_deleted_subscriptions_deliveries_can_still_be_acted_on() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let (subscription, _, delivery) = pending_delivery(&db.pool, project).await;
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");
    // A deleted subscription's deliveries can still be cancelled.
    capture::delete(
        &db.pool,
        project,
        "Subscription",
        &subscription,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    let cancelled = api
        .post(
            &alice,
            &format!("{base}/subscriptions/{subscription}/cancel"),
            None,
        )
        .await
        .ok();
    assert_eq!(cancelled["deliveries"], json!([delivery]));
    assert_eq!(delivery_state(&db.pool, delivery).await, "cancelled");
    for action in ["retry", "resume"] {
        let result = api
            .post(
                &alice,
                &format!("{base}/subscriptions/{subscription}/{action}"),
                None,
            )
            .await
            .ok();
        assert_eq!(result["changed"], false, "{result}");
        audited(&db.pool, project, &result, &alice).await;
    }
    // What needs the subscription itself does not find it.
    for action in ["pause", "disable", "enable"] {
        api.post(
            &alice,
            &format!("{base}/subscriptions/{subscription}/{action}"),
            None,
        )
        .await
        .refused(StatusCode::NOT_FOUND);
    }
}

// ---------------------------------------------------------------------------------------------
// Actions and their effects

#[tokio::test]
async fn cancel_finishes_pending_deliveries_as_cancelled() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let subscription = id(&create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await);
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");
    // Paused, so that its deliveries wait.
    let paused = api
        .post(
            &alice,
            &format!("{base}/subscriptions/{subscription}/pause"),
            None,
        )
        .await
        .ok();
    audited(&db.pool, project, &paused, &alice).await;
    for _ in 0..3 {
        patient(&db.pool, project).await;
    }
    let p = pipeline(&db.pool, fast_config());
    dispatch(&p).await;
    p.worker.deliver_once().await.unwrap();
    let pending: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.delivery WHERE state = 'pending' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending.len(), 3);

    let one = api
        .post(
            &alice,
            &format!("{base}/deliveries/{}/cancel", pending[0]),
            None,
        )
        .await
        .ok();
    assert_eq!(one["changed"], true);
    assert_eq!(one["deliveries"], json!([pending[0]]));
    audited(&db.pool, project, &one, &alice).await;
    assert_eq!(one["summary"], format!("cancelled delivery {}", pending[0]));
    let rest = api
        .post(
            &alice,
            &format!("{base}/subscriptions/{subscription}/cancel"),
            None,
        )
        .await
        .ok();
    let mut cancelled: Vec<i64> = serde_json::from_value(rest["deliveries"].clone()).unwrap();
    cancelled.sort();
    assert_eq!(cancelled, pending[1..]);
    let event = audited(&db.pool, project, &rest, &alice).await;
    // The deliveries it changed are named in the AuditEvent.
    let named: Vec<&str> = event["entity"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["what"]["identifier"]["value"].as_str())
        .collect();
    assert_eq!(named.len(), 2, "{event}");

    let rows: Vec<(
        String,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<String>,
    )> = sqlx::query_as("SELECT state, finished_at, reason FROM fhir_outbox.delivery ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for (state, finished_at, reason) in &rows {
        assert_eq!(state, "cancelled");
        assert!(finished_at.is_some());
        assert_eq!(reason.as_deref(), Some("cancelled by alice at ops"));
    }
    let counted: i64 = scalar(
        &db.pool,
        "SELECT cancelled FROM fhir_outbox.subscription_delivery_status WHERE subscription_id = $1",
        &subscription,
    )
    .await;
    assert_eq!(counted, 3);
    let listed = api
        .get(&alice, &format!("{base}/deliveries?state=cancelled"))
        .await
        .ok();
    assert_eq!(listed["deliveries"].as_array().unwrap().len(), 3);
    // Nothing left to cancel: answered, recorded, nothing changed.
    let again = api
        .post(
            &alice,
            &format!("{base}/deliveries/{}/cancel", pending[0]),
            None,
        )
        .await
        .ok();
    assert_eq!(again["changed"], false);
    assert!(again["summary"].as_str().unwrap().contains("is cancelled"));
    audited(&db.pool, project, &again, &alice).await;
    // Resuming sends nothing: they were cancelled.
    api.post(
        &alice,
        &format!("{base}/subscriptions/{subscription}/resume"),
        None,
    )
    .await
    .ok();
    p.settle(&db.pool).await;
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn replay_sends_the_original_payload_with_its_webhook_id() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    let original = patient(&db.pool, project).await;
    let patient_id = id(&original);
    p.settle(&db.pool).await;
    let first: i64 = sqlx::query_scalar("SELECT id FROM fhir_outbox.delivery")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // The resource moves on after the delivery.
    capture::update(
        &db.pool,
        project,
        "Patient",
        &patient_id,
        &json!({ "resourceType": "Patient", "id": patient_id, "active": true }),
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 2);
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");

    let replayed = api
        .post(&alice, &format!("{base}/deliveries/{first}/replay"), None)
        .await
        .ok();
    assert_eq!(replayed["changed"], true);
    assert_eq!(replayed["deliveries"], json!([first]));
    audited(&db.pool, project, &replayed, &alice).await;
    p.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), 3);
    assert_eq!(
        received[2].header("webhook-id"),
        received[0].header("webhook-id")
    );
    assert_ne!(
        received[1].header("webhook-id"),
        received[0].header("webhook-id")
    );
    // The version of the delivery, not the current one.
    assert_eq!(received[2].json(), received[0].json());
    assert_eq!(received[2].json()["meta"]["versionId"], "1");
    assert_eq!(received[2].json()["active"], Value::Null);

    let detail = api
        .get(&alice, &format!("{base}/deliveries/{first}"))
        .await
        .ok();
    assert_eq!(detail["replay"], true);
    assert_eq!(detail["state"], "succeeded");
    assert_eq!(detail["payload"], received[0].json());
    assert_eq!(
        detail["webhook_id"],
        received[0].header("webhook-id").unwrap()
    );
    let attempts: Vec<i64> = detail["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(
        attempts,
        [1, 1],
        "the replay is a new attempt, numbered from 1"
    );

    // Only a finished delivery can be replayed; a pending one is left as it is.
    let paused_sub =
        id(&create(&db.pool, project, &hook(&receiver.url, "Observation"), None).await);
    api.post(
        &alice,
        &format!("{base}/subscriptions/{paused_sub}/pause"),
        None,
    )
    .await
    .ok();
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Observation", "status": "final", "code": { "text": "x" } }),
        None,
    )
    .await;
    dispatch(&p).await;
    let waiting: i64 = scalar(
        &db.pool,
        "SELECT id FROM fhir_outbox.delivery WHERE subscription_id = $1",
        &paused_sub,
    )
    .await;
    let refused = api
        .post(&alice, &format!("{base}/deliveries/{waiting}/replay"), None)
        .await
        .ok();
    assert_eq!(refused["changed"], false);
    assert!(
        refused["summary"]
            .as_str()
            .unwrap()
            .contains("only a finished delivery")
    );
}

#[tokio::test]
async fn resend_delivers_the_current_version_and_refuses_a_deleted_resource() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let a = id(&create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await);
    let b = id(&create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await);
    let p = pipeline(&db.pool, fast_config());
    let patient_id = id(&patient(&db.pool, project).await);
    capture::update(
        &db.pool,
        project,
        "Patient",
        &patient_id,
        &json!({ "resourceType": "Patient", "id": patient_id, "active": true }),
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 4);
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let resend = format!("/projects/{project}/resources/Patient/{patient_id}/resend");
    let deliveries_of = async |seq: i64| -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT subscription_id, version_id FROM fhir_outbox.delivery WHERE outbox_seq = $1 ORDER BY subscription_id",
        )
        .bind(seq)
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };

    // To every subscription, as an update.
    let everyone = api.post(&alice, &resend, None).await.ok();
    audited(&db.pool, project, &everyone, &alice).await;
    p.settle(&db.pool).await;
    let seq = everyone["outbox_seq"].as_i64().unwrap();
    let mut expected = vec![(a.clone(), 2), (b.clone(), 2)];
    expected.sort();
    assert_eq!(deliveries_of(seq).await, expected);
    let received = receiver.received();
    assert_eq!(received.len(), 6);
    for request in &received[4..] {
        assert_eq!(request.json()["meta"]["versionId"], "2");
        assert_eq!(request.json()["active"], true);
        assert_eq!(request.header("x-medplum-interaction"), Some("update"));
    }
    // New deliveries: new webhook-ids.
    let earlier: BTreeSet<&str> = received[..4]
        .iter()
        .map(|r| r.header("webhook-id").unwrap())
        .collect();
    assert!(
        received[4..]
            .iter()
            .all(|r| !earlier.contains(r.header("webhook-id").unwrap()))
    );

    // To one, as a create.
    let one = api
        .post(
            &alice,
            &resend,
            Some(json!({ "subscription": a, "interaction": "create" })),
        )
        .await
        .ok();
    audited(&db.pool, project, &one, &alice).await;
    p.settle(&db.pool).await;
    assert_eq!(
        deliveries_of(one["outbox_seq"].as_i64().unwrap()).await,
        [(a.clone(), 2)]
    );
    let last = receiver.received().pop().unwrap();
    assert_eq!(last.header("x-medplum-subscription"), Some(a.as_str()));
    assert_eq!(last.header("x-medplum-interaction"), Some("create"));

    let message = api
        .post(&alice, &resend, Some(json!({ "interaction": "delete" })))
        .await
        .refused(StatusCode::BAD_REQUEST);
    assert!(message.contains("delete"), "{message}");
    api.post(&alice, &resend, Some(json!({ "subscription": "nope" })))
        .await
        .refused(StatusCode::NOT_FOUND);
    let message = api
        .post(
            &alice,
            &format!("/projects/{project}/resources/Patient/nobody/resend"),
            None,
        )
        .await
        .refused(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("does not exist"), "{message}");
    let message = api
        .post(
            &alice,
            &format!("/projects/{project}/resources/Nonsense/x/resend"),
            None,
        )
        .await
        .refused(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("Nonsense/x"), "{message}");
    capture::delete(
        &db.pool,
        project,
        "Patient",
        &patient_id,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    p.settle(&db.pool).await;
    let before = crate::common::outbox_count(&db.pool, project).await;
    let message = api
        .post(&alice, &resend, None)
        .await
        .refused(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message,
        format!("cannot resend Patient/{patient_id}: it is deleted")
    );
    assert_eq!(crate::common::outbox_count(&db.pool, project).await, before);
}

#[tokio::test]
async fn pause_resume_disable_and_enable_a_subscription() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let subscription = id(&create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await);
    let p = pipeline(&db.pool, fast_config());
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let path = format!("/projects/{project}/subscriptions/{subscription}");
    let act = async |action: &str| {
        let result = api
            .post(&alice, &format!("{path}/{action}"), None)
            .await
            .ok();
        assert_eq!(result["action"], action);
        audited(&db.pool, project, &result, &alice).await;
        result
    };
    let paused_rows = async || -> i64 {
        scalar(
            &db.pool,
            "SELECT count(*) FROM fhir_outbox.subscription_pause WHERE subscription_id = $1",
            &subscription,
        )
        .await
    };

    assert_eq!(act("pause").await["changed"], true);
    assert_eq!(paused_rows().await, 1);
    assert_eq!(api.get(&alice, &path).await.ok()["paused"], true);
    assert_eq!(act("pause").await["changed"], false, "already paused");
    patient(&db.pool, project).await;
    dispatch(&p).await;
    p.worker.deliver_once().await.unwrap();
    assert!(receiver.received().is_empty());
    assert_eq!(api.get(&alice, &path).await.ok()["pending"], 1);
    assert_eq!(act("resume").await["changed"], true);
    assert_eq!(paused_rows().await, 0);
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(api.get(&alice, &path).await.ok()["paused"], false);

    let disabled = act("disable").await;
    assert_eq!(disabled["changed"], true);
    let current = capture::read(&db.pool, project, "Subscription", &subscription)
        .await
        .unwrap();
    assert_eq!(current["status"], "off");
    assert_eq!(current["meta"]["versionId"], "2");
    // The new version is authored by the token: its name and id.
    assert_eq!(
        current["meta"]["author"]["reference"],
        format!("fhir-outbox console token {} ({})", alice.name, alice.id)
    );
    let shown = api.get(&alice, &path).await.ok();
    assert_eq!(
        (
            &shown["status"],
            &shown["version_id"],
            &shown["auto_disabled"]
        ),
        (&json!("off"), &json!(2), &json!(false))
    );
    assert_eq!(act("disable").await["changed"], false, "already off");
    patient(&db.pool, project).await;
    p.settle(&db.pool).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "nothing for a disabled subscription"
    );

    let enabled = act("enable").await;
    assert_eq!(enabled["changed"], true);
    let current = capture::read(&db.pool, project, "Subscription", &subscription)
        .await
        .unwrap();
    assert_eq!(
        (&current["status"], &current["meta"]["versionId"]),
        (&json!("active"), &json!("3"))
    );
    patient(&db.pool, project).await;
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 2);

    // Disabled automatically (status off with an error): shown so, and enable clears the error.
    let mut auto = current.clone();
    auto["status"] = json!("off");
    auto["error"] = json!("Automatically disabled after 3 consecutive failed events");
    capture::update(
        &db.pool,
        project,
        "Subscription",
        &subscription,
        &auto,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    let shown = api.get(&alice, &path).await.ok();
    assert_eq!(
        (&shown["auto_disabled"], &shown["error"]),
        (&json!(true), &auto["error"])
    );
    act("enable").await;
    let shown = api.get(&alice, &path).await.ok();
    assert_eq!(
        (&shown["status"], &shown["auto_disabled"], &shown["error"]),
        (&json!("active"), &json!(false), &Value::Null)
    );
}

#[tokio::test]
async fn retry_sends_failed_deliveries_again_with_their_webhook_id() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None), Reply::Status(500, None)]).await;
    let subscription = id(&create(
        &db.pool,
        project,
        &one_attempt(hook(&receiver.url, "Patient")),
        None,
    )
    .await);
    let p = pipeline(&db.pool, fast_config());
    patient(&db.pool, project).await;
    patient(&db.pool, project).await;
    p.settle(&db.pool).await;
    let failed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.delivery WHERE state = 'failed' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(failed.len(), 2);
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");

    let one = api
        .post(
            &alice,
            &format!("{base}/deliveries/{}/retry", failed[0]),
            None,
        )
        .await
        .ok();
    assert_eq!(one["deliveries"], json!([failed[0]]));
    audited(&db.pool, project, &one, &alice).await;
    p.settle(&db.pool).await;
    assert_eq!(delivery_state(&db.pool, failed[0]).await, "succeeded");
    assert_eq!(delivery_state(&db.pool, failed[1]).await, "failed");
    let rest = api
        .post(
            &alice,
            &format!("{base}/subscriptions/{subscription}/retry"),
            None,
        )
        .await
        .ok();
    assert_eq!(rest["deliveries"], json!([failed[1]]));
    audited(&db.pool, project, &rest, &alice).await;
    p.settle(&db.pool).await;
    assert_eq!(delivery_state(&db.pool, failed[1]).await, "succeeded");
    let received = receiver.received();
    assert_eq!(received.len(), 4);
    let ids: Vec<&str> = received
        .iter()
        .map(|r| r.header("webhook-id").unwrap())
        .collect();
    let distinct: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        2,
        "each retry carries its delivery's webhook-id: {ids:?}"
    );
    // A succeeded delivery is not retried.
    let again = api
        .post(
            &alice,
            &format!("{base}/deliveries/{}/retry", failed[0]),
            None,
        )
        .await
        .ok();
    assert_eq!(again["changed"], false);
}

#[tokio::test]
async fn endpoints_show_their_circuit_and_reset_closes_it() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None)]).await;
    let subscription = id(&create(
        &db.pool,
        project,
        &one_attempt(hook(&receiver.url, "Patient")),
        None,
    )
    .await);
    // One failure opens the circuit, for an hour: nothing closes it but the reset.
    let p = pipeline(
        &db.pool,
        DeliveryConfig {
            circuit: CircuitBreaker {
                failures: 1,
                cool_down: Duration::from_secs(3600),
                max_cool_down: Duration::from_secs(3600),
            },
            ..fast_config()
        },
    );
    patient(&db.pool, project).await;
    p.settle(&db.pool).await;
    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");
    let origin = receiver.url.trim_end_matches("/hook").to_owned();

    let endpoints = api.get(&alice, &format!("{base}/endpoints")).await.ok();
    let endpoint = &endpoints["endpoints"][0];
    assert_eq!(endpoint["endpoint"], origin.as_str());
    assert_eq!(endpoint["state"], "open");
    assert_eq!(endpoint["consecutive_failures"], 1);
    // Its receiver's figures, from the attempts of the subscriptions on it: one, failed.
    assert_eq!(endpoint["last_hour"]["attempts"], 1);
    assert_eq!(endpoint["last_hour"]["success_rate"], 0.0);
    assert_eq!(endpoint["last_day"]["attempts"], 1);
    assert_eq!(
        api.get(&alice, &format!("{base}/subscriptions/{subscription}"))
            .await
            .ok()["circuit"],
        "open"
    );
    assert_eq!(api.get(&alice, "/overview").await.ok()["open_circuits"], 1);
    assert_eq!(
        api.get(&alice, "/projects").await.ok()["projects"][0]["open_circuits"],
        1
    );

    // Any URL of the endpoint names it.
    let reset = api
        .post(
            &alice,
            &format!("{base}/endpoints/reset"),
            Some(json!({ "endpoint": format!("{origin}/elsewhere") })),
        )
        .await
        .ok();
    assert_eq!(reset["changed"], true);
    audited(&db.pool, project, &reset, &alice).await;
    let state: String = scalar(
        &db.pool,
        "SELECT state FROM fhir_outbox.endpoint_health WHERE endpoint = fhir_outbox.endpoint_origin($1)",
        &receiver.url,
    )
    .await;
    assert_eq!(state, "closed");
    let again = api
        .post(
            &alice,
            &format!("{base}/endpoints/reset"),
            Some(json!({ "endpoint": receiver.url })),
        )
        .await
        .ok();
    assert_eq!(again["changed"], false);
    // The body is required, and JSON.
    api.post(&alice, &format!("{base}/endpoints/reset"), None)
        .await
        .refused(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    api.post(
        &alice,
        &format!("{base}/endpoints/reset"),
        Some(json!({ "url": "x" })),
    )
    .await
    .refused(StatusCode::UNPROCESSABLE_ENTITY);
}

// ---------------------------------------------------------------------------------------------
// Redaction

#[tokio::test]
async fn secrets_headers_and_endpoint_credentials_never_appear() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![Reply::Status(500, None)]).await;
    let port = receiver
        .url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/hook")
        .to_owned();
    const USER: &str = "user-R3DACT-1";
    const PASSWORD: &str = "password-R3DACT-2";
    const QUERY: &str = "query-R3DACT-3";
    const OTHER_QUERY: &str = "query-R3DACT-4";
    const HEADER: &str = "header-R3DACT-5";
    const API_KEY: &str = "apikey-R3DACT-6";
    const SIGNING: &str = "signing-R3DACT-7";
    const FRAGMENT: &str = "fragment-R3DACT-8";
    // Refused (credentials in the URL): an issue and skipped deliveries.
    let with_credentials = id(&create(
        &db.pool,
        project,
        &hook(
            &format!("http://{USER}:{PASSWORD}@127.0.0.1:{port}/hook?token={QUERY}#{FRAGMENT}"),
            "Patient",
        ),
        None,
    )
    .await);
    // Delivered: a token in the query string, credentials in headers, a signing secret.
    let mut delivered = hook(&format!("{}?token={OTHER_QUERY}", receiver.url), "Patient");
    delivered["channel"]["header"] = json!([
        format!("Authorization: Bearer {HEADER}"),
        format!("X-Api-Key: {API_KEY}")
    ]);
    delivered["extension"] = json!([{ "url": SECRET_EXTENSION, "valueString": SIGNING }]);
    let delivered = id(&create(&db.pool, project, &delivered, None).await);
    let p = pipeline(&db.pool, fast_config());
    let patient_id = id(&patient(&db.pool, project).await);
    p.settle(&db.pool).await;
    // What was sent carried them (so they are there to be leaked).
    let request = &receiver.received()[0];
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {HEADER}").as_str())
    );
    assert!(request.path.contains(OTHER_QUERY));

    let alice = operator(&db.pool).await;
    let api = Console::start(&db.pool).await;
    let base = format!("/projects/{project}");
    api.get(&alice, "/overview").await.ok();
    api.get(&alice, "/projects").await.ok();
    let list = api.get(&alice, &format!("{base}/subscriptions")).await.ok();
    let endpoint_of = |id: &str| {
        list["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()["endpoint"]
            .clone()
    };
    assert_eq!(
        endpoint_of(&with_credentials),
        format!("http://***@127.0.0.1:{port}/hook?…")
    );
    assert_eq!(
        endpoint_of(&delivered),
        format!("http://127.0.0.1:{port}/hook?…")
    );
    for subscription in [&with_credentials, &delivered] {
        api.get(&alice, &format!("{base}/subscriptions/{subscription}"))
            .await
            .ok();
    }
    let issues = api.get(&alice, &format!("{base}/issues")).await.ok();
    assert_eq!(issues["issues"].as_array().unwrap().len(), 1);
    api.get(&alice, &format!("{base}/endpoints")).await.ok();
    let page = api.get(&alice, &format!("{base}/deliveries")).await.ok();
    let mut header_names = Vec::new();
    for delivery in page["deliveries"].as_array().unwrap() {
        let detail = api
            .get(&alice, &format!("{base}/deliveries/{}", delivery["id"]))
            .await
            .ok();
        if detail["subscription_id"] == delivered {
            header_names = detail["header_names"].as_array().unwrap().clone();
            assert_eq!(detail["attempts"].as_array().unwrap().len(), 2);
        } else {
            assert_eq!(detail["state"], "skipped");
        }
    }
    for name in [
        "authorization",
        "x-api-key",
        "webhook-signature",
        "x-signature",
    ] {
        assert!(
            header_names.contains(&json!(name)),
            "{name} in {header_names:?}"
        );
    }
    // Actions answer with summaries: none of them either.
    for action in ["pause", "resume", "disable", "enable", "retry", "cancel"] {
        for subscription in [&with_credentials, &delivered] {
            api.post(
                &alice,
                &format!("{base}/subscriptions/{subscription}/{action}"),
                None,
            )
            .await
            .ok();
        }
    }
    api.post(
        &alice,
        &format!("{base}/resources/Patient/{patient_id}/resend"),
        None,
    )
    .await
    .ok();
    api.post(
        &alice,
        &format!("{base}/endpoints/reset"),
        Some(json!({ "endpoint": format!("http://127.0.0.1:{port}") })),
    )
    .await
    .ok();
    p.settle(&db.pool).await;
    let page = api.get(&alice, &format!("{base}/deliveries")).await.ok();
    for delivery in page["deliveries"].as_array().unwrap() {
        api.get(&alice, &format!("{base}/deliveries/{}", delivery["id"]))
            .await
            .ok();
    }
    for secret in [
        USER,
        PASSWORD,
        QUERY,
        OTHER_QUERY,
        HEADER,
        API_KEY,
        SIGNING,
        FRAGMENT,
        "R3DACT",
    ] {
        api.never_showed(secret);
    }
    assert!(api.bodies.lock().unwrap().len() > 20);
}

/// The index names a plan reads `finished_delivery`'s partitions with, and whether it scans one
/// whole.
fn history_scans(plan: &str) -> (Vec<String>, bool) {
    let index = regex::Regex::new(
        r"(?:using (\S+) on finished_delivery|Bitmap Index Scan on (finished_delivery\S+))",
    )
    .unwrap();
    let names = index
        .captures_iter(plan)
        .map(|found| found.get(1).or(found.get(2)).unwrap().as_str().to_owned())
        .collect();
    (names, plan.contains("Seq Scan on finished_delivery"))
}

/// A page of a time window follows the partitions' `(project_id, changed_at)` indexes, so it reads
/// about a page of rows whatever the history around the window. On this data (ids growing with
/// change times, as dispatch makes them) the planner walked the id indexes from the newest delivery
/// back to the window when the list was ordered by id (the bench's console scenario measured
/// 102–110 ms for one page). Pages follow each other exactly across changes delivered several
/// times (ties of `changed_at`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_window_page_reads_the_change_time_indexes() {
    use fhir_outbox::capture::StoreError;
    use fhir_outbox::operations::console::queries::{self, DeliveryQuery};

    let db = TestDb::new().await;
    // 100,000 finished deliveries of 10 projects over the last 24 hours: 20,000 changes, each
    // delivered to 5 subscriptions.
    sqlx::raw_sql(
        "INSERT INTO fhir_outbox.finished_delivery
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
              resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
              state, finished_at)
         SELECT project, 'sub-' || g % 5, g / 5, project, 'Patient', 'p' || g / 5 % 1000, 1,
                'create', changed, 'r', 't', changed, 'succeeded', changed + interval '1 second'
         FROM generate_series(0, 99999) g,
              LATERAL (SELECT now() - interval '24 hours' + g / 5 * interval '4.32 seconds'
                       AS changed,
                       ('00000000-0000-0000-0000-00000000000' || g / 5 % 10)::uuid AS project) f
         ORDER BY g;
         ANALYZE fhir_outbox.finished_delivery;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let project: Uuid = "00000000-0000-0000-0000-000000000003".parse().unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let statement = include_str!("../../src/operations/console/deliveries_in_window.sql");
    sqlx::raw_sql(&format!(
        "PREPARE page(uuid, text, text, text, text, timestamptz, timestamptz, timestamptz, int8,
                      int8) AS {statement}"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    for (since, until) in [
        ("NULL", "now() - interval '23 hours'"),
        ("now() - interval '12 hours'", "now() - interval '11 hours'"),
    ] {
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN (COSTS OFF) EXECUTE page('{project}', NULL, NULL, NULL, NULL, {since},
                                              {until}, NULL, NULL, 51)"
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let plan = plan.join("\n");
        let (indexes, whole) = history_scans(&plan);
        assert!(
            !whole
                && !indexes.is_empty()
                && indexes
                    .iter()
                    .all(|name| name.ends_with("_project_id_changed_at_idx")),
            "since {since}, until {until}: the page does not follow the change-time indexes:\n{plan}"
        );
    }

    // The pages, against the same order computed plainly.
    let until = chrono::Utc::now() - chrono::Duration::hours(23);
    let expected: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.finished_delivery WHERE project_id = $1 AND changed_at < $2
         ORDER BY changed_at DESC, id DESC LIMIT 144",
    )
    .bind(project)
    .bind(until)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(expected.len(), 144);
    let mut seen = Vec::new();
    let mut cursor = None;
    for _ in 0..3 {
        let page = queries::deliveries(
            &db.pool,
            project,
            &DeliveryQuery {
                until: Some(until),
                before: cursor,
                limit: 48,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        seen.extend(page.deliveries.iter().map(|delivery| delivery.id));
        cursor = page.next_cursor;
    }
    assert_eq!(seen, expected);

    // A cursor that names no delivery of the project (removed by retention, say) is refused.
    let refused = queries::deliveries(
        &db.pool,
        project,
        &DeliveryQuery {
            until: Some(until),
            before: Some(-1),
            limit: 48,
            ..Default::default()
        },
    )
    .await;
    assert!(
        matches!(&refused, Err(StoreError::NotFound(message)) if message.contains("cursor -1")),
        "{refused:?}"
    );
}
