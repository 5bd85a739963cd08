//! Dispatch: turns committed changes (outbox rows) into deliveries, one per matching rest-hook
//! subscription.
//!
//! A dispatcher claims a batch of the oldest undispatched outbox rows with `FOR UPDATE SKIP LOCKED`
//! (so any number of dispatchers, on any number of hosts, share the work), evaluates every candidate
//! subscription of the change's project against the exact version (see [`matching`]), inserts the
//! deliveries (unique per change and subscription) and marks the rows dispatched, all in one
//! transaction: a dispatcher that dies mid-batch leaves nothing behind, and the rows are claimed again.
//!
//! Subscriptions are compiled once per version and cached per project; every Subscription write bumps
//! the project's `subscription_epoch`, which each batch compares, so an edit takes effect on the next
//! change on every host. A problem with one subscription (unsupported criteria, a FHIRPath runtime
//! error) never affects the others; it is recorded in `fhir_outbox.subscription_issue`.

pub mod matching;
mod queries;

use crate::capture::Interaction;
use crate::subscription;
use chrono::Utc;
use matching::{ChangeView, CompiledSubscription, IssueKind, Verdict};
use queries::{ClaimedChange, Issue, NewDeliveries};
use sqlx::{PgConnection, PgPool};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How a dispatcher works.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Outbox rows claimed per transaction.
    pub batch_size: i64,
    /// Concurrent dispatch loops in this process.
    pub workers: usize,
    /// How often to look for work when no notification arrives (covers lost notifications).
    pub poll_interval: Duration,
    /// How long a loop waits before claiming again after a batch that took every undispatched
    /// change and found more than one (changes arrive faster than it claims them, not fast
    /// enough to fill a batch), so that the next batch carries more of them. Zero claims at once.
    pub linger: Duration,
    /// Evaluate the subscriptions of server-scope projects for changes in every project.
    pub server_scoped_subscriptions: bool,
    /// Let endpoints use `http` and non-public addresses (tests, the demo; never in production).
    pub allow_unsafe_outbound: bool,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            batch_size: 500,
            workers: 1,
            poll_interval: Duration::from_secs(1),
            linger: Duration::from_millis(3),
            server_scoped_subscriptions: false,
            allow_unsafe_outbound: false,
        }
    }
}

/// Why a dispatch batch failed (it was rolled back; its rows will be claimed again).
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The database failed.
    #[error("dispatch batch failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Evaluating the batch panicked (a bug): the batch is rolled back and retried row by row.
    #[error("dispatch batch failed: evaluation panicked: {0}")]
    Evaluation(String),
}

/// A batch that failed, with the rows it had claimed (none when it failed before claiming).
struct BatchFailure {
    error: DispatchError,
    claimed: Vec<i64>,
}

impl BatchFailure {
    fn unclaimed(error: sqlx::Error) -> BatchFailure {
        BatchFailure {
            error: error.into(),
            claimed: Vec::new(),
        }
    }
}

/// Times a row must fail on its own, with an error about its data, before it is set aside.
const ALONE_FAILURES_BEFORE_SET_ASIDE: u32 = 3;

/// A batch as its loop sees it.
struct Batch {
    report: BatchReport,
    /// Outbox rows the claim returned: more than `report.changes` when a bound on the batch's
    /// contents or deliveries left some for the next batch.
    claimed: usize,
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    /// Outbox rows dispatched.
    pub changes: usize,
    /// Deliveries inserted.
    pub deliveries: u64,
    /// Subscription evaluations that failed (recorded as subscription issues).
    pub evaluation_errors: usize,
    /// Rows that could not be dispatched at all (marked with `dispatch_error`).
    pub undispatchable: usize,
}

struct CachedProject {
    epoch: i64,
    server_scope: bool,
    subscriptions: Arc<[Arc<CompiledSubscription>]>,
}

/// The dispatch stage. Cheap to share: wrap it in an `Arc` and run several loops.
pub struct Dispatcher {
    pool: PgPool,
    config: DispatchConfig,
    cache: Mutex<HashMap<Uuid, CachedProject>>,
    /// Evaluation errors already logged by this process (they are counted in SQL every time).
    logged_errors: Arc<Mutex<HashSet<(String, i64, String)>>>,
    /// Where a busy loop's claim starts.
    floor: Mutex<ScanFloor>,
    /// Told when a batch committed deliveries: the delivery worker of this process, if it runs
    /// one, claims them at once instead of after the round trip of `fhir_outbox_delivery`.
    local_delivery: Option<crate::delivery::LocalWake>,
}

/// Where the claim's scan of undispatched outbox rows starts. Each dispatched row leaves a dead
/// entry in the `outbox_undispatched` index that a claim walks past until VACUUM removes it; while
/// a transaction holds the xmin horizon, VACUUM cannot, and a scan from the start walks every row
/// dispatched since. So when a full scan turns slow, a claim starts from the lowest seq the loop
/// claimed [`FLOOR_LAG`] ago instead: everything below was claimed then, except what committed
/// since from a transaction that had taken its seq before, and ran longer than [`FLOOR_LAG`]; a
/// full scan every [`FULL_SCAN_EVERY`] finds those (an idle loop still looks every poll
/// interval), so such a change waits that long at most. When full scans are fast, every scan is
/// one.
#[derive(Debug, Default)]
struct ScanFloor {
    /// (when, lowest seq claimed), oldest first.
    marks: std::collections::VecDeque<(Instant, i64)>,
    last_full_scan: Option<Instant>,
    full_scan_slow: bool,
}

/// How old a claim must be for its lowest seq to be a floor.
const FLOOR_LAG: Duration = Duration::from_secs(5);
/// Longest time between full scans.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(10);
/// A full scan slower than this turns floors on until one is fast again.
const SLOW_FULL_SCAN: Duration = Duration::from_millis(20);

impl ScanFloor {
    /// The seq the next claim starts from (0: a full scan).
    fn start(&mut self, now: Instant) -> i64 {
        let due = self
            .last_full_scan
            .is_none_or(|at| now.duration_since(at) >= FULL_SCAN_EVERY);
        if !self.full_scan_slow || due {
            return 0;
        }
        while self.marks.len() > 1 && now.duration_since(self.marks[1].0) >= FLOOR_LAG {
            self.marks.pop_front();
        }
        match self.marks.front() {
            Some(&(at, seq)) if now.duration_since(at) >= FLOOR_LAG => seq,
            _ => 0,
        }
    }

    /// A claim from `from` that took `took` committed, having claimed from `lowest` up.
    fn committed(&mut self, from: i64, took: Duration, lowest: Option<i64>, now: Instant) {
        if from == 0 {
            self.last_full_scan = Some(now);
            self.full_scan_slow = took >= SLOW_FULL_SCAN;
        }
        if let Some(seq) = lowest {
            self.marks.push_back((now, seq));
            if self.marks.len() > 100_000 {
                self.marks.pop_front();
            }
        }
    }
}

/// The subscriptions a batch is evaluated against.
struct Candidates {
    by_project: HashMap<Uuid, Arc<[Arc<CompiledSubscription>]>>,
    server_scope: Vec<(Uuid, Arc<[Arc<CompiledSubscription>]>)>,
}

impl Candidates {
    fn for_project(&self, project: Uuid) -> impl Iterator<Item = &Arc<CompiledSubscription>> {
        let own = self
            .by_project
            .get(&project)
            .into_iter()
            .flat_map(|s| s.iter());
        let server = self
            .server_scope
            .iter()
            .filter(move |(server_project, _)| *server_project != project)
            .flat_map(|(_, subscriptions)| subscriptions.iter());
        own.chain(server)
    }

    /// Whether `change`'s versions must be read: a Subscription's always (its handshake and
    /// channel are read from it), any other's when a candidate evaluates it on them.
    fn read_contents_of(&self, change: &ClaimedChange) -> bool {
        change.resource_type == "Subscription"
            || self
                .for_project(change.project_id)
                .any(|subscription| subscription.reads_content(&change.resource_type))
    }

    /// How many of `changes`, in order, fit in [`MAX_DELIVERIES_PER_BATCH`] when each counts the
    /// subscriptions it could match (the first always fits).
    fn within_delivery_budget(&self, changes: &[ClaimedChange]) -> usize {
        let mut per_project: HashMap<Uuid, usize> = HashMap::new();
        let mut deliveries = 0usize;
        for (fitting, change) in changes.iter().enumerate() {
            deliveries += *per_project
                .entry(change.project_id)
                .or_insert_with(|| self.for_project(change.project_id).count());
            if deliveries > MAX_DELIVERIES_PER_BATCH && fitting > 0 {
                return fitting;
            }
        }
        changes.len()
    }
}

/// Most deliveries one dispatch batch may insert, counting for each change every subscription it
/// could match: with many subscriptions per project, a batch of 500 changes would otherwise insert
/// hundreds of thousands of rows in one statement and hold them all in memory. The changes past it
/// wait for the next batch.
const MAX_DELIVERIES_PER_BATCH: usize = 50_000;

impl Dispatcher {
    /// A dispatcher on this pool.
    pub fn new(pool: PgPool, config: DispatchConfig) -> Dispatcher {
        Dispatcher {
            pool,
            config,
            cache: Mutex::new(HashMap::new()),
            logged_errors: Arc::new(Mutex::new(HashSet::new())),
            floor: Mutex::new(ScanFloor::default()),
            local_delivery: None,
        }
    }

    /// Tells `wake` (a delivery worker of this process, [`DeliveryWorker::local_wake`]) when a
    /// batch commits deliveries. Workers elsewhere are woken through PostgreSQL: the notification
    /// names this process's worker ([`LocalWake::sender`]), which ignores it, so that one commit
    /// does not wake it twice (a second, empty claim).
    ///
    /// [`LocalWake::sender`]: crate::delivery::LocalWake::sender
    /// [`DeliveryWorker::local_wake`]: crate::delivery::DeliveryWorker::local_wake
    pub fn with_local_delivery(mut self, wake: crate::delivery::LocalWake) -> Self {
        self.local_delivery = Some(wake);
        self
    }

    /// Dispatches one batch of at most `batch_size` changes in one transaction.
    pub async fn dispatch_once(&self) -> Result<BatchReport, DispatchError> {
        self.dispatch_batch(self.config.batch_size)
            .await
            .map(|batch| batch.report)
            .map_err(|failure| failure.error)
    }

    /// Claims and dispatches one batch.
    async fn dispatch_batch(&self, limit: i64) -> Result<Batch, BatchFailure> {
        let started = Instant::now();
        let from = self.floor.lock().expect("floor lock").start(started);
        let mut tx = self
            .pool
            .begin_with(queries::DISPATCH_BEGIN)
            .await
            .map_err(BatchFailure::unclaimed)?;
        let (changes, epochs) = queries::claim_changes(
            &mut tx,
            limit,
            from,
            self.config.server_scoped_subscriptions,
        )
        .await
        .map_err(BatchFailure::unclaimed)?;
        let took = started.elapsed();
        let lowest = changes.first().map(|change| change.seq);
        let claimed = changes.len();
        let report = if changes.is_empty() {
            tx.commit().await.map_err(BatchFailure::unclaimed)?;
            BatchReport::default()
        } else {
            let claimed = changes.iter().map(|change| change.seq).collect();
            self.dispatch_claimed(tx, changes, epochs)
                .await
                .map_err(|error| BatchFailure { error, claimed })?
        };
        self.floor
            .lock()
            .expect("floor lock")
            .committed(from, took, lowest, Instant::now());
        Ok(Batch { report, claimed })
    }

    async fn dispatch_claimed(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        mut changes: Vec<ClaimedChange>,
        epochs: Vec<queries::ProjectEpoch>,
    ) -> Result<BatchReport, DispatchError> {
        let candidates = self.candidates(&mut tx, &changes, &epochs).await?;
        // The changes left out stay locked, undispatched, until this transaction ends.
        changes.truncate(candidates.within_delivery_budget(&changes));
        let wanted: Vec<usize> = (0..changes.len())
            .filter(|&i| candidates.read_contents_of(&changes[i]))
            .collect();
        if !wanted.is_empty() {
            let kept = queries::read_contents(&mut tx, &mut changes, &wanted).await?;
            changes.truncate(kept);
        }
        // Evaluation is CPU work on user input (bounded by its budget, but still up to that budget
        // per suspended subscription): off the async threads, so that delivery, lease renewal and
        // the other dispatch loops of this process keep running meanwhile.
        let logged_errors = self.logged_errors.clone();
        let evaluated = tokio::task::spawn_blocking(move || {
            evaluate_batch(&changes, &candidates, &logged_errors)
        })
        .await
        .map_err(|panicked| DispatchError::Evaluation(panicked.to_string()))?;
        let mut report = evaluated.report;
        let sender = self
            .local_delivery
            .as_ref()
            .map_or("", |wake| wake.sender());
        report.deliveries = queries::record_dispatch(
            &mut tx,
            &evaluated.deliveries,
            &evaluated.seqs,
            &evaluated.dispatch_errors,
            sender,
        )
        .await?;
        queries::count_evaluation_errors(&mut tx, &evaluated.errors).await?;
        // A suspension is recorded once per subscription version, whichever dispatcher found it;
        // every dispatcher reads these rows when it loads subscriptions.
        for (subscription_id, message) in
            queries::record_new_issues(&mut tx, &evaluated.suspensions).await?
        {
            tracing::warn!(subscription = %subscription_id,
                "subscription suspended until it is changed (fhir_outbox.subscription_issue): {message}");
        }
        tx.commit().await?;
        if let (Some(wake), true) = (&self.local_delivery, report.deliveries > 0) {
            wake.wake();
        }
        crate::metrics::dispatched(report.changes, report.deliveries);
        crate::metrics::undispatchable(report.undispatchable);
        Ok(report)
    }

    /// Marks one change dispatched with the error it fails with alone, without evaluating it: the
    /// last resort for a row that keeps failing, so that it cannot block the rows behind it.
    async fn set_aside(&self, seq: i64, error: &DispatchError) {
        match queries::set_aside(&self.pool, seq, &format!("set aside: {error}")).await {
            Ok(true) => {
                crate::metrics::undispatchable(1);
                tracing::error!(seq, %error, "outbox row fails to dispatch on its own; marked dispatched with the error");
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(seq, %error, "cannot set the failing outbox row aside"),
        }
    }

    /// The subscriptions for the projects of `changes`, recompiling those whose epoch (read with
    /// the changes, [`queries::claim_changes`]) moved.
    async fn candidates(
        &self,
        conn: &mut PgConnection,
        changes: &[ClaimedChange],
        epochs: &[queries::ProjectEpoch],
    ) -> Result<Candidates, sqlx::Error> {
        let mut projects: Vec<Uuid> = changes.iter().map(|change| change.project_id).collect();
        projects.sort_unstable();
        projects.dedup();
        let stale: Vec<Uuid> = {
            let cache = self.cache.lock().expect("cache lock");
            epochs
                .iter()
                .filter(|epoch| {
                    cache.get(&epoch.id).map(|cached| cached.epoch)
                        != Some(epoch.subscription_epoch)
                })
                .map(|epoch| epoch.id)
                .collect()
        };
        if !stale.is_empty() {
            let loaded = self.load(conn, &stale, epochs).await?;
            let mut cache = self.cache.lock().expect("cache lock");
            for (project, cached) in loaded {
                cache.insert(project, cached);
            }
        }
        let cache = self.cache.lock().expect("cache lock");
        let mut candidates = Candidates {
            by_project: HashMap::new(),
            server_scope: Vec::new(),
        };
        for epoch in epochs {
            let Some(cached) = cache.get(&epoch.id) else {
                continue;
            };
            if projects.binary_search(&epoch.id).is_ok() {
                candidates
                    .by_project
                    .insert(epoch.id, cached.subscriptions.clone());
            }
            if cached.server_scope && self.config.server_scoped_subscriptions {
                candidates
                    .server_scope
                    .push((epoch.id, cached.subscriptions.clone()));
            }
        }
        Ok(candidates)
    }

    async fn load(
        &self,
        conn: &mut PgConnection,
        projects: &[Uuid],
        epochs: &[queries::ProjectEpoch],
    ) -> Result<Vec<(Uuid, CachedProject)>, sqlx::Error> {
        let rows = queries::active_subscriptions(conn, projects).await?;
        let topics = load_topics(conn, projects).await?;
        let mut grouped: HashMap<Uuid, Vec<Arc<CompiledSubscription>>> = HashMap::new();
        let mut issues = Vec::new();
        for row in rows {
            let content = match row.content {
                Ok(content) => content,
                Err(message) => {
                    issues.push(Issue {
                        project_id: row.project_id,
                        subscription_id: row.id,
                        subscription_version: row.version_id,
                        kind: IssueKind::Invalid.as_str(),
                        message,
                        occurrences: 1,
                    });
                    continue;
                }
            };
            let server_scope = epochs
                .iter()
                .any(|epoch| epoch.id == row.project_id && epoch.server_scope);
            let mut compiled = CompiledSubscription::compile(
                row.project_id,
                row.version_id,
                &content,
                row.active_since,
                server_scope,
                self.config.allow_unsafe_outbound,
            );
            if let Some(topics) = topics.get(&row.project_id) {
                compiled.bind_topic(topics);
            }
            if let Some(reason) = row.suspended_reason {
                compiled.suspend(reason);
            }
            issues.extend(compiled.issues().into_iter().map(|(kind, message)| Issue {
                project_id: compiled.project_id,
                subscription_id: compiled.id.clone(),
                subscription_version: compiled.version_id,
                kind: kind.as_str(),
                message,
                occurrences: 1,
            }));
            grouped
                .entry(row.project_id)
                .or_default()
                .push(Arc::new(compiled));
        }
        for (subscription_id, message) in queries::record_new_issues(conn, &issues).await? {
            tracing::warn!(subscription = %subscription_id, "subscription issue: {message}");
        }
        Ok(epochs
            .iter()
            .filter(|epoch| projects.contains(&epoch.id))
            .map(|epoch| {
                let subscriptions = grouped.remove(&epoch.id).unwrap_or_default();
                (
                    epoch.id,
                    CachedProject {
                        epoch: epoch.subscription_epoch,
                        server_scope: epoch.server_scope,
                        subscriptions: subscriptions.into(),
                    },
                )
            })
            .collect())
    }

    /// Runs `config.workers` dispatch loops until `shutdown` is cancelled. Each loop dispatches while
    /// there is work, then sleeps until a change is committed (LISTEN `fhir_outbox_change`) or the
    /// poll interval passes. Writers notify only while some loop waits for it (migration 7).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // Wake-up requests left by a dispatcher that died make writers notify for nothing.
        self.remove_stale_waiting().await;
        let (wake, woken) = watch::channel(0u64);
        let (backend, listening_on) = watch::channel(None);
        let listener = tokio::spawn(crate::db::listen_on_backend(
            self.pool.clone(),
            "fhir_outbox_change",
            wake,
            backend,
            shutdown.clone(),
        ));
        let mut loops = tokio::task::JoinSet::new();
        for _ in 0..self.config.workers.max(1) {
            loops.spawn(
                self.clone()
                    .work(woken.clone(), listening_on.clone(), shutdown.clone()),
            );
        }
        loops.spawn(self.clone().queue_heartbeats(shutdown.clone()));
        while loops.join_next().await.is_some() {}
        listener.abort();
    }

    /// Queues the heartbeats that are due (`fhir_outbox.queue_heartbeats`: subscriptions to topics
    /// quiet for their heartbeat period), every poll interval, until `shutdown`.
    async fn queue_heartbeats(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            match queries::queue_heartbeats(&self.pool).await {
                Ok(0) => {}
                Ok(queued) => {
                    crate::metrics::heartbeat_check(Some(queued as u64));
                    tracing::debug!(queued, "heartbeats queued");
                }
                Err(error) => {
                    crate::metrics::heartbeat_check(None);
                    tracing::warn!(%error, "cannot queue heartbeats");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// One dispatch loop. Writers notify `fhir_outbox_change` at commit only when they find a row
    /// of `fhir_outbox.dispatcher_waiting` that is `waiting` (migration 7; the notifying writer
    /// takes the request, clearing the flag; the row stays while the loop runs), because
    /// a notification serialises commits and a busy dispatcher does not need one. So once the outbox
    /// looks drained, the loop registers (`listener`, on the backend that LISTENs for it), looks once
    /// more (for changes that committed before its row was visible to their writers' checks; a
    /// claim only if that look finds any), and only then waits; woken by the poll interval, it
    /// withdraws its row before it drains (woken by a notification, the writer has taken it). A
    /// writer that checked just before the row was visible and committed just after the second look
    /// is found at the next wake-up or poll: late, never lost.
    async fn work(
        self: Arc<Self>,
        mut woken: watch::Receiver<u64>,
        listening_on: watch::Receiver<Option<i32>>,
        shutdown: CancellationToken,
    ) {
        let listener = Uuid::new_v4();
        // Whether our row is `waiting`, as far as we know. A request left set (a failed
        // withdrawal, or one we believed taken) costs one needless notification at most: the next
        // writer takes it, our next registration overwrites it (an upsert), shutdown removes the
        // row, and the row of a process that died is removed by the next dispatcher that starts.
        let mut registered = false;
        let mut failures = 0u32;
        // The rows of a failed batch are retried one at a time: a row that then fails alone, with
        // an error about its data, is the one to set aside, and the others go through. Setting
        // aside anything else (the oldest row, say) could mark an innocent change.
        let mut single_rows_left = 0usize;
        let mut failing_alone: Option<(i64, u32)> = None;
        while !shutdown.is_cancelled() {
            woken.borrow_and_update();
            let limit = if single_rows_left > 0 {
                1
            } else {
                self.config.batch_size
            };
            match self.dispatch_batch(limit).await {
                Ok(Batch { report, claimed }) => {
                    failures = 0;
                    failing_alone = None;
                    single_rows_left = match report.changes {
                        0 => 0,
                        changes => single_rows_left.saturating_sub(changes),
                    };
                    if report.changes > 0 {
                        // Rows are still coming in (full batch or not): claim again rather than
                        // ask for a wake-up. Registering, looking again and withdrawing after
                        // every short batch made writers pay for a dispatcher that was never
                        // asleep (docs/performance-history.md, run AI); an empty claim is the
                        // sign that the outbox is drained. A second look that found work
                        // withdraws first.
                        if registered {
                            self.unregister(listener).await;
                            registered = false;
                        }
                        // The claim took every undispatched change, found more than one and
                        // dispatched them all: they come faster than the loop claims them but
                        // too slowly to fill a batch. Claiming at once would spend each batch's
                        // fixed work (the claim, the subscriptions, the inserts, the mark) on a
                        // handful of changes, CPU that the writers need; a short wait lets the
                        // next batch carry more (docs/performance-history.md, run AM). One change
                        // means the loop keeps up, so a lone change is never held back; a batch
                        // that a bound cut short left changes waiting, which go at once.
                        let took_all =
                            claimed > 1 && (claimed as i64) < limit && report.changes == claimed;
                        if took_all && !self.config.linger.is_zero() {
                            tokio::select! {
                                _ = tokio::time::sleep(self.config.linger) => {}
                                _ = shutdown.cancelled() => break,
                            }
                        }
                        continue;
                    }
                    if !registered {
                        registered = self.register(listener, &listening_on).await;
                        if registered && self.undispatched_after_registering().await {
                            continue; // the second look found work: claim it
                        }
                    }
                }
                Err(BatchFailure { error, claimed }) => {
                    failures += 1;
                    tracing::warn!(%error, failures, rows = claimed.len(),
                        "dispatch batch failed; it will be retried");
                    if registered {
                        self.unregister(listener).await;
                        registered = false;
                    }
                    match claimed[..] {
                        [seq] if about_the_rows(&error) => {
                            let times = match failing_alone {
                                Some((failed, times)) if failed == seq => times + 1,
                                _ => 1,
                            };
                            failing_alone = Some((seq, times));
                            if times >= ALONE_FAILURES_BEFORE_SET_ASIDE {
                                self.set_aside(seq, &error).await;
                                failing_alone = None;
                                failures = 0;
                                single_rows_left = single_rows_left.saturating_sub(1);
                                continue;
                            }
                        }
                        [_, _, ..] => single_rows_left = claimed.len(),
                        _ => {}
                    }
                    let backoff = crate::delivery::policy::database_backoff(failures);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            let notified = tokio::select! {
                _ = woken.changed() => true,
                _ = tokio::time::sleep(self.config.poll_interval) => false,
                _ = shutdown.cancelled() => break,
            };
            // A notification means a writer took our row with the commit that notified, so the
            // wake-up path costs no extra round trip; after a poll the row is still ours to
            // withdraw. (A notification from elsewhere, such as `resend` or a LISTEN reconnection,
            // can leave the row in place: a writer takes it later, for one needless wake-up.)
            if registered && !notified {
                self.unregister(listener).await;
            }
            registered = false;
        }
        // The loop's row stays while it runs (taken requests only clear its flag): remove it.
        if let Err(error) = queries::forget_waiting(&self.pool, listener).await {
            tracing::warn!(%error, "cannot remove the wake-up row of a stopping dispatch loop");
        }
    }

    /// The second look, once registered: whether changes committed before the registration was
    /// visible to their writers wait undispatched (true when the look fails: the claim looks then).
    async fn undispatched_after_registering(&self) -> bool {
        let from = self.floor.lock().expect("floor lock").start(Instant::now());
        queries::undispatched_from(&self.pool, from)
            .await
            .unwrap_or(true)
    }

    /// Registers the loop `listener` as waiting for a wake-up; false if it cannot be woken (no
    /// LISTEN connection at the moment) or the registration failed, and then the loop polls.
    async fn register(&self, listener: Uuid, listening_on: &watch::Receiver<Option<i32>>) -> bool {
        let Some(backend_pid) = *listening_on.borrow() else {
            return false;
        };
        match queries::register_waiting(&self.pool, listener, backend_pid).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "cannot register for wake-ups; polling");
                false
            }
        }
    }

    /// Withdraws the wake-up request of the loop `listener`. A failure is only logged: the row
    /// then makes writers notify for nothing until the loop registers (an upsert) or withdraws again.
    async fn unregister(&self, listener: Uuid) {
        if let Err(error) = queries::unregister_waiting(&self.pool, listener).await {
            tracing::warn!(%error, "cannot withdraw the wake-up request");
        }
    }

    async fn remove_stale_waiting(&self) {
        match queries::remove_stale_waiting(&self.pool).await {
            Ok(0) => {}
            Ok(removed) => {
                tracing::info!(
                    removed,
                    "removed wake-up requests of dispatchers that are gone"
                )
            }
            Err(error) => tracing::warn!(%error, "cannot remove stale wake-up requests"),
        }
    }
}

/// Whether a failed batch's error is about the data of its rows (a data exception, a constraint or
/// a program limit it breaks: SQLSTATE classes 22, 23, 54), as opposed to the database being
/// unavailable, busy, full or misconfigured, which would fail any row: only the former lets a row
/// that fails alone be set aside. An evaluation that panicked on a row is about that row too.
fn about_the_rows(error: &DispatchError) -> bool {
    let db = match error {
        DispatchError::Evaluation(_) => return true,
        DispatchError::Database(sqlx::Error::Database(db)) => db,
        DispatchError::Database(_) => return false,
    };
    db.code().is_some_and(|code| {
        ["22", "23", "54"]
            .iter()
            .any(|class| code.starts_with(class))
    })
}

/// The topics of these projects, by URL (the dispatcher binds subscriptions to them; `explain`
/// too). A topic that cannot be used is logged and kept with the reason, which every subscription
/// to it then reports as its issue; one without a url cannot be named, so it is only logged.
pub(crate) async fn load_topics(
    conn: &mut PgConnection,
    projects: &[Uuid],
) -> Result<HashMap<Uuid, matching::Topics>, sqlx::Error> {
    let mut topics: HashMap<Uuid, matching::Topics> = HashMap::new();
    for stored in queries::live_topics(conn, projects).await? {
        let content = match stored.content {
            Ok(content) => content,
            Err(error) => {
                tracing::warn!(project = %stored.project_id, topic = %stored.id, "{error}");
                continue;
            }
        };
        let Some(url) = crate::topic::topic_url(&content).map(str::to_owned) else {
            tracing::warn!(project = %stored.project_id, topic = %stored.id,
                "topic has no url; no subscription can name it");
            continue;
        };
        let parsed = crate::topic::Topic::parse(&content)
            .map(|(topic, unsupported)| (Arc::new(topic), unsupported))
            .map_err(|error| format!("Basic/{}: {error}", stored.id));
        if let Err(error) = &parsed {
            tracing::warn!(project = %stored.project_id, topic = %stored.id,
                "topic cannot be used; subscriptions to it match nothing: {error}");
        }
        topics
            .entry(stored.project_id)
            .or_default()
            .insert(url, parsed);
    }
    Ok(topics)
}

/// What evaluating a batch decided, for the caller to write in the batch's transaction.
struct Evaluated {
    report: BatchReport,
    deliveries: NewDeliveries,
    seqs: Vec<i64>,
    dispatch_errors: Vec<Option<String>>,
    /// Evaluation errors, one row per subscription version and message with its occurrences.
    errors: Vec<Issue>,
    /// Subscription versions suspended by this batch (their evaluation exhausted its budget).
    suspensions: Vec<Issue>,
}

/// Evaluates every candidate subscription against every change of a claimed batch. Pure CPU work
/// with no database access, so that it can run on a blocking thread.
fn evaluate_batch(
    changes: &[ClaimedChange],
    candidates: &Candidates,
    logged_errors: &Mutex<HashSet<(String, i64, String)>>,
) -> Evaluated {
    // Medplum's requestTime: one evaluation time shared by all deliveries of a change.
    let matched_at = Utc::now();
    let mut report = BatchReport {
        changes: changes.len(),
        ..BatchReport::default()
    };
    let mut deliveries = NewDeliveries::default();
    let mut errors: HashMap<(Uuid, String, i64, String), i64> = HashMap::new();
    let mut suspensions = Vec::new();
    let mut seqs = Vec::with_capacity(changes.len());
    let mut dispatch_errors = Vec::with_capacity(changes.len());
    for change in changes {
        seqs.push(change.seq);
        // Not read: no candidate reads its contents (`Candidates::read_contents_of`).
        let view = if !change.contents_read {
            ChangeView::without_contents(
                &change.resource_type,
                change.interaction,
                Some(change.changed_at),
            )
        } else {
            let (current, previous) = match evaluated_contents(change) {
                Ok(contents) => contents,
                Err(message) => {
                    tracing::error!(seq = change.seq, resource_type = %change.resource_type,
                        resource_id = %change.resource_id, version = change.version_id,
                        "cannot dispatch change: {message}");
                    report.undispatchable += 1;
                    dispatch_errors.push(Some(message));
                    continue;
                }
            };
            if needs_handshake(change, current) {
                push_handshake(&mut deliveries, change, matched_at);
            }
            // Websocket Subscriptions are transient client state; their writes never trigger (§1.3).
            if change.resource_type == "Subscription"
                && subscription::channel_type(current) == "websocket"
            {
                dispatch_errors.push(None);
                continue;
            }
            ChangeView {
                resource_type: &change.resource_type,
                interaction: change.interaction,
                current,
                previous,
                changed_at: Some(change.changed_at),
            }
        };
        dispatch_errors.push(None);
        for subscription in candidates.for_project(change.project_id) {
            // A resend can be for one subscription only (Medplum's $resend `subscription`).
            if let Some(only) = &change.resend_subscription_id {
                if subscription.id != *only || subscription.project_id != change.project_id {
                    continue;
                }
            }
            match matching::evaluate(subscription, &view, false) {
                Verdict::Matched => {
                    push_delivery(&mut deliveries, change, subscription, matched_at, None)
                }
                // Logged and recorded as an issue once per version, when it was compiled.
                Verdict::Refused(reason) => push_delivery(
                    &mut deliveries,
                    change,
                    subscription,
                    matched_at,
                    Some(reason),
                ),
                Verdict::Rejected(_) => {}
                Verdict::Failed(message) => {
                    report.evaluation_errors += 1;
                    log_evaluation_error(logged_errors, subscription, change, &message);
                    *errors
                        .entry((
                            subscription.project_id,
                            subscription.id.clone(),
                            subscription.version_id,
                            message,
                        ))
                        .or_default() += 1;
                }
                Verdict::OverBudget(message) => {
                    report.evaluation_errors += 1;
                    // Later changes of this batch, and of every batch of this process, skip the
                    // version without evaluating it; other processes learn it from the issue row.
                    if subscription.suspend(message.clone()) {
                        tracing::warn!(subscription = %subscription.id,
                            version = subscription.version_id, resource_type = %change.resource_type,
                            resource_id = %change.resource_id, resource_version = change.version_id,
                            "subscription evaluation exhausted its budget; suspended: {message}");
                        suspensions.push(Issue {
                            project_id: subscription.project_id,
                            subscription_id: subscription.id.clone(),
                            subscription_version: subscription.version_id,
                            kind: IssueKind::BudgetExhausted.as_str(),
                            message,
                            occurrences: 1,
                        });
                    }
                }
            }
        }
    }
    let errors = errors
        .into_iter()
        .map(
            |((project_id, subscription_id, subscription_version, message), occurrences)| Issue {
                project_id,
                subscription_id,
                subscription_version,
                kind: IssueKind::EvaluationError.as_str(),
                message,
                occurrences,
            },
        )
        .collect();
    Evaluated {
        report,
        deliveries,
        seqs,
        dispatch_errors,
        errors,
        suspensions,
    }
}

fn log_evaluation_error(
    logged_errors: &Mutex<HashSet<(String, i64, String)>>,
    subscription: &CompiledSubscription,
    change: &ClaimedChange,
    message: &str,
) {
    let key = (
        subscription.id.clone(),
        subscription.version_id,
        message.to_owned(),
    );
    if logged_errors.lock().expect("log lock").insert(key) {
        tracing::warn!(subscription = %subscription.id, resource_type = %change.resource_type,
            resource_id = %change.resource_id, version = change.version_id,
            "subscription evaluation failed (counted in fhir_outbox.subscription_issue): {message}");
    }
}

/// The content criteria are evaluated on and the previous version: for a delete, the last live
/// version is both (as in Medplum).
fn evaluated_contents(
    change: &ClaimedChange,
) -> Result<(&serde_json::Value, Option<&serde_json::Value>), String> {
    if let Some(problem) = &change.undecodable {
        return Err(problem.clone());
    }
    match (change.interaction, &change.current, &change.previous) {
        (Interaction::Delete, _, Some(previous)) => Ok((previous, Some(previous))),
        (Interaction::Delete, _, None) => Err(format!(
            "the last live version {:?} of the deleted resource is missing",
            change.previous_version_id
        )),
        (_, Some(current), previous) => Ok((current, previous.as_ref())),
        (_, None, _) => Err(format!("version {} is missing", change.version_id)),
    }
}

/// A subscription to a topic written with status `requested` gets a handshake (the backport's
/// workflow): its outcome makes it `active` or `error` (migration 20261207000001).
fn needs_handshake(change: &ClaimedChange, current: &serde_json::Value) -> bool {
    change.resource_type == "Subscription"
        && change.interaction != Interaction::Delete
        && subscription::status(current) == "requested"
        && subscription::channel_type(current) == "rest-hook"
        && crate::topic::is_backport_subscription(current)
}

/// The handshake of the Subscription that `change` wrote: a delivery to it about itself.
fn push_handshake(
    rows: &mut NewDeliveries,
    change: &ClaimedChange,
    matched_at: chrono::DateTime<Utc>,
) {
    push_row(
        rows,
        change,
        change.project_id,
        &change.resource_id,
        matched_at,
        None,
        Some("handshake"),
    );
}

fn push_delivery(
    rows: &mut NewDeliveries,
    change: &ClaimedChange,
    subscription: &CompiledSubscription,
    matched_at: chrono::DateTime<Utc>,
    skipped: Option<String>,
) {
    push_row(
        rows,
        change,
        subscription.project_id,
        &subscription.id,
        matched_at,
        skipped,
        subscription
            .topic_url()
            .is_some()
            .then_some("event-notification"),
    );
}

/// The namespace of [`webhook_id`]'s name-based UUIDs.
const WEBHOOK_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_2c4a_8d3b_5e70_9a21_c4f8_0b6d_3e15);

/// A delivery's `webhook-id`, the same whenever its change is dispatched: a name-based UUID
/// (version 5) of the change (its outbox row and the time it was written), the subscription and
/// what the delivery carries. A dispatch commits without waiting for its WAL to reach disk, so a
/// crash of PostgreSQL can lose one whose delivery a worker already sent; the change is then
/// dispatched again, and the request sent again must carry the same `webhook-id` for the receiver
/// to recognise it. The write time keeps ids apart when outbox numbers are given again (a database
/// restored to an earlier point): a new change must never look like a copy of an old one.
fn webhook_id(
    change: &ClaimedChange,
    project_id: Uuid,
    subscription_id: &str,
    notification: Option<&str>,
) -> Uuid {
    let name = format!(
        "{}/{}/{project_id}/{subscription_id}/{}",
        change.seq,
        change.changed_at.timestamp_micros(),
        notification.unwrap_or("")
    );
    Uuid::new_v5(&WEBHOOK_ID_NAMESPACE, name.as_bytes())
}

fn push_row(
    rows: &mut NewDeliveries,
    change: &ClaimedChange,
    project_id: Uuid,
    subscription_id: &str,
    matched_at: chrono::DateTime<Utc>,
    skipped: Option<String>,
    notification: Option<&'static str>,
) {
    rows.webhook_id.push(webhook_id(
        change,
        project_id,
        subscription_id,
        notification,
    ));
    rows.notification.push(notification);
    rows.project_id.push(project_id);
    rows.subscription_id.push(subscription_id.to_owned());
    rows.outbox_seq.push(change.seq);
    rows.resource_project_id.push(change.project_id);
    rows.resource_type.push(change.resource_type.clone());
    rows.resource_id.push(change.resource_id.clone());
    rows.version_id.push(change.version_id);
    rows.previous_version_id.push(change.previous_version_id);
    rows.interaction
        .push(change.interaction.as_str().to_owned());
    rows.changed_at.push(change.changed_at);
    rows.request_id.push(change.request_id.clone());
    rows.trace_id.push(change.trace_id.clone());
    rows.matched_at.push(matched_at);
    rows.state.push(
        if skipped.is_some() {
            "skipped"
        } else {
            "pending"
        }
        .to_owned(),
    );
    rows.reason.push(skipped);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_stay_full_while_full_scans_are_fast() {
        let mut floor = ScanFloor::default();
        let t0 = Instant::now();
        floor.committed(0, Duration::from_millis(2), Some(100), t0);
        let later = t0 + FLOOR_LAG * 2;
        assert_eq!(floor.start(later), 0);
    }

    #[test]
    fn a_slow_full_scan_starts_busy_claims_from_a_seq_claimed_long_enough_ago() {
        let mut floor = ScanFloor::default();
        let t0 = Instant::now();
        floor.committed(0, SLOW_FULL_SCAN * 2, Some(100), t0);
        // Too recent to be a floor yet.
        assert_eq!(floor.start(t0 + Duration::from_secs(1)), 0);
        floor.committed(
            0,
            SLOW_FULL_SCAN * 2,
            Some(150),
            t0 + Duration::from_secs(1),
        );
        floor.committed(7, Duration::ZERO, Some(200), t0 + Duration::from_secs(3));
        // The newest mark at least FLOOR_LAG old.
        assert_eq!(floor.start(t0 + Duration::from_secs(6)), 150);
        assert_eq!(floor.start(t0 + Duration::from_secs(8)), 200);
        // A full scan is due every FULL_SCAN_EVERY, and a fast one turns floors off.
        let due = t0 + Duration::from_secs(1) + FULL_SCAN_EVERY;
        assert_eq!(floor.start(due), 0);
        floor.committed(0, Duration::from_millis(1), Some(300), due);
        assert_eq!(floor.start(due + FLOOR_LAG), 0);
    }
}
