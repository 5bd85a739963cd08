//! The operator commands that share the console's reads and actions: `deliveries show`,
//! `subscriptions list|show`, `token create|list|revoke`, `console`, and the output of actions.

use super::table::Table;
use anyhow::{Context, Result};
use chrono::Utc;
use clap::Subcommand;
use fhir_outbox::operations::actions::{self, Action, Actor};
use fhir_outbox::operations::console::queries::{self, Figures, Scope};
use fhir_outbox::operations::console::{self, tokens};
use sqlx::PgPool;
use uuid::Uuid;

/// `fhir-outbox deliveries show`.
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// One delivery: what was sent (payload, header names, `webhook-id`), each attempt with the
    /// receiver's answer, and its AuditEvents.
    Show {
        /// The delivery's id.
        id: i64,
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// Print JSON (with each attempt's AuditEvent).
        #[arg(long)]
        json: bool,
    },
}

/// `fhir-outbox subscriptions`.
#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// Every subscription (of one project, or of all), with its state and figures.
    List {
        /// Only this project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Option<Uuid>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One subscription, with its open issues.
    Show {
        /// The subscription's id.
        id: String,
        /// The project.
        #[arg(long, env = "FHIR_OUTBOX_PROJECT")]
        project: Uuid,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `fhir-outbox token`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown once; only its hash is stored).
    Create {
        /// A name that says whose it is (shown in AuditEvents of its actions).
        #[arg(long)]
        name: String,
        /// `viewer` (sees) or `operator` (sees and acts).
        #[arg(long, value_parser = ["viewer", "operator"])]
        role: String,
        /// Only this project (default: every project).
        #[arg(long)]
        project: Option<Uuid>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every token (never their secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: its next request is refused.
    Revoke {
        /// The token's id (from `token list`).
        id: Uuid,
    },
}

/// Performs an operator action from the command line and prints what it did.
pub async fn act(pool: &PgPool, project: Uuid, action: Action) -> Result<()> {
    let result = actions::act(pool, project, &Actor::command_line(), &action).await?;
    let mut summary = result.summary;
    if let Some(first) = summary.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    println!("{summary}.");
    Ok(())
}

fn rate(figures: &Figures) -> String {
    match figures.success_rate {
        Some(rate) => format!(
            "{:.1} % of {}{}",
            rate * 100.0,
            figures.attempts,
            if figures.sampled { " (latest)" } else { "" }
        ),
        None => "-".to_owned(),
    }
}

fn millis(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"))
}

/// `subscriptions list|show`.
pub async fn subscriptions(pool: &PgPool, command: SubscriptionsCommand) -> Result<()> {
    let (projects, only, json) = match &command {
        SubscriptionsCommand::List { project, json } => {
            let scope = project.map_or(Scope::All, Scope::Project);
            let projects: Vec<Uuid> = queries::projects(pool, scope)
                .await?
                .into_iter()
                .map(|project| project.id)
                .collect();
            if let Some(project) = project
                && projects.is_empty()
            {
                anyhow::bail!("project {project} does not exist (`fhir-outbox project list`)");
            }
            (projects, None, *json)
        }
        SubscriptionsCommand::Show { id, project, json } => {
            (vec![*project], Some(id.as_str()), *json)
        }
    };
    let mut rows = Vec::new();
    for project in projects {
        rows.extend(queries::subscriptions(pool, project, only).await?);
    }
    if let (SubscriptionsCommand::Show { id, project, .. }, true) = (&command, rows.is_empty()) {
        anyhow::bail!("Subscription/{id} not found in project {project}");
    }
    if let Some(only) = only {
        let issues = queries::issues(pool, rows[0].project_id, Some(only)).await?;
        if json {
            let mut value = serde_json::to_value(&rows[0])?;
            value["open_issues"] = serde_json::to_value(&issues)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            return Ok(());
        }
        let s = &rows[0];
        println!(
            "Subscription/{} (version {}) in project {}",
            s.id, s.version_id, s.project_id
        );
        println!("  reason:    {}", s.reason.as_deref().unwrap_or("-"));
        println!("  status:    {}", state_words(s));
        println!("  endpoint:  {}", s.endpoint.as_deref().unwrap_or("-"));
        println!("  criteria:  {}", s.criteria.as_deref().unwrap_or("-"));
        println!(
            "  circuit:   {}",
            s.circuit
                .as_deref()
                .unwrap_or("closed (no failure recorded)")
        );
        println!(
            "  backlog:   {} pending, {} in flight",
            s.pending, s.in_flight
        );
        for (window, figures) in [("last hour", &s.last_hour), ("last 24 h", &s.last_day)] {
            println!(
                "  {window}: {} succeeded, p50 {}, p99 {}",
                rate(figures),
                millis(figures.p50_ms),
                millis(figures.p99_ms)
            );
        }
        if issues.is_empty() {
            println!("  issues:    none");
        } else {
            println!("  issues:");
            for issue in issues {
                println!(
                    "    {} ({}×): {}",
                    issue.kind, issue.occurrences, issue.message
                );
            }
        }
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table = Table::new([
        "project",
        "subscription",
        "status",
        "endpoint",
        "circuit",
        "pending",
        "success 1 h",
        "p50/p99 1 h",
        "success 24 h",
        "issues",
    ]);
    for s in &rows {
        table.row([
            s.project_id.to_string(),
            s.id.clone(),
            state_words(s),
            s.endpoint.clone().unwrap_or_default(),
            s.circuit.clone().unwrap_or_else(|| "-".to_owned()),
            s.pending.to_string(),
            rate(&s.last_hour),
            format!(
                "{}/{}",
                millis(s.last_hour.p50_ms),
                millis(s.last_hour.p99_ms)
            ),
            rate(&s.last_day),
            s.issues.to_string(),
        ]);
    }
    println!("{table}");
    Ok(())
}

fn state_words(s: &queries::SubscriptionSummary) -> String {
    let mut words = s.status.clone().unwrap_or_else(|| "?".to_owned());
    if s.auto_disabled {
        words.push_str(" (disabled automatically: ");
        words.push_str(s.error.as_deref().unwrap_or_default());
        words.push(')');
    }
    if s.paused {
        words.push_str(" (paused)");
    }
    words
}

/// `deliveries show`.
pub async fn show_delivery(pool: &PgPool, command: DeliveriesCommand) -> Result<()> {
    let DeliveriesCommand::Show { id, project, json } = command;
    let Some(detail) = queries::delivery(pool, project, id).await? else {
        anyhow::bail!("delivery {id} not found in project {project}");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok(());
    }
    let d = &detail.delivery;
    println!(
        "Delivery {} to Subscription/{}: {} version {} ({})",
        d.id, d.subscription_id, d.resource, d.version_id, d.interaction
    );
    println!(
        "  state:       {}{}",
        d.state,
        if detail.replay { " (replay)" } else { "" }
    );
    if let Some(carries) = d.carries() {
        println!("  carries:     {carries}");
    }
    if let Some(reason) = &d.reason {
        println!("  reason:      {reason}");
    }
    println!("  webhook-id:  {}", d.webhook_id);
    println!(
        "  endpoint:    {}",
        detail.endpoint.as_deref().unwrap_or("-")
    );
    println!("  changed at:  {}", d.changed_at.to_rfc3339());
    println!(
        "  request id:  {}   trace id: {}",
        detail.request_id, detail.trace_id
    );
    println!(
        "  headers:     {} (values not shown)",
        detail.header_names.join(", ")
    );
    let payload_label = if d.notification.is_some() {
        "focus"
    } else {
        "payload"
    };
    match (&detail.payload, d.notification) {
        (Some(payload), _) => println!(
            "  {payload_label}:\n{}",
            indent(&serde_json::to_string_pretty(payload)?)
        ),
        (None, Some(notification)) if !notification.has_focus() => {
            println!("  focus:       none (the bundle carries the subscription's status alone)")
        }
        (None, _) => println!(
            "  {:<13}(the version is no longer stored)",
            format!("{payload_label}:")
        ),
    }
    if detail.attempts.is_empty() {
        println!("  attempts:    none yet");
        return Ok(());
    }
    let mut table = Table::new([
        "attempt",
        "started",
        "duration",
        "status",
        "error",
        "response (start)",
        "AuditEvent",
    ]);
    for a in &detail.attempts {
        table.row([
            a.attempt.to_string(),
            a.started_at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
            format!("{} ms", a.duration_ms),
            a.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            a.error.clone().unwrap_or_default(),
            a.response_body
                .as_deref()
                .map(|body| body.chars().take(60).collect::<String>())
                .unwrap_or_default(),
            a.audit_event_id.clone().unwrap_or_default(),
        ]);
    }
    println!("{table}");
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `token create|list|revoke`.
pub async fn token(pool: &PgPool, command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            name,
            role,
            project,
            json,
        } => {
            let role: tokens::Role = role.parse().map_err(anyhow::Error::msg)?;
            let (info, secret) = tokens::create(pool, &name, role, project).await?;
            if json {
                let mut value = serde_json::to_value(&info)?;
                value["secret"] = serde_json::Value::String(secret);
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "Token `{}` ({}, {}), id {}:\n\n    {secret}\n\n\
                     This secret is shown once. Sign in to the console with it, or send it as \
                     `Authorization: Bearer …` to /api/v1.",
                    info.name,
                    role.as_str(),
                    project.map_or_else(|| "every project".to_owned(), |p| format!("project {p}")),
                    info.id
                );
            }
        }
        TokenCommand::List { json } => {
            let list = tokens::list(pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let mut table = Table::new([
                "id",
                "name",
                "role",
                "project",
                "created",
                "last used",
                "revoked",
            ]);
            let at = |at: Option<chrono::DateTime<Utc>>| {
                at.map_or_else(
                    || "-".to_owned(),
                    |at| at.format("%Y-%m-%d %H:%M").to_string(),
                )
            };
            for t in &list {
                table.row([
                    t.id.to_string(),
                    t.name.clone(),
                    t.role.as_str().to_owned(),
                    t.project_id
                        .map_or_else(|| "all".to_owned(), |p| p.to_string()),
                    at(Some(t.created_at)),
                    at(t.last_used_at),
                    at(t.revoked_at),
                ]);
            }
            println!("{table}");
        }
        TokenCommand::Revoke { id } => {
            if tokens::revoke(pool, id).await? {
                println!("Token {id} revoked: its next request is refused.");
            } else {
                println!("Token {id} was revoked already.");
            }
        }
    }
    Ok(())
}

/// `fhir-outbox console`: the console alone, until Ctrl-C or SIGTERM.
pub async fn serve_console(
    pool: PgPool,
    address: std::net::SocketAddr,
    fhir_base_url: String,
) -> Result<()> {
    let signal = crate::shutdown_signal();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (bound, server) = console::serve(pool.clone(), address, fhir_base_url, shutdown.clone())
        .await
        .with_context(
            || "choose another address with --console-addr (`127.0.0.1:0` takes any free port)",
        )?;
    println!("Console on http://{bound}/ (API under /api/v1). Ctrl-C stops it.");
    signal.await;
    shutdown.cancel();
    server.await.ok();
    pool.close().await;
    Ok(())
}
