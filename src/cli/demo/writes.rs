//! The tour's stream of writes: a fixed cycle of creates, updates and deletes, chosen so that each
//! subscription has something to match and something to ignore.

use fhir_outbox::capture::{self, StoreError, WriteContext};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::VecDeque;
use uuid::Uuid;

/// Patients written before the subscriptions exist. Enough of them that a Patient is changed again
/// only seconds later, after the flaky endpoint's retries of its previous change are over (a retry
/// of a version that is no longer current is skipped: the newer version has its own delivery).
pub const SEED_PATIENTS: usize = 8;

/// Writes made so far, by kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteCounts {
    /// Creates.
    pub creates: u64,
    /// Updates.
    pub updates: u64,
    /// Deletes.
    pub deletes: u64,
}

impl WriteCounts {
    /// All writes.
    pub fn total(&self) -> u64 {
        self.creates + self.updates + self.deletes
    }
}

/// One write of the stream, described for the live view.
#[derive(Debug, Clone)]
pub struct Done {
    /// e.g. `update Patient/1f3e… active false → true`.
    pub action: String,
    /// The subscriptions expected to be notified, or why none is.
    pub expect: &'static str,
}

struct Patient {
    id: String,
    resource: Value,
}

/// Makes the writes, one per call to [`Writer::next`].
pub struct Writer {
    pool: PgPool,
    project: Uuid,
    step: u64,
    patients: VecDeque<Patient>,
    heart_rates: VecDeque<(String, Value)>,
    encounters: VecDeque<(String, Value)>,
    counts: WriteCounts,
}

fn id_of(resource: &Value) -> String {
    resource["id"].as_str().unwrap_or_default().to_owned()
}

/// The first 8 characters of an id: enough to follow one resource on screen.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

impl Writer {
    /// A writer into `project`.
    pub fn new(pool: PgPool, project: Uuid) -> Writer {
        Writer {
            pool,
            project,
            step: 0,
            patients: VecDeque::new(),
            heart_rates: VecDeque::new(),
            encounters: VecDeque::new(),
            counts: WriteCounts::default(),
        }
    }

    /// Writes made so far (the seed patients are not counted).
    pub fn counts(&self) -> WriteCounts {
        self.counts
    }

    fn context(&self) -> WriteContext {
        // The request id travels with the change to its deliveries: `demo-12` can be followed in SQL.
        WriteContext {
            author: Some("Practitioner/demo".to_owned()),
            request_id: Some(format!("demo-{}", self.counts.total() + 1)),
            ..WriteContext::default()
        }
    }

    /// Writes the seed patients (before the subscriptions, so nothing is sent for them).
    pub async fn seed(&mut self) -> Result<(), StoreError> {
        for n in 0..SEED_PATIENTS {
            // Half of them active, so that updates go both ways from the start: true → false is
            // sent to flaky only, false → true to patient-activated as well.
            let mut patient = patient(n as u64);
            patient["active"] = json!(n % 2 == 0);
            let written =
                capture::create(&self.pool, self.project, &patient, &WriteContext::default())
                    .await?;
            self.patients.push_back(Patient {
                id: id_of(&written.resource),
                resource: written.resource,
            });
        }
        Ok(())
    }

    /// Makes the next write of the cycle.
    pub async fn next(&mut self) -> Result<Done, StoreError> {
        let step = self.step;
        self.step += 1;
        match step % 9 {
            0 => self.create_observation(true).await,
            1 => self.create_patient().await,
            2 => self.create_observation(false).await,
            3 | 7 => self.toggle_patient().await,
            4 => self.create_encounter().await,
            5 => self.update_heart_rate().await,
            6 => self.finish_encounter().await,
            _ if (step / 9) % 2 == 0 => self.delete_heart_rate().await,
            _ => self.delete_patient().await,
        }
    }

    async fn create_observation(&mut self, heart_rate: bool) -> Result<Done, StoreError> {
        let subject = self
            .patients
            .back()
            .map(|p| p.id.clone())
            .unwrap_or_default();
        let (code, display, value, unit) = if heart_rate {
            ("8867-4", "Heart rate", 60 + (self.step % 40) as i64, "/min")
        } else {
            ("8310-5", "Body temperature", 37, "Cel")
        };
        let observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": { "coding": [{ "system": "http://loinc.org", "code": code, "display": display }] },
            "subject": { "reference": format!("Patient/{subject}") },
            "valueQuantity": { "value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit }
        });
        let written =
            capture::create(&self.pool, self.project, &observation, &self.context()).await?;
        self.counts.creates += 1;
        let id = id_of(&written.resource);
        let action = format!("create Observation/{} ({display})", short(&id));
        if heart_rate {
            self.heart_rates.push_back((id, written.resource));
            Ok(Done {
                action,
                expect: "heart-rate",
            })
        } else {
            Ok(Done {
                action,
                expect: "none: heart-rate's criteria want LOINC 8867-4",
            })
        }
    }

    async fn create_patient(&mut self) -> Result<Done, StoreError> {
        let patient = patient(self.step);
        let written = capture::create(&self.pool, self.project, &patient, &self.context()).await?;
        self.counts.creates += 1;
        let id = id_of(&written.resource);
        let action = format!("create Patient/{} (active: false)", short(&id));
        self.patients.push_back(Patient {
            id,
            resource: written.resource,
        });
        Ok(Done {
            action,
            expect: "flaky (patient-activated: no, there is no previous version)",
        })
    }

    /// Flips `active` on the Patient changed longest ago.
    async fn toggle_patient(&mut self) -> Result<Done, StoreError> {
        let Some(mut patient) = self.patients.pop_front() else {
            return self.create_patient().await;
        };
        let was = patient.resource["active"].as_bool().unwrap_or(false);
        patient.resource["active"] = json!(!was);
        let written = capture::update(
            &self.pool,
            self.project,
            "Patient",
            &patient.id,
            &patient.resource,
            None,
            &self.context(),
        )
        .await?;
        self.counts.updates += 1;
        patient.resource = written.resource;
        let action = format!(
            "update Patient/{} active: {was} → {}",
            short(&patient.id),
            !was
        );
        self.patients.push_back(patient);
        Ok(Done {
            action,
            expect: if was {
                "flaky only (patient-activated's FHIRPath is false)"
            } else {
                "patient-activated and flaky"
            },
        })
    }

    async fn create_encounter(&mut self) -> Result<Done, StoreError> {
        let subject = self
            .patients
            .back()
            .map(|p| p.id.clone())
            .unwrap_or_default();
        let encounter = json!({
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
            "subject": { "reference": format!("Patient/{subject}") }
        });
        let written =
            capture::create(&self.pool, self.project, &encounter, &self.context()).await?;
        self.counts.creates += 1;
        let id = id_of(&written.resource);
        let action = format!("create Encounter/{} (in-progress)", short(&id));
        self.encounters.push_back((id, written.resource));
        Ok(Done {
            action,
            expect: "new-encounter",
        })
    }

    async fn finish_encounter(&mut self) -> Result<Done, StoreError> {
        let Some((id, mut encounter)) = self.encounters.pop_front() else {
            return self.create_encounter().await;
        };
        encounter["status"] = json!("finished");
        capture::update(
            &self.pool,
            self.project,
            "Encounter",
            &id,
            &encounter,
            None,
            &self.context(),
        )
        .await?;
        self.counts.updates += 1;
        Ok(Done {
            action: format!("update Encounter/{} status → finished", short(&id)),
            expect: "none: new-encounter takes creates only",
        })
    }

    async fn update_heart_rate(&mut self) -> Result<Done, StoreError> {
        let Some((id, observation)) = self.heart_rates.back_mut() else {
            return self.create_observation(true).await;
        };
        let value = observation["valueQuantity"]["value"].as_i64().unwrap_or(70) + 1;
        observation["valueQuantity"]["value"] = json!(value);
        let (id, observation) = (id.clone(), observation.clone());
        let written = capture::update(
            &self.pool,
            self.project,
            "Observation",
            &id,
            &observation,
            None,
            &self.context(),
        )
        .await?;
        if let Some(last) = self.heart_rates.back_mut() {
            last.1 = written.resource;
        }
        self.counts.updates += 1;
        Ok(Done {
            action: format!("update Observation/{} heart rate → {value}/min", short(&id)),
            expect: "heart-rate",
        })
    }

    async fn delete_heart_rate(&mut self) -> Result<Done, StoreError> {
        let Some((id, _)) = self.heart_rates.pop_front() else {
            return self.create_observation(true).await;
        };
        capture::delete(
            &self.pool,
            self.project,
            "Observation",
            &id,
            &self.context(),
        )
        .await?;
        self.counts.deletes += 1;
        Ok(Done {
            action: format!("delete Observation/{}", short(&id)),
            expect: "heart-rate (body `{}`, X-Medplum-Deleted-Resource header)",
        })
    }

    async fn delete_patient(&mut self) -> Result<Done, StoreError> {
        // Keep enough Patients that each is changed only every few seconds (see SEED_PATIENTS).
        if self.patients.len() <= SEED_PATIENTS {
            return self.toggle_patient().await;
        }
        let Some(patient) = self.patients.pop_front() else {
            return self.create_patient().await;
        };
        capture::delete(
            &self.pool,
            self.project,
            "Patient",
            &patient.id,
            &self.context(),
        )
        .await?;
        self.counts.deletes += 1;
        Ok(Done {
            action: format!("delete Patient/{}", short(&patient.id)),
            expect: "flaky (body `{}`, X-Medplum-Deleted-Resource header)",
        })
    }
}

fn patient(n: u64) -> Value {
    const FAMILIES: [&str; 6] = [
        "Chalmers",
        "Nakamura",
        "Okafor",
        "Lindqvist",
        "Moreau",
        "Silva",
    ];
    const GIVEN: [&str; 6] = ["Peter", "Aiko", "Chidi", "Astrid", "Camille", "João"];
    json!({
        "resourceType": "Patient",
        "active": false,
        "name": [{ "family": FAMILIES[n as usize % 6], "given": [GIVEN[(n as usize / 6) % 6]] }],
        "birthDate": format!("19{:02}-0{}-1{}", 40 + n % 60, 1 + n % 9, n % 10)
    })
}
