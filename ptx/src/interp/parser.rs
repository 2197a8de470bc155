//! Syntax of the PTX subset: module directives, `.entry` functions with
//! their parameters, `.reg` / `.shared` declarations, labels and
//! instructions (guard, opcode, modifiers, operands). Meaning (types,
//! registers, addresses) is given later by [`super::decode`].

use super::lexer::{lex, Tok, Token};
use crate::PtxError;

/// A parsed module.
#[derive(Debug, Default)]
pub(crate) struct Module {
    pub entries: Vec<Entry>,
    /// Module-scope `.shared` variables (visible to every entry).
    pub shared: Vec<SharedVar>,
}

/// One `.param` of an entry.
#[derive(Debug, Clone)]
pub(crate) struct ParamDecl {
    pub name: String,
    pub size: u32,
    pub align: u32,
    /// The declared scalar type (`.u64`, `.b8` for arrays).
    pub ty: String,
    pub line: u32,
}

/// A `.reg` declaration: `count` registers `name0..name{count-1}` when
/// declared with `<count>`, else the single register `name`.
#[derive(Debug, Clone)]
pub(crate) struct RegDecl {
    pub name: String,
    pub count: Option<u32>,
    pub ty: String,
    pub line: u32,
}

/// A `.shared` variable; `count == None` is an `.extern` unsized array
/// (dynamic shared memory).
#[derive(Debug, Clone)]
pub(crate) struct SharedVar {
    pub name: String,
    pub align: u32,
    pub elem_size: u32,
    pub count: Option<u64>,
    pub line: u32,
}

/// An instruction operand, before meaning is given to names.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    /// A name: register, special register (`%tid.x`), label or symbol.
    Name(String),
    /// `!name` (negated predicate).
    Not(String),
    /// An integer literal (bits, two's complement when negative).
    Int(u64),
    /// A `0f` float literal (f32 bits).
    F32(u32),
    /// A `0d` or decimal float literal.
    F64(f64),
    /// `{a, b, ...}`.
    Vec(Vec<Operand>),
    /// `[base + off]`; base may be absent (`[16]`).
    Addr { base: Option<String>, off: i64 },
    /// `p|q` (setp with two destinations).
    Pair(String, String),
    /// `_`.
    Sink,
}

/// One instruction as written.
#[derive(Debug, Clone)]
pub(crate) struct Inst {
    pub line: u32,
    pub guard: Option<(String, bool)>,
    pub opcode: String,
    pub mods: Vec<String>,
    pub operands: Vec<Operand>,
}

/// A statement of an entry's body.
#[derive(Debug, Clone)]
pub(crate) enum Stmt {
    Label(String, u32),
    Inst(Inst),
}

/// An `.entry`.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    pub name: String,
    pub line: u32,
    pub params: Vec<ParamDecl>,
    pub regs: Vec<RegDecl>,
    pub shared: Vec<SharedVar>,
    pub body: Vec<Stmt>,
}

struct P {
    toks: Vec<Token>,
    pos: usize,
}

fn perr(line: u32, message: impl Into<String>) -> PtxError {
    PtxError::Parse {
        line: line as usize,
        message: message.into(),
    }
}

/// Size in bytes of a PTX fundamental type name (`.u32` -> 4).
pub(crate) fn type_size(ty: &str) -> Option<u32> {
    Some(match ty {
        ".pred" => 1,
        ".b8" | ".u8" | ".s8" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        _ => return None,
    })
}

impl P {
    fn line(&self) -> u32 {
        self.toks
            .get(self.pos)
            .or_else(|| self.toks.last())
            .map_or(1, |t| t.line)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }

    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.pos + k).map(|t| &t.tok)
    }

    fn next(&mut self) -> Result<Tok, PtxError> {
        let line = self.line();
        let t = self
            .toks
            .get(self.pos)
            .map(|t| t.tok.clone())
            .ok_or_else(|| perr(line, "unexpected end of module"))?;
        self.pos += 1;
        Ok(t)
    }

    fn is_p(&self, c: char) -> bool {
        self.peek() == Some(&Tok::P(c))
    }

    fn eat_p(&mut self, c: char) -> bool {
        if self.is_p(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_p(&mut self, c: char) -> Result<(), PtxError> {
        let line = self.line();
        match self.next()? {
            Tok::P(x) if x == c => Ok(()),
            t => Err(perr(line, format!("expected `{c}`, found {}", show(&t)))),
        }
    }

    fn ident(&mut self) -> Result<String, PtxError> {
        let line = self.line();
        match self.next()? {
            Tok::Ident(s) => Ok(s),
            t => Err(perr(line, format!("expected a name, found {}", show(&t)))),
        }
    }

    fn int(&mut self) -> Result<u64, PtxError> {
        let line = self.line();
        match self.next()? {
            Tok::Int(v) => Ok(v),
            t => Err(perr(
                line,
                format!("expected an integer, found {}", show(&t)),
            )),
        }
    }

    fn dot(&mut self) -> Result<String, PtxError> {
        let line = self.line();
        match self.next()? {
            Tok::Dot(s) => Ok(s),
            t => Err(perr(
                line,
                format!("expected a directive or type, found {}", show(&t)),
            )),
        }
    }

    /// Skips tokens through the next `;`.
    fn skip_statement(&mut self) -> Result<(), PtxError> {
        while !self.eat_p(';') {
            self.next()?;
        }
        Ok(())
    }

    /// Skips the rest of a line (`.loc`, `.file` have no `;`).
    fn skip_line(&mut self, line: u32) {
        while self.toks.get(self.pos).is_some_and(|t| t.line == line) {
            self.pos += 1;
        }
    }
}

fn show(t: &Tok) -> String {
    match t {
        Tok::Ident(s) | Tok::Dot(s) => format!("`{s}`"),
        Tok::Int(v) => format!("`{v}`"),
        Tok::F32Bits(v) => format!("`0f{v:08X}`"),
        Tok::F64(v) => format!("`{v}`"),
        Tok::Str(s) => format!("\"{s}\""),
        Tok::P(c) => format!("`{c}`"),
    }
}

/// Parses a module.
pub(crate) fn parse(text: &str) -> Result<Module, PtxError> {
    let mut p = P {
        toks: lex(text)?,
        pos: 0,
    };
    let mut m = Module::default();
    let mut saw_version = false;
    while let Some(t) = p.peek().cloned() {
        let line = p.line();
        match t {
            Tok::Dot(d) => match d.as_str() {
                ".version" => {
                    p.pos += 1;
                    match p.next()? {
                        Tok::F64(v) if v >= 1.0 => {}
                        Tok::Int(_) => {}
                        t => return Err(perr(line, format!("bad .version {}", show(&t)))),
                    }
                    saw_version = true;
                }
                ".target" => {
                    p.pos += 1;
                    p.ident()?;
                    while p.eat_p(',') {
                        p.ident()?;
                    }
                }
                ".address_size" => {
                    p.pos += 1;
                    let v = p.int()?;
                    if v != 64 {
                        return Err(perr(
                            line,
                            format!(".address_size {v}: only 64 is supported"),
                        ));
                    }
                }
                ".file" | ".loc" | ".section" => {
                    p.skip_line(line);
                }
                ".visible" | ".weak" => {
                    p.pos += 1;
                }
                ".extern" => {
                    p.pos += 1;
                    if p.peek() == Some(&Tok::Dot(".shared".into())) {
                        p.pos += 1;
                        let v = shared_var(&mut p, line, true)?;
                        m.shared.push(v);
                    }
                }
                ".shared" => {
                    p.pos += 1;
                    let v = shared_var(&mut p, line, false)?;
                    m.shared.push(v);
                }
                ".entry" => {
                    p.pos += 1;
                    let e = entry(&mut p, line)?;
                    m.entries.push(e);
                }
                ".func" => {
                    return Err(perr(line, "`.func` is not supported by the interpreter (inline device functions into the .entry)"));
                }
                ".global" | ".const" => {
                    return Err(perr(
                        line,
                        format!(
                            "module-scope `{d}` variables are not supported by the interpreter"
                        ),
                    ));
                }
                ".pragma" => {
                    p.skip_statement()?;
                }
                other => return Err(perr(line, format!("unknown module directive `{other}`"))),
            },
            other => {
                return Err(perr(
                    line,
                    format!("expected a directive, found {}", show(&other)),
                ))
            }
        }
    }
    if !saw_version {
        return Err(perr(1, "missing `.version` directive"));
    }
    Ok(m)
}

/// `.shared [.align N] .type name[count];` (after `.shared`).
fn shared_var(p: &mut P, line: u32, is_extern: bool) -> Result<SharedVar, PtxError> {
    let mut align = 0u32;
    let mut elem = None;
    loop {
        match p.peek() {
            Some(Tok::Dot(d)) if d == ".align" => {
                p.pos += 1;
                align = u32::try_from(p.int()?).map_err(|_| perr(line, "bad .align"))?;
            }
            Some(Tok::Dot(d)) => {
                let d = d.clone();
                p.pos += 1;
                if d == ".v2" || d == ".v4" {
                    return Err(perr(
                        line,
                        "vector-typed .shared variables are not supported; use .b8 arrays",
                    ));
                }
                elem = Some(
                    type_size(&d).ok_or_else(|| perr(line, format!("bad .shared type `{d}`")))?,
                );
            }
            _ => break,
        }
    }
    let elem_size = elem.ok_or_else(|| perr(line, ".shared variable without a type"))?;
    let name = p.ident()?;
    let mut count = Some(1u64);
    if p.eat_p('[') {
        if p.eat_p(']') {
            count = None;
        } else {
            count = Some(p.int()?);
            p.expect_p(']')?;
        }
    }
    if p.is_p('=') {
        return Err(perr(
            line,
            "initialized .shared variables are not supported",
        ));
    }
    p.expect_p(';')?;
    if count.is_none() && !is_extern {
        return Err(perr(
            line,
            "an unsized .shared array must be declared .extern",
        ));
    }
    if align == 0 {
        align = elem_size;
    }
    if !align.is_power_of_two() {
        return Err(perr(line, format!(".align {align} is not a power of two")));
    }
    Ok(SharedVar {
        name,
        align,
        elem_size,
        count,
        line,
    })
}

fn entry(p: &mut P, line: u32) -> Result<Entry, PtxError> {
    let mut e = Entry {
        name: p.ident()?,
        line,
        ..Entry::default()
    };
    if p.eat_p('(') && !p.eat_p(')') {
        loop {
            e.params.push(param(p)?);
            if p.eat_p(')') {
                break;
            }
            p.expect_p(',')?;
        }
    }
    // performance directives up to the body
    while !p.is_p('{') {
        let l = p.line();
        match p.next()? {
            Tok::Dot(_) | Tok::Int(_) | Tok::P(',') | Tok::Str(_) => {}
            Tok::P(';') => {}
            t => {
                return Err(perr(
                    l,
                    format!("expected the body of `{}`, found {}", e.name, show(&t)),
                ))
            }
        }
    }
    p.expect_p('{')?;
    let mut depth = 1;
    loop {
        let l = p.line();
        let Some(t) = p.peek().cloned() else {
            return Err(perr(l, format!("unterminated body of `{}`", e.name)));
        };
        match t {
            Tok::P('{') => {
                p.pos += 1;
                depth += 1;
            }
            Tok::P('}') => {
                p.pos += 1;
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Dot(d) => match d.as_str() {
                ".reg" => {
                    p.pos += 1;
                    reg_decl(p, l, &mut e.regs)?;
                }
                ".shared" => {
                    p.pos += 1;
                    let v = shared_var(p, l, false)?;
                    e.shared.push(v);
                }
                ".loc" | ".file" => p.skip_line(l),
                ".pragma" => p.skip_statement()?,
                ".local" => {
                    return Err(perr(
                        l,
                        "`.local` memory is not supported by the interpreter",
                    ))
                }
                other => {
                    return Err(perr(
                        l,
                        format!("unsupported directive `{other}` in a function body"),
                    ))
                }
            },
            Tok::Ident(name) if p.peek_at(1) == Some(&Tok::P(':')) => {
                p.pos += 2;
                e.body.push(Stmt::Label(name, l));
            }
            Tok::Ident(_) | Tok::P('@') => {
                let i = inst(p)?;
                e.body.push(Stmt::Inst(i));
            }
            other => {
                return Err(perr(
                    l,
                    format!("expected an instruction, found {}", show(&other)),
                ))
            }
        }
    }
    Ok(e)
}

fn param(p: &mut P) -> Result<ParamDecl, PtxError> {
    let line = p.line();
    let d = p.dot()?;
    if d != ".param" {
        return Err(perr(line, format!("expected `.param`, found `{d}`")));
    }
    let mut align = 0;
    let mut ty = None;
    while let Some(Tok::Dot(d)) = p.peek().cloned() {
        p.pos += 1;
        match d.as_str() {
            ".align" => align = u32::try_from(p.int()?).map_err(|_| perr(line, "bad .align"))?,
            ".ptr" | ".global" | ".shared" | ".const" | ".local" => {}
            t => {
                type_size(t).ok_or_else(|| perr(line, format!("bad parameter type `{t}`")))?;
                ty = Some(t.to_string());
            }
        }
    }
    let ty = ty.ok_or_else(|| perr(line, "parameter without a type"))?;
    let elem = type_size(&ty).unwrap_or(1);
    let name = p.ident()?;
    let mut size = elem;
    if p.eat_p('[') {
        let n = p.int()?;
        p.expect_p(']')?;
        size = u32::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(elem))
            .ok_or_else(|| perr(line, "parameter array too large"))?;
    }
    if align == 0 {
        align = elem;
    }
    Ok(ParamDecl {
        name,
        size,
        align,
        ty,
        line,
    })
}

fn reg_decl(p: &mut P, line: u32, regs: &mut Vec<RegDecl>) -> Result<(), PtxError> {
    let mut ty = p.dot()?;
    if ty == ".v2" || ty == ".v4" {
        return Err(perr(line, "vector registers are not supported"));
    }
    if type_size(&ty).is_none() {
        return Err(perr(line, format!("bad register type `{ty}`")));
    }
    if ty == ".f16x2" || ty == ".bf16x2" {
        ty = ".b32".into();
    }
    loop {
        let name = p.ident()?;
        let mut count = None;
        if p.eat_p('<') {
            let n = p.int()?;
            p.expect_p('>')?;
            count = Some(
                u32::try_from(n)
                    .ok()
                    .filter(|&n| n <= 1 << 16)
                    .ok_or_else(|| {
                        perr(
                            line,
                            format!("{n} registers in one declaration (at most 65536)"),
                        )
                    })?,
            );
        }
        regs.push(RegDecl {
            name,
            count,
            ty: ty.clone(),
            line,
        });
        if p.eat_p(';') {
            return Ok(());
        }
        p.expect_p(',')?;
    }
}

fn inst(p: &mut P) -> Result<Inst, PtxError> {
    let line = p.line();
    let mut guard = None;
    if p.eat_p('@') {
        let neg = p.eat_p('!');
        guard = Some((p.ident()?, neg));
    }
    let opcode = p.ident()?;
    let mut mods = Vec::new();
    while let Some(Tok::Dot(d)) = p.peek() {
        mods.push(d.clone());
        p.pos += 1;
    }
    let mut operands = Vec::new();
    if !p.eat_p(';') {
        loop {
            operands.push(operand(p)?);
            if p.eat_p(';') {
                break;
            }
            let l = p.line();
            match p.next()? {
                Tok::P(',') => {}
                t => {
                    return Err(perr(
                        l,
                        format!(
                            "expected `,` or `;` after an operand of `{opcode}`, found {}",
                            show(&t)
                        ),
                    ))
                }
            }
        }
    }
    Ok(Inst {
        line,
        guard,
        opcode,
        mods,
        operands,
    })
}

/// A name, with a special register's component (`%tid.x`) joined.
fn name(p: &mut P) -> Result<String, PtxError> {
    let mut n = p.ident()?;
    if matches!(n.as_str(), "%tid" | "%ntid" | "%ctaid" | "%nctaid") {
        if let Some(Tok::Dot(c)) = p.peek() {
            if matches!(c.as_str(), ".x" | ".y" | ".z") {
                n.push_str(c);
                p.pos += 1;
            }
        }
    }
    Ok(n)
}

fn operand(p: &mut P) -> Result<Operand, PtxError> {
    let line = p.line();
    match p.peek().cloned() {
        Some(Tok::P('{')) => {
            p.pos += 1;
            let mut v = Vec::new();
            loop {
                if p.is_p('{') {
                    return Err(perr(line, "nested vector operand"));
                }
                v.push(operand(p)?);
                if p.eat_p('}') {
                    break;
                }
                p.expect_p(',')?;
            }
            Ok(Operand::Vec(v))
        }
        Some(Tok::P('[')) => {
            p.pos += 1;
            let mut base = None;
            let mut off: i64 = 0;
            match p.peek().cloned() {
                Some(Tok::Ident(_)) => {
                    base = Some(name(p)?);
                    if p.eat_p('+') {
                        let neg = p.eat_p('-');
                        let v = p.int()? as i64;
                        off = if neg { v.wrapping_neg() } else { v };
                    } else if p.eat_p('-') {
                        off = (p.int()? as i64).wrapping_neg();
                    }
                }
                Some(Tok::Int(_)) => off = p.int()? as i64,
                Some(Tok::P('-')) => {
                    p.pos += 1;
                    off = (p.int()? as i64).wrapping_neg();
                }
                _ => return Err(perr(line, "bad address operand")),
            }
            p.expect_p(']')?;
            Ok(Operand::Addr { base, off })
        }
        Some(Tok::P('!')) => {
            p.pos += 1;
            Ok(Operand::Not(name(p)?))
        }
        Some(Tok::P('-')) => {
            p.pos += 1;
            match p.next()? {
                Tok::Int(v) => Ok(Operand::Int(v.wrapping_neg())),
                Tok::F64(v) => Ok(Operand::F64(-v)),
                Tok::F32Bits(v) => Ok(Operand::F32(v ^ 0x8000_0000)),
                t => Err(perr(line, format!("bad operand -{}", show(&t)))),
            }
        }
        Some(Tok::Int(v)) => {
            p.pos += 1;
            Ok(Operand::Int(v))
        }
        Some(Tok::F32Bits(v)) => {
            p.pos += 1;
            Ok(Operand::F32(v))
        }
        Some(Tok::F64(v)) => {
            p.pos += 1;
            Ok(Operand::F64(v))
        }
        Some(Tok::Ident(_)) => {
            let n = name(p)?;
            if n == "_" {
                return Ok(Operand::Sink);
            }
            if p.eat_p('|') {
                let q = name(p)?;
                return Ok(Operand::Pair(n, q));
            }
            Ok(Operand::Name(n))
        }
        Some(t) => Err(perr(line, format!("bad operand {}", show(&t)))),
        None => Err(perr(line, "unexpected end of module")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entry() {
        let m = parse(
            ".version 8.0\n.target sm_80\n.address_size 64\n\
             .extern .shared .align 16 .b8 dyn[];\n\
             .visible .entry k(.param .u64 k_p0, .param .u32 n)\n.maxntid 128, 1, 1\n{\n\
             .reg .pred %p<2>;\n .reg .b32 %r<4>, %x;\n .shared .align 4 .f32 s[32];\n\
             ld.param.u64 %rd1, [k_p0];\n @!%p1 bra $L1;\n$L1:\n setp.lt.u32 %p0|%p1, %r1, 5;\n ret;\n}\n",
        )
        .unwrap();
        assert_eq!(m.shared[0].count, None);
        let e = &m.entries[0];
        assert_eq!(e.name, "k");
        assert_eq!(e.params.len(), 2);
        assert_eq!(e.params[1].size, 4);
        assert_eq!(e.regs.len(), 3);
        assert_eq!(e.shared[0].count, Some(32));
        assert_eq!(e.body.len(), 5);
        match &e.body[1] {
            Stmt::Inst(i) => {
                assert_eq!(i.guard, Some(("%p1".into(), true)));
                assert_eq!(i.line, 12);
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse(".version 8.0\n.entry k()\n{\n add.u32 %r1 %r2;\n}\n").unwrap_err();
        match e {
            PtxError::Parse { line, .. } => assert_eq!(line, 4),
            e => panic!("{e}"),
        }
    }
}
