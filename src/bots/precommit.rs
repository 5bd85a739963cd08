//! Pre-commit subscriptions (docs/medplum-rest-hook.md §1.18): a Subscription with the `pre-commit-bot` extension whose
//! endpoint is `Bot/<id>` runs its bot inside the write's transaction, before anything is stored. The
//! bot can reject the write (nothing is written or captured) or replace the resource being written
//! (the replacement is what is stored and captured). As in Medplum: active only when the server
//! setting allows it and the project's setting `preCommitSubscriptionsEnabled` is true; evaluated with
//! interaction `update` for creates and updates and `delete` for deletes, with no previous version;
//! only the first matching subscription runs. The asynchronous worker ignores these subscriptions.
//!
//! Bots are Rust handlers, so this runs on the Rust write path ([`PreCommit::create`], …); writes made
//! through the SQL functions by other applications do not run them.

use super::{BotFailure, BotInput, BotRegistry};
use crate::capture::{self, Deletion, Interaction, StoreError, WriteContext, Written};
use crate::dispatch::matching::{self, ChangeView, CompiledSubscription, Verdict};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

/// Why a write with pre-commit subscriptions did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PreCommitError {
    /// A pre-commit bot refused the write.
    #[error("rejected by {bot} (Subscription/{subscription}): {message}")]
    Rejected {
        /// `Bot/<id>`.
        bot: String,
        /// The Subscription's id.
        subscription: String,
        /// The bot's message.
        message: String,
        /// The same as an OperationOutcome, for an API to return.
        outcome: Value,
    },
    /// The store refused the write.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for PreCommitError {
    fn from(error: sqlx::Error) -> Self {
        PreCommitError::Store(error.into())
    }
}

/// The Rust write path with pre-commit subscriptions.
#[derive(Debug, Clone)]
pub struct PreCommit {
    bots: BotRegistry,
    server_enabled: bool,
}

impl PreCommit {
    /// Pre-commit subscriptions run when `server_enabled` (the server setting) and the project's
    /// `preCommitSubscriptionsEnabled` setting are both true.
    pub fn new(bots: BotRegistry, server_enabled: bool) -> Self {
        PreCommit {
            bots,
            server_enabled,
        }
    }

    /// [`capture::create`] after the pre-commit bots.
    pub async fn create(
        &self,
        conn: &mut PgConnection,
        project: Uuid,
        resource: &Value,
        context: &WriteContext,
    ) -> Result<Written, PreCommitError> {
        let resource = self
            .run(conn, project, Interaction::Update, resource)
            .await?;
        Ok(capture::create(&mut *conn, project, &resource, context).await?)
    }

    /// [`capture::update`] after the pre-commit bots.
    #[allow(clippy::too_many_arguments)]
    pub async fn update(
        &self,
        conn: &mut PgConnection,
        project: Uuid,
        resource_type: &str,
        id: &str,
        resource: &Value,
        if_match: Option<i64>,
        context: &WriteContext,
    ) -> Result<Written, PreCommitError> {
        let resource = self
            .run(conn, project, Interaction::Update, resource)
            .await?;
        Ok(capture::update(
            &mut *conn,
            project,
            resource_type,
            id,
            &resource,
            if_match,
            context,
        )
        .await?)
    }

    /// [`capture::delete`] after the pre-commit bots (which see the resource being deleted).
    pub async fn delete(
        &self,
        conn: &mut PgConnection,
        project: Uuid,
        resource_type: &str,
        id: &str,
        context: &WriteContext,
    ) -> Result<Deletion, PreCommitError> {
        if let Ok(current) = capture::read(&mut *conn, project, resource_type, id).await {
            self.run(conn, project, Interaction::Delete, &current)
                .await?;
        }
        Ok(capture::delete(&mut *conn, project, resource_type, id, context).await?)
    }

    /// Runs the first matching pre-commit bot; returns the resource to write.
    async fn run(
        &self,
        conn: &mut PgConnection,
        project: Uuid,
        interaction: Interaction,
        resource: &Value,
    ) -> Result<Value, PreCommitError> {
        if !self.server_enabled {
            return Ok(resource.clone());
        }
        let candidates = sqlx::query!(
            r#"SELECT r.id, r.version_id, v.content AS "content!",
                      coalesce(p.settings -> 'preCommitSubscriptionsEnabled' = 'true'::jsonb, false) AS "enabled!"
               FROM fhir_outbox.project p
               JOIN fhir_outbox.resource r ON r.project_id = p.id
               JOIN fhir_outbox.resource_version v
                 ON v.project_id = r.project_id AND v.resource_type = r.resource_type AND v.id = r.id
                AND v.version_id = r.version_id
               WHERE p.id = $1 AND r.resource_type = 'Subscription' AND NOT r.deleted
                 AND v.content ->> 'status' = 'active'
                 AND v.content -> 'extension' @> '[{"url": "https://medplum.com/fhir/StructureDefinition/pre-commit-bot", "valueBoolean": true}]'
               ORDER BY r.id"#,
            project
        )
        .fetch_all(&mut *conn)
        .await?;
        let resource_type = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let view = ChangeView {
            resource_type,
            interaction,
            current: resource,
            previous: None,
            changed_at: None,
        };
        for candidate in candidates.iter().filter(|c| c.enabled) {
            let subscription = CompiledSubscription::compile(
                project,
                candidate.version_id,
                &candidate.content,
                None,
                false,
                false,
            );
            if !matches!(
                matching::evaluate_pre_commit(&subscription, &view),
                Verdict::Matched
            ) {
                continue;
            }
            let Some(bot_id) = crate::subscription::endpoint(&candidate.content)
                .and_then(|e| e.strip_prefix("Bot/"))
            else {
                continue; // only bot endpoints run before commit
            };
            let bot_reference = format!("Bot/{bot_id}");
            let reject = |message: String| PreCommitError::Rejected {
                bot: bot_reference.clone(),
                subscription: candidate.id.clone(),
                outcome: json!({
                    "resourceType": "OperationOutcome",
                    "issue": [{ "severity": "error", "code": "processing", "details": { "text": message } }]
                }),
                message,
            };
            let bot = match capture::read(&mut *conn, project, "Bot", bot_id).await {
                Ok(bot) => bot,
                Err(StoreError::NotFound(_) | StoreError::Gone(_) | StoreError::InvalidId(_)) => {
                    return Err(reject(format!(
                        "{bot_reference} does not exist in this project"
                    )));
                }
                Err(error) => return Err(error.into()),
            };
            let input = match interaction {
                Interaction::Delete => json!({ "deletedResource": resource }),
                _ => resource.clone(),
            };
            let output = self
                .bots
                .run(BotInput {
                    bot,
                    subscription_id: candidate.id.clone(),
                    interaction,
                    input,
                    headers: Vec::new(),
                })
                .await
                .map_err(|BotFailure { message }| reject(message))?;
            // Only the first matching subscription runs (as in Medplum).
            return Ok(match output.replacement {
                Some(replacement)
                    if replacement.get("resourceType") == resource.get("resourceType")
                        && replacement.get("id") == resource.get("id") =>
                {
                    replacement
                }
                _ => resource.clone(),
            });
        }
        Ok(resource.clone())
    }
}
