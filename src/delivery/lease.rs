//! The worker's claim and completion statements, for tools that drive or measure them without
//! sending anything (the benchmark's claim scenario): the same SQL the worker runs, never a copy.

use super::DeliveryState;
use super::outcome::Completion;
use super::queries;
use sqlx::{Connection, PgConnection};
use std::time::Duration;
use uuid::Uuid;

/// A delivery leased by [`lease_due`]: `in_flight` until completed or its lease expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leased {
    /// The delivery.
    pub id: i64,
    /// Its lease token, which fences its completion.
    pub lease_token: Uuid,
}

/// Leases up to `limit` due deliveries (or ones whose lease expired) for `lease`, at most
/// `endpoint_allowance` in flight per endpoint, with the worker's own claim statement, including
/// the reads of resources, subscriptions and settings it joins.
pub async fn lease_due(
    conn: &mut PgConnection,
    limit: i64,
    lease: Duration,
    endpoint_allowance: super::policy::EndpointAllowance,
) -> Result<Vec<Leased>, sqlx::Error> {
    let limits = queries::ClaimLimits {
        limit,
        lease_seconds: lease.as_secs_f64(),
        endpoint_allowance,
        probe_seconds: lease.as_secs_f64(),
        queues_per_claim: 2 * limit,
    };
    Ok(queries::claim(conn, limits)
        .await?
        .into_iter()
        .map(|claimed| Leased {
            id: claimed.delivery.id,
            lease_token: claimed.delivery.lease_token,
        })
        .collect())
}

/// Records leased deliveries as succeeded on their first attempt with HTTP `status`, with the
/// recorder's own fenced completion statement in a transaction begun as the recorder begins its own
/// (no attempt rows or AuditEvents). Returns the ids written: a delivery whose lease was taken over
/// is left alone.
pub async fn complete_succeeded(
    conn: &mut PgConnection,
    leased: &[Leased],
    status: i32,
) -> Result<Vec<i64>, sqlx::Error> {
    let completion = Completion {
        state: DeliveryState::Succeeded,
        attempts: 1,
        preamble_failures: 0,
        next_attempt_at: None,
        reason: None,
        last_status: Some(status),
    };
    let completions: Vec<(i64, Uuid, &Completion)> = leased
        .iter()
        .map(|delivery| (delivery.id, delivery.lease_token, &completion))
        .collect();
    let mut tx = conn.begin_with(queries::RECORD_BEGIN).await?;
    let written = queries::complete(&mut tx, &completions, &[], &[]).await?;
    tx.commit().await?;
    Ok(written)
}
