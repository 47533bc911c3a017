//! DoRA forward pass. (its docs are in the [parent module](super))
use super::Dora;
use crate::backend::{Accum, Backend, Outcome};
use crate::base::{FrozenLinear, add_bias};
use crate::element::Element;
use crate::matrix::MatMut;
use crate::method::ForwardPass;

/// Scratch elements DoRA's forward needs: LoRA's, `tokens * r`.
pub const fn forward_scratch_len(tokens: usize, rank: usize) -> usize {
    crate::lora::forward_scratch_len(tokens, rank)
}

impl<E: Element, S: AsRef<[E]>, C: AsRef<[E]>> Dora<E, S, C> {
    /// `y = b + (m / n) * (x W^T + s (x A^T) B^T)` over the read-only
    /// `base`, with the cached norms, shapes checked by
    /// [`LinearAdapter::forward`](crate::method::LinearAdapter::forward);
    /// [`Error::InvalidParameter`](crate::Error::InvalidParameter) (`"DoRA
    /// norms"`) for a stale cache.
    pub(super) fn forward_cached<B, L>(&self, pass: ForwardPass<'_, E, B, L>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let lora = &self.lora;
        self.check_fresh()?;
        base.apply(backend, x, y.rb_mut(), Accum::Replace)?;
        lora.add_low_rank(backend, x, y.rb_mut(), 1.0, scratch)?;
        self.scale_rows(&mut y);
        if let Some(bias) = base.bias() {
            add_bias(&mut y, bias);
        }
        Ok(())
    }

    /// `y[:, j] *= m_j / n_j`, rounding once per element. The ratios are
    /// formed 256 columns at a time on the stack (no heap), so the inner
    /// loop is a plain multiply the compiler vectorizes.
    pub(crate) fn scale_rows(&self, y: &mut MatMut<'_, E>) {
        const CHUNK: usize = 256;
        let n_out = y.cols();
        let mut ratios = [<E::Accum as Element>::ZERO; CHUNK];
        let mut j0 = 0;
        while j0 < n_out {
            let w = CHUNK.min(n_out - j0);
            for (k, r) in ratios.iter_mut().take(w).enumerate() {
                *r = self.ratio(j0 + k);
            }
            for row in y.row_iter_mut() {
                if let Some(seg) = row.get_mut(j0..j0 + w) {
                    for (v, r) in seg.iter_mut().zip(&ratios) {
                        *v = E::from_accum(v.to_accum() * *r);
                    }
                }
            }
            j0 += w;
        }
    }
}
