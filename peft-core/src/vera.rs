//! VeRA (Kopiczko et al., 2024): one pair of frozen random projections
//! shared by every adapted layer, and two trained scaling vectors per
//! layer, as PEFT's `vera.Linear` computes it.
//!
//! ```text
//! shared, frozen:  vera_A [r, max_in]    vera_B [max_out, r]
//! per layer:       A = vera_A[:, :in]    B = vera_B[:out, :]      (slices)
//!                  lambda_d [r]          lambda_b [out]           (trained)
//! dW = diag(lambda_b) B diag(lambda_d) A          [out, in]   (no alpha / r)
//! y  = x W^T + b + lambda_b * ((lambda_d * (x A^T)) B^T)
//! merged: W' = W + dW, b' = b
//! ```
//!
//! The projections are sized for the largest targeted layer and each layer
//! reads its leading slice, so layers of different shapes share one pair
//! (PEFT 0.21 does this; older versions required equal shapes). They live in
//! a [`VeraProjection`] that the passes borrow: the adapter itself is only
//! the two vectors, `r + out` numbers per layer.
//!
//! The backward, with `h = x A^T` `[tokens, r]`, `z = (h * lambda_d) B^T`
//! `[tokens, out]` and `G = dL/dy`:
//!
//! ```text
//! dlambda_b_j = sum_t G_tj z_tj
//! u = (G * lambda_b) B                       [tokens, r]
//! dlambda_d_k = sum_t u_tk h_tk
//! dx = G W + (u * lambda_d) A
//! ```
//!
//! `vera_A` and `vera_B` get no gradient: the passes take them by shared
//! reference.
//!
//! PEFT's fresh adapter: `lambda_b = 0` (so `dW = 0` and the adapted layer
//! is the base exactly), `lambda_d = d_initial` (0.1 by default); the
//! projections Kaiming-uniform (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))` with
//! fan_in their column count) from a generator seeded with
//! `projection_prng_key`. PEFT's generator is torch's, which this crate does
//! not reproduce: files carry the projections (`save_projection = true`), and
//! [`VeraProjection::init`] draws them from this crate's [`Rng`].
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::ia3::{column_dots, scale_columns};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};
use crate::rng::Rng;

/// PEFT's default `d_initial`: the starting value of every `lambda_d`.
pub const D_INITIAL: f64 = 0.1;

/// The shared frozen projections `vera_A [r, max_in]` and `vera_B
/// [max_out, r]` (row-major, as PEFT stores them).
#[derive(Clone, Debug)]
pub struct VeraProjection<E, P> {
    a: P,
    b: P,
    rank: usize,
    max_in: usize,
    max_out: usize,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, P: AsRef<[E]>> VeraProjection<E, P> {
    /// The projections over `a` (`[rank, max_in]`) and `b` (`[max_out,
    /// rank]`), which keep their values.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for rank 0; [`Error::ShapeMismatch`]
    /// (`LoraA`, `LoraB`) for a tensor of the wrong length;
    /// [`Error::Overflow`].
    pub fn new(rank: usize, max_in: usize, max_out: usize, a: P, b: P) -> Result<Self> {
        if rank == 0 {
            return Err(Error::InvalidRank { rank, max: max_in.min(max_out) });
        }
        check_len(Operand::LoraA, checked_len(rank, max_in)?, a.as_ref().len())?;
        check_len(Operand::LoraB, checked_len(max_out, rank)?, b.as_ref().len())?;
        Ok(Self { a, b, rank, max_in, max_out, _element: PhantomData })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The widest input the projections serve (`vera_A`'s columns).
    pub fn max_in(&self) -> usize {
        self.max_in
    }

    /// The widest output the projections serve (`vera_B`'s rows).
    pub fn max_out(&self) -> usize {
        self.max_out
    }

    /// `vera_A` `[r, max_in]`.
    pub fn a(&self) -> &[E] {
        self.a.as_ref()
    }

    /// `vera_B` `[max_out, r]`.
    pub fn b(&self) -> &[E] {
        self.b.as_ref()
    }

    /// `A = vera_A[:, :in]` (a strided view) and `B = vera_B[:out, :]`.
    fn slices(&self, n_in: usize, n_out: usize) -> Result<(MatRef<'_, E>, MatRef<'_, E>)> {
        let a = MatRef::with_stride(self.a.as_ref(), self.rank, n_in, self.max_in)?;
        let b = MatRef::new(self.b.as_ref().get(..n_out * self.rank).unwrap_or(&[]), n_out, self.rank)?;
        Ok((a, b))
    }
}

impl<E: Element, P: AsRef<[E]> + AsMut<[E]>> VeraProjection<E, P> {
    /// Draws both projections Kaiming-uniform, as PEFT's `_kaiming_init`
    /// (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, fan_in = `max_in` for
    /// `vera_A` and `r` for `vera_B`), from `rng` rather than torch's
    /// generator (see the [module docs](self)).
    pub fn init(&mut self, rng: &mut Rng) {
        let (bound_a, bound_b) = (1.0 / libm::sqrt(self.max_in as f64), 1.0 / libm::sqrt(self.rank as f64));
        rng.fill_uniform(self.a.as_mut(), -bound_a, bound_a);
        rng.fill_uniform(self.b.as_mut(), -bound_b, bound_b);
    }
}

/// A VeRA adapter for a linear layer `in -> out`: the trained vectors
/// `lambda_d [r]` and `lambda_b [out]`.
#[derive(Clone, Debug)]
pub struct Vera<E, S> {
    lambda_d: S,
    lambda_b: S,
    in_features: usize,
    out_features: usize,
    rank: usize,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of a VeRA adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct VeraGrads<'g, E> {
    /// `dL/dlambda_d` `[r]`.
    pub lambda_d: &'g mut [E],
    /// `dL/dlambda_b` `[out]`.
    pub lambda_b: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> Vera<E, S> {
    /// A VeRA adapter of rank `rank` over `lambda_d` (`[rank]`) and
    /// `lambda_b` (`[out]`), which keep their values.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for rank 0; [`Error::ShapeMismatch`]
    /// (`Parameter`) for a vector of the wrong length.
    pub fn new(rank: usize, in_features: usize, out_features: usize, lambda_d: S, lambda_b: S) -> Result<Self> {
        if rank == 0 {
            return Err(Error::InvalidRank { rank, max: in_features.min(out_features) });
        }
        check_len(Operand::Parameter, rank, lambda_d.as_ref().len())?;
        check_len(Operand::Parameter, out_features, lambda_b.as_ref().len())?;
        Ok(Self { lambda_d, lambda_b, in_features, out_features, rank, _element: PhantomData })
    }

    /// `lambda_d` `[r]`.
    pub fn lambda_d(&self) -> &[E] {
        self.lambda_d.as_ref()
    }

    /// `lambda_b` `[out]`.
    pub fn lambda_b(&self) -> &[E] {
        self.lambda_b.as_ref()
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Trainable (`r + out`) and frozen (the base's) parameter counts. The
    /// shared projections are counted once per model, not here.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        let trainable = self.rank.checked_add(self.out_features).ok_or(Error::Overflow)?;
        ParamReport::over_base(trainable, self.in_features, self.out_features, bias)
    }

    /// `Ok` if `proj` has this rank and covers the layer.
    fn check_projection<P: AsRef<[E]>>(&self, proj: &VeraProjection<E, P>) -> Result<()> {
        check_len(Operand::LoraA, self.rank, proj.rank)?;
        if self.in_features > proj.max_in {
            return Err(Error::ShapeMismatch {
                operand: Operand::LoraA,
                expected: self.in_features,
                found: proj.max_in,
            });
        }
        if self.out_features > proj.max_out {
            return Err(Error::ShapeMismatch {
                operand: Operand::LoraB,
                expected: self.out_features,
                found: proj.max_out,
            });
        }
        Ok(())
    }
}

/// A [`Vera`] adapter with the projections it reads, from [`Vera::bound`]:
/// the [`LinearAdapter`] (forward, backward) and the [`DeltaRows`] (merge).
#[derive(Debug)]
pub struct BoundVera<'a, E, S, P> {
    vera: &'a Vera<E, S>,
    proj: &'a VeraProjection<E, P>,
}

impl<E: Element, S: AsRef<[E]>> Vera<E, S> {
    /// This adapter over `proj`: what runs, trains and merges. Whether
    /// `proj` fits is checked by every pass and merge.
    pub fn bound<'a, P: AsRef<[E]>>(&'a self, proj: &'a VeraProjection<E, P>) -> BoundVera<'a, E, S, P> {
        BoundVera { vera: self, proj }
    }
}

impl<E: Element, S: AsRef<[E]>, P: AsRef<[E]>> LinearAdapter<E> for BoundVera<'_, E, S, P> {
    type Grads<'g>
        = VeraGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.vera.in_features
    }

    fn out_features(&self) -> usize {
        self.vera.out_features
    }

    /// `tokens (r + out)` (saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.vera.rank.saturating_add(self.vera.out_features))
    }

    /// `tokens (2 r + out)` (saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.vera.rank.saturating_mul(2).saturating_add(self.vera.out_features))
    }

    /// `lambda_d [r]`, `lambda_b [out]` (`Gradient`).
    fn check_grads(&self, grads: &VeraGrads<'_, E>) -> Result<()> {
        check_len(Operand::Gradient, self.vera.rank, grads.lambda_d.len())?;
        check_len(Operand::Gradient, self.vera.out_features, grads.lambda_b.len())
    }

    /// `y = x W^T + b + lambda_b * ((lambda_d * (x A^T)) B^T)`;
    /// [`Error::ShapeMismatch`] (`LoraA`, `LoraB`) for projections of
    /// another rank or too small for the layer, before anything is written.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (vera, proj) = (self.vera, self.proj);
        let (t, r, o) = (x.rows(), vera.rank, vera.out_features);
        vera.check_projection(proj)?;
        let (a, b) = proj.slices(vera.in_features, o)?;
        base.forward(backend, x, y.rb_mut())?;
        let (h_buf, rest) = scratch.split_at_mut(checked_len(t, r)?);
        let z_buf = rest.get_mut(..checked_len(t, o)?).unwrap_or(&mut []);
        let one = <E::Accum as Element>::from_f64(1.0);
        let mut h = MatMut::new(h_buf, t, r)?;
        backend.gemm(h.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
        scale_columns(&mut h, vera.lambda_d.as_ref());
        let mut z = MatMut::new(z_buf, t, o)?;
        backend.gemm(z.rb_mut(), Accum::Replace, h.as_ref(), Op::N, b, Op::T, one)?;
        for (yr, zr) in y.row_iter_mut().zip(z.as_ref().row_iter()) {
            for ((v, zv), lb) in yr.iter_mut().zip(zr).zip(vera.lambda_b.as_ref()) {
                *v = E::from_accum(v.to_accum() + lb.to_accum() * zv.to_accum());
            }
        }
        Ok(())
    }

    /// The gradients of `lambda_d` and `lambda_b` (formulas in the [module
    /// docs](self)); the projections get none. Refuses projections that do
    /// not fit, as the forward does.
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (vera, proj) = (self.vera, self.proj);
        let (t, r, o, i) = (x.rows(), vera.rank, vera.out_features, vera.in_features);
        vera.check_projection(proj)?;
        let (a, b) = proj.slices(i, o)?;
        let (tr, to) = (checked_len(t, r)?, checked_len(t, o)?);
        let (h_buf, rest) = scratch.split_at_mut(tr);
        let (u_buf, rest) = rest.split_at_mut(tr);
        let z_buf = rest.get_mut(..to).unwrap_or(&mut []);
        let one = <E::Accum as Element>::from_f64(1.0);
        // h = x A^T; z = (h * lambda_d) B^T (u holds h * lambda_d for now).
        let mut h = MatMut::new(h_buf, t, r)?;
        backend.gemm(h.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
        let mut u = MatMut::new(u_buf, t, r)?;
        u.rb_mut().into_slice().copy_from_slice(h.as_ref().as_slice());
        scale_columns(&mut u, vera.lambda_d.as_ref());
        let mut z = MatMut::new(z_buf, t, o)?;
        backend.gemm(z.rb_mut(), Accum::Replace, u.as_ref(), Op::N, b, Op::T, one)?;
        column_dots(grads.lambda_b, grad_y, z.as_ref());
        // u = (G * lambda_b) B; dlambda_d_k += sum_t u_tk h_tk.
        for (zr, gr) in z.row_iter_mut().zip(grad_y.row_iter()) {
            zr.copy_from_slice(gr);
        }
        scale_columns(&mut z, vera.lambda_b.as_ref());
        backend.gemm(u.rb_mut(), Accum::Replace, z.as_ref(), Op::N, b, Op::N, one)?;
        column_dots(grads.lambda_d, u.as_ref(), h.as_ref());
        // dx = G W + (u * lambda_d) A.
        if let Some(mut gx) = grad_x {
            scale_columns(&mut u, vera.lambda_d.as_ref());
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            backend.gemm(gx, Accum::Add, u.as_ref(), Op::N, a, Op::N, one)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>, P: AsRef<[E]>> DeltaRows<E> for BoundVera<'_, E, S, P> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.vera.out_features, self.vera.in_features)
    }

    /// `rows r`: the block's rows of `diag(lambda_b) B diag(lambda_d)`.
    fn delta_scratch_len(&self, rows: usize) -> usize {
        rows.saturating_mul(self.vera.rank)
    }

    /// Rows `start..start + n` of `factor * dW`, `dW = diag(lambda_b) B
    /// diag(lambda_d) A`; [`Error::ShapeMismatch`] (`LoraA`, `LoraB`) for
    /// projections that do not fit.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, dst, accum, factor, scratch } = block;
        let (vera, n) = (self.vera, dst.rows());
        let r = vera.rank;
        vera.check_projection(self.proj)?;
        let (a, b) = self.proj.slices(vera.in_features, vera.out_features)?;
        let b = b.rows_range(start, n).ok_or(Error::Overflow)?;
        let lambda_b = vera.lambda_b.as_ref().get(start..).unwrap_or(&[]);
        // Bs = diag(lambda_b) B diag(lambda_d), each entry rounded once.
        let bs_buf = scratch.get_mut(..n * r).unwrap_or(&mut []);
        let mut bs = MatMut::new(bs_buf, n, r)?;
        for ((row, br), lb) in bs.row_iter_mut().zip(b.row_iter()).zip(lambda_b) {
            for ((v, bv), ld) in row.iter_mut().zip(br).zip(vera.lambda_d.as_ref()) {
                *v = E::from_f64(lb.to_f64() * bv.to_f64() * ld.to_f64());
            }
        }
        backend.gemm(dst, accum, bs.as_ref(), Op::N, a, Op::N, <E::Accum as Element>::from_f64(factor))
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>, P: AsRef<[E]>] BoundVera<'_, E, S, P>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Vera<E, S> {
    /// Initializes as PEFT does: `lambda_b = 0` (so `dW = 0`), `lambda_d =
    /// d_initial` ([`D_INITIAL`] is PEFT's default).
    pub fn init_adapter(&mut self, d_initial: f64) {
        self.lambda_b.as_mut().fill(E::ZERO);
        self.lambda_d.as_mut().fill(E::from_f64(d_initial));
    }

    /// `[lambda_d, lambda_b]` mutably, for an optimizer step or a load.
    pub fn vectors_mut(&mut self) -> [&mut [E]; 2] {
        [self.lambda_d.as_mut(), self.lambda_b.as_mut()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;
    use crate::delta::DeltaRows;
    use crate::method::LinearAdapter;

    #[test]
    fn slices_and_delta_by_hand() {
        // r 1, projections for 3 -> 2: vera_A = [1, 2, 3], vera_B = [[2], [5]].
        // Layer 2 -> 1: A = [1, 2], B = [2]; lambda_d = [3], lambda_b = [0.5]:
        // dW = 0.5 * 2 * 3 * [1, 2] = [3, 6].
        let proj = VeraProjection::new(1, 3, 2, &[1.0f64, 2.0, 3.0][..], &[2.0, 5.0]).unwrap();
        let v = Vera::new(1, 2, 1, [3.0f64], [0.5]).unwrap();
        let mut dw = [0.0; 2];
        let mut sc = [0.0; 1];
        v.bound(&proj)
            .delta_rows(&Reference, 0, MatMut::new(&mut dw, 1, 2).unwrap(), Accum::Replace, 1.0, &mut sc)
            .unwrap();
        assert_eq!(dw, [3.0, 6.0]);
        // Forward, W = [1, 1], x = [1, -1]: x W^T = 0, x dW^T = 3 - 6 = -3.
        let w = [1.0, 1.0];
        let base = Dense::new(&w, 1, 2).unwrap();
        let mut y = [0.0];
        let mut sc = [0.0; 2];
        let x = MatRef::new(&[1.0, -1.0], 1, 2).unwrap();
        v.bound(&proj).forward(&Reference, &base, x, MatMut::new(&mut y, 1, 1).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [-3.0]);
        // A layer wider than the projections is refused.
        let wide = Vera::new(1, 4, 1, [1.0f64], [1.0]).unwrap();
        assert!(matches!(
            wide.bound(&proj).delta_rows(
                &Reference,
                0,
                MatMut::new(&mut [0.0; 4], 1, 4).unwrap(),
                Accum::Replace,
                1.0,
                &mut sc
            ),
            Err(Error::ShapeMismatch { operand: Operand::LoraA, expected: 4, found: 3 })
        ));
    }
}
