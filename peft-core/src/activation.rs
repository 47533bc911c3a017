//! Activation functions and their derivatives, for the bottleneck adapter.
//!
//! | activation | `f(z)` | `f'(z)` |
//! |---|---|---|
//! | ReLU | `max(z, 0)` | `1` for `z > 0`, else `0` |
//! | GELU (erf) | `z Phi(z) = z/2 (1 + erf(z/sqrt 2))` | `Phi(z) + z phi(z)`, `phi(z) = exp(-z^2/2)/sqrt(2 pi)` |
//! | GELU (tanh) | `z/2 (1 + tanh(c (z + 0.044715 z^3)))`, `c = sqrt(2/pi)` | `(1 + t)/2 + z/2 (1 - t^2) c (1 + 3 * 0.044715 z^2)` |
//! | SiLU | `z sigma(z)` | `sigma(z) (1 + z (1 - sigma(z)))` |
//!
//! The GELU forms match PyTorch's `gelu(approximate="none" | "tanh")`.

use crate::element::{Element, Real};

/// A pointwise activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// `max(z, 0)` (the Houlsby/Pfeiffer default).
    #[default]
    Relu,
    /// Exact GELU, with `erf`.
    GeluErf,
    /// GELU's tanh approximation.
    GeluTanh,
    /// SiLU (swish): `z sigma(z)`.
    Silu,
}

fn c<R: Real>(v: f64) -> R {
    <R as Element>::from_f64(v)
}

/// `sqrt(2 / pi)`.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// The cubic coefficient of the tanh approximation of GELU.
const GELU_CUBIC: f64 = 0.044_715;

impl Activation {
    /// `f(z)`.
    #[inline]
    pub fn apply<R: Real>(self, z: R) -> R {
        let half: R = c(0.5);
        match self {
            Activation::Relu => {
                if z > R::ZERO {
                    z
                } else {
                    R::ZERO
                }
            }
            Activation::GeluErf => half * z * (R::ONE + (z * c(core::f64::consts::FRAC_1_SQRT_2)).erf()),
            Activation::GeluTanh => {
                let t = (c::<R>(SQRT_2_OVER_PI) * (z + c::<R>(GELU_CUBIC) * z * z * z)).tanh();
                half * z * (R::ONE + t)
            }
            Activation::Silu => z * sigmoid(z),
        }
    }

    /// `f'(z)`.
    #[inline]
    pub fn derivative<R: Real>(self, z: R) -> R {
        let half: R = c(0.5);
        match self {
            Activation::Relu => {
                if z > R::ZERO {
                    R::ONE
                } else {
                    R::ZERO
                }
            }
            Activation::GeluErf => {
                let cdf = half * (R::ONE + (z * c(core::f64::consts::FRAC_1_SQRT_2)).erf());
                let pdf = c::<R>(INV_SQRT_2PI) * (-half * z * z).exp();
                cdf + z * pdf
            }
            Activation::GeluTanh => {
                let k: R = c(SQRT_2_OVER_PI);
                let a: R = c(GELU_CUBIC);
                let t = (k * (z + a * z * z * z)).tanh();
                half * (R::ONE + t) + half * z * (R::ONE - t * t) * k * (R::ONE + c::<R>(3.0) * a * z * z)
            }
            Activation::Silu => {
                let s = sigmoid(z);
                s * (R::ONE + z * (R::ONE - s))
            }
        }
    }
}

/// `1 / (1 + exp(-z))`, without overflow for large `|z|`.
#[inline]
fn sigmoid<R: Real>(z: R) -> R {
    if z >= R::ZERO {
        R::ONE / (R::ONE + (-z).exp())
    } else {
        let e = z.exp();
        e / (R::ONE + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Activation; 4] = [Activation::Relu, Activation::GeluErf, Activation::GeluTanh, Activation::Silu];

    #[test]
    fn derivatives_match_central_differences() {
        let h = 1e-6;
        for act in ALL {
            for i in -40..=40 {
                let z = i as f64 * 0.173 + 0.011; // avoids ReLU's kink at 0
                let fd = (act.apply(z + h) - act.apply(z - h)) / (2.0 * h);
                let an = act.derivative(z);
                assert!((fd - an).abs() < 1e-8, "{act:?} at {z}: fd {fd} vs {an}");
            }
        }
    }

    #[test]
    fn hand_values() {
        // GELU(1) = Phi(1) = 0.8413447460685429 (normal CDF table);
        // tanh form: 0.5 (1 + tanh(0.7978845608 * 1.044715)) = 0.8411919906082768;
        // SiLU(1) = 1/(1 + e^-1) = 0.7310585786300049.
        assert!((Activation::GeluErf.apply(1.0f64) - 0.841_344_746_068_542_9).abs() < 1e-15);
        assert!((Activation::GeluTanh.apply(1.0f64) - 0.841_191_990_608_276_8).abs() < 1e-15);
        assert!((Activation::Silu.apply(1.0f64) - 0.731_058_578_630_004_9).abs() < 1e-15);
        assert_eq!(Activation::Relu.apply(-2.0f32), 0.0);
        // No overflow at the extremes.
        assert_eq!(Activation::Silu.apply(-1000.0f32), -0.0);
        assert_eq!(Activation::Silu.apply(1000.0f32), 1000.0);
    }
}
