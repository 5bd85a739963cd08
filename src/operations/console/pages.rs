//! The console's HTML pages, rendered on the server (maud escapes every value). Forms post back to
//! the same handlers the API uses (`api::perform`), each with the session's CSRF token; every
//! action goes through a confirmation page first.

use super::api;
use super::queries::{self};
use super::{Authenticated, ConsoleState, Refusal, SESSION_COOKIE, tokens};
use axum::Router;
use axum::extract::{Form, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

/// The pages' routes.
pub(super) fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
}

const STYLE: &str = include_str!("console.css");

/// The frame of every page: header with navigation, the token's identity, the body.
fn layout(title: &str, auth: Option<&Authenticated>, body: Markup) -> Markup {
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
                            (auth.principal.name) " · " (auth.principal.role.as_str())
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(auth.csrf());
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// A refusal as a page; 401 sends the browser to the login page.
impl Refusal {
    fn page(self) -> Response {
        if self.needs_login {
            return Redirect::to("/login").into_response();
        }
        let body = html! { p.error { (self.message) } };
        (self.status, layout("Error", None, body)).into_response()
    }
}

async fn login_form() -> Markup {
    login_page(None)
}

fn login_page(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            @if let Some(error) = error { p.error { (error) } }
            form method="post" action="/login" {
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

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(auth: Result<Authenticated, Refusal>, Form(form): Form<CsrfForm>) -> Response {
    if let Ok(auth) = &auth {
        if let Err(refusal) = auth.check_csrf(form.csrf.as_deref()) {
            return refusal.page();
        }
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

async fn overview(
    State(state): State<ConsoleState>,
    auth: Result<Authenticated, Refusal>,
) -> Response {
    let auth = match auth {
        Ok(auth) => auth,
        Err(refusal) => return refusal.page(),
    };
    let scope = api::token_scope(&auth);
    let overview = match queries::overview(&state.pool, scope).await {
        Ok(overview) => overview,
        Err(error) => return Refusal::internal(error).page(),
    };
    layout(
        "Overview",
        Some(&auth),
        html! {
            dl.figures {
                dt { "Pending" } dd #pending { (overview.pending) }
                dt { "In flight" } dd #in-flight { (overview.in_flight) }
                dt { "Open circuits" } dd #open-circuits { (overview.open_circuits) }
            }
        },
    )
    .into_response()
}
