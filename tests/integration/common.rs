//! The test harness: one throwaway PostgreSQL cluster per test run, a fresh database per test.

use pgtemp::{Durability, TempCluster};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use uuid::Uuid;

const TEMPLATE: &str = "fhir_outbox_template";

/// The cluster shared by every test of this binary. It is never dropped (statics are not); its
/// watchdog removes it when the test process exits.
static CLUSTER: LazyLock<TempCluster> = LazyLock::new(|| {
    let cluster = TempCluster::start(Durability::Fast).expect("start a throwaway PostgreSQL");
    let url = cluster.url("postgres");
    let template_url = cluster.url(TEMPLATE);
    // Migrating needs async; this runs inside some test's runtime, so use a thread with its own.
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut admin = PgConnection::connect(&url).await.unwrap();
                admin
                    .execute(format!("CREATE DATABASE {TEMPLATE}").as_str())
                    .await
                    .unwrap();
                let pool = fhir_outbox::db::connect(&template_url, 1).await.unwrap();
                fhir_outbox::db::migrate(&pool).await.unwrap();
                pool.close().await;
            })
    })
    .join()
    .expect("migrate the template database");
    cluster
});

static NEXT_DATABASE: AtomicUsize = AtomicUsize::new(0);

/// A database of its own for one test.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
}

impl TestDb {
    /// A fresh, migrated database (copied from the migrated template) with a small pool.
    pub async fn new() -> TestDb {
        Self::with_pool_size(5).await
    }

    /// A fresh, migrated database with a pool of `size` connections.
    pub async fn with_pool_size(size: u32) -> TestDb {
        let name = create_database(Some(TEMPLATE)).await;
        let url = CLUSTER.url(&name);
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .connect(&url)
            .await
            .expect("connect to the test database");
        TestDb { pool, url }
    }

    /// A project to write into.
    pub async fn project(&self) -> Uuid {
        fhir_outbox::project::create_project(&self.pool, "test")
            .await
            .expect("create a project")
    }

    /// Runs SQL through `psql` (another application sharing the database) and returns its output.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        let psql = CLUSTER.bin_dir().join("psql");
        let output = std::process::Command::new(&psql)
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }
}

/// An empty database (no migrations), for migration tests.
pub async fn empty_database_url() -> String {
    CLUSTER.url(&create_database(None).await)
}

async fn create_database(template: Option<&str>) -> String {
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = PgConnection::connect(&CLUSTER.url("postgres"))
        .await
        .expect("connect to the cluster");
    let template = template.map_or(String::new(), |t| format!(" TEMPLATE {t}"));
    admin
        .execute(format!("CREATE DATABASE {name}{template}").as_str())
        .await
        .expect("create the test database");
    admin.close().await.ok();
    name
}

/// Number of outbox rows of a project.
pub async fn outbox_count(pool: &PgPool, project: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.outbox WHERE project_id = $1")
        .bind(project)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Number of stored versions of a project.
pub async fn version_count(pool: &PgPool, project: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.resource_version WHERE project_id = $1")
        .bind(project)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The `fhir-outbox` binary, quiet: logs off and no admin endpoint unless a test sets them again.
pub fn binary() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-outbox"));
    command
        .env("FHIR_OUTBOX_LOG", "off")
        .env("FHIR_OUTBOX_ADMIN_ADDR", "off");
    command
}

/// Runs the binary to completion: whether it succeeded, and what it printed (stdout then stderr).
pub fn cli(args: &[&str]) -> (bool, String) {
    let output = binary().args(args).output().expect("run fhir-outbox");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Stops a running binary gracefully (SIGTERM), waits for it, and returns its standard error (it
/// must have been spawned with `stderr(Stdio::piped())`).
pub fn stop_and_read_logs(mut child: std::process::Child) -> String {
    use std::io::Read;
    sigterm(&child);
    child.wait().unwrap();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    logs
}

/// The lines of a JSON log (`--log-format json`) whose message passes `message`.
pub fn json_log_lines(logs: &str, message: impl Fn(&str) -> bool) -> Vec<serde_json::Value> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["fields"]["message"].as_str().is_some_and(&message))
        .collect()
}

/// Asks a running binary to shut down gracefully (SIGTERM).
pub fn sigterm(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM");
}

/// The trace id of [`ghost_change`]'s outbox rows.
pub const GHOST_TRACE: &str = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736";

/// Writes an outbox row for `Patient/<id>` version 1 by hand, with no resource or version behind
/// it: a change written outside the SQL functions.
pub async fn ghost_change(pool: &PgPool, project: Uuid, id: &str) {
    sqlx::query(
        "INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id, interaction,
                                         changed_at, request_id, trace_id)
         VALUES ($1, 'Patient', $2, 1, 'create', clock_timestamp(), 'r', $3)",
    )
    .bind(project)
    .bind(id)
    .bind(GHOST_TRACE)
    .execute(pool)
    .await
    .unwrap();
}
