//! Storage element types: `f32` (the exact path) and `bf16` (training).
//! Arithmetic is always done in f32.

use half::bf16;

/// A storage dtype, as launchers and the runtime name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16 (8 exponent bits, 7 mantissa bits).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }

    /// The suffix of kernel entries specialised for this dtype.
    pub const fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        }
    }
}

/// A storage element: converts to and from f32 (round to nearest even).
pub trait Element:
    bytemuck::Pod + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static
{
    /// The dtype tag.
    const DTYPE: DType;
    /// Widen to f32 (exact).
    fn to_f32(self) -> f32;
    /// Narrow from f32 (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// Narrow from f64 (through f32).
    fn from_f64(x: f64) -> Self {
        Self::from_f32(x as f32)
    }
    /// Widen to f64 (exact).
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

/// Widens a slice to f32 (borrowed when it already is f32).
pub fn widen<E: Element>(x: &[E]) -> std::borrow::Cow<'_, [f32]> {
    if E::DTYPE == DType::F32 {
        if let Ok(f) = bytemuck::try_cast_slice::<E, f32>(x) {
            return std::borrow::Cow::Borrowed(f);
        }
    }
    std::borrow::Cow::Owned(x.iter().map(|v| v.to_f32()).collect())
}
