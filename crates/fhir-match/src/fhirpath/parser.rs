//! Tokenizer and recursive-descent (precedence-climbing) parser for FHIRPath.
//!
//! The parser bounds the depth of the tree it builds (not only its own recursion): evaluation
//! walks the tree recursively, so a 10,000-deep chain like `a.a.a...` or `1+1+1...` must be
//! rejected here with a typed error instead of overflowing the stack later.

use super::ast::{BinOp, Expr, Func, Literal, TypeSpec};
use super::error::{FhirPathError, Result};
use super::temporal::{DateTimeV, TimeV};

/// Maximum depth of the syntax tree.
pub const MAX_DEPTH: usize = 128;
/// Maximum length of an expression, in bytes.
pub const MAX_SOURCE_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A back-quoted identifier: never a keyword.
    Quoted(String),
    Str(String),
    Number(String),
    DateTime(String),
    Time(String),
    /// `%name`.
    Var(String),
    /// `$this` etc. (without the `$`).
    Special(String),
    Op(&'static str),
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    pos: usize,
}

fn err<T>(pos: usize, msg: impl Into<String>) -> Result<T> {
    Err(FhirPathError::Parse {
        position: pos,
        message: msg.into(),
    })
}

fn lex(src: &str) -> Result<Vec<Token>> {
    let s = src.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < s.len() {
        let c = s[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && s.get(i + 1) == Some(&b'/') {
            while i < s.len() && s[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && s.get(i + 1) == Some(&b'*') {
            match src[i + 2..].find("*/") {
                Some(e) => i += e + 4,
                None => return err(i, "unterminated comment"),
            }
            continue;
        }
        let tok = if c.is_ascii_alphabetic() || c == b'_' {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
                i += 1;
            }
            Tok::Ident(src[start..i].to_string())
        } else if c == b'`' {
            let (text, j) = quoted(src, i, b'`')?;
            i = j;
            Tok::Quoted(text)
        } else if c == b'\'' || c == b'"' {
            // Medplum's lexer also reads double-quoted strings (its own tests write
            // `%current.status = "completed"`); same escapes as single-quoted ones.
            let (text, j) = quoted(src, i, c)?;
            i = j;
            Tok::Str(text)
        } else if c.is_ascii_digit() {
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
            }
            // A dot is part of the number only when a digit follows (`1.convertsTo...`).
            if i + 1 < s.len() && s[i] == b'.' && s[i + 1].is_ascii_digit() {
                i += 1;
                while i < s.len() && s[i].is_ascii_digit() {
                    i += 1;
                }
            }
            Tok::Number(src[start..i].to_string())
        } else if c == b'@' {
            i += 1;
            let time = s.get(i) == Some(&b'T');
            if time {
                i += 1;
            }
            let body = i;
            // Date/time characters; a '.' counts only before a digit (fractional seconds), a
            // sign only directly after a time (timezone offset).
            while i < s.len() {
                let ch = s[i];
                let ok = ch.is_ascii_digit()
                    || ch == b'-'
                        && !time
                        && i > body
                        && s.get(i + 1).is_some_and(u8::is_ascii_digit)
                        && !src[body..i].contains('T')
                    || ch == b':'
                    || ch == b'T' && !time
                    || ch == b'Z'
                    || ch == b'.' && s.get(i + 1).is_some_and(u8::is_ascii_digit)
                    || (ch == b'+' || ch == b'-')
                        && src[body..i].contains(':')
                        && s.get(i + 1).is_some_and(u8::is_ascii_digit);
                if !ok {
                    break;
                }
                i += 1;
            }
            let text = src[body..i].to_string();
            if text.is_empty() {
                return err(start, "invalid date/time literal");
            }
            if time {
                Tok::Time(text)
            } else {
                Tok::DateTime(text)
            }
        } else if c == b'%' {
            i += 1;
            if s.get(i) == Some(&b'`') {
                let (text, j) = quoted(src, i, b'`')?;
                i = j;
                Tok::Var(text)
            } else if let Some(q @ (b'\'' | b'"')) = s.get(i).copied() {
                // `%'name'` and `%"name"` are older spellings of `%`name``.
                let (text, j) = quoted(src, i, q)?;
                i = j;
                Tok::Var(text)
            } else {
                let b = i;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_' || s[i] == b'-')
                {
                    i += 1;
                }
                if b == i {
                    return err(start, "expected a variable name after '%'");
                }
                Tok::Var(src[b..i].to_string())
            }
        } else if c == b'$' {
            i += 1;
            let b = i;
            while i < s.len() && s[i].is_ascii_alphanumeric() {
                i += 1;
            }
            Tok::Special(src[b..i].to_string())
        } else {
            let two = src.get(i..i + 2).unwrap_or("");
            let op: &'static str = match two {
                "<=" => "<=",
                ">=" => ">=",
                "!=" => "!=",
                "!~" => "!~",
                _ => match c {
                    b'=' => "=",
                    b'~' => "~",
                    b'<' => "<",
                    b'>' => ">",
                    b'+' => "+",
                    b'-' => "-",
                    b'*' => "*",
                    b'/' => "/",
                    b'&' => "&",
                    b'|' => "|",
                    b'.' => ".",
                    b',' => ",",
                    b'(' => "(",
                    b')' => ")",
                    b'[' => "[",
                    b']' => "]",
                    b'{' => "{",
                    b'}' => "}",
                    _ => {
                        let ch = src[i..].chars().next().unwrap_or('?');
                        return err(i, format!("unexpected character '{ch}'"));
                    }
                },
            };
            i += op.len();
            Tok::Op(op)
        };
        out.push(Token { tok, pos: start });
    }
    out.push(Token {
        tok: Tok::Eof,
        pos: src.len(),
    });
    Ok(out)
}

/// Read a quoted string or identifier starting at the opening quote; decode escapes.
fn quoted(src: &str, start: usize, q: u8) -> Result<(String, usize)> {
    let s = src.as_bytes();
    let mut out = String::new();
    let mut i = start + 1;
    while i < s.len() {
        let c = s[i];
        if c == q {
            return Ok((out, i + 1));
        }
        if c == b'\\' {
            let e = *s.get(i + 1).ok_or(FhirPathError::Parse {
                position: i,
                message: "unterminated escape".into(),
            })?;
            i += 2;
            match e {
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'f' => out.push('\u{c}'),
                b'\\' | b'/' | b'\'' | b'"' | b'`' => out.push(e as char),
                b'u' => {
                    let hex = src.get(i..i + 4).ok_or(FhirPathError::Parse {
                        position: i,
                        message: "bad \\u escape".into(),
                    })?;
                    let code = u32::from_str_radix(hex, 16).map_err(|_| FhirPathError::Parse {
                        position: i,
                        message: "bad \\u escape".into(),
                    })?;
                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                    i += 4;
                }
                _ => return err(i - 2, format!("invalid escape '\\{}'", e as char)),
            }
            continue;
        }
        // Copy one whole UTF-8 character.
        let ch = src[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    err(start, "unterminated quoted text")
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
}

/// Parse a FHIRPath expression into its syntax tree.
pub fn parse(src: &str) -> Result<Expr> {
    if src.len() > MAX_SOURCE_LEN {
        return Err(FhirPathError::LimitExceeded(format!(
            "expression is {} bytes long, the limit is {MAX_SOURCE_LEN}",
            src.len()
        )));
    }
    let toks = lex(src)?;
    let mut p = Parser { toks, i: 0 };
    let (e, _) = p.expr(0, 0)?;
    match &p.peek().tok {
        Tok::Eof => Ok(e),
        other => err(p.peek().pos, format!("unexpected {}", describe(other))),
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) | Tok::Quoted(s) => format!("identifier '{s}'"),
        Tok::Str(s) => format!("string '{s}'"),
        Tok::Number(s) => format!("number {s}"),
        Tok::DateTime(s) | Tok::Time(s) => format!("date/time @{s}"),
        Tok::Var(s) => format!("variable %{s}"),
        Tok::Special(s) => format!("${s}"),
        Tok::Op(o) => format!("'{o}'"),
        Tok::Eof => "end of expression".into(),
    }
}

fn binop(t: &Tok) -> Option<(BinOp, u8)> {
    Some(match t {
        Tok::Op(o) => match *o {
            "*" => (BinOp::Mul, 10),
            "/" => (BinOp::Div, 10),
            "+" => (BinOp::Add, 9),
            "-" => (BinOp::Sub, 9),
            "&" => (BinOp::Concat, 9),
            "|" => (BinOp::Union, 7),
            "<" => (BinOp::Lt, 6),
            ">" => (BinOp::Gt, 6),
            "<=" => (BinOp::Le, 6),
            ">=" => (BinOp::Ge, 6),
            "=" => (BinOp::Eq, 5),
            "~" => (BinOp::Equiv, 5),
            "!=" => (BinOp::Ne, 5),
            "!~" => (BinOp::NotEquiv, 5),
            _ => return None,
        },
        Tok::Ident(w) => match w.as_str() {
            "div" => (BinOp::IntDiv, 10),
            "mod" => (BinOp::Mod, 10),
            "in" => (BinOp::In, 4),
            "contains" => (BinOp::Contains, 4),
            "and" => (BinOp::And, 3),
            "xor" => (BinOp::Xor, 2),
            "or" => (BinOp::Or, 2),
            "implies" => (BinOp::Implies, 1),
            _ => return None,
        },
        _ => return None,
    })
}

/// Precedence of `is` / `as`: below comparison and union (`1 > 2 is Boolean` is
/// `(1 > 2) is Boolean` and `1 | 1 is Integer` is `(1 | 1) is Integer` in the official suite),
/// above equality.
const TYPE_PREC: u8 = 6;

impl Parser {
    fn peek(&self) -> &Token {
        &self.toks[self.i]
    }

    fn next(&mut self) -> Token {
        let t = self.toks[self.i].clone();
        if self.i + 1 < self.toks.len() {
            self.i += 1;
        }
        t
    }

    fn expect_op(&mut self, op: &str) -> Result<()> {
        let t = self.next();
        match t.tok {
            Tok::Op(o) if o == op => Ok(()),
            other => err(
                t.pos,
                format!("expected '{op}', found {}", describe(&other)),
            ),
        }
    }

    fn check_depth(&self, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(FhirPathError::LimitExceeded(format!(
                "expression nesting deeper than {MAX_DEPTH} at position {}",
                self.peek().pos
            )));
        }
        Ok(())
    }

    /// Parse an expression whose operators bind at least as tightly as `min`. Returns the
    /// tree and its depth.
    fn expr(&mut self, min: u8, depth: usize) -> Result<(Expr, usize)> {
        self.check_depth(depth)?;
        let (mut lhs, mut d) = self.unary(depth + 1)?;
        loop {
            let t = self.peek().tok.clone();
            if let Tok::Ident(w) = &t
                && (w == "is" || w == "as")
                && TYPE_PREC >= min
            {
                self.next();
                let ts = self.type_spec()?;
                d += 1;
                self.check_depth(d)?;
                lhs = if w == "is" {
                    Expr::Is(Box::new(lhs), ts)
                } else {
                    Expr::As(Box::new(lhs), ts)
                };
                continue;
            }
            let Some((op, prec)) = binop(&t) else { break };
            if prec < min {
                break;
            }
            self.next();
            let (rhs, rd) = self.expr(prec + 1, depth + 1)?;
            d = d.max(rd) + 1;
            self.check_depth(d)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        Ok((lhs, d))
    }

    fn type_spec(&mut self) -> Result<TypeSpec> {
        let ts = self.type_spec_unchecked()?;
        check_type(&ts, self.toks[self.i.saturating_sub(1)].pos)?;
        Ok(ts)
    }

    fn type_spec_unchecked(&mut self) -> Result<TypeSpec> {
        let t = self.next();
        let first = match t.tok {
            Tok::Ident(s) | Tok::Quoted(s) => s,
            other => {
                return err(
                    t.pos,
                    format!("expected a type name, found {}", describe(&other)),
                );
            }
        };
        if self.peek().tok == Tok::Op(".") {
            self.next();
            let t2 = self.next();
            match t2.tok {
                Tok::Ident(s) | Tok::Quoted(s) => Ok(TypeSpec {
                    namespace: Some(first),
                    name: s,
                }),
                other => err(
                    t2.pos,
                    format!("expected a type name, found {}", describe(&other)),
                ),
            }
        } else {
            Ok(TypeSpec {
                namespace: None,
                name: first,
            })
        }
    }

    fn unary(&mut self, depth: usize) -> Result<(Expr, usize)> {
        self.check_depth(depth)?;
        match self.peek().tok {
            Tok::Op("-") => {
                self.next();
                let (e, d) = self.unary(depth + 1)?;
                // Fold negative numeric literals so `-1` is a literal (and `-1 'mg'` too).
                let e = match e {
                    Expr::Literal(Literal::Integer(n)) => Expr::Literal(Literal::Integer(-n)),
                    Expr::Literal(Literal::Decimal(n, s)) => Expr::Literal(Literal::Decimal(-n, s)),
                    Expr::Literal(Literal::Quantity(n, s, u)) => {
                        Expr::Literal(Literal::Quantity(-n, s, u))
                    }
                    other => Expr::Neg(Box::new(other)),
                };
                Ok((e, d + 1))
            }
            Tok::Op("+") => {
                self.next();
                self.unary(depth + 1)
            }
            _ => self.postfix(depth + 1),
        }
    }

    fn postfix(&mut self, depth: usize) -> Result<(Expr, usize)> {
        let (mut e, mut d) = self.term(depth)?;
        loop {
            match self.peek().tok {
                Tok::Op(".") => {
                    self.next();
                    let t = self.next();
                    let name = match t.tok {
                        Tok::Ident(s) | Tok::Quoted(s) => s,
                        other => {
                            return err(
                                t.pos,
                                format!("expected a name after '.', found {}", describe(&other)),
                            );
                        }
                    };
                    if self.peek().tok == Tok::Op("(") {
                        let (call, cd) = self.call(Some(e), d, name, t.pos, depth)?;
                        e = call;
                        d = cd;
                    } else {
                        e = Expr::Member(Box::new(e), name);
                        d += 1;
                    }
                }
                Tok::Op("[") => {
                    self.next();
                    let (idx, id) = self.expr(0, depth + 1)?;
                    self.expect_op("]")?;
                    d = d.max(id) + 1;
                    e = Expr::Index(Box::new(e), Box::new(idx));
                }
                _ => break,
            }
            self.check_depth(d)?;
        }
        Ok((e, d))
    }

    fn call(
        &mut self,
        target: Option<Expr>,
        td: usize,
        name: String,
        pos: usize,
        depth: usize,
    ) -> Result<(Expr, usize)> {
        self.expect_op("(")?;
        let mut args = Vec::new();
        let mut d = td;
        if self.peek().tok != Tok::Op(")") {
            loop {
                let (a, ad) = self.expr(0, depth + 1)?;
                d = d.max(ad);
                args.push(a);
                if self.peek().tok == Tok::Op(",") {
                    self.next();
                    continue;
                }
                break;
            }
        }
        self.expect_op(")")?;
        let Some((func, min, max)) = Func::lookup(&name) else {
            return Err(FhirPathError::Semantic {
                position: pos,
                message: format!("unknown function '{name}'"),
            });
        };
        if args.len() < min || args.len() > max {
            return Err(FhirPathError::Semantic {
                position: pos,
                message: format!(
                    "function '{name}' takes {min}..={max} arguments, got {}",
                    args.len()
                ),
            });
        }
        let mut type_arg = None;
        if func.takes_type() {
            type_arg = Some(match args.pop() {
                Some(Expr::Ident(n)) => TypeSpec {
                    namespace: None,
                    name: n,
                },
                Some(Expr::Member(ns, n)) if matches!(*ns, Expr::Ident(_)) => {
                    let Expr::Ident(nsn) = *ns else {
                        unreachable!()
                    };
                    TypeSpec {
                        namespace: Some(nsn),
                        name: n,
                    }
                }
                _ => {
                    return Err(FhirPathError::Semantic {
                        position: pos,
                        message: format!("function '{name}' expects a type name"),
                    });
                }
            });
        }
        if let Some(ts) = &type_arg {
            check_type(ts, pos)?;
        }
        let target = target.map(Box::new);
        Ok((
            Expr::Call {
                target,
                func,
                args,
                type_arg,
            },
            d + 1,
        ))
    }

    fn term(&mut self, depth: usize) -> Result<(Expr, usize)> {
        self.check_depth(depth)?;
        let t = self.next();
        let e = match t.tok {
            Tok::Op("(") => {
                let (e, d) = self.expr(0, depth + 1)?;
                self.expect_op(")")?;
                return Ok((e, d));
            }
            Tok::Op("{") => {
                self.expect_op("}")?;
                Expr::Empty
            }
            Tok::Str(s) => Expr::Literal(Literal::String(s)),
            Tok::Number(n) => {
                let lit = number(&n, t.pos)?;
                // A number followed by a unit string or calendar keyword is a quantity.
                let unit = match &self.peek().tok {
                    Tok::Str(u) => Some(u.clone()),
                    Tok::Ident(w) => crate_calendar_keyword(w).map(str::to_string),
                    _ => None,
                };
                match unit {
                    Some(u) => {
                        self.next();
                        let (v, s) = match lit {
                            Literal::Integer(i) => (i as f64, 0),
                            Literal::Decimal(v, s) => (v, s),
                            _ => unreachable!(),
                        };
                        Expr::Literal(Literal::Quantity(v, s, u))
                    }
                    None => Expr::Literal(lit),
                }
            }
            Tok::DateTime(text) => {
                let trimmed = text.strip_suffix('T').unwrap_or(&text);
                if text.contains('T') {
                    match DateTimeV::parse(&text, true).or_else(|| DateTimeV::parse(trimmed, false))
                    {
                        Some(v) => Expr::Literal(Literal::DateTime(v)),
                        None => return err(t.pos, format!("invalid date-time literal @{text}")),
                    }
                } else {
                    match DateTimeV::parse(&text, false) {
                        Some(v) => Expr::Literal(Literal::Date(v)),
                        None => return err(t.pos, format!("invalid date literal @{text}")),
                    }
                }
            }
            Tok::Time(text) => match TimeV::parse(&text) {
                Some(v) => Expr::Literal(Literal::Time(v)),
                None => return err(t.pos, format!("invalid time literal @T{text}")),
            },
            Tok::Var(v) => Expr::Var(v),
            Tok::Special(s) => match s.as_str() {
                "this" => Expr::This,
                "index" => Expr::IndexVar,
                "total" => Expr::Total,
                _ => return err(t.pos, format!("unknown special variable ${s}")),
            },
            Tok::Ident(name) => {
                if self.peek().tok == Tok::Op("(") {
                    return self.call(None, 0, name, t.pos, depth);
                }
                match name.as_str() {
                    "true" => Expr::Literal(Literal::Bool(true)),
                    "false" => Expr::Literal(Literal::Bool(false)),
                    _ => Expr::Ident(name),
                }
            }
            Tok::Quoted(name) => Expr::Ident(name),
            other => return err(t.pos, format!("unexpected {}", describe(&other))),
        };
        Ok((e, 1))
    }
}

/// Reject type names that cannot exist: an unknown lower-case name is a misspelt FHIR
/// primitive (`string1`). Unknown capitalised names are accepted because servers define
/// custom resource types that the R4 model does not list.
fn check_type(ts: &TypeSpec, pos: usize) -> Result<()> {
    let system = ts.namespace.as_deref() == Some("System");
    let known = crate::fhir::elements::model().contains(&ts.name)
        || matches!(
            ts.name.as_str(),
            "Boolean"
                | "String"
                | "Integer"
                | "Decimal"
                | "Date"
                | "DateTime"
                | "Time"
                | "Quantity"
        );
    if !system && !known && ts.name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(FhirPathError::Semantic {
            position: pos,
            message: format!("unknown type '{}'", ts.name),
        });
    }
    Ok(())
}

fn crate_calendar_keyword(w: &str) -> Option<&'static str> {
    Some(match w {
        "year" | "years" => "year",
        "month" | "months" => "month",
        "week" | "weeks" => "week",
        "day" | "days" => "day",
        "hour" | "hours" => "hour",
        "minute" | "minutes" => "minute",
        "second" | "seconds" => "second",
        "millisecond" | "milliseconds" => "millisecond",
        _ => return None,
    })
}

fn number(text: &str, pos: usize) -> Result<Literal> {
    if let Some(dot) = text.find('.') {
        let scale = (text.len() - dot - 1).min(255) as u8;
        text.parse::<f64>()
            .map(|v| Literal::Decimal(v, scale))
            .or_else(|_| err(pos, format!("invalid number {text}")))
    } else {
        match text.parse::<i64>() {
            Ok(v) => Ok(Literal::Integer(v)),
            // Too large for an integer: keep it as a decimal rather than failing.
            Err(_) => text
                .parse::<f64>()
                .map(|v| Literal::Decimal(v, 0))
                .or_else(|_| err(pos, format!("invalid number {text}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_forms() {
        for src in [
            "Patient.name.given",
            "name.where(use = 'official').given.first()",
            "Observation.value as Quantity",
            "(1 + 2) * 3 div 4 mod 5",
            "@2019-01-01T10:00:00Z > @2019",
            "@T10:00 = @T10:00:00",
            "4 'mg' = 4 'mg'",
            "1 year",
            "%`vs-administrative-gender`",
            "a.b[0] | c implies d",
            "iif(true, 1, 2)",
            "x.ofType(FHIR.Quantity)",
            "{}",
            "$this.length() > 3 // comment",
        ] {
            parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        }
    }

    #[test]
    fn reports_positions() {
        match parse("name.where(").unwrap_err() {
            FhirPathError::Parse { position, .. } => assert_eq!(position, 11),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            parse("name.foo()"),
            Err(FhirPathError::Semantic { position: 5, .. })
        ));
        assert!(parse("1 +").is_err());
        assert!(parse("'abc").is_err());
    }

    #[test]
    fn depth_limit() {
        let deep = "(".repeat(10_000) + "1" + &")".repeat(10_000);
        assert!(matches!(parse(&deep), Err(FhirPathError::LimitExceeded(_))));
        let chain = "a".to_string() + &".a".repeat(10_000);
        assert!(matches!(
            parse(&chain),
            Err(FhirPathError::LimitExceeded(_))
        ));
        let sum = "1".to_string() + &"+1".repeat(10_000);
        assert!(matches!(parse(&sum), Err(FhirPathError::LimitExceeded(_))));
        let neg = "-".repeat(10_000) + "1";
        assert!(matches!(parse(&neg), Err(FhirPathError::LimitExceeded(_))));
    }
}
