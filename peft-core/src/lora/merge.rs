//! LoRA's update for merging: `dW = s B A`, added row block by row block. (its docs are in the [parent module](super))
use super::layer::Lora;
use crate::backend::{Backend, Op, Outcome};
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::Error;

impl<E: Element, S: AsRef<[E]>> DeltaRows<E> for Lora<E, S> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// `dst (=|+=) factor s B[start..start + n] A`: the product a merge
    /// adds (`factor = 1`) or an unmerge subtracts (`factor = -1`), one
    /// gemm.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, dst, accum, factor, scratch: _ } = block;
        let (a, b) = self.views()?;
        let b = b.rows_range(start, dst.rows()).ok_or(Error::Overflow)?;
        backend.gemm(dst, accum, b, Op::N, a, Op::N, self.scale_times(factor))
    }

    /// With PEFT's `lora_bias`: the merge adds `s lora_bias` to the layer's
    /// bias.
    fn delta_touches_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// `bias[k] += factor s lora_bias[start + k]`, rounded once.
    fn delta_bias(&self, start: usize, bias: &mut [E], factor: f64) {
        if let Some(lb) = self.bias.as_ref().and_then(|b| b.as_ref().get(start..)) {
            let s = self.scale_times(factor);
            for (v, l) in bias.iter_mut().zip(lb) {
                *v = E::from_accum(v.to_accum() + s * l.to_accum());
            }
        }
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>] Lora<E, S>);
