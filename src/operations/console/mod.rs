//! The operator console: a JSON API under `/api/v1` and server-rendered pages, on one address
//! (`fhir-outbox run --console ADDR`, or `fhir-outbox console` on hosts that run no worker). Off
//! unless configured.
//!
//! Every request needs a token (`fhir-outbox token create`): the API takes it as
//! `Authorization: Bearer`, the pages from the session cookie that `/login` sets. A token scoped to
//! a project sees and acts on that project only (another project is "not found", as if it did not
//! exist); a viewer cannot act. A state-changing request authenticated by the cookie must carry the
//! session's CSRF token (a form field `csrf`, or the header `x-csrf-token`); a bearer token needs
//! none, since a browser never adds it by itself. Actions go through `actions::act`, which records
//! each as an AuditEvent with the token's identity.
//!
//! - `tokens.rs`: tokens and principals; `queries.rs`: what is read (bounded);
//! - `api.rs`: the JSON API (`openapi.json` describes it); `pages.rs`: the HTML pages, `charts.rs`
//!   their SVG charts; `fhir.rs`: the Subscriptions Backport's `$status` and `$events`.

pub mod api;
mod charts;
pub mod fhir;
mod pages;
pub mod queries;
pub mod tokens;

use axum::Router;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use std::net::SocketAddr;
use tokens::Principal;
use tokio_util::sync::CancellationToken;

/// The name of the browser session's cookie (its value is the token's secret).
pub const SESSION_COOKIE: &str = "fhir_outbox_session";

/// The `WWW-Authenticate` of every 401.
const BEARER_CHALLENGE: &str = "Bearer realm=\"fhir-outbox\"";

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What every handler shares.
#[derive(Clone)]
pub struct ConsoleState {
    /// The database.
    pub pool: PgPool,
    /// The FHIR base URL that `$status` and `$events` refer to resources by (as notifications do).
    pub fhir_base_url: String,
}

impl FromRef<ConsoleState> for PgPool {
    fn from_ref(state: &ConsoleState) -> PgPool {
        state.pool.clone()
    }
}

/// The console's routes (the API, the pages and the FHIR operations), for `serve` and for tests,
/// with the default FHIR base URL.
pub fn router(pool: PgPool) -> Router {
    router_with(pool, crate::delivery::DEFAULT_FHIR_BASE_URL.to_owned())
}

/// [`router`] with the FHIR base URL that `$status` and `$events` refer to resources by.
pub fn router_with(pool: PgPool, fhir_base_url: String) -> Router {
    Router::new()
        .nest("/api/v1", api::routes())
        .nest("/fhir", fhir::routes())
        .merge(pages::routes())
        .with_state(ConsoleState {
            pool,
            fhir_base_url,
        })
}

/// Serves the console on `address` until `shutdown`. Returns the bound address (useful with port
/// 0).
pub async fn serve(
    pool: PgPool,
    address: SocketAddr,
    fhir_base_url: String,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ConsoleError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ConsoleError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ConsoleError::Bind { address, source })?;
    let app = router_with(pool, fhir_base_url);
    let server = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            tracing::warn!(%error, "console stopped");
        }
    });
    tracing::info!(address = %bound, "console: http://{bound}/ (API under /api/v1)");
    Ok((bound, server))
}

/// How a request proved who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    /// `Authorization: Bearer`.
    Bearer,
    /// The session cookie; state-changing requests must carry this CSRF token.
    Session {
        /// The session's CSRF token.
        csrf: String,
    },
}

/// A request from a valid token.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Who.
    pub principal: Principal,
    /// How.
    pub credential: Credential,
}

impl Authenticated {
    /// The CSRF token pages put in their forms (empty for bearer requests).
    pub fn csrf(&self) -> &str {
        match &self.credential {
            Credential::Session { csrf } => csrf,
            Credential::Bearer => "",
        }
    }

    /// Refuses a state-changing request whose CSRF token is missing or wrong (cookie sessions
    /// only).
    pub fn check_csrf(&self, given: Option<&str>) -> Result<(), Refusal> {
        match &self.credential {
            Credential::Bearer => Ok(()),
            Credential::Session { csrf } if given == Some(csrf.as_str()) => Ok(()),
            Credential::Session { .. } => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "the request has no valid CSRF token (reload the page and try again)",
            )),
        }
    }
}

/// A refused request: its status and why, in words. The API answers it as JSON
/// `{"error": "…"}`, the pages as an error page.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// Why.
    pub message: String,
    /// Whether the request needs a token (401): pages send the browser to the login page.
    pub needs_login: bool,
}

impl Refusal {
    /// A refusal with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            needs_login: status == StatusCode::UNAUTHORIZED,
        }
    }

    fn internal(error: impl std::fmt::Display) -> Refusal {
        tracing::error!(%error, "console request failed");
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the database failed: {error}"),
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(BEARER_CHALLENGE),
            );
        }
        response
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The session cookie's value, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .find_map(|cookie| {
            cookie
                .trim()
                .strip_prefix(SESSION_COOKIE)?
                .strip_prefix('=')
        })
}

impl<S> FromRequestParts<S> for Authenticated
where
    PgPool: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let pool = PgPool::from_ref(state);
        let (secret, credential) = if let Some(secret) = bearer(&parts.headers) {
            (secret.to_owned(), Credential::Bearer)
        } else if let Some(secret) = session_cookie(&parts.headers) {
            let csrf = tokens::csrf_token(secret);
            (secret.to_owned(), Credential::Session { csrf })
        } else {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "a console token is required (Authorization: Bearer <token>; `fhir-outbox token create` makes one)",
            ));
        };
        match tokens::authenticate(&pool, &secret).await {
            Ok(Some(principal)) => Ok(Authenticated {
                principal,
                credential,
            }),
            Ok(None) => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "the console token is unknown or revoked",
            )),
            Err(error) => Err(Refusal::internal(error)),
        }
    }
}
