//! Unit tests of the engine: limits, logic, dates, choice types, references, variables and the
//! search parameter expressions of FHIR R4.

use serde_json::{Value, json};

use super::*;

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "active": true,
        "birthDate": "1974-12-25",
        "_birthDate": {"extension": [{"url": "http://example.org/time", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
        "name": [
            {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
            {"use": "usual", "given": ["Jim"]}
        ],
        "gender": "male",
        "deceasedBoolean": false,
        "managingOrganization": {"reference": "Organization/1"},
        "generalPractitioner": [{"reference": "Practitioner/7"}, {"reference": "#c1"}],
        "contained": [{"resourceType": "Practitioner", "id": "c1", "active": true}]
    })
}

fn eval_on(expr: &str, res: &Value) -> Result<Vec<Value>, FhirPathError> {
    let e = Expression::parse(expr)?;
    Ok(e.evaluate(res, &Environment::new())?
        .iter()
        .map(|i| i.to_json().into_owned())
        .collect())
}

fn eval(expr: &str) -> Vec<Value> {
    eval_on(expr, &patient()).unwrap_or_else(|e| panic!("{expr}: {e}"))
}

#[test]
fn navigation_and_where() {
    assert_eq!(
        eval("Patient.name.given"),
        vec![json!("Peter"), json!("James"), json!("Jim")]
    );
    assert_eq!(eval("name.where(use = 'usual').given"), vec![json!("Jim")]);
    assert_eq!(eval("name.given.exists()"), vec![json!(true)]);
    assert_eq!(eval("name[1].given.first()"), vec![json!("Jim")]);
    assert_eq!(eval("Resource.id"), vec![json!("p1")]);
    assert_eq!(eval("DomainResource.id"), vec![json!("p1")]);
    assert_eq!(
        eval("birthDate.extension('http://example.org/time').value.toString()").len(),
        1
    );
    assert_eq!(eval("name.given.count() > 2"), vec![json!(true)]);
}

#[test]
fn item_types() {
    let p = patient();
    let e = Expression::parse(
        "Patient.name | Patient.birthDate | Patient.id | 1 | managingOrganization",
    )
    .unwrap();
    let out = e.evaluate(&p, &Environment::new()).unwrap();
    let types: Vec<_> = out.iter().map(|i| i.fhir_type().unwrap_or("?")).collect();
    assert_eq!(
        types,
        vec![
            "HumanName",
            "HumanName",
            "date",
            "id",
            "System.Integer",
            "Reference"
        ]
    );
}

#[test]
fn three_valued_logic() {
    let cases = [
        ("true and {}", None),
        ("false and {}", Some(false)),
        ("{} or true", Some(true)),
        ("{} or false", None),
        ("{} implies true", Some(true)),
        ("false implies {}", Some(true)),
        ("true implies {}", None),
        ("true xor {}", None),
        ("true xor false", Some(true)),
        ("({} = 1).not()", None),
        ("{}.not()", None),
    ];
    for (src, want) in cases {
        let got = Expression::parse(src)
            .unwrap()
            .evaluate_bool(&patient(), &Environment::new())
            .unwrap();
        assert_eq!(got, want, "{src}");
    }
}

#[test]
fn date_precision() {
    assert_eq!(eval("@2019 < @2020-01"), vec![json!(true)]);
    assert_eq!(eval("@2019 = @2019-01"), Vec::<Value>::new());
    assert_eq!(eval("@2019-01 < @2019-01-05"), Vec::<Value>::new());
    assert_eq!(
        eval("@2019-01-01T10:00:00Z = @2019-01-01T12:00:00+02:00"),
        vec![json!(true)]
    );
    assert_eq!(eval("birthDate < @1975"), vec![json!(true)]);
    assert_eq!(eval("birthDate > @1974-12-24"), vec![json!(true)]);
    assert_eq!(eval("@T10:00 < @T10:00:01"), Vec::<Value>::new());
    assert_eq!(eval("@2019-01-31 + 1 month"), vec![json!("2019-02-28")]);
}

#[test]
fn choice_types() {
    let obs = json!({"resourceType": "Observation", "status": "final",
        "valueQuantity": {"value": 185, "unit": "lbs", "code": "[lb_av]", "system": "http://unitsofmeasure.org"},
        "effectiveDateTime": "2020-01-01T10:00:00Z"});
    let q = |s: &str| eval_on(s, &obs).unwrap();
    assert_eq!(q("Observation.value.unit"), vec![json!("lbs")]);
    assert_eq!(q("Observation.value is Quantity"), vec![json!(true)]);
    assert_eq!(q("Observation.value.is(Period)"), vec![json!(false)]);
    assert_eq!(
        q("(Observation.value as Quantity).value > 180"),
        vec![json!(true)]
    );
    assert_eq!(
        q("Observation.value.ofType(Quantity).value"),
        vec![json!(185)]
    );
    assert_eq!(
        q("Observation.effective.as(dateTime) > @2019"),
        vec![json!(true)]
    );
    assert_eq!(eval("Patient.deceased.as(boolean)"), vec![json!(false)]);
}

#[test]
fn resolve_reference() {
    assert_eq!(
        eval("managingOrganization.resolve() is Organization"),
        vec![json!(true)]
    );
    assert_eq!(
        eval("generalPractitioner.where(resolve() is Practitioner).count()"),
        vec![json!(2)]
    );
    assert_eq!(
        eval("generalPractitioner.resolve().where(active).id"),
        vec![json!("c1")]
    );
    let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/123"}});
    let out = eval_on("Observation.subject.where(resolve() is Patient)", &obs).unwrap();
    assert_eq!(out.len(), 1);
    let out = eval_on("Observation.subject.resolve().id", &obs).unwrap();
    assert_eq!(out, vec![json!("123")]);
}

#[test]
fn previous_and_current() {
    let cur = json!({"resourceType": "Encounter", "status": "finished"});
    let prev = json!({});
    let env = Environment::new()
        .with_variable("current", &cur)
        .with_variable("previous", &prev);
    let e = Expression::parse("%previous.status").unwrap();
    assert!(e.evaluate(&cur, &env).unwrap().is_empty());
    let e = Expression::parse("%previous.status != 'finished' and %current.status = 'finished'")
        .unwrap();
    // `{} != 'finished'` is empty, so the conjunction is empty (not true): Medplum writes
    // `%previous.status.exists().not() or ...` for that reason.
    assert_eq!(e.evaluate_bool(&cur, &env).unwrap(), None);
    let e = Expression::parse("%previous.status.exists().not() and %current.status = 'finished'")
        .unwrap();
    assert_eq!(e.evaluate_bool(&cur, &env).unwrap(), Some(true));
    let e = Expression::parse("%ucum = 'http://unitsofmeasure.org' and %resource.status = 'finished' and %context.exists()").unwrap();
    assert_eq!(e.evaluate_bool(&cur, &env).unwrap(), Some(true));
    assert!(matches!(
        Expression::parse("%nope").unwrap().evaluate(&cur, &env),
        Err(FhirPathError::UndefinedVariable(_))
    ));
}

#[test]
fn singleton_errors() {
    // `contains` as a string function on several items is an error (Medplum relies on it).
    assert!(eval_on("name.given.contains('Pe')", &patient()).is_err());
    assert!(
        eval_on(
            "name.given = 'Peter' or name.given.single() = 'x'",
            &patient()
        )
        .is_err()
    );
    assert!(eval_on("name.given + 1", &patient()).is_err());
}

#[test]
fn limits() {
    let deep = "(".repeat(10_000) + "1" + &")".repeat(10_000);
    assert!(matches!(
        Expression::parse(&deep),
        Err(FhirPathError::LimitExceeded(_))
    ));
    // Self-similar structure: repeat() over 2^depth paths stays within the collection limit.
    let mut v = json!({"resourceType": "Questionnaire", "item": []});
    for _ in 0..40 {
        v = json!({"resourceType": "Questionnaire", "item": [{"linkId": "a", "item": v["item"].clone()}, {"linkId": "b", "item": v["item"].clone()}]});
        if v.to_string().len() > 200_000 {
            break;
        }
    }
    let r = eval_on("repeat(item).count()", &v);
    assert!(r.is_ok() || matches!(r, Err(FhirPathError::BudgetExhausted { .. })));
    let e = Expression::parse("(1 | 2 | 3).repeat($this + 1)").unwrap();
    assert!(matches!(
        e.evaluate(&v, &Environment::new()),
        Err(FhirPathError::BudgetExhausted { .. })
    ));
    // Exponential string growth is stopped by the string limit.
    let e = Expression::parse("(1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17|18|19|20|21|22|23|24|25|26|27|28|29|30).aggregate($total & $total, 'ab')").unwrap();
    let r = e.evaluate(&v, &Environment::new());
    assert!(
        matches!(r, Err(FhirPathError::BudgetExhausted { .. })),
        "{r:?}"
    );
    let e = Expression::parse("'x'.replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy').replace('', 'yyyyyyyyyyyyyyyyyyyyy').replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy').replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyy').replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyy')").unwrap();
    assert!(matches!(
        e.evaluate(&v, &Environment::new()),
        Err(FhirPathError::BudgetExhausted { .. })
    ));
    // A tight step budget stops a large traversal.
    let env = Environment::new().with_limits(Limits {
        max_steps: 50,
        ..Limits::default()
    });
    let e = Expression::parse("descendants().count()").unwrap();
    assert!(matches!(
        e.evaluate(&v, &env),
        Err(FhirPathError::BudgetExhausted { .. })
    ));
    // The deepest accepted expression evaluates without overflowing a test thread's stack.
    let nested = "(".repeat(parser::MAX_DEPTH / 3) + "1" + &")".repeat(parser::MAX_DEPTH / 3);
    assert!(Expression::parse(&nested).is_ok());
    let chain = "id".to_string() + &".id".repeat(parser::MAX_DEPTH - 2);
    Expression::parse(&chain)
        .unwrap()
        .evaluate(&v, &Environment::new())
        .unwrap();
}

#[test]
fn compile_cache() {
    let a = compile("name.given").unwrap();
    let b = compile("name.given").unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert!(compile("name.given(").is_err());
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Expression>();
}

/// A minimal resource of type `ty`, with a few common elements so paths have something to
/// walk on.
fn minimal(ty: &str) -> Value {
    json!({"resourceType": ty, "id": "x", "status": "active", "subject": {"reference": "Patient/1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "1"}]}, "identifier": [{"value": "a"}]})
}

#[test]
fn all_search_parameter_expressions() {
    let bundle: Value =
        serde_json::from_str(include_str!("../../data/fhir/search-parameters-r4.json")).unwrap();
    let mut count = 0;
    for entry in bundle["entry"].as_array().unwrap() {
        let sp = &entry["resource"];
        let Some(src) = sp["expression"].as_str() else {
            continue;
        };
        let expr = Expression::parse(src).unwrap_or_else(|e| panic!("{}: {src}: {e}", sp["id"]));
        for base in sp["base"].as_array().unwrap() {
            let base = base.as_str().unwrap();
            let res = minimal(if base == "Resource" || base == "DomainResource" {
                "Patient"
            } else {
                base
            });
            expr.evaluate(&res, &Environment::new())
                .unwrap_or_else(|e| panic!("{}: {src} on {base}: {e}", sp["id"]));
        }
        count += 1;
    }
    assert!(count > 1000, "{count}");
}

/// Every search parameter of the example resources' types evaluates without error on the
/// (realistic) examples of the official test suite.
#[test]
fn search_parameters_on_examples() {
    let bundle: Value =
        serde_json::from_str(include_str!("../../data/fhir/search-parameters-r4.json")).unwrap();
    let examples: Vec<Value> = [
        include_str!("../../tests/data/fhirpath/patient-example.json"),
        include_str!("../../tests/data/fhirpath/observation-example.json"),
        include_str!("../../tests/data/fhirpath/questionnaire-example.json"),
        include_str!("../../tests/data/fhirpath/valueset-example-expansion.json"),
    ]
    .iter()
    .map(|s| serde_json::from_str(s).unwrap())
    .collect();
    let mut evaluated = 0;
    for entry in bundle["entry"].as_array().unwrap() {
        let sp = &entry["resource"];
        let Some(src) = sp["expression"].as_str() else {
            continue;
        };
        let expr = compile(src).unwrap();
        for res in &examples {
            let rt = res["resourceType"].as_str().unwrap();
            let applies = sp["base"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b == rt || b == "Resource" || b == "DomainResource");
            if applies {
                expr.evaluate(res, &Environment::new())
                    .unwrap_or_else(|e| panic!("{}: {src}: {e}", sp["id"]));
                evaluated += 1;
            }
        }
    }
    assert!(evaluated > 50, "{evaluated}");
}

#[test]
fn medplum_style_criteria() {
    let cur = json!({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
        "valueQuantity": {"value": 7.5, "unit": "mmol/L", "code": "mmol/L", "system": "http://unitsofmeasure.org"}});
    let prev = json!({"resourceType": "Observation", "status": "preliminary"});
    let empty = json!({});
    let env = Environment::new()
        .with_variable("current", &cur)
        .with_variable("previous", &prev);
    let t = |src: &str, env: &Environment| compile(src).unwrap().evaluate_bool(&cur, env).unwrap();
    assert_eq!(
        t(
            "%previous.status = 'preliminary' and %current.status = 'final'",
            &env
        ),
        Some(true)
    );
    assert_eq!(
        t(
            "%current.code.coding.where(system = %loinc and code = '1234-5').exists()",
            &env
        ),
        Some(true)
    );
    assert_eq!(t("%current.value.as(Quantity).value > 7", &env), Some(true));
    assert_eq!(t("%previous.status != %current.status", &env), Some(true));
    let env2 = Environment::new()
        .with_variable("current", &cur)
        .with_variable("previous", &empty);
    assert_eq!(
        t(
            "%previous.exists() and %previous.status != %current.status",
            &env2
        ),
        Some(false)
    );
    assert_eq!(t("%previous.status.empty()", &env2), Some(true));
}

/// Behaviour pinned by the newer (R5-synced) official suite where it does not conflict with
/// the vendored R4 one.
#[test]
fn spec_details() {
    let p = patient();
    let ok = |src: &str| eval_on(src, &p).unwrap_or_else(|e| panic!("{src}: {e}"));
    assert_eq!(ok("@1973-12-25 + 7.7 days"), vec![json!("1974-01-01")]);
    assert_eq!(
        ok("@1973-12-25T00:00:00.000+10:00 + 1 hour"),
        vec![json!("1973-12-25T01:00:00.000+10:00")]
    );
    assert_eq!(ok("@1974-12-25 - 1 'month'"), vec![json!("1974-11-25")]);
    assert!(eval_on("@1973-12-25 + 1 'mo'", &p).is_err());
    assert!(eval_on("@1974-12-25 - 1 'cm'", &p).is_err());
    assert!(eval_on("@1974-12-25 + 7", &p).is_err());
    assert_eq!(ok("'abc'.replaceMatches('', 'x')"), vec![json!("abc")]);
    assert_eq!(
        ok("'abc123'.replaceMatches('[0-9]', '-')"),
        vec![json!("abc---")]
    );
    assert_eq!(ok("'abc'.replace('', 'x')"), vec![json!("xaxbxcx")]);
    assert_eq!(ok("'Library/x'.matches('Library')"), vec![json!(true)]);
    assert_eq!(ok("'Library/x'.matchesFull('Library')"), vec![json!(false)]);
    assert_eq!(
        ok("@2018-03-01T10:30 < @2018-03-01T10:30:00"),
        Vec::<Value>::new()
    );
    assert_eq!(
        ok("@2018-03-01T10:30:00 < @2018-03-01T10:30:00.0"),
        vec![json!(false)]
    );
    assert_eq!(
        ok("@2012-04-15T15:00:00+02:00 = @2012-04-15T16:00:00+03:00"),
        vec![json!(true)]
    );
    assert_eq!(
        ok("name.select(iif(use = 'usual', $index, {}))"),
        vec![json!(1)]
    );
    assert_eq!(
        ok("('context').iif($this = 'context', 'yes', 'no')"),
        vec![json!("yes")]
    );
    assert_eq!(ok("(1 | 2 | 3) ~ (3 | 2 | 1)"), vec![json!(true)]);
    assert_eq!(ok("(-1).power(0.5)"), Vec::<Value>::new());
    assert_eq!(ok("1 / 0"), Vec::<Value>::new());
    assert_eq!(ok("(true and 'foo').empty()"), vec![json!(false)]);
    assert_eq!(
        ok("gender.is(code) and gender.is(string) and gender.is(id).not()"),
        vec![json!(true)]
    );
    assert!(eval_on("name.given.startsWith('P')", &p).is_err());
    assert!(eval_on("(1 | 2).not()", &p).is_err());
    assert!(eval_on("iif(1 | 2, true, false)", &p).is_err());
    assert_eq!(ok("birthDate = @1974-12-25T12:34:00"), Vec::<Value>::new());
    assert_eq!(ok("@2012-04-15 ~ @2012-04-15T10:00:00"), vec![json!(false)]);
    assert_eq!(
        ok("@2012-04-15T15:00:00Z = @2012-04-15T10:00:00"),
        Vec::<Value>::new()
    );
    assert_eq!(ok("gender.as(string)"), Vec::<Value>::new());
    assert_eq!(ok("gender.as(code)"), vec![json!("male")]);
    assert_eq!(ok("name.as(HumanName).count()"), vec![json!(2)]);
    assert!(matches!(
        Expression::parse("gender.ofType(string1)"),
        Err(FhirPathError::Semantic { .. })
    ));
    assert!(Expression::parse("@T14:34:28Z").is_err());
    assert_eq!(
        ok("1 week.toString() & ' ' & 1 'wk'.toString()"),
        vec![json!("1 week 1 'wk'")]
    );
    assert_eq!(ok("(1.2 / 1.8).round(2) != 0.6666667"), vec![json!(true)]);
    assert_eq!(ok("1.2 / 1.8 ~ 0.67"), vec![json!(true)]);
}

/// The deepest expressions the parser accepts evaluate within a 2 MiB thread stack (the size
/// of test and tokio worker threads) in a debug build.
#[test]
fn deepest_accepted_expressions_fit_the_stack() {
    let p = patient();
    let mut deepest = None;
    for n in 1..200 {
        let src = "name.where(".repeat(n) + "true" + &")".repeat(n);
        match Expression::parse(&src) {
            Ok(e) => deepest = Some(e),
            Err(FhirPathError::LimitExceeded(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let e = deepest.unwrap();
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || e.evaluate(&p, &Environment::new()).map(|r| r.len()));
    assert!(handle.unwrap().join().unwrap().is_ok());
    let mut deepest = None;
    for n in 1..400 {
        let src = "iif(".repeat(n) + "true" + &", 1, 2)".repeat(n);
        match Expression::parse(&src) {
            Ok(e) => deepest = Some(e),
            Err(FhirPathError::LimitExceeded(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let e = deepest.unwrap();
    let p = patient();
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || e.evaluate(&p, &Environment::new()).map(|r| r.len()));
    assert!(handle.unwrap().join().unwrap().is_ok());
}

#[test]
fn arithmetic_overflow_is_not_a_panic() {
    let p = patient();
    for src in [
        "-(-9223372036854775807 - 1)",
        "(-9223372036854775807 - 1).abs()",
        "9223372036854775807 + 1",
        "9223372036854775807 * 2",
        "@2019-01-01 + 100000000000000000 years",
        "@2019-01-01 + 100000000000000000 days",
        "@2019-01-01T00:00:00Z + 1000000000000000000 seconds",
        "@T10:00 + 9223372036854775807 hours",
        "(-9223372036854775807 - 1) div -1",
        "(-9223372036854775807 - 1) mod -1",
        "2.power(1000)",
        "1e3",
    ] {
        // Any outcome but a panic is fine: a value, empty, or an error.
        let _ = Expression::parse(src).and_then(|e| e.evaluate(&p, &Environment::new()));
    }
}

#[test]
fn custom_resource_types_navigate_untyped() {
    let bot = json!({"resourceType": "Bot", "id": "b1", "name": "x", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}});
    assert_eq!(eval_on("Resource.id", &bot).unwrap(), vec![json!("b1")]);
    assert_eq!(eval_on("Bot.name", &bot).unwrap(), vec![json!("x")]);
    assert_eq!(
        eval_on("meta.lastUpdated > @2023", &bot).unwrap(),
        vec![json!(true)]
    );
}

/// Random token soup never panics: every outcome is a value or a typed error.
#[test]
fn random_expressions_never_panic() {
    const TOKENS: &[&str] = &[
        "name",
        "given",
        "family",
        "birthDate",
        "telecom",
        "Patient",
        "Resource",
        "value",
        "extension",
        "id",
        ".",
        ".",
        ".",
        "(",
        ")",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        "+",
        "-",
        "*",
        "/",
        "|",
        "&",
        "=",
        "!=",
        "~",
        "<",
        ">=",
        "and",
        "or",
        "xor",
        "implies",
        "div",
        "mod",
        "in",
        "contains",
        "is",
        "as",
        "String",
        "Quantity",
        "where(",
        "select(",
        "repeat(",
        "exists(",
        "all(",
        "iif(",
        "descendants()",
        "children()",
        "resolve()",
        "first()",
        "last()",
        "count()",
        "distinct()",
        "not()",
        "empty()",
        "toString()",
        "toInteger()",
        "length()",
        "substring(",
        "replace(",
        "matches(",
        "split(",
        "join(",
        "aggregate(",
        "ofType(",
        "trace(",
        "type()",
        "1",
        "2.5",
        "0",
        "-1",
        "'a'",
        "'\\u0041'",
        "''",
        "@2019",
        "@2019-01-01T10:00Z",
        "@T10:00",
        "4 'mg'",
        "1 year",
        "true",
        "false",
        "$this",
        "$index",
        "$total",
        "%resource",
        "%ucum",
        "%current",
        "`given`",
        "'(.*)*'",
    ];
    let p = patient();
    let env = Environment::new()
        .with_variable("current", &p)
        .with_limits(Limits {
            max_steps: 5_000,
            max_collection: 1_000,
            max_string: 10_000,
            ..Limits::default()
        });
    // A small deterministic LCG keeps the test reproducible without a dependency.
    let mut state: u64 = 0x5eed;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut parsed = 0;
    for _ in 0..3000 {
        let len = 1 + next(12);
        let src: Vec<&str> = (0..len).map(|_| TOKENS[next(TOKENS.len())]).collect();
        let src = src.join(" ");
        if let Ok(e) = Expression::parse(&src) {
            parsed += 1;
            let _ = e.evaluate(&p, &env);
        }
    }
    assert!(parsed > 100, "{parsed}");
}

#[test]
fn compile_cache_is_thread_safe() {
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..200 {
                    let src = format!("name.given.count() > {}", (i + t) % 50);
                    let e = compile(&src).unwrap();
                    assert_eq!(e.source(), src);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// The large patient of the budget tests, built once (3.8 MB, about 22,000 identifiers).
fn large_patient() -> &'static Value {
    static P: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(|| hostile::large_patient(3_800_000));
    &P
}

/// `Err` describing what happened instead of an exhausted budget.
fn budget_outcome(src: &str) -> Result<(), String> {
    let p = large_patient();
    let env = Environment::new().with_variable("current", p);
    let e = Expression::parse(src).map_err(|e| format!("{src}: {e}"))?;
    match e.evaluate(p, &env) {
        Err(err) if err.is_budget_exhausted() => Ok(()),
        Err(err) => Err(format!("{src}: expected an exhausted budget, got {err}")),
        Ok(out) => Err(format!(
            "{src}: expected an exhausted budget, got {} items",
            out.len()
        )),
    }
}

fn assert_budget_exhausted(src: &str) {
    if let Err(e) = budget_outcome(src) {
        panic!("{e}");
    }
}

#[test]
fn large_patient_is_near_the_store_limit() {
    let p = large_patient();
    let len = p.to_string().len();
    assert!((3_000_000..=4 << 20).contains(&len), "{len}");
    let n = p["identifier"].as_array().unwrap().len();
    assert!(n > 20_000, "{n}");
}

#[test]
fn budget_stops_growing_strings_in_repeat() {
    assert_budget_exhausted("'a'.repeat($this + 'a').count() > 0");
}

#[test]
fn budget_charges_inner_iterations_of_nested_select() {
    assert_budget_exhausted(
        "%current.identifier.select(%current.identifier.select(%current.identifier.count())).count() > 0",
    );
}

#[test]
fn budget_stops_every_hostile_expression() {
    let family = hostile::expressions();
    assert!(family.len() > 50, "{}", family.len());
    let failures: Vec<String> = family
        .iter()
        .filter_map(|src| budget_outcome(src).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn budget_error_is_typed_and_named() {
    let env = Environment::new().with_limits(Limits {
        max_steps: 100,
        ..Limits::default()
    });
    let e = Expression::parse("'a'.repeat($this + 'a').count()").unwrap();
    let p = patient();
    let err = e.evaluate(&p, &env).unwrap_err();
    assert_eq!(
        err,
        FhirPathError::BudgetExhausted {
            what: Budget::Steps,
            limit: 100
        }
    );
    assert!(err.is_budget_exhausted());
    assert!(err.to_string().contains("work (steps)"), "{err}");
    // Memory is its own part of the budget.
    let env = Environment::new().with_limits(Limits {
        max_bytes: 4096,
        ..Limits::default()
    });
    let err = Expression::parse("'abcdefgh'.repeat($this & 'abcdefgh').count()")
        .unwrap()
        .evaluate(&p, &env)
        .unwrap_err();
    assert!(
        matches!(
            err,
            FhirPathError::BudgetExhausted {
                what: Budget::Bytes,
                ..
            }
        ),
        "{err}"
    );
    // Other errors are not budget errors.
    assert!(
        !eval_on("name.given.single()", &p)
            .unwrap_err()
            .is_budget_exhausted()
    );
    assert!(
        !Expression::parse("name.(")
            .unwrap_err()
            .is_budget_exhausted()
    );
}

/// Ordinary criteria stay far inside the budget even on the large resource.
#[test]
fn ordinary_expressions_fit_the_budget_on_a_large_resource() {
    let p = large_patient();
    let env = Environment::new().with_variable("current", p);
    for src in [
        "%current.identifier.where(system = 'urn:oid:2.16.840.1.113883.19.5' and value = 'MRN-00021999').exists()",
        "%current.identifier.value contains 'MRN-00000001'",
        "Patient.identifier.count() > 20000",
        "%current.identifier.type.coding.where(code = 'MR').exists()",
        "Patient.name.given.first() = 'Peter'",
    ] {
        let (out, spent) = Expression::parse(src).unwrap().evaluate_measured(p, &env);
        assert!(out.is_ok(), "{src}: {out:?}");
        // A `where()` over 22,000 identifiers is real work: it takes most of the budget (that
        // is the price of bounding every evaluation), but it fits.
        let limits = Limits::default();
        assert!(
            spent.steps < limits.max_steps * 4 / 5 && spent.bytes < limits.max_bytes * 4 / 5,
            "{src}: {spent:?}"
        );
    }
}

/// Medplum's lexer reads double-quoted strings and backtick-quoted identifiers; its own
/// subscription tests write criteria so (docs/medplum-rest-hook.md).
#[test]
fn medplum_lexer_double_quotes_and_backticks() {
    let cur = json!({"resourceType": "Encounter", "status": "completed",
        "name": [{"given": ["Bob", "Rob"]}]});
    let prev = json!({"resourceType": "Encounter", "status": "in-progress"});
    let env = Environment::new()
        .with_variable("current", &cur)
        .with_variable("previous", &prev);
    let t = |src: &str, env: &Environment| {
        compile(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .evaluate_bool(&cur, env)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
    };
    assert_eq!(
        t(
            r#"%previous.status = "in-progress" and %current.status = "completed""#,
            &env
        ),
        Some(true)
    );
    assert_eq!(
        t(r#"%current.name.given.first() = "Bob""#, &env),
        Some(true)
    );
    assert_eq!(
        t(r#"%current.name.given.first() = "Rob""#, &env),
        Some(false)
    );
    assert_eq!(t("%current.name.`given`.first() = 'Bob'", &env), Some(true));
    assert_eq!(
        t(r#"%current.`name`.`given`.last() = "Rob""#, &env),
        Some(true)
    );
    assert_eq!(t(r#"%current.`status` = "completed""#, &env), Some(true));
    // Same escapes as single-quoted strings; a single quote needs none inside double quotes.
    assert_eq!(eval(r#""a\"b\u0041\n""#), vec![json!("a\"bA\n")]);
    assert_eq!(eval(r#""it's" = 'it\'s'"#), vec![json!(true)]);
    assert_eq!(eval(r#"'say "hi"' = "say \"hi\"""#), vec![json!(true)]);
    // The other side of the transition does not pass.
    let back = Environment::new()
        .with_variable("current", &prev)
        .with_variable("previous", &cur);
    assert_eq!(
        compile(r#"%previous.status = "in-progress" and %current.status = "completed""#)
            .unwrap()
            .evaluate_bool(&prev, &back)
            .unwrap(),
        Some(false)
    );
    assert!(compile(r#"%current.status = "unterminated"#).is_err());
    assert!(compile(r#""bad \q escape""#).is_err());
}
