//! Every retry rule of delivery: what counts as success, how many attempts a delivery gets, when to
//! try again (backoff, `Retry-After` on 429/503), what gives up at once (410 Gone), the preamble's
//! own budget for database trouble, the backoff of a worker loop whose database calls fail, and
//! the circuit breaker of an endpoint ([`CircuitBreaker`], [`EndpointSignal`]).
//! [`super::outcome::decide`] applies them; nothing else decides a retry.

use crate::subscription::{self, extension};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::Value;
use std::time::Duration;

/// Attempts when the subscription does not say (Medplum's `DEFAULT_ATTEMPTS`).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// The documented valid range of `subscription-max-attempts`.
pub const MAX_ATTEMPTS_RANGE: std::ops::RangeInclusive<i64> = 1..=18;
/// The hard cap on attempts of any kind (Medplum's queue-level `MAX_JOB_ATTEMPTS`).
pub const HARD_ATTEMPT_CAP: u32 = 19;

/// `410 Gone`: the endpoint is gone for good: no retry, and the subscription is disabled at once.
pub const GONE: u16 = 410;

/// Whether a non-success `status` is final at once, whatever attempts are left (410 Gone).
pub fn is_gone(status: u16) -> bool {
    status == GONE
}

/// Whether a `Retry-After` header is honoured with this status (429 Too Many Requests and 503
/// Service Unavailable); with any other, the backoff applies.
pub fn honours_retry_after(status: u16) -> bool {
    matches!(status, 429 | 503)
}

/// Whether the preamble, having failed `failures` times (this one included) on database trouble,
/// has exhausted its budget: the delivery fails.
pub fn preamble_exhausted(failures: u32) -> bool {
    failures >= HARD_ATTEMPT_CAP
}

/// Whether a delivery claimed `claims` times (this claim included) may not be retried again, whatever
/// its subscription allows (the hard cap).
pub fn claims_exhausted(claims: u32) -> bool {
    claims >= HARD_ATTEMPT_CAP
}

/// The pause of a worker loop (claiming deliveries, dispatching changes) after `failures`
/// consecutive database errors: 200 ms, doubling, at most 12.8 s.
pub fn database_backoff(failures: u32) -> Duration {
    Duration::from_millis(100 * 2u64.pow(failures.min(7)))
}

/// What a subscription says about its own retries, read once per subscription per batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Total HTTP attempts ([`max_attempts`]).
    pub max_attempts: u32,
    /// The success-codes extension, when it is set and not empty ([`is_success_code`]).
    pub success_codes: Option<String>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            success_codes: None,
        }
    }
}

impl Rules {
    /// The subscription's rules; an unusable `subscription-max-attempts` gives the default, and the
    /// problem, for the caller to report.
    pub fn of(subscription: &Value) -> (Rules, Option<String>) {
        let (max_attempts, problem) = match max_attempts(subscription) {
            Ok(max) => (max, None),
            Err(problem) => (DEFAULT_MAX_ATTEMPTS, Some(problem)),
        };
        let success_codes =
            subscription::extension_value(subscription, extension::SUCCESS_CODES, "valueString")
                .and_then(Value::as_str)
                .filter(|codes| !codes.is_empty())
                .map(str::to_owned);
        let rules = Rules {
            max_attempts,
            success_codes,
        };
        (rules, problem)
    }

    /// Whether `status` is a success under these rules (see [`is_success`]).
    pub fn is_success(&self, status: u16) -> bool {
        is_success_code(self.success_codes.as_deref(), status)
    }
}

/// Whether `status` is a success for this subscription (docs/medplum-rest-hook.md §1.8).
///
/// Without the success-codes extension: 200–399. With it: spaces removed, split on `,`, each token
/// `N` or `A-B` (inclusive); the first token that matches decides success; the first token that is
/// not an integer (before any match) makes the whole decision fall back to 200–399; an empty token is
/// 0 and never matches; no match is a failure.
pub fn is_success(subscription: &Value, status: u16) -> bool {
    Rules::of(subscription).0.is_success(status)
}

/// Whether `status` is a success under the success-codes extension's value (`None`: 200–399).
pub fn is_success_code(codes: Option<&str>, status: u16) -> bool {
    let default = (200..400).contains(&status);
    let Some(codes) = codes.filter(|codes| !codes.is_empty()) else {
        return default;
    };
    let codes: String = codes.chars().filter(|c| *c != ' ').collect();
    let parse = |token: &str| -> Option<i64> {
        if token.is_empty() {
            return Some(0);
        }
        token.parse().ok()
    };
    let status = i64::from(status);
    for token in codes.split(',') {
        let mut bounds = token.split('-');
        let low = bounds.next().unwrap_or_default();
        match bounds.next() {
            None => match parse(low) {
                Some(code) if code == status => return true,
                Some(_) => {}
                None => return default,
            },
            Some(high) => match (parse(low), parse(high)) {
                (Some(low), Some(high)) if (low..=high).contains(&status) => return true,
                (Some(_), Some(_)) => {}
                _ => return default,
            },
        }
    }
    false
}

/// The subscription's total HTTP attempts, or why its `subscription-max-attempts` is not usable.
///
/// We count total attempts, the documented meaning (Medplum's code allows one more: see docs/medplum-rest-hook.md §1.9
/// item 47); an invalid value is reported rather than guessed at, and the default applies.
pub fn max_attempts(subscription: &Value) -> Result<u32, String> {
    let Some(value) =
        subscription::extension_value(subscription, extension::MAX_ATTEMPTS, "valueInteger")
    else {
        return Ok(DEFAULT_MAX_ATTEMPTS);
    };
    match value.as_i64() {
        Some(n) if MAX_ATTEMPTS_RANGE.contains(&n) => Ok(n as u32),
        _ => Err(format!(
            "subscription-max-attempts {value} is not an integer from 1 to 18; using the default {DEFAULT_MAX_ATTEMPTS}"
        )),
    }
}

/// The retry schedule: `base × 2^(n−1)` with ±10% jitter, capped.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first retry (Medplum: 20 s).
    pub base: Duration,
    /// The longest delay (Medplum: 8 h).
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(20),
            cap: Duration::from_secs(8 * 3600),
        }
    }
}

impl Backoff {
    /// The delay after `failed_attempts` failures (1 for the first retry).
    pub fn delay(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(40);
        let nominal = self.base.as_secs_f64() * 2f64.powi(exponent as i32);
        let jittered = nominal * rand::rng().random_range(0.9..=1.1);
        Duration::from_secs_f64(jittered.min(self.cap.as_secs_f64()))
    }

    /// The delay a `Retry-After` header asks for (seconds or an HTTP date), kept within
    /// [base, cap] so a receiver can neither hammer us nor park a delivery forever.
    pub fn retry_after(&self, header: &str, now: DateTime<Utc>) -> Option<Duration> {
        let header = header.trim();
        let asked = match header.parse::<u64>() {
            Ok(seconds) => Duration::from_secs(seconds),
            Err(_) => {
                let at = DateTime::parse_from_rfc2822(header)
                    .ok()?
                    .with_timezone(&Utc);
                (at - now).to_std().unwrap_or(Duration::ZERO)
            }
        };
        Some(asked.clamp(self.base, self.cap))
    }
}

/// What an attempt says of its endpoint's health, for the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointSignal {
    /// It answered with anything but a server error (a 4xx is the receiver's verdict on this
    /// notification, not a sign that the receiver is down).
    Healthy,
    /// No answer (connection refused or reset, TLS, timeout) or a server error (5xx).
    Failing,
    /// Nothing about the endpoint: no request was made, or it was a bot run.
    Silent,
}

/// What an HTTP attempt that got `status` (or no answer, `None`) says of its endpoint.
pub fn endpoint_signal(status: Option<u16>) -> EndpointSignal {
    match status {
        Some(500..=599) | None => EndpointSignal::Failing,
        Some(_) => EndpointSignal::Healthy,
    }
}

/// How many deliveries one endpoint (a project's scheme, host and port) may have in progress, from
/// claim until recorded, across every worker. It starts at `base`; after each recorded batch in
/// which every attempt to the endpoint got a fast answer (see [`is_fast_answer`]) it doubles, up to
/// `max`; any other attempt (slow, `429`, a server error, no answer) puts it back to `base`. A
/// fixed allowance would let the pipeline's own cycle (claim, queue, recorder: 25–50 ms under
/// load), not the receiver, cap a fast receiver's rate; a large fixed one would let every hanging
/// endpoint hold that many requests. An endpoint grows only while it answers fast, so one that
/// hangs or slows holds `base` requests once its first slow answer is recorded, and `max` at most
/// before that. The allowance counts deliveries across every worker; how one process shares its
/// request slots among endpoints is `slots::SlotQueue`'s (fewest held first), so `max` may exceed
/// a worker's slots: 1,024 by default, about what a claim batch waiting, the slots and a
/// recorder batch hold at once, where 256 capped one fast receiver at 256 ÷ that cycle
/// (docs/performance-history.md, run R).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointAllowance {
    /// Where an endpoint starts, and where it falls back to.
    pub base: u32,
    /// The most it grows to (`base` or less: a fixed allowance).
    pub max: u32,
}

impl Default for EndpointAllowance {
    fn default() -> Self {
        EndpointAllowance {
            base: 32,
            max: 1024,
        }
    }
}

impl EndpointAllowance {
    /// An allowance that never grows.
    pub fn fixed(allowance: u32) -> Self {
        EndpointAllowance {
            base: allowance,
            max: allowance,
        }
    }

    /// `base` and `max` as the claim and the recorder use them: at least 1, and `max` at least
    /// `base`.
    pub(super) fn bounds(&self) -> (i32, i32) {
        let base = self.base.clamp(1, i32::MAX as u32) as i32;
        (base, (self.max.min(i32::MAX as u32) as i32).max(base))
    }
}

/// Whether an attempt that got `status` (or no answer, `None`) after `took` lets its endpoint's
/// allowance grow: a prompt answer that is not a server error or a `429 Too Many Requests` (which
/// ask for less load, not more). Prompt means within `fast`, a quarter of the time after which a
/// request counts as slow.
pub fn is_fast_answer(status: Option<u16>, took: Duration, fast: Duration) -> bool {
    endpoint_signal(status) == EndpointSignal::Healthy && status != Some(429) && took <= fast
}

/// The circuit breaker of an endpoint (a project's scheme, host and port): after `failures`
/// consecutive failing attempts its circuit opens and its deliveries wait, without spending their
/// attempts, for a cool-down that doubles with each opening since it last closed (with ±20%
/// jitter, so that circuits opened together do not probe together), up to `max_cool_down`. Then one
/// probe goes: an answer closes the circuit, a failure opens it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Consecutive failing attempts that open the circuit.
    pub failures: u32,
    /// The first cool-down.
    pub cool_down: Duration,
    /// The longest cool-down.
    pub max_cool_down: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            failures: 5,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(600),
        }
    }
}

impl CircuitBreaker {
    /// Openings whose cool-downs differ; later ones wait as long as the last.
    pub const SCHEDULE_LENGTH: u32 = 16;

    /// The cool-down after the `opening`th opening since the circuit last closed (1 for the first).
    pub fn cool_down(&self, opening: u32) -> Duration {
        let exponent = opening.saturating_sub(1).min(30);
        let nominal = self.cool_down.as_secs_f64() * 2f64.powi(exponent as i32);
        let jittered =
            nominal.min(self.max_cool_down.as_secs_f64()) * rand::rng().random_range(0.8..=1.2);
        Duration::from_secs_f64(jittered)
    }

    /// The cool-downs of openings 1 to [`Self::SCHEDULE_LENGTH`] in seconds, drawn now: what the
    /// recorder hands to the statement that opens circuits.
    pub fn schedule(&self) -> Vec<f64> {
        (1..=Self::SCHEDULE_LENGTH)
            .map(|opening| self.cool_down(opening).as_secs_f64())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_codes(codes: &str) -> Value {
        json!({ "extension": [{ "url": extension::SUCCESS_CODES, "valueString": codes }] })
    }

    #[test]
    fn only_prompt_answers_that_ask_for_no_less_load_are_fast() {
        let fast = Duration::from_millis(500);
        let prompt = Duration::from_millis(20);
        assert!(is_fast_answer(Some(200), prompt, fast));
        assert!(is_fast_answer(Some(404), prompt, fast));
        assert!(is_fast_answer(Some(200), fast, fast));
        assert!(!is_fast_answer(Some(200), Duration::from_millis(501), fast));
        assert!(!is_fast_answer(Some(429), prompt, fast));
        assert!(!is_fast_answer(Some(503), prompt, fast));
        assert!(!is_fast_answer(None, prompt, fast));
    }

    #[test]
    fn success_codes_follow_medplum_examples() {
        assert!(is_success(&json!({}), 201));
        assert!(is_success(&json!({}), 302));
        assert!(!is_success(&json!({}), 404));
        assert!(is_success(&with_codes("200,201,410-600"), 515));
        assert!(is_success(&with_codes("123, fda-fda"), 200));
        assert!(!is_success(&with_codes("1a,asd,fda-fda"), 500));
        assert!(is_success(&with_codes("200,300,400-505"), 500));
        assert!(!is_success(&with_codes("300,400-505"), 200));
        assert!(is_success(&with_codes("200, 204"), 200));
        assert!(!is_success(&with_codes("200,"), 204));
        assert!(is_success(&with_codes(""), 200));
    }

    #[test]
    fn max_attempts_defaults_and_rejects_out_of_range() {
        let with = |v: Value| json!({ "extension": [{ "url": extension::MAX_ATTEMPTS, "valueInteger": v }] });
        assert_eq!(max_attempts(&json!({})), Ok(4));
        assert_eq!(max_attempts(&with(json!(1))), Ok(1));
        assert_eq!(max_attempts(&with(json!(18))), Ok(18));
        assert!(max_attempts(&with(json!(0))).is_err());
        assert!(max_attempts(&with(json!(19))).is_err());
        assert!(max_attempts(&with(json!("3"))).is_err());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let backoff = Backoff::default();
        for (failures, nominal) in [(1, 20.0), (2, 40.0), (3, 80.0), (4, 160.0)] {
            let delay = backoff.delay(failures).as_secs_f64();
            assert!(
                delay >= nominal * 0.9 && delay <= nominal * 1.1,
                "{failures}: {delay}"
            );
        }
        assert_eq!(backoff.delay(30), backoff.cap);
    }

    #[test]
    fn server_errors_and_silence_fail_an_endpoint_other_answers_do_not() {
        assert_eq!(endpoint_signal(None), EndpointSignal::Failing);
        assert_eq!(endpoint_signal(Some(500)), EndpointSignal::Failing);
        assert_eq!(endpoint_signal(Some(503)), EndpointSignal::Failing);
        assert_eq!(endpoint_signal(Some(200)), EndpointSignal::Healthy);
        assert_eq!(endpoint_signal(Some(404)), EndpointSignal::Healthy);
        assert_eq!(endpoint_signal(Some(429)), EndpointSignal::Healthy);
    }

    #[test]
    fn circuit_cool_downs_double_with_jitter_up_to_the_longest() {
        let breaker = CircuitBreaker::default();
        for (opening, nominal) in [(1, 10.0), (2, 20.0), (3, 40.0), (7, 600.0), (40, 600.0)] {
            let cool_down = breaker.cool_down(opening).as_secs_f64();
            assert!(
                cool_down >= nominal * 0.8 && cool_down <= nominal * 1.2,
                "{opening}: {cool_down}"
            );
        }
        let schedule = breaker.schedule();
        assert_eq!(schedule.len(), CircuitBreaker::SCHEDULE_LENGTH as usize);
        assert!(schedule[0] < schedule[2]);
    }

    #[test]
    fn database_backoff_doubles_to_a_cap() {
        assert_eq!(database_backoff(1), Duration::from_millis(200));
        assert_eq!(database_backoff(2), Duration::from_millis(400));
        assert_eq!(database_backoff(7), Duration::from_millis(12_800));
        assert_eq!(database_backoff(100), Duration::from_millis(12_800));
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let backoff = Backoff::default();
        let now = Utc::now();
        assert_eq!(
            backoff.retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(backoff.retry_after("1", now), Some(backoff.base));
        assert_eq!(backoff.retry_after("999999", now), Some(backoff.cap));
        let later = (now + chrono::Duration::seconds(300)).to_rfc2822();
        let asked = backoff.retry_after(&later, now).unwrap().as_secs();
        assert!((299..=300).contains(&asked), "{asked}");
        assert_eq!(backoff.retry_after("soon", now), None);
    }
}
