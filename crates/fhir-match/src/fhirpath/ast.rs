//! The abstract syntax tree produced by the parser.

use super::temporal::{DateTimeV, TimeV};

/// A literal value written in the expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `true` / `false`.
    Bool(bool),
    /// `'text'` with escapes already decoded.
    String(String),
    /// `42`.
    Integer(i64),
    /// `4.5` (kept with its number of decimal places for formatting and equivalence).
    Decimal(f64, u8),
    /// `@2019-01-01`.
    Date(DateTimeV),
    /// `@2019-01-01T10:00:00Z`.
    DateTime(DateTimeV),
    /// `@T10:00`.
    Time(TimeV),
    /// `4 'mg'` or `1 year`: value, decimal places and unit (calendar keywords kept as written,
    /// singular).
    Quantity(f64, u8, String),
}

/// Binary operators, grouped by the spec's precedence table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum BinOp {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Gt,
    Le,
    Ge,
    Eq,
    Equiv,
    Ne,
    NotEquiv,
    In,
    Contains,
    And,
    Xor,
    Or,
    Implies,
}

/// A type specifier such as `Patient`, `FHIR.Quantity` or `System.String`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSpec {
    /// `Some("FHIR")` / `Some("System")` when qualified.
    pub namespace: Option<String>,
    /// The type name.
    pub name: String,
}

/// Functions known to the engine, resolved at parse time so that an unknown function is a
/// semantic error reported with its position rather than a surprise at evaluation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Func {
    Empty,
    Exists,
    All,
    AllTrue,
    AnyTrue,
    AllFalse,
    AnyFalse,
    SubsetOf,
    SupersetOf,
    Count,
    Distinct,
    IsDistinct,
    Where,
    Select,
    Repeat,
    OfType,
    As,
    Is,
    First,
    Last,
    Tail,
    Skip,
    Take,
    Single,
    Intersect,
    Exclude,
    Union,
    Combine,
    Iif,
    Not,
    ToString,
    ToInteger,
    ToDecimal,
    ToBoolean,
    ToDate,
    ToDateTime,
    ToTime,
    ToQuantity,
    ConvertsToString,
    ConvertsToInteger,
    ConvertsToDecimal,
    ConvertsToBoolean,
    ConvertsToDate,
    ConvertsToDateTime,
    ConvertsToTime,
    ConvertsToQuantity,
    IndexOf,
    Substring,
    StartsWith,
    EndsWith,
    Contains,
    Upper,
    Lower,
    Replace,
    Matches,
    MatchesFull,
    ReplaceMatches,
    Length,
    ToChars,
    Split,
    Join,
    Trim,
    Abs,
    Ceiling,
    Exp,
    Floor,
    Ln,
    Log,
    Power,
    Round,
    Sqrt,
    Truncate,
    Children,
    Descendants,
    Trace,
    Now,
    Today,
    TimeOfDay,
    HasValue,
    GetValue,
    Resolve,
    Extension,
    Aggregate,
    Type,
    MemberOf,
    ConformsTo,
    HtmlChecks,
    Comparable,
    Subsumes,
    SubsumedBy,
}

impl Func {
    /// Resolve a function name to the function and its allowed argument counts.
    pub fn lookup(name: &str) -> Option<(Func, usize, usize)> {
        use Func::*;
        let r = match name {
            "empty" => (Empty, 0, 0),
            "exists" => (Exists, 0, 1),
            "all" => (All, 1, 1),
            "allTrue" => (AllTrue, 0, 0),
            "anyTrue" => (AnyTrue, 0, 0),
            "allFalse" => (AllFalse, 0, 0),
            "anyFalse" => (AnyFalse, 0, 0),
            "subsetOf" => (SubsetOf, 1, 1),
            "supersetOf" => (SupersetOf, 1, 1),
            "count" => (Count, 0, 0),
            "distinct" => (Distinct, 0, 0),
            "isDistinct" => (IsDistinct, 0, 0),
            "where" => (Where, 1, 1),
            "select" => (Select, 1, 1),
            "repeat" => (Repeat, 1, 1),
            "ofType" => (OfType, 1, 1),
            "as" => (As, 1, 1),
            "is" => (Is, 1, 1),
            "first" => (First, 0, 0),
            "last" => (Last, 0, 0),
            "tail" => (Tail, 0, 0),
            "skip" => (Skip, 1, 1),
            "take" => (Take, 1, 1),
            "single" => (Single, 0, 0),
            "intersect" => (Intersect, 1, 1),
            "exclude" => (Exclude, 1, 1),
            "union" => (Union, 1, 1),
            "combine" => (Combine, 1, 1),
            "iif" => (Iif, 2, 3),
            "not" => (Not, 0, 0),
            "toString" => (ToString, 0, 0),
            "toInteger" => (ToInteger, 0, 0),
            "toDecimal" => (ToDecimal, 0, 0),
            "toBoolean" => (ToBoolean, 0, 0),
            "toDate" => (ToDate, 0, 0),
            "toDateTime" => (ToDateTime, 0, 0),
            "toTime" => (ToTime, 0, 0),
            "toQuantity" => (ToQuantity, 0, 1),
            "convertsToString" => (ConvertsToString, 0, 0),
            "convertsToInteger" => (ConvertsToInteger, 0, 0),
            "convertsToDecimal" => (ConvertsToDecimal, 0, 0),
            "convertsToBoolean" => (ConvertsToBoolean, 0, 0),
            "convertsToDate" => (ConvertsToDate, 0, 0),
            "convertsToDateTime" => (ConvertsToDateTime, 0, 0),
            "convertsToTime" => (ConvertsToTime, 0, 0),
            "convertsToQuantity" => (ConvertsToQuantity, 0, 1),
            "indexOf" => (IndexOf, 1, 1),
            "substring" => (Substring, 1, 2),
            "startsWith" => (StartsWith, 1, 1),
            "endsWith" => (EndsWith, 1, 1),
            "contains" => (Contains, 1, 1),
            "upper" => (Upper, 0, 0),
            "lower" => (Lower, 0, 0),
            "replace" => (Replace, 2, 2),
            "matches" => (Matches, 1, 1),
            "matchesFull" => (MatchesFull, 1, 1),
            "replaceMatches" => (ReplaceMatches, 2, 2),
            "length" => (Length, 0, 0),
            "toChars" => (ToChars, 0, 0),
            "split" => (Split, 1, 1),
            "join" => (Join, 0, 1),
            "trim" => (Trim, 0, 0),
            "abs" => (Abs, 0, 0),
            "ceiling" => (Ceiling, 0, 0),
            "exp" => (Exp, 0, 0),
            "floor" => (Floor, 0, 0),
            "ln" => (Ln, 0, 0),
            "log" => (Log, 1, 1),
            "power" => (Power, 1, 1),
            "round" => (Round, 0, 1),
            "sqrt" => (Sqrt, 0, 0),
            "truncate" => (Truncate, 0, 0),
            "children" => (Children, 0, 0),
            "descendants" => (Descendants, 0, 0),
            "trace" => (Trace, 1, 2),
            "now" => (Now, 0, 0),
            "today" => (Today, 0, 0),
            "timeOfDay" => (TimeOfDay, 0, 0),
            "hasValue" => (HasValue, 0, 0),
            "getValue" => (GetValue, 0, 0),
            "resolve" => (Resolve, 0, 0),
            "extension" => (Extension, 1, 1),
            "aggregate" => (Aggregate, 1, 2),
            "type" => (Type, 0, 0),
            "memberOf" => (MemberOf, 1, 1),
            "conformsTo" => (ConformsTo, 1, 1),
            "htmlChecks" | "htmlchecks" => (HtmlChecks, 0, 0),
            "comparable" => (Comparable, 1, 1),
            "subsumes" => (Subsumes, 1, 1),
            "subsumedBy" => (SubsumedBy, 1, 1),
            _ => return None,
        };
        Some(r)
    }

    /// Functions whose single argument is a type specifier.
    pub fn takes_type(self) -> bool {
        matches!(self, Func::OfType | Func::As | Func::Is)
    }
}

/// An expression node.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `{}`.
    Empty,
    /// A literal.
    Literal(Literal),
    /// An identifier evaluated on the focus: a child element, or a type name as first step.
    Ident(String),
    /// `target.name`.
    Member(Box<Expr>, String),
    /// `target.f(args)` or `f(args)` (target `None`: the focus).
    Call {
        /// The collection the function is invoked on.
        target: Option<Box<Expr>>,
        /// The resolved function.
        func: Func,
        /// Arguments, unevaluated.
        args: Vec<Expr>,
        /// The type argument of `is`/`as`/`ofType`.
        type_arg: Option<TypeSpec>,
    },
    /// `target[index]`.
    Index(Box<Expr>, Box<Expr>),
    /// Unary minus (unary plus is dropped by the parser).
    Neg(Box<Expr>),
    /// A binary operator.
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `expr is Type`.
    Is(Box<Expr>, TypeSpec),
    /// `expr as Type`.
    As(Box<Expr>, TypeSpec),
    /// `%name`.
    Var(String),
    /// `$this`.
    This,
    /// `$index`.
    IndexVar,
    /// `$total`.
    Total,
}
