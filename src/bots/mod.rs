//! Bots: Rust handlers that an application embedding fhir-outbox registers, run for subscriptions
//! whose endpoint is `Bot/<id>` (by the delivery worker) and for pre-commit subscriptions (inside the
//! write, see [`precommit`]).
//!
//! The Bot resource (Medplum's `Bot` type, stored like any resource) names its handler with the
//! extension [`HANDLER_EXTENSION`]; it also carries Medplum's `auditEventTrigger` and
//! `auditEventDestination`.

pub mod precommit;

use crate::capture::Interaction;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// `valueString`: the name under which the handler of this Bot is registered.
pub const HANDLER_EXTENSION: &str = "https://fhir-outbox.dev/StructureDefinition/bot-handler";

/// What a handler is given.
#[derive(Debug, Clone)]
pub struct BotInput {
    /// The Bot resource.
    pub bot: Value,
    /// The Subscription's id.
    pub subscription_id: String,
    /// The change's interaction.
    pub interaction: Interaction,
    /// The resource, or `{"deletedResource": …}` for a delete (as Medplum passes it).
    pub input: Value,
    /// The headers a rest-hook request would carry (signatures over `input`'s JSON included).
    pub headers: Vec<(String, String)>,
}

/// What a handler returns.
#[derive(Debug, Clone, Default)]
pub struct BotOutput {
    /// Text for the AuditEvent's `outcomeDesc` (its last 10 KiB are kept by default).
    pub log: String,
    /// For a pre-commit handler: a resource of the same type (and id) that replaces the one being
    /// written. Ignored for asynchronous deliveries.
    pub replacement: Option<Value>,
}

/// A handler's failure: its message (and, for pre-commit, the OperationOutcome the write is rejected
/// with).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BotFailure {
    /// Why it failed.
    pub message: String,
}

impl BotFailure {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        BotFailure {
            message: message.into(),
        }
    }
}

/// The future a handler returns.
pub type BotFuture = Pin<Box<dyn Future<Output = Result<BotOutput, BotFailure>> + Send>>;
type Handler = Arc<dyn Fn(BotInput) -> BotFuture + Send + Sync>;

/// The handlers an application registered, by name.
#[derive(Clone, Default)]
pub struct BotRegistry {
    handlers: HashMap<String, Handler>,
}

impl std::fmt::Debug for BotRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl BotRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name` (the value of the Bot's [`HANDLER_EXTENSION`]).
    pub fn register<F, Fut>(&mut self, name: &str, handler: F) -> &mut Self
    where
        F: Fn(BotInput) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<BotOutput, BotFailure>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |input| Box::pin(handler(input)));
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Runs the handler the Bot names. A Bot that names none, or one not registered, is a failure
    /// with a clear message (never a crash).
    pub async fn run(&self, input: BotInput) -> Result<BotOutput, BotFailure> {
        let name = handler_name(&input.bot).ok_or_else(|| {
            BotFailure::new(format!(
                "Bot/{} names no handler (extension {HANDLER_EXTENSION})",
                bot_id(&input.bot)
            ))
        })?;
        let handler = self.handlers.get(name).ok_or_else(|| {
            BotFailure::new(format!(
                "no handler is registered as `{name}` for Bot/{}",
                bot_id(&input.bot)
            ))
        })?;
        handler(input).await
    }
}

fn bot_id(bot: &Value) -> &str {
    bot.get("id").and_then(Value::as_str).unwrap_or_default()
}

/// The handler name a Bot resource gives.
pub fn handler_name(bot: &Value) -> Option<&str> {
    crate::subscription::extension_value(bot, HANDLER_EXTENSION, "valueString")
        .and_then(Value::as_str)
}
