//! The SQL of the dispatch stage.

use crate::capture::Interaction;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// An outbox row claimed for dispatch, with the contents it is evaluated on once read
/// ([`read_contents`]).
#[derive(Debug)]
pub(crate) struct ClaimedChange {
    pub seq: i64,
    pub project_id: Uuid,
    pub resource_type: String,
    pub resource_id: String,
    pub version_id: i64,
    pub previous_version_id: Option<i64>,
    pub interaction: Interaction,
    pub changed_at: DateTime<Utc>,
    pub request_id: String,
    pub trace_id: String,
    /// Whether its versions were read: only when some candidate subscription reads them
    /// (`CompiledSubscription::reads_content`) or the change is a Subscription's.
    pub contents_read: bool,
    /// The version's content (`None` for a deletion, when it cannot be decoded, or not read).
    pub current: Option<Value>,
    /// The previous version's content.
    pub previous: Option<Value>,
    /// For a resend restricted to one subscription, that subscription's id.
    pub resend_subscription_id: Option<String>,
    /// Why a content could not be decoded: the change cannot be dispatched.
    pub undecodable: Option<String>,
}

/// A claimed row as read.
struct ClaimRow {
    seq: i64,
    project_id: Uuid,
    resource_type: String,
    resource_id: String,
    version_id: i64,
    previous_version_id: Option<i64>,
    interaction: Interaction,
    changed_at: DateTime<Utc>,
    request_id: String,
    trace_id: String,
    resend_subscription_id: Option<String>,
    project_epoch: Option<i64>,
    project_server_scope: Option<bool>,
    server_scope_ids: Option<Vec<Uuid>>,
    server_scope_epochs: Option<Vec<i64>>,
}

/// The most a dispatch batch reads of the versions it evaluates, as stored (`pg_column_size`: a
/// compressed value counts its compressed size). What a batch holds in memory grows with the sizes
/// of its resources, up to 4 MiB each (`fhir_outbox.max_resource_bytes`) and two versions per
/// update: without a bound, a batch of large resources (documents, attachments) would hold
/// gigabytes. With it, large resources make small batches.
pub(crate) const BATCH_CONTENT_BUDGET_BYTES: i64 = 16 * 1024 * 1024;

/// How a dispatch transaction begins, in one round trip: it commits without waiting for its WAL to
/// reach disk (about 1 ms of every change's latency on this machine, docs/performance-history.md
/// run N). Losing a dispatch in a crash of PostgreSQL loses nothing that cannot be made again: its
/// changes are undispatched again and dispatched again, with the same `webhook-id`s
/// (`dispatch::webhook_id`), and a completion, which commits durably, flushes the dispatch of its
/// delivery before it.
///
/// Its statements keep their generic plans. Left to choose, PostgreSQL planned
/// [`record_dispatch`] again at every call, since a plan made for the call's array lengths always
/// looks cheaper than one for unknown lengths: 0.68 ms of planning per batch, more than the
/// statement's execution, in every change's latency at low rates (docs/performance-history.md, run
/// AD). Each of them reads or writes rows by key, so one plan suits a batch of any size, provided
/// it uses the keys: a plan kept from a nearly empty outbox would otherwise mark each batch's
/// changes by reading the whole outbox until its next analysis (run Y), so sequential scans are
/// off, and JIT with them, as in the recorder's transaction (`delivery::RECORD_BEGIN`): a
/// sequential scan that is the only way (a table without a usable index) counts as disabled, and
/// its cost would have every such statement compiled.
pub(crate) const DISPATCH_BEGIN: &str = "BEGIN; SET LOCAL synchronous_commit = off; \
     SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off; \
     SET LOCAL jit = off";

/// Locks up to `limit` of the oldest undispatched outbox rows from `from_seq` on that no other
/// dispatcher holds (`from_seq` 0 scans them all; see `dispatch::ScanFloor`), and returns them in
/// order, without their contents: the dispatcher reads those ([`read_contents`]) only for the
/// changes that a candidate subscription evaluates on them. Reading, converting, sending and
/// decoding two versions of every change was most of a dispatch's cost, and a criteria of a type
/// alone (`Patient`) reads none of it (docs/performance-history.md, run AA).
/// With them come the subscription epochs of their projects, and of every server-scope project
/// when `with_server_scope`: read in the same statement, so that a dispatch costs no round trip
/// of its own for them.
pub(crate) async fn claim_changes(
    conn: &mut PgConnection,
    limit: i64,
    from_seq: i64,
    with_server_scope: bool,
) -> Result<(Vec<ClaimedChange>, Vec<ProjectEpoch>), sqlx::Error> {
    let rows = sqlx::query_as!(
        ClaimRow,
        r#"WITH claimed AS (
               SELECT seq, project_id, resource_type, resource_id, version_id, previous_version_id,
                      interaction, changed_at, request_id, trace_id, resend_subscription_id
               FROM fhir_outbox.outbox
               WHERE dispatched_at IS NULL AND seq >= $2
               ORDER BY seq
               LIMIT $1
               FOR UPDATE SKIP LOCKED)
           SELECT c.seq AS "seq!", c.project_id AS "project_id!", c.resource_type AS "resource_type!",
                  c.resource_id AS "resource_id!", c.version_id AS "version_id!",
                  c.previous_version_id, c.interaction AS "interaction!: Interaction",
                  c.changed_at AS "changed_at!", c.request_id AS "request_id!", c.trace_id AS "trace_id!",
                  c.resend_subscription_id,
                  p.subscription_epoch AS "project_epoch?", p.server_scope AS "project_server_scope?",
                  -- The batch's server-scope projects, once: on its first row.
                  CASE WHEN c.seq = min(c.seq) OVER () THEN s.ids END AS "server_scope_ids?",
                  CASE WHEN c.seq = min(c.seq) OVER () THEN s.epochs END AS "server_scope_epochs?"
           FROM claimed c
           LEFT JOIN fhir_outbox.project p ON p.id = c.project_id
           CROSS JOIN (SELECT array_agg(id ORDER BY id) AS ids,
                              array_agg(subscription_epoch ORDER BY id) AS epochs
                       FROM fhir_outbox.project WHERE server_scope AND $3) s
           ORDER BY c.seq"#,
        limit,
        from_seq,
        with_server_scope
    )
    .fetch_all(conn)
    .await?;
    let mut epochs: Vec<ProjectEpoch> = Vec::new();
    if let Some(first) = rows.first() {
        let ids = first.server_scope_ids.iter().flatten();
        let server_scope = ids.zip(first.server_scope_epochs.iter().flatten());
        epochs.extend(server_scope.map(|(id, epoch)| ProjectEpoch {
            id: *id,
            subscription_epoch: *epoch,
            server_scope: true,
        }));
    }
    for row in &rows {
        if let (Some(epoch), Some(server_scope)) = (row.project_epoch, row.project_server_scope) {
            epochs.push(ProjectEpoch {
                id: row.project_id,
                subscription_epoch: epoch,
                server_scope,
            });
        }
    }
    epochs.sort_unstable_by_key(|epoch| epoch.id);
    epochs.dedup_by_key(|epoch| epoch.id);
    let changes = rows
        .into_iter()
        .map(|row| ClaimedChange {
            seq: row.seq,
            project_id: row.project_id,
            resource_type: row.resource_type,
            resource_id: row.resource_id,
            version_id: row.version_id,
            previous_version_id: row.previous_version_id,
            interaction: row.interaction,
            changed_at: row.changed_at,
            request_id: row.request_id,
            trace_id: row.trace_id,
            contents_read: false,
            current: None,
            previous: None,
            resend_subscription_id: row.resend_subscription_id,
            undecodable: None,
        })
        .collect();
    Ok((changes, epochs))
}

/// Reads the versions of `changes[i]` for each `i` of `wanted` (in increasing order) while they
/// fit in [`BATCH_CONTENT_BUDGET_BYTES`] (the first always), decoding each change's on its own: a
/// content that cannot be decoded (a legacy row nested deeper than serde_json reads) marks its own
/// change, never the batch. Returns how many of `changes`, in order, the batch keeps: all of them,
/// or up to the first whose versions did not fit (those stay undispatched, for the next batch).
pub(crate) async fn read_contents(
    conn: &mut PgConnection,
    changes: &mut [ClaimedChange],
    wanted: &[usize],
) -> Result<usize, sqlx::Error> {
    let (mut projects, mut types, mut ids, mut versions, mut previous_versions) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &i in wanted {
        let change = &changes[i];
        projects.push(change.project_id);
        types.push(change.resource_type.as_str());
        ids.push(change.resource_id.as_str());
        versions.push(change.version_id);
        previous_versions.push(change.previous_version_id);
    }
    let rows = sqlx::query!(
        r#"WITH k AS (
               SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::int8[])
                   WITH ORDINALITY AS k(project_id, resource_type, id, version_id,
                                        previous_version_id, n)),
           read AS (
               SELECT k.n, cur.content AS current, prev.content AS previous,
                      sum(coalesce(pg_column_size(cur.content), 0)
                          + coalesce(pg_column_size(prev.content), 0)) OVER (ORDER BY k.n)
                          AS read_through
               FROM k
               LEFT JOIN fhir_outbox.resource_version cur
                 ON cur.project_id = k.project_id AND cur.resource_type = k.resource_type
                AND cur.id = k.id AND cur.version_id = k.version_id
               LEFT JOIN fhir_outbox.resource_version prev
                 ON prev.project_id = k.project_id AND prev.resource_type = k.resource_type
                AND prev.id = k.id AND prev.version_id = k.previous_version_id)
           SELECT n AS "n!", current::text AS "current?", previous::text AS "previous?"
           FROM read WHERE n = 1 OR read_through <= $6
           ORDER BY n"#,
        &projects,
        &types as &[&str],
        &ids as &[&str],
        &versions,
        &previous_versions as &[Option<i64>],
        BATCH_CONTENT_BUDGET_BYTES
    )
    .fetch_all(conn)
    .await?;
    let read = rows.len();
    for (row, &i) in rows.into_iter().zip(wanted) {
        let change = &mut changes[i];
        let mut undecodable = None;
        let mut decode = |text: Option<String>, version: Option<i64>| {
            let text = text?;
            crate::fhir::decode_stored(&text)
                .map_err(|error| {
                    undecodable.get_or_insert(format!(
                        "cannot decode resource: version {}: {error}",
                        version.unwrap_or_default()
                    ));
                })
                .ok()
        };
        change.current = decode(row.current, Some(change.version_id));
        change.previous = decode(row.previous, change.previous_version_id);
        change.undecodable = undecodable;
        change.contents_read = true;
    }
    Ok(wanted.get(read).copied().unwrap_or(changes.len()))
}

/// A project's subscription epoch (bumped by every Subscription write).
#[derive(Debug)]
pub(crate) struct ProjectEpoch {
    pub id: Uuid,
    pub subscription_epoch: i64,
    pub server_scope: bool,
}

/// An active Subscription, as loaded for matching.
pub(crate) struct ActiveSubscription {
    pub project_id: Uuid,
    pub id: String,
    pub version_id: i64,
    /// Its content, or why it cannot be decoded (then it is recorded as an issue, never compiled).
    pub content: Result<Value, String>,
    /// Since when it has been active without interruption.
    pub active_since: Option<DateTime<Utc>>,
    /// Why this version is suspended (an evaluation exhausted its budget), if it is.
    pub suspended_reason: Option<String>,
}

/// The current, active Subscriptions of these projects, each decoded on its own (one that cannot
/// be decoded never keeps the others from loading).
pub(crate) async fn active_subscriptions(
    conn: &mut PgConnection,
    projects: &[Uuid],
) -> Result<Vec<ActiveSubscription>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT r.project_id, r.id, r.version_id, v.content::text AS "content!",
                  -- The first version of the latest unbroken run of active versions.
                  (SELECT min(h.last_updated) FROM fhir_outbox.resource_version h
                   WHERE h.project_id = r.project_id AND h.resource_type = 'Subscription' AND h.id = r.id
                     AND h.version_id > coalesce(
                         (SELECT max(x.version_id) FROM fhir_outbox.resource_version x
                          WHERE x.project_id = r.project_id AND x.resource_type = 'Subscription'
                            AND x.id = r.id
                            AND (x.deleted OR x.content ->> 'status' IS DISTINCT FROM 'active')), 0)
                  ) AS active_since,
                  (SELECT min(i.message) FROM fhir_outbox.subscription_issue i
                   WHERE i.project_id = r.project_id AND i.subscription_id = r.id
                     AND i.subscription_version = r.version_id AND i.kind = 'budget_exhausted'
                  ) AS suspended_reason
           FROM fhir_outbox.resource r
           JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
           WHERE r.project_id = ANY($1) AND r.resource_type = 'Subscription' AND NOT r.deleted
             AND v.content ->> 'status' = 'active'"#,
        projects
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| ActiveSubscription {
            project_id: row.project_id,
            id: row.id,
            version_id: row.version_id,
            content: crate::fhir::decode_stored(&row.content)
                .map_err(|error| format!("cannot decode subscription: {error}")),
            active_since: row.active_since,
            suspended_reason: row.suspended_reason,
        })
        .collect())
}

/// A topic (a Basic resource coded `SubscriptionTopic`), as loaded for binding subscriptions.
pub(crate) struct StoredTopic {
    pub project_id: Uuid,
    pub id: String,
    /// Its content, or why it cannot be decoded.
    pub content: Result<Value, String>,
}

/// The live topics of these projects, oldest first (a later topic with the same URL wins).
pub(crate) async fn live_topics(
    conn: &mut PgConnection,
    projects: &[Uuid],
) -> Result<Vec<StoredTopic>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT r.project_id, r.id, v.content::text AS "content!"
           FROM fhir_outbox.subscription_topic t
           JOIN fhir_outbox.resource r
             ON r.project_id = t.project_id AND r.resource_type = 'Basic' AND r.id = t.id
           JOIN fhir_outbox.resource_version v
             ON v.project_id = r.project_id AND v.resource_type = r.resource_type
            AND v.id = r.id AND v.version_id = r.version_id
           WHERE t.project_id = ANY($1) AND NOT r.deleted
           ORDER BY r.last_updated, r.id"#,
        projects
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| StoredTopic {
            project_id: row.project_id,
            id: row.id,
            content: crate::fhir::decode_stored(&row.content)
                .map_err(|error| format!("cannot decode topic: {error}")),
        })
        .collect())
}

/// Delivery rows to insert, as parallel columns (one `UNNEST` insert per batch).
#[derive(Default)]
pub(crate) struct NewDeliveries {
    /// Derived from what the delivery is (see `dispatch::webhook_id`), not drawn at random.
    pub webhook_id: Vec<Uuid>,
    pub project_id: Vec<Uuid>,
    pub subscription_id: Vec<String>,
    pub outbox_seq: Vec<i64>,
    pub resource_project_id: Vec<Uuid>,
    pub resource_type: Vec<String>,
    pub resource_id: Vec<String>,
    pub version_id: Vec<i64>,
    pub previous_version_id: Vec<Option<i64>>,
    pub interaction: Vec<String>,
    pub changed_at: Vec<DateTime<Utc>>,
    pub request_id: Vec<String>,
    pub trace_id: Vec<String>,
    pub matched_at: Vec<DateTime<Utc>>,
    /// `pending`, or `skipped` (finished at once) with its reason: a matching change whose
    /// endpoint is refused by the outbound URL check.
    pub state: Vec<String>,
    pub reason: Vec<Option<String>>,
    /// `None` for a Medplum-style delivery; `handshake` or `event-notification` for a
    /// subscription to a topic (the event's number is given in [`record_dispatch`]).
    pub notification: Vec<Option<&'static str>>,
}

/// Writes what a batch of changes came to, in one statement: inserts their deliveries, wakes
/// delivery workers when some are pending (the notification's payload is `sender`: the worker of
/// the dispatcher's process, woken directly, ignores it), and marks the changes `seqs` dispatched,
/// each with its error if it could not be dispatched. Returns how many deliveries were inserted.
/// (A change is dispatched once: its outbox row is claimed, its deliveries inserted and the row
/// marked in one transaction, so no uniqueness check is needed here.)
pub(crate) async fn record_dispatch(
    conn: &mut PgConnection,
    rows: &NewDeliveries,
    seqs: &[i64],
    errors: &[Option<String>],
    sender: &str,
) -> Result<u64, sqlx::Error> {
    // Pending deliveries go to the hot table; skipped ones are finished at once, into history.
    // The events of subscriptions to topics are numbered here, under the lock of each
    // subscription's counter row (taken in one order, so that dispatchers never deadlock), in the
    // order of the changes: numbers commit with their deliveries or not at all.
    let row = sqlx::query!(
        r#"WITH d AS (
               SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::uuid[], $5::text[],
                                    $6::text[], $7::int8[], $8::int8[], $9::text[],
                                    $10::timestamptz[], $11::text[], $12::text[], $13::timestamptz[],
                                    $14::text[], $15::text[], $19::text[], $20::uuid[])
                   WITH ORDINALITY
                   AS d(project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                        resource_id, version_id, previous_version_id, interaction, changed_at,
                        request_id, trace_id, matched_at, state, reason, notification, webhook_id,
                        ord)),
           counted AS (
               INSERT INTO fhir_outbox.subscription_event_count AS c
                   (project_id, subscription_id, events_since_start)
               SELECT project_id, subscription_id, count(*) FROM d
               WHERE notification = 'event-notification'
               GROUP BY project_id, subscription_id ORDER BY project_id, subscription_id
               ON CONFLICT (project_id, subscription_id) DO UPDATE
               SET events_since_start = c.events_since_start + EXCLUDED.events_since_start,
                   last_notification_at = now()
               RETURNING c.project_id, c.subscription_id, c.events_since_start),
           -- Only events are numbered (window functions and a join): Medplum's deliveries
           -- pass straight through.
           numbered AS (
               SELECT d.project_id, d.subscription_id, d.outbox_seq, d.resource_project_id,
                      d.resource_type, d.resource_id, d.version_id, d.previous_version_id,
                      d.interaction, d.changed_at, d.request_id, d.trace_id, d.matched_at, d.state,
                      d.reason, d.notification, NULL::int8 AS event_number, d.webhook_id
               FROM d WHERE d.notification IS DISTINCT FROM 'event-notification'
               UNION ALL
               SELECT d.project_id, d.subscription_id, d.outbox_seq, d.resource_project_id,
                      d.resource_type, d.resource_id, d.version_id, d.previous_version_id,
                      d.interaction, d.changed_at, d.request_id, d.trace_id, d.matched_at, d.state,
                      d.reason, d.notification,
                      c.events_since_start
                      - count(*) OVER (PARTITION BY d.project_id, d.subscription_id)
                      + row_number() OVER (PARTITION BY d.project_id, d.subscription_id
                                           ORDER BY d.outbox_seq, d.ord),
                      d.webhook_id
               FROM d JOIN counted c USING (project_id, subscription_id)
               WHERE d.notification = 'event-notification'),
           pending AS (
               INSERT INTO fhir_outbox.unfinished_delivery
                   (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                    resource_id, version_id, previous_version_id, interaction, changed_at,
                    request_id, trace_id, matched_at, state, reason, notification, event_number,
                    webhook_id, lane)
               -- The lane is read once, not per row as the column's default would.
               SELECT n.*, (SELECT current FROM fhir_outbox.delivery_lane)
               FROM numbered n WHERE n.state = 'pending'
               RETURNING 1),
           skipped AS (
               INSERT INTO fhir_outbox.finished_delivery
                   (project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
                    resource_id, version_id, previous_version_id, interaction, changed_at,
                    request_id, trace_id, matched_at, state, reason, notification, event_number,
                    webhook_id, finished_at)
               SELECT n.*, now() FROM numbered n WHERE n.state <> 'pending'
               RETURNING 1),
           marked AS (
               UPDATE fhir_outbox.outbox o SET dispatched_at = now(), dispatch_error = m.error
               FROM UNNEST($17::int8[], $18::text[]) AS m(seq, error)
               WHERE o.seq = m.seq),
           -- Workers of other processes are woken at commit; in the same statement, so that the
           -- wake-up costs no round trip of its own (selected below, or it would not run).
           woken AS (
               SELECT pg_notify('fhir_outbox_delivery', $16) FROM d WHERE d.state = 'pending' LIMIT 1)
           SELECT (SELECT count(*) FROM pending) + (SELECT count(*) FROM skipped) AS "inserted!",
                  (SELECT count(*) FROM woken) AS "woken!""#,
        &rows.project_id,
        &rows.subscription_id,
        &rows.outbox_seq,
        &rows.resource_project_id,
        &rows.resource_type,
        &rows.resource_id,
        &rows.version_id,
        &rows.previous_version_id as &[Option<i64>],
        &rows.interaction,
        &rows.changed_at,
        &rows.request_id,
        &rows.trace_id,
        &rows.matched_at,
        &rows.state,
        &rows.reason as &[Option<String>],
        sender,
        seqs,
        errors as &[Option<String>],
        &rows.notification as &[Option<&str>],
        &rows.webhook_id,
    )
    .fetch_one(conn)
    .await?;
    Ok(row.inserted as u64)
}

/// Queues a heartbeat for every subscription to a topic that has been quiet for its heartbeat
/// period; returns how many.
pub(crate) async fn queue_heartbeats(pool: &sqlx::PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT fhir_outbox.queue_heartbeats() AS "queued!""#)
        .fetch_one(pool)
        .await
}

/// Whether any outbox row from `from_seq` on is undispatched (`from_seq` as in [`claim_changes`]):
/// the look a dispatch loop takes after registering for wake-ups, one round trip where an empty
/// claim costs three (its transaction's begin and commit). Rows another dispatcher has locked count:
/// the claim that follows then finds nothing, and the loop waits.
pub(crate) async fn undispatched_from(
    pool: &sqlx::PgPool,
    from_seq: i64,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.outbox
                          WHERE dispatched_at IS NULL AND seq >= $1) AS "exists!""#,
        from_seq
    )
    .fetch_one(pool)
    .await
}

/// Asks writers to wake this dispatch loop (`listener`), whose LISTEN connection is backend
/// `backend_pid`: the next commit that carries outbox rows clears the row's `waiting` and notifies
/// `fhir_outbox_change` (migrations 7 and 20261219000001). The table is unlogged, so this commit
/// does not wait for a WAL flush.
pub(crate) async fn register_waiting(
    executor: impl PgExecutor<'_>,
    listener: Uuid,
    backend_pid: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO fhir_outbox.dispatcher_waiting (listener, backend_pid) VALUES ($1, $2)
         ON CONFLICT (listener)
         DO UPDATE SET backend_pid = EXCLUDED.backend_pid, since = now(), waiting = true",
        listener,
        backend_pid
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Withdraws the wake-up request of this dispatch loop (if no writer has taken it). The row
/// stays, so that the table does not grow a dead row per wake-up (every write's commit reads it).
pub(crate) async fn unregister_waiting(
    executor: impl PgExecutor<'_>,
    listener: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE fhir_outbox.dispatcher_waiting SET waiting = false WHERE listener = $1 AND waiting",
        listener
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Removes this dispatch loop's row when the loop stops.
pub(crate) async fn forget_waiting(
    executor: impl PgExecutor<'_>,
    listener: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM fhir_outbox.dispatcher_waiting WHERE listener = $1",
        listener
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Removes the wake-up requests whose LISTEN backend is gone (a dispatcher that crashed or lost
/// its connection): nobody receives their wake-ups, and each would cost a needless notification.
/// Returns how many were removed.
pub(crate) async fn remove_stale_waiting(
    executor: impl PgExecutor<'_>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "DELETE FROM fhir_outbox.dispatcher_waiting w
         WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.backend_pid)"
    )
    .execute(executor)
    .await?
    .rows_affected())
}

/// One subscription problem to record.
pub(crate) struct Issue {
    pub project_id: Uuid,
    pub subscription_id: String,
    pub subscription_version: i64,
    pub kind: &'static str,
    pub message: String,
    pub occurrences: i64,
}

/// Records problems found when a subscription version is compiled. Each is recorded once, however
/// many dispatchers compile that version; returns the ones that were new (to log them once).
pub(crate) async fn record_new_issues(
    conn: &mut PgConnection,
    issues: &[Issue],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    if issues.is_empty() {
        return Ok(Vec::new());
    }
    let (projects, subscriptions, versions, kinds, messages) = columns(issues);
    let rows = sqlx::query!(
        "INSERT INTO fhir_outbox.subscription_issue
             (project_id, subscription_id, subscription_version, kind, message)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[])
         ON CONFLICT DO NOTHING
         RETURNING subscription_id, message",
        &projects,
        &subscriptions,
        &versions,
        &kinds,
        &messages,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.subscription_id, row.message))
        .collect())
}

/// Counts evaluation errors (the caller merges duplicates: one row per key and batch).
pub(crate) async fn count_evaluation_errors(
    conn: &mut PgConnection,
    issues: &[Issue],
) -> Result<(), sqlx::Error> {
    if issues.is_empty() {
        return Ok(());
    }
    let (projects, subscriptions, versions, kinds, messages) = columns(issues);
    let occurrences: Vec<i64> = issues.iter().map(|issue| issue.occurrences).collect();
    sqlx::query!(
        "INSERT INTO fhir_outbox.subscription_issue
             (project_id, subscription_id, subscription_version, kind, message, occurrences)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[])
         ON CONFLICT (project_id, subscription_id, subscription_version, kind, message)
         DO UPDATE SET occurrences = subscription_issue.occurrences + EXCLUDED.occurrences,
                       last_seen = now()",
        &projects,
        &subscriptions,
        &versions,
        &kinds,
        &messages,
        &occurrences,
    )
    .execute(conn)
    .await?;
    Ok(())
}

type IssueColumns = (Vec<Uuid>, Vec<String>, Vec<i64>, Vec<String>, Vec<String>);

fn columns(issues: &[Issue]) -> IssueColumns {
    (
        issues.iter().map(|i| i.project_id).collect(),
        issues.iter().map(|i| i.subscription_id.clone()).collect(),
        issues.iter().map(|i| i.subscription_version).collect(),
        issues.iter().map(|i| i.kind.to_owned()).collect(),
        issues.iter().map(|i| i.message.clone()).collect(),
    )
}

/// Sets one change aside: marks it dispatched with `error`, unless a dispatcher has dispatched it
/// meanwhile (then it was not the problem, and its outcome stands). Returns whether it was marked.
pub(crate) async fn set_aside(
    executor: impl PgExecutor<'_>,
    seq: i64,
    error: &str,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE fhir_outbox.outbox SET dispatched_at = now(), dispatch_error = $2
         WHERE seq = $1 AND dispatched_at IS NULL",
        seq,
        error
    )
    .execute(executor)
    .await?
    .rows_affected()
        == 1)
}
