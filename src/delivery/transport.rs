//! Performs a prepared request: the signed HTTP POST, or the run of a `Bot/` endpoint's handler.
//! Returns what happened, and decides nothing: whether that is a success, and what follows, is
//! [`super::outcome`]'s.

use super::preamble::Request;
use super::queries::ClaimedDelivery;
use crate::bots::{BotInput, BotRegistry};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Makes requests.
pub(super) struct Transport {
    /// The HTTP client (public-only DNS unless unsafe outbound is allowed).
    pub client: reqwest::Client,
    /// Time allowed for a bot run (the client has its own).
    pub request_timeout: Duration,
    /// Bytes of the response body kept.
    pub response_body_limit: usize,
    /// The bot handlers.
    pub bots: BotRegistry,
}

/// One attempt, as it happened.
#[derive(Debug, Clone)]
pub(super) struct Performed {
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: i32,
    /// What came of it.
    pub happened: Happened,
}

/// What came of an attempt.
#[derive(Debug, Clone)]
pub(super) enum Happened {
    /// The endpoint answered.
    Response(Response),
    /// No answer: refused URL, connection refused, TLS, timeout… (the error and its causes).
    Error(String),
    /// A bot handler ran.
    Bot {
        /// The Bot (a stand-in with its id when it does not exist).
        bot: Value,
        /// The handler's input.
        input: Value,
        /// Its log, or its error.
        result: Result<String, String>,
    },
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub(super) struct Response {
    /// Its status.
    pub status: u16,
    /// Its `Retry-After` header.
    pub retry_after: Option<String>,
    /// The start of its body.
    pub body_prefix: String,
}

impl Transport {
    /// Performs one attempt of `request` (its body is taken: sent, not kept). Never fails: every
    /// problem is in what happened.
    pub(super) async fn perform(
        &self,
        delivery: &ClaimedDelivery,
        request: &mut Request,
    ) -> Performed {
        let started_at = Utc::now();
        let clock = Instant::now();
        let headers = request.headers(delivery, started_at.timestamp());
        let happened = match &request.bot {
            Some((bot, input)) => self.run_bot(delivery, request, bot, input, &headers).await,
            None => match &request.target.url {
                None => Happened::Error(format!("{} is not a URL", request.endpoint)),
                Some(Err(refused)) => Happened::Error(refused.clone()),
                Some(Ok(url)) => match self
                    .post(
                        url.clone(),
                        headers,
                        std::mem::take(&mut request.body),
                        request.timeout,
                    )
                    .await
                {
                    Ok(response) => Happened::Response(response),
                    Err(error) => Happened::Error(error),
                },
            },
        };
        Performed {
            started_at,
            duration_ms: clock.elapsed().as_millis().min(i32::MAX as u128) as i32,
            happened,
        }
    }

    /// Runs a bot subscription's handler, with the request timeout.
    async fn run_bot(
        &self,
        delivery: &ClaimedDelivery,
        request: &Request,
        bot: &Result<Value, String>,
        input: &Value,
        headers: &reqwest::header::HeaderMap,
    ) -> Happened {
        let result = match bot {
            Err(missing) => Err(missing.clone()),
            Ok(bot) => {
                let run = self.bots.run(BotInput {
                    bot: bot.clone(),
                    subscription_id: delivery.subscription_id.clone(),
                    interaction: delivery.interaction,
                    input: input.clone(),
                    headers: headers
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.to_string(),
                                value.to_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect(),
                });
                match tokio::time::timeout(self.request_timeout, run).await {
                    Ok(Ok(output)) => Ok(output.log),
                    Ok(Err(failure)) => Err(failure.message),
                    Err(_) => Err(format!(
                        "the bot handler did not finish within {:?}",
                        self.request_timeout
                    )),
                }
            }
        };
        let bot = bot.clone().unwrap_or_else(|_| {
            serde_json::json!({ "resourceType": "Bot",
                "id": request.endpoint.strip_prefix("Bot/").unwrap_or_default() })
        });
        Happened::Bot {
            bot,
            input: input.clone(),
            result,
        }
    }

    async fn post(
        &self,
        url: reqwest::Url,
        headers: reqwest::header::HeaderMap,
        body: Vec<u8>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Response, String> {
        let mut post = self.client.post(url).headers(headers).body(body);
        if let Some(timeout) = timeout.filter(|timeout| *timeout < self.request_timeout) {
            post = post.timeout(timeout);
        }
        let mut response = post.send().await.map_err(describe_error)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        // Keep only a bounded prefix: a huge or endless response must not cost memory.
        let mut prefix = Vec::new();
        while prefix.len() < self.response_body_limit {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.response_body_limit - prefix.len();
                    prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(Response {
            status,
            retry_after,
            body_prefix: String::from_utf8_lossy(&prefix).into_owned(),
        })
    }
}

/// An error and its causes, without the URL (it may carry a token in its query string).
fn describe_error(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
