//! Storage under a held xmin horizon: the hot table's lanes drain and are truncated, so its dead
//! row versions do not pile up, and nothing is lost or sent twice on the way.

use crate::common::TestDb;
use crate::delivery::{create, fast_config, hook, pipeline};
use crate::receiver::Receiver;
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;

/// (moved, truncated, switched, horizon held)
type Pass = (i64, bool, bool, bool);

/// A `REPEATABLE READ` transaction with its snapshot taken: nothing that dies while it lives can be
/// vacuumed (roll it back to let go).
async fn hold_snapshot(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&mut *holder).await.unwrap();
    holder
}

/// One rotation pass with thresholds low enough for a test: the draining lane's deliveries are
/// moved when at most 5 are left, or when the horizon is held (by the same snapshot over two
/// passes).
async fn rotate(pool: &PgPool) -> Pass {
    sqlx::query_as("SELECT * FROM fhir_outbox.rotate_delivery_lanes(0, 1, 5, 10000, 0)")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Three passes in a row move, truncate and switch nothing (and see no held horizon).
async fn passes_change_nothing(pool: &PgPool) {
    for _ in 0..3 {
        assert_eq!(rotate(pool).await, (0, false, false, false));
    }
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn current_lane(pool: &PgPool) -> i64 {
    scalar(pool, "SELECT current::int8 FROM fhir_outbox.delivery_lane").await
}

/// Rotates until a pass switches lanes (the statistics that tell dead versions arrive within a
/// second or so).
async fn rotate_until_switched(pool: &PgPool) -> Vec<Pass> {
    let mut passes = Vec::new();
    for _ in 0..100 {
        let pass = rotate(pool).await;
        passes.push(pass);
        if pass.2 {
            return passes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the lanes never switched: {passes:?}");
}

/// 50 changes delivered, then 20 more whose deliveries wait in lane 0: their subscription is
/// paused.
async fn deliveries_waiting_in_lane_0(
    pool: &PgPool,
    project: uuid::Uuid,
    receiver: &Receiver,
    p: &crate::delivery::Pipeline,
) {
    let subscription = create(pool, project, &hook(&receiver.url, "Patient"), None).await;
    let patient = json!({ "resourceType": "Patient" });
    for _ in 0..50 {
        create(pool, project, &patient, None).await;
    }
    p.settle(pool).await;
    assert_eq!(current_lane(pool).await, 0);
    sqlx::query(
        "INSERT INTO fhir_outbox.subscription_pause (project_id, subscription_id) VALUES ($1, $2)",
    )
    .bind(project)
    .bind(subscription["id"].as_str().unwrap())
    .execute(pool)
    .await
    .unwrap();
    for _ in 0..20 {
        create(pool, project, &patient, None).await;
    }
    p.settle_dispatch().await;
    assert_eq!(
        scalar(
            pool,
            "SELECT count(*) FROM fhir_outbox.unfinished_delivery_lane0 WHERE state = 'pending'"
        )
        .await,
        20
    );
}

#[tokio::test]
async fn lanes_drain_and_are_truncated_while_a_snapshot_holds_the_horizon() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let p = pipeline(&db.pool, fast_config());
    let patient = json!({ "resourceType": "Patient" });

    // A report that never ends: nothing dead from now on can be vacuumed.
    let holder = hold_snapshot(&db.pool).await;

    // Some deliveries wait in lane 0 when the lanes switch.
    deliveries_waiting_in_lane_0(&db.pool, project, &receiver, &p).await;

    let passes = rotate_until_switched(&db.pool).await;
    assert_eq!(current_lane(&db.pool).await, 1, "{passes:?}");
    // The snapshot is older than the switch: the waiting deliveries move to the current lane
    // (more than the 5 moved without a held horizon), then the drained lane is truncated: its
    // dead versions are gone although the snapshot still holds the horizon.
    assert_eq!(rotate(&db.pool).await, (20, false, false, true));
    let (moved, truncated, _, _) = rotate(&db.pool).await;
    assert_eq!((moved, truncated), (0, true));
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT pg_relation_size('fhir_outbox.unfinished_delivery_lane0')"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM fhir_outbox.unfinished_delivery_lane1 WHERE state = 'pending'"
        )
        .await,
        20
    );

    // Every claim updates the claim cursor; under the held horizon its versions pile up, until a
    // pass empties it and writes its row again.
    sqlx::query(
        "DO $$ BEGIN FOR i IN 1..3000 LOOP
             UPDATE fhir_outbox.claim_cursor SET subscription_id = 'sub-' || i;
         END LOOP; END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let cursor_bytes = "SELECT pg_relation_size('fhir_outbox.claim_cursor')";
    assert!(scalar(&db.pool, cursor_bytes).await > 65536);
    rotate(&db.pool).await;
    assert!(scalar(&db.pool, cursor_bytes).await <= 8192);
    let cursor: String = sqlx::query_scalar("SELECT subscription_id FROM fhir_outbox.claim_cursor")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(cursor, "sub-3000");
    holder.rollback().await.unwrap();

    // Resumed, every change is delivered once.
    sqlx::query("DELETE FROM fhir_outbox.subscription_pause")
        .execute(&db.pool)
        .await
        .unwrap();
    for _ in 0..10 {
        create(&db.pool, project, &patient, None).await;
    }
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 80);
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM fhir_outbox.delivery WHERE state = 'succeeded'"
        )
        .await,
        80
    );
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(DISTINCT webhook_id) FROM fhir_outbox.delivery"
        )
        .await,
        80
    );
}

#[tokio::test]
async fn a_lane_with_deliveries_in_flight_is_not_truncated() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    create(&db.pool, project, &hook(&receiver.url, "Patient"), None).await;
    let p = pipeline(&db.pool, fast_config());
    for _ in 0..30 {
        create(
            &db.pool,
            project,
            &json!({ "resourceType": "Patient" }),
            None,
        )
        .await;
    }
    p.settle(&db.pool).await;
    // One delivery in flight in lane 0, as if its worker were still sending it.
    create(
        &db.pool,
        project,
        &json!({ "resourceType": "Patient" }),
        None,
    )
    .await;
    p.settle_dispatch().await;
    sqlx::query(
        "UPDATE fhir_outbox.unfinished_delivery SET state = 'in_flight', lease_token = gen_random_uuid(),
                lease_expires_at = now() + interval '1 hour'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    rotate_until_switched(&db.pool).await;
    passes_change_nothing(&db.pool).await;
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM fhir_outbox.unfinished_delivery_lane0"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn without_a_held_horizon_a_backlog_in_the_draining_lane_is_left_to_the_claims() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let receiver = Receiver::start(vec![]).await;
    let p = pipeline(&db.pool, fast_config());
    deliveries_waiting_in_lane_0(&db.pool, project, &receiver, &p).await;
    rotate_until_switched(&db.pool).await;
    // 20 wait in lane 0, more than the 5 a pass moves when VACUUM keeps up: they stay, and the
    // lane is not truncated.
    passes_change_nothing(&db.pool).await;
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM fhir_outbox.unfinished_delivery_lane0 WHERE state = 'pending'"
        )
        .await,
        20
    );
    // Resumed, the claims take them (and move each to the current lane as they do).
    sqlx::query("DELETE FROM fhir_outbox.subscription_pause")
        .execute(&db.pool)
        .await
        .unwrap();
    p.settle(&db.pool).await;
    assert_eq!(receiver.received().len(), 70);
    let (moved, truncated, _, _) = rotate(&db.pool).await;
    assert_eq!((moved, truncated), (0, true));
}

/// The statement that `fhir_outbox.claim_deliveries` runs, with `$1`… in place of its parameters'
/// names, and its settings as `SET LOCAL` commands: the test prepares exactly what the function
/// runs, under the settings it runs with, and can show its plan (a function's plan cannot be shown).
async fn claim_statement_and_settings(pool: &sqlx::PgPool) -> (String, String) {
    let (source, names, config): (String, Vec<String>, Vec<String>) = sqlx::query_as(
        "SELECT prosrc, proargnames, proconfig FROM pg_proc
         WHERE oid = 'fhir_outbox.claim_deliveries'::regproc",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let start = source.find("RETURN QUERY ").unwrap() + "RETURN QUERY ".len();
    let end = source.rfind(';').unwrap();
    let mut statement = source[start..end].to_owned();
    // The first six names are the parameters (the rest name the result's columns).
    for (position, name) in names.iter().take(6).enumerate() {
        let name = regex::Regex::new(&format!(r"\b{name}\b")).unwrap();
        statement = name
            .replace_all(&statement, regex::NoExpand(&format!("${}", position + 1)))
            .into_owned();
    }
    let settings = config
        .iter()
        .map(|setting| {
            let (name, value) = setting.split_once('=').unwrap();
            format!("SET LOCAL {name} = {value};")
        })
        .collect();
    (statement, settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claims_plan_made_on_empty_lanes_never_scans_a_filled_lane() {
    let db = TestDb::new().await;
    let (claim, settings) = claim_statement_and_settings(&db.pool).await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "ANALYZE fhir_outbox.unfinished_delivery_lane0; ANALYZE fhir_outbox.unfinished_delivery_lane1",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    // The cached plan is made now, while both lanes are empty (as after a truncation)…
    sqlx::raw_sql(&format!(
        "PREPARE claim(int8, float8, int8, float8, int8, int8) AS {claim};
         BEGIN; {settings} EXPLAIN EXECUTE claim(400, 30, 32, 150, 800, 256); COMMIT;"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    // …and serves a lane that filled up since.
    sqlx::raw_sql(
        "INSERT INTO fhir_outbox.unfinished_delivery
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
              resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at)
         SELECT gen_random_uuid(), 'subscription', g, gen_random_uuid(), 'Patient', 'p' || g, 1,
                'create', now(), 'r', 't', now()
         FROM generate_series(1, 3000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql(&format!("BEGIN; {settings}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN (COSTS OFF) EXECUTE claim(400, 30, 32, 150, 800, 256)")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
    let plan = plan.join("\n");
    assert!(
        !plan.contains("Seq Scan on unfinished_delivery_lane"),
        "the claim's cached plan scans a lane:\n{plan}"
    );
}

/// Explains the recorder's completion statement as the recorder runs it (a transaction begun with
/// `RECORD_BEGIN`), from its cached generic plan.
async fn explain_completion(conn: &mut sqlx::PgConnection) -> String {
    sqlx::raw_sql(&format!(
        "{}; SET LOCAL plan_cache_mode = force_generic_plan",
        fhir_outbox::delivery::RECORD_BEGIN
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN EXECUTE complete('{1}', ARRAY[gen_random_uuid()], '{succeeded}',
                                   '{1}', '{0}', ARRAY[NULL::timestamptz],
                                   ARRAY[NULL::text], '{200}', '{1}', '{1}', ARRAY[now()],
                                   '{5}', '{true}', '{200}', ARRAY[NULL::text],
                                   ARRAY[NULL::text], '{1}', '{e}', ARRAY[now()], ARRAY['{}'],
                                   '{e}')",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
    plan.join("\n")
}

/// A truncated lane looks empty to the planner until autovacuum analyzes it; a completion planned
/// then must still read a lane that filled up since by id, not whole (docs/performance-history.md
/// run O: 10–45 ms per completion batch with a backlog of 100,000 before `RECORD_BEGIN`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_completions_plan_made_on_empty_lanes_never_scans_a_filled_lane() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "ANALYZE fhir_outbox.unfinished_delivery_lane0; ANALYZE fhir_outbox.unfinished_delivery_lane1;
         PREPARE complete(int8[], uuid[], text[], int4[], int4[], timestamptz[], text[], int4[],
                          int8[], int4[], timestamptz[], int4[], bool[], int4[], text[], text[],
                          int8[], text[], timestamptz[], text[], text[])
             AS {}",
        include_str!("../../src/delivery/complete.sql")
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    // The cached plan is made now, while both lanes are empty…
    explain_completion(&mut conn).await;
    // …and serves lanes that filled up since.
    sqlx::raw_sql(
        "INSERT INTO fhir_outbox.unfinished_delivery
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
              resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
              state, lease_token, lease_expires_at, lane)
         SELECT gen_random_uuid(), 'subscription', g, gen_random_uuid(), 'Patient', 'p' || g, 1,
                'create', now(), 'r', 't', now(), 'in_flight', gen_random_uuid(),
                now() + interval '30 seconds', (g % 2)::int2
         FROM generate_series(1, 3000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan = explain_completion(&mut conn).await;
    assert!(
        !plan.contains("Seq Scan on unfinished_delivery_lane"),
        "the completion's cached plan scans a lane:\n{plan}"
    );
    // Disabling sequential scans must not make the plan look costly enough to compile.
    assert!(!plan.contains("JIT"), "the completion is compiled:\n{plan}");
}

/// Ids of pending deliveries in claim order (due time, then id), the first `limit`, sorted by id.
async fn next_due(conn: &mut sqlx::PgConnection, limit: i64) -> Vec<i64> {
    let mut ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.unfinished_delivery WHERE state = 'pending'
         ORDER BY next_attempt_at, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .unwrap();
    ids.sort_unstable();
    ids
}

/// Claims up to `limit` deliveries (every endpoint limit lifted); their ids, sorted.
async fn claim_ids(conn: &mut sqlx::PgConnection, limit: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.claim_deliveries($1, 30, 10000, 30, 32, 10000) ORDER BY id",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .unwrap()
}

/// A claim reads each queue's candidates from the first pending delivery its walk over the queues
/// found (so that the index entries of deliveries claimed moments before, which a live snapshot
/// keeps at the head of the queue, are passed once, not twice). That first delivery must be the
/// least (due time, id) of both lanes: here due times are tied in pairs across the lanes (the
/// smaller id in lane 1, which a merge of the lanes by due time alone may put second), and the
/// first claim ends between the two deliveries of a pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_take_the_queue_in_order_across_lanes_past_deliveries_just_claimed() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO fhir_outbox.unfinished_delivery
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
              resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at,
              next_attempt_at, lane)
         SELECT p, 'subscription', g, p, 'Patient', 'p' || g, 1, 'create', now(), 'r', 't', now(),
                now() - interval '1 hour' + (g / 2) * interval '1 millisecond', ((g + 1) % 2)::int2
         FROM (SELECT gen_random_uuid() AS p) project, generate_series(1, 1200) g;
         ANALYZE fhir_outbox.unfinished_delivery_lane0;
         ANALYZE fhir_outbox.unfinished_delivery_lane1;",
    )
    .execute(&mut *conn)
    .await
    .unwrap();

    // A snapshot older than the claims: what they claim stays in the queue's index.
    let holder = hold_snapshot(&db.pool).await;

    let mut claimed = 0;
    for limit in [399, 400, 400, 1] {
        let due = next_due(&mut conn, limit).await;
        assert_eq!(
            claim_ids(&mut conn, limit).await,
            due,
            "claim of {limit} after {claimed}"
        );
        claimed += due.len();
    }
    assert_eq!(claimed, 1200);
    holder.rollback().await.unwrap();
}

/// A claim looks up the endpoint of each subscription it serves by that subscription's key. Its
/// generic plan once read every stored Subscription through the whole of `resource_pkey` at every
/// claim when resource ids follow the table's order, as ids a client chooses in sequence do
/// (migration 20261217000001): the blocks of `resource_pkey` a claim reads must not grow with the
/// resources stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_the_subscriptions_it_serves_by_key_not_every_subscription() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut conn = db.pool.acquire().await.unwrap();
    // Ids chosen by the client, in order (an update that creates).
    sqlx::query(
        "SELECT count(*) FROM generate_series(1, 8000) g,
             LATERAL fhir_outbox.update_resource($1, 'Patient', 'p' || lpad(g::text, 5, '0'),
                 jsonb_build_object('resourceType', 'Patient', 'id', 'p' || lpad(g::text, 5, '0')))",
    )
    .bind(project)
    .execute(&mut *conn)
    .await
    .unwrap();
    let subscription: String = sqlx::query_scalar(
        r#"SELECT resource ->> 'id' FROM fhir_outbox.create_resource($1,
               '{"resourceType": "Subscription", "status": "active", "reason": "r",
                 "criteria": "Patient", "channel": {"type": "rest-hook",
                 "endpoint": "https://example.org/hook", "payload": "application/fhir+json"}}')"#,
    )
    .bind(project)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO fhir_outbox.unfinished_delivery
             (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
              resource_id, version_id, interaction, changed_at, request_id, trace_id, matched_at)
         VALUES ($1, $2, 1, $1, 'Patient', 'p1', 1, 'create', now(), 'r', 't', now())",
    )
    .bind(project)
    .bind(&subscription)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql("ANALYZE").execute(&mut *conn).await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let (before, _) = blocks_fetched(&mut tx, "fhir_outbox.resource_pkey").await;
    let claimed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM fhir_outbox.claim_deliveries(10, 30, 10000, 30, 32, 10000)",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(claimed.len(), 1);
    let (after, index_size) = blocks_fetched(&mut tx, "fhir_outbox.resource_pkey").await;
    let index_blocks = after - before;
    tx.rollback().await.unwrap();
    // A lookup descends two or three levels; the subscription's endpoint, its content for the
    // worker and the resource's current version are three.
    assert!(
        index_blocks <= 12,
        "a claim of one delivery read {index_blocks} blocks of resource_pkey ({index_size} in all)"
    );
}

/// The claim's walk over the busy subscriptions passes each dead entry of `delivery_queue` once.
/// A draining lane holds the dead entries of subscriptions that only the other lane still serves
/// (here 40 of them, 500 each, as after a backlog), and beyond them the live deliveries of a few
/// subscriptions whose endpoints are slow. Walked over both lanes at once, each step to the next
/// subscription found in either lane began again in the draining lane from that subscription, and
/// read the same dead entries once more (run AH in docs/performance-history.md: 47,000 pages a
/// claim).
#[tokio::test]
async fn a_claim_passes_the_dead_entries_of_a_draining_lane_once() {
    let db = TestDb::new().await;
    let project = db.project().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let deliveries = |lane: i16, prefix: &str, subscriptions: i32, each: i32| {
        sqlx::query(
            "INSERT INTO fhir_outbox.unfinished_delivery
                 (id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                  resource_id, version_id, interaction, changed_at, request_id, trace_id,
                  matched_at, lane, next_attempt_at)
             SELECT nextval('fhir_outbox.delivery_id_seq'), $1, $3 || lpad(s::text, 3, '0'), 1, $1,
                    'Patient', 'p' || g, 1, 'create', now(), 'r', 't', now(), $2,
                    now() - interval '1 hour' + g * interval '1 ms'
             FROM generate_series(1, $4) s, generate_series(1, $5) g",
        )
        .bind(project)
        .bind(lane)
        .bind(prefix.to_owned())
        .bind(subscriptions)
        .bind(each)
    };
    for statement in [
        "ALTER TABLE fhir_outbox.unfinished_delivery_lane0 SET (autovacuum_enabled = false)",
        "UPDATE fhir_outbox.delivery_lane SET current = 1",
    ] {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    deliveries(0, "a", 40, 500)
        .execute(&mut *conn)
        .await
        .unwrap();
    deliveries(0, "z", 10, 50)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM fhir_outbox.unfinished_delivery WHERE subscription_id LIKE 'a%'")
        .execute(&mut *conn)
        .await
        .unwrap();
    deliveries(1, "a", 40, 2).execute(&mut *conn).await.unwrap();
    sqlx::raw_sql("ANALYZE fhir_outbox.unfinished_delivery")
        .execute(&mut *conn)
        .await
        .unwrap();
    let queue_index: String = sqlx::query_scalar(
        "SELECT i.inhrelid::regclass::text FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid
         WHERE i.inhparent = 'fhir_outbox.delivery_queue'::regclass
           AND x.indrelid = 'fhir_outbox.unfinished_delivery_lane0'::regclass",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    drop(conn);

    // The first claim marks the dead entries it meets, as a worker's first claim would; the
    // second is measured. Both are rolled back, so each starts from the first subscription.
    let mut measured = (0_i64, 0_i64);
    for _ in 0..2 {
        let mut tx = db.pool.begin().await.unwrap();
        let (before, _) = blocks_fetched(&mut tx, &queue_index).await;
        let claimed: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM fhir_outbox.claim_deliveries(100, 30, 10000, 30, 100, 10000)",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(claimed.len(), 100, "a full claim");
        let (after, index_size) = blocks_fetched(&mut tx, &queue_index).await;
        measured = (after - before, index_size);
        tx.rollback().await.unwrap();
    }
    let (blocks, index_size) = measured;
    // One pass over the index, and a descent of a few levels for each of the 10 subscriptions
    // served from it and each subscription of the other lane passed on the way.
    assert!(
        blocks <= index_size + 200,
        "a claim read {blocks} blocks of the draining lane's queue index ({index_size} in all)"
    );
}

/// The blocks of `index` fetched so far in this transaction, and the index's size in blocks. The
/// count also holds what the connection read before and has not yet reported: take differences.
async fn blocks_fetched(conn: &mut sqlx::PgConnection, index: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT pg_stat_get_xact_blocks_fetched($1::regclass),
                pg_relation_size($1::regclass) / current_setting('block_size')::int8",
    )
    .bind(index)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// The plan a connection has cached for a prepared statement (`EXPLAIN EXECUTE`).
async fn cached_plan(conn: &mut sqlx::PgConnection) -> String {
    let lines: Vec<String> = sqlx::query_scalar("EXPLAIN (COSTS OFF) EXECUTE mark('{1}')")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    lines.join("\n")
}

/// Writes `count` Patients in batches of 1,000.
async fn write_patients(conn: &mut sqlx::PgConnection, project: uuid::Uuid, count: usize) {
    for start in (0..count).step_by(1000) {
        let batch: Vec<serde_json::Value> = (start..count.min(start + 1000))
            .map(|n| json!({"resourceType": "Patient", "id": format!("p{n}")}))
            .collect();
        sqlx::query("SELECT count(*) FROM fhir_outbox.create_resources($1, $2)")
            .bind(project)
            .bind(&batch)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}

/// A statement prepared while the outbox was nearly empty keeps a plan that reads the whole
/// outbox for every batch of keys (the dispatcher's mark did, run Y in
/// docs/performance-history.md), until the outbox's statistics change. The statistics check
/// analyses the outbox once it has more than doubled since its statistics were taken, whether or
/// not autovacuum has, and the cached plan follows; a second check finds nothing stale. A day of
/// history, grown as much, is left to autovacuum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_planner_statistics_are_refreshed_and_cached_plans_follow() {
    let db = TestDb::new().await;
    // As when autovacuum's workers are busy elsewhere.
    sqlx::query("ALTER TABLE fhir_outbox.outbox SET (autovacuum_enabled = false)")
        .execute(&db.pool)
        .await
        .unwrap();
    let project = db.project().await;
    let mut conn = db.pool.acquire().await.unwrap();
    write_patients(&mut conn, project, 10).await;
    sqlx::raw_sql(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE mark(int8[]) AS
             UPDATE fhir_outbox.outbox o SET dispatched_at = now()
             FROM unnest($1) AS m(seq) WHERE o.seq = m.seq",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan = cached_plan(&mut conn).await;
    assert!(
        plan.contains("Seq Scan on outbox"),
        "planned on 10 rows: {plan}"
    );

    write_patients(&mut conn, project, 20_000).await;
    // A day of history, which the check leaves to autovacuum: the pipeline only appends to it.
    fhir_outbox::operations::retention::ensure_partitions(&db.pool)
        .await
        .unwrap();
    let history_day: String = sqlx::query_scalar(
        "WITH written AS (
             INSERT INTO fhir_outbox.audit_event (project_id, id, recorded_at, content)
             SELECT $1, 'a' || g, now(), json_build_object('pad', repeat('x', 300))
             FROM generate_series(1, 3000) g
             RETURNING tableoid)
         SELECT DISTINCT tableoid::regclass::text FROM written",
    )
    .bind(project)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let plan = cached_plan(&mut conn).await;
    assert!(plan.contains("Seq Scan on outbox"), "still cached: {plan}");

    let analyzed = fhir_outbox::operations::statistics::analyze_stale(&db.pool)
        .await
        .unwrap();
    let outbox = analyzed
        .iter()
        .find(|table| table.table == "outbox")
        .unwrap_or_else(|| panic!("outbox not analysed: {analyzed:?}"));
    assert!(outbox.pages > 2 * outbox.pages_before.max(16), "{outbox:?}");
    let day_pages: i64 = sqlx::query_scalar("SELECT pg_relation_size($1::regclass) / 8192")
        .bind(&history_day)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(day_pages >= 64, "{history_day}: {day_pages} pages");
    assert!(
        !analyzed
            .iter()
            .any(|table| history_day.ends_with(&table.table)),
        "{history_day} analysed: {analyzed:?}"
    );

    let plan = cached_plan(&mut conn).await;
    assert!(
        plan.contains("Index Scan using outbox_pkey on outbox"),
        "replanned: {plan}"
    );
    let again = fhir_outbox::operations::statistics::analyze_stale(&db.pool)
        .await
        .unwrap();
    assert!(
        !again.iter().any(|table| table.table == "outbox"),
        "{again:?}"
    );
}
