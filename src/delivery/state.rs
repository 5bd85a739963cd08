//! The states of a delivery and the reasons kept on its row (`delivery.state`, `delivery.reason`).

use std::fmt;

/// The state of a delivery: `pending` → `in_flight` → `succeeded` / `skipped` / `failed`, or
/// `cancelled` by an operator while pending (the text column `delivery.state` and its CHECK).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum DeliveryState {
    /// Due at `next_attempt_at`.
    Pending,
    /// Claimed by a worker, under its lease.
    InFlight,
    /// Delivered (or nothing to send).
    Succeeded,
    /// Given up by the preamble: nothing wrong, nothing to send any more.
    Skipped,
    /// Given up: attempts exhausted, gone, or undeliverable as it stands.
    Failed,
    /// Cancelled by an operator before it was sent (an operator can replay it).
    Cancelled,
}

impl DeliveryState {
    /// Every state, in the order of the pipeline.
    pub const ALL: [DeliveryState; 6] = [
        DeliveryState::Pending,
        DeliveryState::InFlight,
        DeliveryState::Succeeded,
        DeliveryState::Skipped,
        DeliveryState::Failed,
        DeliveryState::Cancelled,
    ];

    /// The names of every state, as the column holds them.
    pub const NAMES: [&'static str; 6] = [
        "pending",
        "in_flight",
        "succeeded",
        "skipped",
        "failed",
        "cancelled",
    ];

    /// The name the column holds.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::InFlight => "in_flight",
            DeliveryState::Succeeded => "succeeded",
            DeliveryState::Skipped => "skipped",
            DeliveryState::Failed => "failed",
            DeliveryState::Cancelled => "cancelled",
        }
    }

    /// Whether a delivery in this state is done with (no further attempt without an operator).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryState::Succeeded
                | DeliveryState::Skipped
                | DeliveryState::Failed
                | DeliveryState::Cancelled
        )
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a delivery state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a delivery state (pending, in_flight, succeeded, skipped, failed or cancelled)"
)]
pub struct UnknownState(pub String);

impl std::str::FromStr for DeliveryState {
    type Err = UnknownState;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        DeliveryState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .ok_or_else(|| UnknownState(name.to_owned()))
    }
}

/// Why the preamble skipped a delivery (state `skipped`, no request, no AuditEvent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The subscription no longer exists.
    SubscriptionDeleted,
    /// The subscription's channel is no longer `rest-hook`.
    Channel(String),
    /// The subscription is no longer `active`.
    Status(String),
    /// The resource was deleted after the change.
    ResourceDeleted,
    /// The resource has no row in `fhir_outbox.resource` at all: its rows were written or removed
    /// outside the SQL functions (a change whose versions the dispatcher did not read, because no
    /// candidate evaluates them, is found here).
    ResourceNotStored,
    /// A retry of a recorded, failed attempt of a version that is no longer current.
    Superseded {
        /// The version of the delivery.
        version: i64,
        /// The resource's version now.
        current: i64,
    },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::SubscriptionDeleted => f.write_str("the subscription was deleted"),
            SkipReason::Channel(channel) => {
                write!(f, "the subscription's channel is now `{channel}`")
            }
            SkipReason::Status(status) => write!(f, "the subscription's status is now `{status}`"),
            SkipReason::ResourceDeleted => f.write_str("the resource was deleted"),
            SkipReason::ResourceNotStored => f.write_str(
                "the resource is not stored (no row in fhir_outbox.resource: written or removed outside the SQL functions)",
            ),
            SkipReason::Superseded { version, current } => write!(
                f,
                "version {version} is no longer current (now {current}); the newer version has its own delivery"
            ),
        }
    }
}

/// Why a delivery failed for good (state `failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureReason {
    /// Its resource or subscription cannot be decoded (it never will be).
    Undecodable(String),
    /// The subscription cannot be delivered as it stands (an invalid `channel.header`).
    Refused(String),
    /// The endpoint answered `410 Gone`.
    Gone {
        /// HTTP attempts made, this one included.
        attempts: i32,
    },
    /// No attempt left (the subscription's maximum, or the hard cap on claims).
    Exhausted {
        /// HTTP attempts made.
        attempts: i32,
        /// The last attempt's error.
        last: String,
    },
    /// The preamble failed on database trouble more often than its budget allows.
    PreambleExhausted {
        /// Preamble failures.
        failures: i32,
        /// The last one.
        last: String,
    },
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Undecodable(problem) | FailureReason::Refused(problem) => {
                f.write_str(problem)
            }
            FailureReason::Gone { attempts } => write!(
                f,
                "gone (410): the endpoint answered 410 Gone on attempt {attempts}; no retry"
            ),
            FailureReason::Exhausted { attempts, last } => {
                write!(f, "exhausted {attempts} attempts; last: {last}")
            }
            FailureReason::PreambleExhausted { failures, last } => {
                write!(f, "the preamble failed {failures} times; last: {last}")
            }
        }
    }
}

/// What the `reason` column says of a delivery after an execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Skipped by the preamble.
    Skipped(SkipReason),
    /// Failed for good.
    Failed(FailureReason),
    /// Succeeded without a request: the endpoint was removed after matching.
    EndpointRemoved,
    /// To be retried: the preamble failed (database trouble).
    PreambleFailed(String),
    /// To be retried: the last attempt's error.
    AttemptFailed(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Skipped(reason) => reason.fmt(f),
            Reason::Failed(reason) => reason.fmt(f),
            Reason::EndpointRemoved => {
                f.write_str("the subscription's endpoint was removed; nothing to send")
            }
            Reason::PreambleFailed(error) => write!(f, "preamble failed: {error}"),
            Reason::AttemptFailed(error) => f.write_str(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for (state, name) in DeliveryState::ALL.into_iter().zip(DeliveryState::NAMES) {
            assert_eq!(state.as_str(), name);
            assert_eq!(name.parse::<DeliveryState>(), Ok(state));
            assert_eq!(serde_json::to_value(state).unwrap(), name);
        }
        assert!("done".parse::<DeliveryState>().is_err());
    }

    #[test]
    fn reasons_keep_the_column_texts() {
        let superseded = SkipReason::Superseded {
            version: 1,
            current: 2,
        };
        assert_eq!(
            Reason::Skipped(superseded).to_string(),
            "version 1 is no longer current (now 2); the newer version has its own delivery"
        );
        assert_eq!(
            Reason::Failed(FailureReason::Exhausted {
                attempts: 3,
                last: "Received status 500".into()
            })
            .to_string(),
            "exhausted 3 attempts; last: Received status 500"
        );
        assert!(
            FailureReason::Gone { attempts: 1 }
                .to_string()
                .starts_with("gone (410)")
        );
        assert_eq!(
            Reason::PreambleFailed("boom".into()).to_string(),
            "preamble failed: boom"
        );
    }
}
