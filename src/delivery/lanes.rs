//! The hot table's lanes (`fhir_outbox.unfinished_delivery`, migration 20261203000001): every
//! delivery leaves dead row versions in the hot table, which VACUUM removes unless a transaction
//! holds the xmin horizon; then claims would walk more of them at every claim. Writes go to the
//! current lane; the other drains and, once empty, is truncated, which removes its dead versions
//! whatever the horizon; the lanes switch when the current one holds more dead versions than live
//! ones. Every delivery worker runs a pass every [`EVERY`]; the database lets one run at a time.
//!
//! While a snapshot older than the last switch holds the horizon (the same one for
//! [`HELD_AFTER_SECONDS`]), claims cannot skip the dead
//! index entries of the rows they took, so a backlog left in the draining lane would keep both
//! lanes full of them (migration 20261204000001): then each pass moves up to
//! [`MAX_MOVES_PER_PASS_HELD`] of it, and the lanes switch whatever the backlog.

use super::queries;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Time between passes.
const EVERY: Duration = Duration::from_secs(1);
/// Least time between two switches, in seconds.
const MIN_SECONDS_BETWEEN_SWITCHES: f64 = 3.0;
/// Dead versions in the current lane before a switch is worth it (and more than live rows).
const MIN_DEAD_VERSIONS: i64 = 10_000;
/// While the horizon is held, passes come this often and the lanes switch at
/// [`MIN_DEAD_VERSIONS_HELD`] dead versions, [`MIN_SECONDS_BETWEEN_SWITCHES_HELD`] apart at least:
/// every claim then steps over the dead index entries of its lanes (34 ms a claim at the ordinary
/// 10,000, measured by `bench --quick --only horizon --statements`), so switching (and truncating)
/// more often makes each claim cheaper.
const EVERY_HELD: Duration = Duration::from_millis(500);
const MIN_DEAD_VERSIONS_HELD: i64 = 2_000;
const MIN_SECONDS_BETWEEN_SWITCHES_HELD: f64 = 1.0;
/// The draining lane's pending deliveries are moved out when no more than this many are left (the
/// rest leave it as they are claimed): a pass stays short whatever the backlog.
const MAX_MOVES_PER_PASS: i32 = 1_000;
/// Pending deliveries moved out of the draining lane per pass while the horizon is held: about
/// a second of a busy worker's claims, so that a backlog leaves it within seconds.
const MAX_MOVES_PER_PASS_HELD: i32 = 10_000;
/// How long the same snapshot must hold the horizon before it counts as held: long statements
/// and ANALYZE hold one for moments, and moving a backlog for them would only cost.
const HELD_AFTER_SECONDS: f64 = 30.0;

/// Runs a pass every [`EVERY`] until `shutdown`. A failed pass is logged and tried again.
pub(crate) async fn rotate_continuously(pool: PgPool, shutdown: CancellationToken) {
    let mut held = false;
    loop {
        // What the previous pass saw: one pass late at worst, either way.
        let (every, min_seconds, min_dead) = match held {
            true => (
                EVERY_HELD,
                MIN_SECONDS_BETWEEN_SWITCHES_HELD,
                MIN_DEAD_VERSIONS_HELD,
            ),
            false => (EVERY, MIN_SECONDS_BETWEEN_SWITCHES, MIN_DEAD_VERSIONS),
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        match queries::rotate_lanes(
            &pool,
            min_seconds,
            min_dead,
            MAX_MOVES_PER_PASS,
            MAX_MOVES_PER_PASS_HELD,
            HELD_AFTER_SECONDS,
        )
        .await
        {
            Ok(pass) => {
                if pass.horizon_held != held {
                    held = pass.horizon_held;
                    match held {
                        true => tracing::warn!(
                            "a transaction holds the xmin horizon (pg_stat_activity.backend_xmin): \
                             dead row versions cannot be vacuumed; the hot table's lanes now move \
                             waiting deliveries to stay small"
                        ),
                        false => tracing::info!("the xmin horizon moves again"),
                    }
                }
                crate::metrics::lane_rotation(pass.moved as u64, pass.truncated, pass.switched);
                if pass.switched {
                    tracing::info!(
                        "the hot table switched lanes: the other one drains, then is truncated"
                    );
                }
                if pass.truncated {
                    tracing::debug!("truncated the drained lane of the hot table");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "hot table lane rotation failed; it will be tried again")
            }
        }
    }
}
