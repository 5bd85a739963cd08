//! The worker loop: claims deliveries with leases (and what their preamble needs, each
//! subscription compiled once per batch) a batch ahead, runs each (preamble → transport → outcome)
//! in a request slot, at most `concurrency` at once (a freed slot to the endpoint holding the
//! fewest: [`super::slots`]), gives back what waited too long for a slot,
//! and hands the outcomes to the recorder task through a bounded queue; renews the leases. On
//! shutdown it records what finished and releases the rest.

use super::outcome::{self, Execution};
use super::policy::{self, Rules};
use super::preamble::{self, Prepared, Stop, Target};
use super::queries::{self, ClaimLimits, ClaimedDelivery};
use super::recorder::{self, AuditInput, BotRun, Executed, Recorder};
use super::slots::{EndpointKey, SlotQueue};
use super::transport::{Happened, Transport};
use super::{DeliveryConfig, DeliveryError, delivery_span, outbound};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How long a claimed delivery waits in this process for a request slot before it is given back to
/// the table: when every slot is held by slow requests, another worker may have room, and claimed
/// work must not sit leased behind them.
const MAX_SLOT_WAIT: Duration = Duration::from_secs(1);

/// What a request tells the worker's [`SlotQueue`] about its endpoint.
enum SlotEvent {
    /// It left its slot: it finished, or it moved to a slow place.
    Released,
    /// It went past `slow_request_after`.
    Slowed,
    /// It had gone past `slow_request_after`, and now it finished.
    Recovered,
}

/// Subscription versions whose bad extensions were reported, remembered up to this many.
const WARNED_LIMIT: usize = 10_000;

/// The delivery stage.
pub struct DeliveryWorker {
    pool: sqlx::PgPool,
    config: DeliveryConfig,
    transport: Transport,
    recorder: Recorder,
    /// Lease tokens of the deliveries this process holds: claimed, in flight, or waiting to be
    /// recorded (renewed periodically, released on shutdown).
    leases: Mutex<HashSet<Uuid>>,
    /// (project, subscription, version) whose bad extension was reported: once each.
    warned: Mutex<HashSet<(Uuid, String, String)>>,
    /// Signalled when the recorder wrote a batch: a retry may be due before the claimer's next look,
    /// and the deliveries written no longer count against their endpoints' allowance.
    recorded: Notify,
    /// Set with `recorded` when the batch rescheduled a delivery or changed a circuit: only then
    /// may something be due sooner than the claimer's last look found.
    schedule_changed: AtomicBool,
    /// Signalled by a dispatcher of this process when it committed deliveries (see
    /// [`DeliveryWorker::local_wake`]).
    dispatched: LocalWake,
}

/// How a dispatcher wakes the delivery worker of its own process when it commits deliveries: at
/// once, instead of through the round trip of `fhir_outbox_delivery`. Its notification carries
/// [`LocalWake::sender`], which that worker ignores (it was woken already); workers of other
/// processes wake on it.
#[derive(Clone)]
pub struct LocalWake {
    notify: Arc<Notify>,
    sender: String,
}

impl LocalWake {
    fn new() -> LocalWake {
        LocalWake {
            notify: Arc::new(Notify::new()),
            sender: Uuid::new_v4().to_string(),
        }
    }

    /// Wakes the worker.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// The payload of the notifications its dispatcher sends, which the worker ignores.
    pub fn sender(&self) -> &str {
        &self.sender
    }
}

/// How one claim of the claimer ended.
enum ClaimRound {
    /// It took all it asked for: more may be due at once.
    Full,
    /// It found less than it asked for: the claimer waits for a reason to look again.
    Drained,
    /// It failed, and the backoff has passed: claim again.
    Failed,
    /// Shutdown, or the worker stopped taking claimed deliveries.
    Stopped,
}

/// A claimed delivery whose preamble has run: what to do with it.
struct Job {
    delivery: ClaimedDelivery,
    /// When it was claimed: it waits for a slot [`MAX_SLOT_WAIT`] at most.
    claimed_at: Instant,
    /// The preamble's decision, or why it could not be made (database trouble).
    prepared: Result<Prepared, String>,
}

impl DeliveryWorker {
    /// A worker on this pool.
    pub fn new(
        pool: sqlx::PgPool,
        config: DeliveryConfig,
    ) -> Result<DeliveryWorker, DeliveryError> {
        let client = outbound::client(
            config.allow_unsafe_outbound,
            config.connect_timeout,
            config.request_timeout,
        )?;
        Ok(DeliveryWorker {
            transport: Transport {
                client,
                request_timeout: config.request_timeout,
                response_body_limit: config.response_body_limit,
                bots: crate::bots::BotRegistry::new(),
            },
            recorder: Recorder {
                pool: pool.clone(),
                log_audit_events: config.log_audit_events,
                bot_output_limit_resource: config.bot_output_limit_resource,
                bot_output_limit_log: config.bot_output_limit_log,
                circuit: config.circuit,
                allowance: config.endpoint_allowance,
                fast_answer: config.slow_request_after / 4,
            },
            pool,
            config,
            leases: Mutex::new(HashSet::new()),
            warned: Mutex::new(HashSet::new()),
            recorded: Notify::new(),
            schedule_changed: AtomicBool::new(false),
            dispatched: LocalWake::new(),
        })
    }

    /// What a dispatcher of this process signals when it commits deliveries, so that they are
    /// claimed without waiting for the notification's round trip through PostgreSQL.
    pub fn local_wake(&self) -> LocalWake {
        self.dispatched.clone()
    }

    /// The bot handlers that `Bot/<id>` endpoints run (see [`crate::bots`]).
    pub fn with_bots(mut self, bots: crate::bots::BotRegistry) -> Self {
        self.transport.bots = bots;
        self
    }

    fn lease_seconds(&self) -> f64 {
        self.config.lease.as_secs_f64()
    }

    /// Most deliveries claimed per claim query.
    fn claim_size(&self) -> usize {
        self.config.claim_batch.max(1)
    }

    /// A claim of up to `limit` deliveries under this worker's settings. A probe holds its circuit
    /// for as long as its request may take and its lease may outlive a dead worker.
    fn claim_limits(&self, limit: usize) -> ClaimLimits {
        ClaimLimits {
            limit: limit as i64,
            lease_seconds: self.lease_seconds(),
            endpoint_allowance: self.config.endpoint_allowance,
            probe_seconds: (self.config.request_timeout + 2 * self.config.lease).as_secs_f64(),
            queues_per_claim: 2 * self.claim_size() as i64,
        }
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

    /// Claims up to `limit` due deliveries, compiles each subscription of the batch once, and runs
    /// the preamble of the batch (its reads came with the claim).
    async fn claim(&self, limit: usize) -> Result<Vec<Job>, sqlx::Error> {
        let claimed = {
            let mut conn = self.pool.acquire().await?;
            queries::claim(&mut conn, self.claim_limits(limit)).await?
        };
        self.leases
            .lock()
            .expect("lease lock")
            .extend(claimed.iter().map(|claimed| claimed.delivery.lease_token));
        let claimed_at = Instant::now();
        let mut targets: HashMap<(Uuid, String), Arc<Target>> = HashMap::new();
        let mut jobs = Vec::with_capacity(claimed.len());
        for claimed in claimed {
            let delivery = claimed.delivery;
            if delivery.probe {
                crate::metrics::circuit_transition("half_open");
                tracing::info!(
                    project = %delivery.project_id,
                    endpoint = delivery.endpoint,
                    delivery = delivery.id,
                    "endpoint circuit half_open: probing with one delivery"
                );
            }
            let key = (delivery.project_id, delivery.subscription_id.clone());
            if let Some(now) = claimed.subscription {
                let (target, problem) = Target::compile(&now, &self.config);
                if let Some(problem) = problem {
                    self.warn_once(&delivery, &target, &problem);
                }
                targets.insert(key.clone(), Arc::new(target));
            }
            let prepared =
                preamble::prepare(&self.pool, &delivery, targets.get(&key), claimed.resource)
                    .await
                    .map_err(|error| error.to_string());
            jobs.push(Job {
                delivery,
                claimed_at,
                prepared,
            });
        }
        Ok(jobs)
    }

    /// Reports a subscription's bad extension once per subscription version.
    fn warn_once(&self, delivery: &ClaimedDelivery, target: &Target, problem: &str) {
        let version = target
            .content()
            .pointer("/meta/versionId")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let key = (
            delivery.project_id,
            delivery.subscription_id.clone(),
            version,
        );
        let mut warned = self.warned.lock().expect("warned lock");
        if warned.contains(&key) {
            return;
        }
        if warned.len() >= WARNED_LIMIT {
            warned.clear();
        }
        warned.insert(key);
        tracing::warn!(subscription = %delivery.subscription_id, "{problem}");
    }

    /// Runs until `shutdown`: claims due deliveries in batches whenever fewer than half a batch
    /// wait, starts them as request slots free up (each slot to the waiting endpoint that holds
    /// the fewest), gives back to the table any that waited
    /// [`MAX_SLOT_WAIT`] for a slot (every slot is held by slow requests: another worker may have
    /// room), records outcomes in batches (a recorder task), wakes on LISTEN
    /// `fhir_outbox_delivery`, a recorded batch, the next scheduled delivery or the poll interval,
    /// renews leases, and on shutdown stops claiming, lets requests in flight finish within the
    /// grace period, records them, and releases the rest.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (wake, woken) = watch::channel(0u64);
        let listener = tokio::spawn(crate::db::listen(
            self.pool.clone(),
            "fhir_outbox_delivery",
            wake,
            Some(self.dispatched.sender.clone()),
            shutdown.clone(),
        ));
        let renewer = tokio::spawn(self.clone().renew_leases(shutdown.clone()));
        let rotator = tokio::spawn(super::lanes::rotate_continuously(
            self.pool.clone(),
            shutdown.clone(),
        ));
        let claim_size = self.claim_size();
        // A bounded queue: when recording falls behind, requests wait (holding their slots) instead
        // of piling up executed-but-unrecorded work, which a crash would send again (with the
        // requests in flight and the batch being written, the duplicate bound README states). A
        // claim batch of it: the recorder writes what arrived while it wrote the previous batch,
        // and a fuller batch costs less per delivery (its statements and its commit are shared),
        // so a queue much smaller than a claim made recording the bottleneck
        // (docs/performance-history.md, run L).
        let (executed, to_record) = mpsc::channel::<Executed>(claim_size);
        let recorder = tokio::spawn(self.clone().record_continuously(to_record));
        // Claiming runs ahead of the requests in its own task, so that a claim's round trips overlap
        // the requests of the previous batch. What it claims waits in `waiting` for a slot (and
        // counts against its endpoint's allowance meanwhile); `room` holds a permit per waiting
        // delivery, so that no more than a claim batch waits.
        let room = Arc::new(Semaphore::new(claim_size));
        let (to_start, mut claimed) = mpsc::unbounded_channel::<(Job, OwnedSemaphorePermit)>();
        let claimer = tokio::spawn(self.clone().claim_continuously(
            room.clone(),
            to_start,
            woken,
            shutdown.clone(),
        ));
        let concurrency = self.config.concurrency.max(1);
        let slots = Arc::new(Semaphore::new(concurrency));
        // As many places where requests slower than `slow_request_after` wait out their answer (or
        // timeout), so that a few hanging endpoints cannot hold most of the slots.
        let slow_places = Arc::new(Semaphore::new(concurrency));
        // An endpoint with a slow request holds the allowance's base at most (what the claim gives
        // it once its first slow answer is recorded), and a quarter of the slots.
        let slow_share = (self.config.endpoint_allowance.base as usize).min(concurrency / 4);
        let mut waiting: SlotQueue<(Job, OwnedSemaphorePermit)> = SlotQueue::new(slow_share);
        // What happens to the requests in the slots, per endpoint.
        let (slot_events, mut events) = mpsc::unbounded_channel::<(EndpointKey, SlotEvent)>();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while !waiting.is_empty() {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    break;
                };
                // Nothing, when all that waits is of endpoints at their slow share.
                let Some((endpoint, (job, _room))) = waiting.start_next() else {
                    break;
                };
                while tasks.try_join_next().is_some() {}
                tasks.spawn(self.clone().run_in_slot(
                    job,
                    endpoint,
                    slot,
                    slow_places.clone(),
                    executed.clone(),
                    slot_events.clone(),
                ));
            }
            let give_back_at = waiting
                .oldest()
                .map(|since| tokio::time::Instant::from_std(since + MAX_SLOT_WAIT));
            tokio::select! {
                job = claimed.recv() => match job {
                    Some((job, room)) => {
                        let endpoint = (job.delivery.project_id, job.delivery.endpoint.clone());
                        waiting.push(endpoint, job.claimed_at, (job, room));
                    }
                    None => break,
                },
                Some((endpoint, event)) = events.recv() => match event {
                    SlotEvent::Released => waiting.release(&endpoint),
                    SlotEvent::Slowed => waiting.slowed(&endpoint),
                    SlotEvent::Recovered => waiting.recovered(&endpoint),
                },
                _ = tokio::time::sleep_until(give_back_at.unwrap_or_else(tokio::time::Instant::now)),
                    if give_back_at.is_some() => {
                    // No slot came free for these within the wait: every slot is held by slower
                    // requests (or by endpoints holding fewer). They go back to the table for any
                    // worker with room.
                    let stale = Instant::now()
                        .checked_sub(MAX_SLOT_WAIT)
                        .map(|cutoff| waiting.take_waiting_since(cutoff))
                        .unwrap_or_default();
                    let tokens = stale.into_iter().map(|(job, _)| job.delivery.lease_token);
                    self.give_back(tokens.collect()).await;
                }
                _ = shutdown.cancelled() => break,
            }
        }
        // The waiting deliveries are dropped; their leases are released below.
        drop(waiting);
        // Unblocks a claimer waiting for room, so that it sees the shutdown.
        room.close();
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
        let released = self.release(&unfinished).await;
        if released > 0 {
            tracing::info!(released, "released unfinished deliveries");
        }
        renewer.abort();
        rotator.abort();
        listener.abort();
    }

    /// Runs one delivery in the request slot `slot` of `endpoint`, tells the slot queue when the
    /// request leaves its slot, goes slow and finishes slow, and hands the outcome to the recorder.
    async fn run_in_slot(
        self: Arc<Self>,
        job: Job,
        endpoint: EndpointKey,
        slot: OwnedSemaphorePermit,
        slow_places: Arc<Semaphore>,
        executed: mpsc::Sender<Executed>,
        slot_events: mpsc::UnboundedSender<(EndpointKey, SlotEvent)>,
    ) {
        let mut held = slot;
        let mut in_slot = true;
        let execution = self.execute(job);
        tokio::pin!(execution);
        let (done, slow) =
            match tokio::time::timeout(self.config.slow_request_after, &mut execution).await {
                Ok(done) => (done, false),
                Err(_) => {
                    let _ = slot_events.send((endpoint.clone(), SlotEvent::Slowed));
                    // Replacing the permit frees the slot; with no place free, it stays.
                    let _counted = slow_places.try_acquire_owned().ok().map(|place| {
                        held = place;
                        in_slot = false;
                        let _ = slot_events.send((endpoint.clone(), SlotEvent::Released));
                        crate::metrics::SlowRequest::start()
                    });
                    (execution.await, true)
                }
            };
        // The slot (or place) is held until the recorder accepts it (backpressure).
        let _ = executed.send(done).await;
        drop(held);
        if in_slot {
            let _ = slot_events.send((endpoint.clone(), SlotEvent::Released));
        }
        if slow {
            let _ = slot_events.send((endpoint, SlotEvent::Recovered));
        }
    }

    /// Gives claimed deliveries back to the table, due at once, unattempted (their leases end).
    async fn give_back(&self, tokens: Vec<Uuid>) {
        {
            let mut held = self.leases.lock().expect("lease lock");
            for token in &tokens {
                held.remove(token);
            }
        }
        crate::metrics::given_back(tokens.len());
        let released = self.release(&tokens).await;
        tracing::info!(
            released,
            "gave claimed deliveries back: no request slot free within {MAX_SLOT_WAIT:?}"
        );
    }

    /// Releases leases (`queries::release`); returns how many. A failure is logged: the leases
    /// then expire, and the deliveries are claimed again after the lease time.
    async fn release(&self, tokens: &[Uuid]) -> u64 {
        if tokens.is_empty() {
            return 0;
        }
        let released = async {
            let mut conn = self.pool.acquire().await?;
            queries::release(&mut conn, tokens).await
        };
        match released.await {
            Ok(released) => released,
            Err(error) => {
                tracing::warn!(%error, "cannot release deliveries; their leases will expire");
                0
            }
        }
    }

    /// The claimer: claims a batch whenever half a batch fits in the queue of claimed deliveries,
    /// and when a claim finds less than it asked for (nothing due, or the endpoints with due work
    /// are saturated or their circuits open), sleeps until the earliest scheduled delivery or
    /// probe is due (so a retry goes out on time, not on the next poll), a notification, a
    /// recorded batch, or the poll interval at most. A recorded batch frees endpoints' allowances,
    /// which matters only while deliveries are due already; otherwise the claimer looks again only
    /// if the batch scheduled something (a retry, a circuit's probe), sparing the database a claim
    /// and a look per recorded batch.
    async fn claim_continuously(
        self: Arc<Self>,
        room: Arc<Semaphore>,
        to_start: mpsc::UnboundedSender<(Job, OwnedSemaphorePermit)>,
        mut woken: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let half = (self.claim_size() / 2).max(1);
        let mut failures = 0u32;
        // The database's clock at the previous look for the next due delivery.
        let mut looked = DateTime::<Utc>::UNIX_EPOCH;
        let mut claim_next = true;
        while !shutdown.is_cancelled() {
            if claim_next {
                woken.borrow_and_update();
                match self
                    .claim_round(&room, &to_start, half, &mut failures, &shutdown)
                    .await
                {
                    ClaimRound::Full | ClaimRound::Failed => continue,
                    ClaimRound::Drained => {}
                    ClaimRound::Stopped => return,
                }
            }
            self.schedule_changed.store(false, Ordering::Release);
            let (sleep, due_now) = self.until_due(&mut looked).await;
            let wake_at = tokio::time::Instant::now() + sleep;
            claim_next = loop {
                tokio::select! {
                    _ = woken.changed() => break true,
                    _ = self.dispatched.notify.notified() => break true,
                    _ = self.recorded.notified() => {
                        if due_now {
                            break true;
                        }
                        // Only a batch that scheduled something can make the next due time
                        // sooner; the others leave the look as it was (one round trip each saved).
                        if self.schedule_changed.swap(false, Ordering::AcqRel) {
                            break false;
                        }
                    }
                    _ = tokio::time::sleep_until(wake_at) => break true,
                    _ = shutdown.cancelled() => return,
                }
            };
        }
    }

    /// One claim of the claimer: waits until half a batch fits in the queue of claimed deliveries,
    /// claims what fits and queues it; after a failed claim, waits out the database backoff.
    async fn claim_round(
        &self,
        room: &Arc<Semaphore>,
        to_start: &mpsc::UnboundedSender<(Job, OwnedSemaphorePermit)>,
        half: usize,
        failures: &mut u32,
        shutdown: &CancellationToken,
    ) -> ClaimRound {
        let mut places = tokio::select! {
            places = room_for_claim(room, half) => match places {
                Some(places) => places,
                None => return ClaimRound::Stopped,
            },
            _ = shutdown.cancelled() => return ClaimRound::Stopped,
        };
        let wanted = places.num_permits();
        match self.claim(wanted).await {
            Ok(jobs) => {
                *failures = 0;
                let drained = jobs.len() < wanted;
                for job in jobs {
                    let place = places.split(1).expect("a place per claimed delivery");
                    if to_start.send((job, place)).is_err() {
                        return ClaimRound::Stopped;
                    }
                }
                match drained {
                    true => ClaimRound::Drained,
                    false => ClaimRound::Full,
                }
            }
            Err(error) => {
                *failures += 1;
                tracing::warn!(%error, "cannot claim deliveries; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(policy::database_backoff(*failures)) => ClaimRound::Failed,
                    _ = shutdown.cancelled() => ClaimRound::Stopped,
                }
            }
        }
    }

    /// How long the claimer may sleep: until the earliest scheduled delivery (after `looked`, the
    /// previous look) is due, at most the poll interval, which also bounds what this cannot see
    /// (leases of dead workers expiring); and whether a delivery is due already (true when the
    /// look fails).
    async fn until_due(&self, looked: &mut DateTime<Utc>) -> (Duration, bool) {
        let poll = self.config.poll_interval;
        let next = async {
            let mut conn = self.pool.acquire().await?;
            queries::next_due(&mut conn, *looked).await
        };
        match next.await {
            Ok(next) => {
                *looked = next.now;
                let sleep = next.wait_seconds.map_or(poll, |seconds| {
                    Duration::try_from_secs_f64(seconds.max(0.0)).map_or(poll, |due| due.min(poll))
                });
                (sleep, next.due_now)
            }
            Err(error) => {
                tracing::debug!(%error, "cannot look up the next due delivery; polling");
                (poll, true)
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

    /// Executes one prepared delivery and decides what it comes to. Never fails: every problem
    /// ends up in the decision.
    async fn execute(&self, job: Job) -> Executed {
        let delivery = job.delivery;
        let clock = Instant::now();
        let (execution, request) = match job.prepared {
            Ok(Prepared::Stop(stop)) => {
                log_stop(&delivery, &stop);
                (Execution::Stopped(stop), None)
            }
            Ok(Prepared::Send(mut request)) => {
                // A bot's handler may log: its lines carry the delivery's fields. A request logs
                // nothing of ours until its outcome.
                let bot = request.bot.is_some();
                let perform = self.transport.perform(&delivery, &mut request);
                let performed = if bot {
                    perform.instrument(delivery_span(&delivery)).await
                } else {
                    perform.await
                };
                (Execution::Performed(performed), Some(request))
            }
            Err(error) => (Execution::PreambleFailed(error), None),
        };
        let default_rules = Rules::default();
        let rules = request
            .as_ref()
            .map_or(&default_rules, |request| &request.target.rules);
        let decision = outcome::decide(
            &delivery,
            &execution,
            rules,
            &self.config.backoff,
            Utc::now(),
        );
        let audit = match (execution, request) {
            (Execution::Performed(performed), Some(request)) => {
                if let Some(attempt) = &decision.attempt {
                    log_attempt(&delivery, attempt, &performed.happened);
                }
                let bot = match performed.happened {
                    Happened::Bot { bot, input, result } => Some(BotRun {
                        bot,
                        input,
                        output: result.unwrap_or_else(|error| error),
                    }),
                    Happened::Response(_) | Happened::Error(_) => None,
                };
                Some(AuditInput {
                    target: request.target,
                    resource_display: request.resource_display,
                    bot,
                })
            }
            _ => None,
        };
        Executed {
            delivery,
            decision,
            audit,
            clock,
        }
    }

    /// The recorder task: records executions in batches of whatever has arrived while the previous
    /// batch was being written, until every sender is gone.
    async fn record_continuously(self: Arc<Self>, mut to_record: mpsc::Receiver<Executed>) {
        let mut batch = Vec::new();
        while to_record
            .recv_many(&mut batch, recorder::MAX_RECORD_BATCH)
            .await
            > 0
        {
            self.record(std::mem::take(&mut batch)).await;
        }
    }

    /// Records a batch, then lets go of its leases and wakes the claimer.
    async fn record(&self, executed: Vec<Executed>) {
        let recorded = self.recorder.record(executed).await;
        {
            let mut held = self.leases.lock().expect("lease lock");
            for token in recorded.leases {
                held.remove(&token);
            }
        }
        if recorded.schedule_changed {
            self.schedule_changed.store(true, Ordering::Release);
        }
        self.recorded.notify_one();
    }
}

/// A delivery the preamble stopped before any request: its row gets the reason; so does the log,
/// at the level of a failed attempt (a subscription that cannot be delivered as it stands is also
/// warned about once per version, `warn_once`).
fn log_stop(delivery: &ClaimedDelivery, stop: &Stop) {
    let _entered = delivery_span(delivery).entered();
    match stop {
        Stop::Skipped(reason) => tracing::info!(%reason, "delivery skipped, nothing sent"),
        Stop::Refused(reason) => tracing::info!(%reason, "delivery failed, nothing sent"),
        Stop::Done => {
            tracing::debug!("delivery finished: the subscription has no endpoint any more")
        }
    }
}

/// Every attempt is in `delivery_attempt`; the log shows failures by default and successes at debug
/// level (thousands a second would drown everything else).
fn log_attempt(delivery: &ClaimedDelivery, attempt: &queries::AttemptRecord, happened: &Happened) {
    // Successes are logged at debug level: no span for a line that is not written.
    if attempt.succeeded
        && !matches!(happened, Happened::Bot { .. })
        && !tracing::enabled!(tracing::Level::DEBUG)
    {
        return;
    }
    let _entered = delivery_span(delivery).entered();
    let duration_ms = attempt.duration_ms;
    match happened {
        Happened::Bot { .. } => tracing::info!(
            duration_ms,
            succeeded = attempt.succeeded,
            error = attempt.error.as_deref(),
            "bot run"
        ),
        _ if attempt.succeeded => tracing::debug!(
            status = attempt.status,
            duration_ms,
            succeeded = true,
            "rest-hook attempt"
        ),
        _ => tracing::info!(
            status = attempt.status,
            duration_ms,
            succeeded = false,
            error = attempt.error.as_deref(),
            "rest-hook attempt"
        ),
    }
}

/// Waits until at least `half` places are free in `room`, then takes every free place (a claim asks
/// for all the room, not only the half it waited for: that would often be a claim per few rows);
/// `None` once the room is closed.
async fn room_for_claim(room: &Arc<Semaphore>, half: usize) -> Option<OwnedSemaphorePermit> {
    let mut places = room.clone().acquire_many_owned(half as u32).await.ok()?;
    if let Ok(rest) = room
        .clone()
        .try_acquire_many_owned(room.available_permits() as u32)
    {
        places.merge(rest);
    }
    Some(places)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_claim_asks_for_all_the_room_not_only_the_half_it_waited_for() {
        let room = Arc::new(Semaphore::new(8));
        let all = room_for_claim(&room, 4).await.unwrap();
        assert_eq!(all.num_permits(), 8);
        drop(all);
        let waiting_three = room.clone().acquire_many_owned(3).await.unwrap();
        assert_eq!(room_for_claim(&room, 4).await.unwrap().num_permits(), 5);
        let mut waiting_all = room.clone().acquire_many_owned(5).await.unwrap();
        waiting_all.merge(waiting_three);
        // Full: it waits until half a batch has started.
        let claimer = tokio::spawn({
            let room = room.clone();
            async move {
                room_for_claim(&room, 4)
                    .await
                    .map(|places| places.num_permits())
            }
        });
        let started = waiting_all.split(3).unwrap();
        drop(started);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!claimer.is_finished(), "3 free of 8: not yet half a batch");
        drop(waiting_all.split(1).unwrap());
        assert_eq!(claimer.await.unwrap(), Some(4));
        room.close();
        assert!(room_for_claim(&room, 4).await.is_none());
    }
}
