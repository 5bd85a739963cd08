//! The tour's subscriptions: each one shows one way a subscription chooses its changes.

use crate::cli::receiver::Endpoint;
use fhir_outbox::subscription::extension;
use serde_json::{Value, json};

/// Requests of each notification the flaky endpoint answers 503 before accepting one.
pub const FLAKY_FAILURES: u32 = 2;

/// One subscription of the tour.
pub struct DemoSubscription {
    /// A short name for the tables.
    pub name: &'static str,
    /// The receiver path it delivers to.
    pub path: &'static str,
    /// Its `criteria`.
    pub criteria: &'static str,
    /// Its extensions that filter further, as shown to the user.
    pub filter: &'static str,
    /// What it shows, in a sentence.
    pub lesson: &'static str,
    /// Extensions beyond the secret.
    extensions: Vec<Value>,
    /// The receiver fails this many requests per webhook-id.
    fail_first: u32,
}

impl DemoSubscription {
    /// Its secret. A different one per subscription, as in real life; the receiver knows each.
    pub fn secret(&self) -> String {
        format!("demo-secret-{}", self.path.trim_start_matches('/'))
    }

    /// The receiver endpoint that checks its signatures.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            path: self.path.to_owned(),
            secret: self.secret(),
            fail_first: self.fail_first,
        }
    }

    /// The Subscription resource, delivering to `base_url` + its path.
    pub fn resource(&self, base_url: &str) -> Value {
        let mut extensions =
            vec![json!({ "url": extension::SECRET, "valueString": self.secret() })];
        extensions.extend(self.extensions.iter().cloned());
        json!({
            "resourceType": "Subscription",
            "status": "active",
            "reason": self.lesson,
            "criteria": self.criteria,
            "channel": {
                "type": "rest-hook",
                "endpoint": format!("{base_url}{}", self.path),
                "payload": "application/fhir+json"
            },
            "extension": extensions
        })
    }
}

/// The four subscriptions.
pub fn all() -> Vec<DemoSubscription> {
    vec![
        DemoSubscription {
            name: "heart-rate",
            path: "/heart-rate",
            criteria: "Observation?code=http://loinc.org|8867-4",
            filter: "",
            lesson: "FHIR search: heart-rate Observations only, not body temperatures",
            extensions: vec![],
            fail_first: 0,
        },
        DemoSubscription {
            name: "patient-activated",
            path: "/patient-activated",
            criteria: "Patient",
            filter: "+ FHIRPath `%previous.active = false and %current.active = true`",
            lesson: "FHIRPath on the change: only when a Patient goes from inactive to active",
            extensions: vec![json!({
                "url": extension::FHIRPATH_CRITERIA,
                "valueString": "%previous.active = false and %current.active = true"
            })],
            fail_first: 0,
        },
        DemoSubscription {
            name: "new-encounter",
            path: "/new-encounter",
            criteria: "Encounter",
            filter: "+ supported interaction `create`",
            lesson: "only new Encounters: their updates are not sent",
            extensions: vec![json!({
                "url": extension::SUPPORTED_INTERACTION,
                "valueCode": "create"
            })],
            fail_first: 0,
        },
        DemoSubscription {
            name: "flaky",
            path: "/flaky",
            criteria: "Patient",
            filter: "",
            lesson: "every Patient change; the endpoint answers 503 twice per notification: retries",
            extensions: vec![],
            fail_first: FLAKY_FAILURES,
        },
    ]
}
