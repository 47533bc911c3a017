//! Bottleneck adapter forward pass. (its docs are in the [parent module](super))

use super::BottleneckAdapter;
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::Element;
use crate::error::{Operand, Result, check_io, check_scratch};
use crate::matrix::{MatMut, MatRef};

impl<E: Element, S: AsRef<[E]>> BottleneckAdapter<E, S> {
    /// Scratch [`forward`](Self::forward) needs: `tokens * m`.
    pub fn forward_scratch_len(&self, tokens: usize) -> usize {
        super::forward_scratch_len(tokens, self.width)
    }

    /// `h = x + scale * (act(x W_down^T + b_down) W_up^T + b_up)`.
    ///
    /// Shapes: `x [tokens, d]`, `h [tokens, d]` (overwritten, never read).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Input`, `Output`), [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall),
    /// before anything is written.
    pub fn forward<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        mut h: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        self.check_rows(&x, h.rows(), h.cols(), Operand::Output)?;
        let tokens = x.rows();
        let need = self.forward_scratch_len(tokens);
        check_scratch(need, scratch.len())?;
        let (z_buf, _) = scratch.split_at_mut(need);
        let mut z = MatMut::new(z_buf, tokens, self.width)?;
        self.bottleneck(backend, x, &mut z, true)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let w_up = MatRef::new(self.w_up.as_ref(), self.dim, self.width)?;
        backend.gemm(h.rb_mut(), Accum::Replace, z.as_ref(), Op::N, w_up, Op::T, one)?;
        let s = <E::Accum as Element>::from_f64(self.scale);
        for (i, h_row) in h.row_iter_mut().enumerate() {
            for ((hv, &xv), &bu) in h_row.iter_mut().zip(x.row(i)).zip(self.b_up.as_ref().iter()) {
                let branch = s * (hv.to_accum() + bu.to_accum());
                *hv = if branch == E::Accum::ZERO { xv } else { E::from_accum(xv.to_accum() + branch) };
            }
        }
        Ok(())
    }

    /// `z = x W_down^T + b_down`, then `z = act(z)` if `activate`.
    pub(super) fn bottleneck<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        z: &mut MatMut<'_, E>,
        activate: bool,
    ) -> Outcome<E, B> {
        let one = <E::Accum as Element>::from_f64(1.0);
        let w_down = MatRef::new(self.w_down.as_ref(), self.width, self.dim)?;
        backend.gemm(z.rb_mut(), Accum::Replace, x, Op::N, w_down, Op::T, one)?;
        for row in z.row_iter_mut() {
            for (v, &b) in row.iter_mut().zip(self.b_down.as_ref().iter()) {
                let pre = v.to_accum() + b.to_accum();
                *v = E::from_accum(if activate { self.activation.apply(pre) } else { pre });
            }
        }
        Ok(())
    }

    /// Checks `x [tokens, d]` and another `[tokens, d]` operand.
    pub(super) fn check_rows(&self, x: &MatRef<'_, E>, rows: usize, cols: usize, operand: Operand) -> Result<()> {
        check_io(x.rows(), x.cols(), self.dim, operand, rows, cols, self.dim)
    }
}
