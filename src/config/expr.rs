//! The expression language of pipeline files: checks (`quantity >= 1`), filters
//! (`order.status != 'cancelled'`) and measures (`sum(round(quantity * unit_price, 2))`).
//!
//! A small SQL-like grammar, parsed here into [`Ast`] with names unresolved;
//! [`super::spec`] resolves names against the table and its lookups.
//!
//! ```text
//! expr    := or
//! or      := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | cmp
//! cmp     := add (("=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">=") add)?
//!          | add "is" ["not"] "null"
//! add     := mul (("+" | "-") mul)*
//! mul     := unary (("*" | "/") unary)*
//! unary   := "-" unary | primary
//! primary := number | 'string' | true | false | null
//!          | name ("." name)? | name "(" [expr ("," expr)*] ")" | "(" expr ")"
//! ```
//!
//! Written by hand: the grammar is tiny, and a parser crate would cost more to
//! read than these lines.

use std::fmt;

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// A literal in an expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    Number(String),
    Str(String),
    Bool(bool),
    Null,
}

/// An unresolved expression tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Ast {
    Lit(Lit),
    /// `column` or `lookup.column`.
    Name(Option<String>, String),
    Bin(BinOp, Box<Ast>, Box<Ast>),
    Not(Box<Ast>),
    Neg(Box<Ast>),
    IsNull(Box<Ast>, bool),
    Call(String, Vec<Ast>),
}

/// A parse error with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at character {}", self.message, self.offset + 1)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Str(String),
    Ident(String),
    Sym(&'static str),
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ParseError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            out.push((start, Tok::Num(src[start..i].to_owned())));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((start, Tok::Ident(src[start..i].to_owned())));
        } else if c == b'\'' {
            let start = i;
            i += 1;
            let mut s = String::new();
            loop {
                match src[i..].chars().next() {
                    None => {
                        return Err(ParseError {
                            offset: start,
                            message: "unterminated string".into(),
                        })
                    }
                    Some('\'') if b.get(i + 1) == Some(&b'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            out.push((start, Tok::Str(s)));
        } else {
            const SYMS: [&str; 16] = [
                "<=", ">=", "!=", "<>", "==", "=", "<", ">", "+", "-", "*", "/", "(", ")", ",", ".",
            ];
            let Some(sym) = SYMS.iter().find(|s| src[i..].starts_with(**s)) else {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(ParseError {
                    offset: i,
                    message: format!("unexpected character `{ch}`"),
                });
            };
            out.push((i, Tok::Sym(sym)));
            i += sym.len();
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    i: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|(_, t)| t)
    }

    fn offset(&self) -> usize {
        self.toks.get(self.i).map_or(self.len, |(o, _)| *o)
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { offset: self.offset(), message: message.into() })
    }

    fn eat_sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(x)) if x.eq_ignore_ascii_case(kw)) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, s: &str) -> Result<(), ParseError> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            self.err(format!("expected `{s}`"))
        }
    }

    fn or(&mut self) -> Result<Ast, ParseError> {
        let mut l = self.and()?;
        while self.eat_kw("or") {
            l = Ast::Bin(BinOp::Or, Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Ast, ParseError> {
        let mut l = self.not()?;
        while self.eat_kw("and") {
            l = Ast::Bin(BinOp::And, Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }

    fn not(&mut self) -> Result<Ast, ParseError> {
        if self.eat_kw("not") {
            return Ok(Ast::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Ast, ParseError> {
        let l = self.add()?;
        if self.eat_kw("is") {
            let negated = self.eat_kw("not");
            if !self.eat_kw("null") {
                return self.err("expected `null` after `is`");
            }
            return Ok(Ast::IsNull(Box::new(l), negated));
        }
        let op = match self.peek() {
            Some(Tok::Sym("=")) | Some(Tok::Sym("==")) => BinOp::Eq,
            Some(Tok::Sym("!=")) | Some(Tok::Sym("<>")) => BinOp::Ne,
            Some(Tok::Sym("<")) => BinOp::Lt,
            Some(Tok::Sym("<=")) => BinOp::Le,
            Some(Tok::Sym(">")) => BinOp::Gt,
            Some(Tok::Sym(">=")) => BinOp::Ge,
            _ => return Ok(l),
        };
        self.i += 1;
        Ok(Ast::Bin(op, Box::new(l), Box::new(self.add()?)))
    }

    fn add(&mut self) -> Result<Ast, ParseError> {
        let mut l = self.mul()?;
        loop {
            let op = if self.eat_sym("+") {
                BinOp::Add
            } else if self.eat_sym("-") {
                BinOp::Sub
            } else {
                return Ok(l);
            };
            l = Ast::Bin(op, Box::new(l), Box::new(self.mul()?));
        }
    }

    fn mul(&mut self) -> Result<Ast, ParseError> {
        let mut l = self.unary()?;
        loop {
            let op = if self.eat_sym("*") {
                BinOp::Mul
            } else if self.eat_sym("/") {
                BinOp::Div
            } else {
                return Ok(l);
            };
            l = Ast::Bin(op, Box::new(l), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Ast, ParseError> {
        if self.eat_sym("-") {
            return Ok(Ast::Neg(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Ast, ParseError> {
        let Some(tok) = self.peek().cloned() else {
            return self.err("unexpected end of expression");
        };
        self.i += 1;
        match tok {
            Tok::Num(n) => Ok(Ast::Lit(Lit::Number(n))),
            Tok::Str(s) => Ok(Ast::Lit(Lit::Str(s))),
            Tok::Sym("(") => {
                let e = self.or()?;
                self.expect_sym(")")?;
                Ok(e)
            }
            Tok::Ident(id) => match id.to_ascii_lowercase().as_str() {
                "true" => Ok(Ast::Lit(Lit::Bool(true))),
                "false" => Ok(Ast::Lit(Lit::Bool(false))),
                "null" => Ok(Ast::Lit(Lit::Null)),
                _ if self.eat_sym("(") => {
                    let mut args = Vec::new();
                    if !self.eat_sym(")") {
                        loop {
                            args.push(self.or()?);
                            if self.eat_sym(")") {
                                break;
                            }
                            self.expect_sym(",")?;
                        }
                    }
                    Ok(Ast::Call(id.to_ascii_lowercase(), args))
                }
                _ if self.eat_sym(".") => match self.peek().cloned() {
                    Some(Tok::Ident(col)) => {
                        self.i += 1;
                        Ok(Ast::Name(Some(id), col))
                    }
                    _ => self.err("expected a column name after `.`"),
                },
                _ => Ok(Ast::Name(None, id)),
            },
            Tok::Sym(s) => {
                self.i -= 1;
                self.err(format!("unexpected `{s}`"))
            }
        }
    }
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Ast, ParseError> {
    let toks = lex(src)?;
    let mut p = Parser { toks, i: 0, len: src.len() };
    let e = p.or()?;
    if p.i < p.toks.len() {
        return p.err("unexpected text after the expression");
    }
    Ok(e)
}

/// Splits `"<expr> as <name>"`; the name defaults to the last column name of a
/// plain column reference (`order.channel` -> `channel`).
pub fn parse_named(src: &str) -> Result<(Ast, Option<String>), ParseError> {
    let lower = src.to_ascii_lowercase();
    if let Some(at) = lower.rfind(" as ") {
        let name = src[at + 4..].trim();
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Ok((parse(&src[..at])?, Some(name.to_owned())));
        }
    }
    let ast = parse(src)?;
    let name = match &ast {
        Ast::Name(_, col) => Some(col.clone()),
        _ => None,
    };
    Ok((ast, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_precedence_and_calls() {
        let e = parse("round(quantity * unit_price * (1 - discount), 2)").unwrap();
        let Ast::Call(f, args) = e else { panic!("not a call") };
        assert_eq!(f, "round");
        assert_eq!(args.len(), 2);
        let e = parse("a = 1 or b > 2 and not c is null").unwrap();
        assert!(matches!(e, Ast::Bin(BinOp::Or, _, _)));
    }

    #[test]
    fn names_measures_and_group_columns() {
        let (_, n) = parse_named("sum(quantity) as units").unwrap();
        assert_eq!(n.as_deref(), Some("units"));
        let (e, n) = parse_named("order.channel").unwrap();
        assert_eq!(e, Ast::Name(Some("order".into()), "channel".into()));
        assert_eq!(n.as_deref(), Some("channel"));
    }

    #[test]
    fn reports_where_it_failed() {
        let err = parse("quantity >= ").unwrap_err();
        assert_eq!(err.offset, 12);
        let err = parse("status = 'open").unwrap_err();
        assert!(err.message.contains("unterminated"));
        assert!(parse("a ! b").is_err());
    }
}
