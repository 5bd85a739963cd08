//! The operator verbs the console shares with the command line, run as a user would: `token`,
//! `subscriptions list|show`, `deliveries show`, `replay`, `cancel`, `disable`, `enable`, and
//! `--since` with a duration.

use crate::common::{TestDb, binary};
use crate::delivery::{create, fast_config, hook, pipeline};
use crate::receiver::{Receiver, Reply};
use fhir_outbox::capture::{self, WriteContext};
use serde_json::{Value, json};

/// Runs the binary against `url`: success, stdout, stderr.
fn run(url: &str, args: &[&str]) -> (bool, String, String) {
    let output = binary()
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("FHIR_OUTBOX_PROJECT")
        .output()
        .expect("run fhir-outbox");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn ok(url: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = run(url, args);
    assert!(success, "{args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// `fhir-outbox project list | head -1`: once the reader has gone, the next line printed ends the
/// command quietly, with success, instead of a panic and its backtrace on standard error.
#[tokio::test]
async fn a_listing_whose_reader_has_gone_ends_quietly() {
    let db = TestDb::new().await;
    db.project().await;
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let output = binary()
        .args(["project", "list"])
        .env("DATABASE_URL", &db.url)
        .env("RUST_BACKTRACE", "1")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fhir-outbox")
        .wait_with_output()
        .expect("wait for fhir-outbox");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.is_empty(), "printed to standard error: {stderr}");
}

#[tokio::test]
async fn tokens_are_created_once_listed_without_secrets_and_revoked() {
    let db = TestDb::new().await;
    let project = db.project().await.to_string();
    let created: Value = serde_json::from_str(&ok(
        &db.url,
        &[
            "token",
            "create",
            "--name",
            "ops",
            "--role",
            "viewer",
            "--project",
            &project,
            "--json",
        ],
    ))
    .unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("fo_") && secret.len() > 40, "{secret}");
    assert_eq!(created["role"], "viewer");
    assert_eq!(created["project_id"], project.as_str());
    let stored: Vec<u8> = sqlx::query_scalar(
        "SELECT secret_sha256 FROM fhir_outbox.console_token WHERE name = 'ops'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 32, "only a SHA-256 is stored");

    let listed = ok(&db.url, &["token", "list"]);
    assert!(
        listed.contains("ops") && listed.contains("viewer"),
        "{listed}"
    );
    assert!(!listed.contains(secret), "the list shows no secret");

    let id = created["id"].as_str().unwrap();
    assert!(ok(&db.url, &["token", "revoke", id]).contains("revoked"));
    assert!(ok(&db.url, &["token", "revoke", id]).contains("revoked already"));
    let revoked = fhir_outbox::operations::console::tokens::authenticate(&db.pool, secret)
        .await
        .unwrap();
    assert!(revoked.is_none(), "a revoked token is refused");

    let (success, _, stderr) = run(
        &db.url,
        &[
            "token",
            "create",
            "--name",
            "x",
            "--role",
            "viewer",
            "--project",
            "00000000-0000-4000-8000-000000000000",
        ],
    );
    assert!(!success);
    assert!(stderr.contains("does not exist"), "{stderr}");
    let (success, _, stderr) = run(
        &db.url,
        &["token", "create", "--name", "x", "--role", "admin"],
    );
    assert!(!success);
    assert!(
        stderr.contains("viewer") && stderr.contains("operator"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_operator_sees_a_failing_subscription_reads_a_delivery_and_replays_cancels_disables() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let p = project.to_string();
    // Two failures (500, with a body), then success.
    let receiver = Receiver::start(vec![Reply::Status(500, None), Reply::Status(500, None)]).await;
    let mut subscription = hook(&format!("{}?token=s3cret", receiver.url), "Patient");
    subscription["channel"]["header"] = json!(["Authorization: Bearer hunter2"]);
    let subscription = create(&db.pool, project, &subscription, None).await;
    let id = subscription["id"].as_str().unwrap().to_owned();
    let patient = create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient", "active": true }),
        None,
    )
    .await;
    let workers = pipeline(&db.pool, fast_config());
    workers.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 3);

    // subscriptions list / show: figures, redacted endpoint.
    let list = ok(&db.url, &["subscriptions", "list", "--project", &p]);
    assert!(list.contains(&id), "{list}");
    assert!(
        list.contains("33.3 % of 3"),
        "one success of three attempts:\n{list}"
    );
    let shown: Value = serde_json::from_str(&ok(
        &db.url,
        &["subscriptions", "show", &id, "--project", &p, "--json"],
    ))
    .unwrap();
    assert_eq!(shown["last_hour"]["attempts"], 3);
    assert_eq!(shown["last_hour"]["succeeded"], 1);
    assert!(
        shown["endpoint"].as_str().unwrap().ends_with("?…"),
        "{shown}"
    );
    for text in [&list, &shown.to_string()] {
        assert!(
            !text.contains("s3cret") && !text.contains("hunter2"),
            "{text}"
        );
    }

    // deliveries --since 1h, then show: what was sent and answered.
    let deliveries: Value = serde_json::from_str(&ok(
        &db.url,
        &["deliveries", "--project", &p, "--since", "1h", "--json"],
    ))
    .unwrap();
    let delivery = deliveries[0]["id"].as_i64().unwrap().to_string();
    let webhook_id = deliveries[0]["webhook_id"].as_str().unwrap().to_owned();
    let detail = ok(&db.url, &["deliveries", "show", &delivery, "--project", &p]);
    assert!(detail.contains(&webhook_id), "{detail}");
    assert!(
        detail.contains("\"active\": true"),
        "the payload:\n{detail}"
    );
    assert!(detail.contains("500") && detail.contains("200"), "{detail}");
    assert!(detail.contains("authorization"), "header names:\n{detail}");
    assert!(
        !detail.contains("hunter2") && !detail.contains("s3cret"),
        "{detail}"
    );

    // Replay after the resource changed: its own version, same webhook-id.
    let mut changed = patient.clone();
    changed["active"] = json!(false);
    capture::update(
        &db.pool,
        project,
        "Patient",
        patient["id"].as_str().unwrap(),
        &changed,
        None,
        &WriteContext::default(),
    )
    .await
    .unwrap();
    workers.settle(&db.pool).await;
    let before = receiver.received().len();
    let replayed = ok(
        &db.url,
        &["replay", "--project", &p, "--delivery", &delivery],
    );
    assert!(replayed.starts_with("Replayed delivery"), "{replayed}");
    workers.settle(&db.pool).await;
    let received = receiver.received();
    assert_eq!(received.len(), before + 1);
    let last = received.last().unwrap();
    assert_eq!(last.header("webhook-id"), Some(webhook_id.as_str()));
    assert_eq!(last.json()["active"], json!(true), "the original version");

    // Pause, write, cancel the backlog: nothing is sent, the rows are cancelled.
    ok(&db.url, &["pause", "--project", &p, "--subscription", &id]);
    for _ in 0..3 {
        create(
            &db.pool,
            project,
            &json!({ "resourceType": "Patient" }),
            None,
        )
        .await;
    }
    while workers.dispatcher.dispatch_once().await.unwrap().changes > 0 {}
    let cancelled = ok(&db.url, &["cancel", "--project", &p, "--subscription", &id]);
    assert!(
        cancelled.contains("Cancelled 3 pending deliveries"),
        "{cancelled}"
    );
    ok(&db.url, &["resume", "--project", &p, "--subscription", &id]);
    workers.settle(&db.pool).await;
    assert_eq!(
        receiver.received().len(),
        before + 1,
        "nothing cancelled was sent"
    );
    let status: Value =
        serde_json::from_str(&ok(&db.url, &["status", "--project", &p, "--json"])).unwrap();
    assert_eq!(status["subscriptions"][0]["cancelled"], 3);

    // Disable, enable: new versions authored by the command line; each action has its AuditEvent.
    assert!(
        ok(
            &db.url,
            &["disable", "--project", &p, "--subscription", &id]
        )
        .contains("off")
    );
    let current = capture::read(&db.pool, project, "Subscription", &id)
        .await
        .unwrap();
    assert_eq!(current["status"], "off");
    assert!(ok(&db.url, &["enable", "--project", &p, "--subscription", &id]).contains("active"));
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT content -> 'subtype' -> 0 ->> 'code' FROM fhir_outbox.resource_version
         WHERE project_id = $1 AND resource_type = 'AuditEvent'
           AND content -> 'subtype' -> 0 ->> 'system' = 'https://fhir-outbox.dev/operator-action'
         ORDER BY last_updated",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        actions,
        ["replay", "pause", "cancel", "resume", "disable", "enable"]
    );

    // What cannot be done says why.
    let (success, _, stderr) = run(
        &db.url,
        &["cancel", "--project", &p, "--delivery", "999999"],
    );
    assert!(
        !success && stderr.contains("delivery 999999 not found"),
        "{stderr}"
    );
    let (success, stdout, _) = run(
        &db.url,
        &["cancel", "--project", &p, "--delivery", &delivery],
    );
    assert!(
        success && stdout.contains("only a pending delivery"),
        "{stdout}"
    );
    let (success, _, stderr) = run(&db.url, &["deliveries", "--since", "yesterday"]);
    assert!(!success && stderr.contains("not a time"), "{stderr}");
}

/// Starts the binary with `args` against `url` and waits until it announces its console (`console`
/// on standard output, `run` in its log); returns the process and the console's address. The
/// stream is read on to its end meanwhile, so that the process never writes to a closed pipe.
fn spawn_until_console_announced(url: &str, args: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = binary()
        .args(args)
        .env("DATABASE_URL", url)
        .env("FHIR_OUTBOX_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stream: Box<dyn std::io::Read + Send> = if args[0] == "console" {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    let mut lines = BufReader::new(stream).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("the console's address is printed")
            .unwrap();
        if let Some(rest) = line
            .split("http://")
            .nth(1)
            .filter(|_| line.contains("onsole"))
        {
            break rest.split('/').next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, address)
}

#[tokio::test]
async fn console_serves_the_api_alone_and_run_serves_it_beside_the_pipeline() {
    let db = TestDb::new().await;
    let (_, secret) = fhir_outbox::operations::console::tokens::create(
        &db.pool,
        "reader",
        fhir_outbox::operations::console::tokens::Role::Viewer,
        None,
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    for args in [
        ["console", "--console-addr", "127.0.0.1:0"],
        ["run", "--console-addr", "127.0.0.1:0"],
    ] {
        let (mut child, address) = spawn_until_console_announced(&db.url, &args);
        let base = format!("http://{address}/api/v1");
        let who = http
            .get(format!("{base}/whoami"))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        assert_eq!(who.status(), 200, "{args:?}");
        assert_eq!(who.json::<Value>().await.unwrap()["name"], "reader");
        let anonymous = http.get(format!("{base}/overview")).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{args:?}");
        crate::common::sigterm(&child);
        assert!(child.wait().unwrap().success(), "{args:?} stops on SIGTERM");
    }
}

/// A supervisor (or a test) may stop a process the moment it announces itself, so the signal
/// handlers must be in place by then. Until they were installed before the announcement, about one
/// stop in fifteen killed `run` with SIGTERM's default action instead of shutting it down.
#[tokio::test]
async fn run_and_console_stop_cleanly_on_a_signal_sent_as_soon_as_they_announce_themselves() {
    let db = TestDb::new().await;
    for args in [
        &[
            "run",
            "--console-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "off",
        ][..],
        &["console", "--console-addr", "127.0.0.1:0"][..],
    ] {
        for attempt in 0..25 {
            let (mut child, _) = spawn_until_console_announced(&db.url, args);
            crate::common::sigterm(&child);
            let status = child.wait().unwrap();
            assert!(status.success(), "{args:?}, stop {attempt}: {status}");
        }
    }
}
