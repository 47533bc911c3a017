//! LoRA backward pass.
//!
//! With `t = x A^T` `[tokens, r]` and `G = dL/dy` `[tokens, out]`, the
//! forward `y = x W^T + b + s t B^T` gives, element by element
//! (`y_ij = ... + s sum_k t_ik B_jk`, `t_ik = sum_l x_il A_kl`):
//!
//! ```text
//! dL/dB = s G^T t              [out, r]   = s G^T (x A^T)
//! u     = G B                  [tokens, r]
//! dL/dA = s u^T x              [r, in]    = s B^T G^T x
//! dL/dx = G W + s u A          [tokens, in] = G (W + s B A), without forming B A
//! ```
//!
//! The mistakes note's `grad_B = (x A^T)^T (s G)` has shape `[r, out]`, the
//! transpose of `B`; the correct `s G^T (x A^T)` is `[out, r]`. Every formula
//! here is checked against central finite differences in f64.
//!
//! There is no `dL/dW` and no `dL/db`: the base is frozen (mistakes 1 and
//! 12 in `peft_verify::mistakes`), and it is a read-only
//! [`FrozenLinear`] here.

use super::layer::Lora;
use crate::backend::{Accum, Backend, Op};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Operand, check_io, check_len, check_scratch, check_shape, scratch_pair};
use crate::matrix::{MatMut, MatRef, checked_len};

/// Gradient buffers of the adapter, accumulated into (`+=`), so that
/// several micro-batches sum. Zero them before the first micro-batch.
#[derive(Debug)]
pub struct LoraGrads<'g, E> {
    /// `dL/dA`, `[r, in]`.
    pub a: &'g mut [E],
    /// `dL/dB`, `[out, r]`.
    pub b: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> Lora<E, S> {
    /// Accumulates `dL/dA` and `dL/dB` into `grads` and, if `grad_x` is
    /// given, writes `dL/dx = G W + s (G B) A` into it (overwriting).
    ///
    /// Shapes: `base` `in -> out`, `x [tokens, in]` (the forward input),
    /// `grad_y [tokens, out]`, `grad_x [tokens, in]`, `grads.a [r, in]`,
    /// `grads.b [out, r]`; scratch at least
    /// [`backward_scratch_len(tokens)`](Self::backward_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) (`Weight`, `Input`, `GradOutput`, `GradInput`, `GradA`,
    /// `GradB`), [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall), [`Error::Overflow`](crate::Error::Overflow), before
    /// anything is written; the backend's own errors.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        grad_x: Option<MatMut<'_, E>>,
        grads: LoraGrads<'_, E>,
        scratch: &mut [E],
    ) -> Result<(), B::Error> {
        let tokens = x.rows();
        let (r, n_in, n_out) = (self.rank, self.in_features, self.out_features);
        self.check_base(base)?;
        check_io(x.rows(), x.cols(), n_in, Operand::GradOutput, grad_y.rows(), grad_y.cols(), n_out)?;
        if let Some(gx) = &grad_x {
            check_shape(Operand::GradInput, gx.rows(), gx.cols(), tokens, n_in)?;
        }
        check_len(Operand::GradA, checked_len(r, n_in)?, grads.a.len())?;
        check_len(Operand::GradB, checked_len(n_out, r)?, grads.b.len())?;
        let need = self.backward_scratch_len(tokens);
        check_scratch(need, scratch.len())?;

        if let Some(mut gx) = grad_x {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            self.low_rank_backward(backend, x, grad_y, Some(gx), Some(grads), 1.0, scratch)
        } else {
            self.low_rank_backward(backend, x, grad_y, None, Some(grads), 1.0, scratch)
        }
    }

    /// The low-rank path's backward at scale `factor s`: accumulates
    /// `dA += factor s (G B)^T x` and `dB += factor s G^T (x A^T)` when
    /// `grads` is given (a frozen adapter of a set passes `None`), and adds
    /// `factor s (G B) A` to `grad_x` when given. `scratch` holds `x A^T`
    /// and `G B` (at least `2 tokens r` elements, else
    /// [`Error::ScratchTooSmall`](crate::Error::ScratchTooSmall)). Other
    /// shapes are the caller's to check.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn low_rank_backward<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        grad_x: Option<MatMut<'_, E>>,
        grads: Option<LoraGrads<'_, E>>,
        factor: f64,
        scratch: &mut [E],
    ) -> Result<(), B::Error> {
        let (tokens, r, n_in, n_out) = (x.rows(), self.rank, self.in_features, self.out_features);
        let (t_buf, u_buf) = scratch_pair(scratch, self.forward_scratch_len(tokens))?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let s = self.scale_times(factor);
        let (a, b) = self.views()?;
        let mut u = MatMut::new(u_buf, tokens, r)?;
        if let Some(grads) = grads {
            let mut t = MatMut::new(t_buf, tokens, r)?;
            // t = x A^T;  dB += s G^T t
            backend.gemm(t.rb_mut(), Accum::Replace, x, Op::N, a, Op::T, one)?;
            let gb = MatMut::new(grads.b, n_out, r)?;
            backend.gemm(gb, Accum::Add, grad_y, Op::T, t.as_ref(), Op::N, s)?;
            // u = G B;  dA += s u^T x
            backend.gemm(u.rb_mut(), Accum::Replace, grad_y, Op::N, b, Op::N, one)?;
            let ga = MatMut::new(grads.a, r, n_in)?;
            backend.gemm(ga, Accum::Add, u.as_ref(), Op::T, x, Op::N, s)?;
        } else if grad_x.is_some() {
            backend.gemm(u.rb_mut(), Accum::Replace, grad_y, Op::N, b, Op::N, one)?;
        }
        // dx += s u A
        if let Some(gx) = grad_x {
            backend.gemm(gx, Accum::Add, u.as_ref(), Op::N, a, Op::N, s)?;
        }
        Ok(())
    }
}
