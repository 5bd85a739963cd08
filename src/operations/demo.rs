//! `fhir-outbox demo`: a guided run against a database (a throwaway cluster by default) that makes a
//! few writes and shows what the store kept and what the outbox captured.

use crate::capture::{self, StoreError, WriteContext};
use crate::operations::Table;
use crate::{db, project};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::io::Write;

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Connecting or migrating failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// A write was refused unexpectedly.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another database error.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// Writing to the terminal failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// One step of the tour: what was done and what the store answered.
struct Step {
    action: &'static str,
    reference: String,
    outcome: String,
}

/// Runs the tour on the database at `database_url` (migrating it first) and prints it to `out`.
pub async fn run(database_url: &str, out: &mut impl Write) -> Result<(), DemoError> {
    let pool = db::connect(database_url, 4).await?;
    db::migrate(&pool).await?;
    writeln!(out, "Migrations applied.")?;

    let project_id = project::create_project(&pool, "demo").await?;
    writeln!(out, "Project `demo`: {project_id}\n")?;
    let steps = make_writes(&pool, project_id).await?;

    let mut writes = Table::new(["#", "write", "resource", "result"]);
    for (number, step) in steps.iter().enumerate() {
        writes.row([
            (number + 1).to_string(),
            step.action.to_owned(),
            step.reference.clone(),
            step.outcome.clone(),
        ]);
    }
    writeln!(out, "Writes:\n{writes}\n")?;

    let changes = capture::changes_since(&pool, project_id, 0, 100).await?;
    let mut outbox = Table::new([
        "seq",
        "interaction",
        "resource",
        "version",
        "previous",
        "changed at",
        "trace id",
    ]);
    for change in &changes {
        outbox.row([
            change.seq.to_string(),
            change.interaction.to_string(),
            format!("{}/{}", change.resource_type, change.resource_id),
            change.version_id.to_string(),
            change
                .previous_version_id
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            change.changed_at.format("%H:%M:%S%.3f").to_string(),
            change.trace_id.clone(),
        ]);
    }
    writeln!(
        out,
        "Outbox: {} rows for {} writes (no row for the unchanged update, the rolled-back create, the \
         AuditEvent or the second delete):\n{outbox}\n",
        changes.len(),
        steps.len()
    )?;
    writeln!(
        out,
        "See it in SQL:\n  SELECT * FROM fhir_outbox.outbox WHERE project_id = '{project_id}' ORDER BY seq;\n  \
         SELECT * FROM fhir_outbox.resource_history('{project_id}', 'Patient', '<id>');"
    )?;
    pool.close().await;
    Ok(())
}

fn outcome_text(written: &capture::Written) -> String {
    format!("{}, version {}", written.outcome, written.version_id)
}

async fn make_writes(pool: &PgPool, project_id: uuid::Uuid) -> Result<Vec<Step>, DemoError> {
    let context = WriteContext {
        author: Some("Practitioner/demo".to_owned()),
        ..WriteContext::default()
    };
    let mut steps = Vec::new();

    let patient = json!({
        "resourceType": "Patient",
        "name": [{ "family": "Chalmers", "given": ["Peter"] }],
        "gender": "male",
        "birthDate": "1974-12-25"
    });
    let created = capture::create(pool, project_id, &patient, &context).await?;
    let patient_id = created.resource["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let patient_ref = format!("Patient/{patient_id}");
    steps.push(Step {
        action: "create",
        reference: patient_ref.clone(),
        outcome: outcome_text(&created),
    });

    let mut changed = created.resource.clone();
    changed["telecom"] = json!([{ "system": "phone", "value": "(03) 5555 6473" }]);
    let updated = capture::update(
        pool,
        project_id,
        "Patient",
        &patient_id,
        &changed,
        Some(1),
        &context,
    )
    .await?;
    steps.push(Step {
        action: "update (If-Match 1)",
        reference: patient_ref.clone(),
        outcome: outcome_text(&updated),
    });

    let same = capture::update(
        pool,
        project_id,
        "Patient",
        &patient_id,
        &updated.resource,
        None,
        &context,
    )
    .await?;
    steps.push(Step {
        action: "update, same content",
        reference: patient_ref.clone(),
        outcome: outcome_text(&same),
    });

    let stale = capture::update(
        pool,
        project_id,
        "Patient",
        &patient_id,
        &patient_with_id(&patient, &patient_id),
        Some(1),
        &context,
    )
    .await;
    steps.push(Step {
        action: "update (If-Match 1)",
        reference: patient_ref.clone(),
        outcome: match stale {
            Err(StoreError::VersionConflict {
                current_version, ..
            }) => format!(
                "refused: version conflict, current is {}",
                current_version.unwrap_or_default()
            ),
            Err(error) => return Err(error.into()),
            Ok(written) => outcome_text(&written),
        },
    });

    let observation = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4", "display": "Heart rate" }] },
        "subject": { "reference": patient_ref },
        "valueQuantity": { "value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min" }
    });
    let observation = capture::create(pool, project_id, &observation, &context).await?;
    let observation_id = observation.resource["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    steps.push(Step {
        action: "create",
        reference: format!("Observation/{observation_id}"),
        outcome: outcome_text(&observation),
    });

    // An application's own transaction: its resource write is undone with everything else.
    let mut transaction = pool.begin().await?;
    let encounter =
        json!({ "resourceType": "Encounter", "status": "planned", "class": { "code": "AMB" } });
    let rolled_back = capture::create(&mut *transaction, project_id, &encounter, &context).await?;
    transaction.rollback().await?;
    steps.push(Step {
        action: "create, then ROLLBACK",
        reference: format!(
            "Encounter/{}",
            rolled_back.resource["id"].as_str().unwrap_or_default()
        ),
        outcome: "rolled back".to_owned(),
    });

    let audit = json!({
        "resourceType": "AuditEvent",
        "type": { "code": "rest" },
        "recorded": "2026-01-01T00:00:00Z",
        "source": { "observer": { "display": "demo" } },
        "agent": [{ "requestor": true }]
    });
    let audit = capture::create(pool, project_id, &audit, &context).await?;
    steps.push(Step {
        action: "create",
        reference: format!(
            "AuditEvent/{}",
            audit.resource["id"].as_str().unwrap_or_default()
        ),
        outcome: outcome_text(&audit),
    });

    for _ in 0..2 {
        let deleted =
            capture::delete(pool, project_id, "Observation", &observation_id, &context).await?;
        steps.push(Step {
            action: "delete",
            reference: format!("Observation/{observation_id}"),
            outcome: format!("{}, version {}", deleted.outcome, deleted.version_id),
        });
    }
    Ok(steps)
}

fn patient_with_id(patient: &Value, id: &str) -> Value {
    let mut patient = patient.clone();
    patient["id"] = json!(id);
    patient
}
