//! LoRA forward pass. (its docs are in the [parent module](super))
use super::layer::{Lora, forward_scratch_len};
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::Element;
use crate::error::scratch_prefix;
use crate::matrix::{MatMut, MatRef};

impl<E: Element, S: AsRef<[E]>> Lora<E, S> {
    /// `y += factor s ((x A^T) B^T + lora_bias)`: the low-rank path alone,
    /// added to `y` (an adapter set's multiplier is `factor`). `scratch`
    /// holds `x A^T` (at least `tokens * r` elements, else
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall)). Other
    /// shapes are the caller's to check; a wrong one is still an error,
    /// from the views or the backend.
    pub(crate) fn add_low_rank<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        mut y: MatMut<'_, E>,
        factor: f64,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let one = <E::Accum as Element>::from_f64(1.0);
        let (a, b) = self.views()?;
        let t_buf = scratch_prefix(scratch, forward_scratch_len(x.rows(), self.rank))?;
        let mut t = MatMut::new(t_buf, x.rows(), self.rank)?;
        backend.gemm(t.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
        let s = self.scale_times(factor);
        backend.gemm(y.rb_mut(), Accum::Add, t.as_ref(), Op::N, b, Op::T, s)?;
        if let Some(lb) = self.bias.as_ref() {
            for row in y.row_iter_mut() {
                for (v, l) in row.iter_mut().zip(lb.as_ref()) {
                    *v = E::from_accum(v.to_accum() + s * l.to_accum());
                }
            }
        }
        Ok(())
    }
}
