//! Wake-ups (migration 7): writers notify `fhir_outbox_change` at commit only when they take the
//! request of a dispatch loop registered in `fhir_outbox.dispatcher_waiting` (its row's `waiting`);
//! dispatchers register when idle, withdraw when woken, remove their row when stopped, and remove
//! what dead dispatchers left behind.
//!
//! The dispatchers here poll every 60 s, so a change dispatched within the generous bounds below was
//! dispatched on a notification (or on a look the dispatcher made anyway), never by polling.

use crate::common::TestDb;
use fhir_outbox::capture::{self, WriteContext};
use fhir_outbox::dispatch::{DispatchConfig, Dispatcher};
use serde_json::{Value, json};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PROMPTLY: Duration = Duration::from_secs(10);

fn patient() -> Value {
    json!({ "resourceType": "Patient" })
}

/// A running dispatcher (`Dispatcher::run`, as `fhir-outbox run` runs it).
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    fn start(pool: &PgPool, workers: usize, poll_interval: Duration) -> Running {
        Running::start_with(
            pool,
            DispatchConfig {
                workers,
                poll_interval,
                ..DispatchConfig::default()
            },
        )
    }

    fn start_with(pool: &PgPool, config: DispatchConfig) -> Running {
        let dispatcher = Arc::new(Dispatcher::new(pool.clone(), config));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(dispatcher.run(shutdown.clone()));
        Running { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

async fn waiting(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.dispatcher_waiting WHERE waiting")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn undispatched(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.outbox WHERE dispatched_at IS NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Polls `condition` every 20 ms for at most `limit`; whether it became true.
async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits until `loops` dispatch loops are registered and (very likely) past their second look.
async fn until_idle(pool: &PgPool, loops: i64) {
    assert!(
        eventually(PROMPTLY, || async { waiting(pool).await == loops }).await,
        "{loops} dispatch loop(s) registered as waiting"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn backend_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// The backend that sent the next notification on `listener`. Notifications arrive in commit
/// order, so the next one tells which write notified.
async fn next_notifier(listener: &mut PgListener) -> u32 {
    tokio::time::timeout(PROMPTLY, listener.recv())
        .await
        .expect("a notification")
        .unwrap()
        .process_id()
}

/// Asserts that the next notification came from `writer` and that the write took every waiting
/// row: `what` names the write.
async fn assert_woken_by(listener: &mut PgListener, pool: &PgPool, writer: u32, what: &str) {
    assert_eq!(
        next_notifier(listener).await,
        writer,
        "{what} notified, and no write before it"
    );
    assert_eq!(waiting(pool).await, 0, "{what} took the waiting row");
}

/// Registers a waiting dispatch loop by hand (as `Dispatcher` does), listening on `backend_pid`.
async fn register(pool: &PgPool, listener: Uuid, backend_pid: i32) {
    sqlx::query(
        "INSERT INTO fhir_outbox.dispatcher_waiting (listener, backend_pid) VALUES ($1, $2)",
    )
    .bind(listener)
    .bind(backend_pid)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_write_notifies_only_when_it_takes_a_waiting_row() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("fhir_outbox_change").await.unwrap();
    let mut quiet = PgConnection::connect(&db.url).await.unwrap();
    let mut woken = PgConnection::connect(&db.url).await.unwrap();
    let woken_pid = backend_pid(&mut woken).await as u32;

    for round in 0..2 {
        // Nobody waits (in the second round: the waiting row was taken by the first wake-up).
        capture::create(&mut quiet, project, &patient(), &WriteContext::default())
            .await
            .unwrap();
        // Somebody waits: a 3-row transaction notifies (PostgreSQL folds its notifications into
        // one) and takes the row.
        register(&db.pool, Uuid::new_v4(), 0).await;
        let mut tx = woken.begin().await.unwrap();
        for _ in 0..3 {
            capture::create(&mut *tx, project, &patient(), &WriteContext::default())
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let what = format!("round {round}: the write made while a dispatcher waited");
        assert_woken_by(&mut listener, &db.pool, woken_pid, &what).await;
    }
}

/// The commit-time check is queued once per transaction (the trigger's WHEN marks the transaction
/// at its first outbox row, since constraint triggers are row triggers). A first write rolled back
/// to a savepoint takes its queued call and the mark with it, and the next write's call still wakes
/// the waiting dispatcher; a batch wakes it too.
#[tokio::test]
async fn a_write_after_a_rolled_back_savepoint_still_wakes_a_waiting_dispatcher() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("fhir_outbox_change").await.unwrap();
    let mut writer = PgConnection::connect(&db.url).await.unwrap();
    let writer_pid = backend_pid(&mut writer).await as u32;

    register(&db.pool, Uuid::new_v4(), 0).await;
    let mut tx = writer.begin().await.unwrap();
    let mut savepoint = tx.begin().await.unwrap();
    capture::create(
        &mut *savepoint,
        project,
        &patient(),
        &WriteContext::default(),
    )
    .await
    .unwrap();
    savepoint.rollback().await.unwrap();
    capture::create(&mut *tx, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let what = "the write after the rolled-back savepoint";
    assert_woken_by(&mut listener, &db.pool, writer_pid, what).await;

    // A batch of 50 in one statement (one queued call) takes the waiting row.
    register(&db.pool, Uuid::new_v4(), 0).await;
    let batch: Vec<Value> = (0..50).map(|_| patient()).collect();
    let written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.create_resources($1, $2)")
            .bind(project)
            .bind(&batch)
            .fetch_one(&mut writer)
            .await
            .unwrap();
    assert_eq!(written, 50);
    assert_woken_by(&mut listener, &db.pool, writer_pid, "the batch").await;
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        outbox, 51,
        "one outbox row per committed write, none for the rolled-back one"
    );
}

/// A transaction that writes many outbox rows runs the commit-time check once, not once per row
/// (it used to run it per row and return at once from all but the first: a tenth of a bulk write).
/// `SET CONSTRAINTS … IMMEDIATE` runs the queued calls at the end of each statement, so the
/// transaction's own function statistics count them before it commits.
#[tokio::test]
async fn a_transaction_queues_one_commit_time_check_whatever_it_writes() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut writer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = writer.begin().await.unwrap();
    for setting in [
        "SET LOCAL track_functions = 'pl'",
        "SET CONSTRAINTS fhir_outbox.outbox_wake_waiting_dispatchers IMMEDIATE",
    ] {
        sqlx::query(setting).execute(&mut *tx).await.unwrap();
    }
    let batch: Vec<Value> = (0..200).map(|_| patient()).collect();
    for _ in 0..2 {
        let written: i64 =
            sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.create_resources($1, $2)")
                .bind(project)
                .bind(&batch)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(written, 200);
    }
    capture::create(&mut *tx, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    let calls: Option<i64> = sqlx::query_scalar(
        "SELECT pg_stat_get_xact_function_calls('fhir_outbox.wake_waiting_dispatchers'::regproc)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        calls,
        Some(1),
        "401 outbox rows in three statements, one commit-time check"
    );
}

#[tokio::test]
async fn writers_commit_at_every_isolation_level_whatever_became_of_the_waiting_row() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut writer = PgConnection::connect(&db.url).await.unwrap();
    for level in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        let request = Uuid::new_v4();
        register(&db.pool, request, 0).await;
        let mut tx = writer.begin().await.unwrap();
        sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        // The transaction's snapshot sees the request…
        let seen: i64 =
            sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.dispatcher_waiting WHERE waiting")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(seen, 1);
        capture::create(&mut *tx, project, &patient(), &WriteContext::default())
            .await
            .unwrap();
        // …which is answered elsewhere before the commit: locking it then would be a serialisation
        // failure under REPEATABLE READ and SERIALIZABLE.
        sqlx::query(
            "UPDATE fhir_outbox.dispatcher_waiting SET waiting = false WHERE listener = $1",
        )
        .bind(request)
        .execute(&db.pool)
        .await
        .unwrap();
        tx.commit()
            .await
            .unwrap_or_else(|error| panic!("{level}: the write commits: {error}"));
    }
    assert_eq!(crate::common::outbox_count(&db.pool, project).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_dispatcher_is_woken_by_a_single_write_and_withdraws_on_shutdown() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let running = Running::start(&db.pool, 1, Duration::from_secs(60));
    until_idle(&db.pool, 1).await;

    capture::create(&db.pool, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    assert!(
        eventually(PROMPTLY, || async { undispatched(&db.pool).await == 0 }).await,
        "the write was dispatched on its notification, long before the 60 s poll"
    );
    // Having drained it, the loop waits again.
    until_idle(&db.pool, 1).await;

    running.stop().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM fhir_outbox.dispatcher_waiting")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a stopped loop leaves no row behind");
}

/// Every commit that writes outbox rows reads `dispatcher_waiting`, so it must stay one page
/// however many wake-ups there were: a loop keeps its row and flips its flag (HOT updates, pruned
/// as the page fills) instead of inserting a row per sleep that the waking writer deletes, which
/// grew the table until autovacuum came by (9 pages for one live row after 20 s of 12 writers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_ups_leave_the_table_that_every_commit_reads_at_one_page() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let running = Running::start(&db.pool, 1, Duration::from_secs(60));
    until_idle(&db.pool, 1).await;
    let mut notifications = PgListener::connect(&db.url).await.unwrap();
    notifications.listen("fhir_outbox_change").await.unwrap();
    let cycles = 1_000;
    for cycle in 0..cycles {
        capture::create(&db.pool, project, &patient(), &WriteContext::default())
            .await
            .unwrap();
        // The write took the request and notified; the loop drains and asks again.
        tokio::time::timeout(PROMPTLY, notifications.recv())
            .await
            .unwrap_or_else(|_| panic!("cycle {cycle}: the write notified"))
            .unwrap();
        let deadline = Instant::now() + PROMPTLY;
        while waiting(&db.pool).await != 1 {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the loop waits again"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (pages, rows): (i64, i64) = sqlx::query_as(
        "SELECT pg_relation_size('fhir_outbox.dispatcher_waiting') / 8192,
                (SELECT count(*) FROM fhir_outbox.dispatcher_waiting)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, 1, "one row for the one loop");
    assert_eq!(
        pages, 1,
        "{cycles} wake-ups left the table at {pages} pages"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_while_the_dispatcher_registers_notifies_at_commit() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // The change is written before the dispatcher starts, and committed only once it waits: the
    // decision to notify must be taken at COMMIT, not when the row was inserted.
    let mut writer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = writer.begin().await.unwrap();
    capture::create(&mut *tx, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    let running = Running::start(&db.pool, 1, Duration::from_secs(60));
    until_idle(&db.pool, 1).await;
    assert_eq!(
        undispatched(&db.pool).await,
        0,
        "the open write is not visible yet"
    );
    tx.commit().await.unwrap();

    assert!(
        eventually(PROMPTLY, || async { undispatched(&db.pool).await == 0 }).await
            && sqlx::query_scalar::<_, i64>("SELECT count(*) FROM fhir_outbox.outbox")
                .fetch_one(&db.pool)
                .await
                .unwrap()
                == 1,
        "the write was dispatched on the notification of its commit"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writes_while_dispatchers_are_busy_are_dispatched_exactly_once() {
    let db = TestDb::with_pool_size(12).await;
    let project = db.project().await;
    capture::create(
        &db.pool,
        project,
        &json!({
            "resourceType": "Subscription", "status": "active", "reason": "test", "criteria": "Patient",
            "channel": { "type": "rest-hook", "endpoint": "https://example.org/hook" }
        }),
        &WriteContext::default(),
    )
    .await
    .unwrap();
    // Two loops; the usual 1 s poll, because exactly-once is the point here, not promptness (a write
    // that falls in the race window of the wake-up is found by the poll).
    let running = Running::start(&db.pool, 2, Duration::from_secs(1));
    until_idle(&db.pool, 2).await;

    let (writers, each) = (4, 150);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let pool = db.pool.clone();
        tasks.spawn(async move {
            for n in 0..each {
                if n % 10 == 0 {
                    // Some transactions with several changes.
                    let mut tx = pool.begin().await.unwrap();
                    for _ in 0..5 {
                        capture::create(&mut *tx, project, &patient(), &WriteContext::default())
                            .await
                            .unwrap();
                    }
                    tx.commit().await.unwrap();
                } else {
                    capture::create(&pool, project, &patient(), &WriteContext::default())
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    let patients = writers * (each / 10 * 5 + each - each / 10);
    assert!(
        eventually(Duration::from_secs(30), || async {
            undispatched(&db.pool).await == 0
        })
        .await,
        "everything was dispatched"
    );
    let (deliveries, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT outbox_seq) FROM fhir_outbox.delivery WHERE resource_type = 'Patient'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(deliveries, patients as i64, "one delivery per change");
    assert_eq!(distinct, patients as i64, "no change delivered twice");
    until_idle(&db.pool, 2).await;
    running.stop().await;
    assert_eq!(waiting(&db.pool).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_waiting_rows_are_harmless_and_removed() {
    let db = TestDb::new().await;
    let project = db.project().await;
    // A dispatcher that died: its LISTEN backend is gone.
    let mut gone = PgConnection::connect(&db.url).await.unwrap();
    let gone_pid = backend_pid(&mut gone).await;
    gone.close().await.unwrap();
    assert!(
        eventually(PROMPTLY, || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                .bind(gone_pid)
                .fetch_one(&db.pool)
                .await
                .unwrap()
                == 0
        })
        .await
    );

    // Writes go on; the first one takes the stale row (one needless notification).
    register(&db.pool, Uuid::new_v4(), gone_pid).await;
    capture::create(&db.pool, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    assert_eq!(waiting(&db.pool).await, 0);

    // A starting dispatcher removes stale rows, and leaves another live dispatcher's row alone
    // (its backend is this test's connection).
    let mut alive = PgConnection::connect(&db.url).await.unwrap();
    let (stale, live) = (Uuid::new_v4(), Uuid::new_v4());
    register(&db.pool, stale, gone_pid).await;
    register(&db.pool, live, backend_pid(&mut alive).await).await;
    let running = Running::start(&db.pool, 1, Duration::from_secs(60));
    until_idle(&db.pool, 2).await;
    let listeners: Vec<Uuid> =
        sqlx::query_scalar("SELECT listener FROM fhir_outbox.dispatcher_waiting")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(!listeners.contains(&stale), "the stale row was removed");
    assert!(listeners.contains(&live), "a live dispatcher's row is kept");
    assert_eq!(
        undispatched(&db.pool).await,
        0,
        "the first drain found the write"
    );

    // And the wake-up works.
    capture::create(&db.pool, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    assert!(eventually(PROMPTLY, || async { undispatched(&db.pool).await == 0 }).await);
    until_idle(&db.pool, 1).await;
    running.stop().await;
    assert_eq!(waiting(&db.pool).await, 0, "shutdown withdraws the row");
    drop(alive);
}

/// Two-phase commit: PostgreSQL refuses PREPARE TRANSACTION after NOTIFY, so a write being prepared
/// neither notifies nor takes a waiting dispatcher's row (migration 20261201000002); its change,
/// visible from COMMIT PREPARED on, is found at the next wake-up or poll. Both protocols: the
/// simple one (a script) and the extended one (the Rust API, then PREPARE as its own statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_prepared_transactions_are_prepared_committed_and_dispatched() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let running = Running::start(&db.pool, 1, Duration::from_millis(500));
    until_idle(&db.pool, 1).await;

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT fhir_outbox.create_resource('{project}', '{{\"resourceType\": \"Patient\"}}');
         PREPARE TRANSACTION 'fhir-outbox-simple'"
    ))
    .execute(&mut conn)
    .await
    .expect("PREPARE TRANSACTION after a write while a dispatcher waits");
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    capture::create(&mut conn, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    sqlx::query("PREPARE TRANSACTION 'fhir-outbox-extended'")
        .execute(&mut conn)
        .await
        .expect("PREPARE TRANSACTION after a write through the Rust API");
    assert_eq!(
        waiting(&db.pool).await,
        1,
        "a transaction being prepared leaves the waiting row to a writer that can notify"
    );
    assert_eq!(
        undispatched(&db.pool).await,
        0,
        "nothing visible before COMMIT PREPARED"
    );

    for gid in ["fhir-outbox-simple", "fhir-outbox-extended"] {
        sqlx::raw_sql(&format!("COMMIT PREPARED '{gid}'"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    assert!(
        eventually(PROMPTLY, || async { undispatched(&db.pool).await == 0 }).await,
        "both prepared changes dispatched (at the next poll)"
    );
    let dispatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_outbox.outbox WHERE dispatched_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(dispatched, 2);
    running.stop().await;
}

/// A delivery worker is told directly by the dispatcher of its own process; the notification that
/// commit sends for the workers of other processes names it (`LocalWake::sender`), and it must not
/// wake it a second time (one more claim, finding nothing) while waking every other listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_ignores_its_own_notifications_and_wakes_on_the_others() {
    let db = TestDb::new().await;
    let (wake, mut woken) = tokio::sync::watch::channel(0u64);
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(fhir_outbox::db::listen(
        db.pool.clone(),
        "fhir_outbox_delivery",
        wake,
        Some("this-process".to_owned()),
        shutdown.clone(),
    ));
    // It bumps once it listens (what was sent before is lost, so the waiting loop looks).
    tokio::time::timeout(PROMPTLY, woken.changed())
        .await
        .expect("listening")
        .unwrap();
    let notify = |payload: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query("SELECT pg_notify('fhir_outbox_delivery', $1)")
                .bind(payload)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    notify("this-process").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), woken.changed())
            .await
            .is_err(),
        "its own notification woke the listener"
    );
    for other in ["another-process", ""] {
        notify(other).await;
        tokio::time::timeout(PROMPTLY, woken.changed())
            .await
            .unwrap_or_else(|_| panic!("the notification {other:?} did not wake the listener"))
            .unwrap();
    }
    shutdown.cancel();
    listening.await.unwrap();
}

/// A loop that took every waiting change and found more than one waits its linger before it
/// claims again (changes are coming faster than it claims them: the next batch carries more);
/// after a lone change it does not wait, so a change written alone is never held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_lingers_after_a_batch_of_several_and_never_after_a_lone_change() {
    const LINGER: Duration = Duration::from_secs(3);
    let db = TestDb::new().await;
    let project = db.project().await;
    let running = Running::start_with(
        &db.pool,
        DispatchConfig {
            poll_interval: Duration::from_secs(60),
            linger: LINGER,
            ..DispatchConfig::default()
        },
    );
    until_idle(&db.pool, 1).await;

    capture::create(&db.pool, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    assert!(eventually(PROMPTLY, || async { undispatched(&db.pool).await == 0 }).await);
    // Claimed again at once, found nothing and waits for the next write: no linger.
    assert!(
        eventually(LINGER / 2, || async { waiting(&db.pool).await == 1 }).await,
        "after a batch of one change the loop waits for a wake-up at once"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    let three = [patient(), patient(), patient()];
    capture::create_many(&db.pool, project, &three, &WriteContext::default())
        .await
        .unwrap();
    assert!(eventually(PROMPTLY, || async { undispatched(&db.pool).await == 0 }).await);
    // The loop lingers: it neither waits for a wake-up nor claims what comes meanwhile.
    capture::create(&db.pool, project, &patient(), &WriteContext::default())
        .await
        .unwrap();
    tokio::time::sleep(LINGER / 3).await;
    assert_eq!(undispatched(&db.pool).await, 1, "claimed during the linger");
    assert_eq!(waiting(&db.pool).await, 0);
    // Then it claims it without any wake-up (the write saw no waiting loop, so it notified none).
    assert!(eventually(PROMPTLY, || async { undispatched(&db.pool).await == 0 }).await);
    running.stop().await;
}
