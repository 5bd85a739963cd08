//! The console's HTML pages, rendered on the server (maud escapes every value). They read through
//! `queries.rs` and act through `api::perform`, exactly as the JSON API does, so pages and API
//! cannot disagree on scope, roles or what an action does.
//!
//! Every action is two requests: a GET of its confirmation page, which says exactly what will
//! happen, then a POST of that page's form (with the session's CSRF token), which performs it and
//! sends the browser back to the object's page with the action's summary (`?done=…`). Viewers see
//! no action buttons, and their POSTs are refused like the API refuses them.
//!
//! Nothing secret is shown: endpoints are redacted (`queries::redact_endpoint`), requests show
//! header names only, and a delivered Subscription's header values and secret are masked.

use super::api::{self, DeliveryParams};
use super::charts::{self, Chart, Series};
use super::queries::{
    self, DeliveryItem, DeliveryQuery, Figures, Overview, ProjectSummary, Scope,
    SubscriptionSummary,
};
use super::{Authenticated, ConsoleState, Refusal, SESSION_COOKIE, tokens};
use crate::capture::{Interaction, StoreError};
use crate::delivery::{DeliveryState, Notification};
use crate::operations::actions::{Action, ActionResult};
use crate::operations::control::ControlError;
use crate::subscription::extension;
use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, FromRef, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Duration, DurationRound, Utc};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashMap;
use uuid::Uuid;

/// The pages' routes. An action's confirmation page and the action itself share a path: GET asks,
/// POST does.
pub(super) fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/projects", get(projects))
        .route("/projects/{project}", get(project))
        .route("/projects/{project}/subscriptions/{id}", get(subscription))
        .route(
            "/projects/{project}/subscriptions/{id}/{action}",
            get(confirm_subscription_action).post(subscription_action),
        )
        .route("/projects/{project}/deliveries", get(deliveries))
        .route("/projects/{project}/deliveries/{id}", get(delivery))
        .route(
            "/projects/{project}/deliveries/{id}/{action}",
            get(confirm_delivery_action).post(delivery_action),
        )
        .route(
            "/projects/{project}/resources/{resource_type}/{id}/resend",
            get(confirm_resend).post(resend),
        )
        .route("/projects/{project}/issues", get(issues))
        .route("/projects/{project}/endpoints", get(endpoints))
        .route(
            "/projects/{project}/endpoints/reset",
            get(confirm_reset).post(reset),
        )
        .layer(axum::middleware::map_response(protect))
}

/// Headers of every page: never cached (they show operational data, and a shared browser's back
/// button must not show them after sign-out), never framed by another page (a confirmation page is
/// one button: another site must not overlay it), no script (the pages have none) and requests
/// to this origin only.
async fn protect(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("same-origin"),
    );
    response
}

const STYLE: &str = include_str!("console.css");

// ---------------------------------------------------------------------------------------------
// Sessions and errors

/// The request's token, for a page: without one the browser goes to the login page, with a bad
/// one it gets an error page (not the API's JSON).
struct Session(Authenticated);

impl<S> FromRequestParts<S> for Session
where
    PgPool: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Authenticated::from_request_parts(parts, state)
            .await
            .map(Session)
            .map_err(Refusal::page)
    }
}

/// A refusal answered as a page. Every handler returns it, so `?` works on queries and actions.
struct Failure(Refusal);

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Failure(refusal)
    }
}

impl From<ControlError> for Failure {
    fn from(error: ControlError) -> Self {
        Failure(api::refusal(error))
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure(api::refusal(ControlError::Store(error)))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        self.0.page()
    }
}

type Page = Result<Markup, Failure>;

/// A refusal as a page; 401 sends the browser to the login page.
impl Refusal {
    fn page(self) -> Response {
        if self.needs_login {
            return Redirect::to("/login").into_response();
        }
        let title = match self.status {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "Cannot do that",
            StatusCode::CONFLICT => "Conflict",
            _ => "Error",
        };
        let body = html! {
            p.error #error-message { (self.message) }
            p { a href="/" { "Back to the overview" } }
        };
        (self.status, layout(title, None, &[], body)).into_response()
    }
}

// ---------------------------------------------------------------------------------------------
// The frame of every page

/// A link of the breadcrumb trail: (href, text).
type Crumb = (String, String);

/// The frame of every page: header with navigation and the token's identity, breadcrumbs, title,
/// body.
fn layout(title: &str, auth: Option<&Authenticated>, crumbs: &[Crumb], body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · fhir-outbox" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                header {
                    a.brand href="/" { "fhir-outbox" }
                    @if let Some(auth) = auth {
                        nav {
                            a href="/" { "Overview" }
                            a href="/projects" { "Projects" }
                        }
                        span.who {
                            span #who { (auth.principal.name) " · " (auth.principal.role.as_str()) }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(auth.csrf());
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main {
                    @if !crumbs.is_empty() {
                        nav.crumbs aria-label="Breadcrumb" {
                            @for (href, text) in crumbs {
                                a href=(href) { (text) } " › "
                            }
                        }
                    }
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The project a page is about, as its header names it.
struct ProjectContext {
    id: Uuid,
    name: String,
}

impl ProjectContext {
    /// The project of the path, if the token sees it and it exists; otherwise "not found", the
    /// same answer for both (a scoped token learns nothing of other projects).
    async fn load(pool: &PgPool, auth: &Authenticated, project: &str) -> Result<Self, Failure> {
        let id = api::visible_project(auth, project)?;
        let summary = queries::projects(pool, Scope::Project(id))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| api::not_found_project(id))?;
        Ok(ProjectContext {
            id,
            name: summary.name,
        })
    }

    fn path(&self) -> String {
        format!("/projects/{}", self.id)
    }

    fn crumbs(&self) -> Vec<Crumb> {
        vec![
            ("/projects".to_owned(), "Projects".to_owned()),
            (self.path(), self.name.clone()),
        ]
    }

    /// The project's pages, the current one marked.
    fn tabs(&self, current: &str) -> Markup {
        let base = self.path();
        let tabs = [
            ("subscriptions", base.clone(), "Subscriptions"),
            ("deliveries", format!("{base}/deliveries"), "Deliveries"),
            ("issues", format!("{base}/issues"), "Issues"),
            ("endpoints", format!("{base}/endpoints"), "Endpoints"),
            ("overview", format!("/?project={}", self.id), "Overview"),
        ];
        html! {
            nav.tabs {
                @for (name, href, text) in tabs {
                    @if name == current {
                        a href=(href) aria-current="page" { (text) }
                    } @else {
                        a href=(href) { (text) }
                    }
                }
            }
        }
    }

    fn subscription_path(&self, id: &str) -> String {
        format!("/projects/{}/subscriptions/{}", self.id, segment(id))
    }

    fn delivery_path(&self, id: i64) -> String {
        format!("/projects/{}/deliveries/{id}", self.id)
    }
}

/// A value as one path segment, percent-encoded: FHIR ids and resource types need no escaping, but
/// a link or a redirect is never built from a raw value (a `Location` must stay one header).
fn segment(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A query string (without `?`) of these pairs, encoded.
fn query_string(pairs: &[(&str, &str)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        query.append_pair(name, value);
    }
    query.finish()
}

/// What the last action did, carried back in the query string of the page it returns to.
#[derive(Debug, Default, Deserialize)]
struct Flash {
    done: Option<String>,
    audit: Option<String>,
}

fn flash(flash: &Flash) -> Markup {
    html! {
        @if let Some(done) = &flash.done {
            div.flash role="status" {
                "Done: " span #done { (done) }
                @if let Some(audit) = &flash.audit {
                    " (recorded as " code { "AuditEvent/" (audit) } ")"
                }
            }
        }
    }
}

/// Where the browser goes after an action: back to `page` with the action's summary.
fn after_action(page: &str, result: &ActionResult) -> Response {
    let query = query_string(&[("done", &result.summary), ("audit", &result.audit_event_id)]);
    let separator = if page.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{page}{separator}{query}")).into_response()
}

// ---------------------------------------------------------------------------------------------
// Small pieces

fn plural(count: i64, one: &str, many: &str) -> String {
    if count == 1 {
        format!("1 {one}")
    } else {
        format!("{count} {many}")
    }
}

/// `42 s ago`, `5 min ago`, `3 h ago`, `2 d ago` (`in 5 min` for a time to come).
fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds();
    let (amount, future) = (seconds.unsigned_abs(), seconds < 0);
    let text = match amount {
        0..=4 => return "just now".to_owned(),
        5..=59 => format!("{amount} s"),
        60..=5_399 => format!("{} min", amount / 60),
        5_400..=172_799 => format!("{} h", (amount + 1_800) / 3_600),
        _ => format!("{} d", (amount + 43_200) / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// A time as UTC, to the second, with how long ago in its tooltip.
fn time(at: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) title=(ago(at, now)) { (at.format("%Y-%m-%d %H:%M:%S")) }
    }
}

fn optional_time(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Markup {
    match at {
        Some(at) => time(at, now),
        None => html! { "–" },
    }
}

fn percent(rate: Option<f64>) -> String {
    match rate {
        Some(rate) if rate >= 0.9995 => "100 %".to_owned(),
        Some(rate) => format!("{:.1} %", rate * 100.0),
        None => "–".to_owned(),
    }
}

fn millis(ms: Option<f64>) -> String {
    match ms {
        Some(ms) if ms >= 10_000.0 => format!("{:.0} s", ms / 1000.0),
        Some(ms) if ms >= 1_000.0 => format!("{:.1} s", ms / 1000.0),
        Some(ms) => format!("{ms:.0} ms"),
        None => "–".to_owned(),
    }
}

/// Success rate and latency of a window, in one cell.
fn figures_cell(figures: &Figures) -> Markup {
    html! {
        @if figures.attempts == 0 {
            span.muted { "no attempts" }
        } @else {
            span.rate.bad[figures.success_rate.is_some_and(|r| r < 0.95)] { (percent(figures.success_rate)) }
            " of " (figures.attempts)
            @if figures.sampled { "+" }
            br;
            span.muted { "p50 " (millis(figures.p50_ms)) " · p99 " (millis(figures.p99_ms)) }
        }
    }
}

fn state_badge(state: DeliveryState) -> Markup {
    let class = match state {
        DeliveryState::Succeeded => "ok",
        DeliveryState::Failed => "bad",
        DeliveryState::Pending | DeliveryState::InFlight => "warn",
        DeliveryState::Skipped | DeliveryState::Cancelled => "muted",
    };
    html! { span class=(format!("badge {class}")) { (state.as_str()) } }
}

fn circuit_badge(circuit: Option<&str>) -> Markup {
    match circuit {
        Some("open") => html! { span.badge.bad { "open" } },
        Some("half_open") => html! { span.badge.warn { "half-open" } },
        Some(other) => html! { span.badge.ok { (other) } },
        None => html! { span.muted { "–" } },
    }
}

/// A status with what overrides it: paused by an operator, disabled automatically.
fn subscription_badges(subscription: &SubscriptionSummary) -> Markup {
    let status = subscription.status.as_deref().unwrap_or("–");
    html! {
        span class=(format!("badge {}", if status == "active" { "ok" } else { "bad" })) { (status) }
        @if subscription.paused { " " span.badge.warn { "paused" } }
        @if subscription.auto_disabled { " " span.badge.bad { "auto-disabled" } }
    }
}

fn table(head: Markup, rows: Markup) -> Markup {
    // The wrapper scrolls sideways on a narrow screen; the page itself never does.
    html! { div.table-wrap { table { thead { tr { (head) } } tbody { (rows) } } } }
}

/// A JSON value as the pages show it: indented, in a scrollable block.
fn json_block(id: &str, value: &Value) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    html! { pre.json id=(id) { (text) } }
}

/// A resource as the console shows it: a Subscription without its header values, secret and
/// endpoint credentials (a change to a Subscription can itself be delivered, and the console shows
/// what was sent).
fn without_secrets(resource: &Value) -> Value {
    let mut shown = resource.clone();
    if resource.get("resourceType").and_then(Value::as_str) != Some("Subscription") {
        return shown;
    }
    if let Some(channel) = shown.get_mut("channel").and_then(Value::as_object_mut) {
        if let Some(Value::Array(headers)) = channel.get_mut("header") {
            for header in headers.iter_mut() {
                if let Some(text) = header.as_str() {
                    let name = text.split_once(':').map_or(text, |(name, _)| name);
                    *header = Value::String(format!("{name}: ***"));
                }
            }
        }
        if let Some(Value::String(endpoint)) = channel.get_mut("endpoint") {
            *endpoint = queries::redact_endpoint(endpoint);
        }
    }
    let secrets = [
        extension::SECRET,
        extension::SECRET_LEGACY,
        extension::SECRET_NO_WWW,
    ];
    if let Some(Value::Array(extensions)) = shown.get_mut("extension") {
        for entry in extensions.iter_mut() {
            let is_secret = entry
                .get("url")
                .and_then(Value::as_str)
                .is_some_and(|url| secrets.contains(&url));
            if let (true, Some(fields)) = (is_secret, entry.as_object_mut()) {
                fields.retain(|key, _| !key.starts_with("value"));
                fields.insert("valueString".into(), Value::String("***".into()));
            }
        }
    }
    shown
}

// ---------------------------------------------------------------------------------------------
// Login

async fn login_form() -> Markup {
    login_page(None)
}

fn login_page(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        &[],
        html! {
            @if let Some(error) = error { p.error { (error) } }
            form.stacked method="post" action="/login" {
                label for="token" { "Console token" }
                input #token type="password" name="token" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
            p.hint { "An administrator makes tokens with " code { "fhir-outbox token create --role viewer|operator [--project ID]" } "." }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<ConsoleState>, Form(form): Form<LoginForm>) -> Response {
    let secret = form.token.trim();
    match tokens::authenticate(&state.pool, secret).await {
        Ok(Some(_)) => {
            // HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it.
            let cookie = format!("{SESSION_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Ok(None) => (
            StatusCode::UNAUTHORIZED,
            login_page(Some("This token is unknown or revoked.")),
        )
            .into_response(),
        Err(error) => Refusal::internal(error).page(),
    }
}

/// A form that only carries the CSRF token (and, for some actions, what they act on).
#[derive(Debug, Default, Deserialize)]
struct ActionForm {
    csrf: Option<String>,
    subscription: Option<String>,
    endpoint: Option<String>,
}

/// The form of a POST; a missing or unreadable body is an empty form (then refused for its
/// missing CSRF token, as a page, rather than answered with a bare extractor error).
fn form_or_empty(form: Result<Form<ActionForm>, FormRejection>) -> ActionForm {
    form.map(|Form(form)| form).unwrap_or_default()
}

async fn logout(
    auth: Result<Authenticated, Refusal>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let form = form_or_empty(form);
    if let Ok(auth) = &auth {
        if let Err(refusal) = auth.check_csrf(form.csrf.as_deref()) {
            return refusal.page();
        }
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

// ---------------------------------------------------------------------------------------------
// Overview

#[derive(Deserialize)]
struct OverviewFilter {
    project: Option<String>,
}

async fn overview(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Query(filter): Query<OverviewFilter>,
) -> Page {
    let scope = api::overview_scope(&auth, filter.project.as_deref())?;
    let overview = queries::overview(&state.pool, scope).await?;
    // Names for the title and the failing subscriptions' projects (a token may see several).
    let names: HashMap<Uuid, String> =
        if overview.failing_subscriptions.is_empty() && matches!(scope, Scope::All) {
            HashMap::new()
        } else {
            queries::projects(&state.pool, scope)
                .await?
                .into_iter()
                .map(|p| (p.id, p.name))
                .collect()
        };
    let title = match scope {
        Scope::Project(id) => match names.get(&id) {
            Some(name) => format!("Overview of {name}"),
            None => return Err(api::not_found_project(id).into()),
        },
        Scope::All => "Overview".to_owned(),
    };
    let now = Utc::now();
    let (delivered_per_minute, failed_per_minute) = recent_rates(&overview, now);
    let body = html! {
        dl.figures {
            div { dt { "Pending" } dd #pending { (overview.pending) } }
            div { dt { "In flight" } dd #in-flight { (overview.in_flight) } }
            div { dt { "Undispatched" } dd #undispatched { (overview.undispatched) } }
            div {
                dt { "Oldest undelivered" }
                dd #oldest-undelivered {
                    @match overview.oldest_undelivered_at {
                        Some(at) => time datetime=(at.to_rfc3339()) title=(at.format("%Y-%m-%d %H:%M:%S UTC")) { (ago(at, now)) },
                        None => "none",
                    }
                }
            }
            div title="Attempts per minute, the average of the last 5 minutes" {
                dt { "Delivered / min" } dd #delivered-per-minute { (delivered_per_minute) }
            }
            div title="Attempts per minute, the average of the last 5 minutes" {
                dt { "Failed / min" } dd #failed-per-minute .bad[failed_per_minute != "0"] { (failed_per_minute) }
            }
            div {
                dt { "Open circuits" }
                dd #open-circuits .bad[overview.open_circuits > 0] { (overview.open_circuits) }
            }
            div {
                dt { "Failing subscriptions" }
                dd #failing-count .bad[!overview.failing_subscriptions.is_empty()] { (overview.failing_subscriptions.len()) }
            }
        }
        div.charts {
            (charts::stacked_bars(&delivery_chart(&overview, now)))
            (charts::lines(&latency_chart(&overview, now)))
        }
        p.hint {
            "Attempts of the last hour, per minute (UTC); delivered and failed per minute are averages of the last 5 minutes."
            @if overview.per_minute_sampled {
                " The chart counts the latest " (queries::CHART_SAMPLE) " attempts only."
            }
        }
        h2 { "Failing subscriptions" span.muted { " (failed attempts in the last hour)" } }
        @if overview.failing_subscriptions.is_empty() {
            p #no-failing { "No subscription failed in the last hour." }
        } @else {
            div #failing {
                (table(
                    html! {
                        th { "Subscription" }
                        @if matches!(scope, Scope::All) { th { "Project" } }
                        th.num { "Failed" } th.num { "Attempts" } th { "Last error" }
                    },
                    html! {
                        @for failing in &overview.failing_subscriptions {
                            tr {
                                td { a href=(format!("/projects/{}/subscriptions/{}", failing.project_id, segment(&failing.subscription_id))) {
                                    "Subscription/" (failing.subscription_id) } }
                                @if matches!(scope, Scope::All) {
                                    td { a href=(format!("/projects/{}", failing.project_id)) {
                                        (names.get(&failing.project_id).map_or("?", String::as_str)) } }
                                }
                                td.num.bad { (failing.failed_last_hour) }
                                td.num { (failing.attempts_last_hour) }
                                td.error-text { (failing.last_error.as_deref().unwrap_or("–")) }
                            }
                        }
                    },
                ))
            }
        }
    };
    Ok(layout(&title, Some(&auth), &[], body))
}

/// The last hour as 60 minutes, oldest first, the current one last.
fn last_hour(now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let current = now.duration_trunc(Duration::minutes(1)).unwrap_or(now);
    (0..60)
        .rev()
        .map(|back| current - Duration::minutes(back))
        .collect()
}

/// Succeeded and failed attempts per minute over the last five minutes (the current one
/// included, so a burst shows at once).
fn recent_rates(overview: &Overview, now: DateTime<Utc>) -> (String, String) {
    let since = last_hour(now)[55];
    let (succeeded, failed) = overview
        .per_minute
        .iter()
        .filter(|minute| minute.minute >= since)
        .fold((0, 0), |(s, f), minute| {
            (s + minute.succeeded, f + minute.failed)
        });
    let rate = |count: i64| charts::axis_number(count as f64 / 5.0);
    (rate(succeeded), rate(failed))
}

/// The chart's slots: one per minute of the last hour, a label every ten minutes.
fn minute_slots(now: DateTime<Utc>) -> (Vec<DateTime<Utc>>, Vec<String>, Vec<String>) {
    let minutes = last_hour(now);
    let labels = minutes
        .iter()
        .map(|m| {
            if m.format("%M").to_string().ends_with('0') {
                m.format("%H:%M").to_string()
            } else {
                String::new()
            }
        })
        .collect();
    let names = minutes
        .iter()
        .map(|m| m.format("%H:%M UTC").to_string())
        .collect();
    (minutes, labels, names)
}

fn delivery_chart(overview: &Overview, now: DateTime<Utc>) -> Chart {
    let (minutes, x_labels, slot_names) = minute_slots(now);
    let by_minute: HashMap<DateTime<Utc>, &queries::Minute> =
        overview.per_minute.iter().map(|m| (m.minute, m)).collect();
    let column = |pick: fn(&queries::Minute) -> i64| -> Vec<Option<f64>> {
        minutes
            .iter()
            .map(|m| Some(by_minute.get(m).map_or(0.0, |minute| pick(minute) as f64)))
            .collect()
    };
    let succeeded: i64 = overview.per_minute.iter().map(|m| m.succeeded).sum();
    let failed: i64 = overview.per_minute.iter().map(|m| m.failed).sum();
    let busiest = overview
        .per_minute
        .iter()
        .max_by_key(|m| m.succeeded + m.failed);
    let mut description =
        format!("In the last hour: {succeeded} attempts succeeded and {failed} failed.");
    if let Some(busiest) = busiest {
        description.push_str(&format!(
            " Busiest minute: {} with {} attempts.",
            busiest.minute.format("%H:%M UTC"),
            busiest.succeeded + busiest.failed
        ));
    }
    Chart {
        id: "deliveries-chart",
        title: "Deliveries and failures per minute".to_owned(),
        description,
        unit: "",
        x_labels,
        slot_names,
        series: vec![
            Series {
                label: "succeeded".to_owned(),
                class: "ok",
                values: column(|m| m.succeeded),
            },
            Series {
                label: "failed".to_owned(),
                class: "bad",
                values: column(|m| m.failed),
            },
        ],
    }
}

fn latency_chart(overview: &Overview, now: DateTime<Utc>) -> Chart {
    let (minutes, x_labels, slot_names) = minute_slots(now);
    let by_minute: HashMap<DateTime<Utc>, &queries::Minute> =
        overview.per_minute.iter().map(|m| (m.minute, m)).collect();
    let column = |pick: fn(&queries::Minute) -> Option<f64>| -> Vec<Option<f64>> {
        minutes
            .iter()
            .map(|m| by_minute.get(m).and_then(|minute| pick(minute)))
            .collect()
    };
    let worst = overview
        .per_minute
        .iter()
        .filter_map(|m| m.p99_ms.map(|p99| (m.minute, p99)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let description = match worst {
        Some((minute, p99)) => format!(
            "Attempt duration per minute, median and 99th percentile. Slowest minute: {} with p99 {}.",
            minute.format("%H:%M UTC"),
            millis(Some(p99))
        ),
        None => "No attempts in the last hour.".to_owned(),
    };
    Chart {
        id: "latency-chart",
        title: "Latency per minute (p50, p99)".to_owned(),
        description,
        unit: "ms",
        x_labels,
        slot_names,
        series: vec![
            Series {
                label: "p50".to_owned(),
                class: "p50",
                values: column(|m| m.p50_ms),
            },
            Series {
                label: "p99".to_owned(),
                class: "p99",
                values: column(|m| m.p99_ms),
            },
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// Projects and their subscriptions

async fn projects(State(state): State<ConsoleState>, Session(auth): Session) -> Page {
    let projects = queries::projects(&state.pool, api::token_scope(&auth)).await?;
    let now = Utc::now();
    let body = html! {
        @if projects.is_empty() {
            p { "No project yet." }
        } @else {
            (table(
                html! { th { "Project" } th { "Id" } th.num { "Subscriptions" } th.num { "Pending" } th.num { "Open circuits" } th { "Created" } },
                html! {
                    @for project in &projects { (project_row(project, now)) }
                },
            ))
        }
    };
    Ok(layout("Projects", Some(&auth), &[], body))
}

fn project_row(project: &ProjectSummary, now: DateTime<Utc>) -> Markup {
    html! {
        tr {
            td { a href=(format!("/projects/{}", project.id)) { (project.name) } }
            td { code { (project.id) } }
            td.num { (project.subscriptions) }
            td.num { (project.pending) }
            td.num .bad[project.open_circuits > 0] { (project.open_circuits) }
            td { (time(project.created_at, now)) }
        }
    }
}

async fn project(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path(project): Path<String>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let subscriptions = queries::subscriptions(&state.pool, project.id, None).await?;
    let body = html! {
        (project.tabs("subscriptions"))
        @if subscriptions.is_empty() {
            p { "This project has no subscription." }
        } @else {
            div #subscriptions {
                (table(
                    html! {
                        th { "Subscription" } th { "Endpoint" } th { "Status" } th { "Circuit" }
                        th.num { "Pending" } th { "Last hour" } th { "Last 24 h" } th.num { "Issues" }
                    },
                    html! {
                        @for subscription in &subscriptions {
                            tr {
                                td {
                                    a href=(project.subscription_path(&subscription.id)) { (subscription.id) }
                                    @if let Some(reason) = &subscription.reason {
                                        br; span { (reason) }
                                    }
                                    @if let Some(criteria) = &subscription.criteria {
                                        br; span.muted { (criteria) }
                                    }
                                }
                                td { code { (subscription.endpoint.as_deref().unwrap_or("–")) } }
                                td { (subscription_badges(subscription)) }
                                td { (circuit_badge(subscription.circuit.as_deref())) }
                                td.num {
                                    (subscription.pending)
                                    @if subscription.in_flight > 0 { br; span.muted { "+" (subscription.in_flight) " in flight" } }
                                }
                                td { (figures_cell(&subscription.last_hour)) }
                                td { (figures_cell(&subscription.last_day)) }
                                td.num {
                                    @if subscription.issues > 0 {
                                        a.bad href=(format!("{}/issues?{}", project.path(), query_string(&[("subscription", &subscription.id)]))) { (subscription.issues) }
                                    } @else { "0" }
                                }
                            }
                        }
                    },
                ))
            }
            @if subscriptions.len() as i64 >= queries::SUBSCRIPTIONS_PAGE {
                p.hint { "The first " (queries::SUBSCRIPTIONS_PAGE) " subscriptions, by id." }
            }
        }
    };
    Ok(layout(
        &format!("Project {}", project.name),
        Some(&auth),
        &[("/projects".to_owned(), "Projects".to_owned())],
        body,
    ))
}

/// The subscription of a path, or "not found".
async fn find_subscription(
    pool: &PgPool,
    project: &ProjectContext,
    id: &str,
) -> Result<SubscriptionSummary, Failure> {
    queries::subscriptions(pool, project.id, Some(id))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Failure::from(ControlError::UnknownSubscription(id.to_owned())))
}

async fn subscription(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, id)): Path<(String, String)>,
    Query(done): Query<Flash>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let subscription = find_subscription(&state.pool, &project, &id).await?;
    let issues = queries::issues(&state.pool, project.id, Some(&id)).await?;
    let recent = queries::deliveries(
        &state.pool,
        project.id,
        &DeliveryQuery {
            subscription: Some(id.clone()),
            limit: 20,
            ..DeliveryQuery::default()
        },
    )
    .await?;
    let last_failed = queries::deliveries(
        &state.pool,
        project.id,
        &DeliveryQuery {
            subscription: Some(id.clone()),
            state: Some(DeliveryState::Failed),
            limit: 1,
            ..DeliveryQuery::default()
        },
    )
    .await?
    .deliveries
    .into_iter()
    .next();
    let now = Utc::now();
    let path = project.subscription_path(&id);
    let active = subscription.status.as_deref() == Some("active") && subscription.error.is_none();
    let body = html! {
        (flash(&done))
        @if let Some(error) = &subscription.error {
            p.error #subscription-error { (error) }
        }
        dl.facts {
            dt { "Status" } dd #status { (subscription_badges(&subscription)) }
            @if let Some(reason) = &subscription.reason {
                dt { "Reason" } dd #subscription-reason { (reason) }
            }
            dt { "Endpoint" } dd { code #endpoint { (subscription.endpoint.as_deref().unwrap_or("–")) } }
            dt { "Criteria" } dd { code { (subscription.criteria.as_deref().unwrap_or("–")) } }
            dt { "Version" } dd { (subscription.version_id) }
            dt { "Circuit" } dd { (circuit_badge(subscription.circuit.as_deref())) }
            dt { "Pending" } dd #sub-pending { (subscription.pending) }
            dt { "In flight" } dd { (subscription.in_flight) }
            dt { "Last hour" } dd { (figures_cell(&subscription.last_hour)) }
            dt { "Last 24 hours" } dd { (figures_cell(&subscription.last_day)) }
            dt { "Latest failure" }
            dd #latest-failure {
                @match &last_failed {
                    Some(failed) => {
                        a href=(project.delivery_path(failed.id)) { "delivery " (failed.id) }
                        " (" (optional_time(failed.finished_at, now)) ")"
                        @if let Some(status) = failed.last_status { ", HTTP " (status) }
                        @if let Some(reason) = &failed.reason { ": " span.error-text { (reason) } }
                    }
                    None => "none",
                }
            }
        }
        @if auth.principal.may_act() {
            div.actions #actions {
                @if subscription.paused {
                    a.button href=(format!("{path}/resume")) { "Resume" }
                } @else {
                    a.button href=(format!("{path}/pause")) { "Pause" }
                }
                @if active {
                    a.button.danger href=(format!("{path}/disable")) { "Disable" }
                } @else {
                    a.button href=(format!("{path}/enable")) { "Enable" }
                }
                @if subscription.pending > 0 {
                    a.button.danger href=(format!("{path}/cancel")) { "Cancel backlog (" (subscription.pending) ")" }
                }
                a.button href=(format!("{path}/retry")) { "Retry failed" }
            }
        } @else {
            p.hint #viewer-note { "Your token is a viewer: it can look, not act." }
        }
        h2 { "Open issues" }
        @if issues.is_empty() {
            p #no-issues { "None for its current version." }
        } @else {
            div #issues { (issues_table(&project, &issues, now, false)) }
        }
        h2 { "Recent deliveries" }
        @if recent.deliveries.is_empty() {
            p { "None yet." }
        } @else {
            div #recent-deliveries { (deliveries_table(&project, &recent.deliveries, now, false)) }
            p { a href=(format!("{}/deliveries?{}", project.path(), query_string(&[("subscription", &id)]))) { "All its deliveries →" } }
        }
    };
    let mut crumbs = project.crumbs();
    crumbs.push((project.path(), "Subscriptions".to_owned()));
    Ok(layout(
        &format!("Subscription/{id}"),
        Some(&auth),
        &crumbs,
        body,
    ))
}

// ---------------------------------------------------------------------------------------------
// Confirmation pages

/// What a confirmation page asks.
struct Confirmation {
    /// The page title (`Cancel the backlog`).
    title: String,
    /// The question, exact: what, how many, on what.
    question: String,
    /// What follows from it, in a sentence or two.
    consequence: String,
    /// The button's text.
    button: String,
    /// Whether it destroys something an operator may want (a red button).
    danger: bool,
    /// Where the form posts (the same path as the page).
    action: String,
    /// Where "Go back" goes.
    back: String,
    /// Fields the action needs besides the CSRF token.
    hidden: Vec<(&'static str, String)>,
}

fn confirmation_page(auth: &Authenticated, crumbs: &[Crumb], confirm: Confirmation) -> Markup {
    let body = html! {
        div.confirm {
            p.question #question { (confirm.question) }
            p { (confirm.consequence) }
            p.hint { "It is recorded as an AuditEvent in the name of token " code { (auth.principal.name) } "." }
            form.actions method="post" action=(confirm.action) {
                input type="hidden" name="csrf" value=(auth.csrf());
                @for (name, value) in &confirm.hidden {
                    input type="hidden" name=(name) value=(value);
                }
                button #confirm .danger[confirm.danger] type="submit" { (confirm.button) }
                a.button.secondary href=(confirm.back) { "Go back" }
            }
        }
    };
    layout(&confirm.title, Some(auth), crumbs, body)
}

/// Refuses a viewer before showing a confirmation page it could not use (the POST is refused
/// anyway, by `api::may_act`).
fn require_operator(auth: &Authenticated) -> Result<(), Failure> {
    Ok(api::may_act(auth, Some(auth.csrf()))?)
}

async fn confirm_subscription_action(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, id, action)): Path<(String, String, String)>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let action = api::subscription_action_named(&action, id.clone())?;
    require_operator(&auth)?;
    let subscription = find_subscription(&state.pool, &project, &id).await?;
    let target = format!("Subscription/{id}");
    let pending = plural(
        subscription.pending,
        "pending delivery",
        "pending deliveries",
    );
    let (title, question, consequence, button, danger) = match &action {
        Action::Pause(_) => (
            "Pause the subscription",
            format!("Pause {target}?"),
            format!(
                "Its deliveries ({pending} now, and every new one) wait until it is resumed; nothing is lost.{}",
                if subscription.paused { " It is paused already." } else { "" }
            ),
            "Pause".to_owned(),
            false,
        ),
        Action::Resume(_) => (
            "Resume the subscription",
            format!("Resume {target}?"),
            format!("Its {pending} go out again."),
            "Resume".to_owned(),
            false,
        ),
        Action::Disable(_) => (
            "Disable the subscription",
            format!("Disable {target}?"),
            format!(
                "Its status becomes off (a new version of the Subscription): its {pending} are skipped, and no new change is delivered to it until it is enabled."
            ),
            "Disable".to_owned(),
            true,
        ),
        Action::Enable(_) => (
            "Enable the subscription",
            format!("Enable {target}?"),
            "Its status becomes active (a new version of the Subscription), its error and its count of final failures are cleared.".to_owned(),
            "Enable".to_owned(),
            false,
        ),
        Action::Cancel(_) => (
            "Cancel the backlog",
            format!("Cancel the {pending} of {target}?"),
            format!(
                "They are never sent (each can still be replayed). Deliveries in flight ({}) finish.",
                subscription.in_flight
            ),
            format!("Cancel {pending}"),
            true,
        ),
        Action::Retry(_) => {
            let failed = queries::deliveries(
                &state.pool,
                project.id,
                &DeliveryQuery {
                    subscription: Some(id.clone()),
                    state: Some(DeliveryState::Failed),
                    limit: 500,
                    ..DeliveryQuery::default()
                },
            )
            .await?;
            let count = failed.deliveries.len() as i64;
            let counted = if failed.next_cursor.is_some() {
                format!("{count} or more failed deliveries")
            } else {
                plural(count, "failed delivery", "failed deliveries")
            };
            (
                "Retry the failed deliveries",
                format!("Retry the {counted} of {target}?"),
                "They go back to pending with a fresh attempt budget and are sent again with their own webhook-id (deliveries skipped because the endpoint was refused are retried too).".to_owned(),
                "Retry".to_owned(),
                false,
            )
        }
        other => return Err(not_an_action_here(other)),
    };
    let path = project.subscription_path(&id);
    let mut crumbs = project.crumbs();
    crumbs.push((path.clone(), target));
    Ok(confirmation_page(
        &auth,
        &crumbs,
        Confirmation {
            title: title.to_owned(),
            question,
            consequence,
            button,
            danger,
            action: format!("{path}/{}", action.name()),
            back: path,
            hidden: Vec::new(),
        },
    ))
}

/// An action that `api::*_action_named` gave for a path where it has no confirmation page (none
/// does today: those functions name only the actions of their object).
fn not_an_action_here(action: &Action) -> Failure {
    Failure(Refusal::new(
        StatusCode::NOT_FOUND,
        format!("`{}` has no confirmation page here", action.name()),
    ))
}

async fn subscription_action(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, id, action)): Path<(String, String, String)>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form_or_empty(form);
    let project = api::visible_project(&auth, &project)?;
    let action = api::subscription_action_named(&action, id.clone())?;
    api::may_act(&auth, form.csrf.as_deref())?;
    let result = api::perform(&state.pool, &auth, project, &action).await?;
    Ok(after_action(
        &format!("/projects/{project}/subscriptions/{}", segment(&id)),
        &result,
    ))
}

// ---------------------------------------------------------------------------------------------
// Deliveries

async fn deliveries(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path(project): Path<String>,
    Query(params): Query<DeliveryParams>,
    Query(done): Query<Flash>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let now = Utc::now();
    // A filter that cannot be read is said next to the form, which keeps what was typed.
    let (page, problem) = match params.query() {
        Ok(query) => (
            Some(queries::deliveries(&state.pool, project.id, &query).await?),
            None,
        ),
        Err(refusal) => (None, Some(refusal.message)),
    };
    let field = |value: &Option<String>| value.clone().unwrap_or_default();
    let body = html! {
        (project.tabs("deliveries"))
        (flash(&done))
        form.filters #filters method="get" action=(format!("{}/deliveries", project.path())) {
            label { "State"
                select name="state" {
                    option value="" { "any" }
                    @for state in DeliveryState::NAMES {
                        option value=(state) selected[params.state.as_deref() == Some(state)] { (state) }
                    }
                }
            }
            label { "Subscription" input type="text" name="subscription" value=(field(&params.subscription)) placeholder="id"; }
            label { "Resource" input type="text" name="resource" value=(field(&params.resource)) placeholder="Patient/123"; }
            label { "Since" input type="text" name="since" value=(field(&params.since)) placeholder="1h or 2026-12-01T08:00:00Z"; }
            label { "Until" input type="text" name="until" value=(field(&params.until)) placeholder="15m"; }
            button type="submit" { "Filter" }
            a href=(format!("{}/deliveries", project.path())) { "Clear" }
        }
        @if let Some(problem) = problem {
            p.error #filter-error { (problem) }
        }
        @if let Some(page) = page {
            @if page.deliveries.is_empty() {
                p #no-deliveries { "No delivery matches." }
            } @else {
                div #deliveries { (deliveries_table(&project, &page.deliveries, now, true)) }
            }
            @if let Some(cursor) = page.next_cursor {
                p.pager { a #older rel="next" href=(older_link(&project, &params, cursor)) { "Older →" } }
            }
        }
    };
    Ok(layout("Deliveries", Some(&auth), &project.crumbs(), body))
}

/// The next page: the same filters, older than `cursor`.
fn older_link(project: &ProjectContext, params: &DeliveryParams, cursor: i64) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in [
        ("state", &params.state),
        ("subscription", &params.subscription),
        ("resource", &params.resource),
        ("since", &params.since),
        ("until", &params.until),
    ] {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            query.append_pair(name, value);
        }
    }
    if let Some(limit) = params.limit {
        query.append_pair("limit", &limit.to_string());
    }
    query.append_pair("cursor", &cursor.to_string());
    format!("{}/deliveries?{}", project.path(), query.finish())
}

fn deliveries_table(
    project: &ProjectContext,
    deliveries: &[DeliveryItem],
    now: DateTime<Utc>,
    with_subscription: bool,
) -> Markup {
    table(
        html! {
            th.num { "Id" } th { "Changed" }
            @if with_subscription { th { "Subscription" } }
            th { "Resource" } th { "Interaction" } th { "State" } th.num { "Attempts" }
            th.num { "Status" } th { "Reason" }
        },
        html! {
            @for delivery in deliveries {
                tr {
                    td.num { a href=(project.delivery_path(delivery.id)) { (delivery.id) } }
                    td { (time(delivery.changed_at, now)) }
                    @if with_subscription {
                        td { a href=(project.subscription_path(&delivery.subscription_id)) { (delivery.subscription_id) } }
                    }
                    td { (delivery.resource) span.muted { " v" (delivery.version_id) } }
                    td { (delivery.interaction) (notification_badge(delivery)) }
                    td { (state_badge(delivery.state)) }
                    td.num { (delivery.attempts) }
                    td.num { @if let Some(status) = delivery.last_status { (status) } @else { "–" } }
                    td.error-text { (delivery.reason.as_deref().unwrap_or("")) }
                }
            }
        },
    )
}

/// What a topic subscription's delivery carries (`event 3`, `heartbeat`, `handshake`); nothing
/// for Medplum's deliveries of the resource itself.
fn notification_badge(delivery: &DeliveryItem) -> Markup {
    html! {
        @match (delivery.notification, delivery.event_number) {
            (Some(Notification::Event), Some(number)) => { " " span.badge.muted { "event " (number) } },
            (Some(notification), _) => { " " span.badge.muted { (notification.as_str()) } },
            (None, _) => {},
        }
    }
}

fn delivery_id(text: &str) -> Result<i64, Failure> {
    text.parse().map_err(|_| {
        Failure(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("`{text}` is not a delivery id (a number)"),
        ))
    })
}

async fn delivery(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, id)): Path<(String, String)>,
    Query(done): Query<Flash>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let id = delivery_id(&id)?;
    let detail = queries::delivery(&state.pool, project.id, id)
        .await?
        .ok_or(ControlError::UnknownDelivery(id))?;
    let delivery = &detail.delivery;
    let now = Utc::now();
    let path = project.delivery_path(id);
    let (kind, resource_id) = delivery
        .resource
        .split_once('/')
        .unwrap_or((&delivery.resource, ""));
    let finished = matches!(
        delivery.state,
        DeliveryState::Succeeded
            | DeliveryState::Failed
            | DeliveryState::Skipped
            | DeliveryState::Cancelled
    );
    let retryable = matches!(
        delivery.state,
        DeliveryState::Failed | DeliveryState::Skipped | DeliveryState::Cancelled
    );
    let body = html! {
        (flash(&done))
        dl.facts #delivery-facts {
            dt { "State" } dd #state { (state_badge(delivery.state)) @if detail.replay { " " span.badge.muted { "replay" } } }
            dt { "Subscription" } dd { a href=(project.subscription_path(&delivery.subscription_id)) { "Subscription/" (delivery.subscription_id) } }
            dt { "Endpoint" } dd { code { (detail.endpoint.as_deref().unwrap_or("–")) } }
            dt { "Resource" } dd #resource { (delivery.resource) " version " (delivery.version_id) }
            dt { "Interaction" } dd #interaction { (delivery.interaction) (notification_badge(delivery)) }
            dt { "webhook-id" } dd { code #webhook-id { (delivery.webhook_id) } }
            dt { "Attempts" } dd { (delivery.attempts) }
            dt { "Reason" } dd.error-text #reason { (delivery.reason.as_deref().unwrap_or("–")) }
            dt { "Changed" } dd { (time(delivery.changed_at, now)) }
            dt { "Matched" } dd { (time(detail.matched_at, now)) }
            @if delivery.state == DeliveryState::Pending {
                dt { "Next attempt" } dd { (time(delivery.next_attempt_at, now)) " (" (ago(delivery.next_attempt_at, now)) ")" }
            }
            dt { "Finished" } dd { (optional_time(delivery.finished_at, now)) }
            dt { "Request id" } dd { code { (detail.request_id) } }
            dt { "Trace id" } dd { code { (detail.trace_id) } }
        }
        @if auth.principal.may_act() {
            div.actions #actions {
                @if retryable { a.button href=(format!("{path}/retry")) { "Retry" } }
                @if finished { a.button href=(format!("{path}/replay")) { "Replay" } }
                @if delivery.state == DeliveryState::Pending {
                    a.button.danger href=(format!("{path}/cancel")) { "Cancel" }
                }
                @if delivery.interaction != Interaction::Delete.as_str() {
                    a.button href=(resend_path(&project, kind, resource_id, Some(&delivery.subscription_id))) {
                        "Resend " (delivery.resource)
                    }
                }
            }
        }
        // Side by side on a wide screen: what was sent, and what each attempt got back.
        div.split {
            section #sent {
                h2 { "Sent" }
                @if let Some(notification) = delivery.notification {
                    p.hint { "An HTTP POST to the endpoint with these headers (values are not shown: they may be credentials or signatures) and a " code { (notification.as_str()) } " notification bundle: the subscription's status, then the focus per the subscription's payload content." }
                } @else {
                    p.hint { "An HTTP POST to the endpoint with these headers (values are not shown: they may be credentials or signatures) and this body." }
                }
                ul.header-names #header-names {
                    @for name in &detail.header_names { li { code { (name) } } }
                }
                @match (&detail.payload, delivery.notification) {
                    (Some(payload), None) => (json_block("payload", &without_secrets(payload))),
                    (Some(payload), Some(_)) => {
                        p.muted { "Its focus:" }
                        (json_block("payload", &without_secrets(payload)))
                    },
                    (None, Some(notification)) if !notification.has_focus() => {
                        p.muted #payload { "A " (notification.as_str()) " has no focus: the bundle carries the subscription's status alone." }
                    },
                    (None, _) => p.muted #payload { "The delivered version is no longer stored." },
                }
            }
            section #timeline {
                h2 { "Attempts" }
                @if detail.attempts.is_empty() {
                    p #no-attempts { "No attempt yet." }
                } @else {
                    ol.timeline #attempts {
                        @for attempt in &detail.attempts {
                            li.attempt .ok[attempt.succeeded] .bad[!attempt.succeeded] {
                                div.attempt-head {
                                    strong { "Attempt " (attempt.attempt) }
                                    " · " (time(attempt.started_at, now))
                                    " · " (millis(Some(f64::from(attempt.duration_ms))))
                                    " · "
                                    @match attempt.status {
                                        Some(status) => span.status { "HTTP " (status) },
                                        None => span.status { "no answer" },
                                    }
                                    " · "
                                    @if attempt.succeeded { span.badge.ok { "succeeded" } } @else { span.badge.bad { "failed" } }
                                }
                                @if let Some(error) = &attempt.error {
                                    p.error-text { (error) }
                                }
                                @if let Some(body) = attempt.response_body.as_deref().filter(|b| !b.is_empty()) {
                                    p.muted { "Answered:" }
                                    pre.response { (body) }
                                }
                                @if let Some(event) = &attempt.audit_event {
                                    details {
                                        summary { "AuditEvent/" (attempt.audit_event_id.as_deref().unwrap_or("")) }
                                        (json_block(&format!("audit-event-{}", attempt.id), event))
                                    }
                                } @else if let Some(event_id) = &attempt.audit_event_id {
                                    p.muted { "AuditEvent/" (event_id) " (no longer stored)" }
                                }
                            }
                        }
                    }
                    @if detail.attempts.len() as i64 >= queries::ATTEMPTS_SHOWN {
                        p.hint { "The latest " (queries::ATTEMPTS_SHOWN) " attempts." }
                    }
                }
            }
        }
    };
    let mut crumbs = project.crumbs();
    crumbs.push((
        format!("{}/deliveries", project.path()),
        "Deliveries".to_owned(),
    ));
    Ok(layout(
        &format!("Delivery {id}"),
        Some(&auth),
        &crumbs,
        body,
    ))
}

fn resend_path(
    project: &ProjectContext,
    resource_type: &str,
    id: &str,
    subscription: Option<&str>,
) -> String {
    let path = format!(
        "{}/resources/{}/{}/resend",
        project.path(),
        segment(resource_type),
        segment(id)
    );
    match subscription {
        Some(subscription) => format!("{path}?{}", query_string(&[("subscription", subscription)])),
        None => path,
    }
}

async fn confirm_delivery_action(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, id, action)): Path<(String, String, String)>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let id = delivery_id(&id)?;
    let action = api::delivery_action_named(&action, id)?;
    require_operator(&auth)?;
    let detail = queries::delivery(&state.pool, project.id, id)
        .await?
        .ok_or(ControlError::UnknownDelivery(id))?;
    let delivery = &detail.delivery;
    let what = format!(
        "{} version {} to Subscription/{}",
        delivery.resource, delivery.version_id, delivery.subscription_id
    );
    let state_now = delivery.state.as_str();
    let (title, question, consequence, button, danger) = match &action {
        Action::Retry(_) => (
            "Retry the delivery",
            format!("Retry {state_now} delivery {id} ({what})?"),
            format!(
                "It goes back to pending with a fresh attempt budget, and is sent with its webhook-id {}.",
                delivery.webhook_id
            ),
            "Retry",
            false,
        ),
        Action::Replay(_) => (
            "Replay the delivery",
            format!("Replay {state_now} delivery {id} ({what})?"),
            format!(
                "Version {} is sent again with the same webhook-id {}, as a new attempt, whatever became of the resource since.",
                delivery.version_id, delivery.webhook_id
            ),
            "Replay",
            false,
        ),
        Action::Cancel(_) => (
            "Cancel the delivery",
            format!("Cancel {state_now} delivery {id} ({what})?"),
            "It is never sent (it can still be replayed later).".to_owned(),
            "Cancel the delivery",
            true,
        ),
        other => return Err(not_an_action_here(other)),
    };
    let path = project.delivery_path(id);
    let mut crumbs = project.crumbs();
    crumbs.push((path.clone(), format!("Delivery {id}")));
    Ok(confirmation_page(
        &auth,
        &crumbs,
        Confirmation {
            title: title.to_owned(),
            question,
            consequence,
            button: button.to_owned(),
            danger,
            action: format!("{path}/{}", action.name()),
            back: path,
            hidden: Vec::new(),
        },
    ))
}

async fn delivery_action(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, id, action)): Path<(String, String, String)>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form_or_empty(form);
    let project = api::visible_project(&auth, &project)?;
    let id = delivery_id(&id)?;
    let action = api::delivery_action_named(&action, id)?;
    api::may_act(&auth, form.csrf.as_deref())?;
    let result = api::perform(&state.pool, &auth, project, &action).await?;
    Ok(after_action(
        &format!("/projects/{project}/deliveries/{id}"),
        &result,
    ))
}

#[derive(Deserialize)]
struct ResendTarget {
    subscription: Option<String>,
}

async fn confirm_resend(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, resource_type, id)): Path<(String, String, String)>,
    Query(target): Query<ResendTarget>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    require_operator(&auth)?;
    let subscription = target.subscription.filter(|s| !s.is_empty());
    let reference = format!("{resource_type}/{id}");
    let to = match &subscription {
        Some(subscription) => format!("Subscription/{subscription}"),
        None => "every subscription it matches".to_owned(),
    };
    let path = resend_path(&project, &resource_type, &id, None);
    Ok(confirmation_page(
        &auth,
        &project.crumbs(),
        Confirmation {
            title: "Resend the resource".to_owned(),
            question: format!("Resend the current version of {reference} to {to}?"),
            consequence: "It is sent again as an update: a new change with a new webhook-id, delivered like any other.".to_owned(),
            button: "Resend".to_owned(),
            danger: false,
            action: path,
            back: format!(
                "{}/deliveries?resource={}",
                project.path(),
                url::form_urlencoded::byte_serialize(reference.as_bytes()).collect::<String>()
            ),
            hidden: subscription
                .map(|s| vec![("subscription", s)])
                .unwrap_or_default(),
        },
    ))
}

async fn resend(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path((project, resource_type, id)): Path<(String, String, String)>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form_or_empty(form);
    let project = api::visible_project(&auth, &project)?;
    api::may_act(&auth, form.csrf.as_deref())?;
    let reference = format!("{resource_type}/{id}");
    let action = Action::Resend {
        resource_type,
        id,
        subscription: form.subscription.filter(|s| !s.is_empty()),
        interaction: Interaction::Update,
    };
    let result = api::perform(&state.pool, &auth, project, &action).await?;
    let back = format!(
        "/projects/{project}/deliveries?resource={}",
        url::form_urlencoded::byte_serialize(reference.as_bytes()).collect::<String>()
    );
    Ok(after_action(&back, &result))
}

// ---------------------------------------------------------------------------------------------
// Issues and endpoints

#[derive(Deserialize)]
struct IssueFilter {
    subscription: Option<String>,
}

async fn issues(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path(project): Path<String>,
    Query(filter): Query<IssueFilter>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let subscription = filter.subscription.filter(|s| !s.is_empty());
    let issues = queries::issues(&state.pool, project.id, subscription.as_deref()).await?;
    let now = Utc::now();
    let body = html! {
        (project.tabs("issues"))
        @if let Some(subscription) = &subscription {
            p { "Of " a href=(project.subscription_path(subscription)) { "Subscription/" (subscription) } " only · "
                a href=(format!("{}/issues", project.path())) { "all" } }
        }
        @if issues.is_empty() {
            p #no-issues { "No open issue: every subscription's current version evaluates and its endpoint is allowed." }
        } @else {
            div #issues { (issues_table(&project, &issues, now, true)) }
        }
    };
    Ok(layout("Issues", Some(&auth), &project.crumbs(), body))
}

fn issues_table(
    project: &ProjectContext,
    issues: &[queries::Issue],
    now: DateTime<Utc>,
    with_subscription: bool,
) -> Markup {
    table(
        html! {
            @if with_subscription { th { "Subscription" } }
            th.num { "Version" } th { "Kind" } th { "Message" } th.num { "Seen" } th { "First" } th { "Last" }
        },
        html! {
            @for issue in issues {
                tr {
                    @if with_subscription {
                        td { a href=(project.subscription_path(&issue.subscription_id)) { (issue.subscription_id) } }
                    }
                    td.num { (issue.subscription_version) }
                    td { span.badge.warn { (issue.kind) } }
                    td.error-text.issue-message { (issue.message) }
                    td.num { (issue.occurrences) }
                    td { (time(issue.first_seen, now)) }
                    td { (time(issue.last_seen, now)) }
                }
            }
        },
    )
}

async fn endpoints(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path(project): Path<String>,
    Query(done): Query<Flash>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    let endpoints = queries::endpoints(&state.pool, project.id).await?;
    let now = Utc::now();
    let may_act = auth.principal.may_act();
    let body = html! {
        (project.tabs("endpoints"))
        (flash(&done))
        p.hint { "An endpoint is a scheme, host and port. After repeated failures its circuit opens: its deliveries wait, and one probe goes per cool-down. An endpoint that answers fast is allowed more deliveries in flight than the configured base (\"allowed N\"), until its first slow or failed answer." }
        @if endpoints.is_empty() {
            p { "No endpoint yet." }
        } @else {
            div #endpoints {
                (table(
                    html! {
                        th { "Endpoint" } th { "Circuit" } th.num { "Failures" } th { "Last failure" }
                        th.num { "Pending" } th.num { "In flight" } th { "Last hour" } th { "Last 24 h" }
                        @if may_act { th {} }
                    },
                    html! {
                        @for summary in &endpoints {
                            @let endpoint = &summary.health;
                            tr {
                                td { code { (endpoint.endpoint) } }
                                td {
                                    (circuit_badge(Some(&endpoint.state)))
                                    @if let Some(opened) = endpoint.opened_at {
                                        br; span.muted { "opened " (ago(opened, now)) }
                                    }
                                    @if let Some(probe) = endpoint.next_probe_at {
                                        br; span.muted { "probe " (ago(probe, now)) }
                                    }
                                }
                                td.num {
                                    (endpoint.consecutive_failures)
                                    @if endpoint.openings > 0 {
                                        br; span.muted { (plural(i64::from(endpoint.openings), "opening", "openings")) }
                                    }
                                }
                                td.error-text {
                                    (endpoint.last_failure.as_deref().unwrap_or("–"))
                                    @if let Some(at) = endpoint.last_failure_at { br; span.muted { (ago(at, now)) } }
                                }
                                td.num { (endpoint.pending) }
                                td.num {
                                    (endpoint.in_flight)
                                    @if let Some(allowance) = endpoint.allowance {
                                        br; span.muted.allowance { "allowed " (allowance) }
                                    }
                                }
                                td { (figures_cell(&summary.last_hour)) }
                                td { (figures_cell(&summary.last_day)) }
                                @if may_act {
                                    td {
                                        @if endpoint.state != "closed" || endpoint.consecutive_failures > 0 {
                                            a.button href=(reset_path(&project, &endpoint.endpoint)) { "Reset" }
                                        }
                                    }
                                }
                            }
                        }
                    },
                ))
            }
        }
    };
    Ok(layout("Endpoints", Some(&auth), &project.crumbs(), body))
}

fn reset_path(project: &ProjectContext, endpoint: &str) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("endpoint", endpoint)
        .finish();
    format!("{}/endpoints/reset?{query}", project.path())
}

#[derive(Deserialize)]
struct EndpointTarget {
    endpoint: Option<String>,
}

async fn confirm_reset(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path(project): Path<String>,
    Query(target): Query<EndpointTarget>,
) -> Page {
    let project = ProjectContext::load(&state.pool, &auth, &project).await?;
    require_operator(&auth)?;
    let Some(endpoint) = target.endpoint.filter(|e| !e.is_empty()) else {
        return Err(Failure(Refusal::new(
            StatusCode::BAD_REQUEST,
            "which endpoint? (the endpoints page links to this page with it)",
        )));
    };
    // Shown as the endpoints page lists it (an origin), never as typed: it may hold credentials.
    let shown = queries::redact_endpoint(&endpoint);
    Ok(confirmation_page(
        &auth,
        &project.crumbs(),
        Confirmation {
            title: "Reset the endpoint's circuit".to_owned(),
            question: format!("Close the circuit of {shown} now?"),
            consequence: "Its deliveries are claimed again at once, without waiting for the probe; if it still fails, the circuit opens again.".to_owned(),
            button: "Close the circuit".to_owned(),
            danger: false,
            action: format!("{}/endpoints/reset", project.path()),
            back: format!("{}/endpoints", project.path()),
            hidden: vec![("endpoint", endpoint)],
        },
    ))
}

async fn reset(
    State(state): State<ConsoleState>,
    Session(auth): Session,
    Path(project): Path<String>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form_or_empty(form);
    let project = api::visible_project(&auth, &project)?;
    api::may_act(&auth, form.csrf.as_deref())?;
    let Some(endpoint) = form.endpoint.filter(|e| !e.is_empty()) else {
        return Err(Failure(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the form names no endpoint",
        )));
    };
    let result = api::perform(
        &state.pool,
        &auth,
        project,
        &Action::ResetEndpoint(endpoint),
    )
    .await?;
    Ok(after_action(
        &format!("/projects/{project}/endpoints"),
        &result,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_delivered_subscription_is_shown_without_its_secrets() {
        let subscription = json!({
            "resourceType": "Subscription",
            "channel": {
                "type": "rest-hook",
                "endpoint": "https://user:pw@hooks.example.com/in?token=t0ken",
                "header": ["Authorization: Bearer s3cret", "X-Plain"]
            },
            "extension": [
                { "url": extension::SECRET, "valueString": "hmac-s3cret" },
                { "url": extension::MAX_ATTEMPTS, "valueInteger": 3 }
            ]
        });
        let shown = without_secrets(&subscription).to_string();
        for secret in ["s3cret", "hmac-s3cret", "pw@", "t0ken"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("Authorization: ***"));
        assert!(shown.contains("https://***@hooks.example.com/in?…"));
        assert!(shown.contains(r#""valueInteger":3"#));
        let patient = json!({ "resourceType": "Patient", "channel": { "header": ["a: b"] } });
        assert_eq!(without_secrets(&patient), patient);
    }

    #[test]
    fn times_are_said_the_way_people_say_them() {
        let now = Utc::now();
        assert_eq!(ago(now, now), "just now");
        assert_eq!(ago(now - Duration::seconds(42), now), "42 s ago");
        assert_eq!(ago(now - Duration::minutes(5), now), "5 min ago");
        assert_eq!(ago(now - Duration::minutes(150), now), "3 h ago");
        assert_eq!(ago(now - Duration::days(3), now), "3 d ago");
        assert_eq!(ago(now + Duration::minutes(5), now), "in 5 min");
        assert_eq!(millis(Some(12.4)), "12 ms");
        assert_eq!(millis(Some(1_250.0)), "1.2 s");
        assert_eq!(percent(Some(0.985)), "98.5 %");
        assert_eq!(percent(None), "–");
    }
}
