//! The typed errors of the store, mapped from the SQLSTATE codes its SQL functions raise.

/// Why a store operation was refused. Every variant but `Database` means nothing was written; its
/// message names the problem (it comes from the SQL function that found it).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The body is not a JSON object, has no `resourceType` string, `meta` is not an object, or it is
    /// nested deeper than [`crate::fhir::MAX_NESTING_DEPTH`] levels.
    #[error("invalid resource: {0}")]
    InvalidResource(String),
    /// `resourceType` is not a FHIR R4 resource type the store accepts.
    #[error("{0}")]
    UnknownResourceType(String),
    /// The body's `resourceType` or `id` does not match the resource it is written to.
    #[error("{0}")]
    IdMismatch(String),
    /// The id is not a FHIR id (1 to 64 of `A-Z a-z 0-9 - .`).
    #[error("{0}")]
    InvalidId(String),
    /// No project has this id.
    #[error("{0}")]
    UnknownProject(String),
    /// The resource is larger than `fhir_outbox.max_resource_bytes`.
    #[error("{message}")]
    TooLarge {
        /// What the database said, with both numbers.
        message: String,
        /// Size of the resource's JSON text in bytes.
        size: u64,
        /// The limit in force.
        limit: u64,
    },
    /// An If-Match precondition failed.
    #[error("{message}")]
    VersionConflict {
        /// What the database said.
        message: String,
        /// The resource's current version, `None` when it does not exist.
        current_version: Option<i64>,
    },
    /// The resource (or version) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The resource is deleted (or the version read is a deletion).
    #[error("{0}")]
    Gone(String),
    /// The request id or trace id is malformed.
    #[error("{0}")]
    InvalidContext(String),
    /// Anything else the database reported (connection loss, serialization failure, …).
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        let Some(db_error) = error.as_database_error() else {
            return StoreError::Database(error);
        };
        let Some(code) = db_error.code() else {
            return StoreError::Database(error);
        };
        let message = db_error.message().to_owned();
        let detail = db_error
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail())
            .unwrap_or_default()
            .to_owned();
        match code.as_ref() {
            "OB001" => StoreError::InvalidResource(message),
            "OB002" => StoreError::UnknownResourceType(message),
            "OB003" => StoreError::IdMismatch(message),
            "OB004" => StoreError::InvalidId(message),
            "OB005" => StoreError::UnknownProject(message),
            "OB006" => {
                let mut numbers = detail.split(' ').map(|n| n.parse().unwrap_or(0));
                StoreError::TooLarge {
                    message,
                    size: numbers.next().unwrap_or(0),
                    limit: numbers.next().unwrap_or(0),
                }
            }
            "OB007" => StoreError::VersionConflict {
                message,
                current_version: detail.parse().ok(),
            },
            "OB008" => StoreError::NotFound(message),
            "OB009" => StoreError::Gone(message),
            "OB010" => StoreError::InvalidContext(message),
            // PostgreSQL's JSON parser gives up on absurdly deep input before our functions run.
            "54001" => {
                StoreError::InvalidResource(format!("resource is nested too deeply ({message})"))
            }
            _ => StoreError::Database(error),
        }
    }
}
