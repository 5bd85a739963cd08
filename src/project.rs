//! Projects: the tenants. Every resource, outbox row, subscription and delivery belongs to one.

use sqlx::PgExecutor;
use uuid::Uuid;

/// Creates a project and returns its id.
pub async fn create_project<'e>(db: impl PgExecutor<'e>, name: &str) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar!(
        "INSERT INTO fhir_outbox.project (name) VALUES ($1) RETURNING id",
        name
    )
    .fetch_one(db)
    .await
}
