//! Projects: the tenants. Every resource, outbox row, subscription and delivery belongs to one.

use crate::delivery::auto_disable::{self, Trigger};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgExecutor;
use uuid::Uuid;

/// Creates a project with no settings, not server-scope, and returns its id (SQL:
/// `fhir_outbox.create_project(name)`).
pub async fn create_project<'e>(db: impl PgExecutor<'e>, name: &str) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT fhir_outbox.create_project($1) AS "id!""#, name)
        .fetch_one(db)
        .await
}

/// Creates a project with settings (checked as [`ProjectSettings`] first), server-scope or not, and
/// returns its id. A server-scope project's subscriptions apply to every project's changes when the
/// dispatcher runs with `server_scoped_subscriptions`.
pub async fn create_project_with<'e>(
    db: impl PgExecutor<'e>,
    name: &str,
    settings: &ProjectSettings,
    server_scope: bool,
) -> Result<Uuid, ProjectError> {
    let value =
        serde_json::to_value(settings).map_err(|error| ProjectError::Invalid(error.to_string()))?;
    sqlx::query_scalar!(
        r#"SELECT fhir_outbox.create_project($1, $2, $3) AS "id!""#,
        name,
        value,
        server_scope
    )
    .fetch_one(db)
    .await
    .map_err(ProjectError::from_database)
}

/// Parses settings given as JSON text (the CLI's `--settings`), naming the problem when they are
/// not valid.
pub fn parse_settings(text: &str) -> Result<ProjectSettings, ProjectError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|error| ProjectError::Invalid(format!("settings are not JSON: {error}")))?;
    if !value.is_object() {
        return Err(ProjectError::Invalid(
            "settings must be a JSON object".to_owned(),
        ));
    }
    serde_json::from_value(value)
        .map_err(|error| ProjectError::Invalid(format!("invalid settings: {error}")))
}

/// A project, as `fhir-outbox project list` and `show` print it.
#[derive(Debug, Clone, Serialize)]
pub struct Project {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Whether its subscriptions may apply to every project (see [`create_project_with`]).
    pub server_scope: bool,
    /// When it was created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Its settings, as stored.
    pub settings: Value,
}

/// Every project, oldest first.
pub async fn list<'e>(db: impl PgExecutor<'e>) -> Result<Vec<Project>, ProjectError> {
    Ok(sqlx::query_as!(
        Project,
        "SELECT id, name, server_scope, created_at, settings FROM fhir_outbox.project
         ORDER BY created_at, id"
    )
    .fetch_all(db)
    .await?)
}

/// One project.
pub async fn get<'e>(db: impl PgExecutor<'e>, project: Uuid) -> Result<Project, ProjectError> {
    sqlx::query_as!(
        Project,
        "SELECT id, name, server_scope, created_at, settings FROM fhir_outbox.project WHERE id = $1",
        project
    )
    .fetch_optional(db)
    .await?
    .ok_or(ProjectError::Unknown(project))
}

/// Whether a project exists.
pub async fn exists<'e>(db: impl PgExecutor<'e>, project: Uuid) -> Result<bool, ProjectError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.project WHERE id = $1) AS "exists!""#,
        project
    )
    .fetch_one(db)
    .await?)
}

/// A project's settings (the `settings` column), typed. Settings this version does not know are
/// kept as they are in `other`, so reading and writing back never loses one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSettings {
    /// Pre-commit subscriptions run in this project's writes (the server must allow them too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_commit_subscriptions_enabled: Option<bool>,
    /// AuditEvents of this project are redacted, whatever the server's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact_audit_events: Option<bool>,
    /// Auto-disable triggers that replace the server's for this project (empty: off). Medplum
    /// stores the array as a JSON string; both forms are read, an array is written.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "auto_disable_setting"
    )]
    pub subscription_auto_disable: Option<Vec<Trigger>>,
    /// Every other setting, unchanged.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn auto_disable_setting<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<Trigger>>, D::Error> {
    auto_disable::parse_setting(&Value::deserialize(deserializer)?)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Why project settings could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// No project has this id.
    #[error("unknown project {0}")]
    Unknown(Uuid),
    /// The stored settings are not valid (named by the message).
    #[error("project {project} has invalid settings: {message}")]
    InvalidSettings {
        /// The project.
        project: Uuid,
        /// What is wrong.
        message: String,
    },
    /// A new project's name or settings are not valid (SQLSTATE `OB012`, or refused before).
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl ProjectError {
    fn from_database(error: sqlx::Error) -> Self {
        match error.as_database_error() {
            Some(db_error) if db_error.code().as_deref() == Some("OB012") => {
                ProjectError::Invalid(db_error.message().to_owned())
            }
            _ => ProjectError::Database(error),
        }
    }
}

/// Reads a project's settings.
pub async fn settings<'e>(
    db: impl PgExecutor<'e>,
    project: Uuid,
) -> Result<ProjectSettings, ProjectError> {
    serde_json::from_value(get(db, project).await?.settings).map_err(|error| {
        ProjectError::InvalidSettings {
            project,
            message: error.to_string(),
        }
    })
}

/// Replaces a project's settings. Subscriptions read them as they are delivered, so a change
/// applies to the next delivery.
pub async fn set_settings<'e>(
    db: impl PgExecutor<'e>,
    project: Uuid,
    settings: &ProjectSettings,
) -> Result<(), ProjectError> {
    let value = serde_json::to_value(settings).map_err(|error| ProjectError::InvalidSettings {
        project,
        message: error.to_string(),
    })?;
    let updated = sqlx::query!(
        "UPDATE fhir_outbox.project SET settings = $2 WHERE id = $1",
        project,
        value
    )
    .execute(db)
    .await
    .map_err(ProjectError::from_database)?
    .rows_affected();
    if updated == 0 {
        return Err(ProjectError::Unknown(project));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_round_trip_keeps_unknown_settings_and_reads_medplums_string_form() {
        let stored = json!({
            "preCommitSubscriptionsEnabled": true,
            "subscriptionAutoDisable": "[{\"maxConsecutiveFailures\": 3, \"timeWindowSeconds\": 60}]",
            "somethingElse": {"kept": 1}
        });
        let settings: ProjectSettings = serde_json::from_value(stored).unwrap();
        assert_eq!(settings.pre_commit_subscriptions_enabled, Some(true));
        assert_eq!(
            settings.subscription_auto_disable,
            Some(vec![Trigger {
                max_consecutive_failures: 3,
                time_window_seconds: 60
            }])
        );
        assert_eq!(
            serde_json::to_value(&settings).unwrap(),
            json!({
                "preCommitSubscriptionsEnabled": true,
                "subscriptionAutoDisable": [{"maxConsecutiveFailures": 3, "timeWindowSeconds": 60}],
                "somethingElse": {"kept": 1}
            })
        );
    }

    #[test]
    fn invalid_auto_disable_settings_are_errors_that_name_the_problem() {
        let error = serde_json::from_value::<ProjectSettings>(
            json!({ "subscriptionAutoDisable": [{ "maxConsecutiveFailures": 0, "timeWindowSeconds": 5 }] }),
        )
        .unwrap_err();
        assert!(error.to_string().contains("greater than 0"), "{error}");
    }
}
