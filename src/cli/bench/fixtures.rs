//! The bench's environment: the throwaway cluster, databases copied from a migrated template, the
//! receiver, test data, and the worker run as a child process.

use super::BenchError;
use super::receiver::Receiver;
use super::system;
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::db;
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use pgtemp::{Durability, TempCluster};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The secret every bench subscription signs with (signatures are part of the measured work).
pub const SECRET: &str = "bench-secret-0123456789";
const SECRET_URL: &str = "https://www.medplum.com/fhir/StructureDefinition/subscription-secret";
const TEMPLATE: &str = "bench_template";

/// A pool like [`db::connect`]'s, without sqlx's statement logging (CREATE DATABASE, VACUUM and
/// the big inserts are slow on purpose; their warnings would only be noise).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, BenchError> {
    use sqlx::ConnectOptions;
    let options = PgConnectOptions::from_str(url)?
        .application_name("fhir-outbox-bench")
        .disable_statement_logging();
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(options)
        .await?)
}

/// Checkpoints the cluster has made since it started (timed and requested; PostgreSQL up to 16
/// keeps the counts in `pg_stat_bgwriter`).
pub async fn checkpoints(pool: &PgPool) -> Result<i64, BenchError> {
    Ok(
        sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
            .fetch_one(pool)
            .await?,
    )
}

/// Everything the scenarios share.
pub struct Env {
    cluster: TempCluster,
    admin: PgPool,
    /// The loopback receiver every subscription points at.
    pub receiver: Receiver,
    /// PID of the postmaster (for CPU accounting).
    pub postmaster: Option<u32>,
    /// `server_version`.
    pub postgres_version: String,
    /// Clock ticks per second.
    pub ticks: f64,
    /// Where worker logs go.
    pub scratch: tempfile::TempDir,
    /// Whether pg_stat_statements is loaded (in every database copied from the template).
    pub statements: bool,
}

impl Env {
    /// Starts a durable cluster (synchronous_commit on), migrates a template database, starts the
    /// receiver. With `statements`, the cluster loads pg_stat_statements.
    pub async fn start(statements: bool) -> Result<Env, BenchError> {
        let task_error = |error| BenchError::Other(format!("cluster start-up task: {error}"));
        let mut cluster = tokio::task::spawn_blocking(|| TempCluster::start(Durability::Durable))
            .await
            .map_err(task_error)??;
        let mut admin = connect(&cluster.url("postgres"), 2).await?;
        if statements {
            sqlx::query("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
                .execute(&admin)
                .await?;
            admin.close().await;
            cluster = tokio::task::spawn_blocking(move || {
                cluster
                    .restart(Duration::ZERO, Durability::Durable)
                    .map(|()| cluster)
            })
            .await
            .map_err(task_error)??;
            admin = connect(&cluster.url("postgres"), 2).await?;
            // Statements inside our plpgsql functions too, not only what the worker sends.
            for setting in [
                "ALTER SYSTEM SET pg_stat_statements.track = 'all'",
                "ALTER SYSTEM SET pg_stat_statements.track_planning = on",
                "SELECT pg_reload_conf()",
            ] {
                sqlx::query(setting).execute(&admin).await?;
            }
        }
        sqlx::query(&format!("CREATE DATABASE {TEMPLATE}"))
            .execute(&admin)
            .await?;
        let template = connect(&cluster.url(TEMPLATE), 2).await?;
        if statements {
            sqlx::query("CREATE EXTENSION pg_stat_statements")
                .execute(&template)
                .await?;
        }
        db::migrate(&template).await?;
        template.close().await;
        sqlx::query(&format!(
            "ALTER DATABASE {TEMPLATE} WITH ALLOW_CONNECTIONS false"
        ))
        .execute(&admin)
        .await?;
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&admin)
            .await?;
        let postgres_version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&admin)
            .await?;
        Ok(Env {
            postmaster: system::parent(backend as u32),
            cluster,
            admin,
            receiver: Receiver::start().await?,
            postgres_version,
            ticks: system::clock_ticks(),
            scratch: tempfile::Builder::new()
                .prefix("fhir-outbox-bench-")
                .tempdir()?,
            statements,
        })
    }

    /// The URL of a database of the cluster.
    pub fn url(&self, database: &str) -> String {
        self.cluster.url(database)
    }

    /// A fresh migrated database (a copy of the template).
    pub async fn create_db(&self, name: &str) -> Result<String, BenchError> {
        self.copy_db(TEMPLATE, name).await
    }

    /// A copy of `source` (which must have no open connections). FILE_COPY: a big database is copied
    /// by files after a checkpoint rather than through the WAL.
    pub async fn copy_db(&self, source: &str, name: &str) -> Result<String, BenchError> {
        self.drop_db(name).await?;
        // The template must have no sessions: autovacuum may have one open (after a big insert).
        // Templates are sealed (no new connections, which autovacuum respects), and a session still
        // there is ended; retried because one may start between the two.
        let mut attempts = 0;
        loop {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(source)
            .execute(&self.admin)
            .await?;
            let created = sqlx::query(&format!(
                "CREATE DATABASE {name} TEMPLATE {source} STRATEGY FILE_COPY"
            ))
            .execute(&self.admin)
            .await;
            match created {
                Ok(_) => return Ok(self.url(name)),
                Err(error) if attempts < 40 && error.to_string().contains("being accessed") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Refuses new connections to a database that is now only a template (autovacuum then leaves
    /// it alone, so that copies of it never find it busy).
    pub async fn seal(&self, name: &str) -> Result<(), BenchError> {
        sqlx::query(&format!(
            "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"
        ))
        .execute(&self.admin)
        .await?;
        Ok(())
    }

    /// Drops a database if it exists.
    pub async fn drop_db(&self, name: &str) -> Result<(), BenchError> {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&self.admin)
            .await?;
        Ok(())
    }

    /// CPU seconds used so far by the whole PostgreSQL cluster.
    pub fn postgres_cpu(&self) -> f64 {
        self.postmaster
            .map_or(0.0, |pid| system::cluster_cpu_seconds(pid, self.ticks))
    }

    /// CPU seconds used so far by this process (the receiver, and whatever the scenario runs here).
    pub fn own_cpu(&self) -> f64 {
        system::cpu_seconds(std::process::id(), self.ticks)
    }

    /// Stops the cluster and removes it.
    pub async fn stop(self) {
        self.admin.close().await;
        let mut cluster = self.cluster;
        let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
    }
}

/// A Patient of about 1 KiB of JSON; `n` makes it distinct.
pub fn patient(n: u64) -> Value {
    let mut patient = json!({
        "resourceType": "Patient",
        "active": true,
        "identifier": [
            {"system": "https://example.org/fhir/mrn", "value": format!("MRN-{n:010}")},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": format!("999-{:02}-{:04}", n % 100, n % 10_000)}
        ],
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
                 {"use": "usual", "given": ["Jim"]}],
        "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1},
                    {"system": "email", "value": "peter.chalmers@example.org", "use": "home"}],
        "gender": "male",
        "birthDate": "1974-12-25",
        "address": [{"use": "home", "type": "both", "line": ["534 Erewhon St"], "city": "PleasantVille",
                     "district": "Rainbow", "state": "Vic", "postalCode": "3999",
                     "period": {"start": "1974-12-25"}}],
        "text": {"status": "generated", "div": ""}
    });
    let size = patient.to_string().len();
    let filler = "Peter James Chalmers, born 25 December 1974. ".repeat(30);
    let pad = 1024usize.saturating_sub(size + 48);
    patient["text"]["div"] = json!(format!(
        "<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>",
        &filler[..pad.min(filler.len())]
    ));
    patient
}

/// An active rest-hook Subscription on every Patient change, signed with [`SECRET`], AuditEvents to
/// the default destination (stored resources).
pub fn subscription(endpoint: &str) -> Value {
    subscription_with_criteria(endpoint, "Patient")
}

/// [`subscription`] with another criteria.
pub fn subscription_with_criteria(endpoint: &str, criteria: &str) -> Value {
    json!({
        "resourceType": "Subscription", "status": "active", "reason": "bench", "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json"},
        "extension": [{"url": SECRET_URL, "valueString": SECRET}]
    })
}

/// Creates a project and `subscriptions` subscriptions to the receiver; returns the project.
pub async fn project_with_subscriptions(
    pool: &PgPool,
    endpoint: &str,
    subscriptions: usize,
) -> Result<Uuid, BenchError> {
    project_with_criteria(pool, endpoint, subscriptions, "Patient").await
}

/// [`project_with_subscriptions`] with another criteria.
pub async fn project_with_criteria(
    pool: &PgPool,
    endpoint: &str,
    subscriptions: usize,
    criteria: &str,
) -> Result<Uuid, BenchError> {
    let project = fhir_outbox::project::create_project(pool, "bench").await?;
    for _ in 0..subscriptions {
        capture::create(
            pool,
            project,
            &subscription_with_criteria(endpoint, criteria),
            &WriteContext::default(),
        )
        .await?;
    }
    // The Subscription writes are changes too: dispatch them now, so that what is measured next is
    // only the Patient changes.
    dispatch_all(pool).await?;
    Ok(project)
}

/// Creates a project with one subscription per endpoint (in that order); returns the project and
/// the subscriptions' ids, in the same order.
pub async fn project_with_endpoints(
    pool: &PgPool,
    endpoints: &[String],
) -> Result<(Uuid, Vec<String>), BenchError> {
    let project = fhir_outbox::project::create_project(pool, "bench").await?;
    let mut ids = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let written = capture::create(
            pool,
            project,
            &subscription(endpoint),
            &WriteContext::default(),
        )
        .await?;
        ids.push(resource_id(&written.resource));
    }
    // As in `project_with_subscriptions`: only the Patient changes are measured.
    dispatch_all(pool).await?;
    Ok((project, ids))
}

/// The `id` of a stored resource.
pub fn resource_id(resource: &Value) -> String {
    resource["id"].as_str().unwrap_or_default().to_owned()
}

/// Writes Patients `first..first + rate * seconds` at a steady rate, each in its own transaction and
/// its own task (so a slow commit never delays the next write); returns when each one's COMMIT
/// returned, by resource id, and the seconds the writing took.
pub async fn steady_writes(
    pool: &PgPool,
    project: Uuid,
    rate: u64,
    seconds: u64,
    first: u64,
) -> Result<(HashMap<String, Instant>, f64), BenchError> {
    let commits: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    let started = Instant::now();
    let mut writes = tokio::task::JoinSet::new();
    for n in first..first + rate * seconds {
        ticker.tick().await;
        let (pool, commits) = (pool.clone(), commits.clone());
        writes.spawn(async move {
            let written =
                capture::create(&pool, project, &patient(n), &WriteContext::default()).await?;
            let committed = Instant::now();
            let id = resource_id(&written.resource);
            commits.lock().expect("commit lock").insert(id, committed);
            Ok::<_, BenchError>(())
        });
    }
    while let Some(result) = writes.join_next().await {
        result.map_err(|error| BenchError::Other(format!("write task: {error}")))??;
    }
    let secs = started.elapsed().as_secs_f64();
    let commits = std::mem::take(&mut *commits.lock().expect("commit lock"));
    Ok((commits, secs))
}

/// Writes `count` Patients (real creates through the store, so real outbox rows), 100 per
/// transaction from `writers` concurrent connections.
pub async fn prefill(
    pool: &PgPool,
    project: Uuid,
    count: u64,
    writers: u64,
) -> Result<Duration, BenchError> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut n = writer;
            while n < count {
                let mut tx = pool.begin().await?;
                for _ in 0..100 {
                    if n >= count {
                        break;
                    }
                    capture::create(&mut *tx, project, &patient(n), &WriteContext::default())
                        .await?;
                    n += writers;
                }
                tx.commit().await?;
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|error| BenchError::Other(format!("prefill task: {error}")))??;
    }
    Ok(start.elapsed())
}

/// Dispatches until no outbox row is left; returns (changes, deliveries, time).
pub async fn dispatch_all(pool: &PgPool) -> Result<(u64, u64, Duration), BenchError> {
    let dispatcher = Dispatcher::new(
        pool.clone(),
        DispatchConfig {
            allow_unsafe_outbound: true,
            ..DispatchConfig::default()
        },
    );
    let start = Instant::now();
    let (mut changes, mut deliveries) = (0u64, 0u64);
    loop {
        let report = dispatcher.dispatch_once().await?;
        if report.changes == 0 {
            break;
        }
        changes += report.changes as u64;
        deliveries += report.deliveries;
    }
    Ok((changes, deliveries, start.elapsed()))
}

/// `fhir-outbox run` as a child process, so that its memory and CPU are its own. The bench is part of
/// the `fhir-outbox` binary, so the worker it measures is this very executable
/// (`std::env::current_exe()`) with the `run` subcommand: the same build, the same code as in
/// production, and no dependency of the library on its command line.
pub struct WorkerProcess {
    child: tokio::process::Child,
    /// Its PID.
    pub pid: u32,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts `fhir-outbox run` on `url` with `concurrency` requests in flight. Its log (the
    /// default filter, or `FHIR_OUTBOX_LOG`) goes to a file in the scratch directory.
    pub async fn start(
        env: &Env,
        url: &str,
        concurrency: usize,
    ) -> Result<WorkerProcess, BenchError> {
        WorkerProcess::start_with(env, url, concurrency, &[]).await
    }

    /// [`WorkerProcess::start`] with more options of `run` (`["--shutdown-grace-seconds", "1"]`).
    pub async fn start_with(
        env: &Env,
        url: &str,
        concurrency: usize,
        extra: &[&str],
    ) -> Result<WorkerProcess, BenchError> {
        let exe = std::env::current_exe()?;
        let log = env
            .scratch
            .path()
            .join(format!("worker-{concurrency}-{}.log", Uuid::new_v4()));
        let file = std::fs::File::create(&log)?;
        // The admin endpoint runs as in production (its gauge refresher queries the database), on
        // a free port, so that a bench never collides with another `fhir-outbox run` on the host.
        let child = tokio::process::Command::new(exe)
            .args([
                "--allow-unsafe-outbound",
                "run",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .arg("--delivery-concurrency")
            .arg(concurrency.to_string())
            .args(extra)
            .env("DATABASE_URL", url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Other("the worker exited at once".into()))?;
        Ok(WorkerProcess { child, pid, log })
    }

    /// Fails if the worker has exited (with the end of its log).
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(BenchError::Other(format!(
                "the worker exited ({status}):\n{tail}"
            )));
        }
        Ok(())
    }

    /// The worker's warnings and errors so far (its log's WARN and ERROR lines, without their
    /// time stamps), each with how many times it was logged: a diagnosis for the report.
    pub fn warnings(&self) -> Vec<(String, usize)> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut counted: Vec<(String, usize)> = Vec::new();
        for line in log.lines() {
            let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
                continue;
            };
            let message = line[at + 1..].to_owned();
            if let Some((_, times)) = counted.iter_mut().find(|(seen, _)| *seen == message) {
                *times += 1;
            } else if counted.len() < 50 {
                counted.push((message, 1));
            }
        }
        counted
    }

    /// Peak RSS so far, MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        system::peak_rss_mib(self.pid)
    }

    /// CPU seconds so far.
    pub fn cpu(&self, ticks: f64) -> f64 {
        system::cpu_seconds(self.pid, ticks)
    }

    /// SIGTERM (graceful shutdown), then SIGKILL after 15 s.
    pub async fn stop(mut self) {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Bytes of a table over all its partitions, with indexes and TOAST.
pub async fn table_bytes(pool: &PgPool, table: &str) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::int8
         FROM pg_partition_tree($1::regclass)",
    )
    .bind(table)
    .fetch_one(pool)
    .await?)
}
