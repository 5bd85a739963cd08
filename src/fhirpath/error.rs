//! Typed errors of the FHIRPath engine.

/// Everything that can go wrong while parsing or evaluating a FHIRPath expression.
///
/// Parse errors carry the character offset in the expression so a caller can point at it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    /// A resource limit was exceeded (parse depth, step budget, collection or string size).
    #[error("FHIRPath limit exceeded: {0}")]
    LimitExceeded(String),
    /// A feature this engine deliberately does not implement (terminology services...).
    #[error("FHIRPath function not supported: {0}")]
    Unsupported(String),
}

impl FhirPathError {
    pub(crate) fn eval(msg: impl Into<String>) -> Self {
        FhirPathError::Eval(msg.into())
    }
}

/// Shorthand result type of the engine.
pub type Result<T> = std::result::Result<T, FhirPathError>;
