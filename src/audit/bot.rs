//! The `execute` AuditEvent of a bot run (Medplum's `createBotAuditEvent`), its trigger and
//! destination rules, and the truncation of its output.

use super::{Outcome, display, entity_role, reference, tracing_extension};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// When a Bot records an AuditEvent (`Bot.auditEventTrigger`, default `always`).
pub fn triggered(bot: &Value, outcome: Outcome, output: &str) -> bool {
    match bot
        .get("auditEventTrigger")
        .and_then(Value::as_str)
        .unwrap_or("always")
    {
        "never" => false,
        "on-error" => outcome != Outcome::Success,
        "on-output" => !output.is_empty(),
        _ => true,
    }
}

/// Where (`Bot.auditEventDestination`, default `resource`): (resource, log).
pub fn destinations(bot: &Value) -> (bool, bool) {
    match bot.get("auditEventDestination").and_then(Value::as_array) {
        Some(codes) if !codes.is_empty() => (
            codes.iter().any(|c| c == "resource"),
            codes.iter().any(|c| c == "log"),
        ),
        _ => (true, false),
    }
}

/// The last `limit` bytes of `text` (on a character boundary): a bot's output ends with what matters.
pub fn tail(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// One bot run.
pub struct BotRun<'a> {
    /// The Bot.
    pub bot: &'a Value,
    /// The input resource (the changed resource).
    pub input: &'a Value,
    /// The Subscription, when run for one.
    pub subscription: Option<&'a Value>,
    /// Reference of the resource's author (`meta.author`), the requester.
    pub requester: Option<&'a Value>,
    /// When the run started.
    pub started: DateTime<Utc>,
    /// When it ended.
    pub ended: DateTime<Utc>,
    /// Success or failure.
    pub outcome: Outcome,
    /// The output or error text (already truncated by the caller).
    pub outcome_desc: &'a str,
    /// Of the write.
    pub request_id: &'a str,
    /// Of the write.
    pub trace_id: &'a str,
    /// Strip displays from references.
    pub redact: bool,
}

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn entity(resource: &Value, redact: bool) -> Option<Value> {
    let resource_type = resource.get("resourceType")?.as_str()?;
    let id = resource.get("id")?.as_str()?;
    Some(json!({
        "what": reference(resource_type, id, display(resource), redact),
        "role": entity_role(resource_type)
    }))
}

/// The `execute` AuditEvent: agents are the requester and the Bot it ran as; entities the Bot, the
/// input and the Subscription.
pub fn execute_event(run: &BotRun<'_>) -> Value {
    let bot_ref = entity(run.bot, run.redact)
        .map(|e| e["what"].clone())
        .unwrap_or(Value::Null);
    let mut requester = run.requester.cloned().unwrap_or(Value::Null);
    if run.redact {
        if let Some(object) = requester.as_object_mut() {
            object.remove("display");
        }
    }
    let mut meta = Map::new();
    for key in ["account", "accounts"] {
        if let Some(value) = run.bot.pointer(&format!("/meta/{key}")) {
            meta.insert(key.into(), value.clone());
        }
    }
    let entities: Vec<Value> = [Some(run.bot), Some(run.input), run.subscription]
        .into_iter()
        .flatten()
        .filter_map(|resource| entity(resource, run.redact))
        .collect();
    let mut event = json!({
        "resourceType": "AuditEvent",
        "period": { "start": instant(run.started), "end": instant(run.ended) },
        "recorded": instant(run.ended),
        "type": { "system": "https://medplum.com/CodeSystem/audit-event", "code": "execute" },
        "agent": [
            { "who": requester, "requestor": true },
            { "who": bot_ref.clone(), "requestor": false }
        ],
        "source": { "observer": bot_ref },
        "entity": entities,
        "outcome": run.outcome.code(),
        "outcomeDesc": run.outcome_desc,
        "extension": [tracing_extension(run.request_id, run.trace_id)]
    });
    if !meta.is_empty() {
        event["meta"] = Value::Object(meta);
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_destinations_and_tail() {
        let bot = |trigger: &str| json!({ "auditEventTrigger": trigger });
        assert!(triggered(&json!({}), Outcome::Success, ""));
        assert!(!triggered(&bot("never"), Outcome::MinorFailure, "x"));
        assert!(!triggered(&bot("on-error"), Outcome::Success, "x"));
        assert!(triggered(&bot("on-error"), Outcome::MinorFailure, ""));
        assert!(!triggered(&bot("on-output"), Outcome::Success, ""));
        assert!(triggered(&bot("on-output"), Outcome::Success, "out"));
        assert_eq!(destinations(&json!({})), (true, false));
        assert_eq!(
            destinations(&json!({ "auditEventDestination": ["log"] })),
            (false, true)
        );
        assert_eq!(
            destinations(&json!({ "auditEventDestination": ["resource", "log"] })),
            (true, true)
        );
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("aé", 1), "");
    }
}
