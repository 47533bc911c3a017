//! AdaLoRA (Zhang et al., 2023): LoRA in the form of a singular value
//! decomposition, `P diag(lambda) Q`, as PEFT's `adalora.SVDLinear`
//! computes it.
//!
//! ```text
//! A [k, in]   (right singular vectors, PEFT's lora_A)
//! E [k]       (singular values, PEFT's lora_E [k, 1])
//! B [out, k]  (left singular vectors, PEFT's lora_B)
//! s = scaling / (ranknum + 1e-5),  scaling = lora_alpha (or ranknum if lora_alpha <= 0)
//! dW = s B diag(E) A                                   [out, in]
//! y  = x W^T + b + s ((x A^T) * E) B^T
//! merged: W' = W + dW, b' = b
//! ```
//!
//! `k` is the module's kept rank: `init_r` before PEFT's budget allocation,
//! and after it the number of triplets the allocation kept (PEFT saves only
//! those, so `k` differs between modules and may be 0). `ranknum` is *not*
//! `k`: PEFT keeps it at `init_r` for every module, before and after the
//! allocation and through a reload (`resize_modules_by_rank_pattern` copies
//! the old value back), and does not save it. `ranknum + 1e-5` is an f32
//! sum in PEFT (`ranknum` is an f32 tensor); [`scale`] rounds it the same
//! way.
//!
//! The backward, with `h = x A^T` `[tokens, k]` and `G = dL/dy`:
//!
//! ```text
//! dB = s G^T (h * E)                     [out, k]
//! u  = s G B                             [tokens, k]
//! dE_j = sum_t u_tj h_tj
//! dA = (u * E)^T x                       [k, in]
//! dx = G W + (u * E) A
//! ```
//!
//! PEFT's fresh adapter: `E = 0` (so `dW = 0` and the adapted layer is the
//! base exactly), `A` and `B` drawn from `N(0, 0.02^2)`. PEFT's training
//! adds an orthogonality penalty on `A` and `B` and reallocates ranks by
//! zeroing entries of `E`; both act on the loss and the schedule, not on
//! this layer, which runs, merges and differentiates any saved state.
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::ia3::{column_dots, scale_columns};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};
use crate::rng::Rng;

/// The standard deviation of PEFT's `A` and `B` at initialization.
pub const INIT_STD: f64 = 0.02;

/// PEFT's factor `s = scaling / (ranknum + 1e-5)`, with `scaling =
/// lora_alpha` when `lora_alpha > 0` and `ranknum` otherwise, and
/// `ranknum + 1e-5` summed in f32 as PEFT does. `ranknum` is the config's
/// `init_r` (see the [module docs](self)).
///
/// # Errors
/// [`Error::InvalidParameter`] for `init_r = 0` with `lora_alpha <= 0`
/// (PEFT's scaling would be 0 over 1e-5), or a non-finite `lora_alpha`.
pub fn scale(lora_alpha: f64, init_r: usize) -> Result<f64> {
    if !lora_alpha.is_finite() {
        return Err(Error::InvalidParameter { name: "lora_alpha", rule: "must be finite" });
    }
    let ranknum = init_r as f32;
    let scaling = if lora_alpha > 0.0 { lora_alpha } else { f64::from(ranknum) };
    if scaling == 0.0 {
        return Err(Error::InvalidParameter { name: "init_r", rule: "must be at least 1 when lora_alpha <= 0" });
    }
    Ok(scaling / f64::from(ranknum + 1e-5f32))
}

/// An AdaLoRA adapter for a linear layer `in -> out` of kept rank `k`:
/// `A [k, in]`, `E [k]`, `B [out, k]` and the factor `s` ([`scale`]).
#[derive(Clone, Debug)]
pub struct AdaLora<E, S> {
    a: S,
    e: S,
    b: S,
    rank: usize,
    in_features: usize,
    out_features: usize,
    scale: f64,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of an AdaLoRA adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct AdaLoraGrads<'g, E> {
    /// `dL/dA` `[k, in]`.
    pub a: &'g mut [E],
    /// `dL/dE` `[k]`.
    pub e: &'g mut [E],
    /// `dL/dB` `[out, k]`.
    pub b: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> AdaLora<E, S> {
    /// An AdaLoRA adapter of kept rank `rank` (0 is allowed: PEFT's
    /// allocation can keep nothing of a module, which then adds nothing)
    /// over `a [rank, in]`, `e [rank]`, `b [out, rank]`, which keep their
    /// values, with the factor `scale` (PEFT's: [`scale`]).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`LoraA`, `Parameter`, `LoraB`) for a
    /// tensor of the wrong length; [`Error::InvalidParameter`] for a
    /// non-finite `scale`; [`Error::Overflow`].
    pub fn new(rank: usize, in_features: usize, out_features: usize, scale: f64, a: S, e: S, b: S) -> Result<Self> {
        check_len(Operand::LoraA, checked_len(rank, in_features)?, a.as_ref().len())?;
        check_len(Operand::Parameter, rank, e.as_ref().len())?;
        check_len(Operand::LoraB, checked_len(out_features, rank)?, b.as_ref().len())?;
        if !scale.is_finite() {
            return Err(Error::InvalidParameter { name: "AdaLoRA scale", rule: "must be finite" });
        }
        Ok(Self { a, e, b, rank, in_features, out_features, scale, _element: PhantomData })
    }

    /// `A` `[k, in]`.
    pub fn a(&self) -> &[E] {
        self.a.as_ref()
    }

    /// `E` `[k]`.
    pub fn e(&self) -> &[E] {
        self.e.as_ref()
    }

    /// `B` `[out, k]`.
    pub fn b(&self) -> &[E] {
        self.b.as_ref()
    }

    /// The kept rank `k`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The factor `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Trainable (`k (in + out + 1)`) and frozen (the base's) parameter
    /// counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        let per = self.in_features.checked_add(self.out_features).and_then(|n| n.checked_add(1));
        let trainable = per.and_then(|n| n.checked_mul(self.rank)).ok_or(Error::Overflow)?;
        ParamReport::over_base(trainable, self.in_features, self.out_features, bias)
    }

    fn views(&self) -> Result<(MatRef<'_, E>, MatRef<'_, E>)> {
        let a = MatRef::new(self.a.as_ref(), self.rank, self.in_features)?;
        let b = MatRef::new(self.b.as_ref(), self.out_features, self.rank)?;
        Ok((a, b))
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for AdaLora<E, S> {
    type Grads<'g>
        = AdaLoraGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// `tokens k` (saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.rank)
    }

    /// `2 tokens k` (saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.rank).saturating_mul(2)
    }

    /// `A`, `E`, `B`'s lengths (`Gradient`).
    fn check_grads(&self, grads: &AdaLoraGrads<'_, E>) -> Result<()> {
        check_len(Operand::Gradient, self.a.as_ref().len(), grads.a.len())?;
        check_len(Operand::Gradient, self.rank, grads.e.len())?;
        check_len(Operand::Gradient, self.b.as_ref().len(), grads.b.len())
    }

    /// `y = x W^T + b + s ((x A^T) * E) B^T`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        base.forward(backend, x, y.rb_mut())?;
        if self.rank == 0 {
            return Ok(());
        }
        let (a, b) = self.views()?;
        let h_buf = scratch.get_mut(..checked_len(x.rows(), self.rank)?).unwrap_or(&mut []);
        let mut h = MatMut::new(h_buf, x.rows(), self.rank)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        backend.gemm(h.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
        scale_columns(&mut h, self.e.as_ref());
        backend.gemm(y, Accum::Add, h.as_ref(), Op::N, b, Op::T, <E::Accum as Element>::from_f64(self.scale))
    }

    /// Accumulates the gradients of `A`, `E` and `B` and, if `grad_x` is
    /// given, writes `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (t, k, n_in, n_out) = (x.rows(), self.rank, self.in_features, self.out_features);
        let mut grad_x = grad_x;
        if let Some(gx) = grad_x.as_mut() {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
        }
        if k == 0 {
            return Ok(());
        }
        let (a, b) = self.views()?;
        let tk = checked_len(t, k)?;
        let (h_buf, rest) = split_scratch(scratch, tk)?;
        let u_buf = rest.get_mut(..tk).unwrap_or(&mut []);
        let one = <E::Accum as Element>::from_f64(1.0);
        let s = <E::Accum as Element>::from_f64(self.scale);
        // h = x A^T; u holds h * E for dB = s G^T (h * E).
        let mut h = MatMut::new(h_buf, t, k)?;
        backend.gemm(h.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
        let mut u = MatMut::new(u_buf, t, k)?;
        u.rb_mut().into_slice().copy_from_slice(h.as_ref().as_slice());
        scale_columns(&mut u, self.e.as_ref());
        let gb = MatMut::new(&mut *grads.b, n_out, k)?;
        backend.gemm(gb, Accum::Add, grad_y, Op::T, u.as_ref(), Op::N, s)?;
        // u = s G B; dE_j += sum_t u_tj h_tj; then u * E.
        backend.gemm(u.rb_mut(), Accum::Replace, grad_y, Op::N, b, Op::N, s)?;
        column_dots(grads.e, u.as_ref(), h.as_ref());
        scale_columns(&mut u, self.e.as_ref());
        let ga = MatMut::new(&mut *grads.a, k, n_in)?;
        backend.gemm(ga, Accum::Add, u.as_ref(), Op::T, x, Op::N, one)?;
        if let Some(gx) = grad_x {
            backend.gemm(gx, Accum::Add, u.as_ref(), Op::N, a, Op::N, one)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> DeltaRows<E> for AdaLora<E, S> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// `rows k`: the block's rows of `B diag(E)`.
    fn delta_scratch_len(&self, rows: usize) -> usize {
        rows.saturating_mul(self.rank)
    }

    /// Rows `start..start + n` of `factor * dW`, `dW = s B diag(E) A`.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, mut dst, accum, factor, scratch } = block;
        let (n, k) = (dst.rows(), self.rank);
        if k == 0 {
            if accum == Accum::Replace {
                dst.rb_mut().into_slice().fill(E::ZERO);
            }
            return Ok(());
        }
        let (a, b) = self.views()?;
        let b = b.rows_range(start, n).ok_or(Error::Overflow)?;
        // Be = B[rows] diag(E), each entry rounded once.
        let be_buf = scratch.get_mut(..checked_len(n, k)?).unwrap_or(&mut []);
        let mut be = MatMut::new(be_buf, n, k)?;
        for (row, br) in be.row_iter_mut().zip(b.row_iter()) {
            row.copy_from_slice(br);
        }
        scale_columns(&mut be, self.e.as_ref());
        let f = <E::Accum as Element>::from_f64(factor * self.scale);
        backend.gemm(dst, accum, be.as_ref(), Op::N, a, Op::N, f)
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>] AdaLora<E, S>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> AdaLora<E, S> {
    /// Initializes as PEFT does (`reset_lora_parameters`): `E = 0` (so `dW
    /// = 0`), `A` and `B` from `N(0, 0.02^2)` ([`INIT_STD`]), drawn from
    /// `rng` rather than torch's generator.
    pub fn init_adapter(&mut self, rng: &mut Rng) {
        self.e.as_mut().fill(E::ZERO);
        rng.fill_normal(self.a.as_mut(), INIT_STD);
        rng.fill_normal(self.b.as_mut(), INIT_STD);
    }

    /// `[A, E, B]` mutably, for an optimizer step or a load.
    pub fn tensors_mut(&mut self) -> [&mut [E]; 3] {
        [self.a.as_mut(), self.e.as_mut(), self.b.as_mut()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;

    #[test]
    fn scale_is_peft_s() {
        // PEFT: 12 / (torch.tensor([6.0]) + 1e-5). By hand: an f32 ulp in
        // [4, 8) is 2^-21, and 1e-5 / 2^-21 = 20.97 rounds to 21 ulps.
        let s = scale(12.0, 6).unwrap();
        assert_eq!(s, 12.0 / (6.0 + 21.0 * libm::ldexp(1.0, -21)));
        // lora_alpha <= 0: scaling = ranknum.
        assert_eq!(scale(0.0, 4).unwrap(), 4.0 / f64::from(4.0f32 + 1e-5));
        assert!(scale(0.0, 0).is_err());
    }

    #[test]
    fn delta_and_forward_by_hand() {
        // k 2, 2 -> 1: A = [[1, 0], [0, 1]], E = [2, 3], B = [[1, 1]], s = 0.5:
        // dW = 0.5 [2, 3] = [1, 1.5].
        let ada = AdaLora::new(2, 2, 1, 0.5, &[1.0f64, 0.0, 0.0, 1.0][..], &[2.0, 3.0], &[1.0, 1.0]).unwrap();
        let mut dw = [0.0; 2];
        let mut sc = [0.0; 2];
        ada.delta_rows(&Reference, 0, MatMut::new(&mut dw, 1, 2).unwrap(), Accum::Replace, 1.0, &mut sc).unwrap();
        assert_eq!(dw, [1.0, 1.5]);
        // W = [1, 1], x = [2, -2]: x W^T = 0, x dW^T = 2 - 3 = -1.
        let w = [1.0, 1.0];
        let base = Dense::new(&w, 1, 2).unwrap();
        let mut y = [0.0];
        let x = MatRef::new(&[2.0, -2.0], 1, 2).unwrap();
        ada.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 1).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [-1.0]);
        // A module the allocation emptied adds nothing.
        let empty = AdaLora::new(0, 2, 1, 0.5, &[0.0f64; 0][..], &[], &[]).unwrap();
        empty.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 1).unwrap(), &mut []).unwrap();
        assert_eq!(y, [0.0]);
        assert!(matches!(
            AdaLora::new(2, 2, 1, 0.5, &[0.0f64; 4][..], &[0.0; 3], &[0.0; 2]),
            Err(Error::ShapeMismatch { operand: Operand::Parameter, expected: 2, found: 3 })
        ));
    }
}
