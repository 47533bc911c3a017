//! LoRA backward pass. (its docs are in the [parent module](super))
use super::layer::{Lora, forward_scratch_len};
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::Element;
use crate::error::scratch_pair;
use crate::matrix::{MatMut, MatRef};

/// Gradient buffers of the adapter, accumulated into (`+=`), so that
/// several micro-batches sum. Zero them before the first micro-batch.
#[derive(Debug)]
pub struct LoraGrads<'g, E> {
    /// `dL/dA`, `[r, in]`.
    pub a: &'g mut [E],
    /// `dL/dB`, `[out, r]`.
    pub b: &'g mut [E],
    /// `dL/d lora_bias`, `[out]`, for an adapter with PEFT's `lora_bias`
    /// (`None` otherwise, or to leave it frozen).
    pub bias: Option<&'g mut [E]>,
}

impl<'g, E> LoraGrads<'g, E> {
    /// The buffers of `A` and `B` (no `lora_bias`).
    pub fn new(a: &'g mut [E], b: &'g mut [E]) -> Self {
        Self { a, b, bias: None }
    }
}

impl<E: Element, S: AsRef<[E]>> Lora<E, S> {
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
    ) -> Outcome<E, B> {
        let (tokens, r, n_in, n_out) = (x.rows(), self.rank, self.in_features, self.out_features);
        let (t_buf, u_buf) = scratch_pair(scratch, forward_scratch_len(tokens, r))?;
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
            // d lora_bias += s sum_t G[t, :]
            if let Some(gl) = grads.bias {
                for (j, g) in gl.iter_mut().enumerate() {
                    let sum = grad_y.row_iter().fold(<E::Accum as Element>::ZERO, |acc, row| {
                        acc + row.get(j).map_or(<E::Accum as Element>::ZERO, |v| v.to_accum())
                    });
                    *g = E::from_accum(g.to_accum() + s * sum);
                }
            }
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
