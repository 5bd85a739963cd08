//! Delivery: the rest-hook worker, as stages with one job each (as River splits its executor, which
//! decides, from its completer, which only batches and commits).
//!
//! A worker ([`worker`]) claims due deliveries in batches with `FOR UPDATE SKIP LOCKED`, each claim
//! taking a lease (a token and an expiry, renewed while the delivery is in this process). The claim
//! statement also reads what Medplum's preamble needs, each subscription once per batch, compiled
//! once for the batch's deliveries ([`preamble::Target`]). The [`preamble`] turns a delivery into a
//! prepared request or a stop; [`transport`] performs the request (HTTP POST or bot run) and says
//! what happened; [`outcome`] decides, purely, what that comes to under the retry rules of
//! [`policy`]; the [`recorder`] writes decisions in batches: the completions, fenced by their lease
//! tokens, the attempt rows and the AuditEvents of a batch commit in one transaction, so a worker
//! whose lease expired (it was paused, or presumed dead) can never overwrite a newer attempt. A batch
//! that fails to commit is recorded again one delivery at a time, so one bad row cannot hold the
//! others back. A worker killed mid-delivery loses nothing: its leases expire and another worker
//! delivers.

pub mod auto_disable;
pub mod headers;
mod lanes;
pub mod lease;
pub mod outbound;
mod outcome;
pub mod policy;
mod preamble;
mod queries;
mod recorder;
pub mod signature;
mod slots;
pub mod state;
mod transport;
mod worker;

pub use queries::{Notification, RECORD_BEGIN};
pub use state::{DeliveryState, FailureReason, Reason, SkipReason};
pub use worker::{DeliveryWorker, LocalWake};

use policy::Backoff;
use std::time::Duration;

/// How a delivery worker works.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Requests in flight at once in this process (each is a task and, for HTTP, a connection:
    /// cheap, since the I/O is asynchronous). Claimed deliveries wait for a slot 1 s at most; a
    /// freed slot goes to the waiting endpoint that holds the fewest (`slots::SlotQueue`).
    pub concurrency: usize,
    /// Deliveries in progress at once to one endpoint (a project's scheme, host and port), from
    /// claim until their outcome is recorded, across every worker: the claim counts the live leases
    /// of all of them in the database. Requests in flight to it are at most as many. It grows for
    /// endpoints that answer fast (see [`policy::EndpointAllowance`]).
    pub endpoint_allowance: policy::EndpointAllowance,
    /// How long a request may hold its slot: one still unanswered after this moves to one of
    /// `concurrency` places kept for slow requests (while one is free), and its slot goes to
    /// other work. Endpoints that hang or answer slowly then hold those places, not the slots
    /// everyone else's deliveries need (the per-endpoint allowance still caps each of them), and
    /// a freed slot goes first to endpoints holding fewer.
    pub slow_request_after: Duration,
    /// The endpoints' circuit breaker.
    pub circuit: policy::CircuitBreaker,
    /// Deliveries claimed per claim query, ahead of the request slots (a new batch is claimed when
    /// fewer than half a batch wait). Larger batches cost the database less per delivery.
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
    /// The base URL of the FHIR API that serves the resources (no trailing `/`): notification
    /// bundles of subscriptions to topics name their focus and subscription by it. The default,
    /// under the reserved `.invalid` domain, says plainly that it was not configured.
    pub fhir_base_url: String,
}

/// [`DeliveryConfig::fhir_base_url`] when none is configured.
pub const DEFAULT_FHIR_BASE_URL: &str = "https://fhir-outbox.invalid/fhir";

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 512,
            endpoint_allowance: policy::EndpointAllowance::default(),
            slow_request_after: Duration::from_secs(2),
            circuit: policy::CircuitBreaker::default(),
            claim_batch: 400,
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
            fhir_base_url: DEFAULT_FHIR_BASE_URL.to_owned(),
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

/// The span of the log lines about one delivery: its ids (never the body, headers or endpoint).
/// Made where a line is written, not for every delivery: the log's subscriber formats a span's
/// fields when the span is made, a twentieth of the worker's CPU when it was one per delivery
/// (docs/performance-history.md, run W).
fn delivery_span(delivery: &queries::ClaimedDelivery) -> tracing::Span {
    tracing::info_span!(
        "delivery",
        delivery = delivery.id,
        subscription = %delivery.subscription_id,
        resource = %format_args!("{}/{}", delivery.resource_type, delivery.resource_id),
        version = delivery.version_id,
        attempt = delivery.attempts + 1,
        request_id = %delivery.request_id,
        trace_id = %delivery.trace_id,
    )
}
