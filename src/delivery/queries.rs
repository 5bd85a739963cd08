//! The SQL of the delivery stage.

use super::outcome::Completion;
use crate::audit::StoredAuditEvent;
use crate::capture::Interaction;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::collections::HashMap;
use uuid::Uuid;

/// A delivery claimed by this worker, with its lease.
#[derive(Debug, Clone)]
pub(super) struct ClaimedDelivery {
    pub id: i64,
    pub webhook_id: Uuid,
    pub project_id: Uuid,
    pub subscription_id: String,
    pub resource_type: String,
    pub resource_id: String,
    pub version_id: i64,
    pub interaction: Interaction,
    pub changed_at: DateTime<Utc>,
    pub request_id: String,
    pub trace_id: String,
    /// HTTP attempts made before this claim.
    pub attempts: i32,
    pub preamble_failures: i32,
    /// Claims including this one.
    pub claims: i32,
    pub lease_token: Uuid,
    /// The endpoint (`scheme://host:port`, as `fhir_outbox.endpoint_origin` writes it) of its
    /// subscription when claimed: whose circuit its outcome counts for.
    pub endpoint: String,
    /// Whether this delivery is the probe of an open circuit.
    pub probe: bool,
    /// Replayed by an operator: its own version is sent again even if superseded or deleted.
    pub replay: bool,
    /// For a subscription to a topic, the notification it carries; `None`: Medplum's body.
    pub notification: Option<Notification>,
    /// An event's number; for a heartbeat, the subscription's events when it was queued.
    pub event_number: Option<i64>,
}

/// The kind of notification bundle a delivery to a subscription to a topic carries (the
/// `notification` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "kebab-case")]
#[serde(rename_all = "kebab-case")]
pub enum Notification {
    /// Sent once when the subscription is `requested`: its outcome activates it.
    Handshake,
    /// Sent when the subscription has been quiet for its heartbeat period.
    Heartbeat,
    /// An event of its topic (`event-notification`).
    #[sqlx(rename = "event-notification")]
    #[serde(rename = "event-notification")]
    Event,
}

impl Notification {
    /// Its name in the `notification` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Notification::Handshake => "handshake",
            Notification::Heartbeat => "heartbeat",
            Notification::Event => "event-notification",
        }
    }

    /// Whether its bundle has a focus (only an event's does).
    pub fn has_focus(self) -> bool {
        self == Notification::Event
    }
}

/// A claimed delivery, with what its preamble needs, read in the claim's own statement.
#[derive(Debug)]
pub(super) struct Claimed {
    pub delivery: ClaimedDelivery,
    pub resource: ResourceNow,
    /// Its subscription as it stands now: on the first delivery of each subscription in the batch
    /// only (the others share it).
    pub subscription: Option<SubscriptionNow>,
}

/// A subscription as it stands now, with its project's settings: shared by the deliveries of a
/// batch to it.
#[derive(Debug)]
pub(super) struct SubscriptionNow {
    /// `None` when the subscription was deleted (or never existed).
    pub content: Option<std::sync::Arc<serde_json::Value>>,
    /// The project's settings (`{}` when it has none).
    pub settings: serde_json::Value,
    /// Why the subscription (or the settings) could not be decoded: its deliveries cannot be made.
    pub undecodable: Option<String>,
}

/// Where a delivery's resource stands now, and the content of the version it needs.
#[derive(Debug)]
pub(super) struct ResourceNow {
    /// The resource's newest version (its tombstone when deleted); `None` if it never existed.
    pub current_version: Option<i64>,
    pub deleted: bool,
    /// The content of the version sent (for a delete, the last live version, which a bot
    /// receives), as the stored JSON text; `None` when that version is a deletion or is gone.
    /// Decoded only where a tree is needed (a bot's input, a notification's focus): a rest-hook's
    /// body is this text made compact (`fhir::compact_stored`).
    pub content: Option<String>,
}

struct ClaimRow {
    id: i64,
    webhook_id: Uuid,
    project_id: Uuid,
    subscription_id: String,
    resource_type: String,
    resource_id: String,
    version_id: i64,
    interaction: Interaction,
    changed_at: DateTime<Utc>,
    request_id: String,
    trace_id: String,
    attempts: i32,
    preamble_failures: i32,
    claims: i32,
    lease_token: Uuid,
    endpoint: String,
    probe: bool,
    replay: bool,
    notification: Option<Notification>,
    event_number: Option<i64>,
    current_version: Option<i64>,
    deleted: bool,
    content: Option<String>,
    /// For a delivery of a change that an earlier delivery of the claim also sends: that
    /// delivery's id, which carries the content for both.
    content_of: Option<i64>,
    first_of_subscription: bool,
    subscription: Option<String>,
    settings: Option<String>,
}

/// How a claim shares out work: the in-flight allowance of each endpoint and how long a circuit
/// probe holds its endpoint.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClaimLimits {
    /// Most deliveries claimed.
    pub limit: i64,
    /// The lease taken on each.
    pub lease_seconds: f64,
    /// Most deliveries in flight at once per endpoint, across every worker: its base, or what it
    /// grew to (`endpoint_circuit.allowance`) up to its max.
    pub endpoint_allowance: super::policy::EndpointAllowance,
    /// How long a probe of an open circuit keeps other probes away, should its worker die.
    pub probe_seconds: f64,
    /// Most subscriptions with pending deliveries one claim visits (the round of them goes on at
    /// the next claim): bounds a claim's cost whatever the number of busy subscriptions.
    pub queues_per_claim: i64,
}

/// Claims due deliveries (and those whose lease expired: their worker died), fairly, and takes a
/// fresh lease on each:
/// - the subscriptions with pending deliveries are visited in a round (a skip scan of
///   `delivery_queue` from where the previous claim stopped, `claim_cursor`, at most
///   `queues_per_claim` of them), and each offers its first due deliveries: a claim's cost is
///   bounded whatever the backlog and the number of busy subscriptions, and every subscription is
///   visited once per round;
/// - among those, projects take turns, and within a project its subscriptions (ties are drawn at
///   random, so that none is always last), so a project with a million pending deliveries cannot
///   starve one with ten;
/// - an endpoint (a project's scheme, host and port) gets no more than its allowance in flight
///   (`endpoint_base`, or what it grew to, `policy::EndpointAllowance`), counting every worker's
///   live leases; a saturated endpoint's backlog stays pending in the table, not leased;
/// - an endpoint whose circuit is open gets nothing until its probe is due, then one delivery,
///   the probe (the circuit becomes `half_open`).
///
/// Deliveries of paused subscriptions wait. Claims are serialised by an advisory lock, so that two
/// workers see each other's leases when they count an endpoint's load. The statement is the
/// function `fhir_outbox.claim_deliveries` (its migration says why each of its settings), so that
/// the lock, the claim and its commit are one round trip; it runs alone in its (implicit)
/// transaction, because it turns `synchronous_commit` off for it. The same statement reads
/// what the preamble needs (each subscription once, each change's content once: the deliveries of
/// one change to several subscriptions share it). The JSON travels as text and is
/// decoded where it is used: one that cannot be decoded stops its own deliveries (see
/// `SubscriptionNow::undecodable`, and the preamble for resources), never the claim.
pub(super) async fn claim(
    conn: &mut PgConnection,
    limits: ClaimLimits,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let (endpoint_base, endpoint_max) = limits.endpoint_allowance.bounds();
    let rows = sqlx::query_as!(
        ClaimRow,
        r#"SELECT id AS "id!", webhook_id AS "webhook_id!", project_id AS "project_id!",
                  subscription_id AS "subscription_id!", resource_type AS "resource_type!",
                  resource_id AS "resource_id!", version_id AS "version_id!",
                  interaction AS "interaction!: Interaction", changed_at AS "changed_at!",
                  request_id AS "request_id!", trace_id AS "trace_id!", attempts AS "attempts!",
                  preamble_failures AS "preamble_failures!", claims AS "claims!",
                  lease_token AS "lease_token!", endpoint AS "endpoint!", probe AS "probe!",
                  replay AS "replay!", notification AS "notification?: Notification",
                  event_number, current_version, deleted AS "deleted!", content, content_of,
                  first_of_subscription AS "first_of_subscription!", subscription, settings
           FROM fhir_outbox.claim_deliveries($1, $2, $3, $4, $5, $6)"#,
        limits.limit,
        limits.lease_seconds,
        i64::from(endpoint_base),
        limits.probe_seconds,
        limits.queues_per_claim,
        i64::from(endpoint_max),
    )
    .fetch_all(&mut *conn)
    .await?;
    // A change's content travels once per claim, with its first delivery (the rows come in id
    // order, so that one comes before those that share it).
    let mut shared: HashMap<i64, Option<String>> = rows
        .iter()
        .filter_map(|row| row.content_of.map(|first| (first, None)))
        .collect();
    Ok(rows
        .into_iter()
        .map(|mut row| {
            match row.content_of {
                Some(first) => row.content = shared.get(&first).cloned().flatten(),
                None => {
                    if let Some(slot) = shared.get_mut(&row.id) {
                        slot.clone_from(&row.content);
                    }
                }
            }
            row
        })
        .map(|row| Claimed {
            subscription: row
                .first_of_subscription
                .then(|| subscription_now(row.subscription, row.settings)),
            resource: ResourceNow {
                current_version: row.current_version,
                deleted: row.deleted,
                content: row.content,
            },
            delivery: ClaimedDelivery {
                id: row.id,
                webhook_id: row.webhook_id,
                project_id: row.project_id,
                subscription_id: row.subscription_id,
                resource_type: row.resource_type,
                resource_id: row.resource_id,
                version_id: row.version_id,
                interaction: row.interaction,
                changed_at: row.changed_at,
                request_id: row.request_id,
                trace_id: row.trace_id,
                attempts: row.attempts,
                preamble_failures: row.preamble_failures,
                claims: row.claims,
                lease_token: row.lease_token,
                endpoint: row.endpoint,
                probe: row.probe,
                replay: row.replay,
                notification: row.notification,
                event_number: row.event_number,
            },
        })
        .collect())
}

fn subscription_now(subscription: Option<String>, settings: Option<String>) -> SubscriptionNow {
    let decoded = subscription
        .as_deref()
        .map(crate::fhir::decode_stored)
        .transpose()
        .map_err(|error| format!("cannot decode subscription: {error}"))
        .and_then(|content| {
            let settings = settings
                .as_deref()
                .map(crate::fhir::decode_stored)
                .transpose()
                .map_err(|error| format!("cannot decode project settings: {error}"))?;
            Ok((content, settings))
        });
    match decoded {
        Ok((content, settings)) => SubscriptionNow {
            content: content.map(std::sync::Arc::new),
            settings: settings.unwrap_or_else(|| serde_json::json!({})),
            undecodable: None,
        },
        Err(problem) => SubscriptionNow {
            content: None,
            settings: serde_json::json!({}),
            undecodable: Some(problem),
        },
    }
}

/// When the claimer should look again: the earliest `next_attempt_at` later than `after` among
/// pending deliveries of subscriptions not paused (as the claim excludes them), or the earliest
/// probe of an open circuit if sooner, as seconds from the database's clock now (`None`: nothing
/// is scheduled), that clock, and whether a delivery is due already. Uses the `delivery_due` index
/// and starts past `after`, the clock of the previous look: a due row that the claim since then could
/// not take (locked by another worker's claim) is returned once, never in a loop.
pub(super) async fn next_due(
    conn: &mut PgConnection,
    after: DateTime<Utc>,
) -> Result<NextDue, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT clock_timestamp() AS "now!",
                  -- Paused ones count: skipping them would walk a paused backlog at every look.
                  EXISTS (SELECT 1 FROM fhir_outbox.unfinished_delivery d
                          WHERE d.state = 'pending' AND d.next_attempt_at <= clock_timestamp())
                      AS "due_now!",
                  extract(epoch FROM least(
                      (SELECT d.next_attempt_at FROM fhir_outbox.unfinished_delivery d
                       WHERE d.state = 'pending' AND d.next_attempt_at > $1
                         AND NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                                         WHERE p.project_id = d.project_id
                                           AND p.subscription_id = d.subscription_id)
                       ORDER BY d.next_attempt_at LIMIT 1),
                      (SELECT min(next_probe_at) FROM fhir_outbox.endpoint_circuit
                       WHERE state <> 'closed' AND next_probe_at > $1)
                  ) - clock_timestamp())::float8 AS "wait?""#,
        after
    )
    .fetch_one(conn)
    .await?;
    Ok(NextDue {
        wait_seconds: row.wait,
        now: row.now,
        due_now: row.due_now,
    })
}

/// What the claimer learns when it looks ahead ([`next_due`]).
pub(super) struct NextDue {
    /// Seconds until the earliest scheduled delivery or probe after the previous look (`None`:
    /// nothing is scheduled).
    pub wait_seconds: Option<f64>,
    /// The database's clock at this look.
    pub now: DateTime<Utc>,
    /// Whether a delivery is due already: one the last claim left (its endpoint's allowance was
    /// full, its circuit open, its subscription paused, or another worker's claim held it).
    pub due_now: bool,
}

/// Extends the leases of deliveries this worker is still working on. Rows locked by someone else
/// are skipped rather than waited for: they are being recorded (by this worker's recorder) or taken
/// over, and waiting on them would delay the renewal of all the others past their expiry.
pub(super) async fn renew_leases(
    conn: &mut PgConnection,
    tokens: &[Uuid],
    lease_seconds: f64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE fhir_outbox.unfinished_delivery SET lease_expires_at = now() + make_interval(secs => $2)
         WHERE id = ANY (ARRAY(SELECT id FROM fhir_outbox.unfinished_delivery
                               WHERE state = 'in_flight' AND lease_token = ANY($1)
                               FOR UPDATE SKIP LOCKED))",
        tokens,
        lease_seconds
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Gives deliveries back unattempted (no slot came free for them, or on shutdown): due again at
/// once, for any worker. Their claim is undone too, so that the hard cap on claims keeps counting
/// only claims that may have ended in a request.
pub(super) async fn release(conn: &mut PgConnection, tokens: &[Uuid]) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE fhir_outbox.unfinished_delivery
         SET state = 'pending', next_attempt_at = now(), lease_token = NULL, lease_expires_at = NULL,
             claims = greatest(claims - 1, 0), lane = (SELECT current FROM fhir_outbox.delivery_lane)
         WHERE state = 'in_flight' AND lease_token = ANY($1)",
        tokens
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// How a recorder's transaction begins, in one round trip. Without sequential scans, the fenced
/// completion (`complete.sql`) reads the hot table by id whatever the statistics say: a lane that
/// was empty when the statement was planned (truncated, and not analyzed since) would otherwise be
/// read whole at every completion once it fills (10–45 ms per batch with a backlog of 100,000,
/// docs/performance-history.md run O). Nothing else in the transaction needs a sequential scan.
/// Without JIT, as in the claim: the cost of the one sequential scan left (`delivery_lane`, one row
/// and no index) then counts as disabled, which would have every completion compiled (about 0.5 s).
pub const RECORD_BEGIN: &str = "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// Writes each completion if, and only if, this worker still holds that delivery's lease, in one
/// statement: a finished delivery moves from the hot table to history (`finished_delivery`), one to
/// be tried again stays, rescheduled; the attempt rows and stored AuditEvents of the deliveries
/// written go with them, and a successful attempt forgets its subscription's final failures
/// (`auto_disable`). Returns the ids written; a delivery missing from it lost its lease (another
/// worker took it over), so nothing about it was written.
pub(super) async fn complete(
    conn: &mut PgConnection,
    completions: &[(i64, Uuid, &Completion)],
    attempts: &[(i64, &AttemptRecord, Option<&str>)],
    events: &[(i64, &StoredAuditEvent)],
) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = completions.iter().map(|(id, _, _)| *id).collect();
    let tokens: Vec<Uuid> = completions.iter().map(|(_, token, _)| *token).collect();
    let states: Vec<&str> = completions
        .iter()
        .map(|(_, _, c)| c.state.as_str())
        .collect();
    let attempt_counts: Vec<i32> = completions.iter().map(|(_, _, c)| c.attempts).collect();
    let preamble_failures: Vec<i32> = completions
        .iter()
        .map(|(_, _, c)| c.preamble_failures)
        .collect();
    let next_attempts: Vec<Option<DateTime<Utc>>> = completions
        .iter()
        .map(|(_, _, c)| c.next_attempt_at)
        .collect();
    let reasons: Vec<Option<String>> = completions
        .iter()
        .map(|(_, _, c)| c.reason.as_ref().map(ToString::to_string))
        .collect();
    let statuses: Vec<Option<i32>> = completions.iter().map(|(_, _, c)| c.last_status).collect();
    let attempted: Vec<i64> = attempts.iter().map(|(id, _, _)| *id).collect();
    let numbers: Vec<i32> = attempts.iter().map(|(_, a, _)| a.attempt).collect();
    let started: Vec<DateTime<Utc>> = attempts.iter().map(|(_, a, _)| a.started_at).collect();
    let durations: Vec<i32> = attempts.iter().map(|(_, a, _)| a.duration_ms).collect();
    let succeeded: Vec<bool> = attempts.iter().map(|(_, a, _)| a.succeeded).collect();
    let answers: Vec<Option<i32>> = attempts.iter().map(|(_, a, _)| a.status).collect();
    let errors: Vec<Option<&str>> = attempts
        .iter()
        .map(|(_, a, _)| a.error.as_deref())
        .collect();
    let bodies: Vec<Option<&str>> = attempts
        .iter()
        .map(|(_, a, _)| a.response_body.as_deref())
        .collect();
    let event_ids: Vec<Option<&str>> = attempts.iter().map(|(_, _, event)| *event).collect();
    let audited: Vec<i64> = events.iter().map(|(id, _)| *id).collect();
    let stored_ids: Vec<&str> = events.iter().map(|(_, event)| event.id.as_str()).collect();
    let recorded: Vec<DateTime<Utc>> = events.iter().map(|(_, event)| event.recorded_at).collect();
    let contents: Vec<&str> = events
        .iter()
        .map(|(_, event)| event.content.as_str())
        .collect();
    sqlx::query_file_scalar!(
        "src/delivery/complete.sql",
        &ids,
        &tokens,
        &states as &[&str],
        &attempt_counts,
        &preamble_failures,
        &next_attempts as &[Option<DateTime<Utc>>],
        &reasons as &[Option<String>],
        &statuses as &[Option<i32>],
        &attempted,
        &numbers,
        &started,
        &durations,
        &succeeded,
        &answers as &[Option<i32>],
        &errors as &[Option<&str>],
        &bodies as &[Option<&str>],
        &audited,
        &stored_ids as &[&str],
        &recorded,
        &contents as &[&str],
        &event_ids as &[Option<&str>],
    )
    .fetch_all(conn)
    .await
}

/// One HTTP attempt, for the attempt log.
#[derive(Debug, Clone)]
pub(super) struct AttemptRecord {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub succeeded: bool,
    pub status: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// What a recorded batch says of one endpoint's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EndpointResult {
    pub project_id: Uuid,
    pub endpoint: String,
    /// Whether it answered healthily (not 5xx) at least once in the batch.
    pub healthy: bool,
    /// Failures after its last healthy answer in the batch (all of them if it had none).
    pub failures: i32,
    /// The last failure's error.
    pub last_failure: Option<String>,
    /// Whether every attempt to it in the batch got a fast answer (`policy::is_fast_answer`).
    pub fast: bool,
}

/// A circuit that changed state.
#[derive(Debug, Clone)]
pub(super) struct CircuitTransition {
    pub project_id: Uuid,
    pub endpoint: String,
    pub from: String,
    pub to: String,
    pub consecutive_failures: i32,
    pub next_probe_at: Option<DateTime<Utc>>,
}

/// Applies a batch's results to the endpoints' circuits (in the recorder's transaction), with the
/// rules of `policy::CircuitBreaker`: `threshold` consecutive failures open a closed circuit; a
/// failed probe opens a half-open one again; an answer closes it. An opening waits
/// `cool_downs[openings]` seconds (the last one once they run out) before its probe. Applies
/// the rules of `policy::EndpointAllowance` (`allowance` is its base and max) from the allowance
/// stored, so that a recorder cannot undo another's fall back with what its claim saw. Returns the
/// transitions. Endpoints with nothing to change are not written. One round trip: the rules are
/// `fhir_outbox.record_endpoint_results` (migration 20261213000001).
pub(super) async fn record_endpoint_results(
    conn: &mut PgConnection,
    results: &[EndpointResult],
    threshold: i32,
    cool_downs: &[f64],
    allowance: (i32, i32),
) -> Result<Vec<CircuitTransition>, sqlx::Error> {
    let (base, max) = allowance;
    let projects: Vec<Uuid> = results.iter().map(|r| r.project_id).collect();
    let endpoints: Vec<&str> = results.iter().map(|r| r.endpoint.as_str()).collect();
    let healthy: Vec<bool> = results.iter().map(|r| r.healthy).collect();
    let failures: Vec<i32> = results.iter().map(|r| r.failures).collect();
    let last_failures: Vec<Option<&str>> =
        results.iter().map(|r| r.last_failure.as_deref()).collect();
    let fast: Vec<bool> = results.iter().map(|r| r.fast).collect();
    sqlx::query_as!(
        CircuitTransition,
        r#"SELECT project_id AS "project_id!", endpoint AS "endpoint!", from_state AS "from!",
                  to_state AS "to!", consecutive_failures AS "consecutive_failures!", next_probe_at
           FROM fhir_outbox.record_endpoint_results($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"#,
        &projects,
        &endpoints as &[&str],
        &healthy,
        &failures,
        &last_failures as &[Option<&str>],
        &fast,
        threshold,
        cool_downs,
        base,
        max,
    )
    .fetch_all(conn)
    .await
}

/// What one pass of `fhir_outbox.rotate_delivery_lanes` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaneRotation {
    /// Pending deliveries moved from the other lane to the current one.
    pub moved: i64,
    /// Whether the other lane, empty, was truncated.
    pub truncated: bool,
    /// Whether the lanes switched.
    pub switched: bool,
    /// Whether a snapshot older than the last switch holds the xmin horizon (then the draining
    /// lane's backlog is moved too).
    pub horizon_held: bool,
}

/// One pass of the hot table's lane rotation (see `delivery::lanes`).
pub(crate) async fn rotate_lanes(
    executor: impl sqlx::PgExecutor<'_>,
    min_seconds: f64,
    min_dead: i64,
    max_moves: i32,
    max_moves_held: i32,
    held_seconds: f64,
) -> Result<LaneRotation, sqlx::Error> {
    sqlx::query_as!(
        LaneRotation,
        r#"SELECT moved AS "moved!", truncated AS "truncated!", switched AS "switched!",
                  horizon_held AS "horizon_held!"
           FROM fhir_outbox.rotate_delivery_lanes($1, $2, $3, $4, $5)"#,
        min_seconds,
        min_dead,
        max_moves,
        max_moves_held,
        held_seconds
    )
    .fetch_one(executor)
    .await
}
