//! Tokens of PTX text: identifiers (`%r1`, `$L__BB0_1`, `ld`), dotted
//! words (`.global`, `.shared::cta`, `.L2::128B`), numbers, float literals
//! (`0f3F800000`, `0d3FF0000000000000`, `1.5`), strings and punctuation.
//! Comments (`//`, `/* */`) are skipped. Every token carries its 1-based line.

use crate::PtxError;

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// An identifier: letters, digits, `_`, `$`, `%` (leading `%` or `$` kept).
    Ident(String),
    /// A word starting with `.`, dot included (`.u32`, `.shared::cta`).
    Dot(String),
    /// An integer literal (its bits; negative values come as `-` then the number).
    Int(u64),
    /// A float literal: `0f` hex (f32 bits), `0d` hex (f64 bits) or decimal.
    F32Bits(u32),
    /// A 64-bit float literal (`0d...` or decimal, which PTX treats as f64).
    F64(f64),
    /// A quoted string (pragmas).
    Str(String),
    /// One punctuation character.
    P(char),
}

/// A token with its line.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub tok: Tok,
    pub line: u32,
}

fn perr(line: u32, message: impl Into<String>) -> PtxError {
    PtxError::Parse {
        line: line as usize,
        message: message.into(),
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b'$' || c == b'%'
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$'
}

/// Splits PTX text into tokens.
pub(crate) fn lex(text: &str) -> Result<Vec<Token>, PtxError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0usize;
    let mut line = 1u32;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let start = line;
            i += 2;
            loop {
                if i + 1 >= b.len() {
                    return Err(perr(start, "unterminated /* comment"));
                }
                if b[i] == b'\n' {
                    line += 1;
                }
                if b[i] == b'*' && b[i + 1] == b'/' {
                    i += 2;
                    break;
                }
                i += 1;
            }
            continue;
        }
        if c == b'"' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\n' {
                    return Err(perr(line, "unterminated string"));
                }
                i += 1;
            }
            let s = text.get(start..i).unwrap_or("").to_string();
            i += 1;
            out.push(Token {
                tok: Tok::Str(s),
                line,
            });
            continue;
        }
        if c == b'.' && b.get(i + 1).is_some_and(|&n| is_ident_start(n)) {
            let start = i;
            i += 1;
            while i < b.len() {
                if is_ident_char(b[i]) {
                    i += 1;
                } else if b[i] == b':' && b.get(i + 1) == Some(&b':') {
                    i += 2;
                } else {
                    break;
                }
            }
            out.push(Token {
                tok: Tok::Dot(text[start..i].to_string()),
                line,
            });
            continue;
        }
        if is_ident_start(c) {
            let start = i;
            i += 1;
            while i < b.len() && is_ident_char(b[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(text[start..i].to_string()),
                line,
            });
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                // a decimal float may have an exponent sign: 1e-3
                i += 1;
                if i < b.len()
                    && (b[i] == b'-' || b[i] == b'+')
                    && matches!(b[i - 1], b'e' | b'E')
                    && !text[start..i].starts_with("0x")
                    && !text[start..i].starts_with("0X")
                    && !text[start..i].starts_with("0f")
                    && !text[start..i].starts_with("0d")
                {
                    i += 1;
                }
            }
            let s = &text[start..i];
            out.push(Token {
                tok: number(s).ok_or_else(|| perr(line, format!("bad number `{s}`")))?,
                line,
            });
            continue;
        }
        if b",;:{}[]()<>+-@!|=".contains(&c) {
            out.push(Token {
                tok: Tok::P(c as char),
                line,
            });
            i += 1;
            continue;
        }
        return Err(perr(
            line,
            format!(
                "unexpected character `{}`",
                text[i..].chars().next().unwrap_or('?')
            ),
        ));
    }
    Ok(out)
}

fn number(s: &str) -> Option<Tok> {
    let lower = s.to_ascii_lowercase();
    if let Some(h) = lower.strip_prefix("0f") {
        if h.len() == 8 {
            return u32::from_str_radix(h, 16).ok().map(Tok::F32Bits);
        }
        return None;
    }
    if let Some(h) = lower.strip_prefix("0d") {
        if h.len() == 16 {
            return u64::from_str_radix(h, 16)
                .ok()
                .map(|v| Tok::F64(f64::from_bits(v)));
        }
        return None;
    }
    let t = lower.strip_suffix('u').unwrap_or(&lower);
    if let Some(h) = t.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).ok().map(Tok::Int);
    }
    if let Some(h) = t.strip_prefix("0b") {
        return u64::from_str_radix(h, 2).ok().map(Tok::Int);
    }
    if t.contains('.') || t.contains('e') {
        return lower.parse::<f64>().ok().map(Tok::F64);
    }
    if t.len() > 1 && t.starts_with('0') {
        return u64::from_str_radix(&t[1..], 8).ok().map(Tok::Int);
    }
    t.parse::<u64>().ok().map(Tok::Int)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_instruction() {
        let t =
            lex("@!%p1 ld.global.nc.v4.f32 {%f1, %f2}, [%rd1+-16]; // c\n0f3F800000 0x10 017 1.5")
                .unwrap();
        let toks: Vec<Tok> = t.into_iter().map(|t| t.tok).collect();
        assert_eq!(toks[0], Tok::P('@'));
        assert_eq!(toks[1], Tok::P('!'));
        assert_eq!(toks[2], Tok::Ident("%p1".into()));
        assert_eq!(toks[3], Tok::Ident("ld".into()));
        assert_eq!(toks[4], Tok::Dot(".global".into()));
        assert!(toks.contains(&Tok::F32Bits(0x3F80_0000)));
        assert!(toks.contains(&Tok::Int(16)));
        assert!(toks.contains(&Tok::Int(15)));
        assert!(toks.contains(&Tok::F64(1.5)));
    }

    #[test]
    fn lexes_scoped_modifiers() {
        let t = lex("cp.async.cg.shared::cta.global.L2::128B").unwrap();
        assert_eq!(t[3].tok, Tok::Dot(".shared::cta".into()));
        assert_eq!(t[5].tok, Tok::Dot(".L2::128B".into()));
    }
}
