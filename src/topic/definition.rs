//! Subscription topics in their R4 form (a `Basic` carrying cross-version extensions), and the
//! decision whether a change triggers one.
//!
//! What is read, element by element of R5's `SubscriptionTopic`:
//! - `url`, `version`, `status` (a modifier extension; accepted in `extension` too);
//! - `resourceTrigger`: `resource`, `supportedInteraction`, `queryCriteria` (`previous`,
//!   `resultForCreate`, `current`, `resultForDelete`, `requireBoth`), `fhirPathCriteria`;
//! - `canFilterBy`: `resource`, `filterParameter`, `modifier` and `comparator`.
//!
//! Refused by name ([`Topic::parse`]'s messages): `eventTrigger` (a topic with nothing else cannot
//! be used), `notificationShape.include`, `revInclude` and the IG's `backport-related-query`
//! (notifications carry the focus resource only), `canFilterBy.filterDefinition`, filter
//! parameters the matcher cannot evaluate, criteria constructs it cannot evaluate (that test then
//! never passes), and any other SubscriptionTopic element, `canFilterBy` or `notificationShape`
//! sub-element. The descriptive elements (`name`, `title`, `description`, `date`, `publisher`,
//! ...) change nothing about matching and are not read. An unknown sub-element of a
//! `resourceTrigger` or its `queryCriteria` makes the topic unusable instead: it might narrow the
//! trigger, and ignoring it would notify more than the topic means. Sub-extensions with an
//! absolute URL are ordinary extensions, which FHIR lets a reader ignore.

use std::sync::{Arc, LazyLock};

use serde_json::{Value, json};

use super::{extension_url, sub_extensions};
use crate::capture::Interaction;
use crate::criteria::{Criteria, ParamType, search_params};
use crate::fhirpath::{self, Environment};

/// The two spellings of the cross-version extension URLs of SubscriptionTopic elements; the IG's
/// R4 example uses both in one resource.
const ELEMENT_PREFIXES: [&str; 2] = [
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.",
    "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.",
];

/// The code system of `Basic.code` that marks a Basic as a wrapped SubscriptionTopic.
pub const FHIR_TYPES_SYSTEM: &str = "http://hl7.org/fhir/fhir-types";

/// The IG's extension for queries related to a notification (on `notificationShape`).
pub const RELATED_QUERY_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-related-query";

/// `resourceTrigger.resource` may be a core StructureDefinition URL instead of a type name.
const CORE_STRUCTURE_DEFINITION: &str = "http://hl7.org/fhir/StructureDefinition/";

/// SubscriptionTopic elements that describe the topic without changing what it matches.
const DESCRIPTIVE_ELEMENTS: &[&str] = &[
    "identifier",
    "versionAlgorithm",
    "versionAlgorithm[x]",
    "name",
    "title",
    "derivedFrom",
    "experimental",
    "date",
    "publisher",
    "contact",
    "description",
    "useContext",
    "jurisdiction",
    "purpose",
    "copyright",
    "copyrightLabel",
    "approvalDate",
    "lastReviewDate",
    "effectivePeriod",
];

/// Publication status codes (`SubscriptionTopic.status`).
const STATUS_CODES: [&str; 4] = ["draft", "active", "retired", "unknown"];

/// `%previous` / `%current` when that state does not exist: FHIRPath sees an empty collection.
static EMPTY_OBJECT: LazyLock<Value> = LazyLock::new(|| json!({}));

/// Most `resourceTrigger`s a topic may have. The dispatcher evaluates a topic's triggers for
/// every change of their types, each with query criteria of up to 256 parameters: the cap bounds
/// that work (topics in use have a handful), and a topic with more cannot be used.
pub const MAX_RESOURCE_TRIGGERS: usize = 32;

/// Whether `resource` is a `Basic` wrapping a SubscriptionTopic (its `code.coding` has
/// `http://hl7.org/fhir/fhir-types|SubscriptionTopic`).
pub fn is_topic_resource(resource: &Value) -> bool {
    resource.get("resourceType").and_then(Value::as_str) == Some("Basic")
        && resource
            .pointer("/code/coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|coding| {
                coding.get("system").and_then(Value::as_str) == Some(FHIR_TYPES_SYSTEM)
                    && coding.get("code").and_then(Value::as_str) == Some("SubscriptionTopic")
            })
}

/// The canonical URL of a wrapped topic: the `valueUri` of its `SubscriptionTopic.url` extension
/// (either spelling). Does not check that `resource` is a topic.
pub fn topic_url(resource: &Value) -> Option<&str> {
    topic_elements(resource)
        .filter(|(name, _, _)| *name == Some("url"))
        .find_map(|(_, extension, _)| extension.get("valueUri").and_then(Value::as_str))
}

/// The top-level extensions and modifier extensions of a Basic, each with its SubscriptionTopic
/// element name (`None` when it is not a SubscriptionTopic extension) and whether it is a
/// modifier extension.
fn topic_elements(resource: &Value) -> impl Iterator<Item = (Option<&str>, &Value, bool)> {
    let of = |member: &'static str, modifier: bool| {
        resource
            .get(member)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(move |extension| (element_name(extension_url(extension)), extension, modifier))
    };
    of("modifierExtension", true).chain(of("extension", false))
}

fn element_name(url: &str) -> Option<&str> {
    ELEMENT_PREFIXES
        .iter()
        .find_map(|prefix| url.strip_prefix(prefix))
}

/// A subscription topic: the changes worth a notification, and what subscribers may filter on.
#[derive(Debug, Clone)]
pub struct Topic {
    /// The canonical URL subscriptions name in `Subscription.criteria`.
    pub url: String,
    /// The business version, if given.
    pub version: Option<String>,
    /// `draft`, `active`, `retired` or `unknown` (`unknown` when absent). Not looked at by
    /// [`Topic::evaluate`]: whether a retired topic still notifies is the caller's policy.
    pub status: String,
    /// The resource triggers, in document order.
    pub triggers: Vec<ResourceTrigger>,
    /// The filters subscribers may use (`canFilterBy`), in document order, the refused ones
    /// included (filters on them are refused by the matcher when the subscription is read).
    pub can_filter_by: Vec<FilterDefinition>,
}

/// One `resourceTrigger`: a resource type, the interactions on it, and the tests a change must
/// pass. All present tests must pass.
#[derive(Debug, Clone)]
pub struct ResourceTrigger {
    /// The resource type (`Encounter`, also when written
    /// `http://hl7.org/fhir/StructureDefinition/Encounter`).
    pub resource_type: String,
    /// The interactions that can trigger (`supportedInteraction`); all three when absent, as R5
    /// says.
    pub interactions: Vec<Interaction>,
    /// Search criteria on the states before and after the change.
    pub query: Option<QueryCriteria>,
    /// `fhirPathCriteria`: must give a single `true`, with `%previous` and `%current`.
    pub fhirpath: Option<Arc<fhirpath::Expression>>,
}

/// `resourceTrigger.queryCriteria`: search criteria on the previous and the current state.
#[derive(Debug, Clone)]
pub struct QueryCriteria {
    /// Tested on the state before the change.
    pub previous: Option<Criteria>,
    /// Tested on the state after the change.
    pub current: Option<Criteria>,
    /// The result of the `previous` test when there is no previous state (a create).
    pub result_for_create: TestResult,
    /// The result of the `current` test when there is no current state (a delete).
    pub result_for_delete: TestResult,
    /// Both tests must pass (`true`), or either (`false`, also when absent, as R5 says). Only
    /// matters when both are present.
    pub require_both: bool,
}

/// What a query test gives when the state it tests does not exist (`CriteriaNotExistsBehavior`).
///
/// When a topic does not say, the test fails. R5 gives no default: its definitions of
/// `SubscriptionTopic.resourceTrigger.queryCriteria.resultForCreate` and `resultForDelete` leave
/// the behaviour without them to the server, and the IG adds nothing. Failing is what a search
/// over a state that does not exist finds (nothing), and never sends a notification the topic did
/// not ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestResult {
    /// `test-passes`.
    Passes,
    /// `test-fails` (also when absent).
    Fails,
}

impl TestResult {
    /// The FHIR code: `test-passes` or `test-fails`.
    pub fn as_str(self) -> &'static str {
        match self {
            TestResult::Passes => "test-passes",
            TestResult::Fails => "test-fails",
        }
    }

    fn parse(code: &str) -> Option<TestResult> {
        match code {
            "test-passes" => Some(TestResult::Passes),
            "test-fails" => Some(TestResult::Fails),
            _ => None,
        }
    }

    fn passed(self) -> bool {
        self == TestResult::Passes
    }
}

/// One `canFilterBy`: a search parameter subscribers may filter on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterDefinition {
    /// The resource type it applies to; `None`: every type the topic triggers on.
    pub resource_type: Option<String>,
    /// The search parameter code (`subject`).
    pub parameter: String,
    /// The allowed modifiers and comparators: R5's `modifier` (`:exact`, `:not`, ...) and
    /// `comparator` (value prefixes `gt`, `le`, ...), R4B's `modifier` (which holds both kinds).
    /// Equality needs no declaration.
    pub modifiers: Vec<String>,
}

/// A trigger could not be evaluated on a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TriggerError {
    /// What failed, naming the trigger and the criteria or expression.
    pub message: String,
    /// The evaluation ran out of its FHIRPath budget (work or memory): the caller should stop
    /// evaluating this topic or subscription version rather than pay the budget per change.
    pub budget_exhausted: bool,
}

impl TriggerError {
    pub(super) fn from_criteria(
        context: &str,
        criteria: &Criteria,
        error: &crate::criteria::CriteriaError,
    ) -> TriggerError {
        TriggerError {
            message: format!("{context} `{criteria}`: {error}"),
            budget_exhausted: error.is_budget_exhausted(),
        }
    }
}

impl Topic {
    /// Reads a Basic-wrapped topic. `Err`: it cannot be used at all (not a topic, no url, no
    /// resource trigger, a trigger whose resource, interaction, criteria or FHIRPath cannot be
    /// read or that has an element we do not know, an unknown modifier extension), naming the
    /// problem. `Ok` carries, beside the topic,
    /// the parts that are refused (see the module documentation), one message each, naming the
    /// element: the caller records them; none of them widens what the topic matches.
    pub fn parse(resource: &Value) -> Result<(Topic, Vec<String>), String> {
        if !is_topic_resource(resource) {
            return Err(format!(
                "not a SubscriptionTopic: a topic is a Basic with code `{FHIR_TYPES_SYSTEM}|SubscriptionTopic`"
            ));
        }
        let mut refused = Vec::new();
        let mut url = None;
        let mut version = None;
        let mut status = None;
        let mut triggers = Vec::new();
        let mut event_triggers = 0;
        let mut filter_elements = Vec::new();
        let mut shapes = Vec::new();
        for (name, extension, modifier) in topic_elements(resource) {
            let Some(name) = name else {
                if modifier {
                    // FHIR: a modifier extension that is not understood forbids using the resource.
                    return Err(format!(
                        "modifierExtension `{}` is not understood, so the topic cannot be used",
                        extension_url(extension)
                    ));
                }
                continue;
            };
            match name {
                "url" => set_once(&mut url, "url", primitive(extension, "valueUri", "url")?)?,
                "version" => set_once(
                    &mut version,
                    "version",
                    primitive(extension, "valueString", "version")?,
                )?,
                "status" => set_once(
                    &mut status,
                    "status",
                    primitive(extension, "valueCode", "status")?,
                )?,
                "resourceTrigger" if triggers.len() == MAX_RESOURCE_TRIGGERS => {
                    return Err(format!(
                        "the topic has more than {MAX_RESOURCE_TRIGGERS} resourceTrigger; no more are evaluated, so it cannot be used"
                    ));
                }
                "resourceTrigger" => {
                    triggers.push(parse_trigger(extension, triggers.len(), &mut refused)?)
                }
                "eventTrigger" => event_triggers += 1,
                "canFilterBy" => filter_elements.push(extension),
                "notificationShape" => shapes.push(extension),
                name if DESCRIPTIVE_ELEMENTS.contains(&name) => {}
                other if modifier => {
                    return Err(format!(
                        "modifierExtension `{}`: `{other}` is not a SubscriptionTopic element this server understands, so the topic cannot be used",
                        extension_url(extension)
                    ));
                }
                other => refused.push(format!(
                    "extension `{}`: SubscriptionTopic element `{other}` is not supported; refused",
                    extension_url(extension)
                )),
            }
        }
        let url = url.ok_or_else(|| {
            format!(
                "the topic has no url (extension `{}url` with a valueUri)",
                ELEMENT_PREFIXES[0]
            )
        })?;
        if event_triggers > 0 {
            if triggers.is_empty() {
                return Err(format!(
                    "topic `{url}` has only eventTrigger ({event_triggers}); only resourceTrigger is supported"
                ));
            }
            refused.push(format!(
                "eventTrigger ({event_triggers}) is not supported (only resourceTrigger is): the events it describes are never notified"
            ));
        }
        if triggers.is_empty() {
            return Err(format!("topic `{url}` has no resourceTrigger"));
        }
        let status = status.unwrap_or_else(|| "unknown".to_owned());
        if !STATUS_CODES.contains(&status.as_str()) {
            return Err(format!(
                "topic `{url}`: status `{status}` is not one of {}",
                STATUS_CODES.join(", ")
            ));
        }
        let trigger_types: Vec<&str> = triggers
            .iter()
            .map(|trigger| trigger.resource_type.as_str())
            .collect();
        let mut can_filter_by = Vec::new();
        for (index, element) in filter_elements.into_iter().enumerate() {
            if let Some(definition) =
                parse_filter_definition(element, index, &trigger_types, &mut refused)
            {
                can_filter_by.push(definition);
            }
        }
        for (index, shape) in shapes.into_iter().enumerate() {
            refuse_shape(shape, index, &mut refused);
        }
        Ok((
            Topic {
                url,
                version,
                status,
                triggers,
                can_filter_by,
            },
            refused,
        ))
    }

    /// The resource types the topic triggers on, in trigger order (a type with several triggers
    /// appears once per trigger).
    pub fn resource_types(&self) -> impl Iterator<Item = &str> {
        self.triggers
            .iter()
            .map(|trigger| trigger.resource_type.as_str())
    }

    /// Whether deciding if a change of `resource_type` triggers the topic looks at the change's
    /// contents: some trigger for that type has query criteria or FHIRPath criteria. A trigger of
    /// interactions alone is decided on the change's type and interaction.
    pub fn reads_content(&self, resource_type: &str) -> bool {
        self.triggers
            .iter()
            .filter(|trigger| trigger.resource_type == resource_type)
            .any(|trigger| trigger.query.is_some() || trigger.fhirpath.is_some())
    }

    /// Whether a change triggers the topic: true when any trigger for `resource_type` fires (see
    /// [`ResourceTrigger::fires`]). `current` is the state after the change (`None` for a
    /// delete), `previous` the state before it (`None` for a create, and for an update that
    /// created or restored the resource). The first trigger that cannot be evaluated ends the
    /// evaluation with its error, so a budget exhaustion is never hidden by another trigger.
    ///
    /// The triggers' FHIRPath criteria share one budget, the default [`fhirpath::Limits`]: a
    /// topic costs a change no more than one subscription's FHIRPath criteria does, however its
    /// work is spread over triggers.
    pub fn evaluate(
        &self,
        resource_type: &str,
        interaction: Interaction,
        current: Option<&Value>,
        previous: Option<&Value>,
    ) -> Result<bool, TriggerError> {
        let mut budget = fhirpath::Limits::default();
        for trigger in self
            .triggers
            .iter()
            .filter(|trigger| trigger.resource_type == resource_type)
        {
            let (fired, spent) = trigger.fires_within(interaction, current, previous, budget);
            if fired? {
                return Ok(true);
            }
            budget.max_steps = budget.max_steps.saturating_sub(spent.steps);
            budget.max_bytes = budget.max_bytes.saturating_sub(spent.bytes);
        }
        Ok(false)
    }
}

impl ResourceTrigger {
    /// Whether this trigger fires for a change of its resource type: the interaction is supported,
    /// the query criteria pass ([`QueryCriteria::passes`]) and the FHIRPath criteria give a
    /// single `true`, evaluated on the current state (the previous one for a delete) with
    /// `%current` and `%previous` bound (to `{}`, an empty collection, for a state that does not
    /// exist).
    pub fn fires(
        &self,
        interaction: Interaction,
        current: Option<&Value>,
        previous: Option<&Value>,
    ) -> Result<bool, TriggerError> {
        self.fires_within(interaction, current, previous, fhirpath::Limits::default())
            .0
    }

    /// [`ResourceTrigger::fires`] with the FHIRPath criteria run under `limits`, and what they
    /// spent of them.
    fn fires_within(
        &self,
        interaction: Interaction,
        current: Option<&Value>,
        previous: Option<&Value>,
        limits: fhirpath::Limits,
    ) -> (Result<bool, TriggerError>, fhirpath::Spent) {
        let nothing = fhirpath::Spent::default();
        if !self.interactions.contains(&interaction) {
            return (Ok(false), nothing);
        }
        if let Some(query) = &self.query {
            match query.passes(&self.resource_type, current, previous) {
                Ok(true) => {}
                other => return (other, nothing),
            }
        }
        let Some(expression) = &self.fhirpath else {
            return (Ok(true), nothing);
        };
        let current_var = current.unwrap_or(&EMPTY_OBJECT);
        let previous_var = previous.unwrap_or(&EMPTY_OBJECT);
        let focus = current.or(previous).unwrap_or(&EMPTY_OBJECT);
        let environment = Environment::new()
            .with_variable("current", current_var)
            .with_variable("previous", previous_var)
            .with_limits(limits);
        // Only a single `true` passes, as for Medplum FHIRPath criteria (dispatch::matching): a
        // collection such as `[true, false]` is ambiguous, so it is refused rather than guessed.
        let (result, spent) = expression.evaluate_measured(focus, &environment);
        let fired = match result {
            Ok(items) => Ok(items.len() == 1 && items[0].as_bool() == Some(true)),
            Err(error) => Err(TriggerError {
                message: format!(
                    "resourceTrigger ({}) fhirPathCriteria `{}`: {error}",
                    self.resource_type,
                    expression.source()
                ),
                budget_exhausted: error.is_budget_exhausted(),
            }),
        };
        (fired, spent)
    }
}

impl QueryCriteria {
    /// Whether the query criteria pass for a change. Each present test is evaluated on its state;
    /// a state that does not exist gives `result_for_create` (previous) or `result_for_delete`
    /// (current) instead. With both tests present, `require_both` decides between "both" and
    /// "either"; with one, it decides; with none, they pass. `resource_type` names the trigger in
    /// errors.
    pub fn passes(
        &self,
        resource_type: &str,
        current: Option<&Value>,
        previous: Option<&Value>,
    ) -> Result<bool, TriggerError> {
        let test = |criteria: &Criteria,
                    state: Option<&Value>,
                    missing: TestResult,
                    element: &str|
         -> Result<bool, TriggerError> {
            match state {
                None => Ok(missing.passed()),
                Some(state) => criteria.matches(state).map_err(|error| {
                    TriggerError::from_criteria(
                        &format!("resourceTrigger ({resource_type}) queryCriteria.{element}"),
                        criteria,
                        &error,
                    )
                }),
            }
        };
        let previous_passes = self
            .previous
            .as_ref()
            .map(|criteria| test(criteria, previous, self.result_for_create, "previous"))
            .transpose()?;
        // Evaluated even when the previous test already decided: its errors (a budget) must show.
        let current_passes = self
            .current
            .as_ref()
            .map(|criteria| test(criteria, current, self.result_for_delete, "current"))
            .transpose()?;
        Ok(match (previous_passes, current_passes) {
            (Some(previous), Some(current)) if self.require_both => previous && current,
            (Some(previous), Some(current)) => previous || current,
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => true,
        })
    }
}

/// The `value<type>` of an extension as a string, or an error naming the element.
fn primitive<'a>(extension: &'a Value, member: &str, element: &str) -> Result<&'a str, String> {
    extension
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "`{element}` (extension `{}`) has no {member}",
                extension_url(extension)
            )
        })
}

/// Records a single-valued element; the same value twice is harmless, two different ones are
/// ambiguous.
fn set_once(slot: &mut Option<String>, element: &str, value: &str) -> Result<(), String> {
    match slot {
        Some(existing) if existing != value => Err(format!(
            "the topic has two different `{element}`s: `{existing}` and `{value}`"
        )),
        Some(_) => Ok(()),
        None => {
            *slot = Some(value.to_owned());
            Ok(())
        }
    }
}

/// The resource type a `resource` uri names: a FHIR R4 resource type (as the criteria parser knows
/// them), bare or as its core StructureDefinition URL.
fn resource_type_of(uri: &str) -> Option<&str> {
    let name = uri.strip_prefix(CORE_STRUCTURE_DEFINITION).unwrap_or(uri);
    Criteria::parse(name)
        .is_ok_and(|criteria| criteria.resource_type() == name)
        .then_some(name)
}

/// Whether a sub-extension URL is an extension of its own (absolute) rather than the name of a
/// sub-element of the cross-version extension.
fn is_own_extension(url: &str) -> bool {
    url.contains(':')
}

fn parse_trigger(
    extension: &Value,
    index: usize,
    refused: &mut Vec<String>,
) -> Result<ResourceTrigger, String> {
    let label = format!("resourceTrigger[{index}]");
    let mut resource = None;
    let mut interactions = Vec::new();
    let mut query_element = None;
    let mut fhirpath_source = None;
    for sub in sub_extensions(extension) {
        let name = extension_url(sub);
        let element = format!("{label}.{name}");
        match name {
            "description" => {}
            "resource" => {
                let uri = primitive(sub, "valueUri", &element)?;
                set_once(&mut resource, &element, uri)?;
            }
            "supportedInteraction" => {
                let code = primitive(sub, "valueCode", &element)?;
                let interaction = Interaction::parse(code)
                    .ok_or_else(|| format!("{element} `{code}` is not create, update or delete"))?;
                if !interactions.contains(&interaction) {
                    interactions.push(interaction);
                }
            }
            "queryCriteria" => {
                if query_element.replace(sub).is_some() {
                    return Err(format!("{label} has two queryCriteria"));
                }
            }
            "fhirPathCriteria" => {
                let source = primitive(sub, "valueString", &element)?;
                if fhirpath_source.replace(source).is_some() {
                    return Err(format!("{label} has two fhirPathCriteria"));
                }
            }
            // Ordinary extensions on the element change nothing (they are not modifiers).
            other if is_own_extension(other) => {}
            // An element we do not know could narrow the trigger: ignoring it would notify more
            // than the topic means.
            other => {
                return Err(format!(
                    "{label}: `{other}` is not a resourceTrigger element this server understands"
                ));
            }
        }
    }
    let resource = resource.ok_or_else(|| format!("{label} has no resource"))?;
    let resource_type = resource_type_of(&resource).ok_or_else(|| {
        format!(
            "{label}.resource `{resource}` is neither a FHIR R4 resource type nor `{CORE_STRUCTURE_DEFINITION}<type>`"
        )
    })?;
    let label = format!("resourceTrigger[{index}] ({resource_type})");
    if interactions.is_empty() {
        interactions = Interaction::ALL.to_vec();
    }
    let query = query_element
        .map(|element| parse_query(element, resource_type, &label, refused))
        .transpose()?;
    let fhirpath = fhirpath_source
        .map(|source| {
            fhirpath::compile(source)
                .map_err(|error| format!("{label}.fhirPathCriteria `{source}`: {error}"))
        })
        .transpose()?;
    Ok(ResourceTrigger {
        resource_type: resource_type.to_owned(),
        interactions,
        query,
        fhirpath,
    })
}

fn parse_query(
    element: &Value,
    resource_type: &str,
    label: &str,
    refused: &mut Vec<String>,
) -> Result<QueryCriteria, String> {
    let mut query = QueryCriteria {
        previous: None,
        current: None,
        result_for_create: TestResult::Fails,
        result_for_delete: TestResult::Fails,
        require_both: false,
    };
    for sub in sub_extensions(element) {
        let name = extension_url(sub);
        let element_label = format!("{label}.queryCriteria.{name}");
        match name {
            "previous" | "current" => {
                let text = primitive(sub, "valueString", &element_label)?;
                let criteria = topic_criteria(resource_type, text, &element_label)?;
                refused.extend(criteria.unsupported().map(|unsupported| {
                    format!(
                        "{element_label} `{text}`: {unsupported}; this test never passes on an existing state"
                    )
                }));
                let slot = if name == "previous" {
                    &mut query.previous
                } else {
                    &mut query.current
                };
                if slot.replace(criteria).is_some() {
                    return Err(format!("{label}.queryCriteria has two `{name}`"));
                }
            }
            "resultForCreate" | "resultForDelete" => {
                let code = primitive(sub, "valueCode", &element_label)?;
                let result = TestResult::parse(code).ok_or_else(|| {
                    format!("{element_label} `{code}` is not test-passes or test-fails")
                })?;
                if name == "resultForCreate" {
                    query.result_for_create = result;
                } else {
                    query.result_for_delete = result;
                }
            }
            "requireBoth" => {
                query.require_both = sub
                    .get("valueBoolean")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| format!("{element_label} has no valueBoolean"))?;
            }
            other if is_own_extension(other) => {}
            other => {
                return Err(format!(
                    "{label}.queryCriteria: `{other}` is not a queryCriteria element this server understands"
                ));
            }
        }
    }
    Ok(query)
}

/// Parses a topic's query criteria. Topics write them without the resource type
/// (`status:not=finished`); a leading `?` and the full `Encounter?status=finished` are accepted
/// too.
fn topic_criteria(resource_type: &str, text: &str, label: &str) -> Result<Criteria, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("{label} is empty"));
    }
    let full = match trimmed.strip_prefix('?') {
        Some(query) => format!("{resource_type}?{query}"),
        None => match trimmed.split_once('?') {
            Some((head, _))
                if !head.is_empty() && head.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                trimmed.to_owned()
            }
            _ => format!("{resource_type}?{trimmed}"),
        },
    };
    let criteria = Criteria::parse(&full).map_err(|error| format!("{label} `{text}`: {error}"))?;
    if criteria.resource_type() != resource_type {
        return Err(format!(
            "{label} `{text}` is about {}, but the trigger is about {resource_type}",
            criteria.resource_type()
        ));
    }
    Ok(criteria)
}

/// Whether the matcher can evaluate a filter on `parameter` for `resource_type`.
pub(super) fn filterable(resource_type: &str, parameter: &str) -> bool {
    search_params::lookup(resource_type, parameter).is_some_and(|param| {
        param.expression.is_some()
            && !matches!(param.kind, ParamType::Composite | ParamType::Special)
    })
}

fn parse_filter_definition(
    element: &Value,
    index: usize,
    trigger_types: &[&str],
    refused: &mut Vec<String>,
) -> Option<FilterDefinition> {
    let label = format!("canFilterBy[{index}]");
    let mut resource = None;
    let mut parameter = None;
    let mut modifiers = Vec::new();
    let mut definition_url = None;
    for sub in sub_extensions(element) {
        let name = extension_url(sub);
        match name {
            "description" => {}
            "resource" => resource = sub.get("valueUri").and_then(Value::as_str),
            "filterParameter" => parameter = sub.get("valueString").and_then(Value::as_str),
            "filterDefinition" => definition_url = sub.get("valueUri").and_then(Value::as_str),
            "modifier" | "comparator" => match sub.get("valueCode").and_then(Value::as_str) {
                Some(code) => modifiers.push(code.to_owned()),
                None => refused.push(format!("{label}.{name} has no valueCode; refused")),
            },
            other if is_own_extension(other) => {}
            other => refused.push(format!(
                "{label}: `{other}` is not a canFilterBy element this server supports; refused"
            )),
        }
    }
    let Some(parameter) = parameter.filter(|parameter| !parameter.trim().is_empty()) else {
        refused.push(format!(
            "{label} has no filterParameter (valueString); the definition is refused"
        ));
        return None;
    };
    let resource_type = match resource {
        None => None,
        Some(uri) => match resource_type_of(uri) {
            Some(resource_type) => Some(resource_type.to_owned()),
            None => {
                refused.push(format!(
                    "{label} `{parameter}`: resource `{uri}` is not a FHIR R4 resource type; the definition is refused"
                ));
                return None;
            }
        },
    };
    let label = match &resource_type {
        Some(resource_type) => format!("canFilterBy `{parameter}` ({resource_type})"),
        None => format!("canFilterBy `{parameter}`"),
    };
    if let Some(url) = definition_url {
        refused.push(format!(
            "{label}: filterDefinition `{url}` is not read; the parameter is evaluated as the FHIR R4 search parameter `{parameter}`"
        ));
    }
    let types: Vec<&str> = match &resource_type {
        Some(resource_type) => vec![resource_type.as_str()],
        None => trigger_types.to_vec(),
    };
    let mut unfilterable: Vec<&str> = types
        .into_iter()
        .filter(|resource_type| !filterable(resource_type, parameter))
        .collect();
    unfilterable.dedup();
    if !unfilterable.is_empty() {
        refused.push(format!(
            "{label}: `{parameter}` is not a search parameter this server can filter {} on; subscription filters using it are refused",
            unfilterable.join(", ")
        ));
    }
    Some(FilterDefinition {
        resource_type,
        parameter: parameter.to_owned(),
        modifiers,
    })
}

fn refuse_shape(shape: &Value, index: usize, refused: &mut Vec<String>) {
    let resource = sub_extensions(shape)
        .find(|sub| extension_url(sub) == "resource")
        .and_then(|sub| sub.get("valueUri").and_then(Value::as_str))
        .map(|uri| resource_type_of(uri).unwrap_or(uri));
    let label = match resource {
        Some(resource) => format!("notificationShape[{index}] ({resource})"),
        None => format!("notificationShape[{index}]"),
    };
    let mut includes = Vec::new();
    let mut rev_includes = Vec::new();
    let mut related_queries = 0;
    for sub in sub_extensions(shape) {
        let value = sub.get("valueString").and_then(Value::as_str).unwrap_or("");
        match extension_url(sub) {
            "resource" => {}
            "include" => includes.push(value),
            "revInclude" => rev_includes.push(value),
            RELATED_QUERY_EXTENSION => related_queries += 1,
            other if is_own_extension(other) => {}
            other => refused.push(format!(
                "{label}: `{other}` is not a notificationShape element this server supports; refused"
            )),
        }
    }
    let quoted = |values: &[&str]| {
        values
            .iter()
            .map(|value| format!("`{value}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !includes.is_empty() {
        refused.push(format!(
            "{label}.include {} refused: notifications carry the focus resource only, no included resources",
            quoted(&includes)
        ));
    }
    if !rev_includes.is_empty() {
        refused.push(format!(
            "{label}.revInclude {} refused: notifications carry the focus resource only, no included resources",
            quoted(&rev_includes)
        ));
    }
    if related_queries > 0 {
        refused.push(format!(
            "{label}: relatedQuery (extension `{RELATED_QUERY_EXTENSION}`, {related_queries}) refused: notifications carry no related-query part"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::fixture;

    const R5: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";

    fn encounter_complete() -> (Topic, Vec<String>) {
        Topic::parse(&fixture("Basic-r4-encounter-complete.json")).expect("the IG topic parses")
    }

    /// A topic with one resource trigger made of these sub-extensions.
    fn topic_with(trigger: Value) -> Value {
        json!({
            "resourceType": "Basic",
            "code": {"coding": [{"system": FHIR_TYPES_SYSTEM, "code": "SubscriptionTopic"}]},
            "extension": [
                {"url": format!("{R5}url"), "valueUri": "http://example.org/topic"},
                {"url": format!("{R5}resourceTrigger"), "extension": trigger}
            ]
        })
    }

    fn encounter(status: &str) -> Value {
        json!({"resourceType": "Encounter", "id": "e1", "status": status})
    }

    #[test]
    fn the_ig_topic_parses_with_its_refused_parts_named() {
        let resource = fixture("Basic-r4-encounter-complete.json");
        assert!(is_topic_resource(&resource));
        assert_eq!(
            topic_url(&resource),
            Some(
                "http://hl7.org/fhir/uv/subscriptions-backport/SubscriptionTopic/r4-encounter-complete"
            )
        );
        let (topic, refused) = encounter_complete();
        assert_eq!(topic.url, topic_url(&resource).unwrap());
        assert_eq!(topic.version.as_deref(), Some("1.2.0"));
        assert_eq!(topic.status, "draft");
        assert_eq!(topic.triggers.len(), 1);
        let trigger = &topic.triggers[0];
        assert_eq!(trigger.resource_type, "Encounter");
        assert_eq!(
            trigger.interactions,
            vec![Interaction::Create, Interaction::Update]
        );
        let query = trigger.query.as_ref().expect("queryCriteria");
        assert_eq!(
            query.previous.as_ref().map(Criteria::source),
            Some("Encounter?status:not=finished")
        );
        assert_eq!(
            query.current.as_ref().map(Criteria::source),
            Some("Encounter?status=finished")
        );
        assert_eq!(query.result_for_create, TestResult::Passes);
        assert_eq!(query.result_for_delete, TestResult::Fails);
        assert!(query.require_both);
        assert_eq!(
            trigger
                .fhirpath
                .as_ref()
                .map(|expression| expression.source()),
            Some(
                "(%previous.id.empty() or (%previous.status != 'finished')) and (%current.status = 'finished')"
            )
        );
        let filters: Vec<(&str, Option<&str>)> = topic
            .can_filter_by
            .iter()
            .map(|definition| {
                (
                    definition.parameter.as_str(),
                    definition.resource_type.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            filters,
            vec![("subject", Some("Encounter")), ("_in", Some("Encounter"))]
        );

        let has = |needle: &str| refused.iter().any(|message| message.contains(needle));
        assert!(
            has("include `Encounter:patient&iterate=Patient.link`"),
            "{refused:#?}"
        );
        assert!(has("`Encounter:location`"), "{refused:#?}");
        assert!(has("revInclude `Encounter:subject`"), "{refused:#?}");
        assert!(has("relatedQuery"), "{refused:#?}");
        assert!(has("canFilterBy `_in` (Encounter)"), "{refused:#?}");
        assert!(
            !has("canFilterBy `subject`"),
            "`subject` is filterable: {refused:#?}"
        );
        assert_eq!(refused.len(), 4, "{refused:#?}");
    }

    #[test]
    fn the_encounter_complete_trigger_fires_when_an_encounter_becomes_finished() {
        let (topic, _) = encounter_complete();
        let evaluate = |interaction, current: Option<&Value>, previous: Option<&Value>| {
            topic
                .evaluate("Encounter", interaction, current, previous)
                .unwrap()
        };
        let (planned, finished) = (encounter("planned"), encounter("finished"));
        assert!(evaluate(Interaction::Create, Some(&finished), None));
        assert!(!evaluate(Interaction::Create, Some(&planned), None));
        assert!(evaluate(
            Interaction::Update,
            Some(&finished),
            Some(&planned)
        ));
        // requireBoth: the previous test (`status:not=finished`) fails.
        assert!(!evaluate(
            Interaction::Update,
            Some(&finished),
            Some(&finished)
        ));
        assert!(!evaluate(
            Interaction::Update,
            Some(&planned),
            Some(&finished)
        ));
        // Not a supported interaction, and resultForDelete is test-fails anyway.
        assert!(!evaluate(Interaction::Delete, None, Some(&finished)));
        let patient = json!({"resourceType": "Patient", "id": "p1"});
        assert!(
            !topic
                .evaluate("Patient", Interaction::Create, Some(&patient), None)
                .unwrap()
        );
    }

    #[test]
    fn both_spellings_and_status_outside_modifier_extensions_are_read() {
        let mut resource = fixture("Basic-r4-encounter-complete.json");
        let status = resource["modifierExtension"]
            .as_array_mut()
            .unwrap()
            .remove(0);
        let mut status_4_3 = status.clone();
        status_4_3["url"] =
            json!("http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.status");
        status_4_3["valueCode"] = json!("active");
        resource["extension"]
            .as_array_mut()
            .unwrap()
            .push(status_4_3);
        let (topic, _) = Topic::parse(&resource).unwrap();
        assert_eq!(topic.status, "active");

        resource["extension"].as_array_mut().unwrap().pop();
        let (topic, _) = Topic::parse(&resource).unwrap();
        assert_eq!(topic.status, "unknown", "absent status");
    }

    #[test]
    fn unusable_topics_are_errors_naming_the_problem() {
        let error = |resource: &Value| Topic::parse(resource).unwrap_err();
        let resource = fixture("Basic-r4-encounter-complete.json");

        let mut other = resource.clone();
        other["code"]["coding"][0]["code"] = json!("Subscription");
        assert!(error(&other).contains("not a SubscriptionTopic"));

        let mut no_url = resource.clone();
        no_url["extension"].as_array_mut().unwrap().remove(0);
        assert!(error(&no_url).contains("has no url"), "{}", error(&no_url));

        let mut unknown_modifier = resource.clone();
        unknown_modifier["modifierExtension"]
            .as_array_mut()
            .unwrap()
            .push(json!({"url": "http://example.org/do-not-notify", "valueBoolean": true}));
        assert!(error(&unknown_modifier).contains("http://example.org/do-not-notify"));

        let mut bad_status = resource.clone();
        bad_status["modifierExtension"][0]["valueCode"] = json!("final");
        assert!(error(&bad_status).contains("status `final`"));

        let only_events = json!({
            "resourceType": "Basic",
            "code": {"coding": [{"system": FHIR_TYPES_SYSTEM, "code": "SubscriptionTopic"}]},
            "extension": [
                {"url": format!("{R5}url"), "valueUri": "http://example.org/topic"},
                {"url": format!("{R5}eventTrigger"), "extension": [
                    {"url": "event", "valueCodeableConcept": {"text": "admission"}},
                    {"url": "resource", "valueUri": "Encounter"}
                ]}
            ]
        });
        assert!(
            error(&only_events).contains("only eventTrigger"),
            "{}",
            error(&only_events)
        );

        let profile = topic_with(json!([
            {"url": "resource", "valueUri": "http://example.org/StructureDefinition/MyEncounter"}
        ]));
        assert!(
            error(&profile).contains("MyEncounter"),
            "{}",
            error(&profile)
        );

        let interaction = topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "supportedInteraction", "valueCode": "patch"}
        ]));
        assert!(error(&interaction).contains("`patch`"));

        let criteria = topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "queryCriteria", "extension": [
                {"url": "current", "valueString": "date=not-a-date"}
            ]}
        ]));
        let message = error(&criteria);
        assert!(
            message.contains("queryCriteria.current `date=not-a-date`"),
            "{message}"
        );

        let other_type = topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "queryCriteria", "extension": [
                {"url": "current", "valueString": "Patient?active=true"}
            ]}
        ]));
        assert!(
            error(&other_type).contains("is about Patient"),
            "{}",
            error(&other_type)
        );

        let unknown = topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "onlyOnWeekdays", "valueBoolean": true}
        ]));
        assert!(
            error(&unknown).contains("`onlyOnWeekdays`"),
            "{}",
            error(&unknown)
        );
        let ordinary = topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "http://example.org/author-note", "valueString": "ignorable"}
        ]));
        assert!(Topic::parse(&ordinary).is_ok());

        let fhirpath = topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "fhirPathCriteria", "valueString": "%current.status = "}
        ]));
        assert!(
            error(&fhirpath).contains("fhirPathCriteria"),
            "{}",
            error(&fhirpath)
        );

        let result = topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "queryCriteria", "extension": [
                {"url": "resultForCreate", "valueCode": "pass"}
            ]}
        ]));
        assert!(error(&result).contains("`pass`"));
    }

    #[test]
    fn event_triggers_beside_resource_triggers_are_refused() {
        let mut resource = fixture("Basic-r4-encounter-complete.json");
        resource["extension"].as_array_mut().unwrap().push(json!({
            "url": format!("{R5}eventTrigger"),
            "extension": [{"url": "event", "valueCodeableConcept": {"text": "admission"}}]
        }));
        resource["extension"].as_array_mut().unwrap().push(json!({
            "url": format!("{R5}sometimesTrigger"), "valueBoolean": true
        }));
        let (_, refused) = Topic::parse(&resource).unwrap();
        assert!(
            refused.iter().any(|m| m.starts_with("eventTrigger (1)")),
            "{refused:#?}"
        );
        assert!(
            refused.iter().any(|m| m.contains("`sometimesTrigger`")),
            "{refused:#?}"
        );
    }

    #[test]
    fn query_criteria_follow_require_both_and_the_missing_state_results() {
        let trigger = |query: Value| {
            let (topic, refused) = Topic::parse(&topic_with(json!([
                {"url": "resource", "valueUri": "Encounter"},
                {"url": "queryCriteria", "extension": query}
            ])))
            .unwrap();
            assert!(refused.is_empty(), "{refused:#?}");
            topic
        };
        let (planned, finished) = (encounter("planned"), encounter("finished"));

        // Either test suffices without requireBoth; the three criteria spellings are one.
        let either = trigger(json!([
            {"url": "previous", "valueString": "?status=planned"},
            {"url": "current", "valueString": "Encounter?status=finished"}
        ]));
        let fires = |topic: &Topic, interaction, current, previous| {
            topic
                .evaluate("Encounter", interaction, current, previous)
                .unwrap()
        };
        assert!(fires(
            &either,
            Interaction::Update,
            Some(&planned),
            Some(&planned)
        ));
        assert!(fires(
            &either,
            Interaction::Update,
            Some(&finished),
            Some(&finished)
        ));
        assert!(!fires(
            &either,
            Interaction::Update,
            Some(&planned),
            Some(&finished)
        ));

        // Absent resultForCreate / resultForDelete: the test of the missing state fails.
        let previous_only = trigger(json!([{"url": "previous", "valueString": "status=planned"}]));
        assert!(!fires(
            &previous_only,
            Interaction::Create,
            Some(&planned),
            None
        ));
        assert!(fires(
            &previous_only,
            Interaction::Update,
            Some(&finished),
            Some(&planned)
        ));
        let current_only = trigger(json!([{"url": "current", "valueString": "status=planned"}]));
        assert!(!fires(
            &current_only,
            Interaction::Delete,
            None,
            Some(&planned)
        ));
        assert!(fires(
            &current_only,
            Interaction::Create,
            Some(&planned),
            None
        ));

        // test-passes on delete; a restoring update without previous state counts as missing.
        let on_delete = trigger(json!([
            {"url": "previous", "valueString": "status=finished"},
            {"url": "current", "valueString": "status=planned"},
            {"url": "resultForDelete", "valueCode": "test-passes"},
            {"url": "requireBoth", "valueBoolean": true}
        ]));
        assert!(fires(
            &on_delete,
            Interaction::Delete,
            None,
            Some(&finished)
        ));
        assert!(!fires(
            &on_delete,
            Interaction::Delete,
            None,
            Some(&planned)
        ));
        assert!(!fires(
            &on_delete,
            Interaction::Update,
            Some(&planned),
            None
        ));
    }

    #[test]
    fn fhirpath_criteria_see_current_previous_and_the_deleted_focus() {
        let (topic, _) = Topic::parse(&topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "fhirPathCriteria", "valueString": "status = 'finished' and %current.empty() and %previous.status = 'finished'"}
        ])))
        .unwrap();
        let finished = encounter("finished");
        assert!(
            topic
                .evaluate("Encounter", Interaction::Delete, None, Some(&finished))
                .unwrap()
        );
        assert!(
            !topic
                .evaluate(
                    "Encounter",
                    Interaction::Update,
                    Some(&finished),
                    Some(&finished)
                )
                .unwrap()
        );

        // A collection is not a single `true`.
        let (topic, _) = Topic::parse(&topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "fhirPathCriteria", "valueString": "true | false"}
        ])))
        .unwrap();
        assert!(
            !topic
                .evaluate("Encounter", Interaction::Create, Some(&finished), None)
                .unwrap()
        );
    }

    /// A topic with `count` copies of one resource trigger.
    fn topic_with_triggers(trigger: Value, count: usize) -> Value {
        let mut topic = topic_with(trigger);
        let copy = topic["extension"][1].clone();
        let extensions = topic["extension"].as_array_mut().unwrap();
        extensions.extend(std::iter::repeat_n(copy, count - 1));
        topic
    }

    #[test]
    fn a_topic_with_too_many_triggers_cannot_be_used() {
        let trigger = json!([{"url": "resource", "valueUri": "Encounter"}]);
        assert!(Topic::parse(&topic_with_triggers(trigger.clone(), MAX_RESOURCE_TRIGGERS)).is_ok());
        let error =
            Topic::parse(&topic_with_triggers(trigger, MAX_RESOURCE_TRIGGERS + 1)).unwrap_err();
        assert!(error.contains("more than 32 resourceTrigger"), "{error}");
    }

    /// Triggers that each stay within a budget cannot add up to more than one: they share it.
    #[test]
    fn a_topics_triggers_share_one_fhirpath_budget() {
        let expression = "%current.identifier.where(value = 'none').exists()";
        let mut resource = encounter("planned");
        resource["identifier"] = (0..20_000)
            .map(|n| json!({"system": "urn:x", "value": n.to_string()}))
            .collect();
        let spent = fhirpath::Expression::parse(expression)
            .unwrap()
            .evaluate_measured(
                &resource,
                &Environment::new().with_variable("current", &resource),
            )
            .1
            .steps;
        let limit = fhirpath::Limits::default().max_steps;
        assert!(
            spent > 0 && spent < limit / 2,
            "one evaluation spends {spent}"
        );
        let trigger = json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "supportedInteraction", "valueCode": "create"},
            {"url": "fhirPathCriteria", "valueString": expression}
        ]);
        let fits = (limit / spent) as usize;
        assert!(
            fits < MAX_RESOURCE_TRIGGERS,
            "{fits} evaluations fit in one budget"
        );
        let (alone, _) = Topic::parse(&topic_with_triggers(trigger.clone(), fits)).unwrap();
        assert_eq!(
            alone.evaluate("Encounter", Interaction::Create, Some(&resource), None),
            Ok(false),
            "{fits} evaluations fit in one budget"
        );
        let (many, _) = Topic::parse(&topic_with_triggers(trigger, fits + 1)).unwrap();
        let error = many
            .evaluate("Encounter", Interaction::Create, Some(&resource), None)
            .unwrap_err();
        assert!(error.budget_exhausted, "{error}");
    }

    #[test]
    fn a_hostile_fhirpath_exhausts_its_budget_instead_of_hanging() {
        let (topic, _) = Topic::parse(&topic_with(json!([
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "fhirPathCriteria", "valueString": "'a'.repeat($this + 'a').count() > 0"}
        ])))
        .unwrap();
        let error = topic
            .evaluate(
                "Encounter",
                Interaction::Create,
                Some(&encounter("planned")),
                None,
            )
            .unwrap_err();
        assert!(error.budget_exhausted, "{error}");
        assert!(error.message.contains("fhirPathCriteria"), "{error}");
    }

    #[test]
    fn a_hostile_expression_from_the_engine_family_exhausts_its_budget() {
        let patient = fhirpath::hostile::large_patient(3_800_000);
        let expression = &fhirpath::hostile::expressions()[1];
        let (topic, _) = Topic::parse(&topic_with(json!([
            {"url": "resource", "valueUri": "Patient"},
            {"url": "fhirPathCriteria", "valueString": expression}
        ])))
        .unwrap();
        let error = topic
            .evaluate(
                "Patient",
                Interaction::Update,
                Some(&patient),
                Some(&patient),
            )
            .unwrap_err();
        assert!(error.budget_exhausted, "{error}");
    }

    #[test]
    fn filter_definitions_read_modifiers_and_comparators_and_refuse_what_cannot_be_filtered() {
        let mut resource = topic_with(json!([{"url": "resource", "valueUri": "Encounter"}]));
        let extensions = resource["extension"].as_array_mut().unwrap();
        extensions.push(json!({"url": format!("{R5}canFilterBy"), "extension": [
            {"url": "filterParameter", "valueString": "length"},
            {"url": "comparator", "valueCode": "gt"},
            {"url": "modifier", "valueCode": "missing"}
        ]}));
        extensions.push(json!({"url": format!("{R5}canFilterBy"), "extension": [
            {"url": "resource", "valueUri": "Encounter"},
            {"url": "filterParameter", "valueString": "patient"},
            {"url": "filterDefinition", "valueUri": "http://example.org/SearchParameter/patient"}
        ]}));
        extensions.push(json!({"url": format!("{R5}canFilterBy"), "extension": [
            {"url": "filterParameter", "valueString": "near"}
        ]}));
        let (topic, refused) = Topic::parse(&resource).unwrap();
        assert_eq!(
            topic.can_filter_by[0],
            FilterDefinition {
                resource_type: None,
                parameter: "length".to_owned(),
                modifiers: vec!["gt".to_owned(), "missing".to_owned()],
            }
        );
        assert_eq!(topic.can_filter_by.len(), 3);
        assert!(
            refused.iter().any(|m| m.contains("filterDefinition")),
            "{refused:#?}"
        );
        assert!(
            refused.iter().any(|m| m.contains("canFilterBy `near`")),
            "{refused:#?}"
        );
        assert_eq!(refused.len(), 2, "{refused:#?}");
    }
}
