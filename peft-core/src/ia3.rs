//! (IA)^3 (Liu et al., 2022): a learned vector that rescales a frozen
//! layer's activations, as PEFT's `ia3.Linear` computes it.
//!
//! ```text
//! not feedforward:  l [out]   y = (x W^T + b) * l          (per output feature)
//!                             merged: W' = l[:, None] W,  b' = l b
//! feedforward:      l [in]    y = (x * l) W^T + b          (per input feature)
//!                             merged: W' = W l[None, :],  b' = b
//! ```
//!
//! PEFT calls a module "feedforward" when its name ends with an entry of
//! `feedforward_modules`. A fresh vector is all ones, so the adapted layer
//! is the base exactly. The only trainable tensor is `l`: the backward
//! computes
//!
//! ```text
//! not feedforward:  dl_j = sum_t G_tj (x W^T + b)_tj     dx = (G * l) W
//! feedforward:      dl_j = sum_t x_tj (G W)_tj           dx = (G W) * l
//! ```
//!
//! Merging scales `W` (and for the output kind `b`) in place, through the
//! one guard ([`WeightUpdate::merge_into`]), which restores it from a
//! backup bit for bit, or by dividing by `l` (refused at merge time without
//! a backup when some `l_j = 0`).
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, Direction, ForwardPass, LinearAdapter, UpdateBlock, UpdateKind, WeightUpdate};

/// An (IA)^3 vector for a linear layer `in -> out`: `l [out]` on the
/// output, or `l [in]` on the input of a feedforward layer.
#[derive(Clone, Debug)]
pub struct Ia3<E, S> {
    l: S,
    in_features: usize,
    out_features: usize,
    feedforward: bool,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>> Ia3<E, S> {
    /// An (IA)^3 adapter over `l` (which keeps its values): `[in]` when
    /// `feedforward`, else `[out]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Parameter`) for `l` of the wrong length.
    pub fn new(in_features: usize, out_features: usize, feedforward: bool, l: S) -> Result<Self> {
        let want = if feedforward { in_features } else { out_features };
        check_len(Operand::Parameter, want, l.as_ref().len())?;
        Ok(Self { l, in_features, out_features, feedforward, _element: PhantomData })
    }

    /// The vector `l`.
    pub fn vector(&self) -> &[E] {
        self.l.as_ref()
    }

    /// Whether `l` scales the input (`true`) or the output.
    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Trainable (`in` or `out`) and frozen parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::over_base(self.l.as_ref().len(), self.in_features, self.out_features, bias)
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Ia3<E, S> {
    /// `dL/dl`, as `l`.
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

    /// `dL/dl` has `l`'s length (`Gradient`).
    fn check_grads(&self, grads: &&mut [E]) -> Result<()> {
        check_len(Operand::Gradient, self.l.as_ref().len(), grads.len())
    }

    /// Scratch [`forward`](Self::forward) needs: `tokens * in` for the
    /// feedforward kind (`x * l`), 0 otherwise (saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        if self.feedforward { tokens.saturating_mul(self.in_features) } else { 0 }
    }

    /// Scratch [`backward`](Self::backward) needs: `2 tokens out` (`x W^T +
    /// b` and `G * l`) for the output kind, `tokens * in` (`G W`) for the
    /// feedforward kind (saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        if self.feedforward {
            tokens.saturating_mul(self.in_features)
        } else {
            tokens.saturating_mul(self.out_features).saturating_mul(2)
        }
    }

    /// `y = (x W^T + b) * l`, or `y = (x * l) W^T + b` when feedforward.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let need = self.forward_scratch_len(x.rows());
        if self.feedforward {
            let xs = scratch.get_mut(..need).ok_or(Error::ScratchTooSmall { needed: need, len: 0 })?;
            let mut xl = MatMut::new(xs, x.rows(), self.in_features)?;
            for (t, row) in xl.row_iter_mut().enumerate() {
                for ((v, xv), l) in row.iter_mut().zip(x.row(t)).zip(self.l.as_ref()) {
                    *v = E::from_accum(xv.to_accum() * l.to_accum());
                }
            }
            base.forward(backend, xl.as_ref(), y)
        } else {
            base.forward(backend, x, y.rb_mut())?;
            scale_columns(&mut y, self.l.as_ref());
            Ok(())
        }
    }

    /// Accumulates `dL/dl` into `grad_l` and, if `grad_x` is given, writes
    /// `dL/dx` into it (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads: grad_l, scratch } = pass;
        let (tokens, n_in, n_out) = (x.rows(), self.in_features, self.out_features);
        if self.feedforward {
            // u = G W;  dl_j += sum_t x_tj u_tj;  dx = u * l
            let (u_buf, _) = scratch.split_at_mut(checked_len(tokens, n_in)?);
            let mut u = MatMut::new(u_buf, tokens, n_in)?;
            base.apply_transpose(backend, grad_y, u.rb_mut(), Accum::Replace)?;
            column_dots(grad_l, x, u.as_ref());
            if let Some(mut gx) = grad_x {
                for (t, row) in gx.row_iter_mut().enumerate() {
                    for ((v, uv), l) in row.iter_mut().zip(u.as_ref().row(t)).zip(self.l.as_ref()) {
                        *v = E::from_accum(uv.to_accum() * l.to_accum());
                    }
                }
            }
        } else {
            // z = x W^T + b;  dl_j += sum_t G_tj z_tj;  dx = (G * l) W
            let tn = checked_len(tokens, n_out)?;
            let (z_buf, rest) = scratch.split_at_mut(tn);
            let (gl_buf, _) = rest.split_at_mut(tn);
            let mut z = MatMut::new(z_buf, tokens, n_out)?;
            base.forward(backend, x, z.rb_mut())?;
            column_dots(grad_l, grad_y, z.as_ref());
            if let Some(gx) = grad_x {
                let mut gl = MatMut::new(gl_buf, tokens, n_out)?;
                for (t, row) in gl.row_iter_mut().enumerate() {
                    row.copy_from_slice(grad_y.row(t));
                }
                scale_columns(&mut gl, self.l.as_ref());
                base.apply_transpose(backend, gl.as_ref(), gx, Accum::Replace)?;
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> WeightUpdate<E> for Ia3<E, S> {
    /// `(out, in)`.
    fn weight_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// [`UpdateKind::Multiplicative`]: rows (or columns) are scaled.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Multiplicative
    }

    /// The output kind scales the bias too; the feedforward kind leaves it.
    fn touches_bias(&self) -> bool {
        !self.feedforward
    }

    /// None.
    fn update_scratch_len(&self, _rows: usize) -> usize {
        0
    }

    /// Refused when some `l_j = 0`: the unmerge divides by `l`.
    fn check_invertible(&self) -> Result<()> {
        if self.l.as_ref().iter().any(|v| v.to_f64() == 0.0) {
            return Err(Error::InvalidParameter {
                name: "IA3 vector",
                rule: "has a zero: merging without a backup could not be undone",
            });
        }
        Ok(())
    }

    /// `W[rows] *= l` (rows for the output kind, columns for the
    /// feedforward kind) and `b[rows] *= l` for the output kind; divides on
    /// unmerge. Each element rounds once.
    fn run_update<B: Backend<E> + ?Sized>(&self, _backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { start, mut block, bias, direction, .. } = block;
        let invert = direction == Direction::Unmerge;
        let f = |v: &mut E, l: &E| {
            let l = l.to_accum();
            *v = E::from_accum(if invert { v.to_accum() / l } else { v.to_accum() * l });
        };
        let l = self.l.as_ref();
        for (k, row) in block.row_iter_mut().enumerate() {
            if self.feedforward {
                row.iter_mut().zip(l).for_each(|(v, l)| f(v, l));
            } else if let Some(l) = l.get(start + k) {
                row.iter_mut().for_each(|v| f(v, l));
            }
        }
        if let (Some(b), false) = (bias, self.feedforward) {
            b.iter_mut().zip(l.get(start..).unwrap_or(&[])).for_each(|(v, l)| f(v, l));
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Ia3<E, S> {
    /// Initializes the vector as PEFT does: all ones, so the adapted layer
    /// is the base exactly.
    pub fn init_adapter(&mut self) {
        self.l.as_mut().fill(E::from_f64(1.0));
    }

    /// `l` mutably, for an optimizer step or a load.
    pub fn vector_mut(&mut self) -> &mut [E] {
        self.l.as_mut()
    }
}

/// `y[:, j] *= l_j`, rounding once per element.
pub(crate) fn scale_columns<E: Element>(y: &mut MatMut<'_, E>, l: &[E]) {
    for row in y.row_iter_mut() {
        for (v, s) in row.iter_mut().zip(l) {
            *v = E::from_accum(v.to_accum() * s.to_accum());
        }
    }
}

/// `acc_j += sum_t a_tj b_tj`, summed in f64 and added once.
pub(crate) fn column_dots<E: Element>(acc: &mut [E], a: MatRef<'_, E>, b: MatRef<'_, E>) {
    for (j, g) in acc.iter_mut().enumerate() {
        let dot: f64 = (0..a.rows())
            .map(|t| a.get(t, j).map_or(0.0, |v| v.to_f64()) * b.get(t, j).map_or(0.0, |v| v.to_f64()))
            .sum();
        *g = E::from_f64(g.to_f64() + dot);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    use crate::backend::Reference;
    use crate::base::Dense;
    use crate::method::{LinearAdapter, MergeTarget, WeightUpdate};

    #[test]
    fn both_kinds_by_hand_and_merged() {
        // W = [[1, 2], [3, 4]], b = [1, -1], x = [1, 1]: x W^T + b = [4, 6].
        let w0 = [1.0f64, 2.0, 3.0, 4.0];
        let bias0 = [1.0f64, -1.0];
        let x = [1.0, 1.0];
        let base = Dense::new(&w0, 2, 2).unwrap().with_bias(&bias0).unwrap();
        let run = |ia3: &Ia3<f64, [f64; 2]>, base: &Dense<'_, f64>| {
            let mut y = [0.0; 2];
            let mut sc = [0.0; 2];
            ia3.forward(&Reference, base, MatRef::new(&x, 1, 2).unwrap(), MatMut::new(&mut y, 1, 2).unwrap(), &mut sc)
                .unwrap();
            y
        };
        // Output kind, l = [2, 0.5]: y = [8, 3].
        let out = Ia3::new(2, 2, false, [2.0, 0.5]).unwrap();
        assert_eq!(run(&out, &base), [8.0, 3.0]);
        // Feedforward, l = [2, 0.5]: x * l = [2, 0.5], y = [2 + 1 + 1, 6 + 2 - 1] = [4, 7].
        let ff = Ia3::new(2, 2, true, [2.0, 0.5]).unwrap();
        assert_eq!(run(&ff, &base), [4.0, 7.0]);
        for ia3 in [&out, &ff] {
            let (mut w, mut b) = (w0, bias0);
            let want = run(ia3, &base);
            let merged = ia3.merge_into(&Reference, MergeTarget::new(&mut w).with_bias(&mut b), &mut []).unwrap();
            let mut y = [0.0; 2];
            let mb = merged.base();
            let mb = if ia3.is_feedforward() { mb.with_bias(&bias0).unwrap() } else { mb };
            mb.forward(&Reference, MatRef::new(&x, 1, 2).unwrap(), MatMut::new(&mut y, 1, 2).unwrap()).unwrap();
            assert_eq!(y, want, "merged equals unmerged (feedforward: {})", ia3.is_feedforward());
            merged.unmerge().unwrap();
            assert_eq!((w, b), (w0, bias0), "restored (powers of two: exact)");
        }
        // A fresh vector is the identity.
        let mut fresh = Ia3::new(2, 2, false, [0.0; 2]).unwrap();
        fresh.init_adapter();
        let mut yb = [0.0; 2];
        base.forward(&Reference, MatRef::new(&x, 1, 2).unwrap(), MatMut::new(&mut yb, 1, 2).unwrap()).unwrap();
        assert_eq!(run(&fresh, &base), yb);
        let zero = Ia3::new(2, 2, false, [0.0, 1.0]).unwrap();
        let mut w = w0;
        let refused = zero.merge_into(&Reference, MergeTarget::new(&mut w), &mut []).map(|_| ());
        assert!(matches!(refused, Err(Error::InvalidParameter { .. })));
        let mut backup = vec![0.0; 4];
        zero.merge_into(&Reference, MergeTarget::new(&mut w).with_backup(&mut backup), &mut [])
            .unwrap()
            .unmerge()
            .unwrap();
        assert_eq!(w, w0);
    }
}
