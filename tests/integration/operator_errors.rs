//! What a user sees when an operator command cannot do what was asked: one line, `error: …`, a
//! non-zero exit, and what to do about it; never a backtrace, never an empty answer.

use crate::common::{TestDb, binary, empty_database_url, sigterm};
use std::io::{BufRead, BufReader};

/// Runs the binary: exit code, stdout, stderr. `RUST_BACKTRACE=1`, so a backtrace would show.
fn run(args: &[&str]) -> (i32, String, String) {
    let output = binary()
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("FHIR_OUTBOX_PROJECT")
        .output()
        .expect("run fhir-outbox");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Asserts a failure with exit status 1 and one `error:` line containing `expected`.
fn assert_error(args: &[&str], expected: &str) {
    let (code, stdout, stderr) = run(args);
    assert_eq!(
        code, 1,
        "{args:?}: exit status\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line\n{stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected `{expected}` in\n{stderr}"
    );
    assert!(
        !stderr.contains("acktrace"),
        "{args:?}: a backtrace\n{stderr}"
    );
}

const NOBODY: &str = "00000000-0000-4000-8000-000000000000";

#[tokio::test]
async fn every_command_on_an_unmigrated_database_says_to_migrate() {
    let url = empty_database_url().await;
    let migrate = "run `fhir-outbox migrate` first";
    for args in [
        vec!["status"],
        vec!["deliveries"],
        vec!["status", "--project", NOBODY],
        vec!["pause", "--project", NOBODY, "--subscription", "s1"],
        vec!["resume", "--project", NOBODY, "--subscription", "s1"],
        vec!["retry", "--project", NOBODY, "--delivery", "1"],
        vec!["resend", "--project", NOBODY, "--resource", "Patient/p1"],
        vec!["prune"],
        vec!["project", "list"],
        vec!["project", "create", "x"],
        vec![
            "explain",
            "--project",
            NOBODY,
            "--subscription",
            "s1",
            "--resource",
            "Patient/p1",
        ],
        vec!["run", "--admin-addr", "off"],
    ] {
        let mut args = args;
        args.extend(["--database-url", &url]);
        assert_error(&args, migrate);
        let (_, _, stderr) = run(&args);
        assert!(!stderr.contains("does not exist"), "{args:?}: {stderr}");
    }
    // After migrating, the same command works.
    let (code, _, stderr) = run(&["migrate", "--database-url", &url]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run(&["status", "--database-url", &url]);
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test]
async fn unknown_projects_subscriptions_and_deliveries_are_errors() {
    let db = TestDb::new().await;
    let project = db.project().await.to_string();
    let url = db.url.as_str();
    let unknown_project = format!("unknown project {NOBODY}");
    for args in [
        vec!["status", "--project", NOBODY],
        vec!["deliveries", "--project", NOBODY],
        vec!["pause", "--project", NOBODY, "--subscription", "s1"],
        vec!["resume", "--project", NOBODY, "--subscription", "s1"],
        vec![
            "retry",
            "--project",
            NOBODY,
            "--failed-since",
            "2026-01-01T00:00:00Z",
        ],
        vec!["resend", "--project", NOBODY, "--resource", "Patient/p1"],
        vec![
            "explain",
            "--project",
            NOBODY,
            "--subscription",
            "s1",
            "--resource",
            "Patient/p1",
        ],
        vec!["project", "show", NOBODY],
        vec!["project", "settings", NOBODY],
        vec!["project", "settings", NOBODY, "--set", "{}"],
    ] {
        let mut args = args;
        args.extend(["--database-url", url]);
        assert_error(&args, &unknown_project);
    }
    let not_found = "Subscription/nope not found in this project";
    for args in [
        vec!["pause", "--project", &project, "--subscription", "nope"],
        vec!["resume", "--project", &project, "--subscription", "nope"],
        vec!["retry", "--project", &project, "--subscription", "nope"],
        vec![
            "deliveries",
            "--project",
            &project,
            "--subscription",
            "nope",
        ],
        vec![
            "resend",
            "--project",
            &project,
            "--resource",
            "Patient/p1",
            "--subscription",
            "nope",
        ],
    ] {
        let mut args = args;
        args.extend(["--database-url", url]);
        assert_error(&args, not_found);
    }
    assert_error(
        &[
            "retry",
            "--project",
            &project,
            "--delivery",
            "4242",
            "--database-url",
            url,
        ],
        "delivery 4242 not found in this project",
    );
    // A command line clap rejects exits with 2.
    let (code, _, _) = run(&["status", "--project", "not-a-uuid", "--database-url", url]);
    assert_eq!(code, 2);
}

#[tokio::test]
async fn projects_from_the_cli_and_invalid_settings_name_the_problem() {
    let db = TestDb::new().await;
    let url = db.url.as_str();
    let (code, id, stderr) = run(&[
        "project",
        "create",
        "clinic",
        "--settings",
        r#"{"redactAuditEvents": true}"#,
        "--server-scope",
        "--database-url",
        url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let id = id.trim();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "prints the id: {id}");
    let (code, list, _) = run(&["project", "list", "--database-url", url]);
    assert_eq!(code, 0);
    assert!(
        list.contains(id) && list.contains("clinic") && list.contains("true"),
        "{list}"
    );
    let (code, shown, _) = run(&["project", "show", id, "--database-url", url]);
    assert_eq!(code, 0);
    assert!(shown.contains(r#""redactAuditEvents": true"#), "{shown}");
    assert!(shown.contains(r#""server_scope": true"#), "{shown}");

    assert_error(
        &["project", "create", "", "--database-url", url],
        "invalid project: the name is empty",
    );
    assert_error(
        &[
            "project",
            "create",
            "x",
            "--settings",
            "[1]",
            "--database-url",
            url,
        ],
        "settings must be a JSON object",
    );
    assert_error(
        &[
            "project",
            "create",
            "x",
            "--settings",
            "{",
            "--database-url",
            url,
        ],
        "settings are not JSON",
    );
    let zero =
        r#"{"subscriptionAutoDisable": [{"maxConsecutiveFailures": 0, "timeWindowSeconds": 5}]}"#;
    assert_error(
        &[
            "project",
            "settings",
            id,
            "--set",
            zero,
            "--database-url",
            url,
        ],
        "greater than 0",
    );
    // Unchanged by the refused update; a valid one replaces them.
    let (code, settings, _) = run(&["project", "settings", id, "--database-url", url]);
    assert_eq!(code, 0);
    assert!(settings.contains("redactAuditEvents"), "{settings}");
    let (code, settings, stderr) = run(&[
        "project",
        "settings",
        id,
        "--set",
        r#"{"preCommitSubscriptionsEnabled": true}"#,
        "--database-url",
        url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        settings.contains("preCommitSubscriptionsEnabled") && !settings.contains("redact"),
        "{settings}"
    );
    // From SQL, the same checks (SQLSTATE OB012).
    let error = db
        .psql("SELECT fhir_outbox.create_project('')")
        .unwrap_err();
    assert!(
        error.contains("invalid project: the name is empty"),
        "{error}"
    );
    let error = db
        .psql("SELECT fhir_outbox.create_project('x', '[]')")
        .unwrap_err();
    assert!(error.contains("settings must be a JSON object"), "{error}");
    let error = db
        .psql(
            "DO $$ BEGIN PERFORM fhir_outbox.create_project(''); \
             EXCEPTION WHEN SQLSTATE 'OB012' THEN RAISE EXCEPTION 'caught OB012'; END $$",
        )
        .unwrap_err();
    assert!(error.contains("caught OB012"), "{error}");
    let server_scope = db
        .psql(
            "CREATE TEMP TABLE created AS SELECT fhir_outbox.create_project('s', '{}', true) AS id; \
             SELECT server_scope FROM fhir_outbox.project JOIN created USING (id)",
        )
        .unwrap();
    assert_eq!(server_scope, "t");
}

#[tokio::test]
async fn a_taken_admin_address_says_how_to_choose_another_and_port_0_logs_the_one_bound() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    assert_error(
        &["run", "--admin-addr", &address, "--database-url", &db.url],
        "--admin-addr",
    );
    let (_, _, stderr) = run(&["run", "--admin-addr", &address, "--database-url", &db.url]);
    assert!(
        stderr.contains(&address) && stderr.contains("127.0.0.1:0"),
        "{stderr}"
    );

    let mut child = binary()
        .args([
            "run",
            "--admin-addr",
            "127.0.0.1:0",
            "--database-url",
            &db.url,
        ])
        .env("FHIR_OUTBOX_LOG", "fhir_outbox=info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start fhir-outbox run");
    let stderr = child.stderr.take().unwrap();
    let mut logged = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        assert!(
            !line.contains('\u{1b}'),
            "no colours in a piped log: {line:?}"
        );
        if let Some(rest) = line.split("admin endpoint on http://").nth(1) {
            logged = Some(rest.split('/').next().unwrap().to_owned());
            break;
        }
    }
    sigterm(&child);
    child.wait().unwrap();
    let logged = logged.expect("the bound admin address is logged");
    let port: u16 = logged.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0, "{logged}");
}

/// Settings the pipeline reads are checked when written, by any writer (a plain UPDATE included):
/// an invalid `subscriptionAutoDisable` used to be ignored at delivery time in favour of the
/// server's triggers, silently.
#[tokio::test]
async fn invalid_project_settings_are_refused_by_every_writer() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let update = |settings: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query("UPDATE fhir_outbox.project SET settings = $2::jsonb WHERE id = $1")
                .bind(project)
                .bind(settings)
                .execute(&pool)
                .await
        }
    };
    for (settings, problem) in [
        (
            r#"{"subscriptionAutoDisable": [{"maxConsecutiveFailures": 0, "timeWindowSeconds": 60}]}"#,
            "whole numbers above 0",
        ),
        (
            r#"{"subscriptionAutoDisable": [{"maxConsecutiveFailures": 2}]}"#,
            "whole numbers above 0",
        ),
        (
            r#"{"subscriptionAutoDisable": [{"maxConsecutiveFailures": 2, "timeWindowSeconds": 60, "x": 1}]}"#,
            "whole numbers above 0",
        ),
        (
            r#"{"subscriptionAutoDisable": {"maxConsecutiveFailures": 2}}"#,
            "must be an array",
        ),
        (r#"{"subscriptionAutoDisable": "not json"}"#, "not JSON"),
        (
            r#"{"redactAuditEvents": "yes"}"#,
            "redactAuditEvents must be true or false",
        ),
    ] {
        let error = update(settings).await.expect_err(settings);
        let db_error = error.as_database_error().expect("a database error");
        assert_eq!(db_error.code().as_deref(), Some("OB012"), "{settings}");
        assert!(
            db_error.message().contains(problem),
            "{settings}: {}",
            db_error.message()
        );
    }
    for settings in [
        r#"{"subscriptionAutoDisable": []}"#,
        r#"{"subscriptionAutoDisable": "[{\"maxConsecutiveFailures\": 3, \"timeWindowSeconds\": 60}]"}"#,
        r#"{"redactAuditEvents": true, "somethingElse": {"kept": 1}}"#,
    ] {
        update(settings).await.expect(settings);
    }
    let invalid = fhir_outbox::project::ProjectSettings {
        other: serde_json::from_str(r#"{"redactAuditEvents": 1}"#).unwrap(),
        ..Default::default()
    };
    let refused = fhir_outbox::project::set_settings(&db.pool, project, &invalid)
        .await
        .expect_err("refused");
    assert!(
        matches!(refused, fhir_outbox::project::ProjectError::Invalid(_)),
        "{refused}"
    );
}
