//! Delivery: the rest-hook worker.
//!
//! A worker claims due deliveries in batches with `FOR UPDATE SKIP LOCKED`, each claim taking a lease
//! (a token and an expiry, renewed while the delivery is in this process). The claim statement also
//! reads what Medplum's preamble needs (is the subscription still active, the resource still there,
//! the version still current on a retry?), each subscription once per batch. Then the worker builds
//! each signed request and POSTs it, at most `concurrency` at once. Outcomes are recorded in batches by one recorder task: the
//! completions, fenced by their lease tokens, the attempt rows and the AuditEvents of a batch commit
//! in one transaction, so a worker whose lease expired (it was paused, or presumed dead) can never
//! overwrite a newer attempt. A batch that fails to commit is recorded again one delivery at a time,
//! so one bad row cannot hold the others back. A worker killed mid-delivery loses nothing: its leases
//! expire and another worker delivers.

pub mod auto_disable;
pub mod headers;
pub mod outbound;
pub mod policy;
mod queries;
pub mod signature;

use crate::audit::{self, Outcome, TransmitAttempt};
use crate::capture::{self, Interaction, StoreError, WriteContext};
use crate::subscription;
use chrono::Utc;
use policy::Backoff;
use queries::{AttemptRecord, ClaimedDelivery, Completion};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How a delivery worker works.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Requests in flight at once in this process.
    pub concurrency: usize,
    /// Deliveries claimed per claim query (at least `concurrency` are). Claimed deliveries wait in
    /// this process, leased, for a request slot; a new batch is claimed when fewer than half a batch
    /// wait. Larger batches cost the database less per delivery; smaller ones leave more of the
    /// backlog to other workers when receivers are slow.
    pub claim_batch: usize,
    /// How long a claim holds a delivery without renewal; an expired lease is claimed again.
    pub lease: Duration,
    /// How often to look for due work when no notification arrives.
    pub poll_interval: Duration,
    /// The retry schedule.
    pub backoff: Backoff,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for a whole request, response included.
    pub request_timeout: Duration,
    /// Bytes of the response body kept on the attempt record.
    pub response_body_limit: usize,
    /// On shutdown, time allowed for requests in flight before their deliveries are released.
    pub shutdown_grace: Duration,
    /// Allow `http` and non-public endpoints (tests, the demo).
    pub allow_unsafe_outbound: bool,
    /// Strip displays from AuditEvent references for every project.
    pub redact_audit_events: bool,
    /// Write AuditEvents whose destination includes `log` as JSON log lines.
    pub log_audit_events: bool,
    /// Auto-disable triggers (server setting; a project setting overrides them). Empty: off.
    pub auto_disable: Vec<auto_disable::Trigger>,
    /// Bytes of a bot's output kept in a stored AuditEvent (its end is kept).
    pub bot_output_limit_resource: usize,
    /// Bytes of a bot's output kept in a logged AuditEvent.
    pub bot_output_limit_log: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 10,
            claim_batch: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            response_body_limit: 4096,
            shutdown_grace: Duration::from_secs(30),
            allow_unsafe_outbound: false,
            redact_audit_events: false,
            log_audit_events: true,
            auto_disable: Vec::new(),
            bot_output_limit_resource: 10 * 1024,
            bot_output_limit_log: 10 * 1024,
        }
    }
}

/// Why a worker cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// What one execution of a delivery came to.
enum Execution {
    /// The preamble stopped it: no request, no AuditEvent (as Medplum), the reason kept on the row.
    Skipped(String),
    /// Nothing to send and nothing wrong (the endpoint was removed after matching).
    Done(String),
    /// Database trouble before any request: retried on the preamble's own budget.
    PreambleFailed(String),
    /// The subscription cannot be delivered as it stands (an invalid header): failed, no request.
    Refused(String),
    /// An HTTP attempt (or a refused connection).
    Attempted(Box<Attempt>),
}

struct Attempt {
    /// For a bot run: the Bot, its input, and its output (or error) text.
    bot: Option<BotRun>,
    subscription: Arc<Value>,
    resource_display: Option<String>,
    record: AttemptRecord,
    retry_after: Option<Duration>,
    max_attempts: u32,
    redact: bool,
    auto_disable: Vec<auto_disable::Trigger>,
}

struct BotRun {
    bot: Value,
    input: Value,
    output: String,
}

/// The delivery stage.
pub struct DeliveryWorker {
    pool: PgPool,
    config: DeliveryConfig,
    client: reqwest::Client,
    /// Lease tokens of the deliveries this process holds: claimed, in flight, or waiting to be
    /// recorded (renewed periodically, released on shutdown).
    leases: Mutex<HashSet<Uuid>>,
    /// The bot handlers the embedding application registered.
    bots: crate::bots::BotRegistry,
}

/// A claimed delivery whose preamble has run: what to do with it.
struct Job {
    delivery: ClaimedDelivery,
    /// The preamble's decision, or why it could not be made (database trouble).
    prepared: Result<Prepared, String>,
}

/// An executed delivery, waiting to be recorded.
struct Executed {
    delivery: ClaimedDelivery,
    execution: Execution,
    /// When its execution started (for the metrics).
    clock: Instant,
    /// Its log span, so that what the recorder logs about it carries the delivery's fields.
    span: tracing::Span,
}

/// What recording one execution writes.
struct Record {
    delivery: ClaimedDelivery,
    clock: Instant,
    span: tracing::Span,
    completion: Completion,
    attempt: Option<AttemptWrite>,
}

/// An HTTP attempt (or bot run) as recorded: its log row and its AuditEvents.
struct AttemptWrite {
    record: AttemptRecord,
    /// The AuditEvent to store, if its destinations include `resource`.
    stored_event: Option<Value>,
    /// The AuditEvent to log, if its destinations include `log`.
    logged_event: Option<Value>,
    auto_disable: Vec<auto_disable::Trigger>,
}

/// Most executions recorded in one transaction.
const MAX_RECORD_BATCH: usize = 1000;

impl DeliveryWorker {
    /// A worker on this pool.
    pub fn new(pool: PgPool, config: DeliveryConfig) -> Result<DeliveryWorker, DeliveryError> {
        let client = outbound::client(
            config.allow_unsafe_outbound,
            config.connect_timeout,
            config.request_timeout,
        )?;
        Ok(DeliveryWorker {
            pool,
            config,
            client,
            leases: Mutex::new(HashSet::new()),
            bots: crate::bots::BotRegistry::new(),
        })
    }

    /// The bot handlers that `Bot/<id>` endpoints run (see [`crate::bots`]).
    pub fn with_bots(mut self, bots: crate::bots::BotRegistry) -> Self {
        self.bots = bots;
        self
    }

    fn lease_seconds(&self) -> f64 {
        self.config.lease.as_secs_f64()
    }

    /// Deliveries claimed per claim query.
    fn claim_size(&self) -> usize {
        self.config.claim_batch.max(self.config.concurrency).max(1)
    }

    /// Claims up to `concurrency` due deliveries, executes them all and records them as one batch;
    /// returns how many. For tests and tools; `run` is the long-running loop.
    pub async fn deliver_once(self: &Arc<Self>) -> Result<usize, sqlx::Error> {
        let jobs = self.claim(self.config.concurrency).await?;
        let count = jobs.len();
        let mut tasks = tokio::task::JoinSet::new();
        for job in jobs {
            let worker = self.clone();
            tasks.spawn(async move { worker.execute(job).await });
        }
        let mut executed = Vec::with_capacity(count);
        while let Some(done) = tasks.join_next().await {
            executed.extend(done.ok());
        }
        self.record(executed).await;
        Ok(count)
    }

    /// Claims up to `limit` due deliveries and runs the preamble of the batch (its reads came with
    /// the claim).
    async fn claim(&self, limit: usize) -> Result<Vec<Job>, sqlx::Error> {
        let claimed = {
            let mut conn = self.pool.acquire().await?;
            queries::claim(&mut conn, limit as i64, self.lease_seconds()).await?
        };
        self.leases
            .lock()
            .expect("lease lock")
            .extend(claimed.iter().map(|claimed| claimed.delivery.lease_token));
        let mut subscriptions: HashMap<(Uuid, String), queries::SubscriptionNow> = HashMap::new();
        let mut jobs = Vec::with_capacity(claimed.len());
        for claimed in claimed {
            let delivery = claimed.delivery;
            let key = (delivery.project_id, delivery.subscription_id.clone());
            if let Some(now) = claimed.subscription {
                subscriptions.insert(key.clone(), now);
            }
            let prepared = self
                .prepare(&delivery, subscriptions.get(&key), claimed.resource)
                .await
                .map_err(|error| error.to_string());
            jobs.push(Job { delivery, prepared });
        }
        Ok(jobs)
    }

    /// Runs until `shutdown`: claims due deliveries in batches whenever fewer than half a batch
    /// wait, starts them as request slots free up, records outcomes in batches (a recorder task),
    /// wakes on LISTEN `fhir_outbox_delivery` or every poll interval, renews leases, and on shutdown
    /// stops claiming, lets requests in flight finish within the grace period, records them, and
    /// releases the rest.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (wake, woken) = watch::channel(0u64);
        let listener = tokio::spawn(crate::db::listen(
            self.pool.clone(),
            "fhir_outbox_delivery",
            wake,
            shutdown.clone(),
        ));
        let renewer = tokio::spawn(self.clone().renew_leases(shutdown.clone()));
        let claim_size = self.claim_size();
        // A bounded queue: when recording falls behind, requests wait (holding their slots) instead
        // of piling up executed-but-unrecorded work, which a crash would send again.
        let (executed, to_record) = mpsc::channel::<Executed>(claim_size);
        let recorder = tokio::spawn(self.clone().record_continuously(to_record));
        // Claiming runs ahead of the requests in its own task, so that a claim's round trips overlap
        // the requests of the previous batch.
        let (to_start, mut claimed) = mpsc::channel::<Job>(claim_size);
        let claimer = tokio::spawn(self.clone().claim_continuously(
            to_start,
            woken,
            shutdown.clone(),
        ));
        let slots = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let job = tokio::select! {
                job = claimed.recv() => job,
                _ = shutdown.cancelled() => None,
            };
            let Some(job) = job else { break };
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                // The job is dropped; its lease is released below.
                _ = shutdown.cancelled() => break,
            };
            while tasks.try_join_next().is_some() {}
            let worker = self.clone();
            let executed = executed.clone();
            tasks.spawn(async move {
                let done = worker.execute(job).await;
                // The slot is held until the recorder accepts it (backpressure).
                let _ = executed.send(done).await;
                drop(slot);
            });
        }
        // Unblocks a claimer waiting for room, so that it sees the shutdown.
        drop(claimed);
        let _ = claimer.await;
        let finished = tokio::time::timeout(self.config.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        // Everything executed is recorded before the rest is released.
        drop(executed);
        let _ = recorder.await;
        let unfinished: Vec<Uuid> = self.leases.lock().expect("lease lock").drain().collect();
        if !unfinished.is_empty() {
            match self.pool.acquire().await {
                Ok(mut conn) => match queries::release(&mut conn, &unfinished).await {
                    Ok(released) => tracing::info!(released, "released unfinished deliveries"),
                    Err(error) => {
                        tracing::warn!(%error, "cannot release deliveries; their leases will expire")
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "cannot release deliveries; their leases will expire")
                }
            }
        }
        renewer.abort();
        listener.abort();
    }

    /// The claimer: claims a batch whenever half a batch fits in the queue of claimed deliveries,
    /// and when a claim finds less than it asked for, waits for a notification or the poll interval.
    async fn claim_continuously(
        self: Arc<Self>,
        to_start: mpsc::Sender<Job>,
        mut woken: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let half = (self.claim_size() / 2).max(1);
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            woken.borrow_and_update();
            let room = tokio::select! {
                room = to_start.reserve_many(half) => match room {
                    Ok(_) => to_start.capacity(),
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            match self.claim(room).await {
                Ok(jobs) => {
                    failures = 0;
                    let drained = jobs.len() < room;
                    for job in jobs {
                        if to_start.send(job).await.is_err() {
                            return;
                        }
                    }
                    if !drained {
                        continue;
                    }
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "cannot claim deliveries; retrying");
                    let backoff = policy::database_backoff(failures);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            tokio::select! {
                _ = woken.changed() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn renew_leases(self: Arc<Self>, shutdown: CancellationToken) {
        let period = self.config.lease / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => return,
            }
            let tokens: Vec<Uuid> = self
                .leases
                .lock()
                .expect("lease lock")
                .iter()
                .copied()
                .collect();
            if tokens.is_empty() {
                continue;
            }
            let renewed = async {
                let mut conn = self.pool.acquire().await?;
                queries::renew_leases(&mut conn, &tokens, self.lease_seconds()).await
            };
            if let Err(error) = renewed.await {
                tracing::warn!(%error, "cannot renew delivery leases");
            }
        }
    }

    /// Executes one prepared delivery. Never fails: every problem ends up in the execution.
    async fn execute(&self, job: Job) -> Executed {
        let delivery = job.delivery;
        // Every log line about this delivery carries these (never the body, headers or endpoint).
        let span = tracing::info_span!(
            "delivery",
            delivery = delivery.id,
            subscription = %delivery.subscription_id,
            resource = %format_args!("{}/{}", delivery.resource_type, delivery.resource_id),
            version = delivery.version_id,
            attempt = delivery.attempts + 1,
            request_id = %delivery.request_id,
            trace_id = %delivery.trace_id,
        );
        let clock = Instant::now();
        let execution = match job.prepared {
            Ok(Prepared::Stop(execution)) => execution,
            Ok(Prepared::Send(request)) => {
                self.send(&delivery, *request)
                    .instrument(span.clone())
                    .await
            }
            Err(error) => Execution::PreambleFailed(error),
        };
        Executed {
            delivery,
            execution,
            clock,
            span,
        }
    }

    /// The recorder: records executions in batches of whatever has arrived while the previous batch
    /// was being written, until every sender is gone.
    async fn record_continuously(self: Arc<Self>, mut to_record: mpsc::Receiver<Executed>) {
        let mut batch = Vec::new();
        while to_record.recv_many(&mut batch, MAX_RECORD_BATCH).await > 0 {
            self.record(std::mem::take(&mut batch)).await;
        }
    }

    /// Records executions: one transaction for the batch; if it fails, one per execution, so a row
    /// that cannot be written does not hold back the others. An execution that cannot be recorded at
    /// all is retried when its lease expires. Then metrics and logged AuditEvents.
    async fn record(&self, executed: Vec<Executed>) {
        if executed.is_empty() {
            return;
        }
        let now = Utc::now();
        let records: Vec<Record> = executed
            .into_iter()
            .map(|executed| self.record_of(executed, now))
            .collect();
        let unrecorded = |record: &Record, error: &StoreError| {
            record.span.in_scope(|| {
                tracing::warn!(%error, "cannot record the delivery outcome; it will be retried when its lease expires")
            })
        };
        let written = match self.write(&records).await {
            Ok(written) => written,
            Err(error) if records.len() == 1 => {
                unrecorded(&records[0], &error);
                HashSet::new()
            }
            Err(error) => {
                tracing::warn!(%error, deliveries = records.len(), "cannot record a batch of outcomes; recording them one by one");
                let mut written = HashSet::new();
                for record in &records {
                    match self.write(std::slice::from_ref(record)).await {
                        Ok(one) => written.extend(one),
                        Err(error) => unrecorded(record, &error),
                    }
                }
                written
            }
        };
        let mut leases = Vec::with_capacity(records.len());
        for record in records {
            let Record {
                delivery,
                clock,
                span,
                ..
            } = record;
            leases.push(delivery.lease_token);
            if !written.contains(&delivery.id) {
                continue;
            }
            let _entered = span.enter();
            let state = record.completion.state;
            if let Some(attempt) = &record.attempt {
                crate::metrics::attempt(
                    attempt.record.succeeded,
                    Duration::from_millis(attempt.record.duration_ms.max(0) as u64),
                );
                if self.config.log_audit_events
                    && let Some(event) = &attempt.logged_event
                {
                    audit::application::log_audit_event(event, true);
                }
            }
            let succeeded = state == "succeeded";
            let first = delivery.claims == 1;
            let since_change = (now - delivery.changed_at).to_std().unwrap_or_default();
            crate::metrics::execution(
                succeeded,
                clock.elapsed(),
                first.then(|| since_change.saturating_sub(clock.elapsed())),
                succeeded.then_some(since_change),
            );
            if state != "pending" {
                crate::metrics::finished(state);
            }
        }
        let mut held = self.leases.lock().expect("lease lock");
        for token in leases {
            held.remove(&token);
        }
    }

    /// Medplum's preamble (spec §1.5), then everything needed to send, from what was read for the
    /// whole batch: the subscription as it is now and the resource.
    async fn prepare(
        &self,
        delivery: &ClaimedDelivery,
        now: Option<&queries::SubscriptionNow>,
        resource: queries::ResourceNow,
    ) -> Result<Prepared, StoreError> {
        let stop = |execution| Ok(Prepared::Stop(execution));
        // What cannot be decoded now never will be: failed at once, with the reason on the row.
        if let Some(problem) = now
            .and_then(|now| now.undecodable.as_ref())
            .or(resource.undecodable.as_ref())
        {
            tracing::error!(delivery = delivery.id, resource_type = %delivery.resource_type,
                resource_id = %delivery.resource_id, version = delivery.version_id,
                "cannot deliver: {problem}");
            return stop(Execution::Refused(problem.clone()));
        }
        let Some(subscription) = now.and_then(|now| now.content.clone()) else {
            return stop(Execution::Skipped("the subscription was deleted".into()));
        };
        let channel = subscription::channel_type(&subscription);
        if channel != "rest-hook" {
            return stop(Execution::Skipped(format!(
                "the subscription's channel is now `{channel}`"
            )));
        }
        let status = subscription::status(&subscription);
        if status != "active" {
            return stop(Execution::Skipped(format!(
                "the subscription's status is now `{status}`"
            )));
        }
        let Some(endpoint) = subscription::endpoint(&subscription).map(str::to_owned) else {
            return stop(Execution::Done(
                "the subscription's endpoint was removed; nothing to send".into(),
            ));
        };
        // A `Bot/<id>` endpoint runs the handler the application registered for that Bot (rare
        // enough to be read on its own).
        let bot = match endpoint.strip_prefix("Bot/") {
            None => None,
            Some(bot_id) => Some(
                match capture::read(&self.pool, delivery.project_id, "Bot", bot_id).await {
                    Ok(bot) => Ok(bot),
                    Err(
                        StoreError::NotFound(_) | StoreError::Gone(_) | StoreError::InvalidId(_),
                    ) => Err(format!(
                        "{endpoint} does not exist in the subscription's project"
                    )),
                    Err(error) => return Err(error),
                },
            ),
        };
        let missing = |version: i64| {
            StoreError::NotFound(format!(
                "{}/{} version {version} is not stored",
                delivery.resource_type, delivery.resource_id
            ))
        };
        let version = if delivery.interaction == Interaction::Delete {
            // A bot receives the last live version (read for deletes); a rest-hook sends `{}`.
            match bot {
                Some(_) => Some(
                    resource
                        .content
                        .ok_or_else(|| missing(delivery.version_id - 1))?,
                ),
                None => None,
            }
        } else {
            if resource.current_version.is_none() || resource.deleted {
                return stop(Execution::Skipped("the resource was deleted".into()));
            }
            // Only a retry of a recorded, failed attempt may give up on a superseded version (as
            // Medplum does, spec §1.5): a claim taken over from a worker that died before its
            // attempt was recorded is still a first attempt, and state-transition notifications
            // depend on every version being sent once.
            if delivery.attempts > 0 && resource.current_version != Some(delivery.version_id) {
                return stop(Execution::Skipped(format!(
                    "version {} is no longer current (now {}); the newer version has its own delivery",
                    delivery.version_id,
                    resource.current_version.unwrap_or_default()
                )));
            }
            Some(
                resource
                    .content
                    .ok_or_else(|| missing(delivery.version_id))?,
            )
        };
        let resource_display = version.as_ref().and_then(audit::display);
        // What is sent (and signed): the version; for a delete `{}`, or for a bot Medplum's
        // `{"deletedResource": …}`.
        let payload = match (&bot, version) {
            (None, None) => None,
            (Some(_), Some(version)) if delivery.interaction == Interaction::Delete => {
                Some(serde_json::json!({ "deletedResource": version }))
            }
            (_, version) => version,
        };
        let body = match &payload {
            Some(payload) => serde_json::to_vec(payload).expect("a JSON value serializes"),
            None => b"{}".to_vec(),
        };
        let custom_headers = match headers::custom_headers(&subscription) {
            Ok(custom) => custom,
            Err(error) => return stop(Execution::Refused(error.to_string())),
        };
        let max_attempts = policy::max_attempts(&subscription).unwrap_or_else(|problem| {
            tracing::warn!("{problem}");
            policy::DEFAULT_MAX_ATTEMPTS
        });
        let settings = now.map(|now| &now.settings).unwrap_or(&Value::Null);
        let redact = self.config.redact_audit_events
            || settings.get("redactAuditEvents") == Some(&Value::Bool(true));
        let auto_disable = auto_disable::project_triggers(settings, &self.config.auto_disable);
        Ok(Prepared::Send(Box::new(Request {
            auto_disable,
            bot: bot.map(|bot| (bot, payload.unwrap_or_default())),
            endpoint,
            body,
            custom_headers,
            max_attempts,
            redact,
            resource_display,
            subscription,
        })))
    }

    async fn send(&self, delivery: &ClaimedDelivery, request: Request) -> Execution {
        let attempt_number = delivery.attempts + 1;
        let started_at = Utc::now();
        let clock = Instant::now();
        let webhook_id = delivery.webhook_id.to_string();
        let deleted = format!("{}/{}", delivery.resource_type, delivery.resource_id);
        let headers = headers::build(&headers::RequestHeaders {
            subscription_id: &delivery.subscription_id,
            interaction: delivery.interaction,
            deleted_resource: (delivery.interaction == Interaction::Delete)
                .then_some(deleted.as_str()),
            custom: &request.custom_headers,
            trace_id: &delivery.trace_id,
            webhook_id: &webhook_id,
            timestamp: started_at.timestamp(),
            secret: signature::secret(&request.subscription),
            body: &request.body,
        });
        if let Some((bot, input)) = request.bot {
            return self
                .run_bot(
                    delivery,
                    request.subscription,
                    bot,
                    input,
                    &headers,
                    request.max_attempts,
                    request.redact,
                    request.auto_disable,
                    request.resource_display,
                    started_at,
                    clock,
                )
                .await;
        }
        let outcome =
            match outbound::check_url(&request.endpoint, self.config.allow_unsafe_outbound) {
                Err(refused) => Err(refused.to_string()),
                Ok(url) => self.post(url, headers, request.body).await,
            };
        let duration_ms = clock.elapsed().as_millis().min(i32::MAX as u128) as i32;
        let mut record = AttemptRecord {
            attempt: attempt_number,
            started_at,
            duration_ms,
            succeeded: false,
            status: None,
            error: None,
            response_body: None,
        };
        let mut retry_after = None;
        match outcome {
            Ok(response) => {
                record.status = Some(i32::from(response.status));
                record.succeeded = policy::is_success(&request.subscription, response.status);
                record.response_body = Some(response.body_prefix);
                if !record.succeeded {
                    record.error = Some(format!("Received status {}", response.status));
                    if matches!(response.status, 429 | 503) {
                        retry_after = response.retry_after.and_then(|header| {
                            self.config.backoff.retry_after(&header, Utc::now())
                        });
                    }
                }
            }
            Err(error) => record.error = Some(error),
        }
        // Every attempt is in `delivery_attempt`; the log shows failures by default and successes
        // at debug level (thousands a second would drown everything else).
        if record.succeeded {
            tracing::debug!(
                status = record.status,
                duration_ms,
                succeeded = true,
                "rest-hook attempt"
            );
        } else {
            tracing::info!(
                status = record.status,
                duration_ms,
                succeeded = false,
                error = record.error.as_deref(),
                "rest-hook attempt"
            );
        }
        Execution::Attempted(Box::new(Attempt {
            subscription: request.subscription,
            bot: None,
            resource_display: request.resource_display,
            record,
            retry_after,
            max_attempts: request.max_attempts,
            redact: request.redact,
            auto_disable: request.auto_disable,
        }))
    }

    /// Runs a bot subscription's handler, with the request timeout, as one attempt.
    #[allow(clippy::too_many_arguments)]
    async fn run_bot(
        &self,
        delivery: &ClaimedDelivery,
        subscription: Arc<Value>,
        bot: Result<Value, String>,
        input: Value,
        headers: &reqwest::header::HeaderMap,
        max_attempts: u32,
        redact: bool,
        auto_disable: Vec<auto_disable::Trigger>,
        resource_display: Option<String>,
        started_at: chrono::DateTime<Utc>,
        clock: Instant,
    ) -> Execution {
        let result = match &bot {
            Err(missing) => Err(missing.clone()),
            Ok(bot) => {
                let run = self.bots.run(crate::bots::BotInput {
                    bot: bot.clone(),
                    subscription_id: delivery.subscription_id.clone(),
                    interaction: delivery.interaction,
                    input: input.clone(),
                    headers: headers
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.to_string(),
                                value.to_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect(),
                });
                match tokio::time::timeout(self.config.request_timeout, run).await {
                    Ok(Ok(output)) => Ok(output.log),
                    Ok(Err(failure)) => Err(failure.message),
                    Err(_) => Err(format!(
                        "the bot handler did not finish within {:?}",
                        self.config.request_timeout
                    )),
                }
            }
        };
        let duration_ms = clock.elapsed().as_millis().min(i32::MAX as u128) as i32;
        tracing::info!(
            duration_ms,
            succeeded = result.is_ok(),
            error = result.as_ref().err(),
            "bot run"
        );
        let record = AttemptRecord {
            attempt: delivery.attempts + 1,
            started_at,
            duration_ms,
            succeeded: result.is_ok(),
            status: None,
            error: result.as_ref().err().cloned(),
            response_body: None,
        };
        let bot = bot.unwrap_or_else(|_| {
            serde_json::json!({ "resourceType": "Bot", "id": subscription::endpoint(&subscription)
                .and_then(|e| e.strip_prefix("Bot/")).unwrap_or_default() })
        });
        Execution::Attempted(Box::new(Attempt {
            bot: Some(BotRun {
                bot,
                input,
                output: result.unwrap_or_else(|error| error),
            }),
            subscription,
            resource_display,
            record,
            retry_after: None,
            max_attempts,
            redact,
            auto_disable,
        }))
    }

    async fn post(
        &self,
        url: reqwest::Url,
        headers: reqwest::header::HeaderMap,
        body: Vec<u8>,
    ) -> Result<Response, String> {
        let mut response = self
            .client
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(describe_error)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        // Keep only a bounded prefix: a huge or endless response must not cost memory.
        let mut prefix = Vec::new();
        while prefix.len() < self.config.response_body_limit {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.config.response_body_limit - prefix.len();
                    prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(Response {
            status,
            retry_after,
            body_prefix: String::from_utf8_lossy(&prefix).into_owned(),
        })
    }

    /// What recording an execution writes: its completion (the new state of the delivery) and, for
    /// an attempt, its log row and AuditEvents. Reads nothing.
    fn record_of(&self, executed: Executed, now: chrono::DateTime<Utc>) -> Record {
        let Executed {
            delivery,
            execution,
            clock,
            span,
        } = executed;
        let retry_at =
            |delay: Duration| Some(now + chrono::Duration::from_std(delay).unwrap_or_default());
        let base = Completion {
            state: "failed",
            attempts: delivery.attempts,
            preamble_failures: delivery.preamble_failures,
            next_attempt_at: None,
            reason: None,
            last_status: None,
        };
        let (completion, attempt) = match execution {
            Execution::Skipped(reason) => (
                Completion {
                    state: "skipped",
                    reason: Some(reason),
                    ..base
                },
                None,
            ),
            Execution::Done(reason) => (
                Completion {
                    state: "succeeded",
                    reason: Some(reason),
                    ..base
                },
                None,
            ),
            Execution::Refused(reason) => (
                Completion {
                    state: "failed",
                    reason: Some(reason),
                    ..base
                },
                None,
            ),
            Execution::PreambleFailed(error) => {
                let failures = delivery.preamble_failures + 1;
                let completion = if failures as u32 >= policy::HARD_ATTEMPT_CAP {
                    Completion {
                        state: "failed",
                        preamble_failures: failures,
                        reason: Some(format!(
                            "the preamble failed {failures} times; last: {error}"
                        )),
                        ..base
                    }
                } else {
                    Completion {
                        state: "pending",
                        preamble_failures: failures,
                        next_attempt_at: retry_at(self.config.backoff.delay(failures as u32)),
                        reason: Some(format!("preamble failed: {error}")),
                        ..base
                    }
                };
                (completion, None)
            }
            Execution::Attempted(attempt) => {
                let attempts = delivery.attempts + 1;
                let error = attempt.record.error.clone().unwrap_or_default();
                // A 410 says the endpoint is gone for good: no retries (and the subscription is disabled).
                let gone = attempt.record.status == Some(410);
                let completion = if attempt.record.succeeded {
                    Completion {
                        state: "succeeded",
                        attempts,
                        ..base
                    }
                } else if gone
                    || attempts as u32 >= attempt.max_attempts
                    || delivery.claims as u32 >= policy::HARD_ATTEMPT_CAP
                {
                    Completion {
                        state: "failed",
                        attempts,
                        reason: Some(format!("exhausted {attempts} attempts; last: {error}")),
                        ..base
                    }
                } else {
                    let delay = attempt
                        .retry_after
                        .unwrap_or_else(|| self.config.backoff.delay(attempts as u32));
                    Completion {
                        state: "pending",
                        attempts,
                        next_attempt_at: retry_at(delay),
                        reason: Some(error),
                        ..base
                    }
                };
                let completion = Completion {
                    last_status: attempt.record.status,
                    ..completion
                };
                (
                    completion,
                    Some(self.audit_events(&delivery, *attempt, now)),
                )
            }
        };
        Record {
            delivery,
            clock,
            span,
            completion,
            attempt,
        }
    }

    /// The AuditEvents of an attempt: a rest-hook attempt's `transmit` event goes where the
    /// subscription says; a bot run's `execute` event where the Bot says, when its trigger fires.
    fn audit_events(
        &self,
        delivery: &ClaimedDelivery,
        attempt: Attempt,
        now: chrono::DateTime<Utc>,
    ) -> AttemptWrite {
        let outcome = if attempt.record.succeeded {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        };
        let (stored_event, logged_event) = match &attempt.bot {
            None => {
                let event = audit::transmit_event(&TransmitAttempt {
                    subscription: &attempt.subscription,
                    resource_type: &delivery.resource_type,
                    resource_id: &delivery.resource_id,
                    resource_display: attempt.resource_display,
                    started: delivery.changed_at,
                    ended: now,
                    outcome,
                    outcome_desc: match (&attempt.record.status, &attempt.record.error) {
                        (Some(status), _) => {
                            format!("Attempt {} received status {status}", delivery.attempts)
                        }
                        (None, error) => format!(
                            "Attempt {} received error {}",
                            delivery.attempts,
                            error.as_deref().unwrap_or_default()
                        ),
                    },
                    request_id: &delivery.request_id,
                    trace_id: &delivery.trace_id,
                    redact: attempt.redact,
                });
                let destinations = audit::destinations(&attempt.subscription);
                match (destinations.resource, destinations.log) {
                    (true, true) => (Some(event.clone()), Some(event)),
                    (true, false) => (Some(event), None),
                    (false, true) => (None, Some(event)),
                    (false, false) => (None, None),
                }
            }
            Some(run) if audit::bot::triggered(&run.bot, outcome, &run.output) => {
                let (resource, log) = audit::bot::destinations(&run.bot);
                let input = run.input.get("deletedResource").unwrap_or(&run.input);
                let event = |limit: usize| {
                    audit::bot::execute_event(&audit::bot::BotRun {
                        bot: &run.bot,
                        input,
                        subscription: Some(&attempt.subscription),
                        requester: input.pointer("/meta/author"),
                        started: attempt.record.started_at,
                        ended: now,
                        outcome,
                        outcome_desc: audit::bot::tail(&run.output, limit),
                        request_id: &delivery.request_id,
                        trace_id: &delivery.trace_id,
                        redact: attempt.redact,
                    })
                };
                (
                    resource.then(|| event(self.config.bot_output_limit_resource)),
                    log.then(|| event(self.config.bot_output_limit_log)),
                )
            }
            Some(_) => (None, None),
        };
        AttemptWrite {
            record: attempt.record,
            stored_event,
            logged_event,
            auto_disable: attempt.auto_disable,
        }
    }

    /// Writes records in one transaction: the fenced completions, then, for those whose lease still
    /// held, the stored AuditEvents, the attempt rows and the auto-disable bookkeeping. Returns the
    /// ids of the deliveries written; the others lost their lease and nothing of them was written.
    async fn write(&self, records: &[Record]) -> Result<HashSet<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let completions: Vec<(i64, Uuid, &Completion)> = records
            .iter()
            .map(|record| {
                let delivery = &record.delivery;
                (delivery.id, delivery.lease_token, &record.completion)
            })
            .collect();
        let written: HashSet<i64> = queries::complete(&mut tx, &completions)
            .await?
            .into_iter()
            .collect();
        let mut attempts: Vec<(&ClaimedDelivery, &AttemptWrite)> = Vec::new();
        for record in records {
            let delivery = &record.delivery;
            if !written.contains(&delivery.id) {
                record.span.in_scope(|| {
                    tracing::warn!(
                        "lease lost before completion (another worker took the delivery over); outcome discarded"
                    )
                });
            } else if let Some(attempt) = &record.attempt {
                attempts.push((delivery, attempt));
            }
        }
        let events: Vec<(Uuid, &Value)> = attempts
            .iter()
            .filter_map(|(delivery, attempt)| {
                Some((delivery.project_id, attempt.stored_event.as_ref()?))
            })
            .collect();
        let event_ids = match events.is_empty() {
            true => Vec::new(),
            false => queries::create_audit_events(&mut tx, &events).await?,
        };
        let mut event_ids = event_ids.iter();
        let rows: Vec<(&ClaimedDelivery, &AttemptRecord, Option<&str>)> = attempts
            .iter()
            .map(|(delivery, attempt)| {
                let event_id = match attempt.stored_event {
                    Some(_) => event_ids.next().map(String::as_str),
                    None => None,
                };
                (*delivery, &attempt.record, event_id)
            })
            .collect();
        if !rows.is_empty() {
            queries::insert_attempts(&mut tx, &rows).await?;
        }
        // Auto-disable bookkeeping, after the attempts' own records so that a disable is what the
        // log shows last: a success clears the count, a final failure adds to it (and may disable
        // the subscription), a `410 Gone` disables it at once.
        let mut succeeded: Vec<(Uuid, &str)> = attempts
            .iter()
            .filter(|(_, attempt)| attempt.record.succeeded)
            .map(|(delivery, _)| (delivery.project_id, delivery.subscription_id.as_str()))
            .collect();
        succeeded.sort_unstable();
        succeeded.dedup();
        if !succeeded.is_empty() {
            auto_disable::clear(&mut tx, &succeeded).await?;
        }
        for record in records {
            if let Some(attempt) = &record.attempt
                && !attempt.record.succeeded
                && record.completion.state == "failed"
                && written.contains(&record.delivery.id)
            {
                self.track_final_failure(&mut tx, &record.delivery, attempt)
                    .instrument(record.span.clone())
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(written)
    }

    /// A final failure counts towards auto-disable (and may disable the subscription); a `410 Gone`
    /// disables it at once.
    async fn track_final_failure(
        &self,
        tx: &mut sqlx::PgConnection,
        delivery: &ClaimedDelivery,
        attempt: &AttemptWrite,
    ) -> Result<(), StoreError> {
        let message = if attempt.record.status == Some(410) {
            Some("Automatically disabled: the endpoint answered 410 Gone".to_owned())
        } else {
            auto_disable::record_final_failure(
                tx,
                delivery.project_id,
                &delivery.subscription_id,
                &attempt.auto_disable,
                Utc::now(),
            )
            .await?
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
}

enum Prepared {
    Stop(Execution),
    Send(Box<Request>),
}

struct Request {
    auto_disable: Vec<auto_disable::Trigger>,
    /// For a `Bot/` endpoint: the Bot (or why it cannot be found) and the handler's input.
    bot: Option<(Result<Value, String>, Value)>,
    endpoint: String,
    body: Vec<u8>,
    custom_headers: Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    max_attempts: u32,
    redact: bool,
    resource_display: Option<String>,
    subscription: Arc<Value>,
}

struct Response {
    status: u16,
    retry_after: Option<String>,
    body_prefix: String,
}

/// An error and its causes, without the URL (it may carry a token in its query string).
fn describe_error(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
