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
//! Merging scales `W` (and for the output kind `b`) in place; the guard
//! [`Ia3Merged`] restores it from a backup bit for bit, or by dividing by
//! `l` (refused at merge time without a backup when some `l_j = 0`).

use core::marker::PhantomData;

use crate::backend::{Accum, Backend};
use crate::base::{Dense, FrozenLinear};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_io, check_len, check_scratch, check_shape};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};

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
        let base = self
            .in_features
            .checked_mul(self.out_features)
            .and_then(|w| w.checked_add(if bias { self.out_features } else { 0 }))
            .ok_or(Error::Overflow)?;
        Ok(ParamReport { trainable: self.l.as_ref().len(), base })
    }

    /// Scratch [`forward`](Self::forward) needs: `tokens * in` for the
    /// feedforward kind (`x * l`), 0 otherwise (saturating).
    pub fn forward_scratch_len(&self, tokens: usize) -> usize {
        if self.feedforward { tokens.saturating_mul(self.in_features) } else { 0 }
    }

    /// Scratch [`backward`](Self::backward) needs: `2 tokens out` (`x W^T +
    /// b` and `G * l`) for the output kind, `tokens * in` (`G W`) for the
    /// feedforward kind (saturating).
    pub fn backward_scratch_len(&self, tokens: usize) -> usize {
        if self.feedforward {
            tokens.saturating_mul(self.in_features)
        } else {
            tokens.saturating_mul(self.out_features).saturating_mul(2)
        }
    }

    /// `y = (x W^T + b) * l`, or `y = (x * l) W^T + b` when feedforward.
    ///
    /// Shapes: `x [tokens, in]`, `y [tokens, out]` (overwritten), scratch at
    /// least [`forward_scratch_len`](Self::forward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Input`, `Output`),
    /// [`Error::ScratchTooSmall`], before anything is written; the
    /// backend's own errors.
    pub fn forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        mut y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> core::result::Result<(), B::Error> {
        self.check_base(base)?;
        check_io(x.rows(), x.cols(), self.in_features, Operand::Output, y.rows(), y.cols(), self.out_features)?;
        let need = self.forward_scratch_len(x.rows());
        check_scratch(need, scratch.len())?;
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
    ///
    /// Shapes: `x [tokens, in]` (the forward input), `grad_y [tokens, out]`,
    /// `grad_x [tokens, in]`, `grad_l` as `l`; scratch at least
    /// [`backward_scratch_len`](Self::backward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Input`, `GradOutput`,
    /// `GradInput`, `Gradient`), [`Error::ScratchTooSmall`], before anything
    /// is written; the backend's own errors.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        grad_x: Option<MatMut<'_, E>>,
        grad_l: &mut [E],
        scratch: &mut [E],
    ) -> core::result::Result<(), B::Error> {
        let (tokens, n_in, n_out) = (x.rows(), self.in_features, self.out_features);
        self.check_base(base)?;
        check_io(tokens, x.cols(), n_in, Operand::GradOutput, grad_y.rows(), grad_y.cols(), n_out)?;
        if let Some(gx) = &grad_x {
            check_shape(Operand::GradInput, gx.rows(), gx.cols(), tokens, n_in)?;
        }
        check_len(Operand::Gradient, self.l.as_ref().len(), grad_l.len())?;
        check_scratch(self.backward_scratch_len(tokens), scratch.len())?;
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

    fn check_base<L: FrozenLinear<E> + ?Sized>(&self, base: &L) -> Result<()> {
        check_len(Operand::Weight, self.in_features, base.in_features())?;
        check_len(Operand::Weight, self.out_features, base.out_features())
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

impl<E: Element, S: AsRef<[E]>> Ia3<E, S> {
    /// Merges `l` into `weight` (`[out, in]`) and, for the output kind,
    /// into `bias` (`[out]`), and returns the guard that owns them until
    /// [`Ia3Merged::unmerge`] (or its drop) restores them.
    ///
    /// `backup` (`out * in`, plus `out` when a bias is merged) restores bit
    /// for bit; without it the restore divides by `l`, which is refused
    /// here when some `l_j = 0`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Bias`, `Backup`),
    /// [`Error::InvalidParameter`] (`"IA3 vector"`) for a zero without a
    /// backup; all before anything is written.
    pub fn merge_into<'w>(
        &'w self,
        weight: &'w mut [E],
        bias: Option<&'w mut [E]>,
        backup: Option<&'w mut [E]>,
    ) -> Result<Ia3Merged<'w, E, S>> {
        let (n_in, n_out) = (self.in_features, self.out_features);
        let n = checked_len(n_out, n_in)?;
        check_len(Operand::Weight, n, weight.len())?;
        // The feedforward kind leaves the bias alone: it is not taken.
        let bias = if self.feedforward { None } else { bias };
        if let Some(b) = &bias {
            check_len(Operand::Bias, n_out, b.len())?;
        }
        let need = n + bias.as_ref().map_or(0, |b| b.len());
        match &backup {
            Some(bk) => check_len(Operand::Backup, need, bk.len())?,
            None if self.l.as_ref().iter().any(|v| v.to_f64() == 0.0) => {
                return Err(Error::InvalidParameter {
                    name: "IA3 vector",
                    rule: "has a zero: merging without a backup could not be undone",
                });
            }
            None => {}
        }
        let mut backup = backup;
        if let Some(bk) = backup.as_deref_mut() {
            let (bw, bb) = bk.split_at_mut(n);
            bw.copy_from_slice(weight);
            if let Some(b) = bias.as_deref() {
                bb.copy_from_slice(b);
            }
        }
        let mut bias = bias;
        self.scale(weight, bias.as_deref_mut(), false);
        Ok(Ia3Merged { ia3: self, weight, bias, backup, active: true })
    }

    /// `W *= l` (rows or columns), `b *= l` for the output kind; with
    /// `invert`, divides instead.
    fn scale(&self, weight: &mut [E], bias: Option<&mut [E]>, invert: bool) {
        let f = |v: &mut E, l: &E| {
            let l = l.to_accum();
            *v = E::from_accum(if invert { v.to_accum() / l } else { v.to_accum() * l });
        };
        for (row, lo) in weight.chunks_exact_mut(self.in_features.max(1)).zip(0..self.out_features) {
            if self.feedforward {
                row.iter_mut().zip(self.l.as_ref()).for_each(|(v, l)| f(v, l));
            } else if let Some(l) = self.l.as_ref().get(lo) {
                row.iter_mut().for_each(|v| f(v, l));
            }
        }
        if let Some(b) = bias {
            b.iter_mut().zip(self.l.as_ref()).for_each(|(v, l)| f(v, l));
        }
    }
}

/// A base weight (and, for the output kind, its bias) with an (IA)^3 vector
/// merged in. Owns the borrows until restored; dropping it restores them
/// (as [`unmerge`](Self::unmerge)); [`keep`](Self::keep) stays merged.
#[must_use = "dropping the guard unmerges at once"]
#[derive(Debug)]
pub struct Ia3Merged<'w, E: Element, S: AsRef<[E]>> {
    ia3: &'w Ia3<E, S>,
    weight: &'w mut [E],
    bias: Option<&'w mut [E]>,
    backup: Option<&'w mut [E]>,
    active: bool,
}

impl<'w, E: Element, S: AsRef<[E]>> Ia3Merged<'w, E, S> {
    /// The merged weight `W' [out, in]`.
    pub fn weight(&self) -> &[E] {
        self.weight
    }

    /// The merged bias, when one was merged (output kind).
    pub fn bias(&self) -> Option<&[E]> {
        self.bias.as_deref()
    }

    /// The merged weight as a read-only base, with the merged bias if one
    /// was merged (the feedforward kind's bias is the caller's, unchanged).
    pub fn base(&self) -> Dense<'_, E> {
        let base =
            Dense::new(self.weight, self.ia3.out_features, self.ia3.in_features).unwrap_or_else(|_| Dense::empty());
        match self.bias.as_deref() {
            Some(b) => base.with_bias(b).unwrap_or(base),
            None => base,
        }
    }

    /// Restores `W` (and `b`): from the backup bit for bit, or by dividing
    /// by `l`.
    pub fn unmerge(mut self) {
        self.restore();
    }

    /// Leaves them merged for good; gives the weight back.
    pub fn keep(mut self) -> &'w mut [E] {
        self.active = false;
        core::mem::take(&mut self.weight)
    }

    fn restore(&mut self) {
        if !core::mem::replace(&mut self.active, false) {
            return;
        }
        match self.backup.as_deref() {
            Some(bk) => {
                let (bw, bb) = bk.split_at(self.weight.len().min(bk.len()));
                self.weight.iter_mut().zip(bw).for_each(|(v, s)| *v = *s);
                if let Some(b) = self.bias.as_deref_mut() {
                    // Same length: checked by `merge_into`.
                    b.iter_mut().zip(bb).for_each(|(v, s)| *v = *s);
                }
            }
            None => self.ia3.scale(self.weight, self.bias.as_deref_mut(), true),
        }
    }
}

impl<E: Element, S: AsRef<[E]>> Drop for Ia3Merged<'_, E, S> {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::backend::Reference;

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
            let merged = ia3.merge_into(&mut w, Some(&mut b), None).unwrap();
            let mut y = [0.0; 2];
            let mb = merged.base();
            let mb = if ia3.is_feedforward() { mb.with_bias(&bias0).unwrap() } else { mb };
            mb.forward(&Reference, MatRef::new(&x, 1, 2).unwrap(), MatMut::new(&mut y, 1, 2).unwrap()).unwrap();
            assert_eq!(y, want, "merged equals unmerged (feedforward: {})", ia3.is_feedforward());
            merged.unmerge();
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
        assert!(matches!(zero.merge_into(&mut w, None, None).map(|_| ()), Err(Error::InvalidParameter { .. })));
        let mut backup = vec![0.0; 4];
        zero.merge_into(&mut w, None, Some(&mut backup)).unwrap().unmerge();
        assert_eq!(w, w0);
    }
}
