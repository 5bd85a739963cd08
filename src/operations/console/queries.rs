//! What the console and its API read. Every query names the projects it may see (a token's scope),
//! and is bounded whatever the history: figures come from at most [`FIGURES_SAMPLE`] latest
//! attempts of one subscription ([`LIST_FIGURES_SAMPLE`] per row of a list), charts from at most
//! [`CHART_SAMPLE`] attempts of the last hour, lists are pages. docs/performance.md has their times on a database of 1,000,000 attempts.

use crate::capture::StoreError;
use crate::delivery::{DeliveryState, Notification, headers, signature};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// The most attempts a subscription's own figures are computed from (the latest of the window).
pub const FIGURES_SAMPLE: i64 = 5_000;
/// The most attempts per subscription or endpoint the figures of a list are computed from: a list
/// computes one set per row, so it reads fewer.
pub const LIST_FIGURES_SAMPLE: i64 = 1_000;
/// The most attempts of the last hour the overview's chart counts (the latest); also the most failed
/// attempts its failing subscriptions are counted from, and attempts per subscription shown.
pub const CHART_SAMPLE: i64 = 200_000;
/// The most subscriptions a project's list shows.
pub const SUBSCRIPTIONS_PAGE: i64 = 200;
/// The most attempts a delivery's timeline shows (the latest).
pub const ATTEMPTS_SHOWN: i64 = 100;

/// Which projects a reader sees: one, or every one.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Every project.
    All,
    /// One project.
    Project(Uuid),
}

impl Scope {
    fn project(self) -> Option<Uuid> {
        match self {
            Scope::All => None,
            Scope::Project(project) => Some(project),
        }
    }
}

/// An endpoint URL as the console shows it: without credentials, query string or fragment, which
/// may carry secrets (`https://***@hooks.example.com/in?…`).
pub fn redact_endpoint(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) if url.has_host() => {
            let had_credentials = !url.username().is_empty() || url.password().is_some();
            let had_query = url.query().is_some();
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            let mut shown = url.to_string();
            if had_credentials {
                shown = shown.replacen("://", "://***@", 1);
            }
            if had_query {
                shown.push_str("?…");
            }
            shown
        }
        // `Bot/<id>` and other references hold no secret.
        _ if endpoint.starts_with("Bot/") => endpoint.to_owned(),
        _ => "(not a URL)".to_owned(),
    }
}

/// A window's attempts, succeeded, p50 and p99, as a figures query reads them.
type WindowRow = (i64, i64, Option<f64>, Option<f64>);

/// Attempt figures over a window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// Attempts counted.
    pub attempts: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// `succeeded / attempts`, when there were attempts.
    pub success_rate: Option<f64>,
    /// Median attempt duration, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile attempt duration, milliseconds.
    pub p99_ms: Option<f64>,
    /// Whether the window held more attempts than were counted ([`FIGURES_SAMPLE`], the latest).
    pub sampled: bool,
}

impl Figures {
    /// The figures of the last hour and of the last 24 hours, from one read of at most `sample`
    /// attempts (the counts of each window, then their p50 and p99). A window is `sampled` when the
    /// read was full and the window filled it.
    fn windows(hour: WindowRow, day: WindowRow, sample: i64) -> (Figures, Figures) {
        let full = day.0 >= sample;
        (
            Figures::new(hour.0, hour.1, hour.2, hour.3, full && hour.0 >= sample),
            Figures::new(day.0, day.1, day.2, day.3, full),
        )
    }

    fn new(
        attempts: i64,
        succeeded: i64,
        p50: Option<f64>,
        p99: Option<f64>,
        sampled: bool,
    ) -> Self {
        Figures {
            attempts,
            succeeded,
            success_rate: (attempts > 0).then(|| succeeded as f64 / attempts as f64),
            p50_ms: p50,
            p99_ms: p99,
            sampled,
        }
    }
}

/// One minute of the overview's chart.
#[derive(Debug, Clone, Serialize)]
pub struct Minute {
    /// Its start.
    pub minute: DateTime<Utc>,
    /// Attempts that succeeded.
    pub succeeded: i64,
    /// Attempts that failed.
    pub failed: i64,
    /// Median attempt duration, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile, milliseconds.
    pub p99_ms: Option<f64>,
}

/// A subscription with failed attempts in the last hour (a disabled one shows in its project's
/// list, `auto_disabled`).
#[derive(Debug, Clone, Serialize)]
pub struct Failing {
    /// Project.
    pub project_id: Uuid,
    /// Subscription id.
    pub subscription_id: String,
    /// Failed attempts in the last hour.
    pub failed_last_hour: i64,
    /// Attempts in the last hour.
    pub attempts_last_hour: i64,
    /// The latest failed attempt's error or status.
    pub last_error: Option<String>,
}

/// The overview: what an operator looks at first.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// Deliveries waiting (including retries).
    pub pending: i64,
    /// Deliveries being sent.
    pub in_flight: i64,
    /// Changes not yet dispatched.
    pub undispatched: i64,
    /// When the oldest change not yet delivered (or not yet dispatched) was made.
    pub oldest_undelivered_at: Option<DateTime<Utc>>,
    /// Endpoints whose circuit is open or half-open.
    pub open_circuits: i64,
    /// Subscriptions failing in the last hour, most failures first (20 at most).
    pub failing_subscriptions: Vec<Failing>,
    /// Attempts per minute over the last hour (minutes without attempts are absent).
    pub per_minute: Vec<Minute>,
    /// Whether the last hour held more attempts than the chart counted ([`CHART_SAMPLE`]).
    pub per_minute_sampled: bool,
}

/// The overview of the projects in scope.
pub async fn overview(pool: &PgPool, scope: Scope) -> Result<Overview, StoreError> {
    let project = scope.project();
    let counts = sqlx::query!(
        r#"SELECT
             (SELECT count(*) FROM fhir_outbox.delivery
              WHERE state = 'pending' AND ($1::uuid IS NULL OR project_id = $1)) AS "pending!",
             (SELECT count(*) FROM fhir_outbox.delivery
              WHERE state = 'in_flight' AND ($1::uuid IS NULL OR project_id = $1)) AS "in_flight!",
             (SELECT count(*) FROM fhir_outbox.outbox
              WHERE dispatched_at IS NULL AND ($1::uuid IS NULL OR project_id = $1)) AS "undispatched!",
             -- One state at a time, so that each is read through its partial index (delivery_due
             -- or delivery_queue, delivery_leased): `state IN (…)` matches neither and scanned
             -- the whole table (390 ms at 600,000 deliveries).
             (SELECT least(
                 (SELECT min(changed_at) FROM fhir_outbox.delivery
                  WHERE state = 'pending' AND ($1::uuid IS NULL OR project_id = $1)),
                 (SELECT min(changed_at) FROM fhir_outbox.delivery
                  WHERE state = 'in_flight' AND ($1::uuid IS NULL OR project_id = $1)),
                 (SELECT min(changed_at) FROM fhir_outbox.outbox
                  WHERE dispatched_at IS NULL AND ($1::uuid IS NULL OR project_id = $1)))) AS oldest,
             (SELECT count(*) FROM fhir_outbox.endpoint_circuit
              WHERE state <> 'closed' AND ($1::uuid IS NULL OR project_id = $1)) AS "open_circuits!""#,
        project
    )
    .fetch_one(pool)
    .await?;
    // `date_bin` rather than `date_trunc('minute', …)`, which converts every timestamp to the
    // session's time zone (the chart took 42 ms instead of 15 for an hour of 41,000 attempts).
    let minutes = sqlx::query!(
        r#"SELECT date_bin('1 minute', started_at, timestamptz '2000-01-01 00:00:00+00') AS "minute!",
                  count(*) FILTER (WHERE succeeded) AS "succeeded!",
                  count(*) FILTER (WHERE NOT succeeded) AS "failed!",
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms) AS p99
           FROM (SELECT started_at, succeeded, duration_ms FROM fhir_outbox.delivery_attempt
                 WHERE started_at >= now() - interval '1 hour'
                   AND ($1::uuid IS NULL OR project_id = $1)
                 ORDER BY started_at DESC LIMIT $2) a
           GROUP BY 1 ORDER BY 1"#,
        project,
        CHART_SAMPLE
    )
    .fetch_all(pool)
    .await?;
    let counted: i64 = minutes.iter().map(|m| m.succeeded + m.failed).sum();
    // Counted from the failed attempts only (`delivery_attempt_failures`, an index of them with
    // their subscription), then each shown subscription's attempts from its own index and its
    // latest failure's words: counting every attempt of the hour fetched each one's row for its
    // subscription (30-37 ms of the overview at 41,000 attempts an hour).
    let failing = sqlx::query_as!(
        Failing,
        r#"SELECT f.project_id AS "project_id!", f.subscription_id AS "subscription_id!",
                  f.failed AS "failed_last_hour!", n.attempts AS "attempts_last_hour!", e.last_error
           FROM (SELECT project_id, subscription_id, count(*) AS failed
                 FROM (SELECT project_id, subscription_id
                       FROM fhir_outbox.delivery_attempt
                       WHERE started_at >= now() - interval '1 hour' AND NOT succeeded
                         AND ($1::uuid IS NULL OR project_id = $1)
                       ORDER BY started_at DESC LIMIT $2) a
                 GROUP BY 1, 2
                 ORDER BY 3 DESC, 1, 2 LIMIT 20) f
           CROSS JOIN LATERAL (
               SELECT count(*) AS attempts
               FROM (SELECT FROM fhir_outbox.delivery_attempt x
                     WHERE x.project_id = f.project_id AND x.subscription_id = f.subscription_id
                       AND x.started_at >= now() - interval '1 hour'
                     LIMIT $2) y) n
           LEFT JOIN LATERAL (
               SELECT coalesce(x.error, 'HTTP ' || x.status) AS last_error
               FROM fhir_outbox.delivery_attempt x
               WHERE x.project_id = f.project_id AND x.subscription_id = f.subscription_id
                 AND x.started_at >= now() - interval '1 hour' AND NOT x.succeeded
               ORDER BY x.started_at DESC LIMIT 1) e ON true
           ORDER BY 3 DESC, 1, 2"#,
        project,
        CHART_SAMPLE
    )
    .fetch_all(pool)
    .await?;
    Ok(Overview {
        pending: counts.pending,
        in_flight: counts.in_flight,
        undispatched: counts.undispatched,
        oldest_undelivered_at: counts.oldest,
        open_circuits: counts.open_circuits,
        failing_subscriptions: failing,
        per_minute_sampled: counted >= CHART_SAMPLE,
        per_minute: minutes
            .into_iter()
            .map(|m| Minute {
                minute: m.minute,
                succeeded: m.succeeded,
                failed: m.failed,
                p50_ms: m.p50,
                p99_ms: m.p99,
            })
            .collect(),
    })
}

/// A project, with its load.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectSummary {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Its subscriptions (not deleted).
    pub subscriptions: i64,
    /// Its deliveries waiting.
    pub pending: i64,
    /// Its endpoints with an open or half-open circuit.
    pub open_circuits: i64,
}

/// The projects in scope, by name.
pub async fn projects(pool: &PgPool, scope: Scope) -> Result<Vec<ProjectSummary>, StoreError> {
    Ok(sqlx::query_as!(
        ProjectSummary,
        r#"SELECT p.id, p.name, p.created_at,
                  (SELECT count(*) FROM fhir_outbox.resource r
                   WHERE r.project_id = p.id AND r.resource_type = 'Subscription' AND NOT r.deleted)
                      AS "subscriptions!",
                  (SELECT count(*) FROM fhir_outbox.delivery d
                   WHERE d.project_id = p.id AND d.state = 'pending') AS "pending!",
                  (SELECT count(*) FROM fhir_outbox.endpoint_circuit c
                   WHERE c.project_id = p.id AND c.state <> 'closed') AS "open_circuits!"
           FROM fhir_outbox.project p
           WHERE $1::uuid IS NULL OR p.id = $1
           ORDER BY p.name, p.id"#,
        scope.project()
    )
    .fetch_all(pool)
    .await?)
}

/// A subscription as the console lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionSummary {
    /// Project.
    pub project_id: Uuid,
    /// Its id.
    pub id: String,
    /// Its current version.
    pub version_id: i64,
    /// Its `reason` (what it is for: the name people know it by).
    pub reason: Option<String>,
    /// Its endpoint, redacted ([`redact_endpoint`]).
    pub endpoint: Option<String>,
    /// Its criteria.
    pub criteria: Option<String>,
    /// Its `status`.
    pub status: Option<String>,
    /// Its `error` (set when it was disabled automatically).
    pub error: Option<String>,
    /// Paused by an operator.
    pub paused: bool,
    /// Disabled automatically after repeated final failures (status `off` with an `error`).
    pub auto_disabled: bool,
    /// Problems recorded for its current version.
    pub issues: i64,
    /// Its endpoint's circuit (`closed`, `open`, `half_open`), when one was recorded.
    pub circuit: Option<String>,
    /// Deliveries waiting.
    pub pending: i64,
    /// Deliveries being sent.
    pub in_flight: i64,
    /// Attempts of the last hour.
    pub last_hour: Figures,
    /// Attempts of the last 24 hours.
    pub last_day: Figures,
}

/// The subscriptions of a project (at most [`SUBSCRIPTIONS_PAGE`], by id, with figures from
/// [`LIST_FIGURES_SAMPLE`] attempts each), or the one named (from [`FIGURES_SAMPLE`]).
pub async fn subscriptions(
    pool: &PgPool,
    project: Uuid,
    only: Option<&str>,
) -> Result<Vec<SubscriptionSummary>, StoreError> {
    let sample = if only.is_some() {
        FIGURES_SAMPLE
    } else {
        LIST_FIGURES_SAMPLE
    };
    let rows = sqlx::query!(
        r#"WITH subs AS (
               SELECT r.project_id, r.id, r.version_id, v.content
               FROM fhir_outbox.resource r
               JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
               WHERE r.project_id = $1 AND r.resource_type = 'Subscription' AND NOT r.deleted
                 AND ($2::text IS NULL OR r.id = $2)
               ORDER BY r.id LIMIT $3)
           SELECT s.id AS "id!", s.version_id AS "version_id!",
                  s.content -> 'channel' ->> 'endpoint' AS endpoint,
                  s.content ->> 'reason' AS reason,
                  s.content ->> 'criteria' AS criteria, s.content ->> 'status' AS status,
                  s.content ->> 'error' AS error,
                  EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                          WHERE p.project_id = s.project_id AND p.subscription_id = s.id) AS "paused!",
                  (SELECT count(*) FROM fhir_outbox.subscription_issue i
                   WHERE i.project_id = s.project_id AND i.subscription_id = s.id
                     AND i.subscription_version = s.version_id) AS "issues!",
                  (SELECT c.state FROM fhir_outbox.endpoint_circuit c
                   WHERE c.project_id = s.project_id
                     AND c.endpoint = fhir_outbox.endpoint_origin(s.content -> 'channel' ->> 'endpoint'))
                      AS circuit,
                  (SELECT count(*) FROM fhir_outbox.delivery d
                   WHERE d.project_id = s.project_id AND d.subscription_id = s.id
                     AND d.state = 'pending') AS "pending!",
                  (SELECT count(*) FROM fhir_outbox.delivery d
                   WHERE d.project_id = s.project_id AND d.subscription_id = s.id
                     AND d.state = 'in_flight') AS "in_flight!",
                  f.hour_attempts AS "hour_attempts!", f.hour_succeeded AS "hour_succeeded!",
                  f.hour_p50, f.hour_p99,
                  f.day_attempts AS "day_attempts!", f.day_succeeded AS "day_succeeded!",
                  f.day_p50, f.day_p99
           FROM subs s
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE a.started_at >= now() - interval '1 hour') AS hour_attempts,
                      count(*) FILTER (WHERE a.started_at >= now() - interval '1 hour' AND a.succeeded)
                          AS hour_succeeded,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms)
                          FILTER (WHERE a.started_at >= now() - interval '1 hour') AS hour_p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms)
                          FILTER (WHERE a.started_at >= now() - interval '1 hour') AS hour_p99,
                      count(*) AS day_attempts,
                      count(*) FILTER (WHERE a.succeeded) AS day_succeeded,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms) AS day_p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms) AS day_p99
               FROM (SELECT started_at, succeeded, duration_ms FROM fhir_outbox.delivery_attempt a
                     WHERE a.project_id = s.project_id AND a.subscription_id = s.id
                       AND a.started_at >= now() - interval '24 hours'
                     ORDER BY a.started_at DESC LIMIT $4) a) f
           ORDER BY s.id"#,
        project,
        only,
        SUBSCRIPTIONS_PAGE,
        sample
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let (last_hour, last_day) = Figures::windows(
                (
                    row.hour_attempts,
                    row.hour_succeeded,
                    row.hour_p50,
                    row.hour_p99,
                ),
                (
                    row.day_attempts,
                    row.day_succeeded,
                    row.day_p50,
                    row.day_p99,
                ),
                sample,
            );
            SubscriptionSummary {
                project_id: project,
                auto_disabled: row.status.as_deref() == Some("off") && row.error.is_some(),
                endpoint: row.endpoint.as_deref().map(redact_endpoint),
                id: row.id,
                version_id: row.version_id,
                reason: row.reason,
                criteria: row.criteria,
                status: row.status,
                error: row.error,
                paused: row.paused,
                issues: row.issues,
                circuit: row.circuit,
                pending: row.pending,
                in_flight: row.in_flight,
                last_hour,
                last_day,
            }
        })
        .collect())
}

/// An endpoint of a project: its circuit and load (`fhir_outbox.endpoint_health`), and the figures
/// of the attempts of the subscriptions that deliver to it now.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSummary {
    /// Its circuit and load.
    #[serde(flatten)]
    pub health: crate::operations::control::EndpointHealth,
    /// Attempts of the last hour (the latest [`LIST_FIGURES_SAMPLE`] at most).
    pub last_hour: Figures,
    /// Attempts of the last 24 hours (the latest [`LIST_FIGURES_SAMPLE`] at most).
    pub last_day: Figures,
}

/// Every endpoint of a project, with its figures: what its receiver's success rate and latency are,
/// across the subscriptions that share it (metrics carry no endpoint label, so these come from
/// here).
pub async fn endpoints(pool: &PgPool, project: Uuid) -> Result<Vec<EndpointSummary>, StoreError> {
    let health = crate::operations::control::endpoint_health(pool, Some(project), true).await?;
    let figures = sqlx::query!(
        r#"SELECT e.endpoint AS "endpoint!",
                  f.hour_attempts AS "hour_attempts!", f.hour_succeeded AS "hour_succeeded!",
                  f.hour_p50, f.hour_p99,
                  f.day_attempts AS "day_attempts!", f.day_succeeded AS "day_succeeded!",
                  f.day_p50, f.day_p99
           FROM (SELECT DISTINCT endpoint FROM fhir_outbox.subscription_endpoint
                 WHERE project_id = $1) e
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE a.started_at >= now() - interval '1 hour') AS hour_attempts,
                      count(*) FILTER (WHERE a.started_at >= now() - interval '1 hour' AND a.succeeded)
                          AS hour_succeeded,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms)
                          FILTER (WHERE a.started_at >= now() - interval '1 hour') AS hour_p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms)
                          FILTER (WHERE a.started_at >= now() - interval '1 hour') AS hour_p99,
                      count(*) AS day_attempts,
                      count(*) FILTER (WHERE a.succeeded) AS day_succeeded,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms) AS day_p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY a.duration_ms) AS day_p99
               -- The latest attempts of each subscription on the endpoint, then the latest of
               -- those: bounded by the subscriptions it has, whatever the history.
               FROM (SELECT x.started_at, x.succeeded, x.duration_ms
                     FROM fhir_outbox.subscription_endpoint s
                     CROSS JOIN LATERAL (
                         SELECT started_at, succeeded, duration_ms FROM fhir_outbox.delivery_attempt a
                         WHERE a.project_id = s.project_id AND a.subscription_id = s.subscription_id
                           AND a.started_at >= now() - interval '24 hours'
                         ORDER BY a.started_at DESC LIMIT $2) x
                     WHERE s.project_id = $1 AND s.endpoint = e.endpoint
                     ORDER BY x.started_at DESC LIMIT $2) a) f"#,
        project,
        LIST_FIGURES_SAMPLE
    )
    .fetch_all(pool)
    .await?;
    Ok(health
        .into_iter()
        .map(|health| {
            let row = figures.iter().find(|row| row.endpoint == health.endpoint);
            let (last_hour, last_day) = row.map_or_else(
                || (Figures::default(), Figures::default()),
                |row| {
                    Figures::windows(
                        (
                            row.hour_attempts,
                            row.hour_succeeded,
                            row.hour_p50,
                            row.hour_p99,
                        ),
                        (
                            row.day_attempts,
                            row.day_succeeded,
                            row.day_p50,
                            row.day_p99,
                        ),
                        LIST_FIGURES_SAMPLE,
                    )
                },
            );
            EndpointSummary {
                health,
                last_hour,
                last_day,
            }
        })
        .collect())
}

/// A problem recorded for a subscription's current version.
#[derive(Debug, Clone, Serialize)]
pub struct Issue {
    /// Subscription id.
    pub subscription_id: String,
    /// The version it concerns.
    pub subscription_version: i64,
    /// `unsupported`, `invalid`, `evaluation_error`, `budget_exhausted`, `endpoint_refused`,
    /// `status_update_failed`.
    pub kind: String,
    /// What is wrong, exactly.
    pub message: String,
    /// How often it was seen.
    pub occurrences: i64,
    /// First seen.
    pub first_seen: DateTime<Utc>,
    /// Last seen.
    pub last_seen: DateTime<Utc>,
}

/// The issues of the current versions of a project's subscriptions (or of one), latest first.
pub async fn issues(
    pool: &PgPool,
    project: Uuid,
    subscription: Option<&str>,
) -> Result<Vec<Issue>, StoreError> {
    Ok(sqlx::query_as!(
        Issue,
        r#"SELECT i.subscription_id, i.subscription_version, i.kind, i.message, i.occurrences,
                  i.first_seen, i.last_seen
           FROM fhir_outbox.subscription_issue i
           JOIN fhir_outbox.resource r
             ON r.project_id = i.project_id AND r.resource_type = 'Subscription'
            AND r.id = i.subscription_id AND r.version_id = i.subscription_version AND NOT r.deleted
           WHERE i.project_id = $1 AND ($2::text IS NULL OR i.subscription_id = $2)
           ORDER BY i.last_seen DESC LIMIT 500"#,
        project,
        subscription
    )
    .fetch_all(pool)
    .await?)
}

/// Filters of [`deliveries`].
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    /// Only this state.
    pub state: Option<DeliveryState>,
    /// Only this subscription.
    pub subscription: Option<String>,
    /// Only this resource (`Type`, `id`).
    pub resource: Option<(String, String)>,
    /// Only changes made at or after.
    pub since: Option<DateTime<Utc>>,
    /// Only changes made before.
    pub until: Option<DateTime<Utc>>,
    /// Only deliveries after this one in the list's order (the previous page's `next_cursor`).
    pub before: Option<i64>,
    /// At most this many (at least 1).
    pub limit: i64,
}

/// One delivery in a list.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryItem {
    /// Delivery id.
    pub id: i64,
    /// The `webhook-id` its requests carry (the same on every retry): what a receiver logs.
    pub webhook_id: Uuid,
    /// Project.
    pub project_id: Uuid,
    /// Subscription id.
    pub subscription_id: String,
    /// `Type/id`.
    pub resource: String,
    /// Version delivered.
    pub version_id: i64,
    /// create, update or delete.
    pub interaction: String,
    /// Its state.
    pub state: DeliveryState,
    /// Attempts made (since the last retry or replay).
    pub attempts: i32,
    /// The last attempt's HTTP status.
    pub last_status: Option<i32>,
    /// When the change was made.
    pub changed_at: DateTime<Utc>,
    /// Next attempt (pending).
    pub next_attempt_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Last error, skip or cancel reason.
    pub reason: Option<String>,
    /// For a subscription to a topic, the notification it carries: `handshake`, `heartbeat` or
    /// `event-notification` (`None`: Medplum's delivery of the resource itself).
    pub notification: Option<Notification>,
    /// An event's number among its subscription's events; a heartbeat's count of events so far.
    pub event_number: Option<i64>,
}

impl DeliveryItem {
    /// What a topic subscription's delivery carries, in words (`event-notification, event 3`,
    /// `heartbeat, 2 events so far`, `handshake`); `None` for Medplum's delivery of the resource.
    pub fn carries(&self) -> Option<String> {
        let notification = self.notification?;
        let name = notification.as_str();
        Some(match (notification, self.event_number) {
            (Notification::Event, Some(number)) => format!("{name}, event {number}"),
            (Notification::Heartbeat, Some(events)) => format!("{name}, {events} events so far"),
            _ => name.to_owned(),
        })
    }
}

/// A page of deliveries, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryPage {
    /// The deliveries.
    pub deliveries: Vec<DeliveryItem>,
    /// Pass as `cursor` for the next page; `None` on the last.
    pub next_cursor: Option<i64>,
}

/// A page of a project's deliveries (or of every project's, for the command line), newest first:
/// by id, or, for one project with a time window (`since`, `until`), by change time and then id
/// (`deliveries_in_window.sql` says why). Either way `next_cursor` is the last row's id. Every
/// project's list has no change-time index to follow, so it keeps the id order; the command line
/// gives it `since` at most, whose newest rows come first in that order. A window page whose cursor
/// names no delivery of the project (retention removed it) is refused with `NotFound`: the page
/// would continue from that delivery's change time.
pub async fn deliveries(
    pool: &PgPool,
    project: impl Into<Option<Uuid>>,
    query: &DeliveryQuery,
) -> Result<DeliveryPage, StoreError> {
    let project = project.into();
    let limit = query.limit.max(1);
    let (resource_type, resource_id) = match &query.resource {
        Some((resource_type, id)) => (Some(resource_type.as_str()), Some(id.as_str())),
        None => (None, None),
    };
    let state = query.state.map(DeliveryState::as_str);
    let window = query.since.is_some() || query.until.is_some();
    let mut deliveries = if let Some(project) = project.filter(|_| window) {
        let cursor_changed_at = match query.before {
            Some(id) => Some(cursor_changed_at(pool, project, id).await?),
            None => None,
        };
        sqlx::query_file_as!(
            DeliveryItem,
            "src/operations/console/deliveries_in_window.sql",
            project,
            state,
            query.subscription,
            resource_type,
            resource_id,
            query.since,
            query.until,
            cursor_changed_at,
            query.before,
            limit + 1
        )
        .fetch_all(pool)
        .await?
    } else {
        sqlx::query_as!(
            DeliveryItem,
            r#"SELECT id AS "id!", webhook_id AS "webhook_id!", project_id AS "project_id!",
                      subscription_id AS "subscription_id!",
                      resource_type || '/' || resource_id AS "resource!",
                      version_id AS "version_id!", interaction AS "interaction!",
                      state AS "state!: DeliveryState", attempts AS "attempts!", last_status,
                      changed_at AS "changed_at!", next_attempt_at AS "next_attempt_at!", finished_at,
                      reason, notification AS "notification: Notification", event_number
               FROM fhir_outbox.delivery
               WHERE ($1::uuid IS NULL OR project_id = $1)
                 AND ($2::text IS NULL OR state = $2)
                 AND ($3::text IS NULL OR subscription_id = $3)
                 AND ($4::text IS NULL OR (resource_type = $4 AND resource_id = $5))
                 AND ($6::timestamptz IS NULL OR changed_at >= $6)
                 AND ($7::timestamptz IS NULL OR changed_at < $7)
                 AND ($8::bigint IS NULL OR id < $8)
               ORDER BY id DESC
               LIMIT $9"#,
            project,
            state,
            query.subscription,
            resource_type,
            resource_id,
            query.since,
            query.until,
            query.before,
            limit + 1
        )
        .fetch_all(pool)
        .await?
    };
    let next_cursor = if deliveries.len() as i64 > limit {
        deliveries.truncate(limit as usize);
        deliveries.last().map(|delivery| delivery.id)
    } else {
        None
    };
    Ok(DeliveryPage {
        deliveries,
        next_cursor,
    })
}

/// The change time of the delivery a time-window page's cursor names.
async fn cursor_changed_at(
    pool: &PgPool,
    project: Uuid,
    id: i64,
) -> Result<DateTime<Utc>, StoreError> {
    sqlx::query_scalar!(
        r#"SELECT changed_at AS "changed_at!" FROM fhir_outbox.delivery
           WHERE id = $1 AND project_id = $2"#,
        id,
        project
    )
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| {
        StoreError::NotFound(format!(
            "the page cursor {id} names no delivery of this list (retention may have removed it): \
             start again from the first page"
        ))
    })
}

/// One attempt of a delivery.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptDetail {
    /// Attempt row id.
    pub id: i64,
    /// Its number (from 1 after each retry or replay).
    pub attempt: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took, milliseconds.
    pub duration_ms: i32,
    /// Whether it succeeded.
    pub succeeded: bool,
    /// The HTTP status, if an answer came.
    pub status: Option<i32>,
    /// Why it failed: no answer (timeout, connection), or the status received (`Received status
    /// 500`).
    pub error: Option<String>,
    /// The start of the response body.
    pub response_body: Option<String>,
    /// Its AuditEvent's id.
    pub audit_event_id: Option<String>,
    /// Its AuditEvent, as stored (`None` once retention removed it).
    pub audit_event: Option<Value>,
}

/// One delivery with everything about it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryDetail {
    /// The delivery. Its count of attempts is `attempt_count` here: `attempts` is the list.
    #[serde(flatten, serialize_with = "with_attempt_count")]
    pub delivery: DeliveryItem,
    /// The write's request id.
    pub request_id: String,
    /// The write's trace id.
    pub trace_id: String,
    /// When dispatch matched it.
    pub matched_at: DateTime<Utc>,
    /// Whether it is a replay (its own version is sent again whatever became of the resource).
    pub replay: bool,
    /// The subscription's endpoint now, redacted.
    pub endpoint: Option<String>,
    /// The names of the headers its requests carry (values are never shown: they may be
    /// credentials or signatures).
    pub header_names: Vec<String>,
    /// The body sent: the delivered version (`{}` for a delete); for a topic notification, the
    /// bundle's focus (the bundle around it is built at each attempt); `None` once the version is
    /// gone, and for a handshake or heartbeat (whose bundle has no focus).
    pub payload: Option<Value>,
    /// Its attempts, oldest first (the latest [`ATTEMPTS_SHOWN`]).
    pub attempts: Vec<AttemptDetail>,
}

/// A [`DeliveryItem`] whose `attempts` is called `attempt_count`, so that a [`DeliveryDetail`]'s
/// JSON has one `attempts` key (the list), which every JSON reader agrees on.
fn with_attempt_count<S: serde::Serializer>(
    item: &DeliveryItem,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut value = serde_json::to_value(item).map_err(serde::ser::Error::custom)?;
    if let Some(fields) = value.as_object_mut() {
        if let Some(count) = fields.remove("attempts") {
            fields.insert("attempt_count".to_owned(), count);
        }
    }
    value.serialize(serializer)
}

/// One delivery of a project, or `None` when the project has none with this id.
pub async fn delivery(
    pool: &PgPool,
    project: Uuid,
    id: i64,
) -> Result<Option<DeliveryDetail>, StoreError> {
    let Some(row) = sqlx::query!(
        r#"SELECT d.id AS "id!", d.webhook_id AS "webhook_id!", d.subscription_id AS "subscription_id!",
                  d.resource_type AS "resource_type!", d.resource_id AS "resource_id!",
                  d.version_id AS "version_id!", d.interaction AS "interaction!",
                  d.state AS "state!: DeliveryState", d.attempts AS "attempts!",
                  d.last_status, d.changed_at AS "changed_at!", d.next_attempt_at AS "next_attempt_at!",
                  d.finished_at, d.reason, d.request_id AS "request_id!", d.trace_id AS "trace_id!",
                  d.matched_at AS "matched_at!", d.replay AS "replay!",
                  d.notification AS "notification: Notification", d.event_number,
                  pv.content AS "payload?", sv.content AS "subscription?"
           FROM fhir_outbox.delivery d
           LEFT JOIN fhir_outbox.resource_version pv
                  ON d.interaction <> 'delete' AND NOT pv.deleted
                 AND pv.project_id = d.resource_project_id AND pv.resource_type = d.resource_type
                 AND pv.id = d.resource_id AND pv.version_id = d.version_id
           LEFT JOIN fhir_outbox.resource sr
                  ON sr.project_id = d.project_id AND sr.resource_type = 'Subscription'
                 AND sr.id = d.subscription_id AND NOT sr.deleted
           LEFT JOIN fhir_outbox.resource_version sv
                  ON sv.project_id = sr.project_id AND sv.resource_type = sr.resource_type
                 AND sv.id = sr.id AND sv.version_id = sr.version_id
           WHERE d.project_id = $1 AND d.id = $2"#,
        project,
        id
    )
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let attempts = sqlx::query!(
        r#"SELECT a.id, a.attempt, a.started_at, a.duration_ms, a.succeeded, a.status, a.error,
                  a.response_body, a.audit_event_id,
                  fhir_outbox.stored_audit_event(a.project_id, a.audit_event_id) AS "audit_event?"
           FROM (SELECT * FROM fhir_outbox.delivery_attempt
                 WHERE delivery_id = $1 AND project_id = $2
                 ORDER BY id DESC LIMIT $3) a
           ORDER BY a.id"#,
        id,
        project,
        ATTEMPTS_SHOWN
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|a| AttemptDetail {
        id: a.id,
        attempt: a.attempt,
        started_at: a.started_at,
        duration_ms: a.duration_ms,
        succeeded: a.succeeded,
        status: a.status,
        error: a.error,
        response_body: a.response_body,
        audit_event_id: a.audit_event_id,
        audit_event: a.audit_event,
    })
    .collect();
    let subscription = row.subscription.unwrap_or(Value::Null);
    let interaction = crate::capture::Interaction::parse(&row.interaction)
        .unwrap_or(crate::capture::Interaction::Update);
    let reference = format!("{}/{}", row.resource_type, row.resource_id);
    let header_names = match headers::custom_headers(&subscription) {
        Ok(custom) => {
            let webhook_id = row.webhook_id.to_string();
            headers::build(&headers::RequestHeaders {
                subscription_id: &row.subscription_id,
                interaction,
                // A notification bundle says itself what was deleted.
                deleted_resource: (row.interaction == "delete" && row.notification.is_none())
                    .then_some(reference.as_str()),
                custom: &custom,
                trace_id: &row.trace_id,
                webhook_id: &webhook_id,
                timestamp: 0,
                secret: signature::secret(&subscription),
                body: b"",
            })
            .keys()
            .map(|name| name.as_str().to_owned())
            .collect()
        }
        Err(_) => Vec::new(),
    };
    let endpoint = crate::subscription::endpoint(&subscription).map(redact_endpoint);
    let payload = if row
        .notification
        .is_some_and(|notification| !notification.has_focus())
    {
        None
    } else if row.interaction == "delete" {
        Some(serde_json::json!({}))
    } else {
        row.payload
    };
    Ok(Some(DeliveryDetail {
        delivery: DeliveryItem {
            id: row.id,
            webhook_id: row.webhook_id,
            project_id: project,
            subscription_id: row.subscription_id,
            resource: reference,
            version_id: row.version_id,
            interaction: row.interaction,
            state: row.state,
            attempts: row.attempts,
            last_status: row.last_status,
            changed_at: row.changed_at,
            next_attempt_at: row.next_attempt_at,
            finished_at: row.finished_at,
            reason: row.reason,
            notification: row.notification,
            event_number: row.event_number,
        },
        request_id: row.request_id,
        trace_id: row.trace_id,
        matched_at: row.matched_at,
        replay: row.replay,
        endpoint,
        header_names,
        payload,
        attempts,
    }))
}

#[cfg(test)]
mod tests {
    use super::{DeliveryDetail, DeliveryItem, redact_endpoint};
    use crate::delivery::DeliveryState;

    #[test]
    fn a_delivery_detail_has_one_attempts_key_the_list() {
        let at = chrono::Utc::now();
        let detail = DeliveryDetail {
            delivery: DeliveryItem {
                id: 1,
                webhook_id: uuid::Uuid::nil(),
                project_id: uuid::Uuid::nil(),
                subscription_id: "s".to_owned(),
                resource: "Patient/p".to_owned(),
                version_id: 1,
                interaction: "create".to_owned(),
                state: DeliveryState::Pending,
                attempts: 3,
                last_status: None,
                changed_at: at,
                next_attempt_at: at,
                finished_at: None,
                reason: None,
                notification: None,
                event_number: None,
            },
            request_id: "r".to_owned(),
            trace_id: "t".to_owned(),
            matched_at: at,
            replay: false,
            endpoint: None,
            header_names: Vec::new(),
            payload: None,
            attempts: Vec::new(),
        };
        let text = serde_json::to_string(&detail).unwrap();
        assert_eq!(text.matches("\"attempts\":").count(), 1, "{text}");
        assert!(
            text.contains("\"attempts\":[]") && text.contains("\"attempt_count\":3"),
            "{text}"
        );
    }

    #[test]
    fn endpoints_are_shown_without_credentials_or_query() {
        assert_eq!(
            redact_endpoint("https://user:pw@hooks.example.com:8443/in?token=s3cret#x"),
            "https://***@hooks.example.com:8443/in?…"
        );
        assert_eq!(
            redact_endpoint("https://hooks.example.com/in"),
            "https://hooks.example.com/in"
        );
        assert_eq!(redact_endpoint("Bot/123"), "Bot/123");
        assert_eq!(redact_endpoint("not a url"), "(not a URL)");
    }
}

/// A subscription to a topic as `$status` and `$events` report it.
#[derive(Debug)]
pub struct TopicSubscriptionStatus {
    /// The Subscription's id.
    pub subscription_id: String,
    /// Its `status`.
    pub status: String,
    /// Its content, or why it cannot be decoded.
    pub content: Result<Value, String>,
    /// How many events it has had (the number of the latest).
    pub events_since_start: i64,
    /// What is wrong with it, for `$status`'s `error` parameters: the issues of its current
    /// version, and why its latest notification failed when it did.
    pub errors: Vec<String>,
}

/// The live Subscriptions of `project` among `ids` whose criteria name a topic (a canonical URL),
/// with their event counts.
pub async fn topic_subscription_statuses(
    pool: &PgPool,
    project: Uuid,
    ids: &[String],
) -> Result<Vec<TopicSubscriptionStatus>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT r.id, coalesce(v.content ->> 'status', '') AS "status!", v.content::text AS "content!",
                  coalesce(c.events_since_start, 0) AS "events_since_start!",
                  ARRAY(SELECT i.message FROM fhir_outbox.subscription_issue i
                        WHERE i.project_id = r.project_id AND i.subscription_id = r.id
                          AND i.subscription_version = r.version_id
                        ORDER BY i.first_seen, i.message) AS "issues!",
                  (SELECT CASE WHEN d.state = 'failed'
                               THEN 'its latest notification failed: ' || coalesce(d.reason, 'no reason recorded')
                          END
                   FROM fhir_outbox.finished_delivery d
                   WHERE d.project_id = r.project_id AND d.subscription_id = r.id
                     AND d.notification IS NOT NULL
                   ORDER BY d.id DESC LIMIT 1) AS last_failure
           FROM fhir_outbox.resource r
           JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
           LEFT JOIN fhir_outbox.subscription_event_count c
                  ON c.project_id = r.project_id AND c.subscription_id = r.id
           WHERE r.project_id = $1 AND r.resource_type = 'Subscription' AND r.id = ANY($2)
             AND NOT r.deleted"#,
        project,
        ids
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| TopicSubscriptionStatus {
            subscription_id: row.id,
            status: row.status,
            content: crate::fhir::decode_stored(&row.content)
                .map_err(|error| format!("cannot decode the subscription: {error}")),
            events_since_start: row.events_since_start,
            errors: row.issues.into_iter().chain(row.last_failure).collect(),
        })
        .filter(|status| {
            status
                .content
                .as_ref()
                .map_or(true, crate::topic::is_backport_subscription)
        })
        .collect())
}

/// One stored event of a subscription to a topic (the delivery that carried it).
#[derive(Debug)]
pub struct StoredEvent {
    /// Its number.
    pub event_number: i64,
    /// When its change was written.
    pub changed_at: DateTime<Utc>,
    /// The focus: type, id, version.
    pub resource_type: String,
    /// The focus's id.
    pub resource_id: String,
    /// The focus's version.
    pub version_id: i64,
    /// Whether the event is the focus's deletion.
    pub deleted: bool,
    /// The focus's content when asked for (none for a deletion), or why it cannot be decoded.
    pub content: Option<Result<Value, String>>,
}

/// The events of a subscription numbered `since..=until`, the first `limit` of them, wherever
/// their deliveries are (pending, or in history for the retention period); with `with_content`,
/// each with its focus's version.
pub async fn stored_events(
    pool: &PgPool,
    project: Uuid,
    subscription_id: &str,
    since: i64,
    until: i64,
    limit: i64,
    with_content: bool,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT e.event_number AS "event_number!", e.changed_at AS "changed_at!",
                  e.resource_type AS "resource_type!", e.resource_id AS "resource_id!",
                  e.version_id AS "version_id!", e.interaction = 'delete' AS "deleted!",
                  v.content::text AS "content?"
           FROM (SELECT event_number, changed_at, resource_project_id, resource_type, resource_id,
                        version_id, interaction
                 FROM fhir_outbox.unfinished_delivery
                 WHERE project_id = $1 AND subscription_id = $2
                   AND notification = 'event-notification' AND event_number BETWEEN $3 AND $4
                 UNION ALL
                 SELECT event_number, changed_at, resource_project_id, resource_type, resource_id,
                        version_id, interaction
                 FROM fhir_outbox.finished_delivery
                 WHERE project_id = $1 AND subscription_id = $2
                   AND notification = 'event-notification' AND event_number BETWEEN $3 AND $4
                 ORDER BY event_number LIMIT $5) e
           LEFT JOIN fhir_outbox.resource_version v
                  ON $6 AND e.interaction <> 'delete' AND v.project_id = e.resource_project_id
                 AND v.resource_type = e.resource_type AND v.id = e.resource_id
                 AND v.version_id = e.version_id
           ORDER BY e.event_number"#,
        project,
        subscription_id,
        since,
        until,
        limit,
        with_content
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| StoredEvent {
            event_number: row.event_number,
            changed_at: row.changed_at,
            resource_type: row.resource_type,
            resource_id: row.resource_id,
            version_id: row.version_id,
            deleted: row.deleted,
            content: row.content.map(|content| {
                crate::fhir::decode_stored(&content)
                    .map_err(|error| format!("cannot decode the event's focus: {error}"))
            }),
        })
        .collect())
}
