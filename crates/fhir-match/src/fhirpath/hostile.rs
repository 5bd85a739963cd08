//! Hostile input for the evaluation budget: a resource near the store's 4 MiB size limit and a
//! generated family of expressions that grow work or memory faster than linearly on it. The
//! engine's tests assert that each ends with [`FhirPathError::BudgetExhausted`], and
//! `fhir-outbox bench --only fhirpath` measures what each costs before it does, against the
//! targets the default [`Limits`] are calibrated for.
//!
//! [`FhirPathError::BudgetExhausted`]: super::FhirPathError::BudgetExhausted
//! [`Limits`]: super::Limits

use serde_json::{Value, json};

/// A Patient whose JSON is about `bytes` long, almost all of it identifiers (about 160 bytes
/// each, all distinct: 22,000 of them make 3.8 MB).
pub fn large_patient(bytes: usize) -> Value {
    let identifier = |i: usize| {
        json!({
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            "system": "urn:oid:2.16.840.1.113883.19.5",
            "value": format!("MRN-{i:08}")
        })
    };
    let per = identifier(0).to_string().len() + 1;
    let identifiers: Vec<Value> = (0..bytes / per).map(identifier).collect();
    json!({
        "resourceType": "Patient",
        "id": "large",
        "active": true,
        "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
        "identifier": identifiers
    })
}

/// Collections of the large patient that the generated expressions feed on: tens of thousands
/// of distinct items (equal items would make `distinct()` and friends linear), borrowed nodes,
/// borrowed strings and strings the engine builds. `%current` is the patient, as for subscription criteria.
const PRODUCERS: [&str; 3] = [
    "%current.identifier",
    "%current.identifier.value",
    "%current.identifier.select(system & '|' & value)",
];

/// Shapes that are quadratic (or worse) in the size of the collection `{p}`.
const SHAPES: [&str; 16] = [
    "{p}.select({p}.count()).count() > 0",
    "{p}.where({p}.exists()).count() > 0",
    "{p}.all({p}.count() > 0)",
    "{p}.exists({p}.count() < 0)",
    "{p}.repeat({p}).count() > 0",
    "{p}.aggregate($total.combine({p}), {}).count() > 0",
    "{p}.aggregate($total | $this, {}).count() > 0",
    "({p} | {p}).count() > 0",
    "{p}.union({p}).count() > 0",
    "{p}.distinct().count() > 0",
    "{p}.isDistinct()",
    "{p}.subsetOf({p})",
    "{p}.intersect({p}).count() > 0",
    "{p}.exclude({p}).count() >= 0",
    "{p} ~ {p}",
    "{p}.combine({p}).combine({p}).combine({p}).combine({p}).count() > 0",
];

/// Expressions that must exhaust the default budget on [`large_patient`] of 3.8 MB:
/// the two from the incident report, string growth, nested navigation, and every
/// [`SHAPES`] × [`PRODUCERS`] combination.
pub fn expressions() -> Vec<String> {
    let mut out: Vec<String> = [
        // The incident: intermediate strings and collections grow together.
        "'a'.repeat($this + 'a').count() > 0",
        "%current.identifier.select(%current.identifier.select(%current.identifier.count())).count() > 0",
        "'a'.repeat($this & $this).count() > 0",
        "(1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17|18|19|20|21|22|23|24|25).aggregate($total & $total, 'ab').length() > 0",
        "%current.identifier.value.aggregate($total & $this, '').length() > 0",
        "%current.identifier.select(%current.identifier.value.join(',')).count() > 0",
        "%current.identifier.select(%current.identifier.value.join('').upper()).count() > 0",
        "%current.identifier.select(%current.identifier.value.join('').matches('z$')).count() > 0",
        "%current.identifier.value.join('').toChars().count() > 0",
        "%current.identifier.select(%current.identifier.value.join('').matches('(M|R|N|-|[0-9])*Q')).count() > 0",
        "%current.identifier.select(%current.identifier.value.join('').replaceMatches('([A-Z]+)-([0-9]+)', '$2$1')).count() > 0",
        "%current.identifier.value.join(',').split(',').select(%current.identifier.value.join(',')).count() > 0",
        "%current.identifier.value.join('').replace('M', 'MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM').length() > 0",
        "%current.descendants().count() > 0",
        "%current.identifier.select(%current.children().descendants().count()).count() > 0",
        "%current.identifier.select(%current.identifier.type.coding.code.distinct()).count() > 0",
        "%current.identifier.select(%current.identifier = %current.identifier).count() > 0",
        "%current.identifier.select(%current.identifier.value contains $this.value).count() > 0",
        "%current.identifier.where(%current.identifier.value.join().length() > 0).count() > 0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for shape in SHAPES {
        for p in PRODUCERS {
            out.push(shape.replace("{p}", p));
        }
    }
    out
}
