//! Criteria parsing and matching on whole resources: the ports of Medplum's `match.test.ts` (§2.5 of
//! the reference spec), number/quantity parameters (beyond Medplum), unsupported constructs and parse
//! errors.

use fhir_outbox::criteria::{Criteria, CriteriaError};
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
