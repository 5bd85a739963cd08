//! Does a change match a subscription? The one implementation of that decision, used by the
//! dispatcher (fast, no explanations) and by `fhir-outbox explain` (every reason spelled out).
//!
//! The checks follow Medplum's `resourceMatchesSubscriptionCriteria` (docs/medplum-rest-hook.md §1.3–1.4), cheapest first;
//! the verdict does not depend on their order.

use crate::capture::Interaction;
use crate::criteria::{Criteria, MatchReport};
use crate::delivery::outbound;
use crate::fhirpath::{self, Environment, Expression};
use crate::subscription::{self, extension};
use crate::topic::{BackportSubscription, Topic};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};
use uuid::Uuid;

/// A Subscription resource prepared for matching: extensions read, criteria parsed and FHIRPath
/// compiled once per subscription version.
#[derive(Debug)]
pub struct CompiledSubscription {
    /// The project that owns the subscription.
    pub project_id: Uuid,
    /// The Subscription's id.
    pub id: String,
    /// The version compiled.
    pub version_id: i64,
    /// Since when the subscription has been `active` without interruption; changes written before
    /// that are not delivered to it. `None` when unknown (explain on a file).
    pub active_since: Option<DateTime<Utc>>,
    /// A subscription of a server-scope project, evaluated for every project.
    pub server_scope: bool,
    status: String,
    channel_type: String,
    has_endpoint: bool,
    /// Why the endpoint may not be called (outbound URL safety, with the current setting), if it
    /// may not: a change that matches becomes a `skipped` delivery with this reason.
    unsafe_endpoint: Option<String>,
    /// Whether the endpoint is refused whatever the setting (not a usable http(s) URL).
    malformed_endpoint: bool,
    /// Why `subscription-max-attempts` is not usable (the default applies meanwhile).
    max_attempts_problem: Option<String>,
    pre_commit: bool,
    /// `None`: every interaction (no extension).
    interactions: Option<Vec<String>>,
    accounts: Vec<String>,
    criteria: Result<Criteria, String>,
    fhirpath: Option<Result<Arc<Expression>, String>>,
    /// Set when an evaluation of this version exhausted its budget: from then on it is not
    /// evaluated at all, so a hostile expression costs one budget, not one per change.
    suspended: OnceLock<String>,
    /// For a subscription to a topic (the Subscriptions Backport): what it subscribes to, in place
    /// of Medplum's criteria.
    topic: Option<TopicBinding>,
}

/// A subscription to a topic, read once per version, with its topic as the project defines it.
#[derive(Debug)]
pub struct TopicBinding {
    /// The subscription as the backport profile reads it, or why it cannot be read.
    subscription: Result<BackportSubscription, String>,
    /// What the subscription asks for that is refused (it matches nothing while any is).
    refused: Vec<String>,
    /// What is not supported but does not stop delivery (reported once).
    unsupported: Vec<String>,
    /// Its topic; `None` until bound, or when the project has no topic with that URL.
    topic: Option<Arc<Topic>>,
}

impl TopicBinding {
    /// Whether evaluating a change of `resource_type` looks at its contents
    /// ([`evaluate_topic`]): a usable binding whose topic's triggers for that type test the
    /// states, or whose subscription filters that type. An unusable one is rejected first.
    fn reads_content(&self, resource_type: &str) -> bool {
        match (&self.subscription, &self.topic) {
            (Ok(subscription), Some(topic)) if self.refused.is_empty() => {
                topic.reads_content(resource_type) || subscription.has_filters_for(resource_type)
            }
            _ => false,
        }
    }

    fn read(resource: &Value) -> TopicBinding {
        let (subscription, unsupported) = match BackportSubscription::parse(resource) {
            Ok((subscription, problems)) => (Ok(subscription), problems),
            Err(error) => (Err(error), Vec::new()),
        };
        TopicBinding {
            subscription,
            refused: Vec::new(),
            unsupported,
            topic: None,
        }
    }
}

/// A project's topics by canonical URL, each with what it defines that is not supported, or why
/// it cannot be used at all.
pub type Topics = std::collections::HashMap<String, Result<(Arc<Topic>, Vec<String>), String>>;

/// The kind of a problem found in a subscription, as recorded in `fhir_outbox.subscription_issue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueKind {
    /// A criteria construct that is not supported: it never matches.
    Unsupported,
    /// Criteria or FHIRPath that cannot be parsed: the subscription never matches.
    Invalid,
    /// An error while evaluating one change: that change is not delivered to it.
    EvaluationError,
    /// An evaluation exhausted its budget (work or memory): this subscription version is suspended
    /// and never matches; writing a new version of the subscription lifts it.
    BudgetExhausted,
    /// The endpoint is refused by the outbound URL check with the current setting (`http`, a
    /// private address): matching changes become `skipped` deliveries, which an operator can
    /// `retry` once the setting allows the endpoint.
    EndpointRefused,
}

impl IssueKind {
    /// The value stored in `subscription_issue.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueKind::Unsupported => "unsupported",
            IssueKind::Invalid => "invalid",
            IssueKind::EvaluationError => "evaluation_error",
            IssueKind::BudgetExhausted => "budget_exhausted",
            IssueKind::EndpointRefused => "endpoint_refused",
        }
    }
}

impl CompiledSubscription {
    /// Reads a Subscription resource. `allow_unsafe_outbound` is the server setting that lets
    /// endpoints use `http` and private addresses.
    pub fn compile(
        project_id: Uuid,
        version_id: i64,
        resource: &Value,
        active_since: Option<DateTime<Utc>>,
        server_scope: bool,
        allow_unsafe_outbound: bool,
    ) -> CompiledSubscription {
        let interactions: Vec<String> =
            subscription::extensions(resource, extension::SUPPORTED_INTERACTION)
                .filter_map(|ext| ext.get("valueCode").and_then(Value::as_str))
                .map(str::to_owned)
                .collect();
        let topic =
            crate::topic::is_backport_subscription(resource).then(|| TopicBinding::read(resource));
        let criteria = match resource.get("criteria").and_then(Value::as_str) {
            _ if topic.is_some() => {
                Err("a subscription to a topic has no search criteria".to_owned())
            }
            Some(text) if !text.trim().is_empty() => {
                Criteria::parse(text).map_err(|error| error.to_string())
            }
            _ => Err("the subscription has no criteria".to_owned()),
        };
        let endpoint =
            subscription::endpoint(resource).filter(|endpoint| !endpoint.starts_with("Bot/"));
        let unsafe_endpoint = endpoint
            .and_then(|endpoint| outbound::check_url(endpoint, allow_unsafe_outbound).err())
            .map(|error| error.to_string());
        let malformed_endpoint =
            endpoint.is_some_and(|endpoint| outbound::check_url(endpoint, true).is_err());
        let fhirpath =
            subscription::extension_value(resource, extension::FHIRPATH_CRITERIA, "valueString")
                .and_then(Value::as_str)
                .filter(|expression| !expression.trim().is_empty())
                .map(|expression| fhirpath::compile(expression).map_err(|error| error.to_string()));
        CompiledSubscription {
            project_id,
            id: resource
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            version_id,
            active_since,
            server_scope,
            status: subscription::status(resource).to_owned(),
            channel_type: subscription::channel_type(resource).to_owned(),
            has_endpoint: subscription::endpoint(resource).is_some(),
            unsafe_endpoint,
            malformed_endpoint,
            max_attempts_problem: crate::delivery::policy::max_attempts(resource).err(),
            pre_commit: subscription::extension_value(
                resource,
                extension::PRE_COMMIT,
                "valueBoolean",
            ) == Some(&Value::Bool(true)),
            interactions: (!interactions.is_empty()).then_some(interactions),
            accounts: subscription::accounts(resource)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            criteria,
            fhirpath,
            suspended: OnceLock::new(),
            topic,
        }
    }

    /// Whether evaluating a change of `resource_type` against this version may read the
    /// resource's contents: the dispatcher reads a change's versions only when some candidate
    /// does, and evaluates the others on no content at all ([`ChangeView::without_contents`]).
    /// Everything [`evaluate`] checks before the criteria's filters (status, activation time,
    /// interactions, the criteria's type) reads the change's columns, not its contents.
    pub fn reads_content(&self, resource_type: &str) -> bool {
        if let Some(binding) = &self.topic {
            return binding.reads_content(resource_type);
        }
        match &self.criteria {
            Ok(criteria) => {
                criteria.resource_type() == resource_type
                    && (criteria.reads_resource()
                        || !self.accounts.is_empty()
                        || self.fhirpath.is_some())
            }
            // Rejected before anything is read.
            Err(_) => false,
        }
    }

    /// The topic's canonical URL, for a subscription to a topic.
    pub fn topic_url(&self) -> Option<&str> {
        let binding = self.topic.as_ref()?;
        binding
            .subscription
            .as_ref()
            .ok()
            .map(|subscription| subscription.topic_url.as_str())
    }

    /// Binds a subscription to a topic with the topic its project defines under that URL (none:
    /// it matches nothing, and says so in its issues); its filters are checked against what the
    /// topic allows. Does nothing to a Medplum-style subscription.
    pub fn bind_topic(&mut self, topics: &Topics) {
        let Some(binding) = &mut self.topic else {
            return;
        };
        let Ok(subscription) = &binding.subscription else {
            return;
        };
        let found = match topics.get(&subscription.topic_url) {
            Some(Ok((topic, unsupported))) if subscription.topic_matches(topic) => {
                Some((topic, unsupported))
            }
            Some(Err(error)) => {
                binding.refused.push(format!(
                    "its topic {} cannot be used: {error}",
                    subscription.topic_url
                ));
                None
            }
            _ => None,
        };
        if let Some((topic, unsupported)) = found {
            binding.refused.extend(subscription.check_filters(topic));
            binding.unsupported.extend(
                unsupported
                    .iter()
                    .map(|problem| format!("topic {}: {problem}", topic.url)),
            );
            binding.topic = Some(topic.clone());
        }
    }

    /// Stops evaluating this version (its evaluation exhausted its budget); the first reason
    /// given is kept. Whether this call suspended it (`false`: it already was).
    pub fn suspend(&self, reason: String) -> bool {
        self.suspended.set(reason).is_ok()
    }

    /// Why this version is suspended, if it is.
    pub fn suspension(&self) -> Option<&str> {
        self.suspended.get().map(String::as_str)
    }

    /// The problems to report once for this version: unparsable criteria or FHIRPath, criteria
    /// constructs that are not supported, a missing, malformed or refused endpoint, an unusable
    /// `subscription-max-attempts`.
    pub fn issues(&self) -> Vec<(IssueKind, String)> {
        let mut issues = Vec::new();
        if self.channel_type == "rest-hook" && !self.has_endpoint {
            issues.push((
                IssueKind::Invalid,
                "rest-hook channel has no endpoint (channel.endpoint); nothing is delivered"
                    .to_owned(),
            ));
        }
        if let Some(reason) = &self.unsafe_endpoint {
            issues.push(if self.malformed_endpoint {
                (
                    IssueKind::Invalid,
                    format!("malformed endpoint: {reason}; matching changes are recorded as skipped deliveries"),
                )
            } else {
                (
                    IssueKind::EndpointRefused,
                    format!("{reason}, refused without the allow-unsafe-outbound setting; matching changes are recorded as skipped deliveries (`retry` them once it is allowed)"),
                )
            });
        }
        if let Some(problem) = &self.max_attempts_problem {
            issues.push((IssueKind::Invalid, problem.clone()));
        }
        match &self.criteria {
            Ok(criteria) => issues.extend(criteria.unsupported().map(|unsupported| {
                (
                    IssueKind::Unsupported,
                    format!("criteria {unsupported}; this filter never matches"),
                )
            })),
            Err(error) if self.has_criteria() => {
                issues.push((IssueKind::Invalid, format!("invalid criteria: {error}")))
            }
            Err(_) => {}
        }
        if let Some(binding) = &self.topic {
            match &binding.subscription {
                Err(error) => issues.push((
                    IssueKind::Invalid,
                    format!("invalid subscription to a topic: {error}; nothing matches"),
                )),
                Ok(subscription) if binding.topic.is_none() && binding.refused.is_empty() => issues.push((
                    IssueKind::Invalid,
                    format!(
                        "no topic with url {}{} in the project (a Basic coded SubscriptionTopic); nothing matches",
                        subscription.topic_url,
                        subscription
                            .topic_version
                            .as_ref()
                            .map(|version| format!(" and version {version}"))
                            .unwrap_or_default()
                    ),
                )),
                Ok(_) => {}
            }
            issues.extend(binding.refused.iter().map(|problem| {
                (
                    IssueKind::Unsupported,
                    format!("{problem}; the subscription matches nothing until it or its topic is changed"),
                )
            }));
            issues.extend(
                binding
                    .unsupported
                    .iter()
                    .map(|problem| (IssueKind::Unsupported, problem.clone())),
            );
        }
        if let Some(Err(error)) = &self.fhirpath {
            issues.push((
                IssueKind::Invalid,
                format!("invalid FHIRPath criteria expression: {error}"),
            ));
        }
        issues
    }

    fn has_criteria(&self) -> bool {
        self.topic.is_none()
            && !matches!(&self.criteria, Err(message) if message == "the subscription has no criteria")
    }

    /// Whether this subscription is one the rest-hook worker delivers to at all (active, rest-hook
    /// with an endpoint, not pre-commit). Cheap; checked before anything else.
    fn candidate_rejection(&self, pre_commit: bool) -> Option<Rejection> {
        if let Some(reason) = self.suspension() {
            return Some(Rejection::Suspended(reason.to_owned()));
        }
        if self.status != "active" {
            return Some(Rejection::NotActive(self.status.clone()));
        }
        if self.channel_type != "rest-hook" {
            return Some(Rejection::ChannelType(self.channel_type.clone()));
        }
        if !self.has_endpoint {
            return Some(Rejection::NoEndpoint);
        }
        if self.pre_commit != pre_commit {
            return Some(if pre_commit {
                Rejection::NotPreCommit
            } else {
                Rejection::PreCommit
            });
        }
        None
    }
}

/// The change a subscription is matched against.
#[derive(Debug, Clone, Copy)]
pub struct ChangeView<'a> {
    /// The changed resource's type.
    pub resource_type: &'a str,
    /// What kind of change.
    pub interaction: Interaction,
    /// The content the criteria are evaluated on: the new version, or for a delete the last live one.
    pub current: &'a Value,
    /// The version before (for a delete, the same as `current`); `None` for a create.
    pub previous: Option<&'a Value>,
    /// When the change was written.
    pub changed_at: Option<DateTime<Utc>>,
}

impl<'a> ChangeView<'a> {
    /// A change whose contents were not read, to evaluate against subscriptions that do not read
    /// them ([`CompiledSubscription::reads_content`]): an empty object stands for them.
    pub fn without_contents(
        resource_type: &'a str,
        interaction: Interaction,
        changed_at: Option<DateTime<Utc>>,
    ) -> ChangeView<'a> {
        ChangeView {
            resource_type,
            interaction,
            current: &EMPTY_OBJECT,
            previous: None,
            changed_at,
        }
    }
}

/// Why a subscription did not match a change.
#[derive(Debug, Clone)]
pub enum Rejection {
    /// `status` is not `active`.
    NotActive(String),
    /// `channel.type` is not `rest-hook` (websocket and other channels are not delivered here).
    ChannelType(String),
    /// A rest-hook channel without an endpoint.
    NoEndpoint,
    /// A pre-commit subscription: run synchronously by the write, not by this worker.
    PreCommit,
    /// Not a pre-commit subscription (when evaluating for the write path).
    NotPreCommit,
    /// The change was written before (or as) the subscription became active.
    ChangedBeforeActive {
        /// When the change was written.
        changed_at: DateTime<Utc>,
        /// Since when the subscription is active.
        active_since: DateTime<Utc>,
    },
    /// The supported-interaction extensions do not include this interaction.
    Interaction {
        /// The change's interaction.
        interaction: Interaction,
        /// The codes the subscription allows.
        allowed: Vec<String>,
    },
    /// No criteria, or criteria that cannot be parsed.
    Criteria(String),
    /// The criteria are about another resource type.
    ResourceType {
        /// The criteria's resource type.
        criteria: String,
        /// The change's resource type.
        resource: String,
    },
    /// The subscription is restricted to accounts the resource does not belong to.
    Accounts {
        /// The subscription's accounts.
        subscription: Vec<String>,
    },
    /// The FHIRPath criteria expression cannot be parsed.
    InvalidFhirPath(String),
    /// The FHIRPath criteria expression did not give a single `true`.
    FhirPath {
        /// The expression.
        expression: String,
        /// What it gave instead.
        result: String,
    },
    /// A search filter did not match (the report is only built when explaining).
    Search(Option<MatchReport>),
    /// An earlier evaluation of this subscription version exhausted its budget.
    Suspended(String),
    /// A subscription to a topic that cannot match (unreadable, no such topic, refused filters).
    TopicUnusable(String),
    /// No trigger of the topic fired for this change.
    TopicNotTriggered(String),
    /// The topic fired, and the subscription's filters did not match.
    TopicFilters,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotActive(status) => write!(f, "status is `{status}`, not `active`"),
            Rejection::ChannelType(channel) => write!(
                f,
                "channel type is `{channel}`; only `rest-hook` subscriptions are delivered by this worker"
            ),
            Rejection::NoEndpoint => write!(f, "rest-hook channel has no endpoint"),
            Rejection::NotPreCommit => write!(f, "not a pre-commit subscription"),
            Rejection::PreCommit => write!(
                f,
                "a pre-commit subscription (extension {}) runs inside the write, not in this worker",
                extension::PRE_COMMIT
            ),
            Rejection::ChangedBeforeActive {
                changed_at,
                active_since,
            } => write!(
                f,
                "the change was written at {changed_at}, not after the subscription became active at {active_since}"
            ),
            Rejection::Interaction {
                interaction,
                allowed,
            } => write!(
                f,
                "interaction `{interaction}` is not among the supported interactions [{}]",
                allowed.join(", ")
            ),
            Rejection::Criteria(message) => write!(f, "{message}"),
            Rejection::ResourceType { criteria, resource } => write!(
                f,
                "criteria are about `{criteria}`, the resource is a `{resource}`"
            ),
            Rejection::Accounts { subscription } => write!(
                f,
                "the subscription is restricted to accounts [{}] and the resource belongs to none of them",
                subscription.join(", ")
            ),
            Rejection::InvalidFhirPath(message) => {
                write!(f, "the FHIRPath criteria expression is invalid: {message}")
            }
            Rejection::FhirPath { expression, result } => write!(
                f,
                "FHIRPath criteria `{expression}` gave {result}, not a single `true`"
            ),
            Rejection::Search(Some(report)) => write!(f, "search criteria {report}"),
            Rejection::Search(None) => write!(f, "search criteria did not match"),
            Rejection::TopicUnusable(reason) => write!(f, "{reason}"),
            Rejection::TopicNotTriggered(topic) => {
                write!(
                    f,
                    "no resource trigger of topic {topic} fired for this change"
                )
            }
            Rejection::TopicFilters => {
                write!(f, "the subscription's filter criteria did not match")
            }
            Rejection::Suspended(reason) => write!(
                f,
                "suspended until the subscription is changed: an evaluation exhausted its budget ({reason})"
            ),
        }
    }
}

/// The outcome of matching one subscription against one change.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Deliver the change to this subscription.
    Matched,
    /// Do not; here is why.
    Rejected(Rejection),
    /// The change matches, but the endpoint is refused by the outbound URL check: record a
    /// `skipped` delivery with this reason (Medplum enqueues nothing and logs nothing,
    /// docs/medplum-rest-hook.md §1.16; we leave a trace that an operator can `retry`).
    Refused(String),
    /// Evaluating failed (a FHIRPath runtime error, …): not delivered, and reported to operators.
    Failed(String),
    /// Evaluating exhausted its budget of work or memory: not delivered, and the caller suspends
    /// the subscription version ([`CompiledSubscription::suspend`]).
    OverBudget(String),
}

/// `%previous` when there is no previous version: an empty object, so `%previous.x` is empty.
static EMPTY_OBJECT: LazyLock<Value> = LazyLock::new(|| json!({}));

/// Matches one subscription against one change. With `explain`, a search mismatch carries the full
/// report of which filters failed and why (slower; for the `explain` command).
pub fn evaluate(
    subscription: &CompiledSubscription,
    change: &ChangeView<'_>,
    explain: bool,
) -> Verdict {
    evaluate_as(subscription, change, explain, false)
}

/// [`evaluate`] for the synchronous write path: only pre-commit subscriptions are candidates.
pub fn evaluate_pre_commit(
    subscription: &CompiledSubscription,
    change: &ChangeView<'_>,
) -> Verdict {
    evaluate_as(subscription, change, false, true)
}

fn evaluate_as(
    subscription: &CompiledSubscription,
    change: &ChangeView<'_>,
    explain: bool,
    pre_commit: bool,
) -> Verdict {
    match evaluate_filters(subscription, change, explain, pre_commit) {
        Verdict::Matched => match &subscription.unsafe_endpoint {
            Some(reason) => Verdict::Refused(format!("{ENDPOINT_REFUSED}{reason}")),
            None => Verdict::Matched,
        },
        verdict => verdict,
    }
}

/// The start of the `reason` of a delivery skipped because its endpoint is refused (`retry` of a
/// subscription re-queues these too).
pub const ENDPOINT_REFUSED: &str = "endpoint refused by the outbound URL check: ";

fn evaluate_filters(
    subscription: &CompiledSubscription,
    change: &ChangeView<'_>,
    explain: bool,
    pre_commit: bool,
) -> Verdict {
    if let Some(rejection) = subscription.candidate_rejection(pre_commit) {
        return Verdict::Rejected(rejection);
    }
    if let (Some(changed_at), Some(active_since)) = (change.changed_at, subscription.active_since) {
        // Strictly after: a subscription's own creation (same instant) is not news to it.
        if changed_at <= active_since {
            return Verdict::Rejected(Rejection::ChangedBeforeActive {
                changed_at,
                active_since,
            });
        }
    }
    if let Some(binding) = &subscription.topic {
        return evaluate_topic(binding, change);
    }
    if let Some(allowed) = &subscription.interactions {
        if !allowed
            .iter()
            .any(|code| code == change.interaction.as_str())
        {
            return Verdict::Rejected(Rejection::Interaction {
                interaction: change.interaction,
                allowed: allowed.clone(),
            });
        }
    }
    let criteria = match &subscription.criteria {
        Ok(criteria) => criteria,
        Err(message) => return Verdict::Rejected(Rejection::Criteria(message.clone())),
    };
    if criteria.resource_type() != change.resource_type {
        return Verdict::Rejected(Rejection::ResourceType {
            criteria: criteria.resource_type().to_owned(),
            resource: change.resource_type.to_owned(),
        });
    }
    if !subscription.accounts.is_empty() {
        let resource_accounts = subscription::accounts(change.current);
        if !subscription
            .accounts
            .iter()
            .any(|account| resource_accounts.contains(&account.as_str()))
        {
            return Verdict::Rejected(Rejection::Accounts {
                subscription: subscription.accounts.clone(),
            });
        }
    }
    // A criteria of a type alone has nothing more to check (the type was checked above), and
    // its change's contents may not have been read.
    let search = if !criteria.reads_resource() {
        Ok((true, None))
    } else if explain {
        criteria
            .explain(change.current)
            .map(|report| (report.matched, Some(report)))
    } else {
        criteria
            .matches(change.current)
            .map(|matched| (matched, None))
    };
    match search {
        Ok((true, _)) => {}
        Ok((false, report)) => return Verdict::Rejected(Rejection::Search(report)),
        Err(error) if error.is_budget_exhausted() => {
            return Verdict::OverBudget(format!("search criteria: {error}"));
        }
        Err(error) => return Verdict::Failed(format!("search criteria: {error}")),
    }
    match &subscription.fhirpath {
        None => Verdict::Matched,
        Some(Err(message)) => Verdict::Rejected(Rejection::InvalidFhirPath(message.clone())),
        Some(Ok(expression)) => {
            let previous = change.previous.unwrap_or(&EMPTY_OBJECT);
            let environment = Environment::new()
                .with_variable("current", change.current)
                .with_variable("previous", previous);
            // Only a single `true` passes. Medplum takes the first item of any result; a collection
            // like `[true, false]` is ambiguous, so we refuse it rather than guess.
            match expression.evaluate(change.current, &environment) {
                Ok(items) if items.len() == 1 && items[0].as_bool() == Some(true) => {
                    Verdict::Matched
                }
                Ok(items) => Verdict::Rejected(Rejection::FhirPath {
                    expression: expression.source().to_owned(),
                    result: describe(&items),
                }),
                Err(error) => {
                    let message = format!("FHIRPath criteria `{}`: {error}", expression.source());
                    if error.is_budget_exhausted() {
                        Verdict::OverBudget(message)
                    } else {
                        Verdict::Failed(message)
                    }
                }
            }
        }
    }
}

/// A change against a subscription to a topic: the topic's triggers, then the subscription's
/// filters. A delete has no current version; its last live one is the previous.
fn evaluate_topic(binding: &TopicBinding, change: &ChangeView<'_>) -> Verdict {
    let subscription = match &binding.subscription {
        Ok(subscription) => subscription,
        Err(error) => return Verdict::Rejected(Rejection::TopicUnusable(error.clone())),
    };
    let Some(topic) = &binding.topic else {
        return Verdict::Rejected(Rejection::TopicUnusable(format!(
            "no topic with url {} in the project",
            subscription.topic_url
        )));
    };
    if let Some(refused) = binding.refused.first() {
        return Verdict::Rejected(Rejection::TopicUnusable(refused.clone()));
    }
    let (current, previous) = match change.interaction {
        Interaction::Delete => (None, Some(change.current)),
        _ => (Some(change.current), change.previous),
    };
    let failed = |error: crate::topic::TriggerError| {
        if error.budget_exhausted {
            Verdict::OverBudget(error.message)
        } else {
            Verdict::Failed(error.message)
        }
    };
    match topic.evaluate(change.resource_type, change.interaction, current, previous) {
        Ok(true) => {}
        Ok(false) => {
            return Verdict::Rejected(Rejection::TopicNotTriggered(topic.url.clone()));
        }
        Err(error) => return failed(error),
    }
    match subscription.filters_match(change.resource_type, change.current) {
        Ok(true) => Verdict::Matched,
        Ok(false) => Verdict::Rejected(Rejection::TopicFilters),
        Err(error) => failed(error),
    }
}

fn describe(items: &[fhirpath::Item<'_>]) -> String {
    match items {
        [] => "an empty collection".to_owned(),
        [item] => format!("`{}`", item.to_json()),
        _ => format!("{} items", items.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(criteria: &str, extensions: Value, meta: Value) -> CompiledSubscription {
        let resource = json!({
            "resourceType": "Subscription", "status": "active", "reason": "test",
            "criteria": criteria, "extension": extensions, "meta": meta,
            "channel": { "type": "rest-hook", "endpoint": "https://example.org/hook" }
        });
        CompiledSubscription::compile(Uuid::nil(), 1, &resource, None, false, false)
    }

    fn patient_change(current: &Value) -> Verdict {
        let subscription = compiled("Patient", json!([]), json!({}));
        let view = ChangeView {
            resource_type: "Patient",
            interaction: Interaction::Create,
            current,
            previous: None,
            changed_at: None,
        };
        evaluate(&subscription, &view, false)
    }

    #[test]
    fn only_a_criteria_of_the_changes_type_alone_reads_no_content() {
        let none = || json!([]);
        assert!(!compiled("Patient", none(), json!({})).reads_content("Patient"));
        // Another type is rejected by the type, before anything is read.
        assert!(!compiled("Observation?code=x", none(), json!({})).reads_content("Patient"));
        assert!(!compiled("", none(), json!({})).reads_content("Patient"));
        assert!(compiled("Patient?active=true", none(), json!({})).reads_content("Patient"));
        // An unsupported construct is a filter that never matches: still read, as before.
        assert!(compiled("Patient?_has:x", none(), json!({})).reads_content("Patient"));
        let fhirpath = json!([{ "url": extension::FHIRPATH_CRITERIA, "valueString": "true" }]);
        assert!(compiled("Patient", fhirpath, json!({})).reads_content("Patient"));
        let account = json!({ "account": { "reference": "Organization/1" } });
        assert!(compiled("Patient", none(), account).reads_content("Patient"));
        let interactions =
            json!([{ "url": extension::SUPPORTED_INTERACTION, "valueCode": "create" }]);
        assert!(!compiled("Patient", interactions, json!({})).reads_content("Patient"));
    }

    /// A subscription to a topic that triggers on Patient creates (interactions alone) and on
    /// Observations with `status=final`, filtered by `filters` (`backport-filter-criteria`), bound
    /// to that topic when `bound`.
    fn topic_subscription(filters: &[&str], bound: bool) -> CompiledSubscription {
        const XVER: &str =
            "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";
        const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
        const URL: &str = "http://example.org/topic";
        let topic = json!({
            "resourceType": "Basic",
            "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
            "extension": [
                {"url": format!("{XVER}url"), "valueUri": URL},
                {"url": format!("{XVER}resourceTrigger"), "extension": [
                    {"url": "resource", "valueUri": "Patient"},
                    {"url": "supportedInteraction", "valueCode": "create"}
                ]},
                {"url": format!("{XVER}resourceTrigger"), "extension": [
                    {"url": "resource", "valueUri": "Observation"},
                    {"url": "queryCriteria", "extension": [{"url": "current", "valueString": "status=final"}]}
                ]},
                {"url": format!("{XVER}canFilterBy"), "extension": [
                    {"url": "resource", "valueUri": "Patient"},
                    {"url": "filterParameter", "valueString": "gender"}
                ]}
            ]
        });
        let filters: Vec<Value> = filters
            .iter()
            .map(|filter| json!({"url": format!("{BACKPORT}backport-filter-criteria"), "valueString": filter}))
            .collect();
        let resource = json!({
            "resourceType": "Subscription", "status": "active", "reason": "test",
            "meta": {"profile": [format!("{BACKPORT}backport-subscription")]},
            "criteria": URL, "_criteria": {"extension": filters},
            "channel": {"type": "rest-hook", "endpoint": "https://example.org/hook",
                        "_payload": {"extension": [
                            {"url": format!("{BACKPORT}backport-payload-content"), "valueCode": "id-only"}
                        ]}}
        });
        let mut subscription =
            CompiledSubscription::compile(Uuid::nil(), 1, &resource, None, false, false);
        let topic = Topic::parse(&topic).map(|(topic, unsupported)| (Arc::new(topic), unsupported));
        let topics: Topics = if bound {
            [(URL.to_owned(), topic)].into_iter().collect()
        } else {
            Topics::new()
        };
        subscription.bind_topic(&topics);
        subscription
    }

    #[test]
    fn a_topic_reads_contents_only_for_triggers_or_filters_that_test_them() {
        let unfiltered = topic_subscription(&[], true);
        assert!(
            !unfiltered.reads_content("Patient"),
            "a trigger of interactions alone"
        );
        assert!(
            unfiltered.reads_content("Observation"),
            "a trigger with query criteria"
        );
        assert!(
            !unfiltered.reads_content("Encounter"),
            "no trigger for the type"
        );
        let filtered = topic_subscription(&["Patient?gender=male"], true);
        assert!(
            filtered.reads_content("Patient"),
            "the subscription filters Patients"
        );
        // A topic the project does not define, or a refused filter: nothing matches, nothing is read.
        assert!(!topic_subscription(&[], false).reads_content("Observation"));
        let refused = topic_subscription(&["Patient?name=x"], true);
        assert!(!refused.reads_content("Patient"));
    }

    #[test]
    fn a_topic_trigger_of_interactions_alone_matches_a_change_evaluated_without_contents() {
        let subscription = topic_subscription(&[], true);
        let create = ChangeView::without_contents("Patient", Interaction::Create, None);
        assert!(matches!(
            evaluate(&subscription, &create, false),
            Verdict::Matched
        ));
        let update = ChangeView::without_contents("Patient", Interaction::Update, None);
        assert!(matches!(
            evaluate(&subscription, &update, false),
            Verdict::Rejected(Rejection::TopicNotTriggered(_))
        ));
    }

    #[test]
    fn a_criteria_of_a_type_alone_matches_a_change_evaluated_without_contents() {
        let subscription = compiled("Patient", json!([]), json!({}));
        let view = ChangeView::without_contents("Patient", Interaction::Update, None);
        assert!(matches!(
            evaluate(&subscription, &view, false),
            Verdict::Matched
        ));
        let view = ChangeView::without_contents("Observation", Interaction::Update, None);
        assert!(matches!(
            evaluate(&subscription, &view, false),
            Verdict::Rejected(Rejection::ResourceType { .. })
        ));
        // With contents, the same verdict as before.
        assert!(matches!(
            patient_change(&json!({ "resourceType": "Patient" })),
            Verdict::Matched
        ));
    }
}
