//! The decision: from a claimed delivery, what its execution came to, the retry rules and the time,
//! the completion to record. A pure function (only the backoff's jitter is random), with every rule
//! taken from [`super::policy`]; the recorder writes what it decides and decides nothing.

use super::policy::{self, Backoff, EndpointSignal, Rules};
use super::preamble::Stop;
use super::queries::{AttemptRecord, ClaimedDelivery};
use super::state::{DeliveryState, FailureReason, Reason};
use super::transport::{Happened, Performed};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// What one execution of a delivery came to.
#[derive(Debug, Clone)]
pub(super) enum Execution {
    /// The preamble stopped it: no request.
    Stopped(Stop),
    /// Database trouble before any request: retried on the preamble's own budget.
    PreambleFailed(String),
    /// An HTTP attempt (or a refused connection), or a bot run.
    Performed(Performed),
}

/// The new state of a delivery after one execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Completion {
    /// `pending` (retry later), `succeeded`, `skipped` or `failed`.
    pub state: DeliveryState,
    /// HTTP attempts made, this one included.
    pub attempts: i32,
    /// Preamble failures, this one included.
    pub preamble_failures: i32,
    /// When to try again (`None`: unchanged).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The reason kept on the row.
    pub reason: Option<Reason>,
    /// The attempt's HTTP status (`None`: unchanged).
    pub last_status: Option<i32>,
}

/// How a completion counts for auto-disable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FinalFailure {
    /// Not a final failure of an attempt.
    No,
    /// A final failure: counts towards the subscription's auto-disable triggers.
    Counts,
    /// `410 Gone`: the subscription is disabled at once.
    Gone,
}

/// What to record of an execution.
#[derive(Debug, Clone)]
pub(super) struct Decision {
    /// The delivery's new state.
    pub completion: Completion,
    /// The attempt's log row, if a request was made (or a bot ran).
    pub attempt: Option<AttemptRecord>,
    /// Whether it is a final failure for auto-disable.
    pub final_failure: FinalFailure,
    /// What it says of the endpoint, for its circuit breaker.
    pub endpoint: EndpointSignal,
}

/// Decides what `execution` of `delivery` comes to under `rules` (the subscription's; any for a
/// stop or a preamble failure) and `backoff`, at `now`.
pub(super) fn decide(
    delivery: &ClaimedDelivery,
    execution: &Execution,
    rules: &Rules,
    backoff: &Backoff,
    now: DateTime<Utc>,
) -> Decision {
    let retry_at =
        |delay: Duration| Some(now + chrono::Duration::from_std(delay).unwrap_or_default());
    let base = Completion {
        state: DeliveryState::Failed,
        attempts: delivery.attempts,
        preamble_failures: delivery.preamble_failures,
        next_attempt_at: None,
        reason: None,
        last_status: None,
    };
    let without_attempt = |completion| Decision {
        completion,
        attempt: None,
        final_failure: FinalFailure::No,
        endpoint: EndpointSignal::Silent,
    };
    let performed = match execution {
        Execution::Stopped(Stop::Skipped(reason)) => {
            return without_attempt(Completion {
                state: DeliveryState::Skipped,
                reason: Some(Reason::Skipped(reason.clone())),
                ..base
            });
        }
        Execution::Stopped(Stop::Done) => {
            return without_attempt(Completion {
                state: DeliveryState::Succeeded,
                reason: Some(Reason::EndpointRemoved),
                ..base
            });
        }
        Execution::Stopped(Stop::Refused(reason)) => {
            return without_attempt(Completion {
                state: DeliveryState::Failed,
                reason: Some(Reason::Failed(reason.clone())),
                ..base
            });
        }
        Execution::PreambleFailed(error) => {
            let failures = delivery.preamble_failures + 1;
            return without_attempt(if policy::preamble_exhausted(failures as u32) {
                Completion {
                    state: DeliveryState::Failed,
                    preamble_failures: failures,
                    reason: Some(Reason::Failed(FailureReason::PreambleExhausted {
                        failures,
                        last: error.clone(),
                    })),
                    ..base
                }
            } else {
                Completion {
                    state: DeliveryState::Pending,
                    preamble_failures: failures,
                    next_attempt_at: retry_at(backoff.delay(failures as u32)),
                    reason: Some(Reason::PreambleFailed(error.clone())),
                    ..base
                }
            });
        }
        Execution::Performed(performed) => performed,
    };
    let attempts = delivery.attempts + 1;
    let mut record = AttemptRecord {
        attempt: attempts,
        started_at: performed.started_at,
        duration_ms: performed.duration_ms,
        succeeded: false,
        status: None,
        error: None,
        response_body: None,
    };
    let mut retry_after = None;
    let endpoint = match &performed.happened {
        Happened::Response(response) => policy::endpoint_signal(Some(response.status)),
        Happened::Error(_) => policy::endpoint_signal(None),
        Happened::Bot { .. } => EndpointSignal::Silent,
    };
    match &performed.happened {
        Happened::Response(response) => {
            record.status = Some(i32::from(response.status));
            record.succeeded = rules.is_success(response.status);
            record.response_body = Some(response.body_prefix.clone());
            if !record.succeeded {
                record.error = Some(format!("Received status {}", response.status));
                if policy::honours_retry_after(response.status) {
                    retry_after = response
                        .retry_after
                        .as_deref()
                        .and_then(|header| backoff.retry_after(header, now));
                }
            }
        }
        Happened::Error(error) => record.error = Some(error.clone()),
        Happened::Bot { result, .. } => {
            record.succeeded = result.is_ok();
            record.error = result.as_ref().err().cloned();
        }
    }
    let error = record.error.clone().unwrap_or_default();
    // A 410 says the endpoint is gone for good: no retries (and the subscription is disabled).
    let gone = !record.succeeded && record.status.is_some_and(|s| policy::is_gone(s as u16));
    let (completion, final_failure) = if record.succeeded {
        let completion = Completion {
            state: DeliveryState::Succeeded,
            attempts,
            ..base
        };
        (completion, FinalFailure::No)
    } else if gone {
        let completion = Completion {
            state: DeliveryState::Failed,
            attempts,
            reason: Some(Reason::Failed(FailureReason::Gone { attempts })),
            ..base
        };
        (completion, FinalFailure::Gone)
    } else if attempts as u32 >= rules.max_attempts
        || policy::claims_exhausted(delivery.claims as u32)
    {
        let completion = Completion {
            state: DeliveryState::Failed,
            attempts,
            reason: Some(Reason::Failed(FailureReason::Exhausted {
                attempts,
                last: error,
            })),
            ..base
        };
        (completion, FinalFailure::Counts)
    } else {
        let delay = retry_after.unwrap_or_else(|| backoff.delay(attempts as u32));
        let completion = Completion {
            state: DeliveryState::Pending,
            attempts,
            next_attempt_at: retry_at(delay),
            reason: Some(Reason::AttemptFailed(error)),
            ..base
        };
        (completion, FinalFailure::No)
    };
    Decision {
        completion: Completion {
            last_status: record.status,
            ..completion
        },
        attempt: Some(record),
        final_failure,
        endpoint,
    }
}

#[cfg(test)]
mod tests {
    //! Every row of the retry rules, without a database.

    use super::*;
    use crate::capture::Interaction;
    use crate::delivery::state::SkipReason;
    use crate::delivery::transport::Response;
    use serde_json::json;
    use uuid::Uuid;

    fn delivery(attempts: i32, preamble_failures: i32, claims: i32) -> ClaimedDelivery {
        ClaimedDelivery {
            id: 1,
            webhook_id: Uuid::nil(),
            project_id: Uuid::nil(),
            subscription_id: "s".into(),
            resource_type: "Patient".into(),
            resource_id: "p".into(),
            version_id: 1,
            interaction: Interaction::Update,
            changed_at: Utc::now(),
            request_id: "r".into(),
            trace_id: "t".into(),
            attempts,
            preamble_failures,
            claims,
            lease_token: Uuid::nil(),
            endpoint: "https://example.org:443".into(),
            probe: false,
            replay: false,
            notification: None,
            event_number: None,
        }
    }

    fn performed(happened: Happened) -> Execution {
        Execution::Performed(Performed {
            started_at: Utc::now(),
            duration_ms: 5,
            happened,
        })
    }

    fn status(status: u16, retry_after: Option<&str>) -> Execution {
        performed(Happened::Response(Response {
            status,
            retry_after: retry_after.map(str::to_owned),
            body_prefix: "body".into(),
        }))
    }

    fn error(text: &str) -> Execution {
        performed(Happened::Error(text.into()))
    }

    fn bot(result: Result<&str, &str>) -> Execution {
        performed(Happened::Bot {
            bot: json!({ "resourceType": "Bot", "id": "b" }),
            input: json!({}),
            result: result.map(str::to_owned).map_err(str::to_owned),
        })
    }

    fn rules(max_attempts: u32, success_codes: Option<&str>) -> Rules {
        Rules {
            max_attempts,
            success_codes: success_codes.map(str::to_owned),
        }
    }

    /// When the next attempt is due, relative to now.
    #[derive(Debug, Clone, Copy)]
    enum Due {
        /// Not set (the row keeps its own).
        Unset,
        /// The backoff after this many failures (±10% jitter).
        Backoff(u32),
        /// Exactly this many seconds.
        Exactly(u64),
    }

    struct Row {
        name: &'static str,
        /// (attempts, preamble_failures, claims) before this execution.
        before: (i32, i32, i32),
        rules: Rules,
        execution: Execution,
        state: DeliveryState,
        attempts: i32,
        preamble_failures: i32,
        due: Due,
        reason: Option<&'static str>,
        /// The attempt row: `None` without a request; `Some(succeeded)`.
        attempt: Option<bool>,
        final_failure: FinalFailure,
    }

    fn rows() -> Vec<Row> {
        use DeliveryState::*;
        let four = || Rules::default();
        let row = |name, before, rules, execution, state, attempts| Row {
            name,
            before,
            rules,
            execution,
            state,
            attempts,
            preamble_failures: before.1,
            due: Due::Unset,
            reason: None,
            attempt: Some(state == Succeeded),
            final_failure: FinalFailure::No,
        };
        vec![
            row(
                "2xx is a success",
                (0, 0, 1),
                four(),
                status(200, None),
                Succeeded,
                1,
            ),
            row(
                "3xx is a success",
                (2, 0, 3),
                four(),
                status(302, None),
                Succeeded,
                3,
            ),
            Row {
                attempt: Some(true),
                ..row(
                    "a subscription-specific success code",
                    (0, 0, 1),
                    rules(4, Some("200,410-600")),
                    status(515, None),
                    Succeeded,
                    1,
                )
            },
            Row {
                due: Due::Backoff(1),
                reason: Some("Received status 200"),
                ..row(
                    "200 outside the subscription's success codes is a failure",
                    (0, 0, 1),
                    rules(4, Some("300,400-505")),
                    status(200, None),
                    Pending,
                    1,
                )
            },
            Row {
                due: Due::Backoff(1),
                reason: Some("Received status 500"),
                ..row(
                    "a failure with attempts left is retried after the backoff",
                    (0, 0, 1),
                    four(),
                    status(500, None),
                    Pending,
                    1,
                )
            },
            Row {
                due: Due::Backoff(3),
                reason: Some("Received status 404"),
                ..row(
                    "the backoff doubles per attempt",
                    (2, 0, 3),
                    four(),
                    status(404, None),
                    Pending,
                    3,
                )
            },
            Row {
                due: Due::Exactly(120),
                reason: Some("Received status 429"),
                ..row(
                    "429 honours Retry-After",
                    (0, 0, 1),
                    four(),
                    status(429, Some("120")),
                    Pending,
                    1,
                )
            },
            Row {
                due: Due::Exactly(8 * 3600),
                reason: Some("Received status 503"),
                ..row(
                    "503 honours Retry-After, capped",
                    (0, 0, 1),
                    four(),
                    status(503, Some("99999999")),
                    Pending,
                    1,
                )
            },
            Row {
                due: Due::Exactly(20),
                reason: Some("Received status 429"),
                ..row(
                    "Retry-After shorter than the base waits the base",
                    (0, 0, 1),
                    four(),
                    status(429, Some("1")),
                    Pending,
                    1,
                )
            },
            Row {
                due: Due::Backoff(1),
                reason: Some("Received status 500"),
                ..row(
                    "Retry-After is ignored outside 429 and 503",
                    (0, 0, 1),
                    four(),
                    status(500, Some("120")),
                    Pending,
                    1,
                )
            },
            Row {
                due: Due::Backoff(1),
                reason: Some("Received status 503"),
                ..row(
                    "an unreadable Retry-After falls back to the backoff",
                    (0, 0, 1),
                    four(),
                    status(503, Some("soon")),
                    Pending,
                    1,
                )
            },
            Row {
                reason: Some("gone (410): the endpoint answered 410 Gone on attempt 1; no retry"),
                final_failure: FinalFailure::Gone,
                ..row(
                    "410 fails at once and disables the subscription",
                    (0, 0, 1),
                    four(),
                    status(410, None),
                    Failed,
                    1,
                )
            },
            Row {
                attempt: Some(true),
                ..row(
                    "410 within the success codes is a success",
                    (0, 0, 1),
                    rules(4, Some("200,410")),
                    status(410, None),
                    Succeeded,
                    1,
                )
            },
            Row {
                reason: Some("exhausted 3 attempts; last: Received status 500"),
                final_failure: FinalFailure::Counts,
                ..row(
                    "the last attempt fails with the reason",
                    (2, 0, 3),
                    rules(3, None),
                    status(500, None),
                    Failed,
                    3,
                )
            },
            Row {
                reason: Some("exhausted 1 attempts; last: Received status 500"),
                final_failure: FinalFailure::Counts,
                ..row(
                    "max attempts 1: no retry",
                    (0, 0, 1),
                    rules(1, None),
                    status(500, None),
                    Failed,
                    1,
                )
            },
            Row {
                reason: Some("exhausted 3 attempts; last: Received status 500"),
                final_failure: FinalFailure::Counts,
                ..row(
                    "the hard cap: 19 claims fail whatever attempts are left",
                    (2, 0, 19),
                    rules(18, None),
                    status(500, None),
                    Failed,
                    3,
                )
            },
            Row {
                due: Due::Backoff(3),
                reason: Some("Received status 500"),
                ..row(
                    "18 claims are still under the hard cap",
                    (2, 0, 18),
                    rules(18, None),
                    status(500, None),
                    Pending,
                    3,
                )
            },
            Row {
                due: Due::Backoff(1),
                reason: Some("error sending request: operation timed out"),
                ..row(
                    "a timeout is retried",
                    (0, 0, 1),
                    four(),
                    error("error sending request: operation timed out"),
                    Pending,
                    1,
                )
            },
            Row {
                due: Due::Backoff(2),
                reason: Some("error sending request: Connection refused (os error 111)"),
                ..row(
                    "a refused connection is retried",
                    (1, 0, 2),
                    four(),
                    error("error sending request: Connection refused (os error 111)"),
                    Pending,
                    2,
                )
            },
            Row {
                due: Due::Backoff(1),
                reason: Some("error sending request: invalid peer certificate"),
                ..row(
                    "a TLS error is retried",
                    (0, 0, 1),
                    four(),
                    error("error sending request: invalid peer certificate"),
                    Pending,
                    1,
                )
            },
            Row {
                reason: Some("exhausted 4 attempts; last: endpoint scheme `http` is not allowed"),
                final_failure: FinalFailure::Counts,
                ..row(
                    "a transport error on the last attempt fails",
                    (3, 0, 4),
                    four(),
                    error("endpoint scheme `http` is not allowed"),
                    Failed,
                    4,
                )
            },
            row(
                "a bot run that succeeds",
                (0, 0, 1),
                four(),
                bot(Ok("log")),
                Succeeded,
                1,
            ),
            Row {
                due: Due::Backoff(1),
                reason: Some("the handler threw"),
                ..row(
                    "a bot error is retried",
                    (0, 0, 1),
                    four(),
                    bot(Err("the handler threw")),
                    Pending,
                    1,
                )
            },
            Row {
                reason: Some("exhausted 4 attempts; last: the handler threw"),
                final_failure: FinalFailure::Counts,
                ..row(
                    "a bot error on the last attempt fails",
                    (3, 0, 4),
                    four(),
                    bot(Err("the handler threw")),
                    Failed,
                    4,
                )
            },
            Row {
                reason: Some("the resource was deleted"),
                attempt: None,
                ..row(
                    "preamble stop: skipped",
                    (0, 0, 1),
                    four(),
                    Execution::Stopped(Stop::Skipped(SkipReason::ResourceDeleted)),
                    Skipped,
                    0,
                )
            },
            Row {
                reason: Some(
                    "version 1 is no longer current (now 2); the newer version has its own delivery",
                ),
                attempt: None,
                ..row(
                    "preamble stop: a superseded version after a recorded failed attempt",
                    (1, 0, 2),
                    four(),
                    Execution::Stopped(Stop::Skipped(SkipReason::Superseded {
                        version: 1,
                        current: 2,
                    })),
                    Skipped,
                    1,
                )
            },
            Row {
                reason: Some("the subscription's endpoint was removed; nothing to send"),
                attempt: None,
                ..row(
                    "preamble stop: done",
                    (0, 0, 1),
                    four(),
                    Execution::Stopped(Stop::Done),
                    Succeeded,
                    0,
                )
            },
            Row {
                reason: Some("channel.header `x` has no `:`"),
                attempt: None,
                ..row(
                    "preamble stop: refused",
                    (0, 0, 1),
                    four(),
                    Execution::Stopped(Stop::Refused(FailureReason::Refused(
                        "channel.header `x` has no `:`".into(),
                    ))),
                    Failed,
                    0,
                )
            },
            Row {
                preamble_failures: 1,
                due: Due::Backoff(1),
                reason: Some("preamble failed: pool timed out"),
                attempt: None,
                ..row(
                    "preamble infrastructure failure within its budget",
                    (0, 0, 1),
                    four(),
                    Execution::PreambleFailed("pool timed out".into()),
                    Pending,
                    0,
                )
            },
            Row {
                preamble_failures: 18,
                due: Due::Backoff(18),
                reason: Some("preamble failed: pool timed out"),
                attempt: None,
                ..row(
                    "preamble failure 18 is still within its budget",
                    (1, 17, 18),
                    four(),
                    Execution::PreambleFailed("pool timed out".into()),
                    Pending,
                    1,
                )
            },
            Row {
                preamble_failures: 19,
                reason: Some("the preamble failed 19 times; last: pool timed out"),
                attempt: None,
                ..row(
                    "preamble infrastructure failure beyond its budget",
                    (1, 18, 19),
                    four(),
                    Execution::PreambleFailed("pool timed out".into()),
                    Failed,
                    1,
                )
            },
        ]
    }

    #[test]
    fn every_retry_rule() {
        let backoff = Backoff::default();
        let now = Utc::now();
        for row in rows() {
            let (attempts, preamble_failures, claims) = row.before;
            let delivery = delivery(attempts, preamble_failures, claims);
            let decision = decide(&delivery, &row.execution, &row.rules, &backoff, now);
            let completion = &decision.completion;
            let name = row.name;
            assert_eq!(completion.state, row.state, "{name}");
            assert_eq!(completion.attempts, row.attempts, "{name}");
            assert_eq!(
                completion.preamble_failures, row.preamble_failures,
                "{name}"
            );
            assert_eq!(
                completion
                    .reason
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref(),
                row.reason,
                "{name}"
            );
            assert_eq!(decision.final_failure, row.final_failure, "{name}");
            assert_eq!(
                decision.attempt.as_ref().map(|attempt| attempt.succeeded),
                row.attempt,
                "{name}"
            );
            if let Some(attempt) = &decision.attempt {
                assert_eq!(attempt.attempt, attempts + 1, "{name}");
                assert_eq!(completion.last_status, attempt.status, "{name}");
            }
            let due = completion
                .next_attempt_at
                .map(|at| (at - now).to_std().unwrap().as_secs_f64());
            match row.due {
                Due::Unset => assert_eq!(due, None, "{name}"),
                Due::Exactly(seconds) => assert_eq!(due, Some(seconds as f64), "{name}"),
                Due::Backoff(failures) => {
                    let nominal = 20.0 * 2f64.powi(failures as i32 - 1);
                    let nominal = nominal.min(backoff.cap.as_secs_f64());
                    let due = due.unwrap_or_else(|| panic!("{name}: no next attempt"));
                    assert!(
                        due >= nominal * 0.9 - 0.001 && due <= nominal * 1.1 + 0.001,
                        "{name}: {due} s, nominal {nominal} s"
                    );
                }
            }
        }
    }

    #[test]
    fn what_an_execution_says_of_its_endpoint() {
        let signal = |execution: Execution| {
            decide(
                &delivery(0, 0, 1),
                &execution,
                &Rules::default(),
                &Backoff::default(),
                Utc::now(),
            )
            .endpoint
        };
        assert_eq!(signal(status(200, None)), EndpointSignal::Healthy);
        // A failed delivery, from an endpoint that is up.
        assert_eq!(signal(status(404, None)), EndpointSignal::Healthy);
        assert_eq!(signal(status(500, None)), EndpointSignal::Failing);
        assert_eq!(signal(status(503, Some("5"))), EndpointSignal::Failing);
        assert_eq!(
            signal(error("operation timed out")),
            EndpointSignal::Failing
        );
        assert_eq!(signal(bot(Err("boom"))), EndpointSignal::Silent);
        assert_eq!(
            signal(Execution::PreambleFailed("pool timed out".into())),
            EndpointSignal::Silent
        );
    }

    #[test]
    fn a_taken_over_lease_with_no_recorded_attempt_is_a_first_attempt() {
        // The preamble never stops a claim with attempts = 0 as superseded (preamble.rs), so its
        // outcome is that of a first attempt, whatever its claims.
        let decision = decide(
            &delivery(0, 0, 2),
            &status(500, None),
            &Rules::default(),
            &Backoff::default(),
            Utc::now(),
        );
        assert_eq!(decision.completion.state, DeliveryState::Pending);
        assert_eq!(decision.attempt.unwrap().attempt, 1);
    }
}
