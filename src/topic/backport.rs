//! Topic-based subscriptions in R4: a `Subscription` per the IG's `backport-subscription` profile.
//!
//! What is read, element by element:
//! - `criteria`: the topic's canonical URL (`url` or `url|version`);
//! - `criteria` extension `backport-filter-criteria` (repeatable): search-style filters;
//! - `channel.payload`: the MIME type, and its extension `backport-payload-content`;
//! - `channel` extensions `backport-heartbeat-period`, `backport-timeout`, `backport-max-count`;
//! - `channel.type` extension `backport-channel-type`: refused (the subscription is unusable).
//!
//! Filters are evaluated by the crate's criteria matcher ([`crate::criteria`]), with its semantics
//! (Medplum's), so a filter means the same as it would in a Medplum criteria.
//!
//! Left to the callers, as for every subscription: `status`, `channel.type`, `channel.endpoint`,
//! `channel.header`, `end`. Not read, because they change nothing about what is delivered:
//! `reason`, `contact`, `error`, the R5 `Subscription.identifier` extension.

use std::time::Duration;

use serde_json::Value;

use super::definition::{Topic, TriggerError};
use crate::criteria::{Criteria, ParamType};

/// The backport subscription profile.
pub const PROFILE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription";
/// Most filters a subscription may have: each is evaluated on every change its topic triggers
/// (up to 256 parameters each), and subscriptions in use have a few.
pub const MAX_FILTERS: usize = 32;

/// `valueString` (repeatable) on `Subscription.criteria`: a filter such as
/// `Encounter?patient=Patient/123`.
pub const FILTER_CRITERIA: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
/// `valueCode` on `Subscription.channel.payload`: `empty`, `id-only` or `full-resource`.
pub const PAYLOAD_CONTENT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
/// `valueUnsignedInt` on `Subscription.channel`: seconds between heartbeats.
pub const HEARTBEAT_PERIOD: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period";
/// `valueUnsignedInt` on `Subscription.channel`: seconds a delivery attempt may take.
pub const TIMEOUT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout";
/// `valuePositiveInt` on `Subscription.channel`: most focus resources in one notification.
pub const MAX_COUNT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count";
/// `valueCoding` on `Subscription.channel.type`: a channel type R4 does not define.
pub const CHANNEL_TYPE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-channel-type";

/// The content type notifications are sent in when `channel.payload` is absent.
pub const DEFAULT_CONTENT_TYPE: &str = "application/fhir+json";

/// Search comparators: the value prefixes of date, number and quantity parameters.
const COMPARATORS: [&str; 9] = ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"];

/// Whether a Subscription is topic-based: its `criteria` is a canonical URL (`http://`,
/// `https://` or `urn:`; a Medplum criteria such as `Patient?name=x` never is one), or it claims
/// the backport profile in `meta.profile`.
pub fn is_backport_subscription(subscription: &Value) -> bool {
    subscription
        .get("criteria")
        .and_then(Value::as_str)
        .is_some_and(|criteria| is_canonical(criteria.trim()))
        || subscription
            .pointer("/meta/profile")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|profile| profile.split('|').next() == Some(PROFILE))
}

fn is_canonical(text: &str) -> bool {
    ["http://", "https://", "urn:"]
        .iter()
        .any(|scheme| text.starts_with(scheme))
}

/// How much of the focus resource a notification carries (`backport-payload-content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadContent {
    /// No resource information: the status only.
    Empty,
    /// A reference to the focus and an entry with its URL, without the resource.
    IdOnly,
    /// The focus resource itself.
    FullResource,
}

impl PayloadContent {
    /// The code: `empty`, `id-only` or `full-resource`.
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadContent::Empty => "empty",
            PayloadContent::IdOnly => "id-only",
            PayloadContent::FullResource => "full-resource",
        }
    }

    /// Reads a code (case-sensitive, as the IG's code system is).
    pub fn parse(code: &str) -> Option<PayloadContent> {
        [
            PayloadContent::Empty,
            PayloadContent::IdOnly,
            PayloadContent::FullResource,
        ]
        .into_iter()
        .find(|content| content.as_str() == code)
    }
}

/// A topic-based subscription as read from its R4 Subscription.
#[derive(Debug, Clone)]
pub struct BackportSubscription {
    /// The topic's canonical URL (`Subscription.criteria` without any `|version`).
    pub topic_url: String,
    /// The topic version the subscription asks for (`criteria` `url|version`), if any.
    pub topic_version: Option<String>,
    /// The filters (`backport-filter-criteria`); all those about a resource's type must match.
    pub filters: Vec<Criteria>,
    /// How much of the resource notifications carry.
    ///
    /// The backport profile makes `backport-payload-content` mandatory (1..1), so the IG has no
    /// default. Without it we send `id-only` and say so in the problems: the IG's payloads page
    /// calls it the balance between security and performance, and neither sends the resource
    /// (`full-resource`) to an endpoint nobody said may have it nor leaves the receiver without
    /// the id of what changed (`empty`).
    pub content: PayloadContent,
    /// Seconds between heartbeats, when asked for (`backport-heartbeat-period`).
    pub heartbeat_period: Option<Duration>,
    /// How long one delivery attempt may take (`backport-timeout`).
    pub timeout: Option<Duration>,
    /// The most focus resources one notification may carry (`backport-max-count`).
    ///
    /// Any value is accepted: every notification carries one event, which is within any maximum
    /// (the IG defines a maximum, not a batch size).
    pub max_count: Option<u32>,
    /// `channel.payload`, the MIME type of notifications (`application/fhir+json` when absent).
    pub content_type: String,
}

impl BackportSubscription {
    /// Reads a backport subscription. `Err`: it cannot be used (no criteria URL, an unknown or
    /// ambiguous payload content code, a filter that is not a criteria, a custom channel type),
    /// naming the problem. `Ok` carries, beside the subscription, the problems that are refused
    /// but leave it usable, one message each: filter constructs the matcher cannot evaluate (the
    /// filter then never matches, so the subscription receives nothing rather than everything), a
    /// content type other than JSON, an unusable heartbeat, timeout or max count (not honoured), a
    /// missing payload or payload content (defaults used).
    pub fn parse(subscription: &Value) -> Result<(BackportSubscription, Vec<String>), String> {
        let mut problems = Vec::new();
        let criteria = subscription
            .get("criteria")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|criteria| !criteria.is_empty())
            .ok_or("the subscription has no criteria (the topic's canonical URL)")?;
        if !is_canonical(criteria) {
            return Err(format!(
                "criteria `{criteria}` is not a topic's canonical URL (http://, https:// or urn:)"
            ));
        }
        let (topic_url, topic_version) = match criteria.split_once('|') {
            Some((url, version)) => (url.to_owned(), Some(version.to_owned())),
            None => (criteria.to_owned(), None),
        };

        let mut filters = Vec::new();
        for extension in element_extensions(subscription.get("_criteria"), FILTER_CRITERIA) {
            if filters.len() == MAX_FILTERS {
                return Err(format!(
                    "more than {MAX_FILTERS} `{FILTER_CRITERIA}` extensions; no more are evaluated, so the subscription cannot be used"
                ));
            }
            let text = extension
                .get("valueString")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("a `{FILTER_CRITERIA}` extension has no valueString"))?;
            let filter = Criteria::parse(text).map_err(|error| {
                format!("filter criteria `{text}` (`{FILTER_CRITERIA}`): {error}")
            })?;
            problems.extend(filter.unsupported().map(|unsupported| {
                format!(
                    "filter criteria `{text}`: {unsupported}; this filter never matches, so no {} is notified",
                    filter.resource_type()
                )
            }));
            filters.push(filter);
        }

        let channel = subscription.get("channel").unwrap_or(&Value::Null);
        if let Some(custom) = element_extensions(channel.get("_type"), CHANNEL_TYPE).next() {
            let coding = custom.get("valueCoding").unwrap_or(&Value::Null);
            let system = coding.get("system").and_then(Value::as_str).unwrap_or("");
            let code = coding.get("code").and_then(Value::as_str).unwrap_or("");
            return Err(format!(
                "channel.type has the `{CHANNEL_TYPE}` extension (`{system}|{code}`): custom channel types are not supported"
            ));
        }

        let content = payload_content(channel, &mut problems)?;
        let content_type = match channel.get("payload").and_then(Value::as_str) {
            Some(payload) => {
                if let Some(problem) = content_type_problem(payload) {
                    problems.push(problem);
                }
                payload.to_owned()
            }
            None => {
                problems.push(format!(
                    "channel.payload is absent (the backport profile requires it): notifications are sent as {DEFAULT_CONTENT_TYPE}"
                ));
                DEFAULT_CONTENT_TYPE.to_owned()
            }
        };
        let heartbeat_period =
            channel_number(channel, HEARTBEAT_PERIOD, "valueUnsignedInt", &mut problems)
                .map(Duration::from_secs);
        let timeout = channel_number(channel, TIMEOUT, "valueUnsignedInt", &mut problems)
            .map(Duration::from_secs);
        let max_count = channel_number(channel, MAX_COUNT, "valuePositiveInt", &mut problems)
            .and_then(|count| match u32::try_from(count) {
                Ok(count) => Some(count),
                Err(_) => {
                    problems.push(format!(
                        "`{MAX_COUNT}` {count} is larger than a positiveInt; refused"
                    ));
                    None
                }
            });
        Ok((
            BackportSubscription {
                topic_url,
                topic_version,
                filters,
                content,
                heartbeat_period,
                timeout,
                max_count,
                content_type,
            },
            problems,
        ))
    }

    /// Whether `topic` is the one this subscription names: same URL and, when the subscription
    /// gives a version, the same version.
    pub fn topic_matches(&self, topic: &Topic) -> bool {
        topic.url == self.topic_url
            && self
                .topic_version
                .as_ref()
                .is_none_or(|version| topic.version.as_ref() == Some(version))
    }

    /// Checks the filters against the topic's `canFilterBy`: each filter must be about a resource
    /// type the topic triggers on, each of its parameters must be declared for that type (or for
    /// every type), and its modifiers (`:exact`) and comparators (the `gt` of `length=gt5`, on
    /// date, number and quantity parameters; equality needs no declaration) must be declared with
    /// it. Returns one message per refusal, naming the filter. A refused filter must make the
    /// subscription match nothing, never everything: the caller, having recorded the messages,
    /// delivers nothing to a subscription with any (the filter itself still narrows, so ignoring a
    /// refusal would never widen what is delivered).
    pub fn check_filters(&self, topic: &Topic) -> Vec<String> {
        let mut refused = Vec::new();
        let mut trigger_types: Vec<&str> = topic.resource_types().collect();
        trigger_types.sort_unstable();
        trigger_types.dedup();
        for criteria in &self.filters {
            let resource_type = criteria.resource_type();
            if !trigger_types.contains(&resource_type) {
                refused.push(format!(
                    "filter `{criteria}`: topic `{}` does not trigger on {resource_type} (it triggers on {})",
                    topic.url,
                    trigger_types.join(", ")
                ));
                continue;
            }
            for filter in criteria.filters() {
                let code = filter.code();
                let definitions: Vec<_> = topic
                    .can_filter_by
                    .iter()
                    .filter(|definition| {
                        definition.parameter == code
                            && definition
                                .resource_type
                                .as_deref()
                                .is_none_or(|declared| declared == resource_type)
                    })
                    .collect();
                if definitions.is_empty() {
                    let declared: Vec<String> = topic
                        .can_filter_by
                        .iter()
                        .filter(|definition| {
                            definition
                                .resource_type
                                .as_deref()
                                .is_none_or(|declared| declared == resource_type)
                        })
                        .map(|definition| format!("`{}`", definition.parameter))
                        .collect();
                    refused.push(format!(
                        "filter `{criteria}`: parameter `{code}` is not declared in canFilterBy of topic `{}` for {resource_type} (declared: {})",
                        topic.url,
                        if declared.is_empty() { "none".to_owned() } else { declared.join(", ") }
                    ));
                    continue;
                }
                let allowed: Vec<&str> = definitions
                    .iter()
                    .flat_map(|definition| definition.modifiers.iter().map(String::as_str))
                    .collect();
                let allowed_list = || {
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                };
                if let Some(modifier) = filter.modifier() {
                    if !allowed.contains(&modifier) {
                        refused.push(format!(
                            "filter `{criteria}`: modifier `:{modifier}` on `{code}` is not allowed by canFilterBy of topic `{}` (allowed: {})",
                            topic.url,
                            allowed_list()
                        ));
                    }
                }
                let takes_comparators = filter.search_param().is_some_and(|param| {
                    matches!(
                        param.kind,
                        ParamType::Date | ParamType::Number | ParamType::Quantity
                    )
                });
                if !takes_comparators {
                    continue;
                }
                let values = filter.display().split_once('=').map_or("", |(_, v)| v);
                for value in values.split(',') {
                    let prefix = value.get(..2).unwrap_or("");
                    if COMPARATORS.contains(&prefix) && prefix != "eq" && !allowed.contains(&prefix)
                    {
                        refused.push(format!(
                            "filter `{criteria}`: comparator `{prefix}` in `{code}={value}` is not allowed by canFilterBy of topic `{}` (allowed: {})",
                            topic.url,
                            allowed_list()
                        ));
                    }
                }
            }
        }
        refused
    }

    /// Whether the subscription filters changes of `resource_type` (and so reads their contents).
    pub fn has_filters_for(&self, resource_type: &str) -> bool {
        self.filters
            .iter()
            .any(|criteria| criteria.resource_type() == resource_type)
    }

    /// Whether a resource passes the filters: every filter about `resource_type` must match it
    /// (filters about other types say nothing about it); no filter passes. For a delete, pass the
    /// last live version.
    pub fn filters_match(
        &self,
        resource_type: &str,
        resource: &Value,
    ) -> Result<bool, TriggerError> {
        for criteria in self
            .filters
            .iter()
            .filter(|criteria| criteria.resource_type() == resource_type)
        {
            let matched = criteria.matches(resource).map_err(|error| {
                TriggerError::from_criteria("filter criteria", criteria, &error)
            })?;
            if !matched {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The extensions with this URL on a primitive's element (`_criteria`, `_payload`, `_type`) or
/// on a complex element (`channel`).
fn element_extensions<'a>(
    element: Option<&'a Value>,
    url: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    element
        .into_iter()
        .flat_map(move |element| crate::subscription::extensions(element, url))
}

fn payload_content(channel: &Value, problems: &mut Vec<String>) -> Result<PayloadContent, String> {
    let mut content = None;
    for extension in element_extensions(channel.get("_payload"), PAYLOAD_CONTENT) {
        let code = extension
            .get("valueCode")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the `{PAYLOAD_CONTENT}` extension has no valueCode"))?;
        let parsed = PayloadContent::parse(code).ok_or_else(|| {
            format!(
                "`{PAYLOAD_CONTENT}` `{code}` is not a payload content code (empty, id-only, full-resource)"
            )
        })?;
        match content {
            Some(existing) if existing != parsed => {
                return Err(format!(
                    "two different `{PAYLOAD_CONTENT}` codes: `{}` and `{code}`",
                    PayloadContent::as_str(existing)
                ));
            }
            _ => content = Some(parsed),
        }
    }
    Ok(content.unwrap_or_else(|| {
        problems.push(format!(
            "channel.payload has no `{PAYLOAD_CONTENT}` extension (the backport profile requires one): notifications are sent id-only"
        ));
        PayloadContent::IdOnly
    }))
}

/// Why a `channel.payload` MIME type is refused, if it is: notifications are FHIR R4 JSON.
fn content_type_problem(payload: &str) -> Option<String> {
    let mut parts = payload.split(';');
    let base = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if base != "application/fhir+json" && base != "application/json" {
        return Some(format!(
            "channel.payload `{payload}` is refused: notifications are sent as {DEFAULT_CONTENT_TYPE}"
        ));
    }
    // The IG: a server SHALL look for the fhirVersion MIME parameter and not accept a version it
    // cannot send.
    for parameter in parts {
        if let Some((name, value)) = parameter.split_once('=') {
            let value = value.trim().trim_matches('"');
            if name.trim().eq_ignore_ascii_case("fhirVersion")
                && value != "4.0"
                && !value.starts_with("4.0.")
            {
                return Some(format!(
                    "channel.payload `{payload}` asks for FHIR version {value}: notifications are FHIR R4 (4.0)"
                ));
            }
        }
    }
    None
}

/// A channel extension's whole-number value (`value<type>`), or `None` with a problem when it
/// cannot be honoured. Zero is refused: the heartbeat period and timeout are durations and max
/// count is a positiveInt; so is anything above 2^31 - 1, FHIR's largest integer.
fn channel_number(
    channel: &Value,
    url: &str,
    member: &str,
    problems: &mut Vec<String>,
) -> Option<u64> {
    let mut extensions = element_extensions(Some(channel), url);
    let extension = extensions.next()?;
    if extensions.next().is_some() {
        problems.push(format!(
            "`{url}` appears more than once on channel; the first is used"
        ));
    }
    match extension.get(member).and_then(Value::as_u64) {
        Some(0) => {
            problems.push(format!("`{url}` is 0; refused"));
            None
        }
        // FHIR's unsignedInt and positiveInt stop at 2^31 - 1 (as does the heartbeat check in
        // the database, `fhir_outbox.heartbeat_period`).
        Some(value) if value > i32::MAX as u64 => {
            problems.push(format!(
                "`{url}` is {value}, above the largest {member} ({}); refused",
                i32::MAX
            ));
            None
        }
        Some(value) => Some(value),
        None => {
            problems.push(format!("`{url}` has no {member} (a whole number); refused"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::fixture;
    use serde_json::json;

    fn admission() -> Value {
        fixture("Subscription-subscription-admission.json")
    }

    fn encounter_complete() -> Topic {
        Topic::parse(&fixture("Basic-r4-encounter-complete.json"))
            .unwrap()
            .0
    }

    /// The admission subscription with these filters instead of its own.
    fn with_filters(filters: &[&str]) -> BackportSubscription {
        let mut subscription = admission();
        subscription["_criteria"]["extension"] = filters
            .iter()
            .map(|filter| json!({"url": FILTER_CRITERIA, "valueString": filter}))
            .collect();
        BackportSubscription::parse(&subscription).unwrap().0
    }

    #[test]
    fn the_ig_admission_subscription_parses() {
        let resource = admission();
        assert!(is_backport_subscription(&resource));
        let (subscription, problems) = BackportSubscription::parse(&resource).unwrap();
        assert!(problems.is_empty(), "{problems:#?}");
        assert_eq!(
            subscription.topic_url,
            "http://hl7.org/SubscriptionTopic/admission"
        );
        assert_eq!(subscription.topic_version, None);
        let filters: Vec<&str> = subscription.filters.iter().map(Criteria::source).collect();
        assert_eq!(filters, vec!["Encounter?patient=Patient/123"]);
        assert_eq!(subscription.content, PayloadContent::IdOnly);
        assert_eq!(
            subscription.heartbeat_period,
            Some(Duration::from_secs(86400))
        );
        assert_eq!(subscription.timeout, Some(Duration::from_secs(60)));
        assert_eq!(subscription.max_count, Some(20));
        assert_eq!(subscription.content_type, "application/fhir+json");
    }

    #[test]
    fn the_ig_multi_resource_subscription_parses_and_its_unknown_parameter_is_refused() {
        let (subscription, problems) =
            BackportSubscription::parse(&fixture("Subscription-subscription-multi-resource.json"))
                .unwrap();
        let types: Vec<&str> = subscription
            .filters
            .iter()
            .map(Criteria::resource_type)
            .collect();
        assert_eq!(types, vec!["Patient", "Encounter", "Observation"]);
        // `id` is not a search parameter (`_id` is).
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains("`Patient?id=Patient/123`"),
            "{problems:#?}"
        );
        assert!(
            problems[0].contains("no Patient is notified"),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_custom_channel_type_makes_the_subscription_unusable() {
        let error = BackportSubscription::parse(&fixture("Subscription-subscription-zulip.json"))
            .unwrap_err();
        assert!(error.contains(CHANNEL_TYPE), "{error}");
        assert!(error.contains("zulip"), "{error}");
    }

    #[test]
    fn medplum_criteria_are_not_backport_subscriptions() {
        let medplum = json!({"resourceType": "Subscription", "criteria": "Patient?name=x"});
        assert!(!is_backport_subscription(&medplum));
        assert!(
            BackportSubscription::parse(&medplum)
                .unwrap_err()
                .contains("`Patient?name=x`")
        );
        let by_profile = json!({
            "resourceType": "Subscription",
            "meta": {"profile": [format!("{PROFILE}|1.1.0")]},
            "criteria": "Encounter?status=finished"
        });
        assert!(is_backport_subscription(&by_profile));
        assert!(is_backport_subscription(
            &json!({"criteria": "urn:uuid:1234"})
        ));
    }

    #[test]
    fn unusable_subscriptions_are_errors_naming_the_problem() {
        let mut bad_code = admission();
        bad_code["channel"]["_payload"]["extension"][0]["valueCode"] = json!("everything");
        let error = BackportSubscription::parse(&bad_code).unwrap_err();
        assert!(
            error.contains("`everything`") && error.contains(PAYLOAD_CONTENT),
            "{error}"
        );

        let mut two_codes = admission();
        two_codes["channel"]["_payload"]["extension"]
            .as_array_mut()
            .unwrap()
            .push(json!({"url": PAYLOAD_CONTENT, "valueCode": "full-resource"}));
        let error = BackportSubscription::parse(&two_codes).unwrap_err();
        assert!(error.contains("`id-only` and `full-resource`"), "{error}");

        let mut bad_filter = admission();
        bad_filter["_criteria"]["extension"][0]["valueString"] = json!("patient=Patient/123");
        let error = BackportSubscription::parse(&bad_filter).unwrap_err();
        assert!(error.contains("`patient=Patient/123`"), "{error}");

        let mut no_criteria = admission();
        no_criteria.as_object_mut().unwrap().remove("criteria");
        assert!(
            BackportSubscription::parse(&no_criteria)
                .unwrap_err()
                .contains("no criteria")
        );
    }

    #[test]
    fn problems_that_leave_the_subscription_usable_are_named() {
        let mut subscription = admission();
        subscription["criteria"] = json!("http://hl7.org/SubscriptionTopic/admission|1.2.0");
        let channel = &mut subscription["channel"];
        channel["payload"] = json!("application/fhir+xml");
        channel.as_object_mut().unwrap().remove("_payload");
        channel["extension"][0]["valueUnsignedInt"] = json!(0);
        channel["extension"][1] = json!({"url": TIMEOUT, "valueString": "60"});
        let (parsed, problems) = BackportSubscription::parse(&subscription).unwrap();
        assert_eq!(
            parsed.topic_url,
            "http://hl7.org/SubscriptionTopic/admission"
        );
        assert_eq!(parsed.topic_version.as_deref(), Some("1.2.0"));
        assert_eq!(parsed.content, PayloadContent::IdOnly);
        assert_eq!(parsed.heartbeat_period, None);
        assert_eq!(parsed.timeout, None);
        assert_eq!(parsed.content_type, "application/fhir+xml");
        let has = |needle: &str| problems.iter().any(|problem| problem.contains(needle));
        assert!(has("`application/fhir+xml` is refused"), "{problems:#?}");
        assert!(
            has(&format!("no `{PAYLOAD_CONTENT}` extension")),
            "{problems:#?}"
        );
        assert!(has(&format!("`{HEARTBEAT_PERIOD}` is 0")), "{problems:#?}");
        assert!(
            has(&format!("`{TIMEOUT}` has no valueUnsignedInt")),
            "{problems:#?}"
        );
        assert_eq!(problems.len(), 4, "{problems:#?}");

        let mut version = admission();
        version["channel"]["payload"] = json!("application/fhir+json; fhirVersion=4.3");
        let (_, problems) = BackportSubscription::parse(&version).unwrap();
        assert!(problems[0].contains("FHIR version 4.3"), "{problems:#?}");
        version["channel"]["payload"] = json!("application/json;fhirVersion=4.0");
        assert!(BackportSubscription::parse(&version).unwrap().1.is_empty());

        let mut no_payload = admission();
        no_payload["channel"]
            .as_object_mut()
            .unwrap()
            .remove("payload");
        let (parsed, problems) = BackportSubscription::parse(&no_payload).unwrap();
        assert_eq!(parsed.content_type, DEFAULT_CONTENT_TYPE);
        assert_eq!(
            parsed.content,
            PayloadContent::IdOnly,
            "read from `_payload` alone"
        );
        assert!(
            problems[0].contains("channel.payload is absent"),
            "{problems:#?}"
        );
    }

    #[test]
    fn the_topic_version_must_match_when_the_subscription_names_one() {
        let topic = Topic::parse(&fixture("Basic-r4-encounter-complete.json"))
            .unwrap()
            .0;
        let mut subscription = admission();
        subscription["criteria"] = json!(topic.url);
        assert!(
            BackportSubscription::parse(&subscription)
                .unwrap()
                .0
                .topic_matches(&topic)
        );
        subscription["criteria"] = json!(format!("{}|1.2.0", topic.url));
        assert!(
            BackportSubscription::parse(&subscription)
                .unwrap()
                .0
                .topic_matches(&topic)
        );
        subscription["criteria"] = json!(format!("{}|2.0.0", topic.url));
        assert!(
            !BackportSubscription::parse(&subscription)
                .unwrap()
                .0
                .topic_matches(&topic)
        );
    }

    #[test]
    fn filters_are_checked_against_the_topic_can_filter_by() {
        let topic = encounter_complete();
        // The IG's admission filter uses `patient`; the topic declares `subject` and `_in`.
        let refused = with_filters(&["Encounter?patient=Patient/123"]).check_filters(&topic);
        assert_eq!(refused.len(), 1, "{refused:#?}");
        assert!(
            refused[0].contains("parameter `patient` is not declared"),
            "{refused:#?}"
        );
        assert!(refused[0].contains("`subject`, `_in`"), "{refused:#?}");

        assert!(
            with_filters(&["Encounter?subject=Patient/123"])
                .check_filters(&topic)
                .is_empty()
        );

        let refused = with_filters(&["Observation?subject=Patient/123"]).check_filters(&topic);
        assert!(
            refused[0].contains("does not trigger on Observation"),
            "{refused:#?}"
        );

        let refused = with_filters(&["Encounter?subject:Patient=123"]).check_filters(&topic);
        assert!(refused[0].contains("modifier `:Patient`"), "{refused:#?}");
    }

    #[test]
    fn a_declared_filter_the_matcher_cannot_evaluate_is_refused_and_matches_nothing() {
        // The IG topic declares `_in`, which is no search parameter the matcher evaluates.
        let mut resource = admission();
        resource["_criteria"]["extension"][0]["valueString"] = json!("Encounter?_in=Group/1");
        let (subscription, problems) = BackportSubscription::parse(&resource).unwrap();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].contains("`_in=Group/1`"), "{problems:#?}");
        assert!(subscription.check_filters(&encounter_complete()).is_empty());
        let encounter = json!({"resourceType": "Encounter", "status": "finished"});
        assert!(!subscription.filters_match("Encounter", &encounter).unwrap());
    }

    #[test]
    fn comparators_must_be_declared_and_equality_needs_no_declaration() {
        let mut resource = fixture("Basic-r4-encounter-complete.json");
        resource["extension"].as_array_mut().unwrap().push(json!({
            "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.canFilterBy",
            "extension": [
                {"url": "resource", "valueUri": "Encounter"},
                {"url": "filterParameter", "valueString": "length"},
                {"url": "comparator", "valueCode": "gt"},
                {"url": "comparator", "valueCode": "le"}
            ]
        }));
        let topic = Topic::parse(&resource).unwrap().0;
        let check = |filter: &str| with_filters(&[filter]).check_filters(&topic);
        assert!(check("Encounter?length=gt5").is_empty());
        assert!(check("Encounter?length=5,eq6").is_empty());
        let refused = check("Encounter?length=gt5,lt9");
        assert_eq!(refused.len(), 1, "{refused:#?}");
        assert!(refused[0].contains("comparator `lt`"), "{refused:#?}");
        assert!(refused[0].contains("(allowed: gt, le)"), "{refused:#?}");
    }

    #[test]
    fn a_subscription_with_too_many_filters_cannot_be_used() {
        let filter = |count: usize| {
            let mut subscription = admission();
            subscription["_criteria"]["extension"] = (0..count)
                .map(|n| json!({"url": FILTER_CRITERIA, "valueString": format!("Encounter?subject=Patient/{n}")}))
                .collect();
            BackportSubscription::parse(&subscription)
        };
        assert_eq!(filter(MAX_FILTERS).unwrap().0.filters.len(), MAX_FILTERS);
        let error = filter(MAX_FILTERS + 1).unwrap_err();
        assert!(error.contains("more than 32"), "{error}");
    }

    #[test]
    fn all_filters_about_the_resource_type_must_match() {
        let subscription = with_filters(&[
            "Encounter?subject=Patient/123",
            "Encounter?status=finished",
            "Observation?status=final",
        ]);
        let encounter = |subject: &str, status: &str| {
            json!({
                "resourceType": "Encounter",
                "status": status,
                "subject": {"reference": subject}
            })
        };
        let matches = |resource: &Value| subscription.filters_match("Encounter", resource).unwrap();
        assert!(matches(&encounter("Patient/123", "finished")));
        assert!(!matches(&encounter("Patient/456", "finished")));
        assert!(!matches(&encounter("Patient/123", "planned")));
        let patient = json!({"resourceType": "Patient", "id": "123"});
        assert!(subscription.filters_match("Patient", &patient).unwrap());
        assert!(
            with_filters(&[])
                .filters_match("Encounter", &encounter("x", "y"))
                .unwrap()
        );

        // A refused construct never matches: the subscription receives nothing, not everything.
        let unsupported = with_filters(&["Encounter?subject.name=Bob"]);
        assert!(
            !unsupported
                .filters_match("Encounter", &encounter("Patient/123", "finished"))
                .unwrap()
        );
    }
}
