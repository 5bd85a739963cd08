//! `fhir-outbox explain`: does a subscription match a resource change, and if not, why not?
//!
//! It runs exactly the decision the dispatcher runs ([`crate::dispatch::matching::evaluate`]), with
//! the explanations turned on.

use crate::capture::{self, Interaction, StoreError};
use crate::dispatch::matching::{self, ChangeView, CompiledSubscription, Verdict};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use std::path::Path;
use uuid::Uuid;

/// Why `explain` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// A file could not be read or is not JSON.
    #[error("cannot read {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A reference is not `Type/id` or `Type/id/_history/version`.
    #[error(
        "`{0}` is neither a readable file nor a reference like Patient/123 or Patient/123/_history/2"
    )]
    Reference(String),
    /// A resource had to be read from the database but none was given.
    #[error("`{0}` is not a file; reading it from the database needs --database-url and --project")]
    NeedsDatabase(String),
    /// The store refused the read.
    #[error("cannot read {reference}: {source}")]
    Store {
        /// What was read.
        reference: String,
        /// Why it failed.
        #[source]
        source: StoreError,
    },
}

/// Where to read things from the database (both are needed for references).
pub struct Source<'a> {
    /// The pool.
    pub pool: Option<&'a PgPool>,
    /// The project the subscription and the resource belong to.
    pub project: Option<Uuid>,
    /// The server's allow-unsafe-outbound setting (endpoint checks depend on it).
    pub allow_unsafe_outbound: bool,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `Subscription/<id>`.
    pub subscription: String,
    /// `Type/id` of the resource.
    pub resource: String,
    /// The interaction evaluated.
    pub interaction: Interaction,
    /// Whether a delivery would be recorded (with a `reason`: as `skipped`, never sent).
    pub matched: bool,
    /// Why not, the evaluation error, or why a matching change is not sent.
    pub reason: Option<String>,
    /// Problems with the subscription that operators should know about (unsupported criteria, …).
    pub subscription_issues: Vec<String>,
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} vs {} ({})",
            self.subscription, self.resource, self.interaction
        )?;
        match (&self.matched, &self.reason) {
            (true, Some(reason)) => writeln!(
                f,
                "MATCH, NOT SENT: {reason}; dispatch records a `skipped` delivery"
            )?,
            (true, None) => writeln!(f, "MATCH: a delivery would be enqueued")?,
            (false, Some(reason)) => writeln!(f, "NO MATCH: {reason}")?,
            (false, None) => writeln!(f, "NO MATCH")?,
        }
        for issue in &self.subscription_issues {
            writeln!(f, "note: {issue}")?;
        }
        Ok(())
    }
}

/// Loads a resource from a JSON file, or by reference from the database.
async fn load(argument: &str, source: &Source<'_>) -> Result<(Value, Option<i64>), ExplainError> {
    if Path::new(argument).is_file() {
        let text = std::fs::read_to_string(argument).map_err(|error| ExplainError::File {
            path: argument.to_owned(),
            message: error.to_string(),
        })?;
        let value = serde_json::from_str(&text).map_err(|error| ExplainError::File {
            path: argument.to_owned(),
            message: error.to_string(),
        })?;
        return Ok((value, None));
    }
    let parts: Vec<&str> = argument.split('/').collect();
    let (resource_type, id, version) = match parts.as_slice() {
        [resource_type, id] => (*resource_type, *id, None),
        [resource_type, id, "_history", version] => (
            *resource_type,
            *id,
            Some(
                version
                    .parse::<i64>()
                    .map_err(|_| ExplainError::Reference(argument.to_owned()))?,
            ),
        ),
        _ => return Err(ExplainError::Reference(argument.to_owned())),
    };
    let (Some(pool), Some(project)) = (source.pool, source.project) else {
        return Err(ExplainError::NeedsDatabase(argument.to_owned()));
    };
    let store_error = |source| ExplainError::Store {
        reference: argument.to_owned(),
        source,
    };
    let resource = match version {
        Some(version) => capture::vread(pool, project, resource_type, id, version).await,
        None => capture::read(pool, project, resource_type, id).await,
    }
    .map_err(store_error)?;
    let version = resource
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .and_then(|v| v.parse().ok());
    Ok((resource, version))
}

/// Explains whether `subscription` (a file or `Subscription/<id>` or a bare id) matches `resource`
/// (a file or a reference). The previous version is `previous` when given, else the resource's
/// preceding version when it was read from the database. The interaction defaults to `update` when
/// there is a previous version and `create` otherwise.
pub async fn explain(
    subscription: &str,
    resource: &str,
    previous: Option<&str>,
    interaction: Option<Interaction>,
    source: &Source<'_>,
) -> Result<Explanation, ExplainError> {
    let subscription_ref = if subscription.contains('/') || Path::new(subscription).is_file() {
        subscription.to_owned()
    } else {
        format!("Subscription/{subscription}")
    };
    let (subscription, subscription_version) = load(&subscription_ref, source).await?;
    let (current, version) = load(resource, source).await?;
    let previous = match (previous, version) {
        (Some(previous), _) => Some(load(previous, source).await?.0),
        (None, Some(version)) if version > 1 => {
            let reference = format!(
                "{}/{}/_history/{}",
                current["resourceType"].as_str().unwrap_or_default(),
                current["id"].as_str().unwrap_or_default(),
                version - 1
            );
            // A deleted predecessor means this version re-created the resource: no previous.
            load(&reference, source).await.ok().map(|(value, _)| value)
        }
        (None, _) => None,
    };
    let interaction = interaction.unwrap_or(if previous.is_some() {
        Interaction::Update
    } else {
        Interaction::Create
    });
    let mut compiled = CompiledSubscription::compile(
        source.project.unwrap_or_default(),
        subscription_version.unwrap_or(0),
        &subscription,
        None,
        false,
        source.allow_unsafe_outbound,
    );
    // A subscription to a topic is explained with its project's topics.
    if let (Some(pool), Some(project)) = (source.pool, source.project) {
        let mut conn = pool.acquire().await.map_err(|error| ExplainError::Store {
            reference: subscription_ref.clone(),
            source: error.into(),
        })?;
        let topics = crate::dispatch::load_topics(&mut conn, &[project])
            .await
            .map_err(|error| ExplainError::Store {
                reference: subscription_ref.clone(),
                source: error.into(),
            })?;
        if let Some(topics) = topics.get(&project) {
            compiled.bind_topic(topics);
        }
    }
    let resource_type = current["resourceType"].as_str().unwrap_or_default();
    let (evaluated, previous) = match interaction {
        // A delete is evaluated on the last live version, which is also %previous (as dispatch does).
        Interaction::Delete => (&current, Some(&current)),
        _ => (&current, previous.as_ref()),
    };
    let view = ChangeView {
        resource_type,
        interaction,
        current: evaluated,
        previous,
        changed_at: None,
    };
    let (matched, reason) = match matching::evaluate(&compiled, &view, true) {
        Verdict::Matched => (true, None),
        Verdict::Rejected(rejection) => (false, Some(rejection.to_string())),
        Verdict::Refused(reason) => (true, Some(reason)),
        Verdict::Failed(message) => (false, Some(format!("evaluation failed: {message}"))),
        Verdict::OverBudget(message) => (
            false,
            Some(format!(
                "evaluation exhausted its budget; the dispatcher suspends this subscription version: {message}"
            )),
        ),
    };
    Ok(Explanation {
        subscription: format!("Subscription/{}", compiled.id),
        resource: format!(
            "{resource_type}/{}",
            current["id"].as_str().unwrap_or("(no id)")
        ),
        interaction,
        matched,
        reason,
        subscription_issues: compiled
            .issues()
            .into_iter()
            .map(|(_, message)| message)
            .collect(),
    })
}
