//! Lowering of parsed PTX to the interpreter's compact instruction form:
//! every operand becomes a register index (immediates and symbol addresses
//! become constant registers, special registers are registers filled at
//! block start), every arithmetic instruction a function pointer chosen by
//! type and modifiers, every label an instruction index. Nothing is looked up
//! by name while a kernel runs.

use std::collections::HashMap;

use super::ops::{self, CvtSpec, Fmt, IRnd, Kind, Rnd};
use super::parser::{self, Entry, Operand, Stmt};
use crate::PtxError;

pub(crate) type F1 = fn(u64) -> u64;
pub(crate) type F2 = fn(u64, u64) -> u64;
pub(crate) type F3 = fn(u64, u64, u64) -> u64;
pub(crate) type Cmp = fn(u64, u64) -> bool;

/// No register (absent optional operand).
pub(crate) const NO_REG: u32 = u32::MAX;

/// Base of the generic-address window of shared memory (`cvta.shared`).
pub(crate) const SHARED_WINDOW: u64 = 0x1000_0000;
/// Size of that window.
pub(crate) const SHARED_WINDOW_SIZE: u64 = 0x0100_0000;

/// Special registers, at register indices `0..SPECIALS.len()`.
pub(crate) const SPECIALS: [&str; 27] = [
    "%tid.x",
    "%tid.y",
    "%tid.z",
    "%ntid.x",
    "%ntid.y",
    "%ntid.z",
    "%ctaid.x",
    "%ctaid.y",
    "%ctaid.z",
    "%nctaid.x",
    "%nctaid.y",
    "%nctaid.z",
    "%laneid",
    "%warpid",
    "%nwarpid",
    "%lanemask_eq",
    "%lanemask_le",
    "%lanemask_lt",
    "%lanemask_ge",
    "%lanemask_gt",
    "%clock",
    "%clock64",
    "%dynamic_smem_size",
    "%total_smem_size",
    "%smid",
    "%nsmid",
    "%gridid",
];
/// The register that `_` and absent destinations write to.
pub(crate) const SINK: u32 = SPECIALS.len() as u32;

/// A state space of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Param,
    Generic,
}

/// One decoded instruction.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Alu1 {
        f: F1,
        d: u32,
        a: u32,
    },
    Alu2 {
        f: F2,
        d: u32,
        a: u32,
        b: u32,
    },
    Alu3 {
        f: F3,
        d: u32,
        a: u32,
        b: u32,
        c: u32,
    },
    Setp {
        f: Cmp,
        p: u32,
        q: u32,
        a: u32,
        b: u32,
        comb: u8,
        c: u32,
        cneg: bool,
    },
    Pack {
        d: u32,
        parts: [u32; 4],
        n: u8,
        bits: u8,
    },
    Unpack {
        ds: [u32; 4],
        n: u8,
        bits: u8,
        a: u32,
    },
    Cvt {
        spec: CvtSpec,
        d: u32,
        a: u32,
    },
    CvtPack {
        bf: bool,
        rnd: Rnd,
        relu: bool,
        satfinite: bool,
        d: u32,
        a: u32,
        b: u32,
    },
    Ld {
        space: Space,
        size: u8,
        n: u8,
        sext: u8,
        dmask: u64,
        ds: [u32; 4],
        base: u32,
        off: i64,
    },
    St {
        space: Space,
        size: u8,
        n: u8,
        srcs: [u32; 4],
        base: u32,
        off: i64,
    },
    Atom {
        space: Space,
        size: u8,
        f: F3,
        d: u32,
        base: u32,
        off: i64,
        b: u32,
        c: u32,
    },
    Bra {
        target: u32,
    },
    Exit,
    Trap,
    Bar {
        id: u32,
        count: u32,
        arrive: bool,
    },
    WarpSync {
        mask: u32,
    },
    Shfl {
        mode: u8,
        d: u32,
        p: u32,
        a: u32,
        b: u32,
        c: u32,
        mask: u32,
    },
    Vote {
        mode: u8,
        d: u32,
        a: u32,
        neg: bool,
        mask: u32,
    },
    Activemask {
        d: u32,
    },
    Redux {
        f: F2,
        d: u32,
        a: u32,
        mask: u32,
    },
    CpAsync {
        dbase: u32,
        doff: i64,
        sbase: u32,
        soff: i64,
        size: u8,
        src_size: u32,
        ignore: u32,
        ineg: bool,
    },
    CpCommit,
    CpWait {
        n: u32,
        all: bool,
    },
    Ldmatrix {
        num: u8,
        trans: bool,
        ds: [u32; 4],
        base: u32,
        off: i64,
        generic: bool,
    },
    Mma {
        k: u8,
        bf: bool,
        d_f32: bool,
        c_f32: bool,
        d: [u32; 4],
        a: [u32; 4],
        b: [u32; 2],
        c: [u32; 4],
    },
    Nop,
}

/// An instruction with its guard and source line.
#[derive(Debug, Clone)]
pub(crate) struct Inst {
    pub op: Op,
    /// Guard predicate register, [`NO_REG`] for none.
    pub guard: u32,
    pub guard_neg: bool,
    pub line: u32,
}

/// A kernel parameter's place in the parameter buffer.
#[derive(Debug, Clone)]
pub(crate) struct ParamSlot {
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub ty: String,
}

/// A decoded `.entry`.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    pub name: String,
    pub code: Vec<Inst>,
    pub nregs: u32,
    pub consts: Vec<(u32, u64)>,
    pub params: Vec<ParamSlot>,
    pub param_bytes: u32,
    /// Bytes of static shared memory; the dynamic window starts at `dyn_offset`.
    pub static_shared: u32,
    pub dyn_offset: u32,
}

/// Register types, as far as the decoder cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    B(u32),
    U(u32),
    S(u32),
    F16,
    F16x2,
    Bf16,
    Bf16x2,
    F32,
    F64,
    Pred,
}

impl Ty {
    fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            ".b8" => Ty::B(8),
            ".b16" => Ty::B(16),
            ".b32" => Ty::B(32),
            ".b64" => Ty::B(64),
            ".u8" => Ty::U(8),
            ".u16" => Ty::U(16),
            ".u32" => Ty::U(32),
            ".u64" => Ty::U(64),
            ".s8" => Ty::S(8),
            ".s16" => Ty::S(16),
            ".s32" => Ty::S(32),
            ".s64" => Ty::S(64),
            ".f16" => Ty::F16,
            ".f16x2" => Ty::F16x2,
            ".bf16" => Ty::Bf16,
            ".bf16x2" => Ty::Bf16x2,
            ".f32" => Ty::F32,
            ".f64" => Ty::F64,
            ".pred" => Ty::Pred,
            _ => return None,
        })
    }

    pub(crate) fn bits(self) -> u32 {
        match self {
            Ty::B(w) | Ty::U(w) | Ty::S(w) => w,
            Ty::F16 | Ty::Bf16 => 16,
            Ty::F16x2 | Ty::Bf16x2 | Ty::F32 => 32,
            Ty::F64 => 64,
            Ty::Pred => 1,
        }
    }

    fn is_int(self) -> bool {
        matches!(self, Ty::B(_) | Ty::U(_) | Ty::S(_))
    }

    fn kind(self) -> Option<Kind> {
        Some(match self {
            Ty::B(w) | Ty::U(w) => Kind::U(w),
            Ty::S(w) => Kind::S(w),
            Ty::F16 => Kind::F(Fmt::F16),
            Ty::Bf16 => Kind::F(Fmt::Bf16),
            Ty::F32 => Kind::F(Fmt::F32),
            Ty::F64 => Kind::F(Fmt::F64),
            _ => return None,
        })
    }
}

// ------------------------------------------------------------ fn selection

macro_rules! fs {
    ($($f:ident)::+, $t:ty, $r:literal, $ftz:expr, $sat:expr) => {
        match ($ftz, $sat) {
            (false, false) => $($f)::+::<$r, false, false> as $t,
            (true, false) => $($f)::+::<$r, true, false> as $t,
            (false, true) => $($f)::+::<$r, false, true> as $t,
            (true, true) => $($f)::+::<$r, true, true> as $t,
        }
    };
}

macro_rules! rfs {
    ($($f:ident)::+, $t:ty, $r:expr, $ftz:expr, $sat:expr) => {
        match $r {
            1 => fs!($($f)::+, $t, 1, $ftz, $sat),
            2 => fs!($($f)::+, $t, 2, $ftz, $sat),
            3 => fs!($($f)::+, $t, 3, $ftz, $sat),
            _ => fs!($($f)::+, $t, 0, $ftz, $sat),
        }
    };
}

macro_rules! ftz1 {
    ($($f:ident)::+, $t:ty, $ftz:expr) => {
        if $ftz {
            $($f)::+::<true> as $t
        } else {
            $($f)::+::<false> as $t
        }
    };
}

macro_rules! hx {
    ($($f:ident)::+, $t:ty, $bf:expr, $x2:expr, $ftz:expr, $sat:expr) => {
        match ($bf, $x2) {
            (false, false) => hfs!($($f)::+, $t, false, false, $ftz, $sat),
            (false, true) => hfs!($($f)::+, $t, false, true, $ftz, $sat),
            (true, false) => hfs!($($f)::+, $t, true, false, $ftz, $sat),
            (true, true) => hfs!($($f)::+, $t, true, true, $ftz, $sat),
        }
    };
}

macro_rules! hfs {
    ($($f:ident)::+, $t:ty, $bf:literal, $x2:literal, $ftz:expr, $sat:expr) => {
        match ($ftz, $sat) {
            (false, false) => $($f)::+::<$bf, $x2, false, false> as $t,
            (true, false) => $($f)::+::<$bf, $x2, true, false> as $t,
            (false, true) => $($f)::+::<$bf, $x2, false, true> as $t,
            (true, true) => $($f)::+::<$bf, $x2, true, true> as $t,
        }
    };
}

macro_rules! hx2 {
    ($($f:ident)::+, $t:ty, $bf:expr, $x2:expr) => {
        match ($bf, $x2) {
            (false, false) => $($f)::+::<false, false> as $t,
            (false, true) => $($f)::+::<false, true> as $t,
            (true, false) => $($f)::+::<true, false> as $t,
            (true, true) => $($f)::+::<true, true> as $t,
        }
    };
}

macro_rules! cmpsel {
    ($($f:ident)::+, $op:expr, $w:literal) => {
        match $op {
            0 => $($f)::+::<0, $w> as Cmp,
            1 => $($f)::+::<1, $w> as Cmp,
            2 => $($f)::+::<2, $w> as Cmp,
            3 => $($f)::+::<3, $w> as Cmp,
            4 => $($f)::+::<4, $w> as Cmp,
            5 => $($f)::+::<5, $w> as Cmp,
            6 => $($f)::+::<6, $w> as Cmp,
            7 => $($f)::+::<7, $w> as Cmp,
            8 => $($f)::+::<8, $w> as Cmp,
            9 => $($f)::+::<9, $w> as Cmp,
            10 => $($f)::+::<10, $w> as Cmp,
            11 => $($f)::+::<11, $w> as Cmp,
            12 => $($f)::+::<12, $w> as Cmp,
            13 => $($f)::+::<13, $w> as Cmp,
            14 => $($f)::+::<14, $w> as Cmp,
            15 => $($f)::+::<15, $w> as Cmp,
            16 => $($f)::+::<16, $w> as Cmp,
            _ => $($f)::+::<17, $w> as Cmp,
        }
    };
}

macro_rules! intw {
    ($w:expr, $name:ident, $t:ty) => {
        match $w {
            16 => Some(ops::w16::$name as $t),
            32 => Some(ops::w32::$name as $t),
            64 => Some(ops::w64::$name as $t),
            _ => None,
        }
    };
}

fn window_add(a: u64) -> u64 {
    a.wrapping_add(SHARED_WINDOW)
}
fn window_sub(a: u64) -> u64 {
    a.wrapping_sub(SHARED_WINDOW)
}
fn window_sub32(a: u64) -> u64 {
    a.wrapping_sub(SHARED_WINDOW) & 0xffff_ffff
}
fn is_shared_addr(a: u64) -> u64 {
    u64::from((SHARED_WINDOW..SHARED_WINDOW + SHARED_WINDOW_SIZE).contains(&a))
}
fn is_global_addr(a: u64) -> u64 {
    1 - is_shared_addr(a)
}
fn testp_finite<const F64: bool>(a: u64) -> u64 {
    let x = if F64 {
        f64::from_bits(a)
    } else {
        f64::from(f32::from_bits(a as u32))
    };
    u64::from(x.is_finite())
}
fn testp_infinite<const F64: bool>(a: u64) -> u64 {
    let x = if F64 {
        f64::from_bits(a)
    } else {
        f64::from(f32::from_bits(a as u32))
    };
    u64::from(x.is_infinite())
}
fn testp_number<const F64: bool>(a: u64) -> u64 {
    let x = if F64 {
        f64::from_bits(a)
    } else {
        f64::from(f32::from_bits(a as u32))
    };
    u64::from(!x.is_nan())
}
fn testp_nan<const F64: bool>(a: u64) -> u64 {
    let x = if F64 {
        f64::from_bits(a)
    } else {
        f64::from(f32::from_bits(a as u32))
    };
    u64::from(x.is_nan())
}

// atomics: f(old, b, c) -> new
fn at_exch(_: u64, b: u64, _: u64) -> u64 {
    b
}
fn at_cas<const W: u32>(old: u64, b: u64, c: u64) -> u64 {
    if old & ops::mask(W) == b & ops::mask(W) {
        c
    } else {
        old
    }
}
fn at_inc(old: u64, b: u64, _: u64) -> u64 {
    let (o, b) = (old as u32, b as u32);
    u64::from(if o >= b { 0 } else { o + 1 })
}
fn at_dec(old: u64, b: u64, _: u64) -> u64 {
    let (o, b) = (old as u32, b as u32);
    u64::from(if o == 0 || o > b { b } else { o - 1 })
}
macro_rules! at2 {
    ($name:ident, $f:expr) => {
        fn $name(old: u64, b: u64, _: u64) -> u64 {
            let f: fn(u64, u64) -> u64 = $f;
            f(old, b)
        }
    };
}
at2!(at_add32, ops::w32::add);
at2!(at_add64, ops::w64::add);
at2!(at_addf32, ops::add_f32::<0, false, false>);
at2!(at_addf64, ops::add_f64);
at2!(at_addf16, ops::add_h::<false, false, false, false>);
at2!(at_addf16x2, ops::add_h::<false, true, false, false>);
at2!(at_addbf16, ops::add_h::<true, false, false, false>);
at2!(at_addbf16x2, ops::add_h::<true, true, false, false>);
at2!(at_minu32, ops::w32::min_u);
at2!(at_maxu32, ops::w32::max_u);
at2!(at_mins32, ops::w32::min_s);
at2!(at_maxs32, ops::w32::max_s);
at2!(at_minu64, ops::w64::min_u);
at2!(at_maxu64, ops::w64::max_u);
at2!(at_mins64, ops::w64::min_s);
at2!(at_maxs64, ops::w64::max_s);
at2!(at_and32, ops::w32::and);
at2!(at_or32, ops::w32::or);
at2!(at_xor32, ops::w32::xor);
at2!(at_and64, ops::w64::and);
at2!(at_or64, ops::w64::or);
at2!(at_xor64, ops::w64::xor);

// ------------------------------------------------------------ decoder

struct Dec<'a> {
    kernel: &'a str,
    regs: HashMap<String, (u32, Ty)>,
    next: u32,
    consts: HashMap<u64, u32>,
    const_list: Vec<(u32, u64)>,
    labels: HashMap<String, u32>,
    shared: HashMap<String, u32>,
    params: HashMap<String, u32>,
    line: u32,
}

/// Modifiers of one instruction, split into types and the rest.
struct Mods<'a> {
    tys: Vec<Ty>,
    all: &'a [String],
}

impl Mods<'_> {
    fn has(&self, m: &str) -> bool {
        self.all.iter().any(|x| x == m)
    }
    fn has_prefix(&self, m: &str) -> bool {
        self.all.iter().any(|x| x.starts_with(m))
    }
    fn rnd(&self) -> Option<Rnd> {
        if self.has(".rn") {
            Some(Rnd::Rn)
        } else if self.has(".rz") {
            Some(Rnd::Rz)
        } else if self.has(".rm") {
            Some(Rnd::Rm)
        } else if self.has(".rp") {
            Some(Rnd::Rp)
        } else {
            None
        }
    }
    fn irnd(&self) -> Option<IRnd> {
        if self.has(".rni") {
            Some(IRnd::Rni)
        } else if self.has(".rzi") {
            Some(IRnd::Rzi)
        } else if self.has(".rmi") {
            Some(IRnd::Rmi)
        } else if self.has(".rpi") {
            Some(IRnd::Rpi)
        } else {
            None
        }
    }
    fn space(&self) -> Result<Space, String> {
        for m in self.all {
            let base = m.split("::").next().unwrap_or(m);
            match base {
                ".global" => return Ok(Space::Global),
                ".shared" => return Ok(Space::Shared),
                ".param" => return Ok(Space::Param),
                ".local" => return Err("`.local` memory is not supported".into()),
                ".const" => return Err("`.const` memory is not supported".into()),
                _ => {}
            }
        }
        Ok(Space::Generic)
    }
    fn vec(&self) -> Result<u8, String> {
        if self.has(".v2") {
            Ok(2)
        } else if self.has(".v4") {
            Ok(4)
        } else if self.has(".v8") {
            Err("`.v8` accesses are not supported".into())
        } else {
            Ok(1)
        }
    }
}

impl<'a> Dec<'a> {
    fn err(&self, m: impl Into<String>) -> PtxError {
        PtxError::Parse {
            line: self.line as usize,
            message: format!("{}: {}", self.kernel, m.into()),
        }
    }

    fn konst(&mut self, v: u64) -> u32 {
        if let Some(&r) = self.consts.get(&v) {
            return r;
        }
        let r = self.next;
        self.next += 1;
        self.consts.insert(v, r);
        self.const_list.push((r, v));
        r
    }

    fn imm(&self, o: &Operand, ty: Ty) -> Result<u64, PtxError> {
        let w = ty.bits();
        Ok(match (o, ty) {
            (Operand::Int(v), Ty::F32) => u64::from((*v as i64 as f32).to_bits()),
            (Operand::Int(v), Ty::F64) => (*v as i64 as f64).to_bits(),
            (Operand::Int(v), Ty::F16 | Ty::Bf16 | Ty::F16x2 | Ty::Bf16x2) => *v & ops::mask(w),
            (Operand::Int(v), _) => *v & ops::mask(w),
            (Operand::F32(b), Ty::F32) => u64::from(*b),
            (Operand::F32(b), Ty::F64) => f64::from(f32::from_bits(*b)).to_bits(),
            (Operand::F32(b), Ty::F16) => {
                ops::round_float(f64::from(f32::from_bits(*b)), Fmt::F16, Rnd::Rn, 0, false)
            }
            (Operand::F32(b), Ty::Bf16) => {
                ops::round_float(f64::from(f32::from_bits(*b)), Fmt::Bf16, Rnd::Rn, 0, false)
            }
            (Operand::F32(b), _) => u64::from(*b) & ops::mask(w),
            (Operand::F64(x), Ty::F32) => ops::round_float(*x, Fmt::F32, Rnd::Rn, 0, false),
            (Operand::F64(x), Ty::F64) => x.to_bits(),
            (Operand::F64(x), Ty::F16) => ops::round_float(*x, Fmt::F16, Rnd::Rn, 0, false),
            (Operand::F64(x), Ty::Bf16) => ops::round_float(*x, Fmt::Bf16, Rnd::Rn, 0, false),
            (Operand::F64(x), _) => {
                return Err(self.err(format!("float literal {x} for a {w}-bit integer operand")))
            }
            _ => return Err(self.err("expected an immediate")),
        })
    }

    fn lookup(&self, n: &str) -> Option<u32> {
        if let Some(i) = SPECIALS.iter().position(|s| *s == n) {
            return Some(i as u32);
        }
        self.regs.get(n).map(|r| r.0)
    }

    fn src(&mut self, o: &Operand, ty: Ty) -> Result<u32, PtxError> {
        match o {
            Operand::Name(n) => {
                if let Some(r) = self.lookup(n) {
                    return Ok(r);
                }
                if let Some(&off) = self.shared.get(n) {
                    return Ok(self.konst(u64::from(off)));
                }
                if self.params.contains_key(n) {
                    return Err(self.err(format!(
                        "taking the address of parameter `{n}` is not supported; use ld.param"
                    )));
                }
                Err(self.err(format!("unknown register or symbol `{n}`")))
            }
            Operand::Int(_) | Operand::F32(_) | Operand::F64(_) => {
                let v = self.imm(o, ty)?;
                Ok(self.konst(v))
            }
            Operand::Sink => Err(self.err("`_` cannot be a source")),
            other => Err(self.err(format!("expected a register or immediate, found {other:?}"))),
        }
    }

    fn dst(&mut self, o: &Operand) -> Result<u32, PtxError> {
        match o {
            Operand::Sink => Ok(SINK),
            Operand::Name(n) => match self.regs.get(n) {
                Some(r) => Ok(r.0),
                None if SPECIALS.contains(&n.as_str()) => {
                    Err(self.err(format!("special register `{n}` is read-only")))
                }
                None => Err(self.err(format!("unknown register `{n}`"))),
            },
            other => Err(self.err(format!("expected a destination register, found {other:?}"))),
        }
    }

    fn reg_bits(&self, o: &Operand) -> u32 {
        match o {
            Operand::Name(n) => self.regs.get(n).map_or(64, |r| r.1.bits()),
            _ => 64,
        }
    }

    fn pred(&mut self, o: &Operand) -> Result<(u32, bool), PtxError> {
        match o {
            Operand::Name(n) => Ok((self.src(&Operand::Name(n.clone()), Ty::Pred)?, false)),
            Operand::Not(n) => Ok((self.src(&Operand::Name(n.clone()), Ty::Pred)?, true)),
            Operand::Int(v) => Ok((self.konst(*v & 1), false)),
            other => Err(self.err(format!("expected a predicate, found {other:?}"))),
        }
    }

    fn addr(&mut self, o: &Operand) -> Result<(u32, i64), PtxError> {
        match o {
            Operand::Addr { base: None, off } => Ok((NO_REG, *off)),
            Operand::Addr { base: Some(n), off } => {
                if let Some(r) = self.lookup(n) {
                    return Ok((r, *off));
                }
                if let Some(&s) = self.shared.get(n) {
                    return Ok((NO_REG, i64::from(s) + off));
                }
                if let Some(&p) = self.params.get(n) {
                    return Ok((NO_REG, i64::from(p) + off));
                }
                Err(self.err(format!("unknown address base `{n}`")))
            }
            // a bare register or symbol as an address (cp.async sizes aside)
            Operand::Name(_) => Err(self.err("an address must be written in brackets")),
            other => Err(self.err(format!("expected an address, found {other:?}"))),
        }
    }

    fn vec_dst(&mut self, o: &Operand) -> Result<([u32; 4], u8), PtxError> {
        let mut r = [SINK; 4];
        match o {
            Operand::Vec(v) => {
                if v.len() > 4 {
                    return Err(self.err("vectors have at most 4 elements"));
                }
                for (i, x) in v.iter().enumerate() {
                    r[i] = self.dst(x)?;
                }
                Ok((r, v.len() as u8))
            }
            x => {
                r[0] = self.dst(x)?;
                Ok((r, 1))
            }
        }
    }

    fn vec_src(&mut self, o: &Operand, ty: Ty) -> Result<([u32; 4], u8), PtxError> {
        let mut r = [SINK; 4];
        match o {
            Operand::Vec(v) => {
                if v.len() > 4 {
                    return Err(self.err("vectors have at most 4 elements"));
                }
                for (i, x) in v.iter().enumerate() {
                    r[i] = self.src(x, ty)?;
                }
                Ok((r, v.len() as u8))
            }
            x => {
                r[0] = self.src(x, ty)?;
                Ok((r, 1))
            }
        }
    }
}

/// Decodes every entry of a parsed module.
pub(crate) fn decode_module(m: &parser::Module) -> Result<Vec<Kernel>, PtxError> {
    let mut out = Vec::new();
    for e in &m.entries {
        if out.iter().any(|k: &Kernel| k.name == e.name) {
            return Err(PtxError::Parse {
                line: e.line as usize,
                message: format!("duplicate entry `{}`", e.name),
            });
        }
        out.push(decode_entry(m, e)?);
    }
    Ok(out)
}

fn layout_shared(
    vars: &[&parser::SharedVar],
    map: &mut HashMap<String, u32>,
) -> Result<(u32, u32), PtxError> {
    let mut off: u64 = 0;
    let mut dyn_align = 16u64;
    let mut dyn_names = Vec::new();
    for v in vars {
        match v.count {
            Some(n) => {
                let a = u64::from(v.align);
                off = off.div_ceil(a) * a;
                if map.insert(v.name.clone(), off as u32).is_some() {
                    return Err(PtxError::Parse {
                        line: v.line as usize,
                        message: format!("duplicate .shared variable `{}`", v.name),
                    });
                }
                off = n
                    .checked_mul(u64::from(v.elem_size))
                    .and_then(|b| off.checked_add(b))
                    .unwrap_or(u64::MAX);
            }
            None => {
                dyn_align = dyn_align.max(u64::from(v.align));
                dyn_names.push(v.name.clone());
            }
        }
        if off > SHARED_WINDOW_SIZE {
            return Err(PtxError::Parse {
                line: v.line as usize,
                message: format!("static shared memory of {off} bytes is too large"),
            });
        }
    }
    let stat = off as u32;
    let dyn_off = off.div_ceil(dyn_align) * dyn_align;
    for n in dyn_names {
        map.insert(n, dyn_off as u32);
    }
    Ok((stat, dyn_off as u32))
}

fn decode_entry(m: &parser::Module, e: &Entry) -> Result<Kernel, PtxError> {
    let mut d = Dec {
        kernel: &e.name,
        regs: HashMap::new(),
        next: SINK + 1,
        consts: HashMap::new(),
        const_list: Vec::new(),
        labels: HashMap::new(),
        shared: HashMap::new(),
        params: HashMap::new(),
        line: e.line,
    };
    // parameters
    let mut params = Vec::new();
    let mut poff = 0u32;
    for p in &e.params {
        let a = p.align.clamp(1, 256);
        d.line = p.line;
        poff = poff.div_ceil(a).saturating_mul(a);
        if d.params.insert(p.name.clone(), poff).is_some() {
            d.line = p.line;
            return Err(d.err(format!("duplicate parameter `{}`", p.name)));
        }
        params.push(ParamSlot {
            name: p.name.clone(),
            offset: poff,
            size: p.size,
            ty: p.ty.clone(),
        });
        poff = poff
            .checked_add(p.size)
            .filter(|&n| n <= 32_764)
            .ok_or_else(|| d.err(format!("parameters exceed 32764 bytes at `{}`", p.name)))?;
    }
    // shared memory: module scope first, then the entry's own
    let vars: Vec<&parser::SharedVar> = m.shared.iter().chain(e.shared.iter()).collect();
    let (static_shared, dyn_offset) = layout_shared(&vars, &mut d.shared)?;
    // registers
    for r in &e.regs {
        d.line = r.line;
        let ty = Ty::parse(&r.ty).ok_or_else(|| d.err(format!("bad register type `{}`", r.ty)))?;
        let names: Vec<String> = match r.count {
            Some(n) => (0..n).map(|i| format!("{}{}", r.name, i)).collect(),
            None => vec![r.name.clone()],
        };
        for n in names {
            if SPECIALS.contains(&n.as_str()) || d.regs.contains_key(&n) {
                return Err(d.err(format!("register `{n}` declared twice")));
            }
            d.regs.insert(n, (d.next, ty));
            d.next += 1;
        }
    }
    if d.next > 1 << 20 {
        return Err(d.err(format!("{} registers declared (at most 2^20)", d.next)));
    }
    // labels
    let mut idx = 0u32;
    for s in &e.body {
        match s {
            Stmt::Label(l, line) => {
                if d.labels.insert(l.clone(), idx).is_some() {
                    d.line = *line;
                    return Err(d.err(format!("label `{l}` defined twice")));
                }
            }
            Stmt::Inst(_) => idx += 1,
        }
    }
    let mut code = Vec::new();
    for s in &e.body {
        if let Stmt::Inst(i) = s {
            d.line = i.line;
            code.push(decode_inst(&mut d, i)?);
        }
    }
    code.push(Inst {
        op: Op::Exit,
        guard: NO_REG,
        guard_neg: false,
        line: code.last().map_or(e.line, |i| i.line),
    });
    Ok(Kernel {
        name: e.name.clone(),
        code,
        nregs: d.next,
        consts: d.const_list,
        params,
        param_bytes: poff,
        static_shared,
        dyn_offset,
    })
}

fn want(d: &Dec, ops: &[Operand], n: usize, op: &str) -> Result<(), PtxError> {
    if ops.len() != n {
        return Err(d.err(format!("`{op}` takes {n} operands, found {}", ops.len())));
    }
    Ok(())
}

fn decode_inst(d: &mut Dec, i: &parser::Inst) -> Result<Inst, PtxError> {
    let (guard, guard_neg) = match &i.guard {
        None => (NO_REG, false),
        Some((n, neg)) => {
            let r = d
                .lookup(n)
                .ok_or_else(|| d.err(format!("unknown guard predicate `{n}`")))?;
            if d.regs.get(n).is_some_and(|r| r.1 != Ty::Pred) {
                return Err(d.err(format!("guard `{n}` is not a .pred register")));
            }
            (r, *neg)
        }
    };
    let mods = Mods {
        tys: i.mods.iter().filter_map(|m| Ty::parse(m)).collect(),
        all: &i.mods,
    };
    let op = decode_op(d, i, &mods)?;
    Ok(Inst {
        op,
        guard,
        guard_neg,
        line: i.line,
    })
}

fn last_ty(d: &Dec, m: &Mods, op: &str) -> Result<Ty, PtxError> {
    m.tys
        .last()
        .copied()
        .ok_or_else(|| d.err(format!("`{op}` needs a type")))
}

#[allow(clippy::too_many_lines)]
fn decode_op(d: &mut Dec, i: &parser::Inst, m: &Mods) -> Result<Op, PtxError> {
    let o = &i.operands;
    let opc = i.opcode.as_str();
    let ftz = m.has(".ftz");
    let sat = m.has(".sat");
    let unsupported =
        |d: &Dec, what: &str| d.err(format!("unsupported: `{}` {what}", full_name(i)));
    match opc {
        "mov" => {
            want(d, o, 2, opc)?;
            let ty = last_ty(d, m, opc)?;
            match (&o[0], &o[1]) {
                (Operand::Vec(parts), src) => {
                    let n = parts.len();
                    if !(2..=4).contains(&n) || ty.bits() % n as u32 != 0 {
                        return Err(d.err("bad unpacking mov"));
                    }
                    let (ds, n) = d.vec_dst(&o[0])?;
                    let a = d.src(src, ty)?;
                    Ok(Op::Unpack {
                        ds,
                        n,
                        bits: (ty.bits() / u32::from(n)) as u8,
                        a,
                    })
                }
                (dst, Operand::Vec(parts)) => {
                    let n = parts.len();
                    if !(2..=4).contains(&n) || ty.bits() % n as u32 != 0 {
                        return Err(d.err("bad packing mov"));
                    }
                    let bits = ty.bits() / n as u32;
                    let (parts, n) = d.vec_src(&o[1], Ty::B(bits))?;
                    let dd = d.dst(dst)?;
                    Ok(Op::Pack {
                        d: dd,
                        parts,
                        n,
                        bits: bits as u8,
                    })
                }
                (dst, src) => {
                    let a = d.src(src, ty)?;
                    let dd = d.dst(dst)?;
                    Ok(Op::Alu1 {
                        f: ops::copy,
                        d: dd,
                        a,
                    })
                }
            }
        }
        "cvta" => {
            want(d, o, 2, opc)?;
            let ty = last_ty(d, m, opc)?;
            let a = d.src(&o[1], Ty::U(64))?;
            let dd = d.dst(&o[0])?;
            let to = m.has(".to");
            let f: F1 = match m.space().map_err(|e| d.err(e))? {
                Space::Shared if to => {
                    if ty.bits() == 32 {
                        window_sub32
                    } else {
                        window_sub
                    }
                }
                Space::Shared => window_add,
                Space::Global => ops::copy,
                _ => return Err(unsupported(d, "(only .global and .shared)")),
            };
            Ok(Op::Alu1 { f, d: dd, a })
        }
        "isspacep" => {
            want(d, o, 2, opc)?;
            let a = d.src(&o[1], Ty::U(64))?;
            let dd = d.dst(&o[0])?;
            let f: F1 = match m.space().map_err(|e| d.err(e))? {
                Space::Shared => is_shared_addr,
                Space::Global => is_global_addr,
                _ => return Err(unsupported(d, "")),
            };
            Ok(Op::Alu1 { f, d: dd, a })
        }
        "add" | "sub" | "mul" | "mad" | "fma" | "div" | "rem" | "min" | "max" | "and" | "or"
        | "xor" | "shl" | "shr" | "copysign" | "bfe" | "prmt" | "shf" | "selp" => arith3(d, i, m),
        "neg" | "abs" | "not" | "cnot" | "popc" | "clz" | "brev" | "bfind" | "rcp" | "sqrt"
        | "rsqrt" | "ex2" | "lg2" | "sin" | "cos" | "tanh" | "testp" => arith1(d, i, m),
        "setp" => {
            let ty = last_ty(d, m, opc)?;
            let cmp = i
                .mods
                .first()
                .and_then(|c| {
                    ops::CMP_NAMES
                        .iter()
                        .position(|n| c.strip_prefix('.') == Some(*n))
                })
                .ok_or_else(|| d.err("setp needs a comparison (.eq, .lt, ...)"))?
                as u8;
            let comb = if m.has(".and") {
                1
            } else if m.has(".or") {
                2
            } else if m.has(".xor") {
                3
            } else {
                0
            };
            want(d, o, if comb == 0 { 3 } else { 4 }, opc)?;
            let f: Cmp = match ty {
                Ty::U(w) | Ty::B(w) | Ty::S(w) if cmp >= 10 => {
                    let _ = w;
                    return Err(d.err("unordered comparisons are for floats only"));
                }
                Ty::U(16) | Ty::B(16) => cmpsel!(ops::cmp_u, cmp, 16),
                Ty::U(32) | Ty::B(32) => cmpsel!(ops::cmp_u, cmp, 32),
                Ty::U(64) | Ty::B(64) => cmpsel!(ops::cmp_u, cmp, 64),
                Ty::S(16) => cmpsel!(ops::cmp_s, cmp, 16),
                Ty::S(32) => cmpsel!(ops::cmp_s, cmp, 32),
                Ty::S(64) => cmpsel!(ops::cmp_s, cmp, 64),
                Ty::F16 | Ty::Bf16 | Ty::F32 | Ty::F64 if (6..=9).contains(&cmp) => {
                    return Err(d.err("lo/ls/hi/hs are for unsigned integers"));
                }
                Ty::F16 => cmpsel!(ops::cmp_f, cmp, 0),
                Ty::Bf16 => cmpsel!(ops::cmp_f, cmp, 1),
                Ty::F32 => cmpsel!(ops::cmp_f, cmp, 2),
                Ty::F64 => cmpsel!(ops::cmp_f, cmp, 3),
                _ => return Err(unsupported(d, "type")),
            };
            let (p, q) = match &o[0] {
                Operand::Pair(p, q) => {
                    let p = d.dst(&Operand::Name(p.clone()))?;
                    let q = d.dst(&Operand::Name(q.clone()))?;
                    (p, q)
                }
                x => (d.dst(x)?, SINK),
            };
            let a = d.src(&o[1], ty)?;
            let b = d.src(&o[2], ty)?;
            let (c, cneg) = if comb == 0 {
                (SINK, false)
            } else {
                d.pred(&o[3])?
            };
            Ok(Op::Setp {
                f,
                p,
                q,
                a,
                b,
                comb,
                c,
                cneg,
            })
        }
        "cvt" => {
            let ty = m
                .tys
                .first()
                .copied()
                .ok_or_else(|| d.err("cvt needs types"))?;
            if matches!(ty, Ty::F16x2 | Ty::Bf16x2) {
                want(d, o, 3, opc)?;
                if m.tys.get(1) != Some(&Ty::F32) {
                    return Err(unsupported(d, "(packing cvt needs .f32 sources)"));
                }
                let rnd = m
                    .rnd()
                    .ok_or_else(|| d.err("packing cvt needs a rounding mode"))?;
                let a = d.src(&o[1], Ty::F32)?;
                let b = d.src(&o[2], Ty::F32)?;
                let dd = d.dst(&o[0])?;
                return Ok(Op::CvtPack {
                    bf: ty == Ty::Bf16x2,
                    rnd,
                    relu: m.has(".relu"),
                    satfinite: m.has(".satfinite"),
                    d: dd,
                    a,
                    b,
                });
            }
            want(d, o, 2, opc)?;
            if m.tys.len() != 2 {
                return Err(d.err("cvt needs a destination and a source type"));
            }
            let src_ty = m.tys[1];
            let (Some(dst), Some(src)) = (ty.kind(), src_ty.kind()) else {
                return Err(unsupported(d, "types"));
            };
            let irnd = m.irnd();
            if irnd.is_some() && !matches!(src, Kind::F(_)) {
                return Err(d.err("integer rounding modes need a float source"));
            }
            let spec = CvtSpec {
                dst,
                src,
                rnd: m.rnd().unwrap_or(Rnd::Rn),
                irnd,
                sat,
                ftz,
                relu: m.has(".relu"),
                satfinite: m.has(".satfinite"),
            };
            let a = d.src(&o[1], src_ty)?;
            let dd = d.dst(&o[0])?;
            Ok(Op::Cvt { spec, d: dd, a })
        }
        "ld" | "ldu" => {
            want(d, o, 2, opc)?;
            let ty = last_ty(d, m, opc)?;
            let space = m.space().map_err(|e| d.err(e))?;
            let n = m.vec().map_err(|e| d.err(e))?;
            let (ds, nn) = d.vec_dst(&o[0])?;
            if nn != n {
                return Err(d.err(format!("`.v{n}` load with {nn} destinations")));
            }
            let (base, off) = d.addr(&o[1])?;
            let size = ty.bits().div_ceil(8) as u8;
            let sext = if let Ty::S(w) = ty {
                if w < 64 {
                    w as u8
                } else {
                    0
                }
            } else {
                0
            };
            let dmask = ops::mask(d.reg_bits(match &o[0] {
                Operand::Vec(v) => v.first().unwrap_or(&Operand::Sink),
                x => x,
            }));
            if ty == Ty::Pred {
                return Err(d.err("ld of .pred"));
            }
            Ok(Op::Ld {
                space,
                size,
                n,
                sext,
                dmask,
                ds,
                base,
                off,
            })
        }
        "st" => {
            want(d, o, 2, opc)?;
            let ty = last_ty(d, m, opc)?;
            let space = m.space().map_err(|e| d.err(e))?;
            if space == Space::Param {
                return Err(d.err("st.param is not supported"));
            }
            let n = m.vec().map_err(|e| d.err(e))?;
            let (base, off) = d.addr(&o[0])?;
            let (srcs, nn) = d.vec_src(&o[1], ty)?;
            if nn != n {
                return Err(d.err(format!("`.v{n}` store with {nn} sources")));
            }
            Ok(Op::St {
                space,
                size: ty.bits().div_ceil(8) as u8,
                n,
                srcs,
                base,
                off,
            })
        }
        "atom" | "red" => {
            let ty = last_ty(d, m, opc)?;
            let space = m.space().map_err(|e| d.err(e))?;
            if space == Space::Param {
                return Err(d.err("atomics on .param"));
            }
            let has = |x: &str| m.has(x);
            let w = ty.bits();
            let f: Option<F3> = if has(".add") {
                match ty {
                    Ty::U(32) | Ty::S(32) | Ty::B(32) => Some(at_add32),
                    Ty::U(64) | Ty::S(64) | Ty::B(64) => Some(at_add64),
                    Ty::F32 => Some(at_addf32),
                    Ty::F64 => Some(at_addf64),
                    Ty::F16 => Some(at_addf16),
                    Ty::F16x2 => Some(at_addf16x2),
                    Ty::Bf16 => Some(at_addbf16),
                    Ty::Bf16x2 => Some(at_addbf16x2),
                    _ => None,
                }
            } else if has(".min") || has(".max") {
                let mx = has(".max");
                match (ty, mx) {
                    (Ty::U(32), false) => Some(at_minu32),
                    (Ty::U(32), true) => Some(at_maxu32),
                    (Ty::S(32), false) => Some(at_mins32),
                    (Ty::S(32), true) => Some(at_maxs32),
                    (Ty::U(64), false) => Some(at_minu64),
                    (Ty::U(64), true) => Some(at_maxu64),
                    (Ty::S(64), false) => Some(at_mins64),
                    (Ty::S(64), true) => Some(at_maxs64),
                    _ => None,
                }
            } else if has(".and") || has(".or") || has(".xor") {
                match (w, has(".and"), has(".or")) {
                    (32, true, _) => Some(at_and32),
                    (32, _, true) => Some(at_or32),
                    (32, _, _) => Some(at_xor32),
                    (64, true, _) => Some(at_and64),
                    (64, _, true) => Some(at_or64),
                    (64, _, _) => Some(at_xor64),
                    _ => None,
                }
            } else if has(".exch") {
                (w == 32 || w == 64).then_some(at_exch as F3)
            } else if has(".cas") {
                match w {
                    16 => Some(at_cas::<16> as F3),
                    32 => Some(at_cas::<32> as F3),
                    64 => Some(at_cas::<64> as F3),
                    _ => None,
                }
            } else if has(".inc") {
                (ty == Ty::U(32)).then_some(at_inc as F3)
            } else if has(".dec") {
                (ty == Ty::U(32)).then_some(at_dec as F3)
            } else {
                None
            };
            let f = f.ok_or_else(|| unsupported(d, "(operation or type)"))?;
            let is_red = opc == "red";
            let cas = has(".cas");
            let nops = usize::from(!is_red) + 2 + usize::from(cas);
            want(d, o, nops, opc)?;
            let mut k = 0;
            let dd = if is_red {
                SINK
            } else {
                k = 1;
                d.dst(&o[0])?
            };
            let (base, off) = d.addr(&o[k])?;
            let b = d.src(&o[k + 1], ty)?;
            let c = if cas { d.src(&o[k + 2], ty)? } else { SINK };
            Ok(Op::Atom {
                space,
                size: (w / 8) as u8,
                f,
                d: dd,
                base,
                off,
                b,
                c,
            })
        }
        "bra" | "brx" => {
            if opc == "brx" {
                return Err(unsupported(d, ""));
            }
            want(d, o, 1, opc)?;
            match &o[0] {
                Operand::Name(l) => {
                    let t = *d
                        .labels
                        .get(l)
                        .ok_or_else(|| d.err(format!("unknown label `{l}`")))?;
                    Ok(Op::Bra { target: t })
                }
                _ => Err(d.err("bra needs a label")),
            }
        }
        "ret" | "exit" => Ok(Op::Exit),
        "trap" => Ok(Op::Trap),
        "bar" | "barrier" => {
            if m.has(".warp") {
                want(d, o, 1, opc)?;
                let mask = d.src(&o[0], Ty::B(32))?;
                return Ok(Op::WarpSync { mask });
            }
            let arrive = m.has(".arrive");
            if !(arrive || m.has(".sync") || i.mods.iter().all(|x| x == ".cta" || x == ".aligned"))
            {
                return Err(unsupported(d, "(bar.red is not supported)"));
            }
            if o.is_empty() || o.len() > 2 {
                return Err(d.err("bar takes a barrier id and an optional thread count"));
            }
            let id = d.src(&o[0], Ty::U(32))?;
            let count = if o.len() == 2 {
                d.src(&o[1], Ty::U(32))?
            } else {
                NO_REG
            };
            if arrive && count == NO_REG {
                return Err(d.err("bar.arrive needs a thread count"));
            }
            Ok(Op::Bar { id, count, arrive })
        }
        "membar" | "fence" | "prefetch" | "prefetchu" | "griddepcontrol" | "nanosleep"
        | "pmevent" => Ok(Op::Nop),
        "shfl" => {
            if !m.has(".sync") {
                return Err(d.err("shfl without .sync is not supported (PTX 6.0+ needs shfl.sync)"));
            }
            want(d, o, 5, opc)?;
            let mode = if m.has(".up") {
                0
            } else if m.has(".down") {
                1
            } else if m.has(".bfly") {
                2
            } else if m.has(".idx") {
                3
            } else {
                return Err(d.err("shfl needs .up, .down, .bfly or .idx"));
            };
            let (dd, p) = match &o[0] {
                Operand::Pair(a, b) => (
                    d.dst(&Operand::Name(a.clone()))?,
                    d.dst(&Operand::Name(b.clone()))?,
                ),
                x => (d.dst(x)?, SINK),
            };
            let a = d.src(&o[1], Ty::B(32))?;
            let b = d.src(&o[2], Ty::B(32))?;
            let c = d.src(&o[3], Ty::B(32))?;
            let mask = d.src(&o[4], Ty::B(32))?;
            Ok(Op::Shfl {
                mode,
                d: dd,
                p,
                a,
                b,
                c,
                mask,
            })
        }
        "vote" => {
            let mode = if m.has(".all") {
                0
            } else if m.has(".any") {
                1
            } else if m.has(".uni") {
                2
            } else if m.has(".ballot") {
                3
            } else {
                return Err(d.err("vote needs .all, .any, .uni or .ballot"));
            };
            let sync = m.has(".sync");
            want(d, o, if sync { 3 } else { 2 }, opc)?;
            let dd = d.dst(&o[0])?;
            let (a, neg) = d.pred(&o[1])?;
            let mask = if sync {
                d.src(&o[2], Ty::B(32))?
            } else {
                NO_REG
            };
            Ok(Op::Vote {
                mode,
                d: dd,
                a,
                neg,
                mask,
            })
        }
        "activemask" => {
            want(d, o, 1, opc)?;
            Ok(Op::Activemask { d: d.dst(&o[0])? })
        }
        "redux" => {
            want(d, o, 3, opc)?;
            let ty = last_ty(d, m, opc)?;
            let f: F2 = match ty {
                Ty::U(32) | Ty::S(32) | Ty::B(32) if m.has(".add") => ops::w32::add,
                Ty::U(32) if m.has(".min") => ops::w32::min_u,
                Ty::U(32) if m.has(".max") => ops::w32::max_u,
                Ty::S(32) if m.has(".min") => ops::w32::min_s,
                Ty::S(32) if m.has(".max") => ops::w32::max_s,
                Ty::B(32) if m.has(".and") => ops::w32::and,
                Ty::B(32) if m.has(".or") => ops::w32::or,
                Ty::B(32) if m.has(".xor") => ops::w32::xor,
                _ => return Err(unsupported(d, "(operation or type)")),
            };
            let dd = d.dst(&o[0])?;
            let a = d.src(&o[1], ty)?;
            let mask = d.src(&o[2], Ty::B(32))?;
            Ok(Op::Redux { f, d: dd, a, mask })
        }
        "cp" => {
            if !m.has(".async") {
                return Err(unsupported(d, ""));
            }
            if m.has(".bulk") {
                return Err(unsupported(d, "(bulk copies)"));
            }
            if m.has(".commit_group") {
                return Ok(Op::CpCommit);
            }
            if m.has(".wait_all") {
                return Ok(Op::CpWait { n: 0, all: true });
            }
            if m.has(".wait_group") {
                want(d, o, 1, opc)?;
                let Operand::Int(n) = o[0] else {
                    return Err(d.err("cp.async.wait_group needs an integer"));
                };
                return Ok(Op::CpWait {
                    n: n.min(u64::from(u32::MAX)) as u32,
                    all: false,
                });
            }
            if !(m.has(".ca") || m.has(".cg")) {
                return Err(d.err("cp.async needs .ca or .cg"));
            }
            if !(m.has_prefix(".shared") && m.has(".global")) {
                return Err(d.err("cp.async copies .global to .shared"));
            }
            if o.len() < 3 || o.len() > 5 {
                return Err(d.err("cp.async takes [dst], [src], cp-size and optional src-size / ignore-src / cache-policy"));
            }
            let (dbase, doff) = d.addr(&o[0])?;
            let (sbase, soff) = d.addr(&o[1])?;
            let Operand::Int(size) = o[2] else {
                return Err(d.err("cp.async cp-size must be an integer literal"));
            };
            if !matches!(size, 4 | 8 | 16) || (m.has(".cg") && size != 16) {
                return Err(d.err(format!(
                    "cp.async cp-size {size}: must be 4, 8 or 16 (.cg: 16)"
                )));
            }
            let mut src_size = NO_REG;
            let mut ignore = NO_REG;
            let mut ineg = false;
            let hint = m.has_prefix(".L2::cache_hint");
            let extra = o.len() - 3 - usize::from(hint);
            if extra > 1 {
                return Err(d.err("cp.async: too many operands"));
            }
            if extra == 1 {
                match &o[3] {
                    Operand::Name(n) if d.regs.get(n).is_some_and(|r| r.1 == Ty::Pred) => {
                        ignore = d.src(&o[3], Ty::Pred)?;
                    }
                    Operand::Not(_) => {
                        let (r, n) = d.pred(&o[3])?;
                        ignore = r;
                        ineg = n;
                    }
                    x => src_size = d.src(x, Ty::U(32))?,
                }
            }
            Ok(Op::CpAsync {
                dbase,
                doff,
                sbase,
                soff,
                size: size as u8,
                src_size,
                ignore,
                ineg,
            })
        }
        "ldmatrix" => {
            want(d, o, 2, opc)?;
            if !m.has(".m8n8") || !m.has(".b16") {
                return Err(unsupported(d, "(only .m8n8 .b16)"));
            }
            let num = if m.has(".x1") {
                1
            } else if m.has(".x2") {
                2
            } else if m.has(".x4") {
                4
            } else {
                return Err(d.err("ldmatrix needs .x1, .x2 or .x4"));
            };
            let (ds, n) = d.vec_dst(&o[0])?;
            if n != num {
                return Err(d.err(format!(
                    "ldmatrix .x{num} needs {num} destination registers, found {n}"
                )));
            }
            let (base, off) = d.addr(&o[1])?;
            let generic = !m.has_prefix(".shared");
            Ok(Op::Ldmatrix {
                num,
                trans: m.has(".trans"),
                ds,
                base,
                off,
                generic,
            })
        }
        "mma" => {
            want(d, o, 4, opc)?;
            let k = if m.has(".m16n8k16") {
                16
            } else if m.has(".m16n8k8") {
                8
            } else {
                return Err(unsupported(d, "(shapes: m16n8k16, m16n8k8)"));
            };
            if !m.has(".row") || !m.has(".col") {
                return Err(d.err("mma needs .row.col"));
            }
            if m.tys.len() != 4 {
                return Err(d.err("mma needs .dtype.atype.btype.ctype"));
            }
            let (dt, at, bt, ct) = (m.tys[0], m.tys[1], m.tys[2], m.tys[3]);
            let bf = match (at, bt) {
                (Ty::Bf16, Ty::Bf16) => true,
                (Ty::F16, Ty::F16) => false,
                _ => return Err(unsupported(d, "(inputs must be both .f16 or both .bf16)")),
            };
            let d_f32 = match dt {
                Ty::F32 => true,
                Ty::F16 if !bf => false,
                _ => return Err(unsupported(d, "(accumulator type)")),
            };
            let c_f32 = match ct {
                Ty::F32 => true,
                Ty::F16 if !bf => false,
                _ => return Err(unsupported(d, "(accumulator type)")),
            };
            let regs =
                |d: &mut Dec, o: &Operand, n: usize, what: &str| -> Result<[u32; 4], PtxError> {
                    let Operand::Vec(v) = o else {
                        return Err(d.err(format!("mma {what} must be a vector")));
                    };
                    if v.len() != n {
                        return Err(
                            d.err(format!("mma {what} needs {n} registers, found {}", v.len()))
                        );
                    }
                    let mut r = [SINK; 4];
                    for (j, x) in v.iter().enumerate() {
                        r[j] = if what == "d" {
                            d.dst(x)?
                        } else {
                            d.src(x, Ty::B(32))?
                        };
                    }
                    Ok(r)
                };
            let nd = if d_f32 { 4 } else { 2 };
            let nc = if c_f32 { 4 } else { 2 };
            let na = if k == 16 { 4 } else { 2 };
            let nb = if k == 16 { 2 } else { 1 };
            let dd = regs(d, &o[0], nd, "d")?;
            let a = regs(d, &o[1], na, "a")?;
            let b4 = regs(d, &o[2], nb, "b")?;
            let c = regs(d, &o[3], nc, "c")?;
            Ok(Op::Mma {
                k,
                bf,
                d_f32,
                c_f32,
                d: dd,
                a,
                b: [b4[0], b4[1]],
                c,
            })
        }
        _ => Err(d.err(format!("unsupported instruction `{}`", full_name(i)))),
    }
}

fn full_name(i: &parser::Inst) -> String {
    let mut s = i.opcode.clone();
    for m in &i.mods {
        s.push_str(m);
    }
    s
}

/// Two- and three-operand arithmetic.
#[allow(clippy::too_many_lines)]
fn arith3(d: &mut Dec, i: &parser::Inst, m: &Mods) -> Result<Op, PtxError> {
    let o = &i.operands;
    let opc = i.opcode.as_str();
    let ty = last_ty(d, m, opc)?;
    let ftz = m.has(".ftz");
    let sat = m.has(".sat");
    let bad = |d: &Dec| {
        d.err(format!(
            "unsupported: `{}` (type or modifiers)",
            full_name(i)
        ))
    };
    let r = m.rnd().map_or(0, Rnd::code);
    // operand types: shifts and bfe take u32 amounts
    let three = matches!(opc, "mad" | "fma" | "bfe" | "prmt" | "shf" | "selp");
    want(d, o, if three { 4 } else { 3 }, opc)?;
    let wide = m.has(".wide");
    let hi = m.has(".hi");
    // c of mad.wide is the wide type
    let (ta, tb, tc) = match (opc, ty) {
        ("shl" | "shr", _) => (ty, Ty::U(32), ty),
        ("bfe", _) => (ty, Ty::U(32), Ty::U(32)),
        ("selp", _) => (ty, ty, Ty::Pred),
        ("mad", Ty::U(w)) if wide => (ty, ty, Ty::U(w * 2)),
        ("mad", Ty::S(w)) if wide => (ty, ty, Ty::S(w * 2)),
        _ => (ty, ty, ty),
    };
    enum F {
        Two(F2),
        Three(F3),
    }
    let f: F = match (opc, ty) {
        ("selp", _) => F::Three(ops::w64::selp),
        ("add" | "sub", Ty::U(w) | Ty::S(w) | Ty::B(w)) if w >= 16 => {
            let add = opc == "add";
            if sat {
                if ty != Ty::S(32) {
                    return Err(bad(d));
                }
                F::Two(if add {
                    ops::w32::add_sat
                } else {
                    ops::w32::sub_sat
                })
            } else if add {
                F::Two(intw!(w, add, F2).ok_or_else(|| bad(d))?)
            } else {
                F::Two(intw!(w, sub, F2).ok_or_else(|| bad(d))?)
            }
        }
        ("mul", Ty::U(w) | Ty::S(w) | Ty::B(w)) if w >= 16 => {
            let s = matches!(ty, Ty::S(_));
            let f = if wide {
                match (w, s) {
                    (16, false) => Some(ops::w16::mul_wide_u as F2),
                    (16, true) => Some(ops::w16::mul_wide_s as F2),
                    (32, false) => Some(ops::w32::mul_wide_u as F2),
                    (32, true) => Some(ops::w32::mul_wide_s as F2),
                    _ => None,
                }
            } else if hi {
                if s {
                    intw!(w, mul_hi_s, F2)
                } else {
                    intw!(w, mul_hi_u, F2)
                }
            } else {
                intw!(w, mul_lo, F2)
            };
            F::Two(f.ok_or_else(|| bad(d))?)
        }
        ("mad", Ty::U(w) | Ty::S(w) | Ty::B(w)) if w >= 16 => {
            let s = matches!(ty, Ty::S(_));
            let f = if wide {
                match (w, s) {
                    (16, false) => Some(ops::w16::mad_wide_u as F3),
                    (16, true) => Some(ops::w16::mad_wide_s as F3),
                    (32, false) => Some(ops::w32::mad_wide_u as F3),
                    (32, true) => Some(ops::w32::mad_wide_s as F3),
                    _ => None,
                }
            } else if hi {
                if s {
                    intw!(w, mad_hi_s, F3)
                } else {
                    intw!(w, mad_hi_u, F3)
                }
            } else {
                intw!(w, mad_lo, F3)
            };
            F::Three(f.ok_or_else(|| bad(d))?)
        }
        ("div" | "rem" | "min" | "max", Ty::U(w) | Ty::S(w)) if w >= 16 => {
            let s = matches!(ty, Ty::S(_));
            let f = match (opc, s) {
                ("div", false) => intw!(w, div_u, F2),
                ("div", true) => intw!(w, div_s, F2),
                ("rem", false) => intw!(w, rem_u, F2),
                ("rem", true) => intw!(w, rem_s, F2),
                ("min", false) => intw!(w, min_u, F2),
                ("min", true) => intw!(w, min_s, F2),
                ("max", false) => intw!(w, max_u, F2),
                _ => intw!(w, max_s, F2),
            };
            F::Two(f.ok_or_else(|| bad(d))?)
        }
        ("and" | "or" | "xor", Ty::Pred) => F::Two(match opc {
            "and" => ops::pred::and,
            "or" => ops::pred::or,
            _ => ops::pred::xor,
        }),
        ("and" | "or" | "xor", Ty::B(w) | Ty::U(w) | Ty::S(w)) if w >= 16 => F::Two(
            match opc {
                "and" => intw!(w, and, F2),
                "or" => intw!(w, or, F2),
                _ => intw!(w, xor, F2),
            }
            .ok_or_else(|| bad(d))?,
        ),
        ("shl", Ty::B(w) | Ty::U(w) | Ty::S(w)) if w >= 16 => {
            F::Two(intw!(w, shl, F2).ok_or_else(|| bad(d))?)
        }
        ("shr", Ty::B(w) | Ty::U(w)) if w >= 16 => {
            F::Two(intw!(w, shr_u, F2).ok_or_else(|| bad(d))?)
        }
        ("shr", Ty::S(w)) if w >= 16 => F::Two(intw!(w, shr_s, F2).ok_or_else(|| bad(d))?),
        ("bfe", Ty::U(w)) => F::Three(intw!(w, bfe_u, F3).ok_or_else(|| bad(d))?),
        ("bfe", Ty::S(w)) => F::Three(intw!(w, bfe_s, F3).ok_or_else(|| bad(d))?),
        ("prmt", Ty::B(32)) => {
            if m.all.iter().any(|x| {
                matches!(
                    x.as_str(),
                    ".f4e" | ".b4e" | ".rc8" | ".ecl" | ".ecr" | ".rc16"
                )
            }) {
                return Err(bad(d));
            }
            F::Three(ops::prmt)
        }
        ("shf", Ty::B(32)) => {
            let l = m.has(".l");
            let clamp = m.has(".clamp");
            F::Three(match (l, clamp) {
                (true, false) => ops::shf_l_wrap,
                (true, true) => ops::shf_l_clamp,
                (false, false) => ops::shf_r_wrap,
                (false, true) => ops::shf_r_clamp,
            })
        }
        ("copysign", Ty::F32) => F::Two(ops::copysign_f32),
        // f32
        ("add", Ty::F32) => F::Two(rfs!(ops::add_f32, F2, r, ftz, sat)),
        ("sub", Ty::F32) => F::Two(rfs!(ops::sub_f32, F2, r, ftz, sat)),
        ("mul", Ty::F32) => F::Two(rfs!(ops::mul_f32, F2, r, ftz, sat)),
        ("fma" | "mad", Ty::F32) => F::Three(rfs!(ops::fma_f32, F3, r, ftz, sat)),
        ("div", Ty::F32) => {
            if !(m.has(".rn") || m.has(".approx") || m.has(".full")) || (r != 0) {
                return Err(d.err("div.f32 needs .rn, .approx or .full"));
            }
            F::Two(ftz1!(ops::div_f32, F2, ftz))
        }
        ("min", Ty::F32) => F::Two(match (ftz, m.has(".NaN")) {
            (false, false) => ops::min_f32::<false, false>,
            (true, false) => ops::min_f32::<true, false>,
            (false, true) => ops::min_f32::<false, true>,
            (true, true) => ops::min_f32::<true, true>,
        }),
        ("max", Ty::F32) => F::Two(match (ftz, m.has(".NaN")) {
            (false, false) => ops::max_f32::<false, false>,
            (true, false) => ops::max_f32::<true, false>,
            (false, true) => ops::max_f32::<false, true>,
            (true, true) => ops::max_f32::<true, true>,
        }),
        // f64: round to nearest only
        ("add" | "sub" | "mul" | "fma" | "mad" | "div" | "min" | "max", Ty::F64) => {
            if r != 0 {
                return Err(bad(d));
            }
            match opc {
                "add" => F::Two(ops::add_f64),
                "sub" => F::Two(ops::sub_f64),
                "mul" => F::Two(ops::mul_f64),
                "div" => F::Two(ops::div_f64),
                "min" => F::Two(ops::min_f64),
                "max" => F::Two(ops::max_f64),
                _ => F::Three(ops::fma_f64),
            }
        }
        // halves
        (
            "add" | "sub" | "mul" | "fma" | "min" | "max",
            Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2,
        ) => {
            if r > 0 {
                return Err(bad(d));
            }
            let bf = matches!(ty, Ty::Bf16 | Ty::Bf16x2);
            let x2 = matches!(ty, Ty::F16x2 | Ty::Bf16x2);
            match opc {
                "add" => F::Two(hx!(ops::add_h, F2, bf, x2, ftz, sat)),
                "sub" => F::Two(hx!(ops::sub_h, F2, bf, x2, ftz, sat)),
                "mul" => F::Two(hx!(ops::mul_h, F2, bf, x2, ftz, sat)),
                "fma" => F::Three(hx!(ops::fma_h, F3, bf, x2, ftz, sat)),
                "min" => F::Two(hx2!(ops::min_h, F2, bf, x2)),
                _ => F::Two(hx2!(ops::max_h, F2, bf, x2)),
            }
        }
        _ => return Err(bad(d)),
    };
    let a = d.src(&o[1], ta)?;
    let b = d.src(&o[2], tb)?;
    let dd = d.dst(&o[0])?;
    Ok(match f {
        F::Two(f) => Op::Alu2 { f, d: dd, a, b },
        F::Three(f) => {
            let c = match (opc, &o[3]) {
                ("selp", x) => d.pred(x).map(|p| p.0)?,
                (_, x) => d.src(x, tc)?,
            };
            Op::Alu3 { f, d: dd, a, b, c }
        }
    })
}

/// One-operand arithmetic.
fn arith1(d: &mut Dec, i: &parser::Inst, m: &Mods) -> Result<Op, PtxError> {
    let o = &i.operands;
    let opc = i.opcode.as_str();
    want(d, o, 2, opc)?;
    let ty = last_ty(d, m, opc)?;
    let ftz = m.has(".ftz");
    let bad = |d: &Dec| {
        d.err(format!(
            "unsupported: `{}` (type or modifiers)",
            full_name(i)
        ))
    };
    let approx = m.has(".approx");
    let f: F1 = match (opc, ty) {
        ("neg", Ty::S(w)) | ("abs", Ty::S(w)) if w >= 16 => if opc == "neg" {
            intw!(w, neg, F1)
        } else {
            intw!(w, abs, F1)
        }
        .ok_or_else(|| bad(d))?,
        ("not", Ty::Pred) => ops::pred::not,
        ("not", Ty::B(w) | Ty::U(w) | Ty::S(w)) if w >= 16 => {
            intw!(w, not, F1).ok_or_else(|| bad(d))?
        }
        ("cnot", Ty::B(w) | Ty::U(w) | Ty::S(w)) if w >= 16 => {
            intw!(w, cnot, F1).ok_or_else(|| bad(d))?
        }
        ("popc", Ty::B(w)) => intw!(w, popc, F1).ok_or_else(|| bad(d))?,
        ("clz", Ty::B(w)) => intw!(w, clz, F1).ok_or_else(|| bad(d))?,
        ("brev", Ty::B(w)) => intw!(w, brev, F1).ok_or_else(|| bad(d))?,
        ("bfind", Ty::U(w)) if !m.has(".shiftamt") => {
            intw!(w, bfind_u, F1).ok_or_else(|| bad(d))?
        }
        ("bfind", Ty::S(w)) if !m.has(".shiftamt") => {
            intw!(w, bfind_s, F1).ok_or_else(|| bad(d))?
        }
        ("neg", Ty::F32) => ftz1!(ops::neg_f32, F1, ftz),
        ("abs", Ty::F32) => ftz1!(ops::abs_f32, F1, ftz),
        ("neg", Ty::F64) => ops::neg_f64,
        ("abs", Ty::F64) => ops::abs_f64,
        ("neg", Ty::F16 | Ty::Bf16) => ops::neg_h::<false>,
        ("neg", Ty::F16x2 | Ty::Bf16x2) => ops::neg_h::<true>,
        ("abs", Ty::F16 | Ty::Bf16) => ops::abs_h::<false>,
        ("abs", Ty::F16x2 | Ty::Bf16x2) => ops::abs_h::<true>,
        ("rcp", Ty::F32) if approx || m.has(".rn") => ftz1!(ops::rcp_f32, F1, ftz),
        ("sqrt", Ty::F32) if approx || m.has(".rn") => ftz1!(ops::sqrt_f32, F1, ftz),
        ("rsqrt", Ty::F32) if approx => ftz1!(ops::rsqrt_f32, F1, ftz),
        ("ex2", Ty::F32) if approx => ftz1!(ops::ex2_f32, F1, ftz),
        ("lg2", Ty::F32) if approx => ftz1!(ops::lg2_f32, F1, ftz),
        ("sin", Ty::F32) if approx => ftz1!(ops::sin_f32, F1, ftz),
        ("cos", Ty::F32) if approx => ftz1!(ops::cos_f32, F1, ftz),
        ("tanh", Ty::F32) if approx => ops::tanh_f32,
        ("ex2", Ty::F16) if approx => ops::ex2_h::<false, false>,
        ("ex2", Ty::F16x2) if approx => ops::ex2_h::<false, true>,
        ("ex2", Ty::Bf16) if approx => ops::ex2_h::<true, false>,
        ("ex2", Ty::Bf16x2) if approx => ops::ex2_h::<true, true>,
        ("rcp", Ty::F64) if m.has(".rn") => ops::rcp_f64,
        ("sqrt", Ty::F64) if m.has(".rn") => ops::sqrt_f64,
        ("rsqrt", Ty::F64) if approx => ops::rsqrt_f64,
        ("testp", Ty::F32 | Ty::F64) => {
            let f64 = ty == Ty::F64;
            match (m.all.first().map(String::as_str), f64) {
                (Some(".finite"), false) => testp_finite::<false>,
                (Some(".finite"), true) => testp_finite::<true>,
                (Some(".infinite"), false) => testp_infinite::<false>,
                (Some(".infinite"), true) => testp_infinite::<true>,
                (Some(".number"), false) => testp_number::<false>,
                (Some(".number"), true) => testp_number::<true>,
                (Some(".notanumber"), false) => testp_nan::<false>,
                (Some(".notanumber"), true) => testp_nan::<true>,
                _ => return Err(bad(d)),
            }
        }
        _ => return Err(bad(d)),
    };
    if ty.is_int() && ty.bits() < 16 {
        return Err(bad(d));
    }
    let a = d.src(&o[1], ty)?;
    let dd = d.dst(&o[0])?;
    Ok(Op::Alu1 { f, d: dd, a })
}
