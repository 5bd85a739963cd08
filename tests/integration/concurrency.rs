//! Concurrent writers: every committed version is captured exactly once, and If-Match keeps a linear
//! history.

use crate::common::{TestDb, outbox_count};
use fhir_outbox::capture::{self, StoreError, WriteContext, WriteOutcome};
use serde_json::json;
use std::collections::HashMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_if_match_writers_keep_a_linear_history() {
    let db = TestDb::with_pool_size(10).await;
    let project = db.project().await;
    let ctx = WriteContext::default();
    capture::update(
        &db.pool,
        project,
        "Patient",
        "shared",
        &json!({ "resourceType": "Patient", "id": "shared" }),
        None,
        &ctx,
    )
    .await
    .unwrap();

    const WRITERS: usize = 10;
    const WRITES_EACH: usize = 20;
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            let (mut committed, mut conflicts) = (0, 0);
            while committed < WRITES_EACH {
                let current = capture::read(&pool, project, "Patient", "shared")
                    .await
                    .unwrap();
                let version: i64 = current["meta"]["versionId"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let next = json!({
                    "resourceType": "Patient", "id": "shared",
                    "name": [{ "family": format!("writer {writer} write {committed}") }]
                });
                match capture::update(
                    &pool,
                    project,
                    "Patient",
                    "shared",
                    &next,
                    Some(version),
                    &WriteContext::default(),
                )
                .await
                {
                    Ok(written) => {
                        assert_eq!(written.version_id, version + 1);
                        committed += 1;
                    }
                    Err(StoreError::VersionConflict {
                        current_version, ..
                    }) => {
                        assert!(current_version.unwrap() > version);
                        conflicts += 1;
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.unwrap();
    }
    println!("{conflicts} If-Match conflicts among {WRITERS} writers");

    let total = (WRITERS * WRITES_EACH) as i64 + 1;
    let history = capture::history(&db.pool, project, "Patient", "shared")
        .await
        .unwrap();
    let versions: Vec<i64> = history.iter().rev().map(|h| h.version_id).collect();
    assert_eq!(
        versions,
        (1..=total).collect::<Vec<_>>(),
        "a linear history"
    );
    let changes = capture::changes_since(&db.pool, project, 0, 10_000)
        .await
        .unwrap();
    assert_eq!(
        changes.len() as i64,
        total,
        "one outbox row per committed version"
    );
    let mut chained: Vec<_> = changes
        .iter()
        .map(|c| (c.version_id, c.previous_version_id))
        .collect();
    chained.sort();
    for (index, (version, previous)) in chained.iter().enumerate() {
        assert_eq!(*version, index as i64 + 1);
        assert_eq!(*previous, (index > 0).then_some(index as i64));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_writers_times_two_hundred_writes_capture_every_committed_version() {
    const WRITERS: usize = 50;
    const WRITES_EACH: usize = 200;
    const SHARED_IDS: usize = 10;
    let db = TestDb::with_pool_size(WRITERS as u32).await;
    let project = db.project().await;

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            let ctx = WriteContext::default();
            let mut changed = 0usize;
            for write in 0..WRITES_EACH {
                let family = format!("writer {writer} write {write}");
                // A mix of creates, contended PUTs on shared ids, and deletes of shared ids.
                let result = match write % 4 {
                    0 => capture::create(&pool, project, &json!({ "resourceType": "Patient", "name": [{ "family": family }] }), &ctx)
                        .await
                        .map(|w| w.outcome != WriteOutcome::Unchanged),
                    3 => capture::delete(&pool, project, "Patient", &format!("shared-{}", write % SHARED_IDS), &ctx)
                        .await
                        .map(|d| d.outcome == capture::DeleteOutcome::Deleted)
                        .or_else(|e| match e {
                            StoreError::NotFound(_) => Ok(false),
                            other => Err(other),
                        }),
                    _ => {
                        let id = format!("shared-{}", (writer + write) % SHARED_IDS);
                        capture::update(&pool, project, "Patient", &id, &json!({ "resourceType": "Patient", "id": id, "name": [{ "family": family }] }), None, &ctx)
                            .await
                            .map(|w| w.outcome != WriteOutcome::Unchanged)
                    }
                };
                if result.expect("write") {
                    changed += 1;
                }
            }
            changed
        }));
    }
    let mut changed = 0;
    for task in tasks {
        changed += task.await.unwrap();
    }

    let versions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_outbox.resource_version WHERE project_id = $1",
    )
    .bind(project)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let outbox = outbox_count(&db.pool, project).await;
    println!(
        "{} writes, {changed} changes, {versions} versions, {outbox} outbox rows",
        WRITERS * WRITES_EACH
    );
    assert_eq!(versions, changed as i64);
    assert_eq!(
        outbox, versions,
        "exactly one outbox row per committed version"
    );

    // Every version has its own outbox row, and each resource's history has no gap.
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT v.id, v.version_id, count(o.seq)
         FROM fhir_outbox.resource_version v
         LEFT JOIN fhir_outbox.outbox o ON o.project_id = v.project_id AND o.resource_type = v.resource_type
              AND o.resource_id = v.id AND o.version_id = v.version_id
         WHERE v.project_id = $1 GROUP BY v.id, v.version_id",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut per_resource: HashMap<String, Vec<i64>> = HashMap::new();
    for (id, version, captured) in rows {
        assert_eq!(
            captured, 1,
            "{id} version {version} captured {captured} times"
        );
        per_resource.entry(id).or_default().push(version);
    }
    for (id, mut versions) in per_resource {
        versions.sort();
        assert_eq!(
            versions,
            (1..=versions.len() as i64).collect::<Vec<_>>(),
            "{id}"
        );
    }
}

/// Creates Patient `p1` in `project` through `write`: `create`, `create_many` or `update` (update
/// as create), the three ways a `resource` row is inserted.
async fn write_patient(
    conn: &mut sqlx::PgConnection,
    write: &str,
    project: uuid::Uuid,
) -> Result<(), StoreError> {
    let ctx = WriteContext::default();
    let patient = json!({ "resourceType": "Patient", "id": "p1" });
    match write {
        "create" => capture::create(conn, project, &patient, &ctx)
            .await
            .map(drop),
        "create_many" => capture::create_many(conn, project, &[patient], &ctx)
            .await
            .map(drop),
        _ => capture::update(conn, project, "Patient", "p1", &patient, None, &ctx)
            .await
            .map(drop),
    }
}

/// Waits until the backend `pid` waits for a lock (a row lock held by another transaction).
async fn wait_until_blocked(pool: &sqlx::PgPool, pid: i32) {
    for _ in 0..500 {
        let waiting: bool = sqlx::query_scalar(
            "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE pid = $1",
        )
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("backend {pid} never waited for a lock");
}

/// The guarantee the foreign key from `resource` to `project` gave, now kept by a lock per writing
/// transaction and a trigger on `project`: no resource ever belongs to a missing project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_cannot_be_removed_while_it_has_resources_even_by_a_racing_transaction() {
    let db = TestDb::with_pool_size(6).await;
    let ctx = WriteContext::default();
    let error_of = |result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>| {
        result.unwrap_err().to_string()
    };

    // Settled: refused with the reason, in every way a row of `project` can go.
    let used = db.project().await;
    capture::create(&db.pool, used, &json!({ "resourceType": "Patient" }), &ctx)
        .await
        .unwrap();
    let delete = "DELETE FROM fhir_outbox.project WHERE id = $1";
    let error = error_of(sqlx::query(delete).bind(used).execute(&db.pool).await);
    assert!(
        error.contains(&format!("project {used} still has resources")),
        "{error}"
    );
    let error = error_of(
        sqlx::query("UPDATE fhir_outbox.project SET id = gen_random_uuid() WHERE id = $1")
            .bind(used)
            .execute(&db.pool)
            .await,
    );
    assert!(error.contains("still has resources"), "{error}");
    let error = error_of(
        sqlx::query("TRUNCATE fhir_outbox.project CASCADE")
            .execute(&db.pool)
            .await,
    );
    assert!(
        error.contains("resources still belong to projects"),
        "{error}"
    );
    let mut repeatable = db.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *repeatable)
        .await
        .unwrap();
    let empty = db.project().await;
    let error = error_of(
        sqlx::query(delete)
            .bind(empty)
            .execute(&mut *repeatable)
            .await,
    );
    assert!(
        error.contains("only in a READ COMMITTED transaction (this one is REPEATABLE READ)"),
        "{error}"
    );
    drop(repeatable);
    // A project without resources can go (as with the key).
    sqlx::query(delete)
        .bind(empty)
        .execute(&db.pool)
        .await
        .unwrap();

    // A delete racing an uncommitted create waits for it, then sees its resource.
    for write in ["create", "create_many", "update"] {
        let project = db.project().await;
        let mut writer = db.pool.begin().await.unwrap();
        write_patient(&mut writer, write, project).await.unwrap();
        let mut deleter = db.pool.acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *deleter)
            .await
            .unwrap();
        let deleting = tokio::spawn(async move {
            sqlx::query(delete)
                .bind(project)
                .execute(&mut *deleter)
                .await
                .map_err(|e| e.to_string())
        });
        wait_until_blocked(&db.pool, pid).await;
        writer.commit().await.unwrap();
        let error = deleting.await.unwrap().unwrap_err();
        assert!(error.contains("still has resources"), "{write}: {error}");
    }

    // A write racing an uncommitted delete waits for it, then finds no project.
    for write in ["create", "create_many", "update"] {
        let project = db.project().await;
        let mut deleter = db.pool.begin().await.unwrap();
        sqlx::query(delete)
            .bind(project)
            .execute(&mut *deleter)
            .await
            .unwrap();
        let mut writer = db.pool.acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *writer)
            .await
            .unwrap();
        let writing = tokio::spawn(async move { write_patient(&mut writer, write, project).await });
        wait_until_blocked(&db.pool, pid).await;
        deleter.commit().await.unwrap();
        let error = writing.await.unwrap().unwrap_err();
        assert!(
            matches!(&error, StoreError::UnknownProject(message) if message.contains(&project.to_string())),
            "{write}: {error:?}"
        );
    }
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fhir_outbox.resource r
         WHERE NOT EXISTS (SELECT FROM fhir_outbox.project p WHERE p.id = r.project_id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0);
}
