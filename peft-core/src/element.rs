use core::fmt::Debug;
use core::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A storage type for tensors.
///
/// Element types.
///
/// An [`Element`] is what tensors store; its [`Element::Accum`] is what
/// arithmetic runs in. For `f32` and `f64` the two are the same type. With
/// the `half` feature, `f16` and `bf16` store in 16 bits and compute in `f32`:
/// a value is widened exactly on load and rounded once, to nearest-even, on
/// store.
pub trait Element: Copy + Default + PartialEq + Debug + Send + Sync + 'static {
    /// The type arithmetic on this element runs in.
    type Accum: Real;
    /// Zero.
    const ZERO: Self;
    /// A short name (`"f32"`, `"bf16"`, ...), for reports and files.
    const NAME: &'static str;
    /// Widens to the accumulation type (exact).
    fn to_accum(self) -> Self::Accum;
    /// Rounds from the accumulation type to nearest, ties to even.
    fn from_accum(v: Self::Accum) -> Self;
    /// Rounds an `f64` to this type, to nearest, ties to even (once, with no
    /// intermediate rounding).
    fn from_f64(v: f64) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Bytes in the stored form (4, 8 or 2).
    const BYTES: usize;
    /// The stored bits, zero-extended (for files: bit-exact, NaN payloads
    /// included).
    fn to_bits64(self) -> u64;
    /// From stored bits (the low `8 * BYTES` bits of `bits`).
    fn from_bits64(bits: u64) -> Self;
}

/// An arithmetic type: `f32` or `f64`. Its own accumulation type.
pub trait Real:
    Element<Accum = Self>
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// One.
    const ONE: Self;
    /// Machine epsilon (the distance from 1 to the next larger value).
    const EPSILON: Self;
    /// Square root (correctly rounded).
    fn sqrt(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// Natural exponential.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// The error function.
    fn erf(self) -> Self;
    /// `true` unless the value is infinite or NaN.
    fn is_finite(self) -> bool;
}

/// `fn name(self) -> Self { f(self) }`, inlined, for each `name = f`.
macro_rules! unary {
    ($($name:ident = $f:path),*) => {
        $(
            #[inline(always)]
            fn $name(self) -> Self {
                $f(self)
            }
        )*
    };
}

macro_rules! impl_real {
    ($t:ty, $name:literal, $sqrt:path, $exp:path, $ln:path, $tanh:path, $erf:path, $fabs:path) => {
        impl Element for $t {
            type Accum = $t;
            const ZERO: Self = 0.0;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn to_accum(self) -> Self {
                self
            }
            #[inline(always)]
            fn from_accum(v: Self) -> Self {
                v
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            const BYTES: usize = core::mem::size_of::<$t>();
            #[inline(always)]
            fn to_bits64(self) -> u64 {
                u64::from(self.to_bits())
            }
            #[inline(always)]
            #[allow(clippy::cast_possible_truncation)]
            fn from_bits64(bits: u64) -> Self {
                <$t>::from_bits(bits as _)
            }
        }

        impl Real for $t {
            const ONE: Self = 1.0;
            const EPSILON: Self = <$t>::EPSILON;
            unary!(sqrt = $sqrt, abs = $fabs, exp = $exp, ln = $ln, tanh = $tanh, erf = $erf);
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}

impl_real!(f32, "f32", libm::sqrtf, libm::expf, libm::logf, libm::tanhf, libm::erff, libm::fabsf);
impl_real!(f64, "f64", libm::sqrt, libm::exp, libm::log, libm::tanh, libm::erf, libm::fabs);

#[cfg(feature = "half")]
macro_rules! impl_half {
    ($t:ty, $name:literal) => {
        impl Element for $t {
            type Accum = f32;
            const ZERO: Self = <$t>::ZERO;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn to_accum(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_accum(v: f32) -> Self {
                <$t>::from_f32(v)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            const BYTES: usize = 2;
            #[inline(always)]
            fn to_bits64(self) -> u64 {
                u64::from(self.to_bits())
            }
            #[inline(always)]
            #[allow(clippy::cast_possible_truncation)]
            fn from_bits64(bits: u64) -> Self {
                <$t>::from_bits(bits as u16)
            }
        }
    };
}

#[cfg(feature = "half")]
impl_half!(half::f16, "f16");
#[cfg(feature = "half")]
impl_half!(half::bf16, "bf16");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_roundtrip_is_identity() {
        for v in [0.0f32, -1.5, 3.25e-20, f32::MAX] {
            assert_eq!(f32::from_accum(v.to_accum()).to_bits(), v.to_bits());
        }
    }

    #[cfg(feature = "half")]
    #[test]
    fn half_rounds_to_nearest_even() {
        use half::{bf16, f16};
        // 1 + 2^-11 is exactly halfway between 1 and the next f16 (1 + 2^-10):
        // ties to even gives 1.
        assert_eq!(f16::from_accum(1.0 + 2f32.powi(-11)), f16::ONE);
        // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: ties to
        // even gives 1 + 2^-9.
        assert_eq!(f16::from_accum(1.0 + 3.0 * 2f32.powi(-11)).to_f32(), 1.0 + 2f32.powi(-9));
        // bf16 has 8 significant bits: 1 + 2^-8 ties to 1.
        assert_eq!(bf16::from_accum(1.0 + 2f32.powi(-8)), bf16::ONE);
        assert_eq!(f16::NAME, "f16");
    }
}
