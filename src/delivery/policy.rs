//! What counts as success, how many attempts a delivery gets, and when to try again.

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

/// Whether `status` is a success for this subscription (spec §1.8).
///
/// Without the success-codes extension: 200–399. With it: spaces removed, split on `,`, each token
/// `N` or `A-B` (inclusive); the first token that matches decides success; the first token that is
/// not an integer (before any match) makes the whole decision fall back to 200–399; an empty token is
/// 0 and never matches; no match is a failure.
pub fn is_success(subscription: &Value, status: u16) -> bool {
    let default = (200..400).contains(&status);
    let Some(codes) =
        subscription::extension_value(subscription, extension::SUCCESS_CODES, "valueString")
            .and_then(Value::as_str)
            .filter(|codes| !codes.is_empty())
    else {
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
/// We count total attempts, the documented meaning (Medplum's code allows one more: see spec §1.9
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_codes(codes: &str) -> Value {
        json!({ "extension": [{ "url": extension::SUCCESS_CODES, "valueString": codes }] })
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
