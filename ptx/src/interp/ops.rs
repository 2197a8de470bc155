//! The arithmetic of PTX instructions on register bits: integer ops per
//! width, f32/f64 with rounding modes, `.ftz` and `.sat`, f16/bf16 (scalar
//! and packed x2), comparisons, and `cvt`. Registers hold values
//! zero-extended to 64 bits; every function here takes and returns such bits.
//!
//! Rounding of a real value to a narrower float format is done once, from an
//! exact (or exactly bracketed) f64 value, by [`round_float`]: round to
//! nearest even, toward zero, down or up, with subnormals, overflow to
//! infinity or to the largest finite value as the mode says, and a canonical
//! NaN. Directed modes of f32 `add`/`sub`/`fma` compute the exact error of
//! the f64 result (TwoSum), so they are correctly rounded.

/// A rounding mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rnd {
    /// To nearest, ties to even.
    Rn,
    /// Toward zero.
    Rz,
    /// Toward minus infinity.
    Rm,
    /// Toward plus infinity.
    Rp,
}

impl Rnd {
    pub(crate) const fn code(self) -> u8 {
        match self {
            Rnd::Rn => 0,
            Rnd::Rz => 1,
            Rnd::Rm => 2,
            Rnd::Rp => 3,
        }
    }

    pub(crate) const fn from_code(c: u8) -> Rnd {
        match c {
            1 => Rnd::Rz,
            2 => Rnd::Rm,
            3 => Rnd::Rp,
            _ => Rnd::Rn,
        }
    }
}

/// A float storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fmt {
    F16,
    Bf16,
    F32,
    F64,
}

impl Fmt {
    const fn mbits(self) -> u32 {
        match self {
            Fmt::F16 => 10,
            Fmt::Bf16 => 7,
            Fmt::F32 => 23,
            Fmt::F64 => 52,
        }
    }

    const fn ebits(self) -> u32 {
        match self {
            Fmt::F16 => 5,
            Fmt::Bf16 | Fmt::F32 => 8,
            Fmt::F64 => 11,
        }
    }

    /// The canonical NaN the GPU produces.
    pub(crate) const fn nan(self) -> u64 {
        match self {
            Fmt::F16 => 0x7fff,
            Fmt::Bf16 => 0x7fff,
            Fmt::F32 => 0x7fff_ffff,
            Fmt::F64 => 0x7fff_ffff_ffff_ffff,
        }
    }

    /// Bits of the value as an f64 (exact for every format).
    pub(crate) fn to_f64(self, bits: u64) -> f64 {
        match self {
            Fmt::F16 => f64::from(half::f16::from_bits(bits as u16).to_f32()),
            Fmt::Bf16 => f64::from(f32::from_bits(((bits as u32) & 0xffff) << 16)),
            Fmt::F32 => f64::from(f32::from_bits(bits as u32)),
            Fmt::F64 => f64::from_bits(bits),
        }
    }
}

/// Rounds `x` to `fmt` with mode `rnd`. `tail` says where the exact value
/// lies relative to `x` when `x` itself is inexact: +1 a little further from
/// zero, -1 a little closer to zero, 0 exact. `satfinite` clamps overflow
/// (and infinities) to the largest finite value.
pub(crate) fn round_float(x: f64, fmt: Fmt, rnd: Rnd, tail: i8, satfinite: bool) -> u64 {
    let mbits = fmt.mbits();
    let ebits = fmt.ebits();
    let bias = (1i32 << (ebits - 1)) - 1;
    let emax_field = (1u64 << ebits) - 1;
    let sign_bit = 1u64 << (mbits + ebits);
    let max_finite = ((emax_field - 1) << mbits) | ((1u64 << mbits) - 1);
    if x.is_nan() {
        return fmt.nan();
    }
    let neg = x.is_sign_negative();
    let s = if neg { sign_bit } else { 0 };
    if x.is_infinite() {
        return s | if satfinite {
            max_finite
        } else {
            emax_field << mbits
        };
    }
    if fmt == Fmt::F64 && tail == 0 {
        return x.to_bits();
    }
    let a = x.abs();
    if a == 0.0 && tail == 0 {
        return s;
    }
    let bits = a.to_bits();
    let ef = (bits >> 52) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (m, e) = if ef == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), ef - 1075)
    };
    if m == 0 {
        return s;
    }
    // a = m * 2^e; lg = floor(log2 a)
    let lg = (63 - m.leading_zeros()) as i32 + e;
    let emin = 1 - bias;
    let mut q = lg.max(emin) - mbits as i32; // quantum exponent
    let shift = q - e;
    let (mut n, rem_cmp_half, rem_nonzero) = if shift <= 0 {
        (m << (-shift) as u32, std::cmp::Ordering::Less, false)
    } else if shift > 60 {
        (0u64, std::cmp::Ordering::Less, true)
    } else {
        let sh = shift as u32;
        let n = m >> sh;
        let rem = m & ((1u64 << sh) - 1);
        let half = 1u64 << (sh - 1);
        (n, rem.cmp(&half), rem != 0)
    };
    // fold the tail into the comparison with half an ulp
    let (above_half, at_half) = match rem_cmp_half {
        std::cmp::Ordering::Greater => (true, false),
        std::cmp::Ordering::Equal => (tail > 0, tail == 0),
        std::cmp::Ordering::Less => (false, false),
    };
    let inexact = rem_nonzero || tail != 0;
    let away = match rnd {
        Rnd::Rn => above_half || (at_half && n & 1 == 1),
        Rnd::Rz => false,
        Rnd::Rm => neg && inexact && (tail >= 0 || rem_nonzero),
        Rnd::Rp => !neg && inexact && (tail >= 0 || rem_nonzero),
    };
    let toward = match rnd {
        Rnd::Rn => false,
        Rnd::Rz => true,
        Rnd::Rm => !neg,
        Rnd::Rp => neg,
    };
    if away {
        n += 1;
        if n == 1u64 << (mbits + 1) {
            n >>= 1;
            q += 1;
        }
    } else if toward && !rem_nonzero && tail < 0 {
        // exact value just below n * 2^q in magnitude
        if n == 1u64 << mbits && q > emin - mbits as i32 {
            n = (1u64 << (mbits + 1)) - 1;
            q -= 1;
        } else {
            n -= 1;
        }
    }
    let overflow = |s: u64| -> u64 {
        let to_inf = !satfinite
            && match rnd {
                Rnd::Rn => true,
                Rnd::Rz => false,
                Rnd::Rm => neg,
                Rnd::Rp => !neg,
            };
        s | if to_inf {
            emax_field << mbits
        } else {
            max_finite
        }
    };
    if n >= 1u64 << mbits {
        let field = (q + mbits as i32 + bias) as i64;
        if field >= emax_field as i64 {
            return overflow(s);
        }
        s | ((field as u64) << mbits) | (n - (1u64 << mbits))
    } else {
        s | n
    }
}

// ---------------------------------------------------------------- helpers

#[inline]
pub(crate) const fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[inline]
pub(crate) const fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let sh = 64 - bits;
        ((v << sh) as i64) >> sh
    }
}

#[inline]
fn f32of(v: u64) -> f32 {
    f32::from_bits(v as u32)
}

#[inline]
fn bits32(f: f32) -> u64 {
    u64::from(f.to_bits())
}

#[inline]
fn ftz32(f: f32) -> f32 {
    if f.is_subnormal() {
        if f.is_sign_negative() {
            -0.0
        } else {
            0.0
        }
    } else {
        f
    }
}

/// Canonicalizes a NaN result to the GPU's canonical NaN.
#[inline]
fn canon32(f: f32) -> u64 {
    if f.is_nan() {
        0x7fff_ffff
    } else {
        bits32(f)
    }
}

// ---------------------------------------------------------------- integers

macro_rules! int_ops {
    ($m:ident, $u:ty, $s:ty, $w:expr, $wu:ty, $ws:ty) => {
        pub(crate) mod $m {
            #![allow(clippy::cast_lossless, clippy::unnecessary_cast, dead_code)]
            #[inline]
            fn u(v: u64) -> $u {
                v as $u
            }
            #[inline]
            fn s(v: u64) -> $s {
                v as $s
            }
            #[inline]
            fn out_u(v: $u) -> u64 {
                v as u64
            }
            #[inline]
            fn out_s(v: $s) -> u64 {
                (v as $u) as u64
            }
            pub fn add(a: u64, b: u64) -> u64 {
                out_u(u(a).wrapping_add(u(b)))
            }
            pub fn sub(a: u64, b: u64) -> u64 {
                out_u(u(a).wrapping_sub(u(b)))
            }
            pub fn add_sat(a: u64, b: u64) -> u64 {
                out_s(s(a).saturating_add(s(b)))
            }
            pub fn sub_sat(a: u64, b: u64) -> u64 {
                out_s(s(a).saturating_sub(s(b)))
            }
            pub fn mul_lo(a: u64, b: u64) -> u64 {
                out_u(u(a).wrapping_mul(u(b)))
            }
            pub fn mul_hi_u(a: u64, b: u64) -> u64 {
                out_u(((u(a) as $wu * u(b) as $wu) >> $w) as $u)
            }
            pub fn mul_hi_s(a: u64, b: u64) -> u64 {
                out_s(((s(a) as $ws * s(b) as $ws) >> $w) as $s)
            }
            pub fn mul_wide_u(a: u64, b: u64) -> u64 {
                (u(a) as $wu * u(b) as $wu) as u64
            }
            pub fn mul_wide_s(a: u64, b: u64) -> u64 {
                ((s(a) as $ws * s(b) as $ws) as $wu) as u64
            }
            pub fn mad_lo(a: u64, b: u64, c: u64) -> u64 {
                out_u(u(a).wrapping_mul(u(b)).wrapping_add(u(c)))
            }
            pub fn mad_hi_u(a: u64, b: u64, c: u64) -> u64 {
                out_u((((u(a) as $wu * u(b) as $wu) >> $w) as $u).wrapping_add(u(c)))
            }
            pub fn mad_hi_s(a: u64, b: u64, c: u64) -> u64 {
                out_s((((s(a) as $ws * s(b) as $ws) >> $w) as $s).wrapping_add(s(c)))
            }
            pub fn mad_wide_u(a: u64, b: u64, c: u64) -> u64 {
                ((u(a) as $wu * u(b) as $wu).wrapping_add(c as $wu)) as u64
            }
            pub fn mad_wide_s(a: u64, b: u64, c: u64) -> u64 {
                ((s(a) as $ws * s(b) as $ws).wrapping_add(c as $ws) as $wu) as u64
            }
            pub fn div_u(a: u64, b: u64) -> u64 {
                out_u(u(a).checked_div(u(b)).unwrap_or(<$u>::MAX))
            }
            pub fn div_s(a: u64, b: u64) -> u64 {
                if s(b) == 0 {
                    out_s(-1)
                } else {
                    out_s(s(a).wrapping_div(s(b)))
                }
            }
            pub fn rem_u(a: u64, b: u64) -> u64 {
                out_u(u(a).checked_rem(u(b)).unwrap_or(u(a)))
            }
            pub fn rem_s(a: u64, b: u64) -> u64 {
                if s(b) == 0 {
                    out_s(s(a))
                } else {
                    out_s(s(a).wrapping_rem(s(b)))
                }
            }
            pub fn min_u(a: u64, b: u64) -> u64 {
                out_u(u(a).min(u(b)))
            }
            pub fn max_u(a: u64, b: u64) -> u64 {
                out_u(u(a).max(u(b)))
            }
            pub fn min_s(a: u64, b: u64) -> u64 {
                out_s(s(a).min(s(b)))
            }
            pub fn max_s(a: u64, b: u64) -> u64 {
                out_s(s(a).max(s(b)))
            }
            pub fn abs(a: u64) -> u64 {
                out_s(s(a).wrapping_abs())
            }
            pub fn neg(a: u64) -> u64 {
                out_s(s(a).wrapping_neg())
            }
            pub fn and(a: u64, b: u64) -> u64 {
                out_u(u(a) & u(b))
            }
            pub fn or(a: u64, b: u64) -> u64 {
                out_u(u(a) | u(b))
            }
            pub fn xor(a: u64, b: u64) -> u64 {
                out_u(u(a) ^ u(b))
            }
            pub fn not(a: u64) -> u64 {
                out_u(!u(a))
            }
            pub fn cnot(a: u64) -> u64 {
                u64::from(u(a) == 0)
            }
            pub fn shl(a: u64, b: u64) -> u64 {
                let b = b as u32;
                if b >= $w {
                    0
                } else {
                    out_u(u(a) << b)
                }
            }
            pub fn shr_u(a: u64, b: u64) -> u64 {
                let b = b as u32;
                if b >= $w {
                    0
                } else {
                    out_u(u(a) >> b)
                }
            }
            pub fn shr_s(a: u64, b: u64) -> u64 {
                let b = (b as u32).min($w - 1);
                out_s(s(a) >> b)
            }
            pub fn popc(a: u64) -> u64 {
                u64::from(u(a).count_ones())
            }
            pub fn clz(a: u64) -> u64 {
                u64::from(u(a).leading_zeros())
            }
            pub fn brev(a: u64) -> u64 {
                out_u(u(a).reverse_bits())
            }
            pub fn bfind_u(a: u64) -> u64 {
                let v = u(a);
                if v == 0 {
                    0xffff_ffff
                } else {
                    u64::from($w - 1 - v.leading_zeros())
                }
            }
            pub fn bfind_s(a: u64) -> u64 {
                let v = s(a);
                let v = (if v < 0 { !v } else { v }) as $u;
                if v == 0 {
                    0xffff_ffff
                } else {
                    u64::from($w - 1 - v.leading_zeros())
                }
            }
            pub fn bfe_u(a: u64, b: u64, c: u64) -> u64 {
                let pos = (b & 0xff) as u32;
                let len = (c & 0xff) as u32;
                let v = u(a);
                let mut r: $u = 0;
                for i in 0..len.min($w) {
                    let bit = if pos + i < $w {
                        (v >> (pos + i)) & 1
                    } else {
                        0
                    };
                    r |= bit << i;
                }
                out_u(r)
            }
            pub fn bfe_s(a: u64, b: u64, c: u64) -> u64 {
                let pos = (b & 0xff) as u32;
                let len = (c & 0xff) as u32;
                let v = u(a);
                let sbit = if len == 0 {
                    0
                } else {
                    (v >> (pos + len - 1).min($w - 1)) & 1
                };
                let mut r: $u = 0;
                for i in 0..$w {
                    let bit = if i < len {
                        if pos + i < $w {
                            (v >> (pos + i)) & 1
                        } else {
                            sbit
                        }
                    } else {
                        sbit
                    };
                    r |= bit << i;
                }
                out_u(r)
            }
            pub fn selp(a: u64, b: u64, c: u64) -> u64 {
                if c & 1 != 0 {
                    a
                } else {
                    b
                }
            }
        }
    };
}

int_ops!(w16, u16, i16, 16, u32, i32);
int_ops!(w32, u32, i32, 32, u64, i64);
int_ops!(w64, u64, i64, 64, u128, i128);

/// Logic on predicates (values 0/1).
pub(crate) mod pred {
    pub fn and(a: u64, b: u64) -> u64 {
        a & b & 1
    }
    pub fn or(a: u64, b: u64) -> u64 {
        (a | b) & 1
    }
    pub fn xor(a: u64, b: u64) -> u64 {
        (a ^ b) & 1
    }
    pub fn not(a: u64) -> u64 {
        (a ^ 1) & 1
    }
}

pub(crate) fn copy(a: u64) -> u64 {
    a
}

/// `prmt.b32` default mode.
pub(crate) fn prmt(a: u64, b: u64, c: u64) -> u64 {
    let src = (a & 0xffff_ffff) | ((b & 0xffff_ffff) << 32);
    let mut r = 0u64;
    for i in 0..4 {
        let sel = (c >> (4 * i)) & 0xf;
        let byte = (src >> (8 * (sel & 7))) & 0xff;
        let v = if sel & 8 != 0 {
            if byte & 0x80 != 0 {
                0xff
            } else {
                0
            }
        } else {
            byte
        };
        r |= v << (8 * i);
    }
    r
}

pub(crate) fn shf_l_wrap(a: u64, b: u64, c: u64) -> u64 {
    let v = ((b & 0xffff_ffff) << 32) | (a & 0xffff_ffff);
    ((v << (c & 31)) >> 32) & 0xffff_ffff
}
pub(crate) fn shf_l_clamp(a: u64, b: u64, c: u64) -> u64 {
    let v = ((b & 0xffff_ffff) << 32) | (a & 0xffff_ffff);
    let n = (c & 0xffff_ffff).min(32);
    ((v << n) >> 32) & 0xffff_ffff
}
pub(crate) fn shf_r_wrap(a: u64, b: u64, c: u64) -> u64 {
    let v = ((b & 0xffff_ffff) << 32) | (a & 0xffff_ffff);
    (v >> (c & 31)) & 0xffff_ffff
}
pub(crate) fn shf_r_clamp(a: u64, b: u64, c: u64) -> u64 {
    let v = ((b & 0xffff_ffff) << 32) | (a & 0xffff_ffff);
    let n = (c & 0xffff_ffff).min(32);
    (v >> n) & 0xffff_ffff
}

// ---------------------------------------------------------------- f32

/// Exact error of `a + b` computed in f64 (TwoSum): `(s, tail)` where the
/// exact sum is `s + err` and `tail` is the sign of `err` relative to the
/// magnitude of `s`.
fn two_sum(a: f64, b: f64) -> (f64, i8) {
    let s = a + b;
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    let tail = if err == 0.0 || s == 0.0 || !s.is_finite() {
        0
    } else if (err > 0.0) == (s > 0.0) {
        1
    } else {
        -1
    };
    (s, tail)
}

#[inline]
fn fin32<const FTZ: bool, const SAT: bool>(r: f32) -> u64 {
    let r = if FTZ { ftz32(r) } else { r };
    let r = if SAT {
        if r.is_nan() {
            0.0
        } else {
            r.clamp(0.0, 1.0)
        }
    } else {
        r
    };
    canon32(r)
}

#[inline]
fn in32<const FTZ: bool>(v: u64) -> f32 {
    let f = f32of(v);
    if FTZ {
        ftz32(f)
    } else {
        f
    }
}

fn directed32(x: f64, tail: i8, r: u8) -> f32 {
    f32::from_bits(round_float(x, Fmt::F32, Rnd::from_code(r), tail, false) as u32)
}

pub(crate) fn add_f32<const R: u8, const FTZ: bool, const SAT: bool>(a: u64, b: u64) -> u64 {
    let (a, b) = (in32::<FTZ>(a), in32::<FTZ>(b));
    let r = if R == 0 {
        a + b
    } else {
        let (s, t) = two_sum(f64::from(a), f64::from(b));
        directed32(s, t, R)
    };
    fin32::<FTZ, SAT>(r)
}

pub(crate) fn sub_f32<const R: u8, const FTZ: bool, const SAT: bool>(a: u64, b: u64) -> u64 {
    add_f32::<R, FTZ, SAT>(a, b ^ 0x8000_0000)
}

pub(crate) fn mul_f32<const R: u8, const FTZ: bool, const SAT: bool>(a: u64, b: u64) -> u64 {
    let (a, b) = (in32::<FTZ>(a), in32::<FTZ>(b));
    let r = if R == 0 {
        a * b
    } else {
        directed32(f64::from(a) * f64::from(b), 0, R)
    };
    fin32::<FTZ, SAT>(r)
}

pub(crate) fn fma_f32<const R: u8, const FTZ: bool, const SAT: bool>(
    a: u64,
    b: u64,
    c: u64,
) -> u64 {
    let (a, b, c) = (in32::<FTZ>(a), in32::<FTZ>(b), in32::<FTZ>(c));
    let r = if R == 0 {
        a.mul_add(b, c)
    } else {
        let (s, t) = two_sum(f64::from(a) * f64::from(b), f64::from(c));
        directed32(s, t, R)
    };
    fin32::<FTZ, SAT>(r)
}

pub(crate) fn div_f32<const FTZ: bool>(a: u64, b: u64) -> u64 {
    fin32::<FTZ, false>(in32::<FTZ>(a) / in32::<FTZ>(b))
}
pub(crate) fn rcp_f32<const FTZ: bool>(a: u64) -> u64 {
    fin32::<FTZ, false>(1.0 / in32::<FTZ>(a))
}
pub(crate) fn sqrt_f32<const FTZ: bool>(a: u64) -> u64 {
    fin32::<FTZ, false>(in32::<FTZ>(a).sqrt())
}
pub(crate) fn rsqrt_f32<const FTZ: bool>(a: u64) -> u64 {
    fin32::<FTZ, false>((1.0 / f64::from(in32::<FTZ>(a)).sqrt()) as f32)
}
pub(crate) fn ex2_f32<const FTZ: bool>(a: u64) -> u64 {
    fin32::<FTZ, false>(in32::<FTZ>(a).exp2())
}
pub(crate) fn lg2_f32<const FTZ: bool>(a: u64) -> u64 {
    fin32::<FTZ, false>(in32::<FTZ>(a).log2())
}
pub(crate) fn sin_f32<const FTZ: bool>(a: u64) -> u64 {
    fin32::<FTZ, false>(in32::<FTZ>(a).sin())
}
pub(crate) fn cos_f32<const FTZ: bool>(a: u64) -> u64 {
    fin32::<FTZ, false>(in32::<FTZ>(a).cos())
}
pub(crate) fn tanh_f32(a: u64) -> u64 {
    canon32(f32of(a).tanh())
}
pub(crate) fn neg_f32<const FTZ: bool>(a: u64) -> u64 {
    bits32(-in32::<FTZ>(a))
}
pub(crate) fn abs_f32<const FTZ: bool>(a: u64) -> u64 {
    bits32(in32::<FTZ>(a).abs())
}
pub(crate) fn copysign_f32(a: u64, b: u64) -> u64 {
    bits32(f32of(b).copysign(f32of(a)))
}

fn minmax32<const MAX: bool, const NAN: bool>(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        if NAN || (a.is_nan() && b.is_nan()) {
            return f32::NAN;
        }
        return if a.is_nan() { b } else { a };
    }
    if a == b {
        // -0 < +0
        let neg = a.is_sign_negative();
        return if MAX == neg { b } else { a };
    }
    if (a < b) != MAX {
        a
    } else {
        b
    }
}

pub(crate) fn min_f32<const FTZ: bool, const NAN: bool>(a: u64, b: u64) -> u64 {
    fin32::<FTZ, false>(minmax32::<false, NAN>(in32::<FTZ>(a), in32::<FTZ>(b)))
}
pub(crate) fn max_f32<const FTZ: bool, const NAN: bool>(a: u64, b: u64) -> u64 {
    fin32::<FTZ, false>(minmax32::<true, NAN>(in32::<FTZ>(a), in32::<FTZ>(b)))
}

// ---------------------------------------------------------------- f64 (round to nearest)

fn f64of(v: u64) -> f64 {
    f64::from_bits(v)
}
fn c64(f: f64) -> u64 {
    if f.is_nan() {
        Fmt::F64.nan()
    } else {
        f.to_bits()
    }
}
pub(crate) fn add_f64(a: u64, b: u64) -> u64 {
    c64(f64of(a) + f64of(b))
}
pub(crate) fn sub_f64(a: u64, b: u64) -> u64 {
    c64(f64of(a) - f64of(b))
}
pub(crate) fn mul_f64(a: u64, b: u64) -> u64 {
    c64(f64of(a) * f64of(b))
}
pub(crate) fn fma_f64(a: u64, b: u64, c: u64) -> u64 {
    c64(f64of(a).mul_add(f64of(b), f64of(c)))
}
pub(crate) fn div_f64(a: u64, b: u64) -> u64 {
    c64(f64of(a) / f64of(b))
}
pub(crate) fn rcp_f64(a: u64) -> u64 {
    c64(1.0 / f64of(a))
}
pub(crate) fn sqrt_f64(a: u64) -> u64 {
    c64(f64of(a).sqrt())
}
pub(crate) fn rsqrt_f64(a: u64) -> u64 {
    c64(1.0 / f64of(a).sqrt())
}
pub(crate) fn neg_f64(a: u64) -> u64 {
    a ^ (1u64 << 63)
}
pub(crate) fn abs_f64(a: u64) -> u64 {
    a & !(1u64 << 63)
}
pub(crate) fn min_f64(a: u64, b: u64) -> u64 {
    c64(f64of(a).min(f64of(b)))
}
pub(crate) fn max_f64(a: u64, b: u64) -> u64 {
    c64(f64of(a).max(f64of(b)))
}

// ---------------------------------------------------------------- f16 / bf16

#[inline]
fn hfmt(bf: bool) -> Fmt {
    if bf {
        Fmt::Bf16
    } else {
        Fmt::F16
    }
}

#[inline]
fn hget(bf: bool, v: u64) -> f64 {
    hfmt(bf).to_f64(v & 0xffff)
}

#[inline]
fn hput(bf: bool, x: f64, ftz: bool, sat: bool) -> u64 {
    let x = if sat {
        if x.is_nan() {
            0.0
        } else {
            x.clamp(0.0, 1.0)
        }
    } else {
        x
    };
    let r = round_float(x, hfmt(bf), Rnd::Rn, 0, false);
    if ftz && (r & 0x7c00) == 0 && !bf {
        return r & 0x8000;
    }
    r
}

/// Applies a scalar half op lane-wise to one or two halves.
#[inline]
fn h2<const X2: bool>(a: u64, b: u64, c: u64, f: impl Fn(u64, u64, u64) -> u64) -> u64 {
    let lo = f(a & 0xffff, b & 0xffff, c & 0xffff);
    if X2 {
        lo | (f((a >> 16) & 0xffff, (b >> 16) & 0xffff, (c >> 16) & 0xffff) << 16)
    } else {
        lo
    }
}

pub(crate) fn add_h<const BF: bool, const X2: bool, const FTZ: bool, const SAT: bool>(
    a: u64,
    b: u64,
) -> u64 {
    h2::<X2>(a, b, 0, |a, b, _| {
        hput(BF, hget(BF, a) + hget(BF, b), FTZ, SAT)
    })
}
pub(crate) fn sub_h<const BF: bool, const X2: bool, const FTZ: bool, const SAT: bool>(
    a: u64,
    b: u64,
) -> u64 {
    h2::<X2>(a, b, 0, |a, b, _| {
        hput(BF, hget(BF, a) - hget(BF, b), FTZ, SAT)
    })
}
pub(crate) fn mul_h<const BF: bool, const X2: bool, const FTZ: bool, const SAT: bool>(
    a: u64,
    b: u64,
) -> u64 {
    h2::<X2>(a, b, 0, |a, b, _| {
        hput(BF, hget(BF, a) * hget(BF, b), FTZ, SAT)
    })
}
pub(crate) fn fma_h<const BF: bool, const X2: bool, const FTZ: bool, const SAT: bool>(
    a: u64,
    b: u64,
    c: u64,
) -> u64 {
    h2::<X2>(a, b, c, |a, b, c| {
        hput(BF, hget(BF, a).mul_add(hget(BF, b), hget(BF, c)), FTZ, SAT)
    })
}
pub(crate) fn min_h<const BF: bool, const X2: bool>(a: u64, b: u64) -> u64 {
    h2::<X2>(a, b, 0, |a, b, _| {
        let r = minmax32::<false, false>(hget(BF, a) as f32, hget(BF, b) as f32);
        hput(BF, f64::from(r), false, false)
    })
}
pub(crate) fn max_h<const BF: bool, const X2: bool>(a: u64, b: u64) -> u64 {
    h2::<X2>(a, b, 0, |a, b, _| {
        let r = minmax32::<true, false>(hget(BF, a) as f32, hget(BF, b) as f32);
        hput(BF, f64::from(r), false, false)
    })
}
pub(crate) fn neg_h<const X2: bool>(a: u64) -> u64 {
    if X2 {
        a ^ 0x8000_8000
    } else {
        a ^ 0x8000
    }
}
pub(crate) fn abs_h<const X2: bool>(a: u64) -> u64 {
    if X2 {
        a & 0x7fff_7fff
    } else {
        a & 0x7fff
    }
}
pub(crate) fn ex2_h<const BF: bool, const X2: bool>(a: u64) -> u64 {
    h2::<X2>(a, 0, 0, |a, _, _| {
        hput(BF, hget(BF, a).exp2(), false, false)
    })
}

// ---------------------------------------------------------------- comparisons

/// Comparison operators of `setp`, in a fixed numbering.
pub(crate) const CMP_NAMES: [&str; 18] = [
    "eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs", "equ", "neu", "ltu", "leu", "gtu",
    "geu", "num", "nan",
];

#[inline]
fn ord_cmp<const OP: u8>(o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match OP {
        0 => o == Equal,
        1 => o != Equal,
        2 | 6 => o == Less,
        3 | 7 => o != Greater,
        4 | 8 => o == Greater,
        _ => o != Less,
    }
}

pub(crate) fn cmp_u<const OP: u8, const W: u32>(a: u64, b: u64) -> bool {
    ord_cmp::<OP>((a & mask(W)).cmp(&(b & mask(W))))
}

pub(crate) fn cmp_s<const OP: u8, const W: u32>(a: u64, b: u64) -> bool {
    ord_cmp::<OP>(sext(a, W).cmp(&sext(b, W)))
}

/// Float compare; `F` is the format code (0 f16, 1 bf16, 2 f32, 3 f64).
pub(crate) fn cmp_f<const OP: u8, const F: u8>(a: u64, b: u64) -> bool {
    let fmt = match F {
        0 => Fmt::F16,
        1 => Fmt::Bf16,
        2 => Fmt::F32,
        _ => Fmt::F64,
    };
    let (x, y) = (fmt.to_f64(a), fmt.to_f64(b));
    let unordered = x.is_nan() || y.is_nan();
    match OP {
        0 => !unordered && x == y,
        1 => !unordered && x != y,
        2 => !unordered && x < y,
        3 => !unordered && x <= y,
        4 => !unordered && x > y,
        5 => !unordered && x >= y,
        10 => unordered || x == y,
        11 => unordered || x != y,
        12 => unordered || x < y,
        13 => unordered || x <= y,
        14 => unordered || x > y,
        15 => unordered || x >= y,
        16 => !unordered,
        _ => unordered,
    }
}

// ---------------------------------------------------------------- cvt

/// Scalar kinds of `cvt` operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Unsigned integer of so many bits.
    U(u32),
    /// Signed integer of so many bits.
    S(u32),
    /// Float.
    F(Fmt),
}

/// Integer rounding of `cvt.rni` and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IRnd {
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

/// A decoded `cvt`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CvtSpec {
    pub dst: Kind,
    pub src: Kind,
    pub rnd: Rnd,
    pub irnd: Option<IRnd>,
    pub sat: bool,
    pub ftz: bool,
    pub relu: bool,
    pub satfinite: bool,
}

fn round_int(x: f64, r: IRnd) -> f64 {
    match r {
        IRnd::Rni => x.round_ties_even(),
        IRnd::Rzi => x.trunc(),
        IRnd::Rmi => x.floor(),
        IRnd::Rpi => x.ceil(),
    }
}

fn float_to_int(x: f64, dst: Kind) -> u64 {
    if x.is_nan() {
        return 0;
    }
    match dst {
        Kind::U(w) => {
            if x <= 0.0 {
                0
            } else if x >= 2f64.powi(w as i32) {
                mask(w)
            } else {
                x as u64
            }
        }
        Kind::S(w) => {
            let lo = -(1i128 << (w - 1));
            let hi = (1i128 << (w - 1)) - 1;
            let v = if x <= lo as f64 {
                lo
            } else if x >= hi as f64 + 1.0 {
                hi
            } else {
                x as i128
            };
            (v as u64) & mask(w)
        }
        Kind::F(_) => 0,
    }
}

/// Converts register bits per `spec`.
pub(crate) fn cvt(spec: &CvtSpec, v: u64) -> u64 {
    match (spec.src, spec.dst) {
        (Kind::U(sw) | Kind::S(sw), Kind::U(dw) | Kind::S(dw)) => {
            let signed_src = matches!(spec.src, Kind::S(_));
            let x: i128 = if signed_src {
                i128::from(sext(v, sw))
            } else {
                i128::from(v & mask(sw))
            };
            let r = if spec.sat {
                let (lo, hi): (i128, i128) = match spec.dst {
                    Kind::U(w) => (0, (1i128 << w) - 1),
                    _ => (-(1i128 << (dw - 1)), (1i128 << (dw - 1)) - 1),
                };
                x.clamp(lo, hi)
            } else {
                x
            };
            (r as u64) & mask(dw)
        }
        (Kind::U(sw) | Kind::S(sw), Kind::F(f)) => {
            let x: i128 = if matches!(spec.src, Kind::S(_)) {
                i128::from(sext(v, sw))
            } else {
                i128::from(v & mask(sw))
            };
            let fx = x as f64;
            let diff = x - fx as i128;
            let tail = if diff == 0 {
                0
            } else if (diff > 0) == (fx > 0.0) {
                1
            } else {
                -1
            };
            let r = if f == Fmt::F64 && tail == 0 {
                fx.to_bits()
            } else {
                round_float(fx, f, spec.rnd, tail, false)
            };
            sat_float(spec, f, r)
        }
        (Kind::F(sf), Kind::U(_) | Kind::S(_)) => {
            let mut x = sf.to_f64(v);
            if spec.ftz && sf == Fmt::F32 && f32::from_bits(v as u32).is_subnormal() {
                x = 0.0;
            }
            let x = round_int(x, spec.irnd.unwrap_or(IRnd::Rzi));
            float_to_int(x, spec.dst)
        }
        (Kind::F(sf), Kind::F(df)) => {
            let mut x = sf.to_f64(v);
            if spec.ftz && sf == Fmt::F32 && f32::from_bits(v as u32).is_subnormal() {
                x = if x.is_sign_negative() { -0.0 } else { 0.0 };
            }
            if let Some(ir) = spec.irnd {
                x = round_int(x, ir);
            }
            if spec.relu && !x.is_nan() && x < 0.0 {
                x = 0.0;
            }
            let r = round_float(x, df, spec.rnd, 0, spec.satfinite);
            let r = if spec.ftz && df == Fmt::F32 && f32::from_bits(r as u32).is_subnormal() {
                r & 0x8000_0000
            } else {
                r
            };
            sat_float(spec, df, r)
        }
    }
}

fn sat_float(spec: &CvtSpec, f: Fmt, r: u64) -> u64 {
    if !spec.sat {
        return r;
    }
    let x = f.to_f64(r);
    if x.is_nan() {
        return 0;
    }
    round_float(x.clamp(0.0, 1.0), f, Rnd::Rn, 0, false)
}

/// `cvt.rn{.relu}{.satfinite}.{f16x2,bf16x2}.f32 d, a, b`: `a` goes to the
/// upper half, `b` to the lower.
pub(crate) fn cvt_pack(bf: bool, rnd: Rnd, relu: bool, satfinite: bool, a: u64, b: u64) -> u64 {
    let one = |v: u64| {
        let mut x = f64::from(f32of(v));
        if relu && !x.is_nan() && x < 0.0 {
            x = 0.0;
        }
        round_float(x, hfmt(bf), rnd, 0, satfinite)
    };
    (one(a) << 16) | one(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(x: f32) -> u64 {
        round_float(f64::from(x), Fmt::Bf16, Rnd::Rn, 0, false)
    }

    #[test]
    fn bf16_rounding_ties_to_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0)
        assert_eq!(bf(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6: to even
        assert_eq!(bf(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(bf(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf(f32::MAX), 0x7f80);
        assert_eq!(bf(f32::NAN), 0x7fff);
        assert_eq!(bf(-0.0), 0x8000);
    }

    #[test]
    fn f16_matches_half_crate() {
        let mut x = 1.0e-8f32;
        while x < 7.0e4 {
            for s in [x, -x, x * 1.000_123] {
                let r = round_float(f64::from(s), Fmt::F16, Rnd::Rn, 0, false);
                assert_eq!(r as u16, half::f16::from_f32(s).to_bits(), "{s}");
            }
            x *= 1.37;
        }
    }

    #[test]
    fn directed_rounding() {
        let one = 1.0f32.to_bits() as u64;
        let tiny = 1.0e-30f32.to_bits() as u64;
        assert_eq!(
            add_f32::<3, false, false>(one, tiny),
            u64::from(1.000_000_1f32.to_bits())
        );
        assert_eq!(add_f32::<2, false, false>(one, tiny), one);
        assert_eq!(
            sub_f32::<1, false, false>(one, tiny),
            u64::from(0.999_999_94f32.to_bits())
        );
        assert_eq!(sub_f32::<0, false, false>(one, tiny), one);
    }

    #[test]
    fn float_to_int_saturates() {
        let spec = CvtSpec {
            dst: Kind::S(32),
            src: Kind::F(Fmt::F32),
            rnd: Rnd::Rn,
            irnd: Some(IRnd::Rni),
            sat: false,
            ftz: false,
            relu: false,
            satfinite: false,
        };
        assert_eq!(cvt(&spec, u64::from(2.5f32.to_bits())), 2);
        assert_eq!(cvt(&spec, u64::from(3.5f32.to_bits())), 4);
        assert_eq!(cvt(&spec, u64::from(1e20f32.to_bits())), 0x7fff_ffff);
        assert_eq!(cvt(&spec, u64::from((-1e20f32).to_bits())), 0x8000_0000);
        assert_eq!(cvt(&spec, u64::from(f32::NAN.to_bits())), 0);
    }
}
