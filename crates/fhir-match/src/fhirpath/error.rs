//! Typed errors of the FHIRPath engine.

/// Everything that can go wrong while parsing or evaluating a FHIRPath expression.
///
/// Parse errors carry the character offset in the expression so a caller can point at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirPathError {
    /// The expression is not syntactically valid.
    #[error("FHIRPath syntax error at position {position}: {message}")]
    Parse {
        /// Character offset (0-based) in the expression.
        position: usize,
        /// What is wrong.
        message: String,
    },
    /// The expression is well-formed but invalid (unknown function, wrong argument count...).
    #[error("FHIRPath semantic error at position {position}: {message}")]
    Semantic {
        /// Character offset (0-based) in the expression.
        position: usize,
        /// What is wrong.
        message: String,
    },
    /// Evaluation failed (a singleton was required, a type mismatch, an invalid regex...).
    #[error("FHIRPath evaluation error: {0}")]
    Eval(String),
    /// A variable (`%name`) is not defined in the environment.
    #[error("FHIRPath evaluation error: undefined variable %{0}")]
    UndefinedVariable(String),
    /// A parse-time limit was exceeded (expression length or nesting depth): the expression
    /// itself is too big, whatever it is evaluated on.
    #[error("FHIRPath limit exceeded: {0}")]
    LimitExceeded(String),
    /// An evaluation ran out of its budget ([`Limits`](super::Limits)): the expression needs
    /// more work or memory than one evaluation may take on this input. Distinct from the other
    /// variants so that callers can treat the expression as hostile rather than merely wrong
    /// (see [`FhirPathError::is_budget_exhausted`]).
    #[error("FHIRPath evaluation budget exhausted: {what} over the limit of {limit}")]
    BudgetExhausted {
        /// Which part of the budget ran out.
        what: Budget,
        /// The limit that was exceeded, in the unit of `what`.
        limit: u64,
    },
    /// A feature this engine deliberately does not implement (terminology services...).
    #[error("FHIRPath function not supported: {0}")]
    Unsupported(String),
}

/// The parts of an evaluation's budget (see [`Limits`](super::Limits)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    /// Steps, the units of work ([`Limits::max_steps`](super::Limits::max_steps)).
    Steps,
    /// Bytes allocated, cumulatively ([`Limits::max_bytes`](super::Limits::max_bytes)).
    Bytes,
    /// Items in one collection ([`Limits::max_collection`](super::Limits::max_collection)).
    CollectionItems,
    /// Bytes of one string ([`Limits::max_string`](super::Limits::max_string)).
    StringBytes,
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Budget::Steps => "work (steps)",
            Budget::Bytes => "memory (bytes allocated)",
            Budget::CollectionItems => "collection size (items)",
            Budget::StringBytes => "string size (bytes)",
        })
    }
}

impl FhirPathError {
    /// Whether evaluation stopped because it exhausted its budget (work, memory, collection or
    /// string size), as opposed to a syntax, semantic or ordinary evaluation error.
    pub fn is_budget_exhausted(&self) -> bool {
        matches!(self, FhirPathError::BudgetExhausted { .. })
    }

    pub(crate) fn eval(msg: impl Into<String>) -> Self {
        FhirPathError::Eval(msg.into())
    }
}

/// Shorthand result type of the engine.
pub type Result<T> = std::result::Result<T, FhirPathError>;
