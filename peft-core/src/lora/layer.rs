//! [`Lora`]: the adapter tensors `A [r, in]`, `B [out, r]` and their scale.
use core::marker::PhantomData;

use super::backward::LoraGrads;
use super::config::{LoraConfig, LoraInit};
use super::params::ParamReport;
use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::{MatRef, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};
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
/// number of adapters; only [`merge_into`](crate::method::WeightUpdate::merge_into) writes a base
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
    pub(super) bias: Option<S>,
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
        Ok(Self { a, b, in_features, out_features, rank, scale, init: config.init, bias: None, _element: PhantomData })
    }

    /// The adapter with PEFT's `lora_bias` (`lora_B`'s bias, `[out]`):
    /// `y += s lora_bias`, and a merge adds `s lora_bias` to the layer's
    /// bias.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Bias`) for a vector of another length.
    pub fn with_lora_bias(mut self, bias: S) -> Result<Self> {
        check_len(Operand::Bias, self.out_features, bias.as_ref().len())?;
        self.bias = Some(bias);
        Ok(self)
    }

    /// The adapter with the scale `s` given as resolved (PEFT resolves it
    /// per module: `rank_pattern`, `alpha_pattern`, rsLoRA, a combination's
    /// weight) instead of the config's `alpha / r`.
    ///
    /// # Errors
    /// [`Error::InvalidAlpha`] for a non-finite scale.
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        if !scale.is_finite() {
            return Err(Error::InvalidAlpha);
        }
        self.scale = scale;
        Ok(self)
    }

    /// PEFT's `lora_bias` `[out]`, when the adapter has one.
    pub fn lora_bias(&self) -> Option<&[E]> {
        self.bias.as_ref().map(AsRef::as_ref)
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
    /// [`Merged`](crate::method::Merged) guard borrows the adapter, this does not
    /// compile: the unmerge would subtract a different product.
    pub fn adapter_mut(&mut self) -> (&mut [E], &mut [E]) {
        (self.a.as_mut(), self.b.as_mut())
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Lora<E, S> {
    type Grads<'g>
        = LoraGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// [`forward_scratch_len`] at this adapter's rank: `tokens r`.
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        forward_scratch_len(tokens, self.rank)
    }

    /// [`backward_scratch_len`] at this adapter's rank: `2 tokens r`.
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        backward_scratch_len(tokens, self.rank)
    }

    /// `grads.a [r, in]`, `grads.b [out, r]`, `grads.bias [out]` (only
    /// for an adapter with `lora_bias`).
    fn check_grads(&self, grads: &LoraGrads<'_, E>) -> Result<()> {
        check_len(Operand::GradA, checked_len(self.rank, self.in_features)?, grads.a.len())?;
        check_len(Operand::GradB, checked_len(self.out_features, self.rank)?, grads.b.len())?;
        if let Some(g) = &grads.bias {
            let want = if self.bias.is_some() { self.out_features } else { 0 };
            check_len(Operand::Bias, want, g.len())?;
        }
        Ok(())
    }

    /// `y = x W^T + b + s (x A^T) B^T (+ s lora_bias)` (see
    /// the [module docs](super)).
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        base.forward(backend, x, y.rb_mut())?;
        self.add_low_rank(backend, x, y, 1.0, scratch)
    }

    /// `dA`, `dB` (and `d lora_bias`) accumulated, `dL/dx = G W + s (G B)
    /// A` (see the [module docs](super)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        match grad_x {
            Some(mut gx) => {
                base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
                self.low_rank_backward(backend, x, grad_y, Some(gx), Some(grads), 1.0, scratch)
            }
            None => self.low_rank_backward(backend, x, grad_y, None, Some(grads), 1.0, scratch),
        }
    }
}
