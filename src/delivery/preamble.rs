//! Medplum's preamble (docs/medplum-rest-hook.md §1.5), then everything needed to send: from a claimed delivery, its
//! subscription as compiled for the batch ([`Target`]) and its resource as read with the claim, a
//! prepared [`Request`] or a [`Stop`]. Decides nothing about retries.

use super::DeliveryConfig;
use super::auto_disable::{self, Trigger};
use super::headers;
use super::outbound;
use super::policy::Rules;
use super::queries::{ClaimedDelivery, Notification, ResourceNow, SubscriptionNow};
use super::signature;
use super::state::{FailureReason, SkipReason};
use crate::audit;
use crate::capture::{self, Interaction, StoreError};
use crate::subscription;
use crate::topic::{
    self, BackportSubscription, NotificationEvent, NotificationType, SubscriptionStatus,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use sqlx::PgPool;
use std::sync::Arc;

/// A subscription as it stands now, compiled once per batch for the deliveries of the batch to it:
/// what the preamble checks and what every request to it needs.
#[derive(Debug)]
pub(super) struct Target {
    /// Why the subscription (or its project's settings) could not be decoded.
    pub undecodable: Option<String>,
    /// The subscription; `None` when it was deleted.
    pub subscription: Option<Arc<Value>>,
    /// `channel.type`.
    pub channel: String,
    /// `status`.
    pub status: String,
    /// `channel.endpoint`.
    pub endpoint: Option<String>,
    /// The endpoint as a URL checked for outbound safety (without DNS), or why it is refused;
    /// checked once per batch, not per request. `None` for a `Bot/` endpoint or none.
    pub url: Option<Result<reqwest::Url, String>>,
    /// The `channel.header` entries, or why they are invalid.
    pub custom_headers: Result<Vec<(HeaderName, HeaderValue)>, String>,
    /// The signing secret.
    pub secret: Option<String>,
    /// Its retry rules (max attempts, success codes).
    pub rules: Rules,
    /// Auto-disable triggers (the project's, or the server's).
    pub auto_disable: Vec<Trigger>,
    /// Whether its AuditEvents are redacted.
    pub redact: bool,
    /// Where its AuditEvents go.
    pub audit_destinations: audit::Destinations,
    /// What its transmit AuditEvents say of it.
    pub audit_subscription: audit::TransmitSubscription,
    /// For a subscription to a topic: how it reads, or why it cannot be read.
    pub backport: Option<Result<BackportSubscription, String>>,
    /// The FHIR base URL notification bundles refer to resources by.
    pub fhir_base_url: String,
}

impl Target {
    /// Compiles a subscription as read by the claim. Also returns what is wrong with one of its
    /// extensions (the default applies), for the caller to report once.
    pub(super) fn compile(
        now: &SubscriptionNow,
        config: &DeliveryConfig,
    ) -> (Target, Option<String>) {
        let subscription = now.content.clone();
        let content = subscription.as_deref().unwrap_or(&Value::Null);
        let (rules, problem) = match &subscription {
            Some(subscription) => Rules::of(subscription),
            None => (Rules::default(), None),
        };
        let redact =
            audit::application::redaction_enabled(config.redact_audit_events, &now.settings);
        let endpoint = subscription::endpoint(content);
        let target = Target {
            undecodable: now.undecodable.clone(),
            channel: subscription::channel_type(content).to_owned(),
            status: subscription::status(content).to_owned(),
            endpoint: endpoint.map(str::to_owned),
            url: endpoint
                .filter(|endpoint| !endpoint.starts_with("Bot/"))
                .map(|endpoint| {
                    outbound::check_url(endpoint, config.allow_unsafe_outbound)
                        .map_err(|refused| refused.to_string())
                }),
            custom_headers: headers::custom_headers(content).map_err(|error| error.to_string()),
            secret: signature::secret(content).map(str::to_owned),
            rules,
            auto_disable: auto_disable::project_triggers(&now.settings, &config.auto_disable),
            redact,
            audit_destinations: audit::destinations(content),
            audit_subscription: audit::TransmitSubscription::new(content, redact),
            backport: topic::is_backport_subscription(content).then(|| {
                BackportSubscription::parse(content).map(|(subscription, _)| subscription)
            }),
            fhir_base_url: config.fhir_base_url.clone(),
            subscription,
        };
        (target, problem)
    }

    /// The subscription (`null` when it was deleted).
    pub(super) fn content(&self) -> &Value {
        self.subscription.as_deref().unwrap_or(&Value::Null)
    }
}

/// Why the preamble sends nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stop {
    /// Nothing to send any more (no request, no AuditEvent, as Medplum).
    Skipped(SkipReason),
    /// Nothing to send and nothing wrong: the endpoint was removed after matching.
    Done,
    /// The delivery cannot be made as it stands: failed, no request.
    Refused(FailureReason),
}

/// What the preamble came to.
pub(super) enum Prepared {
    /// No request.
    Stop(Stop),
    /// A request to make.
    Send(Box<Request>),
}

/// Everything needed to send one delivery (its headers are built when it is sent, for their
/// timestamp).
pub(super) struct Request {
    /// The subscription it goes to.
    pub target: Arc<Target>,
    /// `channel.endpoint`.
    pub endpoint: String,
    /// For a `Bot/` endpoint: the Bot (or why it cannot be found) and the handler's input.
    pub bot: Option<(Result<Value, String>, Value)>,
    /// What is sent and signed.
    pub body: Vec<u8>,
    /// The resource's display, for the AuditEvent.
    pub resource_display: Option<String>,
    /// A shorter time allowed for the whole request than the worker's (a subscription to a
    /// topic's `backport-timeout`).
    pub timeout: Option<std::time::Duration>,
}

impl Request {
    /// The request's headers, signed with `timestamp`.
    pub(super) fn headers(&self, delivery: &ClaimedDelivery, timestamp: i64) -> HeaderMap {
        let webhook_id = delivery.webhook_id.to_string();
        let deleted = format!("{}/{}", delivery.resource_type, delivery.resource_id);
        // Medplum's header describes Medplum's body; a notification bundle says it all itself.
        let medplum_body = delivery.notification.is_none();
        let custom = match &self.target.custom_headers {
            Ok(custom) => custom.as_slice(),
            Err(_) => &[],
        };
        headers::build(&headers::RequestHeaders {
            subscription_id: &delivery.subscription_id,
            interaction: delivery.interaction,
            deleted_resource: (medplum_body && delivery.interaction == Interaction::Delete)
                .then_some(deleted.as_str()),
            custom,
            trace_id: &delivery.trace_id,
            webhook_id: &webhook_id,
            timestamp,
            secret: self.target.secret.as_deref(),
            body: &self.body,
        })
    }
}

/// Medplum's preamble, then everything needed to send, from what was read for the whole batch: the
/// subscription as it is now (`None`: not read, as deleted) and the resource. Reads the database
/// only for a `Bot/` endpoint; an error is database trouble (retried on the preamble's budget).
pub(super) async fn prepare(
    pool: &PgPool,
    delivery: &ClaimedDelivery,
    target: Option<&Arc<Target>>,
    resource: ResourceNow,
) -> Result<Prepared, StoreError> {
    let stop = |stop| Ok(Prepared::Stop(stop));
    if let Some(problem) = target.and_then(|target| target.undecodable.as_ref()) {
        return Ok(undecodable(delivery, problem.clone()));
    }
    let Some(target) = target.filter(|target| target.subscription.is_some()) else {
        return stop(Stop::Skipped(SkipReason::SubscriptionDeleted));
    };
    if target.channel != "rest-hook" {
        return stop(Stop::Skipped(SkipReason::Channel(target.channel.clone())));
    }
    if let Some(notification) = delivery.notification {
        return Ok(prepare_notification(
            delivery,
            target,
            resource,
            notification,
        ));
    }
    if target.status != "active" {
        return stop(Stop::Skipped(SkipReason::Status(target.status.clone())));
    }
    let Some(endpoint) = target.endpoint.clone() else {
        return stop(Stop::Done);
    };
    // A `Bot/<id>` endpoint runs the handler the application registered for that Bot (rare enough
    // to be read on its own).
    let bot = match endpoint.strip_prefix("Bot/") {
        None => None,
        Some(bot_id) => Some(
            match capture::read(pool, delivery.project_id, "Bot", bot_id).await {
                Ok(bot) => Ok(bot),
                Err(StoreError::NotFound(_) | StoreError::Gone(_) | StoreError::InvalidId(_)) => {
                    Err(format!(
                        "{endpoint} does not exist in the subscription's project"
                    ))
                }
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
        // A replay sends what was sent before, whatever became of the resource since.
        if !delivery.replay && resource.current_version.is_none() {
            return stop(Stop::Skipped(SkipReason::ResourceNotStored));
        }
        if !delivery.replay && resource.deleted {
            return stop(Stop::Skipped(SkipReason::ResourceDeleted));
        }
        // Only a retry of a recorded, failed attempt may give up on a superseded version (as
        // Medplum does, docs/medplum-rest-hook.md §1.5): a claim taken over from a worker that died before its attempt
        // was recorded is still a first attempt, and state-transition notifications depend on
        // every version being sent once.
        if !delivery.replay
            && delivery.attempts > 0
            && resource.current_version != Some(delivery.version_id)
        {
            return stop(Stop::Skipped(SkipReason::Superseded {
                version: delivery.version_id,
                current: resource.current_version.unwrap_or_default(),
            }));
        }
        Some(
            resource
                .content
                .ok_or_else(|| missing(delivery.version_id))?,
        )
    };
    // What is sent (and signed): the version, made compact without decoding it; for a delete
    // `{}`. A bot receives the version decoded (for a delete Medplum's `{"deletedResource": …}`).
    let (body, bot, resource_display) = match bot {
        None => match version.as_deref().map(crate::fhir::compact_stored) {
            None => (b"{}".to_vec(), None, None),
            Some(Ok(compact)) => {
                let display = audit::display_of_json(&compact);
                (compact.bytes, None, display)
            }
            Some(Err(error)) => return Ok(undecodable_resource(delivery, error)),
        },
        Some(bot) => {
            let version = match version.as_deref().map(crate::fhir::decode_stored) {
                None => None,
                Some(Ok(version)) => Some(version),
                Some(Err(error)) => return Ok(undecodable_resource(delivery, error)),
            };
            let display = version.as_ref().and_then(audit::display);
            let payload = match version {
                Some(version) if delivery.interaction == Interaction::Delete => {
                    serde_json::json!({ "deletedResource": version })
                }
                version => version.unwrap_or_default(),
            };
            let body = match payload {
                Value::Null => b"{}".to_vec(),
                _ => serde_json::to_vec(&payload).expect("a JSON value serializes"),
            };
            (body, Some((bot, payload)), display)
        }
    };
    if let Err(error) = &target.custom_headers {
        return stop(Stop::Refused(FailureReason::Refused(error.clone())));
    }
    Ok(Prepared::Send(Box::new(Request {
        target: target.clone(),
        endpoint,
        bot,
        body,
        resource_display,
        timeout: None,
    })))
}

/// What cannot be decoded now never will be: the delivery fails at once, with the reason on its row.
fn undecodable(delivery: &ClaimedDelivery, problem: String) -> Prepared {
    tracing::error!(delivery = delivery.id, resource_type = %delivery.resource_type,
        resource_id = %delivery.resource_id, version = delivery.version_id,
        "cannot deliver: {problem}");
    Prepared::Stop(Stop::Refused(FailureReason::Undecodable(problem)))
}

fn undecodable_resource(delivery: &ClaimedDelivery, error: String) -> Prepared {
    undecodable(delivery, format!("cannot decode resource: {error}"))
}

/// A notification bundle for a subscription to a topic (the Subscriptions Backport): a handshake
/// while it is `requested`, else a heartbeat or one event, its focus as the subscription's payload
/// content asks. Every event goes, whatever became of its resource since: the receiver counts
/// them, and a version that was superseded is still an event of the topic.
fn prepare_notification(
    delivery: &ClaimedDelivery,
    target: &Arc<Target>,
    resource: ResourceNow,
    notification: Notification,
) -> Prepared {
    let stop = Prepared::Stop;
    let expected_status = match notification {
        Notification::Handshake => "requested",
        Notification::Heartbeat | Notification::Event => "active",
    };
    if target.status != expected_status {
        return stop(Stop::Skipped(SkipReason::Status(target.status.clone())));
    }
    let Some(endpoint) = target.endpoint.clone() else {
        return stop(Stop::Done);
    };
    if endpoint.starts_with("Bot/") {
        return stop(Stop::Refused(FailureReason::Refused(
            "a subscription to a topic notifies http(s) endpoints, not bots".to_owned(),
        )));
    }
    let subscription = match &target.backport {
        Some(Ok(subscription)) => subscription,
        Some(Err(error)) => {
            return stop(Stop::Refused(FailureReason::Refused(format!(
                "invalid subscription to a topic: {error}"
            ))));
        }
        None => {
            return stop(Stop::Refused(FailureReason::Refused(
                "the subscription is no longer a subscription to a topic".to_owned(),
            )));
        }
    };
    if let Err(error) = &target.custom_headers {
        return stop(Stop::Refused(FailureReason::Refused(error.clone())));
    }
    let deleted = delivery.interaction == Interaction::Delete;
    let content = match resource.content.as_deref().filter(|_| !deleted) {
        None => None,
        Some(text) => match crate::fhir::decode_stored(text) {
            Ok(content) => Some(content),
            Err(error) => return undecodable_resource(delivery, error),
        },
    };
    let focus = match (&content, deleted) {
        (Some(content), false) => Some(content),
        (None, false) if notification == Notification::Event => {
            return stop(Stop::Refused(FailureReason::Refused(format!(
                "{}/{} version {} is not stored",
                delivery.resource_type, delivery.resource_id, delivery.version_id
            ))));
        }
        _ => None,
    };
    let events: Vec<NotificationEvent<'_>> = match (notification, delivery.event_number) {
        (Notification::Event, Some(number)) => vec![NotificationEvent {
            number,
            timestamp: delivery.changed_at,
            focus_type: &delivery.resource_type,
            focus_id: &delivery.resource_id,
            focus_version: delivery.version_id,
            focus,
            deleted,
        }],
        (Notification::Event, None) => {
            return stop(Stop::Refused(FailureReason::Refused(
                "the event has no number".to_owned(),
            )));
        }
        _ => Vec::new(),
    };
    let status = SubscriptionStatus {
        subscription_id: &delivery.subscription_id,
        topic_url: &subscription.topic_url,
        status: &target.status,
        notification_type: match notification {
            Notification::Handshake => NotificationType::Handshake,
            Notification::Heartbeat => NotificationType::Heartbeat,
            Notification::Event => NotificationType::EventNotification,
        },
        events_since_subscription_start: delivery.event_number.unwrap_or(0),
        errors: Vec::new(),
    };
    let bundle = topic::notification_bundle(
        &target.fhir_base_url,
        &status,
        &events,
        subscription.content,
        chrono::Utc::now(),
    );
    Prepared::Send(Box::new(Request {
        target: target.clone(),
        endpoint,
        bot: None,
        body: serde_json::to_vec(&bundle).expect("a JSON value serializes"),
        resource_display: focus.and_then(audit::display),
        timeout: subscription.timeout,
    }))
}
