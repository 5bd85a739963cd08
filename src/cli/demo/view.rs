//! What the tour shows while it runs (a live block redrawn in place on a terminal, progress lines
//! otherwise) and the numbers it reads for it.

use super::writes::{Done, WriteCounts, short};
use crate::cli::receiver::{Counts, Event};
use sqlx::PgPool;
use std::io::Write;
use std::time::Duration;
use uuid::Uuid;

/// The pipeline's state, as the database has it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Outbox rows of the project (every committed change, Subscriptions included).
    pub changes: i64,
    /// Outbox rows not dispatched yet.
    pub backlog: i64,
    /// Deliveries waiting for their first attempt.
    pub pending: i64,
    /// Deliveries waiting for a retry (an attempt failed).
    pub awaiting_retry: i64,
    /// Deliveries being sent.
    pub in_flight: i64,
    /// Deliveries accepted by the receiver.
    pub succeeded: i64,
    /// Deliveries not sent (the preamble found a reason).
    pub skipped: i64,
    /// Deliveries that used all their attempts.
    pub failed: i64,
    /// HTTP attempts.
    pub attempts: i64,
    /// HTTP attempts after the first of their delivery.
    pub retries: i64,
}

impl Snapshot {
    /// Nothing left to dispatch or deliver.
    pub fn settled(&self) -> bool {
        self.backlog == 0 && self.pending == 0 && self.awaiting_retry == 0 && self.in_flight == 0
    }
}

/// One of the last deliveries, for the summary table.
#[derive(Debug, sqlx::FromRow)]
pub struct DeliveryRow {
    /// `delivery.id`.
    pub id: i64,
    /// The subscription's id.
    pub subscription_id: String,
    /// `create`, `update` or `delete`.
    pub interaction: String,
    /// The changed resource's type.
    pub resource_type: String,
    /// The changed resource's id.
    pub resource_id: String,
    /// The changed version.
    pub version_id: i64,
    /// The delivery state.
    pub state: fhir_outbox::delivery::DeliveryState,
    /// HTTP attempts made.
    pub attempts: i32,
    /// Status of the last response.
    pub last_status: Option<i32>,
    /// Sent as `webhook-id`.
    pub webhook_id: String,
    /// Why it was skipped, or the last error.
    pub reason: Option<String>,
}

/// Per subscription: (subscription id, deliveries, succeeded, skipped, failed, HTTP attempts).
pub type PerSubscription = (String, i64, i64, i64, i64, i64);

/// The tour's own read-only queries (runtime-checked: they are not part of the library's API).
pub mod queries {
    use super::*;

    /// The pipeline's state for `project`.
    pub async fn snapshot(pool: &PgPool, project: Uuid) -> Result<Snapshot, sqlx::Error> {
        let row: (i64, i64, i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT
                (SELECT count(*) FROM fhir_outbox.outbox WHERE project_id = $1),
                (SELECT count(*) FROM fhir_outbox.outbox WHERE project_id = $1 AND dispatched_at IS NULL),
                count(*) FILTER (WHERE state = 'pending' AND attempts = 0),
                count(*) FILTER (WHERE state = 'pending' AND attempts > 0),
                count(*) FILTER (WHERE state = 'in_flight'),
                count(*) FILTER (WHERE state = 'succeeded'),
                count(*) FILTER (WHERE state = 'skipped'),
                count(*) FILTER (WHERE state = 'failed'),
                (SELECT count(*) FROM fhir_outbox.delivery_attempt WHERE project_id = $1),
                (SELECT count(*) FROM fhir_outbox.delivery_attempt WHERE project_id = $1 AND attempt > 1)
             FROM fhir_outbox.delivery WHERE project_id = $1",
        )
        .bind(project)
        .fetch_one(pool)
        .await?;
        Ok(Snapshot {
            changes: row.0,
            backlog: row.1,
            pending: row.2,
            awaiting_retry: row.3,
            in_flight: row.4,
            succeeded: row.5,
            skipped: row.6,
            failed: row.7,
            attempts: row.8,
            retries: row.9,
        })
    }

    /// The last `limit` deliveries of `project`, newest first.
    pub async fn last_deliveries(
        pool: &PgPool,
        project: Uuid,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, subscription_id, interaction, resource_type, resource_id, version_id, state,
                    attempts, last_status, webhook_id::text AS webhook_id, reason
             FROM fhir_outbox.delivery WHERE project_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(project)
        .bind(limit)
        .fetch_all(pool)
        .await
    }

    /// Deliveries per subscription of `project`.
    pub async fn per_subscription(
        pool: &PgPool,
        project: Uuid,
    ) -> Result<Vec<PerSubscription>, sqlx::Error> {
        sqlx::query_as(
            "SELECT subscription_id, count(*),
                    count(*) FILTER (WHERE state = 'succeeded'),
                    count(*) FILTER (WHERE state = 'skipped'),
                    count(*) FILTER (WHERE state = 'failed'),
                    coalesce(sum(attempts), 0)::bigint
             FROM fhir_outbox.delivery WHERE project_id = $1 GROUP BY subscription_id",
        )
        .bind(project)
        .fetch_all(pool)
        .await
    }

    /// Why deliveries were skipped or failed, most frequent first (at most `limit` reasons).
    pub async fn reasons(
        pool: &PgPool,
        project: Uuid,
        limit: i64,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT state, coalesce(reason, ''), count(*) FROM fhir_outbox.delivery
             WHERE project_id = $1 AND state IN ('skipped', 'failed')
             GROUP BY state, reason ORDER BY count(*) DESC LIMIT $2",
        )
        .bind(project)
        .bind(limit)
        .fetch_all(pool)
        .await
    }

    /// Changes made by the tour's writes (request ids `demo-…`): (type, interaction, count).
    pub async fn demo_changes(
        pool: &PgPool,
        project: Uuid,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT resource_type, interaction, count(*) FROM fhir_outbox.outbox
             WHERE project_id = $1 AND request_id LIKE 'demo-%' GROUP BY resource_type, interaction",
        )
        .bind(project)
        .fetch_all(pool)
        .await
    }

    /// AuditEvents written for the project's delivery attempts, and subscription issues recorded.
    pub async fn audit_and_issues(pool: &PgPool, project: Uuid) -> Result<(i64, i64), sqlx::Error> {
        sqlx::query_as(
            "SELECT
                (SELECT count(*) FROM fhir_outbox.audit_event WHERE project_id = $1),
                (SELECT count(*) FROM fhir_outbox.subscription_issue WHERE project_id = $1)",
        )
        .bind(project)
        .fetch_one(pool)
        .await
    }
}

/// Where the tour is.
pub enum Phase {
    /// Writing: elapsed and planned duration.
    Writing(Duration, Duration),
    /// Writes are over; the pipeline finishes what is left (retries included).
    Draining,
}

/// Everything one frame shows.
pub struct Frame<'a> {
    /// Where the tour is.
    pub phase: Phase,
    /// Writes made.
    pub writes: WriteCounts,
    /// The last write.
    pub last_write: Option<&'a Done>,
    /// The database's view.
    pub snapshot: &'a Snapshot,
    /// The receiver's counters.
    pub receiver: Counts,
    /// The receiver's last requests.
    pub events: &'a [Event],
}

/// Live lines are kept under 80 columns so that none wraps: the redraw moves the cursor up by the
/// number of lines it printed.
const WIDTH: usize = 78;

fn clip(line: String) -> String {
    if line.chars().count() <= WIDTH {
        line
    } else {
        let mut clipped: String = line.chars().take(WIDTH - 1).collect();
        clipped.push('…');
        clipped
    }
}

/// One line about one request the receiver answered (the note only when it was not accepted).
pub fn event_line(event: &Event) -> String {
    let (kind, id) = event
        .resource
        .split_once('/')
        .unwrap_or((&event.resource, ""));
    let note = if event.status == 200 {
        String::new()
    } else {
        format!(" ({})", event.note)
    };
    clip(format!(
        "  {} {} {:<6} {:<20} → {}{note}",
        event.at.format("%H:%M:%S%.3f"),
        event.status,
        event.interaction,
        format!("{kind}/{}", short(id)),
        event.path,
    ))
}

/// Draws frames: in place on a terminal, as periodic lines otherwise.
pub struct View {
    live: bool,
    /// Lines of the last live frame (to move back over them).
    drawn: usize,
    /// Frames since the last plain line.
    frames: u32,
}

impl View {
    /// A view; `live` redraws in place (only for a terminal).
    pub fn new(live: bool) -> View {
        View {
            live,
            drawn: 0,
            frames: 0,
        }
    }

    /// Shows a frame. Plain mode prints one line every `plain_every` frames (and always when forced).
    pub fn draw(
        &mut self,
        out: &mut impl Write,
        frame: &Frame<'_>,
        plain_every: u32,
        force: bool,
    ) -> std::io::Result<()> {
        if self.live {
            let lines = live_lines(frame);
            if self.drawn > 0 {
                // Back to the first line of the previous frame, and clear everything below it.
                write!(out, "\x1b[{}F\x1b[J", self.drawn)?;
            }
            for line in &lines {
                writeln!(out, "{line}")?;
            }
            self.drawn = lines.len();
        } else {
            self.frames += 1;
            if force || self.frames >= plain_every {
                self.frames = 0;
                writeln!(out, "{}", plain_line(frame))?;
            }
        }
        out.flush()
    }
}

fn phase_text(phase: &Phase) -> String {
    match phase {
        Phase::Writing(elapsed, total) => format!(
            "writing {:>4.1} s of {} s",
            elapsed.as_secs_f64(),
            total.as_secs()
        ),
        Phase::Draining => "writes done; finishing retries".to_owned(),
    }
}

fn live_lines(frame: &Frame<'_>) -> Vec<String> {
    let s = frame.snapshot;
    let r = &frame.receiver;
    let mut lines = vec![
        format!(
            "  {} · {} writes",
            phase_text(&frame.phase),
            frame.writes.total()
        ),
        format!(
            "  last write  {}",
            frame.last_write.map_or("-", |done| done.action.as_str())
        ),
        format!(
            "              → {}",
            frame.last_write.map_or("-", |done| done.expect)
        ),
        format!(
            "  outbox      {} changes captured · {} waiting for dispatch",
            s.changes, s.backlog
        ),
        format!(
            "  deliveries  {} succeeded · {} in flight · {} pending · {} awaiting retry",
            s.succeeded, s.in_flight, s.pending, s.awaiting_retry
        ),
        format!("              {} skipped · {} failed", s.skipped, s.failed),
        format!(
            "  attempts    {} HTTP requests, {} of them retries",
            s.attempts, s.retries
        ),
        format!(
            "  receiver    {} verified · {} unverified · {} duplicate webhook-ids",
            r.verified, r.unverified, r.duplicates
        ),
        "  receiver's last requests:".to_owned(),
    ];
    lines.extend(frame.events.iter().map(event_line));
    lines.into_iter().map(clip).collect()
}

fn plain_line(frame: &Frame<'_>) -> String {
    let s = frame.snapshot;
    let r = &frame.receiver;
    format!(
        "  [{}] writes {} | outbox backlog {} | deliveries: {} succeeded, {} in flight, {} pending, \
         {} awaiting retry, {} skipped, {} failed | attempts {} ({} retries) | receiver: {} verified, \
         {} unverified",
        phase_text(&frame.phase),
        frame.writes.total(),
        s.backlog,
        s.succeeded,
        s.in_flight,
        s.pending,
        s.awaiting_retry,
        s.skipped,
        s.failed,
        s.attempts,
        s.retries,
        r.verified,
        r.unverified
    )
}
