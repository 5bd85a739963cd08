//! Criteria parsing and matching on whole resources: the ports of Medplum's `match.test.ts` (§2.5 of
//! the reference spec), number/quantity parameters (beyond Medplum), unsupported constructs and parse
//! errors.

use fhir_match::criteria::{Criteria, CriteriaError};
use serde_json::{Value, json};

fn matches(criteria: &str, resource: &Value) -> bool {
    let c = Criteria::parse(criteria).unwrap_or_else(|e| panic!("{criteria}: {e}"));
    let fast = c
        .matches(resource)
        .unwrap_or_else(|e| panic!("{criteria}: {e}"));
    // The explaining path must agree with the fast path.
    let report = c.explain(resource).unwrap();
    assert_eq!(fast, report.matched, "{criteria}: {report}");
    assert_eq!(
        report.matched,
        report.failures.is_empty(),
        "{criteria}: {report}"
    );
    fast
}

fn explain(criteria: &str, resource: &Value) -> String {
    Criteria::parse(criteria)
        .unwrap()
        .explain(resource)
        .unwrap()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Parsing

#[test]
fn parse_resource_type_and_filters() {
    let c = Criteria::parse("Observation?code=http://loinc.org|1234-5&status=final").unwrap();
    assert_eq!(c.resource_type(), "Observation");
    assert_eq!(c.filters().len(), 2);
    assert_eq!(c.filters()[0].code(), "code");
    assert_eq!(c.filters()[0].display(), "code=http://loinc.org|1234-5");
    assert_eq!(c.unsupported().count(), 0);

    assert_eq!(Criteria::parse("Patient").unwrap().filters().len(), 0);
    assert_eq!(
        Criteria::parse("Patient?").unwrap().resource_type(),
        "Patient"
    );
    assert_eq!(
        Criteria::parse("https://example.org/fhir/Patient?active=true")
            .unwrap()
            .resource_type(),
        "Patient"
    );
    assert_eq!(
        Criteria::parse("/Patient/?active=true")
            .unwrap()
            .resource_type(),
        "Patient"
    );
    let c = Criteria::parse(
        "Patient?name:exact=Simpson&_count=10&_sort=-_lastUpdated&_=123&&_summary=true",
    )
    .unwrap();
    assert_eq!(c.filters().len(), 1);
    assert_eq!(c.filters()[0].modifier(), Some("exact"));
}

#[test]
fn parse_decodes_form_encoding() {
    let c = Criteria::parse("Patient?name=Homer+J%20Simpson&identifier=urn%3Ax%7C1").unwrap();
    assert_eq!(c.filters()[0].display(), "name=Homer J Simpson");
    assert_eq!(c.filters()[1].display(), "identifier=urn:x|1");
    // Malformed escapes are kept, never an error.
    assert!(Criteria::parse("Patient?name=%ZZ%&family=%E9").is_ok());
}

#[test]
fn parse_errors() {
    assert_eq!(Criteria::parse("").unwrap_err(), CriteriaError::Empty);
    assert_eq!(Criteria::parse("   ").unwrap_err(), CriteriaError::Empty);
    assert!(matches!(
        Criteria::parse("?status=final").unwrap_err(),
        CriteriaError::NoResourceType(_)
    ));
    assert!(matches!(
        Criteria::parse("/?status=final").unwrap_err(),
        CriteriaError::NoResourceType(_)
    ));
    assert!(matches!(
        Criteria::parse("status=final").unwrap_err(),
        CriteriaError::InvalidResourceType(_)
    ));
    assert!(matches!(
        Criteria::parse("Pat ient?x=1").unwrap_err(),
        CriteriaError::InvalidResourceType(_)
    ));

    let e = Criteria::parse("Patient?birthdate=yesterday").unwrap_err();
    assert_eq!(
        e,
        CriteriaError::InvalidValue {
            param: "birthdate".into(),
            kind: "date",
            value: "yesterday".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "invalid date value `yesterday` for parameter `birthdate`"
    );
    assert!(Criteria::parse("Patient?birthdate=ge2020-13-01").is_err());
    assert!(Criteria::parse("Patient?birthdate=").is_err());
    assert!(Criteria::parse("Patient?birthdate=2020,nope").is_err());
    assert!(Criteria::parse("RiskAssessment?probability=gtx").is_err());
    assert!(
        Criteria::parse("Observation?value-quantity=abc|http://unitsofmeasure.org|mg").is_err()
    );
    // Hard errors are only for date/number/quantity values: other types accept anything.
    assert!(Criteria::parse("Patient?gender=%%%").is_ok());
}

#[test]
fn hostile_input_is_bounded() {
    let long = format!("Patient?name={}", "a".repeat(70_000));
    assert!(matches!(
        Criteria::parse(&long).unwrap_err(),
        CriteriaError::TooLong { .. }
    ));
    let commas = format!("Patient?name={}", ",".repeat(5_000));
    assert!(matches!(
        Criteria::parse(&commas).unwrap_err(),
        CriteriaError::TooManyValues { .. }
    ));
    let many = format!("Patient?{}", "active=true&".repeat(300));
    assert!(matches!(
        Criteria::parse(&many).unwrap_err(),
        CriteriaError::TooManyParameters { .. }
    ));
    // Within bounds: a thousand-value list parses and evaluates.
    let list = (0..1000)
        .map(|i| format!("code{i}"))
        .collect::<Vec<_>>()
        .join(",");
    assert!(Criteria::parse(&format!("Observation?status={list}")).is_ok());
    for weird in [
        "Patient?%",
        "Patient?=",
        "Patient?==",
        "Patient?name=%F0%9F",
        "Patient?:=x",
        "Patient?name:=x",
    ] {
        assert!(Criteria::parse(weird).is_ok(), "{weird}");
    }
    let huge_key = format!("Patient?{}=1", "x".repeat(10_000));
    let c = Criteria::parse(&huge_key).unwrap();
    assert!(c.unsupported().next().unwrap().parameter.len() < 300);
}

#[test]
fn unsupported_constructs_are_reported() {
    let cases = [
        (
            "Observation?subject.name=Bob",
            "chained parameters are not supported",
        ),
        (
            "Observation?subject:Patient.name=Bob",
            "chained parameters are not supported",
        ),
        (
            "Patient?_has:Observation:patient:code=1234",
            "reverse chaining (`_has`) is not supported",
        ),
        (
            "Patient?_filter=name eq x",
            "`_filter` expressions are not supported",
        ),
        ("Patient?_text=cancer", "full-text search is not supported"),
        (
            "Patient?_content=cancer",
            "full-text search is not supported",
        ),
        (
            "Patient?_query=foo",
            "named queries (`_query`) are not supported",
        ),
        ("Patient?_list=42", "`_list` is not supported"),
        (
            "Patient?unknown=xyz",
            "`unknown` is not a search parameter of `Patient`",
        ),
        (
            "Location?near=42|-83|10|km",
            "special parameters (like `near`) are not supported",
        ),
        (
            "Observation?code-value-quantity=http://loinc.org|1-2$gt5",
            "composite parameters are not supported",
        ),
        (
            "Patient?birthdate:exact=2000",
            "modifier `:exact` is not supported on date parameters",
        ),
        (
            "Patient?birthdate=sw2000",
            "prefix `sw` is not defined for date parameters",
        ),
    ];
    for (criteria, reason) in cases {
        let c = Criteria::parse(criteria).unwrap();
        let u: Vec<_> = c.unsupported().collect();
        assert_eq!(u.len(), 1, "{criteria}");
        assert_eq!(u[0].reason, reason, "{criteria}");
        assert!(c.filters()[0].unsupported_reason().is_some());
    }
}

#[test]
fn approximations_are_listed() {
    let c =
        Criteria::parse("Observation?code:in=http://vs&subject:Patient=1&code:text=x&status=final")
            .unwrap();
    let a: Vec<_> = c.approximations().map(|u| u.parameter.clone()).collect();
    assert_eq!(a, ["code:in=http://vs", "subject:Patient=1", "code:text=x"]);
    assert_eq!(c.unsupported().count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Matching: ports of Medplum's match.test.ts

#[test]
fn resource_type_both_ways() {
    assert!(matches(
        "Observation",
        &json!({"resourceType": "Observation"})
    ));
    assert!(matches("Patient", &json!({"resourceType": "Patient"})));
    assert!(!matches("Patient", &json!({"resourceType": "Observation"})));
    assert!(!matches("Observation", &json!({"resourceType": "Patient"})));
    assert!(!matches("Observation", &json!({"status": "final"})));
    assert_eq!(
        explain(
            "Patient?active=true",
            &json!({"resourceType": "Observation"})
        ),
        "did not match\n- `resource type`: type `Observation` != `Patient`"
    );
}

#[test]
fn id() {
    assert!(matches(
        "Patient?_id=123",
        &json!({"resourceType": "Patient", "id": "123"})
    ));
    assert!(!matches(
        "Observation?_id=456",
        &json!({"resourceType": "Observation", "id": "123"})
    ));
    assert!(matches(
        "Observation?_id=456,123",
        &json!({"resourceType": "Observation", "id": "123"})
    ));
}

#[test]
fn unknown_parameter_never_matches() {
    let p = json!({"resourceType": "Patient"});
    assert!(!matches("Patient?unknown=xyz", &p));
    assert!(!matches("Patient?unknown:not=xyz", &p));
    assert!(!matches("Patient?unknown:missing=true", &p));
    assert_eq!(
        explain("Patient?unknown=xyz", &p),
        "did not match\n- `unknown=xyz`: not supported: `unknown` is not a search parameter of `Patient`"
    );
}

#[test]
fn boolean_token() {
    let t = json!({"resourceType": "Patient", "active": true});
    let f = json!({"resourceType": "Patient", "active": false});
    assert!(matches("Patient?active=true", &t));
    assert!(matches("Patient?active=false", &f));
    assert!(!matches("Patient?active=false", &t));
    assert!(!matches("Patient?active=true", &f));
    assert!(!matches("Patient?active:not=true", &t));
    assert!(!matches("Patient?active:not=false", &f));
    assert!(matches("Patient?active:not=false", &t));
    assert!(matches("Patient?active:not=true", &f));
    // Token comparison is case-insensitive (newest Medplum: booleans are tokens "true"/"false").
    assert!(matches("Patient?active=TRUE", &t));
    // No `active` at all: `:not` matches, equality does not.
    let none = json!({"resourceType": "Patient"});
    assert!(!matches("Patient?active=true", &none));
    assert!(matches("Patient?active:not=true", &none));
}

#[test]
fn reference() {
    let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/123"}});
    assert!(matches("Observation?subject=Patient/123", &obs));
    assert!(!matches("Observation?subject=Patient/456", &obs));
    assert!(!matches("Observation?subject:not=Patient/123", &obs));
    assert!(matches("Observation?subject:not=Patient/456", &obs));
    assert!(matches("Observation?subject=Patient/456,Patient/123", &obs));
    // A bare id works for the single-target `patient`, not for the multi-target `subject`.
    assert!(matches("Observation?patient=123", &obs));
    assert!(!matches("Observation?patient=12", &obs));
    assert!(!matches("Observation?subject=123", &obs));
    assert!(matches("Observation?patient=Patient/123", &obs));
    // Inline and identifier-only references.
    let by_ident = json!({"resourceType": "Observation", "subject": {"identifier": {"system": "urn:mrn", "value": "7"}}});
    assert!(matches(
        "Observation?subject=identifier:urn:mrn|7",
        &by_ident
    ));
    // A type modifier is ignored (Medplum): plain equality.
    assert!(matches("Observation?subject:Patient=Patient/123", &obs));
    assert!(!matches("Observation?subject:Patient=123", &obs));
    assert_eq!(
        explain("Observation?subject=Patient/456", &obs),
        "did not match\n- `subject=Patient/456`: resource has subject `Patient/123`"
    );
    assert_eq!(
        explain("Observation?subject:not=Patient/123", &obs),
        "did not match\n- `subject:not=Patient/123`: resource has subject `Patient/123`"
    );
}

#[test]
fn empty_reference() {
    let obs = json!({"resourceType": "Observation"});
    assert!(matches("Observation?subject=", &obs));
    assert!(!matches("Observation?subject=Patient/456", &obs));
    assert!(!matches("Observation?subject:not=", &obs));
    assert!(matches("Observation?subject:not=Patient/456", &obs));
    let with = json!({"resourceType": "Observation", "subject": {"reference": "Patient/1"}});
    assert!(!matches("Observation?subject=", &with));
}

#[test]
fn canonical_reference() {
    let with = json!({"resourceType": "QuestionnaireResponse", "status": "completed", "questionnaire": "Questionnaire/123"});
    let without = json!({"resourceType": "QuestionnaireResponse", "status": "completed"});
    assert!(matches(
        "QuestionnaireResponse?questionnaire=Questionnaire/123",
        &with
    ));
    assert!(!matches(
        "QuestionnaireResponse?questionnaire=Questionnaire/123",
        &without
    ));
    assert!(!matches(
        "QuestionnaireResponse?questionnaire=Questionnaire/456",
        &with
    ));
    assert!(!matches(
        "QuestionnaireResponse?questionnaire:not=Questionnaire/123",
        &with
    ));
    assert!(matches(
        "QuestionnaireResponse?questionnaire:not=Questionnaire/123",
        &without
    ));
    assert!(matches(
        "QuestionnaireResponse?questionnaire:not=Questionnaire/456",
        &with
    ));
    // Single target type: a bare id suffix-matches.
    assert!(matches("QuestionnaireResponse?questionnaire=123", &with));
}

#[test]
fn string() {
    let p = json!({"resourceType": "Patient", "name": [{"given": ["Homer"], "family": "Simpson"}]});
    assert!(matches("Patient?name=Simpson", &p));
    assert!(!matches("Patient?name=George", &p));
    assert!(!matches("Patient?name:not=Simpson", &p));
    assert!(matches("Patient?name:not=George", &p));
    // Medplum: case-insensitive substring (not FHIR's starts-with).
    assert!(matches("Patient?name=imps", &p));
    assert!(matches("Patient?name=homer simpson", &p));
    assert!(matches("Patient?name:contains=MER", &p));
    assert!(matches("Patient?name=George,homer", &p));
    // Medplum's "Bot name Test matches Test Bot", on an R4 resource.
    assert!(matches(
        "Organization?name=Test",
        &json!({"resourceType": "Organization", "name": "Test Bot"})
    ));
    assert!(matches(
        "Patient?address-city=spring",
        &json!({"resourceType": "Patient", "address": [{"city": "Springfield"}]})
    ));
    assert!(matches(
        "Patient?address=evergreen",
        &json!({"resourceType": "Patient", "address": [{"line": ["742 Evergreen Terrace"]}]})
    ));
}

#[test]
fn string_exact() {
    let p = json!({"resourceType": "Patient", "name": [{"given": ["Homer"], "family": "Simpson"}]});
    assert!(matches("Patient?family:exact=Simpson", &p));
    assert!(!matches("Patient?family:exact=simpson", &p));
    assert!(!matches("Patient?family:exact=Simp", &p));
    assert!(matches("Patient?family:exact=Flanders,Simpson", &p));
    assert!(!matches("Patient?family:exact=Flanders,SIMPSON", &p));
}

#[test]
fn uri() {
    let ad = json!({"resourceType": "ActivityDefinition", "status": "active", "url": "http://example.com/fhir/ad"});
    assert!(matches(
        "ActivityDefinition?url=http://example.com/fhir/ad",
        &ad
    ));
    assert!(!matches("ActivityDefinition?url=http://foobar.com", &ad));
    assert!(!matches(
        "ActivityDefinition?url=http://example.com/fhir",
        &ad
    ));
    assert!(!matches("ActivityDefinition?url=http://example.com", &ad));
    assert!(!matches("ActivityDefinition?url=example.com", &ad));
    assert!(!matches(
        "ActivityDefinition?url=HTTP://EXAMPLE.COM/FHIR/AD",
        &ad
    ));
    assert!(matches(
        "ActivityDefinition?url:exact=http://example.com/fhir/ad",
        &ad
    ));
    assert!(!matches(
        "ActivityDefinition?url:not=http://example.com/fhir/ad",
        &ad
    ));
    assert!(matches("ActivityDefinition?url:not=http://foobar.com", &ad));
    // :above / :below fall back to case-insensitive substring.
    assert!(matches(
        "ActivityDefinition?url:below=HTTP://EXAMPLE.COM",
        &ad
    ));
    assert!(matches(
        "ActivityDefinition?url:above=example.com/fhir",
        &ad
    ));
    assert!(matches(
        "Patient?_profile=http://x/p",
        &json!({"resourceType": "Patient", "meta": {"profile": ["http://x/p"]}})
    ));
    assert!(!matches(
        "Patient?_profile=http://x",
        &json!({"resourceType": "Patient", "meta": {"profile": ["http://x/p"]}})
    ));
}

#[test]
fn token_on_codeable_concept_text() {
    let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "foo"}});
    assert!(matches("Observation?code=foo", &o));
    assert!(matches("Observation?code=FOO", &o));
    assert!(!matches("Observation?code=George", &o));
    assert!(!matches("Observation?code=fo", &o));
    assert!(!matches("Observation?code:not=foo", &o));
    assert!(matches("Observation?code:not=George", &o));
}

#[test]
fn token_not() {
    let pre =
        json!({"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "x"}});
    let can =
        json!({"resourceType": "DiagnosticReport", "status": "cancelled", "code": {"text": "x"}});
    assert!(!matches("DiagnosticReport?status=cancelled", &pre));
    assert!(matches("DiagnosticReport?status:not=cancelled", &pre));
    assert!(matches("DiagnosticReport?status=cancelled", &can));
    assert!(!matches("DiagnosticReport?status:not=cancelled", &can));
    assert_eq!(
        explain("DiagnosticReport?status=final", &pre),
        "did not match\n- `status=final`: resource has status `preliminary`"
    );

    let ordered = json!({"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/1"}, "orderDetail": [{"text": "ORDERED"}]});
    let voided = json!({"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/1"}, "orderDetail": [{"text": "VOIDED"}]});
    assert!(!matches(
        "ServiceRequest?order-detail=VOIDED,CANCELLED",
        &ordered
    ));
    assert!(matches(
        "ServiceRequest?order-detail:not=VOIDED,CANCELLED",
        &ordered
    ));
    assert!(matches(
        "ServiceRequest?order-detail=VOIDED,CANCELLED",
        &voided
    ));
    assert!(!matches(
        "ServiceRequest?order-detail:not=VOIDED,CANCELLED",
        &voided
    ));
}

#[test]
fn token_identifier() {
    let id = "1234567890";
    let p = json!({"resourceType": "Patient", "identifier": [
        {"system": "http://example.com", "value": id},
        {"system": "http://test.com", "value": id},
        {"system": "http://test.com", "value": "foo"},
        {"value": "nosys", "type": {"text": "Local"}}
    ]});
    assert!(matches(
        &format!("Patient?identifier=http://example.com|{id}"),
        &p
    ));
    assert!(matches(
        &format!("Patient?identifier=http://test.com|{id}"),
        &p
    ));
    assert!(matches(&format!("Patient?identifier={id}"), &p));
    assert!(matches("Patient?identifier=http://test.com|foo", &p));
    assert!(matches("Patient?identifier=HTTP://TEST.COM|FOO", &p));
    assert!(!matches("Patient?identifier=http://example.com|1234", &p));
    assert!(!matches("Patient?identifier=1234", &p));
    assert!(!matches("Patient?identifier=bar", &p));
    // system| : any identifier of that system.
    assert!(matches("Patient?identifier=http://test.com|", &p));
    assert!(!matches("Patient?identifier=http://other.com|", &p));
    // |value : identifier without a system.
    assert!(matches("Patient?identifier=|nosys", &p));
    assert!(!matches("Patient?identifier=|foo", &p));
    // `|` alone never matches.
    assert!(!matches("Patient?identifier=|", &p));
    // Identifier.type.text is a system-less token.
    assert!(matches("Patient?identifier=local", &p));
}

#[test]
fn token_identifier_with_system() {
    let p = json!({"resourceType": "Practitioner", "identifier": [{"system": "https://example.com", "value": "1234567890"}]});
    assert!(matches(
        "Practitioner?identifier=https://example.com|1234567890",
        &p
    ));
    assert!(matches("Practitioner?identifier=1234567890", &p));
    assert!(!matches("Practitioner?identifier=foo", &p));
}

#[test]
fn token_codeable_concept() {
    let code = "12345-6";
    let o = json!({"resourceType": "Observation", "status": "final", "code": {
        "coding": [
            {"system": "http://example.com", "code": code},
            {"system": "http://test.com", "code": code, "display": "Glucose"},
            {"system": "http://test.com", "code": "foo"},
            {"code": "local"}
        ],
        "text": "test"
    }});
    assert!(matches(
        &format!("Observation?code=http://example.com|{code}"),
        &o
    ));
    assert!(matches(
        &format!("Observation?code=http://test.com|{code}"),
        &o
    ));
    assert!(matches(&format!("Observation?code={code}"), &o));
    assert!(matches("Observation?code=http://test.com|foo", &o));
    assert!(matches("Observation?code:text=test", &o));
    assert!(matches("Observation?code=test", &o));
    assert!(matches("Observation?code=glucose", &o));
    assert!(!matches("Observation?code=http://example.com|1234", &o));
    assert!(!matches("Observation?code=1234", &o));
    assert!(!matches("Observation?code=bar", &o));
    assert!(!matches("Observation?code:text=tes", &o));
    assert!(matches("Observation?code=http://test.com|", &o));
    assert!(matches("Observation?code=|local", &o));
    assert!(!matches("Observation?code=|foo", &o));
    assert!(!matches("Observation?code=|", &o));
    // :in / :below etc. are plain equality (no terminology).
    assert!(matches("Observation?code:below=foo", &o));
}

#[test]
fn token_contact_point() {
    let p = json!({"resourceType": "Patient", "telecom": [{"system": "email", "value": "Homer@Example.com"}]});
    assert!(matches("Patient?telecom=email|homer@example.com", &p));
    assert!(matches("Patient?email=HOMER@example.com", &p));
    assert!(!matches("Patient?phone=homer@example.com", &p));
}

#[test]
fn dates_on_a_day() {
    let p = json!({"resourceType": "Patient", "birthDate": "1990-01-01"});
    let cases = [
        ("1990-01-01", true),
        ("1990-01-02", false),
        ("ne1990-01-01", false),
        ("ne1990-01-02", true),
        ("gt1980-01-01", true),
        ("gt2000-01-01", false),
        ("gt1990-01-01", false),
        ("ge1980-01-01", true),
        ("ge2000-01-01", false),
        ("ge1990-01-01", true),
        ("lt1980-01-01", false),
        ("lt2000-01-01", true),
        ("lt1990-01-01", false),
        ("le1980-01-01", false),
        ("le2000-01-01", true),
        ("le1990-01-01", true),
        ("sa1989-12-31", true),
        ("sa1990-01-01", false),
        ("eb1990-01-02", true),
        ("eb1990-01-01", false),
        ("ap1990-01-01", true),
        ("1990", true),
        ("1990-01", true),
        ("eq1990-01-01T12:00:00Z", true),
        ("lt1990-01-01T12:00:00Z", true),
        ("gt1990-01-01T12:00:00Z", true),
        ("gt1989,lt1980", true),
        ("lt1980,gt2000", false),
    ];
    for (v, want) in cases {
        assert_eq!(
            matches(&format!("Patient?birthdate={v}"), &p),
            want,
            "birthdate={v}"
        );
    }
    // No birthDate: only `ne` matches.
    let none = json!({"resourceType": "Patient"});
    assert!(!matches("Patient?birthdate=1990-01-01", &none));
    assert!(!matches("Patient?birthdate=lt2100", &none));
    assert!(matches("Patient?birthdate=ne1990-01-01", &none));
}

#[test]
fn dates_on_a_period() {
    // Medplum's Task due-date test (a Medplum parameter) on R4's Task `period` (executionPeriod).
    let task = json!({"resourceType": "Task", "status": "requested", "intent": "order", "executionPeriod": {
        "start": "2023-01-01T12:00:00.000Z", "end": "2023-01-01T13:00:00.000Z"}});
    assert!(!matches("Task?period=lt2023-01-01T12:00:00.000Z", &task));
    assert!(matches("Task?period=le2023-01-01T12:00:00.000Z", &task));
    assert!(matches("Task?period=ge2023-01-01T12:00:00.000Z", &task));
    assert!(matches("Task?period=gt2023-01-01T12:00:00.000Z", &task));
    assert!(matches("Task?period=2023-01-01", &task));
    assert!(matches("Task?period=2023-01-01T12:30:00Z", &task));
    assert!(!matches("Task?period=2023-01-01T14:00:00Z", &task));
    assert!(matches("Task?period=sa2023-01-01T11:00:00Z", &task));
    assert!(!matches("Task?period=sa2023-01-01T12:00:00Z", &task));
    assert!(matches("Task?period=eb2023-01-01T14:00:00Z", &task));
    assert!(!matches("Task?period=eb2023-01-01T13:00:00.000Z", &task));

    let enc = |period: Value| json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "period": period});
    // Missing period: no value.
    let missing =
        json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}});
    assert!(!matches("Encounter?date=2020-01-01", &missing));
    assert!(matches("Encounter?date=ne2020-01-01", &missing));
    // Invalid period: no value.
    assert!(!matches(
        "Encounter?date=2020-01-01",
        &enc(json!({"start": "not a date"}))
    ));
    // Start and end.
    let both = enc(json!({"start": "2020-01-01", "end": "2020-01-10"}));
    assert!(matches("Encounter?date=2020-01-05", &both));
    assert!(matches("Encounter?date=2020-01-10", &both));
    assert!(!matches("Encounter?date=2020-01-11", &both));
    assert!(matches("Encounter?date=gt2020-01-05", &both));
    assert!(!matches("Encounter?date=gt2020-01-10", &both));
    // End only: open start.
    let end_only = enc(json!({"end": "2020-01-10"}));
    assert!(matches("Encounter?date=lt1900-01-01", &end_only));
    assert!(matches("Encounter?date=2000-06-01", &end_only));
    assert!(!matches("Encounter?date=gt2020-01-10", &end_only));
    // Start only: open end.
    let start_only = enc(json!({"start": "2020-01-10"}));
    assert!(matches("Encounter?date=gt2999-01-01", &start_only));
    assert!(!matches("Encounter?date=lt2020-01-10", &start_only));
}

#[test]
fn last_updated() {
    let p = json!({"resourceType": "Patient", "meta": {"lastUpdated": "2024-05-01T10:00:00.000Z"}});
    assert!(matches("Patient?_lastUpdated=gt2024-05-01T09:00:00Z", &p));
    assert!(matches("Patient?_lastUpdated=2024-05", &p));
    assert!(!matches("Patient?_lastUpdated=lt2024-05-01T10:00:00Z", &p));
    // Timezone offsets are honoured.
    assert!(matches(
        "Patient?_lastUpdated=2024-05-01T12:00:00.000%2B02:00",
        &p
    ));
}

#[test]
fn compartments() {
    let r1 = json!({"resourceType": "Patient", "meta": {"compartment": [{"reference": "Organization/123"}]}});
    let r2 = json!({"resourceType": "Patient", "meta": {"compartment": [{"reference": "Organization/456"}]}});
    assert!(matches("Patient?_compartment=Organization/123", &r1));
    assert!(!matches("Patient?_compartment=Organization/456", &r1));
    // Backwards compatibility: a bare id matches.
    assert!(matches("Patient?_compartment=123", &r1));
    assert!(!matches("Patient?_compartment=Organization/123", &r2));
    assert!(matches("Patient?_compartment=Organization/456", &r2));
    assert!(!matches("Patient?_compartment=123", &r2));
}

#[test]
fn project() {
    let p = json!({"resourceType": "Patient", "meta": {"project": "p-1"}});
    assert!(matches("Patient?_project=p-1", &p));
    assert!(!matches("Patient?_project=p-2", &p));
}

#[test]
fn missing_and_present() {
    let without = json!({"resourceType": "Patient"});
    let with = json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/FooMedical"}});
    assert!(matches("Patient?organization:missing=true", &without));
    assert!(!matches("Patient?organization:missing=true", &with));
    assert!(matches("Patient?organization:missing=false", &with));
    assert!(!matches("Patient?organization:missing=false", &without));
    assert!(!matches("Patient?organization:present=true", &without));
    assert!(matches("Patient?organization:present=true", &with));
    assert!(!matches("Patient?organization:present=false", &with));
    assert!(matches("Patient?organization:present=false", &without));
    // Medplum's odd rule: any other value (even `TRUE`) asks for absence.
    assert!(matches("Patient?organization:missing=TRUE", &without));
    assert!(!matches("Patient?organization:present=TRUE", &with));
    assert!(matches("Patient?organization:missing=yes", &without));
    assert!(matches("Patient?birthdate:missing=true", &without));
    assert_eq!(
        explain("Patient?organization:missing=true", &with),
        "did not match\n- `organization:missing=true`: organization is present (`{\"reference\":\"Organization/FooMedical\"}`)"
    );
    assert_eq!(
        explain("Patient?organization:present=true", &without),
        "did not match\n- `organization:present=true`: organization is missing"
    );
}

#[test]
fn tags() {
    let p = json!({"resourceType": "Patient", "meta": {"tag": [{"system": "http://example.com/tags", "code": "needs-review"}]}});
    assert!(matches("Patient?_tag=needs-review", &p));
    assert!(matches(
        "Patient?_tag=http://example.com/tags|needs-review",
        &p
    ));
    // Partial values must not match (older Medplum matched substrings of the JSON).
    assert!(!matches("Patient?_tag=needs", &p));
    assert!(!matches("Patient?_tag=http://example.com|needs-review", &p));
    assert!(!matches("Patient?_tag:not=needs-review", &p));
    assert!(matches("Patient?_tag:not=needs", &p));
    assert!(matches("Patient?_security:not=R", &p));
}

#[test]
fn near_never_matches() {
    let l = json!({"resourceType": "Location", "position": {"latitude": 42.0, "longitude": -83.0}});
    assert!(!matches("Location?near=42|-83|10|km", &l));
    assert!(!matches("Location?near=42|-83", &l));
}

#[test]
fn several_filters_are_anded() {
    let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/1"}});
    assert!(matches("Observation?status=final&subject=Patient/1", &o));
    assert!(!matches("Observation?status=final&subject=Patient/2", &o));
    assert!(matches("Observation?status=final&status=final,amended", &o));
    assert!(!matches("Observation?status=final&status=amended", &o));
    assert!(!matches("Observation?status=final&subject.name=x", &o));
    assert_eq!(
        explain(
            "Observation?status=amended&subject=Patient/2&subject.name=x",
            &o
        ),
        "did not match\n- `status=amended`: resource has status `final`\n- `subject=Patient/2`: resource has subject `Patient/1`\n- `subject.name=x`: not supported: chained parameters are not supported"
    );
    assert_eq!(explain("Observation?status=final", &o), "matched");
}

// ---------------------------------------------------------------------------------------------
// Number and quantity (beyond Medplum, which never matches them)

#[test]
fn number_prefixes() {
    let ra = json!({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/1"},
        "prediction": [{"probabilityDecimal": 0.5}]});
    let cases = [
        ("0.5", true),
        ("0.50", true),
        ("0.4", false),
        ("1", true), // implicit precision of `1` is [0.5, 1.5)
        ("ne0.5", false),
        ("ne0.6", true),
        ("lt0.6", true),
        ("lt0.5", false),
        ("le0.5", true),
        ("le0.49", false),
        ("gt0.4", true),
        ("gt0.5", false),
        ("ge0.5", true),
        ("ge0.51", false),
        ("sa0.4", true),
        ("sa0.5", false),
        ("eb0.6", true),
        ("eb0.5", false),
        ("ap0.55", true),
        ("ap0.46", true),
        ("ap0.45", false), // 0.45 ± 0.045 stops at 0.495
        ("ap0.6", false),
        ("lt0.1,gt0.4", true),
    ];
    for (v, want) in cases {
        assert_eq!(
            matches(&format!("RiskAssessment?probability={v}"), &ra),
            want,
            "probability={v}"
        );
    }
    let none = json!({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/1"}});
    assert!(!matches("RiskAssessment?probability=gt0", &none));
    assert!(matches("RiskAssessment?probability=ne0.5", &none));
    // Range values: within/overlap semantics.
    let range = json!({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/1"},
        "prediction": [{"probabilityRange": {"low": {"value": 0.2}, "high": {"value": 0.4}}}]});
    assert!(matches("RiskAssessment?probability=gt0.3", &range));
    assert!(!matches("RiskAssessment?probability=gt0.4", &range));
    assert!(matches("RiskAssessment?probability=lt0.3", &range));
    assert!(
        matches("RiskAssessment?probability=0", &range),
        "0 covers [-0.5, 0.5)"
    );
    assert!(!matches("RiskAssessment?probability=0.3", &range));
    // Integers.
    let seq = json!({"resourceType": "MolecularSequence", "type": "dna", "coordinateSystem": 0, "variant": [{"start": 100, "end": 200}]});
    assert!(matches("MolecularSequence?variant-start=100", &seq));
    assert!(matches("MolecularSequence?variant-end=ge200", &seq));
    assert!(!matches("MolecularSequence?variant-end=gt200", &seq));
    assert!(matches("MolecularSequence?variant-start=1e2", &seq));
    assert_eq!(
        explain("RiskAssessment?probability=gt0.9", &ra),
        "did not match\n- `probability=gt0.9`: resource has probability `0.5`"
    );
}

#[test]
fn quantity_prefixes_and_units() {
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
        "valueQuantity": {"value": 5.4, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}});
    let ucum = "http://unitsofmeasure.org";
    let cases = [
        (format!("5.4|{ucum}|mg"), true),
        ("5.4||mg".to_string(), true),
        ("5.4".to_string(), true),
        ("5".to_string(), true), // [4.5, 5.5)
        ("5.0".to_string(), false),
        (format!("5.4|{ucum}|g"), false),
        ("5.4|http://snomed.info/sct|mg".to_string(), false),
        ("5.4||MG".to_string(), false),
        (format!("ne5.4|{ucum}|mg"), false),
        (format!("ne5.5|{ucum}|mg"), true),
        (format!("lt6|{ucum}|mg"), true),
        (format!("lt5.4|{ucum}|mg"), false),
        (format!("le5.4|{ucum}|mg"), true),
        (format!("gt5|{ucum}|mg"), true),
        (format!("gt5.4|{ucum}|mg"), false),
        (format!("ge5.4|{ucum}|mg"), true),
        (format!("ge5.41|{ucum}|mg"), false),
        (format!("sa5|{ucum}|mg"), true),
        (format!("eb6|{ucum}|mg"), true),
        (format!("eb5.4|{ucum}|mg"), false),
        (format!("ap5|{ucum}|mg"), true),
        (format!("ap6|{ucum}|mg"), true),
        (format!("ap6.1|{ucum}|mg"), false),
        (format!("gt6|{ucum}|mg,lt6|{ucum}|mg"), true),
    ];
    for (v, want) in cases {
        let criteria = format!("Observation?value-quantity={v}");
        assert_eq!(matches(&criteria, &obs), want, "{criteria}");
    }
    // `value||code` also matches the human unit; component quantities are searched by combo params.
    let by_unit = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "valueQuantity": {"value": 120, "unit": "mmHg"}});
    assert!(matches("Observation?value-quantity=gt100||mmHg", &by_unit));
    let comp = json!({"resourceType": "Observation", "status": "final", "code": {"text": "bp"},
        "component": [{"code": {"text": "sys"}, "valueQuantity": {"value": 120, "system": ucum, "code": "mm[Hg]"}}]});
    assert!(matches(
        &format!("Observation?component-value-quantity=gt100|{ucum}|mm%5BHg%5D"),
        &comp
    ));
    assert!(matches("Observation?combo-value-quantity=120", &comp));
    assert!(!matches("Observation?value-quantity=120", &comp));
    // Money (Invoice totals): currency acts as the code.
    let inv = json!({"resourceType": "Invoice", "status": "issued", "totalNet": {"value": 99.99, "currency": "EUR"}});
    assert!(matches("Invoice?totalnet=ge99.99||EUR", &inv));
    assert!(!matches("Invoice?totalnet=ge99.99||USD", &inv));
    // Age or Range (Condition onset-age).
    let cond = json!({"resourceType": "Condition", "subject": {"reference": "Patient/1"},
        "onsetAge": {"value": 42, "unit": "a", "system": ucum, "code": "a"}});
    assert!(matches(
        &format!("Condition?onset-age=lt50|{ucum}|a"),
        &cond
    ));
    assert!(!matches(
        &format!("Condition?onset-age=lt40|{ucum}|a"),
        &cond
    ));
}

#[test]
fn criteria_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Criteria>();
    assert_send_sync::<CriteriaError>();
}

#[test]
fn raw_plus_in_a_timezone_offset() {
    let p = json!({"resourceType": "Patient", "meta": {"lastUpdated": "2024-05-01T10:00:00.000Z"}});
    // `+` decodes to a space; read back as the offset (Medplum would reject the criteria).
    assert!(matches(
        "Patient?_lastUpdated=2024-05-01T12:00:00.000+02:00",
        &p
    ));
    assert!(matches(
        "Patient?_lastUpdated=gt2024-05-01T11:00:00+02:00",
        &p
    ));
    assert!(Criteria::parse("Patient?_lastUpdated=2024-05-01 12:00").is_err());
}

/// Deterministic pseudo-random criteria built from the characters that matter to the parser: parsing
/// and matching must never panic, whatever the input.
#[test]
fn never_panics_on_garbage() {
    let pieces = [
        "Patient",
        "Observation",
        "?",
        "&",
        "=",
        ",",
        "\\",
        "\\,",
        "|",
        ":",
        ":not",
        ":missing",
        ":exact",
        "%",
        "%2",
        "%zz",
        "%C3%A9",
        "%FF",
        "+",
        "name",
        "birthdate",
        "value-quantity",
        "subject",
        "code",
        "_id",
        "_has",
        ".",
        "gt",
        "ap",
        "sw",
        "2020",
        "-01",
        "T10:00",
        "Z",
        "1e5",
        "-",
        "0.5",
        "é",
        "💥",
        "",
        "identifier",
        "_tag",
        "active",
        "true",
        "Patient/1",
    ];
    let resources = [
        json!({"resourceType": "Patient", "id": "1", "active": true, "birthDate": "2020-01-01",
            "name": [{"family": "X"}], "identifier": [{"system": "s", "value": "v"}]}),
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/1"}, "valueQuantity": {"value": 1e5}}),
        json!({"resourceType": "Patient", "name": "not an array", "birthDate": 42, "active": "yes"}),
    ];
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let len = (next() % 12) as usize;
        let mut s = String::new();
        for _ in 0..len {
            s.push_str(pieces[(next() % pieces.len() as u64) as usize]);
        }
        if let Ok(c) = Criteria::parse(&s) {
            for r in &resources {
                let _ = c.matches(r);
                let _ = c.explain(r);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the matcher does not understand never matches, and says why

#[test]
fn unknown_modifiers_never_match() {
    let patient = json!({"resourceType": "Patient", "name": [{"family": "foo"}],
        "gender": "male", "generalPractitioner": [{"reference": "Practitioner/1"}],
        "meta": {"profile": ["http://example.org/p"]}});
    let cases = [
        (
            "Patient?name:badmod=foo",
            "unknown modifier `:badmod` on string parameter `name`",
        ),
        (
            "Patient?gender:badmod=male",
            "unknown modifier `:badmod` on token parameter `gender`",
        ),
        (
            "Patient?general-practitioner:Practitionr=1",
            "unknown modifier `:Practitionr` on reference parameter `general-practitioner`",
        ),
        (
            "Patient?_profile:sideways=http://example.org/p",
            "unknown modifier `:sideways` on uri parameter `_profile`",
        ),
    ];
    for (criteria, reason) in cases {
        let c = Criteria::parse(criteria).unwrap();
        let u: Vec<_> = c.unsupported().collect();
        assert_eq!(u.len(), 1, "{criteria}");
        assert_eq!(u[0].reason, reason, "{criteria}");
        assert!(!matches(criteria, &patient), "{criteria}");
        assert!(explain(criteria, &patient).contains(reason), "{criteria}");
    }
    // Without the modifier (or with a defined one) the same filters match.
    for criteria in [
        "Patient?name=foo",
        "Patient?name:exact=foo",
        "Patient?gender:not=female",
        "Patient?general-practitioner:Practitioner=Practitioner/1",
    ] {
        assert!(matches(criteria, &patient), "{criteria}");
    }
}

#[test]
fn unknown_parameters_never_match() {
    let patient = json!({"resourceType": "Patient", "name": [{"family": "foo"}]});
    let c = Criteria::parse("Patient?nmae=foo").unwrap();
    assert_eq!(
        c.unsupported().next().unwrap().reason,
        "`nmae` is not a search parameter of `Patient`"
    );
    assert!(!matches("Patient?nmae=foo", &patient));
    assert!(!matches("Patient?name=foo&nmae=foo", &patient));
}

#[test]
fn unknown_resource_types_are_refused() {
    assert_eq!(
        Criteria::parse("Patinet?name=foo").unwrap_err(),
        CriteriaError::UnknownResourceType("Patinet".into())
    );
    assert_eq!(
        Criteria::parse("Patinet").unwrap_err().to_string(),
        "`Patinet` is not a FHIR R4 resource type (nor one of Medplum's own)"
    );
    // Abstract types and data types are no resource's type either.
    for criteria in ["Resource?_id=1", "DomainResource", "HumanName?x=1"] {
        assert!(
            matches!(
                Criteria::parse(criteria).unwrap_err(),
                CriteriaError::UnknownResourceType(_)
            ),
            "{criteria}"
        );
    }
    // FHIR R4's and Medplum's own types are fine.
    for criteria in [
        "Patient",
        "Observation?status=final",
        "Bot",
        "ProjectMembership",
    ] {
        assert!(Criteria::parse(criteria).is_ok(), "{criteria}");
    }
}
