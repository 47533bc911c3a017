//! HRA (Yuan et al., 2024): a chain of Householder reflections multiplying
//! the frozen weight on its input side, as PEFT's `hra.HRALinear` computes
//! it, with and without Gram-Schmidt.
//!
//! ```text
//! U [in, r] (PEFT's hra_u), u_i = U[:, i] / ||U[:, i]||,  R_i = I - 2 u_i u_i^T
//! apply_GS = false:  H = R_0 R_1 ... R_{r-1}
//! apply_GS = true:   w_0 .. w_{r-1} = Gram-Schmidt(U) (modified: each projection on the updated vector)
//!                    H = I - 2 W W^T = (I - 2 w_0 w_0^T) ... (I - 2 w_{r-1} w_{r-1}^T)
//! y = x (W0 H)^T + b = (x H^T) W0^T + b,  x H^T = x R_{r-1} ... R_0
//! merged: W0' = W0 H (each row w -> w R_0 ... R_{r-1}), b' = b; unmerge: w -> w R_{r-1} ... R_0
//! ```
//!
//! The Gram-Schmidt form runs as the chain of its orthonormal vectors'
//! reflections: for orthonormal `w_j` the product equals `I - 2 W W^T`.
//!
//! The backward, with `G = dL/dy`: `g = G W0` is `dL/dz` for `z = x H^T`.
//! Undoing the chain one reflection at a time (each is its own inverse, so
//! every intermediate `z` is recovered from the last), for `R_0` first:
//!
//! ```text
//! a_t = z_t . u,  b_t = g_t . u                       (z_t: the reflection's input rows)
//! dL/du = -2 sum_t (a_t g_t + b_t z_t),  g_t <- g_t - 2 b_t u
//! dL/dU[:, i] = (dL/du - u (u . dL/du)) / ||U[:, i]||
//! dx = g (after every reflection)
//! ```
//!
//! With Gram-Schmidt the same chain gives `dL/dw_j`, and reverse-mode
//! through the orthonormalization gives `dL/dU`: for column `i`, `v^(0) =
//! U[:, i]`, `v^(j+1) = v^(j) - c_j w_j` (`c_j = w_j . v^(j)`), `w_i =
//! v^(i) / ||v^(i)||`; backwards, `dv^(i) = (dw_i - w_i (w_i . dw_i)) /
//! ||v^(i)||`, then for `j = i-1 .. 0`: `dw_j -= (w_j . dv) v^(j) + c_j
//! dv` and `dv -= w_j (w_j . dv)`, and `dU[:, i] += dv^(0)`.
//!
//! PEFT's fresh adapter (`r` even): columns in equal pairs, so each
//! reflection is undone by its twin and `H = I` (identity at init). A zero
//! column (or, with Gram-Schmidt, a column in the span of the ones before
//! it) has no direction: PEFT divides by its zero norm; here every pass and
//! merge refuses it ([`Error::InvalidParameter`]).
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, checked_len};
use crate::method::{BackwardPass, Direction, ForwardPass, LinearAdapter, UpdateBlock, UpdateKind, WeightUpdate};
use crate::rng::Rng;

/// An HRA adapter for a linear layer `in -> out`: `U [in, r]`.
#[derive(Clone, Debug)]
pub struct Hra<E, S> {
    u: S,
    rank: usize,
    in_features: usize,
    out_features: usize,
    gram_schmidt: bool,
    _element: PhantomData<fn() -> E>,
}

/// Column `i` of `v [in, r]` (row-major, PEFT's layout).
fn col<E: Element>(v: &[E], r: usize, i: usize) -> impl Iterator<Item = f64> + '_ {
    v.iter().skip(i).step_by(r.max(1)).map(|x| x.to_f64())
}

/// `||v[:, i]||^2`, or [`Error::InvalidParameter`] when it is zero or not
/// finite.
fn norm2<E: Element>(v: &[E], r: usize, i: usize) -> Result<f64> {
    let n2: f64 = col(v, r, i).map(|x| x * x).sum();
    if n2 > 0.0 && n2.is_finite() {
        Ok(n2)
    } else {
        Err(Error::InvalidParameter { name: "hra_u", rule: "a column has no direction (zero norm)" })
    }
}

/// `row <- row R` (`R = I - 2 u u^T / ||u||^2`, `u` contiguous), rounding
/// each element once.
fn reflect_row<E: Element>(row: &mut [E], u: &[E], n2: f64) {
    let d: f64 = row.iter().zip(u).map(|(z, u)| z.to_f64() * u.to_f64()).sum();
    let c = 2.0 * d / n2;
    for (z, u) in row.iter_mut().zip(u) {
        *z = E::from_f64(z.to_f64() - c * u.to_f64());
    }
}

/// Column `i` of `v [in, r]` copied (exactly) into `buf`, and its squared
/// norm ([`norm2`]'s refusal).
fn column<'b, E: Element>(v: &[E], r: usize, i: usize, buf: &'b mut [E]) -> Result<(&'b [E], f64)> {
    for (dst, src) in buf.iter_mut().zip(v.iter().skip(i).step_by(r.max(1))) {
        *dst = *src;
    }
    Ok((buf, norm2(v, r, i)?))
}

/// Every row of `z` through the reflections `order` of `v`'s columns
/// (`buf`: at least `in` elements).
fn reflect_rows<E: Element>(
    z: &mut MatMut<'_, E>,
    v: &[E],
    r: usize,
    order: impl Iterator<Item = usize>,
    buf: &mut [E],
) -> Result<()> {
    let n = z.cols();
    let len = buf.len();
    let buf = buf.get_mut(..n).ok_or(Error::ScratchTooSmall { needed: n, len })?;
    for i in order {
        let (u, n2) = column(v, r, i, buf)?;
        for row in z.row_iter_mut() {
            reflect_row(row, u, n2);
        }
    }
    Ok(())
}

impl<E: Element, S: AsRef<[E]>> Hra<E, S> {
    /// An HRA adapter of `rank` reflections over `u [in, rank]`, which
    /// keeps its values; `gram_schmidt` is PEFT's `apply_GS`.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for rank 0 (or above `in` with Gram-Schmidt,
    /// where the columns could not be independent);
    /// [`Error::ShapeMismatch`] (`Parameter`) for `u` of the wrong length;
    /// [`Error::Overflow`].
    pub fn new(rank: usize, in_features: usize, out_features: usize, gram_schmidt: bool, u: S) -> Result<Self> {
        if rank == 0 || (gram_schmidt && rank > in_features) {
            return Err(Error::InvalidRank { rank, max: in_features });
        }
        check_len(Operand::Parameter, checked_len(in_features, rank)?, u.as_ref().len())?;
        Ok(Self { u, rank, in_features, out_features, gram_schmidt, _element: PhantomData })
    }

    /// `U` `[in, r]`.
    pub fn vectors(&self) -> &[E] {
        self.u.as_ref()
    }

    /// The number of reflections `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Whether the columns are orthonormalized first (PEFT's `apply_GS`).
    pub fn gram_schmidt(&self) -> bool {
        self.gram_schmidt
    }

    /// Trainable (`in r`) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::over_base(self.u.as_ref().len(), self.in_features, self.out_features, bias)
    }

    /// `in r` with Gram-Schmidt (its vectors), else 0.
    fn gs_len(&self) -> usize {
        if self.gram_schmidt { self.in_features.saturating_mul(self.rank) } else { 0 }
    }

    /// The reflection vectors: `U` itself, or its Gram-Schmidt
    /// orthonormalization written into `buf` (`[in, r]`).
    fn reflectors<'s>(&'s self, buf: &'s mut [E]) -> Result<&'s [E]> {
        if !self.gram_schmidt {
            return Ok(self.u.as_ref());
        }
        let (r, n) = (self.rank, self.in_features);
        let w = buf.get_mut(..checked_len(n, r)?).ok_or(Error::ScratchTooSmall { needed: n * r, len: 0 })?;
        for i in 0..r {
            // v = U[:, i], then minus its projection on each w_j before it (updated v).
            for (k, dst) in w.iter_mut().skip(i).step_by(r).enumerate() {
                *dst = self.u.as_ref().get(k * r + i).copied().unwrap_or(E::ZERO);
            }
            for j in 0..i {
                let c: f64 = col(w, r, j).zip(col(w, r, i)).map(|(a, b)| a * b).sum();
                for k in 0..n {
                    let wj = w.get(k * r + j).map_or(0.0, |x| x.to_f64());
                    if let Some(v) = w.get_mut(k * r + i) {
                        *v = E::from_f64(v.to_f64() - c * wj);
                    }
                }
            }
            let norm = libm::sqrt(norm2(w, r, i)?);
            for v in w.iter_mut().skip(i).step_by(r) {
                *v = E::from_f64(v.to_f64() / norm);
            }
        }
        Ok(w)
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Hra<E, S> {
    /// `dL/dU`, as `U`.
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

    /// `(tokens + 1) in` (`x H^T`, one column), plus `in r` with
    /// Gram-Schmidt (saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        tokens.saturating_add(1).saturating_mul(self.in_features).saturating_add(self.gs_len())
    }

    /// `2 tokens in + 2 in + 2 tokens` (`z`, `g`, `dL/du`, one column, `a`,
    /// `b`), plus `3 in r` with Gram-Schmidt (`W`, `dL/dW`, the column's
    /// chain; saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        let n = self.in_features;
        tokens
            .saturating_mul(n.saturating_mul(2).saturating_add(2))
            .saturating_add(n.saturating_mul(2))
            .saturating_add(self.gs_len().saturating_mul(3))
    }

    /// `U`'s length (`Gradient`).
    fn check_grads(&self, grads: &&mut [E]) -> Result<()> {
        check_len(Operand::Gradient, self.u.as_ref().len(), grads.len())
    }

    /// `y = (x R_{r-1} ... R_0) W0^T + b`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, y, scratch } = pass;
        let (t, n, r) = (x.rows(), self.in_features, self.rank);
        let (z_buf, rest) = split_scratch(scratch, checked_len(t, n)?)?;
        let (col_buf, rest) = split_scratch(rest, n)?;
        let v = self.reflectors(rest)?;
        let mut z = MatMut::new(z_buf, t, n)?;
        for (dst, src) in z.row_iter_mut().zip(x.row_iter()) {
            dst.copy_from_slice(src);
        }
        reflect_rows(&mut z, v, r, (0..r).rev(), col_buf)?;
        base.forward(backend, z.as_ref(), y)
    }

    /// Accumulates `dL/dU` into `grads` and, if `grad_x` is given, writes
    /// `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (t, n, r) = (x.rows(), self.in_features, self.rank);
        let (z_buf, rest) = split_scratch(scratch, checked_len(t, n)?)?;
        let (g_buf, rest) = split_scratch(rest, checked_len(t, n)?)?;
        let (du, rest) = split_scratch(rest, n)?;
        let (col_buf, rest) = split_scratch(rest, n)?;
        let (ab, rest) = split_scratch(rest, checked_len(t, 2)?)?;
        let (w_buf, rest) = split_scratch(rest, self.gs_len())?;
        let (dw_buf, chain) = split_scratch(rest, self.gs_len())?;
        let v = self.reflectors(w_buf)?;
        // z = x H^T (the chain's output), g = G W0.
        let mut z = MatMut::new(z_buf, t, n)?;
        for (dst, src) in z.row_iter_mut().zip(x.row_iter()) {
            dst.copy_from_slice(src);
        }
        reflect_rows(&mut z, v, r, (0..r).rev(), col_buf)?;
        let mut g = MatMut::new(g_buf, t, n)?;
        base.apply_transpose(backend, grad_y, g.rb_mut(), Accum::Replace)?;
        // With Gram-Schmidt the chain's gradients land in dL/dW first.
        dw_buf.fill(E::ZERO);
        let dv: &mut [E] = if self.gram_schmidt { &mut *dw_buf } else { &mut *grads };
        for i in 0..r {
            let (u, n2) = column(v, r, i, col_buf)?;
            let norm = libm::sqrt(n2);
            let unit = |k: usize| u.get(k).map_or(0.0, |x| x.to_f64() / norm);
            // Undo R_i: z becomes the reflection's input.
            for row in z.row_iter_mut() {
                reflect_row(row, u, n2);
            }
            for ((zr, gr), slot) in z.as_ref().row_iter().zip(g.as_ref().row_iter()).zip(ab.chunks_exact_mut(2)) {
                if let [sa, sb] = slot {
                    *sa = E::from_f64(zr.iter().zip(u).map(|(z, u)| z.to_f64() * u.to_f64()).sum::<f64>() / norm);
                    *sb = E::from_f64(gr.iter().zip(u).map(|(g, u)| g.to_f64() * u.to_f64()).sum::<f64>() / norm);
                }
            }
            // dL/du_k = -2 sum_t (a_t g_tk + b_t z_tk), summed in f64.
            let at = |row: &[E], k: usize| row.get(k).map_or(0.0, |x| x.to_f64());
            for (k, d) in du.iter_mut().enumerate() {
                let s: f64 = ab
                    .chunks_exact(2)
                    .zip(z.as_ref().row_iter().zip(g.as_ref().row_iter()))
                    .map(|(p, (zr, gr))| match p {
                        [a, b] => a.to_f64() * at(gr, k) + b.to_f64() * at(zr, k),
                        _ => 0.0,
                    })
                    .sum();
                *d = E::from_f64(-2.0 * s);
            }
            // g <- g - 2 b u.
            for (row, p) in g.row_iter_mut().zip(ab.chunks_exact(2)) {
                let c = 2.0 * p.get(1).map_or(0.0, |b| b.to_f64()) / norm;
                for (gv, uk) in row.iter_mut().zip(u) {
                    *gv = E::from_f64(gv.to_f64() - c * uk.to_f64());
                }
            }
            // dL/dv_i += (du - u (u . du)) / ||v_i||.
            let proj: f64 = du.iter().enumerate().map(|(k, d)| d.to_f64() * unit(k)).sum();
            for (k, (d, acc)) in du.iter().zip(dv.iter_mut().skip(i).step_by(r)).enumerate() {
                *acc = E::from_f64(acc.to_f64() + (d.to_f64() - unit(k) * proj) / norm);
            }
        }
        if self.gram_schmidt {
            self.gram_schmidt_backward(v, dw_buf, chain, grads)?;
        }
        if let Some(mut gx) = grad_x {
            for (dst, src) in gx.row_iter_mut().zip(g.as_ref().row_iter()) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> Hra<E, S> {
    /// `dL/dU += J^T dL/dW` through the modified Gram-Schmidt of the
    /// [module docs](self): `w` the orthonormal vectors, `dw` their
    /// gradients (consumed), `chain` `[in, r]` for one column's `v^(j)`.
    fn gram_schmidt_backward(&self, w: &[E], dw: &mut [E], chain: &mut [E], grads: &mut [E]) -> Result<()> {
        let (r, n) = (self.rank, self.in_features);
        let u = self.u.as_ref();
        let at = |m: &[E], k: usize, j: usize| m.get(k * r + j).map_or(0.0, |x| x.to_f64());
        for i in (0..r).rev() {
            // Column i's chain: v^(0) = U[:, i], v^(j+1) = v^(j) - c_j w_j (chain column j holds v^(j)).
            for k in 0..n {
                if let Some(c) = chain.get_mut(k * r) {
                    *c = E::from_f64(at(u, k, i));
                }
            }
            for j in 0..i {
                let c: f64 = (0..n).map(|k| at(w, k, j) * at(chain, k, j)).sum();
                for k in 0..n {
                    let next = at(chain, k, j) - c * at(w, k, j);
                    if let Some(dst) = chain.get_mut(k * r + j + 1) {
                        *dst = E::from_f64(next);
                    }
                }
            }
            let norm = libm::sqrt((0..n).map(|k| at(chain, k, i) * at(chain, k, i)).sum::<f64>());
            if norm.is_nan() || norm <= 0.0 {
                return Err(Error::InvalidParameter {
                    name: "hra_u",
                    rule: "a column is in the span of those before it",
                });
            }
            // dv = (dw_i - w_i (w_i . dw_i)) / ||v^(i)||, kept in f64 along the column.
            let p: f64 = (0..n).map(|k| at(w, k, i) * at(dw, k, i)).sum();
            for k in 0..n {
                let d = (at(dw, k, i) - at(w, k, i) * p) / norm;
                if let Some(dst) = chain.get_mut(k * r + i) {
                    // Column i of the chain is free once its norm is taken: it holds dv from here.
                    *dst = E::from_f64(d);
                }
            }
            for j in (0..i).rev() {
                let wd: f64 = (0..n).map(|k| at(w, k, j) * at(chain, k, i)).sum();
                let c: f64 = (0..n).map(|k| at(w, k, j) * at(chain, k, j)).sum();
                for k in 0..n {
                    let (dvk, vk) = (at(chain, k, i), at(chain, k, j));
                    if let Some(d) = dw.get_mut(k * r + j) {
                        *d = E::from_f64(d.to_f64() - (wd * vk + c * dvk));
                    }
                    if let Some(d) = chain.get_mut(k * r + i) {
                        *d = E::from_f64(dvk - at(w, k, j) * wd);
                    }
                }
            }
            for k in 0..n {
                if let Some(g) = grads.get_mut(k * r + i) {
                    *g = E::from_f64(g.to_f64() + at(chain, k, i));
                }
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> WeightUpdate<E> for Hra<E, S> {
    /// `(out, in)`.
    fn weight_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// [`UpdateKind::Multiplicative`]: each row is multiplied by `H`.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Multiplicative
    }

    /// `in` (one column), plus `in r` with Gram-Schmidt (its vectors).
    fn update_scratch_len(&self, _rows: usize) -> usize {
        self.gs_len().saturating_add(self.in_features)
    }

    /// Merge: each row `w -> w R_0 ... R_{r-1}`; unmerge: `w -> w R_{r-1}
    /// ... R_0` (`H` is orthogonal: its inverse is its transpose).
    fn run_update<B: Backend<E> + ?Sized>(&self, _backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { mut block, direction, scratch, .. } = block;
        let (col_buf, rest) = split_scratch(scratch, self.in_features)?;
        let (v, r) = (self.reflectors(rest)?, self.rank);
        match direction {
            Direction::Merge => reflect_rows(&mut block, v, r, 0..r, col_buf)?,
            Direction::Unmerge => reflect_rows(&mut block, v, r, (0..r).rev(), col_buf)?,
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Hra<E, S> {
    /// Initializes as PEFT does (`reset_hra_parameters`): for even `r`,
    /// `r / 2` columns Kaiming-uniform (`U(-1/sqrt(r/2), 1/sqrt(r/2))`,
    /// fan-in the half's columns, `a = sqrt 5`), each repeated twice side
    /// by side, so the reflections cancel in pairs and `H = I`; for odd
    /// `r`, every column Kaiming-uniform (no identity). Drawn from `rng`
    /// rather than torch's generator.
    pub fn init_adapter(&mut self, rng: &mut Rng) {
        let r = self.rank;
        let u = self.u.as_mut();
        if r.is_multiple_of(2) {
            let bound = 1.0 / libm::sqrt((r / 2).max(1) as f64);
            for row in u.chunks_exact_mut(r) {
                for pair in row.chunks_exact_mut(2) {
                    let v = E::from_f64(rng.uniform_range(-bound, bound));
                    pair.fill(v);
                }
            }
        } else {
            let bound = 1.0 / libm::sqrt(r as f64);
            rng.fill_uniform(u, -bound, bound);
        }
    }

    /// `U` mutably, for an optimizer step or a load.
    pub fn vectors_mut(&mut self) -> &mut [E] {
        self.u.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;
    use crate::matrix::MatRef;

    #[test]
    fn one_reflection_by_hand() {
        // in 2, r 1, U = [[1], [0]]: R = diag(-1, 1). W = I, x = [3, 4]: y = x R = [-3, 4].
        let w = [1.0f64, 0.0, 0.0, 1.0];
        let base = Dense::new(&w, 2, 2).unwrap();
        let hra = Hra::new(1, 2, 2, false, [2.0f64, 0.0]).unwrap();
        let mut y = [0.0; 2];
        let mut sc = [0.0; 4];
        assert_eq!(hra.forward_scratch_len(1), sc.len());
        let x = MatRef::new(&[3.0, 4.0], 1, 2).unwrap();
        hra.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [-3.0, 4.0]);
        // A zero column is refused, not divided by.
        let zero = Hra::new(1, 2, 2, false, [0.0f64, 0.0]).unwrap();
        let err = zero.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc);
        assert!(matches!(err, Err(Error::InvalidParameter { name: "hra_u", .. })));
        // Gram-Schmidt of [[1, 1], [0, 1]]: w0 = e0, w1 = e1; H = I - 2 I = -I.
        let gs = Hra::new(2, 2, 2, true, [1.0f64, 1.0, 0.0, 1.0]).unwrap();
        let mut sc = [0.0; 8];
        assert_eq!(gs.forward_scratch_len(1), sc.len());
        gs.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [-3.0, -4.0]);
    }
}
