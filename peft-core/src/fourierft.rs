//! FourierFT (Gao et al., 2024): a weight update that is the real part of
//! the inverse 2D discrete Fourier transform of a sparse spectrum, as
//! PEFT's `fourierft.FourierFTLayer` computes it.
//!
//! ```text
//! rows[j], cols[j], w[j]   (j < n; w: PEFT's fourierft_spectrum; the positions regenerated from a seed)
//! S [out, in] = 0, S[rows[j], cols[j]] = w[j]
//! dW = Re(ifft2(S)) * scaling      (ifft2's 1 / (out in) normalization)
//!    dW[a, c] = scaling / (out in) * sum_j w[j] cos(2 pi (rows[j] a / out + cols[j] c / in))
//! y = x W^T + b + x dW^T;  merged: W' = W + dW, b' = b
//! ```
//!
//! The cosine of a sum splits, so `dW` is a product of rank `2n` and is
//! never formed for the passes (`s' = scaling / (out in)`):
//!
//! ```text
//! C_in[c, j] = cos(2 pi ((cols[j] c) mod in) / in),  S_in likewise with sin   [in, n]
//! C_out[a, j], S_out[a, j] with rows[j] and out                               [out, n]
//! (stored transposed, each row of C^T filled by stepping its angle index)
//! dW = s' ((C_out diag(w)) C_in^T - (S_out diag(w)) S_in^T)
//! y += s' ((x C_in) diag(w) C_out^T - (x S_in) diag(w) S_out^T)
//! ```
//!
//! Every angle is reduced exactly (an integer modulo the size) and read
//! from a table of `cos(2 pi k / m)`, so no `cos` of a large argument is
//! evaluated. The backward, with `G = dL/dy`, `P = x C_in`, `Q = x S_in`,
//! `U = G C_out`, `V = G S_out`:
//!
//! ```text
//! dw[j] = s' sum_t (P[t, j] U[t, j] - Q[t, j] V[t, j])
//! dx = G W + s' ((U diag(w)) C_in^T - (V diag(w)) S_in^T)
//! ```
//!
//! PEFT's fresh adapter draws the spectrum from `randn` by default
//! (`init_weights = False`: not the identity) or zeros it
//! (`init_weights = True`); [`FourierFt::init_adapter`] does the latter.
//! The tables take `2 n (in + out)` scratch elements (plus `2 max(in,
//! out)` for the cosines of one period): the price of never forming `dW`.
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};

/// A FourierFT adapter for a linear layer `in -> out`: `n` frequencies and
/// their coefficients.
#[derive(Clone, Debug)]
pub struct FourierFt<E, S, I> {
    spectrum: S,
    rows: I,
    cols: I,
    scaling: f64,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

/// `[n, rows]` row-major (the transpose of the tables in the module
/// docs): entry `[j, a]` = `cos` (or `sin`) of `2 pi ((idx[j] (start + a))
/// mod m) / m`, read from `table` (`[cos(2 pi k / m); m]` then `[sin; m]`),
/// each row's angle index stepped without a division.
fn fill_trig<E: Element>(idx: &[u32], m: usize, start: usize, table: &[E], cos: &mut [E], sin: &mut [E]) {
    let (m64, rows) = (m.max(1) as u64, cos.len() / idx.len().max(1));
    for ((cr, sr), &k) in cos.chunks_exact_mut(rows.max(1)).zip(sin.chunks_exact_mut(rows.max(1))).zip(idx) {
        let step = (u64::from(k) % m64) as usize;
        let mut i = ((u64::from(k) % m64) * (start as u64 % m64) % m64) as usize;
        for (c, s) in cr.iter_mut().zip(sr.iter_mut()) {
            *c = table.get(i).copied().unwrap_or(E::ZERO);
            *s = table.get(m + i).copied().unwrap_or(E::ZERO);
            i += step;
            if i >= m {
                i -= m;
            }
        }
    }
}

/// `[cos(2 pi k / m)]` then `[sin(2 pi k / m)]`, `k < m`.
fn fill_table<E: Element>(m: usize, table: &mut [E]) {
    let (cos, sin) = table.split_at_mut(m.min(table.len()));
    for (k, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let angle = 2.0 * core::f64::consts::PI * k as f64 / m as f64;
        *c = E::from_f64(libm::cos(angle));
        *s = E::from_f64(libm::sin(angle));
    }
}

/// The trigonometric tables of one pass, transposed: `C_in^T`, `S_in^T`
/// `[n, in]`, `C_out^T`, `S_out^T` `[n, rows]` (all of `out`, or a block
/// of rows).
struct Trig<'w, E> {
    c_in: &'w mut [E],
    s_in: &'w mut [E],
    c_out: &'w mut [E],
    s_out: &'w mut [E],
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> FourierFt<E, S, I> {
    /// A FourierFT adapter over `spectrum [n]` at frequencies `(rows[j],
    /// cols[j])`, which keep their values, scaled by `scaling` (PEFT's
    /// `scaling`, default 150).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Parameter`) for lists of different
    /// lengths; [`Error::InvalidParameter`] for a frequency outside `[out,
    /// in]` (`fourierft_indices`) or a scaling that is not finite.
    pub fn new(in_features: usize, out_features: usize, scaling: f64, spectrum: S, rows: I, cols: I) -> Result<Self> {
        let n = spectrum.as_ref().len();
        check_len(Operand::Parameter, n, rows.as_ref().len())?;
        check_len(Operand::Parameter, n, cols.as_ref().len())?;
        let outside = |v: &[u32], max: usize| v.iter().any(|&i| i as usize >= max);
        if outside(rows.as_ref(), out_features) || outside(cols.as_ref(), in_features) {
            return Err(Error::InvalidParameter {
                name: "fourierft_indices",
                rule: "every frequency inside [out, in]",
            });
        }
        if !scaling.is_finite() {
            return Err(Error::InvalidParameter { name: "scaling", rule: "must be finite" });
        }
        Ok(Self { spectrum, rows, cols, scaling, in_features, out_features, _element: PhantomData })
    }

    /// The coefficients `w [n]`.
    pub fn spectrum(&self) -> &[E] {
        self.spectrum.as_ref()
    }

    /// The frequencies' rows.
    pub fn rows(&self) -> &[u32] {
        self.rows.as_ref()
    }

    /// The frequencies' columns.
    pub fn cols(&self) -> &[u32] {
        self.cols.as_ref()
    }

    /// Trainable (`n`) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::over_base(self.spectrum.as_ref().len(), self.in_features, self.out_features, bias)
    }

    /// `n`.
    fn n(&self) -> usize {
        self.spectrum.as_ref().len()
    }

    /// `scaling / (out in)`.
    fn s(&self) -> f64 {
        self.scaling / (self.out_features as f64 * self.in_features as f64)
    }

    /// Scratch for the tables over `rows` output rows: `2 n (in + rows) +
    /// 2 max(in, out)` (saturating).
    fn trig_len(&self, rows: usize) -> usize {
        let n = self.n();
        let m = self.in_features.max(self.out_features);
        n.saturating_mul(2).saturating_mul(self.in_features.saturating_add(rows)).saturating_add(m.saturating_mul(2))
    }

    /// The tables for output rows `start..start + rows`, from the front of
    /// `scratch`, and the rest.
    fn trig<'w>(&self, start: usize, rows: usize, scratch: &'w mut [E]) -> Result<(Trig<'w, E>, &'w mut [E])> {
        let (n, i, o) = (self.n(), self.in_features, self.out_features);
        let (table, rest) = split_scratch(scratch, 2 * i.max(o))?;
        let (c_in, rest) = split_scratch(rest, checked_len(i, n)?)?;
        let (s_in, rest) = split_scratch(rest, checked_len(i, n)?)?;
        let (c_out, rest) = split_scratch(rest, checked_len(rows, n)?)?;
        let (s_out, rest) = split_scratch(rest, checked_len(rows, n)?)?;
        fill_table(i, table);
        fill_trig(self.cols.as_ref(), i, 0, table, c_in, s_in);
        fill_table(o, table);
        fill_trig(self.rows.as_ref(), o, start, table, c_out, s_out);
        Ok((Trig { c_in, s_in, c_out, s_out }, rest))
    }

    /// `m <- diag(w) m * f` (each row `j` of `[n, cols]` scaled).
    fn scale_rows(&self, m: &mut [E], f: f64) {
        let cols = (m.len() / self.n().max(1)).max(1);
        for (row, w) in m.chunks_exact_mut(cols).zip(self.spectrum.as_ref()) {
            let g = w.to_f64() * f;
            row.iter_mut().for_each(|v| *v = E::from_f64(v.to_f64() * g));
        }
    }

    /// `m <- m diag(w) * f` (each column `j` of `[rows, n]` scaled).
    fn scale_cols(&self, m: &mut [E], f: f64) {
        let nn = self.n().max(1);
        for row in m.chunks_exact_mut(nn) {
            for (v, w) in row.iter_mut().zip(self.spectrum.as_ref()) {
                *v = E::from_f64(v.to_f64() * w.to_f64() * f);
            }
        }
    }
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> LinearAdapter<E> for FourierFt<E, S, I> {
    /// `dL/dw`, as the spectrum.
    type Grads<'g>
        = &'g mut [E]
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// The tables and `2 tokens n` (`x C_in`, `x S_in`; saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        self.trig_len(self.out_features).saturating_add(tokens.saturating_mul(self.n()).saturating_mul(2))
    }

    /// The tables and `4 tokens n` (`P`, `Q`, `U`, `V`; saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        self.trig_len(self.out_features).saturating_add(tokens.saturating_mul(self.n()).saturating_mul(4))
    }

    /// The spectrum's length (`Gradient`).
    fn check_grads(&self, grads: &&mut [E]) -> Result<()> {
        check_len(Operand::Gradient, self.n(), grads.len())
    }

    /// `y = x W^T + b + s' ((x C_in) diag(w) C_out^T - (x S_in) diag(w) S_out^T)`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (t, n, i, o) = (x.rows(), self.n(), self.in_features, self.out_features);
        base.forward(backend, x, y.rb_mut())?;
        let (tr, rest) = self.trig(0, o, scratch)?;
        let (p, rest) = split_scratch(rest, checked_len(t, n)?)?;
        let (q, _) = split_scratch(rest, checked_len(t, n)?)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let (c_in, s_in) = (MatRef::new(tr.c_in, n, i)?, MatRef::new(tr.s_in, n, i)?);
        backend.gemm(MatMut::new(p, t, n)?, Accum::Replace, x, Op::N, c_in, Op::T, one)?;
        backend.gemm(MatMut::new(q, t, n)?, Accum::Replace, x, Op::N, s_in, Op::T, one)?;
        self.scale_cols(p, self.s());
        self.scale_cols(q, -self.s());
        let (c_out, s_out) = (MatRef::new(tr.c_out, n, o)?, MatRef::new(tr.s_out, n, o)?);
        backend.gemm(y.rb_mut(), Accum::Add, MatRef::new(p, t, n)?, Op::N, c_out, Op::N, one)?;
        backend.gemm(y, Accum::Add, MatRef::new(q, t, n)?, Op::N, s_out, Op::N, one)?;
        Ok(())
    }

    /// Accumulates `dL/dw` into `grads` and, if `grad_x` is given, writes
    /// `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (t, n, i, o) = (x.rows(), self.n(), self.in_features, self.out_features);
        let (tr, rest) = self.trig(0, o, scratch)?;
        let (p, rest) = split_scratch(rest, checked_len(t, n)?)?;
        let (q, rest) = split_scratch(rest, checked_len(t, n)?)?;
        let (u, rest) = split_scratch(rest, checked_len(t, n)?)?;
        let (v, _) = split_scratch(rest, checked_len(t, n)?)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let (c_in, s_in) = (MatRef::new(tr.c_in, n, i)?, MatRef::new(tr.s_in, n, i)?);
        let (c_out, s_out) = (MatRef::new(tr.c_out, n, o)?, MatRef::new(tr.s_out, n, o)?);
        backend.gemm(MatMut::new(p, t, n)?, Accum::Replace, x, Op::N, c_in, Op::T, one)?;
        backend.gemm(MatMut::new(q, t, n)?, Accum::Replace, x, Op::N, s_in, Op::T, one)?;
        backend.gemm(MatMut::new(u, t, n)?, Accum::Replace, grad_y, Op::N, c_out, Op::T, one)?;
        backend.gemm(MatMut::new(v, t, n)?, Accum::Replace, grad_y, Op::N, s_out, Op::T, one)?;
        let s = self.s();
        let nn = n.max(1);
        for (j, g) in grads.iter_mut().enumerate() {
            let col = |m: &[E], k: usize| m.get(k * nn + j).map_or(0.0, |e| e.to_f64());
            let sum: f64 = (0..t).map(|k| col(p, k) * col(u, k) - col(q, k) * col(v, k)).sum();
            *g = E::from_f64(g.to_f64() + s * sum);
        }
        if let Some(mut gx) = grad_x {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            self.scale_cols(u, s);
            self.scale_cols(v, -s);
            backend.gemm(gx.rb_mut(), Accum::Add, MatRef::new(u, t, n)?, Op::N, c_in, Op::N, one)?;
            backend.gemm(gx, Accum::Add, MatRef::new(v, t, n)?, Op::N, s_in, Op::N, one)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> DeltaRows<E> for FourierFt<E, S, I> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// The tables over `rows` output rows.
    fn delta_scratch_len(&self, rows: usize) -> usize {
        self.trig_len(rows)
    }

    /// Rows `start..start + rows` of `factor * dW`: `s' factor ((C_out
    /// diag(w)) C_in^T - (S_out diag(w)) S_in^T)` over those rows.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, mut dst, accum, factor, scratch } = block;
        let (rows, n, i) = (dst.rows(), self.n(), self.in_features);
        let (tr, _) = self.trig(start, rows, scratch)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        self.scale_rows(tr.c_out, self.s() * factor);
        self.scale_rows(tr.s_out, -self.s() * factor);
        let (c_in, s_in) = (MatRef::new(tr.c_in, n, i)?, MatRef::new(tr.s_in, n, i)?);
        backend.gemm(dst.rb_mut(), accum, MatRef::new(tr.c_out, n, rows)?, Op::T, c_in, Op::N, one)?;
        backend.gemm(dst, Accum::Add, MatRef::new(tr.s_out, n, rows)?, Op::T, s_in, Op::N, one)?;
        Ok(())
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>, I: AsRef<[u32]>] FourierFt<E, S, I>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>, I: AsRef<[u32]>> FourierFt<E, S, I> {
    /// Zeros the spectrum (PEFT's `init_weights = True`: `dW = 0`, the
    /// base exactly).
    pub fn init_adapter(&mut self) {
        self.spectrum.as_mut().fill(E::ZERO);
    }

    /// The spectrum mutably, for an optimizer step or a load.
    pub fn spectrum_mut(&mut self) -> &mut [E] {
        self.spectrum.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;

    #[test]
    fn one_frequency_by_hand() {
        // out 2, in 4, one frequency (1, 1), w = 8, scaling 1: s' = 1/8, dW[a, c] = cos(pi a + pi c / 2):
        // row 0: [1, 0, -1, 0]; row 1: [-1, 0, 1, 0]. With W = 0 and x = [1, 2, 3, 4]: y = [-2, 2].
        let f = FourierFt::new(4, 2, 1.0, [8.0f64], [1u32], [1u32]).unwrap();
        let w = [0.0f64; 8];
        let base = Dense::new(&w, 2, 4).unwrap();
        let x = MatRef::new(&[1.0, 2.0, 3.0, 4.0], 1, 4).unwrap();
        let mut y = [0.0; 2];
        let mut sc = [0.0; 22];
        assert_eq!(f.forward_scratch_len(1), sc.len());
        f.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        assert!((y[0] + 2.0).abs() < 1e-12 && (y[1] - 2.0).abs() < 1e-12, "{y:?}");
        assert!(matches!(
            FourierFt::new(4, 2, 1.0, [1.0f64], [2u32], [0u32]),
            Err(Error::InvalidParameter { name: "fourierft_indices", .. })
        ));
    }
}
