//! LoRA forward pass.
//!
//! ```text
//! unmerged:  y = x W^T + b + s (x A^T) B^T     (three gemms: t = x A^T is [tokens, r])
//! merged:    y = x W'^T + b,  W' = W + s B A   (one gemm)
//! ```
//!
//! The scale multiplies the low-rank path only, never the base output (the
//! seed's mistake 3, and a bug in at least one published crate). The sum is
//! formed in PEFT's order: base and bias first, then the low-rank term added.

use super::layer::LoraLinear;
use crate::backend::{Accum, Backend, Op};
use crate::element::Element;
use crate::error::{Operand, Result, check_io, check_scratch};
use crate::matrix::{MatMut, MatRef};

impl<E: Element> LoraLinear<'_, E> {
    /// Scratch elements [`forward`](Self::forward) needs for `tokens` rows:
    /// `tokens * r` unmerged (the product `x A^T`), 0 merged. Saturates at
    /// `usize::MAX` (which no slice can satisfy).
    pub fn forward_scratch_len(&self, tokens: usize) -> usize {
        if self.merged { 0 } else { tokens.saturating_mul(self.rank) }
    }

    /// `y = x W^T + b + s (x A^T) B^T` (or `x W^T + b` when merged).
    ///
    /// Shapes: `x [tokens, in]`, `y [tokens, out]` (overwritten; its old
    /// contents are never read); `scratch` at least
    /// [`forward_scratch_len(tokens)`](Self::forward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Input`, `Output`) or
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall), before anything is written. A backend that
    /// fails after validation passes its own error through.
    pub fn forward<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        mut y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Result<()> {
        let tokens = x.rows();
        self.check_io(&x, y.rows(), y.cols(), Operand::Output)?;
        let need = self.forward_scratch_len(tokens);
        check_scratch(need, scratch.len())?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let w = MatRef::new(self.weight, self.out_features, self.in_features)?;
        backend.gemm(y.rb_mut(), Accum::Replace, x, Op::N, w, Op::T, one)?;
        if let Some(bias) = self.bias {
            add_bias(&mut y, bias);
        }
        if !self.merged {
            let (t_buf, _) = scratch.split_at_mut(need);
            let a = MatRef::new(self.a, self.rank, self.in_features)?;
            let b = MatRef::new(self.b, self.out_features, self.rank)?;
            let mut t = MatMut::new(t_buf, tokens, self.rank)?;
            backend.gemm(t.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
            backend.gemm(y, Accum::Add, t.as_ref(), Op::N, b, Op::T, self.scale_accum())?;
        }
        Ok(())
    }

    /// Checks `x [tokens, in]` and an output-like operand `[tokens, out]`.
    pub(super) fn check_io(&self, x: &MatRef<'_, E>, rows: usize, cols: usize, operand: Operand) -> Result<()> {
        check_io(x.rows(), x.cols(), self.in_features, operand, rows, cols, self.out_features)
    }
}

/// `y[i, :] += bias` for every row, rounding once per element.
fn add_bias<E: Element>(y: &mut MatMut<'_, E>, bias: &[E]) {
    for row in y.row_iter_mut() {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = E::from_accum(v.to_accum() + b.to_accum());
        }
    }
}
