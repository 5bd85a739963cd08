//! Auto-disable (docs/medplum-rest-hook.md §1.11), kept in PostgreSQL: after N final failures (deliveries that exhausted
//! their attempts) within W seconds, a subscription is set to `off` with an `error` saying why, and an
//! AuditEvent with outcome 8 records it. Any success clears the count. The change is guarded: it only
//! applies to a subscription that is still `active`, so it never overrides an administrator.
//!
//! Beyond Medplum: a `410 Gone` answer disables the subscription at once, as Standard Webhooks
//! recommends (the receiver says the endpoint is gone for good).

use crate::audit;
use crate::capture::{self, StoreError, WriteContext};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// One rule: disable after `max_consecutive_failures` final failures within `time_window_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trigger {
    /// Final failures that disable (> 0).
    pub max_consecutive_failures: u32,
    /// The window they are counted in (> 0).
    pub time_window_seconds: u32,
}

/// Parses a JSON array of triggers (Medplum's `subscriptionAutoDisable` format), naming any problem.
pub fn parse_triggers(json: &Value) -> Result<Vec<Trigger>, String> {
    let triggers: Vec<Trigger> = serde_json::from_value(json.clone())
        .map_err(|error| format!("subscriptionAutoDisable must be an array of {{maxConsecutiveFailures, timeWindowSeconds}}: {error}"))?;
    if let Some(bad) = triggers
        .iter()
        .find(|t| t.max_consecutive_failures == 0 || t.time_window_seconds == 0)
    {
        return Err(format!(
            "subscriptionAutoDisable values must be greater than 0, got {}",
            serde_json::to_string(bad).unwrap_or_default()
        ));
    }
    Ok(triggers)
}

/// Parses a project's `subscriptionAutoDisable` setting: an array of triggers, or Medplum's form, a
/// string holding one.
pub fn parse_setting(setting: &Value) -> Result<Vec<Trigger>, String> {
    match setting {
        Value::String(text) => serde_json::from_str::<Value>(text)
            .map_err(|error| format!("subscriptionAutoDisable is not JSON: {error}"))
            .and_then(|value| parse_triggers(&value)),
        other => parse_triggers(other),
    }
}

/// The triggers in force for a project: its setting `subscriptionAutoDisable` (an array, or a string
/// holding one; an empty array turns the feature off for the project) overrides the server's. An
/// invalid project setting is reported and the server's triggers apply.
pub fn project_triggers(project_settings: &Value, server: &[Trigger]) -> Vec<Trigger> {
    let Some(setting) = project_settings.get("subscriptionAutoDisable") else {
        return server.to_vec();
    };
    parse_setting(setting).unwrap_or_else(|problem| {
        tracing::warn!("project setting ignored, using the server's: {problem}");
        server.to_vec()
    })
}

/// Forgets the final failures of these subscriptions (after any success), `(project, id)` each.
pub async fn clear(
    conn: &mut PgConnection,
    subscriptions: &[(Uuid, &str)],
) -> Result<(), sqlx::Error> {
    let projects: Vec<Uuid> = subscriptions.iter().map(|(project, _)| *project).collect();
    let ids: Vec<&str> = subscriptions.iter().map(|(_, id)| *id).collect();
    sqlx::query!(
        "DELETE FROM fhir_outbox.subscription_failure f
         USING unnest($1::uuid[], $2::text[]) AS s(project_id, subscription_id)
         WHERE f.project_id = s.project_id AND f.subscription_id = s.subscription_id",
        &projects,
        &ids as &[&str],
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a final failure and returns the message to disable with, if a trigger fired.
pub async fn record_final_failure(
    conn: &mut PgConnection,
    project: Uuid,
    subscription: &str,
    triggers: &[Trigger],
    now: DateTime<Utc>,
) -> Result<Option<String>, sqlx::Error> {
    let Some(longest) = triggers.iter().map(|t| t.time_window_seconds).max() else {
        return Ok(None);
    };
    let windows: Vec<i32> = triggers
        .iter()
        .map(|t| t.time_window_seconds as i32)
        .collect();
    let counts = sqlx::query_scalar!(
        r#"WITH pruned AS (
               DELETE FROM fhir_outbox.subscription_failure
               WHERE project_id = $1 AND subscription_id = $2
                 AND failed_at < $3::timestamptz - make_interval(secs => $4::float8))
           , added AS (
               INSERT INTO fhir_outbox.subscription_failure (project_id, subscription_id, failed_at)
               VALUES ($1, $2, $3::timestamptz))
           SELECT 1 + (SELECT count(*) FROM fhir_outbox.subscription_failure f
                       WHERE f.project_id = $1 AND f.subscription_id = $2
                         AND f.failed_at >= $3::timestamptz - make_interval(secs => w)) AS "count!"
           FROM unnest($5::int4[]) WITH ORDINALITY AS t(w, n)
           ORDER BY n"#,
        project,
        subscription,
        now,
        f64::from(longest),
        &windows,
    )
    .fetch_all(conn)
    .await?;
    // The data-modifying CTEs see the table as it was before the statement: hence `1 +` for the row
    // being added. Pruned rows are older than every window, so they were never counted.
    Ok(triggers.iter().zip(counts).find_map(|(trigger, count)| {
        (count >= i64::from(trigger.max_consecutive_failures)).then(|| {
            format!(
                "Automatically disabled after {count} consecutive failed events in the last {} seconds",
                trigger.time_window_seconds
            )
        })
    }))
}

/// Sets the subscription to `off` with `error` = `message` and records an AuditEvent with outcome 8,
/// if (and only if) it is still `active`. Runs in a savepoint of the caller's transaction, so a
/// concurrent administrator's change makes it back off without disturbing the caller. Returns
/// whether it disabled the subscription.
pub async fn disable(
    conn: &mut PgConnection,
    project: Uuid,
    subscription_id: &str,
    message: &str,
    context: &WriteContext,
) -> Result<bool, StoreError> {
    let mut savepoint = conn.begin().await?;
    let current =
        match capture::read(&mut *savepoint, project, "Subscription", subscription_id).await {
            Ok(current) => current,
            Err(StoreError::NotFound(_) | StoreError::Gone(_)) => return Ok(false),
            Err(error) => return Err(error),
        };
    if current.get("status").and_then(Value::as_str) != Some("active") {
        return Ok(false);
    }
    let version = current
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .and_then(|v| v.parse::<i64>().ok());
    let mut disabled = current.clone();
    disabled["status"] = json!("off");
    disabled["error"] = json!(message);
    match capture::update(
        &mut *savepoint,
        project,
        "Subscription",
        subscription_id,
        &disabled,
        version,
        context,
    )
    .await
    {
        Ok(_) => {}
        Err(StoreError::VersionConflict { .. }) => {
            savepoint.rollback().await?;
            tracing::warn!(
                subscription = subscription_id,
                "auto-disable backed off: the subscription changed meanwhile"
            );
            return Ok(false);
        }
        Err(error) => return Err(error),
    }
    let event = audit::disable_event(&current, message, Utc::now(), context);
    capture::create(&mut *savepoint, project, &event, context).await?;
    clear(&mut savepoint, &[(project, subscription_id)]).await?;
    savepoint.commit().await?;
    tracing::warn!(subscription = subscription_id, "{message}");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_parse_and_validate() {
        let ok = json!([{ "maxConsecutiveFailures": 3, "timeWindowSeconds": 60 }]);
        assert_eq!(
            parse_triggers(&ok).unwrap(),
            [Trigger {
                max_consecutive_failures: 3,
                time_window_seconds: 60
            }]
        );
        assert!(
            parse_triggers(&json!([{ "maxConsecutiveFailures": 0, "timeWindowSeconds": 60 }]))
                .is_err()
        );
        assert!(parse_triggers(&json!([{ "maxConsecutiveFailures": 3 }])).is_err());
        assert!(parse_triggers(&json!({})).is_err());
    }

    #[test]
    fn project_setting_overrides_the_server() {
        let server = [Trigger {
            max_consecutive_failures: 5,
            time_window_seconds: 600,
        }];
        assert_eq!(project_triggers(&json!({}), &server), server);
        assert_eq!(
            project_triggers(&json!({ "subscriptionAutoDisable": [] }), &server),
            []
        );
        let own = json!({ "subscriptionAutoDisable": "[{\"maxConsecutiveFailures\": 2, \"timeWindowSeconds\": 30}]" });
        assert_eq!(
            project_triggers(&own, &server)[0].max_consecutive_failures,
            2
        );
        assert_eq!(
            project_triggers(&json!({ "subscriptionAutoDisable": "not json" }), &server),
            server
        );
    }
}
