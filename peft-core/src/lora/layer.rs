//! [`Lora`]: the adapter tensors `A [r, in]`, `B [out, r]` and their scale.

use core::marker::PhantomData;

use super::config::{LoraConfig, LoraInit};
use super::params::ParamReport;
use crate::base::FrozenLinear;
use crate::element::Element;
#[cfg(doc)]
use crate::error::Error;
use crate::error::{Operand, Result, check_len};
use crate::matrix::{MatRef, checked_len};
use crate::rng::Rng;

/// Scratch elements [`Lora::forward`] needs for `tokens` rows of a rank-`rank`
/// adapter: `tokens * rank` (the product `x A^T`). Saturates at
/// `usize::MAX`, which no slice can satisfy. A `const fn`, so firmware can
/// size its buffers at compile time.
pub const fn forward_scratch_len(tokens: usize, rank: usize) -> usize {
    tokens.saturating_mul(rank)
}

/// Scratch elements [`Lora::backward`] needs: `2 * tokens * rank`
/// (`t = x A^T` and `u = G B`). Saturates at `usize::MAX`.
pub const fn backward_scratch_len(tokens: usize, rank: usize) -> usize {
    tokens.saturating_mul(rank).saturating_mul(2)
}

/// A LoRA adapter for a linear layer `in -> out`: `A [r, in]`, `B [out, r]`
/// and the scale `s`, and nothing else.
///
/// The frozen base is not part of the adapter. [`forward`](Lora::forward)
/// and [`backward`](Lora::backward) take it as a read-only
/// [`FrozenLinear`], so one base (in flash, or shared by threads) serves any
/// number of adapters; only [`merge_into`](Lora::merge_into) writes a base
/// weight, and it returns a guard that owns the weight until it is
/// restored.
///
/// `S` is the storage of `A` and `B`: `&[E]` to apply an adapter held in
/// flash, `&mut [E]` to train one in caller buffers, `Vec<E>` (feature
/// `alloc`) to own it, `[E; N]` for a fixed-size one. The adapter is `Send`
/// and `Sync` whenever `S` is.
#[derive(Clone, Debug)]
pub struct Lora<E, S> {
    pub(super) a: S,
    pub(super) b: S,
    pub(super) in_features: usize,
    pub(super) out_features: usize,
    pub(super) rank: usize,
    pub(super) scale: f64,
    pub(super) init: LoraInit,
    // `fn() -> E`: `E` is only a type tag here, so `Send` and `Sync`
    // follow `S` alone.
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>> Lora<E, S> {
    /// An adapter over `a [r, in]` and `b [out, r]`, which keep their
    /// values (so a loaded adapter can be wrapped); call
    /// [`init_adapter`](Self::init_adapter) for a fresh one.
    ///
    /// # Errors
    /// [`Error::InvalidRank`], [`Error::InvalidAlpha`] (see
    /// [`LoraConfig::validate`]); [`Error::ShapeMismatch`] (`LoraA`,
    /// `LoraB`) for a slice of the wrong length; [`Error::Overflow`].
    pub fn new(config: &LoraConfig<'_>, in_features: usize, out_features: usize, a: S, b: S) -> Result<Self> {
        let scale = config.validate(in_features, out_features)?;
        let rank = config.rank;
        check_len(Operand::LoraA, checked_len(rank, in_features)?, a.as_ref().len())?;
        check_len(Operand::LoraB, checked_len(out_features, rank)?, b.as_ref().len())?;
        Ok(Self { a, b, in_features, out_features, rank, scale, init: config.init, _element: PhantomData })
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

    /// `A [r, in]`.
    pub fn lora_a(&self) -> &[E] {
        self.a.as_ref()
    }

    /// `B [out, r]`.
    pub fn lora_b(&self) -> &[E] {
        self.b.as_ref()
    }

    /// Gives the storage back: `(A, B)`.
    pub fn into_parts(self) -> (S, S) {
        (self.a, self.b)
    }

    /// Trainable and frozen parameter counts of this adapter on a base
    /// with (`bias = true`) or without a bias.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::for_layer(self.in_features, self.out_features, self.rank, bias)
    }

    /// Scratch [`forward`](Self::forward) needs: [`forward_scratch_len`]
    /// at this adapter's rank.
    pub fn forward_scratch_len(&self, tokens: usize) -> usize {
        forward_scratch_len(tokens, self.rank)
    }

    /// Scratch [`backward`](Self::backward) needs: [`backward_scratch_len`]
    /// at this adapter's rank.
    pub fn backward_scratch_len(&self, tokens: usize) -> usize {
        backward_scratch_len(tokens, self.rank)
    }

    /// `factor * s` in the accumulation type (rounded once, from f64).
    pub(crate) fn scale_times(&self, factor: f64) -> E::Accum {
        <E::Accum as Element>::from_f64(factor * self.scale)
    }

    /// `A` and `B` as views.
    pub(crate) fn views(&self) -> Result<(MatRef<'_, E>, MatRef<'_, E>)> {
        Ok((
            MatRef::new(self.a.as_ref(), self.rank, self.in_features)?,
            MatRef::new(self.b.as_ref(), self.out_features, self.rank)?,
        ))
    }

    /// `Ok` if `base` is an `in -> out` layer like this adapter.
    pub(crate) fn check_base<L: FrozenLinear<E> + ?Sized>(&self, base: &L) -> Result<()> {
        check_len(Operand::Weight, self.in_features, base.in_features())?;
        check_len(Operand::Weight, self.out_features, base.out_features())
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Lora<E, S> {
    /// Initializes a fresh adapter: `A` by the configured [`LoraInit`]
    /// (Kaiming-uniform `U(-1/sqrt(in), 1/sqrt(in))` or `N(0, 1/r^2)`), and
    /// `B = 0`, so that `B A = 0` and the adapted layer's output equals the
    /// base's (mistake 2 in `peft_verify::mistakes`).
    pub fn init_adapter(&mut self, rng: &mut Rng) {
        match self.init {
            LoraInit::KaimingUniform => {
                let bound = 1.0 / libm::sqrt(self.in_features as f64);
                rng.fill_uniform(self.a.as_mut(), -bound, bound);
            }
            LoraInit::Gaussian => rng.fill_normal(self.a.as_mut(), 1.0 / self.rank as f64),
        }
        self.b.as_mut().fill(E::ZERO);
    }

    /// `(A, B)` mutably, for an optimizer step or a load. While a
    /// [`Merged`](super::Merged) guard borrows the adapter, this does not
    /// compile: the unmerge would subtract a different product.
    pub fn adapter_mut(&mut self) -> (&mut [E], &mut [E]) {
        (self.a.as_mut(), self.b.as_mut())
    }
}
