//! Parameter accounting (mistake 5 in `peft_verify::mistakes`: a rank too high saves
//! nothing).

use super::config::LOW_SAVINGS_RATIO;
use crate::error::{Error, Result};

/// Trainable versus frozen parameter counts of one LoRA layer, or of a sum of
/// layers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamReport {
    /// Trainable parameters: `r * (in + out)` per layer.
    pub trainable: usize,
    /// Parameters of the frozen base: `in * out` (+ `out` with a bias).
    pub base: usize,
}

impl ParamReport {
    /// Counts for one layer.
    ///
    /// # Errors
    /// [`Error::Overflow`] if a count overflows `usize`.
    pub fn for_layer(in_features: usize, out_features: usize, rank: usize, bias: bool) -> Result<Self> {
        let trainable =
            in_features.checked_add(out_features).and_then(|s| s.checked_mul(rank)).ok_or(Error::Overflow)?;
        Self::over_base(trainable, in_features, out_features, bias)
    }

    /// `trainable` parameters over a base `in -> out` (`in * out`, `+ out`
    /// with a bias).
    ///
    /// # Errors
    /// [`Error::Overflow`] if the base's count overflows `usize`.
    pub fn over_base(trainable: usize, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let base = in_features
            .checked_mul(out_features)
            .and_then(|w| w.checked_add(if bias { out_features } else { 0 }))
            .ok_or(Error::Overflow)?;
        Ok(Self { trainable, base })
    }

    /// The sum of two reports.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn checked_add(self, other: Self) -> Result<Self> {
        Ok(Self {
            trainable: self.trainable.checked_add(other.trainable).ok_or(Error::Overflow)?,
            base: self.base.checked_add(other.base).ok_or(Error::Overflow)?,
        })
    }

    /// `trainable / base` (0 for an empty base).
    pub fn ratio(&self) -> f64 {
        if self.base == 0 { 0.0 } else { self.trainable as f64 / self.base as f64 }
    }

    /// `true` when the adapter holds at least [`LOW_SAVINGS_RATIO`] of the
    /// base's parameters: the rank is too high to be worth it.
    pub fn low_savings(&self) -> bool {
        self.ratio() >= LOW_SAVINGS_RATIO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_mistake_5_is_flagged() {
        // Hand counts: r=256 on 512x512 trains 256*(512+512) = 262144, which
        // equals the base's 512*512 = 262144.
        let high = ParamReport::for_layer(512, 512, 256, false).unwrap();
        assert_eq!(high.trainable, 262_144);
        assert_eq!(high.base, 262_144);
        assert!(high.low_savings());
        // r=8: 8192 trainable, 3.1% of the base.
        let low = ParamReport::for_layer(512, 512, 8, false).unwrap();
        assert_eq!(low.trainable, 8192);
        assert!((low.ratio() - 0.03125).abs() < 1e-15);
        assert!(!low.low_savings());
        assert_eq!(ParamReport::for_layer(usize::MAX, 2, 2, false), Err(Error::Overflow));
        let sum = low.checked_add(high).unwrap();
        assert_eq!(sum.trainable, 270_336);
    }
}
