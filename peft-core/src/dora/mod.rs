//! DoRA (Liu et al., 2024): LoRA with a learned magnitude per output row.
//!
//! ```text
//! V = W + s B A                     [out, in]
//! n = ||V||_row                     [out]   (L2 norm of each output row; no gradient flows through it)
//! y = b + (m / n) * (x W^T + s (x A^T) B^T)       (per output feature)
//! merged:  W' = (m / n)[:, None] * V,   b' = b
//! x [tokens, in]   W [out, in]   A [r, in]   B [out, r]   m [out]   y [tokens, out]
//! ```
//!
//! as PEFT's `DoraLinearLayer` computes it, with PEFT's choices: the bias is
//! not scaled, and `n` is detached (`weight_norm.detach()`), so `dm`, `dA`
//! and `dB` are the gradients of the formula with `n` held constant. The
//! magnitude starts as `m = ||W||_row` with `B = 0`, so a fresh adapter is
//! the base exactly (`m / n = 1`).
//!
//! **The norms are cached.** `n` depends on `W`, `A` and `B` only, so
//! [`Dora::refresh_norms`] computes it once (row block by row block, from
//! [`FrozenLinear::rows`]: the exact `W + s B A`, no cancellation) and
//! every forward and backward reads the cache. Changing `A` or `B` through
//! [`Dora::adapter_mut`] marks the cache stale, and a pass over a stale
//! cache is refused ([`Error::InvalidParameter`] `"DoRA norms"`) rather
//! than run with old norms. The cache is the caller's storage `C` (`[out]`
//! elements), so an adapter held in flash still has somewhere to keep it.
//! It belongs to the base it was computed over: refreshing over one base
//! and running over another is the caller's error to avoid.
//!
//! A row whose norm is 0 divides by zero, as in PEFT (which adds no
//! epsilon either): the output is infinite or NaN there.
//!
//! * The passes (sections below), behind [`LinearAdapter`], and the
//!   [`WeightUpdate`](crate::method::WeightUpdate) that merges through the
//!   one guard. [`LinearAdapter::prepare`] is
//!   [`Dora::refresh_norms`].
//!
//! ## DoRA forward pass
//!
//! ```text
//! z = x W^T + s (x A^T) B^T          (LoRA's product, without the bias)
//! y = (m / n) * z + b                (per output feature; n from the cache)
//! ```
//!
//! PEFT's order: the base and low-rank products first, then the magnitude
//! scale, then the bias, which DoRA never scales.
//!
//! ## DoRA backward pass
//!
//! With `z = x W^T + s (x A^T) B^T`, `y = b + (m / n) * z`, `n` held
//! constant (PEFT detaches it) and `G = dL/dy`:
//!
//! ```text
//! dL/dm_j = sum_t G_tj z_tj / n_j             [out]
//! G'      = G * (m / n)                       [tokens, out]   (per column)
//! dL/dA, dL/dB, dL/dx = LoRA's backward with G' in place of G
//!         (dB = s G'^T (x A^T),  dA = s (G' B)^T x,  dx = G' W + s (G' B) A)
//! ```
//!
//! Each formula is checked against central differences in `peft-verify`.
//!
//! ## Merging a DoRA adapter into its base weight: DoRA's
//!
//! [`WeightUpdate`](crate::method::WeightUpdate), row block by row block.
//!
//! ```text
//! merge:    V = W + s B A;  n = ||V||_row;  W <- (m / n)[:, None] * V
//! unmerge:  W <- backup                                  (bit-exact)
//!       or  W <- (n / m)[:, None] * W - s B A             (needs m != 0)
//! ```
//!
//! The norms are those of the weight being merged (formed here, row by
//! row), not the adapter's cache: a weight that already holds another
//! adapter's merge is normalized as it is, which is PEFT's order for
//! several adapters on one layer. The merge keeps each row's `n` at the
//! front of its scratch (`[rows]`), and the unmerge reads it back: the one
//! guard ([`Merged`](crate::method::Merged)) hands it the same scratch.
//! Without a backup the restore rounds three times per weight (the scale
//! back, then `- s B A`), so it drifts by a few units in the last place; a
//! zero magnitude would make it impossible, so a merge without a backup
//! refuses one.

mod backward;
mod forward;
mod merge;
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, check_scratch};
use crate::lora::{Lora, LoraConfig, ParamReport};
use crate::matrix::{MatMut, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};
use crate::rng::Rng;

pub use backward::{DoraGrads, backward_scratch_len};
pub use forward::forward_scratch_len;

/// A DoRA adapter for a linear layer `in -> out`: LoRA's `A [r, in]` and
/// `B [out, r]`, the magnitude `m [out]` (storage `S`), and the cached row
/// norms `n [out]` of `W + s B A` (storage `C`).
#[derive(Clone, Debug)]
pub struct Dora<E, S, C> {
    pub(crate) lora: Lora<E, S>,
    pub(crate) magnitude: S,
    pub(crate) norms: C,
    pub(crate) fresh: bool,
}

/// Scratch (elements) [`Dora::refresh_norms`] needs to read `rows` rows at
/// a time over `base`: `rows * in` for `V`, plus what
/// [`FrozenLinear::rows`] needs.
pub fn refresh_scratch_len<E: Element, L: FrozenLinear<E> + ?Sized>(base: &L, rows: usize) -> usize {
    rows.saturating_mul(base.in_features()).saturating_add(base.rows_scratch_len(rows))
}

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]>> Dora<E, S, C> {
    /// A DoRA adapter over `a [r, in]`, `b [out, r]`, `magnitude [out]`
    /// (which keep their values) and a norm cache `norms [out]`, stale
    /// until [`refresh_norms`](Self::refresh_norms).
    ///
    /// # Errors
    /// As [`Lora::new`]; [`Error::ShapeMismatch`] (`Parameter`) for a
    /// magnitude or cache of the wrong length.
    pub fn new(
        config: &LoraConfig<'_>,
        in_features: usize,
        out_features: usize,
        a: S,
        b: S,
        magnitude: S,
        norms: C,
    ) -> Result<Self> {
        let lora = Lora::new(config, in_features, out_features, a, b)?;
        check_len(Operand::Parameter, out_features, magnitude.as_ref().len())?;
        check_len(Operand::Parameter, out_features, norms.as_ref().len())?;
        Ok(Self { lora, magnitude, norms, fresh: false })
    }

    /// The adapter with the scale `s` given as resolved (see
    /// [`Lora::with_scale`]); the norm cache becomes stale.
    ///
    /// # Errors
    /// [`Error::InvalidAlpha`] for a non-finite scale.
    pub fn with_scale(mut self, scale: f64) -> Result<Self> {
        self.lora = self.lora.with_scale(scale)?;
        self.fresh = false;
        Ok(self)
    }

    /// The LoRA part (`A`, `B`, the scale).
    pub fn lora(&self) -> &Lora<E, S> {
        &self.lora
    }

    /// The magnitude `m [out]`.
    pub fn magnitude(&self) -> &[E] {
        self.magnitude.as_ref()
    }

    /// The cached norms `n [out]` (meaningful when [`is_fresh`](Self::is_fresh)).
    pub fn norms(&self) -> &[E] {
        self.norms.as_ref()
    }

    /// Whether the norm cache matches the current `A` and `B`.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Trainable (`r (in + out) + out`) and frozen parameter counts on a
    /// base with or without a bias.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        let lora = self.lora.param_report(bias)?;
        let trainable = lora.trainable.checked_add(self.lora.out_features()).ok_or(Error::Overflow)?;
        Ok(ParamReport { trainable, base: lora.base })
    }

    /// `Err` unless the cache is fresh.
    pub(crate) fn check_fresh(&self) -> Result<()> {
        if self.fresh {
            Ok(())
        } else {
            Err(Error::InvalidParameter {
                name: "DoRA norms",
                rule: "are stale: call refresh_norms after changing A or B (or after new)",
            })
        }
    }

    /// `m_j / n_j` in the accumulation type.
    pub(crate) fn ratio(&self, j: usize) -> E::Accum {
        let m = self.magnitude.as_ref().get(j).map_or(0.0, |v| v.to_f64());
        let n = self.norms.as_ref().get(j).map_or(0.0, |v| v.to_f64());
        <E::Accum as Element>::from_f64(m / n)
    }
}

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]> + AsMut<[E]>> Dora<E, S, C> {
    /// Computes the cache `n = ||W + s B A||_row` over `base`, reading
    /// `rows` rows of `W` at a time, where `rows` is as many as `scratch`
    /// holds ([`refresh_scratch_len`]`(base, rows)`, at least one row).
    /// Each norm is summed in f64 and rounded once.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`) for a base of another shape,
    /// [`Error::ScratchTooSmall`] for less than one row's scratch, before
    /// anything is written; the backend's own errors (the cache is then
    /// stale).
    pub fn refresh_norms<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &mut self,
        backend: &B,
        base: &L,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (n_in, n_out) = (self.lora.in_features(), self.lora.out_features());
        check_len(Operand::Weight, n_in, base.in_features())?;
        check_len(Operand::Weight, n_out, base.out_features())?;
        let one_row = refresh_scratch_len(base, 1);
        check_scratch(one_row, scratch.len())?;
        let mut rows = 1;
        while rows < n_out && refresh_scratch_len(base, rows * 2) <= scratch.len() {
            rows *= 2;
        }
        self.fresh = false;
        let (a, b) = self.lora.views()?;
        let s = self.lora.scale_times(1.0);
        let mut start = 0;
        while start < n_out {
            let n = rows.min(n_out - start);
            let (v_buf, rest) = scratch.split_at_mut(checked_len(n, n_in)?.min(scratch.len()));
            let mut v = MatMut::new(v_buf, n, n_in)?;
            base.rows(backend, start, v.rb_mut(), rest)?;
            let b_rows = b.rows_range(start, n).ok_or(Error::Overflow)?;
            backend.gemm(v.rb_mut(), Accum::Add, b_rows, Op::N, a, Op::N, s)?;
            for (k, row) in v.row_iter_mut().enumerate() {
                let sq: f64 = row.iter().map(|x| x.to_f64() * x.to_f64()).sum();
                if let Some(dst) = self.norms.as_mut().get_mut(start + k) {
                    *dst = E::from_f64(libm::sqrt(sq));
                }
            }
            start += n;
        }
        self.fresh = true;
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>, C: AsRef<[E]> + AsMut<[E]>> Dora<E, S, C> {
    /// `(A, B, m)` mutably, for an optimizer step or a load. Marks the norm
    /// cache stale (a new `A` or `B` changes `n`): call
    /// [`refresh_norms`](Self::refresh_norms) before the next pass.
    pub fn adapter_mut(&mut self) -> (&mut [E], &mut [E], &mut [E]) {
        self.fresh = false;
        let (a, b) = self.lora.adapter_mut();
        (a, b, self.magnitude.as_mut())
    }

    /// Initializes a fresh adapter as PEFT does: `A` and `B` as LoRA's
    /// ([`Lora::init_adapter`]: `B = 0`), then `m = n = ||W||_row`, so the
    /// adapted layer equals the base (`m / n = 1` exactly).
    ///
    /// # Errors
    /// As [`refresh_norms`](Self::refresh_norms).
    pub fn init_adapter<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &mut self,
        backend: &B,
        base: &L,
        rng: &mut Rng,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        self.lora.init_adapter(rng);
        self.refresh_norms(backend, base, scratch)?;
        self.magnitude.as_mut().copy_from_slice(self.norms.as_ref());
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]> + AsMut<[E]>> LinearAdapter<E> for Dora<E, S, C> {
    type Grads<'g>
        = DoraGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.lora.in_features()
    }

    fn out_features(&self) -> usize {
        self.lora.out_features()
    }

    /// [`forward_scratch_len`]: LoRA's, `tokens r`.
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        forward_scratch_len(tokens, self.lora.rank())
    }

    /// [`backward_scratch_len`]: `2 tokens out + 2 tokens r`.
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        backward_scratch_len(tokens, self.lora.out_features(), self.lora.rank())
    }

    /// LoRA's `A`, `B` buffers (`GradA`, `GradB`), `m [out]` (`Parameter`).
    fn check_grads(&self, grads: &DoraGrads<'_, E>) -> Result<()> {
        let (r, n_in, n_out) = (self.lora.rank(), self.lora.in_features(), self.lora.out_features());
        check_len(Operand::GradA, checked_len(r, n_in)?, grads.a.len())?;
        check_len(Operand::GradB, checked_len(n_out, r)?, grads.b.len())?;
        check_len(Operand::Parameter, n_out, grads.magnitude.len())
    }

    /// [`refresh_scratch_len`] for the whole base in one block (a smaller
    /// scratch given to [`Dora::refresh_norms`] works in smaller blocks).
    fn prepare_scratch_len<L: FrozenLinear<E> + ?Sized>(&self, base: &L) -> usize {
        refresh_scratch_len(base, self.lora.out_features())
    }

    /// [`Dora::refresh_norms`].
    fn prepare<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &mut self,
        backend: &B,
        base: &L,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        self.refresh_norms(backend, base, scratch)
    }

    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        self.forward_cached(pass)
    }

    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        self.backward_cached(pass)
    }
}

#[cfg(test)]
mod tests;
