//! What operators do to deliveries and subscriptions: retry, replay, resend, cancel, pause, resume,
//! disable, enable, reset an endpoint's circuit. One entry point, [`act`], used by the command line,
//! the console and its API alike.
//!
//! Every action names its project (an operator acting on project A never touches B), runs in one
//! transaction with the AuditEvent that records it (who, what, on what, with what result), and wakes
//! the workers when it makes deliveries due.

use super::control::ControlError;
use crate::audit::{self, OperatorAgent};
use crate::capture::{self, Interaction, StoreError, WriteContext};
use crate::delivery::auto_disable;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Who acts: named in the AuditEvent of each action and as the author of the Subscription versions
/// that disable and enable write.
#[derive(Debug, Clone)]
pub struct Actor {
    /// A console token's name, or the command line's user.
    pub name: String,
    /// The console token, when the action came through the console or its API.
    pub token_id: Option<Uuid>,
    /// `operator` (tokens) or `command line`.
    pub role: String,
}

impl Actor {
    /// The command line's user (`$USER`, else `unknown`).
    pub fn command_line() -> Actor {
        Actor {
            name: std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned()),
            token_id: None,
            role: "command line".to_owned(),
        }
    }

    fn author(&self) -> String {
        match self.token_id {
            Some(token) => format!("fhir-outbox console token {} ({token})", self.name),
            None => format!("fhir-outbox command line ({})", self.name),
        }
    }
}

/// Which failed deliveries to retry. Besides failed ones, every scope takes the deliveries skipped
/// because the endpoint was refused by the outbound URL check (`http`, a private address, before
/// the allow-unsafe-outbound setting was turned on).
#[derive(Debug, Clone)]
pub enum RetryScope {
    /// One delivery (failed, skipped or cancelled).
    Delivery(i64),
    /// Every failed delivery of a subscription.
    Subscription(String),
    /// Every failed delivery of the project whose change was made since.
    FailedSince(DateTime<Utc>),
}

/// Which pending deliveries to cancel.
#[derive(Debug, Clone)]
pub enum CancelScope {
    /// One pending delivery.
    Delivery(i64),
    /// Every pending delivery of a subscription (a dead endpoint's backlog).
    Subscription(String),
}

/// An operator action on one project.
#[derive(Debug, Clone)]
pub enum Action {
    /// Failed deliveries back to pending with a fresh attempt budget, same `webhook-id`.
    Retry(RetryScope),
    /// A finished delivery (succeeded, failed, skipped or cancelled) sent again: its own version,
    /// its `webhook-id`, as a new attempt, even if the resource changed or was deleted since.
    Replay(i64),
    /// A resource's current version sent again (Medplum's `$resend`), to every subscription or one.
    Resend {
        /// The resource's type.
        resource_type: String,
        /// Its id.
        id: String,
        /// Only this subscription.
        subscription: Option<String>,
        /// `update` (with the previous version) or `create`.
        interaction: Interaction,
    },
    /// Pending deliveries to `cancelled`: never sent (they can be replayed).
    Cancel(CancelScope),
    /// The subscription's deliveries wait until it is resumed.
    Pause(String),
    /// The waiting deliveries go out.
    Resume(String),
    /// The subscription's `status` to `off` (a new version): its pending deliveries are skipped.
    Disable(String),
    /// The subscription's `status` back to `active`, its `error` and final-failure count cleared.
    Enable(String),
    /// An endpoint's circuit closed now; `endpoint` may be any URL of it.
    ResetEndpoint(String),
}

impl Action {
    /// The action's name: the AuditEvent subtype code and the API's path segment.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Retry(_) => "retry",
            Action::Replay(_) => "replay",
            Action::Resend { .. } => "resend",
            Action::Cancel(_) => "cancel",
            Action::Pause(_) => "pause",
            Action::Resume(_) => "resume",
            Action::Disable(_) => "disable",
            Action::Enable(_) => "enable",
            Action::ResetEndpoint(_) => "reset-endpoint",
        }
    }
}

/// What an action did.
#[derive(Debug, Clone, Serialize)]
pub struct ActionResult {
    /// The action's name.
    pub action: &'static str,
    /// One sentence: what changed (`cancelled 46 pending deliveries of Subscription/s`), or why
    /// nothing did (`Subscription/s was already paused`).
    pub summary: String,
    /// Whether anything changed.
    pub changed: bool,
    /// The deliveries it changed (retry, replay, cancel).
    pub deliveries: Vec<i64>,
    /// The outbox position of a resend.
    pub outbox_seq: Option<i64>,
    /// The AuditEvent that records it.
    pub audit_event_id: String,
}

/// Performs `action` on `project` as `actor`, with its AuditEvent, in one transaction. An action
/// that names nothing (an unknown delivery, subscription or endpoint) is an error and records
/// nothing; an action with nothing to do (pausing a paused subscription) is recorded.
pub async fn act(
    pool: &PgPool,
    project: Uuid,
    actor: &Actor,
    action: &Action,
) -> Result<ActionResult, ControlError> {
    let mut tx = pool.begin().await?;
    let done = perform(&mut tx, project, actor, action).await?;
    let at = Utc::now();
    let agent = OperatorAgent {
        name: &actor.name,
        token_id: actor.token_id,
        role: &actor.role,
    };
    let mut entities = done.entities;
    entities.extend(done.deliveries.iter().take(100).map(|id| {
        json!({ "what": { "identifier": { "system": audit::DELIVERY_SYSTEM, "value": id.to_string() } } })
    }));
    let event = audit::operator_action_event(action.name(), &agent, entities, &done.summary, at);
    let context = WriteContext {
        author: Some(actor.author()),
        ..WriteContext::default()
    };
    let written = capture::create(&mut *tx, project, &event, &context).await?;
    if done.wake_workers {
        sqlx::query!("SELECT pg_notify('fhir_outbox_delivery', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let cancelled = if matches!(action, Action::Cancel(_)) {
        done.deliveries.len()
    } else {
        0
    };
    crate::metrics::operator_action(action.name(), cancelled);
    let audit_event_id = written
        .resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    tracing::info!(action = action.name(), %project, actor = %actor.name,
        token = ?actor.token_id, audit_event = %audit_event_id, "operator action: {}", done.summary);
    Ok(ActionResult {
        action: action.name(),
        changed: done.changed,
        summary: done.summary,
        deliveries: done.deliveries,
        outbox_seq: done.outbox_seq,
        audit_event_id,
    })
}

struct Done {
    summary: String,
    changed: bool,
    deliveries: Vec<i64>,
    outbox_seq: Option<i64>,
    entities: Vec<Value>,
    wake_workers: bool,
}

impl Done {
    fn new(summary: String, changed: bool, entities: Vec<Value>) -> Done {
        Done {
            summary,
            changed,
            deliveries: Vec::new(),
            outbox_seq: None,
            entities,
            wake_workers: false,
        }
    }
}

fn entity(resource_type: &str, id: &str) -> Value {
    json!({ "what": { "reference": format!("{resource_type}/{id}") },
            "role": audit::entity_role(resource_type) })
}

/// `1 delivery`, `3 deliveries`.
fn deliveries(count: usize, adjective: &str) -> String {
    let noun = if count == 1 { "delivery" } else { "deliveries" };
    format!("{count} {adjective}{noun}")
}

async fn perform(
    conn: &mut PgConnection,
    project: Uuid,
    actor: &Actor,
    action: &Action,
) -> Result<Done, ControlError> {
    match action {
        Action::Retry(scope) => retry(conn, project, scope).await,
        Action::Replay(delivery) => replay(conn, project, *delivery).await,
        Action::Resend {
            resource_type,
            id,
            subscription,
            interaction,
        } => {
            resend(
                conn,
                project,
                resource_type,
                id,
                subscription.as_deref(),
                *interaction,
            )
            .await
        }
        Action::Cancel(scope) => cancel(conn, project, actor, scope).await,
        Action::Pause(subscription) => pause(conn, project, subscription).await,
        Action::Resume(subscription) => resume(conn, project, subscription).await,
        Action::Disable(subscription) => {
            set_status(conn, project, actor, subscription, false).await
        }
        Action::Enable(subscription) => set_status(conn, project, actor, subscription, true).await,
        Action::ResetEndpoint(endpoint) => reset_endpoint(conn, project, endpoint).await,
    }
}

async fn retry(
    conn: &mut PgConnection,
    project: Uuid,
    scope: &RetryScope,
) -> Result<Done, ControlError> {
    let (delivery, subscription, since) = match scope {
        RetryScope::Delivery(id) => (Some(*id), None, None),
        RetryScope::Subscription(id) => (None, Some(id.as_str()), None),
        RetryScope::FailedSince(at) => (None, None, Some(*at)),
    };
    let ids = sqlx::query_scalar!(
        "UPDATE fhir_outbox.delivery
         SET state = 'pending', next_attempt_at = now(), attempts = 0, preamble_failures = 0, claims = 0,
             finished_at = NULL, reason = 'retried by an operator', replay = false
         WHERE project_id = $1
           AND (state = 'failed'
                OR (state IN ('skipped', 'cancelled') AND $2::bigint IS NOT NULL)
                OR (state = 'skipped' AND starts_with(reason, $5)))
           AND ($2::bigint IS NULL OR id = $2)
           AND ($3::text IS NULL OR subscription_id = $3)
           AND ($4::timestamptz IS NULL OR changed_at >= $4)
         RETURNING id AS \"id!\"",
        project,
        delivery,
        subscription,
        since,
        crate::dispatch::matching::ENDPOINT_REFUSED
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut entities = Vec::new();
    let target = match scope {
        RetryScope::Delivery(id) => {
            if ids.is_empty() {
                let state = delivery_state(conn, project, *id).await?;
                return Ok(Done::new(
                    format!(
                        "delivery {id} is {state}: only a failed, skipped or cancelled delivery can be retried"
                    ),
                    false,
                    Vec::new(),
                ));
            }
            format!("delivery {id}")
        }
        RetryScope::Subscription(subscription) => {
            require_known_subscription(conn, project, subscription).await?;
            entities.push(entity("Subscription", subscription));
            format!("the failed deliveries of Subscription/{subscription}")
        }
        RetryScope::FailedSince(at) => format!("the deliveries failed since {}", at.to_rfc3339()),
    };
    let summary = if ids.is_empty() {
        format!("nothing to retry among {target}")
    } else {
        format!("retried {} ({target})", deliveries(ids.len(), ""))
    };
    let mut done = Done::new(summary, !ids.is_empty(), entities);
    done.wake_workers = !ids.is_empty();
    done.deliveries = ids;
    Ok(done)
}

/// The state of a delivery of the project, or `UnknownDelivery`.
async fn delivery_state(
    conn: &mut PgConnection,
    project: Uuid,
    id: i64,
) -> Result<String, ControlError> {
    sqlx::query_scalar!(
        r#"SELECT state AS "state!" FROM fhir_outbox.delivery WHERE project_id = $1 AND id = $2"#,
        project,
        id
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ControlError::UnknownDelivery(id))
}

async fn replay(conn: &mut PgConnection, project: Uuid, id: i64) -> Result<Done, ControlError> {
    let replayed = sqlx::query!(
        "UPDATE fhir_outbox.delivery
         SET state = 'pending', next_attempt_at = now(), attempts = 0, preamble_failures = 0, claims = 0,
             finished_at = NULL, reason = 'replayed by an operator', replay = true
         WHERE project_id = $1 AND id = $2
           AND state IN ('succeeded', 'failed', 'skipped', 'cancelled')
         RETURNING subscription_id AS \"subscription_id!\", resource_type AS \"resource_type!\",
                   resource_id AS \"resource_id!\", version_id AS \"version_id!\"",
        project,
        id
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = replayed else {
        let state = delivery_state(conn, project, id).await?;
        return Ok(Done::new(
            format!("delivery {id} is {state}: only a finished delivery can be replayed"),
            false,
            Vec::new(),
        ));
    };
    let mut done = Done::new(
        format!(
            "replayed delivery {id} ({}/{} version {} to Subscription/{})",
            row.resource_type, row.resource_id, row.version_id, row.subscription_id
        ),
        true,
        vec![
            entity("Subscription", &row.subscription_id),
            entity(&row.resource_type, &row.resource_id),
        ],
    );
    done.deliveries = vec![id];
    done.wake_workers = true;
    Ok(done)
}

async fn cancel(
    conn: &mut PgConnection,
    project: Uuid,
    actor: &Actor,
    scope: &CancelScope,
) -> Result<Done, ControlError> {
    let (delivery, subscription) = match scope {
        CancelScope::Delivery(id) => (Some(*id), None),
        CancelScope::Subscription(subscription) => (None, Some(subscription.as_str())),
    };
    // Only pending deliveries: one in flight is being sent, and its outcome is recorded under its
    // lease.
    let ids = sqlx::query_scalar!(
        "UPDATE fhir_outbox.delivery
         SET state = 'cancelled', finished_at = now(), reason = $4
         WHERE project_id = $1 AND state = 'pending'
           AND ($2::bigint IS NULL OR id = $2)
           AND ($3::text IS NULL OR subscription_id = $3)
         RETURNING id AS \"id!\"",
        project,
        delivery,
        subscription,
        format!("cancelled by {}", actor.name)
    )
    .fetch_all(&mut *conn)
    .await?;
    let done = match scope {
        CancelScope::Delivery(id) => {
            if ids.is_empty() {
                let state = delivery_state(conn, project, *id).await?;
                return Ok(Done::new(
                    format!("delivery {id} is {state}: only a pending delivery can be cancelled"),
                    false,
                    Vec::new(),
                ));
            }
            Done::new(format!("cancelled delivery {id}"), true, Vec::new())
        }
        CancelScope::Subscription(subscription) => {
            require_known_subscription(conn, project, subscription).await?;
            Done::new(
                format!(
                    "cancelled {} of Subscription/{subscription}",
                    deliveries(ids.len(), "pending ")
                ),
                !ids.is_empty(),
                vec![entity("Subscription", subscription)],
            )
        }
    };
    Ok(Done {
        deliveries: ids,
        ..done
    })
}

async fn pause(
    conn: &mut PgConnection,
    project: Uuid,
    subscription: &str,
) -> Result<Done, ControlError> {
    require_subscription(conn, project, subscription).await?;
    let inserted = sqlx::query!(
        "INSERT INTO fhir_outbox.subscription_pause (project_id, subscription_id) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
        project,
        subscription
    )
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    let summary = if inserted {
        format!("paused Subscription/{subscription}")
    } else {
        format!("Subscription/{subscription} was already paused")
    };
    Ok(Done::new(
        summary,
        inserted,
        vec![entity("Subscription", subscription)],
    ))
}

async fn resume(
    conn: &mut PgConnection,
    project: Uuid,
    subscription: &str,
) -> Result<Done, ControlError> {
    require_known_subscription(conn, project, subscription).await?;
    let deleted = sqlx::query!(
        "DELETE FROM fhir_outbox.subscription_pause WHERE project_id = $1 AND subscription_id = $2",
        project,
        subscription
    )
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    let summary = if deleted {
        format!("resumed Subscription/{subscription}")
    } else {
        format!("Subscription/{subscription} was not paused")
    };
    let mut done = Done::new(summary, deleted, vec![entity("Subscription", subscription)]);
    done.wake_workers = deleted;
    Ok(done)
}

/// Disable (`status` off) or enable (`status` active, `error` removed, final failures forgotten)
/// a subscription, as a new version authored by the actor.
async fn set_status(
    conn: &mut PgConnection,
    project: Uuid,
    actor: &Actor,
    subscription: &str,
    enable: bool,
) -> Result<Done, ControlError> {
    let current = match capture::read(&mut *conn, project, "Subscription", subscription).await {
        Ok(current) => current,
        Err(StoreError::NotFound(_) | StoreError::Gone(_) | StoreError::InvalidId(_)) => {
            return Err(ControlError::UnknownSubscription(subscription.to_owned()));
        }
        Err(error) => return Err(error.into()),
    };
    let status = current.get("status").and_then(Value::as_str).unwrap_or("");
    let wanted = if enable { "active" } else { "off" };
    let entities = vec![entity("Subscription", subscription)];
    if status == wanted && (!enable || current.get("error").is_none()) {
        return Ok(Done::new(
            format!("Subscription/{subscription} was already {wanted}"),
            false,
            entities,
        ));
    }
    let mut changed = current.clone();
    changed["status"] = json!(wanted);
    if enable {
        if let Some(object) = changed.as_object_mut() {
            object.remove("error");
        }
    }
    let version = current
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .and_then(|version| version.parse::<i64>().ok());
    let context = WriteContext {
        author: Some(actor.author()),
        ..WriteContext::default()
    };
    capture::update(
        &mut *conn,
        project,
        "Subscription",
        subscription,
        &changed,
        version,
        &context,
    )
    .await?;
    if enable {
        auto_disable::clear(conn, &[(project, subscription)]).await?;
    }
    let verb = if enable { "enabled" } else { "disabled" };
    let mut done = Done::new(
        format!("{verb} Subscription/{subscription} (status {status} → {wanted})"),
        true,
        entities,
    );
    done.wake_workers = enable;
    Ok(done)
}

async fn resend(
    conn: &mut PgConnection,
    project: Uuid,
    resource_type: &str,
    id: &str,
    subscription: Option<&str>,
    interaction: Interaction,
) -> Result<Done, ControlError> {
    let reference = format!("{resource_type}/{id}");
    if let Some(subscription) = subscription {
        require_subscription(conn, project, subscription).await?;
    }
    if interaction == Interaction::Delete {
        return Err(ControlError::Resend {
            reference,
            reason: "only create and update can be resent".into(),
        });
    }
    let history = match capture::history(&mut *conn, project, resource_type, id).await {
        Ok(history) => history,
        Err(StoreError::InvalidId(_) | StoreError::NotFound(_)) => Vec::new(),
        Err(error) => return Err(error.into()),
    };
    let Some(current) = history.first() else {
        return Err(ControlError::Resend {
            reference,
            reason: "it does not exist in this project".into(),
        });
    };
    if current.deleted {
        return Err(ControlError::Resend {
            reference,
            reason: "it is deleted".into(),
        });
    }
    let previous = match interaction {
        Interaction::Update => history
            .get(1)
            .filter(|entry| !entry.deleted)
            .map(|entry| entry.version_id),
        _ => None,
    };
    let seq = sqlx::query_scalar!(
        "INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id,
             previous_version_id, interaction, changed_at, request_id, trace_id, resend,
             resend_subscription_id)
         VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp(), gen_random_uuid()::text,
                 gen_random_uuid()::text, true, $7)
         RETURNING seq",
        project,
        resource_type,
        id,
        current.version_id,
        previous,
        interaction.as_str(),
        subscription
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query!("SELECT pg_notify('fhir_outbox_change', '')")
        .execute(&mut *conn)
        .await?;
    let mut entities = vec![entity(resource_type, id)];
    let to = match subscription {
        Some(subscription) => {
            entities.push(entity("Subscription", subscription));
            format!("Subscription/{subscription}")
        }
        None => "every subscription".to_owned(),
    };
    let mut done = Done::new(
        format!(
            "resent {reference} version {} to {to} as {} (outbox row {seq})",
            current.version_id,
            interaction.as_str()
        ),
        true,
        entities,
    );
    done.outbox_seq = Some(seq);
    Ok(done)
}

async fn reset_endpoint(
    conn: &mut PgConnection,
    project: Uuid,
    endpoint: &str,
) -> Result<Done, ControlError> {
    let origin = sqlx::query_scalar!(
        r#"SELECT endpoint AS "endpoint!" FROM fhir_outbox.endpoint_health
           WHERE project_id = $1 AND endpoint = fhir_outbox.endpoint_origin($2)"#,
        project,
        endpoint
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| ControlError::UnknownEndpoint(endpoint.to_owned()))?;
    let reset = sqlx::query_scalar!(
        r#"SELECT fhir_outbox.reset_endpoint($1, $2) AS "reset!""#,
        project,
        endpoint
    )
    .fetch_one(&mut *conn)
    .await?;
    let summary = if reset {
        format!("closed the circuit of {origin}")
    } else {
        format!("the circuit of {origin} was closed already")
    };
    let mut done = Done::new(
        summary,
        reset,
        vec![json!({ "what": { "display": origin } })],
    );
    done.wake_workers = reset;
    Ok(done)
}

/// Fails unless the subscription exists in the project, or did and still has deliveries or a
/// pause (a deleted subscription's deliveries can still be listed, retried, cancelled or resumed).
pub async fn require_known_subscription(
    conn: &mut PgConnection,
    project: Uuid,
    subscription: &str,
) -> Result<(), ControlError> {
    match require_subscription(conn, project, subscription).await {
        Err(ControlError::UnknownSubscription(_)) => {}
        other => return other,
    }
    let known = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.delivery
                          WHERE project_id = $1 AND subscription_id = $2)
               OR EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause
                          WHERE project_id = $1 AND subscription_id = $2) AS "known!""#,
        project,
        subscription
    )
    .fetch_one(&mut *conn)
    .await?;
    if known {
        Ok(())
    } else {
        Err(ControlError::UnknownSubscription(subscription.to_owned()))
    }
}

async fn require_subscription(
    conn: &mut PgConnection,
    project: Uuid,
    subscription: &str,
) -> Result<(), ControlError> {
    // A query, not `read_resource`: its "not found" is an exception, which would abort the
    // action's transaction.
    let exists = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.resource
                          WHERE project_id = $1 AND resource_type = 'Subscription' AND id = $2
                            AND NOT deleted) AS "exists!""#,
        project,
        subscription
    )
    .fetch_one(&mut *conn)
    .await?;
    if exists {
        Ok(())
    } else {
        Err(ControlError::UnknownSubscription(subscription.to_owned()))
    }
}
