//! SHiRA (Bhardwaj et al., 2024): a sparse, high-rank update of a frozen
//! weight, as PEFT's `shira.Linear` computes it.
//!
//! ```text
//! rows[j], cols[j], w[j]   (j < n; PEFT's shira_indices [2, n] and shira_weight [n])
//! dW[rows[j], cols[j]] = s w[j], zero elsewhere (s = 1: PEFT's runtime scale)
//! y = x W^T + b + x dW^T:   y[t, rows[j]] += s w[j] x[t, cols[j]]
//! merged: W' = W + dW, b' = b
//! ```
//!
//! PEFT writes the indices in row-major sorted order and without
//! duplicates; a duplicate position would add twice here, as PEFT's sparse
//! tensor sums it. The backward, with `G = dL/dy`: `dw[j] = s sum_t G[t,
//! rows[j]] x[t, cols[j]]` and `dx = G W + G dW`, `dx[t, cols[j]] += s w[j]
//! G[t, rows[j]]`.
//!
//! PEFT's fresh adapter: `w = 0` over a random mask of `r (in + out)`
//! positions drawn by torch's `randperm` (saved with the adapter, never
//! regenerated at load); [`Shira::init_adapter`] draws the positions from
//! this crate's [`Rng`].
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::lora::ParamReport;
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};
use crate::rng::Rng;

/// Tokens the forward runs together over one read of the positions.
const TILE: usize = 8;

/// A SHiRA adapter for a linear layer `in -> out`: `n` positions and their
/// values.
#[derive(Clone, Debug)]
pub struct Shira<E, S, I> {
    weight: S,
    rows: I,
    cols: I,
    scale: f64,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> Shira<E, S, I> {
    /// A SHiRA adapter over `weight [n]` at positions `(rows[j],
    /// cols[j])`, which keep their values, scaled by `scale` (PEFT: 1).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Parameter`) for index or weight lists of
    /// different lengths; [`Error::InvalidParameter`] for a position
    /// outside `[out, in]` or a non-finite scale.
    pub fn new(in_features: usize, out_features: usize, scale: f64, weight: S, rows: I, cols: I) -> Result<Self> {
        let n = weight.as_ref().len();
        check_len(Operand::Parameter, n, rows.as_ref().len())?;
        check_len(Operand::Parameter, n, cols.as_ref().len())?;
        let outside = |v: &[u32], max: usize| v.iter().any(|&i| i as usize >= max);
        if outside(rows.as_ref(), out_features) || outside(cols.as_ref(), in_features) {
            return Err(Error::InvalidParameter { name: "shira_indices", rule: "every position inside [out, in]" });
        }
        if !scale.is_finite() {
            return Err(Error::InvalidParameter { name: "SHiRA scale", rule: "must be finite" });
        }
        Ok(Self { weight, rows, cols, scale, in_features, out_features, _element: PhantomData })
    }

    /// The values `w [n]`.
    pub fn weight(&self) -> &[E] {
        self.weight.as_ref()
    }

    /// The positions' rows.
    pub fn rows(&self) -> &[u32] {
        self.rows.as_ref()
    }

    /// The positions' columns.
    pub fn cols(&self) -> &[u32] {
        self.cols.as_ref()
    }

    /// Trainable (`n`) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::over_base(self.weight.as_ref().len(), self.in_features, self.out_features, bias)
    }

    /// `(row, col, s w)` for every position.
    fn entries(&self) -> impl Iterator<Item = (usize, usize, f64)> + '_ {
        let s = self.scale;
        self.rows
            .as_ref()
            .iter()
            .zip(self.cols.as_ref())
            .zip(self.weight.as_ref())
            .map(move |((&r, &c), w)| (r as usize, c as usize, s * w.to_f64()))
    }
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> LinearAdapter<E> for Shira<E, S, I> {
    /// `dL/dw`, as `w`.
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

    /// `min(tokens, TILE) in`: a tile of the input, transposed.
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        tokens.min(TILE).saturating_mul(self.in_features)
    }

    /// None.
    fn backward_scratch_len(&self, _tokens: usize) -> usize {
        0
    }

    /// `w`'s length (`Gradient`).
    fn check_grads(&self, grads: &&mut [E]) -> Result<()> {
        check_len(Operand::Gradient, self.weight.as_ref().len(), grads.len())
    }

    /// `y = x W^T + b`, then `y[t, rows[j]] += s w[j] x[t, cols[j]]`: each
    /// run of positions in one row (PEFT's row-major order makes every
    /// row one run) summed in the accumulation type, then added with one
    /// rounding; eight tokens at a time, so the positions are read once
    /// per tile, over the tile's input transposed in the scratch (each
    /// column's values side by side).
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        base.forward(backend, x, y.rb_mut())?;
        let (zero, s) = (E::Accum::ZERO, <E::Accum as Element>::from_f64(self.scale));
        let (rows, cols, w) = (self.rows.as_ref(), self.cols.as_ref(), self.weight.as_ref());
        for t0 in (0..x.rows()).step_by(TILE) {
            let n = TILE.min(x.rows() - t0);
            // xt[c n + k] = x[t0 + k, c].
            let xt = scratch.get_mut(..n * self.in_features).unwrap_or(&mut []);
            for k in 0..n {
                for (c, v) in x.row(t0 + k).iter().enumerate() {
                    if let Some(dst) = xt.get_mut(c * n + k) {
                        *dst = *v;
                    }
                }
            }
            let mut flush = |r: u32, sums: &[E::Accum; TILE]| {
                for (k, sum) in sums.iter().enumerate().take(n) {
                    if let Some(v) = y.row_mut(t0 + k).get_mut(r as usize) {
                        *v = E::from_accum(v.to_accum() + s * *sum);
                    }
                }
            };
            let (mut cur, mut sums) = (None, [zero; TILE]);
            for ((&r, &c), wv) in rows.iter().zip(cols).zip(w) {
                if cur != Some(r) {
                    if let Some(done) = cur {
                        flush(done, &sums);
                    }
                    (cur, sums) = (Some(r), [zero; TILE]);
                }
                let (wa, at) = (wv.to_accum(), c as usize * n);
                let column = xt.get(at..at + n).unwrap_or(&[]);
                match <&[E; TILE]>::try_from(column) {
                    // A whole tile: a fixed trip count the compiler unrolls.
                    Ok(full) => sums.iter_mut().zip(full).for_each(|(sum, v)| *sum += wa * v.to_accum()),
                    Err(_) => sums.iter_mut().zip(column).for_each(|(sum, v)| *sum += wa * v.to_accum()),
                }
            }
            if let Some(done) = cur {
                flush(done, &sums);
            }
        }
        Ok(())
    }

    /// Accumulates `dL/dw` into `grads` and, if `grad_x` is given, writes
    /// `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, .. } = pass;
        for ((r, c, _), g) in self.entries().zip(grads.iter_mut()) {
            let sum: f64 = grad_y
                .row_iter()
                .zip(x.row_iter())
                .map(|(gr, xr)| gr.get(r).map_or(0.0, |v| v.to_f64()) * xr.get(c).map_or(0.0, |v| v.to_f64()))
                .sum();
            *g = E::from_f64(g.to_f64() + self.scale * sum);
        }
        if let Some(mut gx) = grad_x {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            for (t, dr) in gx.row_iter_mut().enumerate() {
                let gr = grad_y.row(t);
                for (r, c, w) in self.entries() {
                    if let (Some(v), Some(g)) = (dr.get_mut(c), gr.get(r)) {
                        *v = E::from_f64(v.to_f64() + w * g.to_f64());
                    }
                }
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>, I: AsRef<[u32]>> DeltaRows<E> for Shira<E, S, I> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Rows `start..start + n` of `factor * dW`: zeros (replace) and the
    /// positions in those rows.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, _backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, mut dst, accum, factor, .. } = block;
        let n = dst.rows();
        if accum == Accum::Replace {
            for row in dst.row_iter_mut() {
                row.fill(E::ZERO);
            }
        }
        for (r, c, w) in self.entries().filter(|&(r, ..)| r >= start && r < start + n) {
            if let Some(v) = dst.row_mut(r - start).get_mut(c) {
                *v = E::from_f64(v.to_f64() + factor * w);
            }
        }
        Ok(())
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>, I: AsRef<[u32]>] Shira<E, S, I>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>, I: AsRef<[u32]> + AsMut<[u32]>> Shira<E, S, I> {
    /// A fresh adapter as PEFT's `random` mask makes one: `w = 0` at `n`
    /// distinct positions drawn uniformly (a partial Fisher-Yates shuffle
    /// of the `out in` positions, from `rng` rather than torch's
    /// `randperm`), in row-major order. `n` is the length of the lists.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `n` exceeds `out in`.
    pub fn init_adapter(&mut self, rng: &mut Rng) -> Result<()> {
        let total = (self.out_features as u64).saturating_mul(self.in_features as u64);
        let n = self.weight.as_ref().len();
        if n as u64 > total {
            return Err(Error::InvalidParameter { name: "SHiRA r", rule: "r (in + out) must not exceed out in" });
        }
        // Floyd's algorithm: n distinct values of 0..total without a table.
        let (rows, cols) = (self.rows.as_mut(), self.cols.as_mut());
        let mut k = 0;
        for j in total - n as u64..total {
            let t = rng.next_u64() % (j + 1);
            let pick = if (0..k).any(|i| pos(rows, cols, i, self.in_features) == t) { j } else { t };
            let (r, c) = (pick / self.in_features as u64, pick % self.in_features as u64);
            if let (Some(rv), Some(cv)) = (rows.get_mut(k), cols.get_mut(k)) {
                (*rv, *cv) = (r as u32, c as u32);
            }
            k += 1;
        }
        // Row-major order, as PEFT's torch.where gives it (insertion sort: no heap).
        for i in 1..k {
            let mut j = i;
            while j > 0 && pos(rows, cols, j - 1, self.in_features) > pos(rows, cols, j, self.in_features) {
                rows.swap(j - 1, j);
                cols.swap(j - 1, j);
                j -= 1;
            }
        }
        self.weight.as_mut().fill(E::ZERO);
        Ok(())
    }

    /// `w` mutably, for an optimizer step or a load.
    pub fn weight_mut(&mut self) -> &mut [E] {
        self.weight.as_mut()
    }
}

/// Position `i`'s flat index `row in + col`.
fn pos(rows: &[u32], cols: &[u32], i: usize, n_in: usize) -> u64 {
    let (r, c) = (rows.get(i).copied().unwrap_or(0), cols.get(i).copied().unwrap_or(0));
    u64::from(r) * n_in as u64 + u64::from(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;
    use crate::matrix::{MatMut, MatRef};

    #[test]
    fn sparse_by_hand() {
        // 2 -> 2, positions (0, 1) w 3 and (1, 0) w -1: dW = [[0, 3], [-1, 0]].
        let s = Shira::new(2, 2, 1.0, [3.0f64, -1.0], [0u32, 1], [1u32, 0]).unwrap();
        let mut dw = [9.0; 4];
        s.delta_rows(&Reference, 0, MatMut::new(&mut dw, 2, 2).unwrap(), Accum::Replace, 1.0, &mut []).unwrap();
        assert_eq!(dw, [0.0, 3.0, -1.0, 0.0]);
        // W = I, x = [1, 2]: y = [1 + 6, 2 - 1] = [7, 1].
        let w = [1.0, 0.0, 0.0, 1.0];
        let mut y = [0.0; 2];
        let x = MatRef::new(&[1.0, 2.0], 1, 2).unwrap();
        let mut sc = [0.0; 2];
        s.forward(&Reference, &Dense::new(&w, 2, 2).unwrap(), x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [7.0, 1.0]);
        assert!(Shira::new(2, 2, 1.0, [1.0f64], [2u32], [0u32]).is_err(), "row 2 of 2");
        // A fresh mask: distinct positions, row-major, zero values.
        let mut fresh = Shira::new(3, 2, 1.0, [1.0f64; 4], [0u32; 4], [0u32; 4]).unwrap();
        fresh.init_adapter(&mut Rng::new(7)).unwrap();
        let flat: [u64; 4] = core::array::from_fn(|i| pos(fresh.rows.as_ref(), fresh.cols.as_ref(), i, 3));
        assert!(flat.windows(2).all(|p| p[0] < p[1]) && flat[3] < 6, "{flat:?}");
        assert_eq!(fresh.weight(), &[0.0; 4]);
    }
}
