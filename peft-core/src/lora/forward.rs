//! LoRA forward pass.
//!
//! ```text
//! y = x W^T + b + s (x A^T) B^T     (t = x A^T is [tokens, r], in scratch)
//! ```
//!
//! The scale multiplies the low-rank path only, never the base output
//! (mistake 3 in `peft_verify::mistakes`, and a bug in at least one
//! published crate). The sum is formed in PEFT's order: base and bias first,
//! then the low-rank term added. A merged base runs its own forward alone
//! ([`Merged::forward`](super::Merged::forward)).

use super::layer::Lora;
use crate::backend::{Accum, Backend, Op};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Operand, check_io, check_scratch, scratch_prefix};
use crate::matrix::{MatMut, MatRef};

impl<E: Element, S: AsRef<[E]>> Lora<E, S> {
    /// `y = x W^T + b + s (x A^T) B^T` over the read-only `base`.
    ///
    /// Shapes: `base` `in -> out` like the adapter, `x [tokens, in]`,
    /// `y [tokens, out]` (overwritten; its old contents are never read);
    /// `scratch` at least [`forward_scratch_len(tokens)`](Self::forward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight`, `Input`, `Output`) or
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall), before anything is written. A backend that
    /// fails after validation passes its own error through.
    pub fn forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        mut y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Result<(), B::Error> {
        let tokens = x.rows();
        self.check_base(base)?;
        check_io(x.rows(), x.cols(), self.in_features, Operand::Output, y.rows(), y.cols(), self.out_features)?;
        let need = self.forward_scratch_len(tokens);
        check_scratch(need, scratch.len())?;
        base.forward(backend, x, y.rb_mut())?;
        self.add_low_rank(backend, x, y, 1.0, scratch)
    }

    /// `y += factor s (x A^T) B^T`: the low-rank path alone, added to `y`
    /// (an adapter set's multiplier is `factor`). `scratch` holds `x A^T`
    /// (at least `tokens * r` elements, else
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall)). Other
    /// shapes are the caller's to check; a wrong one is still an error,
    /// from the views or the backend.
    pub(crate) fn add_low_rank<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        y: MatMut<'_, E>,
        factor: f64,
        scratch: &mut [E],
    ) -> Result<(), B::Error> {
        let one = <E::Accum as Element>::from_f64(1.0);
        let (a, b) = self.views()?;
        let t_buf = scratch_prefix(scratch, self.forward_scratch_len(x.rows()))?;
        let mut t = MatMut::new(t_buf, x.rows(), self.rank)?;
        backend.gemm(t.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
        backend.gemm(y, Accum::Add, t.as_ref(), Op::N, b, Op::T, self.scale_times(factor))
    }
}
