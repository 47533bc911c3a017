//! DoRA backward pass. (its docs are in the [parent module](super))
use super::Dora;
use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::lora::LoraGrads;
use crate::matrix::{MatMut, checked_len};
use crate::method::BackwardPass;

/// Gradient buffers of a DoRA adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct DoraGrads<'g, E> {
    /// `dL/dA`, `[r, in]`.
    pub a: &'g mut [E],
    /// `dL/dB`, `[out, r]`.
    pub b: &'g mut [E],
    /// `dL/dm`, `[out]`.
    pub magnitude: &'g mut [E],
}

/// Scratch elements DoRA's backward needs: `2 tokens out` (`z` and
/// `G'`) plus LoRA's `2 tokens r` (saturating).
pub const fn backward_scratch_len(tokens: usize, out: usize, rank: usize) -> usize {
    tokens.saturating_mul(out).saturating_mul(2).saturating_add(crate::lora::backward_scratch_len(tokens, rank))
}

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]>> Dora<E, S, C> {
    /// Accumulates `dL/dA`, `dL/dB`, `dL/dm` into `grads` and, if `grad_x`
    /// is given, writes `dL/dx` into it (see the [module docs](super)),
    /// shapes checked by
    /// [`LinearAdapter::backward`](crate::method::LinearAdapter::backward);
    /// [`Error::InvalidParameter`](crate::Error::InvalidParameter) for a
    /// stale cache.
    pub(super) fn backward_cached<B, L>(&self, pass: BackwardPass<'_, E, B, L, DoraGrads<'_, E>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let lora = &self.lora;
        let (tokens, n_out) = (x.rows(), lora.out_features());
        self.check_fresh()?;

        let tn = checked_len(tokens, n_out)?;
        let (z_buf, rest) = scratch.split_at_mut(tn);
        let (gp_buf, rest) = rest.split_at_mut(tn);
        // z = x W^T + s (x A^T) B^T
        let mut z = MatMut::new(z_buf, tokens, n_out)?;
        base.apply(backend, x, z.rb_mut(), Accum::Replace)?;
        lora.add_low_rank(backend, x, z.rb_mut(), 1.0, rest)?;
        // dm_j += (sum_t G_tj z_tj) / n_j, the sum in f64 and added once.
        for (j, dm) in grads.magnitude.iter_mut().enumerate() {
            let n = self.norms.as_ref().get(j).map_or(0.0, |v| v.to_f64());
            let dot: f64 = (0..tokens)
                .map(|t| {
                    let g = grad_y.get(t, j).map_or(0.0, |v| v.to_f64());
                    g * z.as_ref().get(t, j).map_or(0.0, |v| v.to_f64())
                })
                .sum();
            *dm = E::from_f64(dm.to_f64() + dot / n);
        }
        // G' = G * (m / n), per column.
        let mut gp = MatMut::new(gp_buf, tokens, n_out)?;
        for (t, gp_row) in gp.row_iter_mut().enumerate() {
            gp_row.copy_from_slice(grad_y.row(t));
        }
        self.scale_rows(&mut gp);
        let low = LoraGrads::new(grads.a, grads.b);
        match grad_x {
            Some(mut gx) => {
                base.apply_transpose(backend, gp.as_ref(), gx.rb_mut(), Accum::Replace)?;
                lora.low_rank_backward(backend, x, gp.as_ref(), Some(gx), Some(low), 1.0, rest)
            }
            None => lora.low_rank_backward(backend, x, gp.as_ref(), None, Some(low), 1.0, rest),
        }
    }
}
