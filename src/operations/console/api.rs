//! The JSON API, `/api/v1` (described by `openapi.json`, served at `/api/v1/openapi.json`). Reads
//! answer what `queries.rs` reads; actions go through `actions::act`. Errors are
//! `{"error": "…"}` with 400 (bad input), 401 (no or bad token), 403 (a viewer acting, or a
//! missing CSRF token), 404 (unknown, or outside the token's project), 409 (a conflicting write)
//! or 500.

use super::queries::{self, DeliveryQuery, Scope};
use super::{Authenticated, ConsoleState, Refusal};
use crate::capture::{Interaction, StoreError};
use crate::delivery::DeliveryState;
use crate::operations::actions::{self, Action, ActionResult, CancelScope, RetryScope};
use crate::operations::control::{self, ControlError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Declares the API's routes once, as the list [`ROUTES`] and the router [`routes`], so that
/// neither can gain a route the other lacks (the tests check `openapi.json` against [`ROUTES`]).
macro_rules! api_routes {
    ($($method:ident $path:literal => $handler:ident,)+) => {
        /// Every (method, path) of the API, relative to `/api/v1`; methods in lower case, as
        /// OpenAPI's path items name them.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),+];

        /// The API's routes, relative to `/api/v1`.
        pub fn routes() -> Router<ConsoleState> {
            Router::new()$(.route($path, $method($handler)))+
        }
    };
}

api_routes! {
    get "/openapi.json" => openapi,
    get "/whoami" => whoami,
    get "/overview" => overview,
    get "/projects" => projects,
    get "/projects/{project}/subscriptions" => subscriptions,
    get "/projects/{project}/subscriptions/{id}" => subscription,
    post "/projects/{project}/subscriptions/{id}/{action}" => subscription_action,
    get "/projects/{project}/issues" => issues,
    get "/projects/{project}/endpoints" => endpoints,
    post "/projects/{project}/endpoints/reset" => reset_endpoint,
    get "/projects/{project}/deliveries" => deliveries,
    get "/projects/{project}/deliveries/{id}" => delivery,
    post "/projects/{project}/deliveries/{id}/{action}" => delivery_action,
    post "/projects/{project}/resources/{resource_type}/{id}/resend" => resend,
}

type Answer = Result<Json<Value>, Refusal>;

/// A request axum could not take apart (a path segment, query string or body of the wrong form),
/// refused in the API's error shape rather than axum's plain text.
fn rejected(rejection: impl IntoResponse + std::fmt::Display) -> Refusal {
    let message = rejection.to_string();
    Refusal::new(rejection.into_response().status(), message)
}

/// [`Path`], refused as [`rejected`] says.
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Refusal> {
        let Path(value) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(rejected)?;
        Ok(ApiPath(value))
    }
}

/// [`Query`], refused as [`rejected`] says.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Refusal> {
        let Query(value) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(rejected)?;
        Ok(ApiQuery(value))
    }
}

fn answer(value: impl serde::Serialize) -> Answer {
    serde_json::to_value(value)
        .map(Json)
        .map_err(Refusal::internal)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// The project named in a path, if the token sees it. A project outside the token's scope is "not
/// found", exactly like one that does not exist: a scoped token learns nothing of others.
pub fn visible_project(auth: &Authenticated, project: &str) -> Result<Uuid, Refusal> {
    let id = Uuid::parse_str(project).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("`{project}` is not a project id (a UUID)"),
        )
    })?;
    if auth.principal.sees(id) {
        Ok(id)
    } else {
        Err(not_found_project(id))
    }
}

/// The refusal of a project that does not exist or that the token does not see (the same words).
pub(super) fn not_found_project(id: Uuid) -> Refusal {
    Refusal::new(StatusCode::NOT_FOUND, format!("project {id} not found"))
}

/// Refuses unless the token may act (an operator) and, from a browser, the CSRF token matches.
pub fn may_act(auth: &Authenticated, csrf: Option<&str>) -> Result<(), Refusal> {
    if !auth.principal.may_act() {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "token `{}` is a viewer: viewers cannot act (an operator token can)",
                auth.principal.name
            ),
        ));
    }
    auth.check_csrf(csrf)
}

/// The refusal of a failed read or action.
pub fn refusal(error: ControlError) -> Refusal {
    match &error {
        ControlError::UnknownSubscription(_)
        | ControlError::UnknownDelivery(_)
        | ControlError::UnknownEndpoint(_) => {
            Refusal::new(StatusCode::NOT_FOUND, error.to_string())
        }
        ControlError::Resend { .. } => {
            Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, error.to_string())
        }
        ControlError::Store(store) => store_refusal(store),
    }
}

fn store_refusal(error: &StoreError) -> Refusal {
    match error {
        StoreError::NotFound(_) | StoreError::Gone(_) => {
            Refusal::new(StatusCode::NOT_FOUND, error.to_string())
        }
        StoreError::VersionConflict { .. } => Refusal::new(StatusCode::CONFLICT, error.to_string()),
        StoreError::InvalidId(_) => Refusal::new(StatusCode::BAD_REQUEST, error.to_string()),
        other => Refusal::internal(other),
    }
}

/// Whether a project exists (a visible id may still name nothing).
async fn require_project(pool: &PgPool, project: Uuid) -> Result<(), Refusal> {
    let exists = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM fhir_outbox.project WHERE id = $1) AS "exists!""#,
        project
    )
    .fetch_one(pool)
    .await
    .map_err(Refusal::internal)?;
    if exists {
        Ok(())
    } else {
        Err(not_found_project(project))
    }
}

async fn whoami(auth: Authenticated) -> Answer {
    answer(&auth.principal)
}

#[derive(Deserialize)]
struct ProjectFilter {
    project: Option<String>,
}

/// The scope of an overview: the named project (if visible), else the token's.
pub fn overview_scope(auth: &Authenticated, project: Option<&str>) -> Result<Scope, Refusal> {
    match (project.filter(|p| !p.is_empty()), auth.principal.project) {
        (Some(project), _) => Ok(Scope::Project(visible_project(auth, project)?)),
        (None, Some(own)) => Ok(Scope::Project(own)),
        (None, None) => Ok(Scope::All),
    }
}

async fn overview(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    ApiQuery(filter): ApiQuery<ProjectFilter>,
) -> Answer {
    let scope = overview_scope(&auth, filter.project.as_deref())?;
    let overview = queries::overview(&state.pool, scope)
        .await
        .map_err(|error| store_refusal(&error))?;
    answer(overview)
}

/// The scope a token reads lists in.
pub fn token_scope(auth: &Authenticated) -> Scope {
    match auth.principal.project {
        Some(project) => Scope::Project(project),
        None => Scope::All,
    }
}

async fn projects(State(state): State<ConsoleState>, auth: Authenticated) -> Answer {
    let projects = queries::projects(&state.pool, token_scope(&auth))
        .await
        .map_err(|error| store_refusal(&error))?;
    answer(json!({ "projects": projects }))
}

async fn subscriptions(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    ApiPath(project): ApiPath<String>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    require_project(&state.pool, project).await?;
    let subscriptions = queries::subscriptions(&state.pool, project, None)
        .await
        .map_err(|error| store_refusal(&error))?;
    answer(json!({ "subscriptions": subscriptions }))
}

async fn subscription(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    ApiPath((project, id)): ApiPath<(String, String)>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    let found = queries::subscriptions(&state.pool, project, Some(&id))
        .await
        .map_err(|error| store_refusal(&error))?;
    let Some(subscription) = found.into_iter().next() else {
        return Err(refusal(ControlError::UnknownSubscription(id)));
    };
    let issues = queries::issues(&state.pool, project, Some(&id))
        .await
        .map_err(|error| store_refusal(&error))?;
    let mut value = serde_json::to_value(subscription).map_err(Refusal::internal)?;
    value["open_issues"] = serde_json::to_value(issues).map_err(Refusal::internal)?;
    Ok(Json(value))
}

#[derive(Deserialize)]
struct IssueFilter {
    subscription: Option<String>,
}

async fn issues(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    ApiPath(project): ApiPath<String>,
    ApiQuery(filter): ApiQuery<IssueFilter>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    require_project(&state.pool, project).await?;
    let issues = queries::issues(&state.pool, project, filter.subscription.as_deref())
        .await
        .map_err(|error| store_refusal(&error))?;
    answer(json!({ "issues": issues }))
}

async fn endpoints(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    ApiPath(project): ApiPath<String>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    require_project(&state.pool, project).await?;
    let endpoints = queries::endpoints(&state.pool, project)
        .await
        .map_err(|error| store_refusal(&error))?;
    answer(json!({ "endpoints": endpoints }))
}

/// The filters of the delivery list, as the query string gives them.
#[derive(Debug, Default, Deserialize)]
pub struct DeliveryParams {
    /// A state name.
    pub state: Option<String>,
    /// A subscription id.
    pub subscription: Option<String>,
    /// `Type/id`.
    pub resource: Option<String>,
    /// RFC 3339 or a duration ago (`1h`).
    pub since: Option<String>,
    /// RFC 3339 or a duration ago.
    pub until: Option<String>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<i64>,
    /// Page size (default 50, at most 500).
    pub limit: Option<i64>,
}

impl DeliveryParams {
    /// The query these parameters ask for, or why they are wrong. Empty strings (from forms) are
    /// no filter.
    pub fn query(&self) -> Result<DeliveryQuery, Refusal> {
        let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, message);
        let given = |value: &Option<String>| value.clone().filter(|v| !v.trim().is_empty());
        let now = Utc::now();
        let time = |value: &Option<String>| {
            given(value)
                .map(|text| control::parse_time(&text, now).map_err(|e| bad(e.to_string())))
                .transpose()
        };
        Ok(DeliveryQuery {
            state: given(&self.state)
                .map(|state| state.parse::<DeliveryState>())
                .transpose()
                .map_err(|error| bad(error.to_string()))?,
            subscription: given(&self.subscription),
            resource: given(&self.resource)
                .map(|resource| match resource.split_once('/') {
                    Some((kind, id)) if !kind.is_empty() && !id.is_empty() => {
                        Ok((kind.to_owned(), id.to_owned()))
                    }
                    _ => Err(bad(format!(
                        "`{resource}` is not a resource reference (Type/id, e.g. Patient/123)"
                    ))),
                })
                .transpose()?,
            since: time(&self.since)?,
            until: time(&self.until)?,
            before: self.cursor,
            limit: self.limit.unwrap_or(50).clamp(1, 500),
        })
    }
}

async fn deliveries(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    ApiPath(project): ApiPath<String>,
    ApiQuery(params): ApiQuery<DeliveryParams>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    let query = params.query()?;
    require_project(&state.pool, project).await?;
    let page = queries::deliveries(&state.pool, project, &query)
        .await
        .map_err(|error| store_refusal(&error))?;
    answer(page)
}

async fn delivery(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    ApiPath((project, id)): ApiPath<(String, i64)>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    match queries::delivery(&state.pool, project, id).await {
        Ok(Some(detail)) => answer(detail),
        Ok(None) => Err(refusal(ControlError::UnknownDelivery(id))),
        Err(error) => Err(store_refusal(&error)),
    }
}

fn csrf_header(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-csrf-token")?.to_str().ok()
}

/// Performs an action for a request that may act.
pub async fn perform(
    pool: &PgPool,
    auth: &Authenticated,
    project: Uuid,
    action: &Action,
) -> Result<ActionResult, Refusal> {
    require_project(pool, project).await?;
    actions::act(pool, project, &auth.principal.actor(), action)
        .await
        .map_err(refusal)
}

fn unknown_action(action: &str, known: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("`{action}` is not an action here ({known})"),
    )
}

/// The action a subscription path names.
pub fn subscription_action_named(action: &str, id: String) -> Result<Action, Refusal> {
    Ok(match action {
        "pause" => Action::Pause(id),
        "resume" => Action::Resume(id),
        "disable" => Action::Disable(id),
        "enable" => Action::Enable(id),
        "cancel" => Action::Cancel(CancelScope::Subscription(id)),
        "retry" => Action::Retry(RetryScope::Subscription(id)),
        other => {
            return Err(unknown_action(
                other,
                "pause, resume, disable, enable, cancel, retry",
            ));
        }
    })
}

/// The action a delivery path names.
pub fn delivery_action_named(action: &str, id: i64) -> Result<Action, Refusal> {
    Ok(match action {
        "retry" => Action::Retry(RetryScope::Delivery(id)),
        "replay" => Action::Replay(id),
        "cancel" => Action::Cancel(CancelScope::Delivery(id)),
        other => return Err(unknown_action(other, "retry, replay, cancel")),
    })
}

async fn subscription_action(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    headers: HeaderMap,
    ApiPath((project, id, action)): ApiPath<(String, String, String)>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    let action = subscription_action_named(&action, id)?;
    may_act(&auth, csrf_header(&headers))?;
    answer(perform(&state.pool, &auth, project, &action).await?)
}

async fn delivery_action(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    headers: HeaderMap,
    ApiPath((project, id, action)): ApiPath<(String, i64, String)>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    let action = delivery_action_named(&action, id)?;
    may_act(&auth, csrf_header(&headers))?;
    answer(perform(&state.pool, &auth, project, &action).await?)
}

#[derive(Deserialize, Default)]
struct ResendBody {
    subscription: Option<String>,
    interaction: Option<String>,
}

async fn resend(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    headers: HeaderMap,
    ApiPath((project, resource_type, id)): ApiPath<(String, String, String)>,
    // Taken as a `Result` so that the token is checked before the body (a viewer is told it
    // cannot act, whatever it sent).
    body: Result<Option<Json<ResendBody>>, JsonRejection>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    may_act(&auth, csrf_header(&headers))?;
    let body = body
        .map_err(rejected)?
        .map(|Json(body)| body)
        .unwrap_or_default();
    let interaction = match body.interaction.as_deref() {
        None | Some("update") => Interaction::Update,
        Some("create") => Interaction::Create,
        Some(other) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("`{other}` cannot be resent: the interaction is `update` or `create`"),
            ));
        }
    };
    let action = Action::Resend {
        resource_type,
        id,
        subscription: body.subscription,
        interaction,
    };
    answer(perform(&state.pool, &auth, project, &action).await?)
}

#[derive(Deserialize)]
struct ResetBody {
    endpoint: String,
}

async fn reset_endpoint(
    State(state): State<ConsoleState>,
    auth: Authenticated,
    headers: HeaderMap,
    ApiPath(project): ApiPath<String>,
    // A `Result`, checked after the token, as in `resend`.
    body: Result<Json<ResetBody>, JsonRejection>,
) -> Answer {
    let project = visible_project(&auth, &project)?;
    may_act(&auth, csrf_header(&headers))?;
    let Json(body) = body.map_err(rejected)?;
    let action = Action::ResetEndpoint(body.endpoint);
    answer(perform(&state.pool, &auth, project, &action).await?)
}
