//! Metric names and the functions that record them, in one place. Histograms are named after
//! Medplum's (`medplum.subscription.queuedDuration`, …) in Prometheus style. No metric has a project
//! or subscription label: a metrics endpoint must not reveal one tenant's activity to another, and
//! per-subscription state is in SQL (`fhir_outbox.subscription_delivery_status`).
//!
//! Recording is a no-op until a recorder is installed (`fhir-outbox run` installs the Prometheus one).

use std::time::Duration;

/// Change → first attempt (first attempt only).
pub const QUEUED_DURATION: &str = "fhir_outbox_subscription_queued_duration_seconds";
/// One execution (preamble and request) that succeeded.
pub const EXECUTION_DURATION: &str = "fhir_outbox_subscription_execution_duration_seconds";
/// Change → successful delivery.
pub const TOTAL_DURATION: &str = "fhir_outbox_subscription_total_duration_seconds";
/// One execution that failed.
pub const FAILED_EXECUTION_DURATION: &str =
    "fhir_outbox_subscription_failed_execution_duration_seconds";
/// The HTTP request alone.
pub const FETCH_DURATION: &str = "fhir_outbox_subscription_rest_hook_fetch_duration_seconds";
/// The latency metrics, exported as Prometheus histograms (with [`LATENCY_BUCKETS`]), so they can
/// be aggregated across workers.
pub const LATENCY_HISTOGRAMS: [&str; 5] = [
    QUEUED_DURATION,
    EXECUTION_DURATION,
    TOTAL_DURATION,
    FAILED_EXECUTION_DURATION,
    FETCH_DURATION,
];
/// Bucket bounds (seconds) of the latency histograms: 5 ms to the 120 s request timeout for a
/// request, then 10 min, 1 h and 8 h (the longest retry delay) for the durations from a change.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0,
    3600.0, 28800.0,
];
/// HTTP attempts, by `outcome` (`succeeded`, `failed`).
pub const ATTEMPTS: &str = "fhir_outbox_delivery_attempts_total";
/// Deliveries that reached a final state, by `state`.
pub const FINISHED: &str = "fhir_outbox_deliveries_finished_total";
/// Outbox rows dispatched.
pub const DISPATCHED: &str = "fhir_outbox_dispatched_changes_total";
/// Deliveries enqueued by dispatch.
pub const ENQUEUED: &str = "fhir_outbox_deliveries_enqueued_total";
/// Changes dispatch set aside with a `dispatch_error` (never delivered).
pub const UNDISPATCHABLE: &str = "fhir_outbox_undispatchable_changes_total";
/// Undispatched outbox rows (counted up to 100,000).
pub const BACKLOG: &str = "fhir_outbox_outbox_backlog";
/// Age of the oldest undispatched change.
pub const OLDEST_UNDISPATCHED_AGE: &str = "fhir_outbox_oldest_undispatched_age_seconds";
/// Pending deliveries (counted up to 100,000).
pub const PENDING: &str = "fhir_outbox_deliveries_pending";
/// Age of the oldest change among the next 1,000 due deliveries.
pub const OLDEST_PENDING_AGE: &str = "fhir_outbox_oldest_pending_delivery_age_seconds";

/// Endpoints whose circuit is open or half-open, in every project (no endpoint label: the state of
/// each is in `fhir_outbox.endpoint_health`).
pub const OPEN_CIRCUITS: &str = "fhir_outbox_open_circuits";
/// Circuit state changes, by the state entered (`open`, `half_open`, `closed`).
pub const CIRCUIT_TRANSITIONS: &str = "fhir_outbox_circuit_transitions_total";
/// Counter: operator actions (command line, console, API), by action.
pub const OPERATOR_ACTIONS: &str = "fhir_outbox_operator_actions_total";
/// Counter: work of the hot table's lane rotation, by `event` (`moved`: deliveries moved to the
/// current lane, `truncated`, `switched`).
pub const LANE_ROTATION: &str = "fhir_outbox_delivery_lane_rotation_total";
/// Counter: heartbeat notifications queued for subscriptions to topics quiet for their heartbeat
/// period. A flat line while subscriptions have periods is the alert: heartbeats stopped.
pub const HEARTBEATS_QUEUED: &str = "fhir_outbox_heartbeats_queued_total";
/// Counter: failed calls of the heartbeat check (each is also a warning in the log).
pub const HEARTBEAT_CHECK_FAILURES: &str = "fhir_outbox_heartbeat_check_failures_total";
/// Gauge: requests of this process unanswered after `slow_request_after`, waiting in the places
/// kept for slow requests instead of request slots.
pub const SLOW_REQUESTS: &str = "fhir_outbox_slow_requests";
/// Claimed deliveries given back to the table, unattempted, after waiting 1 s for a request slot.
pub const GIVEN_BACK: &str = "fhir_outbox_deliveries_given_back_total";
/// Tables analysed by a worker because their planner statistics were stale (`operations::statistics`).
pub const TABLES_ANALYZED: &str = "fhir_outbox_tables_analyzed_total";
/// Failed calls of the statistics check (see the log's warnings).
pub const STATISTICS_CHECK_FAILURES: &str = "fhir_outbox_statistics_check_failures_total";

/// Describes every metric (HELP lines).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        QUEUED_DURATION,
        metrics::Unit::Seconds,
        "Change to first delivery attempt."
    );
    describe_histogram!(
        EXECUTION_DURATION,
        metrics::Unit::Seconds,
        "A successful execution."
    );
    describe_histogram!(
        TOTAL_DURATION,
        metrics::Unit::Seconds,
        "Change to successful delivery."
    );
    describe_histogram!(
        FAILED_EXECUTION_DURATION,
        metrics::Unit::Seconds,
        "A failed execution."
    );
    describe_histogram!(
        FETCH_DURATION,
        metrics::Unit::Seconds,
        "The rest-hook HTTP request."
    );
    describe_counter!(ATTEMPTS, "HTTP attempts by outcome.");
    describe_counter!(FINISHED, "Deliveries that reached a final state, by state.");
    describe_counter!(DISPATCHED, "Outbox rows dispatched.");
    describe_counter!(ENQUEUED, "Deliveries enqueued by dispatch.");
    describe_counter!(
        UNDISPATCHABLE,
        "Changes set aside by dispatch with a dispatch_error, never delivered."
    );
    describe_gauge!(BACKLOG, "Undispatched outbox rows (up to 100000).");
    describe_gauge!(
        OLDEST_UNDISPATCHED_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest undispatched change."
    );
    describe_gauge!(PENDING, "Pending deliveries (up to 100000).");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest change among the next 1000 due deliveries."
    );
    describe_gauge!(
        OPEN_CIRCUITS,
        "Endpoints whose circuit is open or half-open (details in fhir_outbox.endpoint_health)."
    );
    describe_counter!(
        CIRCUIT_TRANSITIONS,
        "Endpoint circuit state changes, by the state entered."
    );
    describe_counter!(
        OPERATOR_ACTIONS,
        "Operator actions (command line, console, API), by action."
    );
    describe_counter!(
        LANE_ROTATION,
        "Hot table lane rotation: deliveries moved, lanes truncated, lane switches."
    );
    describe_counter!(
        HEARTBEATS_QUEUED,
        "Heartbeat notifications queued for subscriptions to topics."
    );
    describe_counter!(
        HEARTBEAT_CHECK_FAILURES,
        "Failed calls of the heartbeat check (see the log's warnings)."
    );
    describe_gauge!(
        SLOW_REQUESTS,
        "Requests unanswered after the slow-request time, moved out of their request slots."
    );
    describe_counter!(
        GIVEN_BACK,
        "Claimed deliveries given back to the table unattempted: no request slot within 1 s."
    );
    describe_counter!(
        TABLES_ANALYZED,
        "Tables a worker analysed because their planner statistics were stale."
    );
    describe_counter!(
        STATISTICS_CHECK_FAILURES,
        "Failed calls of the planner statistics check (see the log's warnings)."
    );
}

/// A statistics check analysed `analyzed` tables (`None`: the check failed).
pub fn statistics_check(analyzed: Option<usize>) {
    match analyzed {
        Some(tables) => metrics::counter!(TABLES_ANALYZED).increment(tables as u64),
        None => metrics::counter!(STATISTICS_CHECK_FAILURES).increment(1),
    }
}

/// Claimed deliveries went back to the table without a slot.
pub fn given_back(deliveries: usize) {
    metrics::counter!(GIVEN_BACK).increment(deliveries as u64);
}

/// Counts a request in [`SLOW_REQUESTS`] while it lives (an aborted request is uncounted too).
pub struct SlowRequest(());

impl SlowRequest {
    /// A request moved to the places kept for slow requests.
    pub fn start() -> SlowRequest {
        metrics::gauge!(SLOW_REQUESTS).increment(1.0);
        SlowRequest(())
    }
}

impl Drop for SlowRequest {
    fn drop(&mut self) {
        metrics::gauge!(SLOW_REQUESTS).decrement(1.0);
    }
}

/// A lane rotation pass did something.
pub fn lane_rotation(moved: u64, truncated: bool, switched: bool) {
    if moved > 0 {
        metrics::counter!(LANE_ROTATION, "event" => "moved").increment(moved);
    }
    if truncated {
        metrics::counter!(LANE_ROTATION, "event" => "truncated").increment(1);
    }
    if switched {
        metrics::counter!(LANE_ROTATION, "event" => "switched").increment(1);
    }
}

/// An HTTP attempt finished.
pub fn attempt(succeeded: bool, fetch: Duration) {
    let outcome = if succeeded { "succeeded" } else { "failed" };
    metrics::counter!(ATTEMPTS, "outcome" => outcome).increment(1);
    metrics::histogram!(FETCH_DURATION).record(fetch.as_secs_f64());
}

/// An execution finished; `queued` only for a first attempt, `total` only for a success.
pub fn execution(
    succeeded: bool,
    duration: Duration,
    queued: Option<Duration>,
    total: Option<Duration>,
) {
    let name = if succeeded {
        EXECUTION_DURATION
    } else {
        FAILED_EXECUTION_DURATION
    };
    metrics::histogram!(name).record(duration.as_secs_f64());
    if let Some(queued) = queued {
        metrics::histogram!(QUEUED_DURATION).record(queued.as_secs_f64());
    }
    if let Some(total) = total {
        metrics::histogram!(TOTAL_DURATION).record(total.as_secs_f64());
    }
}

/// A delivery reached a final state.
pub fn finished(state: crate::delivery::DeliveryState) {
    metrics::counter!(FINISHED, "state" => state.as_str()).increment(1);
}

/// An operator action was performed; `cancelled` deliveries reached their final state by it.
pub fn operator_action(action: &'static str, cancelled: usize) {
    metrics::counter!(OPERATOR_ACTIONS, "action" => action).increment(1);
    if cancelled > 0 {
        metrics::counter!(FINISHED, "state" => "cancelled").increment(cancelled as u64);
    }
}

/// A dispatch batch finished.
pub fn dispatched(changes: usize, deliveries: u64) {
    metrics::counter!(DISPATCHED).increment(changes as u64);
    metrics::counter!(ENQUEUED).increment(deliveries);
}

/// Changes were marked dispatched with an error.
pub fn undispatchable(changes: usize) {
    if changes > 0 {
        metrics::counter!(UNDISPATCHABLE).increment(changes as u64);
    }
}

/// A heartbeat check ran: it queued `queued` heartbeats, or failed (`None`).
pub fn heartbeat_check(queued: Option<u64>) {
    match queued {
        Some(queued) => metrics::counter!(HEARTBEATS_QUEUED).increment(queued),
        None => metrics::counter!(HEARTBEAT_CHECK_FAILURES).increment(1),
    }
}

/// The periodic state gauges.
pub fn backlog(gauges: &crate::db::BacklogGauges) {
    metrics::gauge!(BACKLOG).set(gauges.undispatched as f64);
    metrics::gauge!(OLDEST_UNDISPATCHED_AGE).set(gauges.oldest_undispatched_seconds);
    metrics::gauge!(PENDING).set(gauges.pending as f64);
    metrics::gauge!(OLDEST_PENDING_AGE).set(gauges.oldest_pending_seconds);
    metrics::gauge!(OPEN_CIRCUITS).set(gauges.open_circuits as f64);
}

/// A circuit entered state `to` (the claim makes it `half_open`, the recorder the others).
pub fn circuit_transition(to: &str) {
    let to = match to {
        "open" => "open",
        "half_open" => "half_open",
        _ => "closed",
    };
    metrics::counter!(CIRCUIT_TRANSITIONS, "to" => to).increment(1);
}
