//! RandLoRA (Albert et al., 2025): a full-rank update from shared random
//! bases scaled by small trained vectors, as PEFT's `randlora.Linear`
//! computes it.
//!
//! ```text
//! shared bases (every layer): A [r, 1, min_dim], B [max_dim, n_b, r]
//! layer in -> out: mn = min(in, out), mx = max(in, out), nb = ceil(mn / r), J = r nb
//! lambda [r, nb], gamma [nb, mn] (trained)
//! UA [J, mn]: row j = k nb + b  holds  lambda[k, b] A[k, 0, :mn] * gamma[b, :]
//! UB [mx, J]: column j = b r + k  holds  B[:mx, b, k]
//! in <= out: dW = s UB UA [out, in];  in > out: dW = s (UB UA)^T;  s = randlora_alpha / r
//! y = x W^T + b + x dW^T;  merged: W' = W + dW, b' = b
//! ```
//!
//! PEFT contracts `UB`'s column `j` with `UA`'s row `j` although the two
//! index `(b, k)` and `(k, b)` in different orders; that pairing is PEFT's
//! and is kept (it is the "intended" one only when `nb = 1` or `r = 1`).
//!
//! The backward, with `G = dL/dy`; for `in <= out`, `h = x UA^T`, `dh = s
//! G UB`, `dUA = dh^T x`, `dx = G W + dh UA`; for `in > out`, `h = x UB`,
//! `dUA = s h^T G`, `dh = s G UA^T`, `dx = G W + dh UB^T`; then
//!
//! ```text
//! dlambda[k, b] = sum_c dUA[j, c] A[k, c] gamma[b, c]
//! dgamma[b, c]  = sum_k dUA[j, c] lambda[k, b] A[k, c]          (j = k nb + b)
//! ```
//!
//! PEFT's fresh adapter: `lambda = 0` (the base exactly), `gamma = 1 /
//! max(in, out)`. The bases are PEFT's, read from its file; regenerating
//! them from `projection_prng_key` needs torch's generator on bf16 and is
//! not done here.
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};

/// RandLoRA's shared frozen bases: `A [r, 1, min_dim]`, `B [max_dim, n_b,
/// r]`.
#[derive(Clone, Debug)]
pub struct RandLoraBases<E, P> {
    a: P,
    b: P,
    r: usize,
    min_dim: usize,
    max_dim: usize,
    n_b: usize,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, P: AsRef<[E]>> RandLoraBases<E, P> {
    /// The bases over `a [r, 1, min_dim]` and `b [max_dim, n_b, r]`.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for `r = 0`; [`Error::ShapeMismatch`]
    /// (`Parameter`) for lengths other than those; [`Error::Overflow`].
    pub fn new(r: usize, min_dim: usize, max_dim: usize, n_b: usize, a: P, b: P) -> Result<Self> {
        if r == 0 {
            return Err(Error::InvalidRank { rank: 0, max: 0 });
        }
        check_len(Operand::Parameter, checked_len(r, min_dim)?, a.as_ref().len())?;
        check_len(Operand::Parameter, checked_len(checked_len(max_dim, n_b)?, r)?, b.as_ref().len())?;
        Ok(Self { a, b, r, min_dim, max_dim, n_b, _element: PhantomData })
    }

    /// `A[k, 0, c]`.
    fn a(&self, k: usize, c: usize) -> f64 {
        self.a.as_ref().get(k * self.min_dim + c).map_or(0.0, |v| v.to_f64())
    }
}

/// A RandLoRA layer `in -> out` over shared bases: `lambda [r, nb]`,
/// `gamma [nb, mn]`.
#[derive(Clone, Debug)]
pub struct RandLora<'p, E, S, P> {
    bases: &'p RandLoraBases<E, P>,
    lambda: S,
    gamma: S,
    scaling: f64,
    in_features: usize,
    out_features: usize,
}

/// Gradient buffers of a RandLoRA layer, accumulated into (`+=`).
#[derive(Debug)]
pub struct RandLoraGrads<'g, E> {
    /// `dL/dlambda`.
    pub lambda: &'g mut [E],
    /// `dL/dgamma`.
    pub gamma: &'g mut [E],
}

impl<'p, E: Element, S: AsRef<[E]>, P: AsRef<[E]>> RandLora<'p, E, S, P> {
    /// A layer `in -> out` over `bases`, scaled by `scaling`
    /// (`randlora_alpha / r`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the bases do not cover the layer
    /// (`min(in, out)` above their `min_dim`, `max(in, out)` above
    /// `max_dim`, `nb` above `n_b`: `randlora_A`) or the scaling is not
    /// finite; [`Error::ShapeMismatch`] (`Parameter`) for `lambda`, `gamma`
    /// of the wrong lengths; [`Error::Overflow`].
    pub fn new(
        bases: &'p RandLoraBases<E, P>,
        in_features: usize,
        out_features: usize,
        scaling: f64,
        lambda: S,
        gamma: S,
    ) -> Result<Self> {
        let (mn, mx) = (in_features.min(out_features), in_features.max(out_features));
        let nb = mn.div_ceil(bases.r);
        if mn > bases.min_dim || mx > bases.max_dim || nb > bases.n_b {
            return Err(Error::InvalidParameter { name: "randlora_A", rule: "the shared bases must cover the layer" });
        }
        if !scaling.is_finite() {
            return Err(Error::InvalidParameter { name: "scaling", rule: "must be finite" });
        }
        check_len(Operand::Parameter, checked_len(bases.r, nb)?, lambda.as_ref().len())?;
        check_len(Operand::Parameter, checked_len(nb, mn)?, gamma.as_ref().len())?;
        Ok(Self { bases, lambda, gamma, scaling, in_features, out_features })
    }

    /// `lambda [r, nb]`.
    pub fn lambda(&self) -> &[E] {
        self.lambda.as_ref()
    }

    /// `gamma [nb, mn]`.
    pub fn gamma(&self) -> &[E] {
        self.gamma.as_ref()
    }

    /// Trainable (`r nb + nb mn`) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        let n = self.lambda.as_ref().len().checked_add(self.gamma.as_ref().len()).ok_or(Error::Overflow)?;
        ParamReport::over_base(n, self.in_features, self.out_features, bias)
    }

    /// `(mn, mx, nb, J)`.
    fn dims(&self) -> (usize, usize, usize, usize) {
        let (mn, mx) = (self.in_features.min(self.out_features), self.in_features.max(self.out_features));
        let nb = mn.div_ceil(self.bases.r);
        (mn, mx, nb, nb * self.bases.r)
    }

    /// `J mn`: `UA` (saturating).
    fn u_len(&self) -> usize {
        let (mn, _, _, j) = self.dims();
        j.saturating_mul(mn)
    }

    /// `UB [mx, J]`: a view of `B` itself, whose row `i` holds `B[i, b, k]`
    /// at `b r + k` (the first `nb` of its `n_b` blocks).
    fn ub(&self) -> Result<MatRef<'_, E>> {
        let (_, mx, _, j) = self.dims();
        MatRef::with_stride(self.bases.b.as_ref(), mx, j, checked_len(self.bases.n_b, self.bases.r)?)
    }

    /// `UA [J, mn]` from the front of `scratch`, `UB`, and the rest.
    fn factors<'w>(&'w self, scratch: &'w mut [E]) -> Result<(&'w mut [E], MatRef<'w, E>, &'w mut [E])> {
        let (mn, _, nb, _) = self.dims();
        let (ua, rest) = split_scratch(scratch, checked_len(nb * self.bases.r, mn)?)?;
        let (lam, gam) = (self.lambda.as_ref(), self.gamma.as_ref());
        for (jj, row) in ua.chunks_exact_mut(mn.max(1)).enumerate() {
            let (k, b) = (jj / nb.max(1), jj % nb.max(1));
            let l = lam.get(k * nb + b).map_or(0.0, |v| v.to_f64());
            for ((c, e), g) in row.iter_mut().enumerate().zip(gam.iter().skip(b * mn)) {
                *e = E::from_f64(l * self.bases.a(k, c) * g.to_f64());
            }
        }
        Ok((ua, self.ub()?, rest))
    }

    /// `dlambda`, `dgamma` `+=` from `dUA [J, mn]`.
    fn factor_grads(&self, dua: &[E], grads: RandLoraGrads<'_, E>) {
        let (mn, _, nb, _) = self.dims();
        let (lam, gam) = (self.lambda.as_ref(), self.gamma.as_ref());
        for (jj, row) in dua.chunks_exact(mn.max(1)).enumerate() {
            let (k, b) = (jj / nb.max(1), jj % nb.max(1));
            let l = lam.get(k * nb + b).map_or(0.0, |v| v.to_f64());
            let gb = gam.iter().skip(b * mn).take(mn);
            let mut dl = 0.0;
            for ((c, d), (g, dg)) in row.iter().enumerate().zip(gb.zip(grads.gamma.iter_mut().skip(b * mn))) {
                let (d, a) = (d.to_f64(), self.bases.a(k, c));
                dl += d * a * g.to_f64();
                *dg = E::from_f64(dg.to_f64() + d * l * a);
            }
            if let Some(e) = grads.lambda.get_mut(k * nb + b) {
                *e = E::from_f64(e.to_f64() + dl);
            }
        }
    }
}

impl<E: Element, S: AsRef<[E]>, P: AsRef<[E]>> LinearAdapter<E> for RandLora<'_, E, S, P> {
    type Grads<'g>
        = RandLoraGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// `UA` and `tokens J` (saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        self.u_len().saturating_add(tokens.saturating_mul(self.dims().3))
    }

    /// `UA`, `tokens J` twice and `dUA` (saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        let (mn, _, _, j) = self.dims();
        self.u_len().saturating_add(tokens.saturating_mul(j).saturating_mul(2)).saturating_add(j.saturating_mul(mn))
    }

    /// `lambda`'s and `gamma`'s lengths (`Gradient`).
    fn check_grads(&self, g: &RandLoraGrads<'_, E>) -> Result<()> {
        check_len(Operand::Gradient, self.lambda.as_ref().len(), g.lambda.len())?;
        check_len(Operand::Gradient, self.gamma.as_ref().len(), g.gamma.len())
    }

    /// `y = x W^T + b + s (x UA^T) UB^T` (`in <= out`) or `+ s (x UB) UA`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (t, (mn, _, _, j)) = (x.rows(), self.dims());
        base.forward(backend, x, y.rb_mut())?;
        let (ua, ub, rest) = self.factors(scratch)?;
        let (h, _) = split_scratch(rest, checked_len(t, j)?)?;
        let ua = MatRef::new(ua, j, mn)?;
        let (one, s) = (<E::Accum as Element>::from_f64(1.0), <E::Accum as Element>::from_f64(self.scaling));
        let mut hm = MatMut::new(h, t, j)?;
        if self.in_features <= self.out_features {
            backend.gemm(hm.rb_mut(), Accum::Replace, x, Op::N, ua, Op::T, one)?;
            backend.gemm(y, Accum::Add, hm.as_ref(), Op::N, ub, Op::T, s)
        } else {
            backend.gemm(hm.rb_mut(), Accum::Replace, x, Op::N, ub, Op::N, one)?;
            backend.gemm(y, Accum::Add, hm.as_ref(), Op::N, ua, Op::N, s)
        }
    }

    /// Accumulates `dL/dlambda`, `dL/dgamma` into `grads` and, if `grad_x`
    /// is given, writes `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (t, (mn, _, _, j)) = (x.rows(), self.dims());
        let (ua, ub, rest) = self.factors(scratch)?;
        let (h, rest) = split_scratch(rest, checked_len(t, j)?)?;
        let (dh, rest) = split_scratch(rest, checked_len(t, j)?)?;
        let (dua, _) = split_scratch(rest, checked_len(j, mn)?)?;
        let ua = MatRef::new(ua, j, mn)?;
        let (one, s) = (<E::Accum as Element>::from_f64(1.0), <E::Accum as Element>::from_f64(self.scaling));
        let (mut hm, mut dhm) = (MatMut::new(h, t, j)?, MatMut::new(dh, t, j)?);
        let small_in = self.in_features <= self.out_features;
        if small_in {
            // dh = s G UB, dUA = dh^T x.
            backend.gemm(dhm.rb_mut(), Accum::Replace, grad_y, Op::N, ub, Op::N, s)?;
            backend.gemm(MatMut::new(dua, j, mn)?, Accum::Replace, dhm.as_ref(), Op::T, x, Op::N, one)?;
        } else {
            // h = x UB, dUA = s h^T G, dh = s G UA^T.
            backend.gemm(hm.rb_mut(), Accum::Replace, x, Op::N, ub, Op::N, one)?;
            backend.gemm(MatMut::new(dua, j, mn)?, Accum::Replace, hm.as_ref(), Op::T, grad_y, Op::N, s)?;
            backend.gemm(dhm.rb_mut(), Accum::Replace, grad_y, Op::N, ua, Op::T, s)?;
        }
        self.factor_grads(dua, grads);
        if let Some(mut gx) = grad_x {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            if small_in {
                backend.gemm(gx, Accum::Add, dhm.as_ref(), Op::N, ua, Op::N, one)?;
            } else {
                backend.gemm(gx, Accum::Add, dhm.as_ref(), Op::N, ub, Op::T, one)?;
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>, P: AsRef<[E]>> DeltaRows<E> for RandLora<'_, E, S, P> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// `UA`.
    fn delta_scratch_len(&self, _rows: usize) -> usize {
        self.u_len()
    }

    /// Rows `start..start + n` of `factor * dW`: `s UB[rows] UA` (`in <=
    /// out`) or `s UA[:, rows]^T UB^T`.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, dst, accum, factor, scratch } = block;
        let (n, (mn, _, _, j)) = (dst.rows(), self.dims());
        let (ua, ub, _) = self.factors(scratch)?;
        let ua = MatRef::new(ua, j, mn)?;
        let f = <E::Accum as Element>::from_f64(self.scaling * factor);
        let rows = Error::ShapeMismatch { operand: Operand::Weight, expected: start + n, found: self.out_features };
        if self.in_features <= self.out_features {
            backend.gemm(dst, accum, ub.rows_range(start, n).ok_or(rows)?, Op::N, ua, Op::N, f)
        } else {
            backend.gemm(dst, accum, ua.cols_range(start, n).ok_or(rows)?, Op::T, ub, Op::T, f)
        }
    }
}

crate::delta::additive_update!(['p, E: Element, S: AsRef<[E]>, P: AsRef<[E]>] RandLora<'p, E, S, P>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>, P: AsRef<[E]>> RandLora<'_, E, S, P> {
    /// Initializes as PEFT does: `lambda = 0`, `gamma = 1 / max(in, out)`.
    pub fn init_adapter(&mut self) {
        self.lambda.as_mut().fill(E::ZERO);
        let g = E::from_f64(1.0 / self.in_features.max(self.out_features) as f64);
        self.gamma.as_mut().fill(g);
    }
}
