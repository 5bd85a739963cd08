//! The recorder: writes decided completions in batches, and decides nothing. One transaction per
//! batch: the fenced completions (`queries::complete`: a finished delivery moves to history, one to
//! retry is rescheduled) with, for those whose lease still held, the stored AuditEvents and the
//! attempt rows, in one statement; then the auto-disable bookkeeping and the endpoints' circuits. A
//! batch that fails is written again one delivery at a time. Then metrics and logged AuditEvents.

use super::auto_disable::{self, Trigger};
use super::delivery_span;
use super::outcome::{Decision, FinalFailure};
use super::policy::{self, CircuitBreaker, EndpointAllowance, EndpointSignal};
use super::preamble::Target;
use super::queries::{self, AttemptRecord, CircuitTransition, ClaimedDelivery, EndpointResult};
use super::state::DeliveryState;
use crate::audit::{self, Outcome, StoredAuditEvent, TransmitAttempt};
use crate::capture::{StoreError, WriteContext};
use chrono::Utc;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;
use uuid::Uuid;

/// Most executions recorded in one transaction.
pub(super) const MAX_RECORD_BATCH: usize = 1000;

/// An executed and decided delivery, waiting to be recorded.
pub(super) struct Executed {
    pub delivery: ClaimedDelivery,
    pub decision: Decision,
    /// For an attempt: what its AuditEvents need.
    pub audit: Option<AuditInput>,
    /// When its execution started (for the metrics).
    pub clock: Instant,
}

/// What the AuditEvents of an attempt need besides its record.
pub(super) struct AuditInput {
    /// The subscription, compiled for its batch.
    pub target: Arc<Target>,
    /// The resource's display.
    pub resource_display: Option<String>,
    /// For a bot run: the Bot, its input, and its output (or error) text.
    pub bot: Option<BotRun>,
}

/// A bot run, for its `execute` AuditEvent.
pub(super) struct BotRun {
    pub bot: Value,
    pub input: Value,
    pub output: String,
}

/// What recording one execution writes.
struct Record {
    delivery: ClaimedDelivery,
    clock: Instant,
    decision: Decision,
    /// The attempt's AuditEvents (with `decision.attempt`).
    events: Events,
}

/// The AuditEvents of an attempt and its auto-disable triggers.
#[derive(Default)]
struct Events {
    /// The AuditEvent to store, if its destinations include `resource`.
    stored: Option<StoredAuditEvent>,
    /// The AuditEvent to log (JSON), if its destinations include `log`.
    logged: Option<String>,
    auto_disable: Vec<Trigger>,
}

/// What recording a batch did.
#[derive(Default)]
pub(super) struct Recorded {
    /// The lease tokens of every execution given (recorded or not: this process is done with them).
    pub leases: Vec<Uuid>,
    /// Whether the batch may have changed when something is next due: it rescheduled a delivery,
    /// or a circuit changed state (an opening schedules its probe).
    pub schedule_changed: bool,
}

/// Writes completions.
pub(super) struct Recorder {
    pub pool: PgPool,
    /// Write AuditEvents whose destination includes `log` as JSON log lines.
    pub log_audit_events: bool,
    /// Bytes of a bot's output kept in a stored AuditEvent.
    pub bot_output_limit_resource: usize,
    /// Bytes of a bot's output kept in a logged AuditEvent.
    pub bot_output_limit_log: usize,
    /// The rules of the endpoints' circuits.
    pub circuit: CircuitBreaker,
    /// How endpoints' allowances grow and fall back.
    pub allowance: EndpointAllowance,
    /// An answer within this is fast (see `policy::is_fast_answer`).
    pub fast_answer: Duration,
}

impl Recorder {
    /// Records executions: one transaction for the batch; if it fails, one per execution, so a row
    /// that cannot be written does not hold back the others. An execution that cannot be recorded
    /// at all is retried when its lease expires. Then metrics and logged AuditEvents.
    pub(super) async fn record(&self, executed: Vec<Executed>) -> Recorded {
        if executed.is_empty() {
            return Recorded::default();
        }
        let now = Utc::now();
        let records: Vec<Record> = executed
            .into_iter()
            .map(|executed| self.record_of(executed, now))
            .collect();
        let unrecorded = |record: &Record, error: &StoreError| {
            delivery_span(&record.delivery).in_scope(|| {
                tracing::warn!(%error, "cannot record the delivery outcome; it will be retried when its lease expires")
            })
        };
        let mut transitions = Vec::new();
        let mut first = self.write(&records).await;
        if first.as_ref().is_err_and(is_missing_partition) {
            // The history has no partition for now: upkeep has not run for days (see
            // `retention::DAYS_AHEAD`). Create them and write again rather than fail every batch.
            match crate::operations::retention::ensure_partitions(&self.pool).await {
                Ok(created) => {
                    tracing::warn!(
                        ?created,
                        "the history had no partition for these outcomes; created them"
                    )
                }
                Err(error) => tracing::error!(%error, "cannot create the history partitions"),
            }
            first = self.write(&records).await;
        }
        let written = match first {
            Ok((written, changed)) => {
                transitions = changed;
                written
            }
            Err(error) if records.len() == 1 => {
                unrecorded(&records[0], &error);
                HashSet::new()
            }
            Err(error) => {
                tracing::warn!(%error, deliveries = records.len(), "cannot record a batch of outcomes; recording them one by one");
                let mut written = HashSet::new();
                for record in &records {
                    match self.write(std::slice::from_ref(record)).await {
                        Ok((one, changed)) => {
                            written.extend(one);
                            transitions.extend(changed);
                        }
                        Err(error) => unrecorded(record, &error),
                    }
                }
                written
            }
        };
        for transition in &transitions {
            log_transition(transition);
        }
        let schedule_changed = !transitions.is_empty()
            || records
                .iter()
                .any(|record| record.decision.completion.state == DeliveryState::Pending);
        let mut leases = Vec::with_capacity(records.len());
        for record in records {
            let Record {
                delivery,
                clock,
                decision,
                events,
            } = record;
            leases.push(delivery.lease_token);
            if !written.contains(&delivery.id) {
                continue;
            }
            let state = decision.completion.state;
            if let Some(attempt) = &decision.attempt {
                crate::metrics::attempt(
                    attempt.succeeded,
                    Duration::from_millis(attempt.duration_ms.max(0) as u64),
                );
                if self.log_audit_events
                    && let Some(event) = &events.logged
                {
                    delivery_span(&delivery)
                        .in_scope(|| audit::application::log_audit_event(event, true));
                }
            }
            let succeeded = state == DeliveryState::Succeeded;
            let first = delivery.claims == 1;
            let since_change = (now - delivery.changed_at).to_std().unwrap_or_default();
            crate::metrics::execution(
                succeeded,
                clock.elapsed(),
                first.then(|| since_change.saturating_sub(clock.elapsed())),
                succeeded.then_some(since_change),
            );
            if state.is_final() {
                crate::metrics::finished(state);
            }
            if state == DeliveryState::Failed {
                delivery_span(&delivery).in_scope(|| log_given_up(&delivery, &decision));
            }
        }
        Recorded {
            leases,
            schedule_changed,
        }
    }

    /// What recording an execution writes: its decision and, for an attempt, its AuditEvents.
    /// Reads nothing.
    fn record_of(&self, executed: Executed, now: chrono::DateTime<Utc>) -> Record {
        let Executed {
            delivery,
            decision,
            audit,
            clock,
        } = executed;
        let events = match (&decision.attempt, audit) {
            (Some(attempt), Some(audit)) => self.audit_events(&delivery, attempt, audit, now),
            _ => Events::default(),
        };
        Record {
            delivery,
            clock,
            decision,
            events,
        }
    }

    /// The AuditEvents of an attempt: a rest-hook attempt's `transmit` event goes where the
    /// subscription says; a bot run's `execute` event where the Bot says, when its trigger fires.
    fn audit_events(
        &self,
        delivery: &ClaimedDelivery,
        record: &AttemptRecord,
        input: AuditInput,
        now: chrono::DateTime<Utc>,
    ) -> Events {
        let outcome = if record.succeeded {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        };
        let target = &input.target;
        let subscription = target.content();
        let (stored, logged) = match &input.bot {
            None => {
                let outcome_desc = match (&record.status, &record.error) {
                    (Some(status), _) => {
                        format!("Attempt {} received status {status}", delivery.attempts)
                    }
                    (None, error) => format!(
                        "Attempt {} received error {}",
                        delivery.attempts,
                        error.as_deref().unwrap_or_default()
                    ),
                };
                let attempt = TransmitAttempt {
                    subscription: &target.audit_subscription,
                    resource_type: &delivery.resource_type,
                    resource_id: &delivery.resource_id,
                    resource_display: input.resource_display.as_deref(),
                    started: delivery.changed_at,
                    ended: now,
                    outcome,
                    outcome_desc: &outcome_desc,
                    request_id: &delivery.request_id,
                    trace_id: &delivery.trace_id,
                    redact: target.redact,
                };
                let destinations = target.audit_destinations;
                (
                    destinations
                        .resource
                        .then(|| StoredAuditEvent::transmit(&attempt, delivery.project_id, now)),
                    destinations.log.then(|| audit::transmit_event(&attempt)),
                )
            }
            Some(run) if audit::bot::triggered(&run.bot, outcome, &run.output) => {
                let (resource, log) = audit::bot::destinations(&run.bot);
                let bot_input = run.input.get("deletedResource").unwrap_or(&run.input);
                let event = |limit: usize| {
                    audit::bot::execute_event(&audit::bot::BotRun {
                        bot: &run.bot,
                        input: bot_input,
                        subscription: Some(subscription),
                        requester: bot_input.pointer("/meta/author"),
                        started: record.started_at,
                        ended: now,
                        outcome,
                        outcome_desc: audit::bot::tail(&run.output, limit),
                        request_id: &delivery.request_id,
                        trace_id: &delivery.trace_id,
                        redact: target.redact,
                    })
                };
                (
                    resource.then(|| {
                        StoredAuditEvent::new(
                            event(self.bot_output_limit_resource),
                            delivery.project_id,
                            now,
                        )
                    }),
                    log.then(|| event(self.bot_output_limit_log).to_string()),
                )
            }
            Some(_) => (None, None),
        };
        Events {
            stored,
            logged,
            auto_disable: target.auto_disable.clone(),
        }
    }

    /// Writes records in one transaction: the fenced completions with, for those whose lease still
    /// held, the stored AuditEvents and the attempt rows (one statement), then the auto-disable
    /// bookkeeping and the endpoints' circuits. Returns the ids of the deliveries written (the
    /// others lost their lease and nothing of them was written) and the circuits that changed state.
    async fn write(
        &self,
        records: &[Record],
    ) -> Result<(HashSet<i64>, Vec<CircuitTransition>), StoreError> {
        let mut tx = self.pool.begin_with(queries::RECORD_BEGIN).await?;
        let completions: Vec<_> = records
            .iter()
            .map(|record| {
                let delivery = &record.delivery;
                (
                    delivery.id,
                    delivery.lease_token,
                    &record.decision.completion,
                )
            })
            .collect();
        // Every attempt and stored AuditEvent of the batch goes with it: the statement keeps those
        // of the deliveries whose lease still held, and drops the others.
        let attempts: Vec<(i64, &AttemptRecord, Option<&str>)> = records
            .iter()
            .filter_map(|record| {
                let attempt = record.decision.attempt.as_ref()?;
                let event_id = record.events.stored.as_ref().map(|event| event.id.as_str());
                Some((record.delivery.id, attempt, event_id))
            })
            .collect();
        // Only an attempt has AuditEvents (`record_of`).
        let events: Vec<(i64, &StoredAuditEvent)> = records
            .iter()
            .filter_map(|record| Some((record.delivery.id, record.events.stored.as_ref()?)))
            .collect();
        let written: HashSet<i64> = queries::complete(&mut tx, &completions, &attempts, &events)
            .await?
            .into_iter()
            .collect();
        for record in records {
            if !written.contains(&record.delivery.id) {
                delivery_span(&record.delivery).in_scope(|| {
                    tracing::warn!(
                        "lease lost before completion (another worker took the delivery over); outcome discarded"
                    )
                });
            }
        }
        // Auto-disable bookkeeping after the attempts' own records (a success cleared the count in
        // the statement above), so that a disable is what the log shows last: a final failure adds
        // to the count (and may disable the subscription), a `410 Gone` disables it at once.
        for record in records {
            if record.decision.final_failure != FinalFailure::No
                && written.contains(&record.delivery.id)
            {
                track_final_failure(&mut tx, record)
                    .instrument(delivery_span(&record.delivery))
                    .await?;
            }
        }
        let results = endpoint_results(
            records
                .iter()
                .filter(|record| written.contains(&record.delivery.id)),
            self.fast_answer,
        );
        let transitions = if results.is_empty() {
            Vec::new()
        } else {
            queries::record_endpoint_results(
                &mut tx,
                &results,
                self.circuit.failures.min(i32::MAX as u32) as i32,
                &self.circuit.schedule(),
                self.allowance.bounds(),
            )
            .await?
        };
        tx.commit().await?;
        Ok((written, transitions))
    }
}

/// What recorded attempts say of their endpoints, in the order they were recorded: for each
/// endpoint, whether it answered healthily, the failures after its last healthy answer, and whether
/// every answer was fast (within `fast`: its allowance may grow). In key order (the order the
/// circuits are locked in).
fn endpoint_results<'a>(
    records: impl Iterator<Item = &'a Record>,
    fast: Duration,
) -> Vec<EndpointResult> {
    let mut results: BTreeMap<(Uuid, &str), EndpointResult> = BTreeMap::new();
    for record in records {
        let delivery = &record.delivery;
        let signal = record.decision.endpoint;
        if signal == EndpointSignal::Silent {
            continue;
        }
        let result = results
            .entry((delivery.project_id, delivery.endpoint.as_str()))
            .or_insert_with(|| EndpointResult {
                project_id: delivery.project_id,
                endpoint: delivery.endpoint.clone(),
                healthy: false,
                failures: 0,
                last_failure: None,
                fast: true,
            });
        result.fast &= record.decision.attempt.as_ref().is_some_and(|attempt| {
            policy::is_fast_answer(
                attempt.status.and_then(|status| u16::try_from(status).ok()),
                Duration::from_millis(attempt.duration_ms.max(0) as u64),
                fast,
            )
        });
        if signal == EndpointSignal::Healthy {
            result.healthy = true;
            result.failures = 0;
        } else {
            result.failures += 1;
            result.last_failure = record
                .decision
                .attempt
                .as_ref()
                .and_then(|attempt| attempt.error.clone());
        }
    }
    results.into_values().collect()
}

/// Each change of a circuit's state is one log line (the endpoint is scheme, host and port only:
/// no path, query or credentials) and counts in the metrics.
fn log_transition(transition: &CircuitTransition) {
    let CircuitTransition {
        project_id,
        endpoint,
        from,
        to,
        consecutive_failures,
        next_probe_at,
    } = transition;
    crate::metrics::circuit_transition(to);
    match to.as_str() {
        "open" => tracing::warn!(
            project = %project_id,
            endpoint,
            from = from.as_str(),
            consecutive_failures,
            next_probe_at = next_probe_at.map(|at| at.to_rfc3339()),
            "endpoint circuit opened: its deliveries wait until the probe"
        ),
        _ => tracing::info!(
            project = %project_id,
            endpoint,
            from = from.as_str(),
            to = to.as_str(),
            "endpoint circuit {to}"
        ),
    }
}

/// A delivery that was given up says so once, at `warn`, on one line with what an operator needs to
/// find it (the delivery, its `webhook-id`, subscription, resource and attempts) and why; never the
/// endpoint or headers (the reason names neither).
fn log_given_up(delivery: &ClaimedDelivery, decision: &Decision) {
    let completion = &decision.completion;
    let reason = completion
        .reason
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    tracing::warn!(
        delivery = delivery.id,
        webhook_id = %delivery.webhook_id,
        subscription = %delivery.subscription_id,
        resource = %format_args!("{}/{}", delivery.resource_type, delivery.resource_id),
        version = delivery.version_id,
        attempts = completion.attempts,
        last_status = completion.last_status,
        %reason,
        "delivery failed for good; no more attempts"
    );
}

/// A final failure counts towards auto-disable (and may disable the subscription); a `410 Gone`
/// disables it at once.
async fn track_final_failure(
    tx: &mut sqlx::PgConnection,
    record: &Record,
) -> Result<(), StoreError> {
    let delivery = &record.delivery;
    let message = match record.decision.final_failure {
        FinalFailure::No => None,
        FinalFailure::Gone => {
            Some("Automatically disabled: the endpoint answered 410 Gone".to_owned())
        }
        FinalFailure::Counts => {
            auto_disable::record_final_failure(
                tx,
                delivery.project_id,
                &delivery.subscription_id,
                &record.events.auto_disable,
                Utc::now(),
            )
            .await?
        }
    };
    if let Some(message) = message {
        let context = WriteContext {
            author: None,
            request_id: Some(delivery.request_id.clone()),
            trace_id: Some(delivery.trace_id.clone()),
        };
        auto_disable::disable(
            tx,
            delivery.project_id,
            &delivery.subscription_id,
            &message,
            &context,
        )
        .await?;
    }
    Ok(())
}

/// Whether a write failed because a history table has no partition for its time (PostgreSQL's
/// "no partition of relation … found for row", SQLSTATE 23514).
fn is_missing_partition(error: &StoreError) -> bool {
    match error {
        StoreError::Database(sqlx::Error::Database(error)) => {
            error.code().as_deref() == Some("23514") && error.message().starts_with("no partition")
        }
        _ => false,
    }
}
