//! The losses' exponentials: `e^(z_k - max)` over a row of logits, in
//! f64, vectorized.
//!
//! A loss over SmolLM2's 49152-token vocabulary takes 49152
//! exponentials per row; through libm's scalar `exp` they were 7% of a
//! LoRA training step (54 ms of 128 rows). Here `x = z_k - max <= 0` and
//!
//! ```text
//! n = round(x log2(e)),  r = (x - n ln2_hi) - n ln2_lo,  |r| <= ln(2) / 2
//! e^x = 2^n e^r,  e^r = sum_{j=0}^{13} r^j / j!   (Horner)
//! ```
//!
//! `n ln2_hi` is exact (fdlibm's split of `ln 2`, 32 significant bits), the
//! series' remainder is below `0.35^14 / 14! < 2^-57`, and the result is
//! within 2 ulp of the correctly rounded `e^x` (test: against `f64::exp`
//! at 10^5 points of `[-745, 0]`). `2^n` is built from the exponent bits,
//! so the loop has no branch or call and compiles to vector code; it is
//! compiled for AVX-512 and for AVX2 (chosen at run time) and for the
//! baseline target, without fused multiply-adds in any, so every machine
//! gets the same bits. Below `x = -708.39` (`e^x < 2^-1022`, a subnormal
//! or 0) the result is 0: next to the row's largest term, 1, it changes
//! no sum. NaN stays NaN.

/// `ln 2` in two parts: `LN2_HI` (32 significant bits, so `n LN2_HI` is
/// exact for `|n| < 2^20`) and the rest (fdlibm's `ln2HI`, `ln2LO`).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// `1.5 * 2^52`: adding it rounds a value of magnitude below `2^51` to an
/// integer, which then sits in the low bits of the sum's representation.
const ROUND: f64 = 6_755_399_441_055_744.0;

/// Below this, `e^x < 2^-1022`: the result is 0.
const MIN_X: f64 = -708.39;

/// `1 / j!` for `j = 13` down to `2`.
const INV_FACT: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
];

/// `e^x` for `x <= 0` (see the module docs; a positive `x` is not
/// supported: the losses subtract the row's maximum first).
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    let t = x * core::f64::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = INV_FACT[0];
    for c in &INV_FACT[1..] {
        p = p * r + c;
    }
    p = (p * r + 1.0) * r + 1.0;
    // `t`'s low bits hold `n` (offset by `ROUND`'s); `n + 1023` is the
    // biased exponent of `2^n`.
    let bias = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(1023);
    let v = p * f64::from_bits(bias << 52);
    if x < MIN_X { 0.0 } else { v }
}

/// `out[k] = e^(z[k] - max)` (`z[k] <= max`, the row's maximum), and
/// returns `sum_k out[k]` (eight partial sums, added in a fixed order).
/// `out` is resized to `z`'s length.
pub(crate) fn exp_shifted(z: &[f32], max: f32, out: &mut Vec<f64>) -> f64 {
    out.clear();
    out.resize(z.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected just above.
            return unsafe { exp_shifted_avx512(z, max, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected just above.
            return unsafe { exp_shifted_avx2(z, max, out) };
        }
    }
    exp_shifted_generic(z, max, out)
}

/// [`exp_shifted_generic`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(z: &[f32], max: f32, out: &mut [f64]) -> f64 {
    exp_shifted_generic(z, max, out)
}

/// [`exp_shifted_generic`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_avx2(z: &[f32], max: f32, out: &mut [f64]) -> f64 {
    exp_shifted_generic(z, max, out)
}

/// The loop itself (`out` as long as `z`). Writing into the zeroed
/// buffer vectorizes; `Vec::extend` over the same map did not (3x slower,
/// measured on 128 rows of 49152).
#[inline(always)]
fn exp_shifted_generic(z: &[f32], max: f32, out: &mut [f64]) -> f64 {
    let m = f64::from(max);
    for (o, &v) in out.iter_mut().zip(z) {
        *o = exp_nonpositive(f64::from(v) - m);
    }
    let mut acc = [0.0f64; 8];
    let chunks = out.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the standard library's `exp` (an independent, correctly
    /// rounded or nearly so implementation): within 2 ulp over `[-708, 0]`,
    /// 0 below `MIN_X`, NaN for NaN, exactly 1 at 0.
    #[test]
    fn matches_std_exp_within_two_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=100_000 {
            let x = -708.0 * f64::from(i) / 100_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            let ulp = f64::from_bits(want.to_bits() + 1) - want;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-709.0), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f64::NAN).is_nan());
    }

    /// Every compiled version gives the same bits as the portable loop,
    /// over a row long enough for the vector loops and their tails.
    #[test]
    fn every_version_gives_the_same_bits() {
        let z: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1000) as f32 * -0.37).collect();
        let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut want = vec![0.0; z.len()];
        let sum = exp_shifted_generic(&z, max, &mut want);
        let mut got = vec![7.0; 5];
        assert_eq!(exp_shifted(&z, max, &mut got).to_bits(), sum.to_bits());
        assert_eq!(got.len(), z.len(), "the earlier contents replaced");
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        let naive: f64 = z.iter().map(|&v| (f64::from(v) - f64::from(max)).exp()).sum();
        assert!((sum - naive).abs() <= 1e-13 * naive, "{sum} vs {naive}");
    }
}
