//! [`LoraLinear`]: a frozen linear layer with a LoRA adapter.

use super::config::{LoraConfig, LoraInit};
use super::params::ParamReport;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::checked_len;
use crate::rng::Rng;

/// A frozen linear layer `W [out, in]` (optional bias `b [out]`) with a LoRA
/// adapter `A [r, in]`, `B [out, r]`, all borrowed from the caller.
///
/// The frozen base is structural: [`forward`](LoraLinear::forward) and
/// [`backward`](LoraLinear::backward) read `W` through a shared borrow and
/// produce no gradient for it. Only [`merge`](LoraLinear::merge) and
/// [`unmerge`](LoraLinear::unmerge) write `W`, and the layer tracks whether
/// it is merged so that `s B A` is never added twice.
#[derive(Debug)]
pub struct LoraLinear<'a, E: Element> {
    pub(super) weight: &'a mut [E],
    pub(super) bias: Option<&'a [E]>,
    pub(super) a: &'a mut [E],
    pub(super) b: &'a mut [E],
    pub(super) in_features: usize,
    pub(super) out_features: usize,
    pub(super) rank: usize,
    pub(super) scale: f64,
    pub(super) init: LoraInit,
    pub(super) merged: bool,
    pub(super) backup: Option<&'a mut [E]>,
}

impl<'a, E: Element> LoraLinear<'a, E> {
    /// Wraps a base layer and an adapter. `A` and `B` keep their values (so
    /// a loaded adapter can be wrapped); call
    /// [`init_adapter`](Self::init_adapter) for a fresh one. The layer starts
    /// unmerged.
    ///
    /// Shapes: `weight [out, in]`, `bias [out]`, `a [r, in]`, `b [out, r]`,
    /// each a dense row-major slice of exactly that length.
    ///
    /// # Errors
    /// [`Error::InvalidRank`], [`Error::InvalidAlpha`] (see
    /// [`LoraConfig::validate`]); [`Error::ShapeMismatch`] for a slice of the
    /// wrong length; [`Error::Overflow`].
    pub fn new(
        config: &LoraConfig<'_>,
        in_features: usize,
        out_features: usize,
        weight: &'a mut [E],
        bias: Option<&'a [E]>,
        a: &'a mut [E],
        b: &'a mut [E],
    ) -> Result<Self> {
        let scale = config.validate(in_features, out_features)?;
        let rank = config.rank;
        check_len(Operand::Weight, checked_len(out_features, in_features)?, weight.len())?;
        if let Some(bias) = bias {
            check_len(Operand::Bias, out_features, bias.len())?;
        }
        check_len(Operand::LoraA, checked_len(rank, in_features)?, a.len())?;
        check_len(Operand::LoraB, checked_len(out_features, rank)?, b.len())?;
        Ok(Self {
            weight,
            bias,
            a,
            b,
            in_features,
            out_features,
            rank,
            scale,
            init: config.init,
            merged: false,
            backup: None,
        })
    }

    /// Initializes a fresh adapter: `A` by the configured [`LoraInit`]
    /// (Kaiming-uniform `U(-1/sqrt(in), 1/sqrt(in))` or `N(0, 1/r^2)`), and
    /// `B = 0`, so that `B A = 0` and the layer's output equals the base's
    /// (the seed's mistake 2).
    ///
    /// # Errors
    /// [`Error::MergedAdapterLocked`] on a merged layer (nothing changes).
    pub fn init_adapter(&mut self, rng: &mut Rng) -> Result<()> {
        if self.merged {
            return Err(Error::MergedAdapterLocked);
        }
        match self.init {
            LoraInit::KaimingUniform => {
                let bound = 1.0 / libm::sqrt(self.in_features as f64);
                rng.fill_uniform(self.a, -bound, bound);
            }
            LoraInit::Gaussian => rng.fill_normal(self.a, 1.0 / self.rank as f64),
        }
        self.b.fill(E::ZERO);
        Ok(())
    }

    /// Input features `in`.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features `out`.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale `s` (in f64; the arithmetic rounds it to `E::Accum`).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Whether `s B A` is currently merged into `W`.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// The base weight `W [out, in]` (merged or not, as [`is_merged`](Self::is_merged) says).
    pub fn weight(&self) -> &[E] {
        self.weight
    }

    /// The base bias `[out]`, if any.
    pub fn bias(&self) -> Option<&[E]> {
        self.bias
    }

    /// `A [r, in]`.
    pub fn lora_a(&self) -> &[E] {
        self.a
    }

    /// `B [out, r]`.
    pub fn lora_b(&self) -> &[E] {
        self.b
    }

    /// `(A, B)` mutably, for an optimizer step or a load. The base weight is
    /// never reachable mutably this way.
    ///
    /// # Errors
    /// [`Error::MergedAdapterLocked`] while merged: changing `A` or `B` then
    /// would make the later unmerge subtract a different product.
    pub fn adapter_mut(&mut self) -> Result<(&mut [E], &mut [E])> {
        if self.merged {
            return Err(Error::MergedAdapterLocked);
        }
        Ok((self.a, self.b))
    }

    /// Trainable and frozen parameter counts of this layer.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self) -> Result<ParamReport> {
        ParamReport::for_layer(self.in_features, self.out_features, self.rank, self.bias.is_some())
    }

    /// The scale in the accumulation type.
    pub(super) fn scale_accum(&self) -> E::Accum {
        <E::Accum as Element>::from_f64(self.scale)
    }
}
