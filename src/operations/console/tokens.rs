//! The console's bearer tokens: created, listed and revoked from the command line, checked on
//! every request. Only the SHA-256 of a secret is stored (`fhir_outbox.console_token`); the secret
//! is shown once, when it is created.

use crate::operations::actions::Actor;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// Every secret starts so, which makes leaked ones easy to find in logs and repositories.
pub const SECRET_PREFIX: &str = "fo_";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Role {
    /// Sees everything in its scope, changes nothing.
    Viewer,
    /// Sees, and acts: retry, replay, resend, cancel, pause, resume, disable, enable, reset.
    Operator,
}

impl Role {
    /// The name the column holds.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            other => Err(format!("`{other}` is not a role (viewer or operator)")),
        }
    }
}

/// Who a request comes from: a valid, unrevoked token.
#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    /// The token's id.
    pub token_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The one project it sees; `None`: every project.
    pub project: Option<Uuid>,
}

impl Principal {
    /// Whether it may see `project`.
    pub fn sees(&self, project: Uuid) -> bool {
        self.project.is_none_or(|own| own == project)
    }

    /// Whether it may act.
    pub fn may_act(&self) -> bool {
        self.role == Role::Operator
    }

    /// The actor its actions are recorded as.
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.name.clone(),
            token_id: Some(self.token_id),
            role: self.role.as_str().to_owned(),
        }
    }
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its project, if scoped.
    pub project_id: Option<Uuid>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it was last used (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Why a token could not be created or revoked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The name is empty or longer than 100 characters.
    #[error("a token name must have 1 to 100 characters")]
    InvalidName,
    /// The project does not exist.
    #[error("project {0} does not exist")]
    UnknownProject(Uuid),
    /// No token has this id.
    #[error("no console token has the id {0}")]
    UnknownToken(Uuid),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Creates a token; returns it and its secret, which is stored nowhere.
pub async fn create(
    pool: &PgPool,
    name: &str,
    role: Role,
    project: Option<Uuid>,
) -> Result<(TokenInfo, String), TokenError> {
    if name.is_empty() || name.chars().count() > 100 {
        return Err(TokenError::InvalidName);
    }
    if let Some(project) = project {
        let exists = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.project WHERE id = $1) AS "exists!""#,
            project
        )
        .fetch_one(pool)
        .await?;
        if !exists {
            return Err(TokenError::UnknownProject(project));
        }
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let info = sqlx::query_as!(
        TokenInfo,
        r#"INSERT INTO fhir_outbox.console_token (name, role, project_id, secret_sha256)
           VALUES ($1, $2, $3, $4)
           RETURNING id, name, role AS "role: Role", project_id, created_at, revoked_at, last_used_at"#,
        name,
        role.as_str(),
        project,
        digest(&secret)
    )
    .fetch_one(pool)
    .await?;
    Ok((info, secret))
}

/// Every token, newest first, revoked ones included.
pub async fn list(pool: &PgPool) -> Result<Vec<TokenInfo>, TokenError> {
    Ok(sqlx::query_as!(
        TokenInfo,
        r#"SELECT id, name, role AS "role: Role", project_id, created_at, revoked_at, last_used_at
           FROM fhir_outbox.console_token ORDER BY created_at DESC, id"#
    )
    .fetch_all(pool)
    .await?)
}

/// Revokes a token at once: its next request is refused. Returns false if it was revoked already.
pub async fn revoke(pool: &PgPool, id: Uuid) -> Result<bool, TokenError> {
    let row = sqlx::query_scalar!(
        r#"WITH target AS (SELECT id, revoked_at FROM fhir_outbox.console_token WHERE id = $1),
                revoked AS (UPDATE fhir_outbox.console_token SET revoked_at = now()
                            WHERE id = $1 AND revoked_at IS NULL RETURNING id)
           SELECT EXISTS (SELECT 1 FROM revoked) AS "revoked!" FROM target"#,
        id
    )
    .fetch_optional(pool)
    .await?;
    row.ok_or(TokenError::UnknownToken(id))
}

/// The principal of a secret, if it names a valid, unrevoked token. Notes the use (at most once a
/// minute per token, so that reading pages writes almost nothing).
pub async fn authenticate(pool: &PgPool, secret: &str) -> Result<Option<Principal>, sqlx::Error> {
    if !secret.starts_with(SECRET_PREFIX) {
        return Ok(None);
    }
    let row = sqlx::query!(
        r#"SELECT id, name, role AS "role: Role", project_id, last_used_at
           FROM fhir_outbox.console_token
           WHERE secret_sha256 = $1 AND revoked_at IS NULL"#,
        digest(secret)
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    if row
        .last_used_at
        .is_none_or(|at| Utc::now() - at > chrono::Duration::minutes(1))
    {
        sqlx::query!(
            "UPDATE fhir_outbox.console_token SET last_used_at = now() WHERE id = $1",
            row.id
        )
        .execute(pool)
        .await?;
    }
    Ok(Some(Principal {
        token_id: row.id,
        name: row.name,
        role: row.role,
        project: row.project_id,
    }))
}

/// The CSRF token of the browser session that `secret` opened: derived from the secret, so a page
/// of another site, which cannot read the session cookie, cannot forge it.
pub fn csrf_token(secret: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"fhir-outbox console csrf\0");
    hasher.update(secret.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
